"""The gateway and the OpenAI teacher, end to end over real HTTP, against the local teacher.

A tiny random Llama with SmolLM2's real tokenizer is served by ``create_app`` under uvicorn. Its
near-uniform next-token distribution samples all over the vocabulary (special tokens, half UTF-8
characters: their rows are scaled up to make them likelier), and its EOS row is scaled up so that
completions both stop and run out of tokens.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi import FastAPI, Request
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from distillscope.errors import TeacherError
from distillscope.exposure import Full, Text, TopK
from distillscope.gateway import create_app, serve_in_thread
from distillscope.teachers import SamplingConfig, TransformersTeacher
from distillscope.teachers.default import default_model_dir
from distillscope.teachers.openai_http import OpenAITeacher
from distillscope.tokens import TokenMapper, token_bytes_table

MODEL = "distillscope-default"
PROMPTS = ["Say hi.", "héllo 世界 😀 — and then?", "Name three primes.", "", "Why is the sky blue?"]
MISSING = object()
TOP5 = SamplingConfig(exposure=TopK(5), temperature=1.0, max_new_tokens=10, seed=7)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    fragments = [
        i for i, spelled in enumerate(token_bytes_table(tokenizer)) if not is_utf8(spelled)
    ]
    with torch.no_grad():
        # A spread-out EOS logit: some completions stop, some hit the limit. Likelier fragments
        # of UTF-8 characters: tokens whose text alone is a U+FFFD stand-in get sampled.
        model.lm_head.weight[tokenizer.eos_token_id] *= 50
        model.lm_head.weight[fragments] *= 20
    path = tmp_path_factory.mktemp("gateway-teacher")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def local(model_dir) -> TransformersTeacher:
    """The reference: the same weights called in-process, never through the server."""
    return TransformersTeacher.from_pretrained(model_dir, device="cpu")


@dataclass
class Served:
    url: str
    samplings: list[SamplingConfig] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0


class RecordingTeacher:
    """The real served teacher, plus a log of the sampling each request turned into."""

    def __init__(self, teacher: TransformersTeacher, log: list[SamplingConfig]):
        self.teacher, self.log = teacher, log
        self.id, self.tokenizer = teacher.id, teacher.tokenizer
        self.max_exposure, self.logprobs_kind = teacher.max_exposure, teacher.logprobs_kind

    def generate_from_ids(self, encoded, sampling, **kwargs):
        self.log.append(sampling)
        return self.teacher.generate_from_ids(encoded, sampling, **kwargs)


@pytest.fixture(scope="module")
def served(model_dir) -> Iterator[Served]:
    state = Served(url="")
    teacher = TransformersTeacher.from_pretrained(model_dir, device="cpu")
    app = create_app(RecordingTeacher(teacher, state.samplings), model_name=MODEL)

    @app.middleware("http")
    async def count_in_flight(request: Request, call_next):
        state.in_flight += 1
        state.peak = max(state.peak, state.in_flight)
        try:
            return await call_next(request)
        finally:
            state.in_flight -= 1

    with serve_in_thread(app) as url:
        state.url = f"{url}/v1"
        yield state


@pytest.fixture(scope="module")
def remote(served, model_dir) -> OpenAITeacher:
    return OpenAITeacher(served.url, tokenizer=f"hf:{model_dir}", concurrency=4)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def free_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_token_bytes_round_trip(local):
    table = token_bytes_table(local.tokenizer)
    assert len(table) == len(local.tokenizer)
    text = "héllo 世界 😀<|im_end|>"
    ids = local.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids) == text.encode()
    partial = [i for i in ids if not is_utf8(table[i])]
    assert partial, "the text should split a character across tokens"

    @dataclass
    class Reported:
        token: str
        bytes: list[int] | None

    mapper = TokenMapper(local.tokenizer)
    spelled = [Reported(table[i].decode("utf-8", "replace"), list(table[i])) for i in ids]
    assert mapper.ids_for(spelled) == ids
    # Without bytes a U+FFFD stand-in is ambiguous; a whole-character token is not.
    assert mapper.id_for(Reported(table[partial[0]].decode("utf-8", "replace"), None)) == -1
    assert mapper.id_for(Reported("<|im_end|>", None)) == local.tokenizer.eos_token_id
    assert mapper.id_for(Reported("not a token at all", None)) == -1


def test_openai_client_gets_openai_shape(served, local):
    client = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    specials = set(local.tokenizer.all_special_tokens)
    finishes, split_chars = set(), 0
    for seed in range(4):
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": "Hi"}],
            logprobs=True,
            top_logprobs=5,
            max_tokens=12,
            seed=seed,
        )
        assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
        assert response.model == MODEL and len(response.choices) == 1
        choice = response.choices[0]
        assert choice.index == 0 and choice.message.role == "assistant"
        finishes.add(choice.finish_reason)
        content = choice.logprobs.content
        usage = response.usage
        assert usage.completion_tokens == len(content)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > len(content)
        for entry in content:
            top = [alt.logprob for alt in entry.top_logprobs]
            assert len(top) == 5 and top == sorted(top, reverse=True)
            assert entry.logprob <= top[0]
            for token in [entry, *entry.top_logprobs]:
                assert token.token == bytes(token.bytes).decode("utf-8", "replace")
            split_chars += not is_utf8(bytes(entry.bytes))
        text = b"".join(bytes(e.bytes) for e in content if e.token not in specials)
        assert text.decode("utf-8", "replace") == choice.message.content
        if choice.finish_reason == "stop":
            assert content[-1].token == "<|im_end|>"
    assert finishes == {"stop", "length"}
    assert split_chars, "some sampled token should be part of a UTF-8 character"
    asked = served.samplings[-1]
    assert (asked.exposure, asked.temperature, asked.max_new_tokens, asked.seed) == (
        TopK(5),
        1.0,
        12,
        3,
    )

    raw = httpx.post(
        f"{served.url}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "logprobs": True},
    ).json()
    assert set(raw) == {"id", "object", "created", "model", "choices", "usage"}
    assert set(raw["choices"][0]) == {"index", "message", "finish_reason", "logprobs"}
    assert len(raw["choices"][0]["logprobs"]["content"]) == raw["usage"]["completion_tokens"] == 16
    assert all(entry["top_logprobs"] == [] for entry in raw["choices"][0]["logprobs"]["content"])
    assert served.samplings[-1].exposure == TopK(1)


def test_remote_top5_matches_local_teacher(remote, local):
    assert remote.model == MODEL and remote.id.endswith(f"#{MODEL}")
    assert remote.max_exposure == TopK(20) and remote.logprobs_kind == "unknown"
    got = remote.generate(PROMPTS, TOP5)
    # One prompt per local call, as the server calls it: a padded batch moves logprobs by ~1e-6.
    want = [local.generate([prompt], TOP5)[0] for prompt in PROMPTS]
    for g, w in zip(got, want, strict=True):
        assert (g.prompt, g.text, g.finish_reason) == (w.prompt, w.text, w.finish_reason)
        assert g.prompt_tokens == w.prompt_tokens and g.token_strings is None
        assert g.signal.exposure == TopK(5)
        np.testing.assert_array_equal(g.signal.token_ids, w.signal.token_ids)
        np.testing.assert_array_equal(g.signal.topk_ids, w.signal.topk_ids)
        for name in ("token_logprobs", "topk_logprobs", "tail_mass"):
            got_array, want_array = getattr(g.signal, name), getattr(w.signal, name)
            assert got_array.dtype == want_array.dtype == np.float32
            np.testing.assert_allclose(got_array, want_array, rtol=0, atol=1e-6)
        assert g.signal.token_ids.dtype == g.signal.topk_ids.dtype == np.int64


def test_remote_cuts_prompts_like_local_teacher(remote, local):
    # Greedy: the server seeds by the prompt it receives, which a cut changes.
    sampling = SamplingConfig(
        exposure=TopK(2), temperature=0, max_new_tokens=6, max_prompt_tokens=3
    )
    prompt = "one two three four five six seven"
    got, want = remote.generate([prompt], sampling)[0], local.generate([prompt], sampling)[0]
    assert got.prompt_tokens == want.prompt_tokens
    np.testing.assert_array_equal(got.signal.topk_ids, want.signal.topk_ids)


def test_text_exposure_asks_for_no_logprobs(served, remote, local):
    sampling = SamplingConfig(exposure=Text(), max_new_tokens=10, seed=7)
    got, want = remote.generate(PROMPTS, sampling), local.generate(PROMPTS, sampling)
    assert served.samplings[-1].exposure == Text()
    eos = local.tokenizer.eos_token_id
    for g, w in zip(got, want, strict=True):
        assert g.text == w.text and g.signal.exposure == Text()
        assert g.signal.token_logprobs is None and g.signal.topk_ids is None
        ids = local.tokenizer(g.text, add_special_tokens=False)["input_ids"]
        assert g.signal.token_ids.tolist() == ids + ([eos] if g.finish_reason == "stop" else [])


def test_without_tokenizer_strings_are_kept(served, remote, local):
    blind = OpenAITeacher(served.url, model=MODEL)
    assert blind.tokenizer is None
    table = token_bytes_table(local.tokenizer)
    got, want = blind.generate(PROMPTS[:2], TOP5), remote.generate(PROMPTS[:2], TOP5)
    for g, w in zip(got, want, strict=True):
        assert (g.signal.token_ids == -1).all() and (g.signal.topk_ids == -1).all()
        spell = [table[i].decode("utf-8", "replace") for i in w.signal.token_ids]
        assert g.token_strings == spell
        assert g.topk_strings[0] == [
            table[i].decode("utf-8", "replace") for i in w.signal.topk_ids[0]
        ]
        np.testing.assert_array_equal(g.signal.topk_logprobs, w.signal.topk_logprobs)
    text = blind.generate(PROMPTS[:1], SamplingConfig(exposure=Text(), max_new_tokens=10, seed=7))[
        0
    ]
    assert text.signal.exposure == Text() and text.token_strings is None
    assert (text.signal.token_ids == -1).all() and len(text.signal) == len(want[0].signal)


@pytest.fixture(scope="module")
def relay(served) -> Iterator[str]:
    """A server that answers from the gateway but reports less: none (``drop``) or 2 alternatives
    at the second token (``cap``), like servers that ignore logprobs or cap top_logprobs."""
    app = FastAPI()

    @app.post("/{mode}/v1/chat/completions")
    async def chat(mode: str, request: Request) -> dict:
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{served.url}/chat/completions",
                content=await request.body(),
                headers={"content-type": "application/json"},
            )
        body = answer.json()
        if mode == "drop":
            body["choices"][0]["logprobs"] = None
        else:
            del body["choices"][0]["logprobs"]["content"][1]["top_logprobs"][2:]
        return body

    with serve_in_thread(app) as url:
        yield url


def test_servers_that_report_less_give_poorer_signals(relay, remote, model_dir):
    want = remote.generate(PROMPTS[:1], TOP5)[0]
    dropped = OpenAITeacher(f"{relay}/drop/v1", model=MODEL, tokenizer=f"hf:{model_dir}")
    got = dropped.generate(PROMPTS[:1], TOP5)[0]
    assert got.signal.exposure == Text() and got.signal.token_logprobs is None
    assert got.text == want.text
    capped = OpenAITeacher(f"{relay}/cap/v1", model=MODEL, tokenizer=f"hf:{model_dir}")
    got = capped.generate(PROMPTS[:1], TOP5)[0]
    assert got.signal.exposure == TopK(2)
    assert got.signal.topk_ids.shape == (len(want.signal), 2)
    np.testing.assert_array_equal(got.signal.topk_ids, want.signal.downgrade("top2").topk_ids)
    np.testing.assert_array_equal(got.signal.tail_mass, want.signal.downgrade("top2").tail_mass)


def test_concurrent_requests_come_back_in_order(served, remote, local):
    prompts = [f"Question {i}: what comes after {i}?" for i in range(20)]
    sampling = SamplingConfig(exposure=TopK(3), max_new_tokens=4, seed=1)
    served.peak = 0
    got = remote.generate(prompts, sampling)
    assert 1 < served.peak <= 4
    want = local.generate(prompts, sampling)
    assert [c.prompt for c in got] == prompts
    assert [c.signal.token_ids.tolist() for c in got] == [c.signal.token_ids.tolist() for c in want]


def test_generate_inside_a_running_event_loop(remote):
    async def notebook_cell():
        return remote.generate(PROMPTS[:1], TOP5)

    assert asyncio.run(notebook_cell())[0].prompt == PROMPTS[0]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"n": 2}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),  # more than OpenAI takes
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "no user"}]}, "messages"),
        ({"messages": MISSING}, "messages"),
        ({"model": MISSING}, "model"),
    ],
)
def test_bad_requests_get_openai_400s(served, body, param):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body}
    request = {name: value for name, value in request.items() if value is not MISSING}
    answer = httpx.post(f"{served.url}/chat/completions", json=request)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_malformed_json_and_unknown_model(served):
    answer = httpx.post(
        f"{served.url}/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
    answer = httpx.post(
        f"{served.url}/chat/completions",
        json={"model": "gpt-9", "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
    with pytest.raises(TeacherError, match="404"):
        OpenAITeacher(served.url, model="gpt-9").generate(["Hi"], TOP5)
    assert httpx.get(f"{served.url.removesuffix('/v1')}/health").json() == {"status": "ok"}


def test_unreachable_server_and_unservable_requests(served):
    with pytest.raises(TeacherError, match="cannot list the models"):
        OpenAITeacher(free_url(), max_retries=0)
    with pytest.raises(TeacherError, match="cannot reach"):
        OpenAITeacher(free_url(), model=MODEL, max_retries=0).generate(["Hi"], TOP5)
    remote = OpenAITeacher(served.url, model=MODEL)
    with pytest.raises(TeacherError, match="full distribution"):
        remote.generate(["Hi"], SamplingConfig(exposure=Full()))
    with pytest.raises(TeacherError, match="cannot score"):
        remote.score([np.zeros(1, dtype=np.int64)], [np.zeros(1, dtype=np.int64)])
    with pytest.raises(TeacherError, match="unknown tokenizer"):
        OpenAITeacher(served.url, model=MODEL, tokenizer="gpt2")


def test_429_and_503_are_retried_with_backoff_until_answered(local):
    """The openai client's own retry loop (honouring Retry-After) carries a harvest through."""
    from fastapi.responses import JSONResponse

    app = create_app(local)
    seen = {"chat": 0}

    @app.middleware("http")
    async def flaky(request, call_next):
        if request.url.path.endswith("/chat/completions"):
            seen["chat"] += 1
            if seen["chat"] % 3 == 1:
                return JSONResponse(
                    {"error": {"message": "slow down", "type": "rate_limit"}},
                    status_code=429,
                    headers={"Retry-After": "0"},
                )
            if seen["chat"] % 3 == 2:
                return JSONResponse({"error": {"message": "busy"}}, status_code=503)
        return await call_next(request)

    with serve_in_thread(app) as url:
        teacher = OpenAITeacher(f"{url}/v1", tokenizer=None, concurrency=1, max_retries=4)
        answers = teacher.generate(["Say hi.", "Name a prime."], TOP5)
    assert len(answers) == 2 and all(a.text for a in answers)
    assert seen["chat"] == 6  # each prompt: one 429, one 503, then the answer
