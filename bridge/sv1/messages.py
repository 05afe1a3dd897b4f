"""Stratum V1 messages as msgspec Structs.

Stratum V1 is JSON-RPC 1.0-ish over newline-terminated lines. Three shapes occur:

- a *request* ``{"id": <int|str|null>, "method": "...", "params": [...]}``;
  with ``"id": null`` it is a notification and must never be answered;
- a *response* ``{"id": <echo>, "result": ..., "error": ...}``; ckpool adds a
  top-level ``"reject-reason"`` string to share rejects, miningcore omits
  ``result`` when it is null;
- anything else, which is a protocol error.

Requests a miner sends are decoded in one pass with a msgspec tagged union keyed on
``method``: decoding *is* validation, so a ``mining.submit`` with a wrong number or
type of params fails right here. Each request Struct is also the *event* the server
session hands to its user, so nothing is copied on the hot path.

Response ``result``/``error`` values are kept as :class:`msgspec.Raw` so a relay can
pass a pool's verdict to the miner byte for byte (only the id is changed), whatever
dialect the pool speaks.

Params are ``array_like`` Structs: trailing fields with defaults may be omitted by
the sender, extra trailing elements are ignored (msgspec's default for unknown
fields).
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType, field

RequestId = int | str | None

NULL = Raw(b"null")
TRUE = Raw(b"true")
FALSE = Raw(b"false")


# --------------------------------------------------------------------------- params


class SubscribeParams(Struct, array_like=True, frozen=True, omit_defaults=True):
    """``mining.subscribe [user_agent?, session_id?, host?, port?]``.

    ``session_id`` is the subscription id of an earlier session to resume (cgminer,
    cpuminer) or null; bosminer sends host and port as well.
    """

    user_agent: str | None = None
    session_id: str | int | None = None
    host: str | None = None
    port: int | str | None = None


class AuthorizeParams(Struct, array_like=True, frozen=True, omit_defaults=True):
    """``mining.authorize [user, password?]``; ckpool accepts a missing password."""

    user: str
    password: str | None = None


class SubmitParams(Struct, array_like=True, frozen=True, omit_defaults=True):
    """``mining.submit [worker, job_id, extranonce2, ntime, nonce, version_bits?]``.

    All hex fields are strings on the wire; some firmware sends ntime/nonce as JSON
    numbers, which the server session normalises to 8 hex digits before the event
    is handed out.
    """

    worker: str
    job_id: str
    extranonce2: str
    ntime: str | int
    nonce: str | int
    version_bits: str | None = None


class SetExtranonceParams(Struct, array_like=True, frozen=True, omit_defaults=True):
    extranonce1: str | None = None
    extranonce2_size: int | None = None


class DifficultyParams(Struct, array_like=True, frozen=True):
    difficulty: int | float


class TextParams(Struct, array_like=True, frozen=True):
    text: str


class NumberParams(Struct, array_like=True, frozen=True):
    value: int


class NotifyParams(Struct, array_like=True, frozen=True):
    """``mining.notify [job_id, prevhash, coinb1, coinb2, merkle_branch, version, nbits, ntime, clean_jobs]``."""

    job_id: str
    prevhash: str
    coinb1: str
    coinb2: str
    merkle_branch: list[str]
    version: str
    nbits: str
    ntime: str
    clean_jobs: bool


# ------------------------------------------------------------ miner -> pool requests


class Request(Struct, tag_field="method", frozen=True, kw_only=True):
    """Base of every request a miner sends; ``method`` is the tag."""

    id: RequestId = None


class Subscribe(Request, tag="mining.subscribe", frozen=True):
    params: SubscribeParams = SubscribeParams()


class Authorize(Request, tag="mining.authorize", frozen=True):
    params: AuthorizeParams


class Submit(Request, tag="mining.submit", frozen=True):
    params: SubmitParams


class Configure(Request, tag="mining.configure", frozen=True):
    """BIP310 ``mining.configure [[extension, ...], {extension-params}]``."""

    params: tuple[list[str], dict[str, Any]]

    @property
    def extensions(self) -> list[str]:
        return self.params[0]

    @property
    def extension_params(self) -> dict[str, Any]:
        return self.params[1]


class ExtranonceSubscribe(Request, tag="mining.extranonce.subscribe", frozen=True):
    params: list[Any] = []


class SuggestDifficulty(Request, tag="mining.suggest_difficulty", frozen=True):
    params: DifficultyParams

    @property
    def difficulty(self) -> float:
        return self.params.difficulty


class SuggestTarget(Request, tag="mining.suggest_target", frozen=True):
    params: TextParams

    @property
    def target(self) -> str:
        return self.params.text


class MultiVersion(Request, tag="mining.multi_version", frozen=True):
    params: NumberParams


class GetTransactions(Request, tag="mining.get_transactions", frozen=True):
    params: list[str] = []


MinerRequest = (
    Submit
    | Subscribe
    | Authorize
    | Configure
    | ExtranonceSubscribe
    | SuggestDifficulty
    | SuggestTarget
    | MultiVersion
    | GetTransactions
)

MINER_METHODS = frozenset(t.__struct_config__.tag for t in MinerRequest.__args__)


# ----------------------------------------------------- pool -> miner notifications


class Notify(Request, tag="mining.notify", frozen=True):
    params: NotifyParams


class SetDifficulty(Request, tag="mining.set_difficulty", frozen=True):
    params: DifficultyParams

    @property
    def difficulty(self) -> float:
        return self.params.difficulty


class SetExtranonce(Request, tag="mining.set_extranonce", frozen=True):
    """``[extranonce1, extranonce2_size?]``; bfgminer accepts a missing size."""

    params: SetExtranonceParams


class SetVersionMask(Request, tag="mining.set_version_mask", frozen=True):
    params: TextParams

    @property
    def mask(self) -> str:
        return self.params.text


class Reconnect(Request, tag="client.reconnect", frozen=True):
    """``client.reconnect [host?, port?, wait?]``; ``[]`` means "the same server"."""

    params: list[Any] = []


class ShowMessage(Request, tag="client.show_message", frozen=True):
    params: TextParams

    @property
    def text(self) -> str:
        return self.params.text


class GetVersion(Request, tag="client.get_version", frozen=True):
    params: list[Any] = []


class Ping(Request, tag="mining.ping", frozen=True):
    params: list[Any] = []


PoolRequest = Notify | SetDifficulty | SetExtranonce | SetVersionMask | Reconnect | ShowMessage | GetVersion | Ping

POOL_METHODS = frozenset(t.__struct_config__.tag for t in PoolRequest.__args__)


# ------------------------------------------------------------------ responses


class Response(Struct, frozen=True):
    """A JSON-RPC response with ``result`` and ``error`` kept raw.

    ``result`` is UNSET only when the peer left it out (miningcore does); encoding
    keeps it out too, so a relayed reply is the pool's own. ``reject_reason`` is
    ckpool's top-level ``"reject-reason"``.
    """

    id: RequestId
    result: Raw | UnsetType = UNSET
    error: Raw = NULL
    reject_reason: str | UnsetType = field(default=UNSET, name="reject-reason")

    @property
    def accepted(self) -> bool:
        """True only for ``"result": true`` (how cgminer counts an accepted share)."""
        return self.result is not UNSET and bytes(self.result) == b"true"


class MinerResponse(Response, frozen=True):
    """A response the miner sent (to ``client.get_version`` or ``mining.ping``)."""


class Envelope(Struct, frozen=True):
    """Loose shape used only to classify a line the typed decoders refused."""

    id: Any = None
    method: Any = UNSET
    params: Any = UNSET
    result: Any = UNSET
    error: Any = UNSET


class OutgoingRequest(Struct, frozen=True):
    """A request the bridge writes: ``{"id": ..., "method": ..., "params": [...]}``.

    Params are a plain list (or raw JSON for relayed requests) so that optional
    trailing params are left out rather than written as ``null``.
    """

    id: RequestId
    method: str
    params: list[Any] | Raw


def params_list(params: Struct) -> list[Any]:
    """An ``array_like`` params Struct as a list, trailing ``None`` fields left out."""
    values = list(msgspec.structs.astuple(params))
    while values and values[-1] is None:
        values.pop()
    return values


def error_value(code: int, message: str) -> Raw:
    """The ``[code, "message", null]`` error form every miner parses."""
    return Raw(msgspec.json.encode([code, message, None]))


def number(value: float) -> float | int:
    """Difficulty as a JSON number: integers without ``.0`` (some firmware chokes on floats)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value
