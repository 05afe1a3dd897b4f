"""The failover policy, sans-IO: health, lag, hold-down, strategies, pacing, no-upstream policy."""

from __future__ import annotations

import pytest

from bridge.errors import ConfigError
from bridge.relay.failover import (
    FailoverConfig,
    FailoverPolicy,
    MoveRig,
    NoUpstreamPolicy,
    ReleaseRigs,
    SendKeepalive,
    State,
    Strategy,
    UpstreamSpec,
)

A = "00" * 24 + "aa" * 8
B = "00" * 24 + "bb" * 8
C = "00" * 24 + "cc" * 8


def policy(n: int = 2, **options) -> FailoverPolicy:
    specs = options.pop("specs", None) or [UpstreamSpec(f"u{i}", priority=i) for i in range(n)]
    return FailoverPolicy(specs, FailoverConfig(**options))


def bring_up(p: FailoverPolicy, upstream: int, now: float, prevhash: str = A) -> None:
    p.connected(upstream, now)
    p.job(upstream, prevhash, now)


def run(p: FailoverPolicy, now: float) -> list:
    actions = []
    deadline = p.get_timer()
    while deadline is not None and deadline <= now:
        p.handle_timer(now)
        actions.extend(p.take_actions())
        deadline = p.get_timer()
    return actions


def moves(actions) -> list[MoveRig]:
    return [a for a in actions if isinstance(a, MoveRig)]


def test_rigs_go_to_the_first_level_and_move_when_it_dies() -> None:
    p = policy()
    bring_up(p, 0, 0.0)
    bring_up(p, 1, 0.0)
    for rig in range(3):
        assert p.assign(rig, 0.1) == 0
        p.attached(rig, 0, 0.1)
    assert not moves(run(p, 0.2))
    p.lost(0, "connection reset by peer", 1.0)
    assert p.state(0) is State.DOWN
    planned = moves(run(p, 1.0))
    assert {(m.rig, m.source, m.target, m.urgent) for m in planned} == {(r, 0, 1, True) for r in range(3)}
    events = p.take_events()
    assert any(e.kind == "detection" and e.reason == "connection lost" and "reset" in e.message for e in events)
    assert any(e.kind == "switch" and "3 rig(s) to u1" in e.message for e in events)
    assert p.statistics(1.0).detections == {"connection lost": 1}
    assert p.statistics(1.0).switches == {"failover": 3}


def test_upstreams_are_presumed_usable_until_a_probe_says_otherwise() -> None:
    p = policy()
    assert p.assign(1, 0.0) == 0
    p.lost(0, "connection refused", 0.1, connect_failed=True)
    assert p.statistics(0.1).detections == {"connect failed": 1}
    p.move_failed(1, 0, "connection refused", 0.1)
    planned = moves(run(p, 0.16))  # at once (after the settle time), not after MOVE_RETRY
    assert [(m.rig, m.source, m.target) for m in planned] == [(1, None, 1)]
    # a failed move to an upstream that still looks healthy is retried a second later
    p.move_failed(1, 1, "authorize refused", 0.2)
    assert moves(run(p, 0.5)) == []
    assert [(m.rig, m.target) for m in moves(run(p, 1.25))] == [(1, 1)]


def test_silence_is_declared_only_after_keepalives_went_unanswered() -> None:
    p = policy(silence_timeout=3.0)
    bring_up(p, 0, 0.0)
    bring_up(p, 1, 0.0)
    assert run(p, 0.5) == []
    actions = run(p, 1.0)
    assert SendKeepalive(0) in actions and SendKeepalive(1) in actions
    p.traffic(1, 1.01)  # u1 answers, u0 does not
    assert SendKeepalive(0) in run(p, 2.0) and p.state(0) is State.UP
    run(p, 3.0)
    assert p.state(0) is State.DOWN and p.state(1) is State.UP
    assert p.down_reason(0).startswith("silent")
    # traffic again ends the silence; back up, but held down before rigs return
    p.traffic(0, 3.5)
    assert p.state(0) is State.UP


