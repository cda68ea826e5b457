"""Runtimes: how one attempt runs in a child process, and what its outcome is.

`shell` runs an argv list in a process (and process group) of its own; `python` runs a
registered action in one of the worker's pooled children (services/worker/pool.py).
Either way the child dies with the worker (PDEATHSIG), so a crash or an OOM kill takes
the child, never the worker, and a dead worker leaves no orphan still doing the work.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.state_machine import AttemptError, ErrorKind, Reason
from services.worker.pdeathsig import die_with_parent
from services.worker.pool import ChildPool, ChildRun

SHELL_ACTION = "shell"
RUNTIMES = ("shell", "python")


@dataclass(frozen=True)
class Outcome:
    ok: bool
    result: Any = None
    error: AttemptError | None = None
    usage: dict[str, float] | None = None  # peak_rss_bytes, cpu_s, wall_s (what is known)

    @property
    def reason(self) -> str:
        return self.error.kind if self.error is not None else Reason.SUCCEEDED


def failed(kind: ErrorKind, message: str, usage: dict[str, float] | None = None,
           **details: Any) -> Outcome:
    return Outcome(False, error=AttemptError(kind=kind, message=message, **details),
                   usage=usage)


class ShellParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1)
    env: dict[str, str] | None = None
    cwd: str | None = None


@dataclass(frozen=True)
class Attempt:
    execution_id: str
    action: str
    params: Any
    attempt: int
    checkpoint: Any
    memory_limit_bytes: int | None  # None: no cap


OnCheckpoint = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True)
class Runtimes:
    """What the worker runs attempts with: its python pool (None if it offers no python
    actions) and the limits every attempt gets."""

    pool: ChildPool | None
    tail_bytes: int
    checkpoint_limit_bytes: int
    result_limit_bytes: int

    async def run(self, attempt: Attempt, on_checkpoint: OnCheckpoint) -> Outcome:
        """Run one attempt to its end. Cancelling this coroutine kills the child."""
        if attempt.action == SHELL_ACTION:
            return await self._run_shell(attempt)
        if self.pool is None:
            return failed(ErrorKind.UNKNOWN_ACTION, "this worker does not run python actions")
        run = await self.pool.run(
            {"execution_id": attempt.execution_id, "action": attempt.action,
             "params": attempt.params, "attempt": attempt.attempt,
             "checkpoint": attempt.checkpoint,
             "checkpoint_limit_bytes": self.checkpoint_limit_bytes,
             "result_limit_bytes": self.result_limit_bytes},
            memory_limit_bytes=attempt.memory_limit_bytes, on_checkpoint=on_checkpoint,
        )
        return _python_outcome(run, attempt.memory_limit_bytes)

    async def _run_shell(self, attempt: Attempt) -> Outcome:
        try:
            params = ShellParams.model_validate(attempt.params)
        except ValidationError as exc:
            return failed(ErrorKind.INVALID_PARAMS, _first_error(exc))
        env = {**os.environ, **params.env} if params.env is not None else None
        began = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *params.argv, cwd=params.cwd, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
                preexec_fn=_shell_child_setup(attempt.memory_limit_bytes),
            )
        except FileNotFoundError as exc:
            kind = ErrorKind.INVALID_PARAMS if params.cwd and not os.path.isdir(params.cwd) \
                else ErrorKind.COMMAND_NOT_FOUND
            return failed(kind, str(exc))
        except OSError as exc:
            return failed(ErrorKind.SPAWN_FAILED, str(exc))
        assert proc.stdout is not None and proc.stderr is not None
        try:
            stdout, stderr = await asyncio.gather(_tail(proc.stdout, self.tail_bytes),
                                                  _tail(proc.stderr, self.tail_bytes))
            code = await proc.wait()
        except BaseException:
            _kill_group(proc.pid)
            await asyncio.shield(proc.wait())
            raise
        output = {"exit_code": code, "stdout": stdout, "stderr": stderr}
        usage = {"wall_s": round(time.monotonic() - began, 6)}
        if code == 0:
            return Outcome(True, result=output, usage=usage)
        return failed(ErrorKind.KILLED if code < 0 else ErrorKind.EXIT_CODE, _exit_text(code),
                      usage, **output, **_signal(code))


def _python_outcome(run: ChildRun, memory_limit_bytes: int | None) -> Outcome:
    if run.record is not None:
        usage = run.record["usage"]
        if run.record["ok"]:
            return Outcome(True, result=run.record["result"], usage=usage)
        return Outcome(False, error=AttemptError(**run.record["error"], stderr=run.stderr),
                       usage=usage)
    # The child died before it could report: a signal (the OOM killer, SIGSEGV, a kill),
    # our memory watchdog, or an exit of its own.
    usage = {"wall_s": round(run.wall_s, 6)}
    if run.peak_rss_bytes is not None:
        usage["peak_rss_bytes"] = run.peak_rss_bytes
    code = run.exit_code if run.exit_code is not None else -signal.SIGKILL
    details = {"stderr": run.stderr, **_signal(code), **(
        {"peak_rss_bytes": run.peak_rss_bytes} if run.peak_rss_bytes is not None else {})}
    if run.over_memory_limit:
        return failed(ErrorKind.MEMORY_LIMIT,
                      f"used more than its memory limit of {_mib(memory_limit_bytes)}; "
                      f"{_exit_text(code)}", usage, **details)
    return failed(ErrorKind.KILLED if code < 0 else ErrorKind.CRASHED, _exit_text(code),
                  usage, **details)


def _shell_child_setup(memory_limit_bytes: int | None) -> Callable[[], None]:
    def setup() -> None:  # in the forked child, before exec
        die_with_parent()
        if memory_limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))

    return setup


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def _tail(stream: asyncio.StreamReader, limit: int) -> str:
    """Read a stream to its end, keeping only its last `limit` bytes."""
    kept = bytearray()
    while chunk := await stream.read(65536):
        kept += chunk
        if len(kept) > limit:
            del kept[: len(kept) - limit]
    return kept.decode(errors="replace")


def _signal(code: int) -> dict[str, str]:
    if code >= 0:
        return {}
    try:
        return {"signal": signal.Signals(-code).name}
    except ValueError:
        return {"signal": str(-code)}


def _exit_text(code: int) -> str:
    if code < 0:
        return f"killed by {_signal(code)['signal']}"
    return f"exited with code {code}"


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:g} MiB"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "params"
    return f"{where}: {err['msg']}"
