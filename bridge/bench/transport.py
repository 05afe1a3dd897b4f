"""``stratumrm bench transport``: the same share load through four transports, side by side.

Paths:

==============  ===========================================  =============================
path            chain                                        link measured
==============  ===========================================  =============================
direct          miners → pool (SV1 over TCP)                 miner ↔ pool
sv1 relay       miners → proxy ``stratum+tcp://`` → pool     proxy ↔ pool
sv1 in tls      miners → proxy ``stratum+ssl://`` → pool     proxy ↔ pool (TLS 1.3)
stunnel pair    miners → stunnel client → stunnel server     stunnel ↔ stunnel (TLS 1.3)
                → pool (when stunnel is installed)
bare python     miners → near relay → far relay → pool       not metered: the floor for
pair            (TCP in, UDP across, TCP out; bytes copied,  latency and CPU of any
                nothing else: :mod:`bridge.bench.bare_relay`) Python pair
stratumrm       miners → proxy ``stratumrm://`` → sidecar    proxy ↔ sidecar: TLS control
                → pool                                       connection + UDP datagrams
==============  ===========================================  =============================

For the relays the measured link is the one that crosses the internet; the
miner ↔ proxy and sidecar ↔ pool legs are local.

Every role runs in its own process (:mod:`bridge.bench.roles`): the reference pool
(one process serving a listener per path, at a difficulty where every hash is a
valid share, so each share is still validated for real), one proxy per relayed
path and the sidecar. The pool's jobs have no merkle branches, so validating a share
(at the pool, and the StratumRM proxy's block-candidate check) costs the same on
every path; a mainnet job's ~12 branches add 12 double-SHA256 to each. The load (:mod:`bridge.bench.load`) runs in the benchmark's
own process: ``connections`` cgminer-like miners per path that submit distinct
valid shares at a fixed rate, round-robin. All on 127.0.0.1 of one machine: the
processes share its cores with the load generator and the pool.

What is measured, per path and run. Every measurement is a *step*: the load runs at
one rate for a lead-in (``lead_in_seconds``, so every process reaches its steady
state), then for the measured window; the counters are read around the window.

- **Bytes on the wire per share**, both directions, in a window of
  ``latency_rate`` shares/s for ``latency_seconds`` (until the window's last verdict,
  plus 0.25 s for trailing ACKs): TCP payload bytes and segments (pure ACKs
  included) from the kernel's ``tcp_info`` of the link's server-side sockets, read
  through sock_diag (:mod:`bridge.bench.measure`); for StratumRM also the UDP
  datagrams both ways (proxy → sidecar counted by the proxy, sidecar → proxy by the
  sidecar). Each TCP segment adds 20 (IPv4) + 32 (TCP with the timestamp option)
  bytes, each datagram 20 + 8. Divided by the shares sent in the window. Job
  notifications are not part of this window (the pool sends none during it); the
  farm benchmark counts them. The same figure at the highest sustained step shows
  what batching does under load.
- **Share latency**: from the moment the miner's write of a ``mining.submit`` starts
  to the moment the pool starts handling it (CLOCK_MONOTONIC in both processes), p50
  and p99 over every share of the same window, and the added p50 of each path over
  ``direct``. The verdict round trip (submit → verdict back at the miner) too.
- **Highest sustained rate with zero loss**: steps of ``step_seconds`` at rising
  offered rates (doubling from ``start_rate`` until two steps in a row fail or
  ``max_rate``, then bisecting ``refine_steps`` times between the best rate and the
  next failed one), with the lowest failed rate alongside (a busier process batches
  more, so a path may cope with a rate above one it failed at). A step is
  sustained when every share of it got an accepted verdict, the pool's accepted count
  grew by exactly the shares sent, the load generator kept at least 95 % of the
  offered rate, and the p99 verdict round trip stayed under ``lag_limit`` (100 ms: no
  growing queue).
- **CPU microseconds per share** of the proxy and sidecar processes (and, to show
  where the machine's time goes, of the pool and the load generator), from ``/proc``
  over the same windows: at the latency rate and at the highest sustained step.
- **StratumRM under loss**: a second proxy and sidecar whose UDP goes through a
  :class:`~bridge.testing.lossy_link.LossyLink` (a process of its own) dropping
  ``lossy_percent`` of the datagrams in each direction; latency p50/p99 at the
  latency rate, and the share of shares the proxy sent again.

Closed loop (the wire-efficiency issue's table): rigs that always have work and
submit the next share the moment a verdict arrives.

- **Lone share**: one rig, one share in flight, for ``lone_seconds``: bytes on the
  link per share (share, verdict and every ACK both ways, counted as above), p50/p99
  submit → pool receipt and the added p50 over ``direct``, the **return leg**:
  from the pool's receipt of the share to its verdict at the rig (the pool's own
  validation is in it, the same on every path), and **answer → rig**: from the
  pool's answer (the moment the pool hands its verdict to the connection's stream,
  before a TLS listener encrypts it) to the verdict at the rig, the way back alone
  (the issue's "verdict back at the rig within 0.5 ms of the pool's answer"), with
  its added p50 over ``direct``. Every path is timed at the same points: the load
  generator's write and read, the pool's read and its hand-over to its stream.
- **20 rigs × 4 in flight** for ``closed_seconds``: shares/s through the path with
  zero loss, and CPU µs per share of the proxy and sidecar together.
- **Slow pool** (StratumRM only): the lone-share loop while the pool answers every
  share 50 ms late (``slow_pool_delay``); the proxy must send nothing again.
- **Loss**: the lossy StratumRM run also delays every datagram ``lossy_delay_ms``
  each way; p99 submit → pool receipt. (SV1 over TLS under the same loss would need
  a lossy TCP link, netem, which the benchmark cannot set up without root: it is not
  measured here.)

Bytes counted twice, once: for the lone StratumRM share, the UDP bytes from the
proxy's and sidecar's own counters are checked against the kernel's host-wide UDP
datagram counters (``/proc/net/snmp``), which other programs on the machine can only
raise; the report prints both.

Each run starts every process afresh; the tables show the median of the runs.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from bridge.bench.bare_relay import BarePair
from bridge.bench.load import LoadConnection, LoadGenerator, OfferResult
from bridge.bench.measure import (
    CpuMeter,
    LinkTraffic,
    TcpLinkMeter,
    median,
    percentile,
    udp_out_datagrams,
    udp_receive_buffer_errors,
    udp_traffic,
)
from bridge.bench.roles import HOST, RoleLauncher, RoleProcess, free_port
from bridge.bench.stunnel import StunnelPair, stunnel_binary
from bridge.testing.pki import TestPKI, make_test_pki

Progress = Callable[[str], None]

DIRECT = "direct"
SV1_RELAY = "sv1 relay"
SV1_TLS = "sv1 in tls"
STUNNEL = "stunnel pair"
BARE = "bare python pair"
STRATUMRM = "stratumrm"
PATHS = (DIRECT, SV1_RELAY, SV1_TLS, STUNNEL, BARE, STRATUMRM)
LINKS = {
    DIRECT: "miner<->pool TCP",
    SV1_RELAY: "proxy<->pool TCP",
    SV1_TLS: "proxy<->pool TLS",
    STUNNEL: "stunnel<->stunnel TLS",
    BARE: "relay<->relay UDP, not metered",
    STRATUMRM: "proxy<->sidecar TLS+UDP",
}
ACCOUNT = "bench"
TRAILING_ACK_WAIT = 0.25
STEP_PAUSE = 0.3
UDP_UP_TIMEOUT = 10.0
MIN_ACHIEVED_FRACTION = 0.95
MIN_SEARCH_RATE = 100.0
FAILURES_TO_STOP = 2

# Targets of the StratumRM issue (item 9), on a 2-core machine.
TARGET_BYTES_PER_SHARE = 90.0
TARGET_SHARES_PER_SECOND = 20_000.0
TARGET_ADDED_P50_MS = 0.5
# Targets of the wire-efficiency issue (data channel v2), as ratios to SV1 over TLS.
TARGET_LONE_RATIO = 0.5
TARGET_FARM_RATIO = 0.2
TARGET_RETURN_LEG_MS = 0.5
TARGET_CLOSED_SHARES_PER_SECOND = 40_000.0
TARGET_CPU_US_PER_SHARE = 43.0 / 2
TARGET_LOSSY_P99_RATIO = 0.1


@dataclass(frozen=True)
class TransportSettings:
    """How much load, for how long (defaults: the full benchmark)."""

    runs: int = 3
    connections: int = 20
    latency_rate: float = 1000.0
    latency_seconds: float = 5.0
    lead_in_seconds: float = 1.0
    step_seconds: float = 2.0
    start_rate: float = 2500.0
    max_rate: float = 80_000.0
    refine_steps: int = 2
    lag_limit: float = 0.100
    lossy_percent: float = 2.0
    lossy_delay_ms: float = 10.0
    settle_timeout: float = 30.0
    lone_seconds: float = 5.0
    closed_seconds: float = 3.0
    closed_in_flight: int = 4
    slow_pool_delay: float = 0.050
    slow_seconds: float = 3.0
    search: bool = True
    pair_only: bool = False
    """Measure only the two pairs (the stunnel pair and StratumRM): the throughput and CPU comparison."""

    @classmethod
    def quick(cls) -> TransportSettings:
        """One short run with small loads: checks that everything works, measures little."""
        return cls(
            runs=1,
            connections=4,
            latency_rate=500.0,
            latency_seconds=1.0,
            lead_in_seconds=0.3,
            step_seconds=0.5,
            start_rate=1000.0,
            max_rate=2000.0,
            refine_steps=0,
            settle_timeout=10.0,
            lone_seconds=1.0,
            closed_seconds=1.0,
            slow_seconds=1.0,
        )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Window:
    """One step of load on one path: a lead-in, then the measured window.

    ``shares`` were sent in the measured window (bytes and CPU time are divided by
    it); ``step_shares``, ``accepted``, ``rejected``, ``unanswered`` and
    ``pool_accepted`` count the whole step.
    """

    rate: float
    offered: OfferResult
    shares: int
    step_shares: int
    accepted: int
    rejected: int
    unanswered: int
    pool_accepted: int
    reject_reasons: dict[str, int]
    round_trips: list[float]
    latencies: list[float]
    tcp_traffic: LinkTraffic
    udp_traffic: LinkTraffic
    shares_sent_again: int
    udp_buffer_drops: int
    cpu_seconds: dict[str, float]
    return_legs: list[float] = field(default_factory=list)
    answer_legs: list[float] = field(default_factory=list)
    """Per share: the pool's answer (its verdict handed to the pool's stream) -> the verdict at the rig."""
    kernel_udp_datagrams: int = 0
    late_copies: int = 0
    """Datagrams whose shares were sent again before the first copy's late acknowledgement."""
    ack_datagrams: int = 0
    """ACK datagrams of the sidecar (verdicts slower than its max_ack_delay)."""
    verdict_queries: int = 0
    """Of the shares sent again, those acknowledged whose verdict was late (a lost VERDICT?)."""
    send_drops: int = 0
    """Datagrams proxy and sidecar could not send (kernel send buffer full)."""
    datagram_drops: dict[str, int] = field(default_factory=dict)
    """Datagrams the sidecar (and, named ``proxy ...``, the proxy) received and dropped, by reason (PROTOCOL.md §6)."""

    @property
    def traffic(self) -> LinkTraffic:
        return self.tcp_traffic + self.udp_traffic

    def split_per_share(self) -> dict[str, float]:
        """Wire bytes per share of each part: TCP and UDP, up and down."""
        shares = self.shares or math.nan
        return {
            "tcp up": self.tcp_traffic.wire_up / shares,
            "tcp down": self.tcp_traffic.wire_down / shares,
            "udp up": self.udp_traffic.wire_up / shares,
            "udp down": self.udp_traffic.wire_down / shares,
        }

    def cpu_us_per_share(self) -> dict[str, float]:
        if not self.shares:
            return {name: math.nan for name in self.cpu_seconds}
        return {name: seconds / self.shares * 1e6 for name, seconds in self.cpu_seconds.items()}

    def bytes_per_share(self) -> tuple[float, float]:
        if not self.shares:
            return math.nan, math.nan
        return self.traffic.wire_up / self.shares, self.traffic.wire_down / self.shares

    def packets_per_share(self) -> float:
        if not self.shares:
            return math.nan
        return (self.traffic.packets_up + self.traffic.packets_down) / self.shares

    def latency_ms(self, fraction: float) -> float:
        return percentile(self.latencies, fraction) * 1e3

    def round_trip_ms(self, fraction: float) -> float:
        return percentile(self.round_trips, fraction) * 1e3

    def return_leg_ms(self, fraction: float) -> float:
        """Pool receipt -> verdict at the rig (ms), over the shares with both times."""
        return percentile(self.return_legs, fraction) * 1e3 if self.return_legs else math.nan

    def answer_leg_ms(self, fraction: float) -> float:
        """The pool's answer -> verdict at the rig (ms): the way back alone, the pool's own work left out."""
        return percentile(self.answer_legs, fraction) * 1e3 if self.answer_legs else math.nan

    def loss(self, lag_limit: float | None = None) -> str | None:
        """Why this window does not count as sustained with zero loss, or None."""
        if self.unanswered:
            return f"{self.unanswered} shares without a verdict"
        if self.rejected:
            reasons = ", ".join(f"{count}× {reason}" for reason, count in self.reject_reasons.items())
            return f"{self.rejected} shares rejected ({reasons})"
        if self.accepted != self.step_shares or self.pool_accepted != self.step_shares:
            return f"{self.accepted} confirmed and {self.pool_accepted} accepted at the pool of {self.step_shares}"
        if self.offered.achieved_rate < MIN_ACHIEVED_FRACTION * self.rate:
            return f"shares went out at only {self.offered.achieved_rate:,.0f}/s"
        if lag_limit is not None and percentile(self.round_trips, 0.99) > lag_limit:
            return f"lagging: p99 verdict round trip {self.round_trip_ms(0.99):.1f} ms"
        return None


