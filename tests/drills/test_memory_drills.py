"""Memory drills (seed 003): poison pills that run into their memory cap among normal
work, and a worker whose children hold so much memory that it stops taking work."""

from __future__ import annotations

import asyncio
import statistics
import time

from tests.drills.conftest import DrillResult
from tests.drills.support import check_promises, in_state_on, record_load, worker_id
from tests.harness import Env, wait_until

MIB = 2**20
HOGS = 5
NORMAL = 500
BATCHES = 50  # the normal ones arrive in this many batches, one every PACE_S
PACE_S = 0.2


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def test_memory_hogs_among_500_executions_end_poison_and_spare_their_workers(
    env: Env, drill_report: DrillResult
):
    env.executor()
    procs = [env.worker(name, capacity=4) for name in ("w1", "w2")]
    await env.live_workers(2)
    registered = {r["id"]: r["pid"] for r in await env.pool.fetch("SELECT id, pid FROM workers")}
    normal: list = []
    hogs: list = []
    for batch in range(BATCHES):  # a steady arrival, the hogs among it
        normal += await record_load(env, NORMAL // BATCHES, seconds=0.01)
        if batch % (BATCHES // HOGS) == BATCHES // HOGS // 2:
            hogs += await env.submit("demo.memory_hog")
        await asyncio.sleep(PACE_S)
    await env.all_terminal(normal + hogs, timeout=120)
    drill_report.figures.update(await check_promises(env, normal + hogs))

    ended = await env.pool.fetch(
        "SELECT status, reason, attempt, max_attempts FROM executions WHERE id = ANY($1)", hogs)
    assert all((h["status"], h["reason"], h["attempt"]) == ("FAILED", "poison", h["max_attempts"])
               for h in ended), [dict(h) for h in ended]
    attempts = await env.pool.fetch(
        "SELECT error->>'kind' AS kind, (usage->>'peak_rss_bytes')::bigint AS peak "
        "FROM execution_history WHERE execution_id = ANY($1) AND from_status = 'RUNNING'", hogs)
    assert {a["kind"] for a in attempts} <= {"memory_limit", "killed"}, attempts
    assert len(attempts) == sum(h["attempt"] for h in ended)

    # Both workers lived through it: the same processes, never registered again.
    assert all(p.popen.poll() is None for p in procs)
    assert sorted(registered.values()) == sorted(p.pid for p in procs)
    assert {r["id"]: r["pid"] for r in await env.pool.fetch(
        "SELECT id, pid FROM workers WHERE status = 'ACTIVE'")} == registered

    waits = [r["wait"] for r in await env.pool.fetch(
        "SELECT extract(epoch FROM started_at - created_at)::float8 AS wait FROM executions "
        "WHERE id = ANY($1) AND status = 'SUCCEEDED'", normal)]
    assert len(waits) == NORMAL, "a normal execution did not succeed"
    peaks = [a["peak"] for a in attempts if a["peak"] is not None]
    drill_report.figures.update(
        hog_attempts=len(attempts), hog_ends="/".join(sorted({a["kind"] for a in attempts})),
        hog_peak_mib=round(max(peaks) / MIB) if peaks else "-",
        start_p50_ms=round(statistics.median(waits) * 1000),
        start_p99_ms=round(p99(waits) * 1000))


async def test_worker_over_its_memory_budget_takes_no_work_until_its_children_free_it(
    env: Env, drill_report: DrillResult
):
    env.executor()
    env.worker("big", capacity=2, VIGIL_WORKER_MEMORY_BUDGET_MB="400")
    big = await worker_id(env, "big")

    async def memory(worker: str) -> tuple[int | None, bool]:
        row = await env.pool.fetchrow(
            "SELECT memory_bytes, memory_pressure FROM workers WHERE id = $1", worker)
        return row["memory_bytes"], row["memory_pressure"]

    async def measured() -> int | None:
        return (await memory(big))[0]

    idle = await wait_until(measured, timeout=10, what="big's first memory sample")
    release = env.tmp / "release"
    holds = await env.submit("demo.hold", {"mib": 180, "until": str(release)}, n=2)
    queued = await record_load(env, 4, seconds=0)  # held by big while its children hold

    async def both_holding() -> bool:
        return await in_state_on(env, big, "RUNNING") == 2

    await wait_until(both_holding, timeout=30, interval=0.02, what="both holds running on big")
    holding_at = time.monotonic()

    async def pressured() -> int | None:
        used, pressure = await memory(big)
        return used if pressure else None

    peak = await wait_until(pressured, timeout=10, interval=0.05, what="big under pressure")
    detection = time.monotonic() - holding_at
    # What it held goes back (refused_memory), and nothing more comes to it.
    env.worker("other", capacity=2)
    other = await worker_id(env, "other")
    await env.all_terminal(queued, timeout=30)
    ran_on = {r["worker_id"] for r in await env.pool.fetch(
        "SELECT worker_id FROM executions WHERE id = ANY($1) AND status = 'SUCCEEDED'", queued)}
    assert ran_on == {other}, f"queued work ran on {ran_on}, not only on {other}"

    released_at = time.monotonic()
    release.touch()

    async def relieved() -> bool:
        return not (await memory(big))[1]

    await wait_until(relieved, timeout=15, interval=0.05, what="big to take work again")
    recovery = time.monotonic() - released_at
    await env.all_terminal(holds, timeout=15)
    later = await record_load(env, 20, seconds=0.2)
    await env.all_terminal(later, timeout=60)
    on_big = await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1) AND worker_id = $2", later, big)
    refused = await env.pool.fetchval(
        "SELECT count(*) FROM execution_history WHERE execution_id = ANY($1) "
        "AND reason = 'refused_memory'", queued)
    drill_report.figures.update(await check_promises(env, holds + queued + later))
    drill_report.figures.update(
        detection_s=round(detection, 2), recovery_s=round(recovery, 2),
        idle_mib=round(idle / MIB), peak_mib=round(peak / MIB), refused=refused,
        later_on_big=on_big)
    assert refused >= 1, "big gave nothing back when its gate closed"
    assert on_big > 0, "big took no work after its memory was freed"
    # Given back for memory, never counted as a delivery (each refusal is `unpublished`,
    # as a failed publish is), so nothing can fail max_dispatches for it.
    assert await env.pool.fetchval(
        "SELECT sum(unpublished) FROM executions WHERE id = ANY($1)", queued) == refused
    assert await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1) AND status <> 'SUCCEEDED'",
        holds + queued + later) == 0
