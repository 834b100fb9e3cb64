"""The relay's own refusals that no attack through a client reaches (issue 9 §5): what it refuses to
start with, whom it refuses to enroll or admit, and requests its handlers have no answer for."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.connection import ClientError, RelayClient, ServerRejected
from pki.ca import CertificateAuthority
from pki.errors import PkiError, ValidationError
from pki.keystore import Keystore, load_keystore, save_keystore
from pki.tls import client_context
from protocol.errors import ErrorCode, ProtocolError
from protocol.frames import FrameDecoder, decode_payload, encode_frame
from protocol.messages import CrlRequest, CrlResult, QueueRequest, RemoteError, request_to_wire
from server.app import RelayServer
from server.handlers import Handlers

from .certfactory import Issuer, leaf, self_signed_ca
from .harness import private_pki, private_relay, server_config


def config(directory: Path, **kw):
    return server_config(directory, directory, **{"p12": str(directory / "MSG_SERVER.p12"), "users_dir": None, **kw})


def audit(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "audit.log").read_text().splitlines()]


# ============================================================================ what the relay starts with
def test_the_relay_will_not_serve_with_a_users_keystore(tmp_path):
    private_pki(tmp_path, ("ALICE",))
    with pytest.raises(ValidationError) as info:
        RelayServer(config(tmp_path, p12=str(tmp_path / "ALICE.p12")))
    assert info.value.reason == "wrong_role"


def test_the_relay_names_a_keystore_of_the_wrong_role_before_its_chain(tmp_path):
    """A user's keystore of another CA: what is wrong first is that it is not a server's (the path
    check that follows would only say "unknown issuer")."""
    private_pki(tmp_path)
    other = CertificateAuthority.init(tmp_path / "other")
    save_keystore(tmp_path / "stranger.p12", other.issue("STRANGER"), None)
    with pytest.raises(ValidationError) as info:
        RelayServer(config(tmp_path, p12=str(tmp_path / "stranger.p12"), ca=str(tmp_path / "ca" / "root.crt")))
    assert (info.value.reason, str(info.value)) == ("wrong_role", "certificate of STRANGER is not a server certificate "
                                                                  "(extended key usage)")


def test_the_relay_will_not_serve_with_a_revoked_certificate(tmp_path):
    ca = private_pki(tmp_path)
    ca.revoke(uid="MSG_SERVER")
    with pytest.raises(ValidationError) as info:
        RelayServer(config(tmp_path))
    assert info.value.reason == "revoked"


def test_the_relay_needs_a_trust_anchor(tmp_path):
    private_pki(tmp_path)
    own = load_keystore(tmp_path / "MSG_SERVER.p12")
    save_keystore(tmp_path / "alone.p12", Keystore(own.key, own.cert, []), None)
    with pytest.raises(PkiError, match=r"alone\.p12 bundles no CA certificate: give --ca ROOT\.pem"):
        RelayServer(config(tmp_path, p12=str(tmp_path / "alone.p12")))


def test_a_crl_file_without_a_crl_is_refused(tmp_path):
    """(RelayServer's own "holds no CRL" check cannot be reached: the file loader refuses first.)"""
    private_pki(tmp_path)
    (tmp_path / "empty.pem").write_bytes(b"")
    with pytest.raises(PkiError, match=r"empty\.pem: no CRL found \(expected PEM or DER\)"):
        RelayServer(config(tmp_path, crl=str(tmp_path / "empty.pem")))


# ============================================================================ whom it enrolls and admits
def test_certificates_that_do_not_validate_are_not_enrolled(tmp_path):
    """--users-dir holds a keystore from another CA (with our CA's names) and a revoked user's: neither
    becomes a user, so nobody can send to them."""
    ca = private_pki(tmp_path, ("ALICE", "GONE"))
    ca.revoke(uid="GONE")
    fake_inter = self_signed_ca(ca.intermediate.subject)
    eve = leaf(fake_inter, "EVE", ou=ca.org_unit)
    eve.chain = [fake_inter.cert]
    save_keystore(tmp_path / "EVE.p12", eve, None)
    server = private_relay(tmp_path)
    alice = load_keystore(tmp_path / "ALICE.p12")

    async def lookups() -> list[str]:
        async with RelayClient(alice, "127.0.0.1", server.port, [ca.root], timeout=10) as c:
            codes = []
            for uid in ("ALICE", "EVE", "GONE"):
                try:
                    codes.append((await c.directory(uid)).uid)
                except RemoteError as exc:
                    codes.append(exc.code)
            return codes

    try:
        assert asyncio.run(lookups()) == ["ALICE", "unknown_user", "unknown_user"]
        enrolled = [e for e in audit(tmp_path) if e["event"] == "users_enrolled"]
        assert enrolled and enrolled[0]["count"] == 1
    finally:
        server.stop()


def _store_of(ca: CertificateAuthority, uid: str | None, **kw) -> Keystore:
    store = leaf(Issuer(ca.intermediate, ca.intermediate_key), uid, **kw)
    store.chain = ca.chain
    return store


@pytest.mark.parametrize(("who", "reason"), [
    ("no UID", "certificate rejected: certificate has no usable UID (PSEUDONYM attribute)"),
    ("the CA's UID", "certificate rejected: UID MSG_CA is reserved and cannot act as a user"),
    ("another unit", "certificate rejected: certificate of OUTSIDER is not from organisational unit "
                     "'SSI MSG RELAY SERVICE'"),
])
def test_a_certificate_of_our_ca_outside_the_profile_gets_no_session(tmp_path, who, reason):
    """TLS accepts these (our CA issued them); the relay's profile check refuses them, says why, and
    they do not become users."""
    ca = private_pki(tmp_path, ("ALICE",))
    store = {"no UID": lambda: _store_of(ca, None, cn="anonymous"),
             "the CA's UID": lambda: _store_of(ca, "MSG_CA"),
             "another unit": lambda: _store_of(ca, "OUTSIDER", ou="ANOTHER UNIT")}[who]()
    server = private_relay(tmp_path, enroll=False)

    async def connect() -> BaseException:
        c = RelayClient(store, "127.0.0.1", server.port, [ca.root], timeout=10)
        try:
            await c.connect()
            await c.crl_list()
        except ClientError as exc:
            return exc
        finally:
            await c.close()
        raise AssertionError("the relay served a certificate outside the profile")

    try:
        exc = asyncio.run(connect())
        assert isinstance(exc, ServerRejected) and str(exc) == f"the relay refused our certificate: {reason}"
        rejected = [e for e in audit(tmp_path) if e["event"] == "connection_rejected"]
        assert rejected and reason.removeprefix("certificate rejected: ") == rejected[0]["reason"]
        assert not any(e["event"] == "connection_accepted" for e in audit(tmp_path))
    finally:
        server.stop()


def test_a_certificate_revoked_during_its_own_handshake_gets_no_session(tmp_path):
    """The client's certificate travels in its second TLS 1.3 flight. The test holds that flight back,
    revokes the user and has the relay reload its CRL, then sends it: OpenSSL checks it against the
    context the handshake began with (the old CRL), so only the relay's re-check refuses it."""
    ca = private_pki(tmp_path)
    late = ca.issue("LATE")
    server = private_relay(tmp_path, enroll=False)
    tls = client_context(late, [ca.root]).wrap_bio(incoming := ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                                                   server_hostname="127.0.0.1")

    async def reload() -> bool:
        assert server.server is not None
        return server.server.reload_crl("test")

    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            while True:  # until our side of the handshake is done: the relay has not seen our certificate
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    sock.sendall(outgoing.read())
                    incoming.write(sock.recv(65536) or b"")
            second_flight = outgoing.read()
            assert second_flight
            ca.revoke(uid="LATE")
            assert server.call(reload())
            tls.write(encode_frame(request_to_wire(QueueRequest(1))))
            sock.sendall(second_flight + outgoing.read())
            answers, decoder = [], FrameDecoder()
            while not answers:
                data = sock.recv(65536)
                if not data:
                    break
                incoming.write(data)
                try:
                    answers += [decode_payload(p) for p in decoder.feed(tls.read(65536))]
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    continue
        assert answers == [{"v": 1, "id": None, "ok": False,
                            "error": {"code": "not_authorised", "message": "certificate rejected: certificate is revoked"}}]
        assert not any(e["event"] == "connection_accepted" for e in audit(tmp_path))
    finally:
        server.stop()


# ============================================================================ requests without an answer
def test_a_crl_piece_the_relay_does_not_hold_is_unknown(tmp_path):
    private_pki(tmp_path, ("ALICE",))
    server = private_relay(tmp_path)
    alice = load_keystore(tmp_path / "ALICE.p12")

    async def pieces() -> list[str]:
        async with RelayClient(alice, "127.0.0.1", server.port, alice.ca_certificates(), timeout=10) as c:
            info = (await c.crl_list())[0]
            out = []
            for digest, offset in ((info.digest, 0), (info.digest, info.size), (hashlib.sha256(b"?").digest(), 0)):
                try:
                    result = await c.request(CrlRequest(c.next_id(), digest, offset))
                    assert isinstance(result, CrlResult) and result.total == info.size
                    out.append("piece")
                except RemoteError as exc:
                    out.append(exc.code)
            return out

    try:
        assert asyncio.run(pieces()) == ["piece", "unknown_message", "unknown_message"]
    finally:
        server.stop()


def test_an_operation_without_a_handler_is_refused():
    """A request type the dispatcher does not know (a new operation without its handler) is answered
    bad_request, not with a result of None."""

    @dataclass(frozen=True)
    class Fly:
        id: int
        op = "fly"

    handlers = Handlers.__new__(Handlers)  # the dispatcher refuses before it uses anything of its own
    with pytest.raises(ProtocolError) as info:
        asyncio.run(handlers.handle(Fly(7), peer=None))  # type: ignore[arg-type]
    assert (info.value.code, info.value.request_id) == (ErrorCode.BAD_REQUEST, 7)
