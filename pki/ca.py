"""The organisation's certificate authority on disk: a root, an issuing intermediate, an index, CRLs.

Layout of a CA directory::

    root.crt  root.key            self-signed root (UID MSG_CA), signs the intermediate and its CRL
    intermediate.crt  .key        pathlen:0 issuing CA, signs every leaf and the leaf CRL
    crl.pem                       the intermediate's CRL followed by the root's
    index.json                    the CA's settings (org_unit, crl_days) and every issued leaf:
                                  serial, UID, role, expiry, revocation

Keys are written 0600, encrypted (PBES2/AES-256) when a password is given. The CA keys' password has
its own sources (``--ca-password-file``, :data:`CA_PASSWORD_ENV`), never those of a keystore, so
issuing a keystore can never encrypt it with the CA's password by accident.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .errors import KeystoreError, PkiError
from .files import certs_to_pem, load_certificate_file, read_bytes, write_atomic
from .identity import DEFAULT_ORG_UNIT, MSG_SERVER, RESERVED_UIDS, is_valid_uid
from .keys import DEFAULT_KEY_TYPE, PrivateKey, certificate_hash, generate_key
from .keystore import Keystore
from .passwords import NO_PASSWORD, PasswordSource
from .profile import LeafRequest, Subject, make_intermediate, make_leaf, make_root

CRL_DAYS = 30
"""Default CRL lifetime (nextUpdate - now). The relay refuses every client once the CRL is past it."""
CA_PASSWORD_ENV = "MSG_RELAY_CA_PASSWORD"
"""The environment variable for the CA keys' password: distinct from the keystores' MSG_RELAY_PASSWORD."""
REVOCATION_REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key_compromise": x509.ReasonFlags.key_compromise,
    "ca_compromise": x509.ReasonFlags.ca_compromise,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
    "certificate_hold": x509.ReasonFlags.certificate_hold,
}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_bytes(key: PrivateKey, password: bytes | None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def check_crl_days(days: int) -> int:
    """``days`` if it is a usable CRL lifetime; a CRL valid for no time would lock every client out."""
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise PkiError("--crl-days must be a positive number of days")
    return days


def ca_passwords(file: str | None = None, prompt: bool = True) -> PasswordSource:
    """Where the CA keys' password comes from: ``file``, else :data:`CA_PASSWORD_ENV`, else a prompt."""
    return PasswordSource(file=file, env=CA_PASSWORD_ENV, prompt=prompt)


def _load_key(path: Path, passwords: PasswordSource, cache: list[bytes]) -> PrivateKey:
    """One CA key; ``cache`` keeps the password so root and intermediate ask for it once."""
    data = read_bytes(path)
    password = None
    if b"ENCRYPTED" in data:
        if not cache:
            given = passwords.given()  # a missing or empty password file fails here, with its own message
            if given is None:
                try:
                    given = passwords.obtain(f"the CA keys in {path.parent}")
                except KeystoreError:
                    # No password and no terminal. PasswordSource's hint names the keystore's flag;
                    # following it is how a user keystore once ended up with the CA's password.
                    raise PkiError(f"{path}: the CA key is password-protected: use --ca-password-file "
                                   f"or set {CA_PASSWORD_ENV}") from None
            cache.append(given)
        password = cache[0]
    try:
        return serialization.load_pem_private_key(data, password)  # type: ignore[return-value]
    except (ValueError, TypeError):
        raise PkiError(f"{path}: wrong password or unreadable CA key") from None


