"""Search ordered for the customer, measured: does it find what they bought better than any simple ranking?

The protocol (issue 40), on Online Retail II:
1. cut 28 days before the last invoice; `sparkrec run` (the shipped retail config) on every raw row before it,
   which writes the lists, `serving_items` and the search index;
2. for each customer and item they bought after the cut, one query: one word of that item's description,
   letters only, 3 or more, that appears in the names of 20 to 500 catalogue items, drawn with a fixed seed;
   the query goes through the server's own matching (`serve.search.matches`) on the snapshot `sparkrec serve`
   would load, and every ranking orders those same matches behind the same matching tiers (`search.tiers`);
3. two views, MRR@10 of the bought item:
   - **new**: pairs bought after the cut and never before, scored on what the customer has not bought (every
     ranking's results less their bought items): popularity, recent popularity, sparkrec;
   - **all**: every pair, repeats included, on the results as served: popularity, recent popularity, "buy
     again" (their bought matches first, most days bought first, then recent popularity), sparkrec;
4. sparkrec is the blend as shipped (`search.weights`, the customer's model score as the server folds it in)
   and the learned ranking (`core.searchrank`), fitted here on pseudo-queries from the history before the cut
   only (`--cuts` training cuts, 28 days apart), as a run would fit it.

    python bench/bench_search.py                 # runs the batch once (about 5 min), then the protocol
    python bench/bench_search.py --reuse         # the warehouse of an earlier run

Targets: new >= 1.2x and all >= 1.1x the best simple ranking of the same matches (95% bootstrap intervals).
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_inputs  # noqa: E402
from bench_quality import NON_PRODUCT, RETAIL, ROOT, SPARKREC, TEST_DAYS  # noqa: E402

from sparkrec.core import search, searchrank  # noqa: E402
from sparkrec.core.config import load_config  # noqa: E402
from sparkrec.serve import live  # noqa: E402
from sparkrec.serve import search as serve_search  # noqa: E402
from sparkrec.serve.state import State  # noqa: E402

OUT = ROOT / "bench" / "out" / "search"
K = 10
SEED = 31
MIN_DF, MAX_DF = 20, 500
LABEL_DAYS = 28.0

log = logging.getLogger("bench_search")


def retail(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(raw rows, clean purchase lines user/item/ts/price), as bench_quality cleans them."""
    raw = pd.read_parquet(path)
    df = raw.drop_duplicates()
    df = df[df["Customer ID"].notna() & ~df["Invoice"].astype(str).str.startswith("C") & (df["Quantity"] > 0) & (df["Price"] > 0)]
    df = df[~df["StockCode"].astype(str).str.fullmatch(NON_PRODUCT)]
    return raw, pd.DataFrame({"user": df["Customer ID"].astype("int64").astype(str),
                              "item": df["StockCode"].astype(str).str.strip(),
                              "ts": pd.to_datetime(df["InvoiceDate"]), "price": df["Price"].astype(float)})


def run_batch(wh: Path, source: Path, extra: tuple[str, ...] = (), config: str = "conf/online_retail.yaml",
              sets: tuple[str, ...] | None = None) -> float:
    cmd = [*SPARKREC, "run", "--config", config, "--set", f"warehouse={wh}"]
    for s in (f"source.path={source}",) if sets is None else sets:
        cmd += ["--set", s]
    for s in extra:
        cmd += ["--set", s]
    started = time.monotonic()
    with (wh.parent / "run.log").open("w") as fh:
        subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return time.monotonic() - started


