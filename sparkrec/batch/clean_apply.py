"""The clean stage's writes: a full reclassification, or an incremental batch computed, saved and applied.

`pipeline.run_clean` decides which (`incremental.plan`); this module does it.
A batch is saved under `_work/clean/` before any table is touched, then applied
by MERGEs of absolute rows (or run-stamped sums), so a crash between the two is
finished by the next clean applying the same batch again, changing nothing
already applied. `clean_state` moves past a batch only once every table has it.
"""

from __future__ import annotations

import json

from pyspark import StorageLevel
from pyspark.sql import Column
from pyspark.sql import functions as F

from sparkrec.batch import clean, incremental, item_table, joins, train
from sparkrec.core import columns as C
from sparkrec.core import ledger
from sparkrec.core.errors import StageError
from sparkrec.storage import files, registry
from sparkrec.storage.runs import RunContext


def read_state(rec) -> incremental.CleanState | None:
    """Where the clean stands (`clean_state`'s one row, read once), or None before the first clean."""
    state_df = rec.read_optional(C.CLEAN_STATE)
    row = state_df.first() if state_df is not None else None
    return incremental.CleanState.of_row(row) if row is not None else None


def write_state(ctx: RunContext, rec, state: incremental.CleanState) -> None:
    df = ctx.spark.createDataFrame([state.row(ctx.run_id, ctx.now)], incremental.STATE_SCHEMA)
    rec.overwrite(df.coalesce(1), C.CLEAN_STATE)


def clean_full(ctx: RunContext, rec, state: incremental.CleanState | None, raw_version: int) -> ledger.Ledger:
    """Reclassify all of events_raw and replace every table of the clean, its state included."""
    cfg = ctx.cfg
    h = cfg.train.recency_half_life_days
    base = state or incremental.CleanState()
    write_state(ctx, rec, incremental.CleanState(**{**base.__dict__, "full_pending": True, "pending_from": None,
                                                     "pending_version": None, "pending_run": None, "pending_ledger": None}))
    raw = rec.read_at(C.EVENTS_RAW, raw_version)
    rec.details["read_versions"] = [0, raw_version]
    # Persisted before bot detection, which reads it twice; the outcome on
    # top is a cheap broadcast join, recomputed by each write from the cache.
    deduped = clean.deduplicated(raw, cfg.source, cfg.clean, ctx.now).persist(StorageLevel.MEMORY_AND_DISK)
    classified = clean.finish(deduped, cfg.clean)
    try:
        tally = ledger.tally(raw.count(), clean.ledger_rows(clean.ledger(classified).collect()))
        if not ctx.live:
            ledger.guard(tally, registry.previous_kept_share(ctx.spark, cfg), cfg.clean.min_kept_ratio,
                         cfg.table_name(C.INTERACTIONS))
        kept = clean.interactions_of(classified)
        rec.overwrite(kept, C.INTERACTIONS, properties=clean.INTERACTIONS_PROPERTIES)
        written_kept = rec.rows_written(C.INTERACTIONS)
        rec.overwrite(clean.quarantine_of(classified, ctx.run_id), C.QUARANTINE, properties=clean.QUARANTINE_PROPERTIES)
        written_quarantined = rec.rows_written(C.QUARANTINE)
        survivors = clean.survivors_of(classified)
        props = incremental.state_properties
        rec.overwrite(survivors, C.CLEAN_SURVIVORS, properties=props(C.CLEAN_SURVIVORS))
        rec.overwrite(clean.user_days_of(rec.read_output(C.CLEAN_SURVIVORS)), C.CLEAN_USER_DAYS, properties=props(C.CLEAN_USER_DAYS))
        weights = train.weight_sums(rec.read_output(C.INTERACTIONS), h).withColumn(C.RUN_ID, F.lit(ctx.run_id))
        rec.overwrite(weights, C.WEIGHTS, properties=props(C.WEIGHTS))
        if cfg.items.path is None:  # no item file: derive items from what was kept, still cached
            rec.overwrite(item_table.item_latest(clean.kept_with_names(classified)), C.CLEAN_ITEM_LATEST, properties=props(C.CLEAN_ITEM_LATEST))
            rec.overwrite(item_table.items_of_latest(rec.read_output(C.CLEAN_ITEM_LATEST)), C.ITEMS)
    finally:
        deduped.unpersist()
    ledger.check(tally, written_kept, written_quarantined)
    write_state(ctx, rec, incremental.CleanState(done_version=raw_version, half_life_days=h, rules=incremental.state_rules(cfg)))
    return tally


