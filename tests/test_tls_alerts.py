"""TLS that says why: the relay's refusal reaches the client as an alert, and a leaf alone is enough.

Under TLS 1.3 the relay checks the client's certificate after the client's side of the handshake
is done, so the verdict arrives on the client's first read. Without server.tls_alerts asyncio
drops the alert (CPython gh-98078) and every one of these reads would end in a bare EOF.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import select
import shutil
import socket
import ssl
import subprocess
import types
from asyncio import sslproto
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from client import connection
from pki import tls
from pki.ca import CertificateAuthority
from pki.files import certs_to_pem, write_atomic
from pki.keys import PrivateKey, certificate_hash, generate_key
from pki.keystore import Keystore, load_keystore, save_keystore
from pki.profile import LeafRequest, Subject, make_intermediate, make_leaf
from pki.tls import server_context
from protocol.frames import encode_frame
from server import tls_alerts

from .certfactory import DAY, NOW, Issuer, leaf, name, self_signed_ca
from .harness import ServerThread, run_client, server_config

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command-line tool is not installed")


@dataclass
class Pki:
    """One CA for the module (key generation is the slow part) and the clients the tests need."""

    directory: Path
    ca: CertificateAuthority
    root_pem: Path
    lookalike: CertificateAuthority


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("alerts")
    ca = CertificateAuthority.init(d / "ca")
    save_keystore(d / "MSG_SERVER.p12", ca.issue("MSG_SERVER", server=True), None)
    for uid in ("GOOD", "REVOKED"):
        save_keystore(d / f"{uid}.p12", ca.issue(uid), None)
    ca.revoke(uid="REVOKED")
    expired = leaf(Issuer(ca.intermediate, ca.intermediate_key), "EXPIRED",
                   not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    expired.chain = ca.chain
    save_keystore(d / "EXPIRED.p12", expired, None)
    # Same tooling elsewhere: a root and intermediate with exactly our DNs, but other keys.
    lookalike = CertificateAuthority.init(d / "lookalike")
    assert (lookalike.root.subject, lookalike.intermediate.subject) == (ca.root.subject, ca.intermediate.subject)
    save_keystore(d / "LOOKALIKE.p12", lookalike.issue("GOOD"), None)
    root_pem = d / "root.pem"
    root_pem.write_bytes(certs_to_pem([ca.root]))
    return Pki(d, ca, root_pem, lookalike)


def start_relay(pki_dir: Path, tmp: Path, **kw: object) -> ServerThread:
    """A relay for ``pki_dir``'s CA, its database and audit log in the test's own ``tmp``."""
    kw.setdefault("crl", str(pki_dir / "ca" / "crl.pem"))
    return ServerThread(server_config(pki_dir, tmp, p12=str(pki_dir / "MSG_SERVER.p12"), users_dir=None,
                                      **kw)).start()


@pytest.fixture()
def relay(pki: Pki, tmp_path: Path) -> Iterator[ServerThread]:
    server = start_relay(pki.directory, tmp_path)
    yield server
    server.stop()


def settle(server: ServerThread, timeout: float = 10) -> None:
    """Wait (on the relay's loop) until the connections it has open are finished and audited."""

    async def idle() -> None:
        assert server.server is not None
        tasks = list(server.server._sessions)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    server.call(idle())


def audit(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "audit.log").read_text().splitlines()]


def write_pem(path: Path, certs: list[x509.Certificate], key: PrivateKey | None = None) -> Path:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()) if key is not None else b""
    path.write_bytes(key_pem + certs_to_pem(certs))
    return path


