"""The failover policy's timer contract under a clock that stops exactly at each deadline.

A virtual clock (trio's ``MockClock`` with autojump) wakes the driver at
``next_deadline(now)`` exactly. ``on_timer`` must then consume that deadline:
if it compares ``now - start >= bound`` while ``next_deadline`` computed
``start + bound``, float rounding can leave the deadline due but unconsumed and
the driver spins forever at one instant (it did: keepalive ``1/3`` s after 1.0).
"""

from __future__ import annotations

import random

from bridge.relay.failover import FailoverConfig, FailoverPolicy, UpstreamSpec

A = "00" * 24 + "aa" * 8
B = "00" * 24 + "bb" * 8


def drive(policy: FailoverPolicy, now: float, until: float, rng: random.Random) -> float:
    """Jump from deadline to deadline like an autojump clock, feeding traffic; return the end."""
    steps_at_one_instant = 0
    while now < until:
        deadline = policy.next_deadline(now)
        if deadline is None:
            return now
        if deadline > now:
            now = deadline  # the virtual clock jumps exactly there
            steps_at_one_instant = 0
        policy.on_timer(now)
        policy.take_events()
        steps_at_one_instant += 1
        assert steps_at_one_instant < 50, f"the deadline {deadline!r} stays due at {now!r}: the driver would spin"
        if rng.random() < 0.3:
            upstream = rng.randrange(len(policy.upstreams))
            policy.traffic(upstream, now)
            policy.keepalive_sent(upstream, now)
    return now


def test_every_deadline_is_consumed_at_the_instant_it_falls_due() -> None:
    for seed in range(200):
        rng = random.Random(seed)
        config = FailoverConfig(silence_timeout=1.0, lag_delay=0.5, hold_down=1.5, no_upstream_grace=0.5)
        policy = FailoverPolicy([UpstreamSpec("u0", priority=0), UpstreamSpec("u1", priority=1)], config)
        start = 1.0 if seed == 0 else rng.uniform(0.0, 1000.0)  # seed 0: the case that spun in a test
        for upstream in (0, 1):
            policy.connected(upstream, start)
            policy.job(upstream, A, start)
        for rig in range(3):
            upstream = policy.assign(rig, start)
            assert upstream is not None
            policy.attached(rig, upstream, start)
        now = drive(policy, start, start + 5.0, rng)
        policy.job(1, B, now)  # the backup moves ahead: lag timers
        now = drive(policy, now, now + 5.0, rng)
        policy.lost(0, "reset", now)  # moves under the token bucket
        drive(policy, now, now + 10.0, rng)
