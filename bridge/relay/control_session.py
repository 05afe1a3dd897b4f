"""One StratumRM control connection's session layer, for both roles, sans-IO.

Both ends of the control channel (the proxy's
:class:`~bridge.relay.rm_upstream.StratumRMConnection` and the sidecar's
:class:`~bridge.relay.sidecar.session.SidecarSession`) hold a :class:`ControlSession`
for what the two sides share (PROTOCOL.md C1, C3, C8, C9):

- **framing**: the line buffer, lines bounded by ``MAX_CONTROL_LINE`` (C1);
- **the outgoing backlog**: lines queued but not taken by the driver, bounded by
  ``max_backlog``; beyond it the peer is stuck and the connection closes;
- **liveness** (C8): the peer's silence (:class:`~bridge.relay.liveness.PeerSilence`,
  heard on every byte received), and ``rm.ping`` when this side has sent nothing for
  ``heartbeat`` seconds. One rule on both sides: a line counts as sent when the driver
  takes it (:meth:`data_to_send`), not when it is queued;
- **heartbeat and errors**: the answer to ``rm.ping``, the ``rm.error`` before a
  deliberate close (C9) and the close reasons of silence and of a stuck peer.

The hello (C3) stays with each role (what is offered and what is chosen differ); its
outcome reaches the session through :meth:`agree`. Everything else the owner decides:
the session returns the reason to close and the owner closes.
"""

from __future__ import annotations

from typing import Final

from bridge.counters import Counters
from bridge.errors import LineTooLong
from bridge.relay.liveness import PeerSilence
from bridge.sv1.framing import LineBuffer
from bridge.wire.control import MAX_CONTROL_LINE, ErrorNotice, Ping, Pong, encode_rm

#: Control bytes queued but not taken by the driver after which the peer counts as stuck.
MAX_CONTROL_BACKLOG: Final = 16 * 1024 * 1024


class ControlCounters(Counters, kw_only=True):
    """The control connection's bytes (the sidecar session's counters extend these)."""

    control_bytes_received: int = 0
    control_bytes_sent: int = 0


class ControlSession:
    """Framing, backlog, heartbeat and liveness of one control connection.

    ``peer`` names the other side in close reasons (``"sidecar"``, ``"proxy"``);
    ``heartbeat`` None: no heartbeat until :meth:`agree` sets one (the proxy learns it
    from the hello result). ``silence_note`` is added to the silence close reason.
    ``counters`` is where it counts its bytes (the owner's, so they are declared once).
    """

    def __init__(
        self,
        *,
        peer: str,
        dead_after: float,
        now: float,
        heartbeat: float | None = None,
        silence_note: str = "",
        max_backlog: int = MAX_CONTROL_BACKLOG,
        counters: ControlCounters | None = None,
    ) -> None:
        self.peer = peer
        self.heartbeat = heartbeat
        self.silence = PeerSilence(dead_after, now)
        self.max_backlog = max_backlog
        self._silence_note = silence_note
        self._lines = LineBuffer(MAX_CONTROL_LINE)
        self._out: list[bytes] = []
        self._out_size = 0
        self._last_sent = now
        self.counters = ControlCounters() if counters is None else counters

    # ------------------------------------------------------------------ start

    def start(self, now: float) -> None:
        """The transport is up (the TLS handshake is done): silence and idleness count from ``now``."""
        self._last_sent = now
        self.silence.heard(now)

    def agree(self, heartbeat: float, dead_after: float) -> None:
        """The hello settled the heartbeat and ``dead_after``."""
        self.heartbeat = heartbeat
        self.silence.dead_after = dead_after

    # ------------------------------------------------------------------ input

    def receive(self, data: bytes, now: float) -> list[bytes]:
        """Bytes from the peer: its word (liveness), split into lines.

        Raises :class:`~bridge.errors.LineTooLong` for a line over ``MAX_CONTROL_LINE``.
        """
        self.silence.heard(now)
        self.counters.control_bytes_received += len(data)
        return self._lines.feed(data)

    @staticmethod
    def too_long(exc: LineTooLong) -> str:
        """The protocol error of a line over the bound."""
        return f"control line too long: {exc}"

    def answer(self, message: Ping | Pong) -> None:
        """``rm.ping`` is answered with ``rm.pong`` echoing ``t``; ``rm.pong`` is only the peer's word."""
        if isinstance(message, Ping):
            self.write(encode_rm(Pong(t=message.t)))

    def input_waiting(self, now: float) -> None:
        """The transport holds unread bytes from the peer: it spoke, this side is behind."""
        self.silence.heard(now)

    def peer_acknowledged(self, age: float, now: float) -> None:
        """The peer's TCP last acknowledged this side's bytes ``age`` seconds ago
        (:meth:`~bridge.relay.liveness.PeerSilence.acknowledged`)."""
        self.silence.acknowledged(age, now)

    @property
    def last_heard(self) -> float:
        """When the peer last said anything."""
        return self.silence.last_heard

    # ------------------------------------------------------------------ output

    def write(self, line: bytes) -> str | None:
        """Queue a line; the reason to close (without telling the peer) when the backlog overflows."""
        self._out.append(line)
        self._out_size += len(line)
        if self._out_size > self.max_backlog:
            return f"{self.peer} did not read {self.max_backlog} bytes of control data"
        return None

    def goodbye(self, reason: str, *, drop_queued: bool = False) -> None:
        """Queue ``rm.error`` with ``reason``: a deliberate close follows (C9).

        ``drop_queued``: the lines queued before it are not sent (the proxy's unsent
        requests, which its rigs are told failed); the sidecar flushes its verdicts first.
        """
        if drop_queued:
            self.drop_queued()
        self._out.append(encode_rm(ErrorNotice(reason=reason)))

    def drop_queued(self) -> None:
        """Forget the lines not taken by the driver yet (the connection is over)."""
        self._out.clear()
        self._out_size = 0

    def data_to_send(self, now: float) -> bytes:
        """The queued lines, taken by the driver at ``now`` (they count as sent from then)."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        self.counters.control_bytes_sent += len(data)
        self._last_sent = now
        return data

    # ------------------------------------------------------------------ time

    def silent_deadline(self) -> float:
        """When the peer counts as silent unless something is heard from it."""
        return self.silence.deadline()

    def get_timer(self) -> float:
        """The earlier of the silence deadline and the next heartbeat."""
        deadline = self.silence.deadline()
        if self.heartbeat is not None:
            deadline = min(deadline, self._last_sent + self.heartbeat)
        return deadline

    def silent(self, now: float, due: float | None) -> str | None:
        """The timer meant for ``due`` ran at ``now``: the reason to close if the peer is silent."""
        if due is not None:
            self.silence.timer_ran(due, now)
        if now >= self.silence.deadline():
            return f"{self.peer} silent for {self.silence.dead_after:g} s{self._silence_note}"
        return None

    def heartbeat_due(self, now: float) -> None:
        """Queue ``rm.ping`` when nothing was sent (taken by the driver) for ``heartbeat`` seconds."""
        if self.heartbeat is not None and now >= self._last_sent + self.heartbeat:
            self._out.append(encode_rm(Ping(t=now)))
