"""Metrics and health, scraped over HTTP from real service processes."""

import asyncio
import json

from tests.harness import Env, get, sample, scrape_until


async def test_executor_and_worker_export_metrics_and_health(env: Env):
    env.executor(metrics_port=19301)
    env.worker("w1", capacity=3, metrics_port=19302)
    await env.live_workers(1)
    await env.submit("nobody.offers.this")
    ids = await env.submit("demo.add", {"a": 1, "b": 2}, n=5)
    await env.all_terminal(ids, timeout=30)

    executor = await scrape_until(
        19301, lambda t: sample(t, "vigil_executions", state="REQUESTED",
                                action="nobody.offers.this") == 1,
        "the executions gauge")
    assert sample(executor, "vigil_workers", status="ACTIVE") == 1
    assert sample(executor, "vigil_transitions_total", from_state="REQUESTED",
                  to_state="SCHEDULED", reason="dispatched") == 5
    assert sample(executor, "vigil_loop_last_completed_timestamp_seconds", loop="dispatch")
    # Exported at 0 before the first dead letter, so that rate() sees the first one.
    assert sample(executor, "vigil_dead_letters_total", outcome="expired_requested") == 0
    status, health = await asyncio.to_thread(get, 19301, "/healthz")
    assert status == 200 and json.loads(health)["ok"] is True

    worker = await scrape_until(
        19302, lambda t: sample(t, "vigil_worker_capacity") == 3, "the worker's capacity")
    assert sample(worker, "vigil_transitions_total", from_state="RUNNING",
                  to_state="SUCCEEDED", reason="succeeded") == 5
    assert sample(worker, "vigil_worker_in_flight") == 0
    status, _ = await asyncio.to_thread(get, 19302, "/healthz")
    assert status == 200

    stats = json.loads(env.cli("stats", "--json").stdout)
    assert stats["by_status"] == {"REQUESTED": 1, "SUCCEEDED": 5}
    assert stats["finished_last_minute"] == 5 and stats["oldest_unfinished_age_s"] > 0
