"""The receive pipeline: every drop reason, in the documented order, and what is accepted."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.wire.datagram import (
    MAX_DATAGRAM_SIZE,
    MIN_BODY_SIZE,
    Ack,
    AckRange,
    DatagramType,
    DropReason,
    Probe,
    ProbeAck,
    Share,
    ShareBatch,
    VerdictEntry,
    Verdicts,
    pack_header,
)
from bridge.wire.keys import KeyMaterial, KeySet, Role, Sealer
from bridge.wire.receiver import Accepted, DatagramReceiver, Dropped

SECRET = bytes(range(100, 132))
CONN_ID = 0x5EC0_0000_0000_0001
RIG = ("192.0.2.7", 40000)
SHARE = Share(
    channel_id=2,
    job_handle=17,
    extranonce2=bytes.fromhex("0000002a"),
    ntime=0x6554A2C1,
    nonce=0xB2957C02,
    version_bits=0x00C00000,
)


class Pair:
    """A proxy's and a sidecar's halves of one session, with the sidecar's receiver."""

    def __init__(self, epoch: int = 0, conn_id: int = CONN_ID, **receiver_options: float) -> None:
        material = KeyMaterial(conn_id, epoch, SECRET)
        self.proxy = KeySet.derive(material, Role.PROXY)
        self.sidecar = KeySet.derive(material, Role.SIDECAR)
        self.receiver = DatagramReceiver(Role.SIDECAR, **receiver_options)
        self.receiver.add_session("rig", self.sidecar.opener)
        self.proxy_receiver = DatagramReceiver(Role.PROXY, **receiver_options)
        self.proxy_receiver.add_session("sidecar", self.proxy.opener)

    def share(self, *, urgent: bool = False) -> bytes:
        return self.proxy.sealer.seal(SHARE, urgent=urgent).data

    def dropped(self, data: bytes, now: float = 0.0) -> DropReason:
        result = self.receiver.receive(data, RIG, now)
        assert isinstance(result, Dropped), result
        return result.reason

    def accepted(self, data: bytes, now: float = 0.0, address: tuple[str, int] = RIG) -> Accepted:
        result = self.receiver.receive(data, address, now)
        assert isinstance(result, Accepted), result
        return result


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    "body",
    [
        SHARE,
        ShareBatch(shares=(SHARE, SHARE, msgspec.structs.replace(SHARE, version_bits=None))),
        Probe(probe_id=99, padding=20),
        ProbeAck(probe_id=99),
    ],
)
def test_proxy_to_sidecar_round_trip(body: object) -> None:
    pair = Pair()
    sealed = pair.proxy.sealer.seal(body)  # type: ignore[arg-type]
    got = pair.accepted(sealed.data)
    assert got.body == body
    assert got.session == "rig"
    assert got.header.pn == sealed.pn and got.header.conn_id == CONN_ID
    assert got.size == len(sealed.data) and got.epoch == 0


@pytest.mark.parametrize(
    "body",
    [
        Ack(ranges=(AckRange(high=10, low=4), AckRange(high=2, low=0)), ack_delay_us=250),
        Probe(probe_id=1),
        ProbeAck(probe_id=1, padding=3),
    ],
)
def test_sidecar_to_proxy_round_trip(body: object) -> None:
    pair = Pair()
    data = pair.sidecar.sealer.seal(body).data  # type: ignore[arg-type]
    got = pair.proxy_receiver.receive(data, ("198.51.100.1", 3334), 0.0)
    assert isinstance(got, Accepted) and got.body == body


def test_urgent_share_keeps_its_flag() -> None:
    pair = Pair()
    assert pair.accepted(pair.share(urgent=True)).header.urgent


def test_each_role_refuses_the_other_roles_types() -> None:
    pair = Pair()
    ack = pair.sidecar.sealer.seal(Ack(ranges=(AckRange(0, 0),))).data
    assert pair.dropped(ack) is DropReason.UNEXPECTED_TYPE
    share_to_proxy = pair.proxy_receiver.receive(pair.share(), RIG, 0.0)
    assert isinstance(share_to_proxy, Dropped) and share_to_proxy.reason is DropReason.UNEXPECTED_TYPE


