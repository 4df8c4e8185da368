"""The command line: user mistakes are one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distillscope", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def blocker(tmp_path):
    """A regular file: any folder 'inside' it cannot be created."""
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["harvest", "--prompts", "/no/such/prompts.jsonl", "--out", "{tmp}/o"], "does not exist"),
        (["harvest", "--teacher", "gpt-17", "--out", "{tmp}/o"], "unknown teacher"),
        (["harvest", "--exposure", "top0", "--out", "{tmp}/o"], "top0"),
        (["harvest", "--exposure", "top-3", "--out", "{tmp}/o"], "top-3"),
        (["harvest", "--exposure", "topk:abc", "--out", "{tmp}/o"], "topk:abc"),
        (["harvest", "--exposure", "top50", "--out", "{tmp}/o"], "maximum k=20"),
        (["harvest", "--out", "{blocker}/o", "--n", "2"], "cannot write"),
        (["data", "inspect", "{tmp}/nothing-here"], "does not exist"),
        (["distill", "--data", "{tmp}/nothing-here", "--out", "{tmp}/s"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_no_traceback(args, message, tmp_path, blocker):
    filled = [a.format(tmp=tmp_path, blocker=blocker) for a in args]
    result = run(*filled)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Loading" not in line]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_usage_errors_come_from_typer_with_exit_2():
    result = run("harvest", "--no-such-flag")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_help_explains_every_command():
    result = run("--help")
    assert result.returncode == 0
    for command in ("harvest", "distill", "data"):
        assert command in result.stdout


def test_issue_harvest_command_on_the_default_teacher(default_dir, tmp_path):
    """The foundation issue's command, as written (64 ShareGPT prompts, 48 tokens, top20)."""
    out = tmp_path / "h1"
    result = run(
        "harvest",
        "--teacher",
        "default",
        "--prompts",
        "sharegpt",
        "--n",
        "64",
        "--max-new-tokens",
        "48",
        "--exposure",
        "top20",
        "--out",
        str(out),
        "--no-cache",
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(run("data", "inspect", str(out), "--json").stdout)
    assert summary["records"] == 64 and summary["unique_prompts"] == 64
    assert summary["exposure"] == "top20" and summary["has_tail_mass"] is True
    assert summary["provenance"]["k"] == 20 and summary["provenance"]["vocab_size"] == 49152
    assert 0 < summary["bytes_per_token"] < 240
