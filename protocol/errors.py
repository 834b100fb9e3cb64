"""Error codes on the wire and the exception that carries them.

The codes are stable API (clients switch on them); the messages are for people.
"""

from __future__ import annotations

from enum import Enum

from pki.errors import MsgRelayError


class ErrorCode(str, Enum):
    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    TOO_LARGE = "too_large"
    NOT_AUTHORISED = "not_authorised"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_RECIPIENT = "unknown_recipient"
    UNKNOWN_MESSAGE = "unknown_message"
    UNKNOWN_USER = "unknown_user"
    DUPLICATE = "duplicate"
    BUSY = "busy"
    QUOTA = "quota"
    INTERNAL = "internal"


class ProtocolError(MsgRelayError):
    """A request or frame the peer got wrong; becomes an error response (or a close, for framing)."""

    def __init__(self, code: ErrorCode, message: str, request_id: "str | int | None" = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class FrameError(ProtocolError):
    """The byte stream itself is broken (oversized or undecodable frame): the connection cannot go on."""
