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
raw params); :func:`decode_params` reads the params of an ``rm.`` method into its
Struct. The encoders write the same shapes. Nothing here keeps state: the
proxy-side and sidecar-side cores (bridge/relay) do.
"""

from __future__ import annotations

from typing import Any, Literal, overload

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

    conn_id: str
    epoch: int
    secret: str
    grace: float = 2.0


class Open(Struct, frozen=True, kw_only=True):
    """``rm.open`` (proxy → sidecar): a rig connected; open its pool connection."""

    ch: int
    peer: str = ""


class Close(Struct, frozen=True, kw_only=True):
    """``rm.close`` (either way): the channel is over (rig gone, or pool connection lost)."""

    ch: int
    reason: str = ""


class Job(Struct, frozen=True, kw_only=True):
    """``rm.job`` (sidecar → proxy): defines job handle ``job`` as this notify.

    Sent once per distinct notify, however many channels receive it.
    """

    job: int
    notify: NotifyParams


class NotifyChannels(Struct, frozen=True, kw_only=True):
    """``rm.notify`` (sidecar → proxy): deliver job ``job`` as mining.notify to these channels."""

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

    v: list[tuple[int, int, int, Any]]


class Ping(Struct, frozen=True, kw_only=True):
    """``rm.ping`` / ``rm.pong``: heartbeat; ``t`` is echoed (the sender's clock)."""

    t: float = 0.0


class ErrorNotice(Struct, frozen=True, kw_only=True):
    """``rm.error``: the sender is about to close the control connection, and why."""

    reason: str


class PoolStatus(Struct, frozen=True, kw_only=True):
    """``rm.pool`` (sidecar → proxy, feature ``pool-status``): the pool software behind the sidecar.

    ``status`` is ``"down"`` when the sidecar cannot reach the pool (its
    reconnection attempts fail; ``reason`` says why) and ``"up"`` once it can
    again. A proxy with failover moves its rigs elsewhere meanwhile.
    """

    status: str
    reason: str = ""


class GoAway(Struct, frozen=True, kw_only=True):
    """``rm.goaway`` (sidecar → proxy, feature ``goaway``): this sidecar is draining.

    The proxy should open a new control connection (through the balancer, it
    reaches another sidecar) and move its rigs there within ``deadline`` seconds
    (relative: the two clocks need not agree); after that the sidecar closes the
    connection. Shares in flight keep their verdict path until then.
    """

    deadline: float
    reason: str = ""


#: Every rm params Struct: what :func:`decode_params` returns.
RMParams = Hello | HelloResult | Keys | Open | Close | Job | NotifyChannels | Results | Ping | ErrorNotice | PoolStatus | GoAway

RM_PARAMS: dict[str, type[RMParams]] = {
    "rm.hello": Hello,
    "rm.keys": Keys,
    "rm.open": Open,
    "rm.close": Close,
    "rm.job": Job,
    "rm.notify": NotifyChannels,
    "rm.results": Results,
    "rm.ping": Ping,
    "rm.pong": Ping,
    "rm.error": ErrorNotice,
    "rm.pool": PoolStatus,
    "rm.goaway": GoAway,
}


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


class RMMessage(Struct, frozen=True):
    id: RequestId
    method: str
    params: Struct


class RMResponse(Struct, frozen=True):
    id: RequestId
    result: Any
    error: Any = None


_decode_line = BoundedDecoder[ControlLine](ControlLine).decode
_decoders = {method: BoundedDecoder[RMParams](kind).decode for method, kind in RM_PARAMS.items()}
_encode = msgspec.json.Encoder().encode


class ControlDecodeError(ValueError):
    """A control line that is not valid StratumRM; the connection is closed with this reason."""


def decode_line(line: bytes) -> ControlLine:
    try:
        return _decode_line(line)
    except msgspec.DecodeError as exc:
        raise ControlDecodeError(f"malformed control line: {exc}") from None


@overload
def decode_params(method: Literal["rm.hello"], params: Raw) -> Hello: ...
@overload
def decode_params(method: Literal["rm.keys"], params: Raw) -> Keys: ...
@overload
def decode_params(method: Literal["rm.open"], params: Raw) -> Open: ...
@overload
def decode_params(method: Literal["rm.close"], params: Raw) -> Close: ...
@overload
def decode_params(method: Literal["rm.job"], params: Raw) -> Job: ...
@overload
def decode_params(method: Literal["rm.notify"], params: Raw) -> NotifyChannels: ...
@overload
def decode_params(method: Literal["rm.results"], params: Raw) -> Results: ...
@overload
def decode_params(method: Literal["rm.ping", "rm.pong"], params: Raw) -> Ping: ...
@overload
def decode_params(method: Literal["rm.error"], params: Raw) -> ErrorNotice: ...
@overload
def decode_params(method: Literal["rm.pool"], params: Raw) -> PoolStatus: ...
@overload
def decode_params(method: Literal["rm.goaway"], params: Raw) -> GoAway: ...
@overload
def decode_params(method: str, params: Raw) -> RMParams: ...
def decode_params(method: str, params: Raw) -> RMParams:
    """The params of an ``rm.`` method as its Struct (the type :data:`RM_PARAMS` names for it).

    Typed by method: a caller with a literal method gets that method's Struct, a caller
    with any method gets the :data:`RMParams` union and narrows it with ``match``.
    """
    decoder = _decoders.get(method)
    if decoder is None:
        raise ControlDecodeError(f"unknown control method {method!r}")
    try:
        return decoder(params)
    except msgspec.DecodeError as exc:
        raise ControlDecodeError(f"bad params for {method}: {exc}") from None


def encode_rm(method: str, params: Struct, request_id: RequestId = None) -> bytes:
    return _encode(RMMessage(request_id, method, params)) + b"\n"


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
