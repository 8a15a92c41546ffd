"""What the server holds: one immutable snapshot of the published tables, swapped whole when a run publishes.

A snapshot is built from the newest succeeded `recommend` stage in `runs`: its
record names the versions of `recommendations`, `similar_items`,
`serving_items` and `item_factors` it wrote or read, and the snapshot reads
exactly those, so its lists, similar items and plan always belong together. A
request takes the current snapshot once (one attribute read) and answers from
it; the loader builds the next one beside it and replaces the reference, so a
swap never makes a request fail or wait.

Memory, per snapshot (two exist only while a swap is built):
- the lists: customers x n rows in column arrays (about 100 bytes a row with
  the keys and explanation text) and a hash index of the customers;
- similar items: items x k rows, the same way;
- the plan: the candidate and explanation matrices (items x rank float32 each)
  and the catalogue (items); with a ranker, its item statistics (about 0.6 KB an
  item with 50 co-purchase neighbours) and its model.
So it grows with customers x n and with items x rank, never with the history.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from sparkrec.core import block, foldin, pseudonyms, serving, topk
from sparkrec.core import columns as C
from sparkrec.core.config import Config, TrainConfig
from sparkrec.core.errors import StageError
from sparkrec.core.recnames import EXCLUDED
from sparkrec.serve import live, reader, search

log = logging.getLogger(__name__)

LIST_COLUMNS = (C.USER_ID, C.ITEM_ID, C.RANK, C.SCORE, C.REC_SOURCE, C.BECAUSE_ITEM_ID, C.EXPLANATION)
SIMILAR_COLUMNS = (C.ITEM_ID, C.SIMILAR_ITEM_ID, C.RANK, C.SCORE)


class Lists:
    """Rows grouped by a key (a customer, an item), in rank order, held compactly.

    Text columns are dictionary codes (int32) into their distinct values: an explanation or an item key
    repeated across a million lists is stored once. The keys are a hash index; `bounds` gives each key's rows.
    """

    def __init__(self, table: pa.Table, key: str) -> None:
        table = table.sort_by([(key, "ascending"), (C.RANK, "ascending")]) if table.num_rows else table
        keys = table.column(key).combine_chunks() if table.num_rows else pa.array([], pa.string())
        if len(keys):
            change = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1)).to_numpy(zero_copy_only=False)
            starts = np.flatnonzero(np.r_[True, change])
        else:
            starts = np.zeros(0, dtype=np.int64)
        self.index = pd.Index(keys.take(pa.array(starts)).to_pylist() if len(keys) else [], dtype=object)
        self.bounds = np.r_[starts, len(keys)].astype(np.int64)
        self.columns: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for name in table.column_names:
            if name == key:
                continue
            col = table.column(name).combine_chunks()
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type):
                enc = col.cast(pa.string()).dictionary_encode()
                codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
                values = np.array(enc.dictionary.to_pylist() + [None], dtype=object)  # code -1: the trailing None
                self.columns[name] = (codes, values)
            else:
                self.columns[name] = (np.array(col.to_numpy(zero_copy_only=False)), None)  # a copy: `drop` writes

    def __len__(self) -> int:
        return len(self.index)

    @property
    def rows(self) -> int:
        return int(self.bounds[-1]) if len(self.bounds) else 0

    @property
    def nbytes(self) -> int:
        return int(self.bounds.nbytes + sum(c.nbytes + (0 if v is None else v.nbytes) for c, v in self.columns.values()))

    removed: frozenset[str] = frozenset()

    def drop(self, key: str) -> None:
        """Hold nothing more of `key` (an erasure): its rows blanked, the key never matched again."""
        try:
            at = self.index.get_loc(key)
        except KeyError:
            return
        self.removed = self.removed | {key}  # first: a request under way stops matching before the rows go
        s = slice(int(self.bounds[at]), int(self.bounds[at + 1]))
        for codes, values in self.columns.values():
            codes[s] = -1 if values is not None else 0

    def get(self, key: str, n: int) -> list[dict[str, Any]] | None:
        """The first `n` rows of `key` as dicts (None: the key has no rows)."""
        if key in self.removed:
            return None
        try:
            at = self.index.get_loc(key)
        except KeyError:
            return None
        start, end = int(self.bounds[at]), int(self.bounds[at + 1])
        end = min(end, start + n)
        out = [{} for _ in range(end - start)]
        for name, (codes, values) in self.columns.items():
            got = codes[start:end].tolist() if values is None else values[codes[start:end]].tolist()
            for row, v in zip(out, got):
                row[name] = v
        return out


@dataclass
class Snapshot:
    """One consistent set of published tables, as a recommend stage left them."""

    run_id: str
    model_version: str
    generated_at: datetime | None
    versions: dict[str, int]
    lists: Lists
    similar: Lists
    plan: block.Plan
    cold: list[dict[str, Any]]  # the list of a customer the model has never seen (never a 404)
    names: dict[str, str | None]  # item key -> its name (None: the shop gave none), every catalogue item
    item_index: pd.Index  # item key -> position in the catalogue
    item_cat: np.ndarray | None  # category code per catalogue position
    model: live.Model
    pairs: live.Pairs  # every customer's published pairs
    horizon: datetime | None  # when the interactions the lists stand on were committed
    category_codes: dict[str, int]  # category name -> its code in the plan
    published_at: datetime | None = None  # when the recommend run finished: erasures after it apply to this snapshot
    loaded_at: float = field(default_factory=time.monotonic)
    load_seconds: float = 0.0
    erased: set[str] = field(default_factory=set)  # user hashes already dropped
    category_plans: dict[str, block.Plan] = field(default_factory=dict)  # filled on first use (bounded by categories)
    ranker_reference: datetime | None = None  # when the lists were ranked: the time the ranker's inputs describe
    searchable: search.Searchable | None = None  # the index and ranking inputs (None: search_problem says why)
    search_problem: str | None = None

    def keys_by_hash(self, hashes: set[str], more: list[str]) -> dict[str, str]:
        """The held keys (lists, pairs, `more`) whose erasure hash is in `hashes`."""
        found = {}
        for key in itertools.chain(self.lists.index, self.pairs.index, more):
            h = pseudonyms.user_hash(key)
            if h in hashes:
                found[h] = key
        return found

    def erase(self, key: str) -> None:
        self.lists.drop(key)
        self.pairs.drop(key)

    @property
    def customers(self) -> int:
        return len(self.lists)

    def newest_event(self, key: str) -> datetime | None:
        """The time of the customer's newest event the published list stands on."""
        got = self.pairs.of(key)
        if got is None or not len(got[3]):
            return None
        return datetime.fromtimestamp(int(got[3].max()) / 1e6, tz=timezone.utc)


