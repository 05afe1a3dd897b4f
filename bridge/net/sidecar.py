"""The pool-side sidecar's trio driver: TLS control listener, one UDP socket, pool connections.

Everything protocol-shaped happens in :class:`~bridge.relay.sidecar.session.SidecarSession`;
this module accepts connections, moves bytes, keeps time and closes sockets.

Theory of operation
===================

:class:`SidecarServer` listens on one TCP port for proxies (TLS 1.3, client
certificate required: the context comes from :func:`bridge.pki.tls.server_context`)
and binds **one** UDP socket, on the same port number unless told otherwise, for
the share datagrams of every proxy.

UDP routing: one :class:`~bridge.relay.sidecar.intake.SidecarIntake` (one
:class:`~bridge.wire.receiver.DatagramReceiver`) serves all sessions. Each session
registers its key epochs in it with itself as the key, so the conn_id of a datagram
finds its session in one dict lookup inside the cheapest-first pipeline, and drops
of datagrams that belong to nobody (unknown conn_id, bad version ...) are counted
once, in one place, without touching any session. One task reads the socket and
feeds the intake; the session that a datagram concerned is woken.

Per control connection, one nursery holds:

- the **reader**: control bytes into the session;
- the **pump**: the only writer of the control stream. It waits for a wake-up or
  the session's next deadline (notify batches of ``batch_window``, about 2 ms;
  heartbeats; liveness; rekeying; ACKs), calls ``handle_timer`` when due, and writes
  the control lines the session queued; lines that pile up while a write is in
  progress go out together in the next one. It is woken only for control lines, a
  closed session or an earlier deadline: datagrams (verdicts) are sent after every
  input by whichever task fed the session (a UDP send never waits);
- one **pool task per channel**, started on the session's ``OpenPool``: a plain TCP
  connection (``TCP_NODELAY``; TLS for ``stratum+ssl://`` pools) to the pool software.
  The one task both reads (feeding the session) and drains the channel's bounded
  buffer. :meth:`_PoolLink.write` sends to an idle plain TCP connection at once, from
  the caller's task; otherwise it queues and interrupts the task's wait. A slow
  pool never blocks the UDP reader or other channels; one that takes none of its
  bytes for ``dead_after`` seconds has its channel closed as stalled. One task, no
  nursery and no event per rig: that is most of what a rig costs here;
- the **pool watch** (:mod:`bridge.net.pool_watch`): when a channel's pool
  connection ends or cannot be opened it checks the pool software, and while the
  pool is down it reconnects with backoff; every change goes to the proxies as
  ``rm.pool`` (PROTOCOL.md C10), so their failover can move rigs elsewhere.

After every input the driver carries out the session's commands at once
(``WritePool`` goes to the pool's socket, or to the channel's buffer and its task)
and sends the session's datagrams, so a share that arrives in a datagram is on its
way to the pool, and a verdict on its way to the proxy, before the next input is
read, with no trip through trio's scheduler in between.

Certificates
============

- The TLS handshake itself refuses clients without a certificate of the configured
  CA (the log says which: no certificate, another CA, not TLS 1.3, not TLS at all).
- After **every** handshake, resumed ones included, :func:`~bridge.pki.tls.check_miner_peer`
  runs: the peer must present a *miner* certificate, inside its validity period and
  its CA's, with the ``clock_skew`` leeway (with :class:`~bridge.pki.rotation.ServerCredentials`
  OpenSSL leaves time to this check, so the leeway holds for full and resumed
  handshakes alike), and not revoked. Then at most ``max_connections_per_cert``
  control connections may be open per certificate. A refused proxy gets an
  ``rm.error`` saying why before the close; the log says what happened and what to do.
- The certificate's accounts are the only ones the proxy may authorize (unless
  ``enforce_accounts`` is off); each refused account is logged once per channel
  with the certificate's name.
- Housekeeping, every ``reload_interval`` seconds and on :meth:`SidecarServer.reload`
  (SIGHUP): the revocation list is re-read when it changed, and the live sessions of
  newly revoked certificates are closed at once; with ``ServerCredentials``, a
  renewed certificate and key are loaded and used for the next handshakes while live
  sessions continue. Certificates (its own, the CA, the proxies') that expire within
  ``expiry_warning`` are logged once a day and listed by :meth:`SidecarServer.warnings`.

Logging goes to ``bridge.sidecar``: proxies connecting (with the certificate's
name and accounts) and leaving, channels opening and closing, reloads at info;
refusals, failed handshakes, pool connection failures, expiring certificates and
protocol errors (with what to do) at warning.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import trio
from msgspec import Struct, field

from bridge.config import UpstreamURL
from bridge.errors import PKIError
from bridge.logs import bind_connection
from bridge.net.admission import Admission, AdmissionLimits, AdmissionStatistics
from bridge.net.containment import Containment
from bridge.net.credential_watch import CredentialWatcher
from bridge.net.listen import Pending, fd_gauge, serve_admitted
from bridge.net.pool_watch import PoolWatch
from bridge.net.proxy_protocol import (
    TrustedBalancers,
    format_address,
    parse_address,
    read_proxy_header,
)
from bridge.net.tcp import (
    StalledSends,
    close_quietly,
    describe_error,
    open_stream,
    peer_ack_age,
    peer_name,
    socket_of,
    tune_stream,
    unread_bytes,
)
from bridge.net.timer import CoreTimer
from bridge.net.udp import DatagramSender, receive_datagrams, tune_udp
from bridge.pki.identity import (
    DEFAULT_CLOCK_SKEW_LEEWAY,
    CertificateIdentity,
    CertificateRefused,
)
from bridge.pki.revocation import RevocationList, RevocationStatus
from bridge.pki.rotation import (
    DEFAULT_EXPIRY_WARNING,
    DEFAULT_RELOAD_INTERVAL,
    CertificateStatus,
    CredentialWatch,
    ServerCredentials,
    expiry_warning,
    identity_status,
)
from bridge.pki.tls import check_miner_peer, explain_handshake_failure
from bridge.relay.sidecar.channels import ChannelStatus, ClosePool, OpenPool, Refusal, RequestRefused, WritePool
from bridge.relay.sidecar.counters import SidecarSessionCounters
from bridge.relay.sidecar.intake import DEFAULT_REKEY_INTERVAL, SidecarIntake
from bridge.relay.sidecar.session import (
    DEFAULT_BATCH_WINDOW,
    DEFAULT_DEAD_AFTER,
    DEFAULT_HEARTBEAT,
    SidecarSession,
    SidecarSessionStatistics,
)
from bridge.wire.control import ErrorNotice, encode_rm
from bridge.wire.proxy_header import ProxyHeaderError
from bridge.wire.receiver import DEFAULT_BURST, DEFAULT_GRACE, DEFAULT_RATE

__all__ = ["ConnectedCertificate", "SidecarServer", "SidecarStatistics"]

log = logging.getLogger("bridge.sidecar")

CONTROL_RECEIVE_SIZE = 65536
#: A pool's lines are short (a notify is about 1 KB); reading up to 64 KiB at a time from
#: thousands of pool connections left the heap fragmented: about 1 KiB resident per rig more
#: (``stratumrm bench scale``).
POOL_RECEIVE_SIZE = 4096
#: Larger than any valid datagram (1200), so an oversized one is seen as such.
DATAGRAM_RECEIVE_SIZE = 2048
#: Bytes for one pool that it has not taken yet; beyond that the pool is stuck.
MAX_POOL_BACKLOG = 4 * 1024 * 1024
#: How long the last lines (rm.error, final verdicts) may take to go out on close.
CLOSE_FLUSH_TIMEOUT = 1.0
HOUSEKEEPING_INTERVAL = 1.0
#: Control connections one certificate may hold at once (``--max-connections-per-cert``).
DEFAULT_MAX_CONNECTIONS_PER_CERT = 4
#: How long a refused proxy has to take its ``rm.error`` before the close.
REFUSAL_FLUSH_TIMEOUT = 1.0
_UDP_BIND_ATTEMPTS = 8
# The name of every pool connection's task: trio makes a string per task otherwise.
_POOL_TASK_NAME = "bridge.net.sidecar pool connection"


_UNEXPECTED_ENDS = (
    "proxy silent",
    "proxy did not read",
    "proxy took no control data",
    "control connection error",
    "internal error",
)


def disconnect_level(reason: str) -> int:
    """How loud a proxy's disconnection is logged: a warning when a farm's rigs were cut off
    (this side gave up on the proxy, or the link broke), info when the proxy said goodbye or
    closed, or the sidecar stopped."""
    return logging.WARNING if reason.startswith(_UNEXPECTED_ENDS) else logging.INFO


class ConnectedCertificate(CertificateStatus, frozen=True, kw_only=True):
    """A miner certificate with live control connections."""

    accounts: tuple[str, ...]
    connections: int


class SidecarStatistics(SidecarSessionCounters, frozen=True, kw_only=True):
    """Every control connection's counters summed (open ones included), and the sidecar's own.

    ``datagrams_accepted`` is summed over the sessions; ``datagram_drops`` is the shared UDP
    pipeline's, which also drops what belongs to no session.
    """

    sessions_active: int
    sessions_total: int
    handshakes_full: int
    handshakes_resumed: int
    handshake_failures: int
    """TLS handshakes that failed (no certificate, another CA, not TLS 1.3 ...)."""
    certificate_refusals: int
    """Completed handshakes refused afterwards (expired, revoked, over the cap ...)."""
    refusals: dict[str, int]
    """Every refused connection by kind, both of the above."""
    closed_by_reason: dict[str, int]
    channels_open: int
    pool_connect_failures: int
    datagrams_received: int
    datagram_drops: dict[str, int] = field(default_factory=dict)
    """Every drop reason of the shared UDP pipeline, zeros included."""
    certificate: CertificateStatus | None
    """This sidecar's certificate (None when it was given a bare SSL context)."""
    ca_certificates: list[CertificateStatus]
    certificate_reloads: int
    revocations: RevocationStatus | None
    connected_certificates: list[ConnectedCertificate]
    admission: AdmissionStatistics
    """The control port's admission control (connections before their TLS handshake)."""
    contained_errors: int = 0
    """Internal errors while handling one connection, channel or datagram: that one was ended, the sidecar went on."""
    pool_up: bool = True
    """The pool answers (the sidecar's own watch connection)."""
    pool_reason: str = ""


