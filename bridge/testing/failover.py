"""A failover bench on 127.0.0.1: reference pools on one chain, optional sidecars, one proxy.

reference pool 0 (primary)  <-SV1-----------------------------\\
reference pool 1 (backup)   <-SV1-  [sidecar  <=StratumRM=]  miner proxy  <-SV1-  rigs
...

Every pool has its own coinbase tag (``/pool0/``, ``/pool1/`` …), so a rig (or the
benchmark) can tell from ``coinb1`` which pool a job came from, and the pools
share one chain: they start on the same block and :meth:`FailoverBench.new_block`
moves them all on together, except those left ``lagging``. The pools'
failure modes do the rest: :meth:`~bridge.testing.pool.ReferencePool.kill`
(every connection reset, no longer listening), ``stall`` (a blackhole: sockets
open, nothing read or sent), ``stop_jobs``; :meth:`FailoverBench.restore` brings a
killed pool back on its port.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bridge.config import UpstreamEntry, parse_upstream_url
from bridge.mining.share import prevhash_from_header
from bridge.net.miner_proxy import MinerProxy
from bridge.net.sidecar import SidecarServer
from bridge.relay.failover import FailoverConfig
from bridge.testing.pool import PoolConfig, ReferencePool


def pool_tag(index: int) -> str:
    return f"/pool{index}/"


def tag_hex(index: int) -> str:
    """How pool ``index``'s coinbase tag appears in ``coinb1`` (hex)."""
    return pool_tag(index).encode().hex()


@dataclass
class FailoverBench:
    nursery: trio.Nursery
    pools: list[ReferencePool]
    pool_ports: list[int]
    sidecars: dict[int, SidecarServer]
    proxy: MinerProxy
    proxy_port: int
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def miner_url(self, xnsub: bool = False) -> str:
        return f"stratum+tcp://127.0.0.1:{self.proxy_port}" + ("#xnsub" if xnsub else "")

    def new_block(self, lagging: Sequence[int] = ()) -> str:
        """A new block on the shared chain, announced by every pool not in ``lagging``."""
        prevhash = prevhash_from_header(self.rng.randbytes(24) + bytes(8))
        for index, pool in enumerate(self.pools):
            if index not in lagging:
                pool.new_block(prevhash)
        return prevhash

    def catch_up(self, index: int) -> None:
        """A lagging pool announces the block the others are on."""
        self.pools[index].new_block(self.pools[0 if index else 1].prevhash)

    async def restore(self, index: int) -> None:
        """Serve a killed pool again on its port."""
        await self.nursery.start(self.pools[index].serve, "127.0.0.1", self.pool_ports[index])


async def start_failover_bench(
    nursery: trio.Nursery,
    *,
    pools: int = 2,
    stratumrm: Sequence[int] = (),
    pki_dir: Path | None = None,
    accounts: tuple[str, ...] = ("alice",),
    pool_config: PoolConfig | None = None,
    failover: FailoverConfig | None = None,
    priorities: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    **proxy_options: Any,
) -> FailoverBench:
    """Start ``pools`` reference pools (those in ``stratumrm`` behind a sidecar) and a proxy."""
    base = pool_config or PoolConfig(difficulty=0.00005, notify_interval=5.0)
    started: list[ReferencePool] = []
    ports: list[int] = []
    for index in range(pools):
        config = PoolConfig(**{**_fields(base), "coinbase_tag": pool_tag(index), "seed": 1000 + index})
        pool = ReferencePool(config)
        if started:
            pool.new_block(started[0].prevhash)  # one chain
        ports.append(await nursery.start(pool.serve, "127.0.0.1", 0))
        started.append(pool)
    sidecars: dict[int, SidecarServer] = {}
    client_context = None
    if stratumrm:
        from bridge.testing.pki import make_test_pki

        if pki_dir is None:
            raise ValueError("a StratumRM upstream needs pki_dir for its throwaway CA")
        pki = make_test_pki(pki_dir, accounts=accounts)
        client_context = pki.client_context()
        for index in stratumrm:
            sidecar = SidecarServer(parse_upstream_url(f"stratum+tcp://127.0.0.1:{ports[index]}"), pki.server_context())
            await nursery.start(sidecar.serve, "127.0.0.1", 0)
            sidecars[index] = sidecar
    entries = []
    for index in range(pools):
        if index in sidecars:
            sidecar_port = sidecars[index].port
            url = parse_upstream_url(f"stratumrm://127.0.0.1:{sidecar_port}")
        else:
            url = parse_upstream_url(f"stratum+tcp://127.0.0.1:{ports[index]}")
        entries.append(
            UpstreamEntry(
                url,
                priorities[index] if priorities is not None else index,
                weights[index] if weights is not None else 1.0,
                f"pool{index}" + ("-rm" if index in sidecars else ""),
            )
        )
    proxy = MinerProxy(entries, upstream_ssl_context=client_context, failover=failover, **proxy_options)
    proxy_port = await nursery.start(proxy.serve, "127.0.0.1", 0)
    return FailoverBench(nursery, started, ports, sidecars, proxy, proxy_port)


def _fields(config: PoolConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__struct_fields__}
