"""The pool's side of one Stratum V1 connection: a sans-IO state machine facing a miner.

Theory of operation (h11 style): the driver hands received bytes to
:meth:`ServerSession.receive_data`, which returns *events*: the miner's request
Structs themselves (:class:`~bridge.sv1.messages.Submit`, ``Subscribe`` ...),
:class:`~bridge.sv1.messages.MinerResponse` for answers to our own requests, and
:class:`ProtocolViolation` for bad input. The user answers with the ``respond*``
and notification methods, which queue bytes; the driver writes
:meth:`data_to_send` to the socket. No I/O, no clock.

Rules enforced here, because every miner-facing server needs them:

- ids are echoed exactly as sent (int, string or null), and a request with
  ``"id": null`` is never answered (bfgminer's ``suggest_target`` comes before
  ``subscribe``; a reply would be read as the subscribe result);
- configure/subscribe/authorize are accepted in any order and pipelined, but the
  subscribe result is the first line the miner receives after its subscribe:
  notifications and answers to other handshake requests are held until the
  subscribe result has been sent (the ``mining.configure`` answer, which BIP310
  wants first, and error replies are the exceptions);
- malformed input never raises: invalid JSON and oversized lines are fatal
  violations (the driver closes, as ckpool does), unknown methods and bad params
  are answered with error 20 and a message that names the problem;
- ``mining.submit`` before a successful subscribe is answered with 25, before any
  successful authorize with 24; hex fields are validated and JSON-number
  ntime/nonce normalised to 8 hex digits, so users get clean values.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, Raw, Struct

from bridge.errors import LineTooLong
from bridge.sv1.events import ProtocolViolation
from bridge.sv1.framing import DEFAULT_MAX_LINE, BoundedDecoder, LineBuffer
from bridge.sv1.messages import (
    FALSE,
    MINER_METHODS,
    NULL,
    Authorize,
    Configure,
    DifficultyParams,
    Envelope,
    ExtranonceSubscribe,
    MinerRequest,
    MinerResponse,
    Notify,
    NotifyParams,
    OutgoingRequest,
    Reconnect,
    RequestId,
    Response,
    SetDifficulty,
    SetExtranonce,
    SetExtranonceParams,
    SetVersionMask,
    ShowMessage,
    Submit,
    Subscribe,
    TextParams,
    error_value,
    number,
)
from bridge.sv1.validate import normalise_submit

_decode_request = BoundedDecoder[MinerRequest](MinerRequest).decode
_decode_envelope = BoundedDecoder[Envelope](Envelope).decode
_decode_response = BoundedDecoder[MinerResponse](MinerResponse).decode
_encode = msgspec.json.Encoder().encode

# Pipelined handshake requests waiting for their answer; a miner has a handful.
MAX_PENDING_HANDSHAKE = 32
# Lines held back until the subscribe result has been sent.
MAX_HELD_LINES = 64
# Worker names one connection keeps as authorized; a rig has one or a few.
MAX_AUTHORIZED_WORKERS = 300


class ServerSessionStatistics(Struct, frozen=True):
    lines_received: int
    lines_sent: int
    submits: int
    violations: int
    subscribed: bool
    authorized_workers: int


ServerEvent = MinerRequest | MinerResponse | ProtocolViolation


class ServerSession:
    """One miner connection, seen from the pool (or from a proxy acting as one)."""

    # One per rig at the proxy: slots save its instance dict (about 300 B at this many attributes).
    __slots__ = (
        "_held",
        "_lines",
        "_lines_received",
        "_lines_sent",
        "_out",
        "_pending",
        "_submits",
        "_violations",
        "authorized_workers",
        "closed",
        "extranonce_subscribed",
        "subscribed",
        "user_agent",
    )

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        self._lines = LineBuffer(max_line)
        self._out: list[bytes] = []
        self._held: list[bytes] = []
        self._pending: dict[RequestId, Subscribe | Authorize | Configure] = {}
        self.subscribed = False
        self.closed = False
        self.user_agent: str | None = None
        #: Worker names authorized on this connection, at most MAX_AUTHORIZED_WORKERS (a
        #: tuple: nearly always one name, and a set is 216 B per rig at the proxy).
        self.authorized_workers: tuple[str, ...] = ()
        self.extranonce_subscribed = False
        self._lines_received = 0
        self._lines_sent = 0
        self._submits = 0
        self._violations = 0

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> list[ServerEvent]:
        """Feed bytes from the miner; return the events they complete."""
        if self.closed:
            return []
        try:
            lines = self._lines.feed(data)
        except LineTooLong as exc:
            self.closed = True
            self._violations += 1
            return [ProtocolViolation(str(exc), fatal=True)]
        events: list[ServerEvent] = []
        for line in lines:
            self._lines_received += 1
            event = self._parse(line)
            if event is not None:
                events.append(event)
                if isinstance(event, ProtocolViolation):
                    self._violations += 1
                    if event.fatal:
                        self.closed = True
                        break
        return events

    def _parse(self, line: bytes) -> ServerEvent | None:
        try:
            request = _decode_request(line)
        except msgspec.DecodeError:
            return self._classify(line)
        if type(request) is Submit:
            return self._check_submit(request, line)
        return self._track(request)

    def _classify(self, line: bytes) -> ServerEvent | None:
        """Work out why the typed decoder refused a line, answer if the protocol wants it."""
        try:
            envelope = _decode_envelope(line)
        except msgspec.ValidationError:
            return ProtocolViolation("line is not a JSON object", fatal=True, line=line)
        except msgspec.DecodeError as exc:
            return ProtocolViolation(f"invalid JSON: {exc}", fatal=True, line=line)
        request_id = envelope.id
        answerable = isinstance(request_id, (int, str)) and not isinstance(request_id, bool)
        method = envelope.method
        if method is UNSET:
            if envelope.result is not UNSET or envelope.error is not UNSET:
                try:
                    return _decode_response(line)
                except msgspec.ValidationError as exc:
                    return ProtocolViolation(f"malformed response: {exc}", line=line)
            reason = "neither a method nor a result"
        elif not isinstance(method, str):
            reason = "method is not a string"
        elif method in MINER_METHODS:
            try:
                _decode_request(line)
            except msgspec.ValidationError as exc:
                detail = str(exc)
            else:  # pragma: no cover - the first decode failed for this line
                detail = "unreadable"
            if request_id is not None and not answerable:
                reason = f"invalid request id for {method}"
            else:
                reason = f"Invalid params for {method}: {detail}"
        else:
            reason = f"Unknown method {method!r}"
        if answerable:
            self.respond_error(request_id, 20, reason)
            return ProtocolViolation(reason, line=line, code=20)
        return ProtocolViolation(reason, line=line)

    def _check_submit(self, submit: Submit, line: bytes) -> ServerEvent:
        self._submits += 1
        if not self.subscribed:
            self.respond_error(submit.id, 25, "Not subscribed", result=FALSE)
            return ProtocolViolation("mining.submit before mining.subscribe", line=line, code=25)
        if not self.authorized_workers:
            self.respond_error(submit.id, 24, "Unauthorized worker", result=FALSE)
            return ProtocolViolation("mining.submit before a successful mining.authorize", line=line, code=24)
        try:
            return normalise_submit(submit)
        except ValueError as exc:
            self.respond_error(submit.id, 20, str(exc), result=FALSE)
            return ProtocolViolation(str(exc), line=line, code=20)

    def _track(self, request: MinerRequest) -> ServerEvent:
        if isinstance(request, Subscribe):
            self.user_agent = request.params.user_agent
        elif isinstance(request, ExtranonceSubscribe):
            self.extranonce_subscribed = True
        if isinstance(request, (Subscribe, Authorize, Configure)) and request.id is not None:
            if len(self._pending) >= MAX_PENDING_HANDSHAKE:
                return ProtocolViolation("too many unanswered handshake requests", fatal=True)
            self._pending[request.id] = request
        return request

    # ----------------------------------------------------------------- output

    def data_to_send(self) -> bytes:
        """Bytes queued for the miner since the last call."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def _emit(self, line: bytes, *, hold: bool) -> None:
        if hold and not self.subscribed:
            if len(self._held) >= MAX_HELD_LINES:
                self._held.pop(0)
            self._held.append(line)
            return
        self._lines_sent += 1
        self._out.append(line + b"\n")

    def respond(self, request_id: RequestId, result: Any = None, error: Any = None) -> None:
        """Answer a request with plain Python values."""
        raw_error = NULL if error is None else Raw(_encode(error))
        self.respond_raw(Response(request_id, Raw(_encode(result)), raw_error))

    def respond_error(self, request_id: RequestId, code: int, message: str, *, result: Raw = NULL) -> None:
        """Answer with ``[code, message, null]``; share rejects pass ``result=FALSE``."""
        self.respond_raw(Response(request_id, result, error_value(code, message)))

    def respond_raw(self, response: Response) -> None:
        """Answer with a (relayed) response whose id is already the miner's own.

        Never answers ``id: null``. The subscribe result releases held lines.
        """
        request_id = response.id
        if request_id is None:
            return
        pending = self._pending
        request = pending.pop(request_id, None) if pending else None
        if request is not None and not pending:
            self._pending = {}  # a fresh empty dict: an emptied one keeps its table
        is_subscribe_result = False
        if request is not None:
            ok = response.result is not UNSET and bytes(response.result) not in (b"null", b"false")
            ok = ok and bytes(response.error) == b"null"
            if isinstance(request, Subscribe):
                is_subscribe_result = ok
            elif isinstance(request, Authorize):
                if ok:
                    self.record_worker(request.params.user)
            else:  # Configure
                self._emit(_encode(response), hold=False)
                return
        is_error = bytes(response.error) != b"null"
        self._emit(_encode(response), hold=not (is_error or is_subscribe_result))
        if is_subscribe_result and not self.subscribed:
            self.subscribed = True
            held, self._held = self._held, []
            for line in held:
                self._emit(line, hold=False)

    def subscribe_result(
        self,
        request_id: RequestId,
        extranonce1: str,
        extranonce2_size: int,
        subscriptions: list[list[str]],
    ) -> None:
        self.respond(request_id, [subscriptions, extranonce1, extranonce2_size])

    def notify(self, params: NotifyParams) -> None:
        self._emit(_encode(Notify(params=params)), hold=True)

    def set_difficulty(self, difficulty: float) -> None:
        self._emit(_encode(SetDifficulty(params=DifficultyParams(number(difficulty)))), hold=True)

    def set_extranonce(self, extranonce1: str, extranonce2_size: int) -> None:
        params = SetExtranonceParams(extranonce1, extranonce2_size)
        self._emit(_encode(SetExtranonce(params=params)), hold=True)

    def set_version_mask(self, mask: str) -> None:
        self._emit(_encode(SetVersionMask(params=TextParams(mask))), hold=True)

    def reconnect(self, params: list[Any] | None = None) -> None:
        """``client.reconnect``; ``[]`` (the default) means "the same server"."""
        self._emit(_encode(Reconnect(params=params or [])), hold=True)

    def show_message(self, text: str) -> None:
        self._emit(_encode(ShowMessage(params=TextParams(text))), hold=True)

    def send_request(self, request_id: RequestId, method: str, params: list[Any] | Raw) -> None:
        """Send (or relay) any request or notification to the miner."""
        self._emit(_encode(OutgoingRequest(request_id, method, params)), hold=True)

    def record_worker(self, user: str) -> None:
        """Count ``user`` as authorized on this connection (up to MAX_AUTHORIZED_WORKERS)."""
        if user not in self.authorized_workers and len(self.authorized_workers) < MAX_AUTHORIZED_WORKERS:
            self.authorized_workers += (user,)

    def statistics(self) -> ServerSessionStatistics:
        return ServerSessionStatistics(
            lines_received=self._lines_received,
            lines_sent=self._lines_sent,
            submits=self._submits,
            violations=self._violations,
            subscribed=self.subscribed,
            authorized_workers=len(self.authorized_workers),
        )
