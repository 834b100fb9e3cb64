"""The message store on PostgreSQL: what lets several relay nodes share one queue per user.

The operations and their rules are those of :class:`server.store.MessageStore`, but ``async``: asyncpg
talks to the server from the event loop, so this store needs no thread. What several nodes add:

* Queue numbers come from a counter row per recipient (``queue_counters``), incremented inside the
  send's transaction. The row lock serialises numbering for one recipient across nodes, so numbers
  stay dense and ordered (``MAX(num) + 1`` would hand the same number to two nodes).
* A transaction-scoped advisory lock per sender makes "is this ``(sender, msg_id)`` new?" a question
  only one node answers at a time, so a number is taken only for a row that will be inserted: a retry
  reaching two nodes at once resolves to one row and one receipt, and never burns a number.
* Every send transaction takes its locks in one global order (sender locks sorted, then counter rows
  sorted), so two nodes' batches cannot deadlock whatever senders and recipients they mix.
* After a commit that stored messages, ``NOTIFY msg_relay_queued`` (sent inside the transaction, so
  delivered only if it commits) tells every node's listener the recipient and its newest number:
  a watcher connected to node B learns of a message stored through node A.
* Migrations are versioned and run under a session advisory lock at start: nodes starting together
  migrate once, and a schema newer than this code is refused.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import asyncpg

from pki.identity import cert_fingerprint
from protocol.encoding import utc_now
from protocol.envelope import ciphertext_digest
from protocol.messages import KeyRecordWire, StoredMessage
from protocol.receipts import Receipt

from .store import (
    ENTRY_COLUMNS,
    DuplicateMessage,
    StoreError,
    StoreOutcome,
    Submission,
    UnreadAsk,
    WireEntry,
    entry_text,
    rebuilt_entry,
    servable,
    stored_receipt,
)

log = logging.getLogger("msg_relay.server")

# Key of the session advisory lock that serialises migrations: b"msgrelay" as a signed 64-bit integer.
MIGRATION_LOCK = int.from_bytes(b"msgrelay", "big", signed=True)

# Migration N (1-based) brings the schema from version N-1 to N. Append only: a deployed migration
# never changes, since databases that ran it would not run it again.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE users (uid TEXT PRIMARY KEY, cert BYTEA NOT NULL, updated TIMESTAMPTZ NOT NULL);
    CREATE TABLE certificates (fingerprint BYTEA PRIMARY KEY, uid TEXT NOT NULL, cert BYTEA NOT NULL);
    CREATE TABLE keys (uid TEXT PRIMARY KEY, record BYTEA NOT NULL, signature BYTEA NOT NULL,
                       updated TIMESTAMPTZ NOT NULL);
    CREATE TABLE queue_counters (recipient TEXT PRIMARY KEY, last_num BIGINT NOT NULL CHECK (last_num >= 0));
    CREATE TABLE messages (
        recipient TEXT NOT NULL,
        num BIGINT NOT NULL CHECK (num > 0),
        sender TEXT NOT NULL,
        msg_id TEXT NOT NULL,
        server_time TIMESTAMPTZ NOT NULL,
        envelope_version INTEGER NOT NULL,
        header BYTEA NOT NULL,
        envelope BYTEA NOT NULL,
        size BIGINT GENERATED ALWAYS AS (octet_length(header) + octet_length(envelope)) STORED,
        digest BYTEA NOT NULL,
        receipt TEXT NOT NULL,
        sender_cert BYTEA NOT NULL,
        read BOOLEAN NOT NULL DEFAULT false,
        PRIMARY KEY (recipient, num),
        UNIQUE (sender, msg_id)
    );
    CREATE INDEX messages_unread ON messages (recipient, num) WHERE NOT read;
    CREATE TABLE crls (issuer BYTEA PRIMARY KEY, number NUMERIC NOT NULL CHECK (number >= 0), der BYTEA NOT NULL,
                       updated TIMESTAMPTZ NOT NULL);
    """,
    # Each message keeps its queue entry's wire text, so a page is served without encoding it. Null for the
    # rows before (filled by _fill_entries), for those a node of an older version stores meanwhile, and for
    # a row whose columns the text is made of (ENTRY_COLUMNS) were edited: made again from them when listed.
    """
    ALTER TABLE messages ADD COLUMN entry TEXT;
    CREATE INDEX messages_unfilled ON messages (recipient, num) WHERE entry IS NULL AND NOT read;
    CREATE FUNCTION messages_entry_stale() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN NEW.entry := NULL; RETURN NEW; END $$;
    CREATE TRIGGER messages_entry_stale
    BEFORE UPDATE OF num, sender, msg_id, server_time, envelope_version, header, receipt, sender_cert ON messages
    FOR EACH ROW EXECUTE FUNCTION messages_entry_stale();
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_CREATE_VERSIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied TIMESTAMPTZ NOT NULL DEFAULT now())
"""

