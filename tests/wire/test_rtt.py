"""RFC 6298 RTT estimation, RTO bounds, backoff and Karn's rule."""

from __future__ import annotations

import pytest

from bridge.wire.rtt import RttEstimator, karn_allows_sample


def test_initial_rto_before_any_sample() -> None:
    rtt = RttEstimator()
    assert rtt.rto == pytest.approx(0.200)
    assert rtt.srtt is None and rtt.statistics().samples == 0


def test_first_sample_sets_srtt_and_half_rttvar() -> None:
    rtt = RttEstimator()
    rtt.observe(0.100)
    assert rtt.srtt == pytest.approx(0.100)
    assert rtt.rttvar == pytest.approx(0.050)
    assert rtt.rto == pytest.approx(0.100 + 4 * 0.050)


def test_later_samples_follow_rfc6298_with_rttvar_updated_first() -> None:
    rtt = RttEstimator()
    rtt.observe(0.100)
    rtt.observe(0.200)
    rttvar = 0.75 * 0.050 + 0.25 * abs(0.100 - 0.200)
    srtt = 0.875 * 0.100 + 0.125 * 0.200
    assert rtt.rttvar == pytest.approx(rttvar)
    assert rtt.srtt == pytest.approx(srtt)
    assert rtt.rto == pytest.approx(srtt + 4 * rttvar)


def test_rto_is_clamped_to_min_and_max() -> None:
    rtt = RttEstimator()
    rtt.observe(0.0002)  # loopback
    assert rtt.rto == pytest.approx(0.020)
    rtt = RttEstimator()
    rtt.observe(5.0)
    assert rtt.rto == pytest.approx(2.0)


def test_granularity_floor_on_the_variance_term() -> None:
    rtt = RttEstimator(min_rto=0.001, granularity=0.010)
    for _ in range(200):
        rtt.observe(0.050)  # rttvar decays towards 0
    assert rtt.rto == pytest.approx(0.050 + 0.010, rel=1e-3)


def test_backoff_doubles_up_to_max_and_resets_on_a_sample() -> None:
    rtt = RttEstimator()
    rtt.observe(0.100)
    base = rtt.rto
    now = 1.0  # each expiry of a single timer comes one (backed-off) RTO after the last
    rtt.on_timeout(now)
    assert rtt.rto == pytest.approx(2 * base)
    now += rtt.rto
    rtt.on_timeout(now)
    assert rtt.rto == pytest.approx(4 * base)
    for _ in range(20):
        now += rtt.rto
        rtt.on_timeout(now)
    assert rtt.rto == pytest.approx(2.0)
    assert rtt.statistics().backoffs == 22
    rtt.observe(0.100)
    assert rtt.rto < 2.0


def test_karns_rule_skips_answers_to_retransmissions() -> None:
    assert karn_allows_sample(1)
    assert not karn_allows_sample(2)
    rtt = RttEstimator()
    assert not rtt.on_answer(sent_at=1.0, now=1.5, transmissions=2)
    assert rtt.srtt is None
    assert rtt.on_answer(sent_at=1.0, now=1.05)
    assert rtt.srtt == pytest.approx(0.05)


def test_ack_delay_is_subtracted_only_above_min_rtt() -> None:
    rtt = RttEstimator()
    rtt.observe(0.010)
    rtt.observe(0.030, ack_delay=0.015)  # 0.015 >= min_rtt 0.010: use it
    assert rtt.statistics().latest_rtt == pytest.approx(0.030)
    assert rtt.srtt == pytest.approx(0.875 * 0.010 + 0.125 * 0.015)
    before = rtt.srtt
    assert before is not None
    rtt.observe(0.012, ack_delay=0.010)  # would go below min_rtt: ignore the delay
    assert rtt.srtt == pytest.approx(0.875 * before + 0.125 * 0.012)


def test_nonsense_samples_are_ignored() -> None:
    rtt = RttEstimator()
    rtt.observe(0.0)
    rtt.observe(-1.0)
    assert not rtt.on_answer(sent_at=2.0, now=1.0)
    assert rtt.statistics().samples == 0


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError):
        RttEstimator(min_rto=1.0, max_rto=0.5)
    assert RttEstimator(initial_rto=10.0).rto == pytest.approx(2.0)
