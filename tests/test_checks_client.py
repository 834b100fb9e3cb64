"""The client's own refusals, each made to refuse by a relay that lies (issue 9 §5).

Framing and answers (client/operations.py, and the two connections client/connection.py and
client/blocking.py), CRLs the relay serves (client/crlcache.py, protocol/crls.py), what ``askqueue``
shows (client/mailbox.py) and what reaches the terminal (client/cli.py). The relay is :class:`tests.hostile_relay.HostileRelay`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from client import operations
from client.cli import COMMAND_ERROR
from client.connection import ClientError, RelayClient
from client.crlcache import CrlCache, CrlRefused
from client.keys import Keyring
from client.state import ClientState, StateError
from pki.ca import CertificateAuthority
from pki.keys import PrivateKey, certificate_hash, generate_key, sign
from pki.keystore import load_keystore, save_keystore
from protocol.crls import crl_number, describe, issuer_id
from protocol.encoding import signing_input, utc_now
from protocol.envelope import Sealed
from protocol.errors import ErrorCode
from protocol.keyrecord import LABEL, KeyRecord
from protocol.messages import CrlInfo, CrlListResult, CrlResult, KeyRecordWire, QueueResult, error_response

from .certfactory import Issuer, leaf, self_signed_ca
from .harness import Result, private_pki, run_client
from .hostile_relay import CLOSE, HostileRelay, Later

UIDS = ("ALICE", "BOB", "CAROL")
NOW = utc_now()


def _id(value: object) -> str:
    """Test ids without spaces or quotes (so they can be named on a command line)."""
    text = "-".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return text.replace(" ", "-").replace("'", "")


@pytest.fixture()
def ca(tmp_path: Path) -> CertificateAuthority:
    return private_pki(tmp_path, UIDS)


@pytest.fixture()
def relay(tmp_path: Path, ca: CertificateAuthority):
    with HostileRelay(tmp_path) as hostile:
        hostile.enroll(*UIDS)
        yield hostile


def cli(relay: HostileRelay, uid: str, *args: str, stdin: bytes = b"", extra: tuple[str, ...] = ()) -> Result:
    d = relay.directory
    return run_client(relay.address, d / f"{uid}.p12", *args, stdin=stdin, state=d / "st" / uid,
                      extra=["--timeout", "5", *extra])


def failed(r: Result, line: str) -> None:
    """msg-client failed with exactly this one line and printed nothing."""
    assert r.code == 1 and r.err.splitlines() == [line], r.err
    assert r.out == ""


def client(relay: HostileRelay, uid: str = "ALICE", timeout: float = 5) -> RelayClient:
    store = load_keystore(relay.directory / f"{uid}.p12")
    return RelayClient(store, "127.0.0.1", relay.port, store.ca_certificates(), timeout=timeout)


# ============================================================================ answers and framing
def test_an_answer_nobody_asked_for_ends_the_connection(relay):
    relay.answers["queue"] = lambda obj, uid: [QueueResult([], False), {"v": 1, "id": 999, "ok": True}]

    async def go() -> None:
        c = client(relay)
        await c.connect()
        try:
            assert await c.queue() == []
            await asyncio.wait_for(c._reader_task, 10)  # type: ignore[arg-type]  # it stops at the stray answer
            with pytest.raises(ClientError, match="^the relay sent a response nobody asked for$"):
                await c.queue()
        finally:
            await c.close()

    asyncio.run(go())


def _out_of_order(obj: dict, uid: str) -> dict:
    return {"v": 1, "id": obj["id"] + 1000, "ok": True}


def test_an_answer_out_of_order_ends_the_connection_and_later_requests_fail_at_once(relay):
    relay.answers["directory"] = _out_of_order

    async def go() -> None:
        async with client(relay) as c:
            asked = asyncio.ensure_future(c.directory("BOB"))  # how this one fails: see the next test
            await asyncio.wait_for(c._reader_task, 10)  # type: ignore[arg-type]  # it stops at the answer
            relay.answers.pop("directory")
            with pytest.raises(ClientError, match="^the relay answered out of order$"):
                await c.queue()  # not written to the broken connection: the reason, at once
            asked.cancel()

    asyncio.run(go())
    assert relay.ops("queue") == []


def test_the_request_that_got_an_answer_out_of_order_is_told_so_at_once(relay):
    relay.answers["directory"] = _out_of_order

    async def go() -> None:
        async with client(relay, timeout=5) as c:
            with pytest.raises(ClientError, match="^the relay answered out of order$"):
                await c.directory("BOB")

    asyncio.run(go())


@pytest.mark.parametrize("pages", ["the same page again", "a page going back"], ids=_id)
def test_queue_pages_that_do_not_advance_are_refused(relay, pages):
    """A relay that answers every ``queue`` with ``more`` must not keep the client paging forever;
    after 50 pages it hangs up, so a client without the check fails here instead of looping."""
    relay.messages.clear()
    entries = {}
    for num in (3, 5):
        msg = relay.store("ALICE", "BOB", f"{num:032x}", _sealed(), num=num)
        entries[num] = msg.entry()
    asked = []

    def answer(obj: dict, uid: str) -> object:
        asked.append(obj)
        if len(asked) > 50:
            return CLOSE
        if pages == "the same page again":
            return QueueResult([entries[5]], True)
        return QueueResult([entries[5] if len(asked) == 1 else entries[3]], True)

    relay.answers["queue"] = answer
    failed(cli(relay, "ALICE", "askqueue"), "msg-client: bad response from the relay: queue pages do not advance")
    assert len(asked) == 2


def test_a_relay_cannot_make_a_client_hold_an_endless_queue(relay, monkeypatch):
    """Pages that do advance, but never end: the client stops at its bound (lowered here to 10; the
    relay hangs up after 100 pages, so a client without the bound fails here instead of growing)."""
    monkeypatch.setattr(operations, "MAX_QUEUE_ENTRIES", 10)
    entry = relay.store("ALICE", "BOB", "c" * 32, _sealed(), num=1).entry()
    pages = []

    def answer(obj: dict, uid: str) -> object:
        pages.append(obj)
        if len(pages) > 100:
            return CLOSE
        first = obj.get("after", 0) + 1
        return QueueResult([dataclasses.replace(entry, num=n) for n in range(first, first + 4)], True)

    relay.answers["queue"] = answer
    failed(cli(relay, "ALICE", "askqueue"), "msg-client: bad response from the relay: more than 10 unread messages "
                                            "listed")
    assert len(pages) == 3


def test_a_relay_that_does_not_answer_is_given_up_on(relay):
    relay.answers["queue"] = lambda obj, uid: Later(20, QueueResult([], False))
    r = cli(relay, "ALICE", "askqueue", extra=("--timeout", "1"))
    failed(r, "msg-client: the relay did not answer in time")


@pytest.mark.parametrize(("frame", "line"), [
    ((1 << 24).to_bytes(4, "big") + b"{", "declared frame length 16777216 exceeds the limit of 9999"),
    (b"\x00\x00\x00\x05hello", "frame is not valid JSON (JSONDecodeError)"),
    (b"\x00\x00\x00\x05[1,2]", "frame is not one JSON object"),
], ids=["over-the-limit", "not-JSON", "not-an-object"])
def test_a_broken_frame_from_the_relay_is_refused(relay, frame, line):
    relay.answers["hello"] = lambda obj, uid: frame
    failed(cli(relay, "ALICE", "askqueue"), f"msg-client: bad response from the relay: {line}")


def _big_answer(obj: dict, uid: str) -> dict:
    return {"v": 1, "id": obj["id"], "ok": True, "messages": [], "more": False, "pad": "x" * 20000}


@pytest.mark.parametrize("hello", ["honest", "frame limit above the protocol's", "operations that are not names"], ids=_id)
def test_only_a_well_formed_hello_raises_the_frame_limit(relay, hello):
    """A relay may announce frames up to 1 MiB; an announcement outside the protocol is ignored, and a
    20 000-byte answer is then refused as over the default limit."""
    ops = {"honest": (65536, ["queue"]), "frame limit above the protocol's": (1 << 30, ["queue"]),
           "operations that are not names": (65536, [1, 2])}[hello]
    relay.answers["hello"] = lambda obj, uid: {"v": 1, "id": obj["id"], "ok": True, "max_frame": ops[0],
                                                "ops": ops[1]}
    relay.answers["queue"] = _big_answer

    async def go() -> list:
        async with client(relay) as c:
            return await c.queue()

    if hello == "honest":
        assert asyncio.run(go()) == []
    else:
        with pytest.raises(ClientError, match="^bad response from the relay: declared frame length 20"):
            asyncio.run(go())


@pytest.mark.parametrize(("op", "answer", "line"), [
    ("queue", {"messages": [1], "more": False}, "queue entries must be objects"),
    ("crls", {"crls": ["x"]}, "CRL entries must be objects"),
], ids=_id)
def test_answers_with_lists_of_the_wrong_things_are_refused(relay, op, answer, line):
    relay.answers[op] = lambda obj, uid: {"v": 1, "id": obj["id"], "ok": True, **answer}
    failed(cli(relay, "ALICE", "askqueue"), f"msg-client: {line}")


def test_a_request_over_the_frame_limit_is_not_sent(relay):
    async def go() -> None:
        async with client(relay) as c:
            with pytest.raises(ClientError, match="^request too large: frame of"):
                await c.send("BOB", "a" * 32, Sealed(3, b"h", bytes(8000)))

    asyncio.run(go())
    assert relay.ops("send") == []


# ============================================================================ what reaches a terminal
def test_an_error_text_from_the_relay_cannot_drive_the_terminal(relay):
    relay.answers["get"] = lambda obj, uid: error_response(obj["id"], ErrorCode.BAD_REQUEST,
                                                           "\x1b[2J\x1b]0;owned\x07 bye")
    r = cli(relay, "ALICE", "getmsg", "1")
    failed(r, "msg-client: the relay refused: \\x1b[2J\\x1b]0;owned\\x07 bye")


def test_a_verbose_reason_cannot_drive_the_terminal(relay):
    """Bob signs a key record with a KEM name full of escape sequences; Alice's --verbose reason quotes
    it, made visible."""
    bob = load_keystore(relay.directory / "BOB.p12")
    rec = KeyRecord("BOB", "X\x1b[2J", bytes(32), NOW, NOW + dt.timedelta(days=30)).to_bytes()
    relay.keys["BOB"] = KeyRecordWire(rec, sign(bob.key, signing_input(LABEL, rec)))
    r = cli(relay, "ALICE", "send", "BOB", "s", stdin=b"b", extra=("-v",))
    assert r.code == 1 and "\x1b" not in r.err, r.err
    assert "  reason: encryption key of BOB refused: unsupported KEM X\\x1b[2J" in r.err.splitlines()
    assert relay.ops("send") == []


# ============================================================================ what askqueue shows
def _sealed() -> Sealed:
    return Sealed(3, b"h" * 20, b"e" * 20)


def test_a_queue_entry_whose_receipt_is_for_another_number_shows_no_subject(relay):
    assert cli(relay, "BOB", "askqueue").code == 0
    for subject in ("first", "second"):
        assert cli(relay, "ALICE", "send", "BOB", subject, stdin=b"b").code == 0
    relay.replace("BOB", 2, receipt=relay.messages[("BOB", 1)].receipt)
    lines = cli(relay, "BOB", "askqueue").out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["1", "2"]
    assert lines[0].endswith(":first") and lines[1].endswith(":(unverifiable)"), lines


def test_askqueue_shows_the_receipts_time_not_the_relays_word(relay):
    assert cli(relay, "BOB", "askqueue").code == 0
    assert cli(relay, "ALICE", "send", "BOB", "when?", stdin=b"b").code == 0
    signed = relay.messages[("BOB", 1)].receipt.server_time
    relay.replace("BOB", 1, server_time=dt.datetime(2001, 1, 1, tzinfo=dt.timezone.utc))
    (line,) = cli(relay, "BOB", "askqueue").out.splitlines()
    assert line == f"1:ALICE:{signed:%Y-%m-%dT%H:%M:%SZ}:when?"


# ============================================================================ CRLs the relay serves
def _crl(issuer: x509.Name, key: PrivateKey, number: int, *, last: dt.datetime | None = None,
         next_update: dt.datetime | None = None) -> x509.CertificateRevocationList:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer)
               .last_update(last or NOW - dt.timedelta(minutes=5))
               .next_update(next_update or NOW + dt.timedelta(days=30))
               .add_extension(x509.CRLNumber(number), critical=False))
    return builder.sign(key, certificate_hash(key))


def _der(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(Encoding.DER)


def held(relay: HostileRelay, uid: str) -> dict[str, int]:
    """The CRLs a user's state directory keeps, by issuer: their numbers."""
    path = relay.directory / "st" / uid / "crls.json"
    if not path.exists():
        return {}
    crls = [x509.load_der_x509_crl(base64.b64decode(v)) for v in json.loads(path.read_text()).values()]
    return {c.issuer.rfc4514_string(): crl_number(c) for c in crls}


