"""The CA directory: creation, issuing, renewal, revocation, the index."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from bridge.errors import PKIError
from bridge.pki.authority import CertificateAuthority
from bridge.pki.identity import identity_of


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path / "pki")


def test_create_writes_the_ca_with_a_private_key_only_the_owner_reads(tmp_path: Path) -> None:
    authority = CertificateAuthority.create(tmp_path / "pki")
    assert _mode(authority.directory) == 0o700
    assert _mode(authority.ca_key_path) == 0o600
    assert _mode(authority.ca_certificate_path) == 0o644
    assert authority.revocations_path.is_file() and authority.index_path.is_file()
    constraints = authority.ca_certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = authority.ca_certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    crl = x509.load_pem_x509_crl(authority.revocations_path.read_bytes())
    assert len(list(crl)) == 0 and crl.is_signature_valid(authority.ca_certificate.public_key())


def test_create_keeps_key_private_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        authority = CertificateAuthority.create(tmp_path / "pki")
        pool = authority.issue_pool("pool", dns_names=["pool.example.com"])
    finally:
        os.umask(previous)
    assert _mode(authority.ca_key_path) == 0o600
    assert _mode(pool.key_path) == 0o600


def test_create_refuses_to_overwrite(authority: CertificateAuthority) -> None:
    before = authority.ca_key_path.read_bytes()
    with pytest.raises(PKIError, match="already holds a CA"):
        CertificateAuthority.create(authority.directory)
    assert authority.ca_key_path.read_bytes() == before


def test_create_refuses_even_a_partial_ca(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    directory.mkdir()
    (directory / "ca.key").write_text("something precious")
    with pytest.raises(PKIError, match=r"ca\.key"):
        CertificateAuthority.create(directory)
    assert (directory / "ca.key").read_text() == "something precious"


def test_ed25519_ca(tmp_path: Path) -> None:
    authority = CertificateAuthority.create(tmp_path / "pki", key_type="ed25519")
    assert identity_of(authority.ca_certificate).key_type == "ed25519"
    miner = authority.issue_miner("rig", accounts=["alice"])
    assert identity_of(miner.certificate).key_type == "p256"


def test_open_explains_how_to_create_a_ca(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match=r"pki --dir .* init"):
        CertificateAuthority.open(tmp_path / "missing")


def test_pool_certificate_profile_and_sans(authority: CertificateAuthority) -> None:
    issuance = authority.issue_pool("pool-eu1", dns_names=["Pool.Example.com"], ip_addresses=["10.0.0.5", "::1"])
    certificate = issuance.certificate
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["pool.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("10.0.0.5"), ip_address("::1")]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:stratumrm:pool:pool-eu1"]
    extended = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(extended) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    key_identifier = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    ca_identifier = authority.ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert key_identifier == ca_identifier
    certificate.verify_directly_issued_by(authority.ca_certificate)
    assert issuance.pool_certificate_path.read_bytes() == issuance.certificate_path.read_bytes()
    assert _mode(issuance.key_path) == 0o600


def test_pool_certificate_needs_a_host(authority: CertificateAuthority) -> None:
    with pytest.raises(PKIError, match="--dns NAME or --ip ADDRESS"):
        authority.issue_pool("pool")
    with pytest.raises(PKIError, match="--ip"):
        authority.issue_pool("pool", ip_addresses=["not-an-ip"])


def test_miner_certificate_names_its_accounts(authority: CertificateAuthority) -> None:
    issuance = authority.issue_miner("rig07", accounts=["alice", "bob", "alice"], days=14)
    identity = identity_of(issuance.certificate)
    assert identity.accounts == ("alice", "bob")
    assert identity.not_valid_after - identity.not_valid_before == timedelta(days=14, minutes=5)
    assert _mode(issuance.bundle_path) == 0o600
    assert issuance.record.accounts == ("alice", "bob")


def test_issuing_an_active_name_again_is_refused(authority: CertificateAuthority) -> None:
    authority.issue_miner("rig07", accounts=["alice"])
    with pytest.raises(PKIError, match="renew rig07"):
        authority.issue_miner("rig07", accounts=["alice"])
    with pytest.raises(PKIError, match="belongs to a miner"):
        authority.issue_pool("rig07", dns_names=["x.example"])
    authority.revoke("rig07")
    authority.issue_miner("rig07", accounts=["bob"])  # allowed once the old one is revoked


def test_leaf_cannot_outlive_the_ca(tmp_path: Path) -> None:
    authority = CertificateAuthority.create(tmp_path / "pki", days=10)
    with pytest.raises(PKIError, match="outlive the CA"):
        authority.issue_miner("rig", accounts=["alice"], days=30)


def test_renew_keeps_name_and_accounts_with_a_new_serial_and_key(authority: CertificateAuthority) -> None:
    first = authority.issue_miner("rig07", accounts=["alice", "bob"], days=14)
    renewed = authority.renew("rig07")
    assert renewed.record.serial != first.record.serial
    assert renewed.record.renews == first.record.serial
    old, new = identity_of(first.certificate), identity_of(renewed.certificate)
    assert (new.name, new.accounts, new.role) == (old.name, old.accounts, old.role)
    assert new.not_valid_after - new.not_valid_before == old.not_valid_after - old.not_valid_before
    assert first.certificate.public_key() != renewed.certificate.public_key()
    statuses = {record.serial: record.is_revoked for record in authority.certificates()}
    assert statuses == {first.record.serial: False, renewed.record.serial: False}  # overlap, no gap


def test_renew_pool_keeps_hosts_and_can_revoke_the_previous(authority: CertificateAuthority) -> None:
    first = authority.issue_pool("pool", dns_names=["pool.example.com"], ip_addresses=["10.0.0.5"])
    renewed = authority.renew("pool", days=90, revoke_previous=True)
    identity = identity_of(renewed.certificate)
    assert identity.dns_names == ("pool.example.com",) and identity.ip_addresses == ("10.0.0.5",)
    assert renewed.record.days == 90
    previous = authority.find(first.record.serial)[0]
    assert previous.is_revoked and previous.revocation_reason == "superseded"
    with pytest.raises(PKIError, match="no certificate named 'ghost' to renew"):
        authority.renew("ghost")


def test_revoke_by_name_revokes_every_certificate_of_that_name(authority: CertificateAuthority) -> None:
    first = authority.issue_miner("rig07", accounts=["alice"])
    second = authority.renew("rig07")
    other = authority.issue_miner("rig08", accounts=["alice"])
    revoked = authority.revoke("rig07", reason="key_compromise")
    assert {record.serial for record in revoked} == {first.record.serial, second.record.serial}
    crl = x509.load_pem_x509_crl(authority.revocations_path.read_bytes())
    listed = {entry.serial_number for entry in crl}
    assert listed == {first.certificate.serial_number, second.certificate.serial_number}
    assert other.certificate.serial_number not in listed
    entry = crl.get_revoked_certificate_by_serial_number(first.certificate.serial_number)
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.key_compromise
    with pytest.raises(PKIError, match="already revoked"):
        authority.revoke("rig07")


def test_revoke_by_serial_and_by_unique_prefix(authority: CertificateAuthority) -> None:
    first = authority.issue_miner("rig07", accounts=["alice"])
    second = authority.renew("rig07")
    authority.revoke(first.record.serial.lower())
    assert [r.is_revoked for r in authority.find("rig07")] == [True, False]
    authority.revoke(second.record.serial[:12])
    assert all(r.is_revoked for r in authority.find("rig07"))
    with pytest.raises(PKIError, match=r"see `stratumrm pki list`"):
        authority.revoke("nobody")
    with pytest.raises(PKIError, match=r"see `stratumrm pki list`"):
        authority.revoke("ABCDEF0123")


def test_each_publication_raises_the_crl_number(authority: CertificateAuthority) -> None:
    def number() -> int:
        crl = x509.load_pem_x509_crl(authority.revocations_path.read_bytes())
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    assert number() == 1
    authority.issue_miner("rig", accounts=["alice"])
    assert number() == 1  # issuing does not touch the list
    authority.revoke("rig")
    assert number() == 2
    authority.publish_revocations(crl_days=7)
    assert number() == 3
    crl = x509.load_pem_x509_crl(authority.revocations_path.read_bytes())
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=7)
    assert authority.crl_days() == 7


def test_index_is_plain_json_and_lists_everything(authority: CertificateAuthority) -> None:
    authority.issue_pool("pool", ip_addresses=["127.0.0.1"])
    authority.issue_miner("rig", accounts=["alice"])
    index = json.loads(authority.index_path.read_text())
    assert [entry["name"] for entry in index["certificates"]] == ["pool", "rig"]
    assert index["certificates"][1]["accounts"] == ["alice"]
    for entry in index["certificates"]:
        assert (authority.directory / entry["certificate_file"]).is_file()


def test_damaged_index_and_exposed_ca_key_are_reported(authority: CertificateAuthority) -> None:
    os.chmod(authority.ca_key_path, 0o644)
    with pytest.raises(PKIError, match="chmod 600"):
        authority.issue_miner("rig", accounts=["alice"])
    os.chmod(authority.ca_key_path, 0o600)
    authority.index_path.write_text("{not json")
    with pytest.raises(PKIError, match="damaged"):
        authority.certificates()


def test_status_of_records(authority: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    expired = authority.issue_miner("old", accounts=["alice"], days=1, now=now - timedelta(days=3)).record
    future = authority.issue_miner("new", accounts=["alice"], days=1, now=now + timedelta(days=3)).record
    assert expired.status(now) == "expired"
    assert future.status(now) == "not yet valid"
    # An expired name can be issued again without renew.
    authority.issue_miner("old", accounts=["alice"])