@dataclass
class PathRun:
    """One path in one run."""

    path: str
    latency: Window
    steps: list[Window] = field(default_factory=list)
    failed_rates: list[float] = field(default_factory=list)
    max_sustained: float = 0.0
    best_step: Window | None = None
    lone: Window | None = None
    closed: Window | None = None
    slow: Window | None = None

    @property
    def first_failure(self) -> float:
        """The lowest offered rate that was not sustained (NaN if every step was)."""
        return min(self.failed_rates) if self.failed_rates else math.nan


@dataclass
class LossyRun:
    window: Window
    datagrams_dropped: int
    """By the lossy link, over the whole step (lead-in included)."""


@dataclass
class TransportRun:
    paths: dict[str, PathRun]
    lossy: LossyRun | None


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class LinkReading:
    """What crossed a path's measured link during a window."""

    tcp: LinkTraffic
    udp: LinkTraffic
    shares_sent_again: int = 0
    """Retransmissions of the StratumRM proxy (UDP and TLS)."""
    udp_buffer_drops: int = 0
    """Datagrams the kernel dropped on a full receive buffer (host-wide; StratumRM only)."""
    kernel_udp_datagrams: int = 0
    """UDP datagrams the whole host sent (an upper bound of the link's own count)."""
    late_copies: int = 0
    ack_datagrams: int = 0
    verdict_queries: int = 0
    """Shares sent again because their verdict was late after their acknowledgement."""
    send_drops: int = 0
    """Datagrams proxy and sidecar could not send (kernel send buffer full)."""
    datagram_drops: dict[str, int] = field(default_factory=dict)
    """Datagrams the sidecar dropped, by reason."""