def _newest(ca: CertificateAuthority) -> int:
    return max(crl_number(c) for c in ca.build_crls())


def test_a_crl_from_a_look_alike_ca_is_refused_and_not_kept(relay, ca):
    fake = self_signed_ca(ca.intermediate.subject)
    forged = _crl(ca.intermediate.subject, fake.key, _newest(ca) + 10**9)
    relay.served_crls = [_der(forged), *relay.served_crls[1:]]
    failed(cli(relay, "BOB", "askqueue"),
           f"msg-client: CRL of {forged.issuer.rfc4514_string()} is not signed by a CA we trust")
    assert held(relay, "BOB") == {}


def test_a_crl_of_a_ca_we_do_not_know_is_skipped_not_kept(relay, ca, tmp_path):
    """A relay may serve another organisation's CRL too: ours are used, that one is not kept."""
    other = CertificateAuthority.init(tmp_path / "other", org_unit="OTHER UNIT")
    foreign = other.build_crls()[0]
    relay.served_crls = [*relay.served_crls, _der(foreign)]
    assert cli(relay, "BOB", "askqueue").code == 0
    assert foreign.issuer.rfc4514_string() not in held(relay, "BOB")


def test_an_expired_crl_is_refused(relay, ca):
    stale = _crl(ca.intermediate.subject, ca.intermediate_key, _newest(ca) + 10**9,
                 last=NOW - dt.timedelta(days=10), next_update=NOW - dt.timedelta(days=1))
    relay.served_crls = [_der(stale), *relay.served_crls[1:]]
    r = cli(relay, "BOB", "askqueue")
    failed(r, f"msg-client: CRL of {stale.issuer.rfc4514_string()} expired at {stale.next_update_utc:%Y-%m-%d %H:%M}Z")


