"""Personalized search, measured: does ordering a query's matches for the customer find what they bought?

The protocol (issue 31), on Online Retail II:
1. cut 28 days before the last invoice; `sparkrec run` (the shipped retail config) on every raw row before it,
   which writes the lists, `serving_items` and the search index;
2. for each customer and each item they bought after the cut and had not bought before (the clean purchase
   lines, computed here in pandas, as bench_quality.py does), one query: one word of that item's description,
   letters only, 3 or more, that appears in the names of 20 to 500 catalogue items; one word per pair, drawn
   with a fixed seed;
3. the query goes through the server's own code (`serve.search.matches`: the index, the rules) on the snapshot
   `sparkrec serve` would load; the bought item's rank among the results gives MRR@10 and hit@10 for:
   text only; text + popularity; text + recent popularity; personalized (text, the customer's model score as
   the server folds it in, popularity, recent popularity);
4. every ranking's weights are tuned on half of the customers (a hash of their key) and reported on the other
   half, so no ranking wins by having been tuned on the figures it reports.

    python bench/bench_search.py                 # runs the batch once (about 5 min), then the protocol
    python bench/bench_search.py --reuse         # the warehouse of an earlier run

Target: personalized >= 1.3x the better popularity ranking on MRR@10 (held-out half).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import RETAIL, ROOT, SPARKREC, TEST_DAYS, retail_events  # noqa: E402

from sparkrec.core import search  # noqa: E402
from sparkrec.core.config import SearchWeights, load_config  # noqa: E402
from sparkrec.serve import live  # noqa: E402
from sparkrec.serve import search as serve_search  # noqa: E402
from sparkrec.serve.state import State  # noqa: E402

OUT = ROOT / "bench" / "out" / "search"
K = 10
SEED = 31
MIN_DF, MAX_DF = 20, 500
WORD = re.compile(r"[A-Za-z]{3,}")
GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)

log = logging.getLogger("bench_search")


@dataclass
class Query:
    user: str
    word: str
    target: int  # the bought item's position among the matches (-1: the search does not return it)
    item_idx: np.ndarray
    text: np.ndarray
    model: np.ndarray | None
    popularity: np.ndarray
    recent: np.ndarray
    tuning: bool  # the customer is in the tuning half
    co: np.ndarray  # co-purchase with the customer's own items (the ranker's kernel), 0..1 over the matches


def co_purchase_scores(snap, train: pd.DataFrame, cut: pd.Timestamp, neighbours: int = 50, basket_items: int = 100,
                       half_life_days: float = 14.0) -> dict[str, dict[int, float]]:
    """Per customer, every item bought with their items before the cut, by the ranker's kernel (`core.ranker`):
    a basket is one customer's day, neighbours weighted by days together over the root of each one's days, each
    neighbour by how recently the customer bought the item that brings it. Computed here in pandas on the rows
    the batch saw; the batch's own neighbours (`ranking.item_inputs`) are the same computation in Spark."""
    from sparkrec.core import ranker

    cat = snap.plan.catalogue
    pos = snap.item_index.get_indexer(train["item"])
    t = train[pos >= 0].assign(item_idx=cat.item_idx[pos[pos >= 0]].astype(np.int64), day=lambda d: d["ts"].dt.floor("D"))
    latest = t.groupby(["user", "day", "item_idx"])["ts"].max().reset_index().sort_values(["user", "day", "ts"], ascending=[True, True, False])
    baskets = [g.to_numpy()[:basket_items] for _, g in latest.groupby(["user", "day"], sort=False)["item_idx"]]
    i, j, both = ranker.basket_pairs(baskets)
    days = pd.Series(np.concatenate(baskets)).value_counts()
    off = i != j
    pairs = ranker.strongest_neighbours(i[off], j[off], both[off], days.index.to_numpy(np.int64), days.to_numpy(np.int64), neighbours)
    ids = np.unique(np.concatenate([pairs["item_idx"].to_numpy(np.int64), pairs["other_idx"].to_numpy(np.int64)]))
    per_item = pd.DataFrame({"item_idx": ids, "users": 0, "users_recent": 0, "users_week": 0, "age_days": 0.0, "last_days": 0.0,
                             "price": np.nan})
    stats = ranker.item_stats(per_item, pairs, 1)
    last = t.groupby(["user", "item_idx"])["ts"].max().reset_index()
    last["age"] = (cut - last["ts"]).dt.total_seconds() / 86400.0
    users = sorted(last["user"].unique())
    g = last.sort_values(["user", "age"]).groupby("user")
    hist = [g.get_group(u)["item_idx"].to_numpy(np.int64) for u in users]
    ages = [g.get_group(u)["age"].to_numpy(np.float64) for u in users]
    rows, item, score, _ = ranker.co_purchase(hist, ages, stats, half_life_days)
    out: dict[str, dict[int, float]] = {u: {} for u in users}
    for r, it, sc in zip(rows.tolist(), item.tolist(), score.tolist()):
        out[users[r]][it] = sc
    log.info("co-purchase: %d neighbour pairs over %d items, %d customers", len(pairs), len(ids), len(users))
    return out


