"""Assembling the published lists: model scores, fills, keys, explanations, exploration slots.

`recommend_all` gives every user with history exactly `n` items whenever `n`
allowed items exist; `with_keys` swaps integer ids for the shop's keys and
says why each item is there; `with_exploration` gives the last slots of a
list to items nobody has seen yet.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from sparkrec import columns as C
from sparkrec.config import RecommendConfig, RulesConfig
from sparkrec.errors import StageError
from sparkrec.recommend.catalogue import allowed_by, default_meta, exclusions, history_lists, history_sizes
from sparkrec.recommend.fallbacks import category_candidates, fallback_rankings, fill_lists, recent_popularity
from sparkrec.recommend.names import BECAUSE_IDX, BECAUSE_NAME, BECAUSE_TYPE, CAT, EXCLUDED, HAVE, OWN_TYPE, REMINDERS, VERBS
from sparkrec.recommend.scoring import candidate_matrix, score_top_n, with_blend_weight

# The published table's columns before the run's stamp (model_version, run_id, generated_at).
PUBLISHED_COLUMNS = (C.USER_ID, C.ITEM_ID, C.RANK, C.SCORE, C.REC_SOURCE, C.BECAUSE_ITEM_ID, C.EXPLANATION)


def list_lengths(recs: DataFrame, n: int) -> dict[str, int]:
    """Users listed, users with fewer than `n` items, and the shortest list (one aggregate row)."""
    per_user = recs.groupBy(C.USER_ID).agg(F.count("*").alias("_len"))
    row = per_user.agg(
        F.count("*").alias("users"),
        F.sum(F.when(F.col("_len") < n, 1).otherwise(0)).alias("short"),
        F.min("_len").alias("shortest"),
    ).first()
    return {"users": int(row["users"] or 0), "short": int(row["short"] or 0), "shortest": int(row["shortest"] or 0)}


def no_factors(spark, idx: str = C.USER_IDX) -> DataFrame:
    """An empty factor table: with it `recommend_all` lists every user from the fallback rankings."""
    return spark.createDataFrame([], f"{idx} int, {C.FEATURES} array<float>")


def as_baseline(cfg: RecommendConfig, baseline: str, recent_days: float) -> RecommendConfig:
    """The recommend settings that build a gate baseline's lists (the same rules, exclusions and N).

    `recent_popular` is the trending fallback over the evaluation's `recent_days`, backfilled
    from overall popularity; `popular` is overall popularity.
    """
    strategy = C.SOURCE_TRENDING if baseline == "recent_popular" else C.SOURCE_POPULAR
    return cfg.model_copy(update={"fallback": strategy, "trending_days": recent_days, "explain": False,
                                  "min_history": 1})


def named_as_baseline(recs: DataFrame, baseline: str) -> DataFrame:
    """Rows of a published baseline say so: the trending fallback that builds `recent_popular` is named after it."""
    if baseline != "recent_popular":
        return recs
    src = F.col(C.REC_SOURCE)
    return recs.withColumn(C.REC_SOURCE, F.when(src == C.SOURCE_TRENDING, F.lit(baseline)).otherwise(src))


def model_version_of(user_factors: DataFrame) -> str:
    """The model the factors came from (one row read). Raises StageError when there are none."""
    first = user_factors.select(C.MODEL_VERSION).first()
    if first is None:
        raise StageError("user_factors is empty: train a model first")
    return first[0]


def recommend_all(
    history: DataFrame,
    user_factors: DataFrame,
    item_factors: DataFrame,
    cfg: RecommendConfig,
    meta: DataFrame | None = None,
    users: DataFrame | None = None,
) -> DataFrame:
    """Exactly `n` items per user with history (whenever `n` allowed items exist), with their source.

    Users with at least `min_history` distinct items and factors get model
    scores; everyone else, and any list cut short by exclusions or rules, is
    filled from the fallback ranking and then from popularity.

    Args:
        users: (user_idx) to list; default every user in `history`.
    Returns:
        (user_idx, item_idx, rank, score, _cat, source, _because_idx)
    """
    if meta is None:
        meta = default_meta(item_factors, history)
    n, cap = cfg.n, cfg.rules.max_per_category
    excluded = exclusions(history, cfg.exclude_event_types)
    sizes = history_sizes(history)
    if users is not None:  # only these users' lists (evaluation); rankings still use all history
        sizes = sizes.join(users.select(C.USER_IDX), C.USER_IDX, "left_semi")
    warm = sizes.where(F.col("_n_items") >= cfg.min_history).select(C.USER_IDX)
    per_user_ex = excluded.groupBy(C.USER_IDX).agg(F.collect_list(C.ITEM_IDX).alias(EXCLUDED))
    queries = user_factors.select(C.USER_IDX, C.FEATURES).join(warm, C.USER_IDX).join(per_user_ex, C.USER_IDX, "left")
    blend = None
    if cfg.blend.weight > 0:  # a hybrid list: model score + weight x recent popularity, one exact top-k
        blend = recent_popularity(history, cfg.blend.days)
        queries = with_blend_weight(queries, cfg.blend.weight)
    if cfg.explain:
        queries = queries.join(history_lists(history), C.USER_IDX, "left")
    # Scored once and kept: the lists are read three times below, and the
    # scoring is the expensive part.
    als = (
        score_top_n(
            queries,
            candidate_matrix(item_factors, meta, blend),
            n,
            cap=cap,
            max_items=cfg.max_broadcast_items,
            explain_items=item_factors if cfg.explain else None,
        )
        .withColumn(C.REC_SOURCE, F.lit(C.SOURCE_ALS))
        .localCheckpoint(eager=True)
    )
    have = als.groupBy(C.USER_IDX).agg(F.count("*").alias(HAVE))
    short = (
        sizes.select(C.USER_IDX)
        .join(have, C.USER_IDX, "left")
        .select(C.USER_IDX, F.coalesce(F.col(HAVE), F.lit(0)).alias(HAVE))
        .where(F.col(HAVE) < n)
        .localCheckpoint(eager=True)
    )
    present = als.select(C.USER_IDX, C.ITEM_IDX, CAT)
    if short.isEmpty():  # every list is full: no ranking to build, nothing to fill
        return als
    ranking = fallback_rankings(history, meta, cfg.fallback, cfg.trending_days)
    per_user = None
    if cfg.fallback == C.SOURCE_CATEGORY_POPULAR:
        # A user skips at most the items it may not get before its n-th valid
        # one of a category, so each category's top (n + the most any short
        # user may not get) is enough.
        gone = excluded.unionByName(present.select(C.USER_IDX, C.ITEM_IDX)).join(short.select(C.USER_IDX), C.USER_IDX, "left_semi")
        max_gone = gone.groupBy(C.USER_IDX).count().agg(F.max("count")).first()[0] or 0
        per_user = category_candidates(history, meta, ranking, n + int(max_gone))
    filled = fill_lists(short, present, excluded, ranking, n, cap, per_user=per_user)
    return als.unionByName(filled.select(*filled.columns, *[F.lit(-1).alias(c) for c in (BECAUSE_IDX, BECAUSE_TYPE, OWN_TYPE)]))


def with_keys(recs: DataFrame, user_ids: DataFrame, meta: DataFrame, trending_days: float) -> DataFrame:
    """Swap integer ids back for the shop's keys and say why each item is there."""
    # The catalogue is bounded (one row per item) and broadcast; users are not.
    because = F.broadcast(meta.select(F.col(C.ITEM_IDX).alias(BECAUSE_IDX), F.col(C.ITEM_ID).alias(C.BECAUSE_ITEM_ID),
                                      F.col(C.ITEM_NAME).alias(BECAUSE_NAME)))
    out = (
        recs.join(F.broadcast(meta.select(C.ITEM_IDX, C.ITEM_ID, C.CATEGORY)), C.ITEM_IDX)
        .join(because, BECAUSE_IDX, "left")
        .join(user_ids, C.USER_IDX)
    )
    # An item from the user's own history is a reminder: it says so, and names no "because" item.
    reminder = (F.col(C.REC_SOURCE) == C.SOURCE_ALS) & (F.col(OWN_TYPE) >= 0)
    return out.withColumn(C.EXPLANATION, explanation(trending_days)).withColumn(
        C.BECAUSE_ITEM_ID, F.when(reminder, F.lit(None).cast("string")).otherwise(F.col(C.BECAUSE_ITEM_ID))
    )


