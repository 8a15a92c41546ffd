"""A self-contained HTML page about one run: evaluation, tuning, long tail, scores, cleaning ledger.

Plots are drawn with matplotlib (Agg backend, no display needed) and inlined
as base64 PNG, so the file can be mailed or attached to a ticket as it is.
Only small aggregates come to the driver: per-item popularity counts (one
number per item), a score histogram, and the run's rows of `runs`.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from sparkrec.core import columns as C  # noqa: E402
from sparkrec.core.config import Config  # noqa: E402
from sparkrec.core.errors import StageError  # noqa: E402
from sparkrec.core.gate import evaluation_line, tuning_line  # noqa: E402
from sparkrec.storage import tables  # noqa: E402

METRICS = ("ndcg", "precision", "recall", "map", "hit_rate", "mrr")
COLORS = {"model": "#1f6feb", "popular": "#999999", "recent_popular": "#d29922", "buy_again": "#8957e5"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return '<img alt="plot" src="data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode() + '">'


def metric_curves(metrics: dict[str, float]) -> str:
    """metric@k for the model and each baseline, one panel per metric."""
    names = sorted({k.split(".", 1)[0] for k in metrics if "@" in k}, key=lambda n: (n != "model", n))
    ks = sorted({int(k.rsplit("@", 1)[1]) for k in metrics if "@" in k})
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, m in zip(axes.flat, METRICS):
        for n in names:
            ys = [metrics.get(f"{n}.{m}@{k}") for k in ks]
            if all(y is not None for y in ys):
                ax.plot(ks, ys, marker="o", label=n, color=COLORS.get(n), linewidth=2.5 if n == "model" else 1.5)
        ax.set_title(f"{m}@k")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    # One legend for all panels, below them: inside a panel it covered the curves.
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), frameon=False)
    fig.suptitle("Model against baselines on the test period (higher is better)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return _png(fig)


def trials_plot(trials: list[dict], key: str) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    ys = [t.get(key) or 0.0 for t in trials]
    for ax, param, log in zip(axes, ("rank", "reg_param", "alpha"), (False, True, True)):
        ax.scatter([t[param] for t in trials], ys, c=range(len(trials)), cmap="viridis")
        ax.set_xlabel(param)
        if log:
            ax.set_xscale("log")
        ax.set_ylabel(f"validation {key}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Tuning trials ({len(trials)}; colour = trial order)")
    return _png(fig)


def long_tail(spark: SparkSession, cfg: Config, recs_version: int, inter_version: int | None) -> str:
    """Item popularity (in the interactions the run's recommend stage read) and which items its lists show."""
    inter = tables.read_required(spark, cfg, C.INTERACTIONS, version=inter_version).df
    pop = inter.groupBy(C.ITEM_ID).agg(F.countDistinct(C.USER_ID).alias("_users"))
    recs = tables.read_table(spark, cfg, C.RECOMMENDATIONS, required=False, version=recs_version)
    if recs is not None:
        shown = recs.df.select(C.ITEM_ID).distinct().withColumn("_rec", F.lit(True))
        pop = pop.join(shown, C.ITEM_ID, "left")
    else:
        pop = pop.withColumn("_rec", F.lit(None).cast("boolean"))
    # One row per item: bounded by the catalogue, not by events.
    rows = pop.select("_users", F.coalesce("_rec", F.lit(False)).alias("_rec")).orderBy(F.col("_users").desc()).collect()
    counts = [r[0] for r in rows]
    rec_flags = [r[1] for r in rows]
    covered = sum(rec_flags)
    fig, ax = plt.subplots(figsize=(12, 3.8))
    xs = range(1, len(counts) + 1)
    ax.fill_between(xs, counts, color="#cccccc", step="mid", label="distinct users per item")
    ax.scatter([x for x, f in zip(xs, rec_flags) if f], [c for c, f in zip(counts, rec_flags) if f], s=4, color="#1f6feb", label="recommended to someone")
    ax.set_yscale("log")
    ax.set_xlabel("items, most popular first")
    ax.legend()
    share = covered / len(counts) if counts else 0.0
    ax.set_title(f"Long tail: {covered:,} of {len(counts):,} items ({share:.1%}) appear in some list")
    return _png(fig)


def score_histogram(spark: SparkSession, cfg: Config, recs_version: int) -> str:
    recs = tables.read_table(spark, cfg, C.RECOMMENDATIONS, required=False, version=recs_version)
    if recs is None:
        return "<p>No recommendations table.</p>"
    # ALS's scores, or the ranker's when the gate kept its lists (a table holds one or the other).
    als = recs.df.where(F.col(C.REC_SOURCE).isin(*C.MODEL_SOURCES)).where(F.col(C.SCORE).isNotNull())
    lo, hi = als.agg(F.min(C.SCORE), F.max(C.SCORE)).first()
    if lo is None:
        return "<p>No model scores in this table.</p>"
    bins = 40
    width = (hi - lo) / bins or 1.0
    hist = als.groupBy(F.least(F.floor((F.col(C.SCORE) - lo) / width), F.lit(bins - 1)).alias("_b")).count().collect()
    counts = [0] * bins
    for r in hist:
        counts[int(r["_b"])] = r["count"]
    fig, ax = plt.subplots(figsize=(12, 3.2))
    ax.bar([lo + (i + 0.5) * width for i in range(bins)], counts, width=width * 0.95, color="#1f6feb")
    ax.set_xlabel("model score")
    ax.set_ylabel("recommendations")
    ax.set_title("Score distribution of model recommendations")
    return _png(fig)


def ledger_table(row) -> str:
    details = json.loads(row["details"] or "{}")
    items = [("rows in", row["rows_in"]), ("kept", row["rows_out"]), ("quarantined", row["rows_quarantined"]), ("duplicates removed", row["rows_duplicate"])]
    cells = "".join(f"<tr><td>{html.escape(k)}</td><td class=n>{(v or 0):,}</td></tr>" for k, v in items)
    reasons = details.get("reasons", {}) or {}
    cells += "".join(f"<tr><td>&nbsp;&nbsp;{html.escape(str(k))}</td><td class=n>{v:,}</td></tr>" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    mode = ""
    if details.get("mode"):
        read = details.get("read_versions") or []
        span = f", events_raw versions {read[0]}-{read[1]}" if len(read) == 2 else ""
        mode = f"<p>{html.escape(details['mode'])} clean{html.escape(span)}: {html.escape(str(details.get('why', '')))}</p>"
    return f"{mode}<table>{cells}</table>"


def metrics_table(metrics: dict[str, float]) -> str:
    """One row per metric@k, one column per list: narrow enough for any page, however many ks."""
    names = sorted({k.split(".", 1)[0] for k in metrics if "@" in k}, key=lambda n: (n != "model", n))
    keys = sorted({k.split(".", 1)[1] for k in metrics if "@" in k}, key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
    body = ""
    for key in keys:
        body += f"<tr><td>{html.escape(key)}</td>" + "".join(
            f"<td class=n>{metrics[f'{n}.{key}']:.4f}</td>" if f"{n}.{key}" in metrics else "<td></td>" for n in names
        ) + "</tr>"
    return f"<div class=wide><table>{head}{body}</table></div>"


def _without(metrics: dict[str, float], name: str) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith(f"{name}.")}


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def settings_section(rows: dict, run_config: dict) -> str:
    """The ALS and feedback settings the run trained (or evaluated) with, and the whole effective config."""
    used = None
    for stage in ("train", "evaluate"):
        r = rows.get(stage)
        if r is not None:
            d = json.loads(r["details"] or "{}")
            used = d.get("als") or (d.get("train") or {}).get("als")
            if used:
                break
    parts = ["<h2>Settings</h2>"]
    if used:
        cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in sorted(used.items()))
        parts.append(f"<p>ALS as trained:</p><table>{cells}</table>")
    if run_config:
        text = html.escape(json.dumps(run_config, indent=2, sort_keys=True))
        parts.append(f"<details><summary>Effective configuration</summary><pre>{text}</pre></details>")
    return "".join(parts)


def write_report(spark: SparkSession, cfg: Config, run_id: str, out: str) -> None:
    runs = tables.read_required(spark, cfg, C.RUNS)
    rows = {r["stage"]: r for r in runs.df.where(F.col(C.RUN_ID) == run_id).orderBy("started_at").collect()}
    if not rows:
        raise StageError(f"run {run_id!r} is not in the runs table; `sparkrec runs` lists recent runs")
    parts = [f"<h1>sparkrec run {html.escape(run_id)}</h1>"]
    stage_rows = "".join(
        f"<tr><td>{html.escape(s)}</td><td>{html.escape(r['status'])}</td><td class=n>{r['duration_s']:.1f}s</td>"
        f"<td class=n>{_count(r['rows_in'])}</td><td class=n>{_count(r['rows_out'])}</td></tr>"
        for s, r in rows.items()
    )
    first = next(iter(rows.values()))
    run_config = json.loads(first["config"]) if first["config"] else {}
    parts.append(f"<table><tr><th>stage</th><th>status</th><th>took</th><th>rows in</th><th>rows out</th></tr>{stage_rows}</table>")
    ev = rows.get("evaluate")
    if ev is not None and ev["metrics"]:
        d = json.loads(ev["details"] or "{}")
        metrics = dict(ev["metrics"])
        note = ""
        if not (run_config.get("evaluate") or {}).get("repeat_relevant", False) and any(k.startswith("buy_again.") for k in metrics):
            # Only items new to the user count as relevant, so a list of the user's own past items scores 0 by design.
            metrics = _without(metrics, "buy_again")
            note = (" <em>buy_again</em> is left out: with evaluate.repeat_relevant false only items new to a user "
                    "count, so a list of the user's own past items scores 0 by design.")
        parts.append(f"<h2>Evaluation</h2><p>{html.escape(d.get('split', ''))}, {d.get('evaluated_users', 0):,} evaluated users. "
                     f"{html.escape(evaluation_line(ev['metrics'], d))}.{note}</p>")
        parts.append(metric_curves(metrics))
        parts.append(metrics_table(metrics))
    else:
        parts.append("<h2>Evaluation</h2><p>This run did not evaluate.</p>")
    tu = rows.get("tune")
    if tu is not None:
        d = json.loads(tu["details"] or "{}")
        key = (json.loads(ev["details"] or "{}").get("metric") if ev is not None else None) or f"{cfg.evaluate.metric}@{cfg.evaluate.k}"
        parts.append(f"<h2>Tuning</h2><p>{html.escape(tuning_line(d))}.</p>")
        if d.get("trials"):
            parts.append(trials_plot(d["trials"], key))
    rec = rows.get("recommend")
    recs_version = (rec["output_versions"] or {}).get(cfg.table_name(C.RECOMMENDATIONS)) if rec is not None else None
    if recs_version is None or rec["status"] != "succeeded":
        # The current table is another run's output: never draw it as this run's.
        parts.append("<h2>Popularity, coverage and scores</h2><p>This run published no recommendations "
                     "(it did not run the recommend stage, or stopped before it finished), so there is "
                     "nothing of its own to plot.</p>")
    else:
        inter_version = (rec["input_versions"] or {}).get(cfg.table_name(C.INTERACTIONS))
        parts.append(f"<h2>Popularity and coverage</h2><p>Recommendations version {recs_version}, as this run wrote it.</p>"
                     + long_tail(spark, cfg, recs_version, inter_version))
        parts.append("<h2>Scores</h2>" + score_histogram(spark, cfg, recs_version))
    fg = rows.get("forget")
    if fg is not None:  # an erasure: counts only; the customers' keys are in no record
        d = json.loads(fg["details"] or "{}")
        cells = "".join(f"<tr><td>{html.escape(str(t))}</td><td class=n>{n:,}</td></tr>" for t, n in sorted((d.get("rows_deleted") or {}).items()))
        state = "purged (older table versions vacuumed)" if d.get("purged") else f"not purged: {d.get('note') or ''}"
        parts.append(f"<h2>Erasure</h2><p>{d.get('users', 0)} customer(s) forgotten; {d.get('model_factors_deleted', 0):,} model "
                     f"factor rows removed; {html.escape(state)}.</p><table><tr><th>table</th><th>rows deleted</th></tr>{cells}</table>")
    cl = rows.get("clean")
    parts.append("<h2>Cleaning ledger</h2>" + (ledger_table(cl) if cl is not None else "<p>This run did not clean.</p>"))
    parts.append(settings_section(rows, run_config))
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ddd;padding:4px 8px}"
        ".n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;height:auto}"
        ".wide{overflow-x:auto;max-width:100%}pre{white-space:pre-wrap;word-break:break-word;max-width:100%}"
    )
    page = f"<!doctype html><html><head><meta charset=utf-8><title>sparkrec {html.escape(run_id)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    Path(out).write_text(page, encoding="utf-8")
