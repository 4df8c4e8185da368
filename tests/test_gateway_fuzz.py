"""The gateway under a schema fuzzer: schemathesis draws requests from the gateway's own OpenAPI
schema, valid ones and invalid ones (positive and negative generation, its coverage phase's
boundary values, unexpected methods), and no answer may be a server error (5xx); every refusal
must be in OpenAI's error shape.

The app runs in-process through schemathesis' ASGI transport (its lifespan and middleware
included) with the model-free synthetic teacher, keys in a real SQLite store and a real DuckDB
traffic log. Generation is derandomized, so every run sends the same requests.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.meta import TestPhase

from distillscope.exposure import Full, TopK
from distillscope.gateway import KeyStore, Tier, create_app
from distillscope.gateway.traffic import open_traffic_log
from distillscope.teachers import load_teacher

MODEL = "distillscope-synthetic"
UNLIMITED = {"requests_per_minute": None, "tokens_per_minute": None, "concurrency": None}
TIERS = {
    "full": Tier("full", Full(), **UNLIMITED),
    "top5": Tier(
        "top5", TopK(5), over_limit="reject", round_logprobs=2, logprob_noise=0.05, **UNLIMITED
    ),
    # Limits the fuzzer runs into within a few requests: it must meet 429s, never a 5xx.
    "limited": Tier("limited", TopK(5), requests_per_minute=3, tokens_per_minute=5000),
}
ERROR_FIELDS = {"message", "type", "param", "code"}
COMPLETIONS = ("POST /v1/chat/completions", "POST /v1/completions")
#: Without the explicit phase, which carries schemathesis' coverage cases and schema examples.
GENERATE_ONLY = [Phase.generate, Phase.target, Phase.shrink]
FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# Keys change nothing in the OpenAPI schema: a keyless app's is the keyed app's.
schema = schemathesis.openapi.from_dict(
    create_app(load_teacher("synthetic"), model_name=MODEL).openapi(),
    config=schemathesis.Config(seed=0),
)


def servable(body: dict) -> dict:
    """``body`` past the refusals a fuzzer need not find again and again, keeping the drawn
    values that are servable: the served model named (any other earns a 404), plain messages
    with a user message last, one prompt, no prompt logprobs (the synthetic teacher cannot score
    prompts), no tools, exposure within every keyed tier's, and the fields whose drawn value has
    the wrong type or range dropped. The drawn bodies themselves still reach every refusal."""
    body = {**body, "model": MODEL}
    # tool use has its own refusals (a choice naming no offered tool, `required` without tools,
    # a tool message without its call's id); parameters the backend cannot honour away from
    # their neutral values earn a 400 each
    for key in (
        "prompt_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "n",
        "top_p",
        "stop",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
    ):
        body.pop(key, None)
    for key, ok in {
        "stream": lambda v: isinstance(v, bool),
        "stream_options": lambda v: (
            isinstance(v, dict) and all(isinstance(x, bool) for x in v.values())
        ),
        "temperature": lambda v: (
            isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 2
        ),
        "seed": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "max_tokens": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64,
        "max_completion_tokens": lambda v: (
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64
        ),
        "logprobs": lambda v: isinstance(v, bool | int) and 0 <= v <= 5,
        "top_logprobs": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 5,
    }.items():
        if key in body and not ok(body[key]):
            body.pop(key)
    if "messages" in body or "prompt" not in body:
        drawn = body.get("messages") if isinstance(body.get("messages"), list) else []
        plain = [
            {"role": m["role"], "content": m["content"]}
            for m in drawn
            if isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
        ]
        body["messages"] = [*plain, {"role": "user", "content": "Hi."}]
        if body.get("top_logprobs"):
            body["logprobs"] = True
    else:
        prompt = body["prompt"]
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt else ""
        body["prompt"] = prompt if isinstance(prompt, str) else "Hi."
    return body


@schema.hook
def flatmap_body(context, body):
    """Steer part of the generated bodies on to the policy, the limiter and the teacher."""
    if isinstance(body, dict):
        return st.sampled_from([body, {**body, "model": MODEL}, servable(body)])
    return st.just(body)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[dict]:
    """The keyed app, its keys by tier, and the statuses it answered per (tier, operation)."""
    root = tmp_path_factory.mktemp("gateway-fuzz")
    store = KeyStore(root / "keys.sqlite")
    keys = {name: store.create(f"acct-{name}", name)[1] for name in TIERS}
    log = open_traffic_log(root / "traffic.duckdb", max_wait_ms=1)
    log.start()
    app = create_app(load_teacher("synthetic"), model_name=MODEL, keys=store, log=log, tiers=TIERS)
    answered: dict[tuple[str | None, str], Counter] = {}
    yield {"app": app, "keys": keys, "answered": answered}
    log.close()
    check_reach(answered)


def check_reach(answered: dict[tuple[str | None, str], Counter]) -> None:
    """A fuzz that never gets past validation proves little about serving: the keyed fuzz must
    have been served often, and the limited key refused with 429."""
    for (tier, operation), statuses in answered.items():
        if tier in ("full", "top5") and operation in COMPLETIONS:
            assert statuses[200] >= 10, f"{tier} key, {operation}: {dict(statuses)}"
    refused = [statuses[429] for (tier, _), statuses in answered.items() if tier == "limited"]
    assert not refused or sum(refused) > 0, "the limited key never met its limits"


def send(case, gateway: dict, tier: str | None):
    """Send ``case`` with ``tier``'s key (``None``: no key); check it is no 5xx and that a
    refusal is in OpenAI's shape."""
    headers = {"Authorization": f"Bearer {gateway['keys'][tier]}"} if tier else None
    response = case.call(app=gateway["app"], headers=headers)
    case.validate_response(response, checks=[not_a_server_error], headers=headers)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == ERROR_FIELDS, error
        assert isinstance(error["message"], str) and isinstance(error["type"], str)
    return response


