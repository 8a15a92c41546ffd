"""Hostile input, property-based: whatever a website logs, the clean neither fails nor loses a row.

Hypothesis builds batches of rows from the worst of what real logs hold
(missing fields, wrong types, unparsable and extreme timestamps, NaN and
infinities, huge strings, control characters and NUL, emoji, ids that look
like SQL or paths, replays of one event id) and the full clean chain classifies
them. Two properties must hold for every batch: every input row comes out
exactly once with one outcome (rows in = kept + quarantined + duplicates), and
every kept row satisfies every rule.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparkrec.batch import clean  # noqa: E402
from sparkrec.core import columns as C  # noqa: E402
from sparkrec.core.config import load_config  # noqa: E402
from tests.helpers import raw_events  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CFG = load_config(ROOT / "conf" / "local.yaml", ["clean.max_id_length=64"])
NOW = datetime(2025, 7, 1, tzinfo=timezone.utc)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

NASTY = ["'; DROP TABLE interactions;--", "../../etc/passwd", "C:\\Windows\\system32", '{"id": 1}', "[1, 2]", "true",
         "", " ", "\x00", "u\x00ser", "tab\there", "line\nbreak", "🛒🎁", "Ünïcødé", "NaN", "null", "None", "${jndi:ldap://x}"]
ids = st.one_of(st.none(), st.sampled_from(NASTY), st.sampled_from(["u1", "u2", "u3", "i1", "i2"]),
                st.text(max_size=12), st.text(min_size=65, max_size=120))
timestamps = st.one_of(
    st.none(), st.sampled_from(["2025-06-01T10:00:00Z", "2025-06-30T23:59:59Z", "2025-06-15 08:00:00", "not a time", "",
                                "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "2025-13-45T99:00:00Z", "1970-01-01T00:00:00Z",
                                "2025-07-01T23:00:00Z", "2025-07-03T00:00:00Z", "+275760-09-13T00:00:00Z"]),
    st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2030, 1, 1)).map(lambda d: d.isoformat() + "Z"),
    st.text(max_size=30),
)
numbers = st.one_of(st.none(), st.sampled_from(["NaN", "nan", "inf", "-Infinity", "1e400", "-1e400", "-3", "0", "2", "5", "abc", "",
                                                "0x10", "1,5", " 7 "]),
                    st.floats(allow_nan=True, allow_infinity=True).map(str), st.integers(-10**20, 10**20).map(str))
types = st.one_of(st.none(), st.sampled_from(["view", "purchase", "cart", "rating", "VIEW", " Purchase ", "order", "unknown", "", "🛒"]))
event_ids = st.one_of(st.none(), st.sampled_from(["e1", "e2", "e3"]), st.text(max_size=8))
rows = st.lists(st.tuples(event_ids, ids, ids, types, timestamps, numbers, numbers, numbers), min_size=1, max_size=40)
corrupt = st.one_of(st.none(), st.sampled_from(['{"user_id": "u1", "item', "\x00\x01garbage", "🛒" * 50]))


def kept_row_breaks_a_rule(r) -> str | None:
    """The rule a kept row breaks, or None: the rules written out again, independently of clean's Column code."""
    for field in (C.USER_ID, C.ITEM_ID):
        v = r[field]
        if v is None or v != v.strip(" ") or v == "":
            return f"{field} missing or untrimmed: {v!r}"
        if len(v) > CFG.clean.max_id_length or any(ord(ch) < 32 or ord(ch) == 127 for ch in v):
            return f"{field} invalid: {v!r}"
        if (v.startswith("{") and v.endswith("}")) or (v.startswith("[") and v.endswith("]")) or v.lower() in ("true", "false"):
            return f"{field} looks like JSON: {v!r}"
    if r[C.EVENT_TYPE] not in ("view", "cart", "purchase", "rating"):
        return f"event type {r[C.EVENT_TYPE]!r}"
    ts = r[C.EVENT_TS]  # microseconds since 1970
    if ts is None:
        return "no event time"
    lo = CFG.clean.min_event_time.replace(tzinfo=timezone.utc)
    hi = NOW + timedelta(hours=CFG.clean.max_future_hours)
    if not (lo - EPOCH) // timedelta(microseconds=1) <= ts <= (hi - EPOCH) // timedelta(microseconds=1):
        return f"event time out of range: {ts} us"
    for field in (C.QUANTITY, C.PRICE, C.RATING):
        v = r[field]
        if v is not None and not math.isfinite(v):
            return f"{field} not finite: {v}"
    if r[C.QUANTITY] is not None and r[C.QUANTITY] <= 0:
        return f"quantity {r[C.QUANTITY]}"
    if r[C.EVENT_TYPE] == "rating" and (r[C.RATING] is None or not CFG.clean.rating_min <= r[C.RATING] <= CFG.clean.rating_max):
        return f"rating {r[C.RATING]}"
    return None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          derandomize=True)
