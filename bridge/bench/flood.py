"""``stratumrm bench flood``: what forged datagrams cost a real sidecar, and what they do to honest shares.

A reference pool and a sidecar run as child processes (bridge/bench/roles.py). The
benchmark itself is an honest proxy (:class:`HonestProxy`): a TLS control connection
with a miner certificate, one channel, and shares sealed on UDP at ``share_rate`` per
second. A share whose verdict does not come back on UDP within ``udp_timeout`` is sent
again over the control channel (what a proxy does), so each share has a path (UDP or
TLS) and a latency (from the first send to its verdict).

For each kind of forged datagram a flooder process (one core, as fast as it can) sends
to the sidecar's UDP port from an address of its own:

- ``random bytes``: random lengths (1..1300) and contents;
- ``unknown conn_id``: a plausible header (version 1, SHARE) under random conn_ids;
- ``bad tag``: the live session's conn_id, fresh packet numbers, random ciphertext;
- ``replay``: copies of the honest proxy's own earlier (authenticated) datagrams.

Over each measured window: datagrams the sidecar dropped divided by the CPU seconds the
sidecar process used (user + system, every thread) — the drop cost — and the honest
shares' rate, UDP fraction and latency. A window without a flood comes first, for
reference, and a last one floods a process that only reads and discards: the ceiling
of a Python receiver on this machine, in the same run. Each figure is the median over
``runs`` runs.
"""

from __future__ import annotations

import multiprocessing
import random
import socket
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
import msgspec
import trio

from bridge.bench.flood_workers import flood_worker, sink_worker
from bridge.bench.measure import median, percentile, process_cpu_seconds
from bridge.bench.roles import HOST, RoleLauncher, RoleProcess
from bridge.mining.share import Job
from bridge.pki.tls import client_context_from_bundle
from bridge.sv1.framing import LineBuffer
from bridge.testing.pki import make_test_pki
from bridge.wire.control import MAX_CONTROL_LINE
from bridge.wire.datagram import (
    DatagramDecodeError,
    DatagramType,
    Share,
    decode_body,
    pack_header,
)
from bridge.wire.keys import KeyMaterial, KeySet, Role

KINDS = ("random bytes", "unknown conn_id", "bad tag", "replay")
ACCOUNT = "flood"
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode


@dataclass(frozen=True)
class FloodSettings:
    seconds: float = 5.0
    runs: int = 3
    share_rate: float = 20.0
    udp_timeout: float = 0.2
    kinds: tuple[str, ...] = KINDS

    @classmethod
    def quick(cls) -> FloodSettings:
        return cls(seconds=1.5, runs=1, share_rate=10.0)


class BenchError(RuntimeError):
    """The benchmark could not run (a role failed, the session did not start ...)."""


# --------------------------------------------------------------------------- the honest proxy


