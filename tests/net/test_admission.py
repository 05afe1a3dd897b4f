"""Admission control: the sans-IO core, its trio driver, and the pool check under a flood."""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket

import pytest
import trio

from bridge.config import parse_upstream_url
from bridge.net import pool_watch as pool_watch_module
from bridge.net.admission import Admission, AdmissionLimits, Admitted, Refusal, Refused
from bridge.net.listen import (
    FdGauge,
    Pending,
    _count_open_fds,
    is_resource_shortage,
    raise_fd_limit,
    serve_admitted,
)
from bridge.net.miner_proxy import HANDSHAKE_CUT_SHORT, MinerProxy
from bridge.net.pool_watch import PoolWatch

LIMITS = AdmissionLimits(max_pending=4, max_pending_per_source=2, handshake_timeout=5.0, fd_reserve=10, log_interval=10.0)


def admit(admission: Admission, source: str, now: float = 0.0, free: int | None = 1000) -> Admitted:
    decision = admission.offer(source, now, free)
    assert isinstance(decision, Admitted), decision
    return decision


def refuse(admission: Admission, source: str, now: float = 0.0, free: int | None = 1000) -> Refused:
    decision = admission.offer(source, now, free)
    assert isinstance(decision, Refused), decision
    return decision


# ------------------------------------------------------------------ the sans-IO core


def test_pending_connections_are_capped_per_source_and_the_handshake_frees_the_slot() -> None:
    admission = Admission("test port", LIMITS)
    first, second = admit(admission, "10.0.0.1"), admit(admission, "10.0.0.1")
    assert first.ticket.deadline == 5.0 and admission.pending_from("10.0.0.1") == 2
    assert refuse(admission, "10.0.0.1").reason is Refusal.SOURCE_CAP
    admission.established(first.ticket)
    admit(admission, "10.0.0.1")
    stats = admission.statistics()
    assert stats.pending == 2 and stats.established == 1 and stats.completed == 1
    assert stats.refused == {"source over its pending cap": 1}
    admission.release(first.ticket)
    admission.release(first.ticket)  # idempotent
    admission.release(second.ticket)
    stats = admission.statistics()
    assert stats.pending == 1 and stats.established == 0 and stats.abandoned == 1


def test_a_full_port_evicts_the_heaviest_sources_oldest_connection_for_a_newcomer() -> None:
    admission = Admission("test port", AdmissionLimits(max_pending=4, max_pending_per_source=4))
    flood = [admit(admission, "198.51.100.1", now=float(n)).ticket for n in range(3)]
    admit(admission, "198.51.100.2")
    newcomer = admit(admission, "192.0.2.10", now=9.0)
    assert newcomer.evict is flood[0] and not flood[0].pending
    assert newcomer.log is not None and "198.51.100.1" in newcomer.log
    # The flood's own source cannot evict itself, and a tie does not evict either.
    assert refuse(admission, "198.51.100.1").reason is Refusal.PENDING_CAP
    assert refuse(admission, "192.0.2.10").reason is Refusal.PENDING_CAP
    admission.release(flood[0])  # the evicted connection's driver closes it: counted once
    stats = admission.statistics()
    assert stats.pending == 4 and stats.abandoned == 1
    assert stats.refused == {"pending cap reached": 2, "evicted for a newcomer": 1}


def test_below_the_fd_reserve_only_an_eviction_makes_room() -> None:
    admission = Admission("test port", LIMITS)
    refused = refuse(admission, "10.0.0.1", free=9)
    assert refused.reason is Refusal.FDS_LOW and refused.log is not None and "reserve of 10" in refused.log
    flood = [admit(admission, "10.0.0.1", free=10).ticket for _ in range(2)]
    admit(admission, "10.0.0.2", free=None)  # unknown: no reserve check
    assert refuse(admission, "10.0.0.2", free=9).reason is Refusal.FDS_LOW  # 1 vs 2: no eviction
    newcomer = admit(admission, "10.0.0.3", free=9)
    assert newcomer.evict is flood[0]


