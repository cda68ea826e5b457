"""compose/ checked without Docker: every command in the compose file is parsed by the
real CLI, every VIGIL_* variable is a real setting with a valid value, each container
gets the broker logins of its own role and no other, and the Prometheus configuration and
alert rules pass promtool (Debian's prometheus package, installed by
scripts/install.sh)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import typer.main
import yaml
from prometheus_client import REGISTRY

import common.metrics  # noqa: F401  (registers Vigil's metrics)
import services.cli.app
import services.executor.main
import services.worker.main
from common import config
from common.config import BrokerRole, WorkerSettings
from services.cli.app import app
from tests.harness import REPO

COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
METRICS_PORT = 9100
RUNBOOK_ANCHORS = {
    "stalled-loop", "worker-lost", "dead-letters", "stuck-executions", "publish-failures",
    "target-down", "memory-pressure", "schedule-stuck", "poison-pills",
}

SETTING_NAMES = {
    c.model_config["env_prefix"].upper() + field.upper()
    for c in config.ALL_SETTINGS for field in c.model_fields
} | {"VIGIL_SECRETS_DIR"}  # read by common/config.py itself: where secret files live


# The broker logins, one per role: VIGIL_AMQP_<ROLE>_USER and VIGIL_AMQP_<ROLE>_PASSWORD.
LOGIN_VARS = {
    role: {f"VIGIL_AMQP_{role.upper()}_USER", f"VIGIL_AMQP_{role.upper()}_PASSWORD"}
    for role in BrokerRole
}
# Least privilege: the broker logins each service's container gets, and no more.
BROKER_ROLES: dict[str, set[BrokerRole]] = {
    "rabbitmq-users": {BrokerRole.ADMIN},  # creates the administrator
    "migrate": set(BrokerRole),  # `broker setup`: as the admin, sets the others' passwords
    "executor": {BrokerRole.EXECUTOR},
    "worker-shell": {BrokerRole.WORKER},
    "worker-python": {BrokerRole.WORKER},
    "cli": set(BrokerRole),  # the operator's tool: `broker setup` and the rest
}
# The logins a `vigil` command uses (the cli service may run any of them).
COMMAND_ROLES: dict[tuple[str, ...], set[BrokerRole]] = {
    ("db", "migrate"): set(),
    ("broker", "setup"): set(BrokerRole),
    ("executor",): {BrokerRole.EXECUTOR},
    ("worker",): {BrokerRole.WORKER},
}

# ${VAR...} as compose interpolates it ($${VAR} is a literal for the container's shell).
INTERPOLATED = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and key and key == key.strip() and " " not in key, \
            f"{path.name}:{n}: not KEY=VALUE: {line!r}"
        env[key] = value
    return env


# Fixed by rabbitmq/: the vhost of definitions.json, and event_exchange.vhost.
RABBITMQ_VHOST = "vigil"
RABBITMQ_EVENT_VHOST = "vigil"


COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
ENV_EXAMPLE_VARS = read_env_file(ENV_EXAMPLE)


def is_vigil(service: dict[str, Any]) -> bool:
    return isinstance(service.get("build"), dict)


VIGIL_SERVICES = sorted(name for name, s in SERVICES.items() if is_vigil(s))
ONE_SHOT = sorted(name for name, s in SERVICES.items() if s.get("restart") == "no")

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$\$")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$, as `docker compose` does."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if op in (":?", "?"):
            assert env.get(name), f"compose would stop: {name} unset ({arg})"
        if not env.get(name) and op in (":-", "-"):
            return arg
        return env.get(name, "")

    return _VAR.sub(sub, value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    """The environment a service's container gets, with .env.example as compose/.env (which
    compose only interpolates: no service has an env_file, see
    test_no_service_reads_the_env_file_whole)."""
    declared = service.get("environment") or {}
    if isinstance(declared, list):
        declared = dict(item.split("=", 1) for item in declared)
    return {k: interpolate(str(v), ENV_EXAMPLE_VARS) for k, v in declared.items()}


def broker_logins(env: dict[str, str]) -> set[str]:
    """The broker login variables (users and passwords of any role) in env."""
    return {k for k in env if k.startswith("VIGIL_AMQP_") and k.endswith(("_USER", "_PASSWORD"))}


def assert_logins(broker_settings: config.BrokerSettings, roles: set[BrokerRole]) -> None:
    """broker_settings carries .env.example's login for each of roles."""
    for role in roles:
        login = broker_settings.login(role)
        assert (login.user, login.password.get_secret_value()) == (
            ENV_EXAMPLE_VARS[f"VIGIL_AMQP_{role.upper()}_USER"],
            ENV_EXAMPLE_VARS[f"VIGIL_AMQP_{role.upper()}_PASSWORD"]), role


