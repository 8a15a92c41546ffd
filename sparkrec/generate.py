"""A synthetic shop: realistic clickstream with dirt injected at known rates.

Every value is a pure function of (seed, row index, purpose), computed with
`xxhash64` inside Spark, so the output is identical for a seed whatever the
partitioning, and 50 million events are generated as fast as Spark can write.

What it models:
- users with a favourite category (taste clusters) and skewed activity;
- Zipf-like item popularity, globally and within each category;
- a view -> cart -> purchase funnel: each "touch" of a user on an item is
  three consecutive events, going deeper with decreasing probability;
  some purchases come with a rating;
- event type synonyms (`page_view`, `add_to_cart`, `order`) as real logs have;
- dirt: exact duplicate lines, replays of an event id, null/blank ids,
  unknown event types, unparsable and future timestamps, negative quantities,
  malformed JSON lines, and three bot users with absurd activity on one day.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkrec import columns as C

log = logging.getLogger(__name__)

# Injected dirt: share of lines, applied in this order (cumulative thresholds).
DIRT_RATES = {
    "exact_duplicate": 0.010,
    "replay": 0.005,
    "null_user": 0.004,
    "blank_user": 0.003,
    "null_item": 0.003,
    "unknown_event_type": 0.004,
    "unparsable_timestamp": 0.003,
    "future_timestamp": 0.002,
    "negative_quantity": 0.003,
    "malformed_line": 0.002,
}
BOT_USERS = 3
BOT_EVENTS_PER_DAY = 400  # at least; the default clean threshold is 300 a day
SYNONYMS = {C.VIEW: ["view", "page_view"], C.CART: ["cart", "add_to_cart"], C.PURCHASE: ["purchase", "order"]}


@dataclass(frozen=True)
class GenerateParams:
    events: int
    seed: int = 42
    start: date = date(2025, 6, 1)
    days: int = 120

    @property
    def n_users(self) -> int:
        return max(50, self.events // 40)

    @property
    def n_items(self) -> int:
        return min(200_000, max(40, self.events // 100))

    @property
    def n_categories(self) -> int:
        return max(2, min(12, self.n_items // 10))

    @property
    def bot_share(self) -> float:
        return min(0.15, max(0.002, BOT_USERS * BOT_EVENTS_PER_DAY / self.events))


def _u(seed: int, salt: str, idx: Column) -> Column:
    """Uniform [0, 1) from (seed, salt, idx): the generator's only source of randomness."""
    return F.pmod(F.xxhash64(F.lit(seed), F.lit(salt), idx), F.lit(1 << 30)).cast("double") / float(1 << 30)


def _pick(u: Column, options: list[str]) -> Column:
    expr = None
    for i, opt in enumerate(options):
        cond = u < (i + 1) / len(options)
        expr = F.when(cond, F.lit(opt)) if expr is None else expr.when(cond, F.lit(opt))
    assert expr is not None
    return expr.otherwise(F.lit(options[-1]))


