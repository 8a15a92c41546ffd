"""The live path against a real Kafka broker: events in, exactly once; lists out, within a micro-batch.

One broker (`sparkrec.dev.kafka`, 127.0.0.1 only) and one warehouse built by a batch run serve the
module; each test writes its own topic. A broker that cannot start fails the tests, it never skips.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from sparkrec.cli import main
from sparkrec.core import columns as C
from sparkrec.core.config import load_config
from sparkrec.dev import kafka as devkafka
from sparkrec.storage import tables
from sparkrec.storage.runs import RunContext
from sparkrec.stream import live as stream
from tests.conftest import ROOT

pytestmark = [pytest.mark.kafka, pytest.mark.e2e]

@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = devkafka.start(tmp_path_factory.mktemp("kafka"))
    yield b
    b.stop()


@pytest.fixture(scope="module")
def shop(small_shop):
    return small_shop


@pytest.fixture(scope="module")
def built(published):
    """A warehouse as the daily batch leaves it: trained, lists published (shared with the server's tests)."""
    return published


def copy_warehouse(built, tmp_path: Path, topic: str, broker) -> tuple[Path, list[str]]:
    """A private copy of the built warehouse, reading `topic`."""
    import shutil

    wh, overrides = built
    mine = tmp_path / "wh"
    shutil.copytree(wh, mine)
    sets = [o for o in overrides if not o.startswith("warehouse=")]
    return mine, [f"warehouse={mine}", *sets, f"stream.source.topic={topic}",
                  f"stream.source.bootstrap_servers={broker.bootstrap}"]


def produce(broker, topic: str, values: list) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "log_level": 2})
    for v in values:
        p.produce(topic, v if isinstance(v, bytes) else json.dumps(v).encode())
    assert p.flush(30) == 0


def cli(overrides: list[str], *extra: str) -> list[str]:
    return ["stream", "--config", str(ROOT / "conf" / "local.yaml"), *extra, *[a for o in overrides for a in ("--set", o)]]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read(spark, overrides, key):
    cfg = load_config(ROOT / "conf" / "local.yaml", overrides)
    return tables.read_table(spark, cfg, key).df


def test_a_purchase_leaves_the_list_a_new_customer_gets_a_personal_list_bad_messages_are_quarantined(
        spark, built, broker, tmp_path):
    wh, overrides = copy_warehouse(built, tmp_path, "t_e2e", broker)
    recs = read(spark, overrides, C.RECOMMENDATIONS)
    # a customer of the batch lists with a personal list, and the item at the top of it
    top = recs.where((F.col(C.RANK) == 1) & (F.col(C.REC_SOURCE) == C.SOURCE_ALS)).orderBy(C.USER_ID).first()
    buyer, bought = top[C.USER_ID], top[C.ITEM_ID]
    popular = [r[C.ITEM_ID] for r in read(spark, overrides, C.INTERACTIONS).groupBy(C.ITEM_ID).count()
               .orderBy(F.desc("count"), C.ITEM_ID).limit(5).collect()]
    t = now_iso()
    good = [{"event_id": "p1", "user_id": buyer, "item_id": bought, "event_type": "purchase", "timestamp": t}]
    good += [{"event_id": f"n{i}", "user_id": "newcomer", "item_id": item, "event_type": "view", "timestamp": t}
             for i, item in enumerate(popular)]
    replay = {**good[0], "timestamp": t}  # the same event id again: a replay, counted once
    bad = [b"not json at all", json.dumps({"user_id": "x", "event_type": "view", "timestamp": t}).encode(),
           json.dumps({"event_id": "w1", "user_id": "y", "item_id": "i000001", "event_type": "view", "timestamp": "yesterday"}).encode(),
           json.dumps({"event_id": "w2", "user_id": "z", "item_id": "i000002", "event_type": "rating", "rating": "five",
                       "timestamp": t}).encode()]
    produce(broker, "t_e2e", [*good, replay, *bad])

    assert main(cli(overrides, "--once"), spark=spark) == 0

    live = read(spark, overrides, C.LIVE_RECOMMENDATIONS)
    mine = [r[C.ITEM_ID] for r in live.where(F.col(C.USER_ID) == buyer).collect()]
    assert len(mine) == 10 and bought not in mine  # what they just bought left their list
    new = live.where(F.col(C.USER_ID) == "newcomer").collect()
    assert len(new) == 10 and {r[C.REC_SOURCE] for r in new} == {C.SOURCE_ALS}  # folded in, not the fallback
    current = tables.current_recommendations(spark, load_config(ROOT / "conf" / "local.yaml", overrides))
    assert {r["origin"] for r in current.where(F.col(C.USER_ID) == buyer).collect()} == {"live"}
    others = current.where(~F.col(C.USER_ID).isin(buyer, "newcomer"))
    assert others.where(F.col("origin") == "live").count() == 0 and others.count() == recs.count() - 10

    raw = read(spark, overrides, C.EVENTS_RAW).where(F.col(C.SOURCE_FILE) == "kafka:t_e2e/0")
    assert sorted(r[C.RAW_KEY] for r in raw.collect()) == sorted(f"kafka:t_e2e/0@{i}" for i in range(11))
    q = read(spark, overrides, C.QUARANTINE).where(F.col(C.SOURCE_FILE) == "kafka:t_e2e/0")
    assert sorted(r[C.REASON] for r in q.collect()) == ["invalid_rating", "malformed_line", "missing_item_id", "unparsable_timestamp"]
    runs = read(spark, overrides, C.RUNS)
    cleans = runs.where((F.col("stage") == "clean") & F.col("finished_at").isNotNull()).orderBy(F.desc("finished_at")).first()
    assert (cleans["rows_in"], cleans["rows_out"], cleans["rows_quarantined"], cleans["rows_duplicate"]) == (11, 6, 4, 1)
    inter = read(spark, overrides, C.INTERACTIONS)
    assert inter.where(F.col(C.USER_ID) == "newcomer").count() == 5
    assert read(spark, overrides, C.USER_IDS).where(F.col(C.USER_ID) == "newcomer").count() == 1
    batch = runs.where(F.col("stage") == "live").orderBy(F.desc("finished_at")).first()
    details = json.loads(batch["details"])
    assert details["events"] == 11 and details["users_updated"] == 2 and details["latency_p50_s"] is not None