def first_read(port: int, root: x509.Certificate, tmp: Path, store: Keystore | None,
               send_chain: bool = True) -> BaseException | bytes:
    """Handshake with a blocking stdlib client, then what its first read gets: data or the error.

    Nothing is sent after the handshake, so the relay never closes on unread data (which would turn
    its FIN into a reset and hide the alert for reasons that have nothing to do with asyncio).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=certs_to_pem([root]).decode("ascii"))
    if store is not None:
        chain = [store.cert, *store.intermediates()] if send_chain else [store.cert]
        ctx.load_cert_chain(write_pem(tmp / "client.pem", chain, store.key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        # suppress_ragged_eofs=False: a close without an alert raises SSLEOFError instead of b"".
        with ctx.wrap_socket(raw, suppress_ragged_eofs=False) as tls:
            try:
                return tls.recv(65536)
            except (ssl.SSLError, OSError) as exc:
                return exc


def user(pki: Pki, uid: str) -> Keystore:
    return load_keystore(pki.directory / f"{uid}.p12")


# ------------------------------------------------------------------- the alert reaches the client
@pytest.mark.parametrize(("uid", "alert"), [
    ("REVOKED", "SSLV3_ALERT_CERTIFICATE_REVOKED"),
    ("EXPIRED", "SSLV3_ALERT_CERTIFICATE_EXPIRED"),
    ("LOOKALIKE", "TLSV1_ALERT_UNKNOWN_CA"),
    (None, "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
])
def test_refused_client_reads_the_alert_not_an_eof(pki: Pki, relay: ServerThread, tmp_path: Path,
                                                   uid: str | None, alert: str) -> None:
    outcome = first_read(relay.port, pki.ca.root, tmp_path, user(pki, uid) if uid else None)
    assert isinstance(outcome, ssl.SSLError), f"expected the {alert} alert, got {outcome!r}"
    assert outcome.reason == alert, outcome


def test_a_client_still_sending_when_refused_reads_the_alert_not_a_reset(pki: Pki, relay: ServerThread,
                                                                         tmp_path: Path) -> None:
    """TLS 1.3 clients send requests before they can know the verdict (msg-client pipelines two).

    Here the client writes only after the alert has arrived, so the relay has surely closed its
    side: closed outright, its kernel would answer with a reset and these writes would fail.
    """
    store = user(pki, "REVOKED")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=certs_to_pem([pki.ca.root]).decode("ascii"))
    ctx.load_cert_chain(write_pem(tmp_path / "revoked.pem", [store.cert, *store.intermediates()], store.key))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, suppress_ragged_eofs=False) as tls:
            readable, _, _ = select.select([tls], [], [], 10)
            assert readable, "no alert within 10 s"
            frame = encode_frame({"id": 1, "op": "queue"})
            for _ in range(100):  # a few KiB: well inside what the relay drains
                tls.sendall(frame)
            with pytest.raises(ssl.SSLError) as info:
                tls.recv(65536)
    assert info.value.reason == "SSLV3_ALERT_CERTIFICATE_REVOKED"


def test_accepted_client_is_unaffected(pki: Pki, relay: ServerThread, tmp_path: Path) -> None:
    """The workaround touches only failed handshakes: a good client is served as before."""
    store = user(pki, "GOOD")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=certs_to_pem([pki.ca.root]).decode("ascii"))
    ctx.load_cert_chain(write_pem(tmp_path / "good.pem", [store.cert, *store.intermediates()], store.key))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(encode_frame({"id": 7, "op": "queue"}))
        answer = b""
        while len(answer) < 4 or len(answer) < 4 + int.from_bytes(answer[:4], "big"):
            chunk = tls.recv(65536)
            assert chunk, f"connection closed after {answer!r}"
            answer += chunk
    response = json.loads(answer[4:])
    assert response["id"] == 7 and response["ok"] is True


def test_the_relay_installs_the_workaround_once(relay: ServerThread) -> None:
    assert tls_alerts.installed()
    patched = sslproto.SSLProtocol._on_handshake_complete
    tls_alerts.install()  # a second RelayServer in the same process must not wrap the wrapper
    assert sslproto.SSLProtocol._on_handshake_complete is patched
    assert not getattr(getattr(patched, "__wrapped__", None), "_msg_relay_flushes_alert", False)


# ------------------------------------------------------------------- msg-client says it in one line
@pytest.mark.parametrize(("uid", "line"), [
    ("REVOKED", "msg-client: the relay refused our certificate: revoked"),
    ("EXPIRED", "msg-client: the relay refused our certificate: expired"),
    ("LOOKALIKE", "msg-client: the relay refused our certificate: unknown CA"),
])
def test_msg_client_names_the_refusal(pki: Pki, relay: ServerThread, tmp_path: Path, uid: str, line: str) -> None:
    # --ca: the look-alike keystore bundles the look-alike root, which would refuse the relay first.
    r = run_client(relay, pki.directory / f"{uid}.p12", "askqueue", state=tmp_path / "st",
                   extra=["--ca", str(pki.root_pem)])
    assert r.code == 1 and r.err.splitlines() == [line], r.err


def test_an_alert_that_beats_connect_still_names_the_refusal(pki: Pki, relay: ServerThread,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The alert can end the session before connect() asks for the relay's certificate; OpenSSL then
    raises ValueError ("handshake not done yet"). Here that race is forced on every connection."""

    def too_late(ssl_object: object) -> None:
        raise ValueError("handshake not done yet")

    monkeypatch.setattr(connection, "peer_certificate", too_late)

    async def go() -> None:
        client = connection.RelayClient(user(pki, "REVOKED"), "127.0.0.1", relay.port, [pki.ca.root], timeout=10)
        await client.connect()

    with pytest.raises(connection.ServerRejected) as info:
        asyncio.run(go())
    assert str(info.value) == "the relay refused our certificate: revoked"


