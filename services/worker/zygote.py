"""The zygote: a process that has imported the worker's actions once and forks the
worker's python children from that warm state.

Forking a warm interpreter costs milliseconds where starting a fresh one costs tens
of them. Each child is long-lived (services/worker/pool.py runs attempt after attempt
in it, and recycles it) and is a process of its own: an OOM kill or a segfault takes
that child, never the worker. The zygote dies with the worker, and each child dies with
the zygote (PR_SET_PDEATHSIG), so no attempt outlives its worker.

Protocol on the SOCK_SEQPACKET socket given as argv[1] (one JSON message per packet):
worker -> zygote  {"id": n} with two fds: the child's end of its channel (a socket the
                  child reads jobs from and writes results to) and its stderr (write)
zygote -> worker  {"id": n, "pid": pid} once forked; {"pid": pid, "exit": code} once
reaped (code < 0: killed by that signal).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys

from common import actions
from services.worker import child
from services.worker.pdeathsig import die_with_parent


def main(sock_fd: int, modules: list[str]) -> None:
    die_with_parent()
    actions.load(modules)
    sock = socket.socket(fileno=sock_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when we stop
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    try:
        _serve(sock, selector, wake_r, wake_w)
    except ConnectionError:
        return  # the worker is gone (its end of the socket closed before our death signal)


def _serve(sock: socket.socket, selector: selectors.BaseSelector, wake_r: int,
           wake_w: int) -> None:
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                message, fds, _, _ = socket.recv_fds(sock, 4096, 2)
                if not message:
                    return  # the worker is gone
                request = json.loads(message)
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    sock.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    _become_child(*fds)
                for fd in fds:
                    os.close(fd)
                sock.send(json.dumps({"id": request["id"], "pid": pid}).encode())
            else:
                os.read(wake_r, 4096)
                _reap(sock)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}).encode())


def _become_child(channel_fd: int, stderr_fd: int) -> None:
    """In the forked child: serve attempts until the worker closes the channel."""
    code = 0
    try:
        os.setsid()  # its own process group, so a kill takes what it spawns too
        die_with_parent()
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        os.dup2(stderr_fd, 1)  # the action's prints land on stderr
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
        child.serve(socket.socket(fileno=channel_fd))
    except BaseException:
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
