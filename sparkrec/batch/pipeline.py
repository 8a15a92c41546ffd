"""The stages, each the data's path: read through the stage record, transform, write through it.

Each stage runs inside `RunContext.stage`, which records it in `runs` with
the Delta versions it read and wrote (noted by `rec.read` / `rec.overwrite` /
`rec.merge_new_rows` themselves), whether it succeeded or failed. The logic
of each step lives in its module (`ingest`, `clean`, `ids`, `train`,
`recommend`, `protocol`, `gate`, `tune`); here it is only put in order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import functions as F

from sparkrec.batch import (
    clean,
    clean_apply,
    forget,
    ids,
    incremental,
    ingest,
    item_table,
    privacy,
    protocol,
    ranking,
    recommend,
    train,
    tune,
)
from sparkrec.core import columns as C
from sparkrec.core import gate, ledger, pseudonyms, search, serving, stages
from sparkrec.core.config import TrainConfig, is_local_path
from sparkrec.core.errors import BaselinePublished, GateError, StageError
from sparkrec.storage import files, merges, registry, runs, sources, tables
from sparkrec.storage.runs import RunContext

log = logging.getLogger(__name__)


def run_ingest(ctx: RunContext) -> None:
    """Raw input -> `events_raw` (insert-only by row key), item file -> `items`."""
    cfg = ctx.cfg
    with ctx.stage("ingest") as rec:
        if cfg.interval.enabled:  # ingest parses event times only to select the interval
            clean.check_timestamp_format(ctx.spark, cfg.source)
        secret = pseudonyms.load_secret(cfg.privacy) if cfg.privacy.pseudonymize_user_ids else None
        existing = tables.table_properties(ctx.spark, cfg, C.EVENTS_RAW)
        raw = privacy.prepare_raw(sources.read_source(ctx.spark, cfg.source), cfg, existing, secret)
        selected = ingest.of_interval(raw, cfg.source, cfg.interval)
        # A table made before the key statistics gets them now; its older files, without any, are always read.
        tables.ensure_properties(ctx.spark, cfg, C.EVENTS_RAW, ingest.KEY_STATS)
        with rec.step("list sources"):
            hashes = [r[0] for r in raw.select(ingest.source_hash(F.col(C.SOURCE_FILE))).distinct().collect()]
        result = rec.merge_new_rows(
            ingest.with_lineage(selected, ctx.run_id), C.EVENTS_RAW, on=[C.RAW_KEY],
            properties=ingest.RAW_TABLE_PROPERTIES, evolve_schema=True, target_where=ingest.key_window(hashes),
        )
        rec.details["sources"] = len(hashes)
        # Delta takes only `delta.*` options as properties at creation: the feed and sparkrec's own mark of
        # what its user keys are go on by an ALTER (the check above runs before every write).
        if tables.ensure_properties(ctx.spark, cfg, C.EVENTS_RAW, {**ingest.CHANGE_FEED, **privacy.raw_table_properties(cfg)}):
            rec.outputs[cfg.table_name(C.EVENTS_RAW)] = tables.current_version(ctx.spark, cfg.table_path(C.EVENTS_RAW))
        # Delta counted the source while writing; count again only when nothing was committed.
        in_scope = result.source_rows if result.source_rows is not None else selected.count()
        rec.rows_in = raw.count() if cfg.interval.enabled else in_scope
        rec.rows_out = result.inserted
        rec.details["already_ingested"] = in_scope - rec.rows_out
        if cfg.interval.enabled:  # not lost: they belong to another interval's run
            rec.details["interval"] = [cfg.interval.start.isoformat(), cfg.interval.end.isoformat()]
            rec.details["outside_interval"] = rec.rows_in - in_scope
        rec.details["source"] = cfg.source.path
        items = sources.read_items_source(ctx.spark, cfg.items)
        if items is not None:
            rec.overwrite(item_table.normalize_items(items), C.ITEMS)


def run_clean(ctx: RunContext) -> ledger.Ledger:
    """`events_raw` -> `interactions` + `quarantine` (+ `user_item_weights`), with an exact ledger.

    Incremental by default: only the rows of events_raw no clean has classified
    are read (Delta's change data feed from the version `clean_state` records),
    and the tables are changed by MERGE to what a full recompute would give.
    A full clean (first run, `--full`, a change of rules) reclassifies
    everything and replaces the tables. The ledger counts the rows this run
    classified: rows in = kept + quarantined + duplicates.
    """
    cfg = ctx.cfg
    with ctx.stage("clean") as rec:
        clean.check_timestamp_format(ctx.spark, cfg.source)
        tables.ensure_properties(ctx.spark, cfg, C.EVENTS_RAW, ingest.CHANGE_FEED)
        tables.ensure_properties(ctx.spark, cfg, C.INTERACTIONS, clean.INTERACTIONS_PROPERTIES)
        tables.ensure_properties(ctx.spark, cfg, C.QUARANTINE, clean.QUARANTINE_PROPERTIES)
        raw_version = tables.read_required(ctx.spark, cfg, C.EVENTS_RAW).version
        state = clean_apply.read_state(rec)
        h = cfg.train.recency_half_life_days
        operations = None
        if (state is not None and state.done_version is not None and state.pending_version is None
                and not state.full_pending and raw_version > state.done_version and not cfg.clean.full):
            operations = tables.operations_between(ctx.spark, cfg, C.EVENTS_RAW, state.done_version, raw_version)
        plan = incremental.plan(state, raw_version, cfg.clean.full, incremental.state_rules(cfg), h, operations)
        if plan.mode == "incremental":
            try:
                new_rows = rec.read_inserts(C.EVENTS_RAW, plan.after_version, plan.to_version)
            except StageError as exc:
                log.warning("run %s: %s; classifying all of events_raw instead", ctx.run_id, exc)
                plan = incremental.Plan("full", f"the change feed does not cover the new versions ({exc})", None, raw_version)
        rec.details["mode"] = plan.mode
        rec.details["why"] = plan.reason
        log.info("run %s: clean is %s: %s", ctx.run_id, plan.mode, plan.reason)
        if plan.mode == "full":
            tally = clean_apply.clean_full(ctx, rec, state, plan.to_version)
        elif plan.mode == "none":
            tally = ledger.Ledger(0, 0, 0, 0)
            rec.details["read_versions"] = []
        else:
            if plan.mode == "incremental":
                tally = clean_apply.save_batch(ctx, rec, new_rows, plan)
            else:
                tally = ledger.Ledger(**json.loads(state.pending_ledger)) if state and state.pending_ledger else ledger.Ledger(0, 0, 0, 0)
            resume = plan.mode == "resume"
            clean_apply.apply_batch(ctx, rec, plan, state.pending_run if resume and state else ctx.run_id, first=not resume)
        rec.rows_in, rec.rows_out = tally.rows_in, tally.kept
        rec.rows_quarantined, rec.rows_duplicate = tally.quarantined, tally.duplicates
        rec.details.update(reasons=tally.reasons, duplicates=tally.duplicate_kinds)
        log.info(
            "run %s: ledger %s in = %s kept + %s quarantined + %s duplicates; reasons %s",
            ctx.run_id, f"{tally.rows_in:,}", f"{tally.kept:,}", f"{tally.quarantined:,}", f"{tally.duplicates:,}",
            tally.reasons,
        )
        return tally


def run_ids(ctx: RunContext) -> None:
    """Extend `user_ids` and `item_ids` with the keys seen for the first time."""
    cfg = ctx.cfg
    with ctx.stage("ids") as rec:
        current = tables.read_required(ctx.spark, cfg, C.INTERACTIONS).version
        last = registry.last_input_version(ctx.spark, cfg, "ids", C.INTERACTIONS)
        have_ids = all(tables.table_exists(ctx.spark, cfg.table_path(t)) for t in (C.USER_IDS, C.ITEM_IDS))
        inter = None
        if have_ids and last is not None and last <= current:
            try:  # only the keys of rows added since the last ids run can be new
                inter = rec.read_inserts(C.INTERACTIONS, last, current) if last < current else rec.read_at(C.INTERACTIONS, current).limit(0)
                # Read now: a vacuum (`sparkrec forget`) may have removed the change files, which only a read finds.
                inter = inter.select(C.USER_ID, C.ITEM_ID).localCheckpoint()
                rec.details["read_versions"] = [last + 1, current]
            except Exception as exc:  # noqa: BLE001 - any failure to read the feed: the whole table gives the same ids
                inter = None
                log.info("run %s: ids reads all of interactions: %s", ctx.run_id, str(exc).strip().splitlines()[0][:300])
        if inter is None:
            inter = rec.read_at(C.INTERACTIONS, current)
            rec.details["read_versions"] = [0, current]
        inter = inter.select(C.USER_ID, C.ITEM_ID)
        new_total = 0
        for key_col, idx_col, table in ((C.USER_ID, C.USER_IDX, C.USER_IDS), (C.ITEM_ID, C.ITEM_IDX, C.ITEM_IDS)):
            existing = rec.read_optional(table)
            offset = ids.next_id(existing, idx_col) if existing is not None else 0
            # new_ids materialised the new keys already: the count and the merge both read that copy.
            fresh = ids.new_ids(inter, existing, key_col, idx_col, offset)
            ids.check_id_space(offset, fresh.count(), ctx.cfg.table_name(table))
            # statistics on the index only: never a user key in the table's log (see `sparkrec forget`)
            added = rec.merge_new_rows(fresh, table, on=[key_col], retry_conflicts=False,
                                       properties={"delta.dataSkippingStatsColumns": idx_col}).inserted
            rec.details[f"new_{table}"] = added
            new_total += added
        rec.rows_in = inter.count()
        rec.rows_out = new_total


def run_train(ctx: RunContext, settings: TrainConfig | None = None) -> str:
    """Interactions -> weighted matrix -> ALS -> `user_factors`, `item_factors`, saved model.

    Args:
        settings: the feedback and ALS settings to train with (a tuning winner); default `cfg.train`.
    """
    cfg = ctx.cfg
    settings = settings or cfg.train
    with ctx.stage("train") as rec:
        inter, uids, iids = rec.read(C.INTERACTIONS), rec.read(C.USER_IDS), rec.read(C.ITEM_IDS)
        reference = train.decay_reference(inter, settings)
        weights, why = _weight_table(ctx, rec, settings)
        rec.details["matrix_from"] = C.WEIGHTS if weights is not None else C.INTERACTIONS
        with ctx.checkpoints() as ckpt:
            # ALS needs deterministic input and a checkpoint dir; without the
            # latter it silently ignores checkpointInterval.
            if weights is not None:
                matrix = train.matrix_from_weights(weights, uids, iids, settings, reference)
            else:
                log.info("run %s: the training matrix is aggregated from every interaction: %s", ctx.run_id, why)
                matrix = train.training_matrix(inter, uids, iids, settings, reference)
            matrix = matrix.checkpoint(eager=True)
            pairs = train.require_pairs(matrix.count(), settings)
            heavy, share = train.largest_user_share(matrix)
            rec.details["largest_user_share"] = round(share, 6)
            if share > train.SKEW_WARN_SHARE:
                train.warn_skew(uids, heavy, share, ctx.run_id)
            log.info("run %s: fitting ALS on %s user-item pairs (rank %d, %d iterations)",
                     ctx.run_id, f"{pairs:,}", settings.als.rank, settings.als.max_iter)
            model = train.fit_als(matrix, settings.als)
            # The matrix is one checkpoint; ALS's own (every checkpoint_interval
            # iterations, older ones deleted) are the rest. Recorded as proof
            # that long training cut its lineage.
            rec.details["checkpoints"] = ctx.checkpointed_rdds(ckpt)
            model_version = ctx.run_id
            ctx.save_model(model, model_version)
            users, items = train.factors(model, model_version)
            rec.overwrite(users, C.USER_FACTORS)
            rec.overwrite(items, C.ITEM_FACTORS)
        rec.rows_in = inter.count()
        rec.rows_out = pairs
        # What the live path's fold-in needs to solve a customer's factor as this model would have:
        # the feedback and ALS settings (a tuning winner may differ from the config) and the decay reference.
        rec.details.update(model_version=model_version, model_path=ctx.model_path(model_version),
                           als=settings.als.model_dump(), train=settings.model_dump(mode="json"),
                           decay_reference=None if reference is None else reference.isoformat())
        return model_version


def _weight_table(ctx: RunContext, rec, settings: TrainConfig):
    """(`user_item_weights`, None) when it holds this training's matrix, else (None, why not)."""
    state_df = rec.read_optional(C.CLEAN_STATE)
    row = state_df.first() if state_df is not None else None
    if row is None:
        return None, "no clean_state (the warehouse was cleaned by an earlier sparkrec)"
    state = incremental.CleanState.of_row(row)
    if state.pending_version is not None or state.full_pending:
        return None, "the last clean did not finish (the next clean completes it)"
    why = train.weights_usable(settings, state.half_life_days)
    if why is not None:
        return None, why
    return rec.read(C.WEIGHTS), None


def run_recommend(ctx: RunContext, baseline: str | None = None, blend_weight: float | None = None) -> None:
    """Factors + history + rules -> `recommendations` and `similar_items`, each replaced atomically.

    Args:
        baseline: publish this baseline's lists (`gate.PUBLISHABLE`) instead of the model's: no factors are
            read, every user is listed from the baseline ranking with the same rules, and no similar items are written.
    """
    cfg = ctx.cfg
    r = cfg.recommend if blend_weight is None else tune.with_blend(cfg.recommend, blend_weight)
    with ctx.stage("recommend") as rec:
        inter, uids, iids = rec.read(C.INTERACTIONS), rec.read(C.USER_IDS), rec.read(C.ITEM_IDS)
        items = rec.read_optional(C.ITEMS)
        if baseline is not None:
            uf, itf = recommend.no_factors(ctx.spark), recommend.no_factors(ctx.spark, C.ITEM_IDX)
            r = recommend.as_baseline(r, baseline, cfg.evaluate.recent_days)
            model_version = f"baseline:{baseline}"
            rec.details["baseline"] = baseline
        else:
            uf, itf = rec.read(C.USER_FACTORS), rec.read(C.ITEM_FACTORS)
            model_version = recommend.model_version_of(uf)
        chosen = chosen_ranker(ctx) if baseline is None else None
        if chosen is not None:
            r = ranking.list_settings(r)  # the ranker weighs popularity itself: no blend
            rec.details["ranker"] = chosen[1]
        # Read by the per-user rows, the rankings and the blend: joined once, kept.
        history = recommend.indexed_history(inter, uids, iids).persist(StorageLevel.MEMORY_AND_DISK)
        # One row per item (bounded by the catalogue) and read by several jobs: the
        # candidates, the explanations, similar items and their counts.
        itf = itf.persist(StorageLevel.MEMORY_AND_DISK)
        meta = recommend.item_meta(iids, items, history, r.rules).persist(StorageLevel.MEMORY_AND_DISK)
        stamp = [F.lit(model_version).alias(C.MODEL_VERSION), F.lit(ctx.run_id).alias(C.RUN_ID),
                 F.lit(ctx.now).cast("timestamp").alias(C.GENERATED_AT)]
        try:
            # Scored, filled, keyed and explained in one pass over the users: the table as published.
            ranked, served_ranker = None, None
            if chosen is not None:
                with rec.step("ranker inputs"):
                    priced = ranking.priced_history(inter, uids, iids)
                    reference = inter.agg(F.max(C.EVENT_TS)).first()[0]
                    ranked = (chosen[0], ranking.item_stats(priced, reference, cfg.ranker),
                              ranking.user_inputs(priced, reference))
                    # What the server needs besides the plan to rank a customer who acts as these lists were ranked.
                    served_ranker = {"path": chosen[1], "reference": reference.isoformat()}
            keyed, plan = recommend.recommend_all(history, uf, itf, r, meta, user_ids=uids, baseline=baseline,
                                                  return_plan=True, ranked=ranked)
            if r.exploration_slots and items is not None:
                pool = recommend.exploration_pool(items, history, iids, r.rules, r.max_exploration_items)
                rec.details["exploration_pool"] = len(pool)
                keyed = recommend.with_exploration(keyed, pool, r.n, r.exploration_slots)
            # No statistics on the user key: a Delta log keeps them after the rows are gone, and
            # `sparkrec forget` must leave no key behind (a lookup by user reads the table's user column).
            rec.overwrite(keyed.select(*keyed.columns, *stamp), C.RECOMMENDATIONS,
                          properties={"delta.dataSkippingStatsColumns": C.RANK})
            rec.rows_out = rec.rows_written(C.RECOMMENDATIONS)
            # Every user with history is listed: when Delta wrote users x n rows no list is short, and
            # the written table need not be read again (the users come from the cached history).
            users = history.select(C.USER_IDX).distinct().count()
            if rec.rows_out == users * r.n:
                lengths = {"users": users, "short": 0, "shortest": r.n if users else 0}
            else:
                lengths = recommend.list_lengths(rec.read_output(C.RECOMMENDATIONS), r.n)
            rec.details["list_lengths"] = lengths
            if lengths["short"]:
                log.warning("run %s: %s of %s users have fewer than recommend.n=%d items (shortest %d): the shop's "
                            "rules, exclusions and catalogue allow no more for them", ctx.run_id, f"{lengths['short']:,}",
                            f"{lengths['users']:,}", r.n, lengths["shortest"])
            if r.similar_items.enabled and baseline is None:
                sim = recommend.similar_items(itf, meta, r.similar_items.k, r.max_broadcast_items)
                rec.overwrite(recommend.with_item_keys(sim, meta).select("*", *stamp), C.SIMILAR_ITEMS,
                              properties={"delta.dataSkippingStatsColumns": C.ITEM_ID})
                rec.details["similar_items_rows"] = rec.rows_written(C.SIMILAR_ITEMS)
            # What search ranks by: one row per catalogue item (bounded), only when search is on.
            searched = (recommend.item_popularity(history, meta, cfg.search.recent_days).toPandas()
                        if cfg.search.enabled else None)
            write_serving(ctx, rec, plan, model_version, stamp, searched, served_ranker)
        finally:
            history.unpersist()
            meta.unpersist()
            itf.unpersist()
        rec.rows_in = inter.count()
        rec.details["model_version"] = model_version


def write_serving(ctx: RunContext, rec, plan, model_version: str, stamp: list, searched=None,
                  served_ranker: dict | None = None) -> None:
    """The plan the lists were built with, to `serving_items`, and its scalars to this stage's record:
    `sparkrec serve` rebuilds the very same plan from them (`core.serving`) to list a customer who acts.
    With `searched` (`item_popularity`), also what search ranks by, and the search index of the items shown.
    With `served_ranker` (the ranker's directory and the time its inputs describe), the item statistics it
    ranked with go into `serving_items` too."""
    cfg = ctx.cfg
    frame = serving.plan_rows(plan, searched)
    if searched is not None and cfg.search.enabled:
        rec.details["search_index"] = write_search_index(cfg, frame)
    rows = tables.frame_from_pandas(ctx.spark, frame, serving.SERVING_SCHEMA)
    rec.overwrite(rows.select("*", *stamp), C.SERVING_ITEMS)
    settings = serving.plan_settings(plan)
    trained = {} if model_version.startswith("baseline:") else registry.train_record(ctx.spark, cfg, model_version) or {}
    settings.update(train=trained.get("train"), decay_reference=trained.get("decay_reference"),
                    exploration_slots=cfg.recommend.exploration_slots)
    if settings.get("ranker") and served_ranker:
        settings["ranker"].update(served_ranker)
    rec.details["serving"] = settings


def write_search_index(cfg, frame) -> dict:
    """The search index of the catalogue items the rules allow, as a version under `search_root` (reused when
    nothing in it changed). tantivy writes local files: a remote warehouse needs `search.index_dir`."""
    root = cfg.search_root
    if not is_local_path(root):
        why = (f"search index not written: {root} is not a local path (tantivy writes files); set search.index_dir "
               "to a local or mounted directory the server can read, or search.enabled: false")
        log.warning(why)
        return {"skipped": why}
    shown = frame[frame[serving.SHOWN].fillna(False).astype(bool)]
    docs = pd.DataFrame({"item_idx": shown[C.ITEM_IDX].astype("int64"), "item_id": shown[C.ITEM_ID],
                         "name": shown[C.ITEM_NAME], "category": shown[C.CATEGORY]})
    return search.build(root.removeprefix("file://"), docs, cfg.search).record()


def run_tune(ctx: RunContext, reuse: bool = False, ranker_after: bool = False) -> tune.Tuned:
    """Search ALS and feedback settings on a validation split of the training period.

    Args:
        ranker_after: the evaluation after it trains the ranker: the search's time budget covers that
            training too (the last evaluation's figure, or an estimate from the trials).
        reuse: take the winner of an earlier tuning of the same search younger than
            `tune.reuse_days` instead of searching (what `run` does; `sparkrec tune` always searches).
    Returns:
        The winning settings; `run_stages` hands them to `evaluate`, `train` and `recommend`.
    """
    cfg = ctx.cfg
    key = gate.metric_key(cfg.evaluate)
    with ctx.stage("tune") as rec:
        rec.details["search_key"] = cfg.search_key()
        earlier = registry.reusable_tuning(ctx.spark, cfg, cfg.tune.reuse_days) if reuse and cfg.tune.reuse_days else None
        if earlier is not None:
            found = earlier["details"]
            rec.details.update(reused_from=earlier["run_id"], best=found.get("best"), train=found["train"],
                               blend_weight=found.get("blend_weight", 0.0))
            rec.metrics.update(earlier["metrics"])
            rec.rows_in = 0
            log.info("run %s: reusing the settings tuned by run %s (%s; tune.reuse_days=%g)", ctx.run_id,
                     earlier["run_id"], earlier["finished_at"], cfg.tune.reuse_days)
            return tune.Tuned(TrainConfig.model_validate(found["train"]), float(found.get("blend_weight", 0.0)))
        inter, uids, iids = rec.read(C.INTERACTIONS), rec.read(C.USER_IDS), rec.read(C.ITEM_IDS)
        training_period = protocol.split_of(inter, cfg.evaluate).train  # the test period is never seen
        with ctx.checkpoints():
            try:
                reserve = _ranker_seconds(ctx) if ranker_after else 0.0
                trials, best = tune.run_trials(cfg, training_period, uids, iids, ranker_seconds=reserve)
            except tune.TooLittleData as exc:
                if not reuse:
                    raise
                # Inside `run` a shop with a short history still gets its lists, from the configured settings.
                log.warning("run %s: %s; keeping the configured settings", ctx.run_id, exc)
                rec.details.update(skipped=str(exc), train=cfg.train.model_dump(mode="json"),
                                   blend_weight=cfg.recommend.blend.weight)
                rec.rows_in = 0
                return tune.Tuned(cfg.train, cfg.recommend.blend.weight)
        rec.details["trials"] = [
            {"trial": t.number, **t.params(), key: t.metric, "seconds": t.seconds,
             "blends": {str(w): m for w, m in t.blends.items()}} for t in trials
        ]
        rec.details["best"] = {"trial": best.number, **best.params()}
        rec.details["train"] = best.train.model_dump(mode="json")
        rec.details["blend_weight"] = best.blend_weight
        rec.metrics[f"validation.{key}"] = best.metric or 0.0
        rec.metrics["trials"] = len(trials)
        rec.rows_in = len(trials)
        log.info("run %s: tuning chose trial %d %s (validation %s %.4f)", ctx.run_id, best.number, best.params(), key, best.metric)
        return best.tuned


def _ranker_seconds(ctx: RunContext) -> float | None:
    """What the last evaluation's ranker training took, or None (never measured in this warehouse)."""
    found = registry.latest_details(ctx.spark, ctx.cfg, "evaluate") or {}
    took = (found.get("steps") or {}).get("ranker training")
    return float(took) if took else None


def run_evaluate(ctx: RunContext, settings: TrainConfig | None = None, blend_weight: float | None = None) -> gate.Decision:
    """Fit on the training period, list the evaluated users' top k, judge model and baselines alike, and decide
    what the run publishes (`gate.decide`).

    Raises:
        GateError: the model lost and nothing is to be published (`evaluate.gate.on_fail`).
    """
    cfg = ctx.cfg
    ev, settings = cfg.evaluate, settings or cfg.train
    with ctx.stage("evaluate") as rec:
        inter, uids, iids = rec.read(C.INTERACTIONS), rec.read(C.USER_IDS), rec.read(C.ITEM_IDS)
        categories = protocol.categories_of(rec.read_optional(C.ITEMS))
        proto = protocol.make_protocol(protocol.split_of(inter, ev), ev, uids, iids, cfg.recommend.exclude_event_types)
        trained = None
        try:
            if proto.n_users == 0:
                raise StageError(f"evaluate: the split ({proto.description}) has no evaluated users: "
                                 + protocol.why_no_users(inter, proto, ev))
            with ctx.checkpoints():
                rec_cfg = cfg.recommend if blend_weight is None else tune.with_blend(cfg.recommend, blend_weight)
                lists, factors = protocol.all_lists_and_factors(proto, uids, iids, settings, rec_cfg, ev)
                results = protocol.measure(lists, proto, ev, categories)
                if cfg.ranker.enabled:
                    trained = _evaluate_ranker(ctx, rec, proto, factors, settings, rec_cfg, categories)
                    if trained is not None:
                        results["ranked"] = trained[2]
        finally:
            proto.release()
        for name, metrics in results.items():
            log.info("run %s: %s: %s", ctx.run_id, name, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if "@" in k))
            for k, v in metrics.items():
                rec.metrics[f"{name}.{k}"] = v
        key = gate.metric_key(ev)
        chosen = gate.contender(results, key)
        verdict = gate.verdict(results, key, ev.gate.margin, chosen)
        rec.details["lists"] = chosen
        if trained is not None:
            model, info, _ = trained
            info["chosen"] = chosen == "ranked"
            if chosen == "ranked":
                info["path"] = files.ranker_path(cfg, ctx.run_id)
                files.write_text(ctx.spark, f"{info['path']}/{files.RANKER_FILE}", model.model)
            rec.details["ranker"] = info
            log.info("run %s: ranked lists %s %.4f against ALS's %.4f: %s", ctx.run_id, key, results["ranked"][key],
                     results["model"][key], "the ranker is kept" if chosen == "ranked" else "ALS's own lists are kept")
        published_before = tables.current_version(ctx.spark, cfg.table_path(C.RECOMMENDATIONS)) is not None
        decision = gate.decide(verdict, results, ev.gate.enabled, ev.gate.on_fail, published_before)
        rec.details.update(
            split=proto.description, evaluated_users=proto.n_users, metric=verdict.metric, best_baseline=verdict.best_baseline,
            gate={"enabled": ev.gate.enabled, "margin": ev.gate.margin, "passed": verdict.passed, "needed": verdict.needed,
                  "on_fail": ev.gate.on_fail, "publish": decision.publish, "baseline": decision.baseline,
                  "reason": decision.reason},
            train=settings.model_dump(),
        )
        rec.rows_in = proto.n_users
        log.info("run %s: %s %s %.4f vs best baseline %s %.4f (x%.2f)", ctx.run_id, chosen, verdict.metric,
                 verdict.model_score, verdict.best_baseline, verdict.best_score, verdict.ratio)
        if decision.publish == "nothing":
            raise GateError(
                f"quality gate: model {verdict.metric} {verdict.model_score:.4f} does not beat the best baseline "
                f"({verdict.best_baseline} {verdict.best_score:.4f}) by the margin {ev.gate.margin:.0%} "
                f"(needed > {verdict.needed:.4f}); nothing was published: the previous factors and recommendations stay in place"
            )
        if decision.publish == "baseline":
            log.warning("run %s: %s: publishing the %s baseline's lists instead of the model's", ctx.run_id,
                        decision.reason, decision.baseline)
        return decision


