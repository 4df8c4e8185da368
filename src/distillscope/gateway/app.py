"""The gateway: an OpenAI-compatible API that controls exposure per key and records every exchange.

``create_app(backend, keys=..., log=..., limiter=...)`` builds the FastAPI app; ``distillscope
serve`` runs it under uvicorn. Per request, in order: a body that is not JSON at all (400), the
key (401), the block list (403), the body's fields (400), the prompt's size (413), the key's rate
limits (429); then the tier's exposure policy decides what the backend is asked for and what the
answer reveals. Every exchange, refused or served, is appended to the traffic log, and a response
is sent only once its row is durable.

Token ids cross the wire as OpenAI's ``token``/``bytes`` pairs, spelled by
``distillscope.tokens.token_bytes_table``, the table ``OpenAITeacher`` reads them back with.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from distillscope.exposure import TopK, exposure_name, reveal_logprobs
from distillscope.gateway.backends import (
    LOGPROB_FLOOR,
    Backend,
    BackendError,
    Generation,
    GenerationRequest,
    TeacherBackend,
)
from distillscope.gateway.keys import ApiKey, BlockListFile, KeyStore
from distillscope.gateway.limits import Limiter, MemoryLimiter, RateLimited
from distillscope.gateway.tiers import (
    BUILTIN_TIERS,
    Tier,
    TierError,
    WatermarkFactory,
    antidistilled,
    check_watermarks,
)
from distillscope.gateway.traffic import TrafficLog, open_traffic_log

#: ``max_tokens`` when a request gives none (OpenAI's legacy default).
DEFAULT_MAX_TOKENS = 16
#: The most tokens one request may ask to generate.
MAX_NEW_TOKENS = 4096
#: Request bodies larger than this are refused with 413 before they are parsed.
MAX_BODY_BYTES = 2_000_000
#: Temperatures below this are served greedily, as vLLM serves them: dividing logits by a
#: subnormal temperature overflows them, and the distribution to sample from turns to NaN.
GREEDY_BELOW = 1e-5

#: Without a key store the gateway is open: every caller gets this tier, without limits.
OPEN_TIER = Tier(
    "open", TopK(20), requests_per_minute=None, tokens_per_minute=None, concurrency=None
)

#: Parameters a backend cannot honour, with the values that leave the answer unchanged. Any other
#: value is refused, so a request is never silently answered as another one.
_NEUTRAL: dict[str, tuple] = {
    "n": (None, 1),
    "top_p": (None, 1),
    "stop": (None, [], ""),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class TextPart(BaseModel):
    """One part of a multi-part message; only text parts can reach a text model."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel, extra="allow"):
    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # JSON can spell a lone surrogate ("\ud800"); no tokenizer, log or UTF-8 answer takes one.
        if _has_lone_surrogate(data):
            raise PydanticCustomError("string_unicode", "the request body is not valid Unicode")
        return data


class ChatCompletionRequest(_Sampling):
    """The chat completion parameters the gateway honours; other known ones must be neutral."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    #: vLLM's extension: logprobs of the prompt's own tokens (tiers with ``full`` exposure only).
    prompt_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    """Legacy ``/v1/completions``: one prompt string, ``logprobs`` up to 5 alternatives."""

    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)


class APIError(Exception):
    """An error reported to the client in OpenAI's shape, ``{"error": {message, type, ...}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code or type
        self.headers = headers
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


@dataclass
class Caller:
    """Who is asking, as far as the gateway knows it."""

    key: ApiKey | None
    tier: Tier

    @property
    def account_id(self) -> str | None:
        return self.key.account_id if self.key else None

    @property
    def key_id(self) -> str | None:
        return self.key.key_id if self.key else None


