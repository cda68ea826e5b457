"""Dramatiq with RabbitMQ: the no-op actor, `actor.send()` and a `group()` of messages."""

from __future__ import annotations

import os
from collections.abc import Sequence

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench import probe
from bench.peers import BROKER_URL_ENV

dramatiq.set_broker(RabbitmqBroker(url=os.environ[BROKER_URL_ENV]))


@dramatiq.actor
def noop(key: int) -> None:
    probe.record(key)


def send_one(key: int) -> None:
    noop.send(key)


def send_batch(keys: Sequence[int]) -> None:
    dramatiq.group(noop.message(key) for key in keys).run()
