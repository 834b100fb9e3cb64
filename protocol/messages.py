"""Typed requests and responses of the relay protocol (DESIGN.md §3, §4).

On the wire every request is ``{"v": 1, "id": ..., "op": ..., <fields>}`` and every response
``{"v": 1, "id": ..., "ok": true, <fields>}`` or ``{"v": 1, "id": ..., "ok": false, "error":
{"code": ..., "message": ...}}``. Binary values are standard padded base64.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
from typing import Any, ClassVar, Union

from pki.errors import MsgRelayError
from pki.frozen import frozen

from . import PROTOCOL_VERSION
from .encoding import b64e, format_time, parse_time
from .errors import ErrorCode, ProtocolError
from .fields import MAX_INT, Fields
from .frames import MAX_FRAME_LIMIT, MIN_FRAME_LIMIT, FrameError, encode_frame, frame
from .receipts import Receipt

RequestId = Union[str, int]
MAX_HEADER = 4096      # sealed subject
MAX_ENVELOPE = 8192    # sealed message; the frame limit is usually the tighter bound
MAX_SIGNATURE = 1024   # RSA-4096 is 512 bytes
MAX_CHAIN = 8
MAX_CERT = 8192
MAX_CRL = 16 << 20    # a CRL with 10 000 revocations is about 400 KB
MAX_CRLS = 8          # CRLs in a relay's list (root and intermediate ones)


def _request_id(obj: dict[str, Any]) -> RequestId:
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "missing or invalid request 'id' (string or integer)")
    if isinstance(rid, str) and len(rid) > 64 or isinstance(rid, int) and not 0 <= rid < 2**53:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "request 'id' out of range")
    if isinstance(rid, str) and not _encodable(rid):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "request 'id' is not valid Unicode")  # echoed in the answer
    return rid


def _encodable(text: str) -> bool:
    """JSON can carry a lone surrogate (``"\\ud800"``) that UTF-8 cannot: such a text cannot go back out."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------------------- requests
@frozen
class SendRequest:
    """Store a sealed message for ``to``; ``signature`` is the sender's over the submission."""

    op: ClassVar[str] = "send"
    id: RequestId
    to: str
    msg_id: str
    envelope_version: int
    header: bytes
    envelope: bytes
    signature: bytes

    def fields(self) -> dict[str, Any]:
        return {"to": self.to, "msg_id": self.msg_id, "envelope_version": self.envelope_version,
                "header": b64e(self.header), "envelope": b64e(self.envelope), "signature": b64e(self.signature)}

    @classmethod
    def parse(cls, rid: RequestId, f: Fields) -> "SendRequest":
        return cls(rid, f.uid("to"), f.msg_id(), f.int("envelope_version", 1, 255),
                   f.bytes("header", MAX_HEADER), f.bytes("envelope", MAX_ENVELOPE),
                   f.bytes("signature", MAX_SIGNATURE))


@frozen
class QueueRequest:
    """List the caller's unread messages with a number above ``after`` (one page); with ``upto``, only
    those numbered at most ``upto``. Ranges let a client ask for many pages at once (pipelined) instead
    of one after another: a page's ``after`` no longer has to wait for the page before it. ``upto`` is
    optional (a relay that predates it ignores it, and says so by not setting ``ranges`` in its answer)."""

    op: ClassVar[str] = "queue"
    id: RequestId
    after: int = 0
    upto: int | None = None

    def fields(self) -> dict[str, Any]:
        return {"after": self.after} | ({"upto": self.upto} if self.upto is not None else {})

    @classmethod
    def parse(cls, rid: RequestId, f: Fields) -> "QueueRequest":
        return cls(rid, f.int("after") if f.has("after") else 0, f.int("upto") if f.has("upto") else None)


@frozen
class GetRequest:
    op: ClassVar[str] = "get"
    id: RequestId
    num: int

    def fields(self) -> dict[str, Any]:
        return {"num": self.num}

    @classmethod
    def parse(cls, rid: RequestId, f: Fields) -> "GetRequest":
        return cls(rid, f.int("num", 1))


