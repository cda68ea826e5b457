"""Entry point: `vigil executor`."""

from __future__ import annotations

from common import logs, metrics, service
from common.config import BrokerSettings, DatabaseSettings, ExecutorSettings
from services.executor.service import Executor


def run_executor(
    settings: ExecutorSettings, db_settings: DatabaseSettings,
    broker_settings: BrokerSettings, log_level: str,
) -> None:
    logs.setup(log_level, process=f"executor[{settings.name}]")
    executor = Executor(settings, db_settings, broker_settings)
    if settings.metrics_port is not None:
        # A loop that has not completed for this long is stalled.
        stalled_after = 10 * max(settings.dispatch_poll_interval_s, settings.monitor_interval_s)
        metrics.serve(settings.metrics_host, settings.metrics_port, metrics.loops_health(
            {"dispatch": stalled_after, "timeout_monitor": stalled_after,
             "schedules": stalled_after, "retention": 10 * settings.retention_interval_s}
        ))
    service.run(executor, startup_jitter_s=settings.startup_jitter_s)
