"""Fixtures: the servers must be up (`make test` starts them); each test gets its own
database and vhost (tests/harness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.state_machine import ExecutionStatus, allowed
from tests.harness import Env, create_env, create_template, destroy_env


@pytest.fixture(scope="session")
async def template_db() -> None:
    await create_template()


@pytest.fixture
async def env(template_db: None, tmp_path: Path) -> AsyncIterator[Env]:
    e = await create_env(tmp_path)
    try:
        yield e
        await _check_transitions(e)
    finally:
        await destroy_env(e)


async def _check_transitions(e: Env) -> None:
    """Whatever a test made Vigil do, every transition it wrote is one the state machine
    allows (common/state_machine.py TRANSITIONS): the table is checked against the SQL."""
    assert e.pool is not None
    rows = await e.pool.fetch(
        "SELECT DISTINCT from_status, to_status, reason FROM execution_history")
    written = {(r["from_status"], r["to_status"], r["reason"]) for r in rows}
    unknown = {t for t in written if not allowed(
        ExecutionStatus(t[0]) if t[0] else None, ExecutionStatus(t[1]), t[2])}
    assert not unknown, f"transitions missing from TRANSITIONS: {sorted(unknown, key=str)}"
