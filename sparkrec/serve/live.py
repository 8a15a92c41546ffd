"""Customers' histories and the events that change them: a list recomputed the moment its customer acts.

The published snapshot fixes every customer's history as the recommend run
read it (`interactions` at the version its `runs` row names). Events that
arrived after that version was committed (the horizon) are read from the
stream's source, Kafka or the file directory, by whoever produced them, and
kept per customer. Each one goes through the clean's row rules
(`core.events.accept`); the customer's pairs are the published ones plus the
new events' (`pair_stats`), folded into the model (`foldin`) and scored with
the recommend stage's own plan (`block.lists`). The list is computed when the
event arrives, so a read stays a lookup.

Memory: the published pairs (customers x distinct items each, about 30 bytes a
pair plus the customer's key once; 24 bytes more per customer when the lists
are ranked: their activity), and per customer who acted since the horizon
their new events and their list. A new snapshot drops the events it
already holds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from sparkrec.core import block, events, foldin, pseudonyms, ranker, topk
from sparkrec.core import columns as C
from sparkrec.core.config import Config, TrainConfig
from sparkrec.core.recnames import RK_AGE, RK_ITEMS, RK_USER
from sparkrec.serve import reader

log = logging.getLogger(__name__)


@dataclass
class Model:
    """What folding a customer in needs: the model's item factors, their Gram matrix and its settings."""

    factors: topk.ItemMatrix | None
    yty: np.ndarray | None
    train: TrainConfig
    reference: datetime | None

    def positions(self, item_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.factors is None:
            return np.zeros(len(item_idx), dtype=np.int64), np.zeros(len(item_idx), dtype=bool)
        return self.factors.positions(item_idx)


class Pairs:
    """Every customer's published pairs, grouped by customer in flat arrays (a hash index of the keys).

    Built from `interactions` as Arrow columns, dictionary-encoded: no Python object per event, so a warehouse
    of tens of millions of events loads in the memory of its pairs (about 30 bytes each) and the keys.
    """

    def __init__(self, index: pd.Index, bounds: np.ndarray, item_pos: np.ndarray, weight: np.ndarray,
                 strength: np.ndarray, last_us: np.ndarray, excluded: np.ndarray,
                 activity: tuple[np.ndarray, ...] | None = None) -> None:
        self.index, self.bounds = index, bounds
        self.item_pos, self.weight, self.strength, self.last_us, self.excluded = item_pos, weight, strength, last_us, excluded
        # Per customer, in `index` order, when the lists are ranked (`ranker.activity`): days with an event, first
        # event, last event's day, median price. 24 bytes a customer.
        self.activity = activity

    @classmethod
    def of_events(cls, table: pa.Table, catalogue_index: pd.Index, train: TrainConfig, reference: datetime | None,
                  exclude_types: list[str], ranked: bool = False) -> Pairs:
        """Events (user_id, item_id, event_type, event_ts, rating[, price]) to pairs: the live path's own kernels
        (`events.event_arrays`, `events.reduce_pairs`), on dictionary codes. `ranked`: also each customer's
        `activity`, from the same events (the ranker's customer features)."""
        def codes(name: str) -> tuple[np.ndarray, np.ndarray]:
            enc = table.column(name).combine_chunks().cast(pa.string()).dictionary_encode()
            return (enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64),
                    np.asarray(enc.dictionary.to_pylist(), dtype=object))

        if table.num_rows == 0:
            empty = np.zeros(0, dtype=np.int64)
            return cls(pd.Index([], dtype=object), np.zeros(1, dtype=np.int64), empty.astype(np.int32), empty.astype(float),
                       empty.astype(np.int8), empty, empty.astype(bool))
        ucode, users = codes(C.USER_ID)
        icode, items = codes(C.ITEM_ID)
        tcode, types = codes(C.EVENT_TYPE)
        item_pos = catalogue_index.get_indexer(items)  # an item without an id is in no list (as in batch)
        ts = table.column(C.EVENT_TS).combine_chunks().cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        ts = ts.fill_null(0).to_numpy(zero_copy_only=False)
        rating = table.column(C.RATING).combine_chunks().cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
        keep = (ucode >= 0) & (icode >= 0) & (item_pos[np.maximum(icode, 0)] >= 0)
        ucode, icode, tcode, ts, rating = ucode[keep], icode[keep], tcode[keep], ts[keep], rating[keep]
        w, s, x = events.event_arrays(np.append(types, None)[tcode], ts, rating, train, reference, exclude_types)
        first, w, s, t, x = events.reduce_pairs(ucode * max(len(items), 1) + icode, w, s, ts, x)
        user = ucode[first]  # reduce_pairs sorts by its group code: users come out grouped, in code order
        starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else np.zeros(0, dtype=np.int64)
        index = pd.Index(users[user[starts]], dtype=object)
        act = None
        if ranked:
            price = (table.column(C.PRICE).combine_chunks().cast(pa.float64()).fill_null(np.nan)
                     .to_numpy(zero_copy_only=False)[keep] if C.PRICE in table.column_names else np.full(len(ucode), np.nan))
            act = tuple(a[user[starts]] for a in ranker.activity(ucode, ts, price, len(users)))
        return cls(index, np.r_[starts, len(user)].astype(np.int64), item_pos[icode[first]].astype(np.int32),
                   w.astype(np.float64), s.astype(np.int8), t.astype(np.int64), x.astype(bool), act)

    removed: frozenset[str] = frozenset()

    def of(self, user: str) -> tuple[np.ndarray, ...] | None:
        if user in self.removed:
            return None
        try:
            at = self.index.get_loc(user)
        except KeyError:
            return None
        s = slice(int(self.bounds[at]), int(self.bounds[at + 1]))
        return self.item_pos[s], self.weight[s], self.strength[s], self.last_us[s], self.excluded[s]

    def activity_of(self, user: str) -> tuple | None:
        """(days with an event, first event µs, last event's day, median price) of a customer, or None."""
        if self.activity is None or user in self.removed:
            return None
        try:
            at = self.index.get_loc(user)
        except KeyError:
            return None
        return tuple(a[at] for a in self.activity)

    def drop(self, user: str) -> None:
        """Hold nothing more of a customer (an erasure): their pairs zeroed, their key never matched again."""
        try:
            at = self.index.get_loc(user)
        except KeyError:
            return
        self.removed = self.removed | {user}
        s = slice(int(self.bounds[at]), int(self.bounds[at + 1]))
        for arr in (self.item_pos, self.weight, self.strength, self.last_us, self.excluded):
            arr[s] = 0
        for arr in self.activity or ():
            arr[at] = 0

    @property
    def nbytes(self) -> int:
        arrays = (self.item_pos, self.weight, self.strength, self.last_us, self.excluded, self.bounds, *(self.activity or ()))
        return sum(a.nbytes for a in arrays)