def run_batch(wh: Path, source: Path) -> float:
    cmd = [*SPARKREC, "run", "--config", "conf/online_retail.yaml", "--set", f"warehouse={wh}", "--set", f"source.path={source}"]
    started = time.monotonic()
    with (OUT / "run.log").open("w") as fh:
        subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return time.monotonic() - started


def words_of(name: str | None) -> set[str]:
    return {w.lower() for w in WORD.findall(name or "")}


def queries(snap, cfg, events: pd.DataFrame, cut: pd.Timestamp) -> tuple[list[Query], dict]:
    """One query per (customer, newly bought item) pair, with every ranking input computed once."""
    cat = snap.plan.catalogue
    shown = snap.searchable.shown
    # A word's document frequency: in how many shown items' names it appears (plain words, as a shopper types them).
    df: dict[str, int] = {}
    for p in np.flatnonzero(shown):
        for w in words_of(cat.name[p]):
            df[w] = df.get(w, 0) + 1
    train, test = events[events["ts"] < cut], events[events["ts"] >= cut]
    bought = train.groupby("user")["item"].agg(set).to_dict()
    pairs = sorted({(u, i) for u, i in zip(test["user"], test["item"]) if i not in bought.get(u, set())})
    co_of = co_purchase_scores(snap, train, cut)
    rng = np.random.default_rng(SEED)
    counts = {"pairs": len(pairs), "not_in_catalogue": 0, "no_word": 0, "not_found": 0}
    factors: dict[str, np.ndarray | None] = {}
    out = []
    started = time.monotonic()
    for n, (user, item) in enumerate(pairs):
        pos = snap.item_index.get_indexer([item])[0]
        if pos < 0 or not shown[pos]:
            counts["not_in_catalogue"] += 1
            continue
        eligible = sorted(w for w in words_of(cat.name[pos]) if MIN_DF <= df.get(w, 0) <= MAX_DF)
        if not eligible:
            counts["no_word"] += 1
            continue
        word = eligible[rng.integers(len(eligible))]
        mpos, found = serve_search.matches(snap, word, None, cfg.search.candidates)
        text = found.text
        where = np.flatnonzero(mpos == pos)
        if not len(where):
            counts["not_found"] += 1
        if user not in factors:
            row, _ = live.row_for(user, [], snap, cfg)  # the customer as the server holds them at the cut
            factors[user] = row.get("features")
        item_idx = cat.item_idx[mpos]
        model = serve_search.model_scores(snap, item_idx, factors[user])  # as the route scores them
        s = snap.searchable
        tuning = int(hashlib.sha256(user.encode()).hexdigest(), 16) % 2 == 0
        mine = co_of.get(user, {})
        co = np.array([mine.get(int(x), 0.0) for x in item_idx], dtype=np.float64)
        co = co / co.max() if len(co) and co.max() > 0 else np.zeros(len(co))
        out.append(Query(user, word, int(where[0]) if len(where) else -1, item_idx, text, model,
                         s.popularity[mpos].astype(np.float64), s.recent[mpos].astype(np.float64), tuning, co))
        if n and n % 5000 == 0:
            log.info("%d of %d pairs (%.0f s)", n, len(pairs), time.monotonic() - started)
    counts["queries"] = len(out)
    counts["customers"] = len({q.user for q in out})
    counts["with_model_score"] = sum(q.model is not None for q in out)
    return out, counts


def reciprocal_ranks(qs: list[Query], w: SearchWeights, personal: bool, co: float = 0.0) -> np.ndarray:
    """Each query's 1/rank of the bought item within the top K (0 outside it or not matched), by `search.blend`
    (plus `co` times the co-purchase score, the candidate signal tried here)."""
    rr = np.zeros(len(qs))
    for i, q in enumerate(qs):
        if q.target < 0:
            continue
        parts = search.Parts(q.item_idx, q.text, q.model if personal else None, q.popularity, q.recent)
        score = search.blend(parts, w) + co * q.co
        t = q.target
        rank = 1 + int(np.sum((score > score[t]) | ((score == score[t]) & (q.item_idx < q.item_idx[t]))))
        rr[i] = 1.0 / rank if rank <= K else 0.0
    return rr


