"""One message to several recipients (issue 13): version 4 envelopes, ``send A,B,…``, aliases."""

from __future__ import annotations

import datetime as dt
import secrets

import pytest

from pki.keys import generate_key, sign
from protocol import hpke
from protocol.encoding import format_time, pack
from protocol.envelope import (
    MAX_BODY,
    Copy,
    Sealed,
    VerificationError,
    _header_signed,
    _info,
    _inner_v4_signed,
    _roster_bytes,
    open_envelope,
    read_subject,
    seal_many,
)
from protocol.keyrecord import KeyRecord

from .harness import private_client, private_pki, private_relay

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
ANNA = generate_key()


class Keyring:
    def __init__(self) -> None:
        self.private, public = hpke.generate("X25519")
        self.record = KeyRecord("?", "X25519", public, NOW, NOW + dt.timedelta(days=1))

    def private_key(self, key_id: str) -> tuple[str, bytes] | None:
        return ("X25519", self.private) if key_id == self.record.key_id else None


def people(*uids: str) -> dict[str, tuple[Keyring, Copy]]:
    out = {}
    for uid in uids:
        ring = Keyring()
        ring.record = KeyRecord(uid, "X25519", ring.record.public_key, NOW, ring.record.expires)
        out[uid] = (ring, Copy(uid, secrets.token_hex(16), ring.record))
    return out


def open_as(uid: str, copy: Copy, sealed: Sealed, ring: Keyring):  # type: ignore[no-untyped-def]
    return open_envelope(sealed, reader=uid, sender="ANNA", msg_id=copy.msg_id, sender_key=ANNA.public_key(),
                         keyring=ring).inner


def forge_v4(ring: Keyring, copy: Copy, roster: bytes, *, signed_roster: bytes | None = None,
             body: bytes = b"body", subject: str = "subject") -> Sealed:
    """A version-4 copy for ``copy.uid`` whose sealed roster is ``roster`` (signed as ``signed_roster``)."""
    when = format_time(NOW)
    signature = sign(ANNA, _inner_v4_signed("ANNA", roster if signed_roster is None else signed_roster, when,
                                            subject, body))
    ids = ("ANNA", copy.uid, copy.msg_id)
    kid = bytes.fromhex(ring.record.key_id)
    header = kid + hpke.seal("X25519", ring.record.public_key,
                             pack(subject.encode(), sign(ANNA, _header_signed(*ids, subject))), _info("header", *ids))
    plain = pack(b"ANNA", roster, when.encode(), subject.encode(), body, signature)
    return Sealed(4, header, kid + hpke.seal("X25519", ring.record.public_key, plain, _info("body", *ids)))


# ------------------------------------------------------------------------------ the envelope
def test_each_recipient_opens_its_copy_and_sees_who_else_got_it():
    folk = people("BEN", "CARL", "DORA")
    copies = [c for _, c in folk.values()]
    sealed = seal_many("ANNA", NOW, "to all three", b"hello", copies, ANNA)
    for (uid, (ring, copy)), s in zip(folk.items(), sealed, strict=True):
        inner = open_as(uid, copy, s, ring)
        assert (inner.sender, inner.recipient, inner.msg_id) == ("ANNA", uid, copy.msg_id)
        assert inner.cc == tuple(u for u in folk if u != uid)
        assert (inner.subject, inner.body) == ("to all three", b"hello")
        assert read_subject(s.version, s.header, reader=uid, sender="ANNA", msg_id=copy.msg_id, keyring=ring,
                            sender_key=ANNA.public_key()) == "to all three"


def test_a_copy_moved_to_another_recipient_does_not_open():
    folk = people("BEN", "CARL")
    sealed = seal_many("ANNA", NOW, "s", b"b", [c for _, c in folk.values()], ANNA)
    ben_ring, ben = folk["BEN"]
    carl_ring, carl = folk["CARL"]
    with pytest.raises(VerificationError):
        open_as("CARL", carl, sealed[0], carl_ring)  # BEN's copy in CARL's queue
    with pytest.raises(VerificationError):
        open_as("BEN", Copy("BEN", carl.msg_id, ben.key), sealed[0], ben_ring)  # under another copy's msg_id


