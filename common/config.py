"""Settings, one class per concern, read from VIGIL_* environment variables.

Each service builds the settings it needs once at start-up and passes them down;
nothing deeper in the code reads the environment.
"""

from __future__ import annotations

from urllib.parse import quote

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class DatabaseSettings(BaseSettings):
    """PostgreSQL connection: the source of truth."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_DB_")

    host: str = "127.0.0.1"
    port: int = Field(55432, ge=1, le=65535)
    user: str = "vigil"
    password: SecretStr = SecretStr("vigil")
    name: str = "vigil"
    pool_min_size: int = Field(1, ge=0, le=100)
    pool_max_size: int = Field(10, ge=1, le=200)
    connect_timeout_s: float = Field(5.0, gt=0, le=120)
    command_timeout_s: float = Field(30.0, gt=0, le=3600)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class BrokerSettings(BaseSettings):
    """RabbitMQ connection: the transport."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_AMQP_")

    host: str = "127.0.0.1"
    port: int = Field(5672, ge=1, le=65535)
    user: str = "vigil"
    password: SecretStr = SecretStr("vigil")
    vhost: str = "vigil"
    # Where the event exchange plugin publishes (rabbitmq.conf event_exchange.vhost).
    event_vhost: str = "vigil"
    management_port: int = Field(15672, ge=1, le=65535)
    heartbeat_s: int = Field(10, ge=5, le=20)
    connect_timeout_s: float = Field(5.0, gt=0, le=120)
    publish_timeout_s: float = Field(5.0, gt=0, le=60)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, connection_name: str) -> str:
        # The name shows in the management UI and in the broker's connection events.
        return (
            f"amqp://{quote(self.user, safe='')}:{quote(self.password.get_secret_value(), safe='')}"
            f"@{self.host}:{self.port}/{quote(self.vhost, safe='')}"
            f"?heartbeat={self.heartbeat_s}&name={quote(connection_name, safe='')}"
        )


class WorkerSettings(BaseSettings):
    """How a worker registers, heartbeats, runs attempts and shuts down."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_WORKER_")

    name: str = "worker"
    capacity: int = Field(4, ge=1, le=256)
    runtimes: list[str] = ["shell", "python"]
    action_modules: list[str] = ["examples.actions"]
    heartbeat_interval_s: float = Field(10.0, gt=0, le=300)
    shutdown_grace_s: float = Field(30.0, ge=0, le=3600)
    output_tail_bytes: int = Field(4096, ge=0, le=1_048_576)
    ownership_check_interval_s: float = Field(1.0, gt=0, le=60)
    retry_base_delay_s: float = Field(1.0, ge=0, le=3600)
    retry_max_delay_s: float = Field(300.0, ge=0, le=86_400)
    memory_high_ratio: float = Field(0.85, gt=0, le=1)
    memory_low_ratio: float = Field(0.70, gt=0, lt=1)
    metrics_host: str = "127.0.0.1"
    # /metrics and /healthz; unset means not served.
    metrics_port: int | None = Field(None, ge=1, le=65535)


class ExecutorSettings(BaseSettings):
    """Dispatch and the deadlines the executor enforces."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_EXECUTOR_")

    name: str = "executor"
    dispatch_batch_size: int = Field(100, ge=1, le=10_000)
    dispatch_poll_interval_s: float = Field(1.0, gt=0, le=60)
    heartbeat_interval_s: float = Field(10.0, gt=0, le=300)
    stale_after_heartbeats: float = Field(3.0, ge=1.5, le=100)
    max_dispatches: int = Field(5, ge=1, le=1000)
    monitor_interval_s: float = Field(1.0, gt=0, le=60)
    monitor_batch_size: int = Field(500, ge=1, le=100_000)
    schedule_to_start_timeout_s: float = Field(60.0, gt=0, le=86_400)
    queue_timeout_s: float = Field(86_400.0, gt=0, le=30 * 86_400)
    lost_retry_delay_s: float = Field(0.0, ge=0, le=3600)
    worker_events: bool = True
    metrics_host: str = "127.0.0.1"
    # /metrics and /healthz; unset means not served.
    metrics_port: int | None = Field(None, ge=1, le=65535)

    @property
    def stale_after_s(self) -> float:
        return self.heartbeat_interval_s * self.stale_after_heartbeats


class SubmitLimits(BaseSettings):
    """Bounds on what a submission may carry."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_SUBMIT_")

    max_params_bytes: int = Field(1_048_576, ge=1, le=64 * 1_048_576)
    max_action_length: int = Field(200, ge=1, le=1000)
