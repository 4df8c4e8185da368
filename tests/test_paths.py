"""Atomic writes: a reader sees the old file or folder, or the whole new one, never a part."""

from __future__ import annotations

import os
import threading

import pytest

from distillscope.paths import atomic_path, write_text_atomically


def test_a_written_file_replaces_the_old_one_and_leaves_no_staging(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    write_text_atomically(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_staging(tmp_path):
    target = tmp_path / "plan.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, fsync=True) as staging:
        staging.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.parquet"]


def test_a_staged_folder_replaces_a_folder_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("x")
    with atomic_path(target) as staging:
        assert staging.name.startswith(".model.tmp-")
        staging.mkdir()
        (staging / "weights.bin").write_text("w")
    assert [p.name for p in target.iterdir()] == ["weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_leftover_staging_of_the_same_writer_is_cleared_first(tmp_path):
    target = tmp_path / "step-0000010"
    leftover = tmp_path / f".step-0000010.tmp-{os.getpid()}-{threading.get_ident()}"
    leftover.mkdir()
    (leftover / "state.pt").write_text("half")  # a kill -9 mid-save
    with atomic_path(target) as staging:
        assert staging == leftover and not staging.exists()
        staging.mkdir()
    assert target.is_dir() and [p.name for p in tmp_path.iterdir()] == ["step-0000010"]
