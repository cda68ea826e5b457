"""`make bench`: Vigil's speed on this machine, as JSON and one summary line.

1. Throughput: 5,000 no-op python executions submitted at once to 2 workers; end to end
   from the first submission to the last completion.
2. Latency: 2,000 no-op executions paced at 200/s; submit -> start (database time).

A benchmark, not a test: it asserts only that everything succeeded, and prints figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common.models import ExecutionStatus
from tests.harness import Env, create_env, create_template, destroy_env

RESULTS = Path(__file__).parent / "results"
WORKER_CAPACITY = int(os.environ.get("VIGIL_BENCH_CAPACITY", "8"))
THROUGHPUT_N = int(os.environ.get("VIGIL_BENCH_THROUGHPUT_N", "5000"))
LATENCY_N = int(os.environ.get("VIGIL_BENCH_LATENCY_N", "2000"))
LATENCY_RATE = float(os.environ.get("VIGIL_BENCH_LATENCY_RATE", "200"))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def throughput(env: Env) -> dict:
    began = time.monotonic()
    ids = await env.submit("demo.noop", n=THROUGHPUT_N)
    submitted = time.monotonic() - began
    counts = await env.all_terminal(ids, timeout=1800)
    assert counts == {ExecutionStatus.SUCCEEDED: THROUGHPUT_N}, counts
    span = await env.pool.fetchval(
        "SELECT extract(epoch FROM max(finished_at) - min(created_at))::float8 FROM executions "
        "WHERE id = ANY($1)", ids)
    return {"executions": THROUGHPUT_N, "submit_seconds": round(submitted, 2),
            "end_to_end_seconds": round(span, 2),
            "executions_per_second": round(THROUGHPUT_N / span, 1)}


async def latency(env: Env) -> dict:
    ids = []
    began = time.monotonic()
    for i in range(LATENCY_N):
        delay = began + i / LATENCY_RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        ids.extend(await env.submit("demo.noop"))
    achieved = LATENCY_N / (time.monotonic() - began)
    counts = await env.all_terminal(ids, timeout=600)
    assert counts == {ExecutionStatus.SUCCEEDED: LATENCY_N}, counts
    rows = await env.pool.fetch(
        "SELECT extract(epoch FROM started_at - created_at)::float8 AS s FROM executions "
        "WHERE id = ANY($1)", ids)
    waits = [float(r["s"]) for r in rows]
    return {"executions": LATENCY_N, "target_rate_per_second": LATENCY_RATE,
            "achieved_rate_per_second": round(achieved, 1),
            "submit_to_start_p50_ms": round(percentile(waits, 50) * 1000, 1),
            "submit_to_start_p99_ms": round(percentile(waits, 99) * 1000, 1),
            "submit_to_start_max_ms": round(max(waits) * 1000, 1),
            "submit_to_start_mean_ms": round(statistics.fmean(waits) * 1000, 1)}


async def main() -> int:
    await create_template()
    with tempfile.TemporaryDirectory(prefix="vigil-bench-") as tmp:
        env = await create_env(Path(tmp))
        try:
            env.extra_env["VIGIL_EXECUTOR_DISPATCH_POLL_INTERVAL_S"] = "1"
            env.executor()
            env.worker("bench-1", capacity=WORKER_CAPACITY)
            env.worker("bench-2", capacity=WORKER_CAPACITY)
            await env.live_workers(2)
            result = {
                "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                "workers": 2, "capacity_per_worker": WORKER_CAPACITY,
                "throughput": await throughput(env),
                "latency": await latency(env),
            }
        finally:
            await destroy_env(env)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    t, lat = result["throughput"], result["latency"]
    print(f"bench: {t['executions_per_second']} executions/s end to end "
          f"({t['executions']} no-op python on 2 workers x {WORKER_CAPACITY}); "
          f"submit->start p50 {lat['submit_to_start_p50_ms']} ms, "
          f"p99 {lat['submit_to_start_p99_ms']} ms at {lat['achieved_rate_per_second']}/s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
