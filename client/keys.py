"""The client's HPKE encryption keys: generated on first use, published signed, rotated on demand.

Private keys live in the state directory (``keys.json``, 0600). A rotated-out key is kept while
unread messages sealed to it may still be waiting, and retired once the queue no longer needs it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pki.keys import PrivateKey
from protocol import hpke
from protocol.encoding import b64d, b64e, format_time, parse_time, utc_now
from protocol.keyrecord import DEFAULT_KEM, KEMS, KeyRecord

from .state import ClientState, StateError

KEY_LIFETIME = dt.timedelta(days=365)
_DOC = "keys.json"


@dataclass(frozen=True)
class OwnKey:
    record: KeyRecord
    private: bytes
    signature: bytes


class Keyring:
    """Implements :class:`protocol.envelope.Keyring` over the state directory."""

    def __init__(self, state: ClientState, uid: str) -> None:
        self.state = state
        self.uid = uid
        doc = state.load_doc(_DOC, {"current": None, "keys": {}})
        try:
            self.current_id: str | None = doc["current"]
            self.keys: dict[str, OwnKey] = {kid: self._decode(v) for kid, v in doc["keys"].items()}
        except (KeyError, TypeError, ValueError):
            raise StateError(f"{state.dir / _DOC}: corrupt key file") from None

    @staticmethod
    def _decode(v: dict) -> OwnKey:
        rec = KeyRecord(v["uid"], v["kem"], b64d(v["public_key"]), parse_time(v["created"]), parse_time(v["expires"]))
        return OwnKey(rec, b64d(v["private"]), b64d(v["signature"]))

    def _save(self) -> None:
        self.state.save_doc(_DOC, {"current": self.current_id, "keys": {
            kid: {"uid": k.record.uid, "kem": k.record.kem, "public_key": b64e(k.record.public_key),
                  "created": format_time(k.record.created), "expires": format_time(k.record.expires),
                  "private": b64e(k.private), "signature": b64e(k.signature)} for kid, k in self.keys.items()}})

    @property
    def current(self) -> OwnKey | None:
        return self.keys.get(self.current_id) if self.current_id else None

    def private_key(self, key_id: str) -> tuple[str, bytes] | None:
        k = self.keys.get(key_id)
        return (k.record.kem, k.private) if k else None

    def rotate(self, signer: PrivateKey, kem: str = DEFAULT_KEM) -> OwnKey:
        """A new key pair becomes current; the old ones stay until :meth:`retire_unused`."""
        if kem not in KEMS:
            raise StateError(f"unknown KEM {kem} (choose from {', '.join(KEMS)})")
        private, public = hpke.generate(kem)
        now = utc_now()
        record = KeyRecord(self.uid, kem, public, now, now + KEY_LIFETIME)
        key = OwnKey(record, private, record.sign(signer))
        self.keys[record.key_id] = key
        self.current_id = record.key_id
        self._save()
        return key

    def ensure(self, signer: PrivateKey, kem: str = DEFAULT_KEM) -> OwnKey:
        """The current key, made on first use or when it is about to expire."""
        cur = self.current
        if cur is None or cur.record.expires - utc_now() < dt.timedelta(days=7):
            return self.rotate(signer, kem)
        return cur

    def retire_unused(self, needed: set[str]) -> list[str]:
        """Forget non-current keys that no unread message needs; returns the retired key ids."""
        gone = [kid for kid in self.keys if kid != self.current_id and kid not in needed]
        for kid in gone:
            del self.keys[kid]
        if gone:
            self._save()
        return gone