def test_an_unreadable_crl_is_refused(relay, ca):
    junk = b"\x30\x82\x01\x00" + b"junk" * 20
    info = CrlInfo(issuer_id(ca.intermediate.subject), _newest(ca) + 10**9, hashlib.sha256(junk).digest(), len(junk))
    relay.answers["crls"] = lambda obj, uid: CrlListResult([info])
    relay.answers["crl"] = lambda obj, uid: CrlResult(info.digest, 0, len(junk), junk)
    failed(cli(relay, "BOB", "askqueue"), "msg-client: the relay sent an unreadable CRL")


def test_a_relay_cannot_roll_a_client_back_to_an_older_crl(relay, ca):
    """Bob holds the CRL that revokes Carol. Served the older CRL again, he keeps his (an honest old
    announcement is not even fetched); announced as newer than it is, it is refused."""
    assert cli(relay, "BOB", "askqueue").code == 0
    old = relay.served_crls
    ca.revoke(uid="CAROL")
    relay.served_crls = [_der(c) for c in ca.build_crls()]
    assert cli(relay, "BOB", "askqueue").code == 0
    newer = held(relay, "BOB")
    relay.served_crls = old
    before = len(relay.ops("crl", "BOB"))
    assert cli(relay, "BOB", "askqueue").code == 0
    assert len(relay.ops("crl", "BOB")) == before and held(relay, "BOB") == newer
    old_leaf = x509.load_der_x509_crl(old[0])
    info, _ = describe(old_leaf)
    lie = CrlInfo(info.issuer, max(newer.values()) + 1, info.digest, info.size)
    relay.answers["crls"] = lambda obj, uid: CrlListResult([lie])
    failed(cli(relay, "BOB", "askqueue"),
           f"msg-client: CRL number {crl_number(old_leaf)} is older than the one we hold "
           f"({newer[old_leaf.issuer.rfc4514_string()]})")
    assert held(relay, "BOB") == newer


