"""The proxy side of StratumRM, sans-IO: one control connection, its UDP flow, its channels.

A :class:`StratumRMConnection` is what the miner-side proxy holds toward one
sidecar. Every rig connection becomes an :class:`RMChannel` on it; the channel
implements the upstream-session vocabulary of
:class:`~bridge.relay.miner_channel.MinerChannel` (``subscribe``, ``submit``,
``request``, ``respond_raw``, ``cancel``), so a miner channel cannot tell it from
a plain SV1 pool connection. Events for a channel pile up in ``channel.events``;
the driver hands them to the rig's miner channel after every step.

What crosses the wire is specified in bridge/wire/PROTOCOL.md ("Control
channel"). The parts that are this module's job:

- **Share delivery.** A ``mining.submit`` becomes a binary SHARE record when its
  job has a handle, its worker was authorized on the channel, its hex is lower
  case and UDP is up; otherwise a channel ``mining.submit`` over TLS. Records
  queued in one step go out together as a SHARE_BATCH when the driver calls
  :meth:`datagrams_to_send`. A lone share goes alone, at once. With a
  ``batch_window``, a share that follows a share datagram within that window
  waits until the window ends (a deadline of :meth:`get_timer`), and whatever
  came meanwhile goes in one datagram: batching only delays shares that are
  really concurrent.
- **No share silently lost (data channel v2).** The sidecar acknowledges each
  share datagram, by the VERDICT datagram that carries its verdict or, when the
  pool is slower than the ack delay the sidecar announced (``max_ack_delay``,
  25 ms), by an ACK datagram. The deadline runs on that transport round trip
  (RFC 6298 estimator over pn→acknowledgement samples, which are never ambiguous
  since every copy has its own pn; the ACK's ack delay is subtracted, and every
  deadline adds the announced ack delay as QUIC's PTO does), never below the
  floor that late acknowledgements of copies already sent again measured. An
  unacknowledged share is sent again over UDP with a new packet number, then over
  TLS, which is reliable; without evidence of loss (no datagram sent after it was
  acknowledged, no control line came since: a stalled or slow sidecar), only one
  share goes per expiry, as a probe. An acknowledged
  share whose verdict does not follow within the verdict timeout (its own
  estimator over ack→verdict delays, at least 250 ms) is sent again, so the
  sidecar answers it from its verdict cache, only when a sidecar datagram is
  missing since (a gap in its packet numbers, or none came): a VERDICT that may
  have been lost. The first verdict for any copy settles the share; the
  sidecar's duplicate set makes copies harmless.
- **Fallback.** UDP counts as up once a PROBE is answered. Three timer expiries
  in a row that had to send shares over TLS after their UDP retransmission, with
  no UDP verdict in between, mark it down; it is probed again every
  ``probe_interval`` and comes back on the next PROBE_ACK.
- **Block candidates.** When the share's hash meets the network target of the
  job's nbits (computed here from the job, the channel's extranonce1 and the
  version mask), it goes over UDP with the URGENT flag and over TLS at once.
- **Liveness.** ``rm.ping`` after ``heartbeat`` idle seconds; a sidecar silent
  for ``dead_after`` is dead and every channel ends with explicit errors. Framing,
  the backlog, heartbeat and liveness are the control session's
  (:mod:`bridge.relay.control_session`), the same as the sidecar's.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, assert_never

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

from bridge.errors import LineTooLong
from bridge.mining.share import Job as MiningJob
from bridge.mining.share import roll_version
from bridge.relay.control_session import ControlSession
from bridge.sv1.events import ProtocolViolation, Reply, UnknownPoolRequest
from bridge.sv1.framing import BoundedDecoder, decode_json
from bridge.sv1.messages import (
    FALSE,
    NULL,
    POOL_METHODS,
    TRUE,
    Notify,
    NotifyParams,
    PoolRequest,
    Response,
    SetExtranonce,
    SetVersionMask,
    SubmitParams,
    error_value,
    params_list,
)
from bridge.sv1.validate import check_notify
from bridge.wire import control
from bridge.wire.control import ControlDecodeError, ControlLine
from bridge.wire.datagram import (
    BATCH_MAX_SHARES,
    Ack,
    Probe,
    ProbeAck,
    Share,
    ShareBatch,
    Verdicts,
    expand_pn,
)
from bridge.wire.keys import KeyMaterial, KeySet, Role
from bridge.wire.receiver import Accepted, DatagramReceiver
from bridge.wire.rtt import RttEstimator

_decode_pool_request = BoundedDecoder[PoolRequest](PoolRequest).decode
_encode = msgspec.json.Encoder().encode

JOBS_PER_CHANNEL = 256
MAX_WORKERS_PER_CHANNEL = 256
JOBS_KEPT = 4096
UDP_FAILURES_BEFORE_FALLBACK = 3
DEFAULT_VERSION_MASK = 0x1FFFE000
#: The sidecar's longest wait before it acknowledges a share datagram when its hello
#: result does not say (PROTOCOL.md §2.6, C3); a larger announced value is capped here.
MAX_ACK_DELAY = 0.005
ACK_DELAY_LIMIT = 0.2
#: A late acknowledgement of a copy already sent again (a spurious retransmission: the
#: datagram was late, not lost) raises the retransmission floor to this many times its
#: acknowledgement time; the floor then halves every ``LATE_FLOOR_HALF_LIFE`` seconds.
LATE_FLOOR_MARGIN = 2.0
LATE_FLOOR_HALF_LIFE = 60.0
#: Bounds of the verdict timeout (acknowledged share, no verdict yet: a lost VERDICT).
VERDICT_TIMEOUT_MIN = 0.25
VERDICT_TIMEOUT_INITIAL = 1.0
VERDICT_TIMEOUT_MAX = 10.0
_PLAIN_ACCEPT = Response(None, TRUE, NULL)


class ChannelClosed(Struct, frozen=True):
    """The sidecar ended a channel (pool connection lost or refused)."""

    reason: str


class ConnectionStatistics(Struct, frozen=True):
    ready: bool
    udp_up: bool
    channels: int
    shares: int
    shares_udp: int
    shares_tls: int
    retransmissions_udp: int
    retransmissions_tls: int
    verdict_queries: int
    """Acknowledged shares sent again because their verdict did not follow (lost VERDICT)."""
    acks_received: int
    verdict_datagrams_received: int
    block_candidates: int
    settled: int
    pending: int
    udp_fallbacks: int
    datagrams_sent: int
    datagram_bytes_sent: int
    control_bytes_sent: int
    control_bytes_received: int
    notify_lines: int
    srtt_ms: float | None
    rto_ms: float
    spurious_retransmissions: int = 0
    """Copies sent again whose earlier copy was acknowledged after all (late, not lost)."""
    retransmission_floor_ms: float = 0.0
    """The floor those late acknowledgements put under the retransmission deadline, now."""
    verdict_waits: int = 0
    """Verdict timeouts that asked nothing: every sidecar datagram since the acknowledgement came."""
    probe_waits: int = 0
    """Expired shares not sent again because another one went as the probe to a silent sidecar."""
    datagram_drops: dict[str, int] = {}
    """The sidecar's datagrams this side dropped, by reason (PROTOCOL.md §6); zeros left out."""


