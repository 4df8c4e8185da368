"""Any OpenAI-compatible chat completions server as a teacher, at ``text`` or ``topK`` (k <= 20).

Requests go out concurrently through the official ``openai`` client, whose retries (with backoff
and ``Retry-After``) absorb rate limits and server errors. Token ids are recovered from each
reported token's exact ``bytes`` when a tokenizer is known; otherwise the strings are kept.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import openai
from openai import AsyncOpenAI, OpenAI

from distillscope import toolcalls
from distillscope.errors import TeacherError
from distillscope.exposure import Exposure, Signal, Text, TopK, is_at_least, tail_mass
from distillscope.teachers.base import Completion, SamplingConfig
from distillscope.tokens import TokenMapper


def load_tokenizer(spec: str | None):
    """The tokenizer a spec names: ``None``, ``default`` (the default teacher's) or ``hf:PATH``."""
    if spec is None:
        return None
    from transformers import AutoTokenizer

    if spec == "default":
        from distillscope.teachers.default import default_tokenizer_dir

        return AutoTokenizer.from_pretrained(default_tokenizer_dir(), local_files_only=True)
    if spec.startswith("hf:"):
        try:
            return AutoTokenizer.from_pretrained(spec[3:], local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TeacherError(f"cannot load a tokenizer from {spec[3:]}: {exc}") from exc
    raise TeacherError(f"unknown tokenizer {spec!r}: expected 'default' or 'hf:PATH'")


class OpenAITeacher:
    """A teacher behind an OpenAI-compatible ``/v1`` API, queried one chat completion per prompt.

    ``model`` defaults to the first model the server lists. ``tokenizer`` (``default`` or
    ``hf:PATH``) must be the served model's: it maps reported tokens back to ids and cuts prompts
    to ``max_prompt_tokens``; without it ids are -1 and the token strings are kept instead.
    """

    max_exposure: Exposure = TopK(20)
    logprobs_kind = "unknown"

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        tokenizer: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        max_retries: int = 6,
        timeout: float = 120,
    ):
        if concurrency < 1:
            raise TeacherError(f"concurrency must be >= 1, got {concurrency}")
        self.url = url
        self.concurrency = concurrency
        # The harvest hands over prompts batch_size at a time; a few requests per slot keep the
        # slots busy while a batch's slowest answers come in.
        self.batch_size = 4 * concurrency
        self._client_args: dict[str, Any] = {
            "base_url": url,
            "api_key": api_key or os.environ.get("OPENAI_API_KEY") or "none",
            "max_retries": max_retries,
            "timeout": timeout,
        }
        self.model = model or self._first_model()
        self.id = f"openai:{url}#{self.model}"
        self.tokenizer = load_tokenizer(tokenizer)
        self._mapper = TokenMapper(self.tokenizer) if self.tokenizer is not None else None

    def _first_model(self) -> str:
        try:
            with OpenAI(**self._client_args) as client:
                models = client.models.list().data
        except openai.APIError as exc:
            raise TeacherError(f"cannot list the models of {self.url}: {exc}") from exc
        if not models:
            raise TeacherError(f"{self.url} lists no models; pass one with --model")
        return models[0].id

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[Completion]:
        """One chat completion per prompt, ``concurrency`` in flight at once, in prompt order.

        The request seed is the run seed: a server that seeds by (seed, prompt), like the
        distillscope gateway, then draws exactly what the local teacher draws for the prompt.
        """
        exposure = sampling.exposure
        if not is_at_least(self.max_exposure, exposure):
            raise TeacherError(
                f"{self.id} cannot give {exposure} exposure: an OpenAI-compatible API reveals at "
                f"most {self.max_exposure}, never the full distribution"
            )
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._generate_all(prompts, sampling))
        # An event loop already runs in this thread (a notebook): run ours on another thread.
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self._generate_all(prompts, sampling)).result()

    async def _generate_all(
        self, prompts: Sequence[str], sampling: SamplingConfig
    ) -> list[Completion]:
        # One client per run: an async client's connections belong to the loop that opened them.
        gate = asyncio.Semaphore(self.concurrency)
        async with AsyncOpenAI(**self._client_args) as client:

            async def one(prompt: str) -> Completion:
                async with gate:
                    return await self._generate_one(client, prompt, sampling)

            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(one(prompt)) for prompt in prompts]
            except ExceptionGroup as failures:
                raise failures.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _generate_one(
        self, client: AsyncOpenAI, prompt: str, sampling: SamplingConfig
    ) -> Completion:
        exposure = sampling.exposure
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "user", "content": self._cut(prompt, sampling.max_prompt_tokens)}
            ],
            "temperature": sampling.temperature,
            "max_tokens": sampling.max_new_tokens,
            "seed": sampling.seed,
        }
        if isinstance(exposure, TopK):
            request.update(logprobs=True, top_logprobs=exposure.k)
        try:
            response = await client.chat.completions.create(**request)
        except openai.APIStatusError as exc:
            raise TeacherError(f"{self.url} answered {exc.status_code}: {exc.message}") from exc
        except openai.APIConnectionError as exc:
            raise TeacherError(f"cannot reach {self.url}: {exc}") from exc
        choice = response.choices[0]
        text = choice.message.content or ""
        usage = response.usage
        reported = None
        if isinstance(exposure, TopK) and choice.logprobs is not None:
            reported = choice.logprobs.content
        token_strings = topk_strings = None
        if reported is None:
            # Asked for text, or the server ignored logprobs: the harvest sees a text signal.
            count = usage.completion_tokens if usage else 0
            signal = Signal(Text(), self._text_ids(text, choice.finish_reason, count))
        else:
            signal, token_strings, topk_strings = self._logprob_signal(reported, exposure.k)
        return Completion(
            prompt=prompt,
            text=text,
            signal=signal,
            finish_reason=choice.finish_reason,
            token_strings=token_strings,
            topk_strings=topk_strings,
            prompt_tokens=usage.prompt_tokens if usage else 0,
        )

    def chat(
        self,
        messages: Sequence[dict],
        sampling: SamplingConfig,
        *,
        tools: Sequence[dict] | None = None,
        tool_choice: Any = "auto",
        stream: bool = False,
    ) -> Completion:
        """One assistant turn of a conversation, tools and calls in OpenAI's shape, streamed
        (tool-call deltas gathered by index) or not. ``prompt_ids`` are the conversation as
        ``toolcalls.render_chat_ids`` spells it with this tokenizer: what a distillscope gateway
        serving a local model of this tokenizer sees (for another server, its best guess).
        At ``text`` exposure the answer's ids are its text (or its calls in the convention)
        tokenized, plus the end-of-turn token."""
        request: dict[str, Any] = {
            "model": self.model,
            "messages": list(messages),
            "temperature": sampling.temperature,
            "max_tokens": sampling.max_new_tokens,
            "seed": sampling.seed,
        }
        if tools:
            request.update(tools=list(tools), tool_choice=tool_choice)
        if isinstance(sampling.exposure, TopK):
            request.update(logprobs=True, top_logprobs=sampling.exposure.k)
        try:
            with OpenAI(**self._client_args) as client:
                if stream:
                    answer = _gathered(
                        client.chat.completions.create(
                            **request, stream=True, stream_options={"include_usage": True}
                        )
                    )
                else:
                    answer = _answer(client.chat.completions.create(**request))
        except openai.APIStatusError as exc:
            raise TeacherError(f"{self.url} answered {exc.status_code}: {exc.message}") from exc
        except openai.APIConnectionError as exc:
            raise TeacherError(f"cannot reach {self.url}: {exc}") from exc
        text, tool_calls, finish, reported, usage = answer
        spelled = toolcalls.assistant_text({"content": text, "tool_calls": tool_calls})
        token_strings = topk_strings = None
        if isinstance(sampling.exposure, TopK) and reported:
            signal, token_strings, topk_strings = self._logprob_signal(
                reported, sampling.exposure.k
            )
        else:
            ended = "stop" if finish == "tool_calls" else finish
            signal = Signal(Text(), self._text_ids(spelled, ended, usage[1]))
        prompt_ids = None
        if self.tokenizer is not None:
            ids = toolcalls.render_chat_ids(self.tokenizer, messages, tools, tool_choice)
            prompt_ids = np.asarray(ids, dtype=np.int64)
        return Completion(
            prompt=next((m["content"] for m in messages if m["role"] == "user"), ""),
            text=spelled,
            signal=signal,
            finish_reason=finish,
            prompt_ids=prompt_ids,
            token_strings=token_strings,
            topk_strings=topk_strings,
            prompt_tokens=usage[0],
            tool_calls=tool_calls,
        )

    def _cut(self, prompt: str, max_prompt_tokens: int) -> str:
        """The prompt cut to ``max_prompt_tokens`` exactly as the local teacher cuts it."""
        if self.tokenizer is None:
            return prompt
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_prompt_tokens:
            return prompt
        return self.tokenizer.decode(ids[:max_prompt_tokens])

    def _text_ids(self, text: str, finish_reason: str, completion_tokens: int) -> np.ndarray:
        """Ids of a completion known only as text: its tokenization, plus EOS if it stopped.

        Without a tokenizer nothing is known but the count, so every id is -1.
        """
        if self.tokenizer is None:
            return np.full(completion_tokens, -1, dtype=np.int64)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if finish_reason == "stop" and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return np.asarray(ids, dtype=np.int64)

    def _logprob_signal(
        self, reported: list, k: int
    ) -> tuple[Signal, list[str] | None, list[list[str]] | None]:
        """The signal of reported logprobs, laid out like the local teacher's, and the token
        strings when some token could not be mapped to an id.

        Alternatives are sorted by descending logprob (stably: the server's tie order stands). A
        server that reports fewer than k alternatives somewhere yields a poorer top-k signal.
        """
        top = [sorted(entry.top_logprobs, key=lambda alt: -alt.logprob)[:k] for entry in reported]
        k = min([k] + [len(row) for row in top])
        top = [row[:k] for row in top]
        token_ids = self._ids(reported)
        if k == 0:
            signal = Signal(Text(), token_ids)
        else:
            shape = (len(reported), k)
            topk_logprobs = np.asarray(
                [[alt.logprob for alt in row] for row in top], dtype=np.float32
            ).reshape(shape)
            signal = Signal(
                TopK(k),
                token_ids,
                token_logprobs=np.asarray([e.logprob for e in reported], dtype=np.float32),
                topk_ids=np.asarray([self._ids(row) for row in top], dtype=np.int64).reshape(shape),
                topk_logprobs=topk_logprobs,
                tail_mass=tail_mass(topk_logprobs),
            )
        if (token_ids >= 0).all() and (signal.topk_ids is None or (signal.topk_ids >= 0).all()):
            return signal, None, None
        return signal, [e.token for e in reported], [[alt.token for alt in row] for row in top]

    def _ids(self, tokens: list) -> np.ndarray:
        if self._mapper is None:
            return np.full(len(tokens), -1, dtype=np.int64)
        return np.asarray(self._mapper.ids_for(tokens), dtype=np.int64)

    def score(
        self, prompt_ids: Sequence[np.ndarray], completion_ids: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        raise TeacherError(
            f"{self.id} cannot score arbitrary text: a chat completions API only samples"
        )

    def close(self) -> None:
        """Nothing to release: each ``generate`` opens and closes its own client."""


def _answer(response) -> tuple:
    """``(text, tool_calls, finish_reason, logprob entries, (prompt, completion tokens))``."""
    choice = response.choices[0]
    usage = response.usage
    reported = choice.logprobs.content if choice.logprobs is not None else None
    counts = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
    return (
        choice.message.content or "",
        toolcalls.plain_calls(choice.message.tool_calls),
        choice.finish_reason,
        reported,
        counts,
    )


def _gathered(chunks) -> tuple:
    """A stream's chunks gathered into what ``_answer`` returns: content pieces joined, tool-call
    deltas merged by index (the first names the call, later ones add to its arguments)."""
    text, finish, reported, counts = "", "stop", [], (0, 0)
    calls: dict[int, dict] = {}
    for chunk in chunks:
        if chunk.usage:
            counts = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            if choice.logprobs is not None and choice.logprobs.content:
                reported += choice.logprobs.content
            toolcalls.gather_call_deltas(calls, choice.delta.tool_calls)
    return text, [calls[i] for i in sorted(calls)] or None, finish, reported or None, counts
