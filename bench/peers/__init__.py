"""Vigil's peers, set up as a new user would (no result backend, defaults otherwise).

Each module here defines the no-op task and two ways to submit it, which the benchmark's
client calls: `send_one(key)` (the plain one-call submit) and `send_batch(keys)` (the
library's own way to send many at once). The broker URL, with the peer's own vhost,
comes from BENCH_AMQP_URL.
"""

BROKER_URL_ENV = "BENCH_AMQP_URL"
