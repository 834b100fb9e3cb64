"""One certificate policy at both layers (issue 11 §3): RSA of at least 2048 bits, EC P-256 or larger,
Ed25519; no MD5 or SHA-1 signature in a path. The TLS handshake and message validation agree."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID

from client.connection import RelayClient
from pki.ca import CertificateAuthority
from pki.errors import PkiError, ValidationError
from pki.files import certs_to_pem
from pki.keystore import save_keystore
from pki.validation import TrustPolicy
from protocol.frames import encode_frame
from protocol.messages import QueueRequest, request_to_wire
from server.app import RelayServer

from .certfactory import Issuer, leaf
from .harness import private_pki, private_relay, server_config


def weak(ca: CertificateAuthority, kind: str):
    issuer = Issuer(ca.intermediate, ca.intermediate_key)
    if kind == "rsa-1024":
        return leaf(issuer, "WEAK", key=rsa.generate_private_key(public_exponent=65537, key_size=1024))
    if kind == "p-224":
        return leaf(issuer, "WEAK", key=ec.generate_private_key(ec.SECP224R1()))
    if kind == "sha1-signed":
        return leaf(issuer, "WEAK", digest=hashes.SHA1())
    raise AssertionError(kind)


KINDS = [("rsa-1024", "weak_key"), ("p-224", "weak_key"), ("sha1-signed", "weak_signature")]


@pytest.mark.parametrize(("kind", "reason"), KINDS)
def test_message_layer_refuses_weak_certificates(tmp_path, kind, reason):
    ca = CertificateAuthority.init(tmp_path / "ca")
    store = weak(ca, kind)
    policy = TrustPolicy([ca.root], ca.build_crls())
    with pytest.raises(ValidationError) as info:
        policy.validate(store.cert, [ca.intermediate])
    assert info.value.reason == reason
    with pytest.raises(ValidationError) as info:  # at a given time too (a message's server time)
        policy.validate(store.cert, [ca.intermediate], at=dt.datetime.now(dt.timezone.utc))
    assert info.value.reason == reason


def test_a_sha1_signed_intermediate_is_refused_anywhere_in_the_path(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    root = Issuer(ca.root, ca.root_key)
    inter = leaf(root, "MSG_CA_ISSUING", ca=True, eku=[], digest=hashes.SHA1())
    user = leaf(Issuer(inter.cert, inter.key), "USER")
    with pytest.raises(ValidationError) as info:
        TrustPolicy([ca.root]).validate(user.cert, [inter.cert])
    assert info.value.reason == "weak_signature" and "depth 1" in str(info.value)


@pytest.mark.parametrize(("kind", "reason"), KINDS)
def test_tls_layer_refuses_weak_certificates(tmp_path, kind, reason):
    """A client whose TLS library would send a weak certificate (security level 0) is refused."""
    ca = private_pki(tmp_path)
    server = private_relay(tmp_path, enroll=False)
    store = weak(ca, kind)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=certs_to_pem([ca.root]).decode())
    (tmp_path / "weak.pem").write_bytes(certs_to_pem([store.cert, ca.intermediate]) + store.key.private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    ctx.load_cert_chain(tmp_path / "weak.pem")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(encode_frame(request_to_wire(QueueRequest(1))))
                try:
                    answer = tls.recv(65536)
                except (ssl.SSLError, ConnectionError) as exc:
                    answer = str(exc).encode()
        assert b'"ok":true' not in answer
        asyncio.run(server.until(lambda relay: not relay.connections, "the refused connection is closed"))
        log = (tmp_path / "audit.log").read_text()
        assert "connection_accepted" not in log and "connection_rejected" in log
    finally:
        server.stop()


def test_our_own_client_will_not_use_a_weak_certificate(tmp_path):
    ca = private_pki(tmp_path)
    store = weak(ca, "rsa-1024")
    with pytest.raises(PkiError, match="EE_KEY_TOO_SMALL"):
        RelayClient(store, "127.0.0.1", 1, [ca.root])


def test_the_relay_refuses_a_weak_relay_certificate_at_start(tmp_path):
    """The relay checks its own certificate with the same policy, so clients never meet it."""
    ca = private_pki(tmp_path)
    issuer = Issuer(ca.intermediate, ca.intermediate_key)
    relay = leaf(issuer, "MSG_SERVER", key=ec.generate_private_key(ec.SECP224R1()),
                 eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    relay.chain.append(ca.root)
    save_keystore(tmp_path / "weak-server.p12", relay, None)
    with pytest.raises(PkiError, match="secp224r1"):
        RelayServer(server_config(tmp_path, tmp_path, p12=str(tmp_path / "weak-server.p12"), users_dir=None))
