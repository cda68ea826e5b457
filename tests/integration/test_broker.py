"""Publishing: confirmed, mandatory, bounded in time."""

import time

import pytest

from common import broker
from common.config import BrokerRole
from common.errors import PublishFailed
from tests.harness import Env, management


async def test_an_unroutable_publish_fails_and_a_dead_broker_fails_within_the_timeout(
    env: Env,
):
    connection = await broker.connect(env.broker, BrokerRole.EXECUTOR, "vigil-tests publisher")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await broker.declare_topology(channel)
        publisher = broker.Publisher(connection, exchange, timeout_s=1.0)
        with pytest.raises(PublishFailed, match="not routed"):
            await publisher.publish(b"{}", "no-such-worker", message_id="m1")
        # The broker drops us (the vhost goes away): the publish must fail, not hang.
        management(f"vhosts/{env.name}", "DELETE")
        began = time.monotonic()
        with pytest.raises(PublishFailed):
            await publisher.publish(b"{}", "no-such-worker", message_id="m2")
        assert time.monotonic() - began < 2.0
    finally:
        await connection.close()


async def test_broker_setup_is_idempotent_and_sets_the_worker_policy(env: Env):
    for _ in range(2):
        result = env.cli("broker", "setup")
        assert result.returncode == 0, result.stderr
    policy = management(f"policies/{env.name}/{broker.WORKER_POLICY_NAME}")
    assert policy["definition"] == {"message-ttl": 30000, "dead-letter-exchange": "vigil.dlx",
                                    "expires": 3600000}
    names = {e["name"] for e in management(f"exchanges/{env.name}")}
    assert {"vigil.dispatch", "vigil.dlx"} <= names
