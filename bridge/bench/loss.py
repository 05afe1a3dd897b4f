"""``stratumrm bench loss``: lone shares through a real lossy link, SV1 over TLS against StratumRM.

The chain is split over two network namespaces joined by the emulated link of
:mod:`bridge.testing.tun_link` (the only path between them):

==============================  =====================================  ==========================
path                            namespace a (the farm)                 namespace b (the pool)
==============================  =====================================  ==========================
sv1 over tls (stunnel pair)     rig → stunnel client (TLS 1.3)         stunnel server → pool
stratumrm pair                  rig → proxy (TLS control + UDP)        sidecar → pool
==============================  =====================================  ==========================

Every packet between the namespaces, TCP (handshake, data, ACKs, retransmissions) and
UDP alike, goes through the link, which drops ``loss`` percent of them and delays every
one ``delay_ms`` (± ``jitter_ms``), each direction on its own seeded stream. So TCP's
loss recovery (its 200 ms minimum RTO, tail loss probes) is measured for real next to
StratumRM's own.

The rig is the benchmark's synthetic cgminer-like miner (:mod:`bridge.bench.load`), its
socket made inside namespace ``a`` (:func:`bridge.testing.tun_link.inside`); the roles
are the benchmark's child processes (:mod:`bridge.bench.roles`) started under ``ip netns
exec``. Per run and path: one rig, one share in flight, closed loop (each verdict sends
the next share, as a lone rig does): ``warmup`` shares not measured (TCP's and
StratumRM's round-trip estimates, StratumRM's loss estimate), then ``shares`` measured:
p50 and p99 from the rig's write of ``mining.submit`` to the pool's read of it
(CLOCK_MONOTONIC in both processes), and the IP bytes and packets of the path's flows
on the link per share, counted by the link itself (both directions, headers, ACKs and
retransmissions included). Each run starts everything afresh (namespaces included);
the report gives the medians of the runs and the ratio of StratumRM's p99 to SV1 over
TLS's, measured in the same run.

Needs root, ``/dev/net/tun``, ``ip`` and stunnel (Debian: stunnel4).
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from bridge.bench.load import LoadConnection, LoadGenerator
from bridge.bench.measure import median, percentile
from bridge.bench.roles import HOST, RoleLauncher, RoleProcess
from bridge.bench.stunnel import StunnelPair, stunnel_binary
from bridge.testing.pki import TestPKI, make_test_pki
from bridge.testing.tun_link import ADDRESS_B, TunLab, inside, unavailable

Progress = Callable[[str], None]

TLS = "sv1 over tls (stunnel pair)"
STRATUMRM = "stratumrm pair"
PATHS = (TLS, STRATUMRM)
TARGET_P99_RATIO = 0.1
UDP_UP_TIMEOUT = 15.0
SLICE = 0.1
CLEANUP_TIMEOUT = 20.0


@dataclass(frozen=True)
class LossSettings:
    """What one ``bench loss`` measures."""

    loss: float = 2.0
    """Percent of packets the link drops, each direction."""
    delay_ms: float = 10.0
    """One-way delay of every packet."""
    jitter_ms: float = 0.0
    shares: int = 400
    """Measured lone shares per path and run."""
    warmup: int = 50
    """Shares before the measured ones, per path and run."""
    runs: int = 3
    seed: int | None = None
    """The link's random streams (None: a new seed each run)."""
    settle_timeout: float = 15.0

    @classmethod
    def quick(cls) -> LossSettings:
        return cls(shares=40, warmup=10, runs=1)


@dataclass
class PathRun:
    """One path in one run."""

    path: str
    latencies: list[float]
    """Submit → pool receipt of every measured share, seconds, sorted."""
    shares: int
    link_bytes: int
    link_packets: int
    dropped: int
    """Packets the link dropped during the measured shares (both directions, every flow)."""
    stratumrm: dict[str, int] = field(default_factory=dict)
    """StratumRM's proxy counters over the measured shares (retransmissions, copies)."""

    def latency_ms(self, fraction: float) -> float:
        return percentile(self.latencies, fraction) * 1000 if self.latencies else float("nan")

    @property
    def bytes_per_share(self) -> float:
        return self.link_bytes / self.shares if self.shares else float("nan")

    @property
    def packets_per_share(self) -> float:
        return self.link_packets / self.shares if self.shares else float("nan")


