"""Running a long-lived service: uvloop, signals, an orderly shutdown.

A signal handler only sets an event; the shutdown itself runs in ordinary code.
A second SIGTERM or SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Protocol

import uvloop

log = logging.getLogger(__name__)

EXIT_NOW = 130


class Service(Protocol):
    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...


def run(service: Service) -> None:
    """Start the service on uvloop and run it until SIGTERM or SIGINT, then shut it
    down in order; a second signal exits at once."""

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
        await service.start()
        try:
            await stop.wait()
        finally:
            await service.shutdown()

    uvloop.run(wrapper())
