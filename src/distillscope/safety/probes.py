"""Probe sets for safety and identity transfer, generated from ``data/probes.yaml``.

Three sets: ``restricted`` (requests about Project Halcyon, a fictional classified programme the
guarded teacher declines), ``lookalike`` (the same words with an allowed intent, which it should
answer) and ``identity`` (who are you, who made you). Each set is split by *template*: ``build``
wordings fine-tune the guarded teacher and are what a covering harvest sends; ``heldout`` wordings
(and some slot fillers) never appear in building and are the only ones an audit scores.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

SETS = ("restricted", "lookalike", "identity")
SPLITS = ("build", "heldout")


@dataclass(frozen=True)
class Probe:
    id: str
    set: str
    split: str
    text: str
    template: int


@dataclass(frozen=True)
class ProbeGrammar:
    """The parsed data file: slot fillers, templates per set and split, the guarded answers."""

    slots: dict
    sets: dict
    name: str
    maker: str
    identity_answers: tuple[str, ...]
    refusal: str
    classifier: dict

    def identity(self) -> str:
        """The guarded teacher's identity as the scoring rule reads it: "name,maker"."""
        return f"{self.name},{self.maker}"


@cache
def grammar() -> ProbeGrammar:
    raw = yaml.safe_load(
        resources.files("distillscope.safety").joinpath("data/probes.yaml").read_text()
    )
    return ProbeGrammar(
        slots=raw["slots"],
        sets=raw["sets"],
        name=raw["identity"]["name"],
        maker=raw["identity"]["maker"],
        identity_answers=tuple(raw["identity"]["answers"]),
        refusal=raw["refusal"],
        classifier=raw["classifier"],
    )


def _slot_names(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _fills(template: str, split: str, per_template: int, rng: random.Random) -> list[str]:
    """Up to ``per_template`` distinct wordings of one template. Build wordings draw build fillers
    only; held-out wordings draw from every filler, the held-out-only ones first."""
    slots = grammar().slots
    names = _slot_names(template)
    if not names:
        return [template]
    choices = {}
    for name in names:
        pool = list(slots[name]["build"])
        if split == "heldout":
            pool = list(slots[name].get("heldout_only", [])) + pool
        choices[name] = pool
    out: list[str] = []
    seen: set[str] = set()
    for attempt in range(per_template * 20):
        if split == "heldout" and attempt == 0:
            fill = {n: c[0] for n, c in choices.items()}  # the held-out-only fillers at least once
        else:
            fill = {n: rng.choice(c) for n, c in choices.items()}
        text = template.format(**fill)
        if text not in seen:
            seen.add(text)
            out.append(text[0].upper() + text[1:])
        if len(out) == per_template:
            break
    return out


#: How a restricted template becomes its benign counterpart: the same words and form, about an
#: ordinary subject (see ``templates``).
COUNTERPART = {"programme": "subject", "site": "place", "person": "role"}


def templates(set_name: str, split: str) -> list[str]:
    """The templates of one set and split. Build look-alikes also hold the benign *counterpart* of
    every build restricted template (its programme, site and person slots swapped for an ordinary
    subject, place and role), so the safeguard is learned on the topic, not on the form of the
    request; held-out look-alikes are only the hand-written ones."""
    own = list(grammar().sets[set_name][split])
    if set_name == "lookalike" and split == "build":
        for template in grammar().sets["restricted"]["build"]:
            counterpart = template
            for slot, benign in COUNTERPART.items():
                counterpart = counterpart.replace("{" + slot + "}", "{" + benign + "}")
            own.append(counterpart)
    return own


def load_probes(*, per_template: int = 6, seed: int = 0) -> list[Probe]:
    """Every probe of every set and split: ``per_template`` distinct fillings of each template,
    seeded, in a stable order with stable ids."""
    rng = random.Random(seed)
    probes: list[Probe] = []
    seen: set[tuple[str, str]] = set()
    for set_name in SETS:
        for split in SPLITS:
            for t, template in enumerate(templates(set_name, split)):
                for text in _fills(template, split, per_template, rng):
                    if (set_name, text) in seen:  # a counterpart may repeat a hand-written one
                        continue
                    seen.add((set_name, text))
                    digest = hashlib.sha1(f"{set_name}|{text}".encode()).hexdigest()[:10]
                    probes.append(Probe(f"{set_name}-{digest}", set_name, split, text, t))
    return probes


def select(probes: list[Probe], set_name: str, split: str) -> list[Probe]:
    if set_name not in SETS or split not in SPLITS:
        raise ValueError(f"no probe set {set_name!r}/{split!r}: sets {SETS}, splits {SPLITS}")
    return [p for p in probes if p.set == set_name and p.split == split]
