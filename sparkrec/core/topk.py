"""Exact top-k of a block of query vectors against an item matrix, in numpy and faiss.

This is the kernel of the `recommend` stage and of `similar_items`; it knows
nothing about Spark, so it is tested directly against a brute-force reference.

Why it is built this way:
- faiss's exact inner-product search (`IndexFlatIP`) fuses the BLAS product
  with a heap selection, several times faster than `argpartition` over a full
  score matrix. It is asked for more than `n` items (over-fetch), enough to
  survive the per-user exclusions and the per-category cap.
- A row is only accepted from the over-fetched candidates when that is provably
  the exact answer: it got `n` items and its last one scores strictly above the
  deepest candidate fetched (so no unseen item can tie or beat it). Any other
  row is recomputed from the full score row in numpy. The result is therefore
  exact whatever the exclusions, and ties always go to the lower item id.
- Everything is vectorised over the block: no Python loop per user.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

# Cells of a dense score block recomputed exactly at once (rows x items).
_EXACT_CELLS = 4_000_000
# Search depth beyond which a row is scored densely with its exclusions masked (see `top_k`).
_DENSE_DEPTH = 128


def set_threads(n: int) -> None:
    """Threads faiss may use in this process (one per core the caller owns)."""
    faiss.omp_set_num_threads(max(1, n))


@dataclass
class ItemMatrix:
    """The items a block may be recommended, sorted by item id.

    Attributes:
        item_idx: int64 item ids, ascending.
        vectors: float32 [items, rank], boosts already applied (a boost scales the vector).
        category: int32 category code per item, -1 for none; None when no cap applies.
    """

    item_idx: np.ndarray
    vectors: np.ndarray
    category: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.item_idx = np.asarray(self.item_idx, dtype=np.int64)
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        if len(self.item_idx) > 1 and not np.all(np.diff(self.item_idx) > 0):
            raise ValueError("item_idx must be strictly increasing")
        if self.category is not None:
            self.category = np.asarray(self.category, dtype=np.int32)
        self._index: faiss.IndexFlatIP | None = None

    @property
    def index(self) -> faiss.IndexFlatIP:
        if self._index is None:
            self._index = faiss.IndexFlatIP(self.vectors.shape[1])
            self._index.add(self.vectors)
        return self._index

    def positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of `ids` in the matrix, and which of them are present at all."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.item_idx, ids)
        hit = pos < len(self.item_idx)
        hit[hit] = self.item_idx[pos[hit]] == ids[hit]
        return pos, hit


@dataclass
class Selection:
    """Flat result of a block, ordered by row then rank."""

    row: np.ndarray  # int64 row of the query in the block
    pos: np.ndarray  # int64 position in the ItemMatrix
    score: np.ndarray  # float32
    rank: np.ndarray  # int32, 1-based


def occurrence(keys: np.ndarray) -> np.ndarray:
    """For each element, how many equal keys come before it (0-based), keeping order."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    start = np.empty(n, dtype=bool)
    start[0] = True
    start[1:] = sk[1:] != sk[:-1]
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    occ = np.empty(n, dtype=np.int64)
    occ[order] = np.arange(n) - first
    return occ


def _select(
    rows: np.ndarray, pos: np.ndarray, score: np.ndarray, items: ItemMatrix, ex_keys: np.ndarray, n: int, cap: int | None
) -> Selection:
    """From candidate (row, pos, score) triples: drop excluded, order, cap per category, keep n."""
    m = len(items.item_idx)
    keep = (pos >= 0) & np.isfinite(score)
    if len(ex_keys):
        keep &= ~np.isin(rows * m + pos, ex_keys)
    rows, pos, score = rows[keep], pos[keep], score[keep]
    order = np.lexsort((items.item_idx[pos], -score, rows))
    rows, pos, score = rows[order], pos[order], score[order]
    if cap is not None and items.category is not None:
        cat = items.category[pos].astype(np.int64)
        ncat = int(items.category.max()) + 2 if len(items.category) else 1
        occ = occurrence(rows * ncat + (cat + 1))
        keep = (cat < 0) | (occ < cap)
        rows, pos, score = rows[keep], pos[keep], score[keep]
    rank = occurrence(rows)
    keep = rank < n
    return Selection(rows[keep], pos[keep], score[keep].astype(np.float32), (rank[keep] + 1).astype(np.int32))


