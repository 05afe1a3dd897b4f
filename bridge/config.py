"""Configuration values shared by the roles: upstream URLs, listen addresses, the proxy's file.

URL forms (cgminer's, plus ours):

- ``stratum+tcp://host:port`` plain Stratum V1;
- ``stratum+ssl://host:port`` (also ``stratum+tls://``) Stratum V1 inside TLS,
  the server's certificate verified against the system trust store or a CA file;
- ``stratumrm://host:port`` a StratumRM sidecar (TLS 1.3 control channel with
  mutual certificates, UDP share channel).

A ``#xnsub`` fragment (bfgminer/bmminer's convention) says the pool supports
``mining.extranonce.subscribe``.

The proxy's upstream list (:func:`parse_upstream_entry`) takes three more
fragments: ``#priority=N`` (the failover level, lower first; by default the
position in the list), ``#weight=W`` (the rigs' share in its level, or across
upstreams with ``--strategy weighted``; default 1) and ``#name=TEXT`` (for logs).

The proxy's configuration file (:func:`load_proxy_config`) is TOML, read with
the standard library's ``tomllib``, one table per concern::

    listen = "0.0.0.0:3333"
    bundle = "farm1.bundle.pem"           # certificate for stratumrm:// upstreams

    [[upstream]]                          # ordered: the first is the primary
    url = "stratumrm://sidecar.pool.example:3334"
    [[upstream]]
    url = "stratum+tcp://backup.pool.example:3333#xnsub"
    priority = 1                          # default: position in the list
    weight = 1.0

    [failover]                            # every key optional; see bridge/relay/failover.py
    strategy = "failover"                 # or "weighted"
    silence_timeout = 5.0
    hold_down = 120.0
    no_upstream = "disconnect"            # or "keep"

Options given on the command line win over the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
from msgspec import Struct

from bridge.errors import ConfigError

SCHEMES = {
    "stratum+tcp": "sv1",
    "stratum": "sv1",
    "stratum+ssl": "sv1+tls",
    "stratum+tls": "sv1+tls",
    "stratumrm": "stratumrm",
}


class UpstreamURL(Struct, frozen=True):
    """A parsed upstream pool URL."""

    scheme: str
    host: str
    port: int
    transport: str  # "sv1", "sv1+tls" or "stratumrm"
    xnsub: bool = False

    @property
    def tls(self) -> bool:
        return self.transport != "sv1"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}" + ("#xnsub" if self.xnsub else "")


def parse_upstream_url(text: str) -> UpstreamURL:
    """Parse ``stratum+tcp://``, ``stratum+ssl://`` or ``stratumrm://`` URLs."""
    if "://" not in text:
        raise ConfigError(
            f"upstream {text!r} has no scheme; write it as stratum+tcp://HOST:PORT, "
            "stratum+ssl://HOST:PORT or stratumrm://HOST:PORT"
        )
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(
            f"upstream {text!r}: unknown scheme {scheme!r}; use one of "
            + ", ".join(sorted(s for s in SCHEMES if s != "stratum"))
        )
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ConfigError(f"upstream {text!r} needs a host and a port, e.g. {scheme}://pool.example.com:3333")
    fragments = {f.strip().lower() for f in parts.fragment.split("#") if f.strip()}
    return UpstreamURL(scheme, parts.hostname, port, SCHEMES[scheme], xnsub="xnsub" in fragments)


def parse_listen(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; a bare port listens on 0.0.0.0)."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        if text.isdigit():
            host, port_text = "0.0.0.0", text
        elif default_port is not None:
            host, port_text = text, str(default_port)
        else:
            raise ConfigError(f"listen address {text!r} should be HOST:PORT, e.g. 0.0.0.0:3333")
    host = host.strip("[]") or "0.0.0.0"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"listen address {text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


