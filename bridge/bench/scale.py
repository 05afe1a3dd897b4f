"""``stratumrm bench scale``: thousands of rigs behind one proxy and one sidecar.

One run per size starts the reference pool, one sidecar and one miner-side proxy
(``stratumrm://`` to the sidecar), each a process of its own
(:mod:`bridge.bench.roles`), and ``rigs`` lightweight SV1 clients driven by this
process: each subscribes, authorizes, waits for its first job and then submits a share
every ``share_interval`` seconds (random phase), without hashing (the pool's difficulty
accepts anything). Measured:

- **RSS per rig per role**: ``VmRSS`` of ``/proc/PID/status`` of the proxy and the
  sidecar once every rig is working, minus the same figure before the first rig
  connected, divided by the number of rigs;
- **shares/s** and **CPU per share**: answered shares in a steady window, and the
  CPU seconds (``/proc/PID/task/*/schedstat``) each role spent in it per share;
- **storm settle**: every rig closes its connection at once and reconnects after a
  random delay of up to ``storm_spread`` seconds; the time from the disconnect until
  every rig is subscribed, authorized and holds a job again;
- **disconnects**: connections the proxy closed (or reset) under a rig, outside the
  storm the benchmark caused itself.

The benchmark raises its own soft ``RLIMIT_NOFILE`` to the hard limit (the roles it
starts inherit it): each rig costs one descriptor here, one at the proxy, one at the
sidecar and one at the pool.
"""

from __future__ import annotations

import os
import random
import resource
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import msgspec
import trio

from bridge.bench.measure import process_cpu_seconds
from bridge.bench.memory import per_rig
from bridge.bench.roles import HOST, RoleLauncher, RoleProcess
from bridge.net.tcp import close_quietly
from bridge.sv1.framing import BoundedDecoder
from bridge.testing.pki import make_test_pki

ACCOUNT = "scale"
DEFAULT_SIZES = (1000, 3000, 10000)
READ_SIZE = 4096
#: A rig gives up on a handshake (subscribe, authorize, first job) after this long, or at
#: once when the proxy answers its subscribe or authorize with an error, and connects
#: again after a pause: cgminer's DEFAULT_SOCKWAIT, and what a real rig does.
HANDSHAKE_TIMEOUT = 60.0
_decode = BoundedDecoder().decode
_encode = msgspec.json.Encoder().encode


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (``VmRSS`` of /proc/PID/status), in bytes."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}: is it a zombie?")


class Farm:
    """What the rigs share: counters, the storm signal."""

    def __init__(self, port: int, share_interval: float, seed: int) -> None:
        self.port = port
        self.share_interval = share_interval
        self.random = random.Random(seed)
        self.working = 0
        self.submitted = 0
        self.answered = 0
        self.accepted = 0
        self.disconnects = 0
        self.connect_failures = 0
        self.handshake_failures = 0
        self.storm = trio.Event()
        self.storm_spread = 0.0
        self.changed = trio.Event()
        #: During the storm: seconds from each rig's connect() call to each step of its
        #: handshake (where a slow storm spends its time).
        self.phases: dict[str, list[float]] | None = None

    def note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


def source_address(index: int) -> str:
    """Rig ``index``'s own loopback address (127.1.x.y): rigs of a farm have addresses of their own."""
    return f"127.1.{index // 250 % 256}.{index % 250 + 1}"


async def _connect(index: int, port: int) -> trio.SocketStream:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        await sock.bind((source_address(index), 0))
        await sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class HandshakeFailed(Exception):
    """A rig's subscribe or authorize was refused, or not done within HANDSHAKE_TIMEOUT."""


