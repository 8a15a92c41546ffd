"""A customer's events to the row their list is scored from, without Spark: the live half of clean, train and recommend.

The server folds a customer's new events in the moment they arrive, one
customer at a time, where a Spark job would cost seconds. So the steps between
an event and a list exist here in plain Python and numpy, each the counterpart
of one batch transform and tested against it on the same rows:

    accept          one raw event through the clean's row rules          (`clean.provisional`)
    event_arrays    each event's weight, strength and exclusion          (`train.training_matrix`, `recommend.user_rows`)
    reduce_pairs    events to one row per (customer, item)
    user_row        a customer's pairs to the row `block.lists` scores    (`recommend.user_rows`)

`accept` is tested against the clean on a table of hostile rows; the rest together, by the live path
giving back every published list of a real run (tests/test_serve.py). Rules that need the warehouse's state (a duplicate of an earlier row, the bot
thresholds) are left to the clean, as the Spark stream leaves them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from sparkrec.core import columns as C
from sparkrec.core.config import CleanConfig, InputConfig, RecommendConfig, TrainConfig, as_utc
from sparkrec.core.recnames import EXCLUDED, EXPLAIN_HISTORY, HIST, HIST_TYPE, TOUCHED, TYPE_STRENGTH

# The reasons `accept` gives, named as the clean names them (`batch.clean`).
MALFORMED, MISSING_USER, INVALID_USER, MISSING_ITEM, INVALID_ITEM = (
    "malformed_line", "missing_user_id", "invalid_user_id", "missing_item_id", "invalid_item_id")
CANCELLATION, UNKNOWN_EVENT_TYPE, BAD_TIMESTAMP, TIMESTAMP_OUT_OF_RANGE = (
    "cancellation", "unknown_event_type", "unparsable_timestamp", "timestamp_out_of_range")
BAD_QUANTITY, NON_POSITIVE_QUANTITY, BAD_PRICE, NON_POSITIVE_PRICE, BAD_RATING, NON_PRODUCT = (
    "invalid_quantity", "non_positive_quantity", "invalid_price", "non_positive_price", "invalid_rating", "non_product_item")

_NESTED = re.compile(r"(?s)^\s*(\{.*\}|\[.*\])\s*$")
_CONTROL = re.compile(r"[\x00-\x1F\x7F]")
# Spark's datetime letters a shop's pattern is likely to use, as strptime directives.
_STRPTIME = [("yyyy", "%Y"), ("MM", "%m"), ("dd", "%d"), ("HH", "%H"), ("mm", "%M"), ("ss", "%S"), ("SSSSSS", "%f"),
             ("SSS", "%f"), ("M", "%m"), ("d", "%d"), ("H", "%H"), ("XXX", "%z"), ("Z", "%z"), ("'T'", "T")]


@dataclass(frozen=True)
class Event:
    """One event that passed the row rules, in canonical columns (times in UTC)."""

    user_id: str
    item_id: str
    event_type: str
    event_ts: datetime
    event_id: str | None = None
    quantity: float | None = None
    price: float | None = None
    rating: float | None = None


def _text(value: Any) -> str | None:
    """A raw field as the stream's JSON reader gives it (`primitivesAsString`): text, trimmed, blank as null."""
    if value is None:
        return None
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (dict, list)):
        import json

        text = json.dumps(value, separators=(",", ":"))
    else:
        text = str(value)
    text = text.strip()
    return text or None


def _invalid_id(text: str, max_length: int, json_source: bool) -> bool:
    return (bool(_NESTED.match(text)) or bool(_CONTROL.search(text)) or len(text) > max_length
            or (json_source and text.lower() in ("true", "false")))


def _number(text: str | None) -> tuple[float | None, bool]:
    """(value, unparsable) as Spark's try_cast(... AS DOUBLE) reads text."""
    if text is None:
        return None, False
    try:
        return float(text), False
    except ValueError:
        return None, True


