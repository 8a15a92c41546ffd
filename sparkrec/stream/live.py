"""The live path (`sparkrec stream`): each micro-batch is ingested, cleaned and re-scored like a batch run.

Spark Structured Streaming reads the events (`sources.read_stream`: a Kafka
topic or a directory of JSON files) and hands each micro-batch to
`LiveStream.process`, which runs the batch pipeline's own stages on it:

    ingest    the batch's rows appended to `events_raw` with their lineage, exactly once per batch id
              (Delta's idempotent write keyed by the stream's id and the batch id)
    clean     `pipeline.run_clean`: the incremental clean, the same rules and the same state as batch
    ids       `pipeline.run_ids`: ids for the new customers and items
    live      the customers of the batch folded into the published model (`foldin`), re-scored with the
              batch's top-N code and rules (`block.lists`), and their lists MERGEd into `live_recommendations`

A crash anywhere is finished by the restart: Spark replays the batch from its
checkpoint, the append is skipped as a repeat, the clean finishes or finds
nothing new, and the live lists are recomputed from the tables. Every stage
is recorded in `runs` under the batch's run id, the live stage with the
batch's ledger and latency.

What stays on the driver between batches (`LiveModel`) is bounded by the
catalogue: the item factors, the fallback sequence and the item keys (and, when
the published lists were ranked, the ranker and its item statistics), rebuilt
when a new model is published and every `stream.refresh_minutes` (so the
popular and trending fallbacks, and the ranker's view of the items, follow the stream).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkrec.batch import clean, incremental, ingest, pipeline, privacy, ranking, recommend, train
from sparkrec.batch.recommend.scoring import collect_bounded
from sparkrec.core import block, foldin, pseudonyms, ranker
from sparkrec.core import columns as C
from sparkrec.core import ledger as ledger_
from sparkrec.core.config import Config, TrainConfig
from sparkrec.core.errors import StageError
from sparkrec.storage import merges, registry, runs, sources, tables
from sparkrec.storage.runs import RunContext

log = logging.getLogger(__name__)

# The tables a micro-batch appends to: compacted every `stream.compact_every` batches.
APPENDED = (C.EVENTS_RAW, C.INTERACTIONS, C.QUARANTINE, C.WEIGHTS, C.CLEAN_SURVIVORS, C.CLEAN_USER_DAYS,
            C.USER_IDS, C.ITEM_IDS, C.LIVE_RECOMMENDATIONS, C.RUNS)
CLEAN_ATTEMPTS = 3  # clean passes that may fail in a row (another writer's commit) before the stream stops
LIVE_PROPERTIES = {"delta.dataSkippingStatsColumns": C.RANK, "delta.enableDeletionVectors": "true"}


@dataclass
class LiveModel:
    """The published model as the live path uses it, held on the driver between micro-batches."""

    model_version: str | None  # None: no model yet, every list comes from the fallbacks
    factors_version: int | None  # item_factors' Delta version it was read at
    settings: TrainConfig
    reference: datetime | None  # the decay reference the model was trained with
    item_idx: np.ndarray  # sorted
    vectors: np.ndarray  # [items, rank] float32, rows in item_idx order
    yty: np.ndarray | None
    plan: block.Plan
    meta: DataFrame
    built: float  # time.monotonic() when built
    ranked_at: datetime | None = None  # the plan ranks (`plan.ranker`): the time its item statistics describe

    def factors_of(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows of `vectors` for `items`, which of `items` the model knows)."""
        pos = np.minimum(np.searchsorted(self.item_idx, items), max(len(self.item_idx) - 1, 0))
        known = self.item_idx[pos] == items if len(self.item_idx) else np.zeros(len(items), dtype=bool)
        return pos, known


