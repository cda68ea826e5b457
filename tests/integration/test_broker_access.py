"""Executors and workers log in as users of their own, each limited to what it does."""

from collections.abc import Awaitable, Callable
from urllib.parse import quote

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from aiormq.exceptions import ChannelAccessRefused

from common import broker
from common.broker_access import PERMISSIONS
from common.config import BrokerRole
from tests.harness import Env, management


@pytest.mark.parametrize("role", [BrokerRole.EXECUTOR, BrokerRole.WORKER])
async def test_setup_gives_each_user_exactly_its_role_permissions_and_no_tags(
    env: Env, role: BrokerRole
):
    user = env.broker.login(role).user
    granted = management(f"permissions/{env.name}/{quote(user, safe='')}")
    assert {k: granted[k] for k in ("configure", "write", "read")} == vars(PERMISSIONS[role])
    assert management(f"users/{quote(user, safe='')}")["tags"] in ([], "")


async def _refused(env: Env, role: BrokerRole,
                   attempt: Callable[[AbstractChannel], Awaitable[object]]) -> bool:
    """Whether the broker refuses `attempt` on a fresh channel of a `role` connection."""
    connection = await broker.connect(env.broker, role, f"vigil-tests {role}")
    try:
        channel = await connection.channel(publisher_confirms=True)
        try:
            await attempt(channel)
        except ChannelAccessRefused:
            return True
        return False
    finally:
        await connection.close()


async def _publish_to_dispatch(channel: AbstractChannel) -> None:
    exchange = await channel.get_exchange(broker.DISPATCH_EXCHANGE, ensure=False)
    await exchange.publish(aio_pika.Message(b"{}"), routing_key="any")


async def _read_dead_letters(channel: AbstractChannel) -> None:
    queue = await channel.get_queue(broker.DEAD_LETTER_QUEUE, ensure=False)
    await queue.get(fail=False)


async def _declare_dispatch_exchange(channel: AbstractChannel) -> None:
    await channel.declare_exchange(broker.DISPATCH_EXCHANGE, aio_pika.ExchangeType.DIRECT,
                                   durable=True)


async def _read_a_worker_queue(channel: AbstractChannel) -> None:
    queue = await channel.get_queue(broker.worker_queue("w-1"), ensure=False)
    await queue.get(fail=False)


async def test_a_worker_may_only_use_its_own_queue(env: Env):
    async def own_queue(channel: AbstractChannel) -> None:
        await broker.declare_worker_queue(channel, "w-1")

    assert not await _refused(env, BrokerRole.WORKER, own_queue)
    assert await _refused(env, BrokerRole.WORKER, _publish_to_dispatch)
    assert await _refused(env, BrokerRole.WORKER, _read_dead_letters)
    assert await _refused(env, BrokerRole.WORKER, _declare_dispatch_exchange)


async def test_an_executor_may_not_read_worker_queues(env: Env):
    async def own_queue(channel: AbstractChannel) -> None:
        await broker.declare_worker_queue(channel, "w-1")

    assert not await _refused(env, BrokerRole.WORKER, own_queue)
    assert await _refused(env, BrokerRole.EXECUTOR, _read_a_worker_queue)
    assert not await _refused(env, BrokerRole.EXECUTOR, _read_dead_letters)
    assert not await _refused(env, BrokerRole.EXECUTOR, _publish_to_dispatch)
