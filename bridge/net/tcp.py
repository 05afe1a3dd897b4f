"""Small trio helpers for TCP and TLS streams, shared by every role."""

from __future__ import annotations

import errno
import fcntl
import math
import socket
import ssl
import struct
import termios
import time
from typing import Any

import trio

from bridge.relay.liveness import PeerSilence


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


def unread_bytes(stream: trio.abc.Stream | None) -> int:
    """Bytes the kernel holds for ``stream`` that nobody has read yet (FIONREAD); 0 if unknown.

    A liveness check asks it before declaring a peer silent: bytes waiting mean the
    peer spoke and this process is behind, so heartbeats never queue behind work.
    """
    sock = socket_of(stream) if stream is not None else None
    if sock is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0


_TCP_INFO_LAST_ACK_RECV = 56
"""Offset of ``tcpi_last_ack_recv`` (u32, milliseconds) in Linux's ``struct tcp_info``:
eight one-byte fields (``state ca_state retransmits probes backoff`` first), then ``rto
ato snd_mss rcv_mss unacked sacked lost retrans fackets last_data_sent last_ack_sent
last_data_recv``, then it."""


def peer_ack_age(stream: trio.abc.Stream | None) -> float | None:
    """Seconds since the peer's TCP last acknowledged anything this side sent (Linux
    ``TCP_INFO``); None if unknown.

    A liveness check asks it when the peer's process has been silent too long: a recent
    acknowledgement means its host is up and the path works, so the process is busy,
    not gone (a dead process resets the connection, a dead host or path stops acknowledging).

    A peer process that reads nothing fills its receive buffer; this side's TCP then
    sends window probes at growing intervals (0.2 s, 0.4 s, ... up to minutes) and the
    peer's kernel answers each. While the window is closed and its TCP answers the
    probes (``tcpi_backoff`` > 0, at most one ``tcpi_probes`` unanswered, no
    retransmission pending), the peer is there, so the age is 0: the gaps between
    probes are this side's choice, not the peer's silence. One probe may be pending (a
    kernel answers out-of-window segments at most twice a second, so a quick second
    probe can go unanswered); from the second unanswered probe the age counts from the
    last answer again, so a host that died during the stall is found one probe
    interval later.
    """
    sock = socket_of(stream) if stream is not None else None
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, ValueError):
        return None
    if len(info) < _TCP_INFO_LAST_ACK_RECV + 4:
        return None
    _state, _ca_state, retransmits, probes, backoff = struct.unpack_from("5B", info, 0)
    if backoff > 0 and probes <= 1 and retransmits == 0:
        return 0.0  # probing a closed window, and the peer answers the probes
    return struct.unpack_from("I", info, _TCP_INFO_LAST_ACK_RECV)[0] / 1000.0


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


#: How long a name's addresses are reused before it is resolved again (seconds).
RESOLVE_TTL = 30.0
_MAX_RESOLVED = 256
#: (family, type, protocol, socket address) of one resolved address.
Address = tuple[int, int, int, Any]
_resolved: dict[tuple[str, int], tuple[float, list[Address]]] = {}


