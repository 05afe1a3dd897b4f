"""The sans-IO core of one miner connection through the miner-side proxy.

A :class:`MinerChannel` joins two sessions: a
:class:`~bridge.sv1.server.ServerSession` facing the rig, and an *upstream
session* facing the pool. The upstream session is anything with the
:class:`~bridge.sv1.client.ClientSession` request/event vocabulary: a plain SV1
connection (``stratum+tcp://``, ``stratum+ssl://``) today, a StratumRM channel
later. The channel never touches a socket or a clock: the driver feeds it bytes
and events with the current time ``now``, asks :meth:`next_deadline`, calls
:meth:`on_timer`, and writes what the sessions queued.

Transparency rules (reference/stratum-v1.md §4.6, design brief §5):

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
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import msgspec
from msgspec import Raw, Struct

from bridge.sv1.events import ProtocolViolation, Reply, UnknownPoolRequest
from bridge.sv1.framing import DEFAULT_MAX_LINE
from bridge.sv1.messages import (
    FALSE,
    GetVersion,
    MinerResponse,
    Notify,
    Ping,
    Reconnect,
    RequestId,
    SetDifficulty,
    SetExtranonce,
    SetVersionMask,
    ShowMessage,
    Submit,
    Subscribe,
    SubmitParams,
    params_list,
)
from bridge.sv1.server import ServerSession


class UpstreamSession(Protocol):
    """What a miner channel needs from whatever carries it to the pool."""

    def subscribe(self, user_agent: str | None, session_id: str | None = None, context: Any = None) -> int | None: ...
    def submit(self, params: SubmitParams, context: Any = None) -> int | None: ...
    def request(self, method: str, params: list[Any] | Raw, context: Any = None) -> int | None: ...
    def respond_raw(self, response: Any) -> None: ...
    def cancel(self, request_id: int) -> None: ...


class PendingRequest:
    """A rig's request on its way to the pool; the context of the upstream request."""

    __slots__ = ("miner_id", "method", "deadline", "upstream_id", "answered")

    def __init__(self, miner_id: RequestId, method: str, deadline: float) -> None:
        self.miner_id = miner_id
        self.method = method
        self.deadline = deadline
        self.upstream_id: int | None = None
        self.answered = False


class MinerChannelStatistics(Struct, frozen=True):
    submitted: int
    accepted: int
    rejected: int
    timed_out: int
    lost_upstream: int
    pending: int
    notifies: int
    violations: int


# What a connection that is not Stratum looks like in its first bytes.
_NOT_STRATUM = (
    (b"\x16\x03", "a TLS ClientHello (bfgminer probes with one; it then retries in plain Stratum)"),
    (b"GET ", "an HTTP request"),
    (b"POST ", "an HTTP request"),
    (b"HEAD ", "an HTTP request"),
    (b"PRI * HTTP/2", "an HTTP/2 preface"),
    (b"SSH-", "an SSH client"),
)


def identify_non_stratum(first_bytes: bytes) -> str | None:
    """Name what a connection's first bytes are if they are clearly not Stratum."""
    for prefix, what in _NOT_STRATUM:
        if first_bytes.startswith(prefix):
            return what
    return None