class HonestProxy:
    """A minimal StratumRM proxy: one channel, shares on UDP with a TLS fallback."""

    def __init__(self, stream: trio.SSLStream, udp: trio.socket.SocketType, udp_address: tuple[str, int]) -> None:
        self.stream = stream
        self.udp = udp
        self.udp_address = udp_address
        self.keys: KeySet | None = None
        self.conn_id = 0
        self.inbox: list[dict[str, Any]] = []
        self.arrived = trio.Event()
        self.jobs: dict[int, list[Any]] = {}
        self.sent: list[bytes] = []
        self._ids = 100
        self._extranonce2 = 0
        self.channel: dict[str, Any] = {}
        self._send_lock = trio.Lock()

    @classmethod
    async def connect(cls, nursery: trio.Nursery, port: int, udp_port: int, context: ssl.SSLContext) -> HonestProxy:
        tcp = await trio.open_tcp_stream(HOST, port)
        stream = trio.SSLStream(tcp, context, server_hostname=HOST)
        await stream.do_handshake()
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await udp.bind((HOST, 0))
        proxy = cls(stream, udp, (HOST, udp_port))
        nursery.start_soon(proxy._read)
        nursery.start_soon(proxy._read_udp)
        nursery.start_soon(proxy._heartbeat)
        return proxy

    async def _read_udp(self) -> None:
        """VERDICT datagrams (data channel v2), shown to :meth:`share` as the verdicts they carry."""
        try:
            while True:
                data, _address = await self.udp.recvfrom(2048)
                keys = self.keys
                if keys is None or data[0] & 0x0F != DatagramType.VERDICT:
                    continue  # ACKs and probe answers: nothing to wait for
                plaintext = keys.opener.open(data)
                if plaintext is None:
                    continue
                try:
                    entries = decode_body(DatagramType.VERDICT, plaintext).entries
                except DatagramDecodeError:
                    continue
                self.inbox.append({"method": "rm.results", "params": {"v": [[0, e.pn, e.index, 1] for e in entries]}})
                self.arrived.set()
        except (trio.ClosedResourceError, OSError):
            pass

    async def _heartbeat(self) -> None:
        """rm.ping every second: the sidecar closes a proxy that sends no line for dead_after (C8)."""
        try:
            while True:
                await trio.sleep(1.0)
                await self.send({"method": "rm.ping", "params": {"t": trio.current_time()}})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _read(self) -> None:
        lines = LineBuffer(MAX_CONTROL_LINE)
        try:
            while data := await self.stream.receive_some(65536):
                for raw in lines.feed(data):
                    message = _decode(raw)
                    method = message.get("method")
                    if method == "rm.ping":
                        await self.send({"method": "rm.pong", "params": message["params"]})
                        continue
                    if method == "rm.keys":
                        params = message["params"]
                        material = KeyMaterial(int(params["conn_id"], 16), params["epoch"], bytes.fromhex(params["secret"]))
                        self.keys, self.conn_id = KeySet.derive(material, Role.PROXY), material.conn_id
                    if method == "rm.job":
                        self.jobs[message["params"]["job"]] = message["params"]["notify"]
                    self.inbox.append(message)
                    self.arrived.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.arrived.set()

    async def send(self, *objects: Any) -> None:
        async with self._send_lock:
            await self.stream.send_all(b"".join(_encode(o) + b"\n" for o in objects))

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        with trio.move_on_after(timeout):
            while True:
                for index, message in enumerate(self.inbox):
                    if predicate(message):
                        return self.inbox.pop(index)
                self.arrived = trio.Event()
                await self.arrived.wait()
        return None

    async def start(self) -> None:
        await self.send(
            {
                "id": 1,
                "method": "rm.hello",
                "params": {"version": 1, "features": ["udp-shares", "udp-v2", "job-dedup"], "agent": "bench-flood"},
            }
        )
        hello = await self.wait_for(lambda m: m.get("id") == 1 and "result" in m, 30.0)
        if hello is None or not hello.get("result") or hello["result"].get("udp_port") is None:
            raise BenchError(f"the sidecar did not offer UDP: {hello}")
        if await self.wait_for(lambda m: m.get("method") == "rm.keys", 30.0) is None:
            raise BenchError("the sidecar sent no keys")
        await self.send(
            {"method": "rm.open", "params": {"ch": 1, "peer": "bench"}},
            {"ch": 1, "id": 2, "method": "mining.subscribe", "params": ["bench-flood/1"]},
            {"ch": 1, "id": 3, "method": "mining.authorize", "params": [f"{ACCOUNT}.rig1", "x"]},
        )
        subscribed = await self.wait_for(lambda m: m.get("ch") == 1 and m.get("id") == 2, 30.0)
        authorized = await self.wait_for(lambda m: m.get("ch") == 1 and m.get("id") == 3, 30.0)
        if subscribed is None or authorized is None or authorized.get("result") is not True:
            raise BenchError(f"the channel did not open: {subscribed} {authorized}")
        notify = await self.wait_for(lambda m: m.get("method") == "rm.notify", 30.0)
        if notify is None:
            raise BenchError("no job arrived")
        handle = notify["params"]["job"]
        self.channel = {
            "extranonce2_size": subscribed["result"][2],
            "handle": handle,
            "notify": self.jobs[handle],
        }

    def _next_share(self) -> Share:
        self._extranonce2 += 1
        job = Job.from_notify_fields(*self.channel["notify"][:8])
        en2 = self._extranonce2.to_bytes(self.channel["extranonce2_size"], "big")
        return Share(
            channel_id=1, job_handle=self.channel["handle"], extranonce2=en2, ntime=job.ntime_int, nonce=0, version_bits=0
        )

    async def share(self, timeout: float) -> tuple[str, float]:
        """Submit one share; return its path ("UDP" or "TLS") and its latency in seconds.

        As the proxy does (bridge/wire/delivery.py): UDP, after ``timeout`` UDP
        again under a new packet number, after twice that over TLS.
        """
        assert self.keys is not None
        share = self._next_share()
        started = trio.current_time()
        pns: set[int] = set()
        for wait in (timeout, 2 * timeout):
            sealed = self.keys.sealer.seal(share)
            self.sent.append(sealed.data)
            pns.add(sealed.pn)
            await self.udp.sendto(sealed.data, self.udp_address)
            verdict = await self.wait_for(
                lambda m: m.get("method") == "rm.results" and any(entry[1] in pns for entry in m["params"]["v"]), wait
            )
            if verdict is not None:
                return "UDP", trio.current_time() - started
        self._ids += 1
        request_id = self._ids
        job_id = self.channel["notify"][0]
        params = [f"{ACCOUNT}.rig1", job_id, share.extranonce2.hex(), f"{share.ntime:08x}", f"{share.nonce:08x}"]
        await self.send({"ch": 1, "id": request_id, "method": "mining.submit", "params": params})
        if await self.wait_for(lambda m: m.get("ch") == 1 and m.get("id") == request_id, 30.0) is None:
            raise BenchError("a share got no verdict on UDP nor over TLS within 30 s")
        return "TLS", trio.current_time() - started

    async def aclose(self) -> None:
        self.udp.close()
        await trio.aclose_forcefully(self.stream)


