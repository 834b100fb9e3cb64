"""Human and machine readable descriptions of certificates, keystores, CRLs and private keys.

``msg-pki inspect`` and ``scripts/inspect_cert.py`` both print what :func:`inspect_file` returns.
The format is sniffed from the content, never from the extension.

The ``--json`` form is meant for scripts, so its shape is stable: snake_case keys only, and facts
as structured values rather than the sentences of the text form. Top level::

    {"type": "certificate" | "pkcs12" | "crl" | "private_key",
     "certificates": [...],            # certificate, pkcs12 (leaf first)
     "private_key": {...},             # pkcs12, private_key (and a PEM holding certificates and a key)
     "crls": [...]}                    # crl

A certificate's ``status`` is ``{"state": "valid", "days_left": N}``, ``{"state": "expired",
"days_ago": N}``, ``{"state": "not_yet_valid", "days_until_valid": N}`` or ``{"state": "revoked",
"revocation_date": ISO, "reason": R}`` (the last only when a CRL covering it was given); its
``extensions`` map snake_case names to ``{"critical": bool, "value": ...}``. A private key is
``{"algorithm": str | None, "bits": int | None, "encrypted": bool}`` (algorithm and size stay None for
an encrypted key when no password is available).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID, NameOID

from .errors import KeystoreError, PkiError
from .files import is_pem, load_certificates, load_crls, read_bytes
from .identity import cn_of, org_units_of, uid_of
from .keys import describe_key
from .keystore import looks_like_pkcs12, open_keystore
from .passwords import NO_PASSWORD, PasswordSource
from .terminal import visible
from .validation import verify_crl_signature

# Names print as the relay reads them: the UID is "pseudonym=", not the bare "2.5.4.65=".
_NAMES = {NameOID.PSEUDONYM: "pseudonym"}

# snake_case names of the extensions cryptography knows, from its own constant names (BASIC_CONSTRAINTS ...).
_EXTENSION_NAMES = {oid: name.lower() for name, oid in vars(ExtensionOID).items()
                    if isinstance(oid, x509.ObjectIdentifier)}

_PEM_KEY = re.compile(rb"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.DOTALL)


def name_text(name: x509.Name) -> str:
    """A subject or issuer DN as RFC 4514 text, with the UID attribute called ``pseudonym``."""
    return name.rfc4514_string(_NAMES)


def _extension_name(oid: x509.ObjectIdentifier) -> str:
    return _EXTENSION_NAMES.get(oid, "oid_" + oid.dotted_string.replace(".", "_"))


def _ext_value(ext: x509.Extension[Any]) -> Any:
    v = ext.value
    if isinstance(v, x509.BasicConstraints):
        return {"ca": v.ca, "path_length": v.path_length}
    if isinstance(v, x509.KeyUsage):
        names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                 "key_agreement", "key_cert_sign", "crl_sign"]
        used = [n for n in names if getattr(v, n)]
        if v.key_agreement:
            used += [n for n in ("encipher_only", "decipher_only") if getattr(v, n)]
        return used
    if isinstance(v, x509.ExtendedKeyUsage):
        return [getattr(o, "_name", o.dotted_string) for o in v]
    if isinstance(v, x509.SubjectAlternativeName):
        return [f"DNS:{n}" for n in v.get_values_for_type(x509.DNSName)] + \
               [f"IP:{n}" for n in v.get_values_for_type(x509.IPAddress)]
    if isinstance(v, x509.SubjectKeyIdentifier):
        return v.digest.hex(":")
    if isinstance(v, x509.AuthorityKeyIdentifier):
        return v.key_identifier.hex(":") if v.key_identifier else None
    return str(v)


def _revocation(cert: x509.Certificate, crls: Sequence[x509.CertificateRevocationList],
                pool: Sequence[x509.Certificate]) -> dict[str, Any] | None:
    """The CRL entry revoking ``cert``, if one of ``crls`` has it.

    A CRL counts when its issuer is the certificate's issuer and, when that issuer's certificate is
    at hand (a keystore or chain file), when the issuer's signature on it verifies: a CRL from a
    look-alike CA must not make a good certificate look revoked.
    """
    issuer_cert = next((c for c in pool if c.subject == cert.issuer), None)
    for crl in crls:
        if crl.issuer != cert.issuer:
            continue
        if issuer_cert is not None and not verify_crl_signature(crl, issuer_cert):
            continue
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            try:
                reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
            except x509.ExtensionNotFound:
                reason = "unspecified"
            return {"revocation_date": entry.revocation_date_utc.isoformat(), "reason": reason}
    return None


def certificate_status(cert: x509.Certificate, now: dt.datetime,
                       revocation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Structured status; a revocation wins over the dates (it is the fact that matters most)."""
    if revocation is not None:
        return {"state": "revoked", **revocation}
    if now < cert.not_valid_before_utc:
        return {"state": "not_yet_valid", "days_until_valid": (cert.not_valid_before_utc - now).days}
    if now > cert.not_valid_after_utc:
        return {"state": "expired", "days_ago": (now - cert.not_valid_after_utc).days}
    return {"state": "valid", "days_left": (cert.not_valid_after_utc - now).days}


