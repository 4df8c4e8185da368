"""Exchange records: one teacher answer per row, in Parquet, with the provenance that keeps it
honest.

A record set is a folder of Parquet parts sharing one schema. Each part carries the provenance
(teacher, tokenizer fingerprint, vocab size, exposure, sampling temperature, whether logprobs are
raw, seed...) in its schema metadata, so a part read on its own still says where it came from, and
a consumer with another tokenizer is stopped before it can misalign ids.

Layout per row: ``prompt_id``, ``prompt``, ``category``, ``prompt_ids`` (the exact templated ids the
teacher saw), ``completion_ids`` and ``completion_text``, ``token_logprobs``, ``topk_ids`` and
``topk_logprobs`` as fixed-size lists of k per position, ``tail_mass`` per position,
``finish_reason``, ``prompt_tokens``, and ``cached`` (served from the exchange cache, not queried).
Ids are uint16 when the vocabulary fits (SmolLM2's 49,152 does), logprobs float32.

A turn of an agent trajectory (``agent.trajectories``) is one record too: ``prompt_ids`` are the
whole conversation before the turn (tools, earlier turns, tool results), the completion is the
assistant's turn, and four more columns say what it answered: ``messages`` (the conversation as
OpenAI's JSON messages), ``tools`` (the tools offered, JSON), ``tool_calls`` (the calls the turn
made, JSON in OpenAI's shape) and ``turn`` (0, 1, ... within the trajectory, which shares its
``prompt_id``). They are null in a single-prompt record, and parts written before they existed
read as null. ``export_jsonl`` writes any record set as chat ``messages``, one line per record.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distillscope.errors import IncompatibleDataError
from distillscope.exposure import Exposure, Signal, Text, TopK, parse_exposure
from distillscope.paths import atomic_path, write_text_atomically
from distillscope.prompts import Prompt
from distillscope.teachers.base import Completion
from distillscope.tokens import tokenizer_fingerprint, vocab_size

METADATA_KEY = b"distillscope.provenance"
RECORDS_DIR = "records"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Provenance:
    """Everything that decides whether two records may be trained on together."""

    teacher: str
    tokenizer_hash: str | None
    vocab_size: int | None
    exposure: str
    sampling_temperature: float
    max_new_tokens: int
    max_prompt_tokens: int
    seed: int
    #: ``raw``: log-softmax of the model's logits at temperature 1; ``processed``: after
    #: temperature/top-p; ``unknown``: a remote server that does not say.
    logprobs: str
    #: False when a remote teacher's tokens could not be mapped to ids (strings are kept instead).
    token_ids: bool
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    schema_version: int = SCHEMA_VERSION

    @property
    def k(self) -> int | None:
        level = parse_exposure(self.exposure, max_k=None)
        return level.k if isinstance(level, TopK) else None

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "k": self.k}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Provenance:
        data = json.loads(text)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def identity(self) -> dict:
        """The fields that must agree between parts of one record set (not the creation time)."""
        data = asdict(self)
        data.pop("created_at")
        return data

    def check_tokenizer(self, tokenizer, *, consumer: str = "this run") -> None:
        """Raise unless ``tokenizer`` assigns exactly the ids these records were written in."""
        if not self.token_ids:
            raise IncompatibleDataError(
                f"these records hold token strings, not ids (teacher {self.teacher} was read "
                "without a tokenizer); harvest again with --tokenizer to train on them"
            )
        theirs = tokenizer_fingerprint(tokenizer)
        if theirs != self.tokenizer_hash or vocab_size(tokenizer) != self.vocab_size:
            raise IncompatibleDataError(
                f"records from teacher {self.teacher} use tokenizer {self.tokenizer_hash} "
                f"(vocab {self.vocab_size}), but {consumer} uses {theirs} "
                f"(vocab {vocab_size(tokenizer)}): token ids would silently misalign"
            )


def id_type(provenance: Provenance) -> pa.DataType:
    if provenance.token_ids and provenance.vocab_size and provenance.vocab_size <= 1 << 16:
        return pa.uint16()
    return pa.int32()


#: Columns a record may leave null, added after the first release (agent trajectories).
OPTIONAL_COLUMNS = (
    ("messages", pa.string()),
    ("tools", pa.string()),
    ("tool_calls", pa.string()),
    ("turn", pa.int32()),
)


def records_schema(provenance: Provenance) -> pa.Schema:
    ids = id_type(provenance)
    k = provenance.k
    topk_ids = pa.list_(pa.list_(ids, k)) if k else pa.list_(pa.list_(ids))
    topk_lps = pa.list_(pa.list_(pa.float32(), k)) if k else pa.list_(pa.list_(pa.float32()))
    schema = pa.schema(
        [
            ("prompt_id", pa.string()),
            ("prompt", pa.string()),
            ("category", pa.string()),
            ("prompt_ids", pa.list_(ids)),
            ("completion_text", pa.string()),
            ("completion_ids", pa.list_(ids)),
            ("completion_tokens", pa.list_(pa.string())),
            ("token_logprobs", pa.list_(pa.float32())),
            ("topk_ids", topk_ids),
            ("topk_logprobs", topk_lps),
            ("topk_tokens", pa.list_(pa.list_(pa.string()))),
            ("tail_mass", pa.list_(pa.float32())),
            ("finish_reason", pa.string()),
            ("prompt_tokens", pa.int32()),
            ("cached", pa.bool_()),
            *OPTIONAL_COLUMNS,
        ]
    )
    return schema.with_metadata({METADATA_KEY: provenance.to_json().encode()})


def _ids(values: np.ndarray | None, provenance: Provenance) -> list[int] | None:
    if values is None:
        return None
    values = np.asarray(values, dtype=np.int64)
    if id_type(provenance) == pa.uint16() and values.size and values.min() < 0:
        raise IncompatibleDataError(
            f"teacher {provenance.teacher} returned a token its tokenizer "
            f"{provenance.tokenizer_hash} does not know: is --tokenizer the server's?"
        )
    return values.tolist()


def completion_row(
    prompt: Prompt,
    completion: Completion,
    provenance: Provenance,
    *,
    cached: bool = False,
    messages: list[dict] | None = None,
    tools: list[dict] | None = None,
    turn: int | None = None,
) -> dict:
    """One record row from a prompt and the teacher's answer, at the provenance's exposure;
    ``messages``, ``tools`` and ``turn`` for a turn of a conversation."""
    signal = completion.signal.downgrade(provenance.exposure)
    has_ids = provenance.token_ids
    return {
        "prompt_id": prompt.id,
        "prompt": prompt.text,
        "category": prompt.category,
        "prompt_ids": _ids(completion.prompt_ids, provenance),
        "completion_text": completion.text,
        "completion_ids": _ids(signal.token_ids, provenance) if has_ids else None,
        "completion_tokens": None if has_ids else completion.token_strings,
        "token_logprobs": None if signal.token_logprobs is None else signal.token_logprobs.tolist(),
        "topk_ids": _ids(signal.topk_ids, provenance)
        if has_ids and signal.topk_ids is not None
        else None,
        "topk_logprobs": None if signal.topk_logprobs is None else signal.topk_logprobs.tolist(),
        "topk_tokens": None if has_ids else completion.topk_strings,
        "tail_mass": None if signal.tail_mass is None else signal.tail_mass.tolist(),
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "cached": cached,
        "messages": _json_or_none(messages),
        "tools": _json_or_none(tools),
        "tool_calls": _json_or_none(completion.tool_calls),
        "turn": turn,
    }


def _json_or_none(value) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def write_part(path: Path, rows: Sequence[dict], provenance: Provenance) -> int:
    """Write rows as one Parquet file, atomically: a reader never sees half a part.

    The file is written under a dot-name (ignored by readers), fsynced, then renamed into place.
    Returns the bytes written.
    """
    table = pa.Table.from_pylist(list(rows), schema=records_schema(provenance))
    with atomic_path(path, fsync=True) as staging:
        pq.write_table(
            table, staging, compression="zstd", use_dictionary=["category", "finish_reason"]
        )
    return path.stat().st_size


@dataclass
class Exchange:
    """One record read back: the prompt, the answer, and the signal at the requested exposure."""

    prompt_id: str
    prompt: str
    category: str
    prompt_ids: np.ndarray | None
    completion_text: str
    signal: Signal
    finish_reason: str
    #: a conversation's turn: what it answered, the tools offered, the calls it made
    messages: list[dict] | None = None
    tools: list[dict] | None = None
    tool_calls: list[dict] | None = None
    turn: int | None = None

    def chat(self) -> list[dict]:
        """The exchange as chat messages: the conversation (or the prompt as one user turn) and
        the answer as an assistant message in OpenAI's shape."""
        history = self.messages or [{"role": "user", "content": self.prompt}]
        if self.tool_calls:
            answer = {"role": "assistant", "content": None, "tool_calls": self.tool_calls}
        else:
            answer = {"role": "assistant", "content": self.completion_text}
        return [*history, answer]


