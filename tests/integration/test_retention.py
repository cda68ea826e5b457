"""Retention: finished executions older than the retention are deleted with their
history, in bounded batches shared by the executors; nothing unfinished is touched."""

import asyncio
import uuid

from common.config import ExecutorSettings
from common.db import executions
from common.state_machine import UNFINISHED, ExecutionStatus
from services.executor.retention import Retention
from tests.harness import Env, sample, scrape_until, wait_until

DAY_S = 86_400


async def _aged(env: Env, n: int, status: ExecutionStatus, age_s: float) -> list[uuid.UUID]:
    """n executions put straight into `status`, last changed age_s ago (finished then,
    if that is a terminal status)."""
    ids = await env.submit("demo.add", {"a": 1, "b": 2}, n=n)
    await env.pool.execute(
        "UPDATE executions SET status = $2, updated_at = now() - make_interval(secs => $3), "
        "finished_at = CASE WHEN $4 THEN now() - make_interval(secs => $3) END "
        "WHERE id = ANY($1)", ids, status, float(age_s), status.terminal)
    return ids


async def _left(env: Env, ids: list[uuid.UUID]) -> tuple[int, int]:
    """(executions, history rows) still there of these."""
    row = await env.pool.fetchrow(
        "SELECT (SELECT count(*) FROM executions WHERE id = ANY($1)) AS e, "
        "(SELECT count(*) FROM execution_history WHERE execution_id = ANY($1)) AS h", ids)
    return row["e"], row["h"]


def _retention(env: Env, **settings: float) -> Retention:
    return Retention(env.pool, ExecutorSettings(**settings))


async def test_only_finished_executions_past_the_retention_go_with_their_history(env: Env):
    expired = [i for status in (ExecutionStatus.SUCCEEDED, ExecutionStatus.FAILED,
                                ExecutionStatus.TIMED_OUT, ExecutionStatus.CANCELLED)
               for i in await _aged(env, 3, status, age_s=8 * DAY_S)]
    young = await _aged(env, 3, ExecutionStatus.SUCCEEDED, age_s=DAY_S)
    unfinished = [i for status in UNFINISHED
                  for i in await _aged(env, 3, status, age_s=30 * DAY_S)]
    retention = _retention(env, retention_batch_size=5)

    await retention.prune()
    assert (await _left(env, expired))[0] == len(expired) - 5  # one batch at a time
    assert retention.more.is_set()  # a full batch: the loop comes back at once
    while retention.more.is_set():
        retention.more.clear()
        await retention.prune()

    assert await _left(env, expired) == (0, 0)
    assert await _left(env, young) == (3, 3)
    assert await _left(env, unfinished) == (len(unfinished), len(unfinished))


async def test_replicas_share_a_backlog_without_waiting_on_each_other(env: Env):
    expired = await _aged(env, 200, ExecutionStatus.SUCCEEDED, age_s=8 * DAY_S)

    async def replica() -> int:
        total = 0
        while n := await executions.prune(env.pool, older_than_s=DAY_S, batch=20):
            total += n
        return total

    assert sum(await asyncio.gather(*(replica() for _ in range(3)))) == 200
    assert await _left(env, expired) == (0, 0)


async def test_a_key_is_remembered_while_its_execution_is_kept(env: Env):
    first = await env.client.submit("demo.add", {"a": 1, "b": 2}, idempotency_key="k")
    again = await env.client.submit("demo.add", {"a": 1, "b": 2}, idempotency_key="k")
    assert again.id == first.id and not again.created
    await env.pool.execute(
        "UPDATE executions SET status = 'SUCCEEDED', finished_at = now() - interval '8 days' "
        "WHERE id = $1", first.id)
    await _retention(env).prune()
    after = await env.client.submit("demo.add", {"a": 1, "b": 2}, idempotency_key="k")
    assert after.created and after.id != first.id


async def test_a_running_executor_prunes_what_finished_and_keeps_the_rest(env: Env):
    env.executor(metrics_port=19471, VIGIL_EXECUTOR_RETENTION_S="1",
                 VIGIL_EXECUTOR_RETENTION_INTERVAL_S="0.2")
    env.worker("w1", capacity=4)
    await env.live_workers(1)
    waiting = await env.submit("nobody.offers.this", n=3)
    running = await env.submit("demo.sleep", {"seconds": 30}, n=2)
    done = await env.submit("demo.noop", n=40)
    await env.all_terminal(done, timeout=60)

    async def pruned() -> bool:
        return await _left(env, done) == (0, 0)

    await wait_until(pruned, timeout=20, what="finished executions pruned")
    assert await _left(env, waiting) == (3, 3)
    statuses = {r["status"] for r in await env.pool.fetch(
        "SELECT status FROM executions WHERE id = ANY($1)", running)}
    assert statuses <= {"SCHEDULED", "RUNNING"}
    # Retention is a loop of its own, with its own progress metric.
    text = await scrape_until(19471, lambda t: sample(
        t, "vigil_loop_last_completed_timestamp_seconds", loop="retention"),
        what="the retention loop's metric")
    assert sample(text, "vigil_loop_errors_total", loop="retention") in (None, 0.0)