def explanation(trending_days: float) -> Column:
    """Why an item is in a list, from its source, the user's own event on it, and the explaining item."""
    src = F.col(C.REC_SOURCE)
    verb = F.lit(None).cast("string")
    for strength, text in VERBS.items():
        verb = F.when(F.col(BECAUSE_TYPE) == strength, F.lit(text)).otherwise(verb)
    remind = F.lit(None).cast("string")
    for strength, text in REMINDERS.items():
        remind = F.when(F.col(OWN_TYPE) == strength, F.lit(text)).otherwise(remind)
    days = f"{trending_days:g}"
    return (
        F.when((src == C.SOURCE_ALS) & (F.col(OWN_TYPE) >= 0), remind)
        .when((src == C.SOURCE_ALS) & F.col(C.BECAUSE_ITEM_ID).isNotNull(),
              F.concat(F.lit("because you "), verb, F.lit(" "), F.coalesce(F.col(BECAUSE_NAME), F.col(C.BECAUSE_ITEM_ID))))
        .when(src == C.SOURCE_ALS, F.lit("matches your tastes"))
        .when(src == C.SOURCE_TRENDING, F.lit(f"trending in the last {days} days"))
        .when(src == "recent_popular", F.lit(f"popular in the last {days} days"))
        .when((src == C.SOURCE_CATEGORY_POPULAR) & F.col(C.CATEGORY).isNotNull(), F.concat(F.lit("popular in "), F.col(C.CATEGORY)))
        .when(src == C.SOURCE_EXPLORATION, F.lit("new in the shop"))
        .otherwise(F.lit("popular with other shoppers"))
    )


