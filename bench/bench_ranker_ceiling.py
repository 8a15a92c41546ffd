"""Issue 32, before building it in Spark: can candidates + a learned ranker pass the single-model ceiling?

`bench_quality_ceiling.py` found no single list above NDCG@10 0.1294 on Online Retail II (the best of 152,
picked on the test month itself). Issue 32 asks for >= 0.13 and >= 1.7x recently popular from two stages:
candidates from several sources, then a learning-to-rank model over features no factor model sees. This
script answers whether that is within reach before the Spark version is built, on the same protocol
(`bench_quality_ceiling.Protocol`: last 28 days held out, relevant = items new to the customer, bought
items excluded), in one process with numpy, `implicit` and LightGBM:

- candidates at a cut: ALS top-K (implicit, the settings sparkrec tunes to on this file), co-purchase
  (items in the same invoices as the customer's items, weighted by how recently they bought them),
  recently popular top-K;
- features of each (customer, candidate): the sources' scores and ranks, popularity now and its trend,
  the item's age and last sale, the customer's activity and recency, price against the customer's usual;
- the ranker: LightGBM lambdarank, trained at a cut 28 days earlier (labels: what each customer bought new in
  the 28 days before the test cut), then applied at the test cut;
- the ablation: each source and feature group removed in turn.

    python bench/bench_ranker_ceiling.py          # a few minutes on 2 cores

Nothing here is used by sparkrec itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality_ceiling import DATA, NON_PRODUCT, Protocol  # noqa: E402

K_SOURCE = 100  # candidates per source and customer
HORIZON = 28.0  # days: the test period, and the label window of the ranker's training cut


def clean(path: Path, baskets: str = "invoice") -> pd.DataFrame:
    """The protocol's rows (as `Protocol` keeps them), with the basket and the price the features need.

    `baskets="day"`: a basket is one customer's day, as sparkrec's interactions (which keep no invoice) give it.
    """
    df = pd.read_parquet(path).drop_duplicates()
    df = df[df["Customer ID"].notna() & ~df["Invoice"].str.startswith("C") & (df["Quantity"] > 0) & (df["Price"] > 0)]
    df = df[~df["StockCode"].str.fullmatch(NON_PRODUCT)]
    ts = pd.to_datetime(df["InvoiceDate"])
    basket = df["Invoice"] if baskets == "invoice" else df["Customer ID"].astype(str) + "@" + ts.dt.strftime("%Y-%m-%d")
    return pd.DataFrame({"user": df["Customer ID"].to_numpy(), "item": df["StockCode"].to_numpy(),
                         "invoice": basket.to_numpy(), "price": df["Price"].to_numpy(),
                         "ts": ts.to_numpy()})


@dataclass
class Cut:
    """Everything known at one moment: the history before it, indexed, and the candidates' raw scores."""

    users: np.ndarray  # user keys, index = row
    items: np.ndarray  # item keys, index = column
    seen: sp.csr_matrix  # users x items, 1 where bought before the cut
    als: np.ndarray  # users x items scores
    co: np.ndarray  # users x items co-purchase scores
    item_feats: pd.DataFrame  # per item column
    user_feats: pd.DataFrame  # per user row
    recent_top: np.ndarray  # item columns, most recently popular first


