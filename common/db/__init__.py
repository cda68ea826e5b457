"""Postgres access: the pool, migrations, and one module of queries per table."""

from common.db.pool import connect, retrying, transaction

__all__ = ["connect", "retrying", "transaction"]
