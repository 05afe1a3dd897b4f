"""Synthetic Stratum V1 load: miners that submit pre-computed valid shares at a set rate.

Real hashing reaches about 1.7 MH/s per core in Python, far too slow to offer tens of
thousands of shares a second. These miners skip the hashing: the benchmark runs the
reference pool at a difficulty so low that every header hash meets the share target
(any difficulty under ~1.5e-10 clamps to the largest target), so every share is valid
and the pool still checks each one for real (job, extranonce2 size, ntime, duplicate,
hash). What a miner needs to submit a distinct share is a fresh (extranonce2, nonce)
pair on its current job; the benchmark hands out nonces from one counter for all its
miners, so every share of a run is distinct and its nonce names it (the pool's receipt
times are matched to send times by nonce).

On the wire each miner behaves like cgminer 4.11: ``mining.subscribe
["cgminer/4.11.1"]`` (id 0), ``mining.authorize [worker, "x"]`` (id 1) after the
subscribe result, submits in cgminer's key order and spacing
(``{"params": [...], "id": N, "method": "mining.submit"}``), no version rolling. It
takes every ``mining.notify`` and submits on the newest job.

:class:`SyntheticMiner` is sans-IO (bytes in, bytes out, times passed in);
:class:`LoadConnection` is its trio driver over TCP or TLS, and :class:`LoadGenerator`
paces submits over many connections: every tick (trio's timer resolution, about a
millisecond) it sends the shares that became due at the offered rate, round-robin
over the connections. A share's send time is taken just before the write that
carries it; its verdict time when the reply is read.
"""

from __future__ import annotations

import itertools
import math
import random
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio
from msgspec import UNSET, Raw, Struct, UnsetType

from bridge.net.tcp import close_quietly, open_stream
from bridge.sv1.framing import BoundedDecoder
from bridge.sv1.messages import NULL, NotifyParams

CGMINER_USER_AGENT = "cgminer/4.11.1"
RECEIVE_SIZE = 65536
_SUBSCRIBE_ID = 0
_AUTHORIZE_ID = 1
_TRUE = b"true"
_NULL = b"null"
_SUBMIT_LINE = b'{"params": ["%s", "%s", "%s", "%s", "%08x"], "id": %d, "method": "mining.submit"}\n'


class _PoolLine(Struct, frozen=True):
    """Any line from the pool: a response or a request/notification."""

    id: Any = None
    method: str | None = None
    params: Raw = Raw(b"[]")
    result: Raw | UnsetType = UNSET
    error: Raw = NULL


_decode_pool_line = BoundedDecoder(_PoolLine).decode
_decode_notify = BoundedDecoder(NotifyParams).decode
_decode_subscribe_result = BoundedDecoder(tuple[Any, str, int]).decode


class LoadError(Exception):
    """A synthetic miner could not get going (refused subscribe or authorize, closed connection)."""


