"""The local status endpoint (GET /status) and ``stratumrm status``."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta
from functools import partial

import msgspec
import pytest
import trio
from click.testing import CliRunner

from bridge.errors import BridgeError
from bridge.pki.rotation import CertificateStatus
from bridge.stats.status import StatusServer, fetch_status, format_status, status_url
from bridge.status_command import WARNINGS_EXIT_STATUS, status

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


class Counters(msgspec.Struct, frozen=True):
    sessions_active: int
    closed_by_reason: dict[str, int]
    refusals: dict[str, int]
    certificate: CertificateStatus | None
    peers: list[CertificateStatus]
    pool: str


def certificate(name: str, days_left: float, *, role: str = "pool") -> CertificateStatus:
    return CertificateStatus(
        role=role,
        name=name,
        serial="39E90E6B04DC71ED2EB4C7B74C712816CD8E018C",
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=days_left),
        days_left=days_left,
        expiring_soon=days_left < 14,
        expired=days_left < 0,
    )


def counters() -> Counters:
    return Counters(
        sessions_active=2,
        closed_by_reason={},
        refusals={"revoked": 2, "no certificate": 0},
        certificate=certificate("sidecar1", 300.0),
        peers=[certificate("farm1", 5.5, role="miner")],
        pool="stratum+tcp://127.0.0.1:3333",
    )


async def serving(nursery: trio.Nursery, warnings: list[str]) -> tuple[StatusServer, str]:
    server = StatusServer("sidecar", counters, lambda: warnings)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{port}"


async def raw_request(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(request)
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    await stream.aclose()
    return data


async def test_get_status_returns_the_roles_statistics_and_warnings() -> None:
    async with trio.open_nursery() as nursery:
        server, url = await serving(nursery, ["certificate 'farm1' expires in 5.5 days"])
        document = await trio.to_thread.run_sync(fetch_status, url)
        assert document["role"] == "sidecar" and document["warnings"] == [
            "certificate 'farm1' expires in 5.5 days"
        ]
        assert document["statistics"]["sessions_active"] == 2 and document["uptime"] >= 0
        assert document["statistics"]["peers"][0]["days_left"] == 5.5 and server.requests == 1
        nursery.cancel_scope.cancel()


async def test_only_get_and_head_of_status_are_served() -> None:
    async with trio.open_nursery() as nursery:
        server, _url = await serving(nursery, [])
        assert server.port is not None
        head = await raw_request(server.port, b"HEAD /status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
        assert b"Content-Type: application/json" in head
        missing = await raw_request(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert missing.startswith(b"HTTP/1.1 404") and b"/status" in missing
        posted = await raw_request(server.port, b"POST /status HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert posted.startswith(b"HTTP/1.1 405") and b"Allow: GET, HEAD" in posted
        garbage = await raw_request(server.port, b'{"id":1,"method":"mining.subscribe"}\n\n')
        assert garbage.startswith(b"HTTP/1.1 400")
        with_query = await raw_request(server.port, b"GET /status/?pretty=1 HTTP/1.0\r\n\r\n")
        assert with_query.startswith(b"HTTP/1.1 200")
        assert json.loads(with_query.split(b"\r\n\r\n", 1)[1])["role"] == "sidecar"
        nursery.cancel_scope.cancel()


async def test_a_silent_client_does_not_hold_the_endpoint(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        server, _url = await serving(nursery, [])
        assert server.port is not None
        silent = await trio.open_tcp_stream("127.0.0.1", server.port)
        with trio.fail_after(10):
            assert await silent.receive_some(100) == b""  # closed after the request timeout
        await silent.aclose()
        nursery.cancel_scope.cancel()


def test_the_document_is_printed_for_people() -> None:
    document = msgspec.json.decode(
        msgspec.json.encode(
            {
                "role": "sidecar",
                "version": "0.1.0",
                "started": NOW,
                "uptime": 7260.0,
                "warnings": ["the miner certificate 'farm1' expires in 5.5 days; renew it"],
                "statistics": counters(),
            }
        )
    )
    text = format_status(document, "http://127.0.0.1:9101/status")
    assert text.splitlines()[0] == (
        "sidecar (stratumrm 0.1.0), up 2 h 01 min since 2026-11-24 12:00 UTC  [http://127.0.0.1:9101/status]"
    )
    assert "sidecar1" in text and "300.0" in text and "ok" in text
    assert "farm1" in text and "EXPIRES SOON" in text
    assert "  ! the miner certificate 'farm1' expires in 5.5 days; renew it" in text
    assert "refusals          revoked 2" in text and "closed_by_reason  none" in text
    assert "sessions_active   2" in text and "pool              stratum+tcp://127.0.0.1:3333" in text


def test_status_urls() -> None:
    assert status_url("http://127.0.0.1:9101") == "http://127.0.0.1:9101/status"
    assert status_url("127.0.0.1:9101") == "http://127.0.0.1:9101/status"
    assert status_url("http://[::1]:9101/status") == "http://[::1]:9101/status"
    with pytest.raises(BridgeError, match="--status-listen"):
        status_url("https://127.0.0.1:9101")


async def test_the_status_command_prints_and_exits_3_on_warnings() -> None:
    runner = CliRunner()
    async with trio.open_nursery() as nursery:
        _server, url = await serving(nursery, ["this sidecar's certificate 'sidecar1' expires in 2.0 days"])
        result = await trio.to_thread.run_sync(partial(runner.invoke, status, ["--url", url]))
        assert result.exit_code == WARNINGS_EXIT_STATUS, result.output
        assert "sidecar (stratumrm" in result.output and "! this sidecar's certificate" in result.output
        raw = await trio.to_thread.run_sync(partial(runner.invoke, status, ["--url", url, "--json"]))
        assert json.loads(raw.output)["statistics"]["pool"] == "stratum+tcp://127.0.0.1:3333"
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        _server, url = await serving(nursery, [])
        result = await trio.to_thread.run_sync(partial(runner.invoke, status, ["--url", url]))
        assert result.exit_code == 0 and "Warnings: none" in result.output
        nursery.cancel_scope.cancel()


def test_the_status_command_says_what_to_check_when_nothing_answers() -> None:
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = CliRunner().invoke(status, ["--url", f"http://127.0.0.1:{port}", "--timeout", "2"])
    assert result.exit_code == 1
    assert "cannot reach" in result.output and "--status-listen" in result.output
