"""What a StratumRM certificate says about its holder, and how that is encoded.

Identity encoding
=================

Every leaf certificate carries its identity in the subjectAltName extension as URNs:

- ``urn:stratumrm:miner:NAME`` or ``urn:stratumrm:pool:NAME``: the certificate's name and
  role (the subject CN repeats the name for people and legacy tools only);
- ``urn:stratumrm:account:ACCOUNT``, once per account a miner-side certificate may
  authorize. ACCOUNT is percent-encoded UTF-8 (RFC 3986 unreserved characters stay as
  they are), so any account name round-trips exactly.

Why SAN URIs and not a custom extension under a private OID:

- subjectAltName is the place RFC 5280 gives to identities of the subject; the URI form
  is standard, so ``openssl x509 -text``, browsers' viewers and Python's own
  ``SSLSocket.getpeercert()`` show the accounts without knowing anything about StratumRM;
- a private extension needs an OID arc we control (an IANA enterprise number or a
  ``2.25.<uuid>`` arc) plus a DER schema of our own; marked critical, it makes OpenSSL
  and every other verifier that does not know it reject the certificate, and marked
  non-critical it is invisible to every tool but ours;
- the encoding stays one line per account and is trivial to audit.

An *account* is the ``user`` part before the first ``.`` of a Stratum V1 worker name
``user.worker`` (see :func:`account_of_username`), so an account never contains ``.``.
Accounts are compared exactly (case-sensitive): folding case would let a certificate for
``Alice`` authorize ``alice`` on a pool that tells the two apart.

Validity
========

:meth:`CertificateIdentity.validity_at` and :func:`check_validity` judge notBefore and
notAfter against a time the caller passes in, with a clock-skew leeway. Nothing here reads
the clock.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.errors import PKIError

Role = Literal["ca", "pool", "miner", "operator"]
"""What a certificate is for: the private CA, a pool-side sidecar, a miner-side proxy, or a
person logging in to a management port (never accepted for mining)."""

URN_PREFIX = "urn:stratumrm:"
ACCOUNT_URN_PREFIX = URN_PREFIX + "account:"
MINER_URN_PREFIX = URN_PREFIX + "miner:"
POOL_URN_PREFIX = URN_PREFIX + "pool:"
OPERATOR_URN_PREFIX = URN_PREFIX + "operator:"

DEFAULT_CLOCK_SKEW_LEEWAY = timedelta(seconds=10)
"""Leeway for notBefore/notAfter when the caller does not configure one (SV2 also uses 10 s)."""

MAX_ACCOUNT_LENGTH = 256
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SERIAL_PATTERN = re.compile(r"(?:0x)?([0-9a-f:]+)", re.IGNORECASE)


class CertificateRefused(PKIError):
    """A certificate that may not be used now; :attr:`kind` says why, in a word or two.

    The kinds (``"expired"``, ``"not yet valid"``, ``"revoked"``, ``"not a miner
    certificate"``, ``"CA not valid"``) are what the sidecar counts refusals by.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------- names


def validate_name(name: str) -> str:
    """Check a certificate name (``rig07``, ``pool-eu1``) and return it.

    Names become file names in the PKI directory, so they are 1 to 64 characters from
    letters, digits, ``_``, ``.`` and ``-``, starting with a letter or digit.
    """
    if not _NAME_PATTERN.fullmatch(name):
        raise PKIError(
            f"invalid certificate name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit (for example rig07 or pool-eu1)"
        )
    return name


def validate_account(account: str) -> str:
    """Check an account name as it may appear before the ``.`` of ``user.worker``."""
    if not account:
        raise PKIError("an account name cannot be empty; pass --account NAME")
    if "." in account:
        user = account.split(".", 1)[0]
        raise PKIError(
            f"account {account!r} contains '.': an account is the user part before the first "
            f"'.' of user.worker, so pass --account {user!r} to allow all of its workers"
        )
    if len(account) > MAX_ACCOUNT_LENGTH:
        raise PKIError(f"account name longer than {MAX_ACCOUNT_LENGTH} characters: {account[:40]!r}...")
    if not account.isprintable() or any(character.isspace() for character in account):
        raise PKIError(f"account {account!r} contains spaces or control characters; pools refuse those")
    return account


def normalize_accounts(accounts: Iterable[str]) -> tuple[str, ...]:
    """Validate accounts and drop duplicates, keeping the order given."""
    unique: dict[str, None] = {}
    for account in accounts:
        unique[validate_account(account)] = None
    if not unique:
        raise PKIError("a miner certificate needs at least one account; pass --account NAME")
    return tuple(unique)


def account_of_username(username: str) -> str:
    """The account part of a Stratum V1 username: ``"acct.rig07"`` → ``"acct"``."""
    return username.split(".", 1)[0]


def account_uri(account: str) -> str:
    """The SAN URI naming ``account``: ``urn:stratumrm:account:<percent-encoded>``."""
    return ACCOUNT_URN_PREFIX + quote(validate_account(account), safe="")


def account_from_uri(uri: str) -> str | None:
    """The account named by a SAN URI, or None when the URI is not an account URN."""
    if not uri.startswith(ACCOUNT_URN_PREFIX):
        return None
    try:
        account = unquote(uri[len(ACCOUNT_URN_PREFIX) :], errors="strict")
    except UnicodeDecodeError:
        raise PKIError(f"certificate names an account that is not UTF-8: {uri!r}") from None
    return validate_account(account)


# --------------------------------------------------------------------------- serials


def format_serial(serial: int) -> str:
    """Serial numbers are shown as upper-case hex, as ``openssl x509 -serial`` does."""
    return f"{serial:X}"


def parse_serial(text: str) -> int | None:
    """Parse a hex serial (``0x`` prefix and ``:`` separators allowed); None if not hex."""
    match = _SERIAL_PATTERN.fullmatch(text.strip())
    if not match:
        return None
    digits = match.group(1).replace(":", "")
    if not digits:
        return None
    return int(digits, 16)


# --------------------------------------------------------------------------- identity


class Validity(enum.Enum):
    """Where a moment falls relative to a certificate's validity period (leeway applied)."""

    VALID = "valid"
    NOT_YET_VALID = "not yet valid"
    EXPIRED = "expired"


@dataclass(frozen=True)
class CertificateIdentity:
    """The StratumRM view of one certificate: who it is, what it may do, when it is valid."""

    role: Role
    name: str
    serial: int
    accounts: tuple[str, ...]
    """Accounts a miner certificate may authorize (empty for pool and CA certificates)."""
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_valid_before: datetime
    not_valid_after: datetime
    key_type: str
    sha256_fingerprint: bytes
    """SHA-256 of the DER certificate; a stable key for deny-lists and logs."""

    @property
    def serial_hex(self) -> str:
        return format_serial(self.serial)

    def may_authorize(self, username: str) -> bool:
        """Whether ``mining.authorize`` for ``username`` (``user.worker``) is allowed."""
        return self.role == "miner" and account_of_username(username) in self.accounts

    def validity_at(self, now: datetime, leeway: timedelta = DEFAULT_CLOCK_SKEW_LEEWAY) -> Validity:
        """Judge ``now`` (timezone-aware) against notBefore/notAfter, ``leeway`` either side."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware (for example datetime.now(timezone.utc))")
        if now + leeway < self.not_valid_before:
            return Validity.NOT_YET_VALID
        if now - leeway > self.not_valid_after:
            return Validity.EXPIRED
        return Validity.VALID

    def describe(self) -> str:
        """``miner certificate 'rig07' (serial 1A2B...)``, for messages."""
        return f"{self.role} certificate {self.name!r} (serial {self.serial_hex})"


def key_type_of(public_key: object) -> str:
    """``"ed25519"``, ``"p256"`` or a descriptive name for other key types."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "p256" if isinstance(public_key.curve, ec.SECP256R1) else f"ec-{public_key.curve.name}"
    return type(public_key).__name__


def _extension_value(certificate: x509.Certificate, extension_type: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return certificate.extensions.get_extension_for_class(extension_type).value
    except x509.ExtensionNotFound:
        return None


def identity_of(certificate: x509.Certificate) -> CertificateIdentity:
    """Read the StratumRM identity from a parsed certificate.

    The role comes from the SAN URN (``urn:stratumrm:miner:`` or ``:pool:``) and must agree
    with the extended key usage (clientAuth for miners, serverAuth for pools); a CA is
    recognised by ``BasicConstraints(ca=True)``. Anything else raises :class:`PKIError`.
    """
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(common_names[0].value) if common_names else ""
    basic_constraints = _extension_value(certificate, x509.BasicConstraints)
    if isinstance(basic_constraints, x509.BasicConstraints) and basic_constraints.ca:
        role: Role = "ca"
        name = common_name
        accounts: tuple[str, ...] = ()
        dns_names: tuple[str, ...] = ()
        ip_addresses: tuple[str, ...] = ()
    else:
        role, name, accounts, dns_names, ip_addresses = _leaf_identity(certificate, common_name)
    return CertificateIdentity(
        role=role,
        name=name,
        serial=certificate.serial_number,
        accounts=accounts,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        not_valid_before=certificate.not_valid_before_utc,
        not_valid_after=certificate.not_valid_after_utc,
        key_type=key_type_of(certificate.public_key()),
        sha256_fingerprint=certificate.fingerprint(hashes.SHA256()),
    )


def _leaf_identity(
    certificate: x509.Certificate, common_name: str
) -> tuple[Role, str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(role, name, accounts, DNS names, IP addresses) of a pool or miner certificate."""
    serial = format_serial(certificate.serial_number)
    san = _extension_value(certificate, x509.SubjectAlternativeName)
    if not isinstance(san, x509.SubjectAlternativeName):
        raise PKIError(
            f"certificate {common_name!r} (serial {serial}) has no subjectAltName, so it is not a "
            "StratumRM certificate; issue one with `stratumrm pki`"
        )
    roles: list[tuple[Role, str]] = []
    accounts: list[str] = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(MINER_URN_PREFIX):
            roles.append(("miner", uri[len(MINER_URN_PREFIX) :]))
        elif uri.startswith(POOL_URN_PREFIX):
            roles.append(("pool", uri[len(POOL_URN_PREFIX) :]))
        elif uri.startswith(OPERATOR_URN_PREFIX):
            roles.append(("operator", uri[len(OPERATOR_URN_PREFIX) :]))
        else:
            account = account_from_uri(uri)
            if account is not None:
                accounts.append(account)
    if len(roles) != 1:
        raise PKIError(
            f"certificate {common_name!r} (serial {serial}) does not carry exactly one "
            f"{MINER_URN_PREFIX}NAME or {POOL_URN_PREFIX}NAME URI; it was not issued by `stratumrm pki`"
        )
    role, name = roles[0]
    usages = _extension_value(certificate, x509.ExtendedKeyUsage)
    expected_usage, usage_name = (
        (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")
        if role in ("miner", "operator")
        else (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth")
    )
    if not isinstance(usages, x509.ExtendedKeyUsage) or expected_usage not in usages:
        raise PKIError(f"{role} certificate {name!r} lacks the {usage_name} extended key usage; re-issue it with `stratumrm pki`")
    if role != "miner" and accounts:
        raise PKIError(f"{role} certificate {name!r} names accounts; only miner certificates may")
    return (
        role,
        name,
        tuple(dict.fromkeys(accounts)),
        tuple(san.get_values_for_type(x509.DNSName)),
        tuple(str(address) for address in san.get_values_for_type(x509.IPAddress)),
    )


def identity_from_der(der: bytes) -> CertificateIdentity:
    """Parse DER (as from ``getpeercert(binary_form=True)``) and read its identity."""
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError as error:
        raise PKIError(f"peer certificate is not valid DER X.509: {error}") from None
    return identity_of(certificate)


def identity_from_pem(pem: bytes) -> CertificateIdentity:
    """Parse the first PEM certificate in ``pem`` and read its identity."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        raise PKIError(f"not a PEM certificate: {error}") from None
    return identity_of(certificate)


def check_validity(
    identity: CertificateIdentity,
    *,
    now: datetime,
    leeway: timedelta = DEFAULT_CLOCK_SKEW_LEEWAY,
) -> None:
    """Raise :class:`CertificateRefused` unless ``now`` is inside the validity period ± ``leeway``."""
    validity = identity.validity_at(now, leeway)
    if validity is Validity.NOT_YET_VALID:
        raise CertificateRefused(
            "not yet valid",
            f"{identity.describe()} is not valid before {identity.not_valid_before.isoformat()} "
            f"(now {now.isoformat()}, leeway {leeway.total_seconds():g} s); "
            "check the clocks (NTP) of the CA host and of this host",
        )
    if validity is Validity.EXPIRED:
        raise CertificateRefused(
            "expired",
            f"{identity.describe()} expired at {identity.not_valid_after.isoformat()} "
            f"(now {now.isoformat()}, leeway {leeway.total_seconds():g} s); "
            f"issue a new one with `stratumrm pki renew {identity.name}`",
        )


def split_hosts(hosts: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sort hosts into (DNS names, IP addresses): whatever parses as an IP is an address."""
    dns_names: list[str] = []
    ip_addresses: list[str] = []
    for host in hosts:
        try:
            ip_addresses.append(str(ipaddress.ip_address(host)))
        except ValueError:
            dns_names.append(host)
    return tuple(dns_names), tuple(ip_addresses)


def public_key_fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the SubjectPublicKeyInfo, hex (the value SPKI pins use)."""
    spki = certificate.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()
