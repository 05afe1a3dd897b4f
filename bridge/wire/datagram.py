"""StratumRM data-channel datagrams: the byte layout, and nothing else.

Theory of operation
===================

Every UDP datagram of the share channel is::

    offset size  field
     0     1     version (high nibble, = 2) | type (low nibble)
     1     1     flags: bit 0 KEY_PHASE, bit 1 URGENT, bits 2..7 reserved (must be 0)
     2     8     conn_id (u64): the session handle handed out over TLS with the key
    10     6     packet number (u48): strictly increasing per key and direction
    16     N     ciphertext of the plaintext body
    16+N  16     Poly1305 tag

All integers are big-endian. The 16 header bytes travel in clear *and* are the
AEAD's associated data, so a single flipped header bit makes the tag fail (unlike
DATUM, whose frame header sits outside the MAC). Sealing and opening live in
:mod:`bridge.wire.keys`; this module only knows the layout of the header and of the
plaintext bodies, so it can be read as the protocol's grammar.

Bodies (the plaintext, by type):

``SHARE`` (1)
    one share record (see below).
``SHARE_BATCH`` (2)
    ``count`` (u8, 1..32) then ``count`` share records back to back. Shares that
    arrive within about a millisecond may share a datagram. A share inside a batch
    is referred to as ``(pn, index)``, index counting from 0 in record order; a
    ``SHARE`` is ``(pn, 0)``. Verdicts reported over TLS use that reference.
``PROBE`` (3)
    ``probe_id`` (u32) then zero padding. Checks that UDP gets through, keeps NAT
    bindings open, measures RTT, and lets the sidecar learn the proxy's address.
``PROBE_ACK`` (4)
    ``probe_id`` (u32, echoed) then zero padding; never larger than the probe.
``ACK`` (5, sidecar to proxy only)
    ``ack_delay_us`` (u32), ``range_count`` (u8, 1..32), then ``range_count`` times
    ``high`` (u48), ``low`` (u48): inclusive ranges of packet numbers received
    (authenticated) in the opposite direction under the same conn_id, highest
    range first, disjoint. It reports *receipt*, not the pool's verdict. The ACK
    exists so the proxy's retransmission timer measures the UDP path alone (clean,
    unambiguous RTT samples, since a retransmission always gets a new pn), instead
    of waiting on pool latency. The sidecar sends one only when no VERDICT named
    the packet within the ack delay (about 5 ms): a verdict acknowledges too.
``VERDICT`` (6, sidecar to proxy only)
    1..64 entries back to back, up to the end of the plaintext: the low 32 bits of the
    ``pn`` of the share datagram (u32; the proxy takes the pn at or below the largest
    it sent under that conn_id with those low bits), then one byte: bits 0..5 the
    share's index in it, bit 6 DETAIL, bit 7 reserved (0). Without DETAIL the pool
    accepted the share plainly (``result: true, error: null``); with DETAIL a ``u16``
    length and that many bytes of the pool's response object without its id (JSON)
    follow. The entries name packets sealed under the same conn_id as the VERDICT
    itself; naming a packet also acknowledges it.

A share record::

    1     record flags: bits 0..3 extranonce2 length (0..8),
                        bit 4 VERSION (version bits present),
                        bit 5 WORKER (worker index present),
                        bit 6 WIDE (channel id and job handle are u32, else u16),
                        bit 7 VERSION16 (with VERSION: the version bits are
                              BIP320's bits 13..28 only, sent as a u16)
    2|4   channel_id   the miner connection inside the proxy's session
    2|4   job_handle   the sidecar's number for the channel's SV1 job id
    0|1   worker_index (u8) if WORKER: which of the channel's authorized workers
    0..8  extranonce2
    4     ntime
    4     nonce
    0|2|4 version_bits if VERSION (BIP310; absent when the miner sent none): a u32,
          or with VERSION16 a u16 ``v`` standing for ``v << 13``

The extranonce2 length shares the flags byte, ids that fit in 16 bits use the short
form, and version bits within BIP320's general-purpose bits (the mask every miner
rolls) take two bytes, so the common share (4-byte extranonce2, version rolling,
short ids) is 19 plaintext bytes and a 51-byte datagram. Encoders use the short forms
whenever they fit; decoders accept both. Worker names never appear: the channel was
authorized over TLS.

Rules
=====

- Decoding is validation: a body either decodes completely, consuming every byte
  (only ``PROBE``/``PROBE_ACK`` padding may follow, and it must be zero), or
  :class:`DatagramDecodeError` is raised with a :class:`DropReason`.
- Encoding refuses values that do not fit (:class:`DatagramEncodeError`).
- No I/O, no clock, no keys here.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, TypeAlias

import msgspec

from bridge.errors import BridgeError

__all__ = [
    "ACK_MAX_RANGES",
    "BATCH_MAX_SHARES",
    "HEADER_SIZE",
    "KNOWN_FLAGS",
    "MAX_DATAGRAM_SIZE",
    "MAX_EXTRANONCE2_SIZE",
    "MAX_PN",
    "MIN_BODY_SIZE",
    "OVERHEAD",
    "PROTOCOL_VERSION",
    "TAG_SIZE",
    "VERDICT_MAX_ENTRIES",
    "VERSION16_MASK",
    "Ack",
    "AckRange",
    "Body",
    "DatagramDecodeError",
    "DatagramEncodeError",
    "DatagramType",
    "DropReason",
    "Flags",
    "Header",
    "Probe",
    "ProbeAck",
    "Share",
    "ShareBatch",
    "VerdictEntry",
    "Verdicts",
    "body_type",
    "decode_body",
    "encode_body",
    "encode_verdicts",
    "expand_pn",
    "pack_header",
    "pack_verdict_entry",
    "parse_header",
    "verdict_entry_size",
]

PROTOCOL_VERSION: Final = 2
HEADER_SIZE: Final = 16
TAG_SIZE: Final = 16
OVERHEAD: Final = HEADER_SIZE + TAG_SIZE
#: Largest datagram either side sends or accepts: fits a 1280-byte IPv6 minimum MTU
#: with room to spare, so datagrams are never fragmented.
MAX_DATAGRAM_SIZE: Final = 1200
MAX_PN: Final = (1 << 48) - 1
MAX_EXTRANONCE2_SIZE: Final = 8
BATCH_MAX_SHARES: Final = 32
ACK_MAX_RANGES: Final = 32
VERDICT_MAX_ENTRIES: Final = 64

_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF


class DatagramType(enum.IntEnum):
    """The low nibble of byte 0."""

    SHARE = 1
    SHARE_BATCH = 2
    PROBE = 3
    PROBE_ACK = 4
    ACK = 5
    VERDICT = 6


class Flags(enum.IntFlag):
    """Byte 1 of the header. Every other bit is reserved and must be zero."""

    KEY_PHASE = 0x01
    URGENT = 0x02


KNOWN_FLAGS: Final = int(Flags.KEY_PHASE | Flags.URGENT)


class DropReason(enum.StrEnum):
    """Why a datagram was dropped. The values are the names used in statistics."""

    TRUNCATED = "truncated"
    OVERSIZED = "oversized"
    BAD_VERSION = "bad version"
    UNKNOWN_TYPE = "unknown type"
    UNEXPECTED_TYPE = "unexpected type"
    BAD_FLAGS = "bad flags"
    UNKNOWN_CONN_ID = "unknown conn_id"
    KEY_EXPIRED = "key expired"
    WRONG_KEY_PHASE = "wrong key phase"
    REPLAYED = "replayed"
    TOO_OLD = "too old"
    RATE_LIMITED = "rate limited"
    BAD_TAG = "bad tag"
    MALFORMED = "malformed"


class DatagramDecodeError(BridgeError):
    """Bytes that are not a valid header or body; ``reason`` says which check failed."""

    def __init__(self, reason: DropReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class DatagramEncodeError(BridgeError, ValueError):
    """A value does not fit the datagram format; the message names the field."""


# --------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------

_HEADER = struct.Struct(">BBQHI")  # version|type, flags, conn_id, pn high 16, pn low 32


class Header(msgspec.Struct, frozen=True, gc=False):
    """The 16 clear (but authenticated) bytes at the front of every datagram."""

    type: int
    conn_id: int
    pn: int
    flags: int = 0
    version: int = PROTOCOL_VERSION

    @property
    def key_phase(self) -> int:
        """0 or 1: the parity of the key epoch the datagram is sealed under."""
        return self.flags & 0x01

    @property
    def urgent(self) -> bool:
        """True for a block candidate."""
        return bool(self.flags & 0x02)

    def encode(self) -> bytes:
        """Return the 16 header bytes; raise :class:`DatagramEncodeError` on bad values."""
        if not 0 <= self.version <= 0xF:
            raise DatagramEncodeError(f"version {self.version} does not fit a nibble")
        if not 0 <= self.type <= 0xF:
            raise DatagramEncodeError(f"type {self.type} does not fit a nibble")
        if not 0 <= self.flags <= 0xFF:
            raise DatagramEncodeError(f"flags {self.flags:#x} do not fit a byte")
        if not 0 <= self.conn_id <= _U64:
            raise DatagramEncodeError(f"conn_id {self.conn_id} is not a u64")
        if not 0 <= self.pn <= MAX_PN:
            raise DatagramEncodeError(f"packet number {self.pn} is not a u48")
        return _HEADER.pack(self.version << 4 | self.type, self.flags, self.conn_id, self.pn >> 32, self.pn & _U32)


def pack_header(dtype: int, flags: int, conn_id: int, pn: int) -> bytes:
    """Fast header packing for the send path (values assumed already in range)."""
    return _HEADER.pack(PROTOCOL_VERSION << 4 | dtype, flags, conn_id, pn >> 32, pn & _U32)


def parse_header(data: bytes) -> Header:
    """Decode the 16 header bytes without judging them (any version, type or flags).

    Raises :class:`DatagramDecodeError` (``TRUNCATED``) if fewer than 16 bytes.
    The receive pipeline in :mod:`bridge.wire.receiver` does its own, inlined version
    of this; this function is for tools and tests.
    """
    if len(data) < HEADER_SIZE:
        raise DatagramDecodeError(DropReason.TRUNCATED, f"{len(data)} bytes, header needs 16")
    first, flags, conn_id, pn_high, pn_low = _HEADER.unpack_from(data)
    return Header(version=first >> 4, type=first & 0x0F, flags=flags, conn_id=conn_id, pn=pn_high << 32 | pn_low)


# --------------------------------------------------------------------------------------
# Bodies
# --------------------------------------------------------------------------------------


class Share(msgspec.Struct, frozen=True, gc=False):
    """One share, as a miner submitted it, in the channel's numbering.

    ``version_bits`` is ``None`` when the miner sent no version bits (no BIP310), and
    ``worker_index`` is ``None`` for a channel's default (first) worker.
    """

    channel_id: int
    job_handle: int
    extranonce2: bytes
    ntime: int
    nonce: int
    version_bits: int | None = None
    worker_index: int | None = None


class ShareBatch(msgspec.Struct, frozen=True, gc=False):
    """Several shares in one datagram; share ``i`` is referred to as ``(pn, i)``."""

    shares: tuple[Share, ...]


class Probe(msgspec.Struct, frozen=True, gc=False):
    """A reachability/RTT probe; ``padding`` zero bytes follow the id."""

    probe_id: int
    padding: int = 0


class ProbeAck(msgspec.Struct, frozen=True, gc=False):
    """The answer to a :class:`Probe`, echoing its id; never larger than the probe."""

    probe_id: int
    padding: int = 0


class AckRange(msgspec.Struct, frozen=True, gc=False):
    """Packet numbers ``low..high`` inclusive."""

    high: int
    low: int


class Ack(msgspec.Struct, frozen=True, gc=False):
    """Receipt of packet numbers, highest range first, ranges disjoint.

    ``ack_delay_us`` is how long the sender held the acknowledgement after receiving
    the highest acknowledged packet, so the peer can subtract it from its RTT sample.
    """

    ranges: tuple[AckRange, ...]
    ack_delay_us: int = 0

    @property
    def largest(self) -> int:
        """The highest packet number acknowledged."""
        return self.ranges[0].high


class VerdictEntry(msgspec.Struct, frozen=True, gc=False):
    """The pool's verdict on share ``index`` of the datagram ``pn``.

    On the wire only the low 32 bits of ``pn`` travel: a decoded entry holds those,
    and the proxy restores the whole pn with :func:`expand_pn`.

    ``detail`` is None for a plain accept (``result: true, error: null``), otherwise
    the pool's response object without its id, as JSON bytes.
    """

    pn: int
    index: int = 0
    detail: bytes | None = None


class Verdicts(msgspec.Struct, frozen=True, gc=False):
    """Verdicts of shares, each naming its datagram by packet number (which it acknowledges)."""

    entries: tuple[VerdictEntry, ...]


Body: TypeAlias = Share | ShareBatch | Probe | ProbeAck | Ack | Verdicts

_BODY_TYPES: Final[dict[type, DatagramType]] = {
    Share: DatagramType.SHARE,
    ShareBatch: DatagramType.SHARE_BATCH,
    Probe: DatagramType.PROBE,
    ProbeAck: DatagramType.PROBE_ACK,
    Ack: DatagramType.ACK,
    Verdicts: DatagramType.VERDICT,
}

# Record flag bits.
_REC_EN2_LEN: Final = 0x0F
_REC_VERSION: Final = 0x10
_REC_WORKER: Final = 0x20
_REC_WIDE: Final = 0x40
_REC_VERSION16: Final = 0x80
#: BIP320's general-purpose version bits: what a VERSION16 record carries, shifted down.
VERSION16_MASK: Final = 0x1FFFE000
_VERSION16_SHIFT: Final = 13

_SHORT_IDS = struct.Struct(">HH")
_WIDE_IDS = struct.Struct(">II")
_U32_PAIR = struct.Struct(">II")
_U32_ONE = struct.Struct(">I")
_U16_VERSION = struct.Struct(">H")
_ACK_HEAD = struct.Struct(">IB")
_ACK_RANGE = struct.Struct(">HIHI")  # high (16+32 bits), low (16+32 bits)

_SHARE_RECORD_MIN: Final = 1 + 2 + 2 + 4 + 4
_VERDICT_PN = struct.Struct(">IB")  # pn (its low 32 bits), index | flags
_U16_ONE = struct.Struct(">H")
_VERDICT_INDEX: Final = 0x3F
_VERDICT_DETAIL: Final = 0x40
_VERDICT_RESERVED: Final = 0x80

#: Smallest plaintext of each type (a cheap length check before any cryptography).
MIN_BODY_SIZE: Final[dict[int, int]] = {
    DatagramType.SHARE: _SHARE_RECORD_MIN,
    DatagramType.SHARE_BATCH: 1 + _SHARE_RECORD_MIN,
    DatagramType.PROBE: 4,
    DatagramType.PROBE_ACK: 4,
    DatagramType.ACK: _ACK_HEAD.size + _ACK_RANGE.size,
    DatagramType.VERDICT: _VERDICT_PN.size,
}


def body_type(body: Body) -> DatagramType:
    """The datagram type that carries ``body``."""
    return _BODY_TYPES[type(body)]


def _check_u(value: int, limit: int, name: str) -> None:
    if not 0 <= value <= limit:
        raise DatagramEncodeError(f"{name} {value} is out of range 0..{limit}")


def _encode_share_into(out: bytearray, share: Share) -> None:
    en2 = share.extranonce2
    if len(en2) > MAX_EXTRANONCE2_SIZE:
        raise DatagramEncodeError(f"extranonce2 is {len(en2)} bytes, at most 8 allowed")
    _check_u(share.channel_id, _U32, "channel_id")
    _check_u(share.job_handle, _U32, "job_handle")
    _check_u(share.ntime, _U32, "ntime")
    _check_u(share.nonce, _U32, "nonce")
    record_flags = len(en2)
    short_version = False
    if share.version_bits is not None:
        _check_u(share.version_bits, _U32, "version_bits")
        record_flags |= _REC_VERSION
        if not share.version_bits & ~VERSION16_MASK:
            short_version = True
            record_flags |= _REC_VERSION16
    if share.worker_index is not None:
        _check_u(share.worker_index, 0xFF, "worker_index")
        record_flags |= _REC_WORKER
    wide = share.channel_id > _U16 or share.job_handle > _U16
    if wide:
        record_flags |= _REC_WIDE
    out.append(record_flags)
    out += (_WIDE_IDS if wide else _SHORT_IDS).pack(share.channel_id, share.job_handle)
    if share.worker_index is not None:
        out.append(share.worker_index)
    out += en2
    out += _U32_PAIR.pack(share.ntime, share.nonce)
    if share.version_bits is not None:
        if short_version:
            out += _U16_VERSION.pack(share.version_bits >> _VERSION16_SHIFT)
        else:
            out += _U32_ONE.pack(share.version_bits)


def _decode_share_at(data: bytes, offset: int) -> tuple[Share, int]:
    """Decode one share record at ``offset``; return it and the offset after it."""
    end = len(data)
    if offset >= end:
        raise DatagramDecodeError(DropReason.MALFORMED, "share record missing")
    record_flags = data[offset]
    offset += 1
    has_version = record_flags & _REC_VERSION
    short_version = record_flags & _REC_VERSION16
    if short_version and not has_version:
        raise DatagramDecodeError(DropReason.MALFORMED, "VERSION16 share record flag without VERSION")
    en2_len = record_flags & _REC_EN2_LEN
    if en2_len > MAX_EXTRANONCE2_SIZE:
        raise DatagramDecodeError(DropReason.MALFORMED, f"extranonce2 length {en2_len} > 8")
    ids = _WIDE_IDS if record_flags & _REC_WIDE else _SHORT_IDS
    has_worker = record_flags & _REC_WORKER
    version_size = (2 if short_version else 4) if has_version else 0
    need = ids.size + (1 if has_worker else 0) + en2_len + 8 + version_size
    if offset + need > end:
        raise DatagramDecodeError(DropReason.MALFORMED, "share record truncated")
    channel_id, job_handle = ids.unpack_from(data, offset)
    offset += ids.size
    worker_index = None
    if has_worker:
        worker_index = data[offset]
        offset += 1
    extranonce2 = bytes(data[offset : offset + en2_len])
    offset += en2_len
    ntime, nonce = _U32_PAIR.unpack_from(data, offset)
    offset += 8
    version_bits = None
    if short_version:
        (short,) = _U16_VERSION.unpack_from(data, offset)
        version_bits = short << _VERSION16_SHIFT
        offset += 2
    elif has_version:
        (version_bits,) = _U32_ONE.unpack_from(data, offset)
        offset += 4
    share = Share(
        channel_id=channel_id,
        job_handle=job_handle,
        extranonce2=extranonce2,
        ntime=ntime,
        nonce=nonce,
        version_bits=version_bits,
        worker_index=worker_index,
    )
    return share, offset


def _encode_padded_id(probe_id: int, padding: int, name: str) -> bytes:
    _check_u(probe_id, _U32, f"{name}.probe_id")
    if padding < 0 or padding > MAX_DATAGRAM_SIZE - OVERHEAD - 4:
        raise DatagramEncodeError(f"{name}.padding {padding} does not fit a datagram")
    return _U32_ONE.pack(probe_id) + bytes(padding)


def _decode_padded_id(data: bytes) -> tuple[int, int]:
    if len(data) < 4:
        raise DatagramDecodeError(DropReason.MALFORMED, "probe id missing")
    (probe_id,) = _U32_ONE.unpack_from(data, 0)
    padding = data[4:]
    if padding.count(0) != len(padding):
        raise DatagramDecodeError(DropReason.MALFORMED, "probe padding is not zero")
    return probe_id, len(padding)


def encode_body(body: Body) -> bytes:
    """Encode a body to plaintext; raise :class:`DatagramEncodeError` if it does not fit."""
    if isinstance(body, Share):
        out = bytearray()
        _encode_share_into(out, body)
        return bytes(out)
    if isinstance(body, ShareBatch):
        count = len(body.shares)
        if not 1 <= count <= BATCH_MAX_SHARES:
            raise DatagramEncodeError(f"a batch holds 1..{BATCH_MAX_SHARES} shares, not {count}")
        out = bytearray((count,))
        for share in body.shares:
            _encode_share_into(out, share)
        return bytes(out)
    if isinstance(body, Probe):
        return _encode_padded_id(body.probe_id, body.padding, "Probe")
    if isinstance(body, ProbeAck):
        return _encode_padded_id(body.probe_id, body.padding, "ProbeAck")
    if isinstance(body, Ack):
        return _encode_ack(body)
    if isinstance(body, Verdicts):
        return encode_verdicts(body.entries)
    raise DatagramEncodeError(f"not a datagram body: {type(body).__name__}")


def _encode_ack(ack: Ack) -> bytes:
    count = len(ack.ranges)
    if not 1 <= count <= ACK_MAX_RANGES:
        raise DatagramEncodeError(f"an ACK holds 1..{ACK_MAX_RANGES} ranges, not {count}")
    _check_u(ack.ack_delay_us, _U32, "ack_delay_us")
    out = bytearray(_ACK_HEAD.pack(ack.ack_delay_us, count))
    previous_low: int | None = None
    for r in ack.ranges:
        _check_u(r.high, MAX_PN, "AckRange.high")
        _check_u(r.low, r.high, "AckRange.low")
        if previous_low is not None and r.high >= previous_low:
            raise DatagramEncodeError("ACK ranges must be disjoint and highest first")
        previous_low = r.low
        out += _ACK_RANGE.pack(r.high >> 32, r.high & _U32, r.low >> 32, r.low & _U32)
    return bytes(out)


def _decode_ack(data: bytes) -> Ack:
    if len(data) < _ACK_HEAD.size:
        raise DatagramDecodeError(DropReason.MALFORMED, "ACK head missing")
    ack_delay_us, count = _ACK_HEAD.unpack_from(data, 0)
    if not 1 <= count <= ACK_MAX_RANGES:
        raise DatagramDecodeError(DropReason.MALFORMED, f"ACK range count {count}")
    if len(data) != _ACK_HEAD.size + count * _ACK_RANGE.size:
        raise DatagramDecodeError(DropReason.MALFORMED, "ACK length does not match its range count")
    ranges = []
    previous_low: int | None = None
    for i in range(count):
        hh, hl, lh, ll = _ACK_RANGE.unpack_from(data, _ACK_HEAD.size + i * _ACK_RANGE.size)
        high = hh << 32 | hl
        low = lh << 32 | ll
        if low > high or (previous_low is not None and high >= previous_low):
            raise DatagramDecodeError(DropReason.MALFORMED, "ACK ranges out of order")
        previous_low = low
        ranges.append(AckRange(high=high, low=low))
    return Ack(ranges=tuple(ranges), ack_delay_us=ack_delay_us)


def decode_body(dtype: int, data: bytes) -> Body:
    """Decode the plaintext of a datagram of type ``dtype``.

    Raises :class:`DatagramDecodeError` with ``MALFORMED`` (or ``UNKNOWN_TYPE``) when
    the bytes are not exactly one valid body.
    """
    if dtype == DatagramType.SHARE:
        share, end = _decode_share_at(data, 0)
        if end != len(data):
            raise DatagramDecodeError(DropReason.MALFORMED, "bytes after the share record")
        return share
    if dtype == DatagramType.SHARE_BATCH:
        if not data:
            raise DatagramDecodeError(DropReason.MALFORMED, "batch count missing")
        count = data[0]
        if not 1 <= count <= BATCH_MAX_SHARES:
            raise DatagramDecodeError(DropReason.MALFORMED, f"batch count {count}")
        shares = []
        offset = 1
        for _ in range(count):
            share, offset = _decode_share_at(data, offset)
            shares.append(share)
        if offset != len(data):
            raise DatagramDecodeError(DropReason.MALFORMED, "bytes after the last share record")
        return ShareBatch(shares=tuple(shares))
    if dtype == DatagramType.PROBE:
        probe_id, padding = _decode_padded_id(data)
        return Probe(probe_id=probe_id, padding=padding)
    if dtype == DatagramType.PROBE_ACK:
        probe_id, padding = _decode_padded_id(data)
        return ProbeAck(probe_id=probe_id, padding=padding)
    if dtype == DatagramType.ACK:
        return _decode_ack(data)
    if dtype == DatagramType.VERDICT:
        return _decode_verdicts(data)
    raise DatagramDecodeError(DropReason.UNKNOWN_TYPE, f"type {dtype}")


def verdict_entry_size(detail: bytes | None) -> int:
    """Bytes one VERDICT entry takes: 5 for a plain accept, 7 + the detail otherwise."""
    return _VERDICT_PN.size if detail is None else _VERDICT_PN.size + 2 + len(detail)


def pack_verdict_entry(pn: int, index: int, detail: bytes | None = None) -> bytes:
    """One VERDICT entry, for the send path (``pn`` a u48, ``index`` 0..63, a detail under 64 KiB).

    Only the low 32 bits of ``pn`` are written (:func:`expand_pn` restores them).
    """
    if detail is None:
        return _VERDICT_PN.pack(pn & _U32, index)
    return _VERDICT_PN.pack(pn & _U32, index | _VERDICT_DETAIL) + _U16_ONE.pack(len(detail)) + detail


def expand_pn(low: int, largest: int) -> int | None:
    """The packet number at or below ``largest`` whose low 32 bits are ``low``; None if there is none.

    A VERDICT entry carries only the low 32 bits of the pn it names. The proxy knows
    the largest pn it sent under the entry's conn_id, and a share datagram is never
    answered 2^32 datagrams later, so the nearest pn at or below it is the one.
    """
    full = (largest & ~_U32) | low
    if full > largest:
        full -= 1 << 32
    return full if full >= 0 else None


def encode_verdicts(entries: tuple[VerdictEntry, ...] | list[VerdictEntry]) -> bytes:
    """The plaintext of a VERDICT datagram; raise :class:`DatagramEncodeError` if it does not fit."""
    count = len(entries)
    if not 1 <= count <= VERDICT_MAX_ENTRIES:
        raise DatagramEncodeError(f"a VERDICT holds 1..{VERDICT_MAX_ENTRIES} entries, not {count}")
    out = bytearray()
    pack = _VERDICT_PN.pack
    for entry in entries:
        pn, index, detail = entry.pn, entry.index, entry.detail
        _check_u(pn, MAX_PN, "VerdictEntry.pn")
        _check_u(index, _VERDICT_INDEX, "VerdictEntry.index")
        if detail is None:
            out += pack(pn & _U32, index)
        else:
            _check_u(len(detail), MAX_DATAGRAM_SIZE, "VerdictEntry.detail length")
            out += pack(pn & _U32, index | _VERDICT_DETAIL)
            out += _U16_ONE.pack(len(detail))
            out += detail
    return bytes(out)


def _decode_verdicts(data: bytes) -> Verdicts:
    entries: list[VerdictEntry] = []
    offset = 0
    end = len(data)
    if not end:
        raise DatagramDecodeError(DropReason.MALFORMED, "VERDICT without entries")
    while offset < end:
        if len(entries) == VERDICT_MAX_ENTRIES:
            raise DatagramDecodeError(DropReason.MALFORMED, f"more than {VERDICT_MAX_ENTRIES} VERDICT entries")
        if offset + _VERDICT_PN.size > end:
            raise DatagramDecodeError(DropReason.MALFORMED, "VERDICT entry truncated")
        low, flags = _VERDICT_PN.unpack_from(data, offset)
        offset += _VERDICT_PN.size
        if flags & _VERDICT_RESERVED:
            raise DatagramDecodeError(DropReason.MALFORMED, "reserved VERDICT entry flag set")
        detail = None
        if flags & _VERDICT_DETAIL:
            if offset + 2 > end:
                raise DatagramDecodeError(DropReason.MALFORMED, "VERDICT detail length missing")
            (length,) = _U16_ONE.unpack_from(data, offset)
            offset += 2
            if offset + length > end:
                raise DatagramDecodeError(DropReason.MALFORMED, "VERDICT detail truncated")
            detail = bytes(data[offset : offset + length])
            offset += length
        entries.append(VerdictEntry(pn=low, index=flags & _VERDICT_INDEX, detail=detail))
    return Verdicts(entries=tuple(entries))
