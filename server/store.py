"""The message store: an interface, and its SQLite implementation.

The interface is small on purpose (a PostgreSQL store for several relay nodes is the scale-out
path). The store only ever holds routing data, ciphertext and receipts. ``add_message`` returns only
after the transaction is durable: the acknowledgement of a ``send`` depends on it.
"""

from __future__ import annotations

import abc
import asyncio
import datetime as dt
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar, Union

from pki.errors import MsgRelayError
from pki.identity import cert_fingerprint
from protocol.encoding import format_time, parse_time, utc_now
from protocol.envelope import Sealed, ciphertext_digest
from protocol.fields import Fields
from protocol.messages import KeyRecordWire, QueueEntry, QueuePage, StoredMessage
from protocol.receipts import Receipt

# 2: each message keeps its queue entry's wire text (``entry``), so a page is served without encoding it.
SCHEMA_VERSION = 2
T = TypeVar("T")
log = logging.getLogger("msg_relay.server")


class DuplicateMessage(Exception):
    """The sender already submitted a different message under this msg_id."""


@dataclass(frozen=True)
class Submission:
    """One ``send`` to store: who, to whom, under which id, and the opaque sealed bytes."""

    sender: str
    recipient: str
    msg_id: str
    sealed: Sealed
    sender_cert: bytes  # SHA-256 fingerprint of the sender's TLS certificate


StoreOutcome = Union[tuple[Receipt, bool], Exception]


class WireEntry(NamedTuple):
    """An unread message as ``queue`` serves it: its number and its entry's wire text
    (:meth:`protocol.messages.QueuePage.encode`), or None when its row is damaged beyond serving."""

    num: int
    text: str | None


# What a ``queue`` page asks the store for: rows numbered above ``after``, at most ``limit`` of them.
UnreadAsk = tuple[int, int]


