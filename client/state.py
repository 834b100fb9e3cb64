"""The client's local state, per UID: seen message ids, kept receipts and (later) encryption keys.

Default location ``$XDG_DATA_HOME/msg-relay/<UID>`` (``~/.local/share/...``), directory 0700, files
0600, every write atomic. The seen-ids list is what makes a replayed message detectable.

It also keeps what a command verified and the next need not verify again, each with the rule that
makes it stale (README, "What the client caches and when it is stale"): certificate verdicts
(``verdicts.json``, see pki.verdicts), certificate chains by fingerprint (``certificates.json``), the
fact that the relay holds our key record (``published.json``) and queue subjects whose signatures
verified (``subjects.json``). These are caches: one that cannot be read is started afresh, never trusted
in part; the files that are not caches (keys, seen ids, key records seen) are refused when corrupt.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pki.errors import MsgRelayError, PkiError
from pki.files import read_bytes, write_atomic
from pki.identity import cert_fingerprint
from protocol.fields import Fields
from protocol.receipts import Receipt

from .log import log

if TYPE_CHECKING:
    from pki.verdicts import Verdicts
    from protocol.messages import QueueEntry


# How long the fact "the relay holds our current key record" is taken without asking the relay again.
# A relay that lost the record (a database restored from a backup) gets it back within this time.
PUBLISHED_TTL = dt.timedelta(hours=1)
CHAINS_KEPT = 256  # certificate chains kept by fingerprint (senders, the relay's earlier certificates)
SUBJECTS_KEPT = 200_000  # verified queue subjects held by one command (twice the longest queue listed)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_MICROSECOND = dt.timedelta(microseconds=1)
# SubjectFacts.key: six netstrings, three numbers, five lengths (the byte fields follow the text).
_FACT_HEAD = "msg-relay/subject-fact/v2\0" + "%d:%s," * 6 + "%d,%d,%d|%d,%d,%d,%d,%d|"
_VERDICTS, _CHAINS, _PUBLISHED, _SUBJECTS = "verdicts.json", "certificates.json", "published.json", "subjects.json"


class StateError(MsgRelayError):
    """The state directory cannot be used."""


def default_state_dir(uid: str, anchor_fingerprint: bytes) -> Path:
    """``$XDG_DATA_HOME/msg-relay/<UID>-<CA>``: the same UID under two CAs (the course keystores and the
    demo ones both have ``MSG_CLI1``) gets two state directories, never one shared."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    root = Path(base) / "msg-relay"
    new = root / f"{uid}-{anchor_fingerprint.hex()[:12]}"
    legacy = root / uid  # the first wave's layout: adopted by the first CA that finds it unclaimed
    if not new.exists() and (legacy / "keys.json").exists() and not (legacy / _IDENTITY).exists():
        try:
            legacy.rename(new)
        except OSError:
            pass  # left where it is: the new directory starts afresh
    return new


_IDENTITY = "identity.json"


