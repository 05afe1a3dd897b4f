"""The proxy core, sans-IO: placement, failover, fail-back, release, reconnect params, probes.

Every scenario drives :class:`~bridge.relay.proxy.ProxyCore` with in-memory rigs and
pools (tests/relay/proxy_harness.py) and explicit time, so what the end-to-end
tests in tests/net/test_failover.py show over sockets in seconds is shown here in
milliseconds, instant by instant.
"""

from __future__ import annotations

import pytest

from bridge.relay.failover import NoUpstreamPolicy
from bridge.relay.proxy import (
    CheckUpstream,
    CloseRig,
    LegOpened,
    OpenLeg,
    ProxyCore,
    ProxySettings,
    ProxyUpstream,
    RigConnected,
    RigData,
    Timer,
    WriteRig,
    reconnect_params,
)
from bridge.sv1.client import ClientSession
from tests.relay.proxy_harness import PREV_B, World

FAST = dict(silence_timeout=1.0, lag_delay=0.5, hold_down=1.5, no_upstream_grace=0.5)


def working(world: World, rig, upstream: int) -> bool:
    """The rig's share is accepted by ``upstream``'s pool."""
    before = len(world.pools[upstream].accepted)
    request = world.submit(rig)
    answer = world.answer(rig, request)
    return answer is not None and answer["result"] is True and len(world.pools[upstream].accepted) == before + 1


def reconnect(world: World, rig):
    """The rig obeys client.reconnect: its connection ends and it connects again (a new rig id)."""
    assert rig.reconnects(), "no client.reconnect was sent"
    world.advance(2.5)  # the proxy closes it after the linger
    assert rig.closed is not None and rig.closed.startswith("client.reconnect sent")
    return world.connect_rig(rig.agent, xnsub=rig.xnsub)


def test_a_rig_is_placed_on_the_primary_and_its_shares_reach_it() -> None:
    world = World(**FAST)
    rig = world.connect_rig()
    assert rig.established and world.upstream_of(rig) == 0
    assert rig.extranonce1 == "11110002"  # the primary's session (its first one is the probe's)
    assert len(rig.jobs()) == 1 and rig.jobs()[0].startswith("p0")
    assert working(world, rig, 0)
    assert world.core.probes[0].reader.identity == ("alice.rig", "x")  # the probes borrow the first worker name


def test_the_primary_killed_cgminer_rigs_reconnect_to_the_backup_then_fail_back_after_the_hold_down() -> None:
    world = World(**FAST)
    rigs = [world.connect_rig(user=f"alice.cg{i}") for i in range(3)]
    assert all(working(world, r, 0) for r in rigs)
    world.kill(0)
    world.advance(0.2)
    assert all(r.reconnects() and r.reconnects()[0]["params"] == [] for r in rigs)  # cgminer: "this server again"
    rigs = [reconnect(world, r) for r in rigs]
    assert all(world.upstream_of(r) == 1 and working(world, r, 1) for r in rigs)
    stats = world.core.policy.statistics(world.now)
    assert stats.detections == {"connection lost": 1} and stats.switches == {"failover": 3}
    restored = world.now
    world.restore(0)
    world.advance(1.0)
    assert all(not r.reconnects() for r in rigs), "not before the hold-down"
    world.advance(1.0)
    assert world.now - restored >= FAST["hold_down"]
    rigs = [reconnect(world, r) for r in rigs]
    assert all(world.upstream_of(r) == 0 and working(world, r, 0) for r in rigs)
    assert world.core.policy.statistics(world.now).switches == {"failover": 3, "failback": 3}
    assert {"detection", "switch", "recovery"} <= set(world.kinds())


def test_an_xnsub_rig_gets_set_extranonce_and_a_clean_job_from_the_backup_without_reconnecting() -> None:
    world = World(**FAST)
    rig = world.connect_rig("bmminer/2.0.0", xnsub=True)
    first = rig.extranonce1
    assert working(world, rig, 0)
    world.kill(0)
    world.advance(0.2)
    assert rig.closed is None and not rig.reconnects()
    assert rig.extranonce1 != first and rig.extranonce1.startswith("2222")
    assert rig.received[-1]["method"] == "mining.notify" and rig.received[-1]["params"][8] is True  # a clean job
    assert world.upstream_of(rig) == 1 and working(world, rig, 1)


