"""Redundancy under loss (PROTOCOL.md §9.1), sans-IO with explicit time.

The loss estimate and its hysteresis on their own; the proxy core sending an identical
second copy of each share datagram once the path loses 1 % or more (and never at 0 %);
and the real proxy and sidecar cores over a seeded 2 %-loss link: a lone share then
reaches the pool late only when both copies are lost, and the sidecar drops the copies
as replays, before any decryption, costing no budget and no rekey.
"""

from __future__ import annotations

import msgspec
import pytest

from bridge.relay.rm_upstream import StratumRMConnection
from bridge.wire import delivery
from bridge.wire.datagram import Ack, AckRange, VerdictEntry, Verdicts
from bridge.wire.delivery import REDUNDANCY_MIN_SAMPLES, LossEstimate
from tests.relay.pair_harness import PairWorld
from tests.relay.test_rm_upstream_core import SUBMIT, FakeSidecar, channel_ready

SIDECAR = ("127.0.0.1", 3334)


# ------------------------------------------------------------------ the estimate


def test_the_estimate_turns_on_at_one_percent_and_off_under_a_quarter_percent() -> None:
    estimate = LossEstimate(window=256)
    estimate.delivered(150)
    estimate.lost()
    assert not estimate.redundant  # one loss is not a rate
    estimate.lost()
    assert estimate.redundant and estimate.rate == pytest.approx(2 / 152)
    estimate.delivered(150)  # 2 in 302: 0.66 %, between the thresholds: stays on
    assert estimate.redundant
    for _ in range(3):  # the window halves: 2 -> 1 -> 0.5 losses
        estimate.delivered(200)
    assert estimate.rate < delivery.REDUNDANCY_OFF and not estimate.redundant
    assert estimate.switches == 2


def test_a_late_datagram_counted_lost_is_given_back_and_few_samples_never_turn_it_on() -> None:
    estimate = LossEstimate()
    estimate.delivered(int(REDUNDANCY_MIN_SAMPLES) - 3)
    estimate.lost(2)
    assert not estimate.redundant  # 2 losses in 31 samples: too few to judge
    estimate.delivered()
    assert estimate.redundant
    estimate.found()
    estimate.found()
    assert estimate.losses == 0 and not estimate.redundant


# ------------------------------------------------------------------ the proxy core


def _lone_share(conn: StratumRMConnection, channel, sidecar: FakeSidecar, index: int, now: float) -> list[bytes]:
    channel.submit(msgspec.structs.replace(SUBMIT, nonce=f"{index:08x}"), context=index)
    return conn.datagrams_to_send(now)


def test_no_copy_at_zero_loss() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    for index in range(300):
        now = index * 0.1
        [datagram] = _lone_share(conn, channel, sidecar, index, now)
        pn = sidecar.open(datagram)[0].pn
        conn.receive_datagram(sidecar.keys.sealer.seal(Verdicts((VerdictEntry(pn, 0),))).data, SIDECAR, now + 0.02)
    stats = conn.statistics()
    assert stats.redundant_copies == 0 and stats.loss_percent == 0 and stats.datagrams_sent == 301  # + the probe


def test_share_datagrams_go_twice_once_the_timer_found_one_percent_lost() -> None:
    conn = StratumRMConnection(detect_blocks=False, initial_rto=0.1)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    now = 0.0
    # Three share datagrams of 40 never reach the sidecar; each share's datagram, its
    # ACK and its VERDICT are three samples: 2 lost in ~60 already make 3 %.
    lost = {10, 20, 30}
    for index in range(40):
        now = index * 0.5
        datagram = _lone_share(conn, channel, sidecar, index, now)[0]
        answered = now + 0.02
        if index in lost:
            assert conn.delivery.loss.redundant == (index > 20)  # on from the second loss
            conn.handle_timer(now + 0.4)  # no answer: lost; sent again
            datagram = conn.datagrams_to_send(now + 0.4)[0]
            answered = now + 0.42
        pn = sidecar.open(datagram)[0].pn
        conn.receive_datagram(sidecar.keys.sealer.seal(Ack(ranges=(AckRange(pn, pn),))).data, SIDECAR, answered)
        conn.receive_datagram(sidecar.keys.sealer.seal(Verdicts((VerdictEntry(pn, 0),))).data, SIDECAR, answered + 0.001)
    assert conn.statistics().retransmissions_udp == 3
    assert conn.delivery.loss.redundant
    copies = conn.statistics().redundant_copies
    first, second = _lone_share(conn, channel, sidecar, 100, now + 0.5)
    assert first == second  # identical: the sidecar's replay window drops whichever comes second
    assert conn.statistics().redundant_copies == copies + 1


