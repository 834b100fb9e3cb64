"""Keys and identities over a year: renewals, new CAs, two devices, rotations, rolled-back keys (issue 10)."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from pathlib import Path

import pytest

from client.cli import VERIFICATION_ERROR
from client.connection import RelayClient
from client.state import ClientState, StateError, default_state_dir
from pki.keystore import load_keystore, save_keystore
from protocol import hpke
from protocol.keyrecord import KeyRecord, read_record, signed_by
from protocol.messages import RemoteError

from .harness import private_client, private_pki, private_relay, run_client


def key_row(directory: Path, uid: str) -> tuple[bytes, bytes]:
    row = sqlite3.connect(directory / "relay.db").execute("SELECT record, signature FROM keys WHERE uid=?",
                                                          (uid,)).fetchone()
    return bytes(row[0]), bytes(row[1])


def test_a_reissued_certificate_resigns_the_same_key_and_old_mail_stays_readable(tmp_path):
    ca = private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path)
    try:
        assert private_client(server, tmp_path, "BEN", "askqueue").code == 0
        record_before, _ = key_row(tmp_path, "BEN")
        assert private_client(server, tmp_path, "ANNA", "send", "BEN", "before", stdin=b"1").code == 0
        ca.revoke(uid="BEN", reason="superseded")
        save_keystore(tmp_path / "BEN.p12", ca.issue("BEN"), None)  # renewed: new key pair, same UID
        r = private_client(server, tmp_path, "BEN", "askqueue")
        assert r.code == 0 and r.out.startswith("1:ANNA:"), r.err
        record_after, signature = key_row(tmp_path, "BEN")
        assert read_record(record_after).public_key == read_record(record_before).public_key  # same key
        assert signed_by(record_after, signature, load_keystore(tmp_path / "BEN.p12").cert.public_key())
        assert private_client(server, tmp_path, "ANNA", "send", "BEN", "after", stdin=b"2").code == 0
        for num, subject in (("1", "before"), ("2", "after")):
            got = private_client(server, tmp_path, "BEN", "getmsg", num)
            assert got.code == 0 and f"Subject: {subject}" in got.out, got.err
    finally:
        server.stop()


def test_a_new_ca_gets_its_own_state_and_replaces_the_old_record(tmp_path):
    """``make pki FORCE=1``: same UID, a new CA. The record of the old identity is replaced, not
    mistaken for another device's, and the two identities never share a state directory."""
    old = tmp_path / "old"
    private_pki(old, ("ANNA", "BEN"))
    server = private_relay(old)
    try:
        first = private_client(server, old, "BEN", "askqueue")
        assert first.code == 0, first.err
    finally:
        server.stop()
    new = tmp_path / "new"
    private_pki(new, ("ANNA", "BEN"))
    (new / "relay.db").write_bytes((old / "relay.db").read_bytes())  # the relay keeps its database
    server = private_relay(new)
    try:
        r = run_client(server, new / "BEN.p12", "askqueue", state=old / "st" / "BEN")
        assert r.code == 1 and "under another CA" in r.err and "--state-dir" in r.err
        assert private_client(server, new, "BEN", "askqueue").code == 0
        assert private_client(server, new, "ANNA", "send", "BEN", "new CA", stdin=b"x").code == 0
        assert private_client(server, new, "BEN", "getmsg", "1").code == 0
    finally:
        server.stop()


