"""Shared fixtures: one demo PKI per test session (key generation is the slow part)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the fuzz targets briefly; `make test-all` ten times longer.
settings.register_profile("ci", max_examples=300, deadline=None)
settings.register_profile("long", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from pki.ca import CertificateAuthority
from pki.cli import make_demo
from pki.keystore import load_keystore


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "certs"
    make_demo(out)
    return out


@pytest.fixture(scope="session")
def demo_ca(demo_dir: Path) -> CertificateAuthority:
    return CertificateAuthority.load(demo_dir / "ca")


@pytest.fixture()
def fresh_ca(tmp_path: Path) -> CertificateAuthority:
    """A CA a test may change (issue, revoke) without disturbing others."""
    return CertificateAuthority.init(tmp_path / "ca")


@pytest.fixture(scope="session")
def alice(demo_dir: Path):
    return load_keystore(demo_dir / "MSG_CLI1.p12")


@pytest.fixture()
def relay(demo_dir: Path, tmp_path: Path):
    """A real relay with the demo PKI and a fresh database, stopped after the test."""
    from .harness import ServerThread, server_config

    server = ServerThread(server_config(demo_dir, tmp_path)).start()
    yield server
    server.stop()


@pytest.fixture()
def user(demo_dir: Path, tmp_path: Path):
    """``user("MSG_CLI1")`` -> (keystore path, state dir) for the CLI helpers."""

    def make(uid: str) -> tuple[Path, Path]:
        return demo_dir / f"{uid}.p12", tmp_path / "state" / uid

    return make


@pytest.fixture(scope="session")
def pg_database():
    """This run's own PostgreSQL database (dropped at the end); skips, or fails under
    MSG_RELAY_REQUIRE_PG=1, when no server is reachable."""
    from .pg import create_test_database, drop_test_database

    db = create_test_database()
    yield db
    drop_test_database(db)


@pytest.fixture()
def pg_dsn(pg_database) -> str:
    """A DSN on an empty schema of the run's database: to the store, a fresh database."""
    return pg_database.fresh_schema()
