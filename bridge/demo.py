"""``stratumrm demo``: the whole chain on 127.0.0.1, with live progress and a tally.

Starts the reference pool, the pool-side sidecar next to it, the miner-side proxy
talking StratumRM to the sidecar (TLS 1.3 control channel with a throwaway CA,
UDP shares, optionally through a lossy link), and reference miners of every
profile connected to the proxy. Every share is hashed for real
and validated for real. At the end (``--duration`` or Ctrl-C) the miners finish
their outstanding shares and the demo checks the tally: every share a miner
submitted got a verdict, and the set of shares the miners saw accepted is exactly
the set the pool accepted. The exit status is non-zero if any share went
unaccounted for.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import trio

from bridge.net.miner_proxy import MinerProxy
from bridge.testing.chain import Chain, start_chain
from bridge.testing.miner import Miner, Profile
from bridge.testing.pool import PoolConfig, ReferencePool

PROFILES = [p.value for p in Profile]


@dataclass
class DemoResult:
    miners: list[Miner]
    chain: Chain
    elapsed: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def pool(self) -> ReferencePool:
        return self.chain.pool

    @property
    def proxy(self) -> MinerProxy:
        return self.chain.proxy


def _share_keys(records) -> set:
    return {(r.job_id, r.extranonce1, r.extranonce2, r.ntime, r.nonce, r.version_bits) for r in records}


async def run_demo(
    *,
    duration: float | None,
    miners: int,
    difficulty: float,
    hashrate: float | None,
    out: TextIO,
    loss: float = 0.0,
    progress_interval: float = 1.0,
) -> DemoResult:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stratumrm-demo-") as pki_dir:
        return await _run_chain(
            Path(pki_dir),
            started,
            duration=duration,
            miners=miners,
            difficulty=difficulty,
            hashrate=hashrate,
            loss=loss,
            out=out,
            progress_interval=progress_interval,
        )


async def _run_chain(
    pki_dir: Path, started: float, *, duration, miners, difficulty, hashrate, loss, out, progress_interval
) -> DemoResult:
    async with trio.open_nursery() as nursery:
        chain = await start_chain(
            nursery,
            pki_dir,
            accounts=("demo",),
            pool_config=PoolConfig(difficulty=difficulty, notify_interval=10.0, block_interval=20.0),
            loss=loss,
            duplicate=loss / 4,
            reorder=loss / 4,
            seed=None,
        )
        pool = chain.pool
        print(f"throwaway CA     {pki_dir} (sidecar and proxy certificates, account 'demo')", file=out)
        print(f"reference pool   stratum+tcp://127.0.0.1:{pool.port}  (difficulty {difficulty:g})", file=out)
        print(
            f"sidecar          TLS 1.3 control on 127.0.0.1:{chain.sidecar.port}, UDP shares on {chain.sidecar.udp_port}"
            + (f" (via a lossy link: {loss:g}% loss)" if chain.link else ""),
            file=out,
        )
        print(
            f"miner proxy      stratum+tcp://127.0.0.1:{chain.proxy_port}  -> stratumrm://127.0.0.1:{chain.sidecar.port}",
            file=out,
        )
        proxy_port = chain.proxy_port
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
        print(
            "Ctrl-C stops the demo and prints the tally."
            if duration is None
            else f"running for {duration:g} s (Ctrl-C to stop early)",
            file=out,
        )

        async with trio.open_nursery() as rig_nursery:
            for rig in rigs:
                rig_nursery.start_soon(rig.run)
            try:
                await _progress(rigs, chain, started, duration, progress_interval, out)
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
    result = DemoResult(rigs, chain, time.monotonic() - started)
    _check(result)
    return result


async def _progress(rigs, chain: Chain, started, duration, interval, out: TextIO) -> None:
    """Print a progress line every ``interval`` until the duration is over or Ctrl-C."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_interrupt, nursery.cancel_scope)
        await _print_progress(rigs, chain, started, duration, interval, out)
        nursery.cancel_scope.cancel()