class SyntheticMiner:
    """One cgminer-like connection that submits shares on demand (sans-IO).

    Feed the pool's bytes to :meth:`receive_data`; :meth:`submit` queues a share on
    the current job; :meth:`data_to_send` takes the queued lines and
    :meth:`mark_sent` stamps the shares in them with the send time. Verdict
    counters and, while :attr:`recording`, the submit→verdict round trips and the
    send time of every nonce are kept here.
    """

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self._worker = worker.encode()
        self.extranonce1: str | None = None
        self.extranonce2_size = 0
        self.authorized = False
        self.failure: str | None = None
        self.job_id: bytes | None = None
        self.job_ntime: bytes = b""
        self.jobs_received = 0
        self.clean_jobs_received = 0
        self._lines = bytearray()
        self._out: list[bytes] = []
        self._next_id = 2
        self._unstamped: list[tuple[int, int]] = []
        self.pending: dict[int, float] = {}
        self.submitted = 0
        self.accepted = 0
        self.rejected = 0
        self.reject_reasons: Counter[str] = Counter()
        self.recording = False
        self.round_trips: list[float] = []
        self.send_times: dict[int, float] = {}
        self.verdict_times: dict[int, float] = {}
        self._serial_of: dict[int, int] = {}
        #: Closed loop: keep this many shares in flight (a new one per verdict); 0 = off.
        self.in_flight = 0
        self.serials: Iterator[int] | None = None
        self._en2_width = 0
        self._out.append(b'{"id": 0, "method": "mining.subscribe", "params": ["' + CGMINER_USER_AGENT.encode() + b'"]}\n')

    @property
    def ready(self) -> bool:
        """Subscribed, authorized and holding a job: shares can go out."""
        return self.authorized and self.job_id is not None

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def submit(self, serial: int) -> None:
        """Queue a share on the current job; ``serial`` (unique per run) picks nonce and extranonce2."""
        assert self.job_id is not None, "submit before the first job"
        request_id = self._next_id
        self._next_id += 1
        extranonce2 = b"%0*x" % (self._en2_width, serial >> 32)
        nonce = serial & 0xFFFFFFFF
        self._out.append(_SUBMIT_LINE % (self._worker, self.job_id, extranonce2, self.job_ntime, nonce, request_id))
        self._unstamped.append((request_id, serial))
        self.submitted += 1

    def data_to_send(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    def mark_sent(self, now: float) -> None:
        """The bytes last taken from :meth:`data_to_send` are going out now."""
        pending = self.pending
        if self.recording:
            send_times = self.send_times
            serial_of = self._serial_of
            for request_id, serial in self._unstamped:
                pending[request_id] = now
                send_times[serial] = now
                serial_of[request_id] = serial
        else:
            for request_id, _ in self._unstamped:
                pending[request_id] = now
        self._unstamped.clear()

    def receive_data(self, data: bytes, now: float) -> None:
        buffer = self._lines
        buffer += data
        end = buffer.rfind(b"\n")
        if end < 0:
            return
        lines = bytes(buffer[:end]).split(b"\n")
        del buffer[: end + 1]
        for line in lines:
            if line.strip():
                self._line(line, now)

    def _line(self, raw: bytes, now: float) -> None:
        try:
            line = _decode_pool_line(raw)
        except msgspec.DecodeError as exc:
            self.failure = f"unreadable line from the pool: {exc}"
            return
        if line.method is not None:
            if line.method == "mining.notify":
                self._notify(line.params)
            return
        request_id = line.id
        sent_at = self.pending.pop(request_id, None) if type(request_id) is int else None
        if sent_at is not None:
            accepted = line.result is not UNSET and bytes(line.result) == _TRUE and bytes(line.error) == _NULL
            if accepted:
                self.accepted += 1
            else:
                self.rejected += 1
                self.reject_reasons[bytes(line.error).decode(errors="replace")[:80]] += 1
            if self.recording:
                self.round_trips.append(now - sent_at)
                serial = self._serial_of.pop(request_id, None)
                if serial is not None:
                    self.verdict_times[serial] = now
            if self.in_flight and self.serials is not None and len(self.pending) + len(self._unstamped) < self.in_flight:
                self.submit(next(self.serials))
        elif request_id == _SUBSCRIBE_ID:
            self._subscribed(line)
        elif request_id == _AUTHORIZE_ID:
            if line.result is not UNSET and bytes(line.result) == _TRUE:
                self.authorized = True
            else:
                self.failure = f"authorize refused: {bytes(line.error).decode(errors='replace')}"

    def _subscribed(self, line: _PoolLine) -> None:
        if line.result is UNSET or bytes(line.error) != _NULL:
            self.failure = f"subscribe refused: {bytes(line.error).decode(errors='replace')}"
            return
        try:
            _subscriptions, extranonce1, size = _decode_subscribe_result(line.result)
        except msgspec.DecodeError as exc:
            self.failure = f"unreadable subscribe result: {exc}"
            return
        self.extranonce1 = extranonce1
        self.extranonce2_size = size
        self._en2_width = 2 * size
        self._out.append(b'{"id": 1, "method": "mining.authorize", "params": ["' + self._worker + b'", "x"]}\n')

    def _notify(self, params: Raw) -> None:
        try:
            notify = _decode_notify(params)
        except msgspec.DecodeError as exc:
            self.failure = f"unreadable mining.notify: {exc}"
            return
        self.job_id = notify.job_id.encode()
        self.job_ntime = notify.ntime.encode()
        self.jobs_received += 1
        if notify.clean_jobs:
            self.clean_jobs_received += 1


class LoadConnection:
    """The trio driver of one :class:`SyntheticMiner`."""

    def __init__(self, miner: SyntheticMiner, stream: trio.abc.Stream) -> None:
        self.miner = miner
        self.stream = stream
        self.closed = False
        self._send_lock = trio.Lock()

    async def flush(self) -> None:
        async with self._send_lock:
            data = self.miner.data_to_send()
            if data:
                self.miner.mark_sent(time.monotonic())
                await self.stream.send_all(data)

    async def read_loop(self) -> None:
        miner = self.miner
        try:
            while True:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                miner.receive_data(data, time.monotonic())
                if miner.has_output:
                    await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            miner.failure = miner.failure or f"connection error: {exc}"
        finally:
            self.closed = True
            if miner.failure is None:
                miner.failure = "the pool closed the connection"

    async def aclose(self) -> None:
        await close_quietly(self.stream)


@dataclass(frozen=True)
class OfferResult:
    """What :meth:`LoadGenerator.offer` did: shares sent and how long sending took."""

    rate: float
    sent: int
    seconds: float

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else math.inf


@dataclass
class Recording:
    """Round trips (seconds) and send times (monotonic, by share serial) of a recorded window."""

    round_trips: list[float] = field(default_factory=list)
    send_times: dict[int, float] = field(default_factory=dict)
    verdict_times: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadTotals:
    submitted: int
    accepted: int
    rejected: int
    pending: int
    reject_reasons: dict[str, int]


class LoadGenerator:
    """Many synthetic miners and a pacer that offers shares at a fixed rate.

    ``serials`` numbers the shares (one counter per benchmark run, so every share of
    the run is distinct at the pool).
    """

    def __init__(self, serials: Iterator[int] | None = None) -> None:
        self.serials = serials if serials is not None else itertools.count(1)
        self.connections: list[LoadConnection] = []

    async def connect(
        self,
        nursery: trio.Nursery,
        host: str,
        port: int,
        count: int,
        worker_prefix: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        concurrency: int = 64,
    ) -> list[LoadConnection]:
        """Open ``count`` miners to ``host:port``; return once every one holds a job.

        Connections are opened ``concurrency`` at a time (a TLS handshake costs a few
        milliseconds of CPU on each side). Raises :class:`LoadError` if one fails.
        """
        opened: list[LoadConnection] = []
        limiter = trio.CapacityLimiter(concurrency)

        async def open_one(index: int) -> None:
            async with limiter:
                stream = await open_stream(host, port, ssl_context=ssl_context, timeout=timeout)
                connection = LoadConnection(SyntheticMiner(f"{worker_prefix}{index}"), stream)
                opened.append(connection)
                nursery.start_soon(connection.read_loop)
                await connection.flush()

        with trio.move_on_after(timeout) as scope:
            async with trio.open_nursery() as openers:
                for index in range(count):
                    openers.start_soon(open_one, index)
            while not all(c.miner.ready for c in opened):
                failed = [c.miner for c in opened if c.miner.failure]
                if failed:
                    raise LoadError(f"{failed[0].worker}: {failed[0].failure}")
                await trio.sleep(0.01)
        if scope.cancelled_caught:
            waiting = sum(1 for c in opened if not c.miner.ready)
            raise LoadError(f"{waiting + count - len(opened)} of {count} miners not ready after {timeout:g} s")
        self.connections.extend(opened)
        return opened

    async def offer(
        self,
        rate: float,
        seconds: float,
        connections: list[LoadConnection] | None = None,
        *,
        randomly: random.Random | None = None,
    ) -> OfferResult:
        """Send ``rate × seconds`` shares, evenly spread in time, round-robin over the connections.

        With ``randomly``, each share goes to a connection drawn at random at a moment
        drawn at random (exponential gaps, a Poisson process of ``rate``): every rig then
        submits at random moments, ``rate / connections`` per second on average.
        """
        targets = connections if connections is not None else self.connections
        if randomly is not None:
            return await self._offer_randomly(rate, seconds, targets, randomly)
        total = max(1, round(rate * seconds))
        count = len(targets)
        serials = self.serials
        start = time.monotonic()
        sent = 0
        turn = 0
        while sent < total:
            due = min(total, int((time.monotonic() - start) * rate) + 1)
            for _ in range(due - sent):
                targets[turn].miner.submit(next(serials))
                turn = turn + 1 if turn + 1 < count else 0
            sent = due
            for connection in targets:
                if connection.miner.has_output:
                    await connection.flush()
            if sent < total:
                await trio.sleep(max(0.0, start + sent / rate - time.monotonic()))
        return OfferResult(rate, sent, time.monotonic() - start)

    async def _offer_randomly(
        self, rate: float, seconds: float, targets: list[LoadConnection], rng: random.Random
    ) -> OfferResult:
        serials = self.serials
        start = time.monotonic()
        due = start + rng.expovariate(rate)
        end = start + seconds
        sent = 0
        touched: set[int] = set()
        while due < end:
            now = time.monotonic()
            while due <= now and due < end:
                index = rng.randrange(len(targets))
                targets[index].miner.submit(next(serials))
                touched.add(index)
                sent += 1
                due += rng.expovariate(rate)
            for index in touched:
                await targets[index].flush()
            touched.clear()
            await trio.sleep(max(0.0, min(due, end) - time.monotonic()))
        return OfferResult(rate, sent, time.monotonic() - start)

    async def closed_loop(self, in_flight: int, seconds: float, connections: list[LoadConnection]) -> OfferResult:
        """Keep ``in_flight`` shares outstanding on every connection for ``seconds``.

        Each verdict sends the next share at once (a rig that always has work), so the
        rate is whatever the path sustains; one connection with one in flight is a
        lone share in a closed loop. The shares still out at the end are left to
        :meth:`settle`.
        """
        start = time.monotonic()
        before = sum(c.miner.submitted for c in connections)
        for connection in connections:
            miner = connection.miner
            miner.serials = self.serials
            miner.in_flight = in_flight
            for _ in range(max(0, in_flight - len(miner.pending))):
                miner.submit(next(self.serials))
            await connection.flush()
        await trio.sleep(seconds)
        for connection in connections:
            connection.miner.in_flight = 0
        sent = sum(c.miner.submitted for c in connections) - before
        return OfferResult(sent / seconds if seconds > 0 else 0.0, sent, time.monotonic() - start)

    async def settle(self, timeout: float) -> bool:
        """Wait until every submitted share has its verdict; False if some are still out after ``timeout``."""
        with trio.move_on_after(timeout):
            while self.pending():
                if all(c.closed for c in self.connections):
                    return False
                await trio.sleep(0.005)
            return True
        return False

    def pending(self) -> int:
        return sum(len(c.miner.pending) for c in self.connections)

    def totals(self, connections: list[LoadConnection] | None = None) -> LoadTotals:
        miners = [c.miner for c in (connections if connections is not None else self.connections)]
        reasons: Counter[str] = Counter()
        for miner in miners:
            reasons.update(miner.reject_reasons)
        return LoadTotals(
            submitted=sum(m.submitted for m in miners),
            accepted=sum(m.accepted for m in miners),
            rejected=sum(m.rejected for m in miners),
            pending=sum(len(m.pending) for m in miners),
            reject_reasons=dict(reasons),
        )

    def start_recording(self, connections: list[LoadConnection] | None = None) -> None:
        for connection in connections if connections is not None else self.connections:
            miner = connection.miner
            miner.round_trips = []
            miner.send_times = {}
            miner.verdict_times = {}
            miner._serial_of = {}
            miner.recording = True

    def stop_recording(self, connections: list[LoadConnection] | None = None) -> Recording:
        recording = Recording()
        for connection in connections if connections is not None else self.connections:
            miner = connection.miner
            miner.recording = False
            recording.round_trips.extend(miner.round_trips)
            recording.send_times.update(miner.send_times)
            recording.verdict_times.update(miner.verdict_times)
            miner.round_trips = []
            miner.send_times = {}
            miner.verdict_times = {}
            miner._serial_of = {}
        return recording

    async def wait_for_new_job(self, connections: list[LoadConnection], seen: dict[str, int], timeout: float) -> bool:
        """Wait until every connection received a job after the counts in ``seen`` (worker → jobs)."""
        with trio.move_on_after(timeout):
            while not all(c.miner.jobs_received > seen.get(c.miner.worker, 0) for c in connections):
                await trio.sleep(0.005)
            return True
        return False

    async def release(self, connections: list[LoadConnection]) -> None:
        """Close these connections and stop counting them."""
        for connection in connections:
            await connection.aclose()
        self.connections = [c for c in self.connections if c not in connections]

    async def aclose(self) -> None:
        await self.release(list(self.connections))