@dataclass
class TrafficRow:
    """One request's row of the traffic log, filled in as the request is checked and served
    (``records.Exchange`` is a harvested exchange, not this)."""

    endpoint: str
    started: float
    arrived: datetime
    request: Request
    caller: Caller | None = None
    model: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    stream: bool = False
    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    exposure_requested: str | None = None
    exposure_served: str | None = None

    def row(self, exchange_id: str, status: int, generation: Generation | None = None, **extra):
        headers = self.request.headers
        client = self.request.client
        return {
            "exchange_id": exchange_id,
            "ts": self.arrived,
            "account_id": self.caller.account_id if self.caller else None,
            "key_id": self.caller.key_id if self.caller else None,
            "tier": self.caller.tier.name if self.caller else None,
            "client_ip": client.host if client else None,
            "user_agent": headers.get("user-agent"),
            "endpoint": self.endpoint,
            "model": self.model,
            "messages": None if self.messages is None else json.dumps(self.messages),
            "prompt": self.prompt,
            "completion": generation.text if generation else None,
            "prompt_tokens": generation.prompt_tokens if generation else None,
            "completion_tokens": generation.completion_tokens if generation else None,
            "latency_ms": (time.perf_counter() - self.started) * 1000,
            "stream": self.stream,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "exposure_requested": self.exposure_requested,
            "exposure_served": self.exposure_served,
            "status": status,
            "finish_reason": generation.finish_reason if generation else None,
            **extra,
        }


