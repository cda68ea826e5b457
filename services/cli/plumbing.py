"""How a command runs: parse what was typed, run the command's coroutine with a database
pool, and turn Vigil's errors into one line and an exit code (2 usage, 1 failure)."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import asyncpg
import typer

from common import db
from common.config import DatabaseSettings
from common.db import executions
from common.db.pool import CONNECTION_ERRORS
from common.errors import DatabaseUnavailable, InvalidInput, VigilError
from common.models import Execution
from services.cli import output

T = TypeVar("T")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
ExecutionIdArg = Annotated[str, typer.Argument(help="The execution's id.")]
ParamOpt = Annotated[list[str] | None, typer.Option(
    "-p", "--param", help="A parameter as key=value (value parsed as JSON if it can be).")]
ParamsJsonOpt = Annotated[str | None, typer.Option(
    "--params-json", help="All parameters as a JSON object, or @FILE to read one.")]
MaxAttemptsOpt = Annotated[int | None, typer.Option(
    min=1, max=100, help="Attempts before it is FAILED [default: the action's, or 3].")]
TimeoutOpt = Annotated[int | None, typer.Option(
    min=1, max=7 * 86_400, help="Start-to-close timeout of each attempt, in seconds "
                                "[default: the action's, or 3600].")]
CLI_ACTOR = "cli"


def parse_or_exit(parse: Callable[..., T], *args: Any) -> T:
    """Parse what the user typed, or exit 2 with one line naming the problem."""
    try:
        return parse(*args)
    except InvalidInput as exc:
        output.fail(str(exc))
        raise typer.Exit(2) from None


def run_command(coro: Awaitable[T]) -> T:
    """Run a command's coroutine; turn Vigil's errors into one line and an exit code."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except InvalidInput as exc:
        output.fail(str(exc))
        raise typer.Exit(2) from None
    except VigilError as exc:
        output.fail(str(exc))
        raise typer.Exit(1) from None


async def with_pool(work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    settings = DatabaseSettings(pool_min_size=1, pool_max_size=2)
    pool = await db.connect(settings, application_name="vigil-cli")
    try:
        return await work(pool)
    except CONNECTION_ERRORS as exc:
        raise DatabaseUnavailable(settings.address, exc) from None
    finally:
        pool.terminate()


def pooled(fn: Callable[..., Awaitable[T]]) -> Callable[..., T]:
    """Run an async command body with a database pool as its first argument."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return run_command(with_pool(lambda pool: fn(pool, *args, **kwargs)))

    return wrapper


async def existing(pool: asyncpg.Pool, execution_id: uuid.UUID) -> Execution:
    """The execution, or a failure naming the id that does not exist."""
    e = await executions.get(pool, execution_id)
    if e is None:
        raise VigilError(f"no execution {execution_id}")
    return e
