"""Field checks for Stratum V1 messages that msgspec's types cannot express.

msgspec already guarantees the shapes (a submit has 5 or 6 params, clean_jobs is a
boolean ...). What remains is hex: lengths and digits. Every check raises
``ValueError`` with a message that names the field, which the sessions turn into an
SV1 error reply (miner side) or a protocol violation event (pool side).
"""

from __future__ import annotations

import re

import msgspec

from bridge.sv1.messages import NotifyParams, Submit

_HEX = re.compile(r"[0-9a-fA-F]+")

# extranonce2 is at most 16 bytes even where miners accept it (cgminer: 2..16).
MAX_EXTRANONCE2_HEX = 32


def is_hex(text: str, length: int | None = None) -> bool:
    """True when ``text`` is hex digits (of exactly ``length`` characters, if given)."""
    if length is not None and len(text) != length:
        return False
    return _HEX.fullmatch(text) is not None


def hex32(value: str | int, field: str) -> str:
    """An 8-hex-digit uint32 field; JSON numbers (seen from some firmware) are normalised."""
    if isinstance(value, int):
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{field} {value} is out of the uint32 range")
        return f"{value:08x}"
    if not is_hex(value, 8):
        raise ValueError(f"{field} must be 8 hex digits, got {value!r}")
    return value


def normalise_submit(submit: Submit) -> Submit:
    """Validate a ``mining.submit``; return it with ntime/nonce as hex strings."""
    p = submit.params
    if not p.worker:
        raise ValueError("worker name is empty")
    if not p.job_id:
        raise ValueError("job_id is empty")
    en2 = p.extranonce2
    if len(en2) % 2 or len(en2) > MAX_EXTRANONCE2_HEX or not is_hex(en2):
        raise ValueError(f"extranonce2 must be 2 to {MAX_EXTRANONCE2_HEX} hex digits, got {en2!r}")
    ntime = hex32(p.ntime, "ntime")
    nonce = hex32(p.nonce, "nonce")
    if p.version_bits is not None and not is_hex(p.version_bits, 8):
        raise ValueError(f"version_bits must be 8 hex digits, got {p.version_bits!r}")
    if ntime is p.ntime and nonce is p.nonce:
        return submit
    return msgspec.structs.replace(submit, params=msgspec.structs.replace(p, ntime=ntime, nonce=nonce))


def check_notify(params: NotifyParams) -> None:
    """Validate a ``mining.notify`` the way the strictest miners do."""
    if not params.job_id:
        raise ValueError("mining.notify job_id is empty")
    if not is_hex(params.prevhash, 64):
        raise ValueError("mining.notify prevhash must be 64 hex digits")
    for name in ("coinb1", "coinb2"):
        value = getattr(params, name)
        if len(value) % 2 or (value and not is_hex(value)):
            raise ValueError(f"mining.notify {name} is not hex")
    branch = params.merkle_branch
    if any(len(entry) != 64 for entry in branch) or (branch and not is_hex("".join(branch))):
        raise ValueError("mining.notify merkle branch entries must be 64 hex digits")
    for name in ("version", "nbits", "ntime"):
        if not is_hex(getattr(params, name), 8):
            raise ValueError(f"mining.notify {name} must be 8 hex digits")
