"""The miner-facing Stratum V1 session, driven without sockets."""

from __future__ import annotations

import json

import pytest

from bridge.errors import LineTooLong
from bridge.sv1.events import ProtocolViolation
from bridge.sv1.framing import LineBuffer
from bridge.sv1.messages import (
    Authorize,
    Configure,
    ExtranonceSubscribe,
    GetTransactions,
    MinerResponse,
    MultiVersion,
    NotifyParams,
    Submit,
    Subscribe,
    SuggestDifficulty,
    SuggestTarget,
)
from bridge.sv1.server import MAX_AUTHORIZED_WORKERS, ServerSession

NOTIFY = NotifyParams("j1", "00" * 32, "aa", "bb", [], "20000000", "1705ae3a", "647025b5", True)


def out(session: ServerSession) -> list[dict]:
    return [json.loads(line) for line in session.data_to_send().decode().splitlines()]


def feed(session: ServerSession, *messages: object) -> list:
    data = b"".join(json.dumps(m).encode() + b"\n" for m in messages)
    return session.receive_data(data)


def handshake(session: ServerSession) -> None:
    feed(
        session,
        {"id": 1, "method": "mining.subscribe", "params": ["x/1"]},
        {"id": 2, "method": "mining.authorize", "params": ["u.w", "x"]},
    )
    session.subscribe_result(1, "abcd0001", 4, [["mining.notify", "s1"]])
    session.respond(2, True)
    out(session)


def test_every_miner_method_decodes_to_its_event() -> None:
    s = ServerSession()
    events = feed(
        s,
        {"id": None, "method": "mining.suggest_target", "params": ["ff" * 32]},
        {"id": 1, "method": "mining.configure", "params": [["version-rolling"], {"version-rolling.mask": "ffffffff"}]},
        {"id": 2, "method": "mining.subscribe", "params": ["cgminer/4.11.1", "e1a3b2c4"]},
        {"id": "xnsub", "method": "mining.extranonce.subscribe", "params": []},
        {"id": "auth", "method": "mining.authorize", "params": ["user.rig", "x"]},
        {"id": 5, "method": "mining.suggest_difficulty", "params": [512]},
        {"id": 6, "method": "mining.multi_version", "params": [1]},
        {"id": "txlist1", "method": "mining.get_transactions", "params": ["1"]},
    )
    assert [type(e) for e in events] == [
        SuggestTarget,
        Configure,
        Subscribe,
        ExtranonceSubscribe,
        Authorize,
        SuggestDifficulty,
        MultiVersion,
        GetTransactions,
    ]
    assert events[2].params.session_id == "e1a3b2c4" and s.user_agent == "cgminer/4.11.1"
    assert events[4].id == "auth" and s.extranonce_subscribed
    assert events[1].extensions == ["version-rolling"]
    assert events[5].difficulty == 512
    assert out(s) == []  # nothing is answered on the session's own


def test_subscribe_result_is_the_first_line_and_held_lines_follow_in_order() -> None:
    s = ServerSession()
    feed(s, {"id": 0, "method": "mining.authorize", "params": ["u", "p"]}, {"id": 1, "method": "mining.subscribe", "params": []})
    s.respond(0, True)
    s.set_difficulty(2.0)
    s.notify(NOTIFY)
    assert out(s) == []
    s.subscribe_result(1, "abcd0001", 8, [["mining.notify", "s"]])
    lines = out(s)
    assert lines[0] == {"id": 1, "result": [[["mining.notify", "s"]], "abcd0001", 8], "error": None}
    assert lines[1] == {"id": 0, "result": True, "error": None}
    assert lines[2]["method"] == "mining.set_difficulty" and lines[2]["params"] == [2]
    assert lines[3]["method"] == "mining.notify" and lines[3]["params"][-1] is True


def test_configure_answer_may_precede_the_subscribe_result() -> None:
    s = ServerSession()
    feed(
        s,
        {"id": 1, "method": "mining.configure", "params": [["version-rolling"], {}]},
        {"id": 2, "method": "mining.subscribe", "params": ["bitaxe/BM1368/v2.9.0"]},
    )
    s.respond(1, {"version-rolling": True, "version-rolling.mask": "1fffe000"})
    assert out(s)[0]["id"] == 1


@pytest.mark.parametrize("request_id", [0, 7, "auth", "s1", None])
def test_ids_are_echoed_exactly_and_null_is_never_answered(request_id) -> None:
    s = ServerSession()
    handshake(s)
    feed(s, {"id": request_id, "method": "mining.suggest_difficulty", "params": [4]})
    s.respond(request_id, True)
    lines = out(s)
    if request_id is None:
        assert lines == []
    else:
        assert lines == [{"id": request_id, "result": True, "error": None}]


def test_submit_with_five_or_six_params_and_numeric_fields() -> None:
    s = ServerSession()
    handshake(s)
    five, six, numeric = feed(
        s,
        {"method": "mining.submit", "params": ["u.w", "j1", "00000000", "647025b5", "0a029ed1"], "id": 4},
        {"id": 5, "method": "mining.submit", "params": ["u.w", "j1", "00000001", "647025b5", "0a029ed1", "00002000"]},
        {"id": 6, "method": "mining.submit", "params": ["u.w", "j1", "00000002", 1685071285, 168990417]},
    )
    assert isinstance(five, Submit) and five.params.version_bits is None and five.id == 4
    assert six.params.version_bits == "00002000"
    assert numeric.params.ntime == "647025b5" and numeric.params.nonce == f"{168990417:08x}"


