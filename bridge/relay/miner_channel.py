"""The sans-IO core of one miner connection through the miner-side proxy.

A :class:`MinerChannel` joins two sides: a
:class:`~bridge.sv1.server.ServerSession` facing the rig, and one or more
*upstream sessions* facing pools. An upstream session is anything with the
:class:`~bridge.sv1.client.ClientSession` request/event vocabulary: a plain SV1
connection (``stratum+tcp://``, ``stratum+ssl://``) or a StratumRM channel. The
channel never touches a socket or a clock: the driver feeds it bytes and events
with the current time ``now``, asks :meth:`get_timer`, calls
:meth:`handle_timer`, and writes what the sessions queued.

Transparency rules:

- every request keeps the rig's own id: upstream requests carry a
  :class:`PendingRequest` as their context and the pool's reply is relayed with
  only the id changed, byte for byte otherwise, whatever reject dialect the pool
  speaks;
- every ``mining.submit`` gets the pool's true verdict, or, if none comes within
  ``submit_timeout`` or the upstream is lost, an explicit error that says so;
  the proxy never invents "accepted";
- the rig's user agent, worker names, configure/version-rolling and
  suggest_difficulty reach the pool unchanged (the upstream session orders them
  the way pools require);
- notifications pass through as the pool sent them, in order; requests the pool
  sends (``client.get_version``, ``mining.ping``, unknown ones) reach the rig
  with the pool's id and the rig's answer goes back.

Connections that are not Stratum at all (a TLS ClientHello from bfgminer's
probe, an HTTP scanner, silence) are recognised before any upstream is opened:
:attr:`wants_upstream` only turns true after the first valid Stratum request.

Legs and upstream changes (failover)
====================================

Each upstream session of the channel is a :class:`Leg`. The *current* leg gets
the rig's requests and its notifications reach the rig. Changing upstream
(:meth:`MinerChannel.switch_upstream`) opens a *joining* leg on which the rig's
handshake is **replayed** as the rig sent it: ``mining.configure``,
``mining.subscribe`` with the rig's user agent, ``mining.authorize`` for every
worker the rig authorized (with its password), its difficulty suggestions,
``mining.extranonce.subscribe`` and ``mining.multi_version``. The replies are the channel's own;
the pool's notifications are held. Once the subscribe and every replayed
authorize are answered successfully the switch completes:

- a rig that has not had its subscribe result yet gets the new pool's (its
  unanswered handshake requests are simply forwarded to the new leg: the rig
  never sees the first upstream);
- a rig that sent ``mining.extranonce.subscribe`` gets
  ``mining.set_extranonce [extranonce1, extranonce2_size]`` of the new session
  (and ``mining.set_version_mask`` if the mask changed), then the held
  ``mining.set_difficulty`` and the first ``mining.notify`` with ``clean_jobs``
  forced to true, so it drops the old work at once.

Rigs that did not subscribe to extranonce changes (cgminer ignores
``mining.set_extranonce``) are not given a joining leg: :meth:`request_reconnect`
sends ``client.reconnect`` (``[]``, or ``[host, port]`` for cpuminer, which
ignores ``[]``) after the verdicts of the shares in flight came back (or
``drain_timeout`` passed); the rig reconnects to the proxy and gets a session on
the upstream the failover policy picks. The connection lingers until the rig
closes it (at most ``RECONNECT_LINGER``): a share the rig sent before it read the
reconnect still reaches its pool, which credits it, though the rig, gone, never
reads the verdict (cgminer counts it "lost due to stratum disconnect"). That
window, one proxy-to-rig trip, is the only way a share can go unanswered.

The previous leg is *draining*: shares whose job it sent still go to it and
its verdicts still reach the rig; its notifications do not. A submit is routed
by its job id (the leg that sent the job; when two legs sent the same id the
newest wins). A share on a job of a leg that is gone is answered locally,
``[21, "Stale: …", null]`` with ``result: false``, and never reaches another
pool, where the job id might mean something else. When a leg is
lost its pending requests get explicit errors (shares: "not confirmed"). The
driver retires a draining leg (:meth:`retire_drained`) once it has no pending
share and ``drain_timeout`` passed since the switch.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import msgspec
from msgspec import UNSET, Raw, Struct, field

from bridge.bounded import BoundedMap, RecentKeys
from bridge.counters import Counters
from bridge.sv1.events import ProtocolViolation, Reply, UnknownPoolRequest
from bridge.sv1.framing import DEFAULT_MAX_LINE, decode_json
from bridge.sv1.messages import (
    FALSE,
    Authorize,
    Configure,
    ExtranonceSubscribe,
    GetVersion,
    MinerResponse,
    MultiVersion,
    Notify,
    Ping,
    Reconnect,
    RequestId,
    Response,
    SetDifficulty,
    SetExtranonce,
    SetVersionMask,
    ShowMessage,
    Submit,
    SubmitParams,
    Subscribe,
    SuggestDifficulty,
    SuggestTarget,
    params_list,
)
from bridge.sv1.rejects import read_verdict, reject_reason_name
from bridge.sv1.server import ServerSession

RECONNECT_LINGER = 2.0
"""Seconds the rig's connection stays open after ``client.reconnect`` (rigs close it at once)."""
JOBS_PER_LEG = 8
"""Job ids remembered per leg for routing submits during a switch (and for answering a
retired leg's shares as stale): the last 8, minutes of a pool's jobs (a draining leg
lives ``drain_timeout``, 10 s). A share for an older job goes to the current leg, whose
pool judges it. Per rig: 256 were 13 KB at the proxy once full, with the link's job handles."""
OLD_JOBS_KEPT = 1024
"""Job ids of retired legs remembered to answer their shares as stale."""
POOL_REQUESTS_KEPT = 64
MAX_HANDSHAKE_RECORDS = 300
"""Handshake requests remembered for replay (one per kind, one authorize per worker)."""


