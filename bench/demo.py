"""`make demo`: a real workload on the local stack, with a worker stop drill.

Starts an executor and two workers, submits a mixed batch of shell and python actions
(some failing on purpose), sends SIGTERM to one worker halfway through, waits for the
end, and prints what happened and where to look.
"""

from __future__ import annotations

import asyncio
import random
import signal
import statistics
import sys
import time
from pathlib import Path

from common.client import AsyncClient
from common.state_machine import TERMINAL, ExecutionStatus
from common.submission import Submission
from tests.harness import Env, local_env

LOGS = Path(__file__).resolve().parent.parent / ".vigil" / "demo"
METRICS_PORTS = {"executor": 9101, "worker-a": 9102, "worker-b": 9103}
TOTAL = 240


def workload() -> list[tuple[str, dict, int]]:
    """(action, params, max_attempts) for a mixed batch, shuffled."""
    rng = random.Random(7)
    batch: list[tuple[str, dict, int]] = []
    for _ in range(90):
        batch.append(("demo.sleep", {"seconds": round(rng.uniform(0.05, 0.4), 2)}, 3))
    for i in range(60):
        batch.append(("shell", {"argv": ["sh", "-c", f"echo step {i}; sleep 0.1"]}, 3))
    for i in range(50):
        batch.append(("demo.add", {"a": i, "b": i * i}, 3))
    for _ in range(20):
        batch.append(("demo.fail", {"message": "failing on purpose"}, 2))
    for _ in range(20):
        batch.append(("shell", {"argv": ["sh", "-c", "echo broken >&2; exit 3"]}, 1))
    rng.shuffle(batch)
    assert len(batch) == TOTAL
    return batch


async def main() -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    env = await local_env(LOGS)
    try:
        return await run(env)
    finally:
        for proc in env.procs:
            proc.terminate(grace=30)
        assert env.pool is not None
        await env.pool.close()


async def run(env: Env) -> int:
    assert env.pool is not None
    for step in (["db", "migrate"], ["broker", "setup"]):
        result = env.cli(*step)
        if result.returncode != 0:
            print(f"vigil {' '.join(step)} failed:\n{result.stderr}", file=sys.stderr)
            return 1
    env.executor(metrics_port=METRICS_PORTS["executor"])
    a = env.worker("worker-a", capacity=8, metrics_port=METRICS_PORTS["worker-a"])
    env.worker("worker-b", capacity=8, metrics_port=METRICS_PORTS["worker-b"])
    print("started an executor and two workers (worker-a, worker-b); waiting for them...")
    before = {r["id"] for r in await env.pool.fetch("SELECT id FROM workers")}

    async def ours() -> list[str] | None:
        rows = await env.pool.fetch(
            "SELECT id FROM workers WHERE status = 'ACTIVE' AND NOT id = ANY($1)", list(before))
        return [r["id"] for r in rows] if len(rows) >= 2 else None

    await poll(ours, 30, "two workers to register")
    began = time.monotonic()
    submitted = await AsyncClient(env.pool, actor="demo").submit_many([
        Submission(action, params, max_attempts=max_attempts, timeout_s=300)
        for action, params, max_attempts in workload()])
    ids = [s.id for s in submitted]
    print(f"submitted {len(ids)} executions (shell and python, 40 failing on purpose)")

    async def half_done() -> bool:
        return await terminal_count(env, ids) >= len(ids) // 2

    await poll(half_done, 120, "half of the executions to end")
    stop_at = time.monotonic()
    a_id = await env.pool.fetchval(
        "SELECT id FROM workers WHERE name = 'worker-a' AND NOT id = ANY($1)", list(before))
    in_flight = await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE worker_id = $1 AND status IN "
        "('SCHEDULED', 'RUNNING')", a_id)
    print(f"drill: SIGTERM to worker-a (pid {a.pid}) with {in_flight} executions in flight")
    a.signal(signal.SIGTERM)
    exit_code = await asyncio.to_thread(a.wait, 60)
    drained_in = time.monotonic() - stop_at
    print(f"drill: worker-a exited with code {exit_code} after {drained_in:.1f}s")

    async def all_done() -> bool:
        return await terminal_count(env, ids) == len(ids)

    finished = await poll(all_done, 180, "every execution to end", soft=True)
    elapsed = time.monotonic() - began
    await summary(env, ids, elapsed, finished, a_id)
    return 0 if finished else 1


