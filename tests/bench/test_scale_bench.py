"""``stratumrm bench scale`` runs end to end at a tiny size (50 rigs).

Nothing here checks a timing or a memory figure: they depend on the machine.
"""

from __future__ import annotations

import resource

from click.testing import CliRunner

from bridge.bench.command import bench
from bridge.bench.scale import raise_file_limit


def test_scale_benchmark_drives_rigs_through_a_real_proxy_and_sidecar_and_a_storm() -> None:
    result = CliRunner().invoke(
        bench, ["scale", "--rigs", "50", "--window", "0.5", "--share-interval", "0.5", "--storm-spread", "0.5"]
    )
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert "proxy KiB/rig" in table and "storm settle s" in table and "disconnects" in table
    row = next(line.split() for line in table.splitlines() if line.split()[:1] == ["50"])
    _rigs, _proxy_kib, _sidecar_kib, shares_per_second, _proxy_us, _sidecar_us, settle, _disconnects = row
    assert float(shares_per_second) > 0  # rigs submitted and were answered in the window
    assert settle != "never" and float(settle) >= 0  # every rig came back after the storm
    assert "[scale] 50 rigs: reconnect storm" in result.stderr  # progress lines while it runs


def test_scale_benchmark_raises_its_own_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if soft == hard and hard > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard // 2, hard))
        raised = raise_file_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert hard == resource.RLIM_INFINITY or raised == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_scale_benchmark_refuses_a_bad_rig_list() -> None:
    result = CliRunner().invoke(bench, ["scale", "--rigs", "ten"])
    assert result.exit_code != 0 and "rig counts" in result.output
