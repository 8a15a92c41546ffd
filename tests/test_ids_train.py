"""Stable ids, feedback weights and the training matrix."""

from __future__ import annotations

from datetime import datetime

import pytest
from chispa import assert_df_equality

from sparkrec.batch import ids, train
from sparkrec.core import columns as C
from sparkrec.core.config import TrainConfig
from sparkrec.core.errors import StageError


def test_new_ids_are_dense_ordered_and_skip_known_keys(spark):
    keys = spark.createDataFrame([("b",), ("a",), (None,), ("a",), ("c",)], "user_id string")
    first = ids.new_ids(keys, None, C.USER_ID, C.USER_IDX)
    assert sorted(tuple(r) for r in first.collect()) == [("a", 0), ("b", 1), ("c", 2)]
    more = spark.createDataFrame([("d",), ("a",), ("0",)], "user_id string")
    assert ids.next_id(first, C.USER_IDX) == 3
    second = ids.new_ids(more, first, C.USER_ID, C.USER_IDX, ids.next_id(first, C.USER_IDX))
    assert sorted(tuple(r) for r in second.collect()) == [("0", 3), ("d", 4)]


def test_new_ids_across_many_partitions_follow_key_order_without_gaps(spark):
    """Keys spread over several range partitions still get one dense run of ids in key order."""
    keys = spark.createDataFrame([(f"k{i:04d}",) for i in range(999, -1, -1)] * 2, "item_id string").repartition(7)
    existing = spark.createDataFrame([("k0500", 0), ("k0007", 1)], "item_id string, item_idx int")
    settings = {"spark.sql.shuffle.partitions": "5", "spark.sql.adaptive.coalescePartitions.enabled": "false"}
    before = {k: spark.conf.get(k) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)
    try:
        assert keys.orderBy(C.ITEM_ID).rdd.getNumPartitions() > 1  # the case is really spread out
        got = ids.new_ids(keys, existing, C.ITEM_ID, C.ITEM_IDX, offset=2).collect()
    finally:
        for k, v in before.items():
            spark.conf.set(k, v)
    expected = [k for k in (f"k{i:04d}" for i in range(1000)) if k not in ("k0500", "k0007")]
    assert sorted((r[C.ITEM_IDX], r[C.ITEM_ID]) for r in got) == [(2 + n, k) for n, k in enumerate(expected)]


def test_new_ids_of_no_new_keys_is_empty(spark):
    keys = spark.createDataFrame([("a",)], "user_id string")
    existing = spark.createDataFrame([("a", 0)], "user_id string, user_idx int")
    out = ids.new_ids(keys, existing, C.USER_ID, C.USER_IDX, offset=1)
    assert out.collect() == [] and dict(out.dtypes) == {C.USER_ID: "string", C.USER_IDX: "int"}


def test_id_space_is_checked():
    ids.check_id_space(2**31 - 5, 5, "user_ids")  # the last id is exactly the int maximum
    with pytest.raises(StageError, match="exceed"):
        ids.check_id_space(2**31 - 5, 6, "user_ids")


def test_training_matrix_weights_and_aggregates(spark):
    inter = spark.createDataFrame(
        [
            ("u1", "i1", "view", datetime(2025, 1, 10), None),
            ("u1", "i1", "purchase", datetime(2025, 1, 10), None),
            ("u1", "i1", "purchase", datetime(2025, 1, 11), None),
            ("u1", "i2", "rating", datetime(2025, 1, 11), 4.0),
            ("u2", "i2", "cart", datetime(2025, 1, 11), None),
            ("u2", "i3", "view", datetime(2025, 1, 11), None),  # view weight 0 below: dropped
            ("u3", "i9", "purchase", datetime(2025, 1, 11), None),  # no ids: dropped
        ],
        "user_id string, item_id string, event_type string, event_ts timestamp, rating double",
    )
    uids = spark.createDataFrame([("u1", 0), ("u2", 1)], "user_id string, user_idx int")
    iids = spark.createDataFrame([("i1", 0), ("i2", 1), ("i3", 2)], "item_id string, item_idx int")
    cfg = TrainConfig(event_weights={"view": 0.0, "cart": 2.0, "purchase": 5.0, "rating": 0.5})
    got = train.training_matrix(inter, uids, iids, cfg)
    expected = spark.createDataFrame([(0, 0, 10.0), (0, 1, 2.0), (1, 1, 2.0)], "user_idx int, item_idx int, weight float")
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)


def test_recency_decay_halves_per_half_life(spark):
    inter = spark.createDataFrame(
        [("u1", "i1", "purchase", datetime(2025, 1, 11)), ("u1", "i2", "purchase", datetime(2025, 1, 1))],
        "user_id string, item_id string, event_type string, event_ts timestamp",
    ).withColumn(C.RATING, __import__("pyspark.sql.functions", fromlist=["lit"]).lit(None).cast("double"))
    uids = spark.createDataFrame([("u1", 0)], "user_id string, user_idx int")
    iids = spark.createDataFrame([("i1", 0), ("i2", 1)], "item_id string, item_idx int")
    cfg = TrainConfig(event_weights={"purchase": 4.0}, recency_half_life_days=10)
    got = {r[C.ITEM_IDX]: r[C.WEIGHT] for r in train.training_matrix(inter, uids, iids, cfg, datetime(2025, 1, 11)).collect()}
    assert got == {0: pytest.approx(4.0), 1: pytest.approx(2.0)}


def test_largest_user_share_names_the_heaviest_user(spark):
    m = spark.createDataFrame([(1, 0, 2.0), (1, 1, 6.0), (2, 0, 1.0), (3, 2, 1.0)], "user_idx int, item_idx int, weight float")
    assert train.largest_user_share(m) == (1, 0.8)
    empty = spark.createDataFrame([], "user_idx int, item_idx int, weight float")
    assert train.largest_user_share(empty) == (None, 0.0)
