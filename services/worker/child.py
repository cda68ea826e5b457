"""What runs inside a python child: attempt after attempt, until the worker lets it go.

The worker writes one JSON job per line on the child's channel: {"execution_id",
"action", "params", "attempt", "checkpoint", "memory_limit_bytes", "checkpoint_limit_bytes",
"result_limit_bytes"}.
The child answers on the same channel with JSON lines:
{"type": "checkpoint", "data": ...} any number of times, then exactly one
{"type": "result", "ok": true, "result": ...} or {"type": "result", "ok": false,
"error": {...}}, with "usage" (peak RSS, CPU and wall seconds of this attempt) and
"retire" (true when this child should not be given another attempt). Whatever the
action prints goes to stderr, which the worker reads; the child flushes it before it
writes the result, so the worker has all of an attempt's output once its result comes.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import resource
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import IO, Any

from common import actions
from common.actions import CheckpointTooLarge
from common.state_machine import ErrorKind

_PAGE = os.sysconf("SC_PAGE_SIZE")


def serve(channel: socket.socket) -> None:
    """Run the jobs the worker sends until it closes the channel."""
    jobs = channel.makefile("rb")
    out = channel.makefile("w", encoding="utf-8")
    for line in jobs:
        job = json.loads(line)
        record = run_job(job, lambda r: _emit(out, r))
        out.write(_result_line(record, job.get("result_limit_bytes")))
        out.flush()
        if record["retire"]:
            return


def _emit(out: IO[str], record: dict[str, Any]) -> None:
    out.write(json.dumps(record, default=repr) + "\n")
    out.flush()


def _result_line(record: dict[str, Any], limit_bytes: int | None) -> str:
    """The result record as a line. A result that is not JSON is the action's error; one
    over the size limit fails the attempt (it would fail the same way again)."""
    try:
        line = json.dumps(record) + "\n"
    except (TypeError, ValueError) as exc:
        failure = _failure(ErrorKind.ACTION_ERROR, f"the result is not JSON: {exc}",
                           type=type(exc).__name__)
        return json.dumps({**record, **failure, "result": None}, default=repr) + "\n"
    if limit_bytes is None or len(line) <= limit_bytes:  # json.dumps writes ASCII only
        return line
    size = len(json.dumps(record.get("result")))
    if size <= limit_bytes:
        return line
    failure = _failure(ErrorKind.RESULT_TOO_LARGE,
                       f"the result is {size} bytes, over the limit of {limit_bytes} bytes")
    return json.dumps({**record, **failure, "result": None}) + "\n"


def run_job(job: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run the job's action (imported by the zygote already); return its result record."""
    usage = _Usage()
    memory_limit = job.get("memory_limit_bytes")
    retire = False
    try:
        if memory_limit:
            _limit_address_space(memory_limit)
        record = _call_action(job, emit)
    except MemoryError:  # over the address-space limit: this heap is not to be trusted
        retire = True
        record = _failure(ErrorKind.MEMORY_LIMIT,
                          f"used more than its memory limit of {memory_limit} bytes")
    finally:
        if memory_limit:
            _limit_address_space(None)
        sys.stdout.flush()
        sys.stderr.flush()
    record.update(type="result", usage=usage.done(), retire=retire)
    return record


def _call_action(job: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    spec = actions.lookup(job["action"])
    if spec is None or spec.fn is None:
        return _failure(ErrorKind.UNKNOWN_ACTION, f"no action named {job['action']!r}")
    limit = job.get("checkpoint_limit_bytes")

    def save(data: Any) -> None:
        size = len(json.dumps(data, default=repr).encode())
        if limit is not None and size > limit:
            raise CheckpointTooLarge(
                f"checkpoint is {size} bytes, over the limit of {limit} bytes")
        emit({"type": "checkpoint", "data": data})

    ctx = actions.Context(execution_id=job["execution_id"], params=job["params"],
                          attempt=job["attempt"], checkpoint=job["checkpoint"], _save=save)
    try:
        result = spec.fn(ctx)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
    except MemoryError:
        raise
    except CheckpointTooLarge as exc:
        return _failure(ErrorKind.CHECKPOINT_TOO_LARGE, str(exc))
    except BaseException as exc:  # the child reports everything, even SystemExit
        return _failure(ErrorKind.ACTION_ERROR, str(exc)[:2000], type=type(exc).__name__,
                        traceback=traceback.format_exc()[-8000:])
    return {"ok": True, "result": result}


def _failure(kind: ErrorKind, message: str, **details: Any) -> dict[str, Any]:
    return {"ok": False, "error": {"kind": kind, "message": message, **details}}


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _limit_address_space(limit_bytes: int | None) -> None:
    """Cap this process's address space at what it maps now plus `limit_bytes`, so an
    attempt that allocates past its memory limit gets MemoryError (the worker's RSS
    watchdog catches what this misses); None lifts the cap again."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = hard if limit_bytes is None else _mapped_bytes() + limit_bytes
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * _PAGE


class _Usage:
    """What one attempt used: peak RSS (the kernel's high-water mark, reset at the
    start), CPU seconds (its own and its waited-for children's) and wall seconds."""

    def __init__(self) -> None:
        self._began = time.monotonic()
        self._cpu = _cpu_s()
        _reset_peak_rss()

    def done(self) -> dict[str, float]:
        return {"peak_rss_bytes": _peak_rss_bytes(), "cpu_s": round(_cpu_s() - self._cpu, 6),
                "wall_s": round(time.monotonic() - self._began, 6)}


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    spawned = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + spawned.ru_utime + spawned.ru_stime


@functools.cache
def _proc_fd(name: str, flags: int) -> int | None:
    """A file of /proc/self kept open for the child's life (one open, not one per attempt);
    None where it cannot be opened."""
    try:
        return os.open(f"/proc/self/{name}", flags)
    except OSError:
        return None


def _reset_peak_rss() -> None:
    fd = _proc_fd("clear_refs", os.O_WRONLY)
    if fd is not None:  # else the peak is this process's lifetime peak
        os.write(fd, b"5")  # 5: reset VmHWM


def _peak_rss_bytes() -> int:
    fd = _proc_fd("status", os.O_RDONLY)
    status = os.pread(fd, 8192, 0) if fd is not None else b""
    start = status.find(b"VmHWM:")
    if start < 0:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return int(status[start + 6:status.index(b"kB", start)]) * 1024
