"""RabbitMQ: names, connections, topology and confirmed publishing.

Queue behaviour (TTL, dead-lettering, expiry, length bounds) lives in policies, never in
queue arguments, so operators can change it on a running system; every queue Vigil
declares is bounded by one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from common.config import BrokerRole, BrokerSettings
from common.errors import (
    BrokerNotSetUp,
    BrokerRefused,
    BrokerUnavailable,
    PublishFailed,
    describe,
)

log = logging.getLogger(__name__)

DISPATCH_EXCHANGE = "vigil.dispatch"
DEAD_LETTER_EXCHANGE = "vigil.dlx"
DEAD_LETTER_QUEUE = "vigil.dead-letters"
# Where the executors set aside dead letters they cannot use (malformed, foreign), for an
# operator to read in the management UI: this exchange and its one queue.
PARKING_EXCHANGE = "vigil.parking"
PARKED_QUEUE = "vigil.parked"
WORKER_QUEUE_PREFIX = "vigil.worker."
WORKER_POLICY_NAME = "vigil-worker-queues"
DEAD_LETTER_POLICY_NAME = "vigil-dead-letters"
PARKED_POLICY_NAME = "vigil-parked"
# The event exchange plugin's exchange, and the prefix of each executor's private queue
# bound to it (in BrokerSettings.event_vhost).
EVENT_EXCHANGE = "amq.rabbitmq.event"
EXECUTOR_EVENTS_QUEUE_PREFIX = "vigil.executor-events."
# Connection names say who is who in the management UI; the executor reads worker ids
# back out of them from connection events.
WORKER_CONNECTION_PREFIX = "vigil-worker "


def worker_connection_name(name: str, worker_id: str) -> str:
    return f"{WORKER_CONNECTION_PREFIX}{name} {worker_id}"


def worker_queue(worker_id: str) -> str:
    return f"{WORKER_QUEUE_PREFIX}{worker_id}"


def executor_events_queue(executor_id: str) -> str:
    return f"{EXECUTOR_EVENTS_QUEUE_PREFIX}{executor_id}"


def _queue_policy(pattern: str, definition: dict) -> dict:
    return {"pattern": pattern, "apply-to": "queues", "priority": 0, "definition": definition}


def worker_policy(message_ttl_ms: int = 30_000, expires_ms: int = 3_600_000) -> dict:
    return _queue_policy(r"^vigil\.worker\.", {
        "message-ttl": message_ttl_ms,
        "dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "expires": expires_ms,
    })


def dead_letter_policy(max_length: int = 100_000, max_length_bytes: int = 256 * 2**20) -> dict:
    """Bounded whatever arrives: past either limit the oldest dead letter is dropped (its
    dispatch, never handled, is healed by the schedule-to-start timeout)."""
    return _queue_policy(f"^{re.escape(DEAD_LETTER_QUEUE)}$", {
        "max-length": max_length,
        "max-length-bytes": max_length_bytes,
        "overflow": "drop-head",
    })


def parked_policy(max_length: int = 10_000, max_length_bytes: int = 256 * 2**20) -> dict:
    """Bounded: past either limit the oldest parked message is dropped."""
    return _queue_policy(f"^{re.escape(PARKED_QUEUE)}$", {
        "max-length": max_length,
        "max-length-bytes": max_length_bytes,
        "overflow": "drop-head",
    })


def policies() -> dict[str, dict]:
    """Every policy Vigil's vhost needs, by name, with the shipped limits."""
    return {WORKER_POLICY_NAME: worker_policy(), DEAD_LETTER_POLICY_NAME: dead_letter_policy(),
            PARKED_POLICY_NAME: parked_policy()}


CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
)


class _JitteredConnection(aio_pika.RobustConnection):
    """Each reconnect waits a random time between half and all of its interval
    (`BrokerSettings.reconnect_interval_s`), so the processes a broker restart cut off
    together do not all come back at once. (aio-pika reads `reconnect_interval` before
    every attempt.)"""

    @property
    def reconnect_interval(self) -> float:
        return random.uniform(self._base_reconnect_interval / 2, self._base_reconnect_interval)

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        self._base_reconnect_interval = value


async def connect(
    settings: BrokerSettings, role: BrokerRole, connection_name: str, *, vhost: str | None = None,
) -> AbstractRobustConnection:
    """A robust (self-reconnecting) connection as `role`'s user, named for the
    management UI; to `vhost`, or the settings' vhost."""
    try:
        return await aio_pika.connect_robust(
            settings.url(role, connection_name, vhost), timeout=settings.connect_timeout_s,
            reconnect_interval=settings.reconnect_interval_s,
            connection_class=_JitteredConnection,
        )
    except aiormq.exceptions.ProbableAuthenticationError:
        raise BrokerRefused(f"broker at {settings.address} refused the login of "
                            f"{settings.login(role).user!r} (wrong user or password, or "
                            f"no access to vhost {vhost or settings.vhost!r})") from None
    except CONNECTION_ERRORS as exc:
        raise BrokerUnavailable(settings.address, exc) from None


