"""The SQL files are the one place for each table's queries: every named block parses
and every block the code asks for exists."""

import re
from pathlib import Path

import pytest

from common.db.queries import SQL_DIR, load, parse

CODE = Path(__file__).resolve().parents[2] / "common" / "db"


def test_blocks_parse_and_names_are_unique() -> None:
    assert parse("-- name: a\nSELECT 1;\n-- name: b\nSELECT 2;") == {
        "a": "SELECT 1;", "b": "SELECT 2;"}
    with pytest.raises(ValueError, match="twice"):
        parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")


@pytest.mark.parametrize("table", [p.stem for p in SQL_DIR.glob("*.sql")])
def test_every_query_the_code_uses_exists_and_every_query_is_used(table: str) -> None:
    queries = load(table)
    code = (CODE / f"{table}.py").read_text()
    used = set(re.findall(r'SQL\["([a-z_]+)"\]', code))
    assert used - set(queries) == set(), "queries used but not defined"
    assert set(queries) - used == set(), "queries defined but never used"