@frozen
class DirectoryRequest:
    """A user's current certificate and key record, or with ``fingerprint`` (SHA-256 of the DER) one of
    the user's earlier certificates: the one a stored message was sent with."""

    op: ClassVar[str] = "directory"
    id: RequestId
    uid: str
    fingerprint: bytes | None = None

    def fields(self) -> dict[str, Any]:
        return {"uid": self.uid} | ({"fingerprint": b64e(self.fingerprint)} if self.fingerprint else {})

    @classmethod
    def parse(cls, rid: RequestId, f: Fields) -> "DirectoryRequest":
        return cls(rid, f.uid("uid"), f.bytes("fingerprint", 32) if f.has("fingerprint") else None)


@frozen
class PublishKeyRequest:
    """Publish the caller's encryption key record, signed with its certificate key."""

    op: ClassVar[str] = "publish_key"
    id: RequestId
    record: bytes
    signature: bytes

    def fields(self) -> dict[str, Any]:
        return {"record": b64e(self.record), "signature": b64e(self.signature)}

    @classmethod
    def parse(cls, rid: RequestId, f: Fields) -> "PublishKeyRequest":
        return cls(rid, f.bytes("record", 4096), f.bytes("signature", MAX_SIGNATURE))


@frozen
class MarkReadRequest:
    """Mark message ``num`` read: sent by a client only after it has verified the message, so a read
    that fails (tampering, a revoked sender, the wrong state directory) leaves the queue as it was."""

    op: ClassVar[str] = "mark_read"
    id: RequestId
    num: int

    def fields(self) -> dict[str, Any]:
        return {"num": self.num}

    @classmethod
    def parse(cls, rid: RequestId, f: Fields) -> "MarkReadRequest":
        return cls(rid, f.int("num", 1))


@frozen
class HelloRequest:
    """What the relay allows (its frame limit, its operations); a client pipelines it first."""

    op: ClassVar[str] = "hello"
    id: RequestId

    def fields(self) -> dict[str, Any]:
        return {}

    @classmethod
    def parse(cls, rid: RequestId, f: Fields) -> "HelloRequest":
        return cls(rid)


@frozen
class CrlListRequest:
    """Which CRLs the relay holds, each with its number and digest (not the CRLs themselves)."""

    op: ClassVar[str] = "crls"
    id: RequestId

    def fields(self) -> dict[str, Any]:
        return {}

    @classmethod
    def parse(cls, rid: RequestId, f: Fields) -> "CrlListRequest":
        return cls(rid)


@frozen
class CrlRequest:
    """A piece of the CRL with SHA-256 ``digest``, from byte ``offset``: a CRL with thousands of
    revocations travels in pieces that each fit a frame."""

    op: ClassVar[str] = "crl"
    id: RequestId
    digest: bytes
    offset: int = 0

    def fields(self) -> dict[str, Any]:
        return {"digest": b64e(self.digest), "offset": self.offset}

    @classmethod
    def parse(cls, rid: RequestId, f: Fields) -> "CrlRequest":
        return cls(rid, f.bytes("digest", 32), f.int("offset") if f.has("offset") else 0)


@frozen
class SubscribeRequest:
    """Live delivery: from now on, while the connection lasts, the relay pushes a :class:`QueuedEvent`
    whenever a message is stored in the caller's queue. Requests go on being answered as before."""

    op: ClassVar[str] = "subscribe"
    id: RequestId

    def fields(self) -> dict[str, Any]:
        return {}

    @classmethod
    def parse(cls, rid: RequestId, f: Fields) -> "SubscribeRequest":
        return cls(rid)


Request = Union[SendRequest, QueueRequest, GetRequest, MarkReadRequest, DirectoryRequest, PublishKeyRequest,
                HelloRequest, CrlListRequest, CrlRequest, SubscribeRequest]
REQUEST_TYPES: dict[str, Any] = {t.op: t for t in (SendRequest, QueueRequest, GetRequest, MarkReadRequest,
                                                   DirectoryRequest, PublishKeyRequest, HelloRequest,
                                                   CrlListRequest, CrlRequest, SubscribeRequest)}


