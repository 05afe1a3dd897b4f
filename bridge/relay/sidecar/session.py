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

Channels (C4): :mod:`bridge.relay.sidecar.channels`. ``rm.open`` emits :class:`~bridge.relay.sidecar.channels.OpenPool`. The proxy is not trusted with
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

Jobs (C5): :mod:`bridge.relay.sidecar.jobs` (:class:`~bridge.relay.sidecar.jobs.JobTable`):
one handle per distinct notify, ``rm.job`` once, ``rm.notify`` lines collected for
``batch_window`` seconds without breaking any channel's order.

Shares (C6). A SHARE or SHARE_BATCH record is checked (channel open, handle in
the channel's table, worker index authorized, extranonce2 of the subscribed
size), rebuilt into ``mining.submit [worker, job_id, en2, ntime, nonce(,
version_bits)]`` and handed to the channel's ClientSession at once. A TLS
``mining.submit`` is relayed as the rig sent it. Both go through the session's
share ledger (:mod:`bridge.relay.sidecar.ledger`): a share seen before is answered
from its cached verdict, or waits for the pending one, and never reaches the pool
twice. Verdicts of UDP shares go back as VERDICT datagrams, ACKs or ``rm.results``
(:mod:`bridge.relay.sidecar.verdicts`); verdicts of TLS shares are channel
responses. Records that fail the checks are answered with an explicit error
verdict, never silently dropped.

Pool status (C10): :meth:`SidecarSession.pool_status` is the driver's check of
the pool software; with ``pool-status`` negotiated, a change is sent as
``rm.pool`` (and a pool already down right after the hello result).

Liveness (C8), framing and the control backlog: :mod:`bridge.relay.control_session`,
shared with the proxy side: a ``rm.ping`` after ``heartbeat`` seconds without sending;
a proxy silent for ``dead_after`` seconds is dead. Errors (C1, C9): a line that is not
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
from collections.abc import Callable, Collection
from typing import Any, Final, assert_never

import msgspec
from msgspec import UNSET, Raw

