"""The reference pool over TCP or TLS: a thin trio driver around :class:`~bridge.testing.pool_core.PoolCore`.

What the pool does (jobs, share validation, ckpool's method matching and silences,
verdicts) is the sans-IO core's, described in :mod:`bridge.testing.pool_core`. This
module listens, reads each connection into the core, writes what the core queued,
runs the notify and block timers, and adds the failure modes that need sockets.

**Failure modes** for tests, callable from any trio task (or before
:meth:`ReferencePool.serve`): :meth:`~ReferencePool.reject_next` and
:meth:`~ReferencePool.reject_all` answer submits with a chosen code without
checking them; :meth:`~ReferencePool.stall` turns the pool into a blackhole
(sockets stay open, nothing is read, answered or sent);
:meth:`~ReferencePool.drop_connections` closes every miner connection, with a
TCP reset if asked; :meth:`~ReferencePool.kill` resets every connection and
stops listening (a crashed pool; :meth:`~ReferencePool.serve` again restores
it); :meth:`~ReferencePool.stop_jobs` stops every ``mining.notify``;
:meth:`~ReferencePool.new_block` moves the chain on (to a given prevhash, so
several pools can share one chain and one can be left lagging);
:meth:`~ReferencePool.request_reconnect` sends ``client.reconnect``.

A miner that does not take our data for ``write_timeout`` seconds is
disconnected; a TLS handshake gets ``TLS_HANDSHAKE_TIMEOUT`` seconds.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import trio

from bridge.net.containment import Containment
from bridge.net.tcp import close_quietly
from bridge.sv1.rejects import LOW_DIFFICULTY
from bridge.sv1.server import ServerSession
from bridge.testing.pool_core import (
    STANDARD_MESSAGES,
    ConnectionState,
    PoolConfig,
    PoolCore,
    PoolStatistics,
    RejectRecord,
    ShareRecord,
)

__all__ = [
    "STANDARD_MESSAGES",
    "PoolConfig",
    "PoolConnection",
    "PoolStatistics",
    "ReferencePool",
    "RejectRecord",
    "ShareRecord",
]

log = logging.getLogger("bridge.testing.pool")

RECEIVE_SIZE = 65536
TLS_HANDSHAKE_TIMEOUT = 10.0
_LINGER_RESET = struct.pack("ii", 1, 0)


class _TaskStatus(Protocol):
    """What ``nursery.start`` hands a task (trio 0.22 does not export the type)."""

    def started(self, value: Any = None) -> None: ...


class PoolConnection:
    """One miner connection of the driver: the core's :class:`ConnectionState` and its socket."""

    def __init__(self, state: ConnectionState, socket_stream: trio.SocketStream | None) -> None:
        self.state = state
        self.socket_stream = socket_stream
        self.cancel_scope = trio.CancelScope()
        self._output_ready = trio.Event()

    @property
    def peer(self) -> str:
        return self.state.peer

    @property
    def session(self) -> ServerSession:
        return self.state.session

    @property
    def workers(self) -> set[str]:
        return self.state.workers

    @property
    def extranonce1(self) -> bytes | None:
        return self.state.extranonce1

    @property
    def difficulty(self) -> float:
        return self.state.difficulty

    def wake(self) -> None:
        """Tell the writer task there is output."""
        self._output_ready.set()

    async def wait_for_output(self) -> None:
        await self._output_ready.wait()
        self._output_ready = trio.Event()

    def abort(self, *, reset: bool) -> None:
        """Close the connection from outside; with ``reset`` the peer sees a TCP RST."""
        if reset and self.socket_stream is not None:
            with contextlib.suppress(OSError):  # already closed by the peer
                self.socket_stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.cancel_scope.cancel()

    def __repr__(self) -> str:
        return f"<PoolConnection {self.state!r}>"


