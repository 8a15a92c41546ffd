"""Faults a scheduler lives with: a job killed mid-write, the same interval run twice, long ALS.

The killed job is a real `sparkrec` process (Python driver and its JVM, in a
process group of their own) sent SIGKILL while its data files are on disk
but before Delta committed them. These tests start JVMs of their own and
are grouped with the cluster tests (`make test-cluster`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chispa import assert_df_equality

from sparkrec.batch import pipeline
from sparkrec.cli import main
from sparkrec.core import columns as C
from sparkrec.core.config import load_config
from sparkrec.dev.generate import GenerateParams, generate
from sparkrec.storage import tables
from sparkrec.storage.runs import RunContext
from tests.conftest import ROOT

pytestmark = pytest.mark.cluster

FAST = ["train.als.rank=8", "train.als.max_iter=4", "recommend.n=5", "evaluate.enabled=false", "spark.driver_memory=2g", "spark.shuffle_partitions=2"]


A_EVENTS = 6_000
# Enough for the writes to take the time a kill needs to land in the middle: a new data file of events_raw
# stays uncommitted for 1.6 s at 10,000 events and 1.8 s at 30,000 (measured on 2 cores), against 10 ms polling.
B_EVENTS = 20_000


@pytest.fixture(scope="module")
def shops(spark, tmp_path_factory):
    """Two batches of one shop's events: the first is ingested, the second arrives later."""
    base = tmp_path_factory.mktemp("fault-shops")
    generate(GenerateParams(events=A_EVENTS, seed=3), str(base / "a"))
    generate(GenerateParams(events=B_EVENTS, seed=4), str(base / "b"))
    return base


def setup_warehouse(spark, shops: Path, tmp: Path):
    """A warehouse where batch a went through ingest and clean; batch b is then put next to it."""
    src = tmp / "events"
    shutil.copytree(shops / "a" / "events", src)
    sets = [f"warehouse={tmp / 'wh'}", f"source.path={src}", f"items.path={shops / 'a' / 'items'}", *FAST]
    cfg = load_config(ROOT / "conf" / "local.yaml", sets)
    pipeline.run_stages(RunContext(spark, cfg), ("ingest", "clean"))
    for f in (shops / "b" / "events").iterdir():
        if not f.name.startswith((".", "_")):
            shutil.copy(f, src / f"b-{f.name}")
    return cfg, sets


def versions(spark, cfg) -> dict[str, int | None]:
    return {k: tables.current_version(spark, cfg.table_path(k)) for k in (C.EVENTS_RAW, C.ITEMS, C.INTERACTIONS, C.QUARANTINE)}


def data_files(table_dir: Path) -> set[str]:
    return {p.name for p in table_dir.rglob("*.parquet")} if table_dir.exists() else set()


