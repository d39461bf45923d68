"""``clinlinker variables``: clinical-variable tables from the code assignments (Spark job).

``--validate`` runs no Spark: it reads the definitions (and the is-a table), prints how many of
each variable's codes and prefixes the index's terminology holds, and exits 1 when a variable
can produce no evidence at all.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

SHOW_ROWS = 10
EXIT_CANNOT_PRODUCE = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "variables", help="build clinical-variable tables (one row per patient/document and "
        "variable) from the code assignments; --validate checks definitions against the index",
        description=__doc__,
    )
    p.add_argument("--config", default=None,
                   help="variables job config YAML (conf/variables.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. output.emit_absent=true (repeatable)")
    p.add_argument("--validate", action="store_true",
                   help="only check each variable's codes against index_path's terminology; "
                   "exit 1 when a variable can produce nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="check the definitions, the assignments table and the output table, "
                   "print what the run would do as JSON, and stop without writing")
    p.add_argument("--run-id", default=None, help="run id stamped on the rows (default: random)")
    p.add_argument("--show", type=int, default=SHOW_ROWS,
                   help="how many variable rows to print after the run (0: none)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clinlinker_spark.config import load_config
    from clinlinker_spark.variables import VariablesJobConfig

    config = load_config(args.config, args.set, cls=VariablesJobConfig)
    if args.validate:
        return validate(config, as_json=args.json)

    from clinlinker_spark.spark.session import build_spark_session, quiet_task_failures
    from clinlinker_spark.spark.variables_job import run_variables_job

    spark = build_spark_session(config.spark)
    if args.log_level != "DEBUG":
        quiet_task_failures(spark)
    try:
        if args.dry_run:
            from clinlinker_spark.spark.dry_run import plan_variables_job

            print(json.dumps(plan_variables_job(spark, config), indent=2))
            return 0
        summary = run_variables_job(spark, config, run_id=args.run_id)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
        if args.show > 0:
            print(format_rows(variable_rows(spark, config, summary, args.show)))
    finally:
        if config.spark.master:  # an existing session we did not start (Databricks) stays up
            spark.stop()
    return 0


def validate(config: Any, as_json: bool = False) -> int:
    """Print per-variable coverage in the index; 1 when a variable cannot produce evidence."""
    from clinlinker_spark.variables import format_coverage, validate_variables

    report = validate_variables(config)
    if as_json:
        print(json.dumps([{**r.__dict__, "can_produce": r.can_produce} for r in report],
                         indent=2))
    else:
        print(f"index: {config.index_path}")
        print(format_coverage(report))
    bad = [r.name for r in report if not r.can_produce]
    if bad:
        log.error("%d variable(s) can produce no evidence with this index: %s", len(bad),
                  ", ".join(bad))
        return EXIT_CANNOT_PRODUCE
    return 0


def variable_rows(spark: Any, config: Any, summary: dict[str, Any],
                  n: int) -> list[dict[str, Any]]:
    """A few present rows of this run (unit, variable, dates, n_mentions, evidence codes)."""
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.writer import read_delta

    table = read_delta(spark, config.output.target)
    if table is None:
        return []
    rows = (table.where((F.col("run_id") == summary["run_id"]) & F.col("present"))
            .orderBy("variable", "unit_id")
            .select("unit_type", "unit_id", "variable", "first_seen", "last_seen",
                    "n_mentions", F.col("evidence.code").alias("codes"))
            .limit(n).collect())
    return [r.asDict() for r in rows]


def format_summary(summary: dict[str, Any]) -> str:
    a = summary["assignments"]
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings_s"].items())
    lines = [
        f"variables table: {summary['table']} (Delta, version {summary['table_version']}, "
        f"writer {summary['writer']})",
        f"run {summary['run_id']}: unit {summary['unit_type']}; assignments {a['table']} "
        f"(version {a['version']}): {a['rows']} rows, {a['linked']} linked"
        + (f", {a['needs_review']} needs_review" if a.get("needs_review") else "") + "; "
        f"{summary['evidence_rows']} supporting mention rows"
        + (f" ({summary['evidence_without_unit']} without a {summary['unit_type']})"
           if summary["evidence_without_unit"] else ""),
        f"{summary['rows_written']} rows written, {summary['rows_replaced']} old rows replaced "
        f"({summary['stale_rows_removed']} stale rows removed)",
    ]
    width = max([len(n) for n in summary["variables"]] + [8])
    lines.append(f"  {'variable':<{width}}  {'units':>5}  {'mentions':>8}  definition")
    for name, v in summary["variables"].items():
        flag = "" if v.get("can_produce", True) else "  (no code in the index)"
        lines.append(f"  {name:<{width}}  {v['units_present']:>5}  {v['mentions']:>8}  "
                     f"{v['definition_hash'][:12]} {v['status']}{flag}")
    lines.append(f"timings: {timings}")
    return "\n".join(lines)


def format_rows(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no present rows in this run)"
    lines = ["variable rows (first few):"]
    for r in rows:
        dates = (f" {r['first_seen']}..{r['last_seen']}" if r["first_seen"] is not None
                 else "")
        lines.append(f"  {r['unit_type']} {r['unit_id']} {r['variable']}: "
                     f"{r['n_mentions']} mention(s){dates} codes {sorted(set(r['codes']))}")
    return "\n".join(lines)
