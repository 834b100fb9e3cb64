"""The relay end to end: a real server on 127.0.0.1, the real CLI and client library."""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.cli import COMMAND_ERROR, UNKNOWN_MESSAGE
from client.connection import ClientError, RelayClient, ServerRejected
from pki.ca import CertificateAuthority
from pki.files import certs_to_pem
from pki.keystore import Keystore, load_keystore
from pki.tls import client_context, server_context
from protocol.frames import MAX_FRAME, encode_frame

from .certfactory import DAY, NOW, Issuer, leaf
from .harness import ServerThread, private_pki, private_relay, raw_session, run_client, server_config


def send(relay, user, sender, to, subject, body=b"hello"):
    p12, state = user(sender)
    return run_client(relay, p12, "send", to, subject, stdin=body, state=state)


def cli(relay, user, uid, *args):
    p12, state = user(uid)
    return run_client(relay, p12, *args, state=state)


def test_round_trip(relay, user):
    assert cli(relay, user, "MSG_CLI2", "askqueue").out == ""  # first run publishes MSG_CLI2's key
    r = send(relay, user, "MSG_CLI1", "MSG_CLI2", "first subject", b"line one\nline two\n")
    assert r.code == 0 and r.out.startswith("sent ") and "MSG_CLI2" in r.out
    r = cli(relay, user, "MSG_CLI2", "askqueue")
    lines = r.out.splitlines()
    assert r.code == 0 and len(lines) == 1
    num, sender, _time, subject = lines[0].split(":", 3)[0], lines[0].split(":")[1], None, lines[0].rsplit(":", 1)[1]
    assert (num, sender, subject) == ("1", "MSG_CLI1", "first subject")
    r = cli(relay, user, "MSG_CLI2", "getmsg", "1")
    assert r.code == 0 and r.out_bytes.endswith(b"\n\nline one\nline two\n") and "From: MSG_CLI1" in r.out
    assert cli(relay, user, "MSG_CLI2", "askqueue").out == ""
    again = cli(relay, user, "MSG_CLI2", "getmsg", "1")
    assert again.code == 0 and again.out == r.out


def test_exact_error_strings_and_exit_codes(relay, user):
    r = cli(relay, user, "MSG_CLI2", "getmsg", "42")
    assert r.code == 1 and r.err.splitlines()[0] == UNKNOWN_MESSAGE
    for bad in (("frobnicate",), ("getmsg",), ("getmsg", "x"), ("send", "MSG_CLI1"), ()):
        r = cli(relay, user, "MSG_CLI2", *bad)
        assert r.code == 1 and r.err.splitlines()[0] == COMMAND_ERROR and "askqueue" in r.err
    r = cli(relay, user, "MSG_CLI2", "help")
    assert r.code == 0 and "getmsg <NUM>" in r.out


def test_body_of_1001_bytes_refused_nothing_stored(relay, user):
    cli(relay, user, "MSG_CLI2", "askqueue")
    r = send(relay, user, "MSG_CLI1", "MSG_CLI2", "big", b"x" * 1001)
    assert r.code == 1 and "1000" in r.err and "Traceback" not in r.err
    assert cli(relay, user, "MSG_CLI2", "askqueue").out == ""
    assert send(relay, user, "MSG_CLI1", "MSG_CLI2", "exact", b"x" * 1000).code == 0


def test_unknown_recipient_and_bad_subject(relay, user):
    r = send(relay, user, "MSG_CLI1", "NOBODY", "s")
    assert r.code == 1 and "unknown user NOBODY" in r.err and r.err.count("\n") == 1
    r = send(relay, user, "MSG_CLI1", "MSG_CLI3", "s")
    assert r.code == 1 and "has not published an encryption key" in r.err
    r = send(relay, user, "MSG_CLI1", "MSG_CLI2", "evil\x1b[2Jsubject")
    assert r.code == 1 and "control characters" in r.err


def test_restart_keeps_messages(demo_dir, tmp_path, user):
    cfg = server_config(demo_dir, tmp_path)
    first = ServerThread(cfg).start()
    cli(first, user, "MSG_CLI3", "askqueue")
    assert send(first, user, "MSG_CLI1", "MSG_CLI3", "persist").code == 0
    first.stop()
    second = ServerThread(cfg).start()
    try:
        r = cli(second, user, "MSG_CLI3", "askqueue")
        assert r.out.endswith(":persist\n")
        assert cli(second, user, "MSG_CLI3", "getmsg", "1").code == 0
    finally:
        second.stop()


