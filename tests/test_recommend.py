"""The recommend stage's Spark side on hand-built factors: exactly N, rules, cold start, similar items."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from sparkrec.batch import recommend
from sparkrec.core import columns as C
from sparkrec.core.config import RecommendConfig

T0 = datetime(2025, 6, 1)
HISTORY_SCHEMA = "user_idx int, item_idx int, event_type string, event_ts timestamp"
ITEM_SCHEMA = "item_idx int, features array<float>"
USER_SCHEMA = "user_idx int, features array<float>"
META_SCHEMA = "item_id string, item_idx int"
ITEMS_SCHEMA = "item_id string, category string, available boolean"


def cfg(**kw) -> RecommendConfig:
    return RecommendConfig.model_validate(kw)


def history_df(spark, rows):
    return spark.createDataFrame([(u, i, t, T0 + timedelta(days=d)) for u, i, t, d in rows], HISTORY_SCHEMA)


def lists(recs):
    got = {}
    for r in recs.orderBy(C.USER_IDX, C.RANK).collect():
        got.setdefault(r[C.USER_IDX], []).append((r[C.ITEM_IDX], r[C.REC_SOURCE]))
    return got


def meta_of(spark, history, items_rows, rules=None):
    ids = spark.createDataFrame([(f"i{i}", i) for i in range(10)], META_SCHEMA)
    items = spark.createDataFrame(items_rows, ITEMS_SCHEMA) if items_rows is not None else None
    return recommend.item_meta(ids, items, history, (rules or cfg()).rules)


def test_model_lists_exclude_bought_items_and_cold_users_get_popular(spark):
    # Items 0..4 with 2-d factors; user 0 likes dimension 0, user 1 dimension 1.
    item_f = [(0, [1.0, 0.0]), (1, [0.9, 0.1]), (2, [0.0, 1.0]), (3, [0.1, 0.9]), (4, [0.5, 0.5])]
    user_f = [(0, [1.0, 0.0]), (1, [0.0, 1.0])]
    history = history_df(
        spark,
        [
            (0, 0, "purchase", 0),  # user 0 bought item 0: never recommended back
            (1, 2, "view", 0),  # a view does not exclude
            (1, 3, "purchase", 0),
            (2, 4, "purchase", 0),  # user 2 has no factors: popular fallback
            (2, 1, "purchase", 0),
            (3, 1, "view", 0),
        ],
    )
    recs = recommend.recommend_all(
        history, spark.createDataFrame(user_f, USER_SCHEMA), spark.createDataFrame(item_f, ITEM_SCHEMA), cfg(n=3)
    )
    got = lists(recs)
    assert got[0] == [(1, "als"), (4, "als"), (3, "als")]
    assert got[1] == [(2, "als"), (4, "als"), (1, "als")]
    # popularity by distinct users: item 1 (users 2, 3) first, then items 0, 2, 3, 4 with one user each
    assert got[2] == [(0, "popular"), (2, "popular"), (3, "popular")]
    assert got[3] == [(1, "popular"), (0, "popular"), (2, "popular")]


def test_short_model_lists_are_backfilled_from_popular(spark):
    history = history_df(spark, [(0, 0, "purchase", 0), (1, 1, "purchase", 0), (1, 2, "purchase", 0)])
    recs = recommend.recommend_all(
        history,
        spark.createDataFrame([(0, [1.0])], USER_SCHEMA),
        spark.createDataFrame([(0, [1.0]), (1, [0.5])], ITEM_SCHEMA),
        cfg(n=2),
    )
    assert lists(recs)[0] == [(1, "als"), (2, "popular")]  # item 2 has no factors but is popular


def test_rules_unavailable_excluded_and_categories(spark):
    item_f = spark.createDataFrame([(i, [float(10 - i)]) for i in range(6)], ITEM_SCHEMA)
    history = history_df(spark, [(0, 5, "view", 0)])
    items = [
        ("i0", "shoes", False),  # out of stock
        ("i1", "shoes", True),
        ("i2", "toys", True),  # excluded category
        ("i3", "shoes", True),  # on the explicit exclusion list
        ("i4", "hats", True),
        ("i5", "hats", True),
    ]
    c = cfg(n=3, rules={"exclude_items": ["i3"], "exclude_categories": ["toys"]})
    meta = meta_of(spark, history, items, c)
    recs = recommend.recommend_all(history, spark.createDataFrame([(0, [1.0])], USER_SCHEMA), item_f, c, meta)
    assert lists(recs)[0] == [(1, "als"), (4, "als"), (5, "als")]


def test_include_categories_and_cap_per_category(spark):
    item_f = spark.createDataFrame([(i, [float(10 - i)]) for i in range(6)], ITEM_SCHEMA)
    history = history_df(spark, [(0, 5, "view", 0), (1, 0, "view", 0), (1, 1, "view", 0), (1, 4, "view", 0)])
    items = [("i0", "a", True), ("i1", "a", True), ("i2", "a", True), ("i3", "b", True), ("i4", "b", True), ("i5", "c", True)]
    c = cfg(n=3, rules={"max_per_category": 1, "include_categories": ["a", "b", "c"]})
    meta = meta_of(spark, history, items, c)
    recs = recommend.recommend_all(history, spark.createDataFrame([(0, [1.0])], USER_SCHEMA), item_f, c, meta)
    got = lists(recs)
    assert got[0] == [(0, "als"), (3, "als"), (5, "als")]  # one per category, best first
    # User 1 has no factors: popular items (0, 1, 4 with one user, then the rest), one per category.
    assert [i for i, _ in got[1]] == [0, 4, 5] and {s for _, s in got[1]} == {"popular"}

    only_b = cfg(n=3, rules={"include_categories": ["b"]})
    recs = recommend.recommend_all(
        history, spark.createDataFrame([(0, [1.0])], USER_SCHEMA), item_f, only_b, meta_of(spark, history, items, only_b)
    )
    assert lists(recs)[0] == [(3, "als"), (4, "als")]  # only two allowed items exist: a short list, not a wrong one


def test_boost_lifts_a_promoted_item(spark):
    item_f = spark.createDataFrame([(0, [1.0]), (1, [0.9]), (2, [0.5])], ITEM_SCHEMA)
    history = history_df(spark, [(0, 0, "view", 0)])
    c = cfg(n=2, rules={"boost": {"factor": 1.9, "items": ["i2"]}})
    meta = meta_of(spark, history, None, c)
    got = recommend.recommend_all(history, spark.createDataFrame([(0, [1.0])], USER_SCHEMA), item_f, c, meta)
    rows = got.orderBy(C.RANK).collect()
    assert [r[C.ITEM_IDX] for r in rows] == [0, 2]
    assert rows[1][C.SCORE] == pytest.approx(0.95)  # 0.5 x 1.9 beats item 1's 0.9


def test_cold_users_get_trending_then_popular(spark):
    # Item 0 was popular long ago; item 1 is what people bought in the last week.
    history = history_df(
        spark,
        [(1, 0, "view", 0), (2, 0, "view", 0), (3, 0, "view", 0), (4, 1, "view", 30), (5, 1, "view", 31), (9, 2, "purchase", 31)],
    )
    item_f = spark.createDataFrame([(0, [1.0]), (1, [1.0]), (2, [1.0])], ITEM_SCHEMA)
    no_factors = spark.createDataFrame([], USER_SCHEMA)
    got = lists(recommend.recommend_all(history, no_factors, item_f, cfg(n=2, fallback="trending", trending_days=7)))
    assert got[1] == [(1, "trending"), (2, "trending")]
    assert got[9] == [(1, "trending"), (0, "popular")]  # bought 2; the window has nothing else


def test_cold_users_get_popular_items_of_their_categories(spark):
    history = history_df(spark, [(1, 0, "view", 0), (2, 0, "view", 0), (3, 2, "view", 0), (3, 3, "view", 0), (4, 1, "purchase", 0)])
    items = [("i0", "a", True), ("i1", "b", True), ("i2", "b", True), ("i3", "c", True)]
    c = cfg(n=2, fallback="category_popular")
    meta = meta_of(spark, history, items, c)
    item_f = spark.createDataFrame([(i, [1.0]) for i in range(4)], ITEM_SCHEMA)
    got = lists(recommend.recommend_all(history, spark.createDataFrame([], USER_SCHEMA), item_f, c, meta))
    assert got[4] == [(2, "category_popular"), (0, "popular")]  # bought in b: b's other item first


def test_explanations_name_the_closest_item_bought(spark):
    item_f = spark.createDataFrame([(0, [1.0, 0.0]), (1, [0.0, 1.0]), (2, [0.9, 0.1]), (3, [0.1, 0.9])], ITEM_SCHEMA)
    history = history_df(spark, [(0, 0, "purchase", 0), (0, 1, "view", 0)])
    # Views excluded too, so the two remaining items tie and both get explained.
    c = cfg(n=2, exclude_event_types=["purchase", "view"])
    recs = recommend.recommend_all(history, spark.createDataFrame([(0, [1.0, 1.0])], USER_SCHEMA), item_f, c)
    ids = spark.createDataFrame([("u0", 0)], "user_id string, user_idx int")
    meta = meta_of(spark, history, None)
    out = {r[C.ITEM_ID]: r[C.EXPLANATION] for r in recommend.with_keys(recs, ids, meta, 7).collect()}
    assert out == {"i2": "because you bought i0", "i3": "because you viewed i1"}


def test_exploration_gives_the_last_slots_to_unseen_items(spark):
    recs = spark.createDataFrame(
        [("u1", f"i{k}", k, 1.0, "als", None, "x") for k in range(1, 4)],
        "user_id string, item_id string, rank int, score float, source string, because_item_id string, explanation string",
    )
    got = recommend.with_exploration(recs, ["new1", "new2"], n=3, slots=1).orderBy(C.RANK).collect()
    assert [r[C.ITEM_ID] for r in got][:2] == ["i1", "i2"]
    assert got[2][C.REC_SOURCE] == "exploration" and got[2][C.ITEM_ID] in {"new1", "new2"} and got[2][C.RANK] == 3


def test_similar_items_by_cosine_never_itself_nor_unavailable(spark):
    item_f = spark.createDataFrame([(0, [1.0, 0.0]), (1, [2.0, 0.1]), (2, [0.0, 1.0]), (3, [0.7, 0.7])], ITEM_SCHEMA)
    history = history_df(spark, [(0, 0, "view", 0)])
    meta = meta_of(spark, history, [("i0", None, True), ("i1", None, True), ("i2", None, True), ("i3", None, False)])
    sim = recommend.similar_items(item_f, meta, 2, 100)
    got = {}
    for r in sim.orderBy(C.ITEM_IDX, C.RANK).collect():
        got.setdefault(r[C.ITEM_IDX], []).append(r["_similar_idx"])
    assert got == {0: [1, 2], 1: [0, 2], 2: [1, 0], 3: [1, 0]}  # cosine ignores length; 3 is out of stock


def test_chunked_scoring_equals_one_broadcast(spark):
    import random

    rnd = random.Random(5)
    item_f = spark.createDataFrame([(i, [rnd.uniform(-1, 1) for _ in range(4)]) for i in range(40)], ITEM_SCHEMA)
    user_f = spark.createDataFrame([(u, [rnd.uniform(-1, 1) for _ in range(4)]) for u in range(15)], USER_SCHEMA)
    history = history_df(spark, [(u, (u * 7 + k) % 40, "purchase", 0) for u in range(15) for k in range(3)])
    items = [(f"i{i}", f"c{i % 3}", True) for i in range(10)]
    c = cfg(n=6, rules={"max_per_category": 2})
    ids = spark.createDataFrame([(f"i{i}", i) for i in range(40)], META_SCHEMA)
    meta = recommend.item_meta(ids, spark.createDataFrame(items, ITEMS_SCHEMA), history, c.rules)
    one = lists(recommend.recommend_all(history, user_f, item_f, c, meta))
    chunked = lists(recommend.recommend_all(history, user_f, item_f, cfg(n=6, rules={"max_per_category": 2}, max_broadcast_items=7), meta))
    assert one == chunked and all(len(v) == 6 for v in one.values())


def test_a_blended_list_ranks_model_score_plus_weight_times_recent_popularity(spark):
    """Issue 17 (groundwork): the hybrid list is one exact top-k over [factors, popularity] vectors."""
    import numpy as np

    item_f = spark.createDataFrame([(0, [1.0, 0.0]), (1, [0.8, 0.0]), (2, [0.5, 0.0]), (3, [0.0, 1.0])], ITEM_SCHEMA)
    # User 0 bought item 3; recently, users 1-3 all viewed item 2, one viewed item 1; item 0 was popular long ago.
    rows = [(0, 3, "purchase", 40), (1, 2, "view", 39), (2, 2, "view", 39), (3, 2, "view", 40), (1, 1, "view", 40),
            (4, 0, "view", 0), (5, 0, "view", 0)]
    history = history_df(spark, rows)
    users = spark.createDataFrame([(0, [1.0, 0.0])], USER_SCHEMA)
    alone = lists(recommend.recommend_all(history, users, item_f, cfg(n=3)))[0]
    assert [i for i, _ in alone] == [0, 1, 2]
    blended = recommend.recommend_all(history, users, item_f, cfg(n=3, blend={"weight": 0.6, "days": 7}))
    got = [(r[C.ITEM_IDX], r[C.SCORE]) for r in blended.where("user_idx = 0").orderBy(C.RANK).collect()]
    pop = {2: 1.0, 1: 1 / 3}  # distinct users in the last 7 days over the top item's 3; item 0's views are too old
    expected = sorted(((i, [1.0, 0.8, 0.5][i] + 0.6 * pop.get(i, 0.0)) for i in (0, 1, 2)), key=lambda t: -t[1])
    assert [i for i, _ in got] == [i for i, _ in expected] == [2, 0, 1]
    assert np.allclose([s for _, s in got], [s for _, s in expected], atol=1e-6)
