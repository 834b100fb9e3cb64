"""Two relay nodes on one PostgreSQL database (issue 12).

Clients spread over both nodes send to the same recipient while node A is killed with SIGKILL and
restarted; clients of A fail over to B and retry under the same msg_id. Afterwards every receipted
message is stored exactly once at its receipt's number, numbers are dense, and B served throughout.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import asyncpg
import pytest

from client.connection import ClientError, RelayClient
from client.keys import Keyring
from client.state import ClientState
from pki.ca import CertificateAuthority
from pki.identity import cert_fingerprint
from pki.keystore import load_keystore, save_keystore
from protocol.encoding import utc_now
from protocol.envelope import InnerMessage, Sealed, ciphertext_digest, seal
from protocol.receipts import Receipt

from .harness import RelayProcess, private_pki, run_client

ROOT = Path(__file__).resolve().parent.parent
SENDERS = ("ANNA", "CARL")
RECIPIENT = "BEN"
KILLS = 3
SENDS_PER_LIFE = 20
DEADLINE = 60.0


@pytest.fixture()
def cluster(tmp_path, pg_dsn):
    ca = private_pki(tmp_path, (*SENDERS, RECIPIENT))
    save_keystore(tmp_path / "node-b.p12", ca.issue("MSG_SERVER", server=True, cn="node-b"), None)
    a = RelayProcess(tmp_path, tmp_path, db=pg_dsn, name="a")
    b = RelayProcess(tmp_path, tmp_path, p12=tmp_path / "node-b.p12", db=pg_dsn, name="b")
    a.start()
    b.start()
    yield a, b
    for node in (a, b):
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)


def test_a_session_across_the_two_nodes(cluster, tmp_path):
    """Publish through B, send through A, read through B: one relay, seen from either node."""
    a, b = cluster
    at_a, at_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"

    def run(server: str, uid: str, *args: str, stdin: bytes = b""):
        return run_client(server, tmp_path / f"{uid}.p12", *args, stdin=stdin, state=tmp_path / "st" / uid)

    assert run(at_b, "BEN", "askqueue").code == 0
    sent = run(at_a, "ANNA", "send", "BEN", "across nodes", stdin=b"hello")
    assert sent.code == 0, sent.err
    listed = run(at_b, "BEN", "askqueue")
    assert listed.out.startswith("1:ANNA:") and listed.out.strip().endswith(":across nodes"), listed.err
    got = run(at_b, "BEN", "getmsg", "1")
    assert got.code == 0 and "hello" in got.out, got.err
    assert run(at_a, "BEN", "askqueue").out == ""  # marked read through B, seen through A
    assert a.stop() == 0 and b.stop() == 0


def test_killing_a_node_loses_and_duplicates_nothing(cluster, tmp_path, pg_dsn):
    a, b = cluster
    stores = {u: load_keystore(tmp_path / f"{u}.p12") for u in (*SENDERS, RECIPIENT)}
    anchors = stores[RECIPIENT].ca_certificates()
    keyring = Keyring(ClientState(tmp_path / "recipient"), RECIPIENT)
    own = keyring.ensure(stores[RECIPIENT].key, "X25519")
    node_b = cert_fingerprint(load_keystore(tmp_path / "node-b.p12").cert)
    rng = random.Random(os.environ.get("CRASH_SEED", "7"))
    receipts: dict[str, Receipt] = {}
    sealed_by_id: dict[str, Sealed] = {}
    failovers = 0
    receipted_while_a_down = 0
    a_down = False

    def prepare(sender: str, i: int) -> tuple[str, Sealed]:
        msg_id = os.urandom(16).hex()
        inner = InnerMessage(sender, RECIPIENT, msg_id, utc_now(), f"s{i}", f"{sender} {i}".encode())
        return msg_id, seal(inner, stores[sender].key, own.record)

    async def publish() -> None:
        async with RelayClient(stores[RECIPIENT], *a.address, anchors) as c:
            await c.publish_key(own.record.to_bytes(), own.signature)

    asyncio.run(publish())
    receipted = asyncio.Event()

    async def sender_task(sender: str, first: RelayProcess, second: RelayProcess, done: asyncio.Event) -> None:
        nonlocal failovers, receipted_while_a_down
        loop = asyncio.get_running_loop()

        def new_client() -> RelayClient:
            return RelayClient(stores[sender], *first.address, anchors, timeout=5, other_nodes=[second.address])

        client = new_client()
        connected = False
        i = 0
        while not done.is_set():
            if i % 5 == 4:  # as `msg-client` does per command: a new connection, first node first
                await client.close()
                client, connected = new_client(), False
            msg_id, sealed = prepare(sender, i)
            i += 1
            sealed_by_id[msg_id] = sealed
            give_up = loop.time() + DEADLINE
            while True:
                try:
                    if not connected:
                        await client.connect()
                        connected = True
                    receipt = await client.send(RECIPIENT, msg_id, sealed)
                    receipts[msg_id] = receipt
                    if a_down and receipt.signer == node_b:
                        receipted_while_a_down += 1  # B served while A was down
                    receipted.set()
                    break
                except ClientError:
                    failovers += 1
                    if loop.time() > give_up:
                        raise AssertionError("no node served") from None
                    try:
                        await client.failover()
                        connected = True
                    except ClientError:
                        connected = False
                        await asyncio.sleep(0.05)
        await client.close()

    async def served(at_least: int) -> None:
        async def wait() -> None:
            while len(receipts) < at_least:
                receipted.clear()
                await receipted.wait()
        await asyncio.wait_for(wait(), DEADLINE)

    async def killer(done: asyncio.Event) -> None:
        nonlocal a_down
        for _ in range(KILLS):
            await served(len(receipts) + SENDS_PER_LIFE)
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            a.kill()
            a_down = True
            await served(len(receipts) + 10)  # B alone serves meanwhile
            a_down = False
            await asyncio.get_running_loop().run_in_executor(None, a.start)
        await served(len(receipts) + SENDS_PER_LIFE)
        done.set()

    async def scenario() -> None:
        done = asyncio.Event()
        await asyncio.gather(killer(done), sender_task("ANNA", a, b, done), sender_task("ANNA", a, b, done),
                             sender_task("CARL", b, a, done), sender_task("CARL", b, a, done))

    asyncio.run(scenario())
    assert b.stop() == 0 and a.stop() == 0  # B was never restarted: it served throughout
    assert failovers >= KILLS and receipted_while_a_down >= KILLS * 5  # every kill hit sends in flight

    async def stored() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(pg_dsn)
        try:
            return await conn.fetch("SELECT num, sender, msg_id, digest FROM messages WHERE recipient=$1", RECIPIENT)
        finally:
            await conn.close()

    rows = asyncio.run(stored())
    total = len(receipts)
    assert total == len(sealed_by_id) and len(rows) == total  # nothing lost, nothing stored twice
    assert sorted(r["num"] for r in rows) == list(range(1, total + 1))  # dense across two nodes
    by_num = {r["num"]: r for r in rows}
    for msg_id, receipt in receipts.items():
        row = by_num[receipt.queue_number]
        assert (row["sender"], row["msg_id"]) == (receipt.sender, msg_id)
        assert bytes(row["digest"]) == receipt.digest == ciphertext_digest(sealed_by_id[msg_id])


def test_a_revocation_known_to_one_node_acts_on_both(cluster, tmp_path):
    """RelayProcess B's CRL file is never touched: the CRL reaches it through the database."""
    a, b = cluster
    assert private_client_at(b, tmp_path, "ANNA", "askqueue").code == 0
    ca_dir = tmp_path / "ca"
    ca = CertificateAuthority.load(ca_dir)
    b_crl = tmp_path / "b-crl.pem"
    b_crl.write_bytes((ca_dir / "crl.pem").read_bytes())
    assert b.stop() == 0
    b.args[b.args.index("--crl") + 1] = str(b_crl)  # B keeps the CRL from before the revocation
    b.start()
    ca.revoke(uid="ANNA")  # A's CRL file changes; A puts the new CRL in the database
    deadline = asyncio.run(_until_refused(b, tmp_path))
    assert deadline < 10.0


