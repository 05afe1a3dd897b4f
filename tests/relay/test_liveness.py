"""PeerSilence: when a peer counts as silent, with this process's own lateness excused."""

from __future__ import annotations

import pytest

from bridge.relay.liveness import PeerSilence


def test_a_peer_is_silent_dead_after_seconds_after_its_last_word() -> None:
    silence = PeerSilence(5.0, now=10.0)
    assert silence.deadline() == 15.0 and not silence.silent(14.9) and silence.silent(15.0)
    silence.heard(12.0)
    silence.heard(11.0)  # an older observation does not move the last word back
    assert silence.last_heard == 12.0 and silence.deadline() == 17.0


def test_lateness_is_excused_once_per_last_word_and_capped_at_dead_after() -> None:
    silence = PeerSilence(5.0, now=0.0)
    silence.timer_ran(due=1.0, now=4.0)
    silence.timer_ran(due=4.5, now=9.5)  # 3 s + 5 s late: capped at 5
    assert silence.deadline() == pytest.approx(10.0)
    silence.heard(9.5)  # a new word: the excuse was for the old one
    assert silence.deadline() == pytest.approx(14.5)
    silence.timer_ran(due=9.0, now=10.5)  # due before the word: only the second after it counts
    assert silence.deadline() == pytest.approx(15.5)


def test_a_silent_peer_whose_transport_answers_is_busy_until_the_busy_limit() -> None:
    silence = PeerSilence(5.0, now=0.0)
    assert silence.busy_limit == 30.0
    now = silence.deadline()
    while True:
        silence.acknowledged(age=0.4, now=now)  # its kernel acknowledges every heartbeat
        if silence.silent(now):
            break
        assert silence.deadline() > now
        now = silence.deadline()
    assert now == pytest.approx(30.0)  # alive but hung: found at the busy limit, not never


def test_a_path_that_stopped_acknowledging_gets_no_extension() -> None:
    silence = PeerSilence(5.0, now=0.0)
    silence.acknowledged(age=2.6, now=5.0)  # nothing acknowledged for more than half of dead_after
    assert silence.silent(5.0)
    silence.acknowledged(age=2.5, now=5.0)
    assert not silence.silent(5.0) and silence.deadline() == pytest.approx(10.0)
    silence.heard(7.0)  # it spoke: a fresh dead_after from its word, the busy extension no longer needed
    assert silence.deadline() == pytest.approx(12.0)
