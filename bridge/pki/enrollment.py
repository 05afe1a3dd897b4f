"""Certificate enrollment with one-time tokens: the rig makes its key, the CA signs its CSR.

The pool operator creates a token for a farm (``stratumrm pki token NAME --account
ACCOUNT --ttl 1h``) and hands it over with the CA's fingerprint. On the farm,
``stratumrm proxy enroll https://SIDECAR:PORT --token T --fingerprint FP`` makes a
private key, sends a certificate signing request over HTTPS (the server verified
against the CA whose fingerprint was given) and stores the bundle it gets back. The
private key never leaves the farm.

:class:`EnrollmentStore` keeps tokens and the audit trail in SQLite (by default
``enrollment.sqlite`` in the CA directory):

- a token is 256 random bits; only its SHA-256 is stored, so a copy of the database
  does not let anyone enroll;
- single use: redeeming marks it used in the same transaction that checks it;
- it expires (``--ttl``);
- every event is audited: who created which token, and every redemption attempt
  (enrolled, or refused and why) with the address it came from and the serial issued.

:class:`EnrollmentService` is the HTTP side, independent of any server: ``ca()`` for
``GET /api/v1/enroll/ca`` and ``enroll(body, client)`` for ``POST /api/v1/enroll``,
each returning ``(status, content type, body)`` for the management port to send.
"""

from __future__ import annotations

import getpass
import hashlib
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bridge.errors import PKIError
from bridge.pki.authority import CertificateAuthority
from bridge.pki.identity import (
    format_serial,
    key_type_of,
    normalize_accounts,
    validate_name,
)
from bridge.pki.issuing import KEY_TYPES, certificate_pem
from bridge.sv1.framing import decode_json

__all__ = [
    "DATABASE_FILE",
    "ENROLL_CA_PATH",
    "ENROLL_PATH",
    "TOKENS_PATH",
    "AuditEntry",
    "EnrollRequest",
    "EnrollResponse",
    "EnrollmentRefused",
    "EnrollmentService",
    "EnrollmentStore",
    "TokenCreated",
    "TokenRequest",
    "ca_fingerprint",
    "parse_ttl",
]

DATABASE_FILE = "enrollment.sqlite"
ENROLL_PATH = "/api/v1/enroll"
ENROLL_CA_PATH = "/api/v1/enroll/ca"
TOKENS_PATH = "/api/v1/enroll/tokens"
TOKEN_PREFIX = "srm1_"
MAX_TTL = timedelta(days=30)
MAX_CSR_BYTES = 8192
_TTL = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class EnrollmentRefused(PKIError):
    """A redemption the store refused; ``reason`` is what the audit trail and the client see."""

    def __init__(self, reason: str, status: int = 403) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime
    event: str
    """``token created``, ``enrolled`` or ``refused``."""
    name: str | None
    detail: str
    actor: str | None
    """Who did it: the operator's user name for tokens, the client's address for enrollments."""


class EnrollRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/v1/enroll``."""

    token: str
    csr: str
    """PEM certificate signing request; its subject and extensions are ignored."""


class EnrollResponse(msgspec.Struct, frozen=True, kw_only=True):
    certificate: str
    ca: str
    name: str
    accounts: list[str]
    serial: str
    not_after: datetime


class TokenRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/v1/enroll/tokens`` (the dashboard's form): what ``stratumrm pki token`` takes."""

    name: str
    accounts: list[str]
    ttl: str = "1h"


class TokenCreated(msgspec.Struct, frozen=True, kw_only=True):
    token: str
    """Shown once; only its hash is stored."""
    name: str
    accounts: list[str]
    expires: datetime
    fingerprint: str
    """The CA's, for ``stratumrm proxy enroll --fingerprint``."""


def parse_ttl(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``2d`` or seconds; at most :data:`MAX_TTL`."""
    match = _TTL.fullmatch(text.strip().lower())
    if match is None:
        raise PKIError(f"--ttl {text!r}: write a duration such as 30m, 1h or 2d")
    ttl = timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    if not timedelta(0) < ttl <= MAX_TTL:
        raise PKIError(f"--ttl {text!r}: between 1 s and {MAX_TTL.days} days")
    return ttl


def ca_fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER certificate as ``AB:CD:...`` (what ``openssl x509 -fingerprint -sha256`` prints)."""
    digest = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def normalize_fingerprint(text: str) -> str:
    """Accept ``AB:CD``, ``abcd``, ``sha256:ABCD...``; return the colon form (ValueError if not 32 bytes)."""
    hexdigits = re.sub(r"[^0-9a-fA-F]", "", text.strip().removeprefix("sha256:").removeprefix("SHA256:")).upper()
    if len(hexdigits) != 64:
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits)")
    return ":".join(hexdigits[i : i + 2] for i in range(0, 64, 2))


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


