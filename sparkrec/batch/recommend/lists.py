"""Assembling the published lists: model scores, fills, keys, explanations, exploration slots.

`recommend_all` gives every user with history exactly `n` items whenever `n`
allowed items exist; `with_keys` swaps integer ids for the shop's keys and
says why each item is there; `with_exploration` gives the last slots of a
list to items nobody has seen yet.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from sparkrec.batch.recommend.catalogue import allowed_by, default_meta, strength
from sparkrec.batch.recommend.fallbacks import fallback_rankings, popularity, recent_popularity
from sparkrec.batch.recommend.scoring import candidate_matrix, collect_bounded, score_top_n, with_blend_weight
from sparkrec.core import block, ranker, serving, topk
from sparkrec.core import columns as C
from sparkrec.core.config import RecommendConfig, RulesConfig
from sparkrec.core.errors import StageError
from sparkrec.core.recnames import (
    BECAUSE_IDX,
    BECAUSE_TYPE,
    CAT,
    EXCLUDED,
    EXPLAIN_HISTORY,
    HIST,
    HIST_TYPE,
    OWN_TYPE,
    PRESENT,
    PRIO,
    RK_AGE,
    RK_ITEMS,
    RK_USER,
    TOUCHED,
)

log = logging.getLogger(__name__)

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


def model_version_of(user_factors: DataFrame) -> str:
    """The model the factors came from (one row read). Raises StageError when there are none."""
    first = user_factors.select(C.MODEL_VERSION).first()
    if first is None:
        raise StageError("user_factors is empty: train a model first")
    return first[0]


def user_rows(
    history: DataFrame,
    user_factors: DataFrame | None,
    cfg: RecommendConfig,
    meta: DataFrame,
    users: DataFrame | None = None,
    *,
    every_user: bool = False,
) -> DataFrame:
    """One row per user: everything its list depends on, from one aggregation of its history.

    Args:
        users: (user_idx) to list; default every user in `history`.
        every_user: list every one of `users`, with or without history (the popularity baselines).
    Returns:
        (user_idx, _n_items, _excluded, features (null: no model list)[, _hist, _hist_type][, _touched])
    """
    h = history if users is None else history.join(users.select(C.USER_IDX), C.USER_IDX, "left_semi")
    per_item = h.groupBy(C.USER_IDX, C.ITEM_IDX).agg(
        F.max(strength()).alias("_s"), F.max(C.EVENT_TS).alias("_t"),
        F.max(F.col(C.EVENT_TYPE).isin(cfg.exclude_event_types).cast("int")).alias("_x"),
    )
    aggs = [F.count("*").alias("_n_items"), F.collect_list(F.when(F.col("_x") == 1, F.col(C.ITEM_IDX))).alias(EXCLUDED)]
    if cfg.explain:
        # Strongest, then latest first: the explanation prefers "bought" to "viewed".
        aggs.append(F.slice(F.sort_array(F.collect_list(F.struct("_s", "_t", (-F.col(C.ITEM_IDX)).alias("_i"))), asc=False),
                            1, EXPLAIN_HISTORY).alias("_l"))
    if cfg.fallback == C.SOURCE_CATEGORY_POPULAR:
        per_item = per_item.join(F.broadcast(meta.select(C.ITEM_IDX, CAT)), C.ITEM_IDX, "left")
        aggs.append(F.collect_set(F.when(F.col(CAT) >= 0, F.col(CAT))).alias(TOUCHED))
    per_user = per_item.groupBy(C.USER_IDX).agg(*aggs)
    if every_user and users is not None:
        per_user = users.select(C.USER_IDX).distinct().join(per_user, C.USER_IDX, "left")
    if cfg.explain:
        per_user = per_user.withColumn(HIST, F.transform("_l", lambda x: (-x["_i"]).cast("int"))).withColumn(
            HIST_TYPE, F.transform("_l", lambda x: x["_s"].cast("int"))).drop("_l")
    if user_factors is None:
        return per_user.withColumn(C.FEATURES, F.lit(None).cast("array<float>"))
    factors = user_factors.select(C.USER_IDX, F.col(C.FEATURES).alias("_f"))
    return per_user.join(factors, C.USER_IDX, "left").withColumn(
        C.FEATURES, F.when(F.col("_n_items") >= cfg.min_history, F.col("_f"))).drop("_f")


def fill_sequence(ranking: DataFrame, by_category: bool = False, rename: dict[str, str] | None = None) -> topk.FillSequence:
    """The fallback rankings (item_idx, score, _cat, source, _prio) as one sequence on the driver.

    Bounded by the catalogue (each item at most once per ranking), so it is
    collected and broadcast with the item matrix.
    """
    pdf = ranking.select(C.ITEM_IDX, C.SCORE, CAT, C.REC_SOURCE, PRIO).toPandas()
    names = [(rename or {}).get(s, s) for s in pdf[C.REC_SOURCE]]
    return topk.FillSequence.of(pdf[C.ITEM_IDX].to_numpy(), pdf[C.SCORE].to_numpy(), pdf[CAT].to_numpy(), names,
                                pdf[PRIO].to_numpy(), C.SOURCE_CATEGORY_POPULAR if by_category else None)


def catalogue_of(meta: DataFrame) -> block.Catalogue:
    """The item keys, names and categories for keyed rows (one row per item: bounded, broadcast)."""
    pdf = meta.select(C.ITEM_IDX, C.ITEM_ID, C.ITEM_NAME, C.CATEGORY, CAT).toPandas()
    none = lambda col: pdf[col].astype(object).where(pdf[col].notna(), None).to_numpy()  # noqa: E731
    return block.Catalogue(pdf[C.ITEM_IDX].to_numpy(), pdf[C.ITEM_ID].to_numpy(), none(C.ITEM_NAME), none(C.CATEGORY),
                           pdf[CAT].to_numpy())


def assemble(rows: DataFrame, plan: block.Plan) -> DataFrame:
    """Per-user rows (`user_rows`, plus user_id for keyed output) to lists, in one pass of `block.lists`."""
    spark = rows.sparkSession
    bc = spark.sparkContext.broadcast(plan)

    def run(batches):
        p = bc.value
        topk.set_threads(p.threads)
        for batch in batches:
            yield from block.lists_in_blocks(batch, p)

    wanted = [C.USER_IDX, C.FEATURES, EXCLUDED, HIST, HIST_TYPE, TOUCHED, PRESENT, RK_ITEMS, RK_AGE, RK_USER, C.USER_ID]
    if plan.catalogue is None:
        wanted.remove(C.USER_ID)
    cols = [c for c in wanted if c in rows.columns]
    return rows.select(*cols).mapInPandas(run, block.KEYED_SCHEMA if plan.catalogue is not None else block.INDEXED_SCHEMA)


def recommend_all(
    history: DataFrame,
    user_factors: DataFrame,
    item_factors: DataFrame,
    cfg: RecommendConfig,
    meta: DataFrame | None = None,
    users: DataFrame | None = None,
    *,
    user_ids: DataFrame | None = None,
    baseline: str | None = None,
    return_plan: bool = False,
    ranked: tuple[ranker.Ranker, ranker.ItemStats, DataFrame] | None = None,
) -> DataFrame | tuple[DataFrame, block.Plan]:
    """Exactly `n` items per user with history (whenever `n` allowed items exist), with their source.

    Users with at least `min_history` distinct items and factors get model
    scores; everyone else, and any list cut short by exclusions or rules, is
    filled from the fallback ranking and then from popularity. Scoring,
    filling, keys and explanations happen in one pass over the users
    (`block.lists`); only a catalogue larger than `max_broadcast_items` is
    scored in chunks first.

    Args:
        users: (user_idx) to list; default every user in `history`.
        user_ids: when given, the rows come out as published (`PUBLISHED_COLUMNS`): keyed and explained.
        baseline: the gate baseline these lists stand for; its rows are named after it.
        return_plan: also return the plan the lists were built with (the recommend stage writes it for serving).
        ranked: (ranker, item stats, each customer's ranker inputs as `ranking.user_inputs` gives them): the
            model's part of each list is the ranker's order of its candidates (`core.ranker`).
    Returns:
        (user_idx, item_idx, rank, score, _cat, source, _because_idx, _because_type, _own_type),
        or the published columns with `user_ids`; with `return_plan`, (that, the plan).
    """
    if meta is None:
        meta = default_meta(item_factors, history)
    plan, candidates, blend = bounded_plan(history, item_factors, cfg, meta, keyed=user_ids is not None, baseline=baseline)
    rows = user_rows(history, user_factors, cfg, meta, users)
    if ranked is not None:
        if not plan.whole:
            raise StageError(f"the ranker needs every item in one broadcast: more than recommend.max_broadcast_items="
                             f"{cfg.max_broadcast_items} items have factors (raise it, or set ranker.enabled: false)")
        plan.ranker, plan.stats = ranked[0], ranked[1]
        rows = rows.join(ranked[2], C.USER_IDX, "left")
    if plan.items is None and not plan.whole:
        if cfg.explain:
            log.warning("explanations skipped: more than recommend.max_broadcast_items=%d items", cfg.max_broadcast_items)
        # Read twice below (the queries, then the join with their scores): aggregated once.
        rows = rows.localCheckpoint(eager=True)
        queries = rows.where(F.col(C.FEATURES).isNotNull())
        if blend is not None:
            queries = with_blend_weight(queries, cfg.blend.weight)
        scored = score_top_n(queries, candidates, cfg.n, cap=cfg.rules.max_per_category, max_items=cfg.max_broadcast_items)
        present = scored.groupBy(C.USER_IDX).agg(
            F.collect_list(F.struct(C.RANK, C.ITEM_IDX, C.SCORE, CAT)).alias(PRESENT))
        rows = rows.join(present, C.USER_IDX, "left").drop(HIST, HIST_TYPE)
    if user_ids is not None:
        rows = rows.join(user_ids, C.USER_IDX)
    out = assemble(rows, plan)
    return (out, plan) if return_plan else out


def bounded_plan(
    history: DataFrame,
    item_factors: DataFrame,
    cfg: RecommendConfig,
    meta: DataFrame,
    *,
    keyed: bool,
    baseline: str | None = None,
    factors: topk.ItemMatrix | None = None,
) -> tuple[block.Plan, DataFrame, DataFrame | None]:
    """What every block of users needs, collected to the driver: the candidate matrix, the fallback
    sequence, the explanation matrix and (keyed) the catalogue. The batch stage broadcasts it once; the
    live path keeps it between micro-batches.

    Args:
        factors: `item_factors` already on the driver (the live path keeps them for the fold-in): the
            explanation matrix is built from them instead of collecting the table again.
    Returns:
        (plan, candidates, blend): `plan.whole` is False when the catalogue is larger than
        `max_broadcast_items` (its items then stay None and are scored in chunks from `candidates`).
    """
    n, cap = cfg.n, cfg.rules.max_per_category
    blend = recent_popularity(history, cfg.blend.days) if cfg.blend.weight > 0 else None
    candidates = candidate_matrix(item_factors, meta, blend)
    rename = {C.SOURCE_TRENDING: baseline} if baseline == "recent_popular" else None
    # The bounded parts the workers get are collected side by side: each is a few small Spark
    # jobs whose cost is mostly latency, so running them at once saves seconds on a small cluster.
    parts = {
        "items": lambda: collect_bounded(candidates, True, cfg.max_broadcast_items),
        "seq": lambda: fill_sequence(fallback_rankings(history, meta, cfg.fallback, cfg.trending_days),
                                     cfg.fallback == C.SOURCE_CATEGORY_POPULAR, rename),
    }
    if cfg.explain and factors is None:
        parts["unit"] = lambda: collect_bounded(item_factors, False, cfg.max_broadcast_items)
    if keyed:
        parts["catalogue"] = lambda: catalogue_of(meta)
    with ThreadPoolExecutor(len(parts)) as pool:
        futures = {k: pool.submit(f) for k, f in parts.items()}
        got = {k: f.result() for k, f in futures.items()}
    whole, seq = got["items"], got["seq"]
    threads = int(history.sparkSession.conf.get("spark.task.cpus", "1") or 1)
    plan = block.Plan(n=n, cap=cap, seq=seq, trending_days=cfg.trending_days, threads=threads,
                      blend_weight=float(cfg.blend.weight) if blend is not None else None,
                      catalogue=got.get("catalogue"), whole=whole is not None)
    if whole is not None:
        plan.items = whole if len(whole.item_idx) else None
        m = factors if cfg.explain and factors is not None else got.get("unit")
        if m is not None:
            plan.unit = serving.explain_matrix(m)
    return plan, candidates, blend


def popular_lists(
    history: DataFrame,
    users: DataFrame,
    meta: DataFrame,
    n: int,
    exclude_types: list[str],
    *,
    since: Column | None = None,
    cap: int | None = None,
) -> DataFrame:
    """The most popular allowed items each user has not bought: the cold-start list, and the baseline it is judged by.

    Args:
        users: (user_idx) to list, with or without history.
        since: count only events from this time on ("recently popular").
    Returns:
        (user_idx, item_idx, rank, score, _cat, source, ...) as `recommend_all`.
    """
    source = C.SOURCE_POPULAR if since is None else C.SOURCE_TRENDING
    ranking = popularity(history, meta, since).withColumn(C.REC_SOURCE, F.lit(source)).withColumn(PRIO, F.lit(0))
    cfg = RecommendConfig(n=n, exclude_event_types=exclude_types, explain=False)
    rows = user_rows(history, None, cfg, meta, users, every_user=True)
    return assemble(rows, block.Plan(n=n, cap=cap, seq=fill_sequence(ranking)))


def with_keys(recs: DataFrame, user_ids: DataFrame, meta: DataFrame, trending_days: float) -> DataFrame:
    """Integer rows (`recommend_all` without `user_ids`) with the shop's keys, and why each item is there."""
    cat = recs.sparkSession.sparkContext.broadcast(catalogue_of(meta))

    def run(batches):
        c = cat.value
        for b in batches:
            yield block.keyed(b[C.USER_ID].to_numpy(), b[C.ITEM_IDX].to_numpy(), b[C.RANK].to_numpy(), b[C.SCORE].to_numpy(),
                              b[C.REC_SOURCE].to_numpy(dtype=object), b[BECAUSE_IDX].to_numpy(), b[BECAUSE_TYPE].to_numpy(),
                              b[OWN_TYPE].to_numpy(), c, trending_days)

    cols = [C.USER_ID, C.ITEM_IDX, C.RANK, C.SCORE, C.REC_SOURCE, BECAUSE_IDX, BECAUSE_TYPE, OWN_TYPE]
    return recs.join(user_ids, C.USER_IDX).select(*cols).mapInPandas(run, block.KEYED_SCHEMA)


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
