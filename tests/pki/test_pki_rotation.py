"""Certificates reloaded from disk, expiry status, clock-skew leeway and refusal kinds."""

from __future__ import annotations

import os
import ssl
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest

from bridge.errors import PKIError
from bridge.pki.identity import CertificateRefused
from bridge.pki.revocation import RevocationList
from bridge.pki.rotation import (
    ClientCredentials,
    Reminders,
    ServerCredentials,
    certificate_status,
    expiry_warning,
)
from bridge.pki.tls import (
    check_miner_peer,
    client_context_from_bundle,
    explain_handshake_failure,
    server_context,
)
from bridge.testing.pki import TestPKI, make_test_pki


def _now() -> datetime:
    return datetime.now(UTC)


def _server(pki: TestPKI, **options) -> ServerCredentials:
    return ServerCredentials(pki.pool_certificate, pki.pool_key, pki.ca_certificate, **options)


# ------------------------------------------------------------------ reloading


def test_server_credentials_reload_a_renewed_certificate_into_a_new_context(test_pki: TestPKI) -> None:
    credentials = _server(test_pki)
    first_context, first = credentials.context, credentials.status(_now())
    assert first is not None and first.role == "pool" and first.name == test_pki.pool_name
    assert not credentials.reload_if_changed()  # nothing moved: one stat per file

    renewed = test_pki.authority.renew(test_pki.pool_name)
    assert credentials.reload_if_changed()
    second = credentials.status(_now())
    assert second is not None and second.serial == renewed.record.serial != first.serial
    assert credentials.context is not first_context  # a new context; the old one is untouched
    assert first_context.get_ca_certs() and credentials.reloads == 1
    assert not credentials.reload_if_changed(force=True)  # same content: nothing rebuilt


def test_touching_the_files_without_changing_them_builds_nothing(test_pki: TestPKI) -> None:
    credentials = _server(test_pki)
    context = credentials.context
    os.utime(test_pki.pool_certificate, ns=(1, 1))
    assert not credentials.reload_if_changed()
    assert credentials.context is context and credentials.reloads == 0


def test_a_half_written_pair_keeps_the_context_in_use_and_is_retried(test_pki: TestPKI, tmp_path: Path) -> None:
    credentials = _server(test_pki)
    context = credentials.context
    old_key = test_pki.pool_key.read_bytes()
    test_pki.authority.renew(test_pki.pool_name)
    new_key = test_pki.pool_key.read_bytes()
    test_pki.pool_key.write_bytes(old_key)  # the new certificate arrived, the key not yet
    with pytest.raises(PKIError, match=r"key belongs to the certificate.*still using the certificate loaded before"):
        credentials.reload_if_changed()
    assert credentials.context is context and credentials.last_error is not None
    test_pki.pool_key.write_bytes(new_key)
    assert credentials.reload_if_changed()
    assert credentials.last_error is None and credentials.context is not context


def test_the_sidecar_will_not_present_a_miner_certificate(test_pki: TestPKI, tmp_path: Path) -> None:
    bundle = test_pki.miner_bundle
    with pytest.raises(PKIError, match=r"holds a miner certificate.*pool certificate"):
        ServerCredentials(bundle, bundle, test_pki.ca_certificate)


def test_client_credentials_reload_a_renewed_bundle(test_pki: TestPKI) -> None:
    credentials = ClientCredentials.from_bundle(test_pki.miner_bundle)
    context = credentials.context
    assert credentials.status(_now()).role == "miner"  # type: ignore[union-attr]
    renewed = test_pki.authority.renew(test_pki.miner_name)
    assert credentials.reload_if_changed()
    assert credentials.status(_now()).serial == renewed.record.serial  # type: ignore[union-attr]
    assert credentials.context is not context
    statistics = credentials.statistics(_now())
    assert statistics.reloads == 1 and statistics.certificate is not None


def test_sessions_are_only_offered_to_the_context_that_received_them(test_pki: TestPKI) -> None:
    credentials = ClientCredentials.from_bundle(test_pki.miner_bundle)

    class Session:
        has_ticket = True

    session = Session()
    credentials.remember_session(("sidecar", 1), credentials.context, session)  # type: ignore[arg-type]
    assert credentials.session_for(("sidecar", 1)) is session
    ticketless = type("Ticketless", (), {"has_ticket": False})()
    credentials.remember_session(("other", 1), credentials.context, ticketless)  # type: ignore[arg-type]
    assert credentials.session_for(("other", 1)) is None
    test_pki.authority.renew(test_pki.miner_name)
    credentials.reload_if_changed()
    assert credentials.session_for(("sidecar", 1)) is None  # from the old context: dropped


def test_a_fixed_context_is_never_reloaded() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    credentials = ClientCredentials.fixed(context)
    assert credentials.context is context and not credentials.reload_if_changed(force=True)
    assert credentials.status(_now()) is None


# ------------------------------------------------------------------ expiry


def test_status_and_warning_of_a_certificate_that_expires_soon(test_pki: TestPKI) -> None:
    issued = test_pki.authority.issue_miner("short", accounts=["alice"], days=5)
    now = _now()
    status = certificate_status(issued.certificate, now, timedelta(days=14), file="miners/short.bundle.pem")
    assert status.role == "miner" and status.name == "short" and status.expiring_soon and not status.expired
    assert 4.9 < status.days_left <= 5.0 and status.file == "miners/short.bundle.pem"
    warning = expiry_warning(status, "this proxy's certificate", "renew it")
    assert warning is not None and "'short'" in warning and "expires in 5.0 days" in warning and warning.endswith("renew it")
    later = certificate_status(issued.certificate, now + timedelta(days=6), timedelta(days=14))
    assert later.expired and later.days_left < 0
    assert "expired at" in (expiry_warning(later, "x", "y") or "")
    relaxed = certificate_status(issued.certificate, now, timedelta(days=1))
    assert not relaxed.expiring_soon and expiry_warning(relaxed, "x", "y") is None