WORK = "clean"  # the saved batch: _work/clean/<part> (a forget removes it)
_FEW_ROWS = 200_000  # rows whose keys a batch may broadcast (a few megabytes)
_DROP_KEYS_MAX = 100_000  # dropped rows a first application names in its MERGE condition (more: the time window only)


def save_batch(ctx: RunContext, rec, new_rows, plan: incremental.Plan) -> ledger.Ledger:
    """Classify the new rows against the clean's state and save every table's changes (not applied yet)."""
    cfg, spark = ctx.cfg, ctx.spark
    h = cfg.train.recency_half_life_days
    rec.details["read_versions"] = [plan.after_version + 1, plan.to_version]
    survivors = rec.read_optional(C.CLEAN_SURVIVORS)
    with rec.step("read new rows"):
        small = new_rows.count() <= joins.BROADCAST_KEYS_MAX
    # Judged once and kept: the demoted rows, the bot counts and the outcomes all read it. The per-day counts
    # are persisted before the verdicts, outcomes and changed days are computed from them, so Spark reuses them.
    judged = incremental.judge_batch(new_rows, survivors, cfg.source, cfg.clean, ctx.now, small=small).persist(StorageLevel.MEMORY_AND_DISK)
    batch = incremental.finish_batch(judged, rec.read_optional(C.CLEAN_USER_DAYS), cfg.clean)
    with rec.step("judge against survivors"):
        demoted = batch.demoted.localCheckpoint()
    with rec.step("bot counts"):
        counts = batch.counts.persist(StorageLevel.MEMORY_AND_DISK)
        counts.count()
        flags = batch.flags
    rows = batch.rows.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        with rec.step("classify"):
            tally = ledger.tally(rows.count(), clean.ledger_rows(clean.ledger(rows).collect()))
        if not ctx.live:
            ledger.guard(tally, registry.previous_kept_share(spark, cfg), cfg.clean.min_kept_ratio, cfg.table_name(C.INTERACTIONS))
        # Users whose bot verdict changed: their earlier surviving rows move between the two tables.
        with rec.step("bot verdicts"):
            flips = incremental.flipped(flags).localCheckpoint()
            moved = None
            if survivors is not None and flips.count():
                moves = incremental.earlier_rows_of(survivors, flips, demoted)
                raw_all = rec.read_at(C.EVENTS_RAW, plan.to_version)
                moved = incremental.reclassified(raw_all, moves, cfg.source).localCheckpoint()
        columns = clean.INTERACTION_COLUMNS + [clean.ITEM_NAME_COLUMN]
        adds = incremental.kept(rows).select(*columns)
        q_adds = incremental.with_raw_record(incremental.quarantined(rows), new_rows, cfg.source, few=tally.quarantined <= _FEW_ROWS)
        with rec.step("rows that leave"):
            demoted_human = demoted.where(~F.coalesce(F.col("was_bot"), F.lit(False)))
            drops_kept = None
            if demoted_human.count():
                inter = rec.read(C.INTERACTIONS)
                lo, hi = demoted_human.agg(F.min(C.EVENT_TS), F.max(C.EVENT_TS)).first()
                drops_kept = (inter.where(F.col(C.EVENT_TS).between(lo, hi))
                              .join(demoted_human.select(C.RAW_KEY), C.RAW_KEY, "left_semi").select(*clean.INTERACTION_COLUMNS))
            q_drops = demoted.where(F.coalesce(F.col("was_bot"), F.lit(False))).select(C.RAW_KEY)
            if moved is not None:
                moved_in = moved.where(~F.col("bot_after"))
                moved_out = moved.where(F.col("bot_after"))
                adds = adds.unionByName(moved_in.select(*columns))
                q_adds = q_adds.unionByName(moved_out, allowMissingColumns=True)
                q_drops = q_drops.unionByName(moved_in.select(C.RAW_KEY))
                out_rows = moved_out.select(*clean.INTERACTION_COLUMNS)
                drops_kept = out_rows if drops_kept is None else drops_kept.unionByName(out_rows)
            if drops_kept is None:
                drops_kept = adds.limit(0).select(*clean.INTERACTION_COLUMNS)
            drops_kept = drops_kept.localCheckpoint()
            adds = adds.localCheckpoint()
        inter_changes = incremental.interaction_changes(adds, drops_kept)
        quarantine = clean.quarantine_of(q_adds.withColumn(clean.OUTCOME, F.lit(ledger.QUARANTINED)), ctx.run_id)
        q_changes = quarantine.withColumn(C.DROP_FLAG, F.lit(False)).unionByName(
            q_drops.select(C.RAW_KEY, F.lit(True).alias(C.DROP_FLAG)), allowMissingColumns=True)
        saved = {
            "interactions": inter_changes,
            "quarantine": q_changes,
            "survivors": incremental.new_survivors(rows).withColumn(C.DROP_FLAG, F.lit(False)),
            "user_days": batch.user_days.withColumn(C.DROP_FLAG, F.col(C.EVENTS) <= 0),
            "weights": train.weight_deltas(train.weight_sums(adds, h), train.weight_sums(drops_kept, h), ctx.run_id),
        }
        if cfg.items.path is None:
            saved["item_latest"] = item_changes(ctx, rec, adds, drops_kept, plan).withColumn(C.DROP_FLAG, F.col(C.EVENTS) <= 0)
        for part, df in saved.items():
            with rec.step(f"save {part}"):
                files.write_scratch(df, cfg, f"{WORK}/{part}")
        expected = {"adds": adds.count(), "drops": drops_kept.count(), "demoted": demoted.count(),
                    "moved": 0 if moved is None else moved.count(),
                    "quarantine_adds": tally.quarantined + (0 if moved is None else moved_out.count()),
                    "quarantine_drops": q_drops.count()}
        rec.details["changes"] = expected
    finally:
        rows.unpersist()
        counts.unpersist()
        judged.unpersist()
    state = incremental.CleanState(
        done_version=plan.after_version, pending_from=plan.after_version, pending_version=plan.to_version,
        pending_run=ctx.run_id, pending_ledger=json.dumps({**tally.as_dict(), "reasons": tally.reasons,
                                                          "duplicate_kinds": tally.duplicate_kinds}),
        half_life_days=h, rules=incremental.state_rules(cfg),
    )
    write_state(ctx, rec, state)
    return tally