def test_a_roster_that_does_not_name_the_reader_is_refused():
    """ANNA signed a message to CARL and DORA; sealing it to BEN does not make BEN a recipient."""
    folk = people("BEN", "CARL", "DORA")
    ring, ben = folk["BEN"]
    roster = _roster_bytes([("CARL", folk["CARL"][1].msg_id), ("DORA", folk["DORA"][1].msg_id)])
    with pytest.raises(VerificationError, match="recipients do not include BEN"):
        open_as("BEN", ben, forge_v4(ring, ben, roster), ring)
    other_id = _roster_bytes([("BEN", secrets.token_hex(16)), ("CARL", folk["CARL"][1].msg_id)])
    with pytest.raises(VerificationError, match="recipients do not include BEN"):
        open_as("BEN", ben, forge_v4(ring, ben, other_id), ring)  # BEN named, but for another copy


def test_a_roster_changed_after_signing_is_refused():
    folk = people("BEN", "CARL", "DORA")
    ring, ben = folk["BEN"]
    signed = _roster_bytes([("BEN", ben.msg_id), ("CARL", folk["CARL"][1].msg_id)])
    widened = _roster_bytes([("BEN", ben.msg_id), ("DORA", folk["DORA"][1].msg_id)])
    with pytest.raises(VerificationError, match="inner signature does not verify"):
        open_as("BEN", ben, forge_v4(ring, ben, widened, signed_roster=signed), ring)


@pytest.mark.parametrize("roster", [
    "alone",  # one recipient is not a message to several
    "many",  # 33
    "BEN {ben}\nBEN {x}",  # a recipient twice
    "BEN {ben}\nCARL {ben}",  # one msg_id for two copies
    "BEN {ben}\nno/uid {x}",
    "BEN {ben}\nCARL notanid",
    "BEN {ben}\nCARL {x}\n",
    "BEN {ben}\nC\u00c4RL {x}",
])
def test_a_malformed_roster_is_refused(roster):
    folk = people("BEN")
    ring, ben = folk["BEN"]
    text = {"alone": "BEN {ben}", "many": "\n".join([f"U{i} {secrets.token_hex(16)}" for i in range(32)]
                                                    + ["BEN {ben}"])}.get(roster, roster)
    raw = text.format(ben=ben.msg_id, x=secrets.token_hex(16)).encode()
    with pytest.raises(VerificationError, match="inner message malformed"):
        open_as("BEN", ben, forge_v4(ring, ben, raw), ring)


def test_a_body_over_the_limit_is_refused_in_a_message_to_several():
    folk = people("BEN", "CARL")
    ring, ben = folk["BEN"]
    roster = _roster_bytes([("BEN", ben.msg_id), ("CARL", folk["CARL"][1].msg_id)])
    with pytest.raises(VerificationError, match="body longer than"):
        open_as("BEN", ben, forge_v4(ring, ben, roster, body=b"x" * (MAX_BODY + 1)), ring)
    with pytest.raises(ValueError):
        seal_many("ANNA", NOW, "s", b"x" * (MAX_BODY + 1), [c for _, c in folk.values()], ANNA)


def test_a_sender_never_seals_to_a_key_of_someone_else():
    folk = people("BEN", "CARL")
    ben, carl = folk["BEN"][1], folk["CARL"][1]
    with pytest.raises(ValueError, match="another user"):
        seal_many("ANNA", NOW, "s", b"b", [ben, Copy("CARL", carl.msg_id, ben.key)], ANNA)


# ------------------------------------------------------------------------------- the command
@pytest.fixture()
def world(tmp_path):
    ca = private_pki(tmp_path, ("ANNA", "BEN", "CARL", "DORA", "EVE"))
    server = private_relay(tmp_path)
    for uid in ("ANNA", "BEN", "CARL", "EVE"):  # DORA never runs msg-client: no key published
        assert private_client(server, tmp_path, uid, "askqueue").code == 0
    yield server, ca
    server.stop()


def test_a_message_to_several_recipients_reaches_each_with_a_cc_line(world, tmp_path):
    server, _ = world
    sent = private_client(server, tmp_path, "ANNA", "send", "BEN,CARL", "to both", stdin=b"hi both")
    assert sent.code == 0, sent.err
    lines = sent.out.splitlines()
    assert [line.split()[3] for line in lines] == ["BEN", "CARL"], lines  # one receipt per recipient
    for uid, other in (("BEN", "CARL"), ("CARL", "BEN")):
        got = private_client(server, tmp_path, uid, "getmsg", "1")
        assert got.code == 0, got.err
        assert f"To: {uid}\nCc: {other}\nSubject: to both\n" in got.out and got.out.endswith("hi both\n")
    assert len(private_client(server, tmp_path, "ANNA", "receipts").out.splitlines()) == 2


