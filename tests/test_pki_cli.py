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
    monkeypatch.delenv("MSG_RELAY_CA_PASSWORD", raising=False)
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    d = tmp_path / "ca"
    assert run(capsys, "init", "--ca-dir", str(d), "--ca-password-file", str(pw))[0] == 0
    assert b"ENCRYPTED" in (d / "root.key").read_bytes()
    code, _, err = run(capsys, "issue", "--ca-dir", str(d), "--uid", "X", "--out", str(tmp_path / "x.p12"))
    assert code == 2 and "password" in err
    out = tmp_path / "y.p12"
    assert run(capsys, "issue", "--ca-dir", str(d), "--uid", "Y", "--ca-password-file", str(pw), "--out", str(out))[0] == 0
    assert load_keystore(out).uid == "Y"  # the CA password unlocked the CA; the keystore itself is unprotected
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    code, _, err = run(capsys, "revoke", "--ca-dir", str(d), "--uid", "X", "--ca-password-file", str(wrong))
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
    code, _, _ = run(capsys, "export", str(p12), "--out", str(tmp_path / "out"), "--password-file", str(pw),
                     "--no-encrypt")
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
    assert info["certificates"][0]["extensions"]["extended_key_usage"] == {"critical": False, "value": ["clientAuth"]}


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


# ----- issue 10 §4: msg-pki protects its user ---------------------------------------------------------------

def one_line_error(code: int, err: str) -> bool:
    return code == 2 and err.count("\n") == 1 and err.startswith("msg-pki: error:") and "Traceback" not in err


def index_uids(ca: Path) -> list[str]:
    return [e["uid"] for e in json.loads((ca / "index.json").read_text())["issued"]]


def test_issue_refuses_to_replace_a_keystore_without_force(ca_dir: Path, tmp_path: Path, capsys) -> None:
    """A protected bob.p12 was replaced by the next issue to the same path: now refused, CA untouched."""
    pw = tmp_path / "bob.pw"
    pw.write_text("bob's secret")
    bob = tmp_path / "bob.p12"
    assert run(capsys, "issue", "--ca-dir", str(ca_dir), "--uid", "BOB", "--password-file", str(pw), "--out", str(bob))[0] == 0
    before = bob.read_bytes()
    code, _, err = run(capsys, "issue", "--ca-dir", str(ca_dir), "--uid", "CAROL", "--out", str(bob))
    assert one_line_error(code, err) and "--force" in err and str(bob) in err
    assert bob.read_bytes() == before and index_uids(ca_dir) == ["BOB"]
    assert run(capsys, "issue", "--ca-dir", str(ca_dir), "--uid", "CAROL", "--out", str(bob), "--force")[0] == 0
    assert load_keystore(bob).uid == "CAROL"


def test_import_refuses_to_replace_a_keystore_without_force(demo_dir: Path, tmp_path: Path, capsys) -> None:
    ex = tmp_path / "ex"
    assert run(capsys, "export", str(demo_dir / "MSG_CLI1.p12"), "--out", str(ex))[0] == 0
    out = tmp_path / "existing.p12"
    out.write_bytes(b"the only copy of someone's key")
    argv = ("import", "--cert", str(ex / "cert.pem"), "--key", str(ex / "key.pem"), "--out", str(out))
    code, _, err = run(capsys, *argv)
    assert one_line_error(code, err) and "--force" in err
    assert out.read_bytes() == b"the only copy of someone's key"
    assert run(capsys, *argv, "--force")[0] == 0 and load_keystore(out).uid == "MSG_CLI1"


def test_export_refuses_to_replace_files_without_force(demo_dir: Path, tmp_path: Path, capsys) -> None:
    ex = tmp_path / "ex"
    ex.mkdir()
    (ex / "key.pem").write_bytes(b"another key")
    code, _, err = run(capsys, "export", str(demo_dir / "MSG_CLI1.p12"), "--out", str(ex))
    assert one_line_error(code, err) and "--force" in err and "key.pem" in err
    assert sorted(p.name for p in ex.iterdir()) == ["key.pem"] and (ex / "key.pem").read_bytes() == b"another key"
    assert run(capsys, "export", str(demo_dir / "MSG_CLI1.p12"), "--out", str(ex), "--force")[0] == 0
    assert b"PRIVATE KEY" in (ex / "key.pem").read_bytes()


