"""Ten daily intervals of generated events: what each day's ingest, clean, ids and matrix build cost,
incremental (the default) against full recomputation (`clean --full`), side by side in one process.

One generated shop of `days x events-per-day` events is split by event day into one input
directory per day (lines whose time cannot be read go with day 1). Two warehouses take the
days in order: the incremental one runs ingest, clean, ids and builds the training matrix
from `user_item_weights`; the full one runs ingest, `clean --full`, ids and builds the matrix
from every interaction (what sparkrec did before), on the days given by --full-days (every
day by default; its cost grows with the history, so a sample of days keeps the run short).

    python bench/bench_incremental.py --events-per-day 1000000 --full-days 1 4 7 10

A small warm-up run comes first (`--cold` skips it), so day 1 does not carry the process's first jobs.

Writes bench/out/incremental/incremental.json and bench/incremental.png, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparkrec.batch import pipeline, train  # noqa: E402
from sparkrec.core import columns as C  # noqa: E402
from sparkrec.core.config import load_config  # noqa: E402
from sparkrec.dev.generate import GenerateParams, generate  # noqa: E402
from sparkrec.storage import tables  # noqa: E402
from sparkrec.storage.runs import RunContext  # noqa: E402
from sparkrec.storage.session import build_session  # noqa: E402

OUT = ROOT / "bench" / "out" / "incremental"
START = date(2025, 6, 1)


def split_by_day(spark, events_dir: Path, days: int) -> list[Path]:
    """One directory of JSON lines per event day, written by Spark from the generated files (text kept as is)."""
    from pyspark.sql import functions as F

    lines = spark.read.text(str(events_dir))
    day = F.regexp_extract("value", r'"timestamp": ?"(\d{4}-\d{2}-\d{2})', 1)
    first = START.isoformat()
    valid = [(START + timedelta(days=d)).isoformat() for d in range(days)]
    lines = lines.withColumn("day", F.when(day.isin(valid), day).otherwise(F.lit(first)))
    target = OUT / "days"
    lines.repartition("day").write.mode("overwrite").partitionBy("day").text(str(target))
    return [target / f"day={d}" for d in valid]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return round(time.perf_counter() - t, 2)


def matrix_seconds(spark, cfg, from_weights: bool) -> tuple[float, int]:
    inter = tables.read_required(spark, cfg, C.INTERACTIONS).df
    uids, iids = tables.read_required(spark, cfg, C.USER_IDS).df, tables.read_required(spark, cfg, C.ITEM_IDS).df
    t = time.perf_counter()
    ref = train.decay_reference(inter, cfg.train)
    if from_weights:
        m = train.matrix_from_weights(tables.read_required(spark, cfg, C.WEIGHTS).df, uids, iids, cfg.train, ref)
    else:
        m = train.training_matrix(inter, uids, iids, cfg.train, ref)
    n = m.count()
    return round(time.perf_counter() - t, 2), n


def day_config(warehouse: Path, source: Path, extra: list[str], full: bool = False):
    """The config every day of this bench (and `bench_incremental_ceiling.py`) runs with."""
    sets = [f"warehouse={warehouse}", f"source.path={source}", "items.path=null", "evaluate.enabled=false",
            "train.recency_half_life_days=30", "clean.min_kept_ratio=null", *extra]
    if full:
        sets.append("clean.full=true")
    return load_config(ROOT / "conf" / "local.yaml", sets)


def day_run(spark, mode: str, day_dirs: list[Path], warehouse: Path, extra: list[str]) -> dict:
    """Ingest `day_dirs` (the day's, or for the full warehouse every day since its last clean), then clean,
    ids and the matrix. Ingest is timed only when it took one day (the same code runs in both modes)."""
    row = {"mode": mode}
    for day_dir in day_dirs:
        cfg = day_config(warehouse, day_dir, extra, full=mode == "full")
        row["ingest"] = timed(lambda: pipeline.run_stages(RunContext(spark, cfg), ("ingest",)))
    if len(day_dirs) > 1:
        row["ingest"] = None
    row["clean"] = timed(lambda: pipeline.run_stages(RunContext(spark, cfg), ("clean",)))
    row["ids"] = timed(lambda: pipeline.run_stages(RunContext(spark, cfg), ("ids",)))
    row["matrix"], row["pairs"] = matrix_seconds(spark, cfg, from_weights=mode == "incremental")
    row["interactions"] = tables.read_required(spark, cfg, C.INTERACTIONS).df.count()
    last = tables.read_required(spark, cfg, C.RUNS).df.where("stage = 'clean'").orderBy("started_at", ascending=False).first()
    row["clean_mode"] = json.loads(last["details"])["mode"]
    row["rows_in"] = last["rows_in"]
    return row


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, style in (("incremental", "o-"), ("full", "s--")):
        pts = [(r["day"], r["clean"] + r["ids"]) for r in results if r["mode"] == mode]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{mode}: clean + ids")
        pts = [(r["day"], r["matrix"]) for r in results if r["mode"] == mode and "matrix" in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, alpha=0.5, label=f"{mode}: matrix build")
    ax.set_xlabel("day (1 day of new events each)")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events-per-day", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=10)
    p.add_argument("--full-days", type=int, nargs="*", default=None, help="days on which the full warehouse cleans (default all)")
    p.add_argument("--reuse", action="store_true", help="keep the generated and split input in bench/out")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--cold", action="store_true", help="no warm-up run: day 1 then also pays the process's first jobs")
    args = p.parse_args()
    full_days = set(args.full_days or range(1, args.days + 1))

    cfg = load_config(ROOT / "conf" / "local.yaml", [*args.overrides])
    spark = build_session(cfg.spark)
    spark.sparkContext.setLogLevel("ERROR")
    gen = OUT / "generated"
    if not (args.reuse and (OUT / "days").exists()):
        if not (args.reuse and (gen / "manifest.json").exists()):
            shutil.rmtree(OUT, ignore_errors=True)
            generate(GenerateParams(events=args.events_per_day * args.days, seed=7, start=START, days=args.days), str(gen))
        split_by_day(spark, gen / "events", args.days)
    day_dirs = [OUT / "days" / f"day={(START + timedelta(days=d)).isoformat()}" for d in range(args.days)]
    for wh in ("wh_incremental", "wh_full"):
        shutil.rmtree(OUT / wh, ignore_errors=True)

    if not args.cold:
        # The first Spark jobs of a process pay for class loading and JIT; without a warm-up that cost lands on
        # day 1 alone and flatters every later day's ratio to it. A small shop of its own, thrown away after.
        warm = OUT / "warmup"
        shutil.rmtree(warm, ignore_errors=True)
        generate(GenerateParams(events=50_000, seed=3, start=START, days=1), str(warm / "in"))
        took = timed(lambda: [day_run(spark, mode, [warm / "in" / "events"], warm / f"wh_{mode}", args.overrides)
                              for mode in ("incremental", "full")])
        shutil.rmtree(warm, ignore_errors=True)
        print(f"warm-up (50,000 events, both modes, not measured): {took} s", flush=True)

    results = []
    started = datetime.now(timezone.utc)
    pending_full: list[Path] = []
    for d, day_dir in enumerate(day_dirs, start=1):
        row = day_run(spark, "incremental", [day_dir], OUT / "wh_incremental", args.overrides)
        results.append({**row, "day": d})
        print(json.dumps(results[-1]), flush=True)
        pending_full.append(day_dir)
        if d in full_days:
            row = day_run(spark, "full", pending_full, OUT / "wh_full", args.overrides)
            pending_full = []
            results.append({**row, "day": d})
            print(json.dumps(results[-1]), flush=True)
    (OUT / "incremental.json").write_text(json.dumps({"started": started.isoformat(), "warm": not args.cold, "results": results}, indent=1))
    plot(results, ROOT / "bench" / "incremental.png")

    print("\n| day | mode | clean ran as | rows in | ingest s | clean s | ids s | ingest+clean+ids s | matrix s | pairs | interactions |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        total = f"{r['ingest'] + r['clean'] + r['ids']:.1f}" if r["ingest"] is not None else f"- + {r['clean'] + r['ids']:.1f}"
        print(f"| {r['day']} | {r['mode']} | {r['clean_mode']} | {r['rows_in']:,} | {r['ingest'] if r['ingest'] is not None else '-'} | "
              f"{r['clean']} | {r['ids']} | {total} | {r['matrix']} | {r['pairs']:,} | {r['interactions']:,} |")
    inc = [r for r in results if r["mode"] == "incremental"]
    first, last = inc[0], inc[-1]
    ratio = (last["ingest"] + last["clean"] + last["ids"]) / (first["ingest"] + first["clean"] + first["ids"])
    print(f"\nincremental day {last['day']} / day 1 (ingest + clean + ids){'' if not args.cold else ', day 1 cold'}: {ratio:.2f}")
    for r in inc[1:]:
        print(f"  day {r['day']} / day 1: {(r['ingest'] + r['clean'] + r['ids']) / (first['ingest'] + first['clean'] + first['ids']):.2f}")
    if len(inc) > 2:
        second = inc[1]
        print(f"incremental day {last['day']} / day 2, the first incremental day: "
              f"{(last['ingest'] + last['clean'] + last['ids']) / (second['ingest'] + second['clean'] + second['ids']):.2f}")
    for r in results:
        if r["mode"] == "full":
            twin = next(x for x in inc if x["day"] == r["day"])
            print(f"day {r['day']}: interactions equal in both warehouses: {twin['interactions'] == r['interactions']}; "
                  f"full clean + ids / incremental clean + ids: {(r['clean'] + r['ids']) / (twin['clean'] + twin['ids']):.2f}")
    spark.stop()


if __name__ == "__main__":
    main()
