"""Typed requests and responses of the relay protocol (DESIGN.md §3, §4).

On the wire every request is ``{"v": 1, "id": ..., "op": ..., <fields>}`` and every response
``{"v": 1, "id": ..., "ok": true, <fields>}`` or ``{"v": 1, "id": ..., "ok": false, "error":
{"code": ..., "message": ...}}``. Binary values are standard padded base64.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from pki.errors import MsgRelayError

from . import PROTOCOL_VERSION
from .encoding import b64e, format_time, parse_time
from .errors import ErrorCode, ProtocolError
from .fields import Fields
from .receipts import Receipt

RequestId = Union[str, int]
MAX_HEADER = 4096      # sealed subject
MAX_ENVELOPE = 8192    # sealed message; the frame limit is usually the tighter bound
MAX_SIGNATURE = 1024   # RSA-4096 is 512 bytes
MAX_CHAIN = 8
MAX_CERT = 8192
MAX_CRL = 65536


def _request_id(obj: dict[str, Any]) -> RequestId:
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "missing or invalid request 'id' (string or integer)")
    if isinstance(rid, str) and len(rid) > 64 or isinstance(rid, int) and not 0 <= rid < 2**53:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "request 'id' out of range")
    return rid


# --------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
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


@dataclass(frozen=True)
class QueueRequest:
    """List the caller's unread messages with a number above ``after`` (one page)."""

    op: ClassVar[str] = "queue"
    id: RequestId
    after: int = 0

    def fields(self) -> dict[str, Any]:
        return {"after": self.after}

    @classmethod
    def parse(cls, rid: RequestId, f: Fields) -> "QueueRequest":
        return cls(rid, f.int("after") if f.has("after") else 0)


@dataclass(frozen=True)
class GetRequest:
    op: ClassVar[str] = "get"
    id: RequestId
    num: int

    def fields(self) -> dict[str, Any]:
        return {"num": self.num}

    @classmethod
    def parse(cls, rid: RequestId, f: Fields) -> "GetRequest":
        return cls(rid, f.int("num", 1))


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


Request = Union[SendRequest, QueueRequest, GetRequest, DirectoryRequest, PublishKeyRequest]
REQUEST_TYPES: dict[str, Any] = {t.op: t for t in (SendRequest, QueueRequest, GetRequest, DirectoryRequest,
                                                   PublishKeyRequest)}


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
@dataclass(frozen=True)
class QueueEntry:
    num: int
    sender: str
    msg_id: str
    server_time: dt.datetime
    envelope_version: int
    header: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"num": self.num, "from": self.sender, "msg_id": self.msg_id,
                "server_time": format_time(self.server_time), "envelope_version": self.envelope_version,
                "header": b64e(self.header)}

    @classmethod
    def from_wire(cls, f: Fields) -> "QueueEntry":
        return cls(f.int("num", 1), f.uid("from"), f.msg_id(), parse_time(f.str("server_time", 40)),
                   f.int("envelope_version", 1, 255), f.bytes("header", MAX_HEADER))


@dataclass(frozen=True)
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
        return QueueEntry(self.num, self.sender, self.msg_id, self.server_time, self.envelope_version, self.header)

    def to_wire(self) -> dict[str, Any]:
        return {**self.entry().to_wire(), "to": self.recipient,
                "envelope": b64e(self.envelope), "receipt": self.receipt.to_wire(),
                "sender_cert": b64e(self.sender_cert), "read": self.read}

    @classmethod
    def from_wire(cls, f: Fields) -> "StoredMessage":
        e = QueueEntry.from_wire(f)
        return cls(e.num, e.sender, f.uid("to"), e.msg_id, e.server_time, e.envelope_version, e.header,
                   f.bytes("envelope", MAX_ENVELOPE), Receipt.from_wire(f.object("receipt")),
                   f.bytes("sender_cert", 32), f.bool("read"))


@dataclass(frozen=True)
class SendResult:
    receipt: Receipt

    def to_wire(self) -> dict[str, Any]:
        return {"receipt": self.receipt.to_wire()}

    @classmethod
    def from_wire(cls, f: Fields) -> "SendResult":
        return cls(Receipt.from_wire(f.object("receipt")))


@dataclass(frozen=True)
class QueueResult:
    entries: list[QueueEntry]
    more: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"messages": [e.to_wire() for e in self.entries], "more": self.more}

    @classmethod
    def from_wire(cls, f: Fields) -> "QueueResult":
        items = f.list("messages", 10_000)
        entries = []
        for item in items:
            if not isinstance(item, dict):
                raise f.fail("queue entries must be objects")
            entries.append(QueueEntry.from_wire(Fields(item, f.request_id)))
        return cls(entries, f.bool("more"))


@dataclass(frozen=True)
class GetResult:
    message: StoredMessage

    def to_wire(self) -> dict[str, Any]:
        return {"message": self.message.to_wire()}

    @classmethod
    def from_wire(cls, f: Fields) -> "GetResult":
        return cls(StoredMessage.from_wire(f.object("message")))


@dataclass(frozen=True)
class KeyRecordWire:
    """A published encryption key record as stored: its canonical bytes and the owner's signature."""

    record: bytes
    signature: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"record": b64e(self.record), "signature": b64e(self.signature)}

    @classmethod
    def from_wire(cls, f: Fields) -> "KeyRecordWire":
        return cls(f.bytes("record", 4096), f.bytes("signature", MAX_SIGNATURE))


@dataclass(frozen=True)
class DirectoryResult:
    """A user's certificate chain (DER, leaf first), published key record and the CA's CRLs (DER)."""

    uid: str
    chain: list[bytes]
    key: KeyRecordWire | None = None
    crls: list[bytes] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {"uid": self.uid, "chain": [b64e(c) for c in self.chain],
                "key": self.key.to_wire() if self.key else None, "crls": [b64e(c) for c in self.crls]}

    @classmethod
    def from_wire(cls, f: Fields) -> "DirectoryResult":
        chain = [Fields({"c": c}).bytes("c", MAX_CERT) for c in f.list("chain", MAX_CHAIN)]
        crls = [Fields({"c": c}).bytes("c", MAX_CRL) for c in f.list("crls", 4)] if f.has("crls") else []
        key = KeyRecordWire.from_wire(f.object("key")) if f.has("key") else None
        return cls(f.uid("uid"), chain, key, crls)


@dataclass(frozen=True)
class PublishKeyResult:
    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, f: Fields) -> "PublishKeyResult":
        return cls()


Result = Union[SendResult, QueueResult, GetResult, DirectoryResult, PublishKeyResult]
RESULT_TYPES: dict[str, Any] = {"send": SendResult, "queue": QueueResult, "get": GetResult,
                                "directory": DirectoryResult, "publish_key": PublishKeyResult}


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


def queue_page(entries: list[QueueEntry], rid: RequestId, max_frame: int, exhausted: bool = True) -> QueueResult:
    """As many entries as fit in one frame; ``more`` tells the client to ask again after the last.

    ``exhausted`` says whether ``entries`` are all there is (else a full page still has ``more``)."""
    budget = max_frame - len(json.dumps(ok_response(rid, QueueResult([], True)))) - 16
    taken: list[QueueEntry] = []
    for e in entries:
        size = len(json.dumps(e.to_wire(), separators=(",", ":"))) + 1
        if size > budget:
            return QueueResult(taken, True)
        budget -= size
        taken.append(e)
    return QueueResult(taken, not exhausted)
