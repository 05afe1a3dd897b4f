"""``stratumrm bench`` runs end to end and prints its tables (quick mode, tiny loads).

Nothing here checks a figure: the numbers depend on the machine. The benchmark
starts its own pool, proxies and sidecar as child processes on 127.0.0.1.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from bridge.bench.command import bench


def test_codec_prints_microseconds_per_message() -> None:
    result = CliRunner().invoke(bench, ["codec", "--iterations", "2000", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "submit codec" in result.output and "notify relay" in result.output


@pytest.mark.slow  # ~40 s of child processes; codec, handshake and failover keep a default-tier test each
@pytest.mark.timeout(600)
def test_quick_run_of_every_benchmark_prints_every_table() -> None:
    result = CliRunner().invoke(bench, ["--quick"])
    assert result.exit_code == 0, result.output
    table = result.stdout
    # codec
    assert "submit relay" in table
    # transport: one row per path, the lossy line, CPU per process, the targets
    for row in ("direct ", "sv1 relay ", "sv1 in tls ", "stratumrm "):
        assert row in table
    assert "B/share up" in table and "max shares/s" in table
    assert "% UDP loss each way" in table
    assert "CPU microseconds per share" in table
    assert "sustained through the pair with zero loss" in table
    # farm: the three variants and the ratio to SV1 over TLS
    assert "kB/miner/hour" in table
    for row in ("miner<->pool TCP", "miner<->pool TLS", "proxy<->sidecar TLS+UDP"):
        assert row in table
    assert "x SV1 over TLS" in table
    # progress, one line per phase, on standard error
    assert "[transport 1/1] stratumrm" in result.stderr and "[farm 1/1] stratumrm" in result.stderr
