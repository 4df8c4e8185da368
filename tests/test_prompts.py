"""Prompt pools: the packaged ShareGPT dump, prompt files, labelling and sampling."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from distillscope.errors import PromptSourceError
from distillscope.prompts import (
    CATEGORIES,
    Prompt,
    categorize,
    category_counts,
    iter_sharegpt,
    load_prompts,
    select_prompts,
    sharegpt_path,
)

# --- ShareGPT ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sharegpt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sharegpt-cache")


@pytest.fixture(scope="session")
def sharegpt_loads(sharegpt_cache: Path) -> tuple[list[Prompt], list[Prompt]]:
    """Two loads into one fresh cache: the first parses the dump, the second reads the cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILLSCOPE_CACHE", str(sharegpt_cache))
        return load_prompts("sharegpt"), load_prompts("sharegpt")


def test_iter_sharegpt_recovers_every_complete_conversation_in_little_memory() -> None:
    path = sharegpt_path()
    tracemalloc.start()
    try:
        conversations = [(c["id"], len(c["conversations"])) for c in iter_sharegpt(path)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert path.stat().st_size == 125_509_632
    assert len(conversations) == 17_671
    assert sum(turns for _, turns in conversations) == 129_071
    assert peak < 32 * 2**20  # streamed: nowhere near the 125 MB file


def test_sharegpt_pool_is_large_unique_and_labelled(
    sharegpt_loads: tuple[list[Prompt], list[Prompt]],
) -> None:
    prompts, _ = sharegpt_loads
    assert 5_000 <= len(prompts) <= 11_144  # at most one per conversation opening with a human
    assert len({p.id for p in prompts}) == len(prompts)
    assert len({p.text for p in prompts}) == len(prompts)
    assert all(p.id.startswith("sharegpt:") and p.source == "sharegpt" for p in prompts)
    assert all(p.text and p.text == p.text.strip() for p in prompts)
    counts = category_counts(prompts)
    assert all(counts[c] > 0 for c in CATEGORIES), counts
    assert sum(counts.values()) == len(prompts)
    assert all(p.category == categorize(p.text) for p in prompts[:500])


def test_sharegpt_first_prompt_is_the_first_human_turn(
    sharegpt_loads: tuple[list[Prompt], list[Prompt]],
) -> None:
    prompts, _ = sharegpt_loads
    first = next(iter_sharegpt(sharegpt_path()))
    assert prompts[0].id == f"sharegpt:{first['id']}"
    assert prompts[0].text == first["conversations"][0]["value"].strip()


def test_sharegpt_second_load_returns_the_same_list_from_an_atomic_cache(
    sharegpt_loads: tuple[list[Prompt], list[Prompt]], sharegpt_cache: Path
) -> None:
    cold, cached = sharegpt_loads
    assert cached == cold
    files = sorted(p.name for p in (sharegpt_cache / "prompts").iterdir())
    assert len(files) == 1 and files[0].endswith(".parquet"), files  # no temporary files left


def test_sharegpt_load_reads_the_cache_instead_of_parsing(
    sharegpt_loads: tuple[list[Prompt], list[Prompt]],
    sharegpt_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (cached,) = (sharegpt_cache / "prompts").iterdir()
    table = pq.read_table(cached)
    texts = table.column("text").to_pylist()
    texts[0] = "a marker only the cache holds"
    (tmp_path / "prompts").mkdir()
    pq.write_table(table.set_column(1, "text", pa.array(texts)), tmp_path / "prompts" / cached.name)
    monkeypatch.setenv("DISTILLSCOPE_CACHE", str(tmp_path))
    prompts = load_prompts("sharegpt", limit=3)
    assert [p.text for p in prompts] == [texts[0], *(p.text for p in sharegpt_loads[0][1:3])]


def test_sharegpt_limit_takes_the_first_prompts(
    sharegpt_loads: tuple[list[Prompt], list[Prompt]],
    sharegpt_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DISTILLSCOPE_CACHE", str(sharegpt_cache))
    assert load_prompts("sharegpt", limit=7) == sharegpt_loads[0][:7]


# --- iter_sharegpt on hand-made files ---------------------------------------------------------

_OBJECTS = [
    {"id": "a", "conversations": [{"from": "human", "value": 'say "hi" \\ then\nbye'}]},
    {"id": "b", "conversations": [], "n": [1, 2.5, -3e2, True, False, None]},
    {"id": "c", "nested": {"deep": [{"x": "é ü 漢字 🙂"}, []]}, "empty": {}},
    {"id": "d", "conversations": [{"from": "gpt", "value": "}{][,:"}]},
]


@pytest.mark.parametrize("ensure_ascii", [True, False])
@pytest.mark.parametrize("chunk_chars", [1, 5, 1 << 20])
def test_iter_sharegpt_stops_cleanly_wherever_the_array_is_cut(
    tmp_path: Path, ensure_ascii: bool, chunk_chars: int
) -> None:
    items = [json.dumps(o, indent=2, ensure_ascii=ensure_ascii) for o in _OBJECTS]
    text = "[\n" + ",\n".join(items) + "\n]\n"
    ends = [text.index(item) + len(item) for item in items]
    path = tmp_path / "cut.json"
    for cut in range(len(text) + 1):
        path.write_text(text[:cut], encoding="utf-8")
        complete = sum(end <= cut for end in ends)
        assert list(iter_sharegpt(path, chunk_chars=chunk_chars)) == _OBJECTS[:complete], cut


def test_iter_sharegpt_reads_a_complete_array(tmp_path: Path) -> None:
    path = tmp_path / "whole.json"
    path.write_text(json.dumps(_OBJECTS), encoding="utf-8")
    assert list(iter_sharegpt(path)) == _OBJECTS
    path.write_text("  [ ]  ", encoding="utf-8")
    assert list(iter_sharegpt(path)) == []


@pytest.mark.parametrize(
    "content",
    [
        '{"id": "not in an array"}',
        '[{"id": 1}, 2, {"id": 3}]',
        '[{"id": 1}, {"id": nonsense, "pad": "' + "x" * 100 + '"}, {"id": 3}]',
    ],
    ids=["not-an-array", "non-object-item", "malformed-middle"],
)
def test_iter_sharegpt_rejects_a_file_malformed_before_its_tail(
    tmp_path: Path, content: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptSourceError, match="bad.json"):
        list(iter_sharegpt(path, chunk_chars=8))


# --- categorize -------------------------------------------------------------------------------

_LABELLED = {
    "coding": [
        "Write a Python function that reverses a linked list.",
        'Why does this give me an error?\nTraceback (most recent call last):\n  File "a.py"',
        "```js\nconst x = await fetch(url);\n```\nwhy is x undefined?",
        "How do I join two tables in SQL and keep rows without a match?",
        "My React app throws TypeError: cannot read properties of undefined",
        "Design a REST API for a todo list with authentication.",
    ],
    "reasoning": [
        "Solve for x: 3x + 5 = 20",
        "What is the probability of rolling two sixes with two fair dice?",
        "Prove that the square root of 2 is irrational.",
        "A bat and a ball cost $1.10 in total. How many cents does the ball cost?",
        "Here is a riddle: what has keys but can't open locks?",
        "Calculate 17 * 23 and explain step by step.",
    ],
    "writing": [
        "Write a short poem about autumn leaves.",
        "Rewrite this paragraph to sound more formal.",
        "Draft an email to my landlord asking to fix the heating.",
        "Summarize the plot of Moby Dick in three sentences.",
        "Translate 'good morning, friends' into French.",
        "Give me a cover letter for a barista job.",
    ],
    "other": [
        "What is the capital of Australia?",
        "Recommend three hiking trails near Seattle.",
        "Hello! How are you today?",
        "Is it safe to eat raw cookie dough?",
        "What are the health benefits of green tea?",
    ],
}


@pytest.mark.parametrize(
    ("text", "category"),
    [(text, category) for category, texts in _LABELLED.items() for text in texts],
)
def test_categorize_labels_hand_written_prompts(text: str, category: str) -> None:
    assert categorize(text) == category


def test_categorize_precedence_is_coding_then_reasoning_then_writing() -> None:
    assert categorize("Write a story and a Python script that prints it") == "coding"
    assert categorize("Write an essay that proves the theorem") == "reasoning"
    assert categorize("Write an essay about Rome") == "writing"


@given(st.text(max_size=3000))
def test_categorize_always_returns_a_category(text: str) -> None:
    assert categorize(text) in CATEGORIES


@given(st.text(min_size=2000, max_size=2500), st.text(max_size=500))
def test_categorize_reads_only_the_first_2000_characters(head: str, tail: str) -> None:
    assert categorize(head + tail) == categorize(head)


# --- prompt files -----------------------------------------------------------------------------


def _jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
        encoding="utf-8",
    )
    return path


def test_load_jsonl_reads_every_text_field_ids_and_given_categories(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "pool.jsonl",
        [
            {"prompt": "  Write a poem about the sea.  "},
            "",
            {"text": "Write a poem about rain.", "id": "rain", "category": "coding"},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "first question"},
                    {"role": "assistant", "content": "an answer"},
                    {"role": "user", "content": [{"type": "text", "text": "Solve 2 + 2"}]},
                ],
                "id": 7,
            },
            {"prompt": "   "},
        ],
    )
    prompts = load_prompts(path)
    assert prompts == [
        Prompt("pool:1", "Write a poem about the sea.", "writing", str(path)),
        Prompt("rain", "Write a poem about rain.", "coding", str(path)),
        Prompt("7", "Solve 2 + 2", "reasoning", str(path)),
    ]
    assert load_prompts(path) == prompts  # stable ids across loads
    assert load_prompts(str(path), limit=2) == prompts[:2]


