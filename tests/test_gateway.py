"""The gateway end to end: the official openai client (sync, async, streaming) against a real
uvicorn server, keys and tiers from a real SQLite store, the traffic log in a real DuckDB file.

The model-free synthetic teacher answers (exact logprobs of what it samples, in microseconds);
the one test that needs a model's prompt scores serves the tiny random Llama.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from distillscope.gateway import KeyStore, Tier, create_app, serve_in_thread, write_block_list
from distillscope.gateway.backends import LOGPROB_FLOOR
from distillscope.gateway.keys import Block
from distillscope.gateway.tiers import BUILTIN_TIERS, TierError, load_tiers, tier_from_dict
from distillscope.gateway.traffic import open_traffic_log, read_traffic
from distillscope.teachers import load_teacher
from distillscope.tokens import token_bytes_table

MODEL = "distillscope-synthetic"
HI = [{"role": "user", "content": "Say hi to the gateway."}]


@pytest.fixture(scope="module")
def synthetic():
    return load_teacher("synthetic")


@pytest.fixture(scope="module")
def gateway(synthetic, tmp_path_factory):
    """A keyed gateway with every built-in tier, a strict tier and a rounding tier."""
    root = tmp_path_factory.mktemp("gateway")
    store = KeyStore(root / "keys.sqlite", refresh=0.1)
    tiers = dict(BUILTIN_TIERS)
    tiers["strict"] = Tier("strict", BUILTIN_TIERS["top5"].exposure, over_limit="reject")
    tiers["rounded"] = Tier("rounded", BUILTIN_TIERS["top5"].exposure, round_logprobs=2)
    tiers["noisy"] = Tier("noisy", BUILTIN_TIERS["top5"].exposure, logprob_noise=0.5)
    tiers["slow"] = Tier("slow", BUILTIN_TIERS["text"].exposure, requests_per_minute=3)
    tiers["short"] = Tier("short", BUILTIN_TIERS["text"].exposure, max_prompt_tokens=8)
    secrets = {name: store.create(f"acct-{name}", name)[1] for name in tiers}
    log = open_traffic_log(root / "traffic.duckdb", max_wait_ms=2)
    log.start()
    block_file = root / "blocked.txt"
    app = create_app(
        synthetic,
        model_name=MODEL,
        keys=store,
        log=log,
        tiers=tiers,
        block_file=str(block_file),
    )
    with serve_in_thread(app) as url:
        yield {
            "url": f"{url}/v1",
            "keys": secrets,
            "store": store,
            "log": log,
            "block_file": block_file,
        }
    log.close()


def client(gateway, tier: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway["url"], api_key=gateway["keys"][tier], max_retries=0)


def aclient(gateway, tier: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway["url"], api_key=gateway["keys"][tier], max_retries=0)


def ask(c, **kwargs):
    args = {"model": MODEL, "messages": HI, "max_tokens": 12, "seed": 3, **kwargs}
    return c.chat.completions.create(**args)


def test_openai_client_sync_and_async_streaming_or_not_agree(gateway, synthetic):
    c = client(gateway, "top20")
    whole = ask(c, logprobs=True, top_logprobs=5)
    choice = whole.choices[0]
    assert whole.id.startswith("chatcmpl-") and whole.model == MODEL
    content = choice.logprobs.content
    assert len(content) == whole.usage.completion_tokens > 0
    for entry in content:
        tops = [alt.logprob for alt in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert entry.token == bytes(entry.bytes).decode("utf-8", "replace")
    # The very completion the teacher draws in-process for this prompt and seed.
    from distillscope.teachers import SamplingConfig

    local = synthetic.generate(
        [HI[0]["content"]], SamplingConfig(exposure="top5", max_new_tokens=12, seed=3)
    )[0]
    assert choice.message.content == local.text
    assert [e.logprob for e in content] == pytest.approx(local.signal.token_logprobs.tolist())

    chunks = list(ask(c, logprobs=True, top_logprobs=5, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    entries = [
        e
        for ch in chunks
        if ch.choices and ch.choices[0].logprobs
        for e in ch.choices[0].logprobs.content
    ]
    assert streamed == choice.message.content
    assert [e.model_dump() for e in entries] == [e.model_dump() for e in content]
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert len({ch.id for ch in chunks}) == 1

    async def both():
        async with aclient(gateway, "top20") as ac:
            plain = await ac.chat.completions.create(
                model=MODEL, messages=HI, max_tokens=12, seed=3, logprobs=True, top_logprobs=5
            )
            stream = await ac.chat.completions.create(
                model=MODEL,
                messages=HI,
                max_tokens=12,
                seed=3,
                stream=True,
                stream_options={"include_usage": True},
                logprobs=True,
                top_logprobs=5,
            )
            parts = [chunk async for chunk in stream]
        return plain, parts

    plain, parts = asyncio.run(both())
    assert plain.choices[0].message.content == choice.message.content
    streamed_entries = [
        e
        for p in parts
        if p.choices and p.choices[0].logprobs
        for e in p.choices[0].logprobs.content
    ]
    assert [e.model_dump() for e in streamed_entries] == [e.model_dump() for e in content]
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == streamed
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_is_server_sent_events_ending_in_done(gateway):
    headers = {"Authorization": f"Bearer {gateway['keys']['top5']}"}
    body = {"model": MODEL, "messages": HI, "max_tokens": 8, "stream": True}
    with httpx.stream(
        "POST", f"{gateway['url']}/chat/completions", json=body, headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant"}


def test_legacy_completions(gateway):
    c = client(gateway, "top5")
    response = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, logprobs=3)
    choice = response.choices[0]
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert len(choice.logprobs.tokens) == response.usage.completion_tokens
    assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs)
    assert choice.logprobs.text_offset[0] == 0
    streamed = "".join(
        chunk.choices[0].text
        for chunk in c.completions.create(
            model=MODEL, prompt="Once upon", max_tokens=10, stream=True
        )
    )
    assert streamed == choice.text
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        c.completions.create(model=MODEL, prompt="x", logprobs=6)


@pytest.mark.parametrize(
    ("tier", "asked", "served", "header"),
    [
        ("top20", 20, 20, "top20"),
        ("top5", 20, 5, "top5"),
        ("top1", 3, 1, "top1"),
        ("top5", 0, 0, "logprobs"),
        ("text", 5, None, "text"),
    ],
)
def test_tier_caps_what_is_revealed(gateway, tier, asked, served, header):
    c = client(gateway, tier)
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, max_tokens=6, logprobs=True, top_logprobs=asked
    )
    assert raw.headers["x-distillscope-exposure"] == header
    logprobs = raw.parse().choices[0].logprobs
    if served is None:
        assert logprobs is None
    else:
        assert {len(e.top_logprobs) for e in logprobs.content} == {served}


def test_reject_tier_refuses_and_rounding_tier_rounds(gateway):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client(gateway, "strict"), logprobs=True, top_logprobs=6)
    assert refused.value.code == "exposure_not_allowed"
    assert ask(client(gateway, "strict"), logprobs=True, top_logprobs=5).choices[0].logprobs
    content = ask(client(gateway, "rounded"), logprobs=True, top_logprobs=5).choices[0]
    values = [alt.logprob for e in content.logprobs.content for alt in [e, *e.top_logprobs]]
    assert values and all(round(v, 2) == v for v in values)
    assert any(v != round(v, 1) for v in values)
    longer = dict(logprobs=True, top_logprobs=5, max_tokens=40)
    clean = ask(client(gateway, "top5"), **longer).choices[0]
    noisy = ask(client(gateway, "noisy"), **longer).choices[0]
    assert noisy.message.content == clean.message.content  # noise hides, never changes, the answer
    assert all(n.logprob <= 0 for n in noisy.logprobs.content)
    # each exchange draws its own noise (sd 0.5), cut at 0: measured on the alternatives the
    # clean answer puts below -2, where the cut almost never binds (over 100 draws: sd 0.5 +- 0.04)
    shifts = []
    for n, c in zip(noisy.logprobs.content, clean.logprobs.content, strict=True):
        served = {alt.token: alt.logprob for alt in n.top_logprobs}
        shifts += [served[a.token] - a.logprob for a in c.top_logprobs
                   if a.logprob < -2 and a.token in served]  # fmt: skip
    assert len(shifts) >= 60, shifts
    assert 0.3 < float(np.std(shifts)) < 0.75


def test_prompt_logprobs_only_on_the_research_tier(tiny_teacher, tmp_path):
    """``research`` (capped at ``full``) serves prompt logprobs; so does a key stored under the
    tier's old name, ``full``."""
    store = KeyStore(tmp_path / "keys.sqlite")
    research = store.create("a", "research")[1]
    old_name = store.create("c", "full")[1]
    top5 = store.create("b", "top5")[1]
    app = create_app(tiny_teacher, model_name="tiny", keys=store)
    with serve_in_thread(app) as url:
        body = {"model": "tiny", "messages": HI, "max_tokens": 2, "prompt_logprobs": 3}

        def post(secret: str) -> httpx.Response:
            headers = {"Authorization": f"Bearer {secret}"}
            return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)

        answer, renamed, capped = post(research), post(old_name), post(top5)
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {old_name}"})
    assert models.json()["data"][0]["distillscope"] == {"tier": "research", "max_exposure": "full"}
    assert renamed.status_code == 200 and "prompt_logprobs" in renamed.json()
    assert answer.status_code == 200 and answer.headers["x-distillscope-exposure"] == "full"
    prompt_logprobs = answer.json()["prompt_logprobs"]
    assert prompt_logprobs[0] is None
    assert answer.json()["usage"]["prompt_tokens"] == len(prompt_logprobs)
    for position in prompt_logprobs[1:]:
        assert 1 <= len(position) <= 4
        assert all(item["logprob"] <= 0 and item["rank"] >= 1 for item in position.values())
    assert capped.status_code == 200 and "prompt_logprobs" not in capped.json()


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    body = caught.value.body
    assert set(body) >= {"message", "type", "param", "code"}  # OpenAI's error shape
    return caught.value


