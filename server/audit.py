"""The audit log: one JSON object per line, per security-relevant event, never message content.

Fields are identifiers, sizes, codes and reasons only: the relay can be audited without the log
becoming a copy of what users wrote.

Every connection writes at least three lines (accepted, its requests, closed), so a line must be
cheap: going through :mod:`logging` (a LogRecord, the caller's frame looked up, a formatter, a lock)
cost about 90 µs a line here, a tenth of a whole TLS connection's CPU. Lines are written directly
instead, one ``write`` and ``flush`` each, as ``logging.FileHandler`` did, so a line is on its way to
the file before the event it records has any effect.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import IO, Any

log = logging.getLogger("msg_relay.server")

# Built once: json.dumps with non-default arguments builds an encoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


class _Clock:
    """RFC 3339 UTC timestamps with microseconds (``protocol.encoding.format_time``'s format), the
    date and time of day formatted once per second instead of on every line."""

    def __init__(self) -> None:
        self._cached = (-1, "")  # (second, its formatted prefix): one tuple, so threads see a matching pair

    def now(self) -> str:
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._cached = (second, prefix)
        return f"{prefix}.{nanos // 1000:06d}Z"


class AuditLog:
    def __init__(self, path: str | None = None) -> None:
        # A file of its own per AuditLog: two relays in one process (tests, an embedding application)
        # never write into each other's audit log. Without a path: the stderr of the moment, as
        # logging.StreamHandler would.
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
        self._stream: IO[str] | None = self._file if self._file is not None else sys.stderr
        self._lock = threading.Lock()  # whole lines, whichever thread writes
        self._clock = _Clock()
        self._failing = False

    def event(self, event: str, **fields: Any) -> None:
        self.write([self.line(event, **fields)])

    def line(self, event: str, **fields: Any) -> str:
        """One event's line, for :meth:`write`: a run of pipelined requests answered together writes its
        lines at once (one ``write`` and flush), before any of its answers."""
        record = {"ts": self._clock.now(), "event": event}
        for key, value in fields.items():
            if value is not None:
                record[key] = value
        return _ENCODER.encode(record) + "\n"

    def write(self, lines: list[str]) -> None:
        if not lines:
            return
        with self._lock:
            if self._stream is None:
                return  # closed: a late event (a connection ending after shutdown) is dropped, as before
            try:
                self._stream.write("".join(lines))
                self._stream.flush()
            except (OSError, ValueError) as exc:
                # A full disk must not take the relay down (logging swallowed it as well), but it must
                # not go unnoticed: said once on the server log, again after each recovery.
                if not self._failing:
                    log.error("cannot write the audit log (%s): events are being lost", exc)
                self._failing = True
                return
            self._failing = False

    def close(self) -> None:
        with self._lock:
            self._stream = None
            if self._file is not None:
                self._file.close()
