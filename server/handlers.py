"""Request handlers: what each operation does, given an authenticated peer.

The caller's UID always comes from its TLS certificate (:class:`Peer`), never from a request field;
a user can read only its own queue.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Generator
from dataclasses import dataclass, field
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pki.identity import cert_fingerprint
from pki.keys import PublicKey
from protocol import crls as crl_wire
from protocol.encoding import utc_now
from protocol.envelope import Sealed, ciphertext_digest, verify_submission
from protocol.errors import ErrorCode, ProtocolError
from protocol.keyrecord import KeyRecordError, parse_signed_record, read_record, signed_by
from protocol.messages import (
    REQUEST_TYPES,
    CrlInfo,
    CrlListRequest,
    CrlListResult,
    CrlRequest,
    CrlResult,
    DirectoryRequest,
    DirectoryResult,
    GetRequest,
    GetResult,
    HelloRequest,
    HelloResult,
    KeyRecordWire,
    MarkReadRequest,
    MarkReadResult,
    PublishKeyRequest,
    PublishKeyResult,
    QueuePage,
    QueueRequest,
    QueueResult,
    Request,
    Result,
    SendRequest,
    SendResult,
    StoredMessage,
    served_size,
)
from protocol.receipts import Receipt

from .quota import QuotaConfig, Quotas
from .store import AsyncStore, DuplicateMessage, Submission, UnreadAsk, WireEntry


@dataclass(frozen=True)
class PublishedCrls:
    """The CRLs the relay serves, as the wire describes them; replaced whole when the CA's CRL changes."""

    infos: list[CrlInfo] = field(default_factory=list)
    der: dict[bytes, bytes] = field(default_factory=dict)  # digest -> DER

    @classmethod
    def of(cls, crls: "list[x509.CertificateRevocationList]") -> "PublishedCrls":
        described = [crl_wire.describe(c) for c in crls]
        return cls([info for info, _ in described], {info.digest: der for info, der in described})

