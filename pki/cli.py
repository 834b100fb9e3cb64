"""``msg-pki``: the organisation's PKI from the command line.

Every failure is one line on stderr and exit code 2 (``verify`` uses 1 for "certificate rejected").
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .ca import REVOCATION_REASONS, CertificateAuthority
from .errors import PkiError, ValidationError
from .files import (
    certs_to_pem,
    load_certificate_file,
    load_certificates,
    load_crl_file,
    read_bytes,
    write_atomic,
)
from .identity import DEFAULT_ORG_UNIT, MSG_SERVER
from .inspect import inspect_file, render_json, render_text
from .keys import DEFAULT_KEY_TYPE, KEY_TYPES
from .keystore import Keystore, load_keystore, order_chain, save_keystore
from .passwords import PasswordSource
from .validation import ROLES, TrustPolicy

log = logging.getLogger("msg_relay.pki")

DEMO_USERS = ("MSG_CLI1", "MSG_CLI2", "MSG_CLI3")


def _passwords(args: argparse.Namespace) -> PasswordSource:
    return PasswordSource(file=getattr(args, "password_file", None))


def cmd_init(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.init(args.ca_dir, key_type=args.key_type, org_unit=args.org_unit,
                                   days=args.days, passwords=_passwords(args))
    print(f"CA created in {ca.directory}: root.crt, intermediate.crt, crl.pem")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.ca_dir, PasswordSource(file=args.ca_password_file or args.password_file))
    store = ca.issue(args.uid, cn=args.cn, server=args.server, dns_names=tuple(args.dns),
                     ip_addresses=tuple(args.ip), key_type=args.key_type, days=args.days)
    save_keystore(args.out, store, PasswordSource(file=args.password_file, prompt=False).given())
    print(f"issued {args.uid} (serial {store.cert.serial_number:x}) -> {args.out}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.ca_dir, _passwords(args))
    serials = ca.revoke(uid=args.uid, serial=args.serial, reason=args.reason)
    print(f"revoked serial(s) {', '.join(serials)}; CRL rewritten: {ca.directory / 'crl.pem'}")
    return 0


def cmd_crl(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.ca_dir, _passwords(args))
    print(f"CRL written: {ca.write_crl(args.out, days=args.days)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    store = load_keystore(args.file, _passwords(args))
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"{out}: cannot create directory ({exc.strerror})") from None
    key_pem = store.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    write_atomic(out / "key.pem", key_pem, mode=0o600)
    write_atomic(out / "cert.pem", certs_to_pem([store.cert]))
    write_atomic(out / "chain.pem", certs_to_pem(store.chain))
    print(f"exported {out / 'cert.pem'}, {out / 'key.pem'} (0600), {out / 'chain.pem'}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    cert = load_certificate_file(args.cert)
    chain = load_certificate_file(args.chain) if args.chain else []
    key_data = read_bytes(args.key)
    password = PasswordSource(file=args.key_password_file).obtain(args.key) if b"ENCRYPTED" in key_data else None
    try:
        key = serialization.load_pem_private_key(key_data, password) if b"-----BEGIN" in key_data \
            else serialization.load_der_private_key(key_data, password)
    except (ValueError, TypeError):
        raise PkiError(f"{args.key}: not a readable private key (or wrong password)") from None
    leaf, extra = cert[0], cert[1:]
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise PkiError(f"{args.key} does not belong to the certificate in {args.cert}")
    store = Keystore(key=key, cert=leaf, chain=order_chain(leaf, extra + chain))  # type: ignore[arg-type]
    save_keystore(args.out, store, PasswordSource(file=args.password_file, prompt=False).given())
    print(f"keystore written: {args.out}")
    return 0


def _load_subject(path: str, passwords: PasswordSource) -> list[x509.Certificate]:
    """A certificate file (leaf first, chain after) or a keystore, whichever the bytes are."""
    certs = load_certificates(read_bytes(path))
    if certs:
        return certs
    store = load_keystore(path, passwords)
    return [store.cert, *store.chain]


def cmd_verify(args: argparse.Namespace) -> int:
    certs = _load_subject(args.file, _passwords(args))
    leaf, untrusted = certs[0], certs[1:]
    if args.ca:
        anchors = load_certificate_file(args.ca)
    else:
        anchors = [c for c in untrusted if c.subject == c.issuer]
        if not anchors:
            raise PkiError("no trust anchor: give --ca ROOT.pem")
        print("note: trusting the CA certificate bundled in the file itself (use --ca to pin one)",
              file=sys.stderr)
    crls = load_crl_file(args.crl) if args.crl else []
    policy = TrustPolicy(anchors, crls, None if args.any_ou else args.org_unit)
    try:
        identity = policy.validate(leaf, untrusted, role=args.role)
    except ValidationError as exc:
        print(f"REJECTED: {exc}")
        return 1
    print(f"OK {identity.uid}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_file(args.file, _passwords(args))
    print(render_json(info) if args.json else render_text(info))
    return 0


def make_demo(out: Path, force: bool = False, key_type: str = DEFAULT_KEY_TYPE) -> None:
    """The demo PKI of ``make pki``: built aside, then moved into place whole."""
    if out.exists() and not force:
        raise PkiError(f"{out} already exists: use --force to replace it")
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        ca = CertificateAuthority.init(staging / "ca", key_type=key_type)
        write_atomic(staging / "MSG_CA.crt", certs_to_pem([ca.root]))
        server = ca.issue(MSG_SERVER, cn="MSG Relay Server", server=True, dns_names=("localhost",),
                          ip_addresses=("127.0.0.1", "::1"), key_type=key_type)
        save_keystore(staging / f"{MSG_SERVER}.p12", server, None)
        for uid in DEMO_USERS:
            save_keystore(staging / f"{uid}.p12", ca.issue(uid, cn=f"Demo user {uid}", key_type=key_type), None)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=parent))
            out.rename(trash / "old")
            staging.rename(out)
            shutil.rmtree(trash)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    make_demo(out, args.force, args.key_type)
    print(f"demo PKI in {out}/: MSG_CA.crt, ca/ (with crl.pem), {MSG_SERVER}.p12, "
          + ", ".join(f"{u}.p12" for u in DEMO_USERS))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msg-pki", description="PKI toolkit for MSG Relay.")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def key_type(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--key-type", default=DEFAULT_KEY_TYPE, choices=KEY_TYPES)

    def password(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument("--password-file", help=f"file holding the {what} password")

    s = sub.add_parser("init", help="create a root and an issuing intermediate CA")
    s.add_argument("--ca-dir", required=True)
    key_type(s)
    s.add_argument("--org-unit", default=DEFAULT_ORG_UNIT)
    s.add_argument("--days", type=int, default=3650)
    password(s, "CA key")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("issue", help="issue a user or server keystore")
    s.add_argument("--ca-dir", required=True)
    s.add_argument("--uid", required=True)
    s.add_argument("--cn")
    s.add_argument("--server", action="store_true", help="server role (serverAuth, SAN)")
    s.add_argument("--dns", action="append", default=[])
    s.add_argument("--ip", action="append", default=[])
    key_type(s)
    s.add_argument("--days", type=int, default=365)
    s.add_argument("--password-file", help="protects the new keystore (and unlocks the CA key, "
                   "unless --ca-password-file is given)")
    s.add_argument("--ca-password-file", help="unlocks a password-protected CA key")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_issue)

    s = sub.add_parser("revoke", help="revoke a certificate and rewrite the CRL")
    s.add_argument("--ca-dir", required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--uid")
    g.add_argument("--serial")
    s.add_argument("--reason", default="unspecified", choices=sorted(REVOCATION_REASONS))
    password(s, "CA key")
    s.set_defaults(func=cmd_revoke)

    s = sub.add_parser("crl", help="sign a fresh CRL")
    s.add_argument("--ca-dir", required=True)
    s.add_argument("--out")
    s.add_argument("--days", type=int, default=30)
    password(s, "CA key")
    s.set_defaults(func=cmd_crl)

    s = sub.add_parser("export", help="keystore -> cert.pem, key.pem, chain.pem")
    s.add_argument("file")
    s.add_argument("--out", required=True)
    password(s, "keystore")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("import", help="cert + key (+ chain) -> keystore")
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--chain")
    s.add_argument("--out", required=True)
    s.add_argument("--password-file", help="protects the new keystore")
    s.add_argument("--key-password-file", help="unlocks an encrypted key file")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("verify", help="validate a certificate or keystore as the relay does")
    s.add_argument("file")
    s.add_argument("--ca", help="trust anchor (root CA certificate)")
    s.add_argument("--crl")
    s.add_argument("--role", choices=ROLES, default="client")
    s.add_argument("--org-unit", default=DEFAULT_ORG_UNIT)
    s.add_argument("--any-ou", action="store_true", help="skip the OU check")
    password(s, "keystore")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("inspect", help="describe a certificate, keystore or CRL")
    s.add_argument("file")
    s.add_argument("--json", action="store_true")
    password(s, "keystore")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("demo", help="a complete demo PKI (what 'make pki' runs)")
    s.add_argument("--out", required=True)
    s.add_argument("--force", action="store_true")
    key_type(s)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except PkiError as exc:
        print(f"msg-pki: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msg-pki: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`msg-pki inspect F | head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