def test_cannot_read_another_users_queue(relay, user):
    cli(relay, user, "MSG_CLI2", "askqueue")
    assert send(relay, user, "MSG_CLI1", "MSG_CLI2", "private").code == 0
    assert cli(relay, user, "MSG_CLI3", "askqueue").out == ""
    r = cli(relay, user, "MSG_CLI3", "getmsg", "1")
    assert r.code == 1 and r.err.startswith(UNKNOWN_MESSAGE)


@pytest.fixture()
def roomy_relay(demo_dir, tmp_path):
    """A relay whose users may each hold 32 connections (the default allows 8)."""
    server = ServerThread(server_config(demo_dir, tmp_path, max_per_user=32)).start()
    yield server
    server.stop()


def test_fifty_concurrent_clients(roomy_relay, demo_dir, tmp_path):
    relay = roomy_relay
    ks = {u: load_keystore(demo_dir / f"{u}.p12") for u in ("MSG_CLI1", "MSG_CLI2", "MSG_CLI3")}
    anchors = ks["MSG_CLI1"].ca_certificates()

    async def one(i: int):
        from client.mailbox import Mailbox
        from client.state import ClientState
        from pki.validation import TrustPolicy

        sender = ("MSG_CLI1", "MSG_CLI3")[i % 2]
        async with RelayClient(ks[sender], "127.0.0.1", relay.port, anchors) as c:
            box = Mailbox(c, ClientState(tmp_path / f"s{i}"), TrustPolicy(anchors))
            return await box.send("MSG_CLI2", f"msg {i}", f"body {i}".encode())

    async def all_of_them():
        from client.mailbox import Mailbox
        from client.state import ClientState
        from pki.validation import TrustPolicy

        async with RelayClient(ks["MSG_CLI2"], "127.0.0.1", relay.port, anchors) as c:
            await Mailbox(c, ClientState(tmp_path / "bob"), TrustPolicy(anchors)).ensure_published()
        return await asyncio.gather(*(one(i) for i in range(50)))

    receipts = asyncio.run(all_of_them())
    assert sorted(r.queue_number for r in receipts) == list(range(1, 51))

    async def count():
        async with RelayClient(ks["MSG_CLI2"], "127.0.0.1", relay.port, anchors) as c:
            return await c.queue()

    entries = asyncio.run(count())
    assert len(entries) == 50 and len({e.num for e in entries}) == 50


# ------------------------------------------------------------------------------ handshakes
def try_connect(relay, store: Keystore, anchors) -> Exception | None:
    async def go():
        c = RelayClient(store, "127.0.0.1", relay.port, anchors, timeout=5)
        try:
            await c.connect()
            await c.queue()
        finally:
            await c.close()

    try:
        asyncio.run(go())
    except (ClientError, ServerRejected) as exc:
        return exc
    return None


def audit_reasons(tmp_path: Path, server: ServerThread) -> list[str]:
    """The rejections logged so far, once the relay is done with the connections it has open.

    A refused client gets the TLS alert before the relay's session has written its audit line.
    """

    async def settle() -> None:
        assert server.server is not None
        if server.server._sessions:
            await asyncio.wait(list(server.server._sessions), timeout=10)

    server.call(settle())
    lines = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
    return [x.get("reason", "") for x in lines if x["event"] == "connection_rejected"]


def our_leaf(demo_ca: CertificateAuthority, uid: str, **kw) -> Keystore:
    store = leaf(Issuer(demo_ca.intermediate, demo_ca.intermediate_key), uid, **kw)
    store.chain = demo_ca.chain
    return store


def test_rejected_handshakes(relay, demo_ca, tmp_path, demo_dir):
    anchors = [demo_ca.root]
    ok = load_keystore(demo_dir / "MSG_CLI1.p12")
    assert try_connect(relay, ok, anchors) is None
    other = CertificateAuthority.init(tmp_path / "other")
    cases = {
        "other CA": other.issue("MSG_CLI1"),
        "expired": our_leaf(demo_ca, "OLDIE", not_before=NOW - 30 * DAY, not_after=NOW - DAY),
        "wrong OU": our_leaf(demo_ca, "OUTSIDER", ou="ANOTHER UNIT"),
        "server as client": load_keystore(demo_dir / "MSG_SERVER.p12"),
    }
    in_handshake = {"other CA": "unknown CA", "expired": "expired", "server as client": "not usable for this purpose"}
    for name, store in cases.items():
        exc = try_connect(relay, store, anchors if name != "other CA" else anchors)
        assert isinstance(exc, ServerRejected), f"{name}: {exc!r}"
        if name in in_handshake:  # refused by OpenSSL: the TLS alert names the reason
            assert str(exc) == f"the relay refused our certificate: {in_handshake[name]}", f"{name}: {exc!r}"
    reasons = " | ".join(audit_reasons(tmp_path, relay))
    assert "expired" in reasons and "organisational unit" in reasons
    assert len(audit_reasons(tmp_path, relay)) >= 4
    assert try_connect(relay, ok, anchors) is None  # still serving


