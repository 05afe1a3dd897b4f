"""PROXY protocol v2 parser and builder: the spec's layouts byte for byte, hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.wire.proxy_header import (
    SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    build_proxy_header,
    parse_proxy_header,
)

# The spec's v1 example connection (section 2.1, "PROXY TCP4 192.168.0.1 192.168.0.11
# 56324 443"), written in v2's binary form by hand from section 2.2's layout.
TCP4_EXAMPLE = bytes.fromhex(
    "0d0a0d0a000d0a515549540a"  # signature
    "21"  # version 2, command PROXY
    "11"  # AF_INET, STREAM
    "000c"  # 12 bytes of addresses
    "c0a80001"
    "c0a8000b"  # 192.168.0.1, 192.168.0.11
    "dc04"
    "01bb"  # 56324, 443
)
# The spec's TCP6 example (section 2.1): ffff:…:ffff to ffff:…:ffff, ports 65535.
TCP6_EXAMPLE = SIGNATURE + bytes.fromhex("21210024") + b"\xff" * 32 + bytes.fromhex("ffffffff")
# A LOCAL header (health check from the balancer itself, section 2.2: command 0).
LOCAL_EXAMPLE = SIGNATURE + bytes.fromhex("20000000")


def test_the_signature_is_the_specs():
    assert SIGNATURE == bytes.fromhex("0D0A0D0A000D0A515549540A")


def test_tcp4_example_parses_and_builds_byte_for_byte():
    header, rest = parse_proxy_header(TCP4_EXAMPLE + b"\x16\x03\x01")
    assert header == ProxyHeader(
        local=False, family=1, transport=1, source=("192.168.0.1", 56324), destination=("192.168.0.11", 443)
    )
    assert rest == b"\x16\x03\x01"
    assert header.size == len(TCP4_EXAMPLE) == 28
    assert build_proxy_header(("192.168.0.1", 56324), ("192.168.0.11", 443)) == TCP4_EXAMPLE


def test_tcp6_example_parses_and_builds_byte_for_byte():
    header, rest = parse_proxy_header(TCP6_EXAMPLE)
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    assert header.source == (full, 65535) and header.destination == (full, 65535)
    assert rest == b"" and len(TCP6_EXAMPLE) == 52
    assert build_proxy_header((full, 65535), (full, 65535)) == TCP6_EXAMPLE


def test_local_header_carries_no_address():
    header, rest = parse_proxy_header(LOCAL_EXAMPLE + b"x")
    assert header.local and header.source is None and rest == b"x"
    assert build_proxy_header(None, None) == LOCAL_EXAMPLE


def test_local_with_addresses_still_vouches_for_nothing():
    # Section 2.2: with LOCAL the receiver must ignore the address information.
    data = bytearray(TCP4_EXAMPLE)
    data[12] = 0x20
    header, _ = parse_proxy_header(bytes(data))
    assert header.local and header.source is None


def test_mixed_families_are_sent_as_ipv6():
    data = build_proxy_header(("10.0.0.5", 4028), ("2001:db8::1", 3333))
    header, _ = parse_proxy_header(data)
    assert header.family == 2
    assert header.source == ("::ffff:a00:5", 4028)


def test_tlvs_round_trip_and_unix_addresses():
    data = build_proxy_header(("10.0.0.5", 1), ("10.0.0.6", 2), tlvs=((0x02, b"pool.example"), (0xE0, b"")))
    header, _ = parse_proxy_header(data)
    assert header.tlvs == ((0x02, b"pool.example"), (0xE0, b""))
    unix = SIGNATURE + bytes.fromhex("213100d8") + b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")
    header, _ = parse_proxy_header(unix)
    assert header.source == ("/a", 0) and header.destination == ("/b", 0)


def test_byte_at_a_time_gives_the_same_header():
    parser = ProxyHeaderParser()
    stream = TCP4_EXAMPLE + b"hello"
    results = [parser.receive_data(stream[i : i + 1]) for i in range(len(TCP4_EXAMPLE))]
    assert results[:-1] == [None] * (len(TCP4_EXAMPLE) - 1)
    assert results[-1] is not None and results[-1].source == ("192.168.0.1", 56324)
    assert parser.rest == b""


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x16\x03\x01\x02\x00", "does not start with a PROXY v2 header"),  # a TLS ClientHello
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "does not start"),  # version 1 is refused
        (SIGNATURE + bytes.fromhex("1111000c"), "version 1"),
        (SIGNATURE + bytes.fromhex("2211000c"), "unknown command"),
        (SIGNATURE + bytes.fromhex("2141000c") + b"\0" * 12, "unknown address family"),
        (SIGNATURE + bytes.fromhex("2113000c") + b"\0" * 12, "unknown transport"),
        (SIGNATURE + bytes.fromhex("21110008") + b"\0" * 8, "too short"),
        (SIGNATURE + bytes.fromhex("2111ffff"), "more than the 1024 allowed"),
        (SIGNATURE + bytes.fromhex("2111000e") + b"\0" * 14, "ends inside a TLV"),
        (SIGNATURE + bytes.fromhex("21110010") + b"\0" * 12 + bytes.fromhex("01ffff00"), "overruns"),
    ],
)
def test_hostile_headers_are_refused_with_a_reason(data, words):
    with pytest.raises(ProxyHeaderError, match=words):
        parse_proxy_header(data)


def test_a_non_proxy_peer_is_refused_on_its_first_byte():
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderParser().receive_data(b"\x16")


def test_the_buffer_is_bounded_before_the_body_arrives():
    parser = ProxyHeaderParser(max_length=64)
    with pytest.raises(ProxyHeaderError):
        parser.receive_data(SIGNATURE + bytes.fromhex("21110041"))


def test_builder_refuses_half_an_address_and_bad_ports():
    with pytest.raises(ValueError):
        build_proxy_header(("1.2.3.4", 1), None)
    with pytest.raises(ValueError):
        build_proxy_header(("1.2.3.4", 70000), ("1.2.3.4", 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40))
def test_arbitrary_bytes_either_parse_or_raise_the_one_error(data, chunk):
    parser = ProxyHeaderParser()
    try:
        for start in range(0, len(data), chunk):
            if parser.receive_data(data[start : start + chunk]) is not None:
                break
    except ProxyHeaderError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.ip_addresses(),
    st.integers(0, 65535),
    st.ip_addresses(),
    st.integers(0, 65535),
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4),
)
def test_build_then_parse_round_trips(src, sport, dst, dport, tlvs):
    data = build_proxy_header((str(src), sport), (str(dst), dport), tlvs=tuple(tlvs))
    header, rest = parse_proxy_header(data)
    assert rest == b"" and header.size == len(data) and header.tlvs == tuple(tlvs)
    if src.version == dst.version:
        assert header.source == (str(src), sport) and header.destination == (str(dst), dport)


def test_bytes_needed_never_reads_past_the_header():
    parser = ProxyHeaderParser()
    stream = TCP4_EXAMPLE + b"\x16\x03\x01"
    position = 0
    header = None
    while header is None:
        want = parser.bytes_needed()
        header = parser.receive_data(stream[position : position + want])
        position += want
    assert position == len(TCP4_EXAMPLE) and parser.rest == b"" and parser.bytes_needed() == 0
