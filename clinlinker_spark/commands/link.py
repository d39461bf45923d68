"""``clinlinker link``: the Spark batch job (mentions -> code assignments in a Delta table)."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from clinlinker_spark.spark.pipeline import LinkSummary

log = logging.getLogger(__name__)

SHOW_ROWS = 5
# the input's gold code, passed through to the table (gold TSV inputs: job.GOLD_RENAMES)
GOLD_COLUMN = "gold_code"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "link", help="link mentions to codes with Spark and write a Delta table",
        description=__doc__ + " Builds the SparkSession from the config's spark section, runs "
        "the job, prints a summary and a few linked rows (with this run's accuracy@1 against a "
        "gold_code pass-through column where there is one), and stops the session.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="job config YAML (conf/local.yaml, conf/cluster.yaml, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. linking.top_k=50 (repeatable)")
    p.add_argument("--run-id", default=None, help="run id stamped on the rows (default: random)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, the input's schema, the artifacts and the output "
                   "tables' schemas, print what the run would do as JSON, and stop: nothing "
                   "is linked, built or written")
    p.add_argument("--show", type=int, default=SHOW_ROWS,
                   help="how many linked and needs_review rows to print, followed by this "
                   "run's accuracy@1 against the input's gold_code column when the table has "
                   "one (0: none)")


def run(args: argparse.Namespace) -> int:
    from clinlinker_spark.config import load_config
    from clinlinker_spark.errors import ConfigError
    from clinlinker_spark.spark.pipeline import run_link_job
    from clinlinker_spark.spark.session import build_spark_session, quiet_task_failures
    from clinlinker_spark.spark.writer import read_delta

    config = load_config(args.config, args.set)
    if config.input.target is None:
        raise ConfigError("no input: give --config conf/local.yaml (the sample mentions), "
                          "--set input.path=... or --set input.table=catalog.schema.table")
    spark = build_spark_session(config.spark)
    if args.log_level != "DEBUG":
        quiet_task_failures(spark)
    try:
        if args.dry_run:
            from clinlinker_spark.spark.dry_run import plan_link_job

            print(json.dumps(plan_link_job(spark, config), indent=2))
            return 0
        summary = run_link_job(spark, config, run_id=args.run_id)
        print(format_summary(summary))
        table = read_delta(spark, config.output.target) if args.show > 0 else None
        if table is not None:
            print(format_rows(preview_rows(table, summary.run_id, args.show)))
            gold = gold_agreement(table, summary.run_id)
            if gold is not None:
                print(format_gold(gold))
    finally:
        if config.spark.master:  # an existing session we did not start (Databricks) stays up
            spark.stop()
    return 0


def preview_rows(table: Any, run_id: str, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` rows of run ``run_id`` in the code-assignment ``table`` (a DataFrame): the
    first linked rows by mention_id (half of ``n``, rounded up) and the first needs_review
    rows, either status filling what the other lacks; linked rows first. Columns:
    mention_id, text, status, code, term, score, and confidence and gold_code where the table
    has them."""
    from pyspark.sql import functions as F

    from clinlinker_spark.linker import STATUS_LINKED, STATUS_NEEDS_REVIEW

    wanted = ("mention_id", "text", "status", "code", "term", "score", "confidence",
              GOLD_COLUMN)
    columns = [c for c in wanted if c in table.columns]
    run = table.filter(F.col("run_id") == run_id)
    first = {status: [r.asDict() for r in run.filter(F.col("status") == status)
                      .orderBy("mention_id").select(*columns).limit(n).collect()]
             for status in (STATUS_LINKED, STATUS_NEEDS_REVIEW)}
    linked, review = first[STATUS_LINKED], first[STATUS_NEEDS_REVIEW]
    n_linked = max(n - len(review), (n + 1) // 2)
    return linked[:n_linked] + review[:n - min(n_linked, len(linked))]


def gold_agreement(table: Any, run_id: str) -> dict[str, int] | None:
    """Run ``run_id``'s agreement with the input's ``gold_code`` pass-through column, over its
    rows with a gold code (not null, not blank): ``rows``, ``correct`` (the row's code equals
    the gold code under ``text.normalize_code``: accuracy@1) and ``needs_review`` (rows with
    that status). None when ``table`` has no gold_code column. One Spark job."""
    from pyspark.sql import functions as F

    from clinlinker_spark.linker import STATUS_NEEDS_REVIEW

    if GOLD_COLUMN not in table.columns:
        return None
    same_code = F.udf(_same_code, "boolean")
    gold = F.col(GOLD_COLUMN).cast("string")
    rows = table.filter((F.col("run_id") == run_id) & gold.isNotNull()
                        & (F.trim(gold) != ""))
    counts = rows.agg(
        F.count(F.lit(1)).alias("rows"),
        F.coalesce(F.sum(same_code(F.col("code"), gold).cast("int")), F.lit(0)).alias("correct"),
        F.count(F.when(F.col("status") == STATUS_NEEDS_REVIEW, 1)).alias("needs_review"),
    ).first()
    return {k: int(counts[k]) for k in ("rows", "correct", "needs_review")}


def _same_code(code: str | None, gold: str) -> bool:
    """Whether a row's code is its gold code (``text.normalize_code``; no code: no)."""
    from clinlinker_spark.text import normalize_code

    return code is not None and normalize_code(code) == normalize_code(gold)


def format_summary(summary: LinkSummary) -> str:
    """The run's summary as a few lines for a terminal."""
    counts = summary.counts_by_status
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in summary.timings_s.items())
    written = f"writer {summary.writer}" if summary.writer else "nothing new to write"
    return "\n".join([
        f"code assignments: {summary.table} (Delta, version {summary.table_version}, "
        f"{written})",
        f"run {summary.run_id}: {summary.mentions} mentions; "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f"; {summary.rows_written} rows written, "
        f"{summary.skipped_already_linked} skipped (already linked), "
        f"{summary.skipped_unchanged_invalid} invalid as before (left alone), "
        f"{summary.surface_forms} surface forms embedded, "
        f"{summary.form_cache.get('hits', 0)} taken from the form cache",
        f"timings: {timings}",
        *([f"MLflow run {summary.mlflow_run_id}"] if summary.mlflow_run_id else []),
    ])


