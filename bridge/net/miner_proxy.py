"""The miner-side proxy's trio driver: accept rigs, run the proxy core, move bytes.

Every decision is the sans-IO core's, :class:`~bridge.relay.proxy.ProxyCore`
(placement, failover and fail-back, how a rig is moved, the probes' reading of
pool events as health, the opening timeout); see its module docs. This module
feeds it events with the current time and executes its commands:

- one task per rig connection (the accepted connection's own: ``serve_admitted``'s
  ``handler_owns_connection``) reads the rig and sends what the core wrote to it
  (see :class:`_RigConnection`); each upstream session of the rig (*leg*) is opened
  by a task in the proxy's nursery (``OpenLeg``), which goes on reading a plain SV1
  pool connection, while a StratumRM leg's events are handed over by its link;
- one task per upstream runs its :class:`~bridge.net.upstreams.Probe` (the
  proxy's own session there, reconnected with backoff, and the keepalive checks
  the core asks for);
- one timer task for the whole proxy calls the core at its next deadline.

Until its first Stratum request a connection is *pending* for admission control
(bridge/net/admission.py): pending connections are capped globally and per source
address, and nothing new is accepted when file descriptors run short
(``admission``). A rig that admission ends then (its handshake deadline, or evicted
for a newcomer) is closed with the reason ``HANDSHAKE_CUT_SHORT``.

Every detection and switch is logged by ``bridge.proxy.failover`` with its reason
and counted in :meth:`MinerProxy.statistics`.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import itertools
import logging
import os
import ssl
import time
from collections import Counter, deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import trio
from msgspec import Struct

from bridge.config import UpstreamEntry, UpstreamURL
from bridge.logs import bind_connection, enter_connection, leave_connection
from bridge.net.admission import (
    RIG_MAX_PENDING,
    RIG_MAX_PENDING_PER_SOURCE,
    Admission,
    AdmissionLimits,
    AdmissionStatistics,
)
from bridge.net.containment import Containment
from bridge.net.listen import Pending, serve_admitted
from bridge.net.rm_upstream import RMUpstreamHandle, StratumRMLink
from bridge.net.tcp import (
    describe_error,
    peer_name,
    socket_of,
    tune_stream,
)
from bridge.net.timer import CoreTimer, run_timer
from bridge.net.upstreams import (
    NETWORK_ERRORS,
    PROBE_AGENT,
    Probe,
    Session,
    Upstream,
)
from bridge.relay.failover import FailoverConfig, FailoverPolicy, FailoverStatistics
from bridge.relay.miner_channel import MinerChannel, MinerChannelCounters, MinerChannelStatistics
from bridge.relay.proxy import (
    MAX_LINE_FROM_MINER,
    CheckUpstream,
    CloseLeg,
    CloseProbe,
    CloseRig,
    Command,
    Event,
    FlushLeg,
    FlushProbe,
    LegEvents,
    LegFailed,
    LegLost,
    LegOpened,
    Log,
    MoveToNewLink,
    Notice,
    OpenLeg,
    ProbeIdentity,
    ProxyCore,
    ProxySettings,
    ProxyUpstream,
    RigClosed,
    RigConnected,
    RigData,
    RigEstablished,
    Timer,
    WriteRig,
    explain_authorize_refusal,
)
from bridge.relay.rm_upstream import ConnectionStatistics

__all__ = ["FailoverEvent", "LinkStatus", "MinerProxy", "ProxyStatistics", "RigStatus", "explain_authorize_refusal"]

log = logging.getLogger("bridge.proxy")
failover_log = logging.getLogger("bridge.proxy.failover")

RECEIVE_SIZE = 4096
"""Bytes read from a rig at a time: a rig's lines are short, and large reads fragment the heap."""
#: Bytes waiting for a rig that does not read before its connection is closed (a rig's
#: own traffic is a few hundred bytes a second; its reader waits while its writes do).
MAX_RIG_BACKLOG = 1 << 20
_CLOSED_ERRNOS = {errno.EBADF, errno.ENOTSOCK}
#: The close reason of a rig whose handshake admission control ended (bridge/net/admission.py).
HANDSHAKE_CUT_SHORT = "handshake cut short by admission control (deadline or eviction)"


class _Next(enum.Enum):
    """What a rig's task awaits next (:meth:`_RigConnection.step`)."""

    FLUSH = "send what is queued for the rig (the kernel did not take it all)"
    RECEIVE = "receive from a stream that is not a plain socket"
    READABLE = "wait for the rig's socket to be readable"
    CHECKPOINT = "a checkpoint after a read that did not wait"


