"""A relay that lies, and messages built by hand: what the attacker tests (issue 9 §5) need.

:class:`HostileRelay` is a TLS 1.3 server on 127.0.0.1 (port 0) with the relay's own keystore
(``MSG_SERVER.p12`` of :func:`tests.harness.private_pki`), so clients accept it as their relay. It
keeps a small in-memory state and answers honestly by default (directory, CRLs, queue, get, send ...);
a test replaces the answer to any operation (``relay.answers[op] = fn``) or edits the state, and reads
``relay.requests`` to see what the client asked (was anything marked read?).

The ``forge_*`` helpers build sealed envelopes field by field. They use the envelope module's own
signing inputs and HPKE ``info`` labels, so a forged message differs from a genuine one only in what
the test changes; each attack test also shows that the honest variant of its construction is accepted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pki.files import load_crl_file
from pki.identity import cert_fingerprint, uid_of
from pki.keys import PrivateKey, sign
from pki.keystore import Keystore, load_keystore
from pki.tls import peer_certificate, server_context
from protocol import crls as crl_wire
from protocol import hpke
from protocol.encoding import format_time, pack, utc_now
from protocol.envelope import (
    ENVELOPE_V3,
    InnerMessage,
    Sealed,
    _header_signed,
    _info,
    _inner_v2_signed,
    ciphertext_digest,
)
from protocol.errors import ErrorCode
from protocol.frames import FrameDecoder, decode_payload
from protocol.keyrecord import KeyRecord
from protocol.messages import (
    REQUEST_TYPES,
    CrlListResult,
    DirectoryResult,
    GetResult,
    HelloResult,
    KeyRecordWire,
    MarkReadResult,
    PublishKeyResult,
    QueueResult,
    SendResult,
    StoredMessage,
    error_response,
    ok_response,
)
from protocol.receipts import Receipt

CLOSE = object()  # an answer that closes the connection instead of answering
DEAF = object()  # an answer that stops reading the connection (and answering) until the relay stops


@dataclasses.dataclass(frozen=True)
class Later:
    """An answer sent only after ``seconds``: a client that waits forever gets it, one that gives up
    in time does not (so a test of the time limit fails instead of hanging when the limit is gone)."""

    seconds: float
    answer: Any
FRAME_CEILING = 1 << 22  # the hostile relay writes frames up to this size (clients must refuse them)

Answer = Any  # a Result, a response dict, raw bytes, CLOSE, Later, None (no answer) or a list of these


def _frame(obj: dict) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return len(body).to_bytes(4, "big") + body


class HostileRelay:
    """A relay under the test's control; ``with HostileRelay(directory) as relay:`` stops it afterwards.

    ``directory`` is a :func:`private_pki` directory: the relay's keystore, the CA's ``crl.pem`` (served
    through ``crls``/``crl`` unless ``served_crls`` is replaced) and the users' keystores, which
    :meth:`enroll` puts into the directory.
    """

    def __init__(self, directory: Path, *, max_frame: int = 9999) -> None:
        self.directory = directory
        self.keystore: Keystore = load_keystore(directory / "MSG_SERVER.p12")
        self.anchors = self.keystore.ca_certificates()
        self.tls_crls = load_crl_file(directory / "ca" / "crl.pem")
        self.served_crls: list[bytes] = [c.public_bytes(Encoding.DER) for c in self.tls_crls]
        self.max_frame = max_frame
        self.signer = cert_fingerprint(self.keystore.cert)
        self.chains: dict[str, list[bytes]] = {}  # uid -> current chain (DER, leaf first)
        self.by_fingerprint: dict[bytes, tuple[str, list[bytes]]] = {}
        self.keys: dict[str, KeyRecordWire] = {}
        self.messages: dict[tuple[str, int], StoredMessage] = {}
        self.answers: dict[str, Callable[[dict, str], Answer]] = {}
        self.requests: list[tuple[str, dict]] = []  # (peer uid, request) in arrival order
        self.add_certificate("MSG_SERVER", [self.keystore.cert, *self.keystore.intermediates()], current=False)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "HostileRelay":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(20)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(20)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        ctx = server_context(self.keystore, self.anchors, self.tls_crls)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ctx)

    async def _stop(self) -> None:
        assert self._server is not None
        self._stopping.set()
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        await self._server.wait_closed()

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    # ------------------------------------------------------------------------------- state
    def add_certificate(self, uid: str, chain: list[x509.Certificate], current: bool = True) -> bytes:
        der = [c.public_bytes(Encoding.DER) for c in chain]
        fingerprint = cert_fingerprint(der[0])
        self.by_fingerprint[fingerprint] = (uid, der)
        if current:
            self.chains[uid] = der
        return fingerprint

    def enroll(self, *uids: str) -> None:
        """Users of the PKI directory, as the real relay enrolls them from ``--users-dir``."""
        for uid in uids:
            store = load_keystore(self.directory / f"{uid}.p12")
            self.add_certificate(uid, [store.cert, *store.intermediates()])

    def receipt(self, sender: str, recipient: str, msg_id: str, sealed: Sealed, num: int,
                server_time: dt.datetime | None = None, key: PrivateKey | None = None,
                signer: bytes | None = None) -> Receipt:
        """A receipt as the relay signs it (or as ``key`` signs it, naming ``signer``)."""
        unsigned = Receipt(msg_id, sender, recipient, ciphertext_digest(sealed), server_time or utc_now(), num)
        return unsigned.signed_by(key or self.keystore.key, self.signer if signer is None else signer)

    def store(self, recipient: str, sender: str, msg_id: str, sealed: Sealed, *, num: int | None = None,
              sender_cert: bytes | None = None, receipt: Receipt | None = None) -> StoredMessage:
        """Put a message into ``recipient``'s queue with an honest receipt unless ``receipt`` is given."""
        if num is None:
            num = 1 + max((n for (u, n) in self.messages if u == recipient), default=0)
        if sender_cert is None:
            sender_cert = cert_fingerprint(self.chains[sender][0])
        receipt = receipt or self.receipt(sender, recipient, msg_id, sealed, num)
        msg = StoredMessage(num, sender, recipient, msg_id, receipt.server_time, sealed.version, sealed.header,
                            sealed.envelope, receipt, sender_cert)
        self.messages[(recipient, num)] = msg
        return msg

    def replace(self, recipient: str, num: int, **changes: Any) -> StoredMessage:
        msg = dataclasses.replace(self.messages[(recipient, num)], **changes)
        self.messages[(recipient, num)] = msg
        return msg

    def ops(self, op: str, uid: str | None = None) -> list[dict]:
        """The requests of one operation the relay received (from ``uid``, if given)."""
        return [r for u, r in self.requests if r.get("op") == op and (uid is None or u == uid)]

    # ------------------------------------------------------------------------------- answers
    def honest(self, obj: dict, uid: str) -> Answer:
        """What an honest relay answers (from this relay's state)."""
        op, f = obj.get("op"), obj
        if op == "hello":
            return HelloResult(self.max_frame, tuple(REQUEST_TYPES))
        if op == "crls":
            return CrlListResult([crl_wire.describe(x509.load_der_x509_crl(d))[0] for d in self.served_crls])
        if op == "crl":
            for der in self.served_crls:
                info, _ = crl_wire.describe(x509.load_der_x509_crl(der))
                if info.digest.hex() == _b64hex(f["digest"]):
                    found = crl_wire.piece(der, info.digest, f.get("offset", 0), self.max_frame)
                    if found is not None:
                        return found
            return error_response(f.get("id"), ErrorCode.UNKNOWN_MESSAGE, "no such CRL piece")
        if op == "directory":
            wanted = f.get("fingerprint")
            if wanted:
                owner, chain = self.by_fingerprint.get(bytes.fromhex(_b64hex(wanted)), (None, []))
                if owner != f["uid"]:
                    return error_response(f.get("id"), ErrorCode.UNKNOWN_USER, f"unknown user {f['uid']}")
            elif f["uid"] in self.chains:
                chain = self.chains[f["uid"]]
            else:
                return error_response(f.get("id"), ErrorCode.UNKNOWN_USER, f"unknown user {f['uid']}")
            return DirectoryResult(f["uid"], chain, self.keys.get(f["uid"]))
        if op == "publish_key":
            self.keys[uid] = KeyRecordWire(_b64(f["record"]), _b64(f["signature"]))
            return PublishKeyResult()
        if op == "queue":
            mine = sorted((m for (u, _), m in self.messages.items() if u == uid and not m.read), key=lambda m: m.num)
            return QueueResult([m.entry() for m in mine if m.num > f.get("after", 0)], False)
        if op == "get":
            msg = self.messages.get((uid, f["num"]))
            if msg is None:
                return error_response(f.get("id"), ErrorCode.UNKNOWN_MESSAGE, f"no message number {f['num']}")
            return GetResult(msg)
        if op == "mark_read":
            if (uid, f["num"]) not in self.messages:
                return error_response(f.get("id"), ErrorCode.UNKNOWN_MESSAGE, f"no message number {f['num']}")
            self.replace(uid, f["num"], read=True)
            return MarkReadResult()
        if op == "send":
            sealed = Sealed(f["envelope_version"], _b64(f["header"]), _b64(f["envelope"]))
            msg = self.store(f["to"], uid, f["msg_id"], sealed)
            return SendResult(msg.receipt)
        return error_response(f.get("id"), ErrorCode.BAD_REQUEST, f"unknown operation {op!r}")

    def _encode(self, obj: dict, answer: Answer) -> bytes:
        if answer is None:
            return b""
        if isinstance(answer, list):
            return b"".join(self._encode(obj, a) for a in answer)
        if isinstance(answer, bytes):
            return answer
        if isinstance(answer, dict):
            return _frame(answer)
        return _frame(ok_response(obj.get("id"), answer))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        cert = peer_certificate(writer.get_extra_info("ssl_object"))
        uid = (uid_of(cert) if cert is not None else None) or "?"
        decoder = FrameDecoder(FRAME_CEILING)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for payload in decoder.feed(data):
                    obj = decode_payload(payload)
                    self.requests.append((uid, obj))
                    answer = self.answers.get(str(obj.get("op")), self.honest)(obj, uid)
                    if isinstance(answer, Later):
                        await asyncio.sleep(answer.seconds)
                        answer = answer.answer
                    if answer is CLOSE:
                        return
                    if answer is DEAF:
                        # A small receive buffer, kept small (no autotuning): a flood fills it, and the
                        # client's own send buffer, within a few megabytes.
                        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                        await self._stopping.wait()
                        return
                    writer.write(self._encode(obj, answer))
                    await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def _b64hex(text: str) -> str:
    return _b64(text).hex()


