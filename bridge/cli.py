"""The ``stratumrm`` command line.

Roles: ``proxy`` (miner side), ``sidecar`` (pool side, with the StratumRM issue);
tools: ``testpool``, ``testminer``, ``demo``, ``bench``, ``pki``, ``status``.
"""

from __future__ import annotations

import logging
import sys

import click

from bridge import __version__
from bridge.config import parse_listen
from bridge.errors import BridgeError
from bridge.net.admission import (
    DEFAULT_FD_RESERVE,
    RIG_MAX_PENDING,
    RIG_MAX_PENDING_PER_SOURCE,
    AdmissionLimits,
)
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


_FAILOVER_DEFAULTS = {
    "strategy": "failover", "silence_timeout": 5.0, "keepalive": "authorize", "job_timeout": 90.0,
    "lag_delay": 5.0, "hold_down": 120.0, "switch_rate": 500.0, "switch_burst": 25, "drain_timeout": 10.0,
    "no_upstream": "disconnect", "no_upstream_grace": 5.0, "probe_user": None, "probe_password": None,
}


@cli.command()
@click.option("--config", "-c", "config_file", type=click.Path(exists=True, dir_okay=False), help="TOML configuration file (see README, Failover); command-line options win.")
@click.option("--listen", default="0.0.0.0:3333", show_default=True, help="HOST:PORT where rigs connect.")
@click.option(
    "--upstream",
    "-o",
    "upstreams",
    multiple=True,
    help="Pool URL, repeat in priority order (cgminer's -o): stratumrm://SIDECAR:PORT, stratum+tcp://HOST:PORT or "
    "stratum+ssl://HOST:PORT; #xnsub, #priority=N, #weight=W, #name=TEXT may follow.",
)
@click.option("--backup", "backups", multiple=True, help="Backup pool URL (repeatable): the next priority levels after every --upstream.")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="This proxy's certificate (stratumrm:// upstreams).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="Its private key.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), help="The pool operator's CA certificate.")
@click.option("--bundle", type=click.Path(exists=True, dir_okay=False), help="Certificate, key and CA in one file (from stratumrm pki issue-miner), instead of --cert/--key/--ca.")
@click.option("--upstream-ca", type=click.Path(exists=True, dir_okay=False), help="CA file to verify stratum+ssl pools (default: system trust store).")
@click.option("--submit-timeout", default=60.0, show_default=True, help="Seconds to wait for a pool's verdict before answering the rig with an explicit error.")
@click.option("--opening-timeout", default=10.0, show_default=True, help="Seconds a new connection may stay silent before it is closed.")
@click.option("--max-pending", type=click.IntRange(min=1), default=RIG_MAX_PENDING, show_default=True, help="Rig connections that have not sent their first Stratum request yet, at most (a flood is refused beyond).")
@click.option("--max-pending-per-source", type=click.IntRange(min=1), default=RIG_MAX_PENDING_PER_SOURCE, show_default=True, help="... of them from one IP address (raise it for many rigs behind one NAT that reconnect at once).")
@click.option("--fd-reserve", type=click.IntRange(min=0), default=DEFAULT_FD_RESERVE, show_default=True, help="File descriptors kept free for upstream connections and the status port: no new rig is accepted below it.")
@click.option("--share-batch-window", default=0.0, show_default=True, help="Seconds to hold UDP shares so several share a datagram (e.g. 0.001 for large farms).")
@click.option("--strategy", type=click.Choice(["failover", "weighted"]), default="failover", show_default=True, help="failover: the first healthy priority level takes every rig; weighted: rigs split across healthy upstreams by #weight.")
@click.option("--silence-timeout", type=float, default=5.0, show_default=True, help="An upstream that sends nothing for this long, although asked (keepalive), is down.")
@click.option("--keepalive", type=click.Choice(["authorize", "ping", "none"]), default="authorize", show_default=True, help="What the probe asks a quiet upstream: mining.authorize (every pool answers), mining.ping, or nothing (no silence detection).")
@click.option("--job-timeout", type=float, default=90.0, show_default=True, help="An upstream without a mining.notify for this long is down.")
@click.option("--lag-delay", type=float, default=5.0, show_default=True, help="An upstream that has not announced a block another upstream moved to this long ago is lagging (down).")
@click.option("--hold-down", type=float, default=120.0, show_default=True, help="Seconds a recovered upstream must stay healthy before rigs fail back to it.")
@click.option("--switch-rate", type=float, default=500.0, show_default=True, help="Rigs moved per second at most (bursts of --switch-burst), so a farm does not stampede the backup.")
@click.option("--switch-burst", type=int, default=25, show_default=True, help="Rigs moved at once before the rate applies.")
@click.option("--drain-timeout", type=float, default=10.0, show_default=True, help="Seconds the old upstream keeps its verdict path after a switch (shares in flight, stale submits).")
@click.option("--no-upstream", type=click.Choice(["disconnect", "keep"]), default="disconnect", show_default=True, help="No upstream usable: disconnect rigs (their own backup pools take over) or keep them on their last job.")
@click.option("--no-upstream-grace", type=float, default=5.0, show_default=True, help="Seconds without any usable upstream before rigs are disconnected.")
@click.option("--probe-user", help="Worker name the health probes authorize as (default: the first rig's).")
@click.option("--probe-password", help="Its password (default: that rig's).")
@click.option("--cert-warn-days", type=click.FloatRange(min=0.0), default=14.0, show_default=True, help="Warn (log, status) when this proxy's certificate expires within this many days.")
@click.option("--status-listen", metavar="HOST:PORT", help="Serve GET /status (JSON statistics) here, e.g. 127.0.0.1:9100, for `stratumrm status`.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.pass_context
def proxy(context: click.Context, config_file, listen, upstreams, backups, cert, key, ca, bundle, upstream_ca,
          submit_timeout, opening_timeout, max_pending, max_pending_per_source, fd_reserve, share_batch_window,
          cert_warn_days, status_listen, verbose, **failover_options) -> None:
    """Miner-side proxy: accept plain Stratum V1 rigs and relay them upstream, with failover.

    Upstreams are tried in priority order (--upstream, then --backup); standbys are
    kept connected and authorized by a probe, and rigs move when the active one is
    lost, silent, stops sending jobs or lags behind the others' blocks, and come back
    after --hold-down. A renewed --bundle (or --cert/--key) is picked up without a
    restart (checked every few seconds and on SIGHUP) and used from the next
    connection to the sidecar.
    """
    from datetime import timedelta

    from bridge.config import FailoverFileSection, ProxyFileConfig, load_proxy_config, parse_upstream_entry
    from bridge.net.miner_proxy import MinerProxy
    from bridge.net.proxy_service import ProxyService
    from bridge.pki.rotation import ClientCredentials
    from bridge.pki.tls import public_client_context
    from bridge.relay.failover import FailoverConfig, NoUpstreamPolicy, Strategy

    setup_logging(verbose)

    def given(name: str) -> bool:
        return context.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE

    try:
        file = load_proxy_config(config_file) if config_file else ProxyFileConfig()
        section = file.failover if config_file else FailoverFileSection()

        def pick(name: str, value, file_value):
            return value if given(name) or file_value is None else file_value

        listen = pick("listen", listen, file.listen)
        cert, key, ca = pick("cert", cert, file.cert), pick("key", key, file.key), pick("ca", ca, file.ca)
        bundle = pick("bundle", bundle, file.bundle)
        upstream_ca = pick("upstream_ca", upstream_ca, file.upstream_ca)
        submit_timeout = pick("submit_timeout", submit_timeout, file.submit_timeout)
        opening_timeout = pick("opening_timeout", opening_timeout, file.opening_timeout)
        admission = AdmissionLimits(
            max_pending=pick("max_pending", max_pending, file.max_pending),
            max_pending_per_source=pick("max_pending_per_source", max_pending_per_source, file.max_pending_per_source),
            fd_reserve=pick("fd_reserve", fd_reserve, file.fd_reserve),
        )
        share_batch_window = pick("share_batch_window", share_batch_window, file.share_batch_window)
        settings = {name: pick(name, failover_options[name], getattr(section, name)) for name in _FAILOVER_DEFAULTS}
        host, port = parse_listen(listen)
        if upstreams or backups:
            entries = [parse_upstream_entry(text, position) for position, text in enumerate(upstreams)]
            level = max((entry.priority for entry in entries), default=-1) + 1
            entries += [parse_upstream_entry(text, level + position) for position, text in enumerate(backups)]
        else:
            entries = file.entries()
        from bridge.net.intercept import parse_rules

        rules = parse_rules(file.intercept) if config_file else []
        if not entries and not rules:
            raise click.UsageError("give at least one --upstream (or [[upstream]] or [[intercept]] in --config)")
        status_address = parse_listen(status_listen) if status_listen else None
        failover = FailoverConfig(
            strategy=Strategy(settings["strategy"]),
            silence_timeout=settings["silence_timeout"],
            job_timeout=settings["job_timeout"],
            lag_delay=settings["lag_delay"],
            hold_down=settings["hold_down"],
            switch_rate=settings["switch_rate"],
            switch_burst=settings["switch_burst"],
            no_upstream=NoUpstreamPolicy(settings["no_upstream"]),
            no_upstream_grace=settings["no_upstream_grace"],
        )
    except (BridgeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    credentials = None
    pool_context = None
    try:
        transports = {entry.url.transport for entry in entries} | {rule.upstream.transport for rule in rules}
        if "stratumrm" in transports:
            warn_window = timedelta(days=cert_warn_days)
            if bundle:
                credentials = ClientCredentials.from_bundle(bundle, expiry_warning=warn_window)
            elif cert and key and ca:
                credentials = ClientCredentials.from_files(cert, key, ca, expiry_warning=warn_window)
            else:
                raise click.UsageError(
                    "a stratumrm:// upstream needs this proxy's certificate: pass --bundle FILE "
                    "(from 'stratumrm pki issue-miner') or --cert, --key and --ca"
                )
        if "sv1+tls" in transports:
            pool_context = public_client_context(upstream_ca)
    except BridgeError as exc:
        raise click.ClickException(str(exc)) from None
    def make_proxy(upstream_entries):
        return MinerProxy(
            upstream_entries,
            upstream_ssl_context=credentials,
            pool_ssl_context=pool_context,
            submit_timeout=submit_timeout,
            opening_timeout=opening_timeout,
            share_batch_window=share_batch_window,
            failover=failover,
            drain_timeout=settings["drain_timeout"],
            probe_user=settings["probe_user"],
            probe_password=settings["probe_password"],
            keepalive=settings["keepalive"],
            admission=admission,
        )

    if rules:
        from bridge.config import UpstreamEntry
        from bridge.net.intercept import InterceptServer

        proxies = {}
        for rule in rules:
            if str(rule.upstream) not in proxies:
                proxies[str(rule.upstream)] = make_proxy([UpstreamEntry(rule.upstream)])
        try:
            interceptor = InterceptServer(
                rules, proxies, make_proxy(entries) if entries else None, default=file.intercept_default
            )
        except BridgeError as exc:
            raise click.UsageError(str(exc)) from None
        _run_forever(interceptor.serve, host, port)
        return
    server = make_proxy(entries)
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
