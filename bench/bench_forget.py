"""How long `sparkrec forget` of 10 customers takes on the Online Retail II warehouse (target: 2 minutes).

Builds the warehouse as a user would (`sparkrec run --config conf/online_retail.yaml`, evaluation
off), picks 10 customers with history (seeded), then runs `sparkrec forget` for them in a fresh
process, as a user would (Spark's start included), and reads the stage's own steps from `runs`.

    python bench/bench_forget.py [--reuse] [--pseudonymize]

Writes bench/out/forget/forget.json and prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "forget"
RETAIL = ROOT.parent / "shared" / "data" / "online_retail_ii_2009_2010.parquet"
SPARKREC = [sys.executable, "-m", "sparkrec.cli"]


def run(cmd: list[str], log: Path, env: dict) -> float:
    t0 = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with {proc.returncode}; see {log}")
    return time.monotonic() - t0


def forget_record(warehouse: Path) -> dict:
    code = (
        "import json\n"
        "from sparkrec.storage.session import build_session\n"
        "from sparkrec.core.config import SparkConfig\n"
        "s=build_session(SparkConfig(log_level='ERROR'))\n"
        f"df=s.read.format('delta').load({str(warehouse / 'runs')!r})\n"
        "r=df.where(\"stage = 'forget'\").orderBy('started_at', ascending=False).first()\n"
        "print('JSON'+json.dumps({'duration_s': r['duration_s'], 'details': json.loads(r['details'])}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("JSON"))[4:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reuse", action="store_true", help="keep a warehouse built by an earlier run")
    p.add_argument("--pseudonymize", action="store_true", help="build the warehouse with privacy.pseudonymize_user_ids on")
    p.add_argument("--customers", type=int, default=10)
    p.add_argument("--seed", type=int, default=7, help="which customers (another seed on a reused warehouse: other customers)")
    args = p.parse_args()
    import pyarrow.parquet as pq

    env = {**os.environ, "SPARKREC_PSEUDONYM_SECRET": "bench secret, not for production use"}
    wh = OUT / "warehouse"
    sets = ["--config", "conf/online_retail.yaml", "--set", f"warehouse={wh}", "--set", "evaluate.enabled=false"]
    if args.pseudonymize:
        sets += ["--set", "privacy.pseudonymize_user_ids=true"]
    OUT.mkdir(parents=True, exist_ok=True)
    build_s = None
    if not (args.reuse and (wh / "recommendations").exists()):
        shutil.rmtree(wh, ignore_errors=True)
        build_s = run([*SPARKREC, "run", *sets], OUT / "run.log", env)
    ids = pq.read_table(RETAIL, columns=["Customer ID"]).column(0).to_pylist()
    customers = sorted({int(c) for c in ids if c is not None})
    chosen = random.Random(args.seed).sample(customers, args.customers)
    users = [a for c in chosen for a in ("--user", str(c))]
    wall = run([*SPARKREC, "forget", *sets, *users], OUT / "forget.log", env)
    rec = forget_record(wh)
    result = {"customers": chosen, "build_run_s": build_s, "forget_wall_s": round(wall, 1), "forget_stage_s": rec["duration_s"],
              "steps": rec["details"].get("steps"), "rows_deleted": rec["details"].get("rows_deleted"),
              "model_factors_deleted": rec["details"].get("model_factors_deleted"), "purged": rec["details"].get("purged"),
              "pseudonymized": args.pseudonymize}
    (OUT / "forget.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print("\n| customers | forget, wall (fresh process) | forget stage | rows deleted | model factors removed | purged |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {len(chosen)} | {wall:.1f} s | {rec['duration_s']:.1f} s | {sum((result['rows_deleted'] or {}).values()):,} | "
          f"{result['model_factors_deleted']} | {result['purged']} |")
    print("\nsteps: " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted((result["steps"] or {}).items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
