"""The reference miner: a real Stratum V1 client that hashes, for tests, the demo and benchmarks.

It connects to a pool (or to the bridge), subscribes, authorizes, and then mines
for real: every job becomes block headers that are double-SHA256 hashed with
:mod:`hashlib` (:func:`bridge.mining.share.scan_nonces`), and every header whose
hash meets the target of the job's difficulty is submitted. Pools judge those
shares with the same rules they apply to real rigs, so a share the pool accepts
proves that job, extranonce, ntime, nonce and version bits all made it through
whatever sat in between. Python reaches about 1.7 MH/s per core, so it only
makes sense at tiny difficulties (1e-4 is about one share per 430 000 hashes).

**Profiles.** A proxy has to cope with what real miners actually put on the
wire, so the miner can behave like five of them (the ckpool captures in
tests/data/captures). Lines are byte-for-byte what each program
writes: the same key order and spacing, the same ids.

=========== ============================================================================
cgminer     one integer id counter for everything (``swork_id``), starting at 0;
            subscribe ``["cgminer/4.11.1"]`` (plus the session id of the previous
            connection, to resume); authorize after the subscribe result;
            ``mining.suggest_difficulty`` after a successful authorize, only if
            asked; ignores ``mining.set_extranonce``; answers ``mining.ping`` and
            ``client.get_version``, reading the id with jansson's
            ``json_integer_value`` (a string id comes back as 0); follows
            ``client.reconnect []`` to the same pool and ``[host, port]`` only when
            the host passes the dot-suffix rule; submits stale shares; 90 s of
            silence is a dead pool.
cpuminer    fixed ids: subscribe 1, authorize 2, every submit 4 (answers matched
            first in, first out); resumes its session; needs host *and* port in
            ``client.reconnect`` (``[]`` is ignored); answers
            ``client.get_version`` and ``client.show_message`` with an id; discards
            shares of a job a clean notify abandoned; 120 s of silence.
bfgminer    ``mining.suggest_target`` with ``"id": null`` before subscribe (the
            profile always requests a target, by default one far below any
            pool's minimum; when the pool drops the connection before answering
            the subscribe, it retries at once without); subscribe id 0 from the
            counter; ``mining.extranonce.subscribe`` with id ``"xnsub"`` for
            ``#xnsub`` URLs; authorize id ``"auth"``; ``mining.get_transactions``
            with id ``"txlist<jobid>"`` once after the first job; submits from the
            counter; ``mining.set_extranonce`` applies from the next notify;
            redirects only within the same registered domain (or with
            ``#redirect``; the domain rule is simplified to the last two labels).
bmminer     cgminer's wire format, but ``mining.configure`` (version-rolling, mask
            ``1fffe000``, min-bit-count 2) goes first, ``mining.multi_version [1]``
            follows a successful authorize, ``#xnsub`` sends
            ``mining.extranonce.subscribe``, and ``mining.set_extranonce`` applies
            at once. The version bits are rolled while hashing; the 6th submit
            param is the rolled *bits* (BIP310), not the full version bmminer
            itself sends under multi_version, so BIP310 pools accept the shares.
            The user agent ``bmminer/2.0.0`` is an S9-era version *(inference)*.
bitaxe      ESP-Miner 2.x: compact JSON, ids counting from 1 on every connection;
            configure (mask ``ffffffff``) id 1, subscribe
            ``["bitaxe/BM1368/v2.9.0"]`` id 2, authorize id 3 and
            ``mining.suggest_difficulty`` id 4 all pipelined without waiting
            (ESP-Miner suggests 1000; here a value far below any pool's minimum
            unless one is given); every submit carries the 6th param (``00000000``
            without version rolling); ``mining.ping`` is answered with ESP-Miner's
            odd ``{"id":N,"method":"pong","params":[]}``; any ``client.reconnect``
            makes it reconnect to the pool it was configured with; requests with a
            non-integer id are ignored (ESP-Miner's parser refuses them).
=========== ============================================================================

Where the reference or the programs' sources leave a detail open, the choice is
marked *(inference)* at the place it is made.

**Behaviour common to all profiles.** ``mining.set_difficulty`` is queued and
applied from the next ``mining.notify``, with cgminer's two-deep queue (set A,
set B, notify 1, notify 2 gives A to notify 1 and B to notify 2; a third pending
value replaces B); a new subscription starts at difficulty 1. ``clean_jobs=true``
or a new prevhash abandons the current job at once and forgets the old jobs (a
share found on them is *stale*); ``clean_jobs=false`` adds a job and the miner
switches to it. extranonce2 is a little-endian counter truncated to the size
(cgminer's nonce2 encoding), taking the next value for every new piece of work
and restarting from 0 on clean jobs (cpuminer: on every new job). A failed
subscribe is retried once with ``"params": []`` (all but bitaxe).

**Theory of operation.** :class:`MinerProtocol` is sans-IO (h11 style): the
driver hands it received bytes (:meth:`~MinerProtocol.receive_data`) and the
current time, it returns events and queues lines
(:meth:`~MinerProtocol.data_to_send`). Hashing is split the same way:
:meth:`~MinerProtocol.next_chunk` plans a :class:`Chunk` (a 76-byte header
prefix and a nonce range), the driver hashes it anywhere it likes, and
:meth:`~MinerProtocol.chunk_done` turns the hits into submits. A chunk that
comes back after its job was cleaned is stale, after its connection closed
lost; the protocol decides per profile whether to submit it.
:class:`Miner` is the thin trio driver: it connects (``stratum+tcp://`` or
``stratum+ssl://``, ``TCP_NODELAY``), runs a reader and a hasher task that
hashes chunks in the event loop (a checkpoint between chunks, or in a worker
thread), caps the hash rate if asked, reconnects after ``reconnect_delay``
(5 s like cgminer) when the pool goes away, and follows ``client.reconnect`` at
once.

**Reporting.** Every submitted share is a frozen :class:`SubmittedShare`; its
``verdict`` is filled in when the pool answers (accepted, or rejected with a
standard code and the pool's words), and stays ``None`` if the answer never
came (the connection closed, or ``share_timeout`` passed). Only the last
``max_records`` shares are kept; the counters in :meth:`Miner.statistics` cover
everything.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec
import trio
from msgspec import UNSET, Struct

from bridge.bounded import BoundedMap
from bridge.config import parse_upstream_url
from bridge.errors import ConfigError, LineTooLong
from bridge.mining.share import (
    U32_MASK,
    Job,
    build_header,
    difficulty_to_target,
    hash_difficulty,
    roll_version,
    scan_nonces,
)
from bridge.net.tcp import close_quietly, open_stream
from bridge.sv1.client import notify_subscription_id
from bridge.sv1.events import ProtocolViolation
from bridge.sv1.framing import BoundedDecoder, LineBuffer, decode_json
from bridge.sv1.messages import (
    POOL_METHODS,
    GetVersion,
    Notify,
    OutgoingRequest,
    Ping,
    PoolRequest,
    Reconnect,
    RequestId,
    Response,
    SetDifficulty,
    SetExtranonce,
    SetVersionMask,
    ShowMessage,
)
from bridge.sv1.rejects import Verdict, read_verdict
from bridge.sv1.validate import check_notify, is_hex

__all__ = [
    "DEFAULT_SUGGESTED_DIFFICULTY",
    "PROFILE_TRAITS",
    "AuthorizationFailed",
    "Authorized",
    "Chunk",
    "ConnectionClosed",
    "Ignored",
    "Miner",
    "MinerConfig",
    "MinerEvent",
    "MinerProtocol",
    "MinerStatistics",
    "MinerURL",
    "NewJob",
    "PoolMessage",
    "Profile",
    "ProfileTraits",
    "ReconnectRefused",
    "ReconnectRequested",
    "ShareAnswered",
    "ShareSubmitted",
    "SubmittedShare",
    "SubscribeFailed",
    "Subscribed",
    "parse_miner_url",
    "render_line",
    "spread_bits",
]

log = logging.getLogger("bridge.testing.miner")

NONCE_SPACE = 1 << 32
MAX_LINE_FROM_POOL = 64 * 1024
RECEIVE_SIZE = 65536
MAX_JOBS = 64
"""Jobs of the current block remembered for submitting (older ones count as stale)."""
DEFAULT_SUGGESTED_DIFFICULTY = 1e-6
"""What bitaxe suggests and bfgminer requests when no difficulty is given.