RANKINGS = {
    # name: (the weights searched, whether the model score is used)
    "text only": ([{"text": 1.0, "model": 0, "popularity": 0, "recent": 0}], False),
    "text + popularity": ([{"text": 1.0, "model": 0, "popularity": p, "recent": 0} for p in GRID[1:]], False),
    "text + recent popularity": ([{"text": 1.0, "model": 0, "popularity": 0, "recent": r} for r in GRID[1:]], False),
    "personalized": ([{"text": 1.0, "model": m, "popularity": p, "recent": r}
                      for m, p, r in itertools.product(GRID[1:], GRID, GRID)], True),
    # The candidate signal: the ranker's co-purchase score of each match with the customer's own items.
    # (Popularity at 0 or 0.5 only: recent popularity beat it everywhere above, and the grid stays at 360.)
    "personalized + co-purchase": ([{"text": 1.0, "model": m, "popularity": p, "recent": r, "co": c}
                                    for m, p, r, c in itertools.product(GRID, (0.0, 0.5), GRID, GRID[1:])], True),
}


def evaluate(qs: list[Query]) -> dict:
    tune = [q for q in qs if q.tuning]
    held = [q for q in qs if not q.tuning]
    report = {}
    for name, (grid, personal) in RANKINGS.items():
        started = time.monotonic()
        def rr_of(qs, w):
            return reciprocal_ranks(qs, SearchWeights(**{k: v for k, v in w.items() if k != "co"}), personal, w.get("co", 0.0))

        scored = [(float(rr_of(tune, w).mean()), w) for w in grid]
        best_tune, best = max(scored, key=lambda x: (x[0], -sum(x[1].values())))
        rr = rr_of(held, best)
        rng = np.random.default_rng(SEED)
        boots = [float(rr[rng.integers(len(rr), size=len(rr))].mean()) for _ in range(200)]
        report[name] = {"weights": best, "tuning_mrr@10": round(best_tune, 4), "mrr@10": round(float(rr.mean()), 4),
                        "hit@10": round(float((rr > 0).mean()), 4), "mrr@10_95%": [round(float(np.percentile(boots, 2.5)), 4),
                                                                                  round(float(np.percentile(boots, 97.5)), 4)],
                        "queries": len(held), "seconds": round(time.monotonic() - started, 1), "_rr": rr}
        log.info("%s: weights %s, held-out MRR@10 %.4f, hit@10 %.4f", name, best, rr.mean(), (rr > 0).mean())
    pop = max(("text + popularity", "text + recent popularity"), key=lambda k: report[k]["mrr@10"])
    theirs = report[pop]["_rr"]
    ratios = {}
    for name in ("personalized", "personalized + co-purchase"):
        mine = report[name]["_rr"]
        rng = np.random.default_rng(SEED)
        boot = []
        for _ in range(500):
            pick = rng.integers(len(mine), size=len(mine))
            boot.append(mine[pick].mean() / max(theirs[pick].mean(), 1e-12))
        ratios[name] = {"vs": pop, "mrr@10": round(float(mine.mean() / theirs.mean()), 3),
                        "95%": [round(float(np.percentile(boot, 2.5)), 3), round(float(np.percentile(boot, 97.5)), 3)]}
    for r in report.values():
        r.pop("_rr")
    report["ratio"] = ratios["personalized"]
    report["ratio_with_co_purchase"] = ratios["personalized + co-purchase"]
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", action="store_true", help="use the warehouse an earlier run of this script left")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    wh, source = OUT / "warehouse", OUT / "input.parquet"
    raw, events = retail_events(RETAIL)
    cut = events["ts"].max() - pd.Timedelta(days=TEST_DAYS)
    batch_s = None
    if not (args.reuse and (wh / "runs").exists()):
        import shutil

        shutil.rmtree(wh, ignore_errors=True)
        raw[pd.to_datetime(raw["InvoiceDate"]) < cut].to_parquet(source, index=False)
        batch_s = run_batch(wh, source)
        log.info("batch run in %.0f s", batch_s)
    cfg = load_config(ROOT / "conf" / "online_retail.yaml", [f"warehouse={wh}", f"source.path={source}"])
    st = State(cfg)
    if not st.refresh():
        raise SystemExit(f"no snapshot: {st.problem}")
    snap = st.snapshot
    if snap.searchable is None:
        raise SystemExit(f"no search index: {snap.search_problem}")
    started = time.monotonic()
    qs, counts = queries(snap, cfg, events, cut)
    counts["build_s"] = round(time.monotonic() - started, 1)
    log.info("queries: %s", counts)
    report = {"at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "cut": str(cut), "batch_s": batch_s,
              "index": snap.searchable.index.meta, "counts": counts, "rankings": evaluate(qs)}
    (OUT / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
