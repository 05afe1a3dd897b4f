"""Arbitrary bytes at every listening port, through the real trio drivers (issue 9.1).

Each hypothesis example sends what a hostile peer might at one port of the running roles
(:mod:`conftest`): the proxy's miner port, the sidecar's control port before the TLS
handshake (raw bytes) and after it (with a valid certificate, arbitrary lines), the
sidecar's UDP port (random bytes, the live conn_id with garbage, and garbage sealed with
the live key as a compromised proxy could), and the status port. After every example an
honest client of that port is still served, and no role had to contain an internal
error: what a peer sends is refused as a protocol error, never an exception.

The examples are derandomized, so every run tries the same ones (no flakes); run with
``--hypothesis-seed=N`` and without derandomization to explore further.
"""

from __future__ import annotations

import socket
import struct

import msgspec
from hardening_stack import HELLO, HOST, WAIT, Stack, read_until_closed
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge.net.miner_proxy import MAX_LINE_FROM_MINER
from bridge.sv1.messages import MINER_METHODS
from bridge.wire.control import RM_PARAMS
from bridge.wire.datagram import HEADER_SIZE, MAX_DATAGRAM_SIZE, OVERHEAD, DatagramType

EXAMPLES = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ----------------------------------------------------------------------------- strategies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)
request_ids = st.none() | st.integers() | st.text(max_size=6) | json_values
encode = msgspec.json.encode


@st.composite
def deep_nesting(draw: st.DrawFn, max_bytes: int) -> bytes:
    """A line far deeper than any decoder should recurse, within ``max_bytes`` (so it is decoded)."""
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    closed = draw(st.booleans())
    wrapper = draw(
        st.sampled_from(
            [
                b'{"id":1,"method":"mining.subscribe","params":%s}',
                b'{"id":1,"result":%s,"error":null}',
                b'{"id":1,"method":"mining.ping","params":[],"x":%s}',
                b"%s",
            ]
        )
    )
    room = (max_bytes - len(wrapper) - 2) // (len(opener) + (len(closer) if closed else 0))
    depth = min(draw(st.sampled_from([33, 1000, 1500, 3000, 50_000]) | st.integers(30, room)), room)
    return wrapper % (opener * depth + (b"1" + closer * depth if closed else b""))


def sv1_lines(methods: list[str]) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda request_id, method, params: encode({"id": request_id, "method": method, "params": params}),
        request_ids,
        st.sampled_from(methods) | st.text(max_size=16),
        json_values,
    )


def lines_of(line: st.SearchStrategy[bytes], max_lines: int = 6) -> st.SearchStrategy[bytes]:
    return st.lists(line, min_size=1, max_size=max_lines).map(lambda lines: b"\n".join(lines) + b"\n")


miner_port_bytes = st.one_of(
    st.binary(max_size=2000),
    lines_of(st.one_of(st.binary(max_size=200), json_values.map(encode), sv1_lines(sorted(MINER_METHODS)))),
    lines_of(deep_nesting(MAX_LINE_FROM_MINER), max_lines=2),
    st.integers(MAX_LINE_FROM_MINER - 10, 3 * MAX_LINE_FROM_MINER).map(lambda n: b"[" * n),
)


def control_lines() -> st.SearchStrategy[bytes]:
    rm_methods = sorted(RM_PARAMS)
    rm = st.builds(
        lambda request_id, method, params: encode({"id": request_id, "method": method, "params": params}),
        request_ids,
        st.sampled_from(rm_methods) | st.text(max_size=10),
        json_values,
    )
    channel = st.builds(
        lambda ch, request_id, method, params: encode({"ch": ch, "id": request_id, "method": method, "params": params}),
        st.integers(-3, 5) | json_values,
        request_ids,
        st.sampled_from(sorted(MINER_METHODS)),
        json_values,
    )
    response = st.builds(
        lambda ch, request_id, result, error: encode({"ch": ch, "id": request_id, "result": result, "error": error}),
        st.integers(0, 5),
        request_ids,
        json_values,
        json_values,
    )
    return st.one_of(rm, channel, response, json_values.map(encode), st.binary(max_size=200), deep_nesting(200_000))


control_session = st.tuples(st.booleans(), lines_of(control_lines(), max_lines=8))

http_requests = st.one_of(
    st.binary(max_size=2000),
    st.builds(
        lambda method, target, version, headers: b"%s %s %s\r\n%s\r\n" % (method, target, version, headers),
        st.sampled_from([b"GET", b"HEAD", b"POST", b"get", b""]) | st.binary(max_size=8),
        st.sampled_from([b"/status", b"//[", b"/", b"/status?x=[", b"http://[::1/status", b"*"]) | st.binary(max_size=40),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9", b""]),
        st.binary(max_size=300),
    ),
    st.integers(8000, 20000).map(lambda n: b"GET /" + b"a" * n),
)


# ----------------------------------------------------------------------------- the tests


def send_and_read_until_closed(port: int, data: bytes) -> None:
    """Connect, send ``data``, end our side, and read until the role closes (it must)."""
    with socket.create_connection((HOST, port), timeout=WAIT) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the role closed first: also an answer
        read_until_closed(sock)


