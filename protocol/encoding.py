"""Byte-level encodings shared by every message: base64 on the wire, signing inputs, timestamps."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import re
import struct

from .errors import ErrorCode, ProtocolError


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: object, field: str = "value") -> bytes:
    """Strict standard base64 (padded, no stray characters).

    ``a2b_base64`` in strict mode accepts exactly what ``b64decode(..., validate=True)`` accepts (the
    alphabet, at most two ``=`` and only at the end, whole quanta; a non-ASCII ``str`` is a ValueError)
    without its wrappers: a queue listing decodes five values per entry
    (``tests/test_queue_fast_parsing.py`` compares the two on every short string)."""
    if not isinstance(text, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{field} must be a base64 string")
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{field} is not valid base64") from None


def signing_input(label: str, *fields: bytes | str | int) -> bytes:
    """An unambiguous byte string to sign: a domain label, then each field length-prefixed.

    Length prefixes make ("ab", "c") and ("a", "bc") sign differently; the label keeps a signature
    made for one purpose (a submission, a receipt, a key record) from being valid for another.
    """
    out = bytearray(b"MSG-RELAY\x00" + label.encode() + b"\x00")
    for f in fields:
        if isinstance(f, bool):
            raise TypeError("booleans are not signing fields")
        raw = f.encode("utf-8") if isinstance(f, str) else (str(f).encode() if isinstance(f, int) else f)
        out += struct.pack(">I", len(raw)) + raw
    return bytes(out)


def sha256(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(struct.pack(">I", len(p)))
        h.update(p)
    return h.digest()


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def format_time(t: dt.datetime) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2026-11-24T10:15:02.123456Z``."""
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# The last time text parsed and its value: a queue entry carries the same time twice (its own and its
# receipt's). One immutable pair, replaced whole, so threads sharing it never see a torn one.
_last_time: tuple[str, dt.datetime] = ("1970-01-01T00:00:00.000000Z", dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc))


# What fromisoformat alone would also take (a space or any letter for the T, an offset before the Z, a date
# alone, seven fraction digits, other scripts' digits) is refused: a time has one spelling on the wire.
_RFC3339_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z")


def parse_time(text: object, field: str = "time") -> dt.datetime:
    global _last_time
    held = _last_time
    if isinstance(text, str) and text == held[0]:
        return held[1]  # the very text parsed last: the same answer
    if not isinstance(text, str) or not _RFC3339_UTC.fullmatch(text):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{field} must be an RFC 3339 UTC time")
    try:
        value = dt.datetime.fromisoformat(text[:-1]).replace(tzinfo=dt.timezone.utc)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{field} must be an RFC 3339 UTC time") from None
    _last_time = (text, value)
    return value


def pack(*fields: bytes) -> bytes:
    """Length-prefixed concatenation (the binary layout inside sealed envelopes)."""
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def unpack(data: bytes, count: int) -> list[bytes]:
    """Exactly ``count`` fields written by :func:`pack`, consuming all of ``data``; else ValueError."""
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(data):
            raise ValueError("truncated field")
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + n > len(data):
            raise ValueError("truncated field")
        out.append(data[pos:pos + n])
        pos += n
    if pos != len(data):
        raise ValueError("trailing bytes")
    return out
