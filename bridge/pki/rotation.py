"""Certificates that change on disk while a role runs: reloading, expiry, resumption.

Rotation without downtime needs three things, all here:

- **Reloading.** :class:`ServerCredentials` (the sidecar's certificate, key and CA) and
  :class:`ClientCredentials` (a proxy's bundle, or certificate, key and CA) remember the
  ``stat`` of their files. :meth:`~_Credentials.reload_if_changed` (called every few
  seconds, and with ``force=True`` on SIGHUP) re-reads them when a stamp moved and, when
  the content really changed, builds a **new** ``ssl.SSLContext`` and swaps it in. A
  context is never modified once built: connections made before the swap keep theirs
  and go on undisturbed, the next handshake uses the new one. A file caught half-way
  (a new certificate next to the old key) fails to load; the error is raised, the
  context in use stays, and the next poll tries again.
- **Expiry.** :meth:`~_Credentials.status` describes the certificate in use
  (:class:`CertificateStatus`: not_after, days_left, expiring_soon within the configured
  window); :func:`expiry_warning` turns it into the line the log and ``stratumrm status``
  show; :class:`Reminders` keeps the log to one such line per day.
- **Watching.** :class:`CredentialWatch` is what both roles decide when they look at
  their files: reload or not, which lines to log, which warnings are due again. The
  trio loop that calls it (:class:`bridge.net.credential_watch.CredentialWatcher`) only
  sleeps, reads the clocks and logs.
- **Resumption state** (client side). TLS 1.3 session tickets belong to the context that
  received them: :class:`ClientCredentials` keeps the last session per sidecar address
  together with the context it came from, hands it out only while that context is still
  the one in use, and counts full and resumed handshakes.

Nothing here reads the clock except through the ``now`` arguments, and nothing runs a
task: the drivers decide when to poll.
"""

from __future__ import annotations

import abc
import hashlib
import os
import ssl
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from cryptography import x509
from cryptography.x509.oid import NameOID

from bridge.bounded import BoundedMap
from bridge.errors import PKIError
from bridge.pki._files import FileStamp, read_bytes
from bridge.pki.bundle import parse_bundle
from bridge.pki.identity import CertificateIdentity, format_serial, identity_of
from bridge.pki.tls import client_context, client_context_from_bundle, server_context

StrPath = str | os.PathLike[str]

DEFAULT_EXPIRY_WARNING = timedelta(days=14)
"""Warn when the certificate in use expires within this window (``--cert-warn-days``)."""
DEFAULT_RELOAD_INTERVAL = 2.0
"""Seconds between two looks at the files (one ``stat`` each)."""
REMINDER_INTERVAL = 24 * 3600.0
"""A warning that stays true is logged again after this many seconds."""
MAX_CACHED_SESSIONS = 64


class CertificateStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One certificate as statistics, logs and ``stratumrm status`` describe it."""

    role: str
    """``pool``, ``miner``, ``ca``, or ``other`` for a certificate not made by ``stratumrm pki``."""
    name: str
    serial: str
    not_before: datetime
    not_after: datetime
    days_left: float
    """Days until notAfter (negative once expired)."""
    expiring_soon: bool
    """notAfter is within the warning window (or already past)."""
    expired: bool
    file: str | None = None


def certificate_status(
    certificate: x509.Certificate,
    now: datetime,
    window: timedelta = DEFAULT_EXPIRY_WARNING,
    *,
    file: StrPath | None = None,
) -> CertificateStatus:
    """Describe ``certificate`` at ``now``; ``expiring_soon`` when it ends within ``window``."""
    role: str
    try:
        identity = identity_of(certificate)
        role, name = identity.role, identity.name
    except PKIError:
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        role = "other"
        name = str(names[0].value) if names else certificate.subject.rfc4514_string()
    not_after = certificate.not_valid_after_utc
    left = not_after - now
    return CertificateStatus(
        role=role,
        name=name,
        serial=format_serial(certificate.serial_number),
        not_before=certificate.not_valid_before_utc,
        not_after=not_after,
        days_left=round(left.total_seconds() / 86400, 2),
        expiring_soon=left < window,
        expired=left.total_seconds() < 0,
        file=None if file is None else os.fspath(file),
    )


def identity_status(identity: CertificateIdentity, now: datetime, window: timedelta = DEFAULT_EXPIRY_WARNING) -> dict[str, Any]:
    """The :class:`CertificateStatus` fields of a peer's identity (for subclasses' constructors)."""
    left = identity.not_valid_after - now
    return {
        "role": identity.role,
        "name": identity.name,
        "serial": identity.serial_hex,
        "not_before": identity.not_valid_before,
        "not_after": identity.not_valid_after,
        "days_left": round(left.total_seconds() / 86400, 2),
        "expiring_soon": left < window,
        "expired": left.total_seconds() < 0,
    }


def expiry_warning(status: CertificateStatus, what: str, remedy: str) -> str | None:
    """The warning for a certificate that expired or expires soon, else None.

    ``what`` names it for the reader ("this sidecar's certificate"); ``remedy`` says
    what to do ("renew it: ...").
    """
    label = f"{what} {status.name!r} (serial {status.serial})"
    if status.expired:
        return f"{label} expired at {status.not_after:%Y-%m-%d %H:%M} UTC; {remedy}"
    if status.expiring_soon:
        return f"{label} expires in {status.days_left:.1f} days, at {status.not_after:%Y-%m-%d %H:%M} UTC; {remedy}"
    return None


class Reminders:
    """Say a recurring warning once, then again only every ``interval`` seconds."""

    def __init__(self, interval: float = REMINDER_INTERVAL) -> None:
        self.interval = interval
        self._said: dict[str, float] = {}

    def due(self, key: str, now: float) -> bool:
        """True (and remembered) when ``key`` was not said within the interval."""
        last = self._said.get(key)
        if last is not None and now - last < self.interval:
            return False
        self._said[key] = now
        return True

    def forget(self, key: str) -> None:
        """The condition ended: say it again at once if it comes back."""
        self._said.pop(key, None)

    def retain(self, keys: Iterable[str]) -> None:
        """Forget every key not in ``keys`` (the conditions that still hold)."""
        current = set(keys)
        for key in [key for key in self._said if key not in current]:
            del self._said[key]


def _load_certificates(pem: bytes, source: StrPath, what: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise PKIError(
            f"{os.fspath(source)} does not hold a PEM {what} (-----BEGIN CERTIFICATE-----); "
            "pass the .pem file `stratumrm pki` wrote for it, not its private key"
        ) from None
    return certificates


class _Credentials(abc.ABC):
    """Files that make one ``ssl.SSLContext``, watched for changes (see the module docstring)."""

    def __init__(self, files: Sequence[StrPath], expiry_warning: timedelta) -> None:
        self.files = tuple(Path(f) for f in files)
        self.expiry_window = expiry_warning
        self.reloads = 0
        """New contexts built after the first one."""
        self.last_error: str | None = None
        """Why the last reload failed, until one succeeds."""
        self._stamps: tuple[FileStamp | None, ...] = ()
        self._digest = b""
        self._context: ssl.SSLContext | None = None
        self._certificate: x509.Certificate | None = None
        if self.files:
            self._reload(force=True, first=True)

    # ------------------------------------------------------------------ reading

    @property
    def context(self) -> ssl.SSLContext:
        """The context for the next handshake."""
        assert self._context is not None
        return self._context

    @property
    def certificate(self) -> x509.Certificate | None:
        """The certificate this side presents (None for a fixed context of unknown origin)."""
        return self._certificate

    @property
    def certificate_file(self) -> Path | None:
        return self.files[0] if self.files else None

    def status(self, now: datetime, window: timedelta | None = None) -> CertificateStatus | None:
        """The certificate in use, its expiry and whether that is within the warning window
        (``window``, or the one given at construction)."""
        if self._certificate is None:
            return None
        return certificate_status(
            self._certificate,
            now,
            self.expiry_window if window is None else window,
            file=self.certificate_file,
        )

    # ------------------------------------------------------------------ reloading

    def reload_if_changed(self, *, force: bool = False) -> bool:
        """Build a new context if the files changed; True when one was swapped in.

        Cheap when nothing changed (a ``stat`` per file). ``force`` (SIGHUP) reads the
        files whatever their stamps say. Identical content builds nothing. A file that
        does not load raises :class:`PKIError` (also kept in :attr:`last_error`); the
        context in use stays, and the next call tries again.
        """
        return self._reload(force=force, first=False)

    def _reload(self, *, force: bool, first: bool) -> bool:
        if not self.files:
            return False  # a fixed context
        stamps = tuple(FileStamp.of(path) for path in self.files)
        if not force and stamps == self._stamps:
            return False
        try:
            contents = [read_bytes(path, "certificate file", self._hint) for path in self.files]
            digest = hashlib.sha256(b"".join(len(c).to_bytes(8, "big") + c for c in contents)).digest()
            if digest == self._digest:
                self._stamps = stamps
                self.last_error = None
                return False
            context, certificate = self._build(contents)
        except PKIError as error:
            if first:
                raise
            self.last_error = f"{error}; still using the certificate loaded before"
            raise PKIError(self.last_error) from None
        self._context, self._certificate = context, certificate
        self._stamps, self._digest = stamps, digest
        self.last_error = None
        if not first:
            self.reloads += 1
        return True

    _hint = "check the path"

    @abc.abstractmethod
    def _build(self, contents: list[bytes]) -> tuple[ssl.SSLContext, x509.Certificate | None]:
        """The TLS context (and our certificate) from the files' contents; each role builds its own."""


