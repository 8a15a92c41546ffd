"""The ranker's kernel (`core.ranker`): candidates and their features on hand-built blocks, and a model
trained on a planted pattern. No Spark: the batch, the evaluation and the server call these functions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sparkrec.core import ranker, topk

pytestmark = pytest.mark.nojvm


def _stats(depth: int = 3) -> ranker.ItemStats:
    # Items 10..15. Recent popularity: 14 > 13 > 12 (11, 10, 15 sold nothing lately).
    per_item = pd.DataFrame({
        "item_idx": [10, 11, 12, 13, 14, 15],
        "users": [9, 5, 4, 6, 7, 1], "users_recent": [0, 0, 1, 3, 8, 0], "users_week": [0, 0, 0, 1, 4, 0],
        "age_days": [300, 200, 100, 50, 20, 5], "last_days": [90, 40, 3, 1, 0, 5],
        "price": [1.0, 2.0, 4.0, np.nan, 8.0, 3.0],
    })
    # Co-purchase: 10 goes with 12 (0.5) and 13 (0.25); 11 goes with 13 (1.0).
    pairs = pd.DataFrame({"item_idx": [10, 10, 11], "other_idx": [13, 12, 13], "weight": [0.25, 0.5, 1.0]})
    return ranker.item_stats(per_item, pairs, depth)


def _items() -> topk.ItemMatrix:
    # Factors in one dimension: the ALS score is the query times the item's value.
    return topk.ItemMatrix(np.array([10, 11, 12, 13, 14, 15]), np.array([[0.1], [0.2], [0.3], [0.4], [0.5], [0.9]]))


def test_item_stats_derive_popularity_trend_and_neighbours():
    s = _stats()
    assert s.item_idx.tolist() == [10, 11, 12, 13, 14, 15]
    row = dict(zip(ranker.ITEM_FEATURES, s.values[4].tolist()))  # item 14
    assert row["pop_all"] == pytest.approx(np.log1p(7))
    assert row["pop_recent"] == pytest.approx(np.log1p(8))
    assert row["trend"] == pytest.approx((4 + 1) / (8 / 4 + 1))
    assert (row["item_age"], row["item_last_sale"], row["item_price"]) == (20, 0, 8)
    assert s.recent.tolist() == [14, 13, 12]  # items nobody bought lately are not in it
    # Neighbours strongest first, per item position.
    assert s.nb_item[s.nb_ptr[0]:s.nb_ptr[1]].tolist() == [12, 13]
    assert s.nb_item[s.nb_ptr[1]:s.nb_ptr[2]].tolist() == [13]
    assert s.nb_ptr[-1] == 3


def test_co_purchase_weights_each_neighbour_by_how_recently_the_customer_bought_its_anchor():
    s = _stats()
    # Customer 0 bought 10 today and 11 fourteen days ago (half-life 14: weight 0.5); customer 1 nothing.
    rows, items, score, anchor = ranker.co_purchase([np.array([10, 11]), np.array([], dtype=np.int64)],
                                                    [np.array([0.0, 14.0]), np.array([])], s, 14.0)
    got = dict(zip(zip(rows.tolist(), items.tolist()), score.tolist()))
    assert got == pytest.approx({(0, 12): 0.5, (0, 13): 0.25 + 0.5 * 1.0})
    # 13 owes 0.25 to 10 and 0.5 to 11: 11 is the item it is explained by.
    assert dict(zip(items.tolist(), anchor.tolist())) == {12: 10, 13: 11}


def test_candidates_are_the_sources_union_with_features_checked_by_hand():
    s = _stats()
    r = ranker.Ranker(model="", depth=2)
    user = np.array([[4, 3, 2.0, 100.0, 2.0]])
    frame = ranker.candidates(np.array([[1.0]], dtype=np.float32), [np.array([10, 11])], _items(), s, r,
                              [np.array([10, 11])], [np.array([0.0, 14.0])], user)
    by_item = frame.set_index(ranker.ITEM)
    # ALS top 2 (bought 10, 11 excluded): 15 (0.9), 14 (0.5). Co-purchase: 13 (0.75), 12 (0.5). Recent: 14, 13.
    assert sorted(by_item.index.tolist()) == [12, 13, 14, 15]
    assert by_item.loc[15, "als_rank"] == 1 and by_item.loc[14, "als_rank"] == 2
    assert by_item.loc[13, "als_rank"] == 3  # beyond the depth: depth + 1
    assert by_item.loc[13, "co_rank"] == 1 and by_item.loc[12, "co_rank"] == 2 and by_item.loc[15, "co_rank"] == 3
    assert by_item.loc[14, "recent_rank"] == 1 and by_item.loc[13, "recent_rank"] == 2
    assert by_item.loc[12, "recent_rank"] == 3  # third in the recent list: past the depth
    assert by_item.loc[13, "co_score"] == pytest.approx(0.75) and by_item.loc[15, "co_score"] == 0
    assert by_item.loc[12, "als_score"] == pytest.approx(0.3)
    assert by_item.loc[14, "price_ratio"] == pytest.approx(8 / 2.0)
    assert np.isnan(by_item.loc[13, "price_ratio"])  # the item's price is unknown
    assert (by_item["user_items"] == 4).all() and (by_item["user_first"] == 100).all()
    assert list(frame.columns) == [ranker.ROW, ranker.ITEM, *ranker.FEATURES, ranker.ANCHOR]
    assert by_item[ranker.ANCHOR].to_dict() == {12: 10, 13: 11, 14: -1, 15: -1}  # only co-purchase has one


def test_an_excluded_or_unlisted_item_is_never_a_candidate():
    s = _stats()
    r = ranker.Ranker(model="", depth=5)
    # Item 13 is excluded; the kernel's matrix lacks 12 (not allowed by the shop's rules).
    items = topk.ItemMatrix(np.array([10, 11, 13, 14, 15]), np.array([[0.1], [0.2], [0.4], [0.5], [0.9]]))
    frame = ranker.candidates(np.array([[1.0]], dtype=np.float32), [np.array([10, 13])], items, s, r,
                              [np.array([10, 11])], [np.array([0.0, 0.0])], np.full((1, 5), np.nan))
    assert set(frame[ranker.ITEM]) == {11, 14, 15}


def test_a_source_left_out_gives_no_candidates_but_keeps_its_rank_feature():
    s = _stats()
    r = ranker.Ranker(model="", depth=2, sources=("als",))
    frame = ranker.candidates(np.array([[1.0]], dtype=np.float32), [np.array([10, 11])], _items(), s, r,
                              [np.array([10, 11])], [np.array([0.0, 14.0])], np.full((1, 5), np.nan))
    assert sorted(frame[ranker.ITEM]) == [14, 15]
    assert frame.set_index(ranker.ITEM).loc[14, "recent_rank"] == 1


def _planted(rng: np.random.Generator, customers: int, group_offset: int = 0) -> pd.DataFrame:
    """Candidates whose label follows co_score and a young item, not the ALS score (which is noise)."""
    rows = customers * 30
    frame = pd.DataFrame({f: rng.normal(size=rows) for f in ranker.FEATURES})
    frame["group"] = np.repeat(np.arange(customers) + group_offset, 30)
    signal = 2.0 * frame["co_score"] - 1.5 * (frame["item_age"] > 1.0) + rng.normal(scale=0.3, size=rows)
    top = frame.assign(s=signal).groupby("group")["s"].rank(ascending=False, method="first")
    frame["label"] = (top <= 2).astype(int)
    return frame


def test_a_ranker_trained_on_a_planted_pattern_recovers_it():
    rng = np.random.default_rng(7)
    frames = [_planted(rng, 300, 0), _planted(rng, 300, 1000)]
    model, info = ranker.fit(frames, seed=3)
    assert info["rounds"][0] >= 1 and info["groups"] == [300, 300]
    r = ranker.Ranker(model=model)
    gains = r.gains()
    assert max(gains, key=gains.get) == "co_score"
    assert gains["co_score"] + gains["item_age"] > 0.6
    # On fresh customers the model's top 2 hold the planted positives far above chance (2 in 30).
    test = _planted(rng, 200, 5000)
    test["pred"] = r.predict(test)
    picked = test.assign(k=test.groupby("group")["pred"].rank(ascending=False, method="first")).query("k <= 2")
    assert picked["label"].mean() > 0.5


def test_a_trained_ranker_ranks_a_block_and_caps_categories():
    rng = np.random.default_rng(1)
    model, _ = ranker.fit([_planted(rng, 200), _planted(rng, 200, 1000)], seed=1)
    r = ranker.Ranker(model=model, depth=3)
    items = topk.ItemMatrix(np.array([10, 11, 12, 13, 14, 15]), np.ones((6, 1)), np.array([0, 0, 0, 1, 1, -1]))
    frame = pd.DataFrame({ranker.ROW: [0] * 4, ranker.ITEM: [10, 11, 12, 13],
                          **{f: [0.0] * 4 for f in ranker.FEATURES}})
    frame["co_score"] = [3.0, 2.0, 1.0, -1.0]
    sel = ranker.rank(frame, r, items, n=3, cap=1)
    # Ordered by co_score, but category 0 may hold only one item: 10, then 13 (category 1).
    assert items.item_idx[sel.pos].tolist() == [10, 13]
    assert sel.rank.tolist() == [1, 2]


def test_a_ranker_pickles_as_its_model_string():
    import pickle

    rng = np.random.default_rng(2)
    model, _ = ranker.fit([_planted(rng, 100)], seed=2, max_rounds=20)
    r = ranker.Ranker(model=model)
    frame = _planted(rng, 5)
    before = r.predict(frame)
    copy = pickle.loads(pickle.dumps(r))
    assert copy._booster is None
    np.testing.assert_allclose(copy.predict(frame), before)


def test_nothing_to_learn_from_says_so():
    frame = _planted(np.random.default_rng(0), 10).assign(label=0)
    with pytest.raises(ValueError, match="no customer at any training cut bought one of their candidates"):
        ranker.fit([frame])


def test_basket_pairs_count_the_baskets_holding_each_pair():
    i, j, n = ranker.basket_pairs([[5, 900], [5, 900, 7], [7], [], None])
    got = dict(zip(zip(i.tolist(), j.tolist()), n.tolist()))
    assert got == {(5, 5): 2, (900, 900): 2, (7, 7): 2, (5, 900): 2, (900, 5): 2, (5, 7): 1, (7, 5): 1,
                   (900, 7): 1, (7, 900): 1}
    assert all(len(a) == 0 for a in ranker.basket_pairs([[], None]))


def test_strongest_neighbours_add_partial_counts_and_keep_the_top_k():
    # Two tasks' partial counts of item 1's pairs; item 1 is in 4 baskets, 2 in 1, 3 in 4, 4 in 1.
    got = ranker.strongest_neighbours(np.array([1, 1, 1, 1]), np.array([2, 3, 3, 4]), np.array([1, 1, 2, 1]),
                                      np.array([1, 2, 3, 4]), np.array([4, 1, 4, 1]), k=2)
    assert got["item_idx"].tolist() == [1, 1]
    # 3: 3 / sqrt(4 x 4) = 0.75; 2 and 4 tie at 1 / sqrt(4 x 1) = 0.5: the lower id is kept.
    assert got["other_idx"].tolist() == [3, 2]
    assert got["weight"].tolist() == pytest.approx([0.75, 0.5])


def test_a_ranked_co_purchase_item_is_explained_by_the_item_it_is_bought_with():
    """Through the list kernel, as the batch and the server call it: the ranked list's co-purchase items name
    the customer's item that brought them, not the one their factors resemble most."""
    from sparkrec.core import block
    from sparkrec.core import columns as C
    from sparkrec.core.recnames import EXCLUDED, HIST, HIST_TYPE, RK_AGE, RK_ITEMS, RK_USER

    rng = np.random.default_rng(1)
    model, _ = ranker.fit([_planted(rng, 200), _planted(rng, 200, 1000)], seed=1)  # co_score decides
    items = _items()
    seq = topk.FillSequence.of([14], [1.0], [-1], ["popular"], [0])
    ids = items.item_idx.tolist()
    plan = block.Plan(n=2, cap=None, seq=seq, items=items, unit=topk.ItemMatrix(items.item_idx, topk.normalized(items.vectors)),
                      catalogue=block.Catalogue(items.item_idx, [f"i{i}" for i in ids], [f"Item {i}" for i in ids], [None] * 6),
                      ranker=ranker.Ranker(model=model, depth=3), stats=_stats())
    batch = pd.DataFrame({C.USER_IDX: [0], C.USER_ID: ["u0"], C.FEATURES: [[1.0]], EXCLUDED: [[10, 11]],
                          HIST: [[10, 11]], HIST_TYPE: [[3, 3]], RK_ITEMS: [[10, 11]], RK_AGE: [[0.0, 14.0]],
                          RK_USER: [[2.0, 2.0, 0.0, 100.0, 2.0]]})
    got = block.lists(batch, plan).set_index(C.RANK)
    # In one dimension every factor points the same way: similarity alone would name the first history item, 10.
    assert got.loc[1, C.ITEM_ID] == "i13" and got.loc[1, C.REC_SOURCE] == "ranked"
    assert got.loc[1, C.BECAUSE_ITEM_ID] == "i11" and got.loc[1, C.EXPLANATION] == "because you bought Item 11"
    assert got.loc[2, C.ITEM_ID] == "i12" and got.loc[2, C.BECAUSE_ITEM_ID] == "i10"


