"""Upstream failover policy of the miner-side proxy, sans-IO.

:class:`FailoverPolicy` decides, for an ordered list of upstreams (pools, or
StratumRM sidecars), which upstreams are healthy, which one each rig should be
on, when and how fast rigs move, and what happens to rigs when no upstream is
usable. It reads no clock and does no I/O: the proxy core
(:class:`bridge.relay.proxy.ProxyCore`, which owns it) reports what it
sees with the current time ``now``, calls :meth:`FailoverPolicy.handle_timer` at
:meth:`~FailoverPolicy.get_timer` (the contract in :mod:`bridge.relay.contract`),
and executes the actions :meth:`~FailoverPolicy.take_actions` gives back.

Health
======

Each upstream has a **probe session** owned by the proxy: a connection (for
StratumRM, a channel on the shared link) that subscribes from the proxy's start
(no worker name needed) and authorizes once as the first rig's worker name (or
``--probe-user``) when one is known, so the pool sees an ordinary worker. It
exists to measure: jobs and their prevhash, traffic, and proof of life when asked.
The core reports :meth:`~FailoverPolicy.connected`
(subscribe result), :meth:`~FailoverPolicy.job` (a ``mining.notify`` and its
prevhash), :meth:`~FailoverPolicy.traffic` (any line from any session of the
upstream, rigs' included), :meth:`~FailoverPolicy.lost` (connection refused,
reset, closed, TLS failure, StratumRM link dead) and
:meth:`~FailoverPolicy.pool_status` (the sidecar's ``rm.pool``). An upstream is
**down**, with a reason that is logged and counted, when:

- ``connect failed`` / ``connection lost``: the probe connection could not be
  opened or broke (the RST case);
- ``silent``: nothing at all came from the upstream for ``silence_timeout``
  (default 5 s) although it was asked. SV1 has no heartbeat and pools are quiet
  by nature (a notify every 30 s), so silence is only meaningful when the proxy
  *elicits* traffic: after ``keepalive_interval`` (``silence_timeout / 3``) of
  quiet, the core is asked for a keepalive, which must be something every pool
  answers without complaint (bridge/relay/health.py): a fresh connection's
  ``mining.subscribe`` for plain SV1 (cgminer's pool test). Never ``mining.authorize`` again: ckpool
  never answers a second one (and logs "trying to authorise twice"), nor
  ``mining.ping`` or unknown methods from a client, so a healthy pool would look silent. With
  keepalives off (``keepalive_interval=None``) the silence rule is off too and
  only loss, missing jobs and lag remain. A TCP-level probe would not do: a
  stalled pool process (or a stalled relay in between) still has its kernel ACK
  every segment. A StratumRM upstream (:attr:`UpstreamSpec.own_liveness`) is never
  silent here: its link has ``rm.ping``/``dead_after`` with the busy-peer rules and
  ends when the sidecar is gone (``connection lost``);
- ``no jobs``: connected but no ``mining.notify`` for ``job_timeout`` (90 s,
  cgminer's silence bound; pools send one at least every 60 s);
- ``lagging``: another upstream moved past this one's block (it announced a new
  prevhash after having announced this one's current prevhash) ``lag_delay``
  seconds ago (default 5 s) and this one still has not announced it: rigs on it
  hash stale work. Two upstreams are compared only once they have shared a
  prevhash, so pools on different chains never count as lagging, and a fork
  (each side has a block the other lacks, neither moved past the other) is not
  lag either;
- ``pool down``: the sidecar reports that the pool behind it is unreachable.

An upstream is **up** once its probe is connected and has had a job since it
connected, and none of the above holds. Before the probe's first result an
upstream that never failed is *presumed* usable, so the first
rigs are placed at once; a failed first connection is itself a detection.

Placement
=========

- **Eligible upstreams.** Candidates are upstreams that are up (or presumed).
  One that came back after a failure is in **hold-down** for ``hold_down``
  seconds (default 120 s, cgminer's ``--fallback-time``): it is used only when
  nothing else is. ``failover`` (default): the first priority level with an
  eligible upstream; ``weighted``: every eligible upstream of positive weight,
  whatever its level (weight 0 marks a backup used only when none of them is).
- **Share per upstream.** Rigs are split across the eligible set in proportion
  to the weights (largest remainder); a new rig goes to the upstream furthest
  below its share (deficit assignment, a deficit round robin over rig counts).
- **Moves.** Rigs whose upstream is down or gone (*urgent*), rigs on an upstream
  that is no longer eligible (fail-back, after hold-down), and the excess of an
  upstream over its share (gentle rebalance) are moved to the upstreams furthest
  below theirs. Moves are paced by a token bucket, ``switch_rate`` rigs per
  second in bursts of ``switch_burst``, urgent ones first, so a farm of
  hundreds of rigs does not stampede the backup.
  A rig whose session died waits ``settle`` seconds (50 ms) before it is placed:
  when a pool dies every connection to it breaks at once, and the probe's own
  loss decides the upstream's fate before the orphans are re-homed.
- **No upstream usable.** ``disconnect`` (default): after
  ``no_upstream_grace`` seconds (5 s) every rig is released (its connection
  closed) so its own backup pools take over, as cgminer's failover expects, and rigs that connect meanwhile are released at once;
  ``keep``: rigs stay connected on their last job until an upstream is back.

How a move reaches the rig (``mining.set_extranonce`` or ``client.reconnect``)
is the proxy core's and the miner channel's business; this module only says who
goes where, when.

Why rigs' own sessions on the backup are opened at switch time, not kept open in
advance: opening one (connect, subscribe, authorize) costs two round trips, and for
StratumRM a channel on the warm link costs one. A failover's time is detection
(right after a RST, up to ``silence_timeout`` after a blackhole) plus the pacing of
the moves; ``stratumrm bench failover`` prints both. An idle session per rig per
standby would double the connections every pool sees to save those round trips; the
probe already keeps each standby connected, authorized and known to send jobs, and
keeps StratumRM links open.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence

from msgspec import Struct

from bridge.bounded import BoundedMap
from bridge.errors import ConfigError

PREVHASHES_KEPT = 32
"""Prevhashes remembered per upstream for lag detection."""
MOVE_RETRY = 1.0
"""Seconds before a rig whose move failed is tried again (the target still looks healthy)."""
# A token bucket refilled by the float ``elapsed * rate`` can land a hair under 1.0 at
# the very deadline computed to fill it; a clock that stops there (a test's virtual
# clock) would then wake the driver forever without a move.
_TOKEN_ROUNDING = 1e-9


class Strategy(enum.StrEnum):
    FAILOVER = "failover"
    WEIGHTED = "weighted"


class NoUpstreamPolicy(enum.StrEnum):
    DISCONNECT = "disconnect"
    KEEP = "keep"


class Reason(enum.StrEnum):
    """Why an upstream counts as down (the detection counters are keyed by these)."""

    CONNECT_FAILED = "connect failed"
    CONNECTION_LOST = "connection lost"
    SILENT = "silent"
    NO_JOBS = "no jobs"
    LAGGING = "lagging"
    POOL_DOWN = "pool down"


_UNREACHABLE = frozenset({Reason.CONNECT_FAILED, Reason.CONNECTION_LOST, Reason.SILENT, Reason.POOL_DOWN})


class State(enum.StrEnum):
    UNKNOWN = "unknown"
    """No probe result yet; presumed usable if it never failed."""
    STARTING = "starting"
    """Probe connected, no job yet."""
    UP = "up"
    DOWN = "down"


class FailoverConfig(Struct, frozen=True, kw_only=True):
    """The knobs of :class:`FailoverPolicy`; every default is documented in the module."""

    strategy: Strategy = Strategy.FAILOVER
    silence_timeout: float = 5.0
    keepalive_interval: float | None = -1.0
    """Quiet seconds before a keepalive; -1 means ``silence_timeout / 3``, None turns keepalives
    (and the silence rule) off."""
    job_timeout: float = 90.0
    lag_delay: float = 5.0
    hold_down: float = 120.0
    switch_rate: float = 500.0
    switch_burst: int = 25
    settle: float = 0.05
    no_upstream: NoUpstreamPolicy = NoUpstreamPolicy.DISCONNECT
    no_upstream_grace: float = 5.0

    def __post_init__(self) -> None:
        for name in ("silence_timeout", "job_timeout", "lag_delay", "switch_rate"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("hold_down", "settle", "no_upstream_grace"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)!r}")
        if self.switch_burst < 1:
            raise ConfigError(f"switch_burst must be at least 1, got {self.switch_burst}")
        interval = self.keepalive_interval
        if interval is not None and interval != -1.0 and not 0 < interval < self.silence_timeout:
            raise ConfigError(
                f"keepalive_interval must be between 0 and silence_timeout ({self.silence_timeout:g} s), got {interval!r}"
            )

    @property
    def keepalive(self) -> float | None:
        """Seconds of quiet before a keepalive (None: no keepalives, no silence rule)."""
        if self.keepalive_interval == -1.0:
            return self.silence_timeout / 3
        return self.keepalive_interval


class UpstreamSpec(Struct, frozen=True):
    """An upstream as the policy sees it: a name for logs, a priority level, a weight."""

    name: str
    priority: int = 0
    """Lower is preferred; upstreams of one level share the rigs by weight."""
    weight: float = 1.0
    own_liveness: bool = False
    """Its transport judges silence itself (a StratumRM link: ``rm.ping``, ``dead_after`` and
    the busy-peer rules of PROTOCOL.md C8) and ends when the peer is gone (``connection
    lost``): the policy sends it no keepalive and never calls it silent, so a sidecar the
    link knows to be busy is not failed over by a cruder second rule."""


# ------------------------------------------------------------------ actions and events


class SendKeepalive(Struct, frozen=True):
    """Send the keepalive request on the probe session of ``upstream``."""

    upstream: int


class MoveRig(Struct, frozen=True):
    """Move ``rig`` from ``source`` (None: it has no live session) to ``target``.

    Report the outcome with :meth:`FailoverPolicy.attached`,
    :meth:`~FailoverPolicy.move_failed` or :meth:`~FailoverPolicy.removed`.
    """

    rig: int
    source: int | None
    target: int
    reason: str
    urgent: bool


class ReleaseRigs(Struct, frozen=True):
    """Close these rigs' connections (no upstream usable, ``disconnect`` policy)."""

    rigs: tuple[int, ...]
    reason: str


