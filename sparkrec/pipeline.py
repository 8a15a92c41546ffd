"""The stages: read through `io`, transform with the pure modules, write through `io`.

Each stage runs inside `RunContext.stage`, which records it in `runs` with
the Delta versions it read and wrote, whether it succeeded or failed.
"""

from __future__ import annotations

import logging
from pyspark import StorageLevel
from pyspark.sql import functions as F

from sparkrec import clean, evaluate, ids, ingest, io, recommend, train, tune
from sparkrec import columns as C
from sparkrec.errors import GateError, StageError
from sparkrec.runs import RunContext

log = logging.getLogger(__name__)

STAGES = ("ingest", "clean", "ids", "train", "recommend")
# `sparkrec run`: evaluation (and its gate) comes before training, so a model
# that loses leaves the published factors and recommendations untouched.
RUN_STAGES = ("ingest", "clean", "ids", "tune", "evaluate", "train", "recommend")


def run_ingest(ctx: RunContext) -> None:
    """Raw input -> `events_raw` (insert-only by row key), item file -> `items`."""
    spark, cfg = ctx.spark, ctx.cfg
    with ctx.stage("ingest") as rec:
        raw = io.read_source(spark, cfg.source)
        selected = raw
        if cfg.interval.enabled:
            event_time, _ = clean.event_time(raw, cfg.source)
            selected = raw.where(ingest.in_interval(event_time, cfg.interval.start, cfg.interval.end))
            rec.details["interval"] = [cfg.interval.start.isoformat(), cfg.interval.end.isoformat()]
        rows = ingest.with_lineage(selected, ctx.run_id)
        result = io.merge_new_rows(
            rows, cfg, C.EVENTS_RAW, on=[C.RAW_KEY], properties=ingest.RAW_TABLE_PROPERTIES, evolve_schema=True
        )
        # Delta counted the source while writing; count again only when nothing was committed.
        in_scope = result.source_rows if result.source_rows is not None else selected.count()
        rec.rows_in = raw.count() if cfg.interval.enabled else in_scope
        rec.rows_out = result.inserted
        rec.outputs[cfg.table_name(C.EVENTS_RAW)] = result.version
        rec.details["already_ingested"] = in_scope - rec.rows_out
        if cfg.interval.enabled:  # not lost: they belong to another interval's run
            rec.details["outside_interval"] = rec.rows_in - in_scope
        rec.details["source"] = cfg.source.path
        items = io.read_items_source(spark, cfg.items)
        if items is not None:
            rec.outputs[cfg.table_name(C.ITEMS)] = io.overwrite_table(clean.normalize_items(items), cfg, C.ITEMS)