def strptime_pattern(spark_pattern: str) -> str | None:
    """A strptime directive string for a Spark datetime pattern, or None when it uses letters this cannot map."""
    out, i = "", 0
    while i < len(spark_pattern):
        for spark, py in _STRPTIME:
            if spark_pattern.startswith(spark, i):
                out, i = out + py, i + len(spark)
                break
        else:
            ch = spark_pattern[i]
            if ch.isalpha():
                return None
            out, i = out + ch, i + 1
    return out


def parse_time(text: str, src: InputConfig) -> datetime | None:
    """An event time in UTC as the clean reads it (ISO-8601 by default, else `source.timestamp_format`)."""
    try:
        if src.timestamp_format:
            pattern = strptime_pattern(src.timestamp_format)
            if pattern is None:
                return None
            ts = datetime.strptime(text, pattern)
        else:
            ts = datetime.fromisoformat(text.replace(" ", "T", 1) if len(text) > 10 and text[10] == " " else text)
    except ValueError:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=ZoneInfo(src.timezone))
    return ts.astimezone(timezone.utc)


def accept(raw: dict[str, Any], src: InputConfig, clean: CleanConfig, now: datetime) -> tuple[Event | None, str | None]:
    """One raw event (the input's own field names) through the clean's row rules: (event, None) or (None, reason).

    The rules and their order are the clean's (`batch.clean.reject_rules`); the first that fails is the reason.
    """
    cols = src.columns
    json_source = src.format == "json"
    if not isinstance(raw, dict):
        return None, MALFORMED
    user, item = _text(raw.get(cols.user_id)), _text(raw.get(cols.item_id))
    if user is None:
        return None, MISSING_USER
    if _invalid_id(user, clean.max_id_length, json_source):
        return None, INVALID_USER
    if item is None:
        return None, MISSING_ITEM
    if _invalid_id(item, clean.max_id_length, json_source):
        return None, INVALID_ITEM
    if src.kind == "transactions":
        invoice = _text(raw.get(cols.invoice)) or ""
        if invoice.startswith(src.cancellation_prefix):
            return None, CANCELLATION
        etype = C.PURCHASE
    else:
        given = (_text(raw.get(cols.event_type)) or "").lower()
        etype = next((canonical for canonical, names in src.event_types.items()
                      if given in {n.strip().lower() for n in names}), None)
        if etype is None:
            return None, UNKNOWN_EVENT_TYPE
    ts_text = _text(raw.get(cols.timestamp))
    ts = parse_time(ts_text, src) if ts_text is not None else None
    if ts is None:
        return None, BAD_TIMESTAMP
    if ts < as_utc(clean.min_event_time) or ts > as_utc(now) + timedelta(hours=clean.max_future_hours):
        return None, TIMESTAMP_OUT_OF_RANGE
    qty, qty_bad = _number(_text(raw.get(cols.quantity)) if cols.quantity else None)
    price, price_bad = _number(_text(raw.get(cols.price)) if cols.price else None)
    rating, rating_bad = _number(_text(raw.get(cols.rating)) if cols.rating else None)
    finite = lambda v: v is None or math.isfinite(v)  # noqa: E731
    if qty_bad or not finite(qty):
        return None, BAD_QUANTITY
    if price_bad or not finite(price):
        return None, BAD_PRICE
    if clean.reject_non_positive_quantity and qty is not None and qty <= 0:
        return None, NON_POSITIVE_QUANTITY
    if clean.reject_non_positive_price and price is not None and price <= 0:
        return None, NON_POSITIVE_PRICE
    if (etype == C.RATING_EVENT and (rating is None or rating < clean.rating_min or rating > clean.rating_max)) or not finite(rating):
        return None, BAD_RATING
    # One pattern at a time: Python refuses an inline flag such as the retail preset's "(?i)POST" anywhere but at
    # the start of a pattern, so they cannot be joined into one alternation as Spark's Java regex allows.
    if clean.non_product_items and any(re.fullmatch(p, item) for p in clean.non_product_items):
        return None, NON_PRODUCT
    event_id = _text(raw.get(cols.event_id)) if cols.event_id else None
    return Event(user, item, etype, ts, event_id, qty, price, rating), None


