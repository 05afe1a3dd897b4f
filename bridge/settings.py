"""The settings of each role, one model per role, and the one place they are merged.

:class:`ProxySettings` (``stratumrm proxy``) and :class:`SidecarSettings`
(``stratumrm sidecar``) are msgspec Structs whose fields carry their documentation
(``Meta(description=..., extra={"breaks": ...})``). From that one model come:

- the defaults;
- the TOML file (``--config FILE``), read with ``tomllib`` and converted with
  msgspec, unknown keys refused; :func:`load` names the file, the key and the
  valid choices in its errors;
- :func:`merge`: defaults < file < flags given on the command line;
- :func:`example`: ``stratumrm config example proxy|sidecar``, every key with
  what it does, its default and what breaks if it is wrong (so the example
  cannot drift from the model);
- :func:`check_file`: ``stratumrm config check FILE``.

Keys marked secret (``extra={"secret": True}``) are shown as ``***`` by
:func:`describe`, the only way settings reach a log.
"""

from __future__ import annotations

import difflib
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from bridge.config import parse_listen, parse_upstream_entry, parse_upstream_url
from bridge.errors import ConfigError
from bridge.net.admission import (
    DEFAULT_FD_RESERVE,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_PER_SOURCE,
    RIG_MAX_PENDING,
    RIG_MAX_PENDING_PER_SOURCE,
)

__all__ = [
    "ROLES",
    "FailoverSettings",
    "InterceptSettings",
    "ProxySettings",
    "SidecarSettings",
    "UpstreamSettings",
    "check_file",
    "describe",
    "detect_role",
    "example",
    "load",
    "merge",
]


def _doc(
    description: str,
    breaks: str,
    *,
    secret: bool = False,
    path: bool = False,
    example: Any = None,
    required: bool = False,
    commented: bool = False,
    **limits: Any,
) -> Meta:
    extra: dict[str, Any] = {"breaks": breaks}
    if commented:
        extra["commented"] = True  # an optional table: the example shows it commented out
    if required:
        extra["required"] = True
    if secret:
        extra["secret"] = True
    if path:
        extra["path"] = True
    if example is not None:
        extra["example"] = example
    return Meta(description=description, extra=extra, **limits)


LogFormat = Literal["text", "json"]
LogLevel = Literal["warning", "info", "debug"]


class UpstreamSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[[upstream]]``: one pool, in priority order (the first is the primary)."""

    url: Annotated[
        str,
        _doc(
            "Pool URL: stratumrm://SIDECAR:PORT, stratum+tcp://HOST:PORT or stratum+ssl://HOST:PORT, "
            "with #xnsub when the pool supports mining.extranonce.subscribe",
            "rigs get no work from this upstream; an unknown scheme or fragment is refused at start",
            example="stratumrm://sidecar.pool.example:3334",
        ),
    ]
    priority: Annotated[
        int | None,
        _doc(
            "Failover level, lower first; upstreams of one level share the rigs by weight",
            "rigs sit on a backup while the primary is healthy (or the other way round)",
            example=0,
        ),
    ] = None
    weight: Annotated[
        float,
        _doc(
            'This upstream\'s share of the rigs within its level (or across all, strategy = "weighted")',
            "hashrate split the wrong way between pools",
            ge=0,
        ),
    ] = 1.0
    name: Annotated[
        str | None,
        _doc(
            "Name used in logs and status instead of HOST:PORT",
            "nothing but harder-to-read logs",
            example="primary",
        ),
    ] = None


class InterceptSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[[intercept]]``: connections the kernel redirected to ``match`` go to ``upstream``."""

    match: Annotated[
        str,
        _doc(
            "HOST:PORT the rigs are configured with (their original destination; a name is resolved at start)",
            "redirected rigs fall to intercept_default instead of this upstream",
            example="pool.example.com:3333",
        ),
    ]
    upstream: Annotated[
        str,
        _doc(
            "Upstream URL for those rigs: stratumrm://SIDECAR:PORT, stratum+tcp:// or stratum+ssl://",
            "redirected rigs get no work; an unknown scheme is refused at start",
            example="stratumrm://sidecar.pool.example:3334",
        ),
    ]


class FailoverSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[failover]``: when rigs leave an upstream and when they come back (bridge/relay/failover.py)."""

    strategy: Annotated[
        Literal["failover", "weighted"],
        _doc(
            "failover: the first healthy priority level takes every rig; weighted: rigs split across all "
            "healthy upstreams by weight",
            "with weighted, hashrate goes to backups you meant to keep idle",
        ),
    ] = "failover"
    silence_timeout: Annotated[
        float,
        _doc(
            "Seconds an upstream may stay silent, although asked (keepalive), before it counts as down",
            "too low: rigs flap between pools on a slow link; too high: lost hashrate while a pool is dead",
            gt=0,
        ),
    ] = 5.0
    keepalive: Annotated[
        Literal["subscribe", "ping", "none"],
        _doc(
            "How a quiet upstream proves it is alive: a fresh connection's mining.subscribe (StratumRM: the "
            "link's rm.ping), mining.ping on the probe session, or nothing (no silence detection)",
            "ping on a pool that ignores it marks the pool down; none disables silence detection",
        ),
    ] = "subscribe"
    job_timeout: Annotated[
        float,
        _doc(
            "Seconds without a mining.notify after which an upstream is down",
            "too low: a pool with slow jobs is abandoned; too high: rigs hash stale work for long",
            gt=0,
        ),
    ] = 90.0
    lag_delay: Annotated[
        float,
        _doc(
            "Seconds an upstream may trail another one's new block before it counts as lagging (down)",
            "too low: brief propagation delays cause moves; too high: stale shares on a lagging pool",
            gt=0,
        ),
    ] = 5.0
    hold_down: Annotated[
        float,
        _doc(
            "Seconds a recovered upstream must stay healthy before rigs fail back to it",
            "too low: rigs bounce on a flapping pool; too high: rigs stay on the backup for long",
            ge=0,
        ),
    ] = 120.0
    switch_rate: Annotated[
        float,
        _doc(
            "Rigs moved per second at most during a failover",
            "too high: the backup pool sees a connection storm; too low: moves take long on a big farm",
            gt=0,
        ),
    ] = 500.0
    switch_burst: Annotated[
        int,
        _doc(
            "Rigs moved at once before switch_rate applies",
            "as switch_rate",
            ge=1,
        ),
    ] = 25
    drain_timeout: Annotated[
        float,
        _doc(
            "Seconds the old upstream keeps its verdict path after a switch (shares in flight)",
            "too low: answers to shares in flight are lost (rigs count them as rejected)",
            ge=0,
        ),
    ] = 10.0
    no_upstream: Annotated[
        Literal["disconnect", "keep"],
        _doc(
            "No upstream usable: disconnect the rigs (their own backup pools take over) or keep them on their last job",
            "keep with rigs that have their own backups: they hash stale work instead of moving",
        ),
    ] = "disconnect"
    no_upstream_grace: Annotated[
        float,
        _doc(
            "Seconds without any usable upstream before rigs are disconnected",
            "too low: a brief outage disconnects the whole farm",
            ge=0,
        ),
    ] = 5.0
    probe_user: Annotated[
        str | None,
        _doc(
            "Worker name the health probes authorize as (default: the first rig's)",
            "a name the pool refuses makes every upstream look down",
            example="farm1.probe",
        ),
    ] = None
    probe_password: Annotated[
        str | None,
        _doc(
            "Its password (default: that rig's); never logged",
            "as probe_user",
            secret=True,
            example="x",
        ),
    ] = None


class ProxySettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``stratumrm proxy``: the miner side."""

    listen: Annotated[
        str,
        _doc(
            "HOST:PORT where rigs connect",
            "rigs cannot connect (point them at this address); a port in use stops the start",
        ),
    ] = "0.0.0.0:3333"
    upstream: Annotated[
        list[UpstreamSettings],
        _doc(
            "The pools, in priority order (see [[upstream]] below)",
            "no upstream: the proxy does not start",
        ),
    ] = []
    intercept: Annotated[
        list[InterceptSettings],
        _doc(
            "Transparent interception at a farm gateway (nftables REDIRECT to listen): rigs keep their pool URL "
            "and each original destination maps to an upstream (deploy/nftables)",
            "redirected rigs reach the wrong pool, or fall to intercept_default",
            commented=True,
        ),
    ] = []
    intercept_default: Annotated[
        Literal["pass", "refuse"],
        _doc(
            "Redirected connections no [[intercept]] matches: pass (to their original destination, untouched) or refuse",
            "pass lets unmatched rigs mine in the clear; refuse cuts them off",
        ),
    ] = "pass"
    bundle: Annotated[
        str | None,
        _doc(
            "Certificate, key and CA in one file (from `stratumrm pki issue-miner` or `stratumrm proxy enroll`), "
            "for stratumrm:// upstreams; relative to this file",
            "the sidecar refuses the proxy (wrong CA, expired or revoked certificate, account not covered)",
            path=True,
            example="farm1.bundle.pem",
        ),
    ] = None
    cert: Annotated[
        str | None, _doc("This proxy's certificate, instead of bundle", "as bundle", path=True, example="farm1.crt")
    ] = None
    key: Annotated[str | None, _doc("Its private key, instead of bundle", "as bundle", path=True, example="farm1.key")] = None
    ca: Annotated[
        str | None,
        _doc(
            "The pool operator's CA certificate, instead of bundle",
            "the sidecar's certificate is not trusted",
            path=True,
            example="ca.crt",
        ),
    ] = None
    upstream_ca: Annotated[
        str | None,
        _doc(
            "CA file to verify stratum+ssl:// pools (default: the system trust store)",
            "the TLS handshake with the pool fails",
            path=True,
            example="pool-ca.pem",
        ),
    ] = None
    submit_timeout: Annotated[
        float,
        _doc(
            "Seconds to wait for a pool's verdict before answering the rig with an explicit error",
            "too low: good shares reported as rejected to the rig",
            gt=0,
        ),
    ] = 60.0
    opening_timeout: Annotated[
        float,
        _doc(
            "Seconds a new rig connection may stay silent before it is closed",
            "too low: slow firmware cannot connect; too high: scanners hold sockets",
            gt=0,
        ),
    ] = 10.0
    share_batch_window: Annotated[
        float,
        _doc(
            "Seconds a UDP share that follows another within them waits, so concurrent shares travel in one datagram (e.g. 0.001 for large farms)",
            "adds up to this much latency to a share that follows another; a lone share never waits",
            ge=0,
        ),
    ] = 0.0
    max_pending: Annotated[
        int,
        _doc(
            "Rig connections that have not sent their first Stratum request yet, at most (a flood is refused beyond)",
            "too low: a farm reconnecting at once is partly refused for a moment; too high: a flood holds sockets",
            ge=1,
        ),
    ] = RIG_MAX_PENDING
    max_pending_per_source: Annotated[
        int,
        _doc(
            "... of them from one IP address (raise it for many rigs behind one NAT that reconnect at once)",
            "too low: rigs behind one NAT are refused after a power cut",
            ge=1,
        ),
    ] = RIG_MAX_PENDING_PER_SOURCE
    fd_reserve: Annotated[
        int,
        _doc(
            "File descriptors kept free for upstream connections and the status port: no new rig is accepted below it",
            "0: a flood can use the last descriptor and cut the proxy off from its pools",
            ge=0,
        ),
    ] = DEFAULT_FD_RESERVE
    cert_warn_days: Annotated[
        float,
        _doc(
            "Warn (log, status) when this proxy's certificate expires within this many days",
            "0: no warning before the sidecar starts refusing an expired certificate",
            ge=0,
        ),
    ] = 14.0
    http_listen: Annotated[
        str | None,
        _doc(
            "Management port, HOST:PORT: dashboard, /metrics, /api/v1/..., /healthz, /readyz and /status",
            "statistics exposed to whoever reaches the port: keep it on 127.0.0.1 or a management network",
            example="127.0.0.1:9100",
        ),
    ] = None
    metrics_per_worker: Annotated[
        bool,
        _doc(
            "Add per-worker series to /metrics (capped at the busiest 1000 workers)",
            "thousands more series per scrape on a large farm: Prometheus needs more memory",
        ),
    ] = False
    log_format: Annotated[
        LogFormat,
        _doc(
            "text: one readable line per event; json: one JSON object per line (journald, Loki)",
            "log collectors expecting JSON cannot parse text lines",
        ),
    ] = "text"
    log_level: Annotated[
        LogLevel,
        _doc(
            "warning, info or debug (each -v on the command line is one level more than info)",
            "debug logs every share and fills disks on big farms",
        ),
    ] = "info"
    failover: Annotated[FailoverSettings, _doc("When rigs leave an upstream and when they come back", "see each key")] = (
        FailoverSettings()
    )

    def entries(self) -> list:
        """The upstreams as :class:`bridge.config.UpstreamEntry`, priorities defaulting to the position."""
        from bridge.config import UpstreamEntry

        entries = []
        for position, item in enumerate(self.upstream):
            entry = parse_upstream_entry(item.url, position)
            entries.append(
                UpstreamEntry(
                    entry.url,
                    entry.priority if item.priority is None else item.priority,
                    item.weight if item.weight != 1.0 else entry.weight,
                    item.name or entry.name,
                )
            )
        return entries

    def validate(self) -> None:
        """Check the values the types do not (addresses, URLs); ConfigError names the key."""
        _check(lambda: parse_listen(self.listen), "listen")
        if self.http_listen is not None:
            _check(lambda: parse_listen(self.http_listen), "http_listen")
        for index, item in enumerate(self.upstream):
            _check(lambda url=item.url, index=index: parse_upstream_entry(url, index), f"upstream[{index}].url")


class SidecarSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``stratumrm sidecar``: the pool side."""

    listen: Annotated[
        str,
        _doc(
            "HOST:PORT where proxies connect (TLS control channel; UDP shares on the same port number)",
            "proxies cannot connect; open TCP and UDP on this port in the firewall",
        ),
    ] = "0.0.0.0:3334"
    pool: Annotated[
        str | None,
        _doc(
            "The pool software: stratum+tcp://HOST:PORT or stratum+ssl://HOST:PORT (required)",
            "every rig's channel fails to open; the sidecar reports the pool down to its proxies",
            example="stratum+tcp://127.0.0.1:3333",
            required=True,
        ),
    ] = None
    pool_ca: Annotated[
        str | None,
        _doc(
            "CA file to verify a stratum+ssl:// pool (default: the system trust store)",
            "the TLS handshake with the pool fails",
            path=True,
            example="pool-ca.pem",
        ),
    ] = None
    cert: Annotated[
        str | None,
        _doc(
            "This sidecar's certificate (`stratumrm pki issue-pool`; required), relative to this file",
            "proxies refuse the sidecar: the name or address they dial must be in it",
            path=True,
            example="sidecar.crt",
            required=True,
        ),
    ] = None
    key: Annotated[
        str | None,
        _doc(
            "The private key of cert (required); readable by the service user only",
            "the sidecar does not start",
            path=True,
            example="sidecar.key",
            required=True,
        ),
    ] = None
    ca: Annotated[
        str | None,
        _doc(
            "The StratumRM CA certificate that proxies' certificates are checked against (required)",
            "every proxy is refused (wrong CA)",
            path=True,
            example="ca.crt",
            required=True,
        ),
    ] = None
    revocations: Annotated[
        str | None,
        _doc(
            "Revocation list to enforce and watch (the CA's revocations.pem)",
            "revoked proxies keep mining",
            path=True,
            example="revocations.pem",
        ),
    ] = None
    udp: Annotated[
        bool,
        _doc(
            "Offer the UDP share channel (false: shares travel over the TLS control channel)",
            "false gives up the low-latency share path; true behind a firewall that drops UDP costs a fallback",
        ),
    ] = True
    udp_port: Annotated[
        int | None,
        _doc(
            "UDP port for shares (default: the listen port number)",
            "proxies send shares to a closed port and fall back to TLS",
            example=3334,
        ),
    ] = None
    advertise: Annotated[
        str | None,
        _doc(
            "UDP address to tell proxies, HOST[:PORT] (a sidecar behind NAT)",
            "proxies send UDP shares to an unreachable address and fall back to TLS",
            example="203.0.113.7:3334",
        ),
    ] = None
    rekey_interval: Annotated[
        float, _doc("Seconds between new UDP keys", "very low values cost handshakes; very high weaken forward secrecy", ge=1)
    ] = 3600.0
    dead_after: Annotated[
        float,
        _doc(
            "Seconds of silence after which a proxy is dead",
            "too low: proxies on lossy links are dropped; too high: dead sessions hold pool connections",
            ge=0.5,
        ),
    ] = 5.0
    clock_skew: Annotated[
        float,
        _doc(
            "Seconds of leeway on certificates' validity periods (clocks that disagree)",
            "too low: fresh certificates refused as not yet valid on a farm with a fast clock",
            ge=0,
        ),
    ] = 10.0
    max_connections_per_cert: Annotated[
        int,
        _doc(
            "Control connections one proxy certificate may hold at once (0: no limit)",
            "too low: proxies sharing a bundle are refused; 0: a leaked bundle can open any number",
            ge=0,
        ),
    ] = 4
    handshake_timeout: Annotated[
        float,
        _doc(
            "Seconds a proxy has to finish the TLS handshake",
            "too low: proxies on slow links are refused; too high: silent connections hold sockets longer",
            ge=0.1,
        ),
    ] = DEFAULT_HANDSHAKE_TIMEOUT
    max_pending: Annotated[
        int,
        _doc(
            "Connections still in their TLS handshake, at most (a flood is refused beyond, or evicts its own oldest)",
            "too low: proxies reconnecting after an outage wait; too high: a flood costs memory",
            ge=1,
        ),
    ] = DEFAULT_MAX_PENDING
    max_pending_per_source: Annotated[
        int, _doc("... of them from one IP address", "too low: many proxies behind one balancer or NAT are refused", ge=1)
    ] = DEFAULT_MAX_PENDING_PER_SOURCE
    fd_reserve: Annotated[
        int,
        _doc(
            "File descriptors kept free for pool connections and the status port: no new proxy connection below it",
            "0: a flood can use the last descriptor and cut rigs off from the pool",
            ge=0,
        ),
    ] = DEFAULT_FD_RESERVE
    cert_warn_days: Annotated[
        float,
        _doc(
            "Warn (log, status) when a certificate expires within this many days",
            "0: no warning before proxies are refused for an expired certificate",
            ge=0,
        ),
    ] = 14.0
    http_listen: Annotated[
        str | None,
        _doc(
            "Management port, HOST:PORT: dashboard, /metrics, /api/v1/..., /healthz, /readyz and /status",
            "statistics exposed to whoever reaches the port: keep it on 127.0.0.1 or a management network",
            example="127.0.0.1:9101",
        ),
    ] = None
    http_tls: Annotated[
        bool,
        _doc(
            "Serve the management port over HTTPS with cert and key (implied by http_require_operator and enroll_ca)",
            "false: statistics and the dashboard travel in the clear to whoever listens on the management network",
        ),
    ] = False
    http_require_operator: Annotated[
        bool,
        _doc(
            "Let onto the management port only browsers with an operator certificate of ca "
            "(`stratumrm pki issue-operator NAME`); enrollment and /healthz, /readyz stay open; also lets operators "
            "create enrollment tokens on the dashboard",
            "false: anyone who reaches the port sees rigs, accounts and certificates; true without the certificate "
            "installed: your browser gets a refusal page",
        ),
    ] = False
    enroll_ca: Annotated[
        str | None,
        _doc(
            "CA directory (`stratumrm pki init --dir`) whose CA signs enrollments on the management port "
            "(`stratumrm proxy enroll`); its enrollment.sqlite holds the tokens and the audit trail",
            "unset: `stratumrm proxy enroll` gets 404; a directory the sidecar cannot read stops the start",
            path=True,
            example="pki",
        ),
    ] = None
    proxy_protocol_from: Annotated[
        list[str],
        _doc(
            "Balancer addresses or networks (CIDR) whose connections start with a PROXY v2 header naming the real "
            "proxy; empty: off",
            "a balancer left out: every proxy looks like the balancer (one admission source); a range too wide: "
            "anyone there can claim any address",
            example=["10.0.0.5/32"],
        ),
    ] = []
    proxy_protocol_to_pool: Annotated[
        bool,
        _doc(
            "Open each pool connection with a PROXY v2 header naming the rig (pool software that reads it)",
            "a pool that does not read the header closes every connection",
        ),
    ] = False
    drain_timeout: Annotated[
        float,
        _doc(
            "On SIGTERM (or SIGUSR1): close the listener, tell proxies to move (rm.goaway) and exit once they have, "
            "or after this many seconds; 0 exits at once",
            "0: a restart drops every rig of this sidecar's proxies for a reconnect",
            ge=0,
        ),
    ] = 30.0
    metrics_per_worker: Annotated[
        bool,
        _doc(
            "Add per-worker series to /metrics (capped at the busiest 1000 workers)",
            "thousands more series per scrape on a large farm: Prometheus needs more memory",
        ),
    ] = False
    log_format: Annotated[
        LogFormat,
        _doc(
            "text: one readable line per event; json: one JSON object per line (journald, Loki)",
            "log collectors expecting JSON cannot parse text lines",
        ),
    ] = "text"
    log_level: Annotated[
        LogLevel,
        _doc(
            "warning, info or debug (each -v on the command line is one level more than info)",
            "debug logs every share and fills disks on a big pool",
        ),
    ] = "info"

    def validate(self) -> None:
        if self.udp_port is not None and not 0 <= self.udp_port <= 65535:
            raise ConfigError("key udp_port: a port number from 0 to 65535")
        _check(lambda: parse_listen(self.listen), "listen")
        if self.http_listen is not None:
            _check(lambda: parse_listen(self.http_listen), "http_listen")
        if self.pool is not None:
            url = _check(lambda: parse_upstream_url(self.pool), "pool")
            if url.transport == "stratumrm":
                raise ConfigError("key pool: the pool software itself, stratum+tcp:// or stratum+ssl://, not stratumrm://")
        if self.advertise is not None:
            from bridge.net.sidecar_command import parse_advertise

            _check(lambda: parse_advertise(self.advertise), "advertise")


ROLES: dict[str, type[Struct]] = {"proxy": ProxySettings, "sidecar": SidecarSettings}


def _check(function, key: str):
    try:
        return function()
    except ConfigError as exc:
        raise ConfigError(f"key {key}: {exc}") from None


# ---------------------------------------------------------------- reading


def _unwrap(annotation: Any) -> tuple[Any, Meta | None]:
    if typing.get_origin(annotation) is Annotated:
        base, *extras = typing.get_args(annotation)
        return base, next((item for item in extras if isinstance(item, Meta)), None)
    return annotation, None


def _field_table(model: type[Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {field.name: field for field in msgspec.structs.fields(model)}


def _struct_at(model: type[Struct], path: list[str]) -> type[Struct] | None:
    """The Struct type at a dotted path (list items included), or None."""
    current: Any = model
    for part in path:
        if re.fullmatch(r"\d+", part):
            continue
        fields = _field_table(current) if isinstance(current, type) and issubclass(current, Struct) else {}
        if part not in fields:
            return None
        base, _ = _unwrap(fields[part].type)
        while typing.get_origin(base) in (list, types.UnionType, typing.Union):
            base = next(arg for arg in typing.get_args(base) if arg is not type(None))
        current = base
    return current if isinstance(current, type) and issubclass(current, Struct) else None


def _field_at(model: type[Struct], path: list[str]) -> msgspec.structs.FieldInfo | None:
    parent = _struct_at(model, path[:-1])
    return _field_table(parent).get(path[-1]) if parent is not None and path else None


def _dotted(path: list[str]) -> str:
    """``["upstream", "0", "url"]`` -> ``upstream[0].url``."""
    text = ""
    for part in path:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text


def _explain(path_name: str, model: type[Struct], exc: msgspec.ValidationError) -> str:
    """A ValidationError in people's words: the key, what is wrong, the valid choices."""
    text = str(exc)
    message, _, where = text.partition(" - at `$")
    where = where.rstrip("`")
    path = [part for part in re.split(r"[.\[\]]+", where) if part]
    key = _dotted(path) or "(top level)"
    unknown = re.fullmatch(r"Object contains unknown field `(.+)`", message)
    if unknown:
        name = unknown.group(1)
        parent = _struct_at(model, path)
        valid = sorted(_field_table(parent)) if parent is not None else []
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if parent is not None and not close:
            for section in _field_table(parent):
                inner = _struct_at(parent, [section])
                if inner is not None and name in _field_table(inner):
                    hint = f" (it belongs in the [{section}] table)"
        full = _dotted([*path, name])
        return f"{path_name}: unknown key {full}{hint}; valid keys{' in ' + key if path else ''}: {', '.join(valid)}"
    field = _field_at(model, path)
    if field is not None:
        base, _ = _unwrap(field.type)
        choices = _choices(base)
        if choices:
            return f"{path_name}: key {key}: {message.lower()}; valid choices: {', '.join(map(str, choices))}"
    missing = re.fullmatch(r"Object missing required field `(.+)`", message)
    if missing:
        return f"{path_name}: key {_dotted([*path, missing.group(1)])} is required here"
    return f"{path_name}: key {key}: {message[0].lower() + message[1:]}"


