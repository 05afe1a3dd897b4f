"""Tests for bridge.mining.share against the height-791433 vector and the math rules."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.mining.share import (
    DIFF1_TARGET,
    MAX_TARGET,
    Job,
    build_coinbase,
    build_header,
    difficulty_to_target,
    display_hex,
    hash_difficulty,
    hash_to_int,
    meets_difficulty,
    merkle_root,
    nbits_to_target,
    parse_hex,
    parse_u32_hex,
    prevhash_display,
    prevhash_from_display,
    prevhash_from_header,
    prevhash_to_header,
    roll_version,
    scan_nonces,
    sha256d,
    target_to_difficulty,
    target_to_nbits,
    version_bits_allowed,
)

DATA = Path(__file__).resolve().parent.parent / "data"


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


VEC = load("share-height-791433.json")
VR = load("version-rolling.json")
NOTIFY = VEC["job"]["notify"]
SUBMIT = VEC["submit"]
EXP = VEC["expected"]
EN1 = bytes.fromhex(VEC["job"]["subscribe_result"]["extranonce1"])
EN2 = bytes.fromhex(SUBMIT["extranonce2"])
NTIME = int(SUBMIT["ntime"], 16)
NONCE = int(SUBMIT["nonce"], 16)


def vector_job() -> Job:
    return Job.from_notify_fields(*VEC["job"]["notify_params"][:8])


def notify_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs = {k: NOTIFY[k] for k in ("job_id", "prevhash", "coinb1", "coinb2", "merkle_branch", "version", "nbits", "ntime")}
    kwargs.update(overrides)
    return kwargs


# --------------------------------------------------------------------------- vector 791433, step by step


def test_vector_coinbase_txid() -> None:
    coinbase = build_coinbase(bytes.fromhex(NOTIFY["coinb1"]), EN1, EN2, bytes.fromhex(NOTIFY["coinb2"]))
    assert coinbase == bytes.fromhex(NOTIFY["coinb1"] + "01000000" + "00000000" + NOTIFY["coinb2"])
    assert display_hex(sha256d(coinbase)) == EXP["coinbase_txid_display"]
    assert vector_job().coinbase(EN1, EN2) == coinbase


def test_vector_merkle_root() -> None:
    coinbase = build_coinbase(bytes.fromhex(NOTIFY["coinb1"]), EN1, EN2, bytes.fromhex(NOTIFY["coinb2"]))
    branch = [bytes.fromhex(b) for b in NOTIFY["merkle_branch"]]
    assert merkle_root(coinbase, branch).hex() == EXP["merkle_root_internal"]
    assert vector_job().merkle_root(EN1, EN2).hex() == EXP["merkle_root_internal"]


def test_vector_prevhash_forms() -> None:
    assert prevhash_display(NOTIFY["prevhash"]) == EXP["prevhash_display"]
    assert prevhash_from_display(EXP["prevhash_display"]) == NOTIFY["prevhash"]
    header_bytes = prevhash_to_header(NOTIFY["prevhash"])
    assert header_bytes.hex() == EXP["header_hex"][8:72]
    assert prevhash_from_header(header_bytes) == NOTIFY["prevhash"]


def test_vector_header_and_hash() -> None:
    root = bytes.fromhex(EXP["merkle_root_internal"])
    header = build_header(
        int(NOTIFY["version"], 16),
        prevhash_to_header(NOTIFY["prevhash"]),
        root,
        NTIME,
        int(NOTIFY["nbits"], 16),
        NONCE,
    )
    assert len(header) == 80
    assert header.hex() == EXP["header_hex"]
    assert header[76:] == bytes.fromhex("d19e020a")  # "0a029ed1" lands little-endian
    digest = sha256d(header)
    assert digest.hex() == EXP["block_hash_internal"]
    assert display_hex(digest) == EXP["block_hash_display"]
    assert hash_to_int(digest) == int(EXP["block_hash_display"], 16)


def test_vector_job_header_and_share_difficulty() -> None:
    job = vector_job()
    assert job.version_int == 0x20000004
    assert job.nbits_int == 0x1705AE3A
    assert job.ntime_int == 0x647025B5
    assert job.header(EN1, EN2, NTIME, NONCE, job.version_int).hex() == EXP["header_hex"]
    assert job.header(EN1, EN2, NTIME, NONCE).hex() == EXP["header_hex"]
    h = job.share_hash(EN1, EN2, NTIME, NONCE, job.version_int)
    assert h == int(EXP["block_hash_display"], 16)
    diff = hash_difficulty(h)
    assert diff == pytest.approx(EXP["share_difficulty"], rel=1e-15)
    assert int(diff) == EXP["share_difficulty_int"] == 683


def test_vector_accept_reject_boundary() -> None:
    h = vector_job().share_hash(EN1, EN2, NTIME, NONCE, 0x20000004)
    assert difficulty_to_target(683) == int(EXP["target_at_difficulty_683"], 16)
    assert difficulty_to_target(683) == DIFF1_TARGET // 683
    for d in (1, 256, 683, 683.0, 683.5):
        assert meets_difficulty(h, d)
        assert h <= difficulty_to_target(d)
    for d in (683.52, 684, 684.0, 1024):
        assert not meets_difficulty(h, d)
        assert h > difficulty_to_target(d)
    assert DIFF1_TARGET == int(EXP["diff1_target"], 16) == 0xFFFF << 208


def test_vector_network_target() -> None:
    job = vector_job()
    assert job.network_target == 0x05AE3A << (8 * (0x17 - 3))
    # mainnet difficulty around height 791433 was about 49.55 T
    assert target_to_difficulty(job.network_target) == pytest.approx(49.5497e12, rel=1e-4)


# --------------------------------------------------------------------------- version rolling


def test_version_rolling_negative_vector() -> None:
    exp = VR["expected"]
    mask = int(VR["version_rolling_mask"], 16)
    bits = int(VR["submit"]["version_bits"], 16)
    assert version_bits_allowed(bits, mask) is exp["version_bits_within_mask"]
    job = Job.from_notify_fields(*VR["job"]["notify_params"][:8])
    version = job.rolled_version(bits, mask)
    assert version == roll_version(job.version_int, bits, mask) == int(exp["nversion"], 16)
    header = job.header(EN1, EN2, NTIME, NONCE, version)
    assert header.hex() == exp["header_hex"]
    assert job.merkle_root(EN1, EN2).hex() == exp["merkle_root_internal"]
    assert display_hex(sha256d(header)) == exp["block_hash_display"]
    h = job.share_hash(EN1, EN2, NTIME, NONCE, version)
    assert hash_difficulty(h) == pytest.approx(exp["share_difficulty"], rel=1e-12)
    assert not meets_difficulty(h, exp["rejected_at_difficulty"])
    assert not meets_difficulty(h, 1)


def test_roll_version_rules() -> None:
    mask = 0x1FFFE000
    assert roll_version(0x20000004, 0, mask) == 0x20000004
    # job bits inside the mask are replaced, not OR-ed
    assert roll_version(0x20002004, 0x00004000, mask) == 0x20004004
    # bits outside the mask are ignored
    assert roll_version(0x20000004, 0xE0000001, mask) == 0x20000004
    assert version_bits_allowed(0x1FFFE000, mask)
    assert version_bits_allowed(0, mask)
    assert not version_bits_allowed(0x00001000, mask)
    assert not version_bits_allowed(0x20000000, mask)
    assert not version_bits_allowed(-1, mask)
    assert not version_bits_allowed(1 << 32, 0xFFFFFFFF)


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_roll_version_property(job_version: int, bits: int, mask: int) -> None:
    v = roll_version(job_version, bits, mask)
    assert 0 <= v <= 0xFFFFFFFF
    assert v & ~mask & 0xFFFFFFFF == job_version & ~mask & 0xFFFFFFFF
    assert v & mask == bits & mask
    if job_version & mask == 0 and version_bits_allowed(bits, mask):
        # BIP310, ckpool's OR and public-pool's XOR agree here
        assert v == job_version | bits == job_version ^ bits


# --------------------------------------------------------------------------- difficulty <-> target


def test_difficulty_to_target_integers() -> None:
    assert difficulty_to_target(1) == DIFF1_TARGET
    assert difficulty_to_target(2) == DIFF1_TARGET // 2
    assert difficulty_to_target(65536) == DIFF1_TARGET // 65536
    assert difficulty_to_target(10**15) == DIFF1_TARGET // 10**15


def test_difficulty_to_target_fractional_exact() -> None:
    assert difficulty_to_target(0.5) == DIFF1_TARGET * 2
    assert difficulty_to_target(0.001) == DIFF1_TARGET * 1000
    assert difficulty_to_target(Fraction(1, 1000)) == DIFF1_TARGET * 1000
    assert difficulty_to_target(Decimal("0.001")) == DIFF1_TARGET * 1000
    assert difficulty_to_target(1.5) == (DIFF1_TARGET * 2) // 3
    assert difficulty_to_target(683.0) == DIFF1_TARGET // 683


def test_difficulty_target_round_trips() -> None:
    for d in (0.001, 0.5, 1, 1.5, 8, 683, 1024.25, 65536, 1e6, 5e12):
        assert target_to_difficulty(difficulty_to_target(d)) == pytest.approx(d, rel=1e-12)
    for t in (DIFF1_TARGET, DIFF1_TARGET // 683, DIFF1_TARGET * 1000, MAX_TARGET):
        assert difficulty_to_target(target_to_difficulty(t)) == pytest.approx(t, rel=1e-12)
    assert target_to_difficulty(DIFF1_TARGET) == 1.0
    assert target_to_difficulty(DIFF1_TARGET * 1000) == pytest.approx(0.001)


def test_difficulty_clamps_and_rejects() -> None:
    assert difficulty_to_target(1e-20) == MAX_TARGET
    for bad in (0, -1, 0.0, -0.5, math.inf, math.nan, True, "1", None, Decimal("NaN")):
        with pytest.raises(ValueError):
            difficulty_to_target(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        target_to_difficulty(0)
    assert hash_difficulty(0) == math.inf
    assert hash_difficulty(DIFF1_TARGET) == 1.0
    with pytest.raises(ValueError):
        hash_difficulty(-1)


@given(st.fractions(min_value=Fraction(1, 10**6), max_value=Fraction(10**15)))
def test_difficulty_to_target_is_exact_floor(d: Fraction) -> None:
    t = difficulty_to_target(d)
    assert t * d <= DIFF1_TARGET < (t + 1) * d


@given(st.floats(min_value=1e-6, max_value=1e15, allow_nan=False, allow_infinity=False))
def test_difficulty_float_round_trip(d: float) -> None:
    assert target_to_difficulty(difficulty_to_target(d)) == pytest.approx(d, rel=1e-12)


# --------------------------------------------------------------------------- nbits <-> target


@pytest.mark.parametrize(
    ("nbits", "target"),
    [
        (0x1D00FFFF, DIFF1_TARGET),  # genesis, difficulty 1
        (0x207FFFFF, 0x7FFFFF << (8 * 29)),  # regtest
        (0x1705AE3A, 0x05AE3A << (8 * 20)),  # mainnet, height 791433
        (0x1B0404CB, 0x0404CB << (8 * 24)),  # mainnet, height 100000
        (0x170331DB, 0x0331DB << (8 * 20)),  # mainnet, 2024
        (0x1A05DB8B, 0x05DB8B << (8 * 23)),  # mainnet, 2011
        (0x03123456, 0x123456),
        (0x04123456, 0x12345600),
        (0x00000000, 0),
    ],
)
def test_nbits_target_known_values(nbits: int, target: int) -> None:
    assert nbits_to_target(nbits) == target
    assert target_to_nbits(target) == nbits


def test_nbits_known_difficulties() -> None:
    assert target_to_difficulty(nbits_to_target(0x1D00FFFF)) == 1.0
    assert target_to_difficulty(nbits_to_target(0x1B0404CB)) == pytest.approx(16307.420938523983)


def test_nbits_edge_cases() -> None:
    assert nbits_to_target(0x01123456) == 0x12  # small exponents shift right
    assert nbits_to_target(0x02123456) == 0x1234
    assert target_to_nbits(0x80) == 0x02008000  # sign bit pushes into the next byte
    assert nbits_to_target(0x02008000) == 0x80
    assert target_to_nbits(MAX_TARGET) == 0x2100FFFF
    assert nbits_to_target(0x2100FFFF) == 0xFFFF << (8 * 30)
    with pytest.raises(ValueError):
        nbits_to_target(0x04923456)  # negative
    with pytest.raises(ValueError):
        nbits_to_target(0xFF123456)  # overflow
    with pytest.raises(ValueError):
        nbits_to_target(1 << 32)
    with pytest.raises(ValueError):
        target_to_nbits(-1)
    with pytest.raises(ValueError):
        target_to_nbits(1 << 256)


@given(st.integers(3, 32), st.integers(0x008000, 0x7FFFFF))
def test_nbits_round_trip_property(exponent: int, mantissa: int) -> None:
    nbits = (exponent << 24) | mantissa
    assert target_to_nbits(nbits_to_target(nbits)) == nbits


@given(st.integers(1, MAX_TARGET))
def test_target_to_nbits_truncates(target: int) -> None:
    back = nbits_to_target(target_to_nbits(target))
    assert back <= target
    assert target - back < max(1, target >> 15)


# --------------------------------------------------------------------------- prevhash


def test_prevhash_word_swap_layout() -> None:
    stratum = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
    assert prevhash_to_header(stratum).hex() == ("03020100070605040b0a09080f0e0d0c13121110171615141b1a19181f1e1d1c")
    with pytest.raises(ValueError):
        prevhash_to_header("00" * 31)
    with pytest.raises(ValueError):
        prevhash_to_header("zz" * 32)
    with pytest.raises(ValueError):
        prevhash_from_header(b"\0" * 31)


@given(st.binary(min_size=32, max_size=32))
def test_prevhash_round_trip_property(b: bytes) -> None:
    stratum = prevhash_from_header(b)
    assert prevhash_to_header(stratum) == b
    assert prevhash_display(stratum) == b[::-1].hex()
    assert prevhash_from_display(prevhash_display(stratum)) == stratum


# --------------------------------------------------------------------------- Job.from_notify_fields validation


def test_job_round_trips_notify_fields() -> None:
    job = vector_job()
    assert list(job.notify_fields()) == VEC["job"]["notify_params"][:8]
    assert job.prevhash == NOTIFY["prevhash"]
    assert job.merkle_branch[0] == bytes.fromhex(NOTIFY["merkle_branch"][0])
    assert "coinb1" not in repr(job)


def test_job_accepts_empty_branch_and_upper_case() -> None:
    job = Job.from_notify_fields(**notify_kwargs(merkle_branch=[], prevhash=NOTIFY["prevhash"].upper()))
    assert job.merkle_branch == ()
    assert job.merkle_root(EN1, EN2) == sha256d(job.coinbase(EN1, EN2))
    assert job.prevhash_header == prevhash_to_header(NOTIFY["prevhash"])


@pytest.mark.parametrize(
    ("override", "field_name"),
    [
        ({"prevhash": NOTIFY["prevhash"][:-2]}, "prevhash"),
        ({"prevhash": NOTIFY["prevhash"] + "00"}, "prevhash"),
        ({"prevhash": "g" + NOTIFY["prevhash"][1:]}, "prevhash"),
        ({"coinb1": NOTIFY["coinb1"] + "0"}, "coinb1"),
        ({"coinb1": "01 00"}, "coinb1"),
        ({"coinb2": "0x00"}, "coinb2"),
        ({"coinb2": 1234}, "coinb2"),
        ({"merkle_branch": ["00" * 31]}, "merkle_branch[0]"),
        ({"merkle_branch": [NOTIFY["merkle_branch"][0], "xy" * 32]}, "merkle_branch[1]"),
        ({"merkle_branch": "00" * 32}, "merkle_branch"),
        ({"version": "2000004"}, "version"),
        ({"version": "020000004"}, "version"),
        ({"version": "+2000000"}, "version"),
        ({"nbits": "1705ae3g"}, "nbits"),
        ({"nbits": " 705ae3a"}, "nbits"),
        ({"ntime": "647025b"}, "ntime"),
        ({"ntime": "0x647025"}, "ntime"),
        ({"ntime": 0x647025B5}, "ntime"),
        ({"job_id": 7}, "job_id"),
    ],
)
def test_job_rejects_bad_fields(override: dict[str, Any], field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name.replace("[", r"\[").replace("]", r"\]")):
        Job.from_notify_fields(**notify_kwargs(**override))


def test_job_header_rejects_out_of_range_ints() -> None:
    job = vector_job()
    with pytest.raises(ValueError):
        job.header(EN1, EN2, -1, NONCE)
    with pytest.raises(ValueError):
        job.header(EN1, EN2, NTIME, 1 << 32)
    with pytest.raises(ValueError):
        build_header(1 << 32, b"\0" * 32, b"\0" * 32, 0, 0, 0)
    with pytest.raises(ValueError):
        build_header(1, b"\0" * 31, b"\0" * 32, 0, 0, 0)


def test_parse_helpers() -> None:
    assert parse_u32_hex("0a029ed1", "nonce") == 0x0A029ED1
    assert parse_hex("", "x") == b""
    with pytest.raises(ValueError, match="nonce"):
        parse_u32_hex("0a029ed", "nonce")
    with pytest.raises(ValueError, match="en2"):
        parse_hex("0000", "en2", 4)
    with pytest.raises(ValueError):
        parse_hex("\u0661\u0662", "x")  # non-ASCII digits
    with pytest.raises(ValueError):
        hash_to_int(b"\0" * 31)


# --------------------------------------------------------------------------- scan_nonces


def brute_force(header76: bytes, start: int, count: int, target: int) -> list[tuple[int, int]]:
    out = []
    for n in range(start, start + count):
        h = hash_to_int(sha256d(header76 + n.to_bytes(4, "little")))
        if h <= target:
            out.append((n, h))
    return out


@pytest.mark.parametrize("shift", [0, 4, 8, 20])
def test_scan_nonces_matches_brute_force(shift: int) -> None:
    header76 = vector_job().header76(EN1, EN2, NTIME)
    target = MAX_TARGET >> shift  # hit rate about 2**-shift
    found = scan_nonces(header76, 1000, 3000, target)
    assert found == brute_force(header76, 1000, 3000, target)
    if shift <= 8:
        assert found  # the loose targets must produce hits over 3000 nonces


def test_scan_nonces_odd_target_boundary() -> None:
    header76 = bytes(range(76))
    all_hashes = brute_force(header76, 0, 512, MAX_TARGET)
    assert scan_nonces(header76, 0, 512, MAX_TARGET) == all_hashes
    # a target equal to one hash (not a power of two) keeps exactly the hashes <= it
    pivot = sorted(h for _, h in all_hashes)[5]
    got = scan_nonces(header76, 0, 512, pivot)
    assert len(got) == 6
    assert got == [(n, h) for n, h in all_hashes if h <= pivot]


def test_scan_nonces_finds_vector_share() -> None:
    header76 = vector_job().header76(EN1, EN2, NTIME)
    assert header76 == bytes.fromhex(EXP["header_hex"])[:76]
    expected_hash = int(EXP["block_hash_display"], 16)
    found = scan_nonces(header76, NONCE - 100, 200, difficulty_to_target(683))
    assert (NONCE, expected_hash) in found
    assert all(h <= difficulty_to_target(683) for _, h in found)
    assert NONCE not in [n for n, _ in scan_nonces(header76, NONCE - 100, 200, difficulty_to_target(684))]


def test_scan_nonces_edges() -> None:
    header76 = bytes(76)
    assert scan_nonces(header76, 0, 0, MAX_TARGET) == []
    assert scan_nonces(header76, 0, 10, -1) == []
    assert scan_nonces(header76, 0xFFFFFFFF, 1, MAX_TARGET)[0][0] == 0xFFFFFFFF
    with pytest.raises(ValueError):
        scan_nonces(header76, 0xFFFFFFFF, 2, MAX_TARGET)
    with pytest.raises(ValueError):
        scan_nonces(header76, -1, 2, MAX_TARGET)
    with pytest.raises(ValueError):
        scan_nonces(header76[:75], 0, 2, MAX_TARGET)
