"""Real TLS 1.3 handshakes on 127.0.0.1 with the control-channel contexts."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from bridge.errors import PKIError
from bridge.pki.authority import CertificateAuthority
from bridge.pki.revocation import RevocationList
from bridge.pki.tls import (
    check_miner_peer,
    client_context,
    client_context_from_bundle,
    public_client_context,
    server_context,
)
from bridge.testing.pki import TestPKI, make_test_pki, server_context_for_pool_tls


def _now() -> datetime:
    return datetime.now(UTC)


def test_contexts_are_tls13_strict_and_verifying(test_pki: TestPKI) -> None:
    for context in (test_pki.server_context(), test_pki.client_context()):
        assert context.minimum_version is ssl.TLSVersion.TLSv1_3
        assert context.verify_mode is ssl.CERT_REQUIRED
        assert context.verify_flags & ssl.VERIFY_X509_STRICT
    assert test_pki.client_context().check_hostname


async def test_mutual_tls13_handshake_succeeds(test_pki: TestPKI, tls_exchange) -> None:
    outcome = await tls_exchange(test_pki.server_context(), test_pki.client_context())
    assert outcome.succeeded, (outcome.client_error, outcome.server_failure_text())
    identity = outcome.server_identity
    assert identity.role == "miner" and identity.name == "test-miner"
    assert identity.accounts == ("alice", "bob")


async def test_python_ssl_shows_the_accounts_in_getpeercert(test_pki: TestPKI, tls_exchange) -> None:
    seen: dict = {}

    def record_peer_dict(tls):
        seen.update(tls.getpeercert())
        return None

    outcome = await tls_exchange(test_pki.server_context(), test_pki.client_context(), server_check=record_peer_dict)
    assert outcome.server_accepted
    assert seen["subjectAltName"] == (
        ("URI", "urn:stratumrm:miner:test-miner"),
        ("URI", "urn:stratumrm:account:alice"),
        ("URI", "urn:stratumrm:account:bob"),
    )


async def test_handshake_with_separate_files_and_host_name(test_pki: TestPKI, tls_exchange, tmp_path: Path) -> None:
    # The bundle holds key and certificate; client_context takes it as cert_file with key_file=None.
    context = client_context(test_pki.miner_bundle, None, test_pki.ca_certificate)
    outcome = await tls_exchange(test_pki.server_context(), context, server_hostname="localhost")
    assert outcome.succeeded


async def test_ed25519_pki_handshake_succeeds(tmp_path: Path, tls_exchange) -> None:
    authority = CertificateAuthority.create(tmp_path / "pki", key_type="ed25519")
    pool = authority.issue_pool("pool", ip_addresses=["127.0.0.1"], key_type="ed25519")
    miner = authority.issue_miner("rig", accounts=["carol"], key_type="ed25519")
    outcome = await tls_exchange(
        server_context(pool.pool_certificate_path, pool.key_path, authority.ca_certificate_path),
        client_context_from_bundle(miner.bundle_path),
    )
    assert outcome.succeeded
    assert outcome.server_identity.key_type == "ed25519"


async def test_client_without_certificate_is_refused(test_pki: TestPKI, tls_exchange) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(cafile=test_pki.ca_certificate)
    outcome = await tls_exchange(test_pki.server_context(), anonymous)
    assert not outcome.succeeded
    assert outcome.client_error is not None
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in outcome.server_failure_text()


async def test_client_certificate_from_another_ca_is_refused(test_pki: TestPKI, tls_exchange, tmp_path: Path) -> None:
    other = make_test_pki(tmp_path / "other")
    # The stranger trusts our pool's CA, so only its own certificate is at fault.
    stranger = client_context(other.miner_bundle, None, test_pki.ca_certificate)
    outcome = await tls_exchange(test_pki.server_context(), stranger)
    assert not outcome.succeeded
    assert outcome.client_error is not None
    assert "CERTIFICATE_VERIFY_FAILED" in outcome.server_failure_text()


async def test_sidecar_from_another_ca_is_refused_by_the_proxy(test_pki: TestPKI, tls_exchange, tmp_path: Path) -> None:
    other = make_test_pki(tmp_path / "other")
    outcome = await tls_exchange(other.server_context(), test_pki.client_context())
    assert not outcome.succeeded
    assert "CERTIFICATE_VERIFY_FAILED" in repr(outcome.client_error.__cause__)


async def test_host_name_mismatch_is_refused(test_pki: TestPKI, tls_exchange) -> None:
    outcome = await tls_exchange(test_pki.server_context(), test_pki.client_context(), server_hostname="pool.example.com")
    assert not outcome.succeeded
    assert "pool.example.com" in str(outcome.client_error.__cause__)


async def test_pool_certificate_cannot_log_in_as_a_miner(test_pki: TestPKI, tls_exchange) -> None:
    # serverAuth-only certificate as client certificate: OpenSSL checks the purpose.
    impostor = client_context(test_pki.pool_certificate, test_pki.pool_key, test_pki.ca_certificate)
    outcome = await tls_exchange(test_pki.server_context(), impostor)
    assert not outcome.succeeded
    assert "unsuitable certificate purpose" in outcome.server_failure_text().lower()


async def test_miner_certificate_cannot_pose_as_the_sidecar(test_pki: TestPKI, tls_exchange) -> None:
    # A rig's clientAuth-only certificate, from the same CA, presented as a server certificate.
    impostor = server_context(test_pki.miner_bundle, None, test_pki.ca_certificate)
    outcome = await tls_exchange(impostor, test_pki.client_context())
    assert not outcome.succeeded
    assert "unsuitable certificate purpose" in str(outcome.client_error.__cause__)


async def test_tls12_client_is_refused(test_pki: TestPKI, tls_exchange) -> None:
    old = test_pki.client_context()
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    outcome = await tls_exchange(test_pki.server_context(), old)
    assert not outcome.succeeded


async def test_expired_certificate_fails_the_full_handshake(test_pki: TestPKI, tls_exchange) -> None:
    expired = test_pki.authority.issue_miner("old-rig", accounts=["alice"], days=1, now=_now() - timedelta(days=3))
    outcome = await tls_exchange(test_pki.server_context(), client_context_from_bundle(expired.bundle_path))
    assert not outcome.succeeded
    assert "expired" in outcome.server_failure_text().lower()


async def test_not_yet_valid_certificate_fails_the_full_handshake(test_pki: TestPKI, tls_exchange) -> None:
    future = test_pki.authority.issue_miner("new-rig", accounts=["alice"], days=10, now=_now() + timedelta(days=2))
    outcome = await tls_exchange(test_pki.server_context(), client_context_from_bundle(future.bundle_path))
    assert not outcome.succeeded
    assert "not yet valid" in outcome.server_failure_text().lower()


async def test_check_miner_peer_runs_on_resumed_sessions_too(test_pki: TestPKI, tls_exchange) -> None:
    """A resumed TLS 1.3 session skips OpenSSL's certificate checks; ours must not."""
    revocations = RevocationList(test_pki.revocations, test_pki.ca_certificate)
    check = partial(check_miner_peer, revocations=revocations, now=_now())
    server, client = test_pki.server_context(), test_pki.client_context()

    first = await tls_exchange(server, client, server_check=check)
    assert first.succeeded and not first.server_reused

    test_pki.authority.revoke(test_pki.miner_name)
    assert revocations.reload_if_changed()

    # OpenSSL accepts the resumed session of a revoked certificate; the peer
    # certificate is still available, so the application check refuses it.
    resumed = await tls_exchange(
        server,
        client,
        session=first.client_session,
        server_check=partial(check_miner_peer, revocations=revocations, now=_now()),
    )
    assert resumed.server_reused and resumed.client_reused
    assert isinstance(resumed.server_error, PKIError)
    assert "revoked" in str(resumed.server_error)
    assert resumed.client_received != b"welcome\n"  # dropped without a welcome


