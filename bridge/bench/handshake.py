"""Micro-benchmark: the control channel's TLS 1.3 handshake, full versus resumed.

What a proxy pays to (re)connect to a sidecar, measured on 127.0.0.1 with the real
contexts: :class:`~bridge.pki.rotation.ServerCredentials` on the sidecar side (the
post-handshake :func:`~bridge.pki.tls.check_miner_peer` included, as the sidecar runs it
after every handshake) and a bundle's :class:`~bridge.pki.rotation.ClientCredentials`
on the proxy side, ``TCP_NODELAY`` on both ends. One sample is TCP connect + TLS
handshake + the first byte read back (TLS 1.3 finishes client authentication there),
with both ends in this one process, so it counts the CPU of both sides.

Full and resumed connections alternate; each resumed one offers the session the
connection before it received (taken after its first read, when the tickets are in).
A certificate of each key type the CA can issue is measured (P-256, Ed25519), and so
is the sidecar's post-handshake check alone (parse the peer certificate, role,
validity, issuing CA), which every handshake pays, resumed ones included.

Resumption saves the certificate signatures and their verification, not round trips:
on a WAN both cost TCP 1 RTT + TLS 1 RTT.
"""

from __future__ import annotations

import functools
import platform
import ssl
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from bridge.net.tcp import tune_stream
from bridge.pki.authority import CertificateAuthority
from bridge.pki.issuing import KeyType
from bridge.pki.rotation import ClientCredentials, ServerCredentials
from bridge.pki.tls import check_miner_peer

KEY_TYPES: tuple[KeyType, ...] = ("p256", "ed25519")
KEY_TYPE_NAMES = {"p256": "P-256", "ed25519": "Ed25519"}
WARMUP = 5
HOST = "127.0.0.1"


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))],
        "min": ordered[0],
    }


async def _measure_key_type(directory: Path, key_type: KeyType, repeats: int) -> dict[str, Any]:
    authority = CertificateAuthority.create(directory, key_type=key_type)
    pool = authority.issue_pool("bench-sidecar", ip_addresses=[HOST], key_type=key_type)
    miner = authority.issue_miner("bench-proxy", accounts=["bench"], key_type=key_type)
    assert pool.pool_certificate_path and pool.key_path and miner.bundle_path
    server = ServerCredentials(pool.pool_certificate_path, pool.key_path, authority.ca_certificate_path)
    client = ClientCredentials.from_bundle(miner.bundle_path)
    peer_der: list[bytes] = []

    async def serve_one(tcp: trio.SocketStream) -> None:
        tune_stream(tcp)
        tls = trio.SSLStream(tcp, server.context, server_side=True)
        try:
            await tls.do_handshake()
            check_miner_peer(tls, None, now=datetime.now(UTC), cas=server.ca_certificates)
            if not peer_der:
                peer_der.append(tls.getpeercert(binary_form=True))
            await tls.send_all(b"\n")
            await tls.receive_some(1)  # until the client closes
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(tls)

    async def connect(session: ssl.SSLSession | None) -> tuple[float, bool, ssl.SSLSession | None]:
        started = time.perf_counter()
        tcp = await trio.open_tcp_stream(HOST, port)
        tune_stream(tcp)
        tls = trio.SSLStream(tcp, client.context, server_hostname=HOST)
        if session is not None:
            tls.session = session
        await tls.do_handshake()
        await tls.receive_some(1)
        elapsed = time.perf_counter() - started
        reused, new_session = tls.session_reused, tls.session
        await trio.aclose_forcefully(tls)
        return elapsed, reused, new_session

    full: list[float] = []
    resumed: list[float] = []
    reused_count = 0
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, serve_one, 0, host=HOST))
        port = listeners[0].socket.getsockname()[1]
        session = None
        for _ in range(WARMUP):
            _elapsed, _reused, session = await connect(session)
        for _ in range(repeats):
            elapsed, _reused, session = await connect(None)
            full.append(elapsed * 1e3)
            elapsed, reused, session = await connect(session)
            resumed.append(elapsed * 1e3)
            reused_count += reused
        nursery.cancel_scope.cancel()
    return {
        "full_ms": _summary(full),
        "resumed_ms": _summary(resumed),
        "resumed": reused_count,
        "repeats": repeats,
        "peer_check_us": _time_peer_check(peer_der[0], server),
    }


class _Peer:
    """Stands in for the TLS stream: the check only asks for the peer's DER certificate."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der


def _time_peer_check(der: bytes, server: ServerCredentials, calls: int = 1000) -> float:
    """Median microseconds of the sidecar's post-handshake certificate check."""
    peer = _Peer(der)
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            check_miner_peer(peer, None, now=datetime.now(UTC), cas=server.ca_certificates)
        samples.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(samples)


async def measure(repeats: int = 200, key_types: tuple[KeyType, ...] = KEY_TYPES) -> dict[str, Any]:
    """:func:`run` inside a running trio loop."""
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "repeats": repeats,
    }
    with tempfile.TemporaryDirectory(prefix="stratumrm-bench-") as directory:
        for key_type in key_types:
            results[key_type] = await _measure_key_type(Path(directory) / key_type, key_type, repeats)
    return results


def run(repeats: int = 200) -> dict[str, Any]:
    """Measure ``repeats`` full and ``repeats`` resumed handshakes per key type.

    Returns ``{"python": ..., "openssl": ..., "repeats": N, "p256": {...}, "ed25519": {...}}``;
    per key type ``full_ms`` and ``resumed_ms`` (median, p90, min in milliseconds),
    ``resumed`` (how many of the resumption attempts did resume) and ``peer_check_us``
    (the sidecar's post-handshake certificate check, median microseconds).
    """
    return trio.run(measure, repeats)


def report(results: dict[str, Any]) -> str:
    """The results as a small table."""
    lines = [
        "TLS 1.3 mutual-certificate handshake, proxy -> sidecar on 127.0.0.1 (TCP connect + handshake + "
        "first read, both ends in one process)",
        f"median (p90) of {results['repeats']} each, python {results['python']}, {results['openssl']}",
    ]
    rows = [("key", "full", "resumed", "saved", "resumed/tried", "sidecar peer check")]
    for key_type in KEY_TYPES:
        figures = results.get(key_type)
        if figures is None:
            continue
        full, resumed = figures["full_ms"], figures["resumed_ms"]
        saved = 1 - resumed["median"] / full["median"] if full["median"] else 0.0
        rows.append(
            (
                KEY_TYPE_NAMES[key_type],
                f"{full['median']:.2f} ms ({full['p90']:.2f})",
                f"{resumed['median']:.2f} ms ({resumed['p90']:.2f})",
                f"{saved:.0%}",
                f"{figures['resumed']}/{figures['repeats']}",
                f"{figures['peer_check_us']:.0f} µs",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(run()))