async def declare_topology(channel: AbstractChannel) -> AbstractExchange:
    """Declare the shared exchanges, the dead-letter and the parking queue; return the
    dispatch exchange."""
    dispatch = await channel.declare_exchange(
        DISPATCH_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    for exchange, queue in ((DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE),
                            (PARKING_EXCHANGE, PARKED_QUEUE)):
        fanout = await channel.declare_exchange(exchange, aio_pika.ExchangeType.FANOUT,
                                                durable=True)
        declared = await channel.declare_queue(queue, durable=True)
        await declared.bind(fanout, routing_key="")
    return dispatch


async def declare_worker_queue(channel: AbstractChannel, worker_id: str) -> AbstractQueue:
    """A worker's own queue, bound to the dispatch exchange by its id. The worker user
    may not declare the shared exchanges: `vigil broker setup` (or an executor) has."""
    queue = await channel.declare_queue(worker_queue(worker_id), durable=True)
    try:
        await queue.bind(DISPATCH_EXCHANGE, routing_key=worker_id)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise BrokerNotSetUp(f"no exchange {DISPATCH_EXCHANGE!r} in Vigil's vhost: "
                             "run `vigil broker setup`") from None
    return queue


async def keep_consuming(
    queue: AbstractQueue, tag: str, callback: Callable[[AbstractIncomingMessage], Any],
) -> str:
    """The consumer tag in use on `queue`, consuming again first if the broker cancelled
    ours: RabbitMQ does when a queue's process crashes and restarts, and aio-pika does not
    notice. Returns the tag unchanged while the channel is away (a reconnect restores
    it)."""
    try:
        channel = await asyncio.wait_for(queue.channel.get_underlay_channel(), 1.0)
    except TimeoutError:
        return tag
    if tag in channel.consumers:
        return tag
    log.warning("the broker cancelled the consumer of %s; consuming again", queue.name,
                extra={"event": "consumer_restored"})
    return await queue.consume(callback)


async def dead_letters_waiting(settings: BrokerSettings) -> int:
    """How many dead letters wait for an executor to handle them (a passive declare, as
    the executor: the one user allowed to see that queue)."""
    connection = await connect(settings, BrokerRole.EXECUTOR, "vigil-cli dead-letters")
    try:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise BrokerNotSetUp(f"no queue {DEAD_LETTER_QUEUE!r}: "
                                 "run `vigil broker setup`") from None
        return queue.declaration_result.message_count or 0
    finally:
        await connection.close()


def management_api(
    settings: BrokerSettings, path: str, *, method: str = "GET", body: Any = None,
) -> Any:
    """Call the management HTTP API as the administrator (never through a proxy)."""
    address = f"{settings.host}:{settings.management_port}"
    admin = settings.login(BrokerRole.ADMIN)
    token = base64.b64encode(
        f"{admin.user}:{admin.password.get_secret_value()}".encode()).decode()
    request = urllib.request.Request(
        f"http://{address}/api/{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=settings.connect_timeout_s) as response:
            text = response.read()
    except urllib.error.HTTPError as exc:
        raise BrokerRefused(f"management API at {address} answered {exc.code} {exc.reason} "
                            f"to {method} /api/{path} as {admin.user!r}") from None
    except OSError as exc:
        raise BrokerUnavailable(address, exc) from None
    return json.loads(text) if text else None


async def park(message: AbstractIncomingMessage, headers: dict[str, str],
               timeout_s: float) -> None:
    """Set a consumed message aside in the parking queue: a persistent copy is published,
    confirmed within timeout_s, on the channel it came on; then the original is acked, so
    it is never in neither queue. The copy carries `headers`, not the original's, so the
    broker never acts on headers a stranger wrote (RabbitMQ 3.10 crashes a queue that
    dead-letters a message with a forged `x-death`, and the queue's consumers with it).
    Raises PublishFailed if the broker did not confirm it or could not route it."""
    confirmed = await message.channel.basic_publish(
        message.body, exchange=PARKING_EXCHANGE, routing_key="", mandatory=True,
        timeout=timeout_s,
        properties=aiormq.spec.Basic.Properties(
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message.message_id,
            timestamp=datetime.now(UTC), headers=headers))
    if not isinstance(confirmed, aiormq.spec.Basic.Ack):
        why = "nacked" if isinstance(confirmed, aiormq.spec.Basic.Nack) else "could not route"
        raise PublishFailed(f"{PARKING_EXCHANGE} {why} it")
    await message.ack()


class Publisher:
    """Publishes persistent, mandatory, confirmed messages, each within a timeout."""

    def __init__(
        self, connection: AbstractRobustConnection, exchange: AbstractExchange, timeout_s: float
    ) -> None:
        self._connection = connection
        self._exchange = exchange
        self._timeout_s = timeout_s

    @property
    def connected(self) -> bool:
        return self._connection.connected.is_set()

    async def publish(self, body: bytes, routing_key: str, *, message_id: str) -> None:
        message = aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            message_id=message_id,
            timestamp=datetime.now(UTC),
        )
        try:
            # wait_for bounds the whole call, including a robust channel waiting to reopen.
            await asyncio.wait_for(
                self._exchange.publish(message, routing_key, mandatory=True),
                self._timeout_s,
            )
        except (aio_pika.exceptions.DeliveryError, aio_pika.exceptions.PublishError) as exc:
            raise PublishFailed(f"not routed or not confirmed: {describe(exc)}") from None
        except TimeoutError:
            raise PublishFailed(f"not confirmed within {self._timeout_s:g}s") from None
        except (*CONNECTION_ERRORS, aio_pika.exceptions.AMQPError) as exc:
            raise PublishFailed(f"broker unavailable: {describe(exc)}") from None