def test_no_client_certificate(relay, demo_ca):
    async def go():
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=certs_to_pem([demo_ca.root]).decode())
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port, ssl=ctx)
        writer.write(encode_frame({"id": 1, "op": "queue"}))
        await writer.drain()
        with pytest.raises((ssl.SSLError, ConnectionError)) as info:
            data = await asyncio.wait_for(reader.read(100), 5)
            if not data:
                raise ConnectionError("closed")
        writer.close()
        return info.value

    exc = asyncio.run(go())
    assert isinstance(exc, ssl.SSLError) and exc.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED", repr(exc)


def test_revoked_client_refused(tmp_path):
    ca = private_pki(tmp_path)
    good, bad = ca.issue("GOOD"), ca.issue("BAD")
    ca.revoke(uid="BAD")
    server = private_relay(tmp_path, enroll=False)
    try:
        assert try_connect(server, good, [ca.root]) is None
        exc = try_connect(server, bad, [ca.root])
        assert isinstance(exc, ServerRejected) and str(exc) == "the relay refused our certificate: revoked", repr(exc)
        assert any("revoked" in r for r in audit_reasons(tmp_path, server))
    finally:
        server.stop()


def test_client_rejects_server_of_another_ca(relay, tmp_path, demo_dir, user):
    other = CertificateAuthority.init(tmp_path / "other")
    (tmp_path / "other.pem").write_bytes(certs_to_pem([other.root]))
    p12, state = user("MSG_CLI1")
    r = run_client(relay, p12, "askqueue", state=state, extra=["--ca", str(tmp_path / "other.pem")])
    assert r.code == 1 and "server certificate rejected" in r.err and r.err.count("\n") == 1


def test_client_rejects_server_without_server_uid(demo_ca, demo_dir):
    impostor = our_leaf(demo_ca, "MSG_CLI9", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    ctx = server_context(impostor, [demo_ca.root])

    async def go():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            c = RelayClient(load_keystore(demo_dir / "MSG_CLI1.p12"), "127.0.0.1", port, [demo_ca.root], timeout=5)
            with pytest.raises(ClientError, match="UID MSG_CLI9, expected MSG_SERVER"):
                await c.connect()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(go())


def test_tls12_refused(relay, demo_dir, tmp_path):
    store = load_keystore(demo_dir / "MSG_CLI1.p12")
    ctx = client_context(store, store.ca_certificates())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2

    async def go():
        with pytest.raises(ssl.SSLError) as info:
            await asyncio.open_connection("127.0.0.1", relay.port, ssl=ctx)
        return info.value

    assert asyncio.run(go()).reason == "TLSV1_ALERT_PROTOCOL_VERSION"  # told why, not just cut off
    assert any("PROTOCOL" in r.upper() for r in audit_reasons(tmp_path, relay))


# ------------------------------------------------------------------------------ hostile bytes
# raw_session (tests.harness) reads until the answers it waits for are in: no fixed listening window.
@pytest.fixture(scope="module")
def shared_relay(demo_dir, tmp_path_factory):
    """One relay for the tests below that only need it up; the idle timeout is generous so that a busy
    machine cannot make it drop a connection a test is still using."""
    tmp = tmp_path_factory.mktemp("hostile")
    server = ServerThread(server_config(demo_dir, tmp, idle_timeout=10)).start()
    yield server
    server.stop()


SENTINEL = "sentinel: all answered"  # longer than any id the strategy below can draw


def frames_in(payload: bytes) -> tuple[int, bytes, bool]:
    """How the relay frames ``payload``: the number of frames it will answer, the bytes that complete the
    frame (or length prefix) ``payload`` leaves half-sent, and whether the relay must then refuse a
    declared length over its limit and close. Sent after ``payload`` and its completion, a request is
    a frame of its own, so its answer proves that everything before it was answered."""
    pos = frames = 0
    while pos < len(payload):
        header = payload[pos:pos + 4]
        pad = b"\0" * (4 - len(header))  # completes a half-sent length prefix
        (length,) = struct.unpack(">I", header + pad)
        if length > MAX_FRAME:
            return frames, pad, True
        have = len(payload) - pos - 4
        if have < length:
            return frames + 1, pad + b" " * (length - max(have, 0)), False
        pos += 4 + length
        frames += 1
    return frames, b"", False


hostile = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda n, b: struct.pack(">I", n) + b, st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    st.builds(lambda b: struct.pack(">I", len(b) + 10) + b, st.binary(max_size=64)),  # truncated
    st.builds(lambda b: struct.pack(">I", len(b)) + b, st.binary(max_size=64)),  # invalid UTF-8 / JSON
    st.builds(lambda o: encode_frame(o), st.dictionaries(st.sampled_from(["id", "op", "num", "to", "uid", "v"]),
                                                         st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                                                         | st.lists(st.integers(), max_size=2), max_size=5)),
    st.just(encode_frame({"id": 1, "op": "queue"})[:-1] + b"\xff"),
    st.just(struct.pack(">I", 2**32 - 1)),
    st.just(struct.pack(">I", 5) + b"[1,2]"),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=hostile)
