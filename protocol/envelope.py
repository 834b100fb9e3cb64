"""The end-to-end envelope: what a sender signs and what a recipient checks.

The relay never looks inside: it stores ``header`` (what ``queue`` shows) and ``envelope`` (what
``get`` returns) as opaque bytes with their ``envelope_version``. Only clients call this module.

Version 1 signs the inner message ``{from, to, msg_id, sent_at, subject, body}`` with the sender's
certificate key (authentic, readable by the relay). Version 2, what clients send, also seals it:

    header   = key_id(8) || HPKE(recipient key, subject,                 info = v2/header + from,to,msg_id)
    envelope = key_id(8) || HPKE(recipient key, inner fields + signature, info = v2/body   + from,to,msg_id)

Version 3, what clients send now, seals ``subject || signature`` in the header instead of the bare
subject, the signature by the sender over (sender, recipient, msg_id, subject): a subject the relay
or a thief of its database sealed to the reader's public key is never shown as if the sender wrote it.

Version 4, for a message to several recipients (at most 32), is version 3 with one more thing in the
sealed envelope: the *roster*, every recipient with the msg_id of its copy. The sender signs the inner
message once, roster included, and seals it for each recipient separately (HPKE to each one's key,
``info`` bound to that recipient and copy), so each reader sees who else got the message and cannot be
fooled about it, and a copy moved to another queue still fails to open.

``key_id`` names which of the recipient's published keys was used (it rotates keys). The ``info``
binding makes an envelope fail to open when it is moved to another recipient, or attributed to
another sender or msg_id. The outer *submission* signature covers (recipient, msg_id, version,
header, envelope) so the relay can refuse forged submissions without reading them.
"""

from __future__ import annotations

import datetime as dt
import json
import unicodedata
from typing import Any, Protocol

from pki.errors import MsgRelayError
from pki.frozen import frozen
from pki.identity import is_valid_uid
from pki.keys import PrivateKey, PublicKey, sign, verify_signature

from . import hpke
from .encoding import (
    b64d,
    b64e,
    format_time,
    pack,
    parse_time,
    sha256,
    signing_input,
    unpack,
)
from .errors import ProtocolError
from .fields import MSG_ID_RE, Fields
from .frames import loads_object
from .keyrecord import KeyRecord

MAX_BODY = 1000
MAX_SUBJECT = 200
ENVELOPE_V1 = 1
ENVELOPE_V2 = 2
ENVELOPE_V3 = 3  # v2 with a sender signature inside the sealed header: the queue shows only signed subjects
ENVELOPE_V4 = 4  # v3 for several recipients: the signed inner message names them all (the roster)
SEALED_VERSIONS = (ENVELOPE_V2, ENVELOPE_V3, ENVELOPE_V4)
SIGNED_SUBJECT_VERSIONS = (ENVELOPE_V3, ENVELOPE_V4)
MAX_RECIPIENTS = 32
KEY_ID_LEN = 8


class VerificationError(MsgRelayError):
    """A message failed an end-to-end check; ``str()`` is the detail shown with ``--verbose``."""


class NoSuchKey(VerificationError):
    """Sealed to an encryption key the reader does not hold: not a forgery, a missing key (another
    device's, or a state directory that was lost), so it gets its own message."""


# Control and format characters (terminal escapes, bidi overrides) and line separators: a subject
# is printed on one line of someone's terminal and must not be able to rewrite what is around it.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def check_subject(subject: str) -> str:
    """Subjects are printed one per line: printable characters only, bounded length."""
    if len(subject) > MAX_SUBJECT:
        raise ValueError(f"subject longer than {MAX_SUBJECT} characters")
    if any(unicodedata.category(c) in _UNPRINTABLE for c in subject):
        raise ValueError("subject contains control characters")
    return subject


@frozen
class InnerMessage:
    sender: str
    recipient: str
    msg_id: str
    sent_at: dt.datetime
    subject: str
    body: bytes
    cc: tuple[str, ...] = ()  # the other recipients of a message to several (version 4)

    def to_bytes(self) -> bytes:
        doc = {"from": self.sender, "to": self.recipient, "msg_id": self.msg_id, "sent_at": format_time(self.sent_at),
               "subject": self.subject, "body": b64e(self.body)}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> "InnerMessage":
        try:
            f = Fields(loads_object(data))
            body = f.bytes("body", MAX_BODY)
            subject = check_subject(f.str("subject", MAX_SUBJECT))
            return cls(f.uid("from"), f.uid("to"), f.msg_id(), parse_time(f.str("sent_at", 40)), subject, body)
        except (ValueError, ProtocolError) as exc:
            raise VerificationError(f"inner message malformed: {exc}") from None


