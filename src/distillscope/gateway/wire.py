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


class FunctionCall(BaseModel):
    name: str
    #: a JSON string, as OpenAI sends it (the model's own; it may not be valid JSON)
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    #: an assistant's calls, sent back in a later request
    tool_calls: list[ToolCall] | None = None
    #: a tool message answers this call
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError("tool_call_id", "a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("tool_calls", "only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_dict(self) -> dict[str, Any]:
        """The message as the backend and the log take it (OpenAI's shape, text content)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["content"] = self.content and self.text()
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


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
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @model_validator(mode="after")
    def _tool_choice_offered(self) -> ChatCompletionRequest:
        names = {tool.function.name for tool in self.tools or ()}
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in names:
                raise PydanticCustomError(
                    "tool_choice", "tool_choice names a function that tools do not offer"
                )
        elif self.tool_choice == "required" and not names:
            raise PydanticCustomError("tool_choice", "tool_choice required needs tools")
        return self

    def tool_list(self) -> list[dict[str, Any]] | None:
        """The tools offered, as plain dicts (``None`` when none)."""
        if not self.tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def choice(self) -> str | dict[str, Any]:
        """``tool_choice`` as a string or OpenAI's named-function dict (OpenAI's defaults:
        ``auto`` with tools, ``none`` without)."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice


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


def chat_message(generation: Generation) -> dict[str, Any]:
    """The answer as OpenAI's assistant message: content, or ``tool_calls`` and null content."""
    if generation.tool_calls:
        return {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": generation.tool_calls,
        }
    return {"role": "assistant", "content": generation.text, "refusal": None}


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
                "message": chat_message(generation),
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


def tool_call_deltas(generation: Generation) -> list[dict[str, Any]]:
    """A whole answer's calls as OpenAI streams them: per call, a delta naming it (``id``,
    ``type``, ``function.name``, empty ``arguments``), then a delta with its arguments."""
    deltas = []
    for index, call in enumerate(generation.tool_calls or ()):
        named = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
        arguments = {"arguments": call["function"]["arguments"]}
        deltas.append({"tool_calls": [{"index": index, **named}]})
        deltas.append({"tool_calls": [{"index": index, "function": arguments}]})
    return deltas


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
