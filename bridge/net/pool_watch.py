"""The sidecar's watch on its pool software: reachable or not, and when it is back.

Each channel has its own pool connection, so a single one ending says little (the
pool may have dropped one rig). When one ends or cannot be opened, the sidecar
calls :meth:`PoolWatch.suspect`; the watch then *checks* the pool: it connects
(TLS for ``stratum+ssl``), sends ``mining.subscribe`` and waits for the subscribe
result. A result means the pool is up and nothing changes. Otherwise the pool is
**down**: ``on_change(False, reason)`` tells every proxy session (``rm.pool``,
bridge/wire/PROTOCOL.md C10) and the watch reconnects with exponential backoff
(0.5 s doubling to 10 s) until a check succeeds, then ``on_change(True, "")``.
However many connections fail at once (a crashed pool resets them all), one check
runs at a time.

A check that fails because **this host** is short of resources says nothing about the
pool: connecting failed with EMFILE, ENFILE, ENOBUFS or ENOMEM, or ``local_shortage``
(the sidecar's file-descriptor gauge, the same one admission control uses) reports
a shortage when the check fails. Such a check is *inconclusive*: nothing is sent to
the proxies (a flood of connections to the sidecar must not make them release
healthy rigs), a rate-limited warning says what is short, and the check is tried
again with the same backoff until it can tell.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections.abc import Callable

import trio

from bridge import __version__
from bridge.config import UpstreamURL
from bridge.net.listen import is_resource_shortage
from bridge.net.tcp import close_quietly, describe_error, open_stream

log = logging.getLogger("bridge.sidecar.pool")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
CHECK_AGENT = f"stratumrm-sidecar-check/{__version__}"
#: The longest line the check reads from the pool (a subscribe result is ~100 bytes).
MAX_CHECK_LINE = 65536
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
        self.up = True
        self.reason = ""
        self.local_shortage = local_shortage
        self.checks = 0
        self.outages = 0
        #: Checks that could not tell because this host was short of resources.
        self.inconclusive = 0
        self._local_logged = -math.inf
        self._suspected = trio.Event()
        self._trouble = ""

    def suspect(self, reason: str) -> None:
        """A pool connection ended or could not be opened: check the pool soon."""
        self._trouble = reason
        self._suspected.set()

    async def run(self) -> None:
        while True:
            await self._suspected.wait()
            self._suspected = trio.Event()
            if self.up:
                ok, reason = await self.check()
                backoff = BACKOFF_FIRST
                while ok is None:  # this host is short of resources: cannot tell, keep trying
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    ok, reason = await self.check()
                if ok:
                    continue
                self._change(False, reason)
            backoff = BACKOFF_FIRST
            while not self.up:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                ok, reason = await self.check()
                if ok:
                    self._change(True, "")
                elif ok is False:
                    self.reason = reason
            self._suspected = trio.Event()  # what failed during the outage is explained by it

    def _change(self, up: bool, reason: str) -> None:
        self.up = up
        self.reason = reason
        if up:
            log.warning("pool %s is reachable again; proxies are told (rm.pool up)", self.pool)
        else:
            self.outages += 1
            log.warning(
                "pool %s is down (%s; after: %s); proxies are told (rm.pool down), reconnecting with backoff",
                self.pool, reason, self._trouble,
            )
        self.on_change(up, reason)

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
                    self.pool, reason,
                )
        return ok, reason

    async def _check(self) -> tuple[bool | None, str]:
        self.checks += 1
        pool = self.pool
        try:
            stream = await open_stream(
                pool.host, pool.port, ssl_context=self.ssl_context if pool.tls else None, timeout=self.connect_timeout,
                proxy_header=self.proxy_protocol,
            )
        except (OSError, trio.BrokenResourceError, ValueError) as exc:
            if is_resource_shortage(exc):
                return None, f"connecting to pool {pool} failed locally: {describe_error(exc)}"
            return False, f"cannot connect to pool {pool}: {describe_error(exc)}"
        try:
            with trio.move_on_after(self.check_timeout):
                request = {"id": 1, "method": "mining.subscribe", "params": [CHECK_AGENT]}
                await stream.send_all(json.dumps(request).encode() + b"\n")
                buffer = b""
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return False, f"pool {pool} closed the connection before answering mining.subscribe"
                    buffer += data
                    *lines, buffer = buffer.split(b"\n")
                    if len(buffer) > MAX_CHECK_LINE:
                        return False, f"pool {pool} answered mining.subscribe with a line over {MAX_CHECK_LINE} bytes"
                    for line in lines:
                        try:
                            message = json.loads(line)
                        except (ValueError, RecursionError):
                            return False, f"pool {pool} answered mining.subscribe with something that is not JSON"
                        if isinstance(message, dict) and message.get("id") == 1 and "method" not in message:
                            if message.get("result") and not message.get("error"):
                                return True, ""
                            return False, f"pool {pool} refused mining.subscribe: {message.get('error')}"
            return False, f"pool {pool} did not answer mining.subscribe within {self.check_timeout:g} s"
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if is_resource_shortage(exc):
                return None, f"pool {pool} check failed locally: {describe_error(exc)}"
            return False, f"pool {pool} connection error: {describe_error(exc)}"
        finally:
            await close_quietly(stream)
