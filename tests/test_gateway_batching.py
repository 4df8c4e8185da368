"""The local backend's dynamic batching, and ``logit_bias`` with logprobs from before the bias.

Batching runs on the tiny random Llama (its draws are as real as the default teacher's, in a
fraction of the time); ``logit_bias`` through the gateway, with the official ``openai`` client, on
the real default teacher, where the reconstruction attack has a real distribution to read.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import openai
import pytest
import torch

from distillscope.gateway import KeyStore, create_app, serve_in_thread
from distillscope.gateway.backends import LOGPROB_FLOOR, GenerationRequest, TeacherBackend
from distillscope.gateway.tiers import BUILTIN_TIERS
from distillscope.gateway.traffic import open_traffic_log
from distillscope.teachers import SamplingConfig, load_teacher

TEMPERATURES = [0.0, 0.7, 1.0, 1.3]
TOPS = [None, 0, 3, 5]


def requests(n: int) -> list[GenerationRequest]:
    """``n`` requests that differ in everything a caller sets."""
    return [
        GenerationRequest(
            messages=[{"role": "user", "content": f"Tell me about item {i} of the list."}],
            prompt=None,
            temperature=TEMPERATURES[i % 4],
            max_tokens=3 + 2 * i,
            seed=i,
            top_logprobs=TOPS[i % 4],
        )
        for i in range(n)
    ]


async def answer_all(backend: TeacherBackend, asked: list[GenerationRequest]):
    try:
        return await asyncio.gather(*(backend.generate(r) for r in asked))
    finally:
        await backend.close()


def test_requests_arriving_together_share_a_batch_and_draw_what_each_draws_alone(tiny_teacher):
    together = TeacherBackend(tiny_teacher, max_batch=16)
    batched = asyncio.run(answer_all(together, requests(10)))
    alone = TeacherBackend(tiny_teacher, max_batch=1)
    single = asyncio.run(answer_all(alone, requests(10)))
    assert together.rows == alone.rows == alone.batches == 10
    assert together.batches <= 2  # the first may start alone; the other nine wait and go together
    for i, (b, s) in enumerate(zip(batched, single, strict=True)):
        assert b.text == s.text and b.finish_reason == s.finish_reason
        assert b.completion_tokens == s.completion_tokens <= 3 + 2 * i
        if TOPS[i % 4] is None:
            assert b.logprobs is None
            continue
        assert len(b.logprobs) == b.completion_tokens
        for got, want in zip(b.logprobs, s.logprobs, strict=True):
            assert got["token"] == want["token"]
            assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-4)
            assert len(got["top_logprobs"]) == TOPS[i % 4]
    # each row kept its own length: the short ones stopped at their max_tokens
    assert [b.completion_tokens for b in batched[:3]] == [3, 5, 7]


def test_streams_in_one_batch_each_get_their_own_tokens_and_one_can_leave(tiny_teacher):
    backend = TeacherBackend(tiny_teacher, max_batch=16)
    asked = requests(6)

    async def stream(request: GenerationRequest, leave_after: int | None):
        pieces, final = [], None
        chunks = backend.stream(request)
        async for item in chunks:
            if hasattr(item, "finish_reason"):
                final = item
                break
            pieces.append(item.text)
            if leave_after is not None and len(pieces) >= leave_after:
                await chunks.aclose()  # the client went away
                break
        return "".join(pieces), final

    async def main():
        try:
            streams = [stream(r, 2 if i == 1 else None) for i, r in enumerate(asked)]
            return await asyncio.gather(*streams), await asyncio.gather(
                *(backend.generate(r) for r in requests(6))
            )
        finally:
            await backend.close()

    streamed, whole = asyncio.run(main())
    for i, ((text, final), generation) in enumerate(zip(streamed, whole, strict=True)):
        if i == 1:
            assert final is None  # left after two pieces; the others were not disturbed
            continue
        assert text == final.text == generation.text
        assert final.completion_tokens == generation.completion_tokens


def test_a_bad_request_in_a_batch_fails_alone(tiny_teacher):
    backend = TeacherBackend(tiny_teacher, max_batch=16)
    asked = requests(4)
    asked[2].logit_bias = {10**9: 5.0}  # past check(): the teacher itself refuses it
    results = asyncio.run(
        _gather_settled(backend, asked),
    )
    assert [isinstance(r, Exception) for r in results] == [False, False, True, False]
    assert "outside the vocabulary" in str(results[2])


async def _gather_settled(backend, asked):
    try:
        return await asyncio.gather(*(backend.generate(r) for r in asked), return_exceptions=True)
    finally:
        await backend.close()


# ---- logit_bias through the gateway, on the default teacher ----

PROMPT = [{"role": "user", "content": "Name one colour of the rainbow."}]


@pytest.fixture(scope="module")
def biased_gateway(default_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("bias")
    store = KeyStore(root / "keys.sqlite")
    keys = {tier: store.create(f"acct-{tier}", tier)[1] for tier in ("text", "top5")}
    log = open_traffic_log(root / "traffic.duckdb", max_wait_ms=2)
    log.start()
    app = create_app(default_teacher, model_name="teacher", keys=store, tiers=dict(BUILTIN_TIERS),
                     log=log)  # fmt: skip
    with serve_in_thread(app) as url:
        yield {
            **{tier: openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
               for tier, key in keys.items()},
            "log": log,
        }  # fmt: skip
    log.close()


def first_token(client, **kwargs):
    answer = client.chat.completions.create(
        model="teacher", messages=PROMPT, max_tokens=1, temperature=0, seed=1, **kwargs
    )
    return answer.choices[0]


def test_logit_bias_steers_sampling_for_ordinary_use(biased_gateway, default_teacher):
    tokenizer = default_teacher.tokenizer
    plain = first_token(biased_gateway["text"]).message.content
    greedy = tokenizer.encode(plain, add_special_tokens=False)[0]
    banned = first_token(biased_gateway["text"], logit_bias={str(greedy): -100})
    assert banned.message.content != plain
    forced_id = tokenizer.encode(" purple", add_special_tokens=False)[0]
    forced = first_token(biased_gateway["text"], logit_bias={str(forced_id): 100})
    assert forced.message.content == tokenizer.decode([forced_id])
    # the log keeps what each request asked for (a reconstruction attack shows there)
    asked = [json.loads(b) for b in biased_gateway["log"].read()["logit_bias"].to_pylist() if b]
    assert {str(greedy): -100} in asked and {str(forced_id): 100} in asked


def test_top_k_plus_bias_reconstructs_nothing_more_than_the_tier_shows(
    biased_gateway, default_teacher
):
    """The published attack (Carlini et al. 2024, sec. 5; Morris et al. 2023): bias a token t
    outside the top-k until it enters the list, then read its logprob back as
    lp(t) = lp'(t) - B - (lp'(ref) - lp(ref)). It works when logprobs come after the bias
    (checked here on the teacher's own distribution); the gateway reports them before the bias,
    so the list never shows t, and t's own logprob, once the bias makes it the answer, is the
    floor."""
    client = biased_gateway["top5"]
    base = first_token(client, logprobs=True, top_logprobs=5).logprobs.content[0]
    shown = {tuple(alt.bytes): alt.logprob for alt in base.top_logprobs}

    prompt = np.asarray(default_teacher.encode_prompt(PROMPT[0]["content"], 512))
    with torch.inference_mode():
        truth = default_teacher.score([prompt[:-1]], [prompt[-1:]])[0][0]  # next-token logprobs
    order = np.argsort(-truth)
    spelling = default_teacher.tokenizer
    special = set(spelling.all_special_ids)
    targets = [int(t) for t in order[20:40] if int(t) not in special][:10]  # outside the top 5
    bias = 30.0
    for target in targets:
        # the attack against a post-bias oracle recovers the hidden logprob exactly ...
        after = truth.copy()
        after[target] += bias
        after = after - np.logaddexp.reduce(after)
        ref = int(order[0])
        recovered = after[target] - bias - (after[ref] - truth[ref])
        assert recovered == pytest.approx(truth[target], abs=1e-4)
        # ... and against the gateway it has nothing to read
        got = first_token(client, logprobs=True, top_logprobs=5, logit_bias={str(target): bias})
        entry = got.logprobs.content[0]
        assert {tuple(alt.bytes): alt.logprob for alt in entry.top_logprobs} == shown
        assert got.message.content == spelling.decode([target])  # the bias did steer the answer
        assert entry.logprob == LOGPROB_FLOOR


@pytest.mark.parametrize(
    "bias, words",
    [
        ({"12": 101}, ["outside [-100, 100]"]),
        ({"twelve": 1}, ["not a token id"]),
        ({"12": "high"}, ["must be a number"]),
        ({"99999999": 1}, ["this model's tokens are"]),
        ([1, 2], ["must map token ids"]),
    ],
)
def test_a_malformed_logit_bias_is_refused_with_400(biased_gateway, bias, words):
    with pytest.raises(openai.BadRequestError) as caught:
        first_token(biased_gateway["text"], logit_bias=bias)
    for word in words:
        assert word in str(caught.value)


def test_a_teacher_that_cannot_bias_refuses_it():
    backend = TeacherBackend(load_teacher("synthetic"))
    request = requests(1)[0]
    request.logit_bias = {5: 1.0}
    with pytest.raises(Exception, match="cannot apply logit_bias"):
        backend.check(request)


def test_sampling_with_a_bias_draws_from_the_biased_softmax():
    """Chi-square on 4,000 seeded rows: the draw follows softmax(logits + bias) while the
    recorded logprobs stay those of softmax(logits)."""
    from scipy import stats

    from distillscope.teachers.local import _SampleAndRecord

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    bias = {5: 4.0, 0: -2.0}
    rows = 4000
    sampler = _SampleAndRecord(list(range(rows)), 1.0, k=2, keep_full=False, biases=[bias] * rows)
    sampler(torch.zeros(rows, 1, dtype=torch.long), logits.repeat(rows, 1))
    counts = np.bincount(sampler.chosen[0].numpy(), minlength=len(logits))
    shifted = logits.clone()
    for token, value in bias.items():
        shifted[token] += value
    expected = torch.softmax(shifted.double(), -1).numpy() * rows
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    unbiased = torch.log_softmax(logits, -1)
    assert torch.allclose(sampler.topk_logprobs[0][0], unbiased.topk(2).values)


def test_sampling_config_is_per_row_in_one_batch(tiny_teacher):
    """Rows of one ``generate_rows`` call keep their own exposure and length."""
    from distillscope.teachers.base import BatchRow

    ids = tiny_teacher.encode_prompt("A row of its own.", 64)
    rows = [
        BatchRow(ids, "a", SamplingConfig(exposure="text", max_new_tokens=2, seed=1)),
        BatchRow(ids, "b", SamplingConfig(exposure="top3", max_new_tokens=6, seed=2)),
    ]
    short, long = tiny_teacher.generate_rows(rows)
    assert len(short.signal) == 2 and short.signal.token_logprobs is None
    assert len(long.signal) == 6 and long.signal.topk_ids.shape == (6, 3)


def test_prompts_of_different_lengths_are_prefilled_apart_and_draw_what_they_draw_alone(
    tiny_teacher,
):
    """A batch prefills each prompt on its own (no padding computed) and decodes together: the
    answers and logprobs are those each prompt gets alone."""
    from distillscope.teachers.base import BatchRow

    texts = ["Hi.", "A longer prompt, with a few more words in it than the first.", "x " * 40]
    rows = [
        BatchRow(tiny_teacher.encode_prompt(t, 512), t, SamplingConfig("top3", max_new_tokens=8))
        for t in texts
    ]
    assert tiny_teacher._prefilled([list(r.ids) for r in rows], max(len(r.ids) for r in rows))
    together = tiny_teacher.generate_rows(rows)
    for row, answer in zip(rows, together, strict=True):
        [alone] = tiny_teacher.generate_rows([row])
        assert answer.text == alone.text
        np.testing.assert_allclose(
            answer.signal.topk_logprobs, alone.signal.topk_logprobs, atol=1e-4
        )