def test_errors_in_openai_shape_and_never_500(gateway):
    url = gateway["url"]
    anonymous = openai.OpenAI(base_url=url, api_key="dsk-nope-nope", max_retries=0)
    assert isinstance(error_of(lambda: ask(anonymous)), openai.AuthenticationError)
    c = client(gateway, "top5")
    assert error_of(lambda: ask(c, model="gpt-9")).status_code == 404
    assert error_of(lambda: ask(c, temperature=3)).status_code == 400
    assert error_of(lambda: ask(c, max_tokens=0)).status_code == 400
    assert error_of(lambda: ask(c, top_logprobs=21, logprobs=True)).status_code == 400
    assert error_of(lambda: ask(c, n=2)).status_code == 400
    assert error_of(lambda: ask(c, messages=[])).status_code == 400
    long = [{"role": "user", "content": "word " * 50}]
    assert error_of(lambda: ask(client(gateway, "short"), messages=long)).status_code == 413
    headers = {"Authorization": f"Bearer {gateway['keys']['top5']}"}
    for body in (b"{not json", b"[]", b'{"model": 1}', b'{"model": "x", "messages": "hi"}'):
        answer = httpx.post(f"{url}/chat/completions", content=body, headers=headers)
        assert answer.status_code == 400 and answer.json()["error"]["type"]
    no_key = httpx.post(f"{url}/chat/completions", json={"model": MODEL, "messages": HI})
    assert no_key.status_code == 401