class UpstreamSession(Protocol):
    """What a miner channel needs from whatever carries it to the pool."""

    def subscribe(self, user_agent: str | None, session_id: str | None = None, context: Any = None) -> int | None: ...
    def submit(self, params: SubmitParams, context: Any = None) -> int | None: ...
    def request(self, method: str, params: list[Any] | Raw, context: Any = None) -> int | None: ...
    def respond_raw(self, response: Any) -> None: ...
    def cancel(self, request_id: int) -> None: ...


class Leg:
    """One upstream session of the channel: current, joining, draining or gone."""

    __slots__ = (
        "extranonce1",
        "extranonce2_size",
        "failure",
        "force_clean",
        "forward_handshake",
        "held",
        "jobs",
        "key",
        "pending",
        "replays",
        "session",
        "state",
        "switched_at",
        "version_mask",
    )

    def __init__(self, session: UpstreamSession, key: Any, state: str) -> None:
        self.session = session
        self.key = key
        self.state = state  # "current", "joining", "draining", "gone"
        self.jobs: RecentKeys[str, None] = RecentKeys(JOBS_PER_LEG)
        self.pending = 0  # unanswered submits
        self.held: list[Any] | None = None  # notifications held while joining; made when needed
        self.extranonce1: str | None = None
        self.extranonce2_size: int | None = None
        self.version_mask: str | None = None
        self.replays = 0  # replayed requests still unanswered
        self.failure: str | None = None
        self.force_clean = False
        self.switched_at = 0.0
        self.forward_handshake = False

    def remember_job(self, job_id: str) -> None:
        self.jobs.put(job_id, None)

    def __repr__(self) -> str:
        return f"<Leg {self.key!r} {self.state}>"


class PendingRequest:
    """A rig's request on its way to the pool; the context of the upstream request."""

    __slots__ = ("answered", "deadline", "event", "leg", "method", "miner_id", "upstream_id")

    def __init__(self, miner_id: RequestId, method: str, deadline: float, leg: Leg | None = None, event: Any = None) -> None:
        self.miner_id = miner_id
        self.method = method
        self.deadline = deadline
        self.upstream_id: int | None = None
        self.answered = False
        self.leg = leg
        self.event = event


#: What a handshake record keeps once its request was answered: the request is replayed
#: on a new upstream, its pending record (about 110 B a rig, per request) is not needed.
_ANSWERED = PendingRequest(None, "answered", math.inf)
_ANSWERED.answered = True


class _Replay:
    """The context of a request the channel replays on a joining leg (the rig never sees its answer)."""

    __slots__ = ("leg", "method")

    def __init__(self, leg: Leg, method: str) -> None:
        self.leg = leg
        self.method = method


class SwitchResult(Struct, frozen=True):
    """How a switch to ``leg`` ended: ``ok``, or failed with ``reason``."""

    leg: Any
    ok: bool
    reason: str = ""


class MinerChannelCounters(Counters, kw_only=True):
    """What happened on one rig's channel (or, summed, on all of a proxy's; see :mod:`bridge.counters`)."""

    submitted: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    """Rejected shares by reason (stale, duplicate, low-difficulty ...), the pool's answers classified."""
    accepted_difficulty: float = 0.0
    """Sum of the difficulty of accepted shares (hashrate = its growth * 2**32 / seconds)."""
    timed_out: int = 0
    """Requests the upstream did not answer within their timeout (the rig got an error)."""
    lost_upstream: int = 0
    """Requests whose upstream session ended before it answered (the rig got an error)."""
    notifies: int = 0
    violations: int = 0
    switches: int = 0
    """Moves to another upstream session without reconnecting (handshake replayed)."""
    extranonce_changes: int = 0
    """``mining.set_extranonce`` sent to the rig."""
    reconnects_sent: int = 0
    """``client.reconnect`` sent to move the rig."""
    stale_local: int = 0
    """Shares answered by the proxy because the upstream that sent their job is gone."""


