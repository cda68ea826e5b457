"""Worker failure drills: SIGKILL, SIGTERM, SIGSTOP, and a queue nobody consumes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from common.state_machine import ExecutionStatus
from tests.drills.conftest import DrillResult
from tests.drills.support import check_promises, in_state_on, record_load, worker_id
from tests.harness import Env, deaf_worker, get, wait_until


async def sigkill_drill(env: Env, report: DrillResult, detect_within: float) -> None:
    victim = env.worker("victim", capacity=4)
    victim_id = await worker_id(env, "victim")
    env.worker("survivor", capacity=4)
    await worker_id(env, "survivor")
    ids = await record_load(env, 40, seconds=1.0)

    async def victim_busy() -> bool:
        return await in_state_on(env, victim_id, "RUNNING") >= 3

    await wait_until(victim_busy, timeout=30, interval=0.02, what="victim to run work")
    affected = [r["id"] for r in await env.pool.fetch(
        "SELECT id FROM executions WHERE worker_id = $1 AND status IN "
        "('SCHEDULED', 'RUNNING')", victim_id)]
    killed_at = time.monotonic()
    victim.signal(signal.SIGKILL)

    async def lost() -> bool:
        return await env.pool.fetchval(
            "SELECT status FROM workers WHERE id = $1", victim_id) == "LOST"

    await wait_until(lost, timeout=detect_within + 5, interval=0.05, what="victim LOST")
    detection = time.monotonic() - killed_at

    async def recovered() -> bool:
        return await env.pool.fetchval(
            "SELECT count(*) FROM executions WHERE id = ANY($1) AND worker_id = $2 "
            "AND status IN ('SCHEDULED', 'RUNNING')", affected, victim_id) == 0

    await wait_until(recovered, timeout=30, interval=0.05, what="victim's work recovered")
    recovery = time.monotonic() - killed_at
    await env.all_terminal(ids, timeout=120)
    report.figures.update(await check_promises(env, ids))
    report.figures.update(detection_s=round(detection, 2), recovery_s=round(recovery, 2),
                          affected=len(affected))
    assert detection < detect_within, f"LOST after {detection:.1f}s"
    outcomes = await env.pool.fetch(
        "SELECT status, reason, attempt, worker_id FROM executions WHERE id = ANY($1)",
        affected)
    for o in outcomes:
        # Re-run elsewhere (attempt 2 on the survivor), or FAILED worker_lost.
        assert (o["status"] == ExecutionStatus.SUCCEEDED and o["worker_id"] != victim_id) or \
            (o["status"] == ExecutionStatus.FAILED and o["reason"] == "worker_lost"), dict(o)


async def test_sigkill_worker_is_lost_within_2s_and_its_work_reruns(
    env: Env, drill_report: DrillResult
):
    env.executor()
    await sigkill_drill(env, drill_report, detect_within=2.0)


async def test_sigkill_worker_without_connection_events_is_lost_by_heartbeat(
    env: Env, drill_report: DrillResult
):
    # The default heartbeat (10 s, stale at 3x) is the backstop when events are off.
    env.extra_env.update(VIGIL_WORKER_HEARTBEAT_INTERVAL_S="10",
                         VIGIL_EXECUTOR_HEARTBEAT_INTERVAL_S="10")
    env.executor(VIGIL_EXECUTOR_WORKER_EVENTS="false")
    await sigkill_drill(env, drill_report, detect_within=35.0)


async def test_sigterm_worker_under_load_drains_without_loss(
    env: Env, drill_report: DrillResult
):
    env.executor()
    victim = env.worker("victim", capacity=4)
    victim_id = await worker_id(env, "victim")
    env.worker("survivor", capacity=4)
    await worker_id(env, "survivor")
    ids = await record_load(env, 60, seconds=0.5)

    async def victim_busy() -> bool:
        return await in_state_on(env, victim_id, "RUNNING") >= 2

    await wait_until(victim_busy, timeout=30, interval=0.02, what="victim to run work")
    stopped_at = time.monotonic()
    victim.signal(signal.SIGTERM)

    async def draining_or_gone() -> bool:
        return await env.pool.fetchval(
            "SELECT status FROM workers WHERE id = $1", victim_id) in ("DRAINING", "INACTIVE")

    await wait_until(draining_or_gone, timeout=5, interval=0.02, what="victim DRAINING")
    detection = time.monotonic() - stopped_at

    async def nothing_queued() -> bool:
        return await in_state_on(env, victim_id, "SCHEDULED") == 0

    await wait_until(nothing_queued, timeout=5, interval=0.02, what="queued work moved")
    redispatched = time.monotonic() - stopped_at
    code = await asyncio.to_thread(victim.wait, 30)
    exited = time.monotonic() - stopped_at
    await env.all_terminal(ids, timeout=120)
    drill_report.figures.update(await check_promises(env, ids))
    drill_report.figures.update(detection_s=round(detection, 2),
                                recovery_s=round(redispatched, 2), exit_s=round(exited, 2))
    assert code == 0, victim.log()[-2000:]
    assert redispatched < 1.0
    assert exited < 10.0  # the grace period configured for tests
    assert await env.pool.fetchval(
        "SELECT status FROM workers WHERE id = $1", victim_id) == "INACTIVE"
    assert await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1) AND status <> 'SUCCEEDED'",
        ids) == 0


async def test_sigstopped_worker_late_completion_is_fenced_out(
    env: Env, drill_report: DrillResult
):
    env.executor()
    sleeper = env.worker("sleeper", capacity=1, metrics_port=19211)
    sleeper_id = await worker_id(env, "sleeper")
    [eid] = await record_load(env, 1, seconds=2.0)

    async def running() -> bool:
        return await in_state_on(env, sleeper_id, "RUNNING") == 1

    await wait_until(running, timeout=30, interval=0.02, what="attempt 1 to run")
    sleeper.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    env.worker("healthy", capacity=1)

    async def rerun_done() -> bool:
        return await env.pool.fetchval(
            "SELECT status FROM executions WHERE id = $1", eid) == "SUCCEEDED"

    await wait_until(rerun_done, timeout=30, interval=0.05, what="attempt 2 elsewhere")
    recovery = time.monotonic() - stopped_at
    settled = dict(await env.pool.fetchrow("SELECT * FROM executions WHERE id = $1", eid))
    assert settled["attempt"] == 2 and settled["worker_id"] != sleeper_id
    sleeper.signal(signal.SIGCONT)

    async def fenced() -> float | None:
        _, text = await asyncio.to_thread(get, 19211, "/metrics")
        total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("vigil_fenced_writes_total{"))
        revoked = "no longer ours" in sleeper.log()
        return total or (1.0 if revoked else None)

    await wait_until(fenced, timeout=20, interval=0.2, what="the late write to be fenced")
    after = dict(await env.pool.fetchrow("SELECT * FROM executions WHERE id = $1", eid))
    assert after == settled, "the woken worker changed the execution"
    # The woken worker is alive after all: it heartbeats itself back to ACTIVE.

    async def active_again() -> bool:
        return await env.pool.fetchval(
            "SELECT status FROM workers WHERE id = $1", sleeper_id) == "ACTIVE"

    await wait_until(active_again, timeout=10, what="sleeper ACTIVE again")
    drill_report.figures.update(await check_promises(env, [eid]))
    drill_report.figures.update(recovery_s=round(recovery, 2))


async def test_undelivered_messages_dead_letter_at_ttl_and_are_redispatched(
    env: Env, drill_report: DrillResult
):
    # A worker that registered and then stopped consuming: its queue fills, nobody reads.
    async with deaf_worker(env, ["demo.record"], message_ttl_ms=2000) as deaf:
        env.executor()
        ids = await record_load(env, 10, seconds=0)

        async def all_sent_to_deaf() -> bool:
            return await in_state_on(env, deaf.id, "SCHEDULED") == 10

        await wait_until(all_sent_to_deaf, timeout=15, interval=0.05, what="dispatch to deaf")
        sent_at = time.monotonic()
        # Under "memory pressure" once it holds the work, so nothing new goes to it.
        deaf.memory_pressure = True
        env.worker("healthy", capacity=4)
        await env.all_terminal(ids, timeout=60)
    recovery = time.monotonic() - sent_at
    reasons = await env.pool.fetch(
        "SELECT DISTINCT reason FROM execution_history WHERE execution_id = ANY($1) "
        "AND from_status = 'SCHEDULED' AND to_status = 'REQUESTED'", ids)
    drill_report.figures.update(await check_promises(env, ids))
    drill_report.figures.update(recovery_s=round(recovery, 2))
    assert {r["reason"] for r in reasons} == {"dead_letter_expired"}
    assert await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1) AND status = 'SUCCEEDED'",
        ids) == 10


async def test_a_second_sigterm_exits_at_once_and_takes_the_children(
    env: Env, drill_report: DrillResult
):
    env.executor()
    victim = env.worker("victim", capacity=1)
    victim_id = await worker_id(env, "victim")
    pidfile = env.tmp / "child.pid"
    [eid] = await env.submit("shell", {"argv": ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"]})

    async def child_pid() -> int | None:
        if pidfile.exists() and pidfile.read_text().strip():
            return int(pidfile.read_text())
        return None

    pid = await wait_until(child_pid, timeout=30, what="the attempt to start")
    victim.signal(signal.SIGTERM)

    async def draining() -> bool:
        return await env.pool.fetchval(
            "SELECT status FROM workers WHERE id = $1", victim_id) == "DRAINING"

    await wait_until(draining, timeout=5, interval=0.02, what="DRAINING")
    second_at = time.monotonic()
    victim.signal(signal.SIGTERM)
    code = await asyncio.to_thread(victim.wait, 5)
    exited = time.monotonic() - second_at

    async def child_gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await wait_until(child_gone, timeout=5, interval=0.02, what="the child to die with it")
    drill_report.figures.update(exit_s=round(exited, 2))
    assert code == 130 and exited < 1.0

    # The attempt it abandoned is recovered like any other lost one: attempt 2, waiting.
    async def retried() -> bool:
        row = await env.pool.fetchrow(
            "SELECT status, attempt FROM executions WHERE id = $1", eid)
        return (row["status"], row["attempt"]) == ("REQUESTED", 2)

    await wait_until(retried, timeout=10, what="the abandoned attempt to be retried")
