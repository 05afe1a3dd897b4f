"""The trio driver of :class:`~bridge.relay.health.SubscribeCheck`: one fresh connection, one subscribe.

Used by the sidecar's pool check (:mod:`bridge.net.pool_watch`) and the proxy's
keepalive on plain SV1 upstreams (:mod:`bridge.net.upstreams`). The whole
exchange, connecting included, is bounded by the check's timeout; the
connection is always closed afterwards.
"""

from __future__ import annotations

import ssl

import trio

from bridge.net.listen import is_resource_shortage
from bridge.net.tcp import close_quietly, describe_error, open_stream
from bridge.relay.health import DEFAULT_CHECK_TIMEOUT, SubscribeCheck, Verdict

RECEIVE_SIZE = 16384
_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ValueError)


async def check_subscribe(
    host: str,
    port: int,
    *,
    agent: str,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_CHECK_TIMEOUT,
    connect_timeout: float = 10.0,
    stream: trio.abc.Stream | None = None,
) -> Verdict:
    """Subscribe on a fresh connection to ``host:port`` (TLS with a context) and return the verdict.

    ``stream``: a connection opened beforehand on which nothing was sent yet (a
    spare), so the check measures the pool's answer, not the TCP handshake; it is
    closed afterwards like one opened here.
    """
    check = SubscribeCheck(f"{host}:{port}", agent, trio.current_time(), timeout=timeout)
    with trio.move_on_at(check.deadline):
        if stream is None:
            try:
                stream = await open_stream(host, port, ssl_context=ssl_context, timeout=min(connect_timeout, timeout))
            except _ERRORS as exc:
                if is_resource_shortage(exc):
                    check.cannot_tell(f"connecting to {host}:{port} failed locally: {describe_error(exc)}", trio.current_time())
                else:
                    check.connect_failed(describe_error(exc), trio.current_time())
        try:
            if stream is not None:
                await stream.send_all(check.data_to_send())
                while check.verdict is None:
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        check.connection_lost("closed the connection", trio.current_time())
                        break
                    check.receive_data(bytes(data), trio.current_time())
        except _ERRORS as exc:
            if is_resource_shortage(exc):
                check.cannot_tell(f"check of {host}:{port} failed locally: {describe_error(exc)}", trio.current_time())
            else:
                check.connection_lost(f"connection error ({describe_error(exc)})", trio.current_time())
    if check.verdict is None:
        check.handle_timer(max(trio.current_time(), check.deadline))
    await close_quietly(stream)
    assert check.verdict is not None
    return check.verdict