# Rows read from the store for a queue page: QUEUE_CHUNK first (a 9999-byte frame carries four or five
# entries with ML-KEM sealed subjects), then twice as many each time while the frame has room, up to
# QUEUE_BATCH at once. Reading 64 rows to send five cost ~4 ms a page; a page now reads what it sends.
QUEUE_CHUNK = 8
QUEUE_BATCH = 64
# A page being filled asks for rows (after, how many) and is sent them; it ends with its answer.
PageFill = Generator[UnreadAsk, list[WireEntry], QueueResult]
QUOTA_RESEED = 5.0  # seconds: how stale one node's view of a shared queue's size may be


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

    A user, once known, stays known: that is cached, so a send does not touch the database for it.
    The current certificate is cached only when this relay is the store's only writer (SQLite); on a
    shared database another node may record a renewal at any moment, so it is read each time.
    """

    def __init__(self, store: AsyncStore, shared: bool = False) -> None:
        self.store = store
        self.shared = shared
        self._certs: dict[str, bytes] = {}  # the last certificate this node saw or recorded
        self._known: set[str] = set()

    async def remember(self, uid: str, cert_der: bytes) -> None:
        if self.shared or self._certs.get(uid) != cert_der:
            await self.store.backend.upsert_user(uid, cert_der)
            self._certs[uid] = cert_der
        self._known.add(uid)

    async def known(self, uid: str) -> bool:
        return uid in self._known or await self.certificate(uid) is not None

    async def certificate(self, uid: str, fingerprint: bytes | None = None) -> bytes | None:
        if fingerprint is not None:
            return await self.store.backend.get_user(uid, fingerprint)
        if self.shared or uid not in self._certs:
            cert = await self.store.backend.get_user(uid)
            if cert is None:
                return None
            self._certs[uid] = cert
            self._known.add(uid)
        return self._certs[uid]


class Handlers:
    def __init__(self, store: AsyncStore, users: "UserRegistry", intermediates: list[x509.Certificate],
                 crls: PublishedCrls, max_frame: int, receipt_signature_size: int,
                 quota: QuotaConfig = QuotaConfig(), shared: bool = False) -> None:
        self.store = store
        self.quotas = Quotas(quota, store.backend.unread_usage, reseed_after=QUOTA_RESEED if shared else None)
        self.users = users
        self.intermediates_der = [c.public_bytes(Encoding.DER) for c in intermediates]
        self.crls = crls
        self.max_frame = max_frame
        self.receipt_signature_size = receipt_signature_size

    async def handle(self, req: Request, peer: Peer) -> Result:
        """Every operation but ``send``, which the session runs in three steps (admit_send, enqueue_send,
        stored) so that pipelined sends share a group commit in request order, and ``queue``, whose
        consecutive requests it answers together (:meth:`queue_pages`)."""
        if isinstance(req, GetRequest):
            return await self.get(req, peer)
        if isinstance(req, MarkReadRequest):
            return await self.mark_read(req, peer)
        if isinstance(req, DirectoryRequest):
            return await self.directory(req)
        if isinstance(req, PublishKeyRequest):
            return await self.publish_key(req, peer)
        if isinstance(req, HelloRequest):
            return HelloResult(self.max_frame, tuple(REQUEST_TYPES))
        if isinstance(req, CrlListRequest):
            return CrlListResult(self.crls.infos)
        if isinstance(req, CrlRequest):
            return self.crl_piece(req)
        raise ProtocolError(ErrorCode.BAD_REQUEST, "unsupported operation", req.id)

    async def admit_send(self, req: SendRequest, peer: Peer) -> Submission:
        """The checks before storing: a known recipient, the sender's signature over the submission, and
        an answer to ``get`` that fits a frame (else the message would be stored but never readable)."""
        if not await self.users.known(req.to):
            raise ProtocolError(ErrorCode.UNKNOWN_RECIPIENT, f"unknown recipient {req.to}", req.id)
        sealed = Sealed(req.envelope_version, req.header, req.envelope)
        if not verify_submission(peer.public_key, req.signature, req.to, req.msg_id, sealed):
            raise ProtocolError(ErrorCode.BAD_SIGNATURE,
                                "submission signature does not verify against your certificate", req.id)
        submission = Submission(peer.uid, req.to, req.msg_id, sealed, peer.fingerprint)
        size = served_size(self._as_stored(submission))
        if size > self.max_frame:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"message too large: it would be served back in {size} bytes, "
                                f"over the frame limit of {self.max_frame}", req.id)
        try:
            await self.quotas.check_room(req.to, _stored_size(sealed), req.id)
            self.quotas.take_send(peer.uid, req.id)
        except ProtocolError:
            # A retry of what is stored already (its answer was lost) adds nothing: it gets its receipt.
            stored = await self.store.backend.stored_digest(peer.uid, req.msg_id)
            if stored != ciphertext_digest(sealed):
                raise
        return submission

    def _as_stored(self, sub: Submission) -> StoredMessage:
        """The submission as ``get`` would serve it, with a receipt signature of the longest length."""
        receipt = Receipt(sub.msg_id, sub.sender, sub.recipient, ciphertext_digest(sub.sealed), utc_now(), 1,
                          bytes(32), bytes(self.receipt_signature_size))
        return StoredMessage(1, sub.sender, sub.recipient, sub.msg_id, receipt.server_time, sub.sealed.version,
                             sub.sealed.header, sub.sealed.envelope, receipt, sub.sender_cert)

    def enqueue_send(self, submission: Submission) -> "asyncio.Future[tuple[Receipt, bool]]":
        """Queue an admitted send for the next group commit, synchronously: the order of these calls is
        the order of queue numbers, whatever the event loop does in between."""
        commit = self.store.enqueue(submission)
        # Counted at once (not when the commit returns), so a pipelined burst cannot overrun the queue.
        self.quotas.stored(submission.recipient, _stored_size(submission.sealed))
        commit.add_done_callback(lambda done: self._uncount(submission, done))
        return commit

    def _uncount(self, submission: Submission, done: "asyncio.Future[tuple[Receipt, bool]]") -> None:
        if done.cancelled() or done.exception() is not None or not done.result()[1]:
            self.quotas.read(submission.recipient, _stored_size(submission.sealed))  # nothing new was stored

    @staticmethod
    async def stored(req: SendRequest, commit: "asyncio.Future[tuple[Receipt, bool]]") -> SendResult:
        """The answer to a send once its commit is durable."""
        try:
            receipt, _created = await commit
        except DuplicateMessage:
            raise ProtocolError(ErrorCode.DUPLICATE, "a different message was already sent with this msg_id",
                                req.id) from None
        return SendResult(receipt)

    async def queue_pages(self, reqs: list[QueueRequest], peer: Peer) -> list[QueueResult | ProtocolError]:
        """The answers to several ``queue`` requests of one user (a client pipelines a window of ranges),
        read from the store together: one round trip to it for all their pages, not one per page. A page
        that meets a damaged row gets an error; the others are answered."""
        fills = {i: self._fill(req) for i, req in enumerate(reqs)}
        out: list[QueueResult | ProtocolError | None] = [None] * len(reqs)
        asks: dict[int, UnreadAsk] = {}
        for i, fill in fills.items():
            _step(fill, None, i, asks, out)
        while asks:
            read = await self.store.backend.unread_entries(peer.uid, list(asks.values()))
            waiting, asks = list(asks), {}
            for i, rows in zip(waiting, read, strict=True):
                _step(fills[i], rows, i, asks, out)
        done = [o for o in out if o is not None]
        assert len(done) == len(reqs), "every page ends: _step answers a request or asks the store again"
        return done

    def _fill(self, req: QueueRequest) -> PageFill:
        """One page: entries above ``after`` (and at most ``upto``) while they fit, asked for a few rows at a time."""
        page = QueuePage(req.id, self.max_frame, ranges=True)
        after, chunk = req.after, QUEUE_CHUNK
        while True:
            # Numbers are integers above ``after``: a range holds at most upto - after of them.
            want = chunk if req.upto is None else min(chunk, req.upto - after)
            if want <= 0:
                return page.result(more=False)
            rows = yield after, want
            for entry in rows:
                if req.upto is not None and entry.num > req.upto:
                    return page.result(more=False)
                if entry.text is None:
                    raise ProtocolError(ErrorCode.INTERNAL, f"message {entry.num} in your queue is damaged in the "
                                        "relay's store: it cannot be listed", req.id)
                if not page.add_encoded(entry.text):
                    return page.result(more=True)
            if len(rows) < want:
                return page.result(more=False)
            after, chunk = rows[-1].num, min(2 * chunk, QUEUE_BATCH)

    async def get(self, req: GetRequest, peer: Peer) -> GetResult:
        msg = await self.store.backend.get_message(peer.uid, req.num)
        if msg is None:
            raise _unknown_message(req)
        return GetResult(msg)

    async def mark_read(self, req: MarkReadRequest, peer: Peer) -> MarkReadResult:
        freed = await self.store.backend.mark_read(peer.uid, req.num)
        if freed is None:
            raise _unknown_message(req)
        if freed:
            self.quotas.read(peer.uid, freed)
        return MarkReadResult()

    async def directory(self, req: DirectoryRequest) -> DirectoryResult:
        cert = await self.users.certificate(req.uid, req.fingerprint)
        if cert is None:
            raise ProtocolError(ErrorCode.UNKNOWN_USER, f"unknown user {req.uid}", req.id)
        key = await self.store.backend.get_key(req.uid)
        return DirectoryResult(req.uid, [cert, *self.intermediates_der], key)

    def crl_piece(self, req: CrlRequest) -> CrlResult:
        der = self.crls.der.get(req.digest)
        found = crl_wire.piece(der, req.digest, req.offset, self.max_frame) if der is not None else None
        if found is None:
            raise ProtocolError(ErrorCode.UNKNOWN_MESSAGE, "no such CRL piece (the relay's CRL may have changed: "
                                "list the CRLs again)", req.id)
        return found

    async def publish_key(self, req: PublishKeyRequest, peer: Peer) -> PublishKeyResult:
        try:
            record = parse_signed_record(req.record, req.signature, peer.uid, peer.public_key)
        except KeyRecordError as exc:
            raise ProtocolError(ErrorCode.BAD_SIGNATURE, f"key record refused: {exc}", req.id) from None
        held = await self.store.backend.get_key(peer.uid)
        held_created = None
        if held is not None and signed_by(held.record, held.signature, peer.public_key):
            # Compared only with a record of the caller's current certificate: one signed by an earlier
            # (perhaps revoked) certificate must not keep the renewed owner from publishing.
            try:
                held_created = read_record(held.record).created
            except KeyRecordError:
                held_created = None
        if held_created is not None and record.created < held_created:
            # A replayed older record would roll the user's key back to one that may be compromised.
            raise ProtocolError(ErrorCode.BAD_REQUEST, "key record refused: older than the one published "
                                f"({_iso(record.created)} < {_iso(held_created)})", req.id)
        await self.store.backend.put_key(peer.uid, KeyRecordWire(req.record, req.signature))
        return PublishKeyResult()


def _step(fill: PageFill, rows: list[WireEntry] | None, i: int, asks: dict[int, UnreadAsk],
          out: list[QueueResult | ProtocolError | None]) -> None:
    """Hand page ``i`` its rows (None: start it): what it asks for next goes to ``asks``, its end to ``out``."""
    try:
        asks[i] = fill.send(rows)  # type: ignore[arg-type]  # None only starts the generator
    except StopIteration as done:
        out[i] = done.value
    except ProtocolError as exc:
        out[i] = exc


def _stored_size(sealed: Sealed) -> int:
    """What a message costs its recipient's queue: the ciphertext the relay keeps."""
    return len(sealed.header) + len(sealed.envelope)


def _unknown_message(req: GetRequest | MarkReadRequest) -> ProtocolError:
    return ProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"no message number {req.num} in your queue", req.id)


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")
