"""The `sparkrec` command: one subcommand per stage, plus `run` and `generate`.

Which stages a command runs is `stages.COMMANDS`. Nothing here imports
pyspark until a command needs a session, so `--help` and config errors answer
without a JVM.

Config is loaded and validated before a SparkSession exists, so a bad key
fails in a second. Expected failures (`SparkrecError`) print one line and
exit 2; anything else prints one line, the traceback goes to the log, and
the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from sparkrec import __version__
from sparkrec.core import columns as C
from sparkrec.core import stages
from sparkrec.core.config import Config, SparkConfig, check_input_paths, check_warehouse, load_config
from sparkrec.core.errors import ConfigError, SparkrecError
from sparkrec.core.gate import evaluation_line, tuning_line

if TYPE_CHECKING:  # pyspark is imported only by commands that start Spark
    from pyspark.sql import SparkSession

log = logging.getLogger("sparkrec")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def report_path(run_id: str, out: str | None) -> Path:
    """Where `report` writes, checked before any work: a file whose directory exists."""
    path = Path(out or f"report-{run_id}.html")
    if (out or "").endswith(("/", os.sep)) or path.is_dir():
        raise ConfigError(f"--out {out!r} is a directory; give a file name, e.g. --out {path / f'report-{run_id}.html'}")
    if not path.parent.exists():
        raise ConfigError(f"--out {out!r}: directory {str(path.parent)!r} does not exist")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparkrec", description="Recommendation pipeline on Spark and Delta Lake.")
    parser.add_argument("--version", action="version", version=f"sparkrec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--config", required=required, help="YAML config file (e.g. conf/local.yaml)")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config key, e.g. --set recommend.n=10 (repeatable)",
        )
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    gen = sub.add_parser("generate", help="write a synthetic shop (events + items) with known dirt")
    gen.add_argument("--events", type=int, required=True, help="number of event lines (10 thousand to 50 million)")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--out", required=True, help="output directory")
    gen.add_argument("--start", type=date.fromisoformat, default=date(2025, 6, 1), help="first day (YYYY-MM-DD)")
    gen.add_argument("--days", type=int, default=120, help="days of activity")
    with_config(gen, required=False)

    for name, text in (
        ("ingest", "raw input -> events_raw (and items)"),
        ("clean", "events_raw -> interactions + quarantine"),
        ("ids", "interactions -> user_ids, item_ids"),
        ("train", "ids + ALS -> user_factors, item_factors (runs ids first)"),
        ("recommend", "factors -> recommendations, similar_items"),
        ("evaluate", "fit on the training period; model vs baselines on the test period; quality gate"),
        ("tune", "search ALS and feedback settings on a validation split; prints the winner"),
        ("run", "all stages in order (tune and evaluate when enabled), then a summary"),
    ):
        stage_parser = sub.add_parser(name, help=text)
        with_config(stage_parser)
        if name in ("clean", "run"):
            stage_parser.add_argument(
                "--full", action="store_true",
                help="reclassify all of events_raw instead of only the rows no clean has seen (after a change of rules; "
                "same as --set clean.full=true)",
            )
    st = sub.add_parser("stream", help="the live path: micro-batches from Kafka (or new files) cleaned, folded in, "
                        "re-scored and published to live_recommendations within seconds")
    with_config(st)
    st.add_argument("--once", action="store_true",
                    help="process every event available now, then stop (a backfill, a test, a cron job)")
    sv = sub.add_parser("serve", help="the HTTP API: customers' lists, similar items and events, without Spark "
                        "(reads the published tables with delta-rs)")
    with_config(sv)
    sv.add_argument("--host", default=None, help="address to bind (default serve.host, 127.0.0.1)")
    sv.add_argument("--port", type=_positive_int, default=None, help="port (default serve.port, 8000)")
    runs = sub.add_parser("runs", help="list recent runs")
    with_config(runs)
    runs.add_argument("--limit", type=_positive_int, default=10, help="runs to list (default 10)")
    rb = sub.add_parser("rollback", help="restore recommendations, similar_items and factors to what a run wrote")
    with_config(rb)
    rb.add_argument("--to", required=True, metavar="RUN_ID")
    fg = sub.add_parser("forget", help="erase customers from every table, model and old table version (GDPR erasure)")
    with_config(fg)
    fg.add_argument("--user", dest="users", action="append", default=[], metavar="KEY", help="a customer's key (repeatable)")
    fg.add_argument("--users-file", default=None, metavar="FILE", help="a file of customer keys, one per line")
    fg.add_argument("--retrain", action="store_true", help="then train and recommend, so the model no longer carries them")
    look = sub.add_parser("lookup-user", help="print the pseudonym a user key has in this warehouse (privacy.pseudonymize_user_ids)")
    with_config(look)
    look.add_argument("key", metavar="KEY", help="the user key as the shop knows it")
    rep = sub.add_parser("report", help="write a self-contained HTML report of a run")
    with_config(rep)
    rep.add_argument("run_id", metavar="RUN_ID")
    rep.add_argument("--out", default=None, help="output file (default report-<RUN_ID>.html)")
    return parser


def _spark(cfg_spark: SparkConfig, spark: SparkSession | None, verbose: bool = False) -> SparkSession:
    if spark is not None:
        return spark
    from sparkrec.storage import session

    if cfg_spark.master is not None and not verbose:
        # Local mode: this process starts the JVM, so its warnings can go to a file.
        path = session.divert_jvm_output(session.spark_log_path(time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"))
        log.info("Spark's own output: %s (-v shows it here)", path)
    return session.build_session(cfg_spark)


def summary(spark: SparkSession, cfg: Config, run_id: str, rows: list[dict]) -> str:
    """A few lines a person reads after `sparkrec run`: the ledger and the outputs.

    `rows` are the stage rows this run wrote to `runs` (kept in memory: reading
    them back cost Spark jobs for what the process already knows).
    """
    from pyspark.sql import functions as F

    from sparkrec.storage import tables

    lines = [f"run {run_id}"]
    for r in rows:
        parts = [f"{r['stage']:<10} {r['status']:<9} {r['duration_s']:7.1f}s"]
        for label, key in (("in", "rows_in"), ("out", "rows_out"), ("quarantined", "rows_quarantined"), ("duplicates", "rows_duplicate")):
            if r[key] is not None:
                parts.append(f"{label} {r[key]:,}")
        lines.append("  " + ", ".join(parts))
        if r["stage"] == "evaluate" and r["metrics"]:
            lines.append("    " + evaluation_line(r["metrics"], json.loads(r["details"] or "{}")))
        if r["stage"] == "tune" and r["status"] == "succeeded":
            d = json.loads(r["details"] or "{}")
            lines.append("    " + tuning_line(d))
    recs = tables.read_table(spark, cfg, C.RECOMMENDATIONS, required=False)
    if recs is not None:
        agg = recs.df.groupBy(C.REC_SOURCE).agg(F.countDistinct(C.USER_ID).alias("users")).collect()
        by_source = ", ".join(f"{r['users']:,} users from {r[C.REC_SOURCE]}" for r in sorted(agg, key=lambda r: r[C.REC_SOURCE]))
        lines.append(f"recommendations: {cfg.table_path(C.RECOMMENDATIONS)} (version {recs.version}): {by_source}")
    return "\n".join(lines)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("py4j").setLevel(logging.WARNING)
    # faiss logs each optional SIMD module it tries to import; it picks the best one itself.
    logging.getLogger("faiss").setLevel(logging.WARNING)


def serve(cfg: Config, host: str | None, port: int | None) -> int:
    """Run the API until stopped (SIGINT or SIGTERM); its settings checked before anything binds."""
    import uvicorn

    from sparkrec.core import pseudonyms
    from sparkrec.serve.app import create_app, load_token

    update = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update=update)})
    token = load_token(cfg)
    secret = pseudonyms.load_secret(cfg.privacy) if cfg.privacy.pseudonymize_user_ids else None
    if token is None:
        log.warning("serve: no token set (%s or serve.token_file): no auth, bound to %s only", cfg.serve.token_env,
                    cfg.serve.host)
    app = create_app(cfg, token=token, secret=secret)
    log.info("serve: http://%s:%d (OpenAPI at /docs), tables in %s", cfg.serve.host, cfg.serve.port, cfg.warehouse)
    # access_log off: a path carries the customer's key, which must not reach the logs.
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, access_log=False, log_level="warning")
    return 0


def main(argv: list[str] | None = None, spark: SparkSession | None = None) -> int:
    """Entry point of the console script and of `jobs/*.py`; `spark` lets tests inject a session."""
    args = _parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    started = time.monotonic()
    ctx = None
    try:
        if args.command == "generate":
            from sparkrec.dev.generate import GenerateParams, generate

            if args.config:  # accepted for symmetry with the other commands; validated, not needed
                load_config(args.config, args.overrides)
            params = GenerateParams(events=args.events, seed=args.seed, start=args.start, days=args.days)
            if params.events < 1 or params.days < 1:
                raise ConfigError("--events and --days must be at least 1")
            manifest = generate(params, args.out)  # files only: no Spark, no JVM
            print(
                f"generated {params.events:,} events ({manifest['users']:,} users, {manifest['items']:,} items) "
                f"in {args.out} in {time.monotonic() - started:.1f}s"
            )
            return 0

        overrides = [*args.overrides, *(["clean.full=true"] if getattr(args, "full", False) else [])]
        cfg = load_config(args.config, overrides)
        if args.command in ("run", "evaluate", "tune"):
            for line in cfg.advice():
                log.warning("config: %s", line)
        if args.command == "lookup-user":  # no Spark: the pseudonym is a keyed hash of the key
            from sparkrec.core import pseudonyms

            if not cfg.privacy.pseudonymize_user_ids:
                raise ConfigError("privacy.pseudonymize_user_ids is off in this config: user keys are stored as they are")
            print(pseudonyms.pseudonym(pseudonyms.load_secret(cfg.privacy), pseudonyms.lookup_key(args.key)))
            return 0
        if args.command == "serve":  # no Spark, no JVM
            return serve(cfg, args.host, args.port)
        if args.command == "forget":
            from sparkrec.batch import forget

            keys = forget.read_keys(args.users, args.users_file)
        if cfg.privacy.pseudonymize_user_ids and args.command in ("ingest", "run", "forget"):
            from sparkrec.core import pseudonyms

            pseudonyms.load_secret(cfg.privacy)  # a missing secret fails here, before Spark starts
        check_warehouse(cfg)
        if args.command in ("ingest", "run"):
            check_input_paths(cfg)
        out = report_path(args.run_id, args.out) if args.command == "report" else None
        from sparkrec.batch import pipeline
        from sparkrec.storage.runs import RunContext

        if args.command == "stream" and cfg.stream.source.kind == "kafka" and cfg.spark.master is not None:
            # local mode resolves Spark's Kafka connector like Delta's jars (spark-submit passes --packages)
            packages = list(dict.fromkeys([*cfg.spark.packages, cfg.stream.kafka_package]))
            cfg = cfg.model_copy(update={"spark": cfg.spark.model_copy(update={"packages": packages})})
        session = _spark(cfg.spark, spark, args.verbose)
        ctx = RunContext(session, cfg, now=cfg.interval.end)
        log.info("run %s: %s with config %s (hash %s)", ctx.run_id, args.command, args.config, cfg.digest())
        if args.command in stages.COMMANDS:
            interrupted = False
            try:
                settings = pipeline.run_command(ctx, args.command)
            except KeyboardInterrupt:
                interrupted = True
                raise
            finally:
                if args.command == "run" and not interrupted:
                    try:
                        print(summary(session, cfg, ctx.run_id, ctx.written))
                    except Exception:  # the run's own error matters more than its summary
                        log.debug("no summary", exc_info=True)
            if args.command == "tune":
                print(tuned_settings(settings))
        elif args.command == "stream":
            from sparkrec.stream import live as stream

            print(stream.run(session, cfg, once=args.once))
        elif args.command == "forget":
            done = pipeline.run_forget(ctx, keys)
            print(forget_summary(done))
            if args.retrain:
                pipeline.run_stages(ctx, ("ids", "train", "recommend"))
                print("retrained: the model and the lists no longer use their events")
        elif args.command == "runs":
            from sparkrec.storage import registry

            print(registry.list_runs(session, cfg, args.limit))
        elif args.command == "rollback":
            from sparkrec.storage import registry

            print(registry.rollback(ctx, args.to))
        elif args.command == "report":
            from sparkrec.batch import report

            report.write_report(session, cfg, args.run_id, str(out))
            print(f"report written to {out}")
        log.info("run %s: %s done in %.1fs", ctx.run_id, args.command, time.monotonic() - started)
        return 0
    except KeyboardInterrupt:
        # The JVM got the same Ctrl-C: Py4J's errors after it are noise, not the cause.
        where = f" in stage {ctx.failed_stage}" if ctx is not None and ctx.failed_stage else ""
        print(f"sparkrec: interrupted{where}; every table is at its last committed version "
              "(a Delta write is all or nothing): run the command again to finish", file=sys.stderr)
        return 130
    except SparkrecError as exc:
        print(f"sparkrec: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # an unexpected failure: one line for the person, the trace for the log
        log.debug("unexpected failure", exc_info=True)
        where = f" in stage {ctx.failed_stage}" if ctx is not None and ctx.failed_stage else ""
        print(f"sparkrec: failed{where}: {describe(exc)} (rerun with -v for the traceback)", file=sys.stderr)
        return 1


def forget_summary(done: dict) -> str:
    """What `forget` did, for the person who answers the request."""
    rows = ", ".join(f"{t} {n:,}" for t, n in sorted(done["rows_deleted"].items()) if n) or "none (nothing of theirs was stored)"
    lines = [f"forgot {done['users']} customer(s): rows deleted: {rows}; model factors removed: {done['model_factors_deleted']:,}"]
    if done["purged"]:
        lines.append("purged: every table's older versions are vacuumed (time travel before this erasure is gone)")
    else:
        lines.append(f"NOT purged yet: {done['note']}")
    lines.append("until the next training the item factors still carry their past influence (--retrain trains now)")
    return "\n".join(lines)


def tuned_settings(tuned) -> str:
    """The tuning winner as `--set` overrides a person can paste into the next command."""
    best = tuned.train
    a = best.als
    half_life = best.recency_half_life_days if best.recency_half_life_days is not None else "null"
    return (
        "best settings (use as overrides):\n"
        f"  --set train.als.rank={a.rank} --set train.als.reg_param={a.reg_param:.5g} --set train.als.alpha={a.alpha:.5g} "
        f"--set train.als.max_iter={a.max_iter} --set train.recency_half_life_days={half_life} "
        f"--set 'train.event_weights={json.dumps(best.event_weights)}' --set recommend.blend.weight={tuned.blend_weight:g}"
    )


def describe(exc: BaseException) -> str:
    """The root cause in one line: for a JVM error, the innermost Java exception, not Py4J's wrapper."""
    java = getattr(exc, "java_exception", None)
    if java is not None:
        try:
            cause = java
            while cause.getCause() is not None:
                cause = cause.getCause()
            return str(cause.toString()).splitlines()[0]
        except Exception:  # the JVM may be gone (e.g. after an OutOfMemoryError)
            pass
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
