"""The CLI as a user runs it: a real process against the real servers."""

import json
import subprocess
import uuid
from datetime import timedelta

import pytest

from tests.harness import Env

DEEP = "[" * 10_000 + "]" * 10_000


async def count(env: Env, table: str) -> int:
    return await env.pool.fetchval(f"SELECT count(*) FROM {table}")


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed command prints on stderr (no traceback, nothing else)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "message"), [
    (["submit", "demo.add", "--params-json", "{bad"], "not valid JSON"),
    (["submit", "demo.add", "-p", "novalue"], "expected key=value"),
    (["submit", ""], "action name is empty"),
    (["submit", "demo.add", "--params-json", "@{tmp}/big.json"], "over the limit"),
    (["submit", "demo.add", "--params-json", "@/dev/zero"], "over the limit"),
    (["show", "not-a-uuid"], "not an execution id"),
    (["worker", "--runtime", "cobol"], "--runtime"),
    # typer's own usage errors, as one line of ours
    (["submit"], "error: missing argument 'ACTION' (see vigil submit --help)"),
    (["show"], "missing argument 'EXECUTION_ID' (see vigil show --help)"),
    (["no-such-command"], "no such command 'no-such-command' (see vigil --help)"),
    (["ls", "--no-such-option"], "no such option '--no-such-option' (see vigil ls --help)"),
    (["ls", "--limit", "many"], "invalid value for '--limit'"),
    (["submit", "demo.add", "--max-attempts", "0"], "'--max-attempts': 0 is not in the range"),
    (["submit", "demo.add", "--timeout", "604801"], "'--timeout': 604801 is not in the range"),
    (["executor", "--log-level", "loud"], "invalid value for '--log-level'"),
    (["prune"], "missing option '--older-than' (see vigil prune --help)"),
    # hostile values: refused before anything is written
    (["submit", "demo.add", "--params-json", '{"a": "\\u0000"}'], "NUL character"),
    (["submit", "demo.add", "--params-json", '{"\\u0000": 1}'], "NUL character"),
    (["submit", "demo.add", "--params-json", '{"a": ' + DEEP + "}"], "nested too deep"),
    (["submit", "demo.add", "-p", "a=" + DEEP], "-p a: the value is nested too deep"),
    (["submit", "demo.add", "--idempotency-key", ""], "idempotency key is empty"),
    (["submit", "demo.add", "--idempotency-key", "k" * 100_000], "over the limit"),
    (["submit", "demo.add", "--delay", "soon"], "--delay 'soon': expected a duration"),
    (["submit", "demo.add", "--delay", "400d"], "delay must be"),
    (["submit", "demo.add", "--at", "2026-12-01T09:00:00"], "give the time zone"),
    (["submit", "demo.add", "--at", "next tuesday"], "--at 'next tuesday': expected a time"),
    (["submit", "demo.add", "--delay", "1m", "--at", "2026-12-01T09:00:00Z"], "not both"),
    (["prune", "--older-than", "forever"], "--older-than 'forever': expected a duration"),
    (["dead-letters", "list", "--since", "99999999d"], "at most 3650d"),
])
async def test_usage_errors_exit_2_with_one_line_and_write_nothing(env: Env, args, message):
    (env.tmp / "big.json").write_text(json.dumps({"x": "y" * 1_048_576}))
    result = env.cli(*(a.replace("{tmp}", str(env.tmp)) for a in args))

    assert result.returncode == 2, result.stderr
    assert message in error_line(result)
    assert await count(env, "executions") == 0


