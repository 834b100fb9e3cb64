"""Human and machine readable descriptions of certificates, keystores and CRLs.

``msg-pki inspect`` and ``scripts/inspect_cert.py`` both print what :func:`inspect_file` returns.
The format is sniffed from the content, never from the extension.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from .errors import PkiError
from .files import load_certificates, load_crls, read_bytes
from .identity import cn_of, org_units_of, uid_of
from .keys import describe_key
from .keystore import looks_like_pkcs12, open_keystore
from .passwords import NO_PASSWORD, PasswordSource

_NAMES = {NameOID.PSEUDONYM: "pseudonym"}


def _status(cert: x509.Certificate, now: dt.datetime) -> str:
    if now < cert.not_valid_before_utc:
        days = (cert.not_valid_before_utc - now).days
        return f"not yet valid (starts in {days} days)"
    if now > cert.not_valid_after_utc:
        return f"expired {(now - cert.not_valid_after_utc).days} days ago"
    return f"valid ({(cert.not_valid_after_utc - now).days} days left)"


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


def describe_certificate(cert: x509.Certificate, now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or dt.datetime.now(dt.timezone.utc)
    algo, bits = describe_key(cert.public_key())  # type: ignore[arg-type]
    sig = cert.signature_algorithm_oid
    return {
        "uid": uid_of(cert),
        "cn": cn_of(cert),
        "ou": ", ".join(org_units_of(cert)) or None,
        "subject": cert.subject.rfc4514_string(_NAMES),
        "issuer": cert.issuer.rfc4514_string(_NAMES),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "status": _status(cert, now),
        "key": f"{algo} {bits} bits",
        "signature_algorithm": getattr(sig, "_name", sig.dotted_string),
        "sha256_fingerprint": cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        "extensions": {getattr(e.oid, "_name", e.oid.dotted_string) + (" (critical)" if e.critical else ""):
                       _ext_value(e) for e in cert.extensions},
    }


def describe_crl(crl: x509.CertificateRevocationList) -> dict[str, Any]:
    entries = []
    for r in crl:
        try:
            reason = r.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
        except x509.ExtensionNotFound:
            reason = None
        entries.append({"serial": format(r.serial_number, "x"), "revoked": r.revocation_date_utc.isoformat(),
                        "reason": reason})
    return {
        "issuer": crl.issuer.rfc4514_string(),
        "last_update": crl.last_update_utc.isoformat(),
        "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
        "entries": entries,
    }


def inspect_bytes(data: bytes, name: str = "input", passwords: PasswordSource = NO_PASSWORD) -> dict[str, Any]:
    """Describe whatever ``data`` is: certificates, CRLs or a PKCS#12 keystore."""
    certs = load_certificates(data)
    if certs:
        return {"type": "certificate", "certificates": [describe_certificate(c) for c in certs]}
    crls = load_crls(data)
    if crls:
        return {"type": "crl", "crls": [describe_crl(c) for c in crls]}
    if not looks_like_pkcs12(data):
        raise PkiError(f"{name}: not a certificate, CRL or PKCS#12 keystore")
    store = open_keystore(data, name, passwords)
    algo, bits = describe_key(store.key)
    return {"type": "pkcs12", "key": f"{algo} {bits} bits",
            "certificates": [describe_certificate(c) for c in [store.cert, *store.chain]]}


def inspect_file(path: str | os.PathLike[str], passwords: PasswordSource = NO_PASSWORD) -> dict[str, Any]:
    return inspect_bytes(read_bytes(path), str(path), passwords)


_ORDER = ["uid", "cn", "ou", "subject", "issuer", "serial", "not_before", "not_after", "status", "key",
          "signature_algorithm", "sha256_fingerprint"]
_LABELS = {"uid": "UID", "cn": "CN", "ou": "OU", "subject": "Subject", "issuer": "Issuer", "serial": "Serial",
           "not_before": "Not before", "not_after": "Not after", "status": "Status", "key": "Public key",
           "signature_algorithm": "Signature", "sha256_fingerprint": "SHA-256"}


def render_text(info: dict[str, Any]) -> str:
    """Aligned text in the manner of ``step certificate inspect``."""
    width = max(len(v) for v in _LABELS.values()) + 2
    lines: list[str] = []
    if info["type"] == "pkcs12":
        lines.append(f"PKCS#12 keystore: private key {info['key']}, {len(info['certificates'])} certificate(s)")
    if info["type"] in ("certificate", "pkcs12"):
        for i, cert in enumerate(info["certificates"]):
            title = "Certificate" if i == 0 else f"Chain certificate {i}"
            lines.append(f"{title}:")
            for k in _ORDER:
                if cert.get(k) is not None:
                    lines.append(f"  {_LABELS[k] + ':':<{width}}{cert[k]}")
            lines.append("  Extensions:")
            for name, value in cert["extensions"].items():
                shown = ", ".join(map(str, value)) if isinstance(value, list) else value
                if isinstance(value, dict):
                    shown = ", ".join(f"{k}={v}" for k, v in value.items())
                lines.append(f"    {name}: {shown}")
    else:
        for crl in info["crls"]:
            lines.append("Certificate revocation list:")
            lines.append(f"  {'Issuer:':<{width}}{crl['issuer']}")
            lines.append(f"  {'Last update:':<{width}}{crl['last_update']}")
            lines.append(f"  {'Next update:':<{width}}{crl['next_update']}")
            lines.append(f"  {'Entries:':<{width}}{len(crl['entries'])}")
            for e in crl["entries"]:
                lines.append(f"    serial {e['serial']}  revoked {e['revoked']}  reason {e['reason'] or '-'}")
    return "\n".join(lines)


def render_json(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, sort_keys=False)
