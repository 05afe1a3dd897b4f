"""``stratumrm testpool``: run the reference pool from the command line.

It serves until Ctrl-C (or SIGTERM), prints one line per connection,
authorization and block found (and every share with ``-v``), and on exit a
summary of accepted and rejected shares per worker. ``--listen HOST:0`` picks a
free port; the first line printed says which.
"""

from __future__ import annotations

import functools
import logging
import signal
import ssl
import sys
import threading

import click
import trio

from bridge.errors import ConfigError
from bridge.runtime import run_until_interrupted
from bridge.testing.pool import PoolConfig, ReferencePool

__all__ = ["parse_listen", "testpool"]


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:3333`` for IPv6; an empty host means all interfaces)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return host or "0.0.0.0", port


def _listen_option(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.command("testpool")
@click.option(
    "--listen",
    default="127.0.0.1:3333",
    show_default=True,
    callback=_listen_option,
    help="Address to serve Stratum V1 on (port 0: any free port).",
)
@click.option(
    "--difficulty",
    type=float,
    default=1.0,
    show_default=True,
    help="Share difficulty; fractions allowed (0.001).",
)
@click.option(
    "--vardiff/--no-vardiff",
    default=False,
    show_default=True,
    help="Per-connection variable difficulty.",
)
@click.option("--extranonce2-size", type=click.IntRange(4, 8), default=8, show_default=True)
@click.option("--notify-interval", type=float, default=30.0, show_default=True, help="Seconds between jobs.")
@click.option(
    "--block-interval",
    type=float,
    default=None,
    help="Seconds between new blocks (default: only when a share solves one).",
)
@click.option(
    "--nbits",
    default="17034219",
    show_default=True,
    help="Network target of the jobs (207fffff: every share is a block).",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    help="Serve stratum+ssl with this certificate chain (PEM).",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False),
    help="Private key for --tls-cert (PEM).",
)
@click.option("-v", "--verbose", is_flag=True, help="Also print every accepted and rejected share.")
def testpool(
    listen: tuple[str, int],
    difficulty: float,
    vardiff: bool,
    extranonce2_size: int,
    notify_interval: float,
    block_interval: float | None,
    nbits: str,
    tls_cert: str | None,
    tls_key: str | None,
    verbose: bool,
) -> None:
    """Run the reference pool: a real Stratum V1 server that validates every share."""
    host, port = listen
    try:
        config = PoolConfig(
            difficulty=difficulty,
            vardiff=vardiff,
            extranonce2_size=extranonce2_size,
            notify_interval=notify_interval,
            block_interval=block_interval,
            nbits=nbits.lower(),
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    ssl_context = _server_context(tls_cert, tls_key)
    _print_log_lines(verbose)
    pool = ReferencePool(config)
    try:
        run_until_interrupted(_serve_until_signalled, pool, host, port, ssl_context)
    except OSError as exc:
        if pool.port is None:  # never listened
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
        raise
    _print_summary(pool)


def _server_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None:
        raise click.UsageError("--tls-key needs --tls-cert")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise click.UsageError(f"cannot load the TLS certificate/key: {exc}") from None
    return context


def _print_log_lines(verbose: bool) -> None:
    logger = logging.getLogger("bridge.testing.pool")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if any(handler.get_name() == "testpool" for handler in logger.handlers):
        return  # invoked again in the same process
    handler = logging.StreamHandler(sys.stdout)
    handler.set_name("testpool")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)


async def _serve_until_signalled(pool: ReferencePool, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
    async with trio.open_nursery() as nursery:
        serve = functools.partial(pool.serve, ssl_context=ssl_context)
        bound = await nursery.start(serve, host, port)
        scheme = "stratum+ssl" if ssl_context is not None else "stratum+tcp"
        click.echo(f"testpool: listening on {scheme}://{host}:{bound}, Ctrl-C to stop")
        sys.stdout.flush()
        if threading.current_thread() is threading.main_thread():
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break


def _print_summary(pool: ReferencePool) -> None:
    stats = pool.statistics()
    rejected = sum(stats.rejected.values())
    by_code = ", ".join(f"{code}: {count}" for code, count in sorted(stats.rejected.items()))
    click.echo(
        f"testpool: {stats.accepted} accepted, {rejected} rejected"
        + (f" ({by_code})" if by_code else "")
        + f", {stats.blocks} blocks, {stats.connections_total} connections"
    )
    for worker in sorted(set(stats.accepted_by_worker) | set(stats.rejected_by_worker)):
        click.echo(
            f"  {worker}: {stats.accepted_by_worker.get(worker, 0)} accepted, {stats.rejected_by_worker.get(worker, 0)} rejected"
        )
