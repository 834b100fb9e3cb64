"""Published encryption keys: ``{uid, kem, public_key, created, expires}`` signed by the owner.

The record binds an HPKE public key to a UID through the owner's certificate key, so a relay that
serves a directory cannot substitute its own encryption key without the sender noticing.
"""

from __future__ import annotations

import datetime as dt
import json

from pki.errors import MsgRelayError
from pki.frozen import frozen
from pki.keys import PrivateKey, PublicKey, sign, verify_signature

from . import hpke
from .encoding import b64e, format_time, parse_time, sha256, signing_input, utc_now
from .errors import ProtocolError
from .fields import Fields
from .frames import loads_object

KEMS = ("MLKEM768_X25519", "X25519")
DEFAULT_KEM = "MLKEM768_X25519"
LABEL = "keyrecord/v1"
CLOCK_SKEW = dt.timedelta(minutes=10)  # how far ahead of our clock another machine's may be


class KeyRecordError(MsgRelayError):
    """A key record that must not be used (bad signature, wrong owner, expired, malformed)."""


@frozen
class KeyRecord:
    uid: str
    kem: str
    public_key: bytes
    created: dt.datetime
    expires: dt.datetime

    def to_bytes(self) -> bytes:
        doc = {"uid": self.uid, "kem": self.kem, "public_key": b64e(self.public_key),
               "created": format_time(self.created), "expires": format_time(self.expires)}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def key_id(self) -> str:
        """A short name for the key: which private key a sealed message needs."""
        return sha256(self.kem.encode(), self.public_key).hex()[:16]

    def sign(self, key: PrivateKey) -> bytes:
        return sign(key, signing_input(LABEL, self.to_bytes()))


def parse_signed_record(record: bytes, signature: bytes, expected_uid: str, owner_key: PublicKey,
                        now: dt.datetime | None = None) -> KeyRecord:
    """The record, after checking its signature by ``owner_key``, its UID and its validity period."""
    if not signed_by(record, signature, owner_key):
        raise KeyRecordError("signature does not verify against the owner's certificate")
    rec = read_record(record)
    if rec.uid != expected_uid:
        raise KeyRecordError(f"key record is for {rec.uid}, not {expected_uid}")
    if rec.kem not in KEMS:
        raise KeyRecordError(f"unsupported KEM {rec.kem}")
    try:
        hpke.check_public(rec.kem, rec.public_key)
    except hpke.HpkeError as exc:
        raise KeyRecordError(str(exc)) from None
    now = now or utc_now()
    if now > rec.expires:
        raise KeyRecordError("key record has expired")
    if rec.created > now + CLOCK_SKEW or rec.created > rec.expires:
        # A record dated ahead would win every "newer record" comparison until that date: refused.
        raise KeyRecordError(f"key record is dated in the future ({format_time(rec.created)})")
    return rec


def read_record(record: bytes) -> KeyRecord:
    """The record's fields, without any check of who signed it (callers that trust it say why)."""
    try:
        f = Fields(loads_object(record))
        return KeyRecord(f.uid("uid"), f.str("kem", 32), f.bytes("public_key", 2048),
                         parse_time(f.str("created", 40)), parse_time(f.str("expires", 40)))
    except (ValueError, ProtocolError) as exc:
        raise KeyRecordError(f"malformed key record ({exc})") from None


def signed_by(record: bytes, signature: bytes, owner_key: PublicKey) -> bool:
    """Whether ``owner_key`` signed these record bytes (who made it, not whether it is usable)."""
    return verify_signature(owner_key, signature, signing_input(LABEL, record))
