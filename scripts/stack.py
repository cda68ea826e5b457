"""The local Vigil stack: PostgreSQL and RabbitMQ as plain processes (no Docker).

Run from the repository root with the project's virtualenv (the Makefile does):

    python -m scripts.stack up     [server...]  start (idempotent) and provision
    python -m scripts.stack down   [server...]  stop; the data is kept
    python -m scripts.stack status [server...]  one line per server (exit 3 if one is down)
    python -m scripts.stack env                 `export VIGIL_...=...` connection settings
    python -m scripts.stack clean  [server...]  down, then delete the data
    python -m scripts.stack psql [args]         psql as the Vigil role (postgres)
    python -m scripts.stack rabbitmqctl [args]  rabbitmqctl against the local node

Servers: `postgres` (the development cluster: fast, not crash-safe), `rabbitmq`, and
`bench-postgres` (a second cluster that commits as production does and records statement
statistics, for `make bench`; its port is bench_db_port()). `up` starts postgres and
rabbitmq unless told otherwise; the other commands cover all three (`status` alone exits
3 only if postgres or rabbitmq is down).

Everything lives in .vigil/ and listens on 127.0.0.1 only. Ports, users, passwords, vhost
and database name are common/config.py's (VIGIL_DB_*, VIGIL_AMQP_*); the servers' own
settings are StackSettings'. `up` creates the RabbitMQ administrator; `vigil broker setup`
(run by `make up`) creates the executor and worker users (common/broker_access.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote

from pydantic import AfterValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.broker import management_api
from common.config import BrokerRole, BrokerSettings, DatabaseSettings
from common.errors import VigilError

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
SUN_PATH_MAX = 107  # the longest Unix socket path: sun_path is 108 bytes with the NUL
LOCK_WAIT_S = 120
ALL_SERVERS = ("postgres", "rabbitmq", "bench-postgres")
UP_BY_DEFAULT = ("postgres", "rabbitmq")


class StackSettings(BaseSettings):
    """The local servers' own settings (VIGIL_STACK_STATE_DIR, ..., ERL_EPMD_PORT): no
    Vigil process needs them to connect."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_")

    stack_state_dir: Annotated[Path, AfterValidator(Path.resolve)] = REPO / ".vigil"
    stack_timeout: int = Field(60, ge=1)  # seconds a server may take to start or stop
    bench_db_port: int = Field(55433, ge=1, le=65535)
    rabbitmq_nodename: str = "vigil@localhost"
    rabbitmq_prometheus_port: int = Field(15692, ge=1, le=65535)
    rabbitmq_dist_port: int = Field(25672, ge=1, le=55525)  # rabbitmqctl's are 10000 above
    epmd_port: int = Field(4369, ge=1, le=65535, validation_alias="ERL_EPMD_PORT")
    pg_os_user: str = "postgres"  # who runs Postgres when we are root
    pg_bin: Path | None = None  # default: /usr/lib/postgresql/15/bin, else the newest
    rabbitmq_prefix: Path = Path("/usr/lib/rabbitmq")


class StackError(Exception):
    """An expected failure: one line on stderr, exit status 1."""


S = TypeVar("S", bound=BaseSettings)


def load(cls: type[S]) -> S:
    """Settings from the environment; a bad value is a StackError naming its variable."""
    try:
        return cls()
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0])
        variable = field if field.isupper() else f"{cls.model_config['env_prefix']}{field}".upper()
        raise StackError(f"{variable}: {error['msg']}") from None


def bench_db_port() -> int:
    """The bench-postgres cluster's port (VIGIL_BENCH_DB_PORT), for the benchmark."""
    return load(StackSettings).bench_db_port


# ----------------------------------------------------------------------------- helpers
def say(message: str) -> None:
    print(f"vigil: {message}", flush=True)


def warn(message: str) -> None:
    print(f"vigil: {message}", file=sys.stderr, flush=True)


def rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def since(began: float) -> str:
    return f"{time.monotonic() - began:.1f}s"


def utc_now() -> str:
    return f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}"


def is_root() -> bool:
    return os.geteuid() == 0


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


