"""W5: Vigil's dispatch round with a deep backlog: it must not slow down as rows pile up.

What it measures, at each scale (10k, 100k and 1M REQUESTED executions, then 1M
REQUESTED with 1M finished ones beside them in the tables):

- dispatch throughput: executions dispatched per second by Vigil's real dispatch round
  (common.db.executions.dispatch, i.e. one `vigil_dispatch` call: lock the workers,
  count their free slots, claim, assign, mark SCHEDULED, commit), and the milliseconds
  per round, median and p99, as the executor sees them (one round trip and a durable
  commit each);
- the claim query's time: the mean server-side execution time of the claim statement
  inside vigil_dispatch (its FOR ... SELECT ... FOR UPDATE SKIP LOCKED over the index
  executions_due) and the buffers it touches per call, from pg_stat_statements (the
  bench cluster tracks statements nested in functions: pg_stat_statements.track =
  all), reset before each scale; and the whole vigil_dispatch call's mean time;
- whether that stays flat: worst ÷ best across the scales, for throughput and claim
  time, against the target (within 20% from 10k to 1M rows).

How: a database of its own, cloned from the migrated template on the durable bench
Postgres (fsync and synchronous_commit on), dropped at the end. No executor, worker or
broker runs: WORKERS fake workers are registered and kept fresh through Vigil's own
queries (common.db.workers register and heartbeat: ACTIVE, capacity CAPACITY, prefetch
0, offering ACTION). The backlog is written by one INSERT ... SELECT generate_series per
fill, with the columns and history row that Vigil's submit (executions.sql `insert`)
writes; finished executions get what a successful attempt leaves (SUCCEEDED, the
timestamps, a worker, reason `succeeded`, its four history rows). Each scale is filled
up from the one before and ANALYZEd, then measured in PASSES passes, each from a
freshly vacuumed table (a plain VACUUM, as autovacuum's, with the table's own
settings): WARM_UP_ROUNDS unmeasured rounds and ROUNDS measured rounds of BATCH (the
executor's default) on the executor's connection settings (common.db.connect); each
figure is the median of the passes. Autovacuum is off in this database, so that every
pass at every scale starts from the same state and does the same work: a claimed row's
entry stays at the front of executions_due until a vacuum, so what a claim walks grows
with the dispatches since the last one, whatever the table's size. After
every round, outside the timing, the rows it dispatched are deleted with their history
(as if run and pruned at once) and as many new ones submitted, so the backlog stays at
its scale and the workers' free slots never cap a round. The fills run with production
durability too; their duration is shown for information only.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from bench.servers import unique_name
from common import db
from common.config import DatabaseSettings, ExecutorSettings
from common.db import executions, workers
from common.state_machine import DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT_S, Reason

if TYPE_CHECKING:
    from bench.run import BenchContext

ACTION = "bench.noop"
WORKERS = 4
CAPACITY = 1000  # per worker: far above what one round takes
BATCH = ExecutorSettings().dispatch_batch_size
STALE_AFTER_S = ExecutorSettings().stale_after_s
ROUNDS = 300
# Measured passes of ROUNDS per scale: each figure is their median (the machine is noisy,
# and autovacuum may run during any one pass).
PASSES = 3
# Unmeasured rounds first, so that each scale is measured in its steady state: the
# plans made, and the buffers holding what rounds touch (the tables outgrow
# shared_buffers at 1M rows).
WARM_UP_ROUNDS = 100
FLAT_WITHIN = 1.2  # the target: worst ÷ best across the scales
SUBMITTER = "client"
DISPATCHER = "executor:bench-w5"
FILL_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Scale:
    label: str
    requested: int
    finished: int


SCALES = (
    Scale("10k REQUESTED", 10_000, 0),
    Scale("100k REQUESTED", 100_000, 0),
    Scale("1M REQUESTED", 1_000_000, 0),
    Scale("1M REQUESTED + 1M finished", 1_000_000, 1_000_000),
)

# As executions.sql `insert` writes a submission (defaults: Vigil's, as no action row
# exists), one submitted every 0.1 ms up to now, each with its history row.
FILL_REQUESTED = """
WITH inserted AS (
    INSERT INTO executions (id, action, params, status, max_attempts, timeout_s,
                            not_before, created_at, updated_at)
    SELECT vigil_uuid7(t), $1, jsonb_build_object('key', g), 'REQUESTED', $3, $4, t, t, t
    FROM generate_series(1, $2::int) AS g,
         LATERAL (SELECT now() - make_interval(secs => ($2 - g) * 0.0001)) AS s(t)
    RETURNING id, created_at
)
INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                               reason, actor, at)
SELECT id, 1, 0, NULL, 'REQUESTED', $5, $6, created_at FROM inserted
"""

# What a successful first attempt leaves, finished during the day before the backlog.
FILL_FINISHED = """
WITH inserted AS (
    INSERT INTO executions (id, action, params, status, attempt, max_attempts, dispatches,
                            worker_id, timeout_s, not_before, created_at, updated_at,
                            scheduled_at, started_at, finished_at, reason, dispatch_round)
    SELECT vigil_uuid7(t), $1, jsonb_build_object('key', g), 'SUCCEEDED', 1, $3, 1,
           $4, $5, t, t, t + interval '3 ms', t + interval '1 ms', t + interval '2 ms',
           t + interval '3 ms', $6, gen_random_uuid()
    FROM generate_series(1, $2::int) AS g,
         LATERAL (SELECT now() - interval '1 day' + make_interval(secs => g * 0.0001))
             AS s(t)
    RETURNING id, worker_id, created_at, scheduled_at, started_at, finished_at
)
INSERT INTO execution_history (execution_id, attempt, dispatch, from_status, to_status,
                               reason, actor, worker_id, at, usage)
