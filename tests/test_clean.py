"""Cleaning rules on tiny hand-built tables: each rule has a row that trips it."""

from __future__ import annotations

from datetime import datetime, timezone

from chispa import assert_df_equality
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

from sparkrec.batch import clean, item_table
from sparkrec.batch.ingest import with_lineage
from sparkrec.core import columns as C
from sparkrec.core.config import load_config
from tests.conftest import ROOT
from tests.helpers import raw_events

NOW = datetime(2025, 12, 1, tzinfo=timezone.utc)
EVENTS_CFG = load_config(ROOT / "conf" / "local.yaml", ["clean.bots.max_events_per_user_day=3"])
RETAIL_CFG = load_config(ROOT / "conf" / "online_retail.yaml")


def classify_events(spark, rows, corrupt=None, cfg=EVENTS_CFG):
    return clean.classify(raw_events(spark, rows, corrupt=corrupt), cfg.source, cfg.clean, NOW)


def outcomes(df):
    return {r["event_id"]: (r[clean.OUTCOME], r[C.REASON]) for r in df.select(F.col(C.EVENT_ID).alias("event_id"), clean.OUTCOME, C.REASON).collect()}


def test_each_rule_has_a_reason(spark):
    ok_ts = "2025-06-01T10:00:00Z"
    rows = [
        ("e1", "u1", "i1", "view", ok_ts, None, None, "9.5"),  # fine
        ("e2", None, "i1", "view", ok_ts, None, None, None),  # null user
        ("e3", "   ", "i1", "view", ok_ts, None, None, None),  # blank user
        ("e4", "u1", None, "view", ok_ts, None, None, None),  # null item
        ("e5", "u1", "i1", "hover", ok_ts, None, None, None),  # unknown type
        ("e6", "u1", "i1", "view", "not-a-date", None, None, None),
        ("e7", "u1", "i1", "view", "2099-01-01T00:00:00Z", None, None, None),  # future
        ("e8", "u1", "i1", "view", "1999-12-31T23:59:59Z", None, None, None),  # before min
        ("e9", "u1", "i1", "purchase", ok_ts, None, "-2", None),  # negative quantity
        ("e10", "u1", "i1", "purchase", ok_ts, None, "two", None),  # unparsable quantity
        ("e11", "u1", "i1", "rating", ok_ts, "9", None, None),  # rating out of range
        ("e12", "u1", "i1", "rating", ok_ts, None, None, None),  # rating without value
        ("e13", "u1", "i1", "view", ok_ts, None, None, "cheap"),  # unparsable price
        ("e14", None, None, None, None, None, None, None),  # malformed line
        ("e15", "u2", "i2", " Add_To_Cart ", "2025-06-01T10:00:00Z", None, None, None),  # synonym, any case
    ]
    corrupt = [None] * 13 + ['{"event_id": "e14", "user_', None]
    got = outcomes(classify_events(spark, rows, corrupt))
    assert got == {
        "e1": ("kept", None),
        "e14": ("quarantined", "malformed_line"),
        "e2": ("quarantined", "missing_user_id"),
        "e3": ("quarantined", "missing_user_id"),
        "e4": ("quarantined", "missing_item_id"),
        "e5": ("quarantined", "unknown_event_type"),
        "e6": ("quarantined", "unparsable_timestamp"),
        "e7": ("quarantined", "timestamp_out_of_range"),
        "e8": ("quarantined", "timestamp_out_of_range"),
        "e9": ("quarantined", "non_positive_quantity"),
        "e10": ("quarantined", "invalid_quantity"),
        "e11": ("quarantined", "invalid_rating"),
        "e12": ("quarantined", "invalid_rating"),
        "e13": ("quarantined", "invalid_price"),
        "e15": ("kept", None),
    }


