"""The linters configured in pyproject.toml pass on the whole checkout: ruff (pyflakes and
pycodestyle errors, everywhere) and mypy (the library and the CLI; strict on the artifact,
the allowlist and the cache). Both come with the ``dev`` extra."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    assert importlib.util.find_spec(module) is not None, (
        f"{module} is not installed; it comes with the dev extra: pip install -e '.[transformers,dev]'")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_ruff_finds_nothing():
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing():
    result = _run("mypy", "--cache-dir", str(ROOT / ".mypy_cache"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout
