"""Entry point of the child process that runs one python attempt.

The parent writes one JSON job to stdin: {"modules", "execution_id", "action", "params",
"attempt", "checkpoint"}. The child answers on its original stdout with JSON lines:
{"type": "checkpoint", "data": ...} any number of times, then exactly one
{"type": "result", "ok": true, "result": ...} or {"type": "result", "ok": false,
"error": {...}}. Whatever the action prints goes to stderr, so it can't corrupt that.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import traceback
from typing import IO, Any

from services.worker import registry


def _emit(out: IO[str], record: dict[str, Any]) -> None:
    out.write(json.dumps(record, default=repr) + "\n")
    out.flush()


def main() -> int:
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the action's prints land on stderr
    sys.stdout = sys.stderr
    job = json.loads(sys.stdin.read())
    try:
        registry.load(job["modules"])
        fn = registry.lookup(job["action"])
        if fn is None:
            _emit(protocol, {"type": "result", "ok": False, "error": {
                "kind": "unknown_action", "message": f"no action named {job['action']!r}"}})
            return 0
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
        return 0
    _emit(protocol, {"type": "result", "ok": True, "result": result})
    return 0


async def _await(awaitable: Any) -> Any:
    return await awaitable


if __name__ == "__main__":
    sys.exit(main())
