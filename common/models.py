"""The records Vigil's processes share, and the dispatch message. The execution states
and their vocabulary live in common/state_machine.py."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.state_machine import ExecutionStatus

# A round dispatches at most ExecutorSettings.dispatch_batch_size (≤ 10,000) at once.
MAX_DISPATCHES_PER_MESSAGE = 10_000


class WorkerStatus(StrEnum):
    ACTIVE = "ACTIVE"
    DRAINING = "DRAINING"
    INACTIVE = "INACTIVE"
    LOST = "LOST"


@dataclass(frozen=True)
class Dispatch:
    """One delivery of one attempt to one worker: the fencing token of SCHEDULED."""

    id: uuid.UUID
    attempt: int
    dispatch: int
    worker_id: str


class Pointer(BaseModel):
    """One dispatch: run attempt `attempt` (delivery `dispatch`) of an execution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    execution_id: uuid.UUID
    # Bounded as Postgres' integer is: one absurd pointer must not fail the statement
    # that starts its well-formed neighbours.
    attempt: int = Field(ge=1, le=2**31 - 1)
    dispatch: int = Field(ge=1, le=2**31 - 1)


class DispatchMessage(BaseModel):
    """What the executor publishes to a worker's queue: pointers, not the work. One
    message carries every dispatch of a round for that worker, so a busy round costs
    the broker one message per worker rather than one per execution.

    The worker reads the action and params from Postgres when it claims each attempt,
    so a late or duplicated message can never carry stale parameters.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = Field(2, ge=2, le=2)
    dispatches: list[Pointer] = Field(min_length=1, max_length=MAX_DISPATCHES_PER_MESSAGE)

    @classmethod
    def of(cls, dispatches: list[Dispatch]) -> DispatchMessage:
        return cls(dispatches=[Pointer(execution_id=d.id, attempt=d.attempt,
                                       dispatch=d.dispatch) for d in dispatches])

    def tokens(self, worker_id: str) -> list[Dispatch]:
        """Its dispatches, as tokens of the worker whose queue it came through."""
        return [Dispatch(p.execution_id, p.attempt, p.dispatch, worker_id)
                for p in self.dispatches]


class Execution(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    action: str
    params: Any
    status: ExecutionStatus
    attempt: int
    max_attempts: int
    dispatches: int
    unpublished: int
    worker_id: str | None
    timeout_s: int
    idempotency_key: str | None
    not_before: datetime
    created_at: datetime
    updated_at: datetime
    scheduled_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    result: Any
    error: Any
    reason: str | None
    checkpoint: Any
    checkpoint_attempt: int | None
    killed_attempts: int


class HistoryEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    execution_id: uuid.UUID
    attempt: int
    dispatch: int
    from_status: ExecutionStatus | None
    to_status: ExecutionStatus
    reason: str
    actor: str
    worker_id: str | None
    error: Any
    usage: dict[str, float] | None
    at: datetime


class DeadLetter(BaseModel):
    """A dispatch a worker queue dead-lettered, and what the executor made of it."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    execution_id: uuid.UUID
    action: str
    attempt: int
    dispatch: int
    worker_id: str | None
    cause: str  # RabbitMQ's x-death reason: expired, rejected, ...
    outcome: ExecutionStatus  # REQUESTED: dispatched again; FAILED: max_dispatches
    status_now: ExecutionStatus


class Overlap(StrEnum):
    """What a schedule does when its previous firing has not finished."""

    SKIP = "skip"
    ALLOW = "allow"
    CANCEL_PREVIOUS = "cancel_previous"


class Schedule(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    action: str
    params: Any
    max_attempts: int | None
    timeout_s: int | None
    every_s: int | None
    cron: str | None
    overlap: Overlap
    paused: bool
    next_fire_at: datetime
    last_fired_at: datetime | None
    last_execution_id: uuid.UUID | None
    last_status: ExecutionStatus | None
    skipped: int
    created_at: datetime
    updated_at: datetime

    @property
    def cadence(self) -> str:
        return f"every {self.every_s}s" if self.every_s is not None else f"cron {self.cron}"

    @property
    def previous_running(self) -> bool:
        return self.last_status is not None and not self.last_status.terminal


class Worker(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    hostname: str
    pid: int
    status: WorkerStatus
    runtimes: list[str]
    actions: list[str]
    capacity: int
    prefetch: int
    memory_bytes: int | None
    memory_limit_bytes: int | None
    memory_pressure: bool
    started_at: datetime
    last_heartbeat_at: datetime
    stopped_at: datetime | None
    status_reason: str | None
    heartbeat_age_s: float
    stale: bool
    in_flight: int
