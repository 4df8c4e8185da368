"""OpenAI's wire format, both ways: the request bodies the gateway accepts (pydantic models, so a
malformed body is a 400 naming the field), the error shape, and the responses and stream chunks it
sends (plain dicts: built once per answer or per token, they need no validation).

Token ids cross the wire as OpenAI's ``token``/``bytes`` pairs, spelled by
``distillscope.tokens.token_bytes_table``, the table ``OpenAITeacher`` reads them back with.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from distillscope.gateway.backends import Generation

#: The most tokens one request may ask to generate.
MAX_NEW_TOKENS = 4096


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
    #: vLLM's extension: logprobs of the prompt's own tokens (tiers capped at ``full`` only).
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


def _usage(generation: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


def chat_response(exchange_id: str, model: str, generation: Generation) -> dict[str, Any]:
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


def completion_response(exchange_id: str, model: str, generation: Generation) -> dict[str, Any]:
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


def chat_chunk(exchange_id, created, model, delta, entries, final: Generation | None):
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


def completion_chunk(exchange_id, created, model, text, entries, final: Generation | None):
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


def usage_chunk(exchange_id, created, model, generation: Generation, chat: bool):
    return {
        "id": exchange_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": _usage(generation),
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
