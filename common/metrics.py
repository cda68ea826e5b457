"""Prometheus metrics and the health endpoint, served from a thread of their own.

A busy event loop must never make a live process look dead, so /metrics and /healthz
are answered by a plain HTTP server thread, not by the asyncio loop.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from common.state_machine import Moved

TRANSITIONS = Counter(
    "vigil_transitions_total",
    "Execution state changes made by this process.",
    ["from_state", "to_state", "reason"],
)
FENCED_WRITES = Counter(
    "vigil_fenced_writes_total",
    "Compare-and-set writes that changed nothing because someone else moved the row.",
    ["operation"],
)
PUBLISH_FAILURES = Counter(
    "vigil_publish_failures_total", "Dispatches that were not routed or not confirmed."
)
DISPATCHED = Counter("vigil_dispatched_total", "Executions published to a worker queue.")
DEAD_LETTERS = Counter(
    "vigil_dead_letters_total", "Dead-lettered dispatches handled, by outcome.", ["outcome"]
)
BAD_MESSAGES = Counter(
    "vigil_bad_messages_total", "Malformed or foreign messages rejected.", ["queue", "kind"]
)
SCHEDULE_FIRINGS = Counter(
    "vigil_schedule_firings_total",
    "Schedule firings: fired, skipped (the previous one still going) or cancelled_previous.",
    ["schedule", "outcome"],
)
SCHEDULE_SKIPPED = Gauge(
    "vigil_schedule_skipped_ticks",
    "Ticks each schedule skipped in a row because its previous firing has not finished.",
    ["schedule"],
)
LOOP_LAST_COMPLETED = Gauge(
    "vigil_loop_last_completed_timestamp_seconds",
    "When each background loop last finished an iteration.",
    ["loop"],
)
LOOP_DURATION = Histogram(
    "vigil_loop_duration_seconds", "How long one iteration of each loop took.", ["loop"]
)
LOOP_ERRORS = Counter("vigil_loop_errors_total", "Loop iterations that raised.", ["loop"])
SCHEDULE_TO_START = Histogram(
    "vigil_schedule_to_start_seconds",
    "From dispatch publish to the attempt starting on the worker.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RUN_TIME = Histogram(
    "vigil_run_duration_seconds",
    "How long attempts ran on the worker, by action and outcome.",
    ["action", "outcome"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
)
EXECUTIONS = Gauge(
    "vigil_executions", "Executions not yet finished, by state and action.",
    ["state", "action"],
)
OLDEST_EXECUTION = Gauge(
    "vigil_execution_oldest_age_seconds",
    "How long the oldest execution in each unfinished state has been there.",
    ["state", "action"],
)
WORKERS = Gauge("vigil_workers", "Workers by status.", ["status"])
WORKER_IN_FLIGHT = Gauge("vigil_worker_in_flight", "Attempts running on this worker.")
WORKER_CAPACITY = Gauge("vigil_worker_capacity", "Attempts this worker may run at once.")
WORKER_MEMORY = Gauge("vigil_worker_memory_bytes", "Container memory in use (cgroup).")
WORKER_PRESSURE = Gauge(
    "vigil_worker_memory_pressure", "1 while the worker refuses work for lack of memory."
)
POOL_CHILDREN_REPLACED = Counter(
    "vigil_worker_children_replaced_total",
    "Pooled python children replaced: died, killed (cancelled, timed out, over their "
    "memory limit) or recycled (attempts or memory).", ["why"],
)
BATCH_SIZE = Histogram(
    "vigil_write_batch_size", "Items per grouped database write.", ["write"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)



@functools.lru_cache(maxsize=4096)
def labelled(metric: MetricWrapperBase, *values: str) -> Any:
    """metric.labels(*values), looked up once: the hot path counts every execution, and
    labels() takes a lock and builds a key each time. Only for metrics whose series are
    never removed (a removed series would live on here)."""
    return metric.labels(*values)


def count_moves(operation: str, moves: Iterable[Moved], attempted: int | None = None) -> int:
    """Count what one query moved in vigil_transitions_total; when it was asked to move
    `attempted` executions, count the ones it did not move (someone else had) as fenced
    writes of `operation`. Returns how many moved."""
    moved = 0
    for m in moves:
        labelled(TRANSITIONS, m.from_status or "", m.to_status, m.reason).inc(m.n)
        moved += m.n
    if attempted is not None and attempted > moved:
        labelled(FENCED_WRITES, operation).inc(attempted - moved)
    return moved


HealthCheck = Callable[[], tuple[bool, dict]]

# When each loop last completed (monotonic), for /healthz; the gauge is for Prometheus.
_loop_completed_at: dict[str, float] = {}


def loop_completed(loop: str) -> None:
    _loop_completed_at[loop] = time.monotonic()
    LOOP_LAST_COMPLETED.labels(loop).set_to_current_time()


class _Handler(BaseHTTPRequestHandler):
    health: HealthCheck = staticmethod(lambda: (True, {}))

    def do_GET(self) -> None:
        if self.path.startswith("/metrics"):
            body, status, ctype = generate_latest(), 200, CONTENT_TYPE_LATEST
        elif self.path.startswith("/healthz"):
            ok, details = self.health()
            body = json.dumps({"ok": ok, **details}).encode()
            status, ctype = (200 if ok else 503), "application/json"
        else:
            body, status, ctype = b"not found\n", 404, "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
        pass


def serve(host: str, port: int, health: HealthCheck) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on a daemon thread; port 0 picks a free port."""
    handler = type("Handler", (_Handler,), {"health": staticmethod(health)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def loops_health(max_age_s: dict[str, float]) -> HealthCheck:
    """Healthy while every named loop completed an iteration within its allowed age."""

    def check() -> tuple[bool, dict]:
        now = time.monotonic()
        ages = {}
        for loop in max_age_s:
            last = _loop_completed_at.get(loop)
            ages[loop] = round(now - last, 3) if last is not None else None
        ok = all(a is not None and a <= max_age_s[name] for name, a in ages.items())
        return ok, {"loop_age_s": ages}

    return check
