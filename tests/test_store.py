"""The SQLite store: group commit, idempotent retries, duplicates, durability across reopen."""

from __future__ import annotations

import asyncio
import logging
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
    assert [e.num for e in reopened.unread_entries("B", [(0, 10)])[0]] == [1, 2]
    assert reopened.get_message("B", 2).msg_id == "2" * 32
    assert [e.num for e in reopened.unread_entries("B", [(0, 10)])[0]] == [1, 2]  # fetching alone marks nothing
    assert reopened.get_message("B", 2).read is False
    len_of_one = len(b"h") + len(b"x")
    assert reopened.stored_digest("A", "2" * 32) == ciphertext_digest(Sealed(2, b"h", b"x"))
    assert reopened.stored_digest("A", "9" * 32) is None
    assert reopened.unread_usage("B") == (2, 2 * len_of_one)
    assert reopened.mark_read("B", 2) == len_of_one
    assert reopened.mark_read("B", 2) == 0  # already read: nothing more freed
    assert reopened.unread_usage("B") == (1, len_of_one)
    assert [e.num for e in reopened.unread_entries("B", [(0, 10)])[0]] == [1]
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


def _as_schema_1(path: str, damaged: int) -> None:
    """Make the database what a relay before entry texts left (no ``entry`` column nor its trigger, schema
    version 1), message ``damaged`` of B with a broken receipt."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER messages_entry_stale")
        conn.execute("ALTER TABLE messages DROP COLUMN entry")
        conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
        assert conn.execute("UPDATE messages SET receipt='[' WHERE recipient='B' AND num=?", (damaged,)).rowcount == 1
    finally:
        conn.close()


def _entries(store: SQLiteStore, uid: str) -> dict[int, str | None]:
    return {e.num: e.text for e in store.unread_entries(uid, [(0, 100)])[0]}


def _column(path: str) -> dict[tuple[str, int], str | None]:
    conn = sqlite3.connect(path)
    try:
        return {(r[0], r[1]): r[2] for r in conn.execute("SELECT recipient, num, entry FROM messages")}
    finally:
        conn.close()


def test_a_schema_1_database_gets_the_entry_texts_of_its_unread_messages(tmp_path, caplog):
    """Migrated at open: the texts are those the relay would have stored; read messages (never listed)
    get none; a damaged row is left without one and said once, and listing it still says it is damaged.
    Opening again (or after a migration stopped midway) changes nothing."""
    path = str(tmp_path / "s.db")
    store = SQLiteStore(path)
    store.add_messages([sub(f"{n:032x}") for n in range(1, 6)] + [sub("9" * 32, to="C")], unsigned)
    texts, text_c = _entries(store, "B"), _entries(store, "C")[1]
    assert store.mark_read("B", 4)
    store.close()
    _as_schema_1(path, damaged=3)
    with caplog.at_level(logging.WARNING, logger="msg_relay.server"):
        migrated = SQLiteStore(path)
    assert migrated.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("2",)
    stored = _column(path)
    assert stored == {("B", 1): texts[1], ("B", 2): texts[2], ("B", 3): None, ("B", 4): None, ("B", 5): texts[5],
                      ("C", 1): text_c}
    assert [r.getMessage() for r in caplog.records if "cannot be listed" in r.getMessage()] == [
        "message 3 of B is damaged in the store (Expecting value: line 1 column 2 (char 1)): it cannot be listed"]
    assert _entries(migrated, "B") == {1: texts[1], 2: texts[2], 3: None, 5: texts[5]}
    migrated.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")  # as if stopped before the end
    conn.close()
    SQLiteStore(path).close()
    assert _column(path) == stored
    conn = sqlite3.connect(path, isolation_level=None)  # migrated: an edit of the row drops its text
    conn.execute("UPDATE messages SET header=x'00' WHERE recipient='B' AND num=1")
    conn.close()
    assert _column(path) == stored | {("B", 1): None}


def test_a_schema_2_database_without_its_entry_column_is_refused_at_open(tmp_path):
    """Else every send and every listing would fail, one by one, long after the relay said it was up."""
    path = str(tmp_path / "s.db")
    SQLiteStore(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER messages_entry_stale")
    conn.execute("ALTER TABLE messages DROP COLUMN entry")
    conn.close()
    from server.store import StoreError

    with pytest.raises(StoreError, match="schema version 2 without its messages.entry column"):
        SQLiteStore(path)


@pytest.mark.parametrize(("column", "value"), [
    ("header", 2**62),        # bytes(2**62) would try to allocate exabytes
    ("header", 5),            # bytes(5) would be five zero bytes, served as a header
    ("sender", b"\x07"),      # bytes where the UID goes (a TEXT column keeps a BLOB as it is)
    ("sender", "not a uid!"), # a string, but no UID: a client would refuse the whole listing
    ("envelope_version", 3.5),
], ids=["huge-integer-header", "integer-header", "bytes-sender", "bad-uid-sender", "real-version"])
def test_a_column_of_the_wrong_type_or_shape_makes_only_its_row_unlisted(tmp_path, caplog, column, value):
    """SQLite keeps whatever is written into a column: a row edited so is not listed (said on the log),
    and the rows around it are."""
    path = str(tmp_path / "s.db")
    store = SQLiteStore(path)
    store.add_messages([sub(f"{n:032x}") for n in (1, 2, 3)], unsigned)
    before = _entries(store, "B")
    store.db.execute(f"UPDATE messages SET {column}=? WHERE recipient='B' AND num=2", (value,))
    with caplog.at_level(logging.WARNING, logger="msg_relay.server"):
        assert _entries(store, "B") == {1: before[1], 2: None, 3: before[3]}
    assert any("message 2 of B is damaged in the store" in r.getMessage() for r in caplog.records)
    store.close()
