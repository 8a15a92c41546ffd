"""The ranker's Spark side (`batch.ranking`): its inputs on hand-built tables, checked by hand, and a
training on a small shop with a planted pattern that the ranked lists must find and ALS alone does not."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest
from chispa import assert_df_equality

from sparkrec.batch import ranking
from sparkrec.core import columns as C
from sparkrec.core import ranker
from sparkrec.core.config import RankerConfig

REF = datetime(2025, 6, 30)
PRICED = "user_idx int, item_idx int, event_ts timestamp, price double"


def _priced(spark, rows):
    return spark.createDataFrame([(u, i, REF - timedelta(days=d), p) for u, i, d, p in rows], PRICED)


def test_user_inputs_are_each_customers_items_ages_and_activity(spark):
    h = _priced(spark, [
        (1, 10, 2.0, 4.0), (1, 10, 9.0, 4.0), (1, 11, 9.0, 1.0), (1, 12, 30.0, 10.0),  # 3 items on 3 days
        (2, 11, 0.5, None),
    ])
    got = {r[C.USER_IDX]: r for r in ranking.user_inputs(h, REF).collect()}
    items = dict(zip(got[1]["_rk_items"], got[1]["_rk_age"]))
    assert items == {10: 2.0, 11: 9.0, 12: 30.0}  # the latest touch of each item
    assert got[1]["_rk_user"] == [3.0, 3.0, 2.0, 30.0, 4.0]  # items, days, last, first, median price
    assert got[2]["_rk_user"][:4] == [1.0, 1.0, 0.5, 0.5] and got[2]["_rk_user"][4] is None


def test_item_inputs_count_buyers_by_horizon_and_pairs_by_shared_days(spark):
    rk = RankerConfig(recent_days=10, max_neighbours=1)
    h = _priced(spark, [
        # Customer 1 buys 10 and 11 on one day (3 days ago) and 12 alone (20 days ago).
        (1, 10, 3.0, 2.0), (1, 11, 3.0, 6.0), (1, 12, 20.0, 1.0),
        # Customer 2 buys 10 and 11 together 40 days ago, and 10 with 12 yesterday.
        (2, 10, 40.0, 4.0), (2, 11, 40.0, 6.0), (2, 10, 1.0, 2.0), (2, 12, 1.0, 1.0),
    ])
    per_item, pairs = ranking.item_inputs(h, REF, rk)
    expected_items = spark.createDataFrame([
        (10, 2, 2, 2, 40.0, 1.0, 2.0), (11, 2, 1, 1, 40.0, 3.0, 6.0), (12, 2, 1, 1, 20.0, 1.0, 1.0),
    ], "item_idx int, users long, users_recent long, users_week long, age_days double, last_days double, price double")
    assert_df_equality(per_item, expected_items, ignore_row_order=True, ignore_nullable=True)
    # Days holding each: 10 in 3, 11 in 2, 12 in 2. Both 10 and 11: 2 days, weight 2/sqrt(3*2);
    # 10 and 12: 1 day, 1/sqrt(3*2); 11 and 12 never. One neighbour kept per item: the strongest.
    w = 2 / np.sqrt(6)
    got = {(r["item_idx"], r["other_idx"]): r["weight"] for r in pairs.collect()}
    assert got == pytest.approx({(10, 11): w, (11, 10): w, (12, 10): 1 / np.sqrt(6)})


def test_a_basket_counts_only_its_latest_items(spark):
    rk = RankerConfig(basket_items=2)
    base = datetime(2025, 6, 29, 8)
    h = spark.createDataFrame([(1, i, base + timedelta(minutes=i), 1.0) for i in (10, 11, 12)], PRICED)
    _, pairs = ranking.item_inputs(h, REF, rk)
    assert {(r["item_idx"], r["other_idx"]) for r in pairs.collect()} == {(11, 12), (12, 11)}


def test_the_cuts_go_back_label_days_at_a_time():
    got = ranking.cuts(REF, RankerConfig(training_cuts=2, label_days=7))
    assert [(c.at, c.end) for c in got] == [(REF - timedelta(days=7), REF), (REF - timedelta(days=14), REF - timedelta(days=7))]


# --------------------------------------------------------------------------- a planted pattern

START = datetime(2025, 1, 1)
def _write_shop(path, customers: int = 600, days: int = 150, seed: int = 5) -> None:
    """A shop of item pairs, as the raw JSON events a shop hands sparkrec (the demo's format): some customers
    buy an 'a' item and its 'b' partner in one day, most buy the 'b' a few days after the 'a'. Each customer's
    pairs are drawn at random, so no taste factor holds the pattern; only what is bought together does. Plus
    background purchases of popular 'n' items. The partners of the last days' 'a' items are still to be
    bought when the history ends."""
    import json

    rng = np.random.default_rng(seed)
    lines, n = [], 0

    def event(user: str, item: str, when: datetime, price: float) -> None:
        nonlocal n
        n += 1
        lines.append(json.dumps({"event_id": f"e{n}", "user_id": user, "item_id": item, "event_type": "purchase",
                                 "timestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "quantity": 1, "price": price}))

    end = START + timedelta(days=days)
    for u in range(customers):
        for _ in range(6):
            t = START + timedelta(days=rng.uniform(0, days))
            pair = int(rng.integers(0, 20))
            later = 0.0 if rng.uniform() < 0.3 else float(rng.uniform(1, 6))
            event(f"u{u}", f"a{pair}", t, 2.0)
            if t + timedelta(days=later, minutes=5) < end:  # the partner of a late 'a' is still to be bought
                event(f"u{u}", f"b{pair}", t + timedelta(days=later, minutes=5), 3.0)
        for _ in range(6):
            event(f"u{u}", f"n{int(rng.zipf(1.6)) % 60}", START + timedelta(days=rng.uniform(0, days)), 1.0)
    path.mkdir(parents=True)
    (path / "part-0.json").write_text("\n".join(lines) + "\n")


def test_a_run_keeps_the_ranker_where_it_wins_and_publishes_its_lists(spark, tmp_path):
    from pyspark.sql import functions as F

    from sparkrec.cli import main
    from sparkrec.core.config import load_config
    from sparkrec.storage import files, tables
    from tests.conftest import ROOT

    _write_shop(tmp_path / "events")
    overrides = [f"warehouse={tmp_path}/wh", f"source.path={tmp_path}/events", "items.path=null", "tune.enabled=false",
                 "train.als.rank=4", "train.als.max_iter=4", "recommend.n=5", "evaluate.test_days=14",
                 "ranker.enabled=true", "ranker.depth=20", "ranker.training_cuts=2", "ranker.label_days=14",
                 "ranker.max_neighbours=5", "recommend.similar_items.enabled=false", "search.enabled=false"]
    assert main(["run", "--config", str(ROOT / "conf" / "local.yaml"), *[a for o in overrides for a in ("--set", o)]],
                spark=spark) == 0
    cfg = load_config(ROOT / "conf" / "local.yaml", overrides)
    runs = tables.read_table(spark, cfg, C.RUNS).df
    import json

    evaluate = runs.where("stage = 'evaluate'").first()
    details, metrics = json.loads(evaluate["details"]), evaluate["metrics"]
    # The pairs are what the customers buy next; ALS's taste factors cannot hold them, co-purchase does.
    assert metrics["ranked.ndcg@10"] > 1.2 * metrics["model.ndcg@10"], metrics
    assert details["lists"] == "ranked" and details["ranker"]["chosen"], details
    assert set(details["ranker"]["gains"]) == set(ranker.FEATURES)
    recommend = json.loads(runs.where("stage = 'recommend'").first()["details"])
    assert recommend["ranker"] == details["ranker"]["path"] == files.ranker_path(cfg, evaluate["run_id"])
    recs = tables.read_table(spark, cfg, C.RECOMMENDATIONS).df
    assert {r[0] for r in recs.select(C.REC_SOURCE).distinct().collect()} <= {"ranked", "popular"}
    # A customer whose latest purchase is an 'a' item without its partner finds the partner in their list.
    inter = tables.read_table(spark, cfg, C.INTERACTIONS).df
    latest = inter.groupBy(C.USER_ID).agg(F.max_by(C.ITEM_ID, C.EVENT_TS).alias("last"))
    waiting = latest.where(F.col("last").startswith("a")).withColumn("partner", F.regexp_replace("last", "^a", "b"))
    waiting = waiting.join(inter.select(C.USER_ID, F.col(C.ITEM_ID).alias("partner")), [C.USER_ID, "partner"], "left_anti")
    found = waiting.join(recs.select(C.USER_ID, F.col(C.ITEM_ID).alias("partner")), [C.USER_ID, "partner"], "left_semi")
    assert waiting.count() >= 20 and found.count() >= 0.6 * waiting.count(), (found.count(), waiting.count())

    # The server ranks as the batch did (one kernel, the plan and item statistics read back from serving_items,
    # each customer's inputs from interactions): with nothing new, every live list is the published one.
    from fastapi.testclient import TestClient

    from sparkrec.serve import live
    from sparkrec.serve import state as state_
    from sparkrec.serve.app import create_app
    from tests.test_serve import wait_for

    served = load_config(ROOT / "conf" / "local.yaml",
                         [*overrides, "stream.source.kind=files", f"stream.source.path={tmp_path / 'in'}"])
    st = state_.State(served)
    with TestClient(create_app(served, st, token=None)) as client:
        snap, _ = wait_for(lambda: st.snapshot, lambda s: s is not None, 30)
        assert snap.plan.ranker is not None and snap.plan.stats is not None
        shown = lambda rows: [(r[C.ITEM_ID], r[C.REC_SOURCE], r[C.EXPLANATION]) for r in rows]  # noqa: E731
        for key in snap.lists.index:
            assert shown(live.list_for(key, [], snap, served)[0]) == shown(snap.lists.get(key, 5)), key
        # A customer who buys an 'a' item gets its partner within a second, ranked and explained by it.
        end = inter.agg(F.max(C.EVENT_TS)).first()[0]
        customer = snap.lists.index[0]
        mine = {r[0] for r in inter.where(F.col(C.USER_ID) == customer).select(C.ITEM_ID).collect()}
        listed = {r[C.ITEM_ID] for r in snap.lists.get(customer, 5)}
        pair = next(k for k in range(20) if f"b{k}" not in mine | listed)
        stamp = (end + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        client.post("/v1/events", json=[{"user_id": customer, "item_id": f"a{pair}", "event_type": "purchase",
                                         "timestamp": stamp}]).raise_for_status()
        got, _ = wait_for(lambda: client.get(f"/v1/users/{customer}/recommendations").json(),
                          lambda b: b["list"] == "live", 2.0)
        top = {r["item_id"]: r for r in got["items"][:3]}
        assert f"b{pair}" in top, got
        assert top[f"b{pair}"]["source"] == "ranked" and top[f"b{pair}"]["because_item_id"] == f"a{pair}", got

    # The stream (`sparkrec stream`) ranks too: the live list of a customer with nothing new is the published one.
    from sparkrec.storage.runs import RunContext
    from sparkrec.stream import live as stream

    users = sorted(snap.lists.index)[:25]
    handler = stream.LiveStream(spark, cfg)
    ctx = RunContext(spark, cfg, live=True)
    with ctx.stage("live") as rec:
        assert handler.publish(ctx, rec, users, tables.read_table(spark, cfg, C.EVENTS_RAW).df.limit(0)) == 25
    assert handler.model.plan.ranker is not None
    cols = [C.USER_ID, C.RANK, C.ITEM_ID, C.REC_SOURCE, C.EXPLANATION]
    got = sorted(tuple(r) for r in tables.read_table(spark, cfg, C.LIVE_RECOMMENDATIONS).df.select(*cols).collect())
    want = sorted(tuple(r) for r in recs.where(F.col(C.USER_ID).isin(users)).select(*cols).collect())
    assert len(want) == 125 and got == want
