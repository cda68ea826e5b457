"""Group commit: many small writes that arrive together go to the database as one.

A Batcher hands each item to a single writer task. The writer takes everything waiting
(up to a limit), writes it with one call, answers every waiter, and goes round again; so
items that arrive while a write is in flight share the next one. There is no timer: an
item that arrives at an idle batcher is written at once, so batching adds no latency,
and batches grow by themselves exactly when the writes are the bottleneck.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

# Writes one batch; returns one answer per item, in the items' order.
Write = Callable[[list[T]], Awaitable[Sequence[R]]]


class Batcher(Generic[T, R]):
    def __init__(self, name: str, write: Write[T, R], *, max_batch: int) -> None:
        self._name = name
        self._write = write
        self._max_batch = max_batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._ready = asyncio.Event()  # something waits to be written
        self._idle = asyncio.Event()  # nothing waits and nothing is being written
        self._idle.set()
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Write `item` with the next batch and return its answer (or raise what the
        write raised)."""
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._run(), name=f"batcher-{self._name}")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._idle.clear()
        self._ready.set()
        return await future

    async def close(self) -> None:
        """Stop the writer once everything submitted has been written."""
        await self._idle.wait()
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            batch, self._waiting = (self._waiting[:self._max_batch],
                                    self._waiting[self._max_batch:])
            if not self._waiting:
                self._ready.clear()
            try:
                answers = await self._write([item for item, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # each waiter decides what a failed write means
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), answer in zip(batch, answers, strict=True):
                    if not future.done():  # its waiter may have been cancelled meanwhile
                        future.set_result(answer)
            if not self._waiting:
                self._idle.set()