class _Share:
    """One rig share on its way: where copies went and who waits for the verdict."""

    __slots__ = (
        "acked",
        "acked_at",
        "channel",
        "context",
        "deadline",
        "first_sent",
        "job",
        "params",
        "record",
        "refs",
        "sent_at",
        "serial",
        "settled",
        "tls_ids",
        "tries",
        "urgent",
    )

    def __init__(self, serial: int, channel: RMChannel, params: SubmitParams, context: Any) -> None:
        self.serial = serial
        self.channel = channel
        self.params = params
        self.context = context
        self.record: Share | None = None
        self.job: int | None = None
        self.tries = 0
        self.sent_at = 0.0
        self.first_sent = 0.0
        self.deadline = 0.0
        self.refs: list[tuple[int, int, int]] = []
        self.tls_ids: list[int] = []
        self.settled = False
        self.urgent = False
        self.acked = False
        self.acked_at = 0.0

    def __lt__(self, other: _Share) -> bool:
        return self.serial < other.serial


class RMChannel:
    """One rig's connection carried over the StratumRM connection (an upstream session)."""

    __slots__ = (
        "_next_id",
        "_pending",
        "ch",
        "closed",
        "connection",
        "events",
        "extranonce1",
        "job_handles",
        "version_mask",
        "workers",
    )

    def __init__(self, connection: StratumRMConnection, ch: int) -> None:
        self.connection = connection
        self.ch = ch
        self.events: list[Any] = []
        self.closed = False
        self._next_id = 1
        self._pending: dict[int, tuple[str, Any]] = {}
        self.workers: list[str] = []
        self.job_handles: dict[str, int] = {}  # oldest first: a dict keeps order at a third of an OrderedDict's size
        self.extranonce1: bytes | None = None
        self.version_mask = DEFAULT_VERSION_MASK

    # ----------------------------------------------------- upstream session API

    def subscribe(self, user_agent: str | None, session_id: str | None = None, context: Any = None) -> int:
        params: list[Any] = []
        if user_agent is not None or session_id is not None:
            params.append(user_agent)
        if session_id is not None:
            params.append(session_id)
        return self.request("mining.subscribe", params, context)

    def request(self, method: str, params: list[Any] | Raw, context: Any = None) -> int:
        if method == "mining.authorize" and isinstance(params, list) and params and isinstance(params[0], str):
            # Worker indexes count every authorize request in order (PROTOCOL.md C6),
            # repeats and refusals included, exactly as the sidecar counts them.
            if len(self.workers) < MAX_WORKERS_PER_CHANNEL:
                self.workers.append(params[0])
        return self._send_request(method, params, context)

    def _send_request(self, method: str, params: list[Any] | Raw, context: Any) -> int:
        request_id = self._next_id
        self._next_id += 1
        self._pending[request_id] = (method, context)
        self.connection._write(control.encode_channel_request(self.ch, request_id, method, params))
        return request_id

    def submit(self, params: SubmitParams, context: Any = None) -> int:
        return self.connection._submit(self, params, context)

    def respond_raw(self, response: Any) -> None:
        self.connection._write(
            control.encode_channel_response(self.ch, response.id, response.result, response.error, response.reject_reason)
        )

    def cancel(self, request_id: int) -> None:
        """Forget a request (its verdict is no longer wanted)."""
        if self._pending.pop(request_id, None) is None:
            self.connection._forget_share(request_id)

    # -------------------------------------------------------------- from wire

    def _response(self, line: ControlLine) -> None:
        pending = self._pending.pop(line.id, None) if type(line.id) is int else None
        if pending is None:
            return
        method, context = pending
        response = Response(line.id, line.result, line.error, line.reject_reason)
        if method == "mining.submit" and isinstance(context, _Share):
            self.connection._settle(context, response, self.connection._now, via_udp=False)
            return
        if method == "mining.subscribe":
            self._learn_extranonce(response)
        elif method == "mining.configure":
            self._learn_mask(response)
        self.events.append(Reply(method, context, response, line.id))

    def _learn_extranonce(self, response: Response) -> None:
        if response.result is UNSET:
            return
        try:
            result = decode_json(response.result)
            self.extranonce1 = bytes.fromhex(result[1])
        except (ValueError, TypeError, IndexError, KeyError, msgspec.DecodeError):
            self.extranonce1 = None

    def _learn_mask(self, response: Response) -> None:
        try:
            result = decode_json(response.result) if response.result is not UNSET else None
            if isinstance(result, dict) and result.get("version-rolling") is True:
                self.version_mask = int(result["version-rolling.mask"], 16)
        except (ValueError, TypeError, KeyError, msgspec.DecodeError):
            pass

    def _notification(self, line: ControlLine, raw_line: bytes) -> None:
        method = line.method
        if isinstance(method, UnsetType):  # a response: the caller hands those to _response
            return
        if method in POOL_METHODS:
            try:
                message = _decode_pool_request(raw_line)
            except msgspec.ValidationError as exc:
                self.events.append(ProtocolViolation(f"malformed {method} from the sidecar: {exc}"))
                return
            if isinstance(message, SetExtranonce) and message.params.extranonce1:
                try:
                    self.extranonce1 = bytes.fromhex(message.params.extranonce1)
                except ValueError:
                    pass
            elif isinstance(message, SetVersionMask):
                try:
                    self.version_mask = int(message.mask, 16)
                except ValueError:
                    pass
            self.events.append(message)
        else:
            request_id = line.id if isinstance(line.id, (int, str)) else None
            self.events.append(UnknownPoolRequest(request_id, method, line.params))

    def _deliver_job(self, handle: int, notify: NotifyParams) -> None:
        handles = self.job_handles
        handles.pop(notify.job_id, None)  # a repeated job id moves to the end, as the newest
        handles[notify.job_id] = handle
        while len(handles) > JOBS_PER_CHANNEL:
            del handles[next(iter(handles))]
        self.events.append(Notify(params=notify))

    def _fail_pending(self, reason: str) -> None:
        self.closed = True
        self._pending.clear()
        self.events.append(ChannelClosed(reason))


