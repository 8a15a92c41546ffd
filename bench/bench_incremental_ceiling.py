"""How close can an incremental day come to a day with no history? The floor of issue 14's target, measured.

An incremental day must do what a first day does (ingest, classify and write a million rows, ids) and,
on top, compare the rows with the state the earlier days left. This bench measures, side by side in one
process on the state `bench_incremental.py --reuse` leaves behind after day 10, each unavoidable
comparison next to the same work without history:

- fresh: day 10's input ingested, cleaned and given ids in an empty warehouse (what day 1 costs);
- judge: day 10's rows classified and deduplicated (`incremental.judge_batch`) against no survivors and
  against the 9.5 million survivors of days 1-9 (written to Spark's no-op sink);
- weights: day 10's saved weight deltas added to the weight table of day 9 by the clean's MERGE, and
  appended to the same table instead (the least any write of them costs);
- delete: day 10's rows that leave `interactions` (a bot flip) deleted from day 9's table by the clean's
  MERGE (window and keys named), against a commit that deletes nothing.

floor(ordinary day) = fresh + (judge with state - judge alone) + (weights MERGE - append);
floor(flip day) adds the delete. Both are lower bounds: they leave out every other cost of an incremental
day (saving the batch before applying it, the per-day bot counts, the item table, reading the moved rows).

    python bench/bench_incremental.py --events-per-day 1000000 --days 10 --full-days 1 --reuse   # leaves the state
    python bench/bench_incremental_ceiling.py --reps 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The day bench (this directory) gives the settings every day runs with, where its state lies, and the timer.
from bench_incremental import OUT, timed  # noqa: E402
from bench_incremental import day_config as config  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from sparkrec.batch import incremental, pipeline, train  # noqa: E402
from sparkrec.core import columns as C  # noqa: E402
from sparkrec.dev.generate import GenerateParams, generate  # noqa: E402
from sparkrec.storage import files, merges, tables  # noqa: E402
from sparkrec.storage.runs import RunContext  # noqa: E402
from sparkrec.storage.session import build_session  # noqa: E402

WORK = OUT / "ceiling"


def fresh_day(spark, source: Path, warehouse: Path, overrides: list[str]) -> float:
    """Ingest + clean + ids of one day's input into an empty warehouse."""
    shutil.rmtree(warehouse, ignore_errors=True)
    cfg = config(warehouse, source, overrides)
    return timed(lambda: pipeline.run_stages(RunContext(spark, cfg), ("ingest", "clean", "ids")))


def previous_version(spark, path: Path) -> int:
    """The version before the table's last commit: the table as day 10's clean found it."""
    return tables.current_version(spark, str(path)) - 1