def exploration_pool(items: DataFrame, history: DataFrame, item_ids: DataFrame, rules: RulesConfig, limit: int) -> list[str]:
    """Allowed items nobody has interacted with (so no list can hold them), up to `limit`, by a stable hash."""
    seen = history.select(C.ITEM_IDX).distinct().join(item_ids, C.ITEM_IDX).select(C.ITEM_ID)
    pool = items.join(seen, C.ITEM_ID, "left_anti")
    rows = pool.where(allowed_by(rules)).orderBy(F.xxhash64(C.ITEM_ID), C.ITEM_ID).limit(limit).select(C.ITEM_ID).collect()
    return [r[0] for r in rows]


def with_exploration(recs: DataFrame, pool: list[str], n: int, slots: int) -> DataFrame:
    """Give each list's last `slots` places to items without factors, spread over users by hash.

    Args:
        recs: keyed recommendations (user_id, item_id, rank, ...).
    """
    slots = min(slots, len(pool))
    if slots == 0:
        return recs
    keep = recs.where(F.col(C.RANK) <= n - slots)
    users = recs.select(C.USER_ID).distinct()
    arr = F.array(*[F.lit(x) for x in pool])
    start = F.pmod(F.xxhash64(C.USER_ID), F.lit(len(pool)))
    explore = users.select(C.USER_ID, F.explode(F.sequence(F.lit(0), F.lit(slots - 1))).alias("_j")).select(
        C.USER_ID,
        F.element_at(arr, (F.pmod(start + F.col("_j"), F.lit(len(pool))) + 1).cast("int")).alias(C.ITEM_ID),
        (F.lit(n - slots + 1) + F.col("_j")).cast("int").alias(C.RANK),
        F.lit(None).cast("float").alias(C.SCORE),
        F.lit(C.SOURCE_EXPLORATION).alias(C.REC_SOURCE),
        F.lit(None).cast("string").alias(C.BECAUSE_ITEM_ID),
        F.lit("new in the shop").alias(C.EXPLANATION),
    )
    cols = explore.columns
    merged = keep.select(*cols).unionByName(explore)
    # A list shorter than n - slots would leave a gap: ranks are renumbered 1..len.
    w = Window.partitionBy(C.USER_ID).orderBy(C.RANK, C.ITEM_ID)
    return merged.withColumn(C.RANK, F.row_number().over(w).cast("int"))
