"""One dispatch round (vigil_dispatch): who gets what, on the real database."""

from __future__ import annotations

import uuid

from common.db import executions, workers
from common.models import Dispatch
from tests.harness import Env


async def register(env: Env, name: str, capacity: int, *actions: str, prefetch: int = 0) -> str:
    wid = f"{name}-{uuid.uuid4().hex[:6]}"
    await workers.register(env.pool, workers.Registration(
        id=wid, name=name, hostname="test", pid=0, runtimes=["python"], actions=list(actions),
        capacity=capacity, prefetch=prefetch))
    return wid


async def one_round(env: Env, batch: int = 100) -> list[Dispatch]:
    return await executions.dispatch(env.pool, round_id=uuid.uuid4(), batch=batch,
                                     stale_after_s=30, actor="test")


async def test_most_free_slots_first_and_never_over_capacity_and_prefetch(env: Env):
    a = await register(env, "a", 1, "x")
    b = await register(env, "b", 2, "x", prefetch=1)
    ids = await env.submit("x", n=6)  # one transaction: the same not_before, so by id
    dispatched = sorted(await one_round(env), key=lambda d: d.id)
    assert [d.id for d in dispatched] == sorted(ids)[:4]  # the oldest first
    assert dispatched[0].worker_id == b  # ... to the freest
    per_worker = {w: sum(1 for d in dispatched if d.worker_id == w) for w in (a, b)}
    assert per_worker == {a: 1, b: 3}
    assert await one_round(env) == []  # full: the rest wait


async def test_a_worker_is_topped_up_only_when_over_half_its_prefetch_is_free(env: Env):
    a = await register(env, "a", 2, "x", prefetch=4)
    ids = sorted(await env.submit("x", n=12))
    assert len(await one_round(env)) == 6  # capacity + prefetch
    finished = "UPDATE executions SET status = 'SUCCEEDED' WHERE id = ANY($1::uuid[])"
    await env.pool.execute(finished, ids[:2])  # 4 held, 2 free: not more than half
    assert await one_round(env) == []
    await env.pool.execute(finished, ids[2:3])  # 3 free: one round tops it up to 6
    topped_up = await one_round(env)
    assert [d.worker_id for d in topped_up] == [a] * 3


async def test_only_workers_offering_the_action_and_no_backlog_holds_back_another(env: Env):
    await register(env, "a", 5, "x")
    b = await register(env, "b", 5, "y")
    backlog = await env.submit("x", n=50)
    [y] = await env.submit("y")
    [z] = await env.submit("z")
    dispatched = await one_round(env, batch=8)
    assert [d.id for d in dispatched if d.worker_id == b] == [y]
    assert len([d for d in dispatched if d.id in backlog]) == 5
    assert z not in {d.id for d in dispatched}
    assert await env.pool.fetchval("SELECT status FROM executions WHERE id = $1", z) == \
        "REQUESTED"


async def test_a_retry_avoids_the_worker_of_its_previous_attempt_when_it_can(env: Env):
    a = await register(env, "a", 5, "x")
    [eid] = await env.submit("x")
    await env.pool.execute("UPDATE executions SET attempt = 2, worker_id = $2 WHERE id = $1",
                           eid, a)
    # Alone, the previous worker takes it...
    [d] = await one_round(env)
    assert d.worker_id == a
    # ... but another worker, even with fewer free slots, is preferred.
    b = await register(env, "b", 1, "x")
    [again] = await env.submit("x")
    await env.pool.execute("UPDATE executions SET attempt = 2, worker_id = $2 WHERE id = $1",
                           again, a)
    [d] = await one_round(env)
    assert (d.id, d.worker_id) == (again, b)


async def test_stale_draining_or_pressured_workers_get_nothing(env: Env):
    stale = await register(env, "stale", 5, "x")
    draining = await register(env, "draining", 5, "x")
    pressured = await register(env, "pressured", 5, "x")
    await env.pool.execute(
        "UPDATE workers SET last_heartbeat_at = now() - interval '1 hour' WHERE id = $1", stale)
    await env.pool.execute("UPDATE workers SET status = 'DRAINING' WHERE id = $1", draining)
    await env.pool.execute("UPDATE workers SET memory_pressure = true WHERE id = $1", pressured)
    await env.submit("x", n=3)
    assert await one_round(env) == []
