"""docs/configuration.md, generated from the settings classes (`vigil config docs`)."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings

from common.config import ALL_SETTINGS

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
