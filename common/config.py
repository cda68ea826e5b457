"""Settings, one class per concern, read from VIGIL_* environment variables.

Each service builds the settings it needs once at start-up and passes them down;
nothing deeper in the code reads the environment. Secrets may also come from files
(`VIGIL_SECRETS_DIR`, e.g. /run/secrets, one file per variable name).
docs/configuration.md is generated from these classes (`vigil config docs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import quote

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix,
                              secrets_dir=os.environ.get("VIGIL_SECRETS_DIR"))


class DatabaseSettings(BaseSettings):
    """PostgreSQL connection: the source of truth."""

    model_config = _config("VIGIL_DB_")

    host: str = Field("127.0.0.1", description="PostgreSQL host.")
    port: int = Field(55432, ge=1, le=65535, description="PostgreSQL port.")
    user: str = Field("vigil", description="Role to connect as (not a superuser).")
    password: SecretStr = Field(SecretStr("vigil"), description="Password of that role.")
    name: str = Field("vigil", description="Database name.")
    pool_min_size: int = Field(1, ge=0, le=100, description="Connections kept open.")
    pool_max_size: int = Field(10, ge=1, le=200, description="Most connections per process.")
    connect_timeout_s: float = Field(5.0, gt=0, le=120,
                                     description="Give up connecting after this long.")
    command_timeout_s: float = Field(30.0, gt=0, le=3600,
                                     description="Give up on one statement after this long.")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class BrokerRole(StrEnum):
    """Who connects to RabbitMQ: each role has its own user (common/broker_access.py)."""

    EXECUTOR = "executor"
    WORKER = "worker"
    ADMIN = "admin"


@dataclass(frozen=True)
class BrokerLogin:
    user: str
    password: SecretStr


class BrokerSettings(BaseSettings):
    """RabbitMQ connection: the transport. Each role logs in as a user of its own.

    A process needs only its own role's password."""

    model_config = _config("VIGIL_AMQP_")

    host: str = Field("127.0.0.1", description="RabbitMQ host.")
    port: int = Field(5672, ge=1, le=65535, description="AMQP port.")
    vhost: str = Field("vigil", description="Virtual host of all of Vigil's queues.")
    event_vhost: str = Field(
        "vigil", description="Where the event exchange plugin publishes "
                             "(rabbitmq.conf `event_exchange.vhost`).")
    executor_user: str = Field("vigil-executor", description="User the executors log in as.")
    executor_password: SecretStr = Field(SecretStr("vigil-executor"),
                                         description="Password of the executor user.")
    worker_user: str = Field("vigil-worker", description="User the workers log in as.")
    worker_password: SecretStr = Field(SecretStr("vigil-worker"),
                                       description="Password of the worker user.")
    admin_user: str = Field(
        "vigil-admin", description="Administrator that `vigil broker setup` logs in as to "
                                   "create the other users, their permissions and the policy.")
    admin_password: SecretStr = Field(SecretStr("vigil-admin"),
                                      description="Password of the administrator.")
    management_port: int = Field(15672, ge=1, le=65535,
                                 description="Management HTTP API port (set-up only).")
    heartbeat_s: int = Field(10, ge=5, le=20, description="AMQP heartbeat of executors.")
    worker_heartbeat_s: int = Field(
        3, ge=1, le=20, description="AMQP heartbeat of workers: the broker closes the "
                                    "connection of a worker silent for about twice this "
                                    "(frozen, cut off), and the executor sees it LOST.")
    connect_timeout_s: float = Field(5.0, gt=0, le=120,
                                     description="Give up connecting after this long.")
    reconnect_interval_s: float = Field(
        2.0, gt=0, le=60, description="After a lost connection, try again every half to "
                                      "whole of this (random, so that processes cut off "
                                      "together do not all return at once).")
    publish_timeout_s: float = Field(
        5.0, gt=0, le=60, description="A publish not confirmed within this fails, "
                                      "and the execution goes back to REQUESTED.")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def login(self, role: BrokerRole) -> BrokerLogin:
        return BrokerLogin(getattr(self, f"{role}_user"), getattr(self, f"{role}_password"))

    def url(self, role: BrokerRole, connection_name: str, vhost: str | None = None) -> str:
        # The name shows in the management UI and in the broker's connection events.
        login = self.login(role)
        heartbeat = self.worker_heartbeat_s if role is BrokerRole.WORKER else self.heartbeat_s
        return (
            f"amqp://{quote(login.user, safe='')}:"
            f"{quote(login.password.get_secret_value(), safe='')}"
            f"@{self.host}:{self.port}/{quote(vhost or self.vhost, safe='')}"
            f"?heartbeat={heartbeat}&name={quote(connection_name, safe='')}"
        )


