"""The bare Python relay pair, the transport benchmark's floor: shares cross it, and only UDP joins the two."""

from __future__ import annotations

import trio

from bridge.bench.bare_relay import BarePair
from bridge.testing.miner import Miner
from bridge.testing.pool import PoolConfig, ReferencePool


async def test_shares_cross_the_bare_pair_and_get_the_pools_verdicts() -> None:
    async with trio.open_nursery() as nursery:
        pool = ReferencePool(PoolConfig(difficulty=0.000002))
        pool_port = await nursery.start(pool.serve, "127.0.0.1", 0)
        pair = BarePair("127.0.0.1", pool_port)
        await pair.start()
        try:
            miners = [
                Miner(f"stratum+tcp://127.0.0.1:{pair.entry_port}", f"bench.rig{n}", profile="cgminer", max_shares=3)
                for n in range(2)
            ]
            with trio.fail_after(30):
                async with trio.open_nursery() as rigs:
                    for miner in miners:
                        rigs.start_soon(miner.run)
            # Each rig has its own way through (its own datagrams, its own pool connection).
            assert [len(miner.accepted) for miner in miners] == [3, 3] and len(pool.accepted) == 6
            assert set(pair.pids) == {"proxy", "sidecar"} and all(pid > 0 for pid in pair.pids.values())
        finally:
            await pair.stop()
        nursery.cancel_scope.cancel()
