"""The pool-side sidecar's trio driver: TLS control listener, one UDP socket, pool connections.

Everything protocol-shaped happens in :class:`~bridge.relay.sidecar.SidecarSession`;
this module accepts connections, moves bytes, keeps time and closes sockets.

Theory of operation
===================

:class:`SidecarServer` listens on one TCP port for proxies (TLS 1.3, client
certificate required: the context comes from :func:`bridge.pki.tls.server_context`)
and binds **one** UDP socket, on the same port number unless told otherwise, for
the share datagrams of every proxy.

UDP routing: one :class:`~bridge.relay.sidecar.SidecarIntake` (one
:class:`~bridge.wire.receiver.DatagramReceiver`) serves all sessions. Each session
registers its key epochs in it with itself as the key, so the conn_id of a datagram
finds its session in one dict lookup inside the cheapest-first pipeline, and drops
of datagrams that belong to nobody (unknown conn_id, bad version ...) are counted
once, in one place, without touching any session. One task reads the socket and
feeds the intake; the session that a datagram concerned is woken.

Per control connection, one nursery holds:

- the **reader**: control bytes into the session;
- the **pump**: the only writer of the control stream and the only sender of the
  session's datagrams. It waits for a wake-up or the session's next deadline
  (verdict and notify batches of ``batch_window``, about 2 ms; heartbeats; liveness;
  rekeying), calls ``on_timer`` when due, and writes whatever the session queued;
  lines that pile up while a write is in progress go out together in the next one;
- one **pool task per channel**, started on the session's ``OpenPool``: a plain TCP
  connection (``TCP_NODELAY``; TLS for ``stratum+ssl://`` pools) to the pool software,
  with a reader feeding the session and a writer draining the channel's bounded
  buffer, so a slow pool never blocks the UDP reader or other channels.

After every input the driver carries out the session's commands at once
(``WritePool`` appends to the channel's buffer and wakes its writer), so a share
that arrives in a datagram is on its way to the pool before the next datagram is
read.

Certificates: the TLS handshake itself refuses clients without a certificate of
the configured CA. After it, the peer must present a *miner* certificate; with a
revocation list it must not be revoked (checked after every handshake, resumed
ones included, and again whenever the list changes), and its accounts are the
only ones the proxy may authorize, unless ``enforce_accounts`` is off.

Logging goes to ``bridge.sidecar``: proxies connecting (with the certificate's
name and accounts) and leaving, channels opening and closing at info; failed
handshakes, pool connection failures and protocol errors (with what to do) at
warning.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import trio
from msgspec import Struct

from bridge.config import UpstreamURL
from bridge.errors import PKIError
from bridge.net.tcp import (
    close_quietly,
    describe_error,
    open_stream,
    peer_name,
    tune_stream,
)
from bridge.pki.identity import CertificateIdentity, check_validity
from bridge.pki.revocation import RevocationList
from bridge.pki.tls import check_miner_peer, peer_identity
from bridge.relay.sidecar import (
    DEFAULT_BATCH_WINDOW,
    DEFAULT_DEAD_AFTER,
    DEFAULT_HEARTBEAT,
    DEFAULT_REKEY_INTERVAL,
    ClosePool,
    OpenPool,
    SidecarIntake,
    SidecarSession,
    SidecarSessionStatistics,
    WritePool,
)
from bridge.wire.receiver import DEFAULT_BURST, DEFAULT_GRACE, DEFAULT_RATE

__all__ = ["SidecarServer", "SidecarStatistics"]

log = logging.getLogger("bridge.sidecar")

CONTROL_RECEIVE_SIZE = 65536
POOL_RECEIVE_SIZE = 65536
#: Larger than any valid datagram (1200), so an oversized one is seen as such.
DATAGRAM_RECEIVE_SIZE = 2048
#: Bytes for one pool that it has not taken yet; beyond that the pool is stuck.
MAX_POOL_BACKLOG = 4 * 1024 * 1024
#: How long the last lines (rm.error, final verdicts) may take to go out on close.
CLOSE_FLUSH_TIMEOUT = 1.0
HOUSEKEEPING_INTERVAL = 1.0
_UDP_BIND_ATTEMPTS = 8
_SUMMED = (
    "channels_opened",
    "shares_udp",
    "shares_tls",
    "shares_forwarded",
    "duplicates_from_cache",
    "duplicates_joined",
    "shares_refused",
    "accepted",
    "rejected",
    "verdicts_udp",
    "verdicts_tls",
    "notify_lines_saved",
    "probe_acks_sent",
    "control_bytes_received",
    "control_bytes_sent",
    "pool_bytes_received",
    "pool_bytes_sent",
)


class SidecarStatistics(Struct, frozen=True):
    """Counters over every control connection so far, open ones included."""

    sessions_active: int
    sessions_total: int
    handshake_failures: int
    certificate_refusals: int
    closed_by_reason: dict[str, int]
    channels_open: int
    channels_opened: int
    pool_connect_failures: int
    shares_udp: int
    shares_tls: int
    shares_forwarded: int
    duplicates_from_cache: int
    duplicates_joined: int
    shares_refused: int
    accepted: int
    rejected: int
    verdicts_udp: int
    verdicts_tls: int
    notify_lines_saved: int
    probe_acks_sent: int
    control_bytes_received: int
    control_bytes_sent: int
    pool_bytes_received: int
    pool_bytes_sent: int
    datagrams_received: int
    datagrams_accepted: int
    datagram_drops: dict[str, int]
    """Every drop reason of the shared UDP pipeline, zeros included."""


class SidecarServer:
    """Terminates StratumRM for proxies and opens one SV1 connection to ``pool`` per channel.

    ``ssl_context`` is the control channel's server context (mutual TLS 1.3).
    ``udp_port`` None binds UDP on the TCP port's number; ``udp`` False offers no
    UDP at all (shares then come over TLS). ``advertise_host``/``advertise_port``
    go into the hello result instead of the bound port and the host the proxy
    dialled (for a sidecar behind NAT).
    """

    def __init__(
        self,
        pool: UpstreamURL,
        ssl_context: ssl.SSLContext,
        *,
        pool_ssl_context: ssl.SSLContext | None = None,
        udp: bool = True,
        udp_port: int | None = None,
        advertise_host: str | None = None,
        advertise_port: int | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        dead_after: float = DEFAULT_DEAD_AFTER,
        rekey_interval: float | None = DEFAULT_REKEY_INTERVAL,
        key_grace: float = DEFAULT_GRACE,
        batch_window: float = DEFAULT_BATCH_WINDOW,
        udp_rate: float = DEFAULT_RATE,
        udp_burst: float = DEFAULT_BURST,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        enforce_accounts: bool = True,
        revocations: RevocationList | None = None,
    ) -> None:
        if pool.transport == "stratumrm":
            raise ValueError("the sidecar's pool is plain Stratum V1: stratum+tcp:// or stratum+ssl://")
        if pool.tls and pool_ssl_context is None:
            raise ValueError(f"{pool} needs a TLS context (public_client_context)")
        self.pool = pool
        self.ssl_context = ssl_context
        self.pool_ssl_context = pool_ssl_context if pool.tls else None
        self.udp = udp
        self.requested_udp_port = udp_port
        self.advertise_host = advertise_host
        self.advertise_port = advertise_port
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.rekey_interval = rekey_interval
        self.batch_window = batch_window
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.enforce_accounts = enforce_accounts
        self.revocations = revocations
        self.intake = SidecarIntake(rate=udp_rate, burst=udp_burst, grace=key_grace)
        self.port: int | None = None
        self.udp_port: int | None = None
        self._udp_socket: trio.socket.SocketType | None = None
        self._connections: dict[SidecarSession, _ProxyConnection] = {}
        self._sessions_total = 0
        self._handshake_failures = 0
        self._certificate_refusals = 0
        self._pool_connect_failures = 0
        self._closed: Counter[str] = Counter()
        self._finished: Counter[str] = Counter()

    # ------------------------------------------------------------------ serving

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host:port`` (0: any free port) until cancelled; reports the TCP port."""
        listeners, udp_socket = await self._bind(host, port)
        self.port = listeners[0].socket.getsockname()[1]
        if udp_socket is not None:
            self._udp_socket = udp_socket
            self.udp_port = udp_socket.getsockname()[1]
        log.info(
            "sidecar listening on %s:%d (TLS control%s), pool %s",
            host,
            self.port,
            f", UDP shares on port {self.udp_port}" if self.udp_port is not None else ", no UDP",
            self.pool,
        )
        try:
            async with trio.open_nursery() as nursery:
                if udp_socket is not None:
                    nursery.start_soon(self._receive_datagrams, udp_socket)
                nursery.start_soon(self._housekeeping)
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started(self.port)
        finally:
            if udp_socket is not None:
                udp_socket.close()

    async def _bind(
        self, host: str, port: int
    ) -> tuple[list[trio.SocketListener], trio.socket.SocketType | None]:
        """The TCP listener and the UDP socket (same port number unless configured)."""
        for _attempt in range(_UDP_BIND_ATTEMPTS):
            listeners = await trio.open_tcp_listeners(port, host=host or None)
            if len(listeners) > 1:  # several addresses: keep one port
                for extra in listeners[1:]:
                    await extra.aclose()
                listeners = listeners[:1]
            if not self.udp:
                return listeners, None
            tcp_port = listeners[0].socket.getsockname()[1]
            udp_port = self.requested_udp_port if self.requested_udp_port is not None else tcp_port
            try:
                return listeners, await _bind_udp(host, udp_port)
            except OSError as exc:
                for listener in listeners:
                    await listener.aclose()
                # An ephemeral TCP port whose number is taken on UDP: try another.
                if port != 0 or self.requested_udp_port is not None:
                    raise OSError(f"cannot bind UDP port {udp_port} on {host}: {exc}") from None
        raise OSError(f"no port number free on both TCP and UDP after {_UDP_BIND_ATTEMPTS} attempts")

    async def _receive_datagrams(self, udp_socket: trio.socket.SocketType) -> None:
        intake = self.intake
        connections = self._connections
        while True:
            try:
                data, address = await udp_socket.recvfrom(DATAGRAM_RECEIVE_SIZE)
            except OSError:
                continue  # e.g. ICMP port unreachable reported on a later receive
            session = intake.receive(data, address, trio.current_time())
            if session is not None:
                connection = connections.get(session)
                if connection is not None:
                    connection.step()

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(HOUSEKEEPING_INTERVAL)
            self.intake.purge(trio.current_time())
            revocations = self.revocations
            if revocations is None:
                continue
            try:
                changed = revocations.reload_if_changed()
            except PKIError as exc:
                log.warning("revocation list not reloaded: %s", exc)
                continue
            if changed:
                log.info("revocation list reloaded: %d revoked certificates", len(revocations))
                for connection in list(self._connections.values()):
                    identity = connection.identity
                    if revocations.is_revoked(identity.serial):
                        log.warning("closing the session of %s: the certificate was revoked", identity.describe())
                        connection.session.close(f"{identity.describe()} was revoked", trio.current_time())
                        connection.step()

    async def _handle(self, tcp: trio.SocketStream) -> None:
        tune_stream(tcp)
        peer = peer_name(tcp)
        tls = trio.SSLStream(tcp, self.ssl_context, server_side=True)
        try:
            identity = await self._handshake(tls, peer)
            if identity is None:
                return
            connection = _ProxyConnection(self, tls, peer, identity)
            self._connections[connection.session] = connection
            self._sessions_total += 1
            accounts = ", ".join(identity.accounts) or "none"
            log.info("proxy %s connected: %s, accounts %s", peer, identity.describe(), accounts)
            try:
                reason = await connection.run()
            except Exception:
                # A bug must not take the other proxies' sessions down with this one.
                log.exception("proxy %s (%s): internal error, closing this connection", peer, identity.name)
                reason = "internal error"
            finally:
                del self._connections[connection.session]
                connection.session.connection_lost("connection closed", trio.current_time())
                self._account_finished(connection.session)
            self._closed[reason.split(":", 1)[0]] += 1
            stats = connection.session.statistics()
            if connection.session.protocol_error is not None:
                log.warning(
                    "proxy %s (%s) sent a malformed control line: %s; connection closed. "
                    "Check that the proxy runs a StratumRM version this sidecar speaks (1); "
                    "other proxies are not affected",
                    peer, identity.name, connection.session.protocol_error,
                )
            log.info(
                "proxy %s (%s) disconnected: %s; %d channels, %d shares forwarded (%d UDP, %d TLS), "
                "%d duplicates answered from cache",
                peer, identity.name, reason, stats.channels_opened, stats.shares_forwarded,
                stats.shares_udp, stats.shares_tls, stats.duplicates_from_cache + stats.duplicates_joined,
            )
        finally:
            await close_quietly(tls)

    async def _handshake(self, tls: trio.SSLStream, peer: str) -> CertificateIdentity | None:
        """Run the TLS handshake and check the certificate; None (logged, counted) if refused."""
        with trio.move_on_after(self.handshake_timeout) as scope:
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._handshake_failures += 1
                log.warning(
                    "TLS handshake with %s failed: %s; a proxy needs a certificate issued by this "
                    "sidecar's CA (`stratumrm pki issue-miner NAME --account ACCOUNT`)",
                    peer, describe_error(exc),
                )
                return None
        if scope.cancelled_caught:
            self._handshake_failures += 1
            log.warning("TLS handshake with %s timed out after %g s", peer, self.handshake_timeout)
            return None
        try:
            if self.revocations is not None:
                identity = check_miner_peer(tls, self.revocations, now=datetime.now(UTC))
            else:
                # A resumed TLS 1.3 session skips OpenSSL's checks: repeat role and validity.
                identity = peer_identity(tls)
                if identity.role != "miner":
                    raise PKIError(
                        f"the peer presented a {identity.role} certificate ({identity.name!r}), "
                        "not a miner certificate; issue one with `stratumrm pki issue-miner`"
                    )
                check_validity(identity, now=datetime.now(UTC))
        except PKIError as exc:
            self._certificate_refusals += 1
            log.warning("refusing %s: %s", peer, exc)
            return None
        return identity

    def _account_finished(self, session: SidecarSession) -> None:
        stats = session.statistics()
        finished = self._finished
        for name in _SUMMED:
            finished[name] += getattr(stats, name)

    # ------------------------------------------------------------------ statistics

    def statistics(self) -> SidecarStatistics:
        """Counters over every control connection so far, open ones included."""
        totals: Counter[str] = Counter(self._finished)
        live: list[SidecarSessionStatistics] = [c.session.statistics() for c in self._connections.values()]
        for stats in live:
            for name in _SUMMED:
                totals[name] += getattr(stats, name)
        udp = self.intake.statistics()
        return SidecarStatistics(
            sessions_active=len(self._connections),
            sessions_total=self._sessions_total,
            handshake_failures=self._handshake_failures,
            certificate_refusals=self._certificate_refusals,
            closed_by_reason=dict(self._closed),
            channels_open=sum(s.channels_open for s in live),
            pool_connect_failures=self._pool_connect_failures,
            datagrams_received=udp.datagrams,
            datagrams_accepted=udp.accepted,
            datagram_drops=dict(udp.dropped),
            **{name: totals[name] for name in _SUMMED},
        )

    def sessions(self) -> list[SidecarSession]:
        """The live sessions (for tests and the dashboard)."""
        return list(self._connections)


