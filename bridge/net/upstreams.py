"""The proxy's upstreams on the wire: how to open a session on each, and each one's probe.

An :class:`Upstream` is one configured pool or sidecar. :meth:`Upstream.open_session`
gives a rig (or the probe) its own session there: a plain SV1 connection
(:class:`~bridge.net.sv1_upstream.SV1Upstream`) or a channel on the shared
StratumRM link (:class:`~bridge.net.rm_upstream.RMUpstreamHandle`), both with the
same ``session`` / ``flush`` / ``receive`` / ``aclose`` shape.

A :class:`Probe` keeps one session per upstream connected, owned by the proxy,
for the failover policy (:mod:`bridge.relay.failover`), from the proxy's start,
whatever the order in which the proxy, the upstreams and the rigs come up: it
subscribes with the proxy's own user agent (a subscribe needs no worker name) and,
once a worker name is known (``--probe-user`` or the first rig's), authorizes
**once** per connection, so pools that send jobs only to authorized workers see an
ordinary worker. It feeds the session's events and every failure (refused,
reset, closed, TLS, StratumRM link dead) to the proxy core
(:class:`~bridge.relay.proxy.ProxyCore`), which reads them as health
(:class:`~bridge.relay.health.ProbeReader`: the subscribe result, every
``mining.notify`` and its prevhash, every line) for the policy. A lost probe reconnects
with exponential backoff (0.5 s to 5 s). ``mining.ping`` and
``client.get_version`` from the pool are answered; ``client.reconnect`` counts as
a loss (pools send it before maintenance) and the probe reconnects.

When the core asks for a keepalive (a quiet upstream must prove it is alive),
the probe asks only what pools answer without complaint (bridge/relay/health.py):
never ``mining.authorize`` again (ckpool never answers a second one and logs
"trying to authorise twice"). ``subscribe`` (the default): a plain SV1 upstream
gets one *fresh* connection's ``mining.subscribe``, as cgminer tests a pool
(:func:`~bridge.net.health.check_subscribe`; its answer is traffic, a stalled pool
gives none; the next check's connection is opened after each check, so a check
times the pool's answer rather than the TCP handshake, and is replaced after 30 s); a StratumRM upstream is alive while its link is open (the link
closes itself when the sidecar is silent for ``dead_after``, rm.ping keeping a
healthy one talking), and the pool behind it is the
sidecar's to watch (``rm.pool``). ``ping``: ``mining.ping`` on the probe session
(for pools known to answer it).

Behind a StratumRM sidecar that negotiated ``pool-status``, the sidecar's
``rm.pool`` reports (its own reconnection attempts to the pool software) reach
the policy as ``pool down`` / up, and a probe waiting to reconnect retries as soon
as the sidecar says its pool is back.

For a StratumRM upstream the probe is one more channel on the shared link, so it
also keeps the link (TLS control connection and UDP flow) open and warm: a rig
moved there opens its channel with one round trip, no handshake.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from bridge import __version__
from bridge.config import UpstreamEntry
from bridge.net.containment import Containment
from bridge.net.health import check_subscribe
from bridge.net.rm_upstream import RMUpstreamHandle, StratumRMLink
from bridge.net.sv1_upstream import SV1Upstream
from bridge.net.tcp import close_quietly, describe_error, open_stream
from bridge.relay.proxy import Event, KeepaliveResult, PoolStatus, ProbeEvents, ProbeFailed, ProbeLost, ProbeOpened

log = logging.getLogger("bridge.proxy.failover")

PROBE_AGENT = f"stratumrm-probe/{__version__}"
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 5.0
POOL_STATUS_POLL = 0.05
#: A spare check connection older than this is replaced (pools may drop idle, unsubscribed ones).
SPARE_MAX_AGE = 30.0

Session = SV1Upstream | RMUpstreamHandle
NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ValueError, ConnectionError)


PROBE_PEER = "probe"
"""The peer name of the probe's channel, so a sidecar can tell it from rigs."""


