"""Radioactivity: was a suspect model trained on our watermarked outputs?

Sander et al. 2024 ("Watermarking Makes Language Models Radioactive", arXiv:2402.14904) showed
that a model fine-tuned on watermarked text carries the watermark into its own outputs, and that it
can be detected with a key-based test. Two modes:

- **closed model** (only an API): prompt the suspect with fresh prompts, score the watermark in its
  answers. Each (context, token) n-gram is scored once and n-grams of the prompt are excluded, so
  under H0 (the suspect never saw our key's outputs) every scored bit is a fresh draw and the
  binomial (KGW) or gamma (Gumbel) tail is exact.
- **open model** (weights in hand, "reading mode"): feed the suspect the watermarked texts we
  served, and score its greedy next-token *prediction* after each watermarked context. The
  suspect sees only the prefix, not the token that followed, so under H0 the prediction's green
  bit is a fresh draw -- unless the same n-gram already occurred earlier in that text (the
  suspect could copy it in context), which is excluded, as are prompt n-grams and repeats.

``p`` is exact; ``log10_p`` stays finite at any strength. Each test is repeated on the same
n-grams with a few **control keys** (``control_key``: public keys that never marked anything), so
the evidence page shows what the statistic looks like when there is nothing to find. A suspect is
``openai:URL`` (any OpenAI-compatible server, closed mode only), a transformers directory, or a
``distillscope distill`` run folder (its ``student/``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from distillscope.errors import DistillscopeError
from distillscope.forensics.watermark import (
    Detection,
    Watermark,
    keyed_digest,
    scored_ngrams,
    token_uniforms,
)

#: Control keys each test is repeated with (``control_key``).
CONTROLS = 8


class RadioactivityError(DistillscopeError):
    """A suspect or a text set the test cannot use."""


@dataclass
class RadioactivityResult:
    """One radioactivity test of one suspect against one watermark key."""

    mode: str
    suspect: str
    scheme: str
    texts: int
    tokens_scored: int
    statistic: float
    log10_p: float
    z: float
    settings: dict = field(default_factory=dict)
    #: a few of the suspect's answers (closed mode); with a tokenizer, ``tokens``: each answer
    #: token as ``[text, mark]``, mark ``"green"``/``"red"`` (scored, above/below its mean under
    #: H0) or ``"skip"`` (not scored: too little context, a prompt n-gram or a repeat)
    examples: list[dict] = field(default_factory=list)
    #: the same test with each control key: ``{"control": i, "statistic", "log10_p", "z"}``
    controls: list[dict] = field(default_factory=list)

    @property
    def p_value(self) -> float:
        return 10.0**self.log10_p

    def as_dict(self) -> dict:
        return asdict(self) | {"p_value": self.p_value}


def control_key(index: int) -> int:
    """The ``index``-th control key: public, fixed, and derived apart from every account's key
    (so a suspect trained on our outputs is no likelier to carry it than any other text)."""
    return int.from_bytes(keyed_digest("distillscope control keys", "control", str(index)), "big")


def control_tests(
    watermark: Watermark, ngrams: list[tuple[int, ...]], controls: int = CONTROLS
) -> list[dict]:
    """``watermark``'s test on ``ngrams`` repeated with ``controls`` control keys (same scheme
    and parameters): under H0 their p-values are uniform draws."""
    out = []
    for index in range(controls):
        found = replace(watermark, key=control_key(index)).score_ngrams(ngrams)
        out.append({"control": index, "statistic": found.statistic, "log10_p": found.log10_p,
                    "z": found.z})  # fmt: skip
    return out


def marked_tokens(
    watermark: Watermark, texts: Sequence[Sequence[int]], prompts: Sequence[Sequence[int]],
    tokenizer, *, limit: int = 3,
) -> list[list[list[str]]]:  # fmt: skip
    """The first ``limit`` texts as ``[token text, mark]`` pairs, scanned as ``scored_ngrams``
    scans them (so the marks are those of the scored test): ``"skip"`` for a token not scored,
    else ``"green"`` when its draw is above its mean under H0 (KGW: in the green list; Gumbel:
    -ln(1 - r) > 1) and ``"red"`` otherwise."""
    width = watermark.context + 1
    excluded = {tuple(p[i : i + width]) for p in prompts for i in range(len(p) - watermark.context)}
    seen: set[tuple[int, ...]] = set()
    out = []
    for text, prompt in list(zip(texts, prompts))[:limit]:
        sequence = list(prompt) + list(text)
        pieces = []
        for end in range(len(prompt), len(sequence)):
            gram = tuple(sequence[end - watermark.context : end + 1])
            mark = "skip"
            if end >= watermark.context and gram not in excluded and gram not in seen:
                seen.add(gram)
                u = float(token_uniforms(watermark.key, watermark.scheme, gram[:-1], gram[-1:])[0])
                above = u < watermark.gamma if watermark.scheme == "kgw" else -math.log1p(-u) > 1
                mark = "green" if above else "red"
            pieces.append([tokenizer.decode([sequence[end]]), mark])
        out.append(pieces)
    return out


def _result(mode, suspect, detection: Detection, texts, settings, examples=(), controls=()):
    return RadioactivityResult(
        mode=mode, suspect=suspect, scheme=detection.scheme, texts=texts,
        tokens_scored=detection.tokens_scored, statistic=detection.statistic,
        log10_p=detection.log10_p, z=detection.z, settings=settings, examples=list(examples),
        controls=list(controls),
    )  # fmt: skip


def load_suspect(spec: str | os.PathLike, *, device: str | None = "auto"):
    """``(model, tokenizer)`` of a local suspect: a transformers directory or a distill run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillscope.teachers.default import default_tokenizer_dir
    from distillscope.teachers.local import pick_device

    path = Path(spec).expanduser()
    if (path / "student" / "config.json").is_file():
        path = path / "student"
    if not (path / "config.json").is_file():
        raise RadioactivityError(
            f"no model at {spec}: expected a transformers directory, a distill run folder "
            "(with student/) or openai:URL"
        )
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    source = path if (path / "tokenizer_config.json").is_file() else default_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    return model.to(pick_device(device)).eval(), tokenizer