# --------------------------------------------------------------------------- the flooder


def forged_datagrams(kind: str, conn_id: int, captured: list[bytes], seed: int, count: int = 4096) -> list[bytes]:
    """``count`` forged datagrams of ``kind`` (see the module docs)."""
    rng = random.Random(seed)
    share = int(DatagramType.SHARE)
    if kind == "random bytes":
        return [rng.randbytes(rng.choice((rng.randrange(1, 48), rng.randrange(48, 1300)))) for _ in range(count)]
    if kind == "unknown conn_id":
        return [pack_header(share, 0, rng.getrandbits(64) | 1, rng.randrange(1 << 20)) + rng.randbytes(37) for _ in range(count)]
    if kind == "bad tag":
        return [pack_header(share, 0, conn_id, (1 << 40) + n) + rng.randbytes(37) for n in range(count)]
    if kind == "replay":
        if not captured:
            raise BenchError("no honest datagram to replay")
        return [captured[n % len(captured)] for n in range(count)]
    raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")


async def ceiling(seconds: float, seed: int) -> Window:
    """The same flood against a process that only reads: the most a Python receiver can drop."""
    context = multiprocessing.get_context("spawn")
    port, result = context.Value("i", 0), context.Array("d", 2)
    sink = context.Process(target=sink_worker, args=(HOST, port, seconds, result), daemon=True)
    sink.start()
    try:
        with trio.fail_after(30):
            while port.value == 0:
                await trio.sleep(0.02)
        flooder = Flooder(port.value, forged_datagrams("unknown conn_id", 0, [], seed))
        flooder.start()
        started = trio.current_time()
        offered0 = 0
        await trio.to_thread.run_sync(sink.join, seconds + 30)
        elapsed = trio.current_time() - started
        offered = flooder.sent - offered0
        await trio.to_thread.run_sync(flooder.stop)
    finally:
        if sink.is_alive():
            sink.kill()
    count, cpu = int(result[0]), float(result[1])
    return Window("recvfrom only", elapsed, offered, count, count, cpu, (), ())