def _versions(run: dict[str, Any], cfg: Config) -> dict[str, int | None]:
    outs, ins = run["outputs"], run["inputs"]
    name = cfg.table_name
    return {
        C.RECOMMENDATIONS: outs.get(name(C.RECOMMENDATIONS)),
        C.SIMILAR_ITEMS: outs.get(name(C.SIMILAR_ITEMS)),
        C.SERVING_ITEMS: outs.get(name(C.SERVING_ITEMS)),
        C.ITEM_FACTORS: ins.get(name(C.ITEM_FACTORS)),
        C.INTERACTIONS: ins.get(name(C.INTERACTIONS)),
    }


def cold_list(plan: block.Plan, n: int) -> list[dict[str, Any]]:
    """The `n` first items for a customer with no history: the fallback sequence under the rules, by the batch's kernel."""
    row = pd.DataFrame({C.USER_IDX: [-1], C.FEATURES: [None], EXCLUDED: [[]], C.USER_ID: [""]})
    rows = block.lists(row, dataclasses.replace(plan, n=n))
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items() if k != C.USER_ID}
            for r in rows.sort_values(C.RANK).to_dict("records")]


def release_memory() -> None:
    """Hand back what loading a snapshot freed: Arrow's pool and the C heap keep freed pages otherwise
    (1,000,000 customers: 4.3 GB resident after the load, 2.0 GB after this; bench/RESULTS.md)."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the pages return as the allocator sees fit
        pass


def utc(value) -> datetime:
    """A timestamp read from a table (naive means UTC, as Spark writes them) as an aware datetime."""
    ts = pd.Timestamp(value)
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")).to_pydatetime()


def pinned(cfg: Config, key: str, columns, version: int | None, run_id: str) -> reader.Read:
    """A list table at the version its run wrote. `sparkrec forget` deletes rows and then purges old versions, so
    that version may be gone: the latest is read instead, as long as it still holds that run's lists."""
    try:
        return reader.read(cfg, key, columns, version=version, arrow=True)
    except StageError as exc:
        latest = reader.read(cfg, key, columns, where=f"{C.RUN_ID} = {reader.quoted(run_id)}", arrow=True)
        log.warning("serve: %s; reading its latest version %d (still run %s's lists, less erased customers)", exc,
                    latest.version, run_id)
        return latest


