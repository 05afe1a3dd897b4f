"""The enrollment endpoints (:class:`bridge.pki.enrollment.EnrollmentService`) on a management port.

``GET /api/v1/enroll/ca`` and ``POST /api/v1/enroll`` for ``stratumrm proxy enroll``:
open without an operator certificate (:data:`OPEN_PATHS`), since the one-time token is
the credential.

``/api/v1/enroll/tokens`` is the dashboard's form (``stratumrm pki token`` in a browser).
The rule, checked on every request here and not only by the port's guard:

- only a request that came with a valid **operator certificate** (mutual TLS) may create
  a token, so it exists only on a port started with ``--http-require-operator``. A
  loopback port without it is not enough: any local user, and any web page the
  operator's browser visits (cross-site request forgery), can reach 127.0.0.1;
- the body must be ``application/json`` (a cross-site HTML form cannot send that without
  a CORS preflight, which this port never grants), and an ``Origin`` header, when the
  browser sends one, must be this port's own;
- the audit trail names the operator certificate and the address it came from.

``GET`` on it says whether this client may create tokens (the dashboard shows the form
only then). The signing and SQLite work run in a worker thread so the port keeps
serving meanwhile.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import msgspec
import trio

from bridge.pki.enrollment import (
    ENROLL_CA_PATH,
    ENROLL_PATH,
    TOKENS_PATH,
    EnrollmentService,
    ca_fingerprint,
)
from bridge.web.access import operator_of
from bridge.web.server import Request, Response, json_response

__all__ = ["OPEN_PATHS", "TokenPermission", "mount_enrollment"]

log = logging.getLogger("bridge.web.enroll")

OPEN_PATHS = (ENROLL_CA_PATH, ENROLL_PATH)

NEEDS_OPERATOR_PORT = (
    "creating enrollment tokens in the browser needs operator certificates on this port: start the sidecar "
    "with --http-require-operator (and --enroll-ca), or run `stratumrm pki token NAME --account ACCOUNT` "
    "where the CA is"
)


class TokenPermission(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /api/v1/enroll/tokens``."""

    allowed: bool
    reason: str | None
    operator: str | None
    fingerprint: str


def mount_enrollment(app, service: EnrollmentService, *, browser_tokens: bool = False) -> None:
    """Route the enrollment endpoints of ``service`` on ``app`` (a :class:`bridge.web.app.ManagementApp`).

    ``browser_tokens``: the port requires operator certificates, so operators may create
    tokens on the dashboard (see the module docs).
    """
    fingerprint = ca_fingerprint(service.authority.ca_certificate)

    def permission(request: Request) -> tuple[str | None, str]:
        if not browser_tokens:
            return None, NEEDS_OPERATOR_PORT
        identity, why = operator_of(request)
        if identity is None:
            return None, f"creating enrollment tokens needs an operator certificate, and {why}"
        return identity.name, ""

    async def ca(_request: Request) -> Response:
        status, content_type, body = service.ca()
        return Response(status=status, body=body, content_type=content_type)

    async def enroll(request: Request) -> Response:
        address = _address(request)
        status, content_type, body = await trio.to_thread.run_sync(service.enroll, request.body, address)
        if status == 200:
            log.info("enrolled a proxy certificate for %s (see `stratumrm pki enrollments`)", address)
        else:
            log.warning("enrollment from %s refused (%d): %s", address, status, body.decode(errors="replace")[:300])
        return Response(status=status, body=body, content_type=content_type)

    async def tokens(request: Request) -> Response:
        operator, why = permission(request)
        if request.method != "POST":
            return json_response(
                TokenPermission(allowed=operator is not None, reason=why or None, operator=operator, fingerprint=fingerprint)
            )
        if operator is None:
            log.warning("token creation from %s refused: %s", _address(request), why)
            return json_response({"error": why}, 403)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return json_response({"error": "send the form as application/json (the dashboard does)"}, 415)
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
            log.warning("token creation from %s refused: Origin %r is not this port", _address(request), origin)
            return json_response(
                {"error": f"Origin {origin[:100]!r} is not this management port; create tokens from this port's own dashboard"},
                403,
            )
        actor = f"operator {operator} (dashboard, {_address(request)})"
        status, content_type, body = await trio.to_thread.run_sync(service.create_token, request.body, actor)
        if status == 200:
            log.info("enrollment token created by %s (see `stratumrm pki enrollments`)", actor)
        return Response(status=status, body=body, content_type=content_type)

    app.route(ENROLL_CA_PATH, ca)
    app.route(ENROLL_PATH, enroll, methods=("POST",))
    app.route(TOKENS_PATH, tokens, methods=("GET", "HEAD", "POST"))


def _address(request: Request) -> str:
    return request.client.rpartition(":")[0] or request.client