async def _bind_udp(host: str, port: int) -> trio.socket.SocketType:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    udp_socket = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        await udp_socket.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    except OSError:
        udp_socket.close()
        raise
    return udp_socket


class _PoolLink:
    """One channel's pool connection: its stream, its unsent bytes and its task's scope."""

    __slots__ = ("buffer", "cancel_scope", "ch", "rig", "stream", "wake")

    def __init__(self, ch: int, rig: str) -> None:
        self.ch = ch
        self.rig = rig or "?"
        self.stream: trio.abc.Stream | None = None
        self.buffer = bytearray()
        self.wake = trio.Event()
        self.cancel_scope = trio.CancelScope()

    def write(self, data: bytes) -> bool:
        """Queue bytes for the pool; False when the pool has not taken MAX_POOL_BACKLOG bytes."""
        if len(self.buffer) + len(data) > MAX_POOL_BACKLOG:
            return False
        self.buffer += data
        self.wake.set()
        return True


class _ProxyConnection:
    """The tasks of one proxy's control connection."""

    def __init__(self, server: SidecarServer, stream: trio.SSLStream, peer: str, identity: CertificateIdentity) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.identity = identity
        udp = server.udp_port is not None
        self.session = SidecarSession(
            now=trio.current_time(),
            intake=server.intake if udp else None,
            udp_port=(server.advertise_port or server.udp_port) if udp else None,
            udp_host=server.advertise_host,
            heartbeat=server.heartbeat,
            dead_after=server.dead_after,
            rekey_interval=server.rekey_interval,
            batch_window=server.batch_window,
            accounts=identity.accounts if server.enforce_accounts else None,
        )
        self._links: dict[int, _PoolLink] = {}
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def run(self) -> str:
        """Serve until the session closes; return why."""
        session = self.session
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._read_control)
            await self._pump()  # returns once the session is closed and its last lines are out
            nursery.cancel_scope.cancel()
        return session.close_reason or "closed"

    def step(self) -> None:
        """After any input: carry out the session's pool commands and wake the pump."""
        session = self.session
        while True:
            commands = session.commands()
            if not commands:
                break
            for command in commands:
                if isinstance(command, WritePool):
                    link = self._links.get(command.ch)
                    if link is not None and not link.write(command.data):
                        reason = f"pool did not take {MAX_POOL_BACKLOG} bytes; it is stalled"
                        log.warning("proxy %s channel %d: %s", self.peer, command.ch, reason)
                        session.pool_closed(command.ch, reason, trio.current_time())
                elif isinstance(command, OpenPool):
                    link = _PoolLink(command.ch, command.peer)
                    self._links[command.ch] = link
                    assert self._nursery is not None
                    self._nursery.start_soon(self._run_pool, link)
                elif isinstance(command, ClosePool):
                    link = self._links.pop(command.ch, None)
                    if link is not None:
                        link.cancel_scope.cancel()
                        log.info("proxy %s channel %d closed: %s", self.peer, command.ch, command.reason)
        self._wake.set()

    # ------------------------------------------------------------------ control channel

    async def _read_control(self) -> None:
        session = self.session
        while not session.closed:
            try:
                data = await self.stream.receive_some(CONTROL_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                session.connection_lost(f"control connection error: {describe_error(exc)}", trio.current_time())
                self.step()
                return
            if not data:
                session.connection_lost("proxy closed the control connection", trio.current_time())
                self.step()
                return
            session.receive_data(data, trio.current_time())
            self.step()

    async def _pump(self) -> None:
        """Write control lines and datagrams; run the session's timers."""
        session = self.session
        udp_socket = self.server._udp_socket
        while True:
            self._wake = trio.Event()
            data = session.data_to_send()
            datagrams = session.datagrams_to_send()
            if session.closed:
                with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
                    if data:
                        await self._send_control(data)
                return
            if data and not await self._send_control(data):
                continue  # the session now knows the connection is lost
            if datagrams and udp_socket is not None:
                for datagram in datagrams:
                    try:
                        await udp_socket.sendto(datagram.data, datagram.address)
                    except OSError as exc:
                        log.debug("proxy %s: datagram to %s not sent: %s", self.peer, datagram.address, exc)
            deadline = session.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._wake.wait()
            now = trio.current_time()
            if deadline is not None and now >= deadline:
                session.on_timer(now)
                self.step()

    async def _send_control(self, data: bytes) -> bool:
        """Write to the proxy; a proxy that takes nothing for ``dead_after`` seconds is dead."""
        timeout = self.server.dead_after
        try:
            with trio.move_on_after(timeout) as scope:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.session.connection_lost(f"control connection error: {describe_error(exc)}", trio.current_time())
            self.step()
            return False
        if scope.cancelled_caught:
            self.session.connection_lost(f"proxy took no control data for {timeout:g} s", trio.current_time())
            self.step()
            return False
        return True

    # ------------------------------------------------------------------ pool connections

    async def _run_pool(self, link: _PoolLink) -> None:
        server = self.server
        session = self.session
        ch = link.ch
        with link.cancel_scope:
            try:
                try:
                    stream = await open_stream(
                        server.pool.host,
                        server.pool.port,
                        ssl_context=server.pool_ssl_context,
                        timeout=server.connect_timeout,
                    )
                except (OSError, trio.BrokenResourceError, ValueError) as exc:
                    server._pool_connect_failures += 1
                    reason = f"cannot connect to pool {server.pool}: {describe_error(exc)}"
                    log.warning("proxy %s channel %d: %s", self.peer, ch, reason)
                    session.pool_closed(ch, reason, trio.current_time())
                    self.step()
                    return
                link.stream = stream
                log.info("proxy %s channel %d opened for rig %s, pool connection to %s", self.peer, ch, link.rig, server.pool)
                session.pool_connected(ch, trio.current_time())
                self.step()
                reason = await self._carry(link, stream)
                if ch in session.channels:
                    log.warning("proxy %s channel %d: %s", self.peer, ch, reason)
                    session.pool_closed(ch, reason, trio.current_time())
                    self.step()
            finally:
                if self._links.get(ch) is link:
                    del self._links[ch]
                await close_quietly(link.stream)

    async def _carry(self, link: _PoolLink, stream: trio.abc.Stream) -> str:
        """Move bytes both ways until the pool connection ends; return why it ended."""
        session = self.session
        ch = link.ch
        reason = "pool closed the connection"

        async def read(cancel_scope: trio.CancelScope) -> None:
            nonlocal reason
            try:
                while True:
                    data = await stream.receive_some(POOL_RECEIVE_SIZE)
                    if not data:
                        reason = "pool closed the connection"
                        break
                    session.pool_data(ch, data, trio.current_time())
                    self.step()
                    if ch not in session.channels:
                        reason = "channel ended"
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                reason = f"pool connection error: {describe_error(exc)}"
            cancel_scope.cancel()

        async def write(cancel_scope: trio.CancelScope) -> None:
            nonlocal reason
            try:
                while True:
                    await link.wake.wait()
                    link.wake = trio.Event()
                    if link.buffer:
                        data = bytes(link.buffer)
                        link.buffer.clear()
                        await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                reason = f"pool connection error: {describe_error(exc)}"
            cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, nursery.cancel_scope)
            nursery.start_soon(write, nursery.cancel_scope)
        return reason