@dataclass
class Rig:
    """One lightweight SV1 rig: subscribe, authorize, a share every few seconds."""

    farm: Farm
    index: int
    working: bool = False
    scope: trio.CancelScope | None = None
    stage: str = "not started"
    """The last step of its handshake (what a rig that does not get to work waits after)."""
    _request: int = 10
    _job: list[str] = field(default_factory=list)

    async def run(self) -> None:
        farm = self.farm
        while True:
            storm = farm.storm
            started = trio.current_time()
            self.stage = "connecting"
            try:
                stream = await _connect(self.index, farm.port)
                self._phase("connected", started)
            except OSError:
                farm.connect_failures += 1
                await trio.sleep(0.2 + farm.random.random())
                continue
            ended_by_storm: bool | None = False
            try:
                with trio.CancelScope() as self.scope:
                    ended_by_storm = await self._session(stream, storm, started)
                ended_by_storm = ended_by_storm or storm.is_set()
            except HandshakeFailed:
                farm.handshake_failures += 1
                ended_by_storm = None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError, KeyError, IndexError):
                pass
            finally:
                self._set_working(False)
                await close_quietly(stream)
            if ended_by_storm is None:
                await trio.sleep(1.0 + farm.random.random())  # and again, as cgminer does
            elif ended_by_storm:
                await trio.sleep(farm.random.random() * farm.storm_spread)
            else:
                farm.disconnects += 1
                await trio.sleep(0.5 + farm.random.random())

    def _phase(self, name: str, started: float) -> None:
        self.stage = name
        phases = self.farm.phases
        if phases is not None:
            phases.setdefault(name, []).append(trio.current_time() - started)

    def _set_working(self, working: bool) -> None:
        if working != self.working:
            self.working = working
            self.farm.working += 1 if working else -1
            self.farm.note()

    async def _session(self, stream: trio.SocketStream, storm: trio.Event, started: float) -> bool:
        """Serve one connection; True when the storm ended it."""
        farm = self.farm
        user = f"{ACCOUNT}.r{self.index}"
        await stream.send_all(
            _encode({"id": 1, "method": "mining.subscribe", "params": ["scale-rig/1.0"]})
            + b"\n"
            + _encode({"id": 2, "method": "mining.authorize", "params": [user, "x"]})
            + b"\n"
        )
        buffer = b""
        extranonce2_size = 4
        authorized = False
        self._job = []
        next_share = trio.current_time() + farm.random.random() * farm.share_interval
        give_up = trio.current_time() + HANDSHAKE_TIMEOUT
        while True:
            if storm.is_set():
                return True
            if not self.working and trio.current_time() >= give_up:
                raise HandshakeFailed(f"not working after {HANDSHAKE_TIMEOUT:g} s")
            deadline = next_share if self.working else give_up
            data = None
            with trio.move_on_at(deadline):
                data = await stream.receive_some(READ_SIZE)
            if storm.is_set():
                return True
            if data is not None:
                if not data:
                    return False
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    if not raw:
                        continue
                    message = _decode(raw)
                    method = message.get("method")
                    if method == "mining.notify":
                        if not self._job:
                            self._phase("job", started)
                        self._job = message["params"]
                    elif method is None:
                        ident = message.get("id")
                        if ident == 1:
                            if not message.get("result"):
                                raise HandshakeFailed(f"subscribe refused: {message.get('error')}")
                            self._phase("subscribed", started)
                            extranonce2_size = int(message["result"][2])
                        elif ident == 2:
                            if message.get("result") is not True:
                                raise HandshakeFailed(f"authorize refused: {message.get('error')}")
                            self._phase("authorized", started)
                            authorized = True
                        elif isinstance(ident, int) and ident >= 10:
                            farm.answered += 1
                            if message.get("result") is True:
                                farm.accepted += 1
                if authorized and self._job and not self.working:
                    self._set_working(True)
                continue
            if self.working:
                self._request += 1
                job = self._job
                params = [
                    user,
                    job[0],
                    self._request.to_bytes(extranonce2_size, "big").hex(),
                    job[7],
                    f"{self._request & 0xFFFFFFFF:08x}",
                ]
                await stream.send_all(_encode({"id": self._request, "method": "mining.submit", "params": params}) + b"\n")
                farm.submitted += 1
                next_share += farm.share_interval


