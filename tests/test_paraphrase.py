"""Paraphrase templates: real all-MiniLM-L6-v2 embeddings, groups written into the detector's x."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distillscope.detect.paraphrase import DIM, embed, paraphrase_templates, sphere_exclusion
from distillscope.prompts import load_prompts, select_prompts

#: One campaign instruction reworded four ways (synonyms, reordering), as operators do to dodge
#: exact-match filters; ``{c}`` is the slot content that changes with every request.
WORDINGS = (
    "Summarize the customer review below in two sentences, then rate its overall sentiment on a "
    "scale from 1 to 5 and explain the rating. Review: {c}",
    "Summarise the customer review below in two sentences, then score its overall sentiment on a "
    "scale from 1 to 5 and justify the score. Review: {c}",
    "Sum up the customer review below in two sentences, then rate its general sentiment on a "
    "scale of 1 to 5 and explain that rating. Review: {c}",
    "Briefly summarize the customer review below in two sentences, then give its overall "
    "sentiment a rating from 1 to 5 and explain it. Review: {c}",
)
CONTENTS = (
    "The blender is loud but it crushes ice in seconds.",
    "My headphones stopped charging after two weeks.",
    "Great tent, kept us dry through a storm, easy to pitch.",
    "The coffee grinder is inconsistent and the lid cracked.",
)


@pytest.fixture(scope="module")
def sharegpt() -> list[str]:
    """Real user prompts, none of them a rewording of the campaign's instruction."""
    return [p.text for p in select_prompts(load_prompts("sharegpt"), 40, seed=0)]


def _campaign() -> list[str]:
    return [w.format(c=c) for w in WORDINGS for c in CONTENTS]


def test_embed_is_normalised_float32_and_empty_is_fine():
    vectors = embed(["Translate this sentence into French.", "hello", _campaign()[0]])
    assert vectors.shape == (3, DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embed([]).shape == (0, DIM)


def test_embed_reads_only_the_head():
    head = " ".join(f"word{i}" for i in range(10))
    a, b = f"{head} about cooking pasta", f"{head} about repairing bicycles"
    same = embed([a, b], max_words=10)
    np.testing.assert_allclose(same[0], same[1], atol=1e-6)
    differ = embed([a, b], max_words=None)
    assert float(differ[0] @ differ[1]) < 0.99


def test_paraphrases_are_closer_than_unrelated_prompts(sharegpt):
    paraphrases = embed(_campaign())
    unrelated = embed(sharegpt)
    within = paraphrases @ paraphrases.T
    across = paraphrases @ unrelated.T
    # Every pair of rewordings (different content too) is closer than any campaign prompt to any
    # ShareGPT prompt; measured: 0.76 at the least vs 0.40 at the most.
    assert within.min() > across.max() + 0.2


def _log(rows: list[tuple[str, str, int | None]]) -> duckdb.DuckDBPyConnection:
    """A connection holding the detector's ``x`` (and ``templates``) for (account, prompt,
    template) rows; ``norm`` is a normalised prompt as the detector's (lower case, no
    punctuation)."""
    con = duckdb.connect()
    table = pa.table(
        {
            "account_id": pa.array([r[0] for r in rows], pa.string()),
            "prompt": pa.array([r[1] for r in rows], pa.string()),
            "template": pa.array([r[2] for r in rows], pa.uint64()),
        }
    )
    con.register("rows", table)
    con.execute(
        """CREATE TABLE x AS SELECT row_number() OVER () AS rid, account_id,
             TIMESTAMPTZ '2026-04-20 00:00:00+00' + INTERVAL (row_number() OVER ()) MINUTE AS ts,
             prompt,
             trim(regexp_replace(lower(prompt), '[^a-z0-9 ]+', ' ', 'g')) AS norm, template
           FROM rows"""
    )
    con.execute(
        """CREATE TABLE templates (template UBIGINT, accounts BIGINT, variants BIGINT,
                                   requests BIGINT, example VARCHAR)"""
    )
    con.execute("INSERT INTO templates SELECT 7, 3, 8, 20, 'a MinHash template'")
    return con


def test_reworded_instruction_becomes_one_template(sharegpt):
    campaign = _campaign()
    rows = [(f"op-{i % 4}", prompt, None) for i, prompt in enumerate(campaign)]
    rows.append(("op-0", campaign[0], None))  # a repeat: same norm, so the same group
    rows.append(("user-0", campaign[5].upper(), None))  # same norm from an ordinary account
    rows += [(f"user-{i % 8}", text, None) for i, text in enumerate(sharegpt)]
    rows += [("pipe-0", f"Classify ticket {i} as billing or technical.", 7) for i in range(3)]
    con = _log(rows)

    assert paraphrase_templates(con, seed=0) == 1

    got = con.execute(
        """SELECT norm IN (SELECT norm FROM x WHERE account_id LIKE 'op-%') AS campaign, template
           FROM x WHERE account_id <> 'pipe-0'"""
    ).fetchall()
    ids = {t for campaign_row, t in got if campaign_row}
    assert len(ids) == 1 and None not in ids
    assert all(t is None for campaign_row, t in got if not campaign_row)
    # MinHash templates are left as they were, and the new id is not one of theirs.
    pipeline = "SELECT list(DISTINCT template) FROM x WHERE account_id = 'pipe-0'"
    assert con.execute(pipeline).fetchall() == [([7],)]
    (new_id,) = ids
    assert new_id != 7
    summary = con.execute(
        "SELECT accounts, variants, requests FROM templates WHERE template = $t", {"t": new_id}
    ).fetchall()
    assert summary == [(5, len(campaign), len(campaign) + 2)]


def test_nothing_to_group_returns_zero():
    empty = _log([])
    assert paraphrase_templates(empty) == 0
    templated = _log([(f"a{i % 3}", w.format(c=i), 9) for i, w in enumerate(WORDINGS * 4)])
    before = templated.execute("SELECT rid, template FROM x ORDER BY rid").fetchall()
    assert paraphrase_templates(templated) == 0
    assert templated.execute("SELECT rid, template FROM x ORDER BY rid").fetchall() == before
    assert templated.execute("SELECT count(*) FROM templates").fetchall() == [(1,)]


def test_spheres_do_not_chain():
    # 40 points 2 degrees apart on an arc: neighbours are within the threshold (10 degrees) all
    # along, so connected components would make one group spanning 78 degrees.
    angles = np.radians(np.arange(40) * 2.0)
    arc = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    groups = sphere_exclusion(arc, math.cos(math.radians(10)), 5, device="cpu")
    assert len(groups) >= 4
    for group in groups:
        assert np.ptp(np.degrees(angles[group])) <= 20 + 1e-6


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    clusters=st.integers(1, 5),
    threshold=st.floats(0.5, 0.99),
    min_size=st.integers(2, 6),
)
def test_sphere_exclusion_groups_are_balls_around_a_centre(seed, clusters, threshold, min_size):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, 16))
    points = np.concatenate([c + rng.normal(scale=0.3, size=(12, 16)) for c in centres])
    points = np.concatenate([points, rng.normal(size=(20, 16))])
    points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    groups = sphere_exclusion(points, threshold, min_size, block=7, device="cpu")
    seen = np.concatenate(groups) if groups else np.array([], int)
    assert len(seen) == len(set(seen.tolist()))  # disjoint
    for group in groups:
        assert len(group) >= min_size
        assert (points[group] @ points[group[0]] >= threshold).all()