def test_load_json_reads_objects_and_strings(tmp_path: Path) -> None:
    objects = tmp_path / "objects.json"
    objects.write_text(
        json.dumps(
            [{"prompt": "Fix my SQL query", "id": "q"}, {"text": "Hi there", "category": "writing"}]
        ),
        encoding="utf-8",
    )
    assert load_prompts(objects) == [
        Prompt("q", "Fix my SQL query", "coding", str(objects)),
        Prompt("objects:2", "Hi there", "writing", str(objects)),
    ]
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["Tell me a joke", "", "Prove 1 + 1 = 2"]), encoding="utf-8")
    assert [(p.id, p.category) for p in load_prompts(strings)] == [
        ("strings:1", "other"),
        ("strings:3", "reasoning"),
    ]


@pytest.mark.parametrize("column", ["prompt", "text"])
def test_load_parquet_reads_text_ids_and_categories(tmp_path: Path, column: str) -> None:
    path = tmp_path / "pool.parquet"
    pq.write_table(
        pa.table(
            {
                column: ["Write a haiku", None, "What is 6 * 7?"],
                "id": ["h", "x", "m"],
                "category": ["other", None, None],
            }
        ),
        path,
    )
    assert load_prompts(path) == [
        Prompt("h", "Write a haiku", "other", str(path)),
        Prompt("m", "What is 6 * 7?", "reasoning", str(path)),
    ]


