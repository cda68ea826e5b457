from pathlib import Path

import pytest
from pydantic import ValidationError

from common.config import BrokerRole, BrokerSettings, DatabaseSettings, WorkerSettings
from services.cli.docs import render

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_docs_match_the_settings_classes() -> None:
    assert DOCS.read_text() == render(), "run `make docs` and commit docs/configuration.md"


def test_settings_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("VIGIL_DB_PORT", "6543")
    monkeypatch.setenv("VIGIL_WORKER_RUNTIMES", '["shell"]')
    assert DatabaseSettings().port == 6543
    assert WorkerSettings().runtimes == ["shell"]


def test_bad_settings_are_refused_at_start(monkeypatch) -> None:
    monkeypatch.setenv("VIGIL_WORKER_CAPACITY", "0")
    with pytest.raises(ValidationError, match="capacity"):
        WorkerSettings()
    monkeypatch.delenv("VIGIL_WORKER_CAPACITY")
    with pytest.raises(ValidationError, match="memory_low_ratio"):
        WorkerSettings(memory_low_ratio=0.9, memory_high_ratio=0.8)


def test_secrets_never_show_in_reprs_or_urls_logged() -> None:
    s = BrokerSettings(worker_password="s3cret")
    assert "s3cret" not in repr(s) and "s3cret" not in repr(DatabaseSettings(password="x1y2"))
    assert "s3cret" in s.url(BrokerRole.WORKER, "n")  # only the connection URL carries it
    assert "s3cret" not in s.url(BrokerRole.EXECUTOR, "n")


def test_secrets_can_come_from_files(tmp_path) -> None:
    import subprocess
    import sys

    (tmp_path / "VIGIL_DB_PASSWORD").write_text("from-a-file")
    out = subprocess.run(
        [sys.executable, "-c", "from common.config import DatabaseSettings as D; "
                               "print(D().password.get_secret_value())"],
        env={"VIGIL_SECRETS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "from-a-file"
