"""Pseudonymous user keys: the raw key reaches no table, and the shop can still find its customer.

The no-JVM tests check the keyed hash against HMAC-SHA256 written out from
its definition, where the secret comes from, and that a missing secret fails
before Spark starts. The Spark test ingests and cleans a small shop with a
column that must never be stored, an id that breaks the id rule and a
malformed line, and then looks for the raw keys in every table.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparkrec.core import columns as C
from sparkrec.core.config import load_config
from sparkrec.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SECRET = "correct horse battery staple 42"


def hmac_by_definition(key: bytes, msg: bytes) -> str:
    """RFC 2104 with SHA-256, from the definition (not the hmac module sparkrec uses)."""
    block = 64
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key) + msg).digest()
    return hashlib.sha256(bytes(b ^ 0x5C for b in key) + inner).hexdigest()


@pytest.mark.nojvm
def test_a_pseudonym_is_hmac_sha256_of_the_key_and_stable():
    from sparkrec.core import pseudonyms

    got = pseudonyms.pseudonym(SECRET.encode(), "13085")
    assert got == "p_" + hmac_by_definition(SECRET.encode(), b"13085")[:32]
    assert got == pseudonyms.pseudonym(SECRET.encode(), "13085")  # the same in every run
    assert got != pseudonyms.pseudonym(SECRET.encode(), "13086")
    assert got != pseudonyms.pseudonym(b"another secret of some length", "13085")
    assert pseudonyms.lookup_key("  13085 ") == "13085"


@pytest.mark.nojvm
def test_the_secret_comes_from_the_environment_or_a_file_never_the_config(tmp_path, monkeypatch):
    from sparkrec.core import pseudonyms

    cfg = load_config(ROOT / "conf" / "local.yaml", ["privacy.pseudonymize_user_ids=true", "privacy.secret_env=SHOP_SECRET"])
    monkeypatch.delenv("SHOP_SECRET", raising=False)
    with pytest.raises(ConfigError, match="environment variable SHOP_SECRET"):
        pseudonyms.load_secret(cfg.privacy)
    monkeypatch.setenv("SHOP_SECRET", "short")
    with pytest.raises(ConfigError, match="at least 16"):
        pseudonyms.load_secret(cfg.privacy)
    monkeypatch.setenv("SHOP_SECRET", SECRET)
    assert pseudonyms.load_secret(cfg.privacy) == SECRET.encode()
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"privacy.secret_file={secret_file}"])
    assert pseudonyms.load_secret(cfg.privacy) == SECRET.encode()
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"privacy.secret_file={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="privacy.secret_file"):
        pseudonyms.load_secret(cfg.privacy)
    with pytest.raises(ConfigError, match="privacy.secret_env"):
        load_config(ROOT / "conf" / "local.yaml", ["privacy.secret_env='my secret value'"])
    with pytest.raises(ConfigError, match="source.columns maps"):
        load_config(ROOT / "conf" / "local.yaml", ["privacy.drop_raw_columns=[user_id]"])


@pytest.mark.nojvm
def test_lookup_user_prints_the_pseudonym_and_a_missing_secret_stops_a_run_before_spark(tmp_path):
    code = (
        "import sys, os\n"
        "from sparkrec.cli import main\n"
        f"os.environ['SPARKREC_PSEUDONYM_SECRET'] = {SECRET!r}\n"
        "base = ['--config', 'conf/local.yaml', '--set', 'privacy.pseudonymize_user_ids=true', "
        f"'--set', 'warehouse={tmp_path / 'wh'}']\n"
        "rc1 = main(['lookup-user', *base, ' 13085 '])\n"
        "del os.environ['SPARKREC_PSEUDONYM_SECRET']\n"
        "rc2 = main(['run', *base, '--set', 'source.path=tests'])\n"
        "print('RESULT', rc1, rc2, 'pyspark' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "p_" + hmac_by_definition(SECRET.encode(), b"13085")[:32], out.stderr[-2000:]
    assert lines[-1] == "RESULT 0 2 False", out.stderr[-2000:]
    assert "SPARKREC_PSEUDONYM_SECRET" in out.stderr


def shop_lines() -> list[str]:
    def ev(eid, user, item, etype, ts, email="someone@example.com"):
        return json.dumps({"event_id": eid, "user_id": user, "item_id": item, "event_type": etype, "timestamp": ts,
                           "email": email, "quantity": None, "price": "2.5", "rating": None})

    return [
        ev("e1", "alice-7731", "i1", "view", "2025-06-01T10:00:00Z", "alice@example.com"),
        ev("e2", "alice-7731", "i2", "purchase", "2025-06-01T11:00:00Z", "alice@example.com"),
        ev("e3", " bob-4410 ", "i1", "view", "2025-06-01T12:00:00Z", "bob@example.com"),
        ev("e4", "bob-4410", "i3", "cart", "2025-06-02T12:00:00Z", "bob@example.com"),
        ev("e5", "carol-9902", "i2", "view", "2025-06-02T13:00:00Z", "carol@example.com"),
        ev("e6", '{"id": "dave-5555"}', "i2", "view", "2025-06-02T13:30:00Z"),  # breaks the id rule
        '{"event_id": "e7", "user_id": "erin-3131", "item_id": "i9", "timesta',  # truncated: malformed
    ]


def all_values(spark, path: str) -> list[str]:
    """Every value of every row of a Delta table, as text."""
    df = spark.read.format("delta").load(path)
    return [str(v) for row in df.collect() for v in row]


@pytest.mark.e2e
def test_ingest_stores_pseudonyms_only_and_clean_keeps_its_rules(spark, make_config, tmp_path, monkeypatch):
    from sparkrec.batch import pipeline
    from sparkrec.core import pseudonyms
    from sparkrec.storage import tables
    from sparkrec.storage.runs import RunContext

    src = tmp_path / "shop"
    src.mkdir()
    (src / "events.json").write_text("\n".join(shop_lines()) + "\n")
    monkeypatch.setenv("SPARKREC_PSEUDONYM_SECRET", SECRET)
    cfg = make_config(f"source.path={src}", "items.path=null", "evaluate.enabled=false", "clean.min_kept_ratio=null",
                      "privacy.pseudonymize_user_ids=true", "privacy.drop_raw_columns=[email]")
    ctx = RunContext(spark, cfg)
    pipeline.run_stages(ctx, ("ingest", "clean", "ids"))

    raw_keys = ["alice-7731", "bob-4410", "carol-9902", "dave-5555", "erin-3131", "@example.com"]
    for key in (C.EVENTS_RAW, C.INTERACTIONS, C.QUARANTINE, C.USER_IDS, C.RUNS, C.WEIGHTS, C.CLEAN_SURVIVORS, C.CLEAN_USER_DAYS):
        text = "\n".join(all_values(spark, cfg.table_path(key)))
        found = [k for k in raw_keys if k in text]
        assert not found, f"{key} holds {found}"
    assert "email" not in tables.read_required(spark, cfg, C.EVENTS_RAW).df.columns

    secret = SECRET.encode()
    alice, bob = pseudonyms.pseudonym(secret, "alice-7731"), pseudonyms.pseudonym(secret, "bob-4410")
    inter = tables.read_required(spark, cfg, C.INTERACTIONS).df
    kept = sorted((r[C.USER_ID], r[C.EVENT_ID]) for r in inter.collect())
    assert kept == sorted([(alice, "e1"), (alice, "e2"), (bob, "e3"), (bob, "e4"),
                           (pseudonyms.pseudonym(secret, "carol-9902"), "e5")])
    reasons = sorted(r[C.REASON] for r in tables.read_required(spark, cfg, C.QUARANTINE).df.collect())
    assert reasons == ["invalid_user_id", "malformed_line"]
    clean_rec = next(r for r in ctx.written if r["stage"] == "clean")
    assert (clean_rec["rows_in"], clean_rec["rows_out"], clean_rec["rows_quarantined"]) == (7, 5, 2)

    # a warehouse holds pseudonyms or raw keys, never both
    plain = make_config(f"source.path={src}", "items.path=null", "evaluate.enabled=false", warehouse=Path(cfg.warehouse))
    with pytest.raises(ConfigError, match="holds pseudonyms"):
        pipeline.run_stages(RunContext(spark, plain), ("ingest",))


def every_string_in(path: Path) -> str:
    """What a file holds as text: a Parquet file's decoded values (compression hides them from a byte search),
    anything else's bytes."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return "\n".join(str(v) for row in pq.read_table(path).to_pylist() for v in row.values())
    return path.read_bytes().decode("utf-8", errors="replace")


