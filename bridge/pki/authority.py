"""The private certificate authority kept in a directory (``stratumrm pki --dir DIR``).

Layout of DIR (created by :meth:`CertificateAuthority.create`)::

    DIR/                        mode 0700 when created here
      ca.pem                    CA certificate: give it to every proxy and sidecar
      ca.key                    CA private key, mode 0600 (keep DIR offline if you can)
      revocations.pem           CRL signed by the CA, empty at first; the sidecar watches it
      index.json                every certificate issued: serial, name, role, accounts, ...
      certs/SERIAL.pem          a copy of every certificate issued, by serial (hex)
      pools/NAME.pem            sidecar certificate ...
      pools/NAME.key            ... and its private key, mode 0600
      miners/NAME.bundle.pem    miner bundle (certificate, CA, private key), mode 0600
      .lock                     advisory lock: commands that change DIR run one at a time

``index.json`` is the source of truth for ``list``, ``revoke NAME`` and ``renew NAME``;
``revocations.pem`` is always rebuilt from it, with a CRL number one higher each time.

A name stays attached to one role. While a name has a valid (unexpired, unrevoked)
certificate, issuing it again is refused: ``renew`` makes a new key and certificate
with the same name, accounts and host names and leaves the previous certificate valid
until it expires (rotation without a gap), unless asked to revoke it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bridge.errors import PKIError
from bridge.pki._files import (
    create_public_file,
    create_secret_file,
    exclusive_lock,
    make_private_directory,
    read_bytes,
    replace_public_file,
    replace_secret_file,
)
from bridge.pki.bundle import write_bundle
from bridge.pki.identity import (
    format_serial,
    identity_of,
    key_type_of,
    normalize_accounts,
    parse_serial,
    validate_name,
)
from bridge.pki.issuing import (
    DEFAULT_KEY_TYPE,
    KEY_TYPES,
    KeyType,
    PrivateKey,
    PublicKey,
    RevocationReason,
    RevokedSerial,
    build_ca_certificate,
    build_miner_certificate,
    build_operator_certificate,
    build_pool_certificate,
    build_revocation_list,
    certificate_pem,
    generate_private_key,
    load_private_key_pem,
    private_key_pem,
    validity_period,
)
from bridge.pki.revocation import load_ca_certificate
from bridge.sv1.framing import decode_json

DEFAULT_CA_COMMON_NAME = "StratumRM private CA"
DEFAULT_CA_DAYS = 3650
DEFAULT_POOL_DAYS = 365
DEFAULT_MINER_DAYS = 30
DEFAULT_CRL_DAYS = 30
MIN_SERIAL_PREFIX_DIGITS = 6

DEFAULT_OPERATOR_DAYS = 365

LeafRole = Literal["pool", "miner", "operator"]

CA_CERTIFICATE_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
REVOCATIONS_FILE = "revocations.pem"
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
CERTIFICATES_DIRECTORY = "certs"
POOLS_DIRECTORY = "pools"
MINERS_DIRECTORY = "miners"
OPERATORS_DIRECTORY = "operators"


class IssuedCertificate(msgspec.Struct, frozen=True, kw_only=True):
    """One row of ``index.json``: a certificate this CA issued."""

    serial: str
    """Upper-case hex, as :func:`bridge.pki.identity.format_serial` writes it."""
    name: str
    role: LeafRole
    key_type: KeyType
    accounts: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    days: int
    issued_at: datetime
    not_before: datetime
    not_after: datetime
    certificate_file: str
    """Path of the certificate copy, relative to DIR."""
    renews: str | None = None
    """Serial of the certificate this one renewed, if any."""
    revoked_at: datetime | None = None
    revocation_reason: RevocationReason | None = None

    @property
    def serial_number(self) -> int:
        return int(self.serial, 16)

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, now: datetime) -> bool:
        return now > self.not_after

    def is_active(self, now: datetime) -> bool:
        """Valid right now: not revoked, not expired (notBefore is backdated, so ignored)."""
        return not self.is_revoked and not self.is_expired(now)

    def status(self, now: datetime) -> str:
        """``"revoked"``, ``"expired"``, ``"not yet valid"`` or ``"valid"``."""
        if self.is_revoked:
            return "revoked"
        if self.is_expired(now):
            return "expired"
        if now < self.not_before:
            return "not yet valid"
        return "valid"


class _Index(msgspec.Struct, kw_only=True):
    """The whole of ``index.json``."""

    format: int = 1
    crl_number: int = 0
    crl_days: int = DEFAULT_CRL_DAYS
    certificates: list[IssuedCertificate] = msgspec.field(default_factory=list)


@dataclass(frozen=True)
class Issuance:
    """What an issue or renew produced, and where the files went."""

    record: IssuedCertificate
    certificate: x509.Certificate
    certificate_path: Path
    """Archive copy of the certificate (``certs/SERIAL.pem``)."""
    key_path: Path | None = None
    """Pool private key (``pools/NAME.key``); None for miners, whose key is in the bundle."""
    pool_certificate_path: Path | None = None
    """Pool certificate to pass to ``stratumrm sidecar --cert`` (``pools/NAME.pem``)."""
    bundle_path: Path | None = None
    """Miner bundle (``miners/NAME.bundle.pem``)."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class CertificateAuthority:
    """A CA and everything it issued, stored in one directory.

    Create one with :meth:`create`, open an existing one with :meth:`open`. Methods that
    change DIR take an exclusive lock, re-read ``index.json`` and write it back atomically.
    ``now`` parameters exist so tests can issue certificates that are already expired or
    not yet valid; they default to the current time.
    """

    def __init__(self, directory: Path) -> None:
        """Use :meth:`create` or :meth:`open`."""
        self.directory = directory
        self.ca_certificate_path = directory / CA_CERTIFICATE_FILE
        self.ca_key_path = directory / CA_KEY_FILE
        self.revocations_path = directory / REVOCATIONS_FILE
        self.index_path = directory / INDEX_FILE
        self._lock_path = directory / LOCK_FILE
        self.ca_certificate = load_ca_certificate(self.ca_certificate_path)

    # ---------------------------------------------------------------- creating and opening

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        *,
        key_type: KeyType = DEFAULT_KEY_TYPE,
        common_name: str = DEFAULT_CA_COMMON_NAME,
        days: int = DEFAULT_CA_DAYS,
        crl_days: int = DEFAULT_CRL_DAYS,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """Create a CA key, certificate, empty revocation list and index in ``directory``.

        Refuses (:class:`PKIError`) if any of those files already exists.
        """
        root = Path(directory)
        if key_type not in KEY_TYPES:
            raise PKIError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
        if crl_days <= 0:
            raise PKIError(f"--crl-days must be positive, got {crl_days:g}")
        make_private_directory(root)
        existing = [name for name in (CA_CERTIFICATE_FILE, CA_KEY_FILE, REVOCATIONS_FILE, INDEX_FILE) if (root / name).exists()]
        if existing:
            raise PKIError(
                f"{root} already holds a CA ({', '.join(existing)}); nothing was changed. "
                "Use that CA, or pick another --dir to start a new one"
            )
        issued_at = now or _utc_now()
        with exclusive_lock(root / LOCK_FILE):
            key = generate_private_key(key_type)
            certificate = build_ca_certificate(key, common_name, validity_period(issued_at, days))
            create_secret_file(root / CA_KEY_FILE, private_key_pem(key))
            create_public_file(root / CA_CERTIFICATE_FILE, certificate_pem(certificate))
            index = _Index(crl_days=crl_days)
            _write_revocation_list(root / REVOCATIONS_FILE, certificate, key, index, issued_at, create=True)
            create_public_file(root / INDEX_FILE, _encode_index(index))
        return cls(root)

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """Open the CA in ``directory``; :class:`PKIError` says how to create one if missing."""
        root = Path(directory)
        if not (root / CA_CERTIFICATE_FILE).is_file() or not (root / INDEX_FILE).is_file():
            raise PKIError(
                f"no StratumRM CA in {root} (missing {CA_CERTIFICATE_FILE} or {INDEX_FILE}); "
                f"create one with `stratumrm pki --dir {root} init`, or pass the right --dir"
            )
        return cls(root)

    # ---------------------------------------------------------------- reading

    def certificates(self) -> list[IssuedCertificate]:
        """Every certificate issued, oldest first."""
        return list(self._read_index().certificates)

    def find(self, name_or_serial: str) -> list[IssuedCertificate]:
        """Certificates with this name or else this serial (hex, or a unique prefix of it).

        A name wins over a serial that happens to look the same. Raises :class:`PKIError`
        when nothing matches or a serial prefix is ambiguous.
        """
        return _find(self._read_index(), name_or_serial)

    def latest(self, name: str) -> IssuedCertificate:
        """The most recently issued certificate with this name."""
        matches = [record for record in self._read_index().certificates if record.name == name]
        if not matches:
            raise PKIError(f"no certificate named {name!r} in {self.directory}; see `stratumrm pki list`")
        return max(matches, key=lambda record: record.issued_at)

    def crl_days(self) -> int:
        return self._read_index().crl_days

    # ---------------------------------------------------------------- issuing

    def issue_pool(
        self,
        name: str,
        *,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        days: int = DEFAULT_POOL_DAYS,
        key_type: KeyType = DEFAULT_KEY_TYPE,
        now: datetime | None = None,
    ) -> Issuance:
        """Issue a sidecar certificate; writes ``pools/NAME.pem`` and ``pools/NAME.key``.

        ``dns_names`` and ``ip_addresses`` are the host names and addresses miner-side
        proxies dial; their host name check must match one of them.
        """
        with exclusive_lock(self._lock_path):
            return self._issue(
                role="pool",
                name=name,
                accounts=(),
                dns_names=tuple(dns_names),
                ip_addresses=tuple(ip_addresses),
                days=days,
                key_type=key_type,
                now=now or _utc_now(),
                renews=None,
            )

    def issue_miner(
        self,
        name: str,
        *,
        accounts: Iterable[str],
        days: int = DEFAULT_MINER_DAYS,
        key_type: KeyType = DEFAULT_KEY_TYPE,
        now: datetime | None = None,
    ) -> Issuance:
        """Issue a miner-side certificate for ``accounts``; writes ``miners/NAME.bundle.pem``."""
        normalized = normalize_accounts(accounts)
        with exclusive_lock(self._lock_path):
            return self._issue(
                role="miner",
                name=name,
                accounts=normalized,
                dns_names=(),
                ip_addresses=(),
                days=days,
                key_type=key_type,
                now=now or _utc_now(),
                renews=None,
            )

    def enroll_miner(
        self,
        name: str,
        *,
        accounts: Iterable[str],
        public_key: PublicKey,
        days: int = DEFAULT_MINER_DAYS,
        now: datetime | None = None,
    ) -> Issuance:
        """Issue a miner certificate for a key made elsewhere (an enrollment's CSR); writes no key or bundle."""
        normalized = normalize_accounts(accounts)
        with exclusive_lock(self._lock_path):
            return self._issue(
                role="miner",
                name=name,
                accounts=normalized,
                dns_names=(),
                ip_addresses=(),
                days=days,
                key_type=key_type_of(public_key),
                now=now or _utc_now(),
                renews=None,
                public_key=public_key,
            )

    def issue_operator(
        self,
        name: str,
        *,
        days: int = DEFAULT_OPERATOR_DAYS,
        key_type: KeyType = DEFAULT_KEY_TYPE,
        now: datetime | None = None,
    ) -> Issuance:
        """Issue a person's management-port certificate; writes ``operators/NAME.bundle.pem``."""
        with exclusive_lock(self._lock_path):
            return self._issue(
                role="operator",
                name=name,
                accounts=(),
                dns_names=(),
                ip_addresses=(),
                days=days,
                key_type=key_type,
                now=now or _utc_now(),
                renews=None,
            )

    def renew(
        self,
        name: str,
        *,
        days: int | None = None,
        revoke_previous: bool = False,
        now: datetime | None = None,
    ) -> Issuance:
        """New key and certificate for ``name``: same role, accounts, hosts and key type.

        The lifetime is the previous one unless ``days`` is given. The previous
        certificate stays valid until it expires unless ``revoke_previous`` is True
        (it is then revoked with reason "superseded").
        """
        issued_at = now or _utc_now()
        with exclusive_lock(self._lock_path):
            index = self._read_index()
            previous_records = [record for record in index.certificates if record.name == name]
            if not previous_records:
                raise PKIError(
                    f"no certificate named {name!r} to renew in {self.directory}; "
                    "issue one with `stratumrm pki issue-pool` or `issue-miner`"
                )
            previous = max(previous_records, key=lambda record: record.issued_at)
            issuance = self._issue(
                role=previous.role,
                name=name,
                accounts=previous.accounts,
                dns_names=previous.dns_names,
                ip_addresses=previous.ip_addresses,
                days=previous.days if days is None else days,
                key_type=previous.key_type,
                now=issued_at,
                renews=previous.serial,
                index=index,
            )
            if revoke_previous and not previous.is_revoked:
                self._revoke_records(index, [previous], "superseded", issued_at)
            return issuance

    # ---------------------------------------------------------------- revoking

    def revoke(
        self,
        name_or_serial: str,
        *,
        reason: RevocationReason = "unspecified",
        now: datetime | None = None,
    ) -> list[IssuedCertificate]:
        """Revoke every unrevoked certificate with this name, or the one with this serial.

        Updates ``index.json`` and re-publishes ``revocations.pem``. Returns the records as
        they are after revocation. Raises :class:`PKIError` if nothing is left to revoke.
        """
        revoked_at = now or _utc_now()
        with exclusive_lock(self._lock_path):
            index = self._read_index()
            matches = _find(index, name_or_serial)
            targets = [record for record in matches if not record.is_revoked]
            if not targets:
                serials = ", ".join(record.serial for record in matches)
                raise PKIError(f"{name_or_serial!r} is already revoked (serial {serials}); nothing to do")
            return self._revoke_records(index, targets, reason, revoked_at)

    def publish_revocations(self, *, crl_days: int | None = None, now: datetime | None = None) -> Path:
        """Re-sign ``revocations.pem`` with a fresh nextUpdate (and a new CRL number)."""
        with exclusive_lock(self._lock_path):
            index = self._read_index()
            if crl_days is not None:
                if crl_days <= 0:
                    raise PKIError(f"--crl-days must be positive, got {crl_days:g}")
                index.crl_days = crl_days
            _write_revocation_list(self.revocations_path, self.ca_certificate, self._ca_key(), index, now or _utc_now())
            replace_public_file(self.index_path, _encode_index(index))
        return self.revocations_path

    # ---------------------------------------------------------------- internals

    def _issue(
        self,
        *,
        role: LeafRole,
        name: str,
        accounts: Sequence[str],
        dns_names: Sequence[str],
        ip_addresses: Sequence[str],
        days: int,
        key_type: KeyType,
        now: datetime,
        renews: str | None,
        index: _Index | None = None,
        public_key: PublicKey | None = None,
    ) -> Issuance:
        validate_name(name)
        if key_type not in KEY_TYPES:
            raise PKIError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
        if index is None:
            index = self._read_index()
        same_name = [record for record in index.certificates if record.name == name]
        other_role = next((record for record in same_name if record.role != role), None)
        if other_role is not None:
            raise PKIError(f"the name {name!r} already belongs to a {other_role.role} certificate; choose another name")
        if renews is None:
            active = [record for record in same_name if record.is_active(now)]
            if active:
                raise PKIError(
                    f"{name!r} already has a valid certificate (serial {active[-1].serial}, until "
                    f"{active[-1].not_after:%Y-%m-%d}); use `stratumrm pki renew {name}` for a new one, "
                    f"or `stratumrm pki revoke {name}` first"
                )

        ca_key = self._ca_key()
        key = generate_private_key(key_type) if public_key is None else None
        subject_key = public_key if public_key is not None else key.public_key()
        period = validity_period(now, days)
        if role == "operator":
            certificate = build_operator_certificate(
                ca_certificate=self.ca_certificate,
                ca_key=ca_key,
                public_key=subject_key,
                name=name,
                period=period,
            )
        elif role == "pool":
            certificate = build_pool_certificate(
                ca_certificate=self.ca_certificate,
                ca_key=ca_key,
                public_key=subject_key,
                name=name,
                dns_names=dns_names,
                ip_addresses=ip_addresses,
                period=period,
            )
        else:
            certificate = build_miner_certificate(
                ca_certificate=self.ca_certificate,
                ca_key=ca_key,
                public_key=subject_key,
                name=name,
                accounts=accounts,
                period=period,
            )
        identity = identity_of(certificate)
        serial = identity.serial_hex
        archive_relative = f"{CERTIFICATES_DIRECTORY}/{serial}.pem"
        record = IssuedCertificate(
            serial=serial,
            name=name,
            role=role,
            key_type=key_type,
            accounts=tuple(accounts),
            dns_names=identity.dns_names,
            ip_addresses=identity.ip_addresses,
            days=days,
            issued_at=now,
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            certificate_file=archive_relative,
            renews=renews,
        )

        make_private_directory(self.directory / CERTIFICATES_DIRECTORY)
        archive_path = self.directory / archive_relative
        create_public_file(archive_path, certificate_pem(certificate))
        if key is None:
            issuance = Issuance(record, certificate, archive_path)  # the key stays where it was made
        elif role == "pool":
            make_private_directory(self.directory / POOLS_DIRECTORY)
            key_path = self.directory / POOLS_DIRECTORY / f"{name}.key"
            pool_certificate_path = self.directory / POOLS_DIRECTORY / f"{name}.pem"
            replace_secret_file(key_path, private_key_pem(key))
            replace_public_file(pool_certificate_path, certificate_pem(certificate))
            issuance = Issuance(
                record,
                certificate,
                archive_path,
                key_path=key_path,
                pool_certificate_path=pool_certificate_path,
            )
        else:
            directory = OPERATORS_DIRECTORY if role == "operator" else MINERS_DIRECTORY
            make_private_directory(self.directory / directory)
            bundle_path = write_bundle(
                self.directory / directory / f"{name}.bundle.pem",
                certificate,
                key,
                self.ca_certificate,
                replace=True,
            )
            issuance = Issuance(record, certificate, archive_path, bundle_path=bundle_path)

        index.certificates.append(record)
        replace_public_file(self.index_path, _encode_index(index))
        return issuance

    def _revoke_records(
        self,
        index: _Index,
        targets: Sequence[IssuedCertificate],
        reason: RevocationReason,
        revoked_at: datetime,
    ) -> list[IssuedCertificate]:
        target_serials = {record.serial for record in targets}
        revoked: list[IssuedCertificate] = []
        for position, record in enumerate(index.certificates):
            if record.serial in target_serials:
                updated = msgspec.structs.replace(record, revoked_at=revoked_at, revocation_reason=reason)
                index.certificates[position] = updated
                revoked.append(updated)
        _write_revocation_list(self.revocations_path, self.ca_certificate, self._ca_key(), index, revoked_at)
        replace_public_file(self.index_path, _encode_index(index))
        return revoked

    def _ca_key(self) -> PrivateKey:
        try:
            mode = stat.S_IMODE(os.stat(self.ca_key_path).st_mode)
        except FileNotFoundError:
            raise PKIError(
                f"CA private key not found: {self.ca_key_path}; issuing and revoking need it "
                "(copy it back, or run on the machine that holds the CA)"
            ) from None
        if mode & 0o077:
            raise PKIError(
                f"the CA private key {self.ca_key_path} is readable by others (mode {mode:04o}); "
                f"run `chmod 600 {self.ca_key_path}` and consider the CA compromised if others had access"
            )
        pem = read_bytes(self.ca_key_path, "CA private key", "restore it from backup")
        return load_private_key_pem(pem, str(self.ca_key_path))

    def _read_index(self) -> _Index:
        data = read_bytes(self.index_path, "certificate index", "restore it from backup or start a new CA with `init`")
        try:
            return decode_json(data, type=_Index)
        except msgspec.DecodeError as error:
            raise PKIError(f"{self.index_path} is damaged ({error}); restore it from backup") from None


