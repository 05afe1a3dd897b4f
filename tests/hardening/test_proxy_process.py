"""Issue 9.1 as it was reported: one rig line nested a thousand levels deep against a real
``stratumrm proxy`` process. Before the bounded decoders it raised RecursionError in the SV1
decoder and the process exited, taking every rig with it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/processes.py

from processes import STRATUMRM, free_port, wait_for_port

DEEP_LINE = b'{"id":1,"method":"mining.subscribe","params":' + b"[" * 1000 + b"]" * 1000 + b"}\n"


def honest_subscribe(port: int) -> dict:
    """A rig's first request and the proxy's answer (from the pool behind it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as rig:
        rig.sendall(b'{"id":1,"method":"mining.subscribe","params":["cgminer/4.11.1"]}\n')
        received = b""
        while b"\n" not in received:
            chunk = rig.recv(4096)
            assert chunk, "the proxy closed an honest rig's connection"
            received += chunk
    return json.loads(received.split(b"\n", 1)[0])


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except OSError:
        pass  # a reset is a close too
    return received


def test_a_line_nested_a_thousand_deep_ends_that_rig_only_and_the_proxy_serves_the_next() -> None:
    assert len(DEEP_LINE) < 4096, "fits the proxy's line limit, as in the report"
    pool_port, proxy_port = free_port(), free_port()
    pool = subprocess.Popen(
        [*STRATUMRM, "testpool", "--listen", f"127.0.0.1:{pool_port}", "--difficulty", "0.000002"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proxy = None
    try:
        # The proxy probes its pool at once; started before the pool listens, it backs off
        # (up to 5 s), and on a loaded machine the honest rig could arrive in that window.
        wait_for_port(pool_port)
        proxy = subprocess.Popen(
            [*STRATUMRM, "proxy", "--listen", f"127.0.0.1:{proxy_port}", "--upstream", f"stratum+tcp://127.0.0.1:{pool_port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for_port(proxy_port)
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=60) as attacker:
            attacker.sendall(DEEP_LINE)
            read_until_closed(attacker)  # the proxy closes this rig, as ckpool does on invalid JSON
        answer = honest_subscribe(proxy_port)
        assert answer["id"] == 1 and answer["error"] is None and answer["result"][2] > 0
        assert proxy.poll() is None, "the proxy process exited because of one line"
        miner = subprocess.run(
            [
                *STRATUMRM,
                "testminer",
                "--url",
                f"stratum+tcp://127.0.0.1:{proxy_port}",
                "--user",
                "alice.rig1",
                "--profile",
                "cgminer",
                "--max-shares",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert miner.returncode == 0, miner.stdout + miner.stderr
        assert "Accepted" in miner.stdout
        assert proxy.poll() is None
    finally:
        for process in (proxy, pool):
            if process is not None:
                process.terminate()
        proxy_log = proxy.communicate(timeout=30)[0] if proxy is not None else ""
        pool.communicate(timeout=30)
    assert "nested deeper than 32 levels" in proxy_log, proxy_log
