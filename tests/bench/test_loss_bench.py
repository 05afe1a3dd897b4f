"""``stratumrm bench loss`` at a tiny size: both paths through the TUN link, the table printed."""

from __future__ import annotations

import pytest
import trio
from click.testing import CliRunner

from bridge.bench import loss
from bridge.bench.command import bench
from bridge.bench.stunnel import stunnel_binary
from bridge.testing.tun_link import unavailable


def _skip_reason() -> str | None:
    return unavailable() or (None if stunnel_binary() else "stunnel is not installed; run tests/setup-system.sh")


def test_both_paths_cross_the_lossy_link() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    settings = loss.LossSettings(shares=12, warmup=4, runs=1, seed=3, loss=2.0, delay_ms=1.0)
    lines: list[str] = []
    [run] = trio.run(loss.run, settings, lines.append)
    for path in loss.PATHS:
        measured = run.paths[path]
        assert measured.shares >= 12 and len(measured.latencies) == measured.shares
        # the link carried the path's traffic (share, verdict, ACKs) and nothing was lost on the way
        assert measured.link_packets >= 2 * measured.shares and measured.link_bytes > 100 * measured.shares
    assert run.paths[loss.STRATUMRM].stratumrm["datagrams_sent"] >= 12
    assert any("p99 ratio" in line for line in lines)
    table = loss.report(settings, [run])
    assert "| stratumrm pair |" in table and "p99 ratio stratumrm / sv1 over tls" in table


def test_the_command_says_why_it_cannot_run() -> None:
    reason = _skip_reason()
    result = CliRunner().invoke(bench, ["loss", "--quick", "--shares", "6", "--warmup", "2"])
    if reason:
        assert result.exit_code != 0 and reason in result.output
    else:
        assert result.exit_code == 0, result.output
        assert "| sv1 over tls (stunnel pair) |" in result.output