# The steady state's stand-in for the handshake's cancel scope (reusable: it does nothing).
_NO_SCOPE = contextlib.nullcontext()
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


class ProxyStatistics(MinerChannelCounters, frozen=True, kw_only=True):
    """Every rig channel's counters summed (open ones included), and the proxy's own."""

    connections_accepted: int
    connections_active: int
    closed_by_reason: dict[str, int]
    unconfirmed: int
    """Shares and requests answered with an error because no verdict came (timed out, upstream lost)."""
    failover: FailoverStatistics | None = None
    admission: AdmissionStatistics | None = None
    """The rig port's admission control (connections before their first Stratum request)."""
    contained_errors: int = 0
    """Internal errors while handling one rig, upstream session or datagram: that one was ended, the proxy went on."""


#: Failover events kept for the dashboard and the API.
FAILOVER_HISTORY = 100


class FailoverEvent(Struct, frozen=True, kw_only=True):
    """One logged failover event (detection, recovery, switch, outage, release)."""

    at: datetime
    kind: str
    message: str
    upstream: str | None


class RigStatus(Struct, frozen=True, kw_only=True):
    """One connected rig: where it comes from, its workers, its upstream and its counters."""

    id: int
    peer: str
    workers: list[str]
    upstream: str | None
    connected_at: datetime
    shares: MinerChannelStatistics


class LinkStatus(Struct, frozen=True, kw_only=True):
    """One stratumrm:// upstream's link to its sidecar."""

    upstream: str
    connections_made: int
    failure: str | None
    connection: ConnectionStatistics | None


