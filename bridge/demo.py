"""``stratumrm demo``: the whole chain on 127.0.0.1, with live progress and a tally.

Starts the reference pool, the miner-side proxy in front of it, and reference
miners of every profile connected to the proxy. Every share is hashed for real
and validated for real. At the end (``--duration`` or Ctrl-C) the miners finish
their outstanding shares and the demo checks the tally: every share a miner
submitted got a verdict, and the set of shares the miners saw accepted is exactly
the set the pool accepted. The exit status is non-zero if any share went
unaccounted for.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import trio

from bridge.config import parse_upstream_url
from bridge.net.miner_proxy import MinerProxy
from bridge.testing.miner import Miner, Profile
from bridge.testing.pool import PoolConfig, ReferencePool

PROFILES = [p.value for p in Profile]


@dataclass
class DemoResult:
    miners: list[Miner]
    pool: ReferencePool
    proxy: MinerProxy
    elapsed: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _share_keys(records) -> set:
    return {(r.job_id, r.extranonce1, r.extranonce2, r.ntime, r.nonce, r.version_bits) for r in records}


async def run_demo(
    *,
    duration: float | None,
    miners: int,
    difficulty: float,
    hashrate: float | None,
    out: TextIO,
    progress_interval: float = 1.0,
) -> DemoResult:
    started = time.monotonic()
    pool = ReferencePool(PoolConfig(difficulty=difficulty, notify_interval=10.0, block_interval=20.0))
    async with trio.open_nursery() as nursery:
        pool_port = await nursery.start(pool.serve, "127.0.0.1", 0)
        proxy = MinerProxy(parse_upstream_url(f"stratum+tcp://127.0.0.1:{pool_port}"))
        proxy_port = await nursery.start(proxy.serve, "127.0.0.1", 0)
        print(f"reference pool   stratum+tcp://127.0.0.1:{pool_port}  (difficulty {difficulty:g})", file=out)
        print(f"miner proxy      stratum+tcp://127.0.0.1:{proxy_port}  -> pool", file=out)
        rigs = [
            Miner(
                f"stratum+tcp://127.0.0.1:{proxy_port}",
                f"demo.{PROFILES[i % len(PROFILES)]}{i // len(PROFILES) + 1}",
                profile=PROFILES[i % len(PROFILES)],
                hashrate=hashrate,
                reconnect_delay=1.0,
                share_timeout=30.0,
            )
            for i in range(miners)
        ]
        print(f"{miners} reference miners: " + ", ".join(m.name for m in rigs), file=out)
        print("Ctrl-C stops the demo and prints the tally." if duration is None else
              f"running for {duration:g} s (Ctrl-C to stop early)", file=out)

        async with trio.open_nursery() as rig_nursery:
            for rig in rigs:
                rig_nursery.start_soon(rig.run)
            try:
                await _progress(rigs, pool, proxy, started, duration, progress_interval, out)
            finally:
                # Let every outstanding share get its verdict, then stop.
                for rig in rigs:
                    rig.finish()
                with trio.move_on_after(35):
                    while any(rig.statistics().pending for rig in rigs):
                        await trio.sleep(0.05)
                for rig in rigs:
                    rig.stop()
        nursery.cancel_scope.cancel()
    result = DemoResult(rigs, pool, proxy, time.monotonic() - started)
    _check(result)
    return result


async def _progress(rigs, pool, proxy, started, duration, interval, out: TextIO) -> None:
    """Print a progress line every ``interval`` until the duration is over or Ctrl-C."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_interrupt, nursery.cancel_scope)
        await _print_progress(rigs, pool, proxy, started, duration, interval, out)
        nursery.cancel_scope.cancel()


async def _stop_on_interrupt(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _print_progress(rigs, pool, proxy, started, duration, interval, out: TextIO) -> None:
    deadline = None if duration is None else started + duration
    tty = out.isatty()
    while deadline is None or time.monotonic() < deadline:
        await trio.sleep(interval)
        stats = [rig.statistics() for rig in rigs]
        pool_stats = pool.statistics()
        line = (
            f"[{time.monotonic() - started:6.1f}s] shares submitted {sum(s.submitted for s in stats):5d}  "
            f"accepted {sum(s.accepted for s in stats):5d}  rejected {sum(s.rejected for s in stats):3d}  "
            f"pending {sum(s.pending for s in stats):3d}  | pool accepted {pool_stats.accepted:5d}  "
            f"blocks {pool_stats.height - pool.config.start_height:3d}  | rigs connected "
            f"{proxy.statistics().connections_active}/{len(rigs)}  "
            f"{sum(s.hashes for s in stats) / (time.monotonic() - started) / 1e3:6.0f} kH/s"
        )
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=out, flush=True)
    if tty:
        print(file=out)


def _check(result: DemoResult) -> None:
    miners_accepted = [share for rig in result.miners for share in rig.accepted]
    unanswered = [share for rig in result.miners for share in rig.unanswered()]
    if unanswered:
        result.problems.append(f"{len(unanswered)} submitted shares never got a verdict")
    pool_keys = _share_keys(result.pool.accepted)
    miner_keys = _share_keys(miners_accepted)
    if miner_keys - pool_keys:
        result.problems.append(f"{len(miner_keys - pool_keys)} shares seen accepted by miners are unknown to the pool")
    if pool_keys - miner_keys:
        result.problems.append(f"{len(pool_keys - miner_keys)} shares the pool accepted were never confirmed to a miner")
    if len(result.pool.accepted) != len(pool_keys):
        result.problems.append("the pool accepted a share twice")


def summary(result: DemoResult) -> str:
    rows = [("miner", "profile", "submitted", "accepted", "rejected", "no verdict", "kH/s")]
    for rig in result.miners:
        s = rig.statistics()
        rows.append((rig.config.user, s.profile, str(s.submitted), str(s.accepted), str(s.rejected),
                     str(len(rig.unanswered())), f"{s.hashes / result.elapsed / 1e3:.0f}"))
    totals = [rig.statistics() for rig in result.miners]
    rows.append(("all miners", "", str(sum(s.submitted for s in totals)), str(sum(s.accepted for s in totals)),
                 str(sum(s.rejected for s in totals)), str(sum(len(r.unanswered()) for r in result.miners)), ""))
    pool_stats = result.pool.statistics()
    rows.append(("pool", "", "", str(pool_stats.accepted), str(sum(pool_stats.rejected.values())), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 2, "-" * len(lines[0]))
    proxy = result.proxy.statistics()
    lines.append("")
    lines.append(f"proxy: {proxy.connections_accepted} rig connections, {proxy.submitted} shares relayed, "
                 f"{proxy.accepted} accepted, {proxy.rejected} rejected, {proxy.unconfirmed} unconfirmed")
    lines.append(f"ran {result.elapsed:.1f} s")
    if result.ok:
        lines.append("tally OK: every share got the pool's verdict and the pool's accepted set equals the miners'")
    else:
        lines.extend(f"TALLY PROBLEM: {p}" for p in result.problems)
    return "\n".join(lines)


def main(duration: float | None, miners: int, difficulty: float, hashrate: float | None) -> int:
    out = sys.stdout
    result = trio.run(lambda: run_demo(duration=duration, miners=miners, difficulty=difficulty,
                                       hashrate=hashrate, out=out))
    print(summary(result), file=out)
    return 0 if result.ok else 1