# ------------------------------------------------------------------- a leaf alone is enough
def s_client(port: int, cert: Path, key: Path, root: Path, stdin: bytes, *, wait_for_close: bool) -> str:
    """``openssl s_client`` with only a leaf; returns its stderr.

    ``wait_for_close`` (-ign_eof) keeps it reading after stdin ends, until the relay's alert or close;
    otherwise it sends stdin and closes, and the relay's audit log tells what happened.
    """
    assert OPENSSL is not None
    args = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-cert", str(cert), "-key", str(key),
            "-CAfile", str(root), "-verify_return_error", "-tls1_3", "-ign_eof" if wait_for_close else "-no_ign_eof"]
    done = subprocess.run(args, input=stdin, capture_output=True, timeout=30, check=False)
    return done.stderr.decode("utf-8", "replace")


def export_leaf(store: Keystore, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(exist_ok=True)
    return write_pem(directory / "leaf.pem", [store.cert]), write_pem(directory / "key.pem", [], store.key)


def accepted_uids(tmp: Path) -> list[str]:
    return [e["uid"] for e in audit(tmp) if e["event"] == "connection_accepted"]


@needs_openssl
def test_a_client_that_sends_only_its_leaf_is_served(pki: Pki, relay: ServerThread, tmp_path: Path) -> None:
    """The relay completes the chain with the intermediate of its own keystore (no --ca here)."""
    cert, key = export_leaf(user(pki, "GOOD"), tmp_path / "good")
    s_client(relay.port, cert, key, pki.root_pem, encode_frame({"id": 1, "op": "queue"}), wait_for_close=False)
    settle(relay)
    events = audit(tmp_path)
    assert accepted_uids(tmp_path) == ["GOOD"], events
    assert any(e["event"] == "request" and e.get("uid") == "GOOD" and e.get("op") == "queue"
               and e.get("result") == "ok" for e in events), events


@needs_openssl
def test_a_revoked_leaf_sent_alone_is_still_refused(pki: Pki, relay: ServerThread, tmp_path: Path) -> None:
    cert, key = export_leaf(user(pki, "REVOKED"), tmp_path / "revoked")
    err = s_client(relay.port, cert, key, pki.root_pem, b"", wait_for_close=True)
    assert "alert certificate revoked" in err, err
    settle(relay)
    assert accepted_uids(tmp_path) == []


def second_intermediate(ca: CertificateAuthority) -> tuple[Issuer, Keystore]:
    """Another issuing CA under our root (its own DN and key), and a leaf ORPHAN it issued."""
    inter_key, user_key = generate_key(), generate_key()
    inter = Issuer(make_intermediate(inter_key, ca.root, ca.root_key, cn="MSG Relay Second Issuing CA"), inter_key)
    cert = make_leaf(user_key.public_key(), LeafRequest(Subject("ORPHAN", "ORPHAN", ca.org_unit)),
                     inter.cert, inter.key)
    return inter, Keystore(key=user_key, cert=cert, chain=[inter.cert, ca.root])


def crls_with(ca: CertificateAuthority, inter: Issuer, *, revoked: bool) -> bytes:
    """Our CA's leaf CRL, the second intermediate's (empty), and a root CRL that may revoke it."""
    now = dt.datetime.now(dt.timezone.utc)
    leaf_crl = ca.build_crls()[0]
    root_crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.root.subject)
                .last_update(now - dt.timedelta(minutes=5)).next_update(now + 30 * DAY))
    if revoked:
        root_crl = root_crl.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(inter.cert.serial_number).revocation_date(now).build())
    inter_crl = (x509.CertificateRevocationListBuilder().issuer_name(inter.cert.subject)
                 .last_update(now - dt.timedelta(minutes=5)).next_update(now + 30 * DAY))
    crls = [leaf_crl, root_crl.sign(ca.root_key, certificate_hash(ca.root_key)),
            inter_crl.sign(inter.key, certificate_hash(inter.key))]
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)


