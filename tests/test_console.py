"""The console in a real browser (Debian's Chromium driven by Playwright; nothing downloaded):
pages load with data, and a review action blocks the account so the gateway answers 403 within
seconds. Screenshots go to $DISTILLSCOPE_CONSOLE_SHOTS when it is set (docs/console.md's)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import openai
import pyarrow.parquet as pq
import pytest

from distillscope.detect.watch import watch_once
from distillscope.gateway import KeyStore, create_app, serve_in_thread
from distillscope.gateway.console import ConsoleConfig
from distillscope.gateway.traffic import open_traffic_log
from distillscope.teachers import load_teacher
from distillscope.traffic import load_scenario, simulate

CHROMIUM = Path("/usr/lib/chromium/chromium")
ADMIN = "console-admin-" + "x" * 24


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (Debian's, as scripts/ensure-chromium.sh installs)."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/ensure-chromium.sh", pytrace=False)
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def world(postgres_url, tmp_path_factory):
    """The smoke world's traffic in a PostgreSQL log, a key store beside it, one watch run."""
    import psycopg

    root = tmp_path_factory.mktemp("console")
    simulate(load_scenario("smoke"), root / "sim", progress=False)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS console_world")
        conn.execute("CREATE DATABASE console_world")
    url = postgres_url.rsplit("/", 1)[0] + "/console_world"
    log = open_traffic_log(url)
    log.start()
    rows = pq.read_table(root / "sim" / "traffic.parquet").to_pylist()
    for future in [log.submit(r) for r in rows]:
        future.result(timeout=120)
    watched = watch_once(url, root / "watch")
    return {"url": url, "log": log, "root": root, "watched": watched}


def _shot(page, name: str, folder: Path) -> None:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))  # the first screenful: what a reader sees first
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("DISTILLSCOPE_CONSOLE_SHOTS"):
        target = Path(os.environ["DISTILLSCOPE_CONSOLE_SHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)


def test_the_console_shows_the_loop_and_a_review_blocks_within_seconds(
    world, browser, tmp_path, monkeypatch
):
    from distillscope.forensics.radioactivity import RadioactivityResult
    from distillscope.forensics.watermark import derive_key, gateway_watermarks, key_fingerprint
    from distillscope.gateway.tiers import BUILTIN_TIERS, Tier
    from distillscope.report.evidence import write_evidence

    secret_master = "console-test-master-secret"
    monkeypatch.setenv("DISTILLSCOPE_WATERMARK_SECRET", secret_master)
    keys = KeyStore(world["url"], refresh=0.1)
    queued = [a["account_id"] for a in _store_alerts(world) if a["status"] == "queued"]
    assert world["watched"].new and queued, "the smoke world gives queued alerts"
    target = queued[0]
    secret = keys.create(target, "text", name="console test")[1]
    keys.create("lab-marked", "marked", name="watermarked")
    tiers = {**BUILTIN_TIERS, "marked": Tier("marked", BUILTIN_TIERS["top5"].exposure,
                                            watermark="kgw")}  # fmt: skip
    evidence = tmp_path / "evidence"
    found = RadioactivityResult(
        mode="closed", suspect="runs/suspect", scheme="kgw", texts=64, tokens_scored=2900,
        statistic=1010.0, log10_p=-12.4, z=7.3,
    )  # fmt: skip
    write_evidence(evidence / "suspect-1", [found], account="lab-marked")
    app = create_app(
        load_teacher("synthetic"), model_name="m", keys=keys, log=world["log"], admin_key=ADMIN,
        tiers=tiers, watermarks=gateway_watermarks(secret_master),
        console=ConsoleConfig(watch_log=world["url"], watch_state=str(world["root"] / "watch"),
                              evidence=str(evidence)),
    )  # fmt: skip
    with serve_in_thread(app) as url:
        user = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
        asked = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        user.chat.completions.create(**asked)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/console")
        assert page.url.endswith("/console/login")  # nothing without the admin key
        page.fill("input[name=admin_key]", "not the key")
        page.click("button[type=submit]")
        assert "not this gateway's admin key" in page.content()
        page.fill("input[name=admin_key]", ADMIN)
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}/console")
        assert "4,675 exchanges" in page.inner_text("p.sub")  # the world and our one request
        assert page.locator("table.tiers tr").count() >= 3 and page.locator("svg.spark").count()
        _shot(page, "overview", tmp_path)
        page.goto(f"{url}/console/alerts")
        rows = page.locator("tr.alert")
        assert rows.count() == len(_store_alerts(world))
        assert page.locator("svg.cluster").count() >= 1
        assert page.locator("svg.cluster line.edge").count() >= 1  # the graph's own edges
        _shot(page, "alerts", tmp_path)
        _shot(page.locator("svg.cluster").first, "cluster", tmp_path)
        page.locator(f'tr[data-account="{target}"] button.confirm').click()
        page.wait_for_url(f"{url}/console/alerts")
        assert "confirmed" in page.locator(f'tr[data-account="{target}"] td.status').inner_text()
        began = time.monotonic()
        while True:  # the gateway refuses the account within its key store's refresh
            try:
                user.chat.completions.create(**asked)
            except openai.PermissionDeniedError:
                break
            assert time.monotonic() - began < 5, "still served 5 s after the confirmation"
            time.sleep(0.1)
        page.goto(f"{url}/console/accounts/{target}")
        assert "Blocked." in page.inner_text("p.sub")
        assert page.locator("table.signals tr").count() > 5  # its signals against the population
        assert page.locator("table.keys").inner_text().count("console test") == 1
        _shot(page, "account", tmp_path)
        page.click("button.unblock")
        assert "Not blocked." in page.inner_text("p.sub")
        page.goto(f"{url}/console/forensics")
        fingerprint = key_fingerprint(derive_key(secret_master, "lab-marked"))
        assert fingerprint in page.locator("tr.mark").inner_text()
        assert "strong evidence" in page.locator("tr.report").inner_text()
        _shot(page, "forensics", tmp_path)
        page.click("tr.report a >> nth=0")
        assert "Radioactivity evidence for account lab-marked" in page.content()
        page.goto(f"{url}/console/accounts/lab-marked")
        assert fingerprint in page.locator("table.marks").inner_text()
        assert page.locator("table.reports tr").count() == 2
        page.close()
        # the same queue through the admin API
        import httpx

        admin = httpx.Client(base_url=f"{url}/admin", headers={"authorization": f"Bearer {ADMIN}"})
        listed = {a["account_id"]: a for a in admin.get("/alerts").json()["data"]}
        assert listed[target]["status"] == "confirmed" and listed[target]["reviewer"] == "console"
        other = queued[1]
        done = admin.post(f"/alerts/{other}", json={"decision": "dismiss", "note": "a known lab"})
        assert done.status_code == 200 and done.json()["status"] == "dismissed"
        assert admin.post("/alerts/nobody", json={"decision": "confirm"}).status_code == 404
        assert admin.post(f"/alerts/{other}", json={"decision": "ban"}).status_code == 400
    trail = keys.audit_trail(100)
    assert any(e["path"].endswith(f"/{target}/confirm") and e["status"] == 303 for e in trail)
    assert any(e["detail"] == "console sign-in refused" for e in trail)
    assert any(e["path"] == f"/admin/alerts/{queued[1]}" and e["status"] == 200 for e in trail)
    world["log"].close()


def _store_alerts(world) -> list[dict]:
    from distillscope.detect.watch import AlertStore

    store = AlertStore(world["url"], world["root"] / "watch")
    try:
        return store.all()
    finally:
        store.close()