# ------------------------------------------------------------------ forgery


def expected_reason_for_flipped_bit(bit: int) -> DropReason:
    """What flipping header bit ``bit`` (0 = MSB of byte 0) of a SHARE datagram must cause."""
    if bit < 4:
        return DropReason.BAD_VERSION
    if bit < 8:  # type 1 -> 9, 5 (ACK: not for a sidecar), 3 (PROBE: passes), 0
        return {
            4: DropReason.UNKNOWN_TYPE,
            5: DropReason.UNEXPECTED_TYPE,
            6: DropReason.BAD_TAG,
            7: DropReason.UNKNOWN_TYPE,
        }[bit]
    if bit < 14:
        return DropReason.BAD_FLAGS  # reserved flag bits
    if bit == 14:
        return DropReason.BAD_TAG  # URGENT is a valid flag on a share: only the tag catches it
    if bit == 15:
        return DropReason.WRONG_KEY_PHASE
    if bit < 80:
        return DropReason.UNKNOWN_CONN_ID
    return DropReason.BAD_TAG  # packet number: any pn is fresh, so only the tag catches it


def test_every_flipped_bit_is_dropped_and_the_header_is_authenticated() -> None:
    pair = Pair(stranger_rate=1e6, stranger_burst=1e6)  # every forgery reaches the AEAD
    original = pair.share()
    reasons = []
    for bit in range(len(original) * 8):
        reason = pair.dropped(flip(original, bit))
        reasons.append(reason)
        if bit >= 16 * 8:
            assert reason is DropReason.BAD_TAG, bit  # ciphertext and tag
        else:
            assert reason is expected_reason_for_flipped_bit(bit), bit
    # 48 pn bits + URGENT + type->PROBE reached the AEAD and failed there: the header is AAD.
    assert sum(1 for bit, r in enumerate(reasons) if bit < 128 and r is DropReason.BAD_TAG) == 50
    stats = pair.receiver.statistics()
    assert stats.accepted == 0 and stats.dropped_total == len(original) * 8
    assert pair.receiver.session_statistics("rig").bad_tags == stats.dropped["bad tag"]
    # None of the forgeries moved the window or taught an address: the original still passes.
    assert pair.receiver.address_of("rig") is None
    assert pair.accepted(original).header.pn == 0


def test_header_pn_rewritten_within_window_fails_the_tag() -> None:
    pair = Pair()
    first, second = pair.share(), pair.share()
    forged = second[:10] + first[10:16] + second[16:]  # pn 0 header on pn 1 ciphertext
    assert pair.dropped(forged) is DropReason.BAD_TAG
    assert pair.accepted(first).header.pn == 0
    assert pair.accepted(second).header.pn == 1


@pytest.mark.parametrize(
    "body",
    [SHARE, ShareBatch(shares=(SHARE, SHARE)), Probe(probe_id=5), ProbeAck(probe_id=5)],
)
def test_every_truncation_is_dropped(body: object) -> None:
    pair = Pair()
    data = pair.proxy.sealer.seal(body).data  # type: ignore[arg-type]
    dtype = data[0] & 0x0F
    smallest = 32 + MIN_BODY_SIZE[dtype]
    for length in range(len(data)):
        reason = pair.dropped(data[:length])
        if length < smallest:
            assert reason is DropReason.TRUNCATED, length
        else:  # long enough to be some datagram of this type: only the tag can tell
            assert reason is DropReason.BAD_TAG, length
    assert pair.accepted(data).body == body


def test_truncated_below_header_and_tag() -> None:
    pair = Pair()
    for length in range(32):
        assert pair.dropped(bytes(length)) is DropReason.TRUNCATED


def test_oversized() -> None:
    pair = Pair()
    assert pair.dropped(b"\x21" + bytes(MAX_DATAGRAM_SIZE)) is DropReason.OVERSIZED


