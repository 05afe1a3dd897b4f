"""The proxy's upstreams on the wire: how to open a session on each, and each one's probe.

An :class:`Upstream` is one configured pool or sidecar. :meth:`Upstream.open_session`
gives a rig (or the probe) its own session there: a plain SV1 connection
(:class:`~bridge.net.sv1_upstream.SV1Upstream`) or a channel on the shared
StratumRM link (:class:`~bridge.net.rm_upstream.RMUpstreamHandle`), both with the
same ``session`` / ``flush`` / ``receive`` / ``aclose`` shape.

A :class:`Probe` keeps one session per upstream connected and authorized, owned
by the proxy, for the failover policy (:mod:`bridge.relay.failover`): it
subscribes with the proxy's own user agent and authorizes as the first rig's
worker name (or ``--probe-user``), so pools see an ordinary worker, and it
reports the subscribe result (connected), every ``mining.notify`` (prevhash),
every line (traffic) and every failure (refused, reset, closed, TLS, StratumRM
link dead) to the policy. When the policy asks for a keepalive it sends
``mining.authorize`` again (every pool answers it) or ``mining.ping``. A lost
probe reconnects with exponential backoff (0.5 s to 5 s). ``mining.ping`` and
``client.get_version`` from the pool are answered; ``client.reconnect`` counts
as a loss (pools send it before maintenance) and the probe reconnects.

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
from typing import TYPE_CHECKING, Any

import trio
from msgspec import Raw

from bridge import __version__
from bridge.config import UpstreamEntry
from bridge.net.rm_upstream import RMUpstreamHandle, StratumRMLink
from bridge.net.sv1_upstream import SV1Upstream
from bridge.net.tcp import describe_error
from bridge.sv1.events import Reply
from bridge.sv1.messages import NULL, GetVersion, Notify, Ping, Reconnect, Response

if TYPE_CHECKING:
    from bridge.relay.failover import FailoverPolicy

log = logging.getLogger("bridge.proxy.failover")

PROBE_AGENT = f"stratumrm-probe/{__version__}"
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 5.0
POOL_STATUS_POLL = 0.05
KEEPALIVE_METHODS = ("authorize", "ping")

Session = SV1Upstream | RMUpstreamHandle
NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ValueError, ConnectionError)


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
            self.link = StratumRMLink(self.url, ssl_context, connect_timeout=connect_timeout, batch_window=batch_window)

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
    """The proxy's own session on one upstream, for health (see the module docs)."""

    def __init__(
        self,
        upstream: Upstream,
        policy: "FailoverPolicy",
        wake: Any,
        *,
        keepalive: str = "authorize",
    ) -> None:
        self.upstream = upstream
        self.policy = policy
        self.wake = wake  # called after every report to the policy
        self.keepalive_method = keepalive
        self.identity: tuple[str, str | None] | None = None
        self._identity_known = trio.Event()
        self.session: Session | None = None
        self.connections = 0
        self.keepalives = 0
        self._pool_up = True
        self._serve_scope = trio.CancelScope()

    def set_identity(self, user: str, password: str | None) -> None:
        if self.identity is None:
            self.identity = (user, password)
            self._identity_known.set()

    async def run(self) -> None:
        await self._identity_known.wait()
        backoff = BACKOFF_FIRST
        upstream = self.upstream
        index = upstream.index
        while True:
            try:
                session = await upstream.open_session("probe")
            except NETWORK_ERRORS as exc:
                self.policy.lost(index, f"cannot connect: {describe_error(exc)}", trio.current_time(), connect_failed=True)
                self.wake()
                await self._back_off(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self.connections += 1
            self.session = session
            self._serve_scope = trio.CancelScope()
            try:
                with self._serve_scope:
                    reason, subscribed = await self._serve(session)
            finally:
                self.session = None
                await session.aclose()
            if self._serve_scope.cancelled_caught:
                continue  # relink(): the sidecar went away; reconnect at once, nothing was lost
            self.policy.lost(index, reason, trio.current_time(), connect_failed=not subscribed)
            self.wake()
            if subscribed:
                backoff = BACKOFF_FIRST
            await self._back_off(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def relink(self) -> None:
        """The upstream's StratumRM link was replaced (``rm.goaway``): reopen the probe on the new one."""
        self._serve_scope.cancel()

    def _check_pool_status(self) -> bool | None:
        """Report the sidecar's ``rm.pool`` view of its pool to the policy; None without one."""
        link = self.upstream.link
        connection = None if link is None else link.connection
        if connection is None or connection.close_reason is not None:
            return None
        up = connection.pool_up
        if up != self._pool_up:
            self._pool_up = up
            detail = connection.pool_reason or "the sidecar cannot reach its pool"
            self.policy.pool_status(self.upstream.index, up, f"{detail} (rm.pool from the sidecar)", trio.current_time())
            self.wake()
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

    async def _serve(self, session: Session) -> tuple[str, bool]:
        assert self.identity is not None
        user, password = self.identity
        client = session.session
        index = self.upstream.index
        policy = self.policy
        client.subscribe(PROBE_AGENT, None, context="subscribe")
        client.request("mining.authorize", [user, password or "x"], context="authorize")
        subscribed = False
        try:
            await session.flush()
            while True:
                events = await session.receive()
                now = trio.current_time()
                if events is None:
                    return "the pool closed the connection", subscribed
                policy.traffic(index, now)
                if self.upstream.link is not None:
                    self._check_pool_status()
                for event in events:
                    kind = type(event)
                    if kind is Notify:
                        policy.job(index, event.params.prevhash, now)
                    elif kind is Reply:
                        if event.context == "subscribe":
                            if not event.response.accepted and bytes(event.response.error) != b"null":
                                return f"subscribe refused: {bytes(event.response.error).decode(errors='replace')}", False
                            subscribed = True
                            policy.connected(index, now)
                        elif event.context == "authorize" and not event.accepted:
                            log.warning(
                                "probe on %s: worker %r not authorized (%s); health is still measured",
                                self.upstream.name, user, bytes(event.response.error).decode(errors="replace"),
                            )
                    elif kind is Ping and event.id is not None:
                        client.respond_raw(Response(event.id, Raw(b'"pong"'), NULL))
                    elif kind is GetVersion and event.id is not None:
                        client.respond_raw(Response(event.id, Raw(f'"{PROBE_AGENT}"'.encode()), NULL))
                    elif kind is Reconnect:
                        return "the pool sent client.reconnect", subscribed
                    elif getattr(event, "fatal", False):
                        return f"pool protocol violation: {event.reason}", subscribed
                self.wake()
                await session.flush()
        except NETWORK_ERRORS as exc:
            return f"connection error: {describe_error(exc)}", subscribed

    async def keepalive(self) -> None:
        """Ask the pool for an answer (any answer is proof of life)."""
        session = self.session
        if session is None or self.identity is None:
            return
        client = session.session
        try:
            if self.keepalive_method == "ping":
                client.request("mining.ping", [], context="keepalive")
            else:
                user, password = self.identity
                client.request("mining.authorize", [user, password or "x"], context="keepalive")
            self.keepalives += 1
            await session.flush()
        except (RuntimeError, OverflowError):
            pass  # the session is closing, or the pool stopped answering long ago
        except NETWORK_ERRORS:
            pass  # the reader sees the failure
