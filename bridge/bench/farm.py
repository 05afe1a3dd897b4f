"""``stratumrm bench farm``: link bytes per miner per hour for a farm behind one proxy.

The scenario: ``miners`` miners, each submitting a
share at random moments, one every ``share_interval`` seconds on average (the load is a
Poisson process over the whole farm, each share going to a miner drawn at random); the pool sends a new job every
``job_interval`` seconds and on each new block (every ``block_interval`` seconds),
the same ``mining.notify`` to every connection, as most pools do. The same farm is
measured three ways:

==========  ==========================================  ==============================
variant     chain                                        link measured
==========  ==========================================  ==============================
sv1         miners → pool, SV1 over TCP                  every miner ↔ pool connection
sv1 in tls  miners → pool, SV1 in TLS                    every miner ↔ pool connection
stratumrm   miners → proxy → sidecar → pool              proxy ↔ sidecar: TLS control
                                                          connection + UDP datagrams
==========  ==========================================  ==============================

StratumRM sends a job that many channels receive identically once (``rm.job``) plus
one ``rm.notify`` naming the channels, batches verdicts into ``rm.results`` lines,
and lets shares that arrive within a short window share a datagram.

**Time scaling.** Running an hour is not practical, so every interval is divided by
``time_scale`` (10 by default: a share every 0.5 s per miner, a job every 3 s, a
block every minute; the 60 s window covers 10 farm minutes, 20 jobs and one block),
and so are the two batching windows (the proxy's share window of 1 ms and the
sidecar's verdict and notify window of 2 ms), so that as many shares share a
datagram and as many verdicts share a line as they would at full scale. What cannot
be scaled is the machine: the scaled-up load keeps every process busier, and a busy
process batches more of what piles up while it waits for a core (at scale 30 on two
cores, 4 to 11 shares per datagram instead of about 1). The report prints the shares
per datagram and verdicts per line it saw; keep ``time_scale`` low enough that they
stay near 1. Bytes per miner per hour = bytes in the window / miners / (window ×
time_scale / 3600 s).

**Counting** is the transport benchmark's (:mod:`bridge.bench.transport`): TCP
payload and segments (ACKs included) from the kernel's ``tcp_info`` of the server
ends, + 52 bytes per segment; UDP payload + 28 bytes per datagram; over a window of
``seconds`` in the middle of steady load, after ``warmup_seconds`` (connections and
TLS handshakes are not counted). Each variant gets a fresh pool with the same seed:
the same sequence of jobs (merkle branches and all), though a window may start a job
or two further along it.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bridge.bench.load import LoadGenerator
from bridge.bench.measure import CpuMeter, LinkTraffic, median
from bridge.bench.roles import HOST, RoleLauncher, RoleProcess
from bridge.bench.transport import ACCOUNT, LinkMeter, format_table, wait_for_udp
from bridge.pki.tls import public_client_context
from bridge.testing.pki import TestPKI, make_test_pki

Progress = Callable[[str], None]

SV1 = "sv1"
SV1_TLS = "sv1 in tls"
STRATUMRM = "stratumrm"
VARIANTS = (SV1, SV1_TLS, STRATUMRM)
LINKS = {
    SV1: "miner<->pool TCP",
    SV1_TLS: "miner<->pool TLS",
    STRATUMRM: "proxy<->sidecar TLS+UDP",
}
TARGET_RATIO_TO_TLS = 0.2
SECONDS_PER_HOUR = 3600.0
#: Load keeps coming this long after the measured window, so the window ends in steady state.
TAIL_SECONDS = 1.0


@dataclass(frozen=True)
class FarmSettings:
    """The farm and how its time is scaled (defaults: the full benchmark)."""

    runs: int = 3
    miners: int = 500
    share_interval: float = 10.0
    job_interval: float = 30.0
    block_interval: float = 600.0
    time_scale: float = 10.0
    seconds: float = 60.0
    warmup_seconds: float = 2.0
    share_window: float = 0.001
    verdict_window: float = 0.002
    settle_timeout: float = 30.0

    @classmethod
    def quick(cls) -> FarmSettings:
        """One short run of a small farm: checks that everything works."""
        return cls(runs=1, miners=40, seconds=1.5, warmup_seconds=0.5, settle_timeout=10.0)

    @property
    def simulated_hours(self) -> float:
        """Farm time covered by the measured window."""
        return self.seconds * self.time_scale / SECONDS_PER_HOUR

    @property
    def shares_per_second(self) -> float:
        """The offered load in wall-clock time."""
        return self.miners * self.time_scale / self.share_interval


@dataclass(frozen=True)
class FarmWindow:
    """One variant in one run."""

    variant: str
    tcp_traffic: LinkTraffic
    udp_traffic: LinkTraffic
    shares: int
    jobs: int
    blocks: int
    accepted: int
    rejected: int
    results_lines: int = 0
    """``rm.results`` lines the sidecar wrote in the window (StratumRM only)."""
    job_lines: int = 0
    verdict_datagrams: int = 0
    """VERDICT datagrams the sidecar sent in the window (StratumRM only)."""
    ack_datagrams: int = 0
    """ACK datagrams the sidecar sent in the window (StratumRM only)."""
    sent_again: int = 0
    """Shares the proxy sent again in the window (StratumRM only)."""
    late_copies: int = 0
    """Datagrams among those whose first copy was acknowledged after all (late, not lost)."""
    verdict_queries: int = 0
    udp_drops: int = 0
    """Datagrams dropped in the kernel: full send buffers of proxy and sidecar, full receive buffers (host-wide)."""
    """``rm.job`` plus ``rm.notify`` lines the sidecar wrote in the window (StratumRM only)."""
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    """CPU time of each process over the window."""

    @property
    def traffic(self) -> LinkTraffic:
        return self.tcp_traffic + self.udp_traffic


async def _measure_variant(
    settings: FarmSettings,
    variant: str,
    pki: TestPKI,
    launcher: RoleLauncher,
    seed: int,
    label: str,
    progress: Progress,
) -> FarmWindow:
    scale = settings.time_scale
    started: list[RoleProcess] = []
    try:
        listener = (
            ["--tls-listener", "farm", "--cert", str(pki.pool_certificate), "--key", str(pki.pool_key)]
            if variant == SV1_TLS
            else ["--listener", "farm"]
        )
        pool = await launcher.start(
            f"farm-pool-{variant.replace(' ', '-')}",
            "pool",
            [
                *listener,
                "--notify-interval",
                repr(settings.job_interval / scale),
                "--block-interval",
                repr(settings.block_interval / scale),
                "--seed",
                str(seed),
            ],
        )
        started.append(pool)
        pool_port = pool.ready["ports"]["farm"]
        proxy: RoleProcess | None = None
        sidecar: RoleProcess | None = None
        if variant == STRATUMRM:
            sidecar = await launcher.start(
                "farm-sidecar",
                "sidecar",
                [
                    "--pool",
                    f"stratum+tcp://{HOST}:{pool_port}",
                    "--cert",
                    str(pki.pool_certificate),
                    "--key",
                    str(pki.pool_key),
                    "--ca",
                    str(pki.ca_certificate),
                    "--batch-window",
                    repr(settings.verdict_window / scale),
                ],
            )
            started.append(sidecar)
            proxy = await launcher.start(
                "farm-proxy",
                "proxy",
                [
                    "--upstream",
                    f"stratumrm://{HOST}:{sidecar.ready['port']}",
                    "--bundle",
                    str(pki.miner_bundle),
                    "--share-batch-window",
                    repr(settings.share_window / scale),
                ],
            )
            started.append(proxy)
            entry_port = proxy.ready["port"]
            meter = LinkMeter([sidecar.ready["port"]], proxy, sidecar)
        else:
            entry_port = pool_port
            meter = LinkMeter([pool_port])
        context = public_client_context(pki.ca_certificate) if variant == SV1_TLS else None
        pids = {"pool": pool.pid, "load": os.getpid()}
        if proxy is not None and sidecar is not None:
            pids |= {"proxy": proxy.pid, "sidecar": sidecar.pid}
        cpu = CpuMeter(pids)

        async with trio.open_nursery() as nursery:
            load = LoadGenerator()
            connections = await load.connect(
                nursery, HOST, entry_port, settings.miners, f"{ACCOUNT}.farm-", ssl_context=context, timeout=120.0
            )
            if proxy is not None:
                await wait_for_udp(proxy)
            duration = settings.warmup_seconds + settings.seconds + TAIL_SECONDS
            async with trio.open_nursery() as pacing:
                pacing.start_soon(
                    partial(load.offer, randomly=random.Random(seed)), settings.shares_per_second, duration, connections
                )
                await trio.sleep(settings.warmup_seconds)
                stats_before = await pool.request("stats")
                sidecar_before = await sidecar.request("stats") if sidecar is not None else {}
                totals_before = load.totals()
                await meter.start()
                cpu.start()
                await trio.sleep(settings.seconds)
                cpu_seconds = cpu.seconds()
                link = await meter.reading()
                totals_after = load.totals()
                stats_after = await pool.request("stats")
                sidecar_after = await sidecar.request("stats") if sidecar is not None else {}
            await load.settle(settings.settle_timeout)
            await load.aclose()
            nursery.cancel_scope.cancel()
        window = FarmWindow(
            variant=variant,
            tcp_traffic=link.tcp,
            udp_traffic=link.udp,
            shares=totals_after.submitted - totals_before.submitted,
            jobs=stats_after["jobs_created"] - stats_before["jobs_created"],
            blocks=stats_after["height"] - stats_before["height"],
            accepted=totals_after.accepted - totals_before.accepted,
            rejected=totals_after.rejected - totals_before.rejected,
            results_lines=sidecar_after.get("results_lines", 0) - sidecar_before.get("results_lines", 0),
            job_lines=sum(sidecar_after.get(name, 0) - sidecar_before.get(name, 0) for name in ("job_lines", "notify_lines")),
            verdict_datagrams=sidecar_after.get("verdict_datagrams_sent", 0) - sidecar_before.get("verdict_datagrams_sent", 0),
            ack_datagrams=sidecar_after.get("ack_datagrams_sent", 0) - sidecar_before.get("ack_datagrams_sent", 0),
            sent_again=link.shares_sent_again,
            late_copies=link.late_copies,
            verdict_queries=link.verdict_queries,
            udp_drops=link.send_drops + link.udp_buffer_drops,
            cpu_seconds=cpu_seconds,
        )
        per_hour = window.traffic.wire_total / settings.miners / settings.simulated_hours
        progress(
            f"{label} {variant}: {settings.miners} miners, {window.shares} shares, {window.jobs} jobs "
            f"({window.blocks} new blocks) in {settings.seconds:g} s = {settings.simulated_hours * 60:g} farm minutes: "
            f"{per_hour / 1e3:,.1f} kB per miner per hour on the {LINKS[variant]} link; CPU "
            + ", ".join(f"{name} {seconds / settings.seconds:.0%}" for name, seconds in cpu_seconds.items())
            + (_describe_udp(window) if variant == STRATUMRM else "")
        )
        return window
    finally:
        for process in reversed(started):
            await process.stop()


def _describe_udp(window: FarmWindow) -> str:
    """Where StratumRM's bytes went: datagrams each way, control bytes, copies."""
    shares = window.shares or 1
    udp, tcp = window.udp_traffic, window.tcp_traffic
    return (
        f"; per share: UDP {udp.wire_up / shares:.1f} B up in {udp.packets_up:,} datagrams, "
        f"{udp.wire_down / shares:.1f} B down in {window.verdict_datagrams:,} VERDICT + {window.ack_datagrams:,} ACK "
        f"datagrams, control TLS {tcp.wire_total / shares:.1f} B; {window.sent_again} shares sent again "
        f"({window.verdict_queries} asking for a late verdict; {window.late_copies} datagrams late, not lost); "
        f"{window.udp_drops} datagrams dropped in the kernel"
    )


