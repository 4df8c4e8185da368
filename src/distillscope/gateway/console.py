"""The console: where a trust & safety analyst works the loop, on the gateway under ``/console``.

Server-rendered pages (Jinja2, the report layer's stylesheet and inline-SVG charts, no script):

- **overview**: requests per hour by tier, tokens, exposure asked vs served, refusals and
  rate-limit hits, from the gateway's own traffic log;
- **alerts**: the watch's queue (``detect.watch``) with scores and reasons, grouped by cluster,
  each with *confirm* (blocks the account in the key store at once, and in the block list file
  when one is configured) and *dismiss* (allow-lists it, lifts a block); each decision is recorded
  with the alert and becomes a label (``watch.labels``);
- **account**: its requests per hour, its keys and tiers, its detector signals beside the
  population's (percentile in the latest watch run), its watermark and evidence, block and
  unblock;
- **forensics**: the radioactivity evidence reports in the evidence folder (``distillscope
  radioactivity --out``), and each account served under a watermarked tier with its key's
  fingerprint and the command that tests a suspect for it.

Clusters are drawn with the coordination graph's own edges (the latest watch run's
``edges.parquet``: what ties each pair, weighted).

Behind the admin key: ``/console/login`` takes it once and sets an HttpOnly, SameSite=Strict cookie
derived from it (never the key itself). Actions are POSTed forms; every one is written to the key
store's admin audit trail like the admin API's calls.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, quote

import pyarrow.parquet as pq
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from distillscope.gateway.keys import KeyStoreError

COOKIE = "distillscope_console"
# HTML pages, not API: left out of the OpenAPI schema
console_router = APIRouter(prefix="/console", include_in_schema=False)


@dataclass(frozen=True)
class ConsoleConfig:
    """Where the console finds the watch's alerts: the log the watch runs on and its state
    folder (``distillscope watch --log LOG --state STATE``); ``block_file``: the block list a
    review also rewrites (``serve --block-file``)."""

    watch_log: str | None = None
    watch_state: str | None = "watch"
    block_file: str | None = None
    #: where radioactivity evidence reports are looked for (``evidence.json``, at any depth)
    evidence: str | None = "evidence"


def _session(gateway) -> str:
    return hmac.new(gateway.admin_digest.encode(), b"console-session", hashlib.sha256).hexdigest()


def _signed_in(request: Request) -> bool:
    gateway = request.app.state.gateway
    given = request.cookies.get(COOKIE, "")
    return gateway.admin_digest is not None and hmac.compare_digest(given, _session(gateway))


def _page(template: str, **context) -> HTMLResponse:
    from distillscope.report.pages import render

    return HTMLResponse(render(template, **context))


def _audit(request: Request, status: int, detail: str | None = None) -> None:
    gateway = request.app.state.gateway
    actor = request.client.host if request.client else None
    gateway.keys.audit(actor, request.method, request.url.path, status, detail)


def _login_page(message: str | None = None, status: int = 200) -> HTMLResponse:
    page = _page("console_login.html.j2", title="distillscope console", message=message)
    page.status_code = status
    return page


@console_router.get("/login")
async def login_form(request: Request):
    if request.app.state.gateway.admin_digest is None:
        return _login_page("this gateway has no admin key: the console is off", 404)
    return _login_page()


@console_router.post("/login")
async def login(request: Request):
    gateway = request.app.state.gateway
    if gateway.admin_digest is None:
        return _login_page("this gateway has no admin key: the console is off", 404)
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    given = hashlib.sha256(form.get("admin_key", [""])[0].strip().encode()).hexdigest()
    if not hmac.compare_digest(given, gateway.admin_digest):
        _audit(request, 401, "console sign-in refused")
        return _login_page("that is not this gateway's admin key", 401)
    _audit(request, 303, "console sign-in")
    done = RedirectResponse("/console", status_code=303)
    done.set_cookie(COOKIE, _session(gateway), httponly=True, samesite="strict", path="/console")
    return done


def _guard(request: Request):
    return None if _signed_in(request) else RedirectResponse("/console/login", status_code=303)


@console_router.get("")
async def overview(request: Request):
    if (away := _guard(request)) is not None:
        return away
    rows = request.app.state.gateway.log.read().to_pylist()
    return _page("console_overview.html.j2", title="overview", **_overview(rows))


def _buckets(rows: list[dict]) -> tuple[list[datetime], timedelta]:
    """Time buckets over ``rows``' span: hours up to a week, days beyond."""
    if not rows:
        return [], timedelta(hours=1)
    first, last = min(r["ts"] for r in rows), max(r["ts"] for r in rows)
    step = timedelta(hours=1) if last - first <= timedelta(days=7) else timedelta(days=1)
    at = first.replace(minute=0, second=0, microsecond=0)
    if step == timedelta(days=1):
        at = at.replace(hour=0)
    starts = []
    while at <= last:
        starts.append(at)
        at += step
    return starts, step


