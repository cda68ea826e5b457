"""Idempotency keys under concurrency: racing submits of one key create one execution,
and every one of them returns its id."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from common.client import AsyncClient
from common.db import executions
from common.submission import Submission
from tests.harness import Env, wait_until

RACERS = 20


@asynccontextmanager
async def clients(env: Env, n: int) -> AsyncIterator[list[AsyncClient]]:
    """n clients, each with a pool of one connection of its own."""
    settings = env.db.model_copy(update={"pool_min_size": 1, "pool_max_size": 1})
    opened = [await AsyncClient.connect(settings, actor=f"racer-{i}") for i in range(n)]
    try:
        yield opened
    finally:
        for c in opened:
            await c.close()


async def test_twenty_concurrent_submits_of_one_key_create_one_execution(env: Env):
    async with clients(env, RACERS) as racers:
        for round_ in range(3):
            key = f"nightly-{round_}"
            # Hold every insert at the table lock, then let all twenty go at once, so that
            # they race each other to the unique index (where a statement may not see the
            # row that beat it, and must read it again).
            async with env.pool.acquire() as gate, gate.transaction():
                await gate.execute("LOCK TABLE executions IN SHARE MODE")
                submits = [asyncio.create_task(c.submit("demo.add", {"a": 1, "b": 2},
                                                        idempotency_key=key))
                           for c in racers]

                async def all_waiting() -> bool:
                    return await env.pool.fetchval(
                        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                        "WHERE c.relname = 'executions' AND NOT l.granted") == RACERS

                await wait_until(all_waiting, timeout=10, interval=0.02,
                                 what="every submit to wait at the lock")
            submitted = await asyncio.gather(*submits)

            [row] = await env.pool.fetch(
                "SELECT id FROM executions WHERE idempotency_key = $1", key)
            assert {s.id for s in submitted} == {row["id"]}
            assert sum(s.created for s in submitted) == 1
            history = await executions.history(env.pool, row["id"])
            assert [(h.from_status, h.to_status) for h in history] == [(None, "REQUESTED")]
    assert await env.pool.fetchval("SELECT count(*) FROM executions") == 3


async def test_a_key_repeated_in_one_batch_while_another_client_races_it(env: Env):
    # The same key twice in one statement, and once more from another connection: three
    # submissions, one execution.
    twice = [Submission("demo.add", {"a": 1, "b": 2}, idempotency_key="k")] * 2
    async with clients(env, 2) as (a, b):
        batch, single = await asyncio.gather(
            a.submit_many(twice),
            b.submit("demo.add", {"a": 1, "b": 2}, idempotency_key="k"))
    assert len({s.id for s in [*batch, single]}) == 1
    assert sum(s.created for s in [*batch, single]) == 1
    assert await env.pool.fetchval("SELECT count(*) FROM executions") == 1
