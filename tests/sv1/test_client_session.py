"""The pool-facing Stratum V1 session, driven without sockets."""

from __future__ import annotations

import json

from bridge.sv1.client import ClientSession
from bridge.sv1.events import ProtocolViolation, Reply, UnknownPoolRequest
from bridge.sv1.messages import (
    GetVersion,
    Notify,
    Ping,
    Reconnect,
    SetDifficulty,
    SetExtranonce,
    SetVersionMask,
    ShowMessage,
    SubmitParams,
)
from bridge.sv1.rejects import read_verdict

NOTIFY = (
    '{"params":["6b05d75700000037","36b6b33055f3556c2919c92af2fc9ddeeee9c69503e3f3e7f193bdcf00000000",'
    '"0100000001","0a636b706f6f6c",[],"20000000","207fffff","6b05d915",true],"id":null,"method":"mining.notify"}'
)


def sent(c: ClientSession) -> list[dict]:
    return [json.loads(line) for line in c.data_to_send().decode().splitlines()]


def pool(c: ClientSession, *lines: str) -> list:
    return c.receive_data("".join(line + "\n" for line in lines).encode())


def subscribed_and_authorized() -> ClientSession:
    c = ClientSession()
    c.subscribe("cgminer/4.11.1")
    c.authorize("u.w", "x")
    sent(c)
    pool(c, '{"result":[[["mining.notify","6b05d75a"]],"5ad7056b",8],"id":1,"error":null}')
    assert sent(c) == [{"id": 2, "method": "mining.authorize", "params": ["u.w", "x"]}]
    pool(c, '{"result":true,"error":null,"id":2}')
    return c


def test_pool_ordering_authorize_waits_for_subscribe_and_the_rest_for_authorize() -> None:
    c = ClientSession()
    c.configure(["version-rolling"], {"version-rolling.mask": "ffffffff"}, context="cfg")
    c.suggest_difficulty(512, context="sd")
    c.subscribe("bitaxe/BM1368/v2.9.0", context="sub")
    c.authorize("u.w", "x", context="auth")
    assert [m["method"] for m in sent(c)] == ["mining.configure", "mining.subscribe"]
    events = pool(
        c,
        '{"result":{"version-rolling":true,"version-rolling.mask":"1fffe000"},"id":1,"error":null}',
        '{"result":[[["mining.notify","6b05d75a"]],"5ad7056b",8],"id":2,"error":null}',
    )
    assert [e.context for e in events] == ["cfg", "sub"] and c.version_mask == "1fffe000"
    assert [m["method"] for m in sent(c)] == ["mining.authorize"]
    pool(c, '{"result":true,"error":null,"id":3}')
    [suggest] = sent(c)
    assert suggest == {"id": 4, "method": "mining.suggest_difficulty", "params": [512]}
    assert c.extranonce1 == "5ad7056b" and c.extranonce2_size == 8 and c.subscription_id == "6b05d75a"


def test_subscribe_params_resume_and_submit_param_count() -> None:
    c = subscribed_and_authorized()
    c.subscribe("cpuminer/2.5.1", "6b05d75b")
    c.submit(SubmitParams("u.w", "j", "0000000000000000", "647025b5", "0a029ed1"))
    c.submit(SubmitParams("u.w", "j", "0100000000000000", "647025b5", "0a029ed1", "00002000"))
    lines = sent(c)
    assert lines[0]["params"] == ["cpuminer/2.5.1", "6b05d75b"]
    assert len(lines[1]["params"]) == 5 and len(lines[2]["params"]) == 6


def test_notifications_and_pool_requests_become_events() -> None:
    c = subscribed_and_authorized()
    events = pool(
        c,
        NOTIFY,
        '{"params":[0.5],"id":null,"method":"mining.set_difficulty"}',
        '{"id":null,"method":"mining.set_extranonce","params":["02187bbb75009a23a3",3]}',
        '{"id":null,"method":"mining.set_version_mask","params":["1fffe000"]}',
        '{"id":null,"method":"client.reconnect","params":["pool.example.com","3333",0]}',
        '{"id":null,"method":"client.show_message","params":["hello"]}',
        '{"id":"gv1","method":"client.get_version","params":[]}',
        '{"params":[],"id":42,"method":"mining.ping"}',
        '{"id":7,"method":"mining.set_goal","params":["x"]}',
    )
    assert [type(e) for e in events] == [
        Notify,
        SetDifficulty,
        SetExtranonce,
        SetVersionMask,
        Reconnect,
        ShowMessage,
        GetVersion,
        Ping,
        UnknownPoolRequest,
    ]
    assert c.difficulty == 0.5 and c.extranonce1 == "02187bbb75009a23a3" and c.extranonce2_size == 3
    c.respond("gv1", "cgminer/4.11.1")
    assert sent(c) == [{"id": "gv1", "result": "cgminer/4.11.1", "error": None}]


def test_reject_dialects_of_every_pool_family() -> None:
    c = subscribed_and_authorized()
    for _ in range(6):
        c.submit(SubmitParams("u.w", "j", "00", "647025b5", "0a029ed1"))
    sent(c)
    events = pool(
        c,
        '{"reject-reason":"Stale","result":false,"error":null,"id":3}',  # ckpool
        '{"id":4,"result":null,"error":[23,"low difficulty share of 0.3"]}',  # NOMP, 2 elements
        '{"id":5,"result":false,"error":[-2,"Job \'x\' not found",null]}',  # slush
        '{"id":6,"error":{"code":22,"message":"duplicate share","data":null}}',  # miningcore, no result
        '{"id":7,"result":false,"error":"Worker mismatch"}',  # ckpool parameter error
        '{"id":8,"result":true,"error":null}',
    )
    verdicts = [read_verdict(e.response) for e in events]
    assert [(v.accepted, v.code) for v in verdicts] == [
        (False, 21),
        (False, 23),
        (False, 21),
        (False, 22),
        (False, 20),
        (True, 0),
    ]
    assert all(isinstance(e, Reply) and e.method == "mining.submit" for e in events)


def test_malformed_pool_lines_are_violations_not_exceptions() -> None:
    c = subscribed_and_authorized()
    bad_notify = NOTIFY.replace('"20000000"', '"2000"')
    events = pool(
        c, bad_notify, '{"params":[-1],"id":null,"method":"mining.set_difficulty"}', '{"result":true,"id":999,"error":null}'
    )
    assert [type(e) for e in events] == [ProtocolViolation, ProtocolViolation]
    assert c.statistics().unmatched_replies == 1
    [fatal] = c.receive_data(b"Invalid JSON, disconnecting\n")
    assert fatal.fatal and c.closed


def test_cancelled_request_answer_is_unmatched() -> None:
    c = subscribed_and_authorized()
    request_id = c.submit(SubmitParams("u.w", "j", "00", "647025b5", "0a029ed1"))
    c.cancel(request_id)
    assert pool(c, f'{{"result":true,"error":null,"id":{request_id}}}') == []