class LinkMeter:
    """One path's measured link: TCP from the kernel, UDP and retransmissions from the roles."""

    def __init__(self, tcp_ports: list[int], proxy: RoleProcess | None = None, sidecar: RoleProcess | None = None) -> None:
        self.tcp = TcpLinkMeter(tcp_ports)
        self.proxy = proxy
        self.sidecar = sidecar
        self._start: dict[str, int] = {}

    async def _counters(self) -> dict[str, int]:
        if self.proxy is None or self.sidecar is None:
            return {}
        proxy = await self.proxy.request("stats")
        link = proxy["link"] or {}
        sidecar = await self.sidecar.request("stats")
        drops = {f"drop:{reason}": count for reason, count in sidecar["sidecar"].get("datagram_drops", {}).items()}
        drops |= {f"drop:proxy {reason}": count for reason, count in link.get("datagram_drops", {}).items()}
        return drops | {
            "datagrams_up": link.get("datagrams_sent", 0),
            "bytes_up": link.get("datagram_bytes_sent", 0),
            "datagrams_down": sidecar["udp_datagrams_sent"],
            "bytes_down": sidecar["udp_bytes_sent"],
            "sent_again": link.get("retransmissions_udp", 0) + link.get("retransmissions_tls", 0),
            "late_copies": link.get("spurious_retransmissions", 0),
            "verdict_queries": link.get("verdict_queries", 0),
            "send_drops": proxy.get("udp_send_drops", 0) + sidecar.get("udp_send_drops", 0),
            "ack_datagrams": sidecar.get("ack_datagrams_sent", 0),
            "buffer_drops": udp_receive_buffer_errors(),
            "kernel_udp_out": udp_out_datagrams(),
        }

    async def start(self) -> None:
        self._start = await self._counters()
        self.tcp.start()

    async def reading(self) -> LinkReading:
        """What crossed since :meth:`start`."""
        tcp = self.tcp.traffic()
        now = await self._counters()
        delta = {name: value - self._start.get(name, 0) for name, value in now.items()}
        udp = udp_traffic(
            delta.get("datagrams_up", 0), delta.get("bytes_up", 0), delta.get("datagrams_down", 0), delta.get("bytes_down", 0)
        )
        return LinkReading(
            tcp,
            udp,
            delta.get("sent_again", 0),
            delta.get("buffer_drops", 0),
            delta.get("kernel_udp_out", 0),
            delta.get("late_copies", 0),
            delta.get("ack_datagrams", 0),
            delta.get("verdict_queries", 0),
            delta.get("send_drops", 0),
            {name[5:]: count for name, count in delta.items() if name.startswith("drop:") and count},
        )


@dataclass
class _Context:
    settings: TransportSettings
    progress: Progress
    launcher: RoleLauncher
    pki: TestPKI
    load: LoadGenerator
    nursery: trio.Nursery
    pool: RoleProcess
    run_label: str


async def _pool_accepted(pool: RoleProcess) -> int:
    return int((await pool.request("stats"))["accepted"])


async def measure_window(
    context: _Context,
    connections: list[LoadConnection],
    meter: LinkMeter,
    cpu: CpuMeter,
    rate: float,
    seconds: float,
    *,
    lead_in: float,
    pool_receipts: bool,
) -> Window:
    """Offer ``rate`` shares/s for ``lead_in + seconds``; measure the last ``seconds``.

    The lead-in brings every process to its steady state at this rate before the
    counters are read. Bytes, CPU time, round trips and latencies cover the measured
    part (until its last verdict, plus :data:`TRAILING_ACK_WAIT`); the loss checks
    cover the whole step.
    """
    load, pool = context.load, context.pool
    step_before = load.totals(connections)
    pool_before = await _pool_accepted(pool)
    offered: OfferResult | None = None

    async def offer() -> None:
        nonlocal offered
        offered = await load.offer(rate, lead_in + seconds, connections)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(offer)
        await trio.sleep(lead_in)
        if pool_receipts:
            await pool.request("record", on=True)
        load.start_recording(connections)
        measured_before = load.totals(connections)
        await meter.start()
        cpu.start()
    measured_after = load.totals(connections)
    await load.settle(context.settings.settle_timeout)
    await trio.sleep(TRAILING_ACK_WAIT)
    cpu_seconds = cpu.seconds()
    link = await meter.reading()
    recording = load.stop_recording(connections)
    latencies: list[float] = []
    if pool_receipts:
        receipts = dict(await pool.request("receipts"))
        await pool.request("record", on=False)
        for serial, sent_at in recording.send_times.items():
            received_at = receipts.get(serial & 0xFFFFFFFF)
            if received_at is not None:
                latencies.append(received_at - sent_at)
    after = load.totals(connections)
    reasons = {
        reason: count - step_before.reject_reasons.get(reason, 0)
        for reason, count in after.reject_reasons.items()
        if count != step_before.reject_reasons.get(reason, 0)
    }
    assert offered is not None
    return Window(
        rate=rate,
        offered=offered,
        shares=measured_after.submitted - measured_before.submitted,
        step_shares=after.submitted - step_before.submitted,
        accepted=after.accepted - step_before.accepted,
        rejected=after.rejected - step_before.rejected,
        unanswered=after.pending,
        pool_accepted=await _pool_accepted(pool) - pool_before,
        reject_reasons=reasons,
        round_trips=sorted(recording.round_trips),
        latencies=sorted(latencies),
        tcp_traffic=link.tcp,
        udp_traffic=link.udp,
        shares_sent_again=link.shares_sent_again,
        udp_buffer_drops=link.udp_buffer_drops,
        cpu_seconds=cpu_seconds,
        late_copies=link.late_copies,
        ack_datagrams=link.ack_datagrams,
        verdict_queries=link.verdict_queries,
        send_drops=link.send_drops,
        datagram_drops=link.datagram_drops,
    )


async def measure_closed(
    context: _Context,
    connections: list[LoadConnection],
    meter: LinkMeter,
    cpu: CpuMeter,
    in_flight: int,
    seconds: float,
    *,
    lead_in: float,
) -> Window:
    """Keep ``in_flight`` shares out per connection for ``lead_in + seconds``; measure the last ``seconds``.

    Like :func:`measure_window` (same counters, same loss checks), but closed loop:
    each verdict sends the next share, so the rate is what the path sustains. Pool
    receipts are recorded, and matched per share with the verdict time at the rig.
    """
    load, pool = context.load, context.pool
    step_before = load.totals(connections)
    pool_before = await _pool_accepted(pool)
    offered: OfferResult | None = None

    async def run_loop() -> None:
        nonlocal offered
        offered = await load.closed_loop(in_flight, lead_in + seconds, connections)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_loop)
        await trio.sleep(lead_in)
        await pool.request("record", on=True)
        load.start_recording(connections)
        measured_before = load.totals(connections)
        await meter.start()
        cpu.start()
        await trio.sleep(seconds)
        measured_after = load.totals(connections)
    await load.settle(context.settings.settle_timeout)
    await trio.sleep(TRAILING_ACK_WAIT)
    cpu_seconds = cpu.seconds()
    link = await meter.reading()
    recording = load.stop_recording(connections)
    receipts = dict(await pool.request("receipts"))
    answers = dict(await pool.request("answers"))
    await pool.request("record", on=False)
    latencies: list[float] = []
    return_legs: list[float] = []
    answer_legs: list[float] = []
    for serial, sent_at in recording.send_times.items():
        nonce = serial & 0xFFFFFFFF
        received_at = receipts.get(nonce)
        if received_at is None:
            continue
        latencies.append(received_at - sent_at)
        verdict_at = recording.verdict_times.get(serial)
        if verdict_at is not None:
            return_legs.append(verdict_at - received_at)
            answered_at = answers.get(nonce)
            if answered_at is not None:
                answer_legs.append(verdict_at - answered_at)
    after = load.totals(connections)
    reasons = {
        reason: count - step_before.reject_reasons.get(reason, 0)
        for reason, count in after.reject_reasons.items()
        if count != step_before.reject_reasons.get(reason, 0)
    }
    assert offered is not None
    shares = measured_after.submitted - measured_before.submitted
    rate = shares / seconds
    return Window(
        rate=rate,
        offered=OfferResult(rate, shares, seconds),  # closed loop: the rate is what was achieved
        shares=shares,
        step_shares=after.submitted - step_before.submitted,
        accepted=after.accepted - step_before.accepted,
        rejected=after.rejected - step_before.rejected,
        unanswered=after.pending,
        pool_accepted=await _pool_accepted(pool) - pool_before,
        reject_reasons=reasons,
        round_trips=sorted(recording.round_trips),
        latencies=sorted(latencies),
        tcp_traffic=link.tcp,
        udp_traffic=link.udp,
        shares_sent_again=link.shares_sent_again,
        udp_buffer_drops=link.udp_buffer_drops,
        cpu_seconds=cpu_seconds,
        return_legs=sorted(return_legs),
        answer_legs=sorted(answer_legs),
        kernel_udp_datagrams=link.kernel_udp_datagrams,
        late_copies=link.late_copies,
        ack_datagrams=link.ack_datagrams,
        verdict_queries=link.verdict_queries,
        send_drops=link.send_drops,
        datagram_drops=link.datagram_drops,
    )


