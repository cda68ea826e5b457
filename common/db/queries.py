"""Named SQL blocks, loaded once from the .sql file that owns each table."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import asyncpg

SQL_DIR = Path(__file__).parent / "sql"
# What the query functions run on: the pool, or a connection inside a transaction.
Conn = asyncpg.Pool | asyncpg.Connection
_NAME = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a file of `-- name: x` blocks into {name: sql}."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} defined twice")
        queries[name] = body.strip()
    return queries


@cache
def load(table_file: str) -> dict[str, str]:
    return parse((SQL_DIR / f"{table_file}.sql").read_text())