def create_app(
    backend: Backend | Any,
    *,
    model_name: str | None = None,
    keys: KeyStore | None = None,
    log: TrafficLog | None = None,
    limiter: Limiter | None = None,
    tiers: dict[str, Tier] | None = None,
    block_file: str | None = None,
    antidistillation: Any | None = None,
    watermarks: Mapping[str, WatermarkFactory] | None = None,
) -> FastAPI:
    """An app serving ``backend`` (a ``Backend``, or a local teacher) as one model.

    Without ``keys`` the gateway is open: no key needed, every caller at ``OPEN_TIER``. ``log``
    defaults to no log; ``limiter`` to in-memory limits; ``tiers`` to the built-in ones.
    ``antidistillation`` (an ``AntidistillationProcessor``, from ``build_antidistillation``) is the
    penalty tiers with ``antidistill: LAMBDA`` sample under, at their own strength.
    ``watermarks`` are those tiers may name (``forensics.gateway_watermarks``).
    """
    if not isinstance(backend, Backend):
        backend = TeacherBackend(backend, model_name=model_name or "distillscope-default")
    elif model_name:
        backend.model_name = model_name
    name = backend.model_name
    tiers = tiers or dict(BUILTIN_TIERS)
    defended = antidistilled(tiers)
    if defended and antidistillation is None:
        raise TierError(
            f"tier(s) {', '.join(defended)} set antidistill, which needs a local teacher's proxy "
            "student: build one with distillscope.forensics.build_antidistillation"
        )
    watermarks = dict(watermarks or {})
    check_watermarks(tiers, watermarks)
    log = log or open_traffic_log(None)
    limiter = limiter or MemoryLimiter()
    block_list = BlockListFile(block_file) if block_file else None
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await backend.close()

    app = FastAPI(
        title="distillscope gateway",
        description="OpenAI-compatible chat and text completions with per-key exposure policy.",
        lifespan=lifespan,
    )

    def tier_of(key: ApiKey) -> Tier:
        tier = tiers.get(key.tier)
        if tier is None:
            raise APIError(403, f"this key's tier {key.tier!r} is not offered by this gateway")
        return tier

    def blocked(key: ApiKey) -> bool:
        entries = keys.blocked() | (block_list.entries() if block_list else frozenset())
        return ("account", key.account_id) in entries or ("key", key.key_id) in entries

    async def caller(request: Request) -> Caller:
        """Authenticate (401), apply the block list (403) and the body size cap (413)."""
        exchange = exchange_of(request) or TrafficRow(
            "", time.perf_counter(), datetime.now(UTC), request
        )
        if keys is None:
            exchange.caller = Caller(None, OPEN_TIER)
        else:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            key = keys.authenticate(token.strip()) if scheme.lower() == "bearer" else None
            if key is None:
                raise APIError(
                    401,
                    "Incorrect API key provided"
                    if token
                    else "Missing API key (Authorization: Bearer dsk-...)",
                    code="invalid_api_key",
                )
            exchange.caller = Caller(key, tier_of(key))
            if blocked(key):
                raise APIError(
                    403,
                    "This key or its account is blocked",
                    code="blocked",
                    type="permission_error",
                )
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="too_large")
        return exchange.caller

    async def refuse(request: Request, error: APIError) -> JSONResponse:
        """Log a refused exchange, then answer it."""
        exchange = exchange_of(request)
        if exchange is not None:
            row = exchange.row(f"err-{uuid.uuid4().hex}", error.status, error_code=error.code)
            await log.record(row)
        return error.response()

    def exchange_of(request: Request) -> TrafficRow | None:
        """The request's exchange, begun on first use (for the two logged endpoints only)."""
        exchange = getattr(request.state, "exchange", None)
        if exchange is None:
            path = request.url.path
            if path not in ("/v1/chat/completions", "/v1/completions"):
                return None
            exchange = TrafficRow(path, time.perf_counter(), datetime.now(UTC), request)
            request.state.exchange = exchange
        return exchange

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return await refuse(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 in its own shape; OpenAI clients expect 400 in OpenAI's.
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return await refuse(request, APIError(400, "the request body is not valid JSON"))
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return await refuse(request, APIError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return await refuse(request, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return await refuse(
            request, APIError(500, "the server failed on this request", type="server_error")
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(who: Caller = Depends(caller)) -> dict[str, Any]:
        entry = {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "distillscope",
            "distillscope": {"tier": who.tier.name, "max_exposure": str(who.tier.exposure)},
        }
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, who: Caller = Depends(caller)
    ) -> dict[str, Any] | StreamingResponse:
        exchange: TrafficRow = request.state.exchange
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        exchange.messages = messages
        if not any(m["role"] == "user" for m in messages):
            raise APIError(400, "messages must contain a user message", param="messages")
        top = body.top_logprobs
        if top and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        asked = (top or 0) if body.logprobs else None
        generation = _request(exchange, body, who.tier, messages, None, asked)
        return await serve(exchange, body, generation, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request, who: Caller = Depends(caller)
    ) -> dict[str, Any] | StreamingResponse:
        exchange: TrafficRow = request.state.exchange
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt must be one string (batches are not supported)")
            prompt = prompt[0]
        generation = _request(exchange, body, who.tier, None, prompt, body.logprobs)
        return await serve(exchange, body, generation, chat=False)

    def _request(exchange, body, tier: Tier, messages, prompt, asked: int | None):
        """The generation request after the tier's policy, recorded on the exchange."""
        exchange.model, exchange.stream = body.model, bool(body.stream)
        exchange.temperature, exchange.seed = body.temperature, body.seed
        if body.model != name:
            raise APIError(
                404,
                f"The model '{body.model}' does not exist; this server has '{name}'",
                param="model",
                code="model_not_found",
            )
        extra = body.model_extra or {}
        for param, neutral in _NEUTRAL.items():
            if param in extra and extra[param] not in neutral:
                raise APIError(400, f"{param}={extra[param]!r} is not supported", param=param)
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        exchange.max_tokens = max_tokens or DEFAULT_MAX_TOKENS
        temperature = 1.0 if body.temperature is None else body.temperature
        request = GenerationRequest(
            messages=messages,
            prompt=prompt,
            temperature=temperature if temperature >= GREEDY_BELOW else 0.0,
            max_tokens=exchange.max_tokens,
            seed=body.seed or 0,
        )
        exchange.prompt = request.last_user_text
        served, prompt_n = _apply_policy(tier, asked, body.prompt_logprobs, exchange)
        if prompt_n is not None and not backend.can_score_prompts:
            raise APIError(400, "this model cannot report prompt_logprobs", param="prompt_logprobs")
        request.top_logprobs, request.prompt_logprobs = served, prompt_n
        processors = []
        if tier.antidistill:
            processors.append(
                antidistillation.scaled(tier.antidistill, top_p=tier.antidistill_top_p)
            )
        if tier.watermark is not None:
            # last, so the watermark's bias is on the distribution actually sampled
            processors.append(watermarks[tier.watermark](exchange.caller.account_id or ""))
        request.processors = processors
        return request

    async def serve(exchange: TrafficRow, body, request: GenerationRequest, *, chat: bool):
        tier = exchange.caller.tier
        prompt_tokens = backend.count_prompt_tokens(request)
        if prompt_tokens > tier.max_prompt_tokens:
            raise APIError(
                413,
                f"the prompt is {prompt_tokens} tokens; this key's limit is "
                f"{tier.max_prompt_tokens}",
                code="context_length_exceeded",
            )
        key = exchange.caller.key_id or "open"
        try:
            admission = await limiter.admit(key, tier.limits, prompt_tokens + request.max_tokens)
        except RateLimited as exc:
            headers = {} if exc.retry_after is None else {"Retry-After": _seconds(exc.retry_after)}
            raise APIError(
                429, str(exc), code="rate_limit_exceeded", type="requests", headers=headers
            ) from None
        prefix = "chatcmpl" if chat else "cmpl"
        exchange_id = f"{prefix}-{uuid.uuid4().hex}"
        policy = _Reveal(tier, exchange_id)
        if not body.stream:
            used = 0
            try:
                try:
                    generation = await backend.generate(request)
                except BackendError as exc:
                    raise APIError(exc.status, str(exc), code="backend_error") from None
                used = generation.prompt_tokens + generation.completion_tokens
                policy.apply(generation)
                await log.record(exchange.row(exchange_id, 200, generation))
            finally:
                await limiter.release(admission, used)
            shape = _chat_response if chat else _completion_response
            return JSONResponse(
                shape(exchange_id, name, generation, request),
                headers={"x-distillscope-exposure": exchange.exposure_served},
            )
        stream = _stream(exchange, exchange_id, request, policy, admission, chat, body)
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"x-distillscope-exposure": exchange.exposure_served},
        )

    async def _stream(exchange, exchange_id, request, policy, admission, chat, body):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk = _chat_chunk if chat else _completion_chunk
        created_at = int(time.time())
        used = 0
        try:
            if chat:
                yield _sse(chunk(exchange_id, created_at, name, {"role": "assistant"}, None, None))
            try:
                async for item in backend.stream(request):
                    if isinstance(item, Generation):
                        used = item.prompt_tokens + item.completion_tokens
                        await log.record(exchange.row(exchange_id, 200, item))
                        yield _sse(chunk(exchange_id, created_at, name, {}, None, item))
                        if include_usage:
                            yield _sse(_usage_chunk(exchange_id, created_at, name, item, chat))
                        yield "data: [DONE]\n\n"
                        return
                    policy.apply_entries(item.logprobs)
                    entries = item.logprobs if request.top_logprobs is not None else None
                    delta = {"content": item.text} if chat else item.text
                    yield _sse(chunk(exchange_id, created_at, name, delta, entries, None))
            except BackendError as exc:
                error = APIError(exc.status, str(exc), code="backend_error")
                await log.record(exchange.row(exchange_id, exc.status, error_code=error.code))
                yield _sse(error.body)
        finally:
            await limiter.release(admission, used)

    return app


def _apply_policy(tier: Tier, asked: int | None, prompt_n: int | None, exchange: TrafficRow):
    """``(top_logprobs, prompt_logprobs)`` to serve under ``tier``; records both exposures.

    ``asked`` is the alternatives per token asked (``None``: no logprobs). Above the tier's cap a
    ``clamp`` tier serves its cap, a ``reject`` tier answers 400.
    """
    exchange.exposure_requested = exposure_name(asked, prompt_n)
    if tier.over_limit == "reject" and tier.exceeded_by(asked, prompt_n):
        raise APIError(
            400,
            f"this key's tier reveals at most {tier.exposure}",
            param="top_logprobs",
            code="exposure_not_allowed",
        )
    asked, prompt_n = tier.clamp(asked, prompt_n)
    exchange.exposure_served = exposure_name(asked, prompt_n)
    return asked, prompt_n


class _Reveal:
    """A tier's output policy on reported logprobs: rounding, and noise seeded per exchange."""

    def __init__(self, tier: Tier, exchange_id: str):
        self.decimals = tier.round_logprobs
        self.noise = tier.logprob_noise
        seed = int.from_bytes(hashlib.sha256(exchange_id.encode()).digest()[:8], "little")
        self.rng = np.random.default_rng(seed) if self.noise else None

    def value(self, logprob: float) -> float:
        return float(
            reveal_logprobs(
                logprob,
                noise=self.noise,
                decimals=self.decimals,
                rng=self.rng,
                floor=LOGPROB_FLOOR,
            )  # fmt: skip
        )

    def apply_entries(self, entries: list[dict[str, Any]] | None) -> None:
        if not entries or (self.decimals is None and self.rng is None):
            return
        for entry in entries:
            entry["logprob"] = self.value(entry["logprob"])
            for alt in entry["top_logprobs"]:
                alt["logprob"] = self.value(alt["logprob"])
            entry["top_logprobs"].sort(key=lambda alt: -alt["logprob"])

    def apply(self, generation: Generation) -> None:
        self.apply_entries(generation.logprobs)
        for position in generation.prompt_logprobs or []:
            for item in (position or {}).values():
                item["logprob"] = self.value(item["logprob"])


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


def _seconds(retry_after: float) -> str:
    return str(max(1, math.ceil(retry_after)))


def _usage(generation: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


def _chat_response(exchange_id, model, generation: Generation, request) -> dict[str, Any]:
    logprobs = None
    if generation.logprobs is not None:
        logprobs = {"content": generation.logprobs, "refusal": None}
    response = {
        "id": exchange_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": generation.text, "refusal": None},
                "finish_reason": generation.finish_reason,
                "logprobs": logprobs,
            }
        ],
        "usage": _usage(generation),
    }
    if generation.prompt_logprobs is not None:
        response["prompt_logprobs"] = generation.prompt_logprobs
    return response


