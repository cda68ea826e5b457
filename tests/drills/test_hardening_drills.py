"""Hardening drills: racing executor replicas with idempotency keys, a frozen worker on
the shipped defaults, and retention under a continuous load."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from common.client import AsyncClient
from common.config import ExecutorSettings, WorkerSettings
from common.state_machine import TERMINAL
from common.submission import Submission
from tests.drills.conftest import DrillResult
from tests.drills.support import check_promises, in_state_on, record_load, worker_id
from tests.harness import FAST_TIMINGS, Env, Proc, get, management, wait_until

FROZEN_PORT = 19476


def _shipped_timings() -> dict[str, str]:
    """The variables FAST_TIMINGS shortens, set back to the defaults Vigil ships."""
    classes = {"VIGIL_WORKER_": WorkerSettings, "VIGIL_EXECUTOR_": ExecutorSettings}
    shipped = {}
    for var in FAST_TIMINGS:
        prefix = next(p for p in classes if var.startswith(p))
        field = classes[prefix].model_fields[var.removeprefix(prefix).lower()]
        shipped[var] = str(field.default)
    return shipped


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


async def _children(env: Env, ids: list) -> list[int] | None:
    """The pids of the children running attempt 1 of these (demo.record writes them)."""
    files = [env.tmp / "runs" / f"{i}.1" for i in ids]
    texts = [f.read_text() if f.exists() else "" for f in files]
    return [int(t) for t in texts] if all(texts) else None


async def _heartbeat_s(env: Env, worker: str) -> int | None:
    """The AMQP heartbeat the broker agreed with this worker's connection."""
    connections = await asyncio.to_thread(management, f"vhosts/{env.name}/connections")
    return next((c["timeout"] for c in connections
                 if (c.get("user_provided_name") or "").endswith(worker)), None)


@contextmanager
def _frozen(proc: Proc) -> Iterator[None]:
    """SIGSTOP a process for the block; SIGCONT it after, whatever happens."""
    proc.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.signal(signal.SIGCONT)


async def test_frozen_worker_on_shipped_defaults_is_replaced_within_10s(
    env: Env, drill_report: DrillResult
):
    env.extra_env.update(_shipped_timings())
    env.executor()
    sleeper = env.worker("sleeper", capacity=2, metrics_port=FROZEN_PORT)
    sleeper_id = await worker_id(env, "sleeper")
    # Long enough to still run when the worker wakes, so that it must kill the child.
    ids = await record_load(env, 2, seconds=25)

    async def running() -> bool:
        return await in_state_on(env, sleeper_id, "RUNNING") == 2

    await wait_until(running, timeout=30, interval=0.05, what="both attempts to run")
    children = await wait_until(lambda: _children(env, ids), timeout=10,
                                what="the children's pids")
    env.worker("healthy", capacity=2)
    healthy_id = await worker_id(env, "healthy")
    heartbeat_s = await wait_until(lambda: _heartbeat_s(env, sleeper_id), timeout=10,
                                   what="the sleeper's connection in the management API")
    with _frozen(sleeper):
        stopped_at = time.monotonic()
        frozen_since = await env.pool.fetchval("SELECT now()")

        async def lost() -> bool:
            return await env.pool.fetchval(
                "SELECT status FROM workers WHERE id = $1", sleeper_id) == "LOST"

        await wait_until(lost, timeout=30, interval=0.05, what="the frozen worker LOST")
        detection = time.monotonic() - stopped_at

        async def rerun() -> bool:
            return await in_state_on(env, healthy_id, "RUNNING") == 2

        await wait_until(rerun, timeout=30, interval=0.05, what="attempt 2 elsewhere")
        recovery = time.monotonic() - stopped_at
        settled = [dict(r) for r in await env.pool.fetch(
            "SELECT * FROM executions WHERE id = ANY($1) ORDER BY id", ids)]
        assert all(_alive(pid) for pid in children)  # the frozen worker's, still running
    # Awake: the worker finds it no longer owns the attempts and kills their children.

    async def children_gone() -> bool:
        return not any(_alive(pid) for pid in children)

    await wait_until(children_gone, timeout=10, interval=0.05, what="the old children killed")
    late = await env.pool.fetchval(
        "SELECT count(*) FROM execution_history WHERE actor = $1 AND at >= $2",
        f"worker:{sleeper_id}", frozen_since)
    assert late == 0, "the woken worker wrote to the history"
    assert [dict(r) for r in await env.pool.fetch(
        "SELECT * FROM executions WHERE id = ANY($1) ORDER BY id", ids)] == settled
    _, text = await asyncio.to_thread(get, FROZEN_PORT, "/metrics")
    await env.all_terminal(ids, timeout=60)
    drill_report.figures.update(await check_promises(env, ids))
    drill_report.figures.update(
        detection_s=round(detection, 2), recovery_s=round(recovery, 2),
        amqp_heartbeat_s=heartbeat_s,
        fenced=int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("vigil_fenced_writes_total{"))))
    assert recovery <= 10.0, f"ran elsewhere only after {recovery:.1f}s"