ESP-Miner suggests 1000 by default and bfgminer's ``--request-diff`` means 1, and
pools honour suggestions: a CPU miner would never find a share again. 1e-6 is far
below any pool's minimum, so the line is on the wire in its place and the pool
keeps its own difficulty."""


# --------------------------------------------------------------------------- profiles


class Profile(enum.StrEnum):
    """Which real miner's wire behaviour to reproduce."""

    CGMINER = "cgminer"
    CPUMINER = "cpuminer"
    BFGMINER = "bfgminer"
    BMMINER = "bmminer"
    BITAXE = "bitaxe"


ExtranonceHandling = Literal["ignore", "next-notify", "immediate"]
ReconnectRule = Literal["dot-suffix", "host-and-port", "same-domain", "configured-pool"]


class ProfileTraits(Struct, frozen=True, kw_only=True):
    """The per-program facts the protocol consults (ids and line layouts live in code)."""

    user_agent: str
    """``mining.subscribe`` param 1."""
    version_reply: str
    """What ``client.get_version`` is answered with."""
    compact_json: bool
    """``{"id":1,...}`` (ESP-Miner) rather than jansson/sprintf's ``{"id": 1, ...}``."""
    resumes_session: bool
    """Sends the previous subscription id as subscribe param 2 on reconnect."""
    retries_fresh_subscribe: bool
    """A failed subscribe is retried once with ``"params": []``."""
    version_rolling: bool
    requested_mask: str | None = None
    min_bit_count: int | None = None
    always_sends_version_bits: bool = False
    """Every submit has a 6th param, ``00000000`` when nothing was negotiated (ESP-Miner)."""
    extranonce: ExtranonceHandling
    """What ``mining.set_extranonce`` does."""
    reconnect: ReconnectRule
    """Which ``client.reconnect`` targets are followed."""
    submits_stale: bool
    """Submit shares of jobs a clean notify abandoned (cgminer's ``opt_submit_stale``)."""
    extranonce2_per_job: bool = False
    """extranonce2 starts from 0 on every new job id (cpuminer's ``stratum_notify``);
    otherwise one counter runs on and restarts only on clean jobs (cgminer)."""
    answers_ping: bool
    min_extranonce2_size: int
    """Smallest extranonce2_size the subscribe result may give."""
    max_extranonce2_size: int
    """Largest extranonce2_size the subscribe result may give."""
    max_submit_extranonce2_size: int | None = None
    """Above this size the miner hashes but never submits (cgminer: 8)."""
    silence_timeout: float | None
    """Seconds without a line after which the pool counts as dead."""


PROFILE_TRAITS: dict[Profile, ProfileTraits] = {
    Profile.CGMINER: ProfileTraits(
        user_agent="cgminer/4.11.1",
        version_reply="cgminer/4.11.1",
        compact_json=False,
        resumes_session=True,
        retries_fresh_subscribe=True,
        version_rolling=False,
        extranonce="ignore",
        reconnect="dot-suffix",
        submits_stale=True,
        answers_ping=True,
        min_extranonce2_size=2,
        max_extranonce2_size=16,
        max_submit_extranonce2_size=8,
        silence_timeout=90.0,
    ),
    Profile.CPUMINER: ProfileTraits(
        user_agent="cpuminer/2.5.1",
        version_reply="cpuminer/2.5.1",
        compact_json=False,
        resumes_session=True,
        retries_fresh_subscribe=True,
        version_rolling=False,
        extranonce="ignore",
        reconnect="host-and-port",
        submits_stale=False,
        extranonce2_per_job=True,
        answers_ping=False,
        min_extranonce2_size=1,
        max_extranonce2_size=100,
        silence_timeout=120.0,
    ),
    Profile.BFGMINER: ProfileTraits(
        user_agent="bfgminer/5.5.0",
        version_reply="bfgminer/5.5.0",
        compact_json=False,
        resumes_session=True,
        retries_fresh_subscribe=True,
        version_rolling=False,
        extranonce="next-notify",
        reconnect="same-domain",
        submits_stale=True,
        answers_ping=False,
        min_extranonce2_size=1,
        max_extranonce2_size=16,
        silence_timeout=120.0,
    ),
    Profile.BMMINER: ProfileTraits(
        user_agent="bmminer/2.0.0",
        version_reply="bmminer/2.0.0",
        compact_json=False,
        resumes_session=True,
        retries_fresh_subscribe=True,
        version_rolling=True,
        requested_mask="1fffe000",
        min_bit_count=2,
        extranonce="immediate",
        reconnect="dot-suffix",
        submits_stale=True,
        answers_ping=True,
        min_extranonce2_size=2,
        max_extranonce2_size=16,
        max_submit_extranonce2_size=8,
        silence_timeout=90.0,
    ),
    Profile.BITAXE: ProfileTraits(
        user_agent="bitaxe/BM1368/v2.9.0",
        version_reply="v2.9.0",
        compact_json=True,
        resumes_session=False,
        retries_fresh_subscribe=False,
        version_rolling=True,
        requested_mask="ffffffff",
        always_sends_version_bits=True,
        # ESP-Miner stores the extranonce it is sent and builds the next job from it (inference)
        extranonce="next-notify",
        reconnect="configured-pool",
        # ESP-Miner drops results whose job is no longer in valid_jobs
        submits_stale=False,
        answers_ping=True,
        min_extranonce2_size=1,
        max_extranonce2_size=32,
        silence_timeout=None,
    ),
}


# --------------------------------------------------------------------------- wire rendering

_REQUEST_LAYOUT = ("id", "method", "params")
_SUBMIT_LAYOUT = ("params", "id", "method")  # cgminer, bmminer and bfgminer submits
_CPUMINER_SUBMIT_LAYOUT = ("method", "params", "id")


def render_line(fields: Sequence[tuple[str, Any]], *, compact: bool, tight_keys: frozenset[str] = frozenset()) -> bytes:
    """One JSON object line with the fields in the given order.

    ``compact`` writes ``{"id":1,"params":["a","b"]}`` (ESP-Miner); otherwise the
    jansson/sprintf spacing of cgminer, bfgminer and cpuminer,
    ``{"id": 1, "params": ["a", "b"]}``. Keys in ``tight_keys`` get no space after
    their colon (cpuminer's submit ends in ``"id":4``).
    """
    item_separator, key_separator = (",", ":") if compact else (", ", ": ")
    parts = []
    for key, value in fields:
        separator = ":" if key in tight_keys else key_separator
        text = json.dumps(value, separators=(item_separator, key_separator))
        parts.append(f"{json.dumps(key)}{separator}{text}")
    return ("{" + item_separator.join(parts) + "}\n").encode()


def _render_request(
    request: OutgoingRequest,
    layout: Sequence[str],
    *,
    compact: bool,
    tight_keys: frozenset[str] = frozenset(),
) -> bytes:
    values = {"id": request.id, "method": request.method, "params": request.params}
    return render_line([(key, values[key]) for key in layout], compact=compact, tight_keys=tight_keys)


# --------------------------------------------------------------------------- configuration and records


class MinerConfig(Struct, frozen=True, kw_only=True):
    """How one miner behaves on the wire and how much it submits."""

    user: str
    """``USER.WORKER`` for ``mining.authorize`` and every submit."""
    password: str = "x"
    profile: Profile = Profile.CGMINER
    user_agent: str | None = None
    """Override the profile's user agent (e.g. ``bfgminer/5.5.0-34-g866fd36f``)."""
    suggest_difficulty: float | None = None
    """cgminer/bmminer ``--suggest-diff`` (sent only when given), bitaxe's suggestion
    and bfgminer's ``--request-diff`` (both :data:`DEFAULT_SUGGESTED_DIFFICULTY`
    when not given). cgminer and ESP-Miner print an integer (``%d``), which is what
    goes on the wire from 1 up; a value below 1 is written as the JSON fraction,
    which the real programs cannot send."""
    suggest_target: bool = True
    """bfgminer sends ``mining.suggest_target`` before subscribe (its ``--request-diff``);
    False reproduces a bfgminer started without it."""
    extranonce_subscribe: bool = False
    """The URL had ``#xnsub``: bfgminer and bmminer send ``mining.extranonce.subscribe``."""
    allow_redirect: bool = False
    """The URL had ``#redirect``: bfgminer follows ``client.reconnect`` to any host."""
    ntime_roll: bool = False
    """Roll ntime forward with the clock (job ntime + seconds since the job, capped)."""
    max_ntime_roll: int = 60
    """cgminer's drivers roll at most 60 s."""
    chunk_size: int = 4096
    """Nonces per hashing chunk: the range one :meth:`MinerProtocol.next_chunk` hands out."""
    max_shares: int | None = None
    """Stop submitting after this many shares."""
    share_timeout: float = 120.0
    """Give up on a pool's answer after this long (cgminer: 120 s)."""
    max_records: int = 4096
    """Submitted shares kept in memory (the counters cover all of them)."""

    def __post_init__(self) -> None:
        if not isinstance(self.profile, Profile):
            raise ConfigError(f"unknown miner profile {self.profile!r}")
        if not 1 <= self.chunk_size <= NONCE_SPACE:
            raise ConfigError(f"chunk_size must be 1..2**32, got {self.chunk_size}")
        if self.max_shares is not None and self.max_shares < 0:
            raise ConfigError("max_shares must not be negative")
        if self.suggest_difficulty is not None and not (math.isfinite(self.suggest_difficulty) and self.suggest_difficulty > 0):
            raise ConfigError(f"suggest_difficulty must be a positive number, got {self.suggest_difficulty!r}")
        if self.share_timeout <= 0 or self.max_records < 1 or self.max_ntime_roll < 0:
            raise ConfigError("share_timeout and max_records must be positive, max_ntime_roll not negative")


