"""PROXY protocol version 2 (HAProxy's binary header), sans-IO: a parser and a builder.

A TCP balancer in front of several sidecars (HAProxy in ``mode tcp``, a cloud load
balancer) hides each proxy's address behind its own; with ``send-proxy-v2`` it
prefixes every connection it opens toward a sidecar with a small binary header
that names the real source and destination. The sidecar reads it before the TLS
handshake (``--proxy-protocol-from``), and can itself prefix each pool connection
with one naming the rig (``--proxy-protocol-to-pool``) for pool software that reads it.

Format (HAProxy's ``proxy-protocol.txt``, section 2.2), all integers big-endian::

    0   12 bytes  signature  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
    12  1 byte    version (high nibble, must be 2) | command (low nibble: 0 LOCAL, 1 PROXY)
    13  1 byte    address family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX)
                  | transport (low: 0 UNSPEC, 1 STREAM, 2 DGRAM)
    14  2 bytes   length of what follows (addresses, then TLVs)
    16  ...       INET:  src addr (4), dst addr (4), src port (2), dst port (2)   = 12
                  INET6: src addr (16), dst addr (16), src port (2), dst port (2) = 36
                  UNIX:  src path (108), dst path (108)                           = 216
                  then TLVs: type (1), length (2), value

Rules this module keeps:

- **Bounded.** The header is at most 16 + 65535 bytes by construction; the parser
  also refuses a declared length above ``max_length`` (default 1024, far more than
  addresses and the usual TLVs) before it waits for the bytes, so a hostile peer
  cannot make the receiver buffer 64 KiB per connection.
- **Decided early.** :meth:`ProxyHeaderParser.receive_data` reports a non-PROXY
  peer as soon as the first bytes disagree with the signature (a TLS ClientHello
  starts with 0x16), not after a timeout.
- **LOCAL** (health checks from the balancer itself) carries no address: the
  connection's own addresses stand. **UNSPEC** family likewise.
- Unknown TLVs are skipped; a TLV that overruns the header is an error; a CRC32C
  TLV is not verified (HAProxy does not send one by default).

The parser is fed bytes and returns a :class:`ProxyHeader` once complete, plus the
bytes that followed it (the start of the real stream: the TLS ClientHello).
"""

from __future__ import annotations

import ipaddress
import struct

from msgspec import Struct

__all__ = [
    "SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderParser",
    "build_proxy_header",
    "parse_proxy_header",
]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_FIXED = 16
DEFAULT_MAX_LENGTH = 1024
"""Largest ``len`` field accepted by default: addresses (at most 216) and a few TLVs."""

COMMAND_LOCAL = 0x0
COMMAND_PROXY = 0x1
FAMILY_UNSPEC = 0x0
FAMILY_INET = 0x1
FAMILY_INET6 = 0x2
FAMILY_UNIX = 0x3
TRANSPORT_UNSPEC = 0x0
TRANSPORT_STREAM = 0x1
TRANSPORT_DGRAM = 0x2
_ADDRESS_LENGTH = {FAMILY_UNSPEC: 0, FAMILY_INET: 12, FAMILY_INET6: 36, FAMILY_UNIX: 216}
_UNIX_PATH = 108


class ProxyHeaderError(ValueError):
    """The peer's bytes are not a valid PROXY v2 header; close the connection."""


class ProxyHeader(Struct, frozen=True, kw_only=True):
    """A parsed header.

    ``local`` True (command LOCAL, or family UNSPEC): the sender vouches for no
    address; the connection's own addresses stand. Otherwise ``source`` and
    ``destination`` are ``(host, port)`` (port 0 for UNIX paths). ``tlvs`` keeps the
    type-length-value entries as ``(type, value)`` pairs in order.
    """

    local: bool
    family: int = FAMILY_UNSPEC
    transport: int = TRANSPORT_UNSPEC
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def size(self) -> int:
        """Bytes the header took on the wire."""
        return HEADER_FIXED + _ADDRESS_LENGTH[self.family] + sum(3 + len(value) for _, value in self.tlvs)


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "replace")


def _decode_body(command: int, family: int, transport: int, body: bytes) -> ProxyHeader:
    needed = _ADDRESS_LENGTH.get(family)
    if needed is None:
        raise ProxyHeaderError(f"PROXY v2 header with unknown address family {family}")
    if transport > TRANSPORT_DGRAM:
        raise ProxyHeaderError(f"PROXY v2 header with unknown transport {transport}")
    if len(body) < needed:
        raise ProxyHeaderError(f"PROXY v2 header too short for its addresses: {len(body)} < {needed} bytes")
    source = destination = None
    if family == FAMILY_INET:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
        source = (str(ipaddress.IPv4Address(src)), sport)
        destination = (str(ipaddress.IPv4Address(dst)), dport)
    elif family == FAMILY_INET6:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
        source = (str(ipaddress.IPv6Address(src)), sport)
        destination = (str(ipaddress.IPv6Address(dst)), dport)
    elif family == FAMILY_UNIX:
        source = (_unix_path(body[:_UNIX_PATH]), 0)
        destination = (_unix_path(body[_UNIX_PATH:needed]), 0)
    tlvs: list[tuple[int, bytes]] = []
    offset = needed
    while offset < len(body):
        if offset + 3 > len(body):
            raise ProxyHeaderError("PROXY v2 header ends inside a TLV's type and length")
        kind, length = struct.unpack_from("!BH", body, offset)
        offset += 3
        if offset + length > len(body):
            raise ProxyHeaderError(f"PROXY v2 TLV type 0x{kind:02x} of {length} bytes overruns the header")
        tlvs.append((kind, body[offset : offset + length]))
        offset += length
    local = command == COMMAND_LOCAL or family == FAMILY_UNSPEC
    return ProxyHeader(
        local=local,
        family=family,
        transport=transport,
        source=None if local else source,
        destination=None if local else destination,
        tlvs=tuple(tlvs),
    )


