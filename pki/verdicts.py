"""Certificate verdicts worth keeping: the same inputs give the same verdict while its dates hold.

OpenSSL's answer for a certificate depends on the certificate, the untrusted pool it may build a path
from, the trust anchors, the CRLs, the role and OU asked for, and the time. Everything but the time is
part of a verdict's key; the time enters only through validity dates (of each certificate of the
verified chain, and of each CRL), so a positive verdict holds for every time inside those dates. Reusing
it there is not a shortcut: it is the answer OpenSSL gives. Outside them, or for anything not seen
before, validation runs in full. A refusal is never kept (it is rare, and always worked out afresh).

Three kinds:

- **now** verdicts (``validate(..., at=None)``, OpenSSL with the CRLs): the key includes the CRLs' digests,
  so a new CRL is a new key; one holds while the present lies within every certificate's notBefore ..
  notAfter of the chain and every CRL's thisUpdate .. nextUpdate.
- **path** facts (validation at a past time, a receipt's): the chain OpenSSL verified without CRLs. One is
  reused for a time within every chain certificate's validity; the revocation check at that time, against
  the policy's *current* CRLs, is made on every use (``TrustPolicy._check_revocation_at``).
- **CRL signatures**: that the CRL with this digest verifies under the certificate with that fingerprint.
  A signature that verified once verifies forever: such a fact never goes stale.

``to_doc``/``from_doc`` let a client keep them in its state directory (0600, as its keys), so a command
whose certificates were all seen before never loads pyOpenSSL. At most ``KEPT`` of each kind are kept,
the oldest dropped first.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from cryptography import x509

from .errors import ValidationError
from .identity import Identity, cert_fingerprint

if TYPE_CHECKING:
    from .validation import Role, TrustPolicy

KEPT = 512  # verdicts of each kind kept across commands
_MEMO = 4096  # parsed certificates and fingerprints kept within one process


def _key(*parts: bytes | str) -> str:
    """An unambiguous digest of the inputs (each part length-prefixed)."""
    h = hashlib.sha256(b"msg-relay/verdict/v1")
    for p in parts:
        raw = p.encode() if isinstance(p, str) else p
        h.update(struct.pack(">I", len(raw)) + raw)
    return h.hexdigest()


def _ts(t: dt.datetime) -> float:
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


_END_OF_TIME = dt.datetime.max.replace(tzinfo=dt.timezone.utc)


class Span(NamedTuple):
    """Times (POSIX seconds, ``start <= t < end``) for which a path verdict stands as it is (Verdicts.span)."""

    start: float
    end: float

    def covers(self, at: dt.datetime) -> bool:
        return self.start <= _ts(at) < self.end


class Verdicts:
    """Positive validation verdicts by their inputs, with the dates that bound them (see the module)."""

    def __init__(self, doc: object = None) -> None:
        self.now: dict[str, dict[str, Any]] = {}
        self.paths: dict[str, dict[str, Any]] = {}
        self.crl_signatures: dict[str, dict[str, Any]] = {}
        self.changed = False
        if isinstance(doc, dict):
            for kind in ("now", "paths", "crl_signatures"):
                held = doc.get(kind)
                if isinstance(held, dict):
                    getattr(self, kind).update({k: v for k, v in held.items() if isinstance(v, dict)})
        self._fps: dict[int, tuple[object, bytes]] = {}
        self._certs: dict[bytes, x509.Certificate] = {}
        self._keys: dict[tuple[object, ...], tuple[tuple[object, ...], str]] = {}
        self._chain_memo: dict[str, list[x509.Certificate]] = {}

    def to_doc(self) -> dict[str, Any]:
        return {"now": self.now, "paths": self.paths, "crl_signatures": self.crl_signatures}

    # ------------------------------------------------------------------ memos within one process
    def fingerprint(self, obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
        """SHA-256 of a certificate's (or CRL's) DER, once per object: re-encoding a 10 000-entry CRL
        costs 6 ms. Kept by id with the object itself, so an id is never taken for another object's."""
        held = self._fps.get(id(obj))
        if held is not None and held[0] is obj:
            return held[1]
        if isinstance(obj, x509.Certificate):
            fp = cert_fingerprint(obj)
        else:
            from cryptography.hazmat.primitives.serialization import Encoding

            fp = hashlib.sha256(obj.public_bytes(Encoding.DER)).digest()
        if len(self._fps) >= _MEMO:
            self._fps.clear()
        self._fps[id(obj)] = (obj, fp)
        return fp

    def note(self, crl: x509.CertificateRevocationList, digest: bytes) -> None:
        """Tell the SHA-256 of the DER ``crl`` was parsed from (whoever read the bytes has it for free)."""
        if len(self._fps) >= _MEMO:
            self._fps.clear()
        self._fps[id(crl)] = (crl, digest)

    def crl_signed(self, crl: x509.CertificateRevocationList, issuer: x509.Certificate,
                   verify: "Callable[[], bool]") -> bool:
        """Whether ``crl`` is signed by ``issuer``: ``verify()`` the first time, a kept fact after (a
        signature that verified once verifies forever; a failure is not kept, it is checked again)."""
        key = _key("crl-signature", self.fingerprint(crl), self.fingerprint(issuer))
        if key in self.crl_signatures:
            return True
        if not verify():
            return False
        self._put(self.crl_signatures, key, {})
        return True

    def certificate(self, der: bytes) -> x509.Certificate:
        """``der`` parsed, once per distinct certificate (ValueError if it does not parse)."""
        cert = self._certs.get(der)
        if cert is None:
            cert = x509.load_der_x509_certificate(der)
            if len(self._certs) >= _MEMO:
                self._certs.clear()
            self._certs[der] = cert
        return cert

    # ------------------------------------------------------------------ validation
    def validate(self, policy: "TrustPolicy", cert: x509.Certificate, untrusted: Sequence[x509.Certificate],
                 role: "Role", at: dt.datetime | None) -> Identity:
        """``policy.validate`` with the verdicts kept here: the same answer, worked out only when needed."""
        key = self._inputs_key(policy, cert, untrusted, role, at is None)
        if at is None:
            return self._now(policy, cert, untrusted, role, key)
        return self._at(policy, cert, untrusted, role, at, key)

    def span(self, policy: "TrustPolicy", cert: x509.Certificate, untrusted: Sequence[x509.Certificate],
             role: "Role", at: dt.datetime) -> Span | None:
        """After ``validate(..., at)`` accepted: the times for which the same inputs give the same answer
        with nothing left to check, so a caller validating them again and again (a queue, one line per
        message of a sender) may compare a time instead. None when there is no such span.

        The span is the kept path's dates (every chain certificate valid), and only when the policy's CRLs
        revoke the chain at no time at all: the revocation check at a time is monotone (a revocation counts
        from its date on; a compromise, or a CRL missing, counts whatever the time), so a chain that passes
        it at the end of time passes it at every time. A chain those CRLs revoke at any date gets no span:
        each of its times is checked in full, as before."""
        key = self._inputs_key(policy, cert, untrusted, role, False)
        held = self.paths.get(key)
        if held is None or not _holds(held, _ts(at)):
            return None
        chain = self._chain_memo.get(key) or self._chain(held.get("chain"), cert, untrusted, policy.anchors)
        if chain is None:
            return None
        if policy.crls:
            try:
                policy._check_revocation_at(chain, _END_OF_TIME)
            except ValidationError:
                return None
        return Span(held["from"], held["until"])

    def _inputs_key(self, policy: "TrustPolicy", cert: x509.Certificate, untrusted: Sequence[x509.Certificate],
                    role: "Role", now: bool) -> str:
        """The key of a verdict's inputs (the CRLs among them for a verdict of now)."""
        # Worked out once per set of objects within this process (a queue validates the same sender's
        # certificate for each of its lines); the objects are held, so their ids stay theirs.
        objects = (policy, cert, *untrusted)
        ids = (now, role, *map(id, objects))
        held = self._keys.get(ids)
        if held is None or any(a is not b for a, b in zip(held[0], objects, strict=True)):
            pool = sorted(self.fingerprint(c) for c in untrusted)
            anchors = sorted(self.fingerprint(a) for a in policy.anchors)
            inputs = [self.fingerprint(cert), *pool, b"|", *anchors, b"|", role, "\0no OU check" if policy.org_unit is None else policy.org_unit]
            if now:
                inputs += [b"|", *sorted(self.fingerprint(c) for c in policy.crls)]
            if len(self._keys) >= _MEMO:
                self._keys.clear()
            held = self._keys[ids] = (objects, _key("now" if now else "path", *inputs))
        return held[1]

    def _now(self, policy: "TrustPolicy", cert: x509.Certificate, untrusted: Sequence[x509.Certificate],
             role: "Role", key: str) -> Identity:
        now = dt.datetime.now(dt.timezone.utc).timestamp()
        held = self.now.get(key)
        if held is not None and _holds(held, now):
            return Identity(uid=held["uid"], cn=held.get("cn"))
        identity, chain = policy.validated(cert, untrusted, role, None)
        start = max([_ts(c.not_valid_before_utc) for c in chain] + [_ts(c.last_update_utc) for c in policy.crls])
        end = min([_ts(c.not_valid_after_utc) for c in chain]
                  + [_ts(c.next_update_utc) for c in policy.crls if c.next_update_utc is not None])
        self._put(self.now, key, {"from": start, "until": end, "uid": identity.uid, "cn": identity.cn})
        return identity

    def _at(self, policy: "TrustPolicy", cert: x509.Certificate, untrusted: Sequence[x509.Certificate],
            role: "Role", at: dt.datetime, key: str) -> Identity:
        when = _ts(at)
        held = self.paths.get(key)
        if held is not None and _holds(held, when):
            chain = self._chain_memo.get(key)  # certificates named by these fingerprints: any copy will do
            if chain is None:
                chain = self._chain(held.get("chain"), cert, untrusted, policy.anchors)
                if chain is not None:
                    if len(self._chain_memo) >= _MEMO:
                        self._chain_memo.clear()
                    self._chain_memo[key] = chain
            if chain is not None:
                if policy.crls:
                    policy._check_revocation_at(chain, at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc))
                return Identity(uid=held["uid"], cn=held.get("cn"))
        identity, chain = policy.validated(cert, untrusted, role, at)
        self._put(self.paths, key, {"from": max(_ts(c.not_valid_before_utc) for c in chain),
                                    "until": min(_ts(c.not_valid_after_utc) for c in chain),
                                    "chain": [self.fingerprint(c).hex() for c in chain],
                                    "uid": identity.uid, "cn": identity.cn})
        return identity

    def _chain(self, fps: object, cert: x509.Certificate, untrusted: Sequence[x509.Certificate],
               anchors: Sequence[x509.Certificate]) -> list[x509.Certificate] | None:
        """The kept chain's certificates, from those at hand (None if one is missing: validate afresh)."""
        if not isinstance(fps, list) or not fps:
            return None
        at_hand = {self.fingerprint(c).hex(): c for c in (*anchors, *untrusted, cert)}
        chain = [at_hand.get(fp) for fp in fps if isinstance(fp, str)]
        if len(chain) != len(fps) or any(c is None for c in chain) or chain[0] is not cert:
            return None
        return chain  # type: ignore[return-value]

    def _put(self, kind: dict[str, dict[str, Any]], key: str, verdict: dict[str, Any]) -> None:
        kind.pop(key, None)
        kind[key] = verdict
        while len(kind) > KEPT:
            kind.pop(next(iter(kind)))
        self.changed = True


def _holds(verdict: dict[str, Any], when: float) -> bool:
    """Whether ``when`` lies within the dates the verdict depended on (a malformed one never holds)."""
    start, end = verdict.get("from"), verdict.get("until")
    return isinstance(start, (int, float)) and isinstance(end, (int, float)) and isinstance(verdict.get("uid"), str) \
        and start <= when < end
