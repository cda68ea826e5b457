"""Background loops with their own error isolation and their own progress metrics.

One failing or slow loop never stops another (seed 000): each runs as a named task,
catches its own errors, backs off with jitter, and records when it last completed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from common.errors import describe
from common.metrics import LOOP_DURATION, LOOP_ERRORS, loop_completed

log = logging.getLogger(__name__)


class RateLimitedLog:
    """Logs a repeated condition at most once per interval, with how often it happened."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self._interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        repeats = self._suppressed.pop(key, 0)
        self._last[key] = now
        suffix = f" (and {repeats} more times since last logged)" if repeats else ""
        self._logger.log(level, msg + suffix, *args, extra={"event": key})


async def run_loop(
    name: str,
    body: Callable[[], Awaitable[None]],
    *,
    interval_s: float | Callable[[], float],
    stop: asyncio.Event,
    wake: asyncio.Event | None = None,
    max_backoff_s: float = 10.0,
) -> None:
    """Call body every interval_s (or as soon as `wake` is set) until `stop` is set;
    interval_s may be a function, asked after each iteration."""
    failures = 0
    errors = RateLimitedLog(log, interval_s=30.0)
    while not stop.is_set():
        started = time.monotonic()
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            LOOP_ERRORS.labels(name).inc()
            errors.log(logging.WARNING, f"loop_error:{name}", "%s loop failed: %s",
                       name, describe(exc))
            log.debug("%s loop failure", name, exc_info=True)
            delay = min(max_backoff_s, 0.2 * 2 ** min(failures, 8)) * random.uniform(0.5, 1.0)
            await _wait(stop, None, delay)
            continue
        failures = 0
        LOOP_DURATION.labels(name).observe(time.monotonic() - started)
        loop_completed(name)
        await _wait(stop, wake, interval_s() if callable(interval_s) else interval_s)


async def _wait(stop: asyncio.Event, wake: asyncio.Event | None, timeout_s: float) -> None:
    """Sleep until the timeout, a stop, or a wake-up, whichever comes first."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    if wake is not None:
        wake.clear()
