"""A plain Stratum V1 upstream: one TCP (or TLS) connection to a pool per miner.

This is the transport for ``stratum+tcp://`` and ``stratum+ssl://`` upstreams, the
path backup pools use. It owns a :class:`~bridge.sv1.client.ClientSession` and the
stream; the miner channel talks to the session, the proxy driver calls
:meth:`flush` after every step and iterates :meth:`receive` for events.
"""

from __future__ import annotations

import ssl
from typing import Any

import trio

from bridge.config import UpstreamURL
from bridge.net.tcp import close_quietly, open_stream
from bridge.sv1.client import ClientSession

# Lines toward ckpool must stay under 1024 bytes; lines from pools may be long
# (a notify with a full merkle branch is ~1.5 KB).
MAX_LINE_FROM_POOL = 64 * 1024
RECEIVE_SIZE = 16384


class SV1Upstream:
    def __init__(self, url: UpstreamURL, stream: trio.abc.Stream) -> None:
        self.url = url
        self.stream = stream
        self.session = ClientSession(max_line=MAX_LINE_FROM_POOL)
        self._send_lock = trio.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    @classmethod
    async def connect(cls, url: UpstreamURL, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 10.0) -> SV1Upstream:
        if url.tls and ssl_context is None:
            raise ValueError(f"{url} needs a TLS context")
        stream = await open_stream(url.host, url.port, ssl_context=ssl_context if url.tls else None, timeout=timeout)
        return cls(url, stream)

    async def flush(self) -> None:
        async with self._send_lock:
            data = self.session.data_to_send()
            if data:
                self.bytes_sent += len(data)
                await self.stream.send_all(data)

    async def receive(self) -> list[Any] | None:
        """The next batch of events, or None when the pool closed the connection."""
        data = await self.stream.receive_some(RECEIVE_SIZE)
        if not data:
            return None
        self.bytes_received += len(data)
        return self.session.receive_data(data)

    async def aclose(self) -> None:
        await close_quietly(self.stream)
