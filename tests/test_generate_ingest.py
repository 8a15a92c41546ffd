"""The generator is deterministic and dirty at known rates; ingest is idempotent on real Delta."""

from __future__ import annotations

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from sparkrec.batch import pipeline
from sparkrec.core import columns as C
from sparkrec.dev.generate import DIRT_RATES, GenerateParams, event_lines
from sparkrec.storage import sources, tables
from sparkrec.storage.runs import RunContext


def lines_frame(spark, lines):
    return spark.createDataFrame([(x,) for x in lines], "value string")


def test_generator_is_deterministic_whatever_the_partitioning(spark):
    p = GenerateParams(events=3_000, seed=5)
    a = lines_frame(spark, event_lines(p))
    b = lines_frame(spark, event_lines(p, 0, 1_000) + event_lines(p, 1_000, 2_500) + event_lines(p, 2_500))
    assert_df_equality(a, b, ignore_row_order=True)
    other = lines_frame(spark, event_lines(GenerateParams(events=3_000, seed=6)))
    assert a.exceptAll(other).count() > 2_000


def test_generator_injects_dirt_and_a_funnel(spark):
    p = GenerateParams(events=20_000, seed=1)
    lines = lines_frame(spark, event_lines(p))
    parsed = lines.select(F.from_json("value", "event_id string, user_id string, event_type string, timestamp string, quantity int").alias("j"), "value").select("j.*", "value")
    n = parsed.count()
    assert n == 20_000
    malformed = parsed.where(F.col("value").contains("<truncated")).count()
    assert abs(malformed - n * DIRT_RATES["malformed_line"]) < 25
    types = dict(parsed.groupBy("event_type").count().collect())
    views = types.get("view", 0) + types.get("page_view", 0)
    carts = types.get("cart", 0) + types.get("add_to_cart", 0)
    buys = types.get("purchase", 0) + types.get("order", 0)
    assert views > carts > buys > 0  # the funnel narrows
    assert types.get("hover", 0) > 0
    assert parsed.where(F.col("timestamp") == "not-a-date").count() > 0
    bots = parsed.where(F.col("user_id").startswith("bot_")).groupBy("user_id").count().collect()
    assert len(bots) == 3 and min(r["count"] for r in bots) > 300
    dup_lines = lines.groupBy("value").count().where("count > 1").count()
    assert dup_lines > n * DIRT_RATES["exact_duplicate"] * 0.5


def test_csv_source_ingests_once_and_cleans(spark, make_config, tmp_path):
    src = tmp_path / "events.csv"
    src.write_text(
        "event_id,user_id,item_id,event_type,timestamp\n"
        "e1,u1,i1,view,2025-06-01T10:00:00Z\n"
        "e2,u1,i2,purchase,2025-06-01T10:05:00Z\n"
        "e2,u1,i2,purchase,2025-06-01T10:05:00Z\n"
        "e3,,i2,view,2025-06-01T10:06:00Z\n"
    )
    cfg = make_config("source.format=csv", f"source.path={src}", "items.path=null")
    pipeline.run_stages(RunContext(spark, cfg), ("ingest", "ingest", "clean"))
    raw = tables.read_table(spark, cfg, C.EVENTS_RAW)
    # version 0 created the table, version 1 turned on its change feed; the second ingest committed nothing
    assert raw.df.count() == 4 and raw.version == 1
    runs = tables.read_table(spark, cfg, C.RUNS).df
    assert sorted(r["rows_out"] for r in runs.where("stage = 'ingest'").collect()) == [0, 4]
    clean_run = runs.where("stage = 'clean'").first()
    assert (clean_run["rows_out"], clean_run["rows_quarantined"], clean_run["rows_duplicate"]) == (2, 1, 1)


