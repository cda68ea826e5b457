"""A pool of long-lived python children, each running one attempt at a time.

Forking a child for every attempt costs more than a short attempt itself, so the worker
keeps `size` children forked from the zygote and hands each attempt to an idle one.
Isolation stays: a crash, a leak or a kill takes one child, never the worker. A child
that dies (or is killed: cancelled, timed out, over its memory limit) is replaced at
once; one is retired after `max_attempts_per_child` attempts, or when its memory has
grown past `recycle_rss_bytes` (as Celery's max_tasks_per_child / max_memory_per_child).
A watchdog samples the RSS of children running an attempt with a memory limit and kills
one that goes over it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from common.metrics import POOL_CHILDREN_REPLACED
from common.state_machine import ErrorKind
from services.worker.forkserver import Child, ForkServer

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE")
OnCheckpoint = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True)
class ChildRun:
    """What one attempt in a pooled child came to."""

    record: dict[str, Any] | None  # the child's result record; None if it died first
    exit_code: int | None  # how it died, if it did (< 0: the signal)
    stderr: str  # the tail of what the attempt printed
    over_memory_limit: bool  # killed by the watchdog
    peak_rss_bytes: int | None  # the watchdog's highest sample, if it watched
    wall_s: float


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class _Unreadable(Exception):
    """The child wrote a line that cannot be read (over the size limits the child itself
    keeps, or not JSON): a bug, since the child checks both before it writes."""

    def record(self, wall_s: float) -> dict[str, Any]:
        """The result record the attempt ends with."""
        return {"type": "result", "ok": False, "usage": {"wall_s": round(wall_s, 6)},
                "error": {"kind": ErrorKind.BUG,
                          "message": f"the child's answer could not be read: {self}"}}


class _PooledChild:
    """One child, the tail of what it printed, and what the watchdog knows of its
    current attempt."""

    def __init__(self, child: Child, tail_bytes: int) -> None:
        self.child = child
        self.attempts = 0
        self._tail_bytes = tail_bytes
        self._output = bytearray()
        self.memory_limit: int | None = None
        self.peak_rss: int | None = None
        self.over_memory_limit = False
        asyncio.get_running_loop().add_reader(child.stderr_fd, self.read_output)

    def begin(self, memory_limit: int | None) -> None:
        self.attempts += 1
        self.memory_limit, self.peak_rss, self.over_memory_limit = memory_limit, None, False
        self.read_output()
        self._output.clear()  # whatever came between attempts belongs to neither

    def read_output(self) -> None:
        """Take what the child printed so far, keeping the last tail_bytes. Called when
        its stderr is readable, and once more when its result arrives: the child writes
        all its output before its result, so by then every byte of it is in the pipe."""
        while True:
            try:
                chunk = os.read(self.child.stderr_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:  # it exited
                asyncio.get_running_loop().remove_reader(self.child.stderr_fd)
                return
            self._output += chunk
            if len(self._output) > self._tail_bytes:
                del self._output[:len(self._output) - self._tail_bytes]

    def output(self) -> str:
        self.read_output()
        return self._output.decode(errors="replace") if self._tail_bytes else ""

    async def close(self) -> None:
        self.child.writer.close()
        asyncio.get_running_loop().remove_reader(self.child.stderr_fd)
        os.close(self.child.stderr_fd)


class ChildPool:
    def __init__(
        self, forkserver: ForkServer, size: int, *, max_attempts_per_child: int,
        recycle_rss_bytes: int | None, tail_bytes: int, watchdog_interval_s: float = 0.1,
    ) -> None:
        self._forkserver = forkserver
        self._size = size
        self._max_attempts = max_attempts_per_child
        self._recycle_rss = recycle_rss_bytes
        self._tail_bytes = tail_bytes
        self._watchdog_interval_s = watchdog_interval_s
        self._idle: list[_PooledChild] = []
        self._busy: set[_PooledChild] = set()
        self._available = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        """Fork every child; return once all are ready for an attempt."""
        children = await asyncio.gather(*(self._forkserver.spawn() for _ in range(self._size)))
        for child in children:
            self._put(self._adopt(child))
        self._watchdog = asyncio.create_task(self._watch_memory(), name="pool-watchdog")

    @property
    def pids(self) -> list[int]:
        return [pc.child.pid for pc in (*self._idle, *self._busy)]

    async def run(
        self, job: dict[str, Any], *, memory_limit_bytes: int | None, on_checkpoint: OnCheckpoint,
    ) -> ChildRun:
        """Run one attempt in an idle child. Cancelling this kills the child."""
        pc = await self._take()
        began = time.monotonic()
        pc.begin(memory_limit_bytes)
        self._busy.add(pc)
        try:
            pc.child.writer.write(json.dumps(
                {**job, "memory_limit_bytes": memory_limit_bytes}).encode() + b"\n")
            record = await self._read_result(pc, on_checkpoint)
        except _Unreadable as exc:
            log.error("child %d wrote what cannot be read (%s): killing it", pc.child.pid,
                      exc, extra={"event": "child_unreadable"})
            pc.child.kill()
            self._busy.discard(pc)
            self._replace(pc, "killed")
            return ChildRun(exc.record(time.monotonic() - began), None, pc.output(), False,
                            None, time.monotonic() - began)
        except BaseException:
            pc.child.kill()
            self._busy.discard(pc)
            self._replace(pc, "killed")
            raise
        self._busy.discard(pc)
        output = pc.output()
        if record is None:
            code = await pc.child.wait()
            self._replace(pc, "died")
            return ChildRun(None, code, output, pc.over_memory_limit, pc.peak_rss,
                            time.monotonic() - began)
        if record.get("retire") or self._worn_out(pc, record["usage"]["peak_rss_bytes"]):
            self._replace(pc, "recycled")
        else:
            self._put(pc)
        return ChildRun(record, None, output, False, None, time.monotonic() - began)

    async def close(self) -> None:
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        # Replacements under way finish first (and close what they forked), then the rest.
        await asyncio.gather(*self._tasks, self._watchdog or asyncio.sleep(0),
                             return_exceptions=True)
        for pc in [*self._idle, *self._busy]:
            await pc.close()
        self._idle.clear()

    async def _read_result(self, pc: _PooledChild, on_checkpoint: OnCheckpoint,
                           ) -> dict[str, Any] | None:
        """The child's result record, passing on its checkpoints; None if it died."""
        while True:
            try:
                line = await pc.child.reader.readline()
                # A line cut short is what a child killed mid-write leaves: it died.
                message = json.loads(line) if line.endswith(b"\n") else None
            except ConnectionError:
                return None
            except ValueError as exc:  # a line over the limit, or not JSON
                raise _Unreadable(str(exc)) from None
            if message is None or message["type"] != "checkpoint":
                return message
            await on_checkpoint(message["data"])

    def _worn_out(self, pc: _PooledChild, peak_rss: int) -> bool:
        """Time to replace it: enough attempts, or grown too big (by the peak RSS it
        reported for this attempt, which a leak keeps raising)."""
        return pc.attempts >= self._max_attempts or (
            self._recycle_rss is not None and peak_rss > self._recycle_rss)

    async def _take(self) -> _PooledChild:
        while True:
            while not self._idle:
                self._available.clear()
                await self._available.wait()
            pc = self._idle.pop()
            if not pc.child.exited.done():
                return pc
            self._replace(pc, "died")  # while idle

    def _adopt(self, child: Child) -> _PooledChild:
        pc = _PooledChild(child, self._tail_bytes)
        child.exited.add_done_callback(lambda _: self._died_idle(pc))
        return pc

    def _died_idle(self, pc: _PooledChild) -> None:
        """A child that dies between attempts (killed from outside) is replaced at once,
        not when an attempt would next be given to it."""
        if pc in self._idle and not self._closing:
            self._idle.remove(pc)
            self._replace(pc, "died")

    def _put(self, pc: _PooledChild) -> None:
        self._idle.append(pc)
        self._available.set()

    def _replace(self, pc: _PooledChild, why: str) -> None:
        """Let a child go (closing its channel ends it if it still lives) and fork a
        new one in its place."""
        POOL_CHILDREN_REPLACED.labels(why).inc()
        task = asyncio.create_task(self._renew(pc), name=f"replace-child-{pc.child.pid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renew(self, old: _PooledChild) -> None:
        await old.close()
        child = await self._fork()
        if child is not None and self._closing:
            await child.close()
        elif child is not None:
            self._put(child)

    async def _fork(self) -> _PooledChild | None:
        """A new child, trying again (with backoff) until it comes or the pool closes."""
        delay = 0.1
        while not self._closing:
            try:
                return self._adopt(await self._forkserver.spawn())
            except (OSError, RuntimeError) as exc:
                log.error("could not fork a python child (%s); trying again in %gs", exc,
                          delay, extra={"event": "fork_failed"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        return None

    async def _watch_memory(self) -> None:
        while True:
            await asyncio.sleep(self._watchdog_interval_s)
            for pc in list(self._busy):
                if pc.memory_limit is None:
                    continue
                rss = rss_bytes(pc.child.pid)
                if rss is None:
                    continue
                pc.peak_rss = max(pc.peak_rss or 0, rss)
                if rss > pc.memory_limit and not pc.over_memory_limit:
                    log.warning("child %d uses %d bytes, over its attempt's limit of %d: "
                                "killing it", pc.child.pid, rss, pc.memory_limit,
                                extra={"event": "memory_limit"})
                    pc.over_memory_limit = True
                    pc.child.kill()