class _ServiceSettings(BaseSettings):
    """What every long-running service (executor, worker) has."""

    startup_jitter_s: float = Field(
        1.0, ge=0, le=300, description="Wait a random time up to this long before "
                                       "connecting, so that replicas restarted together do "
                                       "not all reconnect at once.")
    metrics_host: str = Field("127.0.0.1", description="Address of /metrics and /healthz.")
    metrics_port: int | None = Field(None, ge=1, le=65535,
                                     description="Port of /metrics and /healthz; unset: off.")


class WorkerSettings(_ServiceSettings):
    """How a worker registers, heartbeats, runs attempts and shuts down."""

    model_config = _config("VIGIL_WORKER_")

    name: str = Field("worker", description="Name shown in logs and the management UI.")
    capacity: int = Field(4, ge=1, le=256, description="Attempts run at once.")
    prefetch: int | None = Field(
        None, ge=0, le=1024, description="Dispatches a worker may hold beyond those it "
                                         "runs, so that a free child never waits for the "
                                         "next one (given back at once if it stops or "
                                         "runs short of memory); unset: its capacity.")
    runtimes: list[str] = Field(["shell", "python"], description="Runtimes offered.")
    action_modules: list[str] = Field(["examples.actions"],
                                      description="Python modules that register actions.")
    heartbeat_interval_s: float = Field(10.0, gt=0, le=300,
                                        description="How often the worker heartbeats.")
    shutdown_grace_s: float = Field(
        30.0, ge=0, le=3600, description="On SIGTERM, how long running attempts may "
                                         "finish before they are killed and retried.")
    output_tail_bytes: int = Field(4096, ge=0, le=1_048_576,
                                   description="How much of stdout/stderr is kept.")
    child_max_attempts: int = Field(
        10_000, ge=1, le=10_000_000,
        description="A pooled python child is replaced after this many attempts.")
    child_max_rss_mb: int | None = Field(
        512, ge=16, le=1_048_576,
        description="A pooled python child whose memory has grown past this after an "
                    "attempt is replaced (a leak stays bounded); unset: never.")
    attempt_memory_limit_mb: int | None = Field(
        None, ge=16, le=1_048_576,
        description="The most memory one attempt may use, unless its action declares "
                    "its own; over it the attempt is killed. Unset: no limit.")
    checkpoint_limit_bytes: int = Field(1_048_576, ge=1, le=64 * 1_048_576,
                                        description="Largest checkpoint an action may save.")
    result_limit_bytes: int = Field(
        1_048_576, ge=1, le=64 * 1_048_576,
        description="Largest result (as JSON) a python attempt may return; a larger one "
                    "fails the attempt result_too_large, not retried.")
    memory_budget_mb: int | None = Field(
        None, ge=16, le=1_048_576,
        description="Where no cgroup limit applies: the memory this worker and its "
                    "children may use (the RSS of all of them), for the memory gate. "
                    "Unset: the machine's memory.")
    orphan_grace_s: float = Field(
        5.0, ge=0, le=3600, description="An attempt RUNNING here by the database's books "
                                        "that the worker does not know of, started longer "
                                        "ago than this, is released for retry (orphaned).")
    ownership_check_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often the worker checks it still owns its "
                                      "attempts (cancel, timeout) and samples memory.")
    retry_base_delay_s: float = Field(1.0, ge=0, le=3600,
                                      description="Backoff before the 2nd attempt.")
    retry_max_delay_s: float = Field(300.0, ge=0, le=86_400, description="Backoff ceiling.")
    memory_high_ratio: float = Field(
        0.85, gt=0, le=1, description="Refuse work above this share of the memory limit "
                                      "(the cgroup's, else memory_budget_mb, else the "
                                      "machine's).")
    memory_low_ratio: float = Field(0.70, gt=0, lt=1,
                                    description="Take work again below this share.")

    @model_validator(mode="after")
    def _marks_in_order(self) -> WorkerSettings:
        if self.memory_low_ratio >= self.memory_high_ratio:
            raise ValueError("memory_low_ratio must be below memory_high_ratio")
        return self

    @property
    def held_dispatches(self) -> int:
        """The prefetch in effect: as set, else the capacity."""
        return self.capacity if self.prefetch is None else self.prefetch