async def _addresses(host: str, port: int) -> list[Address]:
    """``host``'s addresses for a TCP connection, from a cache of :data:`RESOLVE_TTL` seconds:
    a sidecar opens a pool connection per rig, thousands within seconds in a reconnect storm."""
    key = (host, port)
    now = time.monotonic()
    cached = _resolved.get(key)
    if cached is not None and now - cached[0] < RESOLVE_TTL:
        return cached[1]
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[Address] = [(family, kind, proto, address) for family, kind, proto, _name, address in infos]
    if len(_resolved) >= _MAX_RESOLVED:
        _resolved.clear()
    _resolved[key] = (now, addresses)
    return addresses


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host``: straight to its address when it has one (the usual
    pool or sidecar), or trio's happy eyeballs over several. About a third of the CPU of
    ``trio.open_tcp_stream`` for one address, which resolves every time and runs each
    attempt in a task of a nursery of its own."""
    addresses = await _addresses(host, port)
    if len(addresses) != 1:
        return await trio.open_tcp_stream(host, port)
    family, kind, proto, address = addresses[0]
    sock = trio.socket.socket(family, kind, proto)
    try:
        await sock.connect(address)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError):
            raise OSError(f"connecting to {host}:{port} failed: {exc.strerror or exc}") from exc
        raise
    return trio.SocketStream(sock)


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
        stream: trio.abc.Stream = await connect_tcp(host, port)
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


class WholeSends:
    """Sends that a cancellation does not cut in half.

    A TLS stream whose ``send_all`` was cancelled midway is broken for good
    (part of a record may have left), so it can no longer say goodbye: the peer
    then logs a broken link for what was a normal stop. Sends made through this
    run shielded; once the surrounding work is cancelled (:meth:`hurry`, or
    :meth:`hurry_when_cancelled` as a task in the same nursery), an unfinished
    send gets ``grace`` seconds more and is then cut.
    """

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._scope: trio.CancelScope | None = None
        self._cut_at = math.inf

    async def send_all(self, stream: trio.abc.SendStream, data: bytes) -> None:
        """``stream.send_all(data)``, whole; BrokenResourceError if it was cut after :meth:`hurry`."""
        with trio.CancelScope(shield=True, deadline=self._cut_at) as scope:
            self._scope = scope
            try:
                await stream.send_all(data)
            finally:
                self._scope = None
        if scope.cancelled_caught:
            raise trio.BrokenResourceError(f"a send was still unfinished {self.grace:g} s after the stop")

    def hurry(self) -> None:
        """From now on, sends (the one under way too) end within ``grace`` seconds."""
        self._cut_at = min(self._cut_at, trio.current_time() + self.grace)
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, self._cut_at)

    async def hurry_when_cancelled(self) -> None:
        """Sleep until cancelled, then :meth:`hurry` (run it beside the sending task)."""
        try:
            await trio.sleep_forever()
        finally:
            self.hurry()


class StalledSends:
    """Sends to a peer that must keep taking them: one that takes nothing for
    ``dead_after`` seconds is gone, unless its TCP still acknowledges (a busy peer, the
    rule of :class:`~bridge.relay.liveness.PeerSilence`), until its busy limit.

    A peer process too busy to read (a proxy starting thousands of rigs) fills its
    receive buffer and this side's send waits; its kernel still acknowledges, so the
    send gets more time. A hung process is cut at the busy limit, a dead host or path
    ``dead_after`` after its last acknowledgement. Run :meth:`watch` beside the sends.
    """

    def __init__(self, stream: trio.abc.Stream, dead_after: float) -> None:
        self.stream = stream
        self.dead_after = dead_after
        self._waiting: tuple[PeerSilence, trio.CancelScope] | None = None

    async def send_all(self, data: bytes) -> float | None:
        """``stream.send_all(data)``; None once sent, or the seconds the send waited before it was cut."""
        started = trio.current_time()
        taken = PeerSilence(self.dead_after, started)  # the peer's taking, judged like its silence
        with trio.CancelScope(deadline=taken.deadline()) as scope:
            self._waiting = (taken, scope)
            try:
                await self.stream.send_all(data)
            finally:
                self._waiting = None
        return trio.current_time() - started if scope.cancelled_caught else None

    async def watch(self) -> None:
        """While a send waits, ask the peer's TCP four times per ``dead_after``; a recent
        acknowledgement gives the send ``dead_after`` more (up to the busy limit)."""
        while True:
            await trio.sleep(self.dead_after / 4)
            if self._waiting is not None:
                taken, scope = self._waiting
                age = peer_ack_age(self.stream)
                if age is not None:
                    taken.acknowledged(age, trio.current_time())
                    scope.deadline = taken.deadline()


async def close_quietly(stream: trio.abc.Stream | None) -> None:
    """Close ``stream`` at once, without a goodbye and without raising.

    A plain TCP stream's socket is closed directly: what ``trio.aclose_forcefully``
    comes to for it, without the cancelled scope and the Cancelled exception raised and
    caught on the way (about a tenth of each role's CPU in a reconnect storm of
    thousands of rigs). A task still waiting on the socket gets ClosedResourceError.
    """
    if stream is None:
        return
    if type(stream) is trio.SocketStream:
        stream.socket.close()
        return
    try:
        await trio.aclose_forcefully(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


_ERRNO_WORDS = {
    errno.ECONNREFUSED: "connection refused (nothing listens there: is it running, is the port right?)",
    errno.ETIMEDOUT: "connection timed out (a firewall dropping packets, or the host is down)",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.ECONNRESET: "connection reset by the peer",
    errno.EPIPE: "connection closed by the peer",
}

_TLS_WORDS = {
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust this side's certificate: it is not from the peer's CA (wrong CA)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer refused this side's certificate as expired: renew it",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the peer refused this side's certificate as revoked",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused this side's certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused this side's certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate and none was sent",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection without a TLS goodbye (it stopped, or the link broke)",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS on that port (a plain Stratum port?)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer does not support TLS 1.3",
}


def _causes(exc: BaseException, depth: int = 0) -> list[BaseException]:
    """``exc`` and what it wraps (causes, contexts, exception-group members), outermost first."""
    if depth > 6:
        return []
    found = [exc]
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found += _causes(inner, depth + 1)
    inner = exc.__cause__ or exc.__context__
    if inner is not None and inner is not exc:
        found += _causes(inner, depth + 1)
    return found


def _plain_words(exc: BaseException) -> str | None:
    """What a person should read for one low-level error, or None to keep its own text."""
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve (check the spelling, DNS or /etc/hosts)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        if "expired" in message:
            return "the server's certificate has expired (ask its operator to renew it)"
        if "Hostname mismatch" in message or "IP address mismatch" in message:
            return (
                "the server's certificate does not name the address dialled (issue it with that name or "
                "address: `stratumrm pki issue-pool NAME --dns HOST --ip ADDRESS`)"
            )
        return (
            f"the server's certificate is not signed by a CA this side trusts (CERTIFICATE_VERIFY_FAILED: "
            f"{message}): wrong CA; for stratumrm:// both ends need certificates of the same StratumRM CA, "
            "for stratum+ssl:// pass the pool's CA with --upstream-ca"
        )
    if isinstance(exc, ssl.SSLError) and exc.reason in _TLS_WORDS:
        return _TLS_WORDS[exc.reason]
    if isinstance(exc, OSError) and exc.errno in _ERRNO_WORDS:
        return _ERRNO_WORDS[exc.errno]
    return None


def describe_error(exc: BaseException) -> str:
    """A one-line account of a network error in people's words, without trio's wrapping.

    A refused connection reads "connection refused (...)" once, not trio's "all attempts
    to connect to ... failed (1 sub-exception)"; TLS failures say which side refused what.
    """
    causes = _causes(exc)
    for cause in causes:
        words = _plain_words(cause)
        if words is not None:
            return words
    parts: list[str] = []
    for cause in causes[:3]:
        text = str(cause) or type(cause).__name__
        if isinstance(cause, BaseExceptionGroup) or text.startswith("all attempts to connect"):
            continue
        if text not in parts and not any(text in part for part in parts):
            parts.append(text)
    return ": ".join(parts) or type(exc).__name__
