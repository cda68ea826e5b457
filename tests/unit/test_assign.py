import random
import uuid

from common.db.executions import Claimed
from common.db.workers import Eligible
from services.executor.assign import assign, slots_wanted


def claimed(action: str, previous: str | None = None) -> Claimed:
    return Claimed(id=uuid.uuid4(), action=action, attempt=1, previous_worker_id=previous)


def worker(wid: str, free: int, *actions: str) -> Eligible:
    return Eligible(id=wid, actions=frozenset(actions), free_slots=free)


def test_most_free_slots_first_and_never_over_capacity() -> None:
    ws = [worker("a", 1, "x"), worker("b", 3, "x")]
    result = assign([claimed("x") for _ in range(6)], ws, random.Random(1))
    per_worker = {w: sum(1 for _, c in result if c == w) for w in ("a", "b")}
    assert per_worker == {"a": 1, "b": 3}
    assert result[0][1] == "b"


def test_only_workers_offering_the_action() -> None:
    ws = [worker("a", 5, "x"), worker("b", 5, "y")]
    result = assign([claimed("y"), claimed("z")], ws)
    assert [(c.action, w) for c, w in result] == [("y", "b")]


def test_retry_avoids_the_previous_worker_when_it_can() -> None:
    ws = [worker("a", 5, "x"), worker("b", 1, "x")]
    assert assign([claimed("x", previous="a")], ws)[0][1] == "b"
    # ... but uses it when it is the only one left.
    assert assign([claimed("x", previous="a")], [worker("a", 5, "x")])[0][1] == "a"


def test_slots_wanted_per_action_is_bounded_by_free_slots_and_batch() -> None:
    ws = [worker("a", 2, "x", "y"), worker("b", 3, "x"), worker("c", 0, "z")]
    assert slots_wanted(ws, batch_size=100) == {"x": 5, "y": 2}
    assert slots_wanted(ws, batch_size=4) == {"x": 4, "y": 2}
