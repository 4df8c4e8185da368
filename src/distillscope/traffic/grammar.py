"""Prompts composed from a grammar (``data/grammar.yaml``) rather than a template bank: requests
for agentic coding with the tool trace narrated (``narrated_task``), and real prompts wrapped in
a request to show the whole reasoning (``reasoning_wrap``). Both are worded many ways on purpose:
a detector must recognise the intent, not a phrase."""

from __future__ import annotations

import random
import re

from distillscope.traffic.material import data

_SLOT = re.compile(r"\{([a-z_]+)\}")


def fill(text: str, r: random.Random, values: dict[str, list[str]]) -> str:
    """``text`` with each ``{slot}`` replaced by a draw from ``values[slot]`` (left as is when
    ``values`` has no such list)."""
    return _SLOT.sub(
        lambda m: r.choice(values[m.group(1)]) if m.group(1) in values else m.group(0), text
    )


def tool_list(r: random.Random) -> str:
    """Three to five tool names, named inline in one of several formats."""
    g = data("grammar")
    names = r.sample(g["tools"], r.randint(3, 5))
    text = r.choice(g["tool_formats"]).format(a=names[0], b=names[1], c=names[2])
    if len(names) > 3 and r.random() < 0.5:
        text += f", also {' and '.join(names[3:])}"
    return text


def narrated_task(r: random.Random) -> str:
    """An agentic coding or tool-use task with the reasoning and tool trace asked for."""
    g = data("grammar")
    parts = {
        "F": r.choice(g["framings"]).replace("{tools}", tool_list(r)),
        "T": r.choice(g["task_leads"]) + fill(r.choice(g["tasks"]), r, g) + ".",
        "N": r.choice(g["narrations"]),
    }
    for part in "TN":  # the framing holds tool names, which stay intact
        for old, new in g["synonyms"]:
            if old in parts[part] and r.random() < 0.4:
                parts[part] = parts[part].replace(old, new, 1)
    text = " ".join(parts[p] for p in r.choice(g["orders"]))
    opening = r.choice(g["openings"])
    text = f"{opening} {text}" if opening else text
    roll = r.random()
    if roll < 0.15:
        text = text.lower()
    elif roll < 0.25:
        text = text.replace(". ", ".\n", 1)
    return text[0].upper() + text[1:] if r.random() < 0.9 else text


def follow_up(r: random.Random) -> str:
    return r.choice(data("grammar")["follow_ups"])


def reasoning_wrap(prompt: str, r: random.Random) -> str:
    """``prompt`` with a request to show the whole reasoning, before or after it."""
    g = data("grammar")
    request = r.choice(g["reasoning_requests"])
    if r.random() < 0.2:
        request = request.lower()
    join = r.choice(g["reasoning_joins"])
    return f"{prompt}{join}{request}" if r.random() < 0.6 else f"{request}{join}{prompt}"
