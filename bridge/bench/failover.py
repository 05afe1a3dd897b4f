"""Failover time: from a fault at the primary pool to the first backup job at every miner.

One run starts two reference pools on one chain (``/pool0/`` the primary,
``/pool1/`` the backup, plain SV1 or behind a StratumRM sidecar), the proxy with
both upstreams, and ``miners`` synthetic rigs: light SV1 clients that subscribe,
authorize and read, without hashing. Half behave like cgminer (no
``mining.extranonce.subscribe``; they follow ``client.reconnect`` at once), half
like bmminer with ``#xnsub`` (they take ``mining.set_extranonce``). Once every
rig has a job from the primary and the proxy's probes see both upstreams up, the
fault is injected:

- ``rst``: the primary is killed, every connection reset and its port closed;
- ``blackhole``: the primary stalls, sockets open, nothing read or sent.

The failover time of a rig is from the fault to the first ``mining.notify`` from
the backup it receives (the coinbase tag tells the pool); the run's figure is the
slowest rig's. Detection is when the proxy declared the primary down. Everything
runs in one process on 127.0.0.1, so the figures include the CPU contention of
100 rigs, two pools and the proxy on one core.

For comparison: cgminer on its own gives up on a silent pool after 90 s, and a
reset makes it retry the same pool before it fails over.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

import click
import msgspec
import trio

from bridge.relay.failover import FailoverConfig
from bridge.sv1.framing import BoundedDecoder
from bridge.testing.failover import FailoverBench, start_failover_bench, tag_hex
from bridge.testing.pool import PoolConfig

FAULTS = ("rst", "blackhole")
TARGETS = {"rst": 0.5, "blackhole": 3.0}

_decode = BoundedDecoder().decode


class _Rig:
    """A synthetic rig: subscribe, authorize, read; no hashing."""

    def __init__(self, index: int, port: int, xnsub: bool, clock: _Clock) -> None:
        self.index = index
        self.port = port
        self.xnsub = xnsub
        self.clock = clock
        self.user = f"alice.b{index}"
        self.primary_jobs = 0
        self.backup_at: float | None = None
        self.reconnects = 0
        self.extranonce_changes = 0

    async def run(self) -> None:
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            except OSError:
                await trio.sleep(0.05)
                continue
            try:
                await self._session(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                await trio.aclose_forcefully(stream)
            await trio.sleep(0.01)

    async def _session(self, stream: trio.SocketStream) -> None:
        agent = "bmminer/2.0.0" if self.xnsub else "cgminer/4.11.1"
        lines = [
            {"id": 1, "method": "mining.subscribe", "params": [agent]},
            {"id": 2, "method": "mining.authorize", "params": [self.user, "x"]},
        ]
        if self.xnsub:
            lines.append({"id": 3, "method": "mining.extranonce.subscribe", "params": []})
        await stream.send_all(b"".join(msgspec.json.encode(line) + b"\n" for line in lines))
        buffer = b""
        backup, primary = tag_hex(1), tag_hex(0)
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                if not raw:
                    continue
                message = _decode(raw)
                method = message.get("method")
                if method == "mining.notify":
                    coinb1 = message["params"][2]
                    if backup in coinb1:
                        if self.backup_at is None and self.clock.fault_at is not None:
                            self.backup_at = trio.current_time()
                    elif primary in coinb1:
                        self.primary_jobs += 1
                elif method == "mining.set_extranonce":
                    self.extranonce_changes += 1
                elif method == "client.reconnect":
                    self.reconnects += 1
                    return


class _Clock:
    fault_at: float | None = None


async def _one_run(fault: str, miners: int, backup: str, config: FailoverConfig, workdir: Path) -> dict[str, Any]:
    clock = _Clock()
    async with trio.open_nursery() as nursery:
        bench: FailoverBench = await start_failover_bench(
            nursery,
            stratumrm=(1,) if backup == "stratumrm" else (),
            pki_dir=workdir / f"pki-{fault}" if backup == "stratumrm" else None,
            pool_config=PoolConfig(difficulty=1.0, notify_interval=30.0),
            failover=config,
        )
        rigs = [_Rig(i, bench.proxy_port, xnsub=i % 2 == 1, clock=clock) for i in range(miners)]
        for rig in rigs:
            nursery.start_soon(rig.run)
        policy = bench.proxy.policy
        with trio.fail_after(60):
            while not (all(r.primary_jobs for r in rigs) and policy.state(0).value == "up" and policy.state(1).value == "up"):
                await trio.sleep(0.02)
        await trio.sleep(0.3)  # settle: every leg and probe idle
        detected_at: float | None = None
        reason = ""
        clock.fault_at = fault_at = trio.current_time()
        if fault == "rst":
            bench.pools[0].kill()
        else:
            bench.pools[0].stall(True)
        with trio.fail_after(60):
            while not all(r.backup_at is not None for r in rigs):
                if detected_at is None and policy.is_down(0):
                    detected_at = trio.current_time()
                    reason = (policy.down_reason(0) or "").split(":", 1)[0]
                await trio.sleep(0.001)
        if detected_at is None:
            detected_at = trio.current_time()
        times = sorted(r.backup_at - fault_at for r in rigs if r.backup_at is not None)
        stats = bench.proxy.statistics()
        result = {
            "fault": fault,
            "miners": miners,
            "detection": detected_at - fault_at,
            "all": times[-1],
            "median_rig": statistics.median(times),
            "reconnects": stats.reconnects_sent,
            "extranonce_changes": stats.extranonce_changes,
            "reason": reason or (policy.down_reason(0) or "").split(":", 1)[0],
        }
        bench.pools[0].stall(False)
        nursery.cancel_scope.cancel()
    return result


def run(
    miners: int = 100,
    *,
    runs: int = 3,
    faults: tuple[str, ...] = FAULTS,
    backup: str = "sv1",
    silence_timeout: float = 2.0,
    switch_rate: float = 500.0,
    switch_burst: int = 25,
) -> dict[str, Any]:
    """Measure ``runs`` failovers per fault; medians in ``result["faults"][fault]``."""
    if backup not in ("sv1", "stratumrm"):
        raise ValueError("backup must be sv1 or stratumrm")
    config = FailoverConfig(silence_timeout=silence_timeout, switch_rate=switch_rate, switch_burst=switch_burst)
    samples: dict[str, list[dict[str, Any]]] = {fault: [] for fault in faults}
    # The faults are deliberate: keep their warnings out of the benchmark's output.
    bridge_log = logging.getLogger("bridge")
    level = bridge_log.level
    bridge_log.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="stratumrm-failover-") as tmp:
            for number in range(runs):
                for fault in faults:
                    workdir = Path(tmp) / f"run{number}"
                    workdir.mkdir(exist_ok=True)
                    samples[fault].append(trio.run(_one_run, fault, miners, backup, config, workdir))
    finally:
        bridge_log.setLevel(level)
    summary = {}
    for fault, results in samples.items():
        summary[fault] = {
            "detection": statistics.median(r["detection"] for r in results),
            "all": statistics.median(r["all"] for r in results),
            "median_rig": statistics.median(r["median_rig"] for r in results),
            "worst_all": max(r["all"] for r in results),
            "reason": results[0]["reason"],
            "reconnects": results[0]["reconnects"],
            "extranonce_changes": results[0]["extranonce_changes"],
            "target": TARGETS[fault],
        }
    return {
        "miners": miners,
        "runs": runs,
        "backup": backup,
        "silence_timeout": silence_timeout,
        "switch_rate": switch_rate,
        "faults": summary,
        "samples": samples,
    }


def report(result: dict[str, Any]) -> str:
    """The table: per fault, medians over the runs, against the targets."""
    lines = [
        f"Failover, {result['miners']} rigs (half cgminer-like: client.reconnect, half #xnsub: set_extranonce), "
        f"{result['backup']} backup, median of {result['runs']} runs",
        f"silence bound {result['silence_timeout']:g} s (--silence-timeout), moves paced at {result['switch_rate']:g} rigs/s",
        "",
        f"{'fault':<10} {'detected':>9} {'every rig':>10} {'median rig':>11} {'worst run':>10} {'target':>8}  verdict",
    ]
    for fault, row in result["faults"].items():
        verdict = "OK" if row["all"] < row["target"] else "MISSED"
        lines.append(
            f"{fault:<10} {row['detection']:>8.3f}s {row['all']:>9.3f}s {row['median_rig']:>10.3f}s "
            f"{row['worst_all']:>9.3f}s {'<' + format(row['target'], 'g') + ' s':>8}  {verdict} ({row['reason']})"
        )
    lines.append("")
    lines.append("From the fault to the first backup mining.notify at every rig. cgminer alone: 90 s of silence.")
    if "blackhole" in result["faults"]:
        lines.append(
            "A blackhole is detected within the silence bound of the last line received: the proxy's default "
            "bound is 5 s; farms that want the 3 s target run with --silence-timeout 2."
        )
    return "\n".join(lines)


@click.command("failover")
@click.option("--miners", type=click.IntRange(2, 2000), default=100, show_default=True)
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="Runs per fault; medians are printed.")
@click.option("--backup", type=click.Choice(["sv1", "stratumrm"]), default="sv1", show_default=True)
@click.option("--fault", "faults", type=click.Choice(FAULTS), multiple=True, help="Only this fault (repeatable).")
@click.option(
    "--silence-timeout", type=float, default=2.0, show_default=True, help="The proxy's silence bound (its default is 5 s)."
)
@click.option("--switch-rate", type=float, default=500.0, show_default=True, help="Rigs moved per second at most.")
def command(miners: int, runs: int, backup: str, faults: tuple[str, ...], silence_timeout: float, switch_rate: float) -> None:
    """Failover time: fault to the first backup job at every rig (RST and blackhole)."""
    click.echo(
        report(
            run(
                miners,
                runs=runs,
                backup=backup,
                faults=faults or FAULTS,
                silence_timeout=silence_timeout,
                switch_rate=switch_rate,
            )
        )
    )


if __name__ == "__main__":  # python -m bridge.bench.failover
    command(prog_name="python -m bridge.bench.failover")
