"""``stratumrm bench flood`` and ``stratumrm bench pending`` run end to end (tiny loads).

Nothing here checks a figure: they depend on the machine.
"""

from __future__ import annotations

from click.testing import CliRunner

from bridge.bench.command import bench


def test_flood_benchmark_floods_a_real_sidecar_and_times_honest_shares() -> None:
    result = CliRunner().invoke(bench, ["flood", "--quick", "--seconds", "0.5", "--kind", "bad tag", "--kind", "replay"])
    assert result.exit_code == 0, result.output
    table = result.stdout
    for row in ("none ", "bad tag ", "replay ", "recvfrom only "):
        assert row in table
    assert "dropped per CPU-s" in table and "via UDP" in table and "p99 ms" in table
    assert "random bytes " not in table  # only the kinds asked for


def test_pending_benchmark_prints_memory_per_pending_connection() -> None:
    result = CliRunner().invoke(bench, ["pending", "--count", "20", "--runs", "1", "--settle", "0.1"])
    assert result.exit_code == 0, result.output
    assert "silent TCP " in result.stdout and "ClientHello " in result.stdout and "KiB" in result.stdout