def test_load_parquet_without_ids_numbers_rows(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["one", "two"]}), path)
    assert [p.id for p in load_prompts(path)] == ["rows:1", "rows:2"]


def test_load_txt_numbers_non_empty_lines(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_text("Write a limerick\n\n  \nDebug this C++ code\r\nhello\n", encoding="utf-8")
    assert load_prompts(path) == [
        Prompt("lines:1", "Write a limerick", "writing", str(path)),
        Prompt("lines:4", "Debug this C++ code", "coding", str(path)),
        Prompt("lines:5", "hello", "other", str(path)),
    ]


def test_invalid_category_is_rejected_with_its_location(tmp_path: Path) -> None:
    jsonl = _jsonl(
        tmp_path / "cats.jsonl",
        [{"prompt": "a", "category": "coding"}, {"prompt": "b", "category": "math"}],
    )
    with pytest.raises(PromptSourceError, match=r"cats\.jsonl line 2 .*'math'"):
        load_prompts(jsonl)
    parquet = tmp_path / "cats.parquet"
    pq.write_table(
        pa.table({"prompt": ["a", "b", "c"], "category": [None, None, "Coding"]}), parquet
    )
    with pytest.raises(PromptSourceError, match=r"cats\.parquet row 3 "):
        load_prompts(parquet)


# --- errors -----------------------------------------------------------------------------------


def _write(name: str, content: str | bytes) -> Callable[[Path], Path]:
    """A setup step for the error table: write ``content`` to ``name`` in the test's folder."""

    def make(tmp_path: Path) -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    return make


_ERRORS = {
    "missing-file": (lambda tmp: tmp / "absent.jsonl", "does not exist"),
    "directory": (lambda tmp: tmp, "is a directory"),
    "unknown-extension": (_write("pool.csv", "prompt\nhi\n"), "unsupported extension '.csv'"),
    "unparseable-line": (_write("p.jsonl", '{"prompt": "ok"}\n{"prompt": \n'), "line 2"),
    "no-text-field": (_write("p.jsonl", '{"prompt": "ok"}\n{"question": "hi"}\n'), "line 2"),
    "text-not-string": (_write("p.jsonl", '{"prompt": 5}\n'), "line 1"),
    "no-user-message": (
        _write("p.jsonl", '{"messages": [{"role": "system", "content": "x"}]}\n'),
        "line 1",
    ),
    "bad-id": (_write("p.jsonl", '{"prompt": "x", "id": [1]}\n'), "line 1"),
    "repeated-id": (
        _write("p.jsonl", '{"prompt": "x", "id": 1}\n{"prompt": "y", "id": 1}\n'),
        "repeats prompt id '1'",
    ),
    "empty-pool": (_write("p.txt", "\n  \n\n"), "no prompts"),
    "empty-jsonl": (_write("p.jsonl", ""), "no prompts"),
    "json-invalid": (_write("p.json", '[{"prompt": "x"},'), "not valid JSON"),
    "json-not-list": (_write("p.json", '{"prompt": "x"}'), "list"),
    "json-bad-item": (_write("p.json", '["ok", 3]'), "item 2"),
    "not-utf8": (_write("p.txt", b"caf\xe9\n"), "UTF-8"),
    "not-parquet": (_write("p.parquet", b"not a parquet file"), "Parquet"),
    "unknown-name": (lambda tmp: "sharegtp", "unknown prompt pool 'sharegtp'"),
}


@pytest.mark.parametrize(("make", "message"), _ERRORS.values(), ids=_ERRORS.keys())
def test_load_errors_are_prompt_source_errors(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[Path], Path | str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = make(tmp_path)
    with pytest.raises(PromptSourceError, match=message) as raised:
        load_prompts(spec)
    assert "\n" not in str(raised.value)
    if isinstance(spec, Path):
        assert str(spec) in str(raised.value)


def test_parquet_without_text_column_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"question": ["hi"]}), path)
    with pytest.raises(PromptSourceError, match="no 'prompt' or 'text' column"):
        load_prompts(path)