def private_client_at(node: RelayProcess, tmp_path: Path, uid: str, *args: str):
    return run_client(f"127.0.0.1:{node.port}", tmp_path / f"{uid}.p12", *args, state=tmp_path / "st" / uid)


async def _until_refused(node: RelayProcess, tmp_path: Path) -> float:
    """Seconds until ``node`` refuses ANNA (within the deadline)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < DEADLINE:
        r = await loop.run_in_executor(None, private_client_at, node, tmp_path, "ANNA", "askqueue")
        if r.code == 1 and "revoked" in r.err:
            return loop.time() - start
        await asyncio.sleep(0.2)
    raise AssertionError("the revocation never reached the other node")


def test_migrate_only_brings_a_database_up_to_date_and_says_which(pg_dsn, tmp_path, capsys):
    from server.cli import main as server_main
    from server.pgstore import SCHEMA_VERSION as PG_VERSION
    from server.store import SCHEMA_VERSION as SQLITE_VERSION

    assert server_main(["--db", pg_dsn, "--migrate-only"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"schema version {PG_VERSION}")
    assert server_main(["--db", pg_dsn, "--migrate-only"]) == 0  # again: nothing to do, same answer
    assert server_main(["--db", str(tmp_path / "r.db"), "--migrate-only"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"schema version {SQLITE_VERSION}")
    bad = "postgresql://postgres@127.0.0.1:1/nothing"
    assert server_main(["--db", bad, "--migrate-only"]) == 2
    assert capsys.readouterr().err.startswith("msg-server: error:")
