"""The relay server: loads its identity and trust, listens, and runs one Session per connection."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pki.errors import KeystoreError, PkiError, ValidationError
from pki.files import (
    load_certificate_file,
    load_certificates,
    load_crl_file,
    read_bytes,
)
from pki.identity import MSG_SERVER, cert_fingerprint
from pki.keys import max_signature_size
from pki.keystore import load_keystore, open_keystore
from pki.tls import server_context
from pki.validation import TrustPolicy, check_profile, trusted_crl
from protocol.crls import crl_number, issuer_id
from protocol.crls import describe as describe_crl
from protocol.encoding import utc_now

from .audit import AuditLog
from .config import ServerConfig
from .handlers import Handlers, PublishedCrls, UserRegistry
from .limits import connection_capacity
from .peer_cache import ProfileCache
from .session import Session
from .store import AsyncStore, is_shared, open_backend
from .tls_alerts import install as install_tls_alert_fix
from .tls_buffers import install as install_tls_buffers
from .watchers import Watchers

log = logging.getLogger("msg_relay.server")


@runtime_checkable
class SharedCrls(Protocol):
    """A store several nodes share keeps the newest CRL of each CA (``server.pgstore``)."""

    async def put_crl(self, issuer: bytes, number: int, der: bytes) -> bool: ...
    async def get_crls(self) -> list[Any]: ...


def newest_per_issuer(crls: list[x509.CertificateRevocationList]) -> list[x509.CertificateRevocationList]:
    """One CRL per issuer, the highest numbered: a CRL file and a database may each hold one."""
    best: dict[bytes, x509.CertificateRevocationList] = {}
    for crl in crls:
        key = issuer_id(crl.issuer)
        if key not in best or crl_number(crl) > crl_number(best[key]):
            best[key] = crl
    return list(best.values())
CRL_WARN_EVERY = 3600.0  # seconds between warnings that the CRL is about to expire


class RelayServer:
    """``await start()``, then ``port`` is bound; ``await close()`` stops gracefully."""

    def __init__(self, config: ServerConfig, audit: AuditLog | None = None,
                 clock: Callable[[], dt.datetime] = utc_now) -> None:
        install_tls_alert_fix()  # refused clients get the TLS alert, not a bare EOF (gh-98078)
        install_tls_buffers()  # 16 KiB instead of 256 KiB of read buffer per TLS connection
        self.config = config
        self.audit = audit or AuditLog(config.log_file)
        self.keystore = load_keystore(config.p12, config.passwords)
        check_profile(self.keystore.cert, "server", config.org_unit)
        anchors = load_certificate_file(config.ca) if config.ca else self.keystore.ca_certificates()
        if not anchors:
            raise PkiError(f"{config.p12} bundles no CA certificate: give --ca ROOT.pem")
        self.anchors = anchors
        self.clock = clock
        if not config.crl and not config.no_crl:
            raise PkiError("no CRL configured: give --crl FILE (the CA's crl.pem), or --no-crl to run without "
                           "revocation checks")
        # Why every client is refused (the CRL expired, the relay's own certificate was revoked), or None.
        self.refusing: str | None = None
        self.crls: list[x509.CertificateRevocationList] = []  # the newest of each CA: file and database merged
        self._crl_stamp = self._crl_file_stamp()
        self._crl_warned: float | None = None
        self._load_trust(starting=True)
        self._crl_task: asyncio.Task[None] | None = None
        self.stopping = False
        self._server: asyncio.base_events.Server | None = None
        self._sessions: dict[asyncio.Task[None], Session] = {}
        # Connections still in their TLS handshake, oldest first: a flood of them evicts the oldest
        # instead of locking out everyone else (slowloris); authenticated ones are capped per UID.
        self._handshaking: dict[asyncio.Task[None], Session] = {}
        self._per_user: dict[str, int] = {}
        self.watchers = Watchers()  # subscribed sessions, told of each message stored for their user

    def _load_trust(self, starting: bool = False) -> None:
        """(Re)read the CRL and build the TLS context and validation policy from it.

        A CRL past its nextUpdate makes OpenSSL refuse every handshake with a misleading "certificate
        expired". At start that is refused with the reason; on a running relay the TLS layer goes on
        checking chains only and every client is refused after the handshake with "CRL expired", so the
        relay still fails closed but says why."""
        crls = load_crl_file(self.config.crl) if self.config.crl else []  # (a file without one is refused there)
        self._apply_crls(newest_per_issuer([*crls, *self.crls]), starting)

    def _apply_crls(self, crls: list[x509.CertificateRevocationList], starting: bool = False) -> None:
        now = self.clock()
        stale = [c for c in crls if c.next_update_utc is not None and c.next_update_utc <= now]
        expired = None
        if stale:
            expired = (f"CRL expired at {stale[0].next_update_utc:%Y-%m-%d %H:%M}Z: the relay cannot check "
                       "revocation until the CA publishes a fresh one (msg-pki crl)")
            if starting:
                raise PkiError(f"{self.config.crl}: {expired}")
        policy = TrustPolicy(self.anchors, [] if expired else crls, self.config.org_unit)
        try:
            # A certificate our own clients would reject (expired, revoked ...): refused at start; on a
            # running relay the new CRL still applies, and every client is refused with the reason.
            policy.validate(self.keystore.cert, self.keystore.chain, role="server", at=now)
        except ValidationError as exc:
            if starting:
                raise
            expired = f"the relay's own certificate is no longer valid ({exc}): it serves no one until renewed"
        self.ssl_context = server_context(self.keystore, self.anchors, [] if expired else crls)
        self.policy = policy
        if expired and not self.refusing:
            self.audit.event("crl_expired", reason=expired)
            self.refusing = expired
            self._close_all(expired)
        self.refusing = expired
        self.crls = crls
        self.published_crls = PublishedCrls.of(crls)  # served as the CA signed them, even when stale

    def _crl_file_stamp(self) -> tuple[int, int] | None:
        if not self.config.crl:
            return None
        try:
            st = os.stat(self.config.crl)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def reload_crl(self, reason: str = "signal") -> bool:
        """Use the CA's newest CRL for connections from now on (SIGHUP, the file changed, or it expired)."""
        try:
            self._load_trust()
        except PkiError as exc:
            self.audit.event("crl_reload_failed", reason=str(exc))
            return False
        self._crl_stamp = self._crl_file_stamp()
        self._crls_changed(reason)
        return True

    def _crls_changed(self, trigger: str) -> None:
        """New CRLs are in force: serve them, say so, and close what they revoke."""
        self.handlers.crls = self.published_crls
        self.audit.event("crl_reloaded", trigger=trigger, crls=len(self.policy.crls))
        self._drop_revoked()

    def recheck(self, cert: x509.Certificate) -> None:
        """ValidationError unless ``cert`` is still valid under the current CRLs (the relay's TrustPolicy:
        the same rule as a new connection's, no second copy of the revocation check)."""
        self.policy.validate(cert, self.keystore.intermediates(), role="client", at=self.clock())

    def _drop_revoked(self) -> None:
        """Close the connections whose certificate the new CRL revokes: a revocation takes effect at once.

        Each distinct certificate is checked once (a reload must not stall the loop for every
        connection). A certificate whose intermediate the relay does not hold (the client sent it in the
        handshake) cannot be re-validated here and is left to the handshake's verdict."""
        verdicts: dict[bytes, ValidationError | None] = {}
        for session in list(self._sessions.values()):
            if session.peer is None:
                continue
            fingerprint = session.peer.fingerprint
            if fingerprint not in verdicts:
                try:
                    self.recheck(session.peer.cert)
                    verdicts[fingerprint] = None
                except ValidationError as exc:
                    verdicts[fingerprint] = None if exc.reason == "unknown_issuer" else exc
            failure = verdicts[fingerprint]
            if failure is not None:
                self.audit.event("connection_closed", peer=session.addr, uid=session.peer.uid,
                                 reason=f"certificate no longer valid: {failure}")
                session.abort()

    def _close_all(self, reason: str) -> None:
        """Fail closed for the connections already open too (an expired CRL checks no one)."""
        for session in list(getattr(self, "_sessions", {}).values()):
            if session.peer is not None:
                self.audit.event("connection_closed", peer=session.addr, uid=session.peer.uid, reason=reason)
                session.abort()

    def check_crl(self) -> None:
        """One tick of the CRL watch: reload a changed file, notice expiry, warn ahead of it."""
        if not self.config.crl:
            return
        stamp = self._crl_file_stamp()
        if stamp is not None and stamp != self._crl_stamp:
            self.reload_crl("file changed")
        elif self.refusing is None and (next_update := self._next_update()) and next_update <= self.clock():
            self.reload_crl("expired")
        self._warn_crl_expiry()

    def _next_update(self) -> dt.datetime | None:
        dates = [c.next_update_utc for c in self.policy.crls if c.next_update_utc is not None]
        return min(dates) if dates else None

    def _warn_crl_expiry(self) -> None:
        """Within ``crl_warn_days`` of the CRL's nextUpdate: warn now and then every hour, since once it
        passes, the relay refuses every client."""
        next_update = self._next_update()
        if next_update is None or next_update - self.clock() > dt.timedelta(days=self.config.crl_warn_days):
            return
        now = time.monotonic()
        if self._crl_warned is not None and now - self._crl_warned < CRL_WARN_EVERY:
            return
        self._crl_warned = now
        message = (f"the CRL expires at {next_update:%Y-%m-%d %H:%M}Z: re-sign it before then "
                   "(msg-pki crl), or the relay will refuse every client")
        log.warning(message)
        self.audit.event("crl_expiring", next_update=next_update.isoformat(), reason=message)

    async def _watch_crl(self) -> None:
        """The CA rewrites crl.pem when it revokes: notice within ``crl_check_interval`` seconds, whether
        or not anyone connects, and close the revoked users' open connections."""
        while True:
            await asyncio.sleep(self.config.crl_check_interval)
            try:
                self.check_crl()
                await self.share_crls()
            except Exception:  # noqa: BLE001 - the watch must outlive one bad tick; the next one retries
                log.exception("CRL check failed")

    async def share_crls(self) -> None:
        """Several nodes on one database: each puts the CRLs it holds there, and takes any newer one
        another node put (after checking it is signed by our CA): a revocation known to one node acts
        on all within one tick."""
        backend = self.store.backend
        if not isinstance(backend, SharedCrls):
            return
        for crl in self.crls:
            info, der = describe_crl(crl)
            await backend.put_crl(info.issuer, info.number, der)
        held = {issuer_id(c.issuer): crl_number(c) for c in self.crls}
        newer = [x509.load_der_x509_crl(stored.der) for stored in await backend.get_crls()
                 if stored.number > held.get(stored.issuer, -1)]
        newer = [c for c in newer if trusted_crl(c, self.anchors, self.keystore.intermediates())]
        if not newer:
            return
        try:
            self._apply_crls(newest_per_issuer([*self.crls, *newer]))
        except PkiError as exc:
            self.audit.event("crl_reload_failed", reason=str(exc))
            return
        self._crls_changed("another node")

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Open the store (SQLite, or PostgreSQL for ``--db postgresql://…``), enroll, listen."""
        self._fit_connections()  # before anything is opened: a limit it cannot hold refuses to start
        self.profiles = ProfileCache()  # client certificates whose profile checked out, by DER
        server_key = self.keystore.key
        server_der = self.keystore.cert.public_bytes(Encoding.DER)
        signer = cert_fingerprint(server_der)
        self.store = AsyncStore(await open_backend(self.config.db),
                                lambda receipt: receipt.signed_by(server_key, signer))
        # Clients verify old receipts after the relay's certificate is renewed, and every node's receipts
        # in a cluster: keep every certificate the relay signs with, findable by fingerprint.
        await self.store.backend.add_certificate(MSG_SERVER, server_der)
        self.store.on_stored = self.watchers.notify  # this node's commits, at once
        listen = getattr(self.store.backend, "listen", None)
        if listen is not None:  # a shared database: other nodes' commits too (PostgreSQL NOTIFY)
            listen(self.watchers.notify, self._resync_watchers)
        self.users = UserRegistry(self.store, shared=is_shared(self.config.db))
        self.handlers = Handlers(self.store, self.users, self.keystore.intermediates(),
                                 self.published_crls, self.config.max_frame,
                                 max_signature_size(server_key), self.config.quota, shared=self.users.shared)
        if self.config.users_dir:
            await self.enroll(Path(self.config.users_dir))
        self._server = await asyncio.start_server(self._accept, self.config.host, self.config.port,
                                                  limit=self.config.max_frame + 8, backlog=1024)
        if self.config.no_crl:
            log.warning("running without a CRL: revoked certificates are accepted (--no-crl)")
            self.audit.event("crl_disabled", reason="--no-crl: revoked certificates are accepted")
        self._warn_crl_expiry()
        await self.share_crls()  # a newer CRL another node holds applies from the first connection on
        self._crl_task = asyncio.get_running_loop().create_task(self._watch_crl())
        self.audit.event("server_started", host=self.config.host, port=self.port,
                         max_connections=self.config.max_connections, open_files=self.open_files)

    async def _resync_watchers(self) -> None:
        """After the notification channel was (re)opened: tell every watcher its queue's newest number,
        since a message stored through another node meanwhile sent a notification nobody heard."""
        uids = self.watchers.uids()
        if uids:
            for uid, num in (await self.store.backend.newest_numbers(uids)).items():  # type: ignore[attr-defined]
                self.watchers.notify(uid, num)

    async def enroll(self, directory: Path) -> int:
        """Register the users whose certificates (or unprotected keystores) lie in ``directory``."""
        enrolled: set[str] = set()  # users, not files: a keystore and its PEM are one user
        for path in sorted(directory.iterdir()) if directory.is_dir() else []:
            if not path.is_file():
                continue
            try:
                data = read_bytes(path)
                certs = load_certificates(data) or self._keystore_certs(data, path)
            except PkiError:
                continue
            if not certs:
                continue
            try:
                identity = self.policy.validate(certs[0], certs[1:], role="client")
            except ValidationError as exc:
                log.info("not enrolling %s: %s", path.name, exc)
                continue
            await self.users.remember(identity.uid, certs[0].public_bytes(Encoding.DER))
            enrolled.add(identity.uid)
        self.audit.event("users_enrolled", directory=str(directory), count=len(enrolled))
        return len(enrolled)

    @staticmethod
    def _keystore_certs(data: bytes, path: Path) -> list[x509.Certificate]:
        if path.suffix.lower() not in (".p12", ".pfx"):
            return []
        try:
            store = open_keystore(data, str(path))
        except KeystoreError:
            return []  # protected keystores are not enrolled (no one to ask for the password)
        return [store.cert, *store.chain]

    def _fit_connections(self) -> None:
        """Raise the open-file limit to the hard limit and make ``max_connections`` fit in it: a
        ``--max-connections`` that cannot is refused (ConnectionLimitError), the default is lowered to
        what fits, with a warning (server/limits.py)."""
        capacity = connection_capacity(self.config.max_connections, self.config.strict_max_connections)
        self.open_files = capacity.open_files
        if capacity.lowered is not None:
            log.warning(capacity.lowered)
            self.audit.event("connection_limit_lowered", reason=capacity.lowered)
            self.config = replace(self.config, max_connections=capacity.connections)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cfg = self.config
        if not self.stopping and len(self._sessions) >= cfg.max_connections:
            self._make_room()
        if self.stopping or len(self._sessions) >= cfg.max_connections:
            peer = writer.get_extra_info("peername")
            self.audit.event("connection_refused", peer=f"{peer[0]}:{peer[1]}" if peer else "?",
                             reason="shutting down" if self.stopping else "connection limit reached")
            writer.close()
            return
        if len(self._handshaking) >= cfg.max_handshakes:
            oldest, victim = next(iter(self._handshaking.items()))
            self._handshaking.pop(oldest)
            self._sessions.pop(oldest, None)
            self.audit.event("connection_rejected", peer=victim.addr, reason="evicted: too many pending handshakes")
            victim.abort()
            oldest.cancel()
        session = Session(self, reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._sessions[task] = session
        self._handshaking[task] = session
        try:
            await session.run()
        except asyncio.CancelledError:
            pass  # evicted or shut down: the session closed its transport on the way out
        finally:
            self._sessions.pop(task, None)
            self._handshaking.pop(task, None)
            if session.peer is not None:
                self._per_user[session.peer.uid] -= 1
                if not self._per_user[session.peer.uid]:
                    del self._per_user[session.peer.uid]

    def _make_room(self) -> None:
        """The relay is full: close the longest-idle connection of the user holding the most (if that user
        holds more than one), so users with few connections are never locked out by users with many."""
        if not self._per_user:
            return
        greedy = max(self._per_user, key=lambda uid: self._per_user[uid])
        if self._per_user[greedy] < 2:
            return
        idle = [s for s in self._sessions.values() if s.peer is not None and s.peer.uid == greedy and not s.busy]
        if not idle:
            return
        victim = min(idle, key=lambda s: s.last_active)
        self.audit.event("connection_closed", peer=victim.addr, uid=greedy,
                         reason="relay full: closing the oldest idle connection of the user holding the most")
        victim.abort()
        for task, session in list(self._sessions.items()):
            if session is victim:
                self._sessions.pop(task, None)  # counted out now; its task finishes on its own
                task.cancel()

    def admit(self, session: Session, uid: str) -> bool:
        """Called once a session's client is authenticated: False when that UID has too many connections."""
        task = asyncio.current_task()
        self._handshaking.pop(task, None)  # type: ignore[arg-type]
        if self._per_user.get(uid, 0) >= self.config.max_per_user:
            return False
        self._per_user[uid] = self._per_user.get(uid, 0) + 1
        return True

    @property
    def connections(self) -> int:
        return len(self._sessions)

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish, close idle connections and the store."""
        self.stopping = True
        if self._crl_task is not None:
            self._crl_task.cancel()
        if self._server is not None:
            self._server.close()
        for task, session in list(self._sessions.items()):
            if not session.busy:
                task.cancel()
        if self._sessions:
            await asyncio.wait(list(self._sessions), timeout=grace)
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.wait(list(self._sessions), timeout=1)
        if hasattr(self, "store"):  # opened by start()
            await self.store.close()
        self.audit.event("server_stopped")
        self.audit.close()