def _choices(base: Any) -> tuple:
    if typing.get_origin(base) is Literal:
        return typing.get_args(base)
    if typing.get_origin(base) in (types.UnionType, typing.Union):
        for arg in typing.get_args(base):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return ()


def parse(text: str, model: type[Struct], path_name: str = "<config>") -> Struct:
    """TOML text to a settings model (no file-path resolution, no semantic checks)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path_name} is not valid TOML: {exc}") from None
    try:
        return msgspec.convert(data, model)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(path_name, model, exc)) from None


def load(path: str | Path, role: str) -> Struct:
    """Read a role's file; relative certificate paths are taken from the file's directory."""
    model = ROLES[role]
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    settings = parse(text, model, str(path))
    try:
        settings.validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    relative = {}
    for name, field in _field_table(model).items():
        _, meta = _unwrap(field.type)
        value = getattr(settings, name)
        if meta is not None and (meta.extra or {}).get("path") and value is not None and not Path(value).is_absolute():
            relative[name] = str(path.parent / value)
    return msgspec.structs.replace(settings, **relative) if relative else settings


def merge(role: str, config_file: str | None, given: dict[str, Any], rename: dict[str, str] | None = None) -> Any:
    """Defaults < file < flags: ``given`` holds only the options set on the command line.

    A flag's name is the settings key (``hold_down``), or a key of the ``[failover]``
    section, or ``rename`` maps it (``pool_url`` -> ``pool``). Flags that are not
    settings are ignored here.
    """
    model = ROLES[role]
    settings = load(config_file, role) if config_file else model()
    rename = rename or {}
    top = _field_table(model)
    section_changes: dict[str, dict[str, Any]] = {}
    changes: dict[str, Any] = {}
    for flag, value in given.items():
        name = rename.get(flag, flag)
        if name in top:
            changes[name] = value
            continue
        for section_name, field in top.items():
            base, _ = _unwrap(field.type)
            if isinstance(base, type) and issubclass(base, Struct) and name in _field_table(base):
                section_changes.setdefault(section_name, {})[name] = value
                break
    for section_name, values in section_changes.items():
        changes[section_name] = msgspec.structs.replace(getattr(settings, section_name), **values)
    if changes:
        settings = msgspec.structs.replace(settings, **changes)
        try:
            settings.validate()
        except ConfigError as exc:
            raise ConfigError(f"command line: {exc}") from None
    return settings


def given_on_command_line(context: Any) -> dict[str, Any]:
    """The options of a click command the user actually typed (or set in the environment)."""
    import click

    typed = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return {name: value for name, value in context.params.items() if context.get_parameter_source(name) in typed}


def detect_role(path: str | Path) -> str:
    """``proxy`` or ``sidecar`` from a file's keys (``pool`` or ``udp``: sidecar; ``upstream``: proxy)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    proxy_only = set(_field_table(ProxySettings)) - set(_field_table(SidecarSettings))
    sidecar_only = set(_field_table(SidecarSettings)) - set(_field_table(ProxySettings))
    keys = set(data)
    if keys & sidecar_only and not keys & proxy_only:
        return "sidecar"
    if keys & proxy_only and not keys & sidecar_only:
        return "proxy"
    raise ConfigError(f"{path}: cannot tell whether it is a proxy or a sidecar file; pass --role proxy|sidecar")


