"""The child processes of ``stratumrm bench flood``: a flooder and a read-only sink.

Apart from bridge/bench/flood.py so that a spawned child imports the standard library
only (not trio, msgspec, the PKI ...): it starts in a fraction of the time.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Any


def flood_worker(host: str, port: int, payloads: list[bytes], stop: Any, sent: Any) -> None:
    """A child process: send ``payloads`` round and round to ``port`` until ``stop`` is set."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    address = (host, port)
    sendto = sock.sendto
    total = 0
    while not stop.is_set():
        for payload in payloads:
            try:
                sendto(payload, address)
            except OSError:
                pass  # a full send buffer: the datagram is lost, as on a real link
        total += len(payloads)
        sent.value = total
    sock.close()


def sink_worker(host: str, port_out: Any, seconds: float, result: Any) -> None:
    """A child process: read and discard datagrams for ``seconds``; report (count, CPU seconds)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    port_out.value = sock.getsockname()[1]
    recvfrom = sock.recvfrom
    while not select.select([sock], [], [], 10.0)[0]:
        pass
    count = 0
    started, cpu = time.monotonic(), time.process_time()
    while time.monotonic() - started < seconds:
        select.select([sock], [], [], 0.1)
        for _ in range(256):
            try:
                recvfrom(2048)
            except BlockingIOError:
                break
            count += 1
    result[0], result[1] = count, time.process_time() - cpu
    sock.close()
