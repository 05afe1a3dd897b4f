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

from bridge import __version__
from bridge.errors import BridgeError
from bridge.pki.rotation import CertificateStatus
from bridge.stats.status import StatusDocument, fetch_status, format_status, status_url
from bridge.status_command import WARNINGS_EXIT_STATUS, status
from bridge.web.server import Request, Response, WebServer, json_response

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


async def serving(nursery: trio.Nursery, warnings: list[str]) -> tuple[WebServer, str]:
    """A management port serving ``/status`` as the roles do (their app adds the rest)."""
    server = WebServer()

    async def document(_request: Request) -> Response:
        return json_response(
            StatusDocument(
                role="sidecar",
                version=__version__,
                started=NOW,
                uptime=12.5,
                warnings=warnings,
                statistics=counters(),
            )
        )

    server.route("/status", document)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{port}"


async def test_get_status_returns_the_roles_statistics_and_warnings() -> None:
    async with trio.open_nursery() as nursery:
        server, url = await serving(nursery, ["certificate 'farm1' expires in 5.5 days"])
        document = await trio.to_thread.run_sync(fetch_status, url)
        assert document["role"] == "sidecar" and document["warnings"] == ["certificate 'farm1' expires in 5.5 days"]
        assert document["statistics"]["sessions_active"] == 2 and document["uptime"] == 12.5
        assert document["statistics"]["peers"][0]["days_left"] == 5.5 and server.requests == 1
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
    with pytest.raises(BridgeError, match="--http-listen"):
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
    assert "cannot reach" in result.output and "--http-listen" in result.output
