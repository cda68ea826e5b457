"""Pool drills: the worker's long-lived python children (services/worker/pool.py), forked
from its zygote, one attempt at a time each. A child SIGKILLed mid-attempt costs that
attempt only, and the pool is whole again at once; a child that leaks is recycled
past child_max_rss_mb, and one that has run child_max_attempts attempts is retired."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from pathlib import Path

from tests.drills.conftest import DrillResult
from tests.drills.support import check_promises, in_state_on, record_load, worker_id
from tests.harness import Env, get, sample, scrape_until, wait_until

MIB = 2**20
KILL_PORT = 19491
LEAK_PORT = 19492
RETIRE_PORT = 19493
REPLACED = "vigil_worker_children_replaced_total"

CAPACITY = 4
SHORT = 40  # short executions around the one whose child is killed
LEAK_MIB = 8  # what each demo.leak attempt leaks
LEAKS = 20
# The cap is the fresh child's RSS plus three and a half leaks: a child is recycled
# after its 4th leak, never after its first (a fresh child is well under the cap).
HEADROOM_MIB = 3 * LEAK_MIB + LEAK_MIB // 2
MAX_ATTEMPTS = 5
NOOPS = 12


# ---- the worker's process tree ------------------------------------------------------

def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    state, ppid = text.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _children(pid: int) -> set[int]:
    """The live (not zombie) children of a process. This kernel has no
    /proc/PID/task/TID/children, so: every process whose parent it is."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == pid and stat[0] != "Z":
                found.add(int(entry))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def pool_of(worker_pid: int) -> tuple[int | None, set[int]]:
    """The worker's zygote (its one child running services.worker.zygote) and the live
    python children the zygote forked. A child's command line is the zygote's (it is a
    fork of it): only the ancestry tells them apart."""
    zygotes = [p for p in _children(worker_pid) if "services.worker.zygote" in _cmdline(p)]
    if len(zygotes) != 1:
        return None, set()
    return zygotes[0], _children(zygotes[0])


