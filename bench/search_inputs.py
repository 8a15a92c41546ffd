"""What the search protocol (bench_search.py) computes from a shop's history at a moment, with sparkrec's kernels.

At any moment `at` (the protocol's cut, or a training cut before it), from the purchase events before it:
the items' figures (`core.ranker.item_stats`, popularity at three horizons, age, last sale, price, co-purchase
neighbours), and each customer's own history (`core.searchrank.Customer`). The batch computes the same
figures in Spark (`batch.ranking.item_inputs`); here they are pandas over the bench's clean events, so a
training cut costs seconds and sees nothing at or after `at`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sparkrec.core import ranker, searchrank

RECENT_DAYS = 28.0
NEIGHBOURS = 50
BASKET_ITEMS = 100
HALF_LIFE_DAYS = 14.0


def item_stats(history: pd.DataFrame, at: pd.Timestamp) -> ranker.ItemStats:
    """`history`: item_idx, user, ts, price (events before `at`)."""
    age = (at - history["ts"]).dt.total_seconds() / 86400.0
    h = history.assign(age=age)
    per_user = h.groupby(["item_idx", "user"])["age"].agg(["min", "max"]).reset_index()
    per_item = per_user.groupby("item_idx").agg(
        users=("min", "size"), users_recent=("min", lambda s: int((s < RECENT_DAYS).sum())),
        users_week=("min", lambda s: int((s < ranker.WEEK_DAYS).sum())), age_days=("max", "max"),
        last_days=("min", "min")).reset_index()
    price = h.groupby("item_idx")["price"].median().rename("price").reset_index()
    per_item = per_item.merge(price, on="item_idx", how="left")
    day = h.assign(day=h["ts"].dt.floor("D"))
    latest = (day.groupby(["user", "day", "item_idx"])["ts"].max().reset_index()
              .sort_values(["user", "day", "ts"], ascending=[True, True, False]))
    baskets = [g.to_numpy()[:BASKET_ITEMS] for _, g in latest.groupby(["user", "day"], sort=False)["item_idx"]]
    i, j, both = ranker.basket_pairs(baskets)
    days = pd.Series(np.concatenate(baskets) if baskets else np.zeros(0, np.int64)).value_counts()
    off = i != j
    pairs = ranker.strongest_neighbours(i[off], j[off], both[off], days.index.to_numpy(np.int64),
                                        days.to_numpy(np.int64), NEIGHBOURS)
    return ranker.item_stats(per_item, pairs, 100)


def customers(history: pd.DataFrame, at: pd.Timestamp, stats: ranker.ItemStats,
              factors: dict[str, np.ndarray] | None = None) -> dict[str, searchrank.Customer]:
    """Each customer's `searchrank.Customer` at `at` (their model factor from `factors` where given)."""
    h = history.assign(day=history["ts"].dt.floor("D"))
    per = h.groupby(["user", "item_idx"]).agg(days=("day", "nunique"), last=("ts", "max"), first=("ts", "min")).reset_index()
    per["last"] = (at - per["last"]).dt.total_seconds() / 86400.0
    per["first"] = (at - per["first"]).dt.total_seconds() / 86400.0
    price = h.groupby("user")["price"].median()
    users = per["user"].drop_duplicates().tolist()
    grouped = {u: g for u, g in per.groupby("user", sort=False)}
    hist_items = [grouped[u]["item_idx"].to_numpy(np.int64) for u in users]
    hist_ages = [grouped[u]["last"].to_numpy(np.float64) for u in users]
    rows, item, score, _ = ranker.co_purchase(hist_items, hist_ages, stats, HALF_LIFE_DAYS)
    co = pd.DataFrame({"row": rows, "item": item, "score": score}).sort_values(["row", "item"])
    bounds = np.searchsorted(co["row"].to_numpy(), np.arange(len(users) + 1))
    co_item, co_score = co["item"].to_numpy(np.int64), co["score"].to_numpy(np.float64)
    out = {}
    for r, u in enumerate(users):
        g = grouped[u]
        s, e = bounds[r], bounds[r + 1]
        out[u] = searchrank.Customer(
            g["item_idx"].to_numpy(np.int64), g["days"].to_numpy(np.float64), g["last"].to_numpy(np.float64),
            g["first"].to_numpy(np.float64), None if factors is None else factors.get(u), float(price.get(u, np.nan)),
            co_item[s:e], co_score[s:e])
    return out


def folded_factors(history: pd.DataFrame, at: pd.Timestamp, snap, cfg) -> dict[str, np.ndarray]:
    """Each customer's factor at `at`: their purchases before it (weighted as the batch trains: event weights and
    the recency half-life at `at`) folded into the served model's item factors (`core.foldin`), as the server folds
    a customer in. The item factors were fitted on history up to the protocol's cut, which holds a training cut's
    label days: the factors of items bought together there are closer than a model fitted at the training cut would
    have them. This flatters the model score in the training rows, so a ranker learns to trust it more than it
    should on the held-out queries: it can only cost the learned ranking, never flatter its held-out figure."""
    from sparkrec.core import events as ev
    from sparkrec.core import foldin

    model = snap.model
    if model.factors is None or model.yty is None:
        return {}
    ts = history["ts"].dt.tz_localize("UTC").astype("int64").to_numpy() // 1000
    w, _, _ = ev.event_arrays(np.full(len(history), "purchase", dtype=object), ts, np.full(len(history), np.nan),
                              model.train, at.tz_localize("UTC").to_pydatetime(), [])
    h = pd.DataFrame({"user": history["user"].to_numpy(), "item_idx": history["item_idx"].to_numpy(), "w": w})
    per = h.groupby(["user", "item_idx"])["w"].sum().reset_index()
    als = model.train.als
    out = {}
    for user, g in per.groupby("user", sort=False):
        fpos, known = model.positions(g["item_idx"].to_numpy(np.int64))
        weight = g["w"].to_numpy(np.float32)
        use = known & (weight > 0)
        if use.any():
            out[user] = np.asarray(foldin.fold_in(model.yty, model.factors.vectors[fpos[use]], weight[use], als.reg_param,
                                                  als.alpha, als.nonnegative), dtype=np.float64)
    return out