def _excluded_keys(excluded: list[np.ndarray], items: ItemMatrix, rows: np.ndarray | None = None) -> np.ndarray:
    """Sorted keys row * items + position of every excluded pair present in the matrix."""
    m = len(items.item_idx)
    lens = np.fromiter((len(e) for e in excluded), dtype=np.int64, count=len(excluded))
    if not lens.sum():
        return np.zeros(0, dtype=np.int64)
    r = np.repeat(np.arange(len(excluded), dtype=np.int64), lens)
    pos, hit = items.positions(np.concatenate(excluded))
    keys = r[hit] * m + pos[hit]
    return np.unique(keys)


def top_k(
    queries: np.ndarray, excluded: list[np.ndarray], items: ItemMatrix, n: int, cap: int | None = None
) -> Selection:
    """Exact top-`n` items per query row, never an excluded one, at most `cap` per category.

    Rows with few exclusions are searched with faiss, fetching just enough
    candidates for them (n, plus the longest of their exclusion lists). Rows
    with long exclusion lists (a wholesale customer who bought 1,700 of 4,000
    items) would make that depth, and the sort of every fetched candidate,
    huge for the whole block: they are scored densely instead, with their
    exclusions masked before the selection, so their depth does not grow with
    what they bought. Either way the rows that a cap or a tie leaves undecided
    are searched again four times deeper, and only rows still undecided then
    are scored against every item.

    Args:
        queries: float32 [rows, rank].
        excluded: per row, the item ids it must not get.
        items: the candidate matrix.
        n: list length; a row gets fewer only when fewer valid items exist.
        cap: at most this many items of one category per row (items without a category are not capped).
    """
    b, m = len(queries), len(items.item_idx)
    if b == 0 or m == 0:
        return Selection(*(np.zeros(0, dtype=t) for t in (np.int64, np.int64, np.float32, np.int32)))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    lens = np.fromiter((len(e) for e in excluded), dtype=np.int64, count=b)
    dense = lens + n + 1 > _DENSE_DEPTH
    sparse_rows, dense_rows = np.flatnonzero(~dense), np.flatnonzero(dense)
    groups = (
        (sparse_rows, _search, n + int(lens[sparse_rows].max(initial=0)) + 1),
        (dense_rows, _dense_search, 2 * n),
    )
    parts: list[Selection] = []
    left: list[np.ndarray] = []
    for todo, search, depth in groups:
        depth = min(m, depth)
        for attempt in range(2):
            if not len(todo):
                break
            sel, undecided = search(queries[todo], [excluded[i] for i in todo], items, n, cap, depth)
            sel.row = todo[sel.row]
            keep = ~np.isin(sel.row, todo[undecided])
            parts.append(Selection(sel.row[keep], sel.pos[keep], sel.score[keep], sel.rank[keep]))
            todo = todo[undecided]
            if depth >= m:
                break
            depth = min(m, depth * 4)
        left.append(todo)
    rest = np.concatenate(left)
    if len(rest):
        rest = np.sort(rest)
        sel, _ = _dense_search(queries[rest], [excluded[i] for i in rest], items, n, cap, m)
        parts.append(Selection(rest[sel.row], sel.pos, sel.score, sel.rank))
    out = Selection(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("row", "pos", "score", "rank")))
    order = np.lexsort((out.rank, out.row))
    return Selection(out.row[order], out.pos[order], out.score[order], out.rank[order])


def _search(
    queries: np.ndarray, excluded: list[np.ndarray], items: ItemMatrix, n: int, cap: int | None, depth: int
) -> tuple[Selection, np.ndarray]:
    """One faiss search at `depth`; returns the selection and which rows it cannot vouch for."""
    b, m = len(queries), len(items.item_idx)
    ex_keys = _excluded_keys(excluded, items)
    dist, labels = items.index.search(queries, depth)
    rows = np.repeat(np.arange(b, dtype=np.int64), depth)
    sel = _select(rows, labels.ravel().astype(np.int64), dist.ravel(), items, ex_keys, n, cap)
    if depth >= m:  # every item was seen: the answer is exact
        return sel, np.zeros(b, dtype=bool)
    return sel, _undecided(sel, b, n, dist[:, -1])