def item_changes(ctx: RunContext, rec, adds, drops, plan: incremental.Plan):
    """`clean_item_latest` rows for the items a batch touched. An item whose newest price or name came from a
    row that left `interactions` is recomputed from its remaining rows (their names from events_raw): rare,
    as it takes a demoted or moved row that was the item's newest."""
    merged = incremental.merged_item_latest(
        rec.read_optional(C.CLEAN_ITEM_LATEST), item_table.item_latest(adds), drops.select(C.ITEM_ID, C.RAW_KEY)
    ).localCheckpoint()
    stale = merged.where(F.col(incremental.STALE) & (F.col(C.EVENTS) > 0)).select(C.ITEM_ID).localCheckpoint()
    merged = merged.drop(incremental.STALE)
    if not stale.count():
        return merged
    remaining = (
        rec.read(C.INTERACTIONS).join(F.broadcast(stale), C.ITEM_ID, "left_semi")
        .join(drops.select(C.RAW_KEY), C.RAW_KEY, "left_anti").select(*clean.INTERACTION_COLUMNS)
    ).localCheckpoint()
    if ctx.cfg.source.columns.item_name:  # names are in the raw rows only
        # A few keys are broadcast, so events_raw is filtered as it is read instead of shuffled whole.
        keys = remaining.select(C.RAW_KEY)
        keys = F.broadcast(keys) if remaining.count() <= _FEW_ROWS else keys
        named = (
            clean.normalize(rec.read_at(C.EVENTS_RAW, plan.to_version).join(keys, C.RAW_KEY, "left_semi"),
                            ctx.cfg.source)
            .select(C.RAW_KEY, clean.ITEM_NAME_COLUMN)
        )
        remaining = remaining.join(named, C.RAW_KEY, "left")
    else:
        remaining = remaining.withColumn(clean.ITEM_NAME_COLUMN, F.lit(None).cast("string"))
    rows = remaining.unionByName(adds.join(F.broadcast(stale), C.ITEM_ID, "left_semi"))
    redone = item_table.item_latest(rows)
    return merged.join(stale, C.ITEM_ID, "left_anti").unionByName(redone)