def kill_mid_write(stage: str, sets: list[str], table_dir: Path, log_path: Path, timeout: float = 300) -> None:
    """Run `sparkrec <stage>` and SIGKILL its process group once a new data file of `table_dir` is on disk.

    Delta writes data files first and commits the log entry last, so a new
    file with the log not advanced is the middle of the write.
    """
    before_files = data_files(table_dir)
    log_dir = table_dir / "_delta_log"
    before_log = {p.name for p in log_dir.glob("*.json")}
    args = [sys.executable, "-m", "sparkrec.cli", stage, "--config", str(ROOT / "conf" / "local.yaml")]
    for s in sets:
        args += ["--set", s]
    with log_path.open("w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            new_files = data_files(table_dir) - before_files
            committed = {p.name for p in log_dir.glob("*.json")} - before_log
            assert not committed, f"{stage} committed {committed} before a new data file was seen; log: {log_path}"
            if new_files:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                assert proc.returncode == -signal.SIGKILL
                return
            assert proc.poll() is None, f"{stage} ended ({proc.returncode}) before writing {table_dir.name}; log: {log_path}"
            time.sleep(0.01)
        raise AssertionError(f"no new data file in {table_dir} within {timeout}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize(("stage", "key"), [("ingest", C.EVENTS_RAW), ("clean", C.INTERACTIONS)])
def test_a_job_killed_mid_write_leaves_tables_readable_and_the_next_run_succeeds(spark, shops, tmp_path, stage, key):
    cfg, sets = setup_warehouse(spark, shops, tmp_path)
    if stage == "clean":  # the new batch is ingested; clean is the job that dies
        pipeline.run_stages(RunContext(spark, cfg), ("ingest",))
    before = versions(spark, cfg)
    snapshot = {k: tables.read_table(spark, cfg, k).df.localCheckpoint() for k in (C.EVENTS_RAW, C.INTERACTIONS, C.QUARANTINE)}
    kill_mid_write(stage, sets, Path(cfg.table_path(key)), tmp_path / f"{stage}.log")

    # Every table is readable, at the version it had, with the content it had.
    assert versions(spark, cfg) == before
    for k, df in snapshot.items():
        assert_df_equality(tables.read_table(spark, cfg, k).df, df, ignore_row_order=True)

    # The next run of the same stages succeeds, and the orphaned files of the dead job count for nothing.
    assert main(["ingest", *[a for s in sets for a in ("--set", s)], "--config", str(ROOT / "conf" / "local.yaml")], spark=spark) == 0
    assert main(["clean", *[a for s in sets for a in ("--set", s)], "--config", str(ROOT / "conf" / "local.yaml")], spark=spark) == 0
    cleans = tables.read_table(spark, cfg, C.RUNS).df.where("stage = 'clean' and status = 'succeeded'").orderBy("started_at").collect()
    # The first clean took batch a; the one after the kill finished batch b (incremental: only b's rows).
    assert sum(r["rows_in"] for r in cleans) == A_EVENTS + B_EVENTS
    for r in cleans:
        assert r["rows_in"] == r["rows_out"] + r["rows_quarantined"] + r["rows_duplicate"]
    assert tables.read_table(spark, cfg, C.EVENTS_RAW).df.count() == A_EVENTS + B_EVENTS
    # Batch b replays a's event ids and has its bots: a's kept rows changed too. The tables are what a full
    # recompute of all the rows gives.
    got = {k: tables.read_table(spark, cfg, k).df.drop(C.RUN_ID).localCheckpoint() for k in (C.INTERACTIONS, C.QUARANTINE)}
    full = cfg.model_copy(update={"clean": cfg.clean.model_copy(update={"full": True})})
    assert pipeline.run_stages(RunContext(spark, full), ("clean",)) is not None
    for k, df in got.items():
        assert_df_equality(df, tables.read_table(spark, cfg, k).df.drop(C.RUN_ID), ignore_row_order=True, ignore_nullable=True)


def test_a_clean_killed_between_interactions_and_quarantine_is_finished_by_the_next(spark, shops, tmp_path):
    """SIGKILL after the incremental clean committed `interactions` and before `quarantine`: the next clean
    applies the saved batch again (interactions: nothing more; quarantine: its rows), and the tables equal
    a full recompute of the same raw rows. Without the saved batch the rows would be lost or doubled."""
    cfg, sets = setup_warehouse(spark, shops, tmp_path)
    pipeline.run_stages(RunContext(spark, cfg), ("ingest",))
    inter_log = Path(cfg.table_path(C.INTERACTIONS)) / "_delta_log"
    quar_log = Path(cfg.table_path(C.QUARANTINE)) / "_delta_log"
    before_i, before_q = {p.name for p in inter_log.glob("*.json")}, {p.name for p in quar_log.glob("*.json")}
    args = [sys.executable, "-m", "sparkrec.cli", "clean", "--config", str(ROOT / "conf" / "local.yaml")]
    for s in sets:
        args += ["--set", s]
    with (tmp_path / "clean.log").open("w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ({p.name for p in inter_log.glob("*.json")} - before_i):
            assert proc.poll() is None, (tmp_path / "clean.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "interactions was never committed"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert {p.name for p in quar_log.glob("*.json")} == before_q, "quarantine was committed before the kill"
    state = tables.read_table(spark, cfg, C.CLEAN_STATE).df.first()
    assert state["pending_version"] is not None  # the batch is saved, not finished

    pipeline.run_stages(RunContext(spark, cfg), ("clean",))
    last = tables.read_table(spark, cfg, C.RUNS).df.where("stage = 'clean'").orderBy("started_at", ascending=False).first()
    assert json.loads(last["details"])["mode"] == "resume"
    got = {k: tables.read_table(spark, cfg, k).df.drop(C.RUN_ID).localCheckpoint() for k in (C.INTERACTIONS, C.QUARANTINE)}
    full = cfg.model_copy(update={"clean": cfg.clean.model_copy(update={"full": True})})
    pipeline.run_stages(RunContext(spark, full), ("clean",))
    for k, df in got.items():
        assert_df_equality(df, tables.read_table(spark, cfg, k).df.drop(C.RUN_ID), ignore_row_order=True, ignore_nullable=True)
    # Every raw row was classified once: by the first clean (a) or by the resumed batch (b), not by the killed run.
    cleans = tables.read_table(spark, cfg, C.RUNS).df.where("stage = 'clean' and status = 'succeeded'").orderBy("started_at").collect()
    assert [r["rows_in"] for r in cleans[:2]] == [A_EVENTS, B_EVENTS]


def test_the_same_input_again_leaves_the_tables_as_one_run(spark, shops, tmp_path):
    """A second run on what the first already took changes no table: ingest takes nothing, and the rest
    recompute what they wrote (a third run would be the second again: it proved nothing more for its 50 s)."""
    sets = [f"warehouse={tmp_path / 'wh'}", f"source.path={shops / 'a' / 'events'}", f"items.path={shops / 'a' / 'items'}", *FAST]
    cfg = load_config(ROOT / "conf" / "local.yaml", sets)
    content = {
        C.EVENTS_RAW: None, C.INTERACTIONS: None, C.QUARANTINE: [C.RAW_KEY, C.REASON, C.RAW_RECORD], C.USER_IDS: None, C.ITEM_IDS: None,
        C.ITEMS: None, C.RECOMMENDATIONS: [C.USER_ID, C.ITEM_ID, C.RANK, C.SCORE, C.REC_SOURCE],
    }

    def snapshot():
        out = {}
        for k, cols in content.items():
            df = tables.read_table(spark, cfg, k).df
            if cols is None:  # everything but who wrote it
                cols = [c for c in df.columns if c not in (C.INGEST_RUN_ID, C.RUN_ID)]
            out[k] = df.select(cols).localCheckpoint()
        return out

    pipeline.run_stages(RunContext(spark, cfg))
    once = snapshot()
    pipeline.run_stages(RunContext(spark, cfg))
    twice = snapshot()
    for k in content:
        assert_df_equality(twice[k], once[k], ignore_row_order=True, ignore_nullable=True)
    runs = tables.read_table(spark, cfg, C.RUNS).df
    assert runs.select(C.RUN_ID).distinct().count() == 2
    assert runs.where("stage = 'ingest'").orderBy("started_at").collect()[-1]["rows_out"] == 0


def test_long_training_checkpoints_and_does_not_overflow_the_stack(spark, shops, tmp_path):
    """maxIter 50 builds a lineage ALS can only survive with checkpoints really on."""
    sets = [f"warehouse={tmp_path / 'wh'}", f"source.path={shops / 'a' / 'events'}", f"items.path={shops / 'a' / 'items'}", *FAST,
            "train.als.max_iter=50", "train.als.checkpoint_interval=5"]
    cfg = load_config(ROOT / "conf" / "local.yaml", sets)
    ctx = RunContext(spark, cfg)
    pipeline.run_stages(ctx, ("ingest", "clean", "ids", "train"))
    row = tables.read_table(spark, cfg, C.RUNS).df.where(f"run_id = '{ctx.run_id}' and stage = 'train'").first()
    assert row["status"] == "succeeded"
    details = json.loads(row["details"])
    assert details["checkpoints"] > 1, details  # the matrix, and ALS's latest factor checkpoints
    assert tables.read_table(spark, cfg, C.USER_FACTORS).df.count() > 0


def test_a_persistent_failure_names_the_stage_and_the_reason_and_exits_non_zero(spark, shops, tmp_path, capsys):
    """A data file of `interactions` is damaged on disk: every attempt of the task fails the same way."""
    sets = [f"warehouse={tmp_path / 'wh'}", f"source.path={shops / 'a' / 'events'}", f"items.path={shops / 'a' / 'items'}", *FAST]
    cfg = load_config(ROOT / "conf" / "local.yaml", sets)
    pipeline.run_stages(RunContext(spark, cfg), ("ingest", "clean"))
    victim = sorted(Path(cfg.table_path(C.INTERACTIONS)).glob("*.parquet"))[0]
    victim.write_bytes(b"not a parquet file at all" * 100)
    code = main(["train", "--config", str(ROOT / "conf" / "local.yaml"), *[a for s in sets for a in ("--set", s)]], spark=spark)
    err = capsys.readouterr().err
    assert code == 1
    assert "failed in stage ids" in err  # train assigns ids first, and that is where the file is read
    assert victim.name in err or "parquet" in err.lower(), err
    failed = tables.read_table(spark, cfg, C.RUNS).df.where("status = 'failed'").collect()
    assert [r["stage"] for r in failed] == ["ids"] and failed[0]["error"]


def test_two_runs_racing_on_one_table_leave_it_whole(spark, shops, tmp_path):
    """Two `sparkrec ingest` processes start together on one warehouse and one input: Delta lets one
    commit first; the other retries (its MERGE then finds every row present) or fails naming the table.
    Either way the table holds every input row once."""
    sets = [f"warehouse={tmp_path / 'wh'}", f"source.path={shops / 'a' / 'events'}", f"items.path={shops / 'a' / 'items'}", *FAST]
    args = [sys.executable, "-m", "sparkrec.cli", "ingest", "--config", str(ROOT / "conf" / "local.yaml")]
    for s in sets:
        args += ["--set", s]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes, outs
    for code, out in zip(codes, outs):
        assert code == 0 or ("another writer" in out and code == 2), out[-3000:]
    cfg = load_config(ROOT / "conf" / "local.yaml", sets)
    raw = tables.read_table(spark, cfg, C.EVENTS_RAW).df
    assert raw.count() == A_EVENTS
    assert raw.select(C.RAW_KEY).distinct().count() == A_EVENTS
    ingests = tables.read_table(spark, cfg, C.RUNS).df.where("stage = 'ingest' and status = 'succeeded'").collect()
    assert sum(r["rows_out"] for r in ingests) == A_EVENTS  # what one inserted, the other found present
