"""Schedules fired by real executors: cadence, overlap policies, pause, and the CLI."""

import json
import time
from datetime import datetime
from itertools import pairwise

from tests.harness import Env, sample, scrape_until, wait_until

METRICS_PORT = 19311


async def _fired(env: Env, name: str, *states: str) -> list[tuple[datetime, str]]:
    """(fire time, status) of each execution the schedule made, by fire time."""
    rows = await env.pool.fetch(
        "SELECT idempotency_key, status FROM executions WHERE idempotency_key LIKE $1 "
        "AND (cardinality($2::text[]) = 0 OR status = ANY($2)) ORDER BY idempotency_key",
        f"schedule:{name}:%", list(states))
    return [(datetime.fromisoformat(r["idempotency_key"].split(":", 2)[2]), r["status"])
            for r in rows]


def _add(env: Env, *args: str) -> None:
    result = env.cli("schedules", "add", *args)
    assert result.returncode == 0, result.stderr


async def test_two_executors_fire_an_interval_schedule_once_per_tick(env: Env):
    env.executor("e1")
    env.executor("e2")
    env.worker("w1")
    await env.live_workers(1)
    _add(env, "tick", "demo.noop", "--every", "1s")

    async def five_done() -> list | None:
        done = await _fired(env, "tick", "SUCCEEDED")
        return done if len(done) >= 5 else None

    done = await wait_until(five_done, timeout=30, what="five firings to succeed")
    times = [t for t, _ in done]
    gaps = [(b - a).total_seconds() for a, b in pairwise(times)]
    # One firing per tick, all on the schedule's phase: no duplicate, none in between.
    assert all(g >= 1 and g == int(g) for g in gaps), gaps
    [listed] = json.loads(env.cli("schedules", "ls", "--json").stdout)
    assert listed["name"] == "tick" and listed["skipped"] == 0
    assert listed["last_fired_at"] is not None


async def test_cancel_previous_cancels_the_unfinished_firing_and_fires(env: Env):
    env.executor()
    env.worker("w1")
    await env.live_workers(1)
    _add(env, "restart", "demo.sleep", "-p", "seconds=60", "--every", "1s",
         "--overlap", "cancel_previous")

    async def two_cancelled() -> bool:
        return len(await _fired(env, "restart", "CANCELLED")) >= 2

    await wait_until(two_cancelled, timeout=30, what="two firings cancelled by the next")
    history = await env.pool.fetch(
        "SELECT DISTINCT h.actor FROM execution_history h JOIN executions e "
        "ON e.id = h.execution_id WHERE e.idempotency_key LIKE 'schedule:restart:%' "
        "AND h.to_status = 'CANCELLED'")
    assert [r["actor"] for r in history] == ["schedule:restart"]
    running = await _fired(env, "restart", "REQUESTED", "SCHEDULED", "RUNNING")
    assert len(running) <= 1, "each firing cancelled the one before"


async def test_allow_overlap_runs_firings_side_by_side(env: Env):
    env.executor()
    env.worker("w1", capacity=4)
    await env.live_workers(1)
    _add(env, "pile", "demo.sleep", "-p", "seconds=60", "--every", "1s", "--overlap", "allow")

    async def three_running() -> bool:
        return len(await _fired(env, "pile", "RUNNING")) >= 3

    await wait_until(three_running, timeout=30, what="three firings running at once")


async def test_a_paused_schedule_does_not_fire_until_resumed(env: Env):
    env.executor(metrics_port=METRICS_PORT)
    # Nobody runs them, so each firing stays REQUESTED: `allow` fires on regardless.
    _add(env, "nap", "nobody.offers.this", "--every", "1s", "--overlap", "allow")

    async def fired_once() -> bool:
        return len(await _fired(env, "nap")) >= 1

    await wait_until(fired_once, timeout=15, what="the first firing")
    assert env.cli("schedules", "pause", "nap").returncode == 0
    paused_at = time.time()
    before = len(await _fired(env, "nap"))

    # Two seconds of schedule sweeps after the pause: the 1s schedule was due twice.
    await scrape_until(METRICS_PORT, lambda text: (sample(
        text, "vigil_loop_last_completed_timestamp_seconds", loop="schedules") or 0)
        > paused_at + 2, "schedule sweeps after the pause")
    assert len(await _fired(env, "nap")) == before
    [listed] = json.loads(env.cli("schedules", "ls", "--json").stdout)
    assert listed["paused"] is True

    assert env.cli("schedules", "resume", "nap").returncode == 0

    async def fired_again() -> bool:
        return len(await _fired(env, "nap")) > before

    await wait_until(fired_again, timeout=15, what="a firing after resume")


async def test_bad_schedules_are_refused_and_change_nothing(env: Env):
    for args in (["s", "demo.noop"], ["s", "demo.noop", "--every", "1s", "--cron", "* * * * *"],
                 ["s", "demo.noop", "--cron", "61 * * * *"], ["s", "demo.noop", "--every", "soon"],
                 ["s", "demo.noop", "--every", "1.5s"], [" ", "demo.noop", "--every", "1s"],
                 ["s", "demo.noop", "--every", "1s", "--overlap", "queue"],
                 ["s", "demo.noop", "--every", "1s", "-p", "novalue"],
                 ["s", "demo.noop", "--every", "1s", "--timeout", "0"]):
        result = env.cli("schedules", "add", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert json.loads(env.cli("schedules", "ls", "--json").stdout) == []
    _add(env, "s", "demo.noop", "--cron", "0 3 * * *", "--timeout", "30", "--max-attempts", "2")
    again = env.cli("schedules", "add", "s", "demo.noop", "--every", "1s")
    assert again.returncode == 1 and "schedule 's' exists" in again.stderr
    for command in ("rm", "pause", "resume"):
        missing = env.cli("schedules", command, "nope")
        assert missing.returncode == 1 and "no schedule 'nope'" in missing.stderr
    [listed] = json.loads(env.cli("schedules", "ls", "--json").stdout)
    assert (listed["cron"], listed["every_s"], listed["timeout_s"], listed["max_attempts"]) \
        == ("0 3 * * *", None, 30, 2)
    assert env.cli("schedules", "rm", "s").returncode == 0
    assert "no schedules" in env.cli("schedules", "ls").stdout
