"""Metrics against values worked out by hand, splits, relevance and baselines, on tiny tables."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import pytest

from sparkrec.batch import evaluate, recommend, tune
from sparkrec.core import columns as C
from sparkrec.core.config import EvaluateConfig, RecommendConfig, TrainConfig, TuneConfig

T0 = datetime(2025, 1, 1)
INTER = "user_id string, item_id string, event_type string, event_ts timestamp"


def inter(spark, rows):
    """Rows (user, item, day) are purchases; (user, item, type, day) say their type."""
    full = [r if len(r) == 4 else (r[0], r[1], "purchase", r[2]) for r in rows]
    return spark.createDataFrame([(u, i, t, T0 + timedelta(days=d)) for u, i, t, d in full], INTER)


@pytest.fixture
def lists_and_relevant(spark):
    recs = spark.createDataFrame(
        [("a", "x", 1), ("a", "z", 2), ("a", "y", 3), ("b", "z", 1), ("b", "x", 2), ("b", "w", 3)],
        "user_id string, item_id string, rank int",
    )
    # c has relevant items but no list at all: it counts, with zeros.
    relevant = spark.createDataFrame([("a", "x"), ("a", "y"), ("b", "w"), ("c", "v")], "user_id string, item_id string")
    return recs, relevant


def test_metrics_match_hand_computed_values(lists_and_relevant):
    recs, relevant = lists_and_relevant
    m = evaluate.ranking_metrics(recs, relevant, [2, 3])
    idcg2 = 1 + 1 / math.log2(3)
    expected = {
        # k=2: a hits x at 1; b and c hit nothing.
        "precision@2": (1 / 2) / 3,
        "recall@2": (1 / 2) / 3,
        "ndcg@2": (1 / idcg2) / 3,
        "map@2": (1 / 2) / 3,
        "hit_rate@2": 1 / 3,
        "mrr@2": 1 / 3,
        # k=3: a hits x at 1 and y at 3; b hits w at 3 (one relevant item).
        "precision@3": (2 / 3 + 1 / 3) / 3,
        "recall@3": (1 + 1) / 3,
        "ndcg@3": ((1 + 0.5) / idcg2 + 0.5 / 1) / 3,
        "map@3": ((1 + 2 / 3) / 2 + (1 / 3) / 1) / 3,
        "hit_rate@3": 2 / 3,
        "mrr@3": (1 + 1 / 3) / 3,
    }
    assert m["users"] == 3
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-9), key


def test_fewer_relevant_than_k_uses_the_ideal_list_of_that_length(spark):
    recs = spark.createDataFrame([("a", "q", 1), ("a", "x", 2)], "user_id string, item_id string, rank int")
    rel = spark.createDataFrame([("a", "x")], "user_id string, item_id string")
    m = evaluate.ranking_metrics(recs, rel, [10])
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(3))  # ideal = one hit at rank 1
    assert m["map@10"] == pytest.approx(0.5)
    assert m["precision@10"] == pytest.approx(0.1)


def test_catalogue_novelty_and_diversity(spark, lists_and_relevant):
    recs, relevant = lists_and_relevant
    train = inter(spark, [("a", "x", 0), ("b", "x", 0), ("c", "y", 0), ("a", "z", 0), ("b", "w", 0), ("c", "v", 0), ("a", "u", 0)])
    cats = spark.createDataFrame([("x", "A"), ("z", "A"), ("y", "B"), ("w", "B")], "item_id string, category string")
    m = evaluate.ranking_metrics(recs, relevant, [2, 3], train=train, categories=cats)
    assert m["coverage@2"] == pytest.approx(2 / 6)  # x, z of six training items
    assert m["coverage@3"] == pytest.approx(4 / 6)
    x, z = -math.log2(2 / 3), -math.log2(1 / 3)  # x had 2 of 3 users, z 1
    assert m["novelty@2"] == pytest.approx((x + z + z + x) / 4)
    assert m["diversity@2"] == pytest.approx(0.0)  # both lists are all A
    assert m["diversity@3"] == pytest.approx(1 - 2 / 6)  # A, A, B: 2 of 6 ordered pairs share a category


def test_no_evaluated_users_gives_only_the_count(spark):
    empty = spark.createDataFrame([], "user_id string, item_id string")
    recs = spark.createDataFrame([("a", "x", 1)], "user_id string, item_id string, rank int")
    assert evaluate.ranking_metrics(recs, empty, [10]) == {"users": 0.0}


def test_time_split_and_relevant_items_new_to_the_user(spark):
    df = inter(
        spark,
        [
            ("a", "x", 0), ("a", "y", 1),  # train
            ("a", "x", 40), ("a", "z", 41),  # test: x is a repeat, z is new
            ("b", "z", 40),  # b has no training history: cold, not evaluated
            ("c", "x", 2), ("c", "x", 39), ("c", "y", 39),
        ],
    )
    split = evaluate.time_split(df, test_days=5)  # newest event day 41: cut at day 36
    assert split.train.count() == 3 and split.test.count() == 5
    rel = {tuple(r) for r in evaluate.relevant_items(split.train, split.test, ["purchase", "view"], False).collect()}
    assert rel == {("a", "z"), ("c", "y")}
    rel_repeat = {tuple(r) for r in evaluate.relevant_items(split.train, split.test, ["purchase", "view"], True).collect()}
    assert rel_repeat == {("a", "x"), ("a", "z"), ("c", "x"), ("c", "y")}
    # New to them as the lists see it: only an item they had with an excluded type is not new.
    typed = inter(spark, [("a", "x", "view", 0), ("a", "y", 1), ("a", "x", 40), ("a", "z", 41), ("b", "z", 40),
                          ("c", "x", 2), ("c", "x", 39), ("c", "y", 39)])  # a viewed x in training, then bought it
    split = evaluate.time_split(typed, test_days=5)
    rel = {tuple(r) for r in evaluate.relevant_items(split.train, split.test, ["purchase"], False, ["purchase"]).collect()}
    assert rel == {("a", "x"), ("a", "z"), ("c", "y")}  # a only viewed x before buying it: a hit a list can score
    assert {tuple(r) for r in evaluate.relevant_items(split.train, split.test, ["purchase"], False).collect()} == {
        ("a", "z"), ("c", "y")}
    # a short history keeps most of its days for training: at most max_share of the 41-day span is test
    capped = evaluate.time_split(df, test_days=28, max_share=0.04)  # 1.64 days: cut at day 39.36
    assert capped.train.count() == 5 and capped.test.count() == 3
    assert "1.6 days (0.04 of a 41-day history)" in capped.description


def test_leave_last_n_and_random_splits(spark):
    df = inter(spark, [("a", "x", 0), ("a", "y", 2), ("a", "z", 1), ("b", "x", 5), ("b", "y", 5)])
    s = evaluate.leave_last_n_split(df, 1)
    assert {tuple(r) for r in s.test.select(C.USER_ID, C.ITEM_ID).collect()} == {("a", "y"), ("b", "x")}  # tie: lower id
    assert s.train.count() == 3
    many = inter(spark, [(f"u{u}", f"i{i}", 0) for u in range(20) for i in range(50)])
    r1, r2 = evaluate.random_split(many, 0.2, 3), evaluate.random_split(many, 0.2, 3)
    assert r1.test.count() == r2.test.count()
    per_user = [r["count"] for r in r1.test.groupBy(C.USER_ID).count().collect()]
    assert len(per_user) == 20 and all(2 <= c <= 20 for c in per_user)  # about 10 of 50 for everyone


def test_popular_lists_skip_bought_items_and_buy_again_ranks_by_frequency(spark):
    train = inter(
        spark,
        [("a", "x", 0), ("b", "x", 0), ("c", "x", 0), ("a", "y", 0), ("b", "y", 0), ("c", "z", 0), ("a", "a1", 1), ("a", "a1", 2), ("a", "y", 3)],
    )
    users = spark.createDataFrame([("a",), ("c",)], "user_id string")
    uids = spark.createDataFrame([("a", 0), ("b", 1), ("c", 2)], "user_id string, user_idx int")
    iids = spark.createDataFrame([("x", 0), ("y", 1), ("z", 2), ("a1", 3)], "item_id string, item_idx int")
    history = recommend.indexed_history(train, uids, iids)
    idx_users = spark.createDataFrame([(0,), (2,)], "user_idx int")
    lists = recommend.popular_lists(history, idx_users, recommend.default_meta(history, history), 2, ["purchase"])
    got = {}
    for r in lists.orderBy(C.USER_IDX, C.RANK).collect():
        got.setdefault(r[C.USER_IDX], []).append((r[C.ITEM_IDX], r[C.REC_SOURCE]))
    # a bought x, y, a1: only z is left; c gets y then a1 (tied with z, which c bought, and by id)
    assert got == {0: [(2, "popular")], 2: [(1, "popular"), (3, "popular")]}
    again = evaluate.buy_again_lists(users, train, ["purchase"], 2).orderBy(C.USER_ID, C.RANK).collect()
    # a bought y and a1 twice each, y more recently; c's two items tie, lower id first.
    assert [(r[C.USER_ID], r[C.ITEM_ID]) for r in again] == [("a", "y"), ("a", "a1"), ("c", "x"), ("c", "z")]


@pytest.mark.nojvm
def test_trials_start_with_the_configured_settings_then_the_candidates_then_seeded_draws():
    base = TrainConfig()
    cfg = TuneConfig(max_trials=7, feedback_settings=3, seed=1)
    trials = tune.sample_trials(cfg, base)
    assert [t.number for t in trials] == list(range(7))
    assert trials[0].train == base
    # the shipped candidates, in order, each on top of the configured settings
    first, second = trials[1].train, trials[2].train
    assert (first.als.rank, first.als.alpha, first.recency_half_life_days) == (64, 5.0, 14.0)
    assert (second.als.rank, second.als.reg_param, second.recency_half_life_days) == (16, 0.3, None)
    assert first.event_weights == base.event_weights and first.als.max_iter == base.als.max_iter
    # the draws cover the configured number of feedback constructions besides the candidates'
    drawn = {(tuple(sorted(t.train.event_weights.items())), t.train.recency_half_life_days) for t in trials[3:]}
    assert len(drawn) == 3
    assert all(t.train.als.rank in cfg.space.rank for t in trials[3:])
    again = tune.sample_trials(cfg, base)
    assert [t.params() for t in trials] == [t.params() for t in again]  # seeded
    # a candidate equal to the configured settings is not tried twice; a budget of one trial is the configured one
    same = TuneConfig(max_trials=3, candidates=[{"rank": base.als.rank}], seed=1)
    assert [t.train for t in tune.sample_trials(same, base)][:1] == [base] and len(tune.sample_trials(same, base)) == 3
    assert [t.train for t in tune.sample_trials(TuneConfig(max_trials=1), base)] == [base]


@pytest.mark.nojvm
def test_a_candidate_with_an_unknown_key_or_a_bad_value_is_a_config_error():
    with pytest.raises(ValueError, match="unknown key"):
        TuneConfig(candidates=[{"rnak": 8}])
    with pytest.raises(ValueError):
        TuneConfig(candidates=[{"rank": 0}])


@pytest.mark.nojvm
def test_k_must_be_one_of_ks():
    with pytest.raises(ValueError, match="must be one of"):
        EvaluateConfig(k=5, ks=[10, 20])


@pytest.mark.nojvm
def test_every_fit_is_scored_with_the_configured_blend_and_the_spaces():
    assert tune.blend_choices(TuneConfig(), 0.2) == [0.0, 0.2, 0.5, 1.0]
    assert tune.blend_choices(TuneConfig(space={"blend_weight": [0.0]}), 0.25) == [0.0, 0.25]
    trials = tune.sample_trials(TuneConfig(max_trials=4), TrainConfig(), base_blend=0.25)
    assert {t.blend_weight for t in trials} == {0.25}  # the starting point; each trial's fit picks its best
    assert tune.with_blend(RecommendConfig(), 0.5).blend.weight == 0.5


def test_spark_metrics_equal_the_plain_reference_on_random_lists(spark):
    """`evaluate.ranking_metrics` (Spark aggregates) against `metrics.ranking_metrics` (the written-out definitions)."""
    import numpy as np

    from sparkrec.core import metrics

    rng = np.random.default_rng(11)
    lists = {f"u{u}": [f"i{x}" for x in rng.permutation(30)[: int(rng.integers(0, 12))]] for u in range(25)}
    relevant = {f"u{u}": {f"i{x}" for x in rng.choice(30, size=int(rng.integers(1, 6)), replace=False)} for u in range(25)}
    recs = spark.createDataFrame([(u, i, r + 1) for u, items in lists.items() for r, i in enumerate(items)],
                                 "user_id string, item_id string, rank int")
    rel = spark.createDataFrame([(u, i) for u, items in relevant.items() for i in items], "user_id string, item_id string")
    got = evaluate.ranking_metrics(recs, rel, [5, 10])
    want = metrics.ranking_metrics(lists, relevant, [5, 10])
    assert got.keys() >= want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def _ratings(spark, users=30, items=40, per_user=12):
    """A MovieLens-shaped table: one `view` (a rating) per user and item, spread over 200 days; and its id tables."""
    import random

    rng = random.Random(4)
    rows = [(f"u{u}", f"m{i}", "view", rng.randrange(200)) for u in range(users) for i in rng.sample(range(items), per_user)]
    from pyspark.sql import functions as F

    df = inter(spark, rows).withColumn(C.RATING, (F.abs(F.hash(C.USER_ID, C.ITEM_ID)) % 5 + 1).cast("double"))
    uids = spark.createDataFrame([(f"u{u}", u) for u in range(users)], "user_id string, user_idx int")
    iids = spark.createDataFrame([(f"m{i}", i) for i in range(items)], "item_id string, item_idx int")
    return df, uids, iids


def test_tuning_runs_on_a_random_split_of_a_ratings_table(spark, tmp_path):
    """Issue 32: with `evaluate.split: random`, tuning's validation split (carved from the training part with
    the evaluation's seed) had no test pairs, so tuning was skipped on every run."""
    from sparkrec.batch import protocol
    from sparkrec.core.config import load_config
    from tests.conftest import ROOT

    df, uids, iids = _ratings(spark)
    cfg = load_config(ROOT / "conf" / "local.yaml", [
        f"warehouse={tmp_path / 'wh'}", "evaluate.split=random", "evaluate.relevant_event_types=[view]",
        "evaluate.test_fraction=0.25", "recommend.exclude_event_types=[view]", "train.als.rank=4", "train.als.max_iter=2",
        "tune.max_trials=1", "tune.min_users=5", "tune.candidates=[]"])
    ev = cfg.evaluate
    training_period = protocol.split_of(df, ev).train
    # the old validation split, the evaluation's split applied again: nothing in its test part
    assert protocol.split_of(training_period, ev).test.count() == 0
    validation = protocol.validation_split(training_period, ev)
    n_val, n_train = validation.test.count(), training_period.count()
    assert 0.15 * n_train < n_val < 0.35 * n_train  # about a quarter of the training pairs, by another seed
    spark.sparkContext.setCheckpointDir(str(tmp_path / "ckpt"))
    trials, best = tune.run_trials(cfg, training_period, uids, iids)
    assert len(trials) == 1 and best.metric is not None


def test_a_split_without_relevant_events_says_which_setting_to_change(spark):
    from sparkrec.batch import protocol

    df, uids, iids = _ratings(spark, users=6, items=10, per_user=5)
    ev = EvaluateConfig()  # relevant: purchase; the table holds views only
    proto = protocol.make_protocol(protocol.split_of(df, ev), ev, uids, iids)
    try:
        assert proto.n_users == 0
        why = protocol.why_no_users(df, proto, ev)
    finally:
        proto.release()
    assert "evaluate.relevant_event_types ['purchase']" in why and "view 30" in why


def test_the_search_keeps_time_for_the_ranker_it_precedes():
    # Measured by the last evaluation: that much is kept.
    assert tune.ranker_reserve(70.0, 3, 40.0) == 70.0
    # Never measured: a cut costs about half a trial, three running side by side.
    assert tune.ranker_reserve(None, 3, 40.0) == pytest.approx(3 * tune.CUT_PER_TRIAL * 40.0)
    assert tune.ranker_reserve(0.0, 3, 40.0) == 0.0  # no ranker after the search
