"""The trio loop around :class:`~bridge.pki.rotation.CredentialWatch`, for both roles.

Every ``reload_interval`` seconds (and at once on SIGHUP, through :meth:`reload`) it
reads the clocks, lets the watch decide, and logs what the watch says: a certificate
reloaded, warnings that are due (each once a day while it holds). The proxy watches
its bundle; the sidecar its certificate, key and CA, plus its revocation list and its
peers' certificates, which it hands in as ``also_reload`` and ``also_warn``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import trio

from bridge.pki.rotation import DEFAULT_RELOAD_INTERVAL, CredentialWatch

__all__ = ["CredentialWatcher"]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _no_warnings(now: datetime) -> list[tuple[str, str]]:
    return []


class CredentialWatcher:
    """Polls a :class:`CredentialWatch` and logs to ``log`` what it decides.

    ``after_reload`` completes the "certificate reloaded" line with what happens to
    connections (it is called at that moment). ``also_reload(force)`` runs first on
    every look (the sidecar's revocation list); ``also_warn(now)`` adds the role's own
    ``(key, message)`` warnings, which are repeated on the same schedule.
    """

    def __init__(
        self,
        watch: CredentialWatch,
        log: logging.Logger,
        *,
        after_reload: Callable[[], str],
        reload_interval: float = DEFAULT_RELOAD_INTERVAL,
        also_reload: Callable[[bool], None] | None = None,
        also_warn: Callable[[datetime], list[tuple[str, str]]] = _no_warnings,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.watch = watch
        self.log = log
        self.after_reload = after_reload
        self.reload_interval = reload_interval
        self.also_reload = also_reload
        self.also_warn = also_warn
        self.clock = clock

    def start(self) -> None:
        """Log the certificate presented and the warnings that hold (call once, at start)."""
        line = self.watch.presenting(self.clock())
        if line is not None:
            self.log.info("%s", line)
        self.log_warnings()

    async def run(self) -> None:
        """Look every ``reload_interval`` seconds until cancelled (a ``stat`` per file)."""
        while True:
            await trio.sleep(self.reload_interval)
            self.reload()

    def reload(self, *, force: bool = False) -> bool:
        """Look now (``force``: re-read the files anyway); True when a new certificate is in use."""
        if self.also_reload is not None:
            self.also_reload(force)
        line = self.watch.reload(self.clock(), force=force)
        if line is not None:
            self.log.info("%s; %s", line, self.after_reload())
        self.log_warnings()
        return line is not None

    def warnings(self, now: datetime | None = None) -> list[str]:
        """Every warning that holds at ``now`` (default: the clock), for status and monitoring."""
        return [message for _key, message in self._found(now or self.clock())]

    def log_warnings(self) -> None:
        """Log the warnings that are due (new ones at once, standing ones once a day)."""
        for message in self.watch.due(self._found(self.clock()), trio.current_time()):
            self.log.warning("%s", message)

    def _found(self, now: datetime) -> list[tuple[str, str]]:
        return self.watch.warnings(now) + self.also_warn(now)
