"""Is a pool alive? Judged the way pools expect to be asked, sans-IO.

Real pools answer few things twice. ckpool, the model, never answers a second
``mining.authorize`` on a connection (it logs "trying to authorise twice"), nor a
second ``mining.subscribe``, an unknown method, ``mining.ping`` from a client or a
submit before authorize (stratifier.c ``parse_method``; the captures in
tests/data/captures/). A health probe that re-sends any of those hears nothing
and calls a healthy pool silent. So health here rests only on what every pool
does without being asked twice, and never makes a pool log a warning:

- **evidence of life**: any line from the pool on any of its connections, and
  above all a ``mining.notify`` (jobs arriving);
- **the transport's own liveness**: a connection that breaks, is refused or
  closed (TCP state), or a StratumRM link that dies (``rm.ping``/``dead_after``);
- **a fresh connection's subscribe**, as cgminer tests a pool (``pool_active``):
  connect, send one ``mining.subscribe``, wait for its result, close. Every pool
  answers the first subscribe of a connection; a stalled pool process (its
  kernel still accepting and ACKing) does not.

Two pieces, both fed an explicit ``now``:

- :class:`SubscribeCheck`: one such fresh-connection exchange. The driver opens
  the connection, writes :meth:`~SubscribeCheck.data_to_send`, feeds what it
  reads to :meth:`~SubscribeCheck.receive_data`, reports
  :meth:`~SubscribeCheck.connect_failed` / :meth:`~SubscribeCheck.closed`, calls
  :meth:`~SubscribeCheck.handle_timer` at :meth:`~SubscribeCheck.get_timer`, and
  stops once :attr:`~SubscribeCheck.verdict` is set. Lines are bounded
  (``max_line``), JSON is decoded by msgspec into typed structs; whatever the
  pool sends, the result is a :class:`Verdict`, never an exception.
- :class:`HealthWatch`: the schedule and the verdict for one pool. Evidence of
  life (:meth:`~HealthWatch.alive`) keeps it up without any check; a suspicion
  (:meth:`~HealthWatch.suspect`: a connection ended or could not be opened) or
  ``quiet_after`` seconds without evidence makes a check due
  (:meth:`~HealthWatch.get_timer`; :meth:`~HealthWatch.handle_timer` starts it
  when due and the driver runs it); a failed check makes the pool **down** and
  checks are then repeated with exponential backoff (``backoff_first`` doubling
  to ``backoff_max``) until one succeeds or evidence of life arrives. Changes
  are taken with :meth:`~HealthWatch.take_changes`.

A third piece reads a long-lived session as evidence:

- :class:`ProbeReader`: the proxy's own session on one upstream (its *probe*).
  It subscribes with the proxy's user agent, authorizes **once** per connection
  when a worker name is known, answers ``mining.ping`` and
  ``client.get_version``, and turns what the pool sends into a
  :class:`ProbeReading` (subscribed, the prevhash of each job, or why the session
  must end: subscribe refused, ``client.reconnect``, a fatal protocol violation).

The sidecar's pool check (:mod:`bridge.net.pool_watch`) drives
:class:`HealthWatch` and :class:`SubscribeCheck`. The proxy's core
(:mod:`bridge.relay.proxy`) drives one :class:`ProbeReader` per upstream and asks
for a :class:`SubscribeCheck` as the keepalive of plain SV1 upstreams (its
schedule is the failover policy's, which asks for a keepalive after quiet) and
the link's ``rm.ping`` liveness for StratumRM upstreams.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

from bridge.errors import LineTooLong
from bridge.sv1.events import ProtocolViolation, Reply
from bridge.sv1.framing import BoundedDecoder, LineBuffer
from bridge.sv1.messages import NULL, GetVersion, Notify, Ping, Reconnect, Response

__all__ = ["CHECK_ID", "HealthWatch", "ProbeReader", "ProbeReading", "SubscribeCheck", "Verdict"]

#: The id of the check's one request.
CHECK_ID: Final = 1
#: ckpool's own line limit is 1 KiB for miners; a notify with a full merkle branch is ~1.5 KB.
DEFAULT_MAX_LINE: Final = 64 * 1024
#: Lines read before the subscribe result after which the check gives up (pools answer at once).
MAX_LINES_BEFORE_RESULT: Final = 64
DEFAULT_CHECK_TIMEOUT: Final = 5.0
DEFAULT_BACKOFF_FIRST: Final = 0.5
DEFAULT_BACKOFF_MAX: Final = 10.0


class Verdict(Struct, frozen=True):
    """Up (True) or down (False), and why (empty when up); None: cannot tell (this host is short
    of resources, say), which changes nothing and is tried again with backoff."""

    up: bool | None
    reason: str = ""


class _Request(Struct, frozen=True):
    id: int
    method: str
    params: list[str]


class _Line(Struct, frozen=True):
    """Any line from the pool: a response (no method) or a request/notification."""

    id: object = None
    method: str | UnsetType = UNSET
    result: Raw | UnsetType = UNSET
    error: Raw | UnsetType = UNSET


_decode_line = BoundedDecoder[_Line](_Line).decode
_encode = msgspec.json.Encoder().encode


class SubscribeCheck:
    """One fresh connection's ``mining.subscribe``, and its verdict (see the module docs)."""

    def __init__(
        self,
        pool: str,
        agent: str,
        now: float,
        *,
        timeout: float = DEFAULT_CHECK_TIMEOUT,
        max_line: int = DEFAULT_MAX_LINE,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.pool = pool
        self.deadline = now + timeout
        self.timeout = timeout
        self.verdict: Verdict | None = None
        self._lines = LineBuffer(max_line)
        self._out = _encode(_Request(CHECK_ID, "mining.subscribe", [agent])) + b"\n"
        self._seen = 0

    def data_to_send(self) -> bytes:
        """The subscribe line (once)."""
        out, self._out = self._out, b""
        return out

    def connect_failed(self, reason: str, now: float) -> None:
        self._decide(False, f"cannot connect to pool {self.pool}: {reason}")

    def connection_lost(self, reason: str, now: float) -> None:
        """The connection ended (EOF or error) before a verdict."""
        self._decide(False, f"pool {self.pool} {reason} before answering mining.subscribe")

    def cannot_tell(self, reason: str, now: float) -> None:
        """The check failed for a local reason (out of descriptors or buffers): inconclusive."""
        if self.verdict is None:
            self.verdict = Verdict(None, reason)

    def get_timer(self) -> float | None:
        """When the check gives up (None once it has a verdict)."""
        return None if self.verdict is not None else self.deadline

    def handle_timer(self, now: float) -> None:
        if now >= self.deadline:
            self._decide(False, f"pool {self.pool} did not answer mining.subscribe within {self.timeout:g} s")

    def receive_data(self, data: bytes, now: float) -> None:
        if self.verdict is not None:
            return
        try:
            lines = self._lines.feed(data)
        except LineTooLong as exc:
            self._decide(False, f"pool {self.pool} sent a line that is too long ({exc})")
            return
        for raw in lines:
            self._seen += 1
            try:
                line = _decode_line(raw)
            except msgspec.DecodeError:
                self._decide(False, f"pool {self.pool} answered mining.subscribe with something that is not SV1 JSON")
                return
            if line.method is UNSET and line.id == CHECK_ID and type(line.id) is int:
                error = b"null" if line.error is UNSET else bytes(line.error)
                result = b"null" if line.result is UNSET else bytes(line.result)
                if error == b"null" and result not in (b"null", b"false"):
                    self._decide(True, "")
                else:
                    shown = (error if error != b"null" else result).decode(errors="replace")[:200]
                    self._decide(False, f"pool {self.pool} refused mining.subscribe: {shown}")
                return
            if self._seen >= MAX_LINES_BEFORE_RESULT:
                self._decide(False, f"pool {self.pool} sent {self._seen} lines without answering mining.subscribe")
                return

    def _decide(self, up: bool, reason: str) -> None:
        if self.verdict is None:
            self.verdict = Verdict(up, reason)


class HealthWatch:
    """When to check one pool, and whether it is up (see the module docs).

    ``quiet_after`` None: only suspicions trigger a check (no stall detection).
    """

    def __init__(
        self,
        now: float,
        *,
        quiet_after: float | None = None,
        backoff_first: float = DEFAULT_BACKOFF_FIRST,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
    ) -> None:
        if quiet_after is not None and quiet_after <= 0:
            raise ValueError("quiet_after must be positive (or None)")
        if not 0 < backoff_first <= backoff_max:
            raise ValueError("need 0 < backoff_first <= backoff_max")
        self.quiet_after = quiet_after
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self.up = True
        self.reason = ""
        self.checks = 0
        self.outages = 0
        self.suspicion = ""
        self.checking = False
        self._last_alive = now
        self._check_started = now
        self._suspected = False
        self._backoff = backoff_first
        self._retry_at: float | None = None
        self._changes: list[Verdict] = []

    # ------------------------------------------------------------------ evidence

    def start(self, now: float) -> None:
        """Begin measuring quiet from ``now`` (a driver built before its clock was running)."""
        self._last_alive = max(self._last_alive, now)

    def alive(self, now: float) -> None:
        """A line (a job, an answer) came from the pool: it works; a pending suspicion is void."""
        self._last_alive = max(self._last_alive, now)
        self._suspected = False
        if not self.up:
            self._set(True, "", now)

    def suspect(self, reason: str, now: float) -> None:
        """A connection to the pool ended or could not be opened: check soon (at once when up)."""
        self.suspicion = reason
        if self.up:
            self._suspected = True

    # ------------------------------------------------------------------ checks

    def get_timer(self) -> float | None:
        """When a check is due (None while one runs, or nothing will make one due)."""
        if self.checking:
            return None
        if not self.up:
            return self._retry_at
        if self._suspected:
            return self._last_alive if self._retry_at is None else self._retry_at
        if self.quiet_after is not None:
            return self._last_alive + self.quiet_after
        return None

    def check_due(self, now: float) -> bool:
        deadline = self.get_timer()
        return deadline is not None and now >= deadline

    def handle_timer(self, now: float) -> None:
        """Start the check if one is due (:attr:`checking`): the driver runs it and reports :meth:`check_done`."""
        if self.check_due(now):
            self.check_started(now)

    def check_started(self, now: float) -> None:
        self.checking = True
        self.checks += 1
        self._check_started = now
        self._suspected = False

    def check_done(self, verdict: Verdict, now: float) -> None:
        self.checking = False
        if verdict.up is None:  # cannot tell: no change, try again with backoff
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, self.backoff_max)
            if self.up:
                self._suspected = True
            return
        if verdict.up:
            self._last_alive = max(self._last_alive, now)
            self._backoff = self.backoff_first
            self._retry_at = None
            if not self.up:
                self._set(True, "", now)
            return
        if self.up and self._last_alive >= self._check_started:
            return  # the pool spoke while the check failed: a local or path problem, not an outage
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, self.backoff_max)
        if self.up:
            self._set(False, verdict.reason, now)
        else:
            self.reason = verdict.reason

    def take_changes(self) -> list[Verdict]:
        changes, self._changes = self._changes, []
        return changes

    def _set(self, up: bool, reason: str, now: float) -> None:
        self.up = up
        self.reason = reason
        if up:
            self._backoff = self.backoff_first
            self._retry_at = None
            self._last_alive = max(self._last_alive, now)
        else:
            self.outages += 1
        self._suspected = False
        self._changes.append(Verdict(up, reason))


