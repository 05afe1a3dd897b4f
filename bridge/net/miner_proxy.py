"""The miner-side proxy's trio driver: accept rigs, relay each one upstream, fail over.

Everything protocol-shaped happens in the sans-IO cores:
:class:`~bridge.relay.miner_channel.MinerChannel` (one rig and its upstream
sessions) and :class:`~bridge.relay.failover.FailoverPolicy` (upstream health,
who goes where, pacing, the no-upstream policy). This module moves bytes, keeps
time, closes sockets, and executes the policy's decisions:

- one nursery per rig connection runs the rig reader, a timer for verdict
  deadlines, and one reader per upstream session (*leg*) of the rig;
- one task per upstream runs its :class:`~bridge.net.upstreams.Probe` from the
  start (it subscribes without a worker name, and authorizes once when one is
  known: ``probe_user``, or the first rig's successful ``mining.authorize``), and
  one task runs the policy's timer and actions;
- a ``MoveRig`` decision becomes, for the rig: a fresh session on the target
  opened transparently if the rig has not had its subscribe result yet; a new
  session with the handshake replayed and ``mining.set_extranonce`` plus a clean
  job if the rig sent ``mining.extranonce.subscribe``; otherwise
  ``client.reconnect`` (``[]``, ``[host, port]`` for cpuminer) and a close once
  its shares in flight have their verdicts, after which the rig comes back and
  is placed on the target. When the source upstream is declared down (lost,
  silent, lagging …), its pending shares are answered at once with explicit
  errors; when it is alive (fail-back, rebalance) they keep their verdict path.

A connection that says nothing Stratum within ``opening_timeout`` (a port scanner,
a stuck client) or opens with bytes that are clearly not Stratum is closed and
counted by reason; other rigs are unaffected. Until its first Stratum request a
connection is *pending* for admission control (bridge/net/admission.py): pending
connections are capped globally and per source address, and nothing new is accepted
when file descriptors run short (``admission``).

Every detection and switch is logged by ``bridge.proxy.failover`` with its reason
and counted in :meth:`MinerProxy.statistics`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import ssl
from collections import Counter, deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import trio
from msgspec import Struct

from bridge.config import UpstreamEntry, UpstreamURL
from bridge.logs import bind_connection
from bridge.net.admission import (
    RIG_MAX_PENDING,
    RIG_MAX_PENDING_PER_SOURCE,
    Admission,
    AdmissionLimits,
    AdmissionStatistics,
)
from bridge.net.containment import Containment
from bridge.net.listen import Pending, serve_admitted
from bridge.net.rm_upstream import StratumRMLink
from bridge.net.tcp import (
    close_quietly,
    describe_error,
    peer_name,
    socket_of,
    tune_stream,
)
from bridge.net.upstreams import (
    KEEPALIVE_METHODS,
    NETWORK_ERRORS,
    Probe,
    Session,
    Upstream,
)
from bridge.relay.failover import (
    FailoverConfig,
    FailoverPolicy,
    FailoverStatistics,
    MoveRig,
    ReleaseRigs,
    SendKeepalive,
    UpstreamSpec,
)
from bridge.relay.miner_channel import Leg, MinerChannel, MinerChannelStatistics
from bridge.relay.rm_upstream import ConnectionStatistics
from bridge.sv1.framing import decode_json

log = logging.getLogger("bridge.proxy")
failover_log = logging.getLogger("bridge.proxy.failover")

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
    switches: int = 0
    """Rigs moved to another upstream session without reconnecting (handshake replayed)."""
    extranonce_changes: int = 0
    """``mining.set_extranonce`` sent to rigs that subscribed to it."""
    reconnects_sent: int = 0
    """``client.reconnect`` sent to move rigs that did not."""
    stale_local: int = 0
    """Shares answered by the proxy because the upstream that sent their job is gone."""
    failover: FailoverStatistics | None = None
    admission: AdmissionStatistics | None = None
    """The rig port's admission control (connections before their first Stratum request)."""
    contained_errors: int = 0
    """Internal errors while handling one rig, upstream session or datagram: that one was ended, the proxy went on."""
    rejected_by_reason: dict[str, int] = {}
    """Rejected shares by reason (stale, duplicate, low-difficulty ...)."""
    accepted_difficulty: float = 0.0
    """Sum of the difficulty of accepted shares."""


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