@frozen
class Sealed:
    """What a client submits and the relay stores: version, header and envelope bytes."""

    version: int
    header: bytes
    envelope: bytes


@frozen
class OpenedMessage:
    inner: InnerMessage


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _load(data: bytes, what: str) -> Fields:
    try:
        return Fields(loads_object(data))
    except ValueError as exc:
        raise VerificationError(f"{what} {exc}") from None


class Keyring(Protocol):
    """The reader's private HPKE keys, by key id (its current key and the not yet retired ones)."""

    def private_key(self, key_id: str) -> tuple[str, bytes] | None: ...


def _info(part: str, sender: str, recipient: str, msg_id: str) -> bytes:
    return signing_input(f"seal/v2/{part}", sender, recipient, msg_id)


def _header_signed(sender: str, recipient: str, msg_id: str, subject: str) -> bytes:
    return signing_input("header/v3", sender, recipient, msg_id, subject)


def _inner_v2_signed(inner: InnerMessage) -> bytes:
    return signing_input("inner/v2", inner.sender, inner.recipient, inner.msg_id, format_time(inner.sent_at),
                         inner.subject, inner.body)


def seal(inner: InnerMessage, sender_key: PrivateKey, recipient_key: KeyRecord | None = None) -> Sealed:
    """Version 2 (signed and sealed) for a recipient's key record; version 1 (signed only) without."""
    if len(inner.body) > MAX_BODY:
        raise ValueError(f"message body longer than {MAX_BODY} bytes")
    check_subject(inner.subject)
    if recipient_key is None:
        return _seal_v1(inner, sender_key)
    if recipient_key.uid != inner.recipient:
        raise ValueError("key record belongs to another user")
    key_id = bytes.fromhex(recipient_key.key_id)
    signature = sign(sender_key, _inner_v2_signed(inner))
    ids = (inner.sender, inner.recipient, inner.msg_id)
    subject_signature = sign(sender_key, _header_signed(inner.sender, inner.recipient, inner.msg_id, inner.subject))
    header = key_id + hpke.seal(recipient_key.kem, recipient_key.public_key,
                                pack(inner.subject.encode(), subject_signature), _info("header", *ids))
    plain = pack(inner.sender.encode(), inner.recipient.encode(), inner.msg_id.encode(),
                 format_time(inner.sent_at).encode(), inner.subject.encode(), inner.body, signature)
    envelope = key_id + hpke.seal(recipient_key.kem, recipient_key.public_key, plain, _info("body", *ids))
    return Sealed(ENVELOPE_V3, header, envelope)


def _seal_v1(inner: InnerMessage, sender_key: PrivateKey) -> Sealed:
    data = inner.to_bytes()
    signature = sign(sender_key, signing_input("inner/v1", data))
    envelope = _json({"inner": b64e(data), "signature": b64e(signature)})
    header = _json({"subject": inner.subject})
    return Sealed(ENVELOPE_V1, header, envelope)


@frozen
class Copy:
    """One recipient of a message to several: its UID, the msg_id of its copy and its key record."""

    uid: str
    msg_id: str
    key: KeyRecord


def seal_many(sender: str, sent_at: dt.datetime, subject: str, body: bytes, copies: list[Copy],
              sender_key: PrivateKey) -> list[Sealed]:
    """Version 4: one signed inner message naming every recipient, sealed for each (one per ``copies``).

    HPKE to each recipient's key rather than one content key wrapped for each: every copy is then an
    ordinary sealed envelope (its own queue entry, served whole by ``get``, bound to its recipient by
    ``info``), no new construction is composed, and the cost is the same (each recipient needs one
    KEM encapsulation either way; the body is at most 1000 bytes)."""
    if len(body) > MAX_BODY:
        raise ValueError(f"message body longer than {MAX_BODY} bytes")
    check_subject(subject)
    roster = _roster_bytes([(c.uid, c.msg_id) for c in copies])
    _parse_roster(roster)  # the rules a reader applies: 2..32 distinct recipients, valid ids
    if any(c.key.uid != c.uid for c in copies):
        raise ValueError("key record belongs to another user")
    when = format_time(sent_at)
    signature = sign(sender_key, _inner_v4_signed(sender, roster, when, subject, body))
    plain = pack(sender.encode(), roster, when.encode(), subject.encode(), body, signature)
    out = []
    for c in copies:
        ids = (sender, c.uid, c.msg_id)
        key_id = bytes.fromhex(c.key.key_id)
        subject_signature = sign(sender_key, _header_signed(*ids, subject))
        header = key_id + hpke.seal(c.key.kem, c.key.public_key, pack(subject.encode(), subject_signature),
                                    _info("header", *ids))
        envelope = key_id + hpke.seal(c.key.kem, c.key.public_key, plain, _info("body", *ids))
        out.append(Sealed(ENVELOPE_V4, header, envelope))
    return out


