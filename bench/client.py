"""The submitting client: a process of its own, so that its CPU and memory are measured
apart from the benchmark's.

    python -m bench.client TARGET MODE N [--batch B] [--rate R] --out FILE

TARGET is `vigil` (common.api.AsyncClient, VIGIL_DB_* from the environment) or a peer's
app module (bench.peers.celery_app, bench.peers.dramatiq_app). Over stdin/stdout: it
connects, submits the warm-up (probe.WARM_UP_KEY) and prints `ready`; on `go` it submits
keys 0..N-1, writes its timings to FILE as JSON and prints `done`; it exits when stdin
closes, so that the benchmark reads its CPU at the end of the run while it still lives.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from bench import probe

if TYPE_CHECKING:
    from common.api import AsyncClient, Submission

VIGIL = "vigil"
VIGIL_ACTION = "bench.noop"


class Submitter(Protocol):
    async def one(self, key: int) -> None: ...

    async def many(self, keys: Sequence[int]) -> None: ...

    async def close(self) -> None: ...


class VigilSubmitter:
    """AsyncClient.submit for one, submit_many (one transaction) for a batch. Vigil is
    imported only here, so that a peer's client carries none of it."""

    def __init__(self, client: AsyncClient, submission: type[Submission]) -> None:
        self._client = client
        self._submission = submission

    @classmethod
    async def open(cls) -> VigilSubmitter:
        from common.api import AsyncClient, Submission

        return cls(await AsyncClient.connect(actor="bench"), Submission)

    async def one(self, key: int) -> None:
        await self._client.submit(VIGIL_ACTION, {"key": key})

    async def many(self, keys: Sequence[int]) -> None:
        await self._client.submit_many(
            [self._submission(VIGIL_ACTION, {"key": k}) for k in keys])

    async def close(self) -> None:
        await self._client.close()


class PeerSubmitter:
    """A peer's blocking send_one/send_batch, called straight from the loop (nothing else
    runs in this process)."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    async def one(self, key: int) -> None:
        self._module.send_one(key)

    async def many(self, keys: Sequence[int]) -> None:
        self._module.send_batch(keys)

    async def close(self) -> None:
        pass  # the process exits next; its connections go with it


async def one_at_a_time(submitter: Submitter, n: int, args: argparse.Namespace) -> dict:
    first = time.time()
    for key in range(n):
        await submitter.one(key)
    return {"first_submit": first, "last_return": time.time()}


async def in_batches(submitter: Submitter, n: int, args: argparse.Namespace) -> dict:
    first = time.time()
    for start in range(0, n, args.batch):
        await submitter.many(range(start, min(n, start + args.batch)))
    return {"first_submit": first, "last_return": time.time()}


async def paced(submitter: Submitter, n: int, args: argparse.Namespace) -> dict:
    """One at a time on a fixed schedule; each submit time is taken just before the call."""
    submitted: list[float] = []
    began = time.monotonic()
    for key in range(n):
        delay = began + key / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        submitted.append(time.time())
        await submitter.one(key)
    return {"first_submit": submitted[0], "last_return": time.time(),
            "submit_times": submitted}


MODES: dict[str, Callable[[Submitter, int, argparse.Namespace], Awaitable[dict]]] = {
    "one": one_at_a_time, "batch": in_batches, "paced": paced,
}


def say(word: str) -> None:
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    submitter: Submitter = (await VigilSubmitter.open() if args.target == VIGIL
                            else PeerSubmitter(importlib.import_module(args.target)))
    try:
        await submitter.one(probe.WARM_UP_KEY)
        say("ready")
        if sys.stdin.readline().strip() != "go":
            return
        result = await MODES[args.mode](submitter, args.n, args)
        args.out.write_text(json.dumps(result))
        say("done")
        sys.stdin.read()  # until the benchmark closes it
    finally:
        await submitter.close()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.client")
    parser.add_argument("target")
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("n", type=int)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