def at_cut(df: pd.DataFrame, cut: pd.Timestamp, seed: int = 42) -> Cut:
    from implicit.cpu.als import AlternatingLeastSquares

    h = df[df["ts"] < cut]
    users, u = np.unique(h["user"].to_numpy(), return_inverse=True)
    items, i = np.unique(h["item"].to_numpy(), return_inverse=True)
    age = (cut - h["ts"]).dt.total_seconds().to_numpy() / 86400
    shape = (len(users), len(items))
    seen = sp.csr_matrix((np.ones(len(u)), (u, i)), shape=shape)
    seen.data[:] = 1.0
    # ALS on recency-weighted log confidence (half-life 30 days), as sparkrec's tuning settles on this file.
    conf = sp.csr_matrix((0.5 ** (age / 30.0), (u, i)), shape=shape)
    conf.sum_duplicates()
    conf.data = np.log1p(conf.data)
    model = AlternatingLeastSquares(factors=64, regularization=0.1, alpha=1.0, iterations=15, random_state=seed,
                                    calculate_training_loss=False)
    model.fit(conf.astype(np.float32).tocsr(), show_progress=False)
    als = model.user_factors @ model.item_factors.T
    # Co-purchase: invoice x item, normalised by both items' counts; a customer's items weighted by recency.
    inv, v = np.unique(h["invoice"].to_numpy(), return_inverse=True)
    basket = sp.csr_matrix((np.ones(len(v)), (v, i)), shape=(len(inv), len(items)))
    basket.data[:] = 1.0
    cooc = (basket.T @ basket).tocsr().astype(np.float64)
    cooc.setdiag(0)
    n = np.asarray(basket.sum(0)).ravel()
    norm = 1.0 / np.sqrt(np.maximum(n, 1.0))
    cooc = sp.diags(norm) @ cooc @ sp.diags(norm)
    last = pd.DataFrame({"u": u, "i": i, "age": age}).groupby(["u", "i"])["age"].min().reset_index()
    recency = sp.csr_matrix((0.5 ** (last["age"].to_numpy() / 14.0), (last["u"], last["i"])), shape=shape)
    co = np.asarray((recency @ cooc).todense())
    # Item features: buyers over all, 28 and 7 days, trend, age, last sale, median price.
    frame = pd.DataFrame({"u": u, "i": i, "age": age, "price": h["price"].to_numpy()})

    def buyers(days: float) -> pd.Series:
        return frame[frame["age"] < days].groupby("i")["u"].nunique().reindex(range(len(items)), fill_value=0)

    pop_all, pop_28, pop_7 = buyers(1e9), buyers(28), buyers(7)
    item_feats = pd.DataFrame({
        "pop_all": np.log1p(pop_all.to_numpy()), "pop_28": np.log1p(pop_28.to_numpy()),
        "pop_7": np.log1p(pop_7.to_numpy()),
        "trend": (pop_7.to_numpy() + 1) / (pop_28.to_numpy() / 4 + 1),
        "item_age": frame.groupby("i")["age"].max().reindex(range(len(items))).to_numpy(),
        "item_last_sale": frame.groupby("i")["age"].min().reindex(range(len(items))).to_numpy(),
        "item_price": frame.groupby("i")["price"].median().reindex(range(len(items))).to_numpy(),
    })
    g = frame.groupby("u")
    inv_per_user = pd.DataFrame({"u": u, "inv": v}).groupby("u")["inv"].nunique()
    user_feats = pd.DataFrame({
        "user_items": g["i"].nunique().to_numpy(), "user_invoices": inv_per_user.to_numpy(),
        "user_last": g["age"].min().to_numpy(), "user_first": g["age"].max().to_numpy(),
        "user_price": g["price"].median().to_numpy(),
    })
    recent_top = np.argsort(-(pop_28.to_numpy() - 1e-6 * np.arange(len(items)) / len(items)), kind="stable")
    return Cut(users, items, seen, als, co, item_feats, user_feats, recent_top)


