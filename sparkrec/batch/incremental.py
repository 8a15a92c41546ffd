"""The incremental clean: classify only the new raw rows, and change the tables as a full recompute would.

A full clean (`clean.classify`) sees every raw row at once. Three rules need
more than one row: deduplication (one survivor per group, the earliest by
event time then raw key), the bot rule (surviving events per user and day, and
per user), and the derived item table. The incremental clean keeps what those
rules need in small maintained tables instead of rescanning history:

    clean_survivors   (dedup_group, event_ts, _raw_key, user_id, day, hash_code)   one row per group
    clean_user_days   (user_id, day, events)                                       what the bot rule counts
    user_item_weights (user_id, item_id, event_type, events, value, log2_decayed)  the training matrix's sums

`judge_batch` and `finish_batch` compare the new rows with them and say what
must move: new rows kept or quarantined, earlier survivors that a newcomer beat
(demoted: they become duplicates and leave `interactions` or `quarantine`),
and the earlier rows of users whose bot verdict changed (moved between
`interactions` and `quarantine`). Every change is saved first and then applied
by MERGEs that a second application leaves as they are, so a crash while
applying is finished by the next run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from sparkrec.batch import clean, joins
from sparkrec.core import columns as C
from sparkrec.core.config import CleanConfig, InputConfig
from sparkrec.core.ledger import KEPT, QUARANTINED

_S = "_s_"  # prefix of the earlier survivor's columns beside a new row
_SURVIVOR = "_survivor"


# The maintained tables change a few rows in many files each day: deletion vectors let a MERGE mark
# the old rows instead of rewriting every file it touches.
STATE_PROPERTIES = {"delta.enableDeletionVectors": "true"}
# Statistics only where a MERGE window uses them, and never on a user key: a Delta log keeps the
# statistics of files long after their rows are gone, and `sparkrec forget` must leave no key behind.
_STATS = {C.CLEAN_SURVIVORS: C.EVENT_TS, C.CLEAN_USER_DAYS: C.DAY, C.WEIGHTS: C.EVENT_TYPE, C.CLEAN_ITEM_LATEST: C.ITEM_ID}


def state_properties(key: str) -> dict[str, str]:
    """Table properties of the clean's state table `key`."""
    return {**STATE_PROPERTIES, "delta.dataSkippingStatsColumns": _STATS[key]}


@dataclass
class Batch:
    """The new rows classified against the state, and the state's consequences."""

    rows: DataFrame  # every new row: normalised columns, reason, duplicate, outcome, survivor flag
    demoted: DataFrame  # earlier survivors a newcomer beat: (_raw_key, user_id, day, event_ts, was_bot)
    user_days: DataFrame  # (user_id, day, events) absolute, for every (user, day) the batch changed; 0 = delete
    flags: DataFrame  # (user_id, bot_before, bot_after) for every user the batch touched
    counts: DataFrame  # (user_id, day, _before, events, _changed) for every day of a touched user: persist it first


def _earlier_first(ts: Column, key: Column, other_ts: Column, other_key: Column) -> Column:
    """(ts, key) sorts before (other_ts, other_key): the full clean's tie-break."""
    return (ts < other_ts) | ((ts == other_ts) & (key < other_key))


