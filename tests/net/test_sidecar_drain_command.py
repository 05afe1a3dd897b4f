"""``stratumrm sidecar`` and SIGTERM: drain (rm.goaway, listener closed), and a second SIGTERM exits now."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import trio

from bridge.testing.pki import make_test_pki
from tests.processes import free_port, wait_for_port

LOCALHOST = "127.0.0.1"
HELLO = b'{"id":1,"method":"rm.hello","params":{"version":1,"features":["goaway"],"agent":"test"}}\n'


async def read_until(stream: trio.SSLStream, method: str, buffer: bytearray) -> dict:
    with trio.fail_after(30):
        while True:
            while b"\n" in buffer:
                line, _, rest = bytes(buffer).partition(b"\n")
                buffer[:] = rest
                message = json.loads(line)
                if message.get("method") == method or (method == "result" and message.get("id") == 1):
                    return message
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed before {method}"
            buffer += chunk


async def test_first_sigterm_drains_second_exits(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", accounts=("alice",))
    port = free_port()
    with (tmp_path / "sidecar.log").open("w") as log_file:
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
                "--drain-timeout",
                "300",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        await trio.to_thread.run_sync(wait_for_port, port)
        stream = trio.SSLStream(await trio.open_tcp_stream(LOCALHOST, port), pki.client_context(), server_hostname=LOCALHOST)
        await stream.send_all(HELLO)
        buffer = bytearray()
        result = await read_until(stream, "result", buffer)
        assert "goaway" in result["result"]["features"]
        process.send_signal(signal.SIGTERM)
        goaway = await read_until(stream, "rm.goaway", buffer)
        assert 250.0 < goaway["params"]["deadline"] <= 300.0
        # Draining: the listener is closed, the session lives on.
        with trio.fail_after(10):
            while True:
                try:
                    probe = await trio.open_tcp_stream(LOCALHOST, port)
                except OSError:
                    break
                await probe.aclose()
                await trio.sleep(0.05)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            while process.poll() is None:
                await trio.sleep(0.05)
        assert process.returncode == 0
        log = (tmp_path / "sidecar.log").read_text()
        assert "draining" in log and "second SIGTERM: exiting now" in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
