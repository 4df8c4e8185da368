"""The gateway: an OpenAI-compatible API that controls exposure per key and records every exchange.

``create_app(backend, keys=..., log=..., limiter=...)`` builds the FastAPI app; ``distillscope
serve`` runs it under uvicorn. Per request, in order: a body that is not JSON at all (400), the
key (401), the block list (403), the body's fields (400), the prompt's size (413), the key's rate
limits (429); then the tier's exposure policy decides what the backend is asked for and what the
answer reveals. Every exchange, refused or served, is appended to the traffic log, and a response
is sent only once its row is durable.

The app is put together from rooms of its own: ``wire.py`` (OpenAI's request models, error and
response shapes), ``dependencies.py`` (the app's ``Gateway`` state and what routes ``Depends``
on: the caller, the backend, the traffic log, the limiter), ``routes.py`` (the endpoints) and
``policy.py`` (a tier's exposure policy on one request). This module wires them and answers every
refusal in OpenAI's error shape, logged.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from distillscope.gateway.admin import AuditAdminCalls, admin_digest, admin_router
from distillscope.gateway.backends import Backend, TeacherBackend
from distillscope.gateway.console import ConsoleConfig, console_router
from distillscope.gateway.dependencies import Gateway, exchange_of
from distillscope.gateway.keys import BlockListFile, KeyStore
from distillscope.gateway.limits import Limiter, MemoryLimiter
from distillscope.gateway.metrics import GatewayMetrics
from distillscope.gateway.routes import router
from distillscope.gateway.tiers import (
    BUILTIN_TIERS,
    Tier,
    TierError,
    WatermarkFactory,
    antidistilled,
    check_watermarks,
)
from distillscope.gateway.traffic import TrafficLog, open_traffic_log
from distillscope.gateway.wire import APIError


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
    metrics: bool = True,
    admin_key: str | None = None,
    console: ConsoleConfig | None = None,
) -> FastAPI:
    """An app serving ``backend`` (a ``Backend``, or a local teacher) as one model.

    Without ``keys`` the gateway is open: no key needed, every caller at ``OPEN_TIER``. ``log``
    defaults to no log; ``limiter`` to in-memory limits; ``tiers`` to the built-in ones.
    ``antidistillation`` (an ``AntidistillationProcessor``, from ``build_antidistillation``) is the
    penalty tiers with ``antidistill: LAMBDA`` sample under, at their own strength.
    ``watermarks`` are those tiers may name (``forensics.gateway_watermarks``). ``metrics``
    serves ``GET /metrics`` for Prometheus (``gateway.metrics``: counts by tier, never by account).
    ``admin_key`` (with ``keys``) opens the admin API under ``/admin`` (``gateway.admin``) and
    the console under ``/console`` (``gateway.console``; ``console`` says where the watch keeps
    its alerts).
    """
    if admin_key is not None and keys is None:
        raise TierError("an admin key needs a key store: the admin API manages its keys")
    digest = admin_digest(admin_key) if admin_key is not None else None
    if not isinstance(backend, Backend):
        backend = TeacherBackend(backend, model_name=model_name or "distillscope-default")
    elif model_name:
        backend.model_name = model_name
    tiers = tiers or dict(BUILTIN_TIERS)
    defended = antidistilled(tiers)
    if defended and antidistillation is None:
        raise TierError(
            f"tier(s) {', '.join(defended)} set antidistill, which needs a local teacher's proxy "
            "student: build one with distillscope.forensics.build_antidistillation"
        )
    watermarks = dict(watermarks or {})
    check_watermarks(tiers, watermarks)
    gateway = Gateway(
        backend=backend,
        log=log or open_traffic_log(None),
        limiter=limiter or MemoryLimiter(),
        tiers=tiers,
        keys=keys,
        block_list=BlockListFile(block_file) if block_file else None,
        antidistillation=antidistillation,
        watermarks=watermarks,
        created=int(time.time()),
        metrics=GatewayMetrics() if metrics else None,
        admin_digest=digest,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await backend.close()

    app = FastAPI(
        title="distillscope gateway",
        description="OpenAI-compatible chat and text completions with per-key exposure policy.",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(console_router)
    app.state.console = console or ConsoleConfig()
    if digest is not None:
        app.add_middleware(AuditAdminCalls)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    return app


async def _refuse(request: Request, error: APIError) -> JSONResponse:
    """Log a refused exchange, then answer it."""
    exchange = exchange_of(request)
    if exchange is not None:
        row = exchange.row(f"err-{uuid.uuid4().hex}", error.status, error_code=error.code)
        await request.app.state.gateway.record(row)
    return error.response()


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return await _refuse(request, exc)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI answers 422 in its own shape; OpenAI clients expect 400 in OpenAI's.
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return await _refuse(request, APIError(400, "the request body is not valid JSON"))
    param = ".".join(str(part) for part in first["loc"] if part != "body") or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return await _refuse(request, APIError(400, message, param=param))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return await _refuse(request, APIError(exc.status_code, str(exc.detail)))


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return await _refuse(
        request, APIError(500, "the server failed on this request", type="server_error")
    )