def check_file(path: str | Path, role: str | None = None, *, files: bool = True) -> tuple[str, Struct, list[str]]:
    """Validate a file: (role, settings, warnings); ConfigError on the first error.

    With ``files``, certificate and key paths must exist and be readable.
    """
    role = role or detect_role(path)
    settings = load(path, role)
    warnings: list[str] = []
    if role == "proxy" and not settings.upstream:
        warnings.append("no [[upstream]]: give one with -o/--upstream on the command line")
    if role == "sidecar":
        missing = [name for name in ("pool", "cert", "key", "ca") if getattr(settings, name) is None]
        if missing:
            warnings.append(
                f"{', '.join(missing)} not set: give {'them' if len(missing) > 1 else 'it'} on the "
                f"command line (--{' --'.join(m.replace('_', '-') for m in missing)})"
            )
    if files:
        for name, field in _field_table(ROLES[role]).items():
            _, meta = _unwrap(field.type)
            value = getattr(settings, name)
            if meta is not None and (meta.extra or {}).get("path") and value is not None:
                try:
                    if Path(value).is_dir():  # enroll_ca: a CA directory
                        Path(value, "ca.pem").read_bytes()
                    else:
                        Path(value).read_bytes()
                except OSError as exc:
                    raise ConfigError(f"{path}: key {name}: cannot read {value}: {exc.strerror or exc}") from None
    return role, settings, warnings