@pytest.mark.parametrize("bad, reason", [
    ("GHOST", "cannot send to GHOST: unknown user GHOST: nothing sent"),
    ("DORA", "DORA has not published an encryption key yet"),
    ("CARL", "cannot send to CARL: CARL's certificate is revoked: nothing sent"),
])
def test_nothing_is_sent_when_one_recipient_cannot_receive(world, tmp_path, bad, reason):
    server, ca = world
    if bad == "CARL":
        ca.revoke(uid="CARL")
    r = private_client(server, tmp_path, "ANNA", "send", f"BEN,{bad},EVE", "to three", stdin=b"x",
                       with_crl=bad == "CARL")
    assert r.code == 1 and reason in r.err and r.err.count("\n") == 1, r.err
    for uid in ("BEN", "EVE"):
        assert private_client(server, tmp_path, uid, "askqueue").out == ""


def test_more_than_32_recipients_are_refused(world, tmp_path):
    server, _ = world
    many = ",".join(f"U{i}" for i in range(33))
    r = private_client(server, tmp_path, "ANNA", "send", many, "s", stdin=b"x")
    assert r.code == 1 and r.err.strip() == "msg-client: 33 recipients: a message goes to at most 32", r.err


def test_an_alias_names_a_group_wherever_a_uid_goes(world, tmp_path):
    server, _ = world

    def anna(*args: str, stdin: bytes = b""):  # type: ignore[no-untyped-def]
        return private_client(server, tmp_path, "ANNA", *args, stdin=stdin)

    assert anna("alias", "set", "TEAM", "BEN,CARL,BEN").out == "alias TEAM: BEN,CARL\n"
    sent = anna("send", "TEAM,EVE", "to the team", stdin=b"x")
    assert sent.code == 0, sent.err
    assert [line.split()[3] for line in sent.out.splitlines()] == ["BEN", "CARL", "EVE"]
    for uid in ("BEN", "CARL", "EVE"):
        assert ":ANNA:" in private_client(server, tmp_path, uid, "askqueue").out
    assert anna("alias", "list").out == "TEAM: BEN,CARL\n"
    nested = anna("alias", "set", "ALL", "TEAM,EVE")
    assert nested.code == 1 and nested.err.strip() == "msg-client: TEAM is an alias: an alias names UIDs only"
    named = anna("alias", "set", "no/name", "BEN")
    assert named.code == 1 and "an alias name has a UID's form" in named.err
    wide = anna("alias", "set", "WIDE", ",".join(f"U{i}" for i in range(33)))
    assert wide.code == 1 and "an alias names 1 to 32 UIDs, not 33" in wide.err
    assert anna("alias", "rm", "TEAM").code == 0
    assert anna("alias", "list").out == ""
    gone = anna("alias", "rm", "TEAM")
    assert gone.code == 1 and gone.err.strip() == "msg-client: no alias 'TEAM'"


def test_copies_the_relay_refuses_are_named_with_those_it_stored(tmp_path):
    """The client checked every recipient, but the relay may still refuse a copy (BEN's queue is full):
    the user learns which recipients got the message and which did not, and why."""
    from server.quota import QuotaConfig

    private_pki(tmp_path, ("ANNA", "BEN", "CARL"))
    server = private_relay(tmp_path, quota=QuotaConfig(max_unread=1))
    try:
        for uid in ("ANNA", "BEN", "CARL"):
            assert private_client(server, tmp_path, uid, "askqueue").code == 0
        assert private_client(server, tmp_path, "ANNA", "send", "BEN", "fills BEN's queue", stdin=b"x").code == 0
        r = private_client(server, tmp_path, "ANNA", "send", "BEN,CARL", "to both", stdin=b"x")
        assert r.code == 1 and r.err.count("\n") == 1, r.err
        assert r.err.startswith("msg-client: the relay refused the copy for BEN (") and r.err.strip().endswith(
            "; sent to CARL"), r.err
        assert ":to both" in private_client(server, tmp_path, "CARL", "askqueue").out
        assert len(private_client(server, tmp_path, "ANNA", "receipts").out.splitlines()) == 2  # CARL's kept
    finally:
        server.stop()
