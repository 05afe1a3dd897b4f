"""The seed's attack as a test (issue 9, item 8): an on-path attacker against plain SV1 and StratumRM.

Against plain Stratum V1 an attacker between the rigs and the pool rewrites the
worker name in ``mining.authorize`` and ``mining.submit`` and relabels the jobs
of ``mining.notify``: the reference pool credits the attacker and the rig sees
every share accepted. Through StratumRM the same attacker, placed on the control
channel or on the UDP share channel between proxy and sidecar, rewrites nothing
(it cannot find a line to rewrite) and is left flipping bytes: every flip is
detected (the TLS session ends and is logged, the datagram is dropped and
counted), nothing is credited to it, and the rig's honest shares are credited.
A passive observer reads worker names, job ids and nonces off plain SV1, and
none of them off StratumRM.

Everything runs in one process on trio's autojump clock; rigs hash at a capped
rate so that clock flows while they hash.
"""

from __future__ import annotations

import logging

import pytest
import trio

from bridge.testing.faults import TcpRelay, start_fault_bench, tally, until
from bridge.testing.miner import Miner
from bridge.testing.pool import PoolConfig, ReferencePool
from bridge.testing.tamper import ByteFlipper, Observer, WorkerThief

RIG = "alice.rig"
THIEF = "mallory.w1"
HASHRATE = 5_000.0
DIFFICULTY = 1.25e-6  # ~5 400 hashes a share: about one share a virtual second


def credited(pool: ReferencePool, worker: str) -> int:
    return pool.statistics().accepted_by_worker.get(worker, 0)


async def plain_sv1(nursery, rewriter):
    """rig -> [attacker] -> pool, plain Stratum V1 (no bridge at all)."""
    pool = ReferencePool(PoolConfig(difficulty=DIFFICULTY, notify_interval=5.0))
    pool_port = await nursery.start(pool.serve, "127.0.0.1", 0)
    relay = TcpRelay(("127.0.0.1", pool_port), rewriter=rewriter)
    port = await nursery.start(relay.serve, "127.0.0.1", 0)
    return pool, f"stratum+tcp://127.0.0.1:{port}"


async def test_plain_sv1_an_on_path_attacker_is_credited_with_the_rigs_work(autojump_clock) -> None:
    thieves: list[WorkerThief] = []

    def thief() -> WorkerThief:
        thieves.append(WorkerThief(THIEF))
        return thieves[-1]

    async with trio.open_nursery() as nursery:
        pool, url = await plain_sv1(nursery, thief)
        miner = Miner(url, RIG, profile="cgminer", hashrate=HASHRATE)
        nursery.start_soon(miner.run)
        with trio.fail_after(300):
            await until(lambda: credited(pool, THIEF) >= 5)
        miner.finish()
        with trio.fail_after(300):
            await until(lambda: miner.statistics().pending == 0)
        # The theft works: the pool credits the attacker, the rig is told all is well.
        assert credited(pool, RIG) == 0
        assert credited(pool, THIEF) >= 5 and len(miner.accepted) >= 5
        assert {r.worker for r in pool.accepted} == {THIEF}
        assert sum(t.rewritten_authorize for t in thieves) >= 1
        assert sum(t.rewritten_submit for t in thieves) >= 5 and sum(t.relabelled_jobs for t in thieves) >= 1
        assert all(share.job_id.startswith("m") for share in miner.submitted)  # it mined the attacker's jobs
        nursery.cancel_scope.cancel()


async def test_plain_sv1_a_passive_observer_reads_workers_jobs_and_nonces(autojump_clock) -> None:
    observer = Observer()
    async with trio.open_nursery() as nursery:
        pool, url = await plain_sv1(nursery, observer)
        miner = Miner(url, RIG, profile="cgminer", hashrate=HASHRATE, max_shares=3)
        with trio.fail_after(300):
            await miner.run()
        assert len(pool.accepted) == 3
        assert observer.saw(RIG) and observer.saw('"mining.notify"') and observer.saw('"mining.submit"')
        for record in pool.accepted:
            assert observer.saw(f'"{record.job_id}"') and observer.saw(record.nonce) and observer.saw(record.extranonce2)
        nursery.cancel_scope.cancel()


class Thieves(list):
    """A rewriter factory handing each control connection its own WorkerThief, kept for counting."""

    def __call__(self) -> WorkerThief:
        self.append(WorkerThief(THIEF))
        return self[-1]