def dockerfile_entrypoint() -> list[str]:
    [line] = [ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("ENTRYPOINT")]
    return yaml.safe_load(line.removeprefix("ENTRYPOINT"))


def vigil_invocations(service: dict[str, Any]) -> list[list[str]]:
    """The `vigil ...` argument lists a Vigil service runs (no `vigil` in front)."""
    command = service.get("command")
    entrypoint = service.get("entrypoint", dockerfile_entrypoint())
    if entrypoint[:2] == ["sh", "-c"]:
        [script] = entrypoint[2:] + (command or [])
        runs = []
        for step in script.split("&&"):
            argv = shlex.split(step)
            assert argv[0] == "vigil", f"not a vigil command: {step!r}"
            runs.append(argv[1:])
        return runs
    assert entrypoint == ["vigil"], entrypoint
    assert command is None or isinstance(command, list), "use the list form of command"
    return [command or []]


def parse_cli(args: list[str]) -> tuple[list[str], click.Context]:
    """Parse args as the real `vigil` CLI does: the command path and its context (with
    the parsed parameters). Raises click's UsageError for an unknown command or flag or a
    bad value."""
    cmd: click.Command = typer.main.get_command(app)
    parent: click.Context | None = None
    path: list[str] = []
    rest = list(args)
    while isinstance(cmd, click.Group):
        if not rest:
            raise click.UsageError(f"`vigil {' '.join(path)}` needs a command")
        parent = click.Context(cmd, info_name=" ".join(["vigil", *path]), parent=parent)
        name, rest = rest[0], rest[1:]
        sub = cmd.get_command(parent, name)
        if sub is None:
            raise click.UsageError(f"no such command {name!r} in `vigil {' '.join(path)}`")
        path.append(name)
        cmd = sub
    ctx = cmd.make_context(path[-1], rest, parent=parent, resilient_parsing=False)
    return path, ctx


@pytest.fixture
def compose_env(monkeypatch: pytest.MonkeyPatch):
    """Replace the test process's VIGIL_* variables with a service's compose environment."""

    def use(service: dict[str, Any]) -> dict[str, str]:
        for key in [k for k in os.environ if k.startswith("VIGIL_")]:
            monkeypatch.delenv(key)
        env = environment(service)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return env

    return use


@pytest.fixture
def run_service(monkeypatch: pytest.MonkeyPatch):
    """Run `vigil executor|worker ARGS` through the real command, up to the point where it
    would start the service: returns (service settings, database, broker settings) as
    services/cli/app.py built them from the flags and the environment."""

    def run(args: list[str]) -> tuple[Any, ...]:
        started: list[tuple[Any, ...]] = []
        monkeypatch.setattr(services.executor.main, "run_executor",
                            lambda *a: started.append(a))
        monkeypatch.setattr(services.worker.main, "run_worker", lambda *a: started.append(a))
        # The compose file names hosts that only its network knows: no database to check.
        monkeypatch.setattr(services.cli.app, "check_database", lambda: None)
        path, ctx = parse_cli(args)
        assert path in (["executor"], ["worker"]), path
        try:
            with ctx:
                ctx.command.invoke(ctx)
        except click.exceptions.Exit as exc:
            pytest.fail(f"`vigil {shlex.join(args)}` would exit {exc.exit_code}")
        [(settings, db_settings, broker_settings, _log_level)] = started
        for module in getattr(settings, "action_modules", []):
            if importlib.util.find_spec(module) is None:
                pytest.fail(f"`vigil {shlex.join(args)}`: no module {module} to load")
        return settings, db_settings, broker_settings

    return run


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---- the compose file ------------------------------------------------------------------