# ----------------------------------------------------------------------------------- forging
def forge_sealed(record: KeyRecord, *, sender: str, recipient: str, msg_id: str, subject: str = "subject",
                 body: bytes = b"body", sent_at: dt.datetime | None = None, inner_signer: PrivateKey,
                 subject_signer: PrivateKey | None = None, inner: dict[str, Any] | None = None,
                 header_subject: str | None = None, plain: bytes | None = None, version: int = ENVELOPE_V3,
                 key_id: bytes | None = None) -> Sealed:
    """A version-3 envelope built field by field, sealed to ``record``.

    ``sender``/``recipient``/``msg_id`` are what the relay attributes it to (the HPKE ``info``).
    The inner message defaults to the same values; ``inner`` overrides its fields (``from``, ``to``,
    ``msg_id``, ``sent_at``, ``subject``, ``body``). ``inner_signer`` signs the inner message and
    ``subject_signer`` (default: the same key) the sealed subject, ``header_subject`` (default: the
    inner subject). ``plain`` replaces the sealed inner bytes altogether.
    """
    fields = {"from": sender, "to": recipient, "msg_id": msg_id, "sent_at": sent_at or utc_now(),
              "subject": subject, "body": body, **(inner or {})}
    im = InnerMessage(fields["from"], fields["to"], fields["msg_id"], fields["sent_at"], fields["subject"],
                      fields["body"])
    ids = (sender, recipient, msg_id)
    kid = key_id if key_id is not None else bytes.fromhex(record.key_id)
    shown = im.subject if header_subject is None else header_subject
    subject_signature = sign(subject_signer or inner_signer, _header_signed(sender, recipient, msg_id, shown))
    header = kid + hpke.seal(record.kem, record.public_key, pack(shown.encode(), subject_signature),
                             _info("header", *ids))
    if plain is None:
        plain = pack(im.sender.encode(), im.recipient.encode(), im.msg_id.encode(), format_time(im.sent_at).encode(),
                     im.subject.encode(), im.body, sign(inner_signer, _inner_v2_signed(im)))
    envelope = kid + hpke.seal(record.kem, record.public_key, plain, _info("body", *ids))
    return Sealed(version, header, envelope)