def app_id(spark: SparkSession, checkpoint: str) -> str:
    """The stream's identity for Delta's idempotent writes: the query id Spark keeps in its checkpoint.

    A restart from the same checkpoint keeps it (so a replayed batch id is recognised); a new checkpoint
    is a new stream whose batch ids start again at 0, and gets a new id.
    """
    text = spark.read.text(f"{checkpoint.rstrip('/')}/metadata").first()
    if text is None:
        raise StageError(f"the stream's checkpoint {checkpoint} has no metadata file")
    return "sparkrec-stream-" + json.loads(text[0])["id"]


def load_model(ctx: RunContext, inter: DataFrame, uids: DataFrame, iids: DataFrame) -> LiveModel:
    """Read the published model and build what re-scoring needs (one Spark pass per bounded part), from the
    tables the micro-batch read (interactions and the ids)."""
    spark, cfg = ctx.spark, ctx.cfg
    history = recommend.indexed_history(inter, uids, iids)
    items = tables.read_table(spark, cfg, C.ITEMS, required=False)
    factors = tables.read_table(spark, cfg, C.ITEM_FACTORS, required=False)
    settings, reference, model_version = cfg.train, None, None
    if factors is not None:
        first = factors.df.select(C.MODEL_VERSION).first()
        model_version = first[0] if first is not None else None
    if model_version is not None:
        record = registry.train_record(spark, cfg, model_version) or {}
        if "train" in record:
            settings = TrainConfig.model_validate(record["train"])
        else:
            log.warning("stream: the run that trained model %s recorded no settings; folding in with train.* of the config",
                        model_version)
        if record.get("decay_reference"):
            reference = datetime.fromisoformat(record["decay_reference"])
        elif settings.recency_half_life_days is not None:
            reference = train.decay_reference(inter, settings)
        itf = factors.df.select(C.ITEM_IDX, C.FEATURES)
    else:
        log.warning("stream: no model in %s yet; live lists come from the fallbacks until `sparkrec run` trains one",
                    cfg.warehouse)
        itf = recommend.no_factors(spark, C.ITEM_IDX)
    # The fold-in and the explanations both need every item factor on the driver: collected once, here.
    matrix = collect_bounded(itf, False, cfg.recommend.max_broadcast_items)
    if matrix is None:
        raise StageError(
            f"the catalogue has more than recommend.max_broadcast_items={cfg.recommend.max_broadcast_items} items: "
            "the live path scores on the driver and needs the whole item matrix; raise the limit or run batch only"
        )
    meta = recommend.item_meta(iids, items.df if items is not None else None, history, cfg.recommend.rules)
    meta = meta.persist(StorageLevel.MEMORY_AND_DISK)
    chosen = published_ranker(ctx) if model_version is not None else None
    rec = ranking.list_settings(cfg.recommend) if chosen is not None else cfg.recommend
    plan, _, _ = recommend.bounded_plan(history, itf, rec, meta, keyed=True, factors=matrix)
    ranked_at = None
    if chosen is not None:
        # Item statistics as the recommend stage computes them, from the history as it stands now: they follow
        # the stream as the fallbacks do (rebuilt every stream.refresh_minutes).
        priced = ranking.priced_history(inter, uids, iids)
        ranked_at = inter.agg(F.max(C.EVENT_TS)).first()[0]
        plan.ranker, plan.stats = chosen, ranking.item_stats(priced, ranked_at, cfg.ranker)
    idx = np.asarray(matrix.item_idx, dtype=np.int64)
    return LiveModel(model_version, factors.version if factors is not None else None, settings, reference, idx,
                     matrix.vectors, foldin.gram(matrix.vectors) if len(idx) else None, plan, meta, time.monotonic(),
                     ranked_at)


def published_ranker(ctx: RunContext) -> ranker.Ranker | None:
    """The ranker the latest published lists were ranked with, or None (ALS's own lists went out, or it is off)."""
    if not ctx.cfg.ranker.enabled:
        return None
    details = registry.latest_details(ctx.spark, ctx.cfg, "recommend") or {}
    path = details.get("ranker")
    if not path:
        return None
    found = ranking.read_ranker(ctx.spark, ctx.cfg, path)
    if found is None:
        log.warning("stream: the ranker the published lists were ranked with is missing (%s): live lists are ALS's own",
                    path)
    return found