def _check_version(obj: dict[str, Any], rid: RequestId | None) -> None:
    v = obj.get("v", PROTOCOL_VERSION)
    if v != PROTOCOL_VERSION or isinstance(v, bool):
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {v!r} not supported "
                            f"(this relay speaks {PROTOCOL_VERSION})", rid)


def parse_request(obj: dict[str, Any]) -> Request:
    """A typed request from a decoded frame, or ProtocolError (with the id when it was readable)."""
    rid = _request_id(obj)
    _check_version(obj, rid)
    op = obj.get("op")
    kind = REQUEST_TYPES.get(op) if isinstance(op, str) else None
    if kind is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown operation {op!r}", rid)
    return kind.parse(rid, Fields(obj, rid))


def request_to_wire(req: Request) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req.id, "op": req.op, **req.fields()}


# -------------------------------------------------------------------------------------- responses
@frozen
class QueueEntry:
    """One unread message as ``queue`` lists it: with its receipt (the signed server time) and the
    fingerprint of the sender's certificate, so the client can check the signed subject."""

    num: int
    sender: str
    msg_id: str
    server_time: dt.datetime
    envelope_version: int
    header: bytes
    receipt: Receipt
    sender_cert: bytes  # SHA-256 fingerprint of the certificate the sender connected with

    def to_wire(self) -> dict[str, Any]:
        return {"num": self.num, "from": self.sender, "msg_id": self.msg_id,
                "server_time": format_time(self.server_time), "envelope_version": self.envelope_version,
                "header": b64e(self.header), "receipt": self.receipt.to_wire(), "sender_cert": b64e(self.sender_cert)}

    @classmethod
    def from_wire(cls, f: Fields) -> "QueueEntry":
        return cls(f.int("num", 1), f.uid("from"), f.msg_id(), parse_time(f.str("server_time", 40)),
                   f.int("envelope_version", 1, 255), f.bytes("header", MAX_HEADER),
                   Receipt.from_wire(f.object("receipt")), f.bytes("sender_cert", 32))


@frozen
class StoredMessage:
    """A message as the relay stores and serves it: routing data, ciphertext and the receipt."""

    num: int
    sender: str
    recipient: str
    msg_id: str
    server_time: dt.datetime
    envelope_version: int
    header: bytes
    envelope: bytes
    receipt: Receipt
    sender_cert: bytes  # SHA-256 fingerprint of the certificate the sender connected with
    read: bool = False

    def entry(self) -> QueueEntry:
        return QueueEntry(self.num, self.sender, self.msg_id, self.server_time, self.envelope_version, self.header,
                          self.receipt, self.sender_cert)

    def to_wire(self) -> dict[str, Any]:
        return {**self.entry().to_wire(), "to": self.recipient, "envelope": b64e(self.envelope), "read": self.read}

    @classmethod
    def from_wire(cls, f: Fields) -> "StoredMessage":
        e = QueueEntry.from_wire(f)
        return cls(e.num, e.sender, f.uid("to"), e.msg_id, e.server_time, e.envelope_version, e.header,
                   f.bytes("envelope", MAX_ENVELOPE), e.receipt, e.sender_cert, f.bool("read"))


@frozen
class SendResult:
    receipt: Receipt

    def to_wire(self) -> dict[str, Any]:
        return {"receipt": self.receipt.to_wire()}

    @classmethod
    def from_wire(cls, f: Fields) -> "SendResult":
        return cls(Receipt.from_wire(f.object("receipt")))