# Locks in the order of the array (the caller sorts it): volatile functions in the select list are
# evaluated after ORDER BY, so every node takes overlapping locks in the same order.
_LOCK_SENDERS = """
SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) WITH ORDINALITY AS u(k, ord) ORDER BY ord
"""

# Takes ``n`` numbers for each recipient at once, locking the counter rows in the (sorted) array order;
# the numbers taken are last_num - n + 1 .. last_num.
_TAKE_NUMBERS = """
INSERT INTO queue_counters AS c (recipient, last_num)
SELECT r, n FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS u(r, n, ord) ORDER BY ord
ON CONFLICT (recipient) DO UPDATE SET last_num = c.last_num + excluded.last_num
RETURNING recipient, last_num
"""

# The channel of live delivery; a payload is "<recipient> <newest queue number>" (a UID has no space).
QUEUED_CHANNEL = "msg_relay_queued"
_NOTIFY_QUEUED = """
SELECT pg_notify('msg_relay_queued', r || ' ' || n) FROM unnest($1::text[], $2::bigint[]) AS u(r, n)
"""
LISTEN_RETRY = (0.1, 5.0)  # seconds: first and longest wait before the listener connects again

_INSERT_MESSAGE = """
INSERT INTO messages (recipient, num, sender, msg_id, server_time, envelope_version, header, envelope, digest,
                      receipt, sender_cert, entry)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
"""

# Several queue pages in one statement: for each (after, limit) of the arrays, in their order, the unread
# rows numbered above ``after``.
_UNREAD_ENTRIES = """
SELECT a.ord, m.num, m.entry FROM unnest($2::bigint[], $3::bigint[]) WITH ORDINALITY AS a(after, lim, ord)
CROSS JOIN LATERAL (SELECT num, entry FROM messages WHERE recipient=$1 AND NOT read AND num > a.after
                    ORDER BY num LIMIT a.lim) AS m
ORDER BY a.ord, m.num
"""


def _settle(done: "asyncio.Future[None]", _conn: object) -> None:
    if not done.done():
        done.set_result(None)


class StoredCrl(NamedTuple):
    """The newest CRL a relay node verified for one issuer (``protocol.crls.issuer_id``)."""

    issuer: bytes
    number: int
    der: bytes


def _sender_lock(sender: str) -> int:
    """The advisory lock key a send transaction holds for ``sender`` (64 bits of a hash: a collision
    only makes two senders' commits wait for each other)."""
    return int.from_bytes(hashlib.sha256(b"msg-relay/sender\0" + sender.encode()).digest()[:8], "big", signed=True)


