"""Retention: finished executions and their history are deleted once they are older than
`ExecutorSettings.retention_s`, so the tables stay bounded however long Vigil runs.

Invariant: only a finished (terminal) execution is ever deleted, and with it all of its
history, in one statement (common/db/sql/executions.sql `prune`). Each statement deletes
at most one batch and skips rows another executor has locked, so any number of replicas
share the work and no statement holds many locks for long. An idempotency key is
remembered as long as its execution is kept.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from common.config import ExecutorSettings
from common.db import executions
from common.loops import RateLimitedLog

log = logging.getLogger(__name__)


class Retention:
    def __init__(self, pool: asyncpg.Pool, settings: ExecutorSettings) -> None:
        self._pool = pool
        self._s = settings
        # Set after a full batch: there may be more, so the loop comes back at once
        # rather than after its interval (one batch per iteration keeps each short).
        self.more = asyncio.Event()
        self._log = RateLimitedLog(log)

    async def prune(self) -> None:
        """Delete one batch of expired executions with their history."""
        s = self._s
        deleted = await executions.prune(self._pool, older_than_s=s.retention_s,
                                         batch=s.retention_batch_size)
        if deleted >= s.retention_batch_size:
            self.more.set()
        if deleted:
            self._log.log(logging.INFO, "retention_pruned",
                          "deleted %d executions finished more than %gs ago, with their "
                          "history", deleted, s.retention_s)
