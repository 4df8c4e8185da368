"""Find distillation campaigns in a traffic log: per-account signals, a coordination graph, flags.

The heavy work is relational (SQL over the gateway's ``exchanges`` table, one text run on DuckDB
or on Spark: ``detect.engine``): prompt normalisation, word-shingle MinHash with
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

import functools
import itertools
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distillscope.detect.elicitation import VERSION as ELICITATION_VERSION
from distillscope.detect.engine import DuckEngine, Engine, EngineError, open_engine, quote
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
from distillscope.detect.state import (
    TABLES,
    DetectState,
    StateError,
    complete_days,
    fingerprint,
)
from distillscope.errors import DistillscopeError
from distillscope.paths import is_database_url, masked_url


class DetectError(DistillscopeError):
    """A log the detector cannot read at all."""


def _words(alternatives: str) -> str:
    """A regular expression matching any of ``alternatives`` as whole (lower-case ASCII) words.
    Not ``\\b``: DuckDB's RE2 counts only ASCII letters as word characters and Java's (Spark)
    counts every letter, so "某python包" holds the word "python" on one engine and not on the
    other. An explicit ASCII boundary reads the same on both (RE2 has no look-arounds)."""
    return f"(^|[^a-z0-9_])({alternatives})([^a-z0-9_]|$)"


_CAPABILITIES = {
    "coding": _words("code|function|python|javascript|bug|implement|refactor|script|class|sql|"
                     "compile|unit test|repository|stack trace"),
    "tools": _words("tool|function call|json schema|api call|agent|invoke|arguments"),
    "reasoning": _words("prove|solve|calculate|puzzle|logic|equation|probability|derive"),
}  # fmt: skip
_AUTOMATION_UA = (
    r"python-requests|httpx|aiohttp|curl/|go-http-client|okhttp|node-fetch|axios|scrapy"
)
_REQUIRED = ("account_id", "ts")
#: A tool offered in a request's messages: `"name": "search_flights", "parameters": ...` (or
#: `input_schema`) in a tools list, quotes escaped or not (a system message carrying the list as
#: JSON text inside the JSON messages); a name without a schema is somebody's data.
_TOOL_NAME = (
    # JSON's whitespace spelled out: \\s differs between RE2 and Java (the vertical tab)
    r'name\\?"[ \t\n\r]*:[ \t\n\r]*\\?"([A-Za-z_][A-Za-z0-9_.-]*)\\?"[ \t\n\r]*,[ \t\n\r]*'
    r'\\?"(?:parameters|input_schema)'
)


#: SQL: a prompt normalised (lower case, digits as 0, other symbols as spaces).
_NORM = """trim({{ replace_all(replace_all('lower(prompt)', "'[0-9]+'", "'0'"),
                            "'[^a-z0 ]+'", "' '") }})"""


def _offered(columns) -> str:
    """SQL: the text a request's tools are read from: its messages, and the ``tools`` column of
    a gateway log that has one."""
    if "tools" not in columns:
        return "messages"
    return "(coalesce(tools, '') || coalesce(messages, ''))"


#: SQL (with the engine's macros, given ``offered`` and ``tool_name``): the request's tool
#: catalogue, a hash of the sorted set of tool names its messages offer (null when none).
_CATALOGUE = """CASE WHEN {{ offered }} LIKE '%name%'
      AND {{ size(sorted_set(extract_all(offered, tool_name, 1))) }} > 0
    THEN {{ hash64(join(sorted_set(extract_all(offered, tool_name, 1)), "','")) }} END"""


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
    engine: str | Engine = "duckdb",
    master: str | None = None,
    state: str | os.PathLike | None = None,
    rebuild: bool = False,
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

    ``engine`` runs the relational steps on DuckDB in this process (the default) or on Apache
    Spark (``"spark"``, ``master`` a ``local[N]`` or cluster URL; or an open ``Engine``): the
    same SQL, the same flags (``detect.engine``).

    ``state`` (a folder) makes the run incremental (``detect.state``): only the days the state
    does not hold are read from the log, the complete ones are stored, and every account is
    scored as one run over the whole log would score it. ``rebuild`` empties the state first.
    """
    began = time.perf_counter()
    if scorer is not None and not isinstance(scorer, LearnedScorer):
        scorer = LearnedScorer.load(scorer)
    config = config or DetectConfig()
    if reference is not None and not isinstance(reference, Reference):
        reference = Reference.load(reference)
    kept = None
    if state is not None:
        try:
            kept = DetectState.open(state, state_settings(config), rebuild=rebuild)
        except StateError as exc:
            raise DetectError(str(exc)) from None
    elif rebuild:
        raise DetectError("--rebuild rebuilds a --state folder: give one")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eng = _engine(engine, master)
    try:
        return _detect(eng, log, out, accounts, events, banned, until, since, reference, scorer,
                       config, began, kept)  # fmt: skip
    finally:
        if not isinstance(engine, Engine):
            eng.close()


def _engine(engine: str | Engine, master: str | None) -> Engine:
    if isinstance(engine, Engine):
        return engine
    try:
        return open_engine(engine, master=master)
    except EngineError as exc:
        raise DetectError(str(exc)) from None


def _detect(con, log, out, accounts, events, banned, until, since, reference, scorer, config,
            began, state=None) -> DetectionSummary:  # fmt: skip
    features, measured, skipped, notes, n = _prepare(
        con, log_target(log), accounts, events, banned, until, config, state
    )
    if con.name != "duckdb":
        notes.append(f"relational steps run on {con.name} ({getattr(con, 'master', '')})")
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
    eliciting = [a for a, e in zip(ids, z["elicitation"]) if e >= ASKS]
    communities = _communities(
        con, suspects, [a for a, r in zip(ids, reasoned) if r], config, eliciting
    )
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
        trimmed |= _intent_companions(con, trimmed)
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


def _intent_companions(con: Engine, found: set[str]) -> set[str]:
    """Accounts holding an intent most of whose holders are in ``found``: a large campaign's
    quieter accounts, too loosely tied to join its community, that ask for the same thing. Left
    out of the reference (never flagged for it): kept there, they make the campaign's own asks
    look ordinary, and a second campaign's community look like the crowd."""
    if not found or not con.has("intents"):
        return set()
    con.register("found", pa.table({"account_id": pa.array(sorted(found), pa.string())}))
    rows = con.fetch(
        """WITH held AS (
             SELECT intent FROM intents GROUP BY intent
             HAVING count(*) FILTER (WHERE account_id IN (SELECT account_id FROM found))
                    > count(*) / 2)
           SELECT DISTINCT account_id FROM intents
           WHERE intent IN (SELECT intent FROM held)
           ORDER BY account_id"""
    )
    con.drop("found")
    return set(rows["account_id"].to_pylist())


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
    engine: str | Engine = "duckdb",
    master: str | None = None,
) -> Reference:
    """Fit every signal on the accounts of ``log`` (earlier traffic: last week's, say), leaving
    out ``exclude``d accounts (those its detection run flagged or that were banned), and save it
    to ``out`` when given. ``detect(..., reference=)`` then scores new traffic against it.

    Fit on traffic of about the span the scored logs will have: template and IP sharing grow with
    the number of accounts a log holds.
    """
    config = config or DetectConfig()
    con = _engine(engine, master)
    try:
        features, measured, _, _, n = _prepare(
            con, log_target(log), accounts, events, banned, until, config
        )
    finally:
        if not isinstance(engine, Engine):
            con.close()
    reference = Reference.fit(features, measured, exclude=exclude, exchanges=n, source=str(log))
    if out is not None:
        reference.save(out)
    return reference