def generated(reuse: bool) -> tuple[None, pd.DataFrame, pd.Timestamp, list[str]]:
    """The generated shop's purchases (user/item/ts/price: the items' listed price) and cut, and its input sets."""
    from bench_quality import generated_case

    shop = OUT / "shop"
    if reuse and (OUT / "events.parquet").exists():
        events = pd.read_parquet(OUT / "events.parquet")
        cut = pd.Timestamp(json.loads((OUT / "cut.json").read_text())["cut"])
        return None, events, cut, [f"source.path={OUT / 'input'}", f"items.path={shop / 'items'}"]
    sets, ev, cut = generated_case(OUT, 300_000, 1, 120)
    items = pd.concat([pd.read_csv(f, dtype=str) for f in sorted((shop / "items").glob("*.csv"))])
    price = pd.to_numeric(items.set_index("item_id")["price"], errors="coerce")
    ev = ev[ev["purchase"]]
    events = pd.DataFrame({"user": ev["user"], "item": ev["item"], "ts": ev["ts"], "price": ev["item"].map(price)})
    events.to_parquet(OUT / "events.parquet")
    (OUT / "cut.json").write_text(json.dumps({"cut": str(cut)}))
    return None, events, cut, sets


def cut_model(raw: pd.DataFrame, at: pd.Timestamp, c: int):
    """The snapshot a server would have held at a training cut: `sparkrec run` on the raw rows before it (reused)."""
    wh, source = OUT / f"cut{c}" / "warehouse", OUT / f"cut{c}" / "input.parquet"
    if not (wh / "runs").exists():
        import shutil

        shutil.rmtree(wh, ignore_errors=True)
        wh.parent.mkdir(parents=True, exist_ok=True)
        raw[pd.to_datetime(raw["InvoiceDate"]) < at].to_parquet(source, index=False)
        took = run_batch(wh, source, ("tune.enabled=false", "evaluate.enabled=false", "ranker.enabled=false",
                                      "search.enabled=false"))
        log.info("training cut %s: batch run in %.0f s", at, took)
    cfg = load_config(ROOT / "conf" / "online_retail.yaml", [f"warehouse={wh}", f"source.path={source}"])
    st = State(cfg)
    if not st.refresh():
        raise SystemExit(f"no snapshot at the cut {at}: {st.problem}")
    return st.snapshot, cfg


@dataclass
class Query:
    user: str
    target: int  # the bought item's position among the matches
    found: search.Found
    pos: np.ndarray  # catalogue positions of the matches
    x: np.ndarray  # searchrank.features rows
    new: bool  # never bought before the moment


class Queries:
    """Pseudo-queries of one moment: the matches of a word of each bought item's name, and every ranking input."""

    def __init__(self, snap, cfg, events: pd.DataFrame, at: pd.Timestamp, factors: bool, model_snap=None, model_cfg=None):
        self.snap, self.cfg, self.at = snap, cfg, at
        self.model = (model_snap or snap).model
        cat = snap.plan.catalogue
        shown = snap.searchable.shown
        self.df = searchrank.word_items(cat.name[p] for p in np.flatnonzero(shown))
        pos = snap.item_index.get_indexer(events["item"])
        ev = events[pos >= 0].assign(item_idx=cat.item_idx[pos[pos >= 0]].astype(np.int64))
        self.history = ev[ev["ts"] < at]
        self.stats = search_inputs.item_stats(self.history, at)
        if factors:  # the customers as the server holds them at the cut (their live factor)
            fac = {}
            for u in self.history["user"].unique().tolist():
                row, _ = live.row_for(u, [], model_snap or snap, model_cfg or cfg)
                if row.get("features") is not None:
                    fac[u] = np.asarray(row["features"], dtype=np.float64)
        else:  # a training cut: their purchases before it folded in (search_inputs.folded_factors)
            fac = search_inputs.folded_factors(self.history, at, snap, cfg)
        self.customers = search_inputs.customers(self.history, at, self.stats, fac)
        self.bought = self.history.groupby("user")["item_idx"].agg(lambda s: set(s.tolist())).to_dict()

    def build(self, pairs: list[tuple[str, int]], seed: int, limit: int | None = None) -> list[Query]:
        snap, cat = self.snap, self.snap.plan.catalogue
        rng = np.random.default_rng(seed)
        if limit is not None and len(pairs) > limit:
            pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), limit, replace=False))]
        vectors_of = self.model
        out = []
        for user, item_idx in pairs:
            p, hit = cat.at(np.array([item_idx]))
            if not hit[0] or not snap.searchable.shown[p[0]]:
                continue
            word = searchrank.pseudo_query(cat.name[p[0]], self.df, rng, MIN_DF, MAX_DF)
            if word is None:
                continue
            mpos, found = serve_search.matches(snap, word, None, self.cfg.search.candidates)
            where = np.flatnonzero(mpos == p[0])
            if not len(where):
                continue
            customer = self.customers.get(user)
            vectors = None
            if customer is not None and customer.factor is not None and vectors_of.factors is not None:
                fpos, known = vectors_of.positions(found.item_idx)
                vectors = np.full((len(fpos), vectors_of.factors.vectors.shape[1]), np.nan)
                vectors[known] = vectors_of.factors.vectors[fpos[known]]
            x = searchrank.features(found, self.stats, None, vectors, customer)
            out.append(Query(user, int(where[0]), found, mpos, x, item_idx not in self.bought.get(user, set())))
        return out


