"""The datagram grammar: header and body encoding, decoding and validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.wire.datagram import (
    ACK_MAX_RANGES,
    BATCH_MAX_SHARES,
    MIN_BODY_SIZE,
    Ack,
    AckRange,
    DatagramDecodeError,
    DatagramEncodeError,
    DatagramType,
    DropReason,
    Header,
    Probe,
    ProbeAck,
    Share,
    ShareBatch,
    body_type,
    decode_body,
    encode_body,
    parse_header,
)

U32 = st.integers(0, 2**32 - 1)

shares = st.builds(
    Share,
    channel_id=U32,
    job_handle=U32,
    extranonce2=st.binary(min_size=0, max_size=8),
    ntime=U32,
    nonce=U32,
    version_bits=st.none() | U32,
    worker_index=st.none() | st.integers(0, 255),
)

TYPICAL = Share(
    channel_id=3,
    job_handle=0x1A2B,
    extranonce2=bytes.fromhex("00000001"),
    ntime=0x6554A2C1,
    nonce=0xB2957C02,
    version_bits=0x00C00000,
)


def test_header_layout_is_big_endian_and_16_bytes() -> None:
    header = Header(type=DatagramType.SHARE, conn_id=0x0102030405060708, pn=0x0A0B0C0D0E0F, flags=0x03)
    raw = header.encode()
    assert raw == bytes.fromhex("21 03 0102030405060708 0a0b0c0d0e0f")
    assert parse_header(raw) == header
    assert header.key_phase == 1 and header.urgent


def test_header_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(DatagramEncodeError):
        Header(type=16, conn_id=1, pn=0).encode()
    with pytest.raises(DatagramEncodeError):
        Header(type=1, conn_id=2**64, pn=0).encode()
    with pytest.raises(DatagramEncodeError):
        Header(type=1, conn_id=1, pn=2**48).encode()


def test_parse_header_needs_16_bytes() -> None:
    with pytest.raises(DatagramDecodeError) as info:
        parse_header(b"\x11" * 15)
    assert info.value.reason is DropReason.TRUNCATED


def test_typical_share_is_19_plaintext_bytes() -> None:
    raw = encode_body(TYPICAL)
    # flags: en2 len 4 | VERSION | VERSION16; ids short; en2; ntime; nonce; version bits >> 13
    assert raw == bytes.fromhex("94 0003 1a2b 00000001 6554a2c1 b2957c02 0600")
    assert decode_body(DatagramType.SHARE, raw) == TYPICAL


def test_version_bits_outside_bip320s_bits_take_four_bytes() -> None:
    for bits, size in ((0x1FFFE000, 2), (0x00002000, 2), (0, 2), (0x20000000, 4), (0x00001000, 4), (0xFFFFFFFF, 4)):
        share = Share(channel_id=1, job_handle=2, extranonce2=b"", ntime=3, nonce=4, version_bits=bits)
        raw = encode_body(share)
        assert len(raw) == 1 + 4 + 8 + size and bool(raw[0] & 0x80) == (size == 2)
        assert decode_body(DatagramType.SHARE, raw) == share
    # Decoders accept the long form of bits that would fit the short one.
    long_form = bytes.fromhex("14 0003 1a2b 00000001 6554a2c1 b2957c02 00c00000")
    assert decode_body(DatagramType.SHARE, long_form) == TYPICAL


def test_share_without_version_bits_and_with_wide_ids_and_worker() -> None:
    share = Share(channel_id=70000, job_handle=5, extranonce2=b"", ntime=1, nonce=2, worker_index=9)
    raw = encode_body(share)
    assert raw[0] == 0x60  # WIDE | WORKER, en2 length 0, no VERSION
    assert len(raw) == 1 + 8 + 1 + 0 + 8
    assert decode_body(DatagramType.SHARE, raw) == share


@given(shares)
def test_share_round_trip(share: Share) -> None:
    assert decode_body(DatagramType.SHARE, encode_body(share)) == share


@given(st.lists(shares, min_size=1, max_size=BATCH_MAX_SHARES))
def test_batch_round_trip(records: list[Share]) -> None:
    batch = ShareBatch(shares=tuple(records))
    raw = encode_body(batch)
    assert raw[0] == len(records)
    assert decode_body(DatagramType.SHARE_BATCH, raw) == batch


@given(st.integers(0, 2**32 - 1), st.integers(0, 100))
def test_probe_and_probe_ack_round_trip(probe_id: int, padding: int) -> None:
    probe = Probe(probe_id=probe_id, padding=padding)
    raw = encode_body(probe)
    assert len(raw) == 4 + padding
    assert decode_body(DatagramType.PROBE, raw) == probe
    ack = ProbeAck(probe_id=probe_id, padding=padding)
    assert decode_body(DatagramType.PROBE_ACK, encode_body(ack)) == ack


@st.composite
def acks(draw: st.DrawFn) -> Ack:
    count = draw(st.integers(1, ACK_MAX_RANGES))
    points = sorted(draw(st.sets(st.integers(0, 2**48 - 1), min_size=2 * count, max_size=2 * count)), reverse=True)
    ranges = tuple(AckRange(high=points[2 * i], low=points[2 * i + 1]) for i in range(count))
    return Ack(ranges=ranges, ack_delay_us=draw(U32))


@given(acks())
def test_ack_round_trip(ack: Ack) -> None:
    raw = encode_body(ack)
    assert len(raw) == 5 + 12 * len(ack.ranges)
    assert decode_body(DatagramType.ACK, raw) == ack
    assert ack.largest == ack.ranges[0].high


def test_single_pn_ack_range_is_allowed() -> None:
    ack = Ack(ranges=(AckRange(high=7, low=7), AckRange(high=5, low=0)))
    assert decode_body(DatagramType.ACK, encode_body(ack)) == ack


@pytest.mark.parametrize(
    "body",
    [
        Share(channel_id=1, job_handle=1, extranonce2=bytes(9), ntime=0, nonce=0),
        Share(channel_id=-1, job_handle=1, extranonce2=b"", ntime=0, nonce=0),
        Share(channel_id=1, job_handle=2**32, extranonce2=b"", ntime=0, nonce=0),
        Share(channel_id=1, job_handle=1, extranonce2=b"", ntime=2**32, nonce=0),
        Share(channel_id=1, job_handle=1, extranonce2=b"", ntime=0, nonce=0, version_bits=2**32),
        Share(channel_id=1, job_handle=1, extranonce2=b"", ntime=0, nonce=0, worker_index=256),
        ShareBatch(shares=()),
        ShareBatch(shares=(TYPICAL,) * (BATCH_MAX_SHARES + 1)),
        Probe(probe_id=2**32),
        Probe(probe_id=1, padding=-1),
        Ack(ranges=()),
        Ack(ranges=(AckRange(high=1, low=2),)),
        Ack(ranges=(AckRange(high=1, low=0), AckRange(high=5, low=4))),  # not highest first
        Ack(ranges=(AckRange(high=5, low=3), AckRange(high=3, low=0))),  # overlapping
        Ack(ranges=(AckRange(high=2**48, low=0),)),
    ],
)
def test_encode_refuses_what_does_not_fit(body: object) -> None:
    with pytest.raises(DatagramEncodeError):
        encode_body(body)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dtype", "raw"),
    [
        (DatagramType.SHARE, b""),
        (DatagramType.SHARE, bytes.fromhex("09 0001 0002") + bytes(9) + bytes(8)),  # en2 length 9
        (DatagramType.SHARE, bytes.fromhex("84 0001 0002 00000000") + bytes(8)),  # VERSION16 without VERSION
        (DatagramType.SHARE, encode_body(TYPICAL)[:-1]),
        (DatagramType.SHARE, encode_body(TYPICAL) + b"\x00"),
        (DatagramType.SHARE_BATCH, b""),
        (DatagramType.SHARE_BATCH, b"\x00"),
        (DatagramType.SHARE_BATCH, b"\x02" + encode_body(TYPICAL)),
        (DatagramType.SHARE_BATCH, b"\x01" + encode_body(TYPICAL) + b"\x00"),
        (DatagramType.SHARE_BATCH, bytes([BATCH_MAX_SHARES + 1]) + encode_body(TYPICAL) * 33),
        (DatagramType.PROBE, b"\x00\x00\x00"),
        (DatagramType.PROBE, b"\x00\x00\x00\x01\x00\x01"),  # padding not zero
        (DatagramType.PROBE_ACK, b""),
        (DatagramType.ACK, b"\x00\x00\x00\x00\x00"),  # zero ranges
        (DatagramType.ACK, b"\x00\x00\x00\x00\x01" + bytes(11)),
        (DatagramType.ACK, b"\x00\x00\x00\x00\x01" + bytes(6) + (1).to_bytes(6, "big")),  # low > high
    ],
)
def test_decode_refuses_malformed_bodies(dtype: DatagramType, raw: bytes) -> None:
    with pytest.raises(DatagramDecodeError) as info:
        decode_body(dtype, raw)
    assert info.value.reason is DropReason.MALFORMED


def test_decode_refuses_unknown_type() -> None:
    with pytest.raises(DatagramDecodeError) as info:
        decode_body(9, b"whatever")
    assert info.value.reason is DropReason.UNKNOWN_TYPE


@given(st.sampled_from(list(DatagramType)), st.binary(max_size=200))
def test_decode_never_raises_anything_but_decode_error(dtype: DatagramType, raw: bytes) -> None:
    try:
        body = decode_body(dtype, raw)
    except DatagramDecodeError:
        return
    # Whatever decodes re-encodes to the same bytes, except non-canonical (wide) ids.
    assert body_type(body) is dtype
    assert decode_body(dtype, encode_body(body)) == body


def test_minimum_body_sizes_match_smallest_encodings() -> None:
    smallest_share = Share(channel_id=0, job_handle=0, extranonce2=b"", ntime=0, nonce=0)
    assert len(encode_body(smallest_share)) == MIN_BODY_SIZE[DatagramType.SHARE]
    assert len(encode_body(ShareBatch((smallest_share,)))) == MIN_BODY_SIZE[DatagramType.SHARE_BATCH]
    assert len(encode_body(Probe(probe_id=0))) == MIN_BODY_SIZE[DatagramType.PROBE]
    assert len(encode_body(ProbeAck(probe_id=0))) == MIN_BODY_SIZE[DatagramType.PROBE_ACK]
    assert len(encode_body(Ack(ranges=(AckRange(0, 0),)))) == MIN_BODY_SIZE[DatagramType.ACK]


# ------------------------------------------------------------------ VERDICT (version 2)


def test_verdict_round_trip_and_sizes() -> None:
    from bridge.wire.datagram import VerdictEntry, Verdicts, verdict_entry_size

    detail = b'{"result":false,"error":[23,"Low difficulty share",null]}'
    body = Verdicts(entries=(VerdictEntry(pn=(1 << 48) - 1, index=31), VerdictEntry(pn=5, index=0, detail=detail)))
    plaintext = encode_body(body)
    assert len(plaintext) == verdict_entry_size(None) + verdict_entry_size(detail) == 5 + 7 + len(detail)
    # Only the low 32 bits of each pn travel; the proxy restores the rest (expand_pn).
    assert decode_body(DatagramType.VERDICT, plaintext) == Verdicts(
        entries=(VerdictEntry(pn=0xFFFF_FFFF, index=31), VerdictEntry(pn=5, index=0, detail=detail))
    )
    # A lone plain accept: 5 plaintext bytes, a 37-byte datagram.
    assert len(encode_body(Verdicts((VerdictEntry(7),)))) == 5


def test_a_verdict_pn_is_restored_at_or_below_the_largest_sent() -> None:
    from bridge.wire.datagram import expand_pn

    assert expand_pn(5, 9) == 5
    assert expand_pn(9, 9) == 9
    assert expand_pn(10, 9) is None  # above everything sent, and no earlier wrap
    big = (7 << 32) | 3
    assert expand_pn(3, big) == big
    assert expand_pn(0xFFFF_FFFF, big) == (6 << 32) | 0xFFFF_FFFF  # sent just before the low bits wrapped
    assert expand_pn(2, big) == (7 << 32) | 2


@pytest.mark.parametrize(
    ("plaintext", "why"),
    [
        ("", "no entries"),
        ("0000000100" * 65, "over 64 entries"),
        ("00000001", "entry truncated"),
        ("0000000180", "reserved flag"),
        ("000000014000", "detail length truncated"),
        ("00000001400005aa", "detail truncated"),
        ("0000000100ff", "trailing byte"),
    ],
)
def test_verdict_malformed(plaintext: str, why: str) -> None:
    with pytest.raises(DatagramDecodeError) as info:
        decode_body(DatagramType.VERDICT, bytes.fromhex(plaintext))
    assert info.value.reason is DropReason.MALFORMED, why


def test_verdict_encode_refuses_out_of_range() -> None:
    from bridge.wire.datagram import VerdictEntry, Verdicts

    with pytest.raises(DatagramEncodeError):
        encode_body(Verdicts(entries=()))
    with pytest.raises(DatagramEncodeError):
        encode_body(Verdicts(entries=(VerdictEntry(pn=1, index=64),)))
    with pytest.raises(DatagramEncodeError):
        encode_body(Verdicts(entries=(VerdictEntry(pn=1 << 48),)))
