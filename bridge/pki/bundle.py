"""Miner bundles: one PEM file with everything a rig or farm gateway needs.

A bundle holds, in this order::

    # comment lines (name, accounts, validity): ignored by every PEM reader
    -----BEGIN CERTIFICATE-----   the miner certificate
    -----BEGIN CERTIFICATE-----   the CA certificate (the only trust anchor for the sidecar)
    -----BEGIN PRIVATE KEY-----   the miner's private key (PKCS#8)

The leaf comes first, so ``SSLContext.load_cert_chain(bundle)`` (OpenSSL reads the first
certificate as the leaf, further ones as its chain, and finds the key anywhere in the
file) works directly on the file; the CA is then also sent as chain, which is harmless.
The trust anchor must *not* be loaded from the whole file (that would trust the leaf too):
:func:`load_bundle` hands it out separately, and :func:`bridge.pki.tls.client_context_from_bundle`
uses only that. The file is written 0600 because it contains the private key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from bridge.errors import PKIError
from bridge.pki._files import create_secret_file, read_bytes, replace_secret_file
from bridge.pki.identity import format_serial, identity_of
from bridge.pki.issuing import (
    PrivateKey,
    certificate_pem,
    load_private_key_pem,
    private_key_pem,
)

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


@dataclass(frozen=True)
class BundleContents:
    """The three parts of a bundle as PEM bytes."""

    certificate_pem: bytes
    private_key_pem: bytes
    ca_certificate_pem: bytes


def bundle_text(certificate: x509.Certificate, private_key: PrivateKey, ca_certificate: x509.Certificate) -> bytes:
    """The bytes of a bundle file (see the module docstring for the layout)."""
    identity = identity_of(certificate)
    header = (
        "# StratumRM miner bundle: certificate, CA certificate, private key.\n"
        "# Install with: stratumrm proxy --bundle THIS_FILE   (keep it mode 0600)\n"
        f"# name: {identity.name}\n"
        f"# accounts: {', '.join(identity.accounts)}\n"
        f"# serial: {format_serial(identity.serial)}\n"
        f"# valid from: {identity.not_valid_before:%Y-%m-%d %H:%M:%S} UTC\n"
        f"# valid until: {identity.not_valid_after:%Y-%m-%d %H:%M:%S} UTC\n"
    )
    return header.encode() + certificate_pem(certificate) + certificate_pem(ca_certificate) + private_key_pem(private_key)


def write_bundle(
    path: str | os.PathLike[str],
    certificate: x509.Certificate,
    private_key: PrivateKey,
    ca_certificate: x509.Certificate,
    *,
    replace: bool = False,
) -> Path:
    """Write a bundle with mode 0600; refuse to overwrite unless ``replace`` is True."""
    bundle_path = Path(path)
    data = bundle_text(certificate, private_key, ca_certificate)
    if replace:
        replace_secret_file(bundle_path, data)
    else:
        create_secret_file(bundle_path, data)
    return bundle_path


def _public_key_der(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def read_bundle(path: str | os.PathLike[str]) -> BundleContents:
    """Split a bundle into its parts, checking that they belong together.

    The leaf is the certificate whose public key matches the private key; the CA is the
    other one, and it must have signed the leaf.
    """
    bundle_path = Path(path)
    data = read_bytes(bundle_path, "miner bundle", "create one with `stratumrm pki issue-miner NAME --account ACCOUNT`")
    return parse_bundle(data, bundle_path)


def parse_bundle(data: bytes, bundle_path: str | os.PathLike[str]) -> BundleContents:
    """:func:`read_bundle` on bytes already read from ``bundle_path`` (named in errors)."""
    blocks = [(match.group(1).decode(), match.group(0)) for match in _PEM_BLOCK.finditer(data)]
    certificate_blocks = [block for kind, block in blocks if kind == "CERTIFICATE"]
    key_blocks = [block for kind, block in blocks if kind.endswith("PRIVATE KEY")]
    if len(certificate_blocks) != 2 or len(key_blocks) != 1:
        raise PKIError(
            f"{bundle_path} is not a StratumRM bundle (expected 2 certificates and 1 private key, found "
            f"{len(certificate_blocks)} and {len(key_blocks)}); "
            "pass the file written by `stratumrm pki issue-miner`"
        )
    key = load_private_key_pem(key_blocks[0], f"the private key in {bundle_path}")
    key_der = _public_key_der(key.public_key())
    certificates = [x509.load_pem_x509_certificate(block) for block in certificate_blocks]
    matching = [i for i, certificate in enumerate(certificates) if _public_key_der(certificate.public_key()) == key_der]
    if len(matching) != 1:
        raise PKIError(f"the private key in {bundle_path} does not match its certificate; re-issue the bundle")
    leaf, ca = certificates[matching[0]], certificates[1 - matching[0]]
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError(
            f"the certificate in {bundle_path} was not issued by the CA certificate next to it; "
            "re-issue the bundle with `stratumrm pki renew NAME`"
        ) from None
    return BundleContents(
        certificate_pem=certificate_blocks[matching[0]],
        private_key_pem=key_blocks[0],
        ca_certificate_pem=certificate_blocks[1 - matching[0]],
    )


def load_bundle(path: str | os.PathLike[str]) -> tuple[bytes, bytes, bytes]:
    """``(certificate_pem, private_key_pem, ca_certificate_pem)`` from a bundle file."""
    contents = read_bundle(path)
    return contents.certificate_pem, contents.private_key_pem, contents.ca_certificate_pem