def folded_factors(model: LiveModel, matrix: pd.DataFrame) -> dict[int, np.ndarray]:
    """Each user's factor from their (user_idx, item_idx, weight) rows and the model's item factors:
    MLlib's implicit-ALS user solve (`foldin.fold_in`); items the model does not know carry no factor."""
    if model.yty is None or matrix.empty:
        return {}
    als = model.settings.als
    out: dict[int, np.ndarray] = {}
    for user, rows in matrix.groupby(C.USER_IDX, sort=False):
        pos, known = model.factors_of(rows[C.ITEM_IDX].to_numpy(dtype=np.int64))
        if not known.any():
            continue
        out[int(user)] = foldin.fold_in(model.yty, model.vectors[pos[known]], rows[C.WEIGHT].to_numpy()[known],
                                        als.reg_param, als.alpha, als.nonnegative)
    return out


class LiveStream:
    """The foreachBatch handler (the fast path) and the clean loop beside it."""

    def __init__(self, spark: SparkSession, cfg: Config) -> None:
        self.spark, self.cfg = spark, cfg
        self.model: LiveModel | None = None
        self.app_id: str | None = None
        self.secret = pseudonyms.load_secret(cfg.privacy) if cfg.privacy.pseudonymize_user_ids else None
        self.ledger: list[dict] = []  # one entry per batch this process ran (the CLI prints a summary)
        self.cleans: list[ledger_.Ledger] = []  # one per clean pass this process ran
        self._raw_ready = False
        self._clean_lock = threading.Lock()

    def process(self, df: DataFrame, batch_id: int) -> None:
        """One micro-batch: its rows appended to `events_raw` exactly once, its customers re-scored and published.

        The customers' histories are the clean `interactions` plus what no clean has classified yet (this
        batch and any before it), put through the clean's row rules (`clean.provisional`); the clean loop
        then classifies those rows fully and the next list of the customer stands on the tables alone.
        """
        cfg, spark = self.cfg, self.spark
        if self.app_id is None:
            self.app_id = app_id(spark, cfg.stream_checkpoint)
        ctx = RunContext(spark, cfg, run_id=f"{runs.new_run_id()}-b{batch_id}", live=True)
        started = time.monotonic()
        with ctx.stage("live") as rec:
            existing = tables.table_properties(spark, cfg, C.EVENTS_RAW) if not self._raw_ready else None
            raw = privacy.prepare_raw(df, cfg, existing, self.secret)
            rows = ingest.with_stream_lineage(raw, ctx.run_id, keyed=cfg.stream.source.kind == "kafka")
            rows = rows.persist(StorageLevel.MEMORY_AND_DISK)
            try:
                with rec.step("append"):
                    # The batch's customers and arrival times, read once (bounded by the trigger's limits).
                    user = clean.clean_id(F.col(f"`{cfg.source.columns.user_id}`"), False)  # text, as clean reads it
                    arrivals = rows.select(user.alias(C.USER_ID), C.ARRIVED_AT).toPandas()
                    version = tables.append_once(rows, cfg, C.EVENTS_RAW, self.app_id, batch_id,
                                                 properties=ingest.RAW_TABLE_PROPERTIES)
                    if version is not None:
                        rec.outputs[cfg.table_name(C.EVENTS_RAW)] = version
                    if not self._raw_ready:
                        tables.ensure_properties(spark, cfg, C.EVENTS_RAW, {**ingest.CHANGE_FEED, **privacy.raw_table_properties(cfg)})
                        self._raw_ready = True
                users = sorted({u for u in arrivals[C.USER_ID] if u is not None})[: cfg.stream.max_users_per_batch]
                published = self.publish(ctx, rec, users, rows) if cfg.stream.publish_lists else 0
            finally:
                rows.unpersist()
            done = datetime.now(timezone.utc)
            arrived = pd.to_datetime(arrivals[C.ARRIVED_AT], utc=True).dropna()
            lat = (done - arrived).dt.total_seconds().to_numpy() if len(arrived) else np.zeros(0)
            entry = {
                "batch_id": batch_id, "events": len(arrivals), "appended": len(arrivals) if version is not None else 0,
                "users_updated": published, "seconds": round(time.monotonic() - started, 3),
                "latency_p50_s": round(float(np.median(lat)), 3) if len(lat) else None,
                "latency_max_s": round(float(lat.max()), 3) if len(lat) else None,
            }
            rec.rows_in, rec.rows_out = len(arrivals), published
            rec.details.update(entry, stream=self.app_id, repeat=version is None,
                               model_version=self.model.model_version if self.model else None)
            self.ledger.append(entry)
        log.info("stream batch %d: %d events, %d lists updated in %.1f s (latency median %s s)", batch_id, len(arrivals),
                 published, entry["seconds"], entry["latency_p50_s"])

    def clean_pass(self) -> ledger_.Ledger:
        """Classify what the stream appended (the batch pipeline's incremental clean), then give new keys ids.

        Recorded in `runs` like a batch clean, with its exact ledger: rows newly classified = kept +
        quarantined + duplicates. Every `stream.compact_every` passes the appended tables are compacted.
        """
        with self._clean_lock:
            ctx = RunContext(self.spark, self.cfg, live=True)
            tally = pipeline.run_clean(ctx)
            if tally.rows_in or not self.cleans:
                pipeline.run_ids(ctx)
            self.cleans.append(tally)
            every = self.cfg.stream.compact_every
            if every and len(self.cleans) % every == 0:
                self.compact(ctx)
            return tally

    def _model(self, ctx: RunContext, inter: DataFrame, uids: DataFrame, iids: DataFrame) -> LiveModel:
        """The cached model, rebuilt when a new one is published or the fallbacks are older than refresh_minutes."""
        current = tables.current_version(ctx.spark, ctx.cfg.table_path(C.ITEM_FACTORS))
        stale = (self.model is None or current != self.model.factors_version
                 or time.monotonic() - self.model.built > ctx.cfg.stream.refresh_minutes * 60)
        if stale:
            if self.model is not None:
                self.model.meta.unpersist()
            self.model = load_model(ctx, inter, uids, iids)
            log.info("stream: model %s loaded (%d items)", self.model.model_version, len(self.model.item_idx))
        assert self.model is not None
        return self.model

    def pending(self, ctx: RunContext, rec, batch: DataFrame) -> DataFrame:
        """The raw rows no clean has classified: this batch, and what earlier batches appended since the clean's
        last finished version (read from the change feed)."""
        state = tables.read_table(ctx.spark, ctx.cfg, C.CLEAN_STATE, required=False)
        row = state.df.first() if state is not None else None
        done = incremental.CleanState.of_row(row).done_version if row is not None else None
        raw_now = tables.current_version(ctx.spark, ctx.cfg.table_path(C.EVENTS_RAW))
        cols = batch.columns
        if done is None or raw_now is None or raw_now <= done:
            return batch
        try:
            earlier = rec.read_inserts(C.EVENTS_RAW, done, raw_now)
        except StageError:  # the feed is gone (a vacuum): the batch alone
            return batch
        missing = [c for c in cols if c not in earlier.columns]
        earlier = earlier.select(*[c for c in cols if c in earlier.columns], *[F.lit(None).alias(c) for c in missing])
        return batch.unionByName(earlier.select(*cols)).dropDuplicates([C.RAW_KEY])

    def publish(self, ctx: RunContext, rec, users: list[str], batch: DataFrame) -> int:
        """Re-score `users` and MERGE their lists into `live_recommendations`; returns how many were listed."""
        cfg, spark = ctx.cfg, ctx.spark
        inter, uids, iids = rec.read(C.INTERACTIONS), rec.read(C.USER_IDS), rec.read(C.ITEM_IDS)
        model = self._model(ctx, inter, uids, iids)
        if not users:
            return 0
        keys = spark.createDataFrame([(u,) for u in users], f"{C.USER_ID} string")
        with rec.step("histories"):
            fresh = clean.provisional(self.pending(ctx, rec, batch), cfg.source, cfg.clean, ctx.now)
            theirs = (inter.select(*clean.INTERACTION_COLUMNS).join(F.broadcast(keys), C.USER_ID, "left_semi")
                      .unionByName(fresh.join(F.broadcast(keys), C.USER_ID, "left_semi")))
            theirs = theirs.localCheckpoint()
            # Customers without an id yet (first seen in this batch) are scored under a temporary one: the
            # published rows carry their key, and `ids` gives them their lasting id with the clean.
            known = dict(uids.join(F.broadcast(keys), C.USER_ID).select(C.USER_ID, C.USER_IDX).collect())  # bounded: the batch's
            temporary = iter(range(-1, -len(users) - 1, -1))
            mine = spark.createDataFrame([(u, known[u] if u in known else next(temporary)) for u in users],
                                         f"{C.USER_ID} string, {C.USER_IDX} int")
        with rec.step("fold in"):
            matrix = train.training_matrix(theirs, mine, iids, model.settings, model.reference).toPandas()
            factors = folded_factors(model, matrix)
        with rec.step("score"):
            fdf = spark.createDataFrame([(u, v.tolist()) for u, v in factors.items()],
                                        f"{C.USER_IDX} int, {C.FEATURES} array<float>")
            history = recommend.indexed_history(theirs, mine, iids)
            rows = recommend.user_rows(history, fdf, cfg.recommend, model.meta)
            if model.plan.ranker is not None:
                priced = ranking.live_reference(ranking.priced_history(theirs, mine, iids), model.ranked_at)
                rows = ranking.with_inputs(rows, priced, F.col(ranking.LIVE_REFERENCE))
            rows = rows.join(mine, C.USER_IDX).toPandas()
            parts = list(block.lists_in_blocks(rows, model.plan))
            lists = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(block.KEYED_NAMES))
        with rec.step("publish"):
            listed = sorted(set(rows[C.USER_ID])) if len(rows) else []
            if listed:
                stamp = {C.MODEL_VERSION: model.model_version or "fallback", C.RUN_ID: ctx.run_id, C.GENERATED_AT: ctx.now}
                out = spark.createDataFrame(lists.assign(**stamp), LIVE_SCHEMA)
                version = merges.replace_lists(out, cfg, C.LIVE_RECOMMENDATIONS, 2 * cfg.recommend.n, properties=LIVE_PROPERTIES)
                rec.outputs[cfg.table_name(C.LIVE_RECOMMENDATIONS)] = version
        rec.details["folded_in"] = len(factors)
        return len(listed)

    def compact(self, ctx: RunContext) -> None:
        with ctx.stage("compact") as rec:
            for key in APPENDED:
                rec.details[ctx.cfg.table_name(key)] = tables.compact(ctx.spark, ctx.cfg, key)


