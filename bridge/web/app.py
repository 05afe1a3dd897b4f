"""A role's management port: dashboard, Prometheus metrics, JSON API, health checks.

``stratumrm proxy --http-listen 127.0.0.1:9100`` (and ``sidecar``) serve:

==========================  =====================================================
``/``                       the live dashboard (static HTML/JS/CSS, no build step)
``/ws``                     WebSocket: a :class:`~bridge.web.api.DashboardSnapshot`
                            as JSON every second
``/metrics``                Prometheus text exposition (prometheus-client)
``/api/v1/health``          role, version, uptime, ready (and why not), warnings
``/api/v1/rigs``            rigs with shares and estimated hashrate
``/api/v1/upstreams``       pools and sidecars, the active one, RTT, retransmissions
``/api/v1/sessions``        StratumRM control connections
``/api/v1/certificates``    every certificate with its expiry
``/healthz``                200 while the process runs
``/readyz``                 200 when the role can take work, 503 (and why) when not:
                            no usable upstream, pool down, or draining
``/status``                 the document ``stratumrm status`` prints
==========================  =====================================================

Set :attr:`ManagementApp.draining` (SIGTERM handling does) and ``/readyz`` answers
503 so load balancers move miners away first. :meth:`ManagementApp.route` mounts
more endpoints on the same port.
"""

from __future__ import annotations

import logging
import ssl
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import msgspec
import trio
import trio_websocket

from bridge import __version__
from bridge.net.containment import Containment
from bridge.stats.status import StatusDocument
from bridge.web.api import DashboardSnapshot, Health
from bridge.web.metrics import CONTENT_TYPE_LATEST, exposition, registry_for
from bridge.web.roles import RoleView, limited
from bridge.web.server import (
    Guard,
    Handler,
    Request,
    Response,
    WebServer,
    json_response,
)

__all__ = ["FEED_INTERVAL", "MAX_DASHBOARD_RIGS", "ManagementApp"]

log = logging.getLogger("bridge.web")

FEED_INTERVAL = 1.0
"""Seconds between two dashboard snapshots on ``/ws``."""
MAX_DASHBOARD_RIGS = 200
"""Rigs listed in a snapshot (the busiest); the totals count every rig."""

_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/static/enroll.js": ("enroll.js", "text/javascript; charset=utf-8"),
}


def _static(name: str) -> bytes:
    return resources.files("bridge.web").joinpath("static", name).read_bytes()


class ManagementApp:
    """The management endpoints of one role (see the module docs), served by :meth:`serve`."""

    def __init__(
        self,
        view: RoleView,
        *,
        containment: Containment | None = None,
        ssl_context: ssl.SSLContext | None = None,
        guard: Guard | None = None,
    ) -> None:
        """``ssl_context``: HTTPS (bridge/web/access.py); ``guard``: e.g. the operator-certificate check."""
        self.view = view
        self.server = WebServer(f"{view.role} management", containment=containment, ssl_context=ssl_context, guard=guard)
        self.registry = registry_for(view.metric_families)
        self.started = datetime.now(UTC)
        self._started_clock: float | None = None
        self._encoder = msgspec.json.Encoder()
        for path, (name, content_type) in _STATIC.items():
            self.route(path, self._file(_static(name), content_type))
        self.route("/metrics", self._metrics)
        self.route("/healthz", self._healthz)
        self.route("/readyz", self._readyz)
        self.route("/status", self._status)
        self.route("/api/v1/health", self._json(self.health))
        self.route("/api/v1/rigs", self._json(self.view.rigs))
        self.route("/api/v1/upstreams", self._json(self.view.upstreams))
        self.route("/api/v1/sessions", self._json(self.view.sessions))
        self.route("/api/v1/certificates", self._json(self.view.certificates))
        self.server.websocket("/ws", self._feed)

    # ------------------------------------------------------------------ public

    @property
    def draining(self) -> bool:
        return self.view.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        if value and not self.view.draining:
            log.info("draining: /readyz now answers 503")
        self.view.draining = value

    @property
    def port(self) -> int | None:
        return self.server.port

    def route(self, path: str, handler: Handler, methods: tuple[str, ...] = ("GET", "HEAD")) -> None:
        """Mount another endpoint on the management port."""
        self.server.route(path, handler, methods)

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports the bound port."""
        self._started_clock = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sample)
            bound = await nursery.start(self.server.serve, host, port)
            task_status.started(bound)

    def uptime(self) -> float:
        if self._started_clock is None:
            return 0.0
        return round(trio.current_time() - self._started_clock, 3)

    def health(self) -> Health:
        ready, reason = self.view.readiness()
        return Health(
            role=self.view.role,
            version=__version__,
            started=self.started,
            uptime=self.uptime(),
            ready=ready,
            reason=reason,
            draining=self.view.draining,
            warnings=self.view.warnings(),
        )

    def snapshot(self) -> DashboardSnapshot:
        view = self.view
        rigs = view.rigs()
        shown = limited(rigs, MAX_DASHBOARD_RIGS)
        return DashboardSnapshot(
            health=self.health(),
            totals=view.totals(rigs),
            rigs=shown,
            rigs_shown=len(shown),
            upstreams=view.upstreams(),
            failover_history=view.failover_history()[-20:],
            sessions=view.sessions()[:MAX_DASHBOARD_RIGS],
            certificates=view.certificates(),
        )

    # ------------------------------------------------------------------ handlers

    def _file(self, body: bytes, content_type: str) -> Handler:
        async def handler(_request: Request) -> Response:
            return Response(body=body, content_type=content_type)

        return handler

    def _json(self, build: Any) -> Handler:
        async def handler(_request: Request) -> Response:
            return json_response(build())

        return handler

    async def _metrics(self, _request: Request) -> Response:
        return Response(body=exposition(self.registry), content_type=CONTENT_TYPE_LATEST)

    async def _healthz(self, _request: Request) -> Response:
        return json_response({"alive": True, "role": self.view.role})

    async def _readyz(self, _request: Request) -> Response:
        ready, reason = self.view.readiness()
        return json_response({"ready": ready, "reason": reason}, 200 if ready else 503)

    async def _status(self, _request: Request) -> Response:
        return json_response(
            StatusDocument(
                role=self.view.role,
                version=__version__,
                started=self.started,
                uptime=self.uptime(),
                warnings=self.view.warnings(),
                statistics=self.view.statistics(),
            )
        )

    async def _feed(self, socket: trio_websocket.WebSocketConnection, _request: Request) -> None:
        """Push a snapshot every second until the browser goes away."""
        while True:
            self.view.sample(trio.current_time())
            await socket.send_message(self._encoder.encode(self.snapshot()).decode())
            await trio.sleep(FEED_INTERVAL)

    async def _sample(self) -> None:
        while True:
            try:
                self.view.sample(trio.current_time())
            except Exception:  # statistics must never end the role
                log.exception("hashrate sampling failed; trying again in a second")
            await trio.sleep(FEED_INTERVAL)