@pytest.mark.parametrize(("lie", "message"), [
    ("another CRL's digest", "the relay sent a piece of another CRL"),
    ("another total", "the relay sent a piece of another CRL"),
    ("another offset", "the relay sent a CRL piece out of order"),
    ("no data", "the relay sent a CRL piece out of order"),
    ("more bytes than announced", "the relay sent more CRL bytes than announced"),
    ("other bytes", "the CRL the relay sent does not match its digest"),
    ("pieces of one byte", "the relay sent a CRL in pieces of 1 bytes, too small"),
], ids=_id)
def test_crl_pieces_that_do_not_add_up_are_refused(relay, lie, message):
    honest = relay.honest

    def answer(obj: dict, uid: str) -> object:
        piece = honest(obj, uid)
        assert isinstance(piece, CrlResult)
        d, off, total, data = piece.digest, piece.offset, piece.total, piece.data
        if lie == "another CRL's digest":
            d = hashlib.sha256(b"another").digest()
        elif lie == "another total":
            total += 1
        elif lie == "another offset":
            off += 1
        elif lie == "no data":
            data = b""
        elif lie == "more bytes than announced":
            data += b"\x00\x00"
        elif lie == "pieces of one byte":
            data = data[:1]
        else:
            data = data[:-1] + bytes([data[-1] ^ 1])
        return CrlResult(d, off, total, data)

    relay.answers["crl"] = answer
    failed(cli(relay, "BOB", "askqueue"), f"msg-client: bad response from the relay: {message}")
    assert held(relay, "BOB") == {}


