"""The ``stratumrm`` command line.

Roles: ``proxy`` (miner side), ``sidecar`` (pool side, with the StratumRM issue);
tools: ``testpool``, ``testminer``, ``demo``, ``bench``, ``pki``, ``status``.
"""

from __future__ import annotations

import logging
import sys

import click

from bridge import __version__
from bridge.config import parse_listen, parse_upstream_url
from bridge.errors import BridgeError
from bridge.runtime import run_until_interrupted


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
    help="Pool URL: stratumrm://SIDECAR:PORT, stratum+tcp://HOST:PORT or stratum+ssl://HOST:PORT.",
)
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="This proxy's certificate (stratumrm:// upstreams).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="Its private key.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), help="The pool operator's CA certificate.")
@click.option("--bundle", type=click.Path(exists=True, dir_okay=False), help="Certificate, key and CA in one file (from stratumrm pki issue-miner), instead of --cert/--key/--ca.")
@click.option("--upstream-ca", type=click.Path(exists=True, dir_okay=False), help="CA file to verify stratum+ssl pools (default: system trust store).")
@click.option("--submit-timeout", default=60.0, show_default=True, help="Seconds to wait for a pool's verdict before answering the rig with an explicit error.")
@click.option("--opening-timeout", default=10.0, show_default=True, help="Seconds a new connection may stay silent before it is closed.")
@click.option("--share-batch-window", default=0.0, show_default=True, help="Seconds to hold UDP shares so several share a datagram (e.g. 0.001 for large farms).")
@click.option("--cert-warn-days", type=click.FloatRange(min=0.0), default=14.0, show_default=True, help="Warn (log, status) when this proxy's certificate expires within this many days.")
@click.option("--status-listen", metavar="HOST:PORT", help="Serve GET /status (JSON statistics) here, e.g. 127.0.0.1:9100, for `stratumrm status`.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def proxy(listen, upstreams, cert, key, ca, bundle, upstream_ca, submit_timeout, opening_timeout, share_batch_window, cert_warn_days, status_listen, verbose) -> None:
    """Miner-side proxy: accept plain Stratum V1 rigs and relay them upstream.

    A renewed --bundle (or --cert/--key) is picked up without a restart (checked every
    few seconds and on SIGHUP) and used from the next connection to the sidecar.
    """
    from datetime import timedelta

    from bridge.net.miner_proxy import MinerProxy
    from bridge.net.proxy_service import ProxyService
    from bridge.pki.rotation import ClientCredentials
    from bridge.pki.tls import public_client_context

    setup_logging(verbose)
    try:
        host, port = parse_listen(listen)
        urls = [parse_upstream_url(u) for u in upstreams]
        status_address = parse_listen(status_listen) if status_listen else None
    except BridgeError as exc:
        raise click.UsageError(str(exc)) from None
    url = urls[0]
    credentials = None
    try:
        if url.transport == "stratumrm":
            warn_window = timedelta(days=cert_warn_days)
            if bundle:
                context = credentials = ClientCredentials.from_bundle(bundle, expiry_warning=warn_window)
            elif cert and key and ca:
                context = credentials = ClientCredentials.from_files(cert, key, ca, expiry_warning=warn_window)
            else:
                raise click.UsageError(
                    "a stratumrm:// upstream needs this proxy's certificate: pass --bundle FILE "
                    "(from 'stratumrm pki issue-miner') or --cert, --key and --ca"
                )
        else:
            context = public_client_context(upstream_ca) if url.tls else None
    except BridgeError as exc:
        raise click.ClickException(str(exc)) from None
    server = MinerProxy(
        url,
        upstream_ssl_context=context,
        submit_timeout=submit_timeout,
        opening_timeout=opening_timeout,
        share_batch_window=share_batch_window,
    )
    service = ProxyService(server, credentials=credentials, status_listen=status_address)
    _run_forever(service.run, host, port)


@cli.command()
@click.option("--duration", type=float, default=30.0, show_default=True, help="Seconds to run; 0 runs until Ctrl-C.")
@click.option("--miners", type=click.IntRange(1, 500), default=5, show_default=True, help="Reference miners (profiles cycle: cgminer, cpuminer, bfgminer, bmminer, bitaxe).")
@click.option("--difficulty", type=float, default=0.0001, show_default=True, help="Pool share difficulty (fractional; lower means more shares).")
@click.option("--hashrate", type=float, default=None, help="Cap each miner at this many hashes per second (default: as fast as the CPU allows).")
@click.option("--loss", type=click.FloatRange(0, 100), default=0.0, show_default=True, help="Percent of UDP datagrams a lossy link drops (also duplicates and reorders a quarter as many).")
@click.option("-v", "--verbose", count=True, help="Show the components' logs.")
def demo(duration, miners, difficulty, hashrate, loss, verbose) -> None:
    """Run the whole chain on 127.0.0.1 (pool, sidecar, proxy, miners) and check every share's tally."""
    from bridge import demo as demo_module

    setup_logging(verbose, quiet=verbose == 0)
    status = demo_module.main(duration or None, miners, difficulty, hashrate, loss)
    sys.exit(status)


def _run_forever(serve, *args) -> None:
    try:
        run_until_interrupted(serve, *args)
    except OSError as exc:
        raise click.ClickException(f"{exc}; is the address in use or the port privileged?") from None


def _register_optional() -> None:
    """Commands that live next to the code they run."""
    from bridge.testing.commands import testpool
    from bridge.testing.miner_command import testminer

    from bridge.bench.command import bench
    from bridge.net.sidecar_command import sidecar
    from bridge.pki.commands import pki
    from bridge.status_command import status

    cli.add_command(testpool)
    cli.add_command(testminer)
    cli.add_command(pki)
    cli.add_command(sidecar)
    cli.add_command(bench)
    cli.add_command(status)


def main() -> None:
    _register_optional()
    cli(prog_name="stratumrm")
