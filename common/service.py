"""Running a long-lived service: uvloop, signals, metrics thread.

A signal handler only sets an event; the shutdown itself runs in ordinary code.
A second SIGTERM or SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

import uvloop

log = logging.getLogger(__name__)

EXIT_NOW = 130


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run main(stop) on uvloop; SIGTERM/SIGINT set `stop`, a second one exits."""

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
        await main(stop)

    uvloop.run(wrapper())
