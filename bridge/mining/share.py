"""Share math for Bitcoin SHA256d Stratum V1: the one place where it lives.

A pool checks a submitted share by rebuilding the block header the miner hashed
and comparing its double-SHA256 with the target for the share difficulty.

**Coinbase and merkle root.** The coinbase transaction is
``coinb1 || extranonce1 || extranonce2 || coinb2``, with extranonce2 exactly as
submitted (no byte swap). Its ``sha256d`` is the coinbase txid in *internal*
byte order (the txid shown by explorers is the same 32 bytes reversed). The
merkle root is folded up from there with ``h = sha256d(h || branch)`` for each
``merkle_branch`` entry, the entries taken as raw bytes, never reversed.

**The prevhash quirk.** The ``mining.notify`` prevhash is the internal
(little-endian) hash with the four bytes inside each 32-bit word reversed;
equivalently, the explorer display hash with its eight words in reverse order.
Reversing the bytes inside every word gives the bytes as they go into the
header; reversing all 32 header bytes gives the display form. Nothing else in
the notify is word swapped.

**Header layout** (80 bytes, integers little-endian uint32)::

    offset  0  nVersion        job version, rolled with the BIP310 version bits
    offset  4  hashPrevBlock   word_swap(unhex(prevhash))
    offset 36  hashMerkleRoot  as computed, internal byte order
    offset 68  nTime           the *submitted* ntime
    offset 72  nBits           from the notify
    offset 76  nNonce          the submitted nonce ("0a029ed1" -> d1 9e 02 0a)

**Difficulty.** The header hash is read as a little-endian 256-bit integer.
``DIFF1_TARGET = 0xFFFF * 2**208`` ("pdiff 1", cgminer's ``truediffone``). The
target for difficulty ``d`` is ``floor(DIFF1_TARGET / d)``, computed exactly in
integers; a share is accepted at difficulty ``d`` iff ``hash_int <= target``.
The share's own difficulty is ``DIFF1_TARGET / hash_int``. The network target
is the compact ``nBits`` value ``mantissa * 256**(exponent - 3)``.

**Version rolling** (BIP310): ``nVersion = (job & ~mask) | (bits & mask)``, and
the submitted bits are valid only if ``bits & ~mask == 0``.

This module is sans-IO and deterministic: stdlib only, no sockets, no clocks.
Functions raise :class:`ValueError` on malformed input.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

__all__ = [
    "DIFF1_TARGET",
    "MAX_TARGET",
    "U32_MASK",
    "Difficulty",
    "Job",
    "build_coinbase",
    "build_header",
    "difficulty_to_target",
    "display_hex",
    "hash_difficulty",
    "hash_to_int",
    "meets_difficulty",
    "merkle_root",
    "nbits_to_target",
    "parse_hex",
    "parse_u32_hex",
    "prevhash_display",
    "prevhash_from_display",
    "prevhash_from_header",
    "prevhash_to_header",
    "roll_version",
    "scan_nonces",
    "sha256d",
    "target_to_difficulty",
    "target_to_nbits",
    "version_bits_allowed",
]

DIFF1_TARGET: int = 0x00000000FFFF0000000000000000000000000000000000000000000000000000
"""The target of difficulty 1 ("pdiff 1"): ``0xFFFF * 2**208``."""

MAX_TARGET: int = (1 << 256) - 1
"""The largest 256-bit target; every hash meets it."""

U32_MASK: int = 0xFFFFFFFF

Difficulty = int | float | Fraction | Decimal
"""A share difficulty: ``int``, ``float`` (as decoded from JSON), ``Fraction`` or ``Decimal``."""

_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})*")
_HEADER = struct.Struct("<I32s32sIII")
_WORDS_BE = struct.Struct(">8I")
_WORDS_LE = struct.Struct("<8I")
_U32_LE = struct.Struct("<I")
_sha256 = hashlib.sha256
try:  # CPython's own SHA-256: less call overhead than OpenSSL's for inputs of a block or two
    from _sha256 import sha256 as _small_sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - other interpreters, Python 3.12+ (_sha2)
    try:
        from _sha2 import sha256 as _small_sha256  # type: ignore[import-not-found]
    except ImportError:
        _small_sha256 = hashlib.sha256


# --------------------------------------------------------------------------- hashing


def sha256d(data: bytes) -> bytes:
    """Return ``SHA256(SHA256(data))``, the 32-byte digest in internal byte order."""
    return _sha256(_sha256(data).digest()).digest()


def display_hex(h: bytes) -> str:
    """Return a hash in explorer display form: the bytes reversed, as hex."""
    return h[::-1].hex()


def hash_to_int(header_hash: bytes) -> int:
    """Read a 32-byte sha256d digest as the little-endian integer compared with targets."""
    if len(header_hash) != 32:
        raise ValueError(f"hash must be 32 bytes, got {len(header_hash)}")
    return int.from_bytes(header_hash, "little")


# --------------------------------------------------------------------------- hex parsing


def parse_hex(value: str, name: str, length: int | None = None) -> bytes:
    """Decode a strict hex string (no whitespace, no ``0x``) for the field ``name``.

    ``length`` is the required length in bytes, if any. Raises :class:`ValueError`
    naming the field on non-hex text, an odd number of digits or a wrong length.
    """
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a hex string, got {type(value).__name__}")
    if _HEX_RE.fullmatch(value) is None:
        raise ValueError(f"{name}: not an even-length hex string: {_preview(value)}")
    if length is not None and len(value) != 2 * length:
        raise ValueError(f"{name}: expected {2 * length} hex characters ({length} bytes), got {len(value)}")
    return bytes.fromhex(value)


def parse_u32_hex(value: str, name: str) -> int:
    """Decode exactly 8 hex digits as a big-endian uint32 (notify version/nbits/ntime,
    submit ntime/nonce/version_bits)."""
    return int.from_bytes(parse_hex(value, name, 4), "big")


def _preview(value: str, limit: int = 24) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


# --------------------------------------------------------------------------- coinbase and merkle


def build_coinbase(coinb1: bytes, extranonce1: bytes, extranonce2: bytes, coinb2: bytes) -> bytes:
    """Return the coinbase transaction ``coinb1 || extranonce1 || extranonce2 || coinb2``."""
    return b"".join((coinb1, extranonce1, extranonce2, coinb2))


def merkle_root(coinbase: bytes, branch: Sequence[bytes]) -> bytes:
    """Fold the coinbase txid up the merkle branch; returns the root in internal byte order.

    Each branch entry is a 32-byte hash used raw, exactly as unhexed from the notify.
    """
    h = sha256d(coinbase)
    for i, b in enumerate(branch):
        if len(b) != 32:
            raise ValueError(f"merkle branch entry {i} must be 32 bytes, got {len(b)}")
        h = _sha256(_sha256(h + b).digest()).digest()
    return h


# --------------------------------------------------------------------------- prevhash


def prevhash_to_header(stratum_prevhash_hex: str) -> bytes:
    """Convert a notify prevhash to the 32 bytes of ``hashPrevBlock`` in the header
    (reverse the bytes inside every 4-byte word)."""
    raw = parse_hex(stratum_prevhash_hex, "prevhash", 32)
    return _WORDS_LE.pack(*_WORDS_BE.unpack(raw))


def prevhash_from_header(b: bytes) -> str:
    """Inverse of :func:`prevhash_to_header`: header bytes to the notify prevhash hex."""
    if len(b) != 32:
        raise ValueError(f"hashPrevBlock must be 32 bytes, got {len(b)}")
    return _WORDS_BE.pack(*_WORDS_LE.unpack(b)).hex()


def prevhash_display(stratum_hex: str) -> str:
    """Convert a notify prevhash to the block-explorer display form of the previous block hash."""
    return prevhash_to_header(stratum_hex)[::-1].hex()


def prevhash_from_display(display_hex_str: str) -> str:
    """Convert an explorer display block hash to the notify prevhash form."""
    raw = parse_hex(display_hex_str, "block hash", 32)
    return prevhash_from_header(raw[::-1])


# --------------------------------------------------------------------------- version rolling


def roll_version(job_version: int, version_bits: int, mask: int) -> int:
    """Apply BIP310 version rolling: ``(job_version & ~mask) | (version_bits & mask)``."""
    return ((job_version & ~mask) | (version_bits & mask)) & U32_MASK


def version_bits_allowed(version_bits: int, mask: int) -> bool:
    """True if the submitted version bits are a uint32 lying entirely inside ``mask``."""
    return 0 <= version_bits <= U32_MASK and version_bits & ~mask == 0


# --------------------------------------------------------------------------- header


def build_header(version: int, prevhash: bytes, merkle_root: bytes, ntime: int, nbits: int, nonce: int) -> bytes:
    """Pack the 80-byte block header; ``prevhash`` is in header order (see
    :func:`prevhash_to_header`), ``merkle_root`` in internal order."""
    if len(prevhash) != 32:
        raise ValueError(f"prevhash must be 32 bytes in header order, got {len(prevhash)}")
    if len(merkle_root) != 32:
        raise ValueError(f"merkle_root must be 32 bytes, got {len(merkle_root)}")
    try:
        return _HEADER.pack(version, prevhash, merkle_root, ntime, nbits, nonce)
    except struct.error as exc:
        raise ValueError(
            f"header fields must be uint32 (version={version!r}, ntime={ntime!r}, nbits={nbits!r}, nonce={nonce!r}): {exc}"
        ) from None


# --------------------------------------------------------------------------- difficulty and targets


def _difficulty_fraction(diff: Difficulty) -> Fraction:
    """Turn a difficulty into an exact positive fraction.

    A float is read through its shortest repr, so the value decoded from the JSON
    text ``0.001`` is exactly 1/1000, not the nearest binary double.
    """
    if isinstance(diff, bool) or not isinstance(diff, (int, float, Fraction, Decimal)):
        raise ValueError(f"difficulty must be a number, got {diff!r}")
    if isinstance(diff, float):
        if not math.isfinite(diff):
            raise ValueError(f"difficulty must be finite, got {diff!r}")
        frac = Fraction(repr(diff))
    elif isinstance(diff, Decimal):
        if not diff.is_finite():
            raise ValueError(f"difficulty must be finite, got {diff!r}")
        frac = Fraction(diff)
    else:
        frac = Fraction(diff)
    if frac <= 0:
        raise ValueError(f"difficulty must be positive, got {diff!r}")
    return frac


def difficulty_to_target(diff: Difficulty) -> int:
    """Return ``floor(DIFF1_TARGET / diff)``, exact in integer arithmetic.

    Difficulties below ``DIFF1_TARGET / MAX_TARGET`` (about 1.5e-10) clamp to
    :data:`MAX_TARGET`.
    """
    frac = _difficulty_fraction(diff)
    return min((DIFF1_TARGET * frac.denominator) // frac.numerator, MAX_TARGET)


def target_to_difficulty(target: int) -> float:
    """Return ``DIFF1_TARGET / target`` as a correctly rounded float."""
    if target <= 0:
        raise ValueError(f"target must be positive, got {target}")
    return DIFF1_TARGET / target


def hash_difficulty(hash_int: int) -> float:
    """The difficulty a hash achieves: ``DIFF1_TARGET / hash_int`` (infinite for a zero hash)."""
    if hash_int < 0:
        raise ValueError(f"hash must be non-negative, got {hash_int}")
    if hash_int == 0:
        return math.inf
    return DIFF1_TARGET / hash_int


def meets_difficulty(hash_int: int, diff: Difficulty) -> bool:
    """True if a share hash is accepted at ``diff``: ``hash_int <= DIFF1_TARGET // diff``."""
    return hash_int <= difficulty_to_target(diff)


