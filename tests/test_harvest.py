"""Harvest: incremental, resumable after kill -9 or Ctrl-C, cached by content, honest counts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distillscope.errors import HarvestError
from distillscope.harvest import ExchangeCache, harvest
from distillscope.prompts import Prompt
from distillscope.records import RecordSet
from distillscope.teachers import SamplingConfig

TOPICS = ["rivers", "chess", "bread", "volcanoes", "jazz", "owls", "glass", "tides", "maps", "bees"]
PROMPTS = [
    Prompt(
        f"t:{i}",
        f"Tell me fact {i} about {TOPICS[i % 10]}." + " Please." * (i % 7),
        "other",
        "test",
    )
    for i in range(40)
]
SAMPLING = SamplingConfig(exposure="top5", max_new_tokens=24, seed=4)


def _harvest(teacher, prompts, out, sampling=SAMPLING, cache=False):
    return harvest(
        teacher, prompts, out, sampling=sampling, batch_size=4, cache=cache, progress=False
    )


def _rows_by_prompt(path: Path) -> dict[str, dict]:
    rows = RecordSet(path).table.drop_columns(["cached"]).to_pylist()
    return {r["prompt_id"]: r for r in rows}


@pytest.fixture(scope="module")
def reference(tiny_teacher, tmp_path_factory) -> Path:
    """An uninterrupted harvest to compare every interrupted one against."""
    out = tmp_path_factory.mktemp("reference")
    manifest = harvest(
        tiny_teacher, PROMPTS, out, sampling=SAMPLING, batch_size=4, cache=False, progress=False
    )
    assert manifest.status == "complete" and manifest.records == 40 and manifest.queries == 40
    return out


@pytest.fixture(scope="module")
def one_by_one(tiny_teacher, tmp_path_factory) -> Path:
    """The same harvest a prompt per batch: forty parts, so an interruption after the first
    has thirty-nine batches of time to land in."""
    out = tmp_path_factory.mktemp("one-by-one")
    harvest(
        tiny_teacher, PROMPTS, out, sampling=SAMPLING, batch_size=1, cache=False, progress=False
    )
    return out


def test_rerun_of_a_complete_harvest_asks_nothing(tiny_teacher, reference):
    before = _rows_by_prompt(reference)
    manifest = _harvest(tiny_teacher, PROMPTS, reference, SAMPLING, cache=False)
    assert manifest.records == 40 and manifest.queries == 40
    assert _rows_by_prompt(reference) == before


def test_cache_serves_repeats_with_identical_answers(tiny_teacher, reference, tmp_path):
    store = ExchangeCache(tmp_path / "cache")
    first = _harvest(tiny_teacher, PROMPTS[:12], tmp_path / "a", SAMPLING, cache=store)
    again = _harvest(tiny_teacher, PROMPTS[:12], tmp_path / "b", SAMPLING, cache=store)
    assert (first.queries, first.cached) == (12, 0)
    assert (again.queries, again.cached) == (0, 12)
    assert _rows_by_prompt(tmp_path / "b") == _rows_by_prompt(tmp_path / "a")
    # batched with other prompts than in the reference run: same samples, logprobs up to float noise
    ref = _rows_by_prompt(reference)
    for prompt_id, row in _rows_by_prompt(tmp_path / "a").items():
        assert row["completion_ids"] == ref[prompt_id]["completion_ids"]
        np.testing.assert_allclose(row["topk_logprobs"], ref[prompt_id]["topk_logprobs"], atol=1e-5)
    other = SamplingConfig(exposure="top5", max_new_tokens=24, seed=5)
    changed = _harvest(tiny_teacher, PROMPTS[:4], tmp_path / "c", other, cache=store)
    assert changed.queries == 4, "another seed is another question: no cache hit"


def test_resuming_under_other_settings_is_refused(tiny_teacher, reference):
    other = SamplingConfig(exposure="top5", max_new_tokens=24, seed=99)
    with pytest.raises(HarvestError, match="other settings"):
        harvest(tiny_teacher, PROMPTS, reference, sampling=other, cache=False, progress=False)
    with pytest.raises(HarvestError, match="other prompts"):
        harvest(
            tiny_teacher, PROMPTS[:10], reference, sampling=SAMPLING, cache=False, progress=False
        )


def _cli(*args: str, env: dict) -> subprocess.Popen:
    """The CLI in a child process that answers Ctrl-C as a terminal's would, even when the tests
    themselves run in the background (``cmd &`` starts them with SIGINT ignored, and a child
    inherits that)."""
    return subprocess.Popen(
        [sys.executable, "-m", "distillscope", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_harvest_resumes_to_exactly_n_unique_records(
    how, tiny_dir, one_by_one, tmp_path
):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(
        "".join(
            json.dumps({"id": p.id, "prompt": p.text, "category": p.category}) + "\n"
            for p in PROMPTS
        )
    )
    out = tmp_path / "run"
    env = {**os.environ, "DISTILLSCOPE_CACHE": str(tmp_path / "cache")}
    args = [
        "harvest",
        "--teacher",
        f"hf:{tiny_dir}",
        "--prompts",
        str(prompts_file),
        "--n",
        "40",
        "--exposure",
        "top5",
        "--max-new-tokens",
        "24",
        "--seed",
        "4",
        "--batch-size",
        "1",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-cache",
    ]
    process = _cli(*args, env=env)
    deadline = time.monotonic() + 120
    # Interrupt right after the first batch lands: on an idle machine the tiny teacher answers
    # the remaining batches in well under a second, so poll tightly.
    while not list((out / "records").glob("part-*.parquet")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    process.send_signal(how)
    _, err = process.communicate(timeout=60)
    if how == signal.SIGINT:
        assert process.returncode == 130 and "rerun the same command to resume" in err
        assert "Traceback" not in err
    partial = RecordSet(out)
    assert 1 <= len(partial) < 40
    # a resumed run finishes the job: exactly N unique records, the same as never interrupted
    finished = _cli(*args, env=env)
    out_text, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    records = RecordSet(out)
    ids = records.table["prompt_id"].to_pylist()
    assert len(ids) == 40 and len(set(ids)) == 40
    assert _rows_by_prompt(out) == _rows_by_prompt(one_by_one)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["queries"] == 40
    assert not list((out / "records").glob(".*"))


def test_harvest_through_an_openai_compatible_server(tiny_teacher, tiny_dir, reference, tmp_path):
    """openai: teacher over real HTTP: ids mapped back, the level served, the same samples."""
    from distillscope.gateway import create_app, serve_in_thread

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(
        "".join(json.dumps({"id": p.id, "prompt": p.text}) + "\n" for p in PROMPTS[:8])
    )
    with serve_in_thread(create_app(tiny_teacher)) as url:
        env = {**os.environ, "DISTILLSCOPE_CACHE": str(tmp_path / "cache")}
        process = _cli(
            "harvest",
            "--teacher",
            f"openai:{url}/v1",
            "--tokenizer",
            f"hf:{tiny_dir}",
            "--prompts",
            str(prompts_file),
            "--n",
            "8",
            "--exposure",
            "top5",
            "--max-new-tokens",
            "24",
            "--seed",
            "4",
            "--concurrency",
            "4",
            "--out",
            str(tmp_path / "remote"),
            env=env,
        )
        _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    records = RecordSet(tmp_path / "remote")
    assert str(records.exposure) == "top5" and records.provenance.token_ids
    assert (
        records.provenance.teacher.startswith("openai:")
        and records.provenance.logprobs == "unknown"
    )
    ref = _rows_by_prompt(reference)
    for prompt_id, row in _rows_by_prompt(tmp_path / "remote").items():
        assert row["completion_ids"] == ref[prompt_id]["completion_ids"]
        assert row["topk_ids"] == ref[prompt_id]["topk_ids"]
        np.testing.assert_allclose(row["topk_logprobs"], ref[prompt_id]["topk_logprobs"], atol=1e-5)
