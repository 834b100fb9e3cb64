"""msg-pki inspect: revocation status from a CRL, names, the stable JSON form, PEM private keys."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pki.cli import main
from pki.files import certs_to_pem

from .certfactory import DAY, NOW, self_signed_ca


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def revoked(tmp_path: Path, capsys) -> dict[str, Path]:
    """A CA with one user revoked for key compromise and one still valid."""
    d = tmp_path / "ca"
    run(capsys, "init", "--ca-dir", str(d))
    paths = {"ca": d, "gone": tmp_path / "gone.p12", "kept": tmp_path / "kept.p12"}
    run(capsys, "issue", "--ca-dir", str(d), "--uid", "GONE", "--out", str(paths["gone"]))
    run(capsys, "issue", "--ca-dir", str(d), "--uid", "KEPT", "--out", str(paths["kept"]))
    assert run(capsys, "revoke", "--ca-dir", str(d), "--uid", "GONE", "--reason", "key_compromise")[0] == 0
    return paths


def test_crl_turns_the_status_into_revoked(revoked: dict[str, Path], capsys) -> None:
    crl = str(revoked["ca"] / "crl.pem")
    code, text, _ = run(capsys, "inspect", str(revoked["gone"]), "--crl", crl)
    status = next(line for line in text.splitlines() if line.strip().startswith("Status:"))
    assert code == 0 and re.fullmatch(r"\s+Status:\s+revoked \(\d{4}-\d\d-\d\dT[^,]+, key_compromise\)", status), status
    info = json.loads(run(capsys, "inspect", "--json", str(revoked["gone"]), "--crl", crl)[1])
    leaf_status = info["certificates"][0]["status"]
    assert leaf_status["state"] == "revoked" and leaf_status["reason"] == "key_compromise"
    assert info["certificates"][1]["status"]["state"] == "valid"  # the intermediate is not revoked
    info = json.loads(run(capsys, "inspect", "--json", str(revoked["kept"]), "--crl", crl)[1])
    assert info["certificates"][0]["status"]["state"] == "valid"
    # without --crl nothing is known about revocation
    assert "revoked" not in run(capsys, "inspect", str(revoked["gone"]))[1]


def test_crl_of_a_look_alike_issuer_is_ignored(revoked: dict[str, Path], tmp_path: Path, capsys) -> None:
    """Same issuer DN, other key: when the issuer certificate is at hand its signature decides."""
    from pki.keystore import load_keystore

    store = load_keystore(revoked["kept"])
    fake = self_signed_ca(store.chain[0].subject)
    entry = (x509.RevokedCertificateBuilder().serial_number(store.cert.serial_number)
             .revocation_date(NOW - DAY).build())
    forged = (x509.CertificateRevocationListBuilder().issuer_name(store.chain[0].subject)
              .last_update(NOW - DAY).next_update(NOW + DAY).add_revoked_certificate(entry)
              .sign(fake.key, hashes.SHA256()))
    f = tmp_path / "forged.pem"
    f.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    info = json.loads(run(capsys, "inspect", "--json", str(revoked["kept"]), "--crl", str(f))[1])
    assert info["certificates"][0]["status"]["state"] == "valid"


def test_crl_issuer_is_named_like_a_subject(demo_dir: Path, capsys) -> None:
    text = run(capsys, "inspect", str(demo_dir / "ca" / "crl.pem"))[1]
    issuers = [line for line in text.splitlines() if line.strip().startswith("Issuer:")]
    assert len(issuers) == 2 and all("pseudonym=" in line for line in issuers)
    assert "2.5.4.65" not in text
    cert_text = run(capsys, "inspect", str(demo_dir / "MSG_CA.crt"))[1]
    subject = next(line for line in cert_text.splitlines() if line.strip().startswith("Subject:")).split(":", 1)[1]
    assert subject.strip() in issuers[1]  # the root's CRL names the root exactly as its certificate does


def keys_of(value: Any, path: str = "") -> list[str]:
    if isinstance(value, dict):
        return [k for k in value] + [k2 for k, v in value.items() for k2 in keys_of(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [k for v in value for k in keys_of(v, path)]
    return []


def test_json_has_snake_case_keys_and_a_structured_status(demo_dir: Path, capsys) -> None:
    for name in ("MSG_CLI1.p12", "MSG_SERVER.p12", "MSG_CA.crt", "ca/crl.pem"):
        info = json.loads(run(capsys, "inspect", "--json", str(demo_dir / name))[1])
        bad = [k for k in keys_of(info) if not re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", k)]
        assert not bad, (name, bad)
    info = json.loads(run(capsys, "inspect", "--json", str(demo_dir / "MSG_CLI1.p12"))[1])
    cert = info["certificates"][0]
    assert set(cert["status"]) == {"state", "days_left"} and cert["status"]["state"] == "valid"
    assert isinstance(cert["status"]["days_left"], int) and 360 <= cert["status"]["days_left"] <= 365
    assert cert["public_key"] == {"algorithm": "ECDSA secp256r1", "bits": 256}
    assert cert["extensions"]["basic_constraints"] == {"critical": True, "value": {"ca": False, "path_length": None}}
    assert info["private_key"] == {"algorithm": "ECDSA secp256r1", "bits": 256}


def test_json_status_of_an_expired_certificate(tmp_path: Path, demo_ca, capsys) -> None:
    from .certfactory import Issuer, leaf

    old = leaf(Issuer(demo_ca.intermediate, demo_ca.intermediate_key), "OLD", not_before=NOW - 40 * DAY,
               not_after=NOW - 10 * DAY - DAY / 2)
    f = tmp_path / "old.pem"
    f.write_bytes(certs_to_pem([old.cert]))
    info = json.loads(run(capsys, "inspect", "--json", str(f))[1])
    assert info["certificates"][0]["status"] == {"state": "expired", "days_ago": 10}


def test_pem_private_keys_are_described(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MSG_RELAY_PASSWORD", raising=False)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    plain = tmp_path / "plain.pem"
    plain.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    code, text, _ = run(capsys, "inspect", str(plain))
    assert (code, text.strip()) == (0, "Private key: RSA 2048 bits, not encrypted")
    info = json.loads(run(capsys, "inspect", "--json", str(plain))[1])
    assert info == {"type": "private_key", "private_key": {"algorithm": "RSA", "bits": 2048, "encrypted": False}}

    locked = tmp_path / "locked.pem"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.BestAvailableEncryption(b"pw")))
    info = json.loads(run(capsys, "inspect", "--json", str(locked))[1])
    assert info["private_key"] == {"algorithm": None, "bits": None, "encrypted": True}
    assert "encrypted" in run(capsys, "inspect", str(locked))[1]
    pw = tmp_path / "pw"
    pw.write_text("pw\n")
    code, text, _ = run(capsys, "inspect", str(locked), "--password-file", str(pw))
    assert (code, text.strip()) == (0, "Private key: RSA 2048 bits, encrypted")
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    code, _, err = run(capsys, "inspect", str(locked), "--password-file", str(wrong))
    assert code == 2 and err.count("\n") == 1 and "wrong password" in err


def test_certificate_and_key_in_one_pem(fresh_ca, tmp_path: Path, capsys) -> None:
    store = fresh_ca.issue("BUNDLED")
    f = tmp_path / "bundle.pem"
    f.write_bytes(certs_to_pem([store.cert]) + store.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    info = json.loads(run(capsys, "inspect", "--json", str(f))[1])
    assert info["type"] == "certificate" and info["certificates"][0]["uid"] == "BUNDLED"
    assert info["private_key"] == {"algorithm": "ECDSA secp256r1", "bits": 256, "encrypted": False}


def test_what_a_certificate_says_cannot_drive_the_terminal(tmp_path, capsys):
    """A crafted CN with an escape sequence and a bidi override is printed with both made visible."""
    from pki.cli import main as pki_main

    from .certfactory import leaf, self_signed_ca
    from .certfactory import name as subject_name

    issuer = self_signed_ca(subject_name("MSG_CA", "CA"))
    store = leaf(issuer, "EVIL", cn="\x1b[2J\u202eevil")
    from pki.files import certs_to_pem

    (tmp_path / "evil.pem").write_bytes(certs_to_pem([store.cert]))
    assert pki_main(["inspect", str(tmp_path / "evil.pem")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert "\\x1b[2J\\u202eevil" in out
