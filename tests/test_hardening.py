"""Regression tests for what a new user's first day with bad data and bad config found (issue 13).

Each test failed before its fix. The probe inputs are small files under tests/data/probes/.
"""

from __future__ import annotations

from datetime import datetime, timezone

from pyspark.sql import functions as F

from sparkrec.batch import clean, item_table, pipeline
from sparkrec.core import columns as C
from sparkrec.core.config import load_config
from sparkrec.storage import tables
from sparkrec.storage.runs import RunContext
from tests.conftest import ROOT
from tests.helpers import raw_events

PROBES = ROOT / "tests" / "data" / "probes"
NOW = datetime(2025, 12, 1, tzinfo=timezone.utc)
CFG = load_config(ROOT / "conf" / "local.yaml")
OK_TS = "2025-06-01T10:00:00Z"


def _reasons(df):
    return {r["event_id"]: r[C.REASON] for r in df.select(F.col(C.EVENT_ID).alias("event_id"), C.REASON).collect()}


def test_csv_lines_whose_field_count_differs_from_the_header_are_malformed_and_quotes_are_standard(spark, make_config):
    """Items 2 and 3: extra, missing or shifted fields, an unclosed quote and an embedded newline
    are `malformed_line`; a doubled quote inside a quoted field is one quote in the id."""
    cfg = make_config("source.format=csv", f"source.path={PROBES / 'broken.csv'}", "items.path=null")
    pipeline.run_stages(RunContext(spark, cfg), ("ingest",))
    tally = pipeline.run_clean(RunContext(spark, cfg))
    assert (tally.rows_in, tally.kept, tally.quarantined, tally.duplicates) == (9, 2, 7, 0)
    assert tally.reasons == {"malformed_line": 6, "unparsable_timestamp": 1}
    kept = sorted((r[C.EVENT_ID], r[C.USER_ID]) for r in tables.read_table(spark, cfg, C.INTERACTIONS).df.collect())
    assert kept == [("e1", "u1"), ("e2", 'he said "hi"')]
    q = tables.read_table(spark, cfg, C.QUARANTINE).df
    texts = sorted(r[C.CORRUPT_RECORD] for r in q.where(F.col(C.REASON) == "malformed_line").collect())
    lines = (PROBES / "broken.csv").read_text().splitlines()
    assert texts == sorted(lines[3:9])  # each malformed line kept whole, as the input had it


def test_non_finite_numbers_are_invalid(spark):
    """Item 4: NaN, infinities and overflowing text are not quantities, prices or ratings."""
    rows = [
        ("q1", "u1", "i1", "purchase", OK_TS, None, "NaN", None),
        ("q2", "u1", "i1", "purchase", OK_TS, None, "inf", None),
        ("q3", "u1", "i1", "purchase", OK_TS, None, "Infinity", None),
        ("q4", "u1", "i1", "purchase", OK_TS, None, "1e400", None),
        ("p1", "u1", "i1", "view", OK_TS, None, None, "nan"),
        ("p2", "u1", "i1", "view", OK_TS, None, None, "-Infinity"),
        ("r1", "u1", "i1", "rating", OK_TS, "NaN", None, None),
        ("ok", "u1", "i1", "purchase", OK_TS, None, "2", "1.5"),
    ]
    got = _reasons(clean.classify(raw_events(spark, rows), CFG.source, CFG.clean, NOW))
    assert got == {
        "q1": "invalid_quantity", "q2": "invalid_quantity", "q3": "invalid_quantity", "q4": "invalid_quantity",
        "p1": "invalid_price", "p2": "invalid_price", "r1": "invalid_rating", "ok": None,
    }