def test_reminders_repeat_once_a_day_and_again_when_a_condition_comes_back() -> None:
    reminders = Reminders(interval=100.0)
    assert reminders.due("a", 0.0) and not reminders.due("a", 50.0) and reminders.due("a", 100.0)
    reminders.retain([])
    assert reminders.due("a", 101.0)


# ------------------------------------------------------------------ leeway and refusal kinds


async def test_without_openssl_time_checks_the_leeway_decides(test_pki: TestPKI, tls_exchange) -> None:
    """A certificate valid 30 s from now: refused with 10 s of leeway, accepted with 60 s."""
    now = _now()
    early = test_pki.authority.issue_miner("early", accounts=["alice"], now=now + timedelta(minutes=5, seconds=30))
    client = client_context_from_bundle(early.bundle_path)
    credentials = _server(test_pki)

    def check(leeway: float):
        return partial(
            check_miner_peer,
            revocations=None,
            now=_now(),
            leeway=timedelta(seconds=leeway),
            cas=credentials.ca_certificates,
        )

    strict = await tls_exchange(credentials.context, client, server_check=check(10))
    assert isinstance(strict.server_error, CertificateRefused) and strict.server_error.kind == "not yet valid"
    assert "check the clocks" in str(strict.server_error)
    lenient = await tls_exchange(credentials.context, client, server_check=check(60))
    assert lenient.succeeded
    # With OpenSSL's own time check (no leeway at all), the handshake itself fails.
    openssl = await tls_exchange(test_pki.server_context(), client)
    assert not openssl.succeeded and "not yet valid" in openssl.server_failure_text()


async def test_an_expired_certificate_is_refused_by_kind(test_pki: TestPKI, tls_exchange) -> None:
    old = test_pki.authority.issue_miner("old", accounts=["alice"], days=1, now=_now() - timedelta(days=2))
    credentials = _server(test_pki)
    outcome = await tls_exchange(
        credentials.context,
        client_context_from_bundle(old.bundle_path),
        server_check=partial(check_miner_peer, revocations=None, now=_now(), cas=credentials.ca_certificates),
    )
    assert isinstance(outcome.server_error, CertificateRefused) and outcome.server_error.kind == "expired"
    assert "stratumrm pki renew old" in str(outcome.server_error)


async def test_the_issuing_ca_must_be_valid_too(tmp_path: Path, tls_exchange) -> None:
    pki = make_test_pki(tmp_path / "pki")
    credentials = _server(pki)
    ca_end = pki.authority.ca_certificate.not_valid_after_utc
    outcome = await tls_exchange(
        credentials.context,
        pki.client_context(),
        server_check=partial(
            check_miner_peer,
            revocations=None,
            now=ca_end + timedelta(days=1),
            cas=credentials.ca_certificates,
        ),
    )
    assert isinstance(outcome.server_error, CertificateRefused) and outcome.server_error.kind == "CA not valid"


async def test_revocation_is_refused_by_kind_with_its_date(test_pki: TestPKI, tls_exchange) -> None:
    revocations = RevocationList(test_pki.revocations, test_pki.ca_certificate)
    test_pki.authority.revoke(test_pki.miner_name)
    revocations.reload_if_changed()
    outcome = await tls_exchange(
        server_context(test_pki.pool_certificate, test_pki.pool_key, test_pki.ca_certificate, check_time=False),
        test_pki.client_context(),
        server_check=partial(check_miner_peer, revocations=revocations, now=_now()),
    )
    error = outcome.server_error
    assert isinstance(error, CertificateRefused) and error.kind == "revoked"
    assert "is revoked since" in str(error) and f"stratumrm pki renew {test_pki.miner_name}" in str(error)


async def test_handshake_failures_are_explained(test_pki: TestPKI, tmp_path: Path, tls_exchange) -> None:
    no_certificate = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_certificate.load_verify_locations(test_pki.ca_certificate)
    outcome = await tls_exchange(test_pki.server_context(), no_certificate)
    kind, advice = explain_handshake_failure(outcome.server_error)  # type: ignore[arg-type]
    assert kind == "no certificate" and "stratumrm pki issue-miner" in advice

    other = make_test_pki(tmp_path / "other")
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    foreign.load_verify_locations(test_pki.ca_certificate)
    foreign.load_cert_chain(other.miner_bundle)
    outcome = await tls_exchange(test_pki.server_context(), foreign)
    kind, advice = explain_handshake_failure(outcome.server_error)  # type: ignore[arg-type]
    assert kind == "unknown CA" and "not issued by this sidecar's CA" in advice

    # A proxy that refuses the sidecar's certificate (wrong host name) just hangs up.
    outcome = await tls_exchange(test_pki.server_context(), test_pki.client_context(), server_hostname="wrong.example")
    kind, advice = explain_handshake_failure(outcome.server_error)  # type: ignore[arg-type]
    assert kind == "connection lost" and "does not trust this sidecar's certificate" in advice

    old_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    old_client.load_verify_locations(test_pki.ca_certificate)
    outcome = await tls_exchange(test_pki.server_context(), old_client)
    assert explain_handshake_failure(outcome.server_error)[0] == "TLS version"  # type: ignore[arg-type]