def test_rate_limit_429_with_retry_after_per_key(gateway):
    slow = client(gateway, "slow")
    for _ in range(3):
        ask(slow)
    limited = error_of(lambda: ask(slow))
    assert isinstance(limited, openai.RateLimitError)
    assert int(limited.response.headers["retry-after"]) >= 1
    # Another key is not affected by this one's limit.
    assert ask(client(gateway, "text")).choices[0].message.content is not None


def test_block_list_from_store_and_file_and_revocation(gateway):
    store: KeyStore = gateway["store"]
    key, secret = store.create("acct-blocked", "top5")
    c = openai.OpenAI(base_url=gateway["url"], api_key=secret, max_retries=0)
    ask(c)
    store.block("account", "acct-blocked", reason="test")
    time.sleep(0.15)
    assert isinstance(error_of(lambda: ask(c)), openai.PermissionDeniedError)
    store.unblock("account", "acct-blocked")
    time.sleep(0.15)
    ask(c)
    write_block_list(gateway["block_file"], [Block("key", key.key_id, "detector")])
    time.sleep(1.1)  # the file is re-checked once a second
    assert isinstance(error_of(lambda: ask(c)), openai.PermissionDeniedError)
    write_block_list(gateway["block_file"], [])
    time.sleep(1.1)
    ask(c)
    store.revoke(key.key_id)
    time.sleep(0.15)
    assert isinstance(error_of(lambda: ask(c)), openai.AuthenticationError)


def test_every_exchange_is_logged_with_its_exposure(gateway):
    log = gateway["log"]
    before = log.count()
    c = client(gateway, "top5")
    ids = [ask(c, logprobs=True, top_logprobs=20, seed=s).id for s in range(5)]
    with pytest.raises(openai.NotFoundError):
        ask(c, model="nope")
    rows = log.read(f"exchange_id IN ({', '.join(repr(i) for i in ids)})").to_pylist()
    assert len(rows) == 5
    for row in rows:
        assert row["account_id"] == "acct-top5" and row["tier"] == "top5"
        assert row["key_id"] and row["key_id"] in gateway["keys"]["top5"]
        assert (row["exposure_requested"], row["exposure_served"]) == ("top20", "top5")
        assert row["status"] == 200 and row["prompt"] == HI[0]["content"]
        assert row["completion"] is not None and row["completion_tokens"] > 0
        assert json.loads(row["messages"]) == HI and row["user_agent"].startswith("OpenAI")
    assert log.count() == before + 6
    refused = log.read("status = 404").to_pylist()
    assert refused and refused[-1]["error_code"] == "model_not_found"


@pytest.mark.parametrize(
    "tier, top, prompt_n, served, over",
    [
        ("text", 5, None, (None, None), True),
        ("text", None, None, (None, None), False),
        ("top5", 20, None, (5, None), True),
        ("top5", 0, None, (0, None), False),
        ("top20", 20, 1, (20, None), True),
        ("research", 20, 1, (20, 1), False),
        ("research", None, 1, (None, 1), False),
    ],
)
def test_one_tier_clamp_for_the_gateway_and_the_simulator(tier, top, prompt_n, served, over):
    assert BUILTIN_TIERS[tier].clamp(top, prompt_n) == served
    assert BUILTIN_TIERS[tier].exceeded_by(top, prompt_n) is over


def test_tier_file_is_validated(tmp_path):
    path = tmp_path / "tiers.yaml"
    path.write_text("tiers:\n  partner:\n    exposure: top20\n    requests_per_minute: 60\n")
    tiers = load_tiers(path)
    assert (
        tiers["partner"].max_top_logprobs == 20
        and tiers["partner"].limits.requests_per_minute == 60
    )
    for bad in ("exposure: top99", "over_limit: maybe", "watermark: nope", "colour: red"):
        path.write_text(f"tiers:\n  partner:\n    {bad}\n")
        with pytest.raises(TierError):
            load_tiers(path)
    for bad, message in [
        ("round_logprobs: '2'", "round_logprobs must be 0..8 decimals or null, not '2'"),
        ("concurrency: true", "concurrency must be a positive integer or null, not True"),
        ("colour: red", "unknown setting(s) colour (known: exposure, over_limit,"),
    ]:
        path.write_text(f"tiers:\n  partner:\n    {bad}\n")
        with pytest.raises(TierError) as refused:
            load_tiers(path)
        one_line = str(refused.value)
        assert one_line.startswith(f"tier 'partner': {message}") and "\n" not in one_line
    # the built-in tier once called `full` is `research`; a file may still name it `full`
    path.write_text("tiers:\n  full:\n    requests_per_minute: 60\n")
    renamed = load_tiers(path)
    assert "full" not in renamed and renamed["research"].limits.requests_per_minute == 60
    assert renamed["research"].allows_prompt_logprobs
    path.write_text("tiers:\n  full: {}\n  research: {}\n")
    with pytest.raises(TierError, match="old name of 'research'"):
        load_tiers(path)


