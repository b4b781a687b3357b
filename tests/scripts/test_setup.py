"""The two set-up commands: `scripts/example` installs what the example needs and says what it is
doing; the test command installs everything; the stamp saves installing twice.

The scripts run for real, in a copy of the repository's layout, with an interpreter that records
what pip was asked to do instead of downloading gigabytes, and a PATH that holds no Chromium (and an
`apt-get` that records being called), so the browser step is visible as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/bin/bash
# Records each call; `-m pip install` prints lines as pip does and exits with $FAKE_PIP_STATUS.
echo "$*" >> "$CALLS"
if [ "$1 $2 $3" = "-m pip install" ]; then
    echo "Collecting torch>=2.2"
    echo "  Downloading torch-2.5.1-cp311-cp311-manylinux1_x86_64.whl (906.4 MB)"
    echo "Requirement already satisfied: numpy>=1.26 in ./.venv/lib/python3.11/site-packages"
    echo "Installing collected packages: torch, vitscope"
    exit "${FAKE_PIP_STATUS:-0}"
fi
"""
RECORDER = '#!/bin/bash\necho "$(basename "$0") $*" >> "$CALLS"\n'


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The scripts, pyproject.toml and the example's CSV, with a recording `.venv` and PATH."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("setup", "example", "test"):
        shutil.copy(ROOT / "scripts" / name, repo / "scripts" / name)
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    tools = tmp_path / "bin"
    tools.mkdir()
    for path, text in ((venv_bin / "python", FAKE_PYTHON), (venv_bin / "producer", RECORDER)):
        path.write_text(text)
        path.chmod(0o755)
    for name, text in (("apt-get", RECORDER), ("id", "#!/bin/bash\necho 0\n")):  # as root
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    for name in ("bash", "cat", "sort", "paste", "grep", "dirname", "basename"):
        (tools / name).symlink_to(shutil.which(name))
    return repo


def _run(
    repo: Path, *command: str, pip_status: int = 0
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    calls = repo / "calls.log"
    calls.write_text("")
    env = {
        "PATH": str(repo.parent / "bin"),
        "PYTHON": sys.executable,
        "CALLS": str(calls),
        "FAKE_PIP_STATUS": str(pip_status),
        "HOME": str(repo),
    }
    result = subprocess.run(
        ["bash", *command], cwd=repo, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    return result, calls.read_text().splitlines()


def _installs(calls: list[str]) -> list[str]:
    return [call.split()[-1] for call in calls if call.startswith("-m pip install")]


def test_the_example_installs_the_worker_only_and_shows_pips_progress(repo: Path) -> None:
    result, calls = _run(repo, "scripts/example")
    assert result.returncode == 0, result.stderr
    assert _installs(calls) == [".[worker]"]  # no report extra, no pytest, moto, playwright, ruff
    assert not any(call.startswith("apt-get") for call in calls)  # no Chromium
    assert "producer submit examples/dataset.csv --local --random-if-offline" in calls
    assert "Downloading torch-2.5.1" in result.stderr  # pip's lines reach the user as they come
    assert "Requirement already satisfied" not in result.stderr
    assert "installing vitscope [worker]" in result.stderr
    assert (repo / ".venv" / ".vitscope-installed").read_text().strip() == "worker"


def test_the_test_command_installs_everything_once(repo: Path) -> None:
    _run(repo, "scripts/setup", "example")
    result, calls = _run(repo, "scripts/setup", "all")
    assert result.returncode == 0, result.stderr
    assert _installs(calls) == [".[report,test,worker]"]
    assert "apt-get update -qq" in calls  # root without Chromium: the browser tests get one
    again, calls = _run(repo, "scripts/setup", "all")
    assert (again.returncode, _installs(calls)) == (0, [])
    after, calls = _run(repo, "scripts/setup", "example")  # has more than the example needs
    assert (after.returncode, _installs(calls)) == (0, [])


def test_a_changed_pyproject_installs_again_keeping_what_was_there(repo: Path) -> None:
    _run(repo, "scripts/setup", "all")
    stamp = repo / ".venv" / ".vitscope-installed"
    os.utime(stamp, (1_000_000, 1_000_000))  # pyproject.toml is now the newer one
    result, calls = _run(repo, "scripts/setup", "example")
    assert result.returncode == 0, result.stderr
    assert _installs(calls) == [".[report,test,worker]"]


def test_a_stamp_from_before_the_split_stands_for_everything(repo: Path) -> None:
    stamp = repo / ".venv" / ".vitscope-installed"
    stamp.write_text("")
    for command in ("all", "example"):
        result, calls = _run(repo, "scripts/setup", command)
        assert (result.returncode, _installs(calls)) == (0, []), command


def test_a_failed_install_stops_with_pips_status_and_no_stamp(repo: Path) -> None:
    result, calls = _run(repo, "scripts/example", pip_status=1)
    assert result.returncode == 1
    assert "pip install failed (exit 1)" in result.stderr
    assert not (repo / ".venv" / ".vitscope-installed").exists()
    assert not any(call.startswith("producer") for call in calls)


def test_an_unknown_profile_is_refused(repo: Path) -> None:
    result, _ = _run(repo, "scripts/setup", "everything")
    assert result.returncode == 2
    assert "usage: bash scripts/setup [example|all]" in result.stderr
