"""``stratumrm ping URL``: how long a pool takes to connect, handshake, subscribe and authorize.

The first thing a farm operator runs when something is wrong. Each attempt opens a
fresh connection and times its phases, then a summary follows, as ping does::

    PING stratum+ssl://pool.example.com:3334 as alice.ping
    attempt 1: connect 11.2 ms, tls 24.0 ms, subscribe 12.1 ms, authorize 13.0 ms, total 60.3 ms
    attempt 2: error: connection refused
    --- stratum+ssl://pool.example.com:3334 ---
    2 attempts, 1 answered, 50% failed
    total min/avg/max = 60.3/60.3/60.3 ms

- ``stratum+tcp://``: TCP connect, ``mining.subscribe``, ``mining.authorize``;
- ``stratum+ssl://``: the same with the TLS handshake timed on its own (verified
  against the system trust store, or ``--upstream-ca``);
- ``stratumrm://``: the proxy's own path to a sidecar: ``session`` is TCP, TLS 1.3
  with this farm's certificate and the ``rm.hello`` exchange (later attempts resume
  the TLS session, as the proxy does), then subscribe and authorize on a channel,
  which the sidecar relays to its pool.

Exit status 0 when every attempt answered, 1 when any failed, 2 for usage errors.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import ssl
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import click
import msgspec
import trio

from bridge.config import UpstreamURL, parse_upstream_url
from bridge.errors import BridgeError
from bridge.net.tcp import describe_error, tune_stream
from bridge.sv1.client import ClientSession
from bridge.sv1.events import Reply

__all__ = ["Attempt", "ping", "ping_once", "summary"]

AGENT = "stratumrm-ping"
RECEIVE_SIZE = 16384
MAX_LINE = 65536


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt: phase name -> milliseconds (in order), or the error that ended it."""

    phases: dict[str, float]
    error: str | None = None
    resumed: bool | None = None
    """stratumrm:// only: the TLS session was resumed."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def total(self) -> float:
        return sum(self.phases.values())


class _Failed(Exception):
    """An attempt's failure, already in words."""


_NETWORK_FAILURES = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, _Failed)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it came from, groups opened (trio groups connection attempts), bounded."""
    found: list[BaseException] = []
    pending = [exc]
    while pending and len(found) < 32:
        seen = pending.pop(0)
        found.append(seen)
        if isinstance(seen, BaseExceptionGroup):
            pending.extend(seen.exceptions)
        for origin in (seen.__cause__, seen.__context__):
            if origin is not None and origin not in found:
                pending.append(origin)
    return found


def _reason(exc: BaseException, timeout: float) -> str:
    """One line for a failure, without the library's internal wording."""
    for seen in _causes(exc):
        if isinstance(seen, _Failed):
            return str(seen)
        if isinstance(seen, ConnectionRefusedError) or getattr(seen, "errno", None) == errno.ECONNREFUSED:
            return "connection refused (nothing listens there: check the host, the port and that the pool runs)"
        if isinstance(seen, socket.gaierror):
            return "the host name does not resolve (check its spelling, or use an IP address)"
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({seen.verify_message}); pass the pool's CA with --upstream-ca or --bundle"
        if isinstance(seen, trio.TooSlowError):
            return f"no answer within {timeout:g} s"
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed ({seen.reason or seen}); is it a plain stratum+tcp:// port?"
    return describe_error(exc)


async def _wait_reply(session: ClientSession, stream: trio.abc.Stream, request_id: int | None) -> Reply:
    """Send what the session queued and read until the reply to ``request_id`` comes."""
    data = session.data_to_send()
    if data:
        await stream.send_all(data)
    while True:
        received = await stream.receive_some(RECEIVE_SIZE)
        if not received:
            raise _Failed("the pool closed the connection without answering")
        for event in session.receive_data(received):
            if type(event) is Reply and event.request_id == request_id:
                return event


def _check(reply: Reply, what: str, *, result_true: bool = False) -> None:
    """The request succeeded: no error (and, for authorize, ``result: true``)."""
    response = reply.response
    error = bytes(response.error)
    if error == b"null" and (not result_true or response.accepted):
        return
    said = error.decode(errors="replace") if error != b"null" else "result false"
    raise _Failed(f"{what} refused by the pool: {said[:200]}")