class MessageStore(abc.ABC):
    """What the relay needs from storage. Implementations are used from one thread at a time."""

    @abc.abstractmethod
    def add_messages(self, batch: list[Submission], sign: Callable[[Receipt], Receipt]) -> list[StoreOutcome]:
        """Store a batch durably in one commit (group commit); one outcome per submission, in order.

        An outcome is (receipt, created): a retry of the same submission returns the first receipt with
        created=False. A different submission under the same msg_id gets a DuplicateMessage outcome.
        Nothing is returned before the commit is durable; if it fails, the call raises for the batch.
        """

    @abc.abstractmethod
    def unread_entries(self, uid: str, asks: list[UnreadAsk]) -> list[list[WireEntry]]:
        """For each ``(after, limit)``, the user's unread entries numbered above ``after`` (at most ``limit``),
        as wire texts: several queue pages read in one call."""

    @abc.abstractmethod
    def get_message(self, uid: str, num: int) -> StoredMessage | None:
        """The message, read or not; reading it changes nothing (the client marks it read once verified)."""

    @abc.abstractmethod
    def mark_read(self, uid: str, num: int) -> int | None:
        """Take message ``num`` off the unread list: the bytes it frees (0 when it was read already),
        None when the user has no such message."""

    @abc.abstractmethod
    def stored_digest(self, sender: str, msg_id: str) -> bytes | None:
        """The ciphertext digest stored under ``(sender, msg_id)``: is a submission a retry?"""

    @abc.abstractmethod
    def unread_usage(self, uid: str) -> tuple[int, int]:
        """How many messages, and how many bytes of ciphertext, wait unread for ``uid``."""

    @abc.abstractmethod
    def upsert_user(self, uid: str, cert_der: bytes) -> None:
        """Make ``cert_der`` the user's current certificate; earlier ones stay findable by fingerprint."""

    @abc.abstractmethod
    def add_certificate(self, uid: str, cert_der: bytes) -> None:
        """Keep a certificate findable by fingerprint without making its holder a user (the relay's own)."""

    @abc.abstractmethod
    def get_user(self, uid: str, fingerprint: bytes | None = None) -> bytes | None:
        """The user's current certificate, or the one with that SHA-256 fingerprint."""

    @abc.abstractmethod
    def put_key(self, uid: str, key: KeyRecordWire) -> None: ...

    @abc.abstractmethod
    def get_key(self, uid: str) -> KeyRecordWire | None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (uid TEXT PRIMARY KEY, cert BLOB NOT NULL, updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS certificates (fingerprint BLOB PRIMARY KEY, uid TEXT NOT NULL, cert BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS keys (uid TEXT PRIMARY KEY, record BLOB NOT NULL, signature BLOB NOT NULL,
                                 updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    recipient TEXT NOT NULL,
    num INTEGER NOT NULL,
    sender TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    server_time TEXT NOT NULL,
    envelope_version INTEGER NOT NULL,
    header BLOB NOT NULL,
    envelope BLOB NOT NULL,
    digest BLOB NOT NULL,
    receipt TEXT NOT NULL,
    sender_cert BLOB NOT NULL,
    read INTEGER NOT NULL DEFAULT 0,
    entry TEXT,
    PRIMARY KEY (recipient, num),
    UNIQUE (sender, msg_id)
);
CREATE INDEX IF NOT EXISTS messages_unread ON messages (recipient, read, num);
"""
# A message's entry text is made of these columns (ENTRY_COLUMNS): an edit of one of them (an operator's
# repair, a thief) would leave a text that no longer says what the row does, so the database drops it,
# and the relay makes it again from the columns when it lists the message. Created with schema 2.
_ENTRY_STALE = """
CREATE TRIGGER IF NOT EXISTS messages_entry_stale
AFTER UPDATE OF num, sender, msg_id, server_time, envelope_version, header, receipt, sender_cert ON messages
BEGIN UPDATE messages SET entry=NULL WHERE rowid=NEW.rowid; END
"""


class StoreError(MsgRelayError):
    """The database cannot be opened or has an unknown schema."""


class SQLiteStore(MessageStore):
    """SQLite in WAL mode with ``synchronous=FULL``: a committed send survives a crash or power cut."""

    def __init__(self, path: str) -> None:
        try:
            _create_private(path)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is not None and int(row[0]) == 1:
                self._migrate_to_2()
                row = (str(SCHEMA_VERSION),)
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{path}: schema version {row[0]}, this server knows {SCHEMA_VERSION}")
            if "entry" not in {r[1] for r in self.db.execute("PRAGMA table_info(messages)")}:
                raise StoreError(f"{path}: schema version {SCHEMA_VERSION} without its messages.entry column "
                                 "(a damaged database)")
            self.db.execute(_ENTRY_STALE)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: cannot open database ({exc})") from None

    def _migrate_to_2(self) -> None:
        """Schema 1 to 2: the ``entry`` column, filled for the unread messages (only those are listed).
        Restartable: a relay stopped midway adds no column twice and fills only what is left."""
        if "entry" not in {r[1] for r in self.db.execute("PRAGMA table_info(messages)")}:
            self.db.execute("ALTER TABLE messages ADD COLUMN entry TEXT")
        last: tuple[str, int] = ("", 0)
        while True:
            with self.db:  # read and written under one write lock: no edit of the row between the two
                self.db.execute("BEGIN IMMEDIATE")
                rows = self.db.execute(
                    f"SELECT recipient, {ENTRY_COLUMNS} FROM messages WHERE read=0 AND entry IS NULL"
                    " AND (recipient, num) > (?, ?) ORDER BY recipient, num LIMIT 1000", last).fetchall()
                texts = [(text, r[0], r[1]) for r in rows
                         if (text := rebuilt_entry(r[0], r[1], r[1:]).text) is not None]
                self.db.executemany("UPDATE messages SET entry=? WHERE recipient=? AND num=? AND entry IS NULL",
                                    texts)
            if not rows:
                break
            last = (rows[-1][0], rows[-1][1])
        self.db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))

    def add_messages(self, batch: list[Submission], sign: Callable[[Receipt], Receipt]) -> list[StoreOutcome]:
        db = self.db
        out: list[StoreOutcome] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for sub in batch:
                out.append(self._add_one(sub, sign))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return out

    def _add_one(self, sub: Submission, sign: Callable[[Receipt], Receipt]) -> StoreOutcome:
        digest = ciphertext_digest(sub.sealed)
        row = self.db.execute("SELECT digest, receipt FROM messages WHERE sender=? AND msg_id=?",
                              (sub.sender, sub.msg_id)).fetchone()
        if row is not None:
            return (stored_receipt(row[1]), False) if bytes(row[0]) == digest else DuplicateMessage(sub.msg_id)
        (num,) = self.db.execute("SELECT COALESCE(MAX(num), 0) + 1 FROM messages WHERE recipient=?",
                                 (sub.recipient,)).fetchone()
        receipt = sign(Receipt(sub.msg_id, sub.sender, sub.recipient, digest, utc_now(), num))
        self.db.execute(
            "INSERT INTO messages (recipient, num, sender, msg_id, server_time, envelope_version, header,"
            " envelope, digest, receipt, sender_cert, entry) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (sub.recipient, num, sub.sender, sub.msg_id, format_time(receipt.server_time), sub.sealed.version,
             sub.sealed.header, sub.sealed.envelope, digest, json.dumps(receipt.to_wire()), sub.sender_cert,
             entry_text(sub, receipt)))
        return receipt, True

    def unread_entries(self, uid: str, asks: list[UnreadAsk]) -> list[list[WireEntry]]:
        return [self._unread_entries(uid, after, limit) for after, limit in asks]

    def _unread_entries(self, uid: str, after: int, limit: int) -> list[WireEntry]:
        rows = self.db.execute(
            "SELECT num, entry FROM messages"
            " WHERE recipient=? AND read=0 AND num>? ORDER BY num LIMIT ?", (uid, after, limit)).fetchall()
        return [WireEntry(num, text) if servable(num, text) else self._rebuilt(uid, num, text) for num, text in rows]

    def _rebuilt(self, uid: str, num: int, text: object) -> WireEntry:
        row = self.db.execute(f"SELECT {ENTRY_COLUMNS} FROM messages WHERE recipient=? AND num=?",
                              (uid, num)).fetchone()
        return rebuilt_entry(uid, num, row, text)

    def get_message(self, uid: str, num: int) -> StoredMessage | None:
        row = self.db.execute(
            "SELECT num, sender, recipient, msg_id, server_time, envelope_version, header, envelope, receipt,"
            " sender_cert, read FROM messages WHERE recipient=? AND num=?", (uid, num)).fetchone()
        if row is None:
            return None
        return StoredMessage(row[0], row[1], row[2], row[3], parse_time(row[4]), row[5], bytes(row[6]),
                             bytes(row[7]), stored_receipt(row[8]), bytes(row[9]), bool(row[10]))

    def mark_read(self, uid: str, num: int) -> int | None:
        row = self.db.execute("SELECT read, length(header) + length(envelope) FROM messages WHERE recipient=? AND num=?",
                              (uid, num)).fetchone()
        if row is None:
            return None
        if row[0]:
            return 0
        self.db.execute("UPDATE messages SET read=1 WHERE recipient=? AND num=?", (uid, num))
        return int(row[1])

    def stored_digest(self, sender: str, msg_id: str) -> bytes | None:
        row = self.db.execute("SELECT digest FROM messages WHERE sender=? AND msg_id=?", (sender, msg_id)).fetchone()
        return bytes(row[0]) if row else None

    def unread_usage(self, uid: str) -> tuple[int, int]:
        row = self.db.execute("SELECT COUNT(*), COALESCE(SUM(length(header) + length(envelope)), 0) FROM messages"
                              " WHERE recipient=? AND read=0", (uid,)).fetchone()
        return int(row[0]), int(row[1])

    def add_certificate(self, uid: str, cert_der: bytes) -> None:
        self.db.execute("INSERT OR IGNORE INTO certificates (fingerprint, uid, cert) VALUES (?,?,?)",
                        (cert_fingerprint(cert_der), uid, cert_der))

    def upsert_user(self, uid: str, cert_der: bytes) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.add_certificate(uid, cert_der)
            self.db.execute("INSERT INTO users (uid, cert, updated) VALUES (?,?,?) ON CONFLICT(uid) DO UPDATE"
                            " SET cert=excluded.cert, updated=excluded.updated WHERE users.cert != excluded.cert",
                            (uid, cert_der, format_time(utc_now())))

    def get_user(self, uid: str, fingerprint: bytes | None = None) -> bytes | None:
        if fingerprint is not None:
            row = self.db.execute("SELECT cert FROM certificates WHERE fingerprint=? AND uid=?",
                                  (fingerprint, uid)).fetchone()
        else:
            row = self.db.execute("SELECT cert FROM users WHERE uid=?", (uid,)).fetchone()
        return bytes(row[0]) if row else None

    def put_key(self, uid: str, key: KeyRecordWire) -> None:
        self.db.execute("INSERT INTO keys (uid, record, signature, updated) VALUES (?,?,?,?) ON CONFLICT(uid)"
                        " DO UPDATE SET record=excluded.record, signature=excluded.signature, updated=excluded.updated",
                        (uid, key.record, key.signature, format_time(utc_now())))

    def get_key(self, uid: str) -> KeyRecordWire | None:
        row = self.db.execute("SELECT record, signature FROM keys WHERE uid=?", (uid,)).fetchone()
        return KeyRecordWire(bytes(row[0]), bytes(row[1])) if row else None

    def close(self) -> None:
        self.db.close()


def _create_private(path: str) -> None:
    """The database (and its WAL and shared-memory files, which SQLite creates with the database's
    mode) readable by the relay's user only: it holds who wrote to whom, and when."""
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
    except OSError as exc:
        raise StoreError(f"{path}: cannot create the database ({exc.strerror})") from None


def stored_receipt(text: str) -> Receipt:
    """A receipt as both stores keep it: its wire form, as JSON text."""
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("a stored receipt is not a JSON object")
    return Receipt.from_wire(Fields(obj))


# The columns a queue entry is made of, in QueueEntry's order (both stores).
ENTRY_COLUMNS = "num, sender, msg_id, server_time, envelope_version, header, receipt, sender_cert"


def entry_text(sub: Submission, receipt: Receipt) -> str:
    """The wire text of the queue entry of a message being stored: made once, served as it is."""
    return QueuePage.encode(QueueEntry(receipt.queue_number, sub.sender, sub.msg_id, receipt.server_time,
                                       sub.sealed.version, sub.sealed.header, receipt, sub.sender_cert))


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_ENTRY_JSON = json.JSONDecoder(parse_constant=_not_json)  # built once: json.loads with an argument builds one per call


def servable(num: int, text: object) -> bool:
    """Is ``text`` an entry's wire text, for message ``num``? It goes into frames as it is, so anything
    else (none: a row stored before texts were kept, or one edited in the database) is made again from
    the row's columns (:func:`rebuilt_entry`): what goes on the wire is always JSON that json.dumps made."""
    if not isinstance(text, str) or not text.isascii():
        return False
    try:
        obj, end = _ENTRY_JSON.raw_decode(text)
    except (ValueError, RecursionError):
        return False
    return end == len(text) and isinstance(obj, dict) and type(obj.get("num")) is int and obj["num"] == num


# ENTRY_COLUMNS' types (SQLite keeps whatever is written: a column may hold anything)
_COLUMN_TYPES: tuple[type | tuple[type, ...], ...] = (int, str, str, (str, dt.datetime), int, bytes, str, bytes)


def _check_types(row: Sequence[Any]) -> None:
    """SQLite keeps whatever was written into a column: ``bytes(n)`` of an integer header would allocate n."""
    for value, kind in zip(row, _COLUMN_TYPES, strict=True):
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"a column holds {type(value).__name__}")


def rebuilt_entry(uid: str, num: int, row: Sequence[Any] | None, text: object = None, say: bool = True) -> WireEntry:
    """The entry of message ``num`` made from its row's typed columns (:data:`ENTRY_COLUMNS`), when its
    wire text is missing or did not check (``text``); its text None when the columns are damaged too
    (said once, on the server log, unless not ``say``: a start filling texts leaves it to the listing)."""
    if text is not None:
        log.warning("the stored queue entry of message %s of %s is damaged: made again from its columns", num, uid)
    try:
        if row is None:
            raise ValueError("the row is gone")
        _check_types(row)
        when = row[3] if isinstance(row[3], dt.datetime) else parse_time(row[3])
        entry = QueueEntry(num, row[1], row[2], when, row[4], bytes(row[5]), stored_receipt(row[6]), bytes(row[7]))
        text = QueuePage.encode(entry)
        QueueEntry.from_wire(Fields(_ENTRY_JSON.decode(text)))  # what a client will accept, or not served
        return WireEntry(num, text)
    except (ValueError, TypeError, RecursionError, MsgRelayError) as exc:
        if say:
            log.warning("message %s of %s is damaged in the store (%s): it cannot be listed", num, uid, exc)
        return WireEntry(num, None)


class Backend(Protocol):
    """The store as the relay's event loop uses it: :class:`MessageStore`'s operations, awaitable.
    ``server.pgstore.PostgresStore`` is one natively; :class:`ThreadedStore` makes SQLite one."""

    async def add_messages(self, batch: list[Submission], sign: Callable[[Receipt], Receipt]) -> list[StoreOutcome]: ...
    async def unread_entries(self, uid: str, asks: list[UnreadAsk]) -> list[list[WireEntry]]: ...
    async def get_message(self, uid: str, num: int) -> StoredMessage | None: ...
    async def mark_read(self, uid: str, num: int) -> int | None: ...
    async def stored_digest(self, sender: str, msg_id: str) -> bytes | None: ...
    async def unread_usage(self, uid: str) -> tuple[int, int]: ...
    async def upsert_user(self, uid: str, cert_der: bytes) -> None: ...
    async def add_certificate(self, uid: str, cert_der: bytes) -> None: ...
    async def get_user(self, uid: str, fingerprint: bytes | None = None) -> bytes | None: ...
    async def put_key(self, uid: str, key: KeyRecordWire) -> None: ...
    async def get_key(self, uid: str) -> KeyRecordWire | None: ...
    async def close(self) -> None: ...


class ThreadedStore:
    """A :class:`MessageStore` run on one dedicated thread, so disk syncs never block the event loop."""

    def __init__(self, store: MessageStore) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def add_messages(self, batch: list[Submission], sign: Callable[[Receipt], Receipt]) -> list[StoreOutcome]:
        return await self._run(self.store.add_messages, batch, sign)

    async def unread_entries(self, uid: str, asks: list[UnreadAsk]) -> list[list[WireEntry]]:
        return await self._run(self.store.unread_entries, uid, asks)

    async def get_message(self, uid: str, num: int) -> StoredMessage | None:
        return await self._run(self.store.get_message, uid, num)

    async def mark_read(self, uid: str, num: int) -> int | None:
        return await self._run(self.store.mark_read, uid, num)

    async def stored_digest(self, sender: str, msg_id: str) -> bytes | None:
        return await self._run(self.store.stored_digest, sender, msg_id)

    async def unread_usage(self, uid: str) -> tuple[int, int]:
        return await self._run(self.store.unread_usage, uid)

    async def upsert_user(self, uid: str, cert_der: bytes) -> None:
        await self._run(self.store.upsert_user, uid, cert_der)

    async def add_certificate(self, uid: str, cert_der: bytes) -> None:
        await self._run(self.store.add_certificate, uid, cert_der)

    async def get_user(self, uid: str, fingerprint: bytes | None = None) -> bytes | None:
        return await self._run(self.store.get_user, uid, fingerprint)

    async def put_key(self, uid: str, key: KeyRecordWire) -> None:
        await self._run(self.store.put_key, uid, key)

    async def get_key(self, uid: str) -> KeyRecordWire | None:
        return await self._run(self.store.get_key, uid)

    async def close(self) -> None:
        await self._run(self.store.close)
        self._pool.shutdown(wait=True)


class AsyncStore:
    """The relay's store: a :class:`Backend`, with sends group-committed.

    While one commit is on its way to disk, new sends queue up and go together in the next
    transaction. Each caller is answered only after its own commit returned. Everything else goes to
    ``backend`` directly.
    """

    MAX_BATCH = 256

    def __init__(self, backend: "Backend | MessageStore", sign: Callable[[Receipt], Receipt]) -> None:
        self.backend: Backend = ThreadedStore(backend) if isinstance(backend, MessageStore) else backend
        self.sign = sign
        # Told (recipient, newest number) after each commit that stored messages: live delivery.
        self.on_stored: Callable[[str, int], None] | None = None
        self._queue: list[tuple[Submission, asyncio.Future[tuple[Receipt, bool]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def enqueue(self, submission: Submission) -> "asyncio.Future[tuple[Receipt, bool]]":
        """Queue a submission for the next group commit, at once (no await before it joins the queue):
        the order of calls is the order of queue numbers. The future resolves after the commit."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Receipt, bool]] = loop.create_future()
        self._queue.append((submission, fut))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        return fut

    async def add_message(self, submission: Submission) -> tuple[Receipt, bool]:
        return await self.enqueue(submission)

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:self.MAX_BATCH], self._queue[self.MAX_BATCH:]
                try:
                    outcomes = await self.backend.add_messages([b[0] for b in batch], self.sign)
                except Exception as exc:  # noqa: BLE001 - the whole commit failed: every caller learns it
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self._announce(outcomes)
                for (_, fut), outcome in zip(batch, outcomes, strict=True):
                    if fut.done():
                        continue  # the caller went away; the message is stored all the same
                    if isinstance(outcome, Exception):
                        fut.set_exception(outcome)
                    else:
                        fut.set_result(outcome)
        finally:
            self._flusher = None

    def _announce(self, outcomes: list[StoreOutcome]) -> None:
        if self.on_stored is None:
            return
        newest: dict[str, int] = {}
        for outcome in outcomes:
            if not isinstance(outcome, Exception) and outcome[1]:
                receipt = outcome[0]
                newest[receipt.recipient] = max(receipt.queue_number, newest.get(receipt.recipient, 0))
        for uid, num in newest.items():
            self.on_stored(uid, num)

    async def close(self) -> None:
        await self.backend.close()


def is_shared(db: str) -> bool:
    """``postgresql://…`` (or ``postgres://…``) names a database several relay nodes share."""
    return db.startswith(("postgresql://", "postgres://"))


async def open_backend(db: str) -> Backend:
    """The PostgreSQL store several relay nodes share, or a SQLite file (the embedded default that
    needs no other service)."""
    if is_shared(db):
        from .pgstore import connect  # only a relay on PostgreSQL loads its driver

        return await connect(db)
    return ThreadedStore(SQLiteStore(db))


async def migrate(db: str) -> int:
    """Bring ``db``'s schema up to date (what every relay does at start); its schema version."""
    if is_shared(db):
        from .pgstore import migrate_only

        return await migrate_only(db)
    SQLiteStore(db).close()
    return SCHEMA_VERSION


__all__ = ["AsyncStore", "Backend", "DuplicateMessage", "MessageStore", "SQLiteStore", "StoreError", "Submission",
           "ThreadedStore", "UnreadAsk", "WireEntry"]
