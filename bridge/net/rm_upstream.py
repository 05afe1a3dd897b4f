"""The trio driver of a StratumRM upstream: one TLS control connection and one UDP flow
to a sidecar, shared by every rig of the miner-side proxy.

The protocol lives in :class:`~bridge.relay.rm_upstream.StratumRMConnection`; this
module connects (TLS 1.3 with the proxy's certificate, host name checked), runs
the control reader, the UDP reader, the timer and the control writer (datagrams are
sent by :meth:`StratumRMLink.kick`, from the task whose input queued them), and hands each rig
connection an :class:`RMUpstreamHandle` with the same ``session`` / ``flush`` /
``receive`` / ``aclose`` shape as a plain SV1 upstream, so the proxy's per-rig
code is the same for both.

The connection is opened when the first rig needs it and shared until it fails;
then every channel on it ends (rigs get explicit errors for pending shares and are
released), and the next rig opens a fresh connection.

TLS: the proxy's certificate comes from a :class:`~bridge.pki.rotation.ClientCredentials`
(a plain ``ssl.SSLContext`` is wrapped in a fixed one). Each new connection first asks
it to reload the bundle if the file changed, so a renewed bundle is used from the next
connection on while the live one carries on. Once the sidecar's first line arrived (TLS
1.3 tickets come after the handshake), the session is remembered and offered on the
next connection to the same sidecar: a resumed handshake skips the certificate
signatures on both sides (the sidecar still checks the certificate and the revocation
list after it). Resumption is best effort; without a usable ticket the handshake is
simply a full one.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

import trio

from bridge import __version__
from bridge.config import UpstreamURL
from bridge.errors import PKIError
from bridge.logs import bind_connection
from bridge.net.containment import Containment
from bridge.net.tcp import WholeSends, close_quietly, describe_error, peer_ack_age, tune_stream, unread_bytes
from bridge.net.timer import CoreTimer, run_timer
from bridge.net.udp import DatagramSender, nonblocking_twin, read_pending, receive_datagrams, tune_udp
from bridge.net.wakeup import Wakeup
from bridge.pki.rotation import ClientCredentials
from bridge.relay.rm_upstream import ChannelClosed, RMChannel, StratumRMConnection

GOODBYE_TIMEOUT = 1.0
"""Seconds a stopping proxy spends telling the sidecar it closes (TLS close_notify)."""

log = logging.getLogger("bridge.proxy.stratumrm")

RECEIVE_SIZE = 65536
DATAGRAM_SIZE = 2048


class _Events(list):  # type: ignore[type-arg]
    """A channel's event list that tells its link when it stops being empty, so the link
    wakes the rigs with events without looking at every channel (O(rigs) per read).

    It names the channel's handle by the link and the channel number rather than holding
    it: the handle holds the channel, which holds this list, and a reference back would
    make every closed rig's handle a cycle that only a full garbage collection frees.
    """

    __slots__ = ("ch", "link")

    def __init__(self, link: StratumRMLink, ch: int) -> None:
        super().__init__()
        self.link = link
        self.ch = ch

    def append(self, event: Any) -> None:
        if not self:
            handle = self.link._handles.get(self.ch)
            if handle is not None:
                self.link._with_events.append(handle)
        super().append(event)


class RMUpstreamHandle:
    """One rig's view of the shared StratumRM connection (an upstream, like SV1Upstream).

    Its events come from the link's own reader. A caller either awaits :meth:`receive`,
    or (the proxy's rig connections, which keep one task per rig) sets :attr:`listener`,
    called whenever the channel has events, and takes them with :meth:`take`: no task
    waits on the handle then.
    """

    __slots__ = ("_lost", "_wake", "link", "listener", "session")

    def __init__(self, link: StratumRMLink, channel: RMChannel) -> None:
        self.link = link
        self.session = channel
        self._wake = Wakeup()
        self._lost: str | None = None
        self.listener: Callable[[], None] | None = None
        events = _Events(link, channel.ch)
        if channel.events:
            list.extend(events, channel.events)
            link._with_events.append(self)
        channel.events = events

    def _new_events(self) -> None:
        self.session.events = _Events(self.link, self.session.ch)

    @property
    def lost(self) -> str | None:
        """Why the channel is over, once :meth:`take` has seen it end; None until then."""
        return self._lost

    async def flush(self) -> None:
        self.link.kick()

    def _events_ready(self) -> None:
        listener = self.listener
        if listener is not None:
            listener()
        else:
            self._wake.set()

    def take(self) -> tuple[list, str | None]:
        """The channel's events so far, and why the channel is over (None while it is not)."""
        channel = self.session
        events: list = []
        if channel.events:
            events = channel.events
            self._new_events()
            if any(type(e) is ChannelClosed for e in events):
                closed = [e for e in events if type(e) is ChannelClosed]
                self._lost = closed[0].reason
                events = [e for e in events if type(e) is not ChannelClosed]
        return events, self._lost

    async def receive(self) -> list | None:
        """The channel's next events; raises ConnectionError once the channel is over."""
        while True:
            events, lost = self.take()
            if events:
                return events
            if lost is not None:
                raise ConnectionError(lost)
            await self._wake.wait()

    async def aclose(self) -> None:
        self.link.close_channel(self)


class StratumRMLink:
    """The proxy's connection to one sidecar (control + UDP), opened on demand."""

    def __init__(
        self,
        url: UpstreamURL,
        ssl_context: ssl.SSLContext | ClientCredentials,
        *,
        connect_timeout: float = 10.0,
        batch_window: float = 0.0,
        detect_blocks: bool = True,
        containment: Containment | None = None,
    ) -> None:
        self.url = url
        self.containment = containment or Containment(log, "proxy")
        self.credentials = ssl_context if isinstance(ssl_context, ClientCredentials) else ClientCredentials.fixed(ssl_context)
        self.connect_timeout = connect_timeout
        self.batch_window = batch_window
        self.detect_blocks = detect_blocks
        self.connection: StratumRMConnection | None = None
        self._handles: dict[int, RMUpstreamHandle] = {}
        self._with_events: list[RMUpstreamHandle] = []  # handles whose channel's events went from none to some
        self._stream: trio.abc.Stream | None = None
        self._udp: trio.socket.SocketType | None = None
        self._udp_sender: DatagramSender | None = None
        self._udp_twin: socket.socket | None = None
        self._ready = trio.Event()
        self._connecting = False
        self._attempts = 0  # connection attempts started; the latest one owns _connecting and _ready
        # One session at a time: a closed session's wind-down (its writer's last record, its
        # farewell, closing its stream and UDP socket) uses the link's state, so the next
        # attempt starts only after it. Two at once wrote each other's control bytes (a
        # sidecar saw rm.open before rm.hello, and rm.hello twice) and closed each other's UDP.
        self._one_session = trio.Lock()
        self._kick = trio.Event()
        self._control = bytearray()  # control bytes taken from the connection for the writer
        self._sent_at_once = False  # kick sent datagrams itself since the writer last ran
        self._timer: CoreTimer | None = None  # the current connection's
        self._progress = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.failure: str | None = None
        self._logged_failure: str | None = None
        self.connections_made = 0
        self.on_goaway: Callable[[StratumRMLink], None] | None = None
        """Called once when the sidecar sends ``rm.goaway`` (it is draining): the proxy moves its rigs."""
        self._goaway_reported = False
        self._run_scope = trio.CancelScope()

    @property
    def udp_send_drops(self) -> int:
        """Datagrams of the current session the kernel had no send-buffer room for (not sent)."""
        return self._udp_sender.dropped if self._udp_sender is not None else 0

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The context the next connection will use."""
        return self.credentials.context

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the link's tasks; start it once in the proxy's nursery."""
        with self._run_scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()

    @property
    def going_away(self) -> bool:
        """The sidecar said ``rm.goaway``: no new channel belongs on this link."""
        return self.connection is not None and self.connection.goaway is not None

    @property
    def channels_open(self) -> int:
        return len(self._handles)

    def retire(self, reason: str) -> None:
        """Close this link for good (its rigs moved after ``rm.goaway``) and end its tasks."""
        connection = self.connection
        if connection is not None:
            connection.close(reason, trio.current_time())
        self._stepped()
        self._run_scope.cancel()

    async def connect(self) -> None:
        """Open the connection now (before any rig needs it); raises ConnectionError on failure."""
        await self._live_connection()

    def kick(self) -> None:
        """Something is queued to send (or a deadline moved): send it.

        A lone share's datagram goes at once, from the caller's task (it reaches the
        socket in the input that produced it, not one trip through trio's scheduler
        later: a UDP send never waits). Once a datagram went that way, shares queued
        before the writer has run (other rigs' inputs in the same scheduler batch:
        shares with company) wait for the writer and leave together, in one
        SHARE_BATCH. Control bytes are handed to the writer, which alone writes the
        TLS stream. The timer is woken only when the deadline moved earlier.
        """
        connection = self.connection
        if connection is not None:
            if connection.close_reason is None and not self._sent_at_once:
                self._sent_at_once = self._send_datagrams(connection)
                if self._sent_at_once:
                    self._kick.set()  # the writer ends the burst: what comes before it goes together
            else:
                self._kick.set()
            data = connection.data_to_send()
            if data:
                self._control += data
                self._kick.set()
        else:
            self._kick.set()
        if self._timer is not None:
            self._timer.wake_if_sooner()

    def _send_datagrams(self, connection: StratumRMConnection) -> bool:
        """Send what the connection queued (never waits: a full buffer drops, as a network would); True if any."""
        datagrams = connection.datagrams_to_send(trio.current_time())
        sender = self._udp_sender
        if not datagrams or sender is None:
            return False
        for datagram in datagrams:
            try:
                sender.send(datagram)
            except OSError as exc:
                log.debug("UDP send error: %s", exc)
        return True

    async def open_handle(self, peer: str) -> RMUpstreamHandle:
        """A channel for a new rig; connects first if there is no live connection."""
        connection = await self._live_connection()
        handle = RMUpstreamHandle(self, connection.open_channel(peer))
        self._handles[handle.session.ch] = handle
        self.kick()
        return handle

    def close_channel(self, handle: RMUpstreamHandle) -> None:
        self._handles.pop(handle.session.ch, None)
        connection = self.connection
        if connection is not None and handle.session.ch in connection.channels:
            connection.close_channel(handle.session)
            self.kick()

    async def _live_connection(self) -> StratumRMConnection:
        if self.connection is not None and self.connection.close_reason is None and self._ready.is_set():
            return self.connection
        if not self._connecting:
            self._connecting = True
            self._ready = trio.Event()
            self._attempts += 1
            assert self._nursery is not None
            self._nursery.start_soon(self._connect_and_serve, self._attempts)
        await self._ready.wait()
        if self.connection is None or self.connection.close_reason is not None:
            raise ConnectionError(self.failure or "StratumRM connection failed")
        return self.connection

    def _attempt_over(self, attempt: int) -> None:
        """Attempt ``attempt`` is ready or over: wake its waiters, unless a newer attempt began."""
        if attempt == self._attempts:
            self._connecting = False
            self._ready.set()

    async def _connect_and_serve(self, attempt: int) -> None:
        async with self._one_session:
            await self._session(attempt)

    async def _session(self, attempt: int) -> None:
        bind_connection("sidecar")
        url = self.url
        connection = StratumRMConnection(
            agent=f"stratumrm/{__version__}", detect_blocks=self.detect_blocks, batch_window=self.batch_window
        )
        address = (url.host, url.port)
        try:
            stream, context = await self._open_tls()
        except (OSError, trio.BrokenResourceError, ValueError) as exc:
            self.credentials.forget_session(address)
            self.failure = describe_error(exc)
            # Once per distinct failure: a sidecar that stays down is not a warning per retry.
            repeated = self.failure == self._logged_failure
            self._logged_failure = self.failure
            (log.debug if repeated else log.warning)(
                "cannot connect to sidecar %s: %s; check the address, the certificates (stratumrm pki) "
                "and that the sidecar runs%s",
                url,
                self.failure,
                "" if repeated else " (retrying quietly)",
            )
            self._attempt_over(attempt)
            return
        self._stream = stream
        self._control.clear()  # the previous connection's, never to be sent
        self._sent_at_once = False
        self.connection = connection
        self._timer = timer = CoreTimer(connection)
        self.connections_made += 1
        connection.start(trio.current_time())
        self.kick()
        guard = self.containment.guard(str(url), "StratumRM session")
        # A stop must not cut a TLS record in half: the goodbye below needs an intact stream.
        sends = WholeSends(GOODBYE_TIMEOUT)
        try:
            async with guard, trio.open_nursery() as nursery:
                nursery.start_soon(self._read_control, connection, stream, nursery.cancel_scope)
                nursery.start_soon(self._write, connection, stream, sends)
                nursery.start_soon(sends.hurry_when_cancelled)
                nursery.start_soon(self._run_timer, connection, timer)
                with trio.move_on_after(self.connect_timeout):
                    while not connection.ready and connection.close_reason is None:
                        await self._step_wait()
                if not connection.ready:
                    connection.close("no answer to rm.hello", trio.current_time())
                    self.failure = connection.close_reason  # not the previous connection's
                    self.credentials.forget_session(address)
                else:
                    # The hello result came after the tickets: this session can resume.
                    self.credentials.remember_session(address, context, stream.session)
                    await self._open_udp(connection, nursery)
                    self._logged_failure = None
                    log.info(
                        "StratumRM session with %s ready (%s)",
                        url,
                        f"UDP on port {connection.hello.udp_port}" if connection.hello.udp_port else "TLS only",
                    )
                self._attempt_over(attempt)
                while connection.close_reason is None:
                    await self._step_wait()
                nursery.cancel_scope.cancel()
        finally:
            if guard.error is not None and connection.close_reason is None:
                connection.close("internal error; the next rig opens a new session", trio.current_time())
            reason = connection.close_reason or "closed"
            self.failure = reason
            # The rm.error of a deliberate close (C9); nothing else is queued once it is over.
            farewell = connection.data_to_send() if connection.close_reason is not None else b""
            if farewell:
                with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_TIMEOUT):
                    try:
                        await stream.send_all(farewell)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
            quiet = reason == "closed" or self._goaway_reported
            (log.info if quiet else log.warning)("StratumRM session with %s ended: %s", url, reason)
            connection.connection_lost(reason, trio.current_time())
            self._deliver()
            self._handles.clear()
            self._attempt_over(attempt)
            if reason == "closed":
                # A normal stop (the proxy shutting down): say goodbye (TLS close_notify) so the
                # sidecar logs a clean close, not a broken connection; never wait long for it.
                with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_TIMEOUT):
                    try:
                        await stream.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
            await close_quietly(stream)
            if self._udp_sender is not None:
                self._udp_sender.close()
                self._udp_sender = None
            if self._udp_twin is not None:
                self._udp_twin.close()
                self._udp_twin = None
            if self._udp is not None:
                self._udp.close()
                self._udp = None

    async def _open_tls(self) -> tuple[trio.SSLStream, ssl.SSLContext]:
        """Connect and run the TLS handshake, resuming the last session when possible."""
        url = self.url
        credentials = self.credentials
        try:
            if credentials.reload_if_changed():
                certificate = credentials.certificate
                serial = f"{certificate.serial_number:X}" if certificate is not None else "?"
                log.info("certificate reloaded from %s (serial %s); new connections use it", credentials.certificate_file, serial)
        except PKIError as exc:
            log.warning("certificate not reloaded: %s", exc)
        context = credentials.context
        session = credentials.session_for((url.host, url.port))
        with trio.move_on_after(self.connect_timeout):
            tcp = await trio.open_tcp_stream(url.host, url.port)
            tune_stream(tcp)
            tls = trio.SSLStream(tcp, context, server_hostname=url.host, https_compatible=False)
            if session is not None:
                try:
                    tls.session = session
                except (ValueError, ssl.SSLError):
                    credentials.forget_session((url.host, url.port))
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
            credentials.note_handshake(tls.session_reused)
            return tls, context
        raise OSError(f"connecting to {url.host}:{url.port} timed out after {self.connect_timeout:g} s")

    async def _step_wait(self) -> None:
        """Wait until the connection has processed something (callers re-check their condition)."""
        event = trio.Event()
        self._progress = event
        await event.wait()

    def _stepped(self) -> None:
        self._progress.set()

    async def _open_udp(self, connection: StratumRMConnection, nursery: trio.Nursery) -> None:
        hello = connection.hello
        if hello is None or not hello.udp_port:
            return
        host = hello.udp_host or self.url.host
        info = await trio.socket.getaddrinfo(host, hello.udp_port, type=socket.SOCK_DGRAM)
        family, _, _, _, address = info[0]
        udp = trio.socket.socket(family, socket.SOCK_DGRAM)
        tune_udp(udp)
        await udp.connect(address)
        self._udp = udp
        self._udp_sender = DatagramSender(udp)
        self._udp_twin = nonblocking_twin(udp)
        nursery.start_soon(self._read_udp, connection, udp)
        connection.probe(trio.current_time())  # keys may have come before the socket
        self.kick()

    def _deliver(self) -> None:
        """Wake every rig whose channel has events."""
        connection = self.connection
        if connection is not None and connection.goaway is not None and not self._goaway_reported and self.on_goaway is not None:
            self._goaway_reported = True
            self.on_goaway(self)
        ready, self._with_events = self._with_events, []
        handles = self._handles
        for handle in ready:
            if handle.session.events and handles.get(handle.session.ch) is handle:
                handle._events_ready()
        if connection is not None:
            self.kick()
        self._stepped()

    async def _read_control(self, connection: StratumRMConnection, stream, scope: trio.CancelScope) -> None:
        while connection.close_reason is None:
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                connection.connection_lost(f"control connection error: {describe_error(exc)}", trio.current_time())
                break
            if not data:
                connection.connection_lost("sidecar closed the control connection", trio.current_time())
                break
            connection.receive_data(data, trio.current_time())
            self._deliver()
        self._stepped()

    def _datagram_reader(self, connection: StratumRMConnection) -> Callable[[bytes, object, float], StratumRMConnection | None]:
        def on_datagram(data: bytes, address: object, now: float) -> StratumRMConnection | None:
            try:
                connection.receive_datagram(data, address, now)
            except Exception as exc:
                self.containment.record(exc, address, "datagram")
                return None
            return connection

        return on_datagram

    async def _read_udp(self, connection: StratumRMConnection, udp) -> None:
        def after_batch(_touched: set) -> None:
            self._deliver()  # once per batch: waking the rigs is the costly part

        await receive_datagrams(udp, self._datagram_reader(connection), DATAGRAM_SIZE, after_batch)

    async def _write(self, connection: StratumRMConnection, stream, sends: WholeSends) -> None:
        """The only writer of the control stream (datagrams are sent by :meth:`kick`)."""
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            self._sent_at_once = False
            if connection.close_reason is None:
                self._send_datagrams(connection)
            self._control += connection.data_to_send()
            data = bytes(self._control)
            self._control.clear()
            if data:
                try:
                    await sends.send_all(stream, data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    connection.connection_lost(f"control connection error: {describe_error(exc)}", trio.current_time())
                    self._stepped()
                    return

    async def _run_timer(self, connection: StratumRMConnection, timer: CoreTimer) -> None:
        def on_due(now: float, deadline: float) -> None:
            if now >= connection.silent_deadline():
                if unread_bytes(self._stream):
                    connection.input_waiting(now)  # busy here, not a silent sidecar
                elif (age := peer_ack_age(self._stream)) is not None:
                    connection.peer_acknowledged(age, now)  # a busy sidecar still acknowledges
            if self._udp_twin is not None:
                # A late timer (this process was descheduled) first reads what already
                # arrived: the acknowledgement it is about to give up on may be waiting.
                read_pending(self._udp_twin, self._datagram_reader(connection), DATAGRAM_SIZE, now, set())
            connection.handle_timer(now, deadline)  # late by now - deadline: this process's lag, not the sidecar's silence
            self._deliver()

        await run_timer(timer, on_due, running=lambda: connection.close_reason is None)
        self._stepped()
