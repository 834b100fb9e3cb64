"""``RelayOperations``: what a client asks the relay and how it checks the answers, whatever carries them.

Requests may be pipelined on the one connection; the relay answers in order, so each answer goes to the
oldest request waiting. The transport (how frames are written and read, how a request waits for its
answer) is a subclass's: :class:`client.connection.RelayClient` on asyncio (``watch``, tests, library
users), :class:`client.blocking.BlockingRelayClient` on a plain blocking socket for one-shot commands
(no event loop to import and start). Every failure surfaces as a :class:`ClientError` with one
readable line.
"""

from __future__ import annotations

import abc
import itertools
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol, Self

from cryptography import x509

from pki.errors import ValidationError
from pki.identity import DEFAULT_ORG_UNIT
from pki.keystore import Keystore
from pki.tls import client_context
from pki.validation import check_profile
from protocol.crls import CrlAssembler, piece_request_offsets
from protocol.envelope import Sealed, sign_submission
from protocol.errors import ErrorCode, FrameError, ProtocolError
from protocol.frames import MAX_FRAME, FrameDecoder, decode_payload, encode_frame
from protocol.messages import (
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
    MarkReadRequest,
    PublishKeyRequest,
    QueuedEvent,
    QueueEntry,
    QueueRequest,
    QueueResult,
    RemoteError,
    Request,
    Result,
    SendRequest,
    SendResult,
    StoredMessage,
    SubscribeRequest,
    is_event,
    parse_event,
    parse_response,
    request_to_wire,
)
from protocol.receipts import Receipt

from .errors import ClientError, ConnectionLost, ServerRejected, rejection

CRL_WINDOW = 32  # CRL pieces requested at once

# A bound on what a relay can make us hold, whatever its pages say (a relay's own --max-unread is 10 000).
MAX_QUEUE_ENTRIES = 100_000
# Queue ranges asked for at once: the first window, doubled while the queue goes on, up to the most. A relay
# decodes 32 requests ahead: with more in flight it prepares the next pages while we read the last ones.
QUEUE_WINDOW = 32
QUEUE_WINDOW_MAX = 128


class Answer(Protocol):
    """Where a request's answer lands: an asyncio future, or the blocking client's :class:`Pending`."""

    def done(self) -> bool: ...

    def set_result(self, result: dict[str, Any]) -> None: ...

    def set_exception(self, exception: BaseException) -> None: ...


def _advancing(page: QueueResult, after: int, upto: int | None) -> list[QueueEntry]:
    """The page's entries, after checking that their numbers go up strictly from ``after`` and stay at most
    ``upto``: a relay that repeats a page, goes back or strays out of the range cannot keep us fetching."""
    for entry in page.entries:
        if entry.num <= after:
            raise ClientError("bad response from the relay: queue pages do not advance")
        if upto is not None and entry.num > upto:
            raise ClientError("bad response from the relay: queue entries outside the range asked for")
        after = entry.num
    return page.entries


def _check_queue_size(n: int) -> None:
    if n > MAX_QUEUE_ENTRIES:
        raise ClientError(f"bad response from the relay: more than {MAX_QUEUE_ENTRIES} unread messages listed")


