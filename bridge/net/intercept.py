"""Transparent interception at a farm gateway: rigs keep the pool URL they already have.

The gateway's kernel redirects the rigs' connections to the pool into the proxy
(nftables ``redirect`` / iptables ``REDIRECT``; examples in ``deploy/nftables``).
The proxy then learns where each connection was going (``SO_ORIGINAL_DST``, the
address before the NAT rewrite) and picks the upstream from the ``[[intercept]]``
tables of its configuration::

    [[intercept]]
    match = "pool.example.com:3333"
    upstream = "stratumrm://sidecar.example.com:3334"

    intercept_default = "pass"     # or "refuse"

- a destination that matches a rule is served by a :class:`~bridge.net.miner_proxy.MinerProxy`
  whose upstream is the rule's (one per distinct upstream URL; each has its failover,
  probe and StratumRM link as usual);
- a connection that was not redirected (its original destination is the proxy's own
  address, or the socket has none) goes to the proxy's regular ``--upstream`` if
  there is one, and is refused otherwise;
- any other destination follows ``intercept_default``: ``pass`` connects to the
  original destination and carries the bytes both ways untouched (traffic the
  gateway redirected by a rule broader than the pools), ``refuse`` closes it.

Names in ``match`` are resolved once at start (each address of the name matches).
Every decision is logged at info, with the rig and both addresses.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from bridge.config import UpstreamURL, parse_upstream_url
from bridge.errors import ConfigError
from bridge.net.admission import Admission, AdmissionLimits
from bridge.net.listen import Pending, serve_admitted
from bridge.net.tcp import close_quietly, peer_name, socket_of, tune_stream

if TYPE_CHECKING:
    from bridge.settings import InterceptSettings

__all__ = ["SO_ORIGINAL_DST", "InterceptRule", "InterceptServer", "original_destination", "parse_rules"]

log = logging.getLogger("bridge.proxy.intercept")

SO_ORIGINAL_DST = 80
"""``linux/netfilter_ipv4.h``: getsockopt(SOL_IP, SO_ORIGINAL_DST) gives a sockaddr_in."""
IP6T_SO_ORIGINAL_DST = 80
"""``linux/netfilter_ipv6/ip6_tables.h``: the same on SOL_IPV6, a sockaddr_in6."""
PASS_BUFFER = 65536
PASS_CONNECT_TIMEOUT = 10.0
DEFAULTS = ("pass", "refuse")


def original_destination(sock: Any) -> tuple[str, int] | None:
    """Where a NAT-redirected connection was going, or None (not redirected, no conntrack)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
            if host.startswith("::ffff:") and "." in host:
                host = host[7:]
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack_from("!H", raw, 2)[0]
            host = socket.inet_ntop(socket.AF_INET, raw[4:8])
    except OSError:
        return None
    return host, port


class InterceptRule:
    """``match`` (HOST:PORT) and the upstream URL its connections go to."""

    def __init__(self, match: str, upstream: UpstreamURL) -> None:
        host, colon, port = match.rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"[[intercept]] match {match!r}: write HOST:PORT, the pool address the rigs use")
        self.match = match
        self.host = host
        self.port = int(port)
        self.upstream = upstream
        self.addresses: set[tuple[str, int]] = set()

    async def resolve(self) -> None:
        try:
            infos = await trio.socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(
                f"[[intercept]] match {self.match!r}: cannot resolve {self.host}: {exc}; "
                "write the pool's IP address or fix the gateway's DNS"
            ) from None
        self.addresses = {(info[4][0], self.port) for info in infos}


def parse_rules(entries: Sequence[InterceptSettings]) -> list[InterceptRule]:
    rules = []
    for entry in entries:
        try:
            upstream = parse_upstream_url(entry.upstream)
        except ConfigError as exc:
            raise ConfigError(f"[[intercept]] match {entry.match!r}: {exc}") from None
        rules.append(InterceptRule(entry.match, upstream))
    return rules