def nbits_to_target(nbits: int) -> int:
    """Expand a compact ``nBits`` value: ``mantissa * 256**(exponent - 3)``.

    Raises :class:`ValueError` for a negative compact value (sign bit 0x00800000
    set with a non-zero mantissa) or one that overflows 256 bits, as Bitcoin Core's
    ``SetCompact`` would flag them.
    """
    if not 0 <= nbits <= U32_MASK:
        raise ValueError(f"nbits must be a uint32, got {nbits!r}")
    exponent = nbits >> 24
    mantissa = nbits & 0x007FFFFF
    if nbits & 0x00800000 and mantissa:
        raise ValueError(f"nbits {nbits:08x} encodes a negative target")
    if exponent <= 3:
        target = mantissa >> (8 * (3 - exponent))
    else:
        target = mantissa << (8 * (exponent - 3))
    if target > MAX_TARGET:
        raise ValueError(f"nbits {nbits:08x} overflows 256 bits")
    return target


def target_to_nbits(target: int) -> int:
    """Encode a target in compact form (Bitcoin Core's ``GetCompact``).

    Precision beyond the 3-byte mantissa is truncated, so the result expands back
    to a target ``<=`` the input; targets the compact form can represent round-trip.
    """
    if not 0 <= target <= MAX_TARGET:
        raise ValueError(f"target must be in [0, 2**256), got {target!r}")
    size = (target.bit_length() + 7) // 8
    if size <= 3:
        mantissa = target << (8 * (3 - size))
    else:
        mantissa = target >> (8 * (size - 3))
    if mantissa & 0x00800000:  # keep the sign bit clear
        mantissa >>= 8
        size += 1
    return (size << 24) | mantissa