def test_compose_file_is_the_spec_format_with_the_expected_services():
    assert "version" not in COMPOSE, "the compose spec has no version key"
    assert set(SERVICES) == {
        "postgres", "rabbitmq", "rabbitmq-users", "migrate", "executor", "worker-shell",
        "worker-python", "prometheus", "cli",
    }
    assert SERVICES["postgres"]["image"] == "postgres:15"
    assert SERVICES["rabbitmq"]["image"] == "rabbitmq:3.10-management"
    assert SERVICES["prometheus"]["image"].startswith("prom/prometheus:")
    assert VIGIL_SERVICES == ["cli", "executor", "migrate", "worker-python", "worker-shell"]
    assert ONE_SHOT == ["cli", "migrate", "rabbitmq-users"]
    assert SERVICES["cli"]["profiles"] == ["tools"], "`up` must not start the cli service"


@pytest.mark.parametrize("name", VIGIL_SERVICES)
def test_every_vigil_service_builds_from_the_one_dockerfile(name):
    service = SERVICES[name]
    build = service["build"]
    assert (COMPOSE_DIR / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).resolve() == DOCKERFILE
    assert service["image"] == "vigil:local"
    assert service.get("init") is True, "tini as PID 1 forwards SIGTERM and reaps orphans"


def test_the_dockerfile_installs_the_repo_on_python_311_slim_with_vigil_as_entrypoint():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^RUN pip install \. ", text, re.M)
    assert dockerfile_entrypoint() == ["vigil"]
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for part in src.split():
            assert (REPO / part).exists(), f"COPY {part}: not in the repo"
    rules = [ln.strip() for ln in
             (COMPOSE_DIR / "Dockerfile.dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*", "the build context starts from nothing"
    assert not [r for r in rules if r.startswith("!") and ("compose" in r or ".env" in r)], \
        "the build context must not include compose/.env"


@pytest.mark.parametrize("name", VIGIL_SERVICES)
def test_every_vigil_command_parses_with_the_real_cli_and_settings(
    name, compose_env, run_service
):
    service = SERVICES[name]
    env = compose_env(service)
    runs = vigil_invocations(service)
    if name == "cli":
        assert runs == [[]], "the cli service takes its command from `docker compose run`"
        assert_logins(config.BrokerSettings(), BROKER_ROLES[name])
        return
    needed: set[BrokerRole] = set()
    for args in runs:
        path, _ = parse_cli(args)
        if path in (["executor"], ["worker"]):
            _, db_settings, broker_settings = run_service(args)
        else:  # these would connect at once: their settings are built the same way
            db_settings, broker_settings = config.DatabaseSettings(), config.BrokerSettings()
        assert (db_settings.host, db_settings.port) == ("postgres", 5432)
        assert (broker_settings.host, broker_settings.port) == ("rabbitmq", 5672)
        assert db_settings.password.get_secret_value() == ENV_EXAMPLE_VARS["VIGIL_DB_PASSWORD"]
        roles = COMMAND_ROLES[tuple(path)]
        assert_logins(broker_settings, roles)
        needed |= roles
    assert needed == BROKER_ROLES[name], \
        f"{name}: its commands log in as {sorted(needed)}, not {sorted(BROKER_ROLES[name])}"
    assert broker_logins(env) == set().union(*(LOGIN_VARS[r] for r in needed))


def test_the_services_run_what_the_deployment_needs(compose_env, run_service):
    assert [parse_cli(a)[0] for a in vigil_invocations(SERVICES["migrate"])] == [
        ["db", "migrate"], ["broker", "setup"]]
    compose_env(SERVICES["executor"])
    executor, _, _ = run_service(vigil_invocations(SERVICES["executor"])[0])
    assert executor.metrics_port == METRICS_PORT
    for name, runtimes in [("worker-shell", ["shell"]), ("worker-python", ["python"])]:
        compose_env(SERVICES[name])
        worker, _, _ = run_service(vigil_invocations(SERVICES[name])[0])
        assert (worker.runtimes, worker.capacity, worker.metrics_port) == (
            runtimes, 4, METRICS_PORT)
        assert worker.action_modules == ["examples.actions"]


def test_a_bad_command_flag_or_value_would_be_caught(compose_env, run_service):
    with pytest.raises(click.UsageError):
        parse_cli(["worker", "--runtimes", "shell"])
    with pytest.raises(click.UsageError):
        parse_cli(["executor", "--metrics-port", "nine"])
    with pytest.raises(click.UsageError):
        parse_cli(["db", "migrat"])
    compose_env(SERVICES["worker-shell"])
    for args in (["worker", "--runtime", "cobol"], ["worker", "--capacity", "0"],
                 ["worker", "--actions", "examples.no_such_module"]):
        with pytest.raises(pytest.fail.Exception):
            run_service(args)


@pytest.mark.parametrize("name", ["executor", "worker-shell", "worker-python"])
def test_services_serve_metrics_on_all_interfaces_and_check_their_own_health(
    name, compose_env, run_service
):
    service = SERVICES[name]
    compose_env(service)
    settings, _, _ = run_service(vigil_invocations(service)[0])
    assert settings.metrics_host == "0.0.0.0", "Prometheus scrapes from another container"
    assert settings.metrics_port == METRICS_PORT
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert f"http://127.0.0.1:{METRICS_PORT}/healthz" in test[3]
    assert "ports" not in service, "metrics stay on the compose network"


def test_no_service_reads_the_env_file_whole():
    # compose/.env holds every password: compose interpolates it, no container gets it.
    for name, service in SERVICES.items():
        assert "env_file" not in service, f"{name}: env_file would pass it every password"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_container_gets_only_its_own_roles_broker_login(name):
    env = environment(SERVICES[name])
    roles = BROKER_ROLES.get(name, set())
    expected = set().union(*(LOGIN_VARS[r] for r in roles))
    assert broker_logins(env) == expected, f"{name}: broker logins"
    for role in set(BrokerRole) - roles:
        assert f"VIGIL_AMQP_{role.upper()}_PASSWORD" not in env, \
            f"{name} must not get the {role} password"
    for key in expected:
        assert env[key] == ENV_EXAMPLE_VARS[key], f"{name}: {key} comes from compose/.env"


def test_executors_and_workers_log_in_as_their_own_users(compose_env, run_service):
    for name, role in [("executor", BrokerRole.EXECUTOR), ("worker-shell", BrokerRole.WORKER),
                       ("worker-python", BrokerRole.WORKER)]:
        env = compose_env(SERVICES[name])
        _, _, broker_settings = run_service(vigil_invocations(SERVICES[name])[0])
        assert_logins(broker_settings, {role})
        for other in set(BrokerRole) - {role}:
            assert f"VIGIL_AMQP_{other.upper()}_PASSWORD" not in env, f"{name}: {other}"
            # Not there by any other name either: the settings only have the default.
            password = broker_settings.login(other).password.get_secret_value()
            assert password != ENV_EXAMPLE_VARS[f"VIGIL_AMQP_{other.upper()}_PASSWORD"], \
                f"{name} holds the {other} password"


@pytest.mark.parametrize("name", VIGIL_SERVICES)
def test_every_vigil_service_is_told_where_postgres_and_rabbitmq_are(name, compose_env):
    env = compose_env(SERVICES[name])
    db, amqp = config.DatabaseSettings(), config.BrokerSettings()
    assert (db.host, db.port) == ("postgres", 5432)
    assert (db.name, db.user, db.password.get_secret_value()) == tuple(
        ENV_EXAMPLE_VARS[k] for k in ("VIGIL_DB_NAME", "VIGIL_DB_USER", "VIGIL_DB_PASSWORD"))
    assert (amqp.host, amqp.port, amqp.management_port) == ("rabbitmq", 5672, 15672)
    # The broker's vhost and event vhost are fixed by rabbitmq/.
    assert env["VIGIL_AMQP_VHOST"] == RABBITMQ_VHOST == amqp.vhost
    assert env["VIGIL_AMQP_EVENT_VHOST"] == RABBITMQ_EVENT_VHOST == amqp.event_vhost


def test_the_vhosts_are_rabbitmq_configurations():
    conf = (REPO / "rabbitmq" / "rabbitmq.conf").read_text()
    assert re.search(rf"^event_exchange\.vhost = {re.escape(RABBITMQ_EVENT_VHOST)}$", conf, re.M)
    definitions = json.loads((REPO / "rabbitmq" / "definitions.json").read_text())
    assert [v["name"] for v in definitions["vhosts"]] == [RABBITMQ_VHOST]


def test_every_vigil_variable_is_a_real_setting():
    names = set(ENV_EXAMPLE_VARS)
    for service in SERVICES.values():
        declared = service.get("environment") or {}
        names |= set(declared if isinstance(declared, dict)
                     else [item.split("=", 1)[0] for item in declared])
    names |= set(INTERPOLATED.findall(COMPOSE_FILE.read_text()))
    vigil_names = {n for n in names if n.startswith("VIGIL_")}
    assert vigil_names, "no VIGIL_* variables found"
    unknown = sorted(vigil_names - SETTING_NAMES)
    assert not unknown, f"not settings in common/config.py: {unknown}"


def test_env_example_is_complete_valid_and_clearly_an_example():
    referenced = set(INTERPOLATED.findall(COMPOSE_FILE.read_text()))
    missing = sorted(referenced - set(ENV_EXAMPLE_VARS))
    assert not missing, f"compose interpolates variables .env.example does not define: {missing}"
    # No container reads the file: a variable compose does not interpolate does nothing.
    unused = sorted(set(ENV_EXAMPLE_VARS) - referenced)
    assert not unused, f".env.example sets variables compose never uses: {unused}"
    for key, value in ENV_EXAMPLE_VARS.items():
        if "PASSWORD" in key:
            assert value.startswith("change-me"), f"{key} must be an obvious placeholder"
    passwords = [v for k, v in ENV_EXAMPLE_VARS.items() if "PASSWORD" in k]
    assert len(set(passwords)) == len(passwords), "one placeholder per password"
    users = [ENV_EXAMPLE_VARS[f"VIGIL_AMQP_{role.upper()}_USER"] for role in BrokerRole]
    assert len(set(users)) == len(users), "each role is a user of its own"
    assert ".env" in [ln.strip().removeprefix("compose/") for ln in
                      (REPO / ".gitignore").read_text().splitlines()]


def test_no_guest_credentials_anywhere():
    for path in sorted(COMPOSE_DIR.iterdir()):
        if path.is_file() and path.name != ".env":
            assert "guest" not in path.read_text().lower(), f"{path.name} mentions guest"
    for name, service in SERVICES.items():
        env = environment(service)
        assert not {"RABBITMQ_DEFAULT_USER", "RABBITMQ_DEFAULT_PASS"} & set(env), name
        for key, value in env.items():
            assert value.lower() != "guest", f"{name}: {key}=guest"


def test_no_password_is_written_into_the_compose_file():
    for name, service in SERVICES.items():
        declared = service.get("environment") or {}
        for key, value in (declared.items() if isinstance(declared, dict) else []):
            if key.endswith("_FILE"):
                continue  # a path to read a secret from
            if "PASSWORD" in key or "PASS" in key.split("_"):
                assert str(value).startswith("${"), f"{name}: {key} must come from .env"


def test_workers_get_longer_to_stop_than_their_drain_grace(compose_env):
    for name in ["worker-shell", "worker-python"]:
        service = SERVICES[name]
        compose_env(service)
        grace = WorkerSettings().shutdown_grace_s
        assert grace >= WorkerSettings.model_fields["shutdown_grace_s"].default
        stop = duration_s(service["stop_grace_period"])
        # Draining also releases what is left and marks the worker INACTIVE.
        assert stop >= grace + 5, (
            f"{name}: stop_grace_period {stop:g}s leaves no room after the worker's "
            f"{grace:g}s shutdown grace; Docker would SIGKILL the drain")


def test_two_executor_replicas():
    executor = SERVICES["executor"]
    assert executor["deploy"]["replicas"] == 2
    assert "container_name" not in executor and "ports" not in executor


def test_long_running_services_have_healthchecks_and_start_in_order():
    for name, service in SERVICES.items():
        if name not in ONE_SHOT:
            test = (service.get("healthcheck") or {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"
        for dep, cond in (service.get("depends_on") or {}).items():
            condition = cond["condition"]
            if condition == "service_healthy":
                assert SERVICES[dep].get("healthcheck"), f"{name} waits on {dep}'s health"
            else:
                assert condition == "service_completed_successfully" and dep in ONE_SHOT
    assert SERVICES["migrate"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "rabbitmq": {"condition": "service_healthy"},
        "rabbitmq-users": {"condition": "service_completed_successfully"},
    }
    for name in ["executor", "worker-shell", "worker-python"]:
        assert SERVICES[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"}}
    assert SERVICES["rabbitmq"]["healthcheck"]["test"] == [
        "CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])


def test_vigil_connects_to_postgres_as_its_own_role_not_the_superuser():
    postgres = SERVICES["postgres"]
    env = environment(postgres)
    assert "POSTGRES_USER" not in env and "POSTGRES_PASSWORD" not in env
    assert env["POSTGRES_PASSWORD_FILE"] == "/proc/sys/kernel/random/uuid"
    assert {k: env[k] for k in ("VIGIL_DB_USER", "VIGIL_DB_PASSWORD", "VIGIL_DB_NAME")} == {
        k: ENV_EXAMPLE_VARS[k] for k in ("VIGIL_DB_USER", "VIGIL_DB_PASSWORD", "VIGIL_DB_NAME")}
    assert "./postgres-init.sh:/docker-entrypoint-initdb.d/10-vigil-role.sh:ro" in \
        postgres["volumes"]
    script = COMPOSE_DIR / "postgres-init.sh"
    assert "NOSUPERUSER" in script.read_text()
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_rabbitmq_uses_the_repo_configuration_and_users_are_provisioned():
    rabbitmq = SERVICES["rabbitmq"]
    assert "../rabbitmq:/etc/rabbitmq:ro" in rabbitmq["volumes"]
    ports = {p.rsplit(":", 1)[-1] for p in rabbitmq["ports"]}
    assert ports == {"5672", "15672", "15692"}
    conf = (REPO / "rabbitmq" / "rabbitmq.conf").read_text()
    assert "definitions.local.path = /etc/rabbitmq/definitions.json" in conf
    # Definitions at boot: no default user, so the one-shot creates Vigil's user.
    users = SERVICES["rabbitmq-users"]
    assert users["image"] == rabbitmq["image"]
    assert users["environment"]["RABBITMQ_NODENAME"] == f"rabbit@{rabbitmq['hostname']}"
    script_mount = next(v for v in users["volumes"] if v.startswith("./rabbitmq-users.sh:"))
    assert users["entrypoint"] == ["bash", script_mount.split(":")[1]]
    data = next(v for v in rabbitmq["volumes"] if v.endswith(":/var/lib/rabbitmq"))
    assert f"{data}:ro" in users["volumes"], "the cookie comes from the broker's volume"
    script = COMPOSE_DIR / "rabbitmq-users.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Only the administrator: `vigil broker setup` (migrate) creates the other users.
    env = environment(users)
    assert set(env) == {"RABBITMQ_NODENAME", "VIGIL_AMQP_VHOST"} | LOGIN_VARS[BrokerRole.ADMIN]
    assert env["VIGIL_AMQP_VHOST"] == RABBITMQ_VHOST
    text = script.read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert set(re.findall(r"\$\{(VIGIL_[A-Z_]+)", code)) == set(env) - {"RABBITMQ_NODENAME"}
    assert re.search(r'^ctl set_user_tags "\$user" administrator$', code, re.M)
    assert re.search(r"""^ctl set_permissions -p "\$vhost" "\$user" '\.\*' '\.\*' '\.\*'$""",
                     code, re.M)


# ---- Prometheus ------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, ("promtool not found on PATH: run `bash scripts/install.sh` (it installs "
                 "Debian's prometheus package, which provides promtool)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO)


def test_promtool_accepts_the_prometheus_config():
    result = promtool("check", "config", "compose/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", "compose/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_their_unit_tests():
    result = promtool("test", "rules", "compose/alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_vigil_service_and_rabbitmq():
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"]
    assert f"./alerts.yml:/etc/prometheus/{prom['rule_files'][0]}:ro" in \
        SERVICES["prometheus"]["volumes"]
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    [dns] = jobs["executor"]["dns_sd_configs"]
    assert dns["names"] == ["executor"] and dns["port"] == METRICS_PORT
    assert jobs["worker-shell"]["static_configs"] == [{"targets": [f"worker-shell:{METRICS_PORT}"]}]
    assert jobs["worker-python"]["static_configs"] == [
        {"targets": [f"worker-python:{METRICS_PORT}"]}]
    assert jobs["rabbitmq"]["static_configs"] == [{"targets": ["rabbitmq:15692"]}]


def _metric_names() -> set[str]:
    names = {"up"}
    for family in REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                    "gauge": [""]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_uses_real_metrics_and_links_an_existing_runbook():
    rules = yaml.safe_load((COMPOSE_DIR / "alerts.yml").read_text())
    docs = REPO / "docs" / "operations.md"
    anchors = {_slug(m) for m in re.findall(r"^#+ (.+)$", docs.read_text(), re.M)}
    known = _metric_names()
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "VigilLoopStalled", "VigilWorkerDown", "VigilAttemptsLostWithWorker",
        "VigilDeadLettersHigh", "VigilStuckExecutions", "VigilExecutionsWaiting",
        "VigilPublishFailures", "VigilTargetDown", "VigilNoExecutor", "VigilScheduleStuck"}
    used_anchors = set()
    for rule in [r for g in rules["groups"] for r in g["rules"]]:
        for name in re.findall(r"\b((?:vigil[_:]|up\b)[a-z0-9_:]*)", rule["expr"]):
            assert name in known | recorded, f"{rule.get('alert', rule.get('record'))}: " \
                                             f"no metric {name} in common/metrics.py"
    for alert in alerts:
        ann = alert["annotations"]
        assert ann.get("summary") and ann.get("description"), alert["alert"]
        page, _, anchor = ann["runbook"].partition("#")
        assert page == "docs/operations.md" and anchor in RUNBOOK_ANCHORS, ann["runbook"]
        assert anchor in anchors, f"{alert['alert']}: no heading #{anchor} in {docs.name}"
        assert alert["labels"]["severity"] in ("warning", "critical")
        used_anchors.add(anchor)
    assert used_anchors == RUNBOOK_ANCHORS