def describe(settings: Struct) -> dict[str, Any]:
    """The settings as plain data with secrets replaced by ``***`` (for logs and ``config check``)."""

    def walk(value: Any) -> Any:
        if isinstance(value, Struct):
            out = {}
            for name, field in _field_table(type(value)).items():
                _, meta = _unwrap(field.type)
                item = getattr(value, name)
                secret = meta is not None and (meta.extra or {}).get("secret")
                out[name] = "***" if secret and item is not None else walk(item)
            return out
        if isinstance(value, list):
            return [walk(item) for item in value]
        return value

    return walk(settings)


# ---------------------------------------------------------------- the example


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return str(value)


def _wrap(text: str, prefix: str = "# ", width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, initial_indent=prefix, subsequent_indent=prefix) or [prefix.rstrip()]


def _field_lines(field: msgspec.structs.FieldInfo) -> list[str]:
    base, meta = _unwrap(field.type)
    extra = (meta.extra or {}) if meta is not None else {}
    lines = _wrap(meta.description if meta is not None and meta.description else field.name)
    choices = _choices(base)
    if choices:
        lines += _wrap("choices: " + ", ".join(map(str, choices)))
    default = field.default
    if default is msgspec.NODEFAULT and field.default_factory is not msgspec.NODEFAULT:
        default = field.default_factory()
    shown_default = "none" if default is None else _toml_value(default)
    lines += _wrap(f"default: {shown_default}")
    if extra.get("breaks"):
        lines += _wrap(f"if wrong: {extra['breaks']}")
    if default is None:
        sample = _toml_value(extra.get("example", ""))
        lines.append(f"{field.name} = {sample}" if extra.get("required") else f"# {field.name} = {sample}")
    else:
        lines.append(f"{field.name} = {_toml_value(default)}")
    return lines