def test_a_share_in_flight_on_a_dead_primary_is_answered_not_confirmed_at_once() -> None:
    world = World(**FAST)
    rig = world.connect_rig("bmminer/2.0.0", xnsub=True)
    world.pools[0].silent = True  # the share goes out, no verdict comes back
    request = world.submit(rig)
    assert world.answer(rig, request) is None
    world.kill(0)
    answer = world.answer(rig, request)
    assert answer is not None and answer["result"] is False and "not confirmed" in answer["error"][1]


def test_a_blackholed_primary_is_declared_silent_after_the_keepalive_goes_unanswered() -> None:
    world = World(**FAST)
    rig = world.connect_rig("bmminer/2.0.0", xnsub=True)
    world.pools[0].silent = True
    world.advance(3.0)
    assert world.core.policy.down_reason(0).startswith("silent")
    assert world.upstream_of(rig) == 1 and rig.closed is None and working(world, rig, 1)
    assert world.core.probes[0].checks_failed >= 1


def test_a_keepalive_answered_keeps_a_quiet_upstream_up() -> None:
    world = World(**FAST)
    world.connect_rig()
    world.advance(4.0)
    assert world.core.policy.down_reason(0) is None
    assert world.core.probes[0].keepalives >= 3


def test_a_stratumrm_upstream_is_judged_by_its_link_and_only_sv1_upstreams_are_checked() -> None:
    world = World(stratumrm=(0,), **FAST)
    asked: list[CheckUpstream] = []
    world.apply = lambda commands, apply=world.apply: (
        asked.extend(c for c in commands if isinstance(c, CheckUpstream)),
        apply(commands),
    )
    world.advance(3 * FAST["silence_timeout"])
    assert not any(c.upstream == 0 for c in asked)  # its link has rm.ping, dead_after and the busy rules
    assert any(c.upstream == 1 for c in asked)
    assert world.core.policy.down_reason(0) is None


def test_keepalive_ping_asks_on_the_probe_session() -> None:
    world = World(keepalive="ping", **FAST)
    world.advance(FAST["silence_timeout"])
    assert world.checks_asked == 0 and world.core.probes[0].keepalives >= 1
    assert world.core.policy.down_reason(0) is None  # the pool answered the ping: traffic


def test_a_lagging_primary_loses_its_rigs_and_keeps_their_verdicts() -> None:
    world = World(**FAST)
    rig = world.connect_rig("bmminer/2.0.0", xnsub=True)
    world.advance(1.0)
    world.pools[1].prevhash = PREV_B
    world.new_job(1)  # the backup moves on, the primary does not
    world.advance(FAST["lag_delay"] + 0.1)
    assert world.core.policy.down_reason(0).startswith("lagging")
    assert world.upstream_of(rig) == 1 and rig.closed is None
    world.pools[0].prevhash = PREV_B
    world.new_job(0)
    world.advance(FAST["hold_down"] + 0.2)
    assert world.upstream_of(rig) == 0 and working(world, rig, 0)


@pytest.mark.parametrize(
    ("agent", "params"),
    [
        ("cgminer/4.12.0", []),
        ("bmminer/2.0.0", []),
        ("cpuminer/2.5.1", ["192.0.2.1", 3333]),
        ("cpuminer-multi/1.3", ["192.0.2.1", 3333]),
        ("minerd/2.3.3", ["192.0.2.1", 3333]),
        ("", []),
    ],
)
def test_reconnect_params_depend_on_the_miner(agent: str, params: list) -> None:
    world = World(**FAST)
    rig = world.connect_rig(agent) if agent else world.connect_rig("")
    world.kill(0)
    world.advance(0.2)
    assert rig.reconnects()[0]["params"] == params


def test_reconnect_params_without_a_local_address_are_empty() -> None:
    assert reconnect_params("cpuminer/2.5.1", None) == []
    assert reconnect_params("cpuminer/2.5.1", ("::1", 3333)) == ["::1", 3333]
    assert reconnect_params(None, ("10.0.0.1", 3333)) == []


def test_no_upstream_usable_releases_rigs_after_the_grace_not_before() -> None:
    world = World(**FAST)
    rig = world.connect_rig()
    world.kill(0)
    world.kill(1)
    world.advance(FAST["no_upstream_grace"] - 0.1)
    assert rig.closed is None
    world.advance(0.2)
    assert rig.closed is not None and rig.closed.startswith("released: no upstream usable")
    stats = world.core.policy.statistics(world.now)
    assert stats.outages == 1 and stats.released == 1
    assert "outage" in world.kinds() and "release" in world.kinds()
    late = world.connect_rig()  # during the outage: released at once, with the reason
    assert late.closed is not None and "no upstream" in late.closed
    assert world.answer(late, 1)["error"] is not None


