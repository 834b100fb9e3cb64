"""Per-connection TLS buffers of asyncio, sized for a relay that holds many idle connections.

Python 3.11's ``asyncio.sslproto.SSLProtocol`` allocates a 256 KiB read buffer for every TLS
connection (``max_size``, a class attribute; CPython gh-109534), whether it ever carries more than a
few hundred bytes or not: that alone was 266 KiB per idle connection. Two steps take it to nothing:

* **16 KiB reads.** A TLS record carries at most 16 KiB of plaintext, so a 16 KiB buffer reads any
  record's plaintext whole; socket reads just come in smaller pieces (measured: no change in durable
  sends/s, 84 -> 68 KiB per idle connection).
* **One read buffer per thread, not per connection.** The buffer is only a landing place: on a
  selector event loop the socket transport calls ``get_buffer()``, ``recv_into()`` and
  ``buffer_updated()`` in one synchronous callback, and ``buffer_updated()`` first copies the bytes
  into the connection's own ``ssl.MemoryBIO``. Nothing is left in the buffer once that callback
  returns, so every connection of an event loop can land its reads in the same 16 KiB (one buffer per
  thread, since each thread runs its own loop and ``recv_into`` releases the GIL). Connections that
  read (a ``subscribe``d watcher, a client sending requests) and connections that do not are the same
  here: whatever was read is already in the BIO. A proactor loop (Windows) reads into the buffer
  asynchronously, so there each connection keeps a buffer of its own.

And a connection whose peer does not read must hold little: the TLS transport's write limit (asyncio's
default is 512 KiB of encrypted answers) is lowered per connection by :func:`limit_writes`, and the
socket transport beneath it pushes back at once.
"""

from __future__ import annotations

import asyncio
import threading
from asyncio import selector_events, sslproto
from typing import Any

READ_BUFFER = 16 * 1024
WRITE_BUFFER_HIGH = 64 * 1024
# Marks the patched __init__, so a second install() (another RelayServer in the process) is a no-op.
_MARK = "_msg_relay_shares_read_buffer"
_per_thread = threading.local()


def shared_read_buffer() -> memoryview:
    """This thread's landing buffer for TLS reads (created on first use)."""
    view: memoryview | None = getattr(_per_thread, "view", None)
    if view is None:
        view = _per_thread.view = memoryview(bytearray(READ_BUFFER))
    return view


def install() -> None:
    """16 KiB reads, landing in one buffer per thread, for every TLS connection made from now on in this
    process (idempotent)."""
    protocol_class: Any = sslproto.SSLProtocol
    protocol_class.max_size = READ_BUFFER
    original = protocol_class.__init__
    if getattr(original, _MARK, False):
        return

    def __init__(self: Any, loop: asyncio.AbstractEventLoop, *args: Any, **kwargs: Any) -> None:
        original(self, loop, *args, **kwargs)
        # get_buffer() hands out self._ssl_buffer_view as long as it holds max_size bytes: give it the
        # thread's buffer instead of the private one just allocated (which is freed here). Only a
        # selector loop fills the buffer synchronously; anything else keeps its own.
        if isinstance(loop, selector_events.BaseSelectorEventLoop) and self.max_size == READ_BUFFER:
            view = shared_read_buffer()
            self._ssl_buffer = view.obj
            self._ssl_buffer_view = view

    setattr(__init__, _MARK, True)
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    protocol_class.__init__ = __init__


def installed() -> bool:
    """Whether :func:`install` has patched this process's asyncio."""
    return bool(getattr(sslproto.SSLProtocol.__init__, _MARK, False))


def limit_writes(transport: asyncio.BaseTransport) -> None:
    """At most ``WRITE_BUFFER_HIGH`` of answers held for a peer that does not read them."""
    assert isinstance(transport, asyncio.WriteTransport)
    transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
    lower = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    if isinstance(lower, asyncio.WriteTransport):
        # Pause the TLS layer as soon as the socket has a backlog, so answers wait encrypted in one
        # place (counted against WRITE_BUFFER_HIGH) instead of in both layers: 1.97x -> 1.78x of idle
        # RSS with 100 non-reading clients in `make bench`.
        lower.set_write_buffer_limits(high=0)


def drop_peercert_dict(transport: asyncio.BaseTransport) -> None:
    """Forget the decoded peer certificate asyncio keeps for every TLS connection (about 2 KiB each).

    After the handshake asyncio stores ``ssl_object.getpeercert()`` (a dict of tuples of strings) as
    the transport's ``peercert`` extra info for the connection's whole life. The relay reads the DER
    form instead and never asks for the dict; anyone who does still gets it from
    ``get_extra_info("ssl_object").getpeercert()``.
    """
    extra = getattr(getattr(transport, "_ssl_protocol", None), "_extra", None)
    if isinstance(extra, dict):
        extra.pop("peercert", None)
