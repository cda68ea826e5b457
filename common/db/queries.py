"""Named SQL blocks with named parameters, loaded once from the .sql file of each table.

A block starts with `-- name: <query>` and refers to its parameters as `:name`; the
loader rewrites them to Postgres' `$1, $2, ...` (outside string literals, quoted names
and comments; `::type` casts are left alone) and remembers their order, so callers pass
keywords and a misspelt or missing one fails at once instead of shifting every `$n`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg

SQL_DIR = Path(__file__).parent / "sql"
# What the query functions run on: the pool, or a connection inside a transaction.
Conn = asyncpg.Pool | asyncpg.Connection
_NAME = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)
# Literals, quoted names and comments pass through untouched; a parameter is a colon
# not next to another colon, followed by a name.
_TOKEN = re.compile(
    r"""(?P<skip>'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|\$\$.*?\$\$|::)"""
    r"""|:(?P<param>[a-z_][a-z0-9_]*)""",
    re.DOTALL,
)


@dataclass(frozen=True)
class Query:
    name: str
    sql: str  # with $1, $2, ...
    params: tuple[str, ...]  # the parameter named by each $n, in order

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        missing = [p for p in self.params if p not in values]
        extra = sorted(set(values) - set(self.params))
        if missing or extra:
            raise TypeError(f"query {self.name}: missing {missing}, unexpected {extra}")
        return [values[p] for p in self.params]

    async def fetch(self, conn: Conn, **values: Any) -> list[asyncpg.Record]:
        return await conn.fetch(self.sql, *self.args(values))

    async def fetchrow(self, conn: Conn, **values: Any) -> asyncpg.Record | None:
        return await conn.fetchrow(self.sql, *self.args(values))

    async def fetchval(self, conn: Conn, **values: Any) -> Any:
        return await conn.fetchval(self.sql, *self.args(values))

    async def execute(self, conn: Conn, **values: Any) -> str:
        return await conn.execute(self.sql, *self.args(values))


def compile_params(name: str, text: str) -> Query:
    """Rewrite :name parameters to $n; the same name twice is the same $n."""
    order: list[str] = []

    def replace(match: re.Match[str]) -> str:
        param = match.group("param")
        if param is None:
            return match.group(0)
        if param not in order:
            order.append(param)
        return f"${order.index(param) + 1}"

    return Query(name, _TOKEN.sub(replace, text), tuple(order))


def parse(text: str) -> dict[str, Query]:
    """Split a file of `-- name: x` blocks into {name: Query}."""
    parts = _NAME.split(text)
    queries: dict[str, Query] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} defined twice")
        queries[name] = compile_params(name, body.strip())
    return queries


@cache
def load(table_file: str) -> dict[str, Query]:
    return parse((SQL_DIR / f"{table_file}.sql").read_text())
