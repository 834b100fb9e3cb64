"""Crash safety: SIGKILL the relay at random moments while clients send; nothing acknowledged is lost.

Clients retry a send (same msg_id, same bytes) until they hold a receipt, as a real client would after
a lost connection; the relay's idempotent store must neither lose a receipted message nor store one
twice, and the database must stay consistent.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
from pathlib import Path

import asyncpg
import pytest
from cryptography import x509

from client.connection import ClientError, RelayClient
from client.keys import Keyring
from client.state import ClientState
from pki.keystore import load_keystore
from protocol.encoding import utc_now
from protocol.envelope import (
    InnerMessage,
    Sealed,
    ciphertext_digest,
    open_envelope,
    seal,
)
from protocol.receipts import Receipt

from .harness import RelayProcess

ROOT = Path(__file__).resolve().parent.parent
SENDERS = ("MSG_CLI1", "MSG_CLI3")
RECIPIENT = "MSG_CLI2"
CLIENTS_PER_SENDER = 2
KILLS = 5
SENDS_PER_LIFE = 25  # receipts each relay instance gives before it may be killed: KILLS+1 lives, > 100 in all
DEADLINE = 60.0  # seconds; only a relay that never comes back or never serves waits this long


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path) -> str:
    """The store under test: the same crash test for both (a PostgreSQL DSN on a fresh schema)."""
    return str(tmp_path / "relay.db") if request.param == "sqlite" else request.getfixturevalue("pg_dsn")


def stored_rows(db: str) -> list[tuple]:
    """(num, sender, msg_id, envelope_version, header, envelope) of the recipient's messages, after
    checking the database's own consistency where it has a check."""
    if db.startswith("postgresql://"):
        async def fetch() -> list[tuple]:
            conn = await asyncpg.connect(db)
            try:
                rows = await conn.fetch("SELECT num, sender, msg_id, envelope_version, header, envelope FROM messages"
                                        " WHERE recipient=$1", RECIPIENT)
            finally:
                await conn.close()
            return [tuple(r) for r in rows]
        return asyncio.run(fetch())
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return conn.execute("SELECT num, sender, msg_id, envelope_version, header, envelope FROM messages "
                        "WHERE recipient=?", (RECIPIENT,)).fetchall()


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_message(demo_dir, tmp_path, db):
    relay = RelayProcess(demo_dir, tmp_path, db=db)
    relay.start()
    stores = {u: load_keystore(demo_dir / f"{u}.p12") for u in (*SENDERS, RECIPIENT)}
    anchors = stores[RECIPIENT].ca_certificates()
    keyring = Keyring(ClientState(tmp_path / "recipient"), RECIPIENT)
    own = keyring.ensure(stores[RECIPIENT].key, "X25519")  # X25519 keeps the test quick
    rng = random.Random(os.environ.get("CRASH_SEED", "7"))

    def prepare(sender: str, i: int) -> tuple[str, Sealed]:
        msg_id = os.urandom(16).hex()
        inner = InnerMessage(sender, RECIPIENT, msg_id, utc_now(), f"s{i}", f"body {sender} {i}".encode())
        return msg_id, seal(inner, stores[sender].key, own.record)

    async def publish() -> None:
        async with RelayClient(stores[RECIPIENT], "127.0.0.1", relay.port, anchors) as c:
            await c.publish_key(own.record.to_bytes(), own.signature)

    asyncio.run(publish())
    receipts: dict[str, Receipt] = {}
    sealed_by_id: dict[str, Sealed] = {}
    retries = 0
    receipted = asyncio.Event()  # set at every new receipt; bound to the loop of asyncio.run(scenario())

    async def sender_task(sender: str, done: asyncio.Event) -> None:
        """Send until the killer is finished, each message retried (same bytes) until receipted."""
        nonlocal retries
        client: RelayClient | None = None
        loop = asyncio.get_running_loop()
        i = 0
        while not done.is_set():
            msg_id, sealed = prepare(sender, i)
            i += 1
            sealed_by_id[msg_id] = sealed
            give_up = loop.time() + DEADLINE
            while True:
                try:
                    if client is None:
                        client = RelayClient(stores[sender], "127.0.0.1", relay.port, anchors, timeout=5)
                        await client.connect()
                    receipts[msg_id] = await client.send(RECIPIENT, msg_id, sealed)
                    receipted.set()
                    break
                except ClientError:
                    retries += 1
                    if client is not None:
                        await client.close()
                    client = None
                    if loop.time() > give_up:
                        raise AssertionError("relay never came back") from None
                    await asyncio.sleep(0.05)  # back off before reconnecting, as a client would
        if client is not None:
            await client.close()

    async def served(at_least: int) -> None:
        """Until ``at_least`` receipts are in: each relay instance serves before it is killed, however
        slow the machine (a fixed schedule alone would kill a relay that a busy machine kept idle)."""
        async def wait() -> None:
            while len(receipts) < at_least:
                receipted.clear()
                await receipted.wait()
        await asyncio.wait_for(wait(), DEADLINE)

    async def killer(done: asyncio.Event) -> None:
        for life in range(1, KILLS + 1):
            await served(life * SENDS_PER_LIFE)
            await asyncio.sleep(rng.uniform(0.1, 0.4))  # then a random moment, mid-send
            relay.kill()
            await asyncio.get_running_loop().run_in_executor(None, relay.start)
        await served((KILLS + 1) * SENDS_PER_LIFE)
        await asyncio.sleep(0.2)
        done.set()

    async def scenario() -> None:
        done = asyncio.Event()
        await asyncio.gather(killer(done), *(sender_task(s, done) for s in SENDERS
                                             for _ in range(CLIENTS_PER_SENDER)))

    asyncio.run(scenario())
    assert relay.stop() == 0
    assert retries >= KILLS  # every kill interrupted sends in flight
    total = len(receipts)
    assert total == len(sealed_by_id) and total > 100
    rows = stored_rows(db)
    assert len(rows) == total  # nothing duplicated, nothing lost
    assert sorted(r[0] for r in rows) == list(range(1, total + 1))
    by_num = {r[0]: r for r in rows}
    sender_certs: dict[str, x509.Certificate] = {s: stores[s].cert for s in SENDERS}
    for msg_id, receipt in receipts.items():
        num, sender, stored_id, version, header, envelope = by_num[receipt.queue_number]
        stored = Sealed(version, bytes(header), bytes(envelope))
        assert (sender, stored_id) == (receipt.sender, msg_id)
        assert ciphertext_digest(stored) == receipt.digest == ciphertext_digest(sealed_by_id[msg_id])
        opened = open_envelope(stored, reader=RECIPIENT, sender=sender, msg_id=msg_id,
                               sender_key=sender_certs[sender].public_key(), keyring=keyring)
        assert opened.inner.body.startswith(f"body {sender} ".encode())


