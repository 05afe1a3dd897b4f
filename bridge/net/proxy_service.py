"""What ``stratumrm proxy`` runs around :class:`~bridge.net.miner_proxy.MinerProxy`.

- A :class:`~bridge.net.credential_watch.CredentialWatcher` looks at the proxy's bundle (or ``--cert/--key/--ca``)
  every few seconds and at once on SIGHUP. A renewed bundle is loaded for the next
  connection to the sidecar; the live connection and every rig on it carry on. It logs
  reloads, files that do not load (the previous certificate stays in use), and a
  certificate that expires within the warning window, once a day.
- With ``http_listen``, a :class:`~bridge.web.app.ManagementApp` serves the
  management port: dashboard, ``/metrics``, ``/api/v1/...``, ``/healthz``,
  ``/readyz`` and ``GET /status`` (:class:`ProxyStatus`: the proxy's counters, its
  certificate and its handshakes, full and resumed, and the watcher's warnings).

:class:`ProxyService` runs all of it next to ``MinerProxy.serve``.
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import UTC, datetime
from typing import Any

import trio
from msgspec import Struct

from bridge.net.credential_watch import CredentialWatcher
from bridge.net.miner_proxy import MinerProxy, ProxyStatistics
from bridge.pki.rotation import (
    DEFAULT_RELOAD_INTERVAL,
    ClientCredentials,
    ClientTLSStatistics,
    CredentialWatch,
)

__all__ = ["ProxyService", "ProxyStatus", "proxy_certificate_watcher"]

log = logging.getLogger("bridge.proxy")


class ProxyStatus(Struct, frozen=True, kw_only=True):
    """The proxy's ``GET /status`` statistics."""

    proxy: ProxyStatistics
    tls: ClientTLSStatistics | None
    """This proxy's certificate (expiry included) and its handshakes with the sidecar."""


def proxy_certificate_watcher(
    credentials: ClientCredentials, *, reload_interval: float = DEFAULT_RELOAD_INTERVAL
) -> CredentialWatcher:
    """The proxy's certificate watcher: its bundle (or ``--cert/--key/--ca``), reloaded for the next connection."""
    watch = CredentialWatch(
        credentials,
        subject="this proxy's certificate",
        remedy=lambda status: (
            f"ask the pool operator for a renewed bundle (`stratumrm pki renew {status.name}`) and copy it "
            f"over {credentials.certificate_file}; the proxy uses it from its next connection, without a restart"
        ),
    )
    return CredentialWatcher(
        watch,
        log,
        after_reload=lambda: "the next connection to the sidecar uses it, the live one carries on",
        reload_interval=reload_interval,
    )


def proxy_status(proxy: MinerProxy, credentials: ClientCredentials | None) -> ProxyStatus:
    return ProxyStatus(
        proxy=proxy.statistics(),
        tls=credentials.statistics(datetime.now(UTC)) if credentials is not None else None,
    )


class ProxyService:
    """A :class:`MinerProxy` with its certificate watcher, SIGHUP and status endpoint.

    ``credentials`` must be the object the proxy's upstream context came from
    (``MinerProxy(url, upstream_ssl_context=credentials)``), so that what the watcher
    reloads is what the next connection to the sidecar uses; None for SV1 upstreams.
    """

    def __init__(
        self,
        proxy: MinerProxy,
        *,
        credentials: ClientCredentials | None = None,
        http_listen: tuple[str, int] | None = None,
        metrics_per_worker: bool = False,
        reload_interval: float = DEFAULT_RELOAD_INTERVAL,
    ) -> None:
        from bridge.web.app import ManagementApp
        from bridge.web.roles import ProxyView

        self.proxy = proxy
        self.credentials = credentials
        self.http_listen = http_listen
        self.watcher = (
            proxy_certificate_watcher(credentials, reload_interval=reload_interval) if credentials is not None else None
        )
        self.web = ManagementApp(ProxyView(self, metrics_per_worker=metrics_per_worker), containment=self.proxy.containment)
        """The management port's endpoints (served with ``http_listen``); ``web.draining`` for SIGTERM."""

    def statistics(self) -> ProxyStatus:
        return proxy_status(self.proxy, self.credentials)

    def warnings(self) -> list[str]:
        """Certificate warnings, then upstream health (down, none usable): monitoring exits 3 on any."""
        found = self.watcher.warnings() if self.watcher is not None else []
        return found + self.proxy.policy.warnings(trio.current_time())

    async def run(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve rigs on ``host:port`` (and the management port) until cancelled; reports the port."""
        watcher = self.watcher
        async with trio.open_nursery() as nursery:
            await nursery.start(self.proxy.serve, host, port)
            if watcher is not None and watcher.watch.watching:
                watcher.start()
                nursery.start_soon(watcher.run)
            if self.http_listen is not None:
                await nursery.start(self.web.serve, *self.http_listen)
            task_status.started(self.proxy.port)
            if watcher is not None and threading.current_thread() is threading.main_thread():
                with trio.open_signal_receiver(signal.SIGHUP) as signals:
                    async for _ in signals:
                        log.info("SIGHUP: re-reading the certificate files")
                        watcher.reload(force=True)