# --------------------------------------------------------------------------- job


@dataclass(frozen=True, slots=True)
class Job:
    """One ``mining.notify`` job, decoded and validated once.

    ``prevhash`` keeps the notify text as received (for comparisons and pass-through);
    ``prevhash_header`` holds the 32 bytes as they go into the header.
    """

    job_id: str
    prevhash: str
    prevhash_header: bytes = field(repr=False)
    coinb1: bytes = field(repr=False)
    coinb2: bytes = field(repr=False)
    merkle_branch: tuple[bytes, ...] = field(repr=False)
    version_int: int
    nbits_int: int
    ntime_int: int
    _nbits_packed: bytes = field(init=False, repr=False, compare=False)
    _network_target: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.nbits_int <= U32_MASK:
            raise ValueError(f"nbits must be a uint32, got {self.nbits_int!r}")
        object.__setattr__(self, "_nbits_packed", _U32_LE.pack(self.nbits_int))
        object.__setattr__(self, "_network_target", nbits_to_target(self.nbits_int))

    @classmethod
    def from_notify_fields(
        cls,
        job_id: str,
        prevhash: str,
        coinb1: str,
        coinb2: str,
        merkle_branch: Sequence[str],
        version: str,
        nbits: str,
        ntime: str,
    ) -> Job:
        """Build a job from ``mining.notify`` params 0-7, exactly as on the wire.

        Raises :class:`ValueError` naming the field on non-hex text or wrong lengths:
        prevhash and each branch entry must be 64 hex digits; version, nbits and
        ntime exactly 8.
        """
        if not isinstance(job_id, str):
            raise ValueError(f"job_id: expected a string, got {type(job_id).__name__}")
        if isinstance(merkle_branch, (str, bytes)) or not isinstance(merkle_branch, Sequence):
            raise ValueError(f"merkle_branch: expected a list of hex strings, got {type(merkle_branch).__name__}")
        return cls(
            job_id=job_id,
            prevhash=prevhash,
            prevhash_header=prevhash_to_header(prevhash),
            coinb1=parse_hex(coinb1, "coinb1"),
            coinb2=parse_hex(coinb2, "coinb2"),
            merkle_branch=tuple(parse_hex(b, f"merkle_branch[{i}]", 32) for i, b in enumerate(merkle_branch)),
            version_int=parse_u32_hex(version, "version"),
            nbits_int=parse_u32_hex(nbits, "nbits"),
            ntime_int=parse_u32_hex(ntime, "ntime"),
        )

    def notify_fields(self) -> tuple[str, str, str, str, list[str], str, str, str]:
        """Re-encode params 0-7 of ``mining.notify`` (lower-case hex; prevhash as received)."""
        return (
            self.job_id,
            self.prevhash,
            self.coinb1.hex(),
            self.coinb2.hex(),
            [b.hex() for b in self.merkle_branch],
            f"{self.version_int:08x}",
            f"{self.nbits_int:08x}",
            f"{self.ntime_int:08x}",
        )

    @property
    def network_target(self) -> int:
        """The block target encoded by the job's ``nbits`` (computed once)."""
        return self._network_target

    def rolled_version(self, version_bits: int, mask: int) -> int:
        """The job version rolled with the submitted BIP310 ``version_bits``."""
        return roll_version(self.version_int, version_bits, mask)

    def coinbase(self, extranonce1: bytes, extranonce2: bytes) -> bytes:
        """The coinbase transaction for these extranonces."""
        return b"".join((self.coinb1, extranonce1, extranonce2, self.coinb2))

    def merkle_root(self, extranonce1: bytes, extranonce2: bytes) -> bytes:
        """The merkle root (internal byte order) for these extranonces."""
        return merkle_root(self.coinbase(extranonce1, extranonce2), self.merkle_branch)

    def header76(self, extranonce1: bytes, extranonce2: bytes, ntime: int, version: int | None = None) -> bytes:
        """The first 76 header bytes (everything but the nonce), for :func:`scan_nonces`."""
        return self.header(extranonce1, extranonce2, ntime, 0, version)[:76]

    def header(
        self,
        extranonce1: bytes,
        extranonce2: bytes,
        ntime: int,
        nonce: int,
        version: int | None = None,
    ) -> bytes:
        """The 80-byte header of a share.

        ``ntime`` and ``nonce`` are the submitted values; ``version`` is the final
        nVersion (already rolled, see :meth:`rolled_version`), default the job's.
        """
        if version is None:
            version = self.version_int
        root = self.merkle_root(extranonce1, extranonce2)
        try:
            head = _U32_LE.pack(version)
            tail = _U32_LE.pack(ntime) + self._nbits_packed + _U32_LE.pack(nonce)
        except struct.error as exc:
            raise ValueError(
                f"version, ntime and nonce must be uint32 (version={version!r}, ntime={ntime!r}, nonce={nonce!r}): {exc}"
            ) from None
        return b"".join((head, self.prevhash_header, root, tail))

    def share_hash(
        self,
        extranonce1: bytes,
        extranonce2: bytes,
        ntime: int,
        nonce: int,
        version: int | None = None,
    ) -> int:
        """The share's header hash as the integer compared with targets.

        The same bytes as :meth:`header`, built in one pass: the miner-side proxy
        hashes every share it relays (block candidates, PROTOCOL.md C6).
        """
        # OpenSSL for the coinbase (hundreds of bytes on a real pool); CPython's own
        # SHA-256 for the 32- to 80-byte inputs, where calling OpenSSL costs more than hashing.
        sha256 = _small_sha256
        root = sha256(_sha256(b"".join((self.coinb1, extranonce1, extranonce2, self.coinb2))).digest()).digest()
        for i, b in enumerate(self.merkle_branch):
            if len(b) != 32:
                raise ValueError(f"merkle branch entry {i} must be 32 bytes, got {len(b)}")
            root = sha256(sha256(root + b).digest()).digest()
        try:
            header = _HEADER.pack(
                self.version_int if version is None else version, self.prevhash_header, root, ntime, self.nbits_int, nonce
            )
        except struct.error as exc:
            raise ValueError(
                f"version, ntime and nonce must be uint32 (version={version!r}, ntime={ntime!r}, nonce={nonce!r}): {exc}"
            ) from None
        return int.from_bytes(sha256(sha256(header).digest()).digest(), "little")


