"""Configuration values shared by the roles: upstream URLs and listen addresses.

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

The roles' configuration files (TOML, one model per role) are :mod:`bridge.settings`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from msgspec import Struct

from bridge.errors import ConfigError

SCHEMES = {
    "stratum+tcp": "sv1",
    "stratum": "sv1",
    "stratum+ssl": "sv1+tls",
    "stratum+tls": "sv1+tls",
    "stratumrm": "stratumrm",
}


URL_FRAGMENTS = frozenset({"xnsub"})
"""Fragments :func:`parse_upstream_url` understands (the proxy's entries add ``#priority=`` etc.)."""


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


def parse_upstream_url(text: str, extra_fragments: frozenset[str] = frozenset()) -> UpstreamURL:
    """Parse ``stratum+tcp://``, ``stratum+ssl://`` or ``stratumrm://`` URLs.

    A fragment other than ``#xnsub`` (or one of ``extra_fragments``, which the caller
    reads itself) is refused with the valid ones: a typo must not go unnoticed.
    """
    if "://" not in text:
        raise ConfigError(
            f"upstream {text!r} has no scheme; write it as stratum+tcp://HOST:PORT, "
            "stratum+ssl://HOST:PORT or stratumrm://HOST:PORT"
        )
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(
            f"upstream {text!r}: unknown scheme {scheme!r}; use one of " + ", ".join(sorted(s for s in SCHEMES if s != "stratum"))
        )
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ConfigError(f"upstream {text!r} needs a host and a port, e.g. {scheme}://pool.example.com:3333")
    fragments = {f.strip().lower() for f in parts.fragment.split("#") if f.strip()}
    unknown = sorted(fragments - URL_FRAGMENTS - extra_fragments)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(URL_FRAGMENTS | set(_ENTRY_OPTIONS)), n=1)
        hint = f" (did you mean #{close[0]}?)" if close else ""
        raise ConfigError(
            f"upstream {text!r}: unknown fragment #{unknown[0]}{hint}; valid fragments: #xnsub, "
            "and for the proxy's upstreams #priority=N, #weight=W, #name=TEXT"
        )
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
