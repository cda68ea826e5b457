"""`vigil schedules`: run an action on an interval or a cron expression (UTC).

The executors fire them (services/executor/schedules.py); each firing is an ordinary
execution, submitted by `schedule:<name>`, so `vigil ls`, `show`, `cancel` and `retry`
work on it as on any other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import asyncpg
import typer

from common import cadence
from common.config import SubmitLimits
from common.db import schedules, workers
from common.errors import VigilError
from common.models import Overlap, Schedule
from common.submission import Submission, check_name
from services.cli import inputs, output
from services.cli.plumbing import (
    JsonOpt,
    MaxAttemptsOpt,
    ParamOpt,
    ParamsJsonOpt,
    TimeoutOpt,
    failure,
    parse_or_exit,
    pooled,
)

schedules_app = typer.Typer(help="Run actions on an interval or a cron expression.",
                            no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="The schedule's name.")]


def _table(rows: list[Schedule]) -> None:
    output.table(None, ["name", "action", "when", "overlap", "next", "last fired", "last",
                        "skipped"], [
        (s.name, s.action, s.cadence, s.overlap,
         "paused" if s.paused else output.when(s.next_fire_at), output.when(s.last_fired_at),
         s.last_status, s.skipped) for s in rows
    ])


@schedules_app.command("add")
def add(
    name: NameArg,
    action: Annotated[str, typer.Argument(help="The action each firing runs.")],
    every: Annotated[str | None, typer.Option(
        help="Fire every this long: 30s, 15m, 1h, 1d.")] = None,
    cron: Annotated[str | None, typer.Option(
        help="Fire at the times of this cron expression, in UTC, e.g. '*/5 * * * *'.")]
    = None,
    param: ParamOpt = None,
    params_json: ParamsJsonOpt = None,
    max_attempts: MaxAttemptsOpt = None,
    timeout: TimeoutOpt = None,
    overlap: Annotated[Overlap, typer.Option(
        case_sensitive=False, help="When the previous firing has not finished: skip this "
                                   "one, allow both, or cancel the previous one.")]
    = Overlap.SKIP,
    as_json: JsonOpt = False,
) -> None:
    """Create a schedule that runs ACTION on an interval or a cron expression."""
    limits = SubmitLimits()
    name = parse_or_exit(check_name, name, "schedule", limits.max_action_length)
    # What each firing submits, checked as a submission now rather than at every firing.
    submission = parse_or_exit(lambda: Submission(
        action, inputs.parse_params(param or [], params_json, limits.max_params_bytes),
        max_attempts=max_attempts, timeout_s=timeout).checked(limits))
    params = submission.params
    every_s, cron_expr = parse_or_exit(inputs.parse_cadence, every, cron)

    @pooled
    async def body(pool: asyncpg.Pool) -> Schedule:
        first = cadence.next_fire(every_s=every_s, cron=cron_expr, after=datetime.now(UTC))
        if not await schedules.insert(pool, name=name, action=action, params=params,
                                      every_s=every_s, cron=cron_expr, overlap=overlap,
                                      first_fire_at=first, max_attempts=max_attempts,
                                      timeout_s=timeout):
            raise VigilError(f"schedule {name!r} exists; `vigil schedules rm {name}` first")
        if not await workers.offers_action(pool, action):
            output.warn(f"no live worker offers action {action!r}; "
                        "its executions wait until one does")
        [created] = await schedules.list_all(pool, name)
        return created

    created = body()
    if as_json:
        output.emit_json(created)
        return
    output.console.print(f"schedule {created.name!r}: {created.action} {created.cadence}, "
                         f"overlap {created.overlap}; first at "
                         f"{output.when(created.next_fire_at)}")


@schedules_app.command("ls")
def list_schedules(as_json: JsonOpt = False) -> None:
    """Every schedule: when it fires next, and how its last firing went."""
    rows = pooled(schedules.list_all)()
    if as_json:
        output.emit_json(rows)
    elif rows:
        _table(rows)
    else:
        output.console.print("no schedules")


def _change(name: str, change: str, paused: bool | None = None) -> None:
    """Remove, pause or resume a schedule; a name that does not exist fails."""

    @pooled
    async def body(pool: asyncpg.Pool) -> bool:
        if paused is None:
            return await schedules.delete(pool, name)
        found = await schedules.list_all(pool, name)
        if not found:
            return False
        # Resumed, it fires next from now on, not for the time it was paused.
        upcoming = None if paused else cadence.next_fire(
            every_s=found[0].every_s, cron=found[0].cron, after=datetime.now(UTC))
        return await schedules.set_paused(pool, name, paused, upcoming)

    if not body():
        failure(f"no schedule {name!r}")
    output.console.print(f"schedule {name!r} {change}")


@schedules_app.command("rm")
def remove(name: NameArg) -> None:
    """Delete a schedule; executions it already made are kept."""
    _change(name, "removed")


@schedules_app.command("pause")
def pause(name: NameArg) -> None:
    """Stop a schedule firing, until `resume`."""
    _change(name, "paused", paused=True)


@schedules_app.command("resume")
def resume(name: NameArg) -> None:
    """Fire a paused schedule again, from its next time after now."""
    _change(name, "resumed", paused=False)
