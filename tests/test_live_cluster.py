"""Live delivery across the nodes of a cluster (issue 13): PostgreSQL ``LISTEN/NOTIFY``."""

from __future__ import annotations

import asyncio

import asyncpg

from client.connection import RelayClient
from pki.keystore import load_keystore, save_keystore

from .harness import RelayProcess, private_pki, private_relay, run_client
from .test_live import LINE
from .watching import WatchProcess


def test_a_message_stored_through_node_a_reaches_a_watcher_on_node_b(tmp_path, pg_dsn):
    ca = private_pki(tmp_path, ("ANNA", "BEN"))
    save_keystore(tmp_path / "node-b.p12", ca.issue("MSG_SERVER", server=True, cn="node-b"), None)
    a = RelayProcess(tmp_path, tmp_path, db=pg_dsn, name="a")
    b = RelayProcess(tmp_path, tmp_path, p12=tmp_path / "node-b.p12", db=pg_dsn, name="b")
    a.start()
    b.start()
    watch = None
    try:
        at_a, at_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
        for uid in ("ANNA", "BEN"):
            assert run_client(at_a, tmp_path / f"{uid}.p12", "askqueue", state=tmp_path / "st" / uid).code == 0
        watch = WatchProcess(f"{at_b},{at_a}", tmp_path, "BEN")

        def send_and_see(n: int, subject: str) -> None:
            sent = run_client(at_a, tmp_path / "ANNA.p12", "send", "BEN", subject, stdin=b"x",
                              state=tmp_path / "st" / "ANNA")
            assert sent.code == 0, sent.err
            line = LINE.match(watch.next_line())
            assert line and line.groups() == (str(n), "ANNA", subject)

        send_and_see(1, "first through A")
        send_and_see(2, "second through A")
        b.kill()  # the watcher's node dies: it goes on through A, missing nothing, repeating nothing
        send_and_see(3, "third, B is down")
        assert watch.interrupt() == 0
    finally:
        if watch is not None:
            watch.kill()
        for node in (a, b):
            if node.proc is not None and node.proc.poll() is None:
                node.kill()


def test_a_node_that_missed_notifications_tells_its_watchers_when_it_listens_again(tmp_path, pg_dsn):
    """A message another node stored while this node's listener was away sent a NOTIFY nobody heard:
    once listening again, the node reads its watchers' newest numbers and tells them."""
    private_pki(tmp_path, ("BEN",))
    server = private_relay(tmp_path, db=pg_dsn)

    async def scenario() -> None:
        store = load_keystore(tmp_path / "BEN.p12")
        async with RelayClient(store, "127.0.0.1", server.port, store.ca_certificates()) as ben:
            await ben.subscribe()
            await server.until(lambda relay: len(relay.watchers) == 1, "BEN subscribed")
            db = await asyncpg.connect(pg_dsn)
            try:  # a number taken with no NOTIFY: what a lost notification looks like to this node
                await db.execute("INSERT INTO queue_counters (recipient, last_num) VALUES ('BEN', 7)"
                                 " ON CONFLICT (recipient) DO UPDATE SET last_num = 7")
                assert ben.queued_num == 0
                # The node's listening connection breaks (a database restart, a network cut).
                killed = await db.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                           " WHERE datname = current_database() AND application_name = 'msg-relay-listen'")
                assert killed == 1
            finally:
                await db.close()
            assert await ben.wait_queued(0, 30)
            assert ben.queued_num == 7

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_message_to_several_sent_through_one_node_is_read_through_the_other(tmp_path, pg_dsn):
    ca = private_pki(tmp_path, ("ANNA", "BEN", "CARL"))
    save_keystore(tmp_path / "node-b.p12", ca.issue("MSG_SERVER", server=True, cn="node-b"), None)
    a = RelayProcess(tmp_path, tmp_path, db=pg_dsn, name="a")
    b = RelayProcess(tmp_path, tmp_path, p12=tmp_path / "node-b.p12", db=pg_dsn, name="b")
    a.start()
    b.start()
    try:
        at_a, at_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"

        def run(at: str, uid: str, *args: str, stdin: bytes = b""):  # type: ignore[no-untyped-def]
            return run_client(at, tmp_path / f"{uid}.p12", *args, stdin=stdin, state=tmp_path / "st" / uid)

        for uid in ("ANNA", "BEN", "CARL"):
            assert run(at_b, uid, "askqueue").code == 0
        sent = run(at_a, "ANNA", "send", "BEN,CARL", "to both", stdin=b"across nodes")
        assert sent.code == 0 and len(sent.out.splitlines()) == 2, sent.err
        for uid, other in (("BEN", "CARL"), ("CARL", "BEN")):
            got = run(at_b, uid, "getmsg", "1")
            assert got.code == 0 and f"Cc: {other}\n" in got.out and got.out.endswith("across nodes\n"), got.err
    finally:
        for node in (a, b):
            node.kill()
