"""Choosing a worker for each claimed execution: a pure function, tested as a unit."""

from __future__ import annotations

import random

from common.db.executions import Claimed
from common.db.workers import Eligible


def slots_wanted(eligible: list[Eligible], batch_size: int) -> dict[str, int]:
    """How many due executions of each action are worth claiming this round."""
    wanted: dict[str, int] = {}
    for w in eligible:
        if w.free_slots <= 0:
            continue
        for action in w.actions:
            wanted[action] = min(batch_size, wanted.get(action, 0) + w.free_slots)
    return wanted


def assign(
    claimed: list[Claimed], eligible: list[Eligible], rng: random.Random | None = None
) -> list[tuple[Claimed, str]]:
    """Give each execution (oldest first) to the worker offering its action with the most
    free slots, avoiding the worker of its previous attempt when another can take it.
    Executions no worker can take now are left out, to stay REQUESTED."""
    rng = rng or random.Random()
    free = {w.id: w.free_slots for w in eligible}
    assignments: list[tuple[Claimed, str]] = []
    for execution in claimed:
        candidates = [
            w.id for w in eligible if free[w.id] > 0 and execution.action in w.actions
        ]
        if not candidates:
            continue
        others = [c for c in candidates if c != execution.previous_worker_id]
        pool = others or candidates
        most = max(free[c] for c in pool)
        chosen = rng.choice([c for c in pool if free[c] == most])
        free[chosen] -= 1
        assignments.append((execution, chosen))
    return assignments
