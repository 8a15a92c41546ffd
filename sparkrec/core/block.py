"""One block of users to finished lists, inside a Python worker: score, fill, key and explain in one pass.

A list used to be assembled by a chain of Spark jobs around the scoring
kernel (who is short, fill from the rankings, join the user and item keys,
build the explanation), each a shuffle of users x n rows. Here a block of
users arrives with everything its lists depend on (factors, exclusions,
history, categories touched, the user key) and leaves as published rows; the
bounded parts (item matrix, fill sequence, catalogue) are broadcast once. No
Spark here, so it is tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from sparkrec.core import columns as C
from sparkrec.core import ranker, topk
from sparkrec.core.recnames import (
    BECAUSE_IDX,
    BECAUSE_TYPE,
    CAT,
    EXCLUDED,
    HIST,
    HIST_TYPE,
    OWN_TYPE,
    PRESENT,
    REMINDERS,
    RK_AGE,
    RK_ITEMS,
    RK_USER,
    TOUCHED,
    VERBS,
)

# Users scored per numpy block. A block of 500 users (what a 100,000-item catalogue gave under
# the old cells budget) ran faiss at a third of its speed: 18 against 63-66 GFLOPS on one core
# from 2,000 queries up (bench/RESULTS.md). Nothing in a block holds users x items (the dense
# fallback slices itself); its largest arrays are the explanations' users x n x history
# vectors, so the block stays at the smallest size faiss runs at full speed.
BLOCK_ROWS = 2048


def block_rows(items: int) -> int:
    """Users per block: faiss's tile, or fewer for a huge catalogue (at most ~400 million score cells)."""
    return max(512, min(BLOCK_ROWS, 400_000_000 // max(1, items)))


@dataclass
class Catalogue:
    """The shop's keys, names and categories per item id (sorted by id), for keyed rows and their explanations."""

    item_idx: np.ndarray
    item_id: np.ndarray
    name: np.ndarray
    category: np.ndarray
    code: np.ndarray | None = None  # the category's code (-1: none), as the per-category cap and fallback count them

    def __post_init__(self) -> None:
        order = np.argsort(np.asarray(self.item_idx, dtype=np.int64), kind="stable")
        self.item_idx = np.asarray(self.item_idx, dtype=np.int64)[order]
        self.item_id, self.name, self.category = (np.asarray(a, dtype=object)[order] for a in (self.item_id, self.name, self.category))
        if self.code is not None:
            self.code = np.asarray(self.code, dtype=np.int32)[order]

    def at(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of `ids` (clipped) and which are known."""
        pos = np.searchsorted(self.item_idx, ids)
        pos = np.minimum(pos, max(len(self.item_idx) - 1, 0))
        hit = (self.item_idx[pos] == ids) if len(self.item_idx) else np.zeros(len(ids), dtype=bool)
        return pos, hit


@dataclass
class Plan:
    """What every block needs, broadcast once.

    Attributes:
        items: the candidate matrix to score against; None when scores come with the
            block (`_present`, a chunked catalogue) or there is no model (baselines).
        unit: every item with factors, normalised, for explanations (None: none).
        blend_weight: the queries' extra component matching the candidates' blend column.
        catalogue: when given, rows come out keyed and explained (`PUBLISHED_COLUMNS`).
        whole: False when the candidates exceed `max_broadcast_items`: scores then come with the block.
        ranker, stats: when given, the model's part of a list is the ranker's order of its candidates
            (`core.ranker`) instead of the ALS top n; the block then carries each customer's ranker inputs.
    """

    n: int
    cap: int | None
    seq: topk.FillSequence
    items: topk.ItemMatrix | None = None
    unit: topk.ItemMatrix | None = None
    blend_weight: float | None = None
    catalogue: Catalogue | None = None
    trending_days: float = 7.0
    threads: int = 1
    whole: bool = True  # the candidate matrix fits `max_broadcast_items` (else it is scored in chunks)
    ranker: ranker.Ranker | None = None
    stats: ranker.ItemStats | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        return (C.SOURCE_RANKED if self.ranker is not None else C.SOURCE_ALS, *self.seq.sources)


INDEXED_SCHEMA = (
    f"{C.USER_IDX} int, {C.ITEM_IDX} int, {C.RANK} int, {C.SCORE} float, {CAT} int, {C.REC_SOURCE} string, "
    f"{BECAUSE_IDX} int, {BECAUSE_TYPE} int, {OWN_TYPE} int"
)
KEYED_SCHEMA = (
    f"{C.USER_ID} string, {C.ITEM_ID} string, {C.RANK} int, {C.SCORE} float, {C.REC_SOURCE} string, "
    f"{C.BECAUSE_ITEM_ID} string, {C.EXPLANATION} string"
)


def _arrays(col: pd.Series | None, rows: int) -> list[np.ndarray]:
    if col is None:
        return [np.zeros(0, dtype=np.int64)] * rows
    return [np.asarray(v if v is not None else [], dtype=np.int64) for v in col]


def _type_of(ids: np.ndarray, rows: np.ndarray, hist: list[np.ndarray], types: list[np.ndarray]) -> np.ndarray:
    """The event strength the user had on each item id, looked up in its row's own history list (-1: none)."""
    width = max((len(h) for h in hist), default=0)
    if width == 0 or not len(ids):
        return np.full(len(ids), -1, dtype=np.int64)
    lens = np.fromiter((len(h) for h in hist), dtype=np.int64, count=len(hist))
    filled = np.arange(width)[None, :] < lens[:, None]
    grid = np.full((len(hist), width), -2, dtype=np.int64)
    kinds = np.full((len(hist), width), -1, dtype=np.int64)
    grid[filled] = np.concatenate(hist)
    kinds[filled] = np.concatenate(types)
    match = grid[rows] == ids[:, None]
    first = np.argmax(match, axis=1)
    found = match[np.arange(len(ids)), first]
    return np.where(found, kinds[rows, first], -1)


def _split(rows: np.ndarray, values: np.ndarray, count: int) -> list[np.ndarray]:
    """Values grouped by their (sorted) row, one array per row 0..count-1."""
    return np.split(values, np.searchsorted(rows, np.arange(1, count)))


KEYED_NAMES = tuple(part.split()[0] for part in KEYED_SCHEMA.split(", "))


def lists_in_blocks(batch: pd.DataFrame, plan: Plan):
    """`lists` over a batch of any size, `block_rows` users at a time (faiss's tile, bounded memory)."""
    step = block_rows(len(plan.items.item_idx) if plan.items is not None else len(plan.seq))
    for start in range(0, len(batch), step):
        yield lists(batch.iloc[start : start + step].reset_index(drop=True), plan)


def lists(batch: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    """A block of users (one row each) to their finished lists: exactly n items whenever n allowed items exist.

    Columns read: user_idx, features (null: no model list), _excluded; when
    present: _hist and _hist_type (explanations), _touched (category fallback),
    _present (model rows scored elsewhere), user_id (keyed output).
    """
    b, n = len(batch), plan.n
    excluded = _arrays(batch[EXCLUDED], b)
    hist = _arrays(batch.get(HIST), b)
    hist_type = _arrays(batch.get(HIST_TYPE), b)
    # The model's rows: (row, item id, score, category, rank).
    row = np.zeros(0, dtype=np.int64)
    item, cat, rank = row.copy(), row.copy(), row.copy()
    score = np.zeros(0, dtype=np.float32)
    anchor = row.copy()  # a ranked item's co-purchase anchor (-1: none): its explanation
    if plan.items is not None:
        warm = np.flatnonzero(batch[C.FEATURES].notna().to_numpy())
        if len(warm):
            q = np.stack(batch[C.FEATURES].to_numpy()[warm]).astype(np.float32)
            if plan.blend_weight is not None:
                q = np.hstack([q, np.full((len(q), 1), plan.blend_weight, dtype=np.float32)])
            if plan.ranker is not None and plan.stats is not None and RK_ITEMS in batch.columns:
                frame = _candidates(batch, warm, q, excluded, plan)
                sel = ranker.rank(frame, plan.ranker, plan.items, n, plan.cap, plan.threads)
                anchor = ranker.anchors(frame, plan.items, sel)
            else:
                sel = topk.top_k(q, [excluded[i] for i in warm], plan.items, n, plan.cap)
            row, item, score, rank = warm[sel.row], plan.items.item_idx[sel.pos], sel.score, sel.rank.astype(np.int64)
            cat = plan.items.category[sel.pos].astype(np.int64) if plan.items.category is not None else np.full(len(row), -1)
    elif PRESENT in batch.columns:
        given = [p if p is not None else [] for p in batch[PRESENT]]
        lens = np.fromiter((len(p) for p in given), dtype=np.int64, count=b)
        flat = [x for p in given for x in p]
        row = np.repeat(np.arange(b, dtype=np.int64), lens)
        rank = np.fromiter((x[C.RANK] for x in flat), dtype=np.int64, count=len(flat))
        item = np.fromiter((x[C.ITEM_IDX] for x in flat), dtype=np.int64, count=len(flat))
        score = np.fromiter((x[C.SCORE] for x in flat), dtype=np.float32, count=len(flat))
        cat = np.fromiter((x[CAT] for x in flat), dtype=np.int64, count=len(flat))
    if len(anchor) != len(row):  # lists not ranked here
        anchor = np.full(len(row), -1, dtype=np.int64)
    because = np.full(len(row), -1, dtype=np.int64)
    because_type, own_type = because.copy(), because.copy()
    if plan.unit is not None and HIST in batch.columns and len(row):
        because = topk.explain(row, item, hist, plan.unit)
        if (anchor >= 0).any():  # "because you bought X" for an item bought with X, when X is in the history shown
            anchor_type = _type_of(anchor, row, hist, hist_type)
            because = np.where((anchor >= 0) & (anchor_type >= 0), anchor, because)
        because_type = _type_of(because, row, hist, hist_type)
        own_type = _type_of(item, row, hist, hist_type)
    # Every list short of n is filled from the fallback sequence.
    have = np.bincount(row, minlength=b)
    short = np.flatnonzero(have < n)
    f = topk.Filled(*(np.zeros(0, dtype=np.int64) for _ in range(4)))
    if len(short):
        by_row_item, by_row_cat = _split(row, item, b), _split(row, cat, b)
        gone = [np.concatenate([excluded[i], by_row_item[i]]) for i in short]
        used = [by_row_cat[i] for i in short]
        touched = _arrays(batch[TOUCHED], b) if TOUCHED in batch.columns else None
        f = topk.fill(have[short], gone, used, plan.seq, n, plan.cap, None if touched is None else [touched[i] for i in short])
    fill_n = len(f.row)
    minus = np.full(fill_n, -1, dtype=np.int64)
    out_row = np.concatenate([row, short[f.row]])
    out = {
        "row": out_row,
        C.ITEM_IDX: np.concatenate([item, plan.seq.item_idx[f.pos]]),
        C.RANK: np.concatenate([rank, f.rank]),
        C.SCORE: np.concatenate([score, plan.seq.score[f.pos]]).astype(np.float32),
        CAT: np.concatenate([cat, plan.seq.category[f.pos]]),
        "source": np.concatenate([np.zeros(len(row), dtype=np.int64), f.source + 1]),
        BECAUSE_IDX: np.concatenate([because, minus]),
        BECAUSE_TYPE: np.concatenate([because_type, minus]),
        OWN_TYPE: np.concatenate([own_type, minus]),
    }
    source = np.asarray(plan.sources, dtype=object)[out["source"]]
    if plan.catalogue is None:
        return pd.DataFrame({
            C.USER_IDX: batch[C.USER_IDX].to_numpy()[out_row].astype(np.int32),
            C.ITEM_IDX: out[C.ITEM_IDX].astype(np.int32),
            C.RANK: out[C.RANK].astype(np.int32),
            C.SCORE: out[C.SCORE],
            CAT: out[CAT].astype(np.int32),
            C.REC_SOURCE: source,
            BECAUSE_IDX: out[BECAUSE_IDX].astype(np.int32),
            BECAUSE_TYPE: out[BECAUSE_TYPE].astype(np.int32),
            OWN_TYPE: out[OWN_TYPE].astype(np.int32),
        })
    return keyed(batch[C.USER_ID].to_numpy()[out_row], out[C.ITEM_IDX], out[C.RANK], out[C.SCORE], source,
                 out[BECAUSE_IDX], out[BECAUSE_TYPE], out[OWN_TYPE], plan.catalogue, plan.trending_days)


def _candidates(batch: pd.DataFrame, warm: np.ndarray, q: np.ndarray, excluded: list[np.ndarray], plan: Plan) -> pd.DataFrame:
    """The ranker's candidates of the block's warm rows (`row` indexes `warm`)."""
    items, ages, user = ranker.user_inputs(batch[RK_ITEMS].to_numpy()[warm], batch[RK_AGE].to_numpy()[warm],
                                           batch[RK_USER].to_numpy()[warm])
    frame = ranker.candidates(q, [excluded[i] for i in warm], plan.items, plan.stats, plan.ranker, items, ages, user)
    frame[ranker.ROW] = warm[frame[ranker.ROW].to_numpy()]
    return frame


def candidate_frames(batch: pd.DataFrame, plan: Plan) -> pd.DataFrame:
    """A block's ranker candidates with their features, keyed by customer: what the ranker is trained on.

    The same candidates and features `lists` ranks (one implementation): (user_idx, item_idx, *FEATURES).
    """
    empty = pd.DataFrame({C.USER_IDX: np.zeros(0, np.int32), C.ITEM_IDX: np.zeros(0, np.int32),
                          **{f: np.zeros(0, np.float32) for f in ranker.FEATURES}})
    if plan.items is None or plan.ranker is None or plan.stats is None or not len(batch):
        return empty
    warm = np.flatnonzero(batch[C.FEATURES].notna().to_numpy())
    if not len(warm):
        return empty
    q = np.stack(batch[C.FEATURES].to_numpy()[warm]).astype(np.float32)
    frame = _candidates(batch, warm, q, _arrays(batch[EXCLUDED], len(batch)), plan)
    out = frame.drop(columns=[ranker.ROW, ranker.ANCHOR]).astype({f: np.float32 for f in ranker.FEATURES})
    out.insert(0, C.USER_IDX, batch[C.USER_IDX].to_numpy()[frame[ranker.ROW].to_numpy()].astype(np.int32))
    out[C.ITEM_IDX] = out[C.ITEM_IDX].astype(np.int32)
    return out


def keyed(user_id, item_idx, rank, score, source, because_idx, because_type, own_type, cat: Catalogue,
          trending_days: float) -> pd.DataFrame:
    """Integer rows to published rows: the shop's keys and why each item is there."""
    pos, hit = cat.at(np.asarray(item_idx, dtype=np.int64))
    keep = hit  # an item the catalogue does not know cannot be published (the old inner join)
    bpos, bhit = cat.at(np.asarray(because_idx, dtype=np.int64))
    bhit &= np.asarray(because_idx) >= 0
    src = np.asarray(source, dtype=object)
    is_als = (src == C.SOURCE_ALS) | (src == C.SOURCE_RANKED)
    reminder = is_als & (np.asarray(own_type) >= 0)
    because_id = np.where(bhit & ~reminder, cat.item_id[bpos], None)
    text = explanations(source, np.asarray(own_type), np.asarray(because_type), np.where(bhit, cat.item_id[bpos], None),
                        np.where(bhit, cat.name[bpos], None), cat.category[pos], trending_days)
    return pd.DataFrame({
        C.USER_ID: np.asarray(user_id, dtype=object)[keep],
        C.ITEM_ID: cat.item_id[pos][keep],
        C.RANK: np.asarray(rank)[keep].astype(np.int32),
        C.SCORE: np.asarray(score)[keep].astype(np.float32),
        C.REC_SOURCE: np.asarray(source, dtype=object)[keep],
        C.BECAUSE_ITEM_ID: because_id[keep],
        C.EXPLANATION: text[keep],
    })


def _table(texts: dict[int, str]) -> np.ndarray:
    """A lookup array indexed by strength (0..3); unknown strengths give None."""
    out = np.full(max(texts) + 2, None, dtype=object)  # the last slot answers index -1
    for k, v in texts.items():
        out[k] = v
    return out


_BECAUSE = _table({k: f"because you {v} " for k, v in VERBS.items()})
_REMIND = _table(REMINDERS)


def explanations(source, own_type, because_type, because_id, because_name, category, trending_days: float) -> np.ndarray:
    """Why an item is in a list, from its source, the user's own event on it, and the explaining item.

    Vectorised over the block (object arrays concatenate element-wise): 2.5 million rows are
    explained in well under a second.
    """
    days = f"{trending_days:g}"
    src = np.asarray(source, dtype=object)
    category = np.asarray(category, dtype=object)
    out = np.full(len(src), "popular with other shoppers", dtype=object)
    # Assigned from the weakest condition to the strongest, so the first that holds wins.
    out[src == C.SOURCE_EXPLORATION] = "new in the shop"
    m = (src == C.SOURCE_CATEGORY_POPULAR) & (category != None)  # noqa: E711 (element-wise on an object array)
    out[m] = "popular in " + category[m]
    out[src == "recent_popular"] = f"popular in the last {days} days"
    out[src == C.SOURCE_TRENDING] = f"trending in the last {days} days"
    als = (src == C.SOURCE_ALS) | (src == C.SOURCE_RANKED)
    out[als] = "matches your tastes"
    because_type = np.clip(np.asarray(because_type, dtype=np.int64), -1, len(_BECAUSE) - 2)
    label = np.where(np.asarray(because_name, dtype=object) != None, because_name, because_id)  # noqa: E711
    prefix = _BECAUSE[because_type]
    m = als & (np.asarray(because_id, dtype=object) != None) & (prefix != None)  # noqa: E711
    out[m] = prefix[m] + label[m]
    own = np.asarray(own_type, dtype=np.int64)
    m = als & (own >= 0)
    out[m] = _REMIND[np.clip(own[m], -1, len(_REMIND) - 2)]
    return out
