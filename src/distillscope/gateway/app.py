"""A minimal OpenAI-compatible chat completions server in front of any distillscope teacher.

It lets a local teacher be queried exactly the way a remote API is (same client, same exposure
limits), so an attack or audit written against OpenAI's API runs unchanged against a model whose
full distribution is known. Token ids cross the wire as OpenAI's ``token``/``bytes`` pairs, spelled
by ``distillscope.tokens.token_bytes_table``, the table ``OpenAITeacher`` reads them back with.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from distillscope.errors import TeacherError
from distillscope.exposure import Exposure, Signal, Text, TopK, is_at_least
from distillscope.teachers.base import Completion, SamplingConfig, Teacher
from distillscope.tokens import token_bytes_table

#: What OpenAI reports as the logprob of a token too unlikely to represent (JSON has no -inf).
LOGPROB_FLOOR = -9999.0

#: ``max_tokens`` when a request gives none.
DEFAULT_MAX_TOKENS = 16

#: Parameters that would change the answer but that a teacher cannot honour, with the values that
#: leave it unchanged. Any other value is refused, so a request is never answered as another one.
_NEUTRAL: dict[str, tuple] = {
    "n": (None, 1),
    "stream": (None, False),
    "top_p": (None, 1),
    "stop": (None, [], ""),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
}


class TextPart(BaseModel):
    """One part of a multi-part message; only text parts can reach a text teacher."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(BaseModel, extra="allow"):
    """The chat completion parameters the gateway honours; other known ones must be neutral."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)


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
    ):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


def create_app(
    teacher: Teacher, *, model_name: str = "distillscope-default", max_top_logprobs: int = 20
) -> FastAPI:
    """An app serving ``teacher`` as the one model ``model_name`` on ``/v1/chat/completions``.

    The last user message is the prompt (the teacher applies its own chat template). Sampling is
    the teacher's own, seeded by ``seed`` and the prompt, so a request answers exactly as
    ``teacher.generate([prompt], ...)`` would. Teachers are not thread-safe: one request at a
    time reaches the model, on a worker thread so the event loop stays responsive.
    """
    if teacher.tokenizer is None:
        raise TeacherError("the gateway needs a teacher with a tokenizer, to name its tokens")
    spelling = token_bytes_table(teacher.tokenizer)
    lock = threading.Lock()
    created = int(time.time())
    app = FastAPI(title="distillscope gateway")

    def generate(prompt: str, sampling: SamplingConfig) -> Completion:
        with lock:
            return teacher.generate([prompt], sampling)[0]

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 in its own shape; OpenAI clients expect 400 in OpenAI's.
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return APIError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, "the server failed on this request", type="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "distillscope",
        }
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest) -> dict[str, Any]:
        if request.model != model_name:
            raise APIError(
                404,
                f"The model '{request.model}' does not exist; this server has '{model_name}'",
                param="model",
                code="model_not_found",
            )
        extra = request.model_extra or {}
        for name, neutral in _NEUTRAL.items():
            if extra.get(name) not in neutral:
                raise APIError(400, f"{name}={extra[name]!r} is not supported", param=name)
        prompts = [m.text() for m in request.messages if m.role == "user"]
        if not prompts:
            raise APIError(400, "messages must contain a user message", param="messages")
        top_n = request.top_logprobs or 0
        if top_n and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if top_n > max_top_logprobs:
            raise APIError(
                400, f"top_logprobs must be at most {max_top_logprobs}", param="top_logprobs"
            )
        exposure: Exposure = TopK(max(top_n, 1)) if request.logprobs else Text()
        if not is_at_least(teacher.max_exposure, exposure):
            raise APIError(
                400, f"this model reveals at most {teacher.max_exposure}", param="top_logprobs"
            )
        try:
            sampling = SamplingConfig(
                exposure=exposure,
                temperature=1.0 if request.temperature is None else request.temperature,
                max_new_tokens=(
                    request.max_completion_tokens or request.max_tokens or DEFAULT_MAX_TOKENS
                ),
                seed=request.seed or 0,
                # Never cut here: a client that wants shorter prompts cuts them itself.
                max_prompt_tokens=sys.maxsize,
            )
            completion = await run_in_threadpool(generate, prompts[-1], sampling)
        except TeacherError as exc:
            raise APIError(400, str(exc)) from exc
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text, "refusal": None},
                    "finish_reason": completion.finish_reason,
                    "logprobs": _logprobs(completion.signal, spelling, top_n),
                }
            ],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
        }

    return app


def _token(spelling: list[bytes], token_id: int, logprob: float) -> dict[str, Any]:
    """One token as OpenAI reports it: ``bytes`` exact, ``token`` their (lossy) text."""
    spelled = spelling[int(token_id)]
    return {
        "token": spelled.decode("utf-8", errors="replace"),
        "logprob": max(float(logprob), LOGPROB_FLOOR),
        "bytes": list(spelled),
    }


def _logprobs(signal: Signal, spelling: list[bytes], top_n: int) -> dict[str, Any] | None:
    """The ``choices[0].logprobs`` object, or ``None`` when the signal carries no logprobs."""
    if signal.token_logprobs is None:
        return None
    content = []
    for position, token_id in enumerate(signal.token_ids):
        alternatives = []
        if top_n:
            ids = signal.topk_ids[position, :top_n]
            logprobs = signal.topk_logprobs[position, :top_n]
            alternatives = [_token(spelling, i, lp) for i, lp in zip(ids, logprobs, strict=True)]
        entry = _token(spelling, token_id, signal.token_logprobs[position])
        content.append({**entry, "top_logprobs": alternatives})
    return {"content": content, "refusal": None}