def _counts(rows: list[dict], starts: list[datetime], step: timedelta) -> list[int]:
    if not starts:
        return []
    counts = Counter(int((r["ts"] - starts[0]) / step) for r in rows)
    return [counts.get(i, 0) for i in range(len(starts))]


def _labels(starts: list[datetime], step: timedelta) -> list[str]:
    form = "%Y-%m-%d %H:00" if step < timedelta(days=1) else "%Y-%m-%d"
    return [f"{t:{form}}" for t in starts]


def _overview(rows: list[dict]) -> dict:
    starts, step = _buckets(rows)
    labels = _labels(starts, step)
    tiers = sorted({r["tier"] or "(no key)" for r in rows})
    by_tier = []
    for tier in tiers:
        mine = [r for r in rows if (r["tier"] or "(no key)") == tier]
        served = [r for r in mine if r["status"] == 200]
        by_tier.append({
            "tier": tier,
            "requests": len(mine),
            "served": len(served),
            "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in served),
            "completion_tokens": sum(r["completion_tokens"] or 0 for r in served),
            "refused": sum(r["status"] >= 400 and r["status"] != 429 for r in mine),
            "limited": sum(r["status"] == 429 for r in mine),
            "per_hour": _counts(mine, starts, step),
            "models": ", ".join(sorted({r["model"] or "" for r in mine} - {""})),
        })  # fmt: skip
    exposure = Counter(
        (r["exposure_requested"] or "-", r["exposure_served"] or "-")
        for r in rows
        if r["status"] == 200
    )
    return {
        "total": len(rows),
        "accounts": len({r["account_id"] for r in rows if r["account_id"]}),
        "span": f"{labels[0]} to {labels[-1]} UTC" if labels else "no traffic yet",
        "by_tier": by_tier,
        "labels": labels,
        "unit": "hour" if step < timedelta(days=1) else "day",
        "exposure": sorted(exposure.items(), key=lambda kv: -kv[1]),
        "statuses": sorted(Counter(r["status"] for r in rows).items()),
    }


def _alerts(request: Request) -> list[dict]:
    return alerts_of(request.app)


@console_router.get("/alerts")
async def alerts(request: Request):
    if (away := _guard(request)) is not None:
        return away
    found = _alerts(request)
    clusters: dict[str, list[dict]] = defaultdict(list)
    for alert in found:
        if alert["cluster_id"]:
            clusters[alert["cluster_id"]].append(alert)
    tied = _edges(request)
    spokes = []
    for cid, members in sorted(clusters.items(), key=lambda kv: -len(kv[1])):
        placed = [(m, *_on_circle(i, len(members))) for i, m in enumerate(members)]
        at = {m["account_id"]: (x, y) for m, x, y in placed}
        lines = [
            (*at[u], *at[v], weight, ties)
            for (u, v), (weight, ties) in tied.items()
            if u in at and v in at
        ]
        spokes.append((cid, placed, lines))
    return _page(
        "console_alerts.html.j2", title="alerts", alerts=found, quote=quote, clusters=spokes,
        counts=Counter(a["status"] for a in found),
        configured=request.app.state.console.watch_log is not None,
    )  # fmt: skip


def _latest_run(request: Request) -> Path | None:
    config: ConsoleConfig = request.app.state.console
    runs = sorted((Path(config.watch_state or "watch") / "runs").glob("*/accounts.parquet"))
    return runs[-1].parent if runs else None


def _edges(request: Request) -> dict[tuple[str, str], tuple[int, str]]:
    """The coordination graph's edges inside clusters, from the latest watch run."""
    run = _latest_run(request)
    if run is None or not (run / "edges.parquet").is_file():
        return {}
    table = pq.read_table(run / "edges.parquet").to_pylist()
    return {(e["u"], e["v"]): (e["weight"], e["ties"]) for e in table}