def test_limit_below_one_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(PromptSourceError, match="limit"):
        load_prompts(path, limit=0)


# --- sampling and counting --------------------------------------------------------------------

_POOL = [Prompt(f"pool:{i}", f"prompt {i}", CATEGORIES[i % 4], "pool") for i in range(50)]


def test_select_prompts_is_deterministic_per_seed() -> None:
    first = select_prompts(_POOL, 10, seed=3)
    assert select_prompts(_POOL, 10, seed=3) == first
    assert select_prompts(_POOL, 10, seed=4) != first
    assert select_prompts(_POOL, 10) == select_prompts(_POOL, 10, seed=0)
    assert len({p.id for p in first}) == 10


@given(st.integers(1, 49), st.integers(0, 2**32))
def test_select_prompts_larger_n_extends_a_smaller_sample(n: int, seed: int) -> None:
    small = select_prompts(_POOL, n, seed=seed)
    assert select_prompts(_POOL, n + 1, seed=seed)[:n] == small
    assert set(small) <= set(_POOL)


@pytest.mark.parametrize("n", [0, -1, 51])
def test_select_prompts_rejects_n_outside_the_pool(n: int) -> None:
    with pytest.raises(PromptSourceError, match="pool has 50"):
        select_prompts(_POOL, n)


def test_select_prompts_rejects_an_empty_pool() -> None:
    with pytest.raises(PromptSourceError, match="empty pool"):
        select_prompts([], 1)


def test_category_counts_lists_every_category() -> None:
    assert category_counts(_POOL[:5]) == {"coding": 2, "writing": 1, "reasoning": 1, "other": 1}
    assert category_counts([]) == dict.fromkeys(CATEGORIES, 0)


def test_prompt_refuses_an_unknown_category() -> None:
    with pytest.raises(ValueError, match="category"):
        Prompt("x:1", "text", "poetry", "x")
