"""The SQL files are the one place for each table's queries: every named block parses
and every block the code asks for exists."""

import re
from pathlib import Path

import pytest

from common.db.queries import SQL_DIR, compile_params, load, parse

CODE = Path(__file__).resolve().parents[2] / "common" / "db"


def test_blocks_parse_and_names_are_unique() -> None:
    queries = parse("-- name: a\nSELECT 1;\n-- name: b\nSELECT 2;")
    assert {name: q.sql for name, q in queries.items()} == {"a": "SELECT 1;", "b": "SELECT 2;"}
    with pytest.raises(ValueError, match="twice"):
        parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")


def test_named_parameters_become_numbered_ones_in_order_of_first_use() -> None:
    q = compile_params("q", "SELECT :b::int, 'x:y', \"c:d\", :a -- :not_a_param\n"
                            "WHERE x = :b AND y = $$:no$$")
    assert q.sql == ("SELECT $1::int, 'x:y', \"c:d\", $2 -- :not_a_param\n"
                     "WHERE x = $1 AND y = $$:no$$")
    assert q.params == ("b", "a")
    assert q.args({"a": 1, "b": 2}) == [2, 1]
    with pytest.raises(TypeError, match=r"missing \['a'\], unexpected \['c'\]"):
        q.args({"b": 2, "c": 3})


@pytest.mark.parametrize("table", [p.stem for p in SQL_DIR.glob("*.sql")])
def test_every_query_the_code_uses_exists_and_every_query_is_used(table: str) -> None:
    queries = load(table)
    code = (CODE / f"{table}.py").read_text()
    used = set(re.findall(r'SQL\["([a-z_]+)"\]', code))
    assert used - set(queries) == set(), "queries used but not defined"
    assert set(queries) - used == set(), "queries defined but never used"