def test_ids_that_are_objects_arrays_control_characters_or_too_long_are_invalid(spark):
    """Item 13: a nested JSON value mapped as an id, NUL or control characters, or a 1 MB id."""
    cfg = load_config(ROOT / "conf" / "local.yaml", ["clean.max_id_length=64"])
    rows = [
        ("a", '{"id":"u1"}', "i1", "view", OK_TS, None, None, None),
        ("b", '["u1"]', "i1", "view", OK_TS, None, None, None),
        ("c", "u\x001", "i1", "view", OK_TS, None, None, None),
        ("d", "u1", "i\x07", "view", OK_TS, None, None, None),
        ("e", "u" * 65, "i1", "view", OK_TS, None, None, None),
        ("f", "u1", "i" * 1_000_000, "view", OK_TS, None, None, None),
        ("g", "Robert'); DROP TABLE users;--", "../../etc/passwd", "view", OK_TS, None, None, None),
        ("h", "ü-😀", "[i1", "view", OK_TS, None, None, None),
        ("i", "true", "i1", "view", OK_TS, None, None, None),  # a JSON boolean reads as this text
        ("j", "u1", "FALSE", "view", OK_TS, None, None, None),
    ]
    got = _reasons(clean.classify(raw_events(spark, rows), cfg.source, cfg.clean, NOW))
    assert got == {
        "a": "invalid_user_id", "b": "invalid_user_id", "c": "invalid_user_id", "d": "invalid_item_id",
        "e": "invalid_user_id", "f": "invalid_item_id", "g": None, "h": None, "i": "invalid_user_id", "j": "invalid_item_id",
    }


def _tiny_shop(path, users=40, items=5):
    import json
    import random

    rng = random.Random(1)
    with open(path, "w") as f:
        for u in range(users):
            for j in range(3):
                f.write(json.dumps({"event_id": f"e{u}-{j}", "user_id": f"u{u}", "item_id": f"i{rng.randrange(items)}",
                                    "event_type": rng.choice(["view", "cart", "purchase"]),
                                    "timestamp": f"2025-06-0{1 + j}T10:00:00Z"}) + "\n")


def test_n_above_what_a_user_can_be_offered_gives_every_allowed_item_and_one_warning(spark, make_config, tmp_path, caplog):
    """Item 5: with 5 items and recommend.n=50 every user gets every item the rules allow
    (all but what they bought), and the stage warns once with the counts."""
    _tiny_shop(tmp_path / "events.json")
    cfg = make_config(f"source.path={tmp_path / 'events.json'}", "items.path=null", "recommend.n=50",
                      "train.als.rank=4", "train.als.max_iter=3", "recommend.similar_items.enabled=false",
                      "tune.enabled=false", "evaluate.enabled=false")  # the recommend stage's n is the point here
    with caplog.at_level("WARNING", logger="sparkrec.batch.pipeline"):
        pipeline.run_stages(RunContext(spark, cfg))
    recs = tables.read_table(spark, cfg, C.RECOMMENDATIONS).df
    inter = tables.read_table(spark, cfg, C.INTERACTIONS).df
    bought = inter.where(F.col(C.EVENT_TYPE) == "purchase").groupBy(C.USER_ID).agg(F.countDistinct(C.ITEM_ID).alias("b"))
    expected = inter.select(C.USER_ID).distinct().join(bought, C.USER_ID, "left").select(
        C.USER_ID, (F.lit(5) - F.coalesce(F.col("b"), F.lit(0))).alias("want"))
    got = recs.groupBy(C.USER_ID).count().join(expected, C.USER_ID, "right")
    assert got.count() == 40
    assert got.where(F.coalesce(F.col("count"), F.lit(0)) != F.col("want")).count() == 0
    warnings = [r.getMessage() for r in caplog.records if "fewer than recommend.n=50" in r.getMessage()]
    assert len(warnings) == 1 and "40 of 40 users" in warnings[0]


