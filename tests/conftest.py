"""Fixtures: the servers must be up (`make test` starts them); each test gets its own
database and vhost (tests/harness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import Env, create_env, create_template, destroy_env


@pytest.fixture(scope="session")
async def template_db() -> None:
    await create_template()


@pytest.fixture
async def env(template_db: None, tmp_path: Path) -> AsyncIterator[Env]:
    e = await create_env(tmp_path)
    try:
        yield e
    finally:
        await destroy_env(e)
