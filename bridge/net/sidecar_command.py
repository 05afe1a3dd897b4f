"""``stratumrm sidecar``: run the pool-side end of StratumRM next to the pool software.

It terminates StratumRM for miner-side proxies (TLS 1.3 control channel with
mutual certificates on ``--listen``, UDP shares on the same port number unless
``--udp-port`` says otherwise) and opens one plain Stratum V1 connection to
``--pool`` per rig. It refuses to start without its certificate, key and CA:
there is no unauthenticated mode. Stops on Ctrl-C or SIGTERM.

It watches ``--revocations``, ``--cert`` and ``--key`` (every few seconds, and at
once on SIGHUP): a new revocation list closes the sessions of newly revoked
certificates, a renewed certificate and key serve the next handshakes while live
sessions go on. ``--http-listen`` serves the management port (dashboard, /metrics,
/api/v1/..., /healthz, /readyz, and ``GET /status`` for ``stratumrm status``).

The lead registers it with ``cli.add_command(sidecar)``.
"""

from __future__ import annotations

import logging
import signal
import ssl
import threading
from datetime import timedelta
from typing import TYPE_CHECKING

import click
import trio

from bridge.config import parse_listen, parse_upstream_url
from bridge.errors import BridgeError
from bridge.logs import log_format_option, setup_role
from bridge.net.admission import (
    DEFAULT_FD_RESERVE,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_PER_SOURCE,
    AdmissionLimits,
)
from bridge.runtime import OptionProblem, check_names, run_role

if TYPE_CHECKING:
    from bridge.net.sidecar import SidecarServer
    from bridge.pki.enrollment import EnrollmentService
    from bridge.web.server import Guard

log = logging.getLogger("bridge.sidecar")

__all__ = ["parse_advertise", "sidecar"]

MISSING_CERTIFICATES = (
    "the sidecar does not run without certificates: {missing} {verb} missing. "
    "Create a CA with `stratumrm pki init`, then this sidecar's certificate with "
    "`stratumrm pki issue-pool NAME --dns HOST` (or --ip ADDRESS); it prints the "
    "--cert, --key and --ca to pass here"
)


