"""Find distillation campaigns in a traffic log: per-account signals, a coordination graph, flags.

The heavy work is relational (DuckDB SQL over the gateway's ``exchanges`` table), so the same
definitions can later run on a distributed engine: prompt normalisation, word-shingle MinHash with
LSH banding (one bucket holding many variants from several accounts is a template: it survives
slot variation and light paraphrase), per-account aggregates, and co-occurrence of accounts on a
template within a time window (the SynchroTrap / CopyCatch idea: many accounts doing the same
thing at the same time). Python only joins the pieces: Louvain communities of the coordination
graph, the permutation null, and the scores.

Signal families (each an account-level number; ``SIGNALS`` says what each measures):

- template: share of the account's requests in prompt-template clusters shared across accounts;
- cot: share of prompts eliciting chain-of-thought ("step by step", "show your reasoning", ...);
- concentration: share of requests in the account's single most-used capability;
- timing: inter-arrival regularity (1 / coefficient of variation) and round-the-clock activity;
- infrastructure: accounts seen on the same IP addresses, IP rotation, shared payment
  fingerprints (when the account metadata is given), automation user agents;
- exposure: share of requests asking for logprobs;
- pivot: how fast the account moved to a newly released model;
- coordination: membership of a community of accounts co-hitting templates; accounts linked
  (fingerprint, IP, template) to banned ones.

Each account-level signal is turned into a tail probability (``detect.signals``: rank-based among
the accounts of a reference, by default the log's own accounts; ``fit_reference`` fits one on
earlier traffic without its banned accounts), the probabilities are combined by a weighted Fisher
sum, and a community's members share the community's median score when it is higher than their
own: a hydra's heads each look modest, the body does not.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distillscope.detect.learned import LearnedScorer
from distillscope.detect.signals import (
    REASON,
    SIGNAL_LIST,
    SIGNALS,
    WEIGHTS,
    Reference,
    content_reason,
    content_score,
    measured_signals,
    permutation_null,
    score,
    share_lower_bound,
)
from distillscope.errors import DistillscopeError
from distillscope.paths import is_database_url, masked_url


class DetectError(DistillscopeError):
    """A log the detector cannot read at all."""


_CAPABILITIES = {
    "coding": r"\b(code|function|python|javascript|bug|implement|refactor|script|class|sql|"
    r"compile|unit test|repository|stack trace)\b",
    "tools": r"\b(tool|function call|json schema|api call|agent|invoke|arguments)\b",
    "reasoning": r"\b(prove|solve|calculate|puzzle|logic|equation|probability|derive)\b",
}
_AUTOMATION_UA = (
    r"python-requests|httpx|aiohttp|curl/|go-http-client|okhttp|node-fetch|axios|scrapy"
)
_REQUIRED = ("account_id", "ts")
#: A tool offered in a request's messages: `"name": "search_flights", "parameters": ...` (or
#: `input_schema`) in a tools list, quotes escaped or not (a system message carrying the list as
#: JSON text inside the JSON messages); a name without a schema is somebody's data.
_TOOL_NAME = (
    r'name\\?"\s*:\s*\\?"([A-Za-z_][A-Za-z0-9_.-]*)\\?"\s*,\s*\\?"(?:parameters|input_schema)'
)


def _offered(columns) -> str:
    """SQL: the text a request's tools are read from: its messages, and the ``tools`` column of
    a gateway log that has one."""
    if "tools" not in columns:
        return "messages"
    return "(coalesce(tools, '') || coalesce(messages, ''))"


def _catalogue(column: str) -> str:
    """SQL: the request's tool catalogue, a hash of the sorted set of tool names its messages
    offer (null when none)."""
    names = f"list_sort(list_distinct(regexp_extract_all({column}, '{_TOOL_NAME}', 1)))"
    return f"CASE WHEN {column} LIKE '%name%' AND len({names}) > 0 THEN hash({names}) END"


@dataclass
class DetectConfig:
    """Knobs of the detector; defaults are what the default scenario was tuned with."""

    permutations: int = 32
    bands: int = 8
    shingle_words: int = 3
    #: Words at each end of a prompt hashed on their own (a template's frame around slot content).
    frame_words: int = 16
    #: Words of the whole-prompt view hashed (past them a long prompt is pasted content: its
    #: frame views already match a template around it, and hashing all of it is most of the cost).
    whole_words: int = 96
    min_template_accounts: int = 3
    min_template_variants: int = 8
    #: Words at each end of a prompt read exactly for an account's own template (the same
    #: instruction wrapped round at least ``min_template_variants`` of its prompts: one task).
    edge_words: int = 8
    #: Shorter prompts ("continue", "thanks!") are everyone's: never a template.
    min_template_words: int = 6
    #: Also group reworded templates by sentence embeddings (all-MiniLM-L6-v2 on each prompt's
    #: first words; ~80 prompts/s on 2 CPU cores, so off by default): see detect/paraphrase.py.
    paraphrase: bool = False
    #: Distinct template-less prompts embedded per account when ``paraphrase`` is on.
    paraphrase_per_account: int = 50
    window_minutes: int = 60
    min_edge_weight: int = 2
    #: A template links accounts in the coordination graph only when at least this share of the
    #: accounts using it are suspects.
    min_suspect_share: float = 0.5
    min_community: int = 5
    #: A community member needs edges to at least this many other members.
    min_ties: int = 3
    #: A community is flagged when as many unrelated accounts, selected as its members were,
    #: would have a median score as high as its own with at most this probability
    #: (``signals.Null.community_p``): a log yields tens of communities, and at 1e-4 the chance
    #: that any of a hundred ordinary ones passes stays under 1% (Bonferroni).
    community_level: float = 1e-4
    #: Flag accounts whose score a random account would reach with this probability or less.
    flag_fpr: float = 0.001
    null_permutations: int = 50
    #: Rounds of refitting the self-reference without the accounts found (0: rank among all).
    trim_rounds: int = 2
    #: Fresh elicitation prompts per account embedded to find shared intents.
    intent_prompts: int = 30
    #: Accounts of one intent each tied to this many others (a sparse random graph: a crowd of
    #: thousands is one community without millions of pairs).
    intent_degree: int = 20
    seed: int = 0


@dataclass
class DetectionSummary:
    out: str
    accounts: int
    flagged: int
    clusters: int
    exchanges: int
    skipped: dict[str, int]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: the score an account is flagged at (the null's point at ``DetectConfig.flag_fpr``)
    threshold: float = float("nan")


def detect(
    log: str | os.PathLike,
    out: str | os.PathLike,
    *,
    accounts: str | os.PathLike | None = None,
    events: str | os.PathLike | None = None,
    banned: Sequence[str] = (),
    until: datetime | None = None,
    since: datetime | None = None,
    reference: Reference | str | os.PathLike | None = None,
    scorer: LearnedScorer | str | os.PathLike | None = None,
    config: DetectConfig | None = None,
) -> DetectionSummary:
    """Score every account of ``log`` (a gateway DuckDB file or Parquet) and write ``out``:
    ``accounts.parquet``, ``clusters.parquet``, ``baseline.parquet`` (volume only),
    ``blocklist.txt``, ``report.html`` and ``summary.json``.

    ``accounts``/``events`` (the simulator's ``accounts.parquet``/``events.parquet``, or the
    provider's own) add payment fingerprints and model releases; ``banned`` names accounts already
    banned; ``until`` scores only exchanges before that time, and ``since`` reports only accounts
    with exchanges at or after it (a daily job: ``since`` yesterday, ``until`` today, every
    account scored on all its history, yesterday's active accounts reported). ``reference`` (a
    ``Reference`` or the file ``fit_reference`` saved) scores the signals and sets the thresholds
    against earlier traffic; without it each account is ranked among this log's accounts.
    ``scorer`` (a ``LearnedScorer`` or the file ``detect-train`` saved) adds its probability
    (``learned_score``) and flag (``learned_flagged``) beside the detector's own.
    """
    began = time.perf_counter()
    if scorer is not None and not isinstance(scorer, LearnedScorer):
        scorer = LearnedScorer.load(scorer)
    config = config or DetectConfig()
    if reference is not None and not isinstance(reference, Reference):
        reference = Reference.load(reference)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    features, measured, skipped, notes, n = _prepare(
        con, log_target(log), accounts, events, banned, until, config
    )
    if reference is None:
        ranked = _self_referenced(con, features, measured, config, notes)
    else:
        notes.append(
            f"signals scored against a reference of {reference.accounts:,} accounts "
            f"({reference.source or 'unnamed'}, fitted {reference.fitted_at})"
        )
        ranked = _rank(con, features, measured, reference, config, notes)
    scores, z, null, threshold, found = ranked
    communities = _significant(found, features["account_id"].to_pylist(), z, null, config)
    notes.append(
        f"flag threshold {threshold:.1f}: the {1 - config.flag_fpr:.3%} point of scores "
        f"with each signal shuffled across accounts ({config.null_permutations} shuffles)"
    )
    table = _assemble(features, scores, z, communities, threshold)
    if scorer is not None:
        learned = scorer.predict_proba(table)
        table = table.append_column("learned_score", pa.array(learned))
        table = table.append_column("learned_flagged", pa.array(learned >= scorer.threshold))
        notes.append(
            f"learned scorer ({scorer.trained_on.get('accounts', 0):,} training accounts) flags "
            f"{int((learned >= scorer.threshold).sum())}: reported beside the detector's flags"
        )
    if since is not None:
        since = since if since.tzinfo else since.replace(tzinfo=UTC)
        table = table.filter(pc.greater_equal(features["last_seen"], pa.scalar(since)))
        notes.append(f"reporting the {table.num_rows:,} accounts active since {since.isoformat()}")
    _write(out, table, con, communities, config, edges=found.edges)
    summary = DetectionSummary(
        out=str(out),
        accounts=table.num_rows,
        flagged=int(sum(table["flagged"].to_pylist())),
        clusters=len({c for c in table["cluster_id"].to_pylist() if c}),
        exchanges=n,
        skipped=skipped,
        notes=notes,
        seconds=time.perf_counter() - began,
        threshold=float(threshold),
    )
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    _report(out, table, summary, con, threshold)
    return summary


def _rank(con, features, measured, reference: Reference, config: DetectConfig, notes=None):
    """Score every account against ``reference``: scores, evidence, the permutation null, the
    account threshold, and the coordination communities among suspects (significant or not)."""
    tails, fallbacks = reference.tails(features, measured)
    if notes is not None:
        notes.extend(fallbacks)
    scores, z = score(features, tails)
    null = permutation_null(
        tails, permutations=config.null_permutations, seed=config.seed, strata=reference.strata()
    )
    threshold = null.threshold(config.flag_fpr)
    ids = features["account_id"].to_pylist()
    # the graph's nodes: suspects, and accounts with a content reason of their own (a quiet
    # campaign's accounts each look modest; what ties them is what they ask and where from)
    reasoned = content_reason(z)
    suspects = [a for a, v in zip(ids, scores) if v >= threshold / 2]
    communities = _communities(con, suspects, [a for a, r in zip(ids, reasoned) if r], config)
    return scores, z, null, threshold, communities


def _self_referenced(con, features, measured, config: DetectConfig, notes: list[str]):
    """Rank each account among the log's own accounts, less the campaigns found.

    Ranked among all of a log's accounts, a campaign is its own reference: 200 accounts asking
    for reasoning in every request make asking for it look ordinary, and each of them earns
    p ~ 0.1 where it deserves 1 / n. So the ranking is repeated against a reference without the
    accounts the previous round put in a coordinated community (or on its fringe) or flagged (a
    trimmed fit, as a robust estimator trims its outliers) until that set stops changing (at most
    ``trim_rounds``).
    """
    ids = features["account_id"].to_pylist()
    reference = Reference.fit(features, measured)
    ranked = _rank(con, features, measured, reference, config)
    excluded: set[str] = set()
    for _ in range(config.trim_rounds):
        scores, _, _, threshold, communities = ranked
        trimmed = set(communities) | communities.fringe
        trimmed |= {a for a, v in zip(ids, scores) if v >= threshold}
        if trimmed == excluded or len(trimmed) >= len(ids) / 2:
            break
        excluded = trimmed
        reference = Reference.fit(features, measured, exclude=excluded)
        ranked = _rank(con, features, measured, reference, config)
    if excluded:
        notes.append(
            f"signals ranked among the log's accounts less {len(excluded):,} in coordinated "
            "communities or flagged (a campaign is not its own reference)"
        )
    return ranked


def fit_reference(
    log: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    accounts: str | os.PathLike | None = None,
    events: str | os.PathLike | None = None,
    banned: Sequence[str] = (),
    until: datetime | None = None,
    exclude: Sequence[str] = (),
    config: DetectConfig | None = None,
) -> Reference:
    """Fit every signal on the accounts of ``log`` (earlier traffic: last week's, say), leaving
    out ``exclude``d accounts (those its detection run flagged or that were banned), and save it
    to ``out`` when given. ``detect(..., reference=)`` then scores new traffic against it.

    Fit on traffic of about the span the scored logs will have: template and IP sharing grow with
    the number of accounts a log holds.
    """
    config = config or DetectConfig()
    con = duckdb.connect()
    features, measured, _, _, n = _prepare(
        con, log_target(log), accounts, events, banned, until, config
    )
    reference = Reference.fit(features, measured, exclude=exclude, exchanges=n, source=str(log))
    if out is not None:
        reference.save(out)
    return reference


def _prepare(con, log: Path, accounts, events, banned, until, config: DetectConfig):
    """Load ``log`` into ``con`` and compute every account's signals: the features table, the
    signals measured, rows skipped, notes, and the number of usable exchanges."""
    con.execute("SET TimeZone = 'UTC'")
    skipped, missing, notes = _load(con, log, until)
    n = con.execute("SELECT count(*) FROM x").fetchall()[0][0]
    if n == 0:
        raise DetectError(f"{log}: no usable exchanges ({_describe(skipped)})")
    _template_clusters(con, config)
    _elicitation(con, config)
    if config.paraphrase:
        from distillscope.detect.paraphrase import paraphrase_templates

        groups = paraphrase_templates(
            con, max_per_account=config.paraphrase_per_account, seed=config.seed
        )
        notes.append(f"{groups} paraphrase templates from sentence embeddings")
    features, absent = _features(con, accounts, events, banned, notes)
    return features, measured_signals(missing | absent), skipped, notes, n


def _describe(skipped: dict[str, int]) -> str:
    return ", ".join(f"{v} rows {k}" for k, v in skipped.items() if v) or "the log is empty"


def _load(con, log: Path, until: datetime | None) -> tuple[dict[str, int], set[str], list[str]]:
    """The clean exchanges as table ``x``; rows that cannot be used are counted, not fatal.
    Returns the skipped-row counts, the optional columns the log lacks, and notes."""
    held: list[str] = []
    source = _source(con, log, held)
    try:
        columns = {
            row[0]: row[1] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
        }
    except duckdb.Error as exc:
        raise DetectError(f"cannot read {log}: {str(exc).splitlines()[0]}") from None
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        raise DetectError(f"{log} has no {', '.join(missing)} column: nothing to score by")
    notes, absent = held, set()

    def col(name: str, default: str) -> str:
        if name in columns:
            return name
        absent.add(name)
        notes.append(f"column {name} missing: the signals that need it are skipped")
        return f"{default} AS {name}"

    ts = "ts" if "TIMESTAMP" in columns["ts"].upper() else "try_cast(ts AS TIMESTAMPTZ)"
    con.execute(
        f"""CREATE TABLE raw AS SELECT account_id, {ts} AS ts,
            {col("prompt", "NULL::VARCHAR")}, {col("model", "NULL::VARCHAR")},
            {col("client_ip", "NULL::VARCHAR")}, {col("user_agent", "NULL::VARCHAR")},
            {col("exposure_requested", "NULL::VARCHAR")}, {col("status", "200")},
            {_catalogue(_offered(columns)) if "messages" in columns else "NULL::UBIGINT"}
                AS catalogue
        FROM {source}"""
    )
    if "messages" not in columns:
        absent.add("messages")
    counts = con.execute(
        """SELECT count(*) FILTER (WHERE account_id IS NULL OR account_id = ''),
                  count(*) FILTER (WHERE ts IS NULL),
                  count(*) FILTER (WHERE prompt IS NULL OR trim(prompt) = '')
           FROM raw"""
    ).fetchall()[0]
    skipped = {"without account": counts[0], "with a bad timestamp": counts[1],
               "with an empty prompt": counts[2]}  # fmt: skip
    cut = "AND ts < $until" if until is not None else ""
    con.execute(
        f"""CREATE TABLE x AS SELECT row_number() OVER (ORDER BY ts) AS rid, * FROM raw
        WHERE account_id IS NOT NULL AND account_id <> '' AND ts IS NOT NULL
          AND prompt IS NOT NULL AND trim(prompt) <> '' {cut}""",
        {"until": until} if until is not None else {},
    )
    return skipped, absent, notes


def log_target(log: str | os.PathLike) -> str | Path:
    """A traffic log as ``_source`` takes it: a ``postgresql://`` URL stays a string."""
    return str(log) if is_database_url(log) else Path(log)


def _source(con, log: str | Path, notes: list[str] | None = None) -> str:
    """The SQL name of a log's exchanges: a gateway DuckDB file (attached read-only; while a
    running gateway holds it, the hourly Parquet segments it writes beside it, with a note),
    Parquet (a file, or a folder whose every Parquet file, at any depth, is traffic: exported
    segments, partitioned by day or not), or a gateway's PostgreSQL log (read once, while the
    gateway goes on writing)."""
    if isinstance(log, str):
        from distillscope.gateway.traffic import TrafficLogError, read_traffic

        try:
            table = read_traffic(log)
        except TrafficLogError as exc:
            raise DetectError(f"cannot read the traffic log {masked_url(log)}: {exc}") from None
        con.register("pg_exchanges", table)
        return "pg_exchanges"
    if not log.exists():
        raise DetectError(f"no traffic log at {log}")
    if log.is_dir():
        if not any(log.rglob("*.parquet")):
            raise DetectError(f"{log} holds no Parquet files")
        return f"read_parquet('{log}/**/*.parquet', union_by_name = true)"
    if log.suffix != ".duckdb":
        return f"read_parquet('{log}')"
    try:
        con.execute(f"ATTACH '{log}' AS src (READ_ONLY)")
    except duckdb.Error as exc:  # held by a gateway (its lock, or in this process its handle)
        from distillscope.gateway.traffic import held_log_segments

        found = held_log_segments(log)
        if found is None:
            raise DetectError(
                f"cannot open {log}: {str(exc).splitlines()[0]} (a running gateway holds its "
                "DuckDB file; it writes hourly segments beside it, and none is there yet)"
            ) from None
        folder, note = found
        if notes is not None:
            notes.append(note)
        return f"read_parquet('{folder}/**/*.parquet', union_by_name = true)"
    return "src.exchanges"


def _template_clusters(con, config: DetectConfig) -> None:
    """``x.template``: the prompt-template (LSH bucket) of each request, null for none.

    Three views of each normalised prompt are hashed: the whole prompt, its first and its last
    ``frame_words`` words. A template that wraps long slot content (an instruction around a pasted
    document) shares little with its siblings as a whole but its frame is nearly identical.
    """
    rows = config.permutations // config.bands
    con.execute(
        """ALTER TABLE x ADD COLUMN norm VARCHAR;
           UPDATE x SET norm = trim(regexp_replace(regexp_replace(lower(prompt), '[0-9]+', '0',
                                                  'g'), '[^a-z0 ]+', ' ', 'g'))"""
    )
    con.execute(
        "CREATE TABLE p AS SELECT norm, row_number() OVER () AS pid"
        " FROM (SELECT DISTINCT norm FROM x)"
    )
    k, f = config.shingle_words, config.frame_words
    con.execute(
        f"""CREATE TABLE sh AS
        WITH words AS (SELECT pid, string_split(regexp_replace(norm, ' +', ' ', 'g'), ' ') AS w
                       FROM p),
        views AS (
          SELECT pid, 0 AS view, w[1:{config.whole_words}] AS w FROM words
          WHERE len(w) >= {config.min_template_words}
          UNION ALL SELECT pid, 1, w[1:{f}] FROM words WHERE len(w) > {2 * f}
          UNION ALL SELECT pid, 2, w[-{f}:] FROM words WHERE len(w) > {2 * f})
        SELECT pid, view, hash(array_to_string(w[i:i + {k - 1}], ' ')) % 2147483647 AS h
        FROM views, range(1, len(w) - {k} + 2) AS r(i)"""
    )
    con.register("mh", _minhashes(con, config))
    con.execute(
        f"""CREATE TABLE buckets AS
        SELECT pid, view * 1000 + i // {rows} AS band, hash(list(m ORDER BY i)) AS key
        FROM mh GROUP BY pid, view, i // {rows}"""
    )
    con.unregister("mh")
    # A template is one LSH bucket (no transitive chaining: near-duplicates of near-duplicates
    # are not merged into one giant component) holding several variants from several accounts.
    con.execute(
        """CREATE TABLE xp AS SELECT x.rid, x.account_id, p.pid, x.prompt
           FROM x JOIN p USING (norm)"""
    )
    con.execute(
        f"""CREATE TABLE templates AS
        WITH pb AS (SELECT pid, hash(band, key) AS bucket FROM buckets)
        SELECT bucket AS template, count(DISTINCT xp.account_id) AS accounts,
               count(DISTINCT pb.pid) AS variants, count(*) AS requests,
               any_value(xp.prompt) AS example
        FROM xp JOIN pb USING (pid) GROUP BY bucket
        HAVING count(DISTINCT xp.account_id) >= {config.min_template_accounts}
           AND count(DISTINCT pb.pid) >= {config.min_template_variants}"""
    )
    con.execute(
        """ALTER TABLE x ADD COLUMN template UBIGINT;
           UPDATE x SET template = t.template FROM (
               SELECT xp.rid, min(hash(b.band, b.key)) AS template
               FROM xp JOIN buckets b USING (pid)
               WHERE hash(b.band, b.key) IN (SELECT template FROM templates)
               GROUP BY xp.rid) t
           WHERE x.rid = t.rid"""
    )
    # An account's own template: the same first (or last) words around many different prompts
    # of one account (an integration wrapping its users' text in its own instruction, shared with
    # nobody). Not a shared template, so no evidence of anything; it only makes the wrapped
    # requests one task. Exact words, not MinHash: the slot content is most of each prompt.
    e = config.edge_words
    con.execute(
        f"""ALTER TABLE x ADD COLUMN frame VARCHAR;
           UPDATE x SET frame = t.frame FROM (
               WITH edges AS (
                 SELECT rid, account_id, norm, 'first ' || array_to_string(w[1:{e}], ' ') AS a,
                        'last ' || array_to_string(w[-{e}:], ' ') AS b
                 FROM (SELECT rid, account_id, norm,
                              string_split(regexp_replace(norm, ' +', ' ', 'g'), ' ') AS w
                       FROM x)
                 WHERE len(w) >= {2 * e}),
               own AS (
                 SELECT account_id, edge FROM (
                   SELECT account_id, a AS edge, norm FROM edges
                   UNION ALL SELECT account_id, b, norm FROM edges)
                 GROUP BY ALL HAVING count(DISTINCT norm) >= {config.min_template_variants})
               SELECT rid, coalesce(min(o1.edge), min(o2.edge)) AS frame
               FROM edges
               LEFT JOIN own o1 ON o1.account_id = edges.account_id AND o1.edge = edges.a
               LEFT JOIN own o2 ON o2.account_id = edges.account_id AND o2.edge = edges.b
               GROUP BY rid) t
           WHERE x.rid = t.rid"""
    )


#: The Mersenne prime the MinHash permutations ``(a * h + b) % p`` work modulo.
_PRIME = 2147483647


def _minhashes(con, config: DetectConfig) -> pa.Table:
    """``(pid, view, i, m)``: each view's minimum over its shingle hashes ``h`` of the i-th
    permutation ``(a_i * h + b_i) % p``. Computed in numpy, one vectorised pass per permutation
    over the shingles sorted by view (``np.minimum.reduceat``): the same values as SQL's
    ``min(...) FROM sh, perms GROUP BY pid, view, i``, which joined 16M shingles with 32
    permutations at 1M exchanges and took 83 of the detector's 237 s."""
    rng = np.random.default_rng(config.seed)
    a = rng.integers(1, _PRIME, config.permutations)
    b = rng.integers(0, _PRIME, config.permutations)
    sh = con.execute("SELECT pid, view, h FROM sh ORDER BY pid, view").fetchnumpy()
    pid = np.asarray(sh["pid"], dtype=np.int64)
    view = np.asarray(sh["view"], dtype=np.int64)
    h = np.asarray(sh["h"]).astype(np.int64)  # < p: a * h + b stays below 2^63
    if len(h) == 0:
        empty = pa.array([], pa.int64())
        return pa.table({"pid": empty, "view": empty, "i": empty, "m": empty})
    group = pid * 3 + view
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    m = np.empty((len(starts), config.permutations), dtype=np.int64)
    for i in range(config.permutations):
        m[:, i] = np.minimum.reduceat((a[i] * h + b[i]) % _PRIME, starts)
    n = config.permutations
    return pa.table(
        {
            "pid": np.repeat(pid[starts], n),
            "view": np.repeat(view[starts], n),
            "i": np.tile(np.arange(n, dtype=np.int64), len(starts)),
            "m": m.ravel(),
        }
    )


def _elicitation(con, config: DetectConfig) -> None:
    """``x.elicits``: whether the prompt asks to see the reasoning or a narrated trace
    (``detect.elicitation``), scored once per distinct prompt; ``x.fresh``: whether no other
    account sent the same (normalised) prompt. A public test set that several evaluation
    harnesses send asks for reasoning too, but a harvest wants fresh tasks: only fresh
    elicitations count. Then ``intents``: the accounts that ask for reasoning and what about."""
    from distillscope.detect.elicitation import ElicitationClassifier

    prompts = con.execute("SELECT DISTINCT prompt FROM x").fetchnumpy()["prompt"]
    texts = [p if len(p) <= 4000 else p[:2000] + "\n" + p[-2000:] for p in prompts]
    proba = ElicitationClassifier.default().predict_proba(texts)
    con.register("elicited", pa.table({"prompt": prompts, "elicits": proba >= 0.5}))
    con.execute(
        """ALTER TABLE x ADD COLUMN elicits BOOLEAN DEFAULT false;
           UPDATE x SET elicits = e.elicits FROM elicited e WHERE x.prompt = e.prompt;
           ALTER TABLE x ADD COLUMN fresh BOOLEAN DEFAULT true;
           UPDATE x SET fresh = false WHERE norm IN (
               SELECT norm FROM x GROUP BY norm HAVING count(DISTINCT account_id) > 1)"""
    )
    con.unregister("elicited")
    _intents(con, config)


def _intents(con, config: DetectConfig) -> None:
    """Table ``intents(account_id, intent)``: what each account that asks for reasoning asks
    about. Its fresh elicitation prompts (up to ``intent_prompts``) are embedded (hashed word
    n-grams, tf-idf, a 64-dimensional SVD) and clustered (k-means); an account holds an intent
    when at least two of its prompts fall in that cluster. A campaign with no shared
    infrastructure still asks many accounts for the same kind of thing, worded differently each
    time; people asking for reasoning ask about whatever they are working on."""
    rows = con.execute(
        f"""SELECT account_id, prompt FROM (
              SELECT account_id, prompt, row_number() OVER (
                       PARTITION BY account_id ORDER BY hash(prompt, {config.seed})) AS r
              FROM x WHERE elicits AND fresh)
            WHERE r <= {config.intent_prompts}
              AND account_id IN (SELECT account_id FROM x WHERE elicits AND fresh
                                 GROUP BY 1 HAVING count(*) >= 2)"""
    ).fetchnumpy()
    accounts, prompts = rows["account_id"], rows["prompt"]
    clusters = np.zeros(len(prompts), dtype=np.int64)
    if len(prompts) >= 20:
        from sklearn.cluster import MiniBatchKMeans
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
        from sklearn.preprocessing import normalize

        words = HashingVectorizer(
            ngram_range=(1, 2), n_features=2**18, alternate_sign=False, stop_words="english"
        ).transform([p[:1500] for p in prompts])
        tfidf = TfidfTransformer(sublinear_tf=True).fit_transform(words)
        # only the hashed n-grams that occur: the same singular vectors, and the randomized
        # SVD's dense projections shrink from 2^18 rows to a few thousand
        tfidf = tfidf[:, np.unique(tfidf.indices)]
        dims = min(64, tfidf.shape[0] - 1, tfidf.shape[1] - 1)
        embedded = normalize(TruncatedSVD(dims, random_state=config.seed).fit_transform(tfidf))
        k = int(np.clip(len(prompts) // 40, 8, 64))
        clusters = MiniBatchKMeans(
            k, random_state=config.seed, n_init=3, batch_size=4096
        ).fit_predict(embedded)
    con.register(
        "embedded", pa.table({"account_id": accounts, "intent": pa.array(clusters, pa.int64())})
    )
    con.execute(
        """CREATE OR REPLACE TABLE intents AS SELECT account_id, intent FROM embedded
           GROUP BY ALL HAVING count(*) >= 2"""
    )
    con.unregister("embedded")


def _features(con, accounts_meta, events, banned, notes) -> tuple[pa.Table, set[str]]:
    """One row per account: every signal's value (shares as their lower bound), plus volume and
    examples; and the side inputs (events, accounts, banned) not given."""
    absent = set()
    capability = " ".join(
        f"WHEN regexp_matches(lower(prompt), '{pattern}') THEN '{name}'"
        for name, pattern in _CAPABILITIES.items()
    )
    con.execute(
        f"""CREATE TABLE acc AS
        WITH t AS (
          SELECT *, CASE {capability} ELSE 'other' END AS capability,
                 epoch(ts - lag(ts) OVER (PARTITION BY account_id ORDER BY ts)) AS gap
          FROM x),
        -- a task is a distinct template (shared, or the account's own) or a distinct
        -- untemplated prompt: an integration that wraps its users' text in one template sends
        -- one task ten thousand times
        caps AS (SELECT account_id, sum(n) AS tasks,
                        coalesce(max(n) FILTER (WHERE capability <> 'other'), 0) AS top FROM (
                   SELECT account_id, capability,
                          count(DISTINCT coalesce(template::VARCHAR, frame, norm)) AS n
                   FROM t GROUP BY ALL) GROUP BY 1),
        hours AS (SELECT account_id, -sum(p * ln(p)) AS entropy FROM (
                   SELECT account_id, count(*) / sum(count(*)) OVER (PARTITION BY account_id) AS p
                   FROM t GROUP BY account_id, hour(ts)) GROUP BY 1),
        ips AS (SELECT client_ip, count(DISTINCT account_id) AS sharing FROM x
                WHERE client_ip IS NOT NULL GROUP BY 1)
        SELECT t.account_id,
               count(*) AS requests,
               count(DISTINCT date_trunc('day', ts)) AS active_days,
               min(ts) AS first_seen,
               max(ts) AS last_seen,
               count(template) AS template,
               sum((elicits AND fresh)::INT) AS elicitation,
               any_value(caps.top) AS concentration,
               any_value(caps.tasks) AS tasks,
               CASE WHEN count(gap) >= 5 AND avg(gap) > 0
                    THEN avg(gap) / greatest(stddev_pop(gap), 1e-9) ELSE 0 END AS regularity,
               any_value(hours.entropy) AS around_clock,
               coalesce(max(ips.sharing), 0) AS ip_sharing,
               count(DISTINCT t.client_ip) / count(*) AS ip_rotation,
               sum(coalesce(regexp_matches(lower(user_agent), '{_AUTOMATION_UA}'), false)::INT)
                   AS automation_ua,
               sum((coalesce(exposure_requested, 'text') <> 'text')::INT) AS logprobs,
               count(DISTINCT catalogue) AS tool_coverage,
               list(prompt ORDER BY elicits DESC, template IS NULL, ts)[1:2]
                   AS examples
        FROM t JOIN caps USING (account_id) JOIN hours USING (account_id)
        LEFT JOIN ips USING (client_ip)
        GROUP BY t.account_id"""
    )
    con.execute('ALTER TABLE acc ADD COLUMN "pivot" DOUBLE DEFAULT 0')
    con.execute("ALTER TABLE acc ADD COLUMN fingerprint DOUBLE DEFAULT 0")
    con.execute("ALTER TABLE acc ADD COLUMN banned_link DOUBLE DEFAULT 0")
    if events is not None and Path(events).exists():
        con.execute(
            f"""UPDATE acc SET "pivot" = s.share FROM (
                SELECT x.account_id, avg((x.model = e.name)::INT) AS share
                FROM x, read_parquet('{events}') e
                WHERE x.ts >= e.time AND x.ts < e.time + INTERVAL 24 HOUR
                GROUP BY x.account_id HAVING count(*) >= 3) s
            WHERE acc.account_id = s.account_id"""
        )
    else:
        absent.add("events")
        notes.append("no model-release events given: the pivot signal is skipped")
    if accounts_meta is not None and Path(accounts_meta).exists():
        con.execute(f"CREATE TABLE meta AS SELECT * FROM read_parquet('{accounts_meta}')")
        con.execute(
            """UPDATE acc SET fingerprint = s.n - 1 FROM (
                SELECT account_id, count(*) OVER (PARTITION BY payment_fingerprint) AS n
                FROM meta WHERE payment_fingerprint IS NOT NULL) s
            WHERE acc.account_id = s.account_id"""
        )
    else:
        absent.add("accounts")
        notes.append("no account metadata given: the payment-fingerprint signal is skipped")
    if not banned:
        absent.add("banned")
    else:
        con.register("banned", pa.table({"account_id": list(banned)}))
        con.execute(
            """UPDATE acc SET banned_link = s.links FROM (
                SELECT a.account_id, count(DISTINCT b.account_id) AS links
                FROM (SELECT DISTINCT account_id, template, client_ip FROM x) a
                JOIN (SELECT DISTINCT account_id, template, client_ip FROM x
                      WHERE account_id IN (SELECT account_id FROM banned)) b
                  ON a.template = b.template
                     OR a.client_ip = b.client_ip
                WHERE a.account_id <> b.account_id GROUP BY 1) s
            WHERE acc.account_id = s.account_id"""
        )
    table = con.sql("SELECT * FROM acc ORDER BY account_id").to_arrow_table()
    for signal in SIGNAL_LIST:
        if not signal.share:
            continue
        name = signal.name
        column = table.column_names.index(name)
        hits = table[name].to_numpy().astype(float)
        trials = table[signal.per].to_numpy().astype(float)
        table = table.set_column(column, name, pa.array(share_lower_bound(hits, trials)))
        table = table.append_column(f"{name}_hits", pa.array(hits))
        table = table.append_column(f"{name}_trials", pa.array(trials))
    return table, absent


def _communities(
    con, suspects: list[str], reasoned: list[str], config: DetectConfig
) -> Communities:
    """Louvain communities of the coordination graph. What accounts share of infrastructure and
    timing ties ``suspects`` only (accounts with at least half the flag score: an office's
    address or a popular template ties ordinary people too); what they ask ties suspects and
    ``reasoned`` accounts (a content reason of their own) alike.

    An edge's weight counts what two accounts share: each (template, hour) both hit (the
    SynchroTrap / CopyCatch lockstep), each IP address both used, a payment fingerprint (counted
    twice) -- among suspects; each tool catalogue both offer (one is a popular product's; several
    are a sweep),
    each intent both hold (``_intents``: accounts asking for reasoning about the same
    kind of task; every account that asks for reasoning is a node, suspect or not, because a
    campaign with no shared infrastructure is found by what it asks, and each is tied to
    ``intent_degree`` others of its intent), and each (template, day) both hit (a quiet campaign's
    accounts send a few requests a day, rarely in the same hour) -- the last only for pairs tied
    by one of the others: alone it is what two busy users of one popular prompt share by chance.
    Edges need ``min_edge_weight``.
    """
    import networkx as nx

    con.register("suspects", pa.table({"account_id": pa.array(suspects, pa.string())}))
    con.register("reasoned", pa.table({"account_id": pa.array(reasoned, pa.string())}))
    fingerprints = (
        """UNION ALL SELECT a.account_id, b.account_id, false, 2, 'payment fingerprint'
           FROM meta a JOIN meta b
             USING (payment_fingerprint)
           WHERE a.account_id < b.account_id
             AND a.account_id IN (SELECT account_id FROM suspects)
             AND b.account_id IN (SELECT account_id FROM suspects)"""
        if con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'meta'").fetchall()[
            0
        ][0]
        else ""
    )
    pairs = con.execute(
        f"""WITH
        -- a template most of whose users are not suspects is everyone's (a popular prompt):
        -- co-hitting it says nothing about coordination
        owned AS (SELECT template FROM x WHERE template IS NOT NULL GROUP BY 1
                  HAVING count(DISTINCT account_id) FILTER (
                           WHERE account_id IN (SELECT account_id FROM suspects))
                         >= {config.min_suspect_share} * count(DISTINCT account_id)),
        sx AS (SELECT * FROM x WHERE account_id IN (SELECT account_id FROM suspects)),
        hits AS (
          SELECT DISTINCT template, time_bucket(INTERVAL {config.window_minutes} MINUTE, ts)
                 AS slot, false AS daily, account_id FROM sx
          WHERE template IN (SELECT * FROM owned)
          UNION ALL
          SELECT DISTINCT template, time_bucket(INTERVAL 1 DAY, ts), true, account_id FROM sx
          WHERE template IN (SELECT * FROM owned)),
        crowded AS (SELECT template, slot, daily FROM hits GROUP BY ALL HAVING count(*) <= 400),
        ips AS (SELECT DISTINCT client_ip, account_id FROM sx WHERE client_ip IS NOT NULL),
        shared_ips AS (SELECT client_ip FROM ips GROUP BY 1 HAVING count(*) <= 50),
        catalogues AS (SELECT DISTINCT catalogue, account_id FROM x
                       WHERE catalogue IS NOT NULL AND account_id IN (
                         SELECT account_id FROM suspects UNION SELECT account_id FROM reasoned)),
        ranked_intents AS (SELECT account_id, intent, row_number() OVER (
                             PARTITION BY intent ORDER BY hash(account_id, {config.seed})) AS r
                           FROM intents),
        edges AS (
          SELECT a.account_id AS u, b.account_id AS v, daily, 1 AS w,
                 CASE WHEN daily THEN 'template, same day' ELSE 'template, same hour' END AS tie
          FROM hits a JOIN hits b USING (template, slot, daily)
          WHERE a.account_id < b.account_id
            AND (template, slot, daily) IN (SELECT * FROM crowded)
          UNION ALL
          SELECT a.account_id, b.account_id, false, 1, 'IP address'
          FROM ips a JOIN ips b USING (client_ip)
          WHERE a.account_id < b.account_id AND client_ip IN (SELECT * FROM shared_ips)
          UNION ALL
          SELECT a.account_id, b.account_id, false, 1, 'tool catalogue'
          FROM catalogues a JOIN catalogues b USING (catalogue)
          WHERE a.account_id < b.account_id AND catalogue IN (
                SELECT catalogue FROM catalogues GROUP BY 1 HAVING count(*) <= 400)
          UNION ALL
          SELECT least(a.account_id, b.account_id), greatest(a.account_id, b.account_id),
                 false, 1, 'intent'
          FROM ranked_intents a JOIN ranked_intents b USING (intent)
          WHERE b.r > a.r AND b.r <= a.r + {config.intent_degree}
          {fingerprints})
        -- same-day co-hits strengthen a pair already tied in lockstep or by infrastructure;
        -- alone they are what two busy users of one popular prompt share by chance
        SELECT u, v, sum(w) AS weight, string_agg(DISTINCT tie, '; ' ORDER BY tie) AS ties
        FROM edges GROUP BY u, v
        HAVING count(*) FILTER (WHERE NOT daily) > 0 AND sum(w) >= {config.min_edge_weight}"""
    ).fetchall()
    graph = nx.Graph()
    for u, v, weight, ties in pairs:
        graph.add_edge(u, v, weight=weight, ties=ties)
    members = Communities()
    if graph.number_of_edges() == 0:
        return members
    members.edges = [(u, v, d["weight"], d["ties"]) for u, v, d in graph.edges(data=True)]
    found = nx.community.louvain_communities(graph, weight="weight", seed=config.seed)
    for index, community in enumerate(sorted(found, key=len, reverse=True)):
        # Louvain places every node somewhere: an account whose only tie is one edge into a
        # campaign lands in it. Members need ties to several others of their community.
        core = {
            account for account in community
            if sum(1 for other in graph[account] if other in community) >= config.min_ties
        }  # fmt: skip
        if len(core) >= config.min_community:
            for account in core:
                members[account] = index
            members.fringe |= community - core
    return members


class Communities(dict):
    """Each community member's community index; ``fringe``: the accounts Louvain placed in those
    communities with too few ties to be members (never flagged for it, but left out of a
    self-reference with the members: a quiet campaign's accounts that asked too little to be
    tied firmly are still the campaign's, and kept in the reference they make it look ordinary).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fringe: set[str] = set()
        #: the coordination graph's edges: ``(u, v, weight, what ties them)``
        self.edges: list[tuple[str, str, int, str]] = []


def _significant(found, ids, z, null, config) -> dict:
    """Each member's community and the community's p-value (``Null.community_p``: its members'
    median content score against unrelated accounts with a content reason), for the communities
    at most ``community_level``: the others are what ordinary accounts tied by chance (an office's
    address, a popular template, an organisation's pipelines) look like."""
    content = content_score(z)
    members: dict[int, list[int]] = {}
    for row, account in enumerate(ids):
        if account in found:
            members.setdefault(found[account], []).append(row)
    kept = {}
    for index, rows in members.items():
        p = null.community_p(float(np.median(content[rows])), len(rows))
        if p <= config.community_level:
            kept.update({ids[row]: (index, p) for row in rows})
    return kept


def _assemble(features, scores, z, communities, threshold) -> pa.Table:
    """The accounts table. Members of a significant community are flagged when they have a
    content reason of their own (``signals.content_reason``): a community does not turn an
    account with none into a campaign's, and an ordinary account tied to one by chance is not
    flagged with it."""
    accounts = features["account_id"].to_pylist()
    community = np.array([communities.get(a, (-1, 1.0))[0] for a in accounts])
    final = scores.copy()
    pooled = (community >= 0) & content_reason(z)
    final[pooled] = np.maximum(final[pooled], threshold)
    flagged = final >= threshold
    reasons = []
    for row in range(len(accounts)):
        fired = [
            f"{name} {features[name][row].as_py():.3g} (p {math.exp(-z[name][row]):.2g})"
            for name in sorted(SIGNALS, key=lambda s: -WEIGHTS[s] * z[s][row])
            if z[name][row] >= REASON
        ]
        if community[row] >= 0:
            fired.append(
                f"coordinated with {int((community == community[row]).sum()) - 1} accounts "
                f"(community p {communities[accounts[row]][1]:.2g})"
            )
        examples = features["examples"][row].as_py() or []
        if examples:
            fired.append("e.g. " + " | ".join(e[:80] for e in examples))
        reasons.append("; ".join(fired))
    sizes = np.bincount(community + 1)
    cluster_ids = [
        f"c{community[i]}" if community[i] >= 0 and flagged[i] else None
        for i in range(len(accounts))
    ]
    return pa.table(
        {
            "account_id": accounts,
            "score": final,
            "flagged": flagged,
            "cluster_id": pa.array(cluster_ids, pa.string()),
            "reasons": reasons,
            "requests": features["requests"],
            "first_seen": features["first_seen"],
            "community_size": np.where(community >= 0, sizes[community + 1], 0),
            "community_p": [communities.get(a, (-1, 1.0))[1] for a in accounts],
            **{f"signal_{name}": features[name] for name in SIGNALS},
            # each signal's evidence, -ln p: what a learned scorer reads (detect.learned)
            **{f"evidence_{name}": z[name] for name in SIGNALS},
        }
    )


def _write(out: Path, table: pa.Table, con, communities, config, edges=()) -> None:
    from distillscope.gateway.keys import Block, write_block_list

    pq.write_table(table, out / "accounts.parquet")
    rows = table.to_pylist()
    cluster_of = {row["account_id"]: row["cluster_id"] for row in rows if row["cluster_id"]}
    inside = [
        e for e in edges if cluster_of.get(e[0]) and cluster_of.get(e[0]) == cluster_of.get(e[1])
    ]
    pq.write_table(
        pa.table(
            {
                "cluster_id": pa.array([cluster_of[e[0]] for e in inside], pa.string()),
                "u": pa.array([e[0] for e in inside], pa.string()),
                "v": pa.array([e[1] for e in inside], pa.string()),
                "weight": pa.array([int(e[2]) for e in inside], pa.int64()),
                "ties": pa.array([e[3] for e in inside], pa.string()),
            }
        ),
        out / "edges.parquet",
    )
    clusters: dict[str, list[dict]] = {}
    for row in rows:
        if row["cluster_id"]:
            clusters.setdefault(row["cluster_id"], []).append(row)
    pq.write_table(
        pa.table(
            {
                "cluster_id": list(clusters),
                "accounts": [len(m) for m in clusters.values()],
                "requests": [sum(r["requests"] for r in m) for m in clusters.values()],
                "median_score": [
                    float(np.median([r["score"] for r in m])) for m in clusters.values()
                ],
                "example_reasons": [m[0]["reasons"][:500] for m in clusters.values()],
            }
        ),
        out / "clusters.parquet",
    )
    baseline = table.select(["account_id", "requests", "first_seen"])
    per_day = np.asarray(table["requests"].to_numpy(), dtype=float)
    pq.write_table(
        baseline.append_column("score", pa.array(per_day))
        .append_column("flagged", pa.array(per_day >= np.percentile(per_day, 99.9)))
        .append_column("cluster_id", pa.array([None] * len(per_day), pa.string()))
        .append_column("reasons", pa.array(["volume only"] * len(per_day))),
        out / "baseline.parquet",
    )
    write_block_list(
        out / "blocklist.txt",
        [
            Block("account", r["account_id"], f"detector score {r['score']:.1f}")
            for r in rows
            if r["flagged"]
        ],
    )


def _report(out: Path, table: pa.Table, summary: DetectionSummary, con, threshold: float) -> None:
    """report.html (and the report.json it is rendered from): see ``report.detection``."""
    from datetime import timedelta

    from distillscope.report.detection import detection_page, write_detection_report

    con.register("report_accounts", table.filter(table["flagged"]).select(["account_id"]))
    per_day = con.execute(
        """SELECT x.account_id, x.ts::DATE, count(*) FROM x JOIN report_accounts USING (account_id)
           GROUP BY ALL"""
    ).fetchall()
    timeline: dict[str, dict] = {}
    for account, day, n in per_day:
        timeline.setdefault(account, {})[day] = n
    first, last = con.execute("SELECT min(ts)::DATE, max(ts)::DATE FROM x").fetchall()[0]
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    page = detection_page(table, asdict(summary), threshold, timeline, days)
    write_detection_report(out, page)


def daily_first_flags(
    log: str | os.PathLike, out: str | os.PathLike, *, every_hours: float = 24.0, **kwargs
) -> int:
    """Replay a periodic job over ``log``: detection re-run on the log cut every ``every_hours``
    from the first midnight (what ``--until`` does in production), and the first cut that flagged
    each account written to ``out/accounts.parquet`` as ``first_flagged_at`` (null if no run
    flagged it). ``out`` must hold a ``detect`` run on the whole log. Returns the number of runs."""
    from datetime import timedelta

    if every_hours <= 0:
        raise DetectError(f"the replay's period must be positive, not {every_hours} h")
    out = Path(out)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    source = _source(con, log_target(log))
    first_ts, last_ts = con.execute(
        f"SELECT min(ts)::VARCHAR, max(ts)::VARCHAR FROM {source}"
    ).fetchall()[0]
    start = datetime.fromisoformat(first_ts).replace(hour=0, minute=0, second=0, microsecond=0)
    end = datetime.fromisoformat(last_ts)
    step = timedelta(hours=every_hours)
    first: dict[str, datetime] = {}
    runs = 0
    while start + runs * step <= end:
        runs += 1
        until = start + runs * step
        try:
            run = detect(log, out / "replay" / f"run-{runs:03d}", until=until, **kwargs)
        except DetectError:
            continue  # nothing to score yet
        flags = pq.read_table(Path(run.out) / "accounts.parquet", columns=["account_id", "flagged"])
        for account, hit in zip(flags["account_id"].to_pylist(), flags["flagged"].to_pylist()):
            if hit and account not in first:
                first[account] = until
    table = pq.read_table(out / "accounts.parquet")
    if "first_flagged_at" in table.column_names:
        table = table.drop_columns(["first_flagged_at"])
    stamps = [first.get(a) for a in table["account_id"].to_pylist()]
    table = table.append_column("first_flagged_at", pa.array(stamps, pa.timestamp("us", tz="UTC")))
    pq.write_table(table, out / "accounts.parquet")
    return runs