def run_clean(ctx: RunContext) -> dict[str, int]:
    """`events_raw` -> `interactions` + `quarantine`, with an exact ledger.

    The whole raw table is reclassified each run and both outputs replaced,
    so a re-run on the same input gives the same tables.
    """
    spark, cfg = ctx.spark, ctx.cfg
    with ctx.stage("clean") as rec:
        raw = io.read_table(spark, cfg, C.EVENTS_RAW)
        assert raw is not None
        rec.inputs[cfg.table_name(C.EVENTS_RAW)] = raw.version
        # Persisted before bot detection, which reads it twice; the outcome on
        # top is a cheap broadcast join, recomputed by each write from the cache.
        deduped = clean.deduplicated(raw.df, cfg.source, cfg.clean, ctx.now).persist(StorageLevel.MEMORY_AND_DISK)
        classified = clean.finish(deduped, cfg.clean)
        try:
            counts = clean.ledger(classified).collect()
            v = rec.outputs[cfg.table_name(C.INTERACTIONS)] = io.overwrite_table(
                clean.interactions_of(classified), cfg, C.INTERACTIONS, properties=clean.INTERACTIONS_PROPERTIES
            )
            written_kept = io.commit_metrics(spark, cfg.table_path(C.INTERACTIONS), v).get("numOutputRows")
            v = rec.outputs[cfg.table_name(C.QUARANTINE)] = io.overwrite_table(
                clean.quarantine_of(classified, ctx.run_id), cfg, C.QUARANTINE
            )
            written_q = io.commit_metrics(spark, cfg.table_path(C.QUARANTINE), v).get("numOutputRows")
            if cfg.items.path is None:  # no item file: derive items from what was kept, still cached
                items = clean.items_from_interactions(clean.interactions_of(classified))
                rec.outputs[cfg.table_name(C.ITEMS)] = io.overwrite_table(items, cfg, C.ITEMS)
        finally:
            deduped.unpersist()
        by_outcome: dict[str, int] = {}
        reasons: dict[str, int] = {}
        dup_kinds: dict[str, int] = {}
        for row in counts:
            by_outcome[row[clean.OUTCOME]] = by_outcome.get(row[clean.OUTCOME], 0) + row["count"]
            if row[C.REASON]:
                reasons[row[C.REASON]] = reasons.get(row[C.REASON], 0) + row["count"]
            if row[clean.OUTCOME] == clean.DUPLICATED:
                dup_kinds[row[clean.DUPLICATE]] = dup_kinds.get(row[clean.DUPLICATE], 0) + row["count"]
        rows_in = raw.df.count()
        kept = by_outcome.get(clean.KEPT, 0)
        quarantined = by_outcome.get(clean.QUARANTINED, 0)
        duplicates = by_outcome.get(clean.DUPLICATED, 0)
        rec.rows_in, rec.rows_out, rec.rows_quarantined, rec.rows_duplicate = rows_in, kept, quarantined, duplicates
        rec.details.update(reasons=reasons, duplicates=dup_kinds)
        if rows_in != kept + quarantined + duplicates or (written_kept, written_q) not in ((kept, quarantined), (None, None)):
            raise StageError(
                f"ledger does not balance: {rows_in:,} rows in, {kept:,} kept ({written_kept} written), "
                f"{quarantined:,} quarantined ({written_q} written), {duplicates:,} duplicates"
            )
        log.info(
            "run %s: ledger %s in = %s kept + %s quarantined + %s duplicates; reasons %s",
            ctx.run_id, f"{rows_in:,}", f"{kept:,}", f"{quarantined:,}", f"{duplicates:,}", reasons,
        )
        return {"rows_in": rows_in, "kept": kept, "quarantined": quarantined, "duplicates": duplicates}


def run_ids(ctx: RunContext) -> None:
    """Extend `user_ids` and `item_ids` with the keys seen for the first time."""
    spark, cfg = ctx.spark, ctx.cfg
    with ctx.stage("ids") as rec:
        inter = io.read_table(spark, cfg, C.INTERACTIONS)
        assert inter is not None
        rec.inputs[cfg.table_name(C.INTERACTIONS)] = inter.version
        new_total = 0
        for key_col, idx_col, table in ((C.USER_ID, C.USER_IDX, C.USER_IDS), (C.ITEM_ID, C.ITEM_IDX, C.ITEM_IDS)):
            existing = io.read_table(spark, cfg, table, required=False)
            if existing is not None:
                rec.inputs[cfg.table_name(table)] = existing.version
            offset = ids.next_id(existing.df, idx_col) if existing else 0
            # new_ids materialised the new keys already: the count and the merge both read that copy.
            fresh = ids.new_ids(inter.df, existing.df if existing else None, key_col, idx_col, offset)
            ids.check_id_space(offset, fresh.count(), cfg.table_name(table))
            result = io.merge_new_rows(fresh, cfg, table, on=[key_col], retry_conflicts=False)
            rec.outputs[cfg.table_name(table)] = result.version
            added = result.inserted
            rec.details[f"new_{table}"] = added
            new_total += added
        rec.rows_in = inter.df.count()
        rec.rows_out = new_total


