"""One logging set-up for every ``stratumrm`` command.

- :func:`setup` configures the root logger the same way for every command: ``-v``
  means INFO plus the components' details, ``-vv`` DEBUG, ``quiet`` WARNING only;
  ``--log-format text`` (default) or ``json`` (one object per line, for journald,
  Loki or Elasticsearch).
- A connection id on every line about a connection: a driver calls
  :func:`bind_connection` (``"rig"`` or ``"proxy"``) at the top of the task that
  serves one connection; every line logged from that task and the tasks it starts
  (trio copies the context into child tasks) carries ``[rig-17]``, or
  ``"conn": "rig-17"`` in JSON.
- :class:`RepeatFilter` rate-limits repeats of one message template (scanners
  send garbage to every open port): the first :data:`REPEAT_BURST` in a
  :data:`REPEAT_WINDOW` pass, the rest are counted and summed up in one line when
  the window ends.
- :func:`redact` replaces secrets (passwords, tokens) before a value is logged.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from bridge.bounded import BoundedMap

__all__ = [
    "FORMATS",
    "JSONFormatter",
    "RepeatFilter",
    "TextFormatter",
    "bind_connection",
    "connection_id",
    "next_connection_id",
    "redact",
    "setup",
]

FORMATS = ("text", "json")
REPEAT_WINDOW = 60.0
"""Seconds over which repeats of one message template are counted."""
REPEAT_BURST = 5
"""Lines of one template let through per window before the rest are only counted."""

_connection: contextvars.ContextVar[str | None] = contextvars.ContextVar("stratumrm_connection", default=None)
_counters: dict[str, itertools.count] = {}


def next_connection_id(kind: str) -> str:
    """``rig-1``, ``rig-2``, … one counter per kind for the process's lifetime."""
    counter = _counters.setdefault(kind, itertools.count(1))
    return f"{kind}-{next(counter)}"


def bind_connection(kind_or_id: str, *, fresh: bool = True) -> str:
    """Tag every later log line of this task (and the tasks it starts) with a connection id.

    ``bind_connection("rig")`` takes the next ``rig-N``; ``fresh=False`` binds the
    given id as it is. Returns the id.
    """
    ident = next_connection_id(kind_or_id) if fresh else kind_or_id
    _connection.set(ident)
    return ident


def enter_connection(ident: str) -> contextvars.Token[str | None]:
    """Tag the log lines of a synchronous step done for another connection (undo with :func:`leave_connection`)."""
    return _connection.set(ident)


def leave_connection(token: contextvars.Token[str | None]) -> None:
    _connection.reset(token)


def connection_id() -> str | None:
    """The id bound in this task, if any."""
    return _connection.get()


class _ConnectionField(logging.Filter):
    """Puts the bound connection id on every record as ``record.conn``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "conn"):
            record.conn = _connection.get()
        return True


class TextFormatter(logging.Formatter):
    """``2026-12-05 07:40:01 INFO    bridge.proxy [rig-17] message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(conn_tag)s%(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        conn = getattr(record, "conn", None)
        record.conn_tag = f"[{conn}] " if conn else ""
        return super().format(record)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, ``conn`` when bound, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        conn = getattr(record, "conn", None)
        if conn:
            entry["conn"] = conn
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class RepeatFilter(logging.Filter):
    """Let the first ``burst`` lines of one template through per ``window``; count the rest.

    The template is the record's logger and unformatted message, so "TLS handshake
    with %s failed: %s" from a thousand scanner addresses is one template. When a
    window with suppressed lines ends, the next line of that template is preceded
    by a summary ("... repeated N more times in the last 60 s"). DEBUG lines are
    never limited. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        window: float = REPEAT_WINDOW,
        burst: int = REPEAT_BURST,
        clock: Callable[[], float] = time.monotonic,
        max_templates: int = 1024,
    ) -> None:
        super().__init__()
        self.window = window
        self.burst = burst
        self.clock = clock
        self.max_templates = max_templates
        # key -> [window start, passed, suppressed]
        self._seen: BoundedMap[tuple[str, str], list[float | int]] = BoundedMap(max_templates)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        key = (record.name, str(record.msg))
        now = self.clock()
        state = self._seen.get(key)
        if state is None or now - state[0] >= self.window:
            suppressed = int(state[2]) if state is not None else 0
            self._seen[key] = [now, 1, 0]
            if suppressed:
                record.msg = (
                    f"{record.msg} (this message repeated {suppressed} more times in the last {self.window:g} s, not shown)"
                )
            return True
        if state[1] < self.burst:
            state[1] += 1
            return True
        state[2] += 1
        return False


SECRET_KEYS = ("password", "token", "secret", "passphrase")


def redact(key: str, value: Any) -> Any:
    """``"***"`` for a value whose key names a secret, the value otherwise."""
    if value is not None and any(word in key.lower() for word in SECRET_KEYS):
        return "***"
    return value


def setup(verbose: int = 0, *, quiet: bool = False, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger for a command (replaces an earlier call's handler, leaves others).

    Every ``-v`` is one level more than the command's default: INFO by default
    (``quiet``: WARNING), ``-v`` DEBUG for the bridge, ``-vv`` DEBUG for the
    libraries too.
    """
    if log_format not in FORMATS:
        raise ValueError(f"--log-format {log_format!r}: use one of {', '.join(FORMATS)}")
    levels = (logging.WARNING, logging.INFO, logging.DEBUG)
    step = (0 if quiet else 1) + verbose
    level = levels[min(step, 2)]
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_ConnectionField())
    handler.addFilter(RepeatFilter())
    handler.stratumrm = True  # type: ignore[attr-defined]  # ours: the next setup() replaces it
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "stratumrm", False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries' chatter stays at WARNING unless -vv.
    for noisy in ("hpack", "hypercorn.access", "trio_websocket", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if step > 2 else logging.WARNING)


def setup_role(settings: Any, verbose: int) -> None:
    """A role's logging from its merged settings (``log_level``, ``log_format``) and the ``-v`` count."""
    steps = {"warning": -1, "info": 0, "debug": 1}[settings.log_level] + verbose
    setup(max(steps, 0), quiet=steps < 0, log_format=settings.log_format)


def log_format_option(function: Callable) -> Callable:
    """The ``--log-format`` option every serving command takes (click decorator)."""
    import click

    return click.option(
        "--log-format",
        type=click.Choice(FORMATS),
        default=None,
        help="text (default): one readable line per event; json: one JSON object per line (journald, Loki).",
    )(function)