def test_a_relay_serving_no_crl_does_not_switch_revocation_off(relay):
    relay.served_crls = []
    failed(cli(relay, "BOB", "askqueue"),
           "msg-client: no CRL of the CA to check revocation with (the relay served none): give --crl FILE, "
           "or --no-crl to go on without revocation checks")
    assert cli(relay, "BOB", "askqueue", extra=("--no-crl",)).code == 0  # when the user says so


def test_a_relay_whose_certificate_is_revoked_is_not_talked_to(relay, ca):
    ca.revoke(uid="MSG_SERVER")
    relay.served_crls = [_der(c) for c in ca.build_crls()]
    failed(cli(relay, "BOB", "askqueue"), "msg-client: the relay's certificate is not valid: certificate is revoked")
    assert relay.ops("queue") == [] and relay.ops("publish_key") == []


def test_a_corrupt_crl_cache_is_refused(tmp_path, ca):
    state = ClientState(tmp_path / "st")
    (tmp_path / "st" / "crls.json").write_text(json.dumps({"00": base64.b64encode(b"not a CRL").decode()}))
    with pytest.raises(StateError, match="corrupt CRL cache"):
        CrlCache(state, [ca.root])


def test_only_intermediates_that_chain_to_the_anchor_may_sign_crls(tmp_path, ca):
    fake = self_signed_ca(ca.intermediate.subject)
    forged = _der(_crl(ca.intermediate.subject, fake.key, _newest(ca) + 10**9))
    look_alike = CrlCache(ClientState(tmp_path / "a"), [ca.root], [fake.cert])
    with pytest.raises(CrlRefused, match="is not signed by a CA we trust"):
        look_alike.offer(forged)
    real = CrlCache(ClientState(tmp_path / "b"), [ca.root], [ca.intermediate])
    assert real.offer(_der(ca.build_crls()[0])) is True



# ============================================================================ the state directory
def test_a_corrupt_state_file_is_named_not_overwritten(relay):
    assert cli(relay, "BOB", "askqueue").code == 0
    seen = relay.directory / "st" / "BOB" / "seen.json"
    seen.write_text("{not json")
    assert cli(relay, "ALICE", "send", "BOB", "s", stdin=b"b").code == 0
    failed(cli(relay, "BOB", "getmsg", "1"), f"msg-client: {seen}: corrupt state file (move it away to start afresh)")
    assert seen.read_text() == "{not json" and relay.ops("mark_read") == []