# --------------------------------------------------------------------------- CPU nonce scanner


def scan_nonces(header76: bytes, start: int, count: int, target: int) -> list[tuple[int, int]]:
    """Hash ``header76 || le32(nonce)`` for every nonce in ``[start, start + count)``.

    Returns ``(nonce, hash_int)`` for each nonce whose header hash is ``<= target``,
    in nonce order. The 76 fixed bytes are hashed once and the SHA-256 state is
    copied per nonce, so only the last 4 bytes and the final block are hashed each
    time. A hash can only meet the target if its top ``k`` bytes (the last ``k`` of
    the digest) are zero, where ``k`` is the number of whole zero bytes above the
    target's top bit; that byte test rejects almost every nonce before any integer
    is built.
    """
    if len(header76) != 76:
        raise ValueError(f"header76 must be 76 bytes, got {len(header76)}")
    if start < 0 or count < 0 or start + count > U32_MASK + 1:
        raise ValueError(f"nonce range [{start}, {start + count}) is outside uint32")
    if target < 0:
        return []
    zero_tail = bytes((256 - min(target, MAX_TARGET).bit_length()) // 8)
    sha = _sha256
    copy = sha(header76).copy  # state after 76 bytes: one block compressed, 12 buffered
    pack = _U32_LE.pack
    from_bytes = int.from_bytes
    found: list[tuple[int, int]] = []
    for nonce in range(start, start + count):
        h = copy()
        h.update(pack(nonce))
        d = sha(h.digest()).digest()
        if d.endswith(zero_tail):
            value = from_bytes(d, "little")
            if value <= target:
                found.append((nonce, value))
    return found
