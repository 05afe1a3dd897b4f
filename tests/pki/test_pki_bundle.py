"""Miner bundles: writing, reading, refusing mismatched parts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bridge.errors import PKIError
from bridge.pki.bundle import load_bundle, write_bundle
from bridge.pki.identity import identity_from_pem
from bridge.pki.issuing import generate_private_key
from bridge.testing.pki import TestPKI, make_test_pki


def test_load_bundle_returns_certificate_key_and_ca(test_pki: TestPKI) -> None:
    certificate_pem, key_pem, ca_pem = load_bundle(test_pki.miner_bundle)
    assert identity_from_pem(certificate_pem).name == "test-miner"
    assert ca_pem == test_pki.ca_certificate.read_bytes()
    key = serialization.load_pem_private_key(key_pem, password=None)
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    assert key.public_key() == certificate.public_key()
    assert stat.S_IMODE(os.stat(test_pki.miner_bundle).st_mode) == 0o600


def test_bundle_starts_with_readable_comments(test_pki: TestPKI) -> None:
    text = test_pki.miner_bundle.read_text()
    assert text.startswith("# StratumRM miner bundle")
    assert "# accounts: alice, bob" in text
    assert text.index("BEGIN CERTIFICATE") < text.index("BEGIN PRIVATE KEY")


def test_write_bundle_refuses_to_overwrite(test_pki: TestPKI, tmp_path: Path) -> None:
    certificate_pem, key_pem, ca_pem = load_bundle(test_pki.miner_bundle)
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    ca = x509.load_pem_x509_certificate(ca_pem)
    target = tmp_path / "copy.pem"
    write_bundle(target, certificate, key, ca)
    assert load_bundle(target) == load_bundle(test_pki.miner_bundle)
    with pytest.raises(PKIError, match="will not be overwritten"):
        write_bundle(target, certificate, key, ca)
    write_bundle(target, certificate, key, ca, replace=True)


def test_mismatched_or_incomplete_bundles_are_refused(test_pki: TestPKI, tmp_path: Path) -> None:
    certificate_pem, key_pem, ca_pem = load_bundle(test_pki.miner_bundle)
    other_key = generate_private_key("p256").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    wrong_key = tmp_path / "wrong-key.pem"
    wrong_key.write_bytes(certificate_pem + ca_pem + other_key)
    with pytest.raises(PKIError, match="does not match"):
        load_bundle(wrong_key)

    other = make_test_pki(tmp_path / "other")
    wrong_ca = tmp_path / "wrong-ca.pem"
    wrong_ca.write_bytes(certificate_pem + other.ca_certificate.read_bytes() + key_pem)
    with pytest.raises(PKIError, match="not issued by the CA"):
        load_bundle(wrong_ca)

    no_ca = tmp_path / "no-ca.pem"
    no_ca.write_bytes(certificate_pem + key_pem)
    with pytest.raises(PKIError, match="expected 2 certificates and 1 private key"):
        load_bundle(no_ca)

    with pytest.raises(PKIError, match=r"miner bundle not found.*issue-miner"):
        load_bundle(tmp_path / "missing.pem")
