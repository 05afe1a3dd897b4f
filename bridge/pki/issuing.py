"""Building keys, certificates and revocation lists: pure functions, no files, no clock.

The profile is RFC 5280-clean so that OpenSSL's ``X509_V_FLAG_X509_STRICT`` (Python's
``ssl.VERIFY_X509_STRICT``, default in ``create_default_context()`` from 3.13) accepts it:

=====================  ==================================  ==================================
extension              CA                                  pool / miner leaf
=====================  ==================================  ==================================
basicConstraints       critical, CA, pathLen 0             critical, not a CA
keyUsage               critical, keyCertSign + cRLSign     critical, digitalSignature
extendedKeyUsage       (none)                              serverAuth (pool) / clientAuth (miner)
subjectAltName         (none)                              DNS/IP + pool URN / miner + account URNs
subjectKeyIdentifier   from the public key                 from the public key
authorityKeyId         = its own SKI                       = the CA's SKI
=====================  ==================================  ==================================

notBefore is backdated by :data:`CERTIFICATE_BACKDATE` so a verifier whose clock runs a
little behind the CA's still accepts a fresh certificate. Serials are 159-bit random.
Keys are ECDSA P-256 (the default: widest support, including secure elements) or Ed25519.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from ipaddress import ip_address
from typing import Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.errors import PKIError
from bridge.pki.identity import (
    MINER_URN_PREFIX,
    OPERATOR_URN_PREFIX,
    POOL_URN_PREFIX,
    account_uri,
    normalize_accounts,
    validate_name,
)

KeyType = Literal["p256", "ed25519"]
KEY_TYPES: tuple[KeyType, ...] = get_args(KeyType)
DEFAULT_KEY_TYPE: KeyType = "p256"

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

CERTIFICATE_BACKDATE = timedelta(minutes=5)
"""How far notBefore lies before the moment of issue, to absorb clock skew."""

RevocationReason = Literal["unspecified", "key_compromise", "superseded", "cessation_of_operation", "privilege_withdrawn"]
REVOCATION_REASONS: tuple[RevocationReason, ...] = get_args(RevocationReason)


# --------------------------------------------------------------------------- keys


def generate_private_key(key_type: KeyType) -> PrivateKey:
    """A fresh private key of ``key_type``."""
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise PKIError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: protect the file with mode 0600 (and keep the CA offline)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def load_private_key_pem(pem: bytes, source: str) -> PrivateKey:
    """Load an unencrypted P-256 or Ed25519 private key; ``source`` names it in errors."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise PKIError(f"{source} is encrypted; StratumRM reads unencrypted keys protected by mode 0600") from None
    except ValueError as error:
        raise PKIError(f"{source} does not hold a readable PEM private key ({error})") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise PKIError(f"{source} holds a {type(key).__name__}; StratumRM uses ECDSA P-256 or Ed25519 keys")


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | None:
    # Ed25519 signs the message itself; ECDSA signs a SHA-256 digest.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


# --------------------------------------------------------------------------- validity


@dataclass(frozen=True)
class ValidityPeriod:
    not_before: datetime
    not_after: datetime


def validity_period(issued_at: datetime, days: float, backdate: timedelta = CERTIFICATE_BACKDATE) -> ValidityPeriod:
    """From ``issued_at - backdate`` to ``issued_at + days``; ``issued_at`` must be aware."""
    if issued_at.tzinfo is None:
        raise ValueError("issued_at must be timezone-aware")
    if days <= 0:
        raise PKIError(f"--days must be positive, got {days:g}")
    return ValidityPeriod(issued_at - backdate, issued_at + timedelta(days=days))


# --------------------------------------------------------------------------- certificates


def _common_name(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _subject_key_identifier(certificate: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise PKIError(
            "the CA certificate has no subjectKeyIdentifier, so its leaves would fail strict "
            "verification; create a new CA with `stratumrm pki init`"
        ) from None


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def build_ca_certificate(key: PrivateKey, common_name: str, period: ValidityPeriod) -> x509.Certificate:
    """A self-signed CA that may sign leaves (pathLen 0) and revocation lists."""
    if not common_name.strip():
        raise PKIError("the CA common name cannot be empty; pass --common-name TEXT")
    subject = _common_name(common_name)
    public_key = key.public_key()
    subject_key_identifier = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(period.not_before)
        .not_valid_after(period.not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(subject_key_identifier, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key_identifier),
            critical=False,
        )
    )
    return builder.sign(key, _signature_hash(key))


def _build_leaf(
    *,
    ca_certificate: x509.Certificate,
    ca_key: PrivateKey,
    public_key: PublicKey,
    name: str,
    usage: x509.ObjectIdentifier,
    alternative_names: Sequence[x509.GeneralName],
    period: ValidityPeriod,
) -> x509.Certificate:
    if period.not_after > ca_certificate.not_valid_after_utc:
        raise PKIError(
            f"the certificate would outlive the CA (CA valid until "
            f"{ca_certificate.not_valid_after_utc:%Y-%m-%d}); pass a smaller --days"
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_common_name(name))
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(period.not_before)
        .not_valid_after(period.not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_subject_key_identifier(ca_certificate)),
            critical=False,
        )
    )
    return builder.sign(ca_key, _signature_hash(ca_key))


