"""The health core, sans-IO, with explicit now: a fresh connection's subscribe, and the check schedule."""

from __future__ import annotations

import json

import pytest

from bridge.relay.health import (
    MAX_LINES_BEFORE_RESULT,
    HealthWatch,
    SubscribeCheck,
    Verdict,
)

CKPOOL_SUBSCRIBE = b'{"result":[[["mining.notify","6b05d761"]],"5dd7056b",8],"id":1,"error":null}\n'


def check(now: float = 100.0) -> SubscribeCheck:
    return SubscribeCheck("pool:3333", "probe/1", now, timeout=5.0)


def test_the_check_sends_one_subscribe_and_nothing_else() -> None:
    probe = check()
    sent = probe.data_to_send()
    assert json.loads(sent) == {"id": 1, "method": "mining.subscribe", "params": ["probe/1"]}
    assert sent.endswith(b"\n") and probe.data_to_send() == b""


def test_ckpools_subscribe_result_is_up_whatever_comes_first_and_however_it_is_split() -> None:
    probe = check()
    data = b'{"params":[1],"id":null,"method":"mining.set_difficulty"}\n' + CKPOOL_SUBSCRIBE
    for i in range(len(data)):
        probe.receive_data(data[i : i + 1], 100.0)
    assert probe.verdict == Verdict(True, "")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b'{"result":null,"id":1,"error":[20,"go away",null]}\n', "refused mining.subscribe"),
        (b'{"result":false,"id":1,"error":null}\n', "refused mining.subscribe"),
        (b"Invalid JSON, disconnecting\n", "not SV1 JSON"),
        (b"x" * 70_000, "too long"),
        (b'{"id":null,"method":"mining.notify","params":[]}\n' * MAX_LINES_BEFORE_RESULT, "without answering"),
        (b'{"result":[[],"00",8],"id":true,"error":null}\n' * MAX_LINES_BEFORE_RESULT, "without answering"),
    ],
)
def test_anything_but_a_subscribe_result_is_down_with_a_reason(data: bytes, words: str) -> None:
    probe = check()
    probe.receive_data(data, 100.0)
    assert probe.verdict is not None and not probe.verdict.up and words in probe.verdict.reason


def test_silence_until_the_deadline_is_down() -> None:
    probe = check(100.0)
    probe.handle_timer(104.9)
    assert probe.verdict is None
    probe.handle_timer(105.0)
    assert probe.verdict == Verdict(False, "pool pool:3333 did not answer mining.subscribe within 5 s")


def test_refused_and_closed_connections_are_down_and_the_first_verdict_stands() -> None:
    probe = check()
    probe.connect_failed("Connection refused", 100.0)
    probe.receive_data(CKPOOL_SUBSCRIBE, 100.1)
    assert probe.verdict == Verdict(False, "cannot connect to pool pool:3333: Connection refused")
    closed = check()
    closed.connection_lost("closed the connection", 100.0)
    assert closed.verdict is not None and "closed the connection before answering" in closed.verdict.reason


# ------------------------------------------------------------------ the schedule


def test_evidence_of_life_needs_no_check_and_quiet_makes_one_due() -> None:
    watch = HealthWatch(0.0, quiet_after=10.0)
    watch.alive(5.0)
    assert watch.get_timer() == 15.0 and not watch.check_due(14.9) and watch.check_due(15.0)
    watch.check_started(15.0)
    assert watch.get_timer() is None  # one check at a time
    watch.check_done(Verdict(True), 15.1)
    assert watch.up and watch.take_changes() == [] and watch.get_timer() == 25.1


def test_without_quiet_after_only_a_suspicion_makes_a_check_due() -> None:
    watch = HealthWatch(0.0)
    assert watch.get_timer() is None
    watch.suspect("pool closed the connection", 50.0)
    assert watch.check_due(50.0)


def test_a_failed_check_is_an_outage_checked_again_with_backoff_until_it_ends() -> None:
    watch = HealthWatch(0.0, backoff_first=0.5, backoff_max=2.0)
    watch.suspect("reset", 1.0)
    now = 1.0
    retries = []
    watch.check_started(now)
    watch.check_done(Verdict(False, "refused"), now)
    assert watch.take_changes() == [Verdict(False, "refused")] and watch.outages == 1
    for _ in range(4):
        deadline = watch.get_timer()
        assert deadline is not None
        retries.append(deadline - now)
        now = deadline
        watch.suspect("another channel failed", now)  # explained by the outage: changes nothing
        watch.check_started(now)
        watch.check_done(Verdict(False, "still refused"), now)
    assert retries == [0.5, 1.0, 2.0, 2.0] and watch.reason == "still refused" and watch.take_changes() == []
    watch.check_started(now + 2.0)
    watch.check_done(Verdict(True), now + 2.0)
    assert watch.up and watch.take_changes() == [Verdict(True, "")] and watch.get_timer() is None


def test_jobs_arriving_end_an_outage_at_once() -> None:
    watch = HealthWatch(0.0, quiet_after=10.0)
    watch.suspect("reset", 1.0)
    watch.check_started(1.0)
    watch.check_done(Verdict(False, "refused"), 1.0)
    watch.alive(1.2)  # the pool is back: a channel's connection got a notify
    assert watch.up and watch.take_changes() == [Verdict(False, "refused"), Verdict(True, "")]
    assert watch.get_timer() == 11.2


def test_a_check_that_fails_while_the_pool_speaks_is_not_an_outage() -> None:
    watch = HealthWatch(0.0, quiet_after=10.0)
    watch.check_started(10.0)
    watch.alive(12.0)  # jobs keep arriving on the channels
    watch.check_done(Verdict(False, "cannot connect: Too many open files"), 15.0)
    assert watch.up and watch.take_changes() == []


def test_a_check_that_cannot_tell_changes_nothing_and_is_tried_again_with_backoff() -> None:
    watch = HealthWatch(0.0, backoff_first=0.5, backoff_max=2.0)
    watch.suspect("a pool connection failed: Too many open files", 1.0)
    watch.check_started(1.0)
    watch.check_done(Verdict(None, "connecting failed locally: Too many open files"), 1.0)
    assert watch.up and watch.take_changes() == [] and watch.get_timer() == 1.5
    watch.check_started(1.5)
    watch.check_done(Verdict(None, "still short"), 1.5)
    assert watch.up and watch.get_timer() == 2.5
    watch.check_started(2.5)
    watch.check_done(Verdict(False, "refused"), 2.5)
    assert not watch.up and watch.take_changes() == [Verdict(False, "refused")]