def test_a_stratumrm_upstream_is_judged_by_its_link_not_called_silent_by_the_policy() -> None:
    # The link has rm.ping, dead_after and the busy-peer rules; a sidecar too busy to send a
    # line for 20 s (its TCP still acknowledging) must not be failed over by a second, cruder rule.
    specs = [UpstreamSpec("link", priority=0, own_liveness=True), UpstreamSpec("sv1", priority=0)]
    p = policy(specs=specs, silence_timeout=3.0)
    bring_up(p, 0, 0.0)
    bring_up(p, 1, 0.0)
    actions = run(p, 20.0)
    assert SendKeepalive(0) not in actions and SendKeepalive(1) in actions
    run(p, 40.0)
    assert p.state(0) is State.UP and p.state(1) is State.DOWN and p.down_reason(1).startswith("silent")
    p.lost(0, "StratumRM connection lost: sidecar silent for 5 s", 41.0)  # the link decides
    assert p.state(0) is State.DOWN and p.down_reason(0).startswith("connection lost")


def test_a_late_timer_sends_the_keepalive_before_blaming_the_upstream() -> None:
    # A process too busy to run its timers for 4 s must not call a healthy upstream silent:
    # the keepalive goes out first and gets its share of the window to be answered.
    p = policy(silence_timeout=3.0)
    bring_up(p, 0, 0.0)
    bring_up(p, 1, 0.0)
    actions = run(p, 4.0)  # the first timer run since 0 s, long past the 3 s bound
    assert SendKeepalive(0) in actions and p.state(0) is State.UP and p.state(1) is State.UP
    p.traffic(0, 4.2)  # u0 answers its keepalive; u1 stays silent
    assert p.get_timer() is not None and p.get_timer() > 4.2
    run(p, 6.0)
    assert p.state(0) is State.UP and p.state(1) is State.DOWN
    assert p.down_reason(1).startswith("silent")


def test_keepalives_off_means_no_silence_rule() -> None:
    p = policy(keepalive_interval=None, job_timeout=30.0)
    bring_up(p, 0, 0.0)
    assert run(p, 20.0) == [] and p.state(0) is State.UP
    run(p, 30.0)
    assert p.state(0) is State.DOWN and p.down_reason(0).startswith("no jobs")


def test_an_upstream_that_stops_sending_jobs_is_down() -> None:
    p = policy(job_timeout=10.0)
    bring_up(p, 0, 0.0)
    bring_up(p, 1, 0.0)
    for t in range(1, 12):
        p.traffic(0, float(t))  # answers keepalives, sends no job
        p.job(1, A, float(t))
        run(p, float(t))
    assert p.state(0) is State.DOWN and p.down_reason(0).startswith("no jobs")


def test_lag_is_a_block_the_other_upstream_moved_to_and_this_one_has_not() -> None:
    p = policy(lag_delay=2.0, silence_timeout=100.0)
    bring_up(p, 0, 0.0, A)
    bring_up(p, 1, 0.0, A)
    p.assign(7, 0.0)
    p.attached(7, 0, 0.0)
    p.job(1, B, 10.0)  # the backup sees a new block
    run(p, 11.0)
    assert p.state(0) is State.UP
    for t in (11.5, 12.0):
        p.traffic(0, t)
        p.traffic(1, t)
    actions = run(p, 12.0)
    assert p.state(0) is State.DOWN and p.down_reason(0).startswith("lagging")
    assert [(m.rig, m.target) for m in moves(actions)] == [(7, 1)]
    # the primary catches up: healthy again
    p.job(0, B, 13.0)
    assert p.state(0) is State.UP


