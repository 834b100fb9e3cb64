"""``RelayClient``: the client library on asyncio (``watch``, the tests, programs that embed a client).

One TLS connection, reused for every request; a single reader task hands each answer to the oldest
waiting request (:class:`client.operations.RelayOperations` holds what is said and checked).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any

from cryptography import x509

from pki.tls import peer_certificate
from protocol.messages import Request

from .errors import ClientError, ConnectionLost, ServerRejected, handshake_failure, rejection
from .operations import Answer, RelayOperations

__all__ = ["ClientError", "ConnectionLost", "RelayClient", "ServerRejected"]


async def _refusal_on(reader: asyncio.StreamReader, timeout: float) -> ClientError:
    """Why the relay ended the session before we could look at its certificate.

    Under TLS 1.3 the relay's alert about our certificate can arrive while asyncio is still handing
    us the new connection; OpenSSL then reports the handshake as not done and will not give the
    peer's certificate. The alert itself is waiting on the reader.
    """
    try:
        await asyncio.wait_for(reader.read(1), timeout)
    except ssl.SSLError as exc:
        return rejection(exc) or ClientError(f"TLS error right after the handshake ({exc.reason or exc})")
    except (OSError, asyncio.TimeoutError) as exc:
        return ClientError(f"connection to the relay lost right after the handshake ({exc})")
    return ClientError("the relay closed the connection right after the handshake")


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class RelayClient(RelayOperations):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._queued = asyncio.Event()

    async def _open(self) -> x509.Certificate | None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self._ctx, server_hostname=self.host,
                                        limit=self.max_frame + 8), self.timeout)
        except OSError as exc:  # ssl errors, timeouts and unreachable hosts alike
            raise handshake_failure(exc, self.host, self.port) from None
        self._reader, self._writer = reader, writer
        try:
            cert = peer_certificate(writer.get_extra_info("ssl_object"))
        except ValueError:  # the relay's alert ended the session first (see _refusal_on)
            refusal = await _refusal_on(reader, self.timeout)
            await self.close()
            raise refusal from None
        return cert

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

    def _announce(self) -> None:
        self._queued.set()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                try:
                    data = await self._reader.read(65536)
                except OSError as exc:
                    raise self._read_failure(exc) from None
                self._received(data)
        except ClientError as exc:
            self._fail_all(exc)

    async def _submit(self, requests: Sequence[Request]) -> list[Answer]:
        if self._broken is not None:
            raise self._broken
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        loop = asyncio.get_running_loop()
        if self._reader_task is None:
            self._reader_task = loop.create_task(self._read_loop())
        frames = self._frames(requests)
        futures: list[Answer] = []
        async with self._write_lock:
            for req, frame in zip(requests, frames, strict=True):
                fut: asyncio.Future[dict[str, Any]] = loop.create_future()
                fut.add_done_callback(_consume)  # one nobody awaits (hello) must not log a warning when lost
                self._inflight.append((req, fut))
                futures.append(fut)
                self._writer.write(frame)
            try:
                await asyncio.wait_for(self._writer.drain(), self.timeout)
            except OSError as exc:  # asyncio.TimeoutError is TimeoutError since 3.11
                self._fail_all(self._write_failure(exc))
        return futures

    async def _wait(self, answer: Answer) -> dict[str, Any]:
        assert isinstance(answer, asyncio.Future)
        try:
            return await asyncio.wait_for(asyncio.shield(answer), self.timeout)
        except (asyncio.TimeoutError, TimeoutError):
            # Lost to us either way: a send is retried (same msg_id) through the next node, a watcher reconnects;
            # the requests behind it are not left to wait out a time limit each.
            lost = ConnectionLost("the relay did not answer in time")
            self._fail_all(lost)
            raise lost from None

    async def wait_queued(self, after: int, timeout: float) -> bool:
        """Wait until the relay announces a message numbered above ``after``: True when it did, False
        after ``timeout`` seconds of silence. A lost connection raises its error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.queued_num <= after:
            if self._broken is not None:
                raise self._broken
            self._queued.clear()
            try:
                await asyncio.wait_for(self._queued.wait(), max(0.0, deadline - loop.time()))
            except (asyncio.TimeoutError, TimeoutError):
                return self.queued_num > after
        return True