def parse_advertise(text: str) -> tuple[str | None, int | None]:
    """``HOST``, ``HOST:PORT``, ``[V6]:PORT``, a bare IPv6 address, or ``:PORT``."""
    text = text.strip()
    if not text:
        raise BridgeError("--advertise is empty; write HOST, HOST:PORT or :PORT")
    host: str | None
    port_text: str | None = None
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise BridgeError(f"--advertise {text!r}: write an IPv6 address as [ADDRESS]:PORT")
        host, port_text = inside, rest[1:] or None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text  # a name, an IPv4 address or a bare IPv6 address
    host = host or None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise BridgeError(f"--advertise {text!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    return host, port


@click.command("sidecar")
@click.option(
    "--config",
    "-c",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="TOML configuration file (`stratumrm config example sidecar` prints one); command-line options win.",
)
@click.option(
    "--listen", default="0.0.0.0:3334", show_default=True, help="HOST:PORT where proxies connect (TLS, and UDP on the same port)."
)
@click.option("--pool", "pool_url", metavar="URL", help="The pool software: stratum+tcp://HOST:PORT or stratum+ssl://HOST:PORT.")
@click.option(
    "--pool-ca", type=click.Path(dir_okay=False), help="CA file to verify a stratum+ssl pool (default: the system trust store)."
)
@click.option("--cert", type=click.Path(dir_okay=False), help="This sidecar's certificate (`stratumrm pki issue-pool`).")
@click.option("--key", type=click.Path(dir_okay=False), help="The private key of --cert.")
@click.option(
    "--ca", type=click.Path(dir_okay=False), help="The StratumRM CA certificate proxies' certificates are checked against."
)
@click.option(
    "--revocations", type=click.Path(dir_okay=False), help="Revocation list to enforce and watch (the CA's revocations.pem)."
)
@click.option(
    "--udp-port", type=click.IntRange(0, 65535), default=None, help="UDP port for shares (default: the --listen port number)."
)
@click.option("--no-udp", is_flag=True, help="Offer no UDP: shares travel over the TLS control channel.")
@click.option("--advertise", metavar="HOST[:PORT]", help="UDP address to tell proxies (a sidecar behind NAT).")
@click.option(
    "--rekey-interval", type=click.FloatRange(min=1.0), default=3600.0, show_default=True, help="Seconds between new UDP keys."
)
@click.option(
    "--dead-after",
    type=click.FloatRange(min=0.5),
    default=5.0,
    show_default=True,
    help="Seconds of silence after which a proxy is dead.",
)
@click.option(
    "--clock-skew",
    type=click.FloatRange(min=0.0),
    default=10.0,
    show_default=True,
    help="Seconds of leeway on certificates' validity periods (clocks that disagree).",
)
@click.option(
    "--max-connections-per-cert",
    type=click.IntRange(min=0),
    default=4,
    show_default=True,
    help="Control connections one miner certificate may hold at once (0: no limit).",
)
@click.option(
    "--cert-warn-days",
    type=click.FloatRange(min=0.0),
    default=14.0,
    show_default=True,
    help="Warn (log, status) when a certificate expires within this many days.",
)
@click.option(
    "--http-listen",
    "--status-listen",
    "http_listen",
    metavar="HOST:PORT",
    help="Management port: dashboard, /metrics, /api/v1/..., /healthz, /readyz and /status (for `stratumrm status`), e.g. 127.0.0.1:9101. Keep it on 127.0.0.1 or a management network. --status-listen is its old name.",
)
@click.option("--metrics-per-worker", is_flag=True, help="Add per-worker series to /metrics (the busiest 1000 workers).")
@click.option(
    "--http-tls", is_flag=True, help="Serve the management port over HTTPS with --cert/--key (implied by the next two)."
)
@click.option(
    "--http-require-operator",
    is_flag=True,
    help="Let in only browsers with an operator certificate of --ca (`stratumrm pki issue-operator NAME`); enrollment and health checks stay open.",
)
@click.option(
    "--enroll-ca",
    type=click.Path(file_okay=False),
    metavar="PKI_DIR",
    help="Serve enrollment (`stratumrm proxy enroll`) on the management port, signing with the CA in PKI_DIR; with --http-require-operator, operators also create tokens on the dashboard.",
)
@click.option(
    "--handshake-timeout",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_HANDSHAKE_TIMEOUT,
    show_default=True,
    help="Seconds a proxy has to finish the TLS handshake.",
)
@click.option(
    "--max-pending",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_PENDING,
    show_default=True,
    help="Connections still in their TLS handshake, at most (a flood is refused beyond, or evicts its own oldest).",
)
@click.option(
    "--max-pending-per-source",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_PENDING_PER_SOURCE,
    show_default=True,
    help="... of them from one IP address.",
)
@click.option(
    "--fd-reserve",
    type=click.IntRange(min=0),
    default=DEFAULT_FD_RESERVE,
    show_default=True,
    help="File descriptors kept free for pool connections and the status port: no new proxy connection is accepted below it.",
)
@click.option(
    "--proxy-protocol-from",
    "proxy_protocol_from",
    metavar="CIDR",
    multiple=True,
    help="Balancer address or network (repeatable) whose connections start with a PROXY v2 header naming the real proxy; off by default.",
)
@click.option(
    "--proxy-protocol-to-pool",
    is_flag=True,
    help="Open each pool connection with a PROXY v2 header naming the rig (for pool software that reads it).",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0.0),
    default=30.0,
    show_default=True,
    help="On SIGTERM (or SIGUSR1): close the listener, tell proxies to move (rm.goaway) and exit once they have, or after this many seconds; 0 exits at once. A second SIGTERM exits now.",
)
@click.option("-v", "--verbose", count=True, help="More logging: -v debug, -vv the libraries' debug too.")
@log_format_option
@click.pass_context
def sidecar(
    context: click.Context,
    config_file: str | None,
    listen: str,
    pool_url: str | None,
    pool_ca: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
    revocations: str | None,
    udp_port: int | None,
    no_udp: bool,
    advertise: str | None,
    rekey_interval: float,
    dead_after: float,
    clock_skew: float,
    max_connections_per_cert: int,
    cert_warn_days: float,
    http_listen: str | None,
    metrics_per_worker: bool,
    http_tls: bool,
    http_require_operator: bool,
    enroll_ca: str | None,
    handshake_timeout: float,
    max_pending: int,
    max_pending_per_source: int,
    fd_reserve: int,
    verbose: int,
    log_format: str | None,
    proxy_protocol_from: tuple[str, ...] = (),
    proxy_protocol_to_pool: bool = False,
    drain_timeout: float = 30.0,
) -> None:
    """Pool-side sidecar: terminate StratumRM and relay each rig to the pool.

    Reloads --revocations, --cert and --key when they change (and on SIGHUP)
    without dropping sessions.
    """
    from bridge import settings as settings_module
    from bridge.net.proxy_protocol import TrustedBalancers
    from bridge.net.sidecar import SidecarServer
    from bridge.pki.revocation import RevocationList
    from bridge.pki.rotation import ServerCredentials
    from bridge.pki.tls import public_client_context

    given = settings_module.given_on_command_line(context)
    if "no_udp" in given:
        given["udp"] = not given.pop("no_udp")
    try:
        chosen = settings_module.merge("sidecar", config_file, given, rename={"pool_url": "pool"})
    except BridgeError as exc:
        raise OptionProblem(str(exc)) from None
    listen, pool_url, pool_ca, cert, key, ca = chosen.listen, chosen.pool, chosen.pool_ca, chosen.cert, chosen.key, chosen.ca
    revocations, udp_port, no_udp, advertise = chosen.revocations, chosen.udp_port, not chosen.udp, chosen.advertise
    rekey_interval, dead_after, clock_skew = chosen.rekey_interval, chosen.dead_after, chosen.clock_skew
    max_connections_per_cert, cert_warn_days = chosen.max_connections_per_cert, chosen.cert_warn_days
    http_listen, metrics_per_worker = chosen.http_listen, chosen.metrics_per_worker
    missing = [name for name, value in (("--cert", cert), ("--key", key), ("--ca", ca)) if not value]
    if missing:
        raise OptionProblem(MISSING_CERTIFICATES.format(missing=", ".join(missing), verb="is" if len(missing) == 1 else "are"))
    assert cert is not None and key is not None and ca is not None
    if not pool_url:
        raise OptionProblem(
            '--pool is required: the pool software, e.g. --pool stratum+tcp://127.0.0.1:3333 (or pool = "..." in --config)'
        )
    try:
        host, port = parse_listen(listen)
        pool = parse_upstream_url(pool_url)
        if pool.transport == "stratumrm":
            raise BridgeError("--pool is the pool software itself: stratum+tcp:// or stratum+ssl://, not stratumrm://")
        advertise_host, advertise_port = parse_advertise(advertise) if advertise else (None, None)
        http_address = parse_listen(http_listen) if http_listen else None
        warn_window = timedelta(days=cert_warn_days)
        credentials = ServerCredentials(cert, key, ca, expiry_warning=warn_window)
        pool_context = public_client_context(pool_ca) if pool.tls else None
        revocation_list = RevocationList(revocations, ca) if revocations else None
        balancers = TrustedBalancers(tuple(chosen.proxy_protocol_from))
        management = _management(http_address, cert, key, ca, chosen.http_tls, chosen.http_require_operator, chosen.enroll_ca)
    except BridgeError as exc:
        raise OptionProblem(str(exc)) from None
    setup_role(chosen, verbose)
    check_names({"--pool": pool.host})
    server = SidecarServer(
        pool,
        credentials,
        pool_ssl_context=pool_context,
        udp=not no_udp,
        udp_port=udp_port,
        advertise_host=advertise_host,
        advertise_port=advertise_port,
        rekey_interval=rekey_interval,
        heartbeat=min(1.0, dead_after / 5),
        dead_after=dead_after,
        revocations=revocation_list,
        clock_skew=timedelta(seconds=clock_skew),
        max_connections_per_cert=max_connections_per_cert or None,
        expiry_warning=warn_window,
        handshake_timeout=chosen.handshake_timeout,
        admission=AdmissionLimits(
            max_pending=chosen.max_pending,
            max_pending_per_source=chosen.max_pending_per_source,
            fd_reserve=chosen.fd_reserve,
        ),
        proxy_protocol_from=balancers,
        proxy_protocol_to_pool=chosen.proxy_protocol_to_pool,
    )
    listens = {"--listen": (host, port)}
    if http_address is not None:
        listens["--http-listen"] = http_address
    udp = {} if no_udp else {"--udp-port" if udp_port is not None else "--listen": (host, port if udp_port is None else udp_port)}
    run_role(
        _serve_until_signalled,
        server,
        host,
        port,
        http_address,
        metrics_per_worker,
        chosen.drain_timeout,
        management,
        listens=listens,
        udp=udp,
    )


