"""Who may do what on the broker, and `vigil broker setup`, which makes it so.

Executors and workers log in as users of their own, each allowed only what its code
does. RabbitMQ checks `configure` to declare, `write` to publish to an exchange or bind a
queue, `read` to consume a queue or bind from an exchange:

- an executor declares the shared topology, publishes dispatches, consumes the
  dead-letter queue (setting aside what it cannot use in the parking queue) and follows
  the broker's events through a private queue;
- a worker declares its own queue, binds it to the dispatch exchange and consumes it: it
  can neither publish a dispatch nor read a dead letter. RabbitMQ cannot tie a user to
  one queue name, so a worker could still reach another worker's queue.

Neither has a management tag; only the administrator uses the HTTP API.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict, dataclass
from urllib.parse import quote

from common import broker
from common.config import BrokerRole, BrokerSettings


@dataclass(frozen=True)
class Permissions:
    """Regular expressions over exchange and queue names, as RabbitMQ takes them."""

    configure: str
    write: str
    read: str


def _names(*patterns: str) -> str:
    return "^(" + "|".join(patterns) + ")$"


def _exactly(name: str) -> str:
    return re.escape(name)


def _starting(prefix: str) -> str:
    return re.escape(prefix) + ".+"


_DISPATCH = _exactly(broker.DISPATCH_EXCHANGE)
_DLX = _exactly(broker.DEAD_LETTER_EXCHANGE)
_DEAD_LETTERS = _exactly(broker.DEAD_LETTER_QUEUE)
_PARKING = _exactly(broker.PARKING_EXCHANGE)
_PARKED = _exactly(broker.PARKED_QUEUE)
_EVENTS = _exactly(broker.EVENT_EXCHANGE)
_EVENT_QUEUES = _starting(broker.EXECUTOR_EVENTS_QUEUE_PREFIX)
_WORKER_QUEUES = _starting(broker.WORKER_QUEUE_PREFIX)

PERMISSIONS: dict[BrokerRole, Permissions] = {
    BrokerRole.EXECUTOR: Permissions(
        # The parking queue is written, never read: that is for the administrator.
        configure=_names(_DISPATCH, _DLX, _DEAD_LETTERS, _PARKING, _PARKED, _EVENT_QUEUES),
        write=_names(_DISPATCH, _DEAD_LETTERS, _PARKING, _PARKED, _EVENT_QUEUES),
        read=_names(_DLX, _DEAD_LETTERS, _PARKING, _EVENTS, _EVENT_QUEUES),
    ),
    BrokerRole.WORKER: Permissions(
        configure=_names(_WORKER_QUEUES),
        write=_names(_WORKER_QUEUES),
        read=_names(_DISPATCH, _WORKER_QUEUES),
    ),
}


def _put(settings: BrokerSettings, path: str, body: dict) -> None:
    broker.management_api(settings, path, method="PUT", body=body)


def _grant(settings: BrokerSettings) -> None:
    """Vhosts, users, permissions and the queue policies, through the HTTP API."""
    vhosts = {settings.vhost, settings.event_vhost}
    for vhost in vhosts:
        _put(settings, f"vhosts/{quote(vhost, safe='')}", {})
    for role, permissions in PERMISSIONS.items():
        login = settings.login(role)
        user = quote(login.user, safe="")
        _put(settings, f"users/{user}",
             {"password": login.password.get_secret_value(), "tags": ""})
        # An executor also follows events, which are published in the event vhost.
        for vhost in vhosts if role is BrokerRole.EXECUTOR else {settings.vhost}:
            _put(settings, f"permissions/{quote(vhost, safe='')}/{user}", asdict(permissions))
    for name, policy in broker.policies().items():
        _put(settings, f"policies/{quote(settings.vhost, safe='')}/{name}", policy)


async def provision(settings: BrokerSettings) -> None:
    """Make the broker ready for Vigil (idempotent): users and permissions as the
    administrator, then the shared topology declared as the executor, which proves the
    executor's login and permissions work."""
    await asyncio.to_thread(_grant, settings)
    connection = await broker.connect(settings, BrokerRole.EXECUTOR, "vigil-cli setup")
    try:
        await broker.declare_topology(await connection.channel())
    finally:
        await connection.close()