async def run(
    settings: FarmSettings, progress: Progress, log_root: Path | None = None, *, verbose_logs: bool = False, profile: bool = False
) -> list[dict[str, FarmWindow]]:
    """Every run of the farm benchmark, each variant with a fresh pool (same seed within a run).

    The processes' logs go under ``log_root`` (default: a temporary directory), at
    info level with ``verbose_logs``; with ``profile`` each process also leaves its
    cProfile statistics there (``NAME.pstats``).
    """
    with tempfile.TemporaryDirectory(prefix="stratumrm-farm-") as temporary:
        base = log_root or Path(temporary)
        pki = make_test_pki(Path(temporary) / "pki", accounts=(ACCOUNT,))
        runs = []
        for index in range(settings.runs):
            log_dir = base / f"farm-run{index + 1}"
            log_dir.mkdir(parents=True, exist_ok=True)
            label = f"[farm {index + 1}/{settings.runs}]"
            launcher = RoleLauncher(log_dir, verbose=verbose_logs, profile=profile)
            runs.append(
                {
                    variant: await _measure_variant(settings, variant, pki, launcher, index + 1, label, progress)
                    for variant in VARIANTS
                }
            )
        return runs


@dataclass(frozen=True)
class FarmSummary:
    settings: FarmSettings
    runs: int
    bytes_per_miner_hour: dict[str, float]
    up_per_miner_hour: dict[str, float]
    down_per_miner_hour: dict[str, float]
    jobs_per_hour: dict[str, float]
    shares_per_miner_hour: dict[str, float]
    shares_per_datagram: float
    verdicts_per_datagram: float
    control_lines_per_job: float
    ratios_to_tls: list[float] = field(default_factory=list)
    """StratumRM's link bytes over SV1 in TLS's, each run against the TLS variant of the same run."""

    @property
    def ratio_to_tls(self) -> float:
        """The median of the per-run ratios."""
        return median(self.ratios_to_tls) if self.ratios_to_tls else math.nan