def test_keep_policy_holds_rigs_until_a_pool_is_back() -> None:
    world = World(no_upstream=NoUpstreamPolicy.KEEP, **FAST)
    rig = world.connect_rig("bmminer/2.0.0", xnsub=True)
    world.kill(0)
    world.kill(1)
    world.advance(2.0)
    assert rig.closed is None and world.core.policy.statistics(world.now).released == 0
    world.restore(1)
    world.advance(0.3)
    assert world.upstream_of(rig) == 1 and working(world, rig, 1) and rig.closed is None


def test_rigs_are_placed_again_after_an_outage_and_its_recovery() -> None:
    # The scale run saw rigs wait for placement forever after "no upstream usable" and a
    # recovery within the grace: every rig here, whenever it came, ends up working.
    world = World(1, **{**FAST, "no_upstream_grace": 5.0})
    early = world.connect_rig("bmminer/2.0.0", xnsub=True, user="alice.early")
    world.pools[0].silent = True
    world.advance(2.5)
    assert world.core.policy.down_reason(0).startswith("silent") and "outage" in world.kinds()
    during = world.connect_rig(user="alice.during")  # nothing usable: released at once
    assert during.closed is not None and "no upstream" in during.closed
    world.pools[0].silent = False  # the pool answers again before the grace is over
    world.advance(0.5)
    assert world.core.policy.down_reason(0) is None and early.closed is None
    assert working(world, early, 0)
    after = world.connect_rig(user="alice.after")
    assert after.closed is None and working(world, after, 0)
    again = world.connect_rig(user="alice.during")  # the released one comes back
    assert again.closed is None and working(world, again, 0)


def test_a_rig_whose_session_opens_after_the_outage_began_is_placed_when_it_ends() -> None:
    # The rig's first session is still opening when the only upstream is declared down
    # and comes back: the session lands, the rig mines; nothing waits forever.
    world = World(1, **{**FAST, "no_upstream_grace": 5.0})
    rig_id = 7
    world.rigs[rig_id] = rig = type(world.connect_rig())(rig_id, "cgminer/4.12.0", False)
    world.feed(RigConnected(rig_id, "10.0.0.7:4000", None))
    world.feed(RigData(rig_id, b'{"id":1,"method":"mining.subscribe","params":["cgminer/4.12.0"]}\n'))
    [opening] = world.pending_opens
    world.pending_opens.clear()
    world.pools[0].silent = True
    world.advance(2.5)
    assert world.core.policy.down_reason(0).startswith("silent")
    world.pools[0].silent = False
    world.advance(0.5)
    world.pending_opens.append(opening)
    world.settle()
    world.rig_says(rig, {"id": 2, "method": "mining.authorize", "params": ["alice.late", "x"]})
    assert rig.closed is None and rig.jobs() and working(world, rig, 0)


def test_a_primary_refusing_at_start_is_skipped_without_the_rig_noticing() -> None:
    world = World(start_probes=False, **FAST)
    world.pools[0].up = False
    world.open_probe(1)
    rig = world.connect_rig()  # presumed usable, refused, placed on the backup at once
    world.advance(0.2)
    assert rig.closed is None and world.upstream_of(rig) == 1 and working(world, rig, 1)
    assert world.core.policy.statistics(world.now).detections == {"connect failed": 1}


def test_a_rig_that_says_nothing_is_closed_after_the_opening_timeout() -> None:
    core = ProxyCore([ProxyUpstream("u0", "stratum+tcp://pool:3333")], ProxySettings(opening_timeout=10.0))
    assert core.handle(RigConnected(1, "10.0.0.1:4000"), 0.0) == []
    core.handle(Timer(), 0.0)  # the policy's first look
    assert core.get_timer() == 10.0
    assert core.handle(Timer(), 9.9) == []
    commands = core.handle(Timer(), 10.0)
    assert CloseRig(1, "idle: no Stratum request within 10 s") in commands
    assert core.channel(1) is None


def test_a_non_stratum_client_is_closed_with_its_reason() -> None:
    core = ProxyCore([ProxyUpstream("u0", "stratum+tcp://pool:3333")])
    core.handle(RigConnected(1, "10.0.0.1:4000"), 0.0)
    [close] = [c for c in core.handle(RigData(1, b"GET / HTTP/1.1\r\n\r\n"), 0.1) if isinstance(c, CloseRig)]
    assert close.reason.startswith("not a Stratum client")


