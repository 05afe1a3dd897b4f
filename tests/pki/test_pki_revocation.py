"""RevocationList: load, query, reload when the file changes, refuse bad files."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bridge.errors import PKIError
from bridge.pki.revocation import RevocationList
from bridge.testing.pki import TestPKI, make_test_pki


def _miner_serial(test_pki: TestPKI) -> int:
    return test_pki.authority.latest(test_pki.miner_name).serial_number


def test_fresh_list_is_empty(test_pki: TestPKI) -> None:
    revocations = RevocationList(test_pki.revocations, test_pki.ca_certificate)
    assert len(revocations) == 0
    assert not revocations.is_revoked(_miner_serial(test_pki))
    assert revocations.crl_number == 1
    assert not revocations.reload_if_changed()


def test_revoked_serial_shows_after_reload_and_in_a_fresh_load(test_pki: TestPKI) -> None:
    revocations = RevocationList(test_pki.revocations, test_pki.ca_certificate)
    serial = _miner_serial(test_pki)
    test_pki.authority.revoke(test_pki.miner_name)
    assert not revocations.is_revoked(serial)  # not until reloaded
    assert revocations.reload_if_changed()
    assert revocations.is_revoked(serial)
    assert revocations.revocation_date(serial) is not None
    assert not revocations.reload_if_changed()  # nothing new
    assert RevocationList(test_pki.revocations, test_pki.ca_certificate).is_revoked(serial)
    assert revocations.reload_count == 2


def test_touching_the_file_without_changing_it_does_not_reload(test_pki: TestPKI) -> None:
    revocations = RevocationList(test_pki.revocations, test_pki.ca_certificate)
    stamp = os.stat(test_pki.revocations)
    os.utime(test_pki.revocations, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 5_000_000_000))
    assert not revocations.reload_if_changed()
    assert revocations.reload_count == 1


def test_a_broken_file_keeps_the_previous_list_and_is_retried(test_pki: TestPKI, tmp_path: Path) -> None:
    revocations = RevocationList(test_pki.revocations, test_pki.ca_certificate)
    test_pki.authority.revoke(test_pki.miner_name)
    good = test_pki.revocations.read_bytes()
    test_pki.revocations.write_bytes(good[: len(good) // 2])  # a half-written file
    with pytest.raises(PKIError, match="not a PEM revocation list"):
        revocations.reload_if_changed()
    assert len(revocations) == 0 and revocations.crl_number == 1
    test_pki.revocations.write_bytes(good)
    assert revocations.reload_if_changed()
    assert revocations.is_revoked(_miner_serial(test_pki))


def test_missing_file_is_reported_with_advice(test_pki: TestPKI) -> None:
    revocations = RevocationList(test_pki.revocations, test_pki.ca_certificate)
    test_pki.revocations.unlink()
    with pytest.raises(PKIError, match=r"revocation list not found.*init"):
        revocations.reload_if_changed()
    with pytest.raises(PKIError, match="revocation list not found"):
        RevocationList(test_pki.revocations, test_pki.ca_certificate)


def test_a_list_from_another_ca_is_refused(test_pki: TestPKI, tmp_path: Path) -> None:
    other = make_test_pki(tmp_path / "other")
    with pytest.raises(PKIError, match="not signed by the CA"):
        RevocationList(other.revocations, test_pki.ca_certificate)
    revocations = RevocationList(test_pki.revocations, test_pki.ca_certificate)
    other.authority.revoke(other.miner_name)
    shutil.copy(other.revocations, test_pki.revocations)
    with pytest.raises(PKIError, match="not signed by the CA"):
        revocations.reload_if_changed()


def test_an_older_list_does_not_replace_a_newer_one(test_pki: TestPKI, tmp_path: Path) -> None:
    old_copy = tmp_path / "old.pem"
    shutil.copy(test_pki.revocations, old_copy)
    test_pki.authority.revoke(test_pki.miner_name)
    revocations = RevocationList(test_pki.revocations, test_pki.ca_certificate)
    os.replace(old_copy, test_pki.revocations)
    with pytest.raises(PKIError, match="older than the loaded"):
        revocations.reload_if_changed()
    assert revocations.is_revoked(_miner_serial(test_pki))


def test_stale_list_is_still_used_and_flagged(test_pki: TestPKI) -> None:
    test_pki.authority.revoke(test_pki.miner_name)
    revocations = RevocationList(test_pki.revocations, test_pki.ca_certificate)
    later = datetime.now(UTC) + timedelta(days=31)
    assert revocations.is_stale(later)
    assert not revocations.is_stale(datetime.now(UTC))
    assert revocations.is_revoked(_miner_serial(test_pki))


def test_wrong_ca_path_is_reported(test_pki: TestPKI, tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="CA certificate not found"):
        RevocationList(test_pki.revocations, tmp_path / "ca.pem")
    with pytest.raises(PKIError, match="not a PEM certificate"):
        RevocationList(test_pki.revocations, test_pki.revocations)
