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
            path = Path(params_json[1:])
            try:
                if path.stat().st_size > max_bytes:
                    raise InvalidInput(
                        f"params file {path} is over the limit of {max_bytes} bytes")
                text = path.read_text()
            except OSError as exc:
                raise InvalidInput(f"cannot read params file {path}: {exc.strerror}") from None
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


def parse_duration(text: str, option: str) -> float:
    """'90s', '15m', '24h' or '7d' in seconds."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise InvalidInput(f"{option} {text!r}: expected a duration like 90s, 15m, 24h or 7d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


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