# ------------------------------------------------------------------ the proxy's probe session


class ProbeSession(Protocol):
    """What a probe needs from its session (an SV1 client session or a StratumRM channel)."""

    def subscribe(self, user_agent: str | None, session_id: str | None = None, context: Any = None) -> int | None: ...
    def request(self, method: str, params: list[Any] | Raw, context: Any = None) -> int | None: ...
    def respond_raw(self, response: Any) -> None: ...


class ProbeReading(Struct, frozen=True):
    """What one batch of a probe session's events says about the upstream."""

    subscribed: bool = False
    """The subscribe result came (the upstream is connected)."""
    prevhashes: tuple[str, ...] = ()
    """The prevhash of every ``mining.notify``, in order."""
    end: str | None = None
    """The session must end, and why (it is then a loss of the upstream)."""
    refused_worker: str | None = None
    """The pool refused the probe's authorize: the pool's error (health is still measured)."""


class ProbeReader:
    """The proxy's own session on one upstream, read as health evidence (see the module docs)."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self.identity: tuple[str, str | None] | None = None
        self.session: ProbeSession | None = None
        self.subscribed = False
        self._authorized = False

    def opened(self, session: ProbeSession) -> None:
        """A new probe session: subscribe (no worker name needed) and authorize if a name is known."""
        self.session = session
        self.subscribed = False
        self._authorized = False
        session.subscribe(self.agent, None, context="subscribe")
        self._authorize()

    def closed(self) -> None:
        self.session = None
        self.subscribed = False

    def set_identity(self, user: str, password: str | None) -> bool:
        """The worker name to authorize as (the first one only); True if an authorize was written."""
        if self.identity is not None:
            return False
        self.identity = (user, password)
        return self._authorize()

    def _authorize(self) -> bool:
        """Authorize once per connection (pools never answer a second authorize)."""
        session = self.session
        if self.identity is None or session is None or self._authorized:
            return False
        self._authorized = True
        user, password = self.identity
        try:
            session.request("mining.authorize", [user, password or "x"], context="authorize")
        except (RuntimeError, OverflowError):
            return False  # the session is closing
        return True

    def ping(self) -> bool:
        """``mining.ping`` on the session (keepalive ``ping``); True if it was written."""
        if self.session is None:
            return False
        try:
            self.session.request("mining.ping", [], context="keepalive")
        except (RuntimeError, OverflowError):
            return False
        return True

    def receive(self, events: list[Any]) -> ProbeReading:
        session = self.session
        subscribed = False
        prevhashes: list[str] = []
        refused: str | None = None
        for event in events:
            if isinstance(event, Notify):
                prevhashes.append(event.params.prevhash)
            elif isinstance(event, Reply):
                error = bytes(event.response.error)
                if event.context == "subscribe":
                    if not event.response.accepted and error != b"null":
                        return ProbeReading(subscribed, tuple(prevhashes), f"subscribe refused: {error.decode(errors='replace')}")
                    subscribed = self.subscribed = True
                elif event.context == "authorize" and not event.accepted:
                    refused = error.decode(errors="replace")
            elif isinstance(event, Ping) and event.id is not None and session is not None:
                session.respond_raw(Response(event.id, Raw(b'"pong"'), NULL))
            elif isinstance(event, GetVersion) and event.id is not None and session is not None:
                session.respond_raw(Response(event.id, Raw(_encode(self.agent)), NULL))
            elif isinstance(event, Reconnect):
                return ProbeReading(subscribed, tuple(prevhashes), "the pool sent client.reconnect", refused)
            elif isinstance(event, ProtocolViolation) and event.fatal:
                return ProbeReading(subscribed, tuple(prevhashes), f"pool protocol violation: {event.reason}", refused)
        return ProbeReading(subscribed, tuple(prevhashes), None, refused)
