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


def default_state_dir(uid: str, anchor_fingerprint: bytes) -> Path:
    """``$XDG_DATA_HOME/msg-relay/<UID>-<CA>``: the same UID under two CAs (the course keystores and the
    demo ones both have ``MSG_CLI1``) gets two state directories, never one shared."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    root = Path(base) / "msg-relay"
    new = root / f"{uid}-{anchor_fingerprint.hex()[:12]}"
    legacy = root / uid  # the first wave's layout: adopted by the first CA that finds it unclaimed
    if not new.exists() and (legacy / "keys.json").exists() and not (legacy / _IDENTITY).exists():
        try:
            legacy.rename(new)
        except OSError:
            pass  # left where it is: the new directory starts afresh
    return new


_IDENTITY = "identity.json"


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

    def bind(self, uid: str, anchor_fingerprint: bytes) -> None:
        """Tie the directory to one UID under one CA: keys and seen-lists of another identity that
        happens to share the UID must never be used or overwritten here."""
        want = {"uid": uid, "ca": anchor_fingerprint.hex()}
        held = self._load(_IDENTITY, None)
        if held is None:
            self._save(_IDENTITY, want)
        elif held != want:
            raise StateError(f"{self.dir} holds the state of {held.get('uid')} under another CA "
                             f"({str(held.get('ca'))[:12]}): give this keystore its own --state-dir")

    # ----- what we saw of others' key records -----------------------------------------------------
    def key_record_seen(self, uid: str, created: str) -> str | None:
        """Remember the newest key record ``created`` of ``uid``; return the newer one we saw before, if
        any (the relay serving an older record than we already saw is rolling a key back)."""
        seen: dict[str, str] = self._load("key_records.json", {})
        held = seen.get(uid)
        if held is not None and held > created:
            return held
        if held != created:
            seen[uid] = created
            self._save("key_records.json", seen)
        return None

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