def summarize(settings: FarmSettings, runs: list[dict[str, FarmWindow]]) -> FarmSummary:
    scale = settings.miners * settings.simulated_hours

    def medians(value: Callable[[FarmWindow], float]) -> dict[str, float]:
        return {variant: median(value(run[variant]) for run in runs if variant in run) for variant in VARIANTS}

    return FarmSummary(
        settings=settings,
        runs=len(runs),
        bytes_per_miner_hour=medians(lambda w: w.traffic.wire_total / scale),
        up_per_miner_hour=medians(lambda w: w.traffic.wire_up / scale),
        down_per_miner_hour=medians(lambda w: w.traffic.wire_down / scale),
        jobs_per_hour=medians(lambda w: w.jobs / settings.simulated_hours),
        shares_per_miner_hour=medians(lambda w: w.shares / scale),
        shares_per_datagram=median(
            r[STRATUMRM].shares / r[STRATUMRM].udp_traffic.packets_up
            for r in runs
            if STRATUMRM in r and r[STRATUMRM].udp_traffic.packets_up
        ),
        verdicts_per_datagram=median(
            r[STRATUMRM].shares / r[STRATUMRM].verdict_datagrams
            for r in runs
            if STRATUMRM in r and r[STRATUMRM].verdict_datagrams
        ),
        control_lines_per_job=median(
            r[STRATUMRM].job_lines / r[STRATUMRM].jobs for r in runs if STRATUMRM in r and r[STRATUMRM].jobs
        ),
        ratios_to_tls=[
            r[STRATUMRM].traffic.wire_total / r[SV1_TLS].traffic.wire_total
            for r in runs
            if STRATUMRM in r and SV1_TLS in r and r[SV1_TLS].traffic.wire_total
        ],
    )