async def _measure_closed_loops(
    context: _Context,
    label: str,
    path: str,
    connections: list[LoadConnection],
    meter: LinkMeter,
    cpu: CpuMeter,
    result: PathRun,
) -> None:
    """The closed-loop windows of one path: lone share, 20 × 4 in flight, and (StratumRM) a slow pool."""
    settings, progress = context.settings, context.progress
    lead_in = settings.lead_in_seconds
    result.lone = await measure_closed(context, connections[:1], meter, cpu, 1, settings.lone_seconds, lead_in=lead_in)
    lone = result.lone
    problem = lone.loss()
    progress(
        f"{label}: lone share (1 rig, 1 in flight) for {settings.lone_seconds:g} s: {_describe_window(lone)}, "
        f"return leg p50 {lone.return_leg_ms(0.5):.3f} ms, pool's answer -> rig p50 {lone.answer_leg_ms(0.5):.3f} ms"
        + (f"; LOSS: {problem}" if problem else "")
    )
    result.closed = await measure_closed(
        context, connections, meter, cpu, settings.closed_in_flight, settings.closed_seconds, lead_in=lead_in
    )
    closed = result.closed
    problem = closed.loss()
    progress(
        f"{label}: {len(connections)} rigs x {settings.closed_in_flight} in flight for {settings.closed_seconds:g} s: "
        f"{closed.rate:,.0f} shares/s, {sum(closed.bytes_per_share()):.0f} B/share"
        + _describe_cpu(closed)
        + _describe_datagrams(closed)
        + _describe_resends(closed)
        + (f"; LOSS: {problem}" if problem else "")
    )
    if path == STRATUMRM and settings.slow_pool_delay > 0:
        await context.pool.request("delay", seconds=settings.slow_pool_delay)
        try:
            result.slow = await measure_closed(context, connections[:1], meter, cpu, 1, settings.slow_seconds, lead_in=lead_in)
        finally:
            await context.pool.request("delay", seconds=0.0)
        progress(
            f"{label}: lone share, pool answering {settings.slow_pool_delay * 1e3:g} ms late: "
            f"{_describe_window(result.slow)}; {result.slow.shares_sent_again} sent again"
        )


async def _fresh_job(context: _Context, connections: list[LoadConnection]) -> None:
    """A new block at the pool (empties its duplicate sets); wait until every miner has it."""
    seen = {c.miner.worker: c.miner.jobs_received for c in connections}
    await context.pool.request("new_block")
    if not await context.load.wait_for_new_job(connections, seen, 10.0):
        raise RuntimeError("the new block's job did not reach every miner within 10 s")


async def wait_for_udp(proxy: RoleProcess) -> None:
    with trio.move_on_after(UDP_UP_TIMEOUT):
        while not ((await proxy.request("stats"))["link"] or {}).get("udp_up"):
            await trio.sleep(0.05)
        return
    raise RuntimeError(f"the StratumRM link's UDP did not come up within {UDP_UP_TIMEOUT:g} s")


def _describe_window(window: Window) -> str:
    up, down = window.bytes_per_share()
    text = (
        f"{window.shares} shares, {up + down:.0f} B/share, latency p50 {window.latency_ms(0.5):.2f} ms "
        f"p99 {window.latency_ms(0.99):.2f} ms, verdict p50 {window.round_trip_ms(0.5):.2f} ms"
    )
    if window.udp_traffic.packets_up and window.shares:
        split = window.split_per_share()
        text += (
            f" (UDP {split['udp up'] + split['udp down']:.0f} B in "
            f"{window.udp_traffic.packets_up / window.shares:.2f} datagrams/share, "
            f"control TCP {split['tcp up']:.0f} up + {split['tcp down']:.0f} down)"
        )
    return text + _describe_resends(window)


def _describe_cpu(window: Window) -> str:
    """CPU microseconds per share of the relaying processes (proxy, sidecar, stunnel) in a window."""
    per_share = {name: value for name, value in window.cpu_us_per_share().items() if name not in ("pool", "load")}
    if not per_share:
        return ""
    return ", CPU " + " + ".join(f"{name} {value:.1f}" for name, value in sorted(per_share.items())) + " us/share"


def _describe_datagrams(window: Window) -> str:
    """Shares per UDP datagram each way (how well concurrent shares and verdicts were coalesced)."""
    udp = window.udp_traffic
    if not (udp.packets_up and udp.packets_down and window.shares):
        return ""
    return f", {window.shares / udp.packets_up:.1f} shares per datagram up, {window.shares / udp.packets_down:.1f} down"


def _describe_resends(window: Window) -> str:
    """StratumRM's retransmissions and full-buffer UDP drops in a window, if any."""
    parts = []
    if window.shares_sent_again:
        why = []
        if window.late_copies:
            why.append(f"{window.late_copies} datagrams of them were late, not lost")
        if window.verdict_queries:
            why.append(f"{window.verdict_queries} acknowledged but their verdict late")
        late = f" ({'; '.join(why)})" if why else ""
        parts.append(f"{window.shares_sent_again} shares sent again{late}")
    if window.ack_datagrams:
        parts.append(f"{window.ack_datagrams} ACK datagrams")
    if window.udp_buffer_drops:
        parts.append(f"{window.udp_buffer_drops} datagrams dropped on a full receive buffer")
    if window.send_drops:
        parts.append(f"{window.send_drops} datagrams not sent (send buffer full)")
    if window.datagram_drops:
        drops = ", ".join(f"{count} {reason}" for reason, count in sorted(window.datagram_drops.items()))
        parts.append(f"datagrams dropped on receipt: {drops}")
    return "; " + ", ".join(parts) if parts else ""


