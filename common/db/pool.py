"""The asyncpg pool, with JSON codecs; driver errors translated at the boundary."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import asyncpg

from common.config import DatabaseSettings
from common.errors import DatabaseUnavailable, describe

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that mean "the server is not there (right now)", as opposed to a bad query.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InvalidPasswordError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,
)


# How Vigil's sessions plan. Its statements are few, prepared once per connection and
# run thousands of times a second, so each keeps one plan (no re-planning per call).
# Its tables change size fast (a backlog arrives in seconds): a plan made while one was
# small would scan it whole ever after, since only ANALYZE refreshes a kept plan. Every
# hot statement finds its rows through an index, so sequential scans are ruled out.
# That makes the rare plan that must scan (the tiny workers table) look enormously
# expensive, which would JIT-compile it on every call: no JIT for short statements.
PLANNER = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off", "jit": "off"}


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Vigil sets no session state on pooled connections (no SET, no LISTEN, no session
    locks), so a released connection needs no RESET ALL: that would be one more round
    trip for every query. (asyncpg still rolls back a transaction left open.)"""


async def connect(settings: DatabaseSettings, *, application_name: str) -> asyncpg.Pool:
    """Open a pool, or raise DatabaseUnavailable naming the address (never the password)."""
    try:
        pool = await asyncpg.create_pool(
            host=settings.host,
            port=settings.port,
            user=settings.user,
            password=settings.password.get_secret_value(),
            database=settings.name,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            timeout=settings.connect_timeout_s,
            command_timeout=settings.command_timeout_s,
            init=_init_connection,
            reset=_keep_session,
            server_settings={"application_name": application_name[:63], **PLANNER},
        )
    except CONNECTION_ERRORS as exc:
        raise DatabaseUnavailable(settings.address, exc) from None
    assert pool is not None
    return pool


@asynccontextmanager
async def transaction(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as conn, conn.transaction():
        yield conn


async def retrying(
    operation: Callable[[], Awaitable[T]], *, deadline_s: float, what: str
) -> T:
    """Run a whole database operation again, with jittered backoff, while the server is
    unreachable (a restart, a failover), for up to deadline_s; then raise."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + deadline_s
    delay = 0.1
    while True:
        try:
            return await operation()
        except CONNECTION_ERRORS as exc:
            if loop.time() + delay > give_up_at:
                raise
            log.warning("%s: database unreachable (%s), retrying in %.1fs",
                        what, describe(exc), delay, extra={"event": "db_retry"})
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 5.0)