def test_anchors_follow_the_selection_and_a_frame_without_them_gives_none():
    items = _items()
    frame = pd.DataFrame({ranker.ROW: [0, 0, 1], ranker.ITEM: [12, 13, 12], ranker.ANCHOR: [10, -1, 11]})
    sel = topk.Selection(row=np.array([1, 0, 0]), pos=np.array([2, 3, 2]), score=np.zeros(3), rank=np.array([1, 1, 2]))
    assert ranker.anchors(frame, items, sel).tolist() == [11, -1, 10]
    assert ranker.anchors(frame.drop(columns=[ranker.ANCHOR]), items, sel).tolist() == [-1, -1, -1]


def test_a_customers_activity_is_counted_by_hand():
    day = ranker.DAY_US
    # Customer 0: three events on two days, prices 4, 1, 10. Customer 1: one event, no price. Customer 2: none.
    user = np.array([0, 0, 1, 0])
    ts = np.array([10 * day + 5, 10 * day + 9, 3 * day, 12 * day])
    price = np.array([4.0, 1.0, np.nan, 10.0])
    sessions, first, last_day, median = ranker.activity(user, ts, price, 3)
    assert sessions.tolist() == [2, 1, 0]
    assert first[:2].tolist() == [10 * day + 5, 3 * day]
    assert last_day[:2].tolist() == [12, 3]
    # Spark's percentile_approx(price, 0.5): the lower middle value (4 of 1, 4, 10); none without a price.
    assert median[0] == 4.0 and np.isnan(median[1]) and np.isnan(median[2])
    assert ranker.activity(np.zeros(4, np.int64), np.arange(4) * day, np.array([4.0, 1.0, 3.0, 2.0]), 1)[3][0] == 2.0


