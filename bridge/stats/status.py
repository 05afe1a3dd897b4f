"""A small local status endpoint: ``GET /status`` returns a role's statistics as JSON.

``stratumrm sidecar --status-listen 127.0.0.1:9101`` (and ``proxy --status-listen``)
serve it; ``stratumrm status --url http://127.0.0.1:9101`` prints it for people. It
is deliberately tiny: plain HTTP/1.1 over trio, one request per connection, nothing
but ``GET``/``HEAD /status``; the Prometheus exposition and the dashboard that an
operations issue will add read the same ``statistics()`` values.

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

import ipaddress
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec
import trio

from bridge import __version__
from bridge.errors import BridgeError
from bridge.net.admission import Admission, AdmissionLimits
from bridge.net.containment import Containment
from bridge.net.listen import Pending, serve_admitted
from bridge.sv1.framing import decode_json

__all__ = ["StatusDocument", "StatusServer", "fetch_status", "format_status", "status_url"]

log = logging.getLogger("bridge.status")

STATUS_PATH = "/status"
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0
MAX_CONCURRENT_REQUESTS = 16
#: Requests in progress from one address at once (admission control: a flood of
#: silent connections from a few addresses cannot lock the operator out).
MAX_REQUESTS_PER_SOURCE = 4
#: Free file descriptors below which the status port accepts nothing: smaller than the
#: other ports' reserve, so the status stays reachable when they refuse (admission).
STATUS_FD_RESERVE = 8
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


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


class StatusServer:
    """Serves :class:`StatusDocument` for one role.

    ``statistics`` returns the role's statistics (any msgspec-encodable value);
    ``warnings`` the role's current warnings. Both are called per request, so the
    answer is always current. ``containment`` is the role's, so an internal error
    here counts with the role's others (its own when None).
    """

    def __init__(
        self,
        role: str,
        statistics: Callable[[], Any],
        warnings: Callable[[], list[str]] = list,
        *,
        containment: Containment | None = None,
    ) -> None:
        self.role = role
        self.containment = containment or Containment(log, f"{role} status endpoint")
        self.statistics = statistics
        self.warnings = warnings
        self.port: int | None = None
        self.requests = 0
        self._started = datetime.now(UTC)
        self._started_clock = 0.0
        self.admission = Admission(
            "status port",
            AdmissionLimits(
                max_pending=MAX_CONCURRENT_REQUESTS,
                max_pending_per_source=MAX_REQUESTS_PER_SOURCE,
                handshake_timeout=REQUEST_TIMEOUT + 1.0,
                fd_reserve=STATUS_FD_RESERVE,
            ),
        )
        self._encoder = msgspec.json.Encoder()

    def document(self) -> StatusDocument:
        return StatusDocument(
            role=self.role,
            version=__version__,
            started=self._started,
            uptime=round(trio.current_time() - self._started_clock, 3),
            warnings=list(self.warnings()),
            statistics=self.statistics(),
        )

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host:port`` (0: any free port) until cancelled; reports the port."""
        self._started_clock = trio.current_time()
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        self.port = listeners[0].socket.getsockname()[1]
        if not _is_loopback(host):
            log.warning(
                "status endpoint on %s:%d is reachable from other hosts; it shows certificate names and "
                "accounts, so keep it on 127.0.0.1 or a management network",
                host,
                self.port,
            )
        log.info("status on http://%s:%d%s", _url_host(host), self.port, STATUS_PATH)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                serve_admitted, self.containment.connections(self._handle, "status connection"), listeners,
                self.admission,
            )
            task_status.started(self.port)

    async def _handle(self, stream: trio.SocketStream, pending: Pending) -> None:
        # A request is pending for admission from accept to answer: at most
        # MAX_CONCURRENT_REQUESTS at once, MAX_REQUESTS_PER_SOURCE from one address.
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                status, body, headers, head_only = await self._answer(stream)
                await self._send(stream, status, body, headers, head_only)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SocketStream) -> tuple[int, bytes, dict[str, str], bool]:
        head = bytearray()
        while b"\r\n\r\n" not in head and b"\n\n" not in head:
            data = await stream.receive_some(4096)
            if not data:
                break
            head += data
            if len(head) > MAX_REQUEST_HEAD:
                return 400, self._error("request head too long"), {}, False
        request_line = bytes(head).split(b"\n", 1)[0].strip()
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, self._error("not an HTTP/1.x request; try GET /status"), {}, False
        method, target = parts[0], parts[1].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            return 405, self._error("only GET and HEAD"), {"Allow": "GET, HEAD"}, False
        try:
            path = urlsplit(target).path
        except ValueError:  # "//[" and friends
            return 400, self._error("unreadable request target; try GET /status"), {}, False
        if path.rstrip("/") != STATUS_PATH:
            return 404, self._error(f"no such path; the status is at {STATUS_PATH}"), {}, method == b"HEAD"
        self.requests += 1
        try:
            body = self._encoder.encode(self.document())
        except Exception:  # a statistics bug must not take the role down
            log.exception("status document could not be built")
            return 503, self._error("statistics unavailable; see the log"), {}, method == b"HEAD"
        return 200, body, {}, method == b"HEAD"

    def _error(self, message: str) -> bytes:
        return self._encoder.encode({"error": message})

    async def _send(
        self, stream: trio.SocketStream, status: int, body: bytes, headers: dict[str, str], head_only: bool
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        await stream.send_all(data if head_only else data + body)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------- the client side


def status_url(url: str) -> str:
    """``http://HOST:PORT`` (or with ``/status``) as the URL to fetch; BridgeError if it is not one."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise BridgeError(f"--url {url!r}: write http://HOST:PORT, the --status-listen address of the role")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise BridgeError(f"--url {url!r}: write http://HOST:PORT with the port number of --status-listen")
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
        raise BridgeError(
            f"{target} answered {error.code} {error.reason}; is this a StratumRM status endpoint?"
        ) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise BridgeError(
            f"cannot reach {target}: {reason}; is the role running with --status-listen on that address?"
        ) from None
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


def _walk(
    value: Any, path: str, certificates: list[tuple[str, dict[str, Any]]], counters: list[tuple[str, str]]
) -> None:
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
    return [
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


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
            state = (
                "EXPIRED"
                if certificate.get("expired")
                else "EXPIRES SOON"
                if certificate.get("expiring_soon")
                else "ok"
            )
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