@pytest.mark.parametrize(
    ("first_byte", "flags", "reason"),
    [
        (0x01, 0, DropReason.BAD_VERSION),
        (0x11, 0, DropReason.BAD_VERSION),  # version 1 datagrams are gone
        (0x31, 0, DropReason.BAD_VERSION),
        (0xF1, 0, DropReason.BAD_VERSION),
        (0x20, 0, DropReason.UNKNOWN_TYPE),
        (0x27, 0, DropReason.UNKNOWN_TYPE),
        (0x2F, 0, DropReason.UNKNOWN_TYPE),
        (0x25, 0, DropReason.UNEXPECTED_TYPE),
        (0x26, 0, DropReason.UNEXPECTED_TYPE),
        (0x21, 0x04, DropReason.BAD_FLAGS),
        (0x21, 0x80, DropReason.BAD_FLAGS),
        (0x23, 0x02, DropReason.BAD_FLAGS),  # URGENT on a probe
    ],
)
def test_header_checks(first_byte: int, flags: int, reason: DropReason) -> None:
    pair = Pair()
    data = bytes([first_byte, flags]) + CONN_ID.to_bytes(8, "big") + bytes(6) + bytes(64)
    assert pair.dropped(data) is reason


def test_unknown_conn_id() -> None:
    pair = Pair()
    stranger = KeySet.derive(KeyMaterial(CONN_ID + 1, 0, SECRET), Role.PROXY)
    assert pair.dropped(stranger.sealer.seal(SHARE).data) is DropReason.UNKNOWN_CONN_ID
    result = pair.receiver.receive(stranger.sealer.seal(SHARE).data, RIG, 0.0)
    assert isinstance(result, Dropped) and result.session is None


def test_forged_datagram_under_the_right_conn_id_but_wrong_key() -> None:
    pair = Pair()
    forger = Sealer(conn_id=CONN_ID, epoch=0, key=bytes(32))
    assert pair.dropped(forger.seal(SHARE).data) is DropReason.BAD_TAG


# ------------------------------------------------------------------ replay


def test_replayed_packet_is_dropped_after_the_first_copy() -> None:
    pair = Pair()
    data = pair.share()
    pair.accepted(data)
    assert pair.dropped(data) is DropReason.REPLAYED
    assert pair.dropped(data) is DropReason.REPLAYED
    assert pair.receiver.statistics().dropped["replayed"] == 2


def test_packet_too_old_for_the_window() -> None:
    pair = Pair()
    old = pair.share()
    for _ in range(1023):
        pair.share()
    newest = pair.share()  # pn 1024
    pair.accepted(newest)
    assert pair.dropped(old) is DropReason.TOO_OLD


def test_reordered_within_window_is_accepted() -> None:
    pair = Pair()
    datagrams = [pair.share() for _ in range(50)]
    order = [49, 0, 10, 48, 1, 47, *range(2, 10), *range(11, 47)]
    assert sorted(order) == list(range(50))
    for index in order:
        assert pair.accepted(datagrams[index]).header.pn == index
    for data in datagrams:
        assert pair.dropped(data) is DropReason.REPLAYED


def test_failed_tag_does_not_burn_the_packet_number() -> None:
    pair = Pair()
    data = pair.share()
    assert pair.dropped(flip(data, 200)) is DropReason.BAD_TAG
    pair.accepted(data)


def test_malformed_authenticated_body_is_dropped_and_consumes_its_pn() -> None:
    pair = Pair()
    data = pair.proxy.sealer.seal_plaintext(DatagramType.SHARE, bytes([0x0F]) + bytes(20)).data
    assert pair.dropped(data) is DropReason.MALFORMED
    assert pair.dropped(data) is DropReason.REPLAYED


# ------------------------------------------------------------------ rekey


