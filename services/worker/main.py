"""Entry point: `vigil worker`."""

from __future__ import annotations

from common import logs, metrics, service
from common.config import BrokerSettings, DatabaseSettings, WorkerSettings
from services.worker.runtimes import RUNTIMES
from services.worker.service import Worker

__all__ = ["RUNTIMES", "run_worker"]


def run_worker(
    settings: WorkerSettings, db_settings: DatabaseSettings, broker_settings: BrokerSettings,
    log_level: str,
) -> None:
    logs.setup(log_level, process=f"worker[{settings.name}]")
    worker = Worker(settings, db_settings, broker_settings)
    if settings.metrics_port is not None:
        metrics.serve(settings.metrics_host, settings.metrics_port, metrics.loops_health(
            {"worker_heartbeat": 3 * settings.heartbeat_interval_s}
        ))
    service.run(worker, startup_jitter_s=settings.startup_jitter_s)
