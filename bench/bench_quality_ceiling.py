"""How far above the baselines can any model get on Online Retail II? A single-process cross-check.

Issue 3 asks for NDCG@10 >= 0.10 and at least 2.5x the best baseline on this
file. The best baseline here is "recently popular" (the test period is the
Christmas season), which puts 2.5x at about 0.19. This script answers whether
that is a matter of tuning sparkrec or out of reach of the usual models: it
rebuilds the shared README's protocol in pandas/numpy (independently of
sparkrec's Spark code, so it also cross-checks our baseline figures) and scores

- the two popularity baselines,
- implicit ALS (the `implicit` library) over a grid of recency half-lives,
  log confidence, rank, regularisation and alpha,
- EASE (Steck 2019, a closed-form item-item model that is often stronger than
  ALS on small catalogues), with and without recency weighting,
- and each model blended with recent popularity (z-scored per user).

    python bench/bench_quality_ceiling.py            # about 3 minutes on 2 cores

It prints one line per list and, last, the best NDCG@10 and its ratio to the
best baseline. Nothing here is used by sparkrec itself.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "online_retail_ii_2009_2010.parquet"
# The same non-product codes as conf/online_retail.yaml.
NON_PRODUCT = r"(?i)(POST|DOT|C2|M|D|S|B|CRUK|PADS|ADJUST2?|BANK CHARGES|AMAZONFEE|TEST\d*|gift_\d+_\d+)"
K = 10


class Protocol:
    """Time split (last 28 days), relevant = test items new to the user, bought items excluded."""

    def __init__(self, path: Path, test_days: float = 28.0) -> None:
        df = pd.read_parquet(path).drop_duplicates()
        df = df[df["Customer ID"].notna() & ~df["Invoice"].str.startswith("C") & (df["Quantity"] > 0) & (df["Price"] > 0)]
        df = df[~df["StockCode"].str.fullmatch(NON_PRODUCT)]
        ts = pd.to_datetime(df["InvoiceDate"])
        self.cut = ts.max() - pd.Timedelta(days=test_days)
        train, test = df[ts < self.cut], df[ts >= self.cut]
        users = {u: i for i, u in enumerate(sorted(train["Customer ID"].unique()))}
        items = {s: i for i, s in enumerate(sorted(train["StockCode"].unique()))}
        self.n_users, self.n_items = len(users), len(items)
        self.u = train["Customer ID"].map(users).to_numpy()
        self.i = train["StockCode"].map(items).to_numpy()
        self.age_days = ((self.cut - ts[ts < self.cut]).dt.total_seconds() / 86400).to_numpy()
        bought = self.matrix(np.ones(len(self.u)))
        pairs = set(zip(self.u.tolist(), self.i.tolist()))
        relevant: dict[int, set[int]] = {}
        test = test[test["Customer ID"].isin(users)]
        unknown: dict[str, int] = {}  # items new to the shop: relevant, but no model can recommend them
        for cust, code in set(zip(test["Customer ID"], test["StockCode"])):
            u = users[cust]
            i = items[code] if code in items else unknown.setdefault(code, -1 - len(unknown))
            if (u, i) not in pairs:
                relevant.setdefault(u, set()).add(i)
        self.users = np.array(sorted(relevant))
        self.relevant = [relevant[u] for u in self.users]
        self.seen = bought[self.users].nonzero()

    def matrix(self, w: np.ndarray) -> sp.csr_matrix:
        m = sp.csr_matrix((w, (self.u, self.i)), shape=(self.n_users, self.n_items))
        m.sum_duplicates()
        return m

    def feedback(self, half_life: float | None = None, log_conf: bool = False) -> sp.csr_matrix:
        w = np.ones(len(self.u)) if half_life is None else 0.5 ** (self.age_days / half_life)
        m = self.matrix(w)
        if log_conf:
            m.data = np.log1p(m.data)
        return m.astype(np.float32)

    def popularity(self, window_days: float | None = None) -> np.ndarray:
        keep = np.ones(len(self.u), bool) if window_days is None else self.age_days < window_days
        m = sp.csr_matrix((np.ones(keep.sum()), (self.u[keep], self.i[keep])), shape=(self.n_users, self.n_items))
        buyers = np.asarray((m > 0).sum(0)).ravel().astype(float)
        # Ties broken by item index, as sparkrec breaks them by item id.
        return np.tile(buyers - 1e-6 * np.arange(self.n_items) / self.n_items, (len(self.users), 1))

    def ndcg(self, scores: np.ndarray) -> float:
        s = scores.astype(np.float64, copy=True)
        s[self.seen] = -np.inf
        top = np.argsort(-s, axis=1, kind="stable")[:, :K]
        disc = 1 / np.log2(np.arange(2, K + 2))
        total = 0.0
        for row, rel in zip(top, self.relevant):
            dcg = sum(disc[j] for j, item in enumerate(row) if item in rel)
            total += dcg / disc[: min(K, len(rel))].sum()
        return total / len(self.users)


def als_scores(p: Protocol, m: sp.csr_matrix, rank: int, reg: float, alpha: float) -> np.ndarray:
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(
        factors=rank, regularization=reg, alpha=alpha, iterations=15, random_state=42, calculate_training_loss=False
    )
    model.fit(m, show_progress=False)
    return model.user_factors[p.users] @ model.item_factors.T


def ease_scores(p: Protocol, m: sp.csr_matrix, lam: float) -> np.ndarray:
    x = m.toarray().astype(np.float64)
    g = x.T @ x
    g[np.diag_indices_from(g)] += lam
    inv = np.linalg.inv(g)
    b = inv / -np.diag(inv)
    b[np.diag_indices_from(b)] = 0.0
    return x[p.users] @ b


def zscore(s: np.ndarray) -> np.ndarray:
    return (s - s.mean(axis=1, keepdims=True)) / (s.std(axis=1, keepdims=True) + 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data} is missing: it is the UCI 'Online Retail II' 2009-2010 sheet saved as Parquet")
    t0 = time.monotonic()
    p = Protocol(args.data)
    print(f"{p.n_users:,} training users, {p.n_items:,} items, {len(p.users):,} evaluated users")
    baselines = {"most popular": p.popularity(), "recently popular (30 days)": p.popularity(30.0)}
    results = {name: p.ndcg(s) for name, s in baselines.items()}
    for name, v in results.items():
        print(f"baseline {name}: NDCG@10 {v:.4f}")
    best_baseline = max(results.values())
    recent = zscore(np.log1p(baselines["recently popular (30 days)"]))
    models: dict[str, float] = {}

    def record(name: str, scores: np.ndarray) -> None:
        models[name] = p.ndcg(scores)
        blends = {b: p.ndcg(zscore(scores) + b * recent) for b in (0.5, 1.0, 2.0)}
        for b, v in blends.items():
            models[f"{name} + {b:g} x recent popularity"] = v
        print(f"{name}: NDCG@10 {models[name]:.4f}; blended " + ", ".join(f"{b:g}: {v:.4f}" for b, v in blends.items()), flush=True)

    for half_life, log_conf in itertools.product((None, 14.0, 30.0, 60.0), (False, True)):
        m = p.feedback(half_life, log_conf)
        for rank, reg, alpha in ((64, 0.1, 1.0), (64, 1.0, 1.0), (128, 1.0, 1.0), (64, 0.1, 10.0)):
            record(f"ALS half-life {half_life} log {log_conf} rank {rank} reg {reg} alpha {alpha}", als_scores(p, m, rank, reg, alpha))
    for half_life, lam in itertools.product((None, 14.0, 30.0), (100.0, 500.0)):
        record(f"EASE half-life {half_life} log-confidence lambda {lam:g}", ease_scores(p, p.feedback(half_life, True), lam))
    name, best = max(models.items(), key=lambda kv: kv[1])
    print(f"\nbest baseline NDCG@10 {best_baseline:.4f}; 2.5x would be {2.5 * best_baseline:.4f}")
    print(f"best list: {name}: NDCG@10 {best:.4f} = {best / best_baseline:.2f}x the best baseline ({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
