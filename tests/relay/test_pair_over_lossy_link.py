"""The real proxy core against the real sidecar core over a seeded, lossy, in-memory link.

Explicit virtual time, no sockets: whatever the link does (loss, duplication,
reordering), every share a rig submits gets exactly one verdict, the pool's own,
and the pool sees each share exactly once. The pool core judges each share by
its real double SHA-256, so a share garbled on the way would be rejected.
"""

from __future__ import annotations

import random

import pytest

from tests.relay.pair_harness import PairWorld, Rig


def mine(world: PairWorld, rigs: list[Rig], shares_per_rig: int, *, spacing: float, seed: int) -> int:
    """Schedule each rig's shares at random moments about ``spacing`` apart; return how many."""
    rng = random.Random(seed)
    serial = 0
    for rig in rigs:
        when = 0.0
        for _ in range(shares_per_rig):
            when += rng.expovariate(1.0 / spacing)
            serial += 1
            world.at(world.now + when, lambda rig=rig, serial=serial: rig.submit(serial, world.target))
    return serial


def ready(world: PairWorld, rigs: list[Rig]) -> None:
    world.run_until(5.0, lambda: world.proxy.udp_up and all(r.job is not None and r.extranonce2_size for r in rigs))
    assert world.proxy.udp_up, "the data channel never came up"
    assert all(r.job is not None for r in rigs), "a rig never got a job"


def settled(rigs: list[Rig]) -> bool:
    return all(len(r.verdicts) == len(r.submitted) for r in rigs)


def tally(world: PairWorld, rigs: list[Rig]) -> dict[str, int]:
    told_accepted = sum(v[0] for r in rigs for v in r.verdicts.values())
    at_pool = list(world.pool.accepted)
    return {
        "submitted": sum(len(r.submitted) for r in rigs),
        "answered": sum(len(r.verdicts) for r in rigs),
        "answered twice": sum(len(v) > 1 for r in rigs for v in r.verdicts.values()),
        "told accepted": told_accepted,
        "accepted at pool": len(at_pool),
        "distinct at pool": len({(s.worker, s.job_id, s.extranonce2, s.nonce) for s in at_pool}),
        "rejected at pool": len(world.pool.rejected),
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_twenty_percent_loss_with_duplication_and_reordering_loses_and_duplicates_nothing(seed: int) -> None:
    world = PairWorld(seed=seed, loss=0.20, duplicate=0.05, delay=0.010, jitter=0.015, pool_delay=0.002)
    rigs = [world.add_rig(f"alice.rig{i}") for i in range(4)]
    ready(world, rigs)
    submitted = mine(world, rigs, 60, spacing=0.05, seed=seed)
    world.run_until(world.now + 120.0, lambda: settled(rigs) and len(world.pool.accepted) == submitted)
    counts = tally(world, rigs)
    assert counts == {
        "submitted": submitted,
        "answered": submitted,
        "answered twice": 0,
        "told accepted": submitted,
        "accepted at pool": submitted,
        "distinct at pool": submitted,
        "rejected at pool": 0,
    }, counts
    stats = world.proxy.statistics()
    # the link really was hostile, and the proxy really had to work around it
    assert world.up.dropped > 10 and world.down.dropped > 10 and world.up.duplicated > 0
    assert stats.retransmissions_udp + stats.verdict_queries > 0
    assert stats.pending == 0


@pytest.mark.parametrize("pool_delay", [0.0, 0.050])
def test_no_share_is_sent_again_at_zero_loss_even_with_a_slow_pool(pool_delay: float) -> None:
    world = PairWorld(seed=7, delay=0.005, jitter=0.002, pool_delay=pool_delay)
    rigs = [world.add_rig(f"alice.rig{i}") for i in range(20)]
    ready(world, rigs)
    submitted = mine(world, rigs, 10, spacing=0.02, seed=7)
    world.run_until(world.now + 60.0, lambda: settled(rigs) and len(world.pool.accepted) == submitted)
    counts = tally(world, rigs)
    assert counts["told accepted"] == counts["accepted at pool"] == counts["distinct at pool"] == submitted, counts
    stats = world.proxy.statistics()
    assert (stats.retransmissions_udp, stats.retransmissions_tls, stats.verdict_queries) == (0, 0, 0), stats
    assert stats.shares_udp == submitted and stats.udp_fallbacks == 0
    if pool_delay > world.sidecar.max_ack_delay:
        assert stats.acks_received > 0  # the transport ACK, not the verdict, kept the RTO short