class MinerProxy:
    """Accepts Stratum V1 rigs and relays each over its own upstream session, with failover.

    ``upstream`` is one URL or the ordered list of :class:`~bridge.config.UpstreamEntry`.
    ``upstream_ssl_context`` is the proxy's TLS client context (or
    :class:`~bridge.pki.rotation.ClientCredentials`) for ``stratumrm://`` upstreams;
    ``pool_ssl_context`` verifies ``stratum+ssl://`` pools (default:
    ``upstream_ssl_context`` when it is a plain context, as with one upstream).
    """

    def __init__(
        self,
        upstream: UpstreamURL | Sequence[UpstreamEntry],
        *,
        upstream_ssl_context: Any = None,
        pool_ssl_context: ssl.SSLContext | None = None,
        share_batch_window: float = 0.0,
        opening_timeout: float = 10.0,
        submit_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        failover: FailoverConfig | None = None,
        drain_timeout: float = 10.0,
        probe_user: str | None = None,
        probe_password: str | None = None,
        keepalive: str = "subscribe",
        admission: AdmissionLimits | None = None,
    ) -> None:
        entries = [UpstreamEntry(upstream)] if isinstance(upstream, UpstreamURL) else list(upstream)
        if not entries:
            raise ValueError("at least one upstream is needed")
        if keepalive == "authorize":
            raise ValueError(
                "keepalive 'authorize' is no longer offered (ckpool never answers a second authorize, so healthy "
                'pools looked silent): use keepalive = "subscribe"'
            )
        if pool_ssl_context is None and isinstance(upstream_ssl_context, ssl.SSLContext):
            pool_ssl_context = upstream_ssl_context
        self.containment = Containment(log, "proxy")
        self.upstreams = [
            Upstream(
                index,
                entry,
                ssl_context=upstream_ssl_context if entry.url.transport == "stratumrm" else pool_ssl_context,
                connect_timeout=connect_timeout,
                batch_window=share_batch_window,
                containment=self.containment,
            )
            for index, entry in enumerate(entries)
        ]
        self.upstream = entries[0].url
        self.upstream_ssl_context = upstream_ssl_context
        self.opening_timeout = opening_timeout
        # The core's opening timeout closes a silent rig with its reason; admission's
        # deadline, a second later, is the backstop.
        limits = msgspec.structs.replace(
            admission or AdmissionLimits(max_pending=RIG_MAX_PENDING, max_pending_per_source=RIG_MAX_PENDING_PER_SOURCE),
            handshake_timeout=opening_timeout + 1.0,
        )
        self.admission = Admission("proxy rig port", limits)
        self.submit_timeout = submit_timeout
        self.connect_timeout = connect_timeout
        self.drain_timeout = drain_timeout
        config = failover or FailoverConfig()
        self.core = ProxyCore(
            [
                ProxyUpstream(u.name, str(u.url), u.entry.priority, u.entry.weight, stratumrm=u.link is not None)
                for u in self.upstreams
            ],
            ProxySettings(
                submit_timeout=submit_timeout,
                drain_timeout=drain_timeout,
                opening_timeout=opening_timeout,
                max_line=MAX_LINE_FROM_MINER,
                keepalive=keepalive,
                failover=config,
                probe_agent=PROBE_AGENT,
            ),
        )
        self.probes = [Probe(u, self.feed, keepalive=keepalive, check_timeout=config.silence_timeout) for u in self.upstreams]
        self.probe_user = probe_user
        self.probe_password = probe_password
        if probe_user:
            self.core.handle(ProbeIdentity(probe_user, probe_password), 0.0)  # no probe session yet: nothing to send
        self._rig_ids = itertools.count(1)
        self._rigs: dict[int, _RigConnection] = {}
        self._accepted_connections = 0
        self._active = 0
        self._closed: Counter[str] = Counter()
        self._finished = MinerChannelCounters()
        """The counters of every rig channel that has closed, summed."""
        self.failover_history: deque[FailoverEvent] = deque(maxlen=FAILOVER_HISTORY)
        self._timer = CoreTimer(self.core)
        self._flushing: _RigConnection | None = None
        self._nursery: trio.Nursery | None = None
        self.port: int | None = None
        # The first StratumRM link (what single-upstream callers and tests look at).
        self.link: StratumRMLink | None = next((u.link for u in self.upstreams if u.link is not None), None)

    @property
    def policy(self) -> FailoverPolicy:
        """The core's failover policy (health of every upstream, placement of every rig)."""
        return self.core.policy

    # ------------------------------------------------------------ serving

    async def serve(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info(
            "proxy listening on %s:%d, upstream%s %s",
            host,
            self.port,
            "s" if len(self.upstreams) > 1 else "",
            ", ".join(
                f"{u.url} (priority {u.entry.priority}, weight {u.entry.weight:g})" if len(self.upstreams) > 1 else str(u.url)
                for u in self.upstreams
            ),
        )
        async with trio.open_nursery() as nursery:
            await self._start(nursery)
            task_status.started(self.port)
            await serve_admitted(self._handle, listeners, self.admission, handler_owns_connection=True)

    async def serve_streams(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Everything :meth:`serve` runs but the listener: rigs arrive through :meth:`handle_rig`.

        For a listener shared by several proxies (transparent interception,
        :mod:`bridge.net.intercept`).
        """
        async with trio.open_nursery() as nursery:
            await self._start(nursery)
            task_status.started()
            await trio.sleep_forever()

    async def handle_rig(self, stream: trio.SocketStream, pending: Pending) -> None:
        """Serve one rig connection accepted (and admitted) elsewhere; needs :meth:`serve_streams` running."""
        await self._handle(stream, pending)

    async def _start(self, nursery: trio.Nursery) -> None:
        for upstream in self.upstreams:
            if upstream.link is not None:
                upstream.link.on_goaway = functools.partial(self._on_goaway, upstream)
                await nursery.start(upstream.link.run)
        self._nursery = nursery
        for probe in self.probes:
            index = probe.upstream.index
            nursery.start_soon(probe.run, functools.partial(self._probe_subscribed, index), self.containment)
        nursery.start_soon(self._run_timer)

    def _probe_subscribed(self, upstream: int) -> bool:
        return self.core.probes[upstream].reader.subscribed

    # ------------------------------------------------------------ the core

    def feed(self, event: Event, flushing: _RigConnection | None = None) -> None:
        """Hand one event to the core with the current time, and execute its commands.

        ``flushing``: the rig connection whose task feeds the event and flushes right
        after, so its writes need no flush task of their own.
        """
        now = trio.current_time()
        self._flushing = flushing
        try:
            self.execute(self.core.handle(event, now))
        finally:
            self._flushing = None
        self._timer.wake_if_sooner()

    def execute(self, commands: list[Command]) -> None:
        for command in commands:
            match command:
                case WriteRig(rig, data):
                    connection = self._rigs.get(rig)
                    if connection is not None:
                        connection.write(data, kick=connection is not self._flushing)
                case FlushLeg(rig, leg):
                    connection = self._rigs.get(rig)
                    if connection is not None:
                        connection.flush_leg(leg, kick=connection is not self._flushing)
                case OpenLeg(rig, leg, upstream):
                    connection = self._rigs.get(rig)
                    if connection is not None:
                        connection.open_leg(leg, self.upstreams[upstream])
                case CloseLeg(rig, leg):
                    connection = self._rigs.get(rig)
                    if connection is not None:
                        connection.close_leg(leg)
                case CloseRig(rig, reason):
                    connection = self._rigs.get(rig)
                    if connection is not None:
                        connection.finish(reason)
                case RigEstablished(rig):
                    connection = self._rigs.get(rig)
                    if connection is not None:
                        connection.established()
                case FlushProbe(upstream):
                    self.probes[upstream].kick()
                case CloseProbe(upstream, reason):
                    self.probes[upstream].end(reason)
                case CheckUpstream(upstream):
                    if self._nursery is not None:
                        self._nursery.start_soon(self.probes[upstream].check)
                case Log(level, message, failover):
                    (failover_log if failover else log).log(_LEVELS[level], "%s", message)
                case Notice(kind, message, upstream):
                    self.failover_history.append(
                        FailoverEvent(
                            at=datetime.now(UTC),
                            kind=kind,
                            message=message,
                            upstream=None if upstream is None else self.upstreams[upstream].name,
                        )
                    )
                    level = logging.WARNING if kind in ("detection", "outage", "release") else logging.INFO
                    failover_log.log(level, "%s", message)

    async def _run_timer(self) -> None:
        """The one timer of the proxy: every rig's deadlines and the policy's."""

        def on_due(_now: float, _due: float) -> None:
            with self.containment.guard("proxy", "timer"):
                self.feed(Timer())

        await run_timer(self._timer, on_due)

    # ------------------------------------------------------------ rm.goaway (a draining sidecar)

    def _on_goaway(self, upstream: Upstream, old: StratumRMLink) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._follow_goaway, upstream, old)

    async def _follow_goaway(self, upstream: Upstream, old: StratumRMLink) -> None:
        """The sidecar behind ``upstream`` drains: a new link (the balancer picks another sidecar), rigs move.

        Each rig moves as a failover move does (``mining.set_extranonce`` when it
        subscribed to it, else ``client.reconnect`` once its shares in flight have
        their verdicts), so no rig connection is dropped; the old link keeps every
        verdict path until its last channel is gone or the sidecar's deadline passes.
        """
        connection = old.connection
        assert connection is not None and connection.goaway is not None
        goaway, deadline = connection.goaway, connection.goaway_by or trio.current_time()
        assert self._nursery is not None
        new = StratumRMLink(
            old.url,
            old.credentials,
            connect_timeout=old.connect_timeout,
            batch_window=old.batch_window,
            detect_blocks=old.detect_blocks,
        )
        new.on_goaway = functools.partial(self._on_goaway, upstream)
        await self._nursery.start(new.run)
        upstream.link = new
        if self.link is old:
            self.link = new
        failover_log.warning(
            "sidecar behind %s is going away (%s) within %g s: moving %d rigs to a new connection",
            upstream.name,
            goaway.reason or "draining",
            goaway.deadline,
            old.channels_open,
        )
        pause = 0.2
        while True:  # until connected, or the old sidecar's deadline is near
            try:
                await new.connect()
                break
            except ConnectionError as exc:
                if trio.current_time() + pause >= deadline:
                    failover_log.warning(
                        "no new connection to %s before the draining sidecar's deadline (%s); its rigs stay "
                        "until it closes, then fail over as after a lost connection",
                        upstream.url,
                        exc,
                    )
                    break
                failover_log.warning("new connection to %s failed: %s; retrying in %g s", upstream.url, exc, pause)
                await trio.sleep(pause)
                pause = min(pause * 2, 2.0)
        self.probes[upstream.index].relink()
        moved = 0
        with trio.move_on_at(deadline + 1.0):
            while old.channels_open:
                for rig in list(self._rigs.values()):
                    with self.containment.guard(rig.peer, "rig connection"):
                        moved += rig.follow_goaway(upstream, old)
                await trio.sleep(0.1)
        failover_log.info("left the draining sidecar behind %s: %d rigs moved", upstream.name, moved)
        old.retire("moved to another sidecar after rm.goaway")

    # ------------------------------------------------------------ rigs

    async def _handle(self, stream: trio.SocketStream, pending: Pending) -> None:
        """Serve one rig connection as its task: serve_admitted's ``handler_owns_connection``, so
        no wrapper coroutine or cancel scope is kept for the connection's life; the handshake's
        cancel scope (admission's deadline and eviction) is held only until the rig's first
        Stratum request. An exception ends this connection only (contained here, not by
        ``Containment.connections``, whose wrapper is one coroutine more per rig)."""
        peer = peer_name(stream)
        try:
            with self.containment.guard(peer, "rig connection"):
                tune_stream(stream)
                self._accepted_connections += 1
                self._active += 1
                rig_id = next(self._rig_ids)
                bind_connection(f"rig-{rig_id}", fresh=False)
                self.feed(RigConnected(rig_id, peer, _local_address(stream)))
                channel = self.core.channel(rig_id)
                assert channel is not None
                connection = _RigConnection(self, rig_id, channel, stream, peer, pending)
                self._rigs[rig_id] = connection
                reason = "proxy shutting down"
                try:
                    with self.containment.guard(peer, "rig connection") as guard:
                        try:
                            # Read the rig and do whatever else is to be done for it, until it
                            # closes: its handshake under the handshake's cancel scope (until its
                            # first Stratum request), then the rest of its life. step() does each
                            # turn's work; this loop only awaits what it asks for, in this frame:
                            # a helper coroutine between the handler and the rig's idle wait
                            # would be about 300 B more per rig for as long as it is connected.
                            sock = connection._sock
                            for handshake in (True, False):
                                with pending.handshake() if handshake else _NO_SCOPE:
                                    waited = False
                                    while (wait := connection.step(handshake=handshake, waited=waited)) is not None:
                                        waited = True
                                        if wait is _Next.READABLE:
                                            assert sock is not None
                                            connection.wait_begins()  # no cancel scope: _wake() uses notify_closing
                                            try:
                                                await trio.lowlevel.wait_readable(sock)
                                            except trio.ClosedResourceError as exc:
                                                connection.wait_closed(exc)
                                            finally:
                                                connection.wait_ends()
                                        elif wait is _Next.FLUSH:
                                            await connection.flush_scoped()
                                        elif wait is _Next.RECEIVE:
                                            await connection.receive()
                                        else:
                                            await trio.lowlevel.cancel_shielded_checkpoint()  # a read no wait came before
                                if handshake and pending.cut_short and connection.close_reason is None:
                                    connection._end(HANDSHAKE_CUT_SHORT)
                            # Deliver the last answers (errors for unconfirmed shares) before closing.
                            with trio.move_on_after(2):
                                await connection.flush()
                        finally:
                            await connection.drop_legs()
                        reason = connection.close_reason or "closed"
                    if guard.error is not None:
                        reason = "internal error"
                finally:
                    self._active -= 1
                    self._rigs.pop(rig_id, None)
                    if self.core.channel(rig_id) is not None:
                        with self.containment.guard(peer, "rig connection"):
                            self.feed(RigClosed(rig_id, reason))
                    stats = channel.counters
                    self._finished.add(stats)
                    self._closed[reason.split(":", 1)[0]] += 1
                log.info(
                    "rig %s disconnected (%s); %d submitted, %d accepted, %d rejected",
                    peer,
                    reason,
                    stats.submitted,
                    stats.accepted,
                    stats.rejected,
                )
        finally:
            await pending.release(stream)  # counts the connection out of admission and closes it, on every path

    def statistics(self) -> ProxyStatistics:
        """Counters over every rig connection so far, open ones included."""
        totals = MinerChannelCounters()
        totals.add(self._finished)
        for rig in self._rigs.values():
            totals.add(rig.channel.counters)
        return ProxyStatistics(
            **totals.values(),
            unconfirmed=totals.timed_out + totals.lost_upstream,
            connections_accepted=self._accepted_connections,
            connections_active=self._active,
            closed_by_reason=dict(self._closed),
            failover=self.policy.statistics(trio.current_time()) if _in_trio() else None,
            admission=self.admission.statistics(),
            contained_errors=self.containment.errors,
        )

    def rigs(self) -> list[RigStatus]:
        """The connected rigs, oldest first."""
        return [rig.status() for rig in list(self._rigs.values())]

    def links(self) -> list[LinkStatus]:
        """The stratumrm:// upstreams' links to their sidecars."""
        found = []
        for upstream in self.upstreams:
            link = upstream.link
            if link is None:
                continue
            connection = link.connection
            found.append(
                LinkStatus(
                    upstream=upstream.name,
                    connections_made=link.connections_made,
                    failure=link.failure,
                    connection=None if connection is None else connection.statistics(),
                )
            )
        return found


class _LegTask:
    """One upstream session of a rig: opening (``session`` None), then open.

    It is the StratumRM session's listener itself (called when the channel has events),
    rather than a closure per leg; ``scope`` cancels the leg's task while it has one.
    """

    __slots__ = ("closed", "leg", "rig", "scope", "session", "upstream")

    def __init__(self, rig: _RigConnection, leg: int, upstream: Upstream) -> None:
        self.rig = rig
        self.leg = leg
        self.upstream = upstream
        self.session: Session | None = None
        self.closed = False
        self.scope: trio.CancelScope | None = trio.CancelScope()

    def __call__(self) -> None:
        """The StratumRM channel has events (its link's reader calls this)."""
        self.rig._leg_ready(self.leg)

    def cancel(self) -> None:
        self.closed = True
        if self.scope is not None:
            self.scope.cancel()


class _RigConnection:
    """One rig connection: the core decides, this moves bytes.

    One task per rig (the connection's own, :meth:`MinerProxy._handle`, one :meth:`step` at a time)
    reads the rig, feeds the core, sends what the core wrote to the rig and flushes the
    rig's upstream sessions.
    What the core writes is sent at once as far as the kernel takes it (a rig's socket
    buffer nearly always has room), whoever fed the core; only what does not fit, or a
    plain SV1 pool connection to flush, wakes the rig's task (it is cancelled out of its
    wait to read, never out of a send) to send it with backpressure. A StratumRM session
    needs no task: the link's reader hands its events to :meth:`_leg_ready`, which feeds
    the core. Opening a session and reading a plain SV1 pool connection run in the
    proxy's nursery, under the rig's containment, cancelled when the rig ends.
    """

    __slots__ = (
        "_reading",
        "_scope",
        "_sending",
        "_sock",
        "_woken",
        "channel",
        "close_reason",
        "connected_at",
        "dirty_legs",
        "id",
        "legs",
        "outbox",
        "peer",
        "pending",
        "proxy",
        "stream",
    )

    def __init__(
        self,
        proxy: MinerProxy,
        rig_id: int,
        channel: MinerChannel,
        stream: trio.SocketStream,
        peer: str,
        pending: Pending | None = None,
    ) -> None:
        self.proxy = proxy
        self.pending = pending
        self.id = rig_id
        self.channel = channel
        self.stream = stream
        self.peer = peer
        self.legs: dict[int, _LegTask] = {}
        self.outbox = bytearray()
        self.dirty_legs: set[int] | None = None  # legs to flush; made when needed (an empty set is 216 B)
        self.close_reason: str | None = None
        self._sock = stream.socket if type(stream) is trio.SocketStream else None
        self._sending = False  # the rig's task is in a send: nobody else writes to the socket
        self._scope: trio.CancelScope | None = None  # around the task's wait or send in progress
        self._reading = False
        self._woken = False  # its wait to read was ended by _wake(), not by a closed socket
        self.connected_at = time.time()  # a float: a datetime is twice its size

    def status(self) -> RigStatus:
        upstream = self.proxy.core.upstream_of(self.id)
        return RigStatus(
            id=self.id,
            peer=self.peer,
            workers=list(self.channel.authorized_workers),
            upstream=None if upstream is None else self.proxy.upstreams[upstream].name,
            connected_at=datetime.fromtimestamp(self.connected_at, UTC),
            shares=self.channel.statistics(),
        )

    def step(self, *, handshake: bool, waited: bool) -> _Next | None:
        """One turn of the rig's task up to what it awaits next; None: nothing more (the
        connection is closing, or with ``handshake``, the rig's first Stratum request came).

        Sends what is queued when the kernel takes it at once and reads what the rig sent
        (a plain socket: ``os.read``, what receive_some does without its await chain).
        ``waited``: the task awaited since the last call, so a read needs no checkpoint of
        its own; otherwise each read is followed by one (:attr:`_Next.CHECKPOINT`).
        """
        sock = self._sock
        while self.close_reason is None and not (handshake and self.pending is None):
            if not self._flush_now():
                return _Next.FLUSH
            if sock is None:
                return _Next.RECEIVE
            try:
                data = os.read(sock.fileno(), RECEIVE_SIZE)
            except BlockingIOError:
                return _Next.READABLE  # waited for by the task, not in this handler: it would keep the exception
            except OSError as exc:
                closed = exc.errno in _CLOSED_ERRNOS
                self._end(
                    "rig connection error: "
                    + ("this socket was already closed" if closed else f"socket connection broken: {exc}")
                )
                return None
            if not data:
                self._end("rig closed the connection")
                return None
            self.proxy.feed(RigData(self.id, data), self)
            if not waited:
                return _Next.CHECKPOINT
            waited = False
        return None

    def wait_begins(self) -> None:
        """The task waits for the socket to be readable (no cancel scope: see :meth:`_wake`)."""
        self._scope = None
        self._reading = True

    def wait_closed(self, exc: trio.ClosedResourceError) -> None:
        """The wait ended with ClosedResourceError: a wake-up (:meth:`_wake`), or the socket closed."""
        if not self._woken:
            self._end(f"rig connection error: {exc}")

    def wait_ends(self) -> None:
        self._reading = False
        self._woken = False

    async def flush_scoped(self) -> None:
        """:meth:`flush` under a cancel scope that :meth:`finish` can cancel (a send stuck on a rig)."""
        scope = self._scope = trio.CancelScope()
        try:
            with scope:
                await self.flush()
        finally:
            self._scope = None

    async def receive(self) -> None:
        """Read a stream that is not a plain socket (receive_some); :meth:`_wake` cancels the wait."""
        scope = self._scope = trio.CancelScope()
        self._reading = True
        data = b""
        try:
            with scope:
                data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._end(f"rig connection error: {exc}")
            return
        finally:
            self._reading = False
            self._scope = None
        if scope.cancelled_caught:
            return  # woken: there is something else to do first
        if not data:
            self._end("rig closed the connection")
            return
        self.proxy.feed(RigData(self.id, data), self)

    async def drop_legs(self) -> None:
        """The connection is over: end every upstream session of the rig."""
        legs = list(self.legs.values())
        self.legs.clear()
        for task in legs:
            task.cancel()
        for task in legs:
            if task.session is not None:
                await task.session.aclose()

    def _wake(self) -> None:
        """Something for the rig's task to do: stop its wait to read (it reads again after).

        A wait on the socket itself (no cancel scope) is ended with ``notify_closing``,
        which wakes it with ClosedResourceError; ``_woken`` tells the task it was only woken
        (the socket stays open and is registered again at its next wait).
        """
        if not self._reading:
            return
        scope = self._scope
        if scope is not None:
            scope.cancel()
        elif not self._woken and self._sock is not None:
            self._woken = True
            trio.lowlevel.notify_closing(self._sock)

    # ------------------------------------------------------------ commands from the core

    def write(self, data: bytes, *, kick: bool = True) -> None:
        """Queue bytes for the rig; ``kick``: wake the rig's task (the feeding task is not it)."""
        self.outbox += data
        if len(self.outbox) > MAX_RIG_BACKLOG:
            self.outbox.clear()
            self._end(f"rig does not read: more than {MAX_RIG_BACKLOG} bytes waiting for it")
            return
        if kick:
            self._kick()

    def flush_leg(self, leg: int, *, kick: bool = True) -> None:
        if self.dirty_legs is None:
            self.dirty_legs = {leg}
        else:
            self.dirty_legs.add(leg)
        if kick:
            self._kick()

    def _kick(self) -> None:
        """Written to by a task that is not the rig's: send now, or wake the rig's task to."""
        if not self._flush_now():
            self._wake()

    def open_leg(self, leg: int, upstream: Upstream) -> None:
        nursery = self.proxy._nursery
        if nursery is not None and self.close_reason is None:
            task = _LegTask(self, leg, upstream)
            self.legs[leg] = task
            nursery.start_soon(self._run_leg, task)

    def close_leg(self, leg: int) -> None:
        task = self.legs.pop(leg, None)
        if self.dirty_legs is not None:
            self.dirty_legs.discard(leg)
        if task is None:
            return
        task.cancel()
        session = task.session
        if session is not None:
            if isinstance(session, RMUpstreamHandle):
                session.listener = None
                session.link.close_channel(session)
            elif self.proxy._nursery is not None:
                self.proxy._nursery.start_soon(session.aclose)

    def finish(self, reason: str) -> None:
        """The core closed the rig (``CloseRig``): flush what is queued, then close."""
        if self.close_reason is None:
            self.close_reason = reason
        # Out of a wait or a stuck send; the rig's task flushes what is left.
        if self._reading:
            self._wake()
        elif self._scope is not None:
            self._scope.cancel()

    def established(self) -> None:
        if self.pending is not None:
            self.pending.established()  # its first Stratum request: no longer pending
            self.pending = None

    def _end(self, reason: str) -> None:
        """This side ends the connection: the core hears it (and answers ``CloseRig``)."""
        self.proxy.feed(RigClosed(self.id, reason))
        self.finish(reason)  # if the core had forgotten the rig already

    def _flush_now(self) -> bool:
        """Send what is queued for the rig as far as the kernel takes it without waiting, and
        flush the StratumRM legs written to (a wake-up for their link's writer); True when
        nothing is left for :meth:`flush` (which waits)."""
        outbox = self.outbox
        if outbox and not self._sending and self._sock is not None:
            try:
                sent = os.write(self._sock.fileno(), outbox)
            except OSError:
                sent = 0  # full, or broken: the send in flush() waits, or says what broke
            del outbox[:sent]
        legs = self.dirty_legs
        if legs:
            for leg in list(legs):
                task = self.legs.get(leg)
                session = None if task is None else task.session
                if session is None:
                    legs.discard(leg)
                elif isinstance(session, RMUpstreamHandle):
                    session.link.kick()
                    legs.discard(leg)
            if not legs:
                self.dirty_legs = None
        return not outbox and not self.dirty_legs

    async def flush(self) -> None:
        """Send what is queued for the rig and flush the legs the core wrote to (the rig's task only)."""
        while not self._flush_now():
            legs, self.dirty_legs = self.dirty_legs, None
            if self.outbox:
                data = bytes(self.outbox)
                self._sending = True
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.outbox.clear()
                    self._end(f"write failed: {exc}")
                    return
                except trio.Cancelled:
                    # The connection is closing (CloseRig): what was not sent is sent by
                    # the last flush, after the writes this flush took.
                    if legs:
                        self.dirty_legs = legs if self.dirty_legs is None else self.dirty_legs | legs
                    raise
                finally:
                    self._sending = False
                del self.outbox[: len(data)]
            for leg in legs or ():
                task = self.legs.get(leg)
                if task is None or task.session is None:
                    continue
                try:
                    await task.session.flush()
                except NETWORK_ERRORS:
                    pass  # its reader sees the failure

    # ------------------------------------------------------------ upstream sessions

    def _leg_ready(self, leg: int) -> None:
        """A StratumRM leg has events (its link's reader calls this): the core has them now."""
        task = self.legs.get(leg)
        if task is None or task.closed or not isinstance(task.session, RMUpstreamHandle):
            return
        session = task.session
        proxy = self.proxy
        token = enter_connection(f"rig-{self.id}")  # its log lines are the rig's, not the link's
        try:
            with proxy.containment.guard(self.peer, "rig connection") as guard:
                events, lost = session.take()
                if events:
                    proxy.feed(LegEvents(self.id, leg, events))
                if lost is not None and not task.closed:
                    self.legs.pop(leg, None)
                    session.listener = None
                    proxy.feed(LegLost(self.id, leg, f"pool connection error: {describe_error(ConnectionError(lost))}"))
                    session.link.close_channel(session)
        finally:
            leave_connection(token)
        if guard.error is not None:
            self.finish("internal error")

    async def _run_leg(self, task: _LegTask) -> None:
        """Open one upstream session (and read it, for a plain SV1 pool), in the proxy's nursery."""
        bind_connection(f"rig-{self.id}", fresh=False)
        scope = task.scope
        assert scope is not None
        with self.proxy.containment.guard(self.peer, "rig connection") as guard, scope:
            await self._leg(task)
        task.scope = None  # no task of its own any more (a StratumRM leg's listener is the task object)
        if guard.error is not None:
            self._end("internal error")

    async def _leg(self, task: _LegTask) -> None:
        proxy = self.proxy
        leg = task.leg
        try:
            session = await task.upstream.open_session(self.peer)
        except NETWORK_ERRORS as exc:
            if self.legs.get(leg) is task:
                del self.legs[leg]
            proxy.feed(LegFailed(self.id, leg, describe_error(exc)))
            return
        task.session = session
        if task.closed:
            with trio.CancelScope(shield=True):
                await session.aclose()
            return
        proxy.feed(LegOpened(self.id, leg, session.session))
        if isinstance(session, RMUpstreamHandle):
            if not task.closed:
                session.listener = task
                if session.session.events or session.lost is not None:
                    self._leg_ready(leg)
            return  # no task: the link's reader calls the listener
        while not task.closed:
            reason = "pool closed the connection"
            try:
                events = await session.receive()
            except NETWORK_ERRORS as exc:
                events = None
                reason = f"pool connection error: {describe_error(exc)}"
            if task.closed:
                return  # the core closed it (CloseLeg): close_leg closes the session
            if events is None:
                self.legs.pop(leg, None)
                proxy.feed(LegLost(self.id, leg, reason))
                await session.aclose()
                return
            proxy.feed(LegEvents(self.id, leg, events))

    def follow_goaway(self, upstream: Upstream, old: StratumRMLink) -> int:
        """Move off ``old`` (its sidecar is draining) to ``upstream``'s new link; 1 if a move began."""
        core = self.proxy.core
        leg = core.current_leg(self.id)
        task = None if leg is None else self.legs.get(leg)
        if task is None or getattr(task.session, "link", None) is not old:
            return 0
        if not core.movable(self.id):
            return 0  # busy (a handshake or a move in progress): looked at again shortly
        self.proxy.feed(MoveToNewLink(self.id, upstream.index))
        return 1


def _local_address(stream: trio.SocketStream) -> tuple[str, int] | None:
    """The proxy's own address on a rig's connection (what cpuminer is told to reconnect to)."""
    sock = socket_of(stream)
    try:
        address = sock.getsockname() if sock is not None else None
    except OSError:
        return None
    if not isinstance(address, tuple) or len(address) < 2:
        return None
    return str(address[0]), int(address[1])


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