def _prepare(con: Engine, log, accounts, events, banned, until, config: DetectConfig,
             state: DetectState | None = None):  # fmt: skip
    """Load ``log`` into ``con`` and compute every account's signals: the features table, the
    signals measured, rows skipped, notes, and the number of usable exchanges.

    The loaded exchanges are first digested per day (``_digest``: per-prompt and per-account
    summaries, ``detect.state``); every signal is then computed from the digests (``_merge``,
    ``_features``). With a ``state``, only the days it does not hold are read from the log, and
    the complete ones among them are stored; without one the whole log is digested and nothing
    is kept. Either way the same digests give the same signals."""
    start, used = None, []
    if state is not None:
        used = state.usable(until)
        start = used[-1] + timedelta(days=1) if used else None
        for table in TABLES:
            if not con.read_days(f"s_{table}", state.path(table), start):
                con.drop(f"s_{table}")
    skipped, missing, notes = _load(con, log, until, start)
    loaded = con.scalar("SELECT count(*) FROM x")
    if loaded == 0 and not used:
        raise DetectError(f"{log}: no usable exchanges ({_describe(skipped)})")
    if events is not None and Path(events).exists():
        con.read_parquet("events", events)
    else:
        con.drop("events")
    _digest(con, config)
    if state is not None:
        days = [row["day"] for row in con.fetch("SELECT DISTINCT day FROM x").to_pylist()]
        stored = complete_days(days, until, start)
        if any(start is None or d >= start for d in state.days):
            # a cut before the state's last day: the later days' digests assume these days as
            # they were, so nothing is rewritten
            stored = []
            notes.append("the state holds days after this cut: it is read, not changed")
        if state.log and state.log != str(log):
            notes.append(f"the state was built from {state.log}, not from this log")
        if stored:
            for table in TABLES:
                if con.has(f"d_{table}"):
                    con.write_days(f"d_{table}", state.path(table), stored)
            state.hold(stored, str(log))
        notes.append(
            f"incremental: {len(used)} day(s) from the state in {state.folder}, "
            f"{loaded:,} exchanges read from the log"
            + (f", {len(stored)} day(s) stored" if stored else "")
        )
    con.drop("x")
    _merge(con, config)
    n = int(con.scalar("SELECT CAST(coalesce(sum(n), 0) AS BIGINT) FROM a_activity"))
    if not n:
        raise DetectError(f"{log}: no usable exchanges ({_describe(skipped)})")
    if config.paraphrase:
        if not isinstance(con, DuckEngine):
            raise DetectError("--paraphrase runs on the duckdb engine only")
        _paraphrase(con, config, notes)
    _intents(con, config)
    features, absent = _features(con, accounts, banned, notes)
    if not con.has("events"):
        absent.add("events")
        notes.append("no model-release events given: the pivot signal is skipped")
    return features, measured_signals(missing | absent), skipped, notes, n


def state_settings(config: DetectConfig) -> str:
    """What the stored digests depend on (``detect.state``): a state built with other values
    is refused."""
    keys = ("permutations", "bands", "shingle_words", "frame_words", "whole_words",
            "min_template_words", "edge_words", "window_minutes", "seed")  # fmt: skip
    return fingerprint(
        {
            **{k: getattr(config, k) for k in keys},
            "capabilities": _CAPABILITIES,
            "automation": _AUTOMATION_UA,
            "normalise": _NORM,
            "catalogue": [_CATALOGUE, _TOOL_NAME],
            "classifier": ELICITATION_VERSION,
        }
    )


def _describe(skipped: dict[str, int]) -> str:
    return ", ".join(f"{v} rows {k}" for k, v in skipped.items() if v) or "the log is empty"


def _load(
    con: Engine, log, until: datetime | None, start=None
) -> tuple[dict[str, int], set[str], list[str]]:
    """The clean exchanges as table ``x`` (with ``norm``, the normalised prompt); rows that
    cannot be used are counted, not fatal. Returns the skipped-row counts, the optional columns
    the log lacks, and notes."""
    held: list[str] = []
    for table in ("cohits", "conodes", "coips", "cocats"):  # an engine reused: the last run's keys
        con.drop(table)
    _source(con, log, held)
    try:
        columns = con.columns("src_exchanges")
    except Exception as exc:  # noqa: BLE001 -- an unreadable file, whichever engine says so
        raise DetectError(f"cannot read {log}: {str(exc).splitlines()[0]}") from None
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        raise DetectError(f"{log} has no {', '.join(missing)} column: nothing to score by")
    notes, absent = held, set()

    def col(name: str) -> str:
        if name in columns:
            return name
        absent.add(name)
        notes.append(f"column {name} missing: the signals that need it are skipped")
        return f"CAST(NULL AS STRING) AS {name}"

    ts = "ts" if "TIMESTAMP" in columns["ts"] else "{{ to_timestamp('ts') }}"
    if "messages" not in columns:
        absent.add("messages")
    con.create(
        "raw",
        f"""SELECT CAST(account_id AS STRING) AS account_id, {ts} AS ts,
            {col("prompt")}, {col("model")}, {col("client_ip")}, {col("user_agent")},
            {col("exposure_requested")}, {"status" if "status" in columns else "200 AS status"},
            {_CATALOGUE if "messages" in columns else "CAST(NULL AS BIGINT)"} AS catalogue
        FROM src_exchanges {_window(ts, until, start)}""",
        offered=_offered(columns),
        tool_name=f"'{_TOOL_NAME}'",
    )
    counts = con.fetch(
        """SELECT count(*) FILTER (WHERE account_id IS NULL OR account_id = '') AS a,
                  count(*) FILTER (WHERE ts IS NULL) AS b,
                  count(*) FILTER (WHERE prompt IS NULL OR trim(prompt) = '') AS c
           FROM raw"""
    ).to_pylist()[0]
    skipped = {"without account": counts["a"], "with a bad timestamp": counts["b"],
               "with an empty prompt": counts["c"]}  # fmt: skip
    con.create(
        "x",
        f"""SELECT {{{{ row_id() }}}} AS rid, *,
              {_NORM} AS norm
        FROM raw
        WHERE account_id IS NOT NULL AND account_id <> '' AND ts IS NOT NULL
          AND prompt IS NOT NULL AND trim(prompt) <> ''""",
    )
    con.drop("raw")
    return skipped, absent, notes


def _window(ts: str, until: datetime | None, start) -> str:
    """SQL: the WHERE of the rows to read, on the source's own ``ts`` (so a Parquet reader skips
    row groups outside it): before ``until``; from ``start`` (a day) when the days before are in
    the state. A full read keeps the rows without a usable time, to count them as skipped."""
    bounds = []
    if until is not None:
        bounds.append(f"{ts} < CAST('{_utc_text(until)}' AS TIMESTAMP)")
    if start is not None:
        bounds.append(f"{ts} >= CAST('{start.isoformat()} 00:00:00' AS TIMESTAMP)")
        return "WHERE " + " AND ".join(bounds)
    return f"WHERE {ts} IS NULL OR {bounds[0]}" if bounds else ""


def _utc_text(moment: datetime) -> str:
    """``moment`` as UTC wall-clock text (a naive one is taken to be UTC already)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(sep=" ")


def log_target(log: str | os.PathLike) -> str | Path:
    """A traffic log as ``_source`` takes it: a ``postgresql://`` URL stays a string."""
    return str(log) if is_database_url(log) else Path(log)