SELECT i.id, 1, h.dispatch, h.from_status, h.to_status, h.reason, h.actor, h.worker_id,
       h.at, h.usage
FROM inserted i CROSS JOIN LATERAL (VALUES
    (0, NULL, 'REQUESTED', $7, $8, NULL, i.created_at, NULL),
    (1, 'REQUESTED', 'SCHEDULED', $9, $10, i.worker_id, i.scheduled_at, NULL),
    (1, 'SCHEDULED', 'RUNNING', $11, 'worker:' || i.worker_id, i.worker_id, i.started_at,
     NULL),
    (1, 'RUNNING', 'SUCCEEDED', $6, 'worker:' || i.worker_id, i.worker_id, i.finished_at,
     '{"peak_rss_bytes": 41943040, "cpu_s": 0.001, "wall_s": 0.001}'::jsonb)
) AS h(dispatch, from_status, to_status, reason, actor, worker_id, at, usage)
"""

# Outside the timing, after every round: its executions ran and were pruned at once.
PRUNE = """
WITH gone AS (DELETE FROM executions WHERE id = ANY($1::uuid[]) RETURNING id)
DELETE FROM execution_history WHERE execution_id IN (SELECT id FROM gone)
"""

# The whole vigil_dispatch call (top level), and the claim: the FOR loop's query inside
# it (nested, so toplevel is false).
STATEMENT_STATS = """
SELECT CASE WHEN toplevel AND query LIKE '%vigil_dispatch(%' THEN 'dispatch'
            WHEN NOT toplevel AND query LIKE '%FOR UPDATE SKIP LOCKED%'
                 AND query LIKE '%wanted%' THEN 'claim' END AS statement,
       calls, mean_exec_time AS mean_ms,
       (shared_blks_hit + shared_blks_read)::float8 / calls AS buffers,
       shared_blks_read::float8 / calls AS reads
