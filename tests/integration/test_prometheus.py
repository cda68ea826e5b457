"""A real Prometheus (Debian's package, installed by scripts/install.sh) scrapes an
executor, two workers and RabbitMQ, evaluates compose/alerts.yml against them, and sees
a killed worker go down. The scrape jobs are named as in compose/prometheus.yml, so the
rules see the labels they will see under compose."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.harness import REPO, Env, wait_until

ALERTS = REPO / "compose" / "alerts.yml"
RABBITMQ_METRICS_PORT = int(os.environ.get("VIGIL_RABBITMQ_PROMETHEUS_PORT", "15692"))


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together, so never the same one)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass
class Prometheus:
    popen: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=promql)["result"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def start_prometheus(tmp: Path, port: int, targets: dict[str, str]) -> Prometheus:
    exe = shutil.which("prometheus")
    assert exe, ("the prometheus binary is not on PATH: run `bash scripts/install.sh` (it "
                 "installs Debian's prometheus package)")
    shutil.copy(ALERTS, tmp / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]}
            for job, target in targets.items()
        ],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    log_path = tmp / "prometheus.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [exe, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp,
        )
    return Prometheus(popen, f"http://127.0.0.1:{port}", log_path)


def compose_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """The Vigil services' compose healthcheck command, aimed at a local port."""
    compose = yaml.safe_load((REPO / "compose" / "docker-compose.yml").read_text())
    test = compose["services"]["executor"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    argv = [a.replace(":9100/", f":{port}/") for a in test[1:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


async def test_prometheus_scrapes_vigil_and_rabbitmq_and_the_alert_rules_hold(
    env: Env, tmp_path: Path
):
    executor_port, shell_port, python_port, web_port = free_ports(4)
    env.executor(metrics_port=executor_port)
    env.worker("shell", runtimes="shell", metrics_port=shell_port)
    shell_worker = env.procs[-1]
    env.worker("python", runtimes="python", metrics_port=python_port)
    await env.live_workers(2)

    targets = {"executor": f"127.0.0.1:{executor_port}",
               "worker-shell": f"127.0.0.1:{shell_port}",
               "worker-python": f"127.0.0.1:{python_port}",
               "rabbitmq": f"127.0.0.1:{RABBITMQ_METRICS_PORT}"}
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    prom = start_prometheus(prom_dir, web_port, targets)
    last: dict[str, Any] = {}

    async def ask(promql: str) -> list[dict[str, Any]]:
        if prom.popen.poll() is not None:
            raise AssertionError(f"prometheus exited {prom.popen.returncode}:\n{prom.log()}")
        try:
            last[promql] = await asyncio.to_thread(prom.query, promql)
        except OSError as exc:  # not listening yet
            last[promql] = repr(exc)
            return []
        return last[promql]

    def seen(what: str) -> str:
        return f"{what}; last answers: {last}\nprometheus log:\n{prom.log()}"

    try:
        # Every target scraped successfully.
        async def all_up() -> bool:
            up = {r["metric"]["job"]: r["value"][1] for r in await ask("up")}
            return up == dict.fromkeys(targets, "1")

        await wait_until(all_up, timeout=60, interval=0.5,
                         what=lambda: seen("up == 1 for all four targets"))

        # Vigil's own series, with real values.
        async def capacities() -> dict[str, str] | None:
            rows = await ask("vigil_worker_capacity > 0")
            got = {r["metric"]["job"]: r["value"][1] for r in rows}
            return got if len(got) == 2 else None

        got = await wait_until(capacities, timeout=30, interval=0.5,
                               what=lambda: seen("vigil_worker_capacity of both workers"))
        assert got == {"worker-shell": "4", "worker-python": "4"}

        async def dispatching() -> bool:
            return bool(await ask('time() - vigil_loop_last_completed_timestamp_seconds'
                                  '{job="executor", loop="dispatch"} < 10'))

        await wait_until(dispatching, timeout=30, interval=0.5,
                         what=lambda: seen("the executor's dispatch loop completing"))
        assert await ask('rabbitmq_build_info') or await ask('erlang_vm_process_count'), \
            seen("RabbitMQ's own metrics")

        # Every rule evaluates without error against the live series...
        async def rules_ok() -> list[dict[str, Any]] | None:
            data = await asyncio.to_thread(prom.get, "/api/v1/rules")
            rules = [r for g in data["groups"] for r in g["rules"]]
            last["rules"] = [(r["name"], r["health"], r.get("lastError")) for r in rules]
            return rules if rules and all(r["health"] == "ok" for r in rules) else None

        rules = await wait_until(rules_ok, timeout=30, interval=0.5,
                                 what=lambda: seen("every rule evaluated, health ok"))
        assert len([r for r in rules if r["type"] == "alerting"]) >= 7

        # ...and a healthy system raises none of them (the first evaluations, before the
        # first scrapes, may leave some pending for a moment).
        async def quiet() -> bool:
            data = await asyncio.to_thread(prom.get, "/api/v1/alerts")
            last["alerts"] = [(a["labels"]["alertname"], a["state"]) for a in data["alerts"]]
            return not data["alerts"]

        await wait_until(quiet, timeout=30, interval=0.5,
                         what=lambda: seen("no alerts pending or firing"))

        # The compose healthcheck passes against a live executor.
        check = await asyncio.to_thread(compose_healthcheck, executor_port)
        assert check.returncode == 0, check.stdout + check.stderr

        # A killed worker: its target goes down and VigilWorkerDown starts pending.
        shell_worker.stop()

        async def worker_down() -> bool:
            data = await asyncio.to_thread(prom.get, "/api/v1/alerts")
            last["alerts"] = [(a["labels"]["alertname"], a["labels"].get("job"), a["state"])
                              for a in data["alerts"]]
            return ("VigilWorkerDown", "worker-shell", "pending") in last["alerts"]

        await wait_until(worker_down, timeout=30, interval=0.5,
                         what=lambda: seen("VigilWorkerDown pending for worker-shell"))
        assert await ask('up{job="worker-shell"} == 0')
        assert [r["value"][1] for r in await ask('up{job="worker-python"}')] == ["1"]
    finally:
        prom.stop()