def _roster_bytes(roster: list[tuple[str, str]]) -> bytes:
    return "\n".join(f"{uid} {msg_id}" for uid, msg_id in roster).encode()


def _parse_roster(raw: bytes) -> list[tuple[str, str]]:
    """Every recipient of a version 4 message with its copy's msg_id; ValueError unless 2..32 distinct
    recipients with valid UIDs and distinct msg_ids."""
    roster = []
    for line in raw.decode("latin-1").split("\n"):  # UIDs and msg_ids are ASCII: anything else fails below
        uid, _, msg_id = line.partition(" ")
        if not is_valid_uid(uid) or not MSG_ID_RE.fullmatch(msg_id):
            raise ValueError("roster entry malformed")
        roster.append((uid, msg_id))
    if not 2 <= len(roster) <= MAX_RECIPIENTS:
        raise ValueError(f"roster of {len(roster)} recipients (2 to {MAX_RECIPIENTS})")
    if len({u for u, _ in roster}) != len(roster) or len({m for _, m in roster}) != len(roster):
        raise ValueError("roster repeats a recipient or a msg_id")
    return roster


def _inner_v4_signed(sender: str, roster: bytes, sent_at: str, subject: str, body: bytes) -> bytes:
    return signing_input("inner/v4", sender, roster, sent_at, subject, body)


def _open_v2(blob: bytes, part: str, keyring: Keyring | None, ids: tuple[str, str, str]) -> bytes:
    if keyring is None or len(blob) <= KEY_ID_LEN:
        raise VerificationError("sealed message but no key to open it")
    found = keyring.private_key(blob[:KEY_ID_LEN].hex())
    if found is None:
        raise NoSuchKey(f"sealed to encryption key {blob[:KEY_ID_LEN].hex()}, which this state directory does "
                        "not hold")
    try:
        return hpke.open_sealed(found[0], found[1], blob[KEY_ID_LEN:], _info(part, *ids))
    except hpke.HpkeError as exc:
        raise VerificationError(str(exc)) from None


def read_subject(version: int, header: bytes, *, reader: str = "", sender: str = "", msg_id: str = "",
                 keyring: Keyring | None = None, sender_key: PublicKey | None = None) -> str:
    """The subject of a sealed header. Version 3 carries the sender's signature over it, checked with
    ``sender_key`` (from the sender's validated certificate), so ``askqueue`` can show it. Earlier
    versions are returned unauthenticated: ``open_envelope`` compares them with the signed inner
    message, and ``askqueue`` shows them as unverifiable."""
    if version in SEALED_VERSIONS:
        raw = _open_v2(header, "header", keyring, (sender, reader, msg_id))
        if version not in SIGNED_SUBJECT_VERSIONS:
            return _subject(raw)
        try:
            subject_bytes, signature = unpack(raw, 2)
        except ValueError as exc:
            raise VerificationError(f"header malformed: {exc}") from None
        subject = _subject(subject_bytes)
        if sender_key is None or not verify_signature(sender_key, signature,
                                                      _header_signed(sender, reader, msg_id, subject)):
            raise VerificationError("subject signature does not verify against the sender's certificate")
        return subject
    if version != ENVELOPE_V1:
        raise VerificationError(f"unsupported envelope version {version}")
    try:
        return check_subject(_load(header, "header").str("subject", MAX_SUBJECT))
    except (ProtocolError, ValueError) as exc:
        raise VerificationError(f"header malformed: {exc}") from None


