"""What a submission may carry, and what an execution id looks like: checked once for
the CLI, the client and schedules.

Anything malformed is an InvalidInput with one line naming the problem, raised before
anything is written: Postgres would refuse some of it (a NUL character in JSON text)
and choke on some (JSON nested thousands deep), and Python's own json module raises
RecursionError on deep nesting, so both are checked here, iteratively.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from common.config import SubmitLimits
from common.errors import InvalidInput

MAX_ATTEMPTS_LIMIT = 100
MAX_TIMEOUT_S = 7 * 86_400
MAX_DELAY_S = 366 * 86_400


@dataclass(frozen=True)
class Submission:
    """One execution to create. Unset limits take the action's declared defaults;
    delay_s or at (not both) make it wait until then, by the database's clock."""

    action: str
    params: dict[str, Any]
    max_attempts: int | None = None
    timeout_s: int | None = None
    idempotency_key: str | None = None
    delay_s: float | None = None
    at: datetime | None = None

    def checked(self, limits: SubmitLimits) -> Submission:
        """This submission, if every part of it is acceptable; else InvalidInput."""
        check_name(self.action, "action", limits.max_action_length)
        check_params(self.params, limits)
        if self.max_attempts is not None and not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise InvalidInput(f"max_attempts must be 1..{MAX_ATTEMPTS_LIMIT}, "
                               f"not {self.max_attempts}")
        if self.timeout_s is not None and not 1 <= self.timeout_s <= MAX_TIMEOUT_S:
            raise InvalidInput(f"timeout must be 1..{MAX_TIMEOUT_S} seconds, not {self.timeout_s}")
        if self.idempotency_key is not None:
            check_key(self.idempotency_key, limits.max_idempotency_key_length)
        if self.delay_s is not None and self.at is not None:
            raise InvalidInput("give a delay or a time to start at, not both")
        if self.delay_s is not None and not 0 <= self.delay_s <= MAX_DELAY_S:
            raise InvalidInput(f"delay must be 0..{MAX_DELAY_S} seconds, not {self.delay_s:g}")
        if self.at is not None and self.at.tzinfo is None:
            raise InvalidInput(f"start time {self.at.isoformat()} has no time zone "
                               "(write it with Z or an offset, e.g. 2026-12-01T09:00:00Z)")
        return self


def check_name(name: str, what: str, max_length: int) -> str:
    """An action's or a schedule's name: not blank, not too long, printable."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(f"{what} name is empty")
    if len(name) > max_length:
        raise InvalidInput(f"{what} name is over {max_length} characters")
    if not name.isprintable():
        raise InvalidInput(f"{what} name {name!r} has control characters")
    return name


def check_key(key: str, max_length: int) -> str:
    if not key:
        raise InvalidInput("idempotency key is empty")
    if len(key) > max_length:
        raise InvalidInput(f"idempotency key is {len(key)} characters, over the limit "
                           f"of {max_length}")
    if "\x00" in key:
        raise InvalidInput("idempotency key contains a NUL character")
    return key


def check_params(params: Any, limits: SubmitLimits) -> dict[str, Any]:
    """Params must be a JSON object: not nested too deep, no NUL characters (Postgres
    refuses them in JSON text), no larger than the limit."""
    if not isinstance(params, dict):
        raise InvalidInput(f"params must be a JSON object, not {type(params).__name__}")
    _check_shape(params, limits.max_params_depth)
    try:
        size = len(json.dumps(params, allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"params are not JSON: {exc}") from None
    if size > limits.max_params_bytes:
        raise InvalidInput(f"params are {size} bytes, over the limit of "
                           f"{limits.max_params_bytes} bytes")
    return params


def _check_shape(value: Any, max_depth: int) -> None:
    """Depth and NUL characters, walked without recursion (so without RecursionError)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                raise InvalidInput(f"params are nested more than {max_depth} levels deep")
            if isinstance(item, dict):
                for key, child in item.items():
                    if isinstance(key, str) and "\x00" in key:
                        raise InvalidInput("params contain a NUL character (\\u0000), "
                                           "which Postgres cannot store")
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str) and "\x00" in item:
            raise InvalidInput("params contain a NUL character (\\u0000), "
                               "which Postgres cannot store")


def execution_id(value: object) -> uuid.UUID:
    """An execution id given as a UUID or its text."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise InvalidInput(f"{value!r} is not an execution id (a UUID)") from None