def test_refusals_are_logged_once_per_interval_with_the_number_left_out() -> None:
    admission = Admission("test port", LIMITS)
    admit(admission, "10.0.0.1")
    admit(admission, "10.0.0.1")
    logs = [refuse(admission, "10.0.0.1", now=t).log for t in (0.0, 1.0, 2.0, 9.0, 10.5)]
    assert logs[0] is not None and "test port" in logs[0] and "10.0.0.1" in logs[0]
    assert logs[1:4] == [None, None, None]
    assert logs[4] is not None and "3 more like it" in logs[4]
    assert admission.statistics().refused == {"source over its pending cap": 5}


def test_a_timed_out_handshake_is_counted_and_frees_its_slot() -> None:
    admission = Admission("test port", LIMITS)
    ticket = admit(admission, "10.0.0.1").ticket
    assert admission.timed_out(ticket, 5.0) is not None
    assert admission.timed_out(ticket, 5.0) is None  # once
    admission.release(ticket)
    stats = admission.statistics()
    assert stats.pending == 0 and stats.abandoned == 1 and stats.refused == {"handshake timeout": 1}


def test_rebinding_moves_a_pending_connection_to_its_real_source() -> None:
    admission = Admission("test port", LIMITS)
    behind_lb = [admit(admission, "10.0.0.254").ticket for _ in range(2)]
    assert admission.rebind(behind_lb[0], "203.0.113.1", 0.0) is None
    assert admission.pending_from("10.0.0.254") == 1 and admission.pending_from("203.0.113.1") == 1
    admit(admission, "203.0.113.1")
    refused = admission.rebind(behind_lb[1], "203.0.113.1", 0.0)
    assert refused is not None and refused.reason is Refusal.SOURCE_CAP
    assert admission.pending == 2 and not behind_lb[1].pending
    admission.release(behind_lb[1])
    assert admission.statistics().abandoned == 1


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        AdmissionLimits(max_pending=0)
    with pytest.raises(ValueError):
        AdmissionLimits(handshake_timeout=0)
    with pytest.raises(ValueError):
        AdmissionLimits(fd_reserve=-1)


def test_resource_errors_are_told_apart_from_network_errors() -> None:
    assert is_resource_shortage(OSError(errno.EMFILE, "Too many open files"))
    wrapped = OSError("connecting failed")
    wrapped.__cause__ = OSError(errno.ENOBUFS, "No buffer space available")
    assert is_resource_shortage(wrapped)
    assert not is_resource_shortage(OSError(errno.ECONNREFUSED, "Connection refused"))
    assert not is_resource_shortage(None)


def test_the_fd_gauge_counts_between_samples() -> None:
    counts = iter([100, 50])
    gauge = FdGauge(sample_interval=1.0, count=lambda: next(counts))
    soft = raise_fd_limit()[0]
    assert gauge.free(0.0) == soft - 100
    gauge.opened()
    gauge.opened()
    gauge.closed()
    assert gauge.free(0.5) == soft - 101
    assert gauge.free(1.0) == soft - 50  # a new sample forgets the deltas


def test_the_open_descriptor_count_follows_the_descriptors_opened() -> None:
    before = _count_open_fds()
    assert before is not None
    files = [open(os.devnull, "rb") for _ in range(50)]
    try:
        assert _count_open_fds() == before + 50
    finally:
        for file in files:
            file.close()
    assert _count_open_fds() == before


# ------------------------------------------------------------------ the trio driver