class ReferencePool:
    """A Stratum V1 pool with real jobs and real share validation (see :mod:`bridge.testing.pool_core`).

    ``clock`` gives the wall-clock time in seconds (job ntime, session expiry,
    vardiff); tests pass their own. The notify and block intervals run on trio's
    clock. Serve it with :meth:`serve`. The controls (:meth:`stall`,
    :meth:`drop_connections` ...) are plain methods that act at once; call them from
    any task of the trio run serving the pool (from another thread, through
    ``trio.from_thread.run_sync``). ``core`` replaces the sans-IO core (a benchmark's
    pool that notes when shares arrive); its config is the pool's.
    """

    def __init__(
        self,
        config: PoolConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        core: PoolCore | None = None,
    ) -> None:
        if core is None:
            core = PoolCore(config)
        elif config is not None and config != core.config:
            raise ValueError("pass the config to the core, not to both")
        self.core = core
        self.config = core.config
        self.clock = clock
        self.port: int | None = None
        self._connections: dict[ConnectionState, PoolConnection] = {}
        self._unstalled = trio.Event()
        self._unstalled.set()
        self._accepted_seen = 0
        self._share_accepted = trio.Event()
        self._serve_scopes: set[trio.CancelScope] = set()
        self.containment = Containment(log, "pool")

    # ------------------------------------------------------------- public state

    @property
    def connections(self) -> frozenset[PoolConnection]:
        """The open miner connections."""
        return frozenset(self._connections.values())

    @property
    def difficulty(self) -> float:
        """The difficulty new connections start at."""
        return self.core.difficulty

    @property
    def height(self) -> int:
        """Height of the block being worked on."""
        return self.core.height

    @property
    def prevhash(self) -> str:
        """The previous-block hash (``mining.notify`` form) of the block being worked on."""
        return self.core.prevhash

    @property
    def accepted(self) -> deque[ShareRecord]:
        return self.core.accepted

    @property
    def rejected(self) -> deque[RejectRecord]:
        return self.core.rejected

    @property
    def blocks(self) -> deque[ShareRecord]:
        return self.core.blocks

    @property
    def accepted_by_worker(self) -> dict[str, list[ShareRecord]]:
        """The kept accepted shares, grouped by worker name."""
        return self.core.accepted_by_worker

    def statistics(self) -> PoolStatistics:
        return self.core.statistics(contained_errors=self.containment.errors)

    async def wait_for_accepted(self, count: int) -> None:
        """Return once at least ``count`` shares have been accepted in total."""
        while self.core.accepted_total < count:
            await self._share_accepted.wait()

    # ------------------------------------------------------------- controls

    def reject_next(self, count: int, code: int = LOW_DIFFICULTY) -> None:
        """Answer the next ``count`` submits with ``code`` without checking them."""
        self.core.reject_next(count, code)

    def reject_all(self, code: int | None) -> None:
        """Answer every submit with ``code`` (None returns to real validation)."""
        self.core.reject_all(code)

    def stall(self, stalled: bool = True) -> None:
        """Blackhole (or restore) the pool: keep sockets open, read, answer and send nothing.

        When the stall ends, answers to what was read come out and every
        connection gets a fresh job.
        """
        if stalled == self.core.stalled:
            return
        self.core.stall(stalled, self.clock())
        if stalled:
            self._unstalled = trio.Event()
        else:
            self._unstalled.set()
        self.flush()

    def stop_jobs(self, stopped: bool = True) -> None:
        """Stop (or restart) every ``mining.notify``: timer, new blocks, handshakes, vardiff.

        Restarting sends a fresh job to every subscribed connection at once
        (``clean_jobs=true`` where the block changed since its last job).
        """
        self.core.stop_jobs(stopped, self.clock())
        self.flush()

    def drop_connections(self, *, rst: bool = True) -> int:
        """Close every miner connection (with a TCP reset when ``rst``); return how many."""
        connections = list(self._connections.values())
        for connection in connections:
            connection.abort(reset=rst)
        log.info("dropping %d connections%s", len(connections), " with RST" if rst else "")
        return len(connections)

    def kill(self) -> int:
        """Die like a crashed pool process: every connection reset, the listening sockets closed.

        New connections are refused until :meth:`serve` runs again (on the same
        port, to restore the pool; jobs, shares and sessions are kept). Returns how
        many connections were reset.
        """
        count = self.drop_connections(rst=True)
        for scope in list(self._serve_scopes):
            scope.cancel()
        log.info("killed: %d connections reset, not listening", count)
        return count

    def new_block(self, prevhash: str | None = None) -> None:
        """Move to the next block and send its first job (clean) to every connection.

        ``prevhash`` (``mining.notify`` form) puts pools on one chain: give two
        pools the same value and they announce the same block, as real pools on
        one network do; a pool that is not told lags.
        """
        self.core.new_block(self.clock(), prevhash)
        self.flush()

    def set_difficulty(self, difficulty: float) -> None:
        """Set the difficulty of every connection, and of those still to come.

        Not clamped. Each subscribed connection gets ``mining.set_difficulty``
        and a new job at once (when jobs are flowing; otherwise with its next job).
        """
        self.core.set_difficulty(difficulty, self.clock())
        self.flush()

    def request_reconnect(self, params: list[Any] | None = None) -> None:
        """Send ``client.reconnect`` (``[]`` by default: "this server") to every connection."""
        self.core.request_reconnect(params)
        self.flush()

    def flush(self) -> None:
        """After a call into the core: wake the writers it gave output, and the share waiters."""
        for state in self.core.ready():
            connection = self._connections.get(state)
            if connection is not None:
                connection.wake()
        if self.core.accepted_total != self._accepted_seen:
            self._accepted_seen = self.core.accepted_total
            self._share_accepted.set()
            self._share_accepted = trio.Event()

    # ------------------------------------------------------------- serving

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: _TaskStatus = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0: an ephemeral port) until cancelled.

        Reports the bound port through ``task_status``. With ``ssl_context`` (a
        server context) every connection is TLS: ``stratum+ssl``. One pool may
        serve several listeners (say plain and TLS) at once; they share jobs,
        shares and timers.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        if port == 0 and len(listeners) > 1:
            # several addresses would each get a different ephemeral port; keep one
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        bound_port = listeners[0].socket.getsockname()[1]
        self.port = bound_port
        log.info(
            "listening on %s:%d%s (difficulty %s, extranonce2_size %d)",
            host,
            bound_port,
            " with TLS" if ssl_context is not None else "",
            self.core.difficulty,
            self.config.extranonce2_size,
        )
        handler = self.containment.connections(
            functools.partial(self._serve_connection, ssl_context=ssl_context), "miner connection"
        )
        with trio.CancelScope() as scope:
            self._serve_scopes.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    self.core.start_timers(trio.current_time())
                    nursery.start_soon(self._timer)
                    await nursery.start(trio.serve_listeners, handler, listeners)
                    task_status.started(bound_port)
            finally:
                self._serve_scopes.discard(scope)

    async def _timer(self) -> None:
        """Sleep until the core's timer is due, then let it act (one per serve(); they agree)."""
        while True:
            deadline = self.core.get_timer()
            assert deadline is not None  # serve() started the timers
            await trio.sleep_until(deadline)
            self.core.handle_timer(trio.current_time(), self.clock())
            self.flush()

    async def _serve_connection(self, socket_stream: trio.SocketStream, *, ssl_context: ssl.SSLContext | None) -> None:
        try:
            socket_stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer_address = socket_stream.socket.getpeername()
        except OSError:  # the peer is already gone
            await trio.aclose_forcefully(socket_stream)
            return
        peer = f"{peer_address[0]}:{peer_address[1]}"
        stream: trio.abc.Stream = socket_stream
        if ssl_context is not None:
            stream = trio.SSLStream(socket_stream, ssl_context, server_side=True)
        connection = PoolConnection(self.core.connection_made(peer, self.clock()), socket_stream)
        self._connections[connection.state] = connection
        log.info("connection from %s", peer)
        try:
            with connection.cancel_scope:
                if isinstance(stream, trio.SSLStream):
                    with trio.move_on_after(TLS_HANDSHAKE_TIMEOUT) as handshake_scope:
                        try:
                            await stream.do_handshake()
                        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                            log.info("%s: TLS handshake failed: %s", peer, exc.__cause__ or exc)
                            return
                    if handshake_scope.cancelled_caught:
                        log.info("%s: TLS handshake timed out", peer)
                        return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop, connection, stream)
                    await self._read_loop(connection, stream)
        finally:
            self._connections.pop(connection.state, None)
            self.core.connection_lost(connection.state, self.clock())
            await close_quietly(stream)
            log.info("connection from %s closed", peer)

    async def _read_loop(self, connection: PoolConnection, stream: trio.abc.Stream) -> None:
        try:
            while not connection.state.closing:
                await self._wait_unstalled()
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    log.debug("%s: end of stream", connection.peer)
                    break
                await self._wait_unstalled()
                self._receive(connection, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("%s: receive failed: %s", connection.peer, exc.__cause__ or exc)
        self.core.end_of_input(connection.state)
        self.flush()

    def _receive(self, connection: PoolConnection, data: bytes) -> None:
        self.core.receive_data(connection.state, data, self.clock())
        self.flush()

    async def _write_loop(self, connection: PoolConnection, stream: trio.abc.Stream) -> None:
        state = connection.state
        try:
            while True:
                await connection.wait_for_output()
                if not state.closing:
                    await self._wait_unstalled()
                data = self.core.data_to_send(state)
                if data:
                    with trio.move_on_after(self.config.write_timeout) as send_scope:
                        await stream.send_all(data)
                    if send_scope.cancelled_caught:
                        log.info("%s: not reading our data, disconnecting", connection.peer)
                        break
                if state.closing:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("%s: send failed: %s", connection.peer, exc.__cause__ or exc)
        connection.cancel_scope.cancel()

    async def _wait_unstalled(self) -> None:
        while self.core.stalled:
            await self._unstalled.wait()
