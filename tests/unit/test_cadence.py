from datetime import UTC, datetime, timedelta

import pytest

from common.cadence import check_cron, next_fire
from common.errors import InvalidInput

T0 = datetime(2026, 11, 23, 13, 2, 30, tzinfo=UTC)


def test_an_interval_fires_one_interval_after_it_is_created() -> None:
    assert next_fire(every_s=30, cron=None, after=T0) == T0 + timedelta(seconds=30)


def test_an_interval_keeps_its_phase_and_skips_the_firings_it_missed() -> None:
    previous = T0
    # On time: the next one is one interval on.
    assert next_fire(every_s=10, cron=None, after=T0 + timedelta(seconds=0.2),
                     previous=previous) == T0 + timedelta(seconds=10)
    # 35 s late (an outage): one firing now-ish, on the old phase, not a burst of three.
    assert next_fire(every_s=10, cron=None, after=T0 + timedelta(seconds=35),
                     previous=previous) == T0 + timedelta(seconds=40)


def test_cron_takes_the_next_matching_minute_in_utc() -> None:
    assert next_fire(every_s=None, cron="*/5 * * * *", after=T0) == T0.replace(
        minute=5, second=0)
    assert next_fire(every_s=None, cron="0 3 * * *", after=T0) == datetime(
        2026, 11, 24, 3, 0, tzinfo=UTC)


@pytest.mark.parametrize("expression", ["61 * * * *", "* * *", "every minute", ""])
def test_bad_cron_expressions_are_refused(expression: str) -> None:
    with pytest.raises(InvalidInput, match="--cron"):
        check_cron(expression)
