"""Enrollment: one-time tokens (hashed, single use, expiring, audited), CSR signing, the proxy's client."""

from __future__ import annotations

import http.server
import json
import os
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from bridge.errors import PKIError
from bridge.pki.authority import CertificateAuthority
from bridge.pki.bundle import read_bundle
from bridge.pki.enrollment import (
    ENROLL_CA_PATH,
    EnrollmentService,
    EnrollmentStore,
    ca_fingerprint,
    parse_ttl,
)
from bridge.pki.identity import identity_of
from bridge.pki.rotation import ClientCredentials
from bridge.testing.pki import make_test_pki

NOW = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)


def _csr(key=None) -> tuple[str, object]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whatever the rig says")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path / "pki")


def test_tokens_are_hashed_at_rest_single_use_expiring_and_audited(authority, tmp_path: Path) -> None:
    store = EnrollmentStore(tmp_path / "enrollment.sqlite")
    service = EnrollmentService(authority, store)
    token, expires = store.create("farm7", ["alice", "bob"], timedelta(hours=1), now=NOW, actor="ann")
    assert expires == NOW + timedelta(hours=1)
    store.close()
    assert token.encode() not in (tmp_path / "enrollment.sqlite").read_bytes()
    assert stat.S_IMODE(os.stat(tmp_path / "enrollment.sqlite").st_mode) == 0o600
    store = EnrollmentStore(tmp_path / "enrollment.sqlite")
    service = EnrollmentService(authority, store)

    csr, key = _csr()
    status, content_type, body = service.enroll(
        msgspec.json.encode({"token": token, "csr": csr}), "203.0.113.9", NOW + timedelta(minutes=5)
    )
    assert status == 200 and content_type == "application/json"
    answer = json.loads(body)
    certificate = x509.load_pem_x509_certificate(answer["certificate"].encode())
    identity = identity_of(certificate)
    assert (identity.role, identity.name, identity.accounts) == ("miner", "farm7", ("alice", "bob"))
    assert certificate.public_key() == key.public_key()  # the rig's key, made there
    certificate.verify_directly_issued_by(authority.ca_certificate)
    assert authority.latest("farm7").serial == answer["serial"]

    # Single use: the same token again is refused, and so is a made-up one and an expired one.
    again = service.enroll(msgspec.json.encode({"token": token, "csr": _csr()[0]}), "198.51.100.1", NOW)
    assert again[0] == 403 and b"already used" in again[2] and b"203.0.113.9" in again[2]
    made_up = service.enroll(msgspec.json.encode({"token": "srm1_guess", "csr": _csr()[0]}), "198.51.100.2", NOW)
    assert made_up[0] == 403 and b"unknown enrollment token" in made_up[2]
    late, _ = store.create("farm8", ["carol"], timedelta(minutes=30), now=NOW, actor="ann")
    expired = service.enroll(msgspec.json.encode({"token": late, "csr": _csr()[0]}), "198.51.100.3", NOW + timedelta(minutes=31))
    assert expired[0] == 403 and b"expired" in expired[2]

    trail = [(entry.event, entry.name, entry.actor) for entry in store.audit()]
    assert trail == [
        ("token created", "farm7", "ann"),
        ("enrolled", "farm7", "203.0.113.9"),
        ("refused", "farm7", "198.51.100.1"),
        ("refused", None, "198.51.100.2"),
        ("token created", "farm8", "ann"),
        ("refused", "farm8", "198.51.100.3"),
    ]
    assert answer["serial"] in store.audit()[1].detail