def judge_batch(raw_new: DataFrame, survivors: DataFrame | None, src: InputConfig, cfg: CleanConfig, now: datetime,
                small: bool = True) -> DataFrame:
    """The new rows with their rule reason, survivor flag, duplicate kind and the group's earlier survivor.

    A new row survives when it is the first of its group in the batch and
    sorts before the group's earlier survivor (if any); that survivor is then
    demoted. A new non-surviving row is a duplicate: "exact" when its content
    equals an earlier row's of the group, else "replay".

    Args:
        small: the batch's keys fit a broadcast hash set (`joins.BROADCAST_KEYS_MAX`): the survivors are then
            filtered by it as they are read instead of being shuffled, so a day's cost does not grow with history.
    """
    ok = F.col(C.REASON).isNull()
    # The raw record (every input field as JSON) is only stored for quarantined rows: a batch carries it
    # through its caches only for those (`with_raw_record`), not for the million it keeps.
    rows = raw_new.transform(clean.normalize, src=src).transform(
        clean.with_reject_reason, rules=clean.reject_rules(src, cfg, now)
    ).drop(C.RAW_RECORD)
    group = F.when(ok, clean.dedup_group()).otherwise(F.concat(F.lit("x:"), F.col(C.RAW_KEY)))
    first_w = Window.partitionBy(C.DEDUP_GROUP).orderBy(C.EVENT_TS, C.RAW_KEY)
    copy_w = Window.partitionBy(C.DEDUP_GROUP, C.ROW_HASH).orderBy(C.RAW_KEY)
    rows = (
        rows.withColumn(C.DEDUP_GROUP, group)
        .withColumn("_first", F.row_number().over(first_w) == 1)
        .withColumn("_copy", F.row_number().over(copy_w) > 1)
        .withColumn(C.DAY, F.to_date(C.EVENT_TS))
        .withColumn(C.HASH_CODE, F.xxhash64(C.ROW_HASH))
    )
    if survivors is not None:
        if small:
            survivors = joins.rows_for_keys(survivors, rows, [C.DEDUP_GROUP])
        earlier = survivors.select(*[F.col(c).alias(_S + c) for c in survivors.columns])
        rows = rows.join(earlier, F.col(C.DEDUP_GROUP) == F.col(_S + C.DEDUP_GROUP), "left").drop(_S + C.DEDUP_GROUP)
    else:
        for c, t in ((C.EVENT_TS, "timestamp"), (C.RAW_KEY, "string"), (C.USER_ID, "string"), (C.DAY, "date"), (C.HASH_CODE, "long")):
            rows = rows.withColumn(_S + c, F.lit(None).cast(t))
    had = F.col(_S + C.RAW_KEY).isNotNull()
    wins = ok & F.col("_first") & (~had | _earlier_first(F.col(C.EVENT_TS), F.col(C.RAW_KEY), F.col(_S + C.EVENT_TS), F.col(_S + C.RAW_KEY)))
    rows = rows.withColumn(_SURVIVOR, F.coalesce(wins, F.lit(False))).withColumn(
        clean.DUPLICATE,
        F.when(~ok | F.col(_SURVIVOR), F.lit(None).cast("string"))
        .when(F.col("_copy") | (F.col(_S + C.HASH_CODE) == F.col(C.HASH_CODE)), F.lit("exact"))
        .otherwise(F.lit("replay")),
    )
    return rows.drop("_first", "_copy")