def load_pairs(cfg: Config, version: int | None, model: Model, catalogue_index: pd.Index, ranked: bool = False) -> Pairs:
    """Every customer's pairs from `interactions` at `version` (the events the published lists stand on); with
    `ranked`, also what the ranker needs of each customer (their activity and the prices they paid)."""
    cols = [C.USER_ID, C.ITEM_ID, C.EVENT_TYPE, C.EVENT_TS, C.RATING, *([C.PRICE] if ranked else [])]
    got = reader.read(cfg, C.INTERACTIONS, cols, version=version, required=False, optional=(C.RATING, C.PRICE), arrow=True)
    table = got.frame if got is not None else pa.table({c: pa.array([], pa.string()) for c in cols})
    return Pairs.of_events(table, catalogue_index, model.train, model.reference, cfg.recommend.exclude_event_types, ranked)


class Live:
    """The customers who acted since the horizon: their new events and their recomputed lists. Thread-safe."""

    def __init__(self, cfg: Config, secret: bytes | None, max_events_per_customer: int = 1000) -> None:
        self.cfg, self.secret = cfg, secret
        self.max_events = max_events_per_customer
        self.events: dict[str, list[tuple[events.Event, float]]] = {}  # stored key -> [(event, arrived epoch s)]
        self.lists: dict[str, tuple[list[dict[str, Any]], datetime, str]] = {}  # key -> (rows, as_of, run id)
        self.rejected: Counter[str] = Counter()
        self.applied = 0
        self.last_arrival: float | None = None
        self.observe = None  # called with each list's lag (s, event arrival -> list recomputed): the metrics' histogram
        # Erased customers (`sparkrec forget`): user hash -> when (epoch s). Their events that arrived before
        # it are never folded in again, even when a restarted server reads them from the topic once more.
        self.erasures: dict[str, float] = {}
        self._lock = threading.Lock()

    def stored_key(self, key: str) -> str:
        return pseudonyms.pseudonym(self.secret, key) if self.secret is not None else key

    def add(self, raw_events: list[tuple[dict[str, Any], float]], snap) -> list[str]:
        """Raw events (with their arrival time, epoch seconds) through the row rules; returns the customers touched."""
        now = datetime.now(timezone.utc)
        touched: list[str] = []
        with self._lock:
            for raw, arrived in raw_events:
                ev, reason = events.accept(raw, self.cfg.source, self.cfg.clean, now)
                if ev is None:
                    self.rejected[reason] += 1
                    continue
                key = self.stored_key(ev.user_id)
                if self.erasures and arrived < self.erasures.get(pseudonyms.user_hash(key), float("-inf")):
                    self.rejected["erased"] += 1
                    continue
                mine = self.events.setdefault(key, [])
                mine.append((ev, arrived))
                del mine[: max(0, len(mine) - self.max_events)]
                touched.append(key)
                self.applied += 1
                self.last_arrival = max(self.last_arrival or 0.0, arrived)
        self.relist(list(dict.fromkeys(touched)), snap)
        return touched

    def relist(self, keys: list[str], snap) -> None:
        """Recompute these customers' lists from the snapshot and their new events (one pass of the kernel)."""
        with self._lock:
            mine = {k: list(self.events.get(k, ())) for k in keys}
        mine = {k: v for k, v in mine.items() if v}
        if not mine or snap is None:
            return
        got = lists_for({k: [e for e, _ in v] for k, v in mine.items()}, snap, self.cfg)
        now = time.time()
        with self._lock:
            for k, (rows, as_of) in got.items():
                if k in self.events:  # not erased meanwhile
                    self.lists[k] = (rows, as_of, snap.run_id)
        if self.observe is not None:
            for v in mine.values():
                self.observe(max(0.0, now - max(t for _, t in v)))

    def rebase(self, snap) -> None:
        """A new snapshot: drop the events it already holds (arrived before its horizon), relist the rest."""
        horizon = snap.horizon.timestamp() if snap.horizon is not None else None
        with self._lock:
            if horizon is not None:
                self.events = {k: kept for k, v in self.events.items()
                               if (kept := [(e, t) for e, t in v if t >= horizon])}
            self.lists = {}
            keys = list(self.events)
        for start in range(0, len(keys), 1000):
            self.relist(keys[start:start + 1000], snap)

    def forget(self, key: str, before: float | None = None) -> None:
        """Drop a customer's events that arrived before `before` (epoch s; None: all) and their list; later
        events start a new history, as they would in the batch."""
        with self._lock:
            kept = [(e, t) for e, t in self.events.pop(key, []) if before is not None and t >= before]
            self.lists.pop(key, None)
            if kept:
                self.events[key] = kept

    def get(self, key: str) -> tuple[list[dict[str, Any]], datetime, str] | None:
        return self.lists.get(key)

    def events_of(self, key: str) -> list[events.Event]:
        with self._lock:
            return [e for e, _ in self.events.get(key, ())]


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def row_for(key: str, new: list[events.Event], snap, cfg: Config) -> tuple[dict[str, Any], datetime | None]:
    """A customer's row for `block.lists` (their published pairs plus `new` events, folded in) and their newest event."""
    rec, model, cat = cfg.recommend, snap.model, snap.plan.catalogue
    pos = snap.item_index.get_indexer([e.item_id for e in new]) if new else np.zeros(0, dtype=np.int64)
    ts = np.array([(e.event_ts - _EPOCH) // timedelta(microseconds=1) for e in new], dtype=np.int64)
    w, s, x = events.event_arrays(np.array([e.event_type for e in new], dtype=object), ts,
                                  np.array([np.nan if e.rating is None else e.rating for e in new], dtype=np.float64),
                                  model.train, model.reference, rec.exclude_event_types)
    keep = pos >= 0  # an item without an id yet is in no list (as in batch)
    parts = [(pos[keep].astype(np.int64), w[keep], s[keep], ts[keep], x[keep])]
    base = snap.pairs.of(key)
    if base is not None:
        parts.insert(0, (base[0].astype(np.int64), base[1], base[2], base[3], base[4]))
    p_pos, p_w, p_s, p_t, p_x = (np.concatenate([part[i] for part in parts]) for i in range(5))
    first, p_w, p_s, p_t, p_x = events.reduce_pairs(p_pos, p_w, p_s, p_t, p_x)
    p_pos = p_pos[first]
    item_idx = cat.item_idx[p_pos]
    weight = p_w.astype(np.float32)  # as train casts the summed weight
    factor = None
    if model.yty is not None:
        fpos, known = model.positions(item_idx)
        use = known & (weight > 0)
        if use.any():
            als = model.train.als
            factor = foldin.fold_in(model.yty, model.factors.vectors[fpos[use]], weight[use], als.reg_param, als.alpha,
                                    als.nonnegative)
    category = snap.item_cat[p_pos] if snap.item_cat is not None else None
    row = events.user_row(item_idx, weight, p_s, p_t, p_x, category, factor, rec)
    if snap.plan.ranker is not None:
        row.update(ranker_inputs(item_idx, p_t, snap.pairs.activity_of(key), new, ts, snap.ranker_reference))
    as_of = datetime.fromtimestamp(int(p_t.max()) / 1e6, tz=timezone.utc) if len(p_t) else None
    return {C.USER_IDX: -1, C.USER_ID: key, **row}, as_of


def ranker_inputs(item_idx: np.ndarray, last_us: np.ndarray, published: tuple | None, new: list[events.Event],
                  new_us: np.ndarray, reference: datetime | None) -> dict[str, Any]:
    """A customer's ranker inputs (`_rk_items`, `_rk_age`, `_rk_user`) from their pairs, published activity and new events.

    At the run's reference time (the newest event it ranked with), or at the customer's newest event when that
    is later: an item bought a moment ago is 0 days old, and the rest age from it. A new event on a day after the
    customer's last published one adds a day; the median price stays the published one (the new events' own for
    a customer with none).
    """
    prices = np.array([np.nan if e.price is None else e.price for e in new], dtype=np.float64)
    days, first, _, median = (a[0] for a in ranker.activity(np.zeros(len(new_us), np.int64), new_us, prices, 1))
    sessions, price = float(days), float(median)
    if published is not None:
        had_days, had_first, last_day, had_price = published
        new_days = np.unique(np.floor_divide(new_us, ranker.DAY_US))
        sessions = float(had_days) + float(np.sum(new_days > last_day))
        first = min(int(had_first), int(first))  # `activity` gives the largest int64 for no new event
        price = price if np.isnan(had_price) else float(had_price)
    ref = events.micros([reference])[0] if reference is not None else 0
    ref = max(int(ref), int(last_us.max()) if len(last_us) else 0)
    items, ages, user = ranker.customer_inputs(item_idx, last_us, sessions, first, price, ref)
    return {RK_ITEMS: items.tolist(), RK_AGE: ages.tolist(), RK_USER: user.tolist()}


def lists_for(wanted: dict[str, list[events.Event]], snap, cfg: Config) -> dict[str, tuple[list[dict[str, Any]], datetime | None]]:
    """Lists of several customers at once: their rows, then one pass of the batch's kernel (`block.lists`)."""
    rows, as_of = [], {}
    for key, new in wanted.items():
        row, as_of[key] = row_for(key, new, snap, cfg)
        rows.append(row)
    if not rows:
        return {}
    out = block.lists(pd.DataFrame(rows), snap.plan)
    result: dict[str, tuple[list[dict[str, Any]], datetime | None]] = {k: ([], as_of[k]) for k in wanted}
    for r in out.sort_values([C.USER_ID, C.RANK]).to_dict("records"):
        result[r.pop(C.USER_ID)][0].append({k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()})
    return result


def category_plan(plan: block.Plan, code: int) -> block.Plan:
    """The plan with its candidates and fallbacks cut to one category: a filtered list is scored for that
    category (n of its best items for the customer), not the customer's list with the others removed."""
    items = plan.items
    if items is not None:
        m = items.category == code
        items = topk.ItemMatrix(items.item_idx[m], items.vectors[m], items.category[m]) if m.any() else None
    seq = plan.seq
    m = seq.category == code
    seq = topk.FillSequence(seq.item_idx[m], seq.score[m], seq.category[m], seq.source[m], seq.sources, seq.by_category)
    return dataclasses.replace(plan, items=items, seq=seq)


def category_list(key: str, new: list[events.Event], snap, cfg: Config, category: str,
                  n: int) -> tuple[list[dict[str, Any]], datetime | None, str]:
    """A customer's `n` best items of one category: (rows, as_of, kind), computed per request (a fold-in and a
    top-n over the category: milliseconds) with the category's plan, cached per snapshot."""
    plan = snap.category_plans.get(category)
    if plan is None:
        plan = snap.category_plans.setdefault(category, category_plan(snap.plan, snap.category_codes[category]))
    row, as_of = row_for(key, new, snap, cfg)
    kind = "live" if new else ("published" if snap.pairs.of(key) is not None else "cold_start")
    out = block.lists(pd.DataFrame([row]), dataclasses.replace(plan, n=n)).sort_values(C.RANK)
    rows = [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items() if k != C.USER_ID}
            for r in out.to_dict("records")]
    return rows, as_of, kind


def list_for(key: str, new: list[events.Event], snap, cfg: Config) -> tuple[list[dict[str, Any]], datetime | None]:
    """One customer's list (`lists_for` of one)."""
    return lists_for({key: new}, snap, cfg)[key]


# --------------------------------------------------------------------------- where the events come from


class FileFeed:
    """New JSON-lines files in the stream's directory (stream.source.kind files), polled."""

    def __init__(self, cfg: Config, since: datetime | None) -> None:
        self.dir = Path(cfg.serve.events_dir or cfg.stream.source.path or ".")
        self.since = since.timestamp() if since is not None else 0.0
        self.seen: set[str] = set()
        self.connected = True
        self.problem: str | None = None

    def poll(self, timeout: float) -> list[tuple[dict[str, Any], float]]:
        out: list[tuple[dict[str, Any], float]] = []
        if self.dir.is_dir():
            for path in sorted(self.dir.iterdir()):
                if path.name.startswith((".", "_")) or path.name in self.seen or not path.is_file():
                    continue
                arrived = path.stat().st_mtime
                self.seen.add(path.name)
                if arrived < self.since:
                    continue
                for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                    if line.strip():
                        try:
                            out.append((json.loads(line), arrived))
                        except ValueError:
                            out.append((None, arrived))  # malformed: counted by the row rules
        if not out:
            time.sleep(timeout)
        return out

    def close(self) -> None:
        pass


class KafkaFeed:
    """The stream's topic, read from the first offset at or after `since` on every partition (no group commits:
    every replica reads every event)."""

    def __init__(self, cfg: Config, since: datetime | None) -> None:
        from confluent_kafka import Consumer

        live = cfg.stream.source
        opts = {k.removeprefix("kafka."): v for k, v in live.options.items() if k.startswith("kafka.")}
        self.consumer = Consumer({"bootstrap.servers": live.bootstrap_servers, "group.id": f"sparkrec-serve-{id(self)}",
                                  "enable.auto.commit": False, "auto.offset.reset": "earliest", "log_level": 3,
                                  "error_cb": self._error, **opts})
        self.topic, self.since = live.topic, since
        self.assigned = False
        self.connected = False
        self.problem: str | None = None
        self._probed = 0.0

    def _error(self, err) -> None:
        """librdkafka's client-level errors (a broker gone, all brokers down): the feed is degraded until it reads again."""
        self.connected = False
        self.problem = f"the broker {err.str()}"

    def _assign(self) -> None:
        from confluent_kafka import TopicPartition

        meta = self.consumer.list_topics(self.topic, timeout=2)
        parts = meta.topics.get(self.topic)
        if parts is None or parts.error is not None or not parts.partitions:
            raise RuntimeError(f"topic {self.topic!r} not found")
        ms = int(self.since.timestamp() * 1000) if self.since is not None else 0
        wanted = [TopicPartition(self.topic, p, ms) for p in sorted(parts.partitions)]
        offsets = self.consumer.offsets_for_times(wanted, timeout=5)
        # offset -1: no message at or after the time yet; start at the partition's end
        self.consumer.assign([TopicPartition(self.topic, tp.partition, tp.offset if tp.offset >= 0 else -1) for tp in offsets])
        self.assigned = True

    def poll(self, timeout: float) -> list[tuple[dict[str, Any], float]]:
        if not self.assigned:
            try:
                self._assign()
                self.connected = True
            except Exception as exc:  # noqa: BLE001 - the broker may be down or the topic not yet created
                self.connected = False
                log.warning("serve: cannot read %s yet (%s); trying again", self.topic, exc)
                time.sleep(1.0)
                return []
        msgs = self.consumer.consume(num_messages=500, timeout=timeout)
        if not msgs and not self.connected and time.monotonic() - self._probed > 2:
            self._probed = time.monotonic()
            try:  # a quiet topic says nothing: ask the broker whether it is back
                self.consumer.list_topics(self.topic, timeout=1)
                self.connected, self.problem = True, None
            except Exception as exc:  # noqa: BLE001 - still away; the consumer keeps reconnecting by itself
                self.problem = f"the broker does not answer: {exc}"
        out = []
        for m in msgs:
            if m.error() is not None:
                self.connected, self.problem = False, f"reading {self.topic}: {m.error().str()}"
                continue
            self.connected, self.problem = True, None
            try:
                value = json.loads(m.value())
            except (ValueError, TypeError):
                value = None
            out.append((value, m.timestamp()[1] / 1000.0))
        return out

    def close(self) -> None:
        self.consumer.close()


def feed_for(cfg: Config, since: datetime | None):
    return KafkaFeed(cfg, since) if cfg.stream.source.kind == "kafka" else FileFeed(cfg, since)