def events_frame(spark: SparkSession, p: GenerateParams, partitions: int | None = None) -> DataFrame:
    """The generated event lines as a DataFrame with one string column `value` (JSON)."""
    n_cat = p.n_categories
    per_cat = max(1, p.n_items // n_cat)
    start_s = datetime(p.start.year, p.start.month, p.start.day, tzinfo=timezone.utc).timestamp()
    parts = partitions or max(2, min(400, p.events // 250_000))
    base = spark.range(0, p.events, numPartitions=parts).withColumnRenamed("id", "i")

    dirt_u = _u(p.seed, "dirt", F.col("i"))
    bounds: dict[str, tuple[float, float]] = {}
    acc = 0.0
    for name, rate in DIRT_RATES.items():
        bounds[name] = (acc, acc + rate)
        acc += rate

    def dirt(name: str) -> Column:
        lo, hi = bounds[name]
        return (dirt_u >= lo) & (dirt_u < hi) & (F.col("i") > 0)

    # A duplicate or replay repeats the previous line's event.
    src = F.when(dirt("exact_duplicate") | dirt("replay"), F.col("i") - 1).otherwise(F.col("i"))
    df = base.withColumn("src", src).withColumn("touch", F.floor(F.col("src") / 3)).withColumn("pos", F.col("src") % 3)
    t = F.col("touch")
    user_rank = F.floor(F.pow(_u(p.seed, "user", t), 2.0) * p.n_users).cast("long")
    fav = F.pmod(F.xxhash64(F.lit(p.seed), F.lit("fav"), user_rank), F.lit(n_cat))
    in_cat = _u(p.seed, "incat", t) < 0.75
    k_in = F.least(F.floor(F.pow(F.lit(float(per_cat)), _u(p.seed, "item_c", t))) - 1, F.lit(per_cat - 1))
    r_all = F.least(F.floor(F.pow(F.lit(float(p.n_items)), _u(p.seed, "item_g", t))) - 1, F.lit(p.n_items - 1))
    item = F.when(in_cat, fav + F.lit(n_cat) * k_in).otherwise(r_all).cast("long")
    depth_u = _u(p.seed, "depth", t)
    depth = F.when(depth_u < 0.6, 0).when(depth_u < 0.8, 1).otherwise(2)
    pos = F.col("pos")
    etype = (
        F.when(pos == 0, F.lit(C.VIEW))
        .when((pos == 1) & (depth >= 1), F.lit(C.CART))
        .when((pos == 2) & (depth == 2), F.lit(C.PURCHASE))
        .otherwise(F.lit(C.VIEW))
    )
    rated = (etype == C.PURCHASE) & (_u(p.seed, "rate", t) < 0.15)
    ts_s = (
        F.lit(start_s)
        + _u(p.seed, "ts", t) * (p.days * 86400.0)
        + pos * (30 + F.floor(_u(p.seed, "gap", F.col("src")) * 270))
        + F.when(dirt("replay"), F.lit(5.0)).otherwise(F.lit(0.0))
    )
    df = df.select(
        "i",
        "src",
        F.format_string("e%010d", F.col("src")).alias("event_id"),
        F.format_string("u%07d", user_rank).alias("user_id"),
        F.format_string("i%06d", item).alias("item_id"),
        F.when(rated, F.lit(C.RATING_EVENT)).otherwise(etype).alias("_etype"),
        F.date_format(F.timestamp_seconds(ts_s), "yyyy-MM-dd'T'HH:mm:ss'Z'").alias("timestamp"),
        F.when(rated, F.when(in_cat, 4 + F.floor(_u(p.seed, "stars", t) * 2)).otherwise(1 + F.floor(_u(p.seed, "stars", t) * 4)))
        .cast("int")
        .alias("rating"),
        F.when(etype == C.PURCHASE, 1 + F.floor(_u(p.seed, "qty", t) * 3)).cast("int").alias("quantity"),
        (1 + F.pmod(F.xxhash64(F.lit(p.seed), F.lit("price"), item), F.lit(5000)) / 100.0).alias("price"),
    )
    syn_u = _u(p.seed, "syn", F.col("src"))
    event_type = F.col("_etype")
    for canonical, names in SYNONYMS.items():
        event_type = F.when(F.col("_etype") == canonical, _pick(syn_u, names)).otherwise(event_type)
    # Bots: a few users who view thousands of items on one day.
    is_bot = _u(p.seed, "bot", F.col("src")) < p.bot_share
    bot_day = start_s + 86400.0 * min(10, p.days - 1)
    df = df.select(
        "i",
        "event_id",
        F.when(dirt("null_user"), F.lit(None))
        .when(dirt("blank_user"), F.lit("  "))
        .when(is_bot, F.format_string("bot_%d", F.pmod(F.col("src"), F.lit(BOT_USERS))))
        .otherwise(F.col("user_id"))
        .alias("user_id"),
        F.when(dirt("null_item"), F.lit(None)).otherwise(F.col("item_id")).alias("item_id"),
        F.when(dirt("unknown_event_type"), F.lit("hover"))
        .when(is_bot, F.lit("view"))
        .when(dirt("negative_quantity"), F.lit("purchase"))
        .otherwise(event_type)
        .alias("event_type"),
        F.when(dirt("unparsable_timestamp"), F.lit("not-a-date"))
        .when(dirt("future_timestamp"), F.lit("2099-01-01T00:00:00Z"))
        .when(
            is_bot,
            F.date_format(
                F.timestamp_seconds(F.lit(bot_day) + _u(p.seed, "bot_ts", F.col("src")) * 86000.0),
                "yyyy-MM-dd'T'HH:mm:ss'Z'",
            ),
        )
        .otherwise(F.col("timestamp"))
        .alias("timestamp"),
        F.when(is_bot, F.lit(None)).otherwise(F.col("rating")).alias("rating"),
        F.when(dirt("negative_quantity"), F.lit(-2)).when(is_bot, F.lit(None)).otherwise(F.col("quantity")).alias("quantity"),
        F.col("price"),
    )
    line = F.to_json(F.struct("event_id", "user_id", "item_id", "event_type", "timestamp", "rating", "quantity", "price"))
    return df.select(
        F.when(dirt("malformed_line"), F.concat(F.substring(line, 1, 25), F.lit(" <truncated"))).otherwise(line).alias("value")
    )


def items_frame(spark: SparkSession, p: GenerateParams) -> DataFrame:
    n_cat = p.n_categories
    i = F.col("id")
    return spark.range(0, p.n_items, numPartitions=1).select(
        F.format_string("i%06d", i).alias("item_id"),
        F.format_string("cat_%02d", F.pmod(i, F.lit(n_cat))).alias("category"),
        F.format_string("%.2f", 1 + F.pmod(F.xxhash64(F.lit(p.seed), F.lit("price"), i), F.lit(5000)) / 100.0).alias("price"),
        F.when(_u(p.seed, "avail", i) < 0.95, F.lit("true")).otherwise(F.lit("false")).alias("available"),
    )


def generate(spark: SparkSession, p: GenerateParams, out: str) -> dict[str, object]:
    """Write `events/` (JSON lines), `items/` (CSV) and `manifest.json` under `out`.

    Example:
        generate(spark, GenerateParams(events=100_000, seed=7), "data/generated")
    """
    if p.events < 1:
        raise ValueError("events must be at least 1")
    out = out.rstrip("/")
    log.info("generating %s events for %s users and %s items into %s", f"{p.events:,}", f"{p.n_users:,}", f"{p.n_items:,}", out)
    events_frame(spark, p).write.mode("overwrite").text(f"{out}/events")
    items_frame(spark, p).write.mode("overwrite").option("header", "true").csv(f"{out}/items")
    manifest = {
        "params": {**asdict(p), "start": p.start.isoformat()},
        "users": p.n_users,
        "items": p.n_items,
        "categories": p.n_categories,
        "dirt_rates": DIRT_RATES,
        "bot_users": BOT_USERS,
        "bot_share": p.bot_share,
    }
    spark.createDataFrame([(json.dumps(manifest, indent=2),)], "value string").coalesce(1).write.mode("overwrite").text(
        f"{out}/manifest"
    )
    return manifest
