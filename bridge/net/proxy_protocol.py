"""PROXY protocol v2 in the drivers: which peers may send it, reading it off a stream.

The format lives in :mod:`bridge.wire.proxy_header` (sans-IO). Here:

- :class:`TrustedBalancers` is ``--proxy-protocol-from``: the networks whose
  connections must start with a header. A connection from anywhere else is taken
  as it is (a header from it would simply fail the TLS handshake), so no peer can
  forge its address by sending a header itself.
- :func:`read_proxy_header` reads exactly the header's bytes (never past them, so
  the TLS handshake that follows reads the stream untouched), within a timeout.
- :func:`format_address` and :func:`parse_address` convert ``host:port`` texts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import trio

from bridge.errors import ConfigError
from bridge.wire.proxy_header import ProxyHeader, ProxyHeaderError, ProxyHeaderParser

__all__ = ["TrustedBalancers", "format_address", "parse_address", "read_proxy_header"]


class TrustedBalancers:
    """The networks (``--proxy-protocol-from CIDR``, repeatable) that front this server."""

    def __init__(self, networks: Iterable[str]) -> None:
        parsed = []
        for text in networks:
            try:
                parsed.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                raise ConfigError(
                    f"--proxy-protocol-from {text!r} is not an address or network; write e.g. 10.0.0.5 or 10.0.0.0/24"
                ) from None
        self.networks = tuple(parsed)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __str__(self) -> str:
        return ", ".join(str(network) for network in self.networks)

    def covers(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


async def read_proxy_header(stream: trio.abc.ReceiveStream, timeout: float) -> ProxyHeader:
    """Read one PROXY v2 header, exactly its bytes; ProxyHeaderError if it is not one or is late."""
    parser = ProxyHeaderParser()
    with trio.move_on_after(timeout):
        while True:
            try:
                data = await stream.receive_some(parser.bytes_needed())
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ProxyHeaderError(f"connection lost before its PROXY v2 header: {exc}") from None
            if not data:
                raise ProxyHeaderError("connection closed before its PROXY v2 header was complete")
            header = parser.receive_data(data)
            if header is not None:
                return header
    raise ProxyHeaderError(f"no complete PROXY v2 header within {timeout:g} s")


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int] | None:
    """``1.2.3.4:5`` or ``[v6]:5`` to (host, port) with a literal IP; None otherwise."""
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        return None
    return (host, number) if 0 <= number <= 65535 else None
