"""Queue pages served cheaply (issue 14): entries' wire texts kept with their messages, pages read from
the store a window at a time, and nothing on the wire changed by it.

A page of stored texts must frame byte for byte as a page of typed entries did, still hold the frame
limit, and a damaged row must cost its own page one clear error, never the others' or the session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import secrets
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from client.connection import RelayClient
from pki.keystore import load_keystore
from pki.tls import client_context
from protocol.envelope import Sealed
from protocol.frames import MAX_FRAME, MAX_FRAME_LIMIT, FrameDecoder, decode_payload, encode_frame
from protocol.messages import (
    HelloRequest,
    MarkReadRequest,
    QueueEntry,
    QueuePage,
    QueueRequest,
    QueueResult,
    encode_response,
    ok_response,
    request_to_wire,
)
from protocol.receipts import Receipt

from .harness import private_pki, private_relay, raw_session

DEADLINE = 20.0
NOW = dt.datetime(2026, 11, 25, 8, 0, 0, 123456, tzinfo=dt.timezone.utc)


def _entries(count: int, header: int = 1500) -> list[QueueEntry]:
    receipt = Receipt("a" * 32, "ALICE", "BOB", bytes(32), NOW, 1, bytes(32), bytes(72))
    return [QueueEntry(n, "ALICE", f"{n:032x}", NOW, 3, bytes([n % 256]) * header,
                       dataclasses.replace(receipt, queue_number=n), bytes(32)) for n in range(1, count + 1)]


def _both_pages(entries: list[QueueEntry], rid: Any, max_frame: int = MAX_FRAME,
                ranges: bool = True) -> tuple[QueueResult, QueueResult]:
    """A page filled with the entries' stored texts (as the relay does), and the same entries as a typed
    page (as a page was encoded before texts were kept)."""
    page = QueuePage(rid, max_frame, ranges)
    more = not all(page.add_encoded(QueuePage.encode(e)) for e in entries)
    return QueueResult(entries[:len(page.texts)], more, ranges), page.result(more)


# ------------------------------------------------------------------------------ the wire, unchanged
@pytest.mark.parametrize("rid", [7, "page-3", "é🙂\u2028\"x\\", 2**53 - 1], ids=["int", "str", "unicode", "widest"])
@pytest.mark.parametrize("count", [0, 1, 3, 30], ids=lambda n: f"{n}-entries")
@pytest.mark.parametrize("ranges", [True, False], ids=["ranges", "no-ranges"])
def test_a_page_of_stored_texts_frames_byte_for_byte_as_a_page_of_entries(rid, count, ranges):
    typed, texts = _both_pages(_entries(count), rid, ranges=ranges)
    assert [e.num for e in typed.entries] == list(range(1, len(typed.entries) + 1))
    expected = encode_frame(ok_response(rid, typed))
    frame, overflow = encode_response(ok_response(rid, texts), MAX_FRAME)
    assert overflow is None and frame == expected
    assert decode_payload(frame[4:])["messages"] == [e.to_wire() for e in typed.entries]
    if count == 30:
        assert typed.more and texts.more and len(frame) <= MAX_FRAME + 4


def test_an_entry_that_alone_cannot_fit_gives_an_empty_page_that_says_more_as_before():
    typed, texts = _both_pages(_entries(1, header=9000), 1)
    assert typed.entries == [] and typed.more and texts.more
    assert encode_response(ok_response(1, texts), MAX_FRAME)[0] == encode_frame(ok_response(1, typed))


def test_a_page_of_texts_that_outgrows_the_frame_is_too_large_and_names_its_request():
    """Whatever texts a page was handed (a page filled past its budget), no frame goes over the limit."""
    texts = [QueuePage.encode(e) for e in _entries(8)]
    response = ok_response("q1", QueueResult([], True, True, QueuePage.Encoded(texts)))
    frame, overflow = encode_response(response, MAX_FRAME)
    assert overflow is not None and overflow.code.value == "too_large"
    answer = decode_payload(frame[4:])
    assert answer["id"] == "q1" and answer["ok"] is False and answer["error"]["code"] == "too_large"
    assert len(frame) <= MAX_FRAME + 4


def test_plain_json_refuses_stored_texts_rather_than_send_them_as_strings():
    _, texts = _both_pages(_entries(2), 1)
    with pytest.raises(TypeError):
        encode_frame(ok_response(1, texts))


def test_stored_texts_are_ascii_so_their_length_is_their_size():
    entry = dataclasses.replace(_entries(1)[0], sender="ÉLODIE")  # not a valid UID: the encoding must hold anyway
    text = QueuePage.encode(entry)
    assert text.isascii() and json.loads(text)["from"] == "ÉLODIE"


# ------------------------------------------------------------------------------ a real relay
UIDS = ("ALICE", "BOB")


@pytest.fixture()
def pki(tmp_path: Path) -> Path:
    private_pki(tmp_path, UIDS)
    return tmp_path


def _client(directory: Path, port: int, uid: str) -> RelayClient:
    store = load_keystore(directory / f"{uid}.p12")
    return RelayClient(store, "127.0.0.1", port, store.ca_certificates(), timeout=DEADLINE)


def _fill(directory: Path, port: int, count: int) -> None:
    """``count`` messages from Alice to Bob (the relay stores sealed bytes as given), pipelined."""
    async def go() -> None:
        async with _client(directory, port, "ALICE") as alice:
            requests = [alice.send_request("BOB", secrets.token_hex(16), Sealed(2, secrets.token_bytes(1200),
                                                                                  secrets.token_bytes(300)))
                        for _ in range(count)]
            assert not [r for r in await alice.pipeline(requests) if isinstance(r, Exception)]
    asyncio.run(go())


def _frames(*requests: Any) -> bytes:
    return b"".join(encode_frame(request_to_wire(r)) if not isinstance(r, bytes) else r for r in requests)


def _audit(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "audit.log").read_text().splitlines()]


def _tamper(directory: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(directory / "relay.db", isolation_level=None)
    try:
        assert conn.execute(sql, args).rowcount == 1
    finally:
        conn.close()


def test_a_window_of_ranges_is_answered_in_order_around_other_requests(pki, monkeypatch):
    """Ranges, a malformed frame, a mark_read and more ranges in one batch: each run of ranges read from
    the store at once, every answer in request order, the pages what pages asked one by one give, one
    audit line per request."""
    server = private_relay(pki)
    try:
        _fill(pki, server.port, 12)
        reads = _spy_reads(server, monkeypatch)
        bob = load_keystore(pki / "BOB.p12")
        batch = _frames(*(QueueRequest(i, 2 * (i - 1), 2 * i) for i in range(1, 4)),
                        encode_frame({"v": 1, "id": 4, "op": "queue", "after": "x"}), MarkReadRequest(5, 2),
                        *(QueueRequest(i, 2 * (i - 6), 2 * (i - 5)) for i in range(6, 9)), HelloRequest(9))
        answers = asyncio.run(raw_session(server.port, bob, batch, until=9, deadline=DEADLINE))
        assert [a["id"] for a in answers] == list(range(1, 10))
        assert reads == [[(0, 2), (2, 2), (4, 2)], [(0, 2), (2, 2), (4, 2)]]
        pages = {a["id"]: [m["num"] for m in a["messages"]] for a in answers if "messages" in a}
        assert pages == {1: [1, 2], 2: [3, 4], 3: [5, 6], 6: [1], 7: [3, 4], 8: [5, 6]}
        assert all(a["more"] is False and a["ranges"] is True for a in answers if "messages" in a)
        assert answers[3]["ok"] is False and answers[3]["error"]["code"] == "bad_request"
        assert answers[4] == {"v": 1, "id": 5, "ok": True}
        queue_lines = [e for e in _audit(pki) if e.get("op") == "queue" and e.get("uid") == "BOB"]
        assert len(queue_lines) == 6 and all(e["result"] == "ok" for e in queue_lines)
    finally:
        server.stop()


def _spy_reads(server: Any, monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[int, int]]]:
    """Every read of queue pages the relay's store is asked for, as the list of its (after, limit)."""
    assert server.server is not None
    backend = server.server.store.backend
    reads: list[list[tuple[int, int]]] = []
    original = backend.unread_entries

    async def counted(uid: str, asks: list) -> list:
        reads.append(list(asks))
        return await original(uid, asks)

    monkeypatch.setattr(backend, "unread_entries", counted)
    return reads


