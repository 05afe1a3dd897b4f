"""Roles run inside the namespaces: a reference pool and reference miners that publish their tallies.

``python -m tests.netns.roles pool HOST PORT DIFFICULTY STATE`` and
``python -m tests.netns.roles miners URL USER PROFILES STATE``. Each rewrites its
STATE file (JSON, atomically) every 0.2 s: the pool its accepted share keys and
duplicate count, the miners each miner's accepted share keys, disconnects and
pending submits. On SIGTERM the miners' connection counters are frozen (finishing
closes connections itself), the miners stop submitting, wait for the verdicts of
the shares in flight (30 s at most), write a final state and exit.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import trio

from bridge.testing.miner import Miner
from bridge.testing.pool import PoolConfig, ReferencePool

#: Hashes per second per miner. At the tests' difficulty (:data:`DIFFICULTY`, about
#: 8,600 hashes a share) that is a share every ~0.2 s per rig, while the miners'
#: process uses a small part of one core: uncapped, it would hash flat out on one of
#: the machine's two cores and starve the sidecars, HAProxy and the proxy under test.
HASHRATE = 40_000

#: The pool difficulty the namespace tests pass to the ``pool`` role.
DIFFICULTY = "0.000002"


def keys(records) -> list[list]:
    return [[r.job_id, r.extranonce1, r.extranonce2, r.ntime, r.nonce, r.version_bits] for r in records]


def publish(path: Path, state: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state))
    os.replace(temporary, path)


async def pool(host: str, port: str, difficulty: str, state: str) -> None:
    # No session resumption: a rig that reconnects gets a fresh extranonce1, so the
    # duplicate count measures the bridge alone.
    reference = ReferencePool(PoolConfig(difficulty=float(difficulty), session_resume_seconds=0, notify_interval=30.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(reference.serve, host, int(port))
        while True:
            stats = reference.statistics()
            publish(Path(state), {"accepted": keys(reference.accepted), "duplicates": stats.duplicates, "ready": True})
            await trio.sleep(0.2)


async def miners(url: str, user: str, profiles: str, state: str) -> None:
    group = []
    for index, spec in enumerate(profiles.split(",")):
        xnsub = spec.endswith("+xnsub")
        profile = spec.removesuffix("+xnsub")
        group.append(
            Miner(
                url + ("#xnsub" if xnsub else ""),
                f"{user}.{profile}{index}",
                profile=profile,
                reconnect_delay=0.5,
                hashrate=HASHRATE,
            )
        )

    # Connection counters frozen when the stop was asked: finishing closes connections itself.
    frozen: dict[str, tuple[int, int]] = {}

    def snapshot(final: bool) -> dict:
        def connection(m: Miner) -> tuple[int, int]:
            stats = m.statistics()
            return frozen.get(m.config.user, (stats.disconnects, stats.reconnect_requests))

        return {
            "final": final,
            "miners": {
                m.config.user: {
                    "accepted": keys(m.accepted),
                    "disconnects": connection(m)[0],
                    "reconnect_requests": connection(m)[1],
                    "pending": m.statistics().pending,
                    "unanswered": len(m.unanswered()),
                }
                for m in group
            },
        }

    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            for miner in group:
                nursery.start_soon(miner.run)

            async def report() -> None:
                while True:
                    publish(Path(state), snapshot(False))
                    await trio.sleep(0.2)

            nursery.start_soon(report)
            async for _ in signals:
                break
            for miner in group:
                stats = miner.statistics()
                frozen[miner.config.user] = (stats.disconnects, stats.reconnect_requests)
            for miner in group:
                miner.finish()
            with trio.move_on_after(30):
                while any(m.statistics().pending for m in group):
                    await trio.sleep(0.1)
            publish(Path(state), snapshot(True))
            for miner in group:
                miner.stop()
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    role, *arguments = sys.argv[1:]
    trio.run({"pool": pool, "miners": miners}[role], *arguments)
