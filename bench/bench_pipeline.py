"""Wall time and rows/s per stage, on Online Retail II and on generated data.

Each case runs `sparkrec run` as a user would (a fresh process, so Spark's
start is included in the total), then reads the stage timings from the
`runs` table. Figures go to bench/RESULTS.md.

    python bench/bench_pipeline.py                       # retail + 1M events
    python bench/bench_pipeline.py --events 1000000 10000000
    python bench/bench_pipeline.py --no-retail --events 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
RETAIL = ROOT.parent / "shared" / "data" / "online_retail_ii_2009_2010.parquet"
SPARKREC = [sys.executable, "-m", "sparkrec.cli"]


def run(cmd: list[str], log: Path) -> float:
    t0 = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}; see {log}")
    return time.monotonic() - t0


def stage_times(warehouse: Path) -> list[dict]:
    """Read the last run's stage rows from the runs table (small: a few rows)."""
    code = (
        "import json,sys\n"
        "from sparkrec.storage.session import build_session\n"
        "from sparkrec.core.config import SparkConfig\n"
        "s=build_session(SparkConfig(log_level='ERROR'))\n"
        f"df=s.read.format('delta').load({str(warehouse / 'runs')!r})\n"
        "last=df.orderBy('started_at', ascending=False).first()['run_id']\n"
        "rows=[r.asDict() for r in df.where(df.run_id==last).orderBy('started_at').collect()]\n"
        "print('JSON'+json.dumps(rows, default=str))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("JSON"))
    return json.loads(line[4:])


def case(name: str, config: str, overrides: list[str], source_rows: int) -> dict:
    wh = OUT / name / "warehouse"
    shutil.rmtree(wh, ignore_errors=True)
    wh.parent.mkdir(parents=True, exist_ok=True)
    args = [*SPARKREC, "run", "--config", config, "--set", f"warehouse={wh}"]
    for o in overrides:
        args += ["--set", o]
    total = run(args, OUT / name / "run.log")
    stages = stage_times(wh)
    return {"case": name, "rows": source_rows, "total_s": total, "stages": stages}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, nargs="*", default=[1_000_000])
    p.add_argument("--no-retail", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override for every case")
    p.add_argument("--reuse", action="store_true", help="keep generated data already in bench/out (same seed and size)")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    if not args.no_retail:
        if RETAIL.exists():
            results.append(case("online_retail", "conf/online_retail.yaml", [f"source.path={RETAIL}", *args.overrides], 525_461))
            print(json.dumps(results[-1], indent=1, default=str))
        else:
            print(f"skipping Online Retail II: {RETAIL} not found")
    for n in args.events:
        data = OUT / f"gen_{n}"
        if args.reuse and (data / "manifest.json").exists():
            gen_s = None  # the generator is deterministic: the same seed and size give the same files
        else:
            gen_s = run([*SPARKREC, "generate", "--events", str(n), "--seed", "42", "--out", str(data)], OUT / f"gen_{n}.log")
        r = case(f"generated_{n}", "conf/local.yaml", [f"source.path={data}/events", f"items.path={data}/items", *args.overrides], n)
        r["generate_s"] = gen_s
        results.append(r)
        print(json.dumps(r, indent=1, default=str))
    write_results(results, Path(args.results))


def write_results(results: list[dict], path: Path) -> None:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmark results",
        "",
        f"Measured {now} by `python bench/bench_pipeline.py` on {os.cpu_count()} cores, local[2], one run per case.",
        "Total = wall time of `sparkrec run` in a fresh process, Spark start included. Machines here are",
        "shared and noisy: compare figures from the same run, not across runs.",
        "",
        "| case | input rows | total s | stage | stage s | rows in | rows out | rows in/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    def fmt(v: object) -> str:
        return "-" if v is None else f"{v:,}"

    for r in results:
        for k, s in enumerate(r["stages"]):
            rin, dur = s.get("rows_in"), s["duration_s"]
            rate = f"{rin / dur:,.0f}" if rin and dur else "-"
            head = (r["case"], f"{r['rows']:,}", f"{r['total_s']:.1f}") if k == 0 else ("", "", "")
            lines.append(f"| {' | '.join(head)} | {s['stage']} | {dur:.1f} | {fmt(rin)} | {fmt(s.get('rows_out'))} | {rate} |")
        if r.get("generate_s") is not None:
            lines.append(f"| | | | (generate) | {r['generate_s']:.1f} | | {r['rows']:,} | |")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