FROM pg_stat_statements
WHERE dbid = $1 AND calls > 0
"""


@dataclass(frozen=True)
class Measured:
    rows: int
    round_ms: list[float]
    statements: dict[str, asyncpg.Record]  # 'dispatch', 'claim' -> pg_stat_statements row
    fill_s: float

    def figures(self) -> dict[str, Any]:
        seconds = sum(self.round_ms) / 1000
        claim, call = self.statements.get("claim"), self.statements.get("dispatch")
        return {
            "dispatched/s": self.rows / seconds,
            "round p50 ms": statistics.median(self.round_ms),
            "round p99 ms": percentile(self.round_ms, 0.99),
            "vigil_dispatch mean ms": call["mean_ms"] if call else None,
            "vigil_dispatch reads/call": call["reads"] if call else None,
            "claim mean ms": claim["mean_ms"] if claim else None,
            "claim buffers/call": claim["buffers"] if claim else None,
            "fill + VACUUM s": self.fill_s,
        }


def medians(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the passes (None where a pass had none)."""
    return {k: (statistics.median(v) if all(x is not None for x in v) else None)
            for k in passes[0] for v in [[p[k] for p in passes]]}


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(bench: BenchContext) -> dict[str, Any]:
    """Every scale in a fresh database of its own; the table {scale: {figure: value}}."""
    name = unique_name("bench_w5")
    await bench.postgres.create_database(name)
    try:
        return await measure_all(bench.postgres.database(name))
    finally:
        await bench.postgres.drop_database(name)


async def measure_all(settings: DatabaseSettings) -> dict[str, Any]:
    admin = await asyncpg.connect(
        host=settings.host, port=settings.port, user=settings.user, database=settings.name,
        password=settings.password.get_secret_value(), timeout=settings.connect_timeout_s,
        command_timeout=FILL_TIMEOUT_S)
    # The executor's own connection settings (one plan per statement, no seqscan, no JIT),
    # one connection kept across the scales as a running executor's is.
    pool = await db.connect(settings.model_copy(update={"pool_min_size": 1,
                                                        "pool_max_size": 1}),
                            application_name="vigil-bench-w5")
    try:
        await check_statement_stats(admin)
        for table_name in ("executions", "execution_history"):
            await admin.execute(f"ALTER TABLE {table_name} SET (autovacuum_enabled = off)")
        worker_ids = await register_workers(pool)
        table: dict[str, Any] = {}
        have = Scale("empty", 0, 0)
        for scale in SCALES:
            fill_s = await fill(admin, have, scale, worker_ids[0])
            have = scale
            passes = [(await measure(admin, pool, worker_ids, fill_s)).figures()
                      for _ in range(PASSES)]
            table[scale.label] = medians(passes)
        return table | flatness(list(table.values()))
    finally:
        await pool.close()
        await admin.close()


async def check_statement_stats(admin: asyncpg.Connection) -> None:
    """The claim's time comes from pg_stat_statements, nested statements included."""
    if not await admin.fetchval(
            "SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'"):
        raise RuntimeError("pg_stat_statements is not installed in the bench database "
                           "(`scripts/stack.py up bench-postgres` installs it in template1)")
    track = await admin.fetchval("SHOW pg_stat_statements.track")
    if track != "all":
        raise RuntimeError(f"pg_stat_statements.track is {track!r} on the bench Postgres: "
                           "W5 needs 'all' to see the claim inside vigil_dispatch")


async def register_workers(pool: asyncpg.Pool) -> list[str]:
    ids = [f"bench-w5-{n}-{uuid.uuid4().hex[:6]}" for n in range(WORKERS)]
    for worker_id in ids:
        await workers.register(pool, workers.Registration(
            id=worker_id, name="bench-w5", hostname="bench", pid=0, runtimes=["python"],
            actions=[ACTION], capacity=CAPACITY, prefetch=0))
    return ids


async def heartbeat(pool: asyncpg.Pool, worker_ids: Iterable[str]) -> None:
    for worker_id in worker_ids:
        await workers.heartbeat(pool, worker_id, memory_bytes=None, memory_limit_bytes=None,
                                memory_pressure=False)


