"""An action module that takes a second to import, as a heavy one (pandas, a model)
would: a worker that consumed before loading it would meet deliveries it cannot run."""

import time

from common.api import Context, action

time.sleep(1.0)


@action("slow.noop")
def noop(ctx: Context) -> str:
    return "ran"