def test_different_chains_and_forks_are_not_lag() -> None:
    p = policy(lag_delay=1.0, silence_timeout=100.0)
    bring_up(p, 0, 0.0, A)
    bring_up(p, 1, 0.0, C)  # never shared a block: another chain
    p.job(1, B, 1.0)
    run(p, 5.0)
    assert p.state(0) is State.UP
    q = policy(lag_delay=1.0, silence_timeout=100.0)
    bring_up(q, 0, 0.0, A)
    bring_up(q, 1, 0.0, A)
    q.job(0, B, 1.0)
    q.job(1, C, 1.0)  # a fork: each has a block the other lacks
    for t in (2.0, 4.0):
        q.traffic(0, t)
        q.traffic(1, t)
        run(q, t)
    assert q.state(0) is State.UP and q.state(1) is State.UP
    # the upstream that is behind is the lagging one, not the one ahead
    r = policy(lag_delay=1.0, silence_timeout=100.0)
    bring_up(r, 0, 0.0, A)
    bring_up(r, 1, 0.0, A)
    r.job(0, B, 1.0)
    r.traffic(1, 2.5)
    run(r, 2.5)
    assert r.state(1) is State.DOWN and r.state(0) is State.UP


def test_fail_back_waits_for_the_hold_down() -> None:
    p = policy(hold_down=10.0, silence_timeout=100.0)
    bring_up(p, 0, 0.0)
    bring_up(p, 1, 0.0)
    for rig in range(4):
        p.attached(rig, 0, 0.0)
    p.lost(0, "reset", 1.0)
    for move in moves(run(p, 1.0)):
        p.attached(move.rig, move.target, 1.1)
    bring_up(p, 0, 2.0)  # back, healthy
    assert p.state(0) is State.UP
    assert moves(run(p, 5.0)) == []
    assert p.statistics(5.0).upstreams[0].in_hold_down
    assert p.get_timer() <= 12.0
    planned = moves(run(p, 12.0))
    assert len(planned) == 4 and {m.target for m in planned} == {0} and not any(m.urgent for m in planned)
    assert p.statistics(12.0).switches == {"failover": 4, "failback": 4}
    assert any("healthy again" in e.message for e in p.take_events())


def test_a_held_down_upstream_is_used_when_nothing_else_is() -> None:
    p = policy(hold_down=100.0)
    bring_up(p, 0, 0.0)
    p.lost(0, "reset", 1.0)
    p.lost(1, "refused", 1.0, connect_failed=True)
    bring_up(p, 0, 2.0)
    assert p.assign(1, 3.0) == 0


def test_moves_are_paced() -> None:
    p = policy(switch_rate=100.0, switch_burst=10)
    bring_up(p, 0, 0.0)
    bring_up(p, 1, 0.0)
    for rig in range(50):
        p.attached(rig, 0, 0.0)
    p.lost(0, "reset", 1.0)
    first = moves(run(p, 1.0))
    assert len(first) == 10
    deadline = p.get_timer()
    assert 1.0 < deadline <= 1.011
    assert len(moves(run(p, 1.05))) == 5  # 100 per second
    total = len(first) + 5
    t = 1.05
    while total < 50:
        t += 0.1
        total += len(moves(run(p, t)))
    assert total == 50 and t < 1.5


def test_orphans_settle_before_they_are_placed() -> None:
    p = policy(settle=0.05)
    bring_up(p, 0, 0.0)
    bring_up(p, 1, 0.0)
    p.attached(1, 0, 0.0)
    p.detached(1, "reset", 1.0)
    assert moves(run(p, 1.0)) == []
    p.lost(0, "reset", 1.01)  # the probe's loss arrives a moment later
    assert [(m.source, m.target) for m in moves(run(p, 1.06))] == [(None, 1)]


def test_an_orphan_is_placed_when_its_settle_time_is_up_without_any_other_event() -> None:
    p = policy(settle=0.05)
    bring_up(p, 0, 0.0)
    p.attached(1, 0, 0.0)
    run(p, 0.5)
    p.detached(1, "the pool closed this rig's connection", 1.0)
    assert moves(run(p, 1.0)) == []
    assert p.get_timer() == pytest.approx(1.05)
    assert p.get_timer() <= 1.07  # due: not forgotten once its time has passed
    assert [(m.source, m.target) for m in moves(run(p, 1.07))] == [(None, 0)]