def cli(*args, cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distillscope.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_keys_commands(tmp_path):
    made = cli("keys", "create", "--account", "acme", "--tier", "top5", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("dsk-") and secret not in (
        tmp_path / "gateway-keys.sqlite"
    ).read_bytes().decode("latin-1")
    listed = json.loads(cli("keys", "list", "--json", cwd=tmp_path).stdout)
    assert [(k["account_id"], k["tier"]) for k in listed] == [("acme", "top5")]
    key_id = listed[0]["key_id"]
    assert secret.split("-")[1] == key_id
    assert cli("keys", "block", "--account", "acme", cwd=tmp_path).returncode == 0
    assert "blocked" in cli("keys", "list", cwd=tmp_path).stdout
    assert cli("keys", "revoke", key_id, cwd=tmp_path).returncode == 0
    again = cli("keys", "revoke", key_id, cwd=tmp_path)
    assert again.returncode == 2 and "already revoked" in again.stderr
    bad = cli("keys", "create", "--account", "acme", "--tier", "gold", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown tier" in bad.stderr and "Traceback" not in bad.stderr
    renamed = cli("keys", "create", "--account", "lab", "--tier", "full", cwd=tmp_path)
    assert renamed.returncode == 0 and "now named 'research'" in renamed.stderr
    # a tier file naming a watermark is a tier file `serve` takes (with the secret set)
    (tmp_path / "tiers.yaml").write_text("tiers:\n  marked:\n    watermark: kgw\n")
    marked = cli(
        "keys", "create", "--account", "m", "--tier", "marked", "--tiers", "tiers.yaml",
        cwd=tmp_path,
    )  # fmt: skip
    assert marked.returncode == 0, marked.stderr
    listed = json.loads(cli("keys", "list", "--json", cwd=tmp_path).stdout)
    assert {k["account_id"]: k["tier"] for k in listed} == {
        "acme": "top5", "lab": "research", "m": "marked"
    }  # fmt: skip


def test_harvest_through_the_gateway_gets_its_tier(tmp_path, default_dir):
    """A harvest asking top20 with a top5 key is stored at top5; with a text key, as text."""
    from distillscope.records import RecordSet

    store = KeyStore(tmp_path / "keys.sqlite")
    log = open_traffic_log(tmp_path / "traffic.duckdb")
    log.start()
    app = create_app(load_teacher("synthetic"), model_name=MODEL, keys=store, log=log)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\nName a prime.\nWhy is the sky blue?\n")
    with serve_in_thread(app) as url:
        for tier in ("top5", "text"):
            secret = store.create(f"harvester-{tier}", tier)[1]
            done = cli(
                "harvest",
                "--teacher",
                f"openai:{url}/v1",
                "--tokenizer",
                "default",
                "--prompts",
                str(prompts),
                "--n",
                "3",
                "--exposure",
                "top20",
                "--max-new-tokens",
                "8",
                "--out",
                str(tmp_path / tier),
                cwd=tmp_path,
                env={"OPENAI_API_KEY": secret, "DISTILLSCOPE_CACHE": str(tmp_path / "cache")},
            )
            assert done.returncode == 0, done.stderr
            assert RecordSet(tmp_path / tier).summary()["exposure"] == tier
    log.close()
    rows = read_traffic(tmp_path / "traffic.duckdb").to_pylist()
    served = {(r["account_id"], r["exposure_served"]) for r in rows}
    assert served == {("harvester-top5", "top5"), ("harvester-text", "text")}
    assert len(rows) == 6


def test_two_gateways_share_rate_limits_through_redis(synthetic, redis_url, tmp_path):
    """Two gateway processes' worth of apps behind one key: Redis keeps one budget for both."""
    from distillscope.gateway.limits import open_limiter

    store = KeyStore(tmp_path / "keys.sqlite")
    metered = Tier(
        "metered", BUILTIN_TIERS["text"].exposure, requests_per_minute=20, concurrency=None
    )
    tiers = {"metered": metered}
    secret = store.create("shared", "metered")[1]
    apps = [
        create_app(
            synthetic, model_name=MODEL, keys=store, tiers=tiers, limiter=open_limiter(redis_url)
        )
        for _ in range(2)
    ]
    with serve_in_thread(apps[0]) as first, serve_in_thread(apps[1]) as second:

        async def hammer() -> list[int]:
            async with httpx.AsyncClient(timeout=30) as http:
                calls = [
                    http.post(
                        f"{url}/v1/chat/completions",
                        json={"model": MODEL, "messages": HI, "max_tokens": 2},
                        headers={"Authorization": f"Bearer {secret}"},
                    )
                    for url in [first, second] * 20
                ]
                return [r.status_code for r in await asyncio.gather(*calls)]

        began = time.monotonic()
        statuses = asyncio.run(hammer())
        elapsed = time.monotonic() - began
    # A full bucket of 20, plus what refilled meanwhile (20/min: one per 3 s).
    assert 20 <= statuses.count(200) <= 20 + int(elapsed / 3) + 1
    assert set(statuses) == {200, 429}


def test_proxy_backend_applies_the_tier_to_an_upstream(synthetic, tmp_path):
    """A keyed gateway in front of an open upstream: the caller's tier still caps what it sees."""
    from distillscope.gateway import ProxyBackend

    upstream = create_app(synthetic, model_name=MODEL)  # open: top20 for anyone
    store = KeyStore(tmp_path / "keys.sqlite")
    secret = store.create("proxied", "top5")[1]
    with serve_in_thread(upstream) as up:
        proxy = create_app(ProxyBackend(f"{up}/v1"), keys=store)
        with serve_in_thread(proxy) as url:
            c = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
            direct = openai.OpenAI(base_url=f"{up}/v1", api_key="x", max_retries=0)
            assert [m.id for m in c.models.list().data] == [MODEL]
            answer = ask(c, logprobs=True, top_logprobs=20)
            reference = ask(direct, logprobs=True, top_logprobs=5)
            streamed = "".join(
                ch.choices[0].delta.content or "" for ch in ask(c, stream=True) if ch.choices
            )
            legacy = c.completions.create(model=MODEL, prompt="Once", max_tokens=5, logprobs=5)
    content = answer.choices[0].logprobs.content
    assert {len(e.top_logprobs) for e in content} == {5}
    assert answer.choices[0].message.content == reference.choices[0].message.content
    assert [e.model_dump() for e in content] == [
        e.model_dump() for e in reference.choices[0].logprobs.content
    ]
    assert streamed == reference.choices[0].message.content
    assert len(legacy.choices[0].logprobs.tokens) == legacy.usage.completion_tokens


def test_watermark_hook_transforms_what_is_sampled(tiny_teacher, tmp_path):
    """A tier's watermark processor sees each account's id and shapes the sampled distribution."""
    import torch

    seen = []

    def only_token(account: str):
        seen.append(account)
        token = 1000 + len(account)

        def processor(input_ids, scores):
            forced = torch.full_like(scores, -1e9)
            forced[:, token] = 0
            return forced

        return processor

    store = KeyStore(tmp_path / "keys.sqlite")
    tiers = {"marked": Tier("marked", BUILTIN_TIERS["top5"].exposure, watermark="only-one-token")}
    secret = store.create("acct-wm", "marked")[1]
    with pytest.raises(TierError, match="marked.*unknown watermark 'only-one-token'"):
        create_app(tiny_teacher, model_name="tiny", keys=store, tiers=tiers)
    watermarks = {"only-one-token": only_token}
    app = create_app(
        tiny_teacher, model_name="tiny", keys=store, tiers=tiers, watermarks=watermarks
    )
    with serve_in_thread(app) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
        answer = c.chat.completions.create(
            model="tiny", messages=HI, max_tokens=4, logprobs=True, top_logprobs=2
        )
    assert seen == ["acct-wm"]
    content = answer.choices[0].logprobs.content
    forced = token_bytes_table(tiny_teacher.tokenizer)[1000 + len("acct-wm")]
    assert len(content) == 4 and all(e.logprob == pytest.approx(0, abs=1e-6) for e in content)
    assert {bytes(e.bytes) for e in content} == {forced}


def test_antidistill_tiers_sample_under_the_penalty_at_their_own_strength(tiny_teacher, tmp_path):
    """A tier's ``antidistill: LAMBDA`` steers what is sampled (the reported logprobs are of the
    steered distribution); lambda 0 is the teacher itself; a tier asking for it without a proxy is
    refused up front."""
    from distillscope.forensics import build_antidistillation

    penalty = build_antidistillation(
        tiny_teacher, lam=0.0, proxy="layers:1", prompts=2, max_new_tokens=6,
        prompt_pool=["Name a colour.", "Count to three."],
    )  # fmt: skip
    top5 = BUILTIN_TIERS["top5"].exposure
    tiers = {
        "plain": Tier("plain", top5),
        "zero": Tier("zero", top5, antidistill=0.0),
        "strong": Tier("strong", top5, antidistill=5.0),
        # a nucleus of one token: however strong the penalty, the teacher's own top choice
        "nucleus": Tier("nucleus", top5, antidistill=5.0, antidistill_top_p=1e-6),
    }
    store = KeyStore(tmp_path / "keys.sqlite")
    secrets = {name: store.create(f"acct-{name}", name)[1] for name in tiers}
    with pytest.raises(TierError, match="strong.*antidistill"):
        create_app(tiny_teacher, model_name="tiny", keys=store, tiers=tiers)
    app = create_app(
        tiny_teacher, model_name="tiny", keys=store, tiers=tiers, antidistillation=penalty
    )
    answers = {}
    with serve_in_thread(app) as url:
        for name, secret in secrets.items():
            c = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
            answer = c.chat.completions.create(
                model="tiny", messages=HI, max_tokens=6, logprobs=True, top_logprobs=5, seed=3
            )
            answers[name] = [
                [(t.token, round(t.logprob, 4)) for t in entry.top_logprobs]
                for entry in answer.choices[0].logprobs.content
            ]
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=secrets["plain"], max_retries=0)
        greedy = c.chat.completions.create(
            model="tiny", messages=HI, max_tokens=6, logprobs=True, top_logprobs=5, temperature=0
        )
    assert answers["zero"] == answers["plain"]
    assert answers["strong"][0] != answers["plain"][0]
    # the one-token nucleus tier answers with the plain teacher's greedy choices, each certain
    greedy_tokens = [entry.token for entry in greedy.choices[0].logprobs.content]
    assert [step[0][0] for step in answers["nucleus"]] == greedy_tokens
    for step in answers["nucleus"]:
        assert step[0][1] == 0 and all(logprob == LOGPROB_FLOOR for _, logprob in step[1:])
    for bad in (-1, "strong", True):
        with pytest.raises(TierError, match="antidistill must be a number"):
            tier_from_dict("bad", {"antidistill": bad})
    for bad in (0, 1.5, "0.9", True):
        with pytest.raises(TierError, match="antidistill_top_p must be a number"):
            tier_from_dict("bad", {"antidistill": 0.1, "antidistill_top_p": bad})
    with pytest.raises(TierError, match="set antidistill"):
        tier_from_dict("bad", {"antidistill_top_p": 0.9})


def test_serve_config_with_postgres_log_and_redis_limits(postgres_url, redis_url, tmp_path):
    """What `serve --db postgresql://... --limits redis://...` builds, over real servers."""
    from distillscope.gateway import GatewayConfig, build_gateway

    store = KeyStore(tmp_path / "keys.sqlite")
    secret = store.create("pg-account", "top20")[1]
    config = GatewayConfig(
        teacher="synthetic", db=postgres_url, keys=str(tmp_path / "keys.sqlite"), limits=redis_url
    )
    app, log = build_gateway(config)
    try:
        with serve_in_thread(app) as url:
            c = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
            ids = [
                ask(c, model="distillscope-synthetic", seed=s, logprobs=True, top_logprobs=3).id
                for s in range(4)
            ]
            chunks = list(ask(c, model="distillscope-synthetic", stream=True))
        rows = log.read("account_id = 'pg-account'").to_pylist()
    finally:
        log.close()
    assert sorted(r["exchange_id"] for r in rows) == sorted(ids + [chunks[0].id])
    assert {r["exposure_served"] for r in rows} == {"top3", "text"}
    assert all(r["status"] == 200 and r["completion"] is not None for r in rows)


def test_an_unreachable_upstream_is_a_502_in_openai_shape(tmp_path):
    from distillscope.gateway import ProxyBackend

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    app = create_app(ProxyBackend(dead, model="m", max_retries=0))
    with serve_in_thread(app) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        failed = error_of(lambda: ask(c, model="m"))
    assert failed.status_code == 502 and "upstream failed" in failed.message


def test_serve_config_refuses_antidistill_it_cannot_apply_and_a_bad_watermark_context(
    tmp_path, monkeypatch
):
    """`serve` with an `antidistill:` tier needs a local transformers teacher; a bad
    $DISTILLSCOPE_WATERMARK_CONTEXT is named, not a traceback."""
    from distillscope.errors import DistillscopeError
    from distillscope.gateway import GatewayConfig, build_gateway

    tier_file = tmp_path / "tiers.yaml"
    tier_file.write_text("tiers:\n  guarded:\n    exposure: top5\n    antidistill: 0.03\n")
    common = dict(db=None, keys=None, tiers=str(tier_file))
    with pytest.raises(DistillscopeError, match="guarded.*cannot be applied to a proxied upstream"):
        build_gateway(GatewayConfig(upstream="http://127.0.0.1:9/v1", **common))
    with pytest.raises(DistillscopeError, match="need a transformers teacher"):
        build_gateway(GatewayConfig(teacher="synthetic", **common))
    monkeypatch.setenv("DISTILLSCOPE_WATERMARK_SECRET", "s3cret")
    monkeypatch.setenv("DISTILLSCOPE_WATERMARK_CONTEXT", "one")
    with pytest.raises(DistillscopeError, match="DISTILLSCOPE_WATERMARK_CONTEXT='one'"):
        build_gateway(GatewayConfig(teacher="synthetic", db=None, keys=None))


def test_serve_builds_the_antidistillation_proxy_from_the_providers_own_prompts(
    tiny_teacher, tmp_path
):
    """`serve --antidistill-prompts FILE`: the proxy's downstream set is the teacher's answers to
    prompts from that file (the same penalty as building it in Python from those prompts); the
    serving batch size is left as it was; a missing file is named."""
    from distillscope.errors import DistillscopeError
    from distillscope.forensics import build_antidistillation
    from distillscope.gateway.server import _antidistillation

    ours = tmp_path / "ours.txt"
    ours.write_text("Name a colour.\nCount to three.\n")
    shared = tiny_teacher.batch_size  # a session fixture: leave it as found
    tiny_teacher.batch_size = 1
    try:
        built = _antidistillation(tiny_teacher, "layers:1", str(ours))
        assert tiny_teacher.batch_size == 1
    finally:
        tiny_teacher.batch_size = shared
    by_hand = build_antidistillation(
        tiny_teacher, lam=0.0, proxy="layers:1", prompts=2, max_new_tokens=48,
        prompt_pool=["Count to three.", "Name a colour."],
    )  # fmt: skip
    for got, want in zip(built.shifted.parameters(), by_hand.shifted.parameters()):
        torch.testing.assert_close(got, want)
    with pytest.raises(DistillscopeError, match="--antidistill-prompts .*missing.txt"):
        _antidistillation(tiny_teacher, "layers:1", str(tmp_path / "missing.txt"))


def _scrape(root: str) -> dict[tuple[str, tuple], float]:
    """``GET /metrics`` parsed: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    reply = httpx.get(f"{root}/metrics", timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def test_metrics_count_what_the_traffic_log_holds(gateway):
    root = gateway["url"].removesuffix("/v1")
    before = _scrape(root)
    c = client(gateway, "top5")
    answers = [ask(c, logprobs=True, top_logprobs=20, seed=s) for s in range(3)]
    with pytest.raises(openai.NotFoundError):
        ask(c, model="nope")
    after = _scrape(root)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    where = {"tier": "top5", "model": MODEL, "endpoint": "/v1/chat/completions"}
    assert grew("distillscope_requests_total", **where, status="200") == 3
    assert grew("distillscope_exposure_total", tier="top5", requested="top20", served="top5") == 3
    completion = sum(a.usage.completion_tokens for a in answers)
    assert grew("distillscope_tokens_total", tier="top5", model=MODEL, kind="completion") == (
        completion
    )
    assert grew("distillscope_refusals_total", tier="top5", status="404",
                code="model_not_found") == 1  # fmt: skip
    assert grew("distillscope_request_seconds_count", tier="top5", endpoint=where["endpoint"]) == 4
    # every exchange the log holds was counted once, refusals and other tests' traffic included
    total = sum(v for (name, _), v in after.items() if name == "distillscope_requests_total")
    assert total == gateway["log"].count()
    assert not any("acct-" in label for (_, labels) in after for _, label in labels)


def test_a_gateway_without_metrics_answers_404(synthetic):
    app = create_app(synthetic, model_name=MODEL, metrics=False)
    with serve_in_thread(app) as url:
        reply = httpx.get(f"{url}/metrics", timeout=10)
    assert reply.status_code == 404 and reply.json()["error"]["message"]


def test_serve_with_two_workers_shares_one_log_and_one_budget(postgres_url, redis_url, tmp_path):
    """`serve --workers 2`: two processes on one port, one PostgreSQL log and key store, one Redis
    budget (a key allowed 12 requests a minute gets 12, not 12 per process)."""
    from concurrent.futures import ThreadPoolExecutor

    import psycopg

    from distillscope.gateway.loadtest import GatewayProcess

    (tmp_path / "tiers.yaml").write_text(
        "tiers:\n  metered:\n    exposure: text\n    requests_per_minute: 12\n"
    )
    secret = KeyStore(postgres_url).create("two-workers", "metered")[1]  # keys shared too
    server = GatewayProcess(
        "--workers", "2", "--db", postgres_url, "--limits", redis_url, "--keys", postgres_url,
        "--tiers", str(tmp_path / "tiers.yaml"), log_file=tmp_path / "server.log",
    ).start()  # fmt: skip
    c = openai.OpenAI(base_url=server.url, api_key=secret, max_retries=0)

    def one(seed: int) -> str | None:
        try:
            return ask(c, model=MODEL, seed=seed).id
        except openai.RateLimitError:
            return None

    try:
        workers = subprocess.run(
            ["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True
        ).stdout.split()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(24)))
    finally:
        server.stop()
    assert len(workers) >= 2, (tmp_path / "server.log").read_text()
    served = [a for a in answers if a is not None]
    assert 12 <= len(served) <= 13  # 13: one token refilled while the burst ran
    with psycopg.connect(postgres_url) as conn:
        logged = conn.execute(
            "SELECT exchange_id, status FROM exchanges WHERE account_id = 'two-workers'"
        ).fetchall()
    assert sorted(i for i, status in logged if status == 200) == sorted(served)
    assert sum(status == 429 for _, status in logged) == 24 - len(served)


def test_several_workers_need_a_shared_log_and_shared_limits(cli, tmp_path):
    for args, message in [
        (["--db", str(tmp_path / "t.duckdb")], "postgresql"),
        (["--db", "off"], "redis"),
    ]:
        result = cli("serve", "--teacher", "synthetic", "--workers", "2", *args)
        assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "t.duckdb").exists()


def test_a_key_store_on_postgresql_is_shared_by_every_host(postgres_url, cli):
    """Two stores on one database, as two gateway hosts: a key made on one works on the other,
    and a block or a revocation reaches the other within its refresh."""
    here = KeyStore(postgres_url, refresh=0.05)
    there = KeyStore(postgres_url, refresh=0.05)
    key, secret = here.create("pg-shared", "top5", name="ci")
    assert there.authenticate(secret) == key
    assert there.authenticate(secret[:-1] + "x") is None
    here.block("account", "pg-shared", reason="confirmed campaign")
    time.sleep(0.1)
    assert ("account", "pg-shared") in there.blocked()
    here.block("account", "pg-shared", reason="again")  # a second block replaces the first
    assert [b.reason for b in there.blocks() if b.value == "pg-shared"] == ["again"]
    here.unblock("account", "pg-shared")
    time.sleep(0.1)
    assert ("account", "pg-shared") not in there.blocked()
    there.revoke(key.key_id)
    time.sleep(0.1)
    assert here.authenticate(secret) is None
    made = cli("keys", "create", "--account", "pg-cli", "--tier", "text", "--keys", postgres_url)
    assert made.exit_code == 0, made.stderr
    assert [k.tier for k in here.list("pg-cli")] == ["text"]
    listed = cli("keys", "list", "--json", "--keys", postgres_url)
    assert "pg-cli" in listed.stdout
    refused = cli("keys", "list", "--keys", "postgresql://nobody@127.0.0.1:1/none")
    assert refused.exit_code == 2 and "cannot open the key store" in refused.stderr


ADMIN = "admin-" + "k" * 30


def test_the_admin_api_manages_keys_and_blocks_and_audits_every_call(synthetic, tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite", refresh=0.1)
    app = create_app(synthetic, model_name=MODEL, keys=store, admin_key=ADMIN)
    with serve_in_thread(app) as url:
        admin = httpx.Client(base_url=f"{url}/admin", headers={"authorization": f"Bearer {ADMIN}"})
        made = admin.post("/keys", json={"account": "acme", "tier": "top5", "name": "prod"})
        assert made.status_code == 201, made.text
        secret, key_id = made.json()["key"], made.json()["key_id"]
        user = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
        assert ask(user).choices[0].message.content is not None
        # the user's key opens nothing here, and the admin key nothing on /v1
        assert httpx.get(f"{url}/admin/keys", headers={"authorization": f"Bearer {secret}"}
                         ).status_code == 401  # fmt: skip
        assert httpx.get(f"{url}/admin/keys").status_code == 401
        as_admin = openai.OpenAI(base_url=f"{url}/v1", api_key=ADMIN, max_retries=0)
        assert isinstance(error_of(lambda: ask(as_admin)), openai.AuthenticationError)
        assert [k["account_id"] for k in admin.get("/keys").json()["data"]] == ["acme"]
        assert "secret" not in admin.get("/keys").text and secret not in admin.get("/keys").text
        blocked = admin.post("/blocks", json={"kind": "account", "value": "acme",
                                              "reason": "confirmed campaign"})  # fmt: skip
        assert blocked.status_code == 201
        time.sleep(0.15)
        assert isinstance(error_of(lambda: ask(user)), openai.PermissionDeniedError)
        assert admin.delete("/blocks/account/acme").status_code == 200
        time.sleep(0.15)
        ask(user)
        assert admin.delete(f"/keys/{key_id}").json()["revoked_at"] is not None
        time.sleep(0.15)
        assert isinstance(error_of(lambda: ask(user)), openai.AuthenticationError)
        # mistakes are one clear error each, in OpenAI's shape
        for call, status, words in [
            (lambda: admin.post("/keys", json={"account": "x", "tier": "gold"}), 400,
             "unknown tier"),
            (lambda: admin.post("/keys", json={"tier": "top5"}), 400, "account"),
            (lambda: admin.post("/blocks", json={"kind": "account", "value": "ghost"}), 404,
             "no account"),
            (lambda: admin.delete("/blocks/account/acme"), 400, "not blocked"),
            (lambda: admin.delete("/keys/nope"), 404, "no key"),
        ]:  # fmt: skip
            reply = call()
            assert reply.status_code == status and words in reply.json()["error"]["message"]
        assert {t["name"] for t in admin.get("/tiers").json()["data"]} >= {"text", "top5"}
        trail = admin.get("/audit", params={"limit": 1000}).json()["data"]
    statuses = [(e["method"], e["path"], e["status"]) for e in reversed(trail)]
    assert statuses[:2] == [("POST", "/admin/keys", 201), ("GET", "/admin/keys", 401)]
    assert ("POST", "/admin/blocks", 201) in statuses
    assert ("DELETE", "/admin/keys/nope", 404) in statuses
    assert statuses.count(("GET", "/admin/keys", 401)) == 2
    assert statuses.count(("POST", "/admin/keys", 400)) == 2  # a bad tier, a body without account
    changed = [json.loads(e["detail"]) for e in trail if e["status"] in (200, 201) and e["detail"]]
    assert {"blocked": "account:acme", "reason": "confirmed campaign"} in changed
    assert {"revoked": key_id} in changed
    assert all(secret not in (e["detail"] or "") for e in trail)
    # the listing itself is on the trail, after it
    newest, *rest = store.audit_trail(1000)
    assert (newest["path"], newest["status"]) == ("/admin/audit", 200) and rest == trail


def test_an_admin_call_that_fails_is_on_the_trail_and_other_calls_are_not(
    synthetic, tmp_path, monkeypatch
):
    store = KeyStore(tmp_path / "keys.sqlite", refresh=0.1)
    app = create_app(synthetic, model_name=MODEL, keys=store, admin_key=ADMIN)

    def broken(account=None):
        raise RuntimeError("the key store's disk went away")

    monkeypatch.setattr(store, "list", broken)
    with serve_in_thread(app) as url:
        admin = httpx.Client(base_url=f"{url}/admin", headers={"authorization": f"Bearer {ADMIN}"})
        assert admin.get("/keys").status_code == 500
        assert httpx.get(f"{url}/health").status_code == 200
    trail = store.audit_trail(100)
    assert [(e["method"], e["path"], e["status"]) for e in trail] == [("GET", "/admin/keys", 500)]


def test_an_admin_api_needs_a_key_store_and_a_strong_key(synthetic, tmp_path):
    from distillscope.gateway.keys import KeyStoreError

    with pytest.raises(KeyStoreError, match="at least 24"):
        create_app(synthetic, keys=KeyStore(tmp_path / "k.sqlite"), admin_key="short")
    with pytest.raises(TierError, match="key store"):
        create_app(synthetic, admin_key=ADMIN)
    app = create_app(synthetic, keys=KeyStore(tmp_path / "k.sqlite"))  # no admin key: no API
    with serve_in_thread(app) as url:
        reply = httpx.get(f"{url}/admin/keys", headers={"authorization": f"Bearer {ADMIN}"})
    assert reply.status_code == 404


def test_stop_ends_the_answer_before_the_stop_string_streamed_or_not(gateway):
    """OpenAI's ``stop``: the text up to the first stop string (excluded), ``finish_reason``
    stop, the logprobs of the tokens before it; the same streamed (text that might begin a stop
    string is held back, never sent and taken back); the legacy endpoint takes one string."""
    c = client(gateway, "top20")
    whole = ask(c, max_tokens=24, logprobs=True, top_logprobs=5)
    text = whole.choices[0].message.content
    stop = next(text[i : i + 3] for i in range(6, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    cut = text.find(stop)
    stopped = ask(c, max_tokens=24, logprobs=True, top_logprobs=5, stop=[stop, "never there"])
    choice = stopped.choices[0]
    assert choice.message.content == text[:cut] and choice.finish_reason == "stop"
    kept = choice.logprobs.content
    assert [e.model_dump() for e in kept] == [
        e.model_dump() for e in whole.choices[0].logprobs.content[: len(kept)]
    ]
    assert len(bytes(b for e in kept for b in e.bytes).decode("utf-8", "replace")) <= cut
    assert len(kept) <= stopped.usage.completion_tokens <= whole.usage.completion_tokens
    chunks = list(ask(c, max_tokens=24, logprobs=True, top_logprobs=5, stop=stop, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text[:cut]
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]  # fmt: skip
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in kept]
    assert chunks[-1].choices[0].finish_reason == "stop"
    legacy = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, seed=3)
    free = legacy.choices[0].text
    if len(free) > 8:
        short = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24,
                                     seed=3, stop=free[5:8])  # fmt: skip
        assert short.choices[0].text == free[: free.find(free[5:8])]
    for bad in (["a", "b", "c", "d", "e"], [""], [3]):
        assert error_of(lambda b=bad: ask(c, stop=b)).status_code == 400
