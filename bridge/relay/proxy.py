"""The miner-side proxy's core, sans-IO: rigs, their upstream sessions, probes and failover.

:class:`ProxyCore` holds every decision the proxy makes; its trio driver
(:mod:`bridge.net.miner_proxy`) only moves bytes, keeps time and opens and closes
connections. The driver feeds :meth:`ProxyCore.handle` one *event* at a time with
the current time, and executes the *commands* it gets back, in order:

Events in
    :class:`RigConnected`, :class:`RigData`, :class:`RigClosed` (a rig's
    connection); :class:`LegOpened`, :class:`LegFailed`, :class:`LegEvents`,
    :class:`LegLost` (one upstream session of a rig, a *leg*, asked for with
    :class:`OpenLeg`); :class:`ProbeOpened`, :class:`ProbeFailed`,
    :class:`ProbeEvents`, :class:`ProbeLost`, :class:`KeepaliveResult`,
    :class:`PoolStatus` (the proxy's own session on each upstream, its *probe*);
    :class:`MoveToNewLink` (the sidecar behind a StratumRM upstream is draining);
    :class:`Timer`, due at :meth:`ProxyCore.get_timer` (an event core of
    :mod:`bridge.relay.contract`).

Commands out
    :class:`OpenLeg`, :class:`CloseLeg`, :class:`FlushLeg` (write what the core
    queued on a leg's session), :class:`WriteRig`, :class:`CloseRig`,
    :class:`RigEstablished` (the rig's first Stratum request, for admission
    control), :class:`FlushProbe`, :class:`CloseProbe`, :class:`CheckUpstream`
    (the keepalive: a fresh connection's subscribe, or the StratumRM link's own
    liveness), :class:`Log` and :class:`Notice` (what to log; notices are
    failover events for the history).

Inside, the core owns the :class:`~bridge.relay.failover.FailoverPolicy` (health
and placement), one :class:`~bridge.relay.miner_channel.MinerChannel` per rig, and
one :class:`~bridge.relay.health.ProbeReader` per upstream. A rig is placed when it
sends its first Stratum request; a policy's ``MoveRig`` becomes, for the rig: a
fresh session on the target opened transparently if the rig has not had its
subscribe result yet; a new session with the handshake replayed and
``mining.set_extranonce`` plus a clean job if the rig sent
``mining.extranonce.subscribe``; otherwise ``client.reconnect`` (see
:func:`reconnect_params`) and a close once its shares in flight have their
verdicts, after which the rig comes back and is placed on the target. When the
source upstream is declared down (lost, silent, pool down), its pending shares are
answered at once with explicit errors; when it is alive (fail-back, rebalance,
lag) they keep their verdict path.

A connection that says nothing Stratum within ``opening_timeout`` is closed with
that reason. Timers of every rig are kept in one heap, so the driver needs one
timer for the whole proxy.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
from msgspec import Struct

from bridge.relay.failover import (
    FailoverConfig,
    FailoverPolicy,
    MoveRig,
    PolicyEvent,
    ReleaseRigs,
    SendKeepalive,
    UpstreamSpec,
)
from bridge.relay.health import ProbeReader
from bridge.relay.miner_channel import Leg, MinerChannel, UpstreamSession
from bridge.sv1.framing import decode_json

__all__ = [
    "CheckUpstream",
    "CloseLeg",
    "CloseProbe",
    "CloseRig",
    "Command",
    "Event",
    "FlushLeg",
    "FlushProbe",
    "KeepaliveResult",
    "LegEvents",
    "LegFailed",
    "LegLost",
    "LegOpened",
    "Log",
    "MoveToNewLink",
    "Notice",
    "OpenLeg",
    "PoolStatus",
    "ProbeEvents",
    "ProbeFailed",
    "ProbeIdentity",
    "ProbeLost",
    "ProbeOpened",
    "ProxyCore",
    "ProxySettings",
    "ProxyUpstream",
    "RigClosed",
    "RigConnected",
    "RigData",
    "RigEstablished",
    "Timer",
    "WriteRig",
    "reconnect_params",
]

#: ckpool's limit for a line from a client; rigs never come close.
MAX_LINE_FROM_MINER = 4096
KEEPALIVES = ("subscribe", "ping", "none")


class ProxyUpstream(Struct, frozen=True):
    """One configured upstream as the core sees it."""

    name: str
    address: str
    """Its URL, for messages."""
    priority: int = 0
    weight: float = 1.0
    stratumrm: bool = False
    """A StratumRM sidecar (its link has its own liveness) rather than a plain SV1 pool."""


class ProxySettings(Struct, frozen=True, kw_only=True):
    submit_timeout: float = 60.0
    drain_timeout: float = 10.0
    opening_timeout: float = 10.0
    max_line: int = MAX_LINE_FROM_MINER
    keepalive: str = "subscribe"
    """How a quiet upstream proves it is alive: subscribe (a fresh connection's for SV1, the
    link's liveness for StratumRM), ping (``mining.ping`` on the probe), none."""
    failover: FailoverConfig = FailoverConfig()
    probe_agent: str = "stratumrm-probe"


# ------------------------------------------------------------------ events


class RigConnected(Struct, frozen=True):
    rig: int
    peer: str
    local_address: tuple[str, int] | None = None
    """The proxy's own address on this connection (what cpuminer must be told to reconnect to)."""


class RigData(Struct, frozen=True):
    rig: int
    data: bytes


class RigClosed(Struct, frozen=True):
    """The rig's connection ended (EOF, error), or the driver ends it (an internal error)."""

    rig: int
    reason: str


class LegOpened(Struct, frozen=True):
    rig: int
    leg: int
    session: Any
    """The leg's sans-IO upstream session (:class:`~bridge.relay.miner_channel.UpstreamSession`)."""


class LegFailed(Struct, frozen=True):
    rig: int
    leg: int
    detail: str


class LegEvents(Struct, frozen=True):
    rig: int
    leg: int
    events: list[Any]


class LegLost(Struct, frozen=True):
    rig: int
    leg: int
    reason: str


class ProbeOpened(Struct, frozen=True):
    upstream: int
    session: Any
    """The probe's sans-IO session (:class:`~bridge.relay.health.ProbeSession`)."""


class ProbeFailed(Struct, frozen=True):
    """The probe's session could not be opened."""

    upstream: int
    detail: str


class ProbeEvents(Struct, frozen=True):
    upstream: int
    events: list[Any]


class ProbeLost(Struct, frozen=True):
    """The probe's session ended (closed by the pool, a network error, or after :class:`CloseProbe`)."""

    upstream: int
    reason: str


class KeepaliveResult(Struct, frozen=True):
    """The outcome of a :class:`CheckUpstream`: alive, or why the check failed."""

    upstream: int
    alive: bool
    detail: str = ""


class PoolStatus(Struct, frozen=True):
    """The sidecar behind a StratumRM upstream says its pool is up or down (``rm.pool``)."""

    upstream: int
    up: bool
    detail: str


class MoveToNewLink(Struct, frozen=True):
    """Move ``rig`` to a fresh session on ``upstream`` (its sidecar sent ``rm.goaway``)."""

    rig: int
    upstream: int


class ProbeIdentity(Struct, frozen=True):
    """The worker name the probes authorize as (``--probe-user``); else the first rig's is used."""

    user: str
    password: str | None = None


class Timer(Struct, frozen=True):
    """:meth:`ProxyCore.get_timer` has come."""


Event = (
    RigConnected
    | RigData
    | RigClosed
    | LegOpened
    | LegFailed
    | LegEvents
    | LegLost
    | ProbeOpened
    | ProbeFailed
    | ProbeEvents
    | ProbeLost
    | KeepaliveResult
    | PoolStatus
    | MoveToNewLink
    | ProbeIdentity
    | Timer
)


# ------------------------------------------------------------------ commands


class OpenLeg(Struct, frozen=True):
    """Open a session for ``rig`` on ``upstream``; answer with :class:`LegOpened` or :class:`LegFailed`."""

    rig: int
    leg: int
    upstream: int


class CloseLeg(Struct, frozen=True):
    """Close this leg's session; the core has forgotten it."""

    rig: int
    leg: int


class FlushLeg(Struct, frozen=True):
    """Write what the leg's session has queued."""

    rig: int
    leg: int


class WriteRig(Struct, frozen=True):
    rig: int
    data: bytes


class CloseRig(Struct, frozen=True):
    """Close the rig's connection (after the writes before it); the core has forgotten the rig."""

    rig: int
    reason: str


class RigEstablished(Struct, frozen=True):
    """The rig sent its first Stratum request: no longer a pending connection for admission."""

    rig: int


class FlushProbe(Struct, frozen=True):
    upstream: int


class CloseProbe(Struct, frozen=True):
    """End the probe's session; then report :class:`ProbeLost` with this reason."""

    upstream: int
    reason: str


class CheckUpstream(Struct, frozen=True):
    """The keepalive: prove the SV1 ``upstream`` alive with one fresh connection's
    ``mining.subscribe`` (:class:`~bridge.relay.health.SubscribeCheck`) and report
    :class:`KeepaliveResult`. A StratumRM upstream gets none: its link judges its own
    liveness (:attr:`~bridge.relay.failover.UpstreamSpec.own_liveness`).
    """

    upstream: int


LogLevel = Literal["debug", "info", "warning"]


class Log(Struct, frozen=True):
    """A line for the log: ``failover`` lines go to the failover logger."""

    level: LogLevel
    message: str
    failover: bool = False


class Notice(Struct, frozen=True):
    """A failover event (detection, recovery, switch, outage, release) for the log and the history."""

    kind: str
    message: str
    upstream: int | None


Command = (
    OpenLeg | CloseLeg | FlushLeg | WriteRig | CloseRig | RigEstablished | FlushProbe | CloseProbe | CheckUpstream | Log | Notice
)


def reconnect_params(user_agent: str | None, local_address: tuple[str, int] | None) -> list[Any]:
    """The params of ``client.reconnect`` for a rig: ``[]`` means "this server again".

    cpuminer (and minerd, its old name) ignores an empty reconnect: it needs the
    host and port, which are the proxy's own address on the rig's connection.
    """
    agent = (user_agent or "").lower()
    if not agent.startswith(("cpuminer", "minerd")) or local_address is None:
        return []
    host, port = local_address
    return [host, port]


# ------------------------------------------------------------------ internals


class _LegRecord:
    __slots__ = ("leg", "upstream")

    def __init__(self, leg: Leg, upstream: int) -> None:
        self.leg = leg
        self.upstream = upstream


class _Rig:
    __slots__ = (
        "channel",
        "established",
        "id",
        "learned",
        "legs",
        "local_address",
        "opening",
        "opening_deadline",
        "peer",
        "placed",
        "scheduled",
    )

    def __init__(self, rig_id: int, channel: MinerChannel, peer: str, local: tuple[str, int] | None, deadline: float) -> None:
        self.id = rig_id
        self.channel = channel
        self.peer = peer
        self.local_address = local
        self.legs: dict[int, _LegRecord] = {}
        # leg id -> (upstream, is a move); None unless a leg is opening (an emptied dict keeps its table)
        self.opening: dict[int, tuple[int, bool]] | None = None
        self.placed = False
        self.established = False
        self.learned = False
        self.opening_deadline: float | None = deadline
        self.scheduled: float | None = None

    def take_opening(self, leg_id: int) -> tuple[int, bool] | None:
        opening = self.opening
        if opening is None:
            return None
        found = opening.pop(leg_id, None)
        if not opening:
            self.opening = None
        return found

    def record_of(self, leg: Leg | None) -> tuple[int, _LegRecord] | None:
        if leg is None:
            return None
        for key, record in self.legs.items():
            if record.leg is leg:
                return key, record
        return None


class _Probe:
    __slots__ = ("checks_failed", "connections", "keepalives", "open", "pool_up", "reader")

    def __init__(self, agent: str) -> None:
        self.reader = ProbeReader(agent)
        self.open = False
        self.pool_up = True
        self.connections = 0
        self.keepalives = 0
        self.checks_failed = 0


class ProxyCore:
    """Every decision of the miner-side proxy (see the module docs)."""

    def __init__(self, upstreams: Sequence[ProxyUpstream], settings: ProxySettings | None = None) -> None:
        self.settings = settings = settings or ProxySettings()
        if settings.keepalive not in KEEPALIVES:
            raise ValueError(f"keepalive must be one of subscribe, ping, none; got {settings.keepalive!r}")
        config = settings.failover
        if settings.keepalive == "none":
            config = msgspec.structs.replace(config, keepalive_interval=None)
        self.upstreams = list(upstreams)
        self.policy = FailoverPolicy(
            [UpstreamSpec(u.name, u.priority, u.weight, own_liveness=u.stratumrm) for u in self.upstreams], config
        )
        self.probes = [_Probe(settings.probe_agent) for _ in self.upstreams]
        self._rigs: dict[int, _Rig] = {}
        self._leg_ids = itertools.count(1)
        self._timers: list[tuple[float, int]] = []
        self._policy_deadline: float | None = None
        self._policy_touched = True
        self._out: list[Command] = []
        self._now = 0.0  # the time of the latest input

    # ------------------------------------------------------------------ queries

    def channel(self, rig: int) -> MinerChannel | None:
        entry = self._rigs.get(rig)
        return None if entry is None else entry.channel

    def rig_ids(self) -> list[int]:
        return list(self._rigs)

    def upstream_of(self, rig: int) -> int | None:
        """The upstream of the rig's current session (None while it has none)."""
        entry = self._rigs.get(rig)
        if entry is None:
            return None
        found = entry.record_of(entry.channel.leg)
        return None if found is None else found[1].upstream

    def current_leg(self, rig: int) -> int | None:
        """The id of the rig's current leg."""
        entry = self._rigs.get(rig)
        if entry is None:
            return None
        found = entry.record_of(entry.channel.leg)
        return None if found is None else found[0]

    def movable(self, rig: int) -> bool:
        """Not busy (in its handshake, a switch, a reconnect): a move can begin now."""
        entry = self._rigs.get(rig)
        if entry is None:
            return False
        channel = entry.channel
        return not (channel.closed or channel.reconnecting or channel.switching or not channel.subscribed)

    def probe_identity(self) -> tuple[str, str | None] | None:
        return self.probes[0].reader.identity

    def probe_open(self, upstream: int) -> bool:
        return self.probes[upstream].open

    def get_timer(self) -> float | None:
        """When :class:`Timer` is due (the time of the latest input or earlier: at once)."""
        if self._policy_touched:
            self._policy_deadline = self.policy.get_timer()
            self._policy_touched = False
        deadline = self._policy_deadline
        timers = self._timers
        while timers:
            at, rig_id = timers[0]
            entry = self._rigs.get(rig_id)
            if entry is None or entry.scheduled != at:
                heapq.heappop(timers)  # stale
                continue
            return at if deadline is None else min(at, deadline)
        return deadline

    # ------------------------------------------------------------------ input

    def handle(self, event: Event, now: float) -> list[Command]:
        """Feed one event; the commands to execute, in order."""
        self._now = max(self._now, now)
        match event:
            case RigData(rig, data):
                self._rig_data(rig, data, now)
            case LegEvents(rig, leg, events):
                self._leg_events(rig, leg, events, now)
            case Timer():
                self._timer(now)
            case RigConnected(rig, peer, local):
                self._rig_connected(rig, peer, local, now)
            case RigClosed(rig, reason):
                self._rig_closed(rig, reason, now)
            case LegOpened(rig, leg, session):
                self._leg_opened(rig, leg, session, now)
            case LegFailed(rig, leg, detail):
                self._leg_failed(rig, leg, detail, now)
            case LegLost(rig, leg, reason):
                self._leg_lost(rig, leg, reason, now)
            case ProbeOpened(upstream, session):
                self._probe_opened(upstream, session, now)
            case ProbeFailed(upstream, detail):
                self._touch()
                self.policy.lost(upstream, f"cannot connect: {detail}", now, connect_failed=True)
            case ProbeEvents(upstream, events):
                self._probe_events(upstream, events, now)
            case ProbeLost(upstream, reason):
                self._probe_lost(upstream, reason, now)
            case KeepaliveResult(upstream, alive, detail):
                self._keepalive_result(upstream, alive, detail, now)
            case PoolStatus(upstream, up, detail):
                self._pool_status(upstream, up, detail, now)
            case MoveToNewLink(rig, upstream):
                self._move_to_new_link(rig, upstream, now)
            case ProbeIdentity(user, password):
                self._set_identity(user, password)
        return self._take()

    def _take(self) -> list[Command]:
        out, self._out = self._out, []
        return out

    def _touch(self) -> None:
        self._policy_touched = True

    def _log(self, level: LogLevel, message: str, *, failover: bool = False) -> None:
        self._out.append(Log(level, message, failover))

    # ------------------------------------------------------------------ rigs

    def _rig_connected(self, rig_id: int, peer: str, local: tuple[str, int] | None, now: float) -> None:
        settings = self.settings
        channel = MinerChannel(
            submit_timeout=settings.submit_timeout, drain_timeout=settings.drain_timeout, max_line=settings.max_line
        )
        entry = _Rig(rig_id, channel, peer, local, now + settings.opening_timeout)
        self._rigs[rig_id] = entry
        self._schedule(entry)

    def _rig_data(self, rig_id: int, data: bytes, now: float) -> None:
        entry = self._rigs.get(rig_id)
        if entry is None:
            return
        channel = entry.channel
        channel.miner_data(data, now)
        if channel.wants_upstream:
            entry.opening_deadline = None
            if not entry.established:
                entry.established = True
                self._out.append(RigEstablished(rig_id))
            if not entry.placed and not channel.closed:
                entry.placed = True
                self._place(entry, now)
        self._settle(entry, now)

    def _rig_closed(self, rig_id: int, reason: str, now: float) -> None:
        entry = self._rigs.get(rig_id)
        if entry is None:
            return
        channel = entry.channel
        if channel.close_reason is None:
            channel.release(channel.reconnect_reason or reason)
        self._settle(entry, now)

    def _place(self, entry: _Rig, now: float) -> None:
        self._touch()
        target = self.policy.assign(entry.id, now)
        if target is None:
            entry.channel.upstream_lost("no upstream pool is usable", now)
            return
        self._open_leg(entry, target, move=False)

    def _open_leg(self, entry: _Rig, upstream: int, *, move: bool) -> None:
        leg = next(self._leg_ids)
        if entry.opening is None:
            entry.opening = {}
        entry.opening[leg] = (upstream, move)
        self._out.append(OpenLeg(entry.id, leg, upstream))

    def _leg_opened(self, rig_id: int, leg_id: int, session: UpstreamSession, now: float) -> None:
        entry = self._rigs.get(rig_id)
        opening = None if entry is None else entry.take_opening(leg_id)
        if entry is None or opening is None:
            self._out.append(CloseLeg(rig_id, leg_id))
            return
        upstream, move = opening
        channel = entry.channel
        if channel.leg is None and not channel.subscribed and not channel.switching and not move:
            leg = channel.attach_upstream(session, now, key=upstream)
            self._touch()
            self.policy.attached(entry.id, upstream, now)
        else:
            leg = channel.switch_upstream(session, now, key=upstream)
        entry.legs[leg_id] = _LegRecord(leg, upstream)
        self._settle(entry, now)

    def _leg_failed(self, rig_id: int, leg_id: int, detail: str, now: float) -> None:
        entry = self._rigs.get(rig_id)
        opening = None if entry is None else entry.take_opening(leg_id)
        if entry is None or opening is None:
            return
        upstream, _ = opening
        policy = self.policy
        self._touch()
        self._log("info", f"rig {entry.peer}: cannot open a session on {self.upstreams[upstream].name}: {detail}", failover=True)
        if not self.probes[upstream].open and not policy.is_down(upstream):
            policy.lost(upstream, f"cannot connect: {detail}", now, connect_failed=True)
        policy.move_failed(entry.id, upstream, detail, now)
        channel = entry.channel
        if (
            not channel.subscribed
            and channel.leg is None
            and not entry.opening
            and not any(policy.usable(i) for i in range(len(self.upstreams)))
        ):
            # Nothing to offer a rig that has not even subscribed: release it now,
            # with the reason, so its own backup pool takes over.
            channel.upstream_lost(f"cannot connect to {self.upstreams[upstream].address}: {detail}", now)
        self._settle(entry, now)

    def _leg_events(self, rig_id: int, leg_id: int, events: list[Any], now: float) -> None:
        entry = self._rigs.get(rig_id)
        record = None if entry is None else entry.legs.get(leg_id)
        if entry is None or record is None:
            return
        channel = entry.channel
        leg = record.leg
        if self.policy.is_down(record.upstream):
            self._touch()  # a silent upstream speaking again is a recovery: the policy has work now
        self.policy.traffic(record.upstream, now)  # otherwise it only moves deadlines later
        was_current = leg is channel.leg
        channel.upstream_events(events, now, leg=leg)
        if was_current and leg.state == "gone" and not channel.closed:
            self._touch()
            self.policy.detached(entry.id, leg.failure or "upstream session ended", now)
        self._settle(entry, now)

    def _leg_lost(self, rig_id: int, leg_id: int, reason: str, now: float) -> None:
        entry = self._rigs.get(rig_id)
        record = None if entry is None else entry.legs.get(leg_id)
        if entry is None or record is None:
            return
        channel = entry.channel
        was_current = record.leg is channel.leg
        self._log("info", f"rig {entry.peer}: upstream {self.upstreams[record.upstream].name} lost: {reason}")
        channel.upstream_lost(reason, now, leg=record.leg, release=False)
        if was_current:
            self._touch()
            self.policy.detached(entry.id, reason, now)
        self._settle(entry, now)

    def _settle(self, entry: _Rig, now: float) -> None:
        """After feeding a rig's channel: report switches, retire legs, write, notice closing, reschedule."""
        channel = entry.channel
        policy = self.policy
        for result in channel.take_switch_results():
            found = entry.record_of(result.leg)
            if found is None:
                continue
            upstream = found[1].upstream
            self._touch()
            if result.ok:
                policy.attached(entry.id, upstream, now)
                self._log("debug", f"rig {entry.peer} now on {self.upstreams[upstream].name}")
            else:
                self._log(
                    "info", f"rig {entry.peer}: switch to {self.upstreams[upstream].name} failed: {result.reason}", failover=True
                )
                policy.move_failed(entry.id, upstream, result.reason or "switch failed", now)
        for user, error in channel.take_authorize_refusals():
            self._log("warning", f"rig {entry.peer}: the upstream refused worker {user!r}: {explain_authorize_refusal(error)}")
        channel.retire_drained(now)
        for key, record in list(entry.legs.items()):
            if record.leg.state == "gone":
                del entry.legs[key]
                if not entry.legs:
                    entry.legs = {}  # a fresh one: an emptied dict keeps its table
                self._out.append(CloseLeg(entry.id, key))
        if not entry.learned and channel.authorized_workers:
            entry.learned = True
            user, password = next(iter(channel.authorized_workers.items()))
            if self.probes[0].reader.identity is None:
                self._log("info", f"probes authorize as {user} (the first rig's worker name)", failover=True)
                self._set_identity(user, password)
        data = channel.miner.data_to_send()
        if data:
            self._out.append(WriteRig(entry.id, data))
        for key in entry.legs:
            self._out.append(FlushLeg(entry.id, key))
        if channel.closed:
            self._forget(entry)
            return
        self._schedule(entry)

    def _set_identity(self, user: str, password: str | None) -> None:
        for index, probe in enumerate(self.probes):
            if probe.reader.set_identity(user, password):
                self._out.append(FlushProbe(index))

    def _forget(self, entry: _Rig) -> None:
        for key in entry.legs:
            self._out.append(CloseLeg(entry.id, key))
        entry.legs = {}
        entry.opening = None
        self._out.append(CloseRig(entry.id, entry.channel.close_reason or "closed"))
        del self._rigs[entry.id]
        self._touch()
        self.policy.removed(entry.id)

    def _schedule(self, entry: _Rig) -> None:
        deadline = entry.channel.get_timer()
        opening = entry.opening_deadline
        if opening is not None and (deadline is None or opening < deadline):
            deadline = opening
        # One live heap entry per rig: a later deadline keeps the earlier entry (when it
        # fires, nothing is due yet and the rig is scheduled again), so the heap holds
        # about one entry per rig however often deadlines move.
        if deadline is not None and (entry.scheduled is None or deadline < entry.scheduled):
            entry.scheduled = deadline
            heapq.heappush(self._timers, (deadline, entry.id))

    # ------------------------------------------------------------------ moves

    def _move(self, action: MoveRig, now: float) -> None:
        entry = self._rigs.get(action.rig)
        policy = self.policy
        self._touch()
        if entry is None:
            policy.removed(action.rig)
            return
        channel = entry.channel
        if channel.reconnecting:
            return  # leaving already; it comes back and is placed
        target = self.upstreams[action.target]
        source = entry.record_of(channel.leg)
        if source is not None and action.source is not None and policy.unreachable(action.source):
            # Its verdicts are not coming: answer the shares in flight now.
            reason = policy.down_reason(action.source) or "upstream down"
            channel.fail_leg(source[1].leg, f"{self.upstreams[source[1].upstream].name} is down ({reason})", now)
        if not channel.subscribed:
            current = entry.record_of(channel.leg)
            if current is not None:
                # Still in its handshake on a live upstream: leave it there.
                policy.attached(entry.id, current[1].upstream, now)
            else:
                self._open_leg(entry, action.target, move=True)
        elif channel.extranonce_subscribed:
            self._open_leg(entry, action.target, move=True)
        else:
            params = reconnect_params(channel.miner.user_agent, entry.local_address)
            channel.request_reconnect(f"moving to {target.name}: {action.reason}", now, params)
        self._settle(entry, now)

    def _move_to_new_link(self, rig: int, upstream: int, now: float) -> None:
        if self.movable(rig):
            self._move(MoveRig(rig, upstream, upstream, "the sidecar is going away (rm.goaway)", urgent=True), now)

    # ------------------------------------------------------------------ probes

    def _probe_opened(self, upstream: int, session: Any, now: float) -> None:
        probe = self.probes[upstream]
        probe.open = True
        probe.connections += 1
        probe.reader.opened(session)
        self._out.append(FlushProbe(upstream))

    def _probe_events(self, upstream: int, events: list[Any], now: float) -> None:
        probe = self.probes[upstream]
        policy = self.policy
        self._touch()
        policy.traffic(upstream, now)
        reading = probe.reader.receive(events)
        if reading.subscribed:
            policy.connected(upstream, now)
        for prevhash in reading.prevhashes:
            policy.job(upstream, prevhash, now)
        if reading.refused_worker is not None:
            identity = probe.reader.identity
            self._log(
                "warning",
                f"probe on {self.upstreams[upstream].name}: worker {identity[0] if identity else ''!r} not authorized "
                f"({reading.refused_worker}); health is still measured",
                failover=True,
            )
        if reading.end is not None:
            self._out.append(CloseProbe(upstream, reading.end))
        else:
            self._out.append(FlushProbe(upstream))

    def _probe_lost(self, upstream: int, reason: str, now: float) -> None:
        probe = self.probes[upstream]
        subscribed = probe.reader.subscribed
        probe.open = False
        probe.reader.closed()
        self._touch()
        self.policy.lost(upstream, reason, now, connect_failed=not subscribed)

    def _keepalive_result(self, upstream: int, alive: bool, detail: str, now: float) -> None:
        probe = self.probes[upstream]
        if alive:
            self._touch()
            self.policy.traffic(upstream, now)
        else:
            probe.checks_failed += 1
            self._log("info", f"probe on {self.upstreams[upstream].name}: keepalive check failed: {detail}", failover=True)

    def _pool_status(self, upstream: int, up: bool, detail: str, now: float) -> None:
        probe = self.probes[upstream]
        if up == probe.pool_up:
            return
        probe.pool_up = up
        self._touch()
        self.policy.pool_status(upstream, up, f"{detail or 'the sidecar cannot reach its pool'} (rm.pool from the sidecar)", now)

    def _keepalive(self, upstream: int) -> None:
        probe = self.probes[upstream]
        if not probe.open:
            return
        self._out.append(FlushProbe(upstream))  # an authorize queued since goes out now at the latest
        if self.settings.keepalive == "ping":
            if probe.reader.ping():
                probe.keepalives += 1
                self._out.append(FlushProbe(upstream))
            return
        probe.keepalives += 1
        self._out.append(CheckUpstream(upstream))

    # ------------------------------------------------------------------ time

    def _timer(self, now: float) -> None:
        policy = self.policy
        self._touch()  # the cached deadline may be an early one: look again after this
        deadline = policy.get_timer()
        if deadline is not None and deadline <= now:
            policy.handle_timer(now)
            for action in policy.take_actions():
                if isinstance(action, SendKeepalive):
                    self._keepalive(action.upstream)
                elif isinstance(action, MoveRig):
                    self._move(action, now)
                elif isinstance(action, ReleaseRigs):
                    for rig_id in action.rigs:
                        entry = self._rigs.get(rig_id)
                        if entry is not None:
                            entry.channel.release(f"released: {action.reason}")
                            self._settle(entry, now)
            for event in policy.take_events():
                self._notice(event)
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, rig_id = heapq.heappop(timers)
            entry = self._rigs.get(rig_id)
            if entry is None or entry.scheduled != at:
                continue
            entry.scheduled = None
            if entry.opening_deadline is not None and now >= entry.opening_deadline and not entry.channel.wants_upstream:
                entry.channel.release(f"idle: no Stratum request within {self.settings.opening_timeout:g} s")
            else:
                entry.channel.handle_timer(now)
            self._settle(entry, now)

    def _notice(self, event: PolicyEvent) -> None:
        self._out.append(Notice(event.kind, event.message, event.upstream))


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