@given(batch=rows, bad_lines=st.lists(corrupt, min_size=0, max_size=3))
def test_no_row_is_lost_and_every_kept_row_meets_the_rules(spark, batch, bad_lines):
    from pyspark.sql import functions as F

    lines = [tuple(r[:5]) + (r[7], r[5], r[6]) for r in batch]  # event_id, user, item, type, ts, rating, quantity, price
    lines += [(None,) * 8 for _ in bad_lines]
    raw = raw_events(spark, lines, corrupt=[None] * len(batch) + list(bad_lines))
    classified = clean.classify(raw, CFG.source, CFG.clean, NOW)
    # Spark reads times Python cannot hold (year 275760): compare them as microseconds since 1970.
    out = classified.select(*[F.col(c) for c in classified.columns if c != C.EVENT_TS],
                            F.unix_micros(C.EVENT_TS).alias(C.EVENT_TS)).collect()

    assert len(out) == len(lines)  # every row comes out once
    assert sorted(r[C.RAW_KEY] for r in out) == sorted(r[C.RAW_KEY] for r in raw.collect())
    outcomes = [r[clean.OUTCOME] for r in out]
    assert set(outcomes) <= {"kept", "quarantined", "duplicate"} and None not in outcomes
    for r in out:
        if r[clean.OUTCOME] == "kept":
            broken = kept_row_breaks_a_rule(r)
            assert broken is None, f"kept row breaks a rule: {broken} ({r.asDict()})"
        elif r[clean.OUTCOME] == "quarantined":
            assert r[C.REASON], r.asDict()
    # malformed lines are quarantined as such, with their text kept
    malformed = [r for r in out if r[C.CORRUPT_RECORD] is not None]
    assert len(malformed) == sum(1 for b in bad_lines if b is not None)
    assert all(r[C.REASON] == "malformed_line" for r in malformed)


def test_the_report_shows_data_and_config_as_text_never_as_markup():
    from sparkrec.batch import report

    hostile = '<script>alert("x")</script>'
    row = {"details": json.dumps({"reasons": {hostile: 3}, "mode": "incremental", "why": hostile, "read_versions": [1, 2]}),
           "rows_in": 3, "rows_out": 0, "rows_quarantined": 3, "rows_duplicate": 0}
    page = report.ledger_table(row) + report.settings_section(
        {"train": {"details": json.dumps({"als": {"rank": hostile}})}}, {"source": {"path": hostile}})
    assert "<script>" not in page
    assert page.count("&lt;script&gt;") == 4  # the reason, the why, the ALS setting, the config value


PROBES = ROOT / "tests" / "data" / "probes"


@pytest.mark.e2e
@pytest.mark.parametrize(("name", "fmt", "expected"), [
    ("nasty.jsonl", "json", {
        "j1": None, "j6": None, "j8": None, "j9": None,  # odd but valid ids are kept, as text
        "4": "invalid_item_id",  # a number where a string was expected is read as text; an array is no id
        "j5": "invalid_user_id", "j7": "invalid_user_id", "j14": "invalid_user_id", "j10": "timestamp_out_of_range",
        "j11": "invalid_quantity", "j12": "unparsable_timestamp", "j13": "unknown_event_type", "j15": "invalid_rating",
    }),
    ("odd_types.parquet", "parquet", {
        "1": None, "2": "invalid_quantity", "3": "missing_user_id", "4": "unparsable_timestamp",
        "5": "non_positive_quantity", "6": "unknown_event_type",
    }),
])
def test_the_nasty_corpus_is_ingested_with_a_reason_per_row_and_nothing_lost(spark, make_config, name, fmt, expected):
    """Committed files of the worst kind (tests/data/probes): truncated and non-JSON lines, wrong types, NUL,
    emoji, a 5,000-character id, ids that look like SQL or paths; a Parquet file whose ids are numbers,
    whose times are real timestamps and whose price is a boolean."""
    from pyspark.sql import functions as F

    from sparkrec.batch import pipeline
    from sparkrec.storage import tables
    from sparkrec.storage.runs import RunContext

    cfg = make_config(f"source.format={fmt}", f"source.path={PROBES / name}", "items.path=null", "clean.min_kept_ratio=null",
                      "clean.max_id_length=256")
    pipeline.run_stages(RunContext(spark, cfg), ("ingest",))
    tally = pipeline.run_clean(RunContext(spark, cfg))
    rows_in = sum(1 for line in (PROBES / name).read_text(encoding="utf-8").splitlines() if line.strip()) if fmt == "json" else 6
    assert tally.rows_in == rows_in == tally.kept + tally.quarantined + tally.duplicates
    kept = {r[C.EVENT_ID]: None for r in tables.read_table(spark, cfg, C.INTERACTIONS).df.collect()}
    q = tables.read_table(spark, cfg, C.QUARANTINE).df.collect()
    assert all(r[C.REASON] for r in q)
    parsed = {json.loads(r[C.RAW_RECORD]).get("event_id"): r[C.REASON] for r in q if r[C.CORRUPT_RECORD] is None}
    parsed = {str(k) if k is not None else None: v for k, v in parsed.items()}
    got = {**kept, **{k: v for k, v in parsed.items() if k is not None}}
    assert {k: got.get(k, "missing") for k in expected} == expected
    if fmt == "json":  # the truncated object and the HTML line are kept whole as malformed lines
        malformed = sorted(r[C.CORRUPT_RECORD] for r in q if r[C.REASON] == "malformed_line")
        assert malformed == sorted(['{"event_id": "j2", "user_id": "u2", "item', "<html><body>502 Bad Gateway</body></html>"])
        inter = tables.read_table(spark, cfg, C.INTERACTIONS).df
        assert inter.where(F.col(C.USER_ID) == "'; DROP TABLE interactions;--").count() == 1  # data, never SQL