class UpstreamEntry(Struct, frozen=True):
    """One upstream of the proxy's ordered list."""

    url: UpstreamURL
    priority: int = 0
    weight: float = 1.0
    name: str | None = None

    @property
    def label(self) -> str:
        """What logs call it: its name, else ``host:port``."""
        if self.name:
            return self.name
        host = f"[{self.url.host}]" if ":" in self.url.host else self.url.host
        return f"{host}:{self.url.port}"


_ENTRY_OPTIONS = ("priority", "weight", "name")


def parse_upstream_entry(text: str, default_priority: int) -> UpstreamEntry:
    """An upstream URL with optional ``#priority=N``, ``#weight=W`` and ``#name=TEXT`` fragments."""
    base, _, fragment = text.partition("#")
    kept: list[str] = []
    options: dict[str, str] = {}
    for part in fragment.split("#"):
        key, sep, value = part.partition("=")
        if sep and key.strip().lower() in _ENTRY_OPTIONS:
            options[key.strip().lower()] = value.strip()
        elif part.strip():
            kept.append(part)
    url = parse_upstream_url(base + ("#" + "#".join(kept) if kept else ""))
    try:
        priority = int(options["priority"]) if "priority" in options else default_priority
        weight = float(options["weight"]) if "weight" in options else 1.0
    except ValueError:
        raise ConfigError(f"upstream {text!r}: priority must be an integer and weight a number") from None
    if weight < 0 or weight != weight:
        raise ConfigError(f"upstream {text!r}: weight must not be negative")
    return UpstreamEntry(url, priority, weight, options.get("name") or None)


class UpstreamFileEntry(Struct, frozen=True, forbid_unknown_fields=True):
    url: str
    priority: int | None = None
    weight: float = 1.0
    name: str | None = None


class FailoverFileSection(Struct, frozen=True, forbid_unknown_fields=True):
    """``[failover]``: the keys of :class:`bridge.relay.failover.FailoverConfig`, plus the probe's."""

    strategy: str | None = None
    silence_timeout: float | None = None
    keepalive: str | None = None
    job_timeout: float | None = None
    lag_delay: float | None = None
    hold_down: float | None = None
    switch_rate: float | None = None
    switch_burst: int | None = None
    drain_timeout: float | None = None
    no_upstream: str | None = None
    no_upstream_grace: float | None = None
    probe_user: str | None = None
    probe_password: str | None = None


class InterceptFileEntry(Struct, frozen=True, forbid_unknown_fields=True):
    """One ``[[intercept]]`` table: connections redirected to ``match`` go to ``upstream``.

    ``match`` is ``HOST:PORT`` (a name is resolved when the proxy starts) — the pool
    address the rigs are configured with; ``upstream`` any upstream URL.
    """

    match: str
    upstream: str


class ProxyFileConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """The ``stratumrm proxy --config FILE`` file (TOML); every key optional."""

    listen: str | None = None
    upstream: list[UpstreamFileEntry] = []
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    bundle: str | None = None
    upstream_ca: str | None = None
    submit_timeout: float | None = None
    opening_timeout: float | None = None
    share_batch_window: float | None = None
    max_pending: int | None = None
    max_pending_per_source: int | None = None
    fd_reserve: int | None = None
    failover: FailoverFileSection = FailoverFileSection()
    intercept: list[InterceptFileEntry] = []
    intercept_default: str = "pass"
    """Redirected connections no ``[[intercept]]`` matches: ``pass`` (to their original
    destination, untouched) or ``refuse``."""

    def entries(self) -> list[UpstreamEntry]:
        """The upstreams, parsed; relative priorities default to the position in the list."""
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


def load_proxy_config(path: str | Path) -> ProxyFileConfig:
    """Read a proxy configuration file; relative certificate paths are taken from its directory."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        config = msgspec.convert(data, ProxyFileConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = path.parent
    relative = {}
    for name in ("cert", "key", "ca", "bundle", "upstream_ca"):
        value = getattr(config, name)
        if value is not None and not Path(value).is_absolute():
            relative[name] = str(base / value)
    return msgspec.structs.replace(config, **relative) if relative else config
