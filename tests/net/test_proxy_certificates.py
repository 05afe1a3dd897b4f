"""The proxy's side of certificates: TLS resumption on reconnect, bundle rotation, status.

A real sidecar (reloading credentials, revocation list) in front of the reference
pool; the proxy's StratumRM link with a bundle's ClientCredentials.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from bridge.config import parse_upstream_url
from bridge.net.miner_proxy import MinerProxy
from bridge.net.proxy_service import ProxyService, proxy_certificate_watcher
from bridge.net.rm_upstream import StratumRMLink
from bridge.net.sidecar import SidecarServer
from bridge.pki.revocation import RevocationList
from bridge.pki.rotation import ClientCredentials, ServerCredentials
from bridge.stats.status import fetch_status
from bridge.testing.pki import TestPKI, make_test_pki
from bridge.testing.pool import PoolConfig, ReferencePool

LOCALHOST = "127.0.0.1"
RIG = "203.0.113.5:4028"


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    return make_test_pki(tmp_path / "pki", accounts=("alice",))


async def start_sidecar(nursery: trio.Nursery, pki: TestPKI) -> SidecarServer:
    pool = ReferencePool(PoolConfig(difficulty=0.001, notify_interval=30.0))
    pool_port = await nursery.start(pool.serve, LOCALHOST, 0)
    server = SidecarServer(
        parse_upstream_url(f"stratum+tcp://{LOCALHOST}:{pool_port}"),
        ServerCredentials(pki.pool_certificate, pki.pool_key, pki.ca_certificate),
        revocations=RevocationList(pki.revocations, pki.ca_certificate),
        reload_interval=3600.0,
    )
    await nursery.start(server.serve, LOCALHOST, 0)
    return server


async def start_link(nursery: trio.Nursery, server: SidecarServer, credentials: ClientCredentials) -> StratumRMLink:
    link = StratumRMLink(parse_upstream_url(f"stratumrm://{LOCALHOST}:{server.port}"), credentials)
    await nursery.start(link.run)
    return link


async def end_sessions(server: SidecarServer, link: StratumRMLink) -> None:
    """The sidecar ends every session (as on a restart of its sessions); wait until the proxy saw it."""
    for connection in list(server._connections.values()):
        connection.session.close("test: session ended by the sidecar", trio.current_time())
        connection.step()
    with trio.fail_after(5):
        while link.connection is not None and link.connection.close_reason is None:
            await trio.sleep(0.01)
        while server.statistics().sessions_active:
            await trio.sleep(0.01)


def serials(server: SidecarServer) -> list[str]:
    return [c.serial for c in server.statistics().connected_certificates]


async def test_reconnects_resume_the_tls_session_and_the_sidecar_still_checks_revocation(
    pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    credentials = ClientCredentials.from_bundle(pki.miner_bundle)
    async with trio.open_nursery() as nursery:
        server = await start_sidecar(nursery, pki)
        link = await start_link(nursery, server, credentials)
        await link.open_handle(RIG)
        assert (credentials.handshakes_full, credentials.handshakes_resumed) == (1, 0)

        await end_sessions(server, link)
        await link.open_handle(RIG)  # a new connection, resuming the first one's session
        assert (credentials.handshakes_full, credentials.handshakes_resumed) == (1, 1)
        assert server.statistics().handshakes_resumed == 1 and link.connections_made == 2

        pki.authority.revoke(pki.miner_name)
        server.reload()  # closes the live session of the revoked certificate
        with trio.fail_after(5):
            while link.connection is not None and link.connection.close_reason is None:
                await trio.sleep(0.01)
        with pytest.raises(ConnectionError, match=r"refused by the sidecar: .* is revoked"):
            await link.open_handle(RIG)  # resumed again, and refused after it
        assert credentials.handshakes_resumed == 2
        assert server.statistics().refusals == {"revoked": 1}
        assert any("after a resumed TLS session" in r.getMessage() and "revoked" in r.getMessage() for r in caplog.records)

        def proxy_says_why() -> bool:
            lines = [r.getMessage() for r in caplog.records if r.name == "bridge.proxy.stratumrm"]
            return any("ended: sidecar error: refused by the sidecar" in m and "is revoked" in m for m in lines)

        with trio.fail_after(2):
            while not proxy_says_why():
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_a_reconnect_waits_for_the_ended_session_to_wind_down(
    pki: TestPKI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A rig that asks while the ended session still closes its stream gets a session of its own.

    At 10,000 rigs the old session's wind-down took long enough for the next attempt to
    start beside it: the two shared the link's control buffer and UDP socket, the sidecar
    read ``rm.open`` before ``rm.hello`` and the old session closed the new one's UDP.
    """
    import bridge.net.rm_upstream as rm_upstream

    real_close = rm_upstream.close_quietly

    async def slow_close(stream: Any) -> None:
        await trio.sleep(0.3)  # a busy proxy: the wind-down yields for a while
        await real_close(stream)

    monkeypatch.setattr(rm_upstream, "close_quietly", slow_close)
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        server = await start_sidecar(nursery, pki)
        link = await start_link(nursery, server, ClientCredentials.from_bundle(pki.miner_bundle))
        await link.open_handle(RIG)
        first_udp = link._udp
        assert first_udp is not None
        await end_sessions(server, link)
        with trio.fail_after(5):
            while True:
                try:
                    await link.open_handle(RIG)
                    break
                except ConnectionError:
                    await trio.sleep(0.01)  # the ended session's waiters hear it ended
        await trio.sleep(0.5)  # past the old session's wind-down
        assert link.connections_made == 2
        assert link._udp is not None and link._udp is not first_udp, "the ended session closed the new one's UDP socket"
        assert link.connection is not None and link.connection.close_reason is None
        sidecar_lines = [r.getMessage() for r in caplog.records if r.name.startswith("bridge.sidecar")]
        assert not any("first line must be rm.hello" in m or "sent twice" in m for m in sidecar_lines), sidecar_lines
        nursery.cancel_scope.cancel()