def _undecided(sel: Selection, b: int, n: int, deepest: np.ndarray) -> np.ndarray:
    """Rows a depth-limited search cannot vouch for: not full, or their last item does not
    score strictly above the deepest candidate fetched (an unseen item could tie or beat it)."""
    counts = np.bincount(sel.row, minlength=b)
    last = np.full(b, np.inf, dtype=np.float64)
    if len(sel.row):
        ends = np.flatnonzero(np.r_[sel.row[1:] != sel.row[:-1], True])
        last[sel.row[ends]] = sel.score[ends]
    return (counts < n) | (last <= deepest)


def _dense_search(
    queries: np.ndarray, excluded: list[np.ndarray], items: ItemMatrix, n: int, cap: int | None, depth: int
) -> tuple[Selection, np.ndarray]:
    """Like `_search`, from full score rows with the exclusions masked first (in slices that bound memory).

    At `depth` >= the number of items every row is decided: the exact answer.
    """
    b, m = len(queries), len(items.item_idx)
    step = max(1, _EXACT_CELLS // m)
    none = np.zeros(0, dtype=np.int64)
    sels, undecided = [], []
    for start in range(0, b, step):
        q = queries[start : start + step]
        r = len(q)
        scores = q @ items.vectors.T
        # Keys are row * m + position: the flat index of the [r, m] score block.
        scores.ravel()[_excluded_keys(excluded[start : start + step], items)] = -np.inf
        if depth < m:
            cand = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        else:
            cand = np.broadcast_to(np.arange(m, dtype=np.int64), (r, m))
        top = np.take_along_axis(scores, cand, axis=1)
        rows = np.repeat(np.arange(r, dtype=np.int64), cand.shape[1])
        sel = _select(rows, cand.ravel().astype(np.int64), top.ravel(), items, none, n, cap)
        # A masked item scores -inf, so fetching one means nothing valid was left out.
        und = np.zeros(r, dtype=bool) if depth >= m else _undecided(sel, r, n, top.min(axis=1))
        sel.row = sel.row + start
        sels.append(sel)
        undecided.append(und)
    out = Selection(*(np.concatenate([getattr(p, f) for p in sels]) for f in ("row", "pos", "score", "rank")))
    return out, np.concatenate(undecided)


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), for cosine similarity."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


def explain(
    rec_rows: np.ndarray, rec_items: np.ndarray, history: list[np.ndarray], unit: ItemMatrix
) -> np.ndarray:
    """For each recommended (row, item id), the history item most similar to it (cosine), or -1.

    "Because you bought X": X is the item of the user's own history whose
    factor is closest in direction to the recommended item's, never the
    recommended item itself (-1 when that is all the history has). Among equally
    close items the one listed first in `history` wins (callers list the
    strongest, then latest, first). History items without factors are ignored.

    One batched matrix product per block: recommendations [rows, n, rank]
    against padded histories [rows, h, rank], so the cost is BLAS, not a
    Python loop or a sort over every (recommendation, history item) pair.

    Args:
        rec_rows: row of each recommendation in the block.
        rec_items: item id of each recommendation.
        history: per row, the item ids to explain from.
        unit: every item with factors, rows normalised.
    Returns:
        int64 item id per recommendation, -1 when the row has no usable history.
    """
    out = np.full(len(rec_rows), -1, dtype=np.int64)
    if not len(rec_rows) or not len(history):
        return out
    rows = len(history)
    lens = np.fromiter((len(h) for h in history), dtype=np.int64, count=rows)
    pos, hit = unit.positions(np.concatenate([*history, np.zeros(0, dtype=np.int64)]))
    owner = np.repeat(np.arange(rows, dtype=np.int64), lens)[hit]
    pos = pos[hit]  # history items with factors, still grouped by row in their order
    hlen = np.bincount(owner, minlength=rows)
    width = int(hlen.max()) if rows else 0
    if width == 0:
        return out
    padded = np.full((rows, width), -1, dtype=np.int64)
    mask = np.arange(width)[None, :] < hlen[:, None]
    padded[mask] = pos
    rec_pos, rec_hit = unit.positions(rec_items)
    # Recommendations laid out [rows, n] by their rank order within the row.
    slot = occurrence(rec_rows)
    n = int(slot.max()) + 1
    rec_grid = np.full((rows, n), -1, dtype=np.int64)
    rec_grid[rec_rows, slot] = np.where(rec_hit, rec_pos, -1)
    dim = unit.vectors.shape[1]
    zero = np.zeros((1, dim), dtype=np.float32)
    vecs = np.vstack([unit.vectors, zero])  # index -1 -> the zero row
    sims = np.matmul(vecs[rec_grid], vecs[padded].transpose(0, 2, 1))  # [rows, n, width]
    # An item never explains itself: "because you viewed X" on X says nothing.
    usable = mask[:, None, :] & (padded[:, None, :] != rec_grid[:, :, None])
    sims = np.where(usable, sims, -np.inf)
    best = np.argmax(sims, axis=2)  # first maximum: history order breaks ties
    chosen = padded[np.arange(rows)[:, None], best]
    found = (rec_grid >= 0) & usable.any(axis=2)
    ids = np.where(found, unit.item_idx[np.maximum(chosen, 0)], -1)
    out[:] = ids[rec_rows, slot]
    return out