@pytest.mark.parametrize("command", [["ls"], ["submit", "demo.add"], ["workers"], ["stats"]])
async def test_database_down_exits_1_naming_the_address_without_secrets(env: Env, command):
    result = env.cli(*command, VIGIL_DB_PORT="1", VIGIL_DB_PASSWORD="s3cret-pw")
    assert result.returncode == 1
    assert "database unavailable at 127.0.0.1:1" in result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("settings, says", [
    ({"VIGIL_AMQP_MANAGEMENT_PORT": "1", "VIGIL_AMQP_ADMIN_PASSWORD": "s3cret-pw"},
     "broker unavailable at 127.0.0.1:1"),
    ({"VIGIL_AMQP_ADMIN_PASSWORD": "s3cret-pw"}, "answered 401 Unauthorized"),
    ({"VIGIL_AMQP_PORT": "1"}, "broker unavailable at 127.0.0.1:1"),
], ids=["management-down", "wrong-admin-password", "amqp-down"])
async def test_broker_setup_failures_exit_1_naming_the_problem_without_secrets(
    env: Env, settings, says
):
    result = env.cli("broker", "setup", **settings)
    assert result.returncode == 1
    assert says in result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, settings, says", [
    (["worker"], {"VIGIL_AMQP_WORKER_PASSWORD": "s3cret-pw"},
     "worker stopped: broker at 127.0.0.1:5672 refused the login of 'vigil-worker'"),
    (["executor"], {"VIGIL_DB_PORT": "1", "VIGIL_DB_PASSWORD": "s3cret-pw"},
     "executor stopped: database unavailable at 127.0.0.1:1"),
    (["worker", "--runtime", "python", "--actions", "no.such.module"], {},
     "error: worker stopped: cannot import action module 'no.such.module': "
     "No module named 'no'"),
], ids=["worker-wrong-password", "executor-database-down", "worker-no-such-module"])
async def test_a_service_that_cannot_start_exits_1_with_one_line(
    env: Env, args, settings, says
):
    result = env.cli(*args, **settings)
    assert result.returncode == 1
    assert says in error_line(result)
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


async def test_submit_without_a_worker_warns_and_show_says_what_it_waits_for(env: Env):
    result = env.cli("submit", "nobody.offers.this", "-p", "a=1")
    assert result.returncode == 0, result.stderr
    assert "no live worker offers action 'nobody.offers.this'" in result.stderr
    eid = uuid.UUID(result.stdout.strip())
    shown = env.cli("show", str(eid))
    assert "waits" not in shown.stderr
    assert "for a worker offering 'nobody.offers.this'" in shown.stdout
    assert "REQUESTED" in shown.stdout and "submitted" in shown.stdout
    listed = json.loads(env.cli("ls", "--json").stdout)
    assert [e["id"] for e in listed] == [str(eid)]
    assert listed[0]["params"] == {"a": 1}


async def test_idempotency_key_returns_the_existing_execution(env: Env):
    first = env.cli("submit", "demo.noop", "--idempotency-key", "k1", "--json")
    second = env.cli("submit", "demo.noop", "--idempotency-key", "k1", "--json")
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["id"] == b["id"] and a["created"] and not b["created"]
    assert "already used" in second.stderr
    assert await count(env, "executions") == 1


async def test_show_of_an_unknown_execution_fails(env: Env):
    result = env.cli("show", str(uuid.uuid4()))
    assert result.returncode == 1 and "no execution" in result.stderr


async def test_migrate_is_idempotent(env: Env):
    result = env.cli("db", "migrate")
    assert result.returncode == 0 and "up to date" in result.stdout


async def test_commands_print_json_for_scripts(env: Env):
    [eid] = await env.submit("nobody.offers.this")

    def run(*args: str) -> object:
        result = env.cli(*args, "--json")
        assert result.returncode == 0, (args, result.stderr)
        return json.loads(result.stdout)

    assert run("cancel", str(eid)) == {"id": str(eid), "cancelled": True, "was": "REQUESTED"}
    assert run("retry", str(eid)) == {"id": str(eid), "attempt": 2}
    assert [e["id"] for e in run("ls")] == [str(eid)]
    assert run("show", str(eid))["execution"]["status"] == "REQUESTED"
    assert run("stats")["by_status"] == {"REQUESTED": 1}
    assert run("workers") == []
    assert run("dead-letters", "list") == {"waiting": 0, "dead_letters": []}
    assert run("db", "migrate") == {"applied": []}
    assert run("broker", "setup")["users"] == ["vigil-executor", "vigil-worker"]