# --------------------------------------------------------------------------- per (customer, item)

def event_weights(event_type: np.ndarray, rating: np.ndarray, weights: dict[str, float]) -> np.ndarray:
    """Each event's weight from its type (`train.event_weights`); a rating event scales by its rating."""
    out = np.zeros(len(event_type), dtype=np.float64)
    types = np.asarray(event_type, dtype=object)
    r = np.nan_to_num(np.asarray(rating, dtype=np.float64), nan=0.0)
    for etype, w in weights.items():
        m = types == etype
        out[m] = w * r[m] if etype == C.RATING_EVENT else w
    return out


def micros(ts) -> np.ndarray:
    """Event times as int64 microseconds since the epoch, UTC (how Spark keeps a timestamp)."""
    return pd.to_datetime(pd.Series(ts), utc=True).astype("datetime64[us, UTC]").astype("int64").to_numpy()


def reduce_pairs(group: np.ndarray, weight: np.ndarray, strength: np.ndarray, last_us: np.ndarray,
                 excluded: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows with the same `group` code to one: (first index of each group in sorted order, summed weight,
    strongest type, latest time, any excluded). numpy's reduceat: a small group costs microseconds, not a groupby."""
    order = np.argsort(group, kind="stable")
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if len(g) else np.zeros(0, dtype=np.int64)
    if not len(g):
        return order, weight[:0], strength[:0], last_us[:0], excluded[:0]
    return (order[starts], np.add.reduceat(weight[order], starts), np.maximum.reduceat(strength[order], starts),
            np.maximum.reduceat(last_us[order], starts), np.logical_or.reduceat(excluded[order], starts))


def event_arrays(event_type: np.ndarray, ts_us: np.ndarray, rating: np.ndarray, train: TrainConfig,
                 reference: datetime | None, exclude_types: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per event: its positive, decayed weight (`train.training_matrix`), its strength and whether its type is excluded."""
    w = event_weights(event_type, rating, train.event_weights)
    w = np.where(w > 0, w, 0.0)
    if train.recency_half_life_days is not None and reference is not None:
        age = np.maximum((micros([reference])[0] - ts_us) / 1e6 / 86400.0, 0.0)
        w = w * np.power(0.5, age / train.recency_half_life_days)
    types = np.asarray(event_type, dtype=object)
    strength = np.zeros(len(types), dtype=np.int8)
    for etype, s in TYPE_STRENGTH.items():
        strength[types == etype] = s
    return w, strength, np.isin(types, np.asarray(exclude_types, dtype=object))


def user_row(item_idx: np.ndarray, weight: np.ndarray, strength: np.ndarray, last_us: np.ndarray, excluded: np.ndarray,
             category: np.ndarray | None, factor: np.ndarray | None, rec: RecommendConfig) -> dict[str, Any]:
    """A customer's pairs (items with ids) to the row `block.lists` scores: what `recommend.user_rows` builds in Spark.

    Args:
        category: each item's category code (-1 none), for the category fallback's touched set.
        factor: the customer's folded-in factor, or None (no model list: the fallbacks fill it).
    """
    n_items = len(item_idx)
    row: dict[str, Any] = {
        EXCLUDED: np.sort(item_idx[excluded]).astype(np.int64).tolist(),
        C.FEATURES: factor if factor is not None and n_items >= rec.min_history else None,
    }
    if rec.explain:
        order = np.lexsort((item_idx, -last_us, -strength.astype(np.int64)))[:EXPLAIN_HISTORY]
        row[HIST] = item_idx[order].astype(np.int64).tolist()
        row[HIST_TYPE] = strength[order].astype(np.int64).tolist()
    if rec.fallback == C.SOURCE_CATEGORY_POPULAR and category is not None:
        row[TOUCHED] = sorted({int(c) for c in category if c >= 0})
    return row
