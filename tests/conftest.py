"""Shared fixtures: the real default teacher, and a tiny random model with the same tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from distillscope.teachers import TransformersTeacher, load_teacher
from distillscope.teachers.default import default_model_dir

# `make test` runs two pytest workers (xdist), one per core: each worker's torch, and every process
# a test starts, keeps to one thread, or four threads fight over two cores and every OpenMP barrier
# stalls (a two-worker run with torch's default threads took 4x longer than one process).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# Property tests draw the same examples on every run: CI fails on a change, not on a new draw.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.load_profile("repeatable")

#: The files that take longest (seconds on 2 idle cores, from `make test`'s durations), first:
#: the two workers take whole files in collection order, and a long file started last leaves one
#: worker idle while the other finishes it (alphabetically, radioactivity and safety came last).
SLOW_FILES = (
    "test_distill.py",  # ~230 s
    "test_detect.py",  # ~220 s
    "test_radioactivity.py",  # ~180 s
    "test_audit.py",  # ~150 s
    "test_detect_spark.py",  # ~140 s
    "test_harvest.py",  # ~120 s
    "test_gateway.py",  # ~100 s
    "test_safety.py",  # ~90 s
    "test_gateway_load.py",  # ~55 s
    "test_install.py",  # ~50 s
    "test_detect_reference.py",  # ~50 s
)


def pytest_collection_modifyitems(items) -> None:
    """Slow files first (``SLOW_FILES``), the rest as collected; each file's own order kept."""
    rank = {name: index for index, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# Real servers for the tests that need them, started from scripts/ (fail, never skip).
from fixtures_redis import redis_url  # noqa: E402,F401
from fixtures_services import postgres_url  # noqa: E402,F401


@pytest.fixture(scope="session")
def default_dir() -> Path:
    """The default teacher converted to safetensors (once per machine, in the user cache)."""
    return default_model_dir()


@pytest.fixture(scope="session")
def default_teacher(default_dir) -> TransformersTeacher:
    return load_teacher("default", device="cpu", batch_size=8)


@pytest.fixture(scope="session")
def tiny_dir(default_dir, tmp_path_factory) -> Path:
    """A 2-layer random Llama that shares SmolLM2's real tokenizer: fast, and ids line up."""
    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-teacher")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tiny_dir) -> TransformersTeacher:
    return TransformersTeacher.from_pretrained(tiny_dir, device="cpu", batch_size=8)


@pytest.fixture
def cli():
    """The command line in-process (typer's runner): ``cli(*args)`` -> result with ``exit_code``,
    ``stdout`` and ``stderr`` apart. Cheaper than a subprocess per case."""
    from typer.testing import CliRunner

    from distillscope.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *words: str) -> str:
    """Assert a user error: exit 2, one line on stderr naming ``words``, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]
