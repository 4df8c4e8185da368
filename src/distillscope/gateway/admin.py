"""The admin API: keys, blocks and tiers of a running gateway, behind an admin key.

The admin key is not a user key: ``Authorization: Bearer <admin key>`` on ``/admin/...`` only,
compared in constant time, never stored (``create_app(admin_key=...)``; ``serve`` reads it from
``$DISTILLSCOPE_ADMIN_KEY``). A user's ``dsk-`` key is refused here, and the admin key is refused
on ``/v1``. Every admin call, refused ones included, is written to the key store's
``admin_audit`` table (when, from which address, method, path, status, what changed), which
``GET /admin/audit`` lists. Changes take effect at once on the serving path: blocks and
revocations reach it within the key store's refresh (a second by default).

| call | what |
|---|---|
| ``GET /admin/keys[?account=A]`` | keys (never secrets) |
| ``POST /admin/keys`` ``{"account", "tier", "name"?}`` | a new key: its secret, shown once (201) |
| ``DELETE /admin/keys/{key_id}`` | revoke it |
| ``GET /admin/blocks`` | every block with its reason |
| ``POST /admin/blocks`` ``{"kind": "account"|"key", "value", "reason"?}`` | block (201) |
| ``DELETE /admin/blocks/{kind}/{value}`` | lift a block |
| ``GET /admin/tiers`` | the tiers this gateway offers |
| ``GET /admin/alerts`` | the watch's alerts (``console.ConsoleConfig`` says where) |
| ``POST /admin/alerts/{account}`` ``{"decision", "reviewer"?, "note"?}`` | review one |
| ``GET /admin/audit[?limit=N]`` | the latest admin calls, newest first |

A review's ``decision`` is ``confirm`` (the account is blocked) or ``dismiss`` (allow-listed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from distillscope.gateway.dependencies import GatewayDep
from distillscope.gateway.keys import KeyStore, KeyStoreError
from distillscope.gateway.wire import APIError

#: the shortest admin key accepted (characters): a guessable one would open every key
MIN_ADMIN_KEY = 24


def admin_digest(admin_key: str) -> str:
    """What the app keeps of its admin key (checked before anything else starts)."""
    if len(admin_key) < MIN_ADMIN_KEY or admin_key.startswith("dsk-"):
        raise KeyStoreError(
            f"the admin key must be at least {MIN_ADMIN_KEY} characters and not a user key "
            "(dsk-...): e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return hashlib.sha256(admin_key.encode()).hexdigest()


async def _admin(request: Request, gateway: GatewayDep) -> KeyStore:
    """Authenticate the admin (401; 404 where there is no admin API)."""
    if gateway.keys is None or gateway.admin_digest is None:
        raise APIError(404, "this gateway has no admin API (serve it with keys and an admin key)")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = hashlib.sha256(token.strip().encode()).hexdigest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, gateway.admin_digest):
        request.state.audit_detail = "bad or missing admin key"
        raise APIError(401, "Incorrect admin key", code="invalid_admin_key")
    return gateway.keys


class AuditAdminCalls:
    """ASGI middleware: write every ``/admin`` call to the key store's trail once it is
    answered, with the status it got and what it changed (``request.state.audit_detail``).

    Plain ASGI, not ``BaseHTTPMiddleware``: every other request passes through untouched (no
    extra task, no wrapped streams), and a call that fails is on the trail too (status 500)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/admin"):
            await self.app(scope, receive, send)
            return
        # ``request.state`` is this dict: the handlers' detail is read back from it
        state = scope.setdefault("state", {})
        state["audit_detail"] = None
        status = 500

        async def answered(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, answered)
        finally:
            gateway = scope["app"].state.gateway
            if gateway.keys is not None and gateway.admin_digest is not None:
                client = scope.get("client")
                gateway.keys.audit(
                    client[0] if client else None,
                    scope["method"],
                    scope["path"],
                    status,
                    state.get("audit_detail"),
                )


AdminDep = Annotated[KeyStore, Depends(_admin)]
admin_router = APIRouter(prefix="/admin")


def _changed(request: Request, **what: Any) -> None:
    request.state.audit_detail = json.dumps(what, sort_keys=True)


