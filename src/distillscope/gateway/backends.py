"""What answers behind the gateway: a local distillscope teacher, or an upstream OpenAI API.

Both speak the same small interface, in OpenAI's own terms: a generation is text plus per-token
logprob entries shaped like ``choices[].logprobs.content[]`` (``token``, ``logprob``, ``bytes``,
``top_logprobs``), so the gateway applies one exposure policy whatever the backend.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distillscope import toolcalls
from distillscope.errors import TeacherError
from distillscope.exposure import Exposure, Full, Text, TopK
from distillscope.teachers.base import (
    BatchRow,
    Completion,
    OnStep,
    SamplingConfig,
    StopRow,
    Teacher,
)
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
    #: OpenAI's ``logit_bias`` (token id -> bias in [-100, 100]): shifts what is sampled; the
    #: logprobs reported are those before the bias
    logit_bias: dict[int, float] | None = None
    #: OpenAI's ``stop``: the answer ends before the first of these strings (not included)
    stop: list[str] | None = None

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

    def check(self, request: GenerationRequest) -> None:  # noqa: B027 (optional)
        """Raise ``BackendError`` for what this backend cannot honour, before any admission."""

    @abstractmethod
    async def generate(self, request: GenerationRequest) -> Generation:
        """The whole generation."""

    @abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[Piece | Generation]:
        """Pieces as tokens are drawn, then the whole ``Generation``."""

    async def close(self) -> None:  # noqa: B027 (optional: most backends hold nothing)
        """Release connections."""


class TeacherBackend(Backend):
    """A local teacher (``TransformersTeacher``, ``SyntheticTeacher``) served on one worker
    thread, so the event loop stays free while the model runs.

    Requests that arrive together share forward passes (dynamic batching): while a batch runs,
    new requests queue, and the next batch takes up to ``max_batch`` of them at once. Each keeps
    its own sampling (temperature, seed, ``max_tokens``, exposure, ``logit_bias``, its tier's
    processors) and its own stream; a streaming client that leaves stops its row alone. Requests
    in the tool convention or asking ``prompt_logprobs`` run on their own. ``max_batch=1`` serves
    one request at a time.

    A single user message is templated and seeded exactly as a harvest of that prompt is, so the
    gateway answers ``seed=s`` with the very completion ``teacher.generate([prompt])`` draws (up
    to float rounding in a padded batch, which a near-tie can turn into another token).
    """

    def __init__(
        self,
        teacher: Teacher,
        *,
        model_name: str = "distillscope-default",
        max_batch: int = 16,
        gather_ms: float = 10.0,
    ):
        if teacher.tokenizer is None or not hasattr(teacher, "generate_from_ids"):
            raise TeacherError(
                f"{teacher.id} cannot be served directly (it needs a tokenizer and local "
                "sampling); serve an upstream API with the proxy backend instead"
            )
        if max_batch < 1:
            raise TeacherError(f"max_batch must be >= 1, got {max_batch}")
        self.teacher = teacher
        self.model_name = model_name
        self.max_batch = max_batch
        self.gather_ms = gather_ms
        self.max_exposure = teacher.max_exposure
        self.can_score_prompts = isinstance(teacher.max_exposure, Full) and hasattr(
            teacher, "score"
        )
        self.spelling = token_bytes_table(teacher.tokenizer)
        self._stop_ids = set(getattr(teacher, "_stop_ids", [teacher.tokenizer.eos_token_id]))
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._starting = threading.Lock()
        #: batches run and requests they held (``rows / batches`` is the mean batch size)
        self.batches = 0
        self.rows = 0

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        if request.encoded is None:
            request.encoded = self._encode(request)
        return len(request.encoded)

    def check(self, request: GenerationRequest) -> None:
        if not request.logit_bias:
            return
        if not hasattr(self.teacher, "model"):
            raise BackendError(f"{self.teacher.id} cannot apply logit_bias")
        vocab = len(self.teacher.tokenizer)
        outside = [t for t in request.logit_bias if not 0 <= t < vocab]
        if outside:
            raise BackendError(
                f"logit_bias names token {outside[0]}; this model's tokens are 0..{vocab - 1}"
            )

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

    def _speaks_tools(self, request: GenerationRequest) -> bool:
        return request.messages is not None and toolcalls.needs_convention(
            request.messages, request.tools
        )

    def _batchable(self, request: GenerationRequest) -> bool:
        return (
            hasattr(self.teacher, "generate_rows")
            and request.prompt_logprobs is None
            and not self._speaks_tools(request)
        )

    def _submit(self, request: GenerationRequest, on_step: OnStep | None = None) -> Future:
        if request.encoded is None:
            request.encoded = self._encode(request)
        if request.stop and not request.may_call:
            on_step = self._stopping(request.stop, on_step)
        job = _Job(request, on_step, Future(), self._batchable(request))
        with self._starting:
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._serve, name="distillscope-teacher", daemon=True
                )
                self._worker.start()
        self._jobs.put(job)
        return job.future

    def _serve(self) -> None:
        """The worker: take the next job, and with it every batchable job already queued (up to
        ``max_batch``); run them as batches, then the others one by one, in arrival order.

        Under load (more than one request in the last batch, or more queued behind this one)
        it first gathers: it keeps taking requests until none has come for ``gather_ms``, so
        clients whose requests cross the HTTP stack a few milliseconds apart share a batch. A
        lone request on an idle server starts at once."""
        busy = False
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch = [job] if job.batchable else []
            alone = [] if job.batchable else [job]
            stopping = False
            while batch and len(batch) < self.max_batch and not stopping:
                try:
                    if busy or len(batch) > 1:
                        other = self._jobs.get(timeout=self.gather_ms / 1000)
                    else:
                        other = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if other is None:
                    stopping = True
                elif other.batchable:
                    batch.append(other)
                else:
                    alone.append(other)
            busy = len(batch) > 1
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            for group in padding_groups(batch):
                self._run_batch(group)
            for single in alone:
                if single.future.set_running_or_notify_cancel():
                    self._settle(single, lambda j=single: self._run(j.request, j.on_step))
            if stopping:
                return

    def _run_batch(self, jobs: list[_Job]) -> None:
        self.batches += 1
        self.rows += len(jobs)
        rows = [
            BatchRow(
                job.request.encoded,
                self._key(job.request),
                self._sampling(job.request),
                processors=job.request.processors,
                on_step=job.on_step,
                logit_bias=job.request.logit_bias,
            )
            for job in jobs
        ]
        try:
            completions = self.teacher.generate_rows(rows)
        except TeacherError as exc:  # refused before drawing: find which request, each alone
            if len(jobs) == 1:
                jobs[0].future.set_exception(_as_backend_error(exc))
                return
            for job, row in zip(jobs, rows, strict=True):
                self._settle(job, lambda r=row, j=job: self._generation(
                    j.request, self.teacher.generate_rows([r])[0]
                ))  # fmt: skip
            return
        except Exception as exc:  # noqa: BLE001 (mid-generation: streams have tokens; no retry)
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, completion in zip(jobs, completions, strict=True):
            self._settle(job, lambda j=job, c=completion: self._generation(j.request, c))

    @staticmethod
    def _settle(job: _Job, work) -> None:
        try:
            job.future.set_result(work())
        except Exception as exc:  # noqa: BLE001 (handed to the request that asked)
            job.future.set_exception(_as_backend_error(exc))

    def _run(self, request: GenerationRequest, on_step: OnStep | None = None) -> Generation:
        """One request on its own: the tool convention, ``prompt_logprobs``."""
        encoded = request.encoded if request.encoded is not None else self._encode(request)
        if self._speaks_tools(request):
            if not hasattr(self.teacher, "chat"):
                raise BackendError(f"{self.teacher.id} cannot take tools or tool messages")
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
        return self._generation(request, completion)

    def _generation(self, request: GenerationRequest, completion: Completion) -> Generation:
        encoded = request.encoded
        prompt_logprobs = None
        if request.prompt_logprobs is not None:
            prompt_logprobs = self._prompt_logprobs(encoded, request.prompt_logprobs)
        generation = Generation(
            text=completion.text,
            finish_reason=completion.finish_reason,
            prompt_tokens=len(encoded),
            completion_tokens=completion.completion_tokens,
            logprobs=self._entries(completion, request),
            prompt_logprobs=prompt_logprobs,
            tool_calls=completion.tool_calls,
        )
        if request.stop and not generation.tool_calls:
            self._cut_at_stop(generation, completion.signal.token_ids, request.stop)
        return generation

    def _decoded(self, ids) -> str:
        return self.teacher.tokenizer.decode(
            [int(i) for i in ids if int(i) not in self._stop_ids], skip_special_tokens=True
        )

    def _stopping(self, stop: list[str], on_step: OnStep | None) -> OnStep:
        """``on_step`` that also ends the row once its text holds one of ``stop`` (the rest of
        a batch goes on; the answer is cut in ``_cut_at_stop``)."""
        ids: list[int] = []
        longest = max(len(s) for s in stop)

        def step(token_id, logprob, top_ids, top_logprobs) -> None:
            if on_step is not None:
                on_step(token_id, logprob, top_ids, top_logprobs)
            ids.append(int(token_id))
            # only the tail can hold a stop string that was not there one token ago
            tail = self._decoded(ids[-(longest + 8) :])
            if any(s in tail for s in stop) and any(s in self._decoded(ids) for s in stop):
                raise StopRow

        return step

    def _cut_at_stop(self, generation: Generation, ids, stop: list[str]) -> None:
        """End ``generation`` before the first of ``stop`` in its text, as OpenAI does: the
        text up to it, the logprobs of the tokens wholly before it, ``finish_reason`` stop, and
        the tokens drawn up to the one that completed it counted as completion tokens."""
        cut = _first_stop(generation.text, stop)
        if cut is None:
            return
        start, end = cut
        before, drawn = len(ids), len(ids)
        for t in range(1, len(ids) + 1):
            text = self._decoded(ids[:t])
            if len(text) > start and before == len(ids):
                before = t - 1
            if len(text) >= end:
                drawn = t
                break
        generation.text = generation.text[:start]
        generation.finish_reason = "stop"
        generation.completion_tokens = min(generation.completion_tokens, drawn)
        if generation.logprobs is not None:
            generation.logprobs = generation.logprobs[:before]

    async def generate(self, request: GenerationRequest) -> Generation:
        return await asyncio.wrap_future(self._submit(request))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Piece | Generation]:
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def on_step(token_id, logprob, top_ids, top_logprobs) -> None:
            if cancelled.is_set():
                raise StopRow
            loop.call_soon_threadsafe(steps.put_nowait, (token_id, logprob, top_ids, top_logprobs))

        future = self._submit(request, on_step)
        stop = request.stop if request.stop and not request.may_call else None
        longest = max((len(x) for x in stop), default=0) if stop else 0
        pending: list[tuple[int, dict]] = []  # with stop: (end of its token's text, entry)

        def finished(done: Future) -> None:
            try:
                loop.call_soon_threadsafe(steps.put_nowait, done)
            except RuntimeError:  # the event loop closed first: nobody is listening
                pass

        future.add_done_callback(finished)
        ids: list[int] = []
        sent = ""
        try:
            while True:
                item = await steps.get()
                if isinstance(item, Future):
                    if item.cancelled():
                        return
                    if item.exception() is not None:
                        raise item.exception()
                    generation = item.result()
                    # a held-back tail: half a character, or what might have begun a stop string
                    final = len(generation.text)
                    flushed = [e for end, e in pending if end <= final]
                    if generation.text != sent or flushed:
                        yield Piece(generation.text[len(sent) :], flushed)
                    yield generation
                    return
                token_id, logprob, top_ids, top_lps = item
                entries = []
                if request.top_logprobs is not None:
                    entries = [self._entry(token_id, logprob, top_ids, top_lps, request)]
                if token_id in self._stop_ids:
                    yield Piece("", entries)
                    continue
                ids.append(token_id)
                text = self.teacher.tokenizer.decode(ids, skip_special_tokens=True)
                if stop:
                    pending += [(len(text.rstrip("\ufffd")), e) for e in entries]
                    hit = _first_stop(text, stop)
                    ready = hit[0] if hit else len(text.rstrip("\ufffd")) - (longest - 1)
                    ready = max(ready, len(sent))
                    released = [e for end, e in pending if end <= ready]
                    pending = [(end, e) for end, e in pending if end > ready]
                    if ready > len(sent) or released:
                        delta, sent = text[len(sent) : ready], text[:ready]
                        yield Piece(delta, released)
                    continue
                if text.endswith("\ufffd"):  # half a character: wait for the rest
                    if entries:
                        yield Piece("", entries)
                    continue
                delta, sent = text[len(sent) :], text
                yield Piece(delta, entries)
        finally:
            cancelled.set()
            future.cancel()  # a job still queued never runs; a running one stops its row

    async def close(self) -> None:
        if self._worker is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._worker.join)
            self._worker = None

    def _entry(self, token_id, logprob, top_ids, top_lps, request: GenerationRequest) -> dict:
        """One OpenAI logprob entry with the ``top_logprobs`` likeliest alternatives.

        Logprobs are those before ``logit_bias``. A token that a bias lifted into the answer from
        outside what the tier shows (the top ``max(top_logprobs, 1)``) is reported at the floor:
        its own logprob is exactly what the published logit-bias reconstruction reads (Carlini et
        al. 2024, Morris et al. 2023), and it is not the caller's to see."""
        n = request.top_logprobs or 0
        alternatives = []
        if n and top_ids is not None:
            alternatives = [
                token_entry(self.spelling[int(i)], float(lp))
                for i, lp in zip(top_ids[:n], top_lps[:n], strict=True)
            ]
        if request.logit_bias and (top_ids is None or int(token_id) not in top_ids[: max(n, 1)]):
            logprob = LOGPROB_FLOOR
        return {**token_entry(self.spelling[int(token_id)], logprob), "top_logprobs": alternatives}

    def _entries(
        self, completion: Completion, request: GenerationRequest
    ) -> list[dict[str, Any]] | None:
        signal = completion.signal
        if request.top_logprobs is None or signal.token_logprobs is None:
            return None
        return [
            self._entry(
                token_id,
                signal.token_logprobs[t],
                None if signal.topk_ids is None else signal.topk_ids[t],
                None if signal.topk_logprobs is None else signal.topk_logprobs[t],
                request,
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


#: What one decode step of a batch costs, in prompt tokens of prefill: a step reads every weight
#: once whatever the batch (memory-bound), while a prompt token, padding included, is computed
#: (compute-bound). Measured on the default teacher on 2 CPU cores: a step 65-70 ms at batch 1,
#: a prompt token 3.8 ms, so about 17; a GPU's ratio is larger, so this errs towards splitting.
STEP_TOKENS = 16


def padding_groups(jobs: list[_Job]) -> list[list[_Job]]:
    """Split jobs into batches by prompt length when the padding would cost more than the decode
    passes a split adds: lengths ascending, a prompt joins the batch so far unless the padded
    tokens that adds exceed ``STEP_TOKENS`` x the batch's longest ``max_tokens`` (one 1,600-token
    prompt among fifteen of 30-180 made a batch ten times the work). Batches run in order of
    their earliest arrival."""
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i].request.encoded))
    groups: list[list[int]] = []
    total = steps = 0
    for i in order:
        length, wanted = len(jobs[i].request.encoded), jobs[i].request.max_tokens
        if groups:
            waste = length * (len(groups[-1]) + 1) - (total + length)
            if waste <= STEP_TOKENS * max(steps, wanted):
                groups[-1].append(i)
                total, steps = total + length, max(steps, wanted)
                continue
        groups.append([i])
        total, steps = length, wanted
    groups.sort(key=min)
    return [[jobs[i] for i in sorted(group)] for group in groups]


@dataclass
class _Job:
    """A request waiting for the worker: its ``on_step`` (streams) and the future it resolves."""

    request: GenerationRequest
    on_step: OnStep | None
    future: Future
    batchable: bool


def _first_stop(text: str, stop: list[str]) -> tuple[int, int] | None:
    """Where the first of ``stop`` begins and ends in ``text`` (the earliest start), or None."""
    found = [(text.find(s), text.find(s) + len(s)) for s in stop if s and s in text]
    return min(found) if found else None


def _as_backend_error(exc: Exception) -> Exception:
    if isinstance(exc, TeacherError) and not isinstance(exc, BackendError):
        return BackendError(str(exc))
    return exc


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

    def check(self, request: GenerationRequest) -> None:
        if request.logit_bias and request.top_logprobs is not None:
            raise BackendError(
                "logit_bias with logprobs is refused for a proxied upstream: the gateway cannot "
                "make sure the upstream reports logprobs from before the bias"
            )

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
        if request.logit_bias:
            args["logit_bias"] = {str(t): b for t, b in request.logit_bias.items()}
        if request.stop:
            args["stop"] = request.stop
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