@dataclass
class SizeResult:
    rigs: int
    connect_seconds: float
    rss_per_rig: dict[str, float]
    shares_per_second: float
    cpu_per_share: dict[str, float]
    storm_settle: float | None
    disconnects: int
    answered_fraction: float
    handshake_failures: int = 0
    """Handshakes a rig gave up on (refused, or not done in HANDSHAKE_TIMEOUT) and retried, over the run."""
    memory: dict[str, list[str]] = field(default_factory=dict)
    """With ``--memory-profile``: per role, what its growth per rig is made of."""
    storm_phases: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    """During the storm, seconds from a rig's connect() to each step: (median, p90, max)."""
    storm_cpu_per_rig: dict[str, float] = field(default_factory=dict)
    """CPU seconds each role (and the pool) spent from the storm until it settled, per rig."""


def _spread(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))], ordered[-1]


async def _wait_working(farm: Farm, target: int, timeout: float, progress: Callable[[str], None], label: str) -> float | None:
    started = trio.current_time()
    last_report = started
    with trio.move_on_after(timeout):
        while farm.working < target:
            with trio.move_on_after(1.0):
                await farm.changed.wait()
            now = trio.current_time()
            if now - last_report >= 5:
                last_report = now
                progress(
                    f"[scale] {label}: {farm.working}/{target} rigs working, {now - started:.0f} s "
                    f"({farm.disconnects} disconnects, {farm.connect_failures} failed connects, "
                    f"{farm.handshake_failures} failed handshakes so far)"
                )
        return trio.current_time() - started
    return None


