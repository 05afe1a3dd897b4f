"""The stunnel pair the transport benchmark compares StratumRM with: real stunnel, real TLS 1.3."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import trio

from bridge.bench.stunnel import StunnelPair, stunnel_binary
from bridge.testing.miner import Miner
from bridge.testing.pki import make_test_pki
from bridge.testing.pool import PoolConfig, ReferencePool


def _tls_version(port: int, ca: Path) -> str | None:
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as tls:
        return tls.version()


async def test_shares_cross_the_stunnel_pair_in_tls_and_get_the_pools_verdicts(tmp_path: Path) -> None:
    if stunnel_binary() is None:
        pytest.skip("stunnel is not installed (tests/setup-system.sh installs stunnel4)")
    pki = make_test_pki(tmp_path / "pki", accounts=("bench",))
    async with trio.open_nursery() as nursery:
        pool = ReferencePool(PoolConfig(difficulty=0.00001))
        pool_port = await nursery.start(pool.serve, "127.0.0.1", 0)
        pair = StunnelPair(tmp_path / "stunnel", "127.0.0.1", pool_port, pki.pool_certificate, pki.pool_key, pki.ca_certificate)
        await pair.start()
        try:
            miner = Miner(f"stratum+tcp://127.0.0.1:{pair.entry_port}", "bench.rig", profile="cgminer", max_shares=3)
            with trio.fail_after(30):
                await miner.run()
            assert len(miner.accepted) == 3 and len(pool.accepted) == 3
            assert set(pair.pids) == {"proxy", "sidecar"} and all(pid > 0 for pid in pair.pids.values())
            # The link between the two stunnels is TLS 1.3 with the pool's certificate from the CA.
            version = await trio.to_thread.run_sync(_tls_version, pair.link_port, pki.ca_certificate)
            assert version == "TLSv1.3"
        finally:
            await pair.stop()
        nursery.cancel_scope.cancel()