class PostgresStore:
    """The relay's storage on a PostgreSQL server, shared by any number of relay nodes.

    Create it with :func:`connect`. Every method may be awaited concurrently: each takes a connection
    from the pool for its own statement or transaction.
    """

    def __init__(self, pool: asyncpg.Pool, dsn: str = "") -> None:
        self._pool = pool
        self._dsn = dsn
        self._listener: asyncio.Task[None] | None = None

    async def add_messages(self, batch: Sequence[Submission], sign: Callable[[Receipt], Receipt]) -> list[StoreOutcome]:
        """Store a batch in one transaction (group commit); one outcome per submission, in order.

        An outcome is (receipt, created): a retry of a stored submission returns the first receipt with
        created=False, a different submission under a stored msg_id gets DuplicateMessage. Returns only
        after COMMIT (``synchronous_commit=on``); if the transaction fails, raises and stores nothing.
        ``sign`` runs inside the transaction, once per new message.
        """
        if not batch:
            return []
        digests = [ciphertext_digest(sub.sealed) for sub in batch]
        async with self._pool.acquire() as conn, conn.transaction(isolation="read_committed"):
            # 1. Nobody else may insert for these senders until we commit; after the lock, a fresh
            #    statement (read committed) sees every row another node committed for them.
            await conn.execute(_LOCK_SENDERS, sorted({_sender_lock(sub.sender) for sub in batch}))
            rows = await conn.fetch(
                "SELECT m.sender, m.msg_id, m.digest, m.receipt FROM messages m"
                " JOIN unnest($1::text[], $2::text[]) AS k(sender, msg_id) USING (sender, msg_id)",
                [sub.sender for sub in batch], [sub.msg_id for sub in batch])
            stored: dict[tuple[str, str], tuple[bytes, Receipt]] = {
                (r["sender"], r["msg_id"]): (bytes(r["digest"]), stored_receipt(r["receipt"])) for r in rows}
            # 2. Which submissions are new (the first of a msg_id in the batch that is not stored yet).
            first: dict[tuple[str, str], int] = {}
            for i, sub in enumerate(batch):
                key = (sub.sender, sub.msg_id)
                if key not in stored and key not in first:
                    first[key] = i
            new = sorted(first.values())
            # 3. Numbers only for those, so none is ever burnt; counter rows locked in sorted order.
            counts = Counter(batch[i].recipient for i in new)
            recipients = sorted(counts)
            next_num: dict[str, int] = {}
            if recipients:
                taken = await conn.fetch(_TAKE_NUMBERS, recipients, [counts[r] for r in recipients])
                next_num = {r["recipient"]: r["last_num"] - counts[r["recipient"]] + 1 for r in taken}
            receipts: dict[int, Receipt] = {}
            records: list[tuple[Any, ...]] = []
            for i in new:
                sub, digest = batch[i], digests[i]
                num = next_num[sub.recipient]
                next_num[sub.recipient] = num + 1
                receipt = sign(Receipt(sub.msg_id, sub.sender, sub.recipient, digest, utc_now(), num))
                receipts[i] = receipt
                records.append((sub.recipient, num, sub.sender, sub.msg_id, receipt.server_time, sub.sealed.version,
                                sub.sealed.header, sub.sealed.envelope, digest, json.dumps(receipt.to_wire()),
                                sub.sender_cert, entry_text(sub, receipt)))
            if records:
                await conn.executemany(_INSERT_MESSAGE, records)
                newest = {r[0]: r[1] for r in records}  # in number order: the last one per recipient
                await conn.execute(_NOTIFY_QUEUED, list(newest), list(newest.values()))
        # Committed: now the outcomes, in the batch's order.
        out: list[StoreOutcome] = []
        for i, sub in enumerate(batch):
            key = (sub.sender, sub.msg_id)
            if i in receipts:
                out.append((receipts[i], True))
                continue
            if key in stored:
                digest, receipt = stored[key]
            else:
                digest, receipt = digests[first[key]], receipts[first[key]]
            out.append((receipt, False) if digest == digests[i] else DuplicateMessage(sub.msg_id))
        return out

    async def unread_entries(self, uid: str, asks: list[UnreadAsk]) -> list[list[WireEntry]]:
        """For each ``(after, limit)``, the user's unread entries numbered above ``after`` (at most ``limit``),
        as wire texts: several queue pages in one round trip."""
        rows = await self._pool.fetch(_UNREAD_ENTRIES, uid, [a for a, _ in asks], [n for _, n in asks])
        out: list[list[WireEntry]] = [[] for _ in asks]
        for r in rows:
            num, text = r["num"], r["entry"]
            entry = WireEntry(num, text) if servable(num, text) else await self._rebuilt(uid, num, text)
            out[r["ord"] - 1].append(entry)
        return out

    async def _rebuilt(self, uid: str, num: int, text: object) -> WireEntry:
        row = await self._pool.fetchrow(f"SELECT {ENTRY_COLUMNS} FROM messages WHERE recipient=$1 AND num=$2", uid, num)
        return rebuilt_entry(uid, num, list(row.values()) if row is not None else None, text)

    async def get_message(self, uid: str, num: int) -> StoredMessage | None:
        """The message, read or not; reading it changes nothing (the client marks it read once verified)."""
        r = await self._pool.fetchrow(
            "SELECT num, sender, recipient, msg_id, server_time, envelope_version, header, envelope, receipt,"
            " sender_cert, read FROM messages WHERE recipient=$1 AND num=$2", uid, num)
        if r is None:
            return None
        return StoredMessage(r["num"], r["sender"], r["recipient"], r["msg_id"], r["server_time"],
                             r["envelope_version"], bytes(r["header"]), bytes(r["envelope"]), stored_receipt(r["receipt"]),
                             bytes(r["sender_cert"]), r["read"])

    async def mark_read(self, uid: str, num: int) -> int | None:
        """Take message ``num`` off the unread list: the bytes it frees (0 when it was read already, also
        when another node marked it a moment ago), None when the user has no such message."""
        freed = await self._pool.fetchval(
            "UPDATE messages SET read=true WHERE recipient=$1 AND num=$2 AND NOT read RETURNING size", uid, num)
        if freed is not None:
            return int(freed)
        exists = await self._pool.fetchval("SELECT true FROM messages WHERE recipient=$1 AND num=$2", uid, num)
        return 0 if exists else None

    async def stored_digest(self, sender: str, msg_id: str) -> bytes | None:
        """The digest stored under ``(sender, msg_id)``: is a submission a retry of a stored one?"""
        digest = await self._pool.fetchval("SELECT digest FROM messages WHERE sender=$1 AND msg_id=$2", sender, msg_id)
        return bytes(digest) if digest is not None else None

    async def unread_usage(self, uid: str) -> tuple[int, int]:
        """How many messages, and how many bytes of ciphertext (header and envelope), wait unread."""
        r = await self._pool.fetchrow(
            "SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes FROM messages WHERE recipient=$1 AND NOT read", uid)
        assert r is not None  # an aggregate always yields a row
        return int(r["n"]), int(r["bytes"])

    async def add_certificate(self, uid: str, cert_der: bytes) -> None:
        """Keep a certificate findable by fingerprint without making its holder a user (the relay's own)."""
        await self._pool.execute(
            "INSERT INTO certificates (fingerprint, uid, cert) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            cert_fingerprint(cert_der), uid, cert_der)

    async def upsert_user(self, uid: str, cert_der: bytes) -> None:
        """Make ``cert_der`` the user's current certificate; earlier ones stay findable by fingerprint."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO certificates (fingerprint, uid, cert) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                cert_fingerprint(cert_der), uid, cert_der)
            await conn.execute(
                "INSERT INTO users AS u (uid, cert, updated) VALUES ($1, $2, now()) ON CONFLICT (uid) DO UPDATE"
                " SET cert=excluded.cert, updated=excluded.updated WHERE u.cert <> excluded.cert", uid, cert_der)

    async def get_user(self, uid: str, fingerprint: bytes | None = None) -> bytes | None:
        """The user's current certificate, or the one with that SHA-256 fingerprint."""
        if fingerprint is not None:
            cert = await self._pool.fetchval("SELECT cert FROM certificates WHERE fingerprint=$1 AND uid=$2",
                                             fingerprint, uid)
        else:
            cert = await self._pool.fetchval("SELECT cert FROM users WHERE uid=$1", uid)
        return bytes(cert) if cert is not None else None

    async def put_key(self, uid: str, key: KeyRecordWire) -> None:
        await self._pool.execute(
            "INSERT INTO keys (uid, record, signature, updated) VALUES ($1, $2, $3, now()) ON CONFLICT (uid)"
            " DO UPDATE SET record=excluded.record, signature=excluded.signature, updated=excluded.updated",
            uid, key.record, key.signature)

    async def get_key(self, uid: str) -> KeyRecordWire | None:
        r = await self._pool.fetchrow("SELECT record, signature FROM keys WHERE uid=$1", uid)
        return KeyRecordWire(bytes(r["record"]), bytes(r["signature"])) if r else None

    async def put_crl(self, issuer: bytes, number: int, der: bytes) -> bool:
        """Keep ``der`` as the issuer's CRL if it is newer than the one held: True when it replaced (or
        was the first). Atomic, so nodes storing CRLs at once end with the highest number, never an older one.
        The caller verifies the CRL first; the store only orders them."""
        replaced = await self._pool.fetchval(
            "INSERT INTO crls AS c (issuer, number, der, updated) VALUES ($1, $2, $3, now()) ON CONFLICT (issuer)"
            " DO UPDATE SET number=excluded.number, der=excluded.der, updated=excluded.updated"
            " WHERE excluded.number > c.number RETURNING true", issuer, number, der)
        return bool(replaced)

    async def get_crls(self) -> list[StoredCrl]:
        """The newest CRL held for every issuer."""
        rows = await self._pool.fetch("SELECT issuer, number, der FROM crls ORDER BY issuer")
        return [StoredCrl(bytes(r["issuer"]), int(r["number"]), bytes(r["der"])) for r in rows]

    async def schema_version(self) -> int:
        return await _schema_version(self._pool)

    async def newest_numbers(self, uids: Sequence[str]) -> dict[str, int]:
        """The newest queue number of each of ``uids`` that has one (what a watcher may have missed)."""
        rows = await self._pool.fetch("SELECT recipient, last_num FROM queue_counters WHERE recipient = ANY($1)",
                                      list(uids))
        return {r["recipient"]: int(r["last_num"]) for r in rows}

    def listen(self, on_queued: Callable[[str, int], None], on_resync: Callable[[], Awaitable[None]]) -> None:
        """Follow ``NOTIFY msg_relay_queued`` from every node on a dedicated connection, for as long as the
        store is open. The connection is made again (with backoff) when it breaks; ``on_resync`` runs
        after each (re)connection, since notifications sent meanwhile are lost."""
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen(on_queued, on_resync))

    async def _listen(self, on_queued: Callable[[str, int], None], on_resync: Callable[[], Awaitable[None]]) -> None:
        def received(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            uid, _, num = payload.rpartition(" ")
            if uid and num.isdigit():
                on_queued(uid, int(num))

        wait = LISTEN_RETRY[0]
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, server_settings={"application_name": "msg-relay-listen"})
                lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                conn.add_termination_listener(functools.partial(_settle, lost))
                await conn.add_listener(QUEUED_CHANNEL, received)
                wait = LISTEN_RETRY[0]
                await on_resync()
                await lost
                log.warning("lost the PostgreSQL connection that follows new messages: reconnecting")
            except _CONNECT_ERRORS as exc:
                log.warning("cannot follow new messages on PostgreSQL (%s): retrying in %.1f s", exc, wait)
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(wait)
            wait = min(wait * 2, LISTEN_RETRY[1])

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except asyncio.CancelledError:
                pass
            self._listener = None
        await self._pool.close()