def run_train(ctx: RunContext) -> str:
    """Interactions -> weighted matrix -> ALS -> `user_factors`, `item_factors`, saved model."""
    spark, cfg = ctx.spark, ctx.cfg
    with ctx.stage("train") as rec:
        inter, uids, iids = (io.read_table(spark, cfg, t) for t in (C.INTERACTIONS, C.USER_IDS, C.ITEM_IDS))
        assert inter is not None and uids is not None and iids is not None
        for t, r in ((C.INTERACTIONS, inter), (C.USER_IDS, uids), (C.ITEM_IDS, iids)):
            rec.inputs[cfg.table_name(t)] = r.version
        reference = None
        if cfg.train.recency_half_life_days is not None:
            reference = inter.df.agg(F.max(C.EVENT_TS)).first()[0]
        ckpt = io.checkpoint_dir(cfg, ctx.run_id)
        spark.sparkContext.setCheckpointDir(ckpt)
        try:
            # ALS needs deterministic input and a checkpoint dir; without the
            # latter it silently ignores checkpointInterval.
            matrix = train.training_matrix(inter.df, uids.df, iids.df, cfg.train, reference).checkpoint(eager=True)
            pairs = matrix.count()
            if pairs == 0:
                raise StageError(
                    "the training matrix is empty: no interaction has a positive weight "
                    f"(train.event_weights = {cfg.train.event_weights})"
                )
            heavy, share = train.largest_user_share(matrix)
            rec.details["largest_user_share"] = round(share, 6)
            if share > train.SKEW_WARN_SHARE:
                who = uids.df.where(F.col(C.USER_IDX) == heavy).select(C.USER_ID).first()
                log.warning("run %s: user %s holds %.1f%% of all training weight (more than %.0f%%): a bot or a test account? "
                            "see clean.bots", ctx.run_id, who[0] if who else heavy, 100 * share, 100 * train.SKEW_WARN_SHARE)
            log.info("run %s: fitting ALS on %s user-item pairs (rank %d, %d iterations)",
                     ctx.run_id, f"{pairs:,}", cfg.train.als.rank, cfg.train.als.max_iter)
            model = train.fit_als(matrix, cfg.train.als)
            # The matrix is one checkpoint; ALS's own (every checkpoint_interval
            # iterations, older ones deleted) are the rest. Recorded as proof
            # that long training cut its lineage.
            rec.details["checkpoints"] = io.checkpointed_rdds(spark, ckpt)
            model_version = ctx.run_id
            model.write().overwrite().save(io.model_path(cfg, model_version))
            users, items = train.factors(model, model_version)
            rec.outputs[cfg.table_name(C.USER_FACTORS)] = io.overwrite_table(users, cfg, C.USER_FACTORS)
            rec.outputs[cfg.table_name(C.ITEM_FACTORS)] = io.overwrite_table(items, cfg, C.ITEM_FACTORS)
        finally:
            io.remove_dir(spark, ckpt)
        rec.rows_in = inter.df.count()
        rec.rows_out = pairs
        rec.details.update(model_version=model_version, model_path=io.model_path(cfg, model_version),
                           als=cfg.train.als.model_dump())
        return model_version