def test_old_key_accepted_during_grace_and_refused_after() -> None:
    pair = Pair(grace=2.0)
    old_sealer = pair.proxy.sealer
    late = [old_sealer.seal(SHARE).data for _ in range(3)]
    new_material = KeyMaterial(CONN_ID + 100, 1, bytes(32))
    new_proxy = KeySet.derive(new_material, Role.PROXY)
    pair.receiver.rekey("rig", KeySet.derive(new_material, Role.SIDECAR).opener, now=10.0)

    assert pair.accepted(new_proxy.sealer.seal(SHARE).data, now=10.1).epoch == 1
    assert pair.accepted(late[0], now=10.5).epoch == 0
    assert pair.accepted(late[1], now=11.99).epoch == 0
    assert pair.dropped(late[2], now=12.0) is DropReason.KEY_EXPIRED
    assert pair.dropped(old_sealer.seal(SHARE).data, now=12.1) is DropReason.UNKNOWN_CONN_ID
    assert pair.accepted(new_proxy.sealer.seal(SHARE).data, now=100.0).epoch == 1
    assert pair.receiver.session_statistics("rig").epoch == 1


def test_key_phase_must_match_the_epoch() -> None:
    pair = Pair(epoch=1)
    wrong_phase = Sealer(conn_id=CONN_ID, epoch=0, key=bytes(32)).seal(SHARE).data
    assert pair.dropped(wrong_phase) is DropReason.WRONG_KEY_PHASE
    assert pair.accepted(pair.share()).header.key_phase == 1


def test_second_rekey_forgets_the_oldest_epoch_at_once() -> None:
    pair = Pair()
    epoch0 = pair.share()
    m1, m2 = KeyMaterial(CONN_ID + 1, 1, SECRET), KeyMaterial(CONN_ID + 2, 2, SECRET)
    pair.receiver.rekey("rig", KeySet.derive(m1, Role.SIDECAR).opener, now=0.0)
    pair.receiver.rekey("rig", KeySet.derive(m2, Role.SIDECAR).opener, now=0.5)
    assert pair.dropped(epoch0, now=0.6) is DropReason.UNKNOWN_CONN_ID
    assert pair.accepted(KeySet.derive(m1, Role.PROXY).sealer.seal(SHARE).data, now=0.6).epoch == 1


def test_purge_and_next_deadline() -> None:
    pair = Pair(grace=1.0)
    assert pair.receiver.next_deadline() is None
    epoch0 = pair.share()
    pair.receiver.rekey("rig", KeySet.derive(KeyMaterial(7, 1, SECRET), Role.SIDECAR).opener, now=5.0)
    assert pair.receiver.next_deadline() == 6.0
    pair.receiver.purge(5.5)
    assert pair.receiver.next_deadline() == 6.0
    pair.receiver.purge(6.0)
    assert pair.receiver.next_deadline() is None
    assert pair.dropped(epoch0, now=5.5) is DropReason.UNKNOWN_CONN_ID  # gone, whatever now says


def test_rekey_refuses_reused_conn_id_and_old_epoch() -> None:
    pair = Pair(epoch=3)
    with pytest.raises(ValueError):
        pair.receiver.rekey("rig", KeySet.derive(KeyMaterial(CONN_ID, 4, SECRET), Role.SIDECAR).opener, 0.0)
    with pytest.raises(ValueError):
        pair.receiver.rekey("rig", KeySet.derive(KeyMaterial(9, 3, SECRET), Role.SIDECAR).opener, 0.0)
    with pytest.raises(ValueError):
        pair.receiver.add_session("other", KeySet.derive(KeyMaterial(CONN_ID, 0, SECRET), Role.SIDECAR).opener)


def test_removed_session_is_unknown() -> None:
    pair = Pair()
    pair.receiver.remove_session("rig")
    assert pair.dropped(pair.share()) is DropReason.UNKNOWN_CONN_ID
    assert pair.receiver.statistics().sessions == 0
    pair.receiver.remove_session("rig")  # idempotent


# ------------------------------------------------------------------ rate limit


