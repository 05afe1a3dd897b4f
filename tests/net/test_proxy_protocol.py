"""PROXY protocol v2 at the sidecar: from a trusted balancer in, toward the pool out.

The "balancer" here is test code that writes the header HAProxy's ``send-proxy-v2``
writes; the "pool" a listener that reads one. The netns tests run the real HAProxy.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import pytest
import trio

from bridge.config import parse_upstream_url
from bridge.net.proxy_protocol import (
    TrustedBalancers,
    format_address,
    parse_address,
    read_proxy_header,
)
from bridge.net.sidecar import SidecarServer
from bridge.sv1.framing import LineBuffer
from bridge.testing.pki import TestPKI, make_test_pki
from bridge.wire.proxy_header import ProxyHeader, build_proxy_header

LOCALHOST = "127.0.0.1"
PROXY_ADDRESS = ("203.0.113.7", 40123)
RIG_ADDRESS = "198.51.100.9:4028"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


class HeaderPool:
    """A pool that records each connection's PROXY header and answers nothing."""

    def __init__(self) -> None:
        self.headers: list[ProxyHeader] = []
        self.arrived = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        header = await read_proxy_header(stream, 10.0)
        self.headers.append(header)
        self.arrived.set()
        await stream.receive_some(1024)


async def hello(stream: trio.abc.Stream, lines: LineBuffer) -> dict[str, Any]:
    await stream.send_all(b'{"id":1,"method":"rm.hello","params":{"version":1,"features":[]}}\n')
    while True:
        for line in lines.feed(await stream.receive_some(65536)):
            message = json.loads(line)
            if message.get("id") == 1:
                return message


async def test_real_proxy_address_from_balancer_and_rig_address_to_pool(pki: TestPKI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="bridge.sidecar")
    pool = HeaderPool()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, pool.handle, 0, host=LOCALHOST))
        pool_port = listeners[0].socket.getsockname()[1]
        server = SidecarServer(
            parse_upstream_url(f"stratum+tcp://{LOCALHOST}:{pool_port}"),
            pki.server_context(),
            udp=False,
            proxy_protocol_from=TrustedBalancers(["127.0.0.0/8"]),
            proxy_protocol_to_pool=True,
        )
        port = await nursery.start(server.serve, LOCALHOST, 0)
        tcp = await trio.open_tcp_stream(LOCALHOST, port)
        await tcp.send_all(build_proxy_header(PROXY_ADDRESS, (LOCALHOST, port)))
        tls = trio.SSLStream(tcp, pki.client_context(), server_hostname=LOCALHOST)
        await tls.do_handshake()
        lines = LineBuffer()
        result = await hello(tls, lines)
        assert result["error"] is None
        await tls.send_all(f'{{"method":"rm.open","params":{{"ch":1,"peer":"{RIG_ADDRESS}"}}}}\n'.encode())
        with trio.fail_after(20):
            await pool.arrived.wait()
        header = pool.headers[0]
        assert not header.local and header.source == parse_address(RIG_ADDRESS)
        assert header.destination == (LOCALHOST, pool_port)
        assert any(f"proxy {format_address(*PROXY_ADDRESS)} connected" in r.getMessage() for r in caplog.records)
        await tls.aclose()
        nursery.cancel_scope.cancel()


async def test_a_balancer_without_a_header_is_refused_and_others_need_none(
    pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        pool_listeners = await nursery.start(functools.partial(trio.serve_tcp, lambda s: s.receive_some(1), 0, host=LOCALHOST))
        pool_port = pool_listeners[0].socket.getsockname()[1]
        url = parse_upstream_url(f"stratum+tcp://{LOCALHOST}:{pool_port}")
        strict = SidecarServer(url, pki.server_context(), udp=False, proxy_protocol_from=TrustedBalancers(["127.0.0.1"]))
        port = await nursery.start(strict.serve, LOCALHOST, 0)
        tcp = await trio.open_tcp_stream(LOCALHOST, port)
        tls = trio.SSLStream(tcp, pki.client_context(), server_hostname=LOCALHOST)
        with pytest.raises(trio.BrokenResourceError):  # straight TLS from the balancer's address
            await tls.do_handshake()
        assert strict.statistics().refusals == {"proxy protocol": 1}
        # A sidecar trusting another network takes the same connection as it is.
        other = SidecarServer(url, pki.server_context(), udp=False, proxy_protocol_from=TrustedBalancers(["10.9.0.0/16"]))
        other_port = await nursery.start(other.serve, LOCALHOST, 0)
        tcp = await trio.open_tcp_stream(LOCALHOST, other_port)
        tls = trio.SSLStream(tcp, pki.client_context(), server_hostname=LOCALHOST)
        assert (await hello(tls, LineBuffer()))["error"] is None
        # A LOCAL header (the balancer's health check) keeps the balancer's address.
        tcp = await trio.open_tcp_stream(LOCALHOST, port)
        await tcp.send_all(build_proxy_header(None, None))
        tls = trio.SSLStream(tcp, pki.client_context(), server_hostname=LOCALHOST)
        assert (await hello(tls, LineBuffer()))["error"] is None
        nursery.cancel_scope.cancel()


def test_trusted_balancers_parse_and_match() -> None:
    from bridge.errors import ConfigError

    trusted = TrustedBalancers(["10.0.0.0/24", "2001:db8::1"])
    assert trusted.covers("10.0.0.200") and trusted.covers("::ffff:10.0.0.3") and trusted.covers("2001:db8::1")
    assert not trusted.covers("10.0.1.1") and not trusted.covers("garbage")
    assert not TrustedBalancers([])
    with pytest.raises(ConfigError, match="not an address or network"):
        TrustedBalancers(["10.0.0.0/33"])
    assert parse_address("[2001:db8::2]:5") == ("2001:db8::2", 5) and parse_address("rig.local:1") is None
