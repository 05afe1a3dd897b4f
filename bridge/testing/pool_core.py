"""The reference pool's sans-IO core: jobs, share validation and verdicts, no sockets.

The reference pool is a real Stratum V1 server for tests, the demo and benchmarks;
:mod:`bridge.testing.pool` runs this core over TCP or TLS with trio. It behaves like a small solo pool (ckpool is the model, and the ckpool captures in
tests/data/captures), so a proxy that works against it works against real
pools, and every share it accepts has been checked for real.

**Jobs.** The pool makes its own work. A *block* has a height, a random
previous-block hash (with the leading zero bytes a real one has) and a coinbase
value. A *job* of that block has a coinbase split into ``coinb1``/``coinb2``
around the extranonce (``coinb1`` ends in the BIP34 height push and a tag push,
the scriptSig length counts the 4-byte extranonce1 and the extranonce2),
0..12 random 32-byte merkle branches, version ``20000000``, the configured
``nbits`` and the current ntime from the clock the pool was given. Job ids are
short hex strings, unique per pool. A job goes out every ``notify_interval``
seconds with ``clean_jobs=false``; a new block (on demand with
:meth:`PoolCore.new_block`, every ``block_interval`` seconds, or when a
share solves one) sends ``clean_jobs=true``. Jobs of the current block are kept
(at most ``max_jobs_per_block``); the ids of older ones are remembered so that
a share on them is answered "Stale" rather than "Job not found".

**Connections.** Each connection is a :class:`ConnectionState`
around the sans-IO :class:`~bridge.sv1.server.ServerSession`, which already
orders the handshake, echoes ids, never answers ``id: null`` and answers
malformed requests. The pool answers:

- ``mining.subscribe`` with ``[[["mining.set_difficulty", sid], ["mining.notify",
  sid]], extranonce1, extranonce2_size]``, then ``mining.set_difficulty`` and a
  clean ``mining.notify`` right away (as ckpool does). extranonce1 is 4 bytes,
  unique among open connections; the session id is extranonce1 byte-swapped
  (ckpool's form). A subscribe naming a session (or extranonce1) that closed
  less than ``session_resume_seconds`` ago gets the same extranonce1 back.
- ``mining.configure``: ``version-rolling`` gets ``pool mask & miner mask``
  (``false`` when that is empty), ``minimum-difficulty`` raises the connection's
  floor, ``subscribe-extranonce`` and ``info`` are acknowledged, unknown
  extensions get ``false``.
- ``mining.authorize``: any name except ckpool's forbidden ones (empty,
  starting with ``.`` or ``_``, containing ``/``) is authorized.
- ``mining.suggest_difficulty`` / ``mining.suggest_target``: honoured, clamped
  to ``[minimum_difficulty, maximum_difficulty]`` (both default to
  ``difficulty`` on a fixed-difficulty pool, which therefore stays fixed),
  answered ``true``.
- ``mining.extranonce.subscribe`` and ``mining.multi_version``: ``true``;
  ``mining.get_transactions``: ``[]``.

**Difficulty.** Fixed (fractional values welcome) or per-connection vardiff
aiming at one share every ``vardiff_share_interval`` seconds. A new difficulty
is always announced with ``mining.set_difficulty`` immediately before a
``mining.notify`` (cgminer applies one difficulty per notify), and each job
remembers the difficulty it was sent under on each connection, so a share on
an older job is judged at the difficulty in force when that job was sent
(ckpool's ``diff_change_job_id``).

**Share validation**, in ckpool's order; rejects are
``{"id":X,"result":false,"error":[code,"message",null]}``:

1. the worker must be authorized on this connection (24 "Unauthorized worker");
2. the job must be known (21 "Job not found"), and of the current block
   (21 "Stale");
3. extranonce2 must have the subscribed size (20 "Incorrect size of extranonce2");
4. ntime within ``[job ntime, job ntime + ntime_window]`` (20 "Ntime out of range");
5. version bits within the negotiated mask (the pool mask when the miner sent
   no ``mining.configure``), rolled per BIP310; a full version equal to the job
   version outside the mask (bmminer's ``multi_version``) is accepted too
   (20 "Invalid version mask");
6. not a duplicate of an accepted share: same job, extranonce1, extranonce2,
   ntime, nonce and rolled version (22 "Duplicate share");
7. header hash at or below the target of the job's difficulty
   (23 "Low difficulty share").

Submits before subscribe (25) or authorize (24) and malformed hex (20) are
answered by the session. Every accepted share becomes a :class:`ShareRecord`
in :attr:`PoolCore.accepted`; a share whose hash also meets the network
target is a block (logged, counted, and followed by a new block unless
``new_block_on_solve`` is off).

**Controls** for tests are core methods that act at once:
:meth:`~PoolCore.reject_next` and :meth:`~PoolCore.reject_all` answer submits
with a chosen code without checking them; :meth:`~PoolCore.stall` makes the
pool a blackhole (the driver then reads and sends nothing, the core sends no
jobs); :meth:`~PoolCore.stop_jobs` stops every ``mining.notify``;
:meth:`~PoolCore.new_block` moves the chain on (to a given prevhash, so several
pools can share one chain and one can be left lagging);
:meth:`~PoolCore.set_difficulty` changes every connection's difficulty;
:meth:`~PoolCore.request_reconnect` sends ``client.reconnect``. Closing
connections and listening are the driver's (:mod:`bridge.testing.pool`).

Memory is bounded: lines are limited to ``max_line`` bytes (ckpool's 1024 by
default), the duplicate set of a job to ``max_shares_per_job``, jobs to the
current block, remembered sessions to those younger than
``session_resume_seconds``, and the share records to ``max_records``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import struct
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import msgspec

from bridge.bounded import BoundedMap
from bridge.errors import ConfigError, LineTooLong
from bridge.mining.share import (
    Job,
    difficulty_to_target,
    display_hex,
    hash_difficulty,
    nbits_to_target,
    prevhash_from_header,
    prevhash_to_header,
    roll_version,
    sha256d,
    target_to_difficulty,
    version_bits_allowed,
)
from bridge.sv1.events import ProtocolViolation
from bridge.sv1.framing import BoundedDecoder, LineBuffer
from bridge.sv1.messages import (
    FALSE,
    Authorize,
    Configure,
    ExtranonceSubscribe,
    GetTransactions,
    MinerResponse,
    MultiVersion,
    NotifyParams,
    Submit,
    Subscribe,
    SuggestDifficulty,
    SuggestTarget,
)
from bridge.sv1.rejects import (
    DUPLICATE,
    JOB_NOT_FOUND,
    LOW_DIFFICULTY,
    NOT_SUBSCRIBED,
    OTHER,
    UNAUTHORIZED,
)
from bridge.sv1.server import ServerEvent, ServerSession

__all__ = [
    "STANDARD_MESSAGES",
    "ConnectionState",
    "PoolConfig",
    "PoolCore",
    "PoolStatistics",
    "RejectRecord",
    "ShareRecord",
    "ckpool_method",
]

log = logging.getLogger("bridge.testing.pool")

STANDARD_MESSAGES: dict[int, str] = {
    OTHER: "Other/Unknown",
    JOB_NOT_FOUND: "Job not found",
    DUPLICATE: "Duplicate share",
    LOW_DIFFICULTY: "Low difficulty share",
    UNAUTHORIZED: "Unauthorized worker",
    NOT_SUBSCRIBED: "Not subscribed",
}
"""The standard Stratum V1 error codes and their messages."""

#: ckpool's parse_method order: (case-insensitive prefix, the method it is handled as).
CKPOOL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("mining.submit", "mining.submit"),
    ("mining.subscribe", "mining.subscribe"),
    ("mining.auth", "mining.authorize"),
    ("mining.suggest_difficulty", "mining.suggest_difficulty"),
    ("mining.suggest_target", "mining.suggest_target"),
    ("mining.get", "mining.get_transactions"),
)
#: Methods ckpool answers before subscribe too (mining.configure is handled by its connector).
_BEFORE_SUBSCRIBE = frozenset({"mining.subscribe", "mining.configure"})


class _Method(msgspec.Struct):
    method: Any = None


_decode_method = BoundedDecoder[_Method](_Method).decode
_decode_object = BoundedDecoder[dict[str, Any]](dict[str, Any]).decode
_encode_object = msgspec.json.Encoder().encode


def ckpool_method(method: str) -> str | None:
    """The method ckpool would handle ``method`` as; None when it would not handle it."""
    folded = method.lower()
    for prefix, canonical in CKPOOL_PREFIXES:
        if folded.startswith(prefix):
            return canonical
    if method in ("mining.configure", "mining.extranonce.subscribe", "mining.multi_version"):
        return method
    return None


EXTRANONCE1_SIZE = 4
MAX_STALE_JOB_IDS = 4096
MAX_REMEMBERED_SESSIONS = 65536
_VARDIFF_MAX_STEP = 4.0
_VARDIFF_DEADBAND = 1.25
_BLOCK_SUBSIDY = 312_500_000  # 3.125 BTC, the subsidy since the 2024 halving


# --------------------------------------------------------------------------- configuration


def _u32_hex(value: str, name: str) -> int:
    if len(value) != 8:
        raise ConfigError(f"{name} must be 8 hex digits, got {value!r}")
    try:
        return int(value, 16)
    except ValueError:
        raise ConfigError(f"{name} must be 8 hex digits, got {value!r}") from None


class PoolConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How the reference pool behaves; every field has a working default.

    Difficulties are floats and may be fractional (``0.001``).
    """

    difficulty: float = 1.0
    """Starting difficulty of every connection (the fixed difficulty without vardiff)."""
    minimum_difficulty: float | None = None
    """Floor for suggestions and vardiff; None means ``difficulty``."""
    maximum_difficulty: float | None = None
    """Ceiling for suggestions and vardiff; None means ``difficulty`` without vardiff
    (a fixed pool stays fixed: suggestions are acknowledged and change nothing) and
    no ceiling with vardiff."""
    vardiff: bool = False
    """Per-connection variable difficulty."""
    vardiff_share_interval: float = 10.0
    """Seconds between shares that vardiff aims at."""
    vardiff_retarget_shares: int = 16
    """Retarget after this many accepted shares ..."""
    vardiff_retarget_time: float = 60.0
    """... or after this many seconds, whichever comes first."""
    extranonce2_size: int = 8
    """extranonce2 size given to miners: 4..8 (ckpool's default is 8)."""
    version: str = "20000000"
    """Job version (hex)."""
    version_mask: str = "1fffe000"
    """The pool's version-rolling mask (BIP320 general-purpose bits)."""
    nbits: str = "17034219"
    """Compact network target of every job; ``207fffff`` makes every share a block."""
    start_height: int = 850_000
    """Height of the first block."""
    max_merkle_branches: int = 12
    """Jobs get between 0 and this many random merkle branches."""
    notify_interval: float = 30.0
    """Seconds between ``clean_jobs=false`` notifies (the keepalive)."""
    block_interval: float | None = None
    """Seconds between new blocks; None means only on demand (or when a share solves one)."""
    new_block_on_solve: bool = True
    """Move to a new block after accepting a block-solving share, as a real pool does."""
    ntime_window: int = 7000
    """Seconds a submitted ntime may be ahead of the job's (ckpool: 7000)."""
    max_line: int = 1024
    """Longest line accepted from a miner (ckpool disconnects above 1024 bytes)."""
    send_show_message: bool = False
    """Send ``client.show_message`` on authorize and on blocks (ckpool does for cgminer-likes)."""
    session_resume_seconds: float = 600.0
    """How long a closed session's extranonce1 can be resumed (ckpool: 600 s)."""
    max_jobs_per_block: int = 4096
    """Jobs of the current block kept for validation; the oldest become stale."""
    max_shares_per_job: int = 1_000_000
    """Size limit of each job's duplicate set; further shares on the job get 20."""
    max_records: int = 1_000_000
    """Accepted and rejected share records kept (the oldest are dropped)."""
    write_timeout: float = 60.0
    """A miner that does not take our data for this long is disconnected."""
    coinbase_tag: str = "/StratumRM reference pool/"
    """Text pushed into the coinbase scriptSig after the height."""
    seed: int | None = None
    """Seed for the random parts of jobs (prevhash, branches, payout); None is random."""
    ckpool_methods: bool = True
    """Be as unkind as ckpool (stratifier.c ``parse_method``, the captures): methods match
    case-insensitively by prefix (``MINING.SUBMIT`` is a submit, ``mining.auth`` an
    authorize); a second ``mining.subscribe`` and any ``mining.authorize`` after the
    first on a connection (answered or not, accepted or not) get no answer at all; a
    submit before authorize and an unknown method get no answer; a request before
    subscribe closes the connection. Off: every request is answered (a pool that
    allows several workers per connection)."""

    def __post_init__(self) -> None:
        for name in ("difficulty", "minimum_difficulty", "maximum_difficulty"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        ceiling = self.effective_maximum_difficulty
        if ceiling is not None and ceiling < self.effective_minimum_difficulty:
            raise ConfigError("maximum_difficulty is below the minimum difficulty")
        if not 4 <= self.extranonce2_size <= 8:
            raise ConfigError(f"extranonce2_size must be 4..8 (miners refuse other sizes), got {self.extranonce2_size}")
        _u32_hex(self.version, "version")
        if _u32_hex(self.version_mask, "version_mask") == 0:
            raise ConfigError("version_mask must not be 00000000")
        try:
            nbits_to_target(_u32_hex(self.nbits, "nbits"))
        except ValueError as exc:
            raise ConfigError(f"nbits: {exc}") from None
        if self.vardiff_share_interval <= 0 or self.vardiff_retarget_time <= 0:
            raise ConfigError("vardiff intervals must be positive")
        if self.vardiff_retarget_shares < 1:
            raise ConfigError("vardiff_retarget_shares must be at least 1")
        if self.notify_interval <= 0:
            raise ConfigError(f"notify_interval must be positive, got {self.notify_interval}")
        if self.block_interval is not None and self.block_interval <= 0:
            raise ConfigError(f"block_interval must be positive, got {self.block_interval}")
        if not 0 <= self.max_merkle_branches <= 24:
            raise ConfigError("max_merkle_branches must be 0..24")
        if not 0 < self.start_height < 2**31:
            raise ConfigError("start_height must be a positive 31-bit number")
        if self.ntime_window < 0:
            raise ConfigError("ntime_window must not be negative")
        if self.max_line < 256:
            raise ConfigError("max_line must be at least 256 bytes")
        if len(self.coinbase_tag.encode()) > 64:
            raise ConfigError("coinbase_tag must be at most 64 bytes")
        for name in ("max_jobs_per_block", "max_shares_per_job", "max_records"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")

    @property
    def effective_minimum_difficulty(self) -> float:
        """The floor of suggested and vardiff difficulties."""
        return self.difficulty if self.minimum_difficulty is None else self.minimum_difficulty

    @property
    def effective_maximum_difficulty(self) -> float | None:
        """The ceiling of suggested and vardiff difficulties (None: none)."""
        if self.maximum_difficulty is not None:
            return self.maximum_difficulty
        return None if self.vardiff else self.difficulty


# --------------------------------------------------------------------------- records


class ShareRecord(msgspec.Struct, frozen=True):
    """One accepted share, as the pool judged it.

    Hex fields are lower case; ``version_bits`` is the 6th submit param (None
    when the miner sent none); ``hash_hex`` is the block hash in explorer form;
    ``difficulty`` is the difficulty the share was judged at, ``share_difficulty``
    what its hash achieved.
    """

    worker: str
    job_id: str
    extranonce1: str
    extranonce2: str
    ntime: str
    nonce: str
    version_bits: str | None
    hash_hex: str
    difficulty: float
    share_difficulty: float
    block: bool


class RejectRecord(msgspec.Struct, frozen=True):
    """One rejected submit: who sent it, for which job, and the error sent back."""

    worker: str
    job_id: str
    code: int
    message: str


class PoolStatistics(msgspec.Struct, frozen=True):
    """A snapshot of the pool's counters."""

    connections: int
    connections_total: int
    subscribed: int
    accepted: int
    rejected: dict[int, int]
    duplicates: int
    blocks: int
    jobs_created: int
    jobs_sent: int
    height: int
    accepted_by_worker: dict[str, int]
    rejected_by_worker: dict[str, int]
    contained_errors: int = 0
    """Internal errors while handling one connection: it was closed, the pool went on."""
    unanswered: dict[str, int] = {}
    """Requests left without an answer, as ckpool leaves them, by kind ("authorise twice" ...)."""


# --------------------------------------------------------------------------- blocks and jobs


def _script_number(value: int) -> bytes:
    """A positive number in Bitcoin script's minimal little-endian form (BIP34)."""
    out = bytearray()
    while value:
        out.append(value & 0xFF)
        value >>= 8
    if out and out[-1] & 0x80:
        out.append(0)
    return bytes(out)


def _push(data: bytes) -> bytes:
    """A direct script push of fewer than 76 bytes."""
    return bytes((len(data),)) + data


@dataclass(frozen=True, slots=True)
class _Block:
    """The block the pool is working on."""

    serial: int
    height: int
    prevhash: str  # mining.notify form
    coinb1: bytes
    coinb2: bytes


@dataclass(eq=False, slots=True)
class _PoolJob:
    """A job as the pool keeps it: the share-math view, the wire fields, the duplicate set."""

    job: Job
    notify_fields: tuple[str, str, str, str, list[str], str, str, str]
    block_serial: int
    seen: set[bytes] = field(default_factory=set)


class _Rejected(Exception):
    """Internal: a submit failed a check; carries the code and message to send."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- connection


class ConnectionState:
    """One miner connection as the pool sees it: its session and everything the pool knows.

    No I/O here: answers go into :attr:`session`; :meth:`PoolCore.data_to_send` takes them.
    """

    def __init__(self, config: PoolConfig, peer: str, difficulty: float, now: float) -> None:
        self.config = config
        self.peer = peer
        self.session = ServerSession(max_line=config.max_line)
        self.extranonce1: bytes | None = None
        self.subscribed = False
        self.subscribe_seen = False  # ckpool: one subscribe per connection
        self.requested_session: str | None = None  # the session id the miner's subscribe asked to resume
        self.authorize_seen = False  # ckpool: one authorize per connection, whatever its fate
        self.silenced = 0  # requests left unanswered as ckpool leaves them
        self.lines = LineBuffer(config.max_line) if config.ckpool_methods else None
        self.closing = False
        self.version_mask: int | None = None  # negotiated by mining.configure
        self.minimum_difficulty = config.effective_minimum_difficulty
        self.difficulty = difficulty
        self.announced_difficulty: float | None = None
        # job id -> (difficulty, target) in force when the job was sent here
        self.job_difficulty: BoundedMap[str, tuple[float, int]] = BoundedMap(config.max_jobs_per_block)
        self.last_block_serial: int | None = None
        self.vardiff_shares = 0
        self.vardiff_since = now

    @property
    def session_id(self) -> str | None:
        """The subscription id handed out: extranonce1 byte-swapped, as ckpool does."""
        return None if self.extranonce1 is None else self.extranonce1[::-1].hex()

    @property
    def workers(self) -> tuple[str, ...]:
        return self.session.authorized_workers

    def clamp(self, difficulty: float) -> float:
        """Bound a requested difficulty by the pool's ceiling and this connection's floor.

        The floor wins: it is the pool's minimum or, if higher, the miner's own
        ``minimum-difficulty`` from ``mining.configure``.
        """
        ceiling = self.config.effective_maximum_difficulty
        if ceiling is not None:
            difficulty = min(difficulty, ceiling)
        return max(difficulty, self.minimum_difficulty)

    def judged_difficulty(self, job_id: str) -> tuple[float, int]:
        """The difficulty (and its target) a share on ``job_id`` is judged at."""
        known = self.job_difficulty.get(job_id)
        if known is not None:
            return known
        difficulty = self.announced_difficulty or self.difficulty
        return difficulty, difficulty_to_target(difficulty)

    def __repr__(self) -> str:
        en1 = self.extranonce1.hex() if self.extranonce1 else "-"
        return f"<ConnectionState {self.peer} en1={en1} diff={self.difficulty}>"


# --------------------------------------------------------------------------- the pool


class PoolCore:
    """The reference pool without I/O: jobs, share validation, verdicts (see the module docs).

    Two clocks come in, both explicit: ``now`` is the wall clock in seconds since the
    epoch (job ntime, session expiry, vardiff), ``time`` the driver's monotonic clock
    (only the notify and block intervals run on it). The core never reads a clock.

    The driver calls :meth:`connection_made` for each connection, feeds it
    :meth:`receive_data`, calls :meth:`end_of_input` when the miner stops sending and
    :meth:`connection_lost` when the connection is gone. It sleeps until
    :meth:`get_timer` and then calls :meth:`handle_timer`. After every call it takes
    :meth:`ready` (the connections with something to send) and writes their
    :meth:`data_to_send`; a connection whose :attr:`ConnectionState.closing` is set is
    closed once its data is written. While :attr:`stalled` the driver reads, answers
    and sends nothing. :attr:`accepted`, :attr:`rejected` and :attr:`blocks` are deques
    bounded by ``max_records``.
    """

    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config = config or PoolConfig()
        self.difficulty = config.difficulty
        self._rng = random.Random(config.seed)
        self._version = int(config.version, 16)
        self._mask = int(config.version_mask, 16)
        self._nbits = int(config.nbits, 16)
        self._network_target = nbits_to_target(self._nbits)
        self._payout_script = b"\x00\x14" + self._rng.randbytes(20)  # P2WPKH
        self._block = self._make_block(serial=0, height=config.start_height)
        self._jobs: BoundedMap[str, _PoolJob] = BoundedMap(config.max_jobs_per_block)
        self._stale_job_ids: BoundedMap[str, None] = BoundedMap(MAX_STALE_JOB_IDS)
        self._current_job: _PoolJob | None = None
        self._jobs_created = 0
        self._jobs_sent = 0
        self._connections: dict[ConnectionState, None] = {}
        self._connections_total = 0
        self._ready: dict[ConnectionState, None] = {}
        self._unanswered: Counter[str] = Counter()
        self._extranonce1_in_use: set[bytes] = set()
        # extranonce1 -> when its connection closed, oldest first
        self._resumable: BoundedMap[bytes, float] = BoundedMap(MAX_REMEMBERED_SESSIONS)
        self._next_extranonce1 = self._rng.getrandbits(32)
        self._forced_rejects: deque[int] = deque()
        self._reject_all_code: int | None = None
        self.stalled = False
        self._jobs_stopped = False
        self._next_job_due: float | None = None
        self._next_block_due: float | None = None
        self.accepted: deque[ShareRecord] = deque(maxlen=config.max_records)
        self.rejected: deque[RejectRecord] = deque(maxlen=config.max_records)
        self.blocks: deque[ShareRecord] = deque(maxlen=config.max_records)
        self.accepted_total = 0
        self._rejected_by_code: Counter[int] = Counter()
        self._accepted_by_worker: Counter[str] = Counter()
        self._rejected_by_worker: Counter[str] = Counter()
        self._duplicates = 0
        self._blocks_found = 0

    # ------------------------------------------------------------- public state

    @property
    def connections(self) -> tuple[ConnectionState, ...]:
        """The open miner connections, oldest first."""
        return tuple(self._connections)

    @property
    def height(self) -> int:
        """Height of the block being worked on."""
        return self._block.height

    @property
    def prevhash(self) -> str:
        """The previous-block hash (``mining.notify`` form) of the block being worked on."""
        return self._block.prevhash

    @property
    def accepted_by_worker(self) -> dict[str, list[ShareRecord]]:
        """The kept accepted shares, grouped by worker name."""
        grouped: dict[str, list[ShareRecord]] = {}
        for record in self.accepted:
            grouped.setdefault(record.worker, []).append(record)
        return grouped

    def statistics(self, *, contained_errors: int = 0) -> PoolStatistics:
        """A snapshot of the counters; ``contained_errors`` comes from the driver."""
        return PoolStatistics(
            connections=len(self._connections),
            connections_total=self._connections_total,
            subscribed=sum(1 for c in self._connections if c.subscribed),
            accepted=self.accepted_total,
            rejected=dict(self._rejected_by_code),
            duplicates=self._duplicates,
            blocks=self._blocks_found,
            jobs_created=self._jobs_created,
            jobs_sent=self._jobs_sent,
            height=self._block.height,
            accepted_by_worker=dict(self._accepted_by_worker),
            rejected_by_worker=dict(self._rejected_by_worker),
            contained_errors=contained_errors,
            unanswered=dict(self._unanswered),
        )

    # ------------------------------------------------------------- connections and output

    def connection_made(self, peer: str, now: float) -> ConnectionState:
        """A miner connected from ``peer`` (``host:port``, for the log)."""
        connection = ConnectionState(self.config, peer, self.difficulty, now)
        self._connections[connection] = None
        self._connections_total += 1
        return connection

    def receive_data(self, connection: ConnectionState, data: bytes, now: float) -> None:
        """Bytes from the miner: answer what they complete."""
        if connection.lines is not None:
            data = self._ckpool_front(connection, data)
        for event in connection.session.receive_data(data):
            self._handle(connection, event, now)
        if connection.session.closed:
            connection.closing = True
        self._mark_ready(connection)

    def end_of_input(self, connection: ConnectionState) -> None:
        """The miner sent its last byte (or reading failed): close once the output is out."""
        connection.closing = True
        self._mark_ready(connection)

    def connection_lost(self, connection: ConnectionState, now: float) -> None:
        """The connection is gone; its extranonce1 can be resumed for a while."""
        self._connections.pop(connection, None)
        self._ready.pop(connection, None)
        extranonce1 = connection.extranonce1
        if extranonce1 is not None:
            self._extranonce1_in_use.discard(extranonce1)
            self._resumable.put(extranonce1, now)

    def ready(self) -> list[ConnectionState]:
        """The connections given something to send (or to close) since the last call."""
        ready = list(self._ready)
        self._ready.clear()
        return ready

    def data_to_send(self, connection: ConnectionState) -> bytes:
        """The bytes queued for ``connection`` since the last call."""
        return connection.session.data_to_send()

    def _mark_ready(self, connection: ConnectionState) -> None:
        if connection in self._connections:
            self._ready[connection] = None

    # ------------------------------------------------------------- timers

    def start_timers(self, time: float) -> None:
        """Start the notify (and block) intervals, unless they already run."""
        if self._next_job_due is None:
            self._next_job_due = time + self.config.notify_interval
        if self.config.block_interval is not None and self._next_block_due is None:
            self._next_block_due = time + self.config.block_interval

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due (driver's clock); None before :meth:`start_timers`."""
        deadlines = [due for due in (self._next_job_due, self._next_block_due) if due is not None]
        return min(deadlines, default=None)

    def handle_timer(self, time: float, now: float) -> None:
        """Send the keepalive job and move the chain on when their intervals are up."""
        if self._next_job_due is not None and time >= self._next_job_due:
            self._next_job_due = time + self.config.notify_interval
            if self._sending_jobs:
                if self.config.vardiff:
                    for connection in self._connections:
                        if now - connection.vardiff_since >= self.config.vardiff_retarget_time:
                            self._retarget(connection, now)
                self._broadcast(self._create_job(now))
        if self._next_block_due is not None and self.config.block_interval is not None and time >= self._next_block_due:
            self._next_block_due = time + self.config.block_interval
            self.new_block(now)

    # ------------------------------------------------------------- controls

    def reject_next(self, count: int, code: int = LOW_DIFFICULTY) -> None:
        """Answer the next ``count`` submits with ``code`` without checking them."""
        if count < 0:
            raise ValueError("count must not be negative")
        _check_code(code)
        self._forced_rejects.extend([code] * count)

    def reject_all(self, code: int | None) -> None:
        """Answer every submit with ``code`` (None returns to real validation)."""
        if code is not None:
            _check_code(code)
        self._reject_all_code = code

    def stall(self, stalled: bool, now: float) -> None:
        """Blackhole (or restore) the pool; when the stall ends every connection gets a fresh job.

        The driver stops reading and sending while :attr:`stalled`; the core sends no jobs.
        """
        if stalled == self.stalled:
            return
        self.stalled = stalled
        if stalled:
            log.info("stalled: not reading, answering or sending")
        else:
            log.info("stall over")
            self._resume_jobs(now)

    def stop_jobs(self, stopped: bool, now: float) -> None:
        """Stop (or restart) every ``mining.notify``: timer, new blocks, handshakes, vardiff.

        Restarting sends a fresh job to every subscribed connection at once
        (``clean_jobs=true`` where the block changed since its last job).
        """
        if stopped == self._jobs_stopped:
            return
        self._jobs_stopped = stopped
        log.info("jobs %s", "stopped" if stopped else "restarted")
        if not stopped:
            self._resume_jobs(now)

    def new_block(self, now: float, prevhash: str | None = None) -> None:
        """Move to the next block and send its first job (clean) to every connection.

        ``prevhash`` (``mining.notify`` form) puts pools on one chain: give two
        pools the same value and they announce the same block, as real pools on
        one network do; a pool that is not told lags.
        """
        old_block = self._block
        self._block = self._make_block(serial=old_block.serial + 1, height=old_block.height + 1)
        if prevhash is not None:
            prevhash_to_header(prevhash)  # checks the form
            self._block = dataclasses.replace(self._block, prevhash=prevhash)
        for job_id in self._jobs:
            self._remember_stale(job_id)
        self._jobs.clear()
        self._current_job = None
        log.info("new block: height %d, prevhash %s", self._block.height, self._block.prevhash)
        if self._sending_jobs:
            self._broadcast(self._create_job(now))

    def set_difficulty(self, difficulty: float, now: float) -> None:
        """Set the difficulty of every connection, and of those still to come.

        Not clamped. Each subscribed connection gets ``mining.set_difficulty``
        and a new job at once (when jobs are flowing; otherwise with its next job).
        """
        if not (math.isfinite(difficulty) and difficulty > 0):
            raise ValueError(f"difficulty must be a positive number, got {difficulty!r}")
        self.difficulty = difficulty
        for connection in self._connections:
            connection.difficulty = difficulty
        if self._sending_jobs:
            self._broadcast(self._create_job(now))

    def request_reconnect(self, params: list[Any] | None = None) -> None:
        """Send ``client.reconnect`` (``[]`` by default: "this server") to every connection."""
        for connection in self._connections:
            if connection.subscribed:
                connection.session.reconnect(params)
                self._mark_ready(connection)

    # ------------------------------------------------------------- events

    def _ckpool_front(self, connection: ConnectionState, data: bytes) -> bytes:
        """ckpool's method matching and silences (PoolConfig.ckpool_methods); the lines to hand on."""
        assert connection.lines is not None
        try:
            lines = connection.lines.feed(data)
        except LineTooLong as exc:
            log.info("%s: %s, disconnecting", connection.peer, exc)
            connection.closing = True
            return b""
        kept: list[bytes] = []
        for line in lines:
            try:
                method = _decode_method(line).method
            except msgspec.DecodeError:
                kept.append(line)  # invalid JSON or not an object: the session closes
                continue
            if not isinstance(method, str):
                kept.append(line)  # responses and envelope errors: the session handles them
                continue
            canonical = ckpool_method(method)
            if not connection.subscribe_seen and canonical not in _BEFORE_SUBSCRIBE:
                if canonical in ("mining.suggest_difficulty", "mining.suggest_target"):
                    self._unanswer(connection, "suggest before subscribe")  # bfgminer does; not answered
                    continue
                log.info("%s: dropping unsubscribed client (%r before mining.subscribe)", connection.peer, method[:64])
                connection.closing = True
                break
            if canonical is None:
                log.info("%s: unhandled method %r, not answered", connection.peer, method[:64])
                self._unanswer(connection, "unknown method")
                continue
            if canonical == "mining.subscribe":
                if connection.subscribe_seen:
                    log.info("%s: trying to subscribe twice, not answered", connection.peer)
                    self._unanswer(connection, "subscribe twice")
                    continue
                connection.subscribe_seen = True
            if canonical == "mining.authorize":
                if connection.authorize_seen:
                    log.info("%s: trying to authorise twice, not answered", connection.peer)
                    self._unanswer(connection, "authorise twice")
                    continue
                connection.authorize_seen = True
            elif canonical == "mining.submit" and not connection.session.authorized_workers:
                log.info("%s: mining.submit before authorising, not answered", connection.peer)
                self._unanswer(connection, "submit before authorize")
                continue
            if canonical != method:
                try:
                    message = _decode_object(line)
                except msgspec.DecodeError:
                    kept.append(line)
                    continue
                message["method"] = canonical
                kept.append(_encode_object(message))
                continue
            kept.append(line)
        return b"".join(line + b"\n" for line in kept)

    def _unanswer(self, connection: ConnectionState, kind: str) -> None:
        connection.silenced += 1
        self._unanswered[kind] += 1

    def _handle(self, connection: ConnectionState, event: ServerEvent, now: float) -> None:
        session = connection.session
        if isinstance(event, Submit):
            self.submit(connection, event, now)
        elif isinstance(event, Subscribe):
            self._subscribe(connection, event, now)
        elif isinstance(event, Authorize):
            self._authorize(connection, event)
        elif isinstance(event, Configure):
            self._configure(connection, event, now)
        elif isinstance(event, SuggestDifficulty):
            self._suggest(connection, event.id, event.difficulty, now)
        elif isinstance(event, SuggestTarget):
            try:
                target = int(event.target, 16)
            except ValueError:
                target = 0
            if target <= 0:
                session.respond_error(event.id, OTHER, "Invalid target")
                return
            self._suggest(connection, event.id, target_to_difficulty(target), now)
        elif isinstance(event, (ExtranonceSubscribe, MultiVersion)):
            session.respond(event.id, True)
        elif isinstance(event, GetTransactions):
            session.respond(event.id, [])
        elif isinstance(event, MinerResponse):
            log.debug("%s: response from the miner: %s", connection.peer, event)
        elif isinstance(event, ProtocolViolation):
            log.log(
                logging.INFO if event.fatal else logging.DEBUG,
                "%s: %s",
                connection.peer,
                event.reason,
            )

    def _subscribe(self, connection: ConnectionState, request: Subscribe, now: float) -> None:
        if connection.extranonce1 is None:
            session_id = request.params.session_id
            connection.requested_session = None if session_id is None else str(session_id)
            connection.extranonce1 = self._allocate_extranonce1(None if session_id is None else str(session_id), now)
            self._extranonce1_in_use.add(connection.extranonce1)
        sid = connection.session_id
        assert sid is not None and connection.extranonce1 is not None
        connection.session.subscribe_result(
            request.id,
            connection.extranonce1.hex(),
            self.config.extranonce2_size,
            [["mining.set_difficulty", sid], ["mining.notify", sid]],
        )
        log.info(
            "%s: subscribed (%s), extranonce1 %s",
            connection.peer,
            request.params.user_agent or "no user agent",
            connection.extranonce1.hex(),
        )
        if not connection.subscribed:
            connection.subscribed = True
            connection.vardiff_since = now
            if self._sending_jobs:
                self._send_job(connection, self._job_for_new_connection(now))

    def _allocate_extranonce1(self, session_id: str | None, now: float) -> bytes:
        horizon = now - self.config.session_resume_seconds
        while self._resumable and self._resumable.oldest()[1] < horizon:
            self._resumable.pop_oldest()
        if session_id:
            try:
                raw = bytes.fromhex(session_id)
            except ValueError:
                raw = b""
            # our session id is extranonce1 byte-swapped; the wiki calls extranonce1 the session
            for candidate in (raw[::-1], raw):
                if (
                    len(candidate) == EXTRANONCE1_SIZE
                    and candidate in self._resumable
                    and candidate not in self._extranonce1_in_use
                ):
                    del self._resumable[candidate]
                    log.debug("session %s resumed", session_id)
                    return candidate
        while True:
            self._next_extranonce1 = (self._next_extranonce1 + 1) & 0xFFFFFFFF
            candidate = self._next_extranonce1.to_bytes(EXTRANONCE1_SIZE, "big")
            if candidate not in self._extranonce1_in_use and candidate not in self._resumable:
                return candidate

    def _authorize(self, connection: ConnectionState, request: Authorize) -> None:
        worker = request.params.user
        if not worker or worker[0] in "._" or "/" in worker:
            connection.session.respond_error(request.id, UNAUTHORIZED, "Invalid worker name", result=FALSE)
            log.info("%s: refused worker name %r", connection.peer, worker)
            return
        connection.session.respond(request.id, True)
        # a null id gets no answer, so record the worker ourselves
        connection.session.record_worker(worker)
        log.info("%s: authorized %s", connection.peer, worker)
        if self.config.send_show_message:
            connection.session.show_message(f"Authorised, welcome to the reference pool {worker}!")

    def _configure(self, connection: ConnectionState, request: Configure, now: float) -> None:
        answer: dict[str, Any] = {}
        params = request.extension_params
        for extension in request.extensions:
            if extension == "version-rolling":
                requested = params.get("version-rolling.mask", "ffffffff")
                try:
                    miner_mask = int(requested, 16) if isinstance(requested, str) else 0xFFFFFFFF
                except ValueError:
                    miner_mask = 0xFFFFFFFF
                mask = self._mask & miner_mask & 0xFFFFFFFF
                if mask:
                    connection.version_mask = mask
                    answer["version-rolling"] = True
                    answer["version-rolling.mask"] = f"{mask:08x}"
                else:
                    answer["version-rolling"] = False
            elif extension == "minimum-difficulty":
                value = params.get("minimum-difficulty.value")
                if _is_positive_number(value):
                    connection.minimum_difficulty = max(float(value), connection.minimum_difficulty)
                    if connection.difficulty < connection.minimum_difficulty:
                        connection.difficulty = connection.clamp(connection.difficulty)
                        if connection.subscribed and self._sending_jobs:
                            self._send_job(connection, self._create_job(now))
                    answer["minimum-difficulty"] = True
                else:
                    answer["minimum-difficulty"] = False
            elif extension in ("subscribe-extranonce", "info"):
                answer[extension] = True
            else:
                answer[extension] = False
        connection.session.respond(request.id, answer)

    def _suggest(self, connection: ConnectionState, request_id: Any, difficulty: float, now: float) -> None:
        if not _is_positive_number(difficulty):
            connection.session.respond_error(request_id, OTHER, "Invalid difficulty")
            return
        connection.session.respond(request_id, True)
        new = connection.clamp(float(difficulty))
        if new == connection.difficulty:
            return
        connection.difficulty = new
        log.debug("%s: difficulty %s on request", connection.peer, new)
        if connection.subscribed and self._sending_jobs:
            self._send_job(connection, self._create_job(now))

    # ------------------------------------------------------------- shares

    def submit(self, connection: ConnectionState, submit: Submit, now: float) -> None:
        """Judge a share and answer it (the driver calls it only through :meth:`receive_data`;
        a benchmark's pool may override it to note arrivals or hold verdicts back)."""
        params = submit.params
        try:
            record = self._judge(connection, submit)
        except _Rejected as reject:
            self._rejected_by_code[reject.code] += 1
            self._rejected_by_worker[params.worker] += 1
            self.rejected.append(RejectRecord(params.worker, params.job_id, reject.code, reject.message))
            connection.session.respond_error(submit.id, reject.code, reject.message, result=FALSE)
            log.debug(
                "%s: rejected %s share on job %s: %d %s",
                connection.peer,
                params.worker,
                params.job_id,
                reject.code,
                reject.message,
            )
            return
        connection.session.respond(submit.id, True)
        self.accepted.append(record)
        self.accepted_total += 1
        self._accepted_by_worker[record.worker] += 1
        log.debug(
            "%s: accepted %s share on job %s, difficulty %.6g of %s",
            connection.peer,
            record.worker,
            record.job_id,
            record.share_difficulty,
            record.difficulty,
        )
        if record.block:
            self._blocks_found += 1
            self.blocks.append(record)
            log.info("BLOCK %d solved by %s: %s", self._block.height, record.worker, record.hash_hex)
            if self.config.send_show_message:
                connection.session.show_message(f"Block {self._block.height} solved by {record.worker}!")
        if self.config.vardiff:
            connection.vardiff_shares += 1
            if (
                connection.vardiff_shares >= self.config.vardiff_retarget_shares
                and self._retarget(connection, now)
                and self._sending_jobs
            ):
                self._send_job(connection, self._create_job(now))
        if record.block and self.config.new_block_on_solve:
            self.new_block(now)

    def _judge(self, connection: ConnectionState, submit: Submit) -> ShareRecord:
        """Run the checks in order; return the record or raise :class:`_Rejected`."""
        params = submit.params
        if params.worker not in connection.workers:
            raise _Rejected(UNAUTHORIZED, STANDARD_MESSAGES[UNAUTHORIZED])
        forced = self._forced_code()
        if forced is not None:
            raise _Rejected(forced, STANDARD_MESSAGES[forced])
        pool_job = self._jobs.get(params.job_id)
        if pool_job is None:
            if params.job_id in self._stale_job_ids:
                raise _Rejected(JOB_NOT_FOUND, "Stale")
            raise _Rejected(JOB_NOT_FOUND, STANDARD_MESSAGES[JOB_NOT_FOUND])
        job = pool_job.job
        extranonce1 = connection.extranonce1
        assert extranonce1 is not None  # the session refuses submits before subscribe
        extranonce2 = bytes.fromhex(params.extranonce2)
        if len(extranonce2) != self.config.extranonce2_size:
            raise _Rejected(OTHER, "Incorrect size of extranonce2")
        # the session normalised ntime and nonce to 8 hex digits
        ntime = int(params.ntime, 16)  # type: ignore[arg-type]
        nonce = int(params.nonce, 16)  # type: ignore[arg-type]
        if not job.ntime_int <= ntime <= job.ntime_int + self.config.ntime_window:
            raise _Rejected(OTHER, "Ntime out of range")
        version = job.version_int
        if params.version_bits is not None:
            bits = int(params.version_bits, 16)
            mask = self._mask if connection.version_mask is None else connection.version_mask
            if version_bits_allowed(bits, mask):
                version = roll_version(job.version_int, bits, mask)
            elif bits & ~mask == job.version_int & ~mask:
                version = bits  # a full rolled version (bmminer's mining.multi_version)
            else:
                raise _Rejected(OTHER, "Invalid version mask")
        key = extranonce1 + extranonce2 + struct.pack(">III", ntime, nonce, version)
        if key in pool_job.seen:
            self._duplicates += 1
            raise _Rejected(DUPLICATE, STANDARD_MESSAGES[DUPLICATE])
        if len(pool_job.seen) >= self.config.max_shares_per_job:
            raise _Rejected(OTHER, "Too many shares on this job, wait for the next one")
        difficulty, target = connection.judged_difficulty(job.job_id)
        header_hash = sha256d(job.header(extranonce1, extranonce2, ntime, nonce, version))
        hash_int = int.from_bytes(header_hash, "little")
        if hash_int > target:
            raise _Rejected(LOW_DIFFICULTY, STANDARD_MESSAGES[LOW_DIFFICULTY])
        pool_job.seen.add(key)
        return ShareRecord(
            worker=params.worker,
            job_id=job.job_id,
            extranonce1=extranonce1.hex(),
            extranonce2=extranonce2.hex(),
            ntime=f"{ntime:08x}",
            nonce=f"{nonce:08x}",
            version_bits=None if params.version_bits is None else params.version_bits.lower(),
            hash_hex=display_hex(header_hash),
            difficulty=difficulty,
            share_difficulty=hash_difficulty(hash_int),
            block=hash_int <= self._network_target,
        )

    def _forced_code(self) -> int | None:
        if self._forced_rejects:
            return self._forced_rejects.popleft()
        return self._reject_all_code

    def _retarget(self, connection: ConnectionState, now: float) -> bool:
        """Vardiff: move the difficulty towards one share per interval; True if it changed."""
        elapsed = max(now - connection.vardiff_since, 1e-3)
        shares = connection.vardiff_shares
        connection.vardiff_shares = 0
        connection.vardiff_since = now
        factor = shares * self.config.vardiff_share_interval / elapsed
        factor = min(max(factor, 1 / _VARDIFF_MAX_STEP), _VARDIFF_MAX_STEP)
        if 1 / _VARDIFF_DEADBAND <= factor <= _VARDIFF_DEADBAND:
            return False
        new = connection.clamp(float(f"{connection.difficulty * factor:.3g}"))
        if new == connection.difficulty:
            return False
        log.debug("%s: vardiff %s -> %s", connection.peer, connection.difficulty, new)
        connection.difficulty = new
        return True

    # ------------------------------------------------------------- jobs

    @property
    def _sending_jobs(self) -> bool:
        return not (self.stalled or self._jobs_stopped)

    def _make_block(self, *, serial: int, height: int) -> _Block:
        rng = self._rng
        # a real block hash has leading zero bytes in display form: the header's last bytes
        prevhash = prevhash_from_header(rng.randbytes(24) + bytes(8))
        extranonce_size = EXTRANONCE1_SIZE + self.config.extranonce2_size
        prefix = _push(_script_number(height)) + _push(self.config.coinbase_tag.encode())
        coinb1 = b"".join(
            (
                struct.pack("<I", 1),  # transaction version
                b"\x01",  # one input
                bytes(32) + b"\xff\xff\xff\xff",  # the null outpoint
                bytes((len(prefix) + extranonce_size,)),  # scriptSig length, extranonce included
                prefix,
            )
        )
        value = _BLOCK_SUBSIDY + rng.randrange(50_000_000)  # plus some fees
        coinb2 = b"".join(
            (
                b"\xff\xff\xff\xff",  # sequence
                b"\x01",  # one output
                struct.pack("<q", value),
                _push(self._payout_script),
                bytes(4),  # lock time
            )
        )
        return _Block(serial, height, prevhash, coinb1, coinb2)

    def _create_job(self, now: float) -> _PoolJob:
        self._jobs_created += 1
        block = self._block
        rng = self._rng
        branches = tuple(rng.randbytes(32) for _ in range(rng.randint(0, self.config.max_merkle_branches)))
        job = Job(
            job_id=f"{self._jobs_created:x}",
            prevhash=block.prevhash,
            prevhash_header=prevhash_to_header(block.prevhash),
            coinb1=block.coinb1,
            coinb2=block.coinb2,
            merkle_branch=branches,
            version_int=self._version,
            nbits_int=self._nbits,
            ntime_int=int(now) & 0xFFFFFFFF,
        )
        pool_job = _PoolJob(job, job.notify_fields(), block.serial)
        for oldest, _dropped in self._jobs.put(job.job_id, pool_job):
            self._remember_stale(oldest)
        self._current_job = pool_job
        return pool_job

    def _job_for_new_connection(self, now: float) -> _PoolJob:
        return self._current_job if self._current_job is not None else self._create_job(now)

    def _remember_stale(self, job_id: str) -> None:
        self._stale_job_ids[job_id] = None

    def _send_job(self, connection: ConnectionState, pool_job: _PoolJob) -> None:
        """Send one job, announcing a changed difficulty right before it."""
        session = connection.session
        if connection.difficulty != connection.announced_difficulty:
            session.set_difficulty(connection.difficulty)
            connection.announced_difficulty = connection.difficulty
        clean = connection.last_block_serial != pool_job.block_serial
        if clean:
            connection.job_difficulty.clear()
        connection.last_block_serial = pool_job.block_serial
        difficulty = connection.difficulty
        connection.job_difficulty[pool_job.job.job_id] = (
            difficulty,
            difficulty_to_target(difficulty),
        )
        session.notify(NotifyParams(*pool_job.notify_fields, clean_jobs=clean))
        self._jobs_sent += 1
        self._mark_ready(connection)

    def _broadcast(self, pool_job: _PoolJob) -> None:
        for connection in self._connections:
            if connection.subscribed and not connection.closing:
                self._send_job(connection, pool_job)

    def _resume_jobs(self, now: float) -> None:
        if self._sending_jobs:
            self._broadcast(self._create_job(now))


def _check_code(code: int) -> None:
    if code not in STANDARD_MESSAGES:
        raise ValueError(f"reject code must be one of {sorted(STANDARD_MESSAGES)}, got {code!r}")


def _is_positive_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
