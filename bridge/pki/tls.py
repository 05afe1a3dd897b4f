"""``ssl.SSLContext`` factories for the control channel, and what to check after a handshake.

Control channel (miner-side proxy ⇄ pool-side sidecar):

- TLS 1.3 only (in 1.2 the client certificate would cross the network in clear);
- both sides present certificates from the private CA and trust only that CA (never the
  system store); ``VERIFY_X509_STRICT`` on both ends, as Python 3.13 does by default;
- the proxy checks the sidecar's host name (or IP) against its certificate; there is no
  switch to turn verification off;
- OpenSSL verifies the chain, the extended key usage (serverAuth / clientAuth) and the
  validity period, with no leeway, **on full handshakes only**. A TLS 1.3 resumed
  session skips all of that, and OpenSSL never consults our revocation list. So the
  sidecar calls :func:`check_miner_peer` after every handshake, resumed ones included;
  it re-reads the peer's identity and applies validity (with leeway) and revocation.
  The sidecar's context is built with ``check_time=False``: OpenSSL then leaves the
  validity period to that one check, so the configured clock-skew leeway means the
  same on full and resumed handshakes, and an expired or not yet valid certificate is
  refused with an ``rm.error`` that says so instead of an anonymous handshake failure.

Backup pools reached directly over ``stratum+ssl://`` use :func:`public_client_context`.

Treat a context as fixed once built: to rotate a certificate or CA, build a new context
and use it for new connections. Session tickets belong to
the context that issued them, so connections after a swap make full handshakes.
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from bridge.errors import PKIError
from bridge.pki.bundle import read_bundle
from bridge.pki.identity import (
    DEFAULT_CLOCK_SKEW_LEEWAY,
    CertificateIdentity,
    CertificateRefused,
    check_validity,
    identity_from_der,
    identity_of,
)
from bridge.pki.revocation import RevocationList

StrPath = str | os.PathLike[str]


# --------------------------------------------------------------------------- contexts


def _require_file(path: StrPath, what: str, hint: str) -> None:
    if not Path(path).is_file():
        raise PKIError(f"{what} not found: {os.fspath(path)}; {hint}")


def _load_certificate_and_key(context: ssl.SSLContext, cert_file: StrPath, key_file: StrPath | None, hint: str) -> None:
    _require_file(cert_file, "certificate file", hint)
    if key_file is not None:
        _require_file(key_file, "private key file", hint)
    try:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    except ssl.SSLError as error:
        raise PKIError(
            f"cannot use certificate {os.fspath(cert_file)} with key "
            f"{os.fspath(key_file) if key_file is not None else '(same file)'}: {error.reason or error}; "
            "check that the key belongs to the certificate, or re-issue both"
        ) from None


def _load_private_ca(context: ssl.SSLContext, ca_file: StrPath | None = None, ca_data: str | None = None) -> None:
    if ca_file is not None:
        _require_file(ca_file, "CA certificate", "pass the ca.pem of the StratumRM CA (`stratumrm pki init` creates it)")
    try:
        context.load_verify_locations(cafile=ca_file, cadata=ca_data)
    except ssl.SSLError as error:
        raise PKIError(f"cannot load the CA certificate {ca_file or '(from bundle)'}: {error.reason or error}") from None


class HostCheckingClientContext(ssl.SSLContext):
    """A client context that refuses to wrap a connection without ``server_hostname``.

    ``wrap_socket`` already refuses that when ``check_hostname`` is set, but ``wrap_bio``,
    which ``trio.SSLStream`` uses, does not: the handshake then succeeds against *any*
    certificate the CA signed, without a host name check. Every client context built
    here is of this class, so forgetting ``server_hostname`` fails loudly instead.
    """

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if not server_side and self.check_hostname and not server_hostname:
            raise ValueError(
                "server_hostname is required: pass the host name or IP address the pool's "
                "certificate was issued for (e.g. trio.SSLStream(..., server_hostname=host))"
            )
        return super().wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname, session=session)


def _control_channel_context(*, server_side: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) if server_side else HostCheckingClientContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


#: OpenSSL's ``X509_V_FLAG_NO_CHECK_TIME`` (1.1.0 and later); Python has no name for it.
VERIFY_NO_CHECK_TIME = 0x200000


def server_context(cert_file: StrPath, key_file: StrPath | None, ca_file: StrPath, *, check_time: bool = True) -> ssl.SSLContext:
    """Sidecar side: TLS 1.3 only, presents ``cert_file``, requires a client certificate
    issued by the CA in ``ca_file`` (strict X.509 verification, clientAuth usage).

    ``check_time=False`` leaves the validity period of the client's certificate and of
    the CA out of OpenSSL's verification; only pass it when :func:`check_miner_peer`
    (with ``ca``) runs after every handshake, as the sidecar does.
    """
    context = _control_channel_context(server_side=True)
    if not check_time:
        context.verify_flags |= VERIFY_NO_CHECK_TIME
    _load_certificate_and_key(context, cert_file, key_file, "issue one with `stratumrm pki issue-pool NAME --dns HOST`")
    _load_private_ca(context, ca_file)
    return context


def client_context(cert_file: StrPath, key_file: StrPath | None, ca_file: StrPath) -> ssl.SSLContext:
    """Miner side: TLS 1.3 only, presents ``cert_file``/``key_file`` (``key_file`` None means
    the key is in ``cert_file``), trusts only ``ca_file``, checks the sidecar's host name.

    Callers must pass ``server_hostname`` when wrapping (``trio.SSLStream`` or
    ``wrap_socket``): without it wrapping raises ``ValueError``, by design.
    """
    context = _control_channel_context(server_side=False)
    _load_certificate_and_key(context, cert_file, key_file, "issue one with `stratumrm pki issue-miner NAME --account ACCOUNT`")
    _load_private_ca(context, ca_file)
    return context


def client_context_from_bundle(bundle_file: StrPath) -> ssl.SSLContext:
    """Like :func:`client_context`, from one bundle file (``stratumrm proxy --bundle``).

    Only the bundle's CA certificate becomes a trust anchor (not its leaf).
    """
    contents = read_bundle(bundle_file)
    context = _control_channel_context(server_side=False)
    _load_certificate_and_key(context, bundle_file, None, "re-issue it with `stratumrm pki renew NAME`")
    _load_private_ca(context, ca_data=contents.ca_certificate_pem.decode("ascii"))
    return context


def public_client_context(ca_file: StrPath | None = None) -> ssl.SSLContext:
    """For ordinary ``stratum+ssl://`` pools: TLS 1.2 or later, host name checked.

    Trusts the system store, or only ``ca_file`` when one is given (for a pool with a
    self-signed or private certificate). Verification flags follow what Python's
    ``create_default_context`` uses (strict and partial-chain from 3.13), because
    public pools' certificates are not ours to fix. Wrapping needs ``server_hostname``.
    """
    context = HostCheckingClientContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if sys.version_info >= (3, 13):  # as create_default_context() does from 3.13
        context.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    if ca_file is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return context
    _require_file(ca_file, "pool CA certificate", "pass the PEM file of the pool's certificate or CA")
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as error:
        raise PKIError(
            f"cannot load the pool CA file {os.fspath(ca_file)}: {error.reason or error}; "
            "pass a PEM file with the pool's certificate or CA"
        ) from None
    return context


def public_server_context(cert_file: StrPath, key_file: StrPath | None) -> ssl.SSLContext:
    """An ordinary ``stratum+ssl://`` pool endpoint: TLS 1.2 or later, no client certificate.

    StratumRM itself never serves this; the reference pool uses it in tests and the demo.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_certificate_and_key(context, cert_file, key_file, "issue one with `stratumrm pki issue-pool`")
    return context


