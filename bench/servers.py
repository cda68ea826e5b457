"""The shared servers every system runs on: the bench Postgres cluster (production
durability, checked) and the stack's RabbitMQ, with the databases, vhosts and user the
benchmark creates on them and removes again.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import asyncpg

from bench.procs import parent_of
from common import broker, broker_access
from common.config import BrokerSettings, DatabaseSettings
from common.db.migrate import migrate
from common.errors import BrokerRefused, BrokerUnavailable, describe

DEFAULT_BENCH_DB_PORT = 55433
TEMPLATE_DB = "vigil_bench_template"
# The peers log in as this user, created for the run and granted each peer's vhost.
PEER_USER = "vigil-bench-peer"


class NotDurable(Exception):
    """The benchmark's Postgres would not survive a crash: its figures would flatter."""


class ServersDown(Exception):
    """A server stayed unreachable: no run could succeed, so the benchmark stops."""


def bench_db_port() -> int:
    """scripts.stack's bench-postgres port if that module says, else VIGIL_BENCH_DB_PORT."""
    try:
        from scripts import stack

        return int(stack.bench_db_port())
    except (ImportError, AttributeError):
        return int(os.environ.get("VIGIL_BENCH_DB_PORT", str(DEFAULT_BENCH_DB_PORT)))


def is_local(host: str) -> bool:
    """Its processes are on this machine, so the benchmark can measure them."""
    return host in ("127.0.0.1", "localhost", "::1")


