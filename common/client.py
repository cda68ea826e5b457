"""Submitting and following executions from application code, as `vigil` does.

    from common.api import Client

    with Client() as vigil:
        submitted = vigil.submit("reports.build", {"pages": 40})
        print(vigil.result(submitted.id, timeout_s=600))

AsyncClient is the same for asyncio code. A submission is in Postgres (committed) when
submit returns; submit_many writes any number in one transaction. Bad input raises
InvalidInput before anything is written.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import asyncpg

from common import db
from common.config import DatabaseSettings, SubmitLimits
from common.db import executions
from common.db.executions import Submitted
from common.db.pool import CONNECTION_ERRORS
from common.errors import DatabaseUnavailable, ExecutionFailed, NotFound, WaitTimedOut
from common.metrics import count_moves
from common.models import Execution
from common.state_machine import ExecutionStatus
from common.submission import Submission, execution_id

__all__ = ["AsyncClient", "Client", "Submission", "Submitted"]

# Submissions per statement within one submit_many transaction.
CHUNK = 1000
# How often wait() looks, at first and at most.
FIRST_POLL_S = 0.005
MAX_POLL_S = 0.5


class AsyncClient:
    """Vigil from asyncio code: submit, get, wait for the result, cancel."""

    def __init__(self, pool: asyncpg.Pool, *, limits: SubmitLimits | None = None,
                 actor: str = "client", address: str = "") -> None:
        self._pool = pool
        self._limits = limits or SubmitLimits()
        self._actor = actor
        self._address = address

    @classmethod
    async def connect(
        cls, settings: DatabaseSettings | None = None, *, limits: SubmitLimits | None = None,
        actor: str = "client",
    ) -> Self:
        """Open a small pool to Vigil's database (settings: VIGIL_DB_* by default)."""
        settings = settings or DatabaseSettings(pool_min_size=1, pool_max_size=4)
        pool = await db.connect(settings, application_name=f"vigil-{actor}")
        return cls(pool, limits=limits, actor=actor, address=settings.address)

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(
        self, action: str, params: dict[str, Any] | None = None, *,
        max_attempts: int | None = None, timeout_s: int | None = None,
        idempotency_key: str | None = None, delay_s: float | None = None,
        at: datetime | None = None,
    ) -> Submitted:
        """Create one execution (or, for an idempotency key already used, return that one)."""
        [submitted] = await self.submit_many([Submission(
            action, params if params is not None else {}, max_attempts=max_attempts,
            timeout_s=timeout_s, idempotency_key=idempotency_key, delay_s=delay_s, at=at)])
        return submitted

    async def submit_many(self, submissions: Iterable[Submission]) -> list[Submitted]:
        """Create many executions in one transaction; results in the same order."""
        checked = [s.checked(self._limits) for s in submissions]
        if not checked:
            return []

        async def write() -> list[Submitted]:
            if len(checked) <= CHUNK:  # one statement: atomic, and one round trip
                return await executions.insert(self._pool, checked, self._actor)
            async with db.transaction(self._pool) as conn:
                done: list[Submitted] = []
                for i in range(0, len(checked), CHUNK):
                    done += await executions.insert(conn, checked[i:i + CHUNK], self._actor)
                return done

        return await self._unavailable_as_error(write())

    async def get(self, id: uuid.UUID | str) -> Execution:
        e = await self._unavailable_as_error(executions.get(self._pool, execution_id(id)))
        if e is None:
            raise NotFound(f"no execution {id}")
        return e

    async def wait(self, id: uuid.UUID | str, timeout_s: float | None = None) -> Execution:
        """The execution once it has ended (any terminal state)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = FIRST_POLL_S
        while True:
            e = await self.get(id)
            if e.status.terminal:
                return e
            if deadline is not None and time.monotonic() + delay > deadline:
                raise WaitTimedOut(f"execution {id} still {e.status} after {timeout_s:g}s")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, MAX_POLL_S)

    async def result(self, id: uuid.UUID | str, timeout_s: float | None = None) -> Any:
        """What the action returned; ExecutionFailed if it ended without succeeding."""
        e = await self.wait(id, timeout_s)
        if e.status != ExecutionStatus.SUCCEEDED:
            raise ExecutionFailed(e.id, e.status, e.reason, e.error)
        return e.result

    async def cancel(self, id: uuid.UUID | str) -> bool:
        """Cancel it in whatever state it is (a running child is killed); False if it had
        already ended."""
        moved = await self._unavailable_as_error(
            executions.cancel(self._pool, execution_id(id), self._actor))
        if moved is None:
            await self.get(id)  # NotFound for an unknown id
            return False
        count_moves("cancel", [moved])
        return True

    async def _unavailable_as_error(self, work: Any) -> Any:
        try:
            return await work
        except CONNECTION_ERRORS as exc:
            raise DatabaseUnavailable(self._address, exc) from None


class Client:
    """Vigil from ordinary (blocking) code: the same calls as AsyncClient."""

    def __init__(self, settings: DatabaseSettings | None = None, *,
                 limits: SubmitLimits | None = None, actor: str = "client") -> None:
        self._runner = asyncio.Runner()
        try:
            self._client = self._runner.run(
                AsyncClient.connect(settings, limits=limits, actor=actor))
        except BaseException:
            self._runner.close()
            raise

    def submit(self, action: str, params: dict[str, Any] | None = None, **options: Any,
               ) -> Submitted:
        """See AsyncClient.submit (options: max_attempts, timeout_s, idempotency_key,
        delay_s, at)."""
        return self._runner.run(self._client.submit(action, params, **options))

    def submit_many(self, submissions: Iterable[Submission]) -> list[Submitted]:
        return self._runner.run(self._client.submit_many(submissions))

    def get(self, id: uuid.UUID | str) -> Execution:
        return self._runner.run(self._client.get(id))

    def wait(self, id: uuid.UUID | str, timeout_s: float | None = None) -> Execution:
        return self._runner.run(self._client.wait(id, timeout_s))

    def result(self, id: uuid.UUID | str, timeout_s: float | None = None) -> Any:
        return self._runner.run(self._client.result(id, timeout_s))

    def cancel(self, id: uuid.UUID | str) -> bool:
        return self._runner.run(self._client.cancel(id))

    def close(self) -> None:
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
