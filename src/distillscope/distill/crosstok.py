"""Another tokenizer: records in the teacher's ids, re-tokenised for a student whose vocabulary
differs (GPT-2's BPE under a SmolLM2 teacher, say).

Text level. The student never sees the teacher's ids: the answer's exact bytes (the teacher's
tokens spelled by ``tokens.token_bytes_table``, special tokens left out) are decoded and
re-tokenised with the student's tokenizer, and the teacher's end of answer becomes the student's
``eos``. The prompt is rendered with ``toolcalls.render_chat_ids`` through the *student's*
tokenizer: its chat template when it has one, else plain ``role: content`` lines ending in
``assistant:`` (GPT-2 has no template, so its student reads ``user: <prompt>\\nassistant:``).
A turn of a tool-use trajectory renders its whole conversation, tools listed, the same way.
``ce`` then trains on the student's own tokens.

Logit level: token-span alignment. Both tokenizations spell the same bytes, so every token covers
a byte span. Where a student token and a teacher token cover the *same* span, both models were
predicting the next token after the same bytes, and the teacher's top-k is carried over: each
candidate whose bytes the student's vocabulary spells exactly maps to that student id
(``tokens.vocab_map``), and the mass of candidates it cannot spell joins the tail bucket of
``losses.sparse_kl`` (rather than being renormalised away: a teacher token the student must spell
in two pieces, " distillation" as " dist"+"illation", puts its mass on *other* student tokens,
which is what the tail bucket says). Elsewhere, and where no candidate maps, the position falls
back to cross-entropy on the student's own token, written as a one-hot top-k (its sparse KL *is*
that cross-entropy). So one loss, ``sparse-kl``, trains every position.

This is the alignment NeMo RL's cross-tokenizer distillation uses (tokens aligned by the text
they cover). The other documented choice, Universal Logit Distillation (Boizard et al. 2024,
"Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs",
arXiv:2402.12030; TRL's GOLD trainer uses it), matches the *sorted* probability vectors of both
models, a closed-form Wasserstein-1 distance needing no vocabulary map; with top-k records, which
carry the ids, the exact byte map keeps which token each probability belongs to, which ULD drops.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distillscope.exposure import Full, Signal, Text, TopK, parse_exposure
from distillscope.records import Exchange, RecordSet
from distillscope.tokens import token_bytes_table, vocab_map
from distillscope.toolcalls import render_chat_ids


def _starts(pieces: Sequence[bytes]) -> np.ndarray:
    """Byte offset where each piece starts, and one more: where the last one ends."""
    return np.concatenate([[0], np.cumsum([len(p) for p in pieces], dtype=np.int64)])


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def align_signal(
    teacher: Signal,
    teacher_pieces: Sequence[bytes],
    student_ids: np.ndarray,
    student_pieces: Sequence[bytes],
    mapping: np.ndarray,
) -> Signal:
    """The teacher's top-k signal moved onto the student's positions (see the module docstring).

    ``teacher_pieces``/``student_pieces`` are the bytes each sampled token covers (``b""`` for an
    end of answer); ``mapping`` maps teacher ids to student ids (-1: none). Returns a ``TopK``
    signal over ``student_ids``: at a position whose span a teacher token covers exactly, the
    mapped candidates with the teacher's logprobs, unmapped slots at -inf (their id repeats a
    mapped one, so no student token is counted twice) and ``tail_mass`` = 1 − Σ mapped p;
    elsewhere the student's own token with logprob 0 and no tail. A ``Text`` signal passes
    through as the student's tokens.
    """
    student_ids = np.asarray(student_ids, dtype=np.int64)
    if not isinstance(teacher.exposure, TopK):
        return Signal(teacher.exposure, student_ids)
    k = teacher.exposure.k
    t_starts, s_starts = _starts(teacher_pieces), _starts(student_pieces)
    t_bytes, s_bytes = b"".join(teacher_pieces), b"".join(student_pieces)
    # past the first byte where the spellings differ (an invalid UTF-8 tail replaced on decoding),
    # equal offsets no longer mean the same text
    trusted = len(t_bytes) if t_bytes == s_bytes else _common_prefix(t_bytes, s_bytes)
    teacher_at = {}
    for i in range(len(teacher_pieces)):
        teacher_at.setdefault((int(t_starts[i]), int(t_starts[i + 1])), i)
    ids = np.repeat(student_ids[:, None], k, axis=1)
    logprobs = np.full((len(student_ids), k), -np.inf, dtype=np.float32)
    logprobs[:, 0] = 0.0
    tail = np.zeros(len(student_ids), dtype=np.float32)
    for j in range(len(student_ids)):
        span = (int(s_starts[j]), int(s_starts[j + 1]))
        i = teacher_at.get(span)
        if i is None or span[1] > trusted:
            continue
        mapped = mapping[teacher.topk_ids[i]]
        valid = mapped >= 0
        if not valid.any():
            continue
        ids[j] = np.where(valid, mapped, mapped[valid][0])
        logprobs[j] = np.where(valid, teacher.topk_logprobs[i], -np.inf)
        kept = np.exp(teacher.topk_logprobs[i][valid].astype(np.float64)).sum()
        tail[j] = np.clip(1.0 - kept, 0.0, 1.0)
    return Signal(
        teacher.exposure, student_ids, topk_ids=ids, topk_logprobs=logprobs, tail_mass=tail
    )


class Retokenizer:
    """Turns exchanges in the teacher's ids into training sequences in the student's ids."""

    def __init__(self, student_tokenizer, teacher_tokenizer=None, *, max_prompt_tokens: int = 512):
        self.student = student_tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.student_bytes = token_bytes_table(student_tokenizer)
        self.teacher_bytes = None
        if teacher_tokenizer is not None:
            self.teacher_bytes = token_bytes_table(teacher_tokenizer)
            self.teacher_special = set(teacher_tokenizer.added_tokens_decoder)
            self.teacher_eos = teacher_tokenizer.eos_token_id
            self.mapping = vocab_map(teacher_tokenizer, student_tokenizer)

    def prompt_ids(self, exchange: Exchange) -> np.ndarray:
        """The prompt through the student's tokenizer (its chat template, or plain lines); a
        single prompt is first cut to ``max_prompt_tokens`` of the student's tokens."""
        messages = exchange.messages
        if messages is None:
            text = exchange.prompt
            ids = self.student(text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.max_prompt_tokens:
                text = self.student.decode(ids[: self.max_prompt_tokens])
            messages = [{"role": "user", "content": text}]
        return np.asarray(render_chat_ids(self.student, messages, exchange.tools), dtype=np.int64)

    def completion(self, exchange: Exchange) -> tuple[np.ndarray, Signal]:
        """The answer in the student's ids, and the teacher's signal aligned onto them."""
        signal = exchange.signal
        if self.teacher_bytes is None:  # records without ids: the stored text is all there is
            ids = self.student(exchange.completion_text, add_special_tokens=False)["input_ids"]
            return np.asarray(ids, dtype=np.int64), Signal(signal.exposure, np.asarray(ids))
        teacher_pieces = [
            b"" if int(t) in self.teacher_special else self.teacher_bytes[int(t)]
            for t in signal.token_ids
        ]
        text = b"".join(teacher_pieces).decode("utf-8", errors="replace")
        ids = list(self.student(text, add_special_tokens=False)["input_ids"])
        pieces = [self.student_bytes[i] for i in ids]
        if len(signal.token_ids) and int(signal.token_ids[-1]) == self.teacher_eos:
            ids.append(self.student.eos_token_id)
            pieces.append(b"")
        student_ids = np.asarray(ids, dtype=np.int64)
        return student_ids, align_signal(signal, teacher_pieces, student_ids, pieces, self.mapping)


def cross_examples(records: RecordSet, exposure, student_tokenizer, teacher_tokenizer=None) -> list:
    """Training examples for a student with another tokenizer, at ``exposure`` (``topK`` through
    the span alignment, ``text`` re-tokenised). ``teacher_tokenizer`` reads the records' ids and
    is checked against them; records harvested without ids train at ``text`` only."""
    from distillscope.distill.train import Example, TrainingError

    level = parse_exposure(exposure, max_k=None)
    if isinstance(level, Full):
        raise TrainingError(
            "--exposure full scores the student against the teacher's own vocabulary: with "
            "--student-tokenizer use --exposure topK (aligned) or text"
        )
    if records.provenance.token_ids:
        if teacher_tokenizer is None:
            raise TrainingError("re-tokenising records needs the teacher's tokenizer to read ids")
        records.check_compatible(
            student_tokenizer, consumer="the tokenizer reading them", reader=teacher_tokenizer
        )
    elif not isinstance(level, Text):
        raise TrainingError(
            "these records hold no token ids to align: with --student-tokenizer use --exposure "
            "text, or harvest again with --tokenizer"
        )
    else:
        teacher_tokenizer = None
    retokenize = Retokenizer(
        student_tokenizer,
        teacher_tokenizer,
        max_prompt_tokens=records.provenance.max_prompt_tokens,
    )
    out = []
    for exchange in records.exchanges(level):
        if len(exchange.signal) == 0:
            continue
        completion_ids, signal = retokenize.completion(exchange)
        if len(completion_ids) == 0:
            continue
        out.append(
            Example(retokenize.prompt_ids(exchange), completion_ids, signal, exchange.prompt_id)
        )
    if not out:
        raise TrainingError("no usable records (every completion is empty)")
    return out