def _source(con: Engine, log: str | Path, notes: list[str] | None = None) -> None:
    """Table ``src_exchanges``: a log's exchanges. A gateway DuckDB file (read-only; while a
    running gateway holds it, the hourly Parquet segments it writes beside it, with a note),
    Parquet (a file, or a folder whose every Parquet file, at any depth, is traffic: exported
    segments, partitioned by day or not), or a gateway's PostgreSQL log (read once, while the
    gateway goes on writing). Parquet is read by the engine itself (on Spark, by its
    executors); a DuckDB file or PostgreSQL log is read here and handed to it."""
    if isinstance(log, str):
        from distillscope.gateway.traffic import TrafficLogError, read_traffic

        try:
            table = read_traffic(log)
        except TrafficLogError as exc:
            raise DetectError(f"cannot read the traffic log {masked_url(log)}: {exc}") from None
        con.register("src_exchanges", table)
        return
    if not log.exists():
        raise DetectError(f"no traffic log at {log}")
    if log.is_dir():
        if not any(log.rglob("*.parquet")):
            raise DetectError(f"{log} holds no Parquet files")
        con.read_parquet("src_exchanges", log)
        return
    if log.suffix != ".duckdb":
        con.read_parquet("src_exchanges", log)
        return
    if isinstance(con, DuckEngine):
        try:
            con.con.execute(f"ATTACH '{quote(log)}' AS src (READ_ONLY)")
            con.con.execute("CREATE OR REPLACE VIEW src_exchanges AS SELECT * FROM src.exchanges")
            return
        except duckdb.Error as exc:
            error = exc
    else:
        try:
            with duckdb.connect(str(log), read_only=True) as db:
                table = db.sql("SELECT * FROM exchanges").to_arrow_table()
            con.register("src_exchanges", table)
            return
        except duckdb.Error as exc:
            error = exc
    # held by a gateway (its lock, or in this process its handle)
    from distillscope.gateway.traffic import held_log_segments

    found = held_log_segments(log)
    if found is None:
        raise DetectError(
            f"cannot open {log}: {str(error).splitlines()[0]} (a running gateway holds its "
            "DuckDB file; it writes hourly segments beside it, and none is there yet)"
        ) from None
    folder, note = found
    if notes is not None:
        notes.append(note)
    con.read_parquet("src_exchanges", folder)


def _digest(con: Engine, config: DetectConfig) -> None:
    """The loaded exchanges ``x`` as per-day digests ``d_<table>`` (``detect.state.TABLES``):
    the prompts not seen before (``s_prompts``, the state's, when there is one) with what is
    read from their text once (capability, elicitation, their ends, their LSH buckets), and per
    day what each account did (which prompts, when, from where, with which tools)."""
    con.create(
        "x",
        """SELECT *, CAST(ts AS DATE) AS day, {{ hash64('prompt') }} AS qid,
                  {{ hash64('norm') }} AS pid FROM x""",
    )
    known = "WHERE NOT EXISTS (SELECT 1 FROM s_prompts s WHERE s.qid = x.qid)"
    con.create(
        "fresh_prompts",
        f"""SELECT qid, min(day) AS day, min(pid) AS pid, min(prompt) AS prompt,
                   min(norm) AS norm
            FROM x {known if con.has("s_prompts") else ""} GROUP BY qid""",
    )
    capability = " ".join(
        f"WHEN {{{{ matches('lower(prompt)', {name}) }}}} THEN '{name}'" for name in _CAPABILITIES
    )
    # an account's own template: the same first (or last) words round many of its prompts (an
    # integration wrapping its users' text in its own instruction); exact words, not MinHash
    con.create(
        "fresh_prompts",
        f"""SELECT qid, day, pid, prompt, norm,
              CASE {capability} ELSE 'other' END AS capability,
              CASE WHEN {{{{ size('w') }}}} >= {{{{ 2 * e }}}} THEN {{{{ hash64(
                "'first ' || " ~ join(slice('w', 1, e), "' '")) }}}} END AS edge_a,
              CASE WHEN {{{{ size('w') }}}} >= {{{{ 2 * e }}}} THEN {{{{ hash64(
                "'last ' || " ~ join(slice('w', -e, e), "' '")) }}}} END AS edge_b
            FROM (SELECT *, {{{{ words('norm') }}}} AS w FROM fresh_prompts) AS q""",
        e=config.edge_words,
        **{name: f"'{pattern}'" for name, pattern in _CAPABILITIES.items()},
    )
    _elicitation(con)
    _buckets(con, config)
    con.create(
        "d_prompts",
        f"SELECT {TABLES['prompts']}, day FROM fresh_prompts JOIN elicited USING (qid)",
    )
    con.drop("fresh_prompts")
    con.drop("elicited")
    con.create(
        "d_uses",
        """SELECT account_id, qid, count(*) AS n, min(ts) AS first_ts, day
           FROM x GROUP BY account_id, qid, day""",
    )
    con.create(
        "d_slots",
        """SELECT DISTINCT account_id, pid,
                  {{ idiv(epoch_us('ts'), 60000000 * window) }} AS slot, day FROM x""",
        window=config.window_minutes,
    )
    # each day's gaps between an account's requests, as moments (count, mean, sum of squared
    # deviations) that merge exactly across days (``_merge``)
    con.create(
        "d_activity",
        """SELECT account_id, count(*) AS n, min(ts) AS first_ts, max(ts) AS last_ts,
                  count(gap) AS gaps, coalesce(avg(gap), 0.0) AS gap_mean,
                  coalesce(var_pop(gap) * count(gap), 0.0) AS gap_m2,
                  CAST(sum(CAST(coalesce({{ matches('lower(user_agent)', ua) }}, false) AS INT))
                       AS BIGINT) AS automation_ua,
                  CAST(sum(CAST(coalesce(exposure_requested, 'text') <> 'text' AS INT))
                       AS BIGINT) AS logprobs,
                  day
           FROM (SELECT *, ({{ epoch_us('ts') }} - lag({{ epoch_us('ts') }}) OVER (
                             PARTITION BY account_id, day ORDER BY ts, rid)) / 1e6 AS gap
                 FROM x) AS q
           GROUP BY account_id, day""",
        ua=f"'{_AUTOMATION_UA}'",
    )
    con.create(
        "d_hours",
        "SELECT account_id, hour(ts) AS hour, count(*) AS n, day FROM x "
        "GROUP BY account_id, hour(ts), day",
    )
    con.create(
        "d_ips",
        "SELECT DISTINCT account_id, client_ip, day FROM x WHERE client_ip IS NOT NULL",
    )
    con.create(
        "d_cats",
        "SELECT DISTINCT account_id, catalogue, day FROM x WHERE catalogue IS NOT NULL",
    )
    if con.has("events"):
        con.create(
            "d_pivots",
            """SELECT x.account_id, CAST(sum(CAST(x.model = e.name AS INT)) AS BIGINT) AS hits,
                      count(*) AS trials, x.day
               FROM x JOIN events e ON x.ts >= e.time AND x.ts < e.time + INTERVAL 24 HOUR
               GROUP BY x.account_id, x.day""",
        )
    else:
        con.drop("d_pivots")