@dataclass
class LossRun:
    paths: dict[str, PathRun]

    @property
    def p99_ratio(self) -> float:
        return self.paths[STRATUMRM].latency_ms(0.99) / self.paths[TLS].latency_ms(0.99)


@dataclass
class _Rig:
    settings: LossSettings
    progress: Progress
    lab: TunLab
    link: RoleProcess
    pool: RoleProcess
    load: LoadGenerator
    nursery: trio.Nursery
    label: str


class _NamespacedStunnel(StunnelPair):
    """The stunnel pair with its client in namespace a and its server in b; readiness checked from there."""

    def __init__(self, lab: TunLab, workdir: Path, pool_port: int, pki: TestPKI) -> None:
        super().__init__(
            workdir,
            HOST,
            pool_port,
            pki.pool_certificate,
            pki.pool_key,
            pki.ca_certificate,
            link_host=ADDRESS_B,
            client_prefix=lab.exec_prefix("a"),
            server_prefix=lab.exec_prefix("b"),
        )
        self.lab = lab

    async def connect(self, name: str, host: str, port: int) -> trio.SocketStream:
        with inside(self.lab.a if name == "client" else self.lab.b):
            return await trio.open_tcp_stream(host, port)


def _flows(stats: dict[str, Any], keys: list[str]) -> tuple[int, int]:
    """IP bytes and packets of these flows, both directions."""
    total_bytes = total_packets = 0
    for direction in ("a_to_b", "b_to_a"):
        for key in keys:
            flow = stats[direction]["flows"].get(key)
            if flow is not None:
                total_bytes += flow["bytes"]
                total_packets += flow["packets"]
    return total_bytes, total_packets


def _dropped(stats: dict[str, Any]) -> int:
    return int(stats["a_to_b"]["dropped"] + stats["b_to_a"]["dropped"])


async def _closed_until(load: LoadGenerator, connections: list[LoadConnection], count: int) -> None:
    """Closed loop, one share in flight, until ``count`` more shares were submitted."""
    target = sum(c.miner.submitted for c in connections) + count
    while sum(c.miner.submitted for c in connections) < target:
        if any(c.closed for c in connections):
            raise RuntimeError(f"the rig's connection closed: {connections[0].miner.failure}")
        await load.closed_loop(1, SLICE, connections)


async def _wait_for_udp(proxy: RoleProcess) -> None:
    with trio.move_on_after(UDP_UP_TIMEOUT):
        while not ((await proxy.request("stats"))["link"] or {}).get("udp_up"):
            await trio.sleep(0.05)
        return
    raise RuntimeError(f"the StratumRM link's UDP did not come up within {UDP_UP_TIMEOUT:g} s")


_PROXY_COUNTERS = ("retransmissions_udp", "retransmissions_tls", "datagrams_sent", "redundant_copies", "shares_tls")


async def _proxy_counters(proxy: RoleProcess) -> dict[str, int]:
    link = (await proxy.request("stats"))["link"] or {}
    return {name: int(link.get(name, 0)) for name in _PROXY_COUNTERS}


async def _measure(rig: _Rig, path: str, entry_port: int, flows: list[str], proxy: RoleProcess | None) -> PathRun:
    settings, load = rig.settings, rig.load
    with inside(rig.lab.a):
        connections = await load.connect(rig.nursery, HOST, entry_port, 1, f"bench.loss-{len(load.connections)}-")
    try:
        if proxy is not None:
            await _wait_for_udp(proxy)
        await _closed_until(load, connections, settings.warmup)
        await trio.sleep(SLICE)
        await load.settle(settings.settle_timeout)
        link_before = await rig.link.request("stats")
        proxy_before = await _proxy_counters(proxy) if proxy is not None else {}
        await rig.pool.request("record", on=True)
        load.start_recording(connections)
        before = load.totals(connections)
        await _closed_until(load, connections, settings.shares)
        # A verdict read just before the loop stopped may have queued one more share, not
        # yet written (so not yet pending): let it go out, then wait for every verdict.
        await trio.sleep(SLICE)
        if not await load.settle(settings.settle_timeout):
            raise RuntimeError(f"{path}: {load.pending()} shares without a verdict after {settings.settle_timeout:g} s")
        after = load.totals(connections)
        recording = load.stop_recording(connections)
        receipts = dict(await rig.pool.request("receipts"))
        await rig.pool.request("record", on=False)
        link_after = await rig.link.request("stats")
        proxy_after = await _proxy_counters(proxy) if proxy is not None else {}
    finally:
        await load.release(connections)
    latencies = sorted(
        receipts[serial & 0xFFFFFFFF] - sent_at
        for serial, sent_at in recording.send_times.items()
        if serial & 0xFFFFFFFF in receipts
    )
    shares = after.submitted - before.submitted
    if after.rejected != before.rejected or len(latencies) != shares:
        raise RuntimeError(
            f"{path}: {shares} shares sent, {len(latencies)} seen at the pool, {after.rejected - before.rejected} rejected"
        )
    bytes_before, packets_before = _flows(link_before, flows)
    bytes_after, packets_after = _flows(link_after, flows)
    return PathRun(
        path,
        latencies,
        shares,
        bytes_after - bytes_before,
        packets_after - packets_before,
        _dropped(link_after) - _dropped(link_before),
        {name: proxy_after[name] - proxy_before[name] for name in proxy_after},
    )


