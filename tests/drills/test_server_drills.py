"""Server restarts under load: RabbitMQ and PostgreSQL, with every service left running.

Losing the broker costs latency, never executions; losing the database pauses
everything and fails nothing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from tests.drills.conftest import DrillResult
from tests.drills.support import check_promises, record_load
from tests.harness import REPO, Env, management, wait_until


def restart(server: str) -> float:
    """Stop and start one local server; return how long it was down."""
    began = time.monotonic()
    for step in ("down", "up"):
        subprocess.run([sys.executable, "-m", "scripts.stack", step, server], cwd=REPO,
                       check=True, capture_output=True, timeout=120)
    return time.monotonic() - began


async def under_load(env: Env, n: int) -> list:
    env.executor()
    env.worker("w1", capacity=4)
    env.worker("w2", capacity=4)
    await env.live_workers(2)
    ids = await record_load(env, n, seconds=0.1)

    async def some_done() -> bool:
        return await env.pool.fetchval(
            "SELECT count(*) FROM executions WHERE status = 'SUCCEEDED'") >= 20

    await wait_until(some_done, timeout=60, what="load under way")
    return ids


async def test_rabbitmq_restart_mid_load_loses_nothing_and_consumers_come_back(
    env: Env, drill_report: DrillResult
):
    ids = await under_load(env, 200)
    outage = await asyncio.to_thread(restart, "rabbitmq")
    back = time.monotonic()

    def consumers() -> dict[str, int]:
        return {q["name"]: q.get("consumers", 0) for q in management(f"queues/{env.name}")}

    seen: list[dict] = []

    async def consumers_back() -> dict | None:
        c = await asyncio.to_thread(consumers)
        seen[:] = [c]
        workers_consuming = [n for n, k in c.items() if n.startswith("vigil.worker.") and k]
        return c if len(workers_consuming) == 2 and c.get("vigil.dead-letters") else None

    await wait_until(consumers_back, timeout=60, interval=0.5,
                     what=lambda: f"consumers restored (last seen {seen})")
    restored = time.monotonic() - back
    await env.all_terminal(ids, timeout=180)
    drill_report.figures.update(await check_promises(env, ids))
    drill_report.figures.update(outage_s=round(outage, 1), recovery_s=round(restored, 2))
    assert all(p.popen.poll() is None for p in env.procs), "a service died"
    assert drill_report.figures["worker_lost"] == 0, "a healthy worker was taken for lost"
    assert await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1) AND status <> 'SUCCEEDED'",
        ids) == 0
    # And the restored consumers take new work.
    [after] = await env.submit("demo.add", {"a": 1, "b": 2})
    assert await env.all_terminal([after], timeout=30) == {"SUCCEEDED": 1}


async def test_postgres_restart_mid_load_recovers_with_no_false_failures(
    env: Env, drill_report: DrillResult
):
    ids = await under_load(env, 200)
    await env.pool.expire_connections()
    outage = await asyncio.to_thread(restart, "postgres")
    back = time.monotonic()
    await env.all_terminal(ids, timeout=180)
    drill_report.figures.update(await check_promises(env, ids))
    drill_report.figures.update(outage_s=round(outage, 1),
                                recovery_s=round(time.monotonic() - back, 2))
    assert all(p.popen.poll() is None for p in env.procs), "a service died"
    assert drill_report.figures["worker_lost"] == 0, "a healthy worker was taken for lost"
    failed = await env.pool.fetch(
        "SELECT status, reason FROM executions WHERE id = ANY($1) AND status <> 'SUCCEEDED'",
        ids)
    assert failed == [], failed
    [after] = await env.submit("demo.add", {"a": 1, "b": 2})
    assert await env.all_terminal([after], timeout=30) == {"SUCCEEDED": 1}