def _buckets(con: Engine, config: DetectConfig) -> None:
    """``d_buckets``: the LSH buckets of the normalised prompts new to the state.

    Three views of each are hashed: the whole prompt, its first and its last ``frame_words``
    words. A template that wraps long slot content (an instruction around a pasted document)
    shares little with its siblings as a whole but its frame is nearly identical.
    """
    rows = config.permutations // config.bands
    known = "WHERE NOT EXISTS (SELECT 1 FROM s_prompts s WHERE s.pid = f.pid)"
    con.create(
        "p",
        f"""SELECT pid, min(norm) AS norm, min(day) AS day FROM fresh_prompts f
            {known if con.has("s_prompts") else ""} GROUP BY pid""",
    )
    k, f = config.shingle_words, config.frame_words
    con.create(
        "sh",
        """WITH words AS (SELECT pid, {{ words('norm') }} AS w FROM p),
        views AS (
          SELECT pid, 0 AS view, {{ slice('w', 1, whole) }} AS w FROM words
          WHERE {{ size('w') }} >= {{ shortest }}
          UNION ALL SELECT pid, 1, {{ slice('w', 1, f) }} FROM words
          WHERE {{ size('w') }} > {{ 2 * f }}
          UNION ALL SELECT pid, 2, {{ slice('w', -f, f) }} FROM words
          WHERE {{ size('w') }} > {{ 2 * f }}),
        shingles AS (
          SELECT pid, view, {{ slice('w', 'i', k) }} AS s
          FROM (SELECT pid, view, w, {{ series(1, size('w') ~ ' - ' ~ (k - 1)) }} AS i
                FROM views WHERE {{ size('w') }} >= {{ k }}) AS q)
        SELECT pid, view, {{ hash64(join('s', "' '")) }} % 2147483647 AS h FROM shingles""",
        whole=config.whole_words, shortest=config.min_template_words, f=f, k=k,
    )  # fmt: skip
    con.map_batches(
        "mh",
        "SELECT pid, view, h FROM sh",
        lambda batches: _minhashes(batches, config),
        _MINHASH_SCHEMA,
        partition_by="pid",
        order_by="pid, view",
    )
    con.drop("sh")
    con.create(
        "d_buckets",
        """SELECT q.pid, {{ hash64("CAST(band AS STRING) || ':' || key") }} AS bucket, p.day
           FROM (SELECT pid, view * 1000 + {{ idiv('i', rows) }} AS band,
                        {{ agg_ordered('m', 'i', "','") }} AS key
                 FROM mh GROUP BY pid, view, {{ idiv('i', rows) }}) AS q
           JOIN p ON p.pid = q.pid""",
        rows=rows,
    )
    con.drop("mh")
    con.drop("p")


#: The Mersenne prime the MinHash permutations ``(a * h + b) % p`` work modulo.
_PRIME = 2147483647
_MINHASH_SCHEMA = pa.schema(
    [("pid", pa.int64()), ("view", pa.int64()), ("i", pa.int64()), ("m", pa.int64())]
)


def _minhashes(batches, config: DetectConfig):
    """``(pid, view, i, m)`` batches: each view's minimum over its shingle hashes ``h`` of the
    i-th permutation ``(a_i * h + b_i) % p``, from ``(pid, view, h)`` batches in which each
    (pid, view) is contiguous (it may straddle two batches). One vectorised pass per
    permutation in numpy (``np.minimum.reduceat``): the same values as SQL's
    ``min(...) FROM sh, perms GROUP BY pid, view, i``, which joined 16M shingles with 32
    permutations at 1M exchanges and took 83 of the detector's 237 s. Both engines run this
    function: DuckDB in this process, Spark in its executors."""
    rng = np.random.default_rng(config.seed)
    a = rng.integers(1, _PRIME, config.permutations)
    b = rng.integers(0, _PRIME, config.permutations)
    n = config.permutations
    held = None
    for batch in itertools.chain(batches, [None]):  # streamed: a partition is never whole
        if batch is not None:
            part = [np.asarray(batch.column(c).to_numpy(zero_copy_only=False), dtype=np.int64)
                    for c in ("pid", "view", "h")]  # fmt: skip
            if held is not None:
                part = [np.concatenate([x, y]) for x, y in zip(held, part)]
            pid, view, h = part
            if len(h) == 0:
                continue
            # the last group may go on in the next batch: keep it back
            last = (pid == pid[-1]) & (view == view[-1])
            cut = len(h) - int(np.argmin(last[::-1])) if not last.all() else 0
            held = [x[cut:] for x in part]
            pid, view, h = (x[:cut] for x in part)
        elif held is not None and len(held[0]):
            pid, view, h = held
        else:
            return
        if len(h) == 0:
            continue
        group = np.r_[True, (pid[1:] != pid[:-1]) | (view[1:] != view[:-1])]
        starts = np.flatnonzero(group)
        m = np.empty((len(starts), n), dtype=np.int64)
        for i in range(n):
            m[:, i] = np.minimum.reduceat((a[i] * h + b[i]) % _PRIME, starts)
        yield pa.RecordBatch.from_pydict(
            {
                "pid": np.repeat(pid[starts], n),
                "view": np.repeat(view[starts], n),
                "i": np.tile(np.arange(n, dtype=np.int64), len(starts)),
                "m": m.ravel(),
            },
            schema=_MINHASH_SCHEMA,
        )


_ELICITED_SCHEMA = pa.schema([("qid", pa.int64()), ("elicits", pa.bool_())])


def _classify(batches, classifier):
    """``(qid, elicits)`` batches for ``(qid, prompt)`` batches: the elicitation classifier (run
    in this process on DuckDB, in Spark's executors on Spark)."""
    for batch in batches:
        prompts = batch.column("prompt").to_pylist()
        if not prompts:
            continue
        texts = [p if len(p) <= 4000 else p[:2000] + "\n" + p[-2000:] for p in prompts]
        proba = classifier.predict_proba(texts)
        yield pa.RecordBatch.from_pydict(
            {"qid": batch.column("qid"), "elicits": proba >= 0.5}, schema=_ELICITED_SCHEMA
        )


def _elicitation(con: Engine) -> None:
    """Table ``elicited(qid, elicits)``: whether each new prompt asks to see the reasoning or a
    narrated trace (``detect.elicitation``)."""
    from distillscope.detect.elicitation import ElicitationClassifier

    classifier = ElicitationClassifier.default()
    con.map_batches(
        "elicited",
        "SELECT qid, prompt FROM fresh_prompts",
        functools.partial(_classify, classifier=classifier),  # picklable: several processes
        _ELICITED_SCHEMA,
    )


