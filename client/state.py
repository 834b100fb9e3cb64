"""The client's local state, per UID: seen message ids, kept receipts and (later) encryption keys.

Default location ``$XDG_DATA_HOME/msg-relay/<UID>`` (``~/.local/share/...``), directory 0700, files
0600, every write atomic. The seen-ids list is what makes a replayed message detectable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pki.errors import MsgRelayError, PkiError
from pki.files import read_bytes, write_atomic
from protocol.fields import Fields
from protocol.receipts import Receipt


class StateError(MsgRelayError):
    """The state directory cannot be used."""


def default_state_dir(uid: str) -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "msg-relay" / uid


class ClientState:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
        except OSError as exc:
            raise StateError(f"{self.dir}: cannot use state directory ({exc.strerror})") from None

    def _load(self, name: str, default: Any) -> Any:
        path = self.dir / name
        if not path.exists():
            return default
        try:
            return json.loads(read_bytes(path))
        except (PkiError, ValueError):
            raise StateError(f"{path}: corrupt state file (move it away to start afresh)") from None

    def _save(self, name: str, value: Any) -> None:
        try:
            write_atomic(self.dir / name, json.dumps(value, indent=1, sort_keys=True).encode(), mode=0o600)
        except PkiError as exc:
            raise StateError(str(exc)) from None

    # ----- replay protection -------------------------------------------------------------------
    def check_and_remember(self, sender: str, msg_id: str, num: int, digest: bytes) -> bool:
        """True for a first sighting, or a re-read of the very same stored message; False for a replay
        (the same sender's msg_id arriving again under another queue number or with other bytes)."""
        seen: dict[str, Any] = self._load("seen.json", {})
        key = f"{sender}/{msg_id}"
        entry = {"num": num, "digest": digest.hex()}
        if key in seen:
            return bool(seen[key] == entry)
        seen[key] = entry
        self._save("seen.json", seen)
        return True

    # ----- receipts ------------------------------------------------------------------------------
    def add_receipt(self, receipt: Receipt) -> None:
        receipts = self._load("receipts.json", [])
        receipts.append(receipt.to_wire())
        self._save("receipts.json", receipts)

    def receipts(self) -> list[Receipt]:
        return [Receipt.from_wire(Fields(r)) for r in self._load("receipts.json", [])]

    # ----- generic documents (encryption keys) -------------------------------------------------
    def load_doc(self, name: str, default: Any) -> Any:
        return self._load(name, default)

    def save_doc(self, name: str, value: Any) -> None:
        self._save(name, value)
