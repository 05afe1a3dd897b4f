"""StratumRM control-channel messages (JSON lines over TLS 1.3), sans-IO.

The control channel reads like Stratum: one JSON object per ``\\n``-terminated
line. Two families share it (bridge/wire/PROTOCOL.md, "Control channel"):

- **channel lines** carry one rig's Stratum V1 traffic. They are SV1 messages
  with one extra member, ``"ch"``, the channel number the proxy gave the rig's
  connection: ``{"ch":3,"id":7,"method":"mining.subscribe","params":[...]}`` and
  ``{"ch":3,"id":7,"result":[...],"error":null}``;
- **rm lines** are StratumRM's own methods, ``rm.``-prefixed, with an object as
  ``params``: ``{"id":1,"method":"rm.hello","params":{"version":1,...}}``.

:func:`decode_line` turns a line into a :class:`ControlLine` (an envelope with
raw params); :func:`decode_params` reads the params of an ``rm.`` method into the
message's own Struct: every method has its own type (:data:`RMMessage`, a tagged
union whose tag is the line's ``method``, :data:`RM_PARAMS`), so a receiver
dispatches with ``match`` on the type alone. :func:`encode_rm` writes a message
under its type's method; :data:`FROM_PROXY` and :data:`FROM_SIDECAR` say who may
send which. Nothing here keeps state: the control session
(:mod:`bridge.relay.control_session`) and the two cores do.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType, field

from bridge.sv1.framing import BoundedDecoder
from bridge.sv1.messages import NotifyParams, RequestId

PROTOCOL_VERSION = 1
# Longest control line either side accepts. A notify with a long merkle branch
# is ~1.5 KB; an rm.results batch is bounded by MAX_RESULTS_PER_LINE.
MAX_CONTROL_LINE = 256 * 1024
MAX_RESULTS_PER_LINE = 2048
MAX_CHANNELS_PER_NOTIFY = 4096

FEATURES = ("udp-shares", "udp-v2", "job-dedup", "batch-verdicts", "pool-status", "goaway")


# ----------------------------------------------------------------- rm params


class Hello(Struct, frozen=True, kw_only=True):
    """``rm.hello`` (proxy → sidecar, request): the proxy's version and features."""

    METHOD: ClassVar[str] = "rm.hello"
    version: int
    features: list[str] = []
    agent: str = ""


class HelloResult(Struct, frozen=True, kw_only=True):
    """The sidecar's answer to ``rm.hello``.

    ``udp_port`` is where shares go (None: no UDP, shares travel over TLS);
    ``udp_host`` overrides the host the proxy connected to (an advertised
    address, for sidecars behind NAT). ``heartbeat`` is the idle interval after
    which each side sends ``rm.ping``; a peer silent for ``dead_after`` seconds is
    declared dead. ``max_ack_delay`` is the longest the sidecar holds the
    acknowledgement of a share datagram (PROTOCOL.md §2.6, QUIC's transport
    parameter of that name); absent, 5 ms.
    """

    version: int
    features: list[str] = []
    agent: str = ""
    udp_port: int | None = None
    udp_host: str | None = None
    heartbeat: float = 1.0
    dead_after: float = 5.0
    max_ack_delay: float = 0.005


class Keys(Struct, frozen=True, kw_only=True):
    """``rm.keys`` (sidecar → proxy): key material for one epoch of the UDP channel.

    ``conn_id`` is 16 lowercase hex digits (a u64 JSON numbers could round),
    ``secret`` 64 hex digits (32 random bytes). Keys of the previous epoch stay
    valid for ``grace`` seconds.
    """

    METHOD: ClassVar[str] = "rm.keys"
    conn_id: str
    epoch: int
    secret: str
    grace: float = 2.0


class Open(Struct, frozen=True, kw_only=True):
    """``rm.open`` (proxy → sidecar): a rig connected; open its pool connection."""

    METHOD: ClassVar[str] = "rm.open"
    ch: int
    peer: str = ""


class Close(Struct, frozen=True, kw_only=True):
    """``rm.close`` (either way): the channel is over (rig gone, or pool connection lost)."""

    METHOD: ClassVar[str] = "rm.close"
    ch: int
    reason: str = ""


class Job(Struct, frozen=True, kw_only=True):
    """``rm.job`` (sidecar → proxy): defines job handle ``job`` as this notify.

    Sent once per distinct notify, however many channels receive it.
    """

    METHOD: ClassVar[str] = "rm.job"
    job: int
    notify: NotifyParams


class NotifyChannels(Struct, frozen=True, kw_only=True):
    """``rm.notify`` (sidecar → proxy): deliver job ``job`` as mining.notify to these channels."""

    METHOD: ClassVar[str] = "rm.notify"
    job: int
    ch: list[int]


class Results(Struct, frozen=True, kw_only=True):
    """``rm.results`` (sidecar → proxy): verdicts of shares that came over UDP.

    Each entry is ``[epoch, pn, index, verdict]``: the share is the ``index``-th
    record of the datagram with packet number ``pn`` under key ``epoch``;
    ``verdict`` is ``1`` for the pool's plain ``{"result":true,"error":null}``,
    otherwise the pool's response object without its id (``result``, ``error``,
    ``reject-reason``), so the rig gets the pool's own words.
    """

    METHOD: ClassVar[str] = "rm.results"
    v: list[tuple[int, int, int, Any]]


class Ping(Struct, frozen=True, kw_only=True):
    """``rm.ping``: heartbeat; ``t`` (the sender's clock) is echoed in the :class:`Pong`."""

    METHOD: ClassVar[str] = "rm.ping"
    t: float = 0.0


