"""Vigil's no-op action for the benchmark (`vigil worker --actions bench.actions`)."""

from __future__ import annotations

from bench import probe
from common.api import Context, action


@action("bench.noop")
def noop(ctx: Context) -> None:
    probe.record(ctx.params["key"])
