"""Key derivation, nonces, the Sealer and the Opener.

The HKDF check uses an independent HKDF written here from RFC 5869 with the standard
library's hmac, so the derivation is pinned by two implementations.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from bridge.wire.datagram import (
    MAX_PN,
    Ack,
    AckRange,
    DatagramEncodeError,
    DatagramType,
    Probe,
    Share,
    VerdictEntry,
    Verdicts,
    encode_body,
    parse_header,
)
from bridge.wire.keys import (
    INFO_PROXY_TO_SIDECAR,
    INFO_SIDECAR_TO_PROXY,
    KeyExhausted,
    KeyMaterial,
    KeySet,
    Opener,
    Role,
    Sealer,
    derive_keys,
    nonce_for,
)

SECRET = bytes(range(32))
CONN_ID = 0x0123456789ABCDEF


def rfc5869_hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def test_rfc5869_helper_matches_test_case_1() -> None:
    okm = rfc5869_hkdf_sha256(
        bytes.fromhex("0b" * 22),
        bytes.fromhex("000102030405060708090a0b0c"),
        bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        42,
    )
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")


def test_derived_keys_match_independent_hkdf() -> None:
    keys = derive_keys(KeyMaterial(CONN_ID, 0, SECRET))
    salt = CONN_ID.to_bytes(8, "big")
    assert keys.proxy_to_sidecar == rfc5869_hkdf_sha256(SECRET, salt, INFO_PROXY_TO_SIDECAR, 32)
    assert keys.sidecar_to_proxy == rfc5869_hkdf_sha256(SECRET, salt, INFO_SIDECAR_TO_PROXY, 32)
    assert keys.proxy_to_sidecar != keys.sidecar_to_proxy
    assert INFO_PROXY_TO_SIDECAR == b"stratumrm/udp/v1 proxy->sidecar"
    assert INFO_SIDECAR_TO_PROXY == b"stratumrm/udp/v1 sidecar->proxy"


def test_conn_id_is_the_salt() -> None:
    a = derive_keys(KeyMaterial(CONN_ID, 0, SECRET))
    b = derive_keys(KeyMaterial(CONN_ID + 1, 0, SECRET))
    assert a.proxy_to_sidecar != b.proxy_to_sidecar


def test_secrets_never_show_in_repr() -> None:
    material = KeyMaterial(CONN_ID, 3, SECRET)
    keys = derive_keys(material)
    for text in (repr(material), repr(keys)):
        assert SECRET.hex() not in text and "hidden" in text
        assert keys.proxy_to_sidecar.hex() not in text


def test_key_material_validation_and_generation() -> None:
    with pytest.raises(ValueError):
        KeyMaterial(0, 0, SECRET)
    with pytest.raises(ValueError):
        KeyMaterial(1, 0, SECRET[:31])
    feed = iter([bytes(8), (5).to_bytes(8, "big"), SECRET])
    generated = KeyMaterial.generate(2, randbytes=lambda n: next(feed))
    assert generated == KeyMaterial(5, 2, SECRET)  # the zero conn_id was skipped
    assert generated.key_phase == 0
    assert KeyMaterial.generate(1).key_phase == 1


def test_nonce_is_four_zero_bytes_then_u64_pn() -> None:
    assert nonce_for(0x0A0B0C0D0E0F) == bytes(4) + (0x0A0B0C0D0E0F).to_bytes(8, "big")
    assert len(nonce_for(MAX_PN)) == 12


def test_sealed_datagram_is_header_then_chacha20poly1305_with_header_as_aad() -> None:
    material = KeyMaterial(CONN_ID, 1, SECRET)
    keyset = KeySet.derive(material, Role.PROXY)
    share = Share(channel_id=1, job_handle=2, extranonce2=b"\x00\x00\x00\x01", ntime=3, nonce=4)
    pn, data = keyset.sealer.seal(share, urgent=True)
    assert pn == 0
    header = parse_header(data)
    assert (header.type, header.conn_id, header.pn, header.key_phase, header.urgent) == (
        DatagramType.SHARE,
        CONN_ID,
        0,
        1,
        True,
    )
    aead = ChaCha20Poly1305(derive_keys(material).proxy_to_sidecar)
    plaintext = aead.decrypt(nonce_for(0), data[16:], data[:16])
    assert len(data) == 16 + len(plaintext) + 16


def test_packet_numbers_count_up_and_never_repeat() -> None:
    sealer = KeySet.derive(KeyMaterial(CONN_ID, 0, SECRET), Role.PROXY).sealer
    pns = [sealer.seal(Probe(probe_id=i)).pn for i in range(100)]
    assert pns == list(range(100))
    assert sealer.next_pn == 100
    nonces = {parse_header(sealer.seal(Probe(probe_id=0)).data).pn for _ in range(50)}
    assert len(nonces) == 50


def test_sealer_refuses_to_wrap() -> None:
    sealer = Sealer(conn_id=CONN_ID, epoch=0, key=SECRET, first_pn=MAX_PN)
    assert sealer.remaining == 1
    assert sealer.seal(Probe(probe_id=1)).pn == MAX_PN
    assert sealer.remaining == 0
    with pytest.raises(KeyExhausted):
        sealer.seal(Probe(probe_id=2))
    with pytest.raises(KeyExhausted):  # and stays refused
        sealer.seal(Probe(probe_id=3))


def test_sealer_refuses_urgent_non_shares_and_oversized_datagrams() -> None:
    sealer = Sealer(conn_id=CONN_ID, epoch=0, key=SECRET)
    with pytest.raises(DatagramEncodeError):
        sealer.seal(Probe(probe_id=1), urgent=True)
    with pytest.raises(DatagramEncodeError):
        sealer.seal_plaintext(DatagramType.PROBE, bytes(1200 - 32 + 1))
    assert sealer.next_pn == 0  # nothing was consumed


def test_opener_of_the_peer_opens_and_wrong_direction_does_not() -> None:
    material = KeyMaterial(CONN_ID, 0, SECRET)
    proxy = KeySet.derive(material, Role.PROXY)
    sidecar = KeySet.derive(material, Role.SIDECAR)
    data = proxy.sealer.seal(Probe(probe_id=7)).data
    assert sidecar.opener.open(data) == (7).to_bytes(4, "big")
    assert proxy.opener.open(data) is None  # a key never opens its own direction
    back = sidecar.sealer.seal(Probe(probe_id=8)).data
    assert proxy.opener.open(back) == (8).to_bytes(4, "big")


def test_opener_rejects_flipped_aad() -> None:
    key = bytes(32)
    sealer = Sealer(conn_id=CONN_ID, epoch=0, key=key)
    opener = Opener(conn_id=CONN_ID, epoch=0, key=key)
    data = bytearray(sealer.seal(Probe(probe_id=1)).data)
    data[1] ^= 0x02
    assert opener.open(bytes(data)) is None


# The known-answer vector printed in bridge/wire/PROTOCOL.md ("Test vector").
VECTOR_SECRET = bytes(range(32))
VECTOR_CONN_ID = 0x0123456789ABCDEF
VECTOR_KEY_P2S = "ccbeca87cb14916096f8cbb7f22277ddce8b11c67d43c78cfa8763b747f2bfef"
VECTOR_KEY_S2P = "44e20186f025acfa31e2333e81f07a4e99f38eb3ab1ef6db9d3bdd568d41d651"
VECTOR_SHARE_PLAINTEXT = "9400031a2b000000016554a2c1b2957c020600"
VECTOR_SHARE_DATAGRAM = "21030123456789abcdef00000000002a79d98d16bb5da85b3b67be3a1ccf2835ff31cfa95e73d40f7ab95197d237b31d15aec7"
VECTOR_ACK_DATAGRAM = (
    "25010123456789abcdef00000000000786345dbf3cf00537cf39019534dff1d6a749e18e19e3cc379d14dd7381865b0e8d7695def428e62944645ba85e"
)
VECTOR_VERDICT_DETAIL = b'{"result":null,"error":[21,"Job not found",null]}'
VECTOR_VERDICT_PLAINTEXT = "0000002a000000002b410031" + VECTOR_VERDICT_DETAIL.hex()
VECTOR_VERDICT_DATAGRAM = (
    "26010123456789abcdef000000000008"
    "8115420f245babe3d414bb91482aeb6aab2e02b9dded07c43a3ee64ed7eca30fc402ca73e4b56bd6e7d985f497175035a6e4"
    "21fcb90f763493be5e7f8b7dfe92de0679758e58d22aad20943d54"
)
VECTOR_LONE_VERDICT_DATAGRAM = "26010123456789abcdef0000000000088115420f24b198896e2dde395cf5a00b9dccebb9a7"


def test_known_answer_vector() -> None:
    salt = VECTOR_CONN_ID.to_bytes(8, "big")
    key_p2s = rfc5869_hkdf_sha256(VECTOR_SECRET, salt, b"stratumrm/udp/v1 proxy->sidecar", 32)
    key_s2p = rfc5869_hkdf_sha256(VECTOR_SECRET, salt, b"stratumrm/udp/v1 sidecar->proxy", 32)
    assert key_p2s.hex() == VECTOR_KEY_P2S and key_s2p.hex() == VECTOR_KEY_S2P

    # Built by hand from the PROTOCOL.md description, then compared with the Sealer.
    header = bytes.fromhex("2103") + salt + (0x2A).to_bytes(6, "big")  # SHARE, KEY_PHASE|URGENT
    nonce = bytes(4) + (0x2A).to_bytes(8, "big")
    plaintext = bytes.fromhex(VECTOR_SHARE_PLAINTEXT)
    by_hand = header + ChaCha20Poly1305(key_p2s).encrypt(nonce, plaintext, header)
    assert by_hand.hex() == VECTOR_SHARE_DATAGRAM

    sealer = Sealer(conn_id=VECTOR_CONN_ID, epoch=1, key=key_p2s, first_pn=0x2A)
    share = Share(
        channel_id=3,
        job_handle=0x1A2B,
        extranonce2=bytes.fromhex("00000001"),
        ntime=0x6554A2C1,
        nonce=0xB2957C02,
        version_bits=0x00C00000,
    )
    assert sealer.seal(share, urgent=True).data.hex() == VECTOR_SHARE_DATAGRAM

    ack_sealer = Sealer(conn_id=VECTOR_CONN_ID, epoch=1, key=key_s2p, first_pn=7)
    ack = Ack(ranges=(AckRange(high=0x2A, low=0x28), AckRange(high=0x25, low=0x20)), ack_delay_us=1500)
    assert ack_sealer.seal(ack).data.hex() == VECTOR_ACK_DATAGRAM

    # VERDICT: share 0 of pn 0x2a accepted plainly, share 1 of pn 0x2b refused with detail.
    verdicts = Verdicts(entries=(VerdictEntry(pn=0x2A), VerdictEntry(pn=0x2B, index=1, detail=VECTOR_VERDICT_DETAIL)))
    assert encode_body(verdicts).hex() == VECTOR_VERDICT_PLAINTEXT
    verdict_header = bytes.fromhex("2601") + salt + (8).to_bytes(6, "big")
    by_hand = verdict_header + ChaCha20Poly1305(key_s2p).encrypt(
        bytes(4) + (8).to_bytes(8, "big"), bytes.fromhex(VECTOR_VERDICT_PLAINTEXT), verdict_header
    )
    assert by_hand.hex() == VECTOR_VERDICT_DATAGRAM
    verdict_sealer = Sealer(conn_id=VECTOR_CONN_ID, epoch=1, key=key_s2p, first_pn=8)
    assert verdict_sealer.seal(verdicts).data.hex() == VECTOR_VERDICT_DATAGRAM
    lone = Sealer(conn_id=VECTOR_CONN_ID, epoch=1, key=key_s2p, first_pn=8).seal(Verdicts((VerdictEntry(0x2A),)))
    assert lone.data.hex() == VECTOR_LONE_VERDICT_DATAGRAM and len(lone.data) == 37
