"""The management port of both roles on the real chain: metrics, API and health follow the shares.

reference miner -> proxy -> sidecar -> reference pool, each share hashed and
validated for real; the proxy's and the sidecar's management ports are scraped
while shares flow, and the Prometheus exposition is read with prometheus-client's
own parser.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import parse_upstream_url
from bridge.net.proxy_service import ProxyService
from bridge.net.sidecar import SidecarServer
from bridge.stats.status import fetch_status
from bridge.testing.chain import start_chain
from bridge.testing.miner import Miner
from bridge.testing.pki import make_test_pki
from bridge.testing.pool import PoolConfig
from bridge.web.app import ManagementApp
from bridge.web.roles import SidecarView

WAIT = 60.0


def get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def fetch(url: str) -> tuple[int, bytes]:
    return await trio.to_thread.run_sync(get, url)


async def api(base: str, path: str) -> Any:
    status, body = await fetch(base + path)
    assert status == 200, (path, status, body)
    return json.loads(body)


async def metrics(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``, parsed by prometheus-client: (name, labels) -> value."""
    status, body = await fetch(base + "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


#: ~8,600 hashes per share.
DIFFICULTY = 0.000002


async def until(check: Callable[[], Any], what: str) -> None:
    """Wait (event-driven polling, generous deadline) until ``await check()`` is true."""
    with trio.fail_after(WAIT):
        while not await check():
            await trio.sleep(0.1)


async def test_metrics_api_and_health_follow_shares_on_both_roles(tmp_path) -> None:
    async with trio.open_nursery() as nursery:
        # nbits 207fffff (regtest): every share is a block candidate, sent urgently and counted on both roles
        chain = await start_chain(
            nursery, tmp_path, accounts=("web",), pool_config=PoolConfig(difficulty=DIFFICULTY, nbits="207fffff")
        )
        service = ProxyService(chain.proxy, metrics_per_worker=True)
        proxy_port = await nursery.start(service.web.serve, "127.0.0.1", 0)
        sidecar_web = ManagementApp(SidecarView(chain.sidecar, metrics_per_worker=True))
        sidecar_port = await nursery.start(sidecar_web.serve, "127.0.0.1", 0)
        proxy_base, sidecar_base = f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{sidecar_port}"

        before = await metrics(proxy_base)
        assert value(before, "stratumrm_rigs_connected") == 0
        assert value(before, "stratumrm_shares_accepted_total") == 0
        assert value(before, "stratumrm_ready") == 1 and value(before, "stratumrm_process_open_fds") > 0

        chain.pool.reject_next(1, 23)
        # ~9 shares/s, as 400 kH/s at difficulty 0.00001 gave, for a fifth of the hashing
        miner = Miner(chain.miner_url, "web.rig1", profile="cgminer", hashrate=80_000)
        nursery.start_soon(miner.run)

        seen: dict[str, dict] = {}

        async def flowing() -> bool:
            seen["proxy"] = await metrics(proxy_base)
            seen["sidecar"] = await metrics(sidecar_base)
            return (
                value(seen["proxy"], "stratumrm_shares_accepted_total") >= 3
                and value(seen["sidecar"], "stratumrm_shares_accepted_total") >= 3
                and value(seen["proxy"], "stratumrm_hashrate_hashes_per_second") > 0
            )

        await until(flowing, "shares accepted on both roles")
        proxy, sidecar = seen["proxy"], seen["sidecar"]
        assert value(proxy, "stratumrm_rigs_connected") == 1 and value(sidecar, "stratumrm_rigs_connected") == 1
        assert value(proxy, "stratumrm_shares_rejected_total", reason="low-difficulty") == 1
        assert value(sidecar, "stratumrm_shares_rejected_total", reason="low-difficulty") == 1
        assert value(proxy, "stratumrm_shares_submitted_total") >= 4
        assert value(proxy, "stratumrm_sessions_active") == 1 and value(sidecar, "stratumrm_sessions_active") == 1
        link = next(labels for (name, labels) in proxy if name == "stratumrm_datagrams_sent_total")
        assert value(proxy, "stratumrm_datagrams_sent_total", **dict(link)) > 0
        assert value(sidecar, "stratumrm_datagrams_received_total") > 0
        assert value(sidecar, "stratumrm_datagrams_dropped_total", reason="replay") == 0
        assert value(proxy, "stratumrm_datagrams_received_total", **dict(link)) > 0  # VERDICT datagrams
        assert value(sidecar, "stratumrm_datagrams_sent_total") > 0
        assert value(proxy, "stratumrm_block_candidates_total", **dict(link)) >= 3
        assert value(sidecar, "stratumrm_block_candidates_total") >= 3
        assert value(sidecar, "stratumrm_pool_up") == 1
        assert value(proxy, "stratumrm_upstream_active", **dict(link)) == 1
        assert value(proxy, "stratumrm_worker_shares_accepted_total", worker="web.rig1") >= 3
        expiry = [labels for (name, labels) in sidecar if name == "stratumrm_certificate_days_left"]
        assert {dict(labels)["use"] for labels in expiry} == {"connected proxy"}  # the chain gives bare contexts

        # The counters move as more shares flow.
        accepted = value(proxy, "stratumrm_shares_accepted_total")

        async def more() -> bool:
            return value(await metrics(proxy_base), "stratumrm_shares_accepted_total") >= accepted + 2

        await until(more, "more shares accepted")

        [rig] = await api(proxy_base, "/api/v1/rigs")
        assert rig["workers"] == ["web.rig1"] and rig["accepted"] >= accepted + 2 and rig["hashrate"] > 0
        assert rig["difficulty"] == DIFFICULTY and rig["upstream"]
        [sidecar_rig] = await api(sidecar_base, "/api/v1/rigs")
        assert sidecar_rig["workers"] == ["web.rig1"] and sidecar_rig["accepted"] >= 3
        [upstream] = await api(proxy_base, "/api/v1/upstreams")
        assert upstream["active"] and upstream["state"] == "up" and upstream["udp"] is True
        [session] = await api(sidecar_base, "/api/v1/sessions")
        assert session["accepted"] >= 3
        [link] = await api(proxy_base, "/api/v1/sessions")
        assert link["accepted"] is None and link["rejected"] is None  # not a false 0: counted per rig
        assert session["accounts"] == ["web"] and session["channels"] == 2  # the rig and the proxy's probe
        certificates = await api(sidecar_base, "/api/v1/certificates")
        assert [c["certificate"]["accounts"] if "accounts" in c["certificate"] else c["use"] for c in certificates] == [
            "connected proxy"
        ]
        health = await api(proxy_base, "/api/v1/health")
        assert health["role"] == "proxy" and health["ready"] and not health["draining"]
        document = await trio.to_thread.run_sync(partial(fetch_status, sidecar_base))
        assert document["role"] == "sidecar" and document["statistics"]["accepted"] >= 3

        # Health checks: alive and ready; draining (SIGTERM) makes /readyz refuse.
        assert (await fetch(proxy_base + "/healthz"))[0] == 200
        assert (await fetch(proxy_base + "/readyz"))[0] == 200
        service.web.draining = True
        status, body = await fetch(proxy_base + "/readyz")
        assert status == 503 and "draining" in json.loads(body)["reason"]
        assert (await fetch(proxy_base + "/healthz"))[0] == 200
        nursery.cancel_scope.cancel()


async def test_readyz_refuses_while_the_pool_is_down(tmp_path) -> None:
    pki = make_test_pki(tmp_path, accounts=("web",))
    with socket.socket() as unused:  # a pool address nothing listens on
        unused.bind(("127.0.0.1", 0))
        pool_port = unused.getsockname()[1]
    sidecar = SidecarServer(parse_upstream_url(f"stratum+tcp://127.0.0.1:{pool_port}"), pki.server_context())
    async with trio.open_nursery() as nursery:
        await nursery.start(sidecar.serve, "127.0.0.1", 0)
        web = ManagementApp(SidecarView(sidecar))
        base = f"http://127.0.0.1:{await nursery.start(web.serve, '127.0.0.1', 0)}"
        assert (await fetch(base + "/healthz"))[0] == 200
        assert (await fetch(base + "/readyz"))[0] == 200  # presumed up until a pool connection fails
        sidecar.pool_watch.suspect("a rig's pool connection was refused")  # what a failing channel does

        async def refused() -> bool:
            status, body = await fetch(base + "/readyz")
            return status == 503 and "pool down" in json.loads(body)["reason"]

        await until(refused, "readyz 503 with the pool down")
        assert value(await metrics(base), "stratumrm_ready") == 0
        nursery.cancel_scope.cancel()
