"""Limits that keep one user from exhausting the relay: how fast anyone may send, how much may wait
unread in one queue.

Without them one connection put 57 300 messages (480 MB) into one queue in 20 seconds. The counts
are kept in memory, seeded from the store the first time a queue is touched, counted when a send is
queued (and uncounted if its commit fails or it was a retry) and when a message is marked read, so a
send costs no extra query.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import RequestId


@dataclass(frozen=True)
class QuotaConfig:
    sends_per_minute: int = 600     # per sender: a burst of this many, refilled at this rate
    max_unread: int = 10_000        # messages waiting in one queue
    max_unread_bytes: int = 64 << 20  # bytes of ciphertext waiting in one queue


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class _Queue:
    count: int
    size: int
    seeded: float  # when the counts were read from the store


@dataclass
class Quotas:
    config: QuotaConfig
    usage_of: Callable[[str], Awaitable[tuple[int, int]]]  # the store's (unread count, bytes) of a queue
    clock: Callable[[], float] = time.monotonic
    # On a database several nodes share, the others store and read too: counts older than this are
    # read again, so each node's view of a queue is at most this stale (None: never, one writer).
    reseed_after: float | None = None
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _queues: dict[str, _Queue] = field(default_factory=dict)
    _seeding: dict[str, asyncio.Task[_Queue]] = field(default_factory=dict)

    def take_send(self, sender: str, rid: RequestId) -> None:
        """One send of ``sender`` (a token bucket: a burst of ``sends_per_minute``, refilled steadily)."""
        rate = self.config.sends_per_minute
        now = self.clock()
        bucket = self._buckets.get(sender)
        if bucket is None:
            bucket = self._buckets[sender] = _Bucket(float(rate), now)
        bucket.tokens = min(float(rate), bucket.tokens + (now - bucket.stamp) * rate / 60.0)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            raise ProtocolError(ErrorCode.QUOTA, f"sending too fast: at most {rate} messages a minute; "
                                "try again shortly", rid)
        bucket.tokens -= 1.0

    async def check_room(self, recipient: str, size: int, rid: RequestId) -> None:
        """Refuse a message that would take ``recipient``'s unread queue over its limits."""
        queue = await self._queue(recipient)
        cfg = self.config
        if queue.count + 1 > cfg.max_unread or queue.size + size > cfg.max_unread_bytes:
            raise ProtocolError(ErrorCode.QUOTA, f"the queue of {recipient} is full ({queue.count} unread messages, "
                                f"{queue.size} bytes): it must read some first", rid)

    async def _queue(self, uid: str) -> _Queue:
        queue = self._queues.get(uid)
        stale = queue is not None and self.reseed_after is not None and \
            self.clock() - queue.seeded > self.reseed_after
        if queue is not None and not stale:
            return queue
        # One read of the store per queue at a time: admissions that arrive meanwhile wait for it
        # instead of each scanning the queue (and overwriting each other's counts).
        if uid not in self._seeding:
            self._seeding[uid] = asyncio.get_running_loop().create_task(self._seed(uid))
        return await asyncio.shield(self._seeding[uid])

    async def _seed(self, uid: str) -> _Queue:
        try:
            count, size = await self.usage_of(uid)
            queue = self._queues[uid] = _Queue(count, size, self.clock())
            return queue
        finally:
            del self._seeding[uid]

    def stored(self, recipient: str, size: int) -> None:
        queue = self._queues.get(recipient)
        if queue is not None:
            queue.count += 1
            queue.size += size

    def read(self, recipient: str, size: int) -> None:
        queue = self._queues.get(recipient)
        if queue is not None:
            queue.count = max(0, queue.count - 1)
            queue.size = max(0, queue.size - size)