def _kb(value: float) -> str:
    return "-" if math.isnan(value) else f"{value / 1e3:,.1f}"


def report(summary: FarmSummary) -> str:
    settings = summary.settings
    tls = summary.bytes_per_miner_hour.get(SV1_TLS, math.nan)
    plain = summary.bytes_per_miner_hour.get(SV1, math.nan)
    lines = [
        (
            f"Farm benchmark: medians of {summary.runs} run(s); {settings.miners} miners, a share at random moments "
            f"every {settings.share_interval:g} s on average each, a job every {settings.job_interval:g} s, a block every "
            f"{settings.block_interval:g} s; time scaled down {settings.time_scale:g}x "
            f"({settings.seconds:g} s measured = {settings.simulated_hours * 60:g} farm minutes), the proxy's "
            f"{settings.share_window * 1e3:g} ms share window and the sidecar's {settings.verdict_window * 1e3:g} ms "
            "verdict window scaled alike."
        ),
        (
            "Bytes on the measured link per miner per hour, both directions, headers and ACKs included "
            "(TCP + 52 B per segment, UDP + 28 B per datagram)."
        ),
        "",
    ]
    header = ["variant", "link measured", "kB/miner/hour", "up", "down", "vs SV1", "vs TLS", "shares/miner/h", "jobs/h"]
    rows = []
    for variant in VARIANTS:
        total = summary.bytes_per_miner_hour[variant]
        rows.append(
            [
                variant,
                LINKS[variant],
                _kb(total),
                _kb(summary.up_per_miner_hour[variant]),
                _kb(summary.down_per_miner_hour[variant]),
                f"{total / plain:.2f}" if plain else "-",
                f"{total / tls:.2f}" if tls else "-",
                f"{summary.shares_per_miner_hour[variant]:,.0f}",
                f"{summary.jobs_per_hour[variant]:,.0f}",
            ]
        )
    lines.append(format_table(header, rows))
    lines.append(
        f"stratumrm: {summary.shares_per_datagram:.2f} shares per datagram, {summary.verdicts_per_datagram:.2f} verdicts "
        f"per VERDICT datagram, {summary.control_lines_per_job:.1f} rm.job/rm.notify lines per job broadcast "
        f"(each reaching {settings.miners} miners)"
    )
    ratio = summary.ratio_to_tls
    per_run = ", ".join(f"{r:.3f}" for r in summary.ratios_to_tls)
    lines += [
        "",
        "Target (wire-efficiency issue, item 2: 500 rigs, 10 farm minutes):",
        f"  StratumRM link bytes <= {TARGET_RATIO_TO_TLS:g}x SV1 over TLS of the same run: median {ratio:.3f}x "
        f"(runs: {per_run}) -> " + ("met" if ratio <= TARGET_RATIO_TO_TLS else "MISSED"),
    ]
    return "\n".join(lines)


def with_overrides(settings: FarmSettings, **overrides: Any) -> FarmSettings:
    """``settings`` with the given fields replaced (None values are ignored)."""
    return replace(settings, **{name: value for name, value in overrides.items() if value is not None})
