"""``stratumrm ping``: connect, TLS, subscribe and authorize times against the reference pool and a sidecar."""

from __future__ import annotations

import socket
from functools import partial
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from bridge.config import parse_upstream_url
from bridge.net.ping_command import ping, ping_once
from bridge.net.sidecar import SidecarServer
from bridge.pki.rotation import ClientCredentials, ServerCredentials
from bridge.pki.tls import (
    public_client_context,
    public_server_context,
)
from bridge.testing.pki import TestPKI, make_test_pki
from bridge.testing.pool import PoolConfig, ReferencePool

LOCALHOST = "127.0.0.1"


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    return make_test_pki(tmp_path / "pki", accounts=("alice",))


def unused_port() -> int:
    with socket.socket() as unused:
        unused.bind((LOCALHOST, 0))
        return unused.getsockname()[1]


async def test_ping_times_each_phase_on_every_transport(pki: TestPKI) -> None:
    async with trio.open_nursery() as nursery:
        pool = ReferencePool(PoolConfig(difficulty=0.001, notify_interval=30.0))
        plain = await nursery.start(pool.serve, LOCALHOST, 0)
        tls = await nursery.start(
            partial(pool.serve, LOCALHOST, 0, ssl_context=public_server_context(pki.pool_certificate, pki.pool_key))
        )
        sidecar = SidecarServer(
            parse_upstream_url(f"stratum+tcp://{LOCALHOST}:{plain}"),
            ServerCredentials(pki.pool_certificate, pki.pool_key, pki.ca_certificate),
        )
        rm = await nursery.start(sidecar.serve, LOCALHOST, 0)

        attempt = await ping_once(parse_upstream_url(f"stratum+tcp://{LOCALHOST}:{plain}"), user="a.b", password="x", timeout=20)
        assert attempt.ok and list(attempt.phases) == ["connect", "subscribe", "authorize"]
        assert all(ms >= 0 for ms in attempt.phases.values())

        context = public_client_context(str(pki.ca_certificate))
        attempt = await ping_once(
            parse_upstream_url(f"stratum+ssl://{LOCALHOST}:{tls}"), user="a.b", password="x", timeout=20, context=context
        )
        assert attempt.ok and list(attempt.phases) == ["connect", "tls", "subscribe", "authorize"]

        credentials = ClientCredentials.from_bundle(pki.miner_bundle)
        url = parse_upstream_url(f"stratumrm://{LOCALHOST}:{rm}")
        first = await ping_once(url, user="alice.ping", password="x", timeout=20, context=credentials)
        assert first.ok and list(first.phases) == ["session", "subscribe", "authorize"] and not first.resumed, first
        second = await ping_once(url, user="alice.ping", password="x", timeout=20, context=credentials)
        assert second.ok and second.resumed  # as the proxy does on reconnection

        # An account the certificate does not name: the sidecar refuses the authorize, in words.
        refused = await ping_once(url, user="mallory.ping", password="x", timeout=20, context=credentials)
        assert not refused.ok and "mining.authorize as mallory.ping refused" in str(refused.error)
        nursery.cancel_scope.cancel()


async def test_ping_errors_are_one_line_without_library_wording() -> None:
    refused = await ping_once(
        parse_upstream_url(f"stratum+tcp://{LOCALHOST}:{unused_port()}"), user="a", password="x", timeout=10
    )
    assert refused.error is not None and refused.error.startswith("connection refused")
    assert "sub-exception" not in refused.error and "\n" not in refused.error


async def test_the_ping_command_prints_attempts_and_a_summary_like_ping() -> None:
    runner = CliRunner()
    async with trio.open_nursery() as nursery:
        pool = ReferencePool(PoolConfig(difficulty=0.001, notify_interval=30.0))
        port = await nursery.start(pool.serve, LOCALHOST, 0)
        result = await trio.to_thread.run_sync(
            partial(runner.invoke, ping, [f"stratum+tcp://{LOCALHOST}:{port}", "-c", "3", "-i", "0"])
        )
        nursery.cancel_scope.cancel()
    lines = result.output.splitlines()
    assert result.exit_code == 0, result.output
    assert lines[0] == f"PING stratum+tcp://{LOCALHOST}:{port} as ping"
    assert [line.split(":")[0] for line in lines[1:4]] == ["attempt 1", "attempt 2", "attempt 3"]
    assert "3 attempts, 3 answered, 0% failed" in lines and lines[-1].startswith("total min/avg/max = ")
    down = await trio.to_thread.run_sync(partial(runner.invoke, ping, [f"stratum+tcp://{LOCALHOST}:{unused_port()}", "-c", "1"]))
    assert down.exit_code == 1 and "attempt 1: error: connection refused" in down.output
    usage = await trio.to_thread.run_sync(partial(runner.invoke, ping, ["stratumrm://127.0.0.1:1"]))
    assert usage.exit_code == 2 and "--bundle" in usage.output
