"""rm.pool (PROTOCOL.md C10): the sidecar tells a proxy that negotiated pool-status when its pool goes down or comes back."""

from __future__ import annotations

import json

from bridge.relay.rm_upstream import StratumRMConnection
from bridge.relay.sidecar.session import SidecarSession
from bridge.wire import control


def hello(session: SidecarSession, features: list[str]) -> list[dict]:
    request = {"id": 1, "method": "rm.hello", "params": {"version": 1, "features": features, "agent": "t"}}
    session.receive_data(json.dumps(request).encode() + b"\n", 1.0)
    return sent(session)


def sent(session: SidecarSession) -> list[dict]:
    return [json.loads(line) for line in session.data_to_send().splitlines()]


def test_changes_are_sent_only_when_pool_status_was_negotiated() -> None:
    session = SidecarSession(now=0.0, udp_port=None)
    [result] = hello(session, ["job-dedup", "pool-status"])
    assert "pool-status" in result["result"]["features"]
    session.pool_status(True, "", 2.0)
    assert sent(session) == []  # up is the assumption
    session.pool_status(False, "cannot connect to pool stratum+tcp://10.0.0.2:3333: refused", 3.0)
    [down] = sent(session)
    assert down["method"] == "rm.pool" and down["params"] == {
        "status": "down",
        "reason": "cannot connect to pool stratum+tcp://10.0.0.2:3333: refused",
    }
    session.pool_status(False, "still refused", 4.0)
    assert sent(session) == []  # no news
    session.pool_status(True, "", 5.0)
    assert [m["params"]["status"] for m in sent(session)] == ["up"]

    old = SidecarSession(now=0.0, udp_port=None)
    hello(old, ["job-dedup"])
    old.pool_status(False, "refused", 2.0)
    assert sent(old) == []


def test_a_proxy_connecting_while_the_pool_is_down_hears_it_after_the_hello() -> None:
    session = SidecarSession(now=0.0, udp_port=None)
    session.pool_status(False, "pool did not answer mining.subscribe within 5 s", 0.5)
    lines = hello(session, list(control.FEATURES))
    assert lines[0]["id"] == 1 and lines[-1]["method"] == "rm.pool" and lines[-1]["params"]["status"] == "down"


def test_rm_pool_from_a_proxy_is_a_protocol_error() -> None:
    session = SidecarSession(now=0.0, udp_port=None)
    hello(session, ["pool-status"])
    session.receive_data(b'{"method":"rm.pool","params":{"status":"down"}}\n', 2.0)
    assert session.closed and "rm.pool" in (session.protocol_error or "")


def test_the_proxy_side_records_the_status() -> None:
    connection = StratumRMConnection()
    connection.start(0.0)
    connection.receive_data(b'{"id":1,"result":{"version":1,"features":["pool-status"]},"error":null}\n', 0.1)
    assert connection.ready and connection.pool_up
    connection.receive_data(b'{"id":null,"method":"rm.pool","params":{"status":"down","reason":"refused"}}\n', 0.2)
    assert not connection.pool_up and connection.pool_reason == "refused" and connection.close_reason is None
    connection.receive_data(b'{"id":null,"method":"rm.pool","params":{"status":"up","reason":""}}\n', 0.3)
    assert connection.pool_up
