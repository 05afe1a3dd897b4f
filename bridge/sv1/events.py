"""Events the Stratum V1 sessions return besides the message Structs themselves."""

from __future__ import annotations

from typing import Any

from msgspec import Raw, Struct

from bridge.sv1.messages import RequestId, Response


class ProtocolViolation(Struct, frozen=True):
    """The peer sent something that is not valid Stratum V1.

    ``fatal`` violations (invalid JSON, an oversized line) mean the connection
    must be closed; the others have already been answered where the protocol
    wants an answer (``code`` says with which error), and the connection goes on.
    """

    reason: str
    fatal: bool = False
    line: bytes = b""
    code: int | None = None
    """The SV1 error code already sent back, if the session answered."""


class Reply(Struct, frozen=True):
    """The pool answered one of our requests.

    ``context`` is whatever the caller passed when it sent the request (a relay
    passes the miner's own request id); ``response`` is the pool's answer with
    ``result``/``error`` kept raw.
    """

    method: str
    context: Any
    response: Response
    request_id: int

    @property
    def accepted(self) -> bool:
        return self.response.accepted


class UnknownPoolRequest(Struct, frozen=True):
    """A request or notification from the pool with a method the bridge does not know."""

    id: RequestId
    method: str
    params: Raw