class Upstream:
    """One configured upstream: its URL, policy spec and transport."""

    def __init__(
        self,
        index: int,
        entry: UpstreamEntry,
        *,
        ssl_context: Any = None,
        connect_timeout: float = 10.0,
        batch_window: float = 0.0,
        containment: Containment | None = None,
    ) -> None:
        self.index = index
        self.entry = entry
        self.url = entry.url
        self.name = entry.label
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.link: StratumRMLink | None = None
        if self.url.transport == "stratumrm":
            if ssl_context is None:
                raise ValueError(f"{self.url}: a stratumrm:// upstream needs the proxy's certificate (TLS client context)")
            self.link = StratumRMLink(
                self.url,
                ssl_context,
                connect_timeout=connect_timeout,
                batch_window=batch_window,
                containment=containment,
            )

    async def open_session(self, peer: str) -> Session:
        """A new session for one rig (or the probe); raises a network error on failure."""
        if self.link is not None:
            return await self.link.open_handle(peer)
        context = self.ssl_context if self.url.tls else None
        if self.url.tls and not isinstance(context, ssl.SSLContext):
            raise ValueError(f"{self.url} needs a TLS context (--upstream-ca)")
        return await SV1Upstream.connect(self.url, ssl_context=context, timeout=self.connect_timeout)

    def __repr__(self) -> str:
        return f"<Upstream {self.index} {self.name}>"


