"""Per-connection TLS buffers of asyncio, sized for a relay that holds many connections.

Python 3.11's ``asyncio.sslproto.SSLProtocol`` allocates a 256 KiB read buffer for every TLS
connection (``max_size``, a class attribute; CPython gh-109534), whether it ever carries more than a
few hundred bytes or not: that alone was 266 KiB per idle connection. A TLS record carries at most
16 KiB of plaintext, so a 16 KiB buffer reads any record's plaintext whole; socket reads just come in
smaller pieces (measured: no change in durable sends/s, 84 -> 68 KiB per idle connection). And a connection whose peer does not read must hold little: the TLS transport's write limit
(asyncio's default is 512 KiB of encrypted answers) is lowered per connection by :func:`limit_writes`,
and the socket transport beneath it pushes back at once.
"""

from __future__ import annotations

import asyncio
from asyncio import sslproto

READ_BUFFER = 16 * 1024
WRITE_BUFFER_HIGH = 64 * 1024


def install() -> None:
    """Smaller read buffers for every TLS connection made from now on in this process (idempotent)."""
    sslproto.SSLProtocol.max_size = READ_BUFFER


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
