"""Anti-replay sliding window over packet numbers (RFC 4303 §3.4.3 style).

Theory of operation
===================

The window remembers the highest packet number committed so far (``highest``) and,
in one Python int used as a bitmap, which of the ``size`` packet numbers ending at
``highest`` have been committed: bit ``i`` stands for ``highest - i``. A packet
number is acceptable when it is

- above ``highest`` (new; the window will slide forward), or
- within the window and its bit is clear (late but not seen before).

It is refused as ``REPLAYED`` if its bit is set, and as ``TOO_OLD`` if it lies at
or below ``highest - size`` (we can no longer tell, so we must refuse).

Rules
=====

- :meth:`ReplayWindow.check` / :meth:`ReplayWindow.rejection` are cheap and change
  nothing: call them *before* decrypting, to skip the AEAD for obvious replays.
- :meth:`ReplayWindow.commit` is called only *after* the tag verified. Updating on
  an unauthenticated packet number would let a forger slide the window forward and
  make every genuine packet "too old".
- A jump of more than ``size`` clears the bitmap instead of shifting it, so a huge
  (authenticated) jump never builds a huge integer.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["DEFAULT_WINDOW_SIZE", "Rejection", "ReplayWindow"]

DEFAULT_WINDOW_SIZE: Final = 1024


class Rejection(enum.Enum):
    """Why a packet number is refused."""

    REPLAYED = "replayed"
    TOO_OLD = "too old"


class ReplayWindow:
    """Which packet numbers of one key and direction were already accepted."""

    __slots__ = ("_bitmap", "_highest", "_mask", "_size")

    def __init__(self, size: int = DEFAULT_WINDOW_SIZE) -> None:
        if size < 32:
            raise ValueError(f"replay window of {size} packets is too small (at least 32)")
        self._size = size
        self._mask = (1 << size) - 1
        self._highest = -1  # nothing committed yet
        self._bitmap = 0

    @property
    def size(self) -> int:
        """How many packet numbers, ending at :attr:`highest`, the window tracks."""
        return self._size

    @property
    def highest(self) -> int:
        """The highest committed packet number, or -1 before the first commit."""
        return self._highest

    def rejection(self, pn: int) -> Rejection | None:
        """``None`` if ``pn`` is acceptable now, else why it is not. Changes nothing."""
        highest = self._highest
        if pn > highest:
            return None
        offset = highest - pn
        if offset >= self._size:
            return Rejection.TOO_OLD
        if self._bitmap >> offset & 1:
            return Rejection.REPLAYED
        return None

    def check(self, pn: int) -> bool:
        """True if ``pn`` would be accepted (cheap pre-check before decrypting)."""
        return self.rejection(pn) is None

    def commit(self, pn: int) -> None:
        """Record ``pn`` as accepted. Call only after its datagram authenticated.

        Raises :class:`ValueError` if ``pn`` is not acceptable: the caller skipped
        :meth:`check`, which is a bug on our side, not the peer's.
        """
        highest = self._highest
        if pn > highest:
            shift = pn - highest
            if shift >= self._size:
                self._bitmap = 1
            else:
                self._bitmap = (self._bitmap << shift | 1) & self._mask
            self._highest = pn
            return
        offset = highest - pn
        if offset >= self._size or self._bitmap >> offset & 1:
            raise ValueError(f"packet number {pn} committed twice or too old; check() first")
        self._bitmap |= 1 << offset

    def __repr__(self) -> str:
        return f"<ReplayWindow size={self._size} highest={self._highest}>"