def test_with_the_largest_frames_a_window_is_read_a_page_at_a_time(pki, monkeypatch):
    """Pages answered together are held together: with megabyte frames, one at a time, as before."""
    server = private_relay(pki, max_frame=MAX_FRAME_LIMIT)
    try:
        _fill(pki, server.port, 6)
        reads = _spy_reads(server, monkeypatch)
        batch = _frames(*(QueueRequest(i, 2 * (i - 1), 2 * i) for i in range(1, 4)))
        answers = asyncio.run(raw_session(server.port, load_keystore(pki / "BOB.p12"), batch, until=3,
                                          deadline=DEADLINE))
        assert [[m["num"] for m in a["messages"]] for a in answers] == [[1, 2], [3, 4], [5, 6]]
        assert reads == [[(0, 2)], [(2, 2)], [(4, 2)]]
    finally:
        server.stop()


def test_a_tampered_entry_text_is_listed_from_its_row_and_a_damaged_row_fails_only_its_page(pki, caplog):
    """Message 2's stored text is not JSON: it is made again from its columns, unchanged for the client.
    Message 5's text and receipt are both broken: its page (only) gets one clear error line; the pages
    around it in the same window and the session go on, and no traceback is logged."""
    server = private_relay(pki)
    try:
        _fill(pki, server.port, 8)

        async def listing() -> list[list[int]]:
            async with _client(pki, server.port, "BOB") as bob:
                return [[e.num for e in page.entries] for page in await bob.pipeline(  # type: ignore[union-attr]
                    [QueueRequest(bob.next_id(), a, a + 2) for a in (0, 2, 6)])]

        before = asyncio.run(listing())
        _tamper(pki, "UPDATE messages SET entry=? WHERE recipient='BOB' AND num=2", '{"num":2,"from":"ALICE"]')
        _tamper(pki, "UPDATE messages SET entry='{}', receipt='[' WHERE recipient='BOB' AND num=5")
        with caplog.at_level(logging.WARNING, logger="msg_relay.server"):
            assert asyncio.run(listing()) == before == [[1, 2], [3, 4], [7, 8]]
            bob = load_keystore(pki / "BOB.p12")
            batch = _frames(*(QueueRequest(i, 2 * (i - 1), 2 * i) for i in range(1, 5)), HelloRequest(5))
            answers = asyncio.run(raw_session(server.port, bob, batch, until=5, deadline=DEADLINE))
        assert [a["id"] for a in answers] == [1, 2, 3, 4, 5]
        assert [[m["num"] for m in a["messages"]] for a in answers if "messages" in a] == [[1, 2], [3, 4], [7, 8]]
        assert answers[2]["ok"] is False and answers[2]["error"] == {
            "code": "internal",
            "message": "message 5 in your queue is damaged in the relay's store: it cannot be listed"}
        assert answers[4]["ok"] is True and answers[4]["max_frame"] == MAX_FRAME
        damaged = [r for r in caplog.records if "cannot be listed" in r.getMessage()]
        assert damaged and all("message 5 of BOB" in r.getMessage() for r in damaged)
        assert any("message 2 of BOB is damaged: made again" in r.getMessage() for r in caplog.records)
        assert not [r for r in caplog.records if r.exc_info]
    finally:
        server.stop()


