"""The blocked scorer against brute force, exclusions, ties and the popular fallback."""

from __future__ import annotations

import numpy as np

from sparkrec import columns as C
from sparkrec import recommend


def brute_force(users, items, item_idx, excluded, k):
    out = {}
    for u, vec in users.items():
        scored = [(-float(np.dot(vec, items[j])), int(item_idx[j])) for j in range(len(item_idx)) if int(item_idx[j]) not in excluded.get(u, set())]
        out[u] = [i for _, i in sorted(scored)[:k]]
    return out


def test_top_k_block_matches_brute_force_with_exclusions():
    rng = np.random.default_rng(3)
    item_idx = np.array(sorted(rng.choice(1000, size=60, replace=False)))
    items = rng.normal(size=(60, 8)).astype(np.float32)
    users = {u: rng.normal(size=8).astype(np.float32) for u in range(25)}
    excluded = {u: set(rng.choice(item_idx, size=u % 7, replace=False).tolist()) for u in users}
    uarr = np.array(list(users))
    scores = np.stack([users[u] for u in uarr]) @ items.T
    got = recommend._top_k_block(uarr, scores.copy(), [np.array(sorted(excluded[u]), dtype=np.int64) for u in uarr], item_idx, 10)
    expected = brute_force(users, items, item_idx, excluded, 10)
    for u in users:
        rows = got[got[C.USER_IDX] == u].sort_values(C.RANK)
        assert rows[C.RANK].tolist() == list(range(1, 11))
        assert rows[C.ITEM_IDX].tolist() == expected[u]
        assert (np.diff(rows[C.SCORE].to_numpy()) <= 0).all()


def test_ties_go_to_the_lower_item_id_and_short_lists_stay_short():
    item_idx = np.array([3, 5, 8, 9])
    scores = np.array([[1.0, 2.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    got = recommend._top_k_block(np.array([0, 1]), scores, [np.array([], dtype=np.int64), np.array([3, 5, 8], dtype=np.int64)], item_idx, 3)
    assert list(map(tuple, got[[C.USER_IDX, C.ITEM_IDX, C.RANK]].to_numpy())) == [(0, 5, 1), (0, 8, 2), (0, 3, 3), (1, 9, 1)]


def test_recommend_all_exact_n_no_bought_items_and_fallback(spark):
    # Items 0..4 with 2-d factors; user 0 likes dimension 0, user 1 dimension 1.
    item_f = [(0, [1.0, 0.0]), (1, [0.9, 0.1]), (2, [0.0, 1.0]), (3, [0.1, 0.9]), (4, [0.5, 0.5])]
    user_f = [(0, [1.0, 0.0]), (1, [0.0, 1.0])]
    history = spark.createDataFrame(
        [
            (0, 0, "purchase"),  # user 0 bought item 0: never recommended back
            (1, 2, "view"),  # a view does not exclude
            (1, 3, "purchase"),
            (2, 4, "purchase"),  # user 2 has no factors: popular fallback
            (2, 1, "purchase"),
            (3, 1, "view"),
        ],
        "user_idx int, item_idx int, event_type string",
    )
    recs = recommend.recommend_all(
        history,
        spark.createDataFrame(user_f, "user_idx int, features array<float>"),
        spark.createDataFrame(item_f, "item_idx int, features array<float>"),
        exclude_types=["purchase"],
        n=3,
        min_history=1,
        max_items=100,
    )
    got = {}
    for r in recs.orderBy(C.USER_IDX, C.RANK).collect():
        got.setdefault(r[C.USER_IDX], []).append((r[C.ITEM_IDX], r[C.SOURCE]))
    assert got[0] == [(1, "als"), (4, "als"), (3, "als")]
    assert got[1] == [(2, "als"), (4, "als"), (1, "als")]
    # popularity by distinct users: item 1 (users 2, 3) first, then items 0, 2, 3, 4 with one user each
    assert got[2] == [(0, "popular"), (2, "popular"), (3, "popular")]
    assert got[3] == [(1, "popular"), (0, "popular"), (2, "popular")]


def test_short_als_lists_are_backfilled_from_popular(spark):
    item_f = [(0, [1.0]), (1, [0.5])]
    history = spark.createDataFrame([(0, 0, "purchase"), (1, 1, "purchase"), (1, 2, "purchase")], "user_idx int, item_idx int, event_type string")
    recs = recommend.recommend_all(
        history,
        spark.createDataFrame([(0, [1.0])], "user_idx int, features array<float>"),
        spark.createDataFrame(item_f, "item_idx int, features array<float>"),
        exclude_types=["purchase"],
        n=2,
        min_history=1,
        max_items=100,
    )
    got = [(r[C.ITEM_IDX], r[C.RANK], r[C.SOURCE]) for r in recs.where(f"{C.USER_IDX} = 0").orderBy(C.RANK).collect()]
    assert got == [(1, 1, "als"), (2, 2, "popular")]  # item 2 has no factors but is popular
