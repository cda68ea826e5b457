"""The execution state machine: every status, reason and error kind, and every allowed
transition, defined once.

The SQL in common/db/sql/executions.sql makes the moves (each a compare-and-set on the
fencing token that writes its history row in the same statement); the rules it shares
live in SQL functions (common/db/migrations/0004_state_machine.sql): what an ended
attempt leads to (another attempt, or the end) and what a dispatch that never started
leads to (dispatched again, or FAILED). This module is the vocabulary both sides use,
and TRANSITIONS is the table that the docs show and tests/integration/test_state_machine.py
checks against what the SQL really writes.

Adding a failure reason: add it to ErrorKind (and to NEVER_RETRY or KILLED if it is
one of those), add its row to TRANSITIONS, and, if an SQL rule must treat it apart,
the function in a new migration.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict


class ExecutionStatus(StrEnum):
    REQUESTED = "REQUESTED"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({
    ExecutionStatus.SUCCEEDED, ExecutionStatus.FAILED, ExecutionStatus.TIMED_OUT,
    ExecutionStatus.CANCELLED,
})
UNFINISHED = frozenset(set(ExecutionStatus) - TERMINAL)


class ErrorKind(StrEnum):
    """Why an attempt (or an execution) did not succeed: `error.kind` in the row and the
    history, and the reason of the transition that recorded it."""

    ACTION_ERROR = "action_error"  # the python action raised
    EXIT_CODE = "exit_code"  # the shell command exited non-zero
    KILLED = "killed"  # the child died of a signal (SIGKILL, SIGSEGV, the OOM killer)
    CRASHED = "crashed"  # the child exited without reporting a result
    MEMORY_LIMIT = "memory_limit"  # the attempt passed its memory cap
    INVALID_PARAMS = "invalid_params"
    UNKNOWN_ACTION = "unknown_action"
    COMMAND_NOT_FOUND = "command_not_found"
    SPAWN_FAILED = "spawn_failed"
    BUG = "bug"  # Vigil caught itself breaking a rule (seed 004): never retried
    CHECKPOINT_TOO_LARGE = "checkpoint_too_large"
    RESULT_TOO_LARGE = "result_too_large"
    ORPHANED = "orphaned"  # RUNNING here by the database's books, unknown to the worker
    WORKER_SHUTDOWN = "worker_shutdown"  # not finished within the shutdown grace
    WORKER_LOST = "worker_lost"  # its worker died, froze or was cut off
    TIMEOUT = "timeout"  # past its start-to-close timeout
    NO_WORKER = "no_worker"  # no worker took it within the queue timeout
    CANCELLED = "cancelled"
    MAX_DISPATCHES = "max_dispatches"  # delivered that many times, never started
    SCHEDULE_TIMEOUT = "schedule_timeout"  # the same, found by the timeout monitor


# Failures that would fail the same way again: retrying them only wastes a slot.
NEVER_RETRY = frozenset({
    ErrorKind.INVALID_PARAMS, ErrorKind.UNKNOWN_ACTION, ErrorKind.COMMAND_NOT_FOUND,
    ErrorKind.BUG, ErrorKind.CHECKPOINT_TOO_LARGE, ErrorKind.RESULT_TOO_LARGE,
})
# Attempts that were killed rather than failing on their own: an execution whose every
# attempt ends like this is a poison pill (seed 003) and ends FAILED `poison`.
KILLED = frozenset({ErrorKind.KILLED, ErrorKind.MEMORY_LIMIT, ErrorKind.WORKER_LOST})


class Reason(StrEnum):
    """Why a transition happened, as recorded in the history (and, for a final state,
    in executions.reason). A failed attempt's reason is its ErrorKind."""

    SUBMITTED = "submitted"
    DISPATCHED = "dispatched"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    PUBLISH_FAILED = "publish_failed"
    DEAD_LETTER_EXPIRED = "dead_letter_expired"
    DEAD_LETTER_REJECTED = "dead_letter_rejected"
    DEAD_LETTER_MAXLEN = "dead_letter_maxlen"
    REFUSED_DRAINING = "refused_draining"  # the worker gave a delivery back: stopping
    REFUSED_MEMORY = "refused_memory"  # ... or short of memory
    SCHEDULE_TO_START_TIMEOUT = "schedule_to_start_timeout"
    WORKER_LOST = "worker_lost"  # the SCHEDULED one's worker is LOST ...
    WORKER_INACTIVE = "worker_inactive"  # ... shut down ...
    WORKER_DRAINING = "worker_draining"  # ... stopping ...
    WORKER_MISSING = "worker_missing"  # ... or unknown
    WORKER_STALE = "worker_stale"  # ... or silent past its heartbeat window
    MAX_DISPATCHES = "max_dispatches"
    SCHEDULE_TIMEOUT = "schedule_timeout"
    POISON = "poison"  # FAILED: every attempt was killed
    START_TO_CLOSE_TIMEOUT = "start_to_close_timeout"
    NO_WORKER = "no_worker"
    CANCELLED = "cancelled"
    RETRY_REQUESTED = "retry_requested"
    DEAD_LETTER_REQUEUED = "dead_letter_requeued"


