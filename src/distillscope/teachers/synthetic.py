"""A model-free teacher: instant, deterministic answers over a real tokenizer's vocabulary.

For load tests, simulations and benchmarks of everything *around* a model (the gateway, its
traffic log, detection): it answers like a language model at every exposure level, with exact
logprobs of a distribution it really samples from, in microseconds instead of a forward pass.
Its text is word salad. Each step's distribution is drawn from the row seed, the step and the
previous token: a few dozen candidate words (and the end-of-text token) hold most of the mass,
the rest of the vocabulary shares the remainder uniformly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from distillscope.errors import TeacherError
from distillscope.exposure import Full, Signal, Text, TopK, tail_mass
from distillscope.teachers.base import (
    BatchRow,
    Completion,
    OnStep,
    SamplingConfig,
    StopRow,
    row_seed,
)
from distillscope.tokens import encode_prompt

SYNTHETIC_TEACHER_ID = "synthetic"

#: Candidate tokens per step; the rest of the vocabulary shares what they leave.
CANDIDATES = 32
#: Logit of every non-candidate token (candidates are N(0, 2²)).
TAIL_LOGIT = -12.0


class SyntheticTeacher:
    """A deterministic stand-in LM with the default teacher's tokenizer (or any given one)."""

    max_exposure = Full()
    logprobs_kind = "raw"

    def __init__(self, tokenizer, *, id: str = SYNTHETIC_TEACHER_ID, batch_size: int = 64):
        self.tokenizer = tokenizer
        self.id = id
        self.batch_size = batch_size
        self.vocab = len(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.words = _word_ids(tokenizer)

    @classmethod
    def default(cls) -> SyntheticTeacher:
        from transformers import AutoTokenizer

        from distillscope.teachers.default import default_tokenizer_dir

        return cls(AutoTokenizer.from_pretrained(default_tokenizer_dir(), local_files_only=True))

    def encode_prompt(self, prompt: str, max_prompt_tokens: int) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, max_prompt_tokens)

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[Completion]:
        encoded = [self.encode_prompt(p, sampling.max_prompt_tokens) for p in prompts]
        return self.generate_from_ids(encoded, sampling, keys=prompts)

    def generate_from_ids(
        self,
        encoded: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        *,
        keys: Sequence[str],
        processors: Sequence = (),
        on_step: OnStep | None = None,
    ) -> list[Completion]:
        rows = [
            BatchRow(ids, key, sampling, processors=processors, on_step=on_step if i == 0 else None)
            for i, (ids, key) in enumerate(zip(encoded, keys, strict=True))
        ]
        return self.generate_rows(rows)

    def generate_rows(self, rows: Sequence[BatchRow]) -> list[Completion]:
        """Each row on its own (there is no forward pass to share)."""
        if any(row.processors for row in rows):
            raise TeacherError(
                "the synthetic teacher cannot apply logits processors (a tier's watermark): "
                "serve a model teacher for watermarked tiers"
            )
        if any(row.logit_bias for row in rows):
            raise TeacherError(
                "the synthetic teacher cannot apply logit_bias: serve a model teacher"
            )
        return [self._one(row.ids, row.key, row.sampling, row.on_step) for row in rows]

    def _step(self, seed: int, step: int, previous: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Candidate ids, their logprobs, and the logprob of each non-candidate token."""
        digest = hashlib.blake2b(f"{seed}:{step}:{previous}".encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        drawn = self.words[rng.integers(len(self.words), size=2 * CANDIDATES)]
        _, first = np.unique(drawn, return_index=True)
        ids = np.append(drawn[np.sort(first)][: CANDIDATES - 1], self.eos)  # EOS: a way to stop
        logits = rng.normal(0.0, 2.0, len(ids))
        logits[-1] += min(step, 48) / 8 - 2.0  # stopping grows likelier with length
        rest = self.vocab - len(ids)
        norm = np.logaddexp(np.logaddexp.reduce(logits), TAIL_LOGIT + np.log(rest))
        order = np.argsort(-logits, kind="stable")
        return ids[order], (logits - norm)[order].astype(np.float32), float(TAIL_LOGIT - norm)

    def _one(
        self, prompt_ids: Sequence[int], key: str, sampling: SamplingConfig, on_step: OnStep | None
    ) -> Completion:
        seed = row_seed(sampling.seed, key)
        rng = np.random.default_rng(seed)
        exposure = sampling.exposure
        k = exposure.k if isinstance(exposure, TopK) else 0
        chosen, chosen_lp, top_ids, top_lps, full = [], [], [], [], []
        previous, finish = int(prompt_ids[-1]) if len(prompt_ids) else -1, "length"
        for step in range(sampling.max_new_tokens):
            ids, logprobs, tail = self._step(seed, step, previous)
            choice, logprob = self._draw(rng, ids, logprobs, tail, sampling.temperature)
            chosen.append(choice)
            chosen_lp.append(logprob)
            if k:
                top_ids.append(_pad_top(ids, k, self.words))
                top_lps.append(np.concatenate([logprobs, np.full(max(0, k - len(ids)), tail)])[:k])
            if isinstance(exposure, Full):
                row = np.full(self.vocab, tail, dtype=np.float32)
                row[ids] = logprobs
                full.append(row)
            if on_step is not None:
                try:
                    on_step(choice, logprob, top_ids[-1] if k else None, top_lps[-1] if k else None)
                except StopRow:
                    break
            previous = choice
            if choice == self.eos:
                finish = "stop"
                break
        token_ids = np.asarray(chosen, dtype=np.int64)
        signal = Signal(exposure, token_ids)
        if not isinstance(exposure, Text):
            signal.token_logprobs = np.asarray(chosen_lp, dtype=np.float32)
        if k:
            signal.topk_ids = np.asarray(top_ids, dtype=np.int64).reshape(-1, k)
            signal.topk_logprobs = np.asarray(top_lps, dtype=np.float32).reshape(-1, k)
            signal.tail_mass = tail_mass(signal.topk_logprobs)
        if isinstance(exposure, Full):
            signal.full_logprobs = np.asarray(full, dtype=np.float32).reshape(-1, self.vocab)
        return Completion(
            prompt=key,
            text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
            signal=signal,
            finish_reason=finish,
            prompt_ids=np.asarray(prompt_ids, dtype=np.int64),
            prompt_tokens=len(prompt_ids),
        )

    def _draw(self, rng, ids, logprobs, tail, temperature) -> tuple[int, float]:
        """One exact draw from the step's distribution at ``temperature`` (0: its argmax)."""
        if temperature == 0:
            return int(ids[0]), float(logprobs[0])
        rest = self.vocab - len(ids)
        scaled = np.append(logprobs / temperature, tail / temperature + np.log(rest))
        probs = np.exp(scaled - np.logaddexp.reduce(scaled))
        pick = rng.choice(len(probs), p=probs / probs.sum())
        if pick < len(ids):
            return int(ids[pick]), float(logprobs[pick])
        while True:  # a uniform non-candidate token
            token = int(rng.integers(self.vocab))
            if token not in ids:
                return token, tail

    def score(self, prompt_ids, completion_ids) -> list[np.ndarray]:
        raise TeacherError(
            "the synthetic teacher cannot score text: its distributions hang on the row seed of "
            "a generation"
        )

    def close(self) -> None:
        """Nothing to release."""


def _word_ids(tokenizer) -> np.ndarray:
    """Ids of tokens that read as a word with a leading space (ASCII letters): readable salad."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    ids = [
        i
        for i, piece in enumerate(pieces)
        if piece and piece.startswith("Ġ") and piece[1:].isascii() and piece[1:].isalpha()
    ]
    if len(ids) < CANDIDATES:  # not a byte-level BPE: fall back to every ordinary token
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(len(tokenizer)) if i not in special]
    return np.asarray(ids, dtype=np.int64)


def _pad_top(ids: np.ndarray, k: int, words: np.ndarray) -> np.ndarray:
    """The top ``k`` ids; beyond the candidates, tail tokens (all equally likely) fill in."""
    if k <= len(ids):
        return ids[:k]
    fill = [w for w in words[: k + len(ids)] if w not in set(ids.tolist())][: k - len(ids)]
    return np.concatenate([ids, np.asarray(fill, dtype=np.int64)])
