"""What answers behind the gateway: a local distillscope teacher, or an upstream OpenAI API.

Both speak the same small interface, in OpenAI's own terms: a generation is text plus per-token
logprob entries shaped like ``choices[].logprobs.content[]`` (``token``, ``logprob``, ``bytes``,
``top_logprobs``), so the gateway applies one exposure policy whatever the backend.
"""

from __future__ import annotations

import asyncio
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distillscope import toolcalls
from distillscope.errors import TeacherError
from distillscope.exposure import Exposure, Full, Text, TopK
from distillscope.teachers.base import Completion, SamplingConfig, Teacher
from distillscope.tokens import encode_prompt, token_bytes_table

#: What OpenAI reports as the logprob of a token too unlikely to represent (JSON has no -inf).
LOGPROB_FLOOR = -9999.0


class BackendError(TeacherError):
    """The backend could not answer (an upstream error, a teacher that cannot do what was asked)."""

    def __init__(self, message: str, *, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class GenerationRequest:
    """One generation: chat ``messages`` or a raw legacy ``prompt``, and how to sample it.

    ``top_logprobs`` is the number of alternatives to report per token (``None``: no logprobs at
    all; 0: the sampled token's only), already capped by the caller's tier.
    """

    messages: list[dict[str, Any]] | None
    prompt: str | None
    temperature: float
    max_tokens: int
    seed: int
    top_logprobs: int | None = None
    prompt_logprobs: int | None = None
    processors: Sequence[Any] = ()
    encoded: list[int] | None = field(default=None, repr=False)
    #: the tools offered (OpenAI's ``tools``) and ``tool_choice``: none, auto, required or
    #: ``{"type": "function", "function": {"name": ...}}``
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "none"

    @property
    def may_call(self) -> bool:
        """Whether the answer may be tool calls (then a stream holds its pieces back)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def last_user_text(self) -> str:
        if self.messages is None:
            return self.prompt or ""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


@dataclass
class Piece:
    """A streamed piece: new text and the logprob entries of the tokens that made it."""

    text: str
    logprobs: list[dict[str, Any]]


@dataclass
class Generation:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict[str, Any]] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None
    #: the calls the answer makes, in OpenAI's shape; then ``finish_reason`` is ``tool_calls``
    tool_calls: list[dict[str, Any]] | None = None


class Backend(ABC):
    """The interface: ``count_prompt_tokens``, ``generate``, ``stream``, ``close``."""

    model_name: str
    max_exposure: Exposure
    can_score_prompts: bool = False

    @abstractmethod
    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Prompt tokens, for the size cap and the tokens/min admission."""

    @abstractmethod
    async def generate(self, request: GenerationRequest) -> Generation:
        """The whole generation."""

    @abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[Piece | Generation]:
        """Pieces as tokens are drawn, then the whole ``Generation``."""

    async def close(self) -> None:  # noqa: B027 (optional: most backends hold nothing)
        """Release connections."""


class TeacherBackend(Backend):
    """A local teacher (``TransformersTeacher``, ``SyntheticTeacher``) served one request at a
    time on a worker thread, so the event loop stays free while the model runs.

    A single user message is templated and seeded exactly as a harvest of that prompt is, so the
    gateway answers ``seed=s`` with the very completion ``teacher.generate([prompt])`` draws.
    """

    def __init__(self, teacher: Teacher, *, model_name: str = "distillscope-default"):
        if teacher.tokenizer is None or not hasattr(teacher, "generate_from_ids"):
            raise TeacherError(
                f"{teacher.id} cannot be served directly (it needs a tokenizer and local "
                "sampling); serve an upstream API with the proxy backend instead"
            )
        self.teacher = teacher
        self.model_name = model_name
        self.max_exposure = teacher.max_exposure
        self.can_score_prompts = isinstance(teacher.max_exposure, Full) and hasattr(
            teacher, "score"
        )
        self.spelling = token_bytes_table(teacher.tokenizer)
        self._lock = threading.Lock()
        self._stop_ids = set(getattr(teacher, "_stop_ids", [teacher.tokenizer.eos_token_id]))

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        if request.encoded is None:
            request.encoded = self._encode(request)
        return len(request.encoded)

    def _encode(self, request: GenerationRequest) -> list[int]:
        tokenizer = self.teacher.tokenizer
        if request.messages is None:
            return list(tokenizer(request.prompt or "")["input_ids"])
        if _single_user_turn(request.messages) and not request.tools:
            return encode_prompt(tokenizer, request.messages[0]["content"], 1 << 62)
        return toolcalls.render_chat_ids(
            tokenizer, request.messages, request.tools, request.tool_choice
        )

    @staticmethod
    def _key(request: GenerationRequest) -> str:
        """What seeds the draw: the prompt text for one user turn (as in a harvest)."""
        if request.messages is None:
            return request.prompt or ""
        if _single_user_turn(request.messages) and not request.tools:
            return request.messages[0]["content"]
        if not request.tools:
            return json.dumps(request.messages, ensure_ascii=False, sort_keys=True)
        conversation = [request.messages, request.tools, request.tool_choice]
        return json.dumps(conversation, ensure_ascii=False, sort_keys=True)

    def _sampling(self, request: GenerationRequest) -> SamplingConfig:
        n = request.top_logprobs
        exposure: Exposure = Text() if n is None else TopK(max(n, 1))
        return SamplingConfig(
            exposure=exposure,
            temperature=request.temperature,
            max_new_tokens=request.max_tokens,
            seed=request.seed,
            max_prompt_tokens=1 << 62,
        )

    def _run(self, request: GenerationRequest, on_step=None) -> Generation:
        encoded = request.encoded if request.encoded is not None else self._encode(request)
        speaks_tools = request.messages is not None and toolcalls.needs_convention(
            request.messages, request.tools
        )
        if speaks_tools and not hasattr(self.teacher, "chat"):
            raise BackendError(f"{self.teacher.id} cannot take tools or tool messages")
        with self._lock:
            if speaks_tools:
                completion = self.teacher.chat(
                    request.messages,
                    self._sampling(request),
                    tools=request.tools,
                    tool_choice=request.tool_choice,
                    key=self._key(request),
                    processors=request.processors,
                    on_step=on_step,
                )
            else:
                completion = self.teacher.generate_from_ids(
                    [encoded],
                    self._sampling(request),
                    keys=[self._key(request)],
                    processors=request.processors,
                    on_step=on_step,
                )[0]
            prompt_logprobs = None
            if request.prompt_logprobs is not None:
                prompt_logprobs = self._prompt_logprobs(encoded, request.prompt_logprobs)
        return Generation(
            text=completion.text,
            finish_reason=completion.finish_reason,
            prompt_tokens=len(encoded),
            completion_tokens=completion.completion_tokens,
            logprobs=self._entries(completion, request.top_logprobs),
            prompt_logprobs=prompt_logprobs,
            tool_calls=completion.tool_calls,
        )

    async def generate(self, request: GenerationRequest) -> Generation:
        try:
            return await asyncio.to_thread(self._run, request)
        except TeacherError as exc:
            raise BackendError(str(exc)) from exc

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Piece | Generation]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def on_step(token_id, logprob, top_ids, top_logprobs) -> None:
            if cancelled.is_set():
                raise _Cancelled
            loop.call_soon_threadsafe(queue.put_nowait, (token_id, logprob, top_ids, top_logprobs))

        def run() -> None:
            try:
                result: Any = self._run(request, on_step)
            except _Cancelled:
                return
            except Exception as exc:  # handed to the consumer, which re-raises it
                result = exc
            loop.call_soon_threadsafe(queue.put_nowait, result)

        worker = loop.run_in_executor(None, run)
        ids: list[int] = []
        sent = ""
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Generation):
                    if item.text != sent:  # the held-back tail of a split character
                        yield Piece(item.text[len(sent) :], [])
                    yield item
                    return
                if isinstance(item, Exception):
                    if isinstance(item, TeacherError):
                        raise BackendError(str(item)) from item
                    raise item
                token_id, logprob, top_ids, top_lps = item
                entries = []
                if request.top_logprobs is not None:
                    entries = [
                        self._entry(token_id, logprob, top_ids, top_lps, request.top_logprobs)
                    ]
                if token_id in self._stop_ids:
                    yield Piece("", entries)
                    continue
                ids.append(token_id)
                text = self.teacher.tokenizer.decode(ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # half a character: wait for the rest
                    if entries:
                        yield Piece("", entries)
                    continue
                delta, sent = text[len(sent) :], text
                yield Piece(delta, entries)
        finally:
            cancelled.set()
            await worker

    def _entry(self, token_id, logprob, top_ids, top_lps, n: int) -> dict[str, Any]:
        """One OpenAI logprob entry with the ``n`` likeliest alternatives."""
        alternatives = []
        if n and top_ids is not None:
            alternatives = [
                token_entry(self.spelling[int(i)], float(lp))
                for i, lp in zip(top_ids[:n], top_lps[:n], strict=True)
            ]
        return {**token_entry(self.spelling[int(token_id)], logprob), "top_logprobs": alternatives}

    def _entries(self, completion: Completion, top_n: int | None) -> list[dict[str, Any]] | None:
        signal = completion.signal
        if top_n is None or signal.token_logprobs is None:
            return None
        return [
            self._entry(
                token_id,
                signal.token_logprobs[t],
                None if signal.topk_ids is None else signal.topk_ids[t],
                None if signal.topk_logprobs is None else signal.topk_logprobs[t],
                top_n,
            )
            for t, token_id in enumerate(signal.token_ids)
        ]

    def _prompt_logprobs(self, encoded: list[int], n: int) -> list[dict[str, Any] | None]:
        """vLLM's ``prompt_logprobs``: per prompt token, ``{id: {logprob, rank, decoded_token}}``
        for the token itself and the ``n`` likeliest; ``None`` for the first token."""
        if not self.can_score_prompts:
            raise BackendError(f"{self.teacher.id} cannot score prompts")
        ids = np.asarray(encoded, dtype=np.int64)
        scores = self.teacher.score([ids[:1]], [ids[1:]])[0]
        out: list[dict[str, Any] | None] = [None]
        for position, row in enumerate(scores):
            actual = int(ids[position + 1])
            order = np.argsort(-row, kind="stable")
            rank = {int(t): r + 1 for r, t in enumerate(order[:n])}
            chosen = [actual] + [int(t) for t in order[:n] if int(t) != actual]
            out.append(
                {
                    str(t): {
                        "logprob": max(float(row[t]), LOGPROB_FLOOR),
                        "rank": rank.get(t, int((row > row[t]).sum()) + 1),
                        "decoded_token": self.spelling[t].decode("utf-8", errors="replace"),
                    }
                    for t in chosen
                }
            )
        return out


class _Cancelled(Exception):
    """Raised inside the model thread when a streaming client went away."""


def _single_user_turn(messages: list[dict[str, Any]]) -> bool:
    return len(messages) == 1 and messages[0]["role"] == "user"


def token_entry(spelled: bytes, logprob: float) -> dict[str, Any]:
    """One token as OpenAI reports it: ``bytes`` exact, ``token`` their (lossy) text."""
    return {
        "token": spelled.decode("utf-8", errors="replace"),
        "logprob": max(float(logprob), LOGPROB_FLOOR),
        "bytes": list(spelled),
    }


class ProxyBackend(Backend):
    """An upstream OpenAI-compatible API, reached with the official ``openai`` client.

    The gateway's policy applies on top: the upstream is asked for no more than the caller's tier
    allows, and what it returns is capped again. Prompt tokens are estimated at four characters
    per token for rate limiting (the upstream's own count is logged and charged afterwards).
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        model_name: str | None = None,
        max_retries: int = 2,
        timeout: float = 120,
    ):
        import openai

        self._openai = openai
        self.url = url
        self.client = openai.AsyncOpenAI(
            base_url=url, api_key=api_key or "none", max_retries=max_retries, timeout=timeout
        )
        self.upstream_model = model or _first_model(url, api_key)
        self.model_name = model_name or self.upstream_model
        self.max_exposure = TopK(20)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        if request.messages is None:
            return max(1, len(request.prompt or "") // 4)
        return max(1, len(json.dumps([request.messages, request.tools])) // 4)

    def _args(self, request: GenerationRequest) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": self.upstream_model,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "seed": request.seed,
        }
        if request.messages is None:
            args["prompt"] = request.prompt
            if request.top_logprobs is not None:
                args["logprobs"] = min(request.top_logprobs, 5)
        else:
            args["messages"] = request.messages
            if request.top_logprobs is not None:
                args.update(logprobs=True, top_logprobs=request.top_logprobs)
            if request.tools:
                args.update(tools=request.tools, tool_choice=request.tool_choice)
        return args

    async def generate(self, request: GenerationRequest) -> Generation:
        if request.prompt_logprobs is not None:
            raise BackendError("the upstream API cannot score prompts")
        tool_calls = None
        try:
            if request.messages is None:
                response = await self.client.completions.create(**self._args(request))
                choice = response.choices[0]
                text = choice.text
                logprobs = _legacy_entries(choice.logprobs, request.top_logprobs)
            else:
                response = await self.client.chat.completions.create(**self._args(request))
                choice = response.choices[0]
                text = choice.message.content or ""
                logprobs = _chat_entries(choice.logprobs, request.top_logprobs)
                calls = choice.message.tool_calls
                tool_calls = toolcalls.plain_calls(calls)
        except self._openai.APIError as exc:
            raise _upstream_error(exc) from exc
        usage = response.usage
        return Generation(
            text=text,
            finish_reason=choice.finish_reason or "stop",
            prompt_tokens=usage.prompt_tokens if usage else self.count_prompt_tokens(request),
            completion_tokens=usage.completion_tokens if usage else 0,
            logprobs=logprobs,
            tool_calls=tool_calls,
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Piece | Generation]:
        if request.messages is None:  # legacy completions: one piece, from a whole answer
            generation = await self.generate(request)
            yield Piece(generation.text, generation.logprobs or [])
            yield generation
            return
        text, entries, finish, usage = "", [], "stop", None
        calls: dict[int, dict[str, Any]] = {}
        try:
            chunks = await self.client.chat.completions.create(
                **self._args(request), stream=True, stream_options={"include_usage": True}
            )
            async for chunk in chunks:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    toolcalls.gather_call_deltas(calls, choice.delta.tool_calls)
                    piece = Piece(
                        choice.delta.content or "",
                        _chat_entries(choice.logprobs, request.top_logprobs) or [],
                    )
                    text += piece.text
                    entries += piece.logprobs
                    finish = choice.finish_reason or finish
                    if piece.text or piece.logprobs:
                        yield piece
        except self._openai.APIError as exc:
            raise _upstream_error(exc) from exc
        yield Generation(
            text=text,
            finish_reason=finish,
            prompt_tokens=usage.prompt_tokens if usage else self.count_prompt_tokens(request),
            completion_tokens=usage.completion_tokens if usage else len(entries),
            logprobs=entries if request.top_logprobs is not None else None,
            tool_calls=[calls[i] for i in sorted(calls)] or None,
        )

    async def close(self) -> None:
        await self.client.close()


def _upstream_error(exc) -> BackendError:
    """An upstream failure as a 502 that says what the upstream answered."""
    status = getattr(exc, "status_code", None)
    detail = f"answered {status}: {exc.message}" if status else f"failed: {exc}"
    return BackendError(f"upstream {detail}", status=502)


def _first_model(url: str, api_key: str | None) -> str:
    import openai

    try:
        with openai.OpenAI(base_url=url, api_key=api_key or "none", max_retries=2) as client:
            models = client.models.list().data
    except openai.APIError as exc:
        raise TeacherError(f"cannot list the models of the upstream {url}: {exc}") from exc
    if not models:
        raise TeacherError(f"the upstream {url} lists no models; name one with --upstream-model")
    return models[0].id


def _chat_entries(logprobs, top_n: int | None) -> list[dict[str, Any]] | None:
    if top_n is None or logprobs is None or logprobs.content is None:
        return None
    entries = []
    for item in logprobs.content:
        entry = item.model_dump()
        entry["bytes"] = entry.get("bytes") or list(entry["token"].encode())
        entry["top_logprobs"] = [
            {**alt, "bytes": alt.get("bytes") or list(alt["token"].encode())}
            for alt in entry.get("top_logprobs") or []
        ][:top_n]
        entries.append(entry)
    return entries


def _legacy_entries(logprobs, top_n: int | None) -> list[dict[str, Any]] | None:
    """Legacy ``{tokens, token_logprobs, top_logprobs}`` as chat-style entries."""
    if top_n is None or logprobs is None or logprobs.tokens is None:
        return None
    tops = logprobs.top_logprobs or [{}] * len(logprobs.tokens)
    entries = []
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, tops, strict=False):
        alternatives = sorted((top or {}).items(), key=lambda kv: -kv[1])[:top_n]
        entries.append(
            {
                **token_entry(token.encode(), logprob if logprob is not None else LOGPROB_FLOOR),
                "top_logprobs": [token_entry(t.encode(), lp) for t, lp in alternatives],
            }
        )
    return entries
