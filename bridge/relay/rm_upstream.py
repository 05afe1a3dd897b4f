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

- **Share records.** A ``mining.submit`` becomes a binary SHARE record when its
  job has a handle, its worker was authorized on the channel and its hex is lower
  case; otherwise it can only go as a channel ``mining.submit`` over TLS.
- **Block candidates.** When the share's hash meets the network target of the
  job's nbits (computed here from the job, the channel's extranonce1 and the
  version mask), it goes over UDP with the URGENT flag and over TLS at once.
- **Delivery.** Batching, retransmission on the transport round trip, the verdict
  timeout, UDP/TLS escalation and probing are :mod:`bridge.wire.delivery`
  (:class:`~bridge.wire.delivery.ShareDelivery`, :attr:`StratumRMConnection.delivery`).
- **Liveness.** ``rm.ping`` after ``heartbeat`` idle seconds; a sidecar silent
  for ``dead_after`` is dead and every channel ends with explicit errors. Framing,
  the backlog, heartbeat and liveness are the control session's
  (:mod:`bridge.relay.control_session`), the same as the sidecar's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, assert_never

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

from bridge.bounded import BoundedMap, RecentKeys
from bridge.errors import LineTooLong
from bridge.mining.share import Job as MiningJob
from bridge.mining.share import roll_version
from bridge.relay.control_session import ControlSession
from bridge.sv1.events import ProtocolViolation, Reply, UnknownPoolRequest
from bridge.sv1.framing import BoundedDecoder, decode_json
from bridge.sv1.messages import (
    POOL_METHODS,
    Notify,
    NotifyParams,
    PoolRequest,
    Response,
    SetExtranonce,
    SetVersionMask,
    SubmitParams,
    params_list,
)
from bridge.sv1.validate import check_notify
from bridge.wire import control
from bridge.wire.control import ControlDecodeError, ControlLine
from bridge.wire.datagram import (
    Share,
)
from bridge.wire.delivery import PendingShare, ShareDelivery
from bridge.wire.keys import KeyMaterial, KeySet, Role
from bridge.wire.receiver import Accepted, DatagramReceiver

_decode_pool_request = BoundedDecoder[PoolRequest](PoolRequest).decode
_encode = msgspec.json.Encoder().encode