class SubmittedShare(Struct, frozen=True):
    """One share the miner submitted, and what came back.

    Hex fields are exactly what went on the wire. ``verdict`` is None while the
    answer is outstanding and for good when it never came (``lost``: the
    connection closed or ``share_timeout`` passed first). ``stale`` says the miner
    itself knew the job had been abandoned by a clean notify when it submitted.
    """

    serial: int
    job_id: str
    extranonce1: str
    extranonce2: str
    ntime: str
    nonce: str
    version_bits: str | None
    request_id: int | str
    sent_at: float
    difficulty: float
    """The difficulty in force for the job (what the pool should judge it at)."""
    share_difficulty: float
    """What the share's hash achieved."""
    stale: bool = False
    verdict: Verdict | None = None
    answered_at: float | None = None
    lost: bool = False

    @property
    def key(self) -> tuple[str, str, str, str, str, str | None]:
        """``(job_id, extranonce1, extranonce2, ntime, nonce, version_bits)``: what identifies the share."""
        return (self.job_id, self.extranonce1, self.extranonce2, self.ntime, self.nonce, self.version_bits)

    @property
    def accepted(self) -> bool:
        return self.verdict is not None and self.verdict.accepted

    @property
    def rejected(self) -> bool:
        return self.verdict is not None and not self.verdict.accepted


class MinerStatistics(Struct, frozen=True):
    """A snapshot of one miner's counters."""

    name: str
    profile: str
    connected: bool
    authorized: bool
    connections: int
    connect_failures: int
    disconnects: int
    reconnect_requests: int
    hashes: int
    hashrate: float
    """Hashes per second while hashing (the raw speed, whatever the cap)."""
    jobs: int
    clean_jobs: int
    difficulty: float
    extranonce1: str | None
    extranonce2_size: int | None
    version_mask: str | None
    shares_found: int
    submitted: int
    accepted: int
    rejected: int
    pending: int
    lost: int
    """Submitted, then the connection closed or the answer timed out."""
    stale_submitted: int
    stale_discarded: int
    not_submitted: int
    """Found but never sent: connection gone, extranonce changed, quota reached, extranonce2 too long."""
    lines_sent: int
    lines_received: int
    unmatched_replies: int
    violations: int


# --------------------------------------------------------------------------- events


class Subscribed(Struct, frozen=True):
    extranonce1: str
    extranonce2_size: int
    session_id: str | None


class SubscribeFailed(Struct, frozen=True):
    """The subscribe failed (after the fresh retry, where the profile does one)."""

    message: str


class Authorized(Struct, frozen=True):
    user: str


class AuthorizationFailed(Struct, frozen=True):
    message: str


class NewJob(Struct, frozen=True):
    """The miner switched to a new job; ``clean`` means the old ones were abandoned."""

    job_id: str
    clean: bool
    difficulty: float


class ShareSubmitted(Struct, frozen=True):
    share: SubmittedShare


class ShareAnswered(Struct, frozen=True):
    share: SubmittedShare


class ReconnectRequested(Struct, frozen=True):
    """Follow ``client.reconnect``: close and connect to ``host:port`` now.

    ``host`` None means the pool the miner was configured with (bitaxe).
    """

    host: str | None
    port: int | None


class ReconnectRefused(Struct, frozen=True):
    reason: str


class PoolMessage(Struct, frozen=True):
    """``client.show_message``."""

    text: str


class Ignored(Struct, frozen=True):
    """A pool message this profile does not act on (cgminer and ``mining.set_extranonce`` ...)."""

    method: str
    reason: str


class ConnectionClosed(Struct, frozen=True):
    """What :meth:`MinerProtocol.connection_lost` reports.

    ``retry_now``: reconnect without the usual delay (bfgminer dropping its
    ``mining.suggest_target`` after a pool refused it).
    """

    lost_shares: int
    retry_now: bool


MinerEvent = (
    Subscribed
    | SubscribeFailed
    | Authorized
    | AuthorizationFailed
    | NewJob
    | ShareSubmitted
    | ShareAnswered
    | ReconnectRequested
    | ReconnectRefused
    | PoolMessage
    | Ignored
    | ProtocolViolation
)


class Chunk(Struct, frozen=True):
    """A range of nonces to hash over one header: what the driver hashes."""

    connection: int
    job_id: str
    extranonce1: bytes
    extranonce2: bytes
    ntime: int
    version: int
    version_bits: int | None
    """The 6th submit param for shares of this chunk (None: five params)."""
    difficulty: float
    target: int
    header76: bytes
    start: int
    count: int
    issued_at: float


# --------------------------------------------------------------------------- helpers


def spread_bits(index: int, mask: int) -> int:
    """Deposit the low bits of ``index`` into the set bits of ``mask``, lowest first.

    Counting ``index`` up walks through every version-bits value inside the mask.
    """
    result = 0
    bit = 1
    remaining = mask
    while remaining:
        lowest = remaining & -remaining
        if index & bit:
            result |= lowest
        bit <<= 1
        remaining ^= lowest
    return result


