"""Nothing ``askqueue`` prints is unauthenticated, and reading never loses a message (issues 10 §3, 11 §1).

The attacker here is whoever edits the relay's database: it knows every user's public encryption key,
so it can seal any subject to a reader; it cannot sign as the sender or as the relay.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

from client.cli import UNVERIFIABLE, VERIFICATION_ERROR
from pki.keys import generate_key
from protocol.envelope import InnerMessage, seal
from protocol.keyrecord import read_record

from .harness import private_client, private_pki, private_relay


def db(directory: Path) -> sqlite3.Connection:
    return sqlite3.connect(directory / "relay.db", isolation_level=None)


def exchange(tmp_path: Path, server, subject: str = "lunch") -> None:
    assert private_client(server, tmp_path, "BEN", "askqueue").code == 0
    assert private_client(server, tmp_path, "ANNA", "send", "BEN", subject, stdin=b"noon").code == 0


def test_a_subject_sealed_by_the_relay_is_shown_as_unverifiable(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path)
    try:
        exchange(tmp_path, server)
        line = private_client(server, tmp_path, "BEN", "askqueue").out.strip()
        assert line.startswith("1:ANNA:") and line.endswith(":lunch")
        conn = db(tmp_path)
        msg_id, = conn.execute("SELECT msg_id FROM messages WHERE num=1").fetchone()
        record = read_record(bytes(conn.execute("SELECT record FROM keys WHERE uid='BEN'").fetchone()[0]))
        forged = seal(InnerMessage("ANNA", "BEN", msg_id, dt.datetime.now(dt.timezone.utc),
                                   "URGENT - new bank details, reply today", b""), generate_key(), record)
        conn.execute("UPDATE messages SET header=? WHERE num=1", (forged.header,))
        out = private_client(server, tmp_path, "BEN", "askqueue").out
        assert "URGENT" not in out
        assert out.strip().startswith("1:ANNA:") and out.strip().endswith(":" + UNVERIFIABLE)
    finally:
        server.stop()


def test_the_time_shown_is_the_signed_one(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path)
    try:
        exchange(tmp_path, server)
        conn = db(tmp_path)
        receipt = json.loads(conn.execute("SELECT receipt FROM messages WHERE num=1").fetchone()[0])
        conn.execute("UPDATE messages SET server_time='1999-12-31T23:59:59.000000Z' WHERE num=1")
        out = private_client(server, tmp_path, "BEN", "askqueue").out
        assert "1999" not in out
        assert out.startswith(f"1:ANNA:{receipt['server_time'][:19]}Z:lunch")
        # Another message's receipt (validly signed, but not for this one): the line does not verify.
        exchange(tmp_path, server, "second")
        other = conn.execute("SELECT receipt FROM messages WHERE num=2").fetchone()[0]
        conn.execute("UPDATE messages SET receipt=? WHERE num=1", (other,))
        lines = private_client(server, tmp_path, "BEN", "askqueue").out.splitlines()
        assert lines[0].endswith(":" + UNVERIFIABLE) and lines[1].endswith(":second")
    finally:
        server.stop()


def test_a_read_that_fails_verification_leaves_the_message_unread(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path)
    try:
        exchange(tmp_path, server)
        conn = db(tmp_path)
        envelope = bytes(conn.execute("SELECT envelope FROM messages WHERE num=1").fetchone()[0])
        conn.execute("UPDATE messages SET envelope=? WHERE num=1", (envelope[:-1] + bytes([envelope[-1] ^ 1]),))
        bad = private_client(server, tmp_path, "BEN", "getmsg", "1")
        assert bad.code == 1 and bad.err.splitlines() == [VERIFICATION_ERROR]
        assert private_client(server, tmp_path, "BEN", "askqueue").out.startswith("1:ANNA:")  # still listed
        conn.execute("UPDATE messages SET envelope=? WHERE num=1", (envelope,))
        good = private_client(server, tmp_path, "BEN", "getmsg", "1")
        assert good.code == 0 and "noon" in good.out
        assert private_client(server, tmp_path, "BEN", "askqueue").out == ""  # read once verified
    finally:
        server.stop()
