"""A search ranking learned per shop: LightGBM's lambdarank over a query's matches, from the shop's own history.

No constant weights tuned on one file: each run fits its ranking on pseudo-queries
from its own history (`pseudo_queries`): at a training cut, each purchase in the
days after it becomes a query of one word of the bought item's name, as a
shopper who wanted that item might type it, and the group to rank is that
query's matches with the bought item the one relevant. Every feature of a match
is computed here from what the index said (`search.Found`), the items' figures
(`core.ranker.ItemStats`), the customer's own history before the moment
(`Customer`) and their model factor, the same function for the rows a run
learns from and for the route that ranks a query a second after the customer's
last event.

The features, grouped as an ablation removes them (`GROUPS`):
- text: BM25, BM25 against the best match, the share of the query's words held,
  typos, a match only through a completion, the exact key;
- item: popularity at three horizons and its trend, first and last sale, price;
- mine: how many days the customer bought the item on, days since the last,
  their usual interval between those days and how due the next one is, the
  share of their items in the item's category;
- personal: their model score (raw and against the best match), co-purchase with
  their items, the price against the one they usually pay;
- query: how many items match (a broad word and a narrow one rank differently).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sparkrec.core import matching, ranker, search

GROUPS: dict[str, tuple[str, ...]] = {
    "text": ("text", "text_rel", "words_share", "typos", "prefix_only", "key"),
    "item": ranker.ITEM_FEATURES,
    "mine": ("mine_days_bought", "mine_last", "mine_interval", "mine_due", "cat_share"),
    "personal": ("als_score", "als_rel", "co_score", "price_ratio"),
    "query": ("matches",),
}
FEATURES = tuple(f for group in GROUPS.values() for f in group)
_WORD = re.compile(r"[^\W\d_]{3,}")  # letters only, three or more: a word a shopper would type


def name_words(name: str | None) -> set[str]:
    """The words of an item's name a pseudo-query may be (lowercased letters, three or more)."""
    return {w.lower() for w in _WORD.findall(name or "")}


def word_items(names: Iterable[str | None]) -> dict[str, int]:
    """In how many of `names` each word appears (`name_words`)."""
    out: dict[str, int] = {}
    for name in names:
        for w in name_words(name):
            out[w] = out.get(w, 0) + 1
    return out


def pseudo_query(name: str | None, items_of: dict[str, int], rng: np.random.Generator, min_items: int = 20,
                 max_items: int = 500) -> str | None:
    """One word of a bought item's name as the query a shopper who wanted it might have typed: drawn among the
    words in `min_items` to `max_items` items' names (a word of one item finds it alone; a word of most items says
    nothing), or None when the name has no such word."""
    eligible = sorted(w for w in name_words(name) if min_items <= items_of.get(w, 0) <= max_items)
    return eligible[rng.integers(len(eligible))] if eligible else None


@dataclass
class Customer:
    """One customer's history as of a moment, as the search ranking reads it.

    Attributes:
        item_idx: the items they touched, ascending.
        days: on how many distinct days they touched each (a purchase-only shop: days they bought it).
        last, first: days from the moment back to their last and first touch of each.
        factor: their model factor (None: no model score).
        price: the median price they paid (NaN: unknown).
        co_item, co_score: items bought with theirs and the co-purchase score (`ranker.co_purchase`), ascending ids.
        categories: each of their items' category code (-1: none), aligned with `item_idx`.
    """

    item_idx: np.ndarray
    days: np.ndarray
    last: np.ndarray
    first: np.ndarray
    factor: np.ndarray | None = None
    price: float = float("nan")
    co_item: np.ndarray | None = None
    co_score: np.ndarray | None = None
    categories: np.ndarray | None = None


def _lookup(keys: np.ndarray, values: np.ndarray, ids: np.ndarray, missing: float) -> np.ndarray:
    """values[keys == id] for each of `ids` (keys ascending), `missing` where absent."""
    out = np.full(len(ids), missing, dtype=np.float64)
    if not len(keys) or not len(ids):
        return out
    at = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
    hit = keys[at] == ids
    out[hit] = values[at[hit]]
    return out