class InterceptServer:
    """One listener for redirected (and direct) rigs, dispatching by original destination.

    ``proxies`` maps each rule's upstream URL (as text) to the MinerProxy that serves
    it; ``direct`` serves connections that were not redirected (None: refuse them).
    """

    def __init__(self, rules: list[InterceptRule], proxies: dict[str, Any], direct: Any = None, *, default: str = "pass") -> None:
        if default not in DEFAULTS:
            raise ConfigError(f'intercept_default = {default!r}: write "pass" or "refuse"')
        self.rules = rules
        self.proxies = proxies
        self.direct = direct
        self.default = default
        self.port: int | None = None
        self.counts: dict[str, int] = {"intercepted": 0, "direct": 0, "passed": 0, "refused": 0}
        # One admission for the shared listener (rigs before their first request, per source).
        first = next(iter([*proxies.values(), direct]), None)
        limits = getattr(first, "admission", None)
        self.admission = Admission("proxy intercept port", limits.limits if limits is not None else AdmissionLimits())

    def route(self, destination: tuple[str, int] | None, local: tuple[str, int]) -> Any:
        """The MinerProxy for this destination, or "pass" / "refuse"."""
        if destination is None or destination == local:
            return self.direct if self.direct is not None else "refuse"
        for rule in self.rules:
            if destination in rule.addresses:
                return self.proxies[str(rule.upstream)]
        return self.default

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        for rule in self.rules:
            await rule.resolve()
            log.info(
                "intercepting %s (%s) -> %s",
                rule.match,
                ", ".join(sorted(f"{h}:{p}" for h, p in rule.addresses)),
                rule.upstream,
            )
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        self.port = listeners[0].socket.getsockname()[1]
        log.info(
            "proxy accepting redirected rigs on %s:%d; unmatched destinations: %s; direct connections: %s",
            host,
            self.port,
            self.default,
            "regular upstreams" if self.direct is not None else "refused",
        )
        async with trio.open_nursery() as nursery:
            for proxy in {id(p): p for p in [*self.proxies.values(), self.direct] if p is not None}.values():
                await nursery.start(proxy.serve_streams)
            task_status.started(self.port)
            await serve_admitted(self._handle, listeners, self.admission)

    async def _handle(self, stream: trio.SocketStream, pending: Pending) -> None:
        sock = socket_of(stream)
        rig = peer_name(stream)
        try:
            local = sock.getsockname()[:2] if sock is not None else ("", 0)
        except OSError:
            await close_quietly(stream)
            return
        destination = original_destination(sock) if sock is not None else None
        target = self.route(destination, local)
        where = "direct" if destination is None or destination == local else f"{destination[0]}:{destination[1]}"
        if target == "refuse":
            self.counts["refused"] += 1
            log.info("rig %s to %s: refused (no [[intercept]] matches; intercept_default = refuse)", rig, where)
            await close_quietly(stream)
        elif target == "pass":
            self.counts["passed"] += 1
            assert destination is not None
            log.info("rig %s to %s: passed through untouched (no [[intercept]] matches)", rig, where)
            pending.established()  # not ours to judge: the destination's own limits apply
            await self._pass_through(stream, destination, rig)
        else:
            self.counts["direct" if where == "direct" else "intercepted"] += 1
            log.info("rig %s to %s: relayed through %s", rig, where, ", ".join(str(u.url) for u in target.upstreams))
            await target.handle_rig(stream, pending)

    async def _pass_through(self, stream: trio.SocketStream, destination: tuple[str, int], rig: str) -> None:
        try:
            with trio.fail_after(PASS_CONNECT_TIMEOUT):
                upstream = await trio.open_tcp_stream(*destination)
        except (OSError, trio.TooSlowError) as exc:
            log.warning("rig %s: pass-through to %s:%d failed: %s; the rig retries on its own", rig, *destination, exc)
            await close_quietly(stream)
            return
        tune_stream(upstream)
        async with trio.open_nursery() as nursery:

            async def pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                try:
                    while data := await source.receive_some(PASS_BUFFER):
                        await sink.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pipe, stream, upstream)
            nursery.start_soon(pipe, upstream, stream)
        await close_quietly(upstream)
        await close_quietly(stream)
