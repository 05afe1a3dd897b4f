"""The sidecar's channels: one rig at the proxy, one pool connection here (C4), sans-IO.

What the driver is asked to do with pool connections (:class:`OpenPool`,
:class:`WritePool`, :class:`ClosePool`), what the sidecar refuses to relay
(:data:`RELAYED_PARAMS`, :class:`AccountRefused`, :class:`RequestRefused`) and the
state of one channel (:class:`Channel`, its status :class:`ChannelStatus`).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from msgspec import Raw, Struct

from bridge.bounded import RecentKeys
from bridge.sv1.client import ClientSession
from bridge.sv1.framing import BoundedDecoder
from bridge.sv1.messages import (
    AuthorizeParams,
    DifficultyParams,
    NumberParams,
    SubmitParams,
    SubscribeParams,
    TextParams,
)
from bridge.sv1.validate import is_hex

#: Job ids remembered per channel (C5): more than the proxy's 8, so a handle it sends is
#: known here; 64 also keys a TLS copy of a UDP share by the same handle unless more than
#: 64 jobs came between them. Worker names per channel (worker_index is a u8).
MAX_JOBS_PER_CHANNEL: Final = 64
MAX_WORKERS_PER_CHANNEL: Final = 256
#: Lines from a pool may be long (a notify with a full merkle branch is ~1.5 KB).
MAX_LINE_FROM_POOL: Final = 64 * 1024
MAX_CHANNEL_NUMBER: Final = 0xFFFF_FFFF

_encode = msgspec.json.Encoder().encode

#: The only requests a proxy may have relayed to the pool: exact, canonical SV1 method
#: names, each with the params shape it is decoded into and re-encoded from (the
#: proxy's bytes never reach the pool). Everything else is refused (item 3 of issue 9:
#: pools match methods loosely, ckpool case-insensitively by prefix, so a name such as
#: ``MINING.SUBMIT`` or ``mining.auth`` would otherwise slip past the account check).
RELAYED_PARAMS: Final[dict[str, Any]] = {
    "mining.subscribe": SubscribeParams,
    "mining.authorize": AuthorizeParams,
    "mining.submit": SubmitParams,
    "mining.configure": tuple[list[str], dict[str, Any]],
    "mining.extranonce.subscribe": list[Any],  # re-encoded as [] whatever it held
    "mining.suggest_difficulty": DifficultyParams,
    "mining.suggest_target": TextParams,
    "mining.multi_version": NumberParams,
    "mining.get_transactions": list[str],
}
RELAYED_DECODERS: Final = {method: BoundedDecoder[Any](shape) for method, shape in RELAYED_PARAMS.items()}


def encode_params(params: Any) -> Raw:
    """Typed params as the JSON array a pool expects: a Struct's trailing unset (None) fields dropped."""
    if isinstance(params, Struct):
        values = list(msgspec.structs.astuple(params))
        while values and values[-1] is None:
            values.pop()
        params = values
    return Raw(_encode(params))


def account(worker: str) -> str:
    """The account part of ``user.worker``."""
    return worker.split(".", 1)[0]


def u32(value: Any) -> int | None:
    """An SV1 u32 field (8 hex digits, or a JSON number) as an int, None if it is neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value <= 0xFFFF_FFFF else None
    if isinstance(value, str) and is_hex(value, 8):
        return int(value, 16)
    return None


# ----------------------------------------------------------------- commands


class OpenPool(Struct, frozen=True):
    """Open the pool connection of channel ``ch``; report with ``pool_connected``/``pool_closed``.

    ``peer`` is the rig's address as the proxy reported it (for logs).
    """

    ch: int
    peer: str = ""


class WritePool(Struct, frozen=True):
    """Write ``data`` to the pool connection of channel ``ch``."""

    ch: int
    data: bytes


class ClosePool(Struct, frozen=True):
    """Close the pool connection of channel ``ch`` (idempotent; it may never have opened)."""

    ch: int
    reason: str


PoolCommand = OpenPool | WritePool | ClosePool


class AccountRefused(Struct, frozen=True):
    """A request for an account the certificate does not name, answered with error 24.

    Reported once per account and channel (a rig that insists is not logged per share).
    """

    ch: int
    method: str
    """``mining.authorize`` or ``mining.submit``."""
    worker: str
    account: str


class RequestRefused(Struct, frozen=True):
    """A channel request the sidecar would not relay (method not allowed, or params malformed).

    Reported once per method (as sent, truncated) and channel.
    """

    ch: int
    method: str
    reason: str


Refusal = AccountRefused | RequestRefused


# ----------------------------------------------------------------- one channel


class Channel:
    """One rig connection at the proxy and its pool connection here."""

    __slots__ = (
        "accepted",
        "accepted_difficulty",
        "ch",
        "connected",
        "difficulty",
        "jobs",
        "peer",
        "pool",
        "refused_accounts",
        "refused_methods",
        "rejected",
        "stale",
        "workers",
    )

    def __init__(self, ch: int, peer: str) -> None:
        self.ch = ch
        self.peer = peer
        self.pool = ClientSession(max_line=MAX_LINE_FROM_POOL)
        self.connected = False
        self.workers: list[str] = []
        # Created on the first refusal: a set costs 216 bytes empty, and most rigs have none.
        self.refused_accounts: set[str] | None = None
        self.refused_methods: set[str] | None = None
        self.jobs: RecentKeys[str, int] = RecentKeys(MAX_JOBS_PER_CHANNEL)
        """job_id -> handle, oldest first."""
        self.accepted = 0
        self.rejected = 0
        self.stale = 0
        self.accepted_difficulty = 0.0
        self.difficulty: float | None = None

    def status(self) -> ChannelStatus:
        return ChannelStatus(
            ch=self.ch,
            peer=self.peer,
            workers=list(self.workers),
            pool_connected=self.connected,
            difficulty=self.difficulty,
            accepted=self.accepted,
            rejected=self.rejected,
            stale=self.stale,
            accepted_difficulty=self.accepted_difficulty,
        )


class ChannelStatus(Struct, frozen=True, kw_only=True):
    """One rig's channel at the sidecar: its peer at the proxy, workers and verdicts."""

    ch: int
    peer: str
    workers: list[str]
    pool_connected: bool
    difficulty: float | None
    accepted: int
    rejected: int
    stale: int
    """Rejected as stale (job not found, or ckpool's "stale")."""
    accepted_difficulty: float
    """Sum of the difficulty of accepted shares (hashrate = its growth * 2**32 / seconds)."""