def test_rate_limit_drops_are_counted_and_tokens_refill_with_now() -> None:
    pair = Pair(rate=10.0, burst=5.0, stranger_rate=1.0, stranger_burst=1.0)
    pair.accepted(pair.share())  # the strangers' one token; RIG is trusted from now on
    forged = [pair.receiver.receive(flip(pair.share(), 300), RIG, 0.0) for _ in range(8)]
    assert [r.reason for r in forged if isinstance(r, Dropped)] == [DropReason.BAD_TAG] * 5 + [DropReason.RATE_LIMITED] * 3
    assert pair.dropped(pair.share(), now=0.05) is DropReason.RATE_LIMITED  # half a token
    pair.accepted(pair.share(), now=0.1)
    stats = pair.receiver.statistics()
    assert stats.dropped["rate limited"] == 4 and stats.dropped["bad tag"] == 5 and stats.accepted == 2
    assert pair.receiver.session_statistics("rig").rate_limited == 4


def test_rate_limited_datagram_can_still_arrive_later() -> None:
    """The window is untouched by a rate-limit drop, so a resend of the same bytes passes."""
    pair = Pair(rate=1.0, burst=1.0, stranger_rate=1.0, stranger_burst=1.0)
    pair.accepted(pair.share())  # the strangers' token; RIG is trusted from now on
    first, second = pair.share(), pair.share()
    pair.accepted(first)  # authenticated: its token comes back
    assert pair.dropped(flip(pair.share(), 300)) is DropReason.BAD_TAG  # a forgery from RIG takes it
    assert pair.dropped(second) is DropReason.RATE_LIMITED
    pair.accepted(second, now=1.0)


def test_authenticated_datagrams_give_their_token_back() -> None:
    """The budget meters failed decryptions: the peer's own datagrams pass at any rate (§6.1)."""
    pair = Pair(rate=1.0, burst=2.0, stranger_rate=1.0, stranger_burst=1.0)
    for _ in range(100):  # 100 datagrams at one instant, 50 times the burst
        pair.accepted(pair.share())
    assert pair.dropped(flip(pair.share(), 300)) is DropReason.BAD_TAG
    assert pair.dropped(flip(pair.share(), 300)) is DropReason.BAD_TAG  # the bucket never grew past its burst
    assert pair.dropped(flip(pair.share(), 300)) is DropReason.RATE_LIMITED
    replayed = pair.share()
    pair.accepted(replayed, now=1.0)
    for _ in range(3):  # a replay is refused before the budget: it neither takes nor refunds
        assert pair.dropped(replayed, now=1.0) is DropReason.REPLAYED
    assert pair.dropped(flip(pair.share(), 300), now=1.0) is DropReason.BAD_TAG
    assert pair.dropped(flip(pair.share(), 300), now=1.0) is DropReason.RATE_LIMITED


def test_an_honest_5000_per_second_session_loses_nothing_to_the_budget_and_a_flood_stays_capped() -> None:
    """Default budgets (1000/s per trusted address): one second of 5,000 share datagrams
    from the proxy's address and 5,000 VERDICTs back, interleaved with 5,000 forgeries
    under the live conn_id from 5,000 other addresses. Before the refund, everything past
    the burst of 1000 plus 1000/s was dropped as ``rate limited``."""
    pair = Pair()
    sidecar_address = ("198.51.100.1", 3334)
    verdicts = [pair.sidecar.sealer.seal(Verdicts((VerdictEntry(pn=index),))).data for index in range(5000)]
    for index in range(5000):
        now = index / 5000
        pair.accepted(pair.share(), now=now)
        got = pair.proxy_receiver.receive(verdicts[index], sidecar_address, now)
        assert isinstance(got, Accepted), got
        pair.receiver.receive(flip(pair.share(), 300), ("203.0.113.66", 1000 + index), now)
    assert pair.receiver.statistics().accepted == 5000 and pair.proxy_receiver.statistics().accepted == 5000
    session = pair.receiver.session_statistics("rig")
    # The flood cost at most the strangers' burst plus one second of their rate (64 + 64)
    # decryptions; the rest was dropped before the AEAD.
    assert session.bad_tags <= 64 + 64
    assert session.rate_limited == 5000 - session.bad_tags
    assert session.trusted_addresses == 1


