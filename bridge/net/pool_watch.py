"""The sidecar's watch on its pool software: reachable or not, and when it is back.

A thin trio driver around :class:`~bridge.relay.health.HealthWatch` (the schedule
and the verdict) and :func:`~bridge.net.health.check_subscribe` (one fresh
connection's ``mining.subscribe``, as cgminer tests a pool). Health rests on what
every pool answers without complaint (bridge/relay/health.py):

- :meth:`PoolWatch.alive`: the driver saw a line from the pool on a channel's pool
  connection (jobs arriving); nothing needs checking, and a pool that was down is
  up again at once;
- :meth:`PoolWatch.suspect`: a channel's pool connection ended or could not be
  opened (a single one ending says little: the pool may have dropped one rig), so
  a check runs now;
- ``quiet_after`` seconds with no line from the pool at all (a stalled pool
  process keeps its sockets open) also make a check run.

A failed check makes the pool **down**: ``on_change(False, reason)`` tells every
proxy session (``rm.pool``, bridge/wire/PROTOCOL.md C10), and checks repeat with
exponential backoff (0.5 s doubling to 10 s) until one succeeds or the pool
speaks, then ``on_change(True, "")``. One check runs at a time, however many
connections fail at once (a crashed pool resets them all).

:meth:`PoolWatch.check` is the one place a check is run. A check that fails because
**this host** is short of resources says nothing about the pool: connecting (or the
exchange) failed with EMFILE, ENFILE, ENOBUFS or ENOMEM, or ``local_shortage`` (the
sidecar's file-descriptor gauge, the same one admission control uses) reports a
shortage when the check fails. Such a check is *inconclusive* (``None``): nothing is
sent to the proxies (a flood of connections to the sidecar must not make them
release healthy rigs), a rate-limited warning says what is short, and the check is
tried again with the same backoff until it can tell.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Callable

import trio

from bridge import __version__
from bridge.config import UpstreamURL
from bridge.net.health import check_subscribe
from bridge.net.listen import is_resource_shortage
from bridge.net.tcp import describe_error, open_stream
from bridge.net.timer import CoreTimer
from bridge.relay.health import (
    DEFAULT_BACKOFF_FIRST,
    DEFAULT_BACKOFF_MAX,
    HealthWatch,
    Verdict,
)

log = logging.getLogger("bridge.sidecar.pool")

BACKOFF_FIRST = DEFAULT_BACKOFF_FIRST
BACKOFF_MAX = DEFAULT_BACKOFF_MAX
#: Seconds without a line from the pool before a check (ckpool sends a job every 10 s by default).
DEFAULT_QUIET_AFTER = 15.0
CHECK_AGENT = f"stratumrm-sidecar-check/{__version__}"
#: A repeated "cannot tell, this host is short of resources" is logged at most this often.
LOCAL_LOG_INTERVAL = 10.0


class PoolWatch:
    """Whether the pool software answers; see the module docs."""

    def __init__(
        self,
        pool: UpstreamURL,
        ssl_context: ssl.SSLContext | None,
        on_change: Callable[[bool, str], None],
        *,
        connect_timeout: float = 10.0,
        check_timeout: float = 5.0,
        quiet_after: float | None = DEFAULT_QUIET_AFTER,
        local_shortage: Callable[[], str | None] | None = None,
        proxy_protocol: bool = False,
    ) -> None:
        self.pool = pool
        self.ssl_context = ssl_context
        self.on_change = on_change
        self.connect_timeout = connect_timeout
        self.check_timeout = check_timeout
        self.proxy_protocol = proxy_protocol
        """Open each check with a PROXY v2 LOCAL header (a pool that requires the header)."""
        self.local_shortage = local_shortage
        #: Checks that could not tell because this host was short of resources.
        self.inconclusive = 0
        self._local_logged = -math.inf
        self.health = HealthWatch(0.0, quiet_after=quiet_after, backoff_first=BACKOFF_FIRST, backoff_max=BACKOFF_MAX)
        self._timer = CoreTimer(self.health)

    @property
    def up(self) -> bool:
        return self.health.up

    @property
    def reason(self) -> str:
        return self.health.reason

    @property
    def checks(self) -> int:
        return self.health.checks

    @property
    def outages(self) -> int:
        return self.health.outages

    def alive(self) -> None:
        """A line came from the pool on one of the channels' connections (cheap: call it on every read)."""
        self.health.alive(trio.current_time())
        self._report()

    def suspect(self, reason: str) -> None:
        """A pool connection ended or could not be opened: check the pool soon."""
        self.health.suspect(reason, trio.current_time())
        self._timer.wake()

    async def run(self) -> None:
        health = self.health
        health.start(trio.current_time())
        while True:
            await self._timer.sleep()
            self._timer.rearm()
            health.handle_timer(trio.current_time())
            if not health.checking:
                continue
            ok, reason = await self.check()
            health.check_done(Verdict(ok, reason), trio.current_time())
            self._report()

    def _report(self) -> None:
        for change in self.health.take_changes():
            if change.up:
                log.warning("pool %s is reachable again; proxies are told (rm.pool up)", self.pool)
            else:
                log.warning(
                    "pool %s is down (%s; after: %s); proxies are told (rm.pool down), checking again with backoff",
                    self.pool,
                    change.reason,
                    self.health.suspicion or "no line from the pool for a while",
                )
            self.on_change(change.up, change.reason)

    async def check(self) -> tuple[bool | None, str]:
        """Check the pool: (True, "") up, (False, why) down, (None, why) cannot tell (module docs)."""
        ok, reason = await self._check()
        if ok is False:
            local = self.local_shortage() if self.local_shortage is not None else None
            if local is not None:
                ok, reason = None, f"{local} ({reason})"
        if ok is None:
            self.inconclusive += 1
            now = trio.current_time()
            if now - self._local_logged >= LOCAL_LOG_INTERVAL:
                self._local_logged = now
                log.warning(
                    "cannot check pool %s: this host is short of resources: %s; proxies are NOT told the pool "
                    "is down, the check is retried (raise LimitNOFILE / ulimit -n, or look for a connection flood "
                    "in the admission statistics)",
                    self.pool,
                    reason,
                )
        return ok, reason

    async def _check(self) -> tuple[bool | None, str]:
        """Connect, subscribe, wait for the result (a fresh connection, closed afterwards)."""
        pool = self.pool
        try:
            stream = await open_stream(
                pool.host,
                pool.port,
                ssl_context=self.ssl_context if pool.tls else None,
                timeout=self.connect_timeout,
                proxy_header=self.proxy_protocol,
            )
        except (OSError, trio.BrokenResourceError, ValueError) as exc:
            if is_resource_shortage(exc):
                return None, f"connecting to pool {pool} failed locally: {describe_error(exc)}"
            return False, f"cannot connect to pool {pool}: {describe_error(exc)}"
        verdict = await check_subscribe(pool.host, pool.port, agent=CHECK_AGENT, timeout=self.check_timeout, stream=stream)
        return verdict.up, verdict.reason