async def _serve_until_signalled(
    server: SidecarServer,
    host: str,
    port: int,
    http_address: tuple[str, int] | None = None,
    metrics_per_worker: bool = False,
    drain_timeout: float = 0.0,
    management: Management | None = None,
) -> None:
    """Serve until SIGTERM; SIGHUP re-reads the revocation list and certificate files.

    With ``drain_timeout`` > 0 the first SIGTERM (or SIGUSR1, the drain command that
    does not count as a second SIGTERM) drains (:meth:`SidecarServer.drain`) and exits
    when done; a second SIGTERM exits at once.
    """
    from bridge.web.app import ManagementApp
    from bridge.web.roles import SidecarView

    management = management or Management()
    web = ManagementApp(
        SidecarView(server, metrics_per_worker=metrics_per_worker),
        containment=server.containment,
        ssl_context=management.ssl_context,
        guard=management.guard,
    )
    if management.enrollment is not None:
        from bridge.web.enroll import mount_enrollment

        mount_enrollment(web, management.enrollment, browser_tokens=management.browser_tokens)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, host, port)
        if http_address is not None:
            await nursery.start(web.serve, *http_address)
        if threading.current_thread() is threading.main_thread():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP: re-reading the revocation list and certificate files")
                        server.reload(force=True)
                        continue
                    if server.draining or drain_timeout <= 0:
                        if signum == signal.SIGTERM:
                            log.info("second SIGTERM: exiting now")
                            nursery.cancel_scope.cancel()
                            break
                        continue
                    log.info(
                        "shutting down (%s): draining first (proxies move to other sidecars within %g s; "
                        "SIGTERM again to exit now)",
                        signal.Signals(signum).name,
                        drain_timeout,
                    )
                    web.draining = True  # /readyz answers 503: balancers stop sending new proxies
                    nursery.start_soon(_drain_then_exit, server, drain_timeout, nursery.cancel_scope)