async def _measure_path(
    context: _Context,
    path: str,
    entry_port: int,
    meter: LinkMeter,
    cpu_pids: dict[str, int],
    proxy: RoleProcess | None,
) -> PathRun:
    settings, progress, load = context.settings, context.progress, context.load
    label = f"{context.run_label} {path}"
    connections = await load.connect(
        context.nursery, HOST, entry_port, settings.connections, f"{ACCOUNT}.{path.replace(' ', '-')}-"
    )
    try:
        await _fresh_job(context, connections)
        if path == STRATUMRM and proxy is not None:
            await wait_for_udp(proxy)
        cpu = CpuMeter(cpu_pids)
        latency = await measure_window(
            context,
            connections,
            meter,
            cpu,
            settings.latency_rate,
            settings.latency_seconds,
            lead_in=settings.lead_in_seconds,
            pool_receipts=True,
        )
        problem = latency.loss()
        progress(
            f"{label}: {settings.latency_rate:,.0f} shares/s for {settings.latency_seconds:g} s: "
            f"{_describe_window(latency)}" + (f"; LOSS: {problem}" if problem else "")
        )
        result = PathRun(path, latency)
        await _measure_closed_loops(context, label, path, connections, meter, cpu, result)
        if settings.search:
            await _search_throughput(context, label, connections, meter, cpu, result)
        return result
    finally:
        await load.release(connections)


async def _search_throughput(
    context: _Context,
    label: str,
    connections: list[LoadConnection],
    meter: LinkMeter,
    cpu: CpuMeter,
    result: PathRun,
) -> None:
    """Raise the offered rate until a step loses or lags, then bisect."""
    settings = context.settings

    async def step(rate: float) -> bool:
        window = await measure_window(
            context,
            connections,
            meter,
            cpu,
            rate,
            settings.step_seconds,
            lead_in=settings.lead_in_seconds,
            pool_receipts=False,
        )
        result.steps.append(window)
        problem = window.loss(settings.lag_limit)
        context.progress(
            f"{label}: {rate:,.0f} shares/s offered for {settings.step_seconds:g} s: "
            + (f"not sustained, {problem}" if problem else f"sustained (verdict p99 {window.round_trip_ms(0.99):.1f} ms)")
            + _describe_resends(window)
        )
        if not await context.load.settle(settings.settle_timeout):
            context.progress(f"{label}: {context.load.pending()} shares still without a verdict")
        await trio.sleep(STEP_PAUSE)
        if problem is not None:
            result.failed_rates.append(rate)
        elif rate > result.max_sustained:
            result.max_sustained = rate
            result.best_step = window
        return problem is None

    # Doubling steps: a rate that fails does not end the search at once, because a
    # busier process batches more and may cope with twice the rate; two failures in
    # a row (or max_rate) do.
    rate = settings.start_rate
    failures_in_a_row = 0
    while rate <= settings.max_rate and failures_in_a_row < FAILURES_TO_STOP:
        failures_in_a_row = 0 if await step(rate) else failures_in_a_row + 1
        rate *= 2
    if not result.max_sustained:  # even the first steps failed: look lower
        rate = settings.start_rate / 4
        while rate >= MIN_SEARCH_RATE and not await step(rate):
            rate /= 4
    # Bisect between the best rate and the next failed one above it.
    above = [rate for rate in result.failed_rates if rate > result.max_sustained]
    if not result.max_sustained or not above:
        return
    high = min(above)
    for _ in range(settings.refine_steps):
        middle = round((result.max_sustained + high) / 2, -2)
        if not result.max_sustained < middle < high:
            break
        if not await step(middle):
            high = middle


async def _measure_lossy(context: _Context, cpu_pids: dict[str, int]) -> LossyRun:
    """StratumRM with its UDP through a lossy link: latency and retransmissions."""
    settings, pki, launcher = context.settings, context.pki, context.launcher
    pool_port = context.pool.ready["ports"]["lossy"]
    sidecar_udp, link_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    started: list[RoleProcess] = []
    try:
        link = await launcher.start(
            "lossy-link",
            "lossy-link",
            [
                "--port",
                str(link_port),
                "--target-port",
                str(sidecar_udp),
                "--loss",
                str(settings.lossy_percent),
                "--delay-ms",
                str(settings.lossy_delay_ms),
                "--seed",
                "7",
            ],
        )
        started.append(link)
        sidecar = await launcher.start(
            "sidecar-lossy",
            "sidecar",
            [*_sidecar_options(pki, pool_port), "--udp-port", str(sidecar_udp), "--advertise-port", str(link_port)],
        )
        started.append(sidecar)
        proxy = await launcher.start(
            "proxy-lossy",
            "proxy",
            ["--upstream", f"stratumrm://{HOST}:{sidecar.ready['port']}", "--bundle", str(pki.miner_bundle)],
        )
        started.append(proxy)
        connections = await context.load.connect(
            context.nursery, HOST, proxy.ready["port"], settings.connections, f"{ACCOUNT}.lossy-"
        )
        try:
            await _fresh_job(context, connections)
            await wait_for_udp(proxy)
            link_before = await link.request("stats")
            meter = LinkMeter([sidecar.ready["port"]], proxy, sidecar)
            cpu = CpuMeter({"proxy": proxy.pid, "sidecar": sidecar.pid, **cpu_pids})
            window = await measure_window(
                context,
                connections,
                meter,
                cpu,
                settings.latency_rate,
                settings.latency_seconds,
                lead_in=settings.lead_in_seconds,
                pool_receipts=True,
            )
            link_after = await link.request("stats")
        finally:
            await context.load.release(connections)
        dropped = sum(
            link_after[direction]["dropped"] - link_before[direction]["dropped"] for direction in ("to_target", "to_client")
        )
        problem = window.loss()
        context.progress(
            f"{context.run_label} stratumrm, {settings.lossy_percent:g} % UDP loss each way: {_describe_window(window)}; "
            f"the link dropped {dropped} datagrams in the step" + (f"; LOSS: {problem}" if problem else "")
        )
        return LossyRun(window, dropped)
    finally:
        for process in reversed(started):
            await process.stop()


def _sidecar_options(pki: TestPKI, pool_port: int) -> list[str]:
    return [
        "--pool",
        f"stratum+tcp://{HOST}:{pool_port}",
        "--cert",
        str(pki.pool_certificate),
        "--key",
        str(pki.pool_key),
        "--ca",
        str(pki.ca_certificate),
    ]