def _evaluate_ranker(ctx: RunContext, rec, proto, factors, settings: TrainConfig, rec_cfg, categories):
    """Train the ranker on the evaluation's training period, measure its lists beside the others', and train
    the one a shop gets: the same, with the evaluation's own cut as its newest.

    The judged ranker learns from cuts before the evaluation's cut, so the test period stays unseen. The
    published one is the same recipe on fresher data, as the train stage refits ALS on everything after
    evaluate judged it: its newest cut is the evaluation's own (the factors evaluate already fitted, the
    test period's new purchases as labels), its older ones the judged ranker's newer ones. It costs one
    candidate pass and a LightGBM fit, not another ALS fit.

    Returns:
        (the ranker to publish, what the training did, the judged ranker's metrics), or None when there was
        nothing to learn from (logged).
    """
    cfg, rk = ctx.cfg, ctx.cfg.ranker
    threads = ranking.driver_threads(ctx.spark)
    with rec.step("ranker training"):
        try:
            frames, found = ranking.cut_frames(proto.train, proto.user_ids, proto.item_ids, settings, rec_cfg, rk,
                                               cfg.evaluate)
            judged, info = ranking.fit_frames(frames, rk, threads)
        except ValueError as exc:
            log.warning("run %s: no ranker: %s", ctx.run_id, exc)
            rec.details["ranker"] = {"skipped": str(exc)}
            return None
    info["cuts"] = [c.at.isoformat() for c in found]
    with rec.step("ranked lists"):
        # The items' inputs at the split's cut, read by the ranked lists and by the newest training frame.
        stats = ranking.item_stats(ranking.priced_history(proto.train, proto.user_ids, proto.item_ids),
                                   protocol.ranking_reference(proto), rk)
        lists = protocol.ranked_lists(proto, factors, judged, rec_cfg, rk, max(cfg.evaluate.ks), stats)
        measured = protocol.measure({"ranked": lists}, proto, cfg.evaluate, categories)["ranked"]
    published = judged
    if proto.cutoff is not None:
        with rec.step("ranker to publish"):
            positives = ranking.indexed_pairs(proto.relevant, proto.user_ids, proto.item_ids)
            newest = ranking.labelled_frame(proto.train, proto.user_ids, proto.item_ids, positives, factors,
                                            proto.cutoff, rec_cfg, rk, group_offset=0, stats=stats)
            try:
                published, fresh = ranking.fit_frames([newest, *frames[:-1]], rk, threads)
                info["published"] = {"cuts": [proto.cutoff.isoformat(), *info["cuts"][:-1]], "rounds": fresh["rounds"],
                                     "gains": fresh["gains"]}
            except ValueError as exc:
                log.warning("run %s: the ranker is published as judged: %s", ctx.run_id, exc)
    return published, info, measured