def test_the_live_list_of_a_customer_who_did_nothing_new_is_the_batch_list(spark, built, broker, tmp_path):
    """Fold-in on the published item factors reproduces the model's own user factors (test_foldin proves the
    solve against MLlib); with the same rules and code, the lists are the batch's."""
    wh, overrides = copy_warehouse(built, tmp_path, "t_same", broker)
    cfg = load_config(ROOT / "conf" / "local.yaml", overrides)
    recs = tables.read_table(spark, cfg, C.RECOMMENDATIONS).df
    users = sorted(r[C.USER_ID] for r in recs.where(F.col(C.REC_SOURCE) == C.SOURCE_ALS).select(C.USER_ID).distinct().limit(25).collect())
    handler = stream.LiveStream(spark, cfg)
    ctx = RunContext(spark, cfg, live=True)
    empty = tables.read_table(spark, cfg, C.EVENTS_RAW).df.limit(0)
    with ctx.stage("live") as rec:
        assert handler.publish(ctx, rec, users, empty) == 25
    live = tables.read_table(spark, cfg, C.LIVE_RECOMMENDATIONS).df
    cols = [C.USER_ID, C.RANK, C.ITEM_ID, C.REC_SOURCE]
    got = sorted(tuple(r) for r in live.select(*cols).collect())
    want = sorted(tuple(r) for r in recs.where(F.col(C.USER_ID).isin(users)).select(*cols).collect())
    assert len(want) == 250 and got == want


def test_idempotent_append_writes_a_batch_once_and_a_control_without_it_doubles(spark, tmp_path, make_config):
    cfg = make_config(warehouse=tmp_path / "wh")
    df = spark.createDataFrame([(i, f"r{i}") for i in range(5)], f"x int, {C.RAW_KEY} string")
    assert tables.append_once(df, cfg, C.EVENTS_RAW, "app", 0) == 0
    assert tables.append_once(df, cfg, C.EVENTS_RAW, "app", 0) is None  # the replay of batch 0: skipped
    assert tables.append_once(df, cfg, C.EVENTS_RAW, "app", 1) == 1
    # the writer options leave no session setting behind: a plain append afterwards is written
    assert tables.append_rows(df, cfg, C.EVENTS_RAW) == 2
    assert tables.read_table(spark, cfg, C.EVENTS_RAW).df.count() == 15
    # control: the same replay under another id (what a stream without its checkpoint's id would do) doubles rows
    tables.append_once(df, cfg, C.EVENTS_RAW, "other", 0)
    assert tables.read_table(spark, cfg, C.EVENTS_RAW).df.groupBy(C.RAW_KEY).count().where("count > 1").count() == 5