async def test_resumption_accepts_a_certificate_that_expired_since_so_check_miner_peer_must_run(
    test_pki: TestPKI, tls_exchange
) -> None:
    """Documents OpenSSL's behaviour: resumed sessions skip the validity check (~3 s test)."""
    now = _now()
    short_lived = test_pki.authority.issue_miner(
        "short", accounts=["alice"], days=1, now=now - timedelta(days=1) + timedelta(seconds=2)
    )
    server, client = test_pki.server_context(), client_context_from_bundle(short_lived.bundle_path)
    first = await tls_exchange(server, client)
    assert first.succeeded
    await trio.sleep((short_lived.record.not_after - _now()).total_seconds() + 1.1)

    revocations = RevocationList(test_pki.revocations, test_pki.ca_certificate)
    zero_leeway = partial(check_miner_peer, revocations=revocations, leeway=timedelta(0))
    resumed = await tls_exchange(
        server, client, session=first.client_session, server_check=lambda tls: zero_leeway(tls, now=_now())
    )
    assert resumed.server_reused  # OpenSSL let the expired certificate back in ...
    assert isinstance(resumed.server_error, PKIError)  # ... and the application check did not
    assert "expired" in str(resumed.server_error)

    full = await tls_exchange(server, client)
    assert "certificate has expired" in full.server_failure_text()