CLIENTS = 4
PER_CLIENT = 1250
REPEAT_EVERY = 10  # one submission in ten repeats a key another client submits
SUBMIT_BATCH = 25


def _keys(client: int) -> list[str]:
    """What one client submits: keys of its own, and every tenth one the key the next
    client submits at about the same moment (its own key of the position before)."""
    return [f"k-{(client + 1) % CLIENTS}-{j - 1}" if j % REPEAT_EVERY == REPEAT_EVERY - 1
            else f"k-{client}-{j}" for j in range(PER_CLIENT)]


async def _submit_as_client(env: Env, client: int, params: dict) -> dict[str, set]:
    """Submit one client's keys from a pool of its own, in small batches; return the ids
    each key was answered with."""
    answers: dict[str, set] = {}
    async with await AsyncClient.connect(
            env.db.model_copy(update={"pool_min_size": 1, "pool_max_size": 2}),
            actor=f"client-{client}") as vigil:
        keys = _keys(client)
        for i in range(0, len(keys), SUBMIT_BATCH):
            batch = keys[i:i + SUBMIT_BATCH]
            submitted = await vigil.submit_many(
                [Submission("demo.record", params, idempotency_key=k) for k in batch])
            for key, s in zip(batch, submitted, strict=True):
                answers.setdefault(key, set()).add(s.id)
    return answers


async def _chaos(executors: list[Proc], env: Env, stop: asyncio.Event,
                 rng: random.Random) -> int:
    """SIGKILL a random executor every 1.5-3 s and start a new one in its place; return
    how many were killed."""
    kills = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(1.5, 3.0))
        except TimeoutError:
            i = rng.randrange(len(executors))
            executors[i].signal(signal.SIGKILL)
            kills += 1
            executors[i] = env.executor(f"e{i}-{kills}")
    return kills


async def test_racing_replicas_killed_at_random_with_idempotent_clients(
    env: Env, drill_report: DrillResult
):
    # A dispatch committed by an executor killed before publishing it is healed by the
    # schedule-to-start timeout: shortened, so that the drill does not wait a minute.
    env.extra_env["VIGIL_EXECUTOR_SCHEDULE_TO_START_TIMEOUT_S"] = "5"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    executors = [env.executor(f"e{i}") for i in range(3)]
    env.worker("w1", capacity=8)
    env.worker("w2", capacity=8)
    await env.live_workers(2)
    runs = env.tmp / "runs"
    runs.mkdir()
    began = time.monotonic()
    stop = asyncio.Event()
    chaos = asyncio.create_task(_chaos(executors, env, stop, rng))
    try:
        answers: dict[str, set] = {}
        for client_answers in await asyncio.gather(*(
                _submit_as_client(env, c, {"dir": str(runs), "seconds": 0})
                for c in range(CLIENTS))):
            for key, ids in client_answers.items():
                answers.setdefault(key, set()).update(ids)
        submitted_in = time.monotonic() - began
        rows = {r["idempotency_key"]: r["id"] for r in await env.pool.fetch(
            "SELECT id, idempotency_key FROM executions")}
        # No key created two executions, and every submit of a key got its execution.
        assert len(rows) == len(answers) == \
            CLIENTS * PER_CLIENT * (REPEAT_EVERY - 1) // REPEAT_EVERY
        assert all(ids == {rows[key]} for key, ids in answers.items())
        ids = list(rows.values())
        await env.all_terminal(ids, timeout=120)
    finally:
        stop.set()
        kills = await chaos
    drill_report.figures.update(await check_promises(env, ids))
    started_twice = await env.pool.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM execution_history WHERE to_status = 'RUNNING' "
        "GROUP BY execution_id, attempt HAVING count(*) > 1) twice")
    duplicated_events = await env.pool.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM execution_history "
        "GROUP BY execution_id, attempt, dispatch, to_status HAVING count(*) > 1) twice")
    drill_report.figures.update(
        recovery_s=round(time.monotonic() - began, 2), submitted_s=round(submitted_in, 2),
        executions=len(ids), submissions=CLIENTS * PER_CLIENT, executor_kills=kills,
        seed=seed)
    assert started_twice == 0 and duplicated_events == 0
    assert await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE status <> 'SUCCEEDED'") == 0