def test_normalize_maps_synonyms_and_parses(spark):
    rows = [("e1", " u1 ", "i1", "PAGE_VIEW", "2025-06-01T10:00:00Z", None, None, "9.50"), ("e2", "u1", "i2", "order", "2025-06-01T11:00:00Z", None, "3", "1")]
    got = clean.interactions_of(classify_events(spark, rows)).select(C.USER_ID, C.ITEM_ID, C.EVENT_TYPE, C.EVENT_TS, C.QUANTITY, C.PRICE)
    schema = StructType(
        [
            StructField(C.USER_ID, StringType()),
            StructField(C.ITEM_ID, StringType()),
            StructField(C.EVENT_TYPE, StringType()),
            StructField(C.EVENT_TS, got.schema[C.EVENT_TS].dataType),
            StructField(C.QUANTITY, DoubleType()),
            StructField(C.PRICE, DoubleType()),
        ]
    )
    expected = got.sparkSession.createDataFrame(
        [("u1", "i1", "view", datetime(2025, 6, 1, 10, 0), None, 9.5), ("u1", "i2", "purchase", datetime(2025, 6, 1, 11, 0), 3.0, 1.0)],
        schema,
    )
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)


def test_exact_duplicates_and_replays_keep_one_deterministic_row(spark):
    a = ("e1", "u1", "i1", "view", "2025-06-01T10:00:00Z", None, None, None)
    replay_late = ("e1", "u1", "i1", "view", "2025-06-01T10:00:05Z", None, None, None)
    other = ("e2", "u1", "i2", "view", "2025-06-01T10:01:00Z", None, None, None)
    no_id = (None, "u2", "i3", "view", "2025-06-01T10:02:00Z", None, None, None)
    df = classify_events(spark, [replay_late, a, a, other, a, no_id, no_id])
    counts = {(r[clean.OUTCOME], r[clean.DUPLICATE]): r["count"] for r in df.groupBy(clean.OUTCOME, clean.DUPLICATE).count().collect()}
    assert counts == {("kept", None): 3, ("duplicate", "exact"): 3, ("duplicate", "replay"): 1}
    kept = clean.interactions_of(df).where(F.col(C.EVENT_ID) == "e1").select(C.EVENT_TS).collect()
    assert kept == [(datetime(2025, 6, 1, 10, 0),)]  # the earliest of the replays wins


def test_dedup_does_not_depend_on_partitioning(spark):
    rows = [(f"e{i % 7}", f"u{i % 3}", f"i{i % 5}", "view", f"2025-06-01T10:00:{i % 60:02d}Z", None, None, None) for i in range(60)]
    one = clean.interactions_of(clean.classify(raw_events(spark, rows).repartition(1), EVENTS_CFG.source, EVENTS_CFG.clean, NOW))
    many = clean.interactions_of(clean.classify(raw_events(spark, rows).repartition(5), EVENTS_CFG.source, EVENTS_CFG.clean, NOW))
    assert one.count() == 7
    assert_df_equality(one, many, ignore_row_order=True)


def test_bot_users_are_quarantined_after_dedup(spark):
    day = "2025-06-02T%02d:00:00Z"
    bot = [(f"b{i}", "bot", f"i{i}", "view", day % i, None, None, None) for i in range(1, 6)]  # 5 a day > 3
    replayed = [("h1", "human", "i1", "view", day % 1, None, None, None)] * 5  # 5 copies of one event
    human = [(f"h{i}", "human", f"i{i}", "view", day % i, None, None, None) for i in range(2, 4)]
    got = outcomes(classify_events(spark, bot + replayed + human))
    assert {got[f"b{i}"] for i in range(1, 6)} == {("quarantined", "bot_user")}
    assert got["h2"] == ("kept", None) and got["h3"] == ("kept", None)


def test_ledger_balances_and_items_derived(spark):
    rows = [
        ("e1", "u1", "i1", "purchase", "2025-06-01T10:00:00Z", None, "1", "2.0"),
        ("e1", "u1", "i1", "purchase", "2025-06-01T10:00:00Z", None, "1", "2.0"),
        ("e2", None, "i1", "view", "2025-06-01T10:00:00Z", None, None, None),
        ("e3", "u1", "i2", "view", "2025-06-02T10:00:00Z", None, None, None),
    ]
    df = classify_events(spark, rows)
    led = {r[clean.OUTCOME]: r["count"] for r in clean.ledger(df).groupBy(clean.OUTCOME).sum("count").withColumnRenamed("sum(count)", "count").collect()}
    assert led == {"kept": 2, "quarantined": 1, "duplicate": 1}
    q = clean.quarantine_of(df, "r1").collect()
    assert len(q) == 1 and q[0][C.REASON] == "missing_user_id" and q[0][C.RUN_ID] == "r1"
    assert '"item_id":"i1"' in q[0][C.RAW_RECORD] and '"user_id":null' in q[0][C.RAW_RECORD]
    items = {r[C.ITEM_ID]: (r[C.PRICE], r[C.AVAILABLE]) for r in item_table.items_from_interactions(clean.interactions_of(df)).collect()}
    assert items == {"i1": (2.0, True), "i2": (None, True)}