#: How long a process waits for another one holding the database (several sidecars may share a CA directory).
_BUSY_SECONDS = 10.0


def _enable_wal(db: sqlite3.Connection) -> None:
    """Switch ``db`` to write-ahead logging. Two processes opening a new database at once
    race for the switch, and SQLite answers the loser "database is locked" at once (the busy
    timeout does not cover it), so the switch is tried again until ``_BUSY_SECONDS``."""
    give_up = time.monotonic() + _BUSY_SECONDS
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > give_up:
                raise
            time.sleep(0.02)


class EnrollmentStore:
    """Tokens (hashed) and the audit trail, in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # One connection, used from whichever thread the server runs the handler in (one at a time).
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=_BUSY_SECONDS, check_same_thread=False)
        _enable_wal(self._db)
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS tokens (
                hash TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                accounts TEXT NOT NULL,
                created_at TEXT NOT NULL,
                created_by TEXT,
                expires_at TEXT NOT NULL,
                used_at TEXT,
                used_from TEXT,
                serial TEXT
            );
            CREATE TABLE IF NOT EXISTS audit (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                at TEXT NOT NULL,
                event TEXT NOT NULL,
                name TEXT,
                detail TEXT NOT NULL,
                actor TEXT
            );
            """
        )
        try:
            self.path.chmod(0o600)
        except OSError:
            pass

    def close(self) -> None:
        self._db.close()

    def create(
        self,
        name: str,
        accounts: Iterable[str],
        ttl: timedelta,
        *,
        now: datetime | None = None,
        actor: str | None = None,
    ) -> tuple[str, datetime]:
        """A new token for certificate ``name`` covering ``accounts``: (the token, its expiry). Shown once."""
        validate_name(name)
        normalized = normalize_accounts(accounts)
        if not normalized:
            raise PKIError("a proxy certificate needs at least one --account (the user part of worker names)")
        now = now or datetime.now(UTC)
        actor = actor or _whoami()
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires = now + ttl
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO tokens (hash, name, accounts, created_at, created_by, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (_hash(token), name, msgspec.json.encode(list(normalized)).decode(), now.isoformat(), actor, expires.isoformat()),
            )
            self._audit(
                now, "token created", name, f"accounts {', '.join(normalized)}; expires {expires:%Y-%m-%d %H:%M} UTC", actor
            )
        return token, expires

    def redeem(self, token: str, *, client: str, now: datetime | None = None) -> tuple[str, tuple[str, ...], str]:
        """Check and use a token at once: (name, accounts, token hash); EnrollmentRefused (audited) otherwise."""
        now = now or datetime.now(UTC)
        digest = _hash(token)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT name, accounts, expires_at, used_at, used_from FROM tokens WHERE hash = ?", (digest,)
            ).fetchone()
            if row is None:
                reason = "unknown enrollment token (mistyped, or not from this CA)"
            elif row[3] is not None:
                reason = f"enrollment token for {row[0]!r} already used ({row[3][:16]} UTC from {row[4]}); ask for a new one"
            elif datetime.fromisoformat(row[2]) <= now:
                reason = f"enrollment token for {row[0]!r} expired at {row[2][:16]} UTC; ask for a new one"
            else:
                self._db.execute("UPDATE tokens SET used_at = ?, used_from = ? WHERE hash = ?", (now.isoformat(), client, digest))
                return row[0], tuple(decode_json(row[1])), digest
            self._audit(now, "refused", row[0] if row else None, reason, client)
        raise EnrollmentRefused(reason)

    def completed(
        self, digest: str, name: str, serial: str, accounts: tuple[str, ...], client: str, now: datetime | None = None
    ) -> None:
        now = now or datetime.now(UTC)
        with self._db:
            self._db.execute("UPDATE tokens SET serial = ? WHERE hash = ?", (serial, digest))
            self._audit(now, "enrolled", name, f"serial {serial}, accounts {', '.join(accounts)}", client)

    def refused(self, name: str | None, reason: str, client: str, now: datetime | None = None) -> None:
        with self._db:
            self._audit(now or datetime.now(UTC), "refused", name, reason, client)

    def audit(self) -> list[AuditEntry]:
        rows = self._db.execute("SELECT at, event, name, detail, actor FROM audit ORDER BY id").fetchall()
        return [AuditEntry(at=datetime.fromisoformat(r[0]), event=r[1], name=r[2], detail=r[3], actor=r[4]) for r in rows]

    def _audit(self, now: datetime, event: str, name: str | None, detail: str, actor: str | None) -> None:
        self._db.execute(
            "INSERT INTO audit (at, event, name, detail, actor) VALUES (?, ?, ?, ?, ?)",
            (now.isoformat(), event, name, detail, actor),
        )