def test_ctrl_c_is_one_line_and_exit_130(spark, make_config, tmp_path, capsys, monkeypatch):
    """Item 19: an interrupt printed about 100 lines of double traceback."""
    from sparkrec.cli import main

    _tiny_shop(tmp_path / "events.json")
    args = ["--config", str(ROOT / "conf" / "local.yaml"), "--set", f"warehouse={tmp_path / 'wh'}",
            "--set", f"source.path={tmp_path / 'events.json'}", "--set", "items.path=null"]
    assert main(["ingest", *args], spark=spark) == 0

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(clean, "deduplicated", interrupted)
    capsys.readouterr()
    assert main(["clean", *args], spark=spark) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sparkrec: interrupted in stage clean; every table is at its last committed version "
                   "(a Delta write is all or nothing): run the command again to finish"]


def test_a_stage_whose_process_died_is_recorded_and_its_checkpoints_removed(spark, make_config, tmp_path, capsys):
    """Item 8: after SIGKILL the running stage had no row in `runs` and `_checkpoints/<run>` stayed behind."""
    import json
    import socket
    import subprocess
    import sys

    from sparkrec.cli import main
    from sparkrec.storage.runs import active_dir

    _tiny_shop(tmp_path / "events.json")
    cfg = make_config(f"source.path={tmp_path / 'events.json'}", "items.path=null")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as after SIGKILL
    marker_dir = tmp_path / "warehouse" / "_runs_active"
    marker_dir.mkdir(parents=True)
    (marker_dir / "R-killed.recommend.json").write_text(json.dumps(
        {"run_id": "R-killed", "stage": "recommend", "started_at": "2025-06-01T10:00:00+00:00", "pid": dead.pid,
         "host": socket.gethostname(), "config_hash": "abc"}))
    stale = tmp_path / "warehouse" / "_checkpoints" / "R-killed"
    stale.mkdir(parents=True)
    (stale / "rdd-1").write_text("x")
    assert active_dir(cfg).endswith("_runs_active")
    args = ["--config", str(ROOT / "conf" / "local.yaml"), "--set", f"warehouse={tmp_path / 'warehouse'}"]
    assert main(["runs", *args], spark=spark) == 2  # no runs table yet, but the listing must not crash
    capsys.readouterr()

    pipeline.run_stages(RunContext(spark, cfg), ("ingest",))
    rows = tables.read_table(spark, cfg, C.RUNS).df.where("run_id = 'R-killed'").collect()
    assert len(rows) == 1 and rows[0]["stage"] == "recommend" and rows[0]["status"] == "interrupted"
    assert f"pid {dead.pid}" in rows[0]["error"]
    assert not stale.exists() and not list(marker_dir.iterdir())  # this run's own marker is gone too
    assert main(["runs", *args], spark=spark) == 0
    assert "R-killed" in capsys.readouterr().out