async def test_check_miner_peer_judges_validity_by_the_callers_clock(test_pki: TestPKI, tls_exchange) -> None:
    revocations = RevocationList(test_pki.revocations, test_pki.ca_certificate)
    outcome = await tls_exchange(
        test_pki.server_context(),
        test_pki.client_context(),
        server_check=partial(check_miner_peer, revocations=revocations, now=_now() + timedelta(days=365)),
    )
    assert isinstance(outcome.server_error, PKIError)
    assert "expired" in str(outcome.server_error)


async def test_client_contexts_refuse_to_skip_the_host_name_check(test_pki: TestPKI) -> None:
    # wrap_bio (trio.SSLStream) would otherwise skip the host name check silently.
    left, _right = trio.testing.memory_stream_pair()
    for context in (test_pki.client_context(), public_client_context(test_pki.ca_certificate)):
        with pytest.raises(ValueError, match="server_hostname is required"):
            trio.SSLStream(left, context)


def test_public_client_context_defaults() -> None:
    context = public_client_context()
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.check_hostname and context.verify_mode is ssl.CERT_REQUIRED


def test_public_client_context_with_a_ca_file_trusts_only_it(test_pki: TestPKI) -> None:
    context = public_client_context(test_pki.ca_certificate)
    assert context.cert_store_stats()["x509_ca"] == 1


async def test_public_contexts_reach_a_stratum_ssl_pool_with_a_private_ca(
    test_pki: TestPKI, tls_exchange, tmp_path: Path
) -> None:
    pool = server_context_for_pool_tls(test_pki)
    assert pool.verify_mode is ssl.CERT_NONE  # an ordinary pool asks for no client certificate
    outcome = await tls_exchange(pool, public_client_context(test_pki.ca_cert), server_check=lambda tls: None)
    assert outcome.server_accepted and outcome.client_received == b"welcome\n"

    stranger = make_test_pki(tmp_path / "other")
    outcome = await tls_exchange(pool, public_client_context(stranger.ca_certificate), server_check=lambda tls: None)
    assert not outcome.server_accepted
    assert "CERTIFICATE_VERIFY_FAILED" in repr(outcome.client_error.__cause__)


def test_missing_files_raise_pki_error_with_a_hint(test_pki: TestPKI, tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="issue-pool"):
        server_context(tmp_path / "nope.pem", tmp_path / "nope.key", test_pki.ca_certificate)
    with pytest.raises(PKIError, match="CA certificate not found"):
        server_context(test_pki.pool_certificate, test_pki.pool_key, tmp_path / "ca.pem")
    with pytest.raises(PKIError, match="not found"):
        public_client_context(tmp_path / "ca.pem")


def test_key_that_does_not_match_the_certificate_is_reported(test_pki: TestPKI, tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="key belongs to the certificate"):
        server_context(test_pki.pool_certificate, test_pki.ca_key, test_pki.ca_certificate)
