"""Queue pages asked for in ranges, pipelined (issue 14): the same entries, and no new way to lie.

A relay that says ``ranges`` answers ``queue`` with ``upto``; the client then asks for a window of
ranges at once. The relay's answers are checked as strictly as sequential pages were: numbers go up,
stay in the range asked for, end. A relay without ``ranges`` is paged one page at a time as before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from pathlib import Path

import pytest

from client import operations
from client.connection import ClientError, RelayClient
from pki.keystore import load_keystore
from protocol.encoding import utc_now
from protocol.envelope import InnerMessage, seal
from protocol.keyrecord import parse_signed_record
from protocol.messages import QueueRequest, QueueResult, parse_request, request_to_wire

from .harness import private_client, private_pki, private_relay
from .hostile_relay import CLOSE, HostileRelay

UIDS = ("ALICE", "BOB")
MESSAGES = 40


@pytest.fixture()
def pki(tmp_path: Path) -> Path:
    private_pki(tmp_path, UIDS)
    return tmp_path


def _client(directory: Path, port: int, uid: str) -> RelayClient:
    store = load_keystore(directory / f"{uid}.p12")
    return RelayClient(store, "127.0.0.1", port, store.ca_certificates(), timeout=10)


async def _fill(directory: Path, port: int, n: int) -> None:
    """``n`` messages from Alice to Bob, sealed to Bob's published key, pipelined."""
    bob = load_keystore(directory / "BOB.p12")
    async with _client(directory, port, "ALICE") as alice:
        entry = await alice.directory("BOB")
        assert entry.key is not None
        record = parse_signed_record(entry.key.record, entry.key.signature, "BOB", bob.cert.public_key())  # type: ignore[arg-type]
        requests = []
        for i in range(n):
            msg_id = secrets.token_hex(16)
            sealed = seal(InnerMessage("ALICE", "BOB", msg_id, utc_now(), f"s{i}", b"b"), alice.keystore.key, record)
            requests.append(alice.send_request("BOB", msg_id, sealed))
        assert all(not isinstance(r, Exception) for r in await alice.pipeline(requests))


def test_ranges_list_what_pages_list_gaps_included(pki, monkeypatch):
    monkeypatch.setattr(operations, "QUEUE_WINDOW", 3)  # several windows, and gaps that end one
    server = private_relay(pki)
    try:
        assert private_client(server, pki, "BOB", "askqueue").code == 0  # Bob's key published
        asyncio.run(_fill(pki, server.port, MESSAGES))
        read = {2, 3, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 40}

        async def go() -> tuple[list[int], list[int]]:
            async with _client(pki, server.port, "BOB") as bob:
                for num in sorted(read):
                    await bob.mark_read(num)
                ranged = [e.num for e in await bob.queue()]
                sequential = []
                after = 0
                while True:  # one page at a time, as a client before ranges asked
                    page = await bob.request(QueueRequest(bob.next_id(), after))
                    assert isinstance(page, QueueResult) and page.ranges
                    sequential += [e.num for e in page.entries]
                    if not page.more:
                        return ranged, sequential
                    after = page.entries[-1].num

        ranged, sequential = asyncio.run(go())
        assert ranged == sequential == [n for n in range(1, MESSAGES + 1) if n not in read]
        listed = private_client(server, pki, "BOB", "askqueue")
        assert listed.code == 0 and len(listed.out.splitlines()) == MESSAGES - len(read)
        assert ":(unverifiable)" not in listed.out
    finally:
        server.stop()


def test_a_range_answer_stays_in_its_range(pki):
    server = private_relay(pki)
    try:
        assert private_client(server, pki, "BOB", "askqueue").code == 0
        asyncio.run(_fill(pki, server.port, 12))

        async def go() -> None:
            async with _client(pki, server.port, "BOB") as bob:
                page = await bob.request(QueueRequest(bob.next_id(), 3, 6))
                assert isinstance(page, QueueResult) and [e.num for e in page.entries] == [4, 5, 6]
                assert page.more is False and page.ranges is True
                await bob.mark_read(5)  # a gap: reading three rows above 3 now reaches 7, beyond the range
                page = await bob.request(QueueRequest(bob.next_id(), 3, 6))
                assert isinstance(page, QueueResult) and [e.num for e in page.entries] == [4, 6]
                empty = await bob.request(QueueRequest(bob.next_id(), 6, 6))
                assert isinstance(empty, QueueResult) and empty.entries == [] and not empty.more

        asyncio.run(go())
    finally:
        server.stop()


