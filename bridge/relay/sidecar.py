"""The pool-side sidecar's core: one StratumRM control connection, sans-IO.

A :class:`SidecarSession` is everything the sidecar knows about one proxy: its
control connection (JSON lines over TLS, bridge/wire/PROTOCOL.md "Control
channel"), its key epochs on the shared UDP port, and its channels, each of
which owns a :class:`~bridge.sv1.client.ClientSession` facing the pool software.
The driver (:mod:`bridge.net.sidecar`) moves bytes and keeps time; everything
protocol-shaped happens here.

Theory of operation
===================

Inputs (every one takes ``now``, seconds on a monotonic clock):

- :meth:`SidecarSession.receive_data`: bytes of the control connection;
- :meth:`SidecarIntake.receive_datagram`: one UDP datagram with its source address, for
  whichever session its conn_id belongs to;
- :meth:`SidecarSession.pool_connected`, :meth:`~SidecarSession.pool_data`,
  :meth:`~SidecarSession.pool_closed`: what happened on a channel's pool connection;
- :meth:`SidecarSession.handle_timer` at :meth:`~SidecarSession.get_timer`
  (the contract of :mod:`bridge.relay.contract`);
- :meth:`SidecarSession.connection_lost` when the control connection broke.

Outputs, taken by the driver after every input:

- :meth:`SidecarSession.data_to_send`: control-channel bytes;
- :meth:`SidecarSession.datagrams_to_send`: ``(datagram, address)`` pairs (only
  PROBE_ACKs, only to the address the session's authenticated datagrams came from,
  within its anti-amplification budget);
- :meth:`SidecarSession.commands`: :class:`OpenPool`, :class:`WritePool` and
  :class:`ClosePool` for the channels' pool connections, in order;
- :meth:`SidecarSession.refusals`: :class:`AccountRefused` notes, one per account
  and channel, for the driver to log with the certificate's name;
- :attr:`SidecarSession.close_reason` once the control connection must close
  (``rm.error`` is already queued when the close is ours).

Session start (C3). The first line must be ``rm.hello``. A major version other
than 1 is answered with an error and the connection closes. The features in use
are the intersection of the proxy's and :data:`~bridge.wire.control.FEATURES`;
``udp-shares`` only when the driver has a UDP port. With UDP, ``rm.keys`` follows
the hello result: a fresh :class:`~bridge.wire.keys.KeyMaterial` (random conn_id
and secret from the injectable ``randbytes``), registered with the shared
:class:`~bridge.wire.receiver.DatagramReceiver`. :meth:`SidecarSession.rekey`
(also run every ``rekey_interval``) issues epoch + 1 and keeps the previous epoch
for the receiver's grace period; PROBE_ACKs stay sealed under the old epoch until
a datagram authenticated under the new one proves the proxy has it (§8).

Channels (C4). ``rm.open`` emits :class:`OpenPool`. The proxy is not trusted with
what reaches the pool: a channel request is relayed only when its method is one of
:data:`RELAYED_PARAMS`, spelled exactly, and its params decode into that method's
typed shape; the pool gets the params re-encoded from the typed value, never the
proxy's bytes. Anything else is answered with error 20 and reported once per method
and channel as :class:`RequestRefused` (pools match methods loosely: ckpool by
case-insensitive prefix, so ``MINING.SUBMIT`` or ``mining.auth`` would be a submit or
an authorize that skipped the account check). Relayed requests go through
the channel's ClientSession, which orders them the way pools want (configure and
subscribe at once, authorize after the subscribe result, the rest after the first
authorize result), with the proxy's id as context, and the pool's answer goes
back as a channel response with ``result``, ``error`` and ``reject-reason``
unchanged. Pool notifications become channel notifications in order; pool
requests (``client.get_version``, ``mining.ping``, unknown ones) become channel
requests with the pool's id, and the proxy's channel response goes back to the
pool. When a pool connection cannot be opened, closes or breaks the protocol,
``rm.close`` tells the proxy why. The worker names of each channel's
``mining.authorize`` requests are kept in the order sent (at most 256, the range
of ``worker_index``); when the driver passes the certificate's ``accounts``, an
authorize or submit for any other account is refused with error 24 and never
reaches the pool.

Jobs (C5). Every distinct notify (all nine params equal) gets a job handle, sent
once as ``rm.job``; the channels that receive it are collected for
``batch_window`` seconds into one ``rm.notify``. Per-channel order is kept by one
rule: before any other line for a channel listed in a pending ``rm.notify`` is
written, the pending ``rm.notify`` lines are written first. Each channel keeps
its last 256 ``job_id -> handle`` pairs; a handle lives while some channel's
table holds it (reference counts), so memory is bounded by channels x 256.

Shares (C6). A SHARE or SHARE_BATCH record is checked (channel open, handle in
the channel's table, worker index authorized, extranonce2 of the subscribed
size), rebuilt into ``mining.submit [worker, job_id, en2, ntime, nonce(,
version_bits)]`` and handed to the channel's ClientSession at once. A TLS
``mining.submit`` is relayed as the rig sent it. Both go through one duplicate
table per session, keyed by ``(channel, job handle, extranonce2, ntime, nonce,
version bits)`` (a TLS share whose job id has no handle uses the job id string
instead of the handle): a share seen before is answered from its cached verdict,
or waits for the pending one, and never reaches the pool twice. The table is an
LRU of ``share_cache_size`` entries. Verdicts of UDP shares are collected into
``rm.results`` (``1`` for the plain accept, else the pool's response without its
id) and written ``batch_window`` seconds after the first one, or at once when a
line is full (2048 entries) or the share was URGENT; verdicts of TLS shares are
channel responses. Records that fail the checks are answered with an explicit
error verdict, never silently dropped.

Pool status (C10): :meth:`SidecarSession.pool_status` is the driver's check of
the pool software; with ``pool-status`` negotiated, a change is sent as
``rm.pool`` (and a pool already down right after the hello result).

Liveness (C8): a ``rm.ping`` after ``heartbeat`` seconds without sending; a proxy
silent for ``dead_after`` seconds is dead. Errors (C1, C9): a line that is not
JSON, not an object, too long, an unknown ``rm.`` method, or out of place makes
the session queue ``rm.error`` with the reason and close; :attr:`protocol_error`
keeps the reason for the driver's log. Other sessions are not affected.

Rules
=====

- No I/O, no clock, no trio: ``now`` is passed in; randomness only through
  ``randbytes`` (``os.urandom`` by default).
- Bounded memory everywhere: control lines (256 KiB), pool lines (64 KiB),
  channels per session, jobs per channel, workers per channel, the duplicate
  table, waiters per share, verdicts per line, the control output backlog.
- Nothing received is ever trusted to index anything without a check; malformed
  input never raises out of this module.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Any, Final, NamedTuple, cast

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType, field

from bridge import __version__
from bridge.errors import LineTooLong
from bridge.relay.liveness import PeerSilence
from bridge.sv1.client import ClientSession
from bridge.sv1.events import ProtocolViolation, Reply, UnknownPoolRequest
from bridge.sv1.framing import BoundedDecoder, LineBuffer
from bridge.sv1.messages import (
    FALSE,
    NULL,
    AuthorizeParams,
    DifficultyParams,
    GetVersion,
    Notify,
    NumberParams,
    Ping,
    Reconnect,
    RequestId,
    Response,
    SetDifficulty,
    SetExtranonce,
    SetVersionMask,
    ShowMessage,
    SubmitParams,
    SubscribeParams,
    TextParams,
    error_value,
)
from bridge.sv1.rejects import (
    JOB_NOT_FOUND,
    OTHER,
    UNAUTHORIZED,
    read_verdict,
    reject_reason_name,
)
from bridge.sv1.validate import is_hex
from bridge.wire.control import (
    FEATURES,
    MAX_CHANNELS_PER_NOTIFY,
    MAX_CONTROL_LINE,
    MAX_RESULTS_PER_LINE,
    PROTOCOL_VERSION,
    Close,
    ControlDecodeError,
    ControlLine,
    ErrorNotice,
    GoAway,
    Hello,
    HelloResult,
    Job,
    Keys,
    NotifyChannels,
    PoolStatus,
    Results,
    RMResponse,
    decode_line,
    decode_params,
    encode,
    encode_channel_request,
    encode_channel_response,
    encode_rm,
    encode_rm_result,
)
from bridge.wire.control import Ping as PingParams
from bridge.wire.datagram import (
    ACK_MAX_RANGES,
    MAX_DATAGRAM_SIZE,
    OVERHEAD,
    VERDICT_MAX_ENTRIES,
    Ack,
    AckRange,
    DatagramType,
    DropReason,
    Probe,
    ProbeAck,
    Share,
    ShareBatch,
    pack_verdict_entry,
)
from bridge.wire.keys import KeyExhausted, KeyMaterial, KeySet, Role, Sealer
from bridge.wire.limits import Address
from bridge.wire.receiver import (
    DEFAULT_BURST,
    DEFAULT_GRACE,
    DEFAULT_RATE,
    DEFAULT_STRANGER_BURST,
    DEFAULT_STRANGER_RATE,
    Accepted,
    DatagramReceiver,
    ReceiverStatistics,
)

__all__ = [
    "AGENT",
    "DEFAULT_BATCH_WINDOW",
    "DEFAULT_SHARE_CACHE",
    "RELAYED_PARAMS",
    "AccountRefused",
    "ClosePool",
    "OpenPool",
    "OutgoingDatagram",
    "PoolCommand",
    "Refusal",
    "RequestRefused",
    "SidecarIntake",
    "SidecarSession",
    "SidecarSessionStatistics",
    "WritePool",
]

AGENT: Final = f"stratumrm-sidecar/{__version__}"
#: How long verdicts and notify channel lists are collected before they are written.
DEFAULT_BATCH_WINDOW: Final = 0.002
#: How long a received share datagram may wait for a VERDICT to acknowledge it before
#: an ACK datagram is sent instead (PROTOCOL.md §2.6; QUIC's max_ack_delay and its
#: default). Announced in the hello result; the proxy adds it to its retransmission
#: deadline, so a pool that answers within it costs no ACK datagram.
DEFAULT_MAX_ACK_DELAY: Final = 0.025
#: Bytes the sidecar may send to a learned address per authenticated byte received from it
#: (PROTOCOL.md §7): a share datagram whose pool is slow gets an ACK and then its VERDICT.
AMPLIFICATION_FACTOR: Final = 2.0
#: Share datagrams waiting for an acknowledgement after which an ACK goes out at once.
MAX_UNACKED: Final = 256
_VERDICT_ROOM: Final = MAX_DATAGRAM_SIZE - OVERHEAD
#: Shares remembered per session for duplicate detection (LRU).
DEFAULT_SHARE_CACHE: Final = 65536
DEFAULT_MAX_CHANNELS: Final = 16384
DEFAULT_HEARTBEAT: Final = 1.0
DEFAULT_DEAD_AFTER: Final = 5.0
DEFAULT_REKEY_INTERVAL: Final = 3600.0
#: ``bad tag`` drops under a session's keys after which the sidecar rekeys (new conn_id,
#: PROTOCOL.md §6.1): a bound on forgery attempts per key that an attacker cannot turn
#: into a closed session.
DEFAULT_REKEY_AFTER_BAD_TAGS: Final = 1 << 16
#: Control bytes queued but not taken by the driver after which the proxy counts as stuck.
MAX_CONTROL_BACKLOG: Final = 16 * 1024 * 1024
#: Job ids remembered per channel (C5) and worker names per channel (worker_index is a u8).
MAX_JOBS_PER_CHANNEL: Final = 256
MAX_WORKERS_PER_CHANNEL: Final = 256
#: Account refusals kept for the driver to log (it takes them after every input).
MAX_PENDING_REFUSALS: Final = 1024
#: Copies of one in-flight share that may wait for its verdict.
MAX_WAITERS_PER_SHARE: Final = 64
#: Lines from a pool may be long (a notify with a full merkle branch is ~1.5 KB).
MAX_LINE_FROM_POOL: Final = 64 * 1024
MAX_CHANNEL_NUMBER: Final = 0xFFFF_FFFF
_MAX_HANDLE: Final = 0xFFFF_FFFF

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
_RELAYED_DECODERS: Final = {method: BoundedDecoder[Any](shape) for method, shape in RELAYED_PARAMS.items()}


def _encode_params(params: Any) -> Raw:
    """Typed params as the JSON array a pool expects: a Struct's trailing unset (None) fields dropped."""
    if isinstance(params, Struct):
        values = list(msgspec.structs.astuple(params))
        while values and values[-1] is None:
            values.pop()
        params = values
    return Raw(_encode(params))


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


