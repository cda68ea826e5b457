"""Seed 000: one schedule whose run is stuck must not spam the log, nor stop anything
else being fired or dispatched."""

from __future__ import annotations

import json
import time

from tests.drills.conftest import DrillResult
from tests.drills.support import check_promises, record_load
from tests.harness import Env, sample, scrape_until, wait_until

METRICS_PORT = 19321


async def _keys(env: Env, name: str, status: str) -> list[str]:
    rows = await env.pool.fetch(
        "SELECT id FROM executions WHERE idempotency_key LIKE $1 AND status = $2",
        f"schedule:{name}:%", status)
    return [r["id"] for r in rows]


async def test_a_stuck_scheduled_run_is_skipped_quietly_and_starves_nothing(
    env: Env, drill_report: DrillResult
):
    executor = env.executor(metrics_port=METRICS_PORT)
    env.worker("w1", capacity=4)
    await env.live_workers(1)
    # `stuck` runs for an hour, but each run's start-to-close timeout is 15 s.
    for args in (["stuck", "demo.sleep", "-p", "seconds=3600", "--every", "1s",
                  "--timeout", "15"],
                 ["fast", "demo.noop", "--every", "1s"]):
        result = env.cli("schedules", "add", *args)
        assert result.returncode == 0, result.stderr

    async def stuck_running() -> list[str] | None:
        return await _keys(env, "stuck", "RUNNING") or None

    [stuck_id] = await wait_until(stuck_running, timeout=15, what="the stuck run to start")
    # Work submitted on its own, as events would, while the schedule is stuck.
    began = time.monotonic()
    ids = await record_load(env, 50, seconds=0)
    await env.all_terminal(ids, timeout=30)
    recovery = time.monotonic() - began

    async def five_ticks_later() -> bool:
        listed = {s["name"]: s for s in json.loads(env.cli("schedules", "ls", "--json").stdout)}
        # Each tick of `stuck` is skipped while `fast` fires on.
        return listed["stuck"]["skipped"] >= 5 and \
            len(await _keys(env, "fast", "SUCCEEDED")) >= 5

    await wait_until(five_ticks_later, timeout=30, what="five more ticks of both schedules")
    skipped = await env.pool.fetchval("SELECT skipped FROM schedules WHERE name = 'stuck'")
    assert await _keys(env, "stuck", "RUNNING") == [stuck_id], "no second run piled up"
    warnings = executor.log().count("schedule stuck skipped a firing")
    assert warnings == 1, f"logged {warnings} times: once a minute, with a count"

    # What the VigilScheduleStuck alert watches.
    await scrape_until(METRICS_PORT, lambda text: (sample(
        text, "vigil_schedule_skipped_ticks", schedule="stuck") or 0) >= 1,
        "vigil_schedule_skipped_ticks")

    # The timeout monitor ends the stuck run like any other; the next tick fires again.
    async def healed() -> bool:
        timed_out = await _keys(env, "stuck", "TIMED_OUT")
        return timed_out == [stuck_id] and bool(await _keys(env, "stuck", "RUNNING"))

    await wait_until(healed, timeout=30, what="the stuck run to time out and a new one run")
    drill_report.figures.update(await check_promises(env, ids))
    drill_report.figures.update(recovery_s=round(recovery, 2), skipped=skipped,
                                skip_warnings=warnings)