def _subject(raw: bytes) -> str:
    try:
        return check_subject(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise VerificationError(f"header malformed: {exc}") from None


def open_envelope(sealed: Sealed, *, reader: str, sender: str, msg_id: str, sender_key: PublicKey,
                  keyring: Keyring | None = None) -> OpenedMessage:
    """Every check of DESIGN.md §5 that needs no local state: signature, addressee, sender, msg_id.

    ``sender`` and ``msg_id`` come from the relay's signed receipt, ``sender_key`` from the sender's
    certificate, which the caller has validated at the receipt's server time.
    """
    if sealed.version == ENVELOPE_V4:
        inner = _open_inner_v4(sealed, reader, sender, msg_id, sender_key, keyring)
    elif sealed.version in SEALED_VERSIONS:
        inner = _open_inner_v2(sealed, reader, sender, msg_id, sender_key, keyring)
    elif sealed.version == ENVELOPE_V1:
        inner = _open_inner_v1(sealed, sender_key)
    else:
        raise VerificationError(f"unsupported envelope version {sealed.version}")
    if inner.recipient != reader:
        raise VerificationError(f"message is addressed to {inner.recipient}, not to {reader}")
    if inner.sender != sender:
        raise VerificationError(f"message claims sender {inner.sender} but was submitted by {sender}")
    if inner.msg_id != msg_id:
        raise VerificationError("message id inside the envelope does not match the relay's")
    subject = read_subject(sealed.version, sealed.header, reader=reader, sender=sender, msg_id=msg_id,
                           keyring=keyring, sender_key=sender_key)
    if subject != inner.subject:
        raise VerificationError("subject shown in the queue differs from the signed subject")
    return OpenedMessage(inner)


def _open_inner_v1(sealed: Sealed, sender_key: PublicKey) -> InnerMessage:
    f = _load(sealed.envelope, "envelope")
    try:
        data, signature = b64d(f.obj.get("inner"), "inner"), b64d(f.obj.get("signature"), "signature")
    except ProtocolError as exc:
        raise VerificationError(str(exc)) from None
    if not verify_signature(sender_key, signature, signing_input("inner/v1", data)):
        raise VerificationError("inner signature does not verify against the sender's certificate")
    return InnerMessage.from_bytes(data)


def _open_inner_v2(sealed: Sealed, reader: str, sender: str, msg_id: str, sender_key: PublicKey,
                   keyring: Keyring | None) -> InnerMessage:
    plain = _open_v2(sealed.envelope, "body", keyring, (sender, reader, msg_id))
    try:
        f_from, f_to, f_id, f_sent, f_subject, body, signature = unpack(plain, 7)
        inner = InnerMessage(f_from.decode(), f_to.decode(), f_id.decode(), parse_time(f_sent.decode()),
                             check_subject(f_subject.decode()), body)
    except (ValueError, UnicodeDecodeError, ProtocolError) as exc:
        raise VerificationError(f"inner message malformed: {exc}") from None
    if len(inner.body) > MAX_BODY:
        raise VerificationError(f"message body longer than {MAX_BODY} bytes")
    if not verify_signature(sender_key, signature, _inner_v2_signed(inner)):
        raise VerificationError("inner signature does not verify against the sender's certificate")
    return inner


def _open_inner_v4(sealed: Sealed, reader: str, sender: str, msg_id: str, sender_key: PublicKey,
                   keyring: Keyring | None) -> InnerMessage:
    """The inner message of a copy for ``reader``: the signed roster must name ``reader`` with this
    copy's ``msg_id``; the other recipients become ``cc``."""
    plain = _open_v2(sealed.envelope, "body", keyring, (sender, reader, msg_id))
    try:
        f_from, roster_raw, f_sent, f_subject, body, signature = unpack(plain, 6)
        roster = _parse_roster(roster_raw)
        sent_at, subject = f_sent.decode(), check_subject(f_subject.decode())
        inner_sender = f_from.decode()
        parse_time(sent_at)
    except (ValueError, UnicodeDecodeError, ProtocolError) as exc:
        raise VerificationError(f"inner message malformed: {exc}") from None
    if len(body) > MAX_BODY:
        raise VerificationError(f"message body longer than {MAX_BODY} bytes")
    if not verify_signature(sender_key, signature, _inner_v4_signed(inner_sender, roster_raw, sent_at, subject, body)):
        raise VerificationError("inner signature does not verify against the sender's certificate")
    if (reader, msg_id) not in roster:
        raise VerificationError(f"the message's recipients do not include {reader} with this msg_id")
    return InnerMessage(inner_sender, reader, msg_id, parse_time(sent_at), subject, body,
                        tuple(uid for uid, _ in roster if uid != reader))


# ---------------------------------------------------------------------- the outer submission signature
def submission_bytes(recipient: str, msg_id: str, sealed: Sealed) -> bytes:
    return signing_input("submit/v1", recipient, msg_id, sealed.version, sha256(sealed.header),
                         sha256(sealed.envelope))


def sign_submission(key: PrivateKey, recipient: str, msg_id: str, sealed: Sealed) -> bytes:
    return sign(key, submission_bytes(recipient, msg_id, sealed))


def verify_submission(key: PublicKey, signature: bytes, recipient: str, msg_id: str, sealed: Sealed) -> bool:
    return verify_signature(key, signature, submission_bytes(recipient, msg_id, sealed))


def ciphertext_digest(sealed: Sealed) -> bytes:
    """What a receipt commits to: header and envelope together, unambiguously."""
    return sha256(sealed.header, sealed.envelope)