class Pong(Struct, frozen=True, kw_only=True):
    """``rm.pong``: the answer to :class:`Ping`, echoing its ``t``."""

    METHOD: ClassVar[str] = "rm.pong"
    t: float = 0.0


class ErrorNotice(Struct, frozen=True, kw_only=True):
    """``rm.error``: the sender is about to close the control connection, and why."""

    METHOD: ClassVar[str] = "rm.error"
    reason: str


class PoolStatus(Struct, frozen=True, kw_only=True):
    """``rm.pool`` (sidecar → proxy, feature ``pool-status``): the pool software behind the sidecar.

    ``status`` is ``"down"`` when the sidecar cannot reach the pool (its
    reconnection attempts fail; ``reason`` says why) and ``"up"`` once it can
    again. A proxy with failover moves its rigs elsewhere meanwhile.
    """

    METHOD: ClassVar[str] = "rm.pool"
    status: str
    reason: str = ""


class GoAway(Struct, frozen=True, kw_only=True):
    """``rm.goaway`` (sidecar → proxy, feature ``goaway``): this sidecar is draining.

    The proxy should open a new control connection (through the balancer, it
    reaches another sidecar) and move its rigs there within ``deadline`` seconds
    (relative: the two clocks need not agree); after that the sidecar closes the
    connection. Shares in flight keep their verdict path until then.
    """

    METHOD: ClassVar[str] = "rm.goaway"
    deadline: float
    reason: str = ""


#: Every rm message, one Struct per method (the line's ``method`` is the tag): what
#: :func:`decode_params` returns, for ``match`` to narrow.
RMMessage = Hello | Keys | Open | Close | Job | NotifyChannels | Results | Ping | Pong | ErrorNotice | PoolStatus | GoAway
_MESSAGE_TYPES: tuple[type[RMMessage], ...] = (
    Hello,
    Keys,
    Open,
    Close,
    Job,
    NotifyChannels,
    Results,
    Ping,
    Pong,
    ErrorNotice,
    PoolStatus,
    GoAway,
)
#: Method -> its message's Struct.
RM_PARAMS: dict[str, type[RMMessage]] = {kind.METHOD: kind for kind in _MESSAGE_TYPES}
#: The rm methods each side may send (C3-C11); anything else from it is a protocol error.
FROM_PROXY = frozenset({"rm.hello", "rm.open", "rm.close", "rm.ping", "rm.pong", "rm.error"})
FROM_SIDECAR = frozenset(RM_PARAMS) - {"rm.hello", "rm.open"}


# ------------------------------------------------------------------ envelope


class ControlLine(Struct, frozen=True):
    """Any control line; ``ch`` set means a channel (SV1) line."""

    ch: int | None = None
    id: Any = None
    method: str | UnsetType = UNSET
    params: Raw = Raw(b"[]")
    result: Raw | UnsetType = UNSET
    error: Raw = Raw(b"null")
    reject_reason: str | UnsetType = field(default=UNSET, name="reject-reason")

    @property
    def is_response(self) -> bool:
        return self.method is UNSET


class ChannelRequest(Struct, frozen=True, omit_defaults=False):
    ch: int
    id: RequestId
    method: str
    params: list[Any] | Raw


class ChannelResponse(Struct, frozen=True):
    ch: int
    id: RequestId
    result: Raw | UnsetType = UNSET
    error: Raw = Raw(b"null")
    reject_reason: str | UnsetType = field(default=UNSET, name="reject-reason")


class _RMLine(Struct, frozen=True):
    id: RequestId
    method: str
    params: Struct


class RMResponse(Struct, frozen=True):
    id: RequestId
    result: Any
    error: Any = None


_decode_line = BoundedDecoder[ControlLine](ControlLine).decode
_decoders = {method: BoundedDecoder[RMMessage](kind).decode for method, kind in RM_PARAMS.items()}
_encode = msgspec.json.Encoder().encode


class ControlDecodeError(ValueError):
    """A control line that is not valid StratumRM; the connection is closed with this reason."""


def decode_line(line: bytes) -> ControlLine:
    try:
        return _decode_line(line)
    except msgspec.DecodeError as exc:
        raise ControlDecodeError(f"malformed control line: {exc}") from None


def decode_params(method: str, params: Raw) -> RMMessage:
    """The ``rm.`` message of ``method`` with these params, as its own Struct (:data:`RM_PARAMS`).

    Each method has its own type, so the caller narrows the :data:`RMMessage` union with
    ``match`` on the type alone. An unknown method or bad params raise
    :class:`ControlDecodeError`.
    """
    decoder = _decoders.get(method)
    if decoder is None:
        raise ControlDecodeError(f"unknown control method {method!r}")
    try:
        return decoder(params)
    except msgspec.DecodeError as exc:
        raise ControlDecodeError(f"bad params for {method}: {exc}") from None


def encode_rm(message: RMMessage, request_id: RequestId = None) -> bytes:
    """An rm line: ``message`` under its type's method (``id`` null: a notification)."""
    return _encode(_RMLine(request_id, message.METHOD, message)) + b"\n"


def encode_rm_result(request_id: RequestId, result: Any) -> bytes:
    return _encode(RMResponse(request_id, result)) + b"\n"


def encode_channel_request(ch: int, request_id: RequestId, method: str, params: list[Any] | Raw) -> bytes:
    return _encode(ChannelRequest(ch, request_id, method, params)) + b"\n"


def encode_channel_response(
    ch: int,
    request_id: RequestId,
    result: Raw | UnsetType,
    error: Raw,
    reject_reason: str | UnsetType = UNSET,
) -> bytes:
    return _encode(ChannelResponse(ch, request_id, result, error, reject_reason)) + b"\n"


ACCEPTED_VERDICT = 1


def encode(value: Any) -> bytes:
    return _encode(value)