def test_default_state_directories_are_per_ca(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    a, b = default_state_dir("MSG_CLI1", b"\x01" * 32), default_state_dir("MSG_CLI1", b"\x02" * 32)
    assert a != b and a.parent == b.parent
    legacy = tmp_path / "msg-relay" / "MSG_CLI2"
    legacy.mkdir(parents=True)
    (legacy / "keys.json").write_text("{}")
    adopted = default_state_dir("MSG_CLI2", b"\x03" * 32)
    assert (adopted / "keys.json").exists() and not legacy.exists()  # the first wave's state is kept
    state = ClientState(adopted)
    state.bind("MSG_CLI2", b"\x03" * 32)
    with pytest.raises(StateError, match="under another CA"):
        state.bind("MSG_CLI2", b"\x04" * 32)


def test_a_second_device_is_refused_with_the_fix_and_export_import_works(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path)
    laptop, phone = tmp_path / "laptop", tmp_path / "phone"

    def ben(state: Path, *args: str):
        return run_client(server, tmp_path / "BEN.p12", *args, state=state)

    try:
        assert ben(laptop, "askqueue").code == 0
        published = key_row(tmp_path, "BEN")
        refused = ben(phone, "askqueue")
        assert refused.code == 1
        assert "keys export" in refused.err and "keys import" in refused.err and len(refused.err.splitlines()) == 1
        assert key_row(tmp_path, "BEN") == published  # the laptop's key was not overwritten
        assert private_client(server, tmp_path, "ANNA", "send", "BEN", "to both", stdin=b"x").code == 0
        exported = tmp_path / "ben-keys.json"
        assert ben(laptop, "keys", "export", str(exported)).code == 0
        assert exported.stat().st_mode & 0o777 == 0o600
        assert ben(laptop, "keys", "export", str(exported)).code == 1  # never overwritten
        assert ben(phone, "keys", "import", str(exported)).code == 0
        got = ben(phone, "getmsg", "1")
        assert got.code == 0 and "to both" in got.out, got.err
        assert key_row(tmp_path, "BEN") == published
    finally:
        server.stop()


def test_rotation_keeps_read_mail_readable_and_a_missing_key_has_its_own_message(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path)
    try:
        assert private_client(server, tmp_path, "BEN", "askqueue").code == 0
        assert private_client(server, tmp_path, "ANNA", "send", "BEN", "old key", stdin=b"1").code == 0
        assert private_client(server, tmp_path, "BEN", "getmsg", "1").code == 0
        assert private_client(server, tmp_path, "BEN", "rotate-key").code == 0
        again = private_client(server, tmp_path, "BEN", "getmsg", "1")  # read before, sealed to the old key
        assert again.code == 0 and "old key" in again.out, again.err
        # A state directory without that key (rotate-key from scratch replaces the published key).
        fresh = tmp_path / "fresh"
        assert run_client(server, tmp_path / "BEN.p12", "rotate-key", state=fresh).code == 0
        missing = run_client(server, tmp_path / "BEN.p12", "getmsg", "1", state=fresh)
        assert missing.code == 1 and VERIFICATION_ERROR not in missing.err
        assert missing.err.startswith("msg-client: cannot open this message: sealed to encryption key")
    finally:
        server.stop()


def test_rolled_back_key_records_are_refused_by_client_and_relay(tmp_path):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path)
    try:
        assert private_client(server, tmp_path, "BEN", "askqueue").code == 0
        old_row = key_row(tmp_path, "BEN")
        assert private_client(server, tmp_path, "ANNA", "send", "BEN", "1", stdin=b"1").code == 0
        assert private_client(server, tmp_path, "BEN", "rotate-key").code == 0
        assert private_client(server, tmp_path, "ANNA", "send", "BEN", "2", stdin=b"2").code == 0
        # The relay (or a thief of its database) serves BEN's older, still validly signed record.
        db = sqlite3.connect(tmp_path / "relay.db")
        with db:
            db.execute("UPDATE keys SET record=?, signature=? WHERE uid='BEN'", old_row)
        db.close()
        r = private_client(server, tmp_path, "ANNA", "send", "BEN", "3", stdin=b"3")
        assert r.code == 1 and r.err.splitlines() == [VERIFICATION_ERROR]
        verbose = run_client(server, tmp_path / "ANNA.p12", "-v", "send", "BEN", "3", stdin=b"3",
                             state=tmp_path / "st" / "ANNA")
        assert "older encryption key of BEN" in verbose.err

        # The relay itself refuses a publish_key older than the record it holds.
        ben = load_keystore(tmp_path / "BEN.p12")
        _, public = hpke.generate("X25519")
        stale = KeyRecord("BEN", "X25519", public, dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
                          dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc))
        db = sqlite3.connect(tmp_path / "relay.db")
        with db:
            db.execute("DELETE FROM keys WHERE uid='BEN'")
        db.close()
        assert private_client(server, tmp_path, "BEN", "askqueue").code == 0  # BEN re-publishes its key

        async def publish_stale() -> None:
            async with RelayClient(ben, "127.0.0.1", server.port, ben.ca_certificates(), timeout=10) as c:
                await c.publish_key(stale.to_bytes(), stale.sign(ben.key))

        with pytest.raises(RemoteError, match="older than the one published"):
            asyncio.run(publish_stale())
    finally:
        server.stop()


@pytest.mark.parametrize("public", [b"\x01" * 5, bytes(32)], ids=["five-bytes", "all-zero"])
def test_a_malformed_published_key_is_refused_by_the_relay_and_never_crashes_a_sender(tmp_path, public):
    private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path)
    ben = load_keystore(tmp_path / "BEN.p12")
    now = dt.datetime.now(dt.timezone.utc)
    bad = KeyRecord("BEN", "X25519", public, now, now + dt.timedelta(days=30))

    async def publish_bad() -> None:
        async with RelayClient(ben, "127.0.0.1", server.port, ben.ca_certificates(), timeout=10) as c:
            await c.publish_key(bad.to_bytes(), bad.sign(ben.key))

    try:
        with pytest.raises(RemoteError, match="malformed X25519 public key"):
            asyncio.run(publish_bad())
        assert private_client(server, tmp_path, "BEN", "askqueue").code == 0
        db = sqlite3.connect(tmp_path / "relay.db")
        with db:  # a tampered database serves it anyway, validly signed by BEN
            db.execute("UPDATE keys SET record=?, signature=? WHERE uid='BEN'", (bad.to_bytes(), bad.sign(ben.key)))
        db.close()
        r = private_client(server, tmp_path, "ANNA", "send", "BEN", "s", stdin=b"b")
        assert r.code == 1 and r.err.splitlines() == [VERIFICATION_ERROR]
        assert "Traceback" not in r.err
    finally:
        server.stop()



def test_sending_to_a_revoked_recipient_names_the_recipient(tmp_path):
    ca = private_pki(tmp_path, ("ANNA", "BEN"))
    server = private_relay(tmp_path)
    try:
        assert private_client(server, tmp_path, "BEN", "askqueue").code == 0
        ca.revoke(uid="BEN")
        r = private_client(server, tmp_path, "ANNA", "send", "BEN", "s", stdin=b"b", with_crl=True)
        assert r.code == 1
        assert r.err.strip() == "msg-client: cannot send to BEN: BEN's certificate is revoked: nothing sent"
    finally:
        server.stop()


def test_the_database_and_the_state_files_are_private(tmp_path):
    private_pki(tmp_path, ("ANNA",))
    server = private_relay(tmp_path)
    try:
        assert private_client(server, tmp_path, "ANNA", "askqueue").code == 0
        for path in (*tmp_path.glob("relay.db*"), *(tmp_path / "st" / "ANNA").iterdir()):
            assert path.stat().st_mode & 0o077 == 0, path
        assert (tmp_path / "st" / "ANNA").stat().st_mode & 0o077 == 0
    finally:
        server.stop()