@frozen
class QueueResult:
    """One page of the queue. ``more``: ask again after the last entry (within the same ``upto``).
    ``ranges``: this relay honours ``upto``, so the client may ask for ranges of numbers in parallel
    (absent from the wire when false: what a relay that predates ranges sends)."""

    entries: list[QueueEntry]
    more: bool = False
    ranges: bool = False
    # On the relay: the entries' JSON texts, kept with each message since it was stored (a QueuePage fills
    # them; only encode_response can frame them). None: the entries themselves are encoded.
    wire: QueuePage.Encoded | None = dataclasses.field(default=None, compare=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        messages = self.wire if self.wire is not None else [e.to_wire() for e in self.entries]
        return {"messages": messages, "more": self.more} | ({"ranges": True} if self.ranges else {})

    @classmethod
    def from_wire(cls, f: Fields) -> "QueueResult":
        items = f.list("messages", 10_000)
        entries = []
        for item in items:
            if not isinstance(item, dict):
                raise f.fail("queue entries must be objects")
            entries.append(QueueEntry.from_wire(Fields(item, f.request_id)))
        return cls(entries, f.bool("more"), f.bool("ranges") if f.has("ranges") else False)


@frozen
class GetResult:
    message: StoredMessage

    def to_wire(self) -> dict[str, Any]:
        return {"message": self.message.to_wire()}

    @classmethod
    def from_wire(cls, f: Fields) -> "GetResult":
        return cls(StoredMessage.from_wire(f.object("message")))


@frozen
class KeyRecordWire:
    """A published encryption key record as stored: its canonical bytes and the owner's signature."""

    record: bytes
    signature: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"record": b64e(self.record), "signature": b64e(self.signature)}

    @classmethod
    def from_wire(cls, f: Fields) -> "KeyRecordWire":
        return cls(f.bytes("record", 4096), f.bytes("signature", MAX_SIGNATURE))


@frozen
class DirectoryResult:
    """A user's certificate chain (DER, leaf first) and published key record.

    CRLs are not here: they grow with every revocation and travel through ``crls``/``crl``."""

    uid: str
    chain: list[bytes]
    key: KeyRecordWire | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"uid": self.uid, "chain": [b64e(c) for c in self.chain],
                "key": self.key.to_wire() if self.key else None}

    @classmethod
    def from_wire(cls, f: Fields) -> "DirectoryResult":
        chain = [Fields({"c": c}, f.request_id).bytes("c", MAX_CERT) for c in f.list("chain", MAX_CHAIN)]
        key = KeyRecordWire.from_wire(f.object("key")) if f.has("key") else None
        return cls(f.uid("uid"), chain, key)


@frozen
class PublishKeyResult:
    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, f: Fields) -> "PublishKeyResult":
        return cls()


@frozen
class MarkReadResult:
    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, f: Fields) -> "MarkReadResult":
        return cls()


@frozen
class HelloResult:
    """``max_frame``: the largest frame the relay reads and writes (9999 unless configured larger)."""

    max_frame: int
    ops: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"max_frame": self.max_frame, "ops": list(self.ops)}

    @classmethod
    def from_wire(cls, f: Fields) -> "HelloResult":
        ops = f.list("ops", 64)
        if not all(isinstance(o, str) and len(o) <= 32 for o in ops):
            raise f.fail("field 'ops' must list operation names")
        return cls(f.int("max_frame", MIN_FRAME_LIMIT, MAX_FRAME_LIMIT), tuple(ops))


@frozen
class CrlInfo:
    """One CRL the relay holds: whose (SHA-256 of the issuer name, DER), which (CRL number) and its
    digest and size, so a client fetches only a CRL newer than the one it has verified."""

    issuer: bytes
    number: int
    digest: bytes
    size: int

    def to_wire(self) -> dict[str, Any]:
        return {"issuer": b64e(self.issuer), "number": self.number, "digest": b64e(self.digest), "size": self.size}

    @classmethod
    def from_wire(cls, f: Fields) -> "CrlInfo":
        return cls(f.bytes("issuer", 32), f.int("number"), f.bytes("digest", 32), f.int("size", 1, MAX_CRL))


@frozen
class CrlListResult:
    crls: list[CrlInfo]

    def to_wire(self) -> dict[str, Any]:
        return {"crls": [c.to_wire() for c in self.crls]}

    @classmethod
    def from_wire(cls, f: Fields) -> "CrlListResult":
        items = f.list("crls", MAX_CRLS)
        if not all(isinstance(i, dict) for i in items):
            raise f.fail("CRL entries must be objects")
        return cls([CrlInfo.from_wire(Fields(i, f.request_id)) for i in items])


