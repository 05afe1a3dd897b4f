"""A throw-away PKI for tests, benchmarks and the demo: a CA, a sidecar certificate and a
miner bundle in a directory, with the TLS contexts built from them.

Production code never imports this module; it lives with the other test fixtures.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from bridge.pki.authority import CertificateAuthority
from bridge.pki.identity import split_hosts
from bridge.pki.tls import StrPath, client_context_from_bundle, public_server_context, server_context


@dataclass(frozen=True)
class TestPKI:
    """Paths of a throw-away PKI made by :func:`make_test_pki`."""

    __test__ = False  # not a pytest test class

    authority: CertificateAuthority
    directory: Path
    ca_certificate: Path
    ca_key: Path
    revocations: Path
    pool_certificate: Path
    pool_key: Path
    miner_bundle: Path
    pool_name: str
    miner_name: str
    accounts: tuple[str, ...]

    @property
    def ca_cert(self) -> Path:
        """Short alias of :attr:`ca_certificate`."""
        return self.ca_certificate

    def server_context(self) -> ssl.SSLContext:
        """Sidecar context (mutual TLS 1.3) with the test pool certificate."""
        return server_context(self.pool_certificate, self.pool_key, self.ca_certificate)

    def client_context(self) -> ssl.SSLContext:
        """Miner-side proxy context from the test bundle."""
        return client_context_from_bundle(self.miner_bundle)


def server_context_for_pool_tls(test_pki: TestPKI) -> ssl.SSLContext:
    """A plain ``stratum+ssl://`` pool context with the test PKI's pool certificate.

    Clients verify it with ``public_client_context(test_pki.ca_certificate)``.
    """
    return public_server_context(test_pki.pool_certificate, test_pki.pool_key)


def make_test_pki(
    directory: StrPath,
    pool_hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    accounts: tuple[str, ...] = ("alice",),
    *,
    pool_name: str = "test-pool",
    miner_name: str = "test-miner",
) -> TestPKI:
    """A CA, a sidecar certificate for ``pool_hosts`` and a miner bundle for ``accounts``."""
    authority = CertificateAuthority.create(directory)
    dns_names, ip_addresses = split_hosts(pool_hosts)
    pool = authority.issue_pool(pool_name, dns_names=dns_names, ip_addresses=ip_addresses)
    miner = authority.issue_miner(miner_name, accounts=accounts)
    assert pool.key_path is not None and pool.pool_certificate_path is not None and miner.bundle_path is not None
    return TestPKI(
        authority=authority,
        directory=authority.directory,
        ca_certificate=authority.ca_certificate_path,
        ca_key=authority.ca_key_path,
        revocations=authority.revocations_path,
        pool_certificate=pool.pool_certificate_path,
        pool_key=pool.key_path,
        miner_bundle=miner.bundle_path,
        pool_name=pool_name,
        miner_name=miner_name,
        accounts=tuple(accounts),
    )
