"""Prompt templates and how they are filled: slots, bundles of slots that agree, paraphrase.

The bank itself is data (``data/templates.yaml``, ``data/slots.yaml``, ``data/phrases.yaml``):
hydra operators draw from ``TEMPLATES``, the background population's own pipelines from
``PIPELINE_TEMPLATES``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from distillscope.traffic.material import Material, data


@dataclass(frozen=True)
class Template:
    """A prompt skeleton: ``{slot}`` fields, a canonical wording and its paraphrases."""

    id: str
    system: str | None
    wordings: tuple[str, ...]

    @property
    def capability(self) -> str:
        return self.id.split("/")[0]


def _templates(kind: str) -> tuple[Template, ...]:
    bank = data("templates")
    systems = bank["systems"]
    return tuple(
        Template(t["id"], systems.get(t["system"], t["system"]), tuple(t["wordings"]))
        for t in bank[kind]
    )


TEMPLATES = _templates("campaign")
#: Legitimate pipelines' own templates (integration accounts): repetitive, but one account each.
PIPELINE_TEMPLATES = _templates("pipeline")
#: Chain-of-thought elicitation hydra campaigns add to a templated prompt (``cot_rate``).
COT_PHRASES: tuple[str, ...] = tuple(data("phrases")["cot"])
_SYNONYMS: tuple[tuple[str, str], ...] = tuple(tuple(p) for p in data("phrases")["synonyms"])
_SLOTS: dict[str, list[str]] = data("slots")["slots"]
_BUNDLES: dict[str, list[dict]] = data("slots")["bundles"]
_NUMBERS: dict[str, list[int]] = data("slots")["numbers"]
_BUNDLE_OF = {slot: name for name, entries in _BUNDLES.items() for slot in entries[0]}
_SLOT = re.compile(r"(\{[^{}]*\})")
#: A slot inside a slot's value (JSON braces in a value are left alone).
_NESTED = re.compile(r"\{([a-z_0-9]+)\}")


def paraphrase(wording: str, r: random.Random) -> str:
    """Swap synonyms in the wording's fixed text, never inside a ``{slot}``."""
    parts = _SLOT.split(wording)
    for i in range(0, len(parts), 2):
        for old, new in _SYNONYMS:
            if old in parts[i] and r.random() < 0.5:
                parts[i] = parts[i].replace(old, new, 1)
    return "".join(parts)


class Slots(dict):
    """Values for one rendering, drawn on first use (a slot used twice gets the same value)."""

    def __init__(self, r: random.Random, material: Material, filler: Callable[[int], str]):
        super().__init__()
        self.r, self.material, self.filler = r, material, filler

    def __missing__(self, key: str) -> str:
        r = self.r
        if key in _NUMBERS:
            value = str(r.randint(*_NUMBERS[key]))
        elif key.startswith("seed_"):
            pool = self.material.prompts[key.removeprefix("seed_")] or self.material.prompts["any"]
            value = r.choice(pool)
        elif key.startswith("reply_excerpt"):
            value = self.filler(r.randint(40, 140))
        elif key == "id":  # literal path parameters in ``endpoints``
            return "{id}"
        elif key in _BUNDLE_OF:
            for slot, choice in r.choice(_BUNDLES[_BUNDLE_OF[key]]).items():
                value = r.choice(choice) if isinstance(choice, list) else choice
                self[slot] = _NESTED.sub(lambda m: self[m.group(1)], value)
            return self[key]
        else:
            value = _NESTED.sub(lambda m: self[m.group(1)], r.choice(_SLOTS[key]))
        self[key] = value
        return value


def render(
    template: Template,
    r: random.Random,
    material: Material,
    filler: Callable[[int], str],
    *,
    paraphrase_rate: float = 0.0,
    cot_rate: float = 0.0,
) -> list[dict[str, str]]:
    """Chat messages from a template: slots filled, maybe paraphrased, maybe a CoT phrase."""
    wording = template.wordings[0]
    if len(template.wordings) > 1 and r.random() < paraphrase_rate:
        wording = paraphrase(r.choice(template.wordings[1:]), r)
    slots = Slots(r, material, filler)
    user = wording.format_map(slots)
    if r.random() < cot_rate:
        user = (
            f"{user}\n\n{r.choice(COT_PHRASES)}"
            if r.random() < 0.7
            else f"{r.choice(COT_PHRASES)} {user}"
        )
    messages = [{"role": "user", "content": user}]
    if template.system:
        messages.insert(0, {"role": "system", "content": template.system.format_map(slots)})
    return messages
