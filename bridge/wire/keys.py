"""Data-channel keys: derivation, nonces, sealing and opening.

Theory of operation
===================

Key material comes from the sidecar, over the authenticated TLS control channel
(``rm.keys``): a random 64-bit ``conn_id`` (never 0), a key ``epoch`` (0 for the
first set of a TLS session, +1 on every rekey) and 32 bytes of fresh random
``secret``. Python's ``ssl`` has no TLS exporter, and ``tls-unique`` is undefined
under TLS 1.3, so the secret is not bound to the handshake: its secrecy is the TLS
channel's confidentiality. Both sides derive one key per direction::

    key_p2s = HKDF-SHA256(ikm=secret, salt=conn_id as 8 bytes big-endian,
                          info=b"stratumrm/udp/v1 proxy->sidecar", length=32)
    key_s2p = HKDF-SHA256(ikm=secret, salt=conn_id as 8 bytes big-endian,
                          info=b"stratumrm/udp/v1 sidecar->proxy", length=32)

(RFC 5869, extract-then-expand.) Separate keys per direction mean both sides can
count packet numbers from 0 without ever sharing a nonce.

The AEAD is ChaCha20-Poly1305 (RFC 8439), one object built per key. The 12-byte
nonce is the packet number as a 96-bit big-endian integer, i.e. four zero bytes
followed by the packet number as a u64 (whose top two bytes are zero since pn is a
u48). The associated data is the 16-byte header, so every header bit is
authenticated. A :class:`Sealer` hands out packet numbers 0, 1, 2, ... and refuses
to go past 2^48 - 1 (:class:`KeyExhausted`): under one key a nonce never repeats.

Rekeying: the sidecar sends a new set (new conn_id, epoch + 1, new secret) at least
hourly and on every new TLS session. The header's KEY_PHASE bit is ``epoch & 1``.
Since every epoch has its own conn_id, the conn_id already selects the key; the
phase bit is a consistency check the receiver makes before spending an AEAD
operation. The previous epoch stays acceptable for a grace period; that bookkeeping
is in :mod:`bridge.wire.receiver`, with ``now`` passed in.

Rules
=====

- Never log or ``repr`` a secret or a key (:class:`KeyMaterial` hides it).
- Packet numbers are strictly increasing per key and direction, starting at 0.
- No clock, no I/O: randomness only in :meth:`KeyMaterial.generate`.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from typing import Final, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bridge.errors import BridgeError
from bridge.wire.datagram import (
    HEADER_SIZE,
    MAX_DATAGRAM_SIZE,
    MAX_PN,
    OVERHEAD,
    Body,
    DatagramEncodeError,
    DatagramType,
    Flags,
    body_type,
    encode_body,
    pack_header,
)
from bridge.wire.replay import DEFAULT_WINDOW_SIZE, ReplayWindow

__all__ = [
    "INFO_PROXY_TO_SIDECAR",
    "INFO_SIDECAR_TO_PROXY",
    "SECRET_SIZE",
    "DirectionKeys",
    "KeyExhausted",
    "KeyMaterial",
    "KeySet",
    "Opener",
    "Role",
    "Sealed",
    "Sealer",
    "derive_keys",
    "nonce_for",
]

SECRET_SIZE: Final = 32
KEY_SIZE: Final = 32
INFO_PROXY_TO_SIDECAR: Final = b"stratumrm/udp/v1 proxy->sidecar"
INFO_SIDECAR_TO_PROXY: Final = b"stratumrm/udp/v1 sidecar->proxy"
_NONCE_PAD: Final = bytes(6)  # 4 zero bytes + the two (zero) high bytes of the u64


class Role(enum.Enum):
    """Which end of the data channel we are."""

    PROXY = "proxy"  # miner side: sends shares, receives ACKs
    SIDECAR = "sidecar"  # pool side: receives shares, sends ACKs


class KeyExhausted(BridgeError):
    """Every packet number of a key was used: rekey (a new ``rm.keys``) before sending more."""


class KeyMaterial:
    """What ``rm.keys`` carries: conn_id, epoch and the 32-byte secret.

    Immutable; ``repr`` never shows the secret.
    """

    __slots__ = ("_conn_id", "_epoch", "_secret")

    def __init__(self, conn_id: int, epoch: int, secret: bytes) -> None:
        if not 0 < conn_id < 1 << 64:
            raise ValueError("conn_id must be a non-zero u64")
        if not 0 <= epoch < 1 << 32:
            raise ValueError("epoch must be a u32")
        if len(secret) != SECRET_SIZE:
            raise ValueError(f"secret must be {SECRET_SIZE} bytes, got {len(secret)}")
        self._conn_id = conn_id
        self._epoch = epoch
        self._secret = bytes(secret)

    @classmethod
    def generate(cls, epoch: int, *, randbytes: Callable[[int], bytes] = secrets.token_bytes) -> KeyMaterial:
        """Fresh random material (sidecar side). ``randbytes`` is replaceable in tests."""
        while True:
            conn_id = int.from_bytes(randbytes(8), "big")
            if conn_id:
                return cls(conn_id, epoch, randbytes(SECRET_SIZE))

    @property
    def conn_id(self) -> int:
        return self._conn_id

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def key_phase(self) -> int:
        """The header KEY_PHASE bit for this epoch."""
        return self._epoch & 1

    @property
    def secret(self) -> bytes:
        """The raw secret, for putting into ``rm.keys``. Never log it."""
        return self._secret

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyMaterial):
            return NotImplemented
        return (self._conn_id, self._epoch) == (other._conn_id, other._epoch) and secrets.compare_digest(
            self._secret, other._secret
        )

    def __hash__(self) -> int:
        return hash((self._conn_id, self._epoch))

    def __repr__(self) -> str:
        return f"<KeyMaterial conn_id={self._conn_id:016x} epoch={self._epoch} secret=<hidden>>"


class DirectionKeys(NamedTuple):
    """The two derived 32-byte keys of one epoch."""

    proxy_to_sidecar: bytes
    sidecar_to_proxy: bytes

    def __repr__(self) -> str:
        return "DirectionKeys(<hidden>)"


def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(secret)


def derive_keys(material: KeyMaterial) -> DirectionKeys:
    """HKDF-SHA256 both directional keys from ``material`` (see the module header)."""
    salt = material.conn_id.to_bytes(8, "big")
    return DirectionKeys(
        proxy_to_sidecar=_hkdf(material.secret, salt, INFO_PROXY_TO_SIDECAR),
        sidecar_to_proxy=_hkdf(material.secret, salt, INFO_SIDECAR_TO_PROXY),
    )


def nonce_for(pn: int) -> bytes:
    """The 12-byte AEAD nonce of packet number ``pn``: 0^4 || u64be(pn)."""
    return pn.to_bytes(12, "big")


class Sealed(NamedTuple):
    """A datagram ready to send, and the packet number it used."""

    pn: int
    data: bytes


class Sealer:
    """The send half of one key epoch: numbers, seals and frames datagrams."""

    __slots__ = ("_aead", "_conn_id", "_epoch", "_next_pn", "_phase_flag")

    def __init__(self, *, conn_id: int, epoch: int, key: bytes, first_pn: int = 0) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("ChaCha20-Poly1305 keys are 32 bytes")
        if not 0 <= first_pn <= MAX_PN + 1:
            raise ValueError("first_pn must be a u48")
        self._aead = ChaCha20Poly1305(key)
        self._conn_id = conn_id
        self._epoch = epoch
        self._phase_flag = epoch & 1
        self._next_pn = first_pn

    @property
    def conn_id(self) -> int:
        return self._conn_id

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def next_pn(self) -> int:
        """The packet number the next datagram will carry."""
        return self._next_pn

    @property
    def remaining(self) -> int:
        """How many datagrams may still be sealed under this key."""
        return MAX_PN + 1 - self._next_pn

    def seal(self, body: Body, *, urgent: bool = False) -> Sealed:
        """Encode, number and seal ``body``; return the datagram and its pn.

        ``urgent`` marks a block candidate (shares only). Raises
        :class:`KeyExhausted` when the packet numbers are used up, and
        :class:`DatagramEncodeError` when the body does not fit.
        """
        return self.seal_plaintext(body_type(body), encode_body(body), urgent=urgent)

    def seal_plaintext(self, dtype: int, plaintext: bytes, *, urgent: bool = False) -> Sealed:
        """Seal an already encoded plaintext of type ``dtype`` (no body validation)."""
        pn = self._next_pn
        if pn > MAX_PN:
            raise KeyExhausted(f"conn_id {self._conn_id:016x} used all 2^48 packet numbers; rekey before sending")
        if not 0 <= dtype <= 0xF:
            raise DatagramEncodeError(f"type {dtype} does not fit a nibble")
        if len(plaintext) + OVERHEAD > MAX_DATAGRAM_SIZE:
            raise DatagramEncodeError(f"{len(plaintext) + OVERHEAD}-byte datagram exceeds {MAX_DATAGRAM_SIZE} bytes")
        flags = self._phase_flag
        if urgent:
            if dtype not in (DatagramType.SHARE, DatagramType.SHARE_BATCH):
                raise DatagramEncodeError("only shares can be URGENT")
            flags |= Flags.URGENT
        header = pack_header(dtype, flags, self._conn_id, pn)
        self._next_pn = pn + 1
        return Sealed(pn, header + self._aead.encrypt(_NONCE_PAD + header[10:], plaintext, header))

    def __repr__(self) -> str:
        return f"<Sealer conn_id={self._conn_id:016x} epoch={self._epoch} next_pn={self._next_pn}>"


class Opener:
    """The receive half of one key epoch: authenticates datagrams, owns the replay window.

    :meth:`open` only decrypts. The receive pipeline
    (:class:`bridge.wire.receiver.DatagramReceiver`) decides the order of checks and
    commits to :attr:`window` after a successful open.
    """

    __slots__ = ("_aead", "conn_id", "epoch", "key_phase", "window")

    def __init__(self, *, conn_id: int, epoch: int, key: bytes, window_size: int = DEFAULT_WINDOW_SIZE) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("ChaCha20-Poly1305 keys are 32 bytes")
        self._aead = ChaCha20Poly1305(key)
        self.conn_id = conn_id
        self.epoch = epoch
        self.key_phase = epoch & 1
        self.window = ReplayWindow(window_size)

    def open(self, data: bytes) -> bytes | None:
        """Return the plaintext of the whole datagram ``data``, or ``None`` on a bad tag.

        The caller has checked ``len(data) >= 32``; the nonce comes from the header's
        packet number bytes and the header is the associated data.
        """
        header = data[:HEADER_SIZE]
        try:
            return self._aead.decrypt(_NONCE_PAD + header[10:], data[HEADER_SIZE:], header)
        except InvalidTag:
            return None

    def __repr__(self) -> str:
        return f"<Opener conn_id={self.conn_id:016x} epoch={self.epoch} window={self.window!r}>"


class KeySet(NamedTuple):
    """One epoch's :class:`Sealer` (our direction) and :class:`Opener` (the peer's)."""

    sealer: Sealer
    opener: Opener

    @classmethod
    def derive(cls, material: KeyMaterial, role: Role, *, window_size: int = DEFAULT_WINDOW_SIZE) -> KeySet:
        """Derive both keys and build the halves the way ``role`` uses them."""
        keys = derive_keys(material)
        if role is Role.PROXY:
            send_key, receive_key = keys.proxy_to_sidecar, keys.sidecar_to_proxy
        else:
            send_key, receive_key = keys.sidecar_to_proxy, keys.proxy_to_sidecar
        return cls(
            sealer=Sealer(conn_id=material.conn_id, epoch=material.epoch, key=send_key),
            opener=Opener(conn_id=material.conn_id, epoch=material.epoch, key=receive_key, window_size=window_size),
        )
