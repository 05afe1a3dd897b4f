"""Bounded newline framing for Stratum V1.

Bytes go in with :meth:`LineBuffer.feed`; complete lines come out, without their
``\\n`` (a trailing ``\\r`` is dropped too, and empty lines are skipped: JSON
parsers skip whitespace, and real miners never send them). A line longer than
``max_line`` bytes is a protocol error: :class:`~bridge.errors.LineTooLong` is
raised as soon as the buffered partial line passes the limit, so memory stays
bounded whatever the peer sends. After that error the buffer is unusable; the
caller closes the connection.

ckpool drops a client whose line exceeds 1024 bytes; a mining.notify with a long
merkle branch is ~1.5 KB, so the limits here are per direction and configurable.
"""

from __future__ import annotations

from bridge.errors import LineTooLong

DEFAULT_MAX_LINE = 16 * 1024


class LineBuffer:
    __slots__ = ("_buf", "max_line", "_broken")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self._buf = b""
        self.max_line = max_line
        self._broken = False

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every complete, non-empty line."""
        if self._broken:
            raise LineTooLong("connection already failed on an oversized line")
        buf = self._buf + data if self._buf else data
        if b"\n" not in buf:
            self._check(len(buf))
            self._buf = buf
            return []
        *complete, rest = buf.split(b"\n")
        self._check(len(rest))
        self._buf = rest
        lines = []
        limit = self.max_line
        for line in complete:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line.strip():
                continue
            if len(line) > limit:
                self._broken = True
                raise LineTooLong(f"line of {len(line)} bytes exceeds the {limit}-byte limit")
            lines.append(line)
        return lines

    def _check(self, pending: int) -> None:
        if pending > self.max_line:
            self._broken = True
            raise LineTooLong(
                f"more than {self.max_line} bytes without a newline; not a Stratum peer or a runaway line"
            )

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held in memory."""
        return len(self._buf)
