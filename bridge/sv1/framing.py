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

Bounded JSON
============

A line within the size limit can still be hostile: ``[[[[...]]]]`` a thousand
levels deep fits in 2 KB and makes any recursive decoder (msgspec's, the
standard library's) raise ``RecursionError``. So every decode of peer input goes
through :class:`BoundedDecoder` (or :func:`decode_json`), which checks the
document's size and nesting depth *before* decoding, with byte-level scans that
run in C: counting ``[`` and ``{`` settles almost every line at once (a share
has two), and only a line with more brackets than :data:`MAX_JSON_DEPTH` gets
the exact measure (strings removed, then the innermost bracket pairs peeled off
one level per pass, at most ``MAX_JSON_DEPTH + 1`` passes). Too deep or too
large is a plain ``msgspec.DecodeError``, so every caller's existing "malformed
JSON" path handles it: an SV1 server closes the connection as ckpool does on
invalid JSON, the control channel closes with a protocol error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

from bridge.errors import LineTooLong

DEFAULT_MAX_LINE = 16 * 1024
#: Deepest JSON nesting any peer may send. Stratum's deepest real message, a
#: subscribe result inside a control-channel line, is 4; rm.results is 6.
MAX_JSON_DEPTH = 32

_T = TypeVar("_T")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_KEEP_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_too_deep(data: str | bytes | bytearray | memoryview, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when the JSON in ``data`` may nest deeper than ``limit`` levels.

    Exact for valid JSON; for invalid JSON an over-estimate (unclosed brackets
    count), never an under-estimate of how deep a decoder would recurse.
    """
    if type(data) is not bytes:
        data = data.encode() if isinstance(data, str) else bytes(data)
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    if b'"' in data:
        data = _STRING.sub(b"", data)
    brackets = data.translate(_KEEP_BRACKETS, _NOT_BRACKETS)
    levels = 0
    while b"[]" in brackets:
        brackets = brackets.replace(b"[]", b"")
        levels += 1
        if levels > limit:
            return True
    # Left: unmatched brackets, "]]][[[" — the unclosed opens enclose everything peeled.
    return levels + brackets.count(b"[") > limit


class BoundedDecoder(Generic[_T]):
    """``msgspec.json.Decoder(type)`` that refuses input too deep or too large before decoding.

    Refusals raise ``msgspec.DecodeError`` saying which bound was passed.
    ``max_size`` None means the caller already bounded the input (a framed line).
    """

    __slots__ = ("_decode", "max_depth", "max_size")

    def __init__(self, type: Any = Any, *, max_depth: int = MAX_JSON_DEPTH, max_size: int | None = None) -> None:
        self._decode: Callable[[str | bytes | bytearray | memoryview | msgspec.Raw], _T] = msgspec.json.Decoder(type).decode
        self.max_depth = max_depth
        self.max_size = max_size

    def decode(self, data: str | bytes | bytearray | memoryview | msgspec.Raw) -> _T:
        if self.max_size is not None and len(data) > self.max_size:
            raise msgspec.DecodeError(f"JSON document of {len(data)} bytes exceeds the {self.max_size}-byte limit")
        if json_too_deep(data, self.max_depth):
            raise msgspec.DecodeError(f"JSON nested deeper than {self.max_depth} levels")
        return self._decode(data)


_ANY = BoundedDecoder[Any]()


def decode_json(data: str | bytes | bytearray | memoryview | msgspec.Raw, *, type: Any = Any) -> Any:
    """``msgspec.json.decode`` with the bounds of :class:`BoundedDecoder`."""
    if type is Any:
        return _ANY.decode(data)
    return BoundedDecoder(type).decode(data)


class LineBuffer:
    __slots__ = ("_broken", "_buf", "max_line")

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
        for raw in complete:
            line = raw[:-1] if raw.endswith(b"\r") else raw
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
            raise LineTooLong(f"more than {self.max_line} bytes without a newline; not a Stratum peer or a runaway line")

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held in memory."""
        return len(self._buf)