def test_gaps_in_the_sidecars_packet_numbers_count_as_loss_and_late_ones_are_given_back() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    sealer = sidecar.keys.sealer
    for index in range(60):
        datagram = _lone_share(conn, channel, sidecar, index, index * 0.1)[0]
        pn = sidecar.open(datagram)[0].pn
        verdict = sealer.seal(Verdicts((VerdictEntry(pn, 0),)))
        if index in (30, 31):
            held = verdict  # this VERDICT is late: the next one arrives first
            continue
        conn.receive_datagram(verdict.data, SIDECAR, index * 0.1 + 0.02)
    assert conn.delivery.loss.redundant  # two sidecar datagrams missing in ~120 samples
    conn.receive_datagram(held.data, SIDECAR, 6.5)
    assert conn.delivery.loss.losses == 1  # one of the two arrived after all
    assert len(_lone_share(conn, channel, sidecar, 99, 6.6)) == 2


# ------------------------------------------------------------------ proxy and sidecar over a lossy link


def _lone_shares_over_loss(seed: int, count: int) -> tuple[list[float], PairWorld]:
    """``count`` lone shares (0.25 s apart) over a 2 % loss, 10 ms link; submit -> pool receipt of each."""
    world = PairWorld(seed=seed, loss=0.02, delay=0.010)
    rig = world.add_rig("alice.rig1")
    world.run_until(5.0, lambda: world.proxy.udp_up and rig.job is not None and rig.extranonce2_size > 0)
    sent: dict[tuple[str, str], float] = {}
    received: dict[tuple[str, str], float] = {}
    judge = world.pool.submit

    def timed_submit(connection, submit, now):  # the pool core's entry for each mining.submit
        received.setdefault((str(submit.params.extranonce2), str(submit.params.nonce)), world.now)
        return judge(connection, submit, now)

    world.pool.submit = timed_submit  # type: ignore[method-assign]

    def submit(serial: int) -> None:
        assert rig.submit(serial, world.target)
        share = rig.submitted[serial]
        sent[(str(share.extranonce2), str(share.nonce))] = world.now

    start = world.now
    for serial in range(count):
        world.at(start + 0.25 * (serial + 1), lambda serial=serial: submit(serial))
    world.run_until(start + 0.25 * count + 30.0, lambda: len(rig.verdicts) == count)
    assert len(rig.verdicts) == count and len(world.pool.accepted) == count == len(received)
    return [received[key] - at for key, at in sent.items()], world


@pytest.mark.parametrize("seed", [1, 2])
def test_lone_shares_at_two_percent_loss_wait_for_a_retransmission_only_when_both_copies_are_lost(seed: int) -> None:
    latencies, world = _lone_shares_over_loss(seed, 400)
    # Past the estimate's warm-up, a share is late (a retransmission: at least 20 ms
    # more than the 10 ms way) only when both copies were lost: 0.04 % of them.
    late = [t for t in latencies[100:] if t > 0.015]
    assert len(late) <= 1, late
    stats = world.proxy.statistics()
    assert stats.redundant_copies >= 290 and 1.0 <= stats.loss_percent <= 4.0
    assert world.up.dropped >= 8  # the link did drop copies; redundancy absorbed them
    # The sidecar dropped the second copies as replays, before the budget and the AEAD.
    drops = world.sidecar.statistics().datagram_drops
    assert drops.get("replayed", 0) >= 250 and "bad tag" not in drops and "rate limited" not in drops
    # Every share settled: no datagram is remembered as copied or lost any more.
    assert not world.proxy.delivery._copied and not world.proxy.delivery._declared_lost


def test_without_redundancy_the_same_link_makes_shares_late(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "REDUNDANCY_ON", 2.0)  # never
    latencies, world = _lone_shares_over_loss(1, 400)
    assert world.proxy.statistics().redundant_copies == 0
    assert len([t for t in latencies[100:] if t > 0.015]) >= 3