# --------------------------------------------------------------------------- after the handshake


class HasPeerCertificate(Protocol):
    """``ssl.SSLObject``, ``ssl.SSLSocket`` and ``trio.SSLStream`` all qualify."""

    def getpeercert(self, binary_form: bool = ...) -> Any: ...


def peer_certificate_der(tls: HasPeerCertificate) -> bytes:
    """The peer's leaf certificate as DER, after a handshake (full or resumed)."""
    der = tls.getpeercert(binary_form=True)
    if not der:
        raise PKIError("the peer presented no certificate; it needs one issued by the StratumRM CA")
    return bytes(der)


def peer_identity(tls: HasPeerCertificate) -> CertificateIdentity:
    """Role, name, serial, accounts and validity of the peer's certificate."""
    return identity_from_der(peer_certificate_der(tls))


def check_miner_peer(
    tls: HasPeerCertificate,
    revocations: RevocationList | None,
    *,
    now: datetime,
    leeway: timedelta = DEFAULT_CLOCK_SKEW_LEEWAY,
    cas: Sequence[x509.Certificate] = (),
) -> CertificateIdentity:
    """What the sidecar runs after every handshake, resumed ones included.

    Returns the miner's identity, or raises :class:`CertificateRefused` (a
    :class:`PKIError`; its ``kind`` says why) when the certificate is not a miner
    certificate, is outside its validity period (± ``leeway``) or is revoked. With
    ``cas`` (the CAs the context trusts), the CA that issued the certificate must be
    inside its own validity period too: pass them when the context was built with
    ``check_time=False``. Call :meth:`RevocationList.reload_if_changed` separately
    (periodically), and re-check live sessions against a reloaded list with
    :meth:`RevocationList.is_revoked`.
    """
    try:
        certificate = x509.load_der_x509_certificate(peer_certificate_der(tls))
    except ValueError as error:
        raise PKIError(f"peer certificate is not valid DER X.509: {error}") from None
    identity = identity_of(certificate)
    if identity.role != "miner":
        raise CertificateRefused(
            "not a miner certificate",
            f"the peer presented a {identity.role} certificate ({identity.name!r}), not a miner "
            "certificate; a proxy needs a bundle from `stratumrm pki issue-miner NAME --account ACCOUNT`",
        )
    if cas:
        _check_issuer_validity(certificate, cas, now, leeway)
    check_validity(identity, now=now, leeway=leeway)
    if revocations is not None and revocations.is_revoked(identity.serial):
        revoked_at = revocations.revocation_date(identity.serial)
        since = f" since {revoked_at:%Y-%m-%d %H:%M} UTC" if revoked_at is not None else ""
        raise CertificateRefused(
            "revoked",
            f"{identity.describe()} is revoked{since}; if this proxy should connect again, issue it "
            f"a new certificate (`stratumrm pki renew {identity.name}`) and install the bundle",
        )
    return identity