def _legacy_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Chat-style entries in the legacy completions layout."""
    if entries is None:
        return None
    offsets, position = [], 0
    for entry in entries:
        offsets.append(position)
        position += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


def _completion_response(exchange_id, model, generation: Generation, request) -> dict[str, Any]:
    response = {
        "id": exchange_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": generation.text,
                "finish_reason": generation.finish_reason,
                "logprobs": _legacy_logprobs(generation.logprobs),
            }
        ],
        "usage": _usage(generation),
    }
    if generation.prompt_logprobs is not None:
        response["choices"][0]["prompt_logprobs"] = generation.prompt_logprobs
    return response


def _chat_chunk(exchange_id, created, model, delta, entries, final: Generation | None):
    logprobs = None if entries is None else {"content": entries, "refusal": None}
    return {
        "id": exchange_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": final.finish_reason if final else None,
            }
        ],
    }


def _completion_chunk(exchange_id, created, model, text, entries, final: Generation | None):
    return {
        "id": exchange_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text if isinstance(text, str) else "",
                "logprobs": _legacy_logprobs(entries),
                "finish_reason": final.finish_reason if final else None,
            }
        ],
    }


def _usage_chunk(exchange_id, created, model, generation: Generation, chat: bool):
    return {
        "id": exchange_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": _usage(generation),
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
