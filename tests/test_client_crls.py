"""Revocation information the relay cannot suppress (issue 11 §2): what the client's CRL cache keeps,
refuses and requires, and the relay's own certificate checked against it."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from client.crlcache import CrlCache, CrlOlder, CrlRefused, CrlUntrusted
from client.state import ClientState
from pki.ca import CertificateAuthority
from pki.keys import certificate_hash
from pki.keystore import save_keystore
from protocol.crls import CrlAssembler, crl_number, describe, piece, piece_size
from protocol.messages import CrlInfo, CrlResult

from .certfactory import name, self_signed_ca
from .harness import private_client, private_pki, private_relay, run_client

NOW = dt.datetime.now(dt.timezone.utc)


def crl_of(ca: CertificateAuthority, *, number: int, next_update: dt.datetime | None = None,
           key=None, issuer: x509.Name | None = None) -> bytes:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer or ca.intermediate.subject)
               .last_update(NOW - dt.timedelta(minutes=5)).next_update(next_update or NOW + dt.timedelta(days=30))
               .add_extension(x509.CRLNumber(number), critical=False))
    signer = key or ca.intermediate_key
    return builder.sign(signer, certificate_hash(signer)).public_bytes(Encoding.DER)


@pytest.fixture()
def cache(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    return ca, CrlCache(ClientState(tmp_path / "state"), [ca.root], [ca.intermediate])


def test_a_newer_crl_is_kept_and_survives_a_restart(cache, tmp_path):
    ca, crls = cache
    assert crls.offer(crl_of(ca, number=5)) is True
    assert crls.offer(crl_of(ca, number=5)) is False  # the same number: nothing new
    assert crls.offer(crl_of(ca, number=6)) is True
    again = CrlCache(ClientState(tmp_path / "state"), [ca.root], [ca.intermediate])
    assert [crl_number(c) for c in again.crls()] == [6]


def test_an_older_crl_is_never_taken(cache):
    ca, crls = cache
    crls.offer(crl_of(ca, number=9))
    with pytest.raises(CrlOlder):
        crls.offer(crl_of(ca, number=8))
    assert [crl_number(c) for c in crls.crls()] == [9]


def test_an_expired_crl_is_refused(cache):
    ca, crls = cache
    with pytest.raises(CrlRefused, match="expired"):
        crls.offer(crl_of(ca, number=1, next_update=NOW - dt.timedelta(minutes=1)))
    assert crls.crls() == []


def test_a_crl_not_signed_by_our_ca_is_refused(cache):
    """A look-alike CA with our intermediate's exact name signs a CRL: its signature does not verify."""
    ca, crls = cache
    look_alike = self_signed_ca(ca.intermediate.subject)
    with pytest.raises(CrlRefused, match="not signed by a CA we trust"):
        crls.offer(crl_of(ca, number=99, key=look_alike.key))
    stranger = self_signed_ca(name("OTHER_CA", "Other CA"))
    with pytest.raises(CrlUntrusted, match="from a CA we do not know"):
        crls.offer(crl_of(ca, number=99, key=stranger.key, issuer=stranger.cert.subject))
    with pytest.raises(CrlRefused, match="unreadable"):
        crls.offer(b"not a CRL")
    assert crls.crls() == []


class FakeRelay:
    """Only what ``CrlCache.refresh`` asks a relay: its list, and a CRL by description."""

    def __init__(self, ders: list[bytes]) -> None:
        self.described = dict(describe(x509.load_der_x509_crl(d)) for d in ders)
        self.fetched: list[int] = []

    async def crl_list(self) -> list[CrlInfo]:
        return list(self.described)

    async def fetch_crl(self, info: CrlInfo) -> bytes:
        self.fetched.append(info.number)
        return self.described[info]


