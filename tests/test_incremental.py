"""The incremental clean gives the tables a full recompute gives, whatever order the days arrive in.

Each day's events are a file of their own, ingested and cleaned one run at a
time; the same files cleaned once by a full clean are the reference. The
hand-built days hold every case that needs more than the new rows: a replay
that arrives later with an earlier time (the kept row changes), an exact copy
on a later day, a user pushed over the per-day and the total bot limits by a
later file, and a bot who stops being one when a newcomer takes over one of
their events.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from sparkrec.batch import pipeline
from sparkrec.core import columns as C
from sparkrec.storage import tables
from sparkrec.storage.runs import RunContext

pytestmark = pytest.mark.e2e


def ev(eid, user, item, etype, ts, rating=None):
    return {"event_id": eid, "user_id": user, "item_id": item, "event_type": etype, "timestamp": ts,
            "rating": rating, "quantity": None, "price": "2.5" if etype == "purchase" else None}


DAYS = {
    "d1": [
        ev("e1", "u1", "i1", "view", "2025-06-01T10:00:00Z"),
        ev("e2", "u1", "i2", "purchase", "2025-06-01T11:00:00Z"),
        ev(None, "u2", "i1", "view", "2025-06-01T12:00:00Z"),
        ev(None, "u2", "i1", "view", "2025-06-01T12:00:00Z"),  # an exact copy in the same file
        ev("e3", "u2", "i3", "rating", "2025-06-01T12:30:00Z", "4"),
        # u3: three events on day 1 (the per-day limit is 3: still a person)
        ev("e4", "u3", "i1", "view", "2025-06-01T08:00:00Z"),
        ev("e5", "u3", "i2", "view", "2025-06-01T08:01:00Z"),
        ev("e6", "u3", "i3", "cart", "2025-06-01T08:02:00Z"),
        # u4: four on day 1, three more on day 2: over the total limit of 6 then
        ev("e7", "u4", "i1", "view", "2025-06-01T09:00:00Z"),
        ev("e8", "u4", "i2", "view", "2025-06-02T09:00:00Z"),
        ev("e9", "u4", "i3", "view", "2025-06-03T09:00:00Z"),
        ev("e10", "u4", "i4", "view", "2025-06-04T09:00:00Z"),
        # u5: four on one day: a bot, until e14 goes to u6
        ev("e11", "u5", "i1", "view", "2025-06-01T07:00:00Z"),
        ev("e12", "u5", "i2", "view", "2025-06-01T07:01:00Z"),
        ev("e13", "u5", "i3", "view", "2025-06-01T07:02:00Z"),
        ev("e14", "u5", "i4", "purchase", "2025-06-01T07:03:00Z"),
        ev("e15", "u1", "", "view", "2025-06-01T13:00:00Z"),  # quarantined: no item
    ],
    "d2": [
        ev("e1", "u1", "i1", "view", "2025-06-01T09:30:00Z"),  # replay, earlier: replaces d1's e1
        ev("e2", "u1", "i2", "purchase", "2025-06-02T11:00:00Z"),  # replay, later: a duplicate
        ev(None, "u2", "i1", "view", "2025-06-01T12:00:00Z"),  # copy of d1's row without id: a duplicate
        ev("e16", "u3", "i4", "view", "2025-06-01T08:03:00Z"),  # u3's fourth on 2025-06-01: a bot now
        ev("e17", "u4", "i5", "view", "2025-06-05T09:00:00Z"),
        ev("e18", "u4", "i1", "view", "2025-06-06T09:00:00Z"),
        ev("e19", "u4", "i2", "view", "2025-06-07T09:00:00Z"),  # u4's seventh: over the total
        ev("e14", "u6", "i4", "purchase", "2025-06-01T06:00:00Z"),  # earlier than u5's e14: u5 has 3 now
        ev("e20", "u7", "i2", "rating", "2025-06-02T10:00:00Z", "9"),  # quarantined: rating out of range
    ],
    "d3": [
        ev("e21", "u1", "i3", "cart", "2025-06-03T10:00:00Z"),
        ev("e1", "u8", "i9", "view", "2025-06-01T09:30:00Z"),  # same time as the kept e1, larger raw key? a tie
        ev("e22", "u2", "i2", "purchase", "2025-06-03T10:00:00Z"),
    ],
}

SETTINGS = ["clean.bots.max_events_per_user_day=3", "clean.bots.max_events_per_user=6", "evaluate.enabled=false",
            "train.recency_half_life_days=7", "items.path=null", "clean.min_kept_ratio=null"]


@pytest.fixture(scope="module")
def day_files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("days")
    out = {}
    for day, rows in DAYS.items():
        d = base / day
        d.mkdir()
        (d / f"{day}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[day] = d
    return out


def clean_days(spark, make_config, warehouse: Path, paths: list[Path], *extra: str) -> list[dict]:
    """Ingest and clean each path in turn in one warehouse; the clean stage's records."""
    details = []
    for p in paths:
        cfg = make_config(f"source.path={p}", *SETTINGS, *extra, warehouse=warehouse)
        ctx = RunContext(spark, cfg)
        pipeline.run_stages(ctx, ("ingest", "clean"))
        details.append(ctx)
    return details