def ranker_of(settings: dict[str, Any], run_id: str) -> tuple[str | None, datetime | None]:
    """The ranker a run's lists were ranked with: (its LightGBM model, the time its inputs describe), or Nones.

    A run that names a ranker whose file is gone is still served, with ALS's own order for a customer who acts
    (a warning says so): the published lists stay as they are."""
    rk = settings.get("ranker") or {}
    if not rk.get("path"):
        return None, None
    try:
        text = reader.read_text(f"{rk['path'].rstrip('/')}/{C.RANKER_FILE}", "the ranker of run " + run_id)
    except StageError as exc:
        log.warning("serve: %s; a customer who acts gets ALS's own order until the next run", exc)
        return None, None
    reference = rk.get("reference")
    return text, (utc(reference) if reference else None)


def load(cfg: Config, run: dict[str, Any], previous: Snapshot | None = None) -> Snapshot:
    """Read the tables the recommend run `run` published, at the versions it recorded.

    Raises:
        StageError: the run predates `serving_items` (published by an older sparkrec: run the batch again),
            or a table or version it names is gone.
    """
    started = time.monotonic()
    v = _versions(run, cfg)
    settings = run["details"].get("serving")
    if v[C.SERVING_ITEMS] is None or settings is None:
        raise StageError(f"run {run[C.RUN_ID]} published lists without a serving plan (sparkrec before "
                         f"{cfg.table_name(C.SERVING_ITEMS)} existed): run `sparkrec run` (or `sparkrec recommend`) once more")
    recs = pinned(cfg, C.RECOMMENDATIONS, LIST_COLUMNS, v[C.RECOMMENDATIONS], run[C.RUN_ID])
    sim = (reader.read(cfg, C.SIMILAR_ITEMS, SIMILAR_COLUMNS, version=v[C.SIMILAR_ITEMS], arrow=True)
           if v[C.SIMILAR_ITEMS] is not None else None)
    items = reader.read(cfg, C.SERVING_ITEMS, serving.SERVING_COLUMNS, version=v[C.SERVING_ITEMS],
                        optional=serving.OPTIONAL_COLUMNS)
    factors = None
    if v[C.ITEM_FACTORS] is not None and not run["details"].get("model_version", "").startswith("baseline:"):
        f = reader.read(cfg, C.ITEM_FACTORS, (C.ITEM_IDX, C.FEATURES), version=v[C.ITEM_FACTORS]).frame
        f = f.sort_values(C.ITEM_IDX)
        vectors = np.stack(f[C.FEATURES].to_numpy()).astype(np.float32) if len(f) else np.zeros((0, 1), np.float32)
        factors = topk.ItemMatrix(f[C.ITEM_IDX].to_numpy(), vectors) if len(f) else None
    ranker_model, ranker_reference = ranker_of(settings, run[C.RUN_ID])
    plan = serving.plan_of(items.frame, settings, factors, ranker_model)
    train = TrainConfig.model_validate(settings["train"]) if settings.get("train") else cfg.train
    reference = settings.get("decay_reference")
    model = live.Model(factors, foldin.gram(factors.vectors) if factors is not None else None, train,
                       datetime.fromisoformat(reference) if reference else None)
    item_index = pd.Index(plan.catalogue.item_id)
    try:
        pairs = live.load_pairs(cfg, v[C.INTERACTIONS], model, item_index, ranked=plan.ranker is not None)
        horizon = reader.commit_time(cfg, C.INTERACTIONS, v[C.INTERACTIONS]) if v[C.INTERACTIONS] is not None else None
    except StageError as exc:  # `sparkrec forget` purged that version: the latest, and the events from its commit
        latest = reader.current_version(cfg, C.INTERACTIONS)
        log.warning("serve: %s; reading interactions at its latest version %s instead", exc, latest)
        pairs = live.load_pairs(cfg, latest, model, item_index, ranked=plan.ranker is not None)
        horizon = reader.commit_time(cfg, C.INTERACTIONS, latest) if latest is not None else None
    first = reader.read(cfg, C.RECOMMENDATIONS, [C.GENERATED_AT], version=recs.version, where="\"rank\" = 1 LIMIT 1")
    generated = utc(first.frame[C.GENERATED_AT].iloc[0]) if len(first.frame) else None
    snap = Snapshot(
        run_id=run[C.RUN_ID], model_version=run["details"].get("model_version", "unknown"), generated_at=generated,
        versions={k: int(x) for k, x in v.items() if x is not None},
        lists=Lists(recs.frame, C.USER_ID),
        similar=Lists(sim.frame if sim is not None else pa.table({c: pa.array([], pa.string()) for c in SIMILAR_COLUMNS}),
                      C.ITEM_ID),
        plan=plan, cold=cold_list(plan, max(plan.n, cfg.serve.max_n)), names=dict(zip(plan.catalogue.item_id, plan.catalogue.name)),
        item_index=item_index, item_cat=plan.catalogue.code, model=model, pairs=pairs,
        horizon=horizon, published_at=utc(run["finished_at"]), ranker_reference=ranker_reference,
        category_codes={} if plan.catalogue.code is None else {
            c: int(k) for c, k in zip(plan.catalogue.category, plan.catalogue.code) if c is not None and k >= 0},
    )
    snap.searchable, snap.search_problem = search.load(cfg, run, items.frame, plan.catalogue,
                                                       previous.searchable if previous is not None else None)
    if snap.search_problem:
        log.warning("serve: search cannot answer for run %s: %s", snap.run_id, snap.search_problem)
    snap.load_seconds = time.monotonic() - started
    log.info("serve: loaded run %s (model %s): %s customers' lists, %s items, in %.1f s", snap.run_id,
             snap.model_version, f"{snap.customers:,}", f"{len(plan.catalogue.item_idx):,}", snap.load_seconds)
    return snap


