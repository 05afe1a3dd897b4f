"""rm.goaway (PROTOCOL.md C11) in the two cores: sent only when negotiated, read by the proxy."""

from __future__ import annotations

import json

from bridge.relay.rm_upstream import StratumRMConnection
from bridge.relay.sidecar.session import SidecarSession


def hello(session: SidecarSession, features: list[str]) -> dict:
    request = {"id": 1, "method": "rm.hello", "params": {"version": 1, "features": features, "agent": "t"}}
    session.receive_data(json.dumps(request).encode() + b"\n", 1.0)
    return json.loads(session.data_to_send().splitlines()[0])


def test_goaway_goes_only_to_proxies_that_negotiated_it() -> None:
    session = SidecarSession(now=0.0, udp_port=None)
    assert not session.go_away(30.0, "restart", 1.0)  # no hello yet
    assert "goaway" in hello(session, ["goaway"])["result"]["features"]
    assert session.go_away(30.0, "restart", 2.0)
    [line] = [json.loads(raw) for raw in session.data_to_send().splitlines()]
    assert line["method"] == "rm.goaway" and line["params"] == {"deadline": 30.0, "reason": "restart"}
    assert not session.closed  # the connection lives on until the proxy leaves

    old = SidecarSession(now=0.0, udp_port=None)
    hello(old, ["job-dedup"])
    assert not old.go_away(30.0, "restart", 2.0) and old.data_to_send() == b""


def test_the_proxy_core_offers_goaway_and_records_the_deadline() -> None:
    proxy = StratumRMConnection(agent="t")
    proxy.start(0.0)
    request = json.loads(proxy.data_to_send().splitlines()[0])
    assert "goaway" in request["params"]["features"]
    sidecar = SidecarSession(now=0.0, udp_port=None)
    sidecar.receive_data(json.dumps(request).encode() + b"\n", 0.0)
    proxy.receive_data(sidecar.data_to_send(), 0.5)
    assert proxy.ready and proxy.goaway is None
    sidecar.go_away(20.0, "restart", 1.0)
    proxy.receive_data(sidecar.data_to_send(), 10.0)
    assert proxy.goaway is not None and proxy.goaway.reason == "restart" and proxy.goaway_by == 30.0
    assert proxy.close_reason is None
