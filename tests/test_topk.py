"""The top-k kernel against a brute-force reference: exclusions, ties, category caps, explanations."""

from __future__ import annotations

import numpy as np
import pytest

from sparkrec.core import topk
from sparkrec.core.topk import ItemMatrix, explain, normalized, occurrence, top_k

pytestmark = pytest.mark.nojvm


def brute_force(queries, excluded, items: ItemMatrix, n, cap):
    """Sort every item by (-score, id), skip excluded and capped ones, take n: obviously right, slow."""
    out = []
    for r, q in enumerate(queries):
        scores = items.vectors.astype(np.float64) @ q.astype(np.float64)
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], items.item_idx[j]))
        got, per_cat = [], {}
        for j in order:
            if items.item_idx[j] in set(excluded[r].tolist()):
                continue
            c = -1 if items.category is None else int(items.category[j])
            if cap and c >= 0 and per_cat.get(c, 0) >= cap:
                continue
            per_cat[c] = per_cat.get(c, 0) + 1
            got.append(int(items.item_idx[j]))
            if len(got) == n:
                break
        out.append(got)
    return out


def as_lists(sel, items, rows):
    return [items.item_idx[sel.pos[sel.row == r]].tolist() for r in range(rows)]


@pytest.mark.parametrize("dense_depth", [None, 0, 20], ids=["default", "all-dense", "mixed"])
@pytest.mark.parametrize("seed", range(12))
def test_top_k_matches_brute_force_with_ties_exclusions_and_caps(seed, dense_depth, monkeypatch):
    # Rows beyond the dense depth are scored with their exclusions masked,
    # the others searched with faiss: both must give the reference answer.
    if dense_depth is not None:
        monkeypatch.setattr(topk, "_DENSE_DEPTH", dense_depth)
    rng = np.random.default_rng(seed)
    m, rank, rows = int(rng.integers(5, 80)), 4, 9
    ids = np.sort(rng.choice(10_000, m, replace=False))
    # Small integer factors make many exact ties, the hard case for a depth-limited search.
    vectors = rng.integers(-3, 4, (m, rank)).astype(np.float32)
    cap = int(rng.integers(1, 3)) if seed % 2 else None
    items = ItemMatrix(ids, vectors, rng.integers(-1, 4, m) if seed % 2 else None)
    queries = rng.integers(-2, 3, (rows, rank)).astype(np.float32)
    excluded = [rng.choice(ids, int(rng.integers(0, m)), replace=False) for _ in range(rows)]
    n = int(rng.integers(1, 12))
    sel = top_k(queries, excluded, items, n, cap)
    assert as_lists(sel, items, rows) == brute_force(queries, excluded, items, n, cap)
    for r in range(rows):
        assert sel.rank[sel.row == r].tolist() == list(range(1, int((sel.row == r).sum()) + 1))
        assert (np.diff(sel.score[sel.row == r]) <= 0).all()


def test_known_answer_ties_go_to_the_lower_id_and_short_lists_stay_short():
    items = ItemMatrix(np.array([3, 5, 8, 9]), np.array([[1.0], [2.0], [2.0], [1.0]], dtype=np.float32))
    sel = top_k(np.array([[1.0], [1.0]], dtype=np.float32), [np.array([]), np.array([3, 5, 8])], items, 3)
    assert list(zip(sel.row.tolist(), items.item_idx[sel.pos].tolist(), sel.rank.tolist())) == [
        (0, 5, 1), (0, 8, 2), (0, 3, 3), (1, 9, 1)
    ]


def test_category_cap_takes_the_best_of_each_category():
    # Items 1-3 are category 0 and score highest; with a cap of 1 the list must
    # move on to the other categories instead of repeating category 0.
    items = ItemMatrix(
        np.array([1, 2, 3, 4, 5, 6]),
        np.array([[9.0], [8.0], [7.0], [6.0], [5.0], [4.0]], dtype=np.float32),
        np.array([0, 0, 0, 1, 1, -1]),
    )
    sel = top_k(np.array([[1.0]], dtype=np.float32), [np.array([1])], items, 4, cap=1)
    assert items.item_idx[sel.pos].tolist() == [2, 4, 6]  # 6 has no category: never capped


@pytest.mark.parametrize("dense_depth", [None, 10**9], ids=["default", "never-dense"])
def test_large_exclusion_lists_still_give_n_items(dense_depth, monkeypatch):
    if dense_depth is not None:
        monkeypatch.setattr(topk, "_DENSE_DEPTH", dense_depth)
    rng = np.random.default_rng(7)
    ids = np.arange(2_000)
    items = ItemMatrix(ids, rng.normal(size=(2_000, 8)).astype(np.float32))
    q = rng.normal(size=(3, 8)).astype(np.float32)
    # Row 0 has bought the 1,500 items it would score highest.
    best = np.argsort(-(items.vectors @ q[0]))[:1_500]
    sel = top_k(q, [ids[best], np.array([]), ids[:1_999]], items, 20)
    assert np.bincount(sel.row, minlength=3).tolist() == [20, 20, 1]
    assert not set(items.item_idx[sel.pos[sel.row == 0]]) & set(ids[best])