SOAK_S = 20.0
SOAK_RATE = 25  # executions submitted per second
RETENTION_S = 2.0
# The most history one execution of the soak writes: a demo.fail of two attempts is
# REQUESTED, SCHEDULED, RUNNING twice over, then FAILED.
HISTORY_PER_EXECUTION = 7

# Test-only: every row retention deletes, as it was when deleted.
AUDIT_PRUNING = """
CREATE TABLE pruned (id uuid, status text, finished_at timestamptz,
                     deleted_at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION audit_prune() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pruned (id, status, finished_at) VALUES (OLD.id, OLD.status, OLD.finished_at);
    RETURN OLD;
END $$;
CREATE TRIGGER audit_prune BEFORE DELETE ON executions
    FOR EACH ROW EXECUTE FUNCTION audit_prune();
"""


async def test_retention_keeps_tables_bounded_under_load_and_spares_unfinished_work(
    env: Env, drill_report: DrillResult
):
    await env.pool.execute(AUDIT_PRUNING)
    executor = env.executor(VIGIL_EXECUTOR_RETENTION_S=str(RETENTION_S),
                            VIGIL_EXECUTOR_RETENTION_INTERVAL_S="0.5")
    env.worker("w1", capacity=4)
    await env.live_workers(1)
    # Unfinished all along: running past the soak, and waiting for a worker nobody runs.
    running = await record_load(env, 2, seconds=SOAK_S + 2)
    waiting = await env.submit("nobody.offers.this", n=3)
    submitted: list = []
    peak = {"executions": 0, "history": 0}
    began = time.monotonic()
    while (elapsed := time.monotonic() - began) < SOAK_S:
        # Successes, failures, and failures retried once, each ending within a second
        # or so.
        submitted += await env.submit("demo.noop", n=SOAK_RATE // 5 * 3)
        submitted += await env.submit("demo.fail", max_attempts=1, n=SOAK_RATE // 5)
        submitted += await env.submit("demo.fail", max_attempts=2, n=SOAK_RATE // 5)
        counts = await env.pool.fetchrow(
            "SELECT (SELECT count(*) FROM executions) AS executions, "
            "(SELECT count(*) FROM execution_history) AS history")
        peak = {k: max(v, counts[k]) for k, v in peak.items()}
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - began - elapsed)))
    # Nothing more is pruned from here on: what is left can be checked.
    await asyncio.to_thread(executor.terminate, 10)
    survivors = running + waiting
    assert await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1)", survivors) == len(survivors)
    for eid in waiting:
        assert await env.client.cancel(eid)
    await env.all_terminal(survivors, timeout=30)
    drill_report.figures.update(await check_promises(env, survivors))

    # Every execution is either still here or was deleted finished, past the retention.
    pruned = await env.pool.fetch("SELECT * FROM pruned")
    early = [dict(r) for r in pruned if r["status"] not in TERMINAL
             or r["deleted_at"] - r["finished_at"] < timedelta(seconds=RETENTION_S)]
    kept = await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1)", submitted)
    orphaned = await env.pool.fetchval(
        "SELECT count(*) FROM execution_history h "
        "WHERE NOT EXISTS (SELECT 1 FROM executions e WHERE e.id = h.execution_id)")
    # Bounded: about what finishes in a retention window and a loop interval or two.
    bound = SOAK_RATE * (RETENTION_S + 2) + len(survivors)
    drill_report.figures.update(
        submitted=len(submitted), pruned=len(pruned), peak_executions=peak["executions"],
        peak_history=peak["history"], bound=int(bound))
    assert not early, f"pruned before its time or unfinished: {early[:3]}"
    assert len(pruned) + kept == len(submitted)
    assert orphaned == 0
    assert peak["executions"] <= bound, peak
    assert peak["history"] <= bound * HISTORY_PER_EXECUTION, peak