async def _schema_version(conn: asyncpg.Pool | asyncpg.Connection) -> int:
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return 0
    return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))


async def _migrate(conn: asyncpg.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION, one transaction per migration, under a session advisory lock:
    a node starting at the same time waits (schema changes only: seconds), then finds the work done. If
    this node dies midway, its session ends, which releases the lock, and the migration it was in rolls
    back. Then, outside the lock, the entry texts still missing are made (:func:`_fill_entries`)."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(_CREATE_VERSIONS)
        version = await _schema_version(conn)
        if version > SCHEMA_VERSION:
            raise StoreError(f"PostgreSQL schema version {version}, this server knows {SCHEMA_VERSION}:"
                             " a newer relay migrated the database")
        for number in range(version + 1, SCHEMA_VERSION + 1):
            async with conn.transaction():
                await conn.execute(MIGRATIONS[number - 1])
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)
    finally:
        if not conn.is_closed():  # a lost session has released its locks already
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    await _fill_entries(conn)
    return SCHEMA_VERSION


async def _fill_entries(conn: asyncpg.Connection) -> None:
    """The wire texts of unread messages that have none (stored before texts were kept, by a node of an
    older version, or left by a node stopped midway), at every start: an index holds just those rows, so
    once all are made this costs nothing. A thousand rows per transaction, read ``FOR UPDATE`` in it, so
    no edit of a row lands between reading its columns and writing its text; ``SKIP LOCKED``, so nodes
    starting together share the work. A damaged row (no text can be made) is passed over."""
    last: tuple[str, int] = ("", 0)
    while True:
        async with conn.transaction():
            rows = await conn.fetch(
                f"SELECT recipient, {ENTRY_COLUMNS} FROM messages WHERE NOT read AND entry IS NULL"
                " AND (recipient, num) > ($1::text, $2::bigint) ORDER BY recipient, num LIMIT 1000"
                " FOR UPDATE SKIP LOCKED", *last)
            texts = [(text, r["recipient"], r["num"]) for r in rows
                     if (text := rebuilt_entry(r["recipient"], r["num"], list(r.values())[1:], say=False).text)
                     is not None]
            await conn.executemany("UPDATE messages SET entry=$1 WHERE recipient=$2 AND num=$3 AND entry IS NULL",
                                   texts)
        if not rows:
            return
        last = (rows[-1]["recipient"], rows[-1]["num"])


