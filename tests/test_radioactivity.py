"""The radioactivity test on real students: calibrated on students that never saw the key (no false
accusations), and it finds a student distilled from watermarked answers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from distillscope.forensics.harness import teacher_outputs, train_text_student
from distillscope.forensics.radioactivity import (
    RadioactivityError,
    RadioactivityResult,
    ask_suspect,
    closed_model_test,
    control_key,
    control_tests,
    marked_tokens,
    open_model_test,
    reading_ngrams,
    watermarked_texts,
)
from distillscope.forensics.watermark import Watermark, derive_key, scored_ngrams
from distillscope.prompts import load_prompts, select_prompts
from distillscope.report.evidence import write_evidence

KEY = derive_key("test-secret", "acct-harvester")


def random_key(rng: np.random.Generator) -> int:
    return int.from_bytes(rng.bytes(32), "big")


# --- which n-grams the open-model test scores --------------------------------------------------


def test_reading_skips_prompt_ngrams_repeats_and_what_the_text_already_showed():
    prompt = [1, 2, 3]
    text = [4, 5, 6, 4, 5, 6]
    # the suspect predicts the next token of the text perfectly, except at position 1
    predictions = [4, 9, 6, 4, 5, 6]
    grams = reading_ngrams([predictions], [text], [prompt], context=2)
    # position 0: context (2, 3) -> 4 is in no prompt: scored; 1: (3, 4) -> 9: scored;
    # 2: (4, 5) -> 6 scored; 3: (5, 6) -> 4 scored; 4: (6, 4) -> 5 scored; 5: (4, 5) -> 6 was
    # scored already (and was read at position 2): skipped
    assert grams == [(2, 3, 4), (3, 4, 9), (4, 5, 6), (5, 6, 4), (6, 4, 5)]
    # an n-gram of the prompt is never scored
    assert reading_ngrams([[7]], [[5]], [[2, 3, 7, 2, 3]], context=2) == []
    assert reading_ngrams([[8]], [[5]], [[2, 3, 7, 2, 3]], context=2) == [(2, 3, 8)]


def test_reading_excludes_copies_of_what_was_read_earlier_in_the_same_text():
    text = [10, 11, 12, 10, 11, 12]
    predictions = [0, 0, 0, 0, 0, 12]  # at the end it copies the (10, 11) -> 12 it read before
    grams = reading_ngrams([predictions], [text], [[]], context=2)
    assert (10, 11, 12) not in grams
    # ... but a different text may predict the same n-gram (it never read it)
    grams = reading_ngrams([[0, 0, 12], [0, 0, 12]], [[10, 11, 5], [10, 11, 12]], [[], []],
                           context=2)  # fmt: skip
    assert (10, 11, 12) in grams


# --- control keys and the page ------------------------------------------------------------------


class _Digits:
    """A tokenizer that spells each id."""

    def decode(self, ids):
        return f"<{ids[0]}>"


@pytest.mark.parametrize("scheme", ["kgw", "gumbel"])
def test_the_highlighted_tokens_are_exactly_the_scored_ones(scheme):
    rng = np.random.default_rng(3)
    texts = [rng.integers(0, 50, size=30).tolist() for _ in range(4)]
    prompts = [rng.integers(0, 50, size=5).tolist() for _ in range(4)]
    mark = Watermark(scheme, KEY, context=2)
    marks = marked_tokens(mark, texts, prompts, _Digits(), limit=len(texts))
    assert [len(m) for m in marks] == [len(t) for t in texts]
    assert [m[0][0] for m in marks] == [f"<{t[0]}>" for t in texts]
    scored = [k for m in marks for _, k in m if k != "skip"]
    found = mark.detect(texts, prompts)
    assert len(scored) == found.tokens_scored > 0
    if scheme == "kgw":
        assert scored.count("green") == found.statistic


def test_control_keys_are_fixed_distinct_and_find_nothing_in_plain_text():
    assert control_key(0) == control_key(0) != control_key(1)
    assert KEY not in {control_key(i) for i in range(8)}
    rng = np.random.default_rng(4)
    grams = scored_ngrams(rng.integers(0, 1000, size=2000).tolist(), context=2)
    controls = control_tests(Watermark("kgw", KEY, context=2), grams, 8)
    assert [c["control"] for c in controls] == list(range(8))
    assert min(c["log10_p"] for c in controls) > -4  # plain text: nothing near strong evidence


def test_the_evidence_page_shows_control_keys_and_the_scored_tokens(tmp_path):
    result = RadioactivityResult(
        mode="closed", suspect="<b>runs/s1</b>", scheme="kgw", texts=3, tokens_scored=120,
        statistic=70, log10_p=-12.5, z=7.1,
        examples=[{"prompt": "say <script>x</script>", "answer": "hello world",
                   "tokens": [["hello", "green"], [" world", "red"], ["!", "skip"]]}],
        controls=[{"control": i, "statistic": 30 + i, "log10_p": -0.1 * i, "z": 0.1}
                  for i in range(8)],
    )  # fmt: skip
    page = write_evidence(tmp_path, [result], account="acct-<x>").read_text()
    assert "acct-&lt;x&gt;" in page and "&lt;b&gt;runs/s1&lt;/b&gt;" in page
    assert "<script>" not in page and page.count("control ") >= 8
    assert '<span class="tok green">hello</span>' in page
    assert '<span class="tok red"> world</span>' in page and "10^" not in page
    assert "3.16e-13" in page  # the tested key's exact p-value
    assert "<svg" in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    saved = json.loads((tmp_path / "evidence.json").read_text())
    assert len(saved["tests"][0]["controls"]) == 8


# --- real students ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts():
    pool = [p.text for p in select_prompts(load_prompts("sharegpt"), 48, seed=5)]
    return pool[:32], pool[32:]


@pytest.fixture(scope="module")
def answers(default_teacher, prompts):
    train, _ = prompts
    mark = Watermark("kgw", KEY, delta=4.0, context=1)
    gen = dict(max_new_tokens=32, seed=0, batch_size=32)
    clean = teacher_outputs(default_teacher, train, **gen)
    marked = teacher_outputs(default_teacher, train, processors=[mark.processor()], **gen)
    return mark, clean, marked


@pytest.fixture(scope="module")
def students(default_teacher, answers):
    _, clean, marked = answers
    tok = default_teacher.tokenizer
    return {
        "clean": train_text_student(clean.examples, tok, student="micro", steps=80, seed=0),
        "marked": train_text_student(marked.examples, tok, student="micro", steps=80, seed=0),
    }


@pytest.fixture(scope="module")
def asked(default_teacher, students, prompts):
    _, probe = prompts
    return {
        name: ask_suspect(
            student, probe, tokenizer=default_teacher.tokenizer, max_new_tokens=40, seed=1
        )  # fmt: skip
        for name, student in students.items()
    }


@pytest.mark.parametrize("scheme", ["kgw", "gumbel"])
def test_a_student_trained_on_clean_answers_gets_uniform_p_values(scheme, students, asked):
    """Calibration: keys the clean student never saw give uniform p-values (KS, fixed seed).

    KGW's count is discrete: the KS test is on the randomised p-value P(X > g) + U P(X = g) and the
    reported one (U = 1) is checked never to be smaller -- conservative, never a false accusation.
    """
    rng = np.random.default_rng(11)
    found = [
        closed_model_test(
            students["clean"],
            Watermark(scheme, random_key(rng), context=1),
            asked["clean"],
            controls=0,
        )
        for _ in range(200)
    ]
    reported = np.array([r.p_value for r in found])
    n = found[0].tokens_scored
    assert n > 300
    if scheme == "kgw":
        green = np.array([r.statistic for r in found])
        tested = stats.binom.sf(green, n, 0.25) + rng.random(200) * stats.binom.pmf(green, n, 0.25)
        assert (reported >= tested - 1e-12).all()
    else:
        tested = reported
    assert stats.kstest(tested, "uniform").pvalue > 0.01


def test_the_clean_student_is_not_accused_by_the_real_key(students, asked, answers):
    mark, _, marked = answers
    closed = closed_model_test(students["clean"], mark, asked["clean"])
    reading = [(e.prompt_ids.tolist(), e.completion_ids.tolist()) for e in marked.examples]
    opened = open_model_test(students["clean"], mark, reading)
    assert closed.p_value > 1e-3 and opened.p_value > 1e-3


def test_a_student_distilled_from_watermarked_answers_is_detected(students, answers):
    """Reading our watermarked answers through the student shows the mark at once. (A student this
    small, trained from scratch on 32 answers, does not carry it into answers to new prompts: the
    closed-model test's power is measured at scale in benchmarks/forensics.md.)"""
    mark, _, marked = answers
    reading = [(e.prompt_ids.tolist(), e.completion_ids.tolist()) for e in marked.examples]
    opened = open_model_test(students["marked"], mark, reading)
    assert opened.log10_p < -5 and opened.tokens_scored > 500, opened
    # the key of another account finds nothing in the same predictions
    other = Watermark("kgw", derive_key("test-secret", "someone-else"), delta=4.0, context=1)
    assert open_model_test(students["marked"], other, reading).p_value > 1e-3


def test_evidence_report_and_cli(tmp_path, default_teacher, students, asked, answers):
    mark, _, marked = answers
    result = closed_model_test(students["marked"], mark, asked["marked"], name="runs/s1",
                               tokenizer=default_teacher.tokenizer)  # fmt: skip
    page = write_evidence(tmp_path / "ev", [result], account="acct-harvester")
    saved = json.loads((tmp_path / "ev" / "evidence.json").read_text())
    assert saved["tests"][0]["tokens_scored"] == result.tokens_scored
    text = page.read_text()
    assert "acct-harvester" in text and "<table>" in text and "control 7" in text
    assert 'class="tok green"' in text and all("tokens" in e for e in result.examples)

    suspect = tmp_path / "suspect"
    students["marked"].save_pretrained(suspect)
    default_teacher.tokenizer.save_pretrained(suspect)
    run = subprocess.run(
        [sys.executable, "-m", "distillscope.cli", "radioactivity", "--suspect", str(suspect),
         "--key", f"{KEY:x}", "--context", "1", "--n", "6", "--max-new-tokens", "24",
         "--out", str(tmp_path / "cli"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    tests = json.loads((tmp_path / "cli" / "evidence.json").read_text())["tests"]
    assert tests[0]["mode"] == "closed" and tests[0]["tokens_scored"] > 0
    for args, message in [
        (["--key", "zz"], "hex"),
        (["--key", "ab", "--account", "a"], "exactly one"),
        (["--key", "ab", "--mode", "open"], "--texts"),
        (["--key", "ab", "--mode", "sideways"], "--mode"),
    ]:
        bad = subprocess.run(
            [sys.executable, "-m", "distillscope.cli", "radioactivity", "--suspect", str(suspect),
             *args], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


def test_watermarked_texts_from_a_missing_place_is_a_clear_error(tmp_path, default_teacher):
    with pytest.raises(RadioactivityError, match="no watermarked texts"):
        watermarked_texts(tmp_path / "nope", default_teacher.tokenizer)