Action = SendKeepalive | MoveRig | ReleaseRigs


class PolicyEvent(Struct, frozen=True):
    """Something to log: ``kind`` is detection, recovery, switch, outage or release."""

    kind: str
    message: str
    upstream: int | None = None
    reason: str | None = None


# ------------------------------------------------------------------ statistics


class UpstreamStatus(Struct, frozen=True):
    name: str
    priority: int
    weight: float
    state: str
    reason: str | None
    rigs: int
    healthy_for: float | None
    in_hold_down: bool
    prevhash: str | None
    detections: dict[str, int]


class FailoverStatistics(Struct, frozen=True):
    strategy: str
    upstreams: list[UpstreamStatus]
    detections: dict[str, int]
    """Detections by reason, every upstream: one each time an upstream goes down, or the
    reason it is down changes (reset, then its reconnection refused, counts twice)."""
    switches: dict[str, int]
    """Rig moves by kind: failover (urgent), failback, rebalance."""
    moves_failed: int
    released: int
    outages: int


# ------------------------------------------------------------------ internals


class _Upstream:
    __slots__ = (
        "connected",
        "connected_at",
        "detail",
        "detections",
        "failed_before",
        "first_keepalive_at",
        "healthy_since",
        "hold_done",
        "index",
        "job_since_connect",
        "keepalive_at",
        "kind",
        "last_job",
        "last_rx",
        "lost_detail",
        "lost_kind",
        "pool_down",
        "probing",
        "seen",
        "spec",
        "state",
        "tip",
    )

    def __init__(self, index: int, spec: UpstreamSpec) -> None:
        self.index = index
        self.spec = spec
        self.probing = False
        self.connected = False
        self.lost_kind: Reason | None = None
        self.lost_detail: str | None = None
        self.last_rx: float | None = None
        self.last_job: float | None = None
        self.job_since_connect = False
        self.tip: str | None = None
        self.seen: BoundedMap[str, float] = BoundedMap(PREVHASHES_KEPT)
        self.pool_down: str | None = None
        self.keepalive_at: float | None = None
        #: The first keepalive sent since ``last_rx``: silence is judged from it, so an
        #: upstream is never declared silent before a keepalive had its time to answer.
        self.first_keepalive_at: float | None = None
        self.state = State.UNKNOWN
        self.kind: Reason | None = None
        self.detail: str | None = None
        self.healthy_since: float | None = None
        self.failed_before = False
        self.detections: Counter[str] = Counter()
        self.connected_at: float | None = None
        self.hold_done = True

    @property
    def name(self) -> str:
        return self.spec.name


