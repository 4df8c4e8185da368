"""What simulated requests are made of: real ShareGPT text, and the simulator's data files.

``sharegpt()`` reads the conversations once per process; ``data(name)`` reads one of the YAML
files under ``traffic/data/`` (templates, slots, phrases, clients, grammar, legit, tools).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

DATA_DIR = Path(__file__).parent / "data"

#: Turns of a conversation kept, and characters of a human turn (pasted logs run to 100 kB).
_MAX_TURNS = 8
_TURN_CHARS = 2500
_SEED_CHARS = 1200


@functools.cache
def data(name: str) -> dict:
    """The data file ``traffic/data/<name>.yaml``."""
    return yaml.safe_load((DATA_DIR / f"{name}.yaml").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Material:
    """Real text to draw from: conversations for users, prompts for slots, words for filler."""

    #: (category of the opening prompt, human turns) per ShareGPT conversation.
    conversations: list[tuple[str, tuple[str, ...]]]
    #: Opening prompts per category, and all of them.
    prompts: dict[str, list[str]]
    #: Running text of ShareGPT's answers, as words: completions are slices of it.
    words: list[str]


@functools.cache
def sharegpt() -> Material:
    from distillscope.prompts import CATEGORIES, iter_sharegpt, load_prompts, sharegpt_path

    category = {p.id: p.category for p in load_prompts("sharegpt")}
    conversations: list[tuple[str, tuple[str, ...]]] = []
    prompts: dict[str, list[str]] = {c: [] for c in (*CATEGORIES, "any")}
    words: list[str] = []
    for conversation in iter_sharegpt(sharegpt_path()):
        turns = conversation.get("conversations") or []
        if len(words) < 600_000:
            for turn in turns:
                if turn.get("from") == "gpt" and isinstance(turn.get("value"), str):
                    words.extend(turn["value"].split())
        kind = category.get(f"sharegpt:{conversation.get('id')}")
        if kind is None:  # no human opening, or a repeat: load_prompts skipped it
            continue
        humans = tuple(
            t["value"].strip()[:_TURN_CHARS]
            for t in turns
            if t.get("from") == "human" and isinstance(t.get("value"), str) and t["value"].strip()
        )
        if not humans:
            continue
        conversations.append((kind, humans[:_MAX_TURNS]))
        prompts[kind].append(humans[0][:_SEED_CHARS])
        prompts["any"].append(humans[0][:_SEED_CHARS])
    return Material(conversations, prompts, words)