def _rss(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf(
            "SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


async def full_pool(worker_pid: int, size: int, timeout: float = 30) -> tuple[int, set[int]]:
    async def check() -> tuple[int, set[int]] | None:
        zygote, children = pool_of(worker_pid)
        return (zygote, children) if zygote is not None and len(children) == size else None

    return await wait_until(check, timeout=timeout, interval=0.02,
                            what=f"{size} python children under worker {worker_pid}")


# ---- what the database and the metrics say -----------------------------------------

async def _replaced(port: int) -> dict[str, float | None]:
    _, text = await asyncio.to_thread(get, port, "/metrics")
    return {why: sample(text, REPLACED, why=why) for why in ("died", "killed", "recycled")}


async def _attempts_in_start_order(env: Env, ids: list) -> list[dict]:
    """Each attempt of these executions, in the order they started (one worker of
    capacity 1 runs them one after another): the child's pid it returned, its peak RSS,
    how it ended and on which worker."""
    rows = await env.pool.fetch(
        "SELECT (e.result->>'pid')::int AS pid, (ended.usage->>'peak_rss_bytes')::bigint "
        "AS peak, ended.attempt, ended.to_status, ended.worker_id "
        "FROM execution_history started "
        "JOIN execution_history ended ON ended.execution_id = started.execution_id "
        "AND ended.attempt = started.attempt AND ended.from_status = 'RUNNING' "
        "JOIN executions e ON e.id = started.execution_id "
        "WHERE started.execution_id = ANY($1) AND started.to_status = 'RUNNING' "
        "ORDER BY started.id", ids)
    return [dict(r) for r in rows]


def _runs(pids: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of the same pid: [(pid, attempts in a row)]."""
    runs: list[tuple[int, int]] = []
    for pid in pids:
        if runs and runs[-1][0] == pid:
            runs[-1] = (pid, runs[-1][1] + 1)
        else:
            runs.append((pid, 1))
    return runs


# ---- drills ------------------------------------------------------------------------

async def test_sigkill_of_a_pooled_child_mid_attempt_retries_only_that_attempt_and_the_pool_refills(
    env: Env, drill_report: DrillResult
):
    env.executor()
    worker = env.worker("w", capacity=CAPACITY, runtimes="python", metrics_port=KILL_PORT)
    wid = await worker_id(env, "w")
    registered = dict(await env.pool.fetchrow(
        "SELECT pid, started_at FROM workers WHERE id = $1", wid))
    assert registered["pid"] == worker.pid
    zygote, before = await full_pool(worker.pid, CAPACITY)

    runs = env.tmp / "runs"
    runs.mkdir()
    release = env.tmp / "release"
    [long] = await env.submit("demo.block", {"dir": str(runs), "until": str(release)},
                              max_attempts=3)
    short = await record_load(env, SHORT, seconds=0.1)

    async def pid_of(attempt: int) -> int | None:
        path = runs / f"{long}.{attempt}"  # demo.block writes its pid there
        text = path.read_text() if path.exists() else ""
        return int(text) if text.strip() else None

    victim = await wait_until(lambda: pid_of(1), timeout=30, interval=0.02,
                              what="the long attempt's child to start it")
    assert victim in before, f"{victim} is not one of the pool's children {before}"
    assert _stat(victim)[1] == zygote and _stat(zygote)[1] == worker.pid

    async def others_running() -> int | None:
        n = await in_state_on(env, wid, "RUNNING") - 1  # besides the long one
        return n if n >= 2 else None

    # Killed while other children are mid-attempt, so that they show what it disturbs.
    alongside = await wait_until(others_running, timeout=30, interval=0.02,
                                 what="short executions running beside the long one")
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    async def attempt_1_ended() -> float | None:
        # (Its history row is the retry's: attempt 2 REQUESTED at dispatch 0.)
        ended = await env.pool.fetchval(
            "SELECT count(*) FROM execution_history WHERE execution_id = $1 "
            "AND from_status = 'RUNNING'", long)
        return time.monotonic() - killed_at if ended else None

    async def retry_running() -> float | None:
        started = await env.pool.fetchval(
            "SELECT count(*) FROM execution_history WHERE execution_id = $1 AND attempt = 2 "
            "AND to_status = 'RUNNING'", long)
        return time.monotonic() - killed_at if started else None

    async def refilled() -> tuple[float, set[int]] | None:
        now_zygote, children = pool_of(worker.pid)
        if now_zygote == zygote and len(children) == CAPACITY and victim not in children:
            return time.monotonic() - killed_at, children
        return None

    detection, recovery, (refill, after) = await asyncio.gather(
        wait_until(attempt_1_ended, timeout=10, interval=0.01, what="attempt 1 to end"),
        wait_until(retry_running, timeout=10, interval=0.01, what="attempt 2 RUNNING"),
        wait_until(refilled, timeout=10, interval=0.005, what="the pool to refill"))
    assert not _alive(victim)
    assert before - after == {victim} and len(after - before) == 1, (before, after)
    # The retry runs in a child of the refilled pool (the only worker), not the dead one.
    retry_pid = await wait_until(lambda: pid_of(2), timeout=10, what="attempt 2's pid")
    assert retry_pid in after and retry_pid != victim
    release.touch()
    await env.all_terminal([long, *short], timeout=60)
    drill_report.figures.update(await check_promises(env, [long, *short]))
    drill_report.figures.update(
        detection_s=round(detection, 3), recovery_s=round(recovery, 3),
        refill_s=round(refill, 3), running_alongside=alongside)

    # The killed attempt ended `killed` by SIGKILL and was retried (recorded as attempt 2
    # REQUESTED at dispatch 0); the retry succeeded.
    ends = [(r["attempt"], r["dispatch"], r["to_status"], r["reason"],
             r["error"] and r["error"]["kind"], r["error"] and r["error"].get("signal"))
            for r in await env.pool.fetch(
                "SELECT attempt, dispatch, to_status, reason, error FROM execution_history "
                "WHERE execution_id = $1 AND from_status = 'RUNNING' ORDER BY id", long)]
    assert ends == [(2, 0, "REQUESTED", "killed", "killed", "SIGKILL"),
                    (2, 1, "SUCCEEDED", "succeeded", None, None)], ends
    assert await env.pool.fetchval(
        "SELECT (status, attempt, worker_id)::text FROM executions WHERE id = $1",
        long) == f"(SUCCEEDED,2,{wid})"
    # Nothing else was disturbed: every short one succeeded on its first attempt, and
    # no attempt of theirs ended any other way.
    assert await env.pool.fetchval(
        "SELECT count(*) FROM executions WHERE id = ANY($1) AND status = 'SUCCEEDED' "
        "AND attempt = 1", short) == SHORT
    assert await env.pool.fetchval(
        "SELECT count(*) FROM execution_history WHERE execution_id = ANY($1) "
        "AND from_status = 'RUNNING'", short) == SHORT
    # The worker lived through it: the same process and zygote, never registered again,
    # still ACTIVE; only the one child was replaced, as one that died.
    assert worker.popen.poll() is None
    assert [dict(r) for r in await env.pool.fetch(
        "SELECT id, pid, started_at, status FROM workers")] == [
        {"id": wid, **registered, "status": "ACTIVE"}]
    assert pool_of(worker.pid) == (zygote, after)
    assert await _replaced(KILL_PORT) == {"died": 1.0, "killed": None, "recycled": None}


async def test_a_leaking_child_is_recycled_past_child_max_rss(
    env: Env, drill_report: DrillResult
):
    env.executor()
    # A fresh child's memory after one attempt, on a worker of the same code.
    probe = env.worker("probe", capacity=1, runtimes="python")
    await worker_id(env, "probe")
    [measure] = await env.submit("demo.leak", {"mib": 0})
    await env.all_terminal([measure], timeout=30)
    [fresh] = [a["peak"] for a in await _attempts_in_start_order(env, [measure])]
    await asyncio.to_thread(probe.terminate, 10)
    cap_mib = math.ceil(fresh / MIB) + HEADROOM_MIB

    worker = env.worker("leaky", capacity=1, runtimes="python", metrics_port=LEAK_PORT,
                        VIGIL_WORKER_CHILD_MAX_RSS_MB=str(cap_mib))
    wid = await worker_id(env, "leaky")
    await full_pool(worker.pid, 1)
    # What the children's RSS is seen to be from outside, while they leak.
    seen: dict[int, int] = {}
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            for pid in pool_of(worker.pid)[1]:
                rss = _rss(pid)
                if rss is not None:
                    seen[pid] = max(seen.get(pid, 0), rss)
            try:
                await asyncio.wait_for(stop.wait(), 0.02)
            except TimeoutError:
                pass

    watcher = asyncio.create_task(watch())
    began = time.monotonic()
    try:
        ids = await env.submit("demo.leak", {"mib": LEAK_MIB}, n=LEAKS)
        await env.all_terminal(ids, timeout=60)
    finally:
        stop.set()
        await watcher
    took = time.monotonic() - began
    drill_report.figures.update(await check_promises(env, ids))

    attempts = await _attempts_in_start_order(env, ids)
    assert [(a["attempt"], a["to_status"], a["worker_id"]) for a in attempts] == \
        [(1, "SUCCEEDED", wid)] * LEAKS, attempts
    cap = cap_mib * MIB
    pids = [a["pid"] for a in attempts]
    peaks = [a["peak"] for a in attempts]
    runs = _runs(pids)
    # A child is replaced after an attempt exactly when that attempt left it past the cap.
    for i in range(1, LEAKS):
        assert (pids[i] != pids[i - 1]) == (peaks[i - 1] > cap), (
            f"attempt {i}: peak {peaks[i - 1] / MIB:.1f} MiB, cap {cap_mib} MiB, "
            f"pid {pids[i - 1]} -> {pids[i]}")
    assert len(runs) >= 2, f"never recycled: {runs}"
    assert len({pid for pid, _ in runs}) == len(runs), f"a retired child came back: {runs}"
    # Recycled for its leak, not for what a fresh child holds.
    assert min(n for _, n in runs[:-1]) >= 2, runs
    # Past the cap by at most one leak: the attempt that crossed it was its last.
    step = LEAK_MIB * MIB
    assert max(peaks) <= cap + step, [round(p / MIB, 1) for p in peaks]
    assert max(seen.values()) <= cap + step, {p: round(r / MIB, 1) for p, r in seen.items()}
    assert len(set(pids) & set(seen)) >= 2, f"the watcher saw {sorted(seen)} of {runs}"
    recycled = len(runs) - 1 + (peaks[-1] > cap)  # the last one too, if it went over
    await scrape_until(LEAK_PORT, lambda t: sample(t, REPLACED, why="recycled") == recycled,
                       f"{recycled} children recycled")
    assert await _replaced(LEAK_PORT) == {"died": None, "killed": None,
                                          "recycled": float(recycled)}
    assert worker.popen.poll() is None
    drill_report.figures.update(
        fresh_mib=round(fresh / MIB, 1), cap_mib=cap_mib,
        peak_mib=round(max(peaks) / MIB, 1), seen_mib=round(max(seen.values()) / MIB, 1),
        recycled=recycled, per_child="/".join(str(n) for _, n in runs),
        leaks_s=round(took, 2))


async def test_a_child_is_retired_after_child_max_attempts(
    env: Env, drill_report: DrillResult
):
    env.executor()
    worker = env.worker("w", capacity=1, runtimes="python", metrics_port=RETIRE_PORT,
                        VIGIL_WORKER_CHILD_MAX_ATTEMPTS=str(MAX_ATTEMPTS))
    wid = await worker_id(env, "w")
    zygote, [first] = await full_pool(worker.pid, 1)
    began = time.monotonic()
    ids = await record_load(env, NOOPS, seconds=0)
    await env.all_terminal(ids, timeout=60)
    took = time.monotonic() - began
    drill_report.figures.update(await check_promises(env, ids))

    attempts = await _attempts_in_start_order(env, ids)
    assert [(a["attempt"], a["to_status"], a["worker_id"]) for a in attempts] == \
        [(1, "SUCCEEDED", wid)] * NOOPS, attempts
    runs = _runs([a["pid"] for a in attempts])
    # 5, 5 and 2 attempts, in three different children, the first the one it started with.
    assert [n for _, n in runs] == [MAX_ATTEMPTS, MAX_ATTEMPTS, NOOPS - 2 * MAX_ATTEMPTS], runs
    assert len({pid for pid, _ in runs}) == 3 and runs[0][0] == first, runs
    # The retired ones are gone (not left behind, not zombies); the third one serves on.
    last = runs[-1][0]
    assert not any(_alive(pid) for pid, _ in runs[:-1])
    assert await full_pool(worker.pid, 1) == (zygote, {last})
    assert await _replaced(RETIRE_PORT) == {"died": None, "killed": None, "recycled": 2.0}
    drill_report.figures.update(per_child="/".join(str(n) for _, n in runs),
                                recycled=len(runs) - 1, run_s=round(took, 2))