def test_a_corrupt_key_file_is_named(relay):
    assert cli(relay, "BOB", "askqueue").code == 0
    keys = relay.directory / "st" / "BOB" / "keys.json"
    keys.write_text(json.dumps({"current": "x", "keys": {"x": {"uid": "BOB"}}}))
    failed(cli(relay, "BOB", "askqueue"), f"msg-client: {keys}: corrupt key file")


def test_keys_of_another_user_are_not_imported(relay, tmp_path):
    for uid in ("BOB", "CAROL"):
        assert cli(relay, uid, "askqueue").code == 0
    export = tmp_path / "carol.keys"
    assert cli(relay, "CAROL", "keys", "export", str(export)).code == 0
    before = (relay.directory / "st" / "BOB" / "keys.json").read_bytes()
    failed(cli(relay, "BOB", "keys", "import", str(export)), "msg-client: the key file holds keys of another user, not BOB")
    (tmp_path / "other.json").write_text(json.dumps({"current": None, "keys": {"a": 1}}))
    failed(cli(relay, "BOB", "keys", "import", str(tmp_path / "other.json")),
           "msg-client: not a key file made by msg-client keys export")
    (tmp_path / "junk").write_bytes(b"\x00 not json")
    failed(cli(relay, "BOB", "keys", "import", str(tmp_path / "junk")),
           f"msg-client: {tmp_path / 'junk'}: not a key file made by msg-client keys export")
    assert (relay.directory / "st" / "BOB" / "keys.json").read_bytes() == before
    failed(cli(relay, "CAROL", "keys", "export", str(export)),
           f"msg-client: {export} already exists: choose a new file name")


def test_a_keyring_refuses_what_it_cannot_make(tmp_path):
    keyring = Keyring(ClientState(tmp_path / "st"), "BOB")
    with pytest.raises(StateError, match="^no encryption key to sign$"):
        keyring.resign(generate_key())
    with pytest.raises(StateError, match=r"^unknown KEM RSA \(choose from MLKEM768_X25519, X25519\)$"):
        keyring.rotate(generate_key(), "RSA")
    assert keyring.keys == {} and not (tmp_path / "st" / "keys.json").exists()


# ============================================================================ what msg-client refuses to start with
@pytest.mark.parametrize("args", [("keys",), ("keys", "export"), ("keys", "list", "FILE"), ("keys", "import", "A", "B")],
                         ids=_id)
def test_keys_needs_export_or_import_and_a_file(relay, args):
    r = cli(relay, "BOB", *args)
    assert r.code == 1 and r.err.splitlines()[:2] == [COMMAND_ERROR, "keys needs export FILE or import FILE"], r.err


@pytest.mark.parametrize("server", ["localhost", "localhost:99999", "localhost:http", ":7777"], ids=_id)
def test_a_server_that_is_not_host_and_port_is_refused(tmp_path, ca, server):
    r = run_client(server, tmp_path / "BOB.p12", "askqueue", state=tmp_path / "st" / "BOB")
    failed(r, f"msg-client: --server must be HOST:PORT, not {server!r}")


def test_a_keystore_without_a_uid_or_a_ca_is_refused(relay, ca, tmp_path):
    nameless = leaf(Issuer(ca.intermediate, ca.intermediate_key), None, cn="anonymous")
    nameless.chain = ca.chain
    save_keystore(tmp_path / "nameless.p12", nameless, None)
    r = run_client(relay.address, tmp_path / "nameless.p12", "askqueue", state=tmp_path / "st" / "x")
    failed(r, f"msg-client: {tmp_path / 'nameless.p12'}: certificate has no UID (PSEUDONYM)")
    bob = load_keystore(tmp_path / "BOB.p12")
    save_keystore(tmp_path / "alone.p12", type(bob)(bob.key, bob.cert, []), None)
    r = run_client(relay.address, tmp_path / "alone.p12", "askqueue", state=tmp_path / "st" / "y")
    failed(r, f"msg-client: {tmp_path / 'alone.p12'} bundles no CA certificate: give --ca ROOT.pem")
    assert relay.requests == []
