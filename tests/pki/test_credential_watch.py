"""CredentialWatch, the decisions of certificate watching, with the clocks passed in (no trio, no sleeping)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bridge.pki.rotation import (
    REMINDER_INTERVAL,
    CertificateStatus,
    ClientCredentials,
    CredentialWatch,
    ServerCredentials,
)
from bridge.testing.pki import TestPKI


def _remedy(status: CertificateStatus) -> str:
    return f"renew {status.name}"


def proxy_watch(test_pki: TestPKI) -> CredentialWatch:
    return CredentialWatch(
        ClientCredentials.from_bundle(test_pki.miner_bundle), subject="this proxy's certificate", remedy=_remedy
    )


def test_expiry_is_judged_at_the_now_it_is_given(test_pki: TestPKI) -> None:
    watch = proxy_watch(test_pki)
    assert watch.credentials is not None and watch.credentials.certificate is not None
    not_after = watch.credentials.certificate.not_valid_after_utc
    assert watch.warnings(not_after - timedelta(days=30)) == []
    [(key, soon)] = watch.warnings(not_after - timedelta(days=3))
    assert key.startswith("certificate ") and "this proxy's certificate" in soon and "expires in 3.0 days" in soon
    assert soon.endswith(f"renew {test_pki.miner_name}")
    [(_key, expired)] = watch.warnings(not_after + timedelta(days=1))
    assert "expired at" in expired


def test_a_renewed_file_is_reloaded_once_and_said_in_one_line(test_pki: TestPKI) -> None:
    watch = proxy_watch(test_pki)
    now = datetime.now(UTC)
    assert watch.presenting(now) is not None and "watching it for renewal" in (watch.presenting(now) or "")
    assert watch.reload(now) is None  # nothing changed
    renewed = test_pki.authority.renew(test_pki.miner_name)
    line = watch.reload(now)
    assert line is not None and line.startswith("certificate reloaded from ") and renewed.record.serial in line
    assert watch.reload(now) is None
    assert watch.reload(now, force=True) is None  # same content: nothing to swap


def test_a_broken_file_keeps_the_certificate_and_is_a_warning_until_fixed(test_pki: TestPKI) -> None:
    watch = proxy_watch(test_pki)
    assert watch.credentials is not None
    context = watch.credentials.context
    good = test_pki.miner_bundle.read_bytes()
    test_pki.miner_bundle.write_bytes(good[:300])
    now = datetime.now(UTC)
    assert watch.reload(now) is None and watch.credentials.context is context
    [(key, message)] = watch.warnings(now)
    assert key == "certificate reload" and "still using the certificate loaded before" in message
    test_pki.miner_bundle.write_bytes(good)
    watch.reload(now, force=True)
    assert watch.warnings(now) == []


def test_a_sidecar_watch_warns_about_its_ca_too(test_pki: TestPKI) -> None:
    credentials = ServerCredentials(test_pki.pool_certificate, test_pki.pool_key, test_pki.ca_certificate)
    watch = CredentialWatch(credentials, subject="this sidecar's certificate", remedy=_remedy, window=timedelta(days=100 * 365))
    keys = [key for key, _message in watch.warnings(datetime.now(UTC))]
    assert [key.split()[0] for key in keys] == ["certificate", "ca"]


def test_due_says_each_warning_once_a_reminder_interval_and_again_when_it_comes_back(test_pki: TestPKI) -> None:
    watch = proxy_watch(test_pki)
    found = [("a", "first"), ("b", "second")]
    assert watch.due(found, 0.0) == ["first", "second"]
    assert watch.due(found, 10.0) == []
    assert watch.due(found, REMINDER_INTERVAL) == ["first", "second"]
    assert watch.due([("b", "second")], REMINDER_INTERVAL + 1) == []  # "a" ended ...
    assert watch.due(found, REMINDER_INTERVAL + 2) == ["first"]  # ... and is said at once when it is back


def test_no_credentials_watch_nothing() -> None:
    watch = CredentialWatch(None, subject="x", remedy=_remedy)
    now = datetime.now(UTC)
    assert not watch.watching and watch.presenting(now) is None and watch.reload(now, force=True) is None
    assert watch.warnings(now) == []
