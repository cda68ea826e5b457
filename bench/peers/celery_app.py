"""Celery with RabbitMQ: the no-op task, `task.delay()` and a `group()` of signatures."""

from __future__ import annotations

import os
from collections.abc import Sequence

from celery import Celery, group

from bench import probe
from bench.peers import BROKER_URL_ENV

app = Celery("bench", broker=os.environ[BROKER_URL_ENV])


@app.task
def noop(key: int) -> None:
    probe.record(key)


def send_one(key: int) -> None:
    noop.delay(key)


def send_batch(keys: Sequence[int]) -> None:
    group(noop.s(key) for key in keys).apply_async()
