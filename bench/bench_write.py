"""What writing the published recommendations costs, by variant, side by side in one process.

Reads the `recommendations` table `bench_recommend.py` left in its 50,000 x
20,000 warehouse (2,500,000 rows), caches it in memory, and writes it to new
Delta tables in variants that each change one thing: which columns Delta
keeps statistics on, the wide `explanation` text, compression, file count.
Every variant is written `--rounds` times, the rounds interleaved, and the
median is reported (the machine is shared and noisy). Then it times reading
one user's list back from each.

    python bench/bench_recommend.py        # builds the warehouse first
    python bench/bench_write.py
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "write"
sys.path.insert(0, str(ROOT))

from pyspark.sql import DataFrame  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from sparkrec.core import columns as C  # noqa: E402
from sparkrec.core.config import load_config  # noqa: E402
from sparkrec.storage.session import build_session  # noqa: E402

log = logging.getLogger("bench")
SOURCE = ROOT / "bench" / "out" / "recommend" / "wh_50000x20000_r32" / "recommendations"


def variants(df: DataFrame) -> dict[str, tuple[DataFrame, dict[str, str]]]:
    """name -> (rows, writer options). The first is the table as sparkrec publishes it."""
    published = {"delta.dataSkippingStatsColumns": C.RANK}
    code = (
        F.when(F.col(C.EXPLANATION).startswith("because you"), 1)
        .when(F.col(C.EXPLANATION) == "matches your tastes", 2)
        .when(F.col(C.EXPLANATION).startswith("you "), 3)
        .otherwise(0)
    )
    return {
        "as published (stats on rank only)": (df, published),
        "Delta's default statistics (first 32 columns)": (df, {}),
        "no statistics at all": (df, {"delta.dataSkippingNumIndexedCols": "0"}),
        "explanation as a small code (text built at read time)": (df.withColumn(C.EXPLANATION, code.cast("byte")), published),
        "no explanation column": (df.drop(C.EXPLANATION), published),
        "zstd instead of snappy": (df, {**published, "compression": "zstd"}),
        "2 files instead of the partitions' count": (df.coalesce(2), published),
        "sorted by user within files": (df.sortWithinPartitions(C.USER_ID), published),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=str(OUT / "results.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    spark = build_session(load_config(ROOT / "conf" / "local.yaml").spark)
    rows = spark.read.format("delta").load(str(SOURCE)).persist()
    total = rows.count()
    log.info("%s rows in %s partitions", f"{total:,}", rows.rdd.getNumPartitions())
    cases = variants(rows)
    for name, (df, _) in cases.items():  # cache each variant's own projection too, so only the write is timed
        cases[name] = (df.persist(), cases[name][1])
        cases[name][0].count()
    times: dict[str, list[float]] = {name: [] for name in cases}
    sizes: dict[str, int] = {}
    for r in range(args.rounds + 1):  # round 0 warms the JVM and is not counted
        for i, (name, (df, options)) in enumerate(cases.items()):
            target = OUT / f"v{i}"
            shutil.rmtree(target, ignore_errors=True)
            w = df.write.format("delta").mode("overwrite")
            for k, v in options.items():
                w = w.option(k, v)
            t0 = time.monotonic()
            w.save(str(target))
            if r:
                times[name].append(time.monotonic() - t0)
            sizes[name] = sum(f.stat().st_size for f in target.rglob("*.parquet"))
    reads = {}
    for i, name in enumerate(cases):
        t0 = time.monotonic()
        for u in range(5):
            spark.read.format("delta").load(str(OUT / f"v{i}")).where(F.col(C.USER_ID) == f"u{u * 9973}").collect()
        reads[name] = (time.monotonic() - t0) / 5
    base = statistics.median(times[next(iter(cases))])
    result = [
        {"variant": name, "write_s": statistics.median(t), "ratio": statistics.median(t) / base, "mb": sizes[name] / 2**20,
         "one_user_read_s": reads[name]}
        for name, t in times.items()
    ]
    Path(args.json).write_text(json.dumps(result, indent=1))
    for r in result:
        print(f"| {r['variant']} | {r['write_s']:.2f} | {r['ratio']:.2f} | {r['mb']:.1f} | {r['one_user_read_s']:.2f} |")


if __name__ == "__main__":
    main()