class ClientState:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
        except OSError as exc:
            raise StateError(f"{self.dir}: cannot use state directory ({exc.strerror})") from None
        self._verdicts: Verdicts | None = None
        self._cache_key: bytes | None = None
        self._subjects: SubjectFacts | None = None
        self._chains: dict[str, list[str]] | None = None
        self._chains_changed = False

    def _load(self, name: str, default: Any) -> Any:
        path = self.dir / name
        if not path.exists():
            return default
        try:
            return json.loads(read_bytes(path))
        except (PkiError, ValueError):
            raise StateError(f"{path}: corrupt state file (move it away to start afresh)") from None

    def _save(self, name: str, value: Any) -> None:
        try:
            write_atomic(self.dir / name, json.dumps(value, indent=1, sort_keys=True).encode(), mode=0o600)
        except PkiError as exc:
            raise StateError(str(exc)) from None

    def bind(self, uid: str, anchor_fingerprint: bytes) -> None:
        """Tie the directory to one UID under one CA: keys and seen-lists of another identity that
        happens to share the UID must never be used or overwritten here."""
        want = {"uid": uid, "ca": anchor_fingerprint.hex()}
        held = self._load(_IDENTITY, None)
        if held is None:
            self._save(_IDENTITY, want)
        elif held != want:
            raise StateError(f"{self.dir} holds the state of {held.get('uid')} under another CA "
                             f"({str(held.get('ca'))[:12]}): give this keystore its own --state-dir")

    # ----- what we saw of others' key records -----------------------------------------------------
    def key_record_seen(self, uid: str, created: str) -> str | None:
        """Remember the newest key record ``created`` of ``uid``; return the newer one we saw before, if
        any (the relay serving an older record than we already saw is rolling a key back)."""
        seen: dict[str, str] = self._load("key_records.json", {})
        held = seen.get(uid)
        if held is not None and held > created:
            return held
        if held != created:
            seen[uid] = created
            self._save("key_records.json", seen)
        return None

    # ----- replay protection -------------------------------------------------------------------
    def check_and_remember(self, sender: str, msg_id: str, num: int, digest: bytes) -> bool:
        """True for a first sighting, or a re-read of the very same stored message; False for a replay
        (the same sender's msg_id arriving again under another queue number or with other bytes)."""
        seen: dict[str, Any] = self._load("seen.json", {})
        key = f"{sender}/{msg_id}"
        entry = {"num": num, "digest": digest.hex()}
        if key in seen:
            return bool(seen[key] == entry)
        seen[key] = entry
        self._save("seen.json", seen)
        return True

    # ----- receipts ------------------------------------------------------------------------------
    def add_receipt(self, receipt: Receipt) -> None:
        receipts = self._load("receipts.json", [])
        receipts.append(receipt.to_wire())
        self._save("receipts.json", receipts)

    def receipts(self) -> list[Receipt]:
        return [Receipt.from_wire(Fields(r)) for r in self._load("receipts.json", [])]

    # ----- generic documents (encryption keys) -------------------------------------------------
    def load_doc(self, name: str, default: Any) -> Any:
        return self._load(name, default)

    def save_doc(self, name: str, value: Any) -> None:
        self._save(name, value)

    # ----- caches: what was verified once and need not be again (each with its staleness rule) --------
    def authenticate_caches(self, private_key: Any) -> None:
        """Key the cache files' MACs to the keystore's private key (see :func:`cache_key`). Until this is
        called, no cache file is read or written: a verdict kept here stands in for a signature check."""
        self._cache_key = cache_key(private_key)

    def _load_cache(self, name: str, default: Any) -> Any:
        """A cache file, or ``default`` when it is missing, unreadable or not authenticated by our key: a
        cache is started afresh, not refused, and rewritten on the next save. Its MAC matters because the
        facts are trusted as they stand (a kept verdict says a certificate chained to our CA): whoever
        could write to the state directory but not use the keystore must not be able to plant one."""
        if self._cache_key is None:
            return default
        try:
            raw = read_bytes(self.dir / name) if (self.dir / name).exists() else b""
        except PkiError as exc:
            log.debug("%s: started afresh", exc)
            return default
        mac, _, body = raw.partition(b"\n")
        if not raw or not hmac.compare_digest(mac, _mac(self._cache_key, name, body)):
            if raw:
                log.debug("%s: not authenticated by this keystore: started afresh", self.dir / name)
            return default
        try:
            value = json.loads(body)
        except ValueError:
            return default
        return value if isinstance(value, type(default)) else default

    def _save_cache(self, name: str, value: Any) -> None:
        if self._cache_key is None:
            return
        body = json.dumps(value, separators=(",", ":")).encode()
        try:
            write_atomic(self.dir / name, _mac(self._cache_key, name, body) + b"\n" + body, mode=0o600)
        except PkiError as exc:
            raise StateError(str(exc)) from None

    def verdicts(self) -> "Verdicts":
        """The certificate verdicts kept here (pki.verdicts: each holds only within the dates it depended
        on, and a new CRL is a new key); loaded once per command."""
        if self._verdicts is None:
            from pki.verdicts import Verdicts

            self._verdicts = Verdicts(self._load_cache(_VERDICTS, {}))
        return self._verdicts

    def save_caches(self) -> None:
        """Write the verdicts and chains this command added, if any: once per operation (a listing of
        many senders, a send), not once per certificate validated."""
        if self._verdicts is not None and self._verdicts.changed:
            self._save_cache(_VERDICTS, self._verdicts.to_doc())
            self._verdicts.changed = False
        if self._chains is not None and self._chains_changed:
            self._save_cache(_CHAINS, self._chains)
            self._chains_changed = False

    def known_chain(self, uid: str, fingerprint: bytes) -> list[bytes] | None:
        """The certificate chain (DER, leaf first) the directory gave for ``uid``'s certificate with this
        SHA-256 fingerprint, if kept. Never stale: the leaf is named by its own digest, and whoever uses the
        chain validates it again (at the time, with the CRLs of the moment)."""
        if self._chains is None:
            self._chains = self._load_cache(_CHAINS, {})
        held = self._chains.get(f"{uid}/{fingerprint.hex()}")
        if not isinstance(held, list) or not held:
            return None
        try:
            chain = [base64.b64decode(c, validate=True) for c in held]
        except (TypeError, ValueError):
            return None
        return chain if cert_fingerprint(chain[0]) == fingerprint else None

    def remember_chain(self, uid: str, fingerprint: bytes, chain: list[bytes]) -> None:
        if self._chains is None:
            self._chains = self._load_cache(_CHAINS, {})
        key = f"{uid}/{fingerprint.hex()}"
        if key in self._chains:
            return
        self._chains[key] = [base64.b64encode(c).decode() for c in chain]
        while len(self._chains) > CHAINS_KEPT:
            self._chains.pop(next(iter(self._chains)))
        self._chains_changed = True  # written by save_caches

    def published_fresh(self, relay: str, cert: bytes, record: bytes, signature: bytes,
                        now: dt.datetime | None = None) -> bool:
        """Whether the relay ``relay`` was found holding exactly this key record and signature, made under
        our certificate ``cert`` (fingerprint), less than PUBLISHED_TTL ago. Stale on any change of key,
        record, signature, certificate or relay, and after the TTL (the relay may have lost it since)."""
        fact = self._load_cache(_PUBLISHED, {})
        checked = fact.get("checked")
        if fact.get("what") != _published_what(relay, cert, record, signature) or not isinstance(checked, (int, float)):
            return False
        age = (now or dt.datetime.now(dt.timezone.utc)).timestamp() - checked
        return 0 <= age < PUBLISHED_TTL.total_seconds()

    def remember_published(self, relay: str, cert: bytes, record: bytes, signature: bytes) -> None:
        """The relay holds this record now (we published it, or found it there)."""
        self._save_cache(_PUBLISHED, {"what": _published_what(relay, cert, record, signature),
                                      "checked": dt.datetime.now(dt.timezone.utc).timestamp()})

    def subjects(self) -> "SubjectFacts":
        """Queue subjects verified before (see SubjectFacts); loaded once per command."""
        if self._subjects is None:
            self._subjects = SubjectFacts(self, self._load_cache(_SUBJECTS, {}))
        return self._subjects


