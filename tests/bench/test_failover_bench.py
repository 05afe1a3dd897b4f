"""The failover benchmark runs and reports fault-to-backup-job times for RST and blackhole."""

from __future__ import annotations

from bridge.bench import failover


def test_failover_benchmark_measures_both_faults() -> None:
    result = failover.run(10, runs=1, silence_timeout=1.0)
    rst, blackhole = result["faults"]["rst"], result["faults"]["blackhole"]
    assert rst["reason"] == "connection lost" and blackhole["reason"] == "silent"
    assert 0 <= rst["detection"] <= rst["all"] < 2.0
    assert 0.3 <= blackhole["detection"] <= blackhole["all"] < 3.0
    assert rst["reconnects"] == 5 and rst["extranonce_changes"] == 5  # half of each kind
    text = failover.report(result)
    assert "rst" in text and "blackhole" in text and "every rig" in text