def finish_batch(rows: DataFrame, user_days: DataFrame | None, cfg: CleanConfig) -> Batch:
    """The bot rule on the judged rows (`judge_batch`), from the maintained per-day counts, and each row's outcome."""
    had = F.col(_S + C.RAW_KEY).isNotNull()
    demoted = rows.where(F.col(_SURVIVOR) & had).select(
        F.col(_S + C.RAW_KEY).alias(C.RAW_KEY), F.col(_S + C.USER_ID).alias(C.USER_ID),
        F.col(_S + C.DAY).alias(C.DAY), F.col(_S + C.EVENT_TS).alias(C.EVENT_TS),
    )
    # The bot rule's counts move by +1 for each new survivor and -1 for each demoted one.
    delta = (
        rows.where(F.col(_SURVIVOR)).select(C.USER_ID, C.DAY, F.lit(1).alias("_d"))
        .unionByName(demoted.select(C.USER_ID, C.DAY, F.lit(-1).alias("_d")))
        .groupBy(C.USER_ID, C.DAY).agg(F.sum("_d").alias("_d"))
    )
    touched = delta.select(C.USER_ID).distinct()
    if user_days is not None:
        before = user_days.join(touched, C.USER_ID, "left_semi")
    else:
        before = delta.limit(0).select(C.USER_ID, C.DAY, F.lit(0).cast("long").alias(C.EVENTS))
    # Every (user, day) of a touched user, with its count before and after the batch: one join and one
    # aggregate give both verdicts and the changed counts.
    counts = before.join(delta, [C.USER_ID, C.DAY], "full_outer").select(
        C.USER_ID, C.DAY, F.coalesce(F.col(C.EVENTS), F.lit(0)).cast("long").alias("_before"),
        (F.coalesce(F.col(C.EVENTS), F.lit(0)) + F.coalesce(F.col("_d"), F.lit(0))).cast("long").alias(C.EVENTS),
        F.col("_d").isNotNull().alias("_changed"),
    )
    changed_days = counts.where("_changed").select(C.USER_ID, C.DAY, C.EVENTS)
    per_user = counts.groupBy(C.USER_ID).agg(
        F.sum("_before").alias("_tb"), F.max("_before").alias("_mb"), F.sum(C.EVENTS).alias("_ta"), F.max(C.EVENTS).alias("_ma")
    )
    flags = per_user.select(
        C.USER_ID, clean.is_bot(F.col("_tb"), F.col("_mb"), cfg).alias("bot_before"),
        clean.is_bot(F.col("_ta"), F.col("_ma"), cfg).alias("bot_after"),
    )
    rows = (
        rows.join(flags.select(C.USER_ID, "bot_after"), C.USER_ID, "left")
        .withColumn(C.REASON, F.when(F.col(_SURVIVOR) & F.coalesce(F.col("bot_after"), F.lit(False)), F.lit(clean.BOT_USER))
                    .otherwise(F.col(C.REASON)))
        .transform(clean.with_outcome)
        .drop("bot_after")
    )
    demoted = demoted.join(flags.select(C.USER_ID, F.col("bot_before").alias("was_bot")), C.USER_ID, "left")
    return Batch(rows, demoted, changed_days, flags, counts)


OLD_TS = "_old_ts"  # on saved survivor rows: the event time of the survivor it replaces (null: a new group)


def new_survivors(rows: DataFrame) -> DataFrame:
    """The batch's rows that now hold their group (upserts of `clean_survivors`), with `OLD_TS`: the replaced
    row's time tells the MERGE which files can hold it."""
    return rows.where(F.col(_SURVIVOR)).select(
        C.DEDUP_GROUP, C.EVENT_TS, C.RAW_KEY, C.USER_ID, C.DAY, C.HASH_CODE, F.col(_S + C.EVENT_TS).alias(OLD_TS)
    )


def with_raw_record(rows: DataFrame, raw_new: DataFrame, src: InputConfig, few: bool) -> DataFrame:
    """`rows` (from `judge_batch`, which leaves the raw record out) with their raw record again.

    Args:
        few: `rows` are few enough to broadcast their keys, so only their raw rows are read and normalised.
    """
    keys = rows.select(C.RAW_KEY)
    raw = raw_new.join(F.broadcast(keys) if few else keys, C.RAW_KEY, "left_semi")
    return rows.join(clean.normalize(raw, src).select(C.RAW_KEY, C.RAW_RECORD), C.RAW_KEY, "left")


def kept(rows: DataFrame) -> DataFrame:
    return rows.where(F.col(clean.OUTCOME) == KEPT)


def quarantined(rows: DataFrame) -> DataFrame:
    return rows.where(F.col(clean.OUTCOME) == QUARANTINED)


def flipped(flags: DataFrame) -> DataFrame:
    """(user_id, bot_after) of users whose bot verdict this batch changed."""
    return flags.where(F.col("bot_before") != F.col("bot_after")).select(C.USER_ID, "bot_after")


def earlier_rows_of(survivors: DataFrame, users: DataFrame, demoted: DataFrame) -> DataFrame:
    """(_raw_key, bot_after) of the earlier survivors of `users` that stay survivors (not demoted)."""
    return (
        survivors.join(F.broadcast(users), C.USER_ID)
        .join(demoted.select(C.RAW_KEY), C.RAW_KEY, "left_anti")
        .select(C.RAW_KEY, "bot_after")
    )


