"""`vigil dead-letters`: list, inspect and requeue, on dead letters made by a real broker."""

import json
import uuid

import aio_pika

from common import broker
from common.config import BrokerRole
from common.db import executions
from common.state_machine import ExecutionStatus
from tests.harness import Env, deaf_worker


async def _failed_by_dead_letters(env: Env, n: int) -> list[uuid.UUID]:
    """n executions whose only dispatch expired in a deaf worker's queue, with
    max_dispatches 1: each ends FAILED max_dispatches."""
    async with deaf_worker(env, ["demo.add"], message_ttl_ms=300):
        env.executor(VIGIL_EXECUTOR_MAX_DISPATCHES="1")
        ids = await env.submit("demo.add", {"a": 1, "b": 2}, n=n)
        assert await env.all_terminal(ids, timeout=30) == {ExecutionStatus.FAILED: n}
    for e in [await executions.get(env.pool, i) for i in ids]:
        assert e is not None and e.reason == "max_dispatches", e
    return ids


async def test_list_and_inspect_show_each_dead_letter_and_what_became_of_it(env: Env):
    [eid] = await _failed_by_dead_letters(env, 1)

    listed = env.cli("dead-letters", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert report["waiting"] == 0
    [dead] = report["dead_letters"]
    assert (dead["execution_id"], dead["action"], dead["cause"], dead["outcome"],
            dead["status_now"], dead["attempt"], dead["dispatch"]) == (
        str(eid), "demo.add", "expired", "FAILED", "FAILED", 1, 1)
    assert dead["worker_id"].startswith("deaf-")
    table = env.cli("dead-letters", "list")
    assert str(eid) in table.stdout and "expired" in table.stdout

    inspected = json.loads(env.cli("dead-letters", "inspect", str(eid), "--json").stdout)
    assert inspected["requeueable"] is True
    assert [d["cause"] for d in inspected["dead_letters"]] == ["expired"]
    text = env.cli("dead-letters", "inspect", str(eid)).stdout
    assert f"vigil dead-letters requeue {eid}" in text


async def test_requeue_runs_them_again_as_a_new_attempt_and_they_succeed(env: Env):
    ids = await _failed_by_dead_letters(env, 3)
    # FAILED for another reason: --all leaves it alone.
    [other] = await env.submit("nobody.offers.this", {})
    await env.pool.execute(
        "UPDATE executions SET status = 'FAILED', reason = 'action_error' WHERE id = $1", other)

    result = env.cli("dead-letters", "requeue", "--all", "--json")
    assert result.returncode == 0, result.stderr
    requeued = {uuid.UUID(r["id"]): r["attempt"] for r in json.loads(result.stdout)}
    assert requeued == {i: 2 for i in ids}
    env.worker("healthy")
    assert await env.all_terminal(ids, timeout=30) == {ExecutionStatus.SUCCEEDED: len(ids)}
    assert (await executions.get(env.pool, other)).status == ExecutionStatus.FAILED
    history = await executions.history(env.pool, ids[0])
    assert [(h.from_status, h.to_status, h.reason, h.actor) for h in history
            if h.reason == "dead_letter_requeued"] == [
        (ExecutionStatus.FAILED, ExecutionStatus.REQUESTED, "dead_letter_requeued", "cli")]


async def test_requeue_refuses_what_dead_letters_did_not_fail_and_changes_nothing(env: Env):
    [dead] = await _failed_by_dead_letters(env, 1)
    [waiting] = await env.submit("nobody.offers.this", {})

    result = env.cli("dead-letters", "requeue", str(dead), str(waiting))
    assert result.returncode == 1
    assert f"execution {waiting} is REQUESTED" in result.stderr
    assert (await executions.get(env.pool, dead)).status == ExecutionStatus.FAILED

    missing = uuid.uuid4()
    assert env.cli("dead-letters", "requeue", str(missing)).returncode == 1
    for args in (["requeue"], ["requeue", str(dead), "--all"], ["requeue", "x"],
                 ["requeue", str(dead), "--since", "1h"], ["list", "--since", "soon"]):
        usage = env.cli("dead-letters", *args)
        assert usage.returncode == 2, (args, usage.stderr)
        assert "Traceback" not in usage.stderr
    assert (await executions.get(env.pool, dead)).status == ExecutionStatus.FAILED

    ok = env.cli("dead-letters", "requeue", str(dead))
    assert ok.returncode == 0, ok.stderr
    assert f"{dead} requested again as attempt 2" in ok.stdout


async def test_list_counts_dead_letters_no_executor_has_handled_yet(env: Env):
    # No executor runs, so a dead letter stays in the queue.
    admin = await broker.connect(env.broker, BrokerRole.ADMIN, "vigil-tests admin")
    try:
        channel = await admin.channel(publisher_confirms=True)
        dlx = await channel.get_exchange(broker.DEAD_LETTER_EXCHANGE)
        await dlx.publish(aio_pika.Message(b"{}"), routing_key="")
    finally:
        await admin.close()

    assert json.loads(env.cli("dead-letters", "list", "--json").stdout)["waiting"] == 1
    assert "1 dead letters wait in vigil.dead-letters" in env.cli("dead-letters", "list").stdout
