"""When a schedule fires next: a fixed interval, or a cron expression in UTC (cronsim)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cronsim import CronSim, CronSimError

from common.errors import InvalidInput


def check_cron(expression: str) -> str:
    """The expression, if it is a valid five-field cron expression."""
    try:
        CronSim(expression, datetime.now(UTC))
    except CronSimError as exc:
        raise InvalidInput(f"--cron {expression!r}: {exc}") from None
    return expression


def next_fire(
    *, every_s: int | None, cron: str | None, after: datetime,
    previous: datetime | None = None,
) -> datetime:
    """The first fire time later than `after`. An interval keeps the phase of the
    previous fire time and skips the firings that were missed (one firing, not a burst,
    after an outage); a cron expression takes its next matching minute."""
    if every_s is not None:
        if previous is None or previous > after:
            return after + timedelta(seconds=every_s)
        missed = (after - previous) // timedelta(seconds=every_s)
        return previous + timedelta(seconds=every_s) * (missed + 1)
    assert cron is not None
    return next(iter(CronSim(cron, after.astimezone(UTC))))