from bridge import __version__
from bridge.errors import LineTooLong
from bridge.relay.control_session import ControlSession
from bridge.relay.sidecar.channels import (
    MAX_CHANNEL_NUMBER,
    MAX_WORKERS_PER_CHANNEL,
    RELAYED_DECODERS,
    RELAYED_PARAMS,
    AccountRefused,
    Channel,
    ChannelStatus,
    ClosePool,
    OpenPool,
    PoolCommand,
    Refusal,
    RequestRefused,
    WritePool,
    account,
    encode_params,
    u32,
)
from bridge.relay.sidecar.counters import SidecarSessionCounters
from bridge.relay.sidecar.intake import (
    DEFAULT_REKEY_AFTER_BAD_TAGS,
    DEFAULT_REKEY_INTERVAL,
    IntakeSession,
    OutgoingDatagram,
    SessionUdp,
    SidecarIntake,
)
from bridge.relay.sidecar.jobs import JobTable
from bridge.relay.sidecar.ledger import (
    DEFAULT_SHARE_CACHE,
    Copy,
    ShareEntry,
    ShareKey,
    ShareLedger,
    UdpRef,
    Verdict,
    share_key,
    verdict_fields,
)
from bridge.relay.sidecar.verdicts import DEFAULT_MAX_ACK_DELAY, VerdictSender
from bridge.sv1.client import ClientSession
from bridge.sv1.events import ProtocolViolation, Reply, UnknownPoolRequest
from bridge.sv1.messages import (
    FALSE,
    NULL,
    GetVersion,
    Notify,
    Reconnect,
    RequestId,
    Response,
    SetDifficulty,
    SetExtranonce,
    SetVersionMask,
    ShowMessage,
    SubmitParams,
    error_value,
)
from bridge.sv1.messages import Ping as MiningPing
from bridge.sv1.rejects import JOB_NOT_FOUND, OTHER, UNAUTHORIZED
from bridge.sv1.validate import is_hex
from bridge.wire.control import (
    FEATURES,
    FROM_PROXY,
    PROTOCOL_VERSION,
    RM_PARAMS,
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
    Open,
    Ping,
    Pong,
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
from bridge.wire.datagram import DropReason, Probe, Share, ShareBatch
from bridge.wire.limits import Address
from bridge.wire.receiver import Accepted

__all__ = ["AGENT", "DEFAULT_BATCH_WINDOW", "SidecarSession", "SidecarSessionStatistics"]

AGENT: Final = f"stratumrm-sidecar/{__version__}"
#: How long verdicts and notify channel lists are collected before they are written.
DEFAULT_BATCH_WINDOW: Final = 0.002
DEFAULT_MAX_CHANNELS: Final = 16384
DEFAULT_HEARTBEAT: Final = 1.0
DEFAULT_DEAD_AFTER: Final = 5.0
#: Account refusals kept for the driver to log (it takes them after every input).
MAX_PENDING_REFUSALS: Final = 1024

_encode = msgspec.json.Encoder().encode


# ----------------------------------------------------------------- statistics


# msgspec allows a frozen Struct to extend a mutable one (mypy applies the dataclass rule).
class SidecarSessionStatistics(SidecarSessionCounters, frozen=True, kw_only=True):  # type: ignore[misc]
    """A snapshot of one control connection: its counters, and what is open now."""

    channels_open: int = 0
    key_epoch: int = -1


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
        if rekey_after_bad_tags < 1:
            raise ValueError("rekey_after_bad_tags must be at least 1")
        if udp_port is not None and intake is None:
            intake = SidecarIntake()
        self.intake = intake if udp_port is not None else None
        self.udp_port = udp_port
        self.udp_host = udp_host
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.batch_window = batch_window
        self.accounts = frozenset(accounts) if accounts is not None else None
        self.max_channels = max_channels
        self.max_ack_delay = max_ack_delay
        self.agent = agent

        self.close_reason: str | None = None
        self.protocol_error: str | None = None
        self.hello: Hello | None = None
        self.features: tuple[str, ...] = ()
        self._pool_down: str | None = None  # pool-status: why the pool is unreachable, None while up
        self._pool_sent: bool | None = None  # pool-status: the last state sent (None: nothing yet)
        self._udp = False

        self.counters = SidecarSessionCounters()
        """What happened on this connection; the parts below add to it (:meth:`statistics` snapshots it)."""
        self.control = ControlSession(
            peer="proxy", dead_after=dead_after, now=now, silence_note=" (no line, no rm.pong)", counters=self.counters
        )
        """Framing, backlog, heartbeat and liveness of the control connection (shared with the proxy side)."""
        self._commands: list[PoolCommand] = []
        self._refusals: list[Refusal] = []
        self._dirty: dict[int, None] = {}
        self._now = now

        self._channels: dict[int, Channel] = {}
        self.udp_path = SessionUdp(
            self.counters,
            self.intake,
            self,
            self._write,
            randbytes=randbytes,
            rekey_interval=rekey_interval,
            rekey_after_bad_tags=rekey_after_bad_tags,
        )
        """This session's key epochs on the intake and the datagrams it sends."""
        self.jobs = JobTable(self.counters, self._write, batch_window)
        """Job handles, the channels' job tables and the ``rm.notify`` lines being collected (C5)."""
        self.ledger = ShareLedger(self.counters, share_cache_size)
        """The duplicate table: no share reaches the pool twice (C6)."""
        self.verdicts = VerdictSender(
            self.counters, self.udp_path, self._write, batch_window=batch_window, max_ack_delay=max_ack_delay
        )
        """Verdicts of UDP shares on their way back, and the acknowledgements of share datagrams."""

    # ------------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    @property
    def channels_open(self) -> int:
        return len(self._channels)

    @property
    def udp(self) -> bool:
        """True when UDP shares were negotiated."""
        return self._udp

    @property
    def key_epoch(self) -> int:
        """The current key epoch (-1 before the first ``rm.keys``)."""
        return self.udp_path.epoch

    @property
    def channels(self) -> frozenset[int]:
        """A copy of the open channels' numbers (O(channels): :meth:`has_channel` for one)."""
        return frozenset(self._channels)

    def has_channel(self, ch: int) -> bool:
        """Channel ``ch`` is open (what the driver asks after every read from its pool connection)."""
        return ch in self._channels

    def channel_pool(self, ch: int) -> ClientSession | None:
        """The pool-facing session of channel ``ch`` (for the driver's logs and tests)."""
        channel = self._channels.get(ch)
        return None if channel is None else channel.pool

    # ------------------------------------------------------------------ outputs

    def data_to_send(self) -> bytes:
        """Control-channel bytes queued since the last call."""
        return self.control.data_to_send(self._now)

    def datagrams_to_send(self, now: float | None = None) -> list[OutgoingDatagram]:
        """Datagrams to send, each already charged to the session's budget.

        The verdicts collected since the last call are sealed now, as few VERDICT
        datagrams as fit (a verdict that cannot go as a datagram becomes an
        ``rm.results`` entry: take :meth:`data_to_send` after this).
        """
        self.verdicts.take(self._now if now is None else now)
        return self.udp_path.take()

    def datagrams_pending(self) -> bool:
        """Datagrams (or verdicts to seal into them) wait for :meth:`datagrams_to_send`."""
        return self.verdicts.pending or self.udp_path.pending

    def commands(self) -> list[PoolCommand]:
        """Pool-connection commands, in the order they must be carried out."""
        for ch in self._dirty:
            channel = self._channels.get(ch)
            if channel is not None and channel.connected:
                data = channel.pool.data_to_send()
                if data:
                    self.counters.pool_bytes_sent += len(data)
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
        deadline = self.control.get_timer()
        for due in (self.jobs.due, self.verdicts.results_due, self.udp_path.rekey_due, self.verdicts.ack_due):
            if due is not None and due < deadline:
                deadline = due
        return deadline

    # ------------------------------------------------------------------ timers

    def silent_deadline(self) -> float:
        """When the proxy counts as silent unless something is heard from it
        (:class:`~bridge.relay.liveness.PeerSilence`: this process's own lateness is excused)."""
        return self.control.silent_deadline()

    def input_waiting(self, now: float) -> None:
        """The transport holds unread bytes from the proxy: it spoke, this side is behind."""
        self.control.input_waiting(now)

    def peer_acknowledged(self, age: float, now: float) -> None:
        """The proxy's TCP last acknowledged this side's bytes ``age`` seconds ago: recent
        means a busy proxy, not a gone one (:meth:`~bridge.relay.liveness.PeerSilence.acknowledged`)."""
        self.control.peer_acknowledged(age, now)

    def handle_timer(self, now: float, due: float | None = None) -> None:
        """Flush collected lines, send heartbeats, rekey, and notice a silent proxy: the deadline
        ``due`` (what :meth:`get_timer` gave; None: not known) came, and it is ``now``."""
        if self.closed:
            return
        self._now = now
        silent = self.control.silent(now, due)
        if silent is not None:
            self._close(silent)
            return
        if self.jobs.due is not None and now >= self.jobs.due:
            self.jobs.flush()
        self.verdicts.handle_timer(now)
        self.ledger.expire(now)
        rekey_due = self.udp_path.rekey_due
        if rekey_due is not None and now >= rekey_due:
            self.rekey(now)
        self.control.heartbeat_due(now)

    def rekey(self, now: float) -> None:
        """Issue the next key epoch (``rm.keys``); the previous one stays valid for the grace period."""
        if self.closed or not self._udp:
            return
        self._now = now
        self.udp_path.rekey(now)

    # ------------------------------------------------------------------ control input

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the proxy's control connection."""
        if self.closed:
            return
        self._now = now
        try:
            lines = self.control.receive(data, now)
        except LineTooLong as exc:
            self._protocol_violation(ControlSession.too_long(exc))
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
        self._write(encode_rm(PoolStatus(status="up" if up else "down", reason=self._pool_down or "")))

    def go_away(self, deadline: float, reason: str, now: float) -> bool:
        """This sidecar is draining: ask the proxy to move within ``deadline`` seconds (``rm.goaway``).

        False when the proxy did not negotiate ``goaway`` (or has not said hello): it
        only learns of the drain when the connection closes at the deadline.
        """
        self._now = now
        if self.hello is None or self.closed or "goaway" not in self.features:
            return False
        self._write(encode_rm(GoAway(deadline=max(0.0, deadline), reason=reason)))
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
            self._channel_line(message.ch, message)
            return
        if method is UNSET:
            return  # an rm response: the sidecar sends no rm requests, so there is nothing to match
        assert isinstance(method, str)
        if not method.startswith("rm."):
            self._protocol_violation(f'{method!r} without "ch": channel lines need a channel number')
            return
        if method in RM_PARAMS and method not in FROM_PROXY:
            self._protocol_violation(f"{method} is sent by the sidecar, not by a proxy")
            return
        try:
            decoded = decode_params(method, message.params)
        except ControlDecodeError as exc:
            self._protocol_violation(str(exc))
            return
        # every method decodes to its own Struct: the match on the type narrows it
        match decoded:
            case Hello() as hello:
                self._on_hello(hello, message.id)
            case Open() as open_:
                self._on_open(open_)
            case Close() as close:
                channel = self._channels.get(close.ch)
                if channel is not None:
                    self._drop_channel(channel, f"proxy closed the channel: {close.reason or 'rig disconnected'}")
            case Ping() | Pong() as heartbeat:
                self.control.answer(heartbeat)
            case ErrorNotice() as error:
                self._close(f"proxy closed the connection: {error.reason}", tell_proxy=False)
            case Keys() | Job() | NotifyChannels() | Results() | PoolStatus() | GoAway():
                pass  # refused above: sent by the sidecar
            case unknown:
                assert_never(unknown)

    def _on_hello(self, hello: Hello, request_id: RequestId) -> None:
        if self.hello is not None:
            self._protocol_violation("rm.hello sent twice")
            return
        if hello.version != PROTOCOL_VERSION:
            self._write(
                _hello_error(
                    request_id,
                    f"unsupported StratumRM version {hello.version}; this sidecar speaks {PROTOCOL_VERSION}",
                )
            )
            self._close(f"proxy speaks StratumRM version {hello.version}, this sidecar speaks {PROTOCOL_VERSION}")
            return
        self.hello = hello
        self.control.agree(self.heartbeat, self.dead_after)
        offered = set(hello.features)
        # Data channel version 1 is gone: UDP only with a proxy that speaks version 2.
        udp = self.udp_port is not None and "udp-shares" in offered and "udp-v2" in offered
        features = tuple(f for f in FEATURES if f in offered and (f not in ("udp-shares", "udp-v2") or udp))
        self.features = features
        self._udp = udp
        self.jobs.dedup = "job-dedup" in features
        self.verdicts.batch = "batch-verdicts" in features
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
        self._write(encode_rm_result(request_id, result))
        if udp:
            self.udp_path.start(self._now)
        self._send_pool_status()

    def _on_open(self, params: Open) -> None:
        ch = params.ch
        if not 1 <= ch <= MAX_CHANNEL_NUMBER:
            self._protocol_violation(f"rm.open for channel {ch}: channel numbers are 1 to 2^32-1")
            return
        if ch in self._channels:
            self._protocol_violation(f"rm.open for channel {ch}, which is already open (channels are never reused)")
            return
        if len(self._channels) >= self.max_channels:
            self._write(encode_rm(Close(ch=ch, reason=f"too many channels on one connection (limit {self.max_channels})")))
            return
        self._channels[ch] = Channel(ch, params.peer)
        self.counters.channels_opened += 1
        self._commands.append(OpenPool(ch, params.peer))

    # ------------------------------------------------------------------ channel lines

    def _channel_line(self, ch: int, message: ControlLine) -> None:
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
        decoder = RELAYED_DECODERS.get(method)
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
        self._relay_request(channel, method, encode_params(params), message.id)

    def _refuse_request(self, channel: Channel, request_id: Any, method: str, reason: str) -> None:
        """Answer a request the sidecar will not relay with error 20; note it once per method and channel."""
        self.counters.requests_refused += 1
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

    def _authorize(self, channel: Channel, request_id: Any, worker: str) -> bool:
        """Record the worker name (in request order); False when the account is not allowed."""
        if len(channel.workers) < MAX_WORKERS_PER_CHANNEL:
            channel.workers.append(worker)
        if self.accounts is None or account(worker) in self.accounts:
            return True
        self.counters.authorizations_refused += 1
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
                        f"Unauthorized worker: this proxy's certificate does not cover account {account(worker)!r}",
                    ),
                ),
            )
        return False

    def _account_refused(self, channel: Channel, method: str, worker: str) -> None:
        """Note a refusal for the driver's log, once per account and channel."""
        name = account(worker)
        refused = channel.refused_accounts
        if refused is None:
            refused = channel.refused_accounts = set()
        if name in refused or len(refused) >= MAX_WORKERS_PER_CHANNEL:
            return
        refused.add(name)
        if len(self._refusals) < MAX_PENDING_REFUSALS:
            self._refusals.append(AccountRefused(channel.ch, method, worker, name))

    def _relay_request(self, channel: Channel, method: str, params: Raw, request_id: Any) -> None:
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

    def _tls_submit(self, channel: Channel, request_id: Any, params: SubmitParams) -> None:
        self.counters.shares_tls += 1
        if self.accounts is not None and account(params.worker) not in self.accounts:
            self._account_refused(channel, "mining.submit", params.worker)
            self._refuse_tls(channel.ch, request_id, UNAUTHORIZED, "Unauthorized worker")
            return
        key = self._tls_share_key(channel, params)
        found = self.ledger.find(key)
        if found is not None and key is not None:
            self._copy(channel.ch, found, key, None, request_id, False)
            return
        self._forward(channel, key, encode_params(params), None, request_id, False)

    def _tls_share_key(self, channel: Channel, params: SubmitParams) -> ShareKey | None:
        """The duplicate-table key of a TLS submit; None when its fields are not clean hex."""
        if len(params.extranonce2) % 2 or (params.extranonce2 and not is_hex(params.extranonce2)):
            return None
        extranonce2 = bytes.fromhex(params.extranonce2)
        ntime = u32(params.ntime)
        nonce = u32(params.nonce)
        version_bits = None if params.version_bits is None else u32(params.version_bits)
        if ntime is None or nonce is None or (params.version_bits is not None and version_bits is None):
            return None
        handle = channel.jobs.get(params.job_id)
        job_key: int | str = params.job_id if handle is None else handle
        return share_key(channel.ch, job_key, extranonce2, ntime, nonce, version_bits)

    def _udp_share(self, share: Share, ref: UdpRef, urgent: bool) -> None:
        self.counters.shares_udp += 1
        ch = share.channel_id
        channel = self._channels.get(ch)
        if channel is None:
            self._refuse_udp(ref, OTHER, f"channel {ch} is not open")
            return
        job = self.jobs.get(share.job_handle)
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
        if self.accounts is not None and account(worker) not in self.accounts:
            self._account_refused(channel, "mining.submit", worker)
            self._refuse_udp(ref, UNAUTHORIZED, "Unauthorized worker")
            return
        size = channel.pool.extranonce2_size
        if size is not None and len(share.extranonce2) != size:
            self._refuse_udp(ref, OTHER, "Incorrect size of extranonce2")
            return
        key = share_key(ch, handle, share.extranonce2, share.ntime, share.nonce, share.version_bits)
        found = self.ledger.find(key)
        if found is not None:
            self._copy(ch, found, key, ref, None, urgent)
            return
        params: list[Any] = [worker, job.job_id, share.extranonce2.hex(), f"{share.ntime:08x}", f"{share.nonce:08x}"]
        if share.version_bits is not None:
            params.append(f"{share.version_bits:08x}")
        self._forward(channel, key, params, ref, None, urgent)

    def _forward(
        self,
        channel: Channel,
        key: ShareKey | None,
        params: list[Any] | Raw,
        ref: UdpRef | None,
        request_id: RequestId,
        urgent: bool,
    ) -> None:
        entry = ShareEntry(channel.ch, key)
        entry.urgent = urgent
        if urgent:
            self.counters.block_candidates += 1
        entry.wait(ref, request_id)
        try:
            channel.pool.request("mining.submit", params, context=entry)
        except (OverflowError, RuntimeError) as exc:
            message = f"Pool unavailable: {exc}; share not confirmed"
            if ref is not None:
                self._refuse_udp(ref, OTHER, message)
            else:
                self._refuse_tls(channel.ch, request_id, OTHER, message)
            return
        self._dirty[channel.ch] = None
        self.ledger.forwarded_share(entry, self._now)

    def _copy(self, ch: int, found: Any, key: ShareKey, ref: UdpRef | None, request_id: RequestId, urgent: bool) -> None:
        """Another copy of a share in the ledger (``found``: its entry with the pool, or its
        verdict): answered from the cached verdict, or it waits for the pending one."""
        outcome = self.ledger.copy(found, key, ref, request_id, urgent, self._now)
        if outcome is Copy.CACHED:
            if ref is not None:
                self.verdicts.add(ref, found)
            else:
                self._answer_tls(ch, found, request_id)
        elif outcome is Copy.REFUSED and ref is None:
            self._refuse_tls(ch, request_id, OTHER, "too many copies of this share in flight")
        # a refused UDP copy gets no answer; one of the waiting copies will

    def _judged(self, entry: ShareEntry, response: Response) -> None:
        """The pool's verdict for a forwarded share: answer every copy, cache it."""
        verdict, reason = self.ledger.judge(entry, response)
        channel = self._channels.get(entry.ch)
        if channel is not None:
            if reason is None:
                channel.accepted += 1
                channel.accepted_difficulty += channel.difficulty or 1.0
            else:
                channel.rejected += 1
                channel.stale += reason == "stale"
        for ref in entry.udp_refs or ():
            self.verdicts.add(ref, verdict)
        for request_id in entry.tls_ids or ():
            self._answer_tls(entry.ch, verdict, request_id)
        entry.udp_refs = None
        entry.tls_ids = None

    def _answer_tls(self, ch: int, verdict: Any, request_id: RequestId) -> None:
        if request_id is None:
            return
        self.counters.verdicts_tls += 1
        result, error, reject_reason = verdict_fields(verdict)
        self._write_channel(ch, encode_channel_response(ch, request_id, result, error, reject_reason))

    def _refuse_udp(self, ref: UdpRef, code: int, message: str) -> None:
        self.counters.shares_refused += 1
        self.verdicts.add(ref, Verdict(FALSE, error_value(code, message)))

    def _refuse_tls(self, ch: int, request_id: RequestId, code: int, message: str) -> None:
        self.counters.shares_refused += 1
        if request_id is not None:
            self.counters.verdicts_tls += 1
            self._write_channel(ch, encode_channel_response(ch, request_id, FALSE, error_value(code, message)))

    # ------------------------------------------------------------------ datagrams

    def receive_datagram(self, data: bytes, address: Address, now: float) -> IntakeSession | None:
        """Convenience: run a datagram through this session's intake (shared or private)."""
        if self.intake is None:
            return None
        return self.intake.receive_datagram(data, address, now)

    def datagram_accepted(self, accepted: Accepted, now: float) -> None:
        """The intake authenticated a datagram under this session's keys."""
        if self.closed:
            return
        self._now = now
        self.udp_path.accepted(accepted)
        body = accepted.body
        match body:
            case Share():
                self.verdicts.received(accepted.epoch, accepted.header.pn, now)
                self._udp_share(body, (accepted.epoch, accepted.header.pn, 0), accepted.header.urgent)
            case ShareBatch():
                pn = accepted.header.pn
                urgent = accepted.header.urgent
                self.verdicts.received(accepted.epoch, pn, now)
                for index, share in enumerate(body.shares):
                    self._udp_share(share, (accepted.epoch, pn, index), urgent)
            case Probe():
                self.udp_path.answer_probe(body, now)
            case _:
                pass  # PROBE_ACK: the sidecar sends no probes; accepted (it taught the address), nothing to do.
        self._after_input()

    def datagram_dropped(self, reason: DropReason, now: float) -> bool:
        """The intake dropped a datagram under this session's conn_id; True if it rekeyed (output to send)."""
        if self.closed:
            return False
        self._now = now
        return self.udp_path.dropped(reason, now)

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
        self.counters.pool_bytes_received += len(data)
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

    def _pool_event(self, channel: Channel, event: Any) -> None:
        ch = channel.ch
        kind = type(event)
        if kind is Reply:
            context = event.context
            if type(context) is ShareEntry:
                self._judged(context, event.response)
            elif context is not None:
                response = event.response
                self._write_channel(
                    ch, encode_channel_response(ch, context, response.result, response.error, response.reject_reason)
                )
        elif kind is Notify:
            self.jobs.deliver(ch, channel.jobs, event.params, self._now)
        elif kind is SetDifficulty or kind is SetExtranonce or kind is SetVersionMask or kind is ShowMessage:
            if kind is SetDifficulty:
                channel.difficulty = float(event.difficulty)
            method = event.__struct_config__.tag
            self._write_channel(ch, encode_channel_request(ch, None, method, Raw(_encode(event.params))))
        elif kind is Reconnect:
            self._write_channel(ch, encode_channel_request(ch, None, "client.reconnect", event.params))
        elif kind is GetVersion or kind is MiningPing:
            method = event.__struct_config__.tag
            self._write_channel(ch, encode_channel_request(ch, event.id, method, event.params))
        elif kind is UnknownPoolRequest:
            self._write_channel(ch, encode_channel_request(ch, event.id, event.method, event.params))
        elif kind is ProtocolViolation and event.fatal:
            self._end_channel(channel, f"pool protocol violation: {event.reason}")

    # ------------------------------------------------------------------ channel ends

    def _end_channel(self, channel: Channel, reason: str) -> None:
        """The pool side ended the channel: tell the proxy (after what is pending for it)."""
        ch = channel.ch
        self.verdicts.flush_results()
        if self.jobs.pending_for(ch):
            self.jobs.flush()
        self._write(encode_rm(Close(ch=ch, reason=reason)))
        self._drop_channel(channel, reason)

    def _drop_channel(self, channel: Channel, reason: str) -> None:
        ch = channel.ch
        del self._channels[ch]
        self._dirty.pop(ch, None)
        self.counters.channels_closed += 1
        self.jobs.release_all(channel.jobs)
        self._commands.append(ClosePool(ch, reason))

    # ------------------------------------------------------------------ writing and closing

    def _write(self, line: bytes) -> None:
        stuck = self.control.write(line)
        if stuck is not None and not self.closed:
            self._close(stuck, tell_proxy=False)

    def _write_channel(self, ch: int, line: bytes) -> None:
        if self.jobs.pending_for(ch):
            self.jobs.flush()
        self._write(line)

    def _after_input(self) -> None:
        """Lines go out at the end of each input without negotiated batching (verdict
        datagrams when the driver takes them: see :meth:`datagrams_to_send`)."""
        self.verdicts.end_of_input(self._now)
        if self.batch_window == 0:
            self.jobs.flush()
            self.verdicts.flush_results()

    def _protocol_violation(self, reason: str) -> None:
        self.protocol_error = reason
        self._close(f"protocol error: {reason}")

    def _close(self, reason: str, *, tell_proxy: bool = True) -> None:
        if self.closed:
            return
        if tell_proxy:
            self.verdicts.flush_results()
            self.jobs.flush()
            self.control.goodbye(reason)
        self.close_reason = reason
        for channel in list(self._channels.values()):
            self._drop_channel(channel, f"control connection closed: {reason}")
        self.jobs.discard_pending()
        self.verdicts.clear()
        self.ledger.clear()
        self.udp_path.close()

    # ------------------------------------------------------------------ statistics

    def statistics(self) -> SidecarSessionStatistics:
        return SidecarSessionStatistics(**self.counters.values(), channels_open=self.channels_open, key_epoch=self.udp_path.epoch)

    def channel_statuses(self) -> list[ChannelStatus]:
        """The open channels (one per rig at the proxy)."""
        return [channel.status() for channel in list(self._channels.values())]

    def __repr__(self) -> str:
        state = f"closed ({self.close_reason})" if self.closed else f"{len(self._channels)} channels"
        return f"<SidecarSession epoch={self.key_epoch} {state}>"
