"""The reference pool's sans-IO core, fed lines with explicit clocks: no sockets, no sleeping.

The socket-level behaviour (and every failure mode) is in test_pool.py; these tests
pin the core's contract: lines in, lines out, ``now`` (wall clock) and ``time``
(the driver's timer clock) passed in.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from bridge.mining.share import Job, difficulty_to_target, scan_nonces
from bridge.testing.pool_core import ConnectionState, PoolConfig, PoolCore, ckpool_method

NOW = 1_750_000_000.0
DIFFICULTY = 1e-6


def make_core(**fields: Any) -> PoolCore:
    fields.setdefault("difficulty", DIFFICULTY)
    fields.setdefault("seed", 7)
    return PoolCore(PoolConfig(**fields))


def send(core: PoolCore, connection: ConnectionState, request_id: Any, method: str, params: Any, now: float = NOW) -> None:
    core.receive_data(connection, json.dumps({"id": request_id, "method": method, "params": params}).encode() + b"\n", now)


def received(core: PoolCore, connection: ConnectionState) -> list[dict[str, Any]]:
    return [json.loads(line) for line in core.data_to_send(connection).splitlines()]


def subscribed(core: PoolCore, now: float = NOW, worker: str | None = "w1") -> tuple[ConnectionState, list[Any], bytes]:
    """A connection through subscribe (and authorize); returns it, the first notify's params and extranonce1."""
    connection = core.connection_made("192.0.2.1:4000", now)
    send(core, connection, 1, "mining.subscribe", ["m/1"], now)
    answer, set_difficulty, notify = received(core, connection)
    assert set_difficulty["method"] == "mining.set_difficulty" and notify["method"] == "mining.notify"
    if worker is not None:
        send(core, connection, 2, "mining.authorize", [worker, "x"], now)
        assert received(core, connection) == [{"id": 2, "result": True, "error": None}]
    return connection, notify["params"], bytes.fromhex(answer["result"][1])


def good_nonce(notify: list[Any], extranonce1: bytes, extranonce2: bytes) -> int:
    job = Job.from_notify_fields(*notify[:8])
    header76 = job.header76(extranonce1, extranonce2, job.ntime_int, None)
    start = 0
    while not (hits := scan_nonces(header76, start, 1 << 14, difficulty_to_target(DIFFICULTY))):
        start += 1 << 14
    return hits[0][0]


def test_a_handshake_is_lines_in_lines_out_and_the_job_carries_the_given_clock() -> None:
    core = make_core()
    connection = core.connection_made("192.0.2.1:4000", NOW)
    assert core.ready() == []
    send(core, connection, 1, "mining.subscribe", ["m/1"])
    assert core.ready() == [connection] and core.ready() == []
    answer, set_difficulty, notify = received(core, connection)
    assert answer["id"] == 1 and answer["result"][2] == 8
    assert set_difficulty["params"] == [DIFFICULTY]
    assert notify["params"][7] == f"{int(NOW):08x}" and notify["params"][8] is True
    assert received(core, connection) == []


def test_a_share_is_judged_by_its_real_double_sha256() -> None:
    core = make_core()
    connection, notify, extranonce1 = subscribed(core)
    extranonce2 = bytes(8)
    nonce = good_nonce(notify, extranonce1, extranonce2)
    share = ["w1", notify[0], extranonce2.hex(), notify[7], f"{nonce:08x}"]
    send(core, connection, 4, "mining.submit", share)
    assert received(core, connection) == [{"id": 4, "result": True, "error": None}]
    (record,) = core.accepted
    job = Job.from_notify_fields(*notify[:8])
    header = job.header(extranonce1, extranonce2, job.ntime_int, nonce, job.version_int)
    assert record.hash_hex == hashlib.sha256(hashlib.sha256(header).digest()).digest()[::-1].hex()
    send(core, connection, 5, "mining.submit", share)
    assert received(core, connection) == [{"id": 5, "result": False, "error": [22, "Duplicate share", None]}]
    weak = next(
        n for n in range(1 << 20) if job.share_hash(extranonce1, extranonce2, job.ntime_int, n) > difficulty_to_target(DIFFICULTY)
    )
    send(core, connection, 6, "mining.submit", [*share[:4], f"{weak:08x}"])
    assert received(core, connection) == [{"id": 6, "result": False, "error": [23, "Low difficulty share", None]}]
    assert core.statistics().accepted == 1 and core.statistics().rejected == {22: 1, 23: 1}