def fuzz(case, gateway: dict, tier: str | None) -> list:
    """``send`` ``case``, and a servable twin of a coverage-phase case (its boundary values skip
    the body hook, so they would otherwise all stop at the model's 404); count the answers
    towards ``check_reach``."""
    cases = [case]
    if case.meta and case.meta.phase.name == TestPhase.COVERAGE and isinstance(case.body, dict):
        twin = case.derive()
        twin.body = servable(case.body)
        cases.append(twin)
    responses = [send(each, gateway, tier) for each in cases]
    answered = gateway["answered"].setdefault((tier, case.operation.label), Counter())
    answered.update(response.status_code for response in responses)
    return responses


@schema.parametrize()
@settings(FUZZ, max_examples=300)
def test_fuzzed_requests_with_a_full_key_get_no_server_error(case, gateway):
    fuzz(case, gateway, "full")


@schema.parametrize()
@settings(FUZZ, max_examples=150, phases=GENERATE_ONLY)
def test_fuzzed_requests_under_a_rejecting_rounding_noising_tier_get_no_server_error(case, gateway):
    fuzz(case, gateway, "top5")


@schema.parametrize()
@settings(FUZZ, max_examples=20, phases=GENERATE_ONLY)
def test_fuzzed_requests_at_the_rate_limits_get_no_server_error(case, gateway):
    fuzz(case, gateway, "limited")


@schema.parametrize()
@settings(FUZZ, max_examples=10)
def test_fuzzed_requests_without_a_key_get_401(case, gateway):
    for response in fuzz(case, gateway, None):
        if case.path.startswith("/v1/") and case.method.upper() == case.operation.method.upper():
            # FastAPI parses the body before it asks for the key: a body that is not JSON gets
            # its 400 first, and reaches nothing the key guards.
            assert response.status_code == 401 or (
                response.status_code == 400 and not is_json(response.request.body)
            )


def is_json(body: bytes | str | None) -> bool:
    try:
        json.loads(body or b"")
    except ValueError:
        return False
    return True


def test_a_subnormal_temperature_is_served_greedily(gateway):
    """Found by the fuzz: temperature=2.2e-313 made the synthetic teacher's logits overflow to
    NaN probabilities, a 500. Below GREEDY_BELOW the gateway now samples greedily."""
    operation = schema["/v1/completions"]["POST"]
    texts = []
    for temperature in (5e-324, 2.2250738585e-313, 0.0):
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "temperature": temperature}
        response = send(operation.Case(body=body), gateway, "full")
        assert response.status_code == 200
        texts.append(response.json()["choices"][0]["text"])
    assert texts[0] == texts[1] == texts[2]


SURROGATE_BODIES = {
    "model": lambda s: {"model": s, "messages": [{"role": "user", "content": "Hi"}]},
    "content": lambda s: {"model": MODEL, "messages": [{"role": "user", "content": s}]},
    "text part": lambda s: {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "text", "text": s}]}],
    },
    "extra key": lambda s: {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], s: 1},
    "prompt": lambda s: {"model": MODEL, "prompt": s},
    "prompt list": lambda s: {"model": MODEL, "prompt": [s]},
}


@settings(FUZZ, max_examples=30)
@given(where=st.sampled_from(sorted(SURROGATE_BODIES)), text=st.text(max_size=3), data=st.data())
def test_a_lone_surrogate_anywhere_in_the_body_is_refused_with_400(gateway, where, text, data):
    """JSON can spell a lone surrogate ("\\ud800"); schemathesis never draws one. It reached the
    tokenizer, or an error message that could not be encoded: a 500."""
    surrogate = data.draw(st.characters(categories=["Cs"]))
    position = data.draw(st.integers(0, len(text)))
    body = SURROGATE_BODIES[where](text[:position] + surrogate + text[position:])
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    response = send(schema[path]["POST"].Case(body=body), gateway, "full")
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the request body is not valid Unicode"