def _parse_port(value: Any) -> int | None:
    """A reconnect port given as a JSON number or a string (``atoi`` semantics)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value < 65536 else None
    if isinstance(value, float) and value.is_integer():
        return int(value) if 0 < value < 65536 else None
    if isinstance(value, str):
        digits = ""
        for character in value.strip():
            if not character.isdigit():
                break
            digits += character
        port = int(digits) if digits else 0
        return port if 0 < port < 65536 else None
    return None


def _is_ip_address(host: str) -> bool:
    return ":" in host or all(part.isdigit() for part in host.split("."))


def _registered_domain(host: str) -> str:
    """The last two labels of a DNS name; an address as it is (bfgminer's rule, simplified)."""
    if _is_ip_address(host):
        return host
    return ".".join(host.lower().rstrip(".").split(".")[-2:])


def _integer_id(request_id: RequestId) -> int:
    """cgminer reads ids with ``json_integer_value``: anything but an integer is 0."""
    return request_id if isinstance(request_id, int) and not isinstance(request_id, bool) else 0


class _PoolLine(Struct):
    """First-pass shape of a line from the pool."""

    id: Any = None
    method: Any = UNSET


_decode_line = BoundedDecoder(_PoolLine).decode
_decode_pool_request = BoundedDecoder(PoolRequest).decode
_decode_response = BoundedDecoder(Response).decode


class _Pending(Struct):
    method: str
    share_serial: int | None = None


class _JobEntry(Struct):
    job: Job
    difficulty: float
    target: int


class _Work:
    """The job, extranonces and merkle root being hashed, and the next chunk's index."""

    __slots__ = ("chunk_index", "entry", "extranonce1", "extranonce2", "merkle_root", "received_at", "serial")

    def __init__(
        self,
        serial: int,
        entry: _JobEntry,
        extranonce1: bytes,
        extranonce2: bytes,
        received_at: float,
    ) -> None:
        self.serial = serial
        self.entry = entry
        self.extranonce1 = extranonce1
        self.extranonce2 = extranonce2
        self.merkle_root = entry.job.merkle_root(extranonce1, extranonce2)
        self.received_at = received_at
        self.chunk_index = 0


# --------------------------------------------------------------------------- the sans-IO miner


class MinerProtocol:
    """One miner's Stratum V1 client, sans-IO, behaving like ``config.profile``.

    Call :meth:`connection_made` for every new connection, feed
    :meth:`receive_data`, write :meth:`data_to_send` after every call, and call
    :meth:`connection_lost` when the connection ends. Hash with
    :meth:`next_chunk` / :meth:`chunk_done` and call :meth:`expire` now and then.
    ``now`` is wall-clock seconds, passed in: the protocol never reads a clock.
    """

    def __init__(self, config: MinerConfig, *, name: str | None = None) -> None:
        self.config = config
        self.traits = PROFILE_TRAITS[config.profile]
        self.name = name or f"{config.profile.value}:{config.user}"
        self.user_agent = config.user_agent or self.traits.user_agent
        # Survive reconnects.
        self._next_id = 0  # cgminer's swork_id; bitaxe restarts it at 1 per connection
        self._connection = 0
        self._session_id: str | None = None
        self._skip_suggest_target_once = False
        self._records: BoundedMap[int, SubmittedShare] = BoundedMap(config.max_records)
        self._share_serial = 0
        self._work_serial = 0
        # Counters.
        self.connections = 0
        self.disconnects = 0
        self.reconnect_requests = 0
        self.hashes = 0
        self.hashing_seconds = 0.0
        self.jobs = 0
        self.clean_jobs = 0
        self.shares_found = 0
        self.submitted_count = 0
        self.accepted_count = 0
        self.rejected_count = 0
        self.lost_count = 0
        self.stale_submitted = 0
        self.stale_discarded = 0
        self.not_submitted = 0
        self.lines_sent = 0
        self.lines_received = 0
        self.unmatched_replies = 0
        self.violations = 0
        self._reset_connection()
        self.connected = False

    # ------------------------------------------------------------ connection lifecycle

    def _reset_connection(self) -> None:
        self._lines = LineBuffer(MAX_LINE_FROM_POOL)
        self._out: list[bytes] = []
        self._pending: dict[RequestId, deque[_Pending]] = {}
        self._host = ""
        self._port = 0
        self.subscribed = False
        self.authorized = False
        self._subscribe_answered = False
        self._fresh_subscribe_sent = False
        self._suggest_target_sent = False
        self.extranonce1: bytes | None = None
        self.extranonce2_size: int | None = None
        self._pending_extranonce: tuple[bytes, int | None] | None = None
        self.difficulty: float = 1.0
        self._next_difficulty: float | None = None
        self._difficulty_after: float | None = None
        self._jobs: BoundedMap[str, _JobEntry] = BoundedMap(MAX_JOBS)
        self._current_entry: _JobEntry | None = None
        self._prevhash: str | None = None
        self._work: _Work | None = None
        self._extranonce2_counter = 0
        self.version_mask = 0
        self._txlist_sent = False

    def connection_made(self, host: str, port: int, now: float) -> None:
        """A new connection to ``host:port`` is up: queue the profile's opening lines."""
        self._reset_connection()
        self.connected = True
        self._connection += 1
        self.connections += 1
        self._host, self._port = host, port
        profile = self.config.profile
        if profile is Profile.BITAXE:
            self._next_id = 1
            self._send_configure()
            self._send_subscribe()
            self._send_authorize()
            self._send_suggest_difficulty(self._bitaxe_suggestion())
        elif profile is Profile.BMMINER:
            self._send_configure()
            self._send_subscribe()
        elif profile is Profile.BFGMINER:
            skip = self._skip_suggest_target_once
            self._skip_suggest_target_once = False
            if self.config.suggest_target and not skip:
                self._send_suggest_target()
            self._send_subscribe()
        else:
            self._send_subscribe()

    def connection_lost(self, now: float) -> ConnectionClosed:
        """The connection ended: outstanding shares are lost, the session state is dropped."""
        if not self.connected:
            return ConnectionClosed(0, False)
        lost = 0
        for queue in self._pending.values():
            for pending in queue:
                if pending.share_serial is not None:
                    lost += 1
                    self._mark_lost(pending.share_serial)
        retry_now = False
        if self._suggest_target_sent and not self._subscribe_answered:
            # bfgminer: "Failed to connect stratum with mining.suggest_target, retrying
            # without" at once; the connection after that tries the target again
            self._skip_suggest_target_once = True
            retry_now = True
        self.disconnects += 1
        # Forget the session; difficulty, extranonce and mask stay readable for the
        # statistics until the next connection_made.
        self.connected = False
        self.subscribed = False
        self.authorized = False
        self._pending = {}
        self._jobs.clear()
        self._current_entry = None
        self._work = None
        self._pending_extranonce = None
        self._next_difficulty = self._difficulty_after = None
        self._out.clear()
        return ConnectionClosed(lost, retry_now)

    def data_to_send(self) -> bytes:
        """Lines queued for the pool since the last call."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    # ------------------------------------------------------------ requests

    def _take_id(self) -> int:
        value = self._next_id
        self._next_id += 1
        return value

    def _send(
        self,
        method: str,
        params: list[Any],
        request_id: RequestId,
        *,
        layout: Sequence[str] = _REQUEST_LAYOUT,
        tight_keys: frozenset[str] = frozenset(),
        share_serial: int | None = None,
    ) -> None:
        request = OutgoingRequest(request_id, method, params)
        line = _render_request(request, layout, compact=self.traits.compact_json, tight_keys=tight_keys)
        self._out.append(line)
        self.lines_sent += 1
        if request_id is not None:
            self._pending.setdefault(request_id, deque()).append(_Pending(method, share_serial))

    def _send_subscribe(self, *, fresh: bool = False) -> None:
        if fresh:
            params: list[Any] = []
            self._fresh_subscribe_sent = True
        else:
            params = [self.user_agent]
            if self.traits.resumes_session and self._session_id is not None:
                params.append(self._session_id)
        request_id = 1 if self.config.profile is Profile.CPUMINER else self._take_id()
        self._send("mining.subscribe", params, request_id)

    def _send_authorize(self) -> None:
        profile = self.config.profile
        if profile is Profile.CPUMINER:
            request_id: RequestId = 2
        elif profile is Profile.BFGMINER:
            request_id = "auth"
        else:
            request_id = self._take_id()
        self._send("mining.authorize", [self.config.user, self.config.password], request_id)

    def _send_configure(self) -> None:
        traits = self.traits
        extension_params: dict[str, Any] = {"version-rolling.mask": traits.requested_mask}
        if traits.min_bit_count is not None:
            extension_params["version-rolling.min-bit-count"] = traits.min_bit_count
        self._send("mining.configure", [["version-rolling"], extension_params], self._take_id())

    def _suggestion(self, default: float | None) -> float | None:
        """The ``mining.suggest_difficulty`` param: ``%d`` from 1 up (cgminer, ESP-Miner)."""
        value = self.config.suggest_difficulty if self.config.suggest_difficulty is not None else default
        if value is None:
            return None
        return int(value) if value >= 1 else value

    def _bitaxe_suggestion(self) -> float:
        suggestion = self._suggestion(DEFAULT_SUGGESTED_DIFFICULTY)
        assert suggestion is not None
        return suggestion

    def _send_suggest_difficulty(self, difficulty: float) -> None:
        self._send("mining.suggest_difficulty", [difficulty], self._take_id())

    def _send_suggest_target(self) -> None:
        requested = self.config.suggest_difficulty
        target = difficulty_to_target(DEFAULT_SUGGESTED_DIFFICULTY if requested is None else requested)
        self._send("mining.suggest_target", [f"{target:064x}"], None)
        self._suggest_target_sent = True

    def _send_get_transactions(self, job_id: str) -> None:
        self._send("mining.get_transactions", [job_id], f"txlist{job_id}", layout=_SUBMIT_LAYOUT)
        self._txlist_sent = True

    def _send_extranonce_subscribe(self) -> None:
        request_id: RequestId = "xnsub" if self.config.profile is Profile.BFGMINER else self._take_id()
        self._send("mining.extranonce.subscribe", [], request_id)

    def _answer(self, fields: Sequence[tuple[str, Any]]) -> None:
        self._out.append(render_line(fields, compact=self.traits.compact_json))
        self.lines_sent += 1

    # ------------------------------------------------------------ input

    def receive_data(self, data: bytes, now: float) -> list[MinerEvent]:
        """Feed bytes from the pool; return the events they complete."""
        try:
            lines = self._lines.feed(data)
        except LineTooLong as exc:
            self.violations += 1
            return [ProtocolViolation(str(exc), fatal=True)]
        events: list[MinerEvent] = []
        for line in lines:
            self.lines_received += 1
            events.extend(self._handle_line(line, now))
        return events

    def _handle_line(self, line: bytes, now: float) -> list[MinerEvent]:
        try:
            head = _decode_line(line)
        except msgspec.DecodeError:
            self.violations += 1
            return [ProtocolViolation("line from the pool is not a JSON object", line=line)]
        method = head.method
        if method is UNSET or method is None:
            return self._handle_response(line, now)
        if not isinstance(method, str):
            self.violations += 1
            return [ProtocolViolation("method is not a string", line=line)]
        if method not in POOL_METHODS:
            return [Ignored(method, "unknown method, not answered")]
        if self.config.profile is Profile.BITAXE and head.id is not None and type(head.id) is not int:
            return [Ignored(method, "ESP-Miner refuses a message whose id is not an integer")]
        try:
            message = _decode_pool_request(line)
        except msgspec.ValidationError as exc:
            self.violations += 1
            return [ProtocolViolation(f"malformed {method}: {exc}", line=line)]
        kind = type(message)
        if kind is Notify:
            return self._on_notify(message, line, now)
        if kind is SetDifficulty:
            return self._on_set_difficulty(message, line)
        if kind is SetExtranonce:
            return self._on_set_extranonce(message, line, now)
        if kind is SetVersionMask:
            return self._on_set_version_mask(message, line, now)
        if kind is Reconnect:
            return self._on_reconnect(message.params)
        if kind is ShowMessage:
            return self._on_show_message(message)
        if kind is GetVersion:
            return self._on_get_version(message)
        if kind is Ping:
            return self._on_ping(message)
        return [Ignored(method, "not handled")]  # pragma: no cover - POOL_METHODS are all above

    # ------------------------------------------------------------ pool requests

    def _on_notify(self, message: Notify, line: bytes, now: float) -> list[MinerEvent]:
        params = message.params
        try:
            check_notify(params)
            job = Job.from_notify_fields(
                params.job_id,
                params.prevhash,
                params.coinb1,
                params.coinb2,
                params.merkle_branch,
                params.version,
                params.nbits,
                params.ntime,
            )
        except ValueError as exc:
            self.violations += 1
            return [ProtocolViolation(f"mining.notify ignored: {exc}", line=line)]
        new_block = self._prevhash is not None and params.prevhash != self._prevhash
        clean = params.clean_jobs or new_block
        if self._pending_extranonce is not None:
            self._apply_extranonce(*self._pending_extranonce)
            self._pending_extranonce = None
        if self._next_difficulty is not None:
            self.difficulty = self._next_difficulty
            self._next_difficulty = self._difficulty_after
            self._difficulty_after = None
        if clean:
            self._jobs.clear()
            self.clean_jobs += 1
        if clean or (self.traits.extranonce2_per_job and job.job_id not in self._jobs):
            self._extranonce2_counter = 0
        entry = _JobEntry(job, self.difficulty, difficulty_to_target(self.difficulty))
        self._jobs.put(job.job_id, entry)
        self._prevhash = params.prevhash
        self._current_entry = entry
        self.jobs += 1
        self._start_work(now)
        if self.config.profile is Profile.BFGMINER and self.authorized and not self._txlist_sent:
            self._send_get_transactions(job.job_id)
        return [NewJob(job.job_id, clean, self.difficulty)]

    def _on_set_difficulty(self, message: SetDifficulty, line: bytes) -> list[MinerEvent]:
        value = message.difficulty
        if isinstance(value, bool) or not (math.isfinite(value) and value > 0):
            self.violations += 1
            return [ProtocolViolation(f"difficulty {value!r} is not a positive number", line=line)]
        # cgminer's parse_diff: one pending value per notify, a third replaces the second
        if self._next_difficulty is None:
            self._next_difficulty = float(value)
        else:
            self._difficulty_after = float(value)
        return []

    def _on_set_extranonce(self, message: SetExtranonce, line: bytes, now: float) -> list[MinerEvent]:
        handling = self.traits.extranonce
        if handling == "ignore":
            return [Ignored("mining.set_extranonce", f"{self.config.profile.value} does not implement it")]
        params = message.params
        size = params.extranonce2_size
        if params.extranonce1 is None or not is_hex(params.extranonce1) or len(params.extranonce1) % 2:
            self.violations += 1
            return [ProtocolViolation("mining.set_extranonce extranonce1 is not hex", line=line)]
        if size is not None and not self.traits.min_extranonce2_size <= size <= self.traits.max_extranonce2_size:
            self.violations += 1
            return [ProtocolViolation(f"mining.set_extranonce extranonce2_size {size} refused", line=line)]
        extranonce1 = bytes.fromhex(params.extranonce1)
        if handling == "next-notify":
            self._pending_extranonce = (extranonce1, size)
            return []
        self._apply_extranonce(extranonce1, size)
        if self._current_entry is not None and self._current_entry.job.job_id in self._jobs:
            self._start_work(now)
            return [NewJob(self._current_entry.job.job_id, False, self._current_entry.difficulty)]
        return []

    def _apply_extranonce(self, extranonce1: bytes, size: int | None) -> None:
        self.extranonce1 = extranonce1
        if size is not None:
            self.extranonce2_size = size

    def _on_set_version_mask(self, message: SetVersionMask, line: bytes, now: float) -> list[MinerEvent]:
        if not self.traits.version_rolling:
            return [Ignored("mining.set_version_mask", "this profile does not roll versions")]
        mask_hex = message.mask
        if not is_hex(mask_hex, 8):
            self.violations += 1
            return [ProtocolViolation("mining.set_version_mask mask is not 8 hex digits", line=line)]
        self._set_version_mask(int(mask_hex, 16) & int(self.traits.requested_mask or "0", 16), now)
        return []

    def _set_version_mask(self, mask: int, now: float) -> None:
        """Use a new mask; the work restarts on a fresh extranonce2 so no header repeats."""
        if mask == self.version_mask:
            return
        self.version_mask = mask
        if self._work is not None:
            self._start_work(now)

    def _on_reconnect(self, params: list[Any]) -> list[MinerEvent]:
        self.reconnect_requests += 1
        rule = self.traits.reconnect
        host = params[0] if params and isinstance(params[0], str) and params[0] else None
        port_value = params[1] if len(params) > 1 else None
        if rule == "configured-pool":
            return [ReconnectRequested(None, None)]
        if rule == "host-and-port":
            port = _parse_port(port_value)
            if host is None or port is None:
                return [ReconnectRefused("cpuminer needs a host and a port in client.reconnect")]
            return [ReconnectRequested(host, port)]
        port = self._port if port_value is None else _parse_port(port_value)
        if port is None:
            return [ReconnectRefused(f"client.reconnect port {port_value!r} is not a port")]
        if host is None:
            return [ReconnectRequested(self._host, port)]
        if rule == "dot-suffix":
            current_dot = self._host.find(".")
            requested_dot = host.find(".")
            if current_dot < 0:
                return [ReconnectRefused(f"Denied stratum reconnect request for pool without domain {self._host!r}")]
            if requested_dot < 0:
                return [ReconnectRefused(f"Denied stratum reconnect request to url without domain {host!r}")]
            if self._host[current_dot:] != host[requested_dot:]:
                return [ReconnectRefused(f"Denied stratum reconnect request to non-matching domain {host!r}")]
            return [ReconnectRequested(host, port)]
        # bfgminer: same host, the same registered domain, or #redirect
        if host == self._host or self.config.allow_redirect or (_registered_domain(host) == _registered_domain(self._host)):
            return [ReconnectRequested(host, port)]
        return [ReconnectRefused(f"redirect to {host!r} is outside {self._host!r}'s domain")]

    def _on_show_message(self, message: ShowMessage) -> list[MinerEvent]:
        profile = self.config.profile
        if message.id is not None:
            if profile is Profile.CPUMINER:
                self._answer([("id", message.id), ("error", None), ("result", True)])
            elif profile is Profile.BFGMINER:
                self._answer([("id", message.id), ("result", True), ("error", None)])
        return [PoolMessage(message.text)]

    def _on_get_version(self, message: GetVersion) -> list[MinerEvent]:
        profile = self.config.profile
        version = self.traits.version_reply
        if message.id is None:
            return [Ignored("client.get_version", "no id to answer")]
        if profile in (Profile.CGMINER, Profile.BMMINER):
            self._answer([("id", _integer_id(message.id)), ("result", version), ("error", None)])
        elif profile is Profile.CPUMINER:
            self._answer([("id", message.id), ("error", None), ("result", version)])
        else:
            self._answer([("id", message.id), ("result", version), ("error", None)])
        return []

    def _on_ping(self, message: Ping) -> list[MinerEvent]:
        profile = self.config.profile
        if not self.traits.answers_ping:
            return [Ignored("mining.ping", f"{profile.value} does not answer it")]
        if message.id is None:
            return [Ignored("mining.ping", "no id to answer")]
        if profile is Profile.BITAXE:
            self._answer([("id", message.id), ("method", "pong"), ("params", [])])
        else:
            self._answer([("id", _integer_id(message.id)), ("result", "pong"), ("error", None)])
        return []

    # ------------------------------------------------------------ responses

    def _handle_response(self, line: bytes, now: float) -> list[MinerEvent]:
        try:
            response = _decode_response(line)
        except msgspec.ValidationError as exc:
            self.violations += 1
            return [ProtocolViolation(f"malformed response: {exc}", line=line)]
        queue = self._pending.get(response.id)
        if not queue:
            self.unmatched_replies += 1
            return []
        pending = queue.popleft()
        if not queue:
            del self._pending[response.id]
        method = pending.method
        if method == "mining.submit":
            return self._on_submit_answer(pending, response, now)
        if method == "mining.subscribe":
            return self._on_subscribe_answer(response)
        if method == "mining.authorize":
            return self._on_authorize_answer(response)
        if method == "mining.configure":
            self._on_configure_answer(response, now)
        return []

    def _on_subscribe_answer(self, response: Response) -> list[MinerEvent]:
        self._subscribe_answered = True
        failure = None
        result: Any = None
        if response.result is UNSET or bytes(response.error) != b"null":
            failure = f"subscribe refused: {bytes(response.error).decode(errors='replace')}"
        else:
            try:
                result = decode_json(response.result)
            except msgspec.DecodeError:
                failure = "subscribe result is not JSON"
        if failure is None:
            failure = self._check_subscribe_result(result)
        if failure is not None:
            if self.traits.retries_fresh_subscribe and not self._fresh_subscribe_sent:
                # "Failed to resume stratum, trying afresh"
                self._send_subscribe(fresh=True)
                return []
            return [SubscribeFailed(failure)]
        extranonce1_hex, size = result[1], result[2]
        self.subscribed = True
        self.extranonce1 = bytes.fromhex(extranonce1_hex)
        self.extranonce2_size = size
        # cgminer's initiate_stratum: a new subscription starts at difficulty 1
        self.difficulty = 1.0
        session_id = notify_subscription_id(result[0])
        if self.traits.resumes_session:
            self._session_id = session_id
        events: list[MinerEvent] = [Subscribed(extranonce1_hex, size, session_id)]
        profile = self.config.profile
        if profile is Profile.BFGMINER and self.config.extranonce_subscribe:
            self._send_extranonce_subscribe()
        if profile is not Profile.BITAXE:
            self._send_authorize()
        return events

    def _check_subscribe_result(self, result: Any) -> str | None:
        if not isinstance(result, list) or len(result) < 3:
            return "subscribe result is not [subscriptions, extranonce1, extranonce2_size]"
        extranonce1, size = result[1], result[2]
        if not isinstance(extranonce1, str) or not is_hex(extranonce1) or len(extranonce1) % 2:
            return f"extranonce1 {extranonce1!r} is not hex"
        if isinstance(size, bool) or not isinstance(size, int):
            return f"extranonce2_size {size!r} is not an integer"
        low, high = self.traits.min_extranonce2_size, self.traits.max_extranonce2_size
        if not low <= size <= high:
            return f"extranonce2_size {size} is outside {low}..{high}"
        return None

    def _on_authorize_answer(self, response: Response) -> list[MinerEvent]:
        ok = response.accepted and bytes(response.error) == b"null"
        if not ok:
            message = bytes(response.error).decode(errors="replace")
            if message == "null":
                message = "result is not true"
            return [AuthorizationFailed(message)]
        if self.authorized:
            return []
        self.authorized = True
        profile = self.config.profile
        if profile in (Profile.CGMINER, Profile.BMMINER):
            suggestion = self._suggestion(None)
            if suggestion is not None:
                self._send_suggest_difficulty(suggestion)
        if profile is Profile.BMMINER:
            self._send("mining.multi_version", [1], self._take_id())
            if self.config.extranonce_subscribe:
                self._send_extranonce_subscribe()
        if profile is Profile.BFGMINER and self._current_entry is not None and not self._txlist_sent:
            self._send_get_transactions(self._current_entry.job.job_id)
        return [Authorized(self.config.user)]

    def _on_configure_answer(self, response: Response, now: float) -> None:
        if response.result is UNSET or self.traits.requested_mask is None:
            return
        try:
            result = decode_json(response.result)
        except msgspec.DecodeError:
            return
        if isinstance(result, dict) and result.get("version-rolling") is True:
            mask = result.get("version-rolling.mask")
            if isinstance(mask, str) and is_hex(mask, 8):
                self._set_version_mask(int(mask, 16) & int(self.traits.requested_mask, 16), now)

    def _on_submit_answer(self, pending: _Pending, response: Response, now: float) -> list[MinerEvent]:
        verdict = read_verdict(response)
        if verdict.accepted:
            self.accepted_count += 1
        else:
            self.rejected_count += 1
        serial = pending.share_serial
        record = self._records.get(serial) if serial is not None else None
        if record is None:
            return []
        record = msgspec.structs.replace(record, verdict=verdict, answered_at=now)
        self._records[record.serial] = record
        return [ShareAnswered(record)]

    def _mark_lost(self, serial: int) -> None:
        self.lost_count += 1
        record = self._records.get(serial)
        if record is not None:
            self._records[serial] = msgspec.structs.replace(record, lost=True)

    def expire(self, now: float) -> int:
        """Give up on answers older than ``share_timeout``; return how many were given up."""
        deadline = now - self.config.share_timeout
        expired = 0
        for request_id in list(self._pending):
            queue = self._pending[request_id]
            kept: deque[_Pending] = deque()
            for pending in queue:
                serial = pending.share_serial
                record = self._records.get(serial) if serial is not None else None
                if serial is not None and (record is None or record.sent_at < deadline):
                    self._mark_lost(serial)
                    expired += 1
                else:
                    kept.append(pending)
            if kept:
                self._pending[request_id] = kept
            else:
                del self._pending[request_id]
        return expired

    # ------------------------------------------------------------ hashing

    def _start_work(self, now: float) -> None:
        """Begin hashing the current job with the next extranonce2."""
        entry = self._current_entry
        if entry is None or self.extranonce1 is None or self.extranonce2_size is None:
            self._work = None
            return
        size = self.extranonce2_size
        extranonce2 = (self._extranonce2_counter % (1 << (8 * size))).to_bytes(size, "little")
        self._extranonce2_counter += 1
        self._work_serial += 1
        self._work = _Work(self._work_serial, entry, self.extranonce1, extranonce2, now)

    @property
    def quota_reached(self) -> bool:
        limit = self.config.max_shares
        return limit is not None and self.submitted_count >= limit

    @property
    def pending_shares(self) -> int:
        return sum(1 for queue in self._pending.values() for p in queue if p.share_serial is not None)

    @property
    def finished(self) -> bool:
        """``max_shares`` were submitted and every answer is in (or given up on)."""
        return self.quota_reached and self.pending_shares == 0

    def next_chunk(self, now: float) -> Chunk | None:
        """The next range of nonces to hash, or None when there is nothing to do."""
        work = self._work
        if work is None or not self.connected or not self.authorized or self.quota_reached:
            return None
        size = self.config.chunk_size
        mask = self.version_mask if self.traits.version_rolling else 0
        versions = 1 << mask.bit_count()
        start = (work.chunk_index // versions) * size
        if start >= NONCE_SPACE:
            self._start_work(now)
            work = self._work
            assert work is not None
            start = 0
        version_index = work.chunk_index % versions
        work.chunk_index += 1
        job = work.entry.job
        bits: int | None
        if mask:
            rolled_bits = spread_bits(version_index, mask)
            version = roll_version(job.version_int, rolled_bits, mask)
            bits = rolled_bits
        else:
            bits = 0 if self.traits.always_sends_version_bits else None
            version = job.version_int
        ntime = job.ntime_int
        if self.config.ntime_roll:
            ntime = (ntime + min(max(int(now - work.received_at), 0), self.config.max_ntime_roll)) & U32_MASK
        header76 = build_header(version, job.prevhash_header, work.merkle_root, ntime, job.nbits_int, 0)[:76]
        return Chunk(
            connection=self._connection,
            job_id=job.job_id,
            extranonce1=work.extranonce1,
            extranonce2=work.extranonce2,
            ntime=ntime,
            version=version,
            version_bits=bits,
            difficulty=work.entry.difficulty,
            target=work.entry.target,
            header76=header76,
            start=start,
            count=min(size, NONCE_SPACE - start),
            issued_at=now,
        )

    def chunk_done(self, chunk: Chunk, hits: Sequence[tuple[int, int]], now: float) -> list[MinerEvent]:
        """Account for a hashed chunk and submit its shares (``hits`` from :func:`scan_nonces`)."""
        self.hashes += chunk.count
        self.hashing_seconds += max(now - chunk.issued_at, 0.0)
        events: list[MinerEvent] = []
        for nonce, hash_int in hits:
            event = self._share_found(chunk, nonce, hash_int, now)
            if event is not None:
                events.append(event)
        return events

    def _share_found(self, chunk: Chunk, nonce: int, hash_int: int, now: float) -> MinerEvent | None:
        self.shares_found += 1
        if chunk.connection != self._connection or not self.connected or chunk.extranonce1 != self.extranonce1:
            # cgminer only sends a share while the pool's extranonce1 is still the work's
            self.not_submitted += 1
            return None
        if chunk.version_bits and chunk.version_bits & ~self.version_mask:
            self.not_submitted += 1
            return None
        if self.quota_reached:
            self.not_submitted += 1
            return None
        limit = self.traits.max_submit_extranonce2_size
        if limit is not None and len(chunk.extranonce2) > limit:
            # cgminer: "Not attempting to submit shares" with extranonce2_size > 8
            self.not_submitted += 1
            return None
        stale = chunk.job_id not in self._jobs
        if stale and not self.traits.submits_stale:
            self.stale_discarded += 1
            return None
        return ShareSubmitted(self._submit(chunk, nonce, hash_int, stale, now))

    def _submit(self, chunk: Chunk, nonce: int, hash_int: int, stale: bool, now: float) -> SubmittedShare:
        params = [self.config.user, chunk.job_id, chunk.extranonce2.hex(), f"{chunk.ntime:08x}", f"{nonce:08x}"]
        if chunk.version_bits is not None:
            params.append(f"{chunk.version_bits:08x}")
        self._share_serial += 1
        serial = self._share_serial
        profile = self.config.profile
        request_id: int | str
        if profile is Profile.CPUMINER:
            request_id = 4
            self._send(
                "mining.submit",
                params,
                request_id,
                layout=_CPUMINER_SUBMIT_LAYOUT,
                tight_keys=frozenset({"id"}),
                share_serial=serial,
            )
        elif profile is Profile.BITAXE:
            request_id = self._take_id()
            self._send("mining.submit", params, request_id, share_serial=serial)
        else:
            request_id = self._take_id()
            self._send("mining.submit", params, request_id, layout=_SUBMIT_LAYOUT, share_serial=serial)
        record = SubmittedShare(
            serial=serial,
            job_id=chunk.job_id,
            extranonce1=chunk.extranonce1.hex(),
            extranonce2=params[2],
            ntime=params[3],
            nonce=params[4],
            version_bits=params[5] if len(params) > 5 else None,
            request_id=request_id,
            sent_at=now,
            difficulty=chunk.difficulty,
            share_difficulty=hash_difficulty(hash_int),
            stale=stale,
        )
        self._records[serial] = record
        self.submitted_count += 1
        if stale:
            self.stale_submitted += 1
        return record

    # ------------------------------------------------------------ reporting

    @property
    def submitted(self) -> list[SubmittedShare]:
        """The kept submitted shares, oldest first."""
        return list(self._records.values())

    def statistics(self) -> MinerStatistics:
        return MinerStatistics(
            name=self.name,
            profile=self.config.profile.value,
            connected=self.connected,
            authorized=self.authorized,
            connections=self.connections,
            connect_failures=0,
            disconnects=self.disconnects,
            reconnect_requests=self.reconnect_requests,
            hashes=self.hashes,
            hashrate=self.hashes / self.hashing_seconds if self.hashing_seconds > 0 else 0.0,
            jobs=self.jobs,
            clean_jobs=self.clean_jobs,
            difficulty=self.difficulty,
            extranonce1=self.extranonce1.hex() if self.extranonce1 is not None else None,
            extranonce2_size=self.extranonce2_size,
            version_mask=f"{self.version_mask:08x}" if self.version_mask else None,
            shares_found=self.shares_found,
            submitted=self.submitted_count,
            accepted=self.accepted_count,
            rejected=self.rejected_count,
            pending=self.pending_shares,
            lost=self.lost_count,
            stale_submitted=self.stale_submitted,
            stale_discarded=self.stale_discarded,
            not_submitted=self.not_submitted,
            lines_sent=self.lines_sent,
            lines_received=self.lines_received,
            unmatched_replies=self.unmatched_replies,
            violations=self.violations,
        )


# --------------------------------------------------------------------------- URLs


class MinerURL(Struct, frozen=True):
    """Where the miner connects: ``stratum+tcp://host:port`` or ``stratum+ssl://``, with
    ``#xnsub`` and ``#redirect`` fragments (bfgminer's conventions)."""

    host: str
    port: int
    tls: bool
    xnsub: bool = False
    redirect: bool = False


def parse_miner_url(text: str) -> MinerURL:
    """Parse a pool URL for a miner; raises :class:`~bridge.errors.ConfigError` with a fix."""
    url = parse_upstream_url(text.replace("&", "#"), extra_fragments=frozenset({"redirect"}))
    if url.transport == "stratumrm":
        raise ConfigError(f"{text!r}: a miner speaks Stratum V1; use stratum+tcp://HOST:PORT or stratum+ssl://HOST:PORT")
    _, _, fragment = text.partition("#")
    options = {part.strip().lower() for part in fragment.replace("&", "#").split("#") if part.strip()}
    return MinerURL(url.host, url.port, url.tls, xnsub=url.xnsub, redirect="redirect" in options)


# --------------------------------------------------------------------------- the trio driver


class _Session:
    """How one connection ended, decided by whichever task saw it first."""

    __slots__ = ("reason", "reconnect_to", "retry_now", "scope")

    def __init__(self) -> None:
        self.reason: str | None = None
        self.reconnect_to: tuple[str, int] | None = None
        self.retry_now = False
        self.scope: trio.CancelScope | None = None

    def end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        if self.scope is not None:
            self.scope.cancel()


class Miner:
    """A reference miner on a real connection: :meth:`run` it in a nursery.

    ``url`` is ``stratum+tcp://HOST:PORT`` or ``stratum+ssl://HOST:PORT`` (with an
    optional ``#xnsub`` / ``#redirect``); ``ssl_context`` verifies TLS pools (the
    system trust store when None). ``hashrate`` caps hashes per second, so many
    miners can share a CPU. ``reconnect_delay`` is the wait after a lost or failed
    connection (cgminer's 5 s); ``client.reconnect`` is followed at once.
    ``hash_in_thread`` hashes in a worker thread instead of the event loop (no
    faster under the GIL, but the loop stays free for other tasks).
    ``on_event(miner, event)`` sees every :data:`MinerEvent` as it happens.
    """

    def __init__(
        self,
        url: str,
        user: str,
        password: str = "x",
        *,
        profile: Profile | str = Profile.CGMINER,
        name: str | None = None,
        hashrate: float | None = None,
        max_shares: int | None = None,
        suggest_difficulty: float | None = None,
        suggest_target: bool = True,
        user_agent: str | None = None,
        ntime_roll: bool = False,
        chunk_size: int = 4096,
        share_timeout: float = 120.0,
        max_records: int = 4096,
        ssl_context: ssl.SSLContext | None = None,
        reconnect_delay: float = 5.0,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 60.0,
        silence_timeout: float | None = None,
        hash_in_thread: bool = False,
        on_event: Callable[[Miner, MinerEvent], None] | None = None,
    ) -> None:
        self.url = parse_miner_url(url)
        try:
            profile = Profile(profile)
        except ValueError:
            raise ConfigError(f"unknown miner profile {profile!r}; choose one of {', '.join(p.value for p in Profile)}") from None
        if hashrate is not None and not (math.isfinite(hashrate) and hashrate > 0):
            raise ConfigError(f"hashrate must be a positive number of hashes per second, got {hashrate!r}")
        if hashrate is not None:
            # keep each chunk to about 50 ms at the capped rate so pacing stays smooth
            chunk_size = max(16, min(chunk_size, int(hashrate / 20)))
        self.config = MinerConfig(
            user=user,
            password=password,
            profile=profile,
            user_agent=user_agent,
            suggest_difficulty=suggest_difficulty,
            suggest_target=suggest_target,
            extranonce_subscribe=self.url.xnsub,
            allow_redirect=self.url.redirect,
            ntime_roll=ntime_roll,
            chunk_size=chunk_size,
            max_shares=max_shares,
            share_timeout=share_timeout,
            max_records=max_records,
        )
        self.protocol = MinerProtocol(self.config, name=name)
        self.name = self.protocol.name
        self.hashrate_cap = hashrate
        self.ssl_context = ssl_context
        self.reconnect_delay = reconnect_delay
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.silence_timeout = silence_timeout if silence_timeout is not None else self.protocol.traits.silence_timeout
        self.hash_in_thread = hash_in_thread
        self.on_event = on_event
        self.connect_failures = 0
        self._stop_requested = False
        self._running = False
        self._cancel_scope: trio.CancelScope | None = None
        self._send_lock = trio.Lock()
        self._work_available = trio.Event()
        self._started = False
        self._task_status: Any = trio.TASK_STATUS_IGNORED

    # ------------------------------------------------------------ public API

    @property
    def submitted(self) -> list[SubmittedShare]:
        """Every kept submitted share, oldest first."""
        return self.protocol.submitted

    @property
    def accepted(self) -> list[SubmittedShare]:
        return [share for share in self.protocol.submitted if share.accepted]

    @property
    def rejected(self) -> list[SubmittedShare]:
        return [share for share in self.protocol.submitted if share.rejected]

    def unanswered(self) -> list[SubmittedShare]:
        """Submitted shares without a verdict: still pending, or lost for good."""
        return [share for share in self.protocol.submitted if share.verdict is None]

    def stale(self) -> list[SubmittedShare]:
        """Shares the miner submitted although it knew a clean notify had abandoned their job."""
        return [share for share in self.protocol.submitted if share.stale]

    def statistics(self) -> MinerStatistics:
        return msgspec.structs.replace(self.protocol.statistics(), connect_failures=self.connect_failures)

    def finish(self) -> None:
        """Stop finding shares; :meth:`run` returns once every submitted share is answered.

        Shares still without a verdict after ``share_timeout`` are given up on
        (counted as lost), so this always ends.
        """
        protocol = self.protocol
        protocol.config = msgspec.structs.replace(protocol.config, max_shares=protocol.submitted_count)
        self._check_finished()

    def stop(self) -> None:
        """Stop mining: :meth:`run` returns soon after (callable from any trio task)."""
        self._stop_requested = True
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> MinerStatistics:
        """Mine until :meth:`stop`, cancellation, or ``max_shares`` answered.

        Reports through ``task_status`` once the first authorization succeeded.
        Returns the final statistics.
        """
        if self._running:
            raise RuntimeError(f"{self.name} is already running")
        self._running = True
        self._task_status = task_status
        target = (self.url.host, self.url.port)
        try:
            with trio.CancelScope() as scope:
                self._cancel_scope = scope
                if self._stop_requested:
                    scope.cancel()
                while True:
                    session = await self._connect_and_mine(target)
                    if self.protocol.finished:
                        break
                    if session.reconnect_to is not None:
                        target = session.reconnect_to
                        continue
                    if session.retry_now:
                        continue
                    await trio.sleep(self.reconnect_delay)
        finally:
            self._cancel_scope = None
            self._running = False
        return self.statistics()

    # ------------------------------------------------------------ one connection

    async def _connect_and_mine(self, target: tuple[str, int]) -> _Session:
        session = _Session()
        host, port = target
        context = None
        if self.url.tls:
            context = self.ssl_context or ssl.create_default_context()
        try:
            stream = await open_stream(host, port, ssl_context=context, timeout=self.connect_timeout)
        except (OSError, trio.BrokenResourceError) as exc:
            self.connect_failures += 1
            log.info("%s: cannot connect to %s:%d: %s", self.name, host, port, exc)
            session.reason = str(exc)
            return session
        protocol = self.protocol
        protocol.connection_made(host, port, time.time())
        log.debug("%s: connected to %s:%d", self.name, host, port)
        try:
            async with trio.open_nursery() as nursery:
                session.scope = nursery.cancel_scope
                nursery.start_soon(self._read_loop, stream, session)
                nursery.start_soon(self._hash_loop, stream, session)
                nursery.start_soon(self._housekeeping, session)
                await self._flush(stream, session)
        finally:
            closed = protocol.connection_lost(time.time())
            session.retry_now = closed.retry_now
            if closed.lost_shares:
                log.info("%s: lost %d shares with the connection", self.name, closed.lost_shares)
            await close_quietly(stream)
        log.debug("%s: connection to %s:%d ended: %s", self.name, host, port, session.reason)
        return session

    async def _flush(self, stream: trio.abc.Stream, session: _Session) -> None:
        async with self._send_lock:
            data = self.protocol.data_to_send()
            if not data:
                return
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                session.end(f"send failed: {exc}")

    async def _read_loop(self, stream: trio.abc.Stream, session: _Session) -> None:
        protocol = self.protocol
        handshake_deadline = trio.current_time() + self.handshake_timeout
        while True:
            if protocol.authorized:
                limit = self.silence_timeout if self.silence_timeout is not None else math.inf
            else:
                limit = handshake_deadline - trio.current_time()
            data = b""
            with trio.move_on_after(max(limit, 0.0)) as timer:
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    session.end(f"receive failed: {exc}")
                    return
            if timer.cancelled_caught:
                session.end("the pool went silent" if protocol.authorized else "handshake timed out")
                return
            if not data:
                session.end("the pool closed the connection")
                return
            events = protocol.receive_data(data, time.time())
            await self._flush(stream, session)
            self._dispatch(events, session)

    async def _hash_loop(self, stream: trio.abc.Stream, session: _Session) -> None:
        protocol = self.protocol
        cap = self.hashrate_cap
        paced_until = trio.current_time()
        while True:
            chunk = protocol.next_chunk(time.time())
            if chunk is None:
                self._work_available = trio.Event()
                await self._work_available.wait()
                paced_until = trio.current_time()
                continue
            if self.hash_in_thread:
                hits = await trio.to_thread.run_sync(scan_nonces, chunk.header76, chunk.start, chunk.count, chunk.target)
            else:
                hits = scan_nonces(chunk.header76, chunk.start, chunk.count, chunk.target)
            events = protocol.chunk_done(chunk, hits, time.time())
            if events:
                await self._flush(stream, session)
                self._dispatch(events, session)
            if cap is None:
                await trio.lowlevel.checkpoint()
                continue
            paced_until += chunk.count / cap
            now = trio.current_time()
            if paced_until > now:
                await trio.sleep(paced_until - now)
            else:
                paced_until = max(paced_until, now - 1.0)  # never burst more than a second's worth
                await trio.lowlevel.checkpoint()

    async def _housekeeping(self, session: _Session) -> None:
        """Give up on overdue answers and notice when ``max_shares`` are all answered."""
        while True:
            await trio.sleep(1.0)
            self.protocol.expire(time.time())
            self._check_finished()

    def _check_finished(self) -> None:
        if self.protocol.finished:
            self.stop()

    def _dispatch(self, events: list[MinerEvent], session: _Session) -> None:
        for event in events:
            if self.on_event is not None:
                self.on_event(self, event)
            kind = type(event)
            if kind is NewJob or kind is Authorized:
                self._work_available.set()
                if kind is Authorized and not self._started:
                    self._started = True
                    log.debug("%s: authorized", self.name)
                    self._task_status.started()
            elif kind is ShareAnswered:
                self._check_finished()
            elif kind is ReconnectRequested:
                assert isinstance(event, ReconnectRequested)
                if event.host is None or event.port is None:
                    session.reconnect_to = (self.url.host, self.url.port)
                else:
                    session.reconnect_to = (event.host, event.port)
                log.info("%s: client.reconnect to %s:%d", self.name, *session.reconnect_to)
                session.end("client.reconnect")
            elif kind is ReconnectRefused:
                log.info("%s: %s", self.name, event.reason)  # type: ignore[union-attr]
            elif kind is SubscribeFailed or kind is AuthorizationFailed:
                log.warning("%s: %s", self.name, event.message)  # type: ignore[union-attr]
                session.end(event.message)  # type: ignore[union-attr]
            elif kind is ProtocolViolation:
                assert isinstance(event, ProtocolViolation)
                log.info("%s: %s", self.name, event.reason)
                if event.fatal:
                    session.end(event.reason)
            elif kind is Ignored:
                log.debug("%s: ignored %s: %s", self.name, event.method, event.reason)  # type: ignore[union-attr]
            elif kind is PoolMessage:
                log.info("%s: pool says %r", self.name, event.text)  # type: ignore[union-attr]
