"""Hostile input on the queues: huge, deeply nested, NUL-ridden or mistyped bodies on a
worker's queue or straight on the dead-letter exchange are counted and parked in
`vigil.parked`, never crash a service, and never write a row."""

import asyncio
import base64
import json
import uuid
from urllib.parse import quote

import aio_pika
import pytest

from common import broker
from common.config import BrokerRole
from common.models import Dispatch, DispatchMessage
from common.state_machine import ExecutionStatus
from tests.harness import REPO, Env, management, sample, scrape_until, wait_until

EXECUTOR_PORT = 19472
WORKER_PORT = 19473


def _dispatch(**changes: object) -> bytes:
    """A well-formed dispatch message, with its first pointer's fields changed."""
    message = json.loads(DispatchMessage.of([Dispatch(uuid.uuid4(), 1, 1, "w")])
                         .model_dump_json())
    message["dispatches"][0].update(changes)
    return json.dumps(message).encode()


# Every kind of body a queue can be sent that is not a dispatch, by the kind each is
# counted as: too large to be parsed at all, or not a dispatch once parsed.
HOSTILE: dict[str, list[bytes]] = {
    "oversize": [b"[" * (8 * 2**20)],
    "malformed": [
        b"[" * 10_000 + b"]" * 10_000,  # nesting past any parser's recursion
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b"\x00" * 1024,
        _dispatch(execution_id=str(uuid.uuid4())[:-1] + "\u0000"),  # NUL in the id
        _dispatch(execution_id="../../etc/passwd"),  # not a UUID
        _dispatch(execution_id=12345),
        b"\xff\xfe not utf-8",
        b"",
    ],
}
ALL_HOSTILE = [body for bodies in HOSTILE.values() for body in bodies]


async def _publish(env: Env, exchange: str, routing_key: str, bodies: list[bytes],
                   headers: dict | None = None) -> None:
    """Publish as the administrator (no Vigil user may write to these), confirmed: the
    broker took every one of them, the 8 MiB one included."""
    connection = await broker.connect(env.broker, BrokerRole.ADMIN, "vigil-tests hostile")
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = channel.default_exchange if not exchange else \
            await channel.get_exchange(exchange, ensure=False)
        for body in bodies:
            await target.publish(aio_pika.Message(body, headers=headers or {}),
                                 routing_key=routing_key)
    finally:
        await connection.close()


def _queue(env: Env, name: str) -> dict:
    return management(f"queues/{env.name}/{quote(name, safe='')}")


async def _length(env: Env, queue: str, n: int) -> bool:
    """Whether the queue holds n messages (ready or not)."""
    return (await asyncio.to_thread(_queue, env, queue)).get("messages") == n


def _parked(env: Env, n: int) -> list[dict]:
    """The first n parked messages (left in place), bodies cut at 100 bytes."""
    return management(f"queues/{env.name}/{broker.PARKED_QUEUE}/get", "POST", {
        "count": n, "ackmode": "ack_requeue_true", "encoding": "base64", "truncate": 100})


async def _counted(port: int, series: str, queue: str | None, expected: dict[str, int]) -> str:
    """Scrape until each kind is counted as expected; return the text."""
    label = "kind" if queue else "outcome"
    extra = {"queue": queue} if queue else {}

    def check(text: str) -> bool:
        return all(sample(text, series, **extra, **{label: kind}) == n
                   for kind, n in expected.items())

    return await scrape_until(port, check, what=f"{series} to count {expected}")


async def _still_working(env: Env, *procs) -> None:
    """A normal execution still succeeds, the services never restarted, and nothing but
    that execution was ever written."""
    [eid] = await env.submit("demo.add", {"a": 1, "b": 2})
    assert await env.all_terminal([eid], timeout=30) == {ExecutionStatus.SUCCEEDED: 1}
    assert all(p.popen.poll() is None for p in procs)
    assert await env.pool.fetchval("SELECT count(*) FROM executions") == 1
    assert await env.pool.fetchval(
        "SELECT count(*) FROM execution_history WHERE execution_id <> $1", eid) == 0
    for p in procs:
        assert "Traceback" not in p.log(), p.log()[-3000:]


def _expected() -> dict[str, int]:
    return {kind: len(bodies) for kind, bodies in HOSTILE.items()}


async def test_hostile_bodies_on_a_worker_queue_are_rejected_counted_and_parked(env: Env):
    executor = env.executor(metrics_port=EXECUTOR_PORT)
    worker = env.worker("w1", metrics_port=WORKER_PORT)
    [worker_id] = await env.live_workers(1)
    await _publish(env, "", broker.worker_queue(worker_id), ALL_HOSTILE)

    # The worker rejects each (the 8 MiB one before parsing), the dead-letter exchange
    # takes it to an executor, which cannot use it either and parks it.
    await _counted(WORKER_PORT, "vigil_bad_messages_total", "worker", _expected())
    await _counted(EXECUTOR_PORT, "vigil_bad_messages_total", "dead-letters", _expected())
    await _counted(EXECUTOR_PORT, "vigil_dead_letters_total", None, _expected())

    await wait_until(lambda: _length(env, broker.PARKED_QUEUE, len(ALL_HOSTILE)),
                     timeout=10, what="every hostile body parked")
    parked = await asyncio.to_thread(_parked, env, len(ALL_HOSTILE))
    assert sorted(m["payload_bytes"] for m in parked) == sorted(len(b) for b in ALL_HOSTILE)
    # What it was taken for, and where it came from.
    assert sorted(m["properties"]["headers"]["vigil-parked-as"] for m in parked) == \
        sorted(kind for kind, bodies in HOSTILE.items() for _ in bodies)
    assert {(h["vigil-dead-letter-cause"], h["vigil-worker"])
            for h in (m["properties"]["headers"] for m in parked)} == {("rejected", worker_id)}
    await wait_until(lambda: _length(env, broker.DEAD_LETTER_QUEUE, 0), timeout=10,
                     what="the dead-letter queue empty")
    await _still_working(env, executor, worker)