RETAIL_SCHEMA = StructType(
    [
        StructField("Invoice", StringType()),
        StructField("StockCode", StringType()),
        StructField("Description", StringType()),
        StructField("Quantity", LongType()),
        StructField("InvoiceDate", StringType()),
        StructField("Price", DoubleType()),
        StructField("Customer ID", DoubleType()),
        StructField("Country", StringType()),
    ]
)


def test_transactions_preset(spark):
    rows = [
        ("489434", "85048", "LIGHTS", 12, "2010-07-01 07:45:00", 6.95, 13085.0, "United Kingdom"),  # kept, BST
        ("489434", "85048", "LIGHTS", 12, "2010-07-01 07:45:00", 6.95, 13085.0, "United Kingdom"),  # exact dup
        ("C489449", "22087", "PAPER", -12, "2009-12-01 10:33:00", 0.85, 16321.0, "Australia"),  # cancellation
        ("489435", "POST", "POSTAGE", 1, "2009-12-01 10:33:00", 18.0, 12682.0, "France"),  # non-product
        ("489436", "gift_0001_20", "VOUCHER", 1, "2009-12-01 10:33:00", 20.0, 12682.0, "France"),  # non-product
        ("489437", "21523", "MAT", 0, "2009-12-01 10:33:00", 5.0, 12682.0, "France"),  # quantity 0
        ("489438", "21524", "MAT", 2, "2009-12-01 10:33:00", 0.0, 12682.0, "France"),  # free line
        ("489439", "21525", "MAT", 2, "2009-12-01 10:33:00", 5.0, None, "France"),  # unknown customer
        ("489440", "79323P", "PINK", 1, "2009-12-01 10:33:00", 6.75, 12682.0, "France"),  # kept, GMT
    ]
    raw = with_lineage(spark.createDataFrame(rows, RETAIL_SCHEMA).withColumn(C.SOURCE_FILE, F.lit("f")), "r")
    df = clean.classify(raw, RETAIL_CFG.source, RETAIL_CFG.clean, NOW)
    got = sorted((r[C.ITEM_ID], r[clean.OUTCOME], r[C.REASON]) for r in df.collect())
    assert got == [
        ("21523", "quarantined", "non_positive_quantity"),
        ("21524", "quarantined", "non_positive_price"),
        ("21525", "quarantined", "missing_user_id"),
        ("22087", "quarantined", "cancellation"),
        ("79323P", "kept", None),
        ("85048", "duplicate", None),
        ("85048", "kept", None),
        ("POST", "quarantined", "non_product_item"),
        ("gift_0001_20", "quarantined", "non_product_item"),
    ]
    kept = {r[C.ITEM_ID]: r for r in clean.interactions_of(df).collect()}
    assert kept["85048"][C.USER_ID] == "13085"
    assert kept["85048"][C.EVENT_TYPE] == "purchase"
    assert kept["85048"][C.EVENT_TS] == datetime(2010, 7, 1, 6, 45)  # London summer time -> UTC
    assert kept["79323P"][C.EVENT_TS] == datetime(2009, 12, 1, 10, 33)  # winter: London == UTC


def test_normalize_items(spark):
    items = spark.createDataFrame(
        [(" i1 ", "toys", "3.5", "false"), ("i2", None, "n/a", "yes"), (None, "x", "1", "1"), ("i1", "toys", "3.5", "false")],
        "item_id string, category string, price string, available string",
    )
    got = sorted(tuple(r) for r in item_table.normalize_items(items).collect())
    assert got == [("i1", "toys", 3.5, False), ("i2", None, None, True)]