class Flooder:
    """A flooder process and the count of what it sent."""

    def __init__(self, port: int, payloads: list[bytes]) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._sent = context.Value("q", 0)
        self._process = context.Process(target=flood_worker, args=(HOST, port, payloads, self._stop, self._sent), daemon=True)

    def start(self) -> None:
        self._process.start()

    @property
    def sent(self) -> int:
        return int(self._sent.value)

    def stop(self) -> None:
        self._stop.set()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Window:
    """One measured window: a kind of flood (or none) and what it did."""

    kind: str
    seconds: float
    offered: int
    received: int
    dropped: int
    cpu: float
    paths: tuple[str, ...]
    latencies: tuple[float, ...]

    @property
    def drops_per_cpu_second(self) -> float:
        return self.dropped / self.cpu if self.cpu > 0 else float("nan")

    @property
    def udp_fraction(self) -> float:
        return self.paths.count("UDP") / len(self.paths) if self.paths else float("nan")

    @property
    def share_rate(self) -> float:
        return len(self.paths) / self.seconds


async def _sidecar_counters(sidecar: RoleProcess) -> tuple[int, int]:
    stats = (await sidecar.request("stats"))["sidecar"]
    return int(stats["datagrams_received"]), int(sum(stats["datagram_drops"].values()))


async def _window(
    kind: str, settings: FloodSettings, sidecar: RoleProcess, proxy: HonestProxy, udp_port: int, seed: int
) -> Window:
    flooder = None
    if kind != "none":
        payloads = await trio.to_thread.run_sync(forged_datagrams, kind, proxy.conn_id, list(proxy.sent[-64:]), seed)
        flooder = Flooder(udp_port, payloads)
        flooder.start()
        with trio.fail_after(30):
            while flooder.sent == 0:
                await trio.sleep(0.05)
        await trio.sleep(0.3)  # the flood at full speed before the window opens
    received0, dropped0 = await _sidecar_counters(sidecar)
    cpu0 = process_cpu_seconds(sidecar.pid)
    offered0 = flooder.sent if flooder else 0
    started = trio.current_time()
    paths: list[str] = []
    latencies: list[float] = []
    interval = 1.0 / settings.share_rate
    next_share = started
    while trio.current_time() - started < settings.seconds:
        path, latency = await proxy.share(settings.udp_timeout)
        paths.append(path)
        latencies.append(latency)
        next_share += interval
        await trio.sleep_until(max(next_share, trio.current_time()))
    elapsed = trio.current_time() - started
    offered = (flooder.sent if flooder else 0) - offered0
    received1, dropped1 = await _sidecar_counters(sidecar)
    cpu = process_cpu_seconds(sidecar.pid) - cpu0
    if flooder is not None:
        await trio.to_thread.run_sync(flooder.stop)
    return Window(kind, elapsed, offered, received1 - received0, dropped1 - dropped0, cpu, tuple(paths), tuple(latencies))


async def run_once(settings: FloodSettings, directory: Path, progress: Callable[[str], None], seed: int) -> list[Window]:
    pki = make_test_pki(directory / "pki", accounts=(ACCOUNT,))
    launcher = RoleLauncher(directory)
    pool = await launcher.start("pool", "pool", ["--listener", "sv1"])
    sidecar = None
    try:
        sidecar = await launcher.start(
            "sidecar",
            "sidecar",
            [
                "--pool",
                f"stratum+tcp://{HOST}:{pool.ready['ports']['sv1']}",
                "--cert",
                str(pki.pool_certificate),
                "--key",
                str(pki.pool_key),
                "--ca",
                str(pki.ca_certificate),
            ],
        )
        port, udp_port = sidecar.ready["port"], sidecar.ready["udp_port"]
        windows: list[Window] = []
        async with trio.open_nursery() as nursery:
            proxy = await HonestProxy.connect(nursery, port, udp_port, client_context_from_bundle(pki.miner_bundle))
            await proxy.start()
            for _ in range(10):  # teach the sidecar the address; datagrams to replay later
                await proxy.share(settings.udp_timeout)
            for kind in ("none", *settings.kinds):
                progress(f"[flood] {kind}: {settings.seconds:g} s")
                windows.append(await _window(kind, settings, sidecar, proxy, udp_port, seed))
            progress(f"[flood] baseline: a process that only reads, {settings.seconds:g} s")
            windows.append(await ceiling(settings.seconds, seed))
            await proxy.aclose()
            nursery.cancel_scope.cancel()
        return windows
    finally:
        if sidecar is not None:
            await sidecar.stop()
        await pool.stop()


