"""Every sans-IO core with a driver follows the one contract of bridge/relay/contract.py.

mypy checks the signatures (the conformance block at the bottom of the contract
module); this checks that the cores the drivers build carry the contract's methods.
"""

from __future__ import annotations

import pytest

from bridge.relay.contract import ConnectionCore, DatagramCore, EventCore, TimerCore
from bridge.relay.health import HealthWatch, SubscribeCheck
from bridge.relay.proxy import ProxyCore, ProxyUpstream
from bridge.relay.rm_upstream import StratumRMConnection
from bridge.relay.sidecar.intake import SidecarIntake
from bridge.relay.sidecar.session import SidecarSession


@pytest.mark.parametrize(
    "core",
    [StratumRMConnection(), SidecarSession(now=0.0)],
    ids=["proxy side of StratumRM", "sidecar side of StratumRM"],
)
def test_the_stratumrm_cores_are_datagram_connection_cores(core: object) -> None:
    assert isinstance(core, DatagramCore) and isinstance(core, ConnectionCore) and isinstance(core, TimerCore)


@pytest.mark.parametrize(
    "core",
    [HealthWatch(0.0), SubscribeCheck("pool:3333", "agent", 0.0), SidecarIntake()],
    ids=["health watch", "subscribe check", "sidecar intake"],
)
def test_the_cores_with_deadlines_are_timer_cores(core: object) -> None:
    assert isinstance(core, TimerCore)


def test_the_proxy_core_is_an_event_core() -> None:
    assert isinstance(ProxyCore([ProxyUpstream("u0", "stratum+tcp://pool:3333")]), EventCore)


def test_closing_the_proxy_side_keeps_the_first_reason_and_ends_every_channel() -> None:
    conn = StratumRMConnection()
    channel = conn.open_channel()
    conn.close("the proxy stops", 1.0)
    conn.close("a later reason", 1.0)
    assert conn.close_reason == "the proxy stops"
    conn.connection_lost("control connection error", 1.5)
    assert conn.close_reason == "the proxy stops" and channel.closed and not conn.channels