async def run_once(
    settings: TransportSettings,
    pki: TestPKI,
    launcher: RoleLauncher,
    progress: Progress,
    run_label: str,
    serial_start: int,
) -> TransportRun:
    """One run: start every process, measure every path and the lossy case, stop everything."""
    started: list[RoleProcess] = []
    stunnel: StunnelPair | None = None
    bare: BarePair | None = None
    try:
        pool = await launcher.start(
            "pool",
            "pool",
            [
                "--listener",
                "direct",
                "--listener",
                "sv1",
                "--listener",
                "rm",
                "--listener",
                "lossy",
                "--listener",
                "stunnel",
                "--listener",
                "bare",
                "--tls-listener",
                "tls",
                "--cert",
                str(pki.pool_certificate),
                "--key",
                str(pki.pool_key),
                "--max-merkle-branches",
                "0",
            ],
        )
        started.append(pool)
        ports = pool.ready["ports"]
        proxy_sv1 = await launcher.start("proxy-sv1", "proxy", ["--upstream", f"stratum+tcp://{HOST}:{ports['sv1']}"])
        started.append(proxy_sv1)
        proxy_tls = await launcher.start(
            "proxy-tls", "proxy", ["--upstream", f"stratum+ssl://{HOST}:{ports['tls']}", "--upstream-ca", str(pki.ca_certificate)]
        )
        started.append(proxy_tls)
        sidecar = await launcher.start("sidecar", "sidecar", _sidecar_options(pki, ports["rm"]))
        started.append(sidecar)
        proxy_rm = await launcher.start(
            "proxy-rm", "proxy", ["--upstream", f"stratumrm://{HOST}:{sidecar.ready['port']}", "--bundle", str(pki.miner_bundle)]
        )
        started.append(proxy_rm)
        if stunnel_binary() is not None:
            stunnel = StunnelPair(
                launcher.log_dir / "stunnel", HOST, ports["stunnel"], pki.pool_certificate, pki.pool_key, pki.ca_certificate
            )
            await stunnel.start()
        bare = BarePair(HOST, ports["bare"])
        await bare.start()

        common_pids = {"pool": pool.pid, "load": os.getpid()}
        plan: list[tuple[str, int, LinkMeter, dict[str, int], RoleProcess | None]] = [
            (DIRECT, ports["direct"], LinkMeter([ports["direct"]]), common_pids, None),
            (SV1_RELAY, proxy_sv1.ready["port"], LinkMeter([ports["sv1"]]), {"proxy": proxy_sv1.pid, **common_pids}, proxy_sv1),
            (SV1_TLS, proxy_tls.ready["port"], LinkMeter([ports["tls"]]), {"proxy": proxy_tls.pid, **common_pids}, proxy_tls),
        ]
        if stunnel is not None:
            plan.append((STUNNEL, stunnel.entry_port, LinkMeter([stunnel.link_port]), {**stunnel.pids, **common_pids}, None))
        plan.append((BARE, bare.entry_port, LinkMeter([]), {**bare.pids, **common_pids}, None))
        plan += [
            (
                STRATUMRM,
                proxy_rm.ready["port"],
                LinkMeter([sidecar.ready["port"]], proxy_rm, sidecar),
                {"proxy": proxy_rm.pid, "sidecar": sidecar.pid, **common_pids},
                proxy_rm,
            ),
        ]
        if settings.pair_only:
            plan = [entry for entry in plan if entry[0] in (STUNNEL, STRATUMRM)]
        results: dict[str, PathRun] = {}
        async with trio.open_nursery() as nursery:
            load = LoadGenerator(iter(range(serial_start, 1 << 62)))
            context = _Context(settings, progress, launcher, pki, load, nursery, pool, run_label)
            for path, entry_port, meter, pids, proxy in plan:
                results[path] = await _measure_path(context, path, entry_port, meter, pids, proxy)
            lossy = await _measure_lossy(context, common_pids) if settings.lossy_percent > 0 else None
            await load.aclose()
            nursery.cancel_scope.cancel()
        return TransportRun(results, lossy)
    finally:
        if stunnel is not None:
            await stunnel.stop()
        if bare is not None:
            await bare.stop()
        for process in reversed(started):
            await process.stop()


async def run(
    settings: TransportSettings,
    progress: Progress,
    log_root: Path | None = None,
    *,
    verbose_logs: bool = False,
    profile: bool = False,
) -> list[TransportRun]:
    """Every run of the transport benchmark.

    The processes' logs go under ``log_root`` (default: a temporary directory), at
    info level with ``verbose_logs``; with ``profile`` each process also leaves its
    cProfile statistics there (``NAME.pstats``).
    """
    with tempfile.TemporaryDirectory(prefix="stratumrm-bench-") as temporary:
        base = log_root or Path(temporary)
        pki = make_test_pki(Path(temporary) / "pki", accounts=(ACCOUNT,))
        runs = []
        for index in range(settings.runs):
            log_dir = base / f"transport-run{index + 1}"
            log_dir.mkdir(parents=True, exist_ok=True)
            label = f"[transport {index + 1}/{settings.runs}]"
            launcher = RoleLauncher(log_dir, verbose=verbose_logs, profile=profile)
            runs.append(await run_once(settings, pki, launcher, progress, label, serial_start=1 + index * (1 << 40)))
        return runs


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class PathSummary:
    """Medians over the runs for one path."""

    path: str
    bytes_up: float
    bytes_down: float
    packets: float
    latency_p50: float
    latency_p99: float
    round_trip_p50: float
    max_sustained: float
    first_failure: float
    cpu_at_latency_rate: dict[str, float]
    cpu_at_max: dict[str, float]
    bytes_at_max: float
    split: dict[str, float]
    datagrams_per_share: float
    sent_again_at_max_percent: float
    closed: ClosedSummary | None = None

    @property
    def bytes_total(self) -> float:
        return self.bytes_up + self.bytes_down


@dataclass(frozen=True)
class ClosedSummary:
    """Medians over the runs of one path's closed-loop windows."""

    lone_bytes: float
    lone_udp_datagrams: float
    lone_kernel_udp_datagrams: float
    lone_p50_ms: float
    lone_p99_ms: float
    lone_round_trip_p50_ms: float
    return_leg_p50_ms: float
    answer_leg_p50_ms: float
    """Pool's answer -> verdict at the rig, p50 (ms)."""
    lone_sent_again: float
    lone_acks_per_share: float
    closed_rate: float
    closed_loss: str | None
    closed_cpu_us: float
    closed_sent_again: float
    slow_sent_again: float
    slow_shares: float


def _closed_summary(results: list[PathRun]) -> ClosedSummary | None:
    lone = [r.lone for r in results if r.lone is not None]
    closed = [r.closed for r in results if r.closed is not None]
    slow = [r.slow for r in results if r.slow is not None]
    if not lone or not closed:
        return None
    losses = [w.loss() for w in closed if w.loss()]

    def pair_cpu(window: Window) -> float:
        per_share = window.cpu_us_per_share()
        return sum(per_share.get(name, 0.0) for name in ("proxy", "sidecar"))

    return ClosedSummary(
        lone_bytes=median(sum(w.bytes_per_share()) for w in lone),
        lone_udp_datagrams=median(w.udp_traffic.packets_up + w.udp_traffic.packets_down for w in lone),
        lone_kernel_udp_datagrams=median(w.kernel_udp_datagrams for w in lone),
        lone_p50_ms=median(w.latency_ms(0.5) for w in lone),
        lone_p99_ms=median(w.latency_ms(0.99) for w in lone),
        lone_round_trip_p50_ms=median(w.round_trip_ms(0.5) for w in lone),
        return_leg_p50_ms=median(w.return_leg_ms(0.5) for w in lone),
        answer_leg_p50_ms=median(w.answer_leg_ms(0.5) for w in lone),
        lone_sent_again=median(w.shares_sent_again for w in lone),
        lone_acks_per_share=median(w.ack_datagrams / max(1, w.shares) for w in lone),
        closed_rate=median(w.rate if w.loss() is None else 0.0 for w in closed),
        closed_loss=losses[0] if losses else None,
        closed_cpu_us=median(pair_cpu(w) for w in closed),
        closed_sent_again=median(w.shares_sent_again for w in closed),
        slow_sent_again=median(w.shares_sent_again for w in slow) if slow else math.nan,
        slow_shares=median(w.shares for w in slow) if slow else math.nan,
    )


@dataclass(frozen=True)
class LossySummary:
    latency_p50: float
    latency_p99: float
    sent_again_percent: float
    dropped: float


@dataclass(frozen=True)
class TransportSummary:
    settings: TransportSettings
    paths: dict[str, PathSummary]
    lossy: LossySummary | None
    runs: int


def _median_cpu(windows: list[Window | None]) -> dict[str, float]:
    per_share = [w.cpu_us_per_share() for w in windows if w is not None]
    names = sorted({name for entry in per_share for name in entry})
    return {name: median(entry.get(name, math.nan) for entry in per_share) for name in names}