def format_rows(rows: list[dict[str, Any]]) -> str:
    """:func:`preview_rows` as lines: mention, code, term, score, the confidence where the
    row has one, needs_review, and the gold code where the table has one."""
    from clinlinker_spark.linker import STATUS_NEEDS_REVIEW

    if not rows:
        return "(no linked or needs_review rows in this run)"
    lines = ["linked and needs_review rows (first few):"]
    for r in rows:
        text = f" {r['text']!r}" if "text" in r else ""
        confidence = (f" confidence {r['confidence']:.3f}" if r.get("confidence") is not None
                      else "")
        review = f" ({STATUS_NEEDS_REVIEW})" if r.get("status") == STATUS_NEEDS_REVIEW else ""
        gold = f"; gold {r[GOLD_COLUMN]}" if GOLD_COLUMN in r else ""
        lines.append(f"  {r['mention_id']}{text} -> {r['code']} {r['term']!r} "
                     f"score {r['score']:.3f}{confidence}{review}{gold}")
    return "\n".join(lines)


def format_gold(gold: dict[str, int]) -> str:
    """:func:`gold_agreement` as one line."""
    n = gold["rows"]
    if n == 0:
        return f"against {GOLD_COLUMN}: no row of this run has a gold code"
    return (f"against {GOLD_COLUMN}: accuracy@1 {gold['correct'] / n:.3f} ({gold['correct']} "
            f"of the {n} rows of this run with a gold code), needs_review "
            f"{gold['needs_review'] / n:.3f} of them ({gold['needs_review']})")