def test_forgeries_from_the_trusted_address_still_cost_at_most_its_rate() -> None:
    """A forger spoofing the proxy's own address: the refunds of the honest datagrams
    interleaved with it do not let it past the bucket's burst plus rate."""
    pair = Pair(rate=100.0, burst=100.0, stranger_rate=1.0, stranger_burst=1.0)
    for index in range(10_000):  # 10 s at 1000 forgeries/s, one honest datagram in ten
        now = index / 1000
        pair.receiver.receive(flip(pair.share(), 300), RIG, now)
        if index % 10 == 0:
            pair.receiver.receive(pair.share(), RIG, now)
    session = pair.receiver.session_statistics("rig")
    assert session.bad_tags <= 100 + 100 * 10 + 1
    assert session.bad_tags + session.rate_limited == 10_000 + 1000 - session.accepted


def test_each_trusted_address_has_its_own_budget_and_strangers_share_one() -> None:
    pair = Pair(rate=3.0, burst=3.0, stranger_rate=2.0, stranger_burst=2.0)
    forger = ("203.0.113.66", 9999)
    pair.accepted(pair.share())  # RIG: one stranger token (given back), then trusted
    assert pair.receiver.session_statistics("rig").trusted_addresses == 1
    for _ in range(50):  # forged tags from elsewhere: the strangers' two tokens, then rate limited
        pair.receiver.receive(flip(pair.share(), 300), forger, 0.0)
    stats = pair.receiver.statistics()
    assert stats.dropped["bad tag"] == 2 and stats.dropped["rate limited"] == 48
    for _ in range(10):  # the proxy's own budget is untouched (and refunded by each)
        pair.accepted(pair.share())
    for _ in range(3):  # forgeries from the proxy's address use up its bucket only
        assert pair.dropped(flip(pair.share(), 300)) is DropReason.BAD_TAG
    assert pair.dropped(pair.share()) is DropReason.RATE_LIMITED


def test_trust_is_earned_only_by_the_newest_authenticated_datagram_and_is_bounded() -> None:
    pair = Pair(rate=100.0, burst=100.0, stranger_rate=100.0, stranger_burst=100.0, max_trusted=2)
    late = pair.share()
    pair.accepted(pair.share())
    pair.accepted(late, address=("192.0.2.99", 1))  # authenticated but late: no trust
    assert pair.receiver.session_statistics("rig").trusted_addresses == 1
    for port in (2, 3, 4):
        pair.accepted(pair.share(), address=("192.0.2.50", port))
    assert pair.receiver.session_statistics("rig").trusted_addresses == 2


# ------------------------------------------------------------------ addresses and amplification


def test_address_is_learned_only_from_authenticated_datagrams() -> None:
    pair = Pair()
    attacker = ("203.0.113.66", 9999)
    pair.receiver.receive(b"\x11" + bytes(60), attacker, 0.0)
    assert pair.receiver.address_of("rig") is None
    first = pair.accepted(pair.share())
    assert first.address_changed and pair.receiver.address_of("rig") == RIG
    forged = flip(pair.share(), 300)
    pair.receiver.receive(forged, attacker, 0.0)
    assert pair.receiver.address_of("rig") == RIG


def test_nat_rebinding_relearns_but_late_packets_from_the_old_path_do_not_move_it_back() -> None:
    pair = Pair()
    new_path = ("192.0.2.7", 50000)
    late = pair.share()  # pn 0, delayed on the old path
    pair.accepted(pair.share())  # pn 1 from RIG
    moved = pair.accepted(pair.share(), address=new_path)  # pn 2 from the rebinding NAT
    assert moved.address_changed and pair.receiver.address_of("rig") == new_path
    stale = pair.accepted(late, address=RIG)
    assert not stale.address_changed and pair.receiver.address_of("rig") == new_path
    assert pair.receiver.statistics().addresses_learned == 2


