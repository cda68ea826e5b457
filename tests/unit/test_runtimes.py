"""The runtimes run real child processes (a real zygote and pool); no servers needed."""

import asyncio
import os
import time

import pytest

from services.worker.forkserver import LINE_LIMIT_BYTES, ForkServer
from services.worker.pool import ChildPool
from services.worker.runtimes import Attempt, Outcome, Runtimes
from tests.harness import wait_until

RUNTIMES: Runtimes | None = None
RESULT_LIMIT = 100 * 2**20  # above what a child may write in one line (LINE_LIMIT_BYTES)


@pytest.fixture(scope="module", autouse=True)
async def runtimes():
    global RUNTIMES
    forkserver = ForkServer(["examples.actions"])
    await forkserver.start()
    pool = ChildPool(forkserver, 2, max_attempts_per_child=1000, recycle_rss_bytes=None,
                     tail_bytes=64)
    await pool.start()
    RUNTIMES = Runtimes(pool, tail_bytes=64, checkpoint_limit_bytes=1024,
                        result_limit_bytes=RESULT_LIMIT)
    yield RUNTIMES
    await pool.close()
    await forkserver.close()


async def attempt(action: str, params, checkpoint=None, n: int = 1,
                  memory_limit_bytes: int | None = None) -> Outcome:
    saved = []

    async def on_checkpoint(data) -> None:
        saved.append(data)

    assert RUNTIMES is not None
    outcome = await RUNTIMES.run(
        Attempt("e-1", action, params, n, checkpoint, memory_limit_bytes), on_checkpoint)
    attempt.saved = saved  # type: ignore[attr-defined]
    return outcome


async def test_python_result_round_trips_with_what_it_used() -> None:
    outcome = await attempt("demo.add", {"a": 2, "b": 40})
    assert (outcome.ok, outcome.result) == (True, {"sum": 42})
    assert outcome.usage is not None
    assert outcome.usage["peak_rss_bytes"] > 1_000_000 and outcome.usage["wall_s"] >= 0


async def test_python_exception_is_recorded_with_type_message_and_traceback() -> None:
    outcome = await attempt("demo.fail", {"message": "boom"})
    assert not outcome.ok and outcome.error.retryable
    error = outcome.error.as_json()
    assert (error["kind"], error["type"], error["message"]) == ("action_error", "ValueError",
                                                                "boom")
    assert "Traceback" in error["traceback"]


async def test_a_child_killed_like_an_oom_is_a_failure_not_a_crash_of_ours() -> None:
    outcome = await attempt("demo.crash", {})
    assert (outcome.error.kind, outcome.error.as_json()["signal"]) == ("killed", "SIGKILL")
    assert "SIGKILL" in outcome.error.message
    # The pool replaced the dead child: the next attempt runs as usual.
    assert (await attempt("demo.add", {"a": 1, "b": 1})).result == {"sum": 2}


async def test_unknown_python_action_is_never_retried() -> None:
    outcome = await attempt("demo.nope", {})
    assert outcome.error.kind == "unknown_action" and not outcome.error.retryable


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
    assert not outcome.ok and outcome.error.kind == kind


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


async def test_python_attempts_run_in_pooled_children_not_in_the_worker(tmp_path) -> None:
    first = await attempt("demo.record", {"dir": str(tmp_path), "seconds": 0})
    second = await attempt("demo.record", {"dir": str(tmp_path), "seconds": 0}, n=2)
    assert first.ok and second.ok
    assert os.getpid() not in {first.result["pid"], second.result["pid"]}
    assert {first.result["pid"], second.result["pid"]} <= set(RUNTIMES.pool.pids)


async def test_what_an_attempt_prints_is_its_own(tmp_path) -> None:
    noisy = await attempt("demo.fail", {"message": "boom"})
    assert noisy.error.as_json()["stderr"] == ""
    printed = await attempt("shell", {"argv": ["sh", "-c", "echo one >&2; exit 3"]})
    assert printed.error.as_json()["stderr"] == "one\n"


async def test_a_checkpoint_over_the_limit_fails_the_attempt_clearly() -> None:
    outcome = await attempt("demo.big_checkpoint", {"bytes": 2000})
    assert outcome.error.kind == "checkpoint_too_large" and not outcome.error.retryable
    assert "over the limit of 1024 bytes" in outcome.error.message


async def test_an_attempt_over_its_memory_limit_is_stopped_and_the_pool_goes_on() -> None:
    outcome = await attempt("demo.hog", {"mib": 1024}, memory_limit_bytes=64 * 2**20)
    assert outcome.error.kind == "memory_limit", outcome.error
    assert (await attempt("demo.add", {"a": 1, "b": 2})).result == {"sum": 3}


async def test_the_zygote_is_replaced_if_it_dies(runtimes: Runtimes) -> None:
    forkserver = runtimes.pool._forkserver
    old = forkserver.zygote_pid
    assert old is not None
    os.kill(old, 9)

    # Its children die with it (an attempt caught there fails as killed); the pool
    # forks new ones from a new zygote and carries on.
    async def recovered() -> bool:
        outcome = await attempt("demo.add", {"a": 1, "b": 2})
        assert outcome.ok or outcome.error.kind == "killed", outcome
        return outcome.ok and forkserver.zygote_pid not in (None, old)

    await wait_until(recovered, timeout=10, what="the pool to recover on a new zygote")
    for n in range(4):
        assert (await attempt("demo.add", {"a": n, "b": 2})).result == {"sum": n + 2}


async def test_a_result_that_is_not_json_fails_the_attempt_and_says_why() -> None:
    outcome = await attempt("demo.not_json", {})
    assert outcome.error.kind == "action_error"
    assert "the result is not JSON" in outcome.error.message
    assert (await attempt("demo.add", {"a": 1, "b": 1})).ok


async def test_a_result_over_the_limit_fails_the_attempt_and_is_not_retried(
        runtimes: Runtimes) -> None:
    small = Runtimes(runtimes.pool, tail_bytes=64, checkpoint_limit_bytes=1024,
                     result_limit_bytes=1000)
    outcome = await small.run(Attempt("e-1", "demo.echo", {"s": "x" * 1000}, 1, None, None),
                              on_checkpoint=None)  # type: ignore[arg-type]
    assert outcome.error.kind == "result_too_large" and not outcome.error.retryable
    assert "over the limit of 1000 bytes" in outcome.error.message
    fits = await small.run(Attempt("e-1", "demo.echo", {"s": "x" * 900}, 1, None, None),
                           on_checkpoint=None)  # type: ignore[arg-type]
    assert fits.ok and fits.result == {"s": "x" * 900}


async def test_a_line_the_worker_cannot_read_fails_the_attempt_as_a_bug(
        runtimes: Runtimes) -> None:
    # Past the reader's line limit: only possible with limits the settings do not allow.
    outcome = await attempt("demo.echo", {"s": "x" * (LINE_LIMIT_BYTES + 1)})
    assert outcome.error.kind == "bug" and "could not be read" in outcome.error.message
    assert (await attempt("demo.add", {"a": 1, "b": 1})).ok


async def test_a_child_that_dies_between_attempts_is_replaced_at_once(
        runtimes: Runtimes) -> None:
    pool = runtimes.pool
    assert pool is not None
    victim = pool.pids[0]
    os.kill(victim, 9)

    async def refilled() -> bool:
        pids = pool.pids
        return len(pids) == 2 and victim not in pids and all(_alive(p) for p in pids)

    await wait_until(refilled, timeout=5, interval=0.02, what="the dead child replaced")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
