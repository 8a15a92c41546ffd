"""The learned search ranking's kernel without a JVM: its features from a query's matches, the pseudo-query rule, and
a fit that learns what decides the bought item (and only that)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sparkrec.core import matching, ranker, search, searchrank

pytestmark = pytest.mark.nojvm

F = {f: j for j, f in enumerate(searchrank.FEATURES)}


def found(item_idx, text, kinds, key=None) -> search.Found:
    words = [matching.Word(f"w{j}", np.zeros(0, np.int64), np.zeros(0, np.int8)) for j in range(np.shape(kinds)[1])]
    n = len(item_idx)
    return search.Found(words, np.asarray(item_idx, np.int64), np.asarray(text, np.float32),
                        np.asarray(kinds, np.int8), np.zeros(n, bool) if key is None else np.asarray(key, bool))


def stats_of(ids, users, recent) -> ranker.ItemStats:
    per_item = pd.DataFrame({"item_idx": ids, "users": users, "users_recent": recent, "users_week": 0,
                             "age_days": 100.0, "last_days": 1.0, "price": 2.0})
    pairs = pd.DataFrame({"item_idx": [ids[0]], "other_idx": [ids[1]], "weight": [0.5]})
    return ranker.item_stats(per_item, pairs, 10)


def test_features_of_a_query_s_matches_from_the_index_the_items_and_the_customer():
    E, P, T = matching.EXACT, matching.PREFIX, matching.TYPO
    f = found([10, 11, 12], [4.0, 2.0, 0.0], [[E, E], [P, 0], [T, 0]], key=[False, False, True])
    stats = stats_of([10, 11], [9, 3], [4, 0])
    # She bought item 11 on 3 days: 40 and 20 days ago, last 10 days ago (a 15-day interval); item 10 once.
    me = searchrank.Customer(np.array([10, 11]), np.array([1.0, 3.0]), np.array([5.0, 10.0]), np.array([5.0, 40.0]),
                             factor=np.array([1.0, 0.0]), price=4.0, co_item=np.array([12]), co_score=np.array([0.7]),
                             categories=np.array([0, 1]))
    vectors = np.array([[2.0, 1.0], [0.5, 0.0], [np.nan, np.nan]])
    x = searchrank.features(f, stats, np.array([1, 1, -1]), vectors, me)
    assert x.dtype == np.float32 and x.shape == (3, len(searchrank.FEATURES))
    np.testing.assert_allclose(x[:, F["text_rel"]], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(x[:, F["words_share"]], [1.0, 0.5, 0.5])
    np.testing.assert_allclose(x[:, F["typos"]], [0, 0, 1])
    np.testing.assert_allclose(x[:, F["prefix_only"]], [0, 1, 0])
    np.testing.assert_allclose(x[:, F["key"]], [0, 0, 1])
    np.testing.assert_allclose(x[:, F["pop_all"]][:2], np.log1p([9, 3]), rtol=1e-6)
    assert np.isnan(x[2, F["pop_all"]])  # item 12 has no figures
    np.testing.assert_allclose(x[:, F["mine_days_bought"]], [1, 3, 0])
    np.testing.assert_allclose(x[:2, F["mine_last"]], [5, 10])
    assert np.isnan(x[0, F["mine_interval"]])  # bought once: no interval
    np.testing.assert_allclose(x[1, F["mine_interval"]], 15.0)
    np.testing.assert_allclose(x[1, F["mine_due"]], 10 / 15, rtol=1e-6)
    np.testing.assert_allclose(x[:, F["cat_share"]], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(x[:2, F["als_score"]], [2.0, 0.5])
    np.testing.assert_allclose(x[:2, F["als_rel"]], [0.0, -1.5])
    np.testing.assert_allclose(x[:, F["co_score"]], [0, 0, 0.7], rtol=1e-6)
    np.testing.assert_allclose(x[:2, F["price_ratio"]], [0.5, 0.5])
    anyone = searchrank.features(f, stats, None, None, None)
    assert np.isnan(anyone[:, F["mine_last"]]).all() and np.isnan(anyone[:, F["als_score"]]).all()
    np.testing.assert_allclose(anyone[:, F["text_rel"]], x[:, F["text_rel"]])


def test_a_pseudo_query_is_a_word_of_the_name_in_a_band_of_items():
    names = ["red heart bag", "red lamp", "red mug", "blue bag", "blue mug", "ox 42"]
    items_of = searchrank.word_items(names)
    assert items_of["red"] == 3 and items_of["bag"] == 2 and "ox" not in items_of and "42" not in items_of
    rng = np.random.default_rng(0)
    drawn = {searchrank.pseudo_query("Red Heart Bag", items_of, rng, 2, 3) for _ in range(50)}
    assert drawn == {"red", "bag"}  # 'heart' is in one name only
    assert searchrank.pseudo_query("Ox 42", items_of, rng, 2, 3) is None


def test_the_fit_learns_what_decides_the_bought_item_and_scores_new_queries_by_it():
    rng = np.random.default_rng(7)

    def group():
        n = 30
        x = rng.normal(size=(n, len(searchrank.FEATURES))).astype(np.float32)
        return x, int(np.argmax(x[:, F["co_score"]]))  # the customer bought what goes with their items

    train = [group() for _ in range(600)]
    model, info = searchrank.fit(train, cuts=[g % 2 for g in range(600)], models=1, negatives=10)
    assert info["groups"] == [300, 300]
    held = [group() for _ in range(200)]
    hits = [int(np.argmax(model.score(x)) == t) for x, t in held]
    assert np.mean(hits) > 0.8  # the feature that decides is learnt; chance would be 1 in 30
    gains = model._ranker.gains()
    assert max(gains, key=gains.get) == "co_score"


def test_a_new_target_s_group_without_the_bought_items():
    bought = F["mine_days_bought"]
    x = np.zeros((4, len(searchrank.FEATURES)), np.float32)
    x[[0, 2], bought] = [2, 1]  # matches 0 and 2 bought before; the target, 3, never
    repeat = x.copy()
    extra, source = searchrank.without_bought([(x, 3), (repeat, 0), (np.zeros_like(x), 1)])
    assert source == [0] and len(extra) == 1  # a repeat purchase, or a customer with nothing bought: as served only
    rows, target = extra[0]
    assert len(rows) == 2 and target == 1 and (rows[:, bought] == 0).all()
