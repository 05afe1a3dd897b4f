"""Containment (issue 9.1): an exception while handling one connection, line or datagram ends
that one only, is logged once with the peer (repeats rate-limited) and counted.

The drivers are the real ones; the fault is a bug planted in a sans-IO core for one input
(``b"boom"``), standing for whatever input shape nobody thought of.
"""

from __future__ import annotations

import logging
import socket

import pytest
import trio

from bridge.config import parse_upstream_url
from bridge.net.containment import Containment
from bridge.net.miner_proxy import MinerProxy
from bridge.net.sidecar import SidecarServer
from bridge.relay.miner_channel import MinerChannel
from bridge.relay.sidecar.intake import SidecarIntake
from bridge.testing.pki import make_test_pki
from bridge.testing.pool import PoolConfig, ReferencePool
from bridge.web.server import WebServer, json_response

HOST = "127.0.0.1"
SUBSCRIBE = b'{"id":1,"method":"mining.subscribe","params":["cgminer/4.11.1"]}\n'


class PlantedBug(Exception):
    pass


# ----------------------------------------------------------------------------- the helper


def test_a_guard_contains_counts_and_logs_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    containment = Containment(logging.getLogger("test.containment"), "proxy", repeat_interval=60, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, "test.containment")
    for _ in range(100):
        with containment.guard(("10.0.0.9", 4444), "rig connection") as guard:
            raise PlantedBug("boom")
        assert isinstance(guard.error, PlantedBug)
    assert containment.errors == 100 and containment.statistics().by_kind == {"PlantedBug": 100}
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "rig connection 10.0.0.9:4444: internal error PlantedBug: boom" in message
    assert "only this rig connection was ended, the proxy carries on" in message
    now[0] = 61.0
    with containment.guard("[::1]:5", "rig connection"):
        raise PlantedBug("boom")
    assert len(caplog.records) == 2 and "(99 more like it in the last 60 s not logged)" in caplog.records[1].getMessage()


def test_cancellation_and_interrupts_are_never_contained() -> None:
    containment = Containment(logging.getLogger("test.containment"), "sidecar")
    with pytest.raises(KeyboardInterrupt), containment.guard("peer", "datagram"):
        raise KeyboardInterrupt
    with pytest.raises(BaseExceptionGroup) as caught:
        with containment.guard("peer", "datagram") as guard:
            raise BaseExceptionGroup("both", [KeyboardInterrupt(), RecursionError("deep")])
    assert [type(e) for e in caught.value.exceptions] == [KeyboardInterrupt]
    assert isinstance(guard.error, BaseExceptionGroup) and containment.by_kind == {"RecursionError": 1}


async def test_an_outer_cancellation_still_cancels_a_guarded_task() -> None:
    containment = Containment(logging.getLogger("test.containment"), "proxy")
    with trio.move_on_after(0.01) as scope:
        with containment.guard("peer", "rig connection"):
            await trio.sleep_forever()
    assert scope.cancelled_caught and containment.errors == 0


# ----------------------------------------------------------------------------- the drivers


def talk(port: int, data: bytes) -> bytes:
    """Send ``data``, end our side, and return what came back before the close."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the role closed first: also an answer
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:
            pass
    return received


def first_line(port: int, data: bytes) -> bytes:
    """Send ``data`` and return the first line that comes back."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(data)
        received = b""
        while b"\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"closed before a line: {received!r}"
            received += chunk
    return received.split(b"\n", 1)[0]


