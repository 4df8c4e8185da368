"""Local teachers: exact sampling, exact exposure, signals that match the model's distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from distillscope.errors import TeacherError
from distillscope.exposure import Full, Text, TopK
from distillscope.teachers import SamplingConfig, load_teacher
from distillscope.teachers.local import _SampleAndRecord

PROMPTS = ["What is 12 times 7?", "Write a haiku about rain.", "Explain what a Python list is."]


def test_default_teacher_is_the_real_smollm2_with_its_chat_template(default_teacher):
    assert default_teacher.id.startswith("default:SmolLM2-135M-Instruct")
    assert sum(p.numel() for p in default_teacher.model.parameters()) == pytest.approx(
        134.5e6, rel=0.01
    )
    ids = default_teacher.encode_prompt("hi", 512)
    text = default_teacher.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    [answer] = default_teacher.generate(
        ["What is the capital of France?"],
        SamplingConfig(exposure="text", temperature=0, max_new_tokens=16),
    )
    assert "Paris" in answer.text


def test_top20_downgraded_to_top5_is_bit_identical_to_a_top5_harvest(default_teacher):
    rich = default_teacher.generate(
        PROMPTS, SamplingConfig(exposure="top20", max_new_tokens=12, seed=3)
    )
    poor = default_teacher.generate(
        PROMPTS, SamplingConfig(exposure="top5", max_new_tokens=12, seed=3)
    )
    text = default_teacher.generate(
        PROMPTS, SamplingConfig(exposure="text", max_new_tokens=12, seed=3)
    )
    for r, p, t in zip(rich, poor, text):
        down = r.signal.downgrade("top5")
        np.testing.assert_array_equal(down.token_ids, p.signal.token_ids)
        np.testing.assert_array_equal(down.topk_ids, p.signal.topk_ids)
        np.testing.assert_array_equal(down.topk_logprobs, p.signal.topk_logprobs)
        np.testing.assert_array_equal(down.tail_mass, p.signal.tail_mass)
        np.testing.assert_array_equal(r.signal.downgrade("text").token_ids, t.signal.token_ids)
        assert t.signal.token_logprobs is None and t.text == r.text


def test_harvested_topk_matches_the_teachers_full_distribution(default_teacher):
    """The downgrade is proved against the teacher's full distribution, re-scored in one pass."""
    answers = default_teacher.generate(
        PROMPTS, SamplingConfig(exposure="top20", max_new_tokens=12, seed=5)
    )
    full = default_teacher.score(
        [a.prompt_ids for a in answers], [a.signal.token_ids for a in answers]
    )
    for answer, dist in zip(answers, full):
        for level in (TopK(20), TopK(5), TopK(1)):
            view = answer.signal.downgrade(level)
            expected_lp, expected_ids = torch.topk(torch.from_numpy(dist), level.k)
            np.testing.assert_allclose(view.topk_logprobs, expected_lp.numpy(), atol=5e-4)
            # ids agree wherever the logprobs are not a near-tie
            gaps = (
                np.abs(np.diff(expected_lp.numpy(), axis=-1)).min(axis=-1)
                if level.k > 1
                else np.ones(len(view))
            )
            clear = gaps > 1e-3
            np.testing.assert_array_equal(view.topk_ids[clear], expected_ids.numpy()[clear])
            tail = 1 - np.exp(expected_lp.numpy().astype(np.float64)).sum(-1)
            np.testing.assert_allclose(view.tail_mass, np.clip(tail, 0, 1), atol=5e-4)
        sampled = dist[np.arange(len(dist)), answer.signal.token_ids]
        np.testing.assert_allclose(answer.signal.token_logprobs, sampled, atol=5e-4)


def test_full_exposure_keeps_the_whole_distribution(tiny_teacher):
    [answer] = tiny_teacher.generate(PROMPTS[:1], SamplingConfig(exposure=Full(), max_new_tokens=6))
    full = answer.signal.full_logprobs
    assert full.shape == (len(answer.signal), len(tiny_teacher.tokenizer))
    np.testing.assert_allclose(np.exp(full.astype(np.float64)).sum(-1), 1.0, atol=1e-4)


def test_sampling_does_not_depend_on_the_batch(tiny_teacher):
    sampling = SamplingConfig(exposure="top5", max_new_tokens=10, seed=11)
    together = tiny_teacher.generate(PROMPTS, sampling)
    alone = tiny_teacher.generate(PROMPTS[2:], sampling)
    np.testing.assert_array_equal(together[2].signal.token_ids, alone[0].signal.token_ids)
    other_seed = tiny_teacher.generate(
        PROMPTS[2:], SamplingConfig(exposure="top5", max_new_tokens=10, seed=12)
    )
    assert not np.array_equal(other_seed[0].signal.token_ids, alone[0].signal.token_ids)


def test_greedy_takes_the_argmax(tiny_teacher):
    [answer] = tiny_teacher.generate(
        PROMPTS[:1], SamplingConfig(exposure="top1", temperature=0, max_new_tokens=8)
    )
    np.testing.assert_array_equal(answer.signal.token_ids, answer.signal.topk_ids[:, 0])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_gumbel_sampling_draws_from_softmax_at_the_sampling_temperature(temperature):
    """Chi-square goodness of fit: 4,000 seeded rows, one fixed distribution (fixed seeds)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 4000
    sampler = _SampleAndRecord(list(range(rows)), temperature, k=0, keep_full=False)
    sampler(torch.zeros(rows, 1, dtype=torch.long), logits.repeat(rows, 1))
    counts = np.bincount(sampler.chosen[0].numpy(), minlength=len(logits))
    expected = torch.softmax(logits.double() / temperature, -1).numpy() * rows
    keep = expected >= 5  # pool the rare tail into one cell, as the chi-square test needs
    observed, wanted = counts[keep], expected[keep]
    if (~keep).any():
        observed = np.append(observed, counts[~keep].sum())
        wanted = np.append(wanted, expected[~keep].sum())
    assert stats.chisquare(observed, wanted).pvalue > 1e-3


def test_completions_stop_at_eos_and_keep_it(default_teacher):
    [answer] = default_teacher.generate(
        ["What is the capital of France? Answer in one word."],
        SamplingConfig(exposure="text", temperature=0, max_new_tokens=40),
    )
    assert answer.finish_reason == "stop"
    assert answer.signal.token_ids[-1] == default_teacher.tokenizer.eos_token_id
    assert answer.prompt_tokens == len(answer.prompt_ids)


def test_bad_teacher_specs_are_teacher_errors(tmp_path):
    with pytest.raises(TeacherError, match="unknown teacher"):
        load_teacher("gpt-17")
    with pytest.raises(TeacherError, match="not a transformers model directory"):
        load_teacher(f"hf:{tmp_path}")
    with pytest.raises(TeacherError, match="unknown device"):
        load_teacher(f"hf:{tmp_path}", device="tpu-ish")


def test_text_exposure_records_no_logprobs(tiny_teacher):
    [answer] = tiny_teacher.generate(PROMPTS[:1], SamplingConfig(exposure=Text(), max_new_tokens=5))
    assert answer.signal.token_logprobs is None and answer.signal.topk_logprobs is None
