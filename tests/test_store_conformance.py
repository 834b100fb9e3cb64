"""One behavioural suite for every message store: SQLite (one node) and PostgreSQL (several nodes).

The rules are the relay's, not a backend's, so each conformance test runs against both stores through
the same async interface (SQLite through ThreadedStore, as the relay runs it). The tests after those
are PostgreSQL's own: two pools on one database stand for two relay nodes; ``pg_dsn`` (conftest) gives
each test an empty schema in the run's own database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import sqlite3
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from pki.identity import cert_fingerprint
from pki.keys import generate_key
from protocol.encoding import format_time
from protocol.envelope import Sealed, ciphertext_digest
from protocol.fields import Fields
from protocol.messages import KeyRecordWire, QueueEntry, QueuePage
from protocol.receipts import Receipt
from server import pgstore
from server.store import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from server.store import DuplicateMessage, SQLiteStore, StoreError, Submission, ThreadedStore

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")
DEADLINE = 60.0  # seconds for one test's store work; a lost lock or a deadlock shows up as a failure
KEY = generate_key()
SIGNER = bytes(range(32))


def sign(receipt: Receipt) -> Receipt:
    return receipt.signed_by(KEY, SIGNER)


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, DEADLINE)

    return asyncio.run(bounded())


def sub(n: int, sender: str = "A", to: str = "B", body: bytes = b"x", header: bytes = b"h") -> Submission:
    return Submission(sender, to, f"{n:032x}", Sealed(2, header, body), bytes([n % 256]) * 32)


async def listed(store: Any, uid: str, after: int, limit: int) -> list[QueueEntry]:
    """The user's unread entries as the relay serves them (their wire texts), read back as a client would."""
    (page,) = await store.unread_entries(uid, [(after, limit)])
    entries = [QueueEntry.from_wire(Fields(json.loads(e.text))) for e in page]
    assert [e.num for e in entries] == [e.num for e in page]
    return entries


def receipt_of(outcome: Any) -> Receipt:
    assert isinstance(outcome, tuple), f"expected a receipt, got {outcome!r}"
    return outcome[0]


# --- the stores under test ------------------------------------------------------------------------------


class Backend:
    """How a test opens (and reopens) one store, and how it makes the stored schema look too new."""

    name: str

    async def open(self) -> Any:
        raise NotImplementedError

    async def make_schema_newer(self) -> None:
        raise NotImplementedError

    async def set_columns(self, key: tuple[str, int], **values: Any) -> None:
        """Edit one message's row, as a thief with write access to the database would."""
        raise NotImplementedError


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    async def open(self) -> Any:
        return ThreadedStore(SQLiteStore(self.path))

    async def make_schema_newer(self) -> None:
        db = sqlite3.connect(self.path)
        with db:
            db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SQLITE_SCHEMA_VERSION + 1),))
        db.close()

    async def set_columns(self, key: tuple[str, int], **values: Any) -> None:
        db = sqlite3.connect(self.path)
        with db:
            assert db.execute(f"UPDATE messages SET {', '.join(f'{c}=?' for c in values)} WHERE recipient=? AND num=?",
                              (*values.values(), *key)).rowcount == 1
        db.close()