def test_transaction_lines_name_their_items_and_explanations_use_the_names(spark):
    """Item 18: Online Retail explanations read "because you bought 48188"; the lines carry a Description."""
    from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

    from sparkrec.batch import recommend
    from sparkrec.batch.ingest import with_lineage

    retail = load_config(ROOT / "conf" / "online_retail.yaml")
    assert retail.source.columns.item_name == "Description"
    schema = StructType([StructField("Invoice", StringType()), StructField("StockCode", StringType()),
                         StructField("Description", StringType()), StructField("Quantity", LongType()),
                         StructField("InvoiceDate", StringType()), StructField("Price", DoubleType()),
                         StructField("Customer ID", DoubleType()), StructField("Country", StringType())])
    rows = [
        ("1", "48188", "DOORMAT WELCOME", 1, "2010-01-01 10:00:00", 7.0, 1.0, "UK"),
        ("2", "48188", " DOORMAT WELCOME SUNRISE ", 1, "2010-02-01 10:00:00", 7.0, 2.0, "UK"),  # the latest name wins
        ("3", "22423", "REGENCY CAKESTAND", 1, "2010-01-01 10:00:00", 12.0, 1.0, "UK"),
        ("4", "99999", None, 1, "2010-01-01 10:00:00", 1.0, 1.0, "UK"),
    ]
    raw = with_lineage(spark.createDataFrame(rows, schema).withColumn(C.SOURCE_FILE, F.lit("f")), "r")
    classified = clean.classify(raw, retail.source, retail.clean, NOW)
    items = {r[C.ITEM_ID]: r[C.ITEM_NAME] for r in item_table.items_from_interactions(clean.kept_with_names(classified)).collect()}
    assert items == {"48188": "DOORMAT WELCOME SUNRISE", "22423": "REGENCY CAKESTAND", "99999": None}

    item_f = spark.createDataFrame([(0, [1.0, 0.0]), (1, [0.9, 0.1]), (2, [0.0, 1.0])], "item_idx int, features array<float>")
    ids = spark.createDataFrame([("48188", 0), ("22423", 1), ("99999", 2)], "item_id string, item_idx int")
    items_df = spark.createDataFrame([(k, None, True, v) for k, v in items.items()],
                                     "item_id string, category string, available boolean, name string")
    history = spark.createDataFrame([(0, 0, "purchase", datetime(2010, 1, 1)), (0, 2, "purchase", datetime(2010, 1, 1))],
                                    "user_idx int, item_idx int, event_type string, event_ts timestamp")
    meta = recommend.item_meta(ids, items_df, history, retail.recommend.rules)
    recs = recommend.recommend_all(history, spark.createDataFrame([(0, [1.0, 0.0])], "user_idx int, features array<float>"),
                                   item_f, retail.recommend.model_copy(update={"n": 1}), meta)
    users = spark.createDataFrame([("13085", 0)], "user_id string, user_idx int")
    out = [(r[C.ITEM_ID], r[C.EXPLANATION], r[C.BECAUSE_ITEM_ID]) for r in recommend.with_keys(recs, users, meta, 7).collect()]
    assert out == [("22423", "because you bought DOORMAT WELCOME SUNRISE", "48188")]


def test_the_terminal_shows_sparkrecs_own_lines_and_the_jvm_output_goes_to_a_file(tmp_path):
    """Item 16: every command printed the same block of JVM and Spark warnings."""
    import os
    import subprocess
    import sys

    _tiny_shop(tmp_path / "events.json")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    if (cache := os.path.expanduser("~/.cache/sparkrec")) and os.path.isdir(cache):  # keep the remembered Delta jars
        os.makedirs(tmp_path / "cache", exist_ok=True)
        os.symlink(cache, tmp_path / "cache" / "sparkrec")
    cmd = [sys.executable, "-m", "sparkrec.cli", "ingest", "--config", str(ROOT / "conf" / "local.yaml"),
           "--set", f"warehouse={tmp_path / 'wh'}", "--set", f"source.path={tmp_path / 'events.json'}",
           "--set", "items.path=null", "--set", "spark.driver_memory=1g"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and all(" sparkrec" in line for line in lines), "\n".join(lines)
    diverted = next(line for line in lines if "Spark's own output:" in line).split("Spark's own output: ")[1].split(" (-v")[0]
    assert "WARN" in open(diverted).read()  # what Spark printed is kept, not lost


def test_spark_itself_is_asked_about_the_timestamp_format_before_a_row_is_read(spark):
    """Item 10: a pattern Spark refuses failed mid-stage with a truncated cross-version message."""
    from sparkrec.core.errors import ConfigError

    clean.check_timestamp_format(spark, CFG.source.model_copy(update={"timestamp_format": "yyyy-MM-dd HH:mm:ss"}))
    unchecked = CFG.source.model_copy(update={"timestamp_format": "QQQQQ yyyy"})  # past the config check, as a file could be
    import pytest

    with pytest.raises(ConfigError, match="config key 'source.timestamp_format': Spark cannot parse with 'QQQQQ yyyy'"):
        clean.check_timestamp_format(spark, unchecked)