async def _ping_sv1(url: UpstreamURL, user: str, password: str, context: ssl.SSLContext | None) -> Attempt:
    phases: dict[str, float] = {}
    started = trio.current_time()
    tcp = await trio.open_tcp_stream(url.host, url.port)
    stream: trio.abc.Stream = tcp
    try:
        tune_stream(tcp)
        phases["connect"] = (trio.current_time() - started) * 1000
        if url.tls:
            assert context is not None
            started = trio.current_time()
            tls = trio.SSLStream(tcp, context, server_hostname=url.host, https_compatible=False)
            await tls.do_handshake()
            stream = tls
            phases["tls"] = (trio.current_time() - started) * 1000
        session = ClientSession(max_line=MAX_LINE)
        started = trio.current_time()
        _check(await _wait_reply(session, stream, session.subscribe(AGENT)), "mining.subscribe")
        phases["subscribe"] = (trio.current_time() - started) * 1000
        started = trio.current_time()
        _check(
            await _wait_reply(session, stream, session.authorize(user, password)), f"mining.authorize as {user}", result_true=True
        )
        phases["authorize"] = (trio.current_time() - started) * 1000
    finally:
        await trio.aclose_forcefully(stream)
    return Attempt(phases=phases)


async def _channel_reply(handle: Any, request_id: int) -> Reply:
    """Send what the channel queued and wait for the reply to ``request_id``."""
    await handle.flush()
    while True:
        try:
            events = await handle.receive()
        except ConnectionError as exc:
            raise _Failed(f"the sidecar closed the channel: {exc}") from None
        for event in events or ():
            if type(event) is Reply and event.request_id == request_id:
                return event


async def _ping_stratumrm(url: UpstreamURL, user: str, password: str, credentials: Any) -> Attempt:
    from bridge.net.rm_upstream import StratumRMLink

    phases: dict[str, float] = {}
    link = StratumRMLink(url, credentials, detect_blocks=False)
    resumed_before = _resumed(credentials)
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        try:
            started = trio.current_time()
            try:
                handle = await link.open_handle("ping")
            except ConnectionError as exc:
                raise _Failed(link.failure or str(exc)) from None
            phases["session"] = (trio.current_time() - started) * 1000
            channel = handle.session
            started = trio.current_time()
            _check(await _channel_reply(handle, channel.subscribe(AGENT)), "mining.subscribe")
            phases["subscribe"] = (trio.current_time() - started) * 1000
            started = trio.current_time()
            wanted = channel.request("mining.authorize", [user, password])
            _check(await _channel_reply(handle, wanted), f"mining.authorize as {user}", result_true=True)
            phases["authorize"] = (trio.current_time() - started) * 1000
        except _NETWORK_FAILURES as exc:
            failure = exc  # raised below, not grouped by the nursery
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return Attempt(phases=phases, resumed=_resumed(credentials) > resumed_before)


def _resumed(credentials: Any) -> int:
    return credentials.statistics(datetime.now(UTC)).handshakes_resumed


async def ping_once(url: UpstreamURL, *, user: str, password: str, timeout: float, context: Any = None) -> Attempt:
    """One attempt against ``url``; never raises for network trouble (the Attempt says it)."""
    try:
        with trio.fail_after(timeout):
            if url.transport == "stratumrm":
                return await _ping_stratumrm(url, user, password, context)
            return await _ping_sv1(url, user, password, context)
    except (*_NETWORK_FAILURES, trio.TooSlowError) as exc:
        return Attempt(phases={}, error=_reason(exc, timeout))


def format_attempt(number: int, attempt: Attempt) -> str:
    if not attempt.ok:
        return f"attempt {number}: error: {attempt.error}"
    phases = ", ".join(f"{name} {ms:.1f} ms" for name, ms in attempt.phases.items())
    resumed = " (TLS resumed)" if attempt.resumed else ""
    return f"attempt {number}: {phases}, total {attempt.total:.1f} ms{resumed}"