def _key_identifier(certificate: x509.Certificate, kind: type[x509.ExtensionType]) -> bytes | None:
    try:
        value = certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    return getattr(value, "key_identifier", None) or getattr(value, "digest", None)


def _check_issuer_validity(
    certificate: x509.Certificate, cas: Sequence[x509.Certificate], now: datetime, leeway: timedelta
) -> None:
    """The CA among ``cas`` that issued ``certificate`` must be valid at ``now`` (± ``leeway``)."""
    authority_key = _key_identifier(certificate, x509.AuthorityKeyIdentifier)
    issuers = [
        ca
        for ca in cas
        if ca.subject == certificate.issuer
        and (authority_key is None or _key_identifier(ca, x509.SubjectKeyIdentifier) in (None, authority_key))
    ]
    if any(ca.not_valid_before_utc - leeway <= now <= ca.not_valid_after_utc + leeway for ca in issuers):
        return
    if not issuers:
        raise CertificateRefused("unknown CA", "the certificate's issuer is not among the CAs this sidecar trusts (--ca)")
    ca = issuers[0]
    raise CertificateRefused(
        "CA not valid",
        f"the CA that issued it ({ca.subject.rfc4514_string()}) is valid from "
        f"{ca.not_valid_before_utc:%Y-%m-%d %H:%M} to {ca.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, "
        "not now; check this host's clock, or create a new CA (`stratumrm pki --dir NEWDIR init`) and "
        "issue every sidecar and proxy a certificate from it",
    )


#: TLS alerts a client sends when it does not accept the sidecar's certificate.
_CLIENT_REFUSED_OUR_CERTIFICATE = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "TLSV1_ALERT_DECRYPT_ERROR",
    }
)


def explain_handshake_failure(error: BaseException) -> tuple[str, str]:
    """Why a sidecar's TLS handshake with a client failed: ``(kind, advice)``.

    ``kind`` is a short word for counting (``"no certificate"``, ``"unknown CA"`` ...);
    the advice says, for the operator, what the client did and what to do about it.
    """
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    reason = getattr(cause, "reason", None) or ""
    if cause is None or isinstance(cause, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return "connection lost", (
            "the client closed the connection during the TLS handshake; if it is a proxy, its log "
            "says why (often: it does not trust this sidecar's certificate, or dialled a host name "
            "the certificate does not name: `stratumrm pki issue-pool NAME --dns HOST --ip ADDRESS`)"
        )
    if isinstance(cause, ssl.SSLCertVerificationError):
        message = cause.verify_message or str(cause)
        code = cause.verify_code
        if code in (18, 19, 20, 21, 2):  # self-signed, self-signed in chain, unknown issuer, ...
            return "unknown CA", (
                f"its certificate was not issued by this sidecar's CA ({message}); give that proxy "
                "a bundle from the CA in --ca (`stratumrm pki issue-miner NAME --account ACCOUNT`)"
            )
        if code == 10:
            return "expired", f"its certificate has expired ({message}); renew it: `stratumrm pki renew NAME`"
        if code == 9:
            return "not yet valid", f"its certificate is not valid yet ({message}); check both hosts' clocks (NTP)"
        if code == 26:
            return "not a miner certificate", (
                f"its certificate is not for TLS clients ({message}); proxies need a bundle from `stratumrm pki issue-miner`"
            )
        return "certificate refused", f"its certificate failed verification ({message})"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no certificate", (
            "the client presented no certificate; every proxy needs a bundle from this CA "
            "(`stratumrm pki issue-miner NAME --account ACCOUNT`, then `stratumrm proxy --bundle FILE`)"
        )
    if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE"):
        return "TLS version", "the client does not speak TLS 1.3, which StratumRM requires; upgrade it"
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG"):
        return "not TLS", (
            "the client did not speak TLS (a rig or a scanner on the sidecar's port?); rigs connect "
            "to `stratumrm proxy`, which connects here"
        )
    if reason in _CLIENT_REFUSED_OUR_CERTIFICATE:
        return "sidecar certificate refused", (
            f"the client refused this sidecar's certificate ({reason}); the proxy must trust this CA "
            "and dial a host name or address the sidecar certificate names "
            "(`stratumrm pki issue-pool NAME --dns HOST --ip ADDRESS`)"
        )
    return "handshake failed", f"TLS error: {reason or cause}"
