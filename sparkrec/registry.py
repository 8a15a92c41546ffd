"""Reading the run registry: listing runs and rolling published tables back to a run.

The `runs` table is small (a few rows per run), so the latest runs are
brought to the driver to be printed.
"""

from __future__ import annotations

import json

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkrec import columns as C
from sparkrec import io
from sparkrec.config import Config
from sparkrec.errors import StageError
from sparkrec.runs import RunContext

# What a rollback puts back: everything a reader of recommendations depends on.
PUBLISHED = (C.RECOMMENDATIONS, C.SIMILAR_ITEMS, C.USER_FACTORS, C.ITEM_FACTORS)


def evaluation_line(metrics: dict[str, float], details: dict) -> str:
    """The model against the best baseline on the gate's metric, and the verdict, in one line."""
    key, best = details.get("metric"), details.get("best_baseline")
    if not key or not best:
        return ""
    model, base = metrics.get(f"model.{key}", 0.0), metrics.get(f"{best}.{key}", 0.0)
    ratio = f"x{model / base:.2f}" if base else "baseline 0"
    gate = details.get("gate", {})
    verdict = "passed" if gate.get("passed") else "FAILED"
    return f"model {key} {model:.4f} vs best baseline {best} {base:.4f} ({ratio}); gate {verdict}" + ("" if gate.get("enabled") else " (gate off)")


def list_runs(spark: SparkSession, cfg: Config, limit: int = 10) -> str:
    """One line per run, newest first: when, how long, each stage's status, and the evaluation."""
    runs = io.read_table(spark, cfg, C.RUNS)
    assert runs is not None
    df = runs.df
    latest = (
        df.groupBy(C.RUN_ID).agg(F.min("started_at").alias("start"), F.max("finished_at").alias("end"))
        .orderBy(F.col("start").desc()).limit(limit)
    )
    rows = df.join(latest, C.RUN_ID).orderBy(F.col("start").desc(), "started_at").collect()
    by_run: dict[str, list] = {}
    for r in rows:
        by_run.setdefault(r[C.RUN_ID], []).append(r)
    lines = [f"{'run id':<27} {'started (UTC)':<19} {'took':>7}  stages"]
    for run_id, stages in by_run.items():
        first = stages[0]
        took = (first["end"] - first["start"]).total_seconds()
        marks = " ".join(f"{s['stage']}{'' if s['status'] == 'succeeded' else '(' + s['status'] + ')'}" for s in stages)
        lines.append(f"{run_id:<27} {first['start']:%Y-%m-%d %H:%M:%S} {took:6.0f}s  {marks}")
        for s in stages:
            if s["stage"] == "evaluate" and s["metrics"]:
                lines.append(" " * 29 + evaluation_line(s["metrics"], json.loads(s["details"] or "{}")))
            if s["status"] == "failed" and s["error"]:
                lines.append(" " * 29 + f"{s['stage']}: {s['error'][:200]}")
    return "\n".join(lines)


def rollback(ctx: RunContext, to_run: str) -> str:
    """Restore the published tables to the versions `to_run` wrote, recorded as a `rollback` stage."""
    spark, cfg = ctx.spark, ctx.cfg
    runs = io.read_table(spark, cfg, C.RUNS)
    assert runs is not None
    rows = runs.df.where((F.col(C.RUN_ID) == to_run) & (F.col("status") == "succeeded")).collect()
    if not rows:
        raise StageError(f"no succeeded stage of run {to_run!r} in the runs table; `sparkrec runs` lists them")
    wanted = {cfg.table_name(k): k for k in PUBLISHED}
    versions: dict[str, int] = {}
    for r in rows:
        for table, version in (r["output_versions"] or {}).items():
            if table in wanted:
                versions[table] = version
    if not versions:
        raise StageError(f"run {to_run} wrote none of {sorted(wanted)}: nothing to roll back to")
    with ctx.stage("rollback") as rec:
        rec.details["to_run"] = to_run
        for table, version in sorted(versions.items()):
            key = wanted[table]
            rec.inputs[table] = version
            rec.outputs[table] = io.restore_table(spark, cfg, key, version)
        rec.rows_out = len(versions)
    done = ", ".join(f"{t} -> version {v} (now {rec.outputs[t]})" for t, v in sorted(versions.items()))
    return f"rolled back to run {to_run}: {done}"