def unique_name(prefix: str) -> str:
    """A database or vhost name no other run uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@dataclass
class Postgres:
    """The bench cluster, as the Vigil role (CREATEDB), its durability checked. It keeps
    the names of the databases it created until they are dropped."""

    settings: DatabaseSettings  # the maintenance database ("postgres")
    version: str = ""
    fsync: str = ""
    synchronous_commit: str = ""
    postmaster_pid: int | None = None  # None: not on this machine, so not measured
    created: set[str] = field(default_factory=set)

    @classmethod
    async def open(cls) -> Postgres:
        pg = cls(DatabaseSettings(port=bench_db_port(), name="postgres"))
        await pg.check()
        return pg

    async def check(self) -> None:
        """Read the version, the durability settings and the postmaster's pid (anew: a
        restarted server has another); NotDurable if either setting is off."""
        conn = await self._connect(self.settings)
        try:
            version, self.fsync, self.synchronous_commit = [
                await conn.fetchval(f"SHOW {name}")
                for name in ("server_version", "fsync", "synchronous_commit")]
            # The postmaster forked our backend: read its parent while it still lives.
            backend = await conn.fetchval("SELECT pg_backend_pid()")
            self.postmaster_pid = parent_of(backend) if is_local(self.settings.host) else None
        finally:
            await conn.close()
        self.version = version.split()[0]
        if self.fsync != "on" or self.synchronous_commit == "off":
            raise NotDurable(f"{self.describe()}: the benchmark needs fsync on and "
                             "synchronous_commit on (production durability); refusing to run")

    @staticmethod
    async def _connect(settings: DatabaseSettings) -> asyncpg.Connection:
        return await asyncpg.connect(host=settings.host, port=settings.port,
                                     user=settings.user, database=settings.name,
                                     password=settings.password.get_secret_value(),
                                     timeout=settings.connect_timeout_s)

    def describe(self) -> str:
        return (f"bench Postgres {self.settings.address} (PostgreSQL {self.version}): "
                f"fsync={self.fsync}, synchronous_commit={self.synchronous_commit}")

    def database(self, name: str) -> DatabaseSettings:
        return self.settings.model_copy(update={"name": name})

    async def execute(self, sql: str) -> None:
        conn = await self._connect(self.settings)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create_template(self) -> None:
        """(Re)create the migrated database each Vigil run is cloned from."""
        await self.drop_database(TEMPLATE_DB)
        self.created.add(TEMPLATE_DB)
        await self.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
        conn = await self._connect(self.database(TEMPLATE_DB))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    async def create_database(self, name: str) -> None:
        self.created.add(name)
        await self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')

    async def drop_database(self, name: str) -> None:
        await self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.discard(name)

    async def drop_leftovers(self) -> None:
        """Drop what a failed run could not (e.g. while the server restarted)."""
        for name in sorted(self.created, key=lambda n: n == TEMPLATE_DB):  # template last
            await self.drop_database(name)


@dataclass
class RabbitMQ:
    """The stack's broker, driven as its administrator through the management API. It
    keeps the names of the vhosts it created until they are deleted."""

    settings: BrokerSettings
    version: str = ""
    beam_pid: int | None = None
    peer_password: str = ""
    created: set[str] = field(default_factory=set)

    @classmethod
    async def open(cls) -> RabbitMQ:
        rabbit = cls(BrokerSettings())
        await rabbit.check()
        return rabbit

    async def check(self) -> None:
        """Read the version and the pid of beam.smp (anew: a restarted broker has another)."""
        overview = await asyncio.to_thread(self.api, "overview")
        nodes = await asyncio.to_thread(self.api, "nodes")
        node = next((n for n in nodes if n["name"] == overview["node"]), {})
        self.version = overview["rabbitmq_version"]
        self.beam_pid = (int(node["os_pid"]) if is_local(self.settings.host)
                         and node.get("os_pid") else None)

    def api(self, path: str, method: str = "GET", body: object = None) -> Any:
        return broker.management_api(self.settings, path, method=method, body=body)

    async def create_peer_user(self) -> None:
        self.peer_password = secrets.token_urlsafe(16)
        await asyncio.to_thread(self.api, f"users/{quote(PEER_USER, safe='')}", "PUT",
                                {"password": self.peer_password, "tags": ""})

    async def delete_peer_user(self) -> None:
        await self._delete(f"users/{quote(PEER_USER, safe='')}")

    async def create_peer_vhost(self, vhost: str) -> str:
        """A vhost the peer user may do anything in; returns its AMQP URL."""
        self.created.add(vhost)
        await asyncio.to_thread(self.api, f"vhosts/{quote(vhost, safe='')}", "PUT", {})
        await asyncio.to_thread(
            self.api, f"permissions/{quote(vhost, safe='')}/{quote(PEER_USER, safe='')}",
            "PUT", {"configure": ".*", "write": ".*", "read": ".*"})
        s = self.settings
        return (f"amqp://{quote(PEER_USER, safe='')}:{quote(self.peer_password, safe='')}"
                f"@{s.host}:{s.port}/{quote(vhost, safe='')}")

    async def provision_vigil_vhost(self, vhost: str) -> BrokerSettings:
        """A vhost set up as `vigil broker setup` does; returns Vigil's settings for it."""
        self.created.add(vhost)
        settings = self.settings.model_copy(update={"vhost": vhost})
        await broker_access.provision(settings)
        return settings

    async def delete_vhost(self, vhost: str) -> None:
        await self._delete(f"vhosts/{quote(vhost, safe='')}")
        self.created.discard(vhost)

    async def delete_leftovers(self) -> None:
        """Delete what a failed run could not (e.g. while the broker restarted)."""
        for vhost in sorted(self.created):
            await self.delete_vhost(vhost)

    async def _delete(self, path: str) -> None:
        try:
            await asyncio.to_thread(self.api, path, "DELETE")
        except BrokerRefused:  # 404: gone already
            pass


SERVER_ERRORS: tuple[type[BaseException], ...] = (
    OSError, asyncpg.PostgresError, asyncpg.InterfaceError, BrokerUnavailable)


@dataclass
class Servers:
    """Both servers, checked before each run: up (waiting a while for one that another
    engineer restarts), durable, and their current pids."""

    postgres: Postgres
    rabbitmq: RabbitMQ

    @classmethod
    async def open(cls) -> Servers:
        return cls(await Postgres.open(), await RabbitMQ.open())

    def pids(self) -> tuple[int | None, int | None]:
        return self.postgres.postmaster_pid, self.rabbitmq.beam_pid

    async def ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self.postgres.check()
                await self.rabbitmq.check()
                return
            except SERVER_ERRORS as exc:
                if time.monotonic() > deadline:
                    raise ServersDown(f"a server is still down after {timeout_s:g}s: "
                                      f"{describe(exc)}") from None
                await asyncio.sleep(1)

    async def remove_leftovers(self) -> list[str]:
        """Remove everything the benchmark created; return what could not be removed."""
        failed = []
        for what, remove in (("vhosts", self.rabbitmq.delete_leftovers),
                             ("peer user", self.rabbitmq.delete_peer_user),
                             ("databases", self.postgres.drop_leftovers)):
            try:
                await remove()
            except SERVER_ERRORS as exc:
                failed.append(f"{what}: {describe(exc)}")
        return failed
