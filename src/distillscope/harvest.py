"""Harvest: prompts in, exchange records out; incremental, resumable, and cached by content.

An output folder holds ``plan.parquet`` (the prompts to ask, fixed when the harvest starts),
``records/part-*.parquet`` (one part per batch, each written atomically) and ``manifest.json``
(settings and counts). Rerunning the same harvest skips every prompt already in a part, so an
interruption at any point (Ctrl-C, kill -9, a server that gives up) loses at most the batch in
flight and never duplicates a record.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distillscope import __version__
from distillscope.errors import HarvestError
from distillscope.exposure import Exposure, is_at_least, parse_exposure, richness
from distillscope.paths import atomic_path, cache_dir, write_text_atomically
from distillscope.prompts import Prompt
from distillscope.records import (
    METADATA_KEY,
    RECORDS_DIR,
    Provenance,
    RecordSet,
    completion_row,
    provenance_for,
    write_part,
)
from distillscope.teachers.base import Completion, SamplingConfig, Teacher

PLAN = "plan.parquet"
MANIFEST = "manifest.json"


class ExchangeCache:
    """Content-addressed store of teacher answers: the same question, asked the same way, once.

    The key hashes the teacher id, tokenizer fingerprint, every sampling setting (seed included)
    and the prompt text, so a hit is exactly the answer a new query would have produced.
    """

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else cache_dir("exchanges")

    @staticmethod
    def key(provenance: Provenance, requested: Exposure, prompt: str) -> str:
        identity = provenance.identity()
        identity["requested_exposure"] = str(requested)
        payload = json.dumps([identity, prompt], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"part-{key}.parquet"

    def get(self, key: str, level: Exposure | None = None) -> dict | None:
        """The stored answer, or ``None``; with ``level``, only an answer stored at that level
        (a server that capped exposure once may serve another key differently)."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            table = pq.read_table(path)
            if level is not None and Provenance.from_json(
                table.schema.metadata[METADATA_KEY]
            ).exposure != str(level):
                return None
            return table.to_pylist()[0]
        except (OSError, pa.ArrowInvalid, IndexError, KeyError, ValueError):
            return None  # a damaged entry is a miss; it is rewritten after the next query

    def put(self, key: str, row: dict, provenance: Provenance) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_part(path, [row], provenance)


@dataclass
class HarvestManifest:
    """What a harvest folder holds: settings, progress and cost."""

    out: str
    teacher: str
    prompts: str
    sampling: dict
    requested_exposure: str
    exposure: str
    status: str
    planned: int
    records: int
    queries: int
    cached: int
    prompt_tokens: int
    completion_tokens: int
    bytes_on_disk: int
    bytes_per_token: float | None
    generation_seconds: float
    generated_tokens_per_second: float | None
    distillscope_version: str = __version__

    def write(self) -> None:
        path = Path(self.out) / MANIFEST
        write_text_atomically(path, json.dumps(self.__dict__, indent=2) + "\n")