def test_weighted_strategy_splits_rigs_by_weight_and_rebalances_gently() -> None:
    specs = [UpstreamSpec("a", 0, 3.0), UpstreamSpec("b", 0, 1.0), UpstreamSpec("backup", 1, 0.0)]
    p = policy(specs=specs, strategy=Strategy.WEIGHTED, hold_down=5.0, silence_timeout=100.0)
    for i in range(3):
        bring_up(p, i, 0.0)
    placed = []
    for rig in range(8):
        target = p.assign(rig, 0.0)
        p.attached(rig, target, 0.0)
        placed.append(target)
    assert placed.count(0) == 6 and placed.count(1) == 2 and placed.count(2) == 0
    p.lost(0, "reset", 1.0)
    for move in moves(run(p, 1.0)):
        assert move.target == 1
        p.attached(move.rig, 1, 1.0)
    bring_up(p, 0, 2.0)
    assert moves(run(p, 3.0)) == []  # hold-down
    back = moves(run(p, 7.5))
    assert len(back) == 6 and {m.target for m in back} == {0} and all("rebalance" in m.reason for m in back)
    # both weighted upstreams down: the zero-weight backup takes everyone
    p.lost(0, "reset", 10.0)
    p.lost(1, "reset", 10.0)
    assert {m.target for m in moves(run(p, 10.0))} == {2}


def test_failover_strategy_spreads_a_level_by_weight() -> None:
    specs = [UpstreamSpec("a", 0), UpstreamSpec("b", 0), UpstreamSpec("c", 1)]
    p = policy(specs=specs)
    for i in range(3):
        bring_up(p, i, 0.0)
    targets = [p.assign(rig, 0.0) for rig in range(6)]
    assert targets.count(0) == 3 and targets.count(1) == 3


def test_no_upstream_disconnects_after_the_grace() -> None:
    p = policy(no_upstream_grace=2.0)
    bring_up(p, 0, 0.0)
    bring_up(p, 1, 0.0)
    for rig in range(3):
        p.attached(rig, 0, 0.0)
    p.lost(0, "reset", 1.0)
    p.lost(1, "reset", 1.0)
    assert not [a for a in run(p, 1.0) if isinstance(a, (MoveRig, ReleaseRigs))]
    assert p.assign(9, 1.5) is None  # new rigs are released at once
    assert p.get_timer() == pytest.approx(3.0)
    released = [a for a in run(p, 3.0) if isinstance(a, ReleaseRigs)]
    assert len(released) == 1 and set(released[0].rigs) == {0, 1, 2}
    assert run(p, 4.0) == [] or not [a for a in run(p, 4.0) if isinstance(a, ReleaseRigs)]
    kinds = [e.kind for e in p.take_events()]
    assert "outage" in kinds and "release" in kinds
    assert p.statistics(4.0).outages == 1 and p.statistics(4.0).released == 3


def test_no_upstream_keep_policy_holds_rigs_until_one_is_back() -> None:
    p = policy(no_upstream=NoUpstreamPolicy.KEEP, no_upstream_grace=1.0, hold_down=60.0)
    bring_up(p, 0, 0.0)
    p.attached(1, 0, 0.0)
    p.lost(0, "reset", 1.0)
    p.lost(1, "refused", 1.0, connect_failed=True)
    p.detached(1, "reset", 1.0)
    assert not [a for a in run(p, 10.0) if isinstance(a, (MoveRig, ReleaseRigs))]
    bring_up(p, 1, 11.0)
    assert [(m.rig, m.target) for m in moves(run(p, 11.0))] == [(1, 1)]


def test_pool_status_from_the_sidecar_counts_as_a_detection() -> None:
    p = policy()
    bring_up(p, 0, 0.0)
    bring_up(p, 1, 0.0)
    p.pool_status(0, False, "pool connection refused", 1.0)
    assert p.state(0) is State.DOWN and p.statistics(1.0).detections == {"pool down": 1}
    p.pool_status(0, True, "", 2.0)
    assert p.state(0) is State.UP


@pytest.mark.parametrize(
    "options",
    [
        {"silence_timeout": 0},
        {"hold_down": -1},
        {"switch_burst": 0},
        {"keepalive_interval": 10.0},
    ],
)
def test_bad_settings_are_refused(options) -> None:
    with pytest.raises(ConfigError):
        FailoverConfig(**options)