def explain_authorize_refusal(error: str) -> str:
    """The pool's or the sidecar's error for a refused mining.authorize, with what to do about it."""
    try:
        decoded = decode_json(error)
    except msgspec.DecodeError:
        decoded = error
    text = decoded[1] if isinstance(decoded, list) and len(decoded) > 1 else str(decoded)
    if "certificate does not cover account" in str(text):
        return (
            f"{text}. The sidecar only lets this proxy mine for the accounts its certificate names: ask the "
            "pool operator for a certificate covering this account (`stratumrm pki issue-miner NAME --account "
            "ACCOUNT ...`, or an enrollment token), or correct the rig's worker name"
        )
    return f"{text}; check the worker name and password the rig sends"


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
        if keepalive not in (*KEEPALIVE_METHODS, "none"):
            raise ValueError(f"keepalive must be one of subscribe, ping, none; got {keepalive!r}")
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
        # The opening watchdog closes a silent rig with its reason; admission's
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
        if keepalive == "none":
            config = msgspec.structs.replace(config, keepalive_interval=None)
        self.policy = FailoverPolicy([UpstreamSpec(u.name, u.entry.priority, u.entry.weight) for u in self.upstreams], config)
        self.probes = [
            Probe(
                u,
                self.policy,
                self.wake_policy,
                keepalive=keepalive,
                check_timeout=config.silence_timeout,
                containment=self.containment,
            )
            for u in self.upstreams
        ]
        self.probe_user = probe_user
        self.probe_password = probe_password
        if probe_user:
            self._set_probe_identity(probe_user, probe_password)
        self._rig_ids = itertools.count(1)
        self._rigs: dict[int, _RigConnection] = {}
        self._accepted_connections = 0
        self._active = 0
        self._closed: Counter[str] = Counter()
        self._totals: Counter[str] = Counter()
        self._rejected_by_reason: Counter[str] = Counter()
        self._accepted_difficulty = 0.0
        self.failover_history: deque[FailoverEvent] = deque(maxlen=FAILOVER_HISTORY)
        self._policy_wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.port: int | None = None
        # The first StratumRM link (what single-upstream callers and tests look at).
        self.link: StratumRMLink | None = next((u.link for u in self.upstreams if u.link is not None), None)

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
            await serve_admitted(self.containment.connections(self._handle, "rig connection"), listeners, self.admission)

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
            nursery.start_soon(probe.run)
        nursery.start_soon(self._run_policy)

    def wake_policy(self) -> None:
        self._policy_wake.set()

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
                    moved += rig.follow_goaway(upstream, old)
                await trio.sleep(0.1)
        failover_log.info("left the draining sidecar behind %s: %d rigs moved", upstream.name, moved)
        old.retire("moved to another sidecar after rm.goaway")

    def _set_probe_identity(self, user: str, password: str | None) -> None:
        for probe in self.probes:
            probe.set_identity(user, password)

    def learned_worker(self, user: str, password: str | None) -> None:
        """A rig authorized: the probes borrow the first worker name (pools see a real worker)."""
        if self.probes[0].identity is None:
            failover_log.info("probes authorize as %s (the first rig's worker name)", user)
            self._set_probe_identity(user, password)

    async def _run_policy(self) -> None:
        policy = self.policy
        while True:
            now = trio.current_time()
            deadline = policy.next_deadline(now)
            if deadline is None or deadline > now:
                self._policy_wake = trio.Event()
                with trio.move_on_at(math.inf if deadline is None else deadline):
                    await self._policy_wake.wait()
                continue
            actions = policy.on_timer(now)
            for event in policy.take_events():
                self.failover_history.append(
                    FailoverEvent(
                        at=datetime.now(UTC),
                        kind=event.kind,
                        message=event.message,
                        upstream=None if event.upstream is None else self.upstreams[event.upstream].name,
                    )
                )
                level = logging.WARNING if event.kind in ("detection", "outage", "release") else logging.INFO
                failover_log.log(level, "%s", event.message)
            for action in actions:
                kind = type(action)
                if kind is SendKeepalive:
                    assert self._nursery is not None
                    self._nursery.start_soon(self.probes[action.upstream].keepalive)
                elif kind is MoveRig:
                    rig = self._rigs.get(action.rig)
                    if rig is None:
                        policy.removed(action.rig)
                    else:
                        with self.containment.guard(rig.peer, "rig connection") as guard:
                            rig.move(action)
                        if guard.error is not None:
                            rig.abort()
                elif kind is ReleaseRigs:
                    for rig_id in action.rigs:
                        rig = self._rigs.get(rig_id)
                        if rig is not None:
                            with self.containment.guard(rig.peer, "rig connection") as guard:
                                rig.release(f"released: {action.reason}")
                            if guard.error is not None:
                                rig.abort()
            await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------ rigs

    async def _handle(self, stream: trio.SocketStream, pending: Pending) -> None:
        tune_stream(stream)
        peer = peer_name(stream)
        self._accepted_connections += 1
        self._active += 1
        channel = MinerChannel(submit_timeout=self.submit_timeout, drain_timeout=self.drain_timeout, max_line=MAX_LINE_FROM_MINER)
        rig_id = next(self._rig_ids)
        bind_connection(f"rig-{rig_id}", fresh=False)
        connection = _RigConnection(self, rig_id, channel, stream, peer, pending)
        self._rigs[rig_id] = connection
        reason = "proxy shutting down"
        try:
            with self.containment.guard(peer, "rig connection") as guard:
                reason = await connection.run()
            if guard.error is not None:
                reason = "internal error"
        finally:
            self._active -= 1
            self._rigs.pop(rig_id, None)
            self.policy.removed(rig_id)
            self.wake_policy()
            stats = channel.statistics()
            for name in ("submitted", "accepted", "rejected", "switches", "extranonce_changes", "reconnects_sent", "stale_local"):
                self._totals[name] += getattr(stats, name)
            self._totals["unconfirmed"] += stats.timed_out + stats.lost_upstream
            self._rejected_by_reason.update(stats.rejected_by_reason)
            self._accepted_difficulty += stats.accepted_difficulty
            self._closed[reason.split(":", 1)[0]] += 1
            await close_quietly(stream)
        log.info(
            "rig %s disconnected (%s); %d submitted, %d accepted, %d rejected",
            peer,
            reason,
            stats.submitted,
            stats.accepted,
            stats.rejected,
        )

    def statistics(self) -> ProxyStatistics:
        """Counters over every rig connection so far, open ones included."""
        totals = Counter(self._totals)
        rejected_by_reason = Counter(self._rejected_by_reason)
        accepted_difficulty = self._accepted_difficulty
        for rig in self._rigs.values():
            stats = rig.channel.statistics()
            for name in ("submitted", "accepted", "rejected", "switches", "extranonce_changes", "reconnects_sent", "stale_local"):
                totals[name] += getattr(stats, name)
            totals["unconfirmed"] += stats.timed_out + stats.lost_upstream
            rejected_by_reason.update(stats.rejected_by_reason)
            accepted_difficulty += stats.accepted_difficulty
        return ProxyStatistics(
            connections_accepted=self._accepted_connections,
            connections_active=self._active,
            closed_by_reason=dict(self._closed),
            submitted=totals["submitted"],
            accepted=totals["accepted"],
            rejected=totals["rejected"],
            unconfirmed=totals["unconfirmed"],
            switches=totals["switches"],
            extranonce_changes=totals["extranonce_changes"],
            reconnects_sent=totals["reconnects_sent"],
            stale_local=totals["stale_local"],
            failover=self.policy.statistics(trio.current_time()) if _in_trio() else None,
            admission=self.admission.statistics(),
            contained_errors=self.containment.errors,
            rejected_by_reason=dict(rejected_by_reason),
            accepted_difficulty=accepted_difficulty,
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
    __slots__ = ("leg", "scope", "session", "upstream")

    def __init__(self, leg: Leg, session: Session, upstream: Upstream) -> None:
        self.leg = leg
        self.session = session
        self.upstream = upstream
        self.scope = trio.CancelScope()


class _RigConnection:
    """The tasks of one rig connection."""

    __slots__ = (
        "_done",
        "_learned",
        "_miner_lock",
        "_moving",
        "_nursery",
        "_placing",
        "_wake_timer",
        "channel",
        "connected_at",
        "id",
        "legs",
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
        self.legs: dict[int, _LegTask] = {}  # id(leg) -> task
        self._miner_lock = trio.Lock()
        self._wake_timer = trio.Event()
        self._done = trio.Event()
        self._placing = False
        self._moving = False
        self._nursery: trio.Nursery | None = None
        self._learned = False
        self.connected_at = datetime.now(UTC)

    def status(self) -> RigStatus:
        channel = self.channel
        task = self.legs.get(id(channel.leg)) if channel.leg is not None else None
        return RigStatus(
            id=self.id,
            peer=self.peer,
            workers=list(channel.authorized_workers),
            upstream=None if task is None else task.upstream.name,
            connected_at=self.connected_at,
            shares=channel.statistics(),
        )

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
            self._nursery = None
            for task in list(self.legs.values()):
                await task.session.aclose()
            self.legs.clear()
        return channel.close_reason or "closed"

    def abort(self) -> None:
        """End this connection after a contained internal error."""
        self._finish("internal error")

    def _finish(self, reason: str | None = None) -> None:
        if reason is not None and self.channel.close_reason is None:
            self.channel.close_reason = reason
        self._done.set()

    async def _flush(self) -> None:
        async with self._miner_lock:
            data = self.channel.miner.data_to_send()
            if data:
                await self.stream.send_all(data)
        for task in list(self.legs.values()):
            try:
                await task.session.flush()
            except NETWORK_ERRORS:
                pass  # its reader sees the failure

    async def _step(self) -> None:
        """After feeding the channel: write, settle switches and legs, wake the timer, notice closing."""
        channel = self.channel
        proxy = self.proxy
        now = trio.current_time()
        for result in channel.take_switch_results():
            task = self.legs.get(id(result.leg))
            if task is None:
                continue
            if result.ok:
                proxy.policy.attached(self.id, task.upstream.index, now)
                log.debug("rig %s now on %s", self.peer, task.upstream.name)
            else:
                failover_log.info("rig %s: switch to %s failed: %s", self.peer, task.upstream.name, result.reason)
                proxy.policy.move_failed(self.id, task.upstream.index, result.reason, now)
            proxy.wake_policy()
        for user, error in channel.take_authorize_refusals():
            log.warning("rig %s: the upstream refused worker %r: %s", self.peer, user, explain_authorize_refusal(error))
        channel.retire_drained(now)
        for key, task in list(self.legs.items()):
            if task.leg.state == "gone":
                task.scope.cancel()
                del self.legs[key]
                self._spawn(task.session.aclose)
        if not self._learned and channel.authorized_workers:
            self._learned = True
            user, password = next(iter(channel.authorized_workers.items()))
            proxy.learned_worker(user, password)
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._finish(f"write failed: {exc}")
            return
        self._wake_timer.set()
        if channel.closed:
            self._finish()

    def _spawn(self, function, *args) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(function, *args)

    async def _read_rig(self) -> None:
        channel = self.channel
        while True:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._finish(channel.reconnect_reason or f"rig connection error: {exc}")
                return
            if not data:
                self._finish(channel.reconnect_reason or "rig closed the connection")
                return
            channel.miner_data(data, trio.current_time())
            if self.pending is not None and channel.wants_upstream:
                self.pending.established()  # its first Stratum request: no longer pending
                self.pending = None
            if channel.wants_upstream and not self._placing:
                self._placing = True
                self._place()
            await self._step()

    async def _opening_watchdog(self) -> None:
        await trio.sleep(self.proxy.opening_timeout)
        if not self.channel.wants_upstream:
            self._finish(f"idle: no Stratum request within {self.proxy.opening_timeout:g} s")

    # ------------------------------------------------------------ placement and moves

    def _place(self) -> None:
        proxy = self.proxy
        target = proxy.policy.assign(self.id, trio.current_time())
        if target is None:
            self.channel.upstream_lost("no upstream pool is usable", trio.current_time())
            return
        self._spawn(self._open_leg, proxy.upstreams[target], None)

    def move(self, action: MoveRig) -> None:
        """Execute the policy's decision to move this rig (called from the policy task)."""
        channel = self.channel
        proxy = self.proxy
        if channel.closed or channel.reconnecting or self._nursery is None:
            return
        target = proxy.upstreams[action.target]
        source = self._current_task()
        if source is not None and action.source is not None and proxy.policy.unreachable(action.source):
            # Its verdicts are not coming: answer the shares in flight now.
            reason = proxy.policy.down_reason(action.source) or "upstream down"
            channel.fail_leg(source.leg, f"{source.upstream.name} is down ({reason})", trio.current_time())
        if not channel.subscribed:
            if channel.leg is not None:
                # Still in its handshake on a live upstream: leave it there.
                proxy.policy.attached(self.id, self.legs[id(channel.leg)].upstream.index, trio.current_time())
                return
            self._spawn(self._open_leg, target, action)
        elif channel.extranonce_subscribed:
            self._spawn(self._open_leg, target, action)
        else:
            channel.request_reconnect(f"moving to {target.name}: {action.reason}", trio.current_time(), self._reconnect_params())
        self._spawn(self._step)

    def follow_goaway(self, upstream: Upstream, old: StratumRMLink) -> int:
        """Move off ``old`` (its sidecar is draining) to ``upstream``'s new link; 1 if a move began."""
        channel = self.channel
        task = self._current_task()
        if task is None or getattr(task.session, "link", None) is not old:
            return 0
        if channel.closed or channel.reconnecting or channel.switching or not channel.subscribed:
            return 0  # busy (a handshake or a move in progress): looked at again shortly
        self.move(MoveRig(self.id, upstream.index, upstream.index, "the sidecar is going away (rm.goaway)", urgent=True))
        return 1

    def release(self, reason: str) -> None:
        self.channel.release(reason)
        self._spawn(self._step)

    def _current_task(self) -> _LegTask | None:
        leg = self.channel.leg
        return None if leg is None else self.legs.get(id(leg))

    def _reconnect_params(self) -> list[Any]:
        """``[]`` ("this server again"); cpuminer ignores that and needs a host and port."""
        agent = (self.channel.miner.user_agent or "").lower()
        if not agent.startswith(("cpuminer", "minerd")):
            return []
        sock = socket_of(self.stream)
        try:
            host, port = sock.getsockname()[:2] if sock is not None else (None, None)
        except OSError:
            return []
        return [] if host is None else [host, port]

    async def _open_leg(self, upstream: Upstream, action: MoveRig | None) -> None:
        channel = self.channel
        proxy = self.proxy
        policy = proxy.policy
        try:
            session = await upstream.open_session(self.peer)
        except NETWORK_ERRORS as exc:
            detail = describe_error(exc)
            now = trio.current_time()
            failover_log.info("rig %s: cannot open a session on %s: %s", self.peer, upstream.name, detail)
            if self.proxy.probes[upstream.index].session is None and not policy.is_down(upstream.index):
                policy.lost(upstream.index, f"cannot connect: {detail}", now, connect_failed=True)
            policy.move_failed(self.id, upstream.index, detail, now)
            proxy.wake_policy()
            if not channel.subscribed and channel.leg is None and not any(policy.usable(u.index) for u in proxy.upstreams):
                # Nothing to offer a rig that has not even subscribed: release it now,
                # with the reason, so its own backup pool takes over.
                channel.upstream_lost(f"cannot connect to {upstream.url}: {detail}", now)
            await self._step()
            return
        if channel.closed:
            await session.aclose()
            return
        now = trio.current_time()
        if channel.leg is None and not channel.subscribed and not channel.switching and action is None:
            leg = channel.attach_upstream(session.session, now, key=upstream.index)
            policy.attached(self.id, upstream.index, now)
        else:
            leg = channel.switch_upstream(session.session, now, key=upstream.index)
        task = _LegTask(leg, session, upstream)
        self.legs[id(leg)] = task
        self._spawn(self._read_leg, task)
        await self._step()

    async def _read_leg(self, task: _LegTask) -> None:
        channel = self.channel
        proxy = self.proxy
        index = task.upstream.index
        with task.scope:
            while task.leg.state != "gone" and not channel.closed:
                try:
                    events = await task.session.receive()
                except NETWORK_ERRORS as exc:
                    events, reason = None, f"pool connection error: {describe_error(exc)}"
                else:
                    reason = "pool closed the connection"
                now = trio.current_time()
                if events is None:
                    was_current = task.leg is channel.leg
                    log.info("rig %s: upstream %s lost: %s", self.peer, task.upstream.name, reason)
                    channel.upstream_lost(reason, now, leg=task.leg, release=False)
                    if was_current:
                        proxy.policy.detached(self.id, reason, now)
                        proxy.wake_policy()
                    await self._step()
                    return
                proxy.policy.traffic(index, now)
                was_current = task.leg is channel.leg
                channel.upstream_events(events, now, leg=task.leg)
                if was_current and task.leg.state == "gone" and not channel.closed:
                    proxy.policy.detached(self.id, task.leg.failure or "upstream session ended", now)
                    proxy.wake_policy()
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


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