def test_occurrence_numbers_equal_keys_in_order():
    assert occurrence(np.array([5, 3, 5, 5, 3])).tolist() == [0, 0, 1, 2, 1]


def test_explain_picks_the_most_similar_history_item():
    unit = ItemMatrix(np.array([1, 2, 3, 4]), normalized(np.array([[1, 0], [0, 1], [1, 0.2], [0, 0]], dtype=np.float32)))
    # Row 0 recommended 3 (close to 1) and 2 (in its own history: never explained by itself, so the
    # first of the equally distant others, 1); row 1 has no history; 9 has no factors; row 2's only
    # history item is the one recommended.
    got = explain(np.array([0, 0, 1, 0, 2]), np.array([3, 2, 3, 9, 4]), [np.array([1, 2, 4]), np.array([]), np.array([4])], unit)
    assert got.tolist() == [1, 1, -1, -1, -1]


@pytest.mark.parametrize("dense_depth", [None, 0], ids=["faiss-first", "dense-first"])
def test_rows_still_tied_after_the_deeper_search_are_scored_against_every_item(dense_depth, monkeypatch):
    # 2,000 items that all score the same: no depth-limited search can vouch for a row,
    # so every row reaches the full-depth pass, where ties go to the lower item ids.
    if dense_depth is not None:
        monkeypatch.setattr(topk, "_DENSE_DEPTH", dense_depth)
    items = ItemMatrix(np.arange(100, 2_100), np.ones((2_000, 4), dtype=np.float32))
    sel = top_k(np.ones((2, 4), dtype=np.float32), [np.array([100, 102]), np.array([])], items, 5)
    assert as_lists(sel, items, 2) == [[101, 103, 104, 105, 106], [100, 101, 102, 103, 104]]


def fill_reference(have, gone, used, seq: topk.FillSequence, n, cap, touched):
    """Walk the sequence item by item (the user's categories first when given): obviously right, slow."""
    out = []
    for r in range(len(have)):
        order = []
        if touched is not None:
            order += [(p, seq.by_category) for p in range(len(seq)) if int(seq.category[p]) in set(touched[r].tolist())]
        order += [(p, int(seq.source[p])) for p in range(len(seq))]
        seen, counts, got = set(), {}, []
        for c in used[r].tolist():
            counts[c] = counts.get(c, 0) + 1
        for p, src in order:
            if have[r] + len(got) >= n:
                break
            item = int(seq.item_idx[p])
            if item in seen:
                continue
            seen.add(item)
            c = int(seq.category[p])
            if item in set(gone[r].tolist()) or (cap and c >= 0 and counts.get(c, 0) >= cap):
                continue
            counts[c] = counts.get(c, 0) + 1
            got.append((item, src, have[r] + len(got) + 1))
        out.append(got)
    return out


@pytest.mark.parametrize("mode", ["plain", "cap", "categories", "categories-cap"])
@pytest.mark.parametrize("seed", range(10))
def test_fill_equals_walking_the_sequence(seed, mode):
    rng = np.random.default_rng(seed)
    m, rows, n = int(rng.integers(5, 40)), int(rng.integers(1, 30)), int(rng.integers(1, 12))
    # Two rankings that share items (trending then popular), each item kept at its first place.
    items = rng.permutation(100)[:m]
    prio = rng.integers(0, 2, m)
    extra = rng.choice(items, m // 2)
    seq = topk.FillSequence.of(
        np.r_[items, extra], rng.integers(0, 5, m + len(extra)).astype(np.float32), np.r_[rng.integers(-1, 4, m), rng.integers(-1, 4, len(extra))],
        ["trending" if p == 0 else "popular" for p in np.r_[prio, np.ones(len(extra), int)]], np.r_[prio, np.ones(len(extra), int)],
        by_category="category_popular" if mode.startswith("categories") else None,
    )
    assert len(seq) == len(set(seq.item_idx.tolist())) == m
    have = rng.integers(0, n + 1, rows)
    gone = [rng.choice(100, int(rng.integers(0, 15)), replace=False) for _ in range(rows)]
    used = [rng.integers(-1, 4, int(h)) for h in have]
    touched = [rng.choice(4, int(rng.integers(0, 3)), replace=False) for _ in range(rows)] if seq.by_category is not None else None
    cap = int(rng.integers(1, 4)) if mode.endswith("cap") else None
    got = topk.fill(have, gone, used, seq, n, cap, touched)
    lists = [[(int(seq.item_idx[p]), int(s), int(k)) for p, s, k in zip(got.pos[got.row == r], got.source[got.row == r], got.rank[got.row == r])] for r in range(rows)]
    assert lists == fill_reference(have, gone, used, seq, n, cap, touched)


def test_fill_sequence_keeps_each_item_at_its_first_place():
    seq = topk.FillSequence.of([5, 6, 5, 7], [1.0, 3.0, 9.0, 3.0], [0, 1, 0, -1], ["popular", "popular", "trending", "popular"], [1, 1, 0, 1])
    assert seq.item_idx.tolist() == [5, 6, 7]
    assert [seq.sources[s] for s in seq.source] == ["trending", "popular", "popular"]
    assert seq.score.tolist() == [9.0, 3.0, 3.0]