async def test_hostile_bodies_straight_on_the_dead_letter_exchange_are_parked(env: Env):
    executor = env.executor(metrics_port=EXECUTOR_PORT)
    env.worker("w1")
    [worker_id] = await env.live_workers(1)
    await _publish(env, broker.DEAD_LETTER_EXCHANGE, "", ALL_HOSTILE)
    # A well-formed dispatch that no worker queue dead-lettered is foreign; one that
    # claims to have been (a forged x-death) with values the database cannot hold is
    # refused by it.
    forged = {"x-death": [{"queue": broker.worker_queue(worker_id), "reason": "rejected",
                           "count": 1}]}
    await _publish(env, broker.DEAD_LETTER_EXCHANGE, "", [_dispatch()])
    await _publish(env, broker.DEAD_LETTER_EXCHANGE, "", [_dispatch(attempt=2**40)],
                   headers=forged)
    # A forged x-death that would crash the queue (and drop its consumers) if the broker
    # ever dead-lettered the message again: parking never asks it to.
    crashing = {"x-death": [{"queue": broker.DEAD_LETTER_QUEUE, "reason": "rejected",
                             "count": "many"}]}
    await _publish(env, broker.DEAD_LETTER_EXCHANGE, "", [b"{}"], headers=crashing)

    expected = {**_expected(), "foreign": 1, "refused": 0}
    expected["malformed"] += 1
    expected["refused" if _accepts(2**40) else "malformed"] += 1
    await _counted(EXECUTOR_PORT, "vigil_dead_letters_total", None, expected)

    await wait_until(lambda: _length(env, broker.PARKED_QUEUE, len(ALL_HOSTILE) + 3),
                     timeout=10, what="every hostile body parked")

    async def still_consumed() -> bool:
        queue = await asyncio.to_thread(_queue, env, broker.DEAD_LETTER_QUEUE)
        return (queue.get("messages"), queue.get("consumers")) == (0, 1)

    await wait_until(still_consumed, timeout=15, what="the executor consuming dead letters")
    await _still_working(env, executor)


def _accepts(attempt: int) -> bool:
    """Whether the message model lets this attempt number through to the database."""
    try:
        DispatchMessage.model_validate_json(_dispatch(attempt=attempt))
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", [broker.DEAD_LETTER_POLICY_NAME, broker.PARKED_POLICY_NAME])
async def test_the_queues_that_take_anything_are_bounded_by_policy(env: Env, name: str):
    # `vigil broker setup` (the env's provisioning) set it, as definitions.json does.
    shipped = {p["name"]: p for p in json.loads(
        (REPO / "rabbitmq" / "definitions.json").read_text())["policies"]}[name]
    policy = management(f"policies/{env.name}/{name}")
    assert {k: policy[k] for k in ("pattern", "apply-to", "definition")} == \
        {k: shipped[k] for k in ("pattern", "apply-to", "definition")} == \
        {k: broker.policies()[name][k] for k in ("pattern", "apply-to", "definition")}
    assert policy["definition"]["overflow"] == "drop-head"
    assert policy["definition"]["max-length"] > 0 < policy["definition"]["max-length-bytes"]


async def test_past_their_bounds_the_queues_drop_their_oldest(env: Env):
    management(f"policies/{env.name}/{broker.DEAD_LETTER_POLICY_NAME}", "PUT",
               broker.dead_letter_policy(max_length=3))
    management(f"policies/{env.name}/{broker.PARKED_POLICY_NAME}", "PUT",
               broker.parked_policy(max_length=2))
    bodies = [f"not a dispatch {i}".encode() for i in range(7)]
    # No executor consumes: the dead-letter queue keeps the newest 3.
    await _publish(env, broker.DEAD_LETTER_EXCHANGE, "", bodies)
    await wait_until(lambda: _length(env, broker.DEAD_LETTER_QUEUE, 3), timeout=10,
                     what="the dead-letter queue at its bound")
    # An executor parks those 3: the parking queue keeps the newest 2.
    env.executor()
    await wait_until(lambda: _length(env, broker.DEAD_LETTER_QUEUE, 0), timeout=30,
                     what="the dead letters handled")
    await wait_until(lambda: _length(env, broker.PARKED_QUEUE, 2), timeout=10,
                     what="the parking queue at its bound")
    parked = await asyncio.to_thread(_parked, env, 2)
    assert [base64.b64decode(m["payload"]) for m in parked] == bodies[5:]



async def test_with_nowhere_to_park_them_bad_dead_letters_are_dropped_and_counted(env: Env):
    executor = env.executor(metrics_port=EXECUTOR_PORT)
    # Counted from 0 once the executor has declared its topology and handles dead letters.
    await _counted(EXECUTOR_PORT, "vigil_dead_letters_total", None, {"malformed": 0})
    management(f"queues/{env.name}/{broker.PARKED_QUEUE}", "DELETE")  # an operator's slip
    await _publish(env, broker.DEAD_LETTER_EXCHANGE, "", [b"junk", b"more junk"])
    await _counted(EXECUTOR_PORT, "vigil_dead_letters_total", None, {"malformed": 2})
    await wait_until(lambda: _length(env, broker.DEAD_LETTER_QUEUE, 0), timeout=10,
                     what="the dead letters settled")
    assert "could not park malformed dead letter" in executor.log()
    env.worker("w1")
    await _still_working(env, executor)