class State:
    """The current snapshot and the background loader that replaces it when a new run is published."""

    def __init__(self, cfg: Config, secret: bytes | None = None) -> None:
        self.cfg = cfg
        self.live = live.Live(cfg, secret)
        self.feed = None
        self.erasures_version: int | None = None
        self.runs_version: int | None = None
        self._erasures_checked = 0.0
        self.snapshot: Snapshot | None = None
        self.problem: str | None = "starting: no published lists loaded yet"
        self.checked_at: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load the newest published run if it is not the one held; True when a new snapshot was swapped in."""
        current = self.snapshot.run_id if self.snapshot is not None else None
        try:
            version = reader.current_version(self.cfg, C.RUNS)
            if version is not None and version == self.runs_version and self.snapshot is not None:
                return False  # nothing recorded since the last look: a log listing, not a query (1.5 ms against 8)
            run = reader.latest_recommend_run(self.cfg, after=current)
            self.checked_at = datetime.now(timezone.utc)
            if run is None:
                self.runs_version = version
                if current is None:
                    self.problem = (f"no published lists in {self.cfg.warehouse} yet: run the batch (`sparkrec run`) first")
                return False
            snap = load(self.cfg, run, self.snapshot)
        except StageError as exc:
            self.problem = str(exc)
            log.error("serve: %s", exc)
            return False
        self.runs_version = version  # only now: a run that failed to load is tried again next time
        self.apply_erasures(snap, force=True)
        self.snapshot = snap  # one reference assignment: requests see the old or the new snapshot, never a mix
        self.live.rebase(snap)
        self.problem = None
        release_memory()
        return True

    def apply_erasures(self, snap: Snapshot | None, force: bool = False) -> int:
        """Drop every customer `sparkrec forget` erased after `snap` was published: their list, pairs and events.

        Checks the erasures table's version (one small read) and reads it only when it changed (or `force`).
        Returns how many customers were dropped.
        """
        version = reader.current_version(self.cfg, C.ERASURES)
        if version is None or (version == self.erasures_version and not force) or snap is None:
            return 0
        got = reader.erasures(self.cfg)
        if got is None or got.frame.empty:
            self.erasures_version = version
            return 0
        dropped = 0
        for erased_at, hashes in zip(got.frame["erased_at"], got.frame["user_hashes"]):
            at = utc(erased_at)
            for h in hashes:
                self.live.erasures[h] = max(self.live.erasures.get(h, 0.0), at.timestamp())
            new = set(hashes) - snap.erased
            if not new:
                continue
            found = snap.keys_by_hash(new, list(self.live.events))
            for h, key in found.items():
                if snap.published_at is None or at >= snap.published_at:
                    snap.erase(key)
                self.live.forget(key, before=at.timestamp())
                dropped += 1
            snap.erased |= new
        self.erasures_version = version  # only now: an erasure that failed half-way is applied again next second
        if dropped:
            log.info("serve: %d erased customer(s) dropped", dropped)
        return dropped

    def follow(self) -> None:
        """Read the stream's source from the snapshot's horizon and fold each customer's events in, until stopped."""
        while not self._stop.is_set():
            snap = self.snapshot
            if snap is None:
                self._stop.wait(0.2)
                continue
            if self.feed is None:
                self.feed = live.feed_for(self.cfg, snap.horizon)
                log.info("serve: following %s from %s", self.cfg.stream.source.kind,
                         snap.horizon.isoformat() if snap.horizon else "the beginning")
            if time.monotonic() - self._erasures_checked >= 1.0:
                self._erasures_checked = time.monotonic()
                try:
                    self.apply_erasures(snap)
                except Exception:  # noqa: BLE001 - the next check tries again; serving goes on
                    log.exception("serve: reading the erasures failed")
            got = self.feed.poll(0.05)
            if got:
                try:
                    self.live.add(got, self.snapshot)
                except Exception:  # noqa: BLE001 - one bad event must not stop the feed; logged, counted
                    log.exception("serve: folding %d event(s) in failed", len(got))
                    self.live.rejected["error"] += len(got)
        if self.feed is not None:
            self.feed.close()

    def start(self) -> None:
        """Load once now (the server is not ready before), then look for new runs every `serve.reload_seconds`."""
        self.refresh()

        def loop() -> None:
            while not self._stop.wait(self.cfg.serve.reload_seconds):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - the loader must outlive one bad read; the next try may succeed
                    log.exception("serve: loading the published tables failed; keeping the snapshot held")

        self._thread = threading.Thread(target=loop, name="sparkrec-serve-loader", daemon=True)
        self._thread.start()
        self._follower = threading.Thread(target=self.follow, name="sparkrec-serve-feed", daemon=True)
        self._follower.start()

    def stop(self) -> None:
        self._stop.set()
        for t in (self._thread, getattr(self, "_follower", None)):
            if t is not None:
                t.join(timeout=30)
