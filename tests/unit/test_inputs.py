import pytest

from common.errors import InvalidInput
from services.cli.inputs import (
    parse_cadence,
    parse_duration,
    parse_params,
    parse_runtimes,
    parse_time,
)

MiB = 1_048_576


def test_pairs_are_json_when_they_parse_and_strings_otherwise() -> None:
    assert parse_params(["n=5", "name=bob", 'argv=["echo","hi"]'], None, MiB) == {
        "n": 5, "name": "bob", "argv": ["echo", "hi"]}


def test_pairs_override_params_json() -> None:
    assert parse_params(["a=2"], '{"a": 1, "b": 3}', MiB) == {"a": 2, "b": 3}


def test_params_json_from_file(tmp_path) -> None:
    f = tmp_path / "p.json"
    f.write_text('{"x": [1, 2]}')
    assert parse_params([], f"@{f}", MiB) == {"x": [1, 2]}


@pytest.mark.parametrize(("pairs", "params_json", "message"), [
    ([], "{bad", "not valid JSON"),
    ([], "[1, 2]", "must be a JSON object"),
    (["novalue"], None, "expected key=value"),
    (["=1"], None, "expected key=value"),
    ([], "@/nonexistent/file.json", "cannot read params file"),
])
def test_bad_params_name_the_problem(pairs, params_json, message) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_params(pairs, params_json, MiB)


def test_params_nested_too_deep_for_json_are_refused_not_a_traceback() -> None:
    deep = "[" * 10_000 + "]" * 10_000
    with pytest.raises(InvalidInput, match="nested too deep"):
        parse_params([], '{"a": ' + deep + "}", MiB)
    with pytest.raises(InvalidInput, match="nested too deep"):
        parse_params([f"a={deep}"], None, MiB)


def test_runtimes() -> None:
    assert parse_runtimes("shell, python", ("shell", "python")) == ["shell", "python"]
    with pytest.raises(InvalidInput, match="--runtime"):
        parse_runtimes("shell,ruby", ("shell", "python"))


def test_times_need_a_zone() -> None:
    assert parse_time("2026-12-01T09:00:00Z", "--at").isoformat() == "2026-12-01T09:00:00+00:00"
    for text, message in [("tomorrow", "expected a time"), ("2026-12-01T09:00:00", "zone")]:
        with pytest.raises(InvalidInput, match=message):
            parse_time(text, "--at")


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("1.5h", 5400),
                                           ("7d", 604_800)])
def test_durations_in_seconds(text, seconds) -> None:
    assert parse_duration(text, "--since") == seconds


@pytest.mark.parametrize("text", ["", "10", "0s", "5 min", "-1h", "soon"])
def test_bad_durations_name_the_option(text) -> None:
    with pytest.raises(InvalidInput, match=f"--since {text!r}: expected a duration"):
        parse_duration(text, "--since")


def test_a_schedule_takes_every_or_cron_not_both() -> None:
    assert parse_cadence("90s", None) == (90, None)
    assert parse_cadence(None, "*/5 * * * *") == (None, "*/5 * * * *")
    for every, cron, message in [(None, None, "give --every or --cron"),
                                 ("1s", "* * * * *", "give --every or --cron"),
                                 ("1.5s", None, "whole seconds"),
                                 (None, "61 * * * *", "--cron")]:
        with pytest.raises(InvalidInput, match=message):
            parse_cadence(every, cron)
