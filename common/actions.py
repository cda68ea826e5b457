"""Python actions, registered by name with the @action decorator.

    from common.api import Context, action

    @action("demo.add")
    def add(ctx: Context) -> dict:
        return {"sum": ctx.params["a"] + ctx.params["b"]}

The worker's child processes import this module too, so it stays light: no database,
no broker.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidInput
from common.state_machine import DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT_S

ActionFn = Callable[["Context"], Any]


@dataclass(frozen=True)
class ActionSpec:
    """An action and what its executions get unless a submission says otherwise."""

    name: str
    fn: ActionFn | None  # None for built-ins run by another runtime (shell)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout_s: int = DEFAULT_TIMEOUT_S
    # The most memory one attempt may use; None: the worker's default.
    memory_limit_mb: int | None = None
    # A resumable action's retries must receive the checkpoint an earlier attempt saved:
    # one that would silently start over instead fails loudly (seed 004).
    resumable: bool = False


_REGISTRY: dict[str, ActionSpec] = {}


class CheckpointTooLarge(ValueError):
    """A checkpoint over the worker's size limit; the attempt fails, not retried."""


@dataclass
class Context:
    """What an action sees: its params, which attempt this is, and the last checkpoint."""

    execution_id: str
    params: Any
    attempt: int
    checkpoint: Any = None
    _save: Callable[[Any], None] = field(default=lambda data: None, repr=False)

    @property
    def resuming(self) -> bool:
        return self.checkpoint is not None

    def save_checkpoint(self, data: Any) -> None:
        """Record progress; a retried attempt receives it as ctx.checkpoint. Raises
        CheckpointTooLarge above the worker's checkpoint size limit."""
        if data is None:
            raise ValueError("a checkpoint cannot be None: save what a retry resumes from")
        self._save(data)


def action(
    name: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS, timeout_s: int = DEFAULT_TIMEOUT_S,
    memory_limit_mb: int | None = None, resumable: bool = False,
) -> Callable[[ActionFn], ActionFn]:
    """Register a python action; its defaults apply to submissions that don't set them."""
    if not name or len(name) > 200:
        raise ValueError(f"action name must be 1..200 characters: {name!r}")
    if max_attempts < 1 or timeout_s < 1 or (memory_limit_mb is not None
                                             and memory_limit_mb < 1):
        raise ValueError(
            f"action {name!r}: max_attempts, timeout_s and memory_limit_mb must be positive")

    def register(fn: ActionFn) -> ActionFn:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"action {name!r} is registered twice")
        _REGISTRY[name] = ActionSpec(name, fn, max_attempts, timeout_s, memory_limit_mb,
                                     resumable)
        return fn

    return register


def load(modules: list[str]) -> dict[str, ActionSpec]:
    """Import the modules that define actions; return every registered action by name.
    A module that cannot be imported is InvalidInput naming it (a mistyped --actions)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise InvalidInput(f"cannot import action module {module!r}: {exc}") from None
    return dict(_REGISTRY)


def lookup(name: str) -> ActionSpec | None:
    return _REGISTRY.get(name)