def test_malformed_input_never_hurts_the_server(shared_relay, alice, payload):
    frames, completion, closes = frames_in(payload)
    sentinel = b"" if closes else encode_frame({"id": SENTINEL, "op": "queue"})
    responses = asyncio.run(raw_session(shared_relay.port, alice, payload + completion + sentinel, until=SENTINEL))
    for r in responses:
        assert r["ok"] is False or r.get("id") is not None
        if r["ok"] is False:
            assert r["error"]["code"] in {"bad_request", "too_large", "unsupported_version", "unknown_message",
                                          "unknown_user", "unknown_recipient", "bad_signature"}
    if closes:  # answers (those before the oversize frame may be dropped with it), then too_large, then EOF
        assert 1 <= len(responses) <= frames + 1 and responses[-1]["ok"] is False
        assert responses[-1]["error"]["code"] == "too_large"
    else:  # one answer per frame, in order, and the connection still serves
        assert len(responses) == frames + 1 and responses[-1] == {**responses[-1], "id": SENTINEL, "ok": True}
    good = asyncio.run(raw_session(shared_relay.port, alice, encode_frame({"id": "ok", "op": "queue"}), until="ok"))
    assert good and good[0]["ok"] is True and good[0]["id"] == "ok"


def test_pipelined_requests_answered_in_order(shared_relay, demo_dir):
    store = load_keystore(demo_dir / "MSG_CLI1.p12")
    burst = b"".join(encode_frame({"id": i, "op": "queue"}) for i in range(20)) + encode_frame({"id": 99, "op": "x"})
    out = asyncio.run(raw_session(shared_relay.port, store, burst, until=99))
    assert [r["id"] for r in out] == list(range(20)) + [99]
    assert out[-1]["error"]["code"] == "bad_request"


def test_pipelined_sends_keep_their_order(shared_relay, demo_dir, tmp_path):
    """Consecutive sends on one connection share commits but keep request order in the queue."""
    from client.keys import Keyring
    from client.state import ClientState
    from protocol.encoding import utc_now
    from protocol.envelope import InnerMessage, seal

    alice, bob = (load_keystore(demo_dir / f"{u}.p12") for u in ("MSG_CLI1", "MSG_CLI2"))
    own = Keyring(ClientState(tmp_path / "bob"), "MSG_CLI2").ensure(bob.key, "X25519")

    async def go():
        async with RelayClient(bob, "127.0.0.1", shared_relay.port, bob.ca_certificates()) as c:
            await c.publish_key(own.record.to_bytes(), own.signature)
            before = len(await c.queue())
        async with RelayClient(alice, "127.0.0.1", shared_relay.port, alice.ca_certificates()) as c:
            reqs = []
            for i in range(40):
                mid = f"{i:032x}"
                sealed = seal(InnerMessage("MSG_CLI1", "MSG_CLI2", mid, utc_now(), f"n{i}", b"b"), alice.key, own.record)
                reqs.append(c.send_request("MSG_CLI2", mid, sealed))
            results = await c.pipeline(reqs)
        return before, results

    before, results = asyncio.run(go())
    assert [r.receipt.queue_number for r in results] == list(range(before + 1, before + 41))
    assert [r.receipt.msg_id for r in results] == [f"{i:032x}" for i in range(40)]


