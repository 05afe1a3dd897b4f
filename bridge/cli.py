"""The ``stratumrm`` command line.

Roles: ``proxy`` (miner side), ``sidecar`` (pool side);
tools: ``testpool``, ``testminer``, ``demo``, ``bench``, ``pki``, ``status``, ``ping``, ``config``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from bridge import __version__
from bridge.config import parse_listen
from bridge.errors import BridgeError
from bridge.logs import log_format_option, setup_role
from bridge.net.admission import (
    DEFAULT_FD_RESERVE,
    RIG_MAX_PENDING,
    RIG_MAX_PENDING_PER_SOURCE,
    AdmissionLimits,
)


def setup_logging(verbose: int, quiet: bool = False, log_format: str = "text") -> None:
    """The one logging set-up (bridge/logs.py); every -v is one level more than the default."""
    from bridge import logs

    logs.setup(verbose, quiet=quiet, log_format=log_format)


class LazyGroup(click.Group):
    """A command group whose commands named in ``lazy_commands`` are imported when first used.

    ``stratumrm sidecar`` then imports the sidecar's modules, not the benchmarks' or
    the test miner's: every process starts sooner. ``--help`` lists them all.
    """

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: command name -> "module:attribute" of its click command
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            self.load(cmd_name)
        return super().get_command(ctx, cmd_name)

    def load(self, name: str) -> None:
        module, _, attribute = self.lazy_commands[name].partition(":")
        self.add_command(getattr(importlib.import_module(module), attribute), name)

    def load_all(self) -> None:
        for name in self.lazy_commands:
            if name not in self.commands:
                self.load(name)


@click.group(
    cls=LazyGroup,
    # Commands that live next to the code they run.
    lazy_commands={
        "testpool": "bridge.testing.commands:testpool",
        "testminer": "bridge.testing.miner_command:testminer",
        # bridge/pki/enroll_commands.py adds token, enrollments and issue-operator to the pki group
        "pki": "bridge.pki.enroll_commands:pki",
        "sidecar": "bridge.net.sidecar_command:sidecar",
        "bench": "bridge.bench.command:bench",
        "status": "bridge.status_command:status",
        "ping": "bridge.net.ping_command:ping",
        "config": "bridge.config_command:config",
    },
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="stratumrm")
def cli() -> None:
    """StratumRM Bridge: secure, fast transport for Stratum V1 rigs and pools."""


_FAILOVER_DEFAULTS = {
    "strategy": "failover",
    "silence_timeout": 5.0,
    "keepalive": "subscribe",
    "job_timeout": 90.0,
    "lag_delay": 5.0,
    "hold_down": 120.0,
    "switch_rate": 500.0,
    "switch_burst": 25,
    "drain_timeout": 10.0,
    "no_upstream": "disconnect",
    "no_upstream_grace": 5.0,
    "probe_user": None,
    "probe_password": None,
}


@cli.group(cls=LazyGroup, lazy_commands={"enroll": "bridge.pki.enroll_commands:enroll_command"}, invoke_without_command=True)
@click.option(
    "--config",
    "-c",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="TOML configuration file (see README, Failover); command-line options win.",
)
@click.option("--listen", default="0.0.0.0:3333", show_default=True, help="HOST:PORT where rigs connect.")
@click.option(
    "--upstream",
    "-o",
    "upstreams",
    multiple=True,
    help="Pool URL, repeat in priority order (cgminer's -o): stratumrm://SIDECAR:PORT, stratum+tcp://HOST:PORT or "
    "stratum+ssl://HOST:PORT; #xnsub, #priority=N, #weight=W, #name=TEXT may follow.",
)
@click.option(
    "--backup", "backups", multiple=True, help="Backup pool URL (repeatable): the next priority levels after every --upstream."
)
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="This proxy's certificate (stratumrm:// upstreams).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="Its private key.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), help="The pool operator's CA certificate.")
@click.option(
    "--bundle",
    type=click.Path(exists=True, dir_okay=False),
    help="Certificate, key and CA in one file (from stratumrm pki issue-miner), instead of --cert/--key/--ca.",
)
@click.option(
    "--upstream-ca",
    type=click.Path(exists=True, dir_okay=False),
    help="CA file to verify stratum+ssl pools (default: system trust store).",
)
@click.option(
    "--submit-timeout",
    default=60.0,
    show_default=True,
    help="Seconds to wait for a pool's verdict before answering the rig with an explicit error.",
)
@click.option(
    "--opening-timeout", default=10.0, show_default=True, help="Seconds a new connection may stay silent before it is closed."
)
@click.option(
    "--max-pending",
    type=click.IntRange(min=1),
    default=RIG_MAX_PENDING,
    show_default=True,
    help="Rig connections that have not sent their first Stratum request yet, at most (a flood is refused beyond).",
)
@click.option(
    "--max-pending-per-source",
    type=click.IntRange(min=1),
    default=RIG_MAX_PENDING_PER_SOURCE,
    show_default=True,
    help="... of them from one IP address (raise it for many rigs behind one NAT that reconnect at once).",
)
@click.option(
    "--fd-reserve",
    type=click.IntRange(min=0),
    default=DEFAULT_FD_RESERVE,
    show_default=True,
    help="File descriptors kept free for upstream connections and the status port: no new rig is accepted below it.",
)
@click.option(
    "--share-batch-window",
    default=0.0,
    show_default=True,
    help="Seconds a UDP share that follows another within them waits, so concurrent shares share a datagram; a lone share never waits (e.g. 0.001 for large farms).",
)
@click.option(
    "--strategy",
    type=click.Choice(["failover", "weighted"]),
    default="failover",
    show_default=True,
    help="failover: the first healthy priority level takes every rig; weighted: rigs split across healthy upstreams by #weight.",
)
@click.option(
    "--silence-timeout",
    type=float,
    default=5.0,
    show_default=True,
    help="An upstream that sends nothing for this long, although asked (keepalive), is down.",
)
@click.option(
    "--keepalive",
    type=click.Choice(["subscribe", "ping", "none"]),
    default="subscribe",
    show_default=True,
    help="How a quiet upstream proves it is alive: a fresh connection's mining.subscribe (StratumRM: the link's rm.ping), mining.ping on the probe session, or nothing (no silence detection).",
)
@click.option(
    "--job-timeout",
    type=float,
    default=90.0,
    show_default=True,
    help="An upstream without a mining.notify for this long is down.",
)
@click.option(
    "--lag-delay",
    type=float,
    default=5.0,
    show_default=True,
    help="An upstream that has not announced a block another upstream moved to this long ago is lagging (down).",
)
@click.option(
    "--hold-down",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds a recovered upstream must stay healthy before rigs fail back to it.",
)
@click.option(
    "--switch-rate",
    type=float,
    default=500.0,
    show_default=True,
    help="Rigs moved per second at most (bursts of --switch-burst), so a farm does not stampede the backup.",
)
@click.option("--switch-burst", type=int, default=25, show_default=True, help="Rigs moved at once before the rate applies.")
@click.option(
    "--drain-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds the old upstream keeps its verdict path after a switch (shares in flight, stale submits).",
)
@click.option(
    "--no-upstream",
    type=click.Choice(["disconnect", "keep"]),
    default="disconnect",
    show_default=True,
    help="No upstream usable: disconnect rigs (their own backup pools take over) or keep them on their last job.",
)
@click.option(
    "--no-upstream-grace",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds without any usable upstream before rigs are disconnected.",
)
@click.option("--probe-user", help="Worker name the health probes authorize as (default: the first rig's).")
@click.option("--probe-password", help="Its password (default: that rig's).")
@click.option(
    "--cert-warn-days",
    type=click.FloatRange(min=0.0),
    default=14.0,
    show_default=True,
    help="Warn (log, status) when this proxy's certificate expires within this many days.",
)
@click.option(
    "--http-listen",
    "--status-listen",
    "http_listen",
    metavar="HOST:PORT",
    help="Management port: dashboard, /metrics, /api/v1/..., /healthz, /readyz and /status (for `stratumrm status`), e.g. 127.0.0.1:9100. Keep it on 127.0.0.1 or a management network. --status-listen is its old name.",
)
@click.option("--metrics-per-worker", is_flag=True, help="Add per-worker series to /metrics (the busiest 1000 workers).")
@click.option("-v", "--verbose", count=True, help="More logging: -v debug, -vv the libraries' debug too.")
@log_format_option
@click.pass_context
def proxy(
    context: click.Context,
    config_file,
    listen,
    upstreams,
    backups,
    cert,
    key,
    ca,
    bundle,
    upstream_ca,
    submit_timeout,
    opening_timeout,
    max_pending,
    max_pending_per_source,
    fd_reserve,
    share_batch_window,
    cert_warn_days,
    http_listen,
    metrics_per_worker,
    verbose,
    log_format,
    **failover_options,
) -> None:
    """Miner-side proxy: accept plain Stratum V1 rigs and relay them upstream, with failover.

    Upstreams are tried in priority order (--upstream, then --backup); standbys are
    kept connected and authorized by a probe, and rigs move when the active one is
    lost, silent, stops sending jobs or lags behind the others' blocks, and come back
    after --hold-down. A renewed --bundle (or --cert/--key) is picked up without a
    restart (checked every few seconds and on SIGHUP) and used from the next
    connection to the sidecar.

    Subcommand: `stratumrm proxy enroll URL --token T --fingerprint FP` gets this
    proxy's certificate from a sidecar's management port.
    """
    if context.invoked_subcommand is not None:
        return
    from datetime import timedelta

    from bridge import settings as settings_module
    from bridge.config import parse_upstream_entry
    from bridge.relay.failover import FailoverConfig, NoUpstreamPolicy, Strategy
    from bridge.runtime import OptionProblem, check_names, run_role

    try:
        chosen = settings_module.merge("proxy", config_file, settings_module.given_on_command_line(context))
    except (BridgeError, ValueError) as exc:
        raise OptionProblem(str(exc)) from None
    setup_role(chosen, verbose)
    failover_settings = chosen.failover
    settings = {name: getattr(failover_settings, name) for name in _FAILOVER_DEFAULTS}
    listen, cert, key, ca, bundle = chosen.listen, chosen.cert, chosen.key, chosen.ca, chosen.bundle
    upstream_ca, submit_timeout, opening_timeout = chosen.upstream_ca, chosen.submit_timeout, chosen.opening_timeout
    share_batch_window, cert_warn_days, http_listen = chosen.share_batch_window, chosen.cert_warn_days, chosen.http_listen
    admission = AdmissionLimits(
        max_pending=chosen.max_pending,
        max_pending_per_source=chosen.max_pending_per_source,
        fd_reserve=chosen.fd_reserve,
    )
    try:
        host, port = parse_listen(listen)
        if upstreams or backups:
            entries = [parse_upstream_entry(text, position) for position, text in enumerate(upstreams)]
            level = max((entry.priority for entry in entries), default=-1) + 1
            entries += [parse_upstream_entry(text, level + position) for position, text in enumerate(backups)]
        else:
            entries = chosen.entries()
        from bridge.net.intercept import parse_rules

        rules = parse_rules(chosen.intercept)
        if not entries and not rules:
            raise OptionProblem(
                "give at least one --upstream (or [[upstream]] or [[intercept]] in --config); "
                "`stratumrm config example proxy` shows a complete file"
            )
        http_address = parse_listen(http_listen) if http_listen else None
        if rules and http_address is not None:
            raise OptionProblem(
                "--http-listen: an interception proxy ([[intercept]] in --config) has no management port yet; "
                "remove http_listen / --http-listen, or run the rigs' pools through a proxy without [[intercept]]"
            )
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
        raise OptionProblem(str(exc)) from None
    check_names({f"--upstream {entry.url}": entry.url.host for entry in entries})
    # The role's modules (trio drivers, TLS, certificates) only once the options are
    # known good: a mistyped option is answered without importing them.
    from bridge.net.miner_proxy import MinerProxy
    from bridge.net.proxy_service import ProxyService
    from bridge.pki.rotation import ClientCredentials
    from bridge.pki.tls import public_client_context

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
                rules, proxies, make_proxy(entries) if entries else None, default=chosen.intercept_default
            )
        except BridgeError as exc:
            raise OptionProblem(str(exc)) from None
        run_role(interceptor.serve, host, port, listens={"--listen": (host, port)})
        return
    server = make_proxy(entries)
    service = ProxyService(
        server, credentials=credentials, http_listen=http_address, metrics_per_worker=chosen.metrics_per_worker
    )
    listens = {"--listen": (host, port)}
    if http_address is not None:
        listens["--http-listen"] = http_address
    run_role(service.run, host, port, listens=listens)


@cli.command()
@click.option("--duration", type=float, default=30.0, show_default=True, help="Seconds to run; 0 runs until Ctrl-C.")
@click.option(
    "--miners",
    type=click.IntRange(1, 500),
    default=5,
    show_default=True,
    help="Reference miners (profiles cycle: cgminer, cpuminer, bfgminer, bmminer, bitaxe).",
)
@click.option(
    "--difficulty",
    type=float,
    default=0.0001,
    show_default=True,
    help="Pool share difficulty (fractional; lower means more shares).",
)
@click.option(
    "--hashrate",
    type=float,
    default=None,
    help="Cap each miner at this many hashes per second (default: as fast as the CPU allows).",
)
@click.option(
    "--loss",
    type=click.FloatRange(0, 100),
    default=0.0,
    show_default=True,
    help="Percent of UDP datagrams a lossy link drops (also duplicates and reorders a quarter as many).",
)
@click.option("-v", "--verbose", count=True, help="Show the components' logs.")
def demo(duration, miners, difficulty, hashrate, loss, verbose) -> None:
    """Run the whole chain on 127.0.0.1 (pool, sidecar, proxy, miners) and check every share's tally."""
    from bridge import demo as demo_module

    setup_logging(max(verbose - 1, 0), quiet=verbose == 0)
    status = demo_module.main(duration or None, miners, difficulty, hashrate, loss)
    sys.exit(status)


def _register_optional() -> None:
    """Import every command now (tests that look at every command's options)."""
    for group in (cli, proxy):
        assert isinstance(group, LazyGroup)
        group.load_all()


def main() -> None:
    cli(prog_name="stratumrm")


if __name__ == "__main__":
    main()