def _on_circle(i: int, n: int, radius: float = 100.0) -> tuple[float, float]:
    angle = 2 * math.pi * i / max(n, 1)
    return radius * math.cos(angle), radius * math.sin(angle)


def apply_review(app, account: str, decision: str, *, reviewer: str | None,
                 note: str | None = None) -> dict:  # fmt: skip
    """Record a review of ``account``'s alert and act on it: ``confirm`` blocks the account in
    the key store (and the block list file), ``dismiss`` allow-lists it and lifts a block. The
    alert as it is now; ``WatchError`` when there is no such alert or review."""
    from distillscope.detect.watch import AlertStore, WatchError, write_blocks

    config: ConsoleConfig = app.state.console
    if config.watch_log is None:
        raise WatchError("no watch is configured for this gateway: there are no alerts")
    store = AlertStore(config.watch_log, config.watch_state or "watch")
    try:
        alert = store.review(account, decision, reviewer=reviewer, note=note)
        every = store.all()
    finally:
        store.close()
    _set_block(app.state.gateway.keys, account, decision == "confirm", "confirmed alert")
    if config.block_file:
        write_blocks(config.block_file, every)
    return alert


def alerts_of(app) -> list[dict]:
    """The watch's alerts this gateway's console shows (none without a watch)."""
    from distillscope.detect.watch import AlertStore

    config: ConsoleConfig = app.state.console
    if config.watch_log is None:
        return []
    store = AlertStore(config.watch_log, config.watch_state or "watch")
    try:
        return store.all()
    finally:
        store.close()


@console_router.post("/alerts/{account}/{decision}")
async def review(account: str, decision: str, request: Request):
    if (away := _guard(request)) is not None:
        return away
    from distillscope.detect.watch import WatchError

    if decision not in ("confirm", "dismiss"):
        _audit(request, 404)
        return HTMLResponse("no such review", status_code=404)
    try:
        alert = apply_review(request.app, account, decision, reviewer="console")
    except WatchError as exc:
        _audit(request, 404, str(exc))
        return HTMLResponse(str(exc), status_code=404)
    _audit(request, 303, json.dumps({decision: account, "status": alert["status"]}))
    return RedirectResponse("/console/alerts", status_code=303)


def _set_block(keys, account: str, blocked: bool, reason: str) -> None:
    """Block or lift a block on ``account`` in the key store; an account without keys has
    nothing to block there (the block list file covers it)."""
    try:
        if blocked:
            keys.block("account", account, reason=reason)
        else:
            keys.unblock("account", account)
    except KeyStoreError:
        pass


@console_router.post("/accounts/{account}/{action}")
async def block_account(account: str, action: str, request: Request):
    if (away := _guard(request)) is not None:
        return away
    if action not in ("block", "unblock"):
        _audit(request, 404)
        return HTMLResponse("no such action", status_code=404)
    _set_block(request.app.state.gateway.keys, account, action == "block", "console")
    _audit(request, 303, json.dumps({action: account}))
    return RedirectResponse(f"/console/accounts/{quote(account, safe='')}", status_code=303)


@console_router.get("/accounts/{account}")
async def account_page(account: str, request: Request):
    if (away := _guard(request)) is not None:
        return away
    gateway = request.app.state.gateway
    literal = "'" + account.replace("'", "''") + "'"
    rows = gateway.log.read(f"account_id = {literal}").to_pylist()
    starts, step = _buckets(rows)
    keys = gateway.keys.list(account)
    blocked = ("account", account) in {(b.kind, b.value) for b in gateway.keys.blocks()}
    alert = next((a for a in _alerts(request) if a["account_id"] == account), None)
    return _page(
        "console_account.html.j2", title=f"account {account}", account=account, rows=rows[-50:],
        requests=len(rows), per_hour=_counts(rows, starts, step), labels=_labels(starts, step),
        unit="hour" if step < timedelta(days=1) else "day", keys=keys, blocked=blocked,
        alert=alert, signals=_signals(request, account), quote=quote,
        marks=_watermarked(request, account),
        reports=[r for r in _reports(request) if r["account"] == account],
        tiers=Counter(r["tier"] for r in rows), statuses=Counter(r["status"] for r in rows),
    )  # fmt: skip