@pytest.fixture()
def impatient_relay(demo_dir, tmp_path):
    server = ServerThread(server_config(demo_dir, tmp_path, idle_timeout=0.5)).start()
    yield server
    server.stop()


def test_stalled_half_frame_dropped_at_idle_timeout(impatient_relay, demo_dir):
    store = load_keystore(demo_dir / "MSG_CLI1.p12")

    async def go():
        ctx = client_context(store, store.ca_certificates())
        reader, writer = await asyncio.open_connection("127.0.0.1", impatient_relay.port, ssl=ctx)
        writer.write(encode_frame({"id": 1, "op": "queue"})[:6])
        await writer.drain()
        loop = asyncio.get_running_loop()
        start = loop.time()
        data = await asyncio.wait_for(reader.read(100), 5)
        writer.close()
        return data, loop.time() - start

    data, elapsed = asyncio.run(go())
    assert data == b"" and elapsed < 4


def test_connection_limit(demo_dir, tmp_path):
    """Two users hold one connection each: a full relay has no one to make room from, so a third is refused
    (tests/test_quota.py: a user holding several gives one up instead)."""
    server = ServerThread(server_config(demo_dir, tmp_path, max_connections=2)).start()
    stores = [load_keystore(demo_dir / f"{uid}.p12") for uid in ("MSG_CLI1", "MSG_CLI2", "MSG_CLI3")]

    async def go():
        held = [await asyncio.open_connection("127.0.0.1", server.port, ssl=client_context(s, s.ca_certificates()))
                for s in stores[:2]]
        for r, w in held:
            w.write(encode_frame({"id": 1, "op": "queue"}))
            await r.read(1)  # handshake and session are established
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            ctx = client_context(stores[2], stores[2].ca_certificates())
            r3, w3 = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx)
            w3.write(encode_frame({"id": 1, "op": "queue"}))
            if not await asyncio.wait_for(r3.read(10), 5):
                raise ConnectionError("closed")
        for _, w in held:
            w.close()

    try:
        asyncio.run(go())
        events = [json.loads(x)["event"] for x in (tmp_path / "audit.log").read_text().splitlines()]
        assert "connection_refused" in events
    finally:
        server.stop()


def test_audit_log_has_no_content(relay, user, tmp_path):
    cli(relay, user, "MSG_CLI2", "askqueue")
    assert send(relay, user, "MSG_CLI1", "MSG_CLI2", "SECRET-SUBJECT-TOKEN", b"SECRET-BODY-TOKEN").code == 0
    cli(relay, user, "MSG_CLI2", "getmsg", "1")
    log = (tmp_path / "audit.log").read_text()
    assert '"op":"send"' in log and '"op":"get"' in log
    assert "SECRET" not in log


def test_shims_work_from_repo_root(relay, demo_dir, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "msg_client.py", "-user", str(demo_dir / "MSG_CLI1.p12"), "--server",
                          relay.address, "--state-dir", str(tmp_path / "s"), "askqueue"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr == ""
    res = subprocess.run([sys.executable, "msg_server.py", "--help"], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0 and "--users-dir" in res.stdout


def test_revocation_takes_effect_without_a_restart(tmp_path):
    """The relay notices the CA's new CRL: new connections are refused and open ones closed."""
    ca = private_pki(tmp_path)
    user = ca.issue("SOON_REVOKED")
    server = private_relay(tmp_path, enroll=False, crl_check_interval=0.05)

    async def scenario():
        open_client = RelayClient(user, "127.0.0.1", server.port, [ca.root], timeout=5)
        await open_client.connect()
        await open_client.queue()
        ca.revoke(uid="SOON_REVOKED")
        deadline = asyncio.get_running_loop().time() + 20
        while "crl_reloaded" not in (tmp_path / "audit.log").read_text():  # the watch notices the new file
            assert asyncio.get_running_loop().time() < deadline, "the relay never reloaded its CRL"
            await asyncio.sleep(0.02)
        with pytest.raises((ClientError, ServerRejected)):
            async with RelayClient(user, "127.0.0.1", server.port, [ca.root], timeout=5) as again:
                await again.queue()
        with pytest.raises(ClientError):
            await open_client.queue()  # the connection opened before the revocation is gone too
        await open_client.close()

    try:
        asyncio.run(scenario())
        events = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
        assert any(e["event"] == "crl_reloaded" for e in events)
        assert any(e["event"] == "connection_closed" and "revoked" in e.get("reason", "") for e in events)
    finally:
        server.stop()
