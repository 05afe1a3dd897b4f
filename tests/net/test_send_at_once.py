"""A lone share never waits for a trip through trio's scheduler in the drivers.

On loopback every such trip was measurable share latency (issue 11 item 3): the
proxy's writer task, the sidecar's pool task and the sidecar's pump each added one
wake-up. Now what the cores queue goes out from the task that fed them, as far as
the kernel takes it without waiting. Each test checks the bytes are out *before*
the calling task reaches a checkpoint: no other task ran.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import trio
import trio.testing

from bridge.config import parse_upstream_url
from bridge.net.rm_upstream import StratumRMLink
from bridge.net.sidecar import _PoolLink, _ProxyConnection
from bridge.net.timer import CoreTimer
from bridge.relay.sidecar.intake import OutgoingDatagram


class _Sender:
    """Stands in for :class:`~bridge.net.udp.DatagramSender`: records what was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def send(self, data: bytes, address: Any = None) -> bool:
        self.sent.append((data, address))
        return True


class _Outputs:
    """A core's queued outputs, taken once each (the contract's datagrams_to_send and data_to_send)."""

    def __init__(self, datagrams: list[Any], control: bytes) -> None:
        self.datagrams = datagrams
        self.control = control

    def datagrams_to_send(self, now: float | None = None) -> list[Any]:
        out, self.datagrams = self.datagrams, []
        return out

    def data_to_send(self) -> bytes:
        out, self.control = self.control, b""
        return out


class _ProxySideCore(_Outputs):
    """What the link's kick asks of a StratumRMConnection."""

    close_reason = None

    def get_timer(self) -> float | None:
        return None


async def test_the_proxy_sends_a_share_datagram_from_the_task_that_queued_it() -> None:
    link = StratumRMLink(parse_upstream_url("stratumrm://127.0.0.1:3334"), ssl.create_default_context())
    sender = _Sender()
    link.connection = _ProxySideCore([b"share datagram"], b'{"method": "rm.ping"}\n')  # type: ignore[assignment]
    link._udp_sender = sender  # type: ignore[assignment]
    link.kick()
    assert sender.sent == [(b"share datagram", None)]  # no checkpoint since: no writer task ran
    # Control bytes still go through the writer, the only task that writes the TLS stream.
    assert bytes(link._control) == b'{"method": "rm.ping"}\n'
    assert link._kick.is_set()


async def test_shares_with_company_wait_for_the_writer_and_leave_together() -> None:
    link = StratumRMLink(parse_upstream_url("stratumrm://127.0.0.1:3334"), ssl.create_default_context())
    sender = _Sender()
    core = _ProxySideCore([b"first share"], b"")
    link.connection = core  # type: ignore[assignment]
    link._udp_sender = sender  # type: ignore[assignment]
    link.kick()
    core.datagrams = [b"another rig's share, same scheduler batch"]
    link.kick()
    assert sender.sent == [(b"first share", None)]  # the second waits for the writer (one SHARE_BATCH with any others)
    assert link._kick.is_set()


async def test_the_proxy_sends_nothing_more_for_a_connection_that_is_over() -> None:
    link = StratumRMLink(parse_upstream_url("stratumrm://127.0.0.1:3334"), ssl.create_default_context())
    sender = _Sender()
    core = _ProxySideCore([b"late copy"], b"")
    core.close_reason = "sidecar silent"  # type: ignore[assignment]
    link.connection = core  # type: ignore[assignment]
    link._udp_sender = sender  # type: ignore[assignment]
    link.kick()
    assert sender.sent == []


def _pool_link(stream: trio.abc.Stream) -> _PoolLink:
    link = _PoolLink(1, "127.0.0.1:4000")
    link.stream = stream
    link.reading = True  # its task waits for the pool's bytes
    link.scope = trio.CancelScope()
    return link