def test_a_customers_inputs_age_from_the_reference():
    day = ranker.DAY_US
    items, ages, user = ranker.customer_inputs(np.array([7, 9]), np.array([8 * day, 5 * day]), 3, 2 * day, 4.5, 10 * day)
    assert items.tolist() == [7, 9] and ages.tolist() == [2.0, 5.0]
    assert user.tolist() == [2.0, 3.0, 2.0, 8.0, 4.5]  # items, days, last, first, median price (USER_FEATURES)


def test_item_statistics_go_through_serving_items_unchanged():
    """The server ranks with the statistics the batch ranked with: written per catalogue row, read back whole."""
    from sparkrec.core import block, serving

    stats = _stats()
    seq = topk.FillSequence(np.array([14]), np.array([1.0], np.float32), np.array([-1], np.int32),
                            np.array([0], np.int8), ("popular",))
    ids = np.arange(9, 17)
    cat = block.Catalogue(ids, np.array([f"k{i}" for i in ids], dtype=object), np.full(len(ids), None, dtype=object),
                          np.full(len(ids), None, dtype=object))
    plan = block.Plan(n=3, cap=None, seq=seq, items=_items(), catalogue=cat,
                      ranker=ranker.Ranker(model="m", depth=3, co_half_life_days=7.0, features=("als_score", "co_score")),
                      stats=stats)
    rows, settings = serving.plan_rows(plan), serving.plan_settings(plan)
    back = serving.plan_of(rows, settings, None, "m")
    for f in ("item_idx", "values", "recent", "nb_ptr", "nb_item", "nb_weight"):
        np.testing.assert_array_equal(getattr(back.stats, f), getattr(stats, f), err_msg=f)
    assert (back.ranker.depth, back.ranker.co_half_life_days, back.ranker.features) == (3, 7.0, ("als_score", "co_score"))
    # Without the model the plan comes back unranked; a plan without a ranker writes null statistics.
    assert serving.plan_of(rows, settings, None).ranker is None
    plain = serving.plan_rows(block.Plan(n=3, cap=None, seq=seq, items=_items(), catalogue=cat))
    assert plain[serving.RK_VALUES].isna().all() and serving.stats_of(plain) is None


def test_averaged_models_score_the_mean_of_their_members_and_store_as_one_text():
    rng = np.random.default_rng(4)
    frames = [_planted(rng, 120, 0), _planted(rng, 120, 1000)]
    text, info = ranker.fit(frames, seed=5, models=2, max_rounds=30)
    assert len(info["rounds"]) == 2 and len(ranker.split_models(text)) == 2
    one, two = (ranker.Ranker(model=ranker.fit(frames, seed=s, max_rounds=30)[0]) for s in (5, 6))
    test = _planted(rng, 20, 9000)
    both = ranker.Ranker(model=text)
    np.testing.assert_allclose(both.predict(test), (one.predict(test) + two.predict(test)) / 2)
    assert sum(both.gains().values()) == pytest.approx(1.0, abs=1e-3)
    # A single model stays LightGBM's own text, as rankers stored before averaging were.
    assert ranker.split_models(one.model) == [one.model] and not one.model.startswith("{")