async def test_a_renewed_bundle_is_used_from_the_next_connection_while_the_live_one_carries_on(
    pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    credentials = ClientCredentials.from_bundle(pki.miner_bundle)
    watcher = proxy_certificate_watcher(credentials)
    async with trio.open_nursery() as nursery:
        server = await start_sidecar(nursery, pki)
        link = await start_link(nursery, server, credentials)
        await link.open_handle(RIG)
        [old_serial] = serials(server)

        renewed = pki.authority.renew(pki.miner_name)  # `stratumrm pki renew`, bundle copied in place
        assert watcher.reload()
        assert any(
            "certificate reloaded from" in r.getMessage() and "the live one carries on" in r.getMessage() for r in caplog.records
        )
        await link.open_handle(RIG)  # another rig: same connection, old certificate
        assert link.connections_made == 1 and serials(server) == [old_serial]

        await end_sessions(server, link)
        await link.open_handle(RIG)
        assert serials(server) == [renewed.record.serial]
        # The old session belonged to the old context: a full handshake, not a resumption.
        assert (credentials.handshakes_full, credentials.handshakes_resumed) == (2, 0)
        pki.authority.revoke(old_serial)  # retiring the old certificate does not touch the new one
        server.reload()
        await trio.sleep(0.05)
        assert serials(server) == [renewed.record.serial]
        nursery.cancel_scope.cancel()


async def test_a_broken_bundle_keeps_the_certificate_in_use(pki: TestPKI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    credentials = ClientCredentials.from_bundle(pki.miner_bundle)
    watcher = proxy_certificate_watcher(credentials)
    context = credentials.context
    pki.miner_bundle.write_bytes(pki.miner_bundle.read_bytes()[:300])  # a copy cut short
    assert not watcher.reload()
    assert credentials.context is context
    [warning] = watcher.warnings()
    assert "certificate not reloaded" in warning and "still using the certificate loaded before" in warning
    assert any(r.levelno == logging.WARNING and "certificate not reloaded" in r.getMessage() for r in caplog.records)


async def test_the_proxy_status_shows_its_certificate_handshakes_and_expiry_warning(pki: TestPKI) -> None:
    credentials = ClientCredentials.from_bundle(pki.miner_bundle, expiry_warning=timedelta(days=400))
    async with trio.open_nursery() as nursery:
        server = await start_sidecar(nursery, pki)
        proxy = MinerProxy(parse_upstream_url(f"stratumrm://{LOCALHOST}:{server.port}"), upstream_ssl_context=credentials)  # type: ignore[arg-type]
        service = ProxyService(proxy, credentials=credentials, http_listen=(LOCALHOST, 0))
        await nursery.start(service.run, LOCALHOST, 0)
        assert proxy.link is not None and proxy.link.credentials is credentials
        await proxy.link.open_handle(RIG)
        assert service.web.port is not None
        document: dict[str, Any] = await trio.to_thread.run_sync(fetch_status, f"http://{LOCALHOST}:{service.web.port}")
        assert document["role"] == "proxy"
        tls = document["statistics"]["tls"]
        assert tls["certificate"]["name"] == pki.miner_name and tls["certificate"]["expiring_soon"] is True
        assert tls["handshakes_full"] == 1 and "connections_accepted" in document["statistics"]["proxy"]
        [warning] = document["warnings"]
        assert "this proxy's certificate" in warning and f"stratumrm pki renew {pki.miner_name}" in warning
        nursery.cancel_scope.cancel()