@frozen
class CrlResult:
    """``data`` is the CRL's bytes from ``offset``; ``total`` its whole size."""

    digest: bytes
    offset: int
    total: int
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"digest": b64e(self.digest), "offset": self.offset, "total": self.total, "data": b64e(self.data)}

    @classmethod
    def from_wire(cls, f: Fields) -> "CrlResult":
        return cls(f.bytes("digest", 32), f.int("offset"), f.int("total", 1, MAX_CRL),
                   f.bytes("data", MAX_FRAME_LIMIT))


@frozen
class SubscribeResult:
    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, f: Fields) -> "SubscribeResult":
        return cls()


Result = Union[SendResult, QueueResult, GetResult, MarkReadResult, DirectoryResult, PublishKeyResult, HelloResult,
               CrlListResult, CrlResult, SubscribeResult]
RESULT_TYPES: dict[str, Any] = {"send": SendResult, "queue": QueueResult, "get": GetResult,
                                "mark_read": MarkReadResult, "directory": DirectoryResult,
                                "publish_key": PublishKeyResult, "hello": HelloResult, "crls": CrlListResult,
                                "crl": CrlResult, "subscribe": SubscribeResult}


# ----------------------------------------------------------------------------------------- events
@frozen
class QueuedEvent:
    """Pushed to a subscribed connection: the caller's queue now holds message ``num`` (the newest the
    relay knows of). It carries no request ``id``, only a number: the client lists its queue after the
    last number it has shown, so events may be coalesced, repeated or lost (a node restarting) without a
    message being missed or shown twice, and a relay cannot make a client hold more than one number."""

    kind: ClassVar[str] = "queued"
    num: int

    def to_wire(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "event": self.kind, "num": self.num}

    @classmethod
    def from_wire(cls, f: Fields) -> "QueuedEvent":
        return cls(f.int("num", 1))


Event = QueuedEvent
EVENT_TYPES: dict[str, Any] = {QueuedEvent.kind: QueuedEvent}


def is_event(obj: dict[str, Any]) -> bool:
    """Events and responses share the connection: an event has ``event`` and no ``id``."""
    return "event" in obj and "id" not in obj


def parse_event(obj: dict[str, Any]) -> Event | None:
    """The typed event, None for a kind this client does not know (a newer relay may push more);
    ProtocolError for a malformed one."""
    f = Fields(obj)
    kind = EVENT_TYPES.get(f.str("event", 32))
    return kind.from_wire(f) if kind is not None else None


def ok_response(rid: RequestId, result: Result) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": rid, "ok": True, **result.to_wire()}


