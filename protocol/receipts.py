"""Signed receipts: the relay's statement that it stored a message at a given time and place.

The sender keeps the receipt as proof of submission; the recipient uses it to trust the server
timestamp (which then decides at what time the sender's certificate must have been valid).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

from pki.frozen import frozen
from pki.keys import PrivateKey, PublicKey, sign, verify_signature

from .encoding import b64e, format_time, parse_time, signing_input
from .fields import Fields

RECEIPT_LABEL = "receipt/v1"


@frozen
class Receipt:
    msg_id: str
    sender: str
    recipient: str
    digest: bytes  # SHA-256 of the sealed header and envelope (protocol.envelope.ciphertext_digest)
    server_time: dt.datetime
    queue_number: int
    signer: bytes = b""  # SHA-256 fingerprint of the relay certificate whose key signed the receipt
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return signing_input(RECEIPT_LABEL, self.msg_id, self.sender, self.recipient, self.digest,
                             format_time(self.server_time), self.queue_number, self.signer)

    def signed_by(self, key: PrivateKey, signer: bytes) -> "Receipt":
        unsigned = replace(self, signer=signer, signature=b"")
        return replace(unsigned, signature=sign(key, unsigned.signed_bytes()))

    def verify(self, server_key: PublicKey) -> bool:
        return verify_signature(server_key, self.signature, self.signed_bytes())

    def to_wire(self) -> dict[str, Any]:
        return {"msg_id": self.msg_id, "from": self.sender, "to": self.recipient, "digest": b64e(self.digest),
                "server_time": format_time(self.server_time), "queue_number": self.queue_number,
                "signer": b64e(self.signer), "signature": b64e(self.signature)}

    @classmethod
    def from_wire(cls, f: Fields) -> "Receipt":
        return cls(msg_id=f.msg_id("msg_id"), sender=f.uid("from"), recipient=f.uid("to"),
                   digest=f.bytes("digest", 32), server_time=parse_time(f.str("server_time", 40), "server_time"),
                   queue_number=f.int("queue_number", 1), signer=f.bytes("signer", 32),
                   signature=f.bytes("signature", 1024))