@dataclass
class FillSequence:
    """What a short list is filled from: the fallback rankings as one sequence, best first, each item once.

    Attributes:
        item_idx: int64 item ids in fill order (priority, score descending, item id).
        score: float32 the ranking's score of each.
        category: int32 category code, -1 for none.
        source: int8 index into `sources` of the ranking each item came from.
        sources: the source names.
        by_category: index into `sources` of "popular in the categories the user touched": such
            entries come first for each user, ahead of the whole sequence (None: no such entries).
    """

    item_idx: np.ndarray
    score: np.ndarray
    category: np.ndarray
    source: np.ndarray
    sources: tuple[str, ...]
    by_category: int | None = None

    @classmethod
    def of(cls, item_idx, score, category, source: list[str], prio, by_category: str | None = None) -> FillSequence:
        """From ranking rows (any order, an item possibly in several rankings): each item at its first place."""
        item_idx = np.asarray(item_idx, dtype=np.int64)
        score = np.asarray(score, dtype=np.float32)
        names = tuple(sorted(set(source) | ({by_category} if by_category else set())))
        code = np.asarray([names.index(s) for s in source], dtype=np.int8)
        order = np.lexsort((item_idx, -score, np.asarray(prio, dtype=np.int64)))
        item_idx, score, code = item_idx[order], score[order], code[order]
        category = np.asarray(category, dtype=np.int32)[order]
        first = occurrence(item_idx) == 0
        return cls(item_idx[first], score[first], category[first], code[first], names,
                   names.index(by_category) if by_category else None)

    def __len__(self) -> int:
        return len(self.item_idx)


@dataclass
class Filled:
    """Flat result of `fill`: per filled item its row, position in the sequence, source code and rank (1-based)."""

    row: np.ndarray
    pos: np.ndarray
    source: np.ndarray
    rank: np.ndarray


