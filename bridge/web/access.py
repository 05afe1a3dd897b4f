"""HTTPS and operator certificates on a management port.

``stratumrm sidecar --http-tls`` serves the management port over HTTPS with the
sidecar's own certificate; ``--http-require-operator`` also asks browsers for a client
certificate from the StratumRM CA and lets in only an operator certificate
(``stratumrm pki issue-operator NAME``). A client without one gets a page that says so
and what to do, not a TLS error: the TLS layer makes the certificate optional and
:func:`operator_guard` refuses per request. Paths in ``open_paths`` (enrollment, health
checks) stay open: a rig enrolling has no certificate yet, and proves itself with its
one-time token.
"""

from __future__ import annotations

import html
import ssl
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from bridge.errors import PKIError
from bridge.pki.identity import CertificateIdentity, Validity, identity_from_der
from bridge.web.server import Guard, Request, Response, json_response

__all__ = ["management_tls_context", "operator_guard", "operator_of"]

REFUSAL = (
    "This management port requires an operator certificate from the pool's StratumRM CA, and {why}. "
    "Ask the pool operator for one (`stratumrm pki issue-operator NAME`), import the .p12 file it "
    "writes into your browser's certificates (with the passphrase it prints), and reload this page."
)


def management_tls_context(cert: str | Path, key: str | Path, ca: str | Path | None = None) -> ssl.SSLContext:
    """A server context with the role's certificate; with ``ca``, clients may present a certificate of that CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(str(cert), str(key))
        if ca is not None:
            context.load_verify_locations(str(ca))
            context.verify_mode = ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise PKIError(f"cannot load the management port's certificate {cert} / {key}: {exc}") from None
    return context


def operator_guard(open_paths: Iterable[str] = ()) -> Guard:
    """Let through requests with a valid operator certificate (and anything on ``open_paths``)."""
    open_set = {path.rstrip("/") or "/" for path in open_paths}

    def check(request: Request) -> Response | None:
        if (request.path.rstrip("/") or "/") in open_set:
            return None
        identity, why = operator_of(request)
        return None if identity is not None else _refuse(request, why)

    return check


def operator_of(request: Request) -> tuple[CertificateIdentity | None, str]:
    """The operator whose valid certificate ``request`` came with, or None and why not."""
    if request.client_certificate is None:
        return None, "your browser sent none"
    try:
        identity = identity_from_der(request.client_certificate)
    except PKIError as exc:
        return None, f"the one sent is not a StratumRM certificate ({exc})"
    if identity.role != "operator":
        return None, f"the one sent is a {identity.role} certificate ({identity.name!r})"
    if identity.validity_at(datetime.now(UTC)) is not Validity.VALID:
        return None, f"{identity.describe()} is not valid now"
    return identity, ""


def _refuse(request: Request, why: str) -> Response:
    message = REFUSAL.format(why=why)
    if "text/html" in request.headers.get("accept", ""):
        page = (
            "<!doctype html><meta charset=utf-8><title>Operator certificate required</title>"
            "<body style='font-family:sans-serif;max-width:42em;margin:3em auto'>"
            f"<h1>Operator certificate required</h1><p>{html.escape(message)}</p></body>"
        )
        return Response(status=403, body=page.encode(), content_type="text/html; charset=utf-8")
    return json_response({"error": message}, 403)
