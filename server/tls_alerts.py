"""Make asyncio deliver the TLS alert when a handshake fails (workaround for CPython gh-98078).

When OpenSSL refuses a peer's certificate it writes a fatal alert (certificate_revoked,
unknown_ca, certificate_required ...) into the outgoing memory BIO and raises ``ssl.SSLError``.
``asyncio.sslproto.SSLProtocol._do_handshake`` (Python 3.11, and later versions without the fix)
passes that error to ``_on_handshake_complete``, which force-closes the transport without first
flushing the BIO. The alert is dropped: the client sees a bare EOF and cannot tell its user why it
was refused. A blocking ``ssl.SSLSocket`` does send the alert.

Flushing is not quite enough under TLS 1.3. The relay judges the client's certificate only after
the client has finished its side of the handshake, so the client may already be sending requests.
Closing a socket with unread data makes the kernel answer with a reset instead of a FIN, and a
client whose next write meets that reset gives up before it reads the alert waiting in its buffer.
So, after the alert, the relay half-closes and reads and drops what the client still sends until
the client closes, briefly and within a byte budget (the "lingering close" of web servers).

:func:`install` does both on exactly one path: a handshake that failed with an SSL error. Nothing
else about the transport changes. On a Python that already flushes, the BIO is empty by then and
the extra flush writes nothing.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from asyncio import sslproto
from typing import Any

LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024
# Marks the wrapper so a second install() (another RelayServer in the same process) is a no-op.
_MARK = "_msg_relay_flushes_alert"


def _linger(loop: asyncio.AbstractEventLoop, transport: asyncio.BaseTransport) -> None:
    """Keep the connection's socket open on a duplicate after asyncio closes its own descriptor."""
    if not isinstance(transport, asyncio.WriteTransport) or transport.get_write_buffer_size():
        return  # not a socket, or the alert is not all out (asyncio discards the rest): nothing to protect
    raw = transport.get_extra_info("socket")
    if raw is None:
        return
    sock: socket.socket = raw.dup()
    sock.setblocking(False)
    received = 0

    def finish() -> None:
        if sock.fileno() != -1:
            loop.remove_reader(sock.fileno())
            timer.cancel()
            sock.close()

    def drain() -> None:
        nonlocal received
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        received += len(data)
        if not data or received > LINGER_BYTES:
            finish()

    try:
        sock.shutdown(socket.SHUT_WR)  # the alert, then a FIN
    except OSError:
        sock.close()
        return
    timer = loop.call_later(LINGER_SECONDS, finish)
    loop.add_reader(sock.fileno(), drain)


def install() -> None:
    """Patch ``SSLProtocol`` once per process so a failed handshake delivers its alert (gh-98078)."""
    protocol_class: Any = sslproto.SSLProtocol
    original = protocol_class._on_handshake_complete
    if getattr(original, _MARK, False):
        return

    def _on_handshake_complete(self: Any, handshake_exc: BaseException | None) -> None:
        # Only an ssl.SSLError from do_handshake() leaves an alert behind; a handshake timeout
        # (ConnectionAbortedError) or success has nothing queued to flush.
        if isinstance(handshake_exc, ssl.SSLError) and self._transport is not None:
            try:
                self._process_outgoing()
                _linger(self._loop, self._transport)
            except Exception:  # noqa: BLE001 - best effort: the original path below closes either way
                pass
        original(self, handshake_exc)

    setattr(_on_handshake_complete, _MARK, True)
    _on_handshake_complete.__wrapped__ = original  # type: ignore[attr-defined]
    protocol_class._on_handshake_complete = _on_handshake_complete


def installed() -> bool:
    """Whether :func:`install` has patched this process's asyncio."""
    return bool(getattr(sslproto.SSLProtocol._on_handshake_complete, _MARK, False))
