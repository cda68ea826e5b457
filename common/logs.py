"""Logging set-up shared by every process: one line per record, a stable event field."""

from __future__ import annotations

import logging
import sys


class _EventFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.event = getattr(record, "event", "-")
        return super().format(record)


def setup(level: str = "INFO", process: str = "vigil") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _EventFormatter(
            f"%(asctime)s %(levelname)s {process} %(name)s event=%(event)s %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The AMQP libraries log every reconnect attempt with a traceback; keep them short.
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