def summary(url: UpstreamURL, attempts: list[Attempt]) -> list[str]:
    answered = [attempt.total for attempt in attempts if attempt.ok]
    failed = len(attempts) - len(answered)
    lines = [
        f"--- {url} ---",
        f"{len(attempts)} attempts, {len(answered)} answered, {round(100 * failed / len(attempts))}% failed",
    ]
    if answered:
        average = math.fsum(answered) / len(answered)
        lines.append(f"total min/avg/max = {min(answered):.1f}/{average:.1f}/{max(answered):.1f} ms")
    return lines


def _credentials(bundle: str | None, cert: str | None, key: str | None, ca: str | None) -> Any:
    from bridge.pki.rotation import ClientCredentials

    if bundle:
        return ClientCredentials.from_bundle(bundle, expiry_warning=timedelta(days=0))
    if cert and key and ca:
        return ClientCredentials.from_files(cert, key, ca, expiry_warning=timedelta(days=0))
    raise click.UsageError(
        "a stratumrm:// URL needs this farm's certificate: pass --bundle FILE (from 'stratumrm pki issue-miner') "
        "or --cert, --key and --ca"
    )


def _default_user(credentials: Any) -> str:
    from bridge.pki.identity import identity_of

    certificate = credentials.certificate
    accounts = identity_of(certificate).accounts if certificate is not None else ()
    return f"{accounts[0]}.ping" if accounts else "ping"


@click.command("ping")
@click.argument("url")
@click.option("-c", "--count", type=click.IntRange(1, 1000), default=4, show_default=True, help="Attempts.")
@click.option("-i", "--interval", type=click.FloatRange(0.0), default=1.0, show_default=True, help="Seconds between attempts.")
@click.option("-W", "--timeout", type=click.FloatRange(0.1), default=10.0, show_default=True, help="Seconds an attempt may take.")
@click.option("--user", "-u", help="Worker to authorize as (default: ACCOUNT.ping from the bundle, or 'ping').")
@click.option("--password", "-p", default="x", show_default=True, help="Its password.")
@click.option(
    "--bundle", type=click.Path(exists=True, dir_okay=False), help="stratumrm://: this farm's bundle (stratumrm pki issue-miner)."
)
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="stratumrm://: the certificate, instead of --bundle.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="stratumrm://: its private key.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), help="stratumrm://: the pool operator's CA.")
@click.option(
    "--upstream-ca",
    type=click.Path(exists=True, dir_okay=False),
    help="stratum+ssl://: CA to verify the pool (default: the system trust store).",
)
def ping(
    url: str,
    count: int,
    interval: float,
    timeout: float,
    user: str | None,
    password: str,
    bundle: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
    upstream_ca: str | None,
) -> None:
    """Time connect, TLS, subscribe and authorize against a pool or sidecar, COUNT times.

    URL is stratumrm://SIDECAR:PORT, stratum+tcp://HOST:PORT or stratum+ssl://HOST:PORT.
    Exit status: 0 when every attempt answered, 1 when any failed.
    """
    from bridge.pki.tls import public_client_context

    try:
        target = parse_upstream_url(url)
    except BridgeError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        if target.transport == "stratumrm":
            context: Any = _credentials(bundle, cert, key, ca)
            user = user or _default_user(context)
        else:
            context = public_client_context(upstream_ca) if target.tls else None
            user = user or "ping"
    except BridgeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"PING {target} as {user}")
    quiet = logging.getLogger("bridge")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # each attempt's line says what went wrong; no duplicate warnings
    try:
        attempts = trio.run(_run, target, count, interval, timeout, user, password, context)
    finally:
        quiet.setLevel(level)
    for line in summary(target, attempts):
        click.echo(line)
    sys.exit(0 if all(attempt.ok for attempt in attempts) else 1)


async def _run(
    target: UpstreamURL, count: int, interval: float, timeout: float, user: str, password: str, context: Any
) -> list[Attempt]:
    attempts: list[Attempt] = []
    for number in range(1, count + 1):
        if number > 1:
            await trio.sleep(interval)
        attempt = await ping_once(target, user=user, password=password, timeout=timeout, context=context)
        attempts.append(attempt)
        click.echo(format_attempt(number, attempt))
    return attempts
