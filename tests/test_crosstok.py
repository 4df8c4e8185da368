"""A student with another tokenizer: the span alignment on hand-computed cases, GPT-2's BPE from
its package, re-tokenised records, and training through the API and the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import one_line_error
from distillscope import Prompt
from distillscope.distill import DistillConfig, distill_records
from distillscope.distill import losses as L
from distillscope.distill.crosstok import Retokenizer, align_signal, cross_examples
from distillscope.distill.students import build_student, load_student_tokenizer
from distillscope.errors import IncompatibleDataError
from distillscope.exposure import Signal, Text, TopK
from distillscope.harvest import harvest
from distillscope.records import Exchange, RecordSet
from distillscope.teachers import SamplingConfig
from distillscope.tokens import vocab_map

TOPICS = ["rivers", "chess", "bread", "volcanoes", "jazz", "owls", "glass", "tides"]


@pytest.fixture(scope="module")
def gpt2():
    return load_student_tokenizer("gpt2")


@pytest.fixture(scope="module")
def records(tiny_teacher, tmp_path_factory):
    prompts = [Prompt(f"p{i}", f"Tell me about {TOPICS[i]}.", "other", "t") for i in range(8)]
    out = tmp_path_factory.mktemp("cross-harvest")
    sampling = SamplingConfig(exposure="top5", max_new_tokens=12, seed=1)
    harvest(
        tiny_teacher, prompts, out, sampling=sampling, batch_size=8, cache=False, progress=False
    )
    return RecordSet(out)


def _loss(signal: Signal, vocab: int) -> float:
    """sparse-kl of a student with uniform logits over ``vocab`` tokens against ``signal``."""
    sparse = L.SparseSignal(
        torch.from_numpy(signal.topk_ids)[None],
        torch.from_numpy(signal.topk_logprobs)[None],
        torch.from_numpy(signal.tail_mass)[None],
    )
    logits = torch.zeros(1, len(signal), vocab)
    return L.sparse_kl(logits, sparse, torch.ones(1, len(signal), dtype=torch.bool)).item()


def _teacher_signal() -> Signal:
    """Teacher vocab a, b, ab, c, bc (ids 0..4) sampled "a" then "bc"; top-2 at each position:
    (a .5, ab .25) then (bc .6, b .3)."""
    return Signal(
        TopK(2),
        np.array([0, 4]),
        topk_ids=np.array([[0, 2], [4, 1]]),
        topk_logprobs=np.log(np.array([[0.5, 0.25], [0.6, 0.3]], dtype=np.float32)),
        tail_mass=np.array([0.25, 0.1], dtype=np.float32),
    )


def test_spans_that_differ_fall_back_to_cross_entropy_by_hand():
    # student vocab a, b, c, eos: "abc" is a|b|c; only "a" covers a teacher token's span
    mapping = np.array([0, 1, -1, 2, -1])
    signal = align_signal(
        _teacher_signal(), [b"a", b"bc"], np.array([0, 1, 2]), [b"a", b"b", b"c"], mapping
    )
    assert signal.topk_ids.tolist() == [[0, 0], [1, 1], [2, 2]]
    assert np.allclose(np.exp(signal.topk_logprobs), [[0.5, 0], [1, 0], [1, 0]])
    assert np.allclose(signal.tail_mass, [0.5, 0, 0])  # "ab" cannot be spelled: into the tail
    # uniform student q = 1/4: position 0 is KL over {a, rest}, positions 1 and 2 are -log q
    expected = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 2 * math.log(4)) / 3
    assert _loss(signal, 4) == pytest.approx(expected, abs=1e-6)


def test_spans_that_coincide_carry_every_candidate_the_student_spells_by_hand():
    # student vocab a, b, c, eos, bc: "abc" is a|bc, both spans coincide with the teacher's
    mapping = np.array([0, 1, -1, 2, 4])
    signal = align_signal(
        _teacher_signal(), [b"a", b"bc"], np.array([0, 4]), [b"a", b"bc"], mapping
    )
    assert signal.topk_ids.tolist() == [[0, 0], [4, 1]]
    assert np.allclose(signal.tail_mass, [0.5, 0.1])
    # uniform q = 1/5: position 1 is KL over {bc .6, b .3, rest .1} against {.2, .2, .6}
    first = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    second = 0.6 * math.log(0.6 / 0.2) + 0.3 * math.log(0.3 / 0.2) + 0.1 * math.log(0.1 / 0.6)
    assert _loss(signal, 5) == pytest.approx((first + second) / 2, abs=1e-6)


def test_a_signal_is_not_trusted_past_where_the_spellings_differ():
    # the student's text lost a byte (an invalid UTF-8 tail replaced): nothing after it aligns
    teacher = _teacher_signal()
    signal = align_signal(teacher, [b"a", b"bc"], np.array([0, 4]), [b"a", b"bd"], np.arange(5))
    assert np.allclose(signal.tail_mass, [0.25, 0.0])  # every candidate maps at position 0
    assert signal.topk_ids[1].tolist() == [4, 4]  # its own token, one-hot


def test_text_signals_pass_through_as_the_students_tokens():
    signal = align_signal(Signal(Text(), np.array([0, 4])), [b"a", b"bc"], [0, 1, 2], [], None)
    assert signal.exposure == Text() and signal.token_ids.tolist() == [0, 1, 2]


def test_gpt2_bpe_comes_from_its_package(gpt2, tiny_teacher):
    assert len(gpt2) == 50257 and gpt2.eos_token_id == gpt2.pad_token_id == 50256
    assert gpt2("Hello world")["input_ids"] == [15496, 995]  # GPT-2's own ids
    teacher = tiny_teacher.tokenizer
    mapping = vocab_map(teacher, gpt2)
    the = teacher(" the", add_special_tokens=False)["input_ids"]
    assert len(the) == 1 and mapping[the[0]] == 262  # " the" in GPT-2
    assert mapping[teacher.eos_token_id] == 50256
    assert mapping[0] == -1  # SmolLM2's <|endoftext|> is special, not an end of answer


def test_records_refuse_another_tokenizer_unless_a_reader_is_named(records, gpt2, tiny_teacher):
    with pytest.raises(IncompatibleDataError, match="misalign"):
        records.check_compatible(gpt2, consumer="the student")
    records.check_compatible(gpt2, reader=tiny_teacher.tokenizer)
    with pytest.raises(IncompatibleDataError, match="misalign"):
        records.check_compatible(tiny_teacher.tokenizer, reader=gpt2)


def test_records_are_retokenised_and_aligned(records, gpt2, tiny_teacher):
    teacher = tiny_teacher.tokenizer
    examples = cross_examples(records, "top5", gpt2, teacher)
    stored = list(records.exchanges())
    assert len(examples) == len(stored)
    aligned = 0
    for example, exchange in zip(examples, stored):
        ids = example.completion_ids.tolist()
        words = teacher.decode(exchange.signal.token_ids, skip_special_tokens=True)
        assert gpt2.decode(ids, skip_special_tokens=True).replace("\ufffd", "") == words.replace(
            "\ufffd", ""
        )
        assert gpt2.decode(example.prompt_ids).startswith("user: Tell me about")
        assert gpt2.decode(example.prompt_ids).endswith("\nassistant:")
        assert example.signal.topk_ids.shape == (len(ids), 5)
        assert example.signal.topk_ids.max() < len(gpt2)
        aligned += int((example.signal.tail_mass > 0).sum())
    assert aligned > 0
    text = cross_examples(records, "text", gpt2, teacher)
    assert [e.completion_ids.tolist() for e in text] == [
        e.completion_ids.tolist() for e in examples
    ]


def test_a_trajectory_turn_renders_its_conversation_for_the_student(gpt2):
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]
    messages = [{"role": "user", "content": "What is 2+2?"}]
    exchange = Exchange("t0", "What is 2+2?", "other", None, "", Signal(Text(), np.array([])),
                        "stop", messages=messages, tools=tools, turn=0)  # fmt: skip
    text = gpt2.decode(Retokenizer(gpt2).prompt_ids(exchange))
    assert "calculator" in text and "user: What is 2+2?" in text and text.endswith("assistant:")


def test_a_gpt2_student_trains_from_topk_records(records, tmp_path):
    config = DistillConfig(exposure="top5", steps=2, batch_size=4, warmup_steps=1)
    run = distill_records(records.path, tmp_path / "s", config, student="micro",
                          student_tokenizer="gpt2", device="cpu", progress=False)  # fmt: skip
    assert math.isfinite(run.train.final_loss) and run.examples == len(records)
    saved = json.loads((tmp_path / "s" / "inputs.json").read_text())
    assert saved["student_tokenizer"] == "gpt2"
    model = build_student("micro", load_student_tokenizer("gpt2"))
    assert model.config.vocab_size == 50257


def test_the_cli_trains_a_gpt2_student_and_refuses_what_cannot_align(cli, records, tmp_path):
    out = tmp_path / "s"
    base = ("distill", "--data", records.path, "--student", "micro", "--steps", "1",
            "--batch-size", "4", "--device", "cpu", "--student-tokenizer", "gpt2")  # fmt: skip
    found = cli(*base, "--out", out, "--exposure", "text", "--json")
    assert found.exit_code == 0, found.stderr
    assert json.loads(found.stdout)["examples"] == len(records)
    for args, words in [
        (("--exposure", "top5", "--loss", "sparse-kl-renorm"), ("--loss", "sparse-kl")),
        (("--exposure", "top5", "--student", "layers:2"), ("--student", "built-in")),
        (("--exposure", "top5", "--heldout", "2"), ("--heldout",)),
        (("--exposure", "top5", "--student-tokenizer", "gpt3"), ("gpt3", "gpt2")),
    ]:
        other = tmp_path / "refused"
        one_line_error(cli(*base, "--out", other, *args), *words)
        assert not other.exists()
    resumed = cli(*base[:-1], "hf:/nowhere", "--out", out, "--exposure", "text")
    one_line_error(resumed, "--student-tokenizer")


def test_fidelity_is_measured_across_the_two_vocabularies(records, gpt2, tiny_teacher):
    from distillscope.crossfidelity import fidelity_across

    held = cross_examples(records, "text", gpt2, tiny_teacher.tokenizer)[:4]
    teacher_prompts = [e.prompt_ids for e in list(records.exchanges("text"))[:4]]
    student = build_student("micro", gpt2, seed=0)
    found = fidelity_across(student, gpt2, tiny_teacher, held, teacher_prompts, max_new_tokens=4)
    assert found["teacher_loglik"]["answers"] >= 1 and found["teacher_loglik"]["per_token"] < 0
    # a near-uniform student over 50,257 tokens: about ln(50257) nats per token, spread over bytes
    assert 0 < found["text_nll_per_byte"] < math.log(len(gpt2))