def chosen_ranker(ctx: RunContext):
    """The ranker the latest evaluation chose, or None (it chose ALS's own lists, the ranker is off, or none ran)."""
    if not ctx.cfg.ranker.enabled:
        return None
    found = registry.latest_details(ctx.spark, ctx.cfg, "evaluate") or {}
    info = found.get("ranker") or {}
    if found.get("lists") != "ranked" or found.get("gate", {}).get("publish") != "model" or not info.get("path"):
        return None
    found = ranking.read_ranker(ctx.spark, ctx.cfg, info["path"])
    if found is None:
        log.warning("run %s: the ranker the last evaluation chose is missing (%s): ALS's own lists are published",
                    ctx.run_id, info["path"])
        return None
    return found, info["path"]


def run_forget(ctx: RunContext, keys: list[str]) -> dict:
    """Erase customers (`keys` as the shop knows them) from every table and model, then purge the history.

    Each table is changed by a MERGE that deletes its matching rows, so a re-run after a crash or a
    conflict finishes the job and a second request changes nothing. The derived items are recomputed
    first, while the customers' rows still say which items they touched. The purge needs the warehouse
    to itself (VACUUM without retention would delete files a running writer has not committed yet):
    when another stage is running, the rows are deleted, `purged` is false, and the command says to
    run it again.

    Returns:
        The erasure's record: rows deleted per table, model factors removed, purged or not.
    """
    cfg, spark = ctx.cfg, ctx.spark
    with ctx.stage("forget") as rec:
        secret = pseudonyms.load_secret(cfg.privacy) if cfg.privacy.pseudonymize_user_ids else None
        stored = forget.stored_keys(cfg, keys, secret)
        users = spark.createDataFrame([(k,) for k in stored], f"{C.USER_ID} string")
        state = clean_apply.read_state(rec)
        if state is not None and (state.pending_version is not None or state.full_pending):
            raise StageError("a clean did not finish (see `sparkrec runs`): run `sparkrec clean` first, then forget again")
        raw = tables.read_table(spark, cfg, C.EVENTS_RAW, required=False)
        raw_before = raw.version if raw is not None else None
        raw_keys = (forget.raw_keys_of(raw.df, users, cfg.source) if raw is not None
                    else spark.createDataFrame([], f"{C.RAW_KEY} string")).localCheckpoint()
        deleted: dict[str, int] = {}
        with rec.step("items"):
            clean_apply.forget_items(ctx, rec, users, raw_before)
        uids = rec.read_optional(C.USER_IDS)
        idx = (uids.join(F.broadcast(users), C.USER_ID, "left_semi").select(C.USER_IDX) if uids is not None
               else spark.createDataFrame([], f"{C.USER_IDX} int")).localCheckpoint()
        with rec.step("delete rows"):
            for key, source, on in ((C.EVENTS_RAW, raw_keys, [C.RAW_KEY]), (C.QUARANTINE, raw_keys, [C.RAW_KEY]),
                                    *[(k, users, [C.USER_ID]) for k in forget.BY_USER], (C.USER_FACTORS, idx, [C.USER_IDX])):
                deleted[cfg.table_name(key)] = merges.delete_matching(spark, cfg, key, source, on)
        with rec.step("models"):
            factors = sum(files.drop_model_users(spark, path, idx) for path in files.model_dirs(spark, cfg))
        # Rows that no clean has classified yet stay classifiable by the next clean's change feed only if the
        # purge leaves those versions' files; when the clean was up to date it simply moves past the erasure.
        raw_after = tables.current_version(spark, cfg.table_path(C.EVENTS_RAW)) if raw is not None else None
        if state is not None and state.done_version == raw_before and raw_after != raw_before:
            clean_apply.write_state(ctx, rec, incremental.CleanState(**{**state.__dict__, "done_version": raw_after}))
        files.remove_dir(spark, files.scratch_path(cfg, clean_apply.WORK))  # the last batch's saved changes
        others = [m for m in runs.active_stages(spark, cfg) if m["run_id"] != ctx.run_id and not m["dead"]]
        purged = not others
        note = None
        if purged:
            with rec.step("purge history"):
                for key in forget.HOLDS_CUSTOMERS:
                    tables.purge_history(spark, cfg, key)
        else:
            busy = ", ".join(sorted({f"{m['stage']} of run {m['run_id']}" for m in others}))
            note = f"not purged: {busy} was running; run forget again when it has finished"
            log.warning("run %s: the rows are deleted but older table versions still hold them: %s", ctx.run_id, note)
        row = forget.erasure_row(ctx.run_id, ctx.now, stored, deleted, factors, purged, note)
        rec.append(spark.createDataFrame([row], forget.ERASURES_SCHEMA), C.ERASURES)
        rec.rows_in = len(stored)
        rec.rows_out = sum(deleted.values())
        rec.details.update(users=len(stored), rows_deleted=deleted, model_factors_deleted=factors, purged=purged, note=note)
        return rec.details