def reclassified(raw_rows: DataFrame, moves: DataFrame, src: InputConfig) -> DataFrame:
    """The raw rows of moving survivors, normalised again (they passed the rules once): with `bot_after`."""
    return (
        raw_rows.join(F.broadcast(moves.select(C.RAW_KEY)), C.RAW_KEY, "left_semi")
        .transform(clean.normalize, src=src)
        .join(F.broadcast(moves), C.RAW_KEY)
        .withColumn(C.REASON, F.when(F.col("bot_after"), F.lit(clean.BOT_USER)))
        .withColumn(clean.DUPLICATE, F.lit(None).cast("string"))
    )


def interaction_changes(adds: DataFrame, drops: DataFrame) -> DataFrame:
    """One source for the MERGE into `interactions`: rows to add and keys (with their time) to drop."""
    cols = clean.INTERACTION_COLUMNS
    add = adds.select(*cols, F.lit(False).alias(C.DROP_FLAG))
    drop = drops.select(*[F.col(c) if c in (C.RAW_KEY, C.EVENT_TS) else F.lit(None).alias(c) for c in cols], F.lit(True).alias(C.DROP_FLAG))
    return add.unionByName(drop.select(*[F.col(c).cast(add.schema[c].dataType) for c in cols], C.DROP_FLAG))


STALE = "_stale"  # on merged item rows: the kept price or name came from a row that left; recompute the item


def merged_item_latest(old: DataFrame | None, new: DataFrame, dropped: DataFrame) -> DataFrame:
    """The state's items changed by a batch: rows added (`new`, from `item_table.item_latest`) and rows that left
    `interactions` (`dropped`: item_id, _raw_key). The newer price and name win per field; an item whose
    kept value came from a dropped row is flagged `STALE`; an item with no row left has events 0."""
    gone = dropped.groupBy(C.ITEM_ID).agg(F.count(F.lit(1)).alias("_gone"), F.collect_set(C.RAW_KEY).alias("_gone_keys"))
    if old is None:
        old = new.limit(0)
    touched = new.select(C.ITEM_ID).unionByName(gone.select(C.ITEM_ID)).distinct()
    o = old.join(touched, C.ITEM_ID, "left_semi")
    both = touched.join(o.alias("o"), C.ITEM_ID, "left").join(new.alias("n"), C.ITEM_ID, "left").join(gone, C.ITEM_ID, "left")

    def pick(field: str) -> tuple[list[Column], Column]:
        take_new = F.col(f"n.{field}").isNotNull() & (
            F.col(f"o.{field}").isNull()
            | (F.col(f"n.{field}_ts") > F.col(f"o.{field}_ts"))
            | ((F.col(f"n.{field}_ts") == F.col(f"o.{field}_ts")) & (F.col(f"n.{field}_key") < F.col(f"o.{field}_key")))
        )
        cols = [F.when(take_new, F.col(f"n.{c}")).otherwise(F.col(f"o.{c}")).alias(c) for c in (field, f"{field}_ts", f"{field}_key")]
        stale = ~take_new & F.coalesce(F.array_contains(F.col("_gone_keys"), F.col(f"o.{field}_key")), F.lit(False))
        return cols, stale

    price, price_stale = pick("price")
    name, name_stale = pick("name")
    events = F.coalesce(F.col(f"o.{C.EVENTS}"), F.lit(0)) + F.coalesce(F.col(f"n.{C.EVENTS}"), F.lit(0)) - F.coalesce(F.col("_gone"), F.lit(0))
    return both.select(C.ITEM_ID, events.cast("long").alias(C.EVENTS), *price, *name, (price_stale | name_stale).alias(STALE))


# --------------------------------------------------------------------------- where the clean stands

STATE_SCHEMA = (
    "done_version long, pending_from long, pending_version long, pending_run string, pending_ledger string, "
    "full_pending boolean, half_life_days double, rules string, run_id string, updated_at timestamp"
)


