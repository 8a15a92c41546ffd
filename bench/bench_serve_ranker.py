"""What ranking costs the server: a customer's live list with the ranker beside ALS's own, on one snapshot.

On the warehouse `bench_quality.py` leaves for Online Retail II (its lists ranked, so `serving_items` holds the
ranker's item statistics once `sparkrec recommend` has run with this code), in one process:

- **Relisting.** For a sample of customers, one new purchase each (the top item of their published list), their list
  recomputed by the server's own live path (`serve.live.list_for`: pairs, fold-in, candidates, features,
  LightGBM, rules, keys, explanations), with the ranked plan and with the same plan without its ranker,
  alternating customer by customer. Milliseconds per customer, p50 and p95, and the ratio.
- **Loading and memory.** The snapshot's load time, the ranker's share of it (the model and the item
  statistics), and the bytes the ranker adds: the statistics and the customers' activity.

    python bench/bench_quality.py --only retail --runs 1      # the warehouse, once
    .venv/bin/python -m sparkrec.cli recommend --config conf/online_retail.yaml --set warehouse=bench/out/quality/retail/warehouse
    python bench/bench_serve_ranker.py [--customers 500]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out" / "quality"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warehouse", default=str(OUT / "retail" / "warehouse"))
    ap.add_argument("--customers", type=int, default=500)
    args = ap.parse_args()

    from sparkrec.core import events
    from sparkrec.core.config import load_config
    from sparkrec.serve import live, reader
    from sparkrec.serve import state as state_

    cfg = load_config(ROOT / "conf" / "online_retail.yaml", [f"warehouse={args.warehouse}"])
    run = reader.latest_recommend_run(cfg)
    t0 = time.monotonic()
    snap = state_.load(cfg, run)
    load_s = time.monotonic() - t0
    plan = snap.plan
    if plan.ranker is None:
        sys.exit("the latest recommend run's lists were not ranked, or its serving_items predate the ranker's "
                 "statistics: run `sparkrec recommend` on the warehouse with this code first")
    st = plan.stats
    stats_bytes = sum(a.nbytes for a in (st.item_idx, st.values, st.recent, st.nb_ptr, st.nb_item, st.nb_weight))
    activity_bytes = sum(a.nbytes for a in snap.pairs.activity)
    t0 = time.monotonic()
    state_.ranker_of(run["details"]["serving"], run["run_id"])
    model_s = time.monotonic() - t0
    plain = dataclasses.replace(plan, ranker=None, stats=None)

    rng = np.random.default_rng(7)
    keys = [k for k in snap.lists.index if snap.pairs.of(k) is not None]
    keys = [keys[i] for i in rng.choice(len(keys), size=min(args.customers, len(keys)), replace=False)]
    cat = plan.catalogue
    times: dict[str, list[float]] = {"ranked": [], "als": []}
    sources: dict[str, dict[str, int]] = {"ranked": {}, "als": {}}
    newest = max(snap.newest_event(k) for k in keys)
    for j, key in enumerate(keys):
        item = snap.lists.get(key, 1)[0]["item_id"]  # their top item: never bought (the lists exclude bought items)
        ev = events.Event(user_id=key, item_id=item, event_type="purchase", event_ts=newest + timedelta(hours=1),
                          price=2.5)
        order = (("ranked", plan), ("als", plain)) if j % 2 == 0 else (("als", plain), ("ranked", plan))
        for name, p in order:
            snap.plan = p
            t = time.perf_counter()
            rows, _ = live.list_for(key, [ev], snap, cfg)
            times[name].append((time.perf_counter() - t) * 1000)
            for r in rows:
                sources[name][r["source"]] = sources[name].get(r["source"], 0) + 1
    snap.plan = plan
    figures = {name: {"p50_ms": round(float(np.percentile(v, 50)), 2), "p95_ms": round(float(np.percentile(v, 95)), 2),
                      "mean_ms": round(float(np.mean(v)), 2)} for name, v in times.items()}
    report = {
        "customers": len(keys), "items": int(len(cat.item_idx)), "candidates_per_source": plan.ranker.depth,
        "relist": figures, "ratio_p50": round(figures["ranked"]["p50_ms"] / figures["als"]["p50_ms"], 2),
        "sources": sources, "load_s": round(load_s, 2), "model_read_s": round(model_s, 3),
        "ranker_stats_mb": round(stats_bytes / 1e6, 2), "activity_mb": round(activity_bytes / 1e6, 3),
        "customers_held": len(snap.pairs.index), "model_kb": round(len(plan.ranker.model) / 1e3, 1),
    }
    print(json.dumps(report, indent=1))
    (OUT / "serve_ranker.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