def test_a_session_that_opens_for_a_rig_already_gone_is_closed() -> None:
    core = ProxyCore([ProxyUpstream("u0", "stratum+tcp://pool:3333")])
    core.handle(RigConnected(1, "10.0.0.1:4000"), 0.0)
    [open_leg] = [
        c for c in core.handle(RigData(1, b'{"id":1,"method":"mining.subscribe","params":[]}\n'), 0.1) if isinstance(c, OpenLeg)
    ]
    closed = core.handle(RigData(1, b"\xff" * 10 + b"\n"), 0.2)
    assert any(isinstance(c, CloseRig) for c in closed)
    commands = core.handle(LegOpened(1, open_leg.leg, ClientSession()), 0.3)
    assert [type(c).__name__ for c in commands] == ["CloseLeg"]


def test_timers_of_many_rigs_share_one_deadline_heap() -> None:
    core = ProxyCore([ProxyUpstream("u0", "stratum+tcp://pool:3333")], ProxySettings(opening_timeout=5.0))
    for rig in range(1, 1001):
        core.handle(RigConnected(rig, f"10.0.{rig // 256}.{rig % 256}:4000"), rig * 0.001)
    assert len(core._timers) == 1000
    closed = [c for c in core.handle(Timer(), 5.5) if isinstance(c, CloseRig)]
    assert len(closed) == 500 and core.get_timer() == pytest.approx(5.501)
    writes = [c for c in core.handle(Timer(), 7.0) if isinstance(c, WriteRig)]
    assert writes == [] and len(core.rig_ids()) == 0


def test_weighted_strategy_splits_rigs_by_weight() -> None:
    from bridge.relay.failover import Strategy
    from bridge.relay.proxy import ProxyUpstream as U

    world = World(strategy=Strategy.WEIGHTED, **FAST)
    world.core = ProxyCore(
        [U("u0", "stratum+tcp://pool0:3333", 0, 3.0), U("u1", "stratum+tcp://pool1:3333", 0, 1.0)],
        ProxySettings(failover=world.core.settings.failover),
    )
    world.probes.clear()
    world.open_probe(0)
    world.open_probe(1)
    rigs = [world.connect_rig("cpuminer/2.5.1", user=f"alice.w{i}") for i in range(8)]
    assert sorted(world.upstream_of(r) for r in rigs) == [0] * 6 + [1] * 2
    assert [u.rigs for u in world.core.policy.statistics(world.now).upstreams] == [6, 2]


def test_the_sidecar_saying_its_pool_is_down_moves_rigs_and_back() -> None:
    from bridge.relay.proxy import PoolStatus

    world = World(stratumrm=(0,), **FAST)
    rig = world.connect_rig("bmminer/2.0.0", xnsub=True)
    world.feed(PoolStatus(0, False, "connection refused"))
    world.settle()
    assert world.core.policy.down_reason(0).startswith("pool down: connection refused (rm.pool from the sidecar)")
    assert world.upstream_of(rig) == 1 and rig.closed is None
    world.feed(PoolStatus(0, False, "connection refused"))  # said again: nothing new
    world.feed(PoolStatus(0, True, ""))
    world.advance(FAST["hold_down"] + 0.2)
    assert world.upstream_of(rig) == 0 and working(world, rig, 0)
    assert world.core.policy.statistics(world.now).detections == {"pool down": 1}


def test_a_draining_sidecar_moves_each_rig_to_a_fresh_session_on_the_same_upstream() -> None:
    from bridge.relay.proxy import MoveToNewLink

    world = World(stratumrm=(0,), **FAST)
    xnsub = world.connect_rig("bmminer/2.0.0", xnsub=True)
    cgminer = world.connect_rig("cgminer/4.12.0", user="alice.cg")
    before = world.core.current_leg(xnsub.id)
    assert world.core.movable(xnsub.id) and world.core.movable(cgminer.id)
    world.feed(MoveToNewLink(xnsub.id, 0))
    world.feed(MoveToNewLink(cgminer.id, 0))
    world.settle()
    assert world.core.current_leg(xnsub.id) != before and world.upstream_of(xnsub) == 0
    assert xnsub.closed is None and not xnsub.reconnects() and working(world, xnsub, 0)
    assert cgminer.reconnects() and not world.core.movable(cgminer.id)  # leaving: not moved twice


def test_a_rig_in_its_handshake_is_not_movable() -> None:
    world = World(**FAST)
    world.pools[0].silent = True
    rig = world.connect_rig()
    assert not world.core.movable(rig.id) and not world.core.movable(999)


