"""``stratumrm bench pending``: what a connection that has not finished its handshake costs a sidecar.

A reference pool and a sidecar run as child processes (bridge/bench/roles.py), the
sidecar with a long handshake deadline and caps above N. The benchmark opens N TCP
connections to the sidecar's control port and leaves them pending, in two shapes:

- ``silent TCP``: connect, send nothing (a port scanner, a SYN-and-ACK flood);
- ``ClientHello``: send a TLS 1.3 ClientHello and nothing more (the sidecar has
  answered and holds the TLS state of a handshake in progress).

Once the sidecar counts N pending connections (its admission statistics), its resident
memory (VmRSS) is read; minus the RSS before, over N, is the cost per pending
connection. Each shape runs against a fresh sidecar; figures are medians over runs.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import trio

from bridge.bench.measure import median
from bridge.bench.roles import HOST, RoleLauncher, RoleProcess
from bridge.net.admission import DEFAULT_MAX_PENDING
from bridge.net.listen import raise_fd_limit
from bridge.testing.pki import make_test_pki

SHAPES = ("silent TCP", "ClientHello")
#: Connections per source address (the sidecar's per-source cap is set above it).
PER_SOURCE = 64


def client_hello() -> bytes:
    """The bytes of a TLS 1.3 ClientHello (what a client sends first)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname=HOST)
    try:
        connection.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _pending(sidecar: RoleProcess) -> int:
    return int((await sidecar.request("stats"))["sidecar"]["admission"]["pending"])


async def measure(shape: str, count: int, sidecar: RoleProcess, settle: float = 0.5) -> float:
    """Bytes of sidecar RSS per pending connection of ``shape`` (``settle``: seconds for the
    sidecar's memory to settle before each reading)."""
    port = sidecar.ready["port"]
    hello = client_hello() if shape == "ClientHello" else b""
    await trio.sleep(settle)
    before = rss_bytes(sidecar.pid)
    sockets: list[trio.socket.SocketType] = []
    try:
        for index in range(count):
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            await sock.bind((f"127.0.{1 + index // (PER_SOURCE * 250)}.{2 + index // PER_SOURCE % 250}", 0))
            await sock.connect((HOST, port))
            if hello:
                await sock.send(hello)
        with trio.fail_after(120):
            while await _pending(sidecar) < count:
                await trio.sleep(0.1)
            if hello:  # the sidecar has answered every ClientHello: its TLS state exists
                for sock in sockets:
                    await sock.recv(1)
        await trio.sleep(settle)
        return (rss_bytes(sidecar.pid) - before) / count
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True)
class PendingSettings:
    count: int = 500
    runs: int = 3
    settle: float = 0.5
    """Seconds the sidecar's memory is given to settle before each reading."""


async def run(settings: PendingSettings, progress: Callable[[str], None]) -> dict[str, list[float]]:
    raise_fd_limit()
    results: dict[str, list[float]] = {shape: [] for shape in SHAPES}
    with tempfile.TemporaryDirectory(prefix="stratumrm-pending-") as temporary:
        directory = Path(temporary)
        pki = make_test_pki(directory / "pki")
        launcher = RoleLauncher(directory)
        pool = await launcher.start("pool", "pool", ["--listener", "sv1"])
        try:
            for run_index in range(settings.runs):
                for shape in SHAPES:
                    progress(f"[pending] run {run_index + 1} of {settings.runs}: {settings.count} x {shape}")
                    sidecar = await launcher.start(
                        "sidecar",
                        "sidecar",
                        [
                            "--pool",
                            f"stratum+tcp://{HOST}:{pool.ready['ports']['sv1']}",
                            "--cert",
                            str(pki.pool_certificate),
                            "--key",
                            str(pki.pool_key),
                            "--ca",
                            str(pki.ca_certificate),
                            "--handshake-timeout",
                            "600",
                            "--max-pending",
                            str(settings.count + 64),
                            "--max-pending-per-source",
                            str(PER_SOURCE),
                        ],
                    )
                    try:
                        results[shape].append(await measure(shape, settings.count, sidecar, settings.settle))
                    finally:
                        await sidecar.stop()
        finally:
            await pool.stop()
    return results


def report(settings: PendingSettings, results: dict[str, list[float]]) -> str:
    lines = [
        f"Sidecar memory per pending connection (not past its TLS handshake), {settings.count} connections,",
        f"median of {settings.runs} runs",
        "",
        f"{'pending connection':<20} {'RSS per connection':>19} {f'at --max-pending {DEFAULT_MAX_PENDING}':>22}",
    ]
    for shape in SHAPES:
        per = median(results[shape])
        lines.append(f"{shape:<20} {per / 1024:>16.1f} KiB {per * DEFAULT_MAX_PENDING / 2**20:>18.1f} MiB")
    lines += ["", "Each also holds one file descriptor until its handshake deadline (--handshake-timeout)."]
    return "\n".join(lines)


@click.command("pending")
@click.option("--count", type=click.IntRange(10, 20_000), default=500, show_default=True, help="Pending connections to open.")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="Runs to take medians over.")
@click.option(
    "--settle",
    type=click.FloatRange(0.0, 10.0),
    default=0.5,
    show_default=True,
    help="Seconds for the sidecar's memory to settle before each reading.",
)
def command(count: int, runs: int, settle: float) -> None:
    """Memory a sidecar spends per connection that has not finished its TLS handshake."""
    from bridge.bench.command import _progress_printer, _run

    settings = PendingSettings(count, runs, settle)
    click.echo(report(settings, _run(lambda: run(settings, _progress_printer()))))
