"""Install only what you use: ``pip install '.[detect]'`` into a fresh virtual environment runs
``simulate`` and ``detect`` with no torch installed.

About 40 s on 2 idle cores (60 s when they are shared): pip takes the wheels from its cache and
the local index, and compiles nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.install
def test_the_detect_extra_simulates_and_detects_without_torch(tmp_path):
    source = tmp_path / "source"  # a copy: building in the working tree would leave build/ there
    shutil.copytree(
        ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", venv).returncode == 0
    python, command = venv / "bin" / "python", venv / "bin" / "distillscope"
    installed = _run(python, "-m", "pip", "install", "-q", "--no-compile", f"{source}[detect]")
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert _run(python, "-c", "import torch").returncode != 0, "the detect extra pulled in torch"

    simulated = _run(command, "simulate", "--scenario", "smoke", "--out", tmp_path / "sim")
    assert simulated.returncode == 0, simulated.stderr[-3000:]
    log = tmp_path / "sim" / "traffic.duckdb"
    found = _run(command, "detect", "--log", log, "--out", tmp_path / "alerts", "--json")
    assert found.returncode == 0, found.stderr[-3000:]
    summary = json.loads(found.stdout)
    assert summary["accounts"] > 0 and summary["flagged"] > 0
    missing = _run(command, "distill", "--data", tmp_path / "sim", "--out", tmp_path / "s")
    assert missing.returncode == 2 and "distillscope[train]" in missing.stderr, missing.stderr