def apply_batch(ctx: RunContext, rec, plan: incremental.Plan, batch_run: str, first: bool) -> None:
    """Apply a saved batch to every table, then move `clean_state` past it. A crash in between is finished by
    the next clean, which applies the same batch again (`first` False): every change is then a MERGE of
    absolute rows keyed by the table's key, so what was applied already changes nothing.

    Args:
        first: this run computed the batch, so no table has any of it yet: rows that only add are appended.
    Each MERGE names the range of event time (or day, or run id) its target rows can lie in, so Delta
    reads only those files, not all of history.
    """
    cfg, spark = ctx.cfg, ctx.spark
    work = {part: files.read_scratch(spark, cfg, f"{WORK}/{part}") for part in
            ("interactions", "quarantine", "survivors", "user_days", "weights")}
    drops = {part: work[part].where(F.col(C.DROP_FLAG)).limit(1).count() > 0 for part in ("interactions", "quarantine")}

    def changed(part: str, key: str, df, on: list[str], window, **kwargs) -> dict:
        if first and not drops[part]:
            written = rec.append(df.where(~F.col(C.DROP_FLAG)).drop(C.DROP_FLAG), key, **kwargs)
            return {"inserted": written, "deleted": 0}
        result, deleted = rec.apply_changes(df, key, on, target_where=window, **kwargs)
        return {"inserted": result.inserted, "deleted": deleted}

    def dropped_keys(part: str) -> Column | None:
        """On a first application the only target rows a MERGE can meet are the dropped ones (its inserts are keys
        no table holds yet): naming them lets Delta filter the target while reading it, so the join meets a few
        rows instead of every row of the files in the window. None when there are too many to name."""
        keys = [r[0] for r in work[part].where(F.col(C.DROP_FLAG)).select(C.RAW_KEY).limit(_DROP_KEYS_MAX + 1).collect()]
        return F.col(f"t.{C.RAW_KEY}").isin(keys) if len(keys) <= _DROP_KEYS_MAX else None

    part = "interactions"
    # A first application meets only the dropped rows: their time range is the window (the day's own files are not
    # read) and their keys the filter. A re-run may also meet its own inserts, so it takes every row's range.
    rows = work[part].where(F.col(C.DROP_FLAG)) if first else work[part]
    lo, hi = rows.agg(F.min(C.EVENT_TS), F.max(C.EVENT_TS)).first() if drops[part] or not first else (None, None)
    window = None if lo is None else F.col(f"t.{C.EVENT_TS}").between(F.lit(lo), F.lit(hi))
    if first and window is not None and (named := dropped_keys(part)) is not None:
        window = window & named
    if first or lo is not None:
        with rec.step("apply interactions"):
            rec.details["interactions_changed"] = changed(part, C.INTERACTIONS, work[part], [C.RAW_KEY], window,
                                                          properties=clean.INTERACTIONS_PROPERTIES)
    part = "quarantine"
    # Without drops the target rows can only be this batch's own (a re-run's): Delta reads that run's files.
    window = None if drops[part] else F.col(f"t.{C.RUN_ID}") == batch_run
    if first and drops[part]:
        window = dropped_keys(part)
    with rec.step("apply quarantine"):
        rec.details["quarantine_changed"] = changed(part, C.QUARANTINE, work[part], [C.RAW_KEY], window, properties=clean.QUARANTINE_PROPERTIES)
    if first:  # the ledger on what Delta wrote: every row this batch moves, exactly once
        want = rec.details["changes"]
        got = rec.details.get("interactions_changed", {"inserted": 0, "deleted": 0}), rec.details["quarantine_changed"]
        if (got[0]["inserted"], got[0]["deleted"], got[1]["inserted"], got[1]["deleted"]) != (
                want["adds"], want["drops"], want["quarantine_adds"], want["quarantine_drops"]):
            raise StageError(f"ledger does not balance: the batch moves {want} but Delta changed interactions {got[0]} "
                             f"and quarantine {got[1]}")

    props = incremental.state_properties
    survivors = work["survivors"]
    old_lo, old_hi, new_lo, new_hi = survivors.agg(F.min(incremental.OLD_TS), F.max(incremental.OLD_TS),
                                                   F.min(C.EVENT_TS), F.max(C.EVENT_TS)).first()
    rows = survivors.drop(incremental.OLD_TS)
    with rec.step("apply survivors"):
        if first and old_lo is None:  # new groups only
            rec.append(rows.drop(C.DROP_FLAG), C.CLEAN_SURVIVORS, properties=props(C.CLEAN_SURVIVORS))
        elif new_lo is not None:
            # The rows to replace are the demoted survivors (times known); a re-run may also meet its own new rows.
            bounds = [b for b in (old_lo, old_hi) if b is not None] + ([] if first else [new_lo, new_hi])
            window = F.col(f"t.{C.EVENT_TS}").between(F.lit(min(bounds)), F.lit(max(bounds)))
            rec.upsert(rows, C.CLEAN_SURVIVORS, [C.DEDUP_GROUP], target_where=window, properties=props(C.CLEAN_SURVIVORS))
    days = work["user_days"]
    d_lo, d_hi = days.agg(F.min(C.DAY), F.max(C.DAY)).first()
    if d_lo is not None:
      with rec.step("apply user_days"):
        rec.upsert(days, C.CLEAN_USER_DAYS, [C.USER_ID, C.DAY], target_where=F.col(f"t.{C.DAY}").between(F.lit(d_lo), F.lit(d_hi)),
                   properties=props(C.CLEAN_USER_DAYS))
    with rec.step("apply weights"):
        updates, delete_when, insert_when, inserts = train.apply_weight_deltas()
        rec.merge_deltas(work["weights"], C.WEIGHTS, [C.USER_ID, C.ITEM_ID, C.EVENT_TYPE], batch=C.RUN_ID, updates=updates,
                         delete_when=delete_when, insert_when=insert_when, inserts=inserts, properties=props(C.WEIGHTS))
    if cfg.items.path is None:
      with rec.step("apply items"):
        rec.upsert(files.read_scratch(spark, cfg, f"{WORK}/item_latest"), C.CLEAN_ITEM_LATEST, [C.ITEM_ID], properties=props(C.CLEAN_ITEM_LATEST))
        rec.overwrite(item_table.items_of_latest(rec.read_output(C.CLEAN_ITEM_LATEST)), C.ITEMS)
    write_state(ctx, rec, incremental.CleanState(done_version=plan.to_version, half_life_days=cfg.train.recency_half_life_days,
                                                  rules=incremental.state_rules(cfg)))


