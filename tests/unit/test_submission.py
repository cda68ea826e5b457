"""What a submission may carry: every refusal is one InvalidInput naming the problem."""

import uuid
from datetime import UTC, datetime

import pytest

from common.config import SubmitLimits
from common.errors import InvalidInput
from common.submission import Submission, check_name, execution_id

LIMITS = SubmitLimits()


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_a_plain_submission_passes() -> None:
    s = Submission("demo.add", {"a": 1, "b": [1, {"c": "d"}]}, max_attempts=3, timeout_s=60,
                   idempotency_key="k", delay_s=30)
    assert s.checked(LIMITS) is s
    at = Submission("demo.add", {}, at=datetime(2026, 12, 1, 9, tzinfo=UTC))
    assert at.checked(LIMITS) is at


@pytest.mark.parametrize(("submission", "message"), [
    (Submission("", {}), "action name is empty"),
    (Submission("a" * 201, {}), "over 200 characters"),
    (Submission("bad\nname", {}), "control characters"),
    (Submission("x", [1]), "must be a JSON object"),  # type: ignore[arg-type]
    (Submission("x", {"s": "nul \x00 here"}), "NUL character"),
    (Submission("x", {"nul\x00key": 1}), "NUL character"),
    (Submission("x", nested(65)), "nested more than 64 levels"),
    (Submission("x", nested(10_000)), "nested more than 64 levels"),
    (Submission("x", {"blob": "y" * 1_048_576}), "over the limit"),
    (Submission("x", {"f": float("nan")}), "not JSON"),
    (Submission("x", {"o": object()}), "not JSON"),
    (Submission("x", {}, max_attempts=0), "max_attempts"),
    (Submission("x", {}, timeout_s=0), "timeout"),
    (Submission("x", {}, idempotency_key=""), "idempotency key is empty"),
    (Submission("x", {}, idempotency_key="k" * 100_000), "over the limit of 256"),
    (Submission("x", {}, idempotency_key="a\x00b"), "NUL"),
    (Submission("x", {}, delay_s=-1), "delay"),
    (Submission("x", {}, delay_s=1, at=datetime.now(UTC)), "not both"),
    (Submission("x", {}, at=datetime(2026, 12, 1, 9)), "no time zone"),
])
def test_bad_submissions_name_the_problem(submission: Submission, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        submission.checked(LIMITS)


def test_names_and_ids() -> None:
    assert check_name("nightly", "schedule", 200) == "nightly"
    with pytest.raises(InvalidInput, match="schedule name is over 200"):
        check_name("a" * 201, "schedule", 200)
    eid = uuid.uuid4()
    assert execution_id(eid) is eid and execution_id(str(eid)) == eid
    with pytest.raises(InvalidInput, match="not an execution id"):
        execution_id("nope")
