"""Revocation that acts, and CRLs that do not lock everyone out (issue 9 §3).

The clock is injected (``RelayServer(clock=...)``): a CRL's expiry is reached by moving the relay's
time, never by waiting for it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path

import pytest

from client.connection import ClientError, RelayClient, ServerRejected
from pki.errors import PkiError
from pki.keystore import load_keystore
from protocol.encoding import utc_now
from server.app import RelayServer
from server.audit import AuditLog

from .harness import ServerThread, private_client, private_pki, private_relay, server_config


def events(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "audit.log").read_text().splitlines()]


class Clock:
    """A relay clock a test moves by hand."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return utc_now() + self.offset


class ClockedServer(ServerThread):
    def __init__(self, config, clock: Clock) -> None:
        super().__init__(config)
        self.clock = clock

    async def _create(self) -> RelayServer:
        server = RelayServer(self.config, AuditLog(self.config.log_file), clock=self.clock)
        await server.start()
        return server


def test_an_open_connection_of_a_revoked_user_is_closed_within_seconds(tmp_path):
    """No new connection is needed: the relay watches the CRL file by itself."""
    ca = private_pki(tmp_path, ("KEEPS_ASKING",))
    server = private_relay(tmp_path, crl_check_interval=0.5)
    user = ca.issue("STAYS")

    async def scenario() -> float:
        async with RelayClient(user, "127.0.0.1", server.port, [ca.root], timeout=10) as c:
            await c.queue()
            ca.revoke(uid="STAYS")
            revoked = time.monotonic()
            with pytest.raises(ClientError):
                while time.monotonic() - revoked < 30:
                    await c.directory("STAYS")
                    await asyncio.sleep(0.05)
            return time.monotonic() - revoked

    try:
        assert asyncio.run(scenario()) < 5.0
        closed = [e for e in events(tmp_path) if e["event"] == "connection_closed" and e.get("uid") == "STAYS"]
        assert closed and "revoked" in closed[0]["reason"]
    finally:
        server.stop()


def test_a_relay_without_a_crl_refuses_to_start_unless_told(tmp_path):
    private_pki(tmp_path)
    with pytest.raises(PkiError, match="--no-crl"):
        RelayServer(server_config(tmp_path, tmp_path, p12=str(tmp_path / "MSG_SERVER.p12"), crl=None,
                                  users_dir=None))
    server = private_relay(tmp_path, crl=False)
    try:
        assert any(e["event"] == "crl_disabled" for e in events(tmp_path))
    finally:
        server.stop()


def test_an_expired_crl_is_refused_at_start_with_the_reason(tmp_path):
    private_pki(tmp_path)
    clock = Clock()
    clock.offset = dt.timedelta(days=400)
    with pytest.raises(PkiError, match="CRL expired"):
        RelayServer(server_config(tmp_path, tmp_path, p12=str(tmp_path / "MSG_SERVER.p12"), users_dir=None),
                    clock=clock)


def test_a_crl_that_expires_while_running_refuses_everyone_and_says_why(tmp_path):
    ca = private_pki(tmp_path, ("ANNA",))
    clock = Clock()
    cfg = server_config(tmp_path, tmp_path, p12=str(tmp_path / "MSG_SERVER.p12"), crl_check_interval=0.05)
    server = ClockedServer(cfg, clock).start()
    try:
        assert private_client(server, tmp_path, "ANNA", "askqueue").code == 0
        next_update = min(c.next_update_utc for c in ca.build_crls())
        clock.offset = next_update - utc_now() - dt.timedelta(days=3)

        def wait_for(event: str, **fields: str) -> dict:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                found = [e for e in events(tmp_path) if e["event"] == event
                         and all(e.get(k) == v for k, v in fields.items())]
                if found:
                    return found[0]
                time.sleep(0.05)
            raise AssertionError(f"no {event} in the audit log")

        assert "msg-pki crl" in wait_for("crl_expiring")["reason"]  # three days ahead: a warning

        async def ticks() -> None:
            assert server.server is not None
            for _ in range(5):
                server.server.check_crl()

        server.call(ticks())
        warnings = len([e for e in events(tmp_path) if e["event"] == "crl_expiring"])
        assert warnings == 1  # hourly, not on every check
        anna = load_keystore(tmp_path / "ANNA.p12")
        still_open = RelayClient(anna, "127.0.0.1", server.port, anna.ca_certificates(), timeout=10)
        loop = asyncio.new_event_loop()
        loop.run_until_complete(still_open.connect())
        clock.offset += dt.timedelta(days=4)  # past nextUpdate
        assert "CRL expired" in wait_for("crl_expired")["reason"]
        # Connections already open are closed too: no one is checked, so no one is served.
        deadline = time.monotonic() + 20
        while not [e for e in events(tmp_path) if e["event"] == "connection_closed" and e.get("uid") == "ANNA"
                   and e.get("reason", "").startswith("CRL expired")]:
            assert time.monotonic() < deadline, "the open connection was not closed for the expired CRL"
            time.sleep(0.05)
        with pytest.raises(ClientError):
            loop.run_until_complete(still_open.queue())
        loop.run_until_complete(still_open.close())
        loop.close()
        assert len([e for e in events(tmp_path) if e["event"] == "crl_expiring"]) == warnings  # hourly, not per tick
        r = private_client(server, tmp_path, "ANNA", "askqueue")
        assert r.code == 1
        assert r.err.startswith("msg-client: the relay refused our certificate: CRL expired"), r.err

        clock.offset = dt.timedelta()
        ca.write_crl()  # the CA re-signs: service resumes without a restart
        wait_for("crl_reloaded", trigger="file changed")
        r = private_client(server, tmp_path, "ANNA", "askqueue")
        assert r.code == 0, r.err
    finally:
        server.stop()


def test_revoked_user_told_so(tmp_path):
    """What a revoked user sees (the TLS alert the relay sends, as one line)."""
    ca = private_pki(tmp_path, ("GONE",))
    ca.revoke(uid="GONE")
    server = private_relay(tmp_path)
    try:
        r = private_client(server, tmp_path, "GONE", "askqueue")
        assert r.code == 1 and r.err.strip() == "msg-client: the relay refused our certificate: revoked", r.err
    finally:
        server.stop()


def test_the_server_rejection_class_is_what_the_cli_reports():
    assert issubclass(ServerRejected, ClientError)