def _category_positions(seq: FillSequence) -> dict[int, np.ndarray]:
    order = np.argsort(seq.category, kind="stable")
    cats = seq.category[order]
    bounds = np.flatnonzero(np.r_[True, cats[1:] != cats[:-1], True])
    return {int(cats[a]): order[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if cats[a] >= 0}


def fill(
    have: np.ndarray,
    gone: list[np.ndarray],
    used: list[np.ndarray],
    seq: FillSequence,
    n: int,
    cap: int | None = None,
    touched: list[np.ndarray] | None = None,
) -> Filled:
    """Fill each row's list up to `n` from the sequence: never a gone item, at most `cap` per category.

    A row reads only as deep into the sequence as it can need (its missing
    items plus its gone ones); the rows that a cap or a duplicate leaves short
    read four times deeper, until the sequence runs out. So the work grows with
    the rows' histories, never with rows x catalogue.

    Args:
        have: items each row already has (its ranks continue after them).
        gone: per row, item ids it must not get (excluded, and already in its list).
        used: per row, the category codes of the items already in its list (counted by the cap).
        touched: per row, the categories whose items come first (`seq.by_category`).
    """
    have = np.asarray(have, dtype=np.int64)
    rows, total = len(have), len(seq)
    empty = Filled(*(np.zeros(0, dtype=np.int64) for _ in range(4)))
    if not rows or not total:
        return empty
    gone_len = np.fromiter((len(g) for g in gone), dtype=np.int64, count=rows)
    span = int(max(seq.item_idx.max(), max((int(g.max()) for g in gone if len(g)), default=0))) + 1
    none = np.zeros(0, dtype=np.int64)
    gone_rows = np.repeat(np.arange(rows, dtype=np.int64), gone_len)
    gone_keys = np.unique(gone_rows * span + np.concatenate([*gone, none]).astype(np.int64))
    ncat = int(max(seq.category.max(initial=-1), max((int(u.max()) for u in used if len(u)), default=-1))) + 2
    used_len = np.fromiter((len(u) for u in used), dtype=np.int64, count=rows)
    used_keys = np.sort(np.repeat(np.arange(rows, dtype=np.int64), used_len) * ncat
                        + np.concatenate([*used, none]).astype(np.int64) + 1)
    by_cat = _category_positions(seq) if touched is not None and seq.by_category is not None else None
    depth = np.minimum(n - have + gone_len, total)
    todo = np.flatnonzero(have < n)
    parts = []
    while len(todo):
        r_parts, p_parts, s_parts = [], [], []
        lim = depth[todo]
        if by_cat is not None:
            for row, d in zip(todo, lim):
                # A category gives at most n items to a list and skips at most its gone ones: n + gone is deep enough.
                own = [by_cat[c][: n + gone_len[row]] for c in touched[row] if c in by_cat]
                first = np.sort(np.concatenate(own)) if own else np.zeros(0, np.int64)
                r_parts.append(np.full(len(first), row, dtype=np.int64))
                p_parts.append(first)
                s_parts.append(np.full(len(first), seq.by_category, dtype=np.int64))
        starts = np.repeat(np.cumsum(lim) - lim, lim)
        pos = np.arange(int(lim.sum()), dtype=np.int64) - starts
        r_parts.append(np.repeat(todo, lim))
        p_parts.append(pos)
        s_parts.append(seq.source[pos].astype(np.int64))
        row, pos, src = (np.concatenate(x) for x in (r_parts, p_parts, s_parts))
        # Candidates in fill order: per row, the category entries, then the sequence.
        order = np.argsort(row, kind="stable")
        row, pos, src = row[order], pos[order], src[order]
        item = seq.item_idx[pos]
        keep = occurrence(row * span + item) == 0
        if len(gone_keys):
            keep &= ~np.isin(row * span + item, gone_keys)
        row, pos, src, item = row[keep], pos[keep], src[keep], item[keep]
        if cap is not None:
            cat = seq.category[pos].astype(np.int64)
            key = row * ncat + cat + 1
            before = np.searchsorted(used_keys, key, "right") - np.searchsorted(used_keys, key, "left")
            keep = (cat < 0) | (occurrence(key) + before < cap)
            row, pos, src = row[keep], pos[keep], src[keep]
        rank = occurrence(row) + have[row]
        keep = rank < n
        row, pos, src, rank = row[keep], pos[keep], src[keep], rank[keep]
        got = np.bincount(row, minlength=rows)[todo] + have[todo]
        again = (got < n) & (lim < total)
        done = ~np.isin(row, todo[again])
        parts.append(Filled(row[done], pos[done], src[done], rank[done] + 1))
        todo = todo[again]
        depth[todo] = np.minimum(depth[todo] * 4, total)
    out = Filled(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("row", "pos", "source", "rank")))
    order = np.lexsort((out.rank, out.row))
    return Filled(out.row[order], out.pos[order], out.source[order], out.rank[order])
