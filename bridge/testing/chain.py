"""The whole StratumRM chain on 127.0.0.1, for the demo, tests and benchmarks.

reference pool  <-SV1-  sidecar  <=TLS control=  miner proxy  <-SV1-  rigs
                          ^------ UDP shares ------ (optional lossy link)

Certificates come from a throwaway CA made with :func:`bridge.testing.pki.make_test_pki`.
With any impairment (loss, duplicates, reordering, delay) the proxy's UDP flow
goes through a :class:`~bridge.testing.lossy_link.LossyLink`; the sidecar
advertises the link's port in its hello, exactly as a sidecar behind NAT
advertises its public address.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trio

from bridge.config import parse_upstream_url
from bridge.net.miner_proxy import MinerProxy
from bridge.net.sidecar import SidecarServer
from bridge.testing.lossy_link import LossyLink
from bridge.testing.pki import make_test_pki
from bridge.testing.pool import PoolConfig, ReferencePool


@dataclass
class Chain:
    pool: ReferencePool
    sidecar: SidecarServer
    proxy: MinerProxy
    link: LossyLink | None
    proxy_port: int

    @property
    def miner_url(self) -> str:
        return f"stratum+tcp://127.0.0.1:{self.proxy_port}"


async def start_chain(
    nursery: trio.Nursery,
    pki_dir: Path,
    *,
    pool_config: PoolConfig | None = None,
    accounts: tuple[str, ...] = ("demo",),
    loss: float = 0.0,
    duplicate: float = 0.0,
    reorder: float = 0.0,
    delay_ms: float = 0.0,
    seed: int | None = 1,
    submit_timeout: float = 60.0,
    share_batch_window: float = 0.0,
) -> Chain:
    """Start pool, sidecar, (lossy link,) and proxy in ``nursery``; return the handles."""
    pki = make_test_pki(pki_dir, accounts=accounts)
    pool = ReferencePool(pool_config or PoolConfig(difficulty=0.0001))
    pool_port = await nursery.start(pool.serve, "127.0.0.1", 0)
    sidecar = SidecarServer(parse_upstream_url(f"stratum+tcp://127.0.0.1:{pool_port}"), pki.server_context())
    sidecar_port = await nursery.start(sidecar.serve, "127.0.0.1", 0)
    link = None
    if loss or duplicate or reorder or delay_ms:
        assert sidecar.udp_port is not None
        link = LossyLink(
            "127.0.0.1",
            0,
            ("127.0.0.1", sidecar.udp_port),
            loss=loss,
            duplicate=duplicate,
            reorder=reorder,
            delay_ms=delay_ms,
            seed=seed,
        )
        sidecar.advertise_port = await nursery.start(link.serve)
    proxy = MinerProxy(
        parse_upstream_url(f"stratumrm://127.0.0.1:{sidecar_port}"),
        upstream_ssl_context=pki.client_context(),
        submit_timeout=submit_timeout,
        share_batch_window=share_batch_window,
    )
    proxy_port = await nursery.start(proxy.serve, "127.0.0.1", 0)
    return Chain(pool, sidecar, proxy, link, proxy_port)
