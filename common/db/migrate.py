"""Ordered, additive migrations, safe to run from several processes at once."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import asyncpg

from common.errors import VigilError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Serialises concurrent `vigil db migrate` runs; only guards the migration itself.
_MIGRATION_LOCK_KEY = 0x5649_4749  # "VIGI"


class NotMigrated(VigilError):
    """The database's schema is behind the code: no table yet, or migrations pending."""

    def __init__(self, address: str) -> None:
        super().__init__(f"the database at {address} is not migrated: run `vigil db migrate`")


def available() -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted(MIGRATIONS_DIR.iterdir()):
        match = _FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply every pending migration in one transaction; return the versions applied."""
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = await _applied(conn)
        for version, name, path in available():
            if version in done:
                continue
            await conn.execute(path.read_text())
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
            log.info("applied migration %04d_%s", version, name, extra={"event": "migrated"})
            applied_now.append(version)
    return applied_now


async def pending(conn: asyncpg.Connection) -> list[int]:
    """The versions this code has that the database has not applied (all of them on a
    database never migrated)."""
    try:
        done = await _applied(conn)
    except asyncpg.UndefinedTableError:
        done = set()
    return [version for version, _, _ in available() if version not in done]


async def require_migrated(conn: asyncpg.Connection, address: str) -> None:
    """Raise NotMigrated naming the database unless every migration is applied."""
    if await pending(conn):
        raise NotMigrated(address)


async def _applied(conn: asyncpg.Connection) -> set[int]:
    return {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