async def _report_stuck(all_rigs: list[Rig], roles: dict[str, RoleProcess], progress: Callable[[str], None], label: str) -> None:
    """Rigs not working, by the last step they reached, and where each role's tasks wait."""
    stages: dict[str, int] = {}
    for rig in all_rigs:
        if not rig.working:
            stages[rig.stage] = stages.get(rig.stage, 0) + 1
    progress(f"[scale] {label}: rigs not working, by their last step: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    for name, role in roles.items():
        with trio.move_on_after(30):
            places = await role.request("waits")
            progress(
                f"[scale] {label}: where the {name}'s tasks wait:\n" + "\n".join(f"  {n:>6}  {p}" for p, n in places.items())
            )


async def run_size(
    rigs: int,
    directory: Path,
    progress: Callable[[str], None],
    *,
    share_interval: float,
    window: float,
    storm_spread: float,
    seed: int,
    verbose_logs: bool = False,
    memory_profile: int = 0,
    notify_interval: float = 30.0,
) -> SizeResult:
    pki = make_test_pki(directory / "pki", accounts=(ACCOUNT,))
    launcher = RoleLauncher(directory, verbose=verbose_logs, trace_memory=memory_profile)
    started: list[RoleProcess] = []
    try:
        pool = await launcher.start("pool", "pool", ["--listener", "sv1", "--notify-interval", f"{notify_interval:g}"])
        started.append(pool)
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
                *(["--handshake-timeout", "120"] if memory_profile else []),  # traced roles are slow
            ],
        )
        started.append(sidecar)
        proxy = await launcher.start(
            "proxy", "proxy", ["--upstream", f"stratumrm://{HOST}:{sidecar.ready['port']}", "--bundle", str(pki.miner_bundle)]
        )
        started.append(proxy)
        roles = {"proxy": proxy.pid, "sidecar": sidecar.pid}
        # The pool and this process (the farm of rigs) share the machine's cores with the
        # roles: their CPU in the storm says how much of the settle time the roles' is.
        storm_roles = {**roles, "pool": pool.pid, "farm": os.getpid()}
        await trio.sleep(1.0)
        baseline = {name: rss_bytes(pid) for name, pid in roles.items()}
        census0 = {"proxy": await proxy.request("memory"), "sidecar": await sidecar.request("memory")} if memory_profile else {}
        memory: dict[str, list[str]] = {}
        farm = Farm(proxy.ready["port"], share_interval, seed)
        failure = None
        async with trio.open_nursery() as nursery:
            progress(f"[scale] {rigs} rigs: connecting")
            all_rigs = [Rig(farm, index) for index in range(rigs)]
            for index, rig in enumerate(all_rigs):
                nursery.start_soon(rig.run)
                if index % 200 == 199:
                    await trio.sleep(0.05)
            patience = (120 + rigs / 50) * (5 if memory_profile else 1)  # tracemalloc slows the roles down
            connect = await _wait_working(farm, rigs, patience, progress, f"{rigs} rigs connecting")
            if connect is None:
                await _report_stuck(all_rigs, {"pool": pool, "sidecar": sidecar, "proxy": proxy}, progress, f"{rigs} rigs")
                failure = f"only {farm.working} of {rigs} rigs got to work; logs: {directory} (--keep-logs DIR keeps them)"
                nursery.cancel_scope.cancel()
            else:
                progress(f"[scale] {rigs} rigs working after {connect:.1f} s; steady window {window:g} s")
                await trio.sleep(min(share_interval, 5.0))
                disconnects0 = farm.disconnects
                answered0, submitted0 = farm.answered, farm.submitted
                cpu0 = {name: process_cpu_seconds(pid) for name, pid in roles.items()}
                t0 = trio.current_time()
                await trio.sleep(window)
                elapsed = trio.current_time() - t0
                answered = farm.answered - answered0
                submitted = farm.submitted - submitted0
                cpu = {name: process_cpu_seconds(pid) - cpu0[name] for name, pid in roles.items()}
                rss = {name: (rss_bytes(pid) - baseline[name]) / rigs for name, pid in roles.items()}
                if memory_profile:
                    for name, role in (("proxy", proxy), ("sidecar", sidecar)):
                        memory[name] = per_rig(census0[name], await role.request("memory"), rigs)
                        progress(f"[scale] {rigs} rigs: what a rig costs the {name}:\n" + "\n".join(memory[name]))
                progress(
                    f"[scale] {rigs} rigs: {answered / elapsed:.0f} shares/s, RSS/rig "
                    + ", ".join(f"{n} {v / 1024:.1f} KiB" for n, v in rss.items())
                )
                progress(f"[scale] {rigs} rigs: reconnect storm (all disconnect, back within {storm_spread:g} s)")
                farm.storm_spread = storm_spread
                farm.phases = {}
                storm_cpu0 = {name: process_cpu_seconds(pid) for name, pid in storm_roles.items()}
                storm_at = trio.current_time()
                storm, farm.storm = farm.storm, trio.Event()
                storm.set()
                for rig in all_rigs:
                    if rig.scope is not None:
                        rig.scope.cancel()
                    # Not working from this instant: waiting for the cancelled rigs to run first
                    # could find them all still "working" and call the storm settled in 0 s.
                    rig._set_working(False)
                await trio.sleep(0)
                settle_wait = await _wait_working(farm, rigs, patience, progress, f"{rigs} rigs storm")
                settle = None if settle_wait is None else trio.current_time() - storm_at
                if settle_wait is None:
                    await _report_stuck(
                        all_rigs, {"pool": pool, "sidecar": sidecar, "proxy": proxy}, progress, f"{rigs} rigs storm"
                    )
                storm_cpu = {name: process_cpu_seconds(pid) - storm_cpu0[name] for name, pid in storm_roles.items()}
                disconnects = farm.disconnects - disconnects0
                phases = {name: _spread(values) for name, values in farm.phases.items()}
                farm.phases = None
                progress(
                    f"[scale] {rigs} rigs: storm settled in {settle if settle is not None else float('nan'):.1f} s; "
                    "from connect() to (median/p90/max s): "
                    + ", ".join(f"{name} {a:.2f}/{b:.2f}/{c:.2f}" for name, (a, b, c) in phases.items())
                    + "; CPU per rig back: "
                    + ", ".join(f"{name} {seconds / rigs * 1e3:.2f} ms" for name, seconds in storm_cpu.items())
                )
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise RuntimeError(failure)
        return SizeResult(
            rigs=rigs,
            connect_seconds=connect,
            rss_per_rig=rss,
            shares_per_second=answered / elapsed,
            cpu_per_share={name: seconds / max(answered, 1) for name, seconds in cpu.items()},
            storm_settle=settle,
            disconnects=disconnects,
            handshake_failures=farm.handshake_failures,
            answered_fraction=answered / max(submitted, 1),
            memory=memory,
            storm_phases=phases,
            storm_cpu_per_rig={name: seconds / rigs for name, seconds in storm_cpu.items()},
        )
    finally:
        for role in reversed(started):
            await role.stop()