def test_sigterm_finishes_in_flight_requests(demo_dir, tmp_path):
    """SIGTERM: stop accepting, answer what is in flight, close the store; exit code 0."""
    relay = RelayProcess(demo_dir, tmp_path)
    relay.start()
    stores = {u: load_keystore(demo_dir / f"{u}.p12") for u in ("MSG_CLI1", RECIPIENT)}
    anchors = stores[RECIPIENT].ca_certificates()
    own = Keyring(ClientState(tmp_path / "recipient"), RECIPIENT).ensure(stores[RECIPIENT].key, "X25519")

    def sends_answered() -> int:
        lines = [json.loads(x) for x in (tmp_path / "audit-relay.log").read_text().splitlines() if x.endswith("}")]
        return sum(e["event"] == "request" and e.get("op") == "send" and e.get("result") == "ok" for e in lines)

    async def relay_at_work() -> None:
        """Until the relay has answered a send of the pipeline: the rest are then in flight."""
        while not sends_answered():
            await asyncio.sleep(0.005)

    async def scenario() -> list:
        async with RelayClient(stores[RECIPIENT], "127.0.0.1", relay.port, anchors) as c:
            await c.publish_key(own.record.to_bytes(), own.signature)
        async with RelayClient(stores["MSG_CLI1"], "127.0.0.1", relay.port, anchors, timeout=10) as c:
            reqs = []
            for i in range(200):
                mid = os.urandom(16).hex()
                inner = InnerMessage("MSG_CLI1", RECIPIENT, mid, utc_now(), f"s{i}", b"b")
                reqs.append(c.send_request(RECIPIENT, mid, seal(inner, stores["MSG_CLI1"].key, own.record)))
            pending = asyncio.ensure_future(c.pipeline(reqs))
            await asyncio.wait_for(relay_at_work(), DEADLINE)
            relay.proc.send_signal(signal.SIGTERM)
            return await pending

    results = asyncio.run(scenario())
    assert relay.proc.wait(20) == 0
    answered = [not isinstance(r, Exception) for r in results]
    assert answered[0] and answered == sorted(answered, reverse=True)  # answers, then only unread ones
    assert not any(isinstance(r, Exception) and not isinstance(r, ClientError) for r in results)
    receipts = [r.receipt for r in results if not isinstance(r, Exception)]
    db = sqlite3.connect(tmp_path / "relay.db")
    stored = {row[0] for row in db.execute("SELECT msg_id FROM messages")}
    assert {r.msg_id for r in receipts} <= stored
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert '"event":"server_stopped"' in (tmp_path / "audit-relay.log").read_text()
