"""Account encoding, identity parsing and validity with leeway."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from bridge.errors import PKIError
from bridge.pki.identity import (
    ACCOUNT_URN_PREFIX,
    Validity,
    account_from_uri,
    account_of_username,
    account_uri,
    check_validity,
    identity_from_der,
    identity_from_pem,
    parse_serial,
    validate_name,
)
from bridge.pki.issuing import generate_private_key, validity_period
from bridge.testing.pki import TestPKI

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _der(issuance_certificate: x509.Certificate) -> bytes:
    return issuance_certificate.public_bytes(serialization.Encoding.DER)


def test_accounts_round_trip_through_the_certificate_der(test_pki: TestPKI) -> None:
    issuance = test_pki.authority.issue_miner("farm-gw", accounts=["alice", "bc1qexample", "Ünïcode", "a%b/c:d"])
    identity = identity_from_der(_der(issuance.certificate))
    assert identity.role == "miner"
    assert identity.name == "farm-gw"
    assert identity.serial == issuance.certificate.serial_number
    assert identity.accounts == ("alice", "bc1qexample", "Ünïcode", "a%b/c:d")


def test_accounts_are_san_uris(test_pki: TestPKI) -> None:
    issuance = test_pki.authority.issue_miner("rig", accounts=["alice", "a%"])
    san = issuance.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["urn:stratumrm:miner:rig", "urn:stratumrm:account:alice", "urn:stratumrm:account:a%25"]


def test_account_uri_encoding_is_reversible() -> None:
    for account in ["alice", "x~y_z-1", "Ünïcode", "100%", "a/b?c#d"]:
        uri = account_uri(account)
        assert uri.startswith(ACCOUNT_URN_PREFIX) and uri.isascii()
        assert account_from_uri(uri) == account
    assert account_from_uri("urn:stratumrm:miner:rig") is None
    assert account_from_uri("https://example.com") is None


@pytest.mark.parametrize(
    ("account", "message"),
    [
        ("", "empty"),
        ("alice.rig1", "pass --account 'alice'"),
        ("al ice", "spaces"),
        ("tab\there", "spaces"),
        ("x" * 300, "longer"),
    ],
)
def test_bad_accounts_are_refused_with_advice(account: str, message: str) -> None:
    with pytest.raises(PKIError, match=message):
        account_uri(account)


def test_may_authorize_uses_the_user_part_of_user_worker(test_pki: TestPKI) -> None:
    identity = identity_from_pem(test_pki.miner_bundle.read_bytes())
    assert identity.may_authorize("alice")
    assert identity.may_authorize("alice.rig07")
    assert identity.may_authorize("bob.a.b")
    assert not identity.may_authorize("mallory.rig07")
    assert not identity.may_authorize("Alice.rig07")  # exact, as pools compare
    assert not identity.may_authorize(".alice")
    assert account_of_username("alice.rig.7") == "alice"


def test_pool_and_ca_identities(test_pki: TestPKI) -> None:
    pool = identity_from_pem(test_pki.pool_certificate.read_bytes())
    assert (pool.role, pool.name, pool.accounts) == ("pool", "test-pool", ())
    assert pool.dns_names == ("localhost",) and pool.ip_addresses == ("127.0.0.1",)
    assert not pool.may_authorize("alice")
    ca = identity_from_pem(test_pki.ca_certificate.read_bytes())
    assert ca.role == "ca"


def _self_signed(alternative_names: list[x509.GeneralName], usage: x509.ObjectIdentifier) -> bytes:
    key = generate_private_key("p256")
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "stranger")])
    period = validity_period(NOW, 1)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(period.not_before)
        .not_valid_after(period.not_after)
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _der(certificate)


def test_foreign_certificates_are_not_mistaken_for_ours() -> None:
    client_auth = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
    server_auth = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
    account_only = [x509.UniformResourceIdentifier("urn:stratumrm:account:alice")]
    with pytest.raises(PKIError, match=r"not issued by `stratumrm pki`"):
        identity_from_der(_self_signed(account_only, client_auth))
    miner = [x509.UniformResourceIdentifier("urn:stratumrm:miner:rig"), *account_only]
    with pytest.raises(PKIError, match="lacks the clientAuth"):
        identity_from_der(_self_signed(miner, server_auth))
    assert identity_from_der(_self_signed(miner, client_auth)).accounts == ("alice",)
    with pytest.raises(PKIError, match=r"no subjectAltName|exactly one"):
        identity_from_der(_self_signed([x509.DNSName("example.com")], server_auth))
    with pytest.raises(PKIError, match="not valid DER"):
        identity_from_der(b"garbage")


def test_validity_with_leeway(test_pki: TestPKI) -> None:
    identity = identity_from_pem(test_pki.miner_bundle.read_bytes())
    leeway = timedelta(seconds=30)
    start, end = identity.not_valid_before, identity.not_valid_after
    assert identity.validity_at(start, leeway) is Validity.VALID
    assert identity.validity_at(start - timedelta(seconds=29), leeway) is Validity.VALID
    assert identity.validity_at(start - timedelta(seconds=31), leeway) is Validity.NOT_YET_VALID
    assert identity.validity_at(end + timedelta(seconds=29), leeway) is Validity.VALID
    assert identity.validity_at(end + timedelta(seconds=31), leeway) is Validity.EXPIRED
    assert identity.validity_at(end + timedelta(seconds=1), timedelta(0)) is Validity.EXPIRED
    with pytest.raises(ValueError):
        identity.validity_at(datetime(2030, 1, 1), leeway)


def test_backdated_and_future_certificates_are_detected(test_pki: TestPKI) -> None:
    now = datetime.now(UTC)
    expired = test_pki.authority.issue_miner("expired-rig", accounts=["alice"], days=1, now=now - timedelta(days=2))
    future = test_pki.authority.issue_miner("future-rig", accounts=["alice"], days=5, now=now + timedelta(hours=1))
    leeway = timedelta(seconds=10)
    with pytest.raises(PKIError, match=r"expired at .*renew expired-rig"):
        check_validity(identity_from_der(_der(expired.certificate)), now=now, leeway=leeway)
    with pytest.raises(PKIError, match=r"not valid before .*NTP"):
        check_validity(identity_from_der(_der(future.certificate)), now=now, leeway=leeway)
    # notBefore is backdated 5 minutes: a leeway of an hour accepts the future one.
    check_validity(identity_from_der(_der(future.certificate)), now=now, leeway=timedelta(minutes=56))


def test_names_and_serials() -> None:
    assert validate_name("rig07") == "rig07"
    for bad in ["", "-rig", "rig 07", "../etc", "r" * 65, "rig/07"]:
        with pytest.raises(PKIError, match="invalid certificate name"):
            validate_name(bad)
    assert parse_serial("0x1A2b") == 0x1A2B
    assert parse_serial("1a:2b") == 0x1A2B
    assert parse_serial("rig07") is None
    assert parse_serial("") is None


def test_naive_issue_time_is_refused() -> None:
    with pytest.raises(ValueError):
        validity_period(datetime(2030, 1, 1), 1)
