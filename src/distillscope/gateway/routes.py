"""The gateway's endpoints: ``/health``, ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions``, on one ``APIRouter`` that ``create_app`` includes.

A completion is checked in order: the caller (``dependencies.caller``: 401, 403, 413), the body's
fields (400), the model (404), parameters the backend cannot honour (400), the tier's exposure
policy (``policy.apply_policy``), the prompt's size (413) and the key's rate limits (429). Then the
backend answers, ``policy.Reveal`` rounds or noises what the tier reveals, and the exchange's row
is made durable in the traffic log before the answer (or the stream's last chunk) is sent.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from distillscope.gateway.backends import BackendError, Generation, GenerationRequest
from distillscope.gateway.dependencies import (
    BackendDep,
    CallerDep,
    GatewayDep,
    LimiterDep,
    TrafficRow,
)
from distillscope.gateway.limits import Admission, RateLimited
from distillscope.gateway.policy import Reveal, apply_policy
from distillscope.gateway.wire import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    sse,
    tool_call_deltas,
    usage_chunk,
)

#: ``max_tokens`` when a request gives none (OpenAI's legacy default).
DEFAULT_MAX_TOKENS = 16
#: Temperatures below this are served greedily, as vLLM serves them: dividing logits by a
#: subnormal temperature overflows them, and the distribution to sample from turns to NaN.
GREEDY_BELOW = 1e-5

#: Parameters a backend cannot honour, with the values that leave the answer unchanged. Any other
#: value is refused, so a request is never silently answered as another one.
_NEUTRAL: dict[str, tuple] = {
    "n": (None, 1),
    "top_p": (None, 1),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(gateway: GatewayDep) -> Response:
    """Prometheus' text format: exchanges, tokens, exposure asked vs served, refusals, latency."""
    if gateway.metrics is None:
        raise APIError(404, "this gateway serves no metrics")
    return Response(gateway.metrics.render(), media_type=gateway.metrics.content_type)


@router.get("/v1/models")
async def models(who: CallerDep, gateway: GatewayDep) -> dict[str, Any]:
    entry = {
        "id": gateway.backend.model_name,
        "object": "model",
        "created": gateway.created,
        "owned_by": "distillscope",
        "distillscope": {"tier": who.tier.name, "max_exposure": str(who.tier.exposure)},
    }
    return {"object": "list", "data": [entry]}