def test_bad_requests_do_not_use_the_token(authority, tmp_path: Path) -> None:
    store = EnrollmentStore(tmp_path / "enrollment.sqlite")
    service = EnrollmentService(authority, store)
    token, _ = store.create("farm9", ["alice"], timedelta(hours=1), now=NOW)
    assert service.enroll(b"not json", "h", NOW)[0] == 400
    assert service.enroll(b'{"token": "x"}', "h", NOW)[0] == 400
    assert service.enroll(msgspec.json.encode({"token": token, "csr": "garbage"}), "h", NOW)[0] == 400
    huge = msgspec.json.encode({"token": token, "csr": "A" * 100_000})
    assert service.enroll(huge, "h", NOW)[0] == 413
    rsa_csr, _ = _csr(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    refused = service.enroll(msgspec.json.encode({"token": token, "csr": rsa_csr}), "h", NOW)
    assert refused[0] == 400 and b"key type" in refused[2]
    # None of that spent the token.
    assert service.enroll(msgspec.json.encode({"token": token, "csr": _csr()[0]}), "h", NOW)[0] == 200


def test_ttls_and_fingerprints() -> None:
    assert parse_ttl("1h") == timedelta(hours=1) and parse_ttl("90") == timedelta(seconds=90)
    assert parse_ttl("2d") == timedelta(days=2) and parse_ttl("30m") == timedelta(minutes=30)
    for bad in ("0", "31d", "soon", "-1h"):
        with pytest.raises(PKIError):
            parse_ttl(bad)


class _Handler(http.server.BaseHTTPRequestHandler):
    service: EnrollmentService
    seen: list[tuple[str, str, bytes]]

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, b""))
        self._answer(*(self.service.ca() if self.path == ENROLL_CA_PATH else (404, "text/plain", b"no")))

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append(("POST", self.path, body))
        self._answer(*self.service.enroll(body, self.client_address[0]))

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def management_port(tmp_path: Path) -> Iterator[tuple[str, object, EnrollmentStore, list]]:
    """A stand-in for the sidecar's HTTPS management port serving the enrollment endpoints."""
    pki = make_test_pki(tmp_path / "pki")
    store = EnrollmentStore(tmp_path / "pki" / "enrollment.sqlite")
    seen: list[tuple[str, str, bytes]] = []
    handler = type("Handler", (_Handler,), {"service": EnrollmentService(pki.authority, store), "seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.pool_certificate, pki.pool_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", pki, store, seen
    finally:
        server.shutdown()
        server.server_close()
        store.close()


def _enroll(url: str, token: str, fingerprint: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge",
            "proxy",
            "enroll",
            url,
            "--token",
            token,
            "--fingerprint",
            fingerprint,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_proxy_enroll_makes_its_key_and_stores_a_working_bundle(management_port, tmp_path: Path) -> None:
    url, pki, store, seen = management_port
    token, _ = store.create("farm11", ["alice"], timedelta(hours=1))
    fingerprint = ca_fingerprint(pki.authority.ca_certificate)
    out = tmp_path / "farm" / "farm11.bundle.pem"
    out.parent.mkdir()
    done = _enroll(url, token, fingerprint.lower().replace(":", ""), out)
    assert done.returncode == 0, done.stderr
    assert "Enrolled 'farm11'" in done.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    contents = read_bundle(out)
    assert b"PRIVATE KEY" not in b"".join(body for _method, _path, body in seen)  # the key stayed here
    credentials = ClientCredentials.from_bundle(out)
    assert credentials.certificate is not None and identity_of(credentials.certificate).accounts == ("alice",)
    assert contents.ca_certificate_pem.strip() == pki.ca_certificate.read_bytes().strip()
    assert [entry.event for entry in store.audit()] == ["token created", "enrolled"]

    # The token is spent; a second run says so in one line.
    again = _enroll(url, token, fingerprint, tmp_path / "again.pem")
    assert again.returncode == 1 and "already used" in again.stderr and "Traceback" not in again.stderr


def test_a_wrong_fingerprint_stops_before_anything_is_sent(management_port, tmp_path: Path) -> None:
    url, _pki, store, seen = management_port
    token, _ = store.create("farm12", ["alice"], timedelta(hours=1))
    other = make_test_pki(tmp_path / "other")
    done = _enroll(url, token, ca_fingerprint(other.authority.ca_certificate), tmp_path / "x.pem")
    assert done.returncode == 1 and "not the pool operator's CA" in done.stderr and "nothing was sent" in done.stderr
    assert [method for method, _path, _body in seen] == ["GET"]
    assert not (tmp_path / "x.pem").exists()
    assert [entry.event for entry in store.audit()] == ["token created"]  # still unused


def test_operator_certificates_cannot_mine(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "pki", "--dir", str(tmp_path / "pki"), "init"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "pki", "--dir", str(tmp_path / "pki"), "issue-operator", "ann"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    bundle = tmp_path / "pki" / "operators" / "ann.bundle.pem"
    identity = identity_of(x509.load_pem_x509_certificate(read_bundle(bundle).certificate_pem))
    assert identity.role == "operator" and identity.accounts == () and not identity.may_authorize("ann.rig1")
    p12 = (tmp_path / "pki" / "operators" / "ann.p12").read_bytes()
    passphrase = done.stdout.split("passphrase ")[1].split(")")[0]
    from cryptography.hazmat.primitives.serialization import pkcs12

    loaded = pkcs12.load_pkcs12(p12, passphrase.encode())
    assert loaded.cert is not None and identity_of(loaded.cert.certificate).name == "ann"


def test_the_dashboard_form_creates_audited_tokens_and_refuses_bad_ones(authority, tmp_path: Path) -> None:
    """EnrollmentService.create_token (POST /api/v1/enroll/tokens): what `pki token` does, named for the operator."""
    from bridge.pki.enrollment import TokenCreated

    store = EnrollmentStore(tmp_path / "enroll.sqlite")
    service = EnrollmentService(authority, store)
    form = {"name": "farm9", "accounts": ["Alice", "bob"], "ttl": "2h"}
    status, _, body = service.create_token(json.dumps(form).encode(), "operator ann (dashboard, 10.0.0.9)")
    assert status == 200
    created = msgspec.json.decode(body, type=TokenCreated)
    assert created.name == "farm9" and created.fingerprint == ca_fingerprint(authority.ca_certificate)
    assert timedelta(hours=1.9) < created.expires - datetime.now(UTC) <= timedelta(hours=2)
    csr, _ = _csr()
    status, _, _ = service.enroll(json.dumps({"token": created.token, "csr": csr}).encode(), "10.0.0.7")
    assert status == 200
    creation = next(entry for entry in store.audit() if entry.event == "token created")
    assert creation.actor == "operator ann (dashboard, 10.0.0.9)" and creation.name == "farm9"
    for bad, needle in (
        ({"name": "farm9", "accounts": ["alice"], "ttl": "90d"}, "between 1 s and 30 days"),
        ({"name": "farm9", "accounts": []}, "at least one"),
        ({"name": "farm9"}, "accounts"),
        ({"name": "farm9", "accounts": ["alice"], "admin": True}, "admin"),
    ):
        status, _, body = service.create_token(json.dumps(bad).encode(), "operator ann")
        assert status == 400 and needle in body.decode(), body
    assert sum(entry.event == "token created" for entry in store.audit()) == 1


def _open_store(path: str, barrier) -> None:
    barrier.wait()
    EnrollmentStore(path)


def test_sidecars_sharing_a_ca_directory_open_a_new_database_at_the_same_moment(tmp_path) -> None:
    """Several sidecars on one CA directory: the losers of the race to switch a new database
    to WAL are told "database is locked" at once by SQLite; none may fail to start."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(20):
        path = str(tmp_path / f"enroll-{round_}.sqlite")
        barrier = context.Barrier(3)
        processes = [context.Process(target=_open_store, args=(path, barrier)) for _ in range(3)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(30)
        assert [p.exitcode for p in processes] == [0, 0, 0], f"round {round_}: a process could not open the store"
