"""The relay server: loads its identity and trust, listens, and runs one Session per connection."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

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
from pki.keystore import load_keystore, open_keystore
from pki.tls import server_context
from pki.validation import TrustPolicy, check_profile

from .audit import AuditLog
from .config import ServerConfig
from .handlers import Handlers, UserRegistry
from .session import Session
from .store import AsyncStore, SQLiteStore

log = logging.getLogger("msg_relay.server")


class RelayServer:
    """``await start()``, then ``port`` is bound; ``await close()`` stops gracefully."""

    def __init__(self, config: ServerConfig, audit: AuditLog | None = None) -> None:
        self.config = config
        self.audit = audit or AuditLog(config.log_file)
        self.keystore = load_keystore(config.p12, config.passwords)
        check_profile(self.keystore.cert, "server", config.org_unit)
        anchors = load_certificate_file(config.ca) if config.ca else self.keystore.ca_certificates()
        if not anchors:
            raise PkiError(f"{config.p12} bundles no CA certificate: give --ca ROOT.pem")
        self.anchors = anchors
        self._crl_stamp = self._crl_file_stamp()
        self._crl_checked = time.monotonic()
        self._load_trust()
        server_key = self.keystore.key
        server_der = self.keystore.cert.public_bytes(Encoding.DER)
        signer = cert_fingerprint(server_der)
        self.store = AsyncStore(SQLiteStore(config.db), lambda receipt: receipt.signed_by(server_key, signer))
        # Clients verify old receipts after the relay's certificate is renewed: keep every one it had.
        self.store.store.add_certificate(MSG_SERVER, server_der)
        self.users = UserRegistry(self.store)
        self.handlers = Handlers(self.store, self.users, self.keystore.intermediates(),
                                 [c.public_bytes(Encoding.DER) for c in self.policy.crls], config.max_frame)
        self.stopping = False
        self._server: asyncio.base_events.Server | None = None
        self._sessions: dict[asyncio.Task[None], Session] = {}
        # Connections still in their TLS handshake, oldest first: a flood of them evicts the oldest
        # instead of locking out everyone else (slowloris); authenticated ones are capped per UID.
        self._handshaking: dict[asyncio.Task[None], Session] = {}
        self._per_user: dict[str, int] = {}

    def _load_trust(self) -> None:
        """(Re)read the CRL and build the TLS context and validation policy from it."""
        crls = load_crl_file(self.config.crl) if self.config.crl else []
        policy = TrustPolicy(self.anchors, crls, self.config.org_unit)
        # Refuse a certificate our own clients would reject (expired, revoked ...).
        policy.validate(self.keystore.cert, self.keystore.chain, role="server")
        self.ssl_context = server_context(self.keystore, self.anchors, crls)
        self.policy = policy
        if hasattr(self, "handlers"):
            self.handlers.crls_der = [c.public_bytes(Encoding.DER) for c in crls]

    def _crl_file_stamp(self) -> tuple[int, int] | None:
        if not self.config.crl:
            return None
        try:
            st = os.stat(self.config.crl)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def reload_crl(self, reason: str = "signal") -> bool:
        """Use the CA's newest CRL for connections from now on (SIGHUP, or the file changed)."""
        try:
            self._load_trust()
        except PkiError as exc:
            self.audit.event("crl_reload_failed", reason=str(exc))
            return False
        self._crl_stamp = self._crl_file_stamp()
        self.audit.event("crl_reloaded", trigger=reason, crls=len(self.policy.crls))
        self._drop_revoked()
        return True

    def _drop_revoked(self) -> None:
        """Close the connections of users the new CRL revokes: a revocation takes effect at once."""
        for session in list(self._sessions.values()):
            if session.peer is None:
                continue
            cert = session.peer.cert
            if any(crl.issuer == cert.issuer and crl.get_revoked_certificate_by_serial_number(cert.serial_number)
                   for crl in self.policy.crls):
                self.audit.event("connection_closed", peer=session.addr, uid=session.peer.uid,
                                 reason="certificate revoked")
                session.abort()

    def _maybe_reload_crl(self) -> None:
        """The CA rewrites crl.pem when it revokes: notice within ``crl_check_interval`` seconds."""
        now = time.monotonic()
        if not self.config.crl or now - self._crl_checked < self.config.crl_check_interval:
            return
        self._crl_checked = now
        stamp = self._crl_file_stamp()
        if stamp is not None and stamp != self._crl_stamp:
            self.reload_crl("file changed")

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        if self.config.users_dir:
            await self.enroll(Path(self.config.users_dir))
        self._server = await asyncio.start_server(self._accept, self.config.host, self.config.port,
                                                  limit=self.config.max_frame + 8, backlog=1024)
        self.audit.event("server_started", host=self.config.host, port=self.port)

    async def enroll(self, directory: Path) -> int:
        """Register the users whose certificates (or unprotected keystores) lie in ``directory``."""
        count = 0
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
            count += 1
        self.audit.event("users_enrolled", directory=str(directory), count=count)
        return count

    @staticmethod
    def _keystore_certs(data: bytes, path: Path) -> list[x509.Certificate]:
        if path.suffix.lower() not in (".p12", ".pfx"):
            return []
        try:
            store = open_keystore(data, str(path))
        except KeystoreError:
            return []  # protected keystores are not enrolled (no one to ask for the password)
        return [store.cert, *store.chain]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cfg = self.config
        if self.stopping or len(self._sessions) >= cfg.max_connections:
            peer = writer.get_extra_info("peername")
            self.audit.event("connection_refused", peer=f"{peer[0]}:{peer[1]}" if peer else "?",
                             reason="shutting down" if self.stopping else "connection limit reached")
            writer.close()
            return
        self._maybe_reload_crl()
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
        await asyncio.get_running_loop().run_in_executor(None, self.store.close)
        self.audit.event("server_stopped")
        self.audit.close()
