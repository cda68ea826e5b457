"""What runs inside the child process of one python attempt.

The child reads one JSON job {"execution_id", "action", "params", "attempt",
"checkpoint"} and answers on its protocol pipe with JSON lines:
{"type": "checkpoint", "data": ...} any number of times, then exactly one
{"type": "result", "ok": true, "result": ...} or {"type": "result", "ok": false,
"error": {...}}. Whatever the action prints goes to stderr, so it can't corrupt that.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import traceback
from typing import IO, Any

from services.worker import registry


def _emit(out: IO[str], record: dict[str, Any]) -> None:
    out.write(json.dumps(record, default=repr) + "\n")
    out.flush()


def run_job(job: dict[str, Any], protocol: IO[str]) -> None:
    """Run the job's action (already imported by the zygote) and report on `protocol`."""
    try:
        fn = registry.lookup(job["action"])
        if fn is None:
            _emit(protocol, {"type": "result", "ok": False, "error": {
                "kind": "unknown_action", "message": f"no action named {job['action']!r}"}})
            return
        ctx = registry.Context(
            execution_id=job["execution_id"],
            params=job["params"],
            attempt=job["attempt"],
            checkpoint=job["checkpoint"],
            _save=lambda data: _emit(protocol, {"type": "checkpoint", "data": data}),
        )
        result = fn(ctx)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        json.dumps(result)  # a result that is not JSON is the action's error, not ours
    except BaseException as exc:  # the child reports everything, even SystemExit
        _emit(protocol, {"type": "result", "ok": False, "error": {
            "kind": "action_error",
            "type": type(exc).__name__,
            "message": str(exc)[:2000],
            "traceback": traceback.format_exc()[-8000:],
        }})
        return
    _emit(protocol, {"type": "result", "ok": True, "result": result})


async def _await(awaitable: Any) -> Any:
    return await awaitable
