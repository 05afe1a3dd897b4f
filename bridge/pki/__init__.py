"""The private CA of a StratumRM deployment, and the TLS contexts that rely on it.

- :mod:`bridge.pki.identity`   what a certificate says: role, name, accounts (SAN URNs), validity
- :mod:`bridge.pki.issuing`    keys, certificates and CRLs, built in memory (RFC 5280-clean)
- :mod:`bridge.pki.authority`  the CA kept in a directory: issue, renew, revoke, index
- :mod:`bridge.pki.bundle`     one-file miner bundles (certificate, CA, key)
- :mod:`bridge.pki.revocation` the revocation list the sidecar watches and reloads
- :mod:`bridge.pki.tls`        ``ssl.SSLContext`` factories and post-handshake checks
- :mod:`bridge.pki.rotation`   certificates reloaded from disk, expiry status, TLS session memory
- :mod:`bridge.pki.commands`   the ``stratumrm pki`` click group

The click group is not imported here, so drivers can use the library without click.
"""

from bridge.pki.authority import CertificateAuthority, Issuance, IssuedCertificate
from bridge.pki.bundle import load_bundle, read_bundle, write_bundle
from bridge.pki.identity import (
    DEFAULT_CLOCK_SKEW_LEEWAY,
    CertificateIdentity,
    Validity,
    account_of_username,
    check_validity,
    identity_from_der,
    identity_from_pem,
)
from bridge.pki.revocation import RevocationList
from bridge.pki.rotation import CertificateStatus, ClientCredentials, ServerCredentials
from bridge.pki.tls import (
    HostCheckingClientContext,
    check_miner_peer,
    client_context,
    client_context_from_bundle,
    peer_certificate_der,
    peer_identity,
    public_client_context,
    public_server_context,
    server_context,
)

__all__ = [
    "DEFAULT_CLOCK_SKEW_LEEWAY",
    "CertificateAuthority",
    "CertificateIdentity",
    "CertificateStatus",
    "ClientCredentials",
    "HostCheckingClientContext",
    "Issuance",
    "IssuedCertificate",
    "RevocationList",
    "ServerCredentials",
    "Validity",
    "account_of_username",
    "check_miner_peer",
    "check_validity",
    "client_context",
    "client_context_from_bundle",
    "identity_from_der",
    "identity_from_pem",
    "load_bundle",
    "peer_certificate_der",
    "peer_identity",
    "public_client_context",
    "public_server_context",
    "read_bundle",
    "server_context",
    "write_bundle",
]