async def run(
    sizes: tuple[int, ...],
    progress: Callable[[str], None],
    *,
    runs: int = 1,
    share_interval: float = 5.0,
    window: float = 10.0,
    storm_spread: float = 3.0,
    keep_logs: Path | None = None,
    verbose_logs: bool = False,
    memory_profile: int = 0,
    notify_interval: float = 30.0,
) -> list[list[SizeResult]]:
    limit = raise_file_limit()
    needed = max(sizes) + 200
    if needed > limit:
        raise RuntimeError(
            f"{max(sizes)} rigs need about {needed} file descriptors, the hard limit is {limit}: raise it (ulimit -Hn)"
        )
    results: list[list[SizeResult]] = []
    with tempfile.TemporaryDirectory(prefix="stratumrm-scale-") as temporary:
        for size in sizes:
            samples = []
            for number in range(runs):
                directory = (keep_logs or Path(temporary)) / f"rigs{size}-run{number + 1}"
                directory.mkdir(parents=True, exist_ok=True)
                progress(f"[scale] {size} rigs, run {number + 1} of {runs}")
                samples.append(
                    await run_size(
                        size,
                        directory,
                        progress,
                        share_interval=share_interval,
                        window=window,
                        storm_spread=storm_spread,
                        seed=number,
                        verbose_logs=verbose_logs,
                        memory_profile=memory_profile,
                        notify_interval=notify_interval,
                    )
                )
            results.append(samples)
    return results