async def test_a_bug_on_one_rig_connection_ends_that_rig_only(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    original = MinerChannel.miner_data

    def miner_data(self: MinerChannel, data: bytes, now: float) -> None:
        if b"boom" in data:
            raise PlantedBug("planted in MinerChannel.miner_data")
        original(self, data, now)

    monkeypatch.setattr(MinerChannel, "miner_data", miner_data)
    async with trio.open_nursery() as nursery:
        pool = ReferencePool(PoolConfig(difficulty=0.0001))
        pool_port = await nursery.start(pool.serve, HOST, 0)
        proxy = MinerProxy(parse_upstream_url(f"stratum+tcp://{HOST}:{pool_port}"))
        proxy_port = await nursery.start(proxy.serve, HOST, 0)
        assert await trio.to_thread.run_sync(talk, proxy_port, b"boom\n") == b""
        answer = await trio.to_thread.run_sync(first_line, proxy_port, SUBSCRIBE)
        assert answer.startswith(b'{"id":1,"result":[')
        stats = proxy.statistics()
        assert stats.contained_errors == 1 and stats.closed_by_reason.get("internal error") == 1
        assert any("rig connection 127.0.0.1:" in r.getMessage() and "PlantedBug" in r.getMessage() for r in caplog.records)
        nursery.cancel_scope.cancel()


async def test_a_bug_on_one_pool_connection_ends_that_connection_only(monkeypatch: pytest.MonkeyPatch) -> None:
    async with trio.open_nursery() as nursery:
        pool = ReferencePool(PoolConfig(difficulty=0.0001))
        original = pool._receive

        def receive(connection, data: bytes) -> None:
            if b"boom" in data:
                raise PlantedBug("planted in ReferencePool._receive")
            original(connection, data)

        monkeypatch.setattr(pool, "_receive", receive)
        pool_port = await nursery.start(pool.serve, HOST, 0)
        assert await trio.to_thread.run_sync(talk, pool_port, b"boom\n") == b""
        assert (await trio.to_thread.run_sync(first_line, pool_port, SUBSCRIBE)).startswith(b'{"id":1,"result":[')
        assert pool.statistics().contained_errors == 1
        nursery.cancel_scope.cancel()


async def test_a_bug_on_one_datagram_drops_that_datagram_only(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = SidecarIntake.receive_datagram

    def receive_datagram(self: SidecarIntake, data: bytes, address, now: float):
        if data == b"boom":
            raise PlantedBug("planted in SidecarIntake.receive_datagram")
        return original(self, data, address, now)

    monkeypatch.setattr(SidecarIntake, "receive_datagram", receive_datagram)
    pki = make_test_pki(tmp_path)
    async with trio.open_nursery() as nursery:
        sidecar = SidecarServer(parse_upstream_url(f"stratum+tcp://{HOST}:1"), pki.server_context())
        await nursery.start(sidecar.serve, HOST, 0)
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for datagram in (b"boom", b"x" * 40, b"boom", b"y" * 40):
            await udp.sendto(datagram, (HOST, sidecar.udp_port))
        with trio.fail_after(30):
            while sidecar.statistics().datagrams_received < 2:
                await trio.sleep(0.01)
        stats = sidecar.statistics()
        assert stats.contained_errors == 2 and stats.datagrams_received == 2
        udp.close()
        nursery.cancel_scope.cancel()


def _status_server() -> WebServer:
    server = WebServer("proxy management")

    async def status(request):
        return json_response({"ok": True})

    server.route("/status", status)
    return server


async def test_a_bug_answering_one_status_request_ends_that_request_only(monkeypatch: pytest.MonkeyPatch) -> None:
    status = _status_server()
    original = status._serve_one
    calls = []

    async def serve_one(stream, pending):
        calls.append(1)
        if len(calls) == 1:
            raise PlantedBug("planted in WebServer._serve_one")
        return await original(stream, pending)

    monkeypatch.setattr(status, "_serve_one", serve_one)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(status.serve, HOST, 0)
        assert await trio.to_thread.run_sync(talk, port, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        second = await trio.to_thread.run_sync(talk, port, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert second.startswith(b"HTTP/1.1 200") and status.containment.errors == 1
        nursery.cancel_scope.cancel()


async def test_an_unreadable_request_target_is_a_400_not_an_error() -> None:
    status = _status_server()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(status.serve, HOST, 0)
        answer = await trio.to_thread.run_sync(talk, port, b"GET //[ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 4") and status.containment.errors == 0
        nursery.cancel_scope.cancel()


async def test_a_bug_on_the_proxys_stratumrm_session_ends_that_session_and_the_next_one_serves(
    tmp_path, monkeypatch: pytest.MonkeyPatch, autojump_clock
) -> None:
    # Virtual time (autojump): the link's reconnection delay costs no real time; the
    # capped rig lets that clock run while it hashes.
    from bridge.relay.rm_upstream import StratumRMConnection
    from bridge.testing.chain import start_chain
    from bridge.testing.miner import Miner

    armed = [False]
    original = StratumRMConnection.receive_data

    def receive_data(self: StratumRMConnection, data: bytes, now: float) -> None:
        if armed[0]:
            armed[0] = False
            raise PlantedBug("planted in StratumRMConnection.receive_data")
        original(self, data, now)

    monkeypatch.setattr(StratumRMConnection, "receive_data", receive_data)
    async with trio.open_nursery() as nursery:
        chain = await start_chain(nursery, tmp_path, accounts=("rig",), pool_config=PoolConfig(difficulty=2e-6))
        miner = Miner(chain.miner_url, "rig.one", hashrate=50_000, reconnect_delay=0.2)
        nursery.start_soon(miner.run)
        with trio.fail_after(60):
            while len(chain.pool.accepted) < 1:
                await trio.sleep(0.01)
            first = chain.proxy.link.connection
            armed[0] = True  # the sidecar's next line (a verdict, a job, a heartbeat) meets the bug
            while chain.proxy.link.connection is first or not chain.proxy.link.connection.ready:
                await trio.sleep(0.01)
            assert first.close_reason.startswith("internal error")
            accepted = len(chain.pool.accepted)
            while len(chain.pool.accepted) < accepted + 2:
                await trio.sleep(0.01)
        assert chain.proxy.statistics().contained_errors == 1
        miner.stop()
        nursery.cancel_scope.cancel()
