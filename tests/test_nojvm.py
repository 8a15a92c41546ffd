"""The pure-Python parts (ledger, gate, stage table, CLI wiring): no Spark, no JVM, milliseconds each."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sparkrec.core import gate, ledger, stages
from sparkrec.core.config import EvaluateConfig
from sparkrec.core.errors import StageError

pytestmark = pytest.mark.nojvm


def test_the_tier_really_needs_no_jvm():
    """Importing the CLI and the pure modules must not import pyspark (so `--help` and config errors need no JVM)."""
    code = (
        "import sys, sparkrec.cli, sparkrec.core.config, sparkrec.core.gate, sparkrec.core.ledger, sparkrec.core.pseudonyms, sparkrec.core.stages, sparkrec.core.topk;"
        "print('pyspark' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- ledger


def test_tally_adds_up_outcomes_reasons_and_duplicate_kinds():
    counts = [
        {"outcome": "kept", "reason": None, "duplicate": None, "count": 90},
        {"outcome": "quarantined", "reason": "missing_user_id", "duplicate": None, "count": 4},
        {"outcome": "quarantined", "reason": "bot_user", "duplicate": None, "count": 2},
        {"outcome": "duplicate", "reason": None, "duplicate": "exact", "count": 3},
        {"outcome": "duplicate", "reason": None, "duplicate": "replay", "count": 1},
    ]
    t = ledger.tally(100, counts)
    assert (t.rows_in, t.kept, t.quarantined, t.duplicates) == (100, 90, 6, 4)
    assert t.reasons == {"missing_user_id": 4, "bot_user": 2}
    assert t.duplicate_kinds == {"exact": 3, "replay": 1}
    assert t.balanced
    ledger.check(t, 90, 6)
    ledger.check(t, None, None)  # Delta's counts unavailable: nothing to compare


@pytest.mark.parametrize(("rows_in", "written"), [(101, (90, 6)), (100, (89, 6)), (100, (90, 7))])
def test_a_ledger_that_does_not_balance_names_every_figure(rows_in, written):
    t = ledger.tally(rows_in, [{"outcome": "kept", "count": 90}, {"outcome": "quarantined", "reason": "x", "count": 6},
                               {"outcome": "duplicate", "duplicate": "exact", "count": 4}])
    with pytest.raises(StageError, match=f"{rows_in:,} rows in, 90 kept \\({written[0]} written\\), 6 quarantined"):
        ledger.check(t, *written)


# --------------------------------------------------------------------------- gate


def test_the_gate_needs_the_margin_over_the_best_baseline():
    results = {"model": {"ndcg@10": 0.12}, "popular": {"ndcg@10": 0.05}, "recent_popular": {"ndcg@10": 0.10}}
    v = gate.verdict(results, "ndcg@10", 0.1)
    assert v.best_baseline == "recent_popular" and v.best_score == 0.10
    assert v.needed == pytest.approx(0.11) and v.passed and v.ratio == pytest.approx(1.2)
    assert not gate.verdict(results, "ndcg@10", 0.25).passed  # needs > 0.125


def test_the_gate_with_every_baseline_at_zero_passes_any_positive_model():
    assert gate.verdict({"model": {"m": 0.01}, "popular": {"m": 0.0}}, "m", 0.1).passed
    assert not gate.verdict({"model": {"m": 0.0}, "popular": {"m": 0.0}}, "m", 0.1).passed


def test_the_gate_refuses_to_judge_without_a_baseline():
    with pytest.raises(ValueError, match="no baseline"):
        gate.verdict({"model": {"m": 1.0}}, "m", 0.1)


def test_metric_key_and_evaluation_line():
    ev = EvaluateConfig(metric="recall", k=20, ks=[10, 20])
    assert gate.metric_key(ev) == "recall@20"
    line = gate.evaluation_line(
        {"model.recall@20": 0.3, "popular.recall@20": 0.2},
        {"metric": "recall@20", "best_baseline": "popular", "gate": {"enabled": True, "passed": True}},
    )
    assert line == "model recall@20 0.3000 vs best baseline popular 0.2000 (x1.50); gate passed"


def test_the_ranked_lists_go_before_the_gate_only_where_they_beat_als():
    results = {"model": {"m": 0.12}, "ranked": {"m": 0.13}, "popular": {"m": 0.05}, "recent_popular": {"m": 0.11}}
    assert gate.contender(results, "m") == "ranked"
    v = gate.verdict(results, "m", 0.1, gate.contender(results, "m"))
    # Judged against the baselines only (ALS's own lists are not a baseline): 0.13 > 0.11 x 1.1.
    assert (v.lists, v.model_score, v.best_baseline, v.passed) == ("ranked", 0.13, "recent_popular", True)
    assert gate.contender({**results, "ranked": {"m": 0.12}}, "m") == "model"  # a tie keeps ALS
    assert gate.contender({**results, "ranked": {"m": 0.10}}, "m") == "model"
    assert gate.contender({k: v for k, v in results.items() if k != "ranked"}, "m") == "model"
    # A ranked list that wins over ALS but not by the gate's margin over a baseline fails the gate.
    assert not gate.verdict({**results, "recent_popular": {"m": 0.125}}, "m", 0.1, "ranked").passed


def test_the_evaluation_line_says_which_lists_went_out():
    metrics = {"model.m": 0.12, "ranked.m": 0.13, "popular.m": 0.1}
    details = {"metric": "m", "best_baseline": "popular", "lists": "ranked", "gate": {"enabled": True, "passed": True}}
    assert gate.evaluation_line(metrics, details) == (
        "ranked m 0.1300 vs best baseline popular 0.1000 (x1.30) (ranked lists 0.1300 against ALS's 0.1200: the "
        "ranker's lists go out); gate passed")
    kept = gate.evaluation_line({**metrics, "ranked.m": 0.11}, {**details, "lists": "model"})
    assert kept.startswith("model m 0.1200 vs best baseline popular 0.1000 (x1.20) (ranked lists 0.1100")
    assert "ALS's lists go out" in kept


# --------------------------------------------------------------------------- the stage table


def test_run_skips_tune_and_evaluate_unless_enabled():
    assert stages.stages_of("run", {"tune": False, "evaluate": False}) == stages.CORE
    assert stages.stages_of("run", {"tune": True, "evaluate": True}) == stages.PIPELINE
    assert stages.stages_of("train") == ("ids", "train")
    assert stages.stages_of("tune", {"tune": False}) == ("ids", "tune")  # asked for by name: runs


def test_every_command_is_a_cli_subcommand_and_every_stage_is_dispatched():
    from sparkrec.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command")
    assert set(stages.COMMANDS) <= set(sub.choices)
    assert all(s in stages.PIPELINE for cmd in stages.COMMANDS.values() for s in cmd)
    assert [s for s in stages.PIPELINE if s != "tune" and s != "ids"] == list(stages.SCHEDULED)


def test_the_dag_schedules_the_stage_tables_commands():
    """The DAG reads stages.SCHEDULED from the file (the scheduler has no sparkrec installed)."""
    from pathlib import Path

    dag = (Path(__file__).resolve().parents[1] / "jobs" / "sparkrec_dag.py").read_text()
    assert 'spec_from_file_location("sparkrec_stages", HOME / "sparkrec" / "core" / "stages.py")' in dag
    for cmd in stages.SCHEDULED:
        assert (Path(__file__).resolve().parents[1] / "jobs" / f"{cmd}.py").is_file()


# --------------------------------------------------------------------------- the clean guard (issue 13, item 1)


def _tally(rows_in, kept, reasons):
    counts = [{"outcome": "kept", "count": kept}] + [{"outcome": "quarantined", "reason": r, "count": n} for r, n in reasons.items()]
    return ledger.tally(rows_in, counts)


def test_a_clean_that_keeps_nothing_is_refused_naming_the_main_reasons():
    t = _tally(1000, 0, {"timestamp_out_of_range": 990, "missing_user_id": 10})
    with pytest.raises(StageError, match="keep none of its 1,000 rows; main quarantine reasons: timestamp_out_of_range 990, missing_user_id 10"):
        ledger.guard(t, None, None)


def test_a_clean_whose_kept_share_collapses_is_refused_unless_the_check_is_off():
    t = _tally(1000, 300, {"non_product_item": 700})
    with pytest.raises(StageError, match=r"keep 30.0% of its rows against 95.0% .*min_kept_ratio=0.5"):
        ledger.guard(t, 0.95, 0.5)
    ledger.guard(t, 0.95, None)  # turned off
    ledger.guard(t, 0.55, 0.5)  # 30% >= 0.5 x 55%
    ledger.guard(t, None, 0.5)  # first clean: nothing to compare with
    ledger.guard(_tally(0, 0, {}), 0.9, 0.5)  # an empty input throws nothing away


# --------------------------------------------------------------------------- session start (issue 13, item 14)


def test_damaged_cached_jars_are_found_and_removed(tmp_path):
    import zipfile

    from sparkrec.storage.session import remove_damaged_jars, start_failure_message

    cache = tmp_path / ".ivy2.5.2" / "jars"
    cache.mkdir(parents=True)
    good = cache / "io.delta_delta-storage-4.4.0.jar"
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
    empty = cache / "io.delta_delta-spark_4.2_2.13-4.4.0.jar"
    empty.write_bytes(b"")
    truncated = cache / "org.antlr_antlr4-runtime-4.13.1.jar"
    truncated.write_bytes(b"PK\x03\x04 cut short")
    removed = remove_damaged_jars([tmp_path / ".ivy2.5.2"])
    assert sorted(p.name for p in removed) == sorted([empty.name, truncated.name])
    assert good.exists() and not empty.exists() and not truncated.exists()
    msg = start_failure_message(RuntimeError("[JAVA_GATEWAY_EXITED] Java gateway process exited"), removed)
    assert msg.count("\n") == 0
    assert "Spark could not start ([JAVA_GATEWAY_EXITED]" in msg and empty.name in msg and "make jars" in msg


def test_the_session_module_needs_no_jvm_to_import():
    code = "import sys, sparkrec.storage.session; print('pyspark' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_generate_writes_files_without_a_jvm(tmp_path):
    """Issue 13, item 15: `sparkrec generate` started Spark and resolved Delta's jars to write three files."""
    import json

    code = (
        "import sys; from sparkrec.cli import main; "
        f"rc = main(['generate', '--events', '3000', '--seed', '3', '--out', {str(tmp_path / 'shop')!r}]); "
        "print('RESULT', rc, 'pyspark' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RESULT 0 False" in out.stdout, out.stderr[-2000:]
    lines = (tmp_path / "shop" / "events" / "part-00000.json").read_text().splitlines()
    assert len(lines) == 3_000
    parsed = [json.loads(x) for x in lines if "<truncated" not in x]
    assert len(parsed) > 2_950 and {"event_id", "item_id", "event_type", "timestamp", "price"} <= set(parsed[0])
    assert json.loads((tmp_path / "shop" / "manifest.json").read_text())["users"] == 75
    items = (tmp_path / "shop" / "items" / "part-00000.csv").read_text().splitlines()
    assert items[0] == "item_id,category,price,available,name" and len(items) == 41
    assert items[1].split(",")[4][0].isupper() and len({line.split(",")[4] for line in items[1:]}) > 30  # named, mostly apart


def test_generated_lines_do_not_depend_on_how_they_are_chunked():
    from sparkrec.dev.generate import GenerateParams, event_lines

    p = GenerateParams(events=2_000, seed=9)
    assert event_lines(p) == event_lines(p, 0, 700) + event_lines(p, 700, 1_999) + event_lines(p, 1_999)
    assert event_lines(p) != event_lines(GenerateParams(events=2_000, seed=10))


def test_a_losing_model_publishes_a_baseline_only_where_nothing_was_published_unless_told():
    results = {"model": {"m": 0.05}, "popular": {"m": 0.04}, "recent_popular": {"m": 0.06}, "buy_again": {"m": 0.09}}
    v = gate.verdict(results, "m", 0.1)
    assert not v.passed and v.best_baseline == "buy_again"
    first = gate.decide(v, results, True, "auto", published_before=False)
    assert (first.publish, first.baseline) == ("baseline", "recent_popular")  # buy-again is a measure, not a shop list
    assert "no list was ever published" in first.reason
    assert gate.decide(v, results, True, "auto", published_before=True).publish == "nothing"
    assert gate.decide(v, results, True, "keep", published_before=False).publish == "nothing"
    assert gate.decide(v, results, True, "baseline", published_before=True).baseline == "recent_popular"
    assert gate.decide(v, results, False, "keep", published_before=True).publish == "model"  # gate off
    won = {"model": {"m": 0.2}, "popular": {"m": 0.04}}
    assert gate.decide(gate.verdict(won, "m", 0.1), won, True, "auto", False).publish == "model"


# --------------------------------------------------------------------------- ranking metrics (the reference)


def test_ranking_metrics_match_a_plain_computation():
    """Each metric worked out by hand for a small case, then random lists against a direct numpy loop."""
    import math

    from sparkrec.core import metrics

    got = metrics.ranking_metrics({"u": ["a", "x", "b", "y"]}, {"u": {"a", "b", "c"}}, [2, 4])
    dcg4 = 1 / math.log2(2) + 1 / math.log2(4)
    idcg4 = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert got["precision@4"] == pytest.approx(2 / 4) and got["recall@4"] == pytest.approx(2 / 3)
    assert got["ndcg@4"] == pytest.approx(dcg4 / idcg4)
    assert got["ndcg@2"] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert got["map@4"] == pytest.approx((1 / 1 + 2 / 3) / 3) and got["map@2"] == pytest.approx(1 / 2)
    assert got["hit_rate@2"] == 1.0 and got["mrr@4"] == 1.0 and got["users"] == 1.0

    rng = np.random.default_rng(7)
    lists = {u: list(rng.permutation(50)[:10]) for u in range(40)}
    relevant = {u: set(rng.choice(50, size=int(rng.integers(1, 8)), replace=False)) for u in range(40)}
    got = metrics.ranking_metrics(lists, relevant, [5, 10])
    for k in (5, 10):
        hits = np.array([[x in relevant[u] for x in lists[u][:k]] for u in range(40)], dtype=float)
        r = np.array([len(relevant[u]) for u in range(40)], dtype=float)
        disc = 1 / np.log2(np.arange(2, k + 2))
        idcg = np.array([disc[: int(min(n, k))].sum() for n in r])
        first = np.array([np.argmax(h) + 1 if h.any() else np.inf for h in hits])
        ap = np.array([(np.cumsum(h) / np.arange(1, k + 1) * h).sum() for h in hits]) / np.minimum(r, k)
        assert got[f"precision@{k}"] == pytest.approx(hits.sum(1).mean() / k)
        assert got[f"recall@{k}"] == pytest.approx((hits.sum(1) / r).mean())
        assert got[f"ndcg@{k}"] == pytest.approx(((hits * disc).sum(1) / idcg).mean())
        assert got[f"map@{k}"] == pytest.approx(ap.mean())
        assert got[f"hit_rate@{k}"] == pytest.approx((hits.sum(1) > 0).mean())
        assert got[f"mrr@{k}"] == pytest.approx((1 / first).mean())


# --------------------------------------------------------------------------- the clean's plan


def test_the_clean_plan_names_what_it_does_and_why():
    from sparkrec.batch.incremental import CleanState, plan

    done = CleanState(done_version=4, half_life_days=30.0, rules="r1")
    assert plan(None, 3, False, "r1", 30.0).mode == "full"
    assert plan(done, 4, True, "r1", 30.0).mode == "full"  # --full
    assert plan(done, 4, False, "r1", 30.0).mode == "none"
    inc = plan(done, 7, False, "r1", 30.0, [(5, "MERGE", {}), (6, "WRITE", {"mode": "Append"}), (7, "OPTIMIZE", {})])
    assert (inc.mode, inc.after_version, inc.to_version) == ("incremental", 4, 7)
    changed = plan(done, 7, False, "r2", 30.0)
    assert changed.mode == "full" and "rules changed" in changed.reason
    assert "half_life" in plan(done, 7, False, "r1", 7.0).reason
    restored = plan(done, 6, False, "r1", 30.0, [(5, "MERGE", {}), (6, "RESTORE", {})])
    assert restored.mode == "full" and "RESTORE" in restored.reason
    erased = plan(done, 5, False, "r1", 30.0, [(5, "MERGE", {"matchedPredicates": '[{"actionType":"delete"}]'})])
    assert erased.mode == "full" and "deleting" in erased.reason
    overwritten = plan(done, 5, False, "r1", 30.0, [(5, "WRITE", {"mode": "Overwrite"})])
    assert overwritten.mode == "full" and "overwrite" in overwritten.reason
    assert plan(done, 2, False, "r1", 30.0).mode == "full"  # events_raw went back in time
    pending = CleanState(done_version=4, pending_from=4, pending_version=6, pending_run="r-9", half_life_days=30.0, rules="r1")
    resume = plan(pending, 9, False, "r2", 7.0)  # a saved batch is finished before anything else
    assert (resume.mode, resume.after_version, resume.to_version) == ("resume", 4, 6) and "r-9" in resume.reason
    assert plan(CleanState(done_version=4, full_pending=True, rules="r1", half_life_days=30.0), 4, False, "r1", 30.0).mode == "full"
    # a pending batch saved in an older layout is not applied by this code: the clean turns full
    old = CleanState(done_version=4, pending_from=4, pending_version=6, pending_run="r-9", half_life_days=30.0, rules="r1.s1")
    upgraded = plan(old, 9, False, "r1.s2", 30.0)
    assert upgraded.mode == "full" and "layout" in upgraded.reason


@pytest.mark.nojvm
def test_sql_gets_an_absolute_path_for_a_relative_warehouse(tmp_path, monkeypatch):
    """`make demo` uses `warehouse: ./warehouse`; SQL's delta.`path` does not resolve a relative path."""
    from sparkrec.storage.tables import sql_path

    monkeypatch.chdir(tmp_path)
    assert sql_path("./warehouse/events_raw") == str(tmp_path / "warehouse" / "events_raw")
    assert sql_path("warehouse/items") == str(tmp_path / "warehouse" / "items")
    for kept in ("/abs/wh/t", "s3a://bucket/wh/t", "file:/tmp/wh/t", "hdfs://nn/wh/t"):
        assert sql_path(kept) == kept


def test_a_kafka_cluster_id_never_starts_with_a_dash():
    """One random id in 64 started with '-', and the broker's storage tool then refused it as an option
    (the stream's tests failed at their broker's start)."""
    import uuid

    from sparkrec.dev import kafka as devkafka

    dash = uuid.UUID(bytes=b"\xf8" + bytes(15))  # first 6 bits 111110: base64url '-'
    plain = uuid.UUID(bytes=bytes(range(16)))
    draws = iter([dash, dash, plain])
    assert devkafka._cluster_id(lambda: next(draws)) == "AAECAwQFBgcICQoLDA0ODw"
    assert all(not devkafka._cluster_id().startswith("-") for _ in range(2000))