# msgspec allows a frozen Struct to extend a mutable one (mypy applies the dataclass rule).
class MinerChannelStatistics(MinerChannelCounters, frozen=True, kw_only=True):  # type: ignore[misc]
    """A snapshot of one rig's channel: its counters, and what is open now."""

    pending: int = 0
    difficulty: float | None = None
    """The share difficulty the pool set last (``mining.set_difficulty``)."""


# What a connection that is not Stratum looks like in its first bytes.
_NOT_STRATUM = (
    (b"\x16\x03", "a TLS ClientHello (bfgminer probes with one; it then retries in plain Stratum)"),
    (b"GET ", "an HTTP request"),
    (b"POST ", "an HTTP request"),
    (b"HEAD ", "an HTTP request"),
    (b"PRI * HTTP/2", "an HTTP/2 preface"),
    (b"SSH-", "an SSH client"),
)

_HANDSHAKE = (Configure, Subscribe, Authorize, ExtranonceSubscribe, SuggestDifficulty, SuggestTarget, MultiVersion)


def identify_non_stratum(first_bytes: bytes) -> str | None:
    """Name what a connection's first bytes are if they are clearly not Stratum."""
    for prefix, what in _NOT_STRATUM:
        if first_bytes.startswith(prefix):
            return what
    return None


def _subscribe_values(response: Response) -> tuple[str, int] | None:
    """``(extranonce1, extranonce2_size)`` of a successful subscribe result."""
    if response.result is UNSET or bytes(response.error) != b"null":
        return None
    try:
        result = decode_json(response.result)
        extranonce1, size = result[1], result[2]
    except (msgspec.DecodeError, TypeError, IndexError, KeyError):
        return None
    if not isinstance(extranonce1, str) or isinstance(size, bool) or not isinstance(size, int):
        return None
    return extranonce1, size


def _configured_mask(response: Response) -> str | None:
    if response.result is UNSET:
        return None
    try:
        result = decode_json(response.result)
    except msgspec.DecodeError:
        return None
    if isinstance(result, dict) and result.get("version-rolling") is True:
        mask = result.get("version-rolling.mask")
        return mask if isinstance(mask, str) else None
    return None