def _bad(exc: KeyStoreError) -> APIError:
    message = str(exc)
    return APIError(404 if message.startswith("no ") else 400, message, code="admin_error")


class NewKey(BaseModel):
    account: str = Field(min_length=1, max_length=200)
    tier: str = Field(min_length=1, max_length=100)
    name: str | None = Field(default=None, max_length=200)


class NewBlock(BaseModel):
    kind: Literal["account", "key"]
    value: str = Field(min_length=1, max_length=200)
    reason: str | None = Field(default=None, max_length=500)


@admin_router.get("/keys")
async def list_keys(store: AdminDep, account: str | None = None) -> dict:
    return {"data": [asdict(k) for k in store.list(account)]}


@admin_router.post("/keys", status_code=201)
async def create_key(body: NewKey, request: Request, store: AdminDep, gateway: GatewayDep):
    if body.tier not in gateway.tiers:
        raise APIError(
            400, f"unknown tier {body.tier!r}: expected one of {', '.join(gateway.tiers)}",
            param="tier", code="admin_error",
        )  # fmt: skip
    try:
        key, secret = store.create(body.account, body.tier, name=body.name)
    except KeyStoreError as exc:
        raise _bad(exc) from None
    _changed(request, created=key.key_id, account=key.account_id, tier=key.tier)
    return JSONResponse({**asdict(key), "key": secret}, status_code=201)


@admin_router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request, store: AdminDep) -> dict:
    try:
        key = store.revoke(key_id)
    except KeyStoreError as exc:
        raise _bad(exc) from None
    _changed(request, revoked=key_id)
    return asdict(key)


@admin_router.get("/blocks")
async def list_blocks(store: AdminDep) -> dict:
    return {"data": [asdict(b) for b in store.blocks()]}


@admin_router.post("/blocks", status_code=201)
async def block(body: NewBlock, request: Request, store: AdminDep):
    try:
        made = store.block(body.kind, body.value, reason=body.reason)
    except KeyStoreError as exc:
        raise _bad(exc) from None
    _changed(request, blocked=f"{made.kind}:{made.value}", reason=made.reason)
    return JSONResponse(asdict(made), status_code=201)


@admin_router.delete("/blocks/{kind}/{value}")
async def unblock(kind: str, value: str, request: Request, store: AdminDep) -> dict:
    try:
        store.unblock(kind, value)
    except KeyStoreError as exc:
        raise _bad(exc) from None
    _changed(request, unblocked=f"{kind}:{value}")
    return {"kind": kind, "value": value, "blocked": False}


@admin_router.get("/tiers")
async def tiers(store: AdminDep, gateway: GatewayDep) -> dict:
    return {"data": [_tier(t) for t in gateway.tiers.values()]}


class Review(BaseModel):
    decision: Literal["confirm", "dismiss"]
    reviewer: str | None = Field(default=None, max_length=200)
    note: str | None = Field(default=None, max_length=2000)


@admin_router.get("/alerts")
async def alerts(store: AdminDep, request: Request) -> dict:
    from distillscope.gateway.console import alerts_of

    return {"data": [_plain(a) for a in alerts_of(request.app)]}


@admin_router.post("/alerts/{account}")
async def review_alert(account: str, body: Review, request: Request, store: AdminDep) -> dict:
    from distillscope.detect.watch import WatchError
    from distillscope.gateway.console import apply_review

    try:
        alert = apply_review(
            request.app, account, body.decision, reviewer=body.reviewer or "admin api",
            note=body.note,
        )  # fmt: skip
    except WatchError as exc:
        raise APIError(404, str(exc), code="admin_error") from None
    _changed(request, reviewed=account, decision=body.decision, status=alert["status"])
    return _plain(alert)


def _plain(alert: dict) -> dict:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in alert.items()}


@admin_router.get("/audit")
async def audit(store: AdminDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict:
    return {"data": store.audit_trail(limit)}


def _tier(tier) -> dict:
    out = {}
    for name, value in asdict(tier).items():
        out[name] = value if isinstance(value, str | int | float | bool | None) else str(value)
    out["exposure"] = str(tier.exposure)
    return out