@needs_openssl
@pytest.mark.parametrize("known_from", ["keystore", "ca bundle"])
def test_leaf_of_a_revoked_intermediate_sent_alone_is_refused(pki: Pki, tmp_path: Path, known_from: str) -> None:
    """A completed chain gets the CRL checks a sent one gets: the root's CRL covers the intermediate.

    The relay knows the second intermediate from its keystore or from the --ca bundle. The leaf
    alone is served first (the completion works), then the root revokes the intermediate, the relay
    rereads its CRL, and the same leaf is refused.
    """
    inter, orphan = second_intermediate(pki.ca)
    relay_dir = tmp_path / "relay"
    relay_dir.mkdir()
    server_store = load_keystore(pki.directory / "MSG_SERVER.p12")
    extra: dict[str, object] = {}
    if known_from == "keystore":
        server_store.chain = [*server_store.chain, inter.cert]
    else:
        extra["ca"] = str(write_pem(tmp_path / "bundle.pem", [pki.ca.root, inter.cert]))
    save_keystore(relay_dir / "MSG_SERVER.p12", server_store, None)
    crl = relay_dir / "crl.pem"
    crl.write_bytes(crls_with(pki.ca, inter, revoked=False))
    cert, key = export_leaf(orphan, tmp_path / "orphan")
    server = start_relay(relay_dir, tmp_path, crl=str(crl), crl_check_interval=0, **extra)
    try:
        s_client(server.port, cert, key, pki.root_pem, encode_frame({"id": 1, "op": "queue"}), wait_for_close=False)
        settle(server)
        assert accepted_uids(tmp_path) == ["ORPHAN"], audit(tmp_path)
        write_atomic(crl, crls_with(pki.ca, inter, revoked=True))  # noticed at the next connection
        err = s_client(server.port, cert, key, pki.root_pem, b"", wait_for_close=True)
        assert "alert certificate revoked" in err, err
        settle(server)
        events = audit(tmp_path)
        assert any(e["event"] == "crl_reloaded" for e in events), events
        assert accepted_uids(tmp_path) == ["ORPHAN"]  # the first connection only
    finally:
        server.stop()


# ------------------------------------------------------------------- intermediates never anchor
def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> ssl.SSLError | None:
    """A TLS handshake between two contexts in memory; the server side's error, if any."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        s_in.write(c_out.read())
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            c_in.write(s_out.read())
            continue
        except ssl.SSLError as exc:
            return exc
        return None
    raise AssertionError("the handshake did not finish")


def ssl_with_partial_chains() -> types.SimpleNamespace:
    """The ``ssl`` module as a Python could have it one day: new contexts accept partial chains."""

    def context(protocol: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(protocol)
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return ctx

    return types.SimpleNamespace(**{**vars(ssl), "SSLContext": context})


def test_known_intermediates_complete_chains_but_never_anchor_them(pki: Pki, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without our root among the anchors, our intermediate in the verify store must not end a chain."""
    relay_store = load_keystore(pki.directory / "MSG_SERVER.p12")
    good = user(pki, "GOOD")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.load_verify_locations(cadata=certs_to_pem([pki.ca.root]).decode("ascii"))
    client_ctx.load_cert_chain(write_pem(tmp_path / "leaf_only.pem", [good.cert], good.key))
    stranger = self_signed_ca(name("MSG_CA", "Somebody Else's Root")).cert
    monkeypatch.setattr(tls, "ssl", ssl_with_partial_chains())  # our contexts must turn them off
    assert handshake(server_context(relay_store, [pki.ca.root]), client_ctx) is None  # completed, and trusted
    ctx = server_context(relay_store, [stranger])
    assert not ctx.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
    refused = handshake(ctx, client_ctx)
    assert isinstance(refused, ssl.SSLCertVerificationError), refused
    assert refused.verify_code == 2, refused.verify_message  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