@dataclass(frozen=True)
class CleanState:
    """The one row of `clean_state`: which `events_raw` versions the tables reflect, and any unfinished work.

    `done_version`: every row of events_raw up to this version is classified.
    `pending_*`: a batch was computed and saved under `_work/clean/` but maybe
    not applied to every table; the next clean applies it again (idempotent)
    before anything else. `full_pending`: a full clean started and did not
    finish; the next clean is full.
    """

    done_version: int | None = None
    pending_from: int | None = None
    pending_version: int | None = None
    pending_run: str | None = None
    pending_ledger: str | None = None
    full_pending: bool = False
    half_life_days: float | None = None
    rules: str | None = None

    @classmethod
    def of_row(cls, row) -> "CleanState":
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})

    def row(self, run_id: str, now: datetime) -> tuple:
        return (self.done_version, self.pending_from, self.pending_version, self.pending_run, self.pending_ledger,
                self.full_pending, self.half_life_days, self.rules, run_id, now)


@dataclass(frozen=True)
class Plan:
    mode: str  # "full", "incremental", "resume" (apply a saved batch) or "none" (nothing new)
    reason: str
    after_version: int | None = None  # the batch is events_raw versions (after_version, to_version]
    to_version: int | None = None


# Operations on events_raw after which its change feed's inserts are exactly the rows no clean has seen.
INSERT_ONLY = {"MERGE", "WRITE", "CREATE TABLE", "CREATE OR REPLACE TABLE", "SET TBLPROPERTIES", "OPTIMIZE", "CREATE TABLE AS SELECT"}


STATE_FORMAT = "s2"  # the layout of the clean's state tables and saved batches; s2: weights as deltas stamped by run


def state_rules(cfg) -> str:
    """What `clean_state` must match for an incremental clean: the rules (`Config.rules_key`) and `STATE_FORMAT`."""
    return f"{cfg.rules_key()}.{STATE_FORMAT}"


def _format(rules: str) -> str:
    return rules.rpartition(".")[2] if "." in rules else ""


def plan(state: CleanState | None, raw_version: int, force_full: bool, rules: str, half_life: float | None,
         operations: list[tuple[int, str, dict]] | None = None) -> Plan:
    """What this clean must do, and why (recorded in `runs`): a pure decision on the state and events_raw's history.

    Args:
        operations: events_raw's commits after `state.done_version` (`tables.operations_between`);
            None when not looked up yet.
    """
    if force_full:
        return Plan("full", "clean.full is set (--full)", None, raw_version)
    if state is None or state.done_version is None:
        return Plan("full", "first clean of this warehouse (no clean_state table)", None, raw_version)
    if state.full_pending:
        return Plan("full", "the previous full clean did not finish", None, raw_version)
    if _format(state.rules or "") != _format(rules):
        return Plan("full", "the clean's state was written by another version of sparkrec (its layout changed)", None, raw_version)
    if state.pending_version is not None:
        return Plan("resume", f"run {state.pending_run} computed events_raw versions {state.pending_from + 1}-"
                    f"{state.pending_version} and did not finish applying them", state.pending_from, state.pending_version)
    if state.rules != rules:
        return Plan("full", "the rules changed since the last clean (source or clean settings)", None, raw_version)
    if state.half_life_days != half_life:
        return Plan("full", "train.recency_half_life_days changed: the weight table is rebuilt", None, raw_version)
    if raw_version < state.done_version:
        return Plan("full", f"events_raw is at version {raw_version}, before the {state.done_version} the last clean read "
                    "(restored?)", None, raw_version)
    if raw_version == state.done_version:
        return Plan("none", "no new rows in events_raw", state.done_version, raw_version)
    for version, operation, params in operations or []:
        overwrite = operation == "WRITE" and str(params.get("mode", "")).strip('"').lower() == "overwrite"
        # ingest's MERGE only inserts; one that deletes (`sparkrec forget`) or updates changed earlier rows
        changes = operation == "MERGE" and any(a in str(params.get("matchedPredicates", "")) for a in ("delete", "update"))
        if operation not in INSERT_ONLY or overwrite or changes:
            what = " (overwrite)" if overwrite else " (deleting rows)" if changes else ""
            return Plan("full", f"events_raw version {version} is a {operation}{what}, not an insert", None, raw_version)
    return Plan("incremental", "new rows in events_raw", state.done_version, raw_version)
