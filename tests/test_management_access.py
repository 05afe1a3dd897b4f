"""The sidecar's management port over HTTPS: enrollment for rigs, operator certificates for people."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from processes import STRATUMRM, free_port, wait_for_port

from bridge.pki.enrollment import ca_fingerprint
from bridge.testing.pki import make_test_pki


def _get(
    url: str,
    ca: Path,
    bundle: Path | None = None,
    accept: str = "application/json",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(ca))
    if bundle is not None:
        context.load_cert_chain(str(bundle))
    request = urllib.request.Request(url, data=body, headers={"Accept": accept, **(headers or {})})
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_rigs_enroll_and_only_operators_get_in(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", accounts=("alice",))
    pool_port, sidecar_port, http_port, proxy_port = free_port(), free_port(), free_port(), free_port()
    run = lambda *args: subprocess.run(STRATUMRM + list(args), capture_output=True, text=True, timeout=90, check=False)
    operator = run("pki", "--dir", str(pki.directory), "issue-operator", "ann")
    assert operator.returncode == 0, operator.stderr
    processes = []
    try:
        processes.append(
            subprocess.Popen(
                [*STRATUMRM, "testpool", "--listen", f"127.0.0.1:{pool_port}", "--difficulty", "0.000002"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        sidecar_log = (tmp_path / "sidecar.log").open("w")
        processes.append(
            subprocess.Popen(
                [
                    *STRATUMRM,
                    "sidecar",
                    "--listen",
                    f"127.0.0.1:{sidecar_port}",
                    "--no-udp",
                    "--pool",
                    f"stratum+tcp://127.0.0.1:{pool_port}",
                    "--cert",
                    str(pki.pool_certificate),
                    "--key",
                    str(pki.pool_key),
                    "--ca",
                    str(pki.ca_certificate),
                    "--http-listen",
                    f"127.0.0.1:{http_port}",
                    "--http-require-operator",
                    "--enroll-ca",
                    str(pki.directory),
                ],
                stdout=sidecar_log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_for_port(http_port, timeout=30)
        base = f"https://127.0.0.1:{http_port}"

        # An operator creates the one-time token on the dashboard's endpoint; nobody else can.
        operator_bundle = pki.directory / "operators" / "ann.bundle.pem"
        tokens = f"{base}/api/v1/enroll/tokens"
        form = json.dumps({"name": "farm3", "accounts": ["alice"], "ttl": "10m"}).encode()
        as_json = {"Content-Type": "application/json"}
        status, body = _get(tokens, pki.ca_certificate, body=form, headers=as_json)
        assert status == 403 and "requires an operator certificate" in body
        status, body = _get(
            tokens, pki.ca_certificate, bundle=operator_bundle, body=form, headers={**as_json, "Origin": "https://evil.example"}
        )
        assert status == 403 and "is not this management port" in body
        status, body = _get(
            tokens,
            pki.ca_certificate,
            bundle=operator_bundle,
            body=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert status == 415
        status, body = _get(tokens, pki.ca_certificate, bundle=operator_bundle, accept="application/json")
        assert status == 200 and json.loads(body)["allowed"] is True and json.loads(body)["operator"] == "ann"
        status, body = _get(tokens, pki.ca_certificate, bundle=operator_bundle, body=form, headers={**as_json, "Origin": base})
        assert status == 200, body
        created = json.loads(body)
        token = created["token"]
        assert created["fingerprint"] == ca_fingerprint(pki.authority.ca_certificate) and created["accounts"] == ["alice"]

        # A rig enrolls: no client certificate, the token is the credential; its key stays on the farm.
        bundle = tmp_path / "farm" / "farm3.bundle.pem"
        bundle.parent.mkdir()
        enrolled = run("proxy", "enroll", base, "--token", token, "--fingerprint", created["fingerprint"], "--out", str(bundle))
        assert enrolled.returncode == 0, enrolled.stderr

        # People: none, a miner's and an operator's certificate.
        status, body = _get(f"{base}/api/v1/health", pki.ca_certificate)
        assert status == 403 and "requires an operator certificate" in body and "issue-operator" in body
        status, page = _get(f"{base}/", pki.ca_certificate, accept="text/html")
        assert status == 403 and "<h1>Operator certificate required</h1>" in page
        status, body = _get(f"{base}/api/v1/health", pki.ca_certificate, bundle=bundle)
        assert status == 403 and "is a miner certificate" in body
        status, body = _get(f"{base}/api/v1/health", pki.ca_certificate, bundle=operator_bundle)
        assert status == 200 and json.loads(body)["role"] == "sidecar"
        assert _get(f"{base}/healthz", pki.ca_certificate)[0] == 200  # load balancers need no certificate

        # The enrolled bundle mines.
        processes.append(
            subprocess.Popen(
                [
                    *STRATUMRM,
                    "proxy",
                    "--listen",
                    f"127.0.0.1:{proxy_port}",
                    "-o",
                    f"stratumrm://127.0.0.1:{sidecar_port}",
                    "--bundle",
                    str(bundle),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_for_port(proxy_port, timeout=30)
        miner = run(
            "testminer",
            "--url",
            f"stratum+tcp://127.0.0.1:{proxy_port}",
            "--user",
            "alice.rig1",
            "--max-shares",
            "1",
            "--duration",
            "60",
        )
        assert miner.returncode == 0 and "Accepted" in miner.stdout, miner.stdout + miner.stderr
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=30)
    audit = run("pki", "--dir", str(pki.directory), "enrollments")
    assert "enrolled" in audit.stdout and "farm3" in audit.stdout and "127.0.0.1" in audit.stdout
    assert "operator ann (dashboard, 127.0.0.1)" in audit.stdout  # who created the token, from where


def test_without_operator_certificates_the_dashboard_cannot_create_tokens(tmp_path: Path) -> None:
    """A loopback port without --http-require-operator: enrollment works, token creation is refused."""
    pki = make_test_pki(tmp_path / "pki", accounts=("alice",))
    sidecar_port, http_port = free_port(), free_port()
    sidecar = subprocess.Popen(
        [
            *STRATUMRM,
            "sidecar",
            "--listen",
            f"127.0.0.1:{sidecar_port}",
            "--no-udp",
            "--pool",
            "stratum+tcp://127.0.0.1:9",
            "--cert",
            str(pki.pool_certificate),
            "--key",
            str(pki.pool_key),
            "--ca",
            str(pki.ca_certificate),
            "--http-listen",
            f"127.0.0.1:{http_port}",
            "--enroll-ca",
            str(pki.directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(http_port, timeout=30)
        tokens = f"https://127.0.0.1:{http_port}/api/v1/enroll/tokens"
        status, body = _get(tokens, pki.ca_certificate)
        assert status == 200 and json.loads(body)["allowed"] is False and "--http-require-operator" in body
        form = json.dumps({"name": "farm4", "accounts": ["alice"]}).encode()
        status, body = _get(tokens, pki.ca_certificate, body=form, headers={"Content-Type": "application/json"})
        assert status == 403 and "stratumrm pki token" in body
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=30)