def test_refresh_fetches_only_what_is_newer(cache):
    ca, crls = cache
    crls.offer(crl_of(ca, number=10))
    root_crl = ca.build_crls()[1]
    relay = FakeRelay([crl_of(ca, number=10), root_crl.public_bytes(Encoding.DER)])
    asyncio.run(crls.refresh(relay))  # type: ignore[arg-type]
    assert relay.fetched == [crl_number(root_crl)]  # the root's, which we did not have
    older = FakeRelay([crl_of(ca, number=3)])
    asyncio.run(crls.refresh(older))  # type: ignore[arg-type]
    assert older.fetched == [] and 10 in [crl_number(c) for c in crls.crls()]


def test_pieces_are_checked_against_the_announcement():
    der = bytes(range(256)) * 100
    info = CrlInfo(b"i" * 32, 1, hashlib.sha256(der).digest(), len(der))
    first = piece(der, info.digest, 0, 9999)
    assert first is not None and len(first.data) == piece_size(9999)
    asm = CrlAssembler(info)
    asm.add(first)
    with pytest.raises(ValueError, match="out of order"):
        asm.add(first)  # the same piece again: a relay looping
    with pytest.raises(ValueError, match="another CRL"):
        asm.add(CrlResult(b"x" * 32, len(first.data), len(der), b"abc"))
    with pytest.raises(ValueError, match="more CRL bytes"):
        asm.add(CrlResult(info.digest, len(first.data), len(der), bytes(len(der))))
    with pytest.raises(ValueError, match="does not match"):
        asm.der()  # incomplete
    offset = len(first.data)
    while offset < len(der):
        p = piece(der, info.digest, offset, 9999)
        assert p is not None
        asm.add(p)
        offset += len(p.data)
    assert asm.der() == der
    bad = CrlAssembler(CrlInfo(b"i" * 32, 1, hashlib.sha256(b"other").digest(), len(der)))
    p0 = piece(der, bad.info.digest, 0, 9999)
    assert p0 is not None
    for off in range(0, len(der), len(p0.data)):
        p = piece(der, bad.info.digest, off, 9999)
        assert p is not None
        bad.add(p)
    with pytest.raises(ValueError, match="does not match its digest"):
        bad.der()


def test_a_client_without_any_crl_refuses_unless_told(tmp_path):
    private_pki(tmp_path, ("ANNA",))
    server = private_relay(tmp_path, crl=False)  # a relay that serves no CRL
    try:
        refused = private_client(server, tmp_path, "ANNA", "askqueue")
        assert refused.code == 1 and "--no-crl" in refused.err and "served none" in refused.err
        ok = run_client(server, tmp_path / "ANNA.p12", "askqueue", state=tmp_path / "st" / "ANNA",
                        extra=["--no-crl"])
        assert ok.code == 0, ok.err
    finally:
        server.stop()


def test_a_revoked_relay_is_refused_with_the_newest_crl_the_client_holds(tmp_path):
    """Relay B's certificate was revoked; B still runs with the CRL from before. A client that learnt
    the newer CRL from relay A refuses B, although B serves its stale CRL and TLS alone accepts it."""
    ca = private_pki(tmp_path, ("ANNA",))
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    shutil.copy(tmp_path / "MSG_SERVER.p12", b_dir / "MSG_SERVER.p12")
    shutil.copytree(tmp_path / "ca", b_dir / "ca")  # B's CRL: from before the revocation
    shutil.copy(tmp_path / "ANNA.p12", b_dir / "ANNA.p12")
    ca.revoke(uid="MSG_SERVER", reason="key_compromise")
    save_keystore(tmp_path / "MSG_SERVER.p12", ca.issue("MSG_SERVER", server=True), None)
    relay_a = private_relay(tmp_path)
    relay_b = private_relay(b_dir)
    try:
        assert private_client(relay_a, tmp_path, "ANNA", "askqueue").code == 0  # caches A's newer CRL
        state = tmp_path / "st" / "ANNA"
        r = run_client(relay_b, tmp_path / "ANNA.p12", "askqueue", state=state)
        assert r.code == 1 and r.err.strip() == \
            "msg-client: the relay's certificate is not valid: certificate is revoked", r.err
    finally:
        relay_a.stop()
        relay_b.stop()