class RelayOperations(abc.ABC):
    def __init__(self, keystore: Keystore, host: str, port: int, anchors: Sequence[x509.Certificate],
                 crls: Sequence[x509.CertificateRevocationList] = (), *, org_unit: str | None = DEFAULT_ORG_UNIT,
                 max_frame: int = MAX_FRAME, timeout: float = 30.0,
                 other_nodes: Sequence[tuple[str, int]] = ()) -> None:
        """``other_nodes``: further relay nodes of the same cluster, tried in turn when one is down."""
        self.keystore = keystore
        self.host, self.port = host, port
        self.nodes = [(host, port), *other_nodes]
        self.anchors, self.crls = list(anchors), list(crls)
        self.org_unit = org_unit
        self.max_frame = self._default_max_frame = max_frame
        self.timeout = timeout
        self.server_cert: x509.Certificate | None = None
        self._decoder = FrameDecoder(max_frame)
        self._inflight: deque[tuple[Request, Answer]] = deque()
        self._broken: ClientError | None = None
        self._ids = itertools.count(1)
        self._answered = False
        self._ctx = client_context(keystore, self.anchors, self.crls)
        # Live delivery: the newest queue number the relay announced (events coalesce into it).
        self.queued_num = 0

    @property
    def uid(self) -> str:
        assert self.keystore.uid is not None
        return self.keystore.uid

    # ------------------------------------------------------------------------- the transport's part
    @abc.abstractmethod
    async def _open(self) -> x509.Certificate | None:
        """Connect to ``self.host:self.port`` and complete the TLS handshake (OpenSSL checks the relay's
        chain and our CRLs): the relay's certificate, or the ClientError of a failure."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def _submit(self, requests: Sequence[Request]) -> list[Answer]:
        """Write the requests (pipelined) and return where each one's answer will land."""

    @abc.abstractmethod
    async def _wait(self, answer: Answer) -> dict[str, Any]:
        """The answer, once it has come: a lost connection or ``self.timeout`` without it raise
        ConnectionLost (a send is then retried, same msg_id, through the next node)."""

    def _announce(self) -> None:  # noqa: B027  (a client nobody waits on for events does nothing)
        """A number was announced or the connection broke: wake whoever waits for events (if anyone can)."""

    async def wait_queued(self, after: int, timeout: float) -> bool:
        """Wait until the relay announces a message numbered above ``after`` (live delivery)."""
        raise ClientError("live delivery needs the asyncio client (client.connection.RelayClient)")

    # ------------------------------------------------------------------------------- connection
    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect to the first node that answers, starting with the current one."""
        for _ in range(len(self.nodes) - 1):
            try:
                return await self._connect_one()
            except ConnectionLost:
                self._next_node()
        await self._connect_one()

    def _next_node(self) -> None:
        i = self.nodes.index((self.host, self.port))
        self.host, self.port = self.nodes[(i + 1) % len(self.nodes)]

    async def failover(self) -> None:
        """After a lost connection: the same client on the next node (fresh connection state)."""
        await self.close()
        self._broken = None
        self._answered = False
        self._decoder = FrameDecoder(self._default_max_frame)
        self._next_node()
        await self.connect()

    async def _connect_one(self) -> None:
        """The current node, its certificate checked (the connection closed if it does not do), hello said."""
        self._decoder.max_size = self.max_frame = self._default_max_frame  # a new node: its hello says anew
        cert = await self._open()
        try:
            self._check_server(cert)
        except ClientError:
            await self.close()
            raise
        await self._say_hello()

    def _check_server(self, cert: x509.Certificate | None) -> None:
        """The relay's certificate after the handshake: the MSG_SERVER profile (OpenSSL checked the chain)."""
        try:
            if cert is None:
                raise ValidationError("no_certificate", "the relay sent no certificate")
            check_profile(cert, "server", self.org_unit)
        except ValidationError as exc:
            raise ClientError(f"server certificate rejected: {exc}") from None
        self.server_cert = cert

    async def _say_hello(self) -> None:
        """Pipelined ahead of whatever comes next: costs no round trip, and its answer (the relay's frame
        limit) is read before any answer that may need it. Nobody waits for it."""
        await self._submit([HelloRequest(self.next_id())])

    # ---------------------------------------------------------------------------------- framing
    def _lost(self, detail: str) -> ClientError:
        if not self._answered:
            # TLS 1.3: the server checks our certificate after our side of the handshake is done, so
            # its refusal (an alert, or just a close) arrives on our first read.
            return ServerRejected(f"the relay did not accept our certificate ({detail})")
        return ConnectionLost(f"connection to the relay lost ({detail})")

    def _read_failure(self, exc: OSError) -> ClientError:
        """The one line for a connection that failed under a read or a write: the relay's certificate alert
        when it sent one, else a lost connection (or, before any answer, a refusal of our certificate)."""
        if isinstance(exc, ssl.SSLError):
            return rejection(exc) or self._lost(f"TLS error: {exc.reason or exc}")
        return self._lost(exc.strerror or str(exc))

    def _write_failure(self, exc: OSError) -> ClientError:
        """The one line for requests the relay did not take: in time, or at all."""
        if isinstance(exc, TimeoutError):
            return ConnectionLost("the relay did not take our requests in time")
        return self._read_failure(exc)

    def _fail_all(self, exc: ClientError) -> None:
        self._broken = self._broken or exc
        self._announce()  # a watcher waiting for events learns of the loss at once
        while self._inflight:
            answer = self._inflight.popleft()[1]
            if not answer.done():
                answer.set_exception(exc)

    def _received(self, data: bytes) -> None:
        """Bytes from the relay (none: it closed the connection): each complete frame goes to its request
        (or is an event)."""
        if not data:
            raise self._lost("connection closed")
        try:
            # One frame at a time: a hello answer raises the frame limit before the next is read.
            self._decoder.receive(data)
            while (payload := self._decoder.next_payload()) is not None:
                self._dispatch(decode_payload(payload))
        except FrameError as exc:
            raise ClientError(f"bad response from the relay: {exc.message}") from None

    def _dispatch(self, obj: dict[str, Any]) -> None:
        if is_event(obj):
            self._on_event(obj)
            return
        if obj.get("id") is None and obj.get("ok") is False:
            err: dict[str, Any] = obj["error"] if isinstance(obj.get("error"), dict) else {}
            msg = str(err.get("message", "request refused"))
            if err.get("code") == ErrorCode.NOT_AUTHORISED.value:
                raise ServerRejected(f"the relay refused our certificate: {msg}")
            raise ClientError(f"the relay refused the connection: {msg}")
        if not self._inflight:
            raise ClientError("the relay sent a response nobody asked for")
        req, answer = self._inflight.popleft()
        if obj.get("id") != req.id:
            wrong = ClientError("the relay answered out of order")
            if not answer.done():
                answer.set_exception(wrong)  # the request that got it learns why at once, not at its timeout
            raise wrong
        self._answered = True
        if isinstance(req, HelloRequest):
            self._adopt(obj)
        if not answer.done():
            answer.set_result(obj)

    def _on_event(self, obj: dict[str, Any]) -> None:
        """An event the relay pushed: only a number is kept, whatever the relay sends and how often."""
        try:
            event = parse_event(obj)
        except ProtocolError as exc:
            raise ClientError(f"bad event from the relay: {exc.message}") from None
        if isinstance(event, QueuedEvent) and event.num > self.queued_num:
            self.queued_num = event.num
            self._announce()

    def _adopt(self, obj: dict[str, Any]) -> None:
        """Take the frame limit the relay announces (a relay that predates ``hello`` keeps the default)."""
        try:
            hello = parse_response(obj, HelloRequest.op)
        except (RemoteError, ProtocolError):
            return
        assert isinstance(hello, HelloResult)
        self.max_frame = self._decoder.max_size = hello.max_frame

    def _frames(self, requests: Sequence[Request]) -> list[bytes]:
        try:
            return [encode_frame(request_to_wire(req), self.max_frame) for req in requests]
        except FrameError as exc:
            raise ClientError(f"request too large: {exc.message}") from None

    async def request(self, req: Request) -> Result:
        (answer,) = await self._submit([req])
        return parse_response(await self._wait(answer), req.op)

    async def pipeline(self, requests: Sequence[Request]) -> list[Result | RemoteError | ClientError]:
        """Send all requests at once, then collect the outcomes in order: a result, the relay's error,
        or (for requests the connection was lost before answering) a ClientError."""
        results: list[Result | RemoteError | ClientError] = []
        for req, answer in zip(requests, await self._submit(requests), strict=True):
            try:
                results.append(parse_response(await self._wait(answer), req.op))
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

    async def queue(self, after: int = 0) -> list[QueueEntry]:
        """Every unread entry numbered above ``after``, in order.

        Pages come one at a time until the relay says it answers ranges (``ranges``); from then on the
        numbers ahead are asked for in windows of ranges, each as wide as the last page was long, pipelined:
        QUEUE_WINDOW ranges, twice as many in each next window up to QUEUE_WINDOW_MAX (a short queue costs
        few requests, a long one keeps the relay busy while we read): 10 000 entries cost tens of round
        trips instead of thousands. A window whose last range
        is empty (the end of the queue, or a gap of read messages) is followed by a page asked for one at a
        time again. Whatever a relay answers, numbers go up strictly and stay in the range asked for, at
        most MAX_QUEUE_ENTRIES entries are held and about twice as many requests sent: a relay cannot keep
        us fetching or growing."""
        entries: list[QueueEntry] = []
        max_requests = 2 * MAX_QUEUE_ENTRIES + QUEUE_WINDOW_MAX
        sent = 0
        span = 0  # numbers per range request; 0: ask for the next page on its own
        window = QUEUE_WINDOW
        while True:
            # Each window, and each page asked for on its own, comes back here: the one bound on requests.
            # (Within a window, a range is asked again only after an answer with entries: MAX_QUEUE_ENTRIES.)
            if sent > max_requests:
                raise ClientError("bad response from the relay: queue pages do not end")
            if span == 0:
                page = await self.request(QueueRequest(self.next_id(), after))
                sent += 1
                assert isinstance(page, QueueResult)
                entries += _advancing(page, after, None)
                _check_queue_size(len(entries))
                if not page.more or not page.entries:
                    return entries
                after = entries[-1].num
                span = len(page.entries) if page.ranges else 0
                continue
            ranges = [(after + i * span, after + (i + 1) * span) for i in range(window)]
            found: list[list[QueueEntry]] = [[] for _ in ranges]
            pending = list(enumerate(ranges))
            while pending:  # a range whose entries outgrew one page is asked again from where it stopped
                sent += len(pending)
                results = await self.pipeline([QueueRequest(self.next_id(), lo, hi) for _, (lo, hi) in pending])
                again = []
                for (i, (lo, hi)), result in zip(pending, results, strict=True):
                    if isinstance(result, (RemoteError, ClientError)):
                        raise result
                    assert isinstance(result, QueueResult)
                    found[i] += _advancing(result, lo, hi)
                    if result.more:
                        if not result.entries:
                            raise ClientError("bad response from the relay: queue pages do not advance")
                        again.append((i, (found[i][-1].num, hi)))
                _check_queue_size(len(entries) + sum(map(len, found)))
                pending = again
            for got in found:
                entries += got
            after = ranges[-1][1]
            if not found[-1]:
                span, window = 0, QUEUE_WINDOW  # the end, or a gap: the next page on its own says which
            else:
                window = min(2 * window, QUEUE_WINDOW_MAX)

    async def subscribe(self) -> None:
        """Ask the relay to push a ``queued`` event for every message stored for us from now on."""
        await self.request(SubscribeRequest(self.next_id()))

    async def ping(self) -> None:
        """One round trip (``hello``): keeps an idle connection open and proves the relay is there."""
        await self.request(HelloRequest(self.next_id()))

    async def mark_read(self, num: int) -> None:
        await self.request(MarkReadRequest(self.next_id(), num))

    async def crl_list(self) -> list[CrlInfo]:
        result = await self.request(CrlListRequest(self.next_id()))
        assert isinstance(result, CrlListResult)
        return result.crls

    async def fetch_crl(self, info: CrlInfo) -> bytes:
        """The CRL ``info`` describes, in pieces (the first, then all others pipelined), digest-checked."""
        assembler = CrlAssembler(info)
        try:
            first = await self.request(CrlRequest(self.next_id(), info.digest, 0))
            assert isinstance(first, CrlResult)
            assembler.add(first)
            offsets = piece_request_offsets(info, first)
            for start in range(0, len(offsets), CRL_WINDOW):  # pipelined, a window at a time
                window = [CrlRequest(self.next_id(), info.digest, o) for o in offsets[start:start + CRL_WINDOW]]
                for piece in await self.pipeline(window):
                    if isinstance(piece, Exception):
                        raise piece
                    assert isinstance(piece, CrlResult)
                    assembler.add(piece)
            return assembler.der()
        except ValueError as exc:
            raise ClientError(f"bad response from the relay: {exc}") from None

    async def get(self, num: int) -> StoredMessage:
        result = await self.request(GetRequest(self.next_id(), num))
        assert isinstance(result, GetResult)
        return result.message

    async def directory(self, uid: str, fingerprint: bytes | None = None) -> DirectoryResult:
        result = await self.request(DirectoryRequest(self.next_id(), uid, fingerprint))
        assert isinstance(result, DirectoryResult)
        return result

    async def directories(self, uids: Sequence[str]) -> list[DirectoryResult | RemoteError]:
        """Several users' directory entries in one pipelined round trip (an unknown user: its RemoteError)."""
        out: list[DirectoryResult | RemoteError] = []
        for result in await self.pipeline([DirectoryRequest(self.next_id(), uid) for uid in uids]):
            if isinstance(result, ClientError):
                raise result
            out.append(result)  # type: ignore[arg-type]
        return out

    async def publish_key(self, record: bytes, signature: bytes) -> None:
        await self.request(PublishKeyRequest(self.next_id(), record, signature))