def assert_nothing_contained(stack: Stack, before: dict[str, dict[str, int]]) -> None:
    errors = stack.contained_errors()
    assert errors == before, f"a role contained an internal error: {errors}, before this example {before}"


REPORTED_LINE = b'{"id":1,"method":"mining.subscribe","params":' + b"[" * 1000 + b"]" * 1000 + b"}\n"


@EXAMPLES
@given(data=miner_port_bytes)
@example(data=REPORTED_LINE)
def test_miner_port(stack: Stack, data: bytes) -> None:
    before = stack.contained_errors()
    send_and_read_until_closed(stack.proxy_port, data)
    stack.honest_rig_subscribes()
    assert_nothing_contained(stack, before)


@EXAMPLES
@given(data=st.binary(max_size=3000) | st.binary(max_size=20).map(lambda tail: b"\x16\x03\x01\x02\x00\x01" + tail))
def test_control_port_before_the_handshake(stack: Stack, data: bytes) -> None:
    before = stack.contained_errors()
    failures = stack.call(lambda: stack.sidecar.statistics().handshake_failures)
    send_and_read_until_closed(stack.sidecar_port, data)
    stack.wait_until(lambda: stack.sidecar.statistics().handshake_failures > failures, "the handshake failure")
    stack.honest_proxy_says_hello()
    assert_nothing_contained(stack, before)


# Hypothesis raises the recursion limit while it runs examples: deeper than that.
DEEP_CONTROL_LINE = b'{"ch":1,"id":7,"method":"mining.submit","params":' + b"[" * 50_000 + b"]" * 50_000 + b"}\n"


@EXAMPLES
@given(session=control_session)
@example(session=(False, DEEP_CONTROL_LINE))
@example(session=(True, DEEP_CONTROL_LINE))
def test_control_channel_after_the_handshake(stack: Stack, session: tuple[bool, bytes]) -> None:
    before = stack.contained_errors()
    hello_first, lines = session
    total = stack.call(lambda: stack.sidecar.statistics().sessions_total)
    with stack.tls_connection() as tls:
        try:
            tls.sendall((HELLO if hello_first else b"") + lines)
        except OSError:
            pass  # the sidecar closed first: a protocol error on an early line
    stack.wait_sidecar_settled(total + 1)
    stack.honest_proxy_says_hello()
    assert_nothing_contained(stack, before)


@st.composite
def datagrams(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """What to send: ("raw", bytes) as is; ("live", rest) after the live conn_id's header bytes;
    ("sealed", type + plaintext) sealed with the live key."""
    kinds = st.one_of(
        st.tuples(st.just("raw"), st.binary(max_size=1500)),
        st.tuples(st.just("live"), st.binary(max_size=MAX_DATAGRAM_SIZE - 8)),
        st.tuples(
            st.just("sealed"),
            st.builds(
                lambda dtype, body: bytes([dtype]) + body,
                st.sampled_from([int(t) for t in DatagramType]) | st.integers(0, 15),
                st.binary(max_size=MAX_DATAGRAM_SIZE - OVERHEAD),
            ),
        ),
    )
    return draw(st.lists(kinds, min_size=1, max_size=6))


@EXAMPLES
@given(batch=datagrams())
def test_udp_port(stack: Stack, batch: list[tuple[str, bytes]]) -> None:
    before = stack.contained_errors()

    def live_keys():
        connection = stack.proxy.link.connection
        return None if connection is None or connection._keys is None else connection._keys.sealer

    stack.wait_until(lambda: live_keys() is not None, "the honest proxy's UDP keys")
    received = stack.call(lambda: stack.sidecar.intake.statistics().datagrams)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for kind, payload in batch:
            if kind == "raw":
                datagram = payload
            elif kind == "live":
                conn_id = stack.call(lambda: live_keys().conn_id)
                header = bytearray(payload[:HEADER_SIZE].ljust(HEADER_SIZE, b"\0"))
                header[0] = 0x10 | header[0] & 0x0F  # version 1, any type
                struct.pack_into(">Q", header, 2, conn_id)
                datagram = bytes(header) + payload[HEADER_SIZE:]
            else:
                datagram = stack.call(lambda sealed=payload: live_keys().seal_plaintext(sealed[0], sealed[1:]).data)
            udp.sendto(datagram, (HOST, stack.udp_port))
    stack.wait_until(lambda: stack.sidecar.intake.statistics().datagrams >= received + len(batch), "the datagrams")
    stack.honest_shares_still_accepted()
    assert_nothing_contained(stack, before)


@EXAMPLES
@given(data=http_requests)
def test_status_port(stack: Stack, data: bytes) -> None:
    before = stack.call(lambda: stack.sidecar.containment.errors)
    send_and_read_until_closed(stack.status_port, data)
    stack.honest_status_request()
    assert stack.call(lambda: stack.sidecar.containment.errors) == before


def test_the_honest_miner_mined_throughout(stack: Stack) -> None:
    stack.honest_shares_still_accepted()
    assert stack.contained_errors() == {"proxy": {}, "sidecar": {}, "pool": {}}
