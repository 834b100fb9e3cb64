"""The SQLite store: group commit, idempotent retries, duplicates, durability across reopen."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from protocol.envelope import Sealed, ciphertext_digest
from server.store import AsyncStore, DuplicateMessage, SQLiteStore, Submission


def sub(msg_id: str, sender="A", to="B", body=b"x") -> Submission:
    return Submission(sender, to, msg_id, Sealed(2, b"h", body), b"\x01" * 32)


def unsigned(receipt):
    return receipt


def test_batch_numbers_duplicates_and_retries(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.db"))
    out = store.add_messages([sub("1" * 32), sub("2" * 32), sub("1" * 32), sub("1" * 32, body=b"other"),
                              sub("3" * 32, to="C")], unsigned)
    assert [o[0].queue_number for o in out[:3]] == [1, 2, 1]
    assert out[0][1] is True and out[2][1] is False and out[2][0] == out[0][0]
    assert isinstance(out[3], DuplicateMessage)
    assert out[4][0].queue_number == 1 and out[4][0].recipient == "C"
    store.close()
    reopened = SQLiteStore(str(tmp_path / "s.db"))
    assert [e.num for e in reopened.list_unread("B", 0, 10)] == [1, 2]
    assert reopened.get_message("B", 2).msg_id == "2" * 32
    assert [e.num for e in reopened.list_unread("B", 0, 10)] == [1, 2]  # fetching alone marks nothing
    assert reopened.get_message("B", 2).read is False
    len_of_one = len(b"h") + len(b"x")
    assert reopened.stored_digest("A", "2" * 32) == ciphertext_digest(Sealed(2, b"h", b"x"))
    assert reopened.stored_digest("A", "9" * 32) is None
    assert reopened.unread_usage("B") == (2, 2 * len_of_one)
    assert reopened.mark_read("B", 2) == len_of_one
    assert reopened.mark_read("B", 2) == 0  # already read: nothing more freed
    assert reopened.unread_usage("B") == (1, len_of_one)
    assert [e.num for e in reopened.list_unread("B", 0, 10)] == [1]
    assert reopened.get_message("B", 2).read is True  # still retrievable after being read
    assert reopened.get_message("C", 2) is None
    assert reopened.mark_read("C", 2) is None  # another user's number: nothing to mark


def test_durability_settings(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.db"))
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_unknown_schema_version_refused(tmp_path):
    SQLiteStore(str(tmp_path / "s.db")).close()
    conn = sqlite3.connect(tmp_path / "s.db")
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    from server.store import StoreError

    with pytest.raises(StoreError, match="schema version 99"):
        SQLiteStore(str(tmp_path / "s.db"))
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError):
        SQLiteStore(str(tmp_path / "junk.db"))


def test_group_commit_batches_concurrent_sends(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.db"))
    batches: list[int] = []
    original = store.add_messages

    def spy(batch, sign):
        batches.append(len(batch))
        return original(batch, sign)

    store.add_messages = spy  # type: ignore[method-assign]
    astore = AsyncStore(store, unsigned)

    async def go():
        return await asyncio.gather(*(astore.add_message(sub(f"{i:032x}")) for i in range(200)),
                                    return_exceptions=True)

    results = asyncio.run(go())
    assert sorted(r[0].queue_number for r in results) == list(range(1, 201))
    assert sum(batches) == 200 and len(batches) < 200  # several sends share a commit
    asyncio.run(astore.close())


def test_failed_commit_fails_every_caller_of_the_batch(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.db"))

    def broken(batch, sign):
        raise sqlite3.OperationalError("disk I/O error")

    store.add_messages = broken  # type: ignore[method-assign]
    astore = AsyncStore(store, unsigned)

    async def go():
        return await asyncio.gather(*(astore.add_message(sub(f"{i:032x}")) for i in range(5)),
                                    return_exceptions=True)

    assert all(isinstance(r, sqlite3.OperationalError) for r in asyncio.run(go()))
    asyncio.run(astore.close())
