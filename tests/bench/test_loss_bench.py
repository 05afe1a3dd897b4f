"""``stratumrm bench loss`` at a tiny size: both paths through the TUN link, the table printed."""

from __future__ import annotations

import re

from click.testing import CliRunner

from bridge.bench.command import bench
from bridge.bench.stunnel import stunnel_binary
from bridge.testing.tun_link import unavailable


def _skip_reason() -> str | None:
    return unavailable() or (None if stunnel_binary() else "stunnel is not installed; run tests/setup-system.sh")


def test_both_paths_cross_the_lossy_link_or_the_command_says_why_it_cannot_run() -> None:
    reason = _skip_reason()
    options = ["--runs", "1", "--shares", "12", "--warmup", "4", "--seed", "3", "--loss", "2", "--delay-ms", "1"]
    result = CliRunner().invoke(bench, ["loss", *options])
    if reason:
        assert result.exit_code != 0 and reason in result.output
        return
    assert result.exit_code == 0, result.output
    rows = {
        match["path"]: (float(match["bytes"]), float(match["packets"]))
        for match in re.finditer(
            r"^\| (?P<path>[^|]+?) \| [\d.]+ ms \| [\d.]+ ms \| (?P<bytes>\d+) B \| (?P<packets>[\d.]+) \|", result.output, re.M
        )
    }
    assert set(rows) == {"sv1 over tls (stunnel pair)", "stratumrm pair"}, result.output
    for link_bytes, packets in rows.values():
        # the link carried each path's traffic (share, verdict, ACKs): counted by the link itself
        assert packets >= 2 and link_bytes > 100
    assert "p99 ratio stratumrm / sv1 over tls" in result.output
    assert "[loss run 1/1] stratumrm pair: 4 + 12 lone shares ..." in result.stderr  # progress while it runs
