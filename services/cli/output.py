"""How the CLI shows things: rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

# Piped output keeps whole lines instead of wrapping at 80 columns. What is printed holds
# what users typed (names, params), so neither markup nor emoji codes are interpreted:
# `[/x]` would be a MarkupError and `:smile:` an emoji.
_PLAIN = {"highlight": False, "soft_wrap": True, "markup": False, "emoji": False}
console = Console(width=None if sys.stdout.isatty() else 200, **_PLAIN)
errors = Console(stderr=True, **_PLAIN)


def emit_json(value: Any) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, BaseModel):
            return o.model_dump(mode="json")
        if isinstance(o, datetime):
            return o.isoformat()
        return str(o)

    sys.stdout.write(json.dumps(value, default=default, indent=2) + "\n")


def make_table(
    title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> Table:
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    return t


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    console.print(make_table(title, columns, rows))


def when(t: datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if t else ""


def usage(used: dict[str, float] | None) -> str:
    """An attempt's peak memory, CPU and wall time, as far as they are known."""
    if not used:
        return ""
    parts = []
    if used.get("peak_rss_bytes") is not None:
        parts.append(f"{used['peak_rss_bytes'] / 2**20:.0f}MiB")
    if used.get("cpu_s") is not None:
        parts.append(f"cpu {seconds(used['cpu_s'])}")
    if used.get("wall_s") is not None:
        parts.append(f"wall {seconds(used['wall_s'])}")
    return " ".join(parts)


def seconds(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s * 1000:.0f}ms" if s < 1 else f"{s:.1f}s"


@contextmanager
def progress(title: str) -> Iterator[Callable[[str], None]]:
    """A live status line on stderr when it is a terminal; silent otherwise."""
    if not errors.is_terminal:
        yield lambda _: None
        return
    with errors.status(title) as status:
        yield lambda text: status.update(f"{title}: {text}")


def warn(message: str) -> None:
    errors.print(f"warning: {_one_line(message)}")


def fail(message: str) -> None:
    errors.print(f"error: {_one_line(message)}")


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines())