class MinerChannel:
    """One rig connection relayed to one upstream session."""

    def __init__(
        self,
        *,
        submit_timeout: float = 60.0,
        request_timeout: float = 60.0,
        max_line: int = DEFAULT_MAX_LINE,
    ) -> None:
        self.miner = ServerSession(max_line=max_line)
        self.upstream: UpstreamSession | None = None
        self.submit_timeout = submit_timeout
        self.request_timeout = request_timeout
        self.wants_upstream = False
        self.close_reason: str | None = None
        self._first_bytes = True
        self._early: list[Any] = []
        self._pending: deque[PendingRequest] = deque()
        self._submitted = 0
        self._accepted = 0
        self._rejected = 0
        self._timed_out = 0
        self._lost = 0
        self._notifies = 0
        self._violations = 0

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

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
            kind = type(event)
            if kind is ProtocolViolation:
                self._violations += 1
                if event.fatal:
                    self._close(f"protocol violation from the rig: {event.reason}")
                    return
                continue
            self.wants_upstream = True
            if self.upstream is None:
                self._early.append((event, now))
            else:
                self._forward(event, now)

    def attach_upstream(self, upstream: UpstreamSession, now: float) -> None:
        """The driver has connected the upstream; pass it what the rig already sent."""
        self.upstream = upstream
        early, self._early = self._early, []
        for event, _received_at in early:
            self._forward(event, now)

    def _forward(self, event: Any, now: float) -> None:
        upstream = self.upstream
        assert upstream is not None
        kind = type(event)
        if kind is MinerResponse:
            upstream.respond_raw(event)
            return
        if kind is Submit:
            self._submitted += 1
            pending = PendingRequest(event.id, "mining.submit", now + self.submit_timeout)
            pending.upstream_id = upstream.submit(event.params, context=pending)
            self._pending.append(pending)
            return
        method = event.__struct_config__.tag
        pending = PendingRequest(event.id, method, now + self.request_timeout)
        if kind is Subscribe:
            params = event.params
            session_id = None if params.session_id is None else str(params.session_id)
            pending.upstream_id = upstream.subscribe(params.user_agent, session_id, context=pending)
        else:
            pending.upstream_id = upstream.request(method, _params(event.params), context=pending)
        if event.id is not None:
            self._pending.append(pending)

    # -------------------------------------------------------------- pool side

    def upstream_events(self, events: list[Any], now: float) -> None:
        """Events from the upstream session."""
        miner = self.miner
        for event in events:
            kind = type(event)
            if kind is Reply:
                self._reply(event)
            elif kind is Notify:
                self._notifies += 1
                miner.notify(event.params)
            elif kind is SetDifficulty:
                miner.set_difficulty(event.difficulty)
            elif kind is SetExtranonce:
                miner.send_request(None, "mining.set_extranonce", params_list(event.params))
            elif kind is SetVersionMask:
                miner.set_version_mask(event.mask)
            elif kind is ShowMessage:
                miner.show_message(event.text)
            elif kind is GetVersion or kind is Ping:
                miner.send_request(event.id, event.__struct_config__.tag, event.params)
            elif kind is UnknownPoolRequest:
                miner.send_request(event.id, event.method, event.params)
            elif kind is Reconnect:
                # The pool wants its miners elsewhere (or back). The rig's upstream
                # is this proxy, so ask the rig to come back here and close: the
                # next connection goes upstream afresh.
                miner.reconnect([])
                self._close(f"pool sent client.reconnect {msgspec.json.encode(event.params).decode()}")
            elif kind is ProtocolViolation:
                self._violations += 1
                if event.fatal:
                    self.upstream_lost(f"pool protocol violation: {event.reason}", now)

    def _reply(self, reply: Reply) -> None:
        pending: PendingRequest = reply.context
        if pending is None or pending.answered:
            return  # answered already (timed out) or a request of our own
        pending.answered = True
        if pending.method == "mining.submit":
            if reply.accepted:
                self._accepted += 1
            else:
                self._rejected += 1
        if pending.miner_id is not None:
            self.miner.respond_raw(msgspec.structs.replace(reply.response, id=pending.miner_id))

    def upstream_lost(self, reason: str, now: float) -> None:
        """The upstream is gone: answer every pending request, then release the rig.

        Closing the rig's connection lets its own failover (or a reconnect to this
        proxy, which opens a fresh upstream) take over, as cgminer expects.
        """
        for event, _received_at in self._early:  # never reached an upstream
            request_id = getattr(event, "id", None)
            if type(event) is not MinerResponse and request_id is not None:
                self._pending.append(PendingRequest(request_id, event.__struct_config__.tag, now))
        self._early.clear()
        for pending in self._pending:
            if pending.answered:
                continue
            pending.answered = True
            if pending.method == "mining.submit":
                self._lost += 1
                self.miner.respond_error(
                    pending.miner_id,
                    20,
                    f"Upstream pool connection lost before its verdict ({reason}); share not confirmed",
                    result=FALSE,
                )
            else:
                self.miner.respond_error(pending.miner_id, 20, f"Upstream pool unavailable: {reason}")
        self._pending.clear()
        self._close(f"upstream lost: {reason}")

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> float | None:
        pending = self._pending
        while pending and pending[0].answered:
            pending.popleft()
        return pending[0].deadline if pending else None

    def on_timer(self, now: float) -> None:
        """Answer requests whose verdict did not come in time."""
        pending = self._pending
        while pending and (pending[0].answered or pending[0].deadline <= now):
            request = pending.popleft()
            if request.answered:
                continue
            request.answered = True
            if self.upstream is not None and request.upstream_id is not None:
                self.upstream.cancel(request.upstream_id)
            if request.method == "mining.submit":
                self._timed_out += 1
                self.miner.respond_error(
                    request.miner_id,
                    20,
                    f"Pool gave no verdict within {self.submit_timeout:g} s; share not confirmed",
                    result=FALSE,
                )
            # Other requests the pool leaves unanswered (ckpool ignores
            # suggest_difficulty and extranonce.subscribe) stay unanswered, as
            # they would be on a direct connection.

    def statistics(self) -> MinerChannelStatistics:
        return MinerChannelStatistics(
            submitted=self._submitted,
            accepted=self._accepted,
            rejected=self._rejected,
            timed_out=self._timed_out,
            lost_upstream=self._lost,
            pending=sum(1 for p in self._pending if not p.answered),
            notifies=self._notifies,
            violations=self._violations,
        )


def _params(params: Any) -> list[Any]:
    if isinstance(params, Struct):
        return params_list(params)
    return list(params)
