"""Fixtures for the PKI tests: a throw-away PKI, and a real TLS exchange on 127.0.0.1."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from bridge.errors import PKIError
from bridge.pki.identity import CertificateIdentity
from bridge.pki.tls import peer_identity
from bridge.testing.pki import TestPKI, make_test_pki

ServerCheck = Callable[[trio.SSLStream], CertificateIdentity | None]


@dataclass
class TLSExchange:
    """What happened on both ends of one connection."""

    client_received: bytes | None = None
    client_error: BaseException | None = None
    client_session: ssl.SSLSession | None = None
    client_reused: bool | None = None
    server_identity: CertificateIdentity | None = None
    server_accepted: bool = False
    server_error: BaseException | None = None
    server_reused: bool | None = None

    @property
    def succeeded(self) -> bool:
        return self.client_received == b"welcome\n" and self.server_identity is not None

    def server_failure_text(self) -> str:
        """The server's error with its causes, for asserting on the reason."""
        parts = []
        error = self.server_error
        while error is not None:
            parts.append(repr(error))
            error = error.__cause__ or error.__context__
        return " <- ".join(parts)


async def exchange(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    *,
    server_hostname: str = "127.0.0.1",
    session: ssl.SSLSession | None = None,
    server_check: ServerCheck = peer_identity,
) -> TLSExchange:
    """Serve one TLS connection on 127.0.0.1 and connect to it with ``client_context``.

    The server runs ``server_check`` after the handshake (full or resumed), then sends
    ``welcome\\n``; the client reads it, so a TLS 1.3 client-certificate rejection (which
    the client only learns on its first read) shows up as ``client_error``.
    """
    outcome = TLSExchange()
    server_finished = trio.Event()

    async def serve_one(tcp: trio.SocketStream) -> None:
        tls = trio.SSLStream(tcp, server_context, server_side=True)
        try:
            await tls.do_handshake()
            outcome.server_reused = tls.session_reused
            outcome.server_identity = server_check(tls)
            outcome.server_accepted = True
            await tls.send_all(b"welcome\n")
            await tls.receive_some(1)  # wait for the client to close
        except (trio.BrokenResourceError, PKIError) as error:
            outcome.server_error = error
        finally:
            await trio.aclose_forcefully(tls)
            server_finished.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, serve_one, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            tls = trio.SSLStream(tcp, client_context, server_hostname=server_hostname)
            if session is not None:
                tls.session = session
            try:
                await tls.do_handshake()
                outcome.client_reused = tls.session_reused
                outcome.client_received = await tls.receive_some(64)
                outcome.client_session = tls.session
            except trio.BrokenResourceError as error:
                outcome.client_error = error
            finally:
                await trio.aclose_forcefully(tls)
            await server_finished.wait()
            nursery.cancel_scope.cancel()
    return outcome


@pytest.fixture
def tls_exchange() -> Callable[..., Awaitable[TLSExchange]]:
    return exchange


@pytest.fixture
def test_pki(tmp_path: Path) -> TestPKI:
    return make_test_pki(tmp_path / "pki", accounts=("alice", "bob"))
