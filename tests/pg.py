"""A throwaway PostgreSQL database for a test run, and fresh schemas in it for single tests.

The server is the one env ``MSG_RELAY_TEST_PG`` names (a DSN to a database we may run CREATE DATABASE
from). Without a reachable server the PostgreSQL tests skip, saying why in one line; with
``MSG_RELAY_REQUIRE_PG=1`` (CI) they fail instead, so a broken CI database cannot pass unnoticed.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
CONNECT_TIMEOUT = 10.0


def admin_dsn() -> str:
    return os.environ.get("MSG_RELAY_TEST_PG", DEFAULT_ADMIN_DSN)


def pg_required() -> bool:
    return os.environ.get("MSG_RELAY_REQUIRE_PG") == "1"


def with_database(dsn: str, database: str, **settings: str) -> str:
    """``dsn`` pointing at another database, with extra server settings (asyncpg passes unknown
    query parameters on as settings, e.g. ``search_path``)."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    query.update(settings)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, urlencode(query), parts.fragment))


def where(dsn: str) -> str:
    """The server a DSN names, without user or password (for messages)."""
    parts = urlsplit(dsn)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"


@dataclass
class TestDatabase:
    """A database created for this test run; ``fresh_schema()`` gives each test an empty namespace in it."""

    __test__ = False  # not a test class, whatever its name

    admin: str
    name: str

    @property
    def dsn(self) -> str:
        return with_database(self.admin, self.name)

    def fresh_schema(self) -> str:
        """A DSN whose tables live in a new, empty schema: what a fresh database is to the store."""
        schema = "t_" + secrets.token_hex(6)

        async def create() -> None:
            conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT)
            try:
                await conn.execute(f'CREATE SCHEMA "{schema}"')
            finally:
                await conn.close()

        asyncio.run(create())
        return with_database(self.admin, self.name, search_path=schema)


def create_test_database() -> TestDatabase:
    """CREATE DATABASE msg_relay_test_<random>; skips (or, when required, fails) without a server."""
    admin = admin_dsn()
    name = "msg_relay_test_" + secrets.token_hex(6)

    async def create() -> None:
        conn = await asyncpg.connect(admin, timeout=CONNECT_TIMEOUT)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    try:
        asyncio.run(create())
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = (f"no usable PostgreSQL at {where(admin)} (MSG_RELAY_TEST_PG): {type(exc).__name__}: "
                  f"{' '.join(str(exc).split())}")
        if pg_required():
            pytest.fail(reason + " [MSG_RELAY_REQUIRE_PG=1]", pytrace=False)
        pytest.skip(reason)
    return TestDatabase(admin, name)


def drop_test_database(db: TestDatabase) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(db.admin, timeout=CONNECT_TIMEOUT)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())
