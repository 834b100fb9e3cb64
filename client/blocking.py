"""``BlockingRelayClient``: one-shot commands on a plain blocking TLS socket, no event loop.

A command like ``send`` or ``askqueue`` is one short conversation; importing and starting asyncio cost
about a tenth of its whole run. The operations are the same coroutines as on asyncio
(:class:`client.operations.RelayOperations`), but nothing here ever suspends: writing blocks until the
kernel took the bytes, and waiting for an answer reads frames until it has come. :func:`run_blocking`
drives such a coroutine to its end in one step, and refuses one that tries to wait on an event loop.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from cryptography import x509

from pki.tls import peer_certificate
from protocol.messages import Request

from .errors import ClientError, ConnectionLost, handshake_failure
from .operations import Answer, RelayOperations

T = TypeVar("T")

# Request bytes written and not yet answered, at most: the relay may stop reading while its answers wait
# for us, so we read them before writing more than its socket buffers surely hold (no deadlock).
UNANSWERED_BYTES = 64 * 1024


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """The value of a coroutine that never suspends (every await in it ends in blocking I/O)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a blocking command awaited an event loop")


class Pending:
    """Where one request's answer lands (the subset of an asyncio future that answers need)."""

    __slots__ = ("_result", "_error", "size")

    def __init__(self, size: int) -> None:
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self.size = size  # of the request's frame: what it adds to the unanswered bytes while in flight

    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def set_result(self, result: dict[str, Any]) -> None:
        self._result = result

    def set_exception(self, exception: BaseException) -> None:
        self._error = exception

    def result(self) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class BlockingRelayClient(RelayOperations):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sock: ssl.SSLSocket | None = None
        self.clock = time.monotonic  # for the time limits (tests give a clock of their own)

    async def _open(self) -> x509.Certificate | None:
        raw = None
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # pipelined requests go out at once
            sock = self._ctx.wrap_socket(raw, server_hostname=self.host)
        except OSError as exc:  # ssl errors, timeouts and unreachable hosts alike
            if raw is not None:
                raw.close()
            raise handshake_failure(exc, self.host, self.port) from None
        self._sock = sock
        return peer_certificate(sock)

    async def close(self) -> None:
        self._fail_all(ClientError("connection closed"))
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _submit(self, requests: Sequence[Request]) -> list[Answer]:
        if self._broken is not None:
            raise self._broken
        if self._sock is None:
            await self.connect()
        answers: list[Answer] = []
        out: list[bytes] = []
        held = 0  # bytes in out
        for req, frame in zip(requests, self._frames(requests), strict=True):
            pending = Pending(len(frame))
            self._inflight.append((req, pending))
            answers.append(pending)
            out.append(frame)
            held += len(frame)
            if held >= UNANSWERED_BYTES:
                self._write(b"".join(out))
                out, held = [], 0
                # One deadline for the whole wait: bytes that are no answer (events, a frame dribbled a byte
                # at a time) must not keep us here past the time limit.
                deadline = self.clock() + self.timeout
                while self._broken is None and self._unanswered() >= UNANSWERED_BYTES:
                    self._read(deadline)
        if out:
            self._write(b"".join(out))
        return answers

    def _unanswered(self) -> int:
        return sum(p.size for _, p in self._inflight if isinstance(p, Pending))

    def _write(self, data: bytes) -> None:
        if self._broken is not None:
            self._fail_all(self._broken)  # answers added since the connection broke learn it too
            return
        assert self._sock is not None
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(data)
        except OSError as exc:  # a timeout among them
            self._fail_all(self._write_failure(exc))

    async def _wait(self, answer: Answer) -> dict[str, Any]:
        assert isinstance(answer, Pending)
        deadline = self.clock() + self.timeout
        while not answer.done():
            self._read(deadline)
        return answer.result()

    def _read(self, deadline: float) -> None:
        """One read from the relay before ``deadline``, its frames dispatched; every failure (the deadline
        passing included) lands in the waiting answers."""
        try:
            if self._sock is None:
                raise self._broken or ClientError("connection closed")
            left = deadline - self.clock()
            if left <= 0:
                raise ConnectionLost("the relay did not answer in time")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise ConnectionLost("the relay did not answer in time") from None
            except OSError as exc:
                raise self._read_failure(exc) from None
            self._received(data)
        except ClientError as exc:
            self._fail_all(exc)