def ensure_writable(out: str | os.PathLike) -> None:
    """Create ``out`` for records, or raise HarvestError now rather than after the first batch."""
    out = Path(out)
    try:
        (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise HarvestError(f"cannot write to {out}: {exc.strerror or exc}") from exc
    for stale in (out / RECORDS_DIR).glob(".part-*.tmp-*"):
        stale.unlink(missing_ok=True)  # a batch that was being written when the run died


def load_plan(out: Path, prompts: Sequence[Prompt]) -> list[Prompt]:
    """The prompts this folder is committed to; a rerun must ask for the same ones."""
    path = out / PLAN
    wanted = pa.Table.from_pylist(
        [
            {"prompt_id": p.id, "prompt": p.text, "category": p.category, "source": p.source}
            for p in prompts
        ],
        schema=pa.schema(
            [
                ("prompt_id", pa.string()),
                ("prompt", pa.string()),
                ("category", pa.string()),
                ("source", pa.string()),
            ]
        ),
    )
    if path.is_file():
        stored = pq.read_table(path)
        if not stored.equals(wanted):
            raise HarvestError(
                f"{out} already holds a harvest of {stored.num_rows} other prompts; "
                "use a new --out, or the same prompts, --n and --seed to resume"
            )
    else:
        ids = [p.id for p in prompts]
        if len(set(ids)) != len(ids):
            raise HarvestError("the prompt list repeats an id; every prompt needs its own id")
        with atomic_path(path) as staging:
            pq.write_table(wanted, staging)
    return list(prompts)


def _check_settings(out: Path, teacher: Teacher, sampling: SamplingConfig) -> str | None:
    """Refuse to resume under other settings; return the exposure the earlier run was served."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    before = json.loads(path.read_text())
    now = {"teacher": teacher.id, "sampling": sampling.as_dict()}
    changed = [k for k in now if before.get(k) != now[k]]
    if changed:
        detail = "; ".join(f"{k}: was {before.get(k)!r}, now {now[k]!r}" for k in changed)
        raise HarvestError(f"{out} was harvested with other settings ({detail}); use a new --out")
    return before.get("exposure")


def harvest(
    teacher: Teacher,
    prompts: Sequence[Prompt],
    out: str | os.PathLike,
    *,
    sampling: SamplingConfig,
    batch_size: int | None = None,
    cache: ExchangeCache | bool = True,
    prompts_label: str = "",
    progress: bool = True,
) -> HarvestManifest:
    """Ask ``teacher`` every prompt once at ``sampling.exposure`` and store the answers in ``out``.

    Resumes a harvest with the same settings found in ``out``. When the teacher serves less than
    was asked (a remote tier that caps top-k, a server without logprobs), the records are stored at
    the level actually served and the manifest says so; a level that drops mid-harvest is an error.
    """
    out = Path(out)
    ensure_writable(out)
    served_before = _check_settings(out, teacher, sampling)
    plan = load_plan(out, prompts)
    store = ExchangeCache() if cache is True else (cache or None)
    requested = sampling.exposure
    level = parse_exposure(served_before, max_k=None) if served_before else requested
    existing = RecordSet(out) if any((out / RECORDS_DIR).glob("part-*.parquet")) else None
    done = set(existing.table["prompt_id"].to_pylist()) if existing else set()
    next_part = len(existing.parts) if existing else 0
    # Similar lengths share a batch (less padding); ties by id, so batches never depend on order.
    remaining = sorted((p for p in plan if p.id not in done), key=lambda p: (len(p.text), p.id))
    batch_size = batch_size or getattr(teacher, "batch_size", 16)

    manifest = HarvestManifest(
        out=str(out),
        teacher=teacher.id,
        prompts=prompts_label,
        sampling=sampling.as_dict(),
        requested_exposure=str(requested),
        exposure=str(level),
        status="running",
        planned=len(plan),
        records=len(done),
        queries=0,
        cached=0,
        prompt_tokens=0,
        completion_tokens=0,
        bytes_on_disk=0,
        bytes_per_token=None,
        generation_seconds=0.0,
        generated_tokens_per_second=None,
    )
    if existing:
        _fill_counts(manifest, existing)
    previous_seconds = _previous_generation_seconds(out)
    generation_seconds, generated_tokens = 0.0, 0
    manifest.write()

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]harvest[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    )
    try:
        with bar:
            task = bar.add_task(str(level), total=len(plan), completed=len(done))
            # once, and again only if the level served changes (hashing the tokenizer is most of
            # a small batch's time)
            provenance = provenance_for(teacher, sampling, exposure=level)
            for start in range(0, len(remaining), batch_size):
                batch = remaining[start : start + batch_size]
                keys = [ExchangeCache.key(provenance, requested, p.text) for p in batch]
                hits = {
                    i: row for i, k in enumerate(keys) if store and (row := store.get(k, level))
                }
                misses = [i for i in range(len(batch)) if i not in hits]
                fresh: dict[int, Completion] = {}
                if misses:
                    began = time.perf_counter()
                    answers = teacher.generate([batch[i].text for i in misses], sampling)
                    generation_seconds += time.perf_counter() - began
                    generated_tokens += sum(a.completion_tokens for a in answers)
                    fresh = dict(zip(misses, answers))
                    served = min((a.signal.exposure for a in answers), key=richness)
                    if not is_at_least(served, level):
                        if next_part or hits:
                            raise HarvestError(
                                f"the teacher served {served} after serving {level} earlier in "
                                "this harvest; records cannot mix levels"
                            )
                        level = served
                        provenance = provenance_for(teacher, sampling, exposure=level)
                        bar.update(task, description=f"{level} (asked {requested})")
                rows = []
                for i, prompt in enumerate(batch):
                    if i in hits:
                        rows.append(
                            {
                                **hits[i],
                                "prompt_id": prompt.id,
                                "prompt": prompt.text,
                                "category": prompt.category,
                                "cached": True,
                            }
                        )
                    else:
                        rows.append(completion_row(prompt, fresh[i], provenance))
                write_part(out / RECORDS_DIR / f"part-{next_part:06d}.parquet", rows, provenance)
                next_part += 1
                if store:
                    for i in misses:
                        store.put(keys[i], rows[i], provenance)
                bar.advance(task, len(batch))
                manifest.exposure = str(level)
                _count(manifest, rows)
                manifest.generation_seconds = previous_seconds + generation_seconds
                manifest.write()
        manifest.status = "complete"
    except BaseException:
        manifest.status = "interrupted"
        raise
    finally:
        if any((out / RECORDS_DIR).glob("part-*.parquet")):
            _fill_counts(manifest, RecordSet(out))
        manifest.generation_seconds = previous_seconds + generation_seconds
        if generated_tokens and generation_seconds:
            manifest.generated_tokens_per_second = generated_tokens / generation_seconds
        manifest.write()
    return manifest


def _previous_generation_seconds(out: Path) -> float:
    path = out / MANIFEST
    if path.is_file():
        return float(json.loads(path.read_text()).get("generation_seconds", 0.0))
    return 0.0


def _fill_counts(manifest: HarvestManifest, records: RecordSet) -> None:
    """Counts recomputed from what is on disk: the truth after a resume or an interruption."""
    summary = records.summary()
    for name in (
        "records",
        "queries",
        "cached",
        "prompt_tokens",
        "completion_tokens",
        "bytes_on_disk",
        "bytes_per_token",
    ):
        setattr(manifest, name, summary[name])


def _count(manifest: HarvestManifest, rows: list[dict]) -> None:
    """Counts advanced by one batch, so the manifest stays current without rereading every part."""
    manifest.records += len(rows)
    manifest.cached += sum(r["cached"] for r in rows)
    manifest.queries += sum(not r["cached"] for r in rows)
    manifest.prompt_tokens += sum(r["prompt_tokens"] for r in rows)
    manifest.completion_tokens += sum(
        len(r["completion_ids"] or r["completion_tokens"] or []) for r in rows
    )