def _find(index: _Index, name_or_serial: str) -> list[IssuedCertificate]:
    by_name = [record for record in index.certificates if record.name == name_or_serial]
    if by_name:
        return by_name
    serial = parse_serial(name_or_serial)
    if serial is None:
        raise PKIError(f"no certificate named {name_or_serial!r}; see `stratumrm pki list` for names and serials")
    wanted = format_serial(serial)
    exact = [record for record in index.certificates if record.serial == wanted]
    if exact:
        return exact
    digits = name_or_serial.strip().upper().removeprefix("0X").replace(":", "")
    prefixed = [record for record in index.certificates if record.serial.startswith(digits)]
    if len(digits) >= MIN_SERIAL_PREFIX_DIGITS and len(prefixed) == 1:
        return prefixed
    if len(prefixed) > 1:
        raise PKIError(f"serial prefix {name_or_serial!r} matches {len(prefixed)} certificates; give more digits")
    raise PKIError(f"no certificate named {name_or_serial!r} or with that serial; see `stratumrm pki list` for names and serials")


def _encode_index(index: _Index) -> bytes:
    return msgspec.json.format(msgspec.json.encode(index), indent=2) + b"\n"


def _write_revocation_list(
    path: Path,
    ca_certificate: x509.Certificate,
    ca_key: PrivateKey,
    index: _Index,
    now: datetime,
    *,
    create: bool = False,
) -> None:
    """Bump the CRL number in ``index`` and write a CRL of its revoked certificates."""
    index.crl_number += 1
    crl = build_revocation_list(
        ca_certificate=ca_certificate,
        ca_key=ca_key,
        revoked=[
            RevokedSerial(record.serial_number, record.revoked_at, record.revocation_reason or "unspecified")
            for record in index.certificates
            if record.revoked_at is not None
        ],
        crl_number=index.crl_number,
        this_update=now,
        next_update=now + timedelta(days=index.crl_days),
    )
    data = crl.public_bytes(serialization.Encoding.PEM)
    if create:
        create_public_file(path, data)
    else:
        replace_public_file(path, data)
