"""The runtimes run real child processes; no servers are needed."""

import asyncio
import os
import time

import pytest

from services.worker.forkserver import ForkServer
from services.worker.runtimes import Attempt, Outcome, run

FORKSERVER: ForkServer | None = None


@pytest.fixture(scope="module", autouse=True)
async def forkserver():
    global FORKSERVER
    FORKSERVER = ForkServer(["examples.actions"])
    await FORKSERVER.start()
    yield FORKSERVER
    await FORKSERVER.close()


async def attempt(action: str, params, checkpoint=None, n: int = 1) -> Outcome:
    saved = []

    async def on_checkpoint(data) -> None:
        saved.append(data)

    outcome = await run(Attempt("e-1", action, params, n, checkpoint), forkserver=FORKSERVER,
                        tail_bytes=64, on_checkpoint=on_checkpoint)
    attempt.saved = saved  # type: ignore[attr-defined]
    return outcome


async def test_python_result_round_trips() -> None:
    outcome = await attempt("demo.add", {"a": 2, "b": 40})
    assert outcome == Outcome(True, result={"sum": 42})


async def test_python_exception_is_recorded_with_type_message_and_traceback() -> None:
    outcome = await attempt("demo.fail", {"message": "boom"})
    assert not outcome.ok and outcome.retryable
    assert outcome.error["type"] == "ValueError"
    assert outcome.error["message"] == "boom"
    assert "Traceback" in outcome.error["traceback"]


async def test_a_child_killed_like_an_oom_is_a_failure_not_a_crash_of_ours() -> None:
    outcome = await attempt("demo.crash", {})
    assert outcome.error["kind"] == "killed"
    assert "SIGKILL" in outcome.error["message"]


async def test_unknown_python_action_is_never_retried() -> None:
    outcome = await attempt("demo.nope", {})
    assert outcome.error["kind"] == "unknown_action" and not outcome.retryable


async def test_checkpoints_reach_the_parent_and_resume() -> None:
    outcome = await attempt("demo.steps", {"total": 3})
    assert outcome.result == {"done": 3, "resumed_from": 0, "attempt": 1}
    assert attempt.saved == [{"done": 1}, {"done": 2}, {"done": 3}]
    resumed = await attempt("demo.steps", {"total": 3}, checkpoint={"done": 2}, n=2)
    assert resumed.result == {"done": 3, "resumed_from": 2, "attempt": 2}


async def test_shell_success_keeps_output_tails() -> None:
    outcome = await attempt("shell", {"argv": ["sh", "-c", "seq 1 1000; echo oops >&2"]})
    assert outcome.ok and outcome.result["exit_code"] == 0
    assert outcome.result["stdout"].endswith("999\n1000\n")
    assert len(outcome.result["stdout"]) == 64
    assert outcome.result["stderr"] == "oops\n"


async def test_shell_env_and_cwd(tmp_path) -> None:
    outcome = await attempt("shell", {"argv": ["sh", "-c", "echo $GREETING; pwd"],
                                      "env": {"GREETING": "hi"}, "cwd": str(tmp_path)})
    assert outcome.result["stdout"] == f"hi\n{tmp_path}\n"


@pytest.mark.parametrize(("params", "kind"), [
    ({"argv": ["sh", "-c", "exit 3"]}, "exit_code"),
    ({"argv": ["/no/such/command"]}, "command_not_found"),
    ({"argv": []}, "invalid_params"),
    ({"cmd": "ls"}, "invalid_params"),
])
async def test_shell_failures_say_why(params, kind) -> None:
    outcome = await attempt("shell", params)
    assert not outcome.ok and outcome.error["kind"] == kind


@pytest.mark.parametrize(("action", "params"), [
    ("shell", {"argv": ["sleep", "30"]}),
    ("demo.sleep", {"seconds": 30}),
])
async def test_cancelling_an_attempt_kills_its_child_quickly(action, params) -> None:
    task = asyncio.create_task(attempt(action, params))
    await asyncio.sleep(0.3)
    began = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - began < 2


async def test_each_python_attempt_runs_in_a_process_of_its_own(tmp_path) -> None:
    first = await attempt("demo.record", {"dir": str(tmp_path), "seconds": 0})
    second = await attempt("demo.record", {"dir": str(tmp_path), "seconds": 0}, n=2)
    assert first.ok and second.ok
    assert len({first.result["pid"], second.result["pid"], os.getpid()}) == 3


async def test_the_zygote_is_replaced_if_it_dies(forkserver: ForkServer) -> None:
    old = forkserver.zygote_pid
    assert old is not None
    os.kill(old, 9)
    assert (await attempt("demo.add", {"a": 1, "b": 2})).result == {"sum": 3}
    assert forkserver.zygote_pid not in (None, old)