async def test_the_sidecar_writes_a_share_to_an_idle_pool_connection_at_once() -> None:
    ours, pools = socket.socketpair()
    with ours, pools:
        link = _pool_link(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        assert link.write(b'{"id": 5, "method": "mining.submit"}\n')
        pools.setblocking(False)
        assert pools.recv(1000) == b'{"id": 5, "method": "mining.submit"}\n'  # no checkpoint since
        assert not link.buffer
        assert link.scope is not None and not link.scope.cancel_called  # the task was not woken


async def test_bytes_already_queued_for_the_pool_keep_their_order() -> None:
    ours, pools = socket.socketpair()
    with ours, pools:
        link = _pool_link(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        link.buffer += b"first\n"  # queued, the task not yet run
        assert link.write(b"second\n")
        assert bytes(link.buffer) == b"first\nsecond\n"
        assert link.scope is not None and link.scope.cancel_called  # the task sends both, in order
        pools.setblocking(False)
        try:
            early = pools.recv(1000)
        except BlockingIOError:
            early = b""
        assert early == b""


async def test_a_pool_connection_that_is_not_plain_tcp_is_written_by_its_task() -> None:
    ours, _pools = trio.testing.memory_stream_pair()
    link = _pool_link(ours)
    assert link.write(b"submit\n")
    assert bytes(link.buffer) == b"submit\n"
    assert link.scope is not None and link.scope.cancel_called


class _SidecarSideCore(_Outputs):
    """What the sidecar driver's step asks of a SidecarSession after an input."""

    closed = False
    hello = None

    def commands(self) -> list[Any]:
        return []

    def refusals(self) -> list[Any]:
        return []

    def get_timer(self) -> float | None:
        return trio.current_time() + 60

    def datagrams_pending(self) -> bool:
        return bool(self.datagrams)


class _Server:
    _drain_by = None

    def __init__(self) -> None:
        self._udp_sender = _Sender()


def _proxy_connection(session: _SidecarSideCore) -> tuple[_ProxyConnection, _Server]:
    connection = _ProxyConnection.__new__(_ProxyConnection)
    server = _Server()
    connection.server = server  # type: ignore[assignment]
    connection.session = session  # type: ignore[assignment]
    connection.peer = "127.0.0.1:5000"
    connection.goaway_sent = False
    connection._links = {}
    connection._control = bytearray()
    connection._sent_at_once = False
    connection.timer = CoreTimer(session)
    return connection, server


async def test_the_sidecar_sends_a_verdict_datagram_in_the_input_that_produced_it() -> None:
    verdict = OutgoingDatagram(b"verdict datagram", ("127.0.0.1", 40000))
    connection, server = _proxy_connection(_SidecarSideCore([verdict], b""))
    connection.step()
    assert server._udp_sender.sent == [(b"verdict datagram", ("127.0.0.1", 40000))]  # no pump ran


async def test_verdicts_of_later_inputs_in_the_same_wake_up_wait_for_the_pump_and_go_together() -> None:
    first = OutgoingDatagram(b"first verdict", ("127.0.0.1", 40000))
    session = _SidecarSideCore([first], b"")
    connection, server = _proxy_connection(session)
    connection.step()  # the first input of the wake-up: at once
    session.datagrams = [OutgoingDatagram(b"second verdict", ("127.0.0.1", 40000))]
    connection.step()  # another pool connection's answer in the same scheduler round: held
    assert server._udp_sender.sent == [(b"first verdict", ("127.0.0.1", 40000))]
    assert connection.timer._wake.is_set()  # the pump runs next and sends it
    connection._sent_at_once = False  # what the pump does before it sends (its own wake-up)
    connection.step()
    assert [data for data, _ in server._udp_sender.sent] == [b"first verdict", b"second verdict"]


async def test_the_sidecar_hands_control_lines_to_its_pump() -> None:
    connection, server = _proxy_connection(_SidecarSideCore([], b'{"method": "rm.pong"}\n'))
    connection.step()
    assert bytes(connection._control) == b'{"method": "rm.pong"}\n'
    assert server._udp_sender.sent == []