def top_k(scores: np.ndarray, seen: sp.csr_matrix, k: int) -> np.ndarray:
    s = scores.copy()
    s[seen.nonzero()] = -np.inf
    part = np.argpartition(-s, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


SOURCES = ("als", "co", "recent")
GROUPS = {
    "als": ["als_score", "als_rank"],
    "co": ["co_score", "co_rank"],
    "popularity": ["pop_all", "pop_28", "pop_7", "trend", "recent_rank"],
    "item": ["item_age", "item_last_sale"],
    "customer": ["user_items", "user_invoices", "user_last", "user_first"],
    "price": ["price_ratio", "item_price"],
}


def candidates(c: Cut, rows: np.ndarray, sources=SOURCES) -> pd.DataFrame:
    """(row, col) candidates of the given user rows from each source, with every feature."""
    seen = c.seen[rows]
    parts, ranks = [], {}
    if "als" in sources:
        ranks["als"] = top_k(c.als[rows], seen, K_SOURCE)
    if "co" in sources:
        ranks["co"] = top_k(c.co[rows], seen, K_SOURCE)
    if "recent" in sources:
        rec = np.empty((len(rows), K_SOURCE), dtype=np.int64)
        for j in range(len(rows)):  # the first K not bought
            bought = seen[j].indices
            pool = c.recent_top[: K_SOURCE + len(bought)]
            rec[j] = pool[~np.isin(pool, bought)][:K_SOURCE]
        ranks["recent"] = rec
    for top in ranks.values():
        parts.append(pd.DataFrame({"r": np.repeat(np.arange(len(rows)), top.shape[1]), "col": top.ravel()}))
    cand = pd.concat(parts).drop_duplicates().reset_index(drop=True)
    for name, top in ranks.items():
        key = pd.DataFrame({"r": np.repeat(np.arange(len(rows)), top.shape[1]), "col": top.ravel(),
                            f"{name}_rank": np.tile(np.arange(1, top.shape[1] + 1), len(rows))})
        cand = cand.merge(key, on=["r", "col"], how="left")
        cand[f"{name}_rank"] = cand[f"{name}_rank"].fillna(K_SOURCE + 1)
    for name in SOURCES:
        if f"{name}_rank" not in cand:
            cand[f"{name}_rank"] = K_SOURCE + 1
    user_rows = rows[cand["r"].to_numpy()]
    cols = cand["col"].to_numpy()
    cand["row"] = user_rows
    cand["als_score"] = c.als[user_rows, cols]
    cand["co_score"] = c.co[user_rows, cols]
    for k, v in c.item_feats.items():
        cand[k] = v.to_numpy()[cols]
    for k, v in c.user_feats.items():
        cand[k] = v.to_numpy()[user_rows]
    cand["price_ratio"] = cand["item_price"] / cand["user_price"]
    return cand.drop(columns=["r", "user_price"])


def features(cand: pd.DataFrame, drop: set[str]) -> list[str]:
    return [f for g, fs in GROUPS.items() if g not in drop for f in fs]


def new_purchases(df: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> set[tuple[str, str]]:
    before = set(zip(df.loc[df["ts"] < start, "user"], df.loc[df["ts"] < start, "item"]))
    window = df[(df["ts"] >= start) & (df["ts"] < end)]
    return {p for p in zip(window["user"], window["item"]) if p not in before}


def _grouped(cand: pd.DataFrame, labels: np.ndarray) -> pd.DataFrame:
    frame = cand.assign(label=labels)
    keep = frame.groupby("row")["label"].transform("max") > 0  # customers with a positive among their candidates
    return frame[keep].sort_values("row", kind="stable")


def train_ranker(cand: pd.DataFrame, labels: np.ndarray, feats: list[str], seed: int = 42, rounds: int = 300,
                 valid: tuple[pd.DataFrame, np.ndarray] | None = None):
    """LightGBM lambdarank; with `valid`, stops when NDCG@10 on it has not improved for 20 rounds."""
    import lightgbm as lgb

    def dataset(c: pd.DataFrame, y: np.ndarray) -> lgb.Dataset:
        frame = _grouped(c, y)
        return lgb.Dataset(frame[feats], frame["label"], group=frame.groupby("row", sort=False).size().to_numpy())

    params = {"objective": "lambdarank", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 50,
              "bagging_fraction": 0.8, "bagging_freq": 1, "feature_fraction": 0.8, "seed": seed, "verbose": -1,
              "num_threads": 2, "lambdarank_truncation_level": 20, "eval_at": [10], "metric": "ndcg"}
    train = dataset(cand, labels)
    if valid is None:
        return lgb.train(params, train, num_boost_round=rounds)
    return lgb.train(params, train, num_boost_round=rounds, valid_sets=[dataset(*valid)],
                     callbacks=[lgb.early_stopping(20, verbose=False)])


def protocol_scores(p: Protocol, c: Cut, cand: pd.DataFrame, score: np.ndarray) -> np.ndarray:
    """A (p.users x p.n_items) score matrix in the protocol's indexing: candidates by `score`, the rest below them
    in recent popularity (every list is full, as sparkrec's fill makes it)."""
    # Protocol indexes users and items by sorted key over the same history: the same order as np.unique here.
    assert p.n_users == len(c.users) and p.n_items == len(c.items)
    out = np.tile(-1e6 - np.argsort(c.recent_top).astype(np.float64), (len(p.users), 1))
    pos = {u: j for j, u in enumerate(p.users)}
    mask = cand["row"].map(pos)
    ok = mask.notna().to_numpy()
    out[mask[ok].astype(int).to_numpy(), cand["col"].to_numpy()[ok]] = score[ok]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--rounds", type=int, default=0, help="boosting rounds; 0: chosen on the newest training cut")
    ap.add_argument("--cuts", type=int, default=5, help="training cuts, 28 days apart, stacked")
    ap.add_argument("--baskets", choices=("invoice", "day"), default="invoice",
                    help="what co-purchase counts as bought together: an invoice, or a customer's day")
    args = ap.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data} is missing (see ../shared/data/README.md)")
    t0 = time.monotonic()
    p = Protocol(args.data, HORIZON)
    df = clean(args.data, args.baskets)
    test_cut = pd.Timestamp(p.cut)
    train_cut = test_cut - pd.Timedelta(days=HORIZON)
    print(f"{len(p.users):,} evaluated customers; test cut {test_cut}, ranker's training cut {train_cut}", flush=True)
    trs = [at_cut(df, train_cut - pd.Timedelta(days=HORIZON * n)) for n in range(args.cuts)]
    te = at_cut(df, test_cut)
    print(f"scores at {args.cuts + 1} cuts in {time.monotonic() - t0:.0f} s", flush=True)
    back = [pd.Timedelta(days=HORIZON * n) for n in range(args.cuts)]
    positives = [new_purchases(df, train_cut - b, test_cut - b) for b in back]
    results: dict[str, float] = {}
    recent = p.ndcg(p.popularity(30.0))
    results["recently popular (30 days)"] = recent
    test_rows = np.arange(len(te.users))
    als_alone = results["ALS alone"] = p.ndcg(te.als[p.users])  # the same sorted keys: the same indexing
    print(f"recently popular NDCG@10 {recent:.4f}; ALS alone {als_alone:.4f}", flush=True)

    def run(name: str, sources=SOURCES, drop: frozenset[str] = frozenset()) -> float:
        t = time.monotonic()
        frames, labels = [], []
        for n, (tr, pos) in enumerate(zip(trs, positives)):
            ctr = candidates(tr, np.arange(len(tr.users)), sources)
            lab = np.array([(u, i) in pos for u, i in zip(tr.users[ctr["row"]], tr.items[ctr["col"]])], dtype=int)
            frames.append(ctr.assign(row=ctr["row"] + n * 1_000_000))
            labels.append(lab)
        feats = features(frames[0], set(drop))
        rounds = args.rounds
        if rounds == 0:  # chosen on the newest training cut, trained on the older ones: the test month unseen
            held = train_ranker(pd.concat(frames[1:], ignore_index=True), np.concatenate(labels[1:]), feats,
                                rounds=500, valid=(frames[0], labels[0]))
            rounds = held.best_iteration or 500
        ctr, labels = pd.concat(frames, ignore_index=True), np.concatenate(labels)
        model = train_ranker(ctr, labels, feats, rounds=rounds)
        cte = candidates(te, test_rows, sources)
        got = p.ndcg(protocol_scores(p, te, cte, model.predict(cte[feats])))
        recall = labels.sum() / max(1, sum(len(p) for p in positives))
        results[name] = got
        print(f"{name}: NDCG@10 {got:.4f} ({got / recent:.2f}x recently popular; {rounds} rounds); candidates hold "
              f"{recall:.1%} of the label window's new purchases; {time.monotonic() - t:.0f} s", flush=True)
        if name == "ranker, everything":
            gain = dict(zip(feats, model.feature_importance("gain")))
            total = sum(gain.values()) or 1.0
            ordered = sorted(gain.items(), key=lambda kv: -kv[1])
            print("  gain: " + ", ".join(f"{k} {v / total:.0%}" for k, v in ordered))
        return got

    run("ranker, everything")
    if not args.no_ablation:
        for s in SOURCES:
            run(f"without the {s} candidates", tuple(x for x in SOURCES if x != s))
        for g in GROUPS:
            run(f"without the {g} features", drop=frozenset({g}))
    print(f"\nrecently popular {recent:.4f}; best single list (ceiling study) 0.1294; "
          f"ranker {results['ranker, everything']:.4f} ({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
