"""Runtimes: how one attempt runs in a child process, and what its outcome is.

`shell` runs an argv list; `python` runs a registered action in a child forked by the
zygote (services/worker/zygote.py). Either way the child is in its own session and
dies with the worker (PDEATHSIG), so a crash or an OOM kill takes the child, never the
worker, and a dead worker leaves no orphan still doing the work.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.worker.forkserver import ForkServer
from services.worker.pdeathsig import die_with_parent

SHELL_ACTION = "shell"
RUNTIMES = ("shell", "python")
# Errors that would fail the same way again: retrying them only wastes a slot.
NEVER_RETRY = frozenset({"invalid_params", "unknown_action", "command_not_found", "bug"})



@dataclass(frozen=True)
class Outcome:
    ok: bool
    result: Any = None
    error: dict[str, Any] | None = None

    @property
    def retryable(self) -> bool:
        return not self.ok and (self.error or {}).get("kind") not in NEVER_RETRY

    @property
    def reason(self) -> str:
        return "succeeded" if self.ok else str((self.error or {}).get("kind", "failed"))


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


OnCheckpoint = Callable[[Any], Awaitable[None]]


async def run(
    attempt: Attempt, *, forkserver: ForkServer | None, tail_bytes: int,
    on_checkpoint: OnCheckpoint,
) -> Outcome:
    """Run one attempt to its end. Cancelling this coroutine kills the child."""
    if attempt.action == SHELL_ACTION:
        return await _run_shell(attempt, tail_bytes)
    if forkserver is None:
        return Outcome(False, error={"kind": "unknown_action",
                                     "message": "this worker does not run python actions"})
    return await _run_python(attempt, forkserver, tail_bytes, on_checkpoint)


async def _run_shell(attempt: Attempt, tail_bytes: int) -> Outcome:
    try:
        params = ShellParams.model_validate(attempt.params)
    except ValidationError as exc:
        return Outcome(False, error={"kind": "invalid_params", "message": _first_error(exc)})
    env = {**os.environ, **params.env} if params.env is not None else None
    try:
        proc = await asyncio.create_subprocess_exec(
            *params.argv, cwd=params.cwd, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
            preexec_fn=die_with_parent,
        )
    except FileNotFoundError as exc:
        kind = "invalid_params" if params.cwd and not os.path.isdir(params.cwd) \
            else "command_not_found"
        return Outcome(False, error={"kind": kind, "message": str(exc)})
    except OSError as exc:
        return Outcome(False, error={"kind": "spawn_failed", "message": str(exc)})
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr, code = await _supervise(
        _ShellProcess(proc), _tail(proc.stdout, tail_bytes), _tail(proc.stderr, tail_bytes)
    )
    output = {"exit_code": code, "stdout": stdout, "stderr": stderr}
    if code == 0:
        return Outcome(True, result=output)
    kind = "killed" if code < 0 else "exit_code"
    return Outcome(False, error={"kind": kind, "message": _exit_text(code), **output})


async def _run_python(
    attempt: Attempt, forkserver: ForkServer, tail_bytes: int, on_checkpoint: OnCheckpoint
) -> Outcome:
    try:
        child = await forkserver.spawn({
            "execution_id": attempt.execution_id, "action": attempt.action,
            "params": attempt.params, "attempt": attempt.attempt,
            "checkpoint": attempt.checkpoint,
        })
    except (OSError, RuntimeError) as exc:
        return Outcome(False, error={"kind": "spawn_failed", "message": str(exc)})
    results: list[dict[str, Any]] = []

    async def read_protocol() -> None:
        async for line in child.protocol:
            record = json.loads(line)
            if record["type"] == "checkpoint":
                await on_checkpoint(record["data"])
            else:
                results.append(record)

    _, stderr, code = await _supervise(child, read_protocol(), _tail(child.stderr, tail_bytes))
    if results and code == 0:
        record = results[-1]
        if record["ok"]:
            return Outcome(True, result=record["result"])
        return Outcome(False, error={**record["error"], "stderr": stderr})
    kind = "killed" if code < 0 else "crashed"
    return Outcome(False, error={"kind": kind, "message": _exit_text(code), "stderr": stderr})


class _Process(Protocol):
    def kill(self) -> None: ...

    async def wait(self) -> int: ...


class _ShellProcess:
    """An asyncio subprocess, seen as a process group to kill and an exit to wait for."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    def kill(self) -> None:
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def wait(self) -> int:
        return await self._proc.wait()


async def _supervise(
    proc: _Process, out: Awaitable[Any], err: Awaitable[str]
) -> tuple[Any, str, int]:
    """Wait for the child and its pipes; on cancellation kill its whole process group."""
    try:
        stdout, stderr = await asyncio.gather(out, err)
        code = await proc.wait()
    except BaseException:
        proc.kill()
        await asyncio.shield(proc.wait())
        raise
    return stdout, stderr, code


async def _tail(stream: asyncio.StreamReader, limit: int) -> str:
    """Read a stream to its end, keeping only its last `limit` bytes."""
    kept = bytearray()
    while chunk := await stream.read(65536):
        kept += chunk
        if len(kept) > limit:
            del kept[: len(kept) - limit]
    return kept.decode(errors="replace")


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "params"
    return f"{where}: {err['msg']}"