POSITIONS = {
    # where the attacker sits and what it does: (control channel rewriter, datagram rewriter)
    "control, rewriting workers": lambda: (Thieves(), None),
    "control to sidecar, handshake": lambda: (ByteFlipper(offset=40, to_client_side=False), None),
    "control to sidecar, submits": lambda: (ByteFlipper(offset=4000, to_client_side=False), None),
    "control to proxy, handshake": lambda: (ByteFlipper(offset=40, to_target_side=False), None),
    "control to proxy, jobs": lambda: (ByteFlipper(offset=6000, to_target_side=False), None),
    "UDP to sidecar": lambda: (None, ByteFlipper(datagrams=20, datagram_direction="to_target")),
    "UDP to proxy": lambda: (None, ByteFlipper(datagrams=20, datagram_direction="to_client")),
}


@pytest.mark.parametrize("position", list(POSITIONS))
async def test_stratumrm_an_on_path_attacker_is_detected_and_credited_nothing(position, tmp_path, autojump_clock, caplog) -> None:
    caplog.set_level(logging.INFO)
    control_rewriter, flipper = POSITIONS[position]()
    thieves = control_rewriter if isinstance(control_rewriter, Thieves) else None
    async with trio.open_nursery() as nursery:
        bench = await start_fault_bench(
            nursery,
            tmp_path,
            clock=autojump_clock,
            pool_config=PoolConfig(difficulty=DIFFICULTY, notify_interval=5.0),
            control_rewriter=control_rewriter,
            datagram_rewrite=flipper.datagram if flipper else None,
            # An upstream that fails before any rig authorized is only probed again with a
            # probe identity (issue 9 item 5, not this test's subject): give it one.
            probe_user="alice.probe",
        )
        miner = Miner(bench.miner_url, RIG, profile="cgminer", hashrate=HASHRATE, reconnect_delay=1.0)
        nursery.start_soon(miner.run)
        flips = control_rewriter if isinstance(control_rewriter, ByteFlipper) else flipper
        with trio.fail_after(600):
            if flips is not None:
                await until(lambda: flips.flipped + flips.datagrams_flipped >= 1)
            else:
                await until(lambda: credited(bench.pool, RIG) >= 3)
            before = credited(bench.pool, RIG)
            await until(lambda: credited(bench.pool, RIG) >= before + 5)  # the rig's honest work, credited
            miner.finish()
            await until(lambda: miner.statistics().pending == 0)
        row = tally(f"attack: {position}", 0, [miner], [bench.pool])
        assert credited(bench.pool, THIEF) == 0 and {r.worker for r in bench.pool.accepted} == {RIG}
        assert row.told_accepted_not_at_pool == 0 and row.duplicated_at_pool == 0, row
        if thieves:
            assert sum(t.rewrites for t in thieves) == 0, "a rewriter found a line to rewrite in the control channel"
        elif isinstance(flips, ByteFlipper) and flips.flipped:
            # TLS refuses the flipped record; the session ends, is logged, and a new one carries on.
            assert bench.control.statistics().connections >= 2
            evidence = ("bad record mac", "session with", "tls handshake", "alert", "decryption failed")
            warnings = [r.getMessage().lower() for r in caplog.records if r.levelno >= logging.WARNING]
            assert any(word in message for message in warnings for word in evidence), warnings
        elif flipper is not None and flipper.datagram_direction == "to_target":
            drops = bench.sidecar.statistics().datagram_drops
            assert sum(drops.values()) >= flipper.datagrams_flipped, drops
        nursery.cancel_scope.cancel()


async def test_stratumrm_a_passive_observer_reads_no_worker_job_or_nonce(tmp_path, autojump_clock) -> None:
    observer = Observer()
    async with trio.open_nursery() as nursery:
        bench = await start_fault_bench(
            nursery,
            tmp_path,
            clock=autojump_clock,
            pool_config=PoolConfig(difficulty=DIFFICULTY, notify_interval=5.0),
            control_rewriter=observer,
            datagram_rewrite=observer.datagram,
        )
        miner = Miner(bench.miner_url, RIG, profile="cgminer", hashrate=HASHRATE, max_shares=5)
        with trio.fail_after(300):
            await miner.run()
        assert len(bench.pool.accepted) == 5 and len(observer.captured) > 2000
        assert bench.proxy.link is not None and bench.proxy.link.connection.statistics().shares_udp >= 1
        for text in (RIG, "alice", '"mining.notify"', '"mining.submit"', "mining."):
            assert not observer.saw(text), text
        for record in bench.pool.accepted:
            assert not observer.saw(record.nonce) and not observer.saw(record.extranonce2)
            assert not observer.saw(f'"{record.job_id}"')
            # The raw nonce is looked for where a share travels sealed, the datagram bodies:
            # the reference miner counts nonces up from 0, so a share's nonce is a small
            # integer that the clear packet numbers and TLS handshake length fields
            # (00 00 xx xx) hold by chance.
            assert bytes.fromhex(record.nonce) not in observer.datagram_bodies
            assert bytes.fromhex(record.nonce)[::-1] not in observer.datagram_bodies
        nursery.cancel_scope.cancel()
