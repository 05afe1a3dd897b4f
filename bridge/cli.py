"""The ``stratumrm`` command line.

Roles: ``proxy`` (miner side), ``sidecar`` (pool side, with the StratumRM issue);
tools: ``testpool``, ``testminer``, ``demo``, ``bench``, ``pki``.
"""

from __future__ import annotations

import logging
import sys

import click
import trio

from bridge import __version__
from bridge.config import parse_listen, parse_upstream_url
from bridge.errors import BridgeError


def setup_logging(verbose: int, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stratumrm")
def cli() -> None:
    """StratumRM Bridge: secure, fast transport for Stratum V1 rigs and pools."""


@cli.command()
@click.option("--listen", default="0.0.0.0:3333", show_default=True, help="HOST:PORT where rigs connect.")
@click.option(
    "--upstream",
    "-o",
    "upstreams",
    multiple=True,
    required=True,
    help="Pool URL: stratum+tcp://HOST:PORT or stratum+ssl://HOST:PORT.",
)
@click.option("--upstream-ca", type=click.Path(exists=True, dir_okay=False), help="CA file to verify stratum+ssl pools (default: system trust store).")
@click.option("--submit-timeout", default=60.0, show_default=True, help="Seconds to wait for a pool's verdict before answering the rig with an explicit error.")
@click.option("--opening-timeout", default=10.0, show_default=True, help="Seconds a new connection may stay silent before it is closed.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def proxy(listen, upstreams, upstream_ca, submit_timeout, opening_timeout, verbose) -> None:
    """Miner-side proxy: accept plain Stratum V1 rigs and relay them upstream."""
    from bridge.net.miner_proxy import MinerProxy
    from bridge.pki.tls import public_client_context

    setup_logging(verbose)
    try:
        host, port = parse_listen(listen)
        urls = [parse_upstream_url(u) for u in upstreams]
    except BridgeError as exc:
        raise click.UsageError(str(exc)) from None
    url = urls[0]
    if url.transport == "stratumrm":
        raise click.UsageError(
            "stratumrm:// upstreams need the StratumRM transport, which this build does not have yet; "
            "use stratum+tcp:// or stratum+ssl://"
        )
    context = public_client_context(upstream_ca) if url.tls else None
    server = MinerProxy(url, upstream_ssl_context=context, submit_timeout=submit_timeout, opening_timeout=opening_timeout)
    _run_forever(server.serve, host, port)


def _run_forever(serve, *args) -> None:
    try:
        trio.run(serve, *args)
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    except OSError as exc:
        raise click.ClickException(f"{exc}; is the address in use or the port privileged?") from None


def _register_optional() -> None:
    """Commands that live next to the code they run."""
    from bridge.testing.commands import testpool
    from bridge.testing.miner_command import testminer

    cli.add_command(testpool)
    cli.add_command(testminer)
    try:
        from bridge.pki.commands import pki
    except ImportError:  # pragma: no cover - during development only
        return
    cli.add_command(pki)


def main() -> None:
    _register_optional()
    cli(prog_name="stratumrm")
