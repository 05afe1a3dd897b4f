"""Transparent interception at a farm gateway, with the kernel's own redirect.

Farm namespace: reference miners configured with the pool's own address. Gateway
namespace (the farm's router): an nftables ``redirect`` sends their connections to
the pool's ports into ``stratumrm proxy``, whose ``[[intercept]]`` maps the pool's
address to a StratumRM sidecar next to the pool; ``intercept_default = "pass"``
carries a destination no rule names to where it was going, untouched. Pool
namespace: the pool (two ports) and the sidecar.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.netns.conftest import SIDECAR_IPS, copy_pki, require
from tests.netns.netlib import Lab, read_state, run, wait_until
from tests.netns.roles import DIFFICULTY

FARM_IP, GATEWAY_FARM_IP = "10.214.1.2", "10.214.1.1"
GATEWAY_POOL_IP, POOL_IP = "10.214.2.1", "10.214.2.2"
STEP_TIMEOUT = 60.0

NFT_RULES = """\
table ip stratumrm {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {pool} tcp dport {{ 3333, 3336 }} redirect to :3335
    }}
}}
"""


@pytest.fixture
def lab(netns_reason, tmp_path):
    require(netns_reason, "nft")
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def test_a_gateway_redirect_sends_an_unmodified_rig_through_stratumrm(lab: Lab, netns_pki: Path, tmp_path: Path) -> None:
    assert POOL_IP in SIDECAR_IPS
    pki = copy_pki(netns_pki, tmp_path / "pki")
    farm, gateway, pool = lab.namespace("farm"), lab.namespace("gw"), lab.namespace("pool")
    lab.link(farm, f"{FARM_IP}/24", gateway, f"{GATEWAY_FARM_IP}/24")
    lab.link(gateway, f"{GATEWAY_POOL_IP}/24", pool, f"{POOL_IP}/24")
    lab.route(farm, "default", GATEWAY_FARM_IP)
    lab.route(pool, "10.214.1.0/24", GATEWAY_POOL_IP)
    run("ip", "netns", "exec", gateway, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    rules = tmp_path / "gateway.nft"
    rules.write_text(NFT_RULES.format(pool=POOL_IP))
    run("ip", "netns", "exec", gateway, "nft", "-f", str(rules))

    states = {name: tmp_path / f"{name}.json" for name in ("pool", "pool2", "intercepted", "passed")}
    lab.python(pool, "pool", "-m", "tests.netns.roles", "pool", "0.0.0.0", "3333", DIFFICULTY, str(states["pool"]))
    lab.python(pool, "pool2", "-m", "tests.netns.roles", "pool", "0.0.0.0", "3336", DIFFICULTY, str(states["pool2"]))
    lab.python(
        pool,
        "sidecar",
        "-m",
        "bridge",
        "sidecar",
        "--listen",
        f"{POOL_IP}:3334",
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
    )
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'listen = "0.0.0.0:3335"\nbundle = "{pki["bundle"]}"\nintercept_default = "pass"\n\n'
        f'[[intercept]]\nmatch = "{POOL_IP}:3333"\nupstream = "stratumrm://{POOL_IP}:3334"\n'
    )
    lab.python(gateway, "proxy", "-m", "bridge", "proxy", "--config", str(config))
    wait_until(lambda: read_state(states["pool"]) and read_state(states["pool2"]), STEP_TIMEOUT, "the pools", lab)
    wait_until(lambda: "accepting redirected rigs" in lab.log("proxy"), STEP_TIMEOUT, "the proxy", lab)
    wait_until(lambda: "sidecar listening" in lab.log("sidecar"), STEP_TIMEOUT, "the sidecar", lab)

    # The rigs keep the pool's address: one to the port a rule names, one to another.
    intercepted = lab.python(
        farm,
        "intercepted",
        "-m",
        "tests.netns.roles",
        "miners",
        f"stratum+tcp://{POOL_IP}:3333",
        "alice",
        "cgminer",
        str(states["intercepted"]),
    )
    passed = lab.python(
        farm,
        "passed",
        "-m",
        "tests.netns.roles",
        "miners",
        f"stratum+tcp://{POOL_IP}:3336",
        "alice",
        "cpuminer",
        str(states["passed"]),
    )

    def accepted(name: str) -> int:
        state = read_state(states[name]) or {"miners": {}}
        return min((len(m["accepted"]) for m in state["miners"].values()), default=0)

    wait_until(
        lambda: accepted("intercepted") >= 2 and accepted("passed") >= 2, STEP_TIMEOUT, "accepted shares at both rigs", lab
    )
    for process in (intercepted, passed):
        process.send_signal(signal.SIGTERM)
    finals = {}
    for name in ("intercepted", "passed"):
        finals[name] = wait_until(
            lambda n=name: (read_state(states[n]) or {}).get("final") and read_state(states[n]),
            STEP_TIMEOUT,
            f"the {name} rig's final tally",
            lab,
        )
    written = max(states[n].stat().st_mtime for n in ("intercepted", "passed"))
    wait_until(
        lambda: min(states[n].stat().st_mtime for n in ("pool", "pool2")) > written + 0.3, STEP_TIMEOUT, "fresh pool states", lab
    )
    for rig, pool_name in (("intercepted", "pool"), ("passed", "pool2")):
        at_pool = {tuple(k) for k in read_state(states[pool_name])["accepted"]}
        for miner in finals[rig]["miners"].values():
            told = {tuple(k) for k in miner["accepted"]}
            assert told and told <= at_pool, f"the {rig} rig's accepted shares are not all at {pool_name}"
    proxy_log, sidecar_log = lab.log("proxy"), lab.log("sidecar")
    assert f"to {POOL_IP}:3333: relayed through stratumrm://{POOL_IP}:3334" in proxy_log
    assert f"to {POOL_IP}:3336: passed through untouched" in proxy_log
    assert f"opened for rig {FARM_IP}:" in sidecar_log, "the sidecar sees the rig's own address"
