"""The miner-side proxy's trio driver: accept rigs, relay each one upstream.

Everything protocol-shaped happens in :class:`~bridge.relay.miner_channel.MinerChannel`;
this module only moves bytes, keeps time and closes sockets. One nursery per rig
connection runs three tasks: the rig reader, the upstream reader (started once the
rig has said something that is Stratum) and a timer for verdict deadlines.

A connection that says nothing Stratum within ``opening_timeout`` (a port scanner,
a stuck client) or opens with bytes that are clearly not Stratum is closed and
counted by reason; other rigs are unaffected.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections import Counter
import trio
from msgspec import Struct

from bridge.config import UpstreamURL
from bridge.net.rm_upstream import RMUpstreamHandle, StratumRMLink
from bridge.net.sv1_upstream import SV1Upstream
from bridge.net.tcp import close_quietly, describe_error, peer_name, tune_stream
from bridge.relay.miner_channel import MinerChannel

log = logging.getLogger("bridge.proxy")

RECEIVE_SIZE = 16384
# ckpool's limit for a line from a client; rigs never come close.
MAX_LINE_FROM_MINER = 4096


class ProxyStatistics(Struct, frozen=True):
    connections_accepted: int
    connections_active: int
    closed_by_reason: dict[str, int]
    submitted: int
    accepted: int
    rejected: int
    unconfirmed: int


class MinerProxy:
    """Accepts Stratum V1 rigs and relays each over its own upstream session."""

    def __init__(
        self,
        upstream: UpstreamURL,
        *,
        upstream_ssl_context: ssl.SSLContext | None = None,
        share_batch_window: float = 0.0,
        opening_timeout: float = 10.0,
        submit_timeout: float = 60.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.upstream = upstream
        self.upstream_ssl_context = upstream_ssl_context
        self.opening_timeout = opening_timeout
        self.submit_timeout = submit_timeout
        self.connect_timeout = connect_timeout
        self._accepted_connections = 0
        self._active = 0
        self._closed: Counter[str] = Counter()
        self._submitted = 0
        self._accepted = 0
        self._rejected = 0
        self._unconfirmed = 0
        self._live: set[MinerChannel] = set()
        self.port: int | None = None
        self.link: StratumRMLink | None = None
        if upstream.transport == "stratumrm":
            if upstream_ssl_context is None:
                raise ValueError("a stratumrm:// upstream needs the proxy's certificate (TLS client context)")
            self.link = StratumRMLink(
                upstream, upstream_ssl_context, connect_timeout=connect_timeout, batch_window=share_batch_window
            )

    async def serve(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info("proxy listening on %s:%d, upstream %s", host, self.port, self.upstream)
        async with trio.open_nursery() as nursery:
            if self.link is not None:
                await nursery.start(self.link.run)
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners)

    async def _open_upstream(self, peer: str) -> SV1Upstream | RMUpstreamHandle:
        if self.link is not None:
            return await self.link.open_handle(peer)
        return await SV1Upstream.connect(
            self.upstream, ssl_context=self.upstream_ssl_context, timeout=self.connect_timeout
        )

    async def _handle(self, stream: trio.SocketStream) -> None:
        tune_stream(stream)
        peer = peer_name(stream)
        self._accepted_connections += 1
        self._active += 1
        channel = MinerChannel(submit_timeout=self.submit_timeout, max_line=MAX_LINE_FROM_MINER)
        connection = _RigConnection(self, channel, stream, peer)
        self._live.add(channel)
        reason = "proxy shutting down"
        try:
            reason = await connection.run()
        finally:
            self._active -= 1
            self._live.discard(channel)
            stats = channel.statistics()
            self._submitted += stats.submitted
            self._accepted += stats.accepted
            self._rejected += stats.rejected
            self._unconfirmed += stats.timed_out + stats.lost_upstream
            self._closed[reason.split(":", 1)[0]] += 1
            await close_quietly(stream)
        log.info(
            "rig %s disconnected (%s); %d submitted, %d accepted, %d rejected",
            peer, reason, stats.submitted, stats.accepted, stats.rejected,
        )

    def statistics(self) -> ProxyStatistics:
        """Counters over every rig connection so far, open ones included."""
        live = [channel.statistics() for channel in self._live]
        return ProxyStatistics(
            connections_accepted=self._accepted_connections,
            connections_active=self._active,
            closed_by_reason=dict(self._closed),
            submitted=self._submitted + sum(s.submitted for s in live),
            accepted=self._accepted + sum(s.accepted for s in live),
            rejected=self._rejected + sum(s.rejected for s in live),
            unconfirmed=self._unconfirmed + sum(s.timed_out + s.lost_upstream for s in live),
        )


class _RigConnection:
    """The tasks of one rig connection."""

    def __init__(self, proxy: MinerProxy, channel: MinerChannel, stream: trio.SocketStream, peer: str) -> None:
        self.proxy = proxy
        self.channel = channel
        self.stream = stream
        self.peer = peer
        self.upstream: SV1Upstream | RMUpstreamHandle | None = None
        self._miner_lock = trio.Lock()
        self._wake_timer = trio.Event()
        self._done = trio.Event()
        self._connecting = False
        self._nursery: trio.Nursery | None = None

    async def run(self) -> str:
        channel = self.channel
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read_rig)
                nursery.start_soon(self._timers)
                nursery.start_soon(self._opening_watchdog)
                await self._done.wait()
                nursery.cancel_scope.cancel()
            # Deliver the last answers (errors for unconfirmed shares) before closing.
            with trio.move_on_after(2):
                await self._flush()
        finally:
            if self.upstream is not None:
                await self.upstream.aclose()
        return channel.close_reason or "closed"

    def _finish(self, reason: str | None = None) -> None:
        if reason is not None and self.channel.close_reason is None:
            self.channel.close_reason = reason
        self._done.set()

    async def _flush(self) -> None:
        async with self._miner_lock:
            data = self.channel.miner.data_to_send()
            if data:
                await self.stream.send_all(data)
        if self.upstream is not None:
            await self.upstream.flush()

    async def _step(self) -> None:
        """After feeding the channel: write, wake the timer, notice closing."""
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._finish(f"write failed: {exc}")
            return
        self._wake_timer.set()
        if self.channel.closed:
            self._finish()

    async def _read_rig(self) -> None:
        channel = self.channel
        while True:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._finish(f"rig connection error: {exc}")
                return
            if not data:
                self._finish("rig closed the connection")
                return
            channel.miner_data(data, trio.current_time())
            if channel.wants_upstream and not self._connecting:
                self._connecting = True
                assert self._nursery is not None
                self._nursery.start_soon(self._run_upstream)
            await self._step()

    async def _opening_watchdog(self) -> None:
        await trio.sleep(self.proxy.opening_timeout)
        if not self.channel.wants_upstream:
            self._finish(f"idle: no Stratum request within {self.proxy.opening_timeout:g} s")

    async def _run_upstream(self) -> None:
        channel = self.channel
        try:
            upstream = await self.proxy._open_upstream(self.peer)
        except (OSError, trio.BrokenResourceError, ValueError) as exc:
            detail = describe_error(exc)
            log.warning("rig %s: cannot reach upstream %s: %s", self.peer, self.proxy.upstream, detail)
            channel.upstream_lost(f"cannot connect to {self.proxy.upstream}: {detail}", trio.current_time())
            await self._step()
            return
        self.upstream = upstream
        channel.attach_upstream(upstream.session, trio.current_time())
        await self._step()
        while not channel.closed:
            try:
                events = await upstream.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                events, reason = None, f"pool connection error: {describe_error(exc)}"
            else:
                reason = "pool closed the connection"
            if events is None:
                log.warning("rig %s: upstream %s lost: %s", self.peer, self.proxy.upstream, reason)
                channel.upstream_lost(reason, trio.current_time())
                await self._step()
                return
            channel.upstream_events(events, trio.current_time())
            await self._step()

    async def _timers(self) -> None:
        channel = self.channel
        while True:
            deadline = channel.next_deadline()
            self._wake_timer = trio.Event()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._wake_timer.wait()
                continue
            channel.on_timer(trio.current_time())
            await self._step()