@pytest.mark.e2e
def test_forget_leaves_no_trace_in_any_file_and_the_rest_untouched(spark, tmp_path, monkeypatch):
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from sparkrec.batch import forget
    from sparkrec.cli import main
    from sparkrec.core import pseudonyms
    from sparkrec.dev.generate import GenerateParams, generate

    shop = tmp_path / "shop"
    generate(GenerateParams(events=6_000, seed=5), str(shop))
    wh = tmp_path / "wh"
    monkeypatch.setenv("SPARKREC_PSEUDONYM_SECRET", SECRET)
    args = ["--config", str(ROOT / "conf" / "local.yaml"), "--set", f"warehouse={wh}", "--set", f"source.path={shop}/events",
            "--set", "items.path=null", "--set", "evaluate.enabled=false", "--set", "tune.enabled=false", "--set", "train.als.rank=8",
            "--set", "train.als.max_iter=4", "--set", "recommend.n=10", "--set", "privacy.pseudonymize_user_ids=true"]
    assert main(["run", *args], spark=spark) == 0

    secret = SECRET.encode()
    recs = spark.read.format("delta").load(str(wh / C.RECOMMENDATIONS))
    listed = {r[C.USER_ID] for r in recs.select(C.USER_ID).distinct().collect()}
    def user_of(line: str):
        try:
            user = json.loads(line).get("user_id")
        except (ValueError, AttributeError):  # the shop's malformed lines
            return None
        return user if isinstance(user, str) else None

    keys = sorted({u for f in (shop / "events").glob("*.json") for line in f.read_text().splitlines() if (u := user_of(line))})
    chosen = [k for k in keys if pseudonyms.pseudonym(secret, k.strip()) in listed][:3]
    assert len(chosen) == 3
    gone = [pseudonyms.pseudonym(secret, k.strip()) for k in chosen]
    others_before = sorted(tuple(r) for r in recs.where(~F.col(C.USER_ID).isin(gone)).collect())
    inter = spark.read.format("delta").load(str(wh / C.INTERACTIONS))
    other_rows_before = inter.where(~F.col(C.USER_ID).isin(gone)).count()
    assert inter.where(F.col(C.USER_ID).isin(gone)).count() > 0

    keys_file = tmp_path / "erase.txt"
    keys_file.write_text(chosen[2] + "\n\n")
    assert main(["forget", *args, "--user", chosen[0], "--user", chosen[1], "--users-file", str(keys_file)], spark=spark) == 0

    # (1) no table that held their rows has them at its current version, nor at the versions just before the
    # erasure (the ones time travel would reach first); every other version is covered by (2), file by file
    for table in (wh / cfg_table for cfg_table in forget.HOLDS_CUSTOMERS if (wh / cfg_table / "_delta_log").is_dir()):
        for (version,) in DeltaTable.forPath(spark, str(table)).history(4).select("version").collect():
            at = spark.read.format("delta").option("versionAsOf", version).load(str(table))
            if not all(Path(f.removeprefix("file:")).exists() for f in at.inputFiles()):
                continue  # its files are vacuumed: the version is not retained
            text = "\n".join(str(v) for r in at.collect() for v in r)
            assert not [p for p in gone if p in text], f"{table.name} version {version}"
    # (2) no file under the warehouse holds their key or pseudonym, decoded
    for path in (p for p in wh.rglob("*") if p.is_file()):
        text = every_string_in(path)
        found = [s for s in [*gone, *chosen] if s in text]
        assert not found, f"{path.relative_to(wh)} holds {found}"
    # (3) everyone else is untouched
    recs = spark.read.format("delta").load(str(wh / C.RECOMMENDATIONS))
    assert sorted(tuple(r) for r in recs.collect()) == others_before
    assert spark.read.format("delta").load(str(wh / C.INTERACTIONS)).count() == other_rows_before
    erasure = spark.read.format("delta").load(str(wh / C.ERASURES)).collect()
    assert len(erasure) == 1 and erasure[0]["users"] == 3 and erasure[0]["purged"]
    assert erasure[0]["rows_deleted"][C.INTERACTIONS] > 0 and erasure[0]["model_factors_deleted"] == 3

    # a second request changes nothing, and the pipeline goes on (retrained without them)
    assert main(["forget", *args, "--users-file", str(keys_file), "--retrain"], spark=spark) == 0
    second = spark.read.format("delta").load(str(wh / C.ERASURES)).orderBy("erased_at").collect()[-1]
    assert sum(second["rows_deleted"].values()) == 0
    uids = spark.read.format("delta").load(str(wh / C.USER_IDS))
    assert uids.where(F.col(C.USER_ID).isin(gone)).count() == 0
