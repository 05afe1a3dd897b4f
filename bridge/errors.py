"""The project's error tree.

Every error the bridge raises on purpose derives from :class:`BridgeError`, and its
message says what happened and what to do next.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """A configuration value or command-line option is wrong; the message names it."""


class PKIError(BridgeError):
    """A certificate, key, CA or revocation list problem; the message says how to fix it."""


class ProtocolError(BridgeError):
    """The peer broke the protocol.

    ``code`` and ``message`` form the Stratum V1 error reply to send back, where the
    protocol wants one (``code`` 20 is "Other/Unknown").
    """

    def __init__(self, message: str, code: int = 20) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LineTooLong(ProtocolError):
    """A line exceeded the configured limit without a newline."""
