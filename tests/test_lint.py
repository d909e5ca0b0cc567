"""ruff and mypy, configured in pyproject.toml, as part of the test command: a new finding fails CI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed: scripts/setup.sh installs it with the dev extras")
    return str(path)


def test_ruff() -> None:
    out = subprocess.run([tool("ruff"), "check", "--no-cache", "hetlora_core", "pipelines", "components", "tests",
                          "benchmarks", "scripts"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


@pytest.mark.timeout(900)
def test_mypy() -> None:
    out = subprocess.run([tool("mypy"), "--no-incremental"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