def _merge(con: Engine, config: DetectConfig) -> None:
    """The stored digests (``s_<table>``) and the new ones (``d_<table>``) as ``a_<table>``,
    then what the signals read across all of it:

    - ``templates``: an LSH bucket (no transitive chaining: near-duplicates of near-duplicates
      are not merged into one giant component) holding at least ``min_template_variants``
      prompts from ``min_template_accounts`` accounts; each prompt's template is the least of
      its buckets that is one;
    - ``ua``: one row per account and prompt over all days: requests, first time, the prompt's
      template, the account's own frame round it (its first or last words shared with
      ``min_template_variants`` of the account's prompts: one task), and ``fresh`` (no other
      account sent the same normalised prompt: a public test set that several harnesses send
      asks for reasoning too, but a harvest wants fresh tasks).
    """
    for table, columns in TABLES.items():
        parts = [f"SELECT {columns}, day FROM {kind}_{table}"
                 for kind in ("d", "s") if con.has(f"{kind}_{table}")]  # fmt: skip
        if parts:
            con.create(f"a_{table}", " UNION ALL ".join(parts))
        else:
            con.drop(f"a_{table}")
        con.drop(f"d_{table}")
        con.drop(f"s_{table}")
    con.create(
        "up",
        """SELECT u.account_id, u.qid, u.n, u.first_ts, p.pid, p.prompt, p.elicits,
                  p.capability, p.edge_a, p.edge_b
           FROM (SELECT account_id, qid, sum(n) AS n, min(first_ts) AS first_ts
                 FROM a_uses GROUP BY account_id, qid) AS u
           JOIN a_prompts p ON p.qid = u.qid""",
    )
    # most buckets hold one prompt: only those with enough variants are joined with the uses.
    # A bucket holds a prompt once (each prompt is bucketed on the day it is first seen, each
    # band's bucket is its own), so its rows count its variants.
    con.create(
        "templates",
        """WITH candidates AS (
             SELECT bucket FROM a_buckets GROUP BY bucket HAVING count(*) >= {{ variants }}),
           held AS (SELECT b.bucket, b.pid FROM a_buckets b
                    JOIN candidates c ON c.bucket = b.bucket),
           per_prompt AS (SELECT pid, min(prompt) AS prompt, sum(n) AS n FROM up GROUP BY pid),
           sizes AS (SELECT h.bucket, count(*) AS variants, CAST(sum(p.n) AS BIGINT) AS requests,
                            min(p.prompt) AS example
                     FROM held h JOIN per_prompt p ON p.pid = h.pid
                     GROUP BY h.bucket HAVING count(*) >= {{ variants }}),
           users AS (SELECT bucket, count(*) AS accounts FROM (
                       SELECT DISTINCT h.bucket, up.account_id FROM held h
                       JOIN sizes s ON s.bucket = h.bucket JOIN up ON up.pid = h.pid) AS q
                     GROUP BY bucket HAVING count(*) >= {{ accounts }})
           SELECT s.bucket AS template, u.accounts, s.variants, s.requests, s.example
           FROM sizes s JOIN users u ON u.bucket = s.bucket""",
        accounts=config.min_template_accounts, variants=config.min_template_variants,
    )  # fmt: skip
    con.create(
        "assigned",
        """SELECT b.pid, min(b.bucket) AS template FROM a_buckets b
           JOIN templates t ON t.template = b.bucket GROUP BY b.pid""",
    )
    _assign(con, config)


def _assign(con: Engine, config: DetectConfig) -> None:
    """``ua``: ``up`` with each prompt's template (``assigned``), frame and freshness."""
    con.create(
        "ua",
        """WITH own AS (
             SELECT account_id, edge FROM (
               SELECT account_id, edge_a AS edge, pid FROM up WHERE edge_a IS NOT NULL
               UNION ALL SELECT account_id, edge_b, pid FROM up WHERE edge_b IS NOT NULL) AS q
             GROUP BY account_id, edge HAVING count(DISTINCT pid) >= {{ variants }}),
           shared AS (SELECT pid FROM up GROUP BY pid HAVING count(DISTINCT account_id) > 1)
        SELECT up.account_id, up.qid, up.n, up.first_ts, up.pid, up.prompt, up.elicits,
               up.capability, a.template, coalesce(o1.edge, o2.edge) AS frame,
               s.pid IS NULL AS fresh
        FROM up LEFT JOIN assigned a ON a.pid = up.pid
        LEFT JOIN own o1 ON o1.account_id = up.account_id AND o1.edge = up.edge_a
        LEFT JOIN own o2 ON o2.account_id = up.account_id AND o2.edge = up.edge_b
        LEFT JOIN shared s ON s.pid = up.pid""",
        variants=config.min_template_variants,
    )


def _paraphrase(con: DuckEngine, config: DetectConfig, notes: list[str]) -> None:
    """Reworded templates grouped by sentence embeddings (``detect.paraphrase``), added to
    ``assigned`` and ``templates``."""
    from distillscope.detect.paraphrase import paraphrase_templates

    con.create(
        "x",
        f"""SELECT account_id, pid, prompt, template, {_NORM} AS norm FROM ua""",
    )
    groups = paraphrase_templates(
        con.con, max_per_account=config.paraphrase_per_account, seed=config.seed
    )
    notes.append(f"{groups} paraphrase templates from sentence embeddings")
    con.create(
        "assigned",
        """SELECT pid, template FROM assigned UNION ALL
           SELECT pid, min(x.template) FROM x
           WHERE x.template IS NOT NULL AND pid NOT IN (SELECT pid FROM assigned)
           GROUP BY pid""",
    )
    con.drop("x")
    _assign(con, config)


def _intents(con: Engine, config: DetectConfig) -> None:
    """Table ``intents(account_id, intent)``: what each account that asks for reasoning asks
    about. Its distinct fresh elicitation prompts (up to ``intent_prompts``) are embedded
    (hashed word n-grams, tf-idf, a 64-dimensional SVD) and clustered (k-means); an account
    holds an intent when at least two of its prompts fall in that cluster. A campaign with no
    shared infrastructure still asks many accounts for the same kind of thing, worded
    differently each time; people asking for reasoning ask about whatever they are working on."""
    rows = con.fetch(
        """SELECT account_id, prompt FROM (
              SELECT account_id, prompt, row_number() OVER (
                       PARTITION BY account_id
                       ORDER BY {{ hash64("prompt || '" ~ seed ~ "'") }}, prompt) AS r
              FROM ua WHERE elicits AND fresh
                AND account_id IN (SELECT account_id FROM ua WHERE elicits AND fresh
                                   GROUP BY account_id HAVING count(*) >= 2)) AS q
            WHERE r <= {{ limit }} ORDER BY account_id, r""",
        seed=config.seed, limit=config.intent_prompts,
    )  # fmt: skip
    accounts = rows["account_id"].to_numpy(zero_copy_only=False)
    prompts = rows["prompt"].to_pylist()
    clusters = np.zeros(len(prompts), dtype=np.int64)
    if len(prompts) >= 20:
        from sklearn.cluster import MiniBatchKMeans
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
        from sklearn.preprocessing import normalize

        words = HashingVectorizer(
            ngram_range=(1, 2), n_features=2**18, alternate_sign=False, stop_words="english"
        ).transform([p[:1500] for p in prompts])
        # float32: the same clusters as float64 on the 1M log's 25k prompts, in half the time
        tfidf = TfidfTransformer(sublinear_tf=True).fit_transform(words).astype(np.float32)
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
        "embedded",
        pa.table({"account_id": pa.array(accounts, pa.string()),
                  "intent": pa.array(clusters, pa.int64())}),
    )  # fmt: skip
    con.create(
        "intents",
        """SELECT account_id, intent FROM embedded
           GROUP BY account_id, intent HAVING count(*) >= 2""",
    )
    con.drop("embedded")