def status_text(status: dict[str, Any]) -> str:
    """The status as the text form prints it, e.g. ``valid (364 days left)``."""
    state = status["state"]
    if state == "revoked":
        return f"revoked ({status['revocation_date']}, {status['reason']})"
    if state == "not_yet_valid":
        return f"not yet valid (starts in {status['days_until_valid']} days)"
    if state == "expired":
        return f"expired {status['days_ago']} days ago"
    return f"valid ({status['days_left']} days left)"


def describe_certificate(cert: x509.Certificate, now: dt.datetime | None = None,
                         crls: Sequence[x509.CertificateRevocationList] = (),
                         pool: Sequence[x509.Certificate] = ()) -> dict[str, Any]:
    """Everything ``inspect`` shows about one certificate; ``crls`` (with issuers from ``pool``) for its status."""
    now = now or dt.datetime.now(dt.timezone.utc)
    algo, bits = describe_key(cert.public_key())  # type: ignore[arg-type]
    sig = cert.signature_algorithm_oid
    return {
        "uid": uid_of(cert),
        "cn": cn_of(cert),
        "ou": ", ".join(org_units_of(cert)) or None,
        "subject": name_text(cert.subject),
        "issuer": name_text(cert.issuer),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "status": certificate_status(cert, now, _revocation(cert, crls, pool)),
        "public_key": {"algorithm": algo, "bits": bits},
        "signature_algorithm": getattr(sig, "_name", sig.dotted_string),
        "sha256_fingerprint": cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        "extensions": {_extension_name(e.oid): {"critical": e.critical, "value": _ext_value(e)}
                       for e in cert.extensions},
    }


def describe_crl(crl: x509.CertificateRevocationList) -> dict[str, Any]:
    """A CRL's issuer (named like a certificate subject), dates and entries."""
    entries = []
    for r in crl:
        try:
            reason: str | None = r.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
        except x509.ExtensionNotFound:
            reason = None
        entries.append({"serial": format(r.serial_number, "x"), "revocation_date": r.revocation_date_utc.isoformat(),
                        "reason": reason})
    return {
        "issuer": name_text(crl.issuer),
        "last_update": crl.last_update_utc.isoformat(),
        "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
        "entries": entries,
    }


def describe_private_key(data: bytes, name: str = "input", passwords: PasswordSource = NO_PASSWORD) -> dict[str, Any]:
    """Type, size and protection of the first PEM private key in ``data``.

    An encrypted key is opened with the password ``passwords`` gives (file, environment, prompt);
    without one it is still described, as encrypted, so inspecting never needs the secret.
    """
    match = _PEM_KEY.search(data)
    if match is None:
        raise PkiError(f"{name}: no PEM private key found")
    block = match.group(0)
    encrypted = match.group(1) == b"ENCRYPTED " or b"Proc-Type: 4,ENCRYPTED" in block
    password = None
    if encrypted:
        password = passwords.given()  # a missing or empty password file is an error, said as such
        if password is None:
            try:
                password = passwords.obtain(name)
            except KeystoreError:
                return {"algorithm": None, "bits": None, "encrypted": True}
    try:
        key = serialization.load_pem_private_key(block, password)
    except (ValueError, TypeError):
        raise PkiError(f"{name}: wrong password or unreadable private key") from None
    except UnsupportedAlgorithm:
        raise PkiError(f"{name}: private key of an unsupported type") from None
    algo, bits = describe_key(key)  # type: ignore[arg-type]
    return {"algorithm": algo, "bits": bits, "encrypted": encrypted}


