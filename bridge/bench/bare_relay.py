"""The floor for any pair of Python relays: two processes that only copy bytes.

The near relay takes each miner's TCP connection and sends what it reads, as it is, in
one UDP datagram to the far relay; the far relay writes each datagram to the pool over
a TCP connection of its own per miner, and the way back is the same in reverse. No
TLS, no sealing, no parsing, no bookkeeping, no event-loop library: blocking-free
sockets under one ``selectors`` loop per process, the least work a Python relay pair
can do per share. Its shape is StratumRM's (TCP in, UDP across, TCP out; two
processes), so the latency it adds is what any Python implementation of the pair pays
before doing anything. :mod:`bridge.bench.transport` runs it as a reference path
beside the stunnel pair.

Run one side with ``python -m bridge.bench.bare_relay near LISTEN_PORT FAR_PORT`` or
``python -m bridge.bench.bare_relay far LISTEN_PORT POOL_PORT`` (host 127.0.0.1 unless
``--host``); each prints ``ready`` once it listens.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import subprocess
import sys

import trio

from bridge.bench.roles import ProcessPair, free_port

__all__ = ["BarePair", "run_far", "run_near"]

#: Larger than anything the bench sends at once; a longer read is cut into datagrams of this size.
DATAGRAM = 60_000
READY_TIMEOUT = 10.0


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)


def run_near(host: str, listen_port: int, far_port: int) -> None:
    """Miners' TCP in; one connected UDP socket to the far relay per miner."""
    listener = socket.create_server((host, listen_port))
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data is None:
                miner, _ = listener.accept()
                _nodelay(miner)
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                udp.connect((host, far_port))
                udp.setblocking(False)
                selector.register(miner, selectors.EVENT_READ, ("miner", udp))
                selector.register(udp, selectors.EVENT_READ, ("udp", miner))
                continue
            kind, other = key.data
            if kind == "miner":
                data = sock.recv(DATAGRAM)
                if not data:
                    for gone in (sock, other):
                        selector.unregister(gone)
                        gone.close()
                    continue
                other.send(data)
            else:
                other.sendall(sock.recv(DATAGRAM))


def run_far(host: str, listen_port: int, pool_port: int) -> None:
    """UDP from the near relay; one TCP connection to the pool per miner (per source address)."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((host, listen_port))
    udp.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(udp, selectors.EVENT_READ, None)
    pools: dict[tuple[str, int], socket.socket] = {}
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.data is None:
                data, source = udp.recvfrom(DATAGRAM)
                pool = pools.get(source)
                if pool is None:
                    pool = pools[source] = socket.create_connection((host, pool_port))
                    _nodelay(pool)
                    selector.register(pool, selectors.EVENT_READ, source)
                pool.setblocking(True)
                pool.sendall(data)
                pool.setblocking(False)
                continue
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data = sock.recv(DATAGRAM)
            if not data:
                selector.unregister(sock)
                sock.close()
                pools.pop(key.data, None)
                continue
            udp.sendto(data, key.data)


class BarePair(ProcessPair):
    """The two relay processes: miners connect to :attr:`entry_port`; UDP crosses :attr:`link_port`."""

    def __init__(self, host: str, pool_port: int) -> None:
        super().__init__()
        self.host = host
        self.pool_port = pool_port
        self.entry_port = free_port(host=host)
        self.link_port = free_port(socket.SOCK_DGRAM, host=host)

    async def start(self) -> None:
        for side, port, target in (("far", self.link_port, self.pool_port), ("near", self.entry_port, self.link_port)):
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "bridge.bench.bare_relay", side, str(port), str(target), "--host", self.host],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            self.processes.insert(0 if side == "near" else len(self.processes), process)
            assert process.stdout is not None
            with trio.move_on_after(READY_TIMEOUT):
                if (await process.stdout.receive_some(64)).startswith(b"ready"):
                    continue
            raise RuntimeError(f"the bare {side} relay did not start on {self.host}:{port}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.bench.bare_relay", description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["near", "far"])
    parser.add_argument("listen_port", type=int)
    parser.add_argument("target_port", type=int, help="near: the far relay's UDP port; far: the pool's TCP port")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    try:
        (run_near if args.side == "near" else run_far)(args.host, args.listen_port, args.target_port)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
