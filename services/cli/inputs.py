"""Parsing what a user types into validated values; every problem is an InvalidInput."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from common.cadence import check_cron
from common.errors import InvalidInput


def parse_params(pairs: list[str], params_json: str | None, max_bytes: int) -> dict[str, Any]:
    """Merge --params-json (JSON text or @file) with -p key=value pairs (values are JSON
    when they parse as JSON, else strings). The result must be a JSON object."""
    params: dict[str, Any] = {}
    if params_json is not None:
        text = params_json
        if params_json.startswith("@"):
            text = _read_params_file(Path(params_json[1:]), max_bytes)
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(
                f"--params-json is not valid JSON: {exc.msg} at line {exc.lineno} "
                f"column {exc.colno}"
            ) from None
        except RecursionError:
            raise InvalidInput("--params-json is nested too deep") from None
        if not isinstance(loaded, dict):
            raise InvalidInput("--params-json must be a JSON object")
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"-p {pair!r}: expected key=value")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
        except RecursionError:
            raise InvalidInput(f"-p {key}: the value is nested too deep") from None
    return params


def _read_params_file(path: Path, max_bytes: int) -> str:
    """The file's text, read no further than the limit: it may be a pipe, or /dev/zero."""
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise InvalidInput(f"cannot read params file {path}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise InvalidInput(f"params file {path} is over the limit of {max_bytes} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise InvalidInput(f"params file {path} is not UTF-8 text") from None


def parse_time(text: str, option: str) -> datetime:
    """An ISO 8601 time with a zone, e.g. 2026-12-01T09:00:00Z."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"{option} {text!r}: expected a time like "
                           "2026-12-01T09:00:00Z") from None
    if when.tzinfo is None:
        raise InvalidInput(f"{option} {text!r}: give the time zone (Z or +01:00)")
    return when


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
# Longer than any Vigil needs, and within what every use holds: a Postgres interval, a
# schedule's integer every_s, a Python datetime.
MAX_DURATION_S = 3650 * 86_400


def parse_duration(text: str, option: str) -> float:
    """'90s', '15m', '24h' or '7d' in seconds, up to 3650d."""
    match = _DURATION.match(text.strip())
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)] if match else 0.0
    if not 0 < seconds <= MAX_DURATION_S:
        raise InvalidInput(f"{option} {text!r}: expected a duration like 90s, 15m, 24h or 7d, "
                           "at most 3650d")
    return seconds


def parse_cadence(every: str | None, cron: str | None) -> tuple[int | None, str | None]:
    """A schedule's (every_s, cron) from --every or --cron, exactly one of them."""
    if (every is None) == (cron is None):
        raise InvalidInput("give --every or --cron (one of them)")
    if cron is not None:
        return None, check_cron(cron)
    assert every is not None
    seconds = parse_duration(every, "--every")
    if seconds != int(seconds):
        raise InvalidInput(f"--every {every!r}: give whole seconds")
    return int(seconds), None


def parse_runtimes(text: str, known: tuple[str, ...]) -> list[str]:
    runtimes = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in runtimes if r not in known]
    if not runtimes or unknown:
        raise InvalidInput(
            f"--runtime must list some of {', '.join(known)}; got {text!r}"
        )
    return runtimes