def validate_dns_name(host: str) -> str:
    """Check a DNS name for a pool certificate (ASCII, no spaces; ``*.`` wildcard allowed)."""
    if not host or len(host) > 253 or not host.isascii() or any(c.isspace() or c in "/:@" for c in host):
        raise PKIError(f"invalid DNS name {host!r}; pass a host name such as pool.example.com")
    return host.lower().rstrip(".")


def build_pool_certificate(
    *,
    ca_certificate: x509.Certificate,
    ca_key: PrivateKey,
    public_key: PublicKey,
    name: str,
    dns_names: Iterable[str],
    ip_addresses: Iterable[str],
    period: ValidityPeriod,
) -> x509.Certificate:
    """A sidecar (TLS server) certificate for the given host names and addresses."""
    dns = [validate_dns_name(host) for host in dns_names]
    try:
        ips = [ip_address(address) for address in ip_addresses]
    except ValueError as error:
        raise PKIError(f"{error}; pass --ip with an IPv4 or IPv6 address") from None
    if not dns and not ips:
        raise PKIError(
            "a pool certificate needs at least one --dns NAME or --ip ADDRESS: the miner-side "
            "proxy checks the host it dials against them"
        )
    alternative_names: list[x509.GeneralName] = [x509.DNSName(host) for host in dict.fromkeys(dns)]
    alternative_names += [x509.IPAddress(address) for address in dict.fromkeys(ips)]
    alternative_names.append(x509.UniformResourceIdentifier(POOL_URN_PREFIX + validate_name(name)))
    return _build_leaf(
        ca_certificate=ca_certificate,
        ca_key=ca_key,
        public_key=public_key,
        name=name,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        alternative_names=alternative_names,
        period=period,
    )


def build_miner_certificate(
    *,
    ca_certificate: x509.Certificate,
    ca_key: PrivateKey,
    public_key: PublicKey,
    name: str,
    accounts: Iterable[str],
    period: ValidityPeriod,
) -> x509.Certificate:
    """A miner-side proxy (TLS client) certificate naming the accounts it may authorize."""
    alternative_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(MINER_URN_PREFIX + validate_name(name))]
    alternative_names += [x509.UniformResourceIdentifier(account_uri(a)) for a in normalize_accounts(accounts)]
    return _build_leaf(
        ca_certificate=ca_certificate,
        ca_key=ca_key,
        public_key=public_key,
        name=name,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        alternative_names=alternative_names,
        period=period,
    )


def build_operator_certificate(
    *,
    ca_certificate: x509.Certificate,
    ca_key: PrivateKey,
    public_key: PublicKey,
    name: str,
    period: ValidityPeriod,
) -> x509.Certificate:
    """A person's client certificate for the management ports (``--http-require-operator``); it cannot mine."""
    return _build_leaf(
        ca_certificate=ca_certificate,
        ca_key=ca_key,
        public_key=public_key,
        name=name,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        alternative_names=[x509.UniformResourceIdentifier(OPERATOR_URN_PREFIX + validate_name(name))],
        period=period,
    )


# --------------------------------------------------------------------------- revocation list


@dataclass(frozen=True)
class RevokedSerial:
    serial: int
    revoked_at: datetime
    reason: RevocationReason = "unspecified"


def build_revocation_list(
    *,
    ca_certificate: x509.Certificate,
    ca_key: PrivateKey,
    revoked: Iterable[RevokedSerial],
    crl_number: int,
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    """A CRL (RFC 5280 §5: with CRL number and authority key identifier) signed by the CA."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_certificate.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_subject_key_identifier(ca_certificate)),
            critical=False,
        )
    )
    for entry in revoked:
        revoked_builder = x509.RevokedCertificateBuilder().serial_number(entry.serial).revocation_date(entry.revoked_at)
        if entry.reason != "unspecified":  # RFC 5280 §5.3.1: leave "unspecified" out
            revoked_builder = revoked_builder.add_extension(x509.CRLReason(x509.ReasonFlags[entry.reason]), critical=False)
        builder = builder.add_revoked_certificate(revoked_builder.build())
    return builder.sign(ca_key, _signature_hash(ca_key))
