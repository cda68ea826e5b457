"""Drill support: a load that records its real runs (examples/actions.py: demo.record),
and the four promises of the brief checked against it and the database."""

from __future__ import annotations

from common.state_machine import TERMINAL
from tests.harness import Env, wait_until


async def check_promises(env: Env, ids: list) -> dict[str, int]:
    """Assert: nothing stuck or lost (every execution terminal, with a reason), no attempt
    ran twice (one record per (execution, attempt), no execution succeeded twice).
    Returns the figures for the drill table."""
    assert env.pool is not None
    rows = await env.pool.fetch(
        "SELECT id, status, reason FROM executions WHERE id = ANY($1)", ids)
    lost = len(ids) - len(rows)
    stuck = [r["id"] for r in rows if r["status"] not in TERMINAL]
    no_reason = [r["id"] for r in rows if not r["reason"]]
    # demo.record creates <execution>.<attempt> exclusively: a second run of the same
    # attempt fails with FileExistsError, which shows up in the execution's error.
    reran = await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1) "
        "AND error->>'type' = 'FileExistsError'", ids)
    succeeded_twice = await env.pool.fetchval(
        "SELECT count(*) FROM (SELECT execution_id FROM execution_history "
        "WHERE execution_id = ANY($1) AND to_status = 'SUCCEEDED' "
        "GROUP BY execution_id HAVING count(*) > 1) twice", ids)
    duplicated = reran + succeeded_twice
    assert lost == 0, f"{lost} executions lost"
    assert not stuck, f"{len(stuck)} executions stuck: {stuck[:5]}"
    assert not no_reason, f"{len(no_reason)} terminal executions without a reason"
    assert duplicated == 0, f"{duplicated} attempts ran twice"
    worker_lost = await env.pool.fetchval(
        "SELECT count(*) FROM execution_history WHERE execution_id = ANY($1) "
        "AND reason = 'worker_lost'", ids)
    return {"lost": lost, "duplicated": duplicated, "stuck": len(stuck),
            "worker_lost": worker_lost}


async def worker_id(env: Env, name: str) -> str:
    async def check() -> str | None:
        return await env.pool.fetchval(
            "SELECT id FROM workers WHERE name = $1 AND status = 'ACTIVE'", name)

    return await wait_until(check, timeout=30, what=f"worker {name} to register")


async def in_state_on(env: Env, wid: str, *states: str) -> int:
    return await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE worker_id = $1 AND status = ANY($2)",
        wid, list(states))


async def record_load(env: Env, n: int, seconds: float, **kw) -> list:
    runs = env.tmp / "runs"
    runs.mkdir(exist_ok=True)
    return await env.submit("demo.record", {"dir": str(runs), "seconds": seconds}, n=n, **kw)
