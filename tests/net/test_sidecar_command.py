"""``stratumrm sidecar`` as an operator runs it: a real process, its options, SIGHUP, status."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio
from click.testing import CliRunner

from bridge.errors import BridgeError
from bridge.stats.status import fetch_status
from bridge.status_command import WARNINGS_EXIT_STATUS, status
from bridge.testing.pki import make_test_pki

LOCALHOST = "127.0.0.1"
HELLO = b'{"id":1,"method":"rm.hello","params":{"version":1,"features":[],"agent":"test"}}\n'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


async def wait_for_status(url: str, process: subprocess.Popen[Any]) -> dict[str, Any]:
    with trio.fail_after(20):
        while True:
            assert process.poll() is None, "the sidecar exited"
            try:
                return await trio.to_thread.run_sync(partial(fetch_status, url, 1.0))
            except BridgeError:
                await trio.sleep(0.1)


async def hello(port: int, context: Any) -> tuple[trio.SSLStream, dict[str, Any]]:
    """Connect, say rm.hello, return the stream and the first line the sidecar sends."""
    tcp = await trio.open_tcp_stream(LOCALHOST, port)
    stream = trio.SSLStream(tcp, context, server_hostname=LOCALHOST)
    await stream.send_all(HELLO)
    return stream, await first_line(stream)


async def first_line(stream: trio.SSLStream) -> dict[str, Any]:
    data = b""
    with trio.fail_after(5):
        while b"\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed without a line: {data!r}"
            data += chunk
    return json.loads(data.split(b"\n", 1)[0])


async def test_the_sidecar_command_reloads_on_sighup_caps_connections_and_serves_status(
    tmp_path: Path,
) -> None:
    pki = make_test_pki(tmp_path / "pki", accounts=("alice",))
    port, status_port = free_port(), free_port()
    log_path = tmp_path / "sidecar.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bridge",
                "sidecar",
                "--listen",
                f"{LOCALHOST}:{port}",
                "--no-udp",
                "--pool",
                "stratum+tcp://127.0.0.1:9",
                "--cert",
                str(pki.pool_certificate),
                "--key",
                str(pki.pool_key),
                "--ca",
                str(pki.ca_certificate),
                "--revocations",
                str(pki.revocations),
                "--status-listen",
                f"{LOCALHOST}:{status_port}",
                "--max-connections-per-cert",
                "1",
                "--cert-warn-days",
                "400",
                "--clock-skew",
                "30",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{LOCALHOST}:{status_port}"
    try:
        document = await wait_for_status(url, process)
        assert document["role"] == "sidecar" and document["statistics"]["certificate"]["name"] == pki.pool_name
        assert any("this sidecar's certificate" in w for w in document["warnings"])  # 365 days < 400
        shown = await trio.to_thread.run_sync(partial(CliRunner().invoke, status, ["--url", url]))
        assert shown.exit_code == WARNINGS_EXIT_STATUS and "EXPIRES SOON" in shown.output

        context = pki.client_context()
        first, answer = await hello(port, context)
        assert answer["id"] == 1 and answer["result"]["version"] == 1
        second, answer = await hello(port, context)
        assert answer["method"] == "rm.error" and "already holds 1 control connections" in answer["params"]["reason"]
        await trio.aclose_forcefully(second)

        pki.authority.revoke(pki.miner_name)
        process.send_signal(signal.SIGHUP)
        with trio.fail_after(5):
            notice = await first_line(first)
            while notice.get("method") != "rm.error":
                notice = await first_line(first)
        assert "was revoked" in notice["params"]["reason"]
        await trio.aclose_forcefully(first)

        document = await wait_for_status(url, process)
        assert document["statistics"]["refusals"] == {"connection limit": 1}
        assert document["statistics"]["revocations"]["revoked"] == 1
    finally:
        process.terminate()
        process.wait(timeout=10)
    log = log_path.read_text()
    assert "SIGHUP: re-reading the revocation list and certificate files" in log
    assert "closing the session of proxy" in log and "--max-connections-per-cert 1" in log
    assert f"sidecar management on http://{LOCALHOST}:{status_port}/" in log  # --status-listen: the old name
