"""A busy but healthy peer is never declared dead: a sidecar or proxy process that gets no
CPU for more than twice ``dead_after`` (SIGSTOP, as a starved process would be) keeps the
session, because its kernel still acknowledges the other side's heartbeats (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from processes import STRATUMRM, LoggedProcess, free_port, wait_for_port

from bridge.testing.pki import make_test_pki


def test_a_sidecar_or_proxy_with_no_cpu_for_two_dead_afters_keeps_the_session(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", accounts=("alice",))
    pool_port, sidecar_port, proxy_port = free_port(), free_port(), free_port()
    roles: list[LoggedProcess] = []
    miner = None
    try:
        roles.append(LoggedProcess(["testpool", "--listen", f"127.0.0.1:{pool_port}", "--difficulty", "0.000002"]))
        sidecar = LoggedProcess(
            [
                "sidecar",
                "--listen",
                f"127.0.0.1:{sidecar_port}",
                "--pool",
                f"stratum+tcp://127.0.0.1:{pool_port}",
                "--cert",
                str(pki.pool_certificate),
                "--key",
                str(pki.pool_key),
                "--ca",
                str(pki.ca_certificate),
                "--dead-after",
                "1",
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
        wait_for_port(proxy_port)
        miner = subprocess.Popen(
            [
                *STRATUMRM,
                "testminer",
                "--url",
                f"stratum+tcp://127.0.0.1:{proxy_port}",
                "--user",
                "alice.rig1",
                "--duration",
                "60",
                # shares every ~0.2 s (8,600 hashes each) from a small part of a core: flat out,
                # the miner would take one of the machine's two cores from the roles under test
                "--hashrate",
                "50000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proxy.wait_for("StratumRM session with", "ready")
        sidecar.wait_for("channel", "opened for rig 127.0.0.1")
        os.kill(sidecar.process.pid, signal.SIGSTOP)  # no CPU at all: not one heartbeat, not one read
        time.sleep(2.2)  # more than twice dead_after (1 s): the old rule ended the session after 1 s
        os.kill(sidecar.process.pid, signal.SIGCONT)
        time.sleep(0.4)  # both sides catch up: two heartbeats (dead_after / 5) each way
        os.kill(proxy.process.pid, signal.SIGSTOP)  # and the other way round: the sidecar waits for it
        time.sleep(2.2)
        os.kill(proxy.process.pid, signal.SIGCONT)
        time.sleep(0.4)
        proxy_log, sidecar_log = proxy.stop(), sidecar.stop()
    finally:
        if miner is not None:
            miner.terminate()
            miner.wait(timeout=30)
        for role in roles:
            role.stop()
    before_stop = proxy_log.split("shutting down")[0]
    assert "StratumRM session with" in before_stop and "ended" not in before_stop, proxy_log
    assert "silent" not in sidecar_log and "took no control data" not in sidecar_log, sidecar_log
    assert "disconnected: proxy closed the control connection" in sidecar_log  # only at the proxy's stop