def test_raw_table_keeps_column_names_with_spaces(spark, make_config, tmp_path):
    src = tmp_path / "tx.csv"
    src.write_text("Invoice,StockCode,Quantity,InvoiceDate,Price,Customer ID\n1,A,2,2010-01-01 10:00:00,1.5,12.0\n")
    cfg = make_config(
        "source.format=csv", f"source.path={src}", "source.kind=transactions", "source.columns.invoice=Invoice",
        "source.columns.user_id=Customer ID", "source.columns.item_id=StockCode", "source.columns.timestamp=InvoiceDate",
        "source.columns.quantity=Quantity", "source.columns.price=Price", "source.columns.event_type=null",
        "source.columns.event_id=null", "source.columns.rating=null", "source.timestamp_format=yyyy-MM-dd HH:mm:ss", "items.path=null",
    )
    pipeline.run_stages(RunContext(spark, cfg), ("ingest", "clean"))
    assert "Customer ID" in tables.read_table(spark, cfg, C.EVENTS_RAW).df.columns
    row = tables.read_table(spark, cfg, C.INTERACTIONS).df.first()
    assert (row[C.USER_ID], row[C.ITEM_ID], row[C.EVENT_TYPE], row[C.QUANTITY]) == ("12.0", "A", "purchase", 2.0)


def test_unreadable_source_is_an_input_error(spark, make_config, tmp_path):
    from sparkrec.core.errors import InputError

    bad = tmp_path / "notparquet"
    bad.mkdir()
    (bad / "x.parquet").write_text("this is not parquet")
    cfg = make_config("source.format=parquet", f"source.path={bad}", "items.path=null")
    with pytest.raises(InputError, match="cannot read source.path"):
        sources.read_source(spark, cfg.source)


def test_generate_command_writes_events_items_and_manifest(spark, tmp_path, capsys):
    from sparkrec.cli import main

    out = tmp_path / "shop"
    assert main(["generate", "--events", "2000", "--seed", "3", "--out", str(out)], spark=spark) == 0
    assert "generated 2,000 events" in capsys.readouterr().out
    assert spark.read.text(str(out / "events")).count() == 2_000
    items = spark.read.option("header", "true").csv(str(out / "items"))
    assert items.columns == ["item_id", "category", "price", "available", "name"] and items.count() == 40
    manifest = (out / "manifest.json").read_text()
    assert '"seed": 3' in manifest and '"users": 50' in manifest
    assert main(["generate", "--events", "0", "--out", str(out)], spark=spark) == 2


def test_ingest_reads_only_the_files_of_its_own_sources(spark, make_config, tmp_path):
    """The row key starts with its source's hash and events_raw keeps statistics on it, so ingest's MERGE skips
    the files of other sources: a day's ingest does not read all earlier days. Re-ingesting stays a no-op."""
    from sparkrec.batch import ingest

    src = tmp_path / "in"
    src.mkdir()
    header = "event_id,user_id,item_id,event_type,timestamp\n"
    (src / "a.csv").write_text(header + "e1,u1,i1,view,2025-06-01T10:00:00Z\ne2,u2,i1,view,2025-06-01T10:01:00Z\n")
    cfg = make_config("source.format=csv", f"source.path={src}", "items.path=null")
    pipeline.run_stages(RunContext(spark, cfg), ("ingest",))
    (src / "b.csv").write_text(header + "e3,u3,i2,view,2025-06-02T10:00:00Z\n")
    pipeline.run_stages(RunContext(spark, cfg), ("ingest", "ingest"))
    raw = tables.read_table(spark, cfg, C.EVENTS_RAW).df
    assert raw.count() == 3
    runs = tables.read_table(spark, cfg, C.RUNS).df.where("stage = 'ingest'").orderBy("started_at")
    assert [r["rows_out"] for r in runs.collect()] == [2, 1, 0]
    prefix = {r[0].rsplit("/", 1)[-1]: r[1].split(":")[0] for r in raw.select(C.SOURCE_FILE, C.RAW_KEY).distinct().collect()}
    assert set(prefix) == {"a.csv", "b.csv"}
    every = set(raw.inputFiles())
    only_b = set(raw.alias("t").where(ingest.key_window([prefix["b.csv"]])).inputFiles())
    assert only_b and only_b < every  # a.csv's file is skipped
    assert raw.alias("t").where(ingest.key_window([prefix["b.csv"]])).count() == 1
    assert raw.alias("t").where(ingest.key_window(["0" * 16])).inputFiles() == []
    assert ingest.key_window([]) is None