@dataclass
class SuspectAnswers:
    """What a suspect answered, as ids of our tokenizer (the watermark lives there)."""

    prompts: list[str]
    texts: list[list[int]]
    prompt_ids: list[list[int]]
    answers: list[str]
    #: the index (in ``prompts`` and ``answers``) of each of ``texts``
    scored: list[int] = field(default_factory=list)


def ask_suspect(
    suspect,
    prompts: Sequence[str],
    *,
    tokenizer=None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
) -> SuspectAnswers:
    """``suspect``'s answers to ``prompts``: a teacher (anything with ``generate``, e.g.
    ``load_teacher("openai:URL")``) or a local transformers model (``tokenizer`` required)."""
    from distillscope.teachers.base import SamplingConfig
    from distillscope.teachers.local import TransformersTeacher

    if not prompts:
        raise RadioactivityError("no prompts to ask the suspect")
    import torch

    if isinstance(suspect, torch.nn.Module):  # a bare model (which has its own .generate)
        if tokenizer is None:
            raise RadioactivityError("a local suspect model needs its tokenizer")
        suspect = TransformersTeacher(suspect, tokenizer, id="suspect", batch_size=16)
    tokenizer = tokenizer or getattr(suspect, "tokenizer", None)
    sampling = SamplingConfig(
        exposure="text", temperature=temperature, max_new_tokens=max_new_tokens, seed=seed
    )
    answers = suspect.generate(list(prompts), sampling)
    out = SuspectAnswers(list(prompts), [], [], [a.text for a in answers])
    for index, (prompt, answer) in enumerate(zip(prompts, answers)):
        if answer.prompt_ids is not None and len(answer.signal):
            out.texts.append([int(t) for t in answer.signal.token_ids])
            out.prompt_ids.append([int(t) for t in answer.prompt_ids])
            out.scored.append(index)
        elif answer.text and tokenizer is not None:
            out.texts.append(tokenizer.encode(answer.text, add_special_tokens=False))
            out.prompt_ids.append(tokenizer.encode(prompt, add_special_tokens=False))
            out.scored.append(index)
    if not out.texts:
        raise RadioactivityError("the suspect answered nothing that can be scored")
    return out


def closed_model_test(
    suspect,
    watermark: Watermark,
    prompts: Sequence[str] | SuspectAnswers,
    *,
    tokenizer=None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    name: str = "suspect",
    controls: int = CONTROLS,
) -> RadioactivityResult:
    """Prompt ``suspect`` (see ``ask_suspect``) and test its answers for ``watermark``; or test
    answers already collected (``prompts`` a ``SuspectAnswers``: one set, many keys). The same
    n-grams are tested with ``controls`` control keys (``control_tests``)."""
    if isinstance(prompts, SuspectAnswers):
        asked = prompts
    else:
        asked = ask_suspect(suspect, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed)  # fmt: skip
    ngrams = scored_ngrams(asked.texts, asked.prompt_ids, context=watermark.context)
    detection = watermark.score_ngrams(ngrams)
    order = asked.scored if len(asked.scored) == len(asked.texts) else range(len(asked.texts))
    examples = [
        {"prompt": asked.prompts[i][:200], "answer": asked.answers[i][:400]}
        for i in list(order)[:3]
    ]
    tokenizer = tokenizer or getattr(suspect, "tokenizer", None)
    if tokenizer is not None:
        marks = marked_tokens(watermark, asked.texts, asked.prompt_ids, tokenizer, limit=3)
        for example, tokens in zip(examples, marks):
            example["tokens"] = tokens
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
                "prompts": len(asked.prompts), "context": watermark.context}  # fmt: skip
    return _result("closed", name, detection, len(asked.texts), settings, examples,
                   control_tests(watermark, ngrams, controls))  # fmt: skip