class OutgoingDatagram(NamedTuple):
    """A sealed datagram and the (authenticated, budgeted) address to send it to."""

    data: bytes
    address: Address


# ----------------------------------------------------------------- statistics


class SidecarSessionStatistics(Struct, frozen=True):
    """A snapshot of one control connection's counters."""

    channels_open: int
    channels_opened: int
    channels_closed: int
    shares_udp: int
    """Share records received in authenticated datagrams."""
    shares_tls: int
    """``mining.submit`` channel requests."""
    shares_forwarded: int
    """Shares submitted to the pool (each distinct share once)."""
    duplicates_from_cache: int
    """Copies answered with the cached verdict of a share already judged."""
    duplicates_joined: int
    """Copies that arrived while the first was still with the pool, answered with its verdict."""
    shares_refused: int
    """Shares answered with an error without reaching the pool (unknown channel, job or worker ...)."""
    authorizations_refused: int
    """``mining.authorize`` requests for an account the certificate does not name (error 24)."""
    requests_refused: int
    """Channel requests not relayed: a method outside the allowlist or malformed params (error 20)."""
    accepted: int
    rejected: int
    verdicts_udp: int
    """``rm.results`` entries written."""
    verdicts_tls: int
    """Channel responses to ``mining.submit`` written."""
    results_lines: int
    jobs_announced: int
    """``rm.job`` lines."""
    notify_lines: int
    """``rm.notify`` lines."""
    notify_deliveries: int
    """Channels that received a ``mining.notify`` (one line each without de-duplication)."""
    notify_lines_saved: int
    datagrams_accepted: int
    datagram_drops: dict[str, int]
    """Drops of datagrams under this session's conn_ids, by reason (non-zero reasons only)."""
    probe_acks_sent: int
    probe_acks_over_budget: int
    bad_tag_rekeys: int
    """Rekeys (new conn_id) because forged datagrams reached the threshold (§6.1)."""
    verdict_datagrams_sent: int
    """VERDICT datagrams (data channel v2)."""
    ack_datagrams_sent: int
    """ACK datagrams: share datagrams no VERDICT acknowledged within max_ack_delay."""
    verdicts_over_budget: int
    """Verdicts sent over TLS because the anti-amplification budget refused their datagram."""
    udp_datagrams_sent: int
    key_epoch: int
    control_bytes_received: int
    control_bytes_sent: int
    pool_bytes_received: int
    pool_bytes_sent: int
    udp_bytes_received: int
    udp_bytes_sent: int
    rejected_by_reason: dict[str, int] = {}
    """Rejected shares by reason (stale, duplicate, low-difficulty ...)."""


# ----------------------------------------------------------------- the UDP intake


class SidecarIntake:
    """The sidecar's one UDP receive pipeline, shared by every session on the socket.

    It owns a :class:`~bridge.wire.receiver.DatagramReceiver` in the sidecar role,
    in which each :class:`SidecarSession` registers its key epochs with itself as
    the session key, so a datagram's conn_id finds its session in one dict lookup.
    Drops of unknown conn_ids and malformed headers are counted here only; drops
    and acceptances under a known conn_id also reach that session.
    """

    def __init__(
        self,
        *,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        grace: float = DEFAULT_GRACE,
        stranger_rate: float = DEFAULT_STRANGER_RATE,
        stranger_burst: float = DEFAULT_STRANGER_BURST,
    ) -> None:
        self.grace = grace
        self.receiver = DatagramReceiver(
            Role.SIDECAR,
            rate=rate,
            burst=burst,
            grace=grace,
            stranger_rate=stranger_rate,
            stranger_burst=stranger_burst,
            amplification_factor=AMPLIFICATION_FACTOR,
        )

    def receive_datagram(self, data: bytes, address: Address, now: float) -> SidecarSession | None:
        """Run one datagram through the pipeline; return the session if it may have output.

        That is a session that accepted the datagram (PROBE_ACKs, pool writes,
        verdicts) or rekeyed because of it; a drop under a known conn_id is counted
        by its session but returns None (nothing to do: the cheap path of a flood).
        """
        result = self.receiver.receive(data, address, now)
        session: SidecarSession | None = result.session  # type: ignore[assignment]
        if session is None:
            return None
        if type(result) is Accepted:
            session._on_datagram(result, now)
            return session
        return session if session._on_drop(result.reason, now) else None  # type: ignore[union-attr]

    def handle_timer(self, now: float) -> None:
        """Forget previous key epochs whose grace period is over."""
        self.receiver.purge(now)

    def get_timer(self) -> float | None:
        """When a previous key epoch's grace period ends (:meth:`handle_timer` forgets it)."""
        return self.receiver.next_deadline()

    def statistics(self) -> ReceiverStatistics:
        return self.receiver.statistics()


