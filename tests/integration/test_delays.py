"""Delayed submissions (`--delay`, `--at`, AsyncClient.submit(delay_s=, at=)): each
starts once it is due, never earlier, by database time."""

from __future__ import annotations

import uuid
from datetime import timedelta

from tests import inprocess
from tests.harness import Env, wait_until

ON_TIME_S = 1.0


async def _timeline(env: Env, ids: list) -> list[tuple[float, float, float]]:
    """For each that succeeded, in order: (seconds from submission to due, from due to
    dispatch, from due to start), all database time."""
    rows = await env.pool.fetch(
        "SELECT extract(epoch FROM not_before - created_at)::float8 AS delay, "
        "extract(epoch FROM scheduled_at - not_before)::float8 AS dispatched, "
        "extract(epoch FROM started_at - not_before)::float8 AS started "
        "FROM executions WHERE id = ANY($1) AND status = 'SUCCEEDED' "
        "ORDER BY array_position($1, id)", ids)
    return [(r["delay"], r["dispatched"], r["started"]) for r in rows]


async def test_client_delay_and_at_are_not_dispatched_before_they_are_due(env: Env):
    now = await env.pool.fetchval("SELECT now()")
    delayed = await env.client.submit("demo.add", {"a": 1, "b": 2}, delay_s=1.0)
    at = await env.client.submit("demo.add", {"a": 3, "b": 4}, at=now + timedelta(seconds=1.5))
    ids = [delayed.id, at.id]
    async with inprocess.worker(env), inprocess.dispatcher(env) as d:
        await d.dispatch_due()
        assert d.next_due_in is not None and 0 < d.next_due_in <= 1.0
        assert await env.pool.fetchval(
            "SELECT count(*) FROM executions WHERE id = ANY($1) AND status = 'REQUESTED'",
            ids) == 2

        async def both_done() -> bool:
            await d.dispatch_round()  # as often as the test likes: never before due
            return await env.pool.fetchval(
                "SELECT count(*) FROM executions WHERE id = ANY($1) AND status = 'SUCCEEDED'",
                ids) == 2

        await wait_until(both_done, timeout=15, interval=0.05, what="both to run when due")
    assert await env.pool.fetchval(
        "SELECT not_before FROM executions WHERE id = $1", at.id) == now + timedelta(seconds=1.5)
    timeline = await _timeline(env, ids)
    assert len(timeline) == 2 and round(timeline[0][0], 3) == 1.0
    assert all(0 <= dispatched <= started < ON_TIME_S for _, dispatched, started in timeline), \
        timeline


async def test_cli_delay_and_at_start_when_due_on_a_running_executor(env: Env):
    env.executor()
    async with inprocess.worker(env):
        at = await env.pool.fetchval("SELECT now() + interval '4 seconds'")
        submitted = [env.cli("submit", "demo.add", "-p", "a=1", "-p", "b=2", *when)
                     for when in (["--delay", "2s"], ["--at", at.isoformat()])]
        assert all(r.returncode == 0 for r in submitted), [r.stderr for r in submitted]
        ids = [uuid.UUID(r.stdout.strip()) for r in submitted]
        assert await env.pool.fetchval(
            "SELECT not_before FROM executions WHERE id = $1", ids[1]) == at
        await env.all_terminal(ids, timeout=30)
    timeline = await _timeline(env, ids)
    assert len(timeline) == 2 and round(timeline[0][0], 3) == 2.0
    assert all(0 <= dispatched <= started < ON_TIME_S for _, dispatched, started in timeline), \
        timeline
