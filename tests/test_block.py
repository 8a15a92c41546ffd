"""The recommend stage's worker side without Spark: a block of users to published rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sparkrec.core import block, topk
from sparkrec.core import columns as C

pytestmark = pytest.mark.nojvm


def plan(n=3, cap=None, keyed=True):
    # Items 0..4 with 2-d factors; item 4 has no category; 0 and 1 share "Kitchen".
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.5, 0.5]], dtype=np.float32)
    items = topk.ItemMatrix(np.arange(5), vectors, np.array([0, 0, 1, 1, -1]))
    unit = topk.ItemMatrix(np.arange(5), topk.normalized(vectors))
    seq = topk.FillSequence.of([4, 2, 0], [9.0, 5.0, 1.0], [-1, 1, 0], ["popular"] * 3, [0, 0, 0])
    cat = block.Catalogue(np.arange(5), [f"i{i}" for i in range(5)], ["Teapot", None, None, None, None],
                          ["Kitchen", "Kitchen", "Garden", "Garden", None])
    return block.Plan(n=n, cap=cap, seq=seq, items=items, unit=unit, catalogue=cat if keyed else None)


def users(rows):
    return pd.DataFrame(rows, columns=[C.USER_IDX, C.USER_ID, C.FEATURES, "_excluded", "_hist", "_hist_type"])


def test_a_block_scores_warm_users_fills_cold_ones_and_explains_each_row():
    got = block.lists(users([
        # u0 bought the teapot (item 0): never listed again, and it explains the kitchen item it resembles.
        (0, "u0", [1.0, 0.0], [0], [0], [3]),
        # u1 has no factors: the popular sequence, minus what it bought.
        (1, "u1", None, [4], [4], [3]),
    ]), plan())
    rows = {(r.user_id, r.rank): (r.item_id, r.source, r.because_item_id, r.explanation) for r in got.itertuples()}
    assert rows[("u0", 1)] == ("i1", "als", "i0", "because you bought Teapot")
    assert [rows[("u0", k)][0] for k in (1, 2, 3)] == ["i1", "i4", "i3"]
    assert [rows[("u1", k)] for k in (1, 2)] == [("i2", "popular", None, "popular with other shoppers"),
                                                ("i0", "popular", None, "popular with other shoppers")]
    assert ("u1", 3) not in rows  # only two allowed items are left for u1: a short list, never a bought item


def test_a_viewed_item_comes_back_as_a_reminder_naming_no_other_item():
    got = block.lists(users([(0, "u0", [1.0, 0.0], [], [0], [0])]), plan(n=1))
    assert got[[C.ITEM_ID, C.BECAUSE_ITEM_ID, C.EXPLANATION]].values.tolist() == [["i0", None, "you viewed this"]]


def test_short_model_lists_are_filled_under_the_category_cap():
    got = block.lists(users([(0, "u0", [1.0, 0.0], [], [], [])]), plan(n=4, cap=1))
    # At most one Kitchen and one Garden item; item 4 has no category and is never capped.
    assert got.sort_values(C.RANK)[C.ITEM_ID].tolist() == ["i0", "i4", "i3"]


def test_indexed_rows_carry_ids_categories_and_sources():
    got = block.lists(users([(7, "u7", None, [], [], [])]), plan(n=2, keyed=False))
    assert got[[C.USER_IDX, C.ITEM_IDX, C.RANK, C.REC_SOURCE]].values.tolist() == [[7, 4, 1, "popular"], [7, 2, 2, "popular"]]


def test_explanations_by_source_and_event():
    src = np.array(["als", "als", "als", "trending", "recent_popular", "category_popular", "category_popular", "exploration", "popular"], dtype=object)
    own = np.array([3, -1, -1, -1, -1, -1, -1, -1, -1])
    because_type = np.array([-1, 2, -1, -1, -1, -1, -1, -1, -1])
    because_id = np.array([None, "i9", None, None, None, None, None, None, None], dtype=object)
    because_name = np.array([None, None, None, None, None, None, None, None, None], dtype=object)
    category = np.array([None, None, None, None, None, "Garden", None, None, None], dtype=object)
    assert block.explanations(src, own, because_type, because_id, because_name, category, 7.0).tolist() == [
        "you bought this before", "because you added to your cart i9", "matches your tastes", "trending in the last 7 days",
        "popular in the last 7 days", "popular in Garden", "popular with other shoppers", "new in the shop",
        "popular with other shoppers",
    ]