def proc_file(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_text(errors="replace")
    except OSError:
        return ""


def pid_alive(pid: int | None) -> bool:
    """Zombies count as dead (in containers PID 1 may never reap orphans)."""
    status = proc_file(pid, "status") if pid else ""
    return bool(status) and not re.search(r"^State:\s*Z", status, re.MULTILINE)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None


def file_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def mark_log(path: Path) -> int:
    """Note a start in a server's log; return the offset of what it writes next."""
    with open(path, "a") as log:
        log.write(f"\n===== {utc_now()} vigil stack up =====\n")
    return file_size(path)


ERROR_LINE = re.compile(r"\[(error|critical|alert|emergency)\]|BOOT FAILED|FATAL|PANIC|ERROR:")


def show_log_tail(label: str, path: Path, offset: int = 0) -> None:
    """Show what a server wrote to `path` since `offset`: its first error lines (the cause
    is usually near the top of a boot failure) and its last lines."""
    if not file_size(path):
        return
    with open(path, "rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    name, out = rel(path), sys.stderr
    if not lines:
        print(f"----- {label}: nothing new in {name} -----", file=out)
        return
    if errors := [line for line in lines if ERROR_LINE.search(line)][:25]:
        print(f"----- first error lines of {name} ({label}) -----", *errors, sep="\n", file=out)
    print(f"----- last 30 lines of {name} ({label}) -----", *lines[-30:],
          f"----- end of {name} -----", sep="\n", file=out)


def run(argv: list[str], timeout: float, *, input: str | None = None, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Run argv: whether it succeeded within `timeout` seconds, and its output."""
    try:
        done = subprocess.run(argv, input=input,
                              stdin=subprocess.DEVNULL if input is None else None,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", cwd=cwd, env=env, timeout=timeout)
    except FileNotFoundError:
        raise StackError(f"{argv[0]} not found; run scripts/install.sh") from None
    except subprocess.TimeoutExpired:
        return False, f"{argv[0]} killed after {timeout:g}s"
    return done.returncode == 0, done.stdout


@contextmanager
def locked(state: Path) -> Iterator[None]:
    """Hold the state dir's lock, so that two commands never start or stop servers at
    once. (The servers do not inherit it: Python's descriptors are not inheritable.)"""
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)  # the postgres OS user must traverse it
    path = state / "stack.lock"
    with open(path, "w") as lock:
        for _ in range(LOCK_WAIT_S * 5):
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.2)
        else:
            raise StackError(f"another stack command is running (lock {rel(path)})")
        yield


# ----------------------------------------------------------------------------- postgres
# The development cluster trades crash safety for speed: its data is disposable.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
# bench-postgres commits as production does, so that benchmarks pay for real commits, and
# records what every statement costs. Its buffers are sized as a production server's
# would be (not the default 128 MB), so that W5's 2M executions are measured in memory.
DURABLE_SETTINGS = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
                    "shared_buffers": "1GB",
                    "shared_preload_libraries": "'pg_stat_statements'",
                    "pg_stat_statements.track": "all"}

PG_HBA = """\
# Generated by scripts/stack.py. Unix socket (0700 dir inside the data area): trust for
# local administration. TCP: loopback only, passwords required.
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  trust
host    all       all   127.0.0.1/32   scram-sha-256
"""

ROLE_AND_DATABASE_SQL = r"""
SELECT format('CREATE ROLE %I', :'db_user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'db_user') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN NOSUPERUSER CREATEDB NOCREATEROLE PASSWORD %L',
              :'db_user', :'db_password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db_name', :'db_user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db_name') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db_name', :'db_user') \gexec
"""

# Run in template1, so that databases created later have it, and in Vigil's database.
STATEMENT_STATS_SQL = r"""
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
SELECT format('GRANT pg_read_all_stats TO %I', :'db_user') \gexec
SELECT format('GRANT EXECUTE ON FUNCTION pg_stat_statements_reset(oid, oid, bigint) TO %I',
              :'db_user') \gexec
"""


def find_pg_bin(override: Path | None) -> Path:
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                       key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)])
    candidates = [override] if override else [Path("/usr/lib/postgresql/15/bin"), *installed[::-1]]
    for candidate in candidates:
        if os.access(candidate / "initdb", os.X_OK):
            return candidate
    raise StackError("PostgreSQL server binaries not found (looked in "
                     f"{override or '/usr/lib/postgresql/*/bin'}); run scripts/install.sh")


def fallback_root(settings: StackSettings) -> Path:
    digest = hashlib.sha256(str(settings.stack_state_dir).encode()).hexdigest()[:12]
    return Path(f"/tmp/vigil-{digest}")


def has_cluster(area: Path) -> bool:
    return file_size(area / "data" / "PG_VERSION") > 0


def conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Postgres:
    """One PostgreSQL cluster, in the state dir unless it cannot be, with the Vigil role."""

    def __init__(self, name: str, port: int, port_variable: str, *, durable: bool,
                 settings: StackSettings, db: DatabaseSettings, creating: bool = False) -> None:
        self.name, self.port, self.port_variable = name, port, port_variable
        self.durable, self.settings, self.db = durable, settings, db
        self.bin = find_pg_bin(settings.pg_bin)
        # Postgres refuses to run as root: as root we run it as an unprivileged OS user,
        # which is also the cluster's bootstrap superuser.
        self.os_user = settings.pg_os_user if is_root() else pwd.getpwuid(os.geteuid()).pw_name
        if creating:
            self.ensure_os_user()
        self.area, self.fallback_reason = self.placement()
        self.data, self.sock = self.area / "data", self.area / "run"
        self.log = self.area / "postgres.log"

    def as_pg(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", self.os_user, "--", *argv] if is_root() else argv

    def os_user_exists(self) -> bool:
        try:
            return bool(pwd.getpwnam(self.os_user))
        except KeyError:
            return False

    def ensure_os_user(self) -> None:
        if is_root() and not self.os_user_exists():
            say(f"{self.name}: creating system user {self.os_user}")
            ok, output = run(["useradd", "--system", "--no-create-home", "--home-dir",
                              "/nonexistent", "--shell", "/usr/sbin/nologin", self.os_user], 60)
            if not ok:
                raise StackError(f"could not create system user {self.os_user}: {output.strip()}")

    def placement(self) -> tuple[Path, str]:
        """state/<name> if the OS user can reach it and the socket path fits in sun_path,
        else /tmp/vigil-<hash of the state dir>/<name>; and why not the first."""
        state = self.settings.stack_state_dir
        preferred, fallback = state / self.name, fallback_root(self.settings) / self.name
        if has_cluster(fallback) and not has_cluster(preferred):
            return fallback, "existing cluster there"
        if len(str(preferred / "run" / f".s.PGSQL.{self.port}")) > SUN_PATH_MAX:
            return fallback, f"socket path under {rel(preferred)} would be too long"
        if (is_root() and self.os_user_exists() and state.is_dir()
                and not run(self.as_pg(["test", "-x", str(state)]), 10)[0]):
            return fallback, f"user {self.os_user} cannot traverse every directory to {state}"
        return preferred, ""

    def own(self, *paths: Path) -> None:
        if is_root():
            for path in paths:
                shutil.chown(path, self.os_user, pwd.getpwnam(self.os_user).pw_gid)

    def prepare_area(self) -> None:
        if self.fallback_reason:
            say(f"{self.name}: using {self.area} ({self.fallback_reason})")
            self.area.parent.mkdir(parents=True, exist_ok=True)
            self.area.parent.chmod(0o755)
        self.sock.mkdir(parents=True, exist_ok=True)
        self.own(self.area, self.sock)
        if is_root() and self.data.is_dir() and self.data.owner() != self.os_user:
            run(["chown", "-R", f"{self.os_user}:", str(self.data)], 300)
        for private in (self.area, self.sock):
            private.chmod(0o700)
        self.log.touch()
        self.own(self.log)

    def pid(self) -> int | None:
        return read_pid(self.data / "postmaster.pid")

    @staticmethod
    def is_postgres(pid: int | None) -> bool:
        # Not `pg_ctl status`: it, like postgres' own lock-file check, takes a zombie for a
        # live server, and a kill -9'd postmaster stays a zombie where PID 1 never reaps.
        return pid_alive(pid) and proc_file(pid or 0, "comm").strip() == "postgres"

    def running(self) -> bool:
        return has_cluster(self.area) and self.is_postgres(self.pid())

    def clear_stale_locks(self) -> None:
        """After a crash (kill -9), lock files naming a dead or zombie pid would make
        postgres refuse to start."""
        for lock in [self.data / "postmaster.pid", *self.sock.glob(".s.PGSQL.*.lock")]:
            if lock.is_file() and not self.is_postgres(pid := read_pid(lock)):
                say(f"{self.name}: removing stale {rel(lock)} (pid {pid or '?'} is gone)")
                lock.unlink()

    def write_conf(self) -> None:
        """Regenerated on every `up`, so that port changes apply; postgresql.conf includes
        it."""
        settings = {"listen_addresses": conf_quote(LOOPBACK), "port": str(self.port),
                    "unix_socket_directories": conf_quote(str(self.sock)),
                    "max_connections": "300",
                    **(DURABLE_SETTINGS if self.durable else FAST_SETTINGS),
                    "logging_collector": "off", "log_line_prefix": "'%m [%p] %q%u@%d '",
                    "log_timezone": "'UTC'", "timezone": "'UTC'"}
        conf, hba = self.data / "vigil.conf", self.data / "pg_hba.conf"
        conf.write_text("# Generated by scripts/stack.py on every `up`: edit it, not this file.\n"
                        + "".join(f"{key} = {value}\n" for key, value in settings.items()))
        hba.write_text(PG_HBA)
        self.own(conf, hba)
        conf.chmod(0o600)
        hba.chmod(0o600)
        include = "include_if_exists = 'vigil.conf'"
        if include not in (self.data / "postgresql.conf").read_text().splitlines():
            with open(self.data / "postgresql.conf", "a") as main_conf:
                main_conf.write(f"\n# Vigil local stack settings\n{include}\n")

    def initdb(self) -> None:
        shutil.rmtree(self.data, ignore_errors=True)  # a partial initdb: start over
        say(f"{self.name}: initdb {rel(self.data)} (superuser role: {self.os_user})")
        ok, output = run(self.as_pg([
            str(self.bin / "initdb"), "-D", str(self.data), "-U", self.os_user,
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale",
            "--no-sync"]), 300, cwd=self.area)
        (self.area / "initdb.log").write_text(output)
        if not ok:
            show_log_tail("initdb", self.area / "initdb.log")
            raise StackError(f"{self.name}: initdb failed")

    def pg_ctl(self, *args: str, timeout: int) -> bool:
        argv = [str(self.bin / "pg_ctl"), "-D", str(self.data), *args, "-w", "-t", str(timeout)]
        return run(self.as_pg(argv), timeout + 10, cwd=Path("/"))[0]  # the OS user can enter /

    def start(self) -> None:
        if not has_cluster(self.area):
            self.initdb()
        self.clear_stale_locks()
        self.write_conf()
        if port_open(self.port):
            raise StackError(f"{self.name}: port {LOOPBACK}:{self.port} is already in use by "
                             f"another process (set {self.port_variable})")
        say(f"{self.name}: starting on {LOOPBACK}:{self.port} (data {rel(self.data)})")
        offset = mark_log(self.log)
        timeout = self.settings.stack_timeout
        if not self.pg_ctl("-l", str(self.log), "start", timeout=timeout):
            self.pg_ctl("-m", "immediate", "stop", timeout=10)
            show_log_tail(self.name, self.log, offset)
            raise StackError(f"{self.name}: did not come up within {timeout}s")

    def psql_admin(self, database: str, sql: str) -> None:
        """Run SQL as the bootstrap superuser, over the Unix socket."""
        ok, output = run([
            str(self.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.sock),
            "-p", str(self.port), "-U", self.os_user, "-d", database,
            "-v", f"db_user={self.db.user}", "-v", f"db_name={self.db.name}",
            "-v", f"db_password={self.db.password.get_secret_value()}"], 60, input=sql)
        if not ok:
            print(output, file=sys.stderr)
            raise StackError(f"{self.name}: could not provision database {database}")

    def provision(self) -> None:
        if self.db.user == self.os_user:
            raise StackError(f"VIGIL_DB_USER must not be the bootstrap superuser ({self.os_user})")
        self.psql_admin("postgres", ROLE_AND_DATABASE_SQL)
        if self.durable:
            for database in ("template1", self.db.name):
                self.psql_admin(database, STATEMENT_STATS_SQL)

    def up(self) -> None:
        began = time.monotonic()
        self.prepare_area()
        if self.running():
            self.write_conf()
            say(f"{self.name}: already running (pid {self.pid()}) on {LOOPBACK}:{self.port}")
        else:
            self.start()
        self.provision()
        say(f"{self.name}: ready (pid {self.pid()}) postgresql://{self.db.user}@{LOOPBACK}:"
            f"{self.port}/{self.db.name} [{since(began)}]")

    def down(self) -> None:
        if not self.running():
            say(f"{self.name}: not running")
            return
        say(f"{self.name}: stopping (pid {self.pid()})")
        if not self.pg_ctl("-m", "fast", "stop", timeout=self.settings.stack_timeout):
            warn(f"{self.name}: fast shutdown timed out, using immediate")
            self.pg_ctl("-m", "immediate", "stop", timeout=10)
        say(f"{self.name}: stopped")

    def status(self) -> bool:
        if running := self.running():
            tcp = "accepting TCP" if port_open(self.port) else "NOT accepting TCP"
            say(f"{self.name}: running (pid {self.pid()}) {LOOPBACK}:{self.port} {tcp}, "
                f"data {rel(self.data)}")
        elif has_cluster(self.area):
            say(f"{self.name}: stopped (data {rel(self.data)})")
        else:
            say(f"{self.name}: not initialized")
        return running


# ----------------------------------------------------------------------------- rabbitmq
# What rabbitmq-server would otherwise take from the caller's environment.
FOREIGN_RABBITMQ_VARIABLES = ("RABBITMQ_NODE_IP_ADDRESS", "RABBITMQ_NODE_PORT",
                              "RABBITMQ_USE_LONGNAME", "RABBITMQ_ERLANG_COOKIE")
# The node's files, under .vigil/rabbitmq. HOME holds the Erlang cookie.
RABBITMQ_PATHS = {
    "HOME": "home", "RABBITMQ_CONF_ENV_FILE": "rabbitmq-env.conf",
    "RABBITMQ_CONFIG_FILE": "rabbitmq.conf", "RABBITMQ_CONFIG_FILES": "conf.d",
    "RABBITMQ_ADVANCED_CONFIG_FILE": "advanced.config",
    "RABBITMQ_ENABLED_PLUGINS_FILE": "enabled_plugins", "RABBITMQ_MNESIA_BASE": "mnesia",
    "RABBITMQ_LOG_BASE": "log", "RABBITMQ_LOGS": "log/rabbit.log",
    "RABBITMQ_PID_FILE": "rabbitmq.pid",
}
LOOPBACK_DISTRIBUTION = "-kernel inet_dist_use_interface {127,0,0,1}"


class RabbitMQ:
    """A RabbitMQ node of our own (name, cookie, ports), with its administrator."""

    name = "rabbitmq"

    def __init__(self, settings: StackSettings, amqp: BrokerSettings) -> None:
        self.settings, self.amqp = settings, amqp
        self.node, self.bin = settings.rabbitmq_nodename, settings.rabbitmq_prefix / "bin"
        self.area = base = settings.stack_state_dir / "rabbitmq"
        self.log, self.console = base / "log" / "rabbit.log", base / "log" / "console.out"
        self.pid_file, self.launcher_pid_file = base / "rabbitmq.pid", base / "launcher.pid"
        self.epmd_mark = base / "epmd.started-by-vigil"
        self.management_url = f"http://{LOOPBACK}:{amqp.management_port}"

    def env(self) -> dict[str, str]:
        """rabbitmq-server's and rabbitmqctl's: they must agree on the node name, HOME (for
        the Erlang cookie) and the epmd port. Nothing is read from /etc/rabbitmq."""
        dist = self.settings.rabbitmq_dist_port
        return {**{k: v for k, v in os.environ.items() if k not in FOREIGN_RABBITMQ_VARIABLES},
                **{k: str(self.area / path) for k, path in RABBITMQ_PATHS.items()},
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_DIST_PORT": str(dist),
                "RABBITMQ_CTL_DIST_PORT_MIN": str(dist + 10000),
                "RABBITMQ_CTL_DIST_PORT_MAX": str(dist + 10010),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": LOOPBACK_DISTRIBUTION,
                "RABBITMQ_CTL_ERL_ARGS": LOOPBACK_DISTRIBUTION,
                "ERL_EPMD_ADDRESS": LOOPBACK,
                "ERL_EPMD_PORT": str(self.settings.epmd_port)}

    def check_installed(self) -> None:
        if not all(os.access(self.bin / b, os.X_OK) for b in ("rabbitmq-server", "rabbitmqctl")):
            raise StackError(f"RabbitMQ not found in {self.bin}; run scripts/install.sh")

    def ctl(self, *args: str, timeout: float = 60, doing: str = "") -> tuple[bool, str]:
        """rabbitmqctl against our node; failing to do what `doing` says is an error."""
        ok, output = run([str(self.bin / "rabbitmqctl"), "-n", self.node, *args], timeout,
                         cwd=self.area, env=self.env())
        if doing and not ok:
            print(output, file=sys.stderr)
            raise StackError(f"rabbitmq: could not {doing}")
        return ok, output

    def api(self, doing: str, path: str, *, method: str = "GET", body: Any = None) -> Any:
        try:
            return management_api(self.amqp, path, method=method, body=body)
        except VigilError as exc:
            raise StackError(f"rabbitmq: could not {doing}: {exc}") from None

    def pid(self) -> int | None:
        pid = read_pid(self.pid_file)
        return pid if pid_alive(pid) and "beam" in proc_file(pid or 0, "cmdline") else None

    def launcher_pid(self) -> int | None:
        pid = read_pid(self.launcher_pid_file)
        return pid if pid_alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None or self.launcher_pid() is not None

    def epmd(self, *args: str) -> str:
        return run(["epmd", "-port", str(self.settings.epmd_port), *args], 10)[1]

    def epmd_names(self) -> list[str]:
        return re.findall(r"^name (\S+) at port", self.epmd("-names"), re.MULTILINE)

    def write_conf(self) -> None:
        for directory in ("log", "home", "mnesia", "conf.d"):
            (self.area / directory).mkdir(parents=True, exist_ok=True)
        (self.area / "home").chmod(0o700)
        (self.area / "rabbitmq-env.conf").write_text("")
        shutil.copyfile(REPO / "rabbitmq" / "enabled_plugins", self.area / "enabled_plugins")
        s = self.settings
        (self.area / "rabbitmq.conf").write_text(f"""\
## Generated by scripts/stack.py from rabbitmq/rabbitmq.conf + local overrides.
## Do not edit: regenerated on every `up`.

{(REPO / "rabbitmq" / "rabbitmq.conf").read_text()}
## ---------------------------------------------------------------------------
## Local overrides (scripts/stack.py). In the new-style format the last
## occurrence of a key wins, so these replace the committed values above.
listeners.tcp.default = {LOOPBACK}:{self.amqp.port}
management.tcp.ip = {LOOPBACK}
management.tcp.port = {self.amqp.management_port}
prometheus.tcp.ip = {LOOPBACK}
prometheus.tcp.port = {s.rabbitmq_prometheus_port}
distribution.listener.interface = {LOOPBACK}
distribution.listener.port_range.min = {s.rabbitmq_dist_port}
distribution.listener.port_range.max = {s.rabbitmq_dist_port}
event_exchange.vhost = {self.amqp.event_vhost}
definitions.import_backend = local_filesystem
definitions.local.path = {REPO}/rabbitmq/definitions.json
## the local node logs to {self.log} only (console.out keeps early boot errors)
log.console = false
""")

    def check_free(self) -> None:
        s = self.settings
        for port, variable in ((self.amqp.port, "VIGIL_AMQP_PORT"),
                               (self.amqp.management_port, "VIGIL_AMQP_MANAGEMENT_PORT"),
                               (s.rabbitmq_prometheus_port, "VIGIL_RABBITMQ_PROMETHEUS_PORT"),
                               (s.rabbitmq_dist_port, "VIGIL_RABBITMQ_DIST_PORT")):
            if port_open(port):
                raise StackError(f"rabbitmq: port {LOOPBACK}:{port} is already in use by "
                                 f"another process (set {variable})")
        if (short_name := self.node.split("@")[0]) in self.epmd_names():
            raise StackError(f"rabbitmq: a node named {short_name} is already registered in "
                             f"epmd :{s.epmd_port} but is not ours (no live pid in "
                             f"{rel(self.pid_file)}); stop it or set VIGIL_RABBITMQ_NODENAME")

    def start(self) -> None:
        self.write_conf()
        self.check_free()
        # Remember whether our node is the one starting epmd (an existing mark means an
        # earlier start of ours left it running).
        if not port_open(self.settings.epmd_port):
            self.epmd_mark.write_text(f"{utc_now()}\n")
        self.pid_file.unlink(missing_ok=True)
        mark_log(self.console)
        say(f"rabbitmq: starting node {self.node} (amqp {LOOPBACK}:{self.amqp.port}, "
            f"management :{self.amqp.management_port}, data {rel(self.area)})")
        with open(self.console, "ab") as console:
            # A session of its own: the node outlives us and ignores the terminal's signals.
            launcher = subprocess.Popen(
                [str(self.bin / "rabbitmq-server")], stdin=subprocess.DEVNULL, stdout=console,
                stderr=subprocess.STDOUT, cwd=self.area, env=self.env(), start_new_session=True)
        self.launcher_pid_file.write_text(f"{launcher.pid}\n")

    def wait_ready(self, deadline: float) -> Literal["ready", "died", "timeout"]:
        while time.monotonic() < deadline:
            if not self.running():
                return "died"
            wait = min(max(int(deadline - time.monotonic()), 1), 10)
            if self.ctl("-q", "await_startup", "--timeout", str(wait), timeout=wait + 10)[0]:
                return "ready"
            time.sleep(0.5)
        return "timeout"

    def wait_http(self, deadline: float) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            try:  # the UI's static page answers without credentials
                with opener.open(f"{self.management_url}/", timeout=5):
                    return True
            except OSError:
                time.sleep(0.3)
        return False

    def provision(self) -> None:
        """The administrator, through rabbitmqctl (Erlang distribution: no HTTP credentials
        exist yet), then its vhost through the management API. `vigil broker setup` (run by
        `make up`) makes the executor and worker users, whose permissions it holds."""
        admin = self.amqp.login(BrokerRole.ADMIN)
        password = admin.password.get_secret_value()
        users = self.ctl("-s", "list_users", doing="list users")[1]
        tags = dict(line.split("\t", 1) for line in users.splitlines() if "\t" in line)
        if admin.user not in tags:
            self.ctl("-q", "add_user", admin.user, password, doing="create the admin user")
        if "administrator" not in tags.get(admin.user, ""):
            self.ctl("-q", "set_user_tags", admin.user, "administrator",
                     doing="tag the admin user")
        try:
            management_api(self.amqp, "whoami")
        except VigilError:  # 401: its password was changed
            self.ctl("-q", "change_password", admin.user, password,
                     doing="reset the admin password")
            self.api("use the management API as the admin user", "whoami")
        vhost = quote(self.amqp.vhost, safe="")
        self.api(f"ensure vhost {self.amqp.vhost}", f"vhosts/{vhost}", method="PUT", body={})
        self.api(f"grant {admin.user} on vhost {self.amqp.vhost}",
                 f"permissions/{vhost}/{quote(admin.user, safe='')}", method="PUT",
                 body={"configure": ".*", "write": ".*", "read": ".*"})
        if admin.user != "guest":
            try:
                if any(user["name"] == "guest" for user in management_api(self.amqp, "users")):
                    management_api(self.amqp, "users/guest", method="DELETE")
            except VigilError as exc:
                warn(f"rabbitmq: could not delete guest ({exc})")

    def up(self) -> None:
        began = time.monotonic()
        self.check_installed()
        (self.area / "log").mkdir(parents=True, exist_ok=True)
        offsets = file_size(self.console), file_size(self.log)
        if was_running := self.running():
            say(f"rabbitmq: already running (pid {self.pid()}) node {self.node}")
        else:
            self.start()
        timeout = self.settings.stack_timeout
        deadline = time.monotonic() + timeout
        if (state := self.wait_ready(deadline)) != "ready":
            if state == "died" or not was_running:
                self.kill()
                self.after_stop()
            raise self.fail("node exited during startup" if state == "died"
                            else f"did not come up within {timeout}s", offsets)
        if not self.wait_http(deadline):
            raise self.fail(f"management API did not answer on {self.management_url}", offsets)
        self.provision()
        if was_running:
            # Apply edits of rabbitmq/definitions.json without a restart (the boot import
            # covers fresh starts).
            self.api("import rabbitmq/definitions.json", "definitions", method="POST",
                     body=json.loads((REPO / "rabbitmq" / "definitions.json").read_text()))
        say(f"rabbitmq: ready (pid {self.pid()}) amqp://{LOOPBACK}:{self.amqp.port}/"
            f"{self.amqp.vhost}, management {self.management_url} [{since(began)}]")

    def fail(self, message: str, offsets: tuple[int, int]) -> StackError:
        show_log_tail("rabbitmq console", self.console, offsets[0])
        show_log_tail("rabbitmq", self.log, offsets[1])
        return StackError(f"rabbitmq: {message}")

    def kill(self) -> None:
        """The last resort: TERM, then KILL, our node and its launcher."""
        pids = [pid for pid in (self.pid(), self.launcher_pid()) if pid is not None]
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 15
            while any(map(pid_alive, pids)) and time.monotonic() < deadline:
                time.sleep(0.2)
        self.pid_file.unlink(missing_ok=True)

    def after_stop(self) -> None:
        """Forget the launcher. epmd is started by the first Erlang node: stop it only if
        our node started it and no other node is registered with it any more."""
        self.launcher_pid_file.unlink(missing_ok=True)
        if self.epmd_mark.exists() and port_open(self.settings.epmd_port):
            if self.epmd_names():
                return  # still in use by another node: keep the mark, try again next time
            self.epmd("-kill")
        self.epmd_mark.unlink(missing_ok=True)

    def down(self) -> None:
        if self.running():
            pid = self.pid()
            say(f"rabbitmq: stopping node {self.node} (pid {pid or '?'})")
            # `stop <pid_file>` returns once the OS process has exited.
            timeout = self.settings.stack_timeout
            if not (pid and self.ctl("-q", "stop", str(self.pid_file), timeout=timeout)[0]):
                warn("rabbitmq: rabbitmqctl stop failed or timed out; sending SIGTERM")
                self.kill()
            deadline = time.monotonic() + 15
            while self.launcher_pid() is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            say("rabbitmq: stopped")
        else:
            say("rabbitmq: not running")
        self.after_stop()

    def status(self) -> bool:
        if not os.access(self.bin / "rabbitmq-server", os.X_OK):
            say("rabbitmq: not installed (run scripts/install.sh)")
        elif (pid := self.pid()) is not None:
            amqp = "amqp " + ("up" if port_open(self.amqp.port) else "DOWN")
            http = "management " + ("up" if port_open(self.amqp.management_port) else "DOWN")
            say(f"rabbitmq: running (pid {pid}) node {self.node} {LOOPBACK}:{self.amqp.port} "
                f"{amqp}, {self.management_url} {http}")
            return True
        elif (launcher := self.launcher_pid()) is not None:
            say(f"rabbitmq: starting (launcher pid {launcher})")
        elif (self.area / "mnesia").is_dir():
            say(f"rabbitmq: stopped (data {rel(self.area)})")
        else:
            say("rabbitmq: not initialized")
        return False


# ----------------------------------------------------------------------------- commands
def server(name: str, settings: StackSettings, *, creating: bool = False) -> Postgres | RabbitMQ:
    if name == "rabbitmq":
        return RabbitMQ(settings, load(BrokerSettings))
    db = load(DatabaseSettings)
    port, variable = ((db.port, "VIGIL_DB_PORT") if name == "postgres"
                      else (settings.bench_db_port, "VIGIL_BENCH_DB_PORT"))
    return Postgres(name, port, variable, durable=name == "bench-postgres", settings=settings,
                    db=db, creating=creating)


def server_names(args: list[str], default: tuple[str, ...]) -> list[str]:
    names = args or list(default)
    if unknown := [name for name in names if name not in ALL_SERVERS]:
        raise StackError(f"unknown server {unknown[0]!r} (expected {', '.join(ALL_SERVERS)})")
    return names


def cmd_up(args: list[str]) -> int:
    began, names = time.monotonic(), server_names(args, UP_BY_DEFAULT)
    settings = load(StackSettings)
    with locked(settings.stack_state_dir):
        for name in names:
            server(name, settings, creating=True).up()
    say(f"stack up ({' '.join(names)}) in {since(began)}")
    return 0


def cmd_down(args: list[str]) -> int:
    began, names = time.monotonic(), server_names(args, ALL_SERVERS)
    settings = load(StackSettings)
    if not settings.stack_state_dir.is_dir():
        say(f"nothing to stop (no {rel(settings.stack_state_dir)})")
        return 0
    with locked(settings.stack_state_dir):
        for name in reversed(names):  # in the reverse order of `up`
            server(name, settings).down()
    say(f"stack down in {since(began)}")
    return 0


def cmd_status(args: list[str]) -> int:
    names, settings = server_names(args, ALL_SERVERS), load(StackSettings)
    stopped = {name for name in names if not server(name, settings).status()}
    return 3 if stopped & set(names if args else UP_BY_DEFAULT) else 0


def cmd_clean(args: list[str]) -> int:
    names, settings = server_names(args, ALL_SERVERS), load(StackSettings)
    state = settings.stack_state_dir
    with locked(state):
        servers = [server(name, settings) for name in names]
        for each in reversed(servers):
            each.down()
        for each in servers:
            if each.area.exists():
                shutil.rmtree(each.area)
                say(f"{each.name}: removed {rel(each.area)}")
        if not args:  # and everything else there (demo logs, the lock)
            shutil.rmtree(state)
            shutil.rmtree(fallback_root(settings), ignore_errors=True)
            say(f"removed {rel(state)}")
    return 0


def cmd_env(args: list[str]) -> int:
    db, amqp, settings = load(DatabaseSettings), load(BrokerSettings), load(StackSettings)
    password = db.password.get_secret_value()
    values: dict[str, object] = {
        "VIGIL_DB_HOST": db.host, "VIGIL_DB_PORT": db.port, "VIGIL_DB_USER": db.user,
        "VIGIL_DB_PASSWORD": password, "VIGIL_DB_NAME": db.name,
        "VIGIL_DATABASE_URL": f"postgresql://{quote(db.user, safe='')}:"
                              f"{quote(password, safe='')}@{db.address}/{quote(db.name, safe='')}",
        "VIGIL_AMQP_HOST": amqp.host, "VIGIL_AMQP_PORT": amqp.port,
        "VIGIL_AMQP_VHOST": amqp.vhost, "VIGIL_AMQP_EVENT_VHOST": amqp.event_vhost,
    }
    for role in BrokerRole:
        login = amqp.login(role)
        values[f"VIGIL_AMQP_{role.upper()}_USER"] = login.user
        values[f"VIGIL_AMQP_{role.upper()}_PASSWORD"] = login.password.get_secret_value()
    values.update({
        "VIGIL_AMQP_MANAGEMENT_PORT": amqp.management_port,
        "VIGIL_AMQP_MANAGEMENT_URL": f"http://{amqp.host}:{amqp.management_port}",
        "VIGIL_RABBITMQ_PROMETHEUS_PORT": settings.rabbitmq_prometheus_port,
        "VIGIL_RABBITMQ_DIST_PORT": settings.rabbitmq_dist_port,
        "VIGIL_RABBITMQ_NODENAME": settings.rabbitmq_nodename,
        "VIGIL_BENCH_DB_PORT": settings.bench_db_port,
        "VIGIL_STACK_STATE_DIR": settings.stack_state_dir,
    })
    for key, value in values.items():
        print(f"export {key}={shlex.quote(str(value))}")
    return 0


def cmd_psql(args: list[str]) -> int:
    db = load(DatabaseSettings)
    psql = str(find_pg_bin(load(StackSettings).pg_bin) / "psql")
    os.execve(psql, [psql, "-h", LOOPBACK, "-p", str(db.port), "-U", db.user, "-d", db.name,
                     *args], {**os.environ, "PGPASSWORD": db.password.get_secret_value()})


def cmd_rabbitmqctl(args: list[str]) -> int:
    rabbitmq = RabbitMQ(load(StackSettings), load(BrokerSettings))
    rabbitmq.check_installed()
    ctl = str(rabbitmq.bin / "rabbitmqctl")
    os.execve(ctl, [ctl, "-n", rabbitmq.node, *args], rabbitmq.env())


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "up": cmd_up, "down": cmd_down, "status": cmd_status, "env": cmd_env, "clean": cmd_clean,
    "psql": cmd_psql, "rabbitmqctl": cmd_rabbitmqctl, "ctl": cmd_rabbitmqctl,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        wanted = argv[:1] in (["-h"], ["--help"], ["help"])
        print(__doc__, file=sys.stdout if wanted else sys.stderr)
        return 0 if wanted else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except StackError as exc:
        print(f"vigil: ERROR: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
