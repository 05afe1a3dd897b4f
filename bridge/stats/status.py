"""The status document (``GET /status`` on the management port) and ``stratumrm status``'s side.

``stratumrm sidecar --http-listen 127.0.0.1:9101`` (and ``proxy --http-listen``)
serve it with the rest of the management port (:mod:`bridge.web.app`);
``stratumrm status --url http://127.0.0.1:9101`` fetches it and prints it for people.

The document (:class:`StatusDocument`)::

    {"role": "sidecar", "version": "0.1.0", "started": "2026-...Z", "uptime": 7260.1,
     "warnings": ["this sidecar's certificate 'sidecar1' (serial ...) expires in 5.0 days ..."],
     "statistics": {... the role's statistics(), certificates included ...}}

A certificate anywhere in ``statistics`` is an object with ``not_after``, ``days_left``
and ``expiring_soon`` (:class:`bridge.pki.rotation.CertificateStatus`);
:func:`format_status` finds them wherever they are and lists them in one table.

The statistics can name accounts and certificates: bind it to 127.0.0.1 (the default
advice) or to a management network, never to the miners' side.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec

from bridge.errors import BridgeError
from bridge.sv1.framing import decode_json

__all__ = ["StatusDocument", "fetch_status", "format_status", "status_url"]

STATUS_PATH = "/status"


class StatusDocument(msgspec.Struct, frozen=True, kw_only=True):
    """What ``GET /status`` returns."""

    role: str
    version: str
    started: datetime
    uptime: float
    """Seconds since the role started."""
    warnings: list[str]
    """What needs the operator (expiring certificates ...), in words, with what to do."""
    statistics: Any


# --------------------------------------------------------------------------- the client side


def status_url(url: str) -> str:
    """``http://HOST:PORT`` (or with ``/status``) as the URL to fetch; BridgeError if it is not one."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise BridgeError(f"--url {url!r}: write http://HOST:PORT, the --http-listen address of the role")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise BridgeError(f"--url {url!r}: write http://HOST:PORT with the port number of --http-listen")
    path = parts.path.rstrip("/") or STATUS_PATH
    return f"http://{parts.netloc}{path}"


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET the status document; BridgeError with advice if it cannot be had."""
    target = status_url(url)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy
    try:
        with opener.open(target, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        raise BridgeError(f"{target} answered {error.code} {error.reason}; is this a StratumRM status endpoint?") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise BridgeError(f"cannot reach {target}: {reason}; is the role running with --http-listen on that address?") from None
    try:
        document = decode_json(body)
    except msgspec.DecodeError:
        raise BridgeError(f"{target} did not return JSON; is this a StratumRM status endpoint?") from None
    if not isinstance(document, dict) or "statistics" not in document:
        raise BridgeError(f"{target} returned JSON that is not a StratumRM status document")
    return document


def _is_certificate(value: Any) -> bool:
    return isinstance(value, dict) and {"not_after", "days_left", "expiring_soon"} <= value.keys()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s"


def _when(text: Any) -> str:
    """An ISO timestamp from the document as ``YYYY-MM-DD HH:MM UTC``."""
    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return str(text)
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(_scalar(item) for item in value) or "-"
    return str(value)


def _walk(value: Any, path: str, certificates: list[tuple[str, dict[str, Any]]], counters: list[tuple[str, str]]) -> None:
    if _is_certificate(value):
        certificates.append((path, value))
    elif isinstance(value, dict):
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value.values()):
            nonzero = {key: item for key, item in value.items() if item}
            summary = ", ".join(f"{key} {item}" for key, item in nonzero.items()) or "none"
            counters.append((path, summary))
            return
        for key, item in value.items():
            _walk(item, f"{path}.{key}" if path else key, certificates, counters)
    elif isinstance(value, list) and any(isinstance(item, dict) for item in value):
        for item in value:
            _walk(item, path, certificates, counters)
    else:
        counters.append((path, _scalar(value)))


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def format_status(document: dict[str, Any], url: str = "") -> str:
    """The status document for people: heading, certificates, warnings, counters."""
    certificates: list[tuple[str, dict[str, Any]]] = []
    counters: list[tuple[str, str]] = []
    _walk(document.get("statistics"), "", certificates, counters)
    started = _when(document.get("started", "?"))
    lines = [
        f"{document.get('role', '?')} (stratumrm {document.get('version', '?')}), up "
        f"{_duration(float(document.get('uptime') or 0))} since {started}" + (f"  [{url}]" if url else ""),
    ]
    if certificates:
        rows = [("CERTIFICATE", "ROLE", "NAME", "SERIAL", "NOT AFTER", "DAYS LEFT", "STATE")]
        for path, certificate in certificates:
            state = "EXPIRED" if certificate.get("expired") else "EXPIRES SOON" if certificate.get("expiring_soon") else "ok"
            extra = []
            if certificate.get("accounts"):
                extra.append("accounts " + ",".join(certificate["accounts"]))
            if certificate.get("connections"):
                extra.append(f"{certificate['connections']} connection(s)")
            serial = str(certificate.get("serial", "?"))
            rows.append(
                (
                    path,
                    str(certificate.get("role", "?")),
                    str(certificate.get("name", "?")),
                    serial if len(serial) <= 12 else serial[:12] + "…",
                    _when(certificate.get("not_after")),
                    f"{float(certificate.get('days_left', 0)):.1f}",
                    " ".join([state, *(f"({e})" for e in extra)]),
                )
            )
        lines += ["", "Certificates", *_table(rows)]
    warnings = document.get("warnings") or []
    lines += ["", "Warnings" if warnings else "Warnings: none"]
    lines += [f"  ! {warning}" for warning in warnings]
    if counters:
        lines += ["", "Statistics", *_table([(name, value) for name, value in counters])]
    return "\n".join(lines)
