"""The management port's HTTP/1.1 and WebSocket server, on h11 and trio-websocket.

h11 parses every request (no HTTP is parsed here by hand); a request for a
WebSocket route that asks to upgrade is handed, bytes and all, to
trio-websocket's server side (wsproto underneath). Routes are exact paths
registered with :meth:`WebServer.route` (plain HTTP) and
:meth:`WebServer.websocket`, so other parts of the program (enrollment, say) can
mount theirs on the same port.

Rules of the house, since anyone who reaches the port is a stranger:

- one request per connection (``Connection: close``): simple, and scrapers and
  browsers reconnect cheaply on a management port;
- a request head and body are bounded (:data:`MAX_REQUEST_HEAD`,
  :data:`MAX_REQUEST_BODY`) and must arrive within :data:`REQUEST_TIMEOUT`;
- admission control (:mod:`bridge.net.admission`, as on the roles' other ports): at
  most :data:`MAX_CONCURRENT_REQUESTS` requests in progress, :data:`MAX_REQUESTS_PER_SOURCE`
  from one address, and a file-descriptor reserve smaller than the other ports' so the
  management port stays reachable when they refuse; a WebSocket counts as established
  once upgraded, and at most :data:`MAX_WEBSOCKETS` live at once;
- a handler that raises answers 500 and is logged; the server carries on.
"""

from __future__ import annotations

import http
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import msgspec
import trio
import trio_websocket

from bridge.net.admission import Admission, AdmissionLimits
from bridge.net.containment import Containment
from bridge.net.listen import Pending, serve_admitted

__all__ = ["Request", "Response", "WebServer", "json_response"]

log = logging.getLogger("bridge.web")

MAX_REQUEST_HEAD = 16384
MAX_REQUEST_BODY = 65536
REQUEST_TIMEOUT = 10.0
MAX_CONCURRENT_REQUESTS = 32
#: Requests in progress from one address at once: a flood of silent connections from a
#: few addresses cannot lock the operator out (a browser loading the page needs ~3).
MAX_REQUESTS_PER_SOURCE = 8
#: Free file descriptors below which this port accepts nothing: smaller than the other
#: ports' reserve, so the dashboard and /metrics stay reachable when they refuse.
MANAGEMENT_FD_RESERVE = 8
MAX_WEBSOCKETS = 32
RECEIVE_SIZE = 16384
LINGER_TIMEOUT = 2.0

_encoder = msgspec.json.Encoder()
_GONE = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    trio_websocket.ConnectionClosed,
    trio_websocket.HandshakeError,
)