async def connect_from(source: str, port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return sock


async def closed_by_peer(sock: trio.socket.SocketType, timeout: float = 30.0) -> bool:
    """True once the peer closed (EOF or reset); waits up to ``timeout``."""
    with trio.move_on_after(timeout):
        try:
            return await sock.recv(1) == b""
        except OSError:
            return True
    return False


async def test_the_driver_refuses_over_the_cap_and_serves_an_honest_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.admission")
    admission = Admission("test port", AdmissionLimits(max_pending=6, max_pending_per_source=3, handshake_timeout=60.0))

    async def handler(stream: trio.SocketStream, pending: Pending) -> None:
        line = await stream.receive_some(100)  # the "handshake": one message
        pending.established()
        await stream.send_all(b"hello " + line)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(serve_admitted, handler, listeners, admission)
        port = listeners[0].socket.getsockname()[1]
        flood = [await connect_from("127.0.0.2", port) for _ in range(3)]
        with trio.fail_after(30):
            while admission.pending < 3:
                await trio.sleep(0.01)
        over = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await over.bind(("127.0.0.2", 0))
        try:
            await over.connect(("127.0.0.1", port))
        except ConnectionResetError:
            pass  # the reset came before connect() returned
        else:
            assert await closed_by_peer(over)
        honest = await connect_from("127.0.0.1", port)
        await honest.send(b"rig")
        with trio.fail_after(30):
            assert await honest.recv(100) == b"hello rig"
        stats = admission.statistics()
        assert stats.pending == 3 and stats.established == 1 and stats.refused == {"source over its pending cap": 1}
        assert sum("127.0.0.2" in r.getMessage() and "pending cap" in r.getMessage() for r in caplog.records) == 1
        for sock in (*flood, over, honest):
            sock.close()
        nursery.cancel_scope.cancel()


async def test_the_driver_ends_connections_at_their_handshake_deadline() -> None:
    admission = Admission("test port", AdmissionLimits(handshake_timeout=0.2, log_interval=3600.0))

    async def handler(stream: trio.SocketStream, pending: Pending) -> None:
        await stream.receive_some(100)
        pending.established()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(serve_admitted, handler, listeners, admission)
        port = listeners[0].socket.getsockname()[1]
        silent = [await connect_from("127.0.0.3", port) for _ in range(5)]
        for sock in silent:
            assert await closed_by_peer(sock)
        with trio.fail_after(30):
            while admission.pending:
                await trio.sleep(0.01)
        assert admission.statistics().refused == {"handshake timeout": 5}
        for sock in silent:
            sock.close()
        nursery.cancel_scope.cancel()


class CountingGauge(FdGauge):
    """Counts the driver's opened() and closed() exactly (no /proc sampling)."""

    def __init__(self) -> None:
        super().__init__(count=lambda: None)
        self.open = 0

    def opened(self) -> None:
        self.open += 1

    def closed(self) -> None:
        self.open -= 1


def owning_handler(outcomes: list[str], tasks: list[trio.lowlevel.Task]):
    """A handler that owns its connection: one message is its handshake, then it echoes
    until the client closes; it releases twice (the second is a no-op)."""

    async def handler(stream: trio.SocketStream, pending: Pending) -> None:
        line = b""
        try:
            with pending.handshake():
                line = await stream.receive_some(100)
                if line:
                    pending.established()
            if pending.cut_short:
                outcomes.append("cut short")
                return
            if not line:
                outcomes.append("closed in its handshake")
                return
            tasks.append(trio.lowlevel.current_task())
            await stream.send_all(b"hello " + line)
            while await stream.receive_some(100):
                pass
            outcomes.append("closed")
            await pending.release(stream)
        finally:
            await pending.release(stream)

    return handler


async def test_a_handler_that_owns_its_connection_keeps_no_scope_and_admission_stays_exact() -> None:
    """``handler_owns_connection``: the handler is the connection's task (no wrapper), holds the
    handshake's cancel scope only in ``pending.handshake()``, an eviction ends that block (not
    the handler), and every connection is counted out of admission exactly once."""
    admission = Admission("test port", AdmissionLimits(max_pending=2, max_pending_per_source=2, handshake_timeout=60.0))
    gauge = CountingGauge()
    outcomes: list[str] = []
    tasks: list[trio.lowlevel.Task] = []
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(
            functools.partial(serve_admitted, gauge=gauge, handler_owns_connection=True),
            owning_handler(outcomes, tasks),
            listeners,
            admission,
        )
        port = listeners[0].socket.getsockname()[1]
        flood = [await connect_from("127.0.0.2", port) for _ in range(2)]
        with trio.fail_after(30):
            while admission.pending < 2:
                await trio.sleep(0.01)
        honest = await connect_from("127.0.0.1", port)  # the cap is reached: the oldest flood connection is evicted
        assert await closed_by_peer(flood[0])
        await honest.send(b"rig")
        with trio.fail_after(30):
            assert await honest.recv(100) == b"hello rig"
        assert outcomes == ["cut short"]
        [task] = tasks
        assert task.name.endswith("owning_handler.<locals>.handler")  # no wrapper task or coroutine
        assert task._cancel_status is task.parent_nursery._cancel_status  # no scope of its own past its handshake
        stats = admission.statistics()
        assert (stats.pending, stats.established, stats.refused) == (1, 1, {"evicted for a newcomer": 1})
        for sock in (*flood, honest):
            sock.close()
        with trio.fail_after(30):
            while admission.pending or admission.statistics().established or gauge.open:
                await trio.sleep(0.01)
        assert sorted(outcomes) == ["closed", "closed in its handshake", "cut short"]
        stats = admission.statistics()
        assert (stats.admitted, stats.completed, stats.abandoned) == (3, 1, 2)
        assert gauge.open == 0
        nursery.cancel_scope.cancel()


async def test_a_handler_that_owns_its_connection_is_cut_short_at_its_handshake_deadline() -> None:
    admission = Admission("test port", AdmissionLimits(handshake_timeout=0.2, log_interval=3600.0))
    gauge = CountingGauge()
    outcomes: list[str] = []
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(
            functools.partial(serve_admitted, gauge=gauge, handler_owns_connection=True),
            owning_handler(outcomes, []),
            listeners,
            admission,
        )
        port = listeners[0].socket.getsockname()[1]
        silent = [await connect_from("127.0.0.3", port) for _ in range(3)]
        for sock in silent:
            assert await closed_by_peer(sock)
        with trio.fail_after(30):
            while gauge.open:
                await trio.sleep(0.01)
        assert outcomes == ["cut short"] * 3
        stats = admission.statistics()
        assert (stats.pending, stats.established, stats.refused) == (0, 0, {"handshake timeout": 3})
        for sock in silent:
            sock.close()
        nursery.cancel_scope.cancel()


async def test_a_rig_evicted_before_its_first_request_is_closed_with_that_reason() -> None:
    """The proxy's rig task owns its connection: an eviction ends its handshake, not the
    task, which closes the rig with the reason and counts it out of admission."""
    upstream = parse_upstream_url(f"stratum+tcp://127.0.0.1:{closed_port()}")  # never reached: no rig asks
    proxy = MinerProxy(upstream, admission=AdmissionLimits(max_pending=2, max_pending_per_source=2))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve, "127.0.0.1", 0)
        flood = [await connect_from("127.0.0.2", port) for _ in range(2)]
        with trio.fail_after(30):
            while proxy.admission.pending < 2:
                await trio.sleep(0.01)
        honest = await connect_from("127.0.0.1", port)
        assert await closed_by_peer(flood[0])
        with trio.fail_after(30):
            while proxy.statistics().connections_active > 2:
                await trio.sleep(0.01)
        assert proxy.statistics().closed_by_reason == {HANDSHAKE_CUT_SHORT: 1}
        for sock in (*flood, honest):
            sock.close()
        with trio.fail_after(30):
            while proxy.statistics().connections_active:
                await trio.sleep(0.01)
        stats = proxy.statistics()
        assert stats.closed_by_reason == {HANDSHAKE_CUT_SHORT: 1, "rig closed the connection": 2}
        assert stats.admission is not None
        assert (stats.admission.pending, stats.admission.established, stats.admission.abandoned) == (0, 0, 3)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ the pool check


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_pool_check_that_fails_for_lack_of_local_resources_is_not_an_outage(
    monkeypatch: pytest.MonkeyPatch, autojump_clock
) -> None:
    # Virtual time (autojump): the checks' retry intervals cost no real time.
    pool = parse_upstream_url(f"stratum+tcp://127.0.0.1:{closed_port()}")
    changes: list[bool] = []
    shortage: list[str] = ["only 3 file descriptors free, below the reserve of 128"]
    watch = PoolWatch(pool, None, lambda up, _reason: changes.append(up), local_shortage=lambda: shortage[0] or None)
    ok, reason = await watch.check()
    assert ok is None and "3 file descriptors" in reason  # refused, but this host is short: cannot tell

    async def no_descriptors(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    shortage[0] = ""
    real_open_stream = pool_watch_module.open_stream
    monkeypatch.setattr(pool_watch_module, "open_stream", no_descriptors)
    assert (await watch.check())[0] is None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        watch.suspect("a pool connection failed: Too many open files")
        with trio.fail_after(30):
            while watch.inconclusive < 4:
                await trio.sleep(0.05)
        assert watch.up and changes == []  # never rm.pool down
        monkeypatch.setattr(pool_watch_module, "open_stream", real_open_stream)
        with trio.fail_after(60):  # now the check can tell: the port is closed, the pool is down
            while watch.up:
                await trio.sleep(0.05)
        assert changes == [False]
        nursery.cancel_scope.cancel()