class RecordSet:
    """A folder of record parts, read as one table at its stored exposure or any poorer one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise IncompatibleDataError(f"{self.path} does not exist")
        if self.path.is_file():
            if not self.path.name.endswith(".parquet"):
                raise IncompatibleDataError(
                    f"{self.path} is a file: give a harvest folder or one of its part-*.parquet"
                )
            self.parts = [self.path]
        else:
            folder = self.path / RECORDS_DIR if (self.path / RECORDS_DIR).is_dir() else self.path
            self.parts = sorted(p for p in folder.glob("part-*.parquet"))
        if not self.parts:
            raise IncompatibleDataError(
                f"no record parts (part-*.parquet) in {self.path}: give a harvest folder"
            )
        provenances = [_part_provenance(p) for p in self.parts]
        first = provenances[0]
        for part, other in zip(self.parts[1:], provenances[1:]):
            if other.identity() != first.identity():
                raise IncompatibleDataError(
                    f"{part.name} was written with other settings than {self.parts[0].name}: "
                    f"{_diff(first.identity(), other.identity())}"
                )
        self.provenance = first
        self.table = pa.concat_tables(_read_part(p, first) for p in self.parts)

    @property
    def exposure(self) -> Exposure:
        return parse_exposure(self.provenance.exposure, max_k=None)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.parts)

    @property
    def completion_tokens(self) -> int:
        column = "completion_ids" if self.provenance.token_ids else "completion_tokens"
        return int(pc.sum(pc.list_value_length(self.table[column])).as_py() or 0)

    def fingerprint(self) -> str:
        """What identifies this data: provenance, prompts and answers (not paths or times)."""
        digest = hashlib.sha256(json.dumps(self.provenance.identity(), sort_keys=True).encode())
        column = "completion_ids" if self.provenance.token_ids else "completion_tokens"
        for name in ("prompt_id", column):
            digest.update(json.dumps(self.table[name].to_pylist()).encode())
        return digest.hexdigest()[:16]

    def check_compatible(self, tokenizer, *, consumer: str = "this run", reader=None) -> None:
        """Raise unless ``tokenizer`` assigns exactly the ids these records were written in.

        A student with another tokenizer asks for that explicitly by naming ``reader``, the
        tokenizer the records' ids are read with: ``reader`` is checked instead, and the student's
        ids come from re-tokenising the text those ids spell (``distill.crosstok``), so no id of
        one vocabulary is ever read as the other's.
        """
        self.provenance.check_tokenizer(tokenizer if reader is None else reader, consumer=consumer)

    def exchanges(self, exposure: Exposure | str | None = None) -> Iterator[Exchange]:
        """Every record with its signal downgraded exactly to ``exposure`` (default: as stored)."""
        stored = self.exposure
        target = stored if exposure is None else parse_exposure(exposure, max_k=None)
        columns = self.table.to_pydict()
        for i in range(len(self)):
            ids_column = columns["completion_ids"][i]
            token_ids = np.asarray(ids_column if ids_column is not None else [], dtype=np.int64)
            signal = Signal(stored, token_ids)
            if columns["token_logprobs"][i] is not None:
                signal.token_logprobs = np.asarray(columns["token_logprobs"][i], dtype=np.float32)
            if isinstance(stored, TopK):
                signal.topk_ids = np.asarray(columns["topk_ids"][i], dtype=np.int64).reshape(
                    -1, stored.k
                )
                signal.topk_logprobs = np.asarray(
                    columns["topk_logprobs"][i], dtype=np.float32
                ).reshape(-1, stored.k)
                signal.tail_mass = np.asarray(columns["tail_mass"][i], dtype=np.float32)
            prompt_ids = columns["prompt_ids"][i]
            loaded = {
                name: None if columns[name][i] is None else json.loads(columns[name][i])
                for name in ("messages", "tools", "tool_calls")
            }
            yield Exchange(
                prompt_id=columns["prompt_id"][i],
                prompt=columns["prompt"][i],
                category=columns["category"][i],
                prompt_ids=None if prompt_ids is None else np.asarray(prompt_ids, dtype=np.int64),
                completion_text=columns["completion_text"][i],
                signal=signal.downgrade(target),
                finish_reason=columns["finish_reason"][i],
                turn=columns["turn"][i],
                **loaded,
            )

    def summary(self) -> dict:
        """Counts, exposure, provenance and storage cost, as ``data inspect`` prints them."""
        tokens = self.completion_tokens
        cached = int(pc.sum(self.table["cached"]).as_py() or 0)
        categories = self.table["category"].to_pylist()
        stored = self.exposure
        return {
            "path": str(self.path),
            "records": len(self),
            "unique_prompts": len(set(self.table["prompt_id"].to_pylist())),
            "parts": len(self.parts),
            "exposure": str(stored),
            "has_tail_mass": isinstance(stored, TopK),
            "queries": len(self) - cached,
            "cached": cached,
            "prompt_tokens": int(pc.sum(self.table["prompt_tokens"]).as_py() or 0),
            "completion_tokens": tokens,
            "bytes_on_disk": self.bytes_on_disk,
            "bytes_per_token": self.bytes_on_disk / tokens if tokens else None,
            "categories": {c: categories.count(c) for c in sorted(set(categories))},
            "provenance": json.loads(self.provenance.to_json()),
        }


def export_jsonl(records: RecordSet, out: str | os.PathLike) -> dict:
    """Write every record as one JSON line of chat ``messages`` (tool calls and tool results in
    OpenAI's shape), ``tools``, and the teacher's logprobs of the answer where the records hold
    them; the provenance goes beside, in ``OUT`` with the suffix ``.provenance.json``.

    A line: ``prompt_id``, ``turn``, ``category``, ``messages`` (the last one is the answer to
    train on), ``tools`` (or null), ``teacher_logprobs``: null at ``text``, else
    ``{token_ids, token_logprobs, topk_ids, topk_logprobs, tail_mass}`` over the answer's tokens,
    ids in the tokenizer the provenance names. Returns counts.
    """
    out = Path(out)
    lines, calls = 0, 0
    with atomic_path(out) as staging, open(staging, "w", encoding="utf-8") as sink:
        for exchange in records.exchanges():
            signal = exchange.signal
            logprobs = None
            if signal.token_logprobs is not None:
                logprobs = {
                    "token_ids": signal.token_ids.tolist(),
                    "token_logprobs": signal.token_logprobs.tolist(),
                    "topk_ids": None if signal.topk_ids is None else signal.topk_ids.tolist(),
                    "topk_logprobs": None
                    if signal.topk_logprobs is None
                    else signal.topk_logprobs.tolist(),
                    "tail_mass": None if signal.tail_mass is None else signal.tail_mass.tolist(),
                }
            line = {
                "prompt_id": exchange.prompt_id,
                "turn": exchange.turn,
                "category": exchange.category,
                "messages": exchange.chat(),
                "tools": exchange.tools,
                "teacher_logprobs": logprobs,
            }
            sink.write(json.dumps(line, ensure_ascii=False) + "\n")
            lines += 1
            calls += len(exchange.tool_calls or ())
    provenance = out.with_suffix(".provenance.json")
    write_text_atomically(provenance, records.provenance.to_json() + "\n")
    return {
        "out": str(out),
        "provenance": str(provenance),
        "lines": lines,
        "tool_calls": calls,
        "exposure": str(records.exposure),
    }


def provenance_for(teacher, sampling, *, exposure: Exposure | None = None) -> Provenance:
    """The provenance of records a teacher produces with ``sampling`` (at ``exposure`` if given)."""
    tokenizer = teacher.tokenizer
    level = exposure or sampling.exposure
    return Provenance(
        teacher=teacher.id,
        tokenizer_hash=tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        vocab_size=vocab_size(tokenizer) if tokenizer is not None else None,
        exposure=str(level),
        sampling_temperature=sampling.temperature,
        max_new_tokens=sampling.max_new_tokens,
        max_prompt_tokens=sampling.max_prompt_tokens,
        seed=sampling.seed,
        logprobs="none" if isinstance(level, Text) else teacher.logprobs_kind,
        token_ids=tokenizer is not None,
    )


def _part_provenance(part: Path) -> Provenance:
    """A part's provenance, or a one-line reason it is not a readable record part."""
    try:
        metadata = pq.read_schema(part).metadata or {}
    except (pa.ArrowException, OSError) as exc:
        raise IncompatibleDataError(
            f"{part} is not a readable Parquet file ({_first_line(exc)}): remove it, or harvest "
            "again into that folder to rewrite it"
        ) from None
    if METADATA_KEY not in metadata:
        raise IncompatibleDataError(
            f"{part} is Parquet but not a distillscope record part (no provenance): move it out "
            "of the record folder"
        )
    try:
        return Provenance.from_json(metadata[METADATA_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise IncompatibleDataError(f"{part} has unreadable provenance ({exc})") from None


def _read_part(part: Path, provenance: Provenance) -> pa.Table:
    """A part's rows in the record schema, or a one-line reason they cannot be read."""
    try:
        table = pq.read_table(part)
    except (pa.ArrowException, OSError) as exc:
        raise IncompatibleDataError(
            f"{part} is damaged ({_first_line(exc)}): remove it, or harvest again into that "
            "folder to rewrite it"
        ) from None
    expected = records_schema(provenance)
    for name, kind in OPTIONAL_COLUMNS:
        if name not in table.column_names:  # a part written before the column existed
            table = table.append_column(name, pa.nulls(table.num_rows, kind))
    missing = [n for n in expected.names if n not in table.column_names]
    if missing:
        raise IncompatibleDataError(
            f"{part} lacks the record columns {', '.join(missing)}: it is not a record part"
        )
    return table.select(expected.names)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a[k]!r} vs {b.get(k)!r}" for k in a if a[k] != b.get(k))