async def _drain_then_exit(server: SidecarServer, timeout: float, scope: trio.CancelScope) -> None:
    await server.drain(timeout, "sidecar draining for a restart")
    log.info("drain finished; exiting")
    scope.cancel()


class Management:
    """The management port's HTTPS context, operator check and enrollment service (see :func:`_management`)."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        guard: Guard | None = None,
        enrollment: EnrollmentService | None = None,
        browser_tokens: bool = False,
    ) -> None:
        self.ssl_context = ssl_context
        self.guard = guard
        self.enrollment = enrollment
        self.browser_tokens = browser_tokens
        """Operators may create enrollment tokens on the dashboard (needs operator certificates)."""


def _management(
    http_address: tuple[str, int] | None,
    cert: str,
    key: str,
    ca: str,
    tls: bool,
    require_operator: bool,
    enroll_ca: str | None,
) -> Management:
    """From the options: HTTPS for --http-tls (implied by the other two), the guard, the enrollment service."""
    if not (tls or require_operator or enroll_ca):
        return Management()
    if http_address is None:
        raise BridgeError(
            "--http-tls, --http-require-operator and --enroll-ca need --http-listen HOST:PORT (the management port they apply to)"
        )
    from bridge.web.access import management_tls_context, operator_guard

    context = management_tls_context(cert, key, ca if require_operator else None)
    open_paths: list[str] = ["/healthz", "/readyz"]
    enrollment = None
    if enroll_ca:
        from pathlib import Path

        from bridge.pki.authority import CertificateAuthority
        from bridge.pki.enrollment import (
            DATABASE_FILE,
            EnrollmentService,
            EnrollmentStore,
        )
        from bridge.web.enroll import OPEN_PATHS

        authority = CertificateAuthority.open(enroll_ca)
        enrollment = EnrollmentService(authority, EnrollmentStore(Path(enroll_ca) / DATABASE_FILE))
        open_paths += OPEN_PATHS
    guard = operator_guard(open_paths) if require_operator else None
    return Management(context, guard, enrollment, browser_tokens=require_operator)
