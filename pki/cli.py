"""``msg-pki``: the organisation's PKI from the command line.

Every failure is one line on stderr and exit code 2 (``verify`` uses 1 for "certificate rejected").

Two passwords, two names, in every command: ``--ca-password-file`` (or ``MSG_RELAY_CA_PASSWORD``)
unlocks or protects the CA keys; ``--password-file`` (or ``MSG_RELAY_PASSWORD``) is the password of
the keystore a command reads or writes. Nothing that writes a file replaces an existing one
without ``--force``.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from .ca import (
    CA_PASSWORD_ENV,
    CRL_DAYS,
    REVOCATION_REASONS,
    CertificateAuthority,
    ca_passwords,
    check_crl_days,
)
from .errors import KeystoreError, PkiError, ValidationError
from .files import (
    certs_to_pem,
    load_certificate_file,
    load_certificates,
    load_crl_file,
    read_bytes,
    write_atomic,
)
from .identity import DEFAULT_ORG_UNIT, MSG_SERVER, uid_of
from .inspect import inspect_file, name_text, render_json, render_text
from .keys import DEFAULT_KEY_TYPE, KEY_TYPES
from .keystore import Keystore, load_keystore, order_chain, save_keystore
from .passwords import PasswordSource
from .validation import ROLES, Role, TrustPolicy

log = logging.getLogger("msg_relay.pki")

DEMO_USERS = ("MSG_CLI1", "MSG_CLI2", "MSG_CLI3")


def _warn(message: str) -> None:
    print(f"msg-pki: warning: {message}", file=sys.stderr)


def _passwords(args: argparse.Namespace) -> PasswordSource:
    """The password of the keystore a command reads: --password-file, MSG_RELAY_PASSWORD or a prompt."""
    return PasswordSource(file=getattr(args, "password_file", None))


def _ca_password_file(args: argparse.Namespace) -> str | None:
    """``--ca-password-file``, or the deprecated ``--password-file`` that init, revoke and crl once took.

    The old name stays accepted (with a warning) so existing scripts and cron jobs keep working; it
    can no longer be confused with a keystore's password because those commands write no keystore.
    """
    legacy = getattr(args, "legacy_password_file", None)
    if legacy is None:
        return str(args.ca_password_file) if args.ca_password_file else None
    if args.ca_password_file:
        raise PkiError("give the CA password once: --ca-password-file (--password-file is its deprecated alias)")
    _warn(f"'{args.command} --password-file' is deprecated: the CA password is --ca-password-file")
    return str(legacy)


def _ca_passwords(args: argparse.Namespace) -> PasswordSource:
    """The CA keys' password: --ca-password-file, MSG_RELAY_CA_PASSWORD or a prompt; never the keystore's."""
    return ca_passwords(_ca_password_file(args))


def _refuse_overwrite(paths: Iterable[Path], force: bool) -> None:
    """Refuse to replace existing files unless ``--force``: a replaced keystore may be the only copy of a key."""
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not force:
        raise PkiError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
                       "use --force to replace")


def _new_ca_password(args: argparse.Namespace) -> bytes | None:
    """The password for new CA keys: given, else asked twice on a terminal, else none with a warning.

    Unencrypted CA keys are a legitimate choice (a test CA, a CA on an encrypted offline disk) but
    never a silent one.
    """
    given = _ca_passwords(args).given()
    if given is not None:
        return given
    terminal = sys.stdin is not None and sys.stdin.isatty()
    if terminal:
        try:
            first = getpass.getpass("Password for the new CA keys (empty: leave them unencrypted): ").encode()
            if first:
                if getpass.getpass("The same password again: ").encode() != first:
                    raise PkiError("the two passwords differ: no CA created")
                return first
        except EOFError:
            raise PkiError("no password entered: no CA created") from None
    why = "an empty password" if terminal else f"no --ca-password-file, no {CA_PASSWORD_ENV}, no terminal to ask"
    _warn(f"the CA keys in {args.ca_dir} are NOT encrypted ({why})")
    return None


def cmd_init(args: argparse.Namespace) -> int:
    CertificateAuthority.check_new(args.ca_dir, args.days, args.crl_days)  # before asking for a password
    ca = CertificateAuthority.init(args.ca_dir, key_type=args.key_type, org_unit=args.org_unit,
                                   days=args.days, password=_new_ca_password(args), crl_days=args.crl_days)
    print(f"CA created in {ca.directory}: root.crt, intermediate.crt, crl.pem")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _refuse_overwrite([out], args.force)
    # The new keystore's password is read first: a bad --password-file must fail before the CA acts.
    keystore_password = PasswordSource(file=args.password_file, prompt=False).given()
    ca = CertificateAuthority.load(args.ca_dir, _ca_passwords(args))
    delivered: list[Path] = []

    def deliver(store: Keystore) -> None:
        save_keystore(out, store, keystore_password)
        delivered.append(out)

    try:
        store = ca.issue(args.uid, cn=args.cn, server=args.server, dns_names=tuple(args.dns),
                         ip_addresses=tuple(args.ip), key_type=args.key_type, days=args.days, deliver=deliver)
    except PkiError:
        for path in delivered:  # written but not on record: a certificate the CA could not revoke by UID
            path.unlink(missing_ok=True)
        raise
    print(f"issued {args.uid} (serial {store.cert.serial_number:x}) -> {args.out}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    if args.crl_days is not None:
        check_crl_days(args.crl_days)
    ca = CertificateAuthority.load(args.ca_dir, _ca_passwords(args))
    if args.crl_days is not None:
        ca.crl_days = args.crl_days  # kept in index.json by the revocation's own save
    serials = ca.revoke(uid=args.uid, serial=args.serial, reason=args.reason)
    print(f"revoked serial(s) {', '.join(serials)}; CRL rewritten: {ca.directory / 'crl.pem'}")
    return 0


def cmd_crl(args: argparse.Namespace) -> int:
    if args.crl_days is not None:
        check_crl_days(args.crl_days)
    ca = CertificateAuthority.load(args.ca_dir, _ca_passwords(args))
    if args.crl_days is not None:
        ca.set_crl_days(args.crl_days)
    path = ca.write_crl(args.out)
    print(f"CRL written: {path} (valid for {ca.crl_days} days)")
    return 0


@dataclass(frozen=True)
class _RememberingPasswords(PasswordSource):
    """A PasswordSource that remembers the password it handed out, so export can reuse it."""

    handed_out: list[bytes] = field(default_factory=list)

    def given(self) -> bytes | None:
        value = super().given()
        if value is not None:
            self.handed_out.append(value)
        return value

    def obtain(self, what: str) -> bytes:
        value = super().obtain(what)
        self.handed_out.append(value)
        return value


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    targets = [out / "cert.pem", out / "key.pem", out / "chain.pem"]
    _refuse_overwrite(targets, args.force)
    passwords = _RememberingPasswords(file=args.password_file)
    store = load_keystore(args.file, passwords)
    # The keystore's password, if it had one, protects key.pem too: exporting must not strip it.
    password = passwords.handed_out[-1] if passwords.handed_out else None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"{out}: cannot create directory ({exc.strerror})") from None
    encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    if password and not args.no_encrypt:
        encryption = serialization.BestAvailableEncryption(password)
        how = "encrypted with the keystore's password"
    elif password:
        how = "NOT encrypted, as --no-encrypt asked"
    else:
        how = "not encrypted: the keystore has no password"
    key_pem = store.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    write_atomic(targets[1], key_pem, mode=0o600)
    write_atomic(targets[0], certs_to_pem([store.cert]))
    write_atomic(targets[2], certs_to_pem(store.chain))
    print(f"exported {targets[0]}, {targets[1]} (0600, {how}), {targets[2]}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    _refuse_overwrite([Path(args.out)], args.force)
    cert = load_certificate_file(args.cert)
    chain = load_certificate_file(args.chain) if args.chain else []
    key_data = read_bytes(args.key)
    password = None
    if b"ENCRYPTED" in key_data:
        source = PasswordSource(file=args.key_password_file)
        password = source.given()
        if password is None:
            try:
                password = source.obtain(args.key)
            except KeystoreError:  # its hint names --password-file, which here is the new keystore's
                raise PkiError(f"{args.key} is encrypted: use --key-password-file "
                               f"or set {source.env}") from None
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


def guess_role(cert: x509.Certificate) -> Role:
    """The role a certificate is meant for: server for UID MSG_SERVER or a serverAuth-only EKU.

    ``verify server.p12`` without ``--role`` should check a server certificate as one, not reject it
    for not being a client's. A certificate allowing both clientAuth and serverAuth is a client's.
    """
    if uid_of(cert) == MSG_SERVER:
        return "server"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "client"
    if ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        return "server"
    return "client"


def _issuer_missing(leaf: x509.Certificate, pool: Sequence[x509.Certificate],
                    anchors: Sequence[x509.Certificate]) -> bool:
    """Whether the leaf's issuer is simply absent: its DN is the subject of nothing given or trusted.

    Then the fix is to supply the intermediate (``--chain``), not to doubt the CA, and the message
    must say so instead of OpenSSL's "unknown issuer".
    """
    if leaf.issuer == leaf.subject:
        return False
    return all(c.subject != leaf.issuer for c in [*pool, *anchors])


def cmd_verify(args: argparse.Namespace) -> int:
    certs = _load_subject(args.file, _passwords(args))
    leaf, untrusted = certs[0], certs[1:]
    if args.chain:
        untrusted += load_certificate_file(args.chain)
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
    role: Role = args.role or guess_role(leaf)
    if args.role is None and role == "server":
        print("note: checking it as a server certificate (its UID or extended key usage); --role chooses",
              file=sys.stderr)
    try:
        identity = policy.validate(leaf, untrusted, role=role)
    except ValidationError as exc:
        if exc.reason == "unknown_issuer" and _issuer_missing(leaf, untrusted, anchors):
            print(f"REJECTED: intermediate missing: no certificate given for the issuer "
                  f"{name_text(leaf.issuer)} (add it with --chain FILE)")
            return 1
        print(f"REJECTED: {exc}")
        return 1
    print(f"OK {identity.uid}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    crls = load_crl_file(args.crl) if args.crl else []
    info = inspect_file(args.file, _passwords(args), crls)
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

    def keystore_password(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument("--password-file", help=f"password of the {what} (else MSG_RELAY_PASSWORD, else a prompt)")

    def ca_password(sp: argparse.ArgumentParser, legacy: bool, what: str = "unlocks the CA keys") -> None:
        sp.add_argument("--ca-password-file", help=f"{what} (else {CA_PASSWORD_ENV}, else a prompt)")
        if legacy:  # what these commands called the CA password before; deprecated, hidden
            sp.add_argument("--password-file", dest="legacy_password_file", help=argparse.SUPPRESS)

    def crl_days(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument("--crl-days", type=int, metavar="N",
                        help=f"CRL lifetime in days {what}; kept in the CA's index.json for later CRLs")

    def force(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--force", action="store_true", help="replace existing output files")

    s = sub.add_parser("init", help="create a root and an issuing intermediate CA")
    s.add_argument("--ca-dir", required=True)
    key_type(s)
    s.add_argument("--org-unit", default=DEFAULT_ORG_UNIT)
    s.add_argument("--days", type=int, default=3650)
    ca_password(s, legacy=True, what="protects the new CA keys")
    s.add_argument("--crl-days", type=int, default=CRL_DAYS, metavar="N",
                   help=f"CRL lifetime in days (default {CRL_DAYS}); kept in the CA's index.json")
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
    s.add_argument("--password-file", help="protects the new keystore (else MSG_RELAY_PASSWORD, else none); "
                   "never the CA's password")
    ca_password(s, legacy=False)
    s.add_argument("--out", required=True)
    force(s)
    s.set_defaults(func=cmd_issue)

    s = sub.add_parser("revoke", help="revoke a certificate and rewrite the CRL")
    s.add_argument("--ca-dir", required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--uid")
    g.add_argument("--serial")
    s.add_argument("--reason", default="unspecified", choices=sorted(REVOCATION_REASONS))
    ca_password(s, legacy=True)
    crl_days(s, "(default: the CA's)")
    s.set_defaults(func=cmd_revoke)

    s = sub.add_parser("crl", help="sign a fresh CRL (run it from cron before the CRL expires)")
    s.add_argument("--ca-dir", required=True)
    s.add_argument("--out", help="where to write it (default: the CA's crl.pem)")
    crl_days(s, "(default: the CA's)")
    s.add_argument("--days", dest="crl_days", type=int, help=argparse.SUPPRESS)  # its old name
    ca_password(s, legacy=True)
    s.set_defaults(func=cmd_crl)

    s = sub.add_parser("export", help="keystore -> cert.pem, key.pem, chain.pem")
    s.add_argument("file")
    s.add_argument("--out", required=True)
    keystore_password(s, "keystore (it also encrypts key.pem)")
    s.add_argument("--no-encrypt", action="store_true", help="write key.pem unencrypted even from a protected keystore")
    force(s)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("import", help="cert + key (+ chain) -> keystore")
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--chain")
    s.add_argument("--out", required=True)
    s.add_argument("--password-file", help="protects the new keystore")
    s.add_argument("--key-password-file", help="unlocks an encrypted key file")
    force(s)
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("verify", help="validate a certificate or keystore as the relay does")
    s.add_argument("file")
    s.add_argument("--ca", help="trust anchor (root CA certificate)")
    s.add_argument("--chain", help="intermediate certificate(s) the file does not carry")
    s.add_argument("--crl")
    s.add_argument("--role", choices=ROLES, help="default: server for UID MSG_SERVER or serverAuth, else client")
    s.add_argument("--org-unit", default=DEFAULT_ORG_UNIT)
    s.add_argument("--any-ou", action="store_true", help="skip the OU check")
    keystore_password(s, "keystore")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("inspect", help="describe a certificate, keystore, CRL or PEM private key")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="stable snake_case keys, structured status")
    s.add_argument("--crl", help="CRL file: a revoked certificate's status says so")
    keystore_password(s, "keystore or encrypted key")
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
    except EOFError:  # Ctrl-D at a password prompt
        print("msg-pki: error: no password entered", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`msg-pki inspect F | head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