_CONNECT_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def connect(dsn: str, *, min_size: int = 1, max_size: int = 10, command_timeout: float = 60.0) -> PostgresStore:
    """Open a pool on ``dsn`` and migrate the schema (see :func:`_migrate`); StoreError if the server
    cannot be reached or holds a schema newer than this code.

    Every connection runs with ``synchronous_commit=on`` whatever the server's default, since the
    acknowledgement of a send depends on its commit being durable.
    """
    try:
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout,
                                         server_settings={"synchronous_commit": "on",
                                                          "application_name": "msg-relay"})
    except _CONNECT_ERRORS as exc:
        raise StoreError(f"cannot connect to PostgreSQL ({exc})") from None
    try:
        async with pool.acquire() as conn:
            await _migrate(conn)
    except BaseException as exc:
        pool.terminate()
        if isinstance(exc, _CONNECT_ERRORS):
            raise StoreError(f"cannot migrate the PostgreSQL schema ({exc})") from None
        raise
    return PostgresStore(pool, dsn)


async def migrate_only(dsn: str) -> int:
    """``msg-server --migrate-only``: apply the migrations and return the schema version."""
    store = await connect(dsn, min_size=1, max_size=1)
    try:
        return await store.schema_version()
    finally:
        await store.close()


__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresStore", "StoredCrl", "connect", "migrate_only"]
