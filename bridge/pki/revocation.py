"""The revocation list as the sidecar uses it: a CRL file, checked in the application.

Python's ``ssl`` is a poor place to enforce revocation: a
CRL only counts with ``VERIFY_CRL_CHECK_LEAF``, every client is refused while no CRL is
loaded or once it passes nextUpdate, CRLs can only be added to a live context (never
removed), and TLS 1.3 resumed sessions skip certificate checks altogether. So the sidecar
keeps OpenSSL out of it and asks a :class:`RevocationList` after *every* handshake,
resumed ones included::

    revocations = RevocationList(revocations_path, ca_certificate_path)
    ...
    revocations.reload_if_changed()          # e.g. once a second, from one task
    if revocations.is_revoked(identity.serial): ...close the session...

The file is the CRL that ``stratumrm pki`` maintains (``DIR/revocations.pem``). It is
verified against the CA before it replaces the list in use; a file that is missing,
half-written, signed by someone else or older than the one loaded (lower CRL number) is
refused with :class:`PKIError` and the previous list stays in force. A CRL past its
nextUpdate is still used (revocations never expire early); :meth:`is_stale` lets the
caller raise an alarm so someone re-publishes it (``stratumrm pki crl``).
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
from cryptography import x509

from bridge.errors import PKIError
from bridge.pki._files import FileStamp, read_bytes
from bridge.pki.identity import format_serial

#: A list whose nextUpdate is this close is flagged, so someone re-publishes it in time.
REPUBLISH_WARNING = timedelta(days=3)


class RevocationStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The revocation list in use, as statistics and the status endpoint show it."""

    file: str
    crl_number: int
    revoked: int
    this_update: datetime | None
    next_update: datetime | None
    stale: bool
    """Past nextUpdate: still enforced, but re-publish it (``stratumrm pki crl``)."""
    due_soon: bool
    """nextUpdate is less than :data:`REPUBLISH_WARNING` away."""
    reloads: int


def load_ca_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """Read a PEM CA certificate, with a helpful error when it is missing or wrong."""
    ca_path = Path(path)
    pem = read_bytes(ca_path, "CA certificate", "create one with `stratumrm pki init` or pass the CA's ca.pem")
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise PKIError(f"{ca_path} is not a PEM certificate; pass the CA's ca.pem") from None


def parse_revocation_list(pem: bytes, ca_certificate: x509.Certificate, source: str) -> x509.CertificateRevocationList:
    """Parse a PEM CRL and check it was issued and signed by ``ca_certificate``."""
    try:
        crl = x509.load_pem_x509_crl(pem)
    except ValueError:
        raise PKIError(
            f"{source} is not a PEM revocation list (X509 CRL); point it at the revocations.pem that `stratumrm pki` maintains"
        ) from None
    public_key = ca_certificate.public_key()
    if crl.issuer != ca_certificate.subject or not crl.is_signature_valid(public_key):  # type: ignore[arg-type]
        raise PKIError(
            f"{source} is not signed by the CA {ca_certificate.subject.rfc4514_string()}; "
            "use the revocations.pem from the same `stratumrm pki` directory as the CA"
        )
    return crl


def crl_number_of(crl: x509.CertificateRevocationList) -> int:
    """The CRL number extension (0 when absent)."""
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


class RevocationList:
    """Serials revoked by the CA, loaded from a CRL file that can change while we run.

    Not thread-safe; use it from one task (trio code is single-threaded anyway).
    """

    def __init__(self, path: str | os.PathLike[str], ca_certificate_path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._ca_certificate = load_ca_certificate(ca_certificate_path)
        self._stamp: FileStamp | None = None
        self._content_sha256 = b""
        self._revoked: dict[int, datetime] = {}
        self.crl_number = -1
        self.this_update: datetime | None = None
        self.next_update: datetime | None = None
        self.reload_count = 0
        """How many times a new list was loaded (the first load counts)."""
        self._load(self._read(), FileStamp.of(self.path))

    # ---------------------------------------------------------------- queries

    def is_revoked(self, serial: int) -> bool:
        """Whether the certificate with this serial number is revoked."""
        return serial in self._revoked

    @property
    def revoked_serials(self) -> frozenset[int]:
        return frozenset(self._revoked)

    def revocation_date(self, serial: int) -> datetime | None:
        return self._revoked.get(serial)

    def is_stale(self, now: datetime) -> bool:
        """True once ``now`` is past the CRL's nextUpdate: re-publish it (``stratumrm pki crl``)."""
        return self.next_update is not None and now > self.next_update

    def __len__(self) -> int:
        return len(self._revoked)

    def status(self, now: datetime) -> RevocationStatus:
        """A snapshot for statistics: what is loaded and whether it needs re-publishing."""
        next_update = self.next_update
        return RevocationStatus(
            file=str(self.path),
            crl_number=self.crl_number,
            revoked=len(self._revoked),
            this_update=self.this_update,
            next_update=next_update,
            stale=self.is_stale(now),
            due_soon=next_update is not None and next_update - now < REPUBLISH_WARNING,
            reloads=self.reload_count,
        )

    # ---------------------------------------------------------------- reloading

    def reload_if_changed(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed; return True when a new list was loaded.

        Cheap when nothing changed (one ``stat``). When device, inode, size or mtime
        differ, or ``force`` is set (SIGHUP), the file is read and hashed; identical
        content is not parsed again. On an invalid or older file this raises
        :class:`PKIError`, keeps the list in use, and tries again on the next call.
        """
        stamp = FileStamp.of(self.path)
        if not force and stamp is not None and stamp == self._stamp:
            return False
        content = self._read()
        if hashlib.sha256(content).digest() == self._content_sha256:
            self._stamp = stamp
            return False
        self._load(content, stamp)
        return True

    def _read(self) -> bytes:
        return read_bytes(
            self.path,
            "revocation list",
            "create it with `stratumrm pki init` (it starts empty) or pass DIR/revocations.pem",
        )

    def _load(self, content: bytes, stamp: FileStamp | None) -> None:
        crl = parse_revocation_list(content, self._ca_certificate, str(self.path))
        number = crl_number_of(crl)
        if number < self.crl_number:
            raise PKIError(
                f"{self.path} has CRL number {number}, older than the loaded {self.crl_number}; "
                "keeping the newer list; publish the current one with `stratumrm pki crl`"
            )
        self._revoked = {entry.serial_number: entry.revocation_date_utc for entry in crl}
        self.crl_number = number
        self.this_update = crl.last_update_utc
        self.next_update = crl.next_update_utc
        self._content_sha256 = hashlib.sha256(content).digest()
        self._stamp = stamp
        self.reload_count += 1

    def __repr__(self) -> str:
        serials = ", ".join(format_serial(serial) for serial in sorted(self._revoked)[:3])
        more = "" if len(self._revoked) <= 3 else ", ..."
        return f"RevocationList({str(self.path)!r}, crl_number={self.crl_number}, revoked=[{serials}{more}])"
