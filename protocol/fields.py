"""Validation of decoded JSON objects, field by field, into typed values.

Every request and response is read through :class:`Fields`, so a missing or mistyped field is
always the same ``bad_request`` error naming the field, and unknown fields are ignored.
"""

from __future__ import annotations

import builtins
import re
from typing import Any

from pki.identity import is_valid_uid

from .encoding import b64d
from .errors import ErrorCode, ProtocolError

MSG_ID_RE = re.compile(r"[0-9a-f]{32}")
MAX_INT = 2**53 - 1  # exact in every JSON implementation
# UIDs that passed is_valid_uid (a queue names the same few senders thousands of times). Only strings
# that passed are added, so a hit is the check's own answer; bounded, since peers choose what they send.
_VALID_UIDS: set[str] = set()
_UIDS_KEPT = 4096


class _Required:
    pass


REQUIRED: Any = _Required()


class Fields:
    """Typed access to a JSON object; raises ProtocolError(bad_request) carrying the request id."""

    def __init__(self, obj: dict[str, Any], request_id: builtins.str | int | None = None) -> None:
        self.obj = obj
        self.request_id = request_id

    def fail(self, message: builtins.str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> ProtocolError:
        return ProtocolError(code, message, self.request_id)

    def has(self, name: builtins.str) -> builtins.bool:
        return self.obj.get(name) is not None

    def _get(self, name: builtins.str) -> Any:
        try:
            return self.obj[name]
        except KeyError:
            raise self.fail(f"missing field {name!r}") from None

    def str(self, name: builtins.str, max_len: builtins.int = 256) -> builtins.str:
        value = self._get(name)
        if not isinstance(value, str):
            raise self.fail(f"field {name!r} must be a string")
        if len(value) > max_len:
            raise self.fail(f"field {name!r} longer than {max_len} characters", ErrorCode.TOO_LARGE)
        return value

    def int(self, name: builtins.str, minimum: builtins.int = 0, maximum: builtins.int = MAX_INT) -> builtins.int:
        value = self._get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(f"field {name!r} must be an integer")
        if not minimum <= value <= maximum:
            raise self.fail(f"field {name!r} out of range {minimum}..{maximum}")
        return value

    def bool(self, name: builtins.str) -> builtins.bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise self.fail(f"field {name!r} must be true or false")
        return value

    def bytes(self, name: builtins.str, max_len: builtins.int) -> builtins.bytes:
        value = self._get(name)
        if isinstance(value, str) and len(value) > (max_len + 2) // 3 * 4:
            raise self.fail(f"field {name!r} larger than {max_len} bytes", ErrorCode.TOO_LARGE)
        try:
            return b64d(value, name)
        except ProtocolError as exc:
            raise self.fail(exc.message) from None

    def uid(self, name: builtins.str) -> builtins.str:
        value = self.str(name, 64)
        if value in _VALID_UIDS:
            return value
        if not is_valid_uid(value):
            raise self.fail(f"field {name!r} is not a valid UID")
        if len(_VALID_UIDS) >= _UIDS_KEPT:
            _VALID_UIDS.clear()
        _VALID_UIDS.add(value)
        return value

    def msg_id(self, name: builtins.str = "msg_id") -> builtins.str:
        value = self.str(name, 32)
        if not MSG_ID_RE.fullmatch(value):
            raise self.fail(f"field {name!r} must be 32 lowercase hex digits")
        return value

    def object(self, name: builtins.str) -> "Fields":
        value = self._get(name)
        if not isinstance(value, dict):
            raise self.fail(f"field {name!r} must be an object")
        return Fields(value, self.request_id)

    def list(self, name: builtins.str, max_items: builtins.int) -> builtins.list[Any]:
        value = self._get(name)
        if not isinstance(value, list):
            raise self.fail(f"field {name!r} must be a list")
        if len(value) > max_items:
            raise self.fail(f"field {name!r} has more than {max_items} items", ErrorCode.TOO_LARGE)
        return value