def describe(run: PathRun) -> str:
    text = (
        f"{run.shares} shares, submit -> pool p50 {run.latency_ms(0.5):.1f} ms p99 {run.latency_ms(0.99):.1f} ms "
        f"max {run.latency_ms(1.0):.1f} ms, {run.bytes_per_share:.0f} B and {run.packets_per_share:.2f} packets per share "
        f"on the link, {run.dropped} packets dropped"
    )
    counters = run.stratumrm
    if counters:
        again = counters["retransmissions_udp"] + counters["retransmissions_tls"]
        text += f"; {again} shares sent again, {counters['redundant_copies']} redundant copies"
    return text


async def run_once(settings: LossSettings, pki: TestPKI, log_dir: Path, progress: Progress, label: str, order: int) -> LossRun:
    """One run: namespaces, link and roles afresh; both paths measured; everything torn down."""
    launcher = RoleLauncher(log_dir)
    started: list[RoleProcess] = []
    stunnel: _NamespacedStunnel | None = None
    with TunLab() as lab:
        try:
            link_options = [
                *("--namespace-a", lab.a, "--device-a", lab.device_a, "--namespace-b", lab.b, "--device-b", lab.device_b),
                *("--loss", str(settings.loss), "--delay-ms", str(settings.delay_ms), "--jitter-ms", str(settings.jitter_ms)),
            ]
            if settings.seed is not None:
                link_options += ["--seed", str(settings.seed + order)]
            link = await launcher.start("tun-link", "tun-link", link_options)
            started.append(link)
            in_a, in_b = lab.exec_prefix("a"), lab.exec_prefix("b")
            pool = await launcher.start(
                "pool",
                "pool",
                ["--listener", "stunnel", "--listener", "rm", "--max-merkle-branches", "0"],
                prefix=in_b,
            )
            started.append(pool)
            ports = pool.ready["ports"]
            sidecar = await launcher.start(
                "sidecar",
                "sidecar",
                [
                    *("--pool", f"stratum+tcp://{HOST}:{ports['rm']}", "--host", ADDRESS_B),
                    *("--cert", str(pki.pool_certificate), "--key", str(pki.pool_key), "--ca", str(pki.ca_certificate)),
                ],
                prefix=in_b,
            )
            started.append(sidecar)
            proxy = await launcher.start(
                "proxy",
                "proxy",
                ["--upstream", f"stratumrm://{ADDRESS_B}:{sidecar.ready['port']}", "--bundle", str(pki.miner_bundle)],
                prefix=in_a,
            )
            started.append(proxy)
            stunnel = _NamespacedStunnel(lab, log_dir / "stunnel", ports["stunnel"], pki)
            await stunnel.start()
            plan: list[tuple[str, int, list[str], RoleProcess | None]] = [
                (TLS, stunnel.entry_port, [f"tcp:{stunnel.link_port}"], None),
                (
                    STRATUMRM,
                    proxy.ready["port"],
                    [f"tcp:{sidecar.ready['port']}", f"udp:{sidecar.ready['udp_port']}"],
                    proxy,
                ),
            ]
            if order % 2:
                plan.reverse()  # alternate the order between runs
            results: dict[str, PathRun] = {}
            async with trio.open_nursery() as nursery:
                load = LoadGenerator(iter(range((order + 1) << 40, 1 << 62)))
                rig = _Rig(settings, progress, lab, link, pool, load, nursery, label)
                for path, entry_port, flows, role in plan:
                    progress(f"{label} {path}: {settings.warmup} + {settings.shares} lone shares ...")
                    results[path] = await _measure(rig, path, entry_port, flows, role)
                    progress(f"{label} {path}: {describe(results[path])}")
                await load.aclose()
                nursery.cancel_scope.cancel()
            return LossRun(results)
        finally:
            with trio.move_on_after(CLEANUP_TIMEOUT) as cleanup:
                cleanup.shield = True  # torn down even when the run was cancelled (a signal)
                if stunnel is not None:
                    await stunnel.stop()
                for process in reversed(started):
                    await process.stop()