class Request(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    body: bytes
    client: str
    client_certificate: bytes | None = None
    """The client's certificate (DER) when the port serves HTTPS and the client presented one
    its CA verified (see :func:`bridge.web.access.management_tls_context`)."""


class Response(msgspec.Struct, frozen=True, kw_only=True):
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = {}


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``value`` (msgspec-encodable) as a JSON response."""
    return Response(status=status, body=_encoder.encode(value), headers=headers or {})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


Handler = Callable[[Request], Awaitable[Response]]
Guard = Callable[[Request], "Response | None"]
"""Checks a request before its handler: None lets it through, a Response refuses it."""
SocketHandler = Callable[[trio_websocket.WebSocketConnection, Request], Awaitable[None]]


class _Route(msgspec.Struct):
    handler: Handler
    methods: tuple[str, ...]


class _ReplayStream(trio.abc.HalfCloseableStream):
    """A stream whose first bytes are ones already read (the request h11 parsed)."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            size = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:size], self.prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class WebServer:
    """One role's management port: register routes, then :meth:`serve`."""

    def __init__(
        self,
        name: str = "management",
        *,
        containment: Containment | None = None,
        ssl_context: ssl.SSLContext | None = None,
        guard: Guard | None = None,
    ) -> None:
        """``ssl_context``: serve HTTPS (and WebSockets over TLS); ``guard``: see :data:`Guard`."""
        self.name = name
        self.containment = containment or Containment(log, name)
        """Counts and logs an internal error answering one request (the role's, so they count together)."""
        self.ssl_context = ssl_context
        self.guard = guard
        self.port: int | None = None
        self.requests = 0
        self._routes: dict[str, _Route] = {}
        self._sockets: dict[str, SocketHandler] = {}
        self.admission = Admission(
            f"{name} port",
            AdmissionLimits(
                max_pending=MAX_CONCURRENT_REQUESTS,
                max_pending_per_source=MAX_REQUESTS_PER_SOURCE,
                handshake_timeout=REQUEST_TIMEOUT + 1.0,
                fd_reserve=MANAGEMENT_FD_RESERVE,
            ),
        )
        self._socket_limiter = trio.CapacityLimiter(MAX_WEBSOCKETS)

    def route(self, path: str, handler: Handler, methods: tuple[str, ...] = ("GET", "HEAD")) -> None:
        """Serve ``path`` (exact; a trailing slash is ignored) with ``handler``."""
        key = _normal(path)
        if key in self._routes or key in self._sockets:
            raise ValueError(f"{path} is already routed")
        self._routes[key] = _Route(handler, tuple(methods))

    def websocket(self, path: str, handler: SocketHandler) -> None:
        """Serve WebSocket upgrades on ``path`` with ``handler(connection, request)``."""
        key = _normal(path)
        if key in self._routes or key in self._sockets:
            raise ValueError(f"{path} is already routed")
        self._sockets[key] = handler

    @property
    def paths(self) -> list[str]:
        return sorted([*self._routes, *self._sockets])

    async def serve(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host:port`` (0: any free port) until cancelled; reports the port."""
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        self.port = listeners[0].socket.getsockname()[1]
        if not _is_loopback(host):
            log.warning(
                "%s port %s:%d is reachable from other hosts; it shows certificate names and accounts, "
                "so keep it on 127.0.0.1 or a management network",
                self.name,
                host or "*",
                self.port,
            )
        scheme = "https" if self.ssl_context is not None else "http"
        log.info("%s on %s://%s:%d/ (dashboard, /metrics, /api/v1/health)", self.name, scheme, _url_host(host), self.port)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_admitted, self._connection, listeners, self.admission)
            task_status.started(self.port)

    async def _connection(self, stream: trio.SocketStream, pending: Pending) -> None:
        try:
            async with self.containment.guard(_client(stream), f"{self.name} request"):
                try:
                    if self.ssl_context is None:
                        await self._serve_one(stream, pending)
                    else:
                        tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
                        with trio.move_on_after(REQUEST_TIMEOUT) as scope:
                            await tls.do_handshake()
                        if not scope.cancelled_caught:
                            await self._serve_one(tls, pending, _client(stream), _peer_certificate(tls))
                except* _GONE:  # the client went away, or failed the TLS handshake (SSLError is an OSError)
                    pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_one(
        self, stream: trio.abc.Stream, pending: Pending, client: str | None = None, certificate: bytes | None = None
    ) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        raw = bytearray()
        client = client or _client(stream)
        request: Request | Response | None = None
        socket_handler: SocketHandler | None = None
        # A request is pending for admission from accept to answer (serve_admitted's deadline).
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                request = await self._read_request(stream, connection, raw, client)
            except h11.RemoteProtocolError as exc:
                await self._send(stream, connection, _error(400, f"not a valid HTTP/1.1 request ({exc})"), False)
                await _linger(stream)
                return
            if request is None:
                return
            if isinstance(request, Response):
                await self._send(stream, connection, request, False)
                await _linger(stream)
                return
            if certificate is not None:
                request = msgspec.structs.replace(request, client_certificate=certificate)
            refusal = self.guard(request) if self.guard is not None else None
            if refusal is not None:
                await self._send(stream, connection, refusal, request.method == "HEAD")
                return
            key = _normal(request.path)
            socket_handler = self._sockets.get(key)
            if socket_handler is None or request.headers.get("upgrade", "").lower() != "websocket":
                response = await self._dispatch(request, key)
                await self._send(stream, connection, response, request.method == "HEAD")
                return
            if self._socket_limiter.borrowed_tokens >= self._socket_limiter.total_tokens:
                busy = _error(503, f"{MAX_WEBSOCKETS} live WebSockets already; close a dashboard tab")
                await self._send(stream, connection, busy, False)
                return
        if socket_handler is None or not isinstance(request, Request):
            return  # timed out before the request was whole
        pending.established()  # a live WebSocket is no longer a pending request
        await self._upgrade(stream, bytes(raw), socket_handler, request)

    async def _read_request(
        self, stream: trio.SocketStream, connection: h11.Connection, raw: bytearray, client: str
    ) -> Request | Response | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    if head is None and not raw:
                        return None
                    connection.receive_data(b"")
                    continue
                if len(raw) <= MAX_REQUEST_HEAD:
                    raw += data
                connection.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_REQUEST_BODY:
                    return _error(413, f"request body over {MAX_REQUEST_BODY} bytes")
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                break
            elif isinstance(event, h11.ConnectionClosed):
                return None
        assert head is not None
        target = head.target.decode("latin-1")
        try:
            parts = urlsplit(target)
        except ValueError:  # e.g. an unclosed IPv6 bracket: "GET //[ HTTP/1.1"
            return _error(400, f"unreadable request target {target[:80]!r}")
        return Request(
            method=head.method.decode("latin-1").upper(),
            path=parts.path or "/",
            query=parse_qs(parts.query, max_num_fields=32),
            headers={name.decode("latin-1").lower(): value.decode("latin-1") for name, value in head.headers},
            body=bytes(body),
            client=client,
        )

    async def _dispatch(self, request: Request, key: str) -> Response:
        route = self._routes.get(key)
        if route is None:
            if key in self._sockets:
                return _error(426, f"{request.path} is a WebSocket; connect with ws://", {"Upgrade": "websocket"})
            return _error(404, f"no such path {request.path!r}; try / (dashboard), /metrics or /api/v1/health")
        if request.method not in route.methods:
            allowed = ", ".join(route.methods)
            return _error(405, f"{request.method} is not served on {request.path}; use {allowed}", {"Allow": allowed})
        self.requests += 1
        try:
            return await route.handler(request)
        except Exception:  # a handler (statistics) bug must not take the role down
            log.exception("%s: %s %s failed; answering 500", self.name, request.method, request.path)
            return _error(500, "internal error; see the server's log")

    async def _send(self, stream: trio.SocketStream, connection: h11.Connection, response: Response, head_only: bool) -> None:
        if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Connection", "close"),
            *response.headers.items(),
        ]
        try:
            data = connection.send(h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status)))
        except h11.LocalProtocolError:
            return
        assert data is not None
        if not head_only and response.body:
            data += connection.send(h11.Data(data=response.body)) or b""
        data += connection.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)

    async def _upgrade(self, stream: trio.SocketStream, raw: bytes, handler: SocketHandler, request: Request) -> None:
        async with self._socket_limiter, trio.open_nursery() as nursery:
            with trio.move_on_after(REQUEST_TIMEOUT) as scope:
                ws_request = await trio_websocket.wrap_server_stream(nursery, _ReplayStream(stream, raw))
                socket = await ws_request.accept()
            if scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                return
            try:
                await handler(socket, request)
            finally:
                await socket.aclose()
                nursery.cancel_scope.cancel()


async def _linger(stream: trio.SocketStream) -> None:
    """After an error answer to a request not read to its end: let the client read it.

    Closing with unread bytes makes the kernel send a reset, which can destroy the
    answer in flight; so half-close and drop what still comes, briefly and bounded.
    """
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        return  # TLS has no half-close; the client has what it needs
    with trio.move_on_after(LINGER_TIMEOUT):
        await stream.send_eof()
        drained = 0
        while drained < MAX_REQUEST_HEAD + MAX_REQUEST_BODY and (data := await stream.receive_some(RECEIVE_SIZE)):
            drained += len(data)


def _normal(path: str) -> str:
    return path.rstrip("/") or "/"


def _peer_certificate(tls: trio.SSLStream) -> bytes | None:
    try:
        return tls.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError):
        return None


def _client(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{_url_host(address[0])}:{address[1]}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _reason(status: int) -> bytes:
    """The status line's reason phrase ("200 OK"): some health checkers and people read it."""
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