# ----------------------------------------------------------------- internal state


class _Verdict(Struct, frozen=True):
    """A pool's answer to a submit without its id: the ``verdict`` of a rm.results entry."""

    result: Raw | UnsetType = UNSET
    error: Raw = NULL
    reject_reason: str | UnsetType = field(default=UNSET, name="reject-reason")


_PLAIN_ACCEPT: Final = 1

UdpRef = tuple[int, int, int]  # (epoch, pn, index)


class _Share:
    """One distinct share: pending with the pool, or judged (then its verdict is cached)."""

    __slots__ = ("ch", "response", "tls_ids", "udp_refs", "urgent", "verdict")

    def __init__(self, ch: int) -> None:
        self.ch = ch
        self.response: Response | None = None
        self.verdict: Any = None  # 1 or a _Verdict once judged
        self.udp_refs: list[UdpRef] = []
        self.tls_ids: list[RequestId] = []
        self.urgent = False

    @property
    def waiters(self) -> int:
        return len(self.udp_refs) + len(self.tls_ids)


class _JobEntry:
    """A distinct notify and its handle; ``refs`` counts the channel tables holding it."""

    __slots__ = ("handle", "job_id", "key", "refs")

    def __init__(self, handle: int, job_id: str, key: bytes) -> None:
        self.handle = handle
        self.job_id = job_id
        self.key = key
        self.refs = 0


class _Channel:
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
        # job_id -> handle, oldest first (a dict keeps insertion order at a third of an OrderedDict's size).
        self.jobs: dict[str, int] = {}
        self.accepted = 0
        self.rejected = 0
        self.stale = 0
        self.accepted_difficulty = 0.0
        self.difficulty: float | None = None


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