@pytest.mark.parametrize(
    "params, fragment",
    [
        (["u.w", "j1", "zz", "647025b5", "0a029ed1"], "extranonce2"),
        (["u.w", "j1", "000", "647025b5", "0a029ed1"], "extranonce2"),
        (["u.w", "j1", "00000000", "6470", "0a029ed1"], "ntime"),
        (["u.w", "j1", "00000000", "647025b5", "1234"], "nonce"),
        (["u.w", "j1", "00000000", "647025b5", "0a029ed1", "xyz"], "version_bits"),
        (["u.w", "", "00000000", "647025b5", "0a029ed1"], "job_id"),
        (["u.w", "j1", "00000000", "647025b5"], "Invalid params"),
        ({"a": 1}, "Invalid params"),
    ],
)
def test_bad_submits_get_error_20_naming_the_field(params, fragment) -> None:
    s = ServerSession()
    handshake(s)
    [event] = feed(s, {"id": 9, "method": "mining.submit", "params": params})
    assert isinstance(event, ProtocolViolation) and not event.fatal
    [reply] = out(s)
    assert reply["id"] == 9 and reply["error"][0] == 20 and fragment in reply["error"][1]


def test_submit_before_subscribe_and_before_authorize() -> None:
    s = ServerSession()
    submit = {"id": 3, "method": "mining.submit", "params": ["u", "j", "00", "647025b5", "0a029ed1"]}
    feed(s, submit)
    assert out(s) == [{"id": 3, "result": False, "error": [25, "Not subscribed", None]}]
    feed(s, {"id": 1, "method": "mining.subscribe", "params": []})
    s.subscribe_result(1, "ab", 4, [])
    out(s)
    feed(s, submit)
    assert out(s) == [{"id": 3, "result": False, "error": [24, "Unauthorized worker", None]}]


def test_unknown_method_gets_error_20_and_the_session_goes_on() -> None:
    s = ServerSession()
    [event] = feed(s, {"id": 24, "method": "mining.foo", "params": []})
    assert isinstance(event, ProtocolViolation) and not event.fatal
    assert out(s) == [{"id": 24, "result": None, "error": [20, "Unknown method 'mining.foo'", None]}]
    assert isinstance(feed(s, {"id": 1, "method": "mining.subscribe", "params": []})[0], Subscribe)


@pytest.mark.parametrize("line", [b"not json\n", b"[1,2]\n", b'"str"\n', b'{"id": 1,\n'])
def test_invalid_json_is_fatal(line) -> None:
    s = ServerSession()
    events = s.receive_data(line)
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation) and events[0].fatal
    assert s.closed and s.receive_data(b'{"id":1,"method":"mining.subscribe","params":[]}\n') == []


def test_miner_responses_are_events() -> None:
    s = ServerSession()
    [event] = feed(s, {"id": "gv1", "error": None, "result": "cpuminer/2.5.1"})
    assert isinstance(event, MinerResponse) and event.id == "gv1" and bytes(event.result) == b'"cpuminer/2.5.1"'


def test_oversized_line_is_fatal_and_memory_is_bounded() -> None:
    s = ServerSession(max_line=1024)
    events = s.receive_data(b"{" + b" " * 2000)
    assert events and events[0].fatal
    buffer = LineBuffer(100)
    with pytest.raises(LineTooLong):
        buffer.feed(b"x" * 50 + b"\n" + b"y" * 150)


def test_framing_handles_split_lines_crlf_and_blank_lines() -> None:
    buffer = LineBuffer()
    assert buffer.feed(b'{"a"') == []
    assert buffer.feed(b': 1}\r\n\n\n{"b": 2}\n{"c"') == [b'{"a": 1}', b'{"b": 2}']
    assert buffer.pending == 4


def test_difficulty_is_written_without_a_fraction_when_whole() -> None:
    s = ServerSession()
    handshake(s)
    s.set_difficulty(1024.0)
    s.set_difficulty(0.001)
    assert [line["params"] for line in out(s)] == [[1024], [0.001]]


def test_statistics_count_what_happened() -> None:
    s = ServerSession()
    handshake(s)
    feed(s, {"id": 9, "method": "mining.nope", "params": []})
    stats = s.statistics()
    assert stats.subscribed and stats.authorized_workers == 1 and stats.violations == 1 and stats.lines_received == 3


def test_a_connection_keeps_a_bounded_set_of_authorized_workers() -> None:
    session = ServerSession()
    for n in range(MAX_AUTHORIZED_WORKERS + 50):
        session.record_worker(f"alice.w{n}")
        session.record_worker("alice.w0")  # again: counted once
    assert len(session.authorized_workers) == MAX_AUTHORIZED_WORKERS
    assert session.authorized_workers[0] == "alice.w0"
    assert session.statistics().authorized_workers == MAX_AUTHORIZED_WORKERS