def test_a_store_failure_answers_every_page_of_the_window_and_the_session_goes_on(pki, monkeypatch):
    server = private_relay(pki)
    try:
        _fill(pki, server.port, 4)
        assert server.server is not None
        backend = server.server.store.backend

        async def broken(uid: str, asks: list) -> list:
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(backend, "unread_entries", broken)
        bob = load_keystore(pki / "BOB.p12")
        batch = _frames(QueueRequest(1, 0, 2), QueueRequest(2, 2, 4), HelloRequest(3))
        answers = asyncio.run(raw_session(server.port, bob, batch, until=3, deadline=DEADLINE))
        assert [(a["id"], a["ok"]) for a in answers] == [(1, False), (2, False), (3, True)]
        assert {a["error"]["code"] for a in answers[:2]} == {"internal"}
    finally:
        server.stop()


def test_a_client_that_pipelines_ranges_and_never_reads_costs_a_window(pki):
    """1000 pipelined range requests of four entries each, never read: the relay stops reading and
    answering with at most a window of pages and the write buffer held; once the client reads, every
    answer arrives, in order."""
    server = private_relay(pki)
    total = 1000
    try:
        _fill(pki, server.port, 200)
        bob = load_keystore(pki / "BOB.p12")
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        raw.settimeout(DEADLINE)
        raw.connect(("127.0.0.1", server.port))
        tls = client_context(bob, bob.ca_certificates()).wrap_socket(raw, server_hostname="127.0.0.1")
        tls.sendall(_frames(*(QueueRequest(i, 4 * (i % 50), 4 * (i % 50) + 4) for i in range(1, total + 1))))

        def progress() -> tuple[int, int]:
            async def buffered() -> int:
                assert server.server is not None
                return max((s.writer.transport.get_write_buffer_size()
                            for s in server.server._sessions.values() if s.peer is not None), default=0)
            answered = sum(1 for e in _audit(pki) if e.get("uid") == "BOB" and e.get("op") == "queue")
            return answered, server.call(buffered())

        seen, still_since, deadline = (-1, 0), time.monotonic(), time.monotonic() + DEADLINE
        while time.monotonic() < deadline:  # until the relay stops making progress (a busy machine: later)
            now = progress()
            if now[0] != seen[0]:
                seen, still_since = now, time.monotonic()
            elif time.monotonic() - still_since > 0.5:
                break
            time.sleep(0.05)
        assert seen[0] < total
        assert progress()[1] <= 256 * 1024
        decoder, answers = FrameDecoder(), []
        while len(answers) < total:
            data = tls.recv(65536)
            assert data, "connection closed before every answer arrived"
            answers += [decode_payload(p) for p in decoder.feed(data)]
        assert [a["id"] for a in answers] == list(range(1, total + 1))
        assert all(len(a["messages"]) == 4 and not a["more"] for a in answers)
        tls.close()
    finally:
        server.stop()
