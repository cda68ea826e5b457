"""Running a long-lived service: uvloop, signals, an orderly shutdown.

A signal handler only sets an event; the shutdown itself runs in ordinary code.
A second SIGTERM or SIGINT exits at once. A service may first wait a random time (its
startup jitter), so that replicas restarted together (a deploy, a host reboot, a crash
loop) do not all connect to Postgres and RabbitMQ in the same instant (seed 004).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
from typing import Protocol

import uvloop

log = logging.getLogger(__name__)

EXIT_NOW = 130


class Service(Protocol):
    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...


def run(service: Service, *, startup_jitter_s: float = 0.0) -> None:
    """Wait a random time up to `startup_jitter_s`, start the service on uvloop and run
    it until SIGTERM or SIGINT, then shut it down in order; a second signal exits at
    once. A signal during the wait exits without starting."""

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(EXIT_NOW)
            log.info("%s received: shutting down", signal.Signals(signum).name,
                     extra={"event": "signal"})
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        if await _stopped_during_jitter(stop, startup_jitter_s):
            return
        await service.start()
        try:
            await stop.wait()
        finally:
            await service.shutdown()

    uvloop.run(wrapper())


async def _stopped_during_jitter(stop: asyncio.Event, bound_s: float) -> bool:
    """Wait a random time up to `bound_s`; True if told to stop meanwhile."""
    delay = random.uniform(0, bound_s)
    if delay:
        log.info("starting in %.2fs (startup jitter)", delay, extra={"event": "startup_jitter"})
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except TimeoutError:
        return False
    return True