class MinerChannel:
    """One rig connection relayed to its upstream session(s)."""

    __slots__ = (
        "_authorize_refusals",
        "_authorized",
        "_difficulty",
        "_early",
        "_first_bytes",
        "_handshake",
        "_old_jobs",
        "_pending",
        "_pool_requests",
        "_reconnect",
        "_reconnect_sent",
        "_switch_results",
        "close_reason",
        "counters",
        "drain_timeout",
        "leg",
        "legs",
        "miner",
        "reconnect_reason",
        "request_timeout",
        "rig_extranonce",
        "rig_version_mask",
        "submit_timeout",
        "wants_upstream",
    )

    def __init__(
        self,
        *,
        submit_timeout: float = 60.0,
        request_timeout: float = 60.0,
        drain_timeout: float = 10.0,
        max_line: int = DEFAULT_MAX_LINE,
    ) -> None:
        self.miner = ServerSession(max_line=max_line)
        self.submit_timeout = submit_timeout
        self.request_timeout = request_timeout
        self.drain_timeout = drain_timeout
        self.wants_upstream = False
        self.close_reason: str | None = None
        self.leg: Leg | None = None
        self.legs: list[Leg] = []
        self._first_bytes = True
        # Per-rig containers that are nearly always empty are None until first used
        # (an empty list is 56 B, a BoundedMap with its dict about 130 B).
        self._early: list[Any] | None = None
        self._pending: list[PendingRequest] = []  # oldest first (a deque is 760 B even empty)
        # What the rig did in its handshake, to replay on a new upstream.
        self._handshake: list[tuple[Any, PendingRequest | None]] = []
        self._authorized: dict[str, str | None] = {}
        self._authorize_refusals: list[tuple[str, str]] | None = None
        self.rig_extranonce: tuple[str, int] | None = None
        self.rig_version_mask: str | None = None
        self._old_jobs: BoundedMap[str, None] | None = None
        self._pool_requests: BoundedMap[Any, Leg] | None = None
        self._switch_results: list[SwitchResult] | None = None
        self._reconnect: tuple[list[Any], float, str] | None = None
        self._reconnect_sent: float | None = None
        self.reconnect_reason: str | None = None
        """Set once ``client.reconnect`` went out: why (the close reason, whoever closes)."""
        self.counters = MinerChannelCounters()
        """What happened on this channel (:meth:`statistics` snapshots it)."""
        self._difficulty: float | None = None

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    @property
    def upstream(self) -> UpstreamSession | None:
        """The current leg's session (None before the first attach or after a loss)."""
        return None if self.leg is None else self.leg.session

    @property
    def extranonce_subscribed(self) -> bool:
        return self.miner.extranonce_subscribed

    @property
    def subscribed(self) -> bool:
        """The rig has had its subscribe result."""
        return self.miner.subscribed

    def take_authorize_refusals(self) -> list[tuple[str, str]]:
        """Workers whose mining.authorize the upstream refused since the last call, with its error (for the log)."""
        refusals, self._authorize_refusals = self._authorize_refusals, None
        return [] if refusals is None else refusals

    @property
    def authorized_workers(self) -> dict[str, str | None]:
        """Worker names the rig authorized successfully, with their passwords."""
        return self._authorized

    @property
    def switching(self) -> bool:
        return any(leg.state == "joining" for leg in self.legs)

    @property
    def reconnecting(self) -> bool:
        return self._reconnect is not None

    def _close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason

    # ------------------------------------------------------------- rig side

    def miner_data(self, data: bytes, now: float) -> None:
        """Bytes from the rig."""
        if self.closed:
            return
        if self._first_bytes and data:
            self._first_bytes = False
            what = identify_non_stratum(data)
            if what is not None:
                self._close(f"not a Stratum client: {what}")
                return
        for event in self.miner.receive_data(data):
            if isinstance(event, ProtocolViolation):
                self.counters.violations += 1
                if event.fatal:
                    self._close(f"protocol violation from the rig: {event.reason}")
                    return
                continue
            self.wants_upstream = True
            if self.leg is None and not self.miner.subscribed:
                if self._early is None:
                    self._early = []
                self._early.append(event)  # waits for the (next) upstream
            else:
                self._forward(event, now)
        self._check_reconnect(now)

    def attach_upstream(self, upstream: UpstreamSession, now: float, key: Any = None) -> Leg:
        """The first upstream session is connected: pass it what the rig already sent."""
        leg = Leg(upstream, key, "current")
        self.leg = leg
        self.legs.append(leg)
        early, self._early = self._early, None
        for event in early or ():
            self._forward(event, now)
        return leg

    def _forward(self, event: Any, now: float) -> None:
        kind = type(event)
        if kind is MinerResponse:
            requests = self._pool_requests
            leg = requests.pop(event.id, None) if event.id is not None and requests is not None else None
            if leg is None or leg.state == "gone":
                leg = self.leg
            if leg is not None and leg.state != "gone":
                leg.session.respond_raw(event)
            return
        if kind is Submit:
            self._submit(event, now)
            return
        method = event.__struct_config__.tag
        pending = PendingRequest(event.id, method, now + self.request_timeout, event=event)
        if kind in _HANDSHAKE:
            self._record_handshake(event, pending if event.id is not None else None)
            if kind is Authorize and event.id is None:
                self._remember_worker(event.params.user, event.params.password)
        leg = self.leg
        if leg is None:
            if event.id is not None:
                pending.answered = True
                self.miner.respond_error(event.id, 20, "Upstream pool unavailable: the proxy is changing upstream")
            return
        self._send_on(leg, event, pending)
        if event.id is not None:
            self._pending.append(pending)

    def _remember_worker(self, user: str, password: str | None) -> None:
        if user not in self._authorized and len(self._authorized) < MAX_HANDSHAKE_RECORDS:
            self._authorized[user] = password

    def _record_handshake(self, event: Any, pending: PendingRequest | None) -> None:
        """Remember a handshake request for replay: the latest of each kind, one authorize per worker."""
        key = _handshake_key(event)
        kept = [(e, p) for e, p in self._handshake if _handshake_key(e) != key]
        if len(kept) < MAX_HANDSHAKE_RECORDS:
            kept.append((event, pending))
        self._handshake = kept

    def _send_on(self, leg: Leg, event: Any, pending: PendingRequest) -> None:
        pending.leg = leg
        kind = type(event)
        if kind is Subscribe:
            params = event.params
            session_id = None if params.session_id is None else str(params.session_id)
            pending.upstream_id = leg.session.subscribe(params.user_agent, session_id, context=pending)
        else:
            pending.upstream_id = leg.session.request(event.__struct_config__.tag, _params(event.params), context=pending)

    def _submit(self, event: Submit, now: float) -> None:
        self.counters.submitted += 1
        job_id = event.params.job_id
        leg = self._leg_for_job(job_id)
        if leg is None:
            self.counters.stale_local += 1
            if self._old_jobs is not None and job_id in self._old_jobs:
                message = "Stale: job from a previous upstream pool, which is gone; share not submitted"
                code = 21
            else:
                message = "No upstream pool connection (the proxy is changing upstream); share not submitted"
                code = 20
            self.miner.respond_error(event.id, code, message, result=FALSE)
            return
        pending = PendingRequest(event.id, "mining.submit", now + self.submit_timeout, leg)
        pending.upstream_id = leg.session.submit(event.params, context=pending)
        leg.pending += 1
        self._pending.append(pending)

    def _leg_for_job(self, job_id: str) -> Leg | None:
        current = self.leg
        if len(self.legs) == 1 and current is not None and not self._old_jobs:
            return current  # the common case: one upstream, never changed
        if current is not None and job_id in current.jobs:
            return current
        for leg in reversed(self.legs):
            if leg.state == "draining" and job_id in leg.jobs:
                return leg
        if self._old_jobs is not None and job_id in self._old_jobs:
            return None
        return current

    # -------------------------------------------------------------- pool side

    def upstream_events(self, events: list[Any], now: float, leg: Leg | None = None) -> None:
        """Events from an upstream session (the current leg's unless ``leg`` is given)."""
        leg = self.leg if leg is None else leg
        if leg is None or leg.state == "gone":
            return
        for event in events:
            kind = type(event)
            if kind is Reply:
                self._reply(event, now)
            elif kind is ProtocolViolation:
                self.counters.violations += 1
                if event.fatal:
                    # The driver sees the leg gone and closes its connection.
                    self.upstream_lost(f"pool protocol violation: {event.reason}", now, leg=leg, release=False)
                    return
            elif leg.state == "current":
                self._notification(leg, event, now)
            elif leg.state == "joining":
                if leg.held is None:
                    leg.held = []
                leg.held.append(event)
            # a draining leg's notifications are dropped: the rig works for the new upstream
            if leg.state == "gone":
                return
        self._check_reconnect(now)

    def _notification(self, leg: Leg, event: Any, now: float) -> None:
        miner = self.miner
        kind = type(event)
        if kind is Notify:
            self.counters.notifies += 1
            params = event.params
            leg.remember_job(params.job_id)
            if leg.force_clean:
                leg.force_clean = False
                if not params.clean_jobs:
                    params = msgspec.structs.replace(params, clean_jobs=True)
            miner.notify(params)
        elif kind is SetDifficulty:
            self._difficulty = float(event.difficulty)
            miner.set_difficulty(event.difficulty)
        elif kind is SetExtranonce:
            values = event.params
            if values.extranonce1 is not None:
                leg.extranonce1 = values.extranonce1
                size = values.extranonce2_size
                if size is not None:
                    leg.extranonce2_size = size
                if leg.extranonce2_size is not None:
                    self.rig_extranonce = (values.extranonce1, leg.extranonce2_size)
            miner.send_request(None, "mining.set_extranonce", params_list(event.params))
        elif kind is SetVersionMask:
            leg.version_mask = self.rig_version_mask = event.mask
            miner.set_version_mask(event.mask)
        elif kind is ShowMessage:
            miner.show_message(event.text)
        elif kind is GetVersion or kind is Ping:
            self._remember_pool_request(event.id, leg)
            miner.send_request(event.id, event.__struct_config__.tag, event.params)
        elif kind is UnknownPoolRequest:
            self._remember_pool_request(event.id, leg)
            miner.send_request(event.id, event.method, event.params)
        elif kind is Reconnect:
            # The pool wants its miners elsewhere (or back). The rig's upstream
            # is this proxy, so ask the rig to come back here and close: the
            # next connection goes upstream afresh.
            miner.reconnect([])
            self._close(f"pool sent client.reconnect {msgspec.json.encode(event.params).decode()}")

    def _remember_pool_request(self, request_id: Any, leg: Leg) -> None:
        if request_id is None:
            return
        if self._pool_requests is None:
            self._pool_requests = BoundedMap(POOL_REQUESTS_KEPT)
        self._pool_requests.put(request_id, leg)

    def _reply(self, reply: Reply, now: float) -> None:
        context = reply.context
        if type(context) is _Replay:
            self._replay_answered(context, reply, now)
            return
        pending: PendingRequest | None = context
        if pending is None or pending.answered:
            return  # answered already (timed out) or a request of our own
        pending.answered = True
        if pending.event is not None:  # a handshake request (a submit's pending keeps no event)
            self._handshake_answered(pending)
        method = pending.method
        if method == "mining.submit":
            if pending.leg is not None:
                pending.leg.pending -= 1
            if reply.accepted:
                self.counters.accepted += 1
                self.counters.accepted_difficulty += self._difficulty or 1.0
            else:
                self.counters.rejected += 1
                reason = reject_reason_name(read_verdict(reply.response).code)
                self.counters.rejected_by_reason[reason] = self.counters.rejected_by_reason.get(reason, 0) + 1
        elif method == "mining.subscribe":
            values = _subscribe_values(reply.response)
            if values is not None:
                self.rig_extranonce = values
                if pending.leg is not None:
                    pending.leg.extranonce1, pending.leg.extranonce2_size = values
        elif method == "mining.configure":
            mask = _configured_mask(reply.response)
            if mask is not None:
                self.rig_version_mask = mask
                if pending.leg is not None:
                    pending.leg.version_mask = mask
        elif method == "mining.authorize" and reply.accepted and isinstance(pending.event, Authorize):
            self._remember_worker(pending.event.params.user, pending.event.params.password)
        elif method == "mining.authorize" and isinstance(pending.event, Authorize):
            if self._authorize_refusals is None:
                self._authorize_refusals = []
            if len(self._authorize_refusals) < MAX_HANDSHAKE_RECORDS:
                self._authorize_refusals.append((pending.event.params.user, bytes(reply.response.error).decode(errors="replace")))
        if pending.miner_id is not None:
            self.miner.respond_raw(msgspec.structs.replace(reply.response, id=pending.miner_id))

    def _handshake_answered(self, pending: PendingRequest) -> None:
        """The answer to a recorded handshake request came: its record keeps the request alone."""
        records = self._handshake
        for index, (event, recorded) in enumerate(records):
            if recorded is pending:
                records[index] = (event, _ANSWERED)
                return

    def upstream_lost(self, reason: str, now: float, *, leg: Leg | None = None, release: bool = True) -> None:
        """An upstream session is gone: answer its pending requests with explicit errors.

        With ``release`` (the default, and what a proxy without failover does) the
        rig is then released: closing its connection lets its own failover (or a
        reconnect to this proxy, which opens a fresh upstream) take over, as cgminer
        expects. Without, the channel stays open for :meth:`switch_upstream` or
        :meth:`request_reconnect`; a rig that has not had its subscribe result yet
        keeps its unanswered handshake requests for the next upstream.
        """
        leg = self.leg if leg is None else leg
        if leg is None:
            if not release:
                return  # never attached: what the rig sent waits for the next upstream
            for event in self._early or ():
                request_id = getattr(event, "id", None)
                if type(event) is not MinerResponse and request_id is not None:
                    self._error(PendingRequest(request_id, event.__struct_config__.tag, now), reason)
            self._early = None
            self._close(f"upstream lost: {reason}")
            return
        if leg.state == "gone":
            return
        was = leg.state
        leg.state = "gone"
        leg.failure = reason
        for job_id in leg.jobs:
            self._remember_old_job(job_id)
        keep_handshake = not release and was == "current" and not self.miner.subscribed
        retried: list[PendingRequest] = []
        for pending in self._pending:
            if pending.answered or pending.leg is not leg:
                continue
            if keep_handshake and pending.method != "mining.submit" and pending.event is not None:
                pending.answered = True  # forwarded again to the next upstream
                retried.append(pending)
                continue
            self._error(pending, reason)
        if retried:
            again = {id(p) for p in retried}
            self._handshake = [(e, p) for e, p in self._handshake if p is None or id(p) not in again]
            self._early = [p.event for p in retried] + (self._early or [])
        if was == "joining":
            self._switch_result(SwitchResult(leg, False, reason))
        self.legs.remove(leg)
        if leg is self.leg:
            self.leg = None
            if release:
                self._answer_everything(reason)
                self._close(f"upstream lost: {reason}")
        self._check_reconnect(now)

    def _error(self, pending: PendingRequest, reason: str) -> None:
        pending.answered = True
        if pending.method == "mining.submit":
            self.counters.lost_upstream += 1
            if pending.leg is not None:
                pending.leg.pending -= 1
            self.miner.respond_error(
                pending.miner_id,
                20,
                f"Upstream pool connection lost before its verdict ({reason}); share not confirmed",
                result=FALSE,
            )
        elif pending.miner_id is not None:
            self.miner.respond_error(pending.miner_id, 20, f"Upstream pool unavailable: {reason}")

    def _answer_everything(self, reason: str) -> None:
        for pending in self._pending:
            if not pending.answered:
                self._error(pending, reason)
        for event in self._early or ():
            request_id = getattr(event, "id", None)
            if type(event) is not MinerResponse and request_id is not None:
                self._error(PendingRequest(request_id, event.__struct_config__.tag, 0.0), reason)
        self._early = None

    def _remember_old_job(self, job_id: str) -> None:
        if self._old_jobs is None:
            self._old_jobs = BoundedMap(OLD_JOBS_KEPT)
        self._old_jobs.put(job_id, None)

    # ------------------------------------------------------------- switching

    def switch_upstream(self, upstream: UpstreamSession, now: float, key: Any = None) -> Leg:
        """Start moving the rig to a new upstream session (see the module docs).

        For a rig that has had its subscribe result, call this only if it
        subscribed to extranonce changes (:attr:`extranonce_subscribed`); others
        need :meth:`request_reconnect`. The outcome comes from :meth:`take_switch_results`.
        """
        for leg in self.legs:
            if leg.state == "joining":  # a switch already under way is abandoned
                self._abandon(leg, "superseded by another switch")
        leg = Leg(upstream, key, "joining")
        leg.switched_at = now
        self.legs.append(leg)
        if self.leg is None and not self.miner.subscribed:
            # The rig has not seen any upstream yet: it simply gets this one.
            leg.state = "current"
            self.leg = leg
            for event, pending in self._handshake:
                # id-null requests, and a configure answered already (it goes out at once)
                if pending is None or (pending.answered and type(event) is Configure):
                    self._replay(leg, event)
            early, self._early = self._early, None
            for event in early or ():
                self._forward(event, now)
            self.counters.switches += 1
            self._switch_result(SwitchResult(leg, True))
            return leg
        subscribed_again = False
        for event, pending in self._handshake:
            kind = type(event)
            if pending is not None and not pending.answered:
                continue  # still on its way on the current leg
            if kind is Subscribe:
                if subscribed_again:
                    continue
                subscribed_again = True
            elif kind is Authorize:
                if event.params.user not in self._authorized:
                    continue  # the rig's own authorize failed: do not replay it
            self._replay(leg, event)
        if not subscribed_again:
            self._replay(leg, Subscribe(id=0))
        return leg

    def _replay(self, leg: Leg, event: Any) -> None:
        kind = type(event)
        context = _Replay(leg, event.__struct_config__.tag)
        if kind is Subscribe:
            # Not the old session id: it names a session of another pool.
            leg.session.subscribe(event.params.user_agent, None, context=context)
        else:
            leg.session.request(event.__struct_config__.tag, _params(event.params), context=context)
        if kind is Subscribe or kind is Authorize:
            # Only these are waited for: pools may leave the others unanswered
            # (ckpool ignores suggest_difficulty and extranonce.subscribe).
            leg.replays += 1

    def _replay_answered(self, context: _Replay, reply: Reply, now: float) -> None:
        leg = context.leg
        if leg.state == "gone":
            return
        response = reply.response
        if context.method == "mining.configure":
            leg.version_mask = _configured_mask(response)
            if (
                leg.state == "current"
                and leg.version_mask is not None
                and self.rig_version_mask is not None
                and leg.version_mask != self.rig_version_mask
            ):
                self.miner.set_version_mask(leg.version_mask)  # the answer came after the switch
                self.rig_version_mask = leg.version_mask
            return
        if context.method not in ("mining.subscribe", "mining.authorize"):
            return
        leg.replays -= 1
        if context.method == "mining.subscribe":
            values = _subscribe_values(response)
            if values is None:
                self._abandon(leg, f"subscribe refused by the new upstream: {bytes(response.error).decode(errors='replace')}")
                return
            leg.extranonce1, leg.extranonce2_size = values
        elif not reply.accepted:
            self._abandon(leg, f"authorize refused by the new upstream: {bytes(response.error).decode(errors='replace')}")
            return
        if leg.state == "joining" and leg.replays == 0 and leg.extranonce1 is not None:
            self._complete_switch(leg, now)

    def _abandon(self, leg: Leg, reason: str) -> None:
        if leg.state != "joining":
            return
        leg.state = "gone"
        leg.failure = reason
        self.legs.remove(leg)
        self._switch_result(SwitchResult(leg, False, reason))

    def _complete_switch(self, leg: Leg, now: float) -> None:
        old = self.leg
        if old is not None and old.state == "current":
            old.state = "draining"
            old.switched_at = now
        leg.state = "current"
        self.leg = leg
        self.counters.switches += 1
        miner = self.miner
        assert leg.extranonce1 is not None and leg.extranonce2_size is not None
        values = (leg.extranonce1, leg.extranonce2_size)
        if values != self.rig_extranonce:
            self.counters.extranonce_changes += 1
            miner.set_extranonce(*values)
            self.rig_extranonce = values
        if leg.version_mask is not None and self.rig_version_mask is not None and leg.version_mask != self.rig_version_mask:
            miner.set_version_mask(leg.version_mask)
            self.rig_version_mask = leg.version_mask
        leg.force_clean = True
        held, leg.held = leg.held, None
        for event in held or ():
            self._notification(leg, event, now)
            if self.closed:
                break
        self._switch_result(SwitchResult(leg, True))

    def _switch_result(self, result: SwitchResult) -> None:
        if self._switch_results is None:
            self._switch_results = []
        self._switch_results.append(result)

    def take_switch_results(self) -> list[SwitchResult]:
        results, self._switch_results = self._switch_results, None
        return [] if results is None else results

    def fail_leg(self, leg: Leg, reason: str, now: float) -> None:
        """Give up on a leg whose upstream is declared down: its pending requests get explicit errors."""
        self.upstream_lost(reason, now, leg=leg, release=False)

    def retire_drained(self, now: float) -> list[Leg]:
        """Draining legs done with: no share pending and ``drain_timeout`` passed. The driver closes them."""
        done = [
            leg
            for leg in self.legs
            if leg.state == "draining" and leg.pending <= 0 and now >= leg.switched_at + self.drain_timeout
        ]
        for leg in done:
            self.upstream_lost("upstream changed", now, leg=leg, release=False)
        return done

    def request_reconnect(self, reason: str, now: float, params: list[Any] | None = None) -> None:
        """Send ``client.reconnect`` (then close) once the shares in flight have their verdicts.

        The verdicts are waited for at most ``drain_timeout`` seconds; shares still
        unanswered then get explicit errors.
        """
        if self._reconnect is None and not self.closed:
            for leg in self.legs:
                if leg.state == "joining":
                    self._abandon(leg, "the rig is reconnected instead")
            self._reconnect = (params or [], now + self.drain_timeout, reason)
            self._check_reconnect(now)

    def _check_reconnect(self, now: float) -> None:
        plan = self._reconnect
        if plan is None or self.closed:
            return
        if self._reconnect_sent is not None:
            if now >= self._reconnect_sent:
                self.release(self.reconnect_reason or "client.reconnect sent")
            return
        params, deadline, reason = plan
        waiting = [p for p in self._pending if not p.answered and p.method == "mining.submit"]
        if waiting and now < deadline:
            return
        for pending in waiting:
            self._error(pending, f"{reason}; no verdict within {self.drain_timeout:g} s")
        self.counters.reconnects_sent += 1
        self.miner.reconnect(params)
        # Linger: a share the rig sent before it read the reconnect is still
        # relayed (the pool credits it), and answered if the rig still listens.
        self._reconnect_sent = now + RECONNECT_LINGER
        self.reconnect_reason = f"client.reconnect sent: {reason}"

    def release(self, reason: str) -> None:
        """Close the rig's connection on purpose (answering what is pending first)."""
        self._answer_everything(reason)
        self._close(reason)

    # ------------------------------------------------------------------ time

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due; None: nothing is."""
        pending = self._pending
        while pending and pending[0].answered:
            pending.pop(0)
        deadlines = [pending[0].deadline] if pending else []
        if self._reconnect_sent is not None and not self.closed:
            deadlines.append(self._reconnect_sent)
        elif self._reconnect is not None and not self.closed:
            deadlines.append(self._reconnect[1])
        for leg in self.legs:
            if leg.state == "draining" and leg.pending <= 0:
                deadlines.append(leg.switched_at + self.drain_timeout)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        """Answer requests whose verdict did not come in time."""
        pending = self._pending
        while pending and (pending[0].answered or pending[0].deadline <= now):
            request = pending.pop(0)
            if request.answered:
                continue
            request.answered = True
            leg = request.leg
            if leg is not None and leg.state != "gone" and request.upstream_id is not None:
                leg.session.cancel(request.upstream_id)
            if request.method == "mining.submit":
                if leg is not None:
                    leg.pending -= 1
                self.counters.timed_out += 1
                self.miner.respond_error(
                    request.miner_id,
                    20,
                    f"Pool gave no verdict within {self.submit_timeout:g} s; share not confirmed",
                    result=FALSE,
                )
            # Other requests the pool leaves unanswered (ckpool ignores
            # suggest_difficulty and extranonce.subscribe) stay unanswered, as
            # they would be on a direct connection.
        self._check_reconnect(now)

    def statistics(self) -> MinerChannelStatistics:
        return MinerChannelStatistics(
            **self.counters.values(),
            pending=sum(1 for p in self._pending if not p.answered),
            difficulty=self._difficulty,
        )


def _handshake_key(event: Any) -> Any:
    kind = type(event)
    return (kind, event.params.user) if kind is Authorize else kind


def _params(params: Any) -> list[Any]:
    if isinstance(params, Struct):
        return params_list(params)
    return list(params)
