"""The live path's latency: from producing an event to that customer's new list being readable.

A warehouse is built by a batch run over a generated shop; a real Kafka broker (`sparkrec.dev.kafka`,
127.0.0.1 only) is started; `sparkrec stream` runs in a process of its own (local[2], as a user runs
it); this process produces events at a steady rate for the duration (5% purchases, a mix of the
shop's customers and new ones, timestamped now). Afterwards each event's latency is read off the
warehouse: its Kafka timestamp (`events_raw._arrived_at`) to the end of the micro-batch that
published its customer's list (`runs`, stage `live`, `finished_at`: after the MERGE committed, so
an upper bound of when a reader could see it).

For comparison, in the same run, the plain job a user would otherwise write: Kafka -> Delta append
in foreachBatch, nothing cleaned or scored (`--plain`), at the same rate.

    python bench/bench_stream.py --rate 100 --seconds 300

Writes bench/out/stream/stream.json and bench/stream_latency.png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparkrec.dev import kafka as devkafka  # noqa: E402

OUT = ROOT / "bench" / "out" / "stream"
BIN = Path(sys.executable).parent


def sparkrec(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    return subprocess.Popen([str(BIN / "sparkrec"), *args], env=env, **kw)


def build_warehouse(events: int, seed: int) -> tuple[Path, list[str], list[str]]:
    gen, wh = OUT / "gen", OUT / "warehouse"
    for p in (gen, wh):
        shutil.rmtree(p, ignore_errors=True)
    subprocess.run([str(BIN / "sparkrec"), "generate", "--events", str(events), "--seed", str(seed), "--out", str(gen)], check=True)
    rc = sparkrec("run", "--config", "conf/local.yaml", *sets(wh, gen, None), "--set", "tune.enabled=false",
                  "--set", "evaluate.enabled=false", cwd=ROOT).wait()
    assert rc == 0, "the batch run failed"
    users, items = set(), set()
    for f in (gen / "events").glob("*.json"):
        for line in f.open():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e.get("user_id"), str) and e["user_id"].startswith("u"):
                users.add(e["user_id"])
            if isinstance(e.get("item_id"), str) and e["item_id"].startswith("i"):
                items.add(e["item_id"])
    return wh, sorted(users), sorted(items)


def sets(wh: Path, gen: Path, bootstrap: str | None) -> list[str]:
    out = ["--set", f"warehouse={wh}", "--set", f"source.path={gen / 'events'}", "--set", f"items.path={gen / 'items'}"]
    if bootstrap:
        out += ["--set", f"stream.source.bootstrap_servers={bootstrap}", "--set", "stream.trigger_seconds=0.5"]
    return out


def produce(bootstrap: str, topic: str, rate: float, seconds: float, users: list[str], items: list[str], seed: int) -> int:
    from confluent_kafka import Producer

    rng = random.Random(seed)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 2})
    sent, t0 = 0, time.monotonic()
    new_users = [f"live{seed}_{i:05d}" for i in range(int(rate * seconds) // 20 + 1)]
    while (elapsed := time.monotonic() - t0) < seconds:
        due = int(elapsed * rate) + 1
        while sent < due:
            who = rng.choice(users) if rng.random() < 0.7 else rng.choice(new_users)
            kind = "purchase" if rng.random() < 0.05 else "view"
            ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            p.produce(topic, json.dumps({"event_id": f"s{seed}-{sent}", "user_id": who, "item_id": rng.choice(items),
                                         "event_type": kind, "timestamp": ts}).encode())
            sent += 1
        p.poll(0)
        time.sleep(0.005)
    p.flush(60)
    return sent


def latencies(wh: Path, plain: bool):
    """Per-event seconds from arrival to publication, and the publication times (for the trend)."""
    from pyspark.sql import functions as F

    from sparkrec.core.config import SparkConfig
    from sparkrec.storage.session import build_session

    spark = build_session(SparkConfig(master="local[2]", shuffle_partitions=2, conf={"spark.ui.enabled": "false"}))
    if plain:
        import pandas as pd

        commits = dict(tuple(map(float, line.split())) for line in (wh / "plain_raw.commits").read_text().splitlines())
        rows = spark.read.format("delta").load(str(wh / "plain_raw")).select(
            F.col("_arrived_at").cast("double").alias("a"), "_batch").toPandas()
        rows["p"] = pd.Series(rows["_batch"].astype(float)).map(commits)
    else:
        raw = spark.read.format("delta").load(str(wh / "events_raw")).where(F.col("_arrived_at").isNotNull())
        live = (spark.read.format("delta").load(str(wh / "runs")).where((F.col("stage") == "live") & (F.col("status") == "succeeded"))
                .select(F.col("run_id").alias("_ingest_run_id"), "finished_at"))
        rows = raw.join(live, "_ingest_run_id").select(F.col("_arrived_at").cast("double").alias("a"),
                                                        F.col("finished_at").cast("double").alias("p")).toPandas()
    lat = (rows["p"] - rows["a"]).to_numpy()
    return lat, rows["p"].to_numpy() - rows["a"].min(), rows["a"].to_numpy() - rows["a"].min()


PLAIN_JOB = r'''
import sys, time
from pyspark.sql import functions as F
from sparkrec.core.config import SparkConfig
from sparkrec.storage.session import build_session
bootstrap, topic, target, ckpt = sys.argv[1:5]
spark = build_session(SparkConfig(master="local[2]", shuffle_partitions=2, conf={"spark.ui.enabled": "false"},
                                  packages=["org.apache.spark:spark-sql-kafka-0-10_2.13:4.2.0"]))
msgs = (spark.readStream.format("kafka").option("kafka.bootstrap.servers", bootstrap).option("subscribe", topic)
        .option("startingOffsets", "earliest").load())
def write(df, batch_id):
    (df.select(F.col("value").cast("string").alias("value"), F.col("timestamp").alias("_arrived_at"), F.lit(batch_id).alias("_batch"))
       .write.format("delta").mode("append").option("txnAppId", "plain").option("txnVersion", str(batch_id)).save(target))
    with open(target + ".commits", "a") as f:  # when the batch's commit returned: its rows are readable from here on
        f.write(f"{batch_id} {time.time()}\n")
q = msgs.writeStream.foreachBatch(write).option("checkpointLocation", ckpt).trigger(processingTime="0.5 seconds").start()
q.awaitTermination()
'''


def create_topic(bootstrap: str, topic: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 2})
    for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        try:
            f.result(30)
        except Exception as exc:  # noqa: BLE001 - an earlier run's topic is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise


def run_side(name: str, args, broker, users, items, wh, gen) -> dict:
    topic = f"events_{name}"
    create_topic(broker.bootstrap, topic)
    log = (OUT / f"{name}.log").open("w")
    if name == "plain":
        proc = subprocess.Popen([sys.executable, "-c", PLAIN_JOB, broker.bootstrap, topic, str(wh / "plain_raw"), str(OUT / "plain_ckpt")],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}, cwd=ROOT)
    else:
        extra = [a for o in args.set for a in ("--set", o)]
        proc = sparkrec("stream", "--config", "conf/local.yaml", *sets(wh, gen, broker.bootstrap),
                        "--set", f"stream.source.topic={topic}", *extra, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    server = None
    if name == "sparkrec" and args.with_server:  # `sparkrec serve` on the same topic and warehouse, same events
        port = _free_port()
        server = sparkrec("serve", "--config", "conf/local.yaml", *sets(wh, gen, broker.bootstrap), "--set",
                          f"stream.source.topic={topic}", "--port", str(port), stdout=(OUT / "serve.log").open("w"),
                          stderr=subprocess.STDOUT, cwd=ROOT)
    time.sleep(args.warmup)  # the JVM, the session and the first (empty) batches
    sent = produce(broker.bootstrap, topic, args.rate, args.seconds, users, items, args.seed)
    time.sleep(args.drain)
    served = None
    if server is not None:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            served = histogram(r.read().decode(), "sparkrec_event_to_list_seconds")
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
    lat, published, arrived = latencies(wh, plain=name == "plain")
    return {"sent": sent, "measured": int(len(lat)), "lat": lat, "published": published, "arrived": arrived,
            "server": served}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def histogram(text: str, name: str) -> dict:
    """A Prometheus histogram's count and its p50 / p95, interpolated within the buckets' edges."""
    edges, counts = [], []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            edges.append(float("inf") if le == "+Inf" else float(le))
            counts.append(float(line.rsplit(" ", 1)[1]))
    total = counts[-1] if counts else 0

    def q(p: float) -> float | None:
        if not total:
            return None
        want, lo, below = p * total, 0.0, 0.0
        for edge, c in zip(edges, counts):
            if c >= want:
                return lo if edge == float("inf") else lo + (edge - lo) * (want - below) / max(c - below, 1e-9)
            lo, below = edge, c
        return None

    return {"count": int(total), "p50": q(0.5), "p95": q(0.95), "buckets": dict(zip(map(str, edges), counts))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--events", type=int, default=100_000, help="the generated shop the batch run builds")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--warmup", type=float, default=60.0)
    ap.add_argument("--drain", type=float, default=30.0)
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for the stream")
    ap.add_argument("--tag", default="", help="a suffix for the output files (a variant's run)")
    ap.add_argument("--with-server", action="store_true",
                    help="also run `sparkrec serve` on the same topic: its event-to-list lag from its /metrics")
    args = ap.parse_args()
    import numpy as np

    OUT.mkdir(parents=True, exist_ok=True)
    wh, users, items = build_warehouse(args.events, args.seed)
    gen = OUT / "gen"
    shutil.rmtree(OUT / "plain_ckpt", ignore_errors=True)
    (wh / "plain_raw.commits").unlink(missing_ok=True)
    shutil.rmtree(OUT / "kafka", ignore_errors=True)  # a fresh broker: no topic of an earlier run
    broker = devkafka.start(OUT / "kafka")
    results = {}
    try:
        for name in (["sparkrec"] if args.skip_plain else ["sparkrec", "plain"]):
            results[name] = run_side(name, args, broker, users, items, wh, gen)
    finally:
        broker.stop()
    table = ["| job | events sent | measured | p50 s | p95 s | max s | p95 first minute | p95 last minute |", "|---|---|---|---|---|---|---|---|"]
    summary = {"rate": args.rate, "seconds": args.seconds, "events": args.events}
    for name, r in results.items():
        lat, arr = r["lat"], r["arrived"]
        first, last = lat[arr < 60], lat[arr > arr.max() - 60]
        row = {"sent": r["sent"], "measured": r["measured"], "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
               "max": float(lat.max()), "p95_first_minute": float(np.percentile(first, 95)), "p95_last_minute": float(np.percentile(last, 95))}
        summary[name] = row
        table.append(f"| {name} | {row['sent']:,} | {row['measured']:,} | {row['p50']:.2f} | {row['p95']:.2f} | {row['max']:.2f} | "
                     f"{row['p95_first_minute']:.2f} | {row['p95_last_minute']:.2f} |")
    if results.get("sparkrec", {}).get("server"):
        srv = results["sparkrec"]["server"]
        summary["serve"] = srv
        table.append(f"| sparkrec serve (same events, its /metrics) | {results['sparkrec']['sent']:,} | {srv['count']:,} | "
                     f"{srv['p50']:.3f} | {srv['p95']:.3f} | | | |")
    summary["overrides"] = args.set
    (OUT / f"stream{args.tag}.json").write_text(json.dumps(summary, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, r in results.items():
        ax.scatter(r["arrived"], r["lat"], s=2, label=name)
    ax.set_xlabel("seconds since the first event")
    ax.set_ylabel("latency to a readable list (s)")
    ax.set_title(f"sparkrec stream at {args.rate:g} events/s, 2 cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "bench" / f"stream_latency{args.tag}.png", dpi=110)
    print("\n".join(table))


if __name__ == "__main__":
    main()