def features(found: search.Found, stats: ranker.ItemStats, categories: np.ndarray | None,
             vectors: np.ndarray | None, customer: Customer | None) -> np.ndarray:
    """float32 [matches, len(FEATURES)] for a query's matches (NaN: unknown, which LightGBM routes on its own).

    Args:
        found: the matches and how each matched.
        stats: the items' figures (any item missing from it gets NaN).
        categories: each match's category code (-1: none), or None.
        vectors: each match's model factor (NaN rows: none), or None without a model.
        customer: the one who searched, or None (anyone).
    """
    n = len(found.item_idx)
    out = np.full((n, len(FEATURES)), np.nan, dtype=np.float64)
    if not n:
        return out.astype(np.float32)
    col = {f: j for j, f in enumerate(FEATURES)}
    top = float(found.text.max())
    out[:, col["text"]] = found.text
    out[:, col["text_rel"]] = found.text / top if top > 0 else 0.0
    out[:, col["words_share"]] = found.matched / max(1, len(found.words))
    out[:, col["typos"]] = found.typos
    k = found.kinds
    out[:, col["prefix_only"]] = ((k == matching.PREFIX).any(axis=1) & ~(k == matching.EXACT).any(axis=1)) if k.size else 0
    out[:, col["key"]] = found.key
    out[:, col["matches"]] = np.log1p(n)
    pos, hit = stats.positions(found.item_idx)
    if len(stats.item_idx):
        vals = np.where(hit[:, None], stats.values[pos], np.nan)
        for j, f in enumerate(ranker.ITEM_FEATURES):
            out[:, col[f]] = vals[:, j]
    if customer is None:
        return out.astype(np.float32)
    ids = found.item_idx
    days = _lookup(customer.item_idx, customer.days.astype(np.float64), ids, 0.0)
    last = _lookup(customer.item_idx, customer.last, ids, np.nan)
    first = _lookup(customer.item_idx, customer.first, ids, np.nan)
    out[:, col["mine_days_bought"]] = days
    out[:, col["mine_last"]] = last
    with np.errstate(divide="ignore", invalid="ignore"):
        interval = np.where(days >= 2, (first - last) / np.maximum(days - 1, 1), np.nan)
        out[:, col["mine_interval"]] = interval
        out[:, col["mine_due"]] = last / interval
    if categories is not None and customer.categories is not None and len(customer.categories):
        codes = np.asarray(customer.categories, dtype=np.int64)
        known = codes[codes >= 0]
        if len(known):
            counts = np.bincount(known)
            cats = np.asarray(categories, dtype=np.int64)
            ok = (cats >= 0) & (cats < len(counts))
            share = np.zeros(n)
            share[ok] = counts[cats[ok]] / len(codes)
            out[:, col["cat_share"]] = share
    if customer.factor is not None and vectors is not None:
        als = vectors.astype(np.float64) @ np.asarray(customer.factor, dtype=np.float64)
        out[:, col["als_score"]] = als
        best = np.nanmax(als) if np.isfinite(als).any() else np.nan
        out[:, col["als_rel"]] = als - best
    if customer.co_item is not None and customer.co_score is not None:
        out[:, col["co_score"]] = _lookup(customer.co_item, customer.co_score, ids, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:, col["price_ratio"]] = out[:, col["item_price"]] / customer.price
    return out.astype(np.float32)


@dataclass
class SearchRanker:
    """A fitted search ranking: LightGBM's text (`ranker.join_models`) and the features it was trained on."""

    model: str
    features: tuple[str, ...] = FEATURES

    def __post_init__(self) -> None:
        self._ranker = ranker.Ranker(model=self.model, features=self.features)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Each match's score from its `features` row (all of FEATURES, in order)."""
        if not len(x):
            return np.zeros(0)
        frame = pd.DataFrame(x[:, [FEATURES.index(f) for f in self.features]], columns=list(self.features))
        return self._ranker.predict(frame)


def without_bought(groups: Sequence[tuple[np.ndarray, int]]) -> tuple[list[tuple[np.ndarray, int]], list[int]]:
    """Each group whose bought match is new to the customer (never bought before), less the matches they did buy
    before: what a shop hiding bought items would rank, the order of what is new to them. Returns those groups
    and the position of each one's source in `groups`.

    Trained beside the groups as served, they raised the held-out MRR@10 on Online Retail II by 2.0% on what is
    new to the customer and by 0.6% on everything (bench/RESULTS.md)."""
    col = FEATURES.index("mine_days_bought")
    out: list[tuple[np.ndarray, int]] = []
    source: list[int] = []
    for g, (x, target) in enumerate(groups):
        mine = x[:, col] > 0
        if mine[target] or not mine.any():
            continue
        keep = np.flatnonzero(~mine)
        out.append((x[keep], int(np.searchsorted(keep, target))))
        source.append(g)
    return out, source


def fit(groups: Sequence[tuple[np.ndarray, int]], features: Sequence[str] = FEATURES, *, cuts: Sequence[int] | None = None,
        seed: int = 42, threads: int = 1, models: int = 3, negatives: int | None = 200) -> tuple[SearchRanker, dict]:
    """Lambdarank on pseudo-queries: each group is (its matches' `features` rows, the bought match's row).

    `cuts` gives each group's training cut (0 the newest): with two or more, the rounds are chosen by early
    stopping on the newest (`ranker.fit`). At most `negatives` other matches of a group are kept (a random
    sample: a thousand matches per query would make most rows alike and the fit slow).
    """
    rng = np.random.default_rng(seed)
    frames: dict[int, list[pd.DataFrame]] = {}
    use = [FEATURES.index(f) for f in features]
    for g, (x, target) in enumerate(groups):
        keep = np.arange(len(x))
        if negatives is not None and len(x) > negatives + 1:
            others = np.delete(keep, target)
            keep = np.sort(np.r_[target, rng.choice(others, negatives, replace=False)])
        label = (keep == target).astype(np.int8)
        f = pd.DataFrame(x[keep][:, use].astype(np.float64), columns=list(features))
        f["group"], f["label"] = g, label
        frames.setdefault(0 if cuts is None else int(cuts[g]), []).append(f)
    ordered = [pd.concat(frames[c], ignore_index=True) for c in sorted(frames)]
    text, info = ranker.fit(ordered, features, seed=seed, threads=threads, models=models, patience=10)
    return SearchRanker(text, tuple(features)), info