def _require_role(certificate: x509.Certificate, role: str, source: StrPath, hint: str) -> None:
    """Refuse a StratumRM certificate of the other role; foreign certificates pass."""
    try:
        identity = identity_of(certificate)
    except PKIError:
        return
    if identity.role != role:
        raise PKIError(f"{os.fspath(source)} holds a {identity.role} certificate ({identity.name!r}); {hint}")


class ServerCredentials(_Credentials):
    """The sidecar's certificate, key and CA, reloaded when the files change.

    ``check_time`` False (the default here) builds contexts that leave validity periods
    to :func:`bridge.pki.tls.check_miner_peer`, which the sidecar runs with its leeway and
    :attr:`ca_certificates` after every handshake.
    """

    _hint = "pass the files `stratumrm pki issue-pool` wrote"

    def __init__(
        self,
        cert_file: StrPath,
        key_file: StrPath,
        ca_file: StrPath,
        *,
        check_time: bool = False,
        expiry_warning: timedelta = DEFAULT_EXPIRY_WARNING,
    ) -> None:
        self.check_time = check_time
        self.ca_certificates: tuple[x509.Certificate, ...] = ()
        """The trusted CAs, for :func:`~bridge.pki.tls.check_miner_peer`'s ``cas``."""
        super().__init__((cert_file, key_file, ca_file), expiry_warning)

    def _build(self, contents: list[bytes]) -> tuple[ssl.SSLContext, x509.Certificate | None]:
        cert_file, key_file, ca_file = self.files
        certificate = _load_certificates(contents[0], cert_file, "certificate")[0]
        _require_role(
            certificate,
            "pool",
            cert_file,
            "the sidecar presents a pool certificate (`stratumrm pki issue-pool`)",
        )
        cas = _load_certificates(contents[2], ca_file, "CA certificate")
        context = server_context(cert_file, key_file, ca_file, check_time=self.check_time)
        self.ca_certificates = tuple(cas)
        return context, certificate

    def ca_statuses(self, now: datetime, window: timedelta | None = None) -> list[CertificateStatus]:
        """The trusted CAs' expiry, like :meth:`status`."""
        window = self.expiry_window if window is None else window
        return [certificate_status(ca, now, window, file=self.files[2]) for ca in self.ca_certificates]


class ClientTLSStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """The proxy's side of the control channel's TLS: its certificate and its handshakes."""

    certificate: CertificateStatus | None
    reloads: int
    last_reload_error: str | None
    handshakes_full: int
    handshakes_resumed: int


class ClientCredentials(_Credentials):
    """A proxy's certificate (a bundle, or certificate, key and CA), reloaded when it changes.

    Also the proxy's memory of TLS sessions, per sidecar address, for resumption.
    Build one with :meth:`from_bundle`, :meth:`from_files` or :meth:`fixed`.
    """

    _hint = "pass the bundle `stratumrm pki issue-miner` wrote"

    def __init__(
        self,
        files: Sequence[StrPath],
        *,
        expiry_warning: timedelta = DEFAULT_EXPIRY_WARNING,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self._sessions: BoundedMap[object, tuple[ssl.SSLContext, ssl.SSLSession]] = BoundedMap(MAX_CACHED_SESSIONS)
        self.handshakes_full = 0
        self.handshakes_resumed = 0
        super().__init__(files, expiry_warning)
        if context is not None:
            self._context = context

    @classmethod
    def from_bundle(cls, bundle_file: StrPath, *, expiry_warning: timedelta = DEFAULT_EXPIRY_WARNING) -> ClientCredentials:
        """From one bundle file (``stratumrm proxy --bundle``)."""
        return cls((bundle_file,), expiry_warning=expiry_warning)

    @classmethod
    def from_files(
        cls,
        cert_file: StrPath,
        key_file: StrPath,
        ca_file: StrPath,
        *,
        expiry_warning: timedelta = DEFAULT_EXPIRY_WARNING,
    ) -> ClientCredentials:
        """From separate certificate, key and CA files (``--cert/--key/--ca``)."""
        return cls((cert_file, key_file, ca_file), expiry_warning=expiry_warning)

    @classmethod
    def fixed(cls, context: ssl.SSLContext) -> ClientCredentials:
        """A context built elsewhere: never reloaded, but sessions are still remembered."""
        return cls((), context=context)

    def _build(self, contents: list[bytes]) -> tuple[ssl.SSLContext, x509.Certificate | None]:
        hint = "a proxy presents a miner certificate (`stratumrm pki issue-miner`)"
        if len(self.files) == 1:
            bundle = parse_bundle(contents[0], self.files[0])
            certificate = x509.load_pem_x509_certificate(bundle.certificate_pem)
            _require_role(certificate, "miner", self.files[0], hint)
            return client_context_from_bundle(self.files[0]), certificate
        cert_file, key_file, ca_file = self.files
        certificate = _load_certificates(contents[0], cert_file, "certificate")[0]
        _require_role(certificate, "miner", cert_file, hint)
        return client_context(cert_file, key_file, ca_file), certificate

    # ------------------------------------------------------------------ sessions

    def session_for(self, address: object) -> ssl.SSLSession | None:
        """The last session with ``address`` if the context in use can resume it."""
        entry = self._sessions.get(address)
        if entry is None:
            return None
        context, session = entry
        if context is not self._context:  # tickets belong to the context that got them
            del self._sessions[address]
            return None
        return session

    def remember_session(self, address: object, context: ssl.SSLContext, session: ssl.SSLSession | None) -> None:
        """Keep ``session`` for the next connection to ``address``.

        Take it only after application data arrived: TLS 1.3 tickets come after the
        handshake, so a session taken earlier usually has none.
        """
        if session is None or not session.has_ticket or context is not self._context:
            return
        self._sessions.put(address, (context, session))

    def forget_session(self, address: object) -> None:
        """The connection failed: the next one makes a full handshake."""
        self._sessions.pop(address, None)

    def note_handshake(self, resumed: bool) -> None:
        if resumed:
            self.handshakes_resumed += 1
        else:
            self.handshakes_full += 1

    def statistics(self, now: datetime) -> ClientTLSStatistics:
        return ClientTLSStatistics(
            certificate=self.status(now),
            reloads=self.reloads,
            last_reload_error=self.last_error,
            handshakes_full=self.handshakes_full,
            handshakes_resumed=self.handshakes_resumed,
        )


# --------------------------------------------------------------------------- watching


class CredentialWatch:
    """What a role decides when it looks at its certificate files, with the clocks passed in.

    ``credentials`` None (a context built elsewhere) watches nothing and warns about
    nothing of its own. ``subject`` names the certificate in warnings ("this proxy's
    certificate"); ``remedy`` says what to do about one that expires soon. ``window``
    overrides the credentials' expiry warning window. A sidecar's
    :class:`ServerCredentials` also has its CAs' expiry watched.

    ``now`` is the wall clock (validity, expiry); ``time`` is a monotonic clock in
    seconds (how often a warning that stays true is repeated).
    """

    def __init__(
        self,
        credentials: _Credentials | None,
        *,
        subject: str,
        remedy: Callable[[CertificateStatus], str],
        window: timedelta | None = None,
        reminder_interval: float = REMINDER_INTERVAL,
    ) -> None:
        self.credentials = credentials
        self.subject = subject
        self.remedy = remedy
        self.window = window
        self._reminders = Reminders(reminder_interval)

    @property
    def watching(self) -> bool:
        """True when there are files to look at."""
        return self.credentials is not None and bool(self.credentials.files)

    def presenting(self, now: datetime) -> str | None:
        """The line for the log at start: which certificate this role presents, from where."""
        status = self.credentials.status(now, self.window) if self.credentials is not None else None
        if status is None:
            return None
        return (
            f"presenting {status.role} certificate {status.name!r} (serial {status.serial}, valid until "
            f"{status.not_after:%Y-%m-%d %H:%M} UTC) from {status.file}; watching it for renewal"
        )

    def reload(self, now: datetime, *, force: bool = False) -> str | None:
        """Look at the files (``force``: re-read them whatever their stamps say).

        Returns the line for the log when a new certificate was swapped in, else None. A
        file that does not load leaves the certificate in use; :meth:`warnings` says why.
        """
        credentials = self.credentials
        if credentials is None:
            return None
        try:
            changed = credentials.reload_if_changed(force=force)
        except PKIError:
            return None  # credentials.last_error says why; warnings() reports it
        if not changed:
            return None
        status = credentials.status(now, self.window)
        assert status is not None  # a reloaded context comes with its certificate
        return (
            f"certificate reloaded from {status.file}: {status.role} certificate {status.name!r} "
            f"(serial {status.serial}, valid until {status.not_after:%Y-%m-%d %H:%M} UTC)"
        )

    def warnings(self, now: datetime) -> list[tuple[str, str]]:
        """``(key, message)`` for what needs the operator: expiry soon, a file that did not load."""
        credentials = self.credentials
        if credentials is None:
            return []
        found: list[tuple[str, str]] = []
        status = credentials.status(now, self.window)
        if status is not None:
            message = expiry_warning(status, self.subject, self.remedy(status))
            if message is not None:
                found.append((f"certificate {status.serial}", message))
        if isinstance(credentials, ServerCredentials):
            for ca in credentials.ca_statuses(now, self.window):
                message = expiry_warning(
                    ca,
                    "the CA certificate",
                    "before then, create a new CA (`stratumrm pki --dir NEWDIR init`) and issue every "
                    "sidecar and proxy a certificate from it",
                )
                if message is not None:
                    found.append((f"ca {ca.serial}", message))
        if credentials.last_error is not None:
            found.append(("certificate reload", f"certificate not reloaded: {credentials.last_error}"))
        return found

    def due(self, found: Iterable[tuple[str, str]], time: float) -> list[str]:
        """The messages of ``found`` to log at ``time``: each once, then once a reminder interval.

        ``found`` is every warning that holds now (this watch's and the role's own); a
        condition that ended is forgotten, so it is logged at once if it comes back.
        """
        found = list(found)
        messages = [message for key, message in found if self._reminders.due(key, time)]
        self._reminders.retain(key for key, _message in found)
        return messages