async def terminal_count(env: Env, ids: list) -> int:
    assert env.pool is not None
    return await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1) AND status = ANY($2)",
        ids, [str(s) for s in TERMINAL])


async def poll(check, timeout: float, what: str, soft: bool = False) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    if soft:
        return False
    raise SystemExit(f"demo: timed out after {timeout}s waiting for {what}")


async def summary(env: Env, ids: list, elapsed: float, finished: bool, a_id: str) -> None:
    assert env.pool is not None
    rows = await env.pool.fetch(
        "SELECT id, status, worker_id, attempt, reason, "
        "extract(epoch FROM started_at - created_at) AS wait_s, "
        "extract(epoch FROM finished_at - started_at) AS run_s "
        "FROM executions WHERE id = ANY($1)", ids)
    print(f"\n== Vigil demo: {len(ids)} executions in {elapsed:.1f}s ==")
    print("\nby final state:")
    for status in ExecutionStatus:
        group = [r for r in rows if r["status"] == status]
        if group:
            reasons = sorted({r["reason"] or "" for r in group})
            print(f"  {status:<10} {len(group):>4}   reasons: {', '.join(reasons)}")
    print("\nby worker (where each execution last ran):")
    names = {r["id"]: r["name"] for r in await env.pool.fetch("SELECT id, name FROM workers")}
    for wid in sorted({r["worker_id"] for r in rows if r["worker_id"]}):
        group = [r for r in rows if r["worker_id"] == wid]
        ok = sum(1 for r in group if r["status"] == ExecutionStatus.SUCCEEDED)
        tag = " (stopped with SIGTERM halfway)" if wid == a_id else ""
        print(f"  {names.get(wid, wid):<9} {wid:<18} {len(group):>4} executions, "
              f"{ok} succeeded{tag}")
    waits = [float(r["wait_s"]) for r in rows if r["wait_s"] is not None]
    runs = [float(r["run_s"]) for r in rows if r["run_s"] is not None]
    if waits:
        print(f"\ntimings: submit->start median {statistics.median(waits) * 1000:.0f} ms, "
              f"max {max(waits) * 1000:.0f} ms; run time median "
              f"{statistics.median(runs) * 1000:.0f} ms")
    retried = sum(1 for r in rows if r["attempt"] > 1)
    print(f"retried executions: {retried}")
    left = [r for r in rows if r["status"] not in TERMINAL]
    if left:
        print(f"\nNOT FINISHED: {len(left)} executions are still non-terminal "
              f"({', '.join(sorted({r['status'] for r in left}))}).")
    elif finished:
        print("\nnothing stuck, nothing lost: every execution reached a terminal state.")
    failed = next((r["id"] for r in rows if r["status"] == ExecutionStatus.FAILED), None)
    print("\nwhere to look:")
    print("  .venv/bin/vigil ls --limit 20          recent executions")
    print("  .venv/bin/vigil ls --status FAILED     the ones that failed on purpose")
    if failed:
        print(f"  .venv/bin/vigil show {failed}   one with its history")
    print("  .venv/bin/vigil workers                 worker-a stopped by the drill, the rest "
          "stopped after the demo")
    print("  .venv/bin/vigil dead-letters list      dispatches a worker queue gave back "
          "(if any), and what became of them")
    print("  http://127.0.0.1:15672/#/queues/vigil  RabbitMQ management UI "
          "(user vigil-admin, password vigil-admin)")
    print(f"  {LOGS}/*.log   service logs of this run")
    print("  make down                               stop the servers")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
