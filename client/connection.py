"""``RelayClient``: the async client library the CLI and the tests use.

One TLS connection, reused for every request; requests may be pipelined. Every failure surfaces as
a :class:`ClientError` with one readable line (the CLI prints it as is).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any

from cryptography import x509

from pki.errors import MsgRelayError, ValidationError
from pki.identity import DEFAULT_ORG_UNIT
from pki.keystore import Keystore
from pki.tls import client_context, peer_certificate
from pki.validation import check_profile
from protocol.envelope import Sealed, sign_submission
from protocol.errors import ErrorCode, FrameError
from protocol.frames import MAX_FRAME, FrameDecoder, decode_payload, encode_frame
from protocol.messages import (
    DirectoryRequest,
    DirectoryResult,
    GetRequest,
    GetResult,
    PublishKeyRequest,
    QueueEntry,
    QueueRequest,
    QueueResult,
    RemoteError,
    Request,
    Result,
    SendRequest,
    SendResult,
    StoredMessage,
    parse_response,
    request_to_wire,
)
from protocol.receipts import Receipt

# TLS alerts a server sends when it refuses our certificate, as OpenSSL names them.
_REJECTION_ALERTS = {
    "CERTIFICATE_REQUIRED": "no client certificate",
    "CERTIFICATE_REVOKED": "certificate revoked",
    "CERTIFICATE_EXPIRED": "certificate expired",
    "UNKNOWN_CA": "certificate from an unknown CA",
    "CERTIFICATE_UNKNOWN": "certificate not accepted",
    "BAD_CERTIFICATE": "bad certificate",
    "UNSUPPORTED_CERTIFICATE": "unsupported certificate",
    "DECRYPT_ERROR": "certificate signature check failed",
}


class ClientError(MsgRelayError):
    """A failure to show the user as one line."""


class ServerRejected(ClientError):
    """The relay refused our certificate (surfaces on the first read under TLS 1.3)."""


def _rejection(exc: ssl.SSLError) -> ServerRejected | None:
    reason = (exc.reason or "").upper()
    for alert, text in _REJECTION_ALERTS.items():
        if alert in reason:
            return ServerRejected(f"the relay rejected our certificate ({text})")
    return None


class RelayClient:
    def __init__(self, keystore: Keystore, host: str, port: int, anchors: Sequence[x509.Certificate],
                 crls: Sequence[x509.CertificateRevocationList] = (), *, org_unit: str | None = DEFAULT_ORG_UNIT,
                 max_frame: int = MAX_FRAME, timeout: float = 30.0) -> None:
        self.keystore = keystore
        self.host, self.port = host, port
        self.anchors, self.crls = list(anchors), list(crls)
        self.org_unit = org_unit
        self.max_frame = max_frame
        self.timeout = timeout
        self.server_cert: x509.Certificate | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = FrameDecoder(max_frame)
        self._inflight: deque[tuple[Request, asyncio.Future[dict[str, Any]]]] = deque()
        self._reader_task: asyncio.Task[None] | None = None
        self._broken: ClientError | None = None
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._answered = False
        self._ctx = client_context(keystore, self.anchors, self.crls)

    @property
    def uid(self) -> str:
        assert self.keystore.uid is not None
        return self.keystore.uid

    async def __aenter__(self) -> "RelayClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self._ctx, server_hostname=self.host,
                                        limit=self.max_frame + 8), self.timeout)
        except ssl.SSLCertVerificationError as exc:
            raise ClientError(f"server certificate rejected: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise (_rejection(exc) or ClientError(f"TLS handshake with {self.host}:{self.port} failed "
                                                  f"({exc.reason or exc})")) from None
        except (asyncio.TimeoutError, TimeoutError):
            raise ClientError(f"relay at {self.host}:{self.port} did not answer in time") from None
        except OSError as exc:
            raise ClientError(f"cannot reach the relay at {self.host}:{self.port} ({exc.strerror or exc})") from None
        assert self._writer is not None
        cert = peer_certificate(self._writer.get_extra_info("ssl_object"))
        try:
            if cert is None:
                raise ValidationError("no_certificate", "the relay sent no certificate")
            check_profile(cert, "server", self.org_unit)
        except ValidationError as exc:
            await self.close()
            raise ClientError(f"server certificate rejected: {exc}") from None
        self.server_cert = cert

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            self._reader_task = None
        self._fail_all(ClientError("connection closed"))
        if self._writer is not None:
            self._writer.close()
            try:
                await asyncio.wait_for(self._writer.wait_closed(), 2)
            except (OSError, ssl.SSLError, asyncio.TimeoutError):
                pass  # closing anyway
            self._writer = None

    # ---------------------------------------------------------------------------------- framing
    # Requests may be in flight together on the one connection; the relay answers in order, so a
    # single reader task hands each response to the oldest waiting request.

    def _lost(self, detail: str) -> ClientError:
        if not self._answered:
            # TLS 1.3: the server checks our certificate after our side of the handshake is done, so
            # its refusal (an alert, or just a close) arrives on our first read.
            return ServerRejected(f"the relay did not accept our certificate ({detail})")
        return ClientError(f"connection to the relay lost ({detail})")

    def _fail_all(self, exc: ClientError) -> None:
        self._broken = self._broken or exc
        while self._inflight:
            fut = self._inflight.popleft()[1]
            if not fut.done():
                fut.set_exception(exc)

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                try:
                    data = await self._reader.read(65536)
                except ssl.SSLError as exc:
                    raise (_rejection(exc) or self._lost(f"TLS error: {exc.reason or exc}")) from None
                except OSError as exc:
                    raise self._lost(exc.strerror or str(exc)) from None
                if not data:
                    raise self._lost("connection closed")
                try:
                    for payload in self._decoder.feed(data):
                        self._dispatch(decode_payload(payload))
                except FrameError as exc:
                    raise ClientError(f"bad response from the relay: {exc.message}") from None
        except ClientError as exc:
            self._fail_all(exc)

    def _dispatch(self, obj: dict[str, Any]) -> None:
        if obj.get("id") is None and obj.get("ok") is False:
            err: dict[str, Any] = obj["error"] if isinstance(obj.get("error"), dict) else {}
            msg = str(err.get("message", "request refused"))
            if err.get("code") == ErrorCode.NOT_AUTHORISED.value:
                raise ServerRejected(f"the relay rejected our certificate: {msg}")
            raise ClientError(f"the relay refused the connection: {msg}")
        if not self._inflight:
            raise ClientError("the relay sent a response nobody asked for")
        req, fut = self._inflight.popleft()
        if obj.get("id") != req.id:
            raise ClientError("the relay answered out of order")
        self._answered = True
        if not fut.done():
            fut.set_result(obj)

    async def _submit(self, requests: Sequence[Request]) -> list[asyncio.Future[dict[str, Any]]]:
        if self._broken is not None:
            raise self._broken
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        loop = asyncio.get_running_loop()
        if self._reader_task is None:
            self._reader_task = loop.create_task(self._read_loop())
        futures = []
        try:
            frames = [encode_frame(request_to_wire(req), self.max_frame) for req in requests]
        except FrameError as exc:
            raise ClientError(f"request too large: {exc.message}") from None
        async with self._write_lock:
            for req, frame in zip(requests, frames, strict=True):
                fut: asyncio.Future[dict[str, Any]] = loop.create_future()
                self._inflight.append((req, fut))
                futures.append(fut)
                self._writer.write(frame)
            try:
                await self._writer.drain()
            except (OSError, ssl.SSLError) as exc:
                self._fail_all(self._lost(str(exc)))
        return futures

    async def _wait(self, fut: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise ClientError("the relay did not answer in time") from None

    async def request(self, req: Request) -> Result:
        (fut,) = await self._submit([req])
        return parse_response(await self._wait(fut), req.op)

    async def pipeline(self, requests: Sequence[Request]) -> list[Result | RemoteError | ClientError]:
        """Send all requests at once, then collect the outcomes in order: a result, the relay's error,
        or (for requests the connection was lost before answering) a ClientError."""
        results: list[Result | RemoteError | ClientError] = []
        for req, fut in zip(requests, await self._submit(requests), strict=True):
            try:
                results.append(parse_response(await self._wait(fut), req.op))
            except (RemoteError, ClientError) as exc:
                results.append(exc)
        return results

    def next_id(self) -> int:
        return next(self._ids)

    # ------------------------------------------------------------------------------- operations
    def send_request(self, to: str, msg_id: str, sealed: Sealed) -> SendRequest:
        signature = sign_submission(self.keystore.key, to, msg_id, sealed)
        return SendRequest(self.next_id(), to, msg_id, sealed.version, sealed.header, sealed.envelope, signature)

    async def send(self, to: str, msg_id: str, sealed: Sealed) -> Receipt:
        result = await self.request(self.send_request(to, msg_id, sealed))
        assert isinstance(result, SendResult)
        return result.receipt

    async def queue(self) -> list[QueueEntry]:
        entries: list[QueueEntry] = []
        after = 0
        while True:
            page = await self.request(QueueRequest(self.next_id(), after))
            assert isinstance(page, QueueResult)
            entries += page.entries
            if not page.more or not page.entries:
                return entries
            after = page.entries[-1].num

    async def get(self, num: int) -> StoredMessage:
        result = await self.request(GetRequest(self.next_id(), num))
        assert isinstance(result, GetResult)
        return result.message

    async def directory(self, uid: str, fingerprint: bytes | None = None) -> DirectoryResult:
        result = await self.request(DirectoryRequest(self.next_id(), uid, fingerprint))
        assert isinstance(result, DirectoryResult)
        return result

    async def publish_key(self, record: bytes, signature: bytes) -> None:
        await self.request(PublishKeyRequest(self.next_id(), record, signature))
