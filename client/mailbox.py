"""Sending and reading messages end to end: sealing, receipts, sender validation, replay checks.

This is where a client decides whether to believe a message. Every check failure is a
:class:`protocol.envelope.VerificationError`, which the CLI turns into the one fixed error line.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

from cryptography import x509

from pki.errors import ValidationError
from pki.validation import TrustPolicy
from protocol.encoding import utc_now
from protocol.envelope import (InnerMessage, OpenedMessage, Sealed, VerificationError, ciphertext_digest,
                               open_envelope, read_subject, seal)
from protocol.messages import QueueEntry, StoredMessage
from protocol.receipts import Receipt

from .connection import RelayClient
from .state import ClientState


@dataclass(frozen=True)
class QueueLine:
    num: int
    sender: str
    server_time: dt.datetime
    subject: str | None  # None when the subject could not be read or verified


@dataclass(frozen=True)
class ReadMessage:
    num: int
    inner: InnerMessage
    receipt: Receipt


class Mailbox:
    def __init__(self, client: RelayClient, state: ClientState, policy: TrustPolicy) -> None:
        self.client = client
        self.state = state
        self.policy = policy

    @property
    def uid(self) -> str:
        return self.client.uid

    def _check_receipt(self, receipt: Receipt) -> None:
        cert = self.client.server_cert
        if cert is None or not receipt.verify(cert.public_key()):  # type: ignore[arg-type]
            raise VerificationError("receipt is not signed by the relay (MSG_SERVER)")

    async def send(self, to: str, subject: str, body: bytes) -> Receipt:
        msg_id = secrets.token_hex(16)
        inner = InnerMessage(self.uid, to, msg_id, utc_now(), subject, body)
        sealed = seal(inner, self.client.keystore.key)
        receipt = await self.client.send(to, msg_id, sealed)
        self._check_receipt(receipt)
        if (receipt.msg_id, receipt.sender, receipt.recipient, receipt.digest) != \
                (msg_id, self.uid, to, ciphertext_digest(sealed)):
            raise VerificationError("receipt does not match the message sent")
        self.state.add_receipt(receipt)
        return receipt

    async def queue(self) -> list[QueueLine]:
        lines = []
        for e in await self.client.queue():
            lines.append(QueueLine(e.num, e.sender, e.server_time, self._subject(e)))
        return lines

    def _subject(self, entry: QueueEntry) -> str | None:
        try:
            return read_subject(entry.envelope_version, entry.header)
        except VerificationError:
            return None

    async def sender_certificate(self, uid: str, at: dt.datetime) -> x509.Certificate:
        """The sender's certificate from the directory, validated at ``at`` (the receipt's time)."""
        entry = await self.client.directory(uid)
        try:
            certs = [x509.load_der_x509_certificate(c) for c in entry.chain]
        except ValueError:
            raise VerificationError("directory returned an unreadable certificate") from None
        if not certs:
            raise VerificationError(f"directory has no certificate for {uid}")
        pool = certs[1:] + self.client.keystore.intermediates()
        policy = self.policy
        if not policy.crls and entry.crls:
            # No CRL of our own: use the CA's, as the relay serves it (signed by the CA, so the relay
            # can at most withhold a newer one, not forge one).
            try:
                crls = [x509.load_der_x509_crl(c) for c in entry.crls]
            except ValueError:
                raise VerificationError("directory returned an unreadable CRL") from None
            policy = TrustPolicy(policy.anchors, crls, policy.org_unit)
        try:
            identity = policy.validate(certs[0], pool, role="client", at=at)
        except ValidationError as exc:
            raise VerificationError(f"sender certificate rejected: {exc}") from None
        if identity.uid != uid:
            raise VerificationError(f"directory certificate is for {identity.uid}, not {uid}")
        return certs[0]

    async def read(self, num: int) -> ReadMessage:
        msg: StoredMessage = await self.client.get(num)
        receipt = msg.receipt
        self._check_receipt(receipt)
        sealed = Sealed(msg.envelope_version, msg.header, msg.envelope)
        digest = ciphertext_digest(sealed)
        if (receipt.recipient, receipt.queue_number, receipt.digest, receipt.sender, receipt.msg_id) != \
                (self.uid, msg.num, digest, msg.sender, msg.msg_id):
            raise VerificationError("receipt does not match the stored message")
        cert = await self.sender_certificate(receipt.sender, receipt.server_time)
        opened: OpenedMessage = open_envelope(sealed, reader=self.uid, sender=receipt.sender, msg_id=receipt.msg_id,
                                              sender_key=cert.public_key())  # type: ignore[arg-type]
        if not self.state.check_and_remember(receipt.sender, receipt.msg_id, msg.num, digest):
            raise VerificationError(f"replayed message: {receipt.msg_id} from {receipt.sender} was seen before")
        return ReadMessage(msg.num, opened.inner, receipt)
