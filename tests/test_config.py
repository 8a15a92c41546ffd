"""Config loading and validation: no Spark needed (no-JVM tier), every error names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparkrec.cli import main
from sparkrec.core.config import check_input_paths, load_config
from sparkrec.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.nojvm


def test_local_extends_base_and_overrides_apply():
    cfg = load_config(ROOT / "conf" / "local.yaml", ["recommend.n=7", "train.als.rank=16", "tables.recommendations=recs_v2"])
    assert cfg.recommend.n == 7
    assert cfg.train.als.rank == 16
    assert cfg.source.format == "json"  # from base.yaml
    assert cfg.spark.driver_memory == "6g"  # from local.yaml
    assert cfg.table_path("recommendations").endswith("/recs_v2")
    assert cfg.table_path("interactions").endswith("/interactions")


def test_online_retail_preset_is_transactions_without_event_columns():
    cfg = load_config(ROOT / "conf" / "online_retail.yaml")
    assert cfg.source.kind == "transactions"
    assert cfg.source.columns.user_id == "Customer ID"
    assert cfg.source.columns.event_type is None
    assert cfg.source.timezone == "Europe/London"


def test_cluster_preset_leaves_master_to_the_submitter():
    cfg = load_config(ROOT / "conf" / "cluster.yaml")
    assert cfg.spark.master is None and cfg.spark.delta_packages is False


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.als.rnak=3", "config key 'train.als.rnak': unknown key"),
        ("train.als.rank=abc", "config key 'train.als.rank': Input should be a valid integer"),
        ("recommend.n=0", "config key 'recommend.n': Input should be greater than or equal to 1"),
        ("tables.recommendations=bad-name!", "invalid table name 'bad-name!'"),
        ("tables.recs=ok", "unknown table 'recs'"),
        ("source.timezone=Mars/Olympus", "config key 'source.timezone': unknown time zone 'Mars/Olympus'"),
        ("source.format=xlsx", "config key 'source.format'"),
        ("train.event_weights.click=1", "unknown event type(s) ['click']"),
        ("clean.non_product_items=['(']", "invalid regular expression '('"),
        ("recommend.exclude_event_types=[bought]", "config key 'recommend.exclude_event_types'"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "conf" / "local.yaml", [override])
    assert expected in str(err.value)


def test_events_source_requires_event_type_column():
    with pytest.raises(ConfigError, match="columns.event_type is required"):
        load_config(ROOT / "conf" / "local.yaml", ["source.columns.event_type=null"])


def test_missing_required_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("warehouse: /tmp/x\n")
    with pytest.raises(ConfigError, match="config key 'source': required key is missing"):
        load_config(f)


def test_extends_cycle_and_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("warehouse: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="must look like dotted.key=value"):
        load_config(ROOT / "conf" / "local.yaml", ["recommend.n"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(ROOT / "conf" / "local.yaml", ["warehouse.x=1"])


def test_missing_input_path_is_reported(tmp_path):
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"source.path={tmp_path}/missing"])
    with pytest.raises(ConfigError, match=r"config key 'source.path': input path does not exist"):
        check_input_paths(cfg)
    remote = load_config(ROOT / "conf" / "local.yaml", ["source.path=s3a://bucket/events", "items.path=null"])
    check_input_paths(remote)  # remote paths are Spark's to check


def test_digest_changes_with_config():
    a = load_config(ROOT / "conf" / "local.yaml")
    b = load_config(ROOT / "conf" / "local.yaml", ["recommend.n=5"])
    assert a.digest() == load_config(ROOT / "conf" / "local.yaml").digest()
    assert a.digest() != b.digest()


def test_cli_bad_config_exits_non_zero_with_one_line(capsys, tmp_path):
    code = main(["run", "--config", str(ROOT / "conf" / "local.yaml"), "--set", "train.als.rnak=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "sparkrec: error: config key 'train.als.rnak': unknown key"


def test_cli_missing_input_exits_non_zero(capsys, tmp_path):
    code = main(["ingest", "--config", str(ROOT / "conf" / "local.yaml"), "--set", f"source.path={tmp_path}/none"])
    assert code == 2
    assert "source.path" in capsys.readouterr().err


def test_jvm_failures_are_described_by_their_root_cause():
    from sparkrec.cli import describe

    class JavaExc:
        def __init__(self, text, cause=None):
            self.text, self.cause = text, cause

        def getCause(self):
            return self.cause

        def toString(self):
            return self.text

    class Py4JLike(Exception):
        java_exception = JavaExc("org.apache.spark.SparkException: Job aborted", JavaExc("java.lang.OutOfMemoryError: Java heap space"))

    assert describe(Py4JLike("An error occurred while calling o726.collectToPython.")) == "java.lang.OutOfMemoryError: Java heap space"
    assert describe(ValueError("bad\nsecond line")) == "ValueError: bad"


def test_a_naive_interval_is_read_as_utc():
    """Regression: a zone-less interval.start/end failed with 'Instance is frozen'."""
    from datetime import datetime, timezone

    cfg = load_config(ROOT / "conf" / "local.yaml", ["interval.start=2025-01-01T00:00", "interval.end=2025-01-02T00:00"])
    assert cfg.interval.start == datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert cfg.interval.end == datetime(2025, 1, 2, tzinfo=timezone.utc)
    zoned = load_config(ROOT / "conf" / "local.yaml", ["interval.start=2025-01-01T01:00+01:00", "interval.end=2025-01-02T00:00Z"])
    assert zoned.interval.start == cfg.interval.start  # an explicit zone is kept, not replaced
    with pytest.raises(ConfigError, match="must be before interval.end"):
        load_config(ROOT / "conf" / "local.yaml", ["interval.start=2025-01-02T00:00", "interval.end=2025-01-01T00:00"])


# --------------------------------------------------------------------------- issue 13: exit 2 before Spark, naming the key


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("clean.non_product_items=['(?P<x>POST)']", "Java's regex engine"),
        ("clean.non_product_items=['(?#note)POST']", "no inline comments"),
        ("source.timestamp_format=yyyy-MM-dd bogus QQQQQ", "config key 'source.timestamp_format': datetime pattern"),
        ("source.timestamp_format=yyyy-MM-dd HH:mm:ss.SSSSSSSSSS", "too many 'S' letters"),
        ("source.timestamp_format=QQQ yyyy", "'Q' is not a pattern letter Spark can parse with"),
        ("source.timestamp_format=\"yyyy 'T\"", "unclosed quote"),
        ("clean.max_future_hours=1e12", "config key 'clean.max_future_hours'"),
        ("source.columns.user_id=user`id", "config key 'source.columns.user_id': column name 'user`id'"),
    ],
)
def test_values_spark_would_reject_later_are_config_errors_now(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "conf" / "local.yaml", [override])
    assert expected in str(err.value)


def test_valid_spark_patterns_pass():
    for fmt in ("yyyy-MM-dd HH:mm:ss", "dd/MM/yyyy H:mm", "yyyy-MM-dd'T'HH:mm:ss.SSSXXX", "M/d/yyyy h:mm a"):
        assert load_config(ROOT / "conf" / "local.yaml", [f"source.timestamp_format={fmt}"]).source.timestamp_format == fmt


@pytest.mark.parametrize("value", ['!!python/object/apply:os.system ["id"]', '"unclosed', "[1, 2"])
def test_a_set_value_that_does_not_parse_is_an_error_naming_the_key(value):
    with pytest.raises(ConfigError, match="override 'warehouse': value .* is not a valid YAML value"):
        load_config(ROOT / "conf" / "local.yaml", [f"warehouse={value}"])


def test_cli_exits_2_before_spark_for_a_file_warehouse_a_bad_limit_and_a_directory_report(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    conf = str(ROOT / "conf" / "local.yaml")
    assert main(["runs", "--config", conf, "--set", f"warehouse={afile}"]) == 2
    assert f"config key 'warehouse': {afile} is a file" in capsys.readouterr().err
    assert main(["runs", "--config", conf, "--set", f"warehouse={afile}/wh"]) == 2
    assert "lies under" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["runs", "--config", conf, "--limit", "-1"])
    assert exc.value.code == 2 and "expected at least 1, got -1" in capsys.readouterr().err
    wh = f"warehouse={tmp_path / 'wh'}"
    assert main(["report", "R1", "--config", conf, "--set", wh, "--out", f"{tmp_path}/"]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err
    assert main(["report", "R1", "--config", conf, "--set", wh, "--out", f"{tmp_path}/nope/r.html"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_relevant_types_the_lists_do_not_exclude_are_flagged_once_and_quiet_when_they_agree():
    """Issue 32: a ratings data set evaluated on `view` while the lists excluded only `purchase` offered every
    user what they had already rated, and nothing said so."""
    def advice(*o):
        return load_config(ROOT / "conf" / "local.yaml", list(o)).advice()

    assert advice() == []  # the defaults agree: purchase and purchase
    [line] = advice("evaluate.relevant_event_types=[view]")
    assert "evaluate.relevant_event_types ['view']" in line and "recommend.exclude_event_types ['purchase']" in line
    assert advice("evaluate.relevant_event_types=[view]", "recommend.exclude_event_types=[view, purchase]") == []
    assert advice("evaluate.relevant_event_types=[view]", "evaluate.repeat_relevant=true") == []
    assert advice("evaluate.relevant_event_types=[view]", "evaluate.enabled=false") == []