async def run(settings: FloodSettings, progress: Callable[[str], None], keep_logs: Path | None = None) -> list[list[Window]]:
    runs: list[list[Window]] = []
    with tempfile.TemporaryDirectory(prefix="stratumrm-flood-") as temporary:
        for index in range(settings.runs):
            directory = (keep_logs or Path(temporary)) / f"run{index + 1}"
            directory.mkdir(parents=True, exist_ok=True)
            progress(f"[flood] run {index + 1} of {settings.runs}")
            runs.append(await run_once(settings, directory, progress, seed=index))
    return runs


def report(settings: FloodSettings, runs: list[list[Window]]) -> str:
    lines = [
        f"Forged datagrams against a live sidecar session, median of {len(runs)} runs of {settings.seconds:g} s per kind;",
        (
            f"honest shares at {settings.share_rate:g}/s on UDP, resent on UDP after {settings.udp_timeout * 1e3:.0f} ms "
            f"and over TLS after {settings.udp_timeout * 3e3:.0f} ms without a verdict"
        ),
        "",
        (
            f"{'flood':<16} {'offered/s':>10} {'at sidecar/s':>12} {'dropped per CPU-s':>18} {'sidecar CPU':>11} "
            f"{'honest/s':>9} {'via UDP':>8} {'p50 ms':>7} {'p99 ms':>7}"
        ),
    ]
    for position, first in enumerate(runs[0]):
        windows = [r[position] for r in runs]

        def m(value: Callable[[Window], float], windows: list[Window] = windows) -> float:
            return median(value(w) for w in windows)

        drops = "-" if first.kind == "none" else f"{m(lambda w: w.drops_per_cpu_second):,.0f}"
        line = (
            f"{first.kind:<16} {m(lambda w: w.offered / w.seconds):>10,.0f} {m(lambda w: w.received / w.seconds):>12,.0f} "
            f"{drops:>18} {m(lambda w: w.cpu / w.seconds):>10.0%}"
        )
        if first.paths:
            p50 = m(lambda w: percentile(sorted(w.latencies), 0.5)) * 1e3
            p99 = m(lambda w: percentile(sorted(w.latencies), 0.99)) * 1e3
            line += f" {m(lambda w: w.share_rate):>9.1f} {m(lambda w: w.udp_fraction):>8.0%} {p50:>7.1f} {p99:>7.1f}"
        lines.append(line)
    lines += [
        "",
        "dropped per CPU-s: datagrams the sidecar dropped / CPU seconds of the sidecar process in the window;",
        "at sidecar/s: datagrams it read (the rest of what was offered overflowed its socket buffer);",
        "recvfrom only: the unknown-conn_id flood against a process that reads and discards (the ceiling of a",
        "Python receiver on this machine, same run); sidecar CPU: share of one core the process got.",
    ]
    return "\n".join(lines)


@click.command("flood")
@click.option("--quick", is_flag=True, help="One short run: checks that it all works.")
@click.option("--runs", type=click.IntRange(1), default=None, help="Runs to take medians over [default: 3].")
@click.option("--seconds", type=click.FloatRange(min=0.5), default=None, help="Measured seconds per kind [default: 5].")
@click.option("--share-rate", type=click.FloatRange(min=1), default=None, help="Honest shares per second [default: 20].")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(KINDS), help="Only these kinds (repeatable).")
@click.option(
    "--keep-logs", type=click.Path(file_okay=False, path_type=Path), default=None, help="Keep the processes' logs here."
)
def command(
    quick: bool, runs: int | None, seconds: float | None, share_rate: float | None, kinds: tuple[str, ...], keep_logs: Path | None
) -> None:
    """Forged-datagram floods: drops per sidecar CPU-second, and the honest shares' path and latency."""
    from bridge.bench.command import _progress_printer, _run

    settings = FloodSettings.quick() if quick else FloodSettings()
    overrides = {"runs": runs, "seconds": seconds, "share_rate": share_rate, "kinds": kinds or None}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    progress = _progress_printer()
    click.echo(report(settings, _run(lambda: run(settings, progress, keep_logs))))
