"""Python actions, registered by name with the @action decorator.

    from services.worker.registry import Context, action

    @action("demo.add")
    def add(ctx: Context) -> dict:
        return {"sum": ctx.params["a"] + ctx.params["b"]}

This module is imported by the child process too, so it stays dependency-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ActionFn = Callable[["Context"], Any]

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_TIMEOUT_S = 3600


@dataclass(frozen=True)
class ActionSpec:
    """An action and the defaults a submission of it gets unless it says otherwise."""

    name: str
    fn: ActionFn | None  # None for built-ins run by another runtime (shell)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout_s: int = DEFAULT_TIMEOUT_S


_REGISTRY: dict[str, ActionSpec] = {}


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
        """Record progress; a retried attempt receives it as ctx.checkpoint."""
        self._save(data)


def action(
    name: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS, timeout_s: int = DEFAULT_TIMEOUT_S
) -> Callable[[ActionFn], ActionFn]:
    """Register a python action; its defaults apply to submissions that don't set them."""
    if not name or len(name) > 200:
        raise ValueError(f"action name must be 1..200 characters: {name!r}")
    if max_attempts < 1 or timeout_s < 1:
        raise ValueError(f"action {name!r}: max_attempts and timeout_s must be positive")

    def register(fn: ActionFn) -> ActionFn:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"action {name!r} is registered twice")
        _REGISTRY[name] = ActionSpec(name, fn, max_attempts, timeout_s)
        return fn

    return register


def load(modules: list[str]) -> dict[str, ActionSpec]:
    """Import the modules that define actions; return every registered action by name."""
    for module in modules:
        importlib.import_module(module)
    return dict(_REGISTRY)


def lookup(name: str) -> ActionFn | None:
    spec = _REGISTRY.get(name)
    return spec.fn if spec else None