class _Placement:
    """How many rigs each upstream has and which rigs have none, kept as rigs move, so the
    policy does not count every rig each time it looks (O(rigs) per event is O(rigs²) in a storm)."""

    __slots__ = ("counts", "orphans")

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.orphans: set[int] = set()

    def move(self, rig_id: int, old: int | None, new: int | None) -> None:
        if old is None:
            self.orphans.discard(rig_id)
        else:
            self.counts[old] -= 1
        if new is None:
            self.orphans.add(rig_id)
        else:
            self.counts[new] += 1


class _Rig:
    __slots__ = ("_upstream", "id", "moving", "placement", "retry_at")

    def __init__(self, rig_id: int, upstream: int | None, placement: _Placement) -> None:
        self.id = rig_id
        self.placement = placement
        self._upstream: int | None = None
        placement.orphans.add(rig_id)
        self.upstream = upstream
        self.moving = False
        self.retry_at = 0.0

    @property
    def upstream(self) -> int | None:
        """Where it is, or is going; None: orphaned."""
        return self._upstream

    @upstream.setter
    def upstream(self, upstream: int | None) -> None:
        self.placement.move(self.id, self._upstream, upstream)
        self._upstream = upstream

    def forget(self) -> None:
        self.placement.move(self.id, self._upstream, None)
        self.placement.orphans.discard(self.id)


