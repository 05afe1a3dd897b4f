"""The management port's HTTP server (h11) and WebSocket upgrade (trio-websocket)."""

from __future__ import annotations

import json

import pytest
import trio
import trio_websocket

from bridge.web.server import (
    MAX_REQUEST_HEAD,
    Request,
    Response,
    WebServer,
    json_response,
)


async def raw_request(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(request)
    await stream.send_eof()
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    await stream.aclose()
    return data


def body_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


async def start(nursery: trio.Nursery) -> tuple[WebServer, int]:
    server = WebServer()

    async def hello(request: Request) -> Response:
        return json_response({"path": request.path, "query": request.query, "body": request.body.decode()})

    async def broken(_request: Request) -> Response:
        raise RuntimeError("a statistics bug")

    async def echo(socket: trio_websocket.WebSocketConnection, request: Request) -> None:
        await socket.send_message(f"hello {request.path}")
        await socket.send_message(f"echo {await socket.get_message()}")

    server.route("/hello", hello, methods=("GET", "HEAD", "POST"))
    server.route("/broken", broken)
    server.websocket("/ws", echo)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, port


async def test_routes_methods_and_errors_are_answered_by_h11() -> None:
    async with trio.open_nursery() as nursery:
        server, port = await start(nursery)
        ok = await raw_request(port, b"GET /hello/?a=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close" in ok.lower()
        assert body_of(ok) == {"path": "/hello/", "query": {"a": ["1"]}, "body": ""}
        posted = await raw_request(port, b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        assert body_of(posted)["body"] == "hello"
        head = await raw_request(port, b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        missing = await raw_request(port, b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        assert missing.startswith(b"HTTP/1.1 404 Not Found\r\n") and "/metrics" in body_of(missing)["error"]
        wrong = await raw_request(port, b"DELETE /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wrong.startswith(b"HTTP/1.1 405 ") and b"allow: get, head, post" in wrong.lower()
        garbage = await raw_request(port, b'{"id":1,"method":"mining.subscribe","params":[]}\n')
        assert garbage.startswith(b"HTTP/1.1 400 ")
        huge = await raw_request(port, b"GET /hello HTTP/1.1\r\nHost: x\r\nX: " + b"a" * (4 * MAX_REQUEST_HEAD) + b"\r\n\r\n")
        assert huge.startswith(b"HTTP/1.1 4")
        plain_ws = await raw_request(port, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        assert plain_ws.startswith(b"HTTP/1.1 426 ")
        assert server.requests == 3  # hello, posted, head: the others never reached a handler
        nursery.cancel_scope.cancel()


async def test_a_handler_that_raises_answers_500_and_the_server_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    async with trio.open_nursery() as nursery:
        _server, port = await start(nursery)
        broken = await raw_request(port, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
        assert broken.startswith(b"HTTP/1.1 500 ") and "log" in body_of(broken)["error"]
        assert "a statistics bug" in caplog.text
        again = await raw_request(port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert again.startswith(b"HTTP/1.1 200 ")
        nursery.cancel_scope.cancel()


async def test_websocket_upgrade_goes_to_the_handler() -> None:
    async with trio.open_nursery() as nursery:
        _server, port = await start(nursery)
        async with trio_websocket.open_websocket("127.0.0.1", port, "/ws", use_ssl=False) as socket:
            assert await socket.get_message() == "hello /ws"
            await socket.send_message("ping")
            assert await socket.get_message() == "echo ping"
        nursery.cancel_scope.cancel()


async def test_a_silent_client_does_not_hold_the_port(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        _server, port = await start(nursery)
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(60):
            assert await silent.receive_some(100) == b""  # closed after the request timeout
        await silent.aclose()
        nursery.cancel_scope.cancel()


def test_paths_are_routed_once() -> None:
    server = WebServer()

    async def handler(_request: Request) -> Response:
        return Response()

    server.route("/api/v1/enroll", handler, methods=("POST",))
    with pytest.raises(ValueError, match="already routed"):
        server.route("/api/v1/enroll/", handler)
    assert server.paths == ["/api/v1/enroll"]


async def test_a_websocket_client_that_vanishes_is_no_error(caplog: pytest.LogCaptureFixture) -> None:
    server = WebServer()
    gone = trio.Event()

    async def feed(socket: trio_websocket.WebSocketConnection, _request: Request) -> None:
        try:
            while True:
                await socket.send_message("tick")
                await trio.sleep(0.01)
        finally:
            gone.set()

    server.websocket("/ws", feed)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 101 ")
        await trio.aclose_forcefully(stream)  # gone without a closing handshake
        with trio.fail_after(30):
            await gone.wait()
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert "failed unexpectedly" not in caplog.text