def test_grace_epoch_never_moves_the_address() -> None:
    pair = Pair()
    late_old_key = pair.share()
    pair.accepted(pair.share())
    material = KeyMaterial(CONN_ID + 1, 1, SECRET)
    pair.receiver.rekey("rig", KeySet.derive(material, Role.SIDECAR).opener, now=0.0)
    pair.accepted(KeySet.derive(material, Role.PROXY).sealer.seal(SHARE).data, now=0.1)
    got = pair.accepted(late_old_key, now=0.2, address=("203.0.113.1", 1))
    assert not got.address_changed and pair.receiver.address_of("rig") == RIG


def test_sidecar_never_sends_more_than_it_received() -> None:
    pair = Pair()
    assert pair.receiver.send_to("rig", 1) is None  # nothing authenticated yet: silence
    share = pair.share()
    pair.accepted(share)
    assert pair.receiver.send_to("rig", len(share) + 1) is None
    assert pair.receiver.send_to("rig", 40) == RIG
    assert pair.receiver.send_to("rig", len(share) - 40) == RIG
    assert pair.receiver.send_to("rig", 1) is None
    stats = pair.receiver.session_statistics("rig")
    assert stats.bytes_sent == len(share) and stats.send_allowance == 0
    # Unauthenticated bytes earn nothing.
    pair.receiver.receive(flip(pair.share(), 300), RIG, 0.0)
    assert pair.receiver.send_to("rig", 1) is None
    # A rebinding starts the budget afresh at the new address.
    second = pair.share()
    pair.accepted(second, address=("192.0.2.7", 50001))
    assert pair.receiver.session_statistics("rig").send_allowance == len(second)


def test_probe_ack_fits_the_budget_a_probe_earned() -> None:
    pair = Pair()
    probe = pair.proxy.sealer.seal(Probe(probe_id=1, padding=16)).data
    got = pair.accepted(probe)
    assert isinstance(got.body, Probe)
    answer = pair.sidecar.sealer.seal(ProbeAck(probe_id=got.body.probe_id, padding=got.body.padding)).data
    assert len(answer) == len(probe)
    assert pair.receiver.send_to("rig", len(answer)) == RIG


# ------------------------------------------------------------------ statistics and robustness


def test_statistics_are_frozen_snapshots() -> None:
    pair = Pair()
    before = pair.receiver.statistics()
    pair.accepted(pair.share())
    assert before.accepted == 0 and pair.receiver.statistics().accepted == 1
    with pytest.raises(AttributeError):
        before.accepted = 5  # type: ignore[misc]
    assert set(before.dropped) == {reason.value for reason in DropReason}


@given(st.binary(max_size=1300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    pair = Pair()
    assert isinstance(pair.receiver.receive(data, RIG, 0.0), Dropped)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 2**48 - 1), st.binary(max_size=200))
def test_arbitrary_bytes_behind_a_known_conn_id_never_raise(first: int, flags: int, pn: int, rest: bytes) -> None:
    pair = Pair()
    data = bytes([first, flags]) + CONN_ID.to_bytes(8, "big") + pn.to_bytes(6, "big") + rest
    for receiver in (pair.receiver, pair.proxy_receiver):
        assert isinstance(receiver.receive(data, RIG, 0.0), Dropped)


@given(st.sampled_from(list(DatagramType)), st.binary(max_size=300), st.booleans())
def test_arbitrary_authenticated_plaintext_never_raises(dtype: DatagramType, plaintext: bytes, urgent: bool) -> None:
    pair = Pair()
    urgent = urgent and dtype in (DatagramType.SHARE, DatagramType.SHARE_BATCH)
    data = pair.proxy.sealer.seal_plaintext(dtype, plaintext, urgent=urgent).data
    result = pair.receiver.receive(data, RIG, 0.0)
    assert isinstance(result, (Accepted, Dropped))
    if isinstance(result, Dropped):
        assert result.reason in {
            DropReason.MALFORMED,
            DropReason.TRUNCATED,
            DropReason.UNEXPECTED_TYPE,
        }


def test_header_helper_matches_sealer() -> None:
    pair = Pair()
    data = pair.share()
    assert data[:16] == pack_header(DatagramType.SHARE, 0, CONN_ID, 0)
