"""Request handlers: what each operation does, given an authenticated peer.

The caller's UID always comes from its TLS certificate (:class:`Peer`), never from a request field;
a user can read only its own queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pki.identity import cert_fingerprint
from pki.keys import PublicKey
from protocol.envelope import Sealed, verify_submission
from protocol.errors import ErrorCode, ProtocolError
from protocol.keyrecord import KeyRecordError, parse_signed_record
from protocol.messages import (
    DirectoryRequest,
    DirectoryResult,
    GetRequest,
    GetResult,
    KeyRecordWire,
    PublishKeyRequest,
    PublishKeyResult,
    QueueRequest,
    Request,
    Result,
    SendRequest,
    SendResult,
    queue_page,
)

from .store import AsyncStore, DuplicateMessage, Submission

# Rows fetched per queue page: more than a frame can carry of even the smallest entries, fewer than
# would make every page re-read hundreds of rows it cannot send.
QUEUE_BATCH = 64


@dataclass(frozen=True)
class Peer:
    """An authenticated connection's identity, fixed at handshake time."""

    uid: str
    cert: x509.Certificate

    # Computed once per connection, not per request.
    @cached_property
    def public_key(self) -> PublicKey:
        return self.cert.public_key()  # type: ignore[return-value]

    @cached_property
    def fingerprint(self) -> bytes:
        return cert_fingerprint(self.cert)


class UserRegistry:
    """Who may receive messages, with the certificate each last connected with.

    Cached in memory so that neither a handshake nor a send touches the database for what it already
    knows; a miss asks the store (another relay node sharing the database may have enrolled the user).
    """

    def __init__(self, store: AsyncStore) -> None:
        self.store = store
        self._certs: dict[str, bytes] = {}

    async def remember(self, uid: str, cert_der: bytes) -> None:
        if self._certs.get(uid) != cert_der:
            await self.store.call(self.store.store.upsert_user, uid, cert_der)
            self._certs[uid] = cert_der

    async def known(self, uid: str) -> bool:
        return await self.certificate(uid) is not None

    async def certificate(self, uid: str, fingerprint: bytes | None = None) -> bytes | None:
        if fingerprint is not None:
            return await self.store.call(self.store.store.get_user, uid, fingerprint)
        if uid not in self._certs:
            cert = await self.store.call(self.store.store.get_user, uid)
            if cert is None:
                return None
            self._certs[uid] = cert
        return self._certs[uid]


class Handlers:
    def __init__(self, store: AsyncStore, users: "UserRegistry", intermediates: list[x509.Certificate],
                 crls_der: list[bytes], max_frame: int) -> None:
        self.store = store
        self.users = users
        self.intermediates_der = [c.public_bytes(Encoding.DER) for c in intermediates]
        self.crls_der = crls_der
        self.max_frame = max_frame

    async def handle(self, req: Request, peer: Peer) -> Result:
        if isinstance(req, SendRequest):
            return await self.send(req, peer)
        if isinstance(req, QueueRequest):
            return await self.queue(req, peer)
        if isinstance(req, GetRequest):
            return await self.get(req, peer)
        if isinstance(req, DirectoryRequest):
            return await self.directory(req)
        if isinstance(req, PublishKeyRequest):
            return await self.publish_key(req, peer)
        raise ProtocolError(ErrorCode.BAD_REQUEST, "unsupported operation", req.id)

    async def send(self, req: SendRequest, peer: Peer) -> SendResult:
        return await self.commit_send(req, await self.admit_send(req, peer))

    async def admit_send(self, req: SendRequest, peer: Peer) -> Submission:
        """The checks before storing: a known recipient and the sender's signature over the submission."""
        if not await self.users.known(req.to):
            raise ProtocolError(ErrorCode.UNKNOWN_RECIPIENT, f"unknown recipient {req.to}", req.id)
        sealed = Sealed(req.envelope_version, req.header, req.envelope)
        if not verify_submission(peer.public_key, req.signature, req.to, req.msg_id, sealed):
            raise ProtocolError(ErrorCode.BAD_SIGNATURE,
                                "submission signature does not verify against your certificate", req.id)
        return Submission(peer.uid, req.to, req.msg_id, sealed, peer.fingerprint)

    async def commit_send(self, req: SendRequest, submission: Submission) -> SendResult:
        """Store an admitted send; it joins the store's queue before this coroutine first yields."""
        try:
            receipt, _created = await self.store.add_message(submission)
        except DuplicateMessage:
            raise ProtocolError(ErrorCode.DUPLICATE, "a different message was already sent with this msg_id",
                                req.id) from None
        return SendResult(receipt)

    async def queue(self, req: QueueRequest, peer: Peer) -> Result:
        entries = await self.store.call(self.store.store.list_unread, peer.uid, req.after, QUEUE_BATCH)
        return queue_page(entries, req.id, self.max_frame, exhausted=len(entries) < QUEUE_BATCH)

    async def get(self, req: GetRequest, peer: Peer) -> GetResult:
        msg = await self.store.call(self.store.store.get_message, peer.uid, req.num)
        if msg is None:
            raise ProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"no message number {req.num} in your queue", req.id)
        return GetResult(msg)

    async def directory(self, req: DirectoryRequest) -> DirectoryResult:
        cert = await self.users.certificate(req.uid, req.fingerprint)
        if cert is None:
            raise ProtocolError(ErrorCode.UNKNOWN_USER, f"unknown user {req.uid}", req.id)
        key = await self.store.call(self.store.store.get_key, req.uid)
        return DirectoryResult(req.uid, [cert, *self.intermediates_der], key, self.crls_der)

    async def publish_key(self, req: PublishKeyRequest, peer: Peer) -> PublishKeyResult:
        try:
            parse_signed_record(req.record, req.signature, peer.uid, peer.public_key)
        except KeyRecordError as exc:
            raise ProtocolError(ErrorCode.BAD_SIGNATURE, f"key record refused: {exc}", req.id) from None
        await self.store.call(self.store.store.put_key, peer.uid, KeyRecordWire(req.record, req.signature))
        return PublishKeyResult()
