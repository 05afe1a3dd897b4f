"""SV1 through a stunnel pair: the C TLS wrapper a farm would run instead of StratumRM.

A client-mode stunnel beside the miners takes plain SV1 and speaks TLS 1.3 (verifying
the pool's certificate against the CA) to a server-mode stunnel beside the pool, which
hands plain SV1 to the pool: two processes, as StratumRM's proxy and sidecar are. Both
set TCP_NODELAY on both sides, as the StratumRM roles do. It is the wire-efficiency
issue's baseline ("SV1 through a stunnel pair (TLS 1.3)"); :mod:`bridge.bench.transport`
adds it as a path when a ``stunnel`` binary is installed (Debian: stunnel4).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import trio

from bridge.bench.roles import ProcessPair, free_port

__all__ = ["StunnelPair", "stunnel_binary"]

READY_TIMEOUT = 10.0


def stunnel_binary() -> str | None:
    """The stunnel program, or None when it is not installed."""
    return shutil.which("stunnel4") or shutil.which("stunnel")


def _config(service: list[str], log: Path) -> str:
    common = [
        "foreground = yes",
        "pid =",
        f"output = {log}",
        "debug = notice",
        "socket = l:TCP_NODELAY=1",
        "socket = r:TCP_NODELAY=1",
        "[sv1]",
        "sslVersionMin = TLSv1.3",
    ]
    return "\n".join([*common, *service, ""])


class StunnelPair(ProcessPair):
    """Two stunnel processes: miners connect to :attr:`entry_port`; TLS crosses :attr:`link_port`."""

    def __init__(
        self,
        workdir: Path,
        host: str,
        pool_port: int,
        cert: Path,
        key: Path,
        ca: Path,
        *,
        link_host: str | None = None,
        client_prefix: list[str] | None = None,
        server_prefix: list[str] | None = None,
    ) -> None:
        """``link_host``: where the server-side wrapper listens for the TLS link (default ``host``);
        ``client_prefix``/``server_prefix`` go before each wrapper's command (``ip netns exec NS``)."""
        self.workdir = workdir
        self.host = host
        self.link_host = link_host or host
        self.pool_port = pool_port
        self.cert, self.key, self.ca = cert, key, ca
        self.entry_port = free_port(host=host)
        self.link_port = free_port(host=host)
        self._prefixes = {"client": client_prefix or [], "server": server_prefix or []}
        super().__init__()

    async def start(self) -> None:
        binary = stunnel_binary()
        if binary is None:
            raise RuntimeError("stunnel is not installed (Debian: apt-get install stunnel4)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        host = self.host
        server = _config(
            [
                f"accept = {self.link_host}:{self.link_port}",
                f"connect = {host}:{self.pool_port}",
                f"cert = {self.cert}",
                f"key = {self.key}",
            ],
            self.workdir / "server.log",
        )
        client = _config(
            [
                "client = yes",
                f"accept = {host}:{self.entry_port}",
                f"connect = {self.link_host}:{self.link_port}",
                "verifyChain = yes",
                f"CAfile = {self.ca}",
            ],
            self.workdir / "client.log",
        )
        for name, text, port in (("server", server, self.link_port), ("client", client, self.entry_port)):
            path = self.workdir / f"{name}.conf"
            path.write_text(text)
            process = await trio.lowlevel.open_process(
                [*self._prefixes[name], binary, str(path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if name == "client":
                self.processes.insert(0, process)
            else:
                self.processes.append(process)
            await self._wait_listening(self.host if name == "client" else self.link_host, port, process, name)

    async def _wait_listening(self, host: str, port: int, process: trio.Process, name: str) -> None:
        with trio.move_on_after(READY_TIMEOUT):
            while process.poll() is None:
                try:
                    stream = await self.connect(name, host, port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                return
        log = self.workdir / f"{name}.log"
        detail = log.read_text()[-500:] if log.exists() else "no log"
        raise RuntimeError(f"stunnel ({name}) did not listen on {host}:{port}: {detail}")

    async def connect(self, name: str, host: str, port: int) -> trio.SocketStream:
        """A connection to wrapper ``name``'s listening port (overridden to connect from another namespace)."""
        return await trio.open_tcp_stream(host, port)
