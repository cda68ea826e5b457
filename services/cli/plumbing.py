"""How a command runs: parse what was typed, run the command's coroutine with a database
pool, and turn every error into one line and an exit code (2 usage, 1 failure). This is
the one place that decides exit codes; a traceback is shown only with --debug."""

from __future__ import annotations

import asyncio
import functools
import sys
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NoReturn, TypeVar

import asyncpg
import click
import typer
import typer.core

from common import db
from common.config import DatabaseSettings
from common.db import executions
from common.db.migrate import NotMigrated, require_migrated
from common.db.pool import CONNECTION_ERRORS
from common.errors import DatabaseUnavailable, InvalidInput, VigilError, describe
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
FAILURE = 1
USAGE = 2

_debug = False


def _none_is_missing(param: click.Parameter, value: Any) -> bool:
    return value is None or click.Parameter.value_is_missing(param, value)


# typer 0.16 gives a required parameter the default None, which click 8.3 and later take
# for a value (fastapi/typer#1333): count None as missing again, so that `vigil show`
# says what is missing instead of running with None. (Pinning click < 8.3 would clash
# with Celery in the benchmark's extra, and typer 0.29 changes how errors surface.)
typer.core.TyperArgument.value_is_missing = _none_is_missing  # type: ignore[method-assign]
typer.core.TyperOption.value_is_missing = _none_is_missing  # type: ignore[method-assign]


def set_debug(on: bool) -> None:
    """--debug (or VIGIL_DEBUG=1): an unexpected error shows its whole traceback."""
    global _debug
    _debug = on


def run_cli(command: click.Command) -> NoReturn:
    """Run `vigil`: a usage error is one line and exit 2; an unexpected error is one line
    naming it (`error: <type>: <first line>`) and exit 1, with the traceback only under
    --debug."""
    try:
        status = command.main(prog_name="vigil", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError:
        status = USAGE  # click has printed the help
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "vigil"
        output.fail(f"{_clause(exc.format_message())} (see {where} --help)")
        status = USAGE
    except click.ClickException as exc:
        output.fail(_clause(exc.format_message()))
        status = FAILURE
    except Exception as exc:
        if _debug:
            traceback.print_exc()
        output.fail(describe(exc))
        status = FAILURE
    sys.exit(status if isinstance(status, int) else 0)


def _clause(message: str) -> str:
    """Click's sentence as a clause of ours: 'Missing argument X.' -> 'missing argument X'."""
    text = " ".join(message.split()).rstrip(".")
    return text[:1].lower() + text[1:]


def usage_error(message: str) -> NoReturn:
    """Exit 2 with one line naming what was typed wrong; nothing was changed."""
    output.fail(message)
    raise typer.Exit(USAGE)


def failure(message: str) -> NoReturn:
    """Exit 1 with one line naming what failed."""
    output.fail(message)
    raise typer.Exit(FAILURE)


def parse_or_exit(parse: Callable[..., T], *args: Any) -> T:
    """Parse what the user typed, or exit 2 with one line naming the problem."""
    try:
        return parse(*args)
    except InvalidInput as exc:
        usage_error(str(exc))


def run_command(coro: Awaitable[T]) -> T:
    """Run a command's coroutine; turn Vigil's errors into one line and an exit code."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except InvalidInput as exc:
        usage_error(str(exc))
    except VigilError as exc:
        failure(str(exc))


async def with_pool(work: Callable[[asyncpg.Pool], Awaitable[T]], *,
                    check_schema: bool = True) -> T:
    """Run work with a small pool. First, unless told not to, refuse a database whose
    schema is behind the code: before anything is read or written."""
    settings = DatabaseSettings(pool_min_size=1, pool_max_size=2)
    address = f"{settings.address}/{settings.name}"
    pool = await db.connect(settings, application_name="vigil-cli")
    try:
        if check_schema:
            async with pool.acquire() as conn:
                await require_migrated(conn, address)
        return await work(pool)
    except CONNECTION_ERRORS as exc:
        raise DatabaseUnavailable(settings.address, exc) from None
    except asyncpg.UndefinedTableError:  # dropped since the check: behind all the same
        raise NotMigrated(address) from None
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
