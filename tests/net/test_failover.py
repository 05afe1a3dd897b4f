"""Failover on real sockets: reference miners (hashing for real) -> proxy -> primary and backup pools.

Each scenario injects one of the reference pool's failure modes into the primary
(killed with resets, blackholed, lagging behind the chain, restored) and checks
the rigs end up hashing on the backup's jobs, the way each rig understands an
extranonce change (cgminer: ``client.reconnect``; bmminer/bfgminer with
``#xnsub``: ``mining.set_extranonce``), and the tally: every submit answered,
every share a rig was told is accepted is in a pool's accepted set, nothing
accepted twice, and a share a pool accepted that its rig was not told about was
answered with an explicit "not confirmed" error (the old upstream died before
its verdict could come back).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from bridge.relay.failover import FailoverConfig, NoUpstreamPolicy, Strategy
from bridge.testing.failover import start_failover_bench
from bridge.testing.miner import Miner
from bridge.testing.pool import PoolConfig

# Rigs hash at HASHRATE on a pool at DIFFICULTY: a share every ~0.86 s of trio's
# clock per rig (8,600 hashes a share at 10 kH/s; the rate these tests were written
# for, at a fifth of the hashing that 0.00001 and 50 kH/s cost).
DIFFICULTY = 0.000002
HASHRATE = 10_000
# Tests that wait for shares within a short virtual bound: a share every ~0.17 s.
FAST_HASHRATE = 50_000

FAST = dict(silence_timeout=1.0, lag_delay=0.5, hold_down=1.5, no_upstream_grace=0.5)


def share_keys(records) -> set:
    return {(r.job_id, r.extranonce1, r.extranonce2, r.ntime, r.nonce, r.version_bits) for r in records}


async def until(condition: Callable[[], bool], step: float = 0.02) -> None:
    while not condition():
        await trio.sleep(step)


def accepted_at(pool, worker: str) -> int:
    return pool.statistics().accepted_by_worker.get(worker, 0)


async def finish(miners: list[Miner], timeout: float = 15.0) -> None:
    for miner in miners:
        miner.finish()
    with trio.fail_after(timeout):
        await until(lambda: all(m.statistics().pending == 0 for m in miners))
    for miner in miners:
        miner.stop()


def assert_tally(miners: list[Miner], pools, proxy=None) -> None:
    unanswered = [s for m in miners for s in m.unanswered()]
    if proxy is None:
        assert not unanswered, "every submit must be answered"
    else:
        # Rigs moved with client.reconnect drop the connection on reading it: a share
        # they sent just before (one proxy->rig trip) still reaches its pool, but its
        # verdict finds the rig gone. At most one such share per reconnect.
        assert len(unanswered) <= proxy.statistics().reconnects_sent
    pool_records = [r for pool in pools for r in pool.accepted]
    pool_keys = share_keys(pool_records)
    assert len(pool_keys) == len(pool_records), "a share was accepted twice"
    assert all(pool.statistics().duplicates == 0 for pool in pools)
    told_accepted = share_keys(s for m in miners for s in m.accepted)
    assert told_accepted <= pool_keys, "a rig was told 'accepted' for a share no pool accepted"
    unconfirmed = share_keys(s for m in miners for s in m.rejected if "not confirmed" in s.verdict.message)
    unconfirmed |= share_keys(unanswered)
    assert pool_keys - told_accepted <= unconfirmed, "a pool accepted a share whose rig got no honest answer"


async def test_primary_killed_cgminer_rigs_reconnect_to_the_backup_then_fail_back(autojump_clock) -> None:
    # Virtual time (autojump): the bounds asserted below are trio's clock, not the machine's.
    async with trio.open_nursery() as nursery:
        bench = await start_failover_bench(
            nursery, failover=FailoverConfig(**FAST), pool_config=PoolConfig(difficulty=DIFFICULTY, notify_interval=5.0)
        )
        primary, backup = bench.pools
        miners = [
            Miner(bench.miner_url(), f"alice.cg{i}", profile="cgminer", reconnect_delay=0.2, hashrate=HASHRATE) for i in range(3)
        ]
        workers = [m.config.user for m in miners]
        for miner in miners:
            nursery.start_soon(miner.run)
        with trio.fail_after(40):
            await until(lambda: all(accepted_at(primary, w) >= 2 for w in workers))
            killed_at = trio.current_time()
            primary.kill()
            await until(lambda: all(accepted_at(backup, w) >= 2 for w in workers))
            assert trio.current_time() - killed_at < 10  # virtual seconds
            assert all(m.statistics().disconnects >= 1 for m in miners)  # cgminer: client.reconnect
            before = {w: accepted_at(primary, w) for w in workers}
            restored_at = trio.current_time()
            await bench.restore(0)
            await until(lambda: all(accepted_at(primary, w) >= before[w] + 2 for w in workers))
            assert trio.current_time() - restored_at >= FAST["hold_down"]  # not before the hold-down
        await finish(miners)
        assert_tally(miners, bench.pools, bench.proxy)
        stats = bench.proxy.statistics()
        assert stats.failover.detections.get("connection lost", 0) + stats.failover.detections.get("connect failed", 0) >= 1
        assert stats.failover.switches.get("failover", 0) >= 3 and stats.failover.switches.get("failback", 0) >= 3
        assert stats.reconnects_sent >= 6 and stats.extranonce_changes == 0
        nursery.cancel_scope.cancel()


async def test_primary_blackholed_xnsub_rigs_get_set_extranonce_from_a_stratumrm_backup(tmp_path, autojump_clock) -> None:
    # Virtual time (autojump): the silence bound and the timings asserted below are
    # trio's clock, not the machine's; capped hash rates let that clock run while rigs hash.
    async with trio.open_nursery() as nursery:
        bench = await start_failover_bench(
            nursery,
            stratumrm=(1,),
            pki_dir=tmp_path,
            failover=FailoverConfig(**FAST),
            submit_timeout=30.0,
            # A share every ~0.17 virtual s per rig: two shares per rig within the bound below
            # is then not a matter of luck (at 0.00001, ~0.86 s a share, one run in ten missed it).
            pool_config=PoolConfig(difficulty=0.000002, notify_interval=5.0),
        )
        primary, backup = bench.pools
        xnsub = [
            Miner(bench.miner_url(xnsub=True), f"alice.{profile}", profile=profile, reconnect_delay=0.2, hashrate=FAST_HASHRATE)
            for profile in ("bmminer", "bfgminer")
        ]
        miners = [
            *xnsub,
            Miner(bench.miner_url(), "alice.cgminer", profile="cgminer", reconnect_delay=0.2, hashrate=FAST_HASHRATE),
        ]
        workers = [m.config.user for m in miners]
        for miner in miners:
            nursery.start_soon(miner.run)
        with trio.fail_after(40):
            await until(lambda: all(accepted_at(primary, w) >= 2 for w in workers))
            first_extranonce = {m.name: m.statistics().extranonce1 for m in xnsub}
            stalled_at = trio.current_time()
            primary.stall(True)
            await until(lambda: all(accepted_at(backup, w) >= 2 for w in workers))
            assert trio.current_time() - stalled_at < FAST["silence_timeout"] + 5  # virtual seconds
            for miner in xnsub:
                stats = miner.statistics()
                assert stats.disconnects == 0, "an #xnsub rig is moved without reconnecting"
                assert stats.extranonce1 != first_extranonce[miner.name]
        await finish(miners)
        primary.stall(False)
        assert_tally(miners, bench.pools, bench.proxy)
        stats = bench.proxy.statistics()
        assert stats.failover.detections.get("silent") == 1
        assert stats.extranonce_changes >= 2 and stats.reconnects_sent >= 1
        assert bench.sidecars[1].statistics().shares_forwarded >= 4
        nursery.cancel_scope.cancel()


async def test_a_lagging_primary_loses_its_rigs_and_gets_them_back_once_it_catches_up(autojump_clock) -> None:
    # Virtual time (autojump), hash rates capped so that clock can run while rigs hash.
    async with trio.open_nursery() as nursery:
        bench = await start_failover_bench(
            nursery, failover=FailoverConfig(**FAST), pool_config=PoolConfig(difficulty=DIFFICULTY, notify_interval=5.0)
        )
        primary, backup = bench.pools
        miners = [
            Miner(bench.miner_url(), "alice.cg", profile="cgminer", reconnect_delay=0.2, hashrate=HASHRATE),
            Miner(bench.miner_url(xnsub=True), "alice.bm", profile="bmminer", reconnect_delay=0.2, hashrate=HASHRATE),
        ]
        workers = [m.config.user for m in miners]
        for miner in miners:
            nursery.start_soon(miner.run)
        with trio.fail_after(40):
            await until(lambda: all(accepted_at(primary, w) >= 2 for w in workers))
            bench.new_block(lagging=[0])  # the backup moves on, the primary does not
            await until(lambda: all(accepted_at(backup, w) >= 2 for w in workers))
            new_tip = backup.prevhash
            assert all(r.job_id for r in backup.accepted)
            assert bench.proxy.policy.down_reason(0).startswith("lagging")
            before = {w: accepted_at(primary, w) for w in workers}
            bench.catch_up(0)
            assert primary.prevhash == new_tip
            await until(lambda: all(accepted_at(primary, w) >= before[w] + 2 for w in workers))
        await finish(miners)
        assert_tally(miners, bench.pools, bench.proxy)
        stats = bench.proxy.statistics()
        assert stats.failover.detections == {"lagging": 1}
        assert stats.failover.switches.get("failback", 0) >= 2
        # the lagging primary was alive: its shares in flight kept their verdicts
        assert not [s for m in miners for s in m.rejected if "not confirmed" in s.verdict.message]
        nursery.cancel_scope.cancel()


async def test_no_upstream_releases_rigs_after_the_grace(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        bench = await start_failover_bench(
            nursery, failover=FailoverConfig(**FAST), pool_config=PoolConfig(difficulty=DIFFICULTY, notify_interval=5.0)
        )
        miner = Miner(bench.miner_url(), "alice.lonely", profile="cgminer", reconnect_delay=30, hashrate=FAST_HASHRATE)
        nursery.start_soon(miner.run)
        with trio.fail_after(20):
            await until(lambda: len(miner.accepted) >= 1)
            for pool in bench.pools:
                pool.kill()
            await until(lambda: miner.statistics().disconnects >= 1)
            await until(lambda: bench.proxy.statistics().closed_by_reason.get("released", 0) >= 1)
        stats = bench.proxy.statistics().failover
        assert stats.outages == 1 and stats.released == 1
        miner.stop()
        nursery.cancel_scope.cancel()


async def test_keep_policy_holds_rigs_until_a_pool_is_back(autojump_clock) -> None:
    config = FailoverConfig(**{**FAST, "no_upstream": NoUpstreamPolicy.KEEP})
    async with trio.open_nursery() as nursery:
        bench = await start_failover_bench(
            nursery, failover=config, pool_config=PoolConfig(difficulty=DIFFICULTY, notify_interval=5.0)
        )
        miner = Miner(bench.miner_url(xnsub=True), "alice.patient", profile="bmminer", reconnect_delay=30, hashrate=FAST_HASHRATE)
        nursery.start_soon(miner.run)
        with trio.fail_after(30):
            await until(lambda: len(miner.accepted) >= 1)
            for pool in bench.pools:
                pool.kill()
            await trio.sleep(1.5)
            assert miner.statistics().disconnects == 0 and bench.proxy.statistics().failover.released == 0
            await bench.restore(1)
            await until(lambda: accepted_at(bench.pools[1], "alice.patient") >= 2)
        assert miner.statistics().disconnects == 0
        await finish([miner])
        assert_tally([miner], bench.pools)
        nursery.cancel_scope.cancel()


async def test_weighted_strategy_splits_rigs_across_pools(autojump_clock) -> None:
    # Nothing here is about silence: a bound of 1 s would call a pool silent whenever the
    # loaded machine stalls this process that long, and move its rigs.
    config = FailoverConfig(**{**FAST, "strategy": Strategy.WEIGHTED, "silence_timeout": 30.0, "lag_delay": 30.0})
    async with trio.open_nursery() as nursery:
        bench = await start_failover_bench(
            nursery,
            failover=config,
            weights=[3.0, 1.0],
            priorities=[0, 0],
            pool_config=PoolConfig(difficulty=DIFFICULTY, notify_interval=5.0),
        )
        miners = [Miner(bench.miner_url(), f"alice.w{i}", profile="cpuminer", hashrate=HASHRATE) for i in range(8)]
        for miner in miners:
            nursery.start_soon(miner.run)
        with trio.fail_after(40):
            await until(lambda: all(len(m.accepted) >= 1 for m in miners))
        assert [u.rigs for u in bench.proxy.statistics().failover.upstreams] == [6, 2]
        assert [len(pool.accepted_by_worker) for pool in bench.pools] == [6, 2]
        await finish(miners)
        assert_tally(miners, bench.pools)
        nursery.cancel_scope.cancel()


async def test_a_sidecar_tells_the_proxy_its_pool_is_down_and_back(tmp_path, autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        bench = await start_failover_bench(
            nursery,
            stratumrm=(0,),
            pki_dir=tmp_path,
            failover=FailoverConfig(**FAST),
            pool_config=PoolConfig(difficulty=DIFFICULTY, notify_interval=5.0),
        )
        primary, backup = bench.pools
        miners = [
            Miner(bench.miner_url(), "alice.cg", profile="cgminer", reconnect_delay=0.2, hashrate=HASHRATE),
            Miner(bench.miner_url(xnsub=True), "alice.bm", profile="bmminer", reconnect_delay=0.2, hashrate=HASHRATE),
        ]
        workers = [m.config.user for m in miners]
        for miner in miners:
            nursery.start_soon(miner.run)
        with trio.fail_after(40):
            await until(lambda: all(accepted_at(primary, w) >= 2 for w in workers))
            primary.kill()  # the pool behind the sidecar dies; the sidecar itself is fine
            await until(lambda: all(accepted_at(backup, w) >= 2 for w in workers))
            await until(
                lambda: (
                    bench.proxy.policy.down_reason(0) is not None and bench.proxy.policy.down_reason(0).startswith("pool down")
                )
            )
            assert not bench.sidecars[0].pool_watch.up
            before = {w: accepted_at(primary, w) for w in workers}
            await bench.restore(0)
            await until(lambda: bench.sidecars[0].pool_watch.up)
            await until(lambda: all(accepted_at(primary, w) >= before[w] + 2 for w in workers))
        await finish(miners)
        assert_tally(miners, bench.pools, bench.proxy)
        detections = bench.proxy.statistics().failover.detections
        assert detections.get("pool down") == 1
        assert bench.sidecars[0].pool_watch.outages == 1
        nursery.cancel_scope.cancel()


async def test_a_primary_down_at_start_is_skipped_without_the_rig_noticing(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        bench = await start_failover_bench(
            nursery, failover=FailoverConfig(**FAST), pool_config=PoolConfig(difficulty=DIFFICULTY, notify_interval=5.0)
        )
        bench.pools[0].kill()
        miner = Miner(bench.miner_url(), "alice.early", profile="cgminer", reconnect_delay=30, hashrate=FAST_HASHRATE)
        nursery.start_soon(miner.run)
        with trio.fail_after(5):
            await until(lambda: accepted_at(bench.pools[1], "alice.early") >= 2)
        assert miner.statistics().disconnects == 0 and miner.statistics().connections == 1
        assert bench.proxy.statistics().failover.detections == {"connect failed": 1}
        await finish([miner])
        assert_tally([miner], bench.pools)
        nursery.cancel_scope.cancel()
