"""Delays across restarts: executions delayed by seconds start within a second of being
due, never before, exactly once, while executors and workers are SIGKILLed and
restarted under them."""

from __future__ import annotations

import asyncio
import random
import signal
import time

from common.submission import Submission
from tests.drills.conftest import DrillResult
from tests.drills.support import check_promises
from tests.harness import Env, Proc

DELAYED = 200
MIN_DELAY_S, MAX_DELAY_S = 1.0, 20.0
KILL_EVERY_S = 3.0
ON_TIME_S = 1.0


async def test_delayed_executions_start_when_due_while_services_are_sigkilled(
    env: Env, drill_report: DrillResult
):
    # Two of each, killed one at a time: there is always one to dispatch and one to run.
    alive: dict[str, list[Proc]] = {
        "executor": [env.executor("e1"), env.executor("e2")],
        "worker": [env.worker("w1", capacity=4), env.worker("w2", capacity=4)],
    }
    await env.live_workers(2)
    runs = env.tmp / "runs"
    runs.mkdir()
    rng = random.Random(3)
    submitted = await env.client.submit_many(
        Submission("demo.record", {"dir": str(runs)},
                   delay_s=rng.uniform(MIN_DELAY_S, MAX_DELAY_S)) for _ in range(DELAYED))
    ids = [s.id for s in submitted]
    due = dict(await env.pool.fetch(
        "SELECT id, not_before FROM executions WHERE id = ANY($1)", ids))

    began = time.monotonic()
    kills = 0
    while time.monotonic() - began < MAX_DELAY_S:  # the chaos, paced
        await asyncio.sleep(KILL_EVERY_S)
        kind = ("executor", "worker")[kills % 2]
        victim = alive[kind].pop(0)
        victim.signal(signal.SIGKILL)
        kills += 1
        name = f"{kind[0]}{kills + 2}"
        alive[kind].append(env.executor(name) if kind == "executor"
                           else env.worker(name, capacity=4))
    await env.all_terminal(ids, timeout=90)
    drill_report.figures.update(await check_promises(env, ids))

    # The first start of each (attempt 1's RUNNING; a retry moves not_before, not this).
    started = dict(await env.pool.fetch(
        "SELECT execution_id, min(at) FROM execution_history WHERE execution_id = ANY($1) "
        "AND to_status = 'RUNNING' GROUP BY execution_id", ids))
    late = sorted((started[i] - due[i]).total_seconds() for i in ids)
    drill_report.figures.update(
        kills=kills, late_min_ms=round(late[0] * 1000),
        late_p50_ms=round(late[len(late) // 2] * 1000), late_max_ms=round(late[-1] * 1000))
    assert late[0] >= 0, f"started {-late[0]:.3f}s before it was due"
    assert late[-1] < ON_TIME_S, f"started {late[-1]:.3f}s after it was due"
    assert await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1) AND status <> 'SUCCEEDED'",
        ids) == 0
