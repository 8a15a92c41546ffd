"""`sparkrec serve` under load: read latency against a constant-JSON floor, freshness, start-up and memory.

On the 50,000 x 20,000 warehouse of `bench_recommend.py` (rank 32, N 10), in one run on the same cores:

- **Read latency.** `hey` (Debian's package), rate-limited to a fixed total rate (`-c` workers x `-q` each),
  bounded in time, against 127.0.0.1: p50 and p99 of `GET /v1/users/{customer}/recommendations` at 200,
  500 and 1,000 requests/s, beside the floor: the same framework (FastAPI on uvicorn, one process, access
  log off) answering a constant JSON body of the same size from an async route. The two alternate per rate.
- **Freshness** (`--freshness`, needs the development broker): purchases of customers' top item produced to
  Kafka at 100 events/s while `hey` reads at 200 requests/s; for each, the time from produce to the first
  GET that no longer holds the item (p50, p95).
- **Search latency** (`--only-startup --search`): `GET /v1/search` beside the list route at 200 requests/s,
  under vegeta (a true open loop, `make load-tools`) and under hey.
- **Start-up and memory:** seconds from process start to `/readyz` 200 and the server's resident memory
  once ready (`--scale USERS ITEMS RANK` for a larger warehouse).

    python bench/bench_serve.py                      # latency, start-up (about 6 minutes)
    python bench/bench_serve.py --freshness          # and freshness against a local broker
    python bench/bench_serve.py --scale 1000000 100000 64 --only-startup
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "serve"
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

log = logging.getLogger("bench")
TOKEN = "bench-token-0123456789"

FLOOR_APP = '''
import json, os
from fastapi import FastAPI
from fastapi.responses import Response
BODY = open(os.environ["FLOOR_BODY"], "rb").read()
app = FastAPI()

@app.get("/v1/users/{customer}/recommendations")
async def constant(customer: str):
    return Response(BODY, media_type="application/json")

@app.get("/readyz")
async def ready():
    return {"ready": True}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


class Server:
    """A server process on a free port of 127.0.0.1, ready when /readyz answers 200; stopped by PID."""

    def __init__(self, cmd: list[str], env: dict[str, str], name: str) -> None:
        self.port = free_port()
        self.name = name
        self.log = (OUT / f"{name}.log").open("w")
        started = time.monotonic()
        self.proc = subprocess.Popen([*cmd, "--port", str(self.port)] if "--port" not in cmd else cmd, cwd=ROOT,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        while get(f"{self.base}/readyz")[0] != 200:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: see {OUT / (name + '.log')}")
            if time.monotonic() - started > 1800:
                raise RuntimeError(f"{name} not ready in 30 minutes")
            time.sleep(0.2)
        self.ready_s = time.monotonic() - started
        self.rss_gb = psutil.Process(self.proc.pid).memory_info().rss / 2**30

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def build(users: int, items: int, rank: int, n: int) -> tuple[Path, list[str]]:
    """The bench_recommend warehouse, recommended once (the run the server loads)."""
    from bench.bench_recommend import build_warehouse
    from sparkrec.batch import pipeline
    from sparkrec.core.config import load_config
    from sparkrec.storage.runs import RunContext
    from sparkrec.storage.session import build_session

    wh = OUT / f"wh_{users}x{items}_r{rank}_named"  # items with names: searchable
    sets = [f"warehouse={wh}", f"recommend.n={n}", "recommend.similar_items.enabled=false"]
    if (wh / "runs").exists():
        log.info("reusing %s", wh)
        return wh, sets
    shutil.rmtree(wh, ignore_errors=True)
    cfg = load_config(ROOT / "conf" / "local.yaml", sets)
    spark = build_session(cfg.spark)
    t0 = time.monotonic()
    build_warehouse(spark, cfg, users, items, rank, 5, named=True)
    pipeline.run_recommend(RunContext(spark, cfg))
    log.info("warehouse built and recommended in %.0f s", time.monotonic() - t0)
    spark.stop()
    return wh, sets


def serve_cmd(sets: list[str], events_dir: Path, extra: list[str] = ()) -> list[str]:
    sets = [*sets, "stream.source.kind=files", f"stream.source.path={events_dir}", *extra]
    return [sys.executable, "-m", "sparkrec.cli", "serve", "--config", str(ROOT / "conf" / "local.yaml"),
            *[a for s in sets for a in ("--set", s)]]


def hey(url: str, rate: int, seconds: int, workers: int = 50) -> dict:
    """Open loop as far as hey goes: `workers` each throttled to rate/workers per second, for `seconds`."""
    q = max(1, round(rate / workers))
    out = subprocess.run(["hey", "-z", f"{seconds}s", "-c", str(workers), "-q", str(q), "-o", "csv",
                          "-H", f"Authorization: Bearer {TOKEN}", url], capture_output=True, text=True, check=True)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    lat = np.array([float(r["response-time"]) for r in rows]) * 1000
    codes = [int(r["status-code"]) for r in rows]
    return {"rate": rate, "requests": len(rows), "achieved_rps": len(rows) / seconds,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max()), "non_2xx": sum(c >= 300 for c in codes)}


def vegeta_bin() -> str | None:
    """vegeta (`make load-tools` installs it from the Go module proxy): a true open loop at a constant rate."""
    found = shutil.which("vegeta") or str(Path.home() / "go" / "bin" / "vegeta")
    return found if Path(found).is_file() else None


def vegeta(url: str, rate: int, seconds: int) -> dict:
    """Open loop at a constant rate: one request every 1/rate s whatever the answers do (hey's workers tick
    together instead), as many connections as that takes, for `seconds`."""
    target = f"GET {url}\nAuthorization: Bearer {TOKEN}\n"
    attack = subprocess.run([vegeta_bin(), "attack", f"-rate={rate}/1s", f"-duration={seconds}s", "-keepalive=true"],
                            input=target.encode(), capture_output=True, check=True)
    report = subprocess.run([vegeta_bin(), "report", "-type=json"], input=attack.stdout, capture_output=True, check=True)
    got = json.loads(report.stdout)
    lat = got["latencies"]
    codes = {int(k): v for k, v in (got.get("status_codes") or {}).items()}
    return {"rate": rate, "requests": got["requests"], "achieved_rps": got["rate"], "tool": "vegeta",
            "p50_ms": lat["50th"] / 1e6, "p99_ms": lat["99th"] / 1e6, "max_ms": lat["max"] / 1e6,
            "non_2xx": sum(v for k, v in codes.items() if not 200 <= k < 300)}


def customers(wh: Path, k: int) -> list[str]:
    from deltalake import DeltaTable

    users = DeltaTable(str(wh / "user_ids")).to_pyarrow_table(columns=["user_id"]).column(0).to_pylist()
    rng = np.random.default_rng(0)
    return [users[i] for i in rng.choice(len(users), size=k, replace=False)]


def latency(server: Server, floor: Server, customer: str, rates: list[int], seconds: int) -> list[dict]:
    out = []
    for rate in rates:
        for name, s in (("sparkrec", server), ("floor", floor)) if rate % 2 == 0 else (("floor", floor), ("sparkrec", server)):
            res = hey(f"{s.base}/v1/users/{customer}/recommendations", rate, seconds)
            res["server"] = name
            log.info("%s at %d/s: p50 %.2f ms, p99 %.2f ms (%d requests, %d not 2xx)", name, rate, res["p50_ms"],
                     res["p99_ms"], res["requests"], res["non_2xx"])
            out.append(res)
    return out


# Queries of the search bench: one word matching a twelfth of the catalogue, one matching far more than the
# candidates re-ranked (search.candidates), three words (a union of matches), a typo (two letters swapped) and a
# word being typed (completions); fuzzy and prefix matching are on for all (the defaults).
SEARCH_QUERIES = ("mug", "red", "red enamel mug", "enalem mug", "red ena")
# Suggestions while typing: one letter (the most completions) and a word begun after a whole one.
SUGGEST_QUERIES = ("r", "red ena")


def search_latency(server: Server, customer: str, seconds: int, rate: int = 200, workers: int = 10) -> list[dict]:
    """`GET /v1/search` at `rate`/s for anyone and for a customer (their factor folded in per request), beside the
    list route at the same rate in the same run (issue 31: p99 <= 20 ms at 200 requests/s).

    Measured by vegeta when it is installed (`make load-tools`) and by hey beside it. hey's workers tick
    together: `c` workers at rate/c each send `c` requests at once every c/rate seconds, so a request's latency
    includes waiting behind the others of its burst (with 10 workers, a 1.5 ms search waits behind up to 9
    others). vegeta sends one request every 1/rate seconds, the steady arrivals the target is about. Both
    routes are measured the same way."""
    out = []
    urls = [("recommendations", f"{server.base}/v1/users/{customer}/recommendations")]
    for route, queries, n, who in (("search", SEARCH_QUERIES, 10, ("anyone", "customer")),
                                   ("suggest", SUGGEST_QUERIES, 5, ("customer",))):
        for q in queries:
            url = f"{server.base}/v1/{route}?q={urllib.parse.quote(q)}&n={n}"
            status, body = get(f"{url}&customer={customer}")
            if status != 200:
                raise RuntimeError(f"{route} for {q!r} answered {status}: {body[:300]!r}")
            urls += [(f"{route} {q!r} {w}", url if w == "anyone" else f"{url}&customer={customer}") for w in who]
    for name, url in urls:
        for tool in ("vegeta", "hey") if vegeta_bin() else ("hey",):
            res = vegeta(url, rate, seconds) if tool == "vegeta" else hey(url, rate, seconds, workers)
            res["route"], res["tool"] = name, tool
            if tool == "hey":
                res["workers"] = workers
            log.info("%s at %d/s (%s): p50 %.2f ms, p99 %.2f ms (%d requests, %d not 2xx)", name, rate, tool,
                     res["p50_ms"], res["p99_ms"], res["requests"], res["non_2xx"])
            out.append(res)
    return out


def freshness(wh: Path, sets: list[str], events: int, rate: float) -> dict:
    """Purchases produced to Kafka at `rate`/s while hey reads at 200/s; produce -> GET without the item."""
    from confluent_kafka import Producer

    from sparkrec.dev import kafka as devkafka

    shutil.rmtree(OUT / "kafka", ignore_errors=True)  # a fresh topic: no earlier run's events to replay
    broker = devkafka.start(OUT / "kafka")
    topic = "bench-serve"
    try:
        p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0, "log_level": 2})
        p.produce(topic, b"{}")
        p.flush(10)
        cmd = serve_cmd(sets, OUT / "unused", ["stream.source.kind=kafka", f"stream.source.topic={topic}",
                                               f"stream.source.bootstrap_servers={broker.bootstrap}"])
        server = Server(cmd, {**os.environ, "SPARKREC_SERVE_TOKEN": TOKEN}, "serve-kafka")
        try:
            who = customers(wh, events + 1)
            load = threading.Thread(target=hey, args=(f"{server.base}/v1/users/{who[-1]}/recommendations", 200, int(events / rate) + 15))
            load.start()
            time.sleep(2)
            lat: list[float] = []
            lost: list[str] = []

            def watch(c: str, item: str, t0: float) -> None:
                # Each event has its own watcher polling every 50 ms: a shared sweep would measure its own queue.
                while time.monotonic() - t0 < 30:
                    status, body = get(f"{server.base}/v1/users/{c}/recommendations")
                    if status == 200 and item not in [r["item_id"] for r in json.loads(body)["items"]]:
                        lat.append(time.monotonic() - t0)
                        return
                    time.sleep(0.05)
                lost.append(c)

            tops = {c: json.loads(get(f"{server.base}/v1/users/{c}/recommendations")[1])["items"][0]["item_id"]
                    for c in who[:events]}
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            with ThreadPoolExecutor(32) as pool:
                start = time.monotonic()
                for i, c in enumerate(who[:events]):
                    time.sleep(max(0.0, i / rate - (time.monotonic() - start)))
                    t0 = time.monotonic()
                    p.produce(topic, json.dumps({"user_id": c, "item_id": tops[c], "event_type": "purchase",
                                                 "timestamp": stamp}).encode(), key=c.encode())
                    p.poll(0)
                    pool.submit(watch, c, tops[c], t0)
                p.flush(10)
            load.join()
            server_lag = metric_summary(get(f"{server.base}/metrics")[1].decode(), "sparkrec_event_to_list_seconds")
            arr = np.array(lat)
            return {"events": events, "rate": rate, "seen": len(lat), "missed": len(lost),
                    "p50_s": float(np.percentile(arr, 50)), "p95_s": float(np.percentile(arr, 95)), "max_s": float(arr.max()),
                    "server_event_to_list": server_lag}
        finally:
            server.stop()
    finally:
        broker.stop()


def metric_summary(text: str, name: str) -> dict:
    """A Prometheus histogram's count, mean and cumulative buckets from the metrics text."""
    buckets, total, count = {}, 0.0, 0
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            count = int(float(line.rsplit(" ", 1)[1]))
    return {"count": count, "mean_s": total / count if count else None, "buckets": buckets}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, nargs=3, default=[50_000, 20_000, 32], metavar=("USERS", "ITEMS", "RANK"))
    ap.add_argument("--rates", type=int, nargs="+", default=[200, 500, 1000])
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--only-startup", action="store_true")
    ap.add_argument("--freshness", action="store_true")
    ap.add_argument("--search", action="store_true", help="with --only-startup: the search latency too")
    ap.add_argument("--json", default=str(OUT / "results.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    users, items, rank = args.scale
    wh, sets = build(users, items, rank, 10)
    res: dict = {"users": users, "items": items, "rank": rank}
    env = {**os.environ, "SPARKREC_SERVE_TOKEN": TOKEN}
    server = Server(serve_cmd(sets, OUT / "events"), env, "serve")
    res["startup"] = {"ready_s": server.ready_s, "rss_gb": server.rss_gb}
    log.info("sparkrec serve ready in %.1f s, %.2f GB resident", server.ready_s, server.rss_gb)
    try:
        if not args.only_startup:
            customer = customers(wh, 1)[0]
            body = get(f"{server.base}/v1/users/{customer}/recommendations")[1]
            (OUT / "floor_body.json").write_bytes(body)
            (OUT / "floor_app.py").write_text(FLOOR_APP)
            floor = Server([sys.executable, "-m", "uvicorn", "floor_app:app", "--app-dir", str(OUT), "--host", "127.0.0.1",
                            "--no-access-log", "--log-level", "warning"],
                           {**env, "FLOOR_BODY": str(OUT / "floor_body.json")}, "floor")
            try:
                res["body_bytes"] = len(body)
                res["latency"] = latency(server, floor, customer, args.rates, args.seconds)
            finally:
                floor.stop()
        if not args.only_startup or args.search:
            res["search"] = search_latency(server, customers(wh, 1)[0], args.seconds)
    finally:
        server.stop()
    if args.freshness:
        res["freshness"] = freshness(wh, sets, 300, 100.0)
        log.info("freshness: %s", res["freshness"])
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
