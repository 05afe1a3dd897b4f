"""The handshake micro-benchmark runs, resumes, and reports both figures."""

from __future__ import annotations

from bridge.bench import handshake


async def test_full_and_resumed_handshakes_are_measured_for_both_key_types() -> None:
    results = await handshake.measure(repeats=5)
    for key_type in ("p256", "ed25519"):
        figures = results[key_type]
        assert figures["repeats"] == 5 and figures["resumed"] == 5  # every resumption attempt resumed
        assert 0 < figures["full_ms"]["min"] <= figures["full_ms"]["median"] <= figures["full_ms"]["p90"]
        assert 0 < figures["resumed_ms"]["median"] and 0 < figures["peer_check_us"]
    text = handshake.report(results)
    assert "full" in text and "resumed" in text and "P-256" in text and "Ed25519" in text and "5/5" in text
