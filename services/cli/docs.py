"""The generated parts of the docs: docs/configuration.md from the settings classes, and
the transition table in docs/architecture.md from common/state_machine.py. `make docs`
writes both (python -m services.cli.docs); tests fail when either drifts."""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings

from common.config import ALL_SETTINGS
from common.state_machine import TRANSITIONS, ExecutionStatus

DOCS = Path(__file__).resolve().parents[2] / "docs"
TRANSITIONS_BEGIN = "<!-- transitions: generated from common/state_machine.py by `make docs` -->"
TRANSITIONS_END = "<!-- /transitions -->"

HEADER = """# Configuration

Generated from `common/config.py` by `vigil config docs` (`make docs`); a test fails
when the two drift apart. Every setting is an environment variable; secrets may also be
files in `VIGIL_SECRETS_DIR` named like the variable (e.g. `/run/secrets/VIGIL_DB_PASSWORD`
for `secrets_dir=/run/secrets`). Flags of `vigil executor` and `vigil worker` override
the variables they name.
"""


def _default(value: object) -> str:
    if isinstance(value, SecretStr):
        return "(secret)"
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _section(cls: type[BaseSettings]) -> list[str]:
    prefix = cls.model_config.get("env_prefix", "")
    lines = [f"## {cls.__doc__.strip().splitlines()[0] if cls.__doc__ else cls.__name__}",
             "", f"`{cls.__name__}`", "",
             "| variable | default | meaning |", "|---|---|---|"]
    for name, field in cls.model_fields.items():
        lines.append(f"| `{prefix}{name.upper()}` | `{_default(field.default)}` | "
                     f"{field.description or ''} |")
    return [*lines, ""]


def render() -> str:
    lines = [HEADER]
    for cls in ALL_SETTINGS:
        lines += _section(cls)
    return "\n".join(lines).rstrip() + "\n"


def render_transitions() -> str:
    """Every allowed transition, one row per (from, to, who), its reasons together."""
    order = {s: i for i, s in enumerate(ExecutionStatus)}

    def key(t: object) -> tuple[int, int, str]:
        return (-1 if t.from_status is None else order[t.from_status], order[t.to_status],
                t.by)

    rows = [TRANSITIONS_BEGIN, "| from | to | by | reasons |", "|---|---|---|---|"]
    for (_, _, by), group in groupby(sorted(TRANSITIONS, key=key), key=key):
        members = list(group)
        reasons = ", ".join(f"`{t.reason}`" for t in members)
        rows.append(f"| {members[0].from_status or '(new)'} | {members[0].to_status} | {by} "
                    f"| {reasons} |")
    return "\n".join([*rows, TRANSITIONS_END])


def write() -> None:
    """Regenerate both files."""
    (DOCS / "configuration.md").write_text(render())
    architecture = DOCS / "architecture.md"
    text = architecture.read_text()
    begin, end = text.index(TRANSITIONS_BEGIN), text.index(TRANSITIONS_END)
    architecture.write_text(text[:begin] + render_transitions()
                            + text[end + len(TRANSITIONS_END):])


if __name__ == "__main__":
    write()
