"""The audit log: one JSON object per line, per security-relevant event, never message content.

Fields are identifiers, sizes, codes and reasons only: the relay can be audited without the log
becoming a copy of what users wrote.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from protocol.encoding import format_time, utc_now

AUDIT_LOGGER = "msg_relay.audit"


class AuditLog:
    def __init__(self, path: str | None = None) -> None:
        # A logger of its own, not the process-wide one by that name: two relays in one process (tests,
        # an embedding application) must never write into each other's audit log.
        self.logger = logging.Logger(AUDIT_LOGGER, logging.INFO)
        self.logger.propagate = False
        self._handler: logging.Handler = logging.FileHandler(path) if path else logging.StreamHandler()
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(self._handler)

    def event(self, event: str, **fields: Any) -> None:
        record = {"ts": format_time(utc_now()), "event": event}
        record.update({k: v for k, v in fields.items() if v is not None})
        self.logger.info(json.dumps(record, separators=(",", ":"), default=str))

    def close(self) -> None:
        self.logger.removeHandler(self._handler)
        self._handler.close()
