"""The CLI as a user runs it: a real process against the real servers."""

import json
import uuid

import pytest

from tests.harness import Env


async def count(env: Env, table: str) -> int:
    return await env.pool.fetchval(f"SELECT count(*) FROM {table}")


@pytest.mark.parametrize(("args", "message"), [
    (["submit", "demo.add", "--params-json", "{bad"], "not valid JSON"),
    (["submit", "demo.add", "-p", "novalue"], "expected key=value"),
    (["submit", ""], "action name is empty"),
    (["submit", "demo.add", "--params-json", "@{tmp}/big.json"], "over the limit"),
    (["show", "not-a-uuid"], "not an execution id"),
    (["worker", "--runtime", "cobol"], "--runtime"),
])
async def test_usage_errors_exit_2_with_one_line_and_write_nothing(env: Env, args, message):
    (env.tmp / "big.json").write_text(json.dumps({"x": "y" * 1_048_576}))
    result = env.cli(*(a.replace("{tmp}", str(env.tmp)) for a in args))

    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
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


@pytest.mark.parametrize("service, settings, says", [
    ("worker", {"VIGIL_AMQP_WORKER_PASSWORD": "s3cret-pw"},
     "worker stopped: broker at 127.0.0.1:5672 refused the login of 'vigil-worker'"),
    ("executor", {"VIGIL_DB_PORT": "1", "VIGIL_DB_PASSWORD": "s3cret-pw"},
     "executor stopped: database unavailable at 127.0.0.1:1"),
], ids=["worker-wrong-password", "executor-database-down"])
async def test_a_service_that_cannot_start_exits_1_with_one_line(
    env: Env, service, settings, says
):
    result = env.cli(service, **settings)
    assert result.returncode == 1
    assert says in result.stderr
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
