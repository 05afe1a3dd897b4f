"""``stratumrm proxy enroll``: get this proxy's certificate with a one-time token.

1. Make the private key here (it never leaves this machine).
2. Fetch the CA certificate from ``URL/api/v1/enroll/ca`` and compare its SHA-256
   with the fingerprint the pool operator gave with the token; a mismatch stops
   everything (wrong server, or someone in the middle).
3. Over HTTPS verified against that CA (and the host name in the URL), send the token
   and a certificate signing request to ``URL/api/v1/enroll``.
4. Check the certificate that comes back (issued by that CA, for this key) and write
   certificate, CA and key as one bundle (mode 0600) for ``stratumrm proxy --bundle``.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from bridge.errors import PKIError
from bridge.pki.bundle import write_bundle
from bridge.pki.enrollment import (
    ENROLL_CA_PATH,
    ENROLL_PATH,
    EnrollResponse,
    ca_fingerprint,
    normalize_fingerprint,
)
from bridge.pki.issuing import KeyType, PrivateKey, generate_private_key
from bridge.sv1.framing import decode_json

__all__ = ["enroll"]

TIMEOUT = 30.0
MAX_RESPONSE = 65536


def _base(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise PKIError(f"{url!r}: enrollment needs the management port's https:// URL, e.g. https://sidecar.pool.example:9101")
    return f"https://{parts.netloc}", parts.hostname


def _fetch(request: urllib.request.Request | str, context: ssl.SSLContext, what: str) -> bytes:
    try:
        with urllib.request.urlopen(request, context=context, timeout=TIMEOUT) as response:
            return response.read(MAX_RESPONSE)
    except urllib.error.HTTPError as exc:
        try:
            message = decode_json(exc.read(MAX_RESPONSE))["error"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code} {exc.reason}"
        raise PKIError(f"the server refused the enrollment: {message}") from None
    except urllib.error.URLError as exc:
        from bridge.net.tcp import describe_error

        reason = exc.reason if isinstance(exc.reason, BaseException) else exc
        raise PKIError(f"cannot {what}: {describe_error(reason)}") from None
    except (OSError, ssl.SSLError) as exc:
        from bridge.net.tcp import describe_error

        raise PKIError(f"cannot {what}: {describe_error(exc)}") from None


def _csr(key: PrivateKey) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stratumrm enrollment")])
    )
    from bridge.pki.issuing import _signature_hash

    return builder.sign(key, _signature_hash(key)).public_bytes(serialization.Encoding.PEM)


def enroll(
    url: str, token: str, fingerprint: str, out: str | Path, *, key_type: KeyType = "p256", force: bool = False
) -> EnrollResponse:
    """Enroll and write the bundle to ``out``; PKIError says what went wrong and what to do."""
    base, host = _base(url)
    try:
        expected = normalize_fingerprint(fingerprint)
    except ValueError as exc:
        raise PKIError(f"--fingerprint: {exc}; copy it from `stratumrm pki token`'s output") from None
    out = Path(out)
    if out.exists() and not force:
        raise PKIError(f"{out} exists; pass --force to replace it (the old key is then lost)")

    # The CA, checked against the fingerprint before anything is trusted or sent.
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    ca_pem = _fetch(base + ENROLL_CA_PATH, unverified, f"fetch the CA certificate from {base}")
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise PKIError(
            f"{base}{ENROLL_CA_PATH} did not answer with a CA certificate; is this a StratumRM management port?"
        ) from None
    found = ca_fingerprint(ca)
    if found != expected:
        raise PKIError(
            f"the server's CA has fingerprint {found}, not the {expected} given with the token: this is not the "
            "pool operator's CA (wrong address, or someone in the middle); nothing was sent"
        )

    key = generate_private_key(key_type)
    verified = ssl.create_default_context(cadata=ca_pem.decode())
    verified.minimum_version = ssl.TLSVersion.TLSv1_2
    body = msgspec.json.encode({"token": token, "csr": _csr(key).decode()})
    request = urllib.request.Request(base + ENROLL_PATH, data=body, method="POST", headers={"Content-Type": "application/json"})
    answer = _fetch(request, verified, f"enroll at {base} (its certificate must be from that CA and name {host})")
    try:
        response = decode_json(answer, type=EnrollResponse)
        certificate = x509.load_pem_x509_certificate(response.certificate.encode())
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
        raise PKIError(f"the server's answer is not a certificate: {exc}") from None
    if certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise PKIError("the server returned a certificate for another key; nothing was written")
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"the returned certificate is not signed by the CA: {exc}") from None
    write_bundle(out, certificate, key, ca, replace=force)
    return response