def _signals(request: Request, account: str) -> list[dict]:
    """The account's detector signals in the latest watch run, each with its percentile among
    that run's accounts (mid-rank: a value every account shares is the 50th)."""
    run = _latest_run(request)
    if run is None:
        return []
    table = pq.read_table(run / "accounts.parquet")
    ids = table["account_id"].to_pylist()
    if account not in ids:
        return []
    at = ids.index(account)
    out = []
    for name in table.column_names:
        if not name.startswith("signal_"):
            continue
        values = [v for v in table[name].to_pylist() if v is not None]
        mine = table[name][at].as_py()
        if mine is None or not values:
            continue
        share = (sum(v < mine for v in values) + 0.5 * sum(v == mine for v in values)) / len(values)
        out.append({"name": name.removeprefix("signal_"), "value": mine, "percentile": share})
    return out


@console_router.get("/forensics")
async def forensics(request: Request):
    if (away := _guard(request)) is not None:
        return away
    config: ConsoleConfig = request.app.state.console
    return _page(
        "console_forensics.html.j2", title="forensics", reports=_reports(request),
        marks=_watermarked(request), folder=config.evidence, quote=quote,
        secret=bool(os.environ.get("DISTILLSCOPE_WATERMARK_SECRET")),
    )  # fmt: skip


@console_router.get("/forensics/reports/{where:path}")
async def forensics_report(where: str, request: Request):
    """A report by its folder under the evidence folder (stable while new reports arrive)."""
    if (away := _guard(request)) is not None:
        return away
    found = next((r for r in _reports(request) if r["where"] == where), None)
    if found is None or not found["html"].is_file():
        return HTMLResponse("no such report", status_code=404)
    return HTMLResponse(found["html"].read_text())


#: Evidence reports listed at most (newest first).
MAX_REPORTS = 200


def _reports(request: Request) -> list[dict]:
    """The radioactivity evidence reports under the evidence folder, newest first."""
    from distillscope.report.evidence import p_text, verdict

    config: ConsoleConfig = request.app.state.console
    folder = Path(config.evidence) if config.evidence else None
    if folder is None or not folder.is_dir():
        return []
    found = sorted(folder.rglob("evidence.json"), key=lambda p: -p.stat().st_mtime)
    reports = []
    for path in found[:MAX_REPORTS]:
        try:
            payload = json.loads(path.read_text())
            tests = [
                {**t, "p_text": p_text(t["log10_p"]), "verdict": verdict(t["log10_p"])}
                for t in payload["tests"]
            ]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of ours, or half written
        reports.append({
            "account": payload.get("account"), "tests": tests,
            "where": str(path.parent.relative_to(folder)) or ".", "html": path.with_suffix(".html"),
            "written": datetime.fromtimestamp(path.stat().st_mtime),
        })  # fmt: skip
    return reports


def _watermarked(request: Request, account: str | None = None) -> list[dict]:
    """Each account holding a key of a watermarked tier: the scheme, its key's fingerprint
    (with the master secret in ``$DISTILLSCOPE_WATERMARK_SECRET``, as the gateway has it) and the
    command that tests a suspect model for that account's mark."""
    gateway = request.app.state.gateway
    schemes = {name: tier.watermark for name, tier in gateway.tiers.items() if tier.watermark}
    if not schemes or gateway.keys is None:
        return []
    master = os.environ.get("DISTILLSCOPE_WATERMARK_SECRET")
    context = os.environ.get("DISTILLSCOPE_WATERMARK_CONTEXT", "4")
    from distillscope.forensics.watermark import derive_key, key_fingerprint
    from distillscope.gateway.tiers import tier_name

    seen: dict[tuple[str, str], dict] = {}
    for key in gateway.keys.list(account):
        scheme = schemes.get(key.tier) or schemes.get(tier_name(key.tier))
        if scheme is None or (key.account_id, scheme) in seen:
            continue
        seen[key.account_id, scheme] = {
            "account_id": key.account_id, "tier": key.tier, "scheme": scheme,
            "fingerprint": key_fingerprint(derive_key(master, key.account_id)) if master else None,
            "command": f"distillscope radioactivity --suspect MODEL --account {key.account_id} "
            f"--scheme {scheme}" + (f" --context {context}" if context != "4" else ""),
        }  # fmt: skip
    return sorted(seen.values(), key=lambda m: (m["account_id"], m["scheme"]))