def later_pairs(events: pd.DataFrame, snap, start: pd.Timestamp, days: float) -> list[tuple[str, int]]:
    """(customer, item id) of every purchase in the `days` from `start`."""
    pos = snap.item_index.get_indexer(events["item"])
    m = (pos >= 0) & (events["ts"] >= start).to_numpy() & (events["ts"] < start + pd.Timedelta(days=days)).to_numpy()
    ids = snap.plan.catalogue.item_idx[pos[m]].astype(np.int64)
    return sorted(set(zip(events["user"].to_numpy()[m].tolist(), ids.tolist())))


def rank_of(q: Query, score: np.ndarray, cfg, drop: np.ndarray | None) -> int:
    """The bought item's 1-based rank behind the matching tiers, the matches in `drop` removed (0: it was)."""
    keep = np.ones(len(score), dtype=bool) if drop is None else ~np.isin(q.found.item_idx, drop)
    if not keep[q.target]:
        return 0
    at = np.flatnonzero(keep)
    found = q.found.take(keep)
    order = search.order(score[keep], found.item_idx, len(at), search.tiers(found, cfg.search))
    return int(np.flatnonzero(at[order] == q.target)[0]) + 1


def scores(q: Query, snap, cfg, learned: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each ranking's score of the query's matches (higher first; the matching tiers go before any of them);
    `learned`: each learned ranking's scores of this query's matches."""
    s = snap.searchable
    pop, recent = s.popularity[q.pos].astype(np.float64), s.recent[q.pos].astype(np.float64)
    days = q.x[:, searchrank.FEATURES.index("mine_days_bought")].astype(np.float64)
    out = {"popularity": pop + 1e-3 * recent, "recent popularity": recent + 1e-3 * pop,
           "buy again": days * 10.0 + recent}  # popularities are 0..1: the days bought decide first
    als = q.x[:, searchrank.FEATURES.index("als_score")].astype(np.float64)
    model = als if np.isfinite(als).any() else None  # as the route scores them: NaN for an item without factors
    parts = search.Parts(q.found.item_idx, q.found.text, model, s.popularity[q.pos], s.recent[q.pos])
    out["sparkrec blend"] = search.blend(parts, cfg.search.weights)
    return {**out, **learned}


def mrr(qs: list[Query], snap, cfg, learned: dict[str, searchrank.SearchRanker], view: str,
        bought: dict[str, set[int]]) -> dict[str, np.ndarray]:
    """Per ranking, each query's reciprocal rank within the top K (0 outside it). `new`: on what the customer has
    not bought (their bought matches removed from every ranking's results)."""
    bounds = np.cumsum([0] + [len(q.x) for q in qs])
    x = np.vstack([q.x for q in qs]) if qs else np.zeros((0, len(searchrank.FEATURES)), np.float32)
    scored = {name: model.score(x) for name, model in learned.items()}  # one call each: LightGBM's cost is per call
    rr: dict[str, list[float]] = {}
    for i, q in enumerate(qs):
        drop = np.asarray(sorted(bought.get(q.user, set())), dtype=np.int64) if view == "new" else None
        mine = {name: v[bounds[i]:bounds[i + 1]] for name, v in scored.items()}
        for name, score in scores(q, snap, cfg, mine).items():
            if view == "new" and name == "buy again":
                continue
            r = rank_of(q, score, cfg, drop)
            rr.setdefault(name, []).append(1.0 / r if 0 < r <= K else 0.0)
    return {k: np.asarray(v) for k, v in rr.items()}


def summary(rr: dict[str, np.ndarray], simple: tuple[str, ...]) -> dict:
    rng = np.random.default_rng(SEED)
    n = len(next(iter(rr.values())))
    picks = [rng.integers(n, size=n) for _ in range(500)]
    best = max(simple, key=lambda k: rr[k].mean())
    out = {"queries": n, "best simple": best}
    for name, v in rr.items():
        boots = [v[p].mean() for p in picks]
        out[name] = {"mrr@10": round(float(v.mean()), 4), "95%": [round(float(np.percentile(boots, 2.5)), 4),
                                                                 round(float(np.percentile(boots, 97.5)), 4)]}
        if name.startswith(("sparkrec", "without")):
            ratio = [v[p].mean() / max(rr[best][p].mean(), 1e-12) for p in picks]
            out[name]["vs best simple"] = round(float(v.mean() / rr[best].mean()), 3)
            out[name]["ratio 95%"] = [round(float(np.percentile(ratio, 2.5)), 3), round(float(np.percentile(ratio, 97.5)), 3)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", action="store_true", help="use the warehouse an earlier run of this script left")
    ap.add_argument("--cuts", type=int, default=3, help="training cuts for the learned ranking (0: none)")
    ap.add_argument("--per-cut", type=int, default=8000, help="pseudo-queries per training cut")
    ap.add_argument("--no-als", action="store_true", help="the learned ranking without the model score")
    ap.add_argument("--cached", action="store_true", help="the pseudo-queries and held-out queries of an earlier run")
    ap.add_argument("--ablate", action="store_true", help="also each feature group left out (one model per variant)")
    ap.add_argument("--new-groups", choices=["none", "add", "replace"], default="none",
                    help="train also (add) or instead (replace) on new targets' groups without the bought items")
    ap.add_argument("--shop", choices=["retail", "shop1"], default="retail",
                    help="Online Retail II, or the generated shop 1 of bench_quality.py (300,000 events, 120 days)")
    ap.add_argument("--cut-models", action="store_true",
                    help="model scores at each training cut from a model fitted at that cut (a batch run per cut, "
                         "tuning, evaluation and the list ranker off) instead of folded into the served model")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    global OUT
    if args.shop != "retail":
        OUT = OUT / args.shop
        if args.cut_models:
            raise SystemExit("--cut-models is for the retail case only")
    OUT.mkdir(parents=True, exist_ok=True)
    wh, source = OUT / "warehouse", OUT / "input.parquet"
    batch_s = None
    if args.shop == "retail":
        config = "conf/online_retail.yaml"
        raw, events = retail(RETAIL)
        cut = events["ts"].max() - pd.Timedelta(days=TEST_DAYS)
        sets = [f"warehouse={wh}", f"source.path={source}"]
        if not (args.reuse and (wh / "runs").exists()):
            import shutil

            shutil.rmtree(wh, ignore_errors=True)
            raw[pd.to_datetime(raw["InvoiceDate"]) < cut].to_parquet(source, index=False)
            batch_s = run_batch(wh, source)
    else:  # the generated shop of bench_quality's shop 1: named items in categories, a clickstream
        config = "conf/local.yaml"
        raw, events, cut, shop_sets = generated(args.reuse and (wh / "runs").exists())
        sets = [f"warehouse={wh}", *shop_sets]
        if not (args.reuse and (wh / "runs").exists()):
            batch_s = run_batch(wh, source, config=config, sets=tuple(shop_sets))
    if batch_s is not None:
        log.info("batch run in %.0f s", batch_s)
    cfg = load_config(ROOT / config, sets)
    st = State(cfg)
    if not st.refresh():
        raise SystemExit(f"no snapshot: {st.problem}")
    snap = st.snapshot
    if snap.searchable is None:
        raise SystemExit(f"no search index: {snap.search_problem}")
    started = time.monotonic()
    cache = OUT / f"queries{'_cutmodels' if args.cut_models else ''}.pkl"
    if args.cached and cache.exists():
        with cache.open("rb") as fh:
            groups, cut_of, qs, bought = pickle.load(fh)
        log.info("queries of an earlier run read from %s", cache)
    else:
        groups, cut_of = [], []
        for c in range(args.cuts):
            at = cut - pd.Timedelta(days=LABEL_DAYS * (c + 1))
            if args.cut_models:  # a model fitted at the cut: sparkrec run on the rows before it
                cut_snap, cut_cfg = cut_model(raw, at, c)
                moment = Queries(snap, cfg, events, at, factors=True, model_snap=cut_snap, model_cfg=cut_cfg)
            else:
                moment = Queries(snap, cfg, events, at, factors=False)
            built = moment.build(later_pairs(events, snap, at, LABEL_DAYS), SEED + c + 1, args.per_cut)
            groups += [(q.x, q.target) for q in built]
            cut_of += [c] * len(built)
            log.info("training cut %s: %d pseudo-queries (%.0f s)", at, len(built), time.monotonic() - started)
        held = Queries(snap, cfg, events, cut, factors=True)
        qs, bought = held.build(later_pairs(events, snap, cut, 3650.0), SEED), held.bought
        with cache.open("wb") as fh:
            pickle.dump((groups, cut_of, qs, bought), fh)
    log.info("held-out queries: %d (%d new) in %.0f s", len(qs), sum(q.new for q in qs), time.monotonic() - started)
    all_features = tuple(f for f in searchrank.FEATURES if not args.no_als or f not in ("als_score", "als_rel"))
    variants = {"sparkrec learned": all_features}
    if args.ablate:  # each feature group left out (one model each, as the full one in this mode)
        variants.update({f"without {g}": tuple(f for f in all_features if f not in fs)
                         for g, fs in searchrank.GROUPS.items()})
    if args.new_groups != "none":  # a bought-new target's group without the customer's bought items
        extra, source = searchrank.without_bought(groups)
        extra_cuts = [cut_of[g] for g in source]
        log.info("%d groups of new targets without the bought items (%s)", len(extra), args.new_groups)
        if args.new_groups == "replace":
            replaced = set(source)
            kept = [g for g in range(len(groups)) if g not in replaced]
            groups, cut_of = [groups[g] for g in kept], [cut_of[g] for g in kept]
        groups, cut_of = groups + extra, cut_of + extra_cuts
    learned, fits = {}, {}
    for name, features in variants.items() if groups else ():
        fit_started = time.monotonic()
        model, info = searchrank.fit(groups, features, cuts=cut_of, threads=2, models=1 if args.ablate else 3)
        info["seconds"] = round(time.monotonic() - fit_started, 1)
        info["gains"] = model._ranker.gains()
        learned[name], fits[name] = model, info
        log.info("%s fitted: %s", name, {k: v for k, v in info.items() if k != "gains"})
    report = {"at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "shop": args.shop, "cut": str(cut),
              "batch_s": batch_s, "cut_models": args.cut_models, "index": snap.searchable.index.meta.get("digest"),
              "fit": fits, "new": summary(mrr([q for q in qs if q.new], snap, cfg, learned, "new", bought),
                                          ("popularity", "recent popularity")),
              "all": summary(mrr(qs, snap, cfg, learned, "all", bought), ("popularity", "recent popularity", "buy again"))}
    name = (f"report_{args.shop}{'_cutmodels' if args.cut_models else ''}{'_ablation' if args.ablate else ''}"
            f"{'' if args.new_groups == 'none' else '_new' + args.new_groups}.json")
    (OUT / name).write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
