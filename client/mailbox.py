"""Sending and reading messages end to end: sealing, receipts, sender validation, replay checks.

This is where a client decides whether to believe a message. Every check failure is a
:class:`protocol.envelope.VerificationError`, which the CLI turns into the one fixed error line.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pki.errors import ValidationError
from pki.frozen import frozen
from pki.identity import MSG_SERVER, cert_fingerprint
from pki.keys import PublicKey
from pki.validation import Role, TrustPolicy
from pki.verdicts import Span
from protocol.encoding import format_time, utc_now
from protocol.envelope import (
    SIGNED_SUBJECT_VERSIONS,
    Copy,
    InnerMessage,
    OpenedMessage,
    Sealed,
    VerificationError,
    ciphertext_digest,
    open_envelope,
    read_subject,
    seal,
    seal_many,
)
from protocol.keyrecord import (
    DEFAULT_KEM,
    KeyRecord,
    KeyRecordError,
    parse_signed_record,
    read_record,
    signed_by,
)
from protocol.messages import DirectoryResult, QueueEntry, RemoteError, StoredMessage
from protocol.receipts import Receipt

from .crlcache import CrlCache, CrlOlder
from .errors import ClientError, ConnectionLost, ServerRejected
from .keys import Keyring, OwnKey
from .log import log
from .operations import RelayOperations
from .state import ClientState

DIRECTORY_CACHE = 256  # directory answers kept for the rest of one command
# msg-client watch: a ping after this many seconds without an event (a dead relay is noticed, and the
# relay's idle timeout of 300 s never closes a watcher); CRLs and directory answers are taken afresh
# after REFRESH seconds; a lost connection is retried after RETRY[0] seconds, doubling up to RETRY[1].
KEEPALIVE = 60.0
REFRESH = 300.0
RETRY = (0.5, 30.0)


@frozen
class QueueLine:
    num: int
    sender: str
    server_time: dt.datetime  # from the signed receipt when the subject verified
    subject: str | None  # None when the subject could not be read or verified


class _Valid(NamedTuple):
    """A certificate validated_certificate accepted, and the span of times that verdict covers under ``policy``."""

    policy: TrustPolicy
    span: Span
    cert: x509.Certificate
    entry: DirectoryResult


@frozen
class ReadMessage:
    num: int
    inner: InnerMessage
    receipt: Receipt


class CertificateRejected(VerificationError):
    """A certificate from the directory failed validation; ``reason`` is pki's token (revoked, expired ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RecipientRejected(ClientError):
    """The recipient's certificate is revoked or expired: nothing can be sent to it."""


class OtherDevice(ClientError):
    """The relay holds a newer key of ours that this state directory does not have."""


class NoRecipientKey(ClientError):
    """The recipient has not published a usable encryption key: nothing can be sealed for it."""


class PartlySent(ClientError):
    """The relay refused some copies of a message to several recipients (after the client had checked
    every one): which were stored and which not, and why, are in the message."""


@frozen
class Unreadable:
    """A message ``watch --open`` could not show: it stays unread in the queue."""

    num: int
    error: VerificationError


