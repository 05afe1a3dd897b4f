"""Fault injection on the whole chain, with a tally per scenario and seed (issue 9, item 7).

rigs -> miner proxy => [TCP relay / UDP relay] => sidecar -> reference pool, in
one process under trio's autojump clock: each scenario lets the rigs mine,
inflicts one fault (sidecar killed and restarted, pool restarted, control
connection reset, UDP blackholed for 30 s, proxy restarted, a clock jump),
waits until every rig has shares accepted at the pool again, lets the rigs
finish, and tallies: every rig told "accepted" for a share the pool accepted,
nothing twice at the pool. The rows are printed as a markdown table at the end
of the run. Two seeds per scenario in the default tier, eight more with
``--run-slow``; the soak (every fault in a row, several rounds) is slow-only.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import pytest
import trio

from bridge.testing.faults import (
    FaultBench,
    seeded_profiles,
    start_fault_bench,
    tally,
    until,
)
from bridge.testing.miner import Miner
from bridge.testing.pool import PoolConfig

# Per rig, virtual: ~1 share per virtual second (1,074 hashes a share at DIFFICULTY), the
# rate of the bench's own 1.25e-6 at 5 kH/s for a fifth of the hashing.
HASHRATE = 1_000.0
DIFFICULTY = 2.5e-7


async def sidecar_killed(bench: FaultBench, rng: random.Random) -> None:
    await bench.kill_sidecar()
    await trio.sleep(rng.uniform(0.5, 5.0))
    await bench.start_sidecar()


async def pool_restarted(bench: FaultBench, rng: random.Random) -> None:
    await bench.restart_pool(down_for=rng.uniform(0.5, 5.0))


async def control_reset(bench: FaultBench, rng: random.Random) -> None:
    assert bench.reset_control() >= 1


async def udp_blackholed(bench: FaultBench, rng: random.Random) -> None:
    await bench.blackhole_udp(30.0)


async def proxy_restarted(bench: FaultBench, rng: random.Random) -> None:
    await bench.restart_proxy(down_for=rng.uniform(0.0, 3.0))


async def clock_jump(bench: FaultBench, rng: random.Random) -> None:
    bench.jump_clock(rng.choice([7.0, 45.0, 600.0]))


SCENARIOS: dict[str, Callable[[FaultBench, random.Random], Awaitable[None]]] = {
    "sidecar SIGKILL + restart": sidecar_killed,
    "pool restart": pool_restarted,
    "control connection reset": control_reset,
    "UDP blackholed 30 s": udp_blackholed,
    "miner proxy restart": proxy_restarted,
    "clock jump": clock_jump,
}

SEEDS = [1, 2, *(pytest.param(seed, marks=pytest.mark.slow) for seed in range(3, 11))]


def accepted_at(bench: FaultBench, worker: str) -> int:
    return bench.pool.statistics().accepted_by_worker.get(worker, 0)


async def run_scenario(
    name: str, faults: list[Callable[[FaultBench, random.Random], Awaitable[None]]], seed: int, tmp_path, clock, rigs: int = 3
):
    rng = random.Random(seed)
    async with trio.open_nursery() as nursery:
        bench = await start_fault_bench(
            nursery,
            tmp_path,
            clock=clock,
            seed=seed,
            pool_config=PoolConfig(difficulty=DIFFICULTY, notify_interval=5.0, seed=seed),
        )
        miners = [
            Miner(
                bench.miner_url_xnsub() if profile in ("bmminer", "bfgminer") else bench.miner_url,
                f"alice.{profile}{index}",
                profile=profile,
                hashrate=HASHRATE,
                reconnect_delay=1.0,
                share_timeout=600.0,
            )
            for index, profile in enumerate(seeded_profiles(seed, rigs))
        ]
        workers = [m.config.user for m in miners]
        for miner in miners:
            nursery.start_soon(miner.run)
        with trio.fail_after(900):  # virtual seconds
            await until(lambda: all(accepted_at(bench, w) >= 1 for w in workers))
            for fault in faults:
                await trio.sleep(rng.uniform(0.0, 3.0))  # the fault lands anywhere in the share flow
                await fault(bench, rng)
                before = {w: accepted_at(bench, w) for w in workers}
                await until(lambda before=before: all(accepted_at(bench, w) >= before[w] + 2 for w in workers))
            for miner in miners:
                miner.finish()
            await until(lambda: all(m.statistics().pending == 0 for m in miners))
        for miner in miners:
            miner.stop()
        row = tally(name, seed, miners, [bench.pool], bench.faults)
        nursery.cancel_scope.cancel()
    return row


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_no_share_is_lost_to_a_lie_or_counted_twice(scenario, seed, tmp_path, autojump_clock, fault_tally) -> None:
    row = await run_scenario(scenario, [SCENARIOS[scenario]], seed, tmp_path, autojump_clock)
    fault_tally(row)
    assert row.told_accepted_not_at_pool == 0, row
    assert row.duplicated_at_pool == 0, row
    assert row.accepted_at_pool >= 3 * 3 and row.answered <= row.submitted


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", range(1, 6))
async def test_soak_every_fault_in_a_row(seed, tmp_path, autojump_clock, fault_tally) -> None:
    rng = random.Random(seed)
    order = [fault for _ in range(3) for fault in rng.sample(list(SCENARIOS.values()), len(SCENARIOS))]
    row = await run_scenario("soak: 3 rounds of every fault", order, seed, tmp_path, autojump_clock, rigs=4)
    fault_tally(row)
    assert row.told_accepted_not_at_pool == 0 and row.duplicated_at_pool == 0, row