def run_recommend(ctx: RunContext) -> None:
    """Factors + history + rules -> `recommendations` and `similar_items`, each replaced atomically."""
    spark, cfg = ctx.spark, ctx.cfg
    r = cfg.recommend
    with ctx.stage("recommend") as rec:
        reads = {t: io.read_table(spark, cfg, t) for t in
                 (C.INTERACTIONS, C.USER_IDS, C.ITEM_IDS, C.USER_FACTORS, C.ITEM_FACTORS)}
        for t, read in reads.items():
            assert read is not None
            rec.inputs[cfg.table_name(t)] = read.version
        inter, uids, iids, uf, itf = (reads[t].df for t in reads)  # type: ignore[union-attr]
        items_read = io.read_table(spark, cfg, C.ITEMS, required=False)
        items = items_read.df if items_read is not None else None
        if items_read is not None:
            rec.inputs[cfg.table_name(C.ITEMS)] = items_read.version
        first = uf.select(C.MODEL_VERSION).first()
        if first is None:
            raise StageError("user_factors is empty: train a model first")
        model_version = first[0]
        # Read by exclusions, sizes, rankings and explanations: joined once, kept.
        history = recommend.indexed_history(inter, uids, iids).persist(StorageLevel.MEMORY_AND_DISK)
        # One row per item (bounded by the catalogue) and read by five jobs: the
        # candidates, the explanations, similar items and their counts.
        itf = itf.persist(StorageLevel.MEMORY_AND_DISK)
        meta = recommend.item_meta(iids, items, history, r.rules).persist(StorageLevel.MEMORY_AND_DISK)
        stamp = [F.lit(model_version).alias(C.MODEL_VERSION), F.lit(ctx.run_id).alias(C.RUN_ID),
                 F.lit(ctx.now).cast("timestamp").alias(C.GENERATED_AT)]
        try:
            recs = recommend.recommend_all(history, uf, itf, r, meta)
            keyed = recommend.with_keys(recs, uids, meta, r.trending_days).select(
                C.USER_ID, C.ITEM_ID, C.RANK, C.SCORE, C.SOURCE, C.BECAUSE_ITEM_ID, C.EXPLANATION
            )
            if r.exploration_slots and items is not None:
                pool = recommend.exploration_pool(items, history, iids, r.rules, r.max_exploration_items)
                rec.details["exploration_pool"] = len(pool)
                keyed = recommend.with_exploration(keyed, pool, r.n, r.exploration_slots)
            out = keyed.select(*keyed.columns, *stamp)
            # Readers look lists up by user: statistics on user_id let Delta skip files.
            v = rec.outputs[cfg.table_name(C.RECOMMENDATIONS)] = io.overwrite_table(
                out, cfg, C.RECOMMENDATIONS, properties={"delta.dataSkippingStatsColumns": C.USER_ID}
            )
            m = io.commit_metrics(spark, cfg.table_path(C.RECOMMENDATIONS), v)
            rec.rows_out = m.get("numOutputRows")
            if r.similar_items.enabled:
                sim = recommend.similar_items(itf, meta, r.similar_items.k, r.max_broadcast_items)
                ids_ = F.broadcast(meta.select(C.ITEM_IDX, C.ITEM_ID))  # one row per item: bounded
                sim_out = (
                    sim.join(ids_, C.ITEM_IDX)
                    .join(ids_.select(F.col(C.ITEM_IDX).alias("_similar_idx"), F.col(C.ITEM_ID).alias(C.SIMILAR_ITEM_ID)), "_similar_idx")
                    .select(C.ITEM_ID, C.SIMILAR_ITEM_ID, C.RANK, C.SCORE, *stamp)
                )
                v = rec.outputs[cfg.table_name(C.SIMILAR_ITEMS)] = io.overwrite_table(
                    sim_out, cfg, C.SIMILAR_ITEMS, properties={"delta.dataSkippingStatsColumns": C.ITEM_ID}
                )
                rec.details["similar_items_rows"] = io.commit_metrics(spark, cfg.table_path(C.SIMILAR_ITEMS), v).get("numOutputRows")
        finally:
            history.unpersist()
            meta.unpersist()
            itf.unpersist()
        rec.rows_in = inter.count()
        rec.details["model_version"] = model_version


def _read_for_fit(ctx: RunContext, rec) -> tuple:
    spark, cfg = ctx.spark, ctx.cfg
    reads = [io.read_table(spark, cfg, t) for t in (C.INTERACTIONS, C.USER_IDS, C.ITEM_IDS)]
    for t, r in zip((C.INTERACTIONS, C.USER_IDS, C.ITEM_IDS), reads):
        assert r is not None
        rec.inputs[cfg.table_name(t)] = r.version
    return tuple(r.df for r in reads)  # type: ignore[union-attr]


def run_tune(ctx: RunContext) -> None:
    """Search ALS and feedback settings on a validation split of the training period; the winner
    replaces `train` in this run's config, so `evaluate` and `train` use it."""
    spark, cfg = ctx.spark, ctx.cfg
    with ctx.stage("tune") as rec:
        inter, uids, iids = _read_for_fit(ctx, rec)
        training_period = tune.split_of(inter, cfg.evaluate).train  # the test period is never seen
        ckpt = io.checkpoint_dir(cfg, ctx.run_id)
        spark.sparkContext.setCheckpointDir(ckpt)
        try:
            trials, best = tune.run_trials(cfg, training_period, uids, iids)
        finally:
            io.remove_dir(spark, ckpt)
        key = tune.metric_key(cfg.evaluate)
        rec.details["trials"] = [{"trial": t.number, **t.params(), key: t.metric, "seconds": t.seconds} for t in trials]
        rec.details["best"] = {"trial": best.number, **best.params()}
        rec.metrics[f"validation.{key}"] = best.metric or 0.0
        rec.metrics["trials"] = len(trials)
        rec.rows_in = len(trials)
        log.info("run %s: tuning chose trial %d %s (validation %s %.4f)", ctx.run_id, best.number, best.params(), key, best.metric)
        ctx.cfg = cfg.model_copy(update={"train": best.train})