class PostgresBackend(Backend):
    name = "postgres"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def open(self) -> Any:
        return await pgstore.connect(self.dsn)

    async def make_schema_newer(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", pgstore.SCHEMA_VERSION + 1)
        finally:
            await conn.close()

    async def set_columns(self, key: tuple[str, int], **values: Any) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            sets = ", ".join(f"{c}=${i}" for i, c in enumerate(values, 1))
            done = await conn.execute(f"UPDATE messages SET {sets} WHERE recipient=${len(values) + 1}"
                                      f" AND num=${len(values) + 2}", *values.values(), *key)
            assert done == "UPDATE 1"
        finally:
            await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return SQLiteBackend(tmp_path / "relay.db")
    return PostgresBackend(request.getfixturevalue("pg_dsn"))


def with_store(backend: Backend, body: Callable[[Any], Awaitable[T]]) -> T:
    async def go() -> T:
        store = await backend.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return run(go())


# --- conformance: every store ---------------------------------------------------------------------------


def test_numbers_are_dense_per_recipient_and_outcomes_follow_the_batch(backend: Backend) -> None:
    async def body(store: Any) -> None:
        assert await store.add_messages([], sign) == []
        batch = [sub(1, to="B"), sub(2, to="C"), sub(3, to="B"), sub(4, sender="D", to="B"), sub(5, to="C")]
        out = await store.add_messages(batch, sign)
        assert [(receipt_of(o).recipient, receipt_of(o).queue_number) for o in out] == \
               [("B", 1), ("C", 1), ("B", 2), ("B", 3), ("C", 2)]
        assert all(o[1] is True for o in out)
        for s, o in zip(batch, out):
            r = receipt_of(o)
            assert (r.msg_id, r.sender, r.recipient) == (s.msg_id, s.sender, s.recipient)
            assert r.digest == ciphertext_digest(s.sealed) and r.verify(KEY.public_key())
        more = await store.add_messages([sub(6, to="C"), sub(7, to="B")], sign)
        assert [receipt_of(o).queue_number for o in more] == [3, 4]
        assert [e.num for e in await listed(store, "B", 0, 100)] == [1, 2, 3, 4]
        assert [e.num for e in await listed(store, "C", 0, 100)] == [1, 2, 3]

    with_store(backend, body)


def test_a_retry_returns_the_first_receipt_and_takes_no_number(backend: Backend) -> None:
    async def body(store: Any) -> None:
        (first,) = await store.add_messages([sub(1)], sign)
        # a retry in a later batch, and twice in one batch: the first receipt each time, nothing new
        out = await store.add_messages([sub(1), sub(2), sub(2), sub(1)], sign)
        assert out[0] == (first[0], False) and out[3] == (first[0], False)
        assert out[1][1] is True and out[2] == (out[1][0], False)
        assert receipt_of(out[1]).queue_number == 2
        (after,) = await store.add_messages([sub(3)], sign)
        assert receipt_of(after).queue_number == 3  # the retries burnt no number
        assert [e.msg_id for e in await listed(store, "B", 0, 10)] == [sub(n).msg_id for n in (1, 2, 3)]

    with_store(backend, body)


def test_another_message_under_a_used_msg_id_is_a_duplicate(backend: Backend) -> None:
    async def body(store: Any) -> None:
        (first,) = await store.add_messages([sub(1)], sign)
        out = await store.add_messages([sub(1, body=b"other"), sub(2), sub(2, body=b"other too"),
                                        sub(1, header=b"H")], sign)
        assert isinstance(out[0], DuplicateMessage) and isinstance(out[2], DuplicateMessage)
        assert isinstance(out[3], DuplicateMessage)  # the digest covers the header too
        assert receipt_of(out[1]).queue_number == 2  # the rest of the batch is stored all the same
        stored = await store.get_message("B", 1)
        assert stored.envelope == b"x" and stored.receipt == first[0]  # the original stays as it was
        # the id is the sender's: another sender may use the same msg_id
        (other,) = await store.add_messages([sub(1, sender="E", body=b"other")], sign)
        assert other[1] is True and receipt_of(other).queue_number == 3

    with_store(backend, body)


def test_stored_digest_answers_is_this_a_retry(backend: Backend) -> None:
    async def body(store: Any) -> None:
        assert await store.stored_digest("A", sub(1).msg_id) is None
        await store.add_messages([sub(1, body=b"first")], sign)
        expected = ciphertext_digest(sub(1, body=b"first").sealed)
        assert await store.stored_digest("A", sub(1).msg_id) == expected
        await store.add_messages([sub(1, body=b"second")], sign)  # a duplicate changes nothing
        assert await store.stored_digest("A", sub(1).msg_id) == expected
        assert await store.stored_digest("E", sub(1).msg_id) is None  # the msg_id is the sender's

    with_store(backend, body)


def test_unread_entries_page_with_after_and_limit(backend: Backend) -> None:
    async def body(store: Any) -> None:
        batch = [sub(n, header=b"h%d" % n) for n in range(1, 8)]
        receipts = [receipt_of(o) for o in await store.add_messages(batch, sign)]
        assert [e.num for e in await listed(store, "B", 0, 3)] == [1, 2, 3]
        assert [e.num for e in await listed(store, "B", 3, 3)] == [4, 5, 6]
        assert [e.num for e in await listed(store, "B", 6, 3)] == [7]
        assert await listed(store, "B", 7, 3) == []
        assert await listed(store, "nobody", 0, 3) == []
        await store.mark_read("B", 2)
        await store.mark_read("B", 5)
        assert [e.num for e in await listed(store, "B", 0, 3)] == [1, 3, 4]  # read ones leave the list
        assert [e.num for e in await listed(store, "B", 4, 10)] == [6, 7]
        entry = (await listed(store, "B", 0, 1))[0]
        assert (entry.sender, entry.msg_id, entry.envelope_version, entry.header, entry.sender_cert) == \
               ("A", batch[0].msg_id, 2, b"h1", batch[0].sender_cert)
        assert entry.receipt == receipts[0] and entry.server_time == receipts[0].server_time
        assert entry.receipt.verify(KEY.public_key())

    with_store(backend, body)


def test_each_message_keeps_the_entry_text_queue_serves(backend: Backend) -> None:
    """Several pages in one call, each on its own; the text is the typed entry's encoding (what ``get``
    reads from the same row), made when the message was stored; another user's and read ones are not listed."""
    async def body(store: Any) -> None:
        await store.add_messages([sub(n, header=b"h%d" % n) for n in range(1, 7)] + [sub(9, to="C")], sign)
        await store.mark_read("B", 4)
        pages = await store.unread_entries("B", [(0, 2), (1, 10), (5, 3), (6, 1), (0, 0)])
        assert [[e.num for e in page] for page in pages] == [[1, 2], [2, 3, 5, 6], [6], [], []]
        for entry in pages[1]:
            assert entry.text == QueuePage.encode((await store.get_message("B", entry.num)).entry())
        assert [e.num for e in (await store.unread_entries("C", [(0, 10)]))[0]] == [1]
        assert await store.unread_entries("nobody", [(0, 10)]) == [[]]
        assert await store.unread_entries("B", []) == []

    with_store(backend, body)


@pytest.mark.parametrize("text", ['{"num":1,"from":"A"', '{"num":1}{"num":1}', '{"num":1} x', '[1]', '{"num":1,"x":NaN}',
                                  '{"num":3}', '{"num":true}', '{"num":1,"from":"\u00c9"}', "", None],
                         ids=["cut", "two", "trailing", "array", "nan", "other-num", "bool-num", "non-ascii", "empty",
                              "none"])
def test_an_entry_text_that_does_not_check_is_made_again_from_its_row(backend: Backend, text: str | None,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """It goes into frames as it is: anything but JSON json.dumps made for this message is not served, but
    made again from the row (the user's own: recipient A's message 1 comes first in the table)."""
    async def stored(store: Any) -> list[Any]:
        await store.add_messages([sub(n, to="A", header=b"a") for n in (11, 12)] + [sub(n) for n in (1, 2, 3)], sign)
        return (await store.unread_entries("B", [(0, 10)]))[0]

    async def served(store: Any) -> list[Any]:
        return (await store.unread_entries("B", [(0, 10)]))[0]

    before = with_store(backend, stored)
    run(backend.set_columns(("B", 1), entry=text))
    with caplog.at_level(logging.WARNING, logger="msg_relay.server"):
        assert with_store(backend, served) == before
    warned = [r.getMessage() for r in caplog.records if "made again" in r.getMessage()]
    assert warned == ([] if text is None else ["the stored queue entry of message 1 of B is damaged: made again"
                                               " from its columns"])


@pytest.mark.parametrize("column", ["header", "receipt", "server_time", "num"])
def test_an_edit_of_a_column_the_entry_is_made_of_is_listed_as_edited(backend: Backend, column: str,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Queue lists what ``get`` reads: an edit of the row (a repair, a thief) is not hidden behind the text
    kept since the message was stored; the database drops it and the entry is made from the columns again."""
    before: str | None = None

    async def body(store: Any) -> None:
        nonlocal before
        out = await store.add_messages([sub(1), sub(2)], sign)
        before = (await store.unread_entries("B", [(0, 1)]))[0][0].text
        if column == "receipt":
            await backend.set_columns(("B", 1), receipt=json.dumps(receipt_of(out[1]).to_wire()))
        elif column == "server_time":
            later = receipt_of(out[0]).server_time + dt.timedelta(days=1)
            await backend.set_columns(("B", 1), server_time=later if backend.name == "postgres" else format_time(later))
        else:
            await backend.set_columns(("B", 1), **{column: b"edited" if column == "header" else 7})
        listed = {e.num: e.text for e in (await store.unread_entries("B", [(0, 10)]))[0]}
        edited = 7 if column == "num" else 1
        assert sorted(listed) == sorted([edited, 2])
        for num, text in listed.items():
            assert text == QueuePage.encode((await store.get_message("B", num)).entry())
        assert listed[edited] != before

    with caplog.at_level(logging.WARNING, logger="msg_relay.server"):
        with_store(backend, body)
    assert not caplog.records  # nothing damaged: an entry the database dropped is made again silently


@pytest.mark.parametrize("receipt", ["[", "[1]", '{"msg_id":"x"}', "null"], ids=["cut", "array", "fields", "null"])
def test_a_row_damaged_beyond_its_text_is_not_served_and_says_so_once(backend: Backend, receipt: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    async def body(store: Any) -> None:
        await store.add_messages([sub(n) for n in (1, 2, 3)], sign)

    async def served(store: Any) -> list[Any]:
        return (await store.unread_entries("B", [(0, 10)]))[0]

    with_store(backend, body)
    run(backend.set_columns(("B", 2), entry="{}", receipt=receipt))
    with caplog.at_level(logging.WARNING, logger="msg_relay.server"):
        entries = with_store(backend, served)
    assert [(e.num, e.text is None) for e in entries] == [(1, False), (2, True), (3, False)]
    damaged = [r for r in caplog.records if "cannot be listed" in r.getMessage()]
    assert len(damaged) == 1 and damaged[0].getMessage().startswith("message 2 of B is damaged in the store (")
    assert not [r for r in caplog.records if r.exc_info]


def test_get_message_changes_nothing(backend: Backend) -> None:
    async def body(store: Any) -> None:
        (out,) = await store.add_messages([sub(1, body=b"secret envelope")], sign)
        usage = await store.unread_usage("B")
        for _ in range(2):
            msg = await store.get_message("B", 1)
            assert (msg.num, msg.sender, msg.recipient, msg.envelope, msg.read) == \
                   (1, "A", "B", b"secret envelope", False)
            assert msg.receipt == out[0]
        assert [e.num for e in await listed(store, "B", 0, 10)] == [1]
        assert await store.unread_usage("B") == usage
        assert await store.get_message("B", 2) is None
        assert await store.get_message("C", 1) is None  # another user's number 1 is not B's

    with_store(backend, body)


def test_mark_read_returns_freed_bytes_once(backend: Backend) -> None:
    async def body(store: Any) -> None:
        await store.add_messages([sub(1, header=b"hh", body=b"b" * 100), sub(2, header=b"h", body=b"x")], sign)
        assert await store.unread_usage("B") == (2, 102 + 2)
        assert await store.mark_read("B", 1) == 102
        assert await store.mark_read("B", 1) == 0  # already read: nothing more freed
        assert await store.unread_usage("B") == (1, 2)
        assert (await store.get_message("B", 1)).read is True  # still retrievable once read
        assert await store.mark_read("B", 3) is None
        assert await store.mark_read("C", 2) is None
        assert await store.mark_read("B", 2) == 2
        assert await store.unread_usage("B") == (0, 0)

    with_store(backend, body)


def test_unread_usage_counts_header_and_envelope(backend: Backend) -> None:
    async def body(store: Any) -> None:
        assert await store.unread_usage("B") == (0, 0)
        sizes = [(b"h" * 10, b"e" * 1000), (b"", b"e" * 7), (b"h" * 300, b"")]
        await store.add_messages([sub(n, header=h, body=e) for n, (h, e) in enumerate(sizes, 1)]
                                 + [sub(9, to="C", body=b"z" * 50)], sign)
        assert await store.unread_usage("B") == (3, 10 + 1000 + 7 + 300)
        assert await store.unread_usage("C") == (1, 1 + 50)

    with_store(backend, body)


def test_users_keep_their_certificate_history(backend: Backend) -> None:
    old, new, relay = b"cert one" * 40, b"cert two" * 40, b"relay cert" * 40

    async def body(store: Any) -> None:
        assert await store.get_user("U") is None
        await store.upsert_user("U", old)
        await store.upsert_user("U", old)  # the same again changes nothing
        assert await store.get_user("U") == old
        await store.upsert_user("U", new)
        assert await store.get_user("U") == new
        assert await store.get_user("U", cert_fingerprint(old)) == old  # renewed: the old one stays findable
        assert await store.get_user("U", cert_fingerprint(new)) == new
        assert await store.get_user("V", cert_fingerprint(old)) is None  # a fingerprint is the user's own
        assert await store.get_user("U", cert_fingerprint(b"never seen")) is None
        await store.upsert_user("U", old)
        assert await store.get_user("U") == old
        await store.add_certificate("MSG_SERVER", relay)
        await store.add_certificate("MSG_SERVER", relay)
        assert await store.get_user("MSG_SERVER") is None  # findable, but not a user
        assert await store.get_user("MSG_SERVER", cert_fingerprint(relay)) == relay

    with_store(backend, body)


def test_keys_are_put_and_replaced(backend: Backend) -> None:
    async def body(store: Any) -> None:
        assert await store.get_key("U") is None
        await store.put_key("U", KeyRecordWire(b"record 1", b"sig 1"))
        assert await store.get_key("U") == KeyRecordWire(b"record 1", b"sig 1")
        await store.put_key("U", KeyRecordWire(b"record 2", b"sig 2"))
        assert await store.get_key("U") == KeyRecordWire(b"record 2", b"sig 2")
        assert await store.get_key("V") is None

    with_store(backend, body)


def test_everything_persists_across_reopen(backend: Backend) -> None:
    async def first(store: Any) -> list[Any]:
        out = await store.add_messages([sub(1), sub(2), sub(3, to="C")], sign)
        await store.mark_read("B", 1)
        await store.upsert_user("U", b"cert one")
        await store.upsert_user("U", b"cert two")
        await store.put_key("U", KeyRecordWire(b"record", b"sig"))
        return out

    async def second(store: Any) -> None:
        assert [e.num for e in await listed(store, "B", 0, 10)] == [2]
        assert (await store.get_message("B", 1)).read is True
        assert await store.add_messages([sub(2)], sign) == [(out[1][0], False)]  # still idempotent
        assert receipt_of((await store.add_messages([sub(4)], sign))[0]).queue_number == 3  # numbering goes on
        assert await store.get_user("U") == b"cert two"
        assert await store.get_user("U", cert_fingerprint(b"cert one")) == b"cert one"
        assert await store.get_key("U") == KeyRecordWire(b"record", b"sig")
        assert await store.unread_usage("C") == (1, 2)

    out = with_store(backend, first)
    with_store(backend, second)


def test_a_newer_schema_is_refused(backend: Backend) -> None:
    async def body(store: Any) -> None:
        await store.add_messages([sub(1)], sign)

    with_store(backend, body)
    run(backend.make_schema_newer())
    with pytest.raises(StoreError, match="schema version"):
        with_store(backend, body)


# --- PostgreSQL: several nodes on one database ----------------------------------------------------------


async def nodes(dsn: str, count: int = 2) -> list[pgstore.PostgresStore]:
    return list(await asyncio.gather(*(pgstore.connect(dsn) for _ in range(count))))


async def close_all(stores: list[pgstore.PostgresStore]) -> None:
    await asyncio.gather(*(s.close() for s in stores))


def test_two_nodes_numbering_for_the_same_recipients_stay_dense(pg_dsn: str) -> None:
    """2 x 200 sends from two nodes at once, in batches that mix recipients in opposite orders (a lock
    order mistake would deadlock), each node with several batches in flight."""
    recipients = ["R1", "R2", "R3"]

    def batches(node: int) -> list[list[Submission]]:
        # a sender per batch, so that the batches do not queue behind one sender lock but race for the
        # counter rows: up to 20 transactions at once
        subs = [sub(node * 1000 + i, sender=f"S{node}.{i // 10}", to=recipients[i % 3 if node == 0 else 2 - i % 3])
                for i in range(200)]
        return [subs[i:i + 10] for i in range(0, 200, 10)]

    async def go() -> None:
        a, b = await nodes(pg_dsn)
        try:
            results = await asyncio.gather(*(store.add_messages(batch, sign) for node, store in enumerate((a, b))
                                             for batch in batches(node)))
            outcomes = [o for batch in results for o in batch]
            assert len(outcomes) == 400 and all(o[1] is True for o in outcomes)
            numbers: dict[str, list[int]] = {r: [] for r in recipients}
            for o in outcomes:
                numbers[receipt_of(o).recipient].append(receipt_of(o).queue_number)
            for r, nums in numbers.items():
                assert sorted(nums) == list(range(1, len(nums) + 1)), f"{r}: numbers not dense or not unique"
            stored: dict[str, int] = {}  # msg_id -> number, as another node reads the queues
            for r in recipients:
                for e in await listed(b, r, 0, 1000):
                    assert e.msg_id not in stored  # each (sender, msg_id) once
                    stored[e.msg_id] = e.num
            assert len(stored) == 400
            for batch in batches(0) + batches(1):  # within a batch, numbers follow the batch's order
                for r in recipients:
                    nums = [stored[s.msg_id] for s in batch if s.recipient == r]
                    assert nums == sorted(nums)
        finally:
            await close_all([a, b])

    run(go())


def test_the_same_submissions_through_two_nodes_store_once(pg_dsn: str) -> None:
    """A client retrying on another node while the first still commits: one row, one receipt for both;
    a different message under the same id on the other node is a duplicate, whichever commits first."""
    same = [sub(i, sender=f"A{i % 5}", to=f"R{i % 4}") for i in range(120)]  # batches lock several senders
    clash_a = [sub(500 + i, to="R0", body=b"version a") for i in range(30)]
    clash_b = [sub(500 + i, to="R1", body=b"version b") for i in range(30)]

    async def go() -> None:
        a, b = await nodes(pg_dsn)
        try:
            forward, backward = same[:], same[::-1]
            random.Random(7).shuffle(forward)
            jobs = [a.add_messages(forward[i:i + 15], sign) for i in range(0, 120, 15)]
            jobs += [b.add_messages(backward[i:i + 15], sign) for i in range(0, 120, 15)]
            jobs += [a.add_messages(clash_a, sign), b.add_messages(clash_b, sign)]
            results = await asyncio.gather(*jobs)
            by_id: dict[str, list[tuple[Receipt, bool]]] = {}
            sent = [forward[i:i + 15] for i in range(0, 120, 15)] + [backward[i:i + 15] for i in range(0, 120, 15)]
            for batch_in, out in zip(sent, results[:-2], strict=True):
                for s, o in zip(batch_in, out):
                    by_id.setdefault(s.msg_id, []).append(o)
            assert len(by_id) == 120
            for msg_id, pair in by_id.items():
                assert len(pair) == 2 and pair[0][0] == pair[1][0], msg_id  # both nodes: the same receipt
                assert sorted(created for _, created in pair) == [False, True]  # stored by exactly one
            clash = list(zip(results[-2], results[-1]))
            for oa, ob in clash:  # one stored (created), the other refused
                assert sorted([isinstance(oa, DuplicateMessage), isinstance(ob, DuplicateMessage)]) == [False, True]
                assert (ob if isinstance(oa, DuplicateMessage) else oa)[1] is True
            kept = Counter("a" if isinstance(ob, DuplicateMessage) else "b" for oa, ob in clash)
            unread = {r: await listed(a, r, 0, 1000) for r in ("R0", "R1", "R2", "R3")}
            for entries in unread.values():
                assert [e.num for e in entries] == list(range(1, len(entries) + 1))
            assert len(unread["R0"]) == 30 + kept["a"] and len(unread["R1"]) == 30 + kept["b"]
            assert sum(len(v) for v in unread.values()) == 150
        finally:
            await close_all([a, b])

    run(go())


def test_racing_nodes_migrate_a_fresh_database_once(pg_dsn: str) -> None:
    async def go() -> None:
        stores = await nodes(pg_dsn, 4)
        try:
            conn = await asyncpg.connect(pg_dsn)
            try:
                versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
            finally:
                await conn.close()
            assert sorted(versions) == list(range(1, pgstore.SCHEMA_VERSION + 1))
            assert all([await s.schema_version() == pgstore.SCHEMA_VERSION for s in stores])
        finally:
            await close_all(stores)

    run(go())


def test_migrations_run_in_order_and_once(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(pgstore.migrate_only(pg_dsn)) == pgstore.SCHEMA_VERSION
    assert run(pgstore.migrate_only(pg_dsn)) == pgstore.SCHEMA_VERSION  # nothing to do the second time
    # a later release adds a migration: only that one runs (a plain CREATE TABLE would fail if run twice)
    monkeypatch.setattr(pgstore, "MIGRATIONS", (*pgstore.MIGRATIONS, "CREATE TABLE later (x INTEGER)"))
    monkeypatch.setattr(pgstore, "SCHEMA_VERSION", len(pgstore.MIGRATIONS))
    assert run(pgstore.migrate_only(pg_dsn)) == pgstore.SCHEMA_VERSION
    assert run(pgstore.migrate_only(pg_dsn)) == pgstore.SCHEMA_VERSION

    async def check() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM later") == 0
            assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == pgstore.SCHEMA_VERSION
        finally:
            await conn.close()

    run(check())


def test_a_schema_1_postgres_database_gets_the_entry_texts_of_its_unread_messages(
        pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """Migration 2 adds the column; the node that ran it fills the texts of the unread messages as the relay
    would have stored them (read ones are never listed); a damaged row is left without one (and said when
    listed, not at every start: see test_a_row_damaged_beyond_its_text_is_not_served_and_says_so_once)."""
    async def go() -> None:
        store = await pgstore.connect(pg_dsn)
        try:
            await store.add_messages([sub(n) for n in range(1, 6)] + [sub(9, to="C")], sign)
            texts = {(uid, e.num): e.text for uid in ("B", "C") for e in (await store.unread_entries(uid, [(0, 9)]))[0]}
            await store.mark_read("B", 4)
        finally:
            await store.close()
        conn = await asyncpg.connect(pg_dsn)
        try:  # what a relay before entry texts left
            await conn.execute("DROP TRIGGER messages_entry_stale ON messages; DROP FUNCTION messages_entry_stale();"
                               " ALTER TABLE messages DROP COLUMN entry; DELETE FROM schema_migrations WHERE version=2;"
                               " UPDATE messages SET receipt='[' WHERE recipient='B' AND num=3")
            with caplog.at_level(logging.WARNING, logger="msg_relay.server"):
                store = await pgstore.connect(pg_dsn)
            await store.close()
            stored = {(r["recipient"], r["num"]): r["entry"] for r in await conn.fetch("SELECT * FROM messages")}
            assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 2
            await conn.execute("UPDATE messages SET header='\\x00' WHERE recipient='B' AND num=1")  # drops its text
            assert await conn.fetchval("SELECT entry FROM messages WHERE recipient='B' AND num=1") is None
        finally:
            await conn.close()
        assert stored == texts | {("B", 3): None, ("B", 4): None}
        assert [r.getMessage() for r in caplog.records if "cannot be listed" in r.getMessage()] == []

    run(go())


def test_texts_missing_at_any_start_are_made_then(pg_dsn: str) -> None:
    """A row without its text (stored by a node of an older version, or left by a node stopped midway through
    the fill) gets it at the next start of any node, not only when the migration runs."""
    async def go() -> None:
        store = await pgstore.connect(pg_dsn)
        try:
            await store.add_messages([sub(n) for n in (1, 2)], sign)
            texts = {e.num: e.text for e in (await store.unread_entries("B", [(0, 9)]))[0]}
        finally:
            await store.close()
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("UPDATE messages SET entry=NULL")  # no column a text is made of: no trigger
            store = await pgstore.connect(pg_dsn)
            await store.close()
            stored = {r["num"]: r["entry"] for r in await conn.fetch("SELECT num, entry FROM messages")}
        finally:
            await conn.close()
        assert stored == texts and None not in stored.values()

    run(go())


def test_a_failed_migration_leaves_the_old_version(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run(pgstore.migrate_only(pg_dsn))
    monkeypatch.setattr(pgstore, "MIGRATIONS", (*pgstore.MIGRATIONS, "CREATE TABLE half (x INTEGER); SELECT 1/0"))
    monkeypatch.setattr(pgstore, "SCHEMA_VERSION", len(pgstore.MIGRATIONS))
    with pytest.raises(StoreError, match="division by zero"):
        run(pgstore.migrate_only(pg_dsn))
    monkeypatch.undo()

    async def check() -> None:
        store = await pgstore.connect(pg_dsn)  # the advisory lock was released: this does not hang
        try:
            assert await store.schema_version() == pgstore.SCHEMA_VERSION
            assert await store._pool.fetchval("SELECT to_regclass('half')") is None
        finally:
            await store.close()

    run(check())


def test_commits_are_synchronous_even_if_the_dsn_says_otherwise(pg_dsn: str) -> None:
    async def go() -> None:
        store = await pgstore.connect(pg_dsn + "&synchronous_commit=off")
        try:
            assert await store._pool.fetchval("SHOW synchronous_commit") == "on"
        finally:
            await store.close()

    run(go())


def test_a_batch_that_fails_midway_stores_nothing(pg_dsn: str) -> None:
    calls = 0

    def failing_sign(receipt: Receipt) -> Receipt:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("signing key unavailable")
        return sign(receipt)

    async def go() -> None:
        store = await pgstore.connect(pg_dsn)
        try:
            with pytest.raises(RuntimeError, match="signing key"):
                await store.add_messages([sub(1), sub(2, to="C"), sub(3), sub(4)], failing_sign)
            assert calls == 3
            assert await listed(store, "B", 0, 10) == [] and await listed(store, "C", 0, 10) == []
            out = await store.add_messages([sub(3), sub(1), sub(2, to="C")], sign)  # counters were rolled back
            assert [(receipt_of(o).queue_number, o[1]) for o in out] == [(1, True), (2, True), (1, True)]
        finally:
            await store.close()

    run(go())


def test_a_connection_killed_midway_stores_nothing(pg_dsn: str) -> None:
    """The backend serving the batch is terminated after the numbers were taken and before the insert
    (from the sign callback, which runs inside the transaction): the batch fails, nothing remains."""
    killed: list[bool] = []

    def kill_own_backend() -> None:
        async def kill() -> None:
            conn = await asyncpg.connect(pg_dsn)
            try:
                killed.extend(r[0] for r in await conn.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'msg-relay' AND state LIKE 'idle in transaction%'"))
            finally:
                await conn.close()

        thread = threading.Thread(target=asyncio.run, args=(kill(),))
        thread.start()
        thread.join(DEADLINE)

    def sign_then_kill(receipt: Receipt) -> Receipt:
        if not killed:
            kill_own_backend()
        return sign(receipt)

    async def go() -> None:
        store = await pgstore.connect(pg_dsn)
        try:
            await store.add_messages([sub(100, to="Z")], sign)  # numbers taken before, for contrast
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
                await store.add_messages([sub(1), sub(2), sub(3, to="Z")], sign_then_kill)
            assert killed == [True]
            assert await listed(store, "B", 0, 10) == []
            assert [e.num for e in await listed(store, "Z", 0, 10)] == [1]
            out = await store.add_messages([sub(1), sub(2), sub(3, to="Z")], sign)
            assert [(receipt_of(o).queue_number, o[1]) for o in out] == [(1, True), (2, True), (2, True)]
        finally:
            await store.close()

    run(go())


def test_put_crl_never_goes_back(pg_dsn: str) -> None:
    issuer, other = b"\x01" * 32, b"\x02" * 32
    big = 2**159 - 1  # CRL numbers may take 20 octets (RFC 5280 5.2.3)

    async def go() -> None:
        a, b = await nodes(pg_dsn)
        try:
            assert await a.get_crls() == []
            assert await a.put_crl(issuer, 5, b"crl 5") is True
            assert await a.put_crl(issuer, 3, b"crl 3") is False
            assert await a.put_crl(issuer, 5, b"another crl 5") is False  # same number: the first stays
            assert await b.get_crls() == [pgstore.StoredCrl(issuer, 5, b"crl 5")]
            assert await b.put_crl(issuer, 6, b"crl 6") is True
            # both nodes store a shuffled run of CRLs at once: the highest number wins, whatever the order
            numbers = list(range(7, 107))
            random.Random(3).shuffle(numbers)
            await asyncio.gather(*(node.put_crl(issuer, n, b"crl %d" % n) for i, n in enumerate(numbers)
                                   for node in ((a, b) if i % 2 else (b, a))))
            await a.put_crl(other, big, b"big")
            assert await a.get_crls() == [pgstore.StoredCrl(issuer, 106, b"crl 106"),
                                          pgstore.StoredCrl(other, big, b"big")]
        finally:
            await close_all([a, b])

    run(go())


def test_an_unreachable_server_is_a_store_error() -> None:
    """No PostgreSQL needed: port 1 on the loopback refuses at once."""
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL"):
        run(pgstore.connect("postgresql://postgres@127.0.0.1:1/none"))