def table_rows(spark, cfg, key: str, drop: tuple[str, ...] = ()) -> list[tuple]:
    df = tables.read_required(spark, cfg, key).df.drop(*drop)
    return sorted(tuple(r) for r in df.collect())


def weight_rows(spark, cfg) -> list[tuple]:
    df = tables.read_required(spark, cfg, C.WEIGHTS).df
    return sorted((r[C.USER_ID], r[C.ITEM_ID], r[C.EVENT_TYPE], r[C.EVENTS], r[C.VALUE], r[C.LOG2_DECAYED]) for r in df.collect())


def assert_same_tables(spark, got_cfg, want_cfg):
    assert table_rows(spark, got_cfg, C.INTERACTIONS) == table_rows(spark, want_cfg, C.INTERACTIONS)
    assert table_rows(spark, got_cfg, C.QUARANTINE, (C.RUN_ID,)) == table_rows(spark, want_cfg, C.QUARANTINE, (C.RUN_ID,))
    got, want = weight_rows(spark, got_cfg), weight_rows(spark, want_cfg)
    assert [g[:5] for g in got] == [w[:5] for w in want]
    for g, w in zip(got, want):
        assert math.isclose(g[5], w[5], rel_tol=1e-12), (g, w)
    assert table_rows(spark, got_cfg, C.ITEMS) == table_rows(spark, want_cfg, C.ITEMS)


@pytest.fixture(scope="module")
def full_reference(spark, day_files, tmp_path_factory):
    """All three days cleaned at once by a full clean."""
    from sparkrec.core.config import load_config
    from tests.conftest import ROOT

    wh = tmp_path_factory.mktemp("full") / "wh"
    cfg = None
    for p in day_files.values():  # ingest every file, then one clean over all of them
        cfg = load_config(ROOT / "conf" / "local.yaml", [f"warehouse={wh}", f"source.path={p}", *SETTINGS])
        pipeline.run_stages(RunContext(spark, cfg), ("ingest",))
    cfg = cfg.model_copy(update={"clean": cfg.clean.model_copy(update={"full": True})})
    pipeline.run_stages(RunContext(spark, cfg), ("clean",))
    return cfg


def test_the_days_one_by_one_give_the_full_recompute(spark, make_config, day_files, full_reference, tmp_path):
    wh = tmp_path / "wh"
    ctxs = clean_days(spark, make_config, wh, list(day_files.values()))
    got = ctxs[-1].cfg
    assert_same_tables(spark, got, full_reference)

    # What the full recompute says, by hand: e1 is the 09:30 replay, u3 (4 on one day) and u4 (7 in all) are bots,
    # u5 is not (u6 took e14 with an earlier time), the copies and the later e2 are duplicates.
    inter = {r[C.EVENT_ID]: (r[C.USER_ID], r[C.EVENT_TS].isoformat()) for r in tables.read_required(spark, got, C.INTERACTIONS).df.collect() if r[C.EVENT_ID]}
    assert inter["e1"][1] == "2025-06-01T09:30:00"
    assert inter["e14"][0] == "u6"
    assert {"e11", "e12", "e13"} <= set(inter)  # u5 is a person again
    assert not {"e4", "e5", "e6", "e16", "e7", "e17"} & set(inter)  # u3 and u4 are bots
    bots = tables.read_required(spark, got, C.QUARANTINE).df.where(F.col(C.REASON) == "bot_user").count()
    assert bots == 4 + 7  # u3's four and u4's seven surviving events

    # Each run's ledger is exact for the rows it classified, and says what it was.
    runs = clean_runs(spark, got)
    assert [json.loads(r["details"])["mode"] for r in runs] == ["full", "incremental", "incremental"]
    assert [r["rows_in"] for r in runs] == [len(DAYS["d1"]), len(DAYS["d2"]), len(DAYS["d3"])]
    for r in runs:
        assert r["rows_in"] == r["rows_out"] + r["rows_quarantined"] + r["rows_duplicate"]
    d2 = json.loads(runs[1]["details"])
    assert d2["read_versions"][0] == json.loads(runs[0]["details"])["read_versions"][1] + 1
    # d1's e1 (u1) and u5's e14; the copy without id ties on time and wins when its raw key sorts first
    assert d2["changes"]["demoted"] in (2, 3)
    assert d2["changes"]["moved"] == 3 + 4 + 3  # u3's (e4-e6) and u4's (e7-e10) earlier rows out, u5's e11-e13 back in

    # The same file again: nothing new to classify, nothing changes.
    before = table_rows(spark, got, C.INTERACTIONS)
    clean_days(spark, make_config, wh, [day_files["d1"]])
    last = clean_runs(spark, got)[-1]
    assert json.loads(last["details"])["mode"] == "none" and last["rows_in"] == 0
    assert table_rows(spark, got, C.INTERACTIONS) == before

    # A change of rules makes the next clean full by itself: u4's seven events are under a total limit of 100.
    cfg = make_config(f"source.path={day_files['d3']}", *SETTINGS, "clean.bots.max_events_per_user=100", warehouse=wh)
    pipeline.run_stages(RunContext(spark, cfg), ("clean",))
    details = json.loads(clean_runs(spark, got)[-1]["details"])
    assert details["mode"] == "full" and "rules changed" in details["why"]
    assert tables.read_required(spark, cfg, C.INTERACTIONS).df.where(F.col(C.USER_ID) == "u4").count() == 7


