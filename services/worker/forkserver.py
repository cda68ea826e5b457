"""The worker's side of the zygote (services/worker/zygote.py): ask it to fork a child,
and learn how each child exited."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

ZYGOTE_DIED = -signal.SIGKILL  # how a child whose zygote died is reported
# The longest line a child may write: a checkpoint or a result at the largest size the
# settings allow (64 MiB), with room for the record around it.
LINE_LIMIT_BYTES = 65 * 2**20


@dataclass
class Child:
    """A forked child and the worker's ends of its channel and its stderr."""

    pid: int
    reader: asyncio.StreamReader  # the child's results
    writer: asyncio.StreamWriter  # jobs for the child
    stderr_fd: int  # the read end of its stderr, non-blocking
    exited: asyncio.Future[int]

    def kill(self) -> None:
        # The group takes what the action spawned; the pid covers a child killed before
        # it got to setsid().
        for kill in (os.killpg, os.kill):
            try:
                kill(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)


class ForkServer:
    def __init__(self, modules: list[str]) -> None:
        self._modules = modules
        self._sock: socket.socket | None = None
        self._zygote: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._forked: dict[int, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        if self._zygote is not None:  # a zygote that died: reap it before its successor
            self._zygote.kill()
            await self._zygote.wait()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._zygote = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.worker.zygote", str(child.fileno()),
                *self._modules, pass_fds=[child.fileno()], stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child.close()
        parent.setblocking(False)
        self._sock = parent
        asyncio.get_running_loop().add_reader(parent, self._on_readable)

    async def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock)
            self._sock.close()  # the zygote sees EOF and exits
            self._sock = None
        if self._zygote is not None:
            try:
                await asyncio.wait_for(self._zygote.wait(), 5)
            except TimeoutError:
                self._zygote.kill()
                await self._zygote.wait()
            self._zygote = None
        self._fail_all()

    @property
    def zygote_pid(self) -> int | None:
        return self._zygote.pid if self._zygote is not None else None

    async def spawn(self) -> Child:
        """Fork a child. A zygote found dead is replaced once."""
        try:
            return await self._spawn()
        except (OSError, RuntimeError) as exc:
            log.warning("zygote unusable (%s); starting a new one", exc,
                        extra={"event": "zygote_restart"})
            await self.close()
            return await self._spawn()

    async def _spawn(self) -> Child:
        async with self._start_lock:
            if self._sock is None:
                await self.start()
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stderr_r, stderr_w = os.pipe()
        request_id = next(self._ids)
        forked = self._forked[request_id] = loop.create_future()
        try:
            socket.send_fds(self._sock, [json.dumps({"id": request_id}).encode()],
                            [theirs.fileno(), stderr_w])
        except OSError:
            ours.close()
            os.close(stderr_r)
            self._forked.pop(request_id, None)
            raise
        finally:
            theirs.close()
            os.close(stderr_w)
        try:
            pid = await forked
        except BaseException:
            ours.close()
            os.close(stderr_r)
            raise
        # The exit may already have been reported; either way one future per pid.
        exited = self._exits.setdefault(pid, loop.create_future())
        exited.add_done_callback(lambda _: self._exits.pop(pid, None))
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=LINE_LIMIT_BYTES)
        os.set_blocking(stderr_r, False)
        return Child(pid, reader, writer, stderr_r, exited)

    def _on_readable(self) -> None:
        assert self._sock is not None
        try:
            message = self._sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            message = b""
        if not message:
            log.error("the zygote died; failing its running children",
                      extra={"event": "zygote_died"})
            asyncio.get_running_loop().remove_reader(self._sock)
            self._sock.close()
            self._sock = None
            self._fail_all()
            return
        record = json.loads(message)
        loop = asyncio.get_running_loop()
        if "exit" in record:
            exited = self._exits.setdefault(record["pid"], loop.create_future())
            if not exited.done():
                exited.set_result(record["exit"])
        else:
            forked = self._forked.pop(record["id"], None)
            if forked is not None and not forked.done():
                forked.set_result(record["pid"])

    def _fail_all(self) -> None:
        for forked in self._forked.values():
            if not forked.done():
                forked.set_exception(RuntimeError("the zygote died before forking"))
        for exited in self._exits.values():
            if not exited.done():
                exited.set_result(ZYGOTE_DIED)
        self._forked.clear()
        self._exits.clear()

