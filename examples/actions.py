"""Small python actions for the demo, the tests and the benchmark."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from common.api import Context, action


@action("demo.noop")
def noop(ctx: Context) -> None:
    return None


@action("demo.add")
def add(ctx: Context) -> dict[str, Any]:
    return {"sum": ctx.params["a"] + ctx.params["b"]}


@action("demo.echo")
def echo(ctx: Context) -> Any:
    return ctx.params


@action("demo.sleep")
def sleep(ctx: Context) -> dict[str, float]:
    seconds = float(ctx.params.get("seconds", 1))
    time.sleep(seconds)
    return {"slept": seconds}


@action("demo.fail")
def fail(ctx: Context) -> None:
    raise ValueError(ctx.params.get("message", "failing on purpose"))


@action("demo.crash", max_attempts=1)
def crash(ctx: Context) -> None:
    """Dies the way an OOM kill or a segfault would: the worker must survive it. Not
    worth retrying unless a submission asks for it (--max-attempts)."""
    os.kill(os.getpid(), signal.SIGKILL)


@action("demo.steps")
def steps(ctx: Context) -> dict[str, Any]:
    """Counts to `total`, checkpointing each step; fails once at `fail_at` if given, so a
    retry shows that it resumes from the checkpoint instead of starting over."""
    total = int(ctx.params.get("total", 5))
    done = int((ctx.checkpoint or {}).get("done", 0))
    fail_at = ctx.params.get("fail_at")
    started_from = done
    while done < total:
        if fail_at is not None and done == fail_at and not ctx.resuming:
            raise RuntimeError(f"failing at step {done} on purpose")
        done += 1
        ctx.save_checkpoint({"done": done})
        time.sleep(float(ctx.params.get("step_seconds", 0)))
    return {"done": done, "resumed_from": started_from, "attempt": ctx.attempt}


@action("demo.record")
def record(ctx: Context) -> dict[str, Any]:
    """Leaves one file per run in params["dir"], so a test can count real runs: creating
    it exclusively fails loudly if the same attempt ever runs twice."""
    path = os.path.join(ctx.params["dir"], f"{ctx.execution_id}.{ctx.attempt}")
    with open(path, "x") as f:
        f.write(str(os.getpid()))
    time.sleep(float(ctx.params.get("seconds", 0)))
    return {"pid": os.getpid()}


@action("demo.hog")
def hog(ctx: Context) -> None:
    """Allocates (and touches) memory 1 MiB at a time, up to params["mib"], as a leaky or
    runaway job would; under a memory limit it never gets there."""
    held = []
    for _ in range(int(ctx.params.get("mib", 1 << 20))):
        held.append(b"\x01" * (1 << 20))


@action("demo.big_checkpoint")
def big_checkpoint(ctx: Context) -> None:
    """Saves a checkpoint of params["bytes"] bytes."""
    ctx.save_checkpoint("x" * int(ctx.params["bytes"]))


@action("demo.not_json")
def not_json(ctx: Context) -> set[int]:
    """Returns what JSON cannot hold: the attempt fails, saying so."""
    return {1, 2}


@action("demo.memory_hog", memory_limit_mb=256)
def memory_hog(ctx: Context) -> None:
    """demo.hog under a 256 MiB cap: every attempt runs into its cap and is stopped
    there, so the execution ends FAILED `poison` (seed 003) and its worker lives on."""
    hog(ctx)


@action("demo.hold")
def hold(ctx: Context) -> dict[str, int]:
    """Holds params["mib"] MiB of real (touched) memory, as a big job does while it works,
    until the file params["until"] exists or params["seconds"] (default 60) have passed:
    its worker's memory gate sees it."""
    held = b"\x01" * (int(ctx.params["mib"]) << 20)
    until = ctx.params.get("until")
    deadline = time.monotonic() + float(ctx.params.get("seconds", 60))
    while time.monotonic() < deadline and not (until and os.path.exists(until)):
        time.sleep(0.05)
    return {"held_mib": len(held) >> 20}


@action("demo.block")
def block(ctx: Context) -> dict[str, int]:
    """Leaves its pid in params["dir"]/<execution>.<attempt> (created exclusively, as
    demo.record does), then blocks until the file params["until"] exists or
    params["seconds"] (default 60) have passed: a long attempt whose child a test can
    find and kill."""
    path = os.path.join(ctx.params["dir"], f"{ctx.execution_id}.{ctx.attempt}")
    with open(path, "x") as f:
        f.write(str(os.getpid()))
    until = ctx.params.get("until")
    deadline = time.monotonic() + float(ctx.params.get("seconds", 60))
    while time.monotonic() < deadline and not (until and os.path.exists(until)):
        time.sleep(0.02)
    return {"pid": os.getpid()}


# What demo.leak leaked in this process: never freed, so a pooled child grows with
# every attempt it runs of it.
_LEAKED: list[bytes] = []


@action("demo.leak")
def leak(ctx: Context) -> dict[str, int]:
    """Leaks params["mib"] MiB (default 8) of real (touched) memory on every call, as a
    cache that is never emptied does: a long-lived child grows attempt after attempt
    until its worker recycles it (child_max_rss_mb). Returns the child's pid and how much
    it has leaked so far."""
    _LEAKED.append(b"\x01" * (int(ctx.params.get("mib", 8)) << 20))
    return {"pid": os.getpid(), "leaked_mib": sum(len(b) for b in _LEAKED) >> 20}