#: The job handles the proxy remembers per channel (PROTOCOL.md C5): the last 8. A share
#: for an older job goes over TLS by its job id; the sidecar remembers more (64), so a
#: handle the proxy sends is one it still knows.
JOBS_PER_CHANNEL = 8
MAX_WORKERS_PER_CHANNEL = 256
JOBS_KEPT = 4096
#: Jobs kept in mining form (header parts) for the block-candidate check of shares.
MINING_JOBS_KEPT = 64
DEFAULT_VERSION_MASK = 0x1FFFE000


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
    datagrams_received: int = 0
    """Datagrams that came from the sidecar (dropped ones included)."""
    redundant_copies: int = 0
    """Share datagrams sent a second time, identical, because the path loses 1 % or more (§9.1)."""
    loss_percent: float = 0.0
    """The path's estimated datagram loss rate (§9.1), percent."""


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
        self.job_handles: RecentKeys[str, int] = RecentKeys(JOBS_PER_CHANNEL)
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
        if self._forget(request_id) is None:
            self.connection.delivery.forget(request_id)

    def _forget(self, request_id: int) -> tuple[str, Any] | None:
        """Take a request out of :attr:`_pending`; an emptied dict is replaced by a fresh one
        (a dict keeps its grown table, and a channel's requests are nearly all answered)."""
        pending = self._pending
        found = pending.pop(request_id, None) if pending else None
        if found is not None and not pending:
            self._pending = {}
        return found

    # -------------------------------------------------------------- from wire

    def _response(self, line: ControlLine) -> None:
        pending = self._forget(line.id) if type(line.id) is int else None
        if pending is None:
            return
        method, context = pending
        response = Response(line.id, line.result, line.error, line.reject_reason)
        if method == "mining.submit" and isinstance(context, PendingShare):
            self.connection.delivery.settle_tls(context, response)
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
        self.job_handles.put(notify.job_id, handle)  # a repeated job id moves to the end, as the newest
        self.events.append(Notify(params=notify))

    def _fail_pending(self, reason: str) -> None:
        self.closed = True
        self._pending = {}
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
        self.detect_blocks = detect_blocks
        self.control = ControlSession(peer="sidecar", dead_after=math.inf, now=0.0)
        """Framing, backlog, heartbeat and liveness of the control connection (shared with the sidecar);
        the heartbeat and ``dead_after`` come with the hello result."""
        self.delivery = ShareDelivery(
            self,
            probe_interval=probe_interval,
            min_rto=min_rto,
            initial_rto=initial_rto,
            max_rto=max_rto,
            batch_window=batch_window,
        )
        """The shares on their way: batching, retransmission, UDP/TLS escalation, probing."""
        self.channels: dict[int, RMChannel] = {}
        self._next_ch = 1
        self._jobs: BoundedMap[int, NotifyParams] = BoundedMap(JOBS_KEPT)
        self._mining_jobs: BoundedMap[int, MiningJob] = BoundedMap(MINING_JOBS_KEPT)
        self._next_serial = 1
        self.ready = False
        self.hello: control.HelloResult | None = None
        self.close_reason: str | None = None
        self._keys: KeySet | None = None
        self._receiver = DatagramReceiver(Role.PROXY)
        self._session_key = object()
        self.pool_up = True
        """False while the sidecar reports its pool unreachable (``rm.pool``, feature pool-status)."""
        self.pool_reason = ""
        self.goaway: control.GoAway | None = None
        """The sidecar is draining (``rm.goaway``, feature goaway): move before ``goaway_by``."""
        self.goaway_by: float | None = None
        self._randbits = randbits
        self._notify_lines = 0

    # ------------------------------------------------------------------ output

    def start(self, now: float) -> None:
        """Queue ``rm.hello``; call once the TLS handshake is done."""
        self.delivery.now = now
        self.control.start(now)
        hello = control.Hello(version=control.PROTOCOL_VERSION, features=list(control.FEATURES), agent=self.agent)
        self._write(control.encode_rm(hello, 1))

    def _write(self, line: bytes) -> None:
        stuck = self.control.write(line)
        if stuck is not None:
            self._fail(stuck)

    def data_to_send(self) -> bytes:
        return self.control.data_to_send(self.delivery.now)

    def datagrams_to_send(self, now: float | None = None) -> list[bytes]:
        """Seal queued share records (batched) and probes; the driver sends them to the UDP peer.

        ``now`` is when they go out: their retransmission deadlines and RTT samples
        count from it (without it, from the last input this connection saw).
        """
        if now is not None:
            self.delivery.now = now
        return self.delivery.take_datagrams()

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
        self.delivery.drop_channel(channel)

    # ------------------------------------------------------------------ shares

    def _submit(self, channel: RMChannel, params: SubmitParams, context: Any) -> int:
        serial = self._next_serial
        self._next_serial += 1
        share = PendingShare(serial, channel, params, context)
        share.record = self._record_for(channel, params)
        share.urgent = share.record is not None and self.detect_blocks and self._is_block_candidate(channel, share)
        self.delivery.send(share)
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

    def _is_block_candidate(self, channel: RMChannel, share: PendingShare) -> bool:
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
        return job

    # ------------------------------------------------- the delivery's owner

    def send_tls(self, share: PendingShare) -> None:
        """Send ``share`` as a channel ``mining.submit`` (the delivery's TLS path)."""
        channel: RMChannel = share.channel
        share.tls_ids.append(channel._send_request("mining.submit", params_list(share.params), share))

    def deliver_verdict(self, share: PendingShare, response: Response) -> None:
        """The delivery settled ``share``: its rig gets the pool's verdict."""
        channel: RMChannel = share.channel
        if not channel.closed:
            channel.events.append(Reply("mining.submit", share.context, response, share.serial))

    def release(self, share: PendingShare) -> None:
        """The delivery dropped ``share``: its TLS requests are forgotten."""
        channel: RMChannel = share.channel
        for request_id in share.tls_ids:
            channel._forget(request_id)

    # ------------------------------------------------------------------- input

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the TLS control connection. Sets :attr:`close_reason` on a fatal error."""
        self.delivery.now = now
        try:
            lines = self.control.receive(data, now)
        except LineTooLong as exc:
            self._fail(ControlSession.too_long(exc), tell_sidecar=True)
            return
        for raw in lines:
            try:
                self._line(raw, now)
            except ControlDecodeError as exc:
                self._fail(str(exc), tell_sidecar=True)
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
                self.delivery.results(results, now)
            case control.Keys() as keys:
                self._new_keys(keys, now)
            case control.Close() as close:
                channel = self.channels.pop(close.ch, None)
                if channel is not None:
                    self.delivery.drop_channel(channel)
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
            self._fail(
                f"sidecar speaks StratumRM {self.hello.version}, this proxy speaks {control.PROTOCOL_VERSION}", tell_sidecar=True
            )
            return
        if self.hello.udp_port and "udp-v2" not in self.hello.features:
            # A sidecar that only speaks data channel version 1: shares go over TLS.
            self.hello = msgspec.structs.replace(self.hello, udp_port=None)
        self.control.agree(self.hello.heartbeat, self.hello.dead_after)
        self.delivery.announced_ack_delay(self.hello.max_ack_delay)
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
        self.delivery.new_keys(key_set.sealer, now)

    def receive_datagram(self, data: bytes, address: Any, now: float) -> None:
        self.delivery.now = now
        result = self._receiver.receive(data, address, now)
        if type(result) is not Accepted:
            return
        self.delivery.receive(result, now)

    @property
    def udp_up(self) -> bool:
        """Shares go over UDP (a PROBE was answered, and UDP has not failed since)."""
        return self.delivery.udp_up

    def probe(self, now: float) -> None:
        """Send a PROBE now; unanswered, it is repeated after 0.1, 0.2, 0.4 … s up to ``probe_interval``."""
        self.delivery.probe(now)

    def _fail(self, reason: str, *, tell_sidecar: bool = False) -> None:
        """The connection is over for ``reason`` (the first one stays); ``tell_sidecar``: a
        deliberate close, said with ``rm.error`` (C9) in place of anything still queued."""
        if self.close_reason is None:
            self.close_reason = reason
            if tell_sidecar:
                self.control.goodbye(reason, drop_queued=True)
            else:  # the sidecar is gone, silent or stuck: nothing more goes to it
                self.control.drop_queued()

    def close(self, reason: str, now: float) -> None:
        """Close deliberately for ``reason`` (the proxy stops, or moved its rigs away); the first reason stays.

        The sidecar is told why with ``rm.error``; the driver sends it before the close."""
        self.delivery.now = max(self.delivery.now, now)
        self._fail(reason, tell_sidecar=True)

    def connection_lost(self, reason: str, now: float) -> None:
        """The control connection is gone: every channel ends."""
        self.delivery.now = max(self.delivery.now, now)
        self._fail(reason)
        for channel in list(self.channels.values()):
            channel._fail_pending(f"StratumRM connection lost: {reason}")
        self.channels.clear()
        self.delivery.clear()

    # -------------------------------------------------------------------- time

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due; None: nothing is."""
        due = self.delivery.get_timer()
        if self.hello is not None:
            control = self.control.get_timer()  # the heartbeat and the sidecar's silence
            if due is None or control < due:
                due = control
        return due

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
        self.delivery.now = now
        if self.hello is not None:
            silent = self.control.silent(now, due)
            if silent is not None:
                self._fail(silent)
                return
            self.control.heartbeat_due(now)
        self.delivery.handle_timer(now, self.control.last_heard)

    @property
    def last_received(self) -> float:
        """When the sidecar last sent anything (it pings every ``heartbeat``): the link's own liveness."""
        return self.control.last_heard

    def statistics(self) -> ConnectionStatistics:
        received = self._receiver.statistics()
        delivery = self.delivery
        rtt = delivery.rtt
        return ConnectionStatistics(
            ready=self.ready,
            udp_up=delivery.udp_up,
            channels=len(self.channels),
            shares=delivery.shares_total,
            shares_udp=delivery.shares_udp,
            shares_tls=delivery.shares_tls,
            retransmissions_udp=delivery.retx_udp,
            retransmissions_tls=delivery.retx_tls,
            verdict_queries=delivery.verdict_queries,
            acks_received=delivery.acks_received,
            verdict_datagrams_received=delivery.verdicts_received,
            block_candidates=delivery.blocks,
            settled=delivery.settled,
            pending=len(delivery.shares),
            udp_fallbacks=delivery.fallbacks,
            datagrams_sent=delivery.datagrams_sent,
            datagram_bytes_sent=delivery.datagram_bytes,
            control_bytes_sent=self.control.counters.control_bytes_sent,
            control_bytes_received=self.control.counters.control_bytes_received,
            notify_lines=self._notify_lines,
            srtt_ms=None if rtt.srtt is None else rtt.srtt * 1000,
            rto_ms=rtt.rto * 1000,
            spurious_retransmissions=delivery.spurious,
            retransmission_floor_ms=delivery.retransmission_floor(delivery.now) * 1000,
            verdict_waits=delivery.verdict_waits,
            probe_waits=delivery.probe_waits,
            datagram_drops={reason: count for reason, count in received.dropped.items() if count},
            datagrams_received=received.datagrams,
            redundant_copies=delivery.redundant_copies,
            loss_percent=delivery.loss.rate * 100,
        )
