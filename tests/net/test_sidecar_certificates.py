"""The sidecar's certificate checks on real sockets: every refusal, the cap, hot reloads.

Each refusal is checked three ways: the connection does not become a session, the
proxy is told why (``rm.error``, when the handshake completed), and the log has a
warning that says what happened and what to do. The proxy here is the hand-written
TestProxy of test_sidecar.py.
"""

from __future__ import annotations

import logging
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from test_sidecar import DIFFICULTY, LOCALHOST, TestProxy

from bridge.config import parse_upstream_url
from bridge.net.sidecar import SidecarServer
from bridge.pki.revocation import RevocationList
from bridge.pki.rotation import ServerCredentials
from bridge.pki.tls import client_context_from_bundle
from bridge.testing.pki import TestPKI, make_test_pki
from bridge.testing.pool import PoolConfig, ReferencePool

LOGGER = "bridge.sidecar"


def _now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    return make_test_pki(tmp_path / "pki", accounts=("alice",))


async def start(nursery: trio.Nursery, pki: TestPKI, **options: Any) -> SidecarServer:
    """Pool and sidecar, the sidecar with reloading credentials and the revocation list."""
    pool = ReferencePool(PoolConfig(difficulty=DIFFICULTY, extranonce2_size=4, notify_interval=30.0))
    pool_port = await nursery.start(pool.serve, LOCALHOST, 0)
    options.setdefault("revocations", RevocationList(pki.revocations, pki.ca_certificate))
    options.setdefault("reload_interval", 3600.0)  # tests call server.reload() (what SIGHUP does)
    credentials = ServerCredentials(pki.pool_certificate, pki.pool_key, pki.ca_certificate)
    server = SidecarServer(parse_upstream_url(f"stratum+tcp://{LOCALHOST}:{pool_port}"), credentials, **options)
    await nursery.start(server.serve, LOCALHOST, 0)
    return server


async def connect(
    nursery: trio.Nursery,
    server: SidecarServer,
    context: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
) -> TestProxy:
    """TestProxy.connect, optionally offering a TLS session to resume."""
    assert server.port is not None
    tcp = await trio.open_tcp_stream(LOCALHOST, server.port)
    stream = trio.SSLStream(tcp, context, server_hostname=LOCALHOST)
    if session is not None:
        stream.session = session
    await stream.do_handshake()
    proxy = TestProxy(stream, server)
    await proxy.udp.bind((LOCALHOST, 0))
    nursery.start_soon(proxy._read)
    nursery.start_soon(proxy._read_udp)
    return proxy


async def refused(proxy: TestProxy) -> str:
    """The reason of the rm.error a refused proxy gets before the close."""
    error = await proxy.wait_for(lambda m: m.get("method") == "rm.error")
    with trio.fail_after(5):
        while not proxy.closed:
            await trio.sleep(0.01)
    await proxy.aclose()
    return error["params"]["reason"]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def served_serial(proxy: TestProxy) -> int:
    """The serial of the certificate the sidecar presented to ``proxy``."""
    return x509.load_der_x509_certificate(proxy.stream.getpeercert(binary_form=True)).serial_number


# ------------------------------------------------------------------ refusals