@pytest.fixture()
def locked_ca(tmp_path: Path, capsys, monkeypatch) -> tuple[Path, Path]:
    """A CA whose keys are encrypted with the password in the returned file; no password in the environment."""
    monkeypatch.delenv("MSG_RELAY_PASSWORD", raising=False)
    monkeypatch.delenv("MSG_RELAY_CA_PASSWORD", raising=False)
    capw = tmp_path / "ca.pw"
    capw.write_text("the CA's password\n")
    d = tmp_path / "lockedca"
    assert run(capsys, "init", "--ca-dir", str(d), "--ca-password-file", str(capw))[0] == 0
    assert b"ENCRYPTED" in (d / "root.key").read_bytes() and b"ENCRYPTED" in (d / "intermediate.key").read_bytes()
    return d, capw


def test_issue_password_file_is_the_keystores_never_the_cas(locked_ca, tmp_path: Path, capsys, monkeypatch) -> None:
    """The bug: `issue --password-file` unlocked the CA, so the user keystore got the CA's password."""
    d, capw = locked_ca
    kspw = tmp_path / "user.pw"
    kspw.write_text("the user's password")
    out = tmp_path / "u.p12"
    # The CA's password given as --password-file (what the old hint said): refused, hint names the CA flag.
    code, _, err = run(capsys, "issue", "--ca-dir", str(d), "--uid", "U", "--password-file", str(capw), "--out", str(out))
    assert one_line_error(code, err) and "--ca-password-file" in err and "use --password-file" not in err
    assert not out.exists() and index_uids(d) == []
    # The keystore's password in the environment does not unlock the CA either.
    monkeypatch.setenv("MSG_RELAY_PASSWORD", "the CA's password")
    code, _, err = run(capsys, "issue", "--ca-dir", str(d), "--uid", "U", "--out", str(out))
    assert one_line_error(code, err) and "MSG_RELAY_CA_PASSWORD" in err
    monkeypatch.delenv("MSG_RELAY_PASSWORD")
    assert run(capsys, "issue", "--ca-dir", str(d), "--uid", "U", "--ca-password-file", str(capw),
               "--password-file", str(kspw), "--out", str(out))[0] == 0
    assert load_keystore(out, PasswordSource(file=str(kspw))).uid == "U"
    from pki.errors import KeystoreError

    with pytest.raises(KeystoreError):
        load_keystore(out, PasswordSource(file=str(capw)))
    monkeypatch.setenv("MSG_RELAY_CA_PASSWORD", "the CA's password")  # the CA's own variable does
    assert run(capsys, "issue", "--ca-dir", str(d), "--uid", "V", "--out", str(tmp_path / "v.p12"))[0] == 0


def test_every_ca_command_takes_ca_password_file(locked_ca, tmp_path: Path, capsys) -> None:
    d, capw = locked_ca
    ca = ("--ca-dir", str(d), "--ca-password-file", str(capw))
    assert run(capsys, "issue", *ca, "--uid", "W", "--out", str(tmp_path / "w.p12"))[0] == 0
    assert run(capsys, "revoke", *ca, "--uid", "W")[0] == 0
    assert run(capsys, "crl", *ca)[0] == 0
    for argv in (("revoke", "--ca-dir", str(d), "--uid", "W"), ("crl", "--ca-dir", str(d))):
        code, _, err = run(capsys, *argv)
        assert one_line_error(code, err) and "--ca-password-file" in err and "use --password-file" not in err


def test_password_file_is_a_deprecated_alias_where_it_meant_the_ca(tmp_path: Path, capsys, monkeypatch) -> None:
    """init, revoke and crl took --password-file for the CA key: still accepted, with a warning."""
    monkeypatch.delenv("MSG_RELAY_CA_PASSWORD", raising=False)
    capw = tmp_path / "ca.pw"
    capw.write_text("pw")
    d = tmp_path / "ca"
    code, _, err = run(capsys, "init", "--ca-dir", str(d), "--password-file", str(capw))
    assert code == 0 and "deprecated" in err and "--ca-password-file" in err and err.count("\n") == 1
    assert b"ENCRYPTED" in (d / "root.key").read_bytes()
    run(capsys, "issue", "--ca-dir", str(d), "--ca-password-file", str(capw), "--uid", "A", "--out", str(tmp_path / "a.p12"))
    code, _, err = run(capsys, "revoke", "--ca-dir", str(d), "--uid", "A", "--password-file", str(capw))
    assert code == 0 and "deprecated" in err
    code, _, err = run(capsys, "crl", "--ca-dir", str(d), "--password-file", str(capw))
    assert code == 0 and "deprecated" in err
    code, _, err = run(capsys, "crl", "--ca-dir", str(d), "--password-file", str(capw), "--ca-password-file", str(capw))
    assert one_line_error(code, err) and "once" in err