def example(role: str) -> str:
    """A complete, commented TOML file for ``role``, generated from its model."""
    model = ROLES[role]
    out = [
        f"# stratumrm {role} configuration: `stratumrm {role} --config THIS_FILE`.",
        "# Generated by `stratumrm config example " + role + "`; check it with `stratumrm config check FILE`.",
        "# Options given on the command line win over this file; keys left out take the default shown.",
        "# Relative certificate paths are taken from this file's directory.",
        "",
    ]
    sections: list[tuple[str, type[Struct], msgspec.structs.FieldInfo]] = []
    for field in msgspec.structs.fields(model):
        base, meta = _unwrap(field.type)
        if isinstance(base, type) and issubclass(base, Struct):
            sections.append((field.name, base, field))
            continue
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            if isinstance(item, type) and issubclass(item, Struct):
                sections.append((field.name, item, field))
                continue
        out += _field_lines(field)
        out.append("")
    for name, section, field in sections:
        base, meta = _unwrap(field.type)
        is_list = typing.get_origin(base) is list
        out += _wrap(
            (meta.description if meta is not None else "") + ("" if not is_list else "; repeat the table once per entry")
        )
        commented = bool(meta is not None and (meta.extra or {}).get("commented"))
        out.append(("# " if commented else "") + (f"[[{name}]]" if is_list else f"[{name}]"))
        for item in msgspec.structs.fields(section):
            item_lines = _field_lines(item)
            if is_list and item.required:
                _, item_meta = _unwrap(item.type)
                item_lines[-1] = f"{item.name} = {_toml_value((item_meta.extra or {}).get('example'))}"
            if commented:
                item_lines[-1] = "# " + item_lines[-1]
            out += item_lines
            out.append("")
    return "\n".join(out).rstrip() + "\n"