class ProxyHeaderParser:
    """Feed bytes until a header is complete.

    :meth:`receive_data` returns None while more bytes are needed, or the
    :class:`ProxyHeader` once it is complete; :attr:`rest` then holds the bytes that
    followed it. Raises :class:`ProxyHeaderError` as soon as the bytes cannot be a
    valid header (wrong signature, version, command, family, oversized length).
    At most ``HEADER_FIXED + max_length`` bytes are ever held.
    """

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        if not 0 <= max_length <= 0xFFFF:
            raise ValueError("max_length is a 16-bit length")
        self.max_length = max_length
        self._buffer = bytearray()
        self.rest = b""
        self.header: ProxyHeader | None = None

    def bytes_needed(self) -> int:
        """How many more bytes at least complete the header (or its fixed part).

        A driver that reads at most this many bytes at a time never reads past the
        header, so the stream after it needs no re-injection.
        """
        buffer = self._buffer
        if self.header is not None:
            return 0
        if len(buffer) < HEADER_FIXED:
            return HEADER_FIXED - len(buffer)
        length: int = struct.unpack_from("!H", buffer, HEADER_FIXED - 2)[0]
        return max(1, HEADER_FIXED + length - len(buffer))

    def receive_data(self, data: bytes) -> ProxyHeader | None:
        if self.header is not None:
            raise RuntimeError("the header is complete; the stream's bytes are in .rest")
        buffer = self._buffer
        buffer += data
        prefix = bytes(buffer[: len(SIGNATURE)])
        if not SIGNATURE.startswith(prefix):
            raise ProxyHeaderError(
                "the connection does not start with a PROXY v2 header; configure the balancer with "
                "send-proxy-v2, or remove this address from --proxy-protocol-from"
            )
        if len(buffer) < HEADER_FIXED:
            return None
        version_command, family_transport, length = struct.unpack_from("!BBH", buffer, len(SIGNATURE))
        if version_command >> 4 != 2:
            raise ProxyHeaderError(f"PROXY header of version {version_command >> 4}; only version 2 is spoken")
        command = version_command & 0x0F
        if command not in (COMMAND_LOCAL, COMMAND_PROXY):
            raise ProxyHeaderError(f"PROXY v2 header with unknown command {command}")
        if length > self.max_length:
            raise ProxyHeaderError(f"PROXY v2 header declares {length} bytes, more than the {self.max_length} allowed")
        total = HEADER_FIXED + length
        if len(buffer) < total:
            return None
        header = _decode_body(command, family_transport >> 4, family_transport & 0x0F, bytes(buffer[HEADER_FIXED:total]))
        self.rest = bytes(buffer[total:])
        buffer.clear()
        self.header = header
        return header


def parse_proxy_header(data: bytes, max_length: int = DEFAULT_MAX_LENGTH) -> tuple[ProxyHeader, bytes]:
    """Parse a complete header at the start of ``data``; return it and the bytes after it."""
    parser = ProxyHeaderParser(max_length)
    header = parser.receive_data(data)
    if header is None:
        raise ProxyHeaderError("PROXY v2 header incomplete")
    return header, parser.rest


def build_proxy_header(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    transport: int = TRANSPORT_STREAM,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """The header for a connection from ``source`` to ``destination``.

    Both None builds a LOCAL header (no addresses). An IPv4 and an IPv6 address
    together are sent as IPv6 (the IPv4 one mapped), as the spec's families require
    both addresses of one family.
    """
    body = bytearray()
    if source is None and destination is None:
        version_command, family_transport = 0x20 | COMMAND_LOCAL, 0x00
    else:
        if source is None or destination is None:
            raise ValueError("give both source and destination, or neither (LOCAL)")
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        for port in (source[1], destination[1]):
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"port {port} out of range")
        if src.version == 4 and dst.version == 4:
            family = FAMILY_INET
            body += struct.pack("!4s4sHH", src.packed, dst.packed, source[1], destination[1])
        else:
            family = FAMILY_INET6

            def as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
                return (ipaddress.IPv6Address(f"::ffff:{address}") if address.version == 4 else address).packed

            body += struct.pack("!16s16sHH", as_v6(src), as_v6(dst), source[1], destination[1])
        version_command, family_transport = 0x20 | COMMAND_PROXY, (family << 4) | transport
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError("a TLV type is one byte and its value at most 65535 bytes")
        body += struct.pack("!BH", kind, len(value)) + value
    if len(body) > 0xFFFF:
        raise ValueError("PROXY v2 header body over 65535 bytes")
    return SIGNATURE + struct.pack("!BBH", version_command, family_transport, len(body)) + bytes(body)
