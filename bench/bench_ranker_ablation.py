"""The ranker in Spark, taken apart: each candidate source and feature group left out in turn, and its spread over seeds.

`bench_quality.py` measures the ranked lists a default run publishes (NDCG@10 0.1330 on Online Retail II).
This script reuses that run's warehouse (the history before the held-out 28 days) and sparkrec's own ranker
code (`batch.ranking`: the ALS fits at the training cuts, the candidates and features by the list kernel),
so the candidate frames are computed once and every variant is a LightGBM fit on the driver:

1. the training frames at the three cuts before the end of the history (as the published ranker is trained);
2. the test frame: ALS fitted on the whole history, the candidates of every customer who bought something new
   in the held-out month (the truth is `bench_quality.score`'s: items bought then and never before);
3. per variant, the ranker's top 10 of each customer's candidates, scored by NDCG@10 against the truth
   (a customer whose new items are all outside the candidates counts 0).

    python bench/bench_quality.py --only retail --runs 1   # the warehouse, once
    python bench/bench_ranker_ablation.py [--als-seeds 42 7 99] [--lgb-seeds 42 1 2]

Sources are left out as the kernel does it (`ranker.Ranker.sources`): their candidates go, their ranks stay
as features of the others. Feature groups are `ranker.GROUPS`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_quality as bq  # noqa: E402  (the held-out split and its truth, as the published lists are scored)

K = 10


def ndcg(frame: pd.DataFrame, score: np.ndarray, relevant: pd.Series) -> float:
    """NDCG@10 of each group's top 10 by `score` (labels: `label`), over every customer in `relevant`
    (group -> how many relevant items, the ideal's length)."""
    f = pd.DataFrame({"group": frame["group"].to_numpy(), "label": frame["label"].to_numpy(), "s": score})
    f = f.sort_values(["group", "s"], ascending=[True, False], kind="stable")
    f["pos"] = f.groupby("group").cumcount()
    top = f[f["pos"] < K]
    disc = 1.0 / np.log2(np.arange(2, K + 2))
    dcg = (top["label"].to_numpy() * disc[top["pos"].to_numpy()])
    per = pd.Series(dcg, index=top["group"].to_numpy()).groupby(level=0).sum()
    ideal = relevant.clip(upper=K).map(lambda n: disc[:n].sum())
    return float((per.reindex(relevant.index).fillna(0.0) / ideal).mean())


def kept(frame: pd.DataFrame, sources: tuple[str, ...], depth: int) -> pd.DataFrame:
    """The candidates of `sources` only (a candidate of a source has its rank <= depth there)."""
    from sparkrec.core import ranker

    mask = np.zeros(len(frame), dtype=bool)
    for s in sources:
        mask |= frame[f"{s}_rank"].to_numpy() <= depth
    return frame[mask] if set(sources) != set(ranker.SOURCES) else frame


def frames_for(spark, cfg, als_seed: int, relevant: dict[str, set[str]]):
    """(training frames newest first, test frame with labels, relevant count per test group) for one ALS seed,
    kept under bench/out/quality/ablation_frames/ for the next run on the same warehouse (`--fresh`: again)."""
    cache = bq.OUT / "ablation_frames" / f"als{als_seed}"
    if (cache / "done").exists():
        n = int((cache / "done").read_text())
        train = [pd.read_parquet(cache / f"train{j}.parquet") for j in range(n)]
        test = pd.read_parquet(cache / "test.parquet")
        counts = pd.read_parquet(cache / "counts.parquet")["count"]
        print(f"ALS seed {als_seed}: frames read back from {cache}", flush=True)
        return train, test, counts
    train, test, counts = compute_frames(spark, cfg, als_seed, relevant)
    cache.mkdir(parents=True, exist_ok=True)
    for j, f in enumerate(train):
        f.to_parquet(cache / f"train{j}.parquet")
    test.to_parquet(cache / "test.parquet")
    counts.to_frame("count").to_parquet(cache / "counts.parquet")
    (cache / "done").write_text(str(len(train)))
    return train, test, counts


def compute_frames(spark, cfg, als_seed: int, relevant: dict[str, set[str]]):
    from pyspark.sql import functions as F

    from sparkrec.batch import ranking
    from sparkrec.core import columns as C
    from sparkrec.storage import tables

    settings = cfg.train.model_copy(update={"als": cfg.train.als.model_copy(update={"seed": als_seed})})
    rk, rec, ev = cfg.ranker, cfg.recommend, cfg.evaluate
    inter = tables.read_required(spark, cfg, C.INTERACTIONS).df
    uids, iids = tables.read_required(spark, cfg, C.USER_IDS).df, tables.read_required(spark, cfg, C.ITEM_IDS).df
    t0 = time.monotonic()
    train_frames, cuts = ranking.cut_frames(inter, uids, iids, settings, rec, rk, ev)
    t_train = time.monotonic() - t0
    # The test month's truth as (user_idx, item_idx); a new item without an id cannot be hit, but counts in the ideal.
    pairs = pd.DataFrame([(u, i) for u, items in relevant.items() for i in items], columns=[C.USER_ID, C.ITEM_ID])
    truth_df = spark.createDataFrame(pairs)
    positives = ranking.indexed_pairs(truth_df, uids, iids).localCheckpoint()
    counts = (truth_df.join(uids, C.USER_ID).groupBy(C.USER_IDX).count().toPandas()
              .set_index(C.USER_IDX)["count"].rename_axis("group"))
    latest = inter.agg(F.max(C.EVENT_TS)).first()[0]
    t0 = time.monotonic()
    factors = ranking.fitted_at(inter, uids, iids, latest, settings)
    test = ranking.labelled_frame(inter, uids, iids, positives, factors, latest, rec,
                                  rk.model_copy(update={"max_training_customers": 10**9}), group_offset=0)
    t_test = time.monotonic() - t0
    print(f"ALS seed {als_seed}: training cuts {[c.at.date().isoformat() for c in cuts]} in {t_train:.0f} s "
          f"({[len(f) for f in train_frames]} rows), test frame {len(test):,} rows of {test['group'].nunique():,} "
          f"customers in {t_test:.0f} s; {len(counts):,} customers with history bought something new", flush=True)
    return train_frames, test, counts


def variants():
    """(name, sources, features, training cuts used, models averaged)."""
    from sparkrec.core import ranker

    yield "everything", ranker.SOURCES, ranker.FEATURES, None, 1
    for s in ranker.SOURCES:
        yield f"without the {s} candidates", tuple(x for x in ranker.SOURCES if x != s), ranker.FEATURES, None, 1
    for g, cols in ranker.GROUPS.items():
        yield f"without the {g} features", ranker.SOURCES, tuple(f for f in ranker.FEATURES if f not in cols), None, 1
    yield "two training cuts (the newest)", ranker.SOURCES, ranker.FEATURES, 2, 1
    yield "one training cut (the newest)", ranker.SOURCES, ranker.FEATURES, 1, 1
    yield "three models averaged (seeds s, s+1, s+2)", ranker.SOURCES, ranker.FEATURES, None, 3
    yield "two training cuts, three models averaged", ranker.SOURCES, ranker.FEATURES, 2, 3
    yield "five models averaged", ranker.SOURCES, ranker.FEATURES, None, 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", default=str(bq.OUT / "retail" / "warehouse"))
    ap.add_argument("--als-seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--lgb-seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--no-ablation", action="store_true", help="only the seeds, everything in")
    ap.add_argument("--variants", nargs="+", help="only the variants whose names start with these, for every ALS seed")
    ap.add_argument("--lgb", nargs="*", default=[], metavar="KEY=VALUE", help="more LightGBM parameters for every fit")
    args = ap.parse_args()

    from sparkrec.core import ranker
    from sparkrec.core.config import load_config
    from sparkrec.storage.session import build_session

    wh = Path(args.warehouse)
    if not (wh / "interactions").is_dir():
        sys.exit(f"no warehouse at {wh}: run `python bench/bench_quality.py --only retail --runs 1` first")
    cfg = load_config(ROOT / "conf" / "online_retail.yaml", [f"warehouse={wh}"])
    spark = build_session(cfg.spark)
    spark.sparkContext.setCheckpointDir(tempfile.mkdtemp(prefix="ablation-ckpt-"))
    _, events = bq.retail_events(bq.RETAIL)
    cut = events["ts"].max() - pd.Timedelta(days=bq.TEST_DAYS)
    relevant = bq.held_out(events, cut)[0]
    rk = cfg.ranker
    extra = {k: json.loads(v) for k, v in (x.split("=", 1) for x in args.lgb)}
    started = time.monotonic()
    rows = []
    for als_seed in args.als_seeds:
        train_frames, test, counts = frames_for(spark, cfg, als_seed, relevant)
        base = {"als_seed": als_seed}
        als_only = ndcg(test, -test["als_rank"].to_numpy(), counts)
        rows.append({**base, "variant": "ALS alone (its candidates' order)", "lgb_seed": None, "ndcg": als_only})
        todo = list(variants()) if not args.no_ablation and als_seed == args.als_seeds[0] else [next(variants())]
        if args.variants:
            todo = [v for v in variants() if v[0].startswith(tuple(args.variants))]
        for name, sources, features, n_cuts, n_models in todo:
            for lgb_seed in args.lgb_seeds:
                t0 = time.monotonic()
                t = kept(test, sources, rk.depth)
                score, rounds = np.zeros(len(t)), []
                for m in range(n_models):
                    frames = [kept(f, sources, rk.depth) for f in train_frames[:n_cuts]]
                    model, info = ranker.fit(frames, features, seed=lgb_seed + m, threads=2, max_rounds=rk.max_rounds,
                                             learning_rate=rk.learning_rate, num_leaves=rk.num_leaves, **extra)
                    r = ranker.Ranker(model=model, depth=rk.depth, features=tuple(features), sources=tuple(sources))
                    p = r.predict(t, threads=2)
                    score += p / n_models  # a plain mean: a row's score must not depend on the rows beside it
                    rounds.append(info["rounds"])
                got = ndcg(t, score, counts)
                rows.append({**base, "variant": name, "lgb_seed": lgb_seed, "ndcg": got, "rounds": rounds,
                             "fit_s": round(time.monotonic() - t0, 1)})
                print(f"  {name} (LightGBM seed {lgb_seed}): NDCG@10 {got:.4f}, {rounds} rounds", flush=True)
    report = pd.DataFrame(rows)
    print(report.to_string(index=False))
    summary = report.groupby(["als_seed", "variant"], sort=False).agg(
        mean=("ndcg", "mean"), min=("ndcg", "min"), max=("ndcg", "max"), count=("ndcg", "count"), fit_s=("fit_s", "mean"))
    print(summary.round(4).to_string())
    out = bq.OUT / "ranker_ablation.json"
    out.write_text(json.dumps({"at": datetime.now(timezone.utc).isoformat(), "seconds": round(time.monotonic() - started),
                               "lgb": extra, "rows": rows}, indent=1, default=str))
    print(f"written {out}")


if __name__ == "__main__":
    main()