class Mailbox:
    def __init__(self, client: RelayOperations, state: ClientState, policy: TrustPolicy, kem: str = DEFAULT_KEM,
                 require_crl: bool = True) -> None:
        """``policy`` holds the trust anchors and any CRL the user gave (``--crl``); CRLs the relay serves
        join them through the client's CRL cache, newest verified per CA. Without ``require_crl``
        (``--no-crl``) a client with no CRL at all checks no revocation."""
        self.client = client
        self.state = state
        state.authenticate_caches(client.keystore.key)  # only our keystore's holder writes facts we believe
        self.kem = kem
        self.keyring = Keyring(state, client.uid)
        self.crls = CrlCache(state, policy.anchors, client.keystore.intermediates())
        for crl in policy.crls:
            try:
                self.crls.offer(crl.public_bytes(Encoding.DER))
            except CrlOlder:
                continue  # a --crl file older than the CRL we already verified: ours is the newer
        self._base = policy
        self.require_crl = require_crl
        self._policy: TrustPolicy | None = None
        self._directory: dict[tuple[str, bytes | None], DirectoryResult] = {}
        self._valid: dict[tuple[str, bytes, Role], _Valid] = {}  # see validated_certificate

    async def policy(self) -> TrustPolicy:
        """The trust policy with the newest CRLs: the relay's list is checked once per command, and
        only a CRL newer than the one held is fetched. It reuses the certificate verdicts kept in the
        state directory (pki.verdicts: each within the dates it depended on, a new CRL a new key)."""
        if self._policy is None:
            await self.crls.refresh(self.client)
            if self.require_crl and not self.crls.crls():
                # A relay that serves no CRL would otherwise switch revocation checking off for us.
                raise ClientError("no CRL of the CA to check revocation with (the relay served none): give "
                                  "--crl FILE, or --no-crl to go on without revocation checks")
            verdicts = self.state.verdicts()
            for crl, digest in self.crls.digests():
                verdicts.note(crl, digest)
            policy = TrustPolicy(self._base.anchors, self.crls.crls(), self._base.org_unit, verdicts=verdicts)
            self._check_relay(policy)
            self._policy = policy
        return self._policy

    def _check_relay(self, policy: TrustPolicy) -> None:
        """The relay's own certificate against the newest CRL we hold: a revoked relay is not talked to."""
        cert = self.client.server_cert
        if cert is None:
            return
        try:
            policy.validate(cert, self.client.keystore.intermediates(), role="server")
        except ValidationError as exc:
            raise ClientError(f"the relay's certificate is not valid: {exc}") from None
        self.state.save_caches()

    async def ensure_published(self) -> OwnKey:
        """Make our encryption key on first use, and publish it whenever the relay lacks it.

        Our record must verify under our *current* certificate: after a renewal (same UID, new key)
        it is signed again, with the same encryption key, so mail sealed to it stays readable. A
        record on the relay that we did not make and that is not older than ours was published by
        another device of ours: we refuse to overwrite it and say how to share the key instead.

        What the relay held is remembered in the state directory (``ClientState.published_fresh``): while
        our key, its record and signature, our certificate and the relay are the ones checked, and for
        PUBLISHED_TTL (an hour) at most, a command skips this directory round trip. After that, or after
        any change, the relay is asked again, and a record it lost is published again."""
        signer = self.client.keystore.key
        held = self.keyring.current
        relay = ",".join(f"{host}:{port}" for host, port in self.client.nodes)
        cert_fp = cert_fingerprint(self.client.keystore.cert)
        if held is not None and not self.keyring.due(held) \
                and self.state.published_fresh(relay, cert_fp, held.record.to_bytes(), held.signature):
            return held
        cert_key: PublicKey = self.client.keystore.cert.public_key()  # type: ignore[assignment]
        entry = await self.client.directory(self.uid)
        published = self._published_record(entry)
        # Ours from elsewhere only if our current certificate signed it: a record of an earlier
        # certificate (a renewal, a new CA) is replaced.
        if published is not None and entry.key is not None and published.key_id not in self.keyring.keys \
                and signed_by(entry.key.record, entry.key.signature, cert_key) \
                and (held is None or published.created >= held.record.created):
            raise OtherDevice(f"{self.uid} already has an encryption key (created "
                              f"{published.created:%Y-%m-%d %H:%M}Z) that this state directory does not hold, "
                              "published from another device or state directory: copy it here with "
                              "`msg-client keys export FILE` there and `msg-client keys import FILE` here, "
                              "or replace it with `msg-client rotate-key` (mail sealed to it then stays "
                              "unreadable here)")
        key = self.keyring.ensure(signer, self.kem)
        if not signed_by(key.record.to_bytes(), key.signature, cert_key):
            key = self.keyring.resign(signer)  # our certificate was re-issued
        if entry.key is None or entry.key.record != key.record.to_bytes() or entry.key.signature != key.signature:
            await self.client.publish_key(key.record.to_bytes(), key.signature)
        # Only now, the relay having answered: a publish that fails leaves no fact behind.
        self.state.remember_published(relay, cert_fp, key.record.to_bytes(), key.signature)
        return key

    def _published_record(self, entry: DirectoryResult) -> KeyRecord | None:
        """The record the relay holds for us, read without trusting it (only its key and date matter here)."""
        if entry.key is None:
            return None
        try:
            return read_record(entry.key.record)
        except KeyRecordError:
            return None  # unreadable: ours replaces it

    async def rotate_key(self) -> OwnKey:
        key = self.keyring.rotate(self.client.keystore.key, self.kem)
        await self.client.publish_key(key.record.to_bytes(), key.signature)
        return key

    async def recipient_key(self, uid: str) -> KeyRecord:
        """The recipient's key record, after validating its certificate now and the record's signature."""
        try:
            cert, entry = await self.validated_certificate(uid, utc_now())
        except CertificateRejected as exc:
            if exc.reason in ("revoked", "expired"):
                # The CA's verdict on the recipient, not a forgery: say whose certificate it is.
                raise RecipientRejected(f"cannot send to {uid}: {uid}'s certificate is {exc.reason}: nothing sent") \
                    from None
            raise
        if entry.key is None:
            raise NoRecipientKey(f"{uid} has not published an encryption key yet (a key is published the first "
                                 f"time {uid} runs msg-client): nothing sent")
        try:
            record = parse_signed_record(entry.key.record, entry.key.signature, uid, cert.public_key())  # type: ignore[arg-type]
        except KeyRecordError as exc:
            raise VerificationError(f"encryption key of {uid} refused: {exc}") from None
        newer = self.state.key_record_seen(uid, format_time(record.created))
        if newer is not None:
            raise VerificationError(f"the relay served an older encryption key of {uid} (created "
                                    f"{format_time(record.created)}) than one we saw before ({newer})")
        return record

    @property
    def uid(self) -> str:
        return self.client.uid

    async def _check_receipt(self, receipt: Receipt, signature_verified: bool = False) -> None:
        """The receipt is signed by a certificate of MSG_SERVER valid at the receipt's time: the one we
        are connected to, or an earlier one of the relay's (it renews its certificate too).

        ``signature_verified``: these very receipt bytes verified before under the certificate they name
        (a fact kept in the state directory, see SubjectFacts); that certificate is still validated."""
        cert = self.client.server_cert
        if cert is None or self.state.verdicts().fingerprint(cert) != receipt.signer:
            cert, _ = await self.validated_certificate(MSG_SERVER, receipt.server_time, receipt.signer, "server")
        if not signature_verified and not receipt.verify(cert.public_key()):  # type: ignore[arg-type]
            raise VerificationError("receipt is not signed by the relay (MSG_SERVER)")

    async def send(self, to: str, subject: str, body: bytes) -> Receipt:
        record = await self.recipient_key(to)
        msg_id = secrets.token_hex(16)
        sealed = seal(InnerMessage(self.uid, to, msg_id, utc_now(), subject, body), self.client.keystore.key, record)
        (outcome,) = await self._submit([Copy(to, msg_id, record)], [sealed])
        if isinstance(outcome, RemoteError):
            raise outcome
        receipt = await self._accept_receipt(outcome, to, msg_id, sealed)
        self.state.save_caches()
        return receipt

    async def _accept_receipt(self, receipt: Receipt, to: str, msg_id: str, sealed: Sealed) -> Receipt:
        """A send's receipt, once it is the relay's and names what we sent: kept for ``receipts``."""
        await self._check_receipt(receipt)
        if (receipt.msg_id, receipt.sender, receipt.recipient, receipt.digest) != \
                (msg_id, self.uid, to, ciphertext_digest(sealed)):
            raise VerificationError("receipt does not match the message sent")
        self.state.add_receipt(receipt)
        return receipt

    async def send_many(self, recipients: list[str], subject: str, body: bytes) -> list[Receipt]:
        """One message to several recipients (version 4 envelope), one receipt each, in order.

        Every recipient's certificate and key record is checked before anything is sent: if one is
        unknown, revoked or without a key, nothing is sent and the error names it. The copies then go
        in one pipelined write, so the relay stores them in one group commit."""
        if len(recipients) == 1:
            return [await self.send(recipients[0], subject, body)]
        # Every recipient's directory entry in one round trip, kept for recipient_key below.
        wanted = [u for u in recipients if (u, None) not in self._directory][:DIRECTORY_CACHE - len(self._directory)]
        for uid, entry in zip(wanted, await self.client.directories(wanted), strict=True):
            if isinstance(entry, DirectoryResult):
                self._directory[(uid, None)] = entry
        copies = []
        for uid in recipients:
            try:
                record = await self.recipient_key(uid)
            except RemoteError as exc:
                raise ClientError(f"cannot send to {uid}: {exc.message}: nothing sent") from None
            copies.append(Copy(uid, secrets.token_hex(16), record))
        sealed = seal_many(self.uid, utc_now(), subject, body, copies, self.client.keystore.key)
        outcomes = await self._submit(copies, sealed)
        receipts, refused = [], []
        for c, s, outcome in zip(copies, sealed, outcomes, strict=True):
            if isinstance(outcome, RemoteError):
                refused.append(f"{c.uid} ({outcome.message})")
            else:
                receipts.append(await self._accept_receipt(outcome, c.uid, c.msg_id, s))
        self.state.save_caches()
        if refused:
            stored = ", ".join(r.recipient for r in receipts) or "no one"
            raise PartlySent(f"the relay refused the copy for {'; '.join(refused)}; sent to {stored}")
        return receipts

    async def _submit(self, copies: list[Copy], sealed: list[Sealed]) -> list[Receipt | RemoteError]:
        """Submit the copies pipelined; after a lost connection the very same bytes under the same msg_ids
        through the next node: the relay's (sender, msg_id) idempotency returns the first receipt of a
        copy already stored, so a failover never delivers twice. One outcome per copy: its receipt, or
        the relay's refusal."""
        for attempt in range(len(self.client.nodes)):
            requests = [self.client.send_request(c.uid, c.msg_id, s) for c, s in zip(copies, sealed, strict=True)]
            results = await self.client.pipeline(requests)
            lost = next((r for r in results if isinstance(r, ConnectionLost)), None)
            if lost is None or attempt == len(self.client.nodes) - 1:
                break
            log.info("send lost (%s): trying the next node", lost)
            await self.client.failover()
            self._check_relay(await self.policy())
        out: list[Receipt | RemoteError] = []
        for r in results:
            if isinstance(r, ClientError):
                raise r
            out.append(r if isinstance(r, RemoteError) else r.receipt)  # type: ignore[union-attr]
        return out

    async def watch(self, on_line: Callable[[QueueLine], None], on_message: Callable[[ReadMessage | Unreadable], None],
                    *, open_messages: bool = False, keepalive: float = KEEPALIVE, refresh: float = REFRESH,
                    retry: tuple[float, float] = RETRY) -> None:
        """Show what is unread, then every new message the moment the relay announces it; runs until
        cancelled. A lost connection is made again (through the next node of a cluster) with backoff.

        Subscribe first, list second: a message stored in between is in the list, and one stored after
        is announced. Only numbers above the last one shown are listed, so a reconnection neither
        misses a message nor shows one twice."""
        import asyncio  # watch alone runs on an event loop (one-shot commands start none)

        loop = asyncio.get_running_loop()
        shown = 0
        wait = retry[0]
        while True:
            try:
                await self.client.subscribe()
                fresh_until = loop.time() + refresh
                while True:
                    for entry in await self.client.queue(after=shown):
                        await self._show(entry, on_line, on_message, open_messages)
                        shown = entry.num
                    wait = retry[0]
                    if not await self.client.wait_queued(shown, keepalive):
                        await self.client.ping()
                    if loop.time() > fresh_until:
                        self._forget()  # a CRL published meanwhile applies to what comes next
                        fresh_until = loop.time() + refresh
            except ConnectionLost as exc:
                log.warning("%s: connecting again in %.1f s", exc, wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, retry[1])
                try:
                    await self.client.failover()
                except ConnectionLost as again:
                    log.warning("%s", again)
                    continue
                except ServerRejected:
                    raise
                self._forget()
                await self.policy()  # the new node's CRLs, and its certificate checked against them

    async def _show(self, entry: QueueEntry, on_line: Callable[[QueueLine], None],
                    on_message: Callable[[ReadMessage | Unreadable], None], open_messages: bool) -> None:
        if not open_messages:
            on_line(await self._queue_line(entry))
            self.state.save_caches()
            return
        try:
            on_message(await self.read(entry.num))
        except VerificationError as exc:
            on_message(Unreadable(entry.num, exc))
        except RemoteError as exc:
            if exc.code != "unknown_message":
                raise
            # read and marked by another device of ours meanwhile: nothing to show

    def _forget(self) -> None:
        """Drop what this command learnt from the relay (CRLs checked, directory answers)."""
        self._policy = None
        self._directory.clear()

    async def queue(self) -> list[QueueLine]:
        """Unread messages as ``askqueue`` shows them: the time from the relay's signed receipt, the
        subject only when the sender's signature over it verifies (else ``subject`` is None).

        What never changes is verified once and kept (SubjectFacts: the receipt's signature, the subject
        opened and its signature); what may change is checked on every line."""
        lines = [await self._queue_line(e) for e in await self.client.queue()]
        self.state.subjects().save()
        self.state.save_caches()
        return lines

    async def _queue_line(self, e: QueueEntry) -> QueueLine:
        facts = self.state.subjects()
        reader = self.uid
        try:
            r = e.receipt
            key = facts.key(reader, e)
            known = facts.get(key)  # the subject, if these very bytes verified before
            await self._check_receipt(r, signature_verified=known is not None)
            if (r.msg_id, r.sender, r.recipient, r.queue_number) != (e.msg_id, e.sender, reader, e.num):
                raise VerificationError("receipt does not match the queue entry")
            if e.envelope_version not in SIGNED_SUBJECT_VERSIONS:
                raise VerificationError("subject not signed (an envelope older than version 3)")
            # Every time, cached subject or not: the sender's certificate valid at the receipt's time, with
            # the CRLs of now (a sender revoked since shows as unverifiable).
            cert, _ = await self.validated_certificate(e.sender, r.server_time, e.sender_cert)
            if known is None:
                subject = read_subject(e.envelope_version, e.header, reader=reader, sender=e.sender,
                                       msg_id=e.msg_id, keyring=self.keyring,
                                       sender_key=cert.public_key())  # type: ignore[arg-type]
                facts.put(key, subject)
            else:
                subject = known
        except VerificationError as exc:
            log.debug("queue entry %d unverifiable: %s", e.num, exc)
            return QueueLine(e.num, e.sender, e.server_time, None)
        return QueueLine(e.num, e.sender, r.server_time, subject)

    async def validated_certificate(self, uid: str, at: dt.datetime, fingerprint: bytes | None = None,
                                    role: Role = "client") -> tuple[x509.Certificate, DirectoryResult]:
        """A user's certificate from the directory, validated at ``at`` (now, or a receipt's time).

        With ``fingerprint``, the certificate a stored message was sent with: a sender who has renewed
        a certificate since is still verified against the key that signed the message. Such a chain is
        kept in the state directory by that fingerprint (``ClientState.known_chain``: the leaf is named
        by its digest, so it never goes stale), and the directory is not asked for it again; the entry
        returned then has no key record (callers with a fingerprint use the certificate only). Whatever
        its source, the chain is validated on every call.

        Within one policy (the CRLs of this command), a certificate named by its fingerprint that validated
        is kept with the span of times for which its validation stands as it is (pki.verdicts.Verdicts.span:
        the chain's dates, and only for a chain these CRLs revoke at no time), so a queue validating one
        sender's certificate at each line's time compares a time per line. Any time outside the span, a
        chain revoked at any date, or another policy is validated in full.
        """
        held = self._valid.get((uid, fingerprint, role)) if fingerprint is not None else None
        if held is not None and held.policy is self._policy and held.span.covers(at):
            return held.cert, held.entry
        entry = self._directory.get((uid, fingerprint))
        kept = None if entry is not None or fingerprint is None else self.state.known_chain(uid, fingerprint)
        if kept is not None:
            entry = DirectoryResult(uid, kept, None)
        if entry is None:
            # Once per command: the queue asks for the same sender's certificate again and again. Bounded:
            # a relay listing thousands of distinct certificates must not make us hold them all.
            entry = await self.client.directory(uid, fingerprint)
        if (uid, fingerprint) not in self._directory and len(self._directory) < DIRECTORY_CACHE:
            self._directory[(uid, fingerprint)] = entry
        verdicts = self.state.verdicts()
        try:
            certs = [verdicts.certificate(c) for c in entry.chain]
        except ValueError:
            raise VerificationError("directory returned an unreadable certificate") from None
        if not certs:
            raise VerificationError(f"directory has no certificate for {uid}")
        pool = certs[1:] + self.client.keystore.intermediates()
        policy = await self.policy()
        try:
            identity = policy.validate(certs[0], pool, role=role, at=at)
        except ValidationError as exc:
            raise CertificateRejected(exc.reason, f"certificate of {uid} rejected: {exc}") from None
        if identity.uid != uid:
            raise VerificationError(f"directory certificate is for {identity.uid}, not {uid}")
        if fingerprint is not None and verdicts.fingerprint(certs[0]) != fingerprint:
            raise VerificationError("directory returned another certificate than the one asked for")
        if fingerprint is not None and kept is None:
            self.state.remember_chain(uid, fingerprint, entry.chain)
        if fingerprint is not None:
            self._keep_valid((uid, fingerprint, role), policy, certs[0], pool, at, entry)
        return certs[0], entry

    def _keep_valid(self, key: tuple[str, bytes, Role], policy: TrustPolicy, cert: x509.Certificate,
                    pool: list[x509.Certificate], at: dt.datetime, entry: DirectoryResult) -> None:
        """Keep what validated_certificate just accepted, for the span its verdict stands (if it has one).
        Bounded as the directory answers are: a relay naming thousands of certificates cannot grow it; what
        was kept under older CRLs (a watch) is never used again, so it goes first."""
        if key not in self._valid and len(self._valid) >= DIRECTORY_CACHE:
            self._valid = {k: v for k, v in self._valid.items() if v.policy is policy}
        if policy.verdicts is None or key not in self._valid and len(self._valid) >= DIRECTORY_CACHE:
            return
        span = policy.verdicts.span(policy, cert, pool, key[2], at)
        if span is None:
            self._valid.pop(key, None)
        else:
            self._valid[key] = _Valid(policy, span, cert, entry)

    async def read(self, num: int) -> ReadMessage:
        msg: StoredMessage = await self.client.get(num)
        if msg.num != num:
            raise VerificationError(f"asked for message {num}, the relay served message {msg.num}")
        receipt = msg.receipt
        await self._check_receipt(receipt)
        sealed = Sealed(msg.envelope_version, msg.header, msg.envelope)
        digest = ciphertext_digest(sealed)
        if (receipt.recipient, receipt.queue_number, receipt.digest, receipt.sender, receipt.msg_id) != \
                (self.uid, msg.num, digest, msg.sender, msg.msg_id):
            raise VerificationError("receipt does not match the stored message")
        cert, _ = await self.validated_certificate(receipt.sender, receipt.server_time, msg.sender_cert)
        opened: OpenedMessage = open_envelope(sealed, reader=self.uid, sender=receipt.sender, msg_id=receipt.msg_id,
                                              sender_key=cert.public_key(), keyring=self.keyring)  # type: ignore[arg-type]
        if not self.state.check_and_remember(receipt.sender, receipt.msg_id, msg.num, digest):
            raise VerificationError(f"replayed message: {receipt.msg_id} from {receipt.sender} was seen before")
        if not msg.read:
            # Only now: a message that fails any check above stays unread in the queue.
            await self.client.mark_read(num)
        self.state.save_caches()
        return ReadMessage(msg.num, opened.inner, receipt)