class Serving:
    """What serves a completion, each part a dependency: the gateway (its tiers' processors, and
    ``record``: the traffic log, then the metrics), the backend and the limiter."""

    def __init__(self, gateway: GatewayDep, backend: BackendDep, limiter: LimiterDep):
        self.gateway = gateway
        self.backend = backend
        self.limiter = limiter

    def request(
        self,
        exchange: TrafficRow,
        body: ChatCompletionRequest | CompletionRequest,
        messages: list[dict[str, Any]] | None,
        prompt: str | None,
        asked: int | None,
    ) -> GenerationRequest:
        """What the backend is asked, after the tier's policy; recorded on the exchange."""
        exchange.model, exchange.stream = body.model, bool(body.stream)
        exchange.temperature, exchange.seed = body.temperature, body.seed
        name = self.backend.model_name
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
        if isinstance(body, ChatCompletionRequest):
            request.tools, request.tool_choice = body.tool_list(), body.choice()
            exchange.tools = request.tools
        request.logit_bias = _logit_bias(extra.get("logit_bias"))
        exchange.logit_bias = request.logit_bias
        request.stop = _stop(extra.get("stop"))
        exchange.prompt = request.last_user_text
        caller = exchange.caller
        served, prompt_n = apply_policy(caller.tier, asked, body.prompt_logprobs, exchange)
        if prompt_n is not None and not self.backend.can_score_prompts:
            raise APIError(400, "this model cannot report prompt_logprobs", param="prompt_logprobs")
        request.top_logprobs, request.prompt_logprobs = served, prompt_n
        request.processors = self.gateway.processors(caller.tier, caller.account_id)
        try:
            self.backend.check(request)
        except BackendError as exc:
            raise APIError(exc.status, str(exc), param="logit_bias") from None
        return request

    async def serve(
        self,
        exchange: TrafficRow,
        body: ChatCompletionRequest | CompletionRequest,
        request: GenerationRequest,
        *,
        chat: bool,
    ) -> JSONResponse | StreamingResponse:
        tier = exchange.caller.tier
        prompt_tokens = self.backend.count_prompt_tokens(request)
        if prompt_tokens > tier.max_prompt_tokens:
            raise APIError(
                413,
                f"the prompt is {prompt_tokens} tokens; this key's limit is "
                f"{tier.max_prompt_tokens}",
                code="context_length_exceeded",
            )
        key = exchange.caller.key_id or "open"
        try:
            admission = await self.limiter.admit(
                key, tier.limits, prompt_tokens + request.max_tokens
            )
        except RateLimited as exc:
            retry = {} if exc.retry_after is None else {"Retry-After": _seconds(exc.retry_after)}
            raise APIError(
                429, str(exc), code="rate_limit_exceeded", type="requests", headers=retry
            ) from None
        exchange_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        reveal = Reveal(tier, exchange_id)
        headers = {"x-distillscope-exposure": exchange.exposure_served}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self._stream(
                exchange, exchange_id, request, reveal, admission,
                chat=chat, include_usage=include_usage,
            )  # fmt: skip
            return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
        used = 0
        try:
            try:
                generation = await self.backend.generate(request)
            except BackendError as exc:
                raise APIError(exc.status, str(exc), code="backend_error") from None
            used = generation.prompt_tokens + generation.completion_tokens
            reveal.apply(generation)
            await self.gateway.record(exchange.row(exchange_id, 200, generation))
        finally:
            await self.limiter.release(admission, used)
        shape = chat_response if chat else completion_response
        answer = shape(exchange_id, self.backend.model_name, generation)
        return JSONResponse(answer, headers=headers)

    async def _stream(
        self,
        exchange: TrafficRow,
        exchange_id: str,
        request: GenerationRequest,
        reveal: Reveal,
        admission: Admission,
        *,
        chat: bool,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        chunk = chat_chunk if chat else completion_chunk
        name = self.backend.model_name
        created = int(time.time())
        used = 0
        # An answer that may be tool calls is held until it is known to be calls or text.
        held: list[dict[str, Any]] | None = [] if request.may_call else None
        try:
            if chat:
                yield sse(chunk(exchange_id, created, name, {"role": "assistant"}, None, None))
            try:
                async for item in self.backend.stream(request):
                    if isinstance(item, Generation):
                        used = item.prompt_tokens + item.completion_tokens
                        await self.gateway.record(exchange.row(exchange_id, 200, item))
                        if held is not None:
                            entries = held if request.top_logprobs is not None else None
                            for delta in tool_call_deltas(item) or [{"content": item.text}]:
                                yield sse(chunk(exchange_id, created, name, delta, entries, None))
                                entries = None
                        yield sse(chunk(exchange_id, created, name, {}, None, item))
                        if include_usage:
                            yield sse(usage_chunk(exchange_id, created, name, item, chat))
                        yield "data: [DONE]\n\n"
                        return
                    reveal.apply_entries(item.logprobs)
                    if held is not None:
                        held += item.logprobs
                        continue
                    entries = item.logprobs if request.top_logprobs is not None else None
                    delta = {"content": item.text} if chat else item.text
                    yield sse(chunk(exchange_id, created, name, delta, entries, None))
            except BackendError as exc:
                error = APIError(exc.status, str(exc), code="backend_error")
                row = exchange.row(exchange_id, exc.status, error_code=error.code)
                await self.gateway.record(row)
                yield sse(error.body)
        finally:
            await self.limiter.release(admission, used)


ServingDep = Annotated[Serving, Depends(Serving)]


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, who: CallerDep, serving: ServingDep
) -> JSONResponse | StreamingResponse:
    exchange: TrafficRow = request.state.exchange
    messages = [m.as_dict() for m in body.messages]
    exchange.messages = messages
    if not any(m["role"] == "user" for m in messages):
        raise APIError(400, "messages must contain a user message", param="messages")
    top = body.top_logprobs
    if top and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    asked = (top or 0) if body.logprobs else None
    generation = serving.request(exchange, body, messages, None, asked)
    return await serving.serve(exchange, body, generation, chat=True)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, who: CallerDep, serving: ServingDep
) -> JSONResponse | StreamingResponse:
    exchange: TrafficRow = request.state.exchange
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "prompt must be one string (batches are not supported)")
        prompt = prompt[0]
    generation = serving.request(exchange, body, None, prompt, body.logprobs)
    return await serving.serve(exchange, body, generation, chat=False)


#: At most this many stop strings (OpenAI's own limit).
MAX_STOPS = 4


def _stop(value: Any) -> list[str] | None:
    """OpenAI's ``stop``: a string or up to four, each non-empty."""
    if value is None or value == "" or value == []:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
        raise APIError(400, "stop must be a string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop may hold at most {MAX_STOPS} strings", param="stop")
    return stops


#: At most this many tokens in one ``logit_bias`` (OpenAI's own limit).
MAX_BIASED_TOKENS = 300


def _logit_bias(value: Any) -> dict[int, float] | None:
    """OpenAI's ``logit_bias``: token ids (as JSON keys) to biases in [-100, 100]."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise APIError(400, "logit_bias must map token ids to numbers", param="logit_bias")
    if len(value) > MAX_BIASED_TOKENS:
        raise APIError(
            400, f"logit_bias may name at most {MAX_BIASED_TOKENS} tokens", param="logit_bias"
        )
    bias: dict[int, float] = {}
    for token, amount in value.items():
        try:
            token_id = int(token)
        except (TypeError, ValueError):
            token_id = -1
        if token_id < 0 or str(token_id) != str(token).strip():
            raise APIError(400, f"logit_bias key {token!r} is not a token id", param="logit_bias")
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise APIError(400, f"logit_bias[{token}] must be a number", param="logit_bias")
        if not -100 <= amount <= 100:
            raise APIError(
                400, f"logit_bias[{token}]={amount} is outside [-100, 100]", param="logit_bias"
            )
        bias[token_id] = float(amount)
    return bias


def _seconds(retry_after: float) -> str:
    return str(max(1, math.ceil(retry_after)))