def _features(con: Engine, accounts_meta, banned, notes) -> tuple[pa.Table, set[str]]:
    """One row per account from the merged digests: every signal's value (shares as their
    lower bound), plus volume and examples; and the side inputs (accounts, banned) not given."""
    absent = set()
    joins, extra = [], dict.fromkeys(("pivot", "fingerprint", "banned_link"), "CAST(0 AS DOUBLE)")
    if con.has("a_pivots"):
        joins.append(
            """LEFT JOIN (
                 SELECT account_id, sum(hits) / sum(trials) AS share FROM a_pivots
                 GROUP BY account_id HAVING sum(trials) >= 3) pv USING (account_id)"""
        )
        extra["pivot"] = "CAST(coalesce(pv.share, 0) AS DOUBLE)"
    if accounts_meta is not None and Path(accounts_meta).exists():
        con.read_parquet("meta", accounts_meta)
        joins.append(
            """LEFT JOIN (
                 SELECT CAST(account_id AS STRING) AS account_id,
                        count(*) OVER (PARTITION BY payment_fingerprint) - 1 AS n
                 FROM meta WHERE payment_fingerprint IS NOT NULL) fp USING (account_id)"""
        )
        extra["fingerprint"] = "CAST(coalesce(fp.n, 0) AS DOUBLE)"
    else:
        absent.add("accounts")
        notes.append("no account metadata given: the payment-fingerprint signal is skipped")
    if not banned:
        absent.add("banned")
    else:
        con.register("banned", pa.table({"account_id": pa.array(list(banned), pa.string())}))
        joins.append(
            """LEFT JOIN (
                 SELECT account_id, count(DISTINCT other) AS links FROM (
                   SELECT a.account_id, b.account_id AS other
                   FROM (SELECT DISTINCT account_id, template FROM ua
                         WHERE template IS NOT NULL) a
                   JOIN (SELECT DISTINCT account_id, template FROM ua
                         WHERE template IS NOT NULL
                           AND account_id IN (SELECT account_id FROM banned)) b
                     ON a.template = b.template
                   UNION ALL
                   SELECT a.account_id, b.account_id
                   FROM (SELECT DISTINCT account_id, client_ip FROM a_ips) a
                   JOIN (SELECT DISTINCT account_id, client_ip FROM a_ips
                         WHERE account_id IN (SELECT account_id FROM banned)) b
                     ON a.client_ip = b.client_ip) AS q
                 WHERE account_id <> other GROUP BY account_id) bl USING (account_id)"""
        )
        extra["banned_link"] = "CAST(coalesce(bl.links, 0) AS DOUBLE)"
    con.create(
        "acc",
        f"""WITH
        -- a task is a distinct template (shared, or the account's own) or a distinct
        -- untemplated prompt: an integration that wraps its users' text in one template sends
        -- one task ten thousand times
        caps AS (SELECT account_id, sum(k) AS tasks,
                        coalesce(max(k) FILTER (WHERE capability <> 'other'), 0) AS top FROM (
                   SELECT account_id, capability, count(DISTINCT coalesce(
                            't' || CAST(template AS STRING), 'f' || CAST(frame AS STRING),
                            'p' || CAST(pid AS STRING))) AS k
                   FROM ua GROUP BY account_id, capability) AS q GROUP BY account_id),
        content AS (
          SELECT account_id,
                 CAST(sum(CASE WHEN template IS NOT NULL THEN n ELSE 0 END) AS BIGINT)
                   AS template,
                 CAST(sum(CASE WHEN elicits AND fresh THEN n ELSE 0 END) AS BIGINT)
                   AS elicitation
          FROM ua GROUP BY account_id),
        -- the gaps between an account's requests: each day's moments and the gap across
        -- each night (a day's first request after the last of the day before) merged
        parts AS (
          SELECT account_id, gaps AS k, gap_mean AS mean, gap_m2 AS m2 FROM a_activity
          WHERE gaps > 0
          UNION ALL
          SELECT account_id, 1, bridge, 0.0 FROM (
            SELECT account_id, ({{{{ epoch_us('first_ts') }}}} - lag({{{{ epoch_us('last_ts') }}}})
                     OVER (PARTITION BY account_id ORDER BY day)) / 1e6 AS bridge
            FROM a_activity) AS q WHERE bridge IS NOT NULL),
        pooled AS (SELECT account_id, sum(k) AS k, sum(k * mean) / sum(k) AS mean
                   FROM parts GROUP BY account_id),
        timing AS (
          SELECT p.account_id, any_value(o.k) AS k, any_value(o.mean) AS mean,
                 sum(p.m2 + p.k * (p.mean - o.mean) * (p.mean - o.mean)) AS m2
          FROM parts p JOIN pooled o ON o.account_id = p.account_id GROUP BY p.account_id),
        hours AS (SELECT account_id, -sum(p * ln(p)) AS entropy FROM (
                   SELECT account_id, sum(n) / sum(sum(n)) OVER (PARTITION BY account_id) AS p
                   FROM a_hours GROUP BY account_id, hour) AS q GROUP BY account_id),
        sharing AS (SELECT client_ip, count(DISTINCT account_id) AS sharing FROM a_ips
                    GROUP BY client_ip),
        ips AS (SELECT i.account_id, max(s.sharing) AS sharing,
                       count(DISTINCT i.client_ip) AS addresses
                FROM a_ips i JOIN sharing s ON s.client_ip = i.client_ip
                GROUP BY i.account_id),
        cats AS (SELECT account_id, count(DISTINCT catalogue) AS n FROM a_cats
                 GROUP BY account_id),
        examples AS (
          SELECT account_id, {{{{ agg_ordered('prompt', 'r') }}}} AS examples FROM (
            SELECT account_id, prompt, row_number() OVER (
                     PARTITION BY account_id
                     ORDER BY elicits DESC, template IS NULL, first_ts, prompt) AS r
            FROM ua) AS q
          WHERE r <= 2 GROUP BY account_id),
        act AS (
          SELECT account_id, CAST(sum(n) AS BIGINT) AS requests,
                 count(DISTINCT day) AS active_days, min(first_ts) AS first_seen,
                 max(last_ts) AS last_seen, CAST(sum(automation_ua) AS BIGINT) AS automation_ua,
                 CAST(sum(logprobs) AS BIGINT) AS logprobs
          FROM a_activity GROUP BY account_id)
        SELECT act.account_id, act.requests, act.active_days, act.first_seen, act.last_seen,
               content.template, content.elicitation,
               CAST(caps.top AS BIGINT) AS concentration, CAST(caps.tasks AS BIGINT) AS tasks,
               CASE WHEN timing.k >= 5 AND timing.mean > 0
                    THEN timing.mean / greatest(sqrt(timing.m2 / timing.k), 1e-9)
                    ELSE 0.0 END AS regularity,
               hours.entropy AS around_clock,
               CAST(coalesce(ips.sharing, 0) AS BIGINT) AS ip_sharing,
               coalesce(ips.addresses, 0) / act.requests AS ip_rotation,
               act.automation_ua, act.logprobs,
               coalesce(cats.n, 0) AS tool_coverage,
               examples.examples,
               {extra["pivot"]} AS pivot,
               {extra["fingerprint"]} AS fingerprint,
               {extra["banned_link"]} AS banned_link
        FROM act JOIN content USING (account_id) JOIN caps USING (account_id)
        JOIN hours USING (account_id)
        LEFT JOIN timing USING (account_id) LEFT JOIN ips USING (account_id)
        LEFT JOIN cats USING (account_id) LEFT JOIN examples USING (account_id)
        {" ".join(joins)}""",
    )
    table = con.fetch("SELECT * FROM acc ORDER BY account_id")
    for name in ("regularity", "around_clock"):
        column = table.column_names.index(name)
        table = table.set_column(column, name, pa.array(_settled(table[name].to_numpy())))
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


