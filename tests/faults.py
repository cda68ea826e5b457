"""Faults injected at the dispatcher's seam (DispatchHooks). In-process tests hand a
hook to their dispatcher; the drills that need a real process to misbehave run

    python -m tests.faults exit-after-commit    an executor that dies between committing
                                                SCHEDULED and publishing, as a crash there
                                                would

which is otherwise `vigil executor`, configured from the same VIGIL_* settings.
"""

from __future__ import annotations

import os
import sys

from common import logs, service
from common.config import BrokerSettings, DatabaseSettings, ExecutorSettings
from common.models import Dispatch
from services.executor.dispatcher import DispatchHooks
from services.executor.service import Executor

EXIT_AFTER_COMMIT_CODE = 97


class ExitAfterCommit(DispatchHooks):
    async def after_commit(self, dispatches: list[Dispatch]) -> None:
        if dispatches:
            os._exit(EXIT_AFTER_COMMIT_CODE)


class LoseCommitReply(DispatchHooks):
    def __init__(self) -> None:
        self.armed = True

    async def after_commit(self, dispatches: list[Dispatch]) -> None:
        if dispatches and self.armed:
            self.armed = False
            raise ConnectionResetError("test fault: the reply to COMMIT was lost")


FAULTS: dict[str, type[DispatchHooks]] = {"exit-after-commit": ExitAfterCommit}


def main(fault: str) -> None:
    settings = ExecutorSettings()
    logs.setup("INFO", process=f"executor[{settings.name}] fault={fault}")
    service.run(Executor(settings, DatabaseSettings(), BrokerSettings(), hooks=FAULTS[fault]()))


if __name__ == "__main__":
    main(sys.argv[1])
