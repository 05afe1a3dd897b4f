"""Reading a pool's share verdict, whatever dialect the pool speaks.

Pools answer ``mining.submit`` in at least five ways:
``[code, "msg", data]`` arrays (the original spec, public-pool, slush with code
-2), two-element arrays (NOMP), JSON-RPC 2.0 error objects (miningcore),
``result:false`` with a top-level ``"reject-reason"`` (ckpool), and plain strings
in ``error`` (ckpool parameter errors). Relays pass the raw reply through; this
module turns it into one :class:`Verdict` for statistics, logs and the compact
StratumRM verdict encoding.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, Struct

from bridge.sv1.framing import decode_json
from bridge.sv1.messages import Response

# Standard codes (Braiins/slush spec; public-pool, miningcore, NOMP use the same).
OTHER = 20
JOB_NOT_FOUND = 21
DUPLICATE = 22
LOW_DIFFICULTY = 23
UNAUTHORIZED = 24
NOT_SUBSCRIBED = 25

# ckpool's reject-reason strings (libckpool.h share_errs) and the code they mean.
_CKPOOL_REASONS = {
    "invalid jobid": JOB_NOT_FOUND,
    "stale": JOB_NOT_FOUND,
    "duplicate": DUPLICATE,
    "above target": LOW_DIFFICULTY,
}

_KEYWORDS = (
    ("not found", JOB_NOT_FOUND),
    ("stale", JOB_NOT_FOUND),
    ("duplicate", DUPLICATE),
    ("low difficulty", LOW_DIFFICULTY),
    ("above target", LOW_DIFFICULTY),
    ("too low", LOW_DIFFICULTY),
    ("unauthorized", UNAUTHORIZED),
    ("not subscribed", NOT_SUBSCRIBED),
)


class Verdict(Struct, frozen=True):
    """A share verdict: accepted, or rejected with a standard code and the pool's words."""

    accepted: bool
    code: int = 0
    message: str = ""


ACCEPTED = Verdict(True)

_REASON_NAMES = {
    OTHER: "other",
    JOB_NOT_FOUND: "stale",
    DUPLICATE: "duplicate",
    LOW_DIFFICULTY: "low-difficulty",
    UNAUTHORIZED: "unauthorized",
    NOT_SUBSCRIBED: "not-subscribed",
}


def reject_reason_name(code: int) -> str:
    """A reject code as a short label for statistics (``stale``, ``duplicate`` ...; ``other``)."""
    return _REASON_NAMES.get(code, "other")


def _code_from_text(text: str, default: int = OTHER) -> int:
    lowered = text.lower()
    for keyword, code in _KEYWORDS:
        if keyword in lowered:
            return code
    return default


def read_verdict(response: Response) -> Verdict:
    """Classify a pool's answer to ``mining.submit``."""
    if response.accepted:
        return ACCEPTED
    if response.reject_reason is not UNSET:
        reason = response.reject_reason
        return Verdict(False, _CKPOOL_REASONS.get(reason.lower(), _code_from_text(reason)), reason)
    try:
        error: Any = decode_json(response.error)
    except msgspec.DecodeError:
        error = None
    if isinstance(error, list) and error:
        message = str(error[1]) if len(error) > 1 else ""
        code = error[0] if isinstance(error[0], int) and not isinstance(error[0], bool) else OTHER
        if code < 20 or code > 25:  # slush's -2 and friends: read the words
            code = _code_from_text(message)
        return Verdict(False, code, message)
    if isinstance(error, dict):
        message = str(error.get("message", ""))
        raw_code = error.get("code")
        standard = isinstance(raw_code, int) and not isinstance(raw_code, bool) and 20 <= raw_code <= 25
        return Verdict(False, raw_code if standard and isinstance(raw_code, int) else _code_from_text(message), message)
    if isinstance(error, str):
        return Verdict(False, _code_from_text(error), error)
    return Verdict(False, OTHER, "rejected")