def test_like_ckpool_methods_match_by_prefix_and_a_second_authorize_is_never_answered() -> None:
    assert ckpool_method("MINING.AUTH") == "mining.authorize"
    assert ckpool_method("Mining.Submit ") == "mining.submit"
    assert ckpool_method("mining.foo") is None
    core = make_core()
    connection, _, _ = subscribed(core, worker=None)
    send(core, connection, 2, "MINING.AUTH", ["w1", "x"])
    assert received(core, connection) == [{"id": 2, "result": True, "error": None}]
    send(core, connection, 3, "mining.authorize", ["w2", "x"])
    send(core, connection, 4, "mining.subscribe", [])
    send(core, connection, 5, "mining.foo", [])
    assert received(core, connection) == []
    assert connection.workers == ("w1",) and connection.silenced == 3
    assert core.statistics().unanswered == {"authorise twice": 1, "subscribe twice": 1, "unknown method": 1}


def test_like_ckpool_a_request_before_subscribe_closes_the_connection() -> None:
    core = make_core()
    connection = core.connection_made("192.0.2.1:4000", NOW)
    send(core, connection, 1, "mining.authorize", ["w1", "x"])
    assert connection.closing and core.ready() == [connection]
    assert received(core, connection) == []


def test_the_timers_run_on_the_time_they_are_given() -> None:
    core = make_core(notify_interval=30.0, block_interval=600.0)
    assert core.get_timer() is None
    connection, notify, _ = subscribed(core)
    core.start_timers(100.0)
    assert core.get_timer() == 130.0
    core.handle_timer(129.9, NOW)
    assert received(core, connection) == []
    core.handle_timer(130.0, NOW + 30)
    (keepalive,) = received(core, connection)
    assert keepalive["params"][8] is False and keepalive["params"][1] == notify[1]
    assert keepalive["params"][7] == f"{int(NOW + 30):08x}"
    assert core.get_timer() == 160.0
    height = core.height
    for time in range(160, 701, 30):
        core.handle_timer(float(time), NOW)
    clean = [m for m in received(core, connection) if m["params"][8] is True]
    assert len(clean) == 1 and core.height == height + 1


def test_vardiff_lowers_a_quiet_connection_on_the_wall_clock() -> None:
    core = make_core(vardiff=True, vardiff_retarget_time=60.0, minimum_difficulty=1e-8, notify_interval=5.0)
    connection, _, _ = subscribed(core)
    core.start_timers(0.0)
    core.handle_timer(5.0, NOW + 30)  # not a minute yet: same difficulty
    assert [m["method"] for m in received(core, connection)] == ["mining.notify"]
    core.handle_timer(10.0, NOW + 60)
    set_difficulty, _ = received(core, connection)
    assert set_difficulty == {"id": None, "method": "mining.set_difficulty", "params": [DIFFICULTY / 4]}


def test_a_closed_session_resumes_until_its_time_is_up() -> None:
    core = make_core()
    first, _, extranonce1 = subscribed(core)
    session_id = extranonce1[::-1].hex()
    core.connection_lost(first, NOW)
    again = core.connection_made("192.0.2.1:4001", NOW + 599)
    send(core, again, 1, "mining.subscribe", ["m/1", session_id], NOW + 599)
    assert received(core, again)[0]["result"][1] == extranonce1.hex()
    core.connection_lost(again, NOW + 599)
    late = core.connection_made("192.0.2.1:4002", NOW + 1200)
    send(core, late, 1, "mining.subscribe", ["m/1", session_id], NOW + 1200)
    assert received(core, late)[0]["result"][1] != extranonce1.hex()


def test_a_stalled_core_sends_no_jobs_and_a_fresh_one_when_it_ends() -> None:
    core = make_core(notify_interval=1.0)
    connection, _, _ = subscribed(core)
    core.start_timers(0.0)
    core.stall(True, NOW)
    core.handle_timer(1.0, NOW)
    core.new_block(NOW)
    assert received(core, connection) == []
    core.stall(False, NOW)
    (notify,) = received(core, connection)
    assert notify["method"] == "mining.notify" and notify["params"][8] is True


@pytest.mark.parametrize("code", [21, 23])
def test_forced_rejects_answer_without_judging(code: int) -> None:
    core = make_core()
    connection, notify, _ = subscribed(core)
    core.reject_next(1, code)
    send(core, connection, 4, "mining.submit", ["w1", notify[0], "00" * 8, notify[7], "00000000"])
    assert received(core, connection)[0]["error"][0] == code
    with pytest.raises(ValueError):
        core.reject_all(99)
