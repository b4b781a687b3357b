"""docker/ cannot be built here (no Docker engine), so these tests pin what can drift silently:
settings names, copied paths and commands must be ones the code really has."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from common.settings import Settings
from producer.cli import app as producer_app
from worker.cli import app as worker_app

DOCKER = Path(__file__).resolve().parents[2] / "docker"
ROOT = DOCKER.parent


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_every_vitscope_variable_is_a_setting() -> None:
    fields = {f"VITSCOPE_{name.upper()}" for name in Settings.model_fields}
    text = (DOCKER / "compose.yaml").read_text()
    used = set(re.findall(r"\bVITSCOPE_[A-Z_]+\b", text))
    assert used
    assert used <= fields


def test_dockerfiles_copy_paths_that_exist() -> None:
    for dockerfile in DOCKER.glob("Dockerfile.*"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                *sources, _target = line.split()[1:]
                for source in sources:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: {source} does not exist"


def test_service_commands_are_real_cli_commands(monkeypatch) -> None:
    services = _compose()["services"]
    runner = CliRunner()
    result = runner.invoke(producer_app, [*services["migrate"]["command"], "--help"])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("VITSCOPE_BROKER_URL", "redis://redis:6379/0")
    worker_cmd = (DOCKER / "Dockerfile.worker").read_text().split("CMD ")[1].strip()
    args = yaml.safe_load(worker_cmd)
    assert args[0] == "worker"
    result = runner.invoke(worker_app, [*args[1:], "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "celery -A worker.tasks worker" in result.output


def test_workers_and_producer_share_the_same_configuration() -> None:
    services = _compose()["services"]
    worker_env = services["worker"]["environment"]
    for name in ("producer", "migrate"):
        env = services[name]["environment"]
        for key, value in env.items():
            assert worker_env[key] == value, f"{name} and worker disagree on {key}"


def test_the_worker_reads_local_files_only_from_the_mounted_dataset_folder() -> None:
    """Compose's worker resolves the example CSV's /data paths; nothing else on it is readable."""
    worker = _compose()["services"]["worker"]
    roots = worker["environment"]["VITSCOPE_FILE_ROOTS"].split(":")
    mounted = {volume.split(":")[1] for volume in worker["volumes"]}
    assert roots == ["/data"]
    assert set(roots) <= mounted
