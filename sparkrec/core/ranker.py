"""The second stage of a list: candidates from several sources, then a learned ranker over their features.

No single factor model gets past NDCG@10 0.1294 on Online Retail II (`bench/bench_quality_ceiling.py`);
candidates from ALS, co-purchase and recent popularity, ranked by LightGBM's lambdarank over features
no factor model sees (how recently a customer bought what goes with an item, how old the item is,
its trend, the price against the customer's usual), reached 0.1321 in the prototype
(`bench/bench_ranker_ceiling.py`). This module is that stage without Spark: the recommend stage's
workers, the evaluation and the server call the same functions on a block of customers.

What it needs, besides the block's ALS queries and the item matrix of the list kernel (`core.block`):
- per customer (`user_inputs`): their items with the days since they last touched each, and five
  figures of their activity (`USER_FEATURES`), aggregated by Spark or by the server alike;
- per item (`ItemStats`, bounded by the catalogue and broadcast): popularity at three horizons and
  its trend, first and last sale, median price, the most recently popular items, and each item's
  strongest co-purchase neighbours.
Only items of the list kernel's matrix (allowed by the shop's rules, with factors) are ever candidates,
and a customer's excluded items never are.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sparkrec.core import topk

# Per customer, in this order (`user_inputs`): distinct items, sessions (days with an event), days since
# the last and the first event, median price paid (NaN: unknown).
USER_FEATURES = ("user_items", "user_sessions", "user_last", "user_first", "user_price")
# Per item, in this order (`ItemStats.values`): log distinct customers ever, in the recent window and in
# the last week; the week against the window; days since the first and the last event; median price.
ITEM_FEATURES = ("pop_all", "pop_recent", "pop_week", "trend", "item_age", "item_last_sale", "item_price")
SOURCES = ("als", "co", "recent")
# The ranker's inputs, grouped as the ablation removes them.
GROUPS: dict[str, tuple[str, ...]] = {
    "als": ("als_score", "als_rank"),
    "co": ("co_score", "co_rank"),
    "popularity": ("pop_all", "pop_recent", "pop_week", "trend", "recent_rank"),
    "item": ("item_age", "item_last_sale"),
    "customer": ("user_items", "user_sessions", "user_last", "user_first"),
    "price": ("price_ratio", "item_price"),
}
FEATURES = tuple(f for group in GROUPS.values() for f in group)
WEEK_DAYS = 7.0

# Columns of a candidate frame besides the features: the block's row and the item id.
ROW, ITEM = "row", "item_idx"
# Not a feature: the customer's item whose neighbour a co-purchase candidate is (the largest share of its
# co_score), -1 for the others. It explains the ranked list ("because you bought X").
ANCHOR = "_anchor"


@dataclass
class ItemStats:
    """What the ranker knows of each item, sorted by item id: bounded by the catalogue, broadcast once.

    Attributes:
        item_idx: int64 item ids, ascending.
        values: float32 [items, len(ITEM_FEATURES)].
        recent: item ids by recent popularity, most popular first (at most the candidate depth plus slack).
        nb_ptr, nb_item, nb_weight: each item's co-purchase neighbours (CSR over `item_idx` positions):
            neighbour ids and their normalised co-occurrence, strongest first.
    """

    item_idx: np.ndarray
    values: np.ndarray
    recent: np.ndarray
    nb_ptr: np.ndarray
    nb_item: np.ndarray
    nb_weight: np.ndarray

    def positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.item_idx, ids), max(len(self.item_idx) - 1, 0))
        hit = (self.item_idx[pos] == ids) if len(self.item_idx) else np.zeros(len(ids), dtype=bool)
        return pos, hit


def item_stats(per_item: pd.DataFrame, pairs: pd.DataFrame, depth: int) -> ItemStats:
    """The item side from its raw counts, as Spark (or the server) aggregates them.

    Args:
        per_item: one row per item: item_idx, users (distinct customers ever), users_recent (in the recent
            window), users_week, age_days (since the first event), last_days (since the last), price (median, NaN).
        pairs: co-purchase neighbours: item_idx, other_idx, weight (already normalised and bounded per item).
        depth: candidates per source (the recent list keeps depth plus slack for customers' exclusions).
    """
    per_item = per_item.sort_values("item_idx", kind="stable").reset_index(drop=True)
    users = per_item["users"].to_numpy(dtype=np.float64)
    recent = per_item["users_recent"].to_numpy(dtype=np.float64)
    week = per_item["users_week"].to_numpy(dtype=np.float64)
    values = np.column_stack([
        np.log1p(users), np.log1p(recent), np.log1p(week),
        (week + 1.0) / (recent / 4.0 + 1.0),
        per_item["age_days"].to_numpy(dtype=np.float64), per_item["last_days"].to_numpy(dtype=np.float64),
        per_item["price"].to_numpy(dtype=np.float64),
    ]).astype(np.float32) if len(per_item) else np.zeros((0, len(ITEM_FEATURES)), dtype=np.float32)
    ids = per_item["item_idx"].to_numpy(dtype=np.int64)
    order = np.lexsort((ids, -recent))
    ranked = ids[order][recent[order] > 0]
    pairs = pairs.sort_values(["item_idx", "weight", "other_idx"], ascending=[True, False, True], kind="stable")
    src = pairs["item_idx"].to_numpy(dtype=np.int64)
    pos = np.searchsorted(ids, src)
    known = (pos < len(ids)) & (ids[np.minimum(pos, max(len(ids) - 1, 0))] == src) if len(ids) else np.zeros(len(src), bool)
    counts = np.bincount(pos[known], minlength=len(ids))
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ItemStats(ids, values, ranked[: 4 * depth + 100], ptr,
                     pairs["other_idx"].to_numpy(dtype=np.int64)[known],
                     pairs["weight"].to_numpy(dtype=np.float32)[known])


@dataclass
class Ranker:
    """A trained ranker and how its candidates are made: what the plan broadcasts to every block.

    Attributes:
        model: the ranker's text as stored (`join_models`): LightGBM's model string, or several averaged
            (boosters are rebuilt from it once per process).
        depth: candidates per source and customer.
        co_half_life_days: how fast a customer's older items count less in their co-purchase score.
        features: the inputs it was trained on (a subset of FEATURES: the ablation drops groups).
        sources: the candidate sources it was trained with.
    """

    model: str
    depth: int = 100
    co_half_life_days: float = 14.0
    features: tuple[str, ...] = FEATURES
    sources: tuple[str, ...] = SOURCES
    _booster: object = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_booster": None}  # a booster does not pickle; the string rebuilds it

    def boosters(self) -> list:
        if self._booster is None:
            with _LOCK:
                if self._booster is None:
                    self._booster = [_booster(m) for m in split_models(self.model)]
        return self._booster

    def predict(self, frame: pd.DataFrame, threads: int = 1) -> np.ndarray:
        """Each row's score: the mean of the models' (a row's score never depends on the rows beside it, so a
        customer ranked alone by the server gets the order the batch gave them in a block)."""
        if not len(frame):
            return np.zeros(0, dtype=np.float64)
        # Through float32, as the training rows went (`block.candidate_frames`): the trees' thresholds then see
        # the very values they were learned on.
        x = frame.loc[:, list(self.features)].to_numpy(dtype=np.float32).astype(np.float64)
        boosters = self.boosters()
        return sum(b.predict(x, num_threads=max(1, threads)) for b in boosters) / len(boosters)

    def gains(self) -> dict[str, float]:
        """Each feature's share of the total split gain over the models (sums to 1): what the run record reports."""
        gain = sum(b.feature_importance("gain") for b in self.boosters())
        total = float(gain.sum()) or 1.0
        return {f: round(float(g) / total, 4) for f, g in zip(self.features, gain)}


_LOCK = threading.Lock()
_MODELS = "sparkrec-ranker-models"


def join_models(models: Sequence[str]) -> str:
    """Several LightGBM model strings as one text (one model: its own string, as LightGBM writes it)."""
    if len(models) == 1:
        return models[0]
    return json.dumps({_MODELS: list(models)})


def split_models(text: str) -> list[str]:
    """`join_models` undone: the model strings."""
    if text.lstrip().startswith("{"):
        return list(json.loads(text)[_MODELS])
    return [text]


def _booster(model: str):
    import lightgbm as lgb  # imported where a ranker is used: the rest of the core never needs it

    return lgb.Booster(model_str=model)


def user_inputs(items: Sequence, ages: Sequence, user: Sequence) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """A block's per-customer columns (`_rk_items`, `_rk_age`, `_rk_user`) as arrays; nulls become empty/NaN."""
    it = [np.asarray(v if v is not None else [], dtype=np.int64) for v in items]
    ag = [np.asarray(v if v is not None else [], dtype=np.float64) for v in ages]
    uf = np.array([np.asarray(v, dtype=np.float64) if v is not None else np.full(len(USER_FEATURES), np.nan)
                   for v in user], dtype=np.float64).reshape(len(it), len(USER_FEATURES))
    return it, ag, uf


DAY_US = 86_400_000_000


def activity(user: np.ndarray, ts_us: np.ndarray, price: np.ndarray, users: int) -> tuple[np.ndarray, ...]:
    """Per customer code 0..`users`-1, from all their events: (days with an event, first event, last event's
    day, median price paid): what a process without Spark keeps to give a customer `USER_FEATURES` later.

    As `batch.ranking.user_inputs` aggregates them in Spark: days in UTC, and the median as Spark's
    `percentile_approx(price, 0.5)` gives it, the lower middle value (NaN: no price). Times in microseconds.
    """
    user = np.asarray(user, dtype=np.int64)
    ts = np.asarray(ts_us, dtype=np.int64)
    day = np.floor_divide(ts, DAY_US)
    sessions = np.zeros(users, dtype=np.int32)
    first = np.full(users, np.iinfo(np.int64).max, dtype=np.int64)
    last_day = np.full(users, np.iinfo(np.int64).min, dtype=np.int64)
    median = np.full(users, np.nan, dtype=np.float32)
    if not len(user):
        return sessions, first, last_day, median
    span = int(day.max() - day.min()) + 1
    distinct = np.unique(user * span + (day - day.min()))
    sessions += np.bincount(distinct // span, minlength=users).astype(np.int32)
    np.minimum.at(first, user, ts)
    np.maximum.at(last_day, user, day)
    price = np.asarray(price, dtype=np.float64)
    ok = ~np.isnan(price)
    u, p = user[ok], price[ok]
    order = np.lexsort((p, u))
    u, p = u[order], p[order]
    if len(u):
        starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
        counts = np.diff(np.r_[starts, len(u)])
        median[u[starts]] = p[starts + (counts + 1) // 2 - 1]
    return sessions, first, last_day, median


def customer_inputs(item_idx: np.ndarray, last_us: np.ndarray, sessions: float, first_us: int, price: float,
                    reference_us: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One customer's ranker inputs at `reference_us`: (their items, days since they last touched each,
    `USER_FEATURES`), the row a block reads as `_rk_items`, `_rk_age` and `_rk_user`. The server's
    counterpart of `batch.ranking.user_inputs`, from the customer's pairs (`core.events.reduce_pairs`) and
    their `activity`; a published list is ranked from the same figures either way (tests/test_ranking.py)."""
    items = np.asarray(item_idx, dtype=np.int64)
    ages = (int(reference_us) - np.asarray(last_us, dtype=np.int64)) / DAY_US
    last = float(ages.min()) if len(ages) else np.nan
    first = (int(reference_us) - int(first_us)) / DAY_US if len(ages) else np.nan
    user = np.array([len(items), sessions, last, first, price], dtype=np.float64)
    return items, ages.astype(np.float64), user


def basket_pairs(baskets: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How many of `baskets` (item id lists, no repeats within one) hold each pair of items: (item, other,
    count) for every ordered pair with a count, an item with itself counting the baskets that hold it."""
    lists = [np.asarray(b, dtype=np.int64) for b in baskets if b is not None and len(b)]
    if not lists:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    import scipy.sparse as sp

    rows, cols = _flat(lists, np.int64)
    ids, cols = np.unique(cols, return_inverse=True)  # a compact matrix whatever the ids' range
    b = sp.csr_matrix((np.ones(len(cols), np.int64), (rows, cols)), shape=(len(lists), len(ids)))
    both = (b.T @ b).tocoo()
    return ids[both.row], ids[both.col], both.data.astype(np.int64)


def strongest_neighbours(item: np.ndarray, other: np.ndarray, both: np.ndarray, day_ids: np.ndarray,
                         day_counts: np.ndarray, k: int) -> pd.DataFrame:
    """Partial pair counts (item, other, baskets holding both; an item's partial counts all present) to each
    item's `k` strongest neighbours: (item_idx, other_idx, weight), weight = both / sqrt(days(item) x days(other)),
    ties to the lower id."""
    span = int(np.max(other, initial=0)) + 1
    uniq, inv = np.unique(np.asarray(item, dtype=np.int64) * span + np.asarray(other, dtype=np.int64), return_inverse=True)
    total = np.bincount(inv, weights=np.asarray(both, dtype=np.float64))
    i, j = uniq // span, uniq % span
    order = np.argsort(day_ids, kind="stable")
    ids, counts = np.asarray(day_ids, dtype=np.int64)[order], np.asarray(day_counts, dtype=np.float64)[order]

    def days(x: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(ids, x), max(len(ids) - 1, 0))
        return np.where(ids[pos] == x, counts[pos], np.nan) if len(ids) else np.full(len(x), np.nan)

    weight = total / np.sqrt(days(i) * days(j))
    rows, cand, w, _ = _top_per_row(i, j, weight, k)
    return pd.DataFrame({"item_idx": rows.astype(np.int32), "other_idx": cand.astype(np.int32), "weight": w})


def _flat(lists: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    flat = np.concatenate(lists).astype(dtype) if lens.sum() else np.zeros(0, dtype=dtype)
    return np.repeat(np.arange(len(lists), dtype=np.int64), lens), flat


def _top_per_row(rows: np.ndarray, cand: np.ndarray, score: np.ndarray, depth: int) -> tuple[np.ndarray, ...]:
    """The `depth` best (row, candidate) pairs per row by score (ties: lower id), with their 1-based rank."""
    order = np.lexsort((cand, -score, rows))
    rows, cand, score = rows[order], cand[order], score[order]
    rank = topk.occurrence(rows)
    keep = rank < depth
    return rows[keep], cand[keep], score[keep], rank[keep] + 1


def co_purchase(hist_items: list[np.ndarray], hist_ages: list[np.ndarray], stats: ItemStats,
                half_life_days: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every item bought with a customer's items, scored by the neighbours' weights and how recently the
    customer bought the item that brings it: (row, item id, score, anchor), one row per pair, unsorted. The
    anchor is the customer's item that gives the pair the most of its score (the first listed on a tie)."""
    rows, items = _flat(hist_items, np.int64)
    _, ages = _flat(hist_ages, np.float64)
    pos, hit = stats.positions(items)
    rows, pos, w, mine = rows[hit], pos[hit], np.power(0.5, ages[hit] / half_life_days), items[hit]
    start, stop = stats.nb_ptr[pos], stats.nb_ptr[pos + 1]
    n = stop - start
    if not n.sum():
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64)
    at = np.repeat(start - np.concatenate([[0], np.cumsum(n)[:-1]]), n) + np.arange(n.sum())
    r = np.repeat(rows, n)
    other = stats.nb_item[at]
    score = np.repeat(w, n) * stats.nb_weight[at]
    key = r * (int(other.max()) + 1) + other
    uniq, inv = np.unique(key, return_inverse=True)
    total = np.bincount(inv, weights=score)
    # Per pair, its largest share first (stable: the earlier listed item wins a tie).
    order = np.lexsort((-score, inv))
    best = order[np.searchsorted(inv[order], np.arange(len(uniq)))]
    return r[best], other[best], total, np.repeat(mine, n)[best]


def candidates(
    queries: np.ndarray,
    excluded: list[np.ndarray],
    items: topk.ItemMatrix,
    stats: ItemStats,
    ranker: Ranker,
    hist_items: list[np.ndarray],
    hist_ages: list[np.ndarray],
    user: np.ndarray,
) -> pd.DataFrame:
    """A block of customers' candidates with every feature: (row, item_idx, *FEATURES).

    Args:
        queries: float32 [rows, rank]: the customers' ALS vectors as the list kernel scores them.
        excluded: per row, item ids never to list (the shop's exclusions).
        items: the list kernel's matrix: only its items are candidates, scored by the same product.
        user: float64 [rows, len(USER_FEATURES)].
    """
    b, m, depth = len(queries), len(items.item_idx), ranker.depth
    if b == 0 or m == 0:
        return pd.DataFrame({ROW: np.zeros(0, np.int64), ITEM: np.zeros(0, np.int64),
                             **{f: np.zeros(0) for f in FEATURES}})
    ex_keys = topk._excluded_keys(excluded, items)
    found: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # source -> (row, pos, rank)
    if "als" in ranker.sources or "als_rank" in ranker.features:
        sel = topk.top_k(queries, excluded, items, depth)
        found["als"] = (sel.row, sel.pos, sel.rank.astype(np.int64))
    r, other, s, anchor = co_purchase(hist_items, hist_ages, stats, ranker.co_half_life_days)
    pos, hit = items.positions(other)
    r, pos, s, anchor = r[hit], pos[hit], s[hit], anchor[hit]
    ok = ~np.isin(r * m + pos, ex_keys)
    r, pos, s, anchor = r[ok], pos[ok], s[ok], anchor[ok]
    co_key, first = np.unique(r * m + pos, return_index=True)
    co_val, co_anchor = s[first], anchor[first]
    rr, pp, _, k = _top_per_row(r, pos, s, depth)
    found["co"] = (rr, pp, k)
    recent_pos, recent_hit = items.positions(stats.recent)
    recent_pos = recent_pos[recent_hit]
    r = np.repeat(np.arange(b, dtype=np.int64), len(recent_pos))
    pos = np.tile(recent_pos, b)
    ok = ~np.isin(r * m + pos, ex_keys)
    r, pos = r[ok], pos[ok]
    k = topk.occurrence(r) + 1
    found["recent"] = (r[k <= depth], pos[k <= depth], k[k <= depth])
    # The candidates are the sources' union; a source left out (the ablation) still gives its rank as a feature.
    listed = [found[name][0] * m + found[name][1] for name in ranker.sources if name in found]
    keys = np.unique(np.concatenate(listed)) if listed else np.zeros(0, np.int64)
    row, pos = keys // m, keys % m
    out = {ROW: row, ITEM: items.item_idx[pos]}
    for name in SOURCES:
        rank = np.full(len(keys), float(depth + 1))
        if name in found:
            r, p, k = found[name]
            key = r * m + p
            at = np.minimum(np.searchsorted(keys, key), max(len(keys) - 1, 0))
            hit = (keys[at] == key) if len(keys) else np.zeros(len(key), dtype=bool)
            rank[at[hit]] = k[hit]
        out[f"{name}_rank"] = rank
    out["als_score"] = np.einsum("ij,ij->i", queries[row], items.vectors[pos]).astype(np.float64) if len(row) else np.zeros(0)
    co, why = np.zeros(len(keys)), np.full(len(keys), -1, dtype=np.int64)
    if len(co_key):
        at = np.minimum(np.searchsorted(co_key, keys), len(co_key) - 1)
        hit = co_key[at] == keys
        co[hit], why[hit] = co_val[at[hit]], co_anchor[at[hit]]
    out["co_score"] = co
    spos, shit = stats.positions(out[ITEM])
    vals = np.where(shit[:, None], stats.values[spos], np.nan) if len(spos) else np.zeros((0, len(ITEM_FEATURES)))
    for j, f in enumerate(ITEM_FEATURES):
        out[f] = vals[:, j]
    for j, f in enumerate(USER_FEATURES):
        if f != "user_price":
            out[f] = user[row, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["price_ratio"] = out["item_price"] / user[row, USER_FEATURES.index("user_price")]
    out[ANCHOR] = why
    frame = pd.DataFrame(out)
    return frame[[ROW, ITEM, *FEATURES, ANCHOR]]


def anchors(frame: pd.DataFrame, items: topk.ItemMatrix, sel: topk.Selection) -> np.ndarray:
    """The co-purchase anchor of each selected (row, item) of a block's candidates (-1: none, or no column)."""
    if ANCHOR not in frame.columns or not len(sel.row) or not len(frame):
        return np.full(len(sel.row), -1, dtype=np.int64)
    m = len(items.item_idx)
    pos, _ = items.positions(frame[ITEM].to_numpy())
    keys = frame[ROW].to_numpy(dtype=np.int64) * m + pos
    order = np.argsort(keys, kind="stable")
    want = sel.row.astype(np.int64) * m + sel.pos
    at = np.minimum(np.searchsorted(keys[order], want), len(keys) - 1)
    hit = keys[order][at] == want
    return np.where(hit, frame[ANCHOR].to_numpy(dtype=np.int64)[order][at], -1)


def rank(frame: pd.DataFrame, ranker: Ranker, items: topk.ItemMatrix, n: int, cap: int | None,
         threads: int = 1) -> topk.Selection:
    """The ranked top `n` of a block's candidates, at most `cap` per category: a selection as `topk.top_k` gives."""
    score = ranker.predict(frame, threads)
    pos, _ = items.positions(frame[ITEM].to_numpy())
    return topk._select(frame[ROW].to_numpy(dtype=np.int64), pos, score.astype(np.float64), items,
                        np.zeros(0, np.int64), n, cap)


PARAMS = {"objective": "lambdarank", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 50,
          "bagging_fraction": 0.8, "bagging_freq": 1, "feature_fraction": 0.8, "verbose": -1,
          "lambdarank_truncation_level": 20, "metric": "ndcg", "eval_at": [10]}


def fit(frames: list[pd.DataFrame], features: Sequence[str] = FEATURES, *, seed: int = 42, threads: int = 1,
        max_rounds: int = 500, patience: int = 20, models: int = 1, **settings) -> tuple[str, dict]:
    """Train lambdarank on labelled candidate frames (one per training cut, newest first).

    Each frame holds a `group` column (one customer at one cut) and a 0/1 `label`; customers without a
    positive teach nothing and are dropped. With two cuts or more the number of rounds is chosen by early
    stopping on the newest cut while training on the others, then the model is refit on all of them; with
    one, `max_rounds` is a ceiling the validation never checks, so it trains on it with a fifth held out.

    With `models` above 1, that many are trained with the seeds `seed`, `seed` + 1, ... and averaged. One
    model's early stopping is noisy: on Online Retail II three seeds stopped at 14, 53 and 72 rounds, for
    NDCG@10 0.1316 to 0.1378; three averaged gave 0.1376 to 0.1402 (bench/RESULTS.md).

    Returns:
        (the ranker's text, `join_models`; what happened: rounds per model, rows, groups, positives per cut).
    """
    texts, rounds = [], []
    info: dict = {}
    for m in range(max(1, models)):
        text, info = _fit_one(frames, features, seed=seed + m, threads=threads, max_rounds=max_rounds,
                              patience=patience, **settings)
        texts.append(text)
        rounds.append(info["rounds"])
    info["rounds"] = rounds
    return join_models(texts), info


def _fit_one(frames: list[pd.DataFrame], features: Sequence[str], *, seed: int, threads: int, max_rounds: int,
             patience: int, **settings) -> tuple[str, dict]:
    import lightgbm as lgb

    params = {**PARAMS, "seed": seed, "num_threads": max(1, threads), **settings}
    useful = [_useful(f) for f in frames]
    info = {"rows": [int(len(f)) for f in useful], "groups": [int(f["group"].nunique()) for f in useful],
            "positives": [int(f["label"].sum()) for f in useful]}
    useful = [f for f in useful if len(f)]
    if not useful:
        raise ValueError("no customer at any training cut bought one of their candidates: nothing to learn from")
    if len(useful) == 1:  # hold out a fifth of the customers to choose the rounds
        f = useful[0]
        groups = f["group"].unique()
        held = set(np.random.default_rng(seed).permutation(groups)[: max(1, len(groups) // 5)])
        valid, rest = f[f["group"].isin(held)], f[~f["group"].isin(held)]
        tuned_on, valid_frames = [rest], [valid] if len(rest) else None
    else:
        tuned_on, valid_frames = useful[1:], [useful[0]]
    rounds = max_rounds
    if valid_frames:
        held_out = lgb.train(params, _dataset(pd.concat(tuned_on), features), num_boost_round=max_rounds,
                             valid_sets=[_dataset(valid_frames[0], features)],
                             callbacks=[lgb.early_stopping(patience, verbose=False)])
        rounds = held_out.best_iteration or max_rounds
    model = lgb.train(params, _dataset(pd.concat(useful), features), num_boost_round=rounds)
    info["rounds"] = int(rounds)
    return model.model_to_string(), info


def _useful(frame: pd.DataFrame) -> pd.DataFrame:
    keep = frame.groupby("group")["label"].transform("max") > 0
    return frame[keep].sort_values("group", kind="stable")


def _dataset(frame: pd.DataFrame, features: Sequence[str]):
    import lightgbm as lgb

    frame = frame.sort_values("group", kind="stable")
    return lgb.Dataset(frame.loc[:, list(features)].to_numpy(dtype=np.float64), frame["label"].to_numpy(),
                       group=frame.groupby("group", sort=False).size().to_numpy(), feature_name=list(features),
                       free_raw_data=True)
