"""msg-pki end to end: issuance, revocation, export/import round trips, inspect, bad input."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from pki.cli import main
from pki.files import load_crl_file
from pki.keystore import load_keystore
from pki.passwords import PasswordSource

from .certfactory import course_pki

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl command line not installed")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def ca_dir(tmp_path: Path, capsys) -> Path:
    d = tmp_path / "ca"
    assert run(capsys, "init", "--ca-dir", str(d))[0] == 0
    return d


def test_init_layout_and_modes(ca_dir: Path) -> None:
    for f in ("root.crt", "intermediate.crt", "crl.pem", "root.key", "intermediate.key"):
        assert (ca_dir / f).is_file()
    assert stat.S_IMODE((ca_dir / "root.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((ca_dir / "intermediate.key").stat().st_mode) == 0o600
    inter = x509.load_pem_x509_certificate((ca_dir / "intermediate.crt").read_bytes())
    bc = inter.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert len(load_crl_file(ca_dir / "crl.pem")) == 2


def test_init_refuses_existing_ca(ca_dir: Path, capsys) -> None:
    code, _, err = run(capsys, "init", "--ca-dir", str(ca_dir))
    assert code == 2 and "already exists" in err


def test_encrypted_ca_keys(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MSG_RELAY_PASSWORD", raising=False)
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    d = tmp_path / "ca"
    assert run(capsys, "init", "--ca-dir", str(d), "--password-file", str(pw))[0] == 0
    assert b"ENCRYPTED" in (d / "root.key").read_bytes()
    code, _, err = run(capsys, "issue", "--ca-dir", str(d), "--uid", "X", "--out", str(tmp_path / "x.p12"))
    assert code == 2 and "password" in err
    out = tmp_path / "y.p12"
    assert run(capsys, "issue", "--ca-dir", str(d), "--uid", "Y", "--ca-password-file", str(pw), "--out", str(out))[0] == 0
    assert load_keystore(out).uid == "Y"  # the CA password unlocked the CA; the keystore itself is unprotected
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    code, _, err = run(capsys, "revoke", "--ca-dir", str(d), "--uid", "X", "--password-file", str(wrong))
    assert code == 2 and "wrong password" in err


def test_issue_profile_client_and_server(ca_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "alice.p12"
    assert run(capsys, "issue", "--ca-dir", str(ca_dir), "--uid", "ALICE", "--cn", "Alice A", "--out", str(out))[0] == 0
    store = load_keystore(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    ext = store.cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).critical
    assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    ext.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert [c.subject for c in store.chain][-1] == store.chain[-1].issuer  # root last
    srv = tmp_path / "srv.p12"
    assert run(capsys, "issue", "--ca-dir", str(ca_dir), "--uid", "MSG_SERVER", "--server", "--dns", "relay.example",
               "--ip", "127.0.0.1", "--out", str(srv))[0] == 0
    san = load_keystore(srv).cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["relay.example"]


def test_issue_refuses_duplicate_until_revoked(ca_dir: Path, tmp_path: Path, capsys) -> None:
    args = ("issue", "--ca-dir", str(ca_dir), "--uid", "BOB", "--out")
    assert run(capsys, *args, str(tmp_path / "b1.p12"))[0] == 0
    code, _, err = run(capsys, *args, str(tmp_path / "b2.p12"))
    assert code == 2 and "already" in err and not (tmp_path / "b2.p12").exists()
    assert run(capsys, "revoke", "--ca-dir", str(ca_dir), "--uid", "BOB", "--reason", "superseded")[0] == 0
    assert run(capsys, *args, str(tmp_path / "b2.p12"))[0] == 0


def test_revoke_by_serial_and_crl(ca_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "c.p12"
    run(capsys, "issue", "--ca-dir", str(ca_dir), "--uid", "CAROL", "--out", str(out))
    serial = load_keystore(out).cert.serial_number
    assert run(capsys, "revoke", "--ca-dir", str(ca_dir), "--serial", format(serial, "X"))[0] == 0
    crl = load_crl_file(ca_dir / "crl.pem")[0]
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    code, out_text, _ = run(capsys, "verify", str(out), "--ca", str(ca_dir / "root.crt"), "--crl", str(ca_dir / "crl.pem"))
    assert code == 1 and "revoked" in out_text
    fresh = tmp_path / "fresh.pem"
    assert run(capsys, "crl", "--ca-dir", str(ca_dir), "--out", str(fresh))[0] == 0
    assert load_crl_file(fresh)[0].get_revoked_certificate_by_serial_number(serial) is not None
    code, _, err = run(capsys, "revoke", "--ca-dir", str(ca_dir), "--serial", "abcdef")
    assert code == 2 and "no unrevoked" in err


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048", "rsa-3072", "rsa-4096"])
def test_every_key_type_issues_and_verifies(tmp_path: Path, capsys, key_type: str) -> None:
    d = tmp_path / "ca"
    assert run(capsys, "init", "--ca-dir", str(d), "--key-type", key_type if key_type != "rsa-4096" else "ecdsa-p256")[0] == 0
    out = tmp_path / "u.p12"
    assert run(capsys, "issue", "--ca-dir", str(d), "--uid", "U1", "--key-type", key_type, "--out", str(out))[0] == 0
    code, text, _ = run(capsys, "verify", str(out), "--ca", str(d / "root.crt"), "--crl", str(d / "crl.pem"))
    assert (code, text.strip()) == (0, "OK U1")


def test_verify_roles_and_anchor(demo_dir: Path, tmp_path: Path, capsys) -> None:
    ca = str(demo_dir / "MSG_CA.crt")
    assert run(capsys, "verify", str(demo_dir / "MSG_SERVER.p12"), "--ca", ca, "--role", "server")[1].strip() == "OK MSG_SERVER"
    code, text, _ = run(capsys, "verify", str(demo_dir / "MSG_SERVER.p12"), "--ca", ca, "--role", "client")
    assert code == 1 and "not a client" in text
    other = tmp_path / "other"
    run(capsys, "init", "--ca-dir", str(other))
    code, text, _ = run(capsys, "verify", str(demo_dir / "MSG_CLI1.p12"), "--ca", str(other / "root.crt"))
    assert code == 1 and "unknown issuer" in text


def test_export_import_round_trip(demo_dir: Path, tmp_path: Path, capsys) -> None:
    ex = tmp_path / "ex"
    assert run(capsys, "export", str(demo_dir / "MSG_CLI2.p12"), "--out", str(ex))[0] == 0
    assert stat.S_IMODE((ex / "key.pem").stat().st_mode) == 0o600
    pw = tmp_path / "pw"
    pw.write_text("s3cret")
    out = tmp_path / "back.p12"
    assert run(capsys, "import", "--cert", str(ex / "cert.pem"), "--key", str(ex / "key.pem"), "--chain",
               str(ex / "chain.pem"), "--out", str(out), "--password-file", str(pw))[0] == 0
    original = load_keystore(demo_dir / "MSG_CLI2.p12")
    back = load_keystore(out, PasswordSource(file=str(pw)))
    assert back.cert == original.cert and back.chain == original.chain
    assert run(capsys, "import", "--cert", str(ex / "cert.pem"), "--key", str(ex / "key.pem"),
               "--out", str(tmp_path / "nochain.p12"))[0] == 0
    assert load_keystore(tmp_path / "nochain.p12").chain == []


def test_import_refuses_mismatched_key(demo_dir: Path, tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run(capsys, "export", str(demo_dir / "MSG_CLI1.p12"), "--out", str(a))
    run(capsys, "export", str(demo_dir / "MSG_CLI2.p12"), "--out", str(b))
    code, _, err = run(capsys, "import", "--cert", str(a / "cert.pem"), "--key", str(b / "key.pem"),
                       "--out", str(tmp_path / "x.p12"))
    assert code == 2 and "does not belong" in err and not (tmp_path / "x.p12").exists()


def test_course_keystores_round_trip(tmp_path: Path, capsys) -> None:
    paths = course_pki(tmp_path)
    ex = tmp_path / "ex"
    assert run(capsys, "export", str(paths["ALICE"]), "--out", str(ex))[0] == 0
    out = tmp_path / "alice2.p12"
    assert run(capsys, "import", "--cert", str(ex / "cert.pem"), "--key", str(ex / "key.pem"), "--chain",
               str(ex / "chain.pem"), "--out", str(out))[0] == 0
    code, text, _ = run(capsys, "verify", str(out), "--ca", str(paths["ca"]))
    assert (code, text.strip()) == (0, "OK ALICE")


@needs_openssl
def test_openssl_accepts_what_we_make(demo_dir: Path, tmp_path: Path, capsys) -> None:
    for uid in ("MSG_SERVER", "MSG_CLI1", "MSG_CLI2", "MSG_CLI3"):
        ex = tmp_path / uid
        run(capsys, "export", str(demo_dir / f"{uid}.p12"), "--out", str(ex))
        res = subprocess.run([OPENSSL, "verify", "-CAfile", str(demo_dir / "MSG_CA.crt"), "-untrusted",
                              str(ex / "chain.pem"), "-crl_check_all", "-CRLfile", str(demo_dir / "ca" / "crl.pem"),
                              str(ex / "cert.pem")], capture_output=True, text=True)
        assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr
        res = subprocess.run([OPENSSL, "pkcs12", "-in", str(demo_dir / f"{uid}.p12"), "-passin", "pass:",
                              "-nodes", "-noout"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    pw = tmp_path / "pw"
    pw.write_text("pw123")
    protected = tmp_path / "protected.p12"
    from pki.keystore import save_keystore

    save_keystore(protected, load_keystore(demo_dir / "MSG_CLI1.p12"), b"pw123")
    res = subprocess.run([OPENSSL, "pkcs12", "-in", str(protected), "-passin", f"file:{pw}", "-info", "-noout"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "AES-256-CBC" in res.stderr and "sha256" in res.stderr.lower()


@needs_openssl
def test_keystore_made_by_openssl_loads(tmp_path: Path, demo_ca, capsys) -> None:
    """An `openssl pkcs12 -export` keystore (its own algorithms, a password) imports and validates."""
    store = demo_ca.issue("OSSL_USER")
    ex = tmp_path / "ex"
    ex.mkdir()
    from pki.files import certs_to_pem

    (ex / "key.pem").write_bytes(store.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (ex / "cert.pem").write_bytes(certs_to_pem([store.cert]))
    (ex / "chain.pem").write_bytes(certs_to_pem(store.chain))
    p12 = tmp_path / "ossl.p12"
    res = subprocess.run([OPENSSL, "pkcs12", "-export", "-inkey", str(ex / "key.pem"), "-in", str(ex / "cert.pem"),
                          "-certfile", str(ex / "chain.pem"), "-passout", "pass:hunter2", "-out", str(p12)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    code, text, _ = run(capsys, "verify", str(p12), "--ca", str(demo_ca.directory / "root.crt"), "--password-file", str(pw))
    assert (code, text.strip()) == (0, "OK OSSL_USER")
    code, _, _ = run(capsys, "export", str(p12), "--out", str(tmp_path / "out"), "--password-file", str(pw))
    assert code == 0 and (tmp_path / "out" / "key.pem").read_bytes() == (ex / "key.pem").read_bytes()


def test_inspect_text_and_json(demo_dir: Path, capsys) -> None:
    code, text, _ = run(capsys, "inspect", str(demo_dir / "MSG_CLI1.p12"))
    assert code == 0
    for label in ("UID:", "CN:", "OU:", "Serial:", "Status:", "Public key:", "SHA-256:", "Chain certificate 2:"):
        assert label in text
    assert "MSG_CLI1" in text and "valid (" in text
    code, text, _ = run(capsys, "inspect", "--json", str(demo_dir / "MSG_CLI1.p12"))
    info = json.loads(text)
    assert info["type"] == "pkcs12" and len(info["certificates"]) == 3
    assert info["certificates"][0]["uid"] == "MSG_CLI1"
    assert info["certificates"][0]["extensions"]["extendedKeyUsage"] == ["clientAuth"]


def test_inspect_sniffs_format_not_extension(demo_dir: Path, tmp_path: Path, capsys) -> None:
    disguised = tmp_path / "really_a_crl.crt"
    disguised.write_bytes((demo_dir / "ca" / "crl.pem").read_bytes())
    info = json.loads(run(capsys, "inspect", "--json", str(disguised))[1])
    assert info["type"] == "crl" and len(info["crls"]) == 2
    der = tmp_path / "root.pem"
    der.write_bytes(x509.load_pem_x509_certificate((demo_dir / "MSG_CA.crt").read_bytes()).public_bytes(
        serialization.Encoding.DER))
    info = json.loads(run(capsys, "inspect", "--json", str(der))[1])
    assert info["type"] == "certificate" and info["certificates"][0]["uid"] == "MSG_CA"


def test_inspect_shows_expired_status(tmp_path: Path, demo_ca, capsys) -> None:
    from pki.files import certs_to_pem

    from .certfactory import DAY, NOW, Issuer, leaf

    old = leaf(Issuer(demo_ca.intermediate, demo_ca.intermediate_key), "OLD", not_before=NOW - 40 * DAY,
               not_after=NOW - 10 * DAY - 60 * dt.timedelta(seconds=1))
    f = tmp_path / "old.pem"
    f.write_bytes(certs_to_pem([old.cert]))
    text = run(capsys, "inspect", str(f))[1]
    assert "expired 10 days ago" in text


def test_inspect_crl_entries(demo_ca, capsys) -> None:
    text = run(capsys, "inspect", str(demo_ca.directory / "crl.pem"))[1]
    assert "Certificate revocation list:" in text and "Entries:" in text


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x30\x82\x01\x00" + b"\x00" * 50, None])
def test_bad_keystores_give_one_line(tmp_path: Path, demo_dir: Path, capsys, content) -> None:
    bad = tmp_path / "bad.p12"
    bad.write_bytes(content if content is not None else (demo_dir / "MSG_CLI1.p12").read_bytes()[:300])
    for argv in (("export", str(bad), "--out", str(tmp_path / "o")), ("verify", str(bad), "--ca", str(bad)),
                 ("inspect", str(bad))):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "password" not in err  # a broken file is not mistaken for a protected one


def test_wrong_password(tmp_path: Path, demo_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MSG_RELAY_PASSWORD", raising=False)
    from pki.keystore import save_keystore

    p = tmp_path / "p.p12"
    save_keystore(p, load_keystore(demo_dir / "MSG_CLI1.p12"), b"right")
    wrong = tmp_path / "w"
    wrong.write_text("wrong")
    code, _, err = run(capsys, "export", str(p), "--out", str(tmp_path / "o"), "--password-file", str(wrong))
    assert code == 2 and "wrong password" in err
    code, _, err = run(capsys, "export", str(p), "--out", str(tmp_path / "o"))
    assert code == 2 and "password-protected" in err
    monkeypatch.setenv("MSG_RELAY_PASSWORD", "right")
    assert run(capsys, "export", str(p), "--out", str(tmp_path / "o"))[0] == 0


def test_keystore_without_key(tmp_path: Path, demo_dir: Path, capsys) -> None:
    from cryptography.hazmat.primitives.serialization import NoEncryption, pkcs12

    store = load_keystore(demo_dir / "MSG_CLI1.p12")
    p = tmp_path / "nokey.p12"
    p.write_bytes(pkcs12.serialize_key_and_certificates(b"x", None, store.cert, None, NoEncryption()))
    code, _, err = run(capsys, "export", str(p), "--out", str(tmp_path / "o"))
    assert code == 2 and "no private key" in err


def test_missing_ca_dir_unknown_key_type_unwritable_output(tmp_path: Path, ca_dir: Path, capsys) -> None:
    code, _, err = run(capsys, "issue", "--ca-dir", str(tmp_path / "nope"), "--uid", "A", "--out", str(tmp_path / "a.p12"))
    assert code == 2 and "not a CA directory" in err
    with pytest.raises(SystemExit) as info:
        main(["issue", "--ca-dir", str(ca_dir), "--uid", "A", "--key-type", "dsa-1024", "--out", "x.p12"])
    assert info.value.code == 2
    code, _, err = run(capsys, "issue", "--ca-dir", str(ca_dir), "--uid", "A", "--out", str(tmp_path / "no" / "dir" / "a.p12"))
    assert code == 2 and "no such directory" in err
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, _, err = run(capsys, "issue", "--ca-dir", str(ca_dir), "--uid", "B", "--out", str(ro / "b.p12"))
        assert code == 2
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_demo_refuses_existing_dir_without_force(tmp_path: Path, capsys) -> None:
    out = tmp_path / "certs"
    assert run(capsys, "demo", "--out", str(out))[0] == 0
    for f in ("MSG_CA.crt", "MSG_SERVER.p12", "MSG_CLI1.p12", "MSG_CLI2.p12", "MSG_CLI3.p12", "ca/crl.pem"):
        assert (out / f).is_file()
    before = (out / "MSG_CA.crt").read_bytes()
    code, _, err = run(capsys, "demo", "--out", str(out))
    assert code == 2 and "--force" in err and (out / "MSG_CA.crt").read_bytes() == before
    assert run(capsys, "demo", "--out", str(out), "--force")[0] == 0
    assert (out / "MSG_CA.crt").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certs"]


def test_inspect_script_is_the_same_code(demo_dir: Path) -> None:
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "inspect_cert.py"
    res = subprocess.run([sys.executable, str(script), "--json", str(demo_dir / "MSG_CA.crt")],
                         capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)["certificates"][0]["uid"] == "MSG_CA"
