"""Two sidecars behind a real HAProxy: SIGKILL of one, and a rolling restart of both.

Pool namespace: the reference pool, two ``stratumrm sidecar`` processes (one
certificate, CA and revocation list from one shared directory; each advertising
its own UDP address; ``--proxy-protocol-from 127.0.0.1`` since HAProxy sends
``send-proxy-v2``) and HAProxy in TCP mode in front of them. Farm namespace: one
``stratumrm proxy`` dialling HAProxy, and reference miners (cgminer, bmminer with
#xnsub, cpuminer) dialling the proxy.

Every step waits for an event, never a fixed time: after each kill or restart,
every miner must get a NEW accepted share (60 s bound). The tally comes after the
miners stopped and every verdict arrived: each share a miner was told accepted is
in the pool's accepted set; the pool accepted no share twice; during the rolling
restart no rig connection was closed except by a ``client.reconnect`` the proxy
sent (the #xnsub rig: not even that, it moves with mining.set_extranonce).
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.netns.conftest import SIDECAR_IPS, copy_pki, require
from tests.netns.netlib import Lab, read_state, wait_until
from tests.netns.roles import DIFFICULTY

POOL_IP, FARM_IP = "10.213.0.1", "10.213.0.2"
BALANCER_PORT = 3334
SIDECAR_PORTS = {"s1": 4001, "s2": 4002}
STATUS_PORTS = {"s1": 9101, "s2": 9102}
PROFILES = "cgminer,bmminer+xnsub,cpuminer"
STEP_TIMEOUT = 60.0

HAPROXY_CONFIG = """\
global
    stats socket {socket} mode 600 level admin
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    retries 3
    option redispatch 1
frontend stratumrm
    bind {pool_ip}:{port}
    default_backend sidecars
backend sidecars
    balance leastconn
    option httpchk GET /readyz
{servers}
"""


def haproxy_servers(socket_path: Path) -> dict[str, dict[str, str]]:
    """``show stat`` over the stats socket: status and current sessions per sidecar."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(socket_path))
            client.sendall(b"show stat\n")
            data = b""
            while chunk := client.recv(65536):
                data += chunk
    except OSError:
        return {}
    lines = data.decode().splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    header = lines[0][2:].split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return {row["svname"]: row for row in rows if row.get("pxname") == "sidecars" and row["svname"] in SIDECAR_PORTS}