# A dispatch given back for one of these never reached a willing worker: it goes back
# to REQUESTED without counting against max_dispatches.
NOT_COUNTED = frozenset({Reason.PUBLISH_FAILED, Reason.REFUSED_DRAINING, Reason.REFUSED_MEMORY})
# What the timeout monitor finds wrong with a SCHEDULED execution's worker.
WORKER_GONE = (Reason.WORKER_LOST, Reason.WORKER_INACTIVE, Reason.WORKER_DRAINING,
               Reason.WORKER_MISSING, Reason.WORKER_STALE)
DEAD_LETTER_CAUSES = (Reason.DEAD_LETTER_EXPIRED, Reason.DEAD_LETTER_REJECTED,
                      Reason.DEAD_LETTER_MAXLEN)

# What a submission gets when neither it nor its action's declaration says otherwise.
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_TIMEOUT_S = 3600


class AttemptError(BaseModel):
    """What went wrong, as stored in `error` (jsonb): a kind, a one-line message, and
    whatever else the runtime knows (exception type and traceback, exit code, output
    tails, the signal, peak memory)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: ErrorKind
    message: str

    @property
    def retryable(self) -> bool:
        return self.kind not in NEVER_RETRY

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


@dataclass(frozen=True)
class Transition:
    from_status: ExecutionStatus | None  # None: the execution is created
    to_status: ExecutionStatus
    reason: str
    by: str  # who makes it: client, executor, monitor, worker


@dataclass(frozen=True)
class Moved:
    """What one query moved: n executions from one status to another, for one reason."""

    from_status: ExecutionStatus | None
    to_status: ExecutionStatus
    reason: str
    n: int = 1


S = ExecutionStatus
# Every kind an attempt can fail with on its worker (worker_lost is the monitor's, and
# the rest are whole-execution outcomes).
_ATTEMPT_KINDS = [k for k in ErrorKind if k not in (
    ErrorKind.WORKER_LOST, ErrorKind.TIMEOUT, ErrorKind.NO_WORKER, ErrorKind.CANCELLED,
    ErrorKind.MAX_DISPATCHES, ErrorKind.SCHEDULE_TIMEOUT)]
# Why an unstarted dispatch comes back, and who sees it. A counted one may be the last
# the attempt is allowed: then the execution ends FAILED (its reason max_dispatches or
# schedule_timeout), and the history row still says what happened to the dispatch.
_RELEASES = [(Reason.PUBLISH_FAILED, "executor"), (Reason.REFUSED_DRAINING, "worker"),
             (Reason.REFUSED_MEMORY, "worker"),
             *((r, "executor") for r in DEAD_LETTER_CAUSES),
             *((r, "monitor") for r in (Reason.SCHEDULE_TO_START_TIMEOUT, *WORKER_GONE))]


def _ends(from_status: ExecutionStatus | None, to: tuple[ExecutionStatus, ...], reason: str,
          by: str) -> list[Transition]:
    return [Transition(from_status, t, reason, by) for t in to]


TRANSITIONS: tuple[Transition, ...] = (
    Transition(None, S.REQUESTED, Reason.SUBMITTED, "client or a schedule"),
    Transition(S.REQUESTED, S.SCHEDULED, Reason.DISPATCHED, "executor"),
    *(t for reason, by in _RELEASES
      for t in _ends(S.SCHEDULED, (S.REQUESTED,) if reason in NOT_COUNTED
                     else (S.REQUESTED, S.FAILED), reason, by)),
    Transition(S.SCHEDULED, S.RUNNING, Reason.STARTED, "worker"),
    Transition(S.RUNNING, S.SUCCEEDED, Reason.SUCCEEDED, "worker"),
    *(t for kind in _ATTEMPT_KINDS
      for t in _ends(S.RUNNING, (S.FAILED,) if kind in NEVER_RETRY
                     else (S.REQUESTED, S.FAILED), kind, "worker")),
    *_ends(S.RUNNING, (S.REQUESTED, S.FAILED), ErrorKind.WORKER_LOST, "monitor"),
    Transition(S.RUNNING, S.FAILED, Reason.POISON, "worker or monitor"),
    Transition(S.RUNNING, S.TIMED_OUT, Reason.START_TO_CLOSE_TIMEOUT, "monitor"),
    Transition(S.REQUESTED, S.FAILED, Reason.NO_WORKER, "monitor"),
    *(Transition(s, S.CANCELLED, Reason.CANCELLED, "client or a schedule") for s in UNFINISHED),
    *(Transition(s, S.REQUESTED, Reason.RETRY_REQUESTED, "client")
      for s in (S.FAILED, S.TIMED_OUT, S.CANCELLED)),
    Transition(S.FAILED, S.REQUESTED, Reason.DEAD_LETTER_REQUEUED, "client"),
)


def allowed(from_status: ExecutionStatus | None, to_status: ExecutionStatus,
            reason: str) -> bool:
    return any((t.from_status, t.to_status, t.reason) == (from_status, to_status, reason)
               for t in TRANSITIONS)