def summarize(settings: TransportSettings, runs: list[TransportRun]) -> TransportSummary:
    paths: dict[str, PathSummary] = {}
    for path in PATHS:
        results = [run.paths[path] for run in runs if path in run.paths]
        if not results:
            continue
        latency = [r.latency for r in results]
        paths[path] = PathSummary(
            path=path,
            bytes_up=median(w.bytes_per_share()[0] for w in latency),
            bytes_down=median(w.bytes_per_share()[1] for w in latency),
            packets=median(w.packets_per_share() for w in latency),
            latency_p50=median(w.latency_ms(0.5) for w in latency),
            latency_p99=median(w.latency_ms(0.99) for w in latency),
            round_trip_p50=median(w.round_trip_ms(0.5) for w in latency),
            max_sustained=median(r.max_sustained for r in results),
            first_failure=median(r.first_failure for r in results),
            cpu_at_latency_rate=_median_cpu(list(latency)),
            cpu_at_max=_median_cpu([r.best_step for r in results]),
            bytes_at_max=median(sum(r.best_step.bytes_per_share()) for r in results if r.best_step is not None),
            split={part: median(w.split_per_share()[part] for w in latency) for part in latency[0].split_per_share()},
            datagrams_per_share=median(w.udp_traffic.packets_up / max(1, w.shares) for w in latency),
            sent_again_at_max_percent=median(
                100 * r.best_step.shares_sent_again / max(1, r.best_step.shares) for r in results if r.best_step is not None
            ),
            closed=_closed_summary(results),
        )
    lossy_runs = [run.lossy for run in runs if run.lossy is not None]
    lossy = None
    if lossy_runs:
        lossy = LossySummary(
            latency_p50=median(r.window.latency_ms(0.5) for r in lossy_runs),
            latency_p99=median(r.window.latency_ms(0.99) for r in lossy_runs),
            sent_again_percent=median(100 * r.window.shares_sent_again / max(1, r.window.shares) for r in lossy_runs),
            dropped=median(r.datagrams_dropped for r in lossy_runs),
        )
    return TransportSummary(settings, paths, lossy, len(runs))


def _number(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the others right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths, strict=False))
        )

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    return "\n".join(out)


def report(summary: TransportSummary) -> str:
    settings = summary.settings
    paths = summary.paths
    direct = paths.get(DIRECT)
    tls = tls_baseline(paths)
    lines = [
        (
            f"Transport benchmark: medians of {summary.runs} run(s); {settings.connections} miners per path; "
            f"bytes and latency at {settings.latency_rate:,.0f} shares/s for {settings.latency_seconds:g} s."
        ),
        (
            "Bytes: on the measured link, both directions, per share: TCP payload + 52 B per segment "
            "(IPv4 20 + TCP 32 with timestamps, ACKs included), UDP payload + 28 B per datagram."
        ),
        (
            "Latency: miner's submit write -> pool starts handling it. Sustained: zero loss and "
            f"p99 verdict round trip under {settings.lag_limit * 1e3:g} ms over {settings.step_seconds:g} s steps."
        ),
        "",
    ]
    header = [
        "path",
        "link measured",
        "B/share up",
        "down",
        "total",
        "vs TLS",
        "pkts/share",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "verdict p50 ms",
        "max shares/s",
        "first miss/s",
    ]
    rows = []
    for path, result in paths.items():
        added = result.latency_p50 - direct.latency_p50 if direct and path != DIRECT else math.nan
        versus_tls = result.bytes_total / tls.bytes_total if tls and tls.bytes_total else math.nan
        metered = path != BARE
        rows.append(
            [
                path,
                LINKS[path],
                _number(result.bytes_up) if metered else "-",
                _number(result.bytes_down) if metered else "-",
                _number(result.bytes_total) if metered else "-",
                _number(versus_tls, 2) if metered else "-",
                _number(result.packets, 2) if metered else "-",
                _number(result.latency_p50, 3),
                _number(result.latency_p99, 3),
                _number(added, 3),
                _number(result.round_trip_p50, 2),
                _number(result.max_sustained),
                _number(result.first_failure),
            ]
        )
    lines.append(format_table(header, rows))
    lines.append(
        f"(max shares/s: highest step sustained; first miss/s: lowest step not sustained, '-' when every step "
        f"up to {settings.max_rate:,.0f}/s was)"
    )
    rm = paths.get(STRATUMRM)
    if rm is not None:
        split = rm.split
        lines.append(
            f"stratumrm per share: UDP {split['udp up']:.1f} B up ({rm.datagrams_per_share:.2f} datagrams) + "
            f"{split['udp down']:.1f} B down; TLS control connection {split['tcp up']:.1f} B up + "
            f"{split['tcp down']:.1f} B down (batched verdicts and their ACKs); at its highest sustained step "
            f"the proxy sent {rm.sent_again_at_max_percent:.1f} % of the shares a second time"
        )
    if summary.lossy is not None:
        lossy = summary.lossy
        lines.append(
            f"stratumrm with {settings.lossy_percent:g} % UDP loss each way: latency p50 {lossy.latency_p50:.3f} ms, "
            f"p99 {lossy.latency_p99:.3f} ms; {lossy.sent_again_percent:.1f} % of shares sent again "
            f"({lossy.dropped:.0f} datagrams dropped)"
        )
    lines += ["", "CPU microseconds per share, per process (at the latency rate | at the highest sustained step):"]
    header = ["path", "proxy", "sidecar", "pool", "load generator", "proxy @max", "sidecar @max", "B/share @max"]
    rows = []
    for path, result in paths.items():
        low, high = result.cpu_at_latency_rate, result.cpu_at_max
        rows.append(
            [
                path,
                _number(low.get("proxy", math.nan), 1),
                _number(low.get("sidecar", math.nan), 1),
                _number(low.get("pool", math.nan), 1),
                _number(low.get("load", math.nan), 1),
                _number(high.get("proxy", math.nan), 1),
                _number(high.get("sidecar", math.nan), 1),
                _number(result.bytes_at_max) if path != BARE else "-",
            ]
        )
    lines.append(format_table(header, rows))
    lines += ["", *closed_report(summary), "", *targets(summary)]
    return "\n".join(lines)


def tls_baseline(paths: dict[str, PathSummary]) -> PathSummary | None:
    """What "SV1 over TLS" means in the wire-efficiency issue: the stunnel pair (two processes,
    as StratumRM's proxy and sidecar), else the project's proxy speaking stratum+ssl://."""
    return paths.get(STUNNEL) or paths.get(SV1_TLS)


def closed_report(summary: TransportSummary) -> list[str]:
    """The wire-efficiency issue's table: closed loops, ratios against SV1 over TLS of the same runs."""
    paths = summary.paths
    settings = summary.settings
    tls = tls_baseline(paths)
    direct = paths.get(DIRECT)
    tls_closed = tls.closed if tls is not None else None
    direct_closed = direct.closed if direct is not None else None
    if tls_closed is None:
        return []
    lines = [
        f"Closed loop (medians of {summary.runs} run(s)): lone share = 1 rig, 1 share in flight, "
        f"{settings.lone_seconds:g} s; throughput = {settings.connections} rigs x {settings.closed_in_flight} in flight, "
        f"{settings.closed_seconds:g} s. Bytes: share + verdict + every ACK, both ways, with IP/TCP/UDP headers.",
        "Latency: submit -> pool receipt (+p50: added over direct); return leg: pool receipt -> verdict at the rig; "
        "answer -> rig: the pool's answer (its verdict handed to its stream) -> verdict at the rig (+: added over direct).",
        "",
    ]
    header = [
        "path",
        "lone B/share",
        "vs TLS",
        "p50 us",
        "p99 us",
        "+p50 us",
        "return leg p50 us",
        "answer->rig p50 us",
        "+answer->rig us",
        "verdict p50 us",
        "shares/s",
        "vs TLS",
        "proxy+sidecar CPU us/share",
        "sent again",
    ]
    rows = []
    for path, result in paths.items():
        c = result.closed
        if c is None:
            continue
        added = c.lone_p50_ms - direct_closed.lone_p50_ms if direct_closed and path != DIRECT else math.nan
        added_back = c.answer_leg_p50_ms - direct_closed.answer_leg_p50_ms if direct_closed and path != DIRECT else math.nan
        rows.append(
            [
                path,
                _number(c.lone_bytes) if path != BARE else "-",
                _number(c.lone_bytes / tls_closed.lone_bytes, 2) if path != BARE else "-",
                _number(c.lone_p50_ms * 1e3),
                _number(c.lone_p99_ms * 1e3),
                _number(added * 1e3),
                _number(c.return_leg_p50_ms * 1e3),
                _number(c.answer_leg_p50_ms * 1e3),
                _number(added_back * 1e3),
                _number(c.lone_round_trip_p50_ms * 1e3),
                _number(c.closed_rate),
                _number(c.closed_rate / tls_closed.closed_rate if tls_closed.closed_rate else math.nan, 2),
                _number(c.closed_cpu_us, 1) if path in (SV1_RELAY, SV1_TLS, STUNNEL, BARE, STRATUMRM) else "-",
                _number(c.lone_sent_again + c.closed_sent_again),
            ]
        )
    lines.append(format_table(header, rows))
    rm = paths.get(STRATUMRM)
    if rm is not None and rm.closed is not None:
        c = rm.closed
        if c.closed_loss:
            lines.append(f"stratumrm {settings.connections} x {settings.closed_in_flight}: NOT zero loss: {c.closed_loss}")
        lines.append(
            f"stratumrm lone share: {c.lone_udp_datagrams:.0f} UDP datagrams counted by proxy and sidecar, "
            f"{c.lone_kernel_udp_datagrams:.0f} sent by the whole host per the kernel (/proc/net/snmp; other "
            f"programs can only add to it); {c.lone_acks_per_share:.4f} ACK datagrams per share (verdicts slower "
            "than the sidecar's max_ack_delay)"
        )
        lines.append(
            f"stratumrm, pool answering {settings.slow_pool_delay * 1e3:g} ms late: {c.slow_sent_again:.0f} shares sent "
            f"again of {c.slow_shares:.0f}; at 0 % loss: {c.lone_sent_again + c.closed_sent_again:.0f} sent again"
        )
    return lines


