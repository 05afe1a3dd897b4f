"""The failover policy's timer contract under a clock that stops exactly at each deadline.

A virtual clock (trio's ``MockClock`` with autojump) wakes the driver at
``get_timer()`` exactly. ``handle_timer`` must then consume that deadline:
if it compares ``now - start >= bound`` while ``get_timer`` computed
``start + bound``, float rounding can leave the deadline due but unconsumed and
the driver spins forever at one instant (it did: keepalive ``1/3`` s after 1.0).
"""

from __future__ import annotations

import random

from bridge.relay.failover import (
    FailoverConfig,
    FailoverPolicy,
    NoUpstreamPolicy,
    UpstreamSpec,
)

A = "00" * 24 + "aa" * 8
B = "00" * 24 + "bb" * 8


def drive(policy: FailoverPolicy, now: float, until: float, rng: random.Random) -> float:
    """Jump from deadline to deadline like an autojump clock, feeding traffic; return the end."""
    steps_at_one_instant = 0
    while now < until:
        deadline = policy.get_timer()
        if deadline is None:
            return now
        if deadline > now:
            now = deadline  # the virtual clock jumps exactly there
            steps_at_one_instant = 0
        policy.handle_timer(now)
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


def test_an_outage_under_the_keep_policy_leaves_no_deadline_due() -> None:
    # KEEP never releases rigs, so the no-upstream grace must not stay a due deadline
    # (it did: the proxy's policy task spun at 100 % CPU for the whole outage).
    for policy_kind in (NoUpstreamPolicy.KEEP, NoUpstreamPolicy.DISCONNECT):
        config = FailoverConfig(silence_timeout=1.0, no_upstream_grace=0.5, no_upstream=policy_kind)
        policy = FailoverPolicy([UpstreamSpec("u0", priority=0), UpstreamSpec("u1", priority=1)], config)
        for upstream in (0, 1):
            policy.connected(upstream, 1.0)
            policy.job(upstream, A, 1.0)
        upstream = policy.assign(0, 1.0)
        assert upstream is not None
        policy.attached(0, upstream, 1.0)
        drive(policy, 1.0, 2.0, random.Random(0))
        policy.lost(0, "reset", 2.0, connect_failed=True)
        policy.lost(1, "reset", 2.0, connect_failed=True)
        now = 2.0
        for _ in range(50):  # an autojump clock: always exactly at the next deadline
            deadline = policy.get_timer()
            if deadline is None or now > 30.0:
                break
            now = max(now, deadline)
            policy.handle_timer(now)
            policy.take_events()
            assert policy.get_timer() is None or policy.get_timer() > now, (policy_kind, now)