def forget_items(ctx: RunContext, rec, users, raw_version: int | None) -> None:
    """`clean_item_latest` and `items` without the rows of the customers being forgotten: recomputed before their
    rows are deleted, while those rows still say which items they touched (an item file, when configured, is the
    catalogue instead, and nothing is derived)."""
    latest = rec.read_optional(C.CLEAN_ITEM_LATEST)
    inter = rec.read_optional(C.INTERACTIONS)
    if ctx.cfg.items.path is not None or latest is None or inter is None or raw_version is None:
        return
    drops = inter.join(F.broadcast(users), C.USER_ID, "left_semi").select(*clean.INTERACTION_COLUMNS).localCheckpoint()
    if not drops.count():
        return
    empty = drops.limit(0).withColumn(clean.ITEM_NAME_COLUMN, F.lit(None).cast("string"))
    plan = incremental.Plan("forget", "", raw_version, raw_version)
    changes = item_changes(ctx, rec, empty, drops, plan).withColumn(C.DROP_FLAG, F.col(C.EVENTS) <= 0)
    rec.upsert(changes, C.CLEAN_ITEM_LATEST, [C.ITEM_ID], properties=incremental.state_properties(C.CLEAN_ITEM_LATEST))
    rec.overwrite(item_table.items_of_latest(rec.read_output(C.CLEAN_ITEM_LATEST)), C.ITEMS)
