"""Vigil's public API: what action authors and application code import. Everything
else in the repository is Vigil's own business and may change.

    from common.api import Client, Context, action

    @action("reports.build", max_attempts=5, timeout_s=1800)
    def build(ctx: Context) -> dict: ...

    with Client() as vigil:
        print(vigil.result(vigil.submit("reports.build", {"pages": 40}).id))
"""

from common.actions import ActionSpec, CheckpointTooLarge, Context, action
from common.client import AsyncClient, Client
from common.db.executions import Submitted
from common.errors import (
    DatabaseUnavailable,
    ExecutionFailed,
    InvalidInput,
    NotFound,
    VigilError,
    WaitTimedOut,
)
from common.models import Execution
from common.state_machine import ExecutionStatus
from common.submission import Submission

__all__ = [
    "ActionSpec", "AsyncClient", "CheckpointTooLarge", "Client", "Context",
    "DatabaseUnavailable", "Execution", "ExecutionFailed", "ExecutionStatus", "InvalidInput",
    "NotFound", "Submission", "Submitted", "VigilError", "WaitTimedOut", "action",
]