def copy_at(spark, src: Path, dst: Path, version: int) -> None:
    """A copy of a Delta table's directory, restored to `version`: the same files and layout as then."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    spark.sql(f"RESTORE TABLE delta.`{dst}` TO VERSION AS OF {version}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--day", default="2025-06-10", help="the day whose state bench_incremental left (its last)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    state = OUT / "wh_incremental"
    day_dir = OUT / "days" / f"day={args.day}"
    if not (state / "clean_state").exists() or not day_dir.exists():
        sys.exit(f"no state at {state} or no input at {day_dir}: run bench/bench_incremental.py --reuse first")
    cfg = config(WORK / "wh_fresh", day_dir, args.overrides)
    spark = build_session(cfg.spark)
    spark.sparkContext.setLogLevel("ERROR")
    shutil.rmtree(WORK, ignore_errors=True)

    # Warm-up: the process's first jobs pay for class loading and JIT.
    generate(GenerateParams(events=50_000, seed=3, days=1), str(WORK / "warm_in"))
    print(f"warm-up: {fresh_day(spark, WORK / 'warm_in' / 'events', WORK / 'wh_warm', args.overrides)} s", flush=True)

    state_cfg = config(state, day_dir, args.overrides)
    deltas = files.read_scratch(spark, state_cfg, "clean/weights").localCheckpoint()
    drops = files.read_scratch(spark, state_cfg, "clean/interactions").where(F.col(C.DROP_FLAG)).localCheckpoint()
    n_deltas, n_drops = deltas.count(), drops.count()
    window = None
    if n_drops:  # what the clean's first application names: the dropped rows' time range and their keys (a few thousand)
        lo, hi = drops.agg(F.min(C.EVENT_TS), F.max(C.EVENT_TS)).first()
        keys = [r[0] for r in drops.select(C.RAW_KEY).collect()]
        window = F.col(f"t.{C.EVENT_TS}").between(F.lit(lo), F.lit(hi)) & F.col(f"t.{C.RAW_KEY}").isin(keys)
    surv_path, weights_path, inter_path = state / C.CLEAN_SURVIVORS, state / C.WEIGHTS, state / C.INTERACTIONS
    survivors = spark.read.format("delta").option("versionAsOf", previous_version(spark, surv_path)).load(str(surv_path))
    n_survivors = survivors.count()

    results = []
    for rep in range(1, args.reps + 1):
        row = {"rep": rep}
        row["fresh"] = fresh_day(spark, day_dir, WORK / "wh_fresh", args.overrides)
        raw_new = tables.read_required(spark, cfg, C.EVENTS_RAW).df
        for name, surv in (("judge_alone", None), ("judge_state", survivors)):
            judged = incremental.judge_batch(raw_new, surv, cfg.source, cfg.clean, datetime.now(timezone.utc), small=True)
            row[name] = timed(lambda: judged.write.format("noop").mode("overwrite").save())

        wcfg = config(WORK / "wh_w", day_dir, args.overrides)
        version = previous_version(spark, weights_path)
        copy_at(spark, weights_path, WORK / "wh_w" / C.WEIGHTS, version)
        updates, delete_when, insert_when, inserts = train.apply_weight_deltas()
        row["weights_merge"] = timed(lambda: merges.merge_deltas(
            deltas, wcfg, C.WEIGHTS, [C.USER_ID, C.ITEM_ID, C.EVENT_TYPE], batch=C.RUN_ID, updates=updates,
            delete_when=delete_when, insert_when=insert_when, inserts=inserts))
        copy_at(spark, weights_path, WORK / "wh_w" / C.WEIGHTS, version)
        appended = deltas.alias("s").select(*[v.alias(k) for k, v in inserts.items()])
        row["weights_append"] = timed(lambda: tables.append_rows(appended, wcfg, C.WEIGHTS))

        if window is not None:
            icfg = config(WORK / "wh_i", day_dir, args.overrides)
            version = previous_version(spark, inter_path)
            copy_at(spark, inter_path, WORK / "wh_i" / C.INTERACTIONS, version)
            row["delete"] = timed(lambda: merges.apply_changes(drops, icfg, C.INTERACTIONS, [C.RAW_KEY], target_where=window))
            copy_at(spark, inter_path, WORK / "wh_i" / C.INTERACTIONS, version)
            row["delete_nothing"] = timed(lambda: merges.apply_changes(drops.limit(0), icfg, C.INTERACTIONS, [C.RAW_KEY],
                                                                       target_where=window))
        results.append(row)
        print(json.dumps(row), flush=True)

    def best(k: str) -> float:
        return min(r[k] for r in results)

    judge = best("judge_state") - best("judge_alone")
    weights = best("weights_merge") - best("weights_append")
    delete = best("delete") - best("delete_nothing") if n_drops else 0.0
    fresh = best("fresh")
    summary = {
        "day": args.day, "survivors": n_survivors, "weight_deltas": n_deltas, "rows_dropped": n_drops,
        "fresh": fresh, "judge_extra": round(judge, 2), "weights_extra": round(weights, 2), "delete_extra": round(delete, 2),
        "floor_ordinary": round(fresh + judge + weights, 2), "floor_flip": round(fresh + judge + weights + delete, 2),
    }
    summary["floor_ordinary_ratio"] = round(summary["floor_ordinary"] / fresh, 3)
    summary["floor_flip_ratio"] = round(summary["floor_flip"] / fresh, 3)
    (OUT / "ceiling.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=1))
    print(json.dumps(summary, indent=1))
    print("\n| rep | fresh day | judge alone | judge with state | weights MERGE | weights append | delete | delete nothing |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['rep']} | {r['fresh']} | {r['judge_alone']} | {r['judge_state']} | {r['weights_merge']} | "
              f"{r['weights_append']} | {r.get('delete', '-')} | {r.get('delete_nothing', '-')} |")
    shutil.rmtree(WORK, ignore_errors=True)
    spark.stop()


if __name__ == "__main__":
    main()
