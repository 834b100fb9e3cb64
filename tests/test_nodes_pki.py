"""Several relay nodes, one certificate each (issue 12): ``msg-pki issue --server`` issues another
active MSG_SERVER certificate for a node with its own CN, and refuses a second one for the same node."""

from __future__ import annotations

import pytest

from pki.ca import CertificateAuthority
from pki.cli import main as pki_main
from pki.errors import PkiError
from pki.identity import MSG_SERVER, cn_of, uid_of
from pki.keystore import load_keystore


def test_each_node_gets_its_own_certificate(tmp_path, capsys):
    CertificateAuthority.init(tmp_path / "ca")
    base = ["issue", "--ca-dir", str(tmp_path / "ca"), "--uid", MSG_SERVER, "--server"]
    assert pki_main([*base, "--cn", "node-a", "--out", str(tmp_path / "a.p12")]) == 0
    assert pki_main([*base, "--cn", "node-b", "--out", str(tmp_path / "b.p12")]) == 0
    capsys.readouterr()
    assert pki_main([*base, "--cn", "node-a", "--out", str(tmp_path / "a2.p12")]) == 2
    assert "relay node 'node-a' already has a valid certificate" in capsys.readouterr().err
    a, b = load_keystore(tmp_path / "a.p12"), load_keystore(tmp_path / "b.p12")
    assert uid_of(a.cert) == uid_of(b.cert) == MSG_SERVER
    assert (cn_of(a.cert), cn_of(b.cert)) == ("node-a", "node-b")
    assert a.cert.serial_number != b.cert.serial_number


def test_users_still_get_one_certificate_at_a_time(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    ca.issue("ANNA", cn="Anna")
    with pytest.raises(PkiError, match="already has a valid certificate"):
        ca.issue("ANNA", cn="Anna Two")
