"""The one protocol every teacher speaks, and the values it returns."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from distillscope.errors import TeacherError
from distillscope.exposure import Exposure, Signal, Text, parse_exposure

LogprobsKind = Literal["raw", "processed", "unknown"]


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are drawn. Everything here changes the result, so all of it is provenance.

    ``temperature`` is the *sampling* temperature of the harvest (0 means greedy); it is kept apart
    from any distillation temperature. Logprobs are always reported at temperature 1 (raw) by local
    teachers, whatever the sampling temperature.
    """

    exposure: Exposure = field(default_factory=Text)
    temperature: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    max_prompt_tokens: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "exposure", parse_exposure(self.exposure, max_k=None))
        if not self.temperature >= 0:
            raise TeacherError(f"sampling temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise TeacherError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_prompt_tokens < 1:
            raise TeacherError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")

    def as_dict(self) -> dict:
        return {
            "exposure": str(self.exposure),
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "max_prompt_tokens": self.max_prompt_tokens,
        }


def row_seed(seed: int, prompt: str) -> int:
    """The sampling seed of one prompt: depends on the run seed and the prompt, not on the batch.

    So a resumed or re-batched harvest draws the same completion for the same prompt.
    """
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


#: Called after each generated token of a row: ``(token_id, logprob, top_ids, top_logprobs)``, the
#: top-k arrays ``None`` below ``topK`` exposure. Streaming servers pass one; raising ``StopRow``
#: ends that row's generation (its client went away) without disturbing the rest of its batch.
OnStep = Callable[[int, float, Any, Any], None]


class StopRow(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by an ``on_step`` callback to stop its own row."""


@dataclass
class BatchRow:
    """One generation among those that share a batch: exact prompt ids (already templated), the
    ``key`` that seeds its draw, and its own sampling (temperature, length, exposure, seed).

    ``processors`` transform this row's logits before the draw (a tier's per-account watermark),
    ``prefixes`` are token sequences its answer must begin with one of (``toolcalls``), and
    ``logit_bias`` (token id -> bias, OpenAI's ``logit_bias``) shifts what is *sampled* only: the
    logprobs recorded are those before the bias.
    """

    ids: Sequence[int]
    key: str
    sampling: SamplingConfig
    processors: Sequence[Any] = ()
    on_step: OnStep | None = None
    prefixes: Sequence[Sequence[int]] | None = None
    logit_bias: Mapping[int, float] | None = None


@dataclass
class Completion:
    """One teacher answer: the text, what the teacher revealed about it, and how it was asked."""

    prompt: str
    text: str
    signal: Signal
    finish_reason: str
    prompt_ids: np.ndarray | None = None
    #: Token strings as the server sent them, kept when they could not be mapped to ids.
    token_strings: list[str] | None = None
    topk_strings: list[list[str]] | None = None
    prompt_tokens: int = 0
    #: The calls the answer makes, in OpenAI's shape (``toolcalls``); ``None`` when it makes none.
    tool_calls: list[dict] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.signal)

    def message(self) -> dict:
        """The answer as an assistant message in OpenAI's shape."""
        if self.tool_calls:
            return {"role": "assistant", "content": None, "tool_calls": self.tool_calls}
        return {"role": "assistant", "content": self.text}


@runtime_checkable
class Teacher(Protocol):
    """A model that answers prompts at some exposure level.

    ``id`` names the model reproducibly (it goes into provenance and cache keys); ``tokenizer`` is
    the transformers tokenizer whose ids the signals use, or ``None`` when the ids are unknown.
    ``max_exposure`` is the richest level this backend can return.
    """

    id: str
    tokenizer: object | None
    max_exposure: Exposure
    logprobs_kind: LogprobsKind

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[Completion]:
        """Sample one completion per prompt at ``sampling.exposure``."""
        ...

    def score(
        self, prompt_ids: Sequence[np.ndarray], completion_ids: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """Raw next-token logprobs (T, V) at every completion position, or raise TeacherError."""
        ...

    def close(self) -> None:
        """Release what the teacher holds (connections, memory)."""
        ...