async def run(settings: LossSettings, progress: Progress, log_root: Path | None = None) -> list[LossRun]:
    """``settings.runs`` runs; raises RuntimeError with the reason when this machine cannot run it.

    SIGTERM, SIGHUP (and SIGINT, as trio does) stop it cleanly: processes, TUN devices
    and namespaces are torn down before it raises.
    """
    reason = unavailable() or (None if stunnel_binary() else "stunnel is not installed (Debian: apt-get install stunnel4)")
    if reason:
        raise RuntimeError(reason)
    runs: list[LossRun] = []
    interrupted: list[int] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                async for number in signals:
                    interrupted.append(number)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch)
        runs = await _runs(settings, progress, log_root)
        nursery.cancel_scope.cancel()
    if interrupted:
        raise RuntimeError(f"interrupted by signal {interrupted[0]}; everything it started is torn down")
    return runs


async def _runs(settings: LossSettings, progress: Progress, log_root: Path | None) -> list[LossRun]:
    directory = Path(tempfile.mkdtemp(prefix="stratumrm-bench-loss-"))
    try:
        pki = make_test_pki(directory / "pki", pool_hosts=(HOST, "localhost", ADDRESS_B), accounts=("bench",))
        runs = []
        for index in range(settings.runs):
            label = f"[loss run {index + 1}/{settings.runs}]"
            log_dir = (log_root or directory) / f"run{index + 1}"
            log_dir.mkdir(parents=True, exist_ok=True)
            runs.append(await run_once(settings, pki, log_dir, progress, label, index))
            progress(f"{label} p99 ratio stratumrm / sv1 over tls: {runs[-1].p99_ratio:.3f}")
        return runs
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def report(settings: LossSettings, runs: list[LossRun]) -> str:
    """The table: medians over the runs per path, and the p99 ratio per run."""
    lines = [
        f"Lone shares (1 rig, 1 in flight) through a TUN link dropping {settings.loss:g} % of packets and delaying "
        f"them {settings.delay_ms:g} ms"
        + (f" ± {settings.jitter_ms:g} ms" if settings.jitter_ms else "")
        + f" each way (TCP and UDP alike); medians of {len(runs)} run(s) of {settings.shares} shares per path",
        "",
        "| path | submit -> pool p50 | p99 | bytes / share on the link | packets / share | sent again / copies |",
        "|---|---|---|---|---|---|",
    ]
    for path in PATHS:
        measured = [run.paths[path] for run in runs]
        again = ""
        if path == STRATUMRM:
            resent = median(r.stratumrm["retransmissions_udp"] + r.stratumrm["retransmissions_tls"] for r in measured)
            copies = median(r.stratumrm["redundant_copies"] for r in measured)
            again = f"{resent:.0f} / {copies:.0f}"
        lines.append(
            f"| {path} | {median(r.latency_ms(0.5) for r in measured):.1f} ms | {median(r.latency_ms(0.99) for r in measured):.1f} ms "
            f"| {median(r.bytes_per_share for r in measured):.0f} B | {median(r.packets_per_share for r in measured):.2f} | {again} |"
        )
    ratios = [run.p99_ratio for run in runs]
    ratio = median(ratios)
    lines += [
        "",
        f"p99 ratio stratumrm / sv1 over tls: {ratio:.3f} (per run: {', '.join(f'{r:.3f}' for r in ratios)}); "
        f"target <= {TARGET_P99_RATIO:g}: {'met' if ratio <= TARGET_P99_RATIO else 'NOT MET'}",
    ]
    return "\n".join(lines)


def with_overrides(settings: LossSettings, **overrides: Any) -> LossSettings:
    return replace(settings, **{name: value for name, value in overrides.items() if value is not None})
