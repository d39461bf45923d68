"""``clinlinker link``: the Spark batch job (mentions -> code assignments in a Delta table)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger(__name__)

SHOW_ROWS = 5


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "link", help="link mentions to codes with Spark and write a Delta table",
        description=__doc__ + " Builds the SparkSession from the config's spark section, runs "
        "the job, prints a summary and a few linked rows, and stops the session.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="job config YAML (conf/local.yaml, conf/cluster.yaml, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. linking.top_k=50 (repeatable)")
    p.add_argument("--run-id", default=None, help="run id stamped on the rows (default: random)")
    p.add_argument("--show", type=int, default=SHOW_ROWS,
                   help="how many linked rows to print (0: none)")


def run(args: argparse.Namespace) -> int:
    from clinlinker_spark.config import load_config
    from clinlinker_spark.errors import ConfigError
    from clinlinker_spark.spark.job import run_link_job
    from clinlinker_spark.spark.session import build_spark_session

    config = load_config(args.config, args.set)
    if not config.input.path:
        raise ConfigError("input.path is empty: give --config conf/local.yaml (the sample "
                          "mentions) or --set input.path=...")
    spark = build_spark_session(config.spark)
    try:
        summary = run_link_job(spark, config, run_id=args.run_id)
        print(format_summary(summary))
        if args.show > 0:
            print(format_rows(linked_rows(spark, summary, args.show)))
    finally:
        if config.spark.master:  # an existing session we did not start (Databricks) stays up
            spark.stop()
    return 0


def linked_rows(spark: Any, summary: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """A few linked rows of this run from the written table (mention_id, text, code, ...)."""
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.writer import read_delta

    table = read_delta(spark, summary["table_path"])
    if table is None:
        return []
    columns = [c for c in ("mention_id", "text", "code", "term", "score") if c in table.columns]
    rows = (table.filter((F.col("run_id") == summary["run_id"]) & (F.col("status") == "linked"))
            .orderBy("mention_id").select(*columns).limit(n).collect())
    return [r.asDict() for r in rows]


def format_summary(summary: dict[str, Any]) -> str:
    counts = summary["counts_by_status"]
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings_s"].items())
    written = (f"writer {summary['writer']}" if summary["writer"]
               else "nothing new to write")
    return "\n".join([
        f"code assignments: {summary['table_path']} (Delta, version {summary['table_version']}, "
        f"{written})",
        f"run {summary['run_id']}: {summary['mentions']} mentions; "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f"; {summary['rows_written']} rows written, "
        f"{summary['skipped_already_linked']} skipped (already linked), "
        f"{summary.get('skipped_unchanged_invalid', 0)} invalid as before (left alone), "
        f"{summary['surface_forms']} surface forms embedded, "
        f"{summary.get('form_cache', {}).get('hits', 0)} taken from the form cache",
        f"timings: {timings}",
    ])


def format_rows(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no linked rows in this run)"
    lines = ["linked rows (first few):"]
    for r in rows:
        text = f" {r['text']!r}" if "text" in r else ""
        lines.append(f"  {r['mention_id']}{text} -> {r['code']} {r['term']!r} "
                     f"score {r['score']:.3f}")
    return "\n".join(lines)