def _u32(value: Any) -> int | None:
    """An SV1 u32 field (8 hex digits, or a JSON number) as an int, None if it is neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value <= 0xFFFF_FFFF else None
    if isinstance(value, str) and is_hex(value, 8):
        return int(value, 16)
    return None


def _account(worker: str) -> str:
    """The account part of ``user.worker``."""
    return worker.split(".", 1)[0]


def _hello_error(request_id: RequestId, message: str) -> bytes:
    return encode(RMResponse(request_id, None, [1, message])) + b"\n"


# ----------------------------------------------------------------- the session


class SidecarSession:
    """One proxy's control connection, its UDP key epochs and its channels.

    ``udp_port`` None means no UDP (shares come over TLS); ``intake`` is the shared
    UDP pipeline (a private one is made when UDP is on and none is given).
    ``accounts``, when given, are the accounts the proxy's certificate may
    authorize. The session is hashable by identity: it is its own key in the
    intake's receiver.
    """

    def __init__(
        self,
        *,
        now: float,
        intake: SidecarIntake | None = None,
        udp_port: int | None = None,
        udp_host: str | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        dead_after: float = DEFAULT_DEAD_AFTER,
        rekey_interval: float | None = DEFAULT_REKEY_INTERVAL,
        batch_window: float = DEFAULT_BATCH_WINDOW,
        accounts: Collection[str] | None = None,
        share_cache_size: int = DEFAULT_SHARE_CACHE,
        max_channels: int = DEFAULT_MAX_CHANNELS,
        rekey_after_bad_tags: int = DEFAULT_REKEY_AFTER_BAD_TAGS,
        max_ack_delay: float = DEFAULT_MAX_ACK_DELAY,
        randbytes: Callable[[int], bytes] = os.urandom,
        agent: str = AGENT,
    ) -> None:
        if heartbeat <= 0 or dead_after <= heartbeat:
            raise ValueError("need 0 < heartbeat < dead_after")
        if rekey_interval is not None and rekey_interval <= 0:
            raise ValueError("rekey_interval must be positive (or None for no periodic rekey)")
        if batch_window < 0 or share_cache_size < 1 or max_channels < 1:
            raise ValueError("batch_window must be >= 0; share_cache_size and max_channels >= 1")
        if udp_port is not None and intake is None:
            intake = SidecarIntake()
        self.intake = intake if udp_port is not None else None
        self.udp_port = udp_port
        self.udp_host = udp_host
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.rekey_interval = rekey_interval
        self.batch_window = batch_window
        self.accounts = frozenset(accounts) if accounts is not None else None
        self.share_cache_size = share_cache_size
        self.max_channels = max_channels
        if rekey_after_bad_tags < 1:
            raise ValueError("rekey_after_bad_tags must be at least 1")
        self.rekey_after_bad_tags = rekey_after_bad_tags
        self.max_ack_delay = max_ack_delay
        self.agent = agent
        self._randbytes = randbytes

        self.close_reason: str | None = None
        self.protocol_error: str | None = None
        self.hello: Hello | None = None
        self.features: tuple[str, ...] = ()
        self._pool_down: str | None = None  # pool-status: why the pool is unreachable, None while up
        self._pool_sent: bool | None = None  # pool-status: the last state sent (None: nothing yet)
        self._udp = False
        self._dedup_jobs = False
        self._batch_verdicts = False

        self._lines = LineBuffer(MAX_CONTROL_LINE)
        self._out: list[bytes] = []
        self._out_size = 0
        self._datagrams: list[OutgoingDatagram] = []
        self._commands: list[PoolCommand] = []
        self._refusals: list[Refusal] = []
        self._dirty: dict[int, None] = {}
        self._now = now
        self._silence = PeerSilence(dead_after, now)
        self._last_sent = now

        self._channels: dict[int, _Channel] = {}
        self._jobs: dict[int, _JobEntry] = {}
        self._job_by_key: dict[bytes, _JobEntry] = {}
        self._next_handle = 1
        self._shares: OrderedDict[tuple[Any, ...], _Share] = OrderedDict()

        self._pending_notify: dict[int, list[int]] = {}
        self._pending_notify_channels: set[int] = set()
        self._notify_due: float | None = None
        self._results: list[tuple[int, int, int, Any]] = []
        self._results_due: float | None = None
        # Data channel v2: verdicts of UDP shares go back as VERDICT datagrams at the
        # end of the input that produced them; share datagrams no verdict named within
        # max_ack_delay are acknowledged by an ACK datagram (both per key epoch).
        self._verdict_out: dict[int, list[tuple[int, int, Any]]] = {}
        self._unacked: dict[int, dict[int, float]] = {}
        self._unacked_count = 0
        self._ack_due: float | None = None

        self._epoch = -1
        self._sealers: dict[int, Sealer] = {}
        self._send_epoch = -1
        self._rekey_due: float | None = None
        self._registered = False

        # counters
        self._channels_opened = 0
        self._channels_closed = 0
        self._shares_udp = 0
        self._shares_tls = 0
        self._forwarded = 0
        self._from_cache = 0
        self._joined = 0
        self._refused = 0
        self._authorizations_refused = 0
        self._requests_refused = 0
        self._accepted = 0
        self._rejected = 0
        self._rejected_by_reason: dict[str, int] = {}
        self._verdicts_udp = 0
        self._verdicts_tls = 0
        self._results_lines = 0
        self._jobs_announced = 0
        self._notify_lines = 0
        self._notify_deliveries = 0
        self._datagrams_accepted = 0
        self._drops: dict[str, int] = {}
        self._bad_tags = 0
        self._bad_tag_rekeys = 0
        self._probe_acks = 0
        self._probe_acks_over_budget = 0
        self._verdict_datagrams = 0
        self._ack_datagrams = 0
        self._udp_datagrams_out = 0
        self._verdicts_over_budget = 0
        self._control_in = 0
        self._control_out = 0
        self._pool_in = 0
        self._pool_out = 0
        self._udp_in = 0
        self._udp_out = 0

    # ------------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    @property
    def udp(self) -> bool:
        """True when UDP shares were negotiated."""
        return self._udp

    @property
    def key_epoch(self) -> int:
        """The current key epoch (-1 before the first ``rm.keys``)."""
        return self._epoch

    @property
    def channels(self) -> frozenset[int]:
        return frozenset(self._channels)

    def channel_pool(self, ch: int) -> ClientSession | None:
        """The pool-facing session of channel ``ch`` (for the driver's logs and tests)."""
        channel = self._channels.get(ch)
        return None if channel is None else channel.pool

    # ------------------------------------------------------------------ outputs

    def data_to_send(self) -> bytes:
        """Control-channel bytes queued since the last call."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        self._control_out += len(data)
        return data

    def datagrams_to_send(self, now: float | None = None) -> list[OutgoingDatagram]:
        """Datagrams to send, each already charged to the session's budget.

        ``now`` (the contract's) changes nothing here: they were sealed when queued.
        """
        if not self._datagrams:
            return []
        out, self._datagrams = self._datagrams, []
        return out

    def commands(self) -> list[PoolCommand]:
        """Pool-connection commands, in the order they must be carried out."""
        for ch in self._dirty:
            channel = self._channels.get(ch)
            if channel is not None and channel.connected:
                data = channel.pool.data_to_send()
                if data:
                    self._pool_out += len(data)
                    self._commands.append(WritePool(ch, data))
        self._dirty.clear()
        if not self._commands:
            return []
        out, self._commands = self._commands, []
        return out

    def refusals(self) -> list[Refusal]:
        """Account and request refusals since the last call (for the driver's log)."""
        if not self._refusals:
            return []
        out, self._refusals = self._refusals, []
        return out

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` has something to do."""
        if self.closed:
            return None
        deadline = self._silence.deadline()
        if self.hello is not None:
            deadline = min(deadline, self._last_sent + self.heartbeat)
        for due in (self._notify_due, self._results_due, self._rekey_due, self._ack_due):
            if due is not None and due < deadline:
                deadline = due
        return deadline

    # ------------------------------------------------------------------ timers

    def silent_deadline(self) -> float:
        """When the proxy counts as silent unless something is heard from it
        (:class:`~bridge.relay.liveness.PeerSilence`: this process's own lateness is excused)."""
        return self._silence.deadline()

    def input_waiting(self, now: float) -> None:
        """The transport holds unread bytes from the proxy: it spoke, this side is behind."""
        self._silence.heard(now)

    def peer_acknowledged(self, age: float, now: float) -> None:
        """The proxy's TCP last acknowledged this side's bytes ``age`` seconds ago: recent
        means a busy proxy, not a gone one (:meth:`~bridge.relay.liveness.PeerSilence.acknowledged`)."""
        self._silence.acknowledged(age, now)

    def handle_timer(self, now: float, due: float | None = None) -> None:
        """Flush collected lines, send heartbeats, rekey, and notice a silent proxy: the deadline
        ``due`` (what :meth:`get_timer` gave; None: not known) came, and it is ``now``."""
        if self.closed:
            return
        self._now = now
        if due is not None:
            self._silence.timer_ran(due, now)
        if now >= self._silence.deadline():  # the sum get_timer() gave
            self._close(f"proxy silent for {self.dead_after:g} s (no line, no rm.pong)")
            return
        if self._notify_due is not None and now >= self._notify_due:
            self._flush_notifies()
        if self._results_due is not None and now >= self._results_due:
            self._flush_results()
        if self._ack_due is not None and now >= self._ack_due:
            self._send_acks(now)
        if self._rekey_due is not None and now >= self._rekey_due:
            self.rekey(now)
        if self.hello is not None and now >= self._last_sent + self.heartbeat:
            self._write(encode_rm("rm.ping", PingParams(t=now)))

    def rekey(self, now: float) -> None:
        """Issue the next key epoch (``rm.keys``); the previous one stays valid for the grace period."""
        if self.closed or not self._udp:
            return
        self._now = now
        self._issue_keys(now)

    # ------------------------------------------------------------------ control input

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the proxy's control connection."""
        if self.closed:
            return
        self._now = now
        self._silence.heard(now)
        self._control_in += len(data)
        try:
            lines = self._lines.feed(data)
        except LineTooLong as exc:
            self._protocol_violation(f"control line too long: {exc}")
            return
        for line in lines:
            self._handle_line(line)
            if self.closed:
                return
        self._after_input()

    def pool_status(self, up: bool, reason: str, now: float) -> None:
        """The driver's check of the pool software (C10): tell the proxy, if it negotiated pool-status."""
        self._now = now
        self._pool_down = None if up else (reason or "the pool is unreachable")
        self._send_pool_status()

    def _send_pool_status(self) -> None:
        if self.hello is None or self.closed or "pool-status" not in self.features:
            return
        up = self._pool_down is None
        if (self._pool_sent is None and up) or self._pool_sent == up:
            return  # up is the assumption; nothing new to say
        self._pool_sent = up
        self._write(encode_rm("rm.pool", PoolStatus(status="up" if up else "down", reason=self._pool_down or "")))

    def go_away(self, deadline: float, reason: str, now: float) -> bool:
        """This sidecar is draining: ask the proxy to move within ``deadline`` seconds (``rm.goaway``).

        False when the proxy did not negotiate ``goaway`` (or has not said hello): it
        only learns of the drain when the connection closes at the deadline.
        """
        self._now = now
        if self.hello is None or self.closed or "goaway" not in self.features:
            return False
        self._write(encode_rm("rm.goaway", GoAway(deadline=max(0.0, deadline), reason=reason)))
        return True

    def close(self, reason: str, now: float) -> None:
        """Close deliberately (shutdown, revoked certificate): ``rm.error`` with ``reason``, then close."""
        self._now = now
        self._close(reason)

    def connection_lost(self, reason: str, now: float) -> None:
        """The control connection broke or the proxy closed it."""
        self._now = now
        self._close(reason, tell_proxy=False)

    def _handle_line(self, line: bytes) -> None:
        try:
            message = decode_line(line)
        except ControlDecodeError as exc:
            self._protocol_violation(str(exc))
            return
        method = message.method
        if self.hello is None and (message.ch is not None or method != "rm.hello"):
            if message.ch is not None:
                what = f"a line of channel {message.ch}"
            else:
                what = "a response" if method is UNSET else repr(method)
            self._protocol_violation(f"the first line must be rm.hello, got {what}")
            return
        if message.ch is not None:
            self._channel_line(message)
            return
        if method is UNSET:
            return  # an rm response: the sidecar sends no rm requests, so there is nothing to match
        assert isinstance(method, str)
        handler = _RM_HANDLERS.get(method)
        if handler is None:
            if method.startswith("rm."):
                self._protocol_violation(f"unknown control method {method!r}")
            else:
                self._protocol_violation(f'{method!r} without "ch": channel lines need a channel number')
            return
        try:
            handler(self, message)
        except ControlDecodeError as exc:
            self._protocol_violation(str(exc))

    def _on_hello(self, message: ControlLine) -> None:
        if self.hello is not None:
            self._protocol_violation("rm.hello sent twice")
            return
        hello = decode_params("rm.hello", message.params)
        if hello.version != PROTOCOL_VERSION:
            self._write(
                _hello_error(
                    message.id,
                    f"unsupported StratumRM version {hello.version}; this sidecar speaks {PROTOCOL_VERSION}",
                )
            )
            self._close(f"proxy speaks StratumRM version {hello.version}, this sidecar speaks {PROTOCOL_VERSION}")
            return
        self.hello = hello
        offered = set(hello.features)
        # Data channel version 1 is gone: UDP only with a proxy that speaks version 2.
        udp = self.udp_port is not None and "udp-shares" in offered and "udp-v2" in offered
        features = tuple(f for f in FEATURES if f in offered and (f not in ("udp-shares", "udp-v2") or udp))
        self.features = features
        self._udp = udp
        self._dedup_jobs = "job-dedup" in features
        self._batch_verdicts = "batch-verdicts" in features
        result = HelloResult(
            version=PROTOCOL_VERSION,
            features=list(features),
            agent=self.agent,
            udp_port=self.udp_port if udp else None,
            udp_host=self.udp_host if udp else None,
            heartbeat=self.heartbeat,
            dead_after=self.dead_after,
            max_ack_delay=self.max_ack_delay,
        )
        self._write(encode_rm_result(message.id, result))
        if udp:
            self._issue_keys(self._now)
        self._send_pool_status()

    def _on_open(self, message: ControlLine) -> None:
        params = decode_params("rm.open", message.params)
        ch = params.ch
        if not 1 <= ch <= MAX_CHANNEL_NUMBER:
            self._protocol_violation(f"rm.open for channel {ch}: channel numbers are 1 to 2^32-1")
            return
        if ch in self._channels:
            self._protocol_violation(f"rm.open for channel {ch}, which is already open (channels are never reused)")
            return
        if len(self._channels) >= self.max_channels:
            self._write(
                encode_rm("rm.close", Close(ch=ch, reason=f"too many channels on one connection (limit {self.max_channels})"))
            )
            return
        self._channels[ch] = _Channel(ch, params.peer)
        self._channels_opened += 1
        self._commands.append(OpenPool(ch, params.peer))

    def _on_close(self, message: ControlLine) -> None:
        params = decode_params("rm.close", message.params)
        channel = self._channels.get(params.ch)
        if channel is not None:
            self._drop_channel(channel, f"proxy closed the channel: {params.reason or 'rig disconnected'}")

    def _on_ping(self, message: ControlLine) -> None:
        params = decode_params("rm.ping", message.params)
        self._write(encode_rm("rm.pong", PingParams(t=params.t)))

    def _on_pong(self, message: ControlLine) -> None:
        decode_params("rm.pong", message.params)  # liveness only; validates the shape

    def _on_error(self, message: ControlLine) -> None:
        params = decode_params("rm.error", message.params)
        self._close(f"proxy closed the connection: {params.reason}", tell_proxy=False)

    def _on_wrong_direction(self, message: ControlLine) -> None:
        self._protocol_violation(f"{message.method} is sent by the sidecar, not by a proxy")

    # ------------------------------------------------------------------ channel lines

    def _channel_line(self, message: ControlLine) -> None:
        ch = cast(int, message.ch)
        channel = self._channels.get(ch)
        method = message.method
        if method is UNSET:  # the rig's answer to a pool request
            if channel is not None:
                channel.pool.respond_raw(Response(message.id, message.result, message.error, message.reject_reason))
                self._dirty[ch] = None
            return
        if channel is None:
            # Lines can cross our rm.close; answer requests so nothing hangs.
            if message.id is not None:
                result = FALSE if method == "mining.submit" else NULL
                self._write_channel(
                    ch, encode_channel_response(ch, message.id, result, error_value(OTHER, f"channel {ch} is not open"))
                )
            return
        assert isinstance(method, str)
        decoder = _RELAYED_DECODERS.get(method)
        if decoder is None:
            self._refuse_request(
                channel,
                message.id,
                method,
                "method not allowed: the sidecar relays only the canonical SV1 requests "
                f"({', '.join(RELAYED_PARAMS)}), spelled exactly",
            )
            return
        try:
            params = decoder.decode(message.params)
        except msgspec.DecodeError as exc:
            if method == "mining.authorize" and len(channel.workers) < MAX_WORKERS_PER_CHANNEL:
                channel.workers.append("")  # keeps worker_index in step with the proxy's count
            self._refuse_request(channel, message.id, method, f"malformed params: {exc}")
            return
        if method == "mining.submit":
            self._tls_submit(channel, message.id, params)
            return
        if method == "mining.authorize" and not self._authorize(channel, message.id, params.user):
            return
        if method == "mining.extranonce.subscribe":
            params = ()
        self._relay_request(channel, method, _encode_params(params), message.id)

    def _refuse_request(self, channel: _Channel, request_id: Any, method: str, reason: str) -> None:
        """Answer a request the sidecar will not relay with error 20; note it once per method and channel."""
        self._requests_refused += 1
        shown = method[:64]
        refused = channel.refused_methods
        if refused is None:
            refused = channel.refused_methods = set()
        if shown not in refused and len(refused) < MAX_WORKERS_PER_CHANNEL:
            refused.add(shown)
            if len(self._refusals) < MAX_PENDING_REFUSALS:
                self._refusals.append(RequestRefused(channel.ch, shown, reason))
        if request_id is not None:
            self._write_channel(
                channel.ch,
                encode_channel_response(channel.ch, request_id, FALSE, error_value(OTHER, f"Refused by the sidecar, {reason}")),
            )

    def _authorize(self, channel: _Channel, request_id: Any, worker: str) -> bool:
        """Record the worker name (in request order); False when the account is not allowed."""
        if len(channel.workers) < MAX_WORKERS_PER_CHANNEL:
            channel.workers.append(worker)
        if self.accounts is None or _account(worker) in self.accounts:
            return True
        self._authorizations_refused += 1
        self._account_refused(channel, "mining.authorize", worker)
        if request_id is not None:
            self._write_channel(
                channel.ch,
                encode_channel_response(
                    channel.ch,
                    request_id,
                    FALSE,
                    error_value(
                        UNAUTHORIZED,
                        f"Unauthorized worker: this proxy's certificate does not cover account {_account(worker)!r}",
                    ),
                ),
            )
        return False

    def _account_refused(self, channel: _Channel, method: str, worker: str) -> None:
        """Note a refusal for the driver's log, once per account and channel."""
        account = _account(worker)
        refused = channel.refused_accounts
        if refused is None:
            refused = channel.refused_accounts = set()
        if account in refused or len(refused) >= MAX_WORKERS_PER_CHANNEL:
            return
        refused.add(account)
        if len(self._refusals) < MAX_PENDING_REFUSALS:
            self._refusals.append(AccountRefused(channel.ch, method, worker, account))

    def _relay_request(self, channel: _Channel, method: str, params: Raw, request_id: Any) -> None:
        try:
            channel.pool.request(method, params, context=request_id)
        except (OverflowError, RuntimeError) as exc:
            if request_id is not None:
                self._write_channel(
                    channel.ch,
                    encode_channel_response(channel.ch, request_id, NULL, error_value(OTHER, f"Pool unavailable: {exc}")),
                )
            return
        self._dirty[channel.ch] = None

    # ------------------------------------------------------------------ shares

    def _tls_submit(self, channel: _Channel, request_id: Any, params: SubmitParams) -> None:
        self._shares_tls += 1
        if self.accounts is not None and _account(params.worker) not in self.accounts:
            self._account_refused(channel, "mining.submit", params.worker)
            self._refuse_tls(channel.ch, request_id, UNAUTHORIZED, "Unauthorized worker")
            return
        key = self._tls_share_key(channel, params)
        self._submit(channel, key, _encode_params(params), None, request_id)

    def _tls_share_key(self, channel: _Channel, params: SubmitParams) -> tuple[Any, ...] | None:
        """The duplicate-table key of a TLS submit; None when its fields are not clean hex."""
        if len(params.extranonce2) % 2 or (params.extranonce2 and not is_hex(params.extranonce2)):
            return None
        extranonce2 = bytes.fromhex(params.extranonce2)
        ntime = _u32(params.ntime)
        nonce = _u32(params.nonce)
        version_bits = None if params.version_bits is None else _u32(params.version_bits)
        if ntime is None or nonce is None or (params.version_bits is not None and version_bits is None):
            return None
        handle = channel.jobs.get(params.job_id)
        job_key: int | str = params.job_id if handle is None else handle
        return (channel.ch, job_key, extranonce2, ntime, nonce, version_bits)

    def _udp_share(self, share: Share, ref: UdpRef, urgent: bool) -> None:
        self._shares_udp += 1
        ch = share.channel_id
        channel = self._channels.get(ch)
        if channel is None:
            self._refuse_udp(ref, OTHER, f"channel {ch} is not open")
            return
        job = self._jobs.get(share.job_handle)
        handle = None if job is None else channel.jobs.get(job.job_id)
        if job is None or handle is None:
            self._refuse_udp(ref, JOB_NOT_FOUND, f"Job not found (job handle {share.job_handle} unknown on channel {ch})")
            return
        index = share.worker_index or 0
        if index >= len(channel.workers):
            self._refuse_udp(
                ref, UNAUTHORIZED, f"Unauthorized worker (worker index {index} was never authorized on channel {ch})"
            )
            return
        worker = channel.workers[index]
        if self.accounts is not None and _account(worker) not in self.accounts:
            self._account_refused(channel, "mining.submit", worker)
            self._refuse_udp(ref, UNAUTHORIZED, "Unauthorized worker")
            return
        size = channel.pool.extranonce2_size
        if size is not None and len(share.extranonce2) != size:
            self._refuse_udp(ref, OTHER, "Incorrect size of extranonce2")
            return
        key = (ch, handle, share.extranonce2, share.ntime, share.nonce, share.version_bits)
        entry = self._shares.get(key)
        if entry is not None:
            self._duplicate(entry, key, ref, None, urgent)
            return
        params: list[Any] = [worker, job.job_id, share.extranonce2.hex(), f"{share.ntime:08x}", f"{share.nonce:08x}"]
        if share.version_bits is not None:
            params.append(f"{share.version_bits:08x}")
        self._forward(channel, key, params, ref, None, urgent)

    def _submit(
        self,
        channel: _Channel,
        key: tuple[Any, ...] | None,
        params: list[Any] | Raw,
        ref: UdpRef | None,
        request_id: RequestId,
    ) -> None:
        if key is not None:
            entry = self._shares.get(key)
            if entry is not None:
                self._duplicate(entry, key, ref, request_id, False)
                return
        self._forward(channel, key, params, ref, request_id, False)

    def _forward(
        self,
        channel: _Channel,
        key: tuple[Any, ...] | None,
        params: list[Any] | Raw,
        ref: UdpRef | None,
        request_id: RequestId,
        urgent: bool,
    ) -> None:
        entry = _Share(channel.ch)
        entry.urgent = urgent
        if ref is not None:
            entry.udp_refs.append(ref)
        else:
            entry.tls_ids.append(request_id)
        try:
            channel.pool.request("mining.submit", params, context=entry)
        except (OverflowError, RuntimeError) as exc:
            message = f"Pool unavailable: {exc}; share not confirmed"
            if ref is not None:
                self._refuse_udp(ref, OTHER, message)
            else:
                self._refuse_tls(channel.ch, request_id, OTHER, message)
            return
        self._forwarded += 1
        self._dirty[channel.ch] = None
        if key is not None:
            shares = self._shares
            shares[key] = entry
            if len(shares) > self.share_cache_size:
                shares.popitem(last=False)

    def _duplicate(self, entry: _Share, key: tuple[Any, ...], ref: UdpRef | None, request_id: RequestId, urgent: bool) -> None:
        self._shares.move_to_end(key)
        if entry.verdict is not None:
            self._from_cache += 1
            if ref is not None:
                self._add_result(ref, entry.verdict, urgent)
            else:
                self._answer_tls(entry, request_id)
            return
        self._joined += 1
        if entry.waiters >= MAX_WAITERS_PER_SHARE:
            if ref is None:
                self._refuse_tls(entry.ch, request_id, OTHER, "too many copies of this share in flight")
            return  # a UDP copy gets no answer; one of the waiting copies will
        entry.urgent = entry.urgent or urgent
        if ref is not None:
            entry.udp_refs.append(ref)
        else:
            entry.tls_ids.append(request_id)

    def _judged(self, entry: _Share, response: Response) -> None:
        """The pool's verdict for a forwarded share: answer every copy, cache it."""
        channel = self._channels.get(entry.ch)
        if response.accepted:
            self._accepted += 1
            if channel is not None:
                channel.accepted += 1
                channel.accepted_difficulty += channel.difficulty or 1.0
        else:
            self._rejected += 1
            reason = reject_reason_name(read_verdict(response).code)
            self._rejected_by_reason[reason] = self._rejected_by_reason.get(reason, 0) + 1
            if channel is not None:
                channel.rejected += 1
                channel.stale += reason == "stale"
        plain = response.accepted and bytes(response.error) == b"null" and response.reject_reason is UNSET
        entry.response = response
        entry.verdict = _PLAIN_ACCEPT if plain else _Verdict(response.result, response.error, response.reject_reason)
        for ref in entry.udp_refs:
            self._add_result(ref, entry.verdict, entry.urgent)
        for request_id in entry.tls_ids:
            self._answer_tls(entry, request_id)
        entry.udp_refs = []
        entry.tls_ids = []

    def _answer_tls(self, entry: _Share, request_id: RequestId) -> None:
        if request_id is None:
            return
        response = entry.response
        assert response is not None
        self._verdicts_tls += 1
        self._write_channel(
            entry.ch,
            encode_channel_response(entry.ch, request_id, response.result, response.error, response.reject_reason),
        )

    def _refuse_udp(self, ref: UdpRef, code: int, message: str) -> None:
        self._refused += 1
        self._add_result(ref, _Verdict(FALSE, error_value(code, message)), False)

    def _refuse_tls(self, ch: int, request_id: RequestId, code: int, message: str) -> None:
        self._refused += 1
        if request_id is not None:
            self._verdicts_tls += 1
            self._write_channel(ch, encode_channel_response(ch, request_id, FALSE, error_value(code, message)))

    def _add_result(self, ref: UdpRef, verdict: Any, urgent: bool) -> None:
        self._verdicts_udp += 1
        out = self._verdict_out.get(ref[0])
        if out is None:
            self._verdict_out[ref[0]] = [(ref[1], ref[2], verdict)]
        else:
            out.append((ref[1], ref[2], verdict))

    def _add_tls_result(self, epoch: int, pn: int, index: int, verdict: Any, urgent: bool) -> None:
        """A verdict of a UDP share that cannot go back as a datagram: ``rm.results`` over TLS."""
        self._results.append((epoch, pn, index, verdict))
        if urgent or len(self._results) >= MAX_RESULTS_PER_LINE:
            self._flush_results()
        elif self._results_due is None:
            self._results_due = self._now + self.batch_window

    def _flush_verdicts(self) -> None:
        """Send the verdicts collected during this input as VERDICT datagrams (per key epoch).

        A verdict goes over TLS (``rm.results``) instead when its epoch can no longer
        seal or the anti-amplification budget (§7) does not allow the datagram.
        """
        pending, self._verdict_out = self._verdict_out, {}
        intake = self.intake
        for epoch, items in pending.items():
            sealer = self._sealers.get(epoch)
            unacked = self._unacked.get(epoch)
            start = 0
            count = len(items)
            while start < count:
                pieces: list[bytes] = []
                room = _VERDICT_ROOM
                end = start
                while end < count and end - start < VERDICT_MAX_ENTRIES:
                    pn, index, verdict = items[end]
                    piece = pack_verdict_entry(pn, index, None if type(verdict) is int else _encode(verdict))
                    if len(piece) > room and pieces:
                        break
                    room -= len(piece)
                    pieces.append(piece)
                    end += 1
                chunk = items[start:end]
                start = end
                sent = False
                if sealer is not None and intake is not None and room >= 0:
                    plaintext = b"".join(pieces)
                    address = intake.receiver.send_to(self, OVERHEAD + len(plaintext))
                    if address is None:
                        self._verdicts_over_budget += len(chunk)
                    else:
                        try:
                            sealed = sealer.seal_plaintext(DatagramType.VERDICT, plaintext)
                        except KeyExhausted:
                            self.rekey(self._now)
                        else:
                            sent = True
                            self._verdict_datagrams += 1
                            self._send_datagram(sealed.data, address)
                            if unacked:
                                for pn, _, _ in chunk:
                                    if unacked.pop(pn, None) is not None:
                                        self._unacked_count -= 1
                if not sent:
                    for pn, index, verdict in chunk:
                        self._add_tls_result(epoch, pn, index, verdict, True)
        if self._unacked_count == 0:
            self._ack_due = None

    def _send_datagram(self, data: bytes, address: Address) -> None:
        self._udp_out += len(data)
        self._udp_datagrams_out += 1
        self._datagrams.append(OutgoingDatagram(data, address))

    def _note_received(self, epoch: int, pn: int, now: float) -> None:
        """A share datagram to acknowledge: by a VERDICT naming it, else an ACK within max_ack_delay."""
        pns = self._unacked.get(epoch)
        if pns is None:
            pns = self._unacked[epoch] = {}
        if pn not in pns:
            pns[pn] = now
            self._unacked_count += 1
        if self._ack_due is None:
            self._ack_due = now + self.max_ack_delay
        if self._unacked_count >= MAX_UNACKED:
            self._ack_due = now

    def _send_acks(self, now: float) -> None:
        """ACK every share datagram no VERDICT acknowledged (ranges highest first, per epoch)."""
        self._ack_due = None
        unacked, self._unacked = self._unacked, {}
        self._unacked_count = 0
        intake = self.intake
        if intake is None:
            return
        for epoch, pns in unacked.items():
            sealer = self._sealers.get(epoch)
            if sealer is None or not pns:
                continue
            ordered = sorted(pns, reverse=True)
            ranges: list[AckRange] = []
            high = low = ordered[0]
            for pn in ordered[1:]:
                if pn == low - 1:
                    low = pn
                    continue
                ranges.append(AckRange(high, low))
                high = low = pn
            ranges.append(AckRange(high, low))
            for start in range(0, len(ranges), ACK_MAX_RANGES):
                group = tuple(ranges[start : start + ACK_MAX_RANGES])
                delay = max(0, round((now - pns[group[0].high]) * 1e6))
                ack = Ack(ranges=group, ack_delay_us=min(delay, 0xFFFF_FFFF))
                address = intake.receiver.send_to(self, OVERHEAD + 5 + 12 * len(group))
                if address is None:
                    continue  # the proxy's retransmission recovers; the budget refills as it sends
                try:
                    sealed = sealer.seal(ack)
                except KeyExhausted:
                    self.rekey(now)
                    return
                self._ack_datagrams += 1
                self._send_datagram(sealed.data, address)

    def _flush_results(self) -> None:
        self._results_due = None
        if not self._results:
            return
        results, self._results = self._results, []
        self._results_lines += 1
        self._write(encode_rm("rm.results", Results(v=results)))

    # ------------------------------------------------------------------ datagrams

    def receive_datagram(self, data: bytes, address: Address, now: float) -> SidecarSession | None:
        """Convenience: run a datagram through this session's intake (shared or private)."""
        if self.intake is None:
            return None
        return self.intake.receive_datagram(data, address, now)

    def _on_datagram(self, accepted: Accepted, now: float) -> None:
        if self.closed:
            return
        self._now = now
        self._datagrams_accepted += 1
        self._udp_in += accepted.size
        if accepted.epoch > self._send_epoch and accepted.epoch in self._sealers:
            # The proxy uses newer keys: seal under them from now on (§8).
            self._send_epoch = accepted.epoch
            self._sealers = {e: s for e, s in self._sealers.items() if e >= accepted.epoch}
        body = accepted.body
        kind = type(body)
        if kind is Share:
            self._note_received(accepted.epoch, accepted.header.pn, now)
            self._udp_share(cast(Share, body), (accepted.epoch, accepted.header.pn, 0), accepted.header.urgent)
        elif kind is ShareBatch:
            pn = accepted.header.pn
            urgent = accepted.header.urgent
            self._note_received(accepted.epoch, pn, now)
            for index, share in enumerate(cast(ShareBatch, body).shares):
                self._udp_share(share, (accepted.epoch, pn, index), urgent)
        elif kind is Probe:
            self._answer_probe(cast(Probe, body))
        # PROBE_ACK: the sidecar sends no probes; accepted (it taught the address), nothing to do.
        self._after_input()

    def _on_drop(self, reason: DropReason, now: float) -> bool:
        """Count a drop under this session's conn_id; True if it rekeyed (output to send)."""
        if self.closed:
            return False
        self._now = now
        name = reason.value
        self._drops[name] = self._drops.get(name, 0) + 1
        if reason is DropReason.BAD_TAG:
            self._bad_tags += 1
            if self._bad_tags >= self.rekey_after_bad_tags:
                # Someone is forging under this conn_id: move the session to a new one
                # (rm.keys, PROTOCOL.md §6.1). The old conn_id keeps working for the grace
                # period, then is refused; the session itself is never closed for it.
                self._bad_tags = 0
                self._bad_tag_rekeys += 1
                self.rekey(now)
                return True
        return False

    def _answer_probe(self, probe: Probe) -> None:
        intake = self.intake
        sealer = self._sealers.get(self._send_epoch)
        if intake is None or sealer is None:
            return
        size = OVERHEAD + 4 + probe.padding
        address = intake.receiver.send_to(self, size)
        if address is None:
            self._probe_acks_over_budget += 1
            return
        try:
            sealed = sealer.seal(ProbeAck(probe_id=probe.probe_id, padding=probe.padding))
        except KeyExhausted:
            self.rekey(self._now)
            return
        self._probe_acks += 1
        self._send_datagram(sealed.data, address)

    def _issue_keys(self, now: float) -> None:
        intake = self.intake
        assert intake is not None
        receiver = intake.receiver
        epoch = self._epoch + 1
        while True:
            material = KeyMaterial.generate(epoch, randbytes=self._randbytes)
            keys = KeySet.derive(material, Role.SIDECAR)
            try:
                if self._registered:
                    receiver.rekey(self, keys.opener, now)
                else:
                    receiver.add_session(self, keys.opener)
                    self._registered = True
            except ValueError:
                continue  # conn_id already in use by another session: draw again
            break
        self._epoch = epoch
        # Keep sealing under the epoch the proxy last used until it uses a newer one
        # (§8); the receiver still accepts the previous epoch, so keep its sealer too.
        keep = (self._send_epoch, epoch - 1)
        self._sealers = {e: s for e, s in self._sealers.items() if e in keep}
        self._sealers[epoch] = keys.sealer
        if self._send_epoch < 0:
            self._send_epoch = epoch
        if self.rekey_interval is not None:
            self._rekey_due = now + self.rekey_interval
        self._write(
            encode_rm(
                "rm.keys",
                Keys(
                    conn_id=f"{material.conn_id:016x}",
                    epoch=epoch,
                    secret=material.secret.hex(),
                    grace=intake.grace,
                ),
            )
        )

    # ------------------------------------------------------------------ pool side

    def pool_connected(self, ch: int, now: float) -> None:
        """The pool connection of ``ch`` is up: what the proxy sent so far can go."""
        channel = self._channels.get(ch)
        if channel is None or self.closed:
            return
        self._now = now
        channel.connected = True
        self._dirty[ch] = None

    def pool_data(self, ch: int, data: bytes, now: float) -> None:
        """Bytes from the pool on channel ``ch``."""
        channel = self._channels.get(ch)
        if channel is None or self.closed:
            return
        self._now = now
        self._pool_in += len(data)
        self._dirty[ch] = None  # an answer may release held requests, a pool request needs none
        for event in channel.pool.receive_data(data):
            self._pool_event(channel, event)
            if ch not in self._channels:
                break
        self._after_input()

    def pool_closed(self, ch: int, reason: str, now: float) -> None:
        """The pool connection of ``ch`` could not be opened, or was lost: tell the proxy."""
        channel = self._channels.get(ch)
        if channel is None or self.closed:
            return
        self._now = now
        self._end_channel(channel, reason)
        self._after_input()

    def _pool_event(self, channel: _Channel, event: Any) -> None:
        ch = channel.ch
        kind = type(event)
        if kind is Reply:
            context = event.context
            if type(context) is _Share:
                self._judged(context, event.response)
            elif context is not None:
                response = event.response
                self._write_channel(
                    ch, encode_channel_response(ch, context, response.result, response.error, response.reject_reason)
                )
        elif kind is Notify:
            self._notify(channel, event)
        elif kind is SetDifficulty or kind is SetExtranonce or kind is SetVersionMask or kind is ShowMessage:
            if kind is SetDifficulty:
                channel.difficulty = float(event.difficulty)
            method = event.__struct_config__.tag
            self._write_channel(ch, encode_channel_request(ch, None, method, Raw(_encode(event.params))))
        elif kind is Reconnect:
            self._write_channel(ch, encode_channel_request(ch, None, "client.reconnect", event.params))
        elif kind is GetVersion or kind is Ping:
            method = event.__struct_config__.tag
            self._write_channel(ch, encode_channel_request(ch, event.id, method, event.params))
        elif kind is UnknownPoolRequest:
            self._write_channel(ch, encode_channel_request(ch, event.id, event.method, event.params))
        elif kind is ProtocolViolation and event.fatal:
            self._end_channel(channel, f"pool protocol violation: {event.reason}")

    def _notify(self, channel: _Channel, notify: Notify) -> None:
        ch = channel.ch
        self._notify_deliveries += 1
        params = notify.params
        if not self._dedup_jobs:
            self._write_channel(ch, encode_channel_request(ch, None, "mining.notify", Raw(_encode(params))))
            return
        if ch in self._pending_notify_channels:
            self._flush_notifies()  # an earlier job for this channel must go first
        key = _encode(params)
        job = self._job_by_key.get(key)
        if job is None:
            job = _JobEntry(self._allocate_handle(), params.job_id, key)
            self._jobs[job.handle] = job
            self._job_by_key[key] = job
            self._jobs_announced += 1
            self._write(encode_rm("rm.job", Job(job=job.handle, notify=params)))
        self._remember_job(channel, job)
        pending = self._pending_notify.get(job.handle)
        if pending is None:
            pending = self._pending_notify[job.handle] = []
        pending.append(ch)
        self._pending_notify_channels.add(ch)
        if len(pending) >= MAX_CHANNELS_PER_NOTIFY:
            self._flush_notifies()
        elif self._notify_due is None:
            self._notify_due = self._now + self.batch_window

    def _remember_job(self, channel: _Channel, job: _JobEntry) -> None:
        jobs = channel.jobs
        previous = jobs.pop(job.job_id, None)
        jobs[job.job_id] = job.handle
        job.refs += 1
        if previous is not None:
            self._release_job(previous)
        if len(jobs) > MAX_JOBS_PER_CHANNEL:
            self._release_job(jobs.pop(next(iter(jobs))))

    def _release_job(self, handle: int) -> None:
        job = self._jobs.get(handle)
        if job is None:
            return
        job.refs -= 1
        if job.refs <= 0:
            del self._jobs[handle]
            del self._job_by_key[job.key]

    def _allocate_handle(self) -> int:
        handle = self._next_handle
        while handle in self._jobs:  # only after 2^32 handles: skip the live ones
            handle = handle % _MAX_HANDLE + 1
        self._next_handle = handle % _MAX_HANDLE + 1
        return handle

    def _flush_notifies(self) -> None:
        self._notify_due = None
        if not self._pending_notify:
            return
        pending, self._pending_notify = self._pending_notify, {}
        self._pending_notify_channels.clear()
        for handle, channels in pending.items():
            self._notify_lines += 1
            self._write(encode_rm("rm.notify", NotifyChannels(job=handle, ch=channels)))

    # ------------------------------------------------------------------ channel ends

    def _end_channel(self, channel: _Channel, reason: str) -> None:
        """The pool side ended the channel: tell the proxy (after what is pending for it)."""
        ch = channel.ch
        self._flush_results()
        if ch in self._pending_notify_channels:
            self._flush_notifies()
        self._write(encode_rm("rm.close", Close(ch=ch, reason=reason)))
        self._drop_channel(channel, reason)

    def _drop_channel(self, channel: _Channel, reason: str) -> None:
        ch = channel.ch
        del self._channels[ch]
        self._dirty.pop(ch, None)
        self._channels_closed += 1
        for handle in channel.jobs.values():
            self._release_job(handle)
        channel.jobs.clear()
        self._commands.append(ClosePool(ch, reason))

    # ------------------------------------------------------------------ writing and closing

    def _write(self, line: bytes) -> None:
        self._out.append(line)
        self._out_size += len(line)
        self._last_sent = self._now
        if self._out_size > MAX_CONTROL_BACKLOG and not self.closed:
            self._close(f"proxy did not read {MAX_CONTROL_BACKLOG} bytes of control data", tell_proxy=False)

    def _write_channel(self, ch: int, line: bytes) -> None:
        if ch in self._pending_notify_channels:
            self._flush_notifies()
        self._write(line)

    def _after_input(self) -> None:
        """Verdicts go out at the end of each input; so do lines without negotiated batching."""
        if self._verdict_out:
            self._flush_verdicts()
        if not self._batch_verdicts and self._results:
            self._flush_results()
        if self.batch_window == 0:
            self._flush_notifies()
            self._flush_results()

    def _protocol_violation(self, reason: str) -> None:
        self.protocol_error = reason
        self._close(f"protocol error: {reason}")

    def _close(self, reason: str, *, tell_proxy: bool = True) -> None:
        if self.closed:
            return
        if tell_proxy:
            self._flush_results()
            self._flush_notifies()
            self._write(encode_rm("rm.error", ErrorNotice(reason=reason)))
        self.close_reason = reason
        for channel in list(self._channels.values()):
            self._drop_channel(channel, f"control connection closed: {reason}")
        self._pending_notify.clear()
        self._pending_notify_channels.clear()
        self._results.clear()
        self._verdict_out.clear()
        self._unacked.clear()
        self._unacked_count = 0
        self._notify_due = self._results_due = self._rekey_due = self._ack_due = None
        self._shares.clear()
        if self._registered and self.intake is not None:
            self.intake.receiver.remove_session(self)
            self._registered = False

    # ------------------------------------------------------------------ statistics

    def statistics(self) -> SidecarSessionStatistics:
        deliveries = self._notify_deliveries
        used = self._jobs_announced + self._notify_lines if self._dedup_jobs else deliveries
        return SidecarSessionStatistics(
            channels_open=len(self._channels),
            channels_opened=self._channels_opened,
            channels_closed=self._channels_closed,
            shares_udp=self._shares_udp,
            shares_tls=self._shares_tls,
            shares_forwarded=self._forwarded,
            duplicates_from_cache=self._from_cache,
            duplicates_joined=self._joined,
            shares_refused=self._refused,
            authorizations_refused=self._authorizations_refused,
            requests_refused=self._requests_refused,
            accepted=self._accepted,
            rejected=self._rejected,
            verdicts_udp=self._verdicts_udp,
            verdicts_tls=self._verdicts_tls,
            results_lines=self._results_lines,
            jobs_announced=self._jobs_announced,
            notify_lines=self._notify_lines,
            notify_deliveries=deliveries,
            notify_lines_saved=max(0, deliveries - used),
            datagrams_accepted=self._datagrams_accepted,
            datagram_drops=dict(self._drops),
            probe_acks_sent=self._probe_acks,
            probe_acks_over_budget=self._probe_acks_over_budget,
            bad_tag_rekeys=self._bad_tag_rekeys,
            verdict_datagrams_sent=self._verdict_datagrams,
            ack_datagrams_sent=self._ack_datagrams,
            verdicts_over_budget=self._verdicts_over_budget,
            udp_datagrams_sent=self._udp_datagrams_out,
            key_epoch=self._epoch,
            control_bytes_received=self._control_in,
            control_bytes_sent=self._control_out,
            pool_bytes_received=self._pool_in,
            pool_bytes_sent=self._pool_out,
            udp_bytes_received=self._udp_in,
            udp_bytes_sent=self._udp_out,
            rejected_by_reason=dict(self._rejected_by_reason),
        )

    def channel_statuses(self) -> list[ChannelStatus]:
        """The open channels (one per rig at the proxy)."""
        return [
            ChannelStatus(
                ch=channel.ch,
                peer=channel.peer,
                workers=list(channel.workers),
                pool_connected=channel.connected,
                difficulty=channel.difficulty,
                accepted=channel.accepted,
                rejected=channel.rejected,
                stale=channel.stale,
                accepted_difficulty=channel.accepted_difficulty,
            )
            for channel in list(self._channels.values())
        ]

    def __repr__(self) -> str:
        state = f"closed ({self.close_reason})" if self.closed else f"{len(self._channels)} channels"
        return f"<SidecarSession epoch={self._epoch} {state}>"


_RM_HANDLERS: Final[dict[str, Callable[[SidecarSession, ControlLine], None]]] = {
    "rm.hello": SidecarSession._on_hello,
    "rm.open": SidecarSession._on_open,
    "rm.close": SidecarSession._on_close,
    "rm.ping": SidecarSession._on_ping,
    "rm.pong": SidecarSession._on_pong,
    "rm.error": SidecarSession._on_error,
    "rm.keys": SidecarSession._on_wrong_direction,
    "rm.job": SidecarSession._on_wrong_direction,
    "rm.notify": SidecarSession._on_wrong_direction,
    "rm.results": SidecarSession._on_wrong_direction,
    "rm.pool": SidecarSession._on_wrong_direction,
}