def test_upto_is_optional_on_the_wire():
    """A relay that predates ranges never sees the field; one that knows it reads it back."""
    assert "upto" not in request_to_wire(QueueRequest(1, 5))
    assert parse_request(request_to_wire(QueueRequest(1, 5, 9))) == QueueRequest(1, 5, 9)
    assert parse_request({"v": 1, "id": 1, "op": "queue"}) == QueueRequest(1, 0, None)
    assert "ranges" not in QueueResult([], False).to_wire()


# ------------------------------------------------------------------------------- a relay that lies
@pytest.fixture()
def relay(pki: Path):
    with HostileRelay(pki) as hostile:
        hostile.enroll(*UIDS)
        yield hostile


def _entries(relay: HostileRelay, nums: range) -> list:
    from .test_checks_client import _sealed

    entry = relay.store("ALICE", "BOB", "c" * 32, _sealed(), num=1).entry()
    return [dataclasses.replace(entry, num=n) for n in nums]


def _queue(relay: HostileRelay) -> list[int]:
    async def go() -> list[int]:
        store = load_keystore(relay.directory / "BOB.p12")
        async with RelayClient(store, "127.0.0.1", relay.port, store.ca_certificates(), timeout=5) as c:
            return [e.num for e in await c.queue()]
    return asyncio.run(go())


@pytest.mark.parametrize("lie", ["beyond upto", "at or below after"])
def test_a_range_answer_outside_the_range_is_refused(relay, lie):
    entries = {e.num: e for e in _entries(relay, range(1, 200))}

    def answer(obj: dict, uid: str) -> object:
        after, upto = obj.get("after", 0), obj.get("upto")
        if upto is None:
            return QueueResult([entries[after + 1], entries[after + 2]], True, True)
        wrong = upto + 1 if lie == "beyond upto" else after
        return QueueResult([entries[max(wrong, 1)]], False, True)

    relay.answers["queue"] = answer
    message = "queue entries outside the range asked for" if lie == "beyond upto" else "queue pages do not advance"
    with pytest.raises(ClientError, match=message):
        _queue(relay)


def test_an_empty_range_page_that_says_more_is_refused(relay):
    entries = {e.num: e for e in _entries(relay, range(1, 10))}

    def answer(obj: dict, uid: str) -> object:
        if obj.get("upto") is None:
            return QueueResult([entries[1], entries[2]], True, True)
        return QueueResult([], True, True)

    relay.answers["queue"] = answer
    with pytest.raises(ClientError, match="queue pages do not advance"):
        _queue(relay)


def test_ranges_that_never_end_stop_at_the_bound(relay, monkeypatch):
    """Every range full and ``more`` on every open page: the client stops at its bound (10 here); the relay
    hangs up after 400 requests, so a client without the bound fails here instead of growing."""
    monkeypatch.setattr(operations, "MAX_QUEUE_ENTRIES", 10)
    template = _entries(relay, range(1, 2))[0]
    asked = []

    def answer(obj: dict, uid: str) -> object:
        asked.append(obj)
        if len(asked) > 400:
            return CLOSE
        after, upto = obj.get("after", 0), obj.get("upto")
        last = after + 2 if upto is None else upto
        return QueueResult([dataclasses.replace(template, num=n) for n in range(after + 1, last + 1)], True, True)

    relay.answers["queue"] = answer
    with pytest.raises(ClientError, match="more than 10 unread messages listed"):
        _queue(relay)
    assert len(asked) <= 1 + operations.QUEUE_WINDOW


def test_ranges_empty_but_the_last_stop_at_the_request_bound(relay, monkeypatch):
    """Each window holds one entry, in its last range, so the client keeps asking window after window
    while holding few entries: it stops after 2 x MAX_QUEUE_ENTRIES + QUEUE_WINDOW_MAX requests (48 here),
    before the entry bound, its windows never wider than QUEUE_WINDOW_MAX (4, 8, 8 ...); the relay hangs up
    after 200, so a client without the bound fails here."""
    monkeypatch.setattr(operations, "MAX_QUEUE_ENTRIES", 20)
    monkeypatch.setattr(operations, "QUEUE_WINDOW", 4)
    monkeypatch.setattr(operations, "QUEUE_WINDOW_MAX", 8)
    template = _entries(relay, range(1, 2))[0]
    asked = []

    def answer(obj: dict, uid: str) -> object:
        asked.append(obj)
        if len(asked) > 200:
            return CLOSE
        upto = obj.get("upto")
        if upto is None:
            return QueueResult([dataclasses.replace(template, num=obj.get("after", 0) + 1)], True, True)
        return QueueResult([dataclasses.replace(template, num=upto)] if upto % 4 == 1 else [], False, True)

    relay.answers["queue"] = answer
    with pytest.raises(ClientError, match="queue pages do not end"):
        _queue(relay)
    assert len(asked) <= 2 * 20 + 8 + 8  # windows of 16 and 32 would have made it 61
