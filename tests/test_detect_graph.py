"""The coordination graph's rules on small hand-made tables: who holds an intent, and who is
left out of the self-reference beside a campaign found."""

from __future__ import annotations

import pyarrow as pa
import pytest

from distillscope.detect.detector import DetectConfig, _communities, _intent_companions
from distillscope.detect.engine import open_engine


def _table(**columns) -> pa.Table:
    return pa.table({name: pa.array(values) for name, values in columns.items()})


@pytest.fixture
def con():
    engine = open_engine("duckdb")
    yield engine
    engine.close()


def _intents(con, held: dict[str, list[int]]) -> None:
    rows = [(account, intent) for account, intents in held.items() for intent in intents]
    con.register(
        "intents",
        pa.table({"account_id": pa.array([r[0] for r in rows], pa.string()),
                  "intent": pa.array([r[1] for r in rows], pa.int64())}),
    )  # fmt: skip


def _no_sharing(con) -> None:
    """Every table the graph reads besides intents, empty: accounts share nothing else."""
    empty = pa.array([], pa.string())
    con.register("a_slots", pa.table({"pid": empty, "slot": pa.array([], pa.int64()),
                                      "account_id": empty}))  # fmt: skip
    con.register("assigned", pa.table({"pid": empty, "template": empty}))
    con.register("a_uses", pa.table({"account_id": empty, "qid": empty,
                                     "day": pa.array([], pa.date32())}))  # fmt: skip
    con.register("a_prompts", pa.table({"qid": empty, "pid": empty}))
    con.register("a_ips", pa.table({"client_ip": empty, "account_id": empty}))
    con.register("a_cats", pa.table({"catalogue": empty, "account_id": empty}))


def test_intent_companions_are_the_holders_of_intents_mostly_found(con):
    # intent 1: four of six holders found -> its other two are companions; intent 2: one of
    # three found -> no one is a companion through it; intent 3: half found is not most
    _intents(con, {"f1": [1, 2], "f2": [1], "f3": [1], "f4": [1, 3], "q1": [1], "q2": [1, 2],
                   "o1": [2], "o2": [3]})  # fmt: skip
    found = {"f1", "f2", "f3", "f4"}
    assert _intent_companions(con, found) == found | {"q1", "q2"}
    assert _intent_companions(con, set()) == set()
    assert not con.has("found")


def test_only_accounts_that_ask_for_reasoning_more_than_most_are_tied_by_intents(con):
    # eight accounts each sharing two intents with the others: every pair has weight 2
    crowd = [f"a{i}" for i in range(8)]
    _intents(con, {account: [1, 2] for account in crowd})
    _no_sharing(con)
    config = DetectConfig(min_community=5, min_ties=3, intent_degree=20)
    everyone = _communities(con, [], crowd, config, eliciting=crowd)
    assert set(everyone) == set(crowd)
    edges = everyone.edges.to_pylist()
    assert len(edges) == 8 * 7 // 2
    assert all(e["ties"] == "intent" and e["weight"] == 2 for e in edges)
    # two of them ask for reasoning no more than anyone: what they happen to ask ties them to no one
    asking = crowd[2:]
    some = _communities(con, [], crowd, config, eliciting=asking)
    assert set(some) == set(asking)
    ends = set(some.edges["u"].to_pylist()) | set(some.edges["v"].to_pylist())
    assert ends == set(asking)
    # and with no one asking, no intent edge and no community
    assert not _communities(con, [], crowd, config, eliciting=[])