def reading_ngrams(
    predictions: Sequence[Sequence[int]],
    texts: Sequence[Sequence[int]],
    prompts: Sequence[Sequence[int]],
    *,
    context: int,
) -> list[tuple[int, ...]]:
    """The (context..., predicted) n-grams the open-model test scores, each once.

    ``predictions[i][j]`` is the suspect's prediction for ``texts[i][j]`` (having seen the prompt
    and ``texts[i][:j]``). An n-gram is skipped when it is in any prompt, was already scored, or
    occurred earlier in the same text as (context, actual next token): a suspect may copy what it
    has just read.
    """
    width = context + 1
    excluded = {tuple(p[i : i + width]) for p in prompts for i in range(len(p) - context)}
    seen: set[tuple[int, ...]] = set()
    out = []
    for predicted, text, prompt in zip(predictions, texts, prompts):
        sequence = list(prompt) + list(text)
        read: set[tuple[int, ...]] = set()
        for j, guess in enumerate(predicted):
            end = len(prompt) + j
            if end < context:
                continue
            window = tuple(sequence[end - context : end])
            gram = (*window, int(guess))
            if gram not in excluded and gram not in seen and gram not in read:
                seen.add(gram)
                out.append(gram)
            read.add((*window, sequence[end]))
    return out


def watermarked_texts(
    path: str | os.PathLike, tokenizer, *, account: str | None = None,
    max_prompt_tokens: int = 512,
) -> list[tuple[list[int], list[int]]]:  # fmt: skip
    """Our watermarked answers as ``(prompt_ids, completion_ids)`` pairs, from a harvest's records
    folder (exact ids) or from the gateway's traffic log (``.duckdb`` or ``.parquet``: the
    ``account``'s successful exchanges, re-tokenised with ``tokenizer``)."""
    from distillscope.teachers.local import encode_prompt

    path = Path(path)
    if not path.exists():
        raise RadioactivityError(f"no watermarked texts at {path}")
    if path.is_dir():
        from distillscope.records import RecordSet

        try:
            records = RecordSet(path)
            pairs = [
                ([int(t) for t in e.prompt_ids], [int(t) for t in e.signal.token_ids])
                for e in records.exchanges("text")
                if e.prompt_ids is not None and len(e.signal)
            ]
        except (OSError, ValueError, DistillscopeError) as exc:
            raise RadioactivityError(f"cannot read records at {path}: {exc}") from None
    else:
        from distillscope.gateway.traffic import read_traffic

        if account is None:
            raise RadioactivityError("reading a traffic log needs the account whose answers to use")
        try:
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(path)
            else:
                table = read_traffic(path)
        except (OSError, ValueError, DistillscopeError) as exc:
            raise RadioactivityError(f"cannot read the traffic log {path}: {exc}") from None
        rows = [
            r for r in table.select(["account_id", "status", "prompt", "completion"]).to_pylist()
            if r["account_id"] == account and r["status"] == 200 and r["completion"]
        ]  # fmt: skip
        pairs = [
            (encode_prompt(tokenizer, r["prompt"] or "", max_prompt_tokens),
             tokenizer.encode(r["completion"], add_special_tokens=False))
            for r in rows
        ]  # fmt: skip
    if not pairs:
        raise RadioactivityError(f"no usable watermarked answers in {path}")
    return pairs


def open_model_test(
    model,
    watermark: Watermark,
    texts: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    name: str = "suspect",
    controls: int = CONTROLS,
) -> RadioactivityResult:
    """Feed ``model`` our watermarked ``texts`` (``(prompt_ids, completion_ids)`` pairs) and test
    its greedy next-token predictions on the completions for ``watermark`` (and for ``controls``
    control keys, on the same n-grams)."""
    import torch

    if not texts:
        raise RadioactivityError("no watermarked texts to read")
    device = next(model.parameters()).device
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            rows = [list(p) + list(c) for p, c in chunk]
            width = max(len(r) for r in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            guesses = logits.argmax(-1).cpu().numpy()
            for i, (prompt, completion) in enumerate(chunk):
                first = len(prompt) - 1  # the logit at position k predicts token k + 1
                predictions.append(guesses[i, first : first + len(completion)].tolist())
    grams = reading_ngrams(
        predictions, [c for _, c in texts], [p for p, _ in texts], context=watermark.context
    )
    detection = watermark.score_ngrams(grams)
    settings = {"texts": len(texts), "context": watermark.context}
    return _result("open", name, detection, len(texts), settings,
                   controls=control_tests(watermark, grams, controls))  # fmt: skip