def _stream_process(overrides: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    return subprocess.Popen([sys.executable, "-m", "sparkrec.cli", *cli(overrides)], env=env, cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _commits(table: Path) -> int:
    log = table / "_delta_log"
    return len(list(log.glob("*.json"))) if log.exists() else 0


def _on_commit(table: Path, predicate):
    """`predicate`, asked again only after `table` has a new commit: a Spark query every half second of a
    minutes-long wait would keep the suite's session busy for nothing."""
    seen = [-1]

    def check() -> bool:
        now = _commits(table)
        if now == seen[0]:
            return False
        seen[0] = now
        return predicate()

    return check


def test_sigkill_mid_batch_then_restart_every_event_exactly_once_and_the_broker_restart_loses_nothing(
        spark, built, broker, tmp_path):
    wh, overrides = copy_warehouse(built, tmp_path, "t_kill", broker)
    # Exactly once into events_raw and interactions is the point here: the lists each micro-batch would also
    # write (the other tests' subject) would only cost the two stream processes their CPU.
    overrides = [*overrides, "stream.clean_seconds=2", "stream.trigger_seconds=0.5", "stream.publish_lists=false"]
    since = datetime.now(timezone.utc)
    t = now_iso()
    first = [{"event_id": f"k{i}", "user_id": f"u{i % 40:07d}", "item_id": f"i{i % 90:06d}", "event_type": "view", "timestamp": t}
             for i in range(300)]
    produce(broker, "t_kill", first)
    log = tmp_path / "stream1.log"
    proc = _stream_process(overrides, log)
    raw_before = _commits(wh / C.EVENTS_RAW)
    try:
        # killed as soon as its first micro-batch has appended: its clean and lists are not done
        _wait_for(lambda: _commits(wh / C.EVENTS_RAW) > raw_before, 240, "the first append", proc, log)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    log2 = tmp_path / "stream2.log"
    proc = _stream_process(overrides, log2)
    try:
        cleaned = _on_commit(wh / C.INTERACTIONS, lambda: spark.read.format("delta").load(str(wh / C.INTERACTIONS)).where(
            F.col(C.EVENT_ID).startswith("k")).count() == 300)
        _wait_for(cleaned, 240, "the first events cleaned", proc, log2)
        # the broker restarts mid-stream (same storage, same port): the stream waits and resumes
        broker.stop()
        time.sleep(3)
        restarted = devkafka.start(broker.directory)
        assert restarted.port == broker.port
        broker.__dict__.update(restarted.__dict__)
        later = [{**e, "event_id": f"l{i}"} for i, e in enumerate(first[:50])]
        produce(broker, "t_kill", later)
        done = _on_commit(wh / C.INTERACTIONS, lambda: spark.read.format("delta").load(str(wh / C.INTERACTIONS)).where(
            F.col(C.EVENT_ID).startswith("l")).count() == 50)
        _wait_for(done, 240, "the events produced after the broker restart", proc, log2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    raw = spark.read.format("delta").load(str(wh / C.EVENTS_RAW)).where(F.col(C.SOURCE_FILE) == "kafka:t_kill/0")
    assert raw.count() == 350 and raw.select(C.RAW_KEY).distinct().count() == 350
    inter = spark.read.format("delta").load(str(wh / C.INTERACTIONS)).where(F.col(C.EVENT_ID).rlike("^[kl][0-9]+$"))
    assert inter.count() == 350 and inter.select(C.EVENT_ID).distinct().count() == 350
    runs = spark.read.format("delta").load(str(wh / C.RUNS))
    stream_cleans = runs.where((F.col("stage") == "clean") & (F.col("status") == "succeeded") & (F.col("rows_in") > 0)
                               & (F.col("started_at") >= F.lit(since)))
    # the ledger over the stream's cleans: every appended event classified once
    assert stream_cleans.agg(F.sum("rows_in")).first()[0] == 350
    assert stream_cleans.agg(F.sum(F.col("rows_out") + F.col("rows_quarantined") + F.col("rows_duplicate"))).first()[0] == 350


def test_a_directory_of_new_files_is_a_source_too(spark, built, broker, tmp_path):
    wh, overrides = copy_warehouse(built, tmp_path, "unused", broker)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    t = now_iso()
    (incoming / "a.json").write_text("\n".join(json.dumps({"event_id": f"f{i}", "user_id": "filer", "item_id": f"i{i:06d}",
                                                           "event_type": "view", "timestamp": t}) for i in range(4)) + "\nbroken\n")
    overrides = [*overrides, "stream.source.kind=files", f"stream.source.path={incoming}"]
    assert main(cli(overrides, "--once"), spark=spark) == 0
    assert read(spark, overrides, C.INTERACTIONS).where(F.col(C.USER_ID) == "filer").count() == 4
    assert read(spark, overrides, C.QUARANTINE).where(F.col(C.REASON) == "malformed_line").where(
        F.col(C.SOURCE_FILE).endswith("a.json")).count() == 1
    assert read(spark, overrides, C.LIVE_RECOMMENDATIONS).where(F.col(C.USER_ID) == "filer").count() == 10


def test_the_server_folds_kafka_events_in_within_a_second_and_two_replicas_agree(built, broker, tmp_path):
    """`sparkrec serve` on the stream's topic: events from any producer change the customer's list within a
    second; two servers reading the same topic give the same list (reads scale by adding replicas)."""
    from fastapi.testclient import TestClient

    from sparkrec.serve import state as state_
    from sparkrec.serve.app import create_app
    from tests.test_serve import live_checks, wait_for

    topic = "serve-live"
    mine, overrides = copy_warehouse(built, tmp_path, topic, broker)
    produce(broker, topic, [b"not json: creates the topic, then the row rules reject it"])
    cfg = load_config(ROOT / "conf" / "local.yaml", overrides)
    one, two = state_.State(cfg), state_.State(cfg)
    with TestClient(create_app(cfg, one, token=None)) as a, TestClient(create_app(cfg, two, token=None)) as b:
        wait_for(lambda: (one.snapshot, two.snapshot), lambda s: None not in s, 30)
        took = live_checks(a, one.snapshot, {}, lambda evs: produce(broker, topic, evs))
        assert max(took.values()) < 2.0
        customers = list(one.live.lists)
        assert len(customers) == 2
        for key in customers:
            got = wait_for(lambda: b.get(f"/v1/users/{key}/recommendations").json(), lambda r: r["list"] == "live", 5)[0]
            assert got["items"] == a.get(f"/v1/users/{key}/recommendations").json()["items"]
        assert one.live.rejected["malformed_line"] == 1


def _serve_process(overrides: list[str], port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sparkrec.cli", "serve", "--config", str(ROOT / "conf" / "local.yaml"),
           *[a for o in overrides for a in ("--set", o)], "--port", str(port)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _get(port: int, path: str) -> dict:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return {}


def test_a_sigkilled_server_restarts_to_the_same_lists_with_the_events_of_its_downtime_and_rides_out_the_broker(
        built, broker, tmp_path):
    from tests.test_serve import free_port, wait_for

    topic = "serve-restart"
    mine, overrides = copy_warehouse(built, tmp_path, topic, broker)
    cfg = load_config(ROOT / "conf" / "local.yaml", overrides)
    port = free_port()
    t = now_iso()
    produce(broker, topic, [{"user_id": "restart-a", "item_id": f"i{i:06d}", "event_type": "view", "timestamp": t}
                            for i in range(5)])
    proc = _serve_process(overrides, port, tmp_path / "serve1.log")
    try:
        before = wait_for(lambda: _get(port, "/v1/users/restart-a/recommendations"),
                          lambda b: b.get("list") == "live", 60)[0]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        # produced while no server runs: the restarted one reads them from the topic
        produce(broker, topic, [{"user_id": "restart-b", "item_id": f"i{i:06d}", "event_type": "purchase",
                                 "timestamp": t} for i in range(10, 15)])
        proc = _serve_process(overrides, port, tmp_path / "serve2.log")
        b = wait_for(lambda: _get(port, "/v1/users/restart-b/recommendations"), lambda r: r.get("list") == "live", 60)[0]
        assert not {f"i{i:06d}" for i in range(10, 15)} & {r["item_id"] for r in b["items"]}  # bought: excluded
        assert _get(port, "/v1/users/restart-a/recommendations")["items"] == before["items"]
        # The broker goes away: the server answers from what it holds and says it is degraded.
        broker.stop()
        ready = wait_for(lambda: _get(port, "/readyz"), lambda r: r.get("status") == "degraded", 60)[0]
        assert ready["ready"] is True and "broker" in ready["problem"]
        assert _get(port, "/v1/users/restart-a/recommendations")["items"] == before["items"]
        restarted = devkafka.start(broker.directory)
        broker.__dict__.update(restarted.__dict__)
        produce(broker, topic, [{"user_id": "restart-a", "item_id": before["items"][0]["item_id"],
                                 "event_type": "purchase", "timestamp": t}])
        after = wait_for(lambda: _get(port, "/v1/users/restart-a/recommendations"),
                         lambda r: before["items"][0]["item_id"] not in [i["item_id"] for i in r.get("items", [])], 60)[0]
        assert after["list"] == "live"
        wait_for(lambda: _get(port, "/readyz"), lambda r: r.get("status") == "ok", 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert cfg.stream.source.topic == topic


def test_forget_reaches_the_server_within_five_seconds_and_a_restart_keeps_the_customer_forgotten(
        spark, built, broker, tmp_path):
    """`sparkrec forget` while `sparkrec serve` follows the broker: within 5 s the customer is a stranger, their
    events before the erasure are gone from memory, and a restart after the purge keeps them forgotten."""
    from fastapi.testclient import TestClient

    from sparkrec.serve import state as state_
    from sparkrec.serve.app import create_app
    from tests.test_serve import wait_for

    topic = "serve-forget"
    mine, overrides = copy_warehouse(built, tmp_path, topic, broker)
    produce(broker, topic, [b"{}"])
    cfg = load_config(ROOT / "conf" / "local.yaml", overrides)
    st = state_.State(cfg)
    with TestClient(create_app(cfg, st, token=None)) as client:
        snap = wait_for(lambda: st.snapshot, lambda s: s is not None, 30)[0]
        gone, kept = [k for k in snap.lists.index if snap.lists.get(k, 1)[0]["source"] == C.SOURCE_ALS][:2]
        item = snap.lists.get(gone, 1)[0]["item_id"]
        produce(broker, topic, [{"user_id": gone, "item_id": item, "event_type": "view", "timestamp": now_iso()}])
        wait_for(lambda: client.get(f"/v1/users/{gone}/recommendations").json()["list"], lambda k: k == "live", 5)
        assert main(["forget", "--config", str(ROOT / "conf" / "local.yaml"), "--user", gone,
                     *[a for o in overrides for a in ("--set", o)]], spark=spark) == 0
        _, took = wait_for(lambda: client.get(f"/v1/users/{gone}/recommendations").json()["list"],
                           lambda k: k == "cold_start", 5)
        assert gone not in st.live.events and gone not in st.live.lists
        assert snap.lists.get(gone, 10) is None and snap.pairs.of(gone) is None
        assert client.get(f"/v1/users/{kept}/recommendations").json()["list"] == "published"
    # A restart reads tables whose old versions the erasure purged (the latest, whose commit is the new
    # horizon), and follows the topic from there: the customer stays forgotten.
    again = state_.State(cfg)
    with TestClient(create_app(cfg, again, token=None)) as client:
        wait_for(lambda: again.feed, lambda f: f is not None and f.assigned, 30)
        time.sleep(1)
        assert client.get(f"/v1/users/{gone}/recommendations").json()["list"] == "cold_start"
        assert again.snapshot.lists.get(gone, 10) is None and again.snapshot.lists.get(kept, 10) is not None
    assert took < 5


def test_a_stream_without_its_lists_still_ingests_and_cleans_every_event(spark, built, broker, tmp_path):
    """`stream.publish_lists: false` (the server gives the live lists): the durable path runs, no list is written."""
    wh, overrides = copy_warehouse(built, tmp_path, "t_nolists", broker)
    t = now_iso()
    produce(broker, "t_nolists", [{"event_id": f"q{i}", "user_id": "quiet", "item_id": f"i{i:06d}", "event_type": "view",
                                   "timestamp": t} for i in range(5)])
    assert main(cli([*overrides, "stream.publish_lists=false"], "--once"), spark=spark) == 0
    raw = spark.read.format("delta").load(str(wh / C.EVENTS_RAW)).where(F.col(C.SOURCE_FILE) == "kafka:t_nolists/0")
    assert raw.count() == 5
    inter = spark.read.format("delta").load(str(wh / C.INTERACTIONS)).where(F.col(C.USER_ID) == "quiet")
    assert inter.count() == 5  # cleaned at the end of the command
    assert not (wh / C.LIVE_RECOMMENDATIONS).exists()  # no list written
    live = spark.read.format("delta").load(str(wh / C.RUNS)).where(F.col("stage") == "live").select("rows_out").collect()
    assert live and all(r["rows_out"] == 0 for r in live)