class PoolFarm:
    def __init__(self, lab: Lab, directory: Path, pki: Path) -> None:
        self.lab = lab
        self.directory = directory
        self.pki = copy_pki(pki, directory / "pki")
        self.pool_ns = lab.namespace("pool")
        self.farm_ns = lab.namespace("farm")
        lab.link(self.pool_ns, f"{POOL_IP}/24", self.farm_ns, f"{FARM_IP}/24")
        self.pool_state = directory / "pool.json"
        self.miner_state = directory / "miners.json"
        self.socket = directory / "haproxy.sock"
        self.sidecars: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        lab = self.lab
        lab.python(self.pool_ns, "pool", "-m", "tests.netns.roles", "pool", "127.0.0.1", "3333", DIFFICULTY, str(self.pool_state))
        for name in SIDECAR_PORTS:
            self.start_sidecar(name)
        servers = "\n".join(
            f"    server {name} 127.0.0.1:{port} send-proxy-v2 check port {STATUS_PORTS[name]} inter 300ms fall 1 rise 1"
            for name, port in SIDECAR_PORTS.items()
        )
        config = self.directory / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(socket=self.socket, pool_ip=POOL_IP, port=BALANCER_PORT, servers=servers))
        lab.exec(self.pool_ns, "haproxy", "haproxy", "-db", "-f", str(config))
        wait_until(lambda: read_state(self.pool_state), STEP_TIMEOUT, "the pool", lab)
        self.wait_up(*SIDECAR_PORTS)
        lab.python(
            self.farm_ns,
            "proxy",
            "-m",
            "bridge",
            "proxy",
            "--listen",
            "127.0.0.1:3335",
            "--upstream",
            f"stratumrm://{POOL_IP}:{BALANCER_PORT}",
            "--bundle",
            str(self.pki["bundle"]),
            # Behind a balancer the next sidecar is one reconnection away: keep rigs meanwhile.
            "--no-upstream-grace",
            "60",
            "--drain-timeout",
            "0.5",
        )
        lab.python(
            self.farm_ns,
            "miners",
            "-m",
            "tests.netns.roles",
            "miners",
            "stratum+tcp://127.0.0.1:3335",
            "alice",
            PROFILES,
            str(self.miner_state),
        )

    def start_sidecar(self, name: str) -> None:
        port = SIDECAR_PORTS[name]
        pki = self.pki
        self.sidecars[name] = self.lab.python(
            self.pool_ns,
            name,
            "-m",
            "bridge",
            "sidecar",
            "--listen",
            f"0.0.0.0:{port}",
            "--pool",
            "stratum+tcp://127.0.0.1:3333",
            "--cert",
            str(pki["cert"]),
            "--key",
            str(pki["key"]),
            "--ca",
            str(pki["ca"]),
            "--revocations",
            str(pki["revocations"]),
            "--advertise",
            f"{POOL_IP}:{port}",
            "--proxy-protocol-from",
            "127.0.0.1",
            "--http-listen",
            f"127.0.0.1:{STATUS_PORTS[name]}",
            "--drain-timeout",
            "30",
        )

    def wait_up(self, *names: str) -> None:
        wait_until(
            lambda: all(haproxy_servers(self.socket).get(n, {}).get("status") == "UP" for n in names),
            STEP_TIMEOUT,
            f"HAProxy to see {', '.join(names)} up",
            self.lab,
        )

    def holder(self) -> str:
        """The sidecar the proxy's control connection goes to (HAProxy's current sessions)."""

        def find() -> str | None:
            busy = [name for name, row in haproxy_servers(self.socket).items() if row.get("scur", "0") not in ("", "0")]
            return busy[0] if len(busy) == 1 else None

        return wait_until(find, STEP_TIMEOUT, "the proxy's connection to settle on one sidecar", self.lab)

    def miners(self) -> dict[str, dict]:
        state = read_state(self.miner_state)
        return state["miners"] if state else {}

    def wait_new_shares(self, what: str) -> None:
        wait_until(lambda: len(self.miners()) == 3, STEP_TIMEOUT, "the miners to report", self.lab)
        before = {name: len(m["accepted"]) for name, m in self.miners().items()}
        wait_until(
            lambda: all(len(m["accepted"]) > before[n] for n, m in self.miners().items()),
            STEP_TIMEOUT,
            f"a new accepted share at every miner {what}",
            self.lab,
        )

    def tally(self) -> dict[str, dict]:
        """Stop the miners (every verdict in), then compare with the pool."""
        miners_process = next(p for p in self.lab.processes if getattr(p, "log_name", "") == "miners")
        miners_process.send_signal(signal.SIGTERM)
        final = wait_until(
            lambda: (read_state(self.miner_state) or {}).get("final") and read_state(self.miner_state),
            STEP_TIMEOUT,
            "the miners' final tally",
            self.lab,
        )
        written = self.miner_state.stat().st_mtime
        wait_until(lambda: self.pool_state.stat().st_mtime > written + 0.3, STEP_TIMEOUT, "a fresh pool state", self.lab)
        pool = read_state(self.pool_state)
        accepted_at_pool = [tuple(k) for k in pool["accepted"]]
        assert len(set(accepted_at_pool)) == len(accepted_at_pool), "the pool accepted a share twice"
        assert pool["duplicates"] == 0, "a share reached the pool twice"
        for name, miner in final["miners"].items():
            told = {tuple(k) for k in miner["accepted"]}
            assert told <= set(accepted_at_pool), f"{name} was told accepted for shares the pool never got"
            assert miner["pending"] == 0
        return final["miners"]


@pytest.fixture
def pool_farm(netns_reason, netns_pki, tmp_path):
    require(netns_reason, "haproxy")
    assert POOL_IP in SIDECAR_IPS
    lab = Lab(tmp_path)
    try:
        farm = PoolFarm(lab, tmp_path, netns_pki)
        farm.start()
        yield farm
    finally:
        lab.close()


def test_sigkill_of_a_sidecar_moves_the_farm_through_haproxy_without_a_false_accept(pool_farm: PoolFarm) -> None:
    pool_farm.wait_new_shares("at the start")
    victim = pool_farm.holder()
    pool_farm.sidecars[victim].send_signal(signal.SIGKILL)
    pool_farm.wait_new_shares(f"after SIGKILL of {victim}")
    survivor = next(name for name in SIDECAR_PORTS if name != victim)
    assert pool_farm.holder() == survivor
    pool_farm.tally()


def test_a_rolling_restart_drops_no_rig_connection(pool_farm: PoolFarm) -> None:
    pool_farm.wait_new_shares("at the start")
    first = pool_farm.holder()
    order = [first, next(name for name in SIDECAR_PORTS if name != first)]
    for name in order:
        process = pool_farm.sidecars[name]
        process.send_signal(signal.SIGTERM)
        wait_until(lambda p=process: p.poll() is not None, STEP_TIMEOUT, f"{name} to drain and exit", pool_farm.lab)
        assert process.returncode == 0, f"{name} exited with {process.returncode}"
        assert "drained: every proxy moved" in pool_farm.lab.log(name)
        pool_farm.wait_new_shares(f"after {name} drained")
        pool_farm.start_sidecar(name)
        pool_farm.wait_up(name)
    miners = pool_farm.tally()
    for name, miner in miners.items():
        dropped = miner["disconnects"] - miner["reconnect_requests"]
        assert dropped <= 0, f"{name}: {dropped} connections closed without a client.reconnect from the proxy"
        if "bmminer" in name:
            assert miner["disconnects"] == 0, "the #xnsub rig moves with set_extranonce, no reconnect"
