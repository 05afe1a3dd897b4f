"""What the operator reads when things go wrong between proxy and sidecar (real processes)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from processes import STRATUMRM, LoggedProcess, free_port, wait_for_port

from bridge.testing.pki import make_test_pki

#: The testminers' run: nothing here needs a share, and flat out each would take a core from the roles.
CAPPED = ["--duration", "60", "--hashrate", "20000"]


def test_refusals_are_explained_at_the_proxy_and_a_stop_is_clean_at_the_sidecar(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", accounts=("alice",))
    other = make_test_pki(tmp_path / "other", accounts=("alice",))
    pool_port, sidecar_port, proxy_port, wrong_port = free_port(), free_port(), free_port(), free_port()
    roles: list[LoggedProcess] = []
    miners: list[subprocess.Popen] = []

    def miner(port: int, user: str) -> None:
        miners.append(
            subprocess.Popen(
                [*STRATUMRM, "testminer", "--url", f"stratum+tcp://127.0.0.1:{port}", "--user", user, *CAPPED],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    try:
        pool = LoggedProcess(["testpool", "--listen", f"127.0.0.1:{pool_port}", "--difficulty", "0.0001"])
        roles.append(pool)
        sidecar = LoggedProcess(
            [
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
            ]
        )
        roles.append(sidecar)
        sidecar.wait_for("sidecar listening")
        proxy = LoggedProcess(
            [
                "proxy",
                "--listen",
                f"127.0.0.1:{proxy_port}",
                "-o",
                f"stratumrm://127.0.0.1:{sidecar_port}",
                "--bundle",
                str(pki.miner_bundle),
            ]
        )
        roles.append(proxy)
        wrong = LoggedProcess(
            [
                "proxy",
                "--listen",
                f"127.0.0.1:{wrong_port}",
                "-o",
                f"stratumrm://127.0.0.1:{sidecar_port}",
                "--bundle",
                str(other.miner_bundle),
            ]
        )
        roles.append(wrong)
        wait_for_port(proxy_port)
        wait_for_port(wrong_port)
        miner(proxy_port, "bob.rig1")
        miner(wrong_port, "alice.rig2")

        # The proxy says, in its own words, why the sidecar refused.
        refused = proxy.wait_for("refused worker 'bob.rig1'")
        assert "does not cover account 'bob'" in refused and "stratumrm pki issue-miner" in refused
        assert "[rig-" in refused
        wrong_ca = wrong.wait_for("cannot connect to sidecar")
        assert "wrong CA" in wrong_ca and "[sidecar-" in wrong_ca
        sidecar.wait_for("proxy 127.0.0.1:", "connected: miner certificate")

        # A normal proxy shutdown is a clean close at the sidecar, not an error.
        proxy.process.terminate()
        proxy.wait_for("shutting down (SIGTERM)")
        closed = sidecar.wait_for("disconnected: proxy closed the control connection")
        assert "[proxy-" in closed
        proxy_log = proxy.stop()
        assert "Traceback" not in proxy_log
    finally:
        for process in miners:
            process.terminate()
            process.wait(timeout=30)
        logs = {id(role): role.stop() for role in roles}
    sidecar_log = logs[id(sidecar)]
    assert "control connection error" not in sidecar_log and "UNEXPECTED_EOF" not in sidecar_log
    assert "shutting down (SIGTERM)" in sidecar_log and "Traceback" not in sidecar_log
    wrong_log = logs[id(wrong)]
    wrong_ca_lines = [line for line in wrong_log.splitlines() if "cannot connect to sidecar" in line and "wrong CA" in line]
    assert len(wrong_ca_lines) == 1, wrong_log  # once, not per retry (the sidecar stops first: a new reason may follow)


def _find(document: object, key: str) -> object:
    """The first value under ``key`` anywhere in a JSON document."""
    if isinstance(document, dict):
        if key in document:
            return document[key]
        documents = list(document.values())
    elif isinstance(document, list):
        documents = document
    else:
        return None
    for inner in documents:
        found = _find(inner, key)
        if found is not None:
            return found
    return None


def test_a_scanner_flood_is_five_lines_not_one_per_connection(tmp_path: Path) -> None:
    """Scanners send garbage to every open port: the sidecar logs the first few, counts the rest."""
    from bridge.stats.status import fetch_status

    pki = make_test_pki(tmp_path / "pki", accounts=("alice",))
    port, status_port = free_port(), free_port()
    sidecar = LoggedProcess(
        [
            "sidecar",
            "--listen",
            f"127.0.0.1:{port}",
            "--no-udp",
            "--pool",
            "stratum+tcp://127.0.0.1:9",
            "--cert",
            str(pki.pool_certificate),
            "--key",
            str(pki.pool_key),
            "--ca",
            str(pki.ca_certificate),
            "--status-listen",
            f"127.0.0.1:{status_port}",
        ]
    )
    try:
        sidecar.wait_for("sidecar listening")
        flood = 30
        for _ in range(flood):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as scanner:
                scanner.sendall(b"GET / HTTP/1.0\r\nCookie: mstshash=Administr\r\n\r\n")
                scanner.recv(4096)  # the sidecar answers with a TLS alert, or closes
        deadline = time.monotonic() + 60
        while True:  # until the sidecar has counted every failed handshake
            counted = _find(fetch_status(f"http://127.0.0.1:{status_port}", 5.0), "handshake_failures")
            if isinstance(counted, int) and counted >= flood:
                break
            assert time.monotonic() < deadline, f"handshake failures counted: {counted}"
            time.sleep(0.1)
    finally:
        log = sidecar.stop()
    assert log.count("TLS handshake with") == 5, log