class FailoverPolicy:
    """Health of every upstream and the placement of every rig (see the module docs)."""

    def __init__(self, upstreams: Sequence[UpstreamSpec], config: FailoverConfig | None = None) -> None:
        if not upstreams:
            raise ConfigError("at least one upstream is needed")
        self.config = config or FailoverConfig()
        self.upstreams = [_Upstream(i, spec) for i, spec in enumerate(upstreams)]
        self._rigs: dict[int, _Rig] = {}
        self._placement = _Placement()
        self._tokens = float(self.config.switch_burst)
        self._refilled: float | None = None
        self._dirty = True
        self._events: list[PolicyEvent] = []
        self._outage_since: float | None = None
        self._released_outage = False
        self._outages = 0
        self._released = 0
        self._switches: Counter[str] = Counter()
        self._moves_failed = 0
        self._wanted_moves = False
        self._nothing_eligible = False
        self._now = 0.0  # the time of the latest input or timer
        self._actions: list[Action] = []

    # ------------------------------------------------------------------ reports

    def connected(self, upstream: int, now: float) -> None:
        """The probe session of ``upstream`` got its subscribe result."""
        self._now = now
        up = self.upstreams[upstream]
        up.probing = True
        up.connected = True
        up.job_since_connect = False
        up.last_rx = up.connected_at = now
        up.keepalive_at = None
        up.lost_kind = up.lost_detail = None
        self._refresh(now)

    def lost(self, upstream: int, detail: str, now: float, *, connect_failed: bool = False) -> None:
        """The probe session (or the StratumRM link) of ``upstream`` failed or could not connect."""
        self._now = now
        up = self.upstreams[upstream]
        up.probing = True
        up.connected = False
        up.lost_kind = Reason.CONNECT_FAILED if connect_failed else Reason.CONNECTION_LOST
        up.lost_detail = detail
        self._refresh(now)

    def traffic(self, upstream: int, now: float) -> None:
        """A line came from ``upstream`` on any of its sessions."""
        self._now = now
        up = self.upstreams[upstream]
        up.last_rx = now
        if up.state is State.DOWN and up.kind is Reason.SILENT:
            self._refresh(now)

    def job(self, upstream: int, prevhash: str, now: float) -> None:
        """The probe session of ``upstream`` received a ``mining.notify``."""
        self._now = now
        up = self.upstreams[upstream]
        up.last_rx = up.last_job = now
        up.job_since_connect = True
        if prevhash != up.tip:
            up.tip = prevhash
            if prevhash not in up.seen:
                up.seen[prevhash] = now
        self._refresh(now)

    def keepalive_sent(self, upstream: int, now: float) -> None:
        self._now = now
        self.upstreams[upstream].keepalive_at = now

    def pool_status(self, upstream: int, up_now: bool, detail: str, now: float) -> None:
        """The sidecar says the pool behind it is reachable (or not)."""
        self._now = now
        self.upstreams[upstream].pool_down = None if up_now else (detail or "the sidecar lost the pool")
        self._refresh(now)

    # ------------------------------------------------------------------ rigs

    def assign(self, rig: int, now: float) -> int | None:
        """Where a new rig goes; None: release it (nothing usable, ``disconnect`` policy)."""
        self._now = now
        self._refresh(now)
        target = self._place(self._eligible(now))
        if target is None:
            if self.config.no_upstream is NoUpstreamPolicy.DISCONNECT:
                return None
            target = min(self.upstreams, key=lambda u: (u.spec.priority, u.index)).index
        self._add(rig, target)
        return target

    def attached(self, rig: int, upstream: int, now: float) -> None:
        """The rig's live session is now on ``upstream`` (first attach, or a move done)."""
        self._now = now
        entry = self._rigs.get(rig)
        if entry is None:
            entry = self._add(rig, upstream)
        entry.upstream = upstream
        entry.moving = False
        self._dirty = True

    def detached(self, rig: int, reason: str, now: float) -> None:
        """The rig's session on its upstream is gone; the rig is still connected."""
        self._now = now
        entry = self._rigs.get(rig)
        if entry is None:
            return
        entry.upstream = None
        entry.moving = False
        entry.retry_at = now + self.config.settle
        self._dirty = True

    def move_failed(self, rig: int, upstream: int, reason: str, now: float) -> None:
        """Opening the rig's session on ``upstream`` failed."""
        self._now = now
        self._moves_failed += 1
        entry = self._rigs.get(rig)
        if entry is None:
            return
        entry.upstream = None
        entry.moving = False
        # The upstream's own failure (now a detection): place the rig elsewhere at once.
        down = self.upstreams[upstream].state is State.DOWN
        entry.retry_at = now + (self.config.settle if down else MOVE_RETRY)
        self._dirty = True

    def removed(self, rig: int) -> None:
        """The rig's connection is closed."""
        entry = self._rigs.pop(rig, None)
        if entry is not None:
            entry.forget()
            self._dirty = True

    def _add(self, rig: int, upstream: int | None) -> _Rig:
        old = self._rigs.get(rig)
        if old is not None:
            old.forget()
        entry = self._rigs[rig] = _Rig(rig, upstream, self._placement)
        return entry

    def upstream_of(self, rig: int) -> int | None:
        entry = self._rigs.get(rig)
        return None if entry is None else entry.upstream

    # ------------------------------------------------------------------ queries

    def state(self, upstream: int) -> State:
        return self.upstreams[upstream].state

    def is_down(self, upstream: int) -> bool:
        return self.upstreams[upstream].state is State.DOWN

    def unreachable(self, upstream: int) -> bool:
        """Down in a way that means no answer will come (lost, silent, pool down), not just unwanted."""
        up = self.upstreams[upstream]
        return up.state is State.DOWN and up.kind in _UNREACHABLE

    def usable(self, upstream: int) -> bool:
        return self._candidate(self.upstreams[upstream])

    def down_reason(self, upstream: int) -> str | None:
        up = self.upstreams[upstream]
        return None if up.state is not State.DOWN else f"{up.kind}: {up.detail}"

    def take_events(self) -> list[PolicyEvent]:
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ time

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due (the time of the latest input or earlier: at once)."""
        now = self._now
        if self._dirty:
            return now
        config = self.config
        deadlines: list[float] = []
        keepalive = config.keepalive
        for up in self.upstreams:
            if not up.connected:
                continue
            if keepalive is not None and up.last_rx is not None and not up.spec.own_liveness:
                quiet_from = up.last_rx if up.keepalive_at is None else max(up.last_rx, up.keepalive_at)
                deadlines.append(quiet_from + keepalive)
                silent_at = self._silent_at(up)
                if up.state is not State.DOWN and silent_at is not None:
                    deadlines.append(silent_at)
            if up.last_job is not None and up.state is not State.DOWN:
                deadlines.append(up.last_job + config.job_timeout)
            elif not up.job_since_connect and up.connected_at is not None:
                deadlines.append(up.connected_at + config.job_timeout)
            if not up.hold_done and up.healthy_since is not None:
                deadlines.append(up.healthy_since + config.hold_down)
        deadlines.extend(self._lag_deadlines())
        if (
            self._outage_since is not None
            and not self._released_outage
            and config.no_upstream is NoUpstreamPolicy.DISCONNECT  # KEEP never releases: no deadline
        ):
            deadlines.append(self._outage_since + config.no_upstream_grace)
        rigs = self._rigs
        retries = [rigs[r].retry_at for r in self._placement.orphans if not rigs[r].moving]
        if retries:
            # due orphans wait for an eligible upstream (any change marks the policy dirty)
            due = [t for t in retries if t > now] if self._nothing_eligible else retries
            if due:
                deadlines.append(min(due))
        if self._wanted_moves:
            refilled = now if self._refilled is None else self._refilled
            deadlines.append(refilled + max(1.0 - self._tokens, 0.0) / config.switch_rate)
        return min(deadlines) if deadlines else None

    def take_actions(self) -> list[Action]:
        """What the timer decided since the last call, to be carried out in order."""
        actions, self._actions = self._actions, []
        return actions

    def handle_timer(self, now: float) -> None:
        """Re-evaluate health, send keepalives, apply the no-upstream policy, plan moves
        (:meth:`take_actions` has what to do)."""
        self._now = now
        self._actions.extend(self._timer(now))

    def _timer(self, now: float) -> list[Action]:
        self._dirty = False
        self._refresh(now)
        for up in self.upstreams:
            if not up.hold_done and up.healthy_since is not None and now >= up.healthy_since + self.config.hold_down:
                up.hold_done = True
        actions: list[Action] = []
        keepalive = self.config.keepalive
        if keepalive is not None:
            for up in self.upstreams:
                if not up.connected or up.last_rx is None or up.spec.own_liveness:
                    continue
                quiet_from = up.last_rx if up.keepalive_at is None else max(up.last_rx, up.keepalive_at)
                if now >= quiet_from + keepalive:  # the very sum get_timer() waits for
                    up.keepalive_at = now
                    if up.first_keepalive_at is None or up.first_keepalive_at < up.last_rx:
                        up.first_keepalive_at = now
                    actions.append(SendKeepalive(up.index))
        eligible = self._eligible(now)
        self._nothing_eligible = not eligible
        if not eligible:
            actions.extend(self._no_upstream(now))
            self._wanted_moves = False
            return actions
        if self._outage_since is not None:
            self._outage_since = None
            self._released_outage = False
            self._events.append(PolicyEvent("recovery", "an upstream is usable again: the outage is over"))
        actions.extend(self._plan_moves(eligible, now))
        return actions

    # ------------------------------------------------------------------ health

    def _refresh(self, now: float) -> None:
        for up in self.upstreams:
            state, kind, detail = self._evaluate(up, now)
            self._transition(up, state, kind, detail, now)

    def _silent_at(self, up: _Upstream) -> float | None:
        """When ``up`` counts as silent: ``silence_timeout`` after the last line, and never before
        the first keepalive since then had its share of that time to be answered (a process
        that was busy and late with its keepalive does not blame the upstream); None when
        no keepalive went out since the last line yet (it goes out first)."""
        config = self.config
        keepalive = config.keepalive
        first = up.first_keepalive_at
        if keepalive is None or up.last_rx is None or first is None or first < up.last_rx or up.spec.own_liveness:
            return None
        return max(up.last_rx + config.silence_timeout, first + config.silence_timeout - keepalive)

    def _evaluate(self, up: _Upstream, now: float) -> tuple[State, Reason | None, str | None]:
        config = self.config
        if up.pool_down is not None:
            return State.DOWN, Reason.POOL_DOWN, up.pool_down
        if not up.probing:
            return State.UNKNOWN, None, None
        if not up.connected:
            return State.DOWN, up.lost_kind, up.lost_detail
        silent_at = self._silent_at(up)
        if silent_at is not None and up.last_rx is not None:
            if now >= silent_at:
                quiet = now - up.last_rx
                return State.DOWN, Reason.SILENT, f"nothing received for {quiet:.1f} s (bound {config.silence_timeout:g} s)"
        if not up.job_since_connect:
            if up.connected_at is not None and now >= up.connected_at + config.job_timeout:
                return State.DOWN, Reason.NO_JOBS, f"no mining.notify within {config.job_timeout:g} s of connecting"
            return (State.DOWN if up.state is State.DOWN else State.STARTING), up.kind, up.detail
        assert up.last_job is not None
        if now >= up.last_job + config.job_timeout:
            return State.DOWN, Reason.NO_JOBS, f"no mining.notify for {now - up.last_job:.1f} s (bound {config.job_timeout:g} s)"
        lag = self._lag(up, now)
        if lag is not None:
            return State.DOWN, Reason.LAGGING, lag
        return State.UP, None, None

    def _lag(self, up: _Upstream, now: float) -> str | None:
        for other in self.upstreams:
            since = self._ahead_since(other, up)
            if since is not None and now >= since + self.config.lag_delay:
                assert other.tip is not None
                return (
                    f"{other.name} announced block {other.tip[:16]}… {now - since:.1f} s ago "
                    f"and {up.name} has not (delay {self.config.lag_delay:g} s)"
                )
        return None

    @staticmethod
    def _ahead_since(other: _Upstream, up: _Upstream) -> float | None:
        """When ``other`` moved past ``up``'s current block, or None if it has not."""
        if other is up or other.tip is None or up.tip is None or other.tip in up.seen:
            return None
        if other.pool_down is not None or not other.connected:
            return None
        mine = other.seen.get(up.tip)
        theirs = other.seen.get(other.tip)
        if mine is None or theirs is None or theirs <= mine:
            return None  # never shared a block, or a fork: not lag
        return theirs

    def _lag_deadlines(self) -> list[float]:
        deadlines = []
        for up in self.upstreams:
            if up.state is not State.UP:
                continue
            for other in self.upstreams:
                since = self._ahead_since(other, up)
                if since is not None:
                    deadlines.append(since + self.config.lag_delay)
        return deadlines

    def _transition(self, up: _Upstream, state: State, kind: Reason | None, detail: str | None, now: float) -> None:
        previous = up.state
        if state is previous and (state is not State.DOWN or kind is up.kind):
            if state is State.DOWN:
                up.detail = detail
            return
        up.state, up.kind, up.detail = state, kind, detail
        if state is State.DOWN:
            up.healthy_since = None
            up.failed_before = True
            assert kind is not None
            up.detections[kind.value] += 1
            self._dirty = True
            self._events.append(PolicyEvent("detection", f"upstream {up.name} is down: {kind}: {detail}", up.index, kind.value))
        elif state is State.UP:
            up.healthy_since = now
            up.hold_done = not up.failed_before
            self._dirty = True
            if previous is not State.UNKNOWN and up.failed_before:
                self._events.append(
                    PolicyEvent(
                        "recovery",
                        f"upstream {up.name} is healthy again; rigs return after {self.config.hold_down:g} s of hold-down",
                        up.index,
                    )
                )

    def _candidate(self, up: _Upstream) -> bool:
        if up.state is State.UP:
            return True
        return up.state in (State.UNKNOWN, State.STARTING) and not up.failed_before

    def _in_hold_down(self, up: _Upstream, now: float) -> bool:
        return up.failed_before and up.healthy_since is not None and now < up.healthy_since + self.config.hold_down

    def _eligible(self, now: float) -> list[_Upstream]:
        healthy = [up for up in self.upstreams if self._candidate(up)]
        if not healthy:
            return []
        settled = [up for up in healthy if not self._in_hold_down(up, now)]
        pool = settled or healthy
        if self.config.strategy is Strategy.WEIGHTED:
            weighted = [up for up in pool if up.spec.weight > 0]
            if weighted:
                return weighted
        top = min(up.spec.priority for up in pool)
        return [up for up in pool if up.spec.priority == top]

    # ------------------------------------------------------------------ placement

    def _counts(self) -> Counter[int]:
        return +self._placement.counts  # a copy, without the upstreams that have none

    @staticmethod
    def _shares(eligible: list[_Upstream], total: int) -> dict[int, int]:
        """Rigs each eligible upstream should carry: proportional to weight, largest remainder."""
        weights = [max(up.spec.weight, 0.0) for up in eligible]
        if sum(weights) <= 0:
            weights = [1.0] * len(eligible)
        scale = sum(weights)
        exact = [total * w / scale for w in weights]
        shares = [int(x) for x in exact]
        order = sorted(range(len(eligible)), key=lambda i: (-(exact[i] - shares[i]), eligible[i].spec.priority, i))
        for i in order[: total - sum(shares)]:
            shares[i] += 1
        return {up.index: share for up, share in zip(eligible, shares, strict=False)}

    def _place(self, eligible: list[_Upstream], counts: Counter[int] | None = None, extra: int = 1) -> int | None:
        """The eligible upstream furthest below its share once ``extra`` more rigs are placed."""
        if not eligible:
            return None
        counts = self._counts() if counts is None else counts
        total = sum(counts.values()) + extra
        shares = self._shares(eligible, total)
        weights = {up.index: max(up.spec.weight, 0.0) or 1.0 for up in eligible}
        best = max(
            eligible,
            key=lambda up: (
                shares[up.index] - counts[up.index],
                -counts[up.index] / weights[up.index],
                -up.spec.priority,
                -up.index,
            ),
        )
        return best.index

    def _plan_moves(self, eligible: list[_Upstream], now: float) -> list[Action]:
        config = self.config
        if self._refilled is None:
            self._refilled = now
        self._tokens = min(float(config.switch_burst), self._tokens + (now - self._refilled) * config.switch_rate)
        self._refilled = now
        eligible_ids = {up.index for up in eligible}
        rigs = self._rigs.values()
        urgent: list[tuple[_Rig, str]] = []
        gentle: list[tuple[_Rig, str]] = []
        # Look at every rig only when one may have to move: an orphan due, or rigs on an
        # upstream that is down or not eligible (the placement counts say so without a look).
        placement = self._placement
        every = self._rigs
        scan = any(not every[r].moving and every[r].retry_at <= now for r in placement.orphans) or any(
            n > 0 and (self.upstreams[i].state is State.DOWN or i not in eligible_ids) for i, n in placement.counts.items()
        )
        for rig in rigs if scan else ():
            if rig.moving:
                continue
            if rig.upstream is None:
                if rig.retry_at <= now:
                    urgent.append((rig, "its upstream session ended"))
                continue
            up = self.upstreams[rig.upstream]
            if up.state is State.DOWN:
                urgent.append((rig, f"{up.name} is down ({up.kind})"))
            elif rig.upstream not in eligible_ids:
                gentle.append((rig, f"fail-back from {up.name}"))
        counts = self._counts()
        # rebalance: the excess of over-share upstreams, when another is under its share
        total = len(self._rigs)
        shares = self._shares(eligible, total)
        moving_out = Counter(rig.upstream for rig, _ in gentle)
        under = any(shares[i] > counts[i] for i in eligible_ids)
        if under:
            excess = {i: counts[i] - shares[i] for i in eligible_ids if counts[i] - moving_out[i] > shares[i]}
            for rig in rigs:
                if not excess:
                    break
                if rig.moving or rig.upstream not in excess:
                    continue
                gentle.append((rig, f"rebalance from {self.upstreams[rig.upstream].name}"))
                excess[rig.upstream] -= 1
                if excess[rig.upstream] <= 0:
                    del excess[rig.upstream]
        actions: list[Action] = []
        planned: Counter[tuple[str, str, str]] = Counter()
        starved = False
        for batch, is_urgent in ((urgent, True), (gentle, False)):
            for rig, why in batch:
                if self._tokens < 1.0 - _TOKEN_ROUNDING:
                    starved = True
                    break
                source = rig.upstream
                if source is not None:
                    counts[source] -= 1
                target = self._place(eligible, counts, extra=1)
                assert target is not None
                if target == source:
                    counts[source] += 1
                    continue
                self._tokens -= 1.0
                counts[target] += 1
                rig.upstream = target
                rig.moving = True
                kind = "failover" if is_urgent else ("failback" if why.startswith("fail-back") else "rebalance")
                self._switches[kind] += 1
                planned[(kind, why, self.upstreams[target].name)] += 1
                actions.append(MoveRig(rig.id, source, target, why, is_urgent))
        self._wanted_moves = starved
        for (kind, why, target_name), count in planned.items():
            self._events.append(PolicyEvent("switch", f"{kind}: moving {count} rig(s) to {target_name}: {why}", reason=kind))
        return actions

    def _no_upstream(self, now: float) -> list[Action]:
        if self._outage_since is None:
            self._outage_since = now
            self._outages += 1
            policy = self.config.no_upstream
            then = (
                f"rigs are released in {self.config.no_upstream_grace:g} s so their own backup pools take over"
                if policy is NoUpstreamPolicy.DISCONNECT
                else "rigs stay on their last job until one is back"
            )
            self._events.append(PolicyEvent("outage", f"no upstream is usable; {then}"))
        if (
            self.config.no_upstream is NoUpstreamPolicy.DISCONNECT
            and not self._released_outage
            and now >= self._outage_since + self.config.no_upstream_grace
        ):
            self._released_outage = True
            rigs = tuple(self._rigs)
            if rigs:
                self._released += len(rigs)
                for rig in rigs:
                    self._rigs[rig].moving = True
                reason = f"no upstream usable for {now - self._outage_since:.1f} s"
                self._events.append(PolicyEvent("release", f"releasing {len(rigs)} rig(s): {reason}"))
                return [ReleaseRigs(rigs, reason)]
        return []

    # ------------------------------------------------------------------ statistics

    def warnings(self, now: float) -> list[str]:
        """What monitoring must hear about (``stratumrm status`` exits 3): upstreams down, none usable."""
        self._refresh(now)
        found = [
            f"upstream {up.name} is down ({up.kind}: {up.detail}); no rig is sent there until it recovers: "
            "check that pool or sidecar and the path to it"
            for up in self.upstreams
            if up.state is State.DOWN
        ]
        if not any(self._candidate(up) for up in self.upstreams):
            what = (
                "rigs are released so their own backup pools take over"
                if self.config.no_upstream is NoUpstreamPolicy.DISCONNECT
                else "rigs wait on their last job"
            )
            found.append(f"no usable upstream: every upstream is down, {what}; bring one back or add another")
        return found

    def statistics(self, now: float) -> FailoverStatistics:
        counts = self._counts()
        detections: Counter[str] = Counter()
        statuses = []
        for up in self.upstreams:
            detections.update(up.detections)
            statuses.append(
                UpstreamStatus(
                    name=up.name,
                    priority=up.spec.priority,
                    weight=up.spec.weight,
                    state=up.state.value,
                    reason=None if up.state is not State.DOWN else f"{up.kind}: {up.detail}",
                    rigs=counts[up.index],
                    healthy_for=None if up.healthy_since is None else now - up.healthy_since,
                    in_hold_down=self._in_hold_down(up, now),
                    prevhash=up.tip,
                    detections=dict(up.detections),
                )
            )
        return FailoverStatistics(
            strategy=self.config.strategy.value,
            upstreams=statuses,
            detections=dict(detections),
            switches=dict(self._switches),
            moves_failed=self._moves_failed,
            released=self._released,
            outages=self._outages,
        )
