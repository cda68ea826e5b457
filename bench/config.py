"""The benchmark's knobs (VIGIL_BENCH_*): the defaults are the published run; the
variables shrink a run while developing, e.g.

    VIGIL_BENCH_N=2000 VIGIL_BENCH_RUNS=1 VIGIL_BENCH_SYSTEMS=vigil,dramatiq make bench
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SYSTEMS = ("vigil", "celery-threads", "celery-prefork", "dramatiq")
WORKLOADS = ("w1a", "w1b", "w2", "w5")


def _names(value: str, known: tuple[str, ...], what: str) -> str:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(known)}")
    return ",".join(n for n in known if n in names)


class BenchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIGIL_BENCH_")

    n: int = Field(20_000, ge=1, description="W1: no-op executions per run.")
    runs: int = Field(3, ge=1, le=20, description="Runs of each workload; medians reported.")
    repeat_under_s: float = Field(
        60.0, gt=0, description="A workload is run again only if one run took less.")
    systems: str = Field(",".join(SYSTEMS), description="Comma-separated systems to run.")
    workloads: str = Field(",".join(WORKLOADS), description="Comma-separated workloads.")
    batch: int = Field(500, ge=1, description="W1b: submissions per batch.")
    capacity: int = Field(16, ge=1, le=256, description="The Vigil worker's --capacity.")
    latency_n: int = Field(2_000, ge=2, description="W2: executions per run.")
    latency_rate: float = Field(200.0, gt=0, description="W2: submissions per second.")
    stall_s: float = Field(60.0, gt=0, description="A run with no progress this long fails.")

    @field_validator("systems")
    @classmethod
    def _systems(cls, value: str) -> str:
        return _names(value, SYSTEMS, "system")

    @field_validator("workloads")
    @classmethod
    def _workloads(cls, value: str) -> str:
        return _names(value, WORKLOADS, "workload")

    @property
    def system_names(self) -> list[str]:
        return self.systems.split(",")

    @property
    def workload_names(self) -> list[str]:
        return self.workloads.split(",")
