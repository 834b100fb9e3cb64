"""One client connection: TLS handshake, identity check, then pipelined requests in order.

Everything a client sends is hostile until parsed: oversize or broken framing closes the
connection after one error frame; a bad request gets an error response and the connection goes on;
an unexpected failure in a handler becomes ``internal`` for that request only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncGenerator, Iterator
from typing import TYPE_CHECKING, Any

from pki.errors import ValidationError
from protocol.errors import ErrorCode, FrameError, ProtocolError
from protocol.frames import FrameDecoder, decode_payload, encode_frame
from protocol.messages import (
    QueuedEvent,
    QueueRequest,
    QueueResult,
    Request,
    Result,
    SendRequest,
    SubscribeRequest,
    SubscribeResult,
    encode_response,
    error_response,
    ok_response,
    parse_request,
)
from protocol.receipts import Receipt

from .handlers import Peer
from .tls_buffers import drop_peercert_dict, limit_writes

if TYPE_CHECKING:
    from .app import RelayServer

log = logging.getLogger("msg_relay.server")
READ_CHUNK = 16384  # at most this much read ahead of a peer's unanswered requests
# Requests decoded ahead of their answers: enough for a group commit of pipelined sends, few enough
# that a connection which never reads its answers holds only this many.
BATCH = 32
# An event is written at once while less than this waits in the connection's write buffer; beyond it,
# only the newest number is kept and written once the peer reads again (events coalesce).
EVENT_BACKLOG = 4096
# Queue pages answered together (a client pipelines windows of 32 to 128 ranges) take at most this much of the
# frame limit between them: a whole window per read of the store at 9999 bytes, one page at the largest
# limit. A peer that stops reading midway holds this and the 64 KiB write buffer; 128 KiB (13 pages per
# read) cost ~20% more relay CPU per 10 000-entry listing.
PAGES_AT_ONCE = 320 * 1024
# Answers ready together go out in writes of about this size: one TLS record run and system call for many.
WRITE_JOIN = 64 * 1024


def _take(decoder: FrameDecoder, limit: int) -> list[bytes]:
    """Up to ``limit`` whole frames. A broken frame behind whole ones is raised on the next call, after
    the frames before it were answered: a client's good requests are never dropped for a later bad one."""
    out: list[bytes] = []
    while len(out) < limit:
        try:
            payload = decoder.next_payload()
        except FrameError:
            if out:
                return out
            raise
        if payload is None:
            break
        out.append(payload)
    return out