class SessionStatus(Struct, frozen=True, kw_only=True):
    """One proxy's control connection: who it is, its channels (rigs) and its counters."""

    peer: str
    certificate: str
    accounts: list[str]
    connected_at: datetime
    channels: list[ChannelStatus]
    statistics: SidecarSessionStatistics


class SidecarServer:
    """Terminates StratumRM for proxies and opens one SV1 connection to ``pool`` per channel.

    ``ssl_context`` is the control channel's server context (mutual TLS 1.3): a
    :class:`~bridge.pki.rotation.ServerCredentials`, reloaded from disk when its files
    change, or a fixed ``ssl.SSLContext``. ``udp_port`` None binds UDP on the TCP
    port's number; ``udp`` False offers no UDP at all (shares then come over TLS).
    ``advertise_host``/``advertise_port`` go into the hello result instead of the
    bound port and the host the proxy dialled (for a sidecar behind NAT).
    ``clock_skew`` is the leeway on validity periods, ``max_connections_per_cert``
    the cap on live control connections per certificate (None: no cap),
    ``expiry_warning`` the window in which certificates count as expiring soon, and
    ``reload_interval`` how often the revocation list and certificate files are
    looked at.
    """

    def __init__(
        self,
        pool: UpstreamURL,
        ssl_context: ssl.SSLContext | ServerCredentials,
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
        admission: AdmissionLimits | None = None,
        enforce_accounts: bool = True,
        revocations: RevocationList | None = None,
        clock_skew: timedelta = DEFAULT_CLOCK_SKEW_LEEWAY,
        max_connections_per_cert: int | None = DEFAULT_MAX_CONNECTIONS_PER_CERT,
        expiry_warning: timedelta = DEFAULT_EXPIRY_WARNING,
        reload_interval: float = DEFAULT_RELOAD_INTERVAL,
        proxy_protocol_from: TrustedBalancers | None = None,
        proxy_protocol_to_pool: bool = False,
    ) -> None:
        if pool.transport == "stratumrm":
            raise ValueError("the sidecar's pool is plain Stratum V1: stratum+tcp:// or stratum+ssl://")
        if pool.tls and pool_ssl_context is None:
            raise ValueError(f"{pool} needs a TLS context (public_client_context)")
        if max_connections_per_cert is not None and max_connections_per_cert < 1:
            raise ValueError("max_connections_per_cert must be at least 1 (or None for no cap)")
        self.pool = pool
        if isinstance(ssl_context, ServerCredentials):
            self.credentials: ServerCredentials | None = ssl_context
            self._fixed_context: ssl.SSLContext | None = None
        else:
            self.credentials = None
            self._fixed_context = ssl_context
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
        # Connections that have not finished the TLS handshake are capped and get
        # ``handshake_timeout`` (bridge/net/admission.py); the rest of the limits are
        # ``admission``'s.
        limits = msgspec.structs.replace(admission or AdmissionLimits(), handshake_timeout=handshake_timeout)
        self.admission = Admission("sidecar control port", limits)
        self.enforce_accounts = enforce_accounts
        self.revocations = revocations
        self.clock_skew = clock_skew
        self.max_connections_per_cert = max_connections_per_cert
        self.expiry_warning = expiry_warning
        self.reload_interval = reload_interval
        self.intake = SidecarIntake(rate=udp_rate, burst=udp_burst, grace=key_grace)
        self.containment = Containment(log, "sidecar")
        self.port: int | None = None
        self.udp_port: int | None = None
        self._udp_socket: trio.socket.SocketType | None = None
        self._udp_sender: DatagramSender | None = None
        self._connections: dict[SidecarSession, _ProxyConnection] = {}
        self._sessions_total = 0
        self._handshakes_full = 0
        self._handshakes_resumed = 0
        self._handshake_failures = 0
        self._certificate_refusals = 0
        self._refusals: Counter[str] = Counter()
        self._per_certificate: Counter[bytes] = Counter()
        self._pool_connect_failures = 0
        self._closed: Counter[str] = Counter()
        self._finished = SidecarSessionCounters()
        """The counters of every control connection that has ended, summed."""
        self._revocation_error: str | None = None
        self.watcher = CredentialWatcher(
            CredentialWatch(
                self.credentials,
                subject="this sidecar's certificate",
                remedy=self._certificate_remedy,
                window=expiry_warning,
            ),
            log,
            after_reload=lambda: f"new handshakes use it, the {len(self._connections)} live sessions continue",
            reload_interval=reload_interval,
            also_reload=self._reload_revocations,
            also_warn=self._warnings,
        )
        self.proxy_protocol_from = proxy_protocol_from or TrustedBalancers(())
        self.proxy_protocol_to_pool = proxy_protocol_to_pool
        self._proxy_header_failures = 0
        self._listeners: list[trio.SocketListener] = []
        self._drain_started: float | None = None
        self._drained = trio.Event()
        self._drain_by: tuple[float, str] | None = None
        self.pool_watch = PoolWatch(
            pool,
            self.pool_ssl_context,
            self._pool_status_changed,
            connect_timeout=connect_timeout,
            local_shortage=self._fd_shortage,
            proxy_protocol=proxy_protocol_to_pool,
        )

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The context of the next handshake (a reloaded certificate shows here)."""
        if self.credentials is not None:
            return self.credentials.context
        assert self._fixed_context is not None
        return self._fixed_context

    # ------------------------------------------------------------------ serving

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host:port`` (0: any free port) until cancelled; reports the TCP port."""
        listeners, udp_socket = await self._bind(host, port)
        self.port = listeners[0].socket.getsockname()[1]
        if udp_socket is not None:
            self._udp_socket = udp_socket
            self._udp_sender = DatagramSender(udp_socket)
            self.udp_port = udp_socket.getsockname()[1]
        log.info(
            "sidecar listening on %s:%d (TLS control%s), pool %s",
            host,
            self.port,
            f", UDP shares on port {self.udp_port}" if self.udp_port is not None else ", no UDP",
            self.pool,
        )
        self._log_certificates()
        try:
            async with trio.open_nursery() as nursery:
                if udp_socket is not None:
                    nursery.start_soon(self._receive_datagrams, udp_socket)
                nursery.start_soon(self._housekeeping)
                nursery.start_soon(self.watcher.run)
                nursery.start_soon(self.pool_watch.run)
                self._listeners = listeners
                await nursery.start(
                    serve_admitted,
                    self.containment.connections(self._handle, "proxy connection"),
                    listeners,
                    self.admission,
                )
                task_status.started(self.port)
        finally:
            for listener in listeners:  # also when a drain already closed them: closing twice is fine
                listener.socket.close()
            if udp_socket is not None:
                udp_socket.close()

    def _fd_shortage(self) -> str | None:
        """Why this process cannot be sure a failed pool check means the pool (None: it can)."""
        free = fd_gauge().free(trio.current_time())
        reserve = self.admission.limits.fd_reserve
        if free is not None and free < reserve:
            return f"only {free} file descriptors free, below the reserve of {reserve}"
        return None

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` began: not ready for new proxies (``/readyz`` says so)."""
        return self._drain_started is not None

    async def drain(self, deadline: float, reason: str = "sidecar shutting down") -> None:
        """Stop taking proxies and ask each to move (``rm.goaway``); return when all left or at ``deadline`` s.

        The listener closes first, so the balancer sends the proxies' new connections
        to another sidecar; the UDP socket and every live session keep working (shares
        in flight get their verdicts) until the proxy closes its connection. Sessions
        left at the deadline are closed with ``rm.error``.
        """
        now = trio.current_time()
        self._drain_started = now
        self._drain_by = (now + deadline, reason)
        for listener in self._listeners:
            await listener.aclose()  # serve_admitted stops accepting; accepted connections carry on
        for connection in list(self._connections.values()):
            connection.step()  # sends rm.goaway (and to proxies whose hello comes later)
        told = sum(c.goaway_sent for c in self._connections.values())
        log.info(
            "draining: listener closed, %d of %d proxies told to move (rm.goaway) within %g s",
            told,
            len(self._connections),
            deadline,
        )
        with trio.move_on_after(deadline):
            while self._connections:
                self._drained = trio.Event()
                await self._drained.wait()
            log.info("drained: every proxy moved after %.1f s", trio.current_time() - now)
            return
        left = list(self._connections.values())
        log.warning("drain deadline of %g s passed; closing the %d proxies still connected", deadline, len(left))
        for connection in left:
            connection.session.close(f"sidecar drained: {reason}", trio.current_time())
            connection.step()
        with trio.move_on_after(CLOSE_FLUSH_TIMEOUT + 0.5):
            while self._connections:
                self._drained = trio.Event()
                await self._drained.wait()

    def _pool_status_changed(self, up: bool, reason: str) -> None:
        """The pool went down or came back (PoolWatch): tell every proxy (rm.pool, C10)."""
        now = trio.current_time()
        for connection in list(self._connections.values()):
            connection.session.pool_status(up, reason, now)
            connection.step()

    async def _bind(self, host: str, port: int) -> tuple[list[trio.SocketListener], trio.socket.SocketType | None]:
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
        connections = self._connections
        tune_udp(udp_socket)

        def receive(data: bytes, address: Any, now: float) -> Any:
            try:
                return self.intake.receive_datagram(data, address, now)
            except Exception as exc:
                self.containment.record(exc, address, "datagram")
                return None

        def after_batch(sessions: set[Any]) -> None:
            for session in sessions:
                connection = connections.get(session)
                if connection is not None:
                    with self.containment.guard(connection.peer, "proxy connection") as guard:
                        connection.step()
                    if guard.error is not None:
                        connection.session.close("internal error", trio.current_time())

        try:
            await receive_datagrams(udp_socket, receive, DATAGRAM_RECEIVE_SIZE, after_batch)
        finally:
            if self._udp_sender is not None:
                self._udp_sender.close()
                self._udp_sender = None

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(HOUSEKEEPING_INTERVAL)
            self.intake.handle_timer(trio.current_time())

    # ------------------------------------------------------------------ certificates

    def reload(self, *, force: bool = False) -> None:
        """Look at the revocation list and this sidecar's certificate files now.

        Runs every ``reload_interval`` seconds; ``force`` (SIGHUP) re-reads the files
        even when their stamps did not move. A changed revocation list closes the live
        sessions of newly revoked certificates; a renewed certificate and key serve the
        next handshakes. A file that does not load is reported and the previous one
        stays in force. Then the warnings (expiring certificates ...) are logged, each
        once a day.
        """
        self.watcher.reload(force=force)

    def _reload_revocations(self, force: bool) -> None:
        revocations = self.revocations
        if revocations is None:
            return
        try:
            changed = revocations.reload_if_changed(force=force)
        except PKIError as exc:
            self._revocation_error = str(exc)
            return
        self._revocation_error = None
        if not changed:
            return
        log.info(
            "revocation list %s reloaded: CRL number %d, %d revoked certificates",
            revocations.path,
            revocations.crl_number,
            len(revocations),
        )
        for connection in list(self._connections.values()):
            identity = connection.identity
            if revocations.is_revoked(identity.serial) and not connection.session.closed:
                channels = len(connection.session.channels)
                log.warning(
                    "closing the session of proxy %s: %s was revoked; its %d channels end now, and the "
                    "proxy is refused until it has a new certificate",
                    connection.peer,
                    identity.describe(),
                    channels,
                )
                connection.session.close(f"{identity.describe()} was revoked", trio.current_time())
                connection.step()

    def _log_certificates(self) -> None:
        """At start: what this sidecar presents and enforces."""
        if self.revocations is not None:
            log.info(
                "enforcing the revocation list %s (CRL number %d, %d revoked); watching it for changes",
                self.revocations.path,
                self.revocations.crl_number,
                len(self.revocations),
            )
        self.watcher.start()

    def warnings(self, now: datetime | None = None) -> list[str]:
        """What needs the operator: certificates expiring soon, a stale revocation list ..."""
        found = self.watcher.warnings(now)
        if not self.pool_watch.up:  # logged by the pool watch when it changes; listed for monitoring
            found.append(f"pool {self.pool} is down ({self.pool_watch.reason}); proxies are told (rm.pool)")
        return found

    def _certificate_remedy(self, status: CertificateStatus) -> str:
        assert self.credentials is not None  # only asked about the certificate of ServerCredentials
        cert_file, key_file = self.credentials.files[0], self.credentials.files[1]
        return (
            f"renew it (`stratumrm pki renew {status.name}`) and copy the new certificate and key "
            f"over {cert_file} and {key_file}; the sidecar loads them without a restart"
        )

    def _warnings(self, now: datetime) -> list[tuple[str, str]]:
        """The revocation list's and the connected proxies' warnings (the watcher adds this sidecar's certificate's)."""
        found: list[tuple[str, str]] = []

        def add(key: str, message: str | None) -> None:
            if message is not None:
                found.append((key, message))

        revocations = self.revocations
        if revocations is None:
            add(
                "no revocation list",
                "no revocation list (--revocations): revoked certificates are not refused; pass the CA's revocations.pem",
            )
        else:
            crl = revocations.status(now)
            due = f"{crl.next_update:%Y-%m-%d %H:%M} UTC" if crl.next_update is not None else "?"
            if crl.stale:
                add(
                    "revocation list stale",
                    f"the revocation list {crl.file} passed its next update ({due}); it is still enforced, "
                    "but re-publish it with `stratumrm pki crl` and copy it here",
                )
            elif crl.due_soon:
                add(
                    "revocation list due",
                    f"the revocation list {crl.file} is due for re-publication at {due}; run "
                    "`stratumrm pki crl` and copy it here",
                )
            if self._revocation_error is not None:
                add("revocation list error", f"revocation list not reloaded: {self._revocation_error}")
        for peer in self._connected_certificates(now):
            add(
                f"peer {peer.serial}",
                expiry_warning(
                    peer,
                    "the miner certificate",
                    f"{peer.connections} connected proxy connection(s) use it: renew it "
                    f"(`stratumrm pki renew {peer.name}`) and install the new bundle on that proxy",
                ),
            )
        return found

    def _connected_certificates(self, now: datetime) -> list[ConnectedCertificate]:
        by_certificate: dict[bytes, tuple[CertificateIdentity, int]] = {}
        for connection in self._connections.values():
            identity = connection.identity
            _identity, count = by_certificate.get(identity.sha256_fingerprint, (identity, 0))
            by_certificate[identity.sha256_fingerprint] = (identity, count + 1)
        return [
            ConnectedCertificate(
                **identity_status(identity, now, self.expiry_warning),
                accounts=identity.accounts,
                connections=count,
            )
            for identity, count in by_certificate.values()
        ]

    # ------------------------------------------------------------------ connections

    async def _handle(self, tcp: trio.SocketStream, pending: Pending) -> None:
        bind_connection("proxy")
        tune_stream(tcp)
        peer = peer_name(tcp)
        # No TLS state (tens of KiB in OpenSSL) for a connection that has sent nothing yet:
        # a flood of silent connections costs only the socket and this task.
        await trio.lowlevel.wait_readable(tcp.socket)
        if self.proxy_protocol_from:
            real = await self._read_proxy_header(tcp, peer)
            if real is None:
                await close_quietly(tcp)
                return
            if real != peer:
                # Admission counts the proxy behind the balancer, not the balancer itself.
                host = real.rpartition(":")[0].strip("[]")
                if not pending.rebind(host):
                    await close_quietly(tcp)
                    return
            peer = real
        tls = trio.SSLStream(tcp, self.ssl_context, server_side=True)
        try:
            identity = await self._handshake(tls, peer, pending)
            if identity is None:
                return
            fingerprint = identity.sha256_fingerprint
            limit = self.max_connections_per_cert
            if limit is not None and self._per_certificate[fingerprint] >= limit:
                await self._refuse(
                    tls,
                    peer,
                    "connection limit",
                    f"{identity.describe()} already holds {self._per_certificate[fingerprint]} control "
                    f"connections, the limit (--max-connections-per-cert {limit}); one proxy needs one, so "
                    "several proxies probably share a bundle: give each its own "
                    "(`stratumrm pki issue-miner NAME --account ACCOUNT`), or raise the limit",
                    tls.session_reused,
                )
                return
            self._per_certificate[fingerprint] += 1
            try:
                await self._serve_proxy(tls, peer, identity)
            finally:
                self._per_certificate[fingerprint] -= 1
                if not self._per_certificate[fingerprint]:
                    del self._per_certificate[fingerprint]
        finally:
            await close_quietly(tls)

    async def _read_proxy_header(self, tcp: trio.SocketStream, peer: str) -> str | None:
        """A balancer's connection (``--proxy-protocol-from``): the proxy's real address, or None (refused).

        Connections from other addresses are taken as they are. A LOCAL header (the
        balancer's own health check) keeps the balancer's address.
        """
        sock = socket_of(tcp)
        try:
            host = sock.getpeername()[0] if sock is not None else ""
        except OSError:
            return None
        if not self.proxy_protocol_from.covers(host):
            return peer
        try:
            header = await read_proxy_header(tcp, self.handshake_timeout)
        except ProxyHeaderError as exc:
            self._proxy_header_failures += 1
            self._refusals["proxy protocol"] += 1
            log.warning("connection from balancer %s refused: %s", peer, exc)
            return None
        if header.local or header.source is None:
            log.debug("balancer %s: PROXY v2 LOCAL connection (a health check)", peer)
            return peer
        real = format_address(*header.source)
        log.debug("balancer %s carries proxy %s", peer, real)
        return real

    async def _serve_proxy(self, tls: trio.SSLStream, peer: str, identity: CertificateIdentity) -> None:
        """One accepted proxy, from its first control line to its disconnection."""
        connection = _ProxyConnection(self, tls, peer, identity)
        self._connections[connection.session] = connection
        self._sessions_total += 1
        accounts = ", ".join(identity.accounts) or "none"
        log.info("proxy %s connected: %s, accounts %s", peer, identity.describe(), accounts)
        try:
            # A bug must not take the other proxies' sessions down with this one.
            with self.containment.guard(f"{peer} ({identity.name})", "proxy connection") as guard:
                reason = await connection.run()
            if guard.error is not None:
                reason = "internal error"
        finally:
            del self._connections[connection.session]
            self._drained.set()
            connection.session.connection_lost("connection closed", trio.current_time())
            self._account_finished(connection.session)
        self._closed[reason.split(":", 1)[0]] += 1
        stats = connection.session.statistics()
        if connection.session.protocol_error is not None:
            log.warning(
                "proxy %s (%s) sent a malformed control line: %s; connection closed. "
                "Check that the proxy runs a StratumRM version this sidecar speaks (1); "
                "other proxies are not affected",
                peer,
                identity.name,
                connection.session.protocol_error,
            )
        log.log(
            disconnect_level(reason),
            "proxy %s (%s) disconnected: %s; %d channels, %d shares forwarded (%d UDP, %d TLS), "
            "%d duplicates answered from cache",
            peer,
            identity.name,
            reason,
            stats.channels_opened,
            stats.shares_forwarded,
            stats.shares_udp,
            stats.shares_tls,
            stats.duplicates_from_cache + stats.duplicates_joined,
        )

    async def _handshake(self, tls: trio.SSLStream, peer: str, pending: Pending) -> CertificateIdentity | None:
        """Run the TLS handshake and check the certificate; None (logged, counted) if refused.

        The handshake deadline is admission's (``handshake_timeout``): a connection
        still in its handshake then is cancelled, counted and logged (rate-limited) there.
        """
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            kind, advice = explain_handshake_failure(exc)
            self._handshake_failures += 1
            self._refusals[kind] += 1
            log.warning("TLS handshake with %s failed: %s", peer, advice)
            return None
        pending.established()
        resumed = bool(tls.session_reused)
        if resumed:
            self._handshakes_resumed += 1
        else:
            self._handshakes_full += 1
        # A resumed TLS 1.3 session skips OpenSSL's certificate checks, and with
        # ServerCredentials OpenSSL leaves validity periods to us anyway: check it all here.
        try:
            return check_miner_peer(
                tls,
                self.revocations,
                now=datetime.now(UTC),
                leeway=self.clock_skew,
                cas=self.credentials.ca_certificates if self.credentials is not None else (),
            )
        except CertificateRefused as exc:
            await self._refuse(tls, peer, exc.kind, str(exc), resumed)
        except PKIError as exc:
            await self._refuse(tls, peer, "not a StratumRM certificate", str(exc), resumed)
        return None

    async def _refuse(self, tls: trio.SSLStream, peer: str, kind: str, message: str, resumed: bool) -> None:
        """Count and log a refused proxy, and tell it why (``rm.error``) before the close."""
        self._certificate_refusals += 1
        self._refusals[kind] += 1
        how = "after a resumed TLS session" if resumed else "after the TLS handshake"
        log.warning("refused proxy %s %s: %s", peer, how, message)
        notice = encode_rm(ErrorNotice(reason=f"refused by the sidecar: {message}"))
        with trio.move_on_after(REFUSAL_FLUSH_TIMEOUT):
            try:
                await tls.send_all(notice)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    def _account_finished(self, session: SidecarSession) -> None:
        self._finished.add(session.counters)

    # ------------------------------------------------------------------ statistics

    def statistics(self) -> SidecarStatistics:
        """Counters over every control connection so far, open ones included."""
        totals = SidecarSessionCounters()
        totals.add(self._finished)
        sessions = [c.session for c in self._connections.values()]
        for session in sessions:
            totals.add(session.counters)
        udp = self.intake.statistics()
        now = datetime.now(UTC)
        credentials = self.credentials
        return SidecarStatistics(
            **{**totals.values(), "datagram_drops": dict(udp.dropped)},
            sessions_active=len(self._connections),
            sessions_total=self._sessions_total,
            handshakes_full=self._handshakes_full,
            handshakes_resumed=self._handshakes_resumed,
            handshake_failures=self._handshake_failures,
            certificate_refusals=self._certificate_refusals,
            refusals=dict(self._refusals),
            closed_by_reason=dict(self._closed),
            channels_open=sum(session.channels_open for session in sessions),
            pool_connect_failures=self._pool_connect_failures,
            datagrams_received=udp.datagrams,
            certificate=credentials.status(now, self.expiry_warning) if credentials is not None else None,
            ca_certificates=credentials.ca_statuses(now, self.expiry_warning) if credentials is not None else [],
            certificate_reloads=credentials.reloads if credentials is not None else 0,
            revocations=self.revocations.status(now) if self.revocations is not None else None,
            connected_certificates=self._connected_certificates(now),
            admission=self.admission.statistics(),
            contained_errors=self.containment.errors,
            pool_up=self.pool_watch.up,
            pool_reason=self.pool_watch.reason or "",
        )

    def session_statuses(self) -> list[SessionStatus]:
        """The live control connections, with their channels."""
        return [
            SessionStatus(
                peer=connection.peer,
                certificate=connection.identity.name,
                accounts=list(connection.identity.accounts),
                connected_at=connection.connected_at,
                channels=connection.session.channel_statuses(),
                statistics=connection.session.statistics(),
            )
            for connection in list(self._connections.values())
        ]

    @property
    def udp_send_drops(self) -> int:
        """Datagrams the kernel had no send-buffer room for (dropped, as a network would)."""
        return self._udp_sender.dropped if self._udp_sender is not None else 0

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
    """One channel's pool connection: its stream, its unsent bytes and what its task waits in.

    One task carries it both ways (:meth:`_ProxyConnection._run_pool`), and only the
    operation it is in has a cancel scope (``scope``): connecting, sending, or waiting
    for the pool's bytes. :meth:`write` cancels a wait to read, so the task sends what
    was queued and goes back to reading (cancelling a wait to read loses no bytes:
    trio reads only once the socket is readable); :meth:`close` cancels whatever the
    task is in and it ends. A task per direction, or a scope for the whole life of
    the link, would cost a task, a nursery or a cancel status (two sets) per rig.
    """

    __slots__ = ("buffer", "ch", "closed", "reading", "rig", "scope", "sock", "stream", "waited", "woken")

    def __init__(self, ch: int, rig: str) -> None:
        self.ch = ch
        self.rig = rig or "?"
        self.stream: trio.abc.Stream | None = None
        #: A plain TCP pool connection's socket: read with os.read and waited on with no
        #: cancel scope (:meth:`_wake`), about 2.5 KiB less per rig than receive_some.
        self.sock: trio.socket.SocketType | None = None
        self.buffer = bytearray()
        self.scope: trio.CancelScope | None = None
        self.reading = False
        self.woken = False
        self.waited = False
        self.closed = False

    def write(self, data: bytes) -> bool:
        """Send bytes to the pool, or queue them; False when the pool has not taken MAX_POOL_BACKLOG bytes.

        While the task waits to read with nothing queued (nearly always), a plain TCP
        pool connection gets the bytes at once, from the caller's task, as far as the
        kernel takes them without waiting: the share is on its way to the pool in the
        input that brought it, without waking the task. What is left (a full socket
        buffer, a TLS pool) is queued and the task sends it.
        """
        buffer = self.buffer
        if len(buffer) + len(data) > MAX_POOL_BACKLOG:
            return False
        if self.reading and not buffer and not self.closed:
            stream = self.stream
            if type(stream) is trio.SocketStream:
                try:
                    sent = os.write(stream.socket.fileno(), data)
                except OSError:
                    sent = 0  # full (the task's send waits) or broken (its send says why)
                if sent == len(data):
                    return True
                data = data[sent:]
        buffer += data
        if self.reading:
            self._wake()
        return True

    def close(self) -> None:
        """End the link: its task stops whatever it is doing and closes the connection."""
        self.closed = True
        if self.reading:
            self._wake()
        elif self.scope is not None:
            self.scope.cancel()

    def _wake(self) -> None:
        """End the task's wait to read: its scope's, or a wait on the socket itself, with
        trio's ``notify_closing`` (``woken`` tells the task the socket is still open)."""
        if self.scope is not None:
            self.scope.cancel()
        elif self.sock is not None and not self.woken:
            self.woken = True
            trio.lowlevel.notify_closing(self.sock)


async def _receive_from_pool(link: _PoolLink, sock: trio.socket.SocketType) -> bytes | None:
    """What ``stream.receive_some`` does on a plain TCP pool connection, with a shorter await
    chain and no cancel scope while waiting; None when woken (bytes to send, or closed)."""
    try:
        data = os.read(sock.fileno(), POOL_RECEIVE_SIZE)
    except BlockingIOError:
        data = None  # waited for below, not in this handler: it would keep the exception
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ENOTSOCK):
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
    if data is None:
        link.reading = True
        try:
            await trio.lowlevel.wait_readable(sock)
        except trio.ClosedResourceError:
            if not link.woken:
                raise
        finally:
            link.reading = False
        link.woken = False
        link.waited = True
        return None  # readable or woken: the task looks at what is queued first, then reads
    if not link.waited:
        await trio.lowlevel.cancel_shielded_checkpoint()  # a checkpoint, as receive_some is
    link.waited = False
    return data


class _ProxyConnection:
    """The tasks of one proxy's control connection."""

    def __init__(self, server: SidecarServer, stream: trio.SSLStream, peer: str, identity: CertificateIdentity) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.identity = identity
        self.connected_at = datetime.now(UTC)
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
        self.goaway_sent = False
        self.timer = CoreTimer(self.session)
        self.sends = StalledSends(stream, server.dead_after)
        self._control = bytearray()  # control bytes taken from the session for the pump
        self._sent_at_once = False  # step() sent datagrams itself since the pump last ran
        self._nursery: trio.Nursery | None = None
        if not server.pool_watch.up:
            self.session.pool_status(False, server.pool_watch.reason, trio.current_time())

    async def run(self) -> str:
        """Serve until the session closes; return why."""
        session = self.session
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._read_control)
            nursery.start_soon(self.sends.watch)
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
                    self._nursery.start_soon(self._run_pool, link, name=_POOL_TASK_NAME)
                elif isinstance(command, ClosePool):
                    link = self._links.pop(command.ch, None)
                    if link is not None:
                        link.close()
                        log.info("proxy %s channel %d closed: %s", self.peer, command.ch, command.reason)
        for refusal in session.refusals():
            self._log_refusal(refusal)
        drain = self.server._drain_by
        if drain is not None and not self.goaway_sent and session.hello is not None and not session.closed:
            now = trio.current_time()
            self.goaway_sent = session.go_away(round(drain[0] - now, 3), drain[1], now)
        wake = False
        if not session.closed:
            # The first input of a wake-up sends its verdicts at once (a lone share's verdict
            # waits for nothing); inputs after it in the same scheduler round (other pool
            # connections' answers, a batch of datagrams) leave theirs to the pump, which
            # runs once they all ran and sends them together, in as few datagrams as fit.
            if not self._sent_at_once:
                self._sent_at_once = wake = self._send_datagrams()
            elif session.datagrams_pending():
                wake = True
        data = session.data_to_send()
        if data or session.closed or wake:
            self._control += data
            self.timer.wake()  # the pump writes the control stream (and ends a closed session)
        else:
            self.timer.wake_if_sooner()

    def _send_datagrams(self) -> bool:
        """Send the session's datagrams now (never waits: a full buffer drops, as a network would); True if any.

        Called after the first input of a wake-up, so a lone verdict leaves in the input
        that produced it (the pool's bytes), not one trip through trio's scheduler later
        in the pump; the pump sends what the inputs after it queued.
        """
        datagrams = self.session.datagrams_to_send(trio.current_time())
        sender = self.server._udp_sender
        if not datagrams or sender is None:
            return False
        for datagram in datagrams:
            try:
                sender.send(datagram.data, datagram.address)
            except OSError as exc:
                log.debug("proxy %s: datagram to %s not sent: %s", self.peer, datagram.address, exc)
        return True

    def _log_refusal(self, refusal: Refusal) -> None:
        if isinstance(refusal, RequestRefused):
            log.warning(
                "proxy %s channel %d: refused %r, not relayed to the pool (%s); "
                "a proxy sending this is not StratumRM's or has been tampered with: check its version and host",
                self.peer,
                refusal.ch,
                refusal.method,
                refusal.reason,
            )
            return
        identity = self.identity
        covered = ", ".join(identity.accounts) or "none"
        log.warning(
            "proxy %s channel %d: refused %s for %r with error 24 (unauthorized worker): %s names "
            "the accounts %s, not %r. If this proxy should mine for %r, issue a certificate that names "
            "it too (`stratumrm pki issue-miner NEWNAME --account %s`), install that bundle on the proxy "
            "and revoke the old one; otherwise correct the rig's worker name",
            self.peer,
            refusal.ch,
            refusal.method,
            refusal.worker,
            identity.describe(),
            covered,
            refusal.account,
            refusal.account,
            " --account ".join((*identity.accounts, refusal.account)),
        )

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
        while True:
            self.timer.rearm()
            if session.closed:
                self._control += session.data_to_send()
                with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
                    if self._control:
                        await self._send_control(bytes(self._control))
                return
            self._sent_at_once = False  # a new wake-up: the next input sends at once again
            self._send_datagrams()  # verdicts first: they are what the rigs wait for
            self._control += session.data_to_send()
            data = bytes(self._control)
            self._control.clear()
            if data and not await self._send_control(data):
                continue  # the session now knows the connection is lost
            if (deadline := await self.timer.sleep()) is not None:
                now = trio.current_time()
                if now >= session.silent_deadline():
                    if unread_bytes(self.stream):
                        session.input_waiting(now)  # busy here, not a silent proxy
                    elif (age := peer_ack_age(self.stream)) is not None:
                        session.peer_acknowledged(age, now)  # a busy proxy still acknowledges
                session.handle_timer(now, deadline)  # late by now - deadline: this process's lag, not the proxy's silence
                self.step()

    async def _send_control(self, data: bytes) -> bool:
        """Write to the proxy; a proxy that takes nothing for ``dead_after`` seconds while its
        TCP does not acknowledge either is dead (:class:`~bridge.net.tcp.StalledSends`)."""
        try:
            waited = await self.sends.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.session.connection_lost(f"control connection error: {describe_error(exc)}", trio.current_time())
            self.step()
            return False
        if waited is not None:
            self.session.connection_lost(f"proxy took no control data for {waited:.3g} s", trio.current_time())
            self.step()
            return False
        return True

    # ------------------------------------------------------------------ pool connections

    async def _run_pool(self, link: _PoolLink) -> None:
        """Connect to the pool, then move bytes both ways until the connection or the channel ends."""
        server = self.server
        session = self.session
        ch = link.ch
        try:
            with trio.CancelScope() as link.scope:
                try:
                    stream = await open_stream(
                        server.pool.host,
                        server.pool.port,
                        ssl_context=server.pool_ssl_context,
                        timeout=server.connect_timeout,
                        proxy_header=server.proxy_protocol_to_pool,
                        proxy_source=parse_address(link.rig),
                    )
                except (OSError, trio.BrokenResourceError, ValueError) as exc:
                    server._pool_connect_failures += 1
                    reason = f"cannot connect to pool {server.pool}: {describe_error(exc)}"
                    log.warning("proxy %s channel %d: %s", self.peer, ch, reason)
                    session.pool_closed(ch, reason, trio.current_time())
                    self.step()
                    server.pool_watch.suspect(reason)
                    return
                link.stream = stream
            link.scope = None
            if link.closed:
                return
            sock = link.sock = stream.socket if type(stream) is trio.SocketStream else None
            log.info("proxy %s channel %d opened for rig %s, pool connection to %s", self.peer, ch, link.rig, server.pool)
            session.pool_connected(ch, trio.current_time())
            self.step()
            reason = "pool closed the connection"
            stalled_after = server.dead_after
            with server.containment.guard(f"{self.peer} channel {ch}", "pool connection") as guard:
                try:
                    while not link.closed:
                        if link.buffer:
                            data = bytes(link.buffer)
                            link.buffer.clear()
                            with trio.move_on_after(stalled_after) as sending:
                                link.scope = sending
                                await stream.send_all(data)
                            link.scope = None
                            if link.closed:
                                break
                            if sending.cancelled_caught:
                                reason = f"pool did not take {len(data)} bytes in {stalled_after:g} s; it is stalled"
                                break
                            continue
                        if sock is not None:
                            data = await _receive_from_pool(link, sock)
                            if data is None:
                                continue  # bytes for the pool were queued, or the link was closed
                        else:
                            with trio.CancelScope() as link.scope:
                                link.reading = True
                                data = await stream.receive_some(POOL_RECEIVE_SIZE)
                            link.reading = False
                            if link.scope.cancelled_caught:
                                link.scope = None
                                continue  # bytes for the pool were queued, or the link was closed
                            link.scope = None
                        if not data:
                            reason = "pool closed the connection"
                            break
                        session.pool_data(ch, data, trio.current_time())
                        server.pool_watch.alive()
                        self.step()
                        if not session.has_channel(ch):
                            reason = "channel ended"
                            break
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    reason = f"pool connection error: {describe_error(exc)}"
            if guard.error is not None:
                reason = "internal error on the pool connection"
            if not link.closed and session.has_channel(ch):
                log.warning("proxy %s channel %d: %s", self.peer, ch, reason)
                session.pool_closed(ch, reason, trio.current_time())
                self.step()
                server.pool_watch.suspect(reason)
        finally:
            link.scope = None
            if self._links.get(ch) is link:
                del self._links[ch]
            await close_quietly(link.stream)