@dataclass
class CertificateAuthority:
    """A loaded CA directory; every change is written back atomically."""

    directory: Path
    root: x509.Certificate
    root_key: PrivateKey
    intermediate: x509.Certificate
    intermediate_key: PrivateKey
    org_unit: str
    index: list[dict[str, Any]]
    crl_days: int = CRL_DAYS

    # ----- creation and loading -------------------------------------------------------------
    @staticmethod
    def check_new(directory: str | os.PathLike[str], days: int = 3650, crl_days: int = CRL_DAYS) -> None:
        """Refuse what :meth:`init` would refuse, before anyone is asked for a password."""
        d = Path(directory)
        if (d / "root.crt").exists():
            raise PkiError(f"{d}: a CA already exists there")
        if days <= 0:
            raise PkiError("--days must be positive")
        check_crl_days(crl_days)

    @classmethod
    def init(cls, directory: str | os.PathLike[str], *, key_type: str = DEFAULT_KEY_TYPE,
             org_unit: str = DEFAULT_ORG_UNIT, days: int = 3650,
             passwords: PasswordSource = NO_PASSWORD, password: bytes | None = None,
             crl_days: int = CRL_DAYS) -> "CertificateAuthority":
        """A new CA in ``directory``; the keys are encrypted with ``password`` (else ``passwords.given()``).

        ``crl_days`` is kept in ``index.json`` so every later CRL (revoke, crl) has the same lifetime.
        """
        d = Path(directory)
        cls.check_new(d, days, crl_days)
        root_key = generate_key(key_type)
        inter_key = generate_key(key_type)
        root = make_root(root_key, org_unit=org_unit, days=days)
        inter = make_intermediate(inter_key, root, root_key, org_unit=org_unit, days=max(1, days // 2))
        try:
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        except OSError as exc:
            raise PkiError(f"{d}: cannot create CA directory ({exc.strerror})") from None
        if password is None:
            password = passwords.given()
        write_atomic(d / "root.key", _key_bytes(root_key, password), mode=0o600)
        write_atomic(d / "intermediate.key", _key_bytes(inter_key, password), mode=0o600)
        write_atomic(d / "root.crt", certs_to_pem([root]))
        write_atomic(d / "intermediate.crt", certs_to_pem([inter]))
        ca = cls(d, root, root_key, inter, inter_key, org_unit, [], crl_days)
        ca._save_index()
        ca.write_crl()
        return ca

    @classmethod
    def load(cls, directory: str | os.PathLike[str], passwords: PasswordSource = NO_PASSWORD) -> "CertificateAuthority":
        d = Path(directory)
        if not (d / "root.crt").is_file():
            raise PkiError(f"{d}: not a CA directory (no root.crt; create one with 'msg-pki init')")
        root = load_certificate_file(d / "root.crt")[0]
        inter = load_certificate_file(d / "intermediate.crt")[0]
        try:
            meta = json.loads(read_bytes(d / "index.json"))
            index = list(meta["issued"])
            org_unit = str(meta.get("org_unit", DEFAULT_ORG_UNIT))
            crl_days = check_crl_days(meta.get("crl_days", CRL_DAYS))  # CAs made before it was kept: 30
        except (ValueError, KeyError, TypeError, PkiError):
            raise PkiError(f"{d / 'index.json'}: corrupt CA index") from None
        cache: list[bytes] = []
        return cls(d, root, _load_key(d / "root.key", passwords, cache), inter,
                   _load_key(d / "intermediate.key", passwords, cache), org_unit, index, crl_days)

    def set_crl_days(self, days: int) -> None:
        """Change the CRL lifetime for this and every later CRL, and remember it in ``index.json``."""
        self.crl_days = check_crl_days(days)
        self._save_index()

    def _save_index(self) -> None:
        doc = {"org_unit": self.org_unit, "crl_days": self.crl_days, "issued": self.index}
        write_atomic(self.directory / "index.json", json.dumps(doc, indent=2).encode(), mode=0o600)

    # ----- issuance ---------------------------------------------------------------------------
    @property
    def chain(self) -> list[x509.Certificate]:
        """The chain a leaf carries: intermediate, then root."""
        return [self.intermediate, self.root]

    def active_entry(self, uid: str, cn: str | None = None) -> dict[str, Any] | None:
        """The valid (unrevoked, unexpired) certificate of ``uid``; with ``cn``, of that relay node."""
        now = _now().isoformat()
        return next((e for e in self.index if e["uid"] == uid and not e.get("revoked")
                     and e["not_after"] > now and (cn is None or e.get("cn", e["uid"]) == cn)), None)

    def issue(self, uid: str, *, cn: str | None = None, server: bool = False, dns_names: tuple[str, ...] = (),
              ip_addresses: tuple[str, ...] = (), key_type: str = DEFAULT_KEY_TYPE, days: int = 365,
              deliver: Callable[[Keystore], None] | None = None) -> Keystore:
        """A new key and leaf certificate for ``uid``; refuses a UID that is issued and not revoked.

        ``deliver`` (typically: write the keystore) runs before the certificate is recorded, so a
        failed delivery records nothing: otherwise the UID would stay blocked by a certificate nobody
        received until someone revoked it. If recording fails after a delivery, the PkiError says so
        and the caller must discard what it delivered.
        """
        if not is_valid_uid(uid):
            raise PkiError(f"invalid UID {uid!r}: 1-64 characters of letters, digits, _ . @ -")
        if server and uid != MSG_SERVER:
            raise PkiError(f"a server certificate must have UID {MSG_SERVER}")
        if not server and uid in RESERVED_UIDS:
            raise PkiError(f"UID {uid} is reserved")
        if days <= 0:
            raise PkiError("--days must be positive")
        if server and self.active_entry(uid, cn or uid):
            # Several relay nodes share the UID MSG_SERVER, one certificate each, told apart by CN.
            raise PkiError(f"relay node {cn or uid!r} already has a valid certificate: give another node "
                           "--cn NAME, or revoke it first")
        if not server and self.active_entry(uid):
            raise PkiError(f"UID {uid} already has a valid certificate; revoke it first")
        key = generate_key(key_type)
        request = LeafRequest(Subject(uid, cn or uid, self.org_unit), server=server, dns_names=tuple(dns_names),
                              ip_addresses=tuple(ip_addresses), days=days)
        try:
            cert = make_leaf(key.public_key(), request, self.intermediate, self.intermediate_key)
        except ValueError as exc:
            raise PkiError(f"cannot issue certificate: {exc}") from None
        store = Keystore(key=key, cert=cert, chain=self.chain)
        if deliver is not None:
            deliver(store)
        entry = {
            "serial": format(cert.serial_number, "x"), "uid": uid, "cn": cn or uid,
            "role": "server" if server else "client",
            "not_after": cert.not_valid_after_utc.isoformat(), "issued": _now().isoformat(),
        }
        self.index.append(entry)
        try:
            self._save_index()
        except PkiError as exc:
            self.index.remove(entry)
            raise PkiError(f"certificate for {uid} not recorded in the CA index: {exc}") from None
        return store

    # ----- revocation -------------------------------------------------------------------------
    def revoke(self, *, uid: str | None = None, serial: str | None = None, reason: str = "unspecified",
               when: dt.datetime | None = None) -> list[str]:
        """Mark matching certificates revoked as of ``when`` (an aware datetime; default now) and publish a
        new CRL; returns the serials revoked."""
        if reason not in REVOCATION_REASONS:
            raise PkiError(f"unknown reason {reason!r} (choose from {', '.join(REVOCATION_REASONS)})")
        want = serial.lower().removeprefix("0x").lstrip("0") if serial else None
        hits = [e for e in self.index if not e.get("revoked")
                and ((uid is not None and e["uid"] == uid) or (want is not None and e["serial"].lstrip("0") == want))]
        if not hits:
            what = f"UID {uid}" if uid else f"serial {serial}"
            raise PkiError(f"no unrevoked certificate with {what} in this CA")
        for e in hits:
            e["revoked"] = {"date": (when or _now()).isoformat(), "reason": reason}
        self._save_index()
        self.write_crl()
        return [e["serial"] for e in hits]

    def build_crls(self, days: int | None = None) -> list[x509.CertificateRevocationList]:
        """Fresh CRLs: the intermediate's (leaf revocations) and the root's (none so far).

        They expire after ``days`` (default: the CA's ``crl_days``); re-sign them before that.
        """
        days = check_crl_days(self.crl_days if days is None else days)
        now = _now()
        leaf_crl = x509.CertificateRevocationListBuilder().issuer_name(self.intermediate.subject)
        # RFC 5280 §5.2.3: a CRL number that only grows, so a client can tell a newer CRL from an older
        # one it is being fed; microseconds since the epoch need no counter kept anywhere.
        number = x509.CRLNumber(int(now.timestamp() * 1_000_000))
        leaf_crl = leaf_crl.last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=days))
        leaf_crl = leaf_crl.add_extension(number, critical=False)
        for e in self.index:
            if not e.get("revoked"):
                continue
            revoked = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(e["serial"], 16))
                .revocation_date(dt.datetime.fromisoformat(e["revoked"]["date"]))
                .add_extension(x509.CRLReason(REVOCATION_REASONS[e["revoked"]["reason"]]), critical=False)
                .build()
            )
            leaf_crl = leaf_crl.add_revoked_certificate(revoked)
        root_crl = (x509.CertificateRevocationListBuilder().issuer_name(self.root.subject)
                    .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=days))
                    .add_extension(number, critical=False))
        return [leaf_crl.sign(self.intermediate_key, certificate_hash(self.intermediate_key)),
                root_crl.sign(self.root_key, certificate_hash(self.root_key))]

    def write_crl(self, out: str | os.PathLike[str] | None = None, days: int | None = None) -> Path:
        """Sign fresh CRLs and write them to ``out`` (default: the CA's ``crl.pem``)."""
        path = Path(out) if out else self.directory / "crl.pem"
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.build_crls(days))
        write_atomic(path, pem)
        return path
