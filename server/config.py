"""Server settings, with the defaults of DESIGN.md and the issue (port 7777, relay.db, ...)."""

from __future__ import annotations

from dataclasses import dataclass

from pki.identity import DEFAULT_ORG_UNIT
from pki.passwords import PasswordSource
from protocol.frames import MAX_FRAME

from .quota import QuotaConfig

DEFAULT_PORT = 7777
DEFAULT_MAX_CONNECTIONS = 10_000


@dataclass
class ServerConfig:
    p12: str = "certs/MSG_SERVER.p12"
    passwords: PasswordSource = PasswordSource()
    ca: str | None = None
    crl: str | None = "certs/ca/crl.pem"  # the demo CA's, as `make pki` writes it
    no_crl: bool = False  # run without revocation checking: only when asked for, with a warning
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db: str = "relay.db"
    log_file: str | None = None
    users_dir: str | None = None
    # Connections at once. Idle ones cost ~43 KiB each (server/tls_buffers.py), so 10 000 watchers fit one node.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # --max-connections was given: refuse to start when the open-file limit cannot hold that many, instead
    # of holding fewer (with a warning) as the default does (RelayServer.start).
    strict_max_connections: bool = False
    max_handshakes: int = 64
    max_per_user: int = 8  # a user's own connections; far below max_connections, so a few users cannot fill it
    max_frame: int = MAX_FRAME
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    crl_check_interval: float = 5.0  # how often the CRL file is checked for a newer version
    crl_warn_days: float = 7.0  # warn (at start, then hourly in the audit log) this long before the CRL expires
    frame_timeout: float = 30.0  # a frame once begun must be complete within this (slowloris)
    org_unit: str | None = DEFAULT_ORG_UNIT
    quota: QuotaConfig = QuotaConfig()
