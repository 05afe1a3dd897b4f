"""The roles on real sockets in one trio run on a thread, for tests that attack every port.

pool <-SV1- sidecar <=TLS control + UDP= proxy <-SV1- one honest reference miner, and
the sidecar's status port. The tests talk to the ports with plain blocking sockets from
the test thread (hypothesis drives them), and reach into the roles through
:meth:`Stack.call`, which runs a function in the trio thread. If anything a test sent
ended the trio run, :meth:`Stack.check_alive` says so with the exception.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from bridge.config import parse_upstream_url
from bridge.net.miner_proxy import MinerProxy
from bridge.net.sidecar import SidecarServer
from bridge.testing.miner import Miner
from bridge.testing.pki import TestPKI
from bridge.testing.pool import PoolConfig, ReferencePool
from bridge.web.app import ManagementApp
from bridge.web.roles import SidecarView

HOST = "127.0.0.1"
#: Generous: the machine is shared with other test runs. Waits end as soon as their condition holds.
WAIT = 60.0
HELLO = b'{"id":1,"method":"rm.hello","params":{"version":1,"features":[],"agent":"honest"}}\n'

T = TypeVar("T")


class Stack:
    """The running roles; see the module docs."""

    def __init__(self, pki: TestPKI) -> None:
        self.pki = pki
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, name="roles", daemon=True)
        self.pool: ReferencePool
        self.sidecar: SidecarServer
        self.proxy: MinerProxy
        self.status: ManagementApp
        self.miner: Miner
        self.proxy_port = self.sidecar_port = self.udp_port = self.status_port = 0

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(WAIT):
            raise AssertionError("the roles did not start")
        self.check_alive()

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            self.pool = ReferencePool(PoolConfig(difficulty=2e-7))
            pool_port = await nursery.start(self.pool.serve, HOST, 0)
            self.sidecar = SidecarServer(
                parse_upstream_url(f"stratum+tcp://{HOST}:{pool_port}"),
                self.pki.server_context(),
                max_connections_per_cert=None,
            )
            self.sidecar_port = await nursery.start(self.sidecar.serve, HOST, 0)
            assert self.sidecar.udp_port is not None
            self.udp_port = self.sidecar.udp_port
            self.status = ManagementApp(SidecarView(self.sidecar), containment=self.sidecar.containment)
            self.status_port = await nursery.start(self.status.serve, HOST, 0)
            self.proxy = MinerProxy(
                parse_upstream_url(f"stratumrm://{HOST}:{self.sidecar_port}"),
                upstream_ssl_context=self.pki.client_context(),
            )
            self.proxy_port = await nursery.start(self.proxy.serve, HOST, 0)
            self.miner = Miner(f"stratum+tcp://{HOST}:{self.proxy_port}", "honest.rig1", hashrate=20_000, reconnect_delay=0.2)
            nursery.start_soon(self.miner.run)
            self._ready.set()

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` in the roles' trio thread."""
        self.check_alive()
        return trio.from_thread.run_sync(function, *args, trio_token=self._token)

    def check_alive(self) -> None:
        if self.error is not None or not self._thread.is_alive():
            raise AssertionError(f"the roles' trio run ended: {self.error!r}") from self.error

    def stop(self) -> None:
        if self._thread.is_alive() and self._cancel is not None:
            trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(WAIT)

    # ------------------------------------------------------------------ waiting

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Poll ``condition`` in the trio thread until it holds (fails after WAIT seconds)."""
        deadline = time.monotonic() + WAIT
        while not self.call(condition):
            if time.monotonic() > deadline:
                raise AssertionError(f"still waiting for {what} after {WAIT:g} s")
            time.sleep(0.005)

    def contained_errors(self) -> dict[str, dict[str, int]]:
        """Every role's contained errors by kind (all empty when nothing went wrong inside)."""
        return self.call(
            lambda: {
                "proxy": dict(self.proxy.containment.by_kind),
                "sidecar": dict(self.sidecar.containment.by_kind),
                "pool": dict(self.pool.containment.by_kind),
            }
        )

    # ------------------------------------------------------------------ honest clients

    def honest_shares_still_accepted(self) -> None:
        """The honest miner's next share reaches the pool through proxy, control channel and UDP/TLS."""
        before = self.call(lambda: self.pool.statistics().accepted)
        self.wait_until(lambda: self.pool.statistics().accepted > before, "an honest share accepted by the pool")

    def honest_rig_subscribes(self) -> None:
        """A new rig at the proxy's miner port gets its subscribe result."""
        with socket.create_connection((HOST, self.proxy_port), timeout=WAIT) as rig:
            rig.sendall(b'{"id":1,"method":"mining.subscribe","params":["cgminer/4.11.1"]}\n')
            answer = json.loads(read_line(rig))
        assert answer["id"] == 1 and answer["error"] is None and answer["result"], answer

    def honest_proxy_says_hello(self) -> None:
        """A new proxy with a valid certificate gets the sidecar's hello result on the control channel."""
        total = self.call(lambda: self.sidecar.statistics().sessions_total)
        with self.tls_connection() as tls:
            tls.sendall(HELLO)
            answer = json.loads(read_line(tls))
        assert answer["id"] == 1 and answer["result"]["version"] == 1, answer
        self.wait_sidecar_settled(total + 1)

    def honest_status_request(self) -> None:
        with socket.create_connection((HOST, self.status_port), timeout=WAIT) as client:
            client.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            response = read_until_closed(client)
        assert response.startswith(b"HTTP/1.1 200 "), response[:200]
        assert json.loads(response.split(b"\r\n\r\n", 1)[1])["role"] == "sidecar"

    def tls_connection(self) -> ssl.SSLSocket:
        context = self.pki.client_context()
        raw = socket.create_connection((HOST, self.sidecar_port), timeout=WAIT)
        # as the real proxy does (bridge/net/tcp.py): else the hello after the handshake's last
        # record waits for a delayed ACK, some 40 ms an example
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return context.wrap_socket(raw, server_hostname=HOST)

    def wait_sidecar_settled(self, sessions_total: int) -> None:
        """Every control session up to ``sessions_total`` started and all but the honest proxy's ended."""

        def settled() -> bool:
            stats = self.sidecar.statistics()
            ended = sum(stats.closed_by_reason.values())
            return (
                stats.sessions_total >= sessions_total
                and ended == stats.sessions_total - stats.sessions_active
                and stats.sessions_active == 1
            )

        self.wait_until(settled, f"control session {sessions_total} to start and end")


def read_line(sock: socket.socket) -> bytes:
    received = b""
    while b"\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a whole line: {received[:200]!r}")
        received += chunk
    return received.split(b"\n", 1)[0]


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except OSError:
        pass  # a reset is a close too
    return received
