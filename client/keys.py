"""The client's HPKE encryption keys: generated on first use, published signed, rotated on demand.

Private keys live in the state directory (``keys.json``, 0600). A rotated-out key is never published
again but stays, decrypt-only: ``get`` serves read messages too, and they must stay readable.
"""

from __future__ import annotations

import datetime as dt

from pki.frozen import frozen
from pki.keys import PrivateKey
from protocol import hpke
from protocol.encoding import b64d, b64e, format_time, parse_time, utc_now
from protocol.keyrecord import DEFAULT_KEM, KEMS, KeyRecord

from .state import ClientState, StateError

KEY_LIFETIME = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=7)  # a key this close to its expiry is replaced
_DOC = "keys.json"


@frozen
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
        """A new key pair becomes current; the old ones stay, decrypt-only."""
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
        if cur is None or self.due(cur):
            return self.rotate(signer, kem)
        return cur

    @staticmethod
    def due(key: OwnKey) -> bool:
        """Whether ``key`` is to be replaced: it expires within a week."""
        return key.record.expires - utc_now() < RENEW_BEFORE

    def resign(self, signer: PrivateKey) -> OwnKey:
        """The current record signed again with ``signer`` (a re-issued certificate's key): the same
        encryption key, so mail already sealed to it stays readable."""
        cur = self.current
        if cur is None:
            raise StateError("no encryption key to sign")
        key = OwnKey(cur.record, cur.private, cur.record.sign(signer))
        self.keys[cur.record.key_id] = key
        self._save()
        return key

    def export_doc(self) -> dict:
        """Every key, private halves included: what another device of the same user imports."""
        return self.state.load_doc(_DOC, {"current": None, "keys": {}})

    def import_doc(self, doc: object) -> OwnKey:
        """Take another device's keys (theirs become current; ours stay, decrypt-only)."""
        try:
            assert isinstance(doc, dict)
            incoming = {kid: self._decode(v) for kid, v in doc["keys"].items()}
            current = incoming[doc["current"]]
        except (AssertionError, KeyError, TypeError, ValueError, AttributeError):
            raise StateError("not a key file made by msg-client keys export") from None
        if any(k.record.uid != self.uid for k in incoming.values()):
            raise StateError(f"the key file holds keys of another user, not {self.uid}")
        self.keys.update(incoming)
        self.current_id = current.record.key_id
        self._save()
        return current