def _settled(values: np.ndarray, digits: int = 9) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits. A mean or an entropy summed in
    another order (another engine, another partitioning, DuckDB's threads) differs in its last
    bits, and accounts whose values tie exactly (every account with two requests in two hours has
    entropy ln 2) would be ranked apart by that noise: rounded, they tie on every engine."""
    values = np.asarray(values, dtype=float)
    scale = np.zeros_like(values)
    np.log10(np.abs(values), out=scale, where=values != 0)
    scale = 10.0 ** (digits - 1 - np.floor(scale))
    return np.round(values * scale) / scale


#: Intents tie only accounts whose elicitation evidence is at least this (p <= 0.5: they ask for
#: reasoning more than most reference accounts do). An integration whose users' text now and
#: then reads like a request for reasoning holds a cluster or two of such prompts among
#: thousands; it asks for reasoning no more than anyone, and what it happens to ask is no tie.
ASKS = math.log(2)


#: What can tie two accounts in the coordination graph (``Communities.edges``' ``ties`` names
#: each that ties a pair, in this order, joined by "; "), and each one's bit in the SQL's mask.
TIES = ("IP address", "intent", "payment fingerprint", "template, same day",
        "template, same hour", "tool catalogue")  # fmt: skip
_TIE = {kind: 1 << bit for bit, kind in enumerate(TIES)}


def _tie_names(masks: pa.ChunkedArray) -> pa.Array:
    """Each bit mask of ``_TIE`` as the names of its kinds, joined by "; "."""
    masks = masks.to_numpy()
    kinds = np.unique(masks)
    names = ["; ".join(t for t in TIES if mask & _TIE[t]) for mask in kinds]
    return pa.DictionaryArray.from_arrays(
        pa.array(np.searchsorted(kinds, masks), pa.int32()), pa.array(names, pa.string())
    ).cast(pa.string())


def _communities(
    con: Engine,
    suspects: list[str],
    reasoned: list[str],
    config: DetectConfig,
    eliciting: list[str],
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
    ``intent_degree`` others of its intent; only ``eliciting`` accounts, which ask for reasoning
    more than most, hold intents), and each (template, day) both hit (a quiet campaign's
    accounts send a few requests a day, rarely in the same hour) -- the last only for pairs tied
    by one of the others: alone it is what two busy users of one popular prompt share by chance.
    Edges need ``min_edge_weight``.
    """
    con.register("suspects", pa.table({"account_id": pa.array(suspects, pa.string())}))
    con.register("reasoned", pa.table({"account_id": pa.array(reasoned, pa.string())}))
    con.register("eliciting", pa.table({"account_id": pa.array(eliciting, pa.string())}))
    fingerprints = (
        f"""UNION ALL SELECT a.account_id, b.account_id, 1, 2, {_TIE["payment fingerprint"]}
           FROM meta a JOIN meta b ON a.payment_fingerprint = b.payment_fingerprint
           WHERE a.account_id < b.account_id
             AND a.account_id IN (SELECT account_id FROM suspects)
             AND b.account_id IN (SELECT account_id FROM suspects)"""
        if con.has("meta")
        else ""
    )
    if not con.has("cohits"):  # what the rounds share: each account's keys, once per run
        con.create(
            "cokeys",
            """SELECT DISTINCT a.template, s.slot, false AS daily, s.account_id
               FROM a_slots s JOIN assigned a ON a.pid = s.pid
               UNION ALL
               SELECT DISTINCT a.template,
                      {{ idiv(epoch_us('CAST(u.day AS TIMESTAMP)'), 86400000000) }}, true,
                      u.account_id
               FROM a_uses u JOIN a_prompts p ON p.qid = u.qid
               JOIN assigned a ON a.pid = p.pid""",
        )
        # accounts numbered: the co-hit self-join (millions of rows inside a large campaign)
        # joins and groups integers, not strings
        con.create(
            "conodes",
            """SELECT account_id, row_number() OVER (ORDER BY account_id) AS node
               FROM (SELECT DISTINCT account_id FROM cokeys) AS q""",
        )
        con.create("cohits", "SELECT k.*, n.node FROM cokeys k JOIN conodes n USING (account_id)")
        con.drop("cokeys")
        con.create("coips", "SELECT DISTINCT client_ip, account_id FROM a_ips")
        con.create("cocats", "SELECT DISTINCT catalogue, account_id FROM a_cats")
    pairs = con.fetch(
        """WITH
        -- a template most of whose users are not suspects is everyone's (a popular prompt):
        -- co-hitting it says nothing about coordination
        owned AS (SELECT template FROM cohits WHERE daily GROUP BY template
                  HAVING count(DISTINCT account_id) FILTER (
                           WHERE account_id IN (SELECT account_id FROM suspects))
                         >= {{ share }} * count(DISTINCT account_id)),
        hits AS (SELECT * FROM cohits
                 WHERE account_id IN (SELECT account_id FROM suspects)
                   AND template IN (SELECT template FROM owned)),
        crowded AS (SELECT template, slot, daily FROM hits GROUP BY template, slot, daily
                    HAVING count(*) <= 400),
        ips AS (SELECT client_ip, account_id FROM coips
                WHERE account_id IN (SELECT account_id FROM suspects)),
        shared_ips AS (SELECT client_ip FROM ips GROUP BY client_ip HAVING count(*) <= 50),
        catalogues AS (SELECT catalogue, account_id FROM cocats WHERE account_id IN (
                         SELECT account_id FROM suspects UNION SELECT account_id FROM reasoned)),
        ranked_intents AS (SELECT account_id, intent, row_number() OVER (
                             PARTITION BY intent
                             ORDER BY {{ hash64("account_id || '" ~ seed ~ "'") }}, account_id)
                             AS r
                           FROM intents
                           WHERE account_id IN (SELECT account_id FROM eliciting)),
        cohit_pairs AS (
          SELECT a.node AS u, b.node AS v,
                 count(*) FILTER (WHERE NOT a.daily) AS hourly, count(*) AS w,
                 bit_or(CASE WHEN a.daily THEN {{ tie['template, same day'] }}
                             ELSE {{ tie['template, same hour'] }} END) AS tie
          FROM hits a JOIN hits b
            ON a.template = b.template AND a.slot = b.slot AND a.daily = b.daily
          JOIN crowded c ON c.template = a.template AND c.slot = a.slot AND c.daily = a.daily
          WHERE a.node < b.node
          GROUP BY a.node, b.node),
        edges AS (
          SELECT nu.account_id AS u, nv.account_id AS v, p.hourly, p.w, p.tie
          FROM cohit_pairs p JOIN conodes nu ON nu.node = p.u JOIN conodes nv ON nv.node = p.v
          UNION ALL
          SELECT a.account_id, b.account_id, 1, 1, {{ tie['IP address'] }}
          FROM ips a JOIN ips b ON a.client_ip = b.client_ip
          WHERE a.account_id < b.account_id
            AND a.client_ip IN (SELECT client_ip FROM shared_ips)
          UNION ALL
          SELECT a.account_id, b.account_id, 1, 1, {{ tie['tool catalogue'] }}
          FROM catalogues a JOIN catalogues b ON a.catalogue = b.catalogue
          WHERE a.account_id < b.account_id AND a.catalogue IN (
                SELECT catalogue FROM catalogues GROUP BY catalogue HAVING count(*) <= 400)
          UNION ALL
          SELECT least(a.account_id, b.account_id), greatest(a.account_id, b.account_id),
                 1, 1, {{ tie['intent'] }}
          FROM ranked_intents a JOIN ranked_intents b ON a.intent = b.intent
          WHERE b.r > a.r AND b.r <= a.r + {{ degree }}
          {{ fingerprints }})
        -- same-day co-hits strengthen a pair already tied in lockstep or by infrastructure;
        -- alone they are what two busy users of one popular prompt share by chance
        -- what ties a pair: one bit per kind (a string per co-hit row, aggregated distinct,
        -- took as long as the join)
        SELECT u, v, CAST(sum(w) AS BIGINT) AS weight, CAST(bit_or(tie) AS BIGINT) AS ties
        FROM edges GROUP BY u, v
        HAVING sum(hourly) > 0 AND sum(w) >= {{ min_weight }}
        ORDER BY u, v""",
        share=config.min_suspect_share, seed=config.seed, degree=config.intent_degree,
        fingerprints=fingerprints, min_weight=config.min_edge_weight, tie=_TIE,
    )  # fmt: skip
    pairs = pairs.set_column(pairs.column_names.index("ties"), "ties", _tie_names(pairs["ties"]))
    con.drop("suspects")
    con.drop("reasoned")
    con.drop("eliciting")
    members = Communities()
    if pairs.num_rows == 0:
        return members
    members.edges = pairs.select(["u", "v", "weight", "ties"])
    names, membership, inside = _louvain(pairs, config.seed)
    # Louvain places every node somewhere: an account whose only tie is one edge into a
    # campaign lands in it. Members need ties to several others of their community.
    ties = np.bincount(inside[0], minlength=len(names)) + np.bincount(
        inside[1], minlength=len(names)
    )
    sizes = np.bincount(membership)
    # communities by size, largest first; equal sizes by their least member (names are sorted)
    first = np.full(len(sizes), len(names))
    np.minimum.at(first, membership, np.arange(len(names)))
    order = sorted(range(len(sizes)), key=lambda c: (-sizes[c], first[c]))
    # each community's rows, ascending: one stable sort, not a scan of every node per community
    grouped = np.argsort(membership, kind="stable")
    ends = np.cumsum(sizes)
    for index, community in enumerate(order):
        rows = grouped[ends[community] - sizes[community] : ends[community]]
        core = rows[ties[rows] >= config.min_ties]
        if len(core) >= config.min_community:
            for row in core:
                members[names[row]] = index
            members.fringe |= {names[row] for row in rows if ties[row] < config.min_ties}
    return members


def _louvain(pairs: pa.Table, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Louvain communities (igraph's multilevel modularity optimisation, resolution 1) of the
    weighted graph whose edges are ``pairs`` (``u``, ``v``, ``weight``): the nodes' names in
    sorted order, each node's community, and the ends (rows of two arrays) of the edges inside a
    community. Seeded, and the same graph gives the same communities on every engine: the nodes
    are numbered by name and the edges come sorted."""
    import random

    import igraph

    ends = pa.chunked_array(pairs["u"].chunks + pairs["v"].chunks)
    names = pc.unique(ends)
    names = pc.take(names, pc.sort_indices(names))
    u = pc.index_in(pairs["u"], value_set=names).to_numpy()
    v = pc.index_in(pairs["v"], value_set=names).to_numpy()
    graph = igraph.Graph(n=len(names), edges=np.column_stack([u, v]))
    weights = pairs["weight"].to_numpy().astype(float)
    igraph.set_random_number_generator(random.Random(seed))
    try:
        membership = np.asarray(graph.community_multilevel(weights=weights).membership)
    finally:
        igraph.set_random_number_generator(random)
    same = membership[u] == membership[v]
    return names.to_pylist(), membership, np.vstack([u[same], v[same]])


class Communities(dict):
    """Each community member's community index; ``fringe``: the accounts Louvain placed in those
    communities with too few ties to be members (never flagged for it, but left out of a
    self-reference with the members: a quiet campaign's accounts that asked too little to be
    tied firmly are still the campaign's, and kept in the reference they make it look ordinary).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fringe: set[str] = set()
        #: the coordination graph's edges: columns ``u``, ``v``, ``weight`` and ``ties`` (what
        #: ties them)
        self.edges: pa.Table = pa.table({"u": pa.array([], pa.string()),
                                         "v": pa.array([], pa.string()),
                                         "weight": pa.array([], pa.int64()),
                                         "ties": pa.array([], pa.string())})  # fmt: skip


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


def _write(out: Path, table: pa.Table, con, communities, config, edges=None) -> None:
    from distillscope.gateway.keys import Block, write_block_list

    pq.write_table(table, out / "accounts.parquet")
    rows = table.to_pylist()
    members = table.filter(pc.invert(pc.is_null(table["cluster_id"])))
    edges = edges if edges is not None else Communities().edges
    # the edges inside a cluster: both ends members of the same one
    ends = [pc.index_in(edges[end], value_set=members["account_id"]) for end in ("u", "v")]
    cluster = [pc.take(members["cluster_id"], at) for at in ends]
    inside = edges.filter(pc.fill_null(pc.equal(*cluster), False))
    pq.write_table(
        pa.table(
            {
                "cluster_id": pc.filter(cluster[0], pc.fill_null(pc.equal(*cluster), False)),
                "u": inside["u"],
                "v": inside["v"],
                "weight": inside["weight"].cast(pa.int64()),
                "ties": inside["ties"],
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
    per_day = con.fetch(
        """SELECT a.account_id, a.day, CAST(sum(a.n) AS BIGINT) AS n
           FROM a_activity a JOIN report_accounts r ON r.account_id = a.account_id
           GROUP BY a.account_id, a.day"""
    ).to_pylist()
    con.drop("report_accounts")
    timeline: dict[str, dict] = {}
    for row in per_day:
        timeline.setdefault(row["account_id"], {})[row["day"]] = row["n"]
    span = con.fetch("SELECT min(day) AS a, max(day) AS b FROM a_activity")
    first, last = span["a"][0].as_py(), span["b"][0].as_py()
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    page = detection_page(table, asdict(summary), threshold, timeline, days)
    write_detection_report(out, page)


def daily_first_flags(
    log: str | os.PathLike,
    out: str | os.PathLike,
    *,
    every_hours: float = 24.0,
    state: str | os.PathLike | None = None,
    **kwargs,
) -> int:
    """Replay a periodic job over ``log``: detection re-run on the log cut every ``every_hours``
    from the first midnight (what ``--until`` does in production), and the first cut that flagged
    each account written to ``out/accounts.parquet`` as ``first_flagged_at`` (null if no run
    flagged it). ``out`` must hold a ``detect`` run on the whole log. Returns the number of runs.

    The runs are incremental, as a production job is: each reads the log from the last day the
    ``state`` folder holds (``out/replay/state``, rebuilt, when none is given)."""
    from datetime import timedelta

    if every_hours <= 0:
        raise DetectError(f"the replay's period must be positive, not {every_hours} h")
    out = Path(out)
    con = DuckEngine()
    try:
        _source(con, log_target(log))
        first_ts, last_ts = (
            con.fetch(
                "SELECT CAST(min(ts) AS STRING) AS a, CAST(max(ts) AS STRING) AS b "
                "FROM src_exchanges"
            )
            .to_pylist()[0]
            .values()
        )
    finally:
        con.close()
    start = datetime.fromisoformat(first_ts).replace(hour=0, minute=0, second=0, microsecond=0)
    end = datetime.fromisoformat(last_ts)
    step = timedelta(hours=every_hours)
    first: dict[str, datetime] = {}
    runs = 0
    rebuild = state is None
    state = out / "replay" / "state" if state is None else state
    try:  # a state that cannot be used is refused once, not skipped at every run
        DetectState.open(state, state_settings(kwargs.get("config") or DetectConfig()),
                         rebuild=rebuild)  # fmt: skip
    except StateError as exc:
        raise DetectError(str(exc)) from None
    while start + runs * step <= end:
        runs += 1
        until = start + runs * step
        try:
            run = detect(log, out / "replay" / f"run-{runs:03d}", until=until, state=state,
                         rebuild=rebuild, **kwargs)  # fmt: skip
        except DetectError:
            continue  # nothing to score yet
        rebuild = False
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