async def fill(admin: asyncpg.Connection, have: Scale, want: Scale, worker_id: str) -> float:
    """Add the rows `want` has beyond `have`, then VACUUM ANALYZE; seconds taken."""
    began = time.monotonic()
    await submit(admin, want.requested - have.requested)
    if want.finished > have.finished:
        await admin.execute(FILL_FINISHED, ACTION, want.finished - have.finished,
                            DEFAULT_MAX_ATTEMPTS, worker_id, DEFAULT_TIMEOUT_S,
                            Reason.SUCCEEDED.value, Reason.SUBMITTED.value, SUBMITTER,
                            Reason.DISPATCHED.value, DISPATCHER, Reason.STARTED.value)
    await admin.execute("VACUUM ANALYZE executions")
    await admin.execute("VACUUM ANALYZE execution_history")
    return time.monotonic() - began


async def submit(conn: asyncpg.Connection, n: int) -> None:
    if n > 0:
        await conn.execute(FILL_REQUESTED, ACTION, n, DEFAULT_MAX_ATTEMPTS,
                           DEFAULT_TIMEOUT_S, Reason.SUBMITTED.value, SUBMITTER)


async def measure(admin: asyncpg.Connection, pool: asyncpg.Pool, worker_ids: list[str],
                  fill_s: float) -> Measured:
    """One pass: VACUUM, WARM_UP_ROUNDS, then ROUNDS timed rounds with the statement
    statistics reset."""
    await admin.execute("VACUUM executions")
    await admin.execute("VACUUM execution_history")
    await heartbeat(pool, worker_ids)
    for _ in range(WARM_UP_ROUNDS):
        await one_round(admin, pool)
    await heartbeat(pool, worker_ids)
    dbid = await admin.fetchval(
        "SELECT oid FROM pg_database WHERE datname = current_database()")
    await admin.execute("SELECT pg_stat_statements_reset(0, $1, 0)", dbid)
    rows, round_ms = 0, []
    for _ in range(ROUNDS):
        n, ms = await one_round(admin, pool)
        rows += n
        round_ms.append(ms)
    stats = {r["statement"]: r for r in await admin.fetch(STATEMENT_STATS, dbid)
             if r["statement"] is not None}
    return Measured(rows, round_ms, stats, fill_s)


async def one_round(admin: asyncpg.Connection, pool: asyncpg.Pool) -> tuple[int, float]:
    """One dispatch round, timed; then (untimed) prune what it dispatched and submit as
    many again. Returns (rows dispatched, milliseconds)."""
    began = time.perf_counter()
    dispatched = await executions.dispatch(pool, round_id=uuid.uuid4(), batch=BATCH,
                                           stale_after_s=STALE_AFTER_S, actor=DISPATCHER)
    ms = (time.perf_counter() - began) * 1000
    if len(dispatched) != BATCH:
        raise RuntimeError(f"a round dispatched {len(dispatched)}, not {BATCH}: the "
                           "backlog or the workers' free slots ran out")
    async with admin.transaction():
        await admin.execute(PRUNE, [d.id for d in dispatched])
        await submit(admin, len(dispatched))
    return len(dispatched), ms


def flatness(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Worst ÷ best across the scales, and whether that is within the target."""
    ratios = {
        "dispatched/s": spread([r["dispatched/s"] for r in rows]),
        "round p50 ms": spread([r["round p50 ms"] for r in rows]),
        "vigil_dispatch mean ms": spread([r["vigil_dispatch mean ms"] for r in rows]),
        "claim mean ms": spread([r["claim mean ms"] for r in rows]),
    }
    target = f"within {FLAT_WITHIN - 1:.0%}"
    return {"worst ÷ best": ratios,
            target: {k: ("yes" if v is not None and v <= FLAT_WITHIN else "NO")
                     for k, v in ratios.items()}}


def spread(values: list[float | None]) -> float | None:
    """max ÷ min: worst ÷ best, whichever way the figure is better."""
    known = [v for v in values if v is not None and v > 0]
    return max(known) / min(known) if known and len(known) == len(values) else None