def error_response(rid: RequestId | None, code: ErrorCode, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": rid, "ok": False, "error": {"code": code.value, "message": message}}


class RemoteError(MsgRelayError):
    """An error response from the relay, with its stable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


def parse_response(obj: dict[str, Any], op: str) -> Result:
    """The typed result of a response to ``op``; RemoteError for error responses."""
    f = Fields(obj, obj.get("id") if isinstance(obj.get("id"), (str, int)) else None)
    if f.bool("ok"):
        return RESULT_TYPES[op].from_wire(f)
    err = f.object("error")
    raise RemoteError(err.str("code", 64), err.str("message", 1024))


@functools.cache
def _page_frame_cost() -> int:
    """The answer of an empty page to request id 0, less that id: what a page costs beyond entries and id
    (worked out at the first page, not at import: making QueueResult then would undo @frozen's saving)."""
    return len(json.dumps(ok_response(0, QueueResult([], True, True)))) - len("0")


class QueuePage:
    """A ``queue`` answer being filled: entries are taken while they fit one frame of ``max_frame`` bytes,
    so the relay can read its store a few rows at a time and stop as soon as the frame is full.

    It is filled with entries' wire texts (:meth:`add_encoded`), which the relay made once when each
    message was stored (:meth:`encode`): a page is then sized by the texts' lengths and framed by joining
    them, with no entry encoded again."""

    class Encoded:
        """Entries as JSON text, which :func:`encode_response` puts in the frame as they are. Plain
        ``json.dumps`` refuses this (TypeError) rather than send the texts as JSON strings."""

        __slots__ = ("texts",)
        # encode_frame's settings, the encoder built once (json.dumps with arguments builds one per call)
        _json: ClassVar[json.JSONEncoder] = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

        def __init__(self, texts: list[str]) -> None:
            self.texts = texts  # each one JSON object made by QueuePage.encode (the store checks it on reading)

        def frame(self, response: dict[str, Any], max_frame: int) -> bytes:
            """The frame of ``response``, whose value this is for one field, byte for byte what
            :func:`encode_frame` makes of the entries' objects: the other fields through json.dumps,
            the texts between them; FrameError beyond ``max_frame``."""
            dumps = self._json.encode
            keys = list(response)
            at = next(i for i, key in enumerate(keys) if response[key] is self)
            head = dumps({key: response[key] for key in keys[:at]})[:-1]  # "{...", its "}" cut
            tail = dumps({key: response[key] for key in keys[at + 1:]})[1:]  # "...}", its "{" cut
            return frame("".join((head, "," if at else "", dumps(keys[at]), ":[", ",".join(self.texts), "]",
                                  "," if len(tail) > 1 else "", tail)).encode("utf-8"), max_frame)

    def __init__(self, rid: RequestId, max_frame: int, ranges: bool = False) -> None:
        self.ranges = ranges
        self.texts: list[str] = []
        self.budget = max_frame - _page_frame_cost() - len(json.dumps(rid)) - 16

    @staticmethod
    def encode(entry: QueueEntry) -> str:
        """``entry``'s wire text: ASCII (non-ASCII characters escaped), so its length is its size in a frame."""
        return json.dumps(entry.to_wire(), separators=(",", ":"))

    def add_encoded(self, text: str) -> bool:
        """Take an entry's wire text (:meth:`encode`) if it fits; False (nothing taken) once the frame is full."""
        size = len(text) + 1
        if size > self.budget:
            return False
        self.budget -= size
        self.texts.append(text)
        return True

    def result(self, more: bool) -> QueueResult:
        """The answer: its ``entries`` are empty and ``wire`` holds their texts. The relay only frames it
        (:func:`encode_response`), it never reads the entries."""
        return QueueResult([], more, self.ranges, QueuePage.Encoded(self.texts))


def encode_response(response: dict[str, Any], max_frame: int) -> tuple[bytes, FrameError | None]:
    """The frame for ``response``; one that would exceed the limit becomes a ``too_large`` error frame
    for the same request, so an answer that outgrew the frame never ends the session. A queue page of
    entries' texts (:class:`QueuePage.Encoded`) is framed without encoding them again."""
    try:
        messages = response.get("messages")
        if isinstance(messages, QueuePage.Encoded):
            return messages.frame(response, max_frame), None
        return encode_frame(response, max_frame), None
    except FrameError as exc:
        rid = response.get("id")
        message = f"the answer ({exc.message}) does not fit in a frame"
        return encode_frame(error_response(rid, ErrorCode.TOO_LARGE, message), max_frame), exc


# The widest request id a client may use (a 64-character string) and queue number: what a ``get``
# answer for a stored message can cost beyond the message itself.
_WIDEST_ID = "x" * 64


def served_size(submission: StoredMessage) -> int:
    """Bytes of the frame that serves ``submission`` back with ``get`` (the widest request id).

    The relay refuses a ``send`` whose answer could not fit: otherwise a message would be stored that
    its recipient can never read."""
    widest = dataclasses.replace(submission, num=MAX_INT, read=False)
    body = json.dumps(ok_response(_WIDEST_ID, GetResult(widest)), separators=(",", ":"), ensure_ascii=False)
    return len(body.encode("utf-8")) + 4