def _whoami() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class EnrollmentService:
    """The enrollment endpoints, for a management port to mount (no HTTP of its own).

    ``authority`` signs; ``store`` holds the tokens. The responses are
    ``(status, content type, body)``.
    """

    def __init__(self, authority: CertificateAuthority, store: EnrollmentStore) -> None:
        self.authority = authority
        self.store = store
        self._lock = threading.Lock()

    def ca(self) -> tuple[int, str, bytes]:
        """``GET /api/v1/enroll/ca``: the CA certificate (PEM), which the client checks against its fingerprint."""
        return 200, "application/x-pem-file", certificate_pem(self.authority.ca_certificate)

    def create_token(self, body: bytes, actor: str, now: datetime | None = None) -> tuple[int, str, bytes]:
        """``POST /api/v1/enroll/tokens`` with a :class:`TokenRequest`: a :class:`TokenCreated` or ``{"error"}``.

        The caller has checked that ``actor`` (who the audit trail names) is an operator.
        Blocking, as :meth:`enroll`.
        """
        try:
            request = decode_json(body, type=TokenRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _error(400, f'expected {{"name": ..., "accounts": [...], "ttl": "1h"}}: {exc}')
        with self._lock:
            try:
                token, expires = self.store.create(request.name, request.accounts, parse_ttl(request.ttl), now=now, actor=actor)
            except PKIError as exc:
                return _error(400, str(exc))
        created = TokenCreated(
            token=token,
            name=request.name,
            accounts=list(normalize_accounts(request.accounts)),
            expires=expires,
            fingerprint=ca_fingerprint(self.authority.ca_certificate),
        )
        return 200, "application/json", msgspec.json.encode(created)

    def enroll(self, body: bytes, client: str, now: datetime | None = None) -> tuple[int, str, bytes]:
        """``POST /api/v1/enroll`` with an :class:`EnrollRequest`; an :class:`EnrollResponse` or ``{"error"}``.

        Blocking (SQLite, signing): a trio server runs it with ``trio.to_thread.run_sync``;
        requests are handled one at a time.
        """
        with self._lock:
            return self._enroll(body, client, now or datetime.now(UTC))

    def _enroll(self, body: bytes, client: str, now: datetime) -> tuple[int, str, bytes]:
        try:
            request = decode_json(body, type=EnrollRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return _error(400, f'expected {{"token": ..., "csr": PEM}}: {exc}')
        if len(request.csr) > MAX_CSR_BYTES:
            return _error(413, f"the CSR is over {MAX_CSR_BYTES} bytes")
        try:
            csr = x509.load_pem_x509_csr(request.csr.encode())
            if not csr.is_signature_valid:
                raise ValueError("its signature does not match its key")
            public_key = csr.public_key()
            if key_type_of(public_key) not in KEY_TYPES:
                raise ValueError(
                    f"its {key_type_of(public_key)} key is not a supported key type "
                    f"({', '.join(KEY_TYPES)}); make the key with `stratumrm proxy enroll`"
                )
        except ValueError as exc:
            self.store.refused(None, f"bad certificate signing request: {exc}", client, now)
            return _error(400, f"not a valid certificate signing request: {exc}")
        try:
            name, accounts, digest = self.store.redeem(request.token, client=client, now=now)
        except EnrollmentRefused as exc:
            return _error(exc.status, exc.reason)
        try:
            issuance = self.authority.enroll_miner(name, accounts=accounts, public_key=public_key, now=now)
        except PKIError as exc:
            self.store.refused(name, f"not issued: {exc}", client, now)
            return _error(409, f"the CA did not issue the certificate: {exc}")
        serial = format_serial(issuance.certificate.serial_number)
        self.store.completed(digest, name, serial, accounts, client, now)
        response = EnrollResponse(
            certificate=certificate_pem(issuance.certificate).decode(),
            ca=certificate_pem(self.authority.ca_certificate).decode(),
            name=name,
            accounts=list(accounts),
            serial=serial,
            not_after=issuance.certificate.not_valid_after_utc,
        )
        return 200, "application/json", msgspec.json.encode(response)


def _error(status: int, message: str) -> tuple[int, str, bytes]:
    return status, "application/json", msgspec.json.encode({"error": message})
