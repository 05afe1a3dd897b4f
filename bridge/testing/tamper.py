"""On-path attackers for tests: the theft StratumRM exists to stop, and a passive observer.

An attacker who sits on the path between a farm and its pool (a compromised
router, a hijacked route, a hostile ISP) and speaks plain Stratum V1 can take a
farm's work without it noticing: it rewrites the worker name in
``mining.authorize`` and ``mining.submit`` to its own, and relabels the jobs in
``mining.notify`` (so it decides what the rigs work on and recognises their
shares), undoing the relabel on the way back. The pool then credits the
attacker; the rigs see "accepted" for every share.

- :class:`WorkerThief` is that attacker, as a :class:`~bridge.testing.faults.Rewriter`
  for :class:`~bridge.testing.faults.TcpRelay`. It works on whole lines and counts
  what it managed to rewrite; on a stream it cannot parse (TLS) it rewrites nothing.
- :class:`ByteFlipper` is what is left to an attacker facing ciphertext: flip
  bits. For a TCP stream it flips one byte at a chosen offset of the first
  ``connections`` connections; :meth:`ByteFlipper.datagram` flips one byte of the
  first ``datagrams`` datagrams in one direction (a rewrite hook for
  :class:`~bridge.testing.lossy_link.LossyLink`).
- :class:`Observer` reads everything and changes nothing; :meth:`Observer.saw`
  says whether a piece of text went by in clear.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec

from bridge.sv1.framing import decode_json
from bridge.wire.datagram import HEADER_SIZE

__all__ = ["ByteFlipper", "Observer", "WorkerThief"]

_MAX_BUFFER = 1 << 20


class _Lines:
    """Splits a byte stream into JSON lines; a stream that is not JSON lines (TLS) passes at once."""

    def __init__(self) -> None:
        self._buffer = b""
        self.opaque = False

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """Complete lines to look at, and bytes to pass on untouched."""
        if self.opaque:
            return [], data
        self._buffer += data
        if not self._buffer.lstrip()[:1] in (b"{", b""):
            self.opaque, data, self._buffer = True, self._buffer, b""
            return [], data
        *lines, rest = self._buffer.split(b"\n")
        if len(rest) > _MAX_BUFFER:
            self._buffer = b""
            return lines, rest
        self._buffer = rest
        return lines, b""


@dataclass
class WorkerThief:
    """Rewrites worker names to ``worker`` in authorize/submit, relabels notify job ids.

    One instance per relayed connection (pass ``lambda: WorkerThief(...)`` as the
    relay's rewriter factory). Lines that are not JSON pass untouched.
    """

    worker: str = "mallory.w1"
    prefix: str = "m"
    rewritten_authorize: int = 0
    rewritten_submit: int = 0
    relabelled_jobs: int = 0
    _up: _Lines = field(default_factory=_Lines)
    _down: _Lines = field(default_factory=_Lines)

    @property
    def rewrites(self) -> int:
        return self.rewritten_authorize + self.rewritten_submit + self.relabelled_jobs

    def to_target(self, data: bytes) -> bytes:
        lines, untouched = self._up.feed(data)
        return b"".join(self._steal(line) + b"\n" for line in lines) + untouched

    def to_client(self, data: bytes) -> bytes:
        lines, untouched = self._down.feed(data)
        return b"".join(self._relabel(line) + b"\n" for line in lines) + untouched

    def _steal(self, line: bytes) -> bytes:
        message = _json_object(line)
        if message is None:
            return line
        method, params = message.get("method"), message.get("params")
        if method not in ("mining.authorize", "mining.submit") or not isinstance(params, list) or not params:
            return line
        params[0] = self.worker
        if method == "mining.submit":
            self.rewritten_submit += 1
            if len(params) > 1 and isinstance(params[1], str) and params[1].startswith(self.prefix):
                params[1] = params[1][len(self.prefix) :]  # back to the pool's own job id
        else:
            self.rewritten_authorize += 1
        return json.dumps(message).encode()

    def _relabel(self, line: bytes) -> bytes:
        message = _json_object(line)
        if message is None or message.get("method") != "mining.notify":
            return line
        params = message.get("params")
        if not isinstance(params, list) or not params or not isinstance(params[0], str):
            return line
        params[0] = self.prefix + params[0]
        self.relabelled_jobs += 1
        return json.dumps(message).encode()


def _json_object(line: bytes) -> dict[str, Any] | None:
    try:
        message = decode_json(line)
    except msgspec.DecodeError:
        return None
    return message if isinstance(message, dict) else None


@dataclass
class ByteFlipper:
    """Flips one byte at ``offset`` of each of the first ``connections`` TCP connections, each way asked.

    Use one instance as the relay's rewriter factory (it is callable): every call
    hands out the rewriter of the next connection. :meth:`datagram` is the UDP form.
    """

    offset: int = 600
    connections: int = 1
    to_target_side: bool = True
    to_client_side: bool = True
    datagrams: int = 0
    datagram_direction: str = "to_target"
    flipped: int = 0
    datagrams_flipped: int = 0
    _opened: int = 0

    def __call__(self) -> _StreamFlip:
        self._opened += 1
        active = self._opened <= self.connections
        return _StreamFlip(self, self.offset, active and self.to_target_side, active and self.to_client_side)

    def datagram(self, direction: str, data: bytes) -> bytes:
        if direction != self.datagram_direction or self.datagrams_flipped >= self.datagrams or not data:
            return data
        self.datagrams_flipped += 1
        position = (self.offset + self.datagrams_flipped) % len(data)
        return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


class _StreamFlip:
    def __init__(self, owner: ByteFlipper, offset: int, up: bool, down: bool) -> None:
        self._owner = owner
        self._offset = offset
        self._pending = {"up": up, "down": down}
        self._seen = {"up": 0, "down": 0}

    def _flip(self, way: str, data: bytes) -> bytes:
        start = self._seen[way]
        self._seen[way] += len(data)
        if self._pending[way] and start <= self._offset < start + len(data):
            self._pending[way] = False
            self._owner.flipped += 1
            i = self._offset - start
            return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        return data

    def to_target(self, data: bytes) -> bytes:
        return self._flip("up", data)

    def to_client(self, data: bytes) -> bytes:
        return self._flip("down", data)


@dataclass
class Observer:
    """A passive on-path observer: records every byte each way, changes nothing.

    Callable as a relay's rewriter factory; :meth:`datagram` records UDP too.
    """

    captured: bytearray = field(default_factory=bytearray)
    datagram_bodies: bytearray = field(default_factory=bytearray)
    """What the UDP datagrams carried after their clear header (conn_id and packet
    number, which hold small integers a small nonce can equal by chance)."""

    def __call__(self) -> Observer:
        return self

    def to_target(self, data: bytes) -> bytes:
        self._keep(data)
        return data

    def to_client(self, data: bytes) -> bytes:
        self._keep(data)
        return data

    def datagram(self, direction: str, data: bytes) -> bytes:
        self._keep(data)
        if len(self.datagram_bodies) < 16 * _MAX_BUFFER:
            self.datagram_bodies += data[HEADER_SIZE:]
        return data

    def _keep(self, data: bytes) -> None:
        if len(self.captured) < 16 * _MAX_BUFFER:
            self.captured += data

    def saw(self, text: str) -> bool:
        return text.encode() in self.captured