def targets(summary: TransportSummary) -> list[str]:
    """The issue's targets against what was measured."""
    paths = summary.paths
    rm, direct, tls = paths.get(STRATUMRM), paths.get(DIRECT), paths.get(SV1_TLS)
    if rm is None:
        return []

    def verdict(met: bool) -> str:
        return "met" if met else "MISSED"

    out = [*closed_targets(summary), "", "Targets (StratumRM issue, item 9):"]
    ratio = f", {rm.bytes_total / tls.bytes_total:.2f}x SV1 over TLS ({tls.bytes_total:.0f} B)" if tls else ""
    out.append(
        f"  bytes on the wire per share <= {TARGET_BYTES_PER_SHARE:g}: {rm.bytes_total:.0f}{ratio} -> "
        f"{verdict(rm.bytes_total <= TARGET_BYTES_PER_SHARE)}"
    )
    out.append(
        f"  sustained through the pair with zero loss >= {TARGET_SHARES_PER_SECOND:,.0f}/s: {rm.max_sustained:,.0f}/s -> "
        f"{verdict(rm.max_sustained >= TARGET_SHARES_PER_SECOND)}"
    )
    if direct is not None:
        added = rm.latency_p50 - direct.latency_p50
        out.append(
            f"  added p50 latency through the pair < {TARGET_ADDED_P50_MS:g} ms: {added:.3f} ms -> "
            f"{verdict(added < TARGET_ADDED_P50_MS)}"
        )
    busiest = max(rm.cpu_at_max.get("proxy", math.nan), rm.cpu_at_max.get("sidecar", math.nan))
    if not math.isnan(busiest) and busiest > 0:
        out.append(
            f"  (the busier of proxy and sidecar used {busiest:.1f} µs per share at its best step: on a core of "
            f"its own it would cap the pair near {1e6 / busiest:,.0f} shares/s)"
        )
    return out


def closed_targets(summary: TransportSummary) -> list[str]:
    """The wire-efficiency issue's targets (data channel v2) against the closed-loop windows."""
    paths = summary.paths
    rm, tls, direct = paths.get(STRATUMRM), tls_baseline(paths), paths.get(DIRECT)
    if rm is None or tls is None or rm.closed is None or tls.closed is None:
        return []
    c, t = rm.closed, tls.closed

    def verdict(met: bool) -> str:
        return "met" if met else "MISSED"

    out = [f"Targets (wire-efficiency issue, data channel v2), against SV1 over TLS ({tls.path}) in the same runs:"]
    ratio = c.lone_bytes / t.lone_bytes
    out.append(
        f"  1. lone share bytes <= {TARGET_LONE_RATIO:g}x: {c.lone_bytes:.0f} B vs {t.lone_bytes:.0f} B = {ratio:.2f}x -> "
        f"{verdict(ratio <= TARGET_LONE_RATIO)}"
    )
    if direct is not None and direct.closed is not None:
        added_rm = c.lone_p50_ms - direct.closed.lone_p50_ms
        added_tls = t.lone_p50_ms - direct.closed.lone_p50_ms
        out.append(
            f"  3. added p50 submit -> pool <= the TLS pair's: {added_rm * 1e3:.0f} us vs {added_tls * 1e3:.0f} us "
            f"({_ratio(added_rm, added_tls)}) -> {verdict(added_rm <= added_tls)}"
        )
        bare = paths.get(BARE)
        if bare is not None and bare.closed is not None:
            added_bare = bare.closed.lone_p50_ms - direct.closed.lone_p50_ms
            out.append(
                f"     (the floor: two Python processes that only copy bytes, TCP -> UDP -> TCP, add {added_bare * 1e3:.0f} us, "
                f"{_ratio(added_bare, added_tls)} the TLS pair's)"
            )
    answer_leg = f"{c.answer_leg_p50_ms * 1e3:.0f} us (SV1 over TLS {t.answer_leg_p50_ms * 1e3:.0f} us"
    if direct is not None and direct.closed is not None:
        answer_leg += f", direct {direct.closed.answer_leg_p50_ms * 1e3:.0f} us"
    out.append(
        f"  3. verdict back at the rig within {TARGET_RETURN_LEG_MS:g} ms of the pool's answer at p50: {answer_leg}) -> "
        f"{verdict(c.answer_leg_p50_ms <= TARGET_RETURN_LEG_MS)}"
    )
    out.append(
        f"  4. {summary.settings.connections} x {summary.settings.closed_in_flight} in flight >= the TLS pair: "
        f"{c.closed_rate:,.0f} vs {t.closed_rate:,.0f} shares/s -> {verdict(c.closed_rate >= t.closed_rate)}; "
        f">= {TARGET_CLOSED_SHARES_PER_SECOND:,.0f}/s -> {verdict(c.closed_rate >= TARGET_CLOSED_SHARES_PER_SECOND)}; "
        f"proxy+sidecar CPU <= {TARGET_CPU_US_PER_SHARE:g} us/share: {c.closed_cpu_us:.1f} -> "
        f"{verdict(c.closed_cpu_us <= TARGET_CPU_US_PER_SHARE)}"
    )
    resent = c.lone_sent_again + c.closed_sent_again + (0 if math.isnan(c.slow_sent_again) else c.slow_sent_again)
    out.append(
        f"  5. no retransmission at 0 % loss, also with a {summary.settings.slow_pool_delay * 1e3:g} ms pool: "
        f"{resent:.0f} -> {verdict(resent == 0)}"
    )
    if summary.lossy is not None:
        out.append(
            f"  6. {summary.settings.lossy_percent:g} % loss, {summary.settings.lossy_delay_ms:g} ms each way: p99 submit -> "
            f"pool {summary.lossy.latency_p99:.1f} ms (SV1 over TLS under loss is not measured here: no netem)"
        )
    out.append("  2. the realistic farm: stratumrm bench farm")
    return out


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference > 0 else "-"


def with_overrides(settings: TransportSettings, **overrides: Any) -> TransportSettings:
    """``settings`` with the given fields replaced (None values are ignored)."""
    return replace(settings, **{name: value for name, value in overrides.items() if value is not None})
