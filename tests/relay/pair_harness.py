"""The real proxy core against the real sidecar core and the reference pool's core, in memory.

No socket, no thread, no clock: :class:`PairWorld` owns a virtual ``now`` and
moves bytes between three sans-IO cores:

- the proxy side of StratumRM (:class:`~bridge.relay.rm_upstream.StratumRMConnection`)
  with its rigs' channels;
- the sidecar (:class:`~bridge.relay.sidecar.session.SidecarSession` behind a
  :class:`~bridge.relay.sidecar.intake.SidecarIntake`);
- the reference pool (:class:`~bridge.testing.pool_core.PoolCore`), one connection
  per channel, which judges every share by its real double SHA-256.

The control channel is reliable and ordered with a one-way delay (what TCP gives);
datagrams cross a seeded :class:`LossyLink` that drops, duplicates and reorders.
Rigs are :class:`Rig` objects that really find shares for the pool's jobs
(:func:`~bridge.mining.share.scan_nonces`) at a low difficulty.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.mining.share import Job, difficulty_to_target, scan_nonces
from bridge.relay.rm_upstream import RMChannel, StratumRMConnection
from bridge.relay.sidecar.channels import ClosePool, OpenPool, WritePool
from bridge.relay.sidecar.intake import SidecarIntake
from bridge.relay.sidecar.session import SidecarSession
from bridge.sv1.events import Reply
from bridge.sv1.messages import Notify, SubmitParams
from bridge.testing.pool_core import ConnectionState, PoolConfig, PoolCore

#: The wall clock the pool sees at virtual time 0 (job ntime, ntime window).
EPOCH = 1_750_000_000.0
SIDECAR_UDP = ("192.0.2.1", 3334)
PROXY_UDP = ("198.51.100.7", 40000)


@dataclass
class LossyLink:
    """One direction of a datagram path: seeded loss, duplication and reordering.

    Every datagram that survives arrives ``delay`` later plus up to ``jitter``
    more (so later datagrams can overtake earlier ones); a duplicated one arrives
    twice, each copy with its own jitter.
    """

    rng: random.Random
    loss: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.001
    jitter: float = 0.0
    sent: int = 0
    dropped: int = 0
    duplicated: int = 0

    def carry(self, now: float) -> list[float]:
        """When the copies of one datagram sent at ``now`` arrive (none if it is lost)."""
        self.sent += 1
        if self.rng.random() < self.loss:
            self.dropped += 1
            return []
        copies = 1
        if self.rng.random() < self.duplicate:
            self.duplicated += 1
            copies = 2
        return [now + self.delay + self.rng.uniform(0.0, self.jitter) for _ in range(copies)]


@dataclass
class Rig:
    """A rig behind the proxy: one StratumRM channel, real shares, the verdicts it was told."""

    name: str
    channel: RMChannel
    extranonce1: bytes = b""
    extranonce2_size: int = 0
    job: Job | None = None
    counter: int = 0
    submitted: dict[int, SubmitParams] = field(default_factory=dict)
    verdicts: dict[int, list[bool]] = field(default_factory=dict)

    def take_events(self) -> None:
        for event in self.channel.events:
            if isinstance(event, Notify):
                p = event.params
                self.job = Job.from_notify_fields(
                    p.job_id, p.prevhash, p.coinb1, p.coinb2, p.merkle_branch, p.version, p.nbits, p.ntime
                )
            elif isinstance(event, Reply):
                if event.context == "subscribe":
                    result = json.loads(bytes(event.response.result))
                    self.extranonce1 = bytes.fromhex(result[1])
                    self.extranonce2_size = int(result[2])
                elif isinstance(event.context, int):
                    self.verdicts.setdefault(event.context, []).append(event.accepted)
        self.channel.events = []

    def find_share(self, target: int) -> SubmitParams | None:
        """Hash the current job until a nonce meets ``target`` (a fresh extranonce2 each time)."""
        job = self.job
        if job is None or not self.extranonce2_size:
            return None
        while True:
            self.counter += 1
            extranonce2 = self.counter.to_bytes(self.extranonce2_size, "little")
            header76 = job.header76(self.extranonce1, extranonce2, job.ntime_int)
            for start in range(0, 1 << 16, 256):  # about 256 hashes a share at the default difficulty
                hits = scan_nonces(header76, start, 256, target)
                if hits:
                    break
            if hits:
                nonce = hits[0][0]
                return SubmitParams(self.name, job.job_id, extranonce2.hex(), f"{job.ntime_int:08x}", f"{nonce:08x}")

    def submit(self, serial: int, target: int) -> bool:
        share = self.find_share(target)
        if share is None:
            return False
        self.channel.submit(share, context=serial)
        self.submitted[serial] = share
        return True


class PairWorld:
    """Proxy core, sidecar core and pool core wired in memory, run on a virtual clock."""

    def __init__(
        self,
        *,
        seed: int,
        loss: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.010,
        jitter: float = 0.0,
        control_delay: float | None = None,
        pool_delay: float = 0.0,
        difficulty: float = 2.0**-24,
    ) -> None:
        rng = random.Random(seed)
        self.up = LossyLink(random.Random(rng.random()), loss, duplicate, delay, jitter)
        self.down = LossyLink(random.Random(rng.random()), loss, duplicate, delay, jitter)
        self.control_delay = delay if control_delay is None else control_delay
        self.pool_delay = pool_delay
        self.now = 0.0
        self._seq = itertools.count()
        # (when, seq, what to do): every arrival and scheduled action, in time order
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._control_up_at = 0.0
        self._control_down_at = 0.0

        self.pool = PoolCore(PoolConfig(difficulty=difficulty, notify_interval=1e9, seed=seed, extranonce2_size=4))
        self.target = difficulty_to_target(difficulty)
        self.proxy = StratumRMConnection(agent="pair-harness", detect_blocks=False, randbits=rng.getrandbits)
        self.intake = SidecarIntake()
        self.sidecar = SidecarSession(
            now=0.0, intake=self.intake, udp_port=SIDECAR_UDP[1], udp_host=SIDECAR_UDP[0], randbytes=rng.randbytes
        )
        self.pool_connections: dict[int, ConnectionState] = {}
        self.rigs: list[Rig] = []
        self.proxy.start(0.0)
        self.pump()

    # ------------------------------------------------------------ scheduling

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action))

    def _next_time(self) -> float | None:
        times = [t for t in (self.proxy.get_timer(), self.sidecar.get_timer(), self.intake.get_timer()) if t is not None]
        if self._events:
            times.append(self._events[0][0])
        return min(times) if times else None

    def run_until(self, end: float, done: Callable[[], bool] = lambda: False) -> None:
        """Advance virtual time event by event until ``end`` or until ``done()`` holds."""
        spins = 0
        while not done():
            when = self._next_time()
            if when is None or when > end:
                self.now = end
                return
            spins = spins + 1 if when <= self.now else 0
            assert spins < 10_000, f"a core keeps asking for the timer at {self.now} without moving its deadline"
            self.now = max(self.now, when)
            while self._events and self._events[0][0] <= self.now:
                _, _, action = heapq.heappop(self._events)
                action()
            deadline = self.proxy.get_timer()
            if deadline is not None and deadline <= self.now:
                self.proxy.handle_timer(self.now)
            deadline = self.sidecar.get_timer()
            if deadline is not None and deadline <= self.now:
                self.sidecar.handle_timer(self.now)
            deadline = self.intake.get_timer()
            if deadline is not None and deadline <= self.now:
                self.intake.handle_timer(self.now)
            self.pump()
            assert self.proxy.close_reason is None, self.proxy.close_reason
            assert not self.sidecar.closed, self.sidecar.close_reason

    # ------------------------------------------------------------ moving bytes

    def pump(self) -> None:
        """Carry every core's output toward its peer (arrivals are scheduled, not immediate)."""
        now = self.now
        data = self.proxy.data_to_send()
        if data:
            self._control_up_at = max(self._control_up_at, now + self.control_delay)
            self.at(self._control_up_at, lambda data=data: self.sidecar.receive_data(data, self.now))
        for datagram in self.proxy.datagrams_to_send(now):
            for when in self.up.carry(now):
                self.at(when, lambda d=datagram: self.intake.receive_datagram(d, PROXY_UDP, self.now))
        data = self.sidecar.data_to_send()
        if data:
            self._control_down_at = max(self._control_down_at, now + self.control_delay)
            self.at(self._control_down_at, lambda data=data: self.proxy.receive_data(data, self.now))
        for outgoing in self.sidecar.datagrams_to_send():
            assert outgoing.address == PROXY_UDP
            for when in self.down.carry(now):
                self.at(when, lambda d=outgoing.data: self.proxy.receive_datagram(d, SIDECAR_UDP, self.now))
        for command in self.sidecar.commands():
            self._pool_command(command)
        for connection in self.pool.ready():
            answer = self.pool.data_to_send(connection)
            ch = next(ch for ch, c in self.pool_connections.items() if c is connection)
            if answer:
                self.at(now + self.pool_delay, lambda ch=ch, answer=answer: self.sidecar.pool_data(ch, answer, self.now))
        for rig in self.rigs:
            rig.take_events()

    def _pool_command(self, command: Any) -> None:
        match command:
            case OpenPool(ch=ch, peer=peer):
                self.pool_connections[ch] = self.pool.connection_made(peer, EPOCH + self.now)
                self.sidecar.pool_connected(ch, self.now)
            case WritePool(ch=ch, data=data):
                self.pool.receive_data(self.pool_connections[ch], data, EPOCH + self.now)
            case ClosePool(ch=ch):
                connection = self.pool_connections.pop(ch, None)
                if connection is not None:
                    self.pool.connection_lost(connection, EPOCH + self.now)

    # ------------------------------------------------------------ rigs

    def add_rig(self, name: str) -> Rig:
        channel = self.proxy.open_channel(f"10.0.0.{len(self.rigs) + 2}:4028")
        channel.subscribe("cgminer/4.11.1", context="subscribe")
        channel.request("mining.authorize", [name, "x"], context="authorize")
        rig = Rig(name, channel)
        self.rigs.append(rig)
        self.pump()
        return rig
