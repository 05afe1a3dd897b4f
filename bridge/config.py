"""Configuration values shared by the roles: upstream URLs and listen addresses.

URL forms (cgminer's, plus ours):

- ``stratum+tcp://host:port`` plain Stratum V1;
- ``stratum+ssl://host:port`` (also ``stratum+tls://``) Stratum V1 inside TLS,
  the server's certificate verified against the system trust store or a CA file;
- ``stratumrm://host:port`` a StratumRM sidecar (TLS 1.3 control channel with
  mutual certificates, UDP share channel).

A ``#xnsub`` fragment (bfgminer/bmminer's convention) says the pool supports
``mining.extranonce.subscribe``.
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