def inspect_bytes(data: bytes, name: str = "input", passwords: PasswordSource = NO_PASSWORD,
                  crls: Sequence[x509.CertificateRevocationList] = ()) -> dict[str, Any]:
    """Describe whatever ``data`` is: certificates, CRLs, a PKCS#12 keystore or a PEM private key.

    ``crls`` (e.g. the CA's ``crl.pem``) turn a revoked certificate's status into ``revoked``.
    """
    has_key = is_pem(data) and _PEM_KEY.search(data) is not None
    certs = load_certificates(data)
    if certs:
        info: dict[str, Any] = {"type": "certificate",
                                "certificates": [describe_certificate(c, crls=crls, pool=certs) for c in certs]}
        if has_key:
            info["private_key"] = describe_private_key(data, name, passwords)
        return info
    if has_key:
        return {"type": "private_key", "private_key": describe_private_key(data, name, passwords)}
    found = load_crls(data)
    if found:
        return {"type": "crl", "crls": [describe_crl(c) for c in found]}
    if not looks_like_pkcs12(data):
        raise PkiError(f"{name}: not a certificate, CRL, private key or PKCS#12 keystore")
    store = open_keystore(data, name, passwords)
    algo, bits = describe_key(store.key)
    everything = [store.cert, *store.chain]
    return {"type": "pkcs12", "private_key": {"algorithm": algo, "bits": bits},
            "certificates": [describe_certificate(c, crls=crls, pool=everything) for c in everything]}


def inspect_file(path: str | os.PathLike[str], passwords: PasswordSource = NO_PASSWORD,
                 crls: Sequence[x509.CertificateRevocationList] = ()) -> dict[str, Any]:
    """:func:`inspect_bytes` of a file."""
    return inspect_bytes(read_bytes(path), str(path), passwords, crls)


_ORDER = ["uid", "cn", "ou", "subject", "issuer", "serial", "not_before", "not_after", "status", "public_key",
          "signature_algorithm", "sha256_fingerprint"]
_LABELS = {"uid": "UID", "cn": "CN", "ou": "OU", "subject": "Subject", "issuer": "Issuer", "serial": "Serial",
           "not_before": "Not before", "not_after": "Not after", "status": "Status", "public_key": "Public key",
           "signature_algorithm": "Signature", "sha256_fingerprint": "SHA-256"}


def _key_text(key: dict[str, Any]) -> str:
    if key.get("algorithm") is None:
        return "encrypted (give --password-file to see its type and size)"
    text = f"{key['algorithm']} {key['bits']} bits"
    if "encrypted" in key:
        text += ", encrypted" if key["encrypted"] else ", not encrypted"
    return text


def _field_text(key: str, value: Any) -> str:
    if key == "status":
        return status_text(value)
    if key == "public_key":
        return _key_text(value)
    return str(value)


def render_text(info: dict[str, Any]) -> str:
    """Aligned text in the manner of ``step certificate inspect``; whatever the file says is shown with
    its control characters made visible (a crafted CN must not drive the terminal)."""
    return visible(_render_text(info), keep="\n")


def _render_text(info: dict[str, Any]) -> str:
    width = max(len(v) for v in _LABELS.values()) + 2
    lines: list[str] = []
    if info["type"] == "pkcs12":
        lines.append(f"PKCS#12 keystore: private key {_key_text(info['private_key'])}, "
                     f"{len(info['certificates'])} certificate(s)")
    elif "private_key" in info:
        lines.append(f"Private key: {_key_text(info['private_key'])}")
    for i, cert in enumerate(info.get("certificates", [])):
        title = "Certificate" if i == 0 else f"Chain certificate {i}"
        lines.append(f"{title}:")
        for k in _ORDER:
            if cert.get(k) is not None:
                lines.append(f"  {_LABELS[k] + ':':<{width}}{_field_text(k, cert[k])}")
        lines.append("  Extensions:")
        for name, ext in cert["extensions"].items():
            value = ext["value"]
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            if isinstance(value, dict):
                shown = ", ".join(f"{k}={v}" for k, v in value.items())
            lines.append(f"    {name}{' (critical)' if ext['critical'] else ''}: {shown}")
    crl_width = len("Last update:") + 1
    for crl in info.get("crls", []):
        lines.append("Certificate revocation list:")
        lines.append(f"  {'Issuer:':<{crl_width}}{crl['issuer']}")
        lines.append(f"  {'Last update:':<{crl_width}}{crl['last_update']}")
        lines.append(f"  {'Next update:':<{crl_width}}{crl['next_update']}")
        lines.append(f"  {'Entries:':<{crl_width}}{len(crl['entries'])}")
        for e in crl["entries"]:
            lines.append(f"    serial {e['serial']}  revoked {e['revocation_date']}  reason {e['reason'] or '-'}")
    return "\n".join(lines)


def render_json(info: dict[str, Any]) -> str:
    """The structure of :func:`inspect_bytes` as JSON (see the module docstring for its shape)."""
    return json.dumps(info, indent=2, sort_keys=False)