def clean_runs(spark, cfg) -> list:
    return tables.read_required(spark, cfg, C.RUNS).df.where("stage = 'clean'").orderBy("started_at").collect()


def test_days_out_of_order_give_the_full_recompute(spark, make_config, day_files, full_reference, tmp_path):
    paths = [day_files["d3"], day_files["d1"], day_files["d2"]]
    ctxs = clean_days(spark, make_config, tmp_path / "wh", paths)
    assert_same_tables(spark, ctxs[-1].cfg, full_reference)


def test_train_builds_the_same_matrix_from_the_weight_table(spark, full_reference):
    from sparkrec.batch import train

    cfg = full_reference
    pipeline.run_stages(RunContext(spark, cfg), ("ids",))
    inter = tables.read_required(spark, cfg, C.INTERACTIONS).df
    uids, iids = tables.read_required(spark, cfg, C.USER_IDS).df, tables.read_required(spark, cfg, C.ITEM_IDS).df
    weights = tables.read_required(spark, cfg, C.WEIGHTS).df
    ref = train.decay_reference(inter, cfg.train)
    want = {(r[0], r[1]): r[2] for r in train.training_matrix(inter, uids, iids, cfg.train, ref).collect()}
    got = {(r[0], r[1]): r[2] for r in train.matrix_from_weights(weights, uids, iids, cfg.train, ref).collect()}
    assert got.keys() == want.keys() and len(want) > 5
    for k in want:
        assert math.isclose(got[k], want[k], rel_tol=1e-6), (k, got[k], want[k])
    # and without decay, from the plain sums
    flat = cfg.train.model_copy(update={"recency_half_life_days": None})
    want = {(r[0], r[1]): r[2] for r in train.training_matrix(inter, uids, iids, flat, None).collect()}
    got = {(r[0], r[1]): r[2] for r in train.matrix_from_weights(weights, uids, iids, flat, None).collect()}
    assert got == want


def test_a_generated_shop_in_daily_intervals_out_of_order_gives_the_full_recompute(spark, make_config, tmp_path):
    """One generated input (duplicates, replays, bots, bad rows) taken as three Airflow intervals, the last day
    first, against the same intervals ingested and cleaned once in full."""
    from sparkrec.dev.generate import GenerateParams, generate

    generate(GenerateParams(events=6000, seed=5, days=3), str(tmp_path / "shop"))
    sets = [f"source.path={tmp_path / 'shop' / 'events'}", f"items.path={tmp_path / 'shop' / 'items'}",
            "evaluate.enabled=false", "train.recency_half_life_days=14", "clean.bots.max_events_per_user_day=150"]
    days = [("2025-06-01", "2025-06-02"), ("2025-06-02", "2025-06-03"), ("2025-06-03", "2025-06-04")]

    def interval(i, wh, *extra):
        cfg = make_config(*sets, f"interval.start={days[i][0]}T00:00:00Z", f"interval.end={days[i][1]}T00:00:00Z", *extra, warehouse=wh)
        return cfg

    for i in (2, 0, 1):
        cfg = interval(i, tmp_path / "inc")
        pipeline.run_stages(RunContext(spark, cfg, now=cfg.interval.end), ("ingest", "clean"))
    got = cfg
    for i in (0, 1, 2):
        want = interval(i, tmp_path / "full")
        pipeline.run_stages(RunContext(spark, want, now=want.interval.end), ("ingest",))
    want = interval(2, tmp_path / "full", "clean.full=true")
    pipeline.run_stages(RunContext(spark, want, now=want.interval.end), ("clean",))

    assert table_rows(spark, got, C.INTERACTIONS) == table_rows(spark, want, C.INTERACTIONS)
    assert table_rows(spark, got, C.QUARANTINE, (C.RUN_ID,)) == table_rows(spark, want, C.QUARANTINE, (C.RUN_ID,))
    g, w = weight_rows(spark, got), weight_rows(spark, want)
    assert [r[:5] for r in g] == [r[:5] for r in w] and len(w) > 1000
    assert all(math.isclose(a[5], b[5], rel_tol=1e-12) for a, b in zip(g, w))
    reasons = {r[C.REASON] for r in tables.read_required(spark, got, C.QUARANTINE).df.select(C.REASON).distinct().collect()}
    assert "bot_user" in reasons  # the generated bots crossed the limit within the intervals
    modes = [json.loads(r["details"])["mode"] for r in clean_runs(spark, got)]
    assert modes == ["full", "incremental", "incremental"]
