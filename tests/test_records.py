"""Exchange records: compact Parquet, provenance that travels, and loud failure on misalignment."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from distillscope.errors import IncompatibleDataError
from distillscope.prompts import Prompt
from distillscope.records import RecordSet, completion_row, provenance_for, write_part
from distillscope.teachers import SamplingConfig

PROMPTS = [
    Prompt(f"t:{i}", text, "other", "test")
    for i, text in enumerate(["Name a colour.", "Count to three.", "Say something kind."])
]


@pytest.fixture(scope="module")
def top5_parts(tiny_teacher, tmp_path_factory):
    sampling = SamplingConfig(exposure="top5", max_new_tokens=7, seed=2)
    answers = tiny_teacher.generate([p.text for p in PROMPTS], sampling)
    provenance = provenance_for(tiny_teacher, sampling)
    out = tmp_path_factory.mktemp("records") / "records"
    out.mkdir()
    write_part(
        out / "part-000000.parquet",
        [completion_row(p, a, provenance) for p, a in zip(PROMPTS, answers)],
        provenance,
    )
    return out.parent, answers, provenance


def test_round_trip_is_exact_at_every_poorer_level(top5_parts):
    path, answers, _ = top5_parts
    records = RecordSet(path)
    assert len(records) == 3 and str(records.exposure) == "top5"
    for level in ("top5", "top2", "top1", "text"):
        for exchange, answer in zip(records.exchanges(level), answers):
            expected = answer.signal.downgrade(level)
            np.testing.assert_array_equal(exchange.signal.token_ids, expected.token_ids)
            if level != "text":
                np.testing.assert_array_equal(exchange.signal.topk_ids, expected.topk_ids)
                np.testing.assert_array_equal(exchange.signal.topk_logprobs, expected.topk_logprobs)
                np.testing.assert_array_equal(exchange.signal.tail_mass, expected.tail_mass)
            np.testing.assert_array_equal(exchange.prompt_ids, answer.prompt_ids)
            assert exchange.completion_text == answer.text


def test_compact_dtypes_and_provenance_in_every_part(top5_parts):
    path, _, provenance = top5_parts
    [part] = RecordSet(path).parts
    schema = pq.read_schema(part)
    assert schema.field("completion_ids").type == pa.list_(pa.uint16())
    assert schema.field("topk_ids").type == pa.list_(pa.list_(pa.uint16(), 5))
    assert schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float32(), 5))
    meta = json.loads(schema.metadata[b"distillscope.provenance"])
    for key in (
        "teacher",
        "tokenizer_hash",
        "vocab_size",
        "sampling_temperature",
        "logprobs",
        "k",
        "seed",
        "created_at",
    ):
        assert key in meta
    assert meta["k"] == 5 and meta["logprobs"] == "raw" and meta["vocab_size"] == 49152


def test_same_tokenizer_passes_and_another_fails_loudly(top5_parts, tiny_dir):
    path, _, _ = top5_parts
    records = RecordSet(path)
    same = AutoTokenizer.from_pretrained(tiny_dir)
    records.check_compatible(same)
    other = AutoTokenizer.from_pretrained(tiny_dir)
    other.add_tokens(["<|new-token|>"])
    with pytest.raises(IncompatibleDataError, match="misalign"):
        records.check_compatible(other, consumer="student tiny")
    # the fingerprint is remembered per tokenizer, and taken again once it gains a token
    grown = AutoTokenizer.from_pretrained(tiny_dir)
    records.check_compatible(grown)
    grown.add_tokens(["<|another|>"])
    with pytest.raises(IncompatibleDataError, match="misalign"):
        records.check_compatible(grown)


def test_parts_with_other_settings_cannot_be_read_together(top5_parts, tiny_teacher, tmp_path):
    path, answers, _ = top5_parts
    folder = tmp_path / "records"
    folder.mkdir()
    for i, seed in enumerate((2, 3)):
        sampling = SamplingConfig(exposure="top5", max_new_tokens=7, seed=seed)
        provenance = provenance_for(tiny_teacher, sampling)
        write_part(
            folder / f"part-{i:06d}.parquet",
            [completion_row(PROMPTS[0], answers[0], provenance)],
            provenance,
        )
    with pytest.raises(IncompatibleDataError, match="seed"):
        RecordSet(tmp_path)


def test_text_records_hold_no_logprobs(tiny_teacher, tmp_path):
    sampling = SamplingConfig(exposure="text", max_new_tokens=5)
    [answer] = tiny_teacher.generate([PROMPTS[0].text], sampling)
    provenance = provenance_for(tiny_teacher, sampling)
    (tmp_path / "records").mkdir()
    write_part(
        tmp_path / "records" / "part-000000.parquet",
        [completion_row(PROMPTS[0], answer, provenance)],
        provenance,
    )
    records = RecordSet(tmp_path)
    row = records.table.to_pylist()[0]
    assert row["token_logprobs"] is None and row["topk_ids"] is None and row["tail_mass"] is None
    assert records.summary()["has_tail_mass"] is False
    with pytest.raises(Exception, match="upgrade"):
        next(records.exchanges("top1"))


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(IncompatibleDataError, match="no record parts"):
        RecordSet(tmp_path)


def test_damaged_and_foreign_parts_are_one_line_errors(top5_parts, cli, tmp_path):
    """A truncated part, or Parquet that is not a record part, named in one line by `data
    inspect` and `distill --data` alike; a part file itself can be inspected."""
    import json
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import one_line_error

    path, _, _ = top5_parts
    part = path / "records" / "part-000000.parquet"
    shown = cli("data", "inspect", part, "--json")
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.stdout)["records"] == len(PROMPTS)
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    copy = damaged / "records" / part.name
    copy.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    for args in (
        ("data", "inspect", damaged),
        ("distill", "--data", damaged, "--out", tmp_path / "s"),
    ):
        one_line_error(cli(*args), part.name, "Parquet")
    assert not (tmp_path / "s").exists()
    foreign = tmp_path / "foreign"
    (foreign / "records").mkdir(parents=True)
    pq.write_table(pa.table({"a": [1]}), foreign / "records" / "part-000001.parquet")
    one_line_error(cli("data", "inspect", foreign), "not a distillscope record part")
    one_line_error(cli("data", "inspect", tmp_path / "notes.txt"), "does not exist")
    (tmp_path / "notes.txt").write_text("x")
    one_line_error(cli("data", "inspect", tmp_path / "notes.txt"), "harvest folder")