def cache_key(private_key: Any) -> bytes:
    """The key that authenticates this user's cache files: HKDF-SHA256 of the keystore's private key
    (PKCS#8), so only the holder of the keystore can write a fact the client will believe."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    secret = private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"msg-relay/state-caches/v1").derive(secret)


def _mac(key: bytes, name: str, body: bytes) -> bytes:
    """Hex HMAC-SHA256 of one cache file's body, bound to the file's name (a file moved under another
    name does not verify)."""
    return hmac.new(key, name.encode() + b"\0" + body, hashlib.sha256).hexdigest().encode()


def _published_what(relay: str, cert: bytes, record: bytes, signature: bytes) -> str:
    return hashlib.sha256(b"\0".join([relay.encode(), cert, hashlib.sha256(record).digest(),
                                      hashlib.sha256(signature).digest()])).hexdigest()


class SubjectFacts:
    """Subjects of queue entries whose receipt signature and sender's subject signature verified.

    A signature that verified once verifies forever, and opening a sealed header gives the same subject
    every time, so the key is a digest of everything those two checks read: the reader, the entry's
    sender, msg_id, version and header bytes, the receipt's signed bytes and signature (which name the
    relay certificate that signed it) and the fingerprint of the sender's certificate. What may change
    is not cached and is checked on every use: the relay certificate and the sender's certificate valid
    at the receipt's time against the current CRLs (a sender revoked since shows as unverifiable), and
    the receipt matching the entry. Only the facts of entries in the latest queue are kept."""

    def __init__(self, state: ClientState, doc: dict[str, Any]) -> None:
        self.state = state
        held = doc.get("facts")
        self._facts: dict[str, str] = {k: v for k, v in held.items() if isinstance(v, str)} \
            if isinstance(held, dict) else {}
        self._used: set[str] = set()
        self._changed = False

    @staticmethod
    def key(reader: str, entry: "QueueEntry") -> str:
        """The digest of what the two kept checks read. The receipt enters by the fields its signed bytes
        are made of (its time as whole microseconds, as the signed text has it), not by those bytes:
        formatting the time costs more than the rest together.

        Made for every line of a listing, so in one formatting and three hash updates: the text fields as
        netstrings (length, colon, text), the numbers in decimal, the byte fields' lengths, then those bytes
        in a fixed order; unambiguous whatever the fields hold."""
        r = entry.receipt
        micros = (r.server_time - _EPOCH) // _MICROSECOND
        s, m, rm, rs, rr = entry.sender, entry.msg_id, r.msg_id, r.sender, r.recipient
        head = _FACT_HEAD % (len(reader), reader, len(s), s, len(m), m, len(rm), rm, len(rs), rs, len(rr), rr,
                             entry.envelope_version, micros, r.queue_number, len(entry.header), len(r.digest),
                             len(r.signer), len(r.signature), len(entry.sender_cert))
        h = hashlib.sha256(head.encode())
        h.update(entry.header)
        h.update(r.digest + r.signer + r.signature + entry.sender_cert)
        return h.hexdigest()

    def get(self, key: str) -> str | None:
        self._used.add(key)
        return self._facts.get(key)

    def put(self, key: str, subject: str) -> None:
        if len(self._used) >= SUBJECTS_KEPT:
            return  # a watch that runs for months, or a relay re-listing entries: the cache stops growing
        self._used.add(key)
        if self._facts.get(key) != subject:
            self._facts[key] = subject
            self._changed = True

    def save(self) -> None:
        """Keep the facts of the entries used by this command only (the queue just listed), if anything changed."""
        kept = {k: v for k, v in self._facts.items() if k in self._used}
        if self._changed or len(kept) != len(self._facts):
            self._facts = kept
            self.state._save_cache(_SUBJECTS, {"facts": kept})
            self._changed = False
