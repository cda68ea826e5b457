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