async def test_every_command_has_help(env: Env):
    for command in ["submit", "ls", "show", "cancel", "retry", "workers", "stats", "top",
                    "dead-letters", "schedules", "executor", "worker", "db", "broker"]:
        result = env.cli(command, "--help")
        assert result.returncode == 0, command
        assert "Usage" in result.stdout


async def test_top_shows_executions_and_workers_then_stops(env: Env):
    env.worker("w1", capacity=2)
    await env.live_workers(1)
    await env.submit("nobody.offers.this", n=2)
    result = env.cli("top", "--iterations", "2", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    assert "REQUESTED" in result.stdout and "0/2" in result.stdout
    assert "oldest unfinished" in result.stdout


def not_migrated(env: Env) -> str:
    return (f"the database at {env.db.host}:{env.db.port}/{env.db.name} is not migrated: "
            "run `vigil db migrate`")


@pytest.mark.parametrize("breakage, args, prefix", [
    ("DELETE FROM schema_migrations WHERE version = (SELECT max(version) "
     "FROM schema_migrations)", ["submit", "demo.add"], ""),
    ("DELETE FROM schema_migrations WHERE version = 1", ["ls"], ""),
    ("DROP TABLE schema_migrations", ["executor"], "executor stopped: "),
    ("DROP TABLE schema_migrations", ["worker"], "worker stopped: "),
    ("DROP TABLE workers CASCADE", ["workers"], ""),  # a table missing despite the record
], ids=["pending-submit", "pending-ls", "none-executor", "none-worker", "table-gone"])
async def test_a_database_behind_its_migrations_is_named_and_nothing_runs(
    env: Env, breakage, args, prefix
):
    await env.pool.execute(breakage)
    result = env.cli(*args)
    assert result.returncode == 1
    assert error_line(result) == f"error: {prefix}{not_migrated(env)}"
    assert await count(env, "executions") == 0
    assert await count(env, "execution_history") == 0


async def test_vigil_db_migrate_brings_an_empty_database_up_to_date(env: Env):
    await env.pool.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    assert error_line(env.cli("ls")) == f"error: {not_migrated(env)}"
    migrated = env.cli("db", "migrate", "--json")
    assert migrated.returncode == 0, migrated.stderr
    assert json.loads(migrated.stdout)["applied"][0] == 1
    listed = env.cli("ls", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr


@pytest.mark.parametrize("args, settings", [
    ([], {}), (["--debug"], {}), ([], {"VIGIL_DEBUG": "1"}),
], ids=["plain", "--debug", "VIGIL_DEBUG"])
async def test_an_unexpected_error_is_one_line_its_traceback_only_when_asked(
    env: Env, args, settings
):
    # A schema changed behind Vigil's back: the query fails in a way nothing expects.
    await env.pool.execute("ALTER TABLE executions RENAME COLUMN reason TO why")
    result = env.cli(*args, "ls", **settings)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: UndefinedColumnError: column") and "reason" in last
    if args or settings:
        assert "Traceback (most recent call last)" in result.stderr
    else:
        assert error_line(result) == last


async def test_prune_deletes_only_finished_executions_older_than_asked(env: Env):
    old = await env.submit("demo.noop", n=3)
    [recent] = await env.submit("demo.noop")
    unfinished = await env.submit("demo.noop", n=2)
    for eid in [*old, recent]:
        assert await env.client.cancel(eid)
    # Backdated, as if they had ended 8 days ago; unfinished ones even with a stray
    # finished_at that old: only the status says whether an execution is done.
    await env.pool.execute(
        "UPDATE executions SET created_at = created_at - $2::interval, "
        "finished_at = now() - $2::interval WHERE id = ANY($1)",
        [*old, *unfinished], timedelta(days=8))

    result = env.cli("prune", "--older-than", "7d", "--batch", "2", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"deleted": 3}
    left = {r["id"] for r in await env.pool.fetch("SELECT id FROM executions")}
    assert left == {recent, *unfinished}
    assert await env.pool.fetchval(
        "SELECT count(*) FROM execution_history WHERE execution_id = ANY($1)", old) == 0
    again = env.cli("prune", "--older-than", "7d")
    assert again.stdout.strip() == "deleted 0 executions finished more than 7d ago"