def test_a_share_without_a_verdict_is_answered_at_the_submit_timeout() -> None:
    world = World(**FAST)
    world.core.settings = world.core.settings  # the default submit timeout, 60 s
    rig = world.connect_rig("bmminer/2.0.0", xnsub=True)
    world.pools[0].silent = True
    request = world.submit(rig)
    world.pools[0].silent = False  # the pool is alive (keepalives answered), it just lost the share
    world.advance(59.0, step=1.0)
    assert world.answer(rig, request) is None
    world.advance(1.5, step=0.5)
    answer = world.answer(rig, request)
    assert answer is not None and answer["result"] is False and "no verdict within 60 s" in answer["error"][1]


def test_an_authorize_refused_upstream_is_logged_with_what_to_do() -> None:
    world = World(**FAST)
    world.pools[0].answers = lambda request, extranonce1, answers=world.pools[0].answers: (
        [{"id": request["id"], "result": False, "error": [24, "certificate does not cover account bob", None]}]
        if request.get("method") == "mining.authorize" and request["params"][0] == "bob.rig"
        else answers(request, extranonce1)
    )
    world.connect_rig(user="bob.rig")
    [line] = [entry for entry in world.logs if "refused worker" in entry.message]
    assert line.level == "warning" and "stratumrm pki issue-miner" in line.message


def test_the_probe_answers_pings_and_ends_on_client_reconnect() -> None:
    from bridge.relay.proxy import ProbeEvents

    world = World(1, **FAST)
    session, _ = world.probes[0]
    world.feed(ProbeEvents(0, session.receive_data(b'{"id":7,"method":"mining.ping","params":[]}\n')))
    world.feed(ProbeEvents(0, session.receive_data(b'{"id":8,"method":"client.get_version","params":[]}\n')))
    answers = {m["id"]: m["result"] for m in lines_of(session.data_to_send())}
    assert answers[7] == "pong" and answers[8] == "stratumrm-probe"
    world.feed(ProbeEvents(0, session.receive_data(b'{"id":null,"method":"client.reconnect","params":[]}\n')))
    assert 0 not in world.probes  # the core closed it ...
    assert world.core.policy.down_reason(0) == "connection lost: the pool sent client.reconnect"  # ... as a loss
    assert not world.core.probe_open(0)


def test_the_probe_authorizes_once_per_connection_with_the_first_worker_name() -> None:
    from bridge.relay.proxy import ProbeIdentity

    world = World(1, start_probes=False, **FAST)
    world.feed(ProbeIdentity("ops.probe", None))
    world.open_probe(0)
    session, _ = world.probes[0]
    world.connect_rig(user="alice.rig")  # a rig's name does not replace --probe-user
    assert world.core.probe_identity() == ("ops.probe", None)
    world.feed(ProbeIdentity("other.name", None))
    assert session.data_to_send() == b""  # never a second authorize on a connection


def test_a_probe_whose_subscribe_is_refused_counts_as_a_failed_connection() -> None:
    world = World(1, start_probes=False, **FAST)
    world.pools[0].answers = lambda request, extranonce1: (
        [{"id": request["id"], "result": None, "error": [20, "banned", None]}]
        if request.get("method") == "mining.subscribe"
        else []
    )
    world.open_probe(0)
    assert world.core.policy.down_reason(0).startswith("connect failed: subscribe refused")


def lines_of(data: bytes) -> list[dict]:
    from tests.relay.proxy_harness import lines

    return lines(data)


def test_a_silent_upstream_speaking_on_a_rig_session_wakes_the_policy_at_once() -> None:
    from bridge.relay.proxy import LegEvents

    world = World(1, **{**FAST, "no_upstream_grace": 5.0})
    rig = world.connect_rig("bmminer/2.0.0", xnsub=True)
    world.pools[0].silent = True
    world.advance(2.5)
    assert world.core.policy.down_reason(0).startswith("silent")
    world.core.handle(Timer(), world.now)
    assert world.core.get_timer() > world.now  # waiting for the next keepalive
    (rig_id, leg), (_, session, _) = next(iter(world.legs.items()))
    world.feed(LegEvents(rig_id, leg, session.receive_data(b'{"id":null,"method":"mining.set_difficulty","params":[2]}\n')))
    assert world.core.get_timer() <= world.now  # not at the next keepalive
    world.feed(Timer())
    assert world.core.policy.down_reason(0) is None and "recovery" in world.kinds() and rig.closed is None