def run_command(ctx: RunContext, command: str) -> tune.Tuned:
    """Run a CLI command's stages (`stages.COMMANDS`; for `run`, tune and evaluate when enabled).

    Returns:
        The settings the run ended with (the tuning winner when `tune` ran).
    """
    enabled = {"tune": ctx.cfg.tune.enabled, "evaluate": ctx.cfg.evaluate.enabled}
    return run_stages(ctx, stages.stages_of(command, enabled), reuse_tuning=command == "run")


def run_stages(ctx: RunContext, names: Sequence[str] = stages.CORE, *, reuse_tuning: bool = False) -> tune.Tuned:
    """Run the named stages in order; a tuning winner is used by the stages after it.

    Args:
        reuse_tuning: let `tune` reuse a recent winner of the same search (`tune.reuse_days`).
    """
    settings = tune.Tuned(ctx.cfg.train, ctx.cfg.recommend.blend.weight)
    for name in names:
        if name == "ingest":
            run_ingest(ctx)
        elif name == "clean":
            run_clean(ctx)
        elif name == "ids":
            run_ids(ctx)
        elif name == "tune":
            settings = run_tune(ctx, reuse=reuse_tuning,
                                ranker_after="evaluate" in names and ctx.cfg.ranker.enabled)
        elif name == "evaluate":
            decision = run_evaluate(ctx, settings.train, settings.blend_weight)
            if decision.publish == "baseline":
                # The model lost on a warehouse that must not be left with nothing: the best baseline's
                # lists, under the same rules, are published instead, and the run stops (no training).
                run_recommend(ctx, baseline=decision.baseline)
                raise BaselinePublished(
                    f"published the {decision.baseline} baseline's lists instead of the model's: {decision.reason} "
                    "(evaluate.gate.on_fail; `sparkrec runs` and the report show it)"
                )
        elif name == "train":
            run_train(ctx, settings.train)
        elif name == "recommend":
            run_recommend(ctx, blend_weight=settings.blend_weight)
        else:
            raise StageError(f"unknown stage {name!r}; stages are {', '.join(stages.PIPELINE)}")
    return settings