LIVE_SCHEMA = (
    f"{block.KEYED_SCHEMA}, {C.MODEL_VERSION} string, {C.RUN_ID} string, {C.GENERATED_AT} timestamp"
)


def start(spark: SparkSession, cfg: Config, *, once: bool = False):
    """Start the stream; returns (query, handler). `once` processes what is there now and stops (Trigger.AvailableNow)."""
    handler = LiveStream(spark, cfg)
    writer = sources.read_stream(spark, cfg).writeStream.foreachBatch(handler.process).option(
        "checkpointLocation", cfg.stream_checkpoint).queryName("sparkrec-stream")
    writer = writer.trigger(availableNow=True) if once else writer.trigger(processingTime=f"{cfg.stream.trigger_seconds} seconds")
    return writer.start(), handler


def stream_key(cfg: Config) -> str:
    """A short name for this stream in logs: its source and checkpoint."""
    src = cfg.stream.source
    where = f"{src.bootstrap_servers}/{src.topic}" if src.kind == "kafka" else src.path
    return f"{src.kind}:{where} ({hashlib.sha256(cfg.stream_checkpoint.encode()).hexdigest()[:8]})"


def run(spark: SparkSession, cfg: Config, *, once: bool = False) -> str:
    """Run the stream until it is stopped (or, `once`, until what is available now is processed); a summary.

    The clean runs beside the query, every `stream.clean_seconds`, and once more at the end, so what
    the stream appended is classified before the command returns.

    Raises:
        StageError: the query failed (the micro-batch's own error first); the checkpoint and every table
            are as the last finished batch left them, and running again resumes from there.
    """
    query, handler = start(spark, cfg, once=once)
    log.info("stream %s started (checkpoint %s, trigger %s)", stream_key(cfg), cfg.stream_checkpoint,
             "available now" if once else f"{cfg.stream.trigger_seconds:g} s")
    failure: list[BaseException] = []
    stopped = threading.Event()

    def clean_loop() -> None:
        failed = 0
        while not stopped.wait(cfg.stream.clean_seconds):
            if not query.isActive:
                break
            try:
                handler.clean_pass()
                failed = 0
            except Exception as exc:  # noqa: BLE001 - a pass is all-or-nothing per table, and the next one resumes it
                failed += 1
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                if failed < CLEAN_ATTEMPTS:
                    # most often another job's commit (the daily `train` giving ids): the next pass finishes it
                    log.warning("stream: the clean failed (%s); trying again in %g s (%d of %d)", first,
                                cfg.stream.clean_seconds, failed, CLEAN_ATTEMPTS)
                    continue
                failure.append(exc)
                log.error("stream: the clean failed %d times in a row (%s); stopping the stream", failed, first)
                query.stop()

    cleaner = threading.Thread(target=clean_loop, name="sparkrec-stream-clean", daemon=True)
    cleaner.start()
    try:
        query.awaitTermination()
    except KeyboardInterrupt:
        query.stop()
        raise
    except Exception as exc:  # the query's own failure: StreamingQueryException wraps the batch's error
        cause = _first_cause(exc)
        if "UnknownTopicOrPartition" in str(exc):
            src = cfg.stream.source
            cause = (f"topic {src.topic!r} does not exist on {src.bootstrap_servers} (stream.source.topic): create it, "
                     f"or produce to it once, before starting the stream")
        raise StageError(f"the stream stopped: {cause}; run it again to resume from {cfg.stream_checkpoint}") from exc
    finally:
        stopped.set()
        cleaner.join(timeout=600)  # a pass under way finishes (every write of it is atomic)
    if failure:
        raise StageError(f"the stream's clean failed: {_first_cause(failure[0])}; run it again to resume") from failure[0]
    handler.clean_pass()
    return summary(handler.ledger, handler.cleans)


def _first_cause(exc: BaseException) -> str:
    """The line of a (possibly Py4J-wrapped) error that names what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line) and "Py4J" not in line:
            return line[:500]
    return (lines[0] if lines else type(exc).__name__)[:500]


def summary(batches: list[dict], cleans: list[ledger_.Ledger]) -> str:
    """What the batches and clean passes of this process did, in two lines."""
    events = sum(e["events"] for e in batches)
    lat = [e["latency_p50_s"] for e in batches if e["latency_p50_s"] is not None]
    rows_in, kept, quarantined, dups = (sum(getattr(t, k) for t in cleans) for k in ("rows_in", "kept", "quarantined", "duplicates"))
    return (f"stream: {len(batches)} batch(es), {events:,} events, "
            f"{sum(e['users_updated'] for e in batches):,} customer list(s) updated"
            + (f", median batch latency {float(np.median(lat)):.1f} s" if lat else "")
            + f"\nclean: {len(cleans)} pass(es), {rows_in:,} rows classified = {kept:,} kept + {quarantined:,} quarantined"
            f" + {dups:,} duplicates")