class _Terminal:
    def isatty(self) -> bool:
        return True


def test_init_on_a_terminal_asks_twice(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MSG_RELAY_CA_PASSWORD", raising=False)
    monkeypatch.setattr("sys.stdin", _Terminal())
    answers = iter(["typed once", "typed twice"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    code, _, err = run(capsys, "init", "--ca-dir", str(tmp_path / "a"))
    assert one_line_error(code, err) and "differ" in err and not (tmp_path / "a" / "root.crt").exists()
    answers = iter(["s3cret", "s3cret"])
    assert run(capsys, "init", "--ca-dir", str(tmp_path / "b"))[0] == 0
    key = (tmp_path / "b" / "intermediate.key").read_bytes()
    assert serialization.load_pem_private_key(key, b"s3cret") is not None
    answers = iter([""])  # an empty answer is a choice, and it is said out loud
    code, _, err = run(capsys, "init", "--ca-dir", str(tmp_path / "c"))
    assert code == 0 and "NOT encrypted" in err and b"ENCRYPTED" not in (tmp_path / "c" / "root.key").read_bytes()


def test_end_of_input_at_a_password_prompt_is_one_line(demo_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Ctrl-D at a prompt: no CA, no export, no traceback."""
    monkeypatch.delenv("MSG_RELAY_PASSWORD", raising=False)
    monkeypatch.delenv("MSG_RELAY_CA_PASSWORD", raising=False)
    monkeypatch.setattr("sys.stdin", _Terminal())

    def eof(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr("getpass.getpass", eof)
    code, _, err = run(capsys, "init", "--ca-dir", str(tmp_path / "ca"))
    assert one_line_error(code, err) and "no password" in err and not (tmp_path / "ca" / "root.crt").exists()
    from pki.keystore import save_keystore

    protected = tmp_path / "p.p12"
    save_keystore(protected, load_keystore(demo_dir / "MSG_CLI1.p12"), b"pw")
    code, _, err = run(capsys, "export", str(protected), "--out", str(tmp_path / "ex"))
    assert one_line_error(code, err) and "no password" in err and not (tmp_path / "ex" / "key.pem").exists()


def test_init_without_password_or_terminal_warns(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MSG_RELAY_CA_PASSWORD", raising=False)
    monkeypatch.setattr("getpass.getpass", lambda prompt="": pytest.fail("prompted without a terminal"))
    code, _, err = run(capsys, "init", "--ca-dir", str(tmp_path / "ca"))
    assert code == 0 and err.count("\n") == 1 and "warning" in err and "NOT encrypted" in err
    assert b"ENCRYPTED" not in (tmp_path / "ca" / "root.key").read_bytes()


def test_failed_keystore_write_records_nothing(ca_dir: Path, tmp_path: Path, capsys) -> None:
    """The keystore is written before the certificate is recorded: a failed write leaves the UID free."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, _, err = run(capsys, "issue", "--ca-dir", str(ca_dir), "--uid", "DAN", "--out", str(blocker / "dan.p12"))
    assert one_line_error(code, err)
    assert index_uids(ca_dir) == []
    assert run(capsys, "issue", "--ca-dir", str(ca_dir), "--uid", "DAN", "--out", str(tmp_path / "dan.p12"))[0] == 0
    assert index_uids(ca_dir) == ["DAN"]


def test_failed_recording_discards_the_keystore(ca_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """The other half: a keystore whose certificate could not be recorded is not left behind."""
    from pki.ca import CertificateAuthority
    from pki.errors import PkiError

    def fail(self) -> None:
        raise PkiError(f"{self.directory / 'index.json'}: cannot write (No space left on device)")

    monkeypatch.setattr(CertificateAuthority, "_save_index", fail)
    out = tmp_path / "eve.p12"
    code, _, err = run(capsys, "issue", "--ca-dir", str(ca_dir), "--uid", "EVE", "--out", str(out))
    assert one_line_error(code, err) and "not recorded" in err and not out.exists()
    assert index_uids(ca_dir) == []


def test_export_keeps_the_key_encrypted(demo_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MSG_RELAY_PASSWORD", raising=False)
    from pki.keystore import save_keystore

    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    protected = tmp_path / "p.p12"
    original = load_keystore(demo_dir / "MSG_CLI3.p12")
    save_keystore(protected, original, b"hunter2")
    ex = tmp_path / "ex"
    code, out, _ = run(capsys, "export", str(protected), "--out", str(ex), "--password-file", str(pw))
    assert code == 0 and "encrypted with the keystore's password" in out
    key_pem = (ex / "key.pem").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in key_pem
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key_pem, None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    assert serialization.load_pem_private_key(key_pem, b"hunter2").public_key().public_bytes(
        serialization.Encoding.DER, pub) == original.cert.public_key().public_bytes(serialization.Encoding.DER, pub)
    # import needs the key's password, and says which flag gives it
    back = tmp_path / "back.p12"
    code, _, err = run(capsys, "import", "--cert", str(ex / "cert.pem"), "--key", str(ex / "key.pem"), "--out", str(back))
    assert one_line_error(code, err) and "--key-password-file" in err and not back.exists()
    assert run(capsys, "import", "--cert", str(ex / "cert.pem"), "--key", str(ex / "key.pem"), "--key-password-file",
               str(pw), "--password-file", str(pw), "--out", str(back))[0] == 0
    assert load_keystore(back, PasswordSource(file=str(pw))).cert == original.cert
    # --no-encrypt is the explicit way out
    code, out, _ = run(capsys, "export", str(protected), "--out", str(ex), "--password-file", str(pw),
                       "--no-encrypt", "--force")
    assert code == 0 and "NOT encrypted" in out and b"ENCRYPTED" not in (ex / "key.pem").read_bytes()


def test_verify_chain_and_intermediate_missing(demo_dir: Path, tmp_path: Path, capsys) -> None:
    ex = tmp_path / "ex"
    run(capsys, "export", str(demo_dir / "MSG_CLI1.p12"), "--out", str(ex))
    root = str(demo_dir / "MSG_CA.crt")
    code, text, _ = run(capsys, "verify", str(ex / "cert.pem"), "--ca", root)
    assert code == 1 and "intermediate missing" in text and "--chain" in text and "unknown issuer" not in text
    assert "pseudonym=" in text  # the issuer is named the way inspect names it
    code, text, _ = run(capsys, "verify", str(ex / "cert.pem"), "--ca", root, "--chain", str(ex / "chain.pem"),
                        "--crl", str(demo_dir / "ca" / "crl.pem"))
    assert (code, text.strip()) == (0, "OK MSG_CLI1")
    # An issuer that is present but not trusted is still an unknown issuer, not a missing intermediate.
    other = tmp_path / "other"
    run(capsys, "init", "--ca-dir", str(other))
    code, text, _ = run(capsys, "verify", str(ex / "cert.pem"), "--ca", str(other / "root.crt"), "--chain",
                        str(ex / "chain.pem"))
    assert code == 1 and "unknown issuer" in text


def test_verify_guesses_the_role_from_the_certificate(demo_dir: Path, demo_ca, tmp_path: Path, capsys) -> None:
    ca = str(demo_dir / "MSG_CA.crt")
    code, text, err = run(capsys, "verify", str(demo_dir / "MSG_SERVER.p12"), "--ca", ca)
    assert (code, text.strip()) == (0, "OK MSG_SERVER") and "server" in err
    assert run(capsys, "verify", str(demo_dir / "MSG_CLI2.p12"), "--ca", ca)[1].strip() == "OK MSG_CLI2"
    from pki.cli import guess_role

    from .certfactory import Issuer, leaf

    issuer = Issuer(demo_ca.intermediate, demo_ca.intermediate_key)
    assert guess_role(leaf(issuer, "WEB", eku=[ExtendedKeyUsageOID.SERVER_AUTH]).cert) == "server"
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert guess_role(leaf(issuer, "ALICE", eku=both).cert) == "client"
    assert guess_role(leaf(issuer, "MSG_SERVER", eku=[]).cert) == "server"


def crl_lifetime(path: Path) -> float:
    crl = load_crl_file(path)[0]
    assert crl.next_update_utc is not None
    return (crl.next_update_utc - dt.datetime.now(dt.timezone.utc)).total_seconds() / 86400


def test_crl_days_is_an_option_and_is_remembered(tmp_path: Path, capsys) -> None:
    d = tmp_path / "ca"
    assert run(capsys, "init", "--ca-dir", str(d), "--crl-days", "7")[0] == 0
    assert 6.9 < crl_lifetime(d / "crl.pem") <= 7
    run(capsys, "issue", "--ca-dir", str(d), "--uid", "A", "--out", str(tmp_path / "a.p12"))
    assert run(capsys, "revoke", "--ca-dir", str(d), "--uid", "A")[0] == 0
    assert 6.9 < crl_lifetime(d / "crl.pem") <= 7  # a later revoke keeps the lifetime init chose
    code, out, _ = run(capsys, "crl", "--ca-dir", str(d), "--crl-days", "3")
    assert code == 0 and "3 days" in out and 2.9 < crl_lifetime(d / "crl.pem") <= 3
    run(capsys, "issue", "--ca-dir", str(d), "--uid", "B", "--out", str(tmp_path / "b.p12"))
    assert run(capsys, "revoke", "--ca-dir", str(d), "--uid", "B")[0] == 0
    assert 2.9 < crl_lifetime(d / "crl.pem") <= 3
    run(capsys, "issue", "--ca-dir", str(d), "--uid", "C", "--out", str(tmp_path / "c.p12"))
    assert run(capsys, "revoke", "--ca-dir", str(d), "--uid", "C", "--crl-days", "14")[0] == 0
    assert 13.9 < crl_lifetime(d / "crl.pem") <= 14
    assert run(capsys, "crl", "--ca-dir", str(d))[0] == 0 and 13.9 < crl_lifetime(d / "crl.pem") <= 14
    assert run(capsys, "crl", "--ca-dir", str(d), "--days", "2")[0] == 0  # the option's old name
    assert 1.9 < crl_lifetime(d / "crl.pem") <= 2
    for argv in (("init", "--ca-dir", str(tmp_path / "zero"), "--crl-days", "0"),
                 ("crl", "--ca-dir", str(d), "--crl-days", "-1"),
                 ("revoke", "--ca-dir", str(d), "--uid", "A", "--crl-days", "0")):
        code, _, err = run(capsys, *argv)
        assert one_line_error(code, err) and "--crl-days" in err
    assert not (tmp_path / "zero").exists()


def test_crl_days_defaults_to_30_for_a_ca_made_before_it_was_kept(ca_dir: Path, capsys) -> None:
    assert 29.9 < crl_lifetime(ca_dir / "crl.pem") <= 30
    doc = json.loads((ca_dir / "index.json").read_text())
    del doc["crl_days"]
    (ca_dir / "index.json").write_text(json.dumps(doc))
    assert run(capsys, "crl", "--ca-dir", str(ca_dir))[0] == 0
    assert 29.9 < crl_lifetime(ca_dir / "crl.pem") <= 30
    doc["crl_days"] = 0  # a hand-edited lifetime that would lock every client out is refused
    (ca_dir / "index.json").write_text(json.dumps(doc))
    code, _, err = run(capsys, "crl", "--ca-dir", str(ca_dir))
    assert one_line_error(code, err) and "corrupt CA index" in err


# ----- the README's worked example runs as printed -------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def worked_example() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of the ```console block under "### Worked example"."""
    text = README.read_text()
    block = text.split("### Worked example", 1)[1].split("```console\n", 1)[1].split("\n```", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def matches(expected: list[str], actual: str) -> bool:
    """``...`` stands for any text within a line, and a line of only ``...`` for any number of lines."""
    import re

    pattern = ""
    for line in expected:
        if line.strip() == "...":
            pattern += r"(?:.*\n)*?"
        else:
            pattern += ".*".join(re.escape(part) for part in line.split("...")) + r"\n"
    return re.fullmatch(pattern, actual) is not None


def test_readme_worked_example_runs_as_printed(tmp_path: Path, capsys, monkeypatch) -> None:
    import shlex

    monkeypatch.delenv("MSG_RELAY_PASSWORD", raising=False)
    monkeypatch.delenv("MSG_RELAY_CA_PASSWORD", raising=False)
    monkeypatch.chdir(tmp_path)
    steps = worked_example()
    assert any(cmd.startswith("openssl verify") for cmd, _ in steps)
    for cmd, expected in steps:
        words = shlex.split(cmd, comments=True)
        if words[0] == "msg-pki":
            code, out, _ = run(capsys, *words[1:])
            assert code == (1 if out.startswith("REJECTED") else 0), cmd
        else:
            if words[0] == "openssl" and OPENSSL is None:
                continue
            res = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=tmp_path)
            assert res.returncode == 0, (cmd, res.stderr)
            out = res.stdout
        assert matches(expected, out), f"$ {cmd}\nREADME says:\n" + "\n".join(expected) + f"\nactual:\n{out}"