class ExecutorSettings(_ServiceSettings):
    """Dispatch and the deadlines the executor enforces."""

    model_config = _config("VIGIL_EXECUTOR_")

    name: str = Field("executor", description="Name shown in logs and the management UI.")
    dispatch_batch_size: int = Field(100, ge=1, le=10_000,
                                     description="Most executions dispatched per round.")
    dispatch_poll_interval_s: float = Field(
        1.0, gt=0, le=60, description="Dispatch wakes on NOTIFY, and at least this often.")
    heartbeat_interval_s: float = Field(10.0, gt=0, le=300,
                                        description="The workers' heartbeat interval.")
    stale_after_heartbeats: float = Field(
        3.0, ge=1.5, le=100, description="A worker silent for this many intervals is LOST.")
    max_dispatches: int = Field(
        5, ge=1, le=1000, description="Deliveries of one attempt before it is FAILED.")
    monitor_interval_s: float = Field(1.0, gt=0, le=60,
                                      description="How often the timeout monitor sweeps.")
    monitor_batch_size: int = Field(500, ge=1, le=100_000,
                                    description="Most rows one sweep moves per cause.")
    schedule_to_start_timeout_s: float = Field(
        60.0, gt=0, le=86_400, description="SCHEDULED longer than this is redispatched.")
    queue_timeout_s: float = Field(
        86_400.0, gt=0, le=30 * 86_400,
        description="REQUESTED longer than this is FAILED no_worker.")
    lost_retry_delay_s: float = Field(
        0.0, ge=0, le=3600, description="Delay before re-running a worker-lost attempt.")
    worker_events: bool = Field(True, description="Follow broker events to see worker "
                                                  "loss at once (heartbeats back it up).")
    retention_s: float = Field(
        7 * 86_400.0, gt=0, le=3650 * 86_400,
        description="Finished executions older than this are deleted, with their history "
                    "(and their idempotency keys can be used again).")
    retention_interval_s: float = Field(
        60.0, gt=0, le=86_400, description="How often retention looks for expired "
                                           "executions (at once again after a full batch).")
    retention_batch_size: int = Field(1000, ge=1, le=100_000,
                                      description="Most executions retention deletes at once.")

    @property
    def stale_after_s(self) -> float:
        return self.heartbeat_interval_s * self.stale_after_heartbeats


class SubmitLimits(BaseSettings):
    """Bounds on what a submission may carry."""

    model_config = _config("VIGIL_SUBMIT_")

    max_params_bytes: int = Field(1_048_576, ge=1, le=64 * 1_048_576,
                                  description="Largest params JSON accepted.")
    max_action_length: int = Field(200, ge=1, le=1000,
                                   description="Longest action name accepted.")
    max_params_depth: int = Field(64, ge=1, le=1000,
                                  description="Deepest nesting of params accepted.")
    max_idempotency_key_length: int = Field(256, ge=1, le=2000,
                                            description="Longest idempotency key accepted.")


ALL_SETTINGS: tuple[type[BaseSettings], ...] = (
    DatabaseSettings, BrokerSettings, WorkerSettings, ExecutorSettings, SubmitLimits,
)
