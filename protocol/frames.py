"""Length-prefixed JSON frames: a 4-byte big-endian length, then that many bytes of UTF-8 JSON.

The size limit is checked on the declared length, before any of the body is buffered, so a peer
cannot make us allocate more than one frame's worth.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
from typing import Any

from .errors import ErrorCode, FrameError

MAX_FRAME = 9999
# What a relay may be configured with: below the default the largest valid message (1000-byte body,
# 200-character subject, RSA-4096 signatures, ML-KEM ciphertexts) could not be served back; above the
# ceiling one connection's buffers stop being small.
MIN_FRAME_LIMIT = MAX_FRAME
MAX_FRAME_LIMIT = 1 << 20
HEADER = struct.Struct(">I")
# JSON nesting deeper than this is refused before it can exhaust the parser's recursion.
MAX_DEPTH = 16


def encode_frame(obj: dict[str, Any], max_size: int = MAX_FRAME) -> bytes:
    """Serialise one JSON object as a frame; raises FrameError when it would exceed ``max_size``."""
    return frame(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8"), max_size)


def frame(body: bytes, max_size: int = MAX_FRAME) -> bytes:
    """A frame of ``body`` (JSON made already); raises FrameError when it would exceed ``max_size``."""
    if len(body) > max_size:
        raise FrameError(ErrorCode.TOO_LARGE, f"frame of {len(body)} bytes exceeds the limit of {max_size}")
    return HEADER.pack(len(body)) + body


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included
_BRACKETS = re.compile(r"[\[\]{}]")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _depth_ok(text: str) -> bool:
    if text.count("{") + text.count("[") <= MAX_DEPTH:
        return True  # cannot nest deeper than it has brackets: skip the scan (the usual case)
    # Strings first (brackets inside them do not nest), then the running depth over the brackets alone:
    # regular expressions and accumulate run in C, so a megabyte frame costs milliseconds, not a Python
    # loop per character.
    brackets = _BRACKETS.findall(_STRING.sub("", text))
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0) <= MAX_DEPTH


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # Two parsers could pick different values for a repeated key: refuse the ambiguity.
        raise ValueError("duplicate key in JSON object")
    return obj


def loads_object(data: bytes) -> dict[str, Any]:
    """Strict JSON: UTF-8, one object, nesting at most MAX_DEPTH, no duplicate keys, no NaN/Infinity.

    The one JSON rule of the protocol, for frames and for the JSON inside envelopes and key records;
    ValueError says what is wrong.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not valid UTF-8") from None
    if not _depth_ok(text):
        raise ValueError(f"has JSON nested deeper than {MAX_DEPTH} levels")
    try:
        # Huge integers are refused by the int-parsing limit of CPython; NaN/Infinity are not JSON.
        obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise ValueError("is not one JSON object")
    return obj


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Parse one frame body into a JSON object (never anything else)."""
    try:
        return loads_object(payload)
    except ValueError as exc:
        raise FrameError(ErrorCode.BAD_REQUEST, f"frame {exc}") from None


class FrameDecoder:
    """Incremental decoder: bytes go in with :meth:`receive` in any chunking, whole frames come out.

    Pull-based (the h11 ``receive_data``/``next_event`` style): the caller takes one payload at a time
    with :meth:`next_payload`, so a relay decodes only as far ahead as it is willing to work, and a
    client can raise ``max_size`` (after the relay's ``hello``) before the next frame is read.
    After a :class:`FrameError` the stream is out of sync and the decoder refuses further input.
    """

    def __init__(self, max_size: int = MAX_FRAME) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0
        self._need: int | None = None
        self._broken: FrameError | None = None  # the error that broke the stream, raised again on use

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet taken as payloads (a half-sent frame, or frames not yet pulled)."""
        return len(self._buf) - self._pos

    def receive(self, data: bytes) -> None:
        if self._broken:
            raise self._broken
        if self._pos:
            del self._buf[:self._pos]  # compact once per read, not once per frame
            self._pos = 0
        self._buf += data

    def next_payload(self) -> bytes | None:
        """The next complete frame's payload, or None until more bytes arrive."""
        if self._broken:
            raise self._broken
        if self._need is None:
            if self.buffered < HEADER.size:
                return None
            (length,) = HEADER.unpack_from(self._buf, self._pos)
            if length > self.max_size:
                self._buf.clear()
                self._pos = 0
                self._broken = FrameError(ErrorCode.TOO_LARGE,
                                          f"declared frame length {length} exceeds the limit of {self.max_size}")
                raise self._broken
            self._pos += HEADER.size
            self._need = length
        if self.buffered < self._need:
            return None
        payload = bytes(self._buf[self._pos:self._pos + self._need])
        self._pos += self._need
        self._need = None
        return payload

    def feed(self, data: bytes) -> list[bytes]:
        """:meth:`receive`, then every payload now complete, in order."""
        self.receive(data)
        out: list[bytes] = []
        while (payload := self.next_payload()) is not None:
            out.append(payload)
        return out
