"""Small trio helpers for TCP and TLS streams, shared by every role."""

from __future__ import annotations

import socket
import ssl
import struct

import trio


def tune_stream(stream: trio.abc.Stream) -> None:
    """TCP_NODELAY on a (possibly TLS-wrapped) socket stream.

    Without it the first reply after a handshake can stall ~40 ms behind Nagle
    and delayed ACKs, which is share latency for nothing.
    """
    inner = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    if isinstance(inner, trio.SocketStream):
        try:
            inner.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        except OSError:
            pass


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    inner = stream
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    return inner.socket if isinstance(inner, trio.SocketStream) else None


def peer_name(stream: trio.abc.Stream) -> str:
    sock = socket_of(stream)
    if sock is None:
        return "?"
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reset(stream: trio.abc.Stream) -> None:
    """Make the next close send a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = socket_of(stream)
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


async def open_stream(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 10.0,
    proxy_header: bool = False,
    proxy_source: tuple[str, int] | None = None,
) -> trio.abc.Stream:
    """Connect (and run the TLS handshake when a context is given) within ``timeout``.

    ``proxy_header`` sends a PROXY protocol v2 header first (before TLS): naming
    ``proxy_source`` as the client and the address connected to as the server, or a
    LOCAL header (no address) when ``proxy_source`` is None.
    Raises ``OSError`` with a message naming the address on failure or timeout.
    """
    with trio.move_on_after(timeout) as scope:
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        tune_stream(stream)
        if proxy_header:
            from bridge.wire.proxy_header import build_proxy_header

            sock = socket_of(stream)
            destination = sock.getpeername()[:2] if sock is not None and proxy_source is not None else None
            source = proxy_source if destination is not None else None
            try:
                await stream.send_all(build_proxy_header(source, destination))
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        if ssl_context is not None:
            tls = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname or host, https_compatible=False)
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            stream = tls
        return stream
    assert scope.cancelled_caught
    raise OSError(f"connecting to {host}:{port} timed out after {timeout:g} s")


async def close_quietly(stream: trio.abc.Stream | None) -> None:
    if stream is not None:
        try:
            await trio.aclose_forcefully(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def describe_error(exc: BaseException) -> str:
    """A one-line account of a network error, including the TLS reason trio wraps."""
    parts = []
    while exc is not None and len(parts) < 3:
        text = str(exc) or type(exc).__name__
        if text not in parts:
            parts.append(text)
        exc = exc.__cause__ or exc.__context__
    return ": ".join(parts)