async def test_no_certificate_and_another_ca_fail_the_handshake_with_a_clear_log_line(
    pki: TestPKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    other = make_test_pki(tmp_path / "other")
    no_certificate = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_certificate.load_verify_locations(pki.ca_certificate)
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    foreign.load_verify_locations(pki.ca_certificate)
    foreign.load_cert_chain(other.miner_bundle)
    async with trio.open_nursery() as nursery:
        server = await start(nursery, pki)
        for context in (no_certificate, foreign):
            tcp = await trio.open_tcp_stream(LOCALHOST, server.port)
            stream = trio.SSLStream(tcp, context, server_hostname=LOCALHOST)
            with trio.fail_after(5), pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
                await stream.do_handshake()  # TLS 1.3: the refusal may only show on the first read
                if not await stream.receive_some(100):
                    raise trio.BrokenResourceError("closed")
            await trio.aclose_forcefully(stream)
        with trio.fail_after(2):
            while server.statistics().handshake_failures < 2:
                await trio.sleep(0.01)
        stats = server.statistics()
        assert stats.refusals == {"no certificate": 1, "unknown CA": 1} and stats.sessions_total == 0
        logged = warnings(caplog)
        assert any("failed: the client presented no certificate" in m and "stratumrm pki issue-miner" in m for m in logged)
        assert any("not issued by this sidecar's CA" in m and "give that proxy a bundle" in m for m in logged)
        nursery.cancel_scope.cancel()


async def test_expired_and_not_yet_valid_certificates_are_refused_after_the_handshake(
    pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    now = _now()
    expired = pki.authority.issue_miner("old-rig", accounts=["alice"], days=1, now=now - timedelta(days=2))
    early = pki.authority.issue_miner("early-rig", accounts=["alice"], now=now + timedelta(minutes=5, seconds=40))
    async with trio.open_nursery() as nursery:
        server = await start(nursery, pki)
        reason = await refused(await connect(nursery, server, client_context_from_bundle(expired.bundle_path)))
        assert "'old-rig'" in reason and "expired at" in reason and "stratumrm pki renew old-rig" in reason
        reason = await refused(await connect(nursery, server, client_context_from_bundle(early.bundle_path)))
        assert "'early-rig'" in reason and "is not valid before" in reason and "leeway 10 s" in reason
        stats = server.statistics()
        assert stats.refusals == {"expired": 1, "not yet valid": 1} and stats.sessions_total == 0
        logged = warnings(caplog)
        assert any("refused proxy" in m and "after the TLS handshake" in m and "renew old-rig" in m for m in logged)
        assert any("refused proxy" in m and "check the clocks (NTP)" in m for m in logged)
        nursery.cancel_scope.cancel()


async def test_the_clock_skew_leeway_is_configurable(pki: TestPKI) -> None:
    early = pki.authority.issue_miner("early-rig", accounts=["alice"], now=_now() + timedelta(minutes=5, seconds=30))
    async with trio.open_nursery() as nursery:
        server = await start(nursery, pki, clock_skew=timedelta(seconds=90))
        proxy = await connect(nursery, server, client_context_from_bundle(early.bundle_path))
        assert (await proxy.hello())["version"] == 1  # 30 s early, within 90 s of leeway
        await proxy.aclose()
        nursery.cancel_scope.cancel()


async def test_a_revoked_certificate_is_refused_on_fresh_and_resumed_sessions(
    pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    context = pki.client_context()
    async with trio.open_nursery() as nursery:
        server = await start(nursery, pki)
        first = await connect(nursery, server, context)
        await first.hello()  # application data read: the session tickets are in
        session = first.stream.session
        assert session.has_ticket
        await first.aclose()

        pki.authority.revoke(pki.miner_name)
        server.reload()  # what the watcher does every few seconds, and SIGHUP at once

        fresh = await connect(nursery, server, context)
        assert not fresh.stream.session_reused
        assert "is revoked since" in await refused(fresh)
        resumed = await connect(nursery, server, context, session)
        assert resumed.stream.session_reused  # OpenSSL let it in without looking at the certificate ...
        assert "is revoked since" in await refused(resumed)  # ... the sidecar did not
        stats = server.statistics()
        assert stats.refusals == {"revoked": 2} and stats.sessions_total == 1
        assert stats.handshakes_resumed == 1 and stats.handshakes_full == 2
        logged = warnings(caplog)
        assert any("after the TLS handshake" in m and "is revoked" in m for m in logged)
        assert any("after a resumed TLS session" in m and "is revoked" in m for m in logged)
        nursery.cancel_scope.cancel()


async def test_an_account_the_certificate_does_not_name_is_refused_and_logged_with_its_name(
    pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with trio.open_nursery() as nursery:
        server = await start(nursery, pki)
        proxy = await connect(nursery, server, pki.client_context())
        await proxy.hello()
        await proxy.open(3)
        for request_id in (20, 21):  # asked twice, logged once
            await proxy.send({"ch": 3, "id": request_id, "method": "mining.authorize", "params": ["mallory.rig1", "x"]})
            answer = await proxy.wait_for(lambda m, i=request_id: m.get("ch") == 3 and m.get("id") == i)
            assert answer["result"] is False and answer["error"][0] == 24
        await proxy.send(
            {
                "ch": 3,
                "id": 22,
                "method": "mining.submit",
                "params": ["mallory.rig1", "1", "00000000", "6554a2c1", "00000001"],
            }
        )
        answer = await proxy.wait_for(lambda m: m.get("ch") == 3 and m.get("id") == 22)
        assert answer["error"][0] == 24
        assert server.statistics().authorizations_refused == 2
        logged = [m for m in warnings(caplog) if "refused mining" in m]
        assert len(logged) == 1, logged
        assert f"miner certificate '{pki.miner_name}'" in logged[0] and "names the accounts alice, not 'mallory'" in logged[0]
        assert "--account alice --account mallory" in logged[0] and "correct the rig's worker name" in logged[0]
        await proxy.aclose()
        nursery.cancel_scope.cancel()


async def test_connections_over_the_per_certificate_cap_are_refused(pki: TestPKI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    context = pki.client_context()
    async with trio.open_nursery() as nursery:
        server = await start(nursery, pki, max_connections_per_cert=2)
        proxies = [await connect(nursery, server, context) for _ in range(2)]
        for proxy in proxies:
            await proxy.hello()
        reason = await refused(await connect(nursery, server, context))
        assert "already holds 2 control connections" in reason
        assert server.statistics().refusals == {"connection limit": 1}
        assert any("--max-connections-per-cert 2" in m and "give each its own" in m for m in warnings(caplog))
        await proxies.pop().aclose()
        with trio.fail_after(5):
            while server.statistics().sessions_active > 1:
                await trio.sleep(0.01)
        again = await connect(nursery, server, context)
        assert (await again.hello())["version"] == 1  # a slot is free again
        stats = server.statistics()
        [connected] = stats.connected_certificates
        assert connected.connections == 2 and connected.name == pki.miner_name and connected.accounts == ("alice",)
        for proxy in (*proxies, again):
            await proxy.aclose()
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ hot reload


async def test_live_sessions_of_a_newly_revoked_certificate_close_within_seconds(
    pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    other = pki.authority.issue_miner("other-rig", accounts=["alice"])
    async with trio.open_nursery() as nursery:
        server = await start(nursery, pki, reload_interval=0.25)
        doomed = await connect(nursery, server, pki.client_context())
        steady = await connect(nursery, server, client_context_from_bundle(other.bundle_path))
        for proxy in (doomed, steady):
            await proxy.hello()
            await proxy.open(3)
        pki.authority.revoke(pki.miner_name)  # rewrites revocations.pem; nobody calls reload()
        reason = await refused(doomed)
        assert "was revoked" in reason  # found by the file watcher; no wall-clock bound (tests run loaded)
        # The other certificate's session carries on.
        await steady.send({"ch": 3, "id": 30, "method": "mining.suggest_difficulty", "params": [0.001]})
        assert (await steady.wait_for(lambda m: m.get("id") == 30))["result"] is True
        assert server.statistics().sessions_active == 1
        assert any("revocation list" in r.getMessage() and "reloaded" in r.getMessage() for r in caplog.records)
        assert any("closing the session of proxy" in m and "1 channels end now" in m for m in warnings(caplog))
        await steady.aclose()
        nursery.cancel_scope.cancel()


async def test_a_broken_revocation_list_keeps_the_previous_one_and_is_reported(pki: TestPKI) -> None:
    async with trio.open_nursery() as nursery:
        server = await start(nursery, pki)
        good = pki.revocations.read_bytes()
        pki.revocations.write_bytes(good[: len(good) // 2])  # caught half-written
        server.reload()
        assert any("revocation list not reloaded" in w for w in server.warnings())
        pki.revocations.write_bytes(good)
        server.reload(force=True)
        assert not any("revocation list not reloaded" in w for w in server.warnings())
        nursery.cancel_scope.cancel()


async def test_a_renewed_sidecar_certificate_serves_new_handshakes_while_sessions_continue(
    pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with trio.open_nursery() as nursery:
        server = await start(nursery, pki, reload_interval=0.2)
        before = server.statistics().certificate
        assert before is not None
        live = await connect(nursery, server, pki.client_context())
        await live.hello()
        await live.open(3)
        assert served_serial(live) == int(before.serial, 16)

        renewed = pki.authority.renew(pki.pool_name)  # writes pools/NAME.pem and .key in place
        with trio.fail_after(3):
            while server.statistics().certificate_reloads == 0:
                await trio.sleep(0.05)
        newcomer = await connect(nursery, server, pki.client_context())
        await newcomer.hello()
        assert served_serial(newcomer) == renewed.record.serial_number
        # The session from before the reload goes on, on its old certificate.
        await live.send({"ch": 3, "id": 31, "method": "mining.suggest_difficulty", "params": [0.001]})
        assert (await live.wait_for(lambda m: m.get("id") == 31))["result"] is True
        stats = server.statistics()
        assert stats.sessions_active == 2 and stats.certificate.serial == renewed.record.serial  # type: ignore[union-attr]
        assert any(
            "certificate reloaded from" in r.getMessage() and "the 1 live sessions continue" in r.getMessage()
            for r in caplog.records
        )
        await live.aclose()
        await newcomer.aclose()
        nursery.cancel_scope.cancel()


async def test_expiring_certificates_are_warned_about_in_the_log_and_the_statistics(
    pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    short = pki.authority.issue_miner("short-rig", accounts=["alice"], days=3)
    async with trio.open_nursery() as nursery:
        server = await start(nursery, pki, expiry_warning=timedelta(days=400))  # everything is "soon"
        proxy = await connect(nursery, server, client_context_from_bundle(short.bundle_path))
        await proxy.hello()
        server.reload()
        stats = server.statistics()
        assert stats.certificate is not None and stats.certificate.expiring_soon
        assert 364 < stats.certificate.days_left <= 365
        [peer] = stats.connected_certificates
        assert peer.name == "short-rig" and peer.expiring_soon and peer.days_left < 3.01
        found = server.warnings()
        assert any("this sidecar's certificate" in w and f"stratumrm pki renew {pki.pool_name}" in w for w in found)
        assert any("'short-rig'" in w and "install the new bundle on that proxy" in w for w in found)
        logged = warnings(caplog)
        assert sum("this sidecar's certificate" in m for m in logged) == 1  # once a day, not per reload
        server.reload()
        assert sum("this sidecar's certificate" in m for m in warnings(caplog)) == 1
        await proxy.aclose()
        nursery.cancel_scope.cancel()