class Probe:
    """The trio driver of the proxy's own session on one upstream (see the module docs).

    What the session's events mean for health is the core's
    (:class:`~bridge.relay.health.ProbeReader` inside
    :class:`~bridge.relay.proxy.ProxyCore`); this class opens the session, reconnects
    with backoff, feeds the core, and runs the keepalive checks the core asks for.
    """

    def __init__(
        self, upstream: Upstream, feed: Callable[[Event], None], *, keepalive: str = "subscribe", check_timeout: float = 5.0
    ) -> None:
        self.upstream = upstream
        self.keepalive = keepalive
        self.feed = feed  # hands an event to the proxy core and executes its commands
        self.check_timeout = check_timeout
        self.session: Session | None = None
        self.end_reason: str | None = None
        self._checking = False
        self._flushing = False
        self._spare: tuple[trio.abc.Stream, float] | None = None  # (connection, opened at) for the next check
        self._nursery: trio.Nursery | None = None
        self._pool_up = True
        self._serve_scope = trio.CancelScope()
        self._subscribed: Callable[[], bool] = lambda: False

    async def run(self, subscribed: Callable[[], bool], containment: Containment) -> None:
        """``subscribed``: whether the core saw the current session's subscribe result."""
        self._subscribed = subscribed
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._run(containment)

    async def _run(self, containment: Containment) -> None:
        backoff = BACKOFF_FIRST
        upstream = self.upstream
        index = upstream.index
        while True:
            try:
                session = await upstream.open_session(PROBE_PEER)
            except NETWORK_ERRORS as exc:
                self.feed(ProbeFailed(index, describe_error(exc)))
                await self._back_off(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self.session = session
            self.end_reason = None
            reason = "internal error"
            self._serve_scope = trio.CancelScope()
            try:
                with self._serve_scope, containment.guard(upstream.name, "probe session") as guard:
                    self.feed(ProbeOpened(index, session.session))
                    if self.keepalive_spare_wanted():
                        self._start(self._open_spare)  # ready for the first check
                    reason = await self._serve(session)
                if guard.error is not None:
                    reason = f"internal error ({type(guard.error).__name__})"
            finally:
                self.session = None
                await session.aclose()
                await self.close_spare()
            if self._serve_scope.cancelled_caught:
                continue  # relink(): the sidecar went away; reconnect at once, nothing was lost
            subscribed = self._subscribed()
            self.feed(ProbeLost(index, reason))
            if subscribed:
                backoff = BACKOFF_FIRST
            await self._back_off(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def keepalive_spare_wanted(self) -> bool:
        """Fresh-connection checks will be asked for (a plain SV1 upstream, keepalive ``subscribe``)."""
        return self.upstream.link is None and self.keepalive == "subscribe"

    def _start(self, function: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(function)

    def relink(self) -> None:
        """The upstream's StratumRM link was replaced (``rm.goaway``): reopen the probe on the new one."""
        self._serve_scope.cancel()

    def end(self, reason: str) -> None:
        """The core ends the session (``CloseProbe``): the reader returns ``reason``."""
        self.end_reason = reason

    def kick(self) -> None:
        """Write what the core queued on the session (``FlushProbe``)."""
        if not self._flushing and self.session is not None:
            self._flushing = True
            self._start(self._flush)

    async def _flush(self) -> None:
        self._flushing = False
        session = self.session
        if session is None:
            return
        try:
            await session.flush()
        except NETWORK_ERRORS:
            pass  # the reader sees the failure

    def _check_pool_status(self) -> bool | None:
        """Report the sidecar's ``rm.pool`` view of its pool to the core; None without one."""
        link = self.upstream.link
        connection = None if link is None else link.connection
        if connection is None or connection.close_reason is not None:
            return None
        up = connection.pool_up
        if up != self._pool_up:
            self._pool_up = up
            self.feed(PoolStatus(self.upstream.index, up, connection.pool_reason or ""))
        return up

    async def _back_off(self, seconds: float) -> None:
        """Wait before reconnecting; for StratumRM, retry at once when the sidecar says its pool is back."""
        if self.upstream.link is None:
            await trio.sleep(seconds)
            return
        was_down = self._check_pool_status() is False
        with trio.move_on_after(seconds):
            while True:
                up = self._check_pool_status()
                if was_down and up:
                    return
                was_down = was_down or up is False
                await trio.sleep(POOL_STATUS_POLL)

    async def _serve(self, session: Session) -> str:
        index = self.upstream.index
        try:
            await session.flush()
            while True:
                events = await session.receive()
                if events is None:
                    return "the pool closed the connection"
                if self.upstream.link is not None:
                    self._check_pool_status()
                self.feed(ProbeEvents(index, events))
                if self.end_reason is not None:
                    return self.end_reason
                await session.flush()
        except NETWORK_ERRORS as exc:
            return f"connection error: {describe_error(exc)}"

    async def check(self) -> None:
        """The keepalive the core asked for (``CheckUpstream``, SV1 upstreams only); the outcome
        goes back as ``KeepaliveResult``."""
        upstream = self.upstream
        index = upstream.index
        if self._checking or self.session is None:
            return  # one fresh-connection check at a time
        self._checking = True
        started = trio.current_time()
        url = upstream.url
        context = upstream.ssl_context if url.tls else None
        spare, self._spare = self._spare, None
        stream = None
        if spare is not None:
            if started - spare[1] < SPARE_MAX_AGE:
                stream = spare[0]
            else:
                await close_quietly(spare[0])
        try:
            verdict = await check_subscribe(
                url.host,
                url.port,
                agent=PROBE_AGENT,
                ssl_context=context,
                timeout=self.check_timeout,
                connect_timeout=upstream.connect_timeout,
                stream=stream,
            )
            if not verdict.up and stream is not None:
                # The spare may have been closed by the pool while it waited: judge on a new connection.
                verdict = await check_subscribe(
                    url.host,
                    url.port,
                    agent=PROBE_AGENT,
                    ssl_context=context,
                    timeout=self.check_timeout,
                    connect_timeout=upstream.connect_timeout,
                )
        finally:
            self._checking = False
        log.debug("probe on %s: keepalive check %s in %.3f s", upstream.name, verdict, trio.current_time() - started)
        self.feed(KeepaliveResult(index, verdict.up is True, verdict.reason))
        if verdict.up:
            await self._open_spare()

    async def _open_spare(self) -> None:
        """Connect the next check's connection now, so the check times the pool's answer, not TCP's."""
        upstream = self.upstream
        url = upstream.url
        try:
            stream = await open_stream(
                url.host,
                url.port,
                ssl_context=upstream.ssl_context if url.tls else None,
                timeout=upstream.connect_timeout,
            )
        except NETWORK_ERRORS:
            return  # the next check connects itself, and says why it cannot
        if self._spare is not None or self.session is None:
            await close_quietly(stream)
            return
        self._spare = (stream, trio.current_time())

    async def close_spare(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            await close_quietly(spare[0])