def run_evaluate(ctx: RunContext) -> dict[str, float]:
    """Fit on the training period, list the evaluated users' top k, and judge model and baselines alike.

    Raises:
        GateError: the gate is on and the model does not beat the best baseline by the margin.
    """
    spark, cfg = ctx.spark, ctx.cfg
    ev = cfg.evaluate
    with ctx.stage("evaluate") as rec:
        inter, uids, iids = _read_for_fit(ctx, rec)
        proto = tune.make_protocol(tune.split_of(inter, ev), ev, uids, iids)
        if proto.n_users == 0:
            raise StageError(f"evaluate: the split ({proto.description}) has no evaluated users: no user with training history acted in the test period")
        kmax = max(ev.ks)
        items = io.read_table(spark, cfg, C.ITEMS, required=False)
        categories = None
        if items is not None:
            rec.inputs[cfg.table_name(C.ITEMS)] = items.version
        if items is not None and not items.df.where(F.col(C.CATEGORY).isNotNull()).isEmpty():
            categories = items.df.select(C.ITEM_ID, C.CATEGORY)
        ckpt = io.checkpoint_dir(cfg, ctx.run_id)
        spark.sparkContext.setCheckpointDir(ckpt)
        try:
            reference = proto.train.agg(F.max(C.EVENT_TS)).first()[0]
            matrix = train.training_matrix(proto.train, uids, iids, cfg.train, reference).checkpoint(eager=True)
            lists = {"model": tune.model_lists(proto, matrix, cfg.train, cfg.recommend, kmax)}
            lists.update(tune.baseline_lists(proto, ev, kmax, cfg.recommend.exclude_event_types))
            results = {}
            for name, df in lists.items():
                results[name] = evaluate.ranking_metrics(df, proto.relevant, ev.ks, train=proto.train, categories=categories)
                log.info("run %s: %s: %s", ctx.run_id, name, ", ".join(f"{k} {v:.4f}" for k, v in sorted(results[name].items()) if "@" in k))
        finally:
            proto.release()
            io.remove_dir(spark, ckpt)
        for name, metrics in results.items():
            for k, v in metrics.items():
                rec.metrics[f"{name}.{k}"] = v
        key = tune.metric_key(ev)
        model_score = results["model"][key]
        best_name = max((n for n in results if n != "model"), key=lambda n: results[n][key])
        best_score = results[best_name][key]
        needed = best_score * (1 + ev.gate.margin)
        passed = model_score > needed if best_score > 0 else model_score > 0
        rec.details.update(
            split=proto.description, evaluated_users=proto.n_users, metric=key, best_baseline=best_name,
            gate={"enabled": ev.gate.enabled, "margin": ev.gate.margin, "passed": passed, "needed": needed},
            train=cfg.train.model_dump(),
        )
        rec.rows_in = proto.n_users
        ratio = model_score / best_score if best_score > 0 else float("inf")
        log.info("run %s: model %s %.4f vs best baseline %s %.4f (x%.2f)", ctx.run_id, key, model_score, best_name, best_score, ratio)
        if ev.gate.enabled and not passed:
            raise GateError(
                f"quality gate: model {key} {model_score:.4f} does not beat the best baseline "
                f"({best_name} {best_score:.4f}) by the margin {ev.gate.margin:.0%} (needed > {needed:.4f}); "
                "nothing was published: the previous factors and recommendations stay in place"
            )
        return results["model"]


def run_all(ctx: RunContext, stages: tuple[str, ...] = STAGES) -> None:
    cfg = ctx.cfg
    steps = {
        "ingest": run_ingest, "clean": run_clean, "ids": run_ids, "tune": run_tune, "evaluate": run_evaluate,
        "train": run_train, "recommend": run_recommend,
    }
    for name in stages:
        if name == "tune" and not cfg.tune.enabled and stages == RUN_STAGES:
            continue
        if name == "evaluate" and not cfg.evaluate.enabled and stages == RUN_STAGES:
            continue
        steps[name](ctx)
