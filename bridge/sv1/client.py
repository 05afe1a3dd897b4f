"""The miner's side of one Stratum V1 connection: a sans-IO state machine facing a pool.

Theory of operation: request methods (:meth:`ClientSession.subscribe`,
:meth:`~ClientSession.submit` ...) assign the next integer request id, remember
the caller's ``context`` under it, and queue a line; :meth:`receive_data` turns
the pool's bytes into events: the pool's notification Structs
(:class:`~bridge.sv1.messages.Notify`, ``SetDifficulty``, ``Reconnect`` ...),
:class:`~bridge.sv1.events.Reply` for answers matched to our requests,
:class:`~bridge.sv1.events.UnknownPoolRequest` for methods we do not know (a
relay passes them on), and :class:`~bridge.sv1.events.ProtocolViolation`.

Pool-side ordering is enforced here, so a
relay can forward a miner's pipelined handshake as it arrives: ckpool drops a
client that sends a non-handshake method before subscribe, fails an authorize
sent before subscribe, and silently ignores requests sent before authorisation
has finished. So ``mining.configure`` and ``mining.subscribe`` go out at once,
``mining.authorize`` waits for the subscribe result, and everything else waits
for the first authorize result. Held requests keep their order.

The session keeps what the pool told it (extranonce1, extranonce2 size,
difficulty, version mask, the subscription id used to resume) because a relay or
a miner needs it, and because the StratumRM sidecar reports it to the miner side.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, Raw, Struct

from bridge.errors import LineTooLong
from bridge.sv1.events import ProtocolViolation, Reply, UnknownPoolRequest
from bridge.sv1.framing import DEFAULT_MAX_LINE, BoundedDecoder, LineBuffer, decode_json
from bridge.sv1.messages import (
    NULL,
    POOL_METHODS,
    Notify,
    OutgoingRequest,
    PoolRequest,
    RequestId,
    Response,
    SetDifficulty,
    SetExtranonce,
    SetVersionMask,
    SubmitParams,
    params_list,
)
from bridge.sv1.validate import check_notify, is_hex


class _PoolLine(Struct, frozen=True):
    """First-pass shape of a line from the pool."""

    id: Any = None
    method: Any = UNSET
    params: Raw = Raw(b"[]")
    result: Any = UNSET


_decode_line = BoundedDecoder[_PoolLine](_PoolLine).decode
_decode_pool_request = BoundedDecoder[PoolRequest](PoolRequest).decode
_decode_response = BoundedDecoder[Response](Response).decode
_encode = msgspec.json.Encoder().encode

# Methods that may be sent before the handshake is over.
_IMMEDIATE = frozenset({"mining.configure", "mining.subscribe"})
DEFAULT_MAX_PENDING = 4096


class _Pending(Struct):
    method: str
    context: Any


class ClientSessionStatistics(Struct, frozen=True):
    lines_received: int
    lines_sent: int
    pending_requests: int
    held_requests: int
    unmatched_replies: int
    violations: int
    subscribed: bool
    authorized: bool


ClientEvent = PoolRequest | Reply | UnknownPoolRequest | ProtocolViolation


class ClientSession:
    """One connection to a pool (or to a proxy acting as one), seen from the miner.

    The sidecar keeps one per rig, so it has slots and nothing it holds is created
    before it is needed (requests held for ordering are a plain list: a deque costs
    760 bytes empty).
    """

    __slots__ = (
        "_held",
        "_lines",
        "_lines_received",
        "_lines_sent",
        "_next_id",
        "_out",
        "_pending",
        "_unmatched",
        "_violations",
        "authorize_answered",
        "authorized",
        "closed",
        "difficulty",
        "extranonce1",
        "extranonce2_size",
        "max_pending",
        "subscribe_answered",
        "subscribed",
        "subscription_id",
        "version_mask",
    )

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self._lines = LineBuffer(max_line)
        self._out: list[bytes] = []
        self._pending: dict[int, _Pending] = {}
        self._held: list[tuple[str, list[Any] | Raw, Any]] = []
        self._next_id = 1
        self.max_pending = max_pending
        self.closed = False
        # What the pool has told us.
        self.subscribed = False
        self.subscribe_answered = False
        self.authorize_answered = False
        self.authorized = False
        self.extranonce1: str | None = None
        self.extranonce2_size: int | None = None
        self.subscription_id: str | None = None
        self.difficulty: float | int = 1
        self.version_mask: str | None = None
        self._lines_received = 0
        self._lines_sent = 0
        self._unmatched = 0
        self._violations = 0

    # --------------------------------------------------------------- requests

    def configure(self, extensions: list[str], params: dict[str, Any], context: Any = None) -> int | None:
        return self.request("mining.configure", [extensions, params], context)

    def subscribe(self, user_agent: str | None, session_id: str | None = None, context: Any = None) -> int | None:
        params: list[Any] = []
        if user_agent is not None or session_id is not None:
            params.append(user_agent)
        if session_id is not None:
            params.append(session_id)
        return self.request("mining.subscribe", params, context)

    def authorize(self, user: str, password: str | None = None, context: Any = None) -> int | None:
        params = [user] if password is None else [user, password]
        return self.request("mining.authorize", params, context)

    def submit(self, params: SubmitParams, context: Any = None) -> int | None:
        return self.request("mining.submit", params_list(params), context)

    def suggest_difficulty(self, difficulty: float, context: Any = None) -> int | None:
        return self.request("mining.suggest_difficulty", [difficulty], context)

    def extranonce_subscribe(self, context: Any = None) -> int | None:
        return self.request("mining.extranonce.subscribe", [], context)

    def request(self, method: str, params: list[Any] | Raw, context: Any = None) -> int | None:
        """Send any request; returns its id, or None while it is held for ordering.

        Held requests get their id when they are released; the ``context`` comes
        back on the :class:`Reply` either way.
        """
        if self.closed:
            raise RuntimeError("session is closed")
        if len(self._pending) + len(self._held) >= self.max_pending:
            raise OverflowError(f"{self.max_pending} requests already unanswered by the pool; it is stalled")
        if not self._may_send(method):
            self._held.append((method, params, context))
            return None
        return self._send(method, params, context)

    def _may_send(self, method: str) -> bool:
        if method in _IMMEDIATE:
            return True
        if method == "mining.authorize":
            return self.subscribe_answered
        return self.authorize_answered

    def _send(self, method: str, params: list[Any] | Raw, context: Any) -> int:
        request_id = self._next_id
        self._next_id += 1
        self._pending[request_id] = _Pending(method, context)
        self._write(OutgoingRequest(request_id, method, params))
        return request_id

    def _release_held(self) -> None:
        """Send every held request that may go now, keeping their relative order."""
        if not self._held:
            return
        held, self._held = self._held, []
        for method, params, context in held:
            if self._may_send(method):
                self._send(method, params, context)
            else:
                self._held.append((method, params, context))

    def respond(self, request_id: RequestId, result: Any = None, error: Any = None) -> None:
        """Answer a request the pool sent (``client.get_version``, ``mining.ping``)."""
        if request_id is None:
            return
        raw_error = NULL if error is None else Raw(_encode(error))
        self._write(Response(request_id, Raw(_encode(result)), raw_error))

    def respond_raw(self, response: Response) -> None:
        """Relay a miner's answer to a pool request."""
        if response.id is not None:
            self._write(response)

    def cancel(self, request_id: int) -> None:
        """Forget a request; a late answer to it becomes an unmatched reply."""
        self._pending.pop(request_id, None)

    def _write(self, message: Struct) -> None:
        self._lines_sent += 1
        self._out.append(_encode(message) + b"\n")

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        if self.closed:
            return []
        try:
            lines = self._lines.feed(data)
        except LineTooLong as exc:
            self.closed = True
            self._violations += 1
            return [ProtocolViolation(str(exc), fatal=True)]
        events: list[ClientEvent] = []
        for line in lines:
            self._lines_received += 1
            event = self._parse(line)
            if event is None:
                continue
            events.append(event)
            if type(event) is ProtocolViolation:
                self._violations += 1
                if event.fatal:
                    self.closed = True
                    break
        return events

    def _parse(self, line: bytes) -> ClientEvent | None:
        if b'"method"' not in line and b"\\u" not in line:
            # Nearly every line is a response (a share's verdict): decode it once. A line
            # that is not one, or not valid, takes the full parse below, which says why.
            try:
                response = _decode_response(line)
            except msgspec.DecodeError:
                pass
            else:
                return self._answered(response)
        try:
            head = _decode_line(line)
        except msgspec.ValidationError:
            return ProtocolViolation("line from the pool is not a JSON object", fatal=True, line=line)
        except msgspec.DecodeError:
            # ckpool writes "Invalid JSON, disconnecting" before it closes.
            return ProtocolViolation("invalid JSON from the pool", fatal=True, line=line)
        method = head.method
        if method is UNSET:
            return self._reply(head.id, line)
        if not isinstance(method, str):
            return ProtocolViolation("method is not a string", line=line)
        if method not in POOL_METHODS:
            request_id = head.id if isinstance(head.id, (int, str)) else None
            return UnknownPoolRequest(request_id, method, head.params)
        try:
            message = _decode_pool_request(line)
        except msgspec.ValidationError as exc:
            return ProtocolViolation(f"malformed {method}: {exc}", line=line)
        return self._apply(message, line)

    def _apply(self, message: PoolRequest, line: bytes) -> ClientEvent:
        if isinstance(message, Notify):
            try:
                check_notify(message.params)
            except ValueError as exc:
                return ProtocolViolation(str(exc), line=line)
        elif isinstance(message, SetDifficulty):
            difficulty = message.difficulty
            if not difficulty > 0:
                return ProtocolViolation(f"difficulty {difficulty!r} is not positive", line=line)
            self.difficulty = difficulty
        elif isinstance(message, SetExtranonce):
            params = message.params
            extranonce1 = params.extranonce1
            if extranonce1 is not None and (not is_hex(extranonce1) or len(extranonce1) % 2):
                return ProtocolViolation("mining.set_extranonce extranonce1 is not hex", line=line)
            if extranonce1 is not None:
                self.extranonce1 = extranonce1
            if params.extranonce2_size is not None:
                self.extranonce2_size = params.extranonce2_size
        elif isinstance(message, SetVersionMask):
            if not is_hex(message.mask, 8):
                return ProtocolViolation("mining.set_version_mask mask is not 8 hex digits", line=line)
            self.version_mask = message.mask
        return message

    def _reply(self, request_id: Any, line: bytes) -> ClientEvent | None:
        try:
            response = _decode_response(line)
        except msgspec.ValidationError as exc:
            return ProtocolViolation(f"malformed response: {exc}", line=line)
        return self._answered(response)

    def _answered(self, response: Response) -> ClientEvent | None:
        request_id: Any = response.id
        pending = self._pending.pop(request_id, None) if type(request_id) is int else None
        if pending is None:
            self._unmatched += 1
            return None
        method = pending.method
        if method == "mining.subscribe":
            self._subscribed(response)
        elif method == "mining.authorize":
            self.authorize_answered = True
            self.authorized = self.authorized or response.accepted
            self._release_held()
        elif method == "mining.configure":
            self._configured(response)
        return Reply(method, pending.context, response, request_id)

    def _subscribed(self, response: Response) -> None:
        self.subscribe_answered = True
        if response.result is not UNSET and bytes(response.error) == b"null":
            try:
                subscriptions, extranonce1, size = decode_json(response.result)[:3]
            except (ValueError, TypeError):
                subscriptions, extranonce1, size = None, None, None
            if isinstance(extranonce1, str) and is_hex(extranonce1) and isinstance(size, int):
                self.subscribed = True
                self.extranonce1 = extranonce1
                self.extranonce2_size = size
                self.subscription_id = notify_subscription_id(subscriptions)
        self._release_held()

    def _configured(self, response: Response) -> None:
        if response.result is UNSET:
            return
        try:
            result = decode_json(response.result)
        except msgspec.DecodeError:
            return
        if isinstance(result, dict) and result.get("version-rolling") is True:
            mask = result.get("version-rolling.mask")
            if isinstance(mask, str) and is_hex(mask, 8):
                self.version_mask = mask

    def statistics(self) -> ClientSessionStatistics:
        return ClientSessionStatistics(
            lines_received=self._lines_received,
            lines_sent=self._lines_sent,
            pending_requests=len(self._pending),
            held_requests=len(self._held),
            unmatched_replies=self._unmatched,
            violations=self._violations,
            subscribed=self.subscribed,
            authorized=self.authorized,
        )


def notify_subscription_id(subscriptions: Any) -> str | None:
    """The id of the ``mining.notify`` subscription, which cgminer sends to resume."""
    if not isinstance(subscriptions, list):
        return None
    if len(subscriptions) == 2 and all(isinstance(s, str) for s in subscriptions):
        subscriptions = [subscriptions]
    for entry in subscriptions:
        if (
            isinstance(entry, list)
            and len(entry) >= 2
            and isinstance(entry[0], str)
            and entry[0].lower() == "mining.notify"
            and isinstance(entry[1], str)
        ):
            return entry[1]
    return None
