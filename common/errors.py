"""One error tree for Vigil. Driver errors are translated at the boundary."""

from __future__ import annotations


class VigilError(Exception):
    """Base of every error Vigil raises on purpose."""


class InvalidInput(VigilError):
    """The caller asked for something malformed; nothing was changed."""


class Unavailable(VigilError):
    """A server Vigil depends on cannot be reached right now."""


class DatabaseUnavailable(Unavailable):
    def __init__(self, address: str, cause: BaseException | str) -> None:
        super().__init__(f"database unavailable at {address}: {describe(cause)}")


class BrokerUnavailable(Unavailable):
    def __init__(self, address: str, cause: BaseException | str) -> None:
        super().__init__(f"broker unavailable at {address}: {describe(cause)}")


class BrokerRefused(VigilError):
    """The broker answered, and said no (a wrong password, a missing permission)."""


class BrokerNotSetUp(VigilError):
    """The broker answers but lacks what `vigil broker setup` creates."""


class PublishFailed(VigilError):
    """A dispatch was returned, nacked or not confirmed in time."""


def describe(cause: BaseException | str) -> str:
    """A one-line reason without secrets: the exception type and its first line."""
    if isinstance(cause, str):
        return cause
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


class NotFound(VigilError):
    """No execution (or schedule) by that id or name."""


class ExecutionFailed(VigilError):
    """An execution whose result was asked for ended without succeeding."""

    def __init__(self, execution_id: object, status: str, reason: str | None,
                 error: object) -> None:
        message = error.get("message") if isinstance(error, dict) else None
        super().__init__(f"execution {execution_id} ended {status}"
                         + (f" ({reason})" if reason else "")
                         + (f": {message}" if message else ""))
        self.execution_id = execution_id
        self.status = status
        self.reason = reason
        self.error = error


class WaitTimedOut(VigilError):
    """An execution had not ended when the caller stopped waiting for it."""
