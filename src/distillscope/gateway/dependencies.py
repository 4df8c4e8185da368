"""What a route depends on, as FastAPI dependencies.

``create_app`` puts one ``Gateway`` (what the app serves with) on ``app.state``; a route asks for
the parts it uses with ``Depends``: the caller (``caller``: the key, 401; the block list, 403; the
body's size, 413), the backend, the traffic log and the limiter. The request's exchange (its
traffic-log row, ``TrafficRow``) is begun on first use and kept on ``request.state``, so that a
refusal anywhere (a dependency, the body's validation, a route) is logged with what was known.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request

from distillscope.exposure import TopK
from distillscope.gateway.backends import Backend, Generation
from distillscope.gateway.keys import ApiKey, BlockListFile, KeyStore
from distillscope.gateway.limits import Limiter
from distillscope.gateway.metrics import GatewayMetrics
from distillscope.gateway.tiers import Tier, WatermarkFactory, tier_name
from distillscope.gateway.traffic import TrafficLog
from distillscope.gateway.wire import APIError
from distillscope.toolcalls import function_of

#: Request bodies larger than this are refused with 413 before they are parsed.
MAX_BODY_BYTES = 2_000_000
#: The two endpoints whose exchanges are logged.
LOGGED = ("/v1/chat/completions", "/v1/completions")

#: Without a key store the gateway is open: every caller gets this tier, without limits.
OPEN_TIER = Tier(
    "open", TopK(20), requests_per_minute=None, tokens_per_minute=None, concurrency=None
)


@dataclass(frozen=True)
class Gateway:
    """What one app serves with (``create_app``'s arguments, resolved)."""

    backend: Backend
    log: TrafficLog
    limiter: Limiter
    tiers: dict[str, Tier]
    #: ``None``: an open gateway (every caller at ``OPEN_TIER``)
    keys: KeyStore | None = None
    block_list: BlockListFile | None = None
    #: the penalty ``antidistill`` tiers sample under (``forensics.build_antidistillation``)
    antidistillation: Any | None = None
    watermarks: dict[str, WatermarkFactory] = field(default_factory=dict)
    #: when the app was made (Unix seconds): ``/v1/models`` reports it as the model's ``created``
    created: int = 0
    #: what ``GET /metrics`` reports (None: no metrics endpoint)
    metrics: GatewayMetrics | None = None
    #: the admin key's SHA-256 (None: no admin API; ``gateway.admin``)
    admin_digest: str | None = None

    async def record(self, row: dict) -> None:
        """Log one exchange, then count it: return once its row is committed."""
        await self.log.record(row)
        if self.metrics is not None:
            self.metrics.observe(row)

    def tier_of(self, key: ApiKey) -> Tier:
        tier = self.tiers.get(key.tier) or self.tiers.get(tier_name(key.tier))
        if tier is None:
            raise APIError(403, f"this key's tier {key.tier!r} is not offered by this gateway")
        return tier

    def blocked(self, key: ApiKey) -> bool:
        entries = self.keys.blocked() | (
            self.block_list.entries() if self.block_list else frozenset()
        )
        return ("account", key.account_id) in entries or ("key", key.key_id) in entries

    def processors(self, tier: Tier, account_id: str | None) -> list[object]:
        """The logits processors ``tier`` samples under, for one account's request."""
        processors = []
        if tier.antidistill:
            processors.append(
                self.antidistillation.scaled(tier.antidistill, top_p=tier.antidistill_top_p)
            )
        if tier.watermark is not None:
            # last, so the watermark's bias is on the distribution actually sampled
            processors.append(self.watermarks[tier.watermark](account_id or ""))
        return processors


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
    messages: list[dict[str, Any]] | None = None
    #: the tools the request offered (OpenAI's ``tools``)
    tools: list[dict[str, Any]] | None = None
    #: OpenAI's ``logit_bias`` as asked (token id -> bias): how a logit-bias reconstruction of
    #: the hidden distribution shows in the log
    logit_bias: dict[int, float] | None = None
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
            "tools": _tools_json(self.tools),
            "tool_calls": json.dumps(generation.tool_calls)
            if generation and generation.tool_calls
            else None,
            "logit_bias": None
            if not self.logit_bias
            else json.dumps({str(t): b for t, b in sorted(self.logit_bias.items())}),
            **extra,
        }


def _tools_json(tools: list[dict[str, Any]] | None) -> str | None:
    """The tools offered as the log stores them: OpenAI's shape, each function's name first and
    its parameters next (the order the detector's catalogue reads, as in a system message)."""
    if not tools:
        return None
    return json.dumps([{"type": "function", "function": function_of(tool)} for tool in tools])


def exchange_of(request: Request) -> TrafficRow | None:
    """The request's exchange, begun on first use (for the two logged endpoints only)."""
    exchange = getattr(request.state, "exchange", None)
    if exchange is None:
        path = request.url.path
        if path not in LOGGED:
            return None
        exchange = TrafficRow(path, time.perf_counter(), datetime.now(UTC), request)
        request.state.exchange = exchange
    return exchange


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def backend(gateway: Annotated[Gateway, Depends(gateway)]) -> Backend:
    return gateway.backend


def limiter(gateway: Annotated[Gateway, Depends(gateway)]) -> Limiter:
    return gateway.limiter


async def caller(request: Request, gateway: Annotated[Gateway, Depends(gateway)]) -> Caller:
    """Authenticate (401), apply the block list (403) and the body size cap (413)."""
    exchange = exchange_of(request) or TrafficRow(
        "", time.perf_counter(), datetime.now(UTC), request
    )
    if gateway.keys is None:
        exchange.caller = Caller(None, OPEN_TIER)
    else:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = gateway.keys.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise APIError(
                401,
                "Incorrect API key provided"
                if token
                else "Missing API key (Authorization: Bearer dsk-...)",
                code="invalid_api_key",
            )
        exchange.caller = Caller(key, gateway.tier_of(key))
        if gateway.blocked(key):
            raise APIError(
                403, "This key or its account is blocked", code="blocked", type="permission_error"
            )
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="too_large")
    return exchange.caller


GatewayDep = Annotated[Gateway, Depends(gateway)]
CallerDep = Annotated[Caller, Depends(caller)]
BackendDep = Annotated[Backend, Depends(backend)]
LimiterDep = Annotated[Limiter, Depends(limiter)]