class StratumRMConnection:
    """One control connection to a sidecar and the UDP flow that goes with it."""

    def __init__(
        self,
        *,
        agent: str = "stratumrm",
        detect_blocks: bool = True,
        probe_interval: float = 10.0,
        min_rto: float = 0.020,
        initial_rto: float = 0.200,
        max_rto: float = 2.0,
        randbits: Callable[[int], int] | None = None,
        batch_window: float = 0.0,
    ) -> None:
        self.agent = agent
        self.batch_window = batch_window
        """Seconds a share waits for others after a share datagram went out (0: never waits)."""
        self.detect_blocks = detect_blocks
        self.probe_interval = probe_interval
        self.control = ControlSession(peer="sidecar", dead_after=math.inf, now=0.0)
        """Framing, backlog, heartbeat and liveness of the control connection (shared with the sidecar);
        the heartbeat and ``dead_after`` come with the hello result."""
        self._datagrams: list[bytes] = []
        self._queued_records: list[_Share] = []
        self._sealed_at = -math.inf  # when the newest share datagram (not urgent) went out
        self._urgent_records: list[_Share] = []
        self.channels: dict[int, RMChannel] = {}
        self._next_ch = 1
        self._jobs: OrderedDict[int, NotifyParams] = OrderedDict()
        self._mining_jobs: OrderedDict[int, MiningJob] = OrderedDict()
        self._shares: dict[int, _Share] = {}
        self._timeline: list[tuple[float, _Share]] = []  # heap; an entry is stale unless share.deadline matches
        self._refs: dict[tuple[int, int, int], _Share] = {}
        self._flights: dict[tuple[int, int], tuple[float, list[_Share]]] = {}  # unacknowledged datagrams
        self._next_serial = 1
        self.rtt = RttEstimator(min_rto=min_rto, initial_rto=initial_rto, max_rto=max_rto)
        self.verdict_rtt = RttEstimator(
            min_rto=VERDICT_TIMEOUT_MIN, initial_rto=VERDICT_TIMEOUT_INITIAL, max_rto=VERDICT_TIMEOUT_MAX
        )
        self.ready = False
        self.hello: control.HelloResult | None = None
        self.close_reason: str | None = None
        self._keys: KeySet | None = None
        self._receiver = DatagramReceiver(Role.PROXY)
        self._session_key = object()
        self.udp_up = False
        self.pool_up = True
        """False while the sidecar reports its pool unreachable (``rm.pool``, feature pool-status)."""
        self.pool_reason = ""
        self.goaway: control.GoAway | None = None
        """The sidecar is draining (``rm.goaway``, feature goaway): move before ``goaway_by``."""
        self.goaway_by: float | None = None
        self._udp_failures = 0
        self._ack_delay = MAX_ACK_DELAY
        # Loss evidence on the sidecar's datagrams: the next pn expected per key epoch,
        # when one was last found missing, when one was last received.
        self._sidecar_next: dict[int, int] = {}
        self._largest_sent: dict[int, int] = {}  # per key epoch: the pn of the newest share datagram
        self._gap_at = -math.inf
        self._heard_at = -math.inf
        self._acked_sent_at = -math.inf  # when the newest acknowledged share datagram was sent
        self._verdict_waits = 0
        self._probe_waits = 0
        self._late_floor = 0.0
        self._late_floor_at = 0.0
        self._spurious = 0
        self._next_probe: float | None = None
        self._probe_retry = 0.1
        self._probe_id = 0
        self._now = 0.0
        self._randbits = randbits
        # statistics
        self._shares_total = 0
        self._shares_udp = 0
        self._shares_tls = 0
        self._retx_udp = 0
        self._retx_tls = 0
        self._verdict_queries = 0
        self._acks_received = 0
        self._verdicts_received = 0
        self._blocks = 0
        self._settled = 0
        self._fallbacks = 0
        self._datagrams_sent = 0
        self._datagram_bytes = 0
        self._notify_lines = 0

    # ------------------------------------------------------------------ output

    def start(self, now: float) -> None:
        """Queue ``rm.hello``; call once the TLS handshake is done."""
        self._now = now
        self.control.start(now)
        hello = control.Hello(version=control.PROTOCOL_VERSION, features=list(control.FEATURES), agent=self.agent)
        self._write(control.encode_rm(hello, 1))

    def _write(self, line: bytes) -> None:
        stuck = self.control.write(line)
        if stuck is not None:
            self._fail(stuck)

    def data_to_send(self) -> bytes:
        return self.control.data_to_send(self._now)

    def datagrams_to_send(self, now: float | None = None) -> list[bytes]:
        """Seal queued share records (batched) and probes; the driver sends them to the UDP peer.

        ``now`` is when they go out: their retransmission deadlines and RTT samples
        count from it (without it, from the last input this connection saw).
        """
        if now is not None:
            self._now = now
        if self._urgent_records:
            self._seal_records(self._urgent_records, urgent=True)
        if self._queued_records and self._batch_due() is None:
            self._seal_records(self._queued_records, urgent=False)
        datagrams, self._datagrams = self._datagrams, []
        self._datagrams_sent += len(datagrams)
        self._datagram_bytes += sum(len(d) for d in datagrams)
        return datagrams

    def _batch_due(self) -> float | None:
        """When the queued records go out: at once (None) unless a share datagram went out
        less than ``batch_window`` ago and they do not fill a batch yet."""
        if not self.batch_window or len(self._queued_records) >= BATCH_MAX_SHARES:
            return None
        due = self._sealed_at + self.batch_window
        return due if due > self._now else None

    def _seal_records(self, shares: list[_Share], *, urgent: bool) -> None:
        keys = self._keys
        live = [s for s in shares if not s.settled]
        shares.clear()
        now = self._now
        if live and not urgent and keys is not None:
            self._sealed_at = now
        deadline = now + self.retransmission_timeout(now)
        timeline = self._timeline
        if keys is None:
            for share in live:  # no keys (yet): the timer sends them over TLS
                share.deadline = deadline
                heapq.heappush(timeline, (deadline, share))
            return
        sealer = keys.sealer
        epoch = sealer.epoch
        refs = self._refs
        for start in range(0, len(live), BATCH_MAX_SHARES):
            group = live[start : start + BATCH_MAX_SHARES]
            # only shares with a record are queued for UDP (see _submit)
            records = [s.record for s in group if s.record is not None]
            body = records[0] if len(records) == 1 else ShareBatch(tuple(records))
            sealed = sealer.seal(body, urgent=urgent)
            pn = sealed.pn
            if epoch not in self._largest_sent and len(self._largest_sent) >= 2:
                del self._largest_sent[min(self._largest_sent)]  # the proxy accepts one previous epoch
            self._largest_sent[epoch] = pn
            self._flights[(epoch, pn)] = (now, group)
            for index, share in enumerate(group):
                ref = (epoch, pn, index)
                share.refs.append(ref)
                refs[ref] = share
                share.acked = False
                share.sent_at = now
                share.deadline = deadline
                heapq.heappush(timeline, (deadline, share))
            self._datagrams.append(sealed.data)

    def retransmission_timeout(self, now: float) -> float:
        """How long a share datagram may go unacknowledged before its shares are sent again.

        QUIC's PTO: the RTO (RFC 6298 over transport round trips) plus the sidecar's
        announced ``max_ack_delay``, and never less than the floor that late
        acknowledgements of copies already sent again measured (scheduling delays
        of a loaded machine), which halves every ``LATE_FLOOR_HALF_LIFE`` seconds.
        """
        return max(self.rtt.rto + self._ack_delay, self._floor(now))

    def _floor(self, now: float) -> float:
        floor = self._late_floor
        if not floor:
            return 0.0
        decay: float = 0.5 ** (max(0.0, now - self._late_floor_at) / LATE_FLOOR_HALF_LIFE)
        return min(floor * decay, self.rtt.max_rto + self._ack_delay)

    def _late_copy(self, epoch: int, pn: int, flight: tuple[float, list[_Share]], now: float) -> None:
        """Datagram ``pn`` is acknowledged: if its shares were sent again meanwhile, that was spurious."""
        if not (self._retx_udp or self._retx_tls):
            return  # nothing was ever sent again
        sent_at, shares = flight
        for share in shares:
            last = share.refs[-1]
            if (last[0], last[1]) != (epoch, pn) or (share.tls_ids and not share.urgent):
                self._spurious += 1
                late = (now - sent_at) * LATE_FLOOR_MARGIN
                current = self.retransmission_timeout(now)
                if late > current:
                    self._late_floor = late
                    self._late_floor_at = now
                return

    # ---------------------------------------------------------------- channels

    def open_channel(self, peer: str = "") -> RMChannel:
        ch = self._next_ch
        self._next_ch += 1
        channel = RMChannel(self, ch)
        self.channels[ch] = channel
        self._write(control.encode_rm(control.Open(ch=ch, peer=peer)))
        return channel

    def close_channel(self, channel: RMChannel, reason: str = "rig disconnected") -> None:
        if self.channels.pop(channel.ch, None) is None:
            return
        channel.closed = True
        self._write(control.encode_rm(control.Close(ch=channel.ch, reason=reason)))
        for share in [s for s in self._shares.values() if s.channel is channel]:
            self._drop_share(share)

    # ------------------------------------------------------------------ shares

    def _submit(self, channel: RMChannel, params: SubmitParams, context: Any) -> int:
        serial = self._next_serial
        self._next_serial += 1
        share = _Share(serial, channel, params, context)
        self._shares[serial] = share
        self._shares_total += 1
        share.record = self._record_for(channel, params)
        now = self._now
        share.sent_at = share.first_sent = now
        if share.record is not None and self.detect_blocks and self._is_block_candidate(channel, share):
            share.urgent = True
            self._blocks += 1
            self._urgent_records.append(share)
            self._send_tls(share)
            share.tries = 2
        elif share.record is not None and self.udp_up:
            self._queued_records.append(share)
            self._shares_udp += 1
            share.tries = 1
        else:
            self._send_tls(share)
            share.tries = 2
        return serial

    def _record_for(self, channel: RMChannel, params: SubmitParams) -> Share | None:
        handle = channel.job_handles.get(params.job_id)
        if handle is None or params.worker not in channel.workers:
            return None
        en2, ntime, nonce, bits = params.extranonce2, params.ntime, params.nonce, params.version_bits
        if not (en2.islower() or en2.isdigit()) or len(en2) > 16:
            return None
        # the server session normalised ntime and nonce to hex strings (normalise_submit)
        if not isinstance(ntime, str) or not isinstance(nonce, str):
            return None
        for field in (ntime, nonce, bits):
            if field is not None and not (field.islower() or field.isdigit()):
                return None
        index = channel.workers.index(params.worker)
        return Share(
            channel_id=channel.ch,
            job_handle=handle,
            extranonce2=bytes.fromhex(en2),
            ntime=int(ntime, 16),
            nonce=int(nonce, 16),
            version_bits=None if bits is None else int(bits, 16),
            worker_index=index or None,
        )

    def _is_block_candidate(self, channel: RMChannel, share: _Share) -> bool:
        record = share.record
        assert record is not None
        if channel.extranonce1 is None:
            return False
        job = self._mining_job(record.job_handle)
        if job is None:
            return False
        version = job.version_int
        if record.version_bits is not None:
            version = roll_version(version, record.version_bits, channel.version_mask)
        try:
            value = job.share_hash(channel.extranonce1, record.extranonce2, record.ntime, record.nonce, version)
        except ValueError:
            return False
        return value <= job.network_target

    def _mining_job(self, handle: int) -> MiningJob | None:
        job = self._mining_jobs.get(handle)
        if job is None:
            notify = self._jobs.get(handle)
            if notify is None:
                return None
            try:
                job = MiningJob.from_notify_fields(
                    notify.job_id,
                    notify.prevhash,
                    notify.coinb1,
                    notify.coinb2,
                    notify.merkle_branch,
                    notify.version,
                    notify.nbits,
                    notify.ntime,
                )
            except ValueError:
                return None
            self._mining_jobs[handle] = job
            while len(self._mining_jobs) > 64:
                self._mining_jobs.popitem(last=False)
        return job

    def _send_tls(self, share: _Share) -> None:
        self._shares_tls += 1
        request_id = share.channel._send_request("mining.submit", params_list(share.params), share)
        share.tls_ids.append(request_id)

    def _settle(self, share: _Share, response: Response, now: float, *, via_udp: bool) -> None:
        if share.settled:
            return
        share.settled = True
        self._settled += 1
        if via_udp:
            self._udp_failures = 0
            if share.acked and share.tries == 1:
                self.verdict_rtt.observe(now - share.acked_at)
        self._drop_share(share)
        if not share.channel.closed:
            share.channel.events.append(Reply("mining.submit", share.context, response, share.serial))

    def _drop_share(self, share: _Share) -> None:
        share.settled = True
        self._shares.pop(share.serial, None)
        flights = self._flights
        for ref in share.refs:
            self._refs.pop(ref, None)
            flight = flights.get((ref[0], ref[1]))
            if flight is not None and all(s.settled for s in flight[1]):
                del flights[(ref[0], ref[1])]
        for request_id in share.tls_ids:
            share.channel._pending.pop(request_id, None)

    def _forget_share(self, serial: int) -> None:
        share = self._shares.get(serial)
        if share is not None:
            self._drop_share(share)

    def _results(self, results: control.Results, now: float) -> None:
        """Verdicts of UDP shares over TLS (the sidecar's fallback when a VERDICT datagram cannot go)."""
        refs = self._refs
        for epoch, pn, index, verdict in results.v:
            share = refs.get((epoch, pn, index))
            if share is None:
                continue
            self._settle(share, _verdict_response(verdict), now, via_udp=True)

    def _acknowledged(self, epoch: int, pn: int, now: float, *, checked: bool = False) -> float | None:
        """The sidecar received datagram ``pn``: its shares now wait for verdicts only.

        Returns when it was sent, if this is its first acknowledgement.
        """
        flight = self._flights.pop((epoch, pn), None)
        if flight is None:
            return None
        if not checked:
            self._late_copy(epoch, pn, flight, now)
        sent_at, shares = flight
        if sent_at > self._acked_sent_at:
            self._acked_sent_at = sent_at
        deadline = now + self.verdict_rtt.rto
        for share in shares:
            if share.settled or share.acked:
                continue
            share.acked = True
            share.acked_at = now
            share.deadline = deadline
            heapq.heappush(self._timeline, (deadline, share))
        return sent_at

    def _on_ack(self, epoch: int, ack: Ack, now: float) -> None:
        self._acks_received += 1
        self._udp_failures = 0
        flights = self._flights
        largest = ack.ranges[0].high
        sample: float | None = None
        for r in ack.ranges:
            if r.high - r.low < len(flights):
                pns: Any = range(r.high, r.low - 1, -1)
            else:  # a wide range: look only at what is in flight
                pns = [pn for (e, pn) in flights if e == epoch and r.low <= pn <= r.high]
            for pn in pns:
                sent_at = self._acknowledged(epoch, pn, now)
                if sent_at is not None and pn == largest:
                    sample = sent_at
        if sample is not None:
            self.rtt.observe(now - sample, ack.ack_delay_us / 1e6)

    def _on_verdicts(self, epoch: int, verdicts: Verdicts, now: float) -> None:
        self._verdicts_received += 1
        self._udp_failures = 0
        refs = self._refs
        flights = self._flights
        largest = -1
        sample: float | None = None
        acknowledged: list[int] = []
        sent = self._largest_sent.get(epoch)
        if sent is None:
            return  # nothing was ever sent under that key: nothing to name
        for entry in verdicts.entries:
            pn = expand_pn(entry.pn, sent)  # the entry carries the low 32 bits
            if pn is None:
                continue
            flight = flights.get((epoch, pn))
            if flight is not None:
                if not acknowledged or pn != acknowledged[-1]:  # entries of one datagram are adjacent
                    self._late_copy(epoch, pn, flight, now)
                    acknowledged.append(pn)
                if pn > largest:
                    largest, sample = pn, flight[0]
            share = refs.get((epoch, pn, entry.index))
            if share is not None:
                detail = entry.detail
                self._settle(share, _PLAIN_ACCEPT if detail is None else _detail_response(detail), now, via_udp=True)
        for pn in acknowledged:  # the other shares of these datagrams now wait for their verdicts only
            self._acknowledged(epoch, pn, now, checked=True)
        if sample is not None:
            # A verdict acknowledges its datagram; the sidecar sends it within its ack
            # delay or sends an ACK first, so the sample is at most RTT + 5 ms.
            self.rtt.observe(now - sample)

    # ------------------------------------------------------------------- input

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the TLS control connection. Sets :attr:`close_reason` on a fatal error."""
        self._now = now
        try:
            lines = self.control.receive(data, now)
        except LineTooLong as exc:
            self._fail(ControlSession.too_long(exc))
            return
        for raw in lines:
            try:
                self._line(raw, now)
            except ControlDecodeError as exc:
                self._fail(str(exc))
                return
            if self.close_reason is not None:
                return

    def _line(self, raw: bytes, now: float) -> None:
        line = control.decode_line(raw)
        if line.ch is not None:
            channel = self.channels.get(line.ch)
            if channel is None:
                return  # a channel we closed; its last lines cross ours
            if line.is_response:
                channel._response(line)
            else:
                channel._notification(line, raw)
            return
        method = line.method
        if method is UNSET:
            if line.id == 1 and not self.ready:
                self._hello_result(line)
            return
        if not isinstance(method, str) or not method.startswith("rm."):
            raise ControlDecodeError(f"unexpected line from the sidecar: {raw[:120]!r}")
        # every method decodes to its own Struct: the match on the type narrows it
        match control.decode_params(method, line.params):
            case control.Job() as job:
                self._notify_lines += 1
                try:
                    check_notify(job.notify)
                except ValueError as exc:
                    raise ControlDecodeError(f"rm.job with a bad notify: {exc}") from None
                self._jobs[job.job] = job.notify
                while len(self._jobs) > JOBS_KEPT:
                    self._jobs.popitem(last=False)
            case control.NotifyChannels() as notify_channels:
                self._notify_lines += 1
                notify = self._jobs.get(notify_channels.job)
                if notify is None:
                    raise ControlDecodeError(f"rm.notify for unknown job {notify_channels.job}")
                for ch in notify_channels.ch:
                    channel = self.channels.get(ch)
                    if channel is not None:
                        channel._deliver_job(notify_channels.job, notify)
            case control.Results() as results:
                self._results(results, now)
            case control.Keys() as keys:
                self._new_keys(keys, now)
            case control.Close() as close:
                channel = self.channels.pop(close.ch, None)
                if channel is not None:
                    for share in [s for s in self._shares.values() if s.channel is channel]:
                        self._drop_share(share)
                    channel._fail_pending(f"sidecar closed the channel: {close.reason}")
            case control.Ping() | control.Pong() as heartbeat:
                self.control.answer(heartbeat)
            case control.ErrorNotice() as error:
                self._fail(f"sidecar error: {error.reason}")
            case control.PoolStatus() as pool:
                self.pool_up = pool.status != "down"
                self.pool_reason = pool.reason
            case control.GoAway() as goaway:
                if self.goaway is None:
                    self.goaway = goaway
                    self.goaway_by = now + goaway.deadline
            case control.Hello() | control.Open():
                raise ControlDecodeError(f"{method} is not for the proxy")
            case unknown:
                assert_never(unknown)

    def _hello_result(self, line: ControlLine) -> None:
        if bytes(line.error) != b"null" or line.result is UNSET:
            self._fail(f"sidecar refused rm.hello: {bytes(line.error).decode(errors='replace')}")
            return
        try:
            self.hello = decode_json(line.result, type=control.HelloResult)
        except msgspec.DecodeError as exc:
            raise ControlDecodeError(f"bad rm.hello result: {exc}") from None
        if self.hello.version != control.PROTOCOL_VERSION:
            self._fail(f"sidecar speaks StratumRM {self.hello.version}, this proxy speaks {control.PROTOCOL_VERSION}")
            return
        if self.hello.udp_port and "udp-v2" not in self.hello.features:
            # A sidecar that only speaks data channel version 1: shares go over TLS.
            self.hello = msgspec.structs.replace(self.hello, udp_port=None)
        self.control.agree(self.hello.heartbeat, self.hello.dead_after)
        ack_delay = self.hello.max_ack_delay
        self._ack_delay = min(ack_delay, ACK_DELAY_LIMIT) if ack_delay >= 0 else MAX_ACK_DELAY
        self.ready = True

    def _new_keys(self, keys: control.Keys, now: float) -> None:
        try:
            material = KeyMaterial(int(keys.conn_id, 16), keys.epoch, bytes.fromhex(keys.secret))
        except ValueError as exc:
            raise ControlDecodeError(f"bad rm.keys: {exc}") from None
        key_set = KeySet.derive(material, Role.PROXY)
        if self._keys is None:
            self._receiver.add_session(self._session_key, key_set.opener)
        else:
            self._receiver.rekey(self._session_key, key_set.opener, now)
        self._keys = key_set
        if not self.udp_up:
            self.probe(now)

    def receive_datagram(self, data: bytes, address: Any, now: float) -> None:
        self._now = now
        result = self._receiver.receive(data, address, now)
        if type(result) is not Accepted:
            return
        epoch, pn = result.epoch, result.header.pn
        expected = self._sidecar_next.get(epoch, 0)
        if pn >= expected:
            if pn > expected:
                self._gap_at = now  # a sidecar datagram is missing (lost, or late)
            self._sidecar_next[epoch] = pn + 1
            if len(self._sidecar_next) > 2:
                del self._sidecar_next[min(self._sidecar_next)]
        self._heard_at = now
        body = result.body
        if isinstance(body, Verdicts):
            self._on_verdicts(result.epoch, body, now)
        elif isinstance(body, Ack):
            self._on_ack(result.epoch, body, now)
        elif isinstance(body, ProbeAck):
            if not self.udp_up:
                self.udp_up = True
                self._udp_failures = 0
                self._next_probe = None
                self._probe_retry = 0.1

    def probe(self, now: float) -> None:
        """Send a PROBE now; unanswered, it is repeated after 0.1, 0.2, 0.4 … s up to ``probe_interval``."""
        if self._keys is None:
            return
        self._probe_id = (self._probe_id + 1) & 0xFFFFFFFF
        self._datagrams.append(self._keys.sealer.seal(Probe(self._probe_id)).data)
        self._next_probe = now + self._probe_retry
        self._probe_retry = min(self._probe_retry * 2, self.probe_interval)

    def _udp_down(self, now: float) -> None:
        self.udp_up = False
        self._fallbacks += 1
        self._udp_failures = 0
        self._probe_retry = self.probe_interval
        self._next_probe = now + self.probe_interval

    def _fail(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason

    def close(self, reason: str, now: float) -> None:
        """Close deliberately for ``reason`` (the proxy stops, or moved its rigs away); the first reason stays."""
        self._now = max(self._now, now)
        self._fail(reason)

    def connection_lost(self, reason: str, now: float) -> None:
        """The control connection is gone: every channel ends."""
        self._now = max(self._now, now)
        self._fail(reason)
        for channel in list(self.channels.values()):
            channel._fail_pending(f"StratumRM connection lost: {reason}")
        self.channels.clear()
        self._shares.clear()
        self._refs.clear()
        self._flights.clear()
        self._timeline.clear()

    # -------------------------------------------------------------------- time

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due; None: nothing is."""
        timeline = self._timeline
        while timeline and (timeline[0][1].settled or timeline[0][1].deadline != timeline[0][0]):
            heapq.heappop(timeline)
        candidates = [t for t in (self._next_probe,) if t is not None]
        batch_due = self._batch_due() if self._queued_records else None
        if batch_due is not None:
            candidates.append(batch_due)
        if timeline:
            candidates.append(timeline[0][0])
        if self.hello is not None:
            candidates.append(self.control.get_timer())  # the heartbeat and the sidecar's silence
        return min(candidates) if candidates else None

    def silent_deadline(self) -> float:
        """When the sidecar counts as silent unless something is heard from it
        (:class:`~bridge.relay.liveness.PeerSilence`: this process's own lateness is excused)."""
        return self.control.silent_deadline() if self.hello is not None else math.inf

    def input_waiting(self, now: float) -> None:
        """The transport holds unread bytes from the sidecar: it spoke, this side is behind."""
        self.control.input_waiting(now)

    def peer_acknowledged(self, age: float, now: float) -> None:
        """The sidecar's TCP last acknowledged this side's bytes ``age`` seconds ago: recent
        means a busy sidecar, not a gone one (:meth:`~bridge.relay.liveness.PeerSilence.acknowledged`)."""
        if self.hello is not None:
            self.control.peer_acknowledged(age, now)

    def handle_timer(self, now: float, due: float | None = None) -> None:
        """The deadline ``due`` (what :meth:`get_timer` gave; None: not known) came; it is ``now``."""
        self._now = now
        if self.hello is not None:
            silent = self.control.silent(now, due)
            if silent is not None:
                self._fail(silent)
                return
            self.control.heartbeat_due(now)
        if self._next_probe is not None and now >= self._next_probe:
            self.probe(now)
        timeline = self._timeline
        lost = False
        overdue = False
        escalated = False
        probed = False
        waiting: list[_Share] = []
        verdict_waiting: list[_Share] = []
        # Loss evidence, as QUIC's (RFC 9002 §6.1): the sidecar acknowledged a datagram
        # sent after the share's, or spoke on the control channel since it was sent.
        acked_after = self._acked_sent_at
        spoke_at = self.control.last_heard
        while timeline and timeline[0][0] <= now:
            deadline, share = heapq.heappop(timeline)
            if share.settled or share.deadline != deadline:
                continue  # settled, or re-armed since (acknowledged, sent again)
            share.deadline = 0.0
            if share.acked:
                if self._heard_at > share.acked_at and self._gap_at < share.first_sent:
                    # No sidecar datagram went missing since the share was first sent (so
                    # none that could have carried its verdict), and one came after the
                    # acknowledgement: the pool has not answered yet. Keep waiting.
                    self._verdict_waits += 1
                    share.deadline = now + self.verdict_rtt.rto
                    heapq.heappush(timeline, (share.deadline, share))
                    continue
                # Received by the sidecar, but no verdict within the verdict timeout and
                # a sidecar datagram is missing (or none came since): the VERDICT may be
                # lost. Ask again; the sidecar answers from its verdict cache or joins
                # the pending share. A sidecar silent since the acknowledgement (no
                # datagram, no line) is stalled: one share asks, as a probe.
                if share.acked_at >= self._heard_at and share.acked_at >= self.control.last_heard:
                    if probed:
                        self._probe_waits += 1
                        verdict_waiting.append(share)
                        continue
                    probed = True
                self._verdict_queries += 1
                overdue = True
            else:
                if acked_after < share.sent_at and spoke_at < share.sent_at:
                    # No evidence of loss: nothing sent later was acknowledged (the
                    # sidecar reads its datagrams in order) and no control line came
                    # since. A stalled peer (a garbage collection, a descheduled process,
                    # a backlog) or a dead path, not one lost datagram: one share goes
                    # again per expiry, as QUIC's PTO sends one probe; the others wait
                    # for the acknowledgements the probe draws.
                    if probed:
                        self._probe_waits += 1
                        waiting.append(share)
                        continue
                    probed = True
                lost = True
            if share.tries == 1 and self.udp_up and share.record is not None:
                self._retx_udp += 1
                self._queued_records.append(share)  # new pn; armed again when sealed
            elif not share.tls_ids:
                self._retx_tls += 1
                escalated = escalated or share.record is not None
                self._send_tls(share)
            else:
                continue  # over TLS already: TCP delivers it; the rig's timeout bounds the wait
            share.tries += 1
        if escalated and self.udp_up:
            # A timer expiry that had to fall back to TLS after a UDP retransmission;
            # several in a row with no UDP acknowledgement in between mean UDP is blocked.
            self._udp_failures += 1
            if self._udp_failures >= UDP_FAILURES_BEFORE_FALLBACK:
                self._udp_down(now)
        if lost:
            self.rtt.on_timeout()  # one back-off per timer expiry, however many shares it covers
        if overdue:
            self.verdict_rtt.on_timeout()
        for shares, timeout in ((waiting, self.retransmission_timeout(now)), (verdict_waiting, self.verdict_rtt.rto)):
            for share in shares:
                share.deadline = now + timeout
                heapq.heappush(timeline, (share.deadline, share))

    @property
    def last_received(self) -> float:
        """When the sidecar last sent anything (it pings every ``heartbeat``): the link's own liveness."""
        return self.control.last_heard

    def statistics(self) -> ConnectionStatistics:
        rtt = self.rtt
        return ConnectionStatistics(
            ready=self.ready,
            udp_up=self.udp_up,
            channels=len(self.channels),
            shares=self._shares_total,
            shares_udp=self._shares_udp,
            shares_tls=self._shares_tls,
            retransmissions_udp=self._retx_udp,
            retransmissions_tls=self._retx_tls,
            verdict_queries=self._verdict_queries,
            acks_received=self._acks_received,
            verdict_datagrams_received=self._verdicts_received,
            block_candidates=self._blocks,
            settled=self._settled,
            pending=len(self._shares),
            udp_fallbacks=self._fallbacks,
            datagrams_sent=self._datagrams_sent,
            datagram_bytes_sent=self._datagram_bytes,
            control_bytes_sent=self.control.bytes_sent,
            control_bytes_received=self.control.bytes_received,
            notify_lines=self._notify_lines,
            srtt_ms=None if rtt.srtt is None else rtt.srtt * 1000,
            rto_ms=rtt.rto * 1000,
            spurious_retransmissions=self._spurious,
            retransmission_floor_ms=self._floor(self._now) * 1000,
            verdict_waits=self._verdict_waits,
            probe_waits=self._probe_waits,
            datagram_drops={reason: count for reason, count in self._receiver.statistics().dropped.items() if count},
        )


def _verdict_response(verdict: Any) -> Response:
    """A verdict as the sidecar reports it (``1`` or the pool's response without id) as a Response."""
    if verdict == control.ACCEPTED_VERDICT and type(verdict) is int:
        return _PLAIN_ACCEPT
    if isinstance(verdict, dict):
        result = verdict.get("result", UNSET)
        reason = verdict.get("reject-reason", UNSET)
        return Response(
            None,
            UNSET if result is UNSET else Raw(_encode(result)),
            Raw(_encode(verdict.get("error"))),
            reason if isinstance(reason, str) else UNSET,
        )
    return Response(None, FALSE, error_value(20, "unreadable verdict from the sidecar"))


def _detail_response(detail: bytes) -> Response:
    """The DETAIL of a VERDICT entry (the pool's response object, JSON) as a Response."""
    try:
        verdict = decode_json(detail)
    except msgspec.DecodeError:
        verdict = None
    return _verdict_response(verdict)