async def _stop_on_interrupt(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def link_figures(chain: Chain) -> tuple[int, int, int, float]:
    """(datagrams, retransmissions, shares, bytes per share on the proxy-sidecar link)."""
    connection = chain.proxy.link.connection if chain.proxy.link else None
    if connection is None:
        return 0, 0, 0, 0.0
    s = connection.statistics()
    link_bytes = s.control_bytes_sent + s.control_bytes_received + s.datagram_bytes_sent
    return (s.datagrams_sent, s.retransmissions_udp + s.retransmissions_tls, s.shares, link_bytes / s.shares if s.shares else 0.0)


async def _print_progress(rigs, chain: Chain, started, duration, interval, out: TextIO) -> None:
    pool, proxy = chain.pool, chain.proxy
    deadline = None if duration is None else started + duration
    tty = out.isatty()
    while deadline is None or time.monotonic() < deadline:
        await trio.sleep(interval)
        stats = [rig.statistics() for rig in rigs]
        pool_stats = pool.statistics()
        datagrams, retransmissions, _, per_share = link_figures(chain)
        line = (
            f"[{time.monotonic() - started:6.1f}s] shares submitted {sum(s.submitted for s in stats):5d}  "
            f"accepted {sum(s.accepted for s in stats):5d}  rejected {sum(s.rejected for s in stats):3d}  "
            f"pending {sum(s.pending for s in stats):3d} | pool accepted {pool_stats.accepted:5d} "
            f"blocks {pool_stats.height - pool.config.start_height:2d} | rigs {proxy.statistics().connections_active}/{len(rigs)} "
            f"| UDP datagrams {datagrams:5d} retx {retransmissions:4d} {per_share:5.0f} B/share"
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
        rows.append(
            (
                rig.config.user,
                s.profile,
                str(s.submitted),
                str(s.accepted),
                str(s.rejected),
                str(len(rig.unanswered())),
                f"{s.hashes / result.elapsed / 1e3:.0f}",
            )
        )
    totals = [rig.statistics() for rig in result.miners]
    rows.append(
        (
            "all miners",
            "",
            str(sum(s.submitted for s in totals)),
            str(sum(s.accepted for s in totals)),
            str(sum(s.rejected for s in totals)),
            str(sum(len(r.unanswered()) for r in result.miners)),
            "",
        )
    )
    pool_stats = result.pool.statistics()
    rows.append(("pool", "", "", str(pool_stats.accepted), str(sum(pool_stats.rejected.values())), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=False)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 2, "-" * len(lines[0]))
    proxy = result.proxy.statistics()
    datagrams, retransmissions, shares, per_share = link_figures(result.chain)
    sidecar = result.chain.sidecar.statistics()
    lines.append("")
    lines.append(
        f"proxy: {proxy.connections_accepted} rig connections, {proxy.submitted} shares relayed, "
        f"{proxy.accepted} accepted, {proxy.rejected} rejected, {proxy.unconfirmed} unconfirmed"
    )
    lines.append(
        f"proxy-sidecar link: {shares} shares in {datagrams} UDP datagrams, {retransmissions} retransmissions, "
        f"{per_share:.0f} bytes per share (TLS control + UDP payload, both directions)"
    )
    lines.append(
        f"sidecar: {sidecar.shares_forwarded} shares forwarded to the pool ({sidecar.shares_udp} UDP, "
        f"{sidecar.shares_tls} TLS), {sidecar.duplicates_from_cache + sidecar.duplicates_joined} duplicates "
        f"answered without the pool, {sum(sidecar.datagram_drops.values())} datagrams dropped"
    )
    if result.chain.link is not None:
        link = result.chain.link.statistics()
        lines.append(
            f"lossy link: dropped {link.to_target.dropped + link.to_client.dropped}, duplicated "
            f"{link.to_target.duplicated + link.to_client.duplicated}, reordered "
            f"{link.to_target.reordered + link.to_client.reordered} datagrams"
        )
    lines.append(f"ran {result.elapsed:.1f} s")
    if result.ok:
        lines.append("tally OK: every share got the pool's verdict and the pool's accepted set equals the miners'")
    else:
        lines.extend(f"TALLY PROBLEM: {p}" for p in result.problems)
    return "\n".join(lines)


def main(duration: float | None, miners: int, difficulty: float, hashrate: float | None, loss: float = 0.0) -> int:
    out = sys.stdout
    result = trio.run(
        lambda: run_demo(duration=duration, miners=miners, difficulty=difficulty, hashrate=hashrate, loss=loss, out=out)
    )
    print(summary(result), file=out)
    return 0 if result.ok else 1