class Session:
    def __init__(self, app: "RelayServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.app = app
        self.reader = reader
        self.writer = writer
        self.peername = writer.get_extra_info("peername")
        self.addr = f"{self.peername[0]}:{self.peername[1]}" if self.peername else "?"
        self.peer: Peer | None = None
        self.busy = False
        self.aborted = False
        self.last_active = time.monotonic()  # when a request last arrived (who is idle, when the relay is full)
        self.subscribed = False
        self._event_num = 0  # the newest queue number announced to this subscriber
        self._event_task: asyncio.Task[None] | None = None
        self._held: list[str] | None = None  # audit lines of a run of answers, written together (_pages)

    def abort(self) -> None:
        """Drop the connection at once, without a TLS goodbye (eviction, forced shutdown)."""
        self.aborted = True
        self.writer.transport.abort()

    async def run(self) -> None:
        try:
            if await self._handshake():
                await self._serve()
        finally:
            self._unsubscribe()
            if not self.aborted:
                await self._close()

    # ------------------------------------------------------------------------------ live delivery
    def _subscribe(self) -> SubscribeResult:
        assert self.peer is not None
        self.subscribed = True
        self.app.watchers.add(self.peer.uid, self)  # a set: subscribing twice is subscribing once
        return SubscribeResult()

    def _unsubscribe(self) -> None:
        if self.subscribed and self.peer is not None:
            self.app.watchers.remove(self.peer.uid, self)
        self.subscribed = False
        if self._event_task is not None:
            self._event_task.cancel()

    def queued(self, num: int) -> None:
        """A message numbered ``num`` was stored for this subscriber: push a ``queued`` event. Never
        blocks the notifier: a peer that does not read gets the newest number once it reads again."""
        if num <= self._event_num or self.writer.transport.is_closing():
            return
        self._event_num = num
        if self._event_task is not None:
            return  # it writes the newest number when it gets to write
        if self.writer.transport.get_write_buffer_size() < EVENT_BACKLOG:
            self.writer.write(self._event_frame(num))
        else:
            self._event_task = asyncio.get_running_loop().create_task(self._push_events())

    async def _push_events(self) -> None:
        written = 0
        try:
            while written != self._event_num:
                await self.writer.drain()
                written = self._event_num
                self.writer.write(self._event_frame(written))
        except (OSError, ssl.SSLError):
            return  # the connection broke: the serve loop sees it on its next read or write
        finally:
            self._event_task = None

    def _event_frame(self, num: int) -> bytes:
        return encode_frame(QueuedEvent(num).to_wire(), self.app.config.max_frame)

    async def _close(self) -> None:
        self.writer.close()
        try:
            # asyncio.timeout rather than wait_for: no extra task per closed connection.
            async with asyncio.timeout(2):
                await self.writer.wait_closed()
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            pass  # the peer vanished; nothing left to tell it

    async def _handshake(self) -> bool:
        cfg = self.app.config
        audit = self.app.audit
        context = self.app.ssl_context
        try:
            await self.writer.start_tls(context, ssl_handshake_timeout=cfg.handshake_timeout)
        except ssl.SSLCertVerificationError as exc:
            audit.event("connection_rejected", peer=self.addr, reason=exc.verify_message or exc.reason)
            return False
        except ssl.SSLError as exc:
            audit.event("connection_rejected", peer=self.addr, reason=exc.reason or str(exc))
            return False
        except (asyncio.TimeoutError, TimeoutError):
            audit.event("connection_rejected", peer=self.addr, reason="handshake timeout")
            return False
        except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
            audit.event("connection_rejected", peer=self.addr, reason=f"handshake aborted ({exc.__class__.__name__})")
            return False
        ssl_object = self.writer.get_extra_info("ssl_object")
        drop_peercert_dict(self.writer.transport)  # ~2 KiB per connection that nothing reads
        der: bytes | None = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            if not der:
                raise ValidationError("no_certificate", "no client certificate")
            # The profile is checked once per certificate and CRL, and the sessions of one certificate share
            # its parsed copy (server/peer_cache.py); chain, dates and revocation were checked by OpenSSL in
            # this very handshake.
            checked = self.app.profiles.check(der, self.app.ssl_context, cfg.org_unit)
            if context is not self.app.ssl_context:
                # The CRL changed while this handshake was under way: OpenSSL checked the old one.
                self.app.recheck(checked.cert)
        except ValidationError as exc:
            audit.event("connection_rejected", peer=self.addr, reason=str(exc))
            await self._send_and_close(error_response(None, ErrorCode.NOT_AUTHORISED, f"certificate rejected: {exc}"))
            return False
        identity, cert = checked.identity, checked.cert
        if self.app.refusing:
            # Fail closed, but say why: the client gets the reason instead of a misleading TLS alert.
            audit.event("connection_rejected", peer=self.addr, uid=identity.uid, reason=self.app.refusing)
            await self._send_and_close(error_response(None, ErrorCode.NOT_AUTHORISED, self.app.refusing))
            return False
        if not self.app.admit(self, identity.uid):
            audit.event("connection_refused", peer=self.addr, uid=identity.uid, reason="too many connections for this user")
            await self._send_and_close(error_response(None, ErrorCode.BUSY, "too many connections for this user"))
            return False
        self.peer = Peer(identity.uid, cert)
        limit_writes(self.writer.transport)  # a peer that does not read holds 64 KiB of answers, not 512
        await self.app.users.remember(identity.uid, der)
        audit.event("connection_accepted", peer=self.addr, uid=identity.uid)
        return True

    async def _send_and_close(self, response: dict) -> None:
        try:
            self.writer.write(encode_frame(response, self.app.config.max_frame))
            await asyncio.wait_for(self.writer.drain(), 5)
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            pass  # best effort: the connection closes either way

    async def _serve(self) -> None:
        """Read, answer, repeat: at most ``BATCH`` requests are decoded ahead of the answers written, and
        nothing more is read while the peer is not reading what we write (``drain``), so a client that
        pipelines thousands of requests and never reads costs the relay one batch, not its memory."""
        assert self.peer is not None
        cfg = self.app.config
        decoder = FrameDecoder(cfg.max_frame)
        frame_started: float | None = None
        while not self.app.stopping:
            try:
                payloads = _take(decoder, BATCH)
            except FrameError as exc:
                self.app.audit.event("frame_rejected", peer=self.addr, uid=self.peer.uid, code=exc.code.value,
                                     reason=exc.message)
                await self._send_and_close(error_response(None, exc.code, exc.message))
                return
            if payloads:
                frame_started = None
                self.busy = True
                self.last_active = time.monotonic()
                try:
                    async with contextlib.aclosing(self._respond_all(payloads)) as responses:
                        async for answers in responses:
                            for data in self._frames(answers):
                                self.writer.write(data)
                                await self.writer.drain()  # back-pressure: a slow reader slows only itself
                except (OSError, ssl.SSLError) as exc:
                    self.app.audit.event("connection_closed", peer=self.addr, uid=self.peer.uid,
                                         reason=f"write error ({exc.__class__.__name__})")
                    return
                finally:
                    self.busy = False
                continue
            if decoder.buffered:
                frame_started = frame_started or time.monotonic()
                timeout = max(0.0, min(cfg.idle_timeout, cfg.frame_timeout) - (time.monotonic() - frame_started))
            else:
                frame_started = None
                timeout = cfg.idle_timeout
            try:
                data = await asyncio.wait_for(self.reader.read(READ_CHUNK), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                self.app.audit.event("connection_closed", peer=self.addr, uid=self.peer.uid,
                                     reason="idle timeout" if not decoder.buffered else "incomplete frame timeout")
                return
            except (OSError, ssl.SSLError) as exc:
                self.app.audit.event("connection_closed", peer=self.addr, uid=self.peer.uid,
                                     reason=f"read error ({exc.__class__.__name__})")
                return
            if not data:
                self.app.audit.event("connection_closed", peer=self.addr, uid=self.peer.uid, reason="peer closed")
                return
            decoder.receive(data)

    def _frames(self, answers: list[dict]) -> Iterator[bytes]:
        """The frames of ``answers``, joined into writes of about WRITE_JOIN bytes, each made only when the
        one before it was written (the caller drains in between)."""
        held: list[bytes] = []
        size = 0
        for answer in answers:
            frame = self._encode(answer)
            held.append(frame)
            size += len(frame)
            if size >= WRITE_JOIN:
                yield b"".join(held)
                held, size = [], 0
        if held:
            yield b"".join(held)

    def _encode(self, response: dict) -> bytes:
        """The frame for a response; an answer that outgrew the frame limit becomes ``too_large`` (logged)."""
        assert self.peer is not None
        frame, overflow = encode_response(response, self.app.config.max_frame)
        if overflow is not None:
            log.warning("answer to %s for %s does not fit a frame: %s", response.get("id"), self.peer.uid,
                        overflow.message)
            self.app.audit.event("response_too_large", peer=self.addr, uid=self.peer.uid, reason=overflow.message)
        return frame

    async def _respond_all(self, payloads: list[bytes]) -> AsyncGenerator[list[dict], None]:
        """Responses in request order, as soon as they are ready, a list at a time (written together).

        A run of consecutive ``send`` requests is admitted one by one (recipient, signature, size) and
        each is queued for the store right after its admission, synchronously: their messages share one
        group commit and get queue numbers in request order. A run of consecutive ``queue`` requests (a
        client's window of ranges) is answered together (:meth:`_pages`). Any other request waits until
        everything before it is answered. Admission and execution share one error handling: a refusal or
        a bug answers that request only.
        """
        assert self.peer is not None
        sends: list[tuple[SendRequest, int, asyncio.Future[tuple[Receipt, bool]] | Exception]] = []
        pages: list[tuple[QueueRequest, int]] = []
        at_once = max(1, PAGES_AT_ONCE // self.app.config.max_frame)
        for payload in payloads:
            parsed = self._parse(payload)
            if pages and (not isinstance(parsed, QueueRequest) or len(pages) == at_once):
                yield await self._pages(pages)
                pages = []
            if isinstance(parsed, SendRequest):
                sends.append((parsed, len(payload), await self._admit(parsed)))
                continue
            for req, size, admitted in sends:
                yield [await self._execute(req, size, admitted)]
            sends = []
            if isinstance(parsed, QueueRequest):
                pages.append((parsed, len(payload)))
                continue
            yield [parsed if isinstance(parsed, dict) else await self._execute(parsed, len(payload))]
        for req, size, admitted in sends:
            yield [await self._execute(req, size, admitted)]
        if pages:
            yield await self._pages(pages)

    async def _pages(self, run: list[tuple[QueueRequest, int]]) -> list[dict]:
        """The answers to a run of ``queue`` requests, their pages read from the store together; their
        audit lines are written at once, before any of the answers."""
        assert self.peer is not None
        outcomes: list[QueueResult | Exception]
        try:
            outcomes = list(await self.app.handlers.queue_pages([req for req, _ in run], self.peer))
        except Exception as exc:  # noqa: BLE001 - the store failed: every request of the run is answered so
            outcomes = [exc] * len(run)
        self._held = []
        try:
            return [await self._execute(req, size, outcome) for (req, size), outcome in zip(run, outcomes, strict=True)]
        finally:
            lines, self._held = self._held, None
            self.app.audit.write(lines)

    def _audit(self, event: str, **fields: Any) -> None:
        """An audit line, written now or with the rest of its run's (:meth:`_pages`)."""
        line = self.app.audit.line(event, **fields)
        if self._held is not None:
            self._held.append(line)
        else:
            self.app.audit.write([line])

    async def _admit(self, req: SendRequest) -> "asyncio.Future[tuple[Receipt, bool]] | Exception":
        """Admit a send and queue it for the store: its commit's future, or why it was refused."""
        assert self.peer is not None
        handlers = self.app.handlers
        try:
            return handlers.enqueue_send(await handlers.admit_send(req, self.peer))
        except Exception as exc:  # noqa: BLE001 - answered by _execute like any failure of this request
            return exc

    def _parse(self, payload: bytes) -> Request | dict:
        """A typed request, or the error response for a frame that is not one."""
        assert self.peer is not None
        try:
            return parse_request(decode_payload(payload))
        except ProtocolError as exc:
            self.app.audit.event("request", peer=self.addr, uid=self.peer.uid, result=exc.code.value,
                                 size=len(payload), reason=exc.message)
            return error_response(exc.request_id, exc.code, exc.message)

    async def _execute(self, req: Request, size: int,
                       admitted: "asyncio.Future[tuple[Receipt, bool]] | QueueResult | Exception | None" = None,
                       ) -> dict:
        """Run a request (or, for an admitted send, wait for its commit; for a queue page read with its run,
        take it) and turn the outcome into a response."""
        assert self.peer is not None
        try:
            if isinstance(admitted, Exception):
                raise admitted
            if isinstance(admitted, QueueResult):
                result: Result = admitted
            elif admitted is not None:
                assert isinstance(req, SendRequest)
                result = await self.app.handlers.stored(req, admitted)
            elif isinstance(req, SubscribeRequest):
                result = self._subscribe()
            else:
                result = await self.app.handlers.handle(req, self.peer)
            self._audit("request", peer=self.addr, uid=self.peer.uid, op=req.op, result="ok",
                        size=size, **_audit_fields(req, result))
            return ok_response(req.id, result)
        except ProtocolError as exc:
            return self._refused(req, size, exc)
        except Exception:  # noqa: BLE001 - one broken request must not end the connection or the server
            return self._internal(req)

    def _internal(self, req: Request) -> dict:
        assert self.peer is not None
        log.exception("internal error handling %s from %s", req.op, self.peer.uid)
        self._audit("request", peer=self.addr, uid=self.peer.uid, op=req.op, result="internal")
        return error_response(req.id, ErrorCode.INTERNAL, "internal server error")

    def _refused(self, req: Request, size: int, exc: ProtocolError) -> dict:
        assert self.peer is not None
        self._audit("request", peer=self.addr, uid=self.peer.uid, op=req.op, result=exc.code.value,
                    size=size, reason=exc.message)
        return error_response(req.id, exc.code, exc.message)


def _audit_fields(req: object, result: object) -> dict:
    """Identifiers worth auditing: msg_id, recipient, queue number; never subject or body."""
    fields: dict = {}
    for name, key in (("to", "to"), ("msg_id", "msg_id"), ("num", "num"), ("uid", "lookup")):
        if hasattr(req, name):
            fields[key] = getattr(req, name)
    receipt = getattr(result, "receipt", None)
    if receipt is not None:
        fields["queue_number"] = receipt.queue_number
    return fields