def report(results: list[list[SizeResult]], share_interval: float, storm_spread: float) -> str:
    runs = len(results[0]) if results else 0
    lines = [
        f"Lightweight SV1 rigs behind one proxy and one sidecar (reference pool), median of {runs} run(s);",
        f"a share every {share_interval:g} s per rig; storm: every rig disconnects at once, back within {storm_spread:g} s",
        "",
        f"{'rigs':>6} {'proxy KiB/rig':>13} {'sidecar KiB/rig':>15} {'shares/s':>9} {'proxy us/share':>14} "
        f"{'sidecar us/share':>16} {'storm settle s':>14} {'disconnects':>11} {'retried handshakes':>18}",
    ]
    for samples in results:

        def m(value: Callable[[SizeResult], float], samples: list[SizeResult] = samples) -> float:
            return statistics.median(value(s) for s in samples)

        settles = [s.storm_settle for s in samples]
        settle = "never" if any(v is None for v in settles) else f"{statistics.median(v for v in settles if v is not None):.1f}"
        lines.append(
            f"{samples[0].rigs:>6} {m(lambda s: s.rss_per_rig['proxy']) / 1024:>13.1f} "
            f"{m(lambda s: s.rss_per_rig['sidecar']) / 1024:>15.1f} {m(lambda s: s.shares_per_second):>9.0f} "
            f"{m(lambda s: s.cpu_per_share['proxy']) * 1e6:>14.0f} {m(lambda s: s.cpu_per_share['sidecar']) * 1e6:>16.0f} "
            f"{settle:>14} {max(s.disconnects for s in samples):>11} {max(s.handshake_failures for s in samples):>18}"
        )
    lines += [
        "",
        "KiB/rig: VmRSS with every rig working minus VmRSS before the first connected, per rig;",
        "shares/s: answered shares in the steady window; us/share: CPU of the role in that window per share;",
        "storm settle: from the mass disconnect until every rig works again; disconnects: connections closed",
        "under a rig, outside the storm (the most over the runs); retried handshakes: a rig's subscribe or",
        f"authorize refused, or no job within {HANDSHAKE_TIMEOUT:g} s, so it connected again as cgminer does (the most).",
    ]
    lines.append("")
    for samples in results:
        names = list(samples[0].storm_cpu_per_rig)
        if names:
            per_rig = ", ".join(
                f"{name} {statistics.median(s.storm_cpu_per_rig.get(name, 0.0) for s in samples) * 1e3:.2f}" for name in names
            )
            lines.append(
                f"{samples[0].rigs} rigs, CPU per returning rig in the storm (ms, median): {per_rig}; on {os.cpu_count()} cores"
            )
    for samples in results:
        for role, role_lines in samples[-1].memory.items():
            lines += ["", f"{role}, {samples[-1].rigs} rigs (last run; tracemalloc inflates the RSS figures above):"]
            lines += role_lines
    return "\n".join(lines)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter("give rig counts separated by commas, e.g. 1000,3000") from None
    if not sizes or any(size < 1 for size in sizes):
        raise click.BadParameter("give rig counts of at least 1, e.g. 1000,3000")
    return sizes


@click.command("scale")
@click.option("--rigs", default=",".join(map(str, DEFAULT_SIZES)), show_default=True, help="Rig counts, comma separated.")
@click.option("--runs", type=click.IntRange(1), default=1, show_default=True, help="Runs per size to take medians over.")
@click.option(
    "--share-interval", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="Seconds between a rig's shares."
)
@click.option("--window", type=click.FloatRange(min=0.5), default=10.0, show_default=True, help="Measured steady seconds.")
@click.option("--notify-interval", type=click.FloatRange(min=0.1), default=30.0, help="Seconds between the pool's jobs.")
@click.option(
    "--storm-spread",
    type=click.FloatRange(min=0.0),
    default=3.0,
    show_default=True,
    help="Rigs reconnect within this many seconds.",
)
@click.option(
    "--keep-logs", type=click.Path(file_okay=False, path_type=Path), default=None, help="Keep the processes' logs here."
)
@click.option("--verbose-logs", is_flag=True, help="The processes log at info level (with --keep-logs).")
@click.option(
    "--memory-profile",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    metavar="FRAMES",
    help="Run the proxy and sidecar under tracemalloc (FRAMES deep) and print what each rig costs them.",
)
def command(
    rigs: str,
    runs: int,
    share_interval: float,
    window: float,
    notify_interval: float,
    storm_spread: float,
    keep_logs: Path | None,
    verbose_logs: bool,
    memory_profile: int,
) -> None:
    """Thousands of rigs behind one proxy and one sidecar: memory, storm, shares/s, CPU, disconnects."""
    from bridge.bench.command import _progress_printer, _run

    sizes = _sizes(rigs)
    progress = _progress_printer()
    results = _run(
        lambda: run(
            sizes,
            progress,
            runs=runs,
            share_interval=share_interval,
            window=window,
            storm_spread=storm_spread,
            keep_logs=keep_logs,
            verbose_logs=verbose_logs,
            memory_profile=memory_profile,
            notify_interval=notify_interval,
        )
    )
    click.echo(report(results, share_interval, storm_spread))
