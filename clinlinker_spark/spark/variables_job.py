"""The clinical-variables Spark job: code assignments (Delta) -> one row per (unit, variable).

:func:`run_variables_job` is the whole job; ``clinlinker variables``,
``jobs/build_variables.py`` and ``notebooks/build_variables.py`` call it with a SparkSession
they built. Steps:

1. Driver, no Spark: read the variable definitions and the is-a table, expand them
   (:func:`clinlinker_spark.variables.load_variables`); with ``index_path`` set, warn about
   variables whose codes the index cannot produce.
2. Read the code-assignment table (``writer.read_delta``), keep ``status = linked`` rows (and
   ``needs_review`` rows when a variable sets ``include_needs_review``), and match them per
   Arrow batch with :class:`clinlinker_spark.variables.VariableMatcher` (status, codes,
   prefixes, labels, min_score, negation/uncertainty columns when the table has them).
3. Attach the unit and the date: the document (``doc_id``) or, with
   ``documents.patient_id_column``, the patient; dates from ``documents.date_column``. Both
   come from the documents table (``documents.path``, joined on doc_id) or, without one, from
   columns of the assignments table. Evidence whose unit is unknown (a doc_id missing from the
   documents table, a null patient id) is dropped and counted in the summary.
4. Aggregate per (unit, variable) and MERGE into the output Delta table on ``variable_key``.

Variables table (one row per (unit_type, unit_id, variable))::

    variable_key      string     MERGE key: SHA-256 (hex) of the JSON array
                                 [unit_type, unit_id, variable]
    unit_type         string     patient | document
    unit_id           string     patient id or doc_id
    variable          string     the definition's name
    present           boolean    true: at least one supporting mention
    first_seen        date       earliest / latest date of a supporting mention's document;
    last_seen         date       null when no dates are configured (or known)
    n_mentions        bigint     supporting mentions
    evidence          array<struct<mention_id, doc_id, code, score>>, by mention_id
    definition_hash   string     ``ExpandedVariable.definition_hash`` of the run
    model_version, index_version, reranker_version, ranker_version
                      string     the distinct versions of the supporting rows, sorted and
                                 comma-joined ("" = none, or a column the code-assignment
                                 table lacks; null on absent rows)
    run_id            string
    run_ts            timestamp  UTC, one value per run

Rows and reruns:

- Rows are written for units with evidence (``present = true``). With
  ``output.emit_absent: true`` every unit that has at least one row (any status) in the
  code-assignment table also gets a ``present = false`` row for each variable it has no
  evidence for (n_mentions 0, empty evidence, null dates and versions).
- Every run recomputes every configured variable from the whole code-assignment table. The
  MERGE replaces the rows of the keys it writes and deletes (``replace_keys_df``) the table's
  other rows of the same unit_type for the run's variables: a unit that no longer qualifies
  (a changed definition, a re-linked mention) loses its row; a rerun on unchanged input writes
  the same rows again (one more Delta version, no duplicates). Rows of variables that are not
  in this run's definitions, or of the other unit_type, are left untouched.
- The summary says, per variable, whether its definition changed since the rows already in
  the table (``changed``: they carry another definition_hash; ``unchanged``; ``no previous
  rows``: the table held no row of this variable and unit type).

Only ids and counts are logged.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from clinlinker_spark.errors import InputDataError
from clinlinker_spark.linker import STATUS_LINKED, STATUS_NEEDS_REVIEW
from clinlinker_spark.variables import (
    ExpandedVariable,
    VariableMatcher,
    VariablesJobConfig,
    load_variables,
    validate_variables,
)

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import StructType

    from clinlinker_spark.spark.writer import WriteResult

log = logging.getLogger(__name__)

KEY_COLUMN = "variable_key"
VERSION_COLUMNS = ("model_version", "index_version", "reranker_version", "ranker_version")
EVIDENCE_FIELDS = ("mention_id", "doc_id", "code", "score")
REQUIRED_ASSIGNMENT_COLUMNS = ("mention_id", "doc_id", "status", "code", "score")
VARIABLE_COLUMNS = (
    KEY_COLUMN, "unit_type", "unit_id", "variable", "present", "first_seen", "last_seen",
    "n_mentions", "evidence", "definition_hash", *VERSION_COLUMNS, "run_id", "run_ts",
)
# internal column names of the matching stage
_NEGATED = "_negated"
_UNCERTAIN = "_uncertain"
_UNIT = "_unit_id"
_DATE = "_event_date"
_VARIABLE = "variable"


def evidence_type() -> Any:
    """``array<struct<mention_id string, doc_id string, code string, score double>>``."""
    from pyspark.sql.types import ArrayType, DoubleType, StringType, StructField, StructType

    return ArrayType(StructType([
        StructField("mention_id", StringType(), True),
        StructField("doc_id", StringType(), True),
        StructField("code", StringType(), True),
        StructField("score", DoubleType(), True),
    ]), containsNull=False)


def variables_schema() -> StructType:
    """The variables table schema (see the module docstring)."""
    from pyspark.sql.types import (
        BooleanType,
        DateType,
        LongType,
        StringType,
        StructField,
        StructType,
        TimestampType,
    )

    types = {
        "present": BooleanType(), "first_seen": DateType(), "last_seen": DateType(),
        "n_mentions": LongType(), "evidence": evidence_type(), "run_ts": TimestampType(),
    }
    return StructType([StructField(name, types.get(name, StringType()), name != KEY_COLUMN)
                       for name in VARIABLE_COLUMNS])


def _col(name: str) -> Column:
    from pyspark.sql import functions as F

    return F.col("`" + name.replace("`", "``") + "`")


# --------------------------------------------------------------------------------------------
# Inputs


def read_assignments(spark: SparkSession, config: VariablesJobConfig) -> DataFrame:
    """The code-assignment table; InputDataError when it is missing or lacks columns."""
    from clinlinker_spark.spark.writer import read_delta

    table = config.assignments.target
    df = read_delta(spark, table)
    if df is None:
        raise InputDataError(f"no code-assignment Delta table {table} (run clinlinker link "
                             "first, or set assignments.path / assignments.table)")
    missing = [c for c in REQUIRED_ASSIGNMENT_COLUMNS if c not in df.columns]
    docs = config.documents
    if not docs.path:
        missing += [f"{c} (documents.*_column; no documents.path)"
                    for c in (docs.patient_id_column, docs.date_column)
                    if c and c not in df.columns]
    if missing:
        raise InputDataError(f"code-assignment table {table} lacks column(s) {missing}; its "
                             f"columns are {df.columns}")
    return df


def _as_date(df: DataFrame, name: str) -> Column:
    from pyspark.sql.types import StringType

    if isinstance(df.schema[name].dataType, StringType):
        # "2024-01-31" or "2024-01-31 10:00:00"; unparseable text -> null, never a failed job
        return _col(name).try_cast("date")
    return _col(name).cast("date")


def read_documents(spark: SparkSession, config: VariablesJobConfig) -> DataFrame | None:
    """(doc_id, _unit_id, _event_date) per document from ``documents.path``; None without one.

    ``_unit_id`` is the patient id (unit patient) or the doc_id (unit document); a missing
    date column gives null dates. Raises InputDataError for a missing table or column and for
    doc_ids that occur more than once (a document must map to one patient and one date).
    """
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.writer import read_delta

    cfg = config.documents
    if not cfg.path:
        return None
    if cfg.format == "delta":
        raw = read_delta(spark, cfg.path)
        if raw is None:
            raise InputDataError(f"no documents Delta table at {cfg.path}")
    elif cfg.format == "parquet":
        raw = spark.read.parquet(cfg.path)
    else:
        raw = (spark.read.option("header", True)
               .option("sep", "," if cfg.format == "csv" else "\t").csv(cfg.path))
    wanted = [c for c in (cfg.doc_id_column, cfg.patient_id_column, cfg.date_column) if c]
    missing = [c for c in wanted if c not in raw.columns]
    if missing:
        raise InputDataError(f"documents table {cfg.path} lacks column(s) {missing} "
                             f"(documents.*_column); its columns are {raw.columns}")
    unit = (_col(cfg.patient_id_column) if config.unit_type == "patient"
            else _col(cfg.doc_id_column))
    date = _as_date(raw, cfg.date_column) if cfg.date_column else F.lit(None).cast("date")
    docs = raw.select(
        _col(cfg.doc_id_column).cast("string").alias("doc_id"),
        unit.cast("string").alias(_UNIT),
        date.alias(_DATE),
    ).where(F.col("doc_id").isNotNull())
    repeated = (docs.groupBy("doc_id").count().where(F.col("count") > 1)
                .orderBy("doc_id").limit(5).collect())
    if repeated:
        raise InputDataError(
            f"documents table {cfg.path}: doc_id must be unique; repeated: "
            + ", ".join(f"{r['doc_id']} ({r['count']} rows)" for r in repeated)
        )
    return docs


# --------------------------------------------------------------------------------------------
# Matching (mapInArrow over the core matcher)


def make_match_fn(variables: Sequence[ExpandedVariable]
                  ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow function: linked (and needs_review) rows -> one row per (row, variable it
    counts for), by the rows' status, code, label, score and flags.

    Captures only the expanded variables (plain values). Output rows are the input rows
    (all columns) plus a ``variable`` column.
    """
    plain = tuple(variables)
    match_columns = ("status", "code", "label", "score", _NEGATED, _UNCERTAIN)

    def match_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pandas as pd
        import pyarrow as pa

        matcher = VariableMatcher(plain)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            names = batch.schema.names
            frame = pd.DataFrame({c: batch.column(c).to_pylist()
                                  for c in match_columns if c in names})
            pairs = matcher.match(frame, status_column="status", negated_column=_NEGATED,
                                  uncertain_column=_UNCERTAIN)
            if pairs.empty:
                continue
            taken = batch.take(pa.array(pairs["row"].to_numpy(), pa.int64()))
            variable = pa.array(pairs["variable"].tolist(), batch.schema.field("code").type)
            yield pa.RecordBatch.from_arrays([*taken.columns, variable],
                                             names=[*names, _VARIABLE])

    return match_partition


def matched_evidence(assignments: DataFrame, config: VariablesJobConfig,
                     variables: Sequence[ExpandedVariable]) -> DataFrame:
    """Linked rows (and needs_review rows, for the variables that include them) that count for
    a variable, one row per (mention, variable).

    Columns: mention_id, doc_id, status, code, label, score, the version columns, the
    negation / uncertainty flags (when present), ``_unit_id`` / ``_event_date`` when they come
    from the assignments table, and ``variable``.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    cols = set(assignments.columns)
    a_cfg, d_cfg = config.assignments, config.documents
    projection = [
        _col("mention_id").cast("string").alias("mention_id"),
        _col("doc_id").cast("string").alias("doc_id"),
        _col("status").cast("string").alias("status"),
        _col("code").cast("string").alias("code"),
        (_col("label") if "label" in cols else F.lit(None)).cast("string").alias("label"),
        _col("score").cast("double").alias("score"),
        *[(_col(c) if c in cols else F.lit("")).cast("string").alias(c)
          for c in VERSION_COLUMNS],
    ]
    for name, alias in ((a_cfg.negated_column, _NEGATED), (a_cfg.uncertain_column, _UNCERTAIN)):
        if name and name in cols:
            projection.append(_col(name).alias(alias))
            log.info("filtering on %s column %r of the assignments table", alias.strip("_"),
                     name)
    if not d_cfg.path:
        if config.unit_type == "patient":
            projection.append(_col(d_cfg.patient_id_column).cast("string").alias(_UNIT))
        if d_cfg.date_column:
            projection.append(_as_date(assignments, d_cfg.date_column).alias(_DATE))
    statuses = [STATUS_LINKED] + ([STATUS_NEEDS_REVIEW] if any(
        v.include_needs_review for v in variables) else [])
    linked = (assignments
              .where(F.col("status").isin(*statuses) & F.col("code").isNotNull())
              .select(*projection))
    out_schema = StructType([*linked.schema.fields,
                             StructField(_VARIABLE, StringType(), False)])
    return linked.mapInArrow(make_match_fn(variables), out_schema)


def attach_units(matched: DataFrame, documents: DataFrame | None, config: VariablesJobConfig
                 ) -> DataFrame:
    """``matched`` with ``_unit_id`` and ``_event_date`` (null where unknown)."""
    from pyspark.sql import functions as F

    if documents is not None:
        return matched.join(documents, on="doc_id", how="left")
    out = matched
    if _UNIT not in out.columns:
        out = out.withColumn(_UNIT, F.col("doc_id"))
    if _DATE not in out.columns:
        out = out.withColumn(_DATE, F.lit(None).cast("date"))
    return out


def units_seen(assignments: DataFrame, documents: DataFrame | None,
               config: VariablesJobConfig) -> DataFrame:
    """Distinct ``_unit_id`` of every row (any status) of the code-assignment table."""
    from pyspark.sql import functions as F

    if documents is not None:
        docs = assignments.select(_col("doc_id").cast("string").alias("doc_id")).distinct()
        units = docs.join(documents, on="doc_id", how="inner").select(_UNIT)
    elif config.unit_type == "patient":
        units = assignments.select(
            _col(config.documents.patient_id_column).cast("string").alias(_UNIT))
    else:
        units = assignments.select(_col("doc_id").cast("string").alias(_UNIT))
    return units.where(F.col(_UNIT).isNotNull()).distinct()


# --------------------------------------------------------------------------------------------
# Output rows


def present_rows(evidence: DataFrame) -> DataFrame:
    """One row per (unit, variable) with evidence: dates, counts, evidence array, versions."""
    from pyspark.sql import functions as F

    return evidence.groupBy(_UNIT, _VARIABLE).agg(
        F.lit(True).alias("present"),
        F.min(_DATE).alias("first_seen"),
        F.max(_DATE).alias("last_seen"),
        F.count(F.lit(1)).alias("n_mentions"),
        F.array_sort(F.collect_list(F.struct(*[F.col(c) for c in EVIDENCE_FIELDS])))
        .cast(evidence_type()).alias("evidence"),
        *[F.concat_ws(",", F.array_sort(F.collect_set(c))).alias(c) for c in VERSION_COLUMNS],
    )


def absent_rows(units: DataFrame, present: DataFrame, definitions: DataFrame) -> DataFrame:
    """present = false rows: every (unit, variable) of ``units`` x ``definitions`` not in
    ``present``."""
    from pyspark.sql import functions as F

    pairs = units.crossJoin(F.broadcast(definitions.select(_VARIABLE)))
    missing = pairs.join(present.select(_UNIT, _VARIABLE), on=[_UNIT, _VARIABLE],
                         how="left_anti")
    return missing.select(
        _UNIT, _VARIABLE,
        F.lit(False).alias("present"),
        F.lit(None).cast("date").alias("first_seen"),
        F.lit(None).cast("date").alias("last_seen"),
        F.lit(0).cast("long").alias("n_mentions"),
        F.array().cast(evidence_type()).alias("evidence"),
        *[F.lit(None).cast("string").alias(c) for c in VERSION_COLUMNS],
    )


def finish_rows(rows: DataFrame, definitions: DataFrame, unit_type: str, run_id: str,
                run_ts: datetime) -> DataFrame:
    """Add the key, unit type, definition hash and run lineage, in the table's column order."""
    from pyspark.sql import functions as F

    out = rows.join(F.broadcast(definitions), on=_VARIABLE, how="inner")
    out = (out.withColumn("unit_type", F.lit(unit_type))
           .withColumnRenamed(_UNIT, "unit_id")
           .withColumn("run_id", F.lit(run_id))
           .withColumn("run_ts", F.lit(run_ts).cast("timestamp")))
    out = out.withColumn(KEY_COLUMN, variable_key(F.col("unit_type"), F.col("unit_id"),
                                                  F.col(_VARIABLE)))
    return out.select(*[_col(c) for c in VARIABLE_COLUMNS])


def variable_key(unit_type: Column, unit_id: Column, variable: Column) -> Column:
    """SHA-256 hex of ``to_json(array(unit_type, unit_id, variable))``: unambiguous for any
    id (no separator can collide)."""
    from pyspark.sql import functions as F

    return F.sha2(F.to_json(F.array(unit_type, unit_id, variable)), 256)


def _definitions_df(spark: SparkSession, variables: Sequence[ExpandedVariable]) -> DataFrame:
    from pyspark.sql.types import StringType, StructField, StructType

    schema = StructType([StructField(_VARIABLE, StringType(), False),
                         StructField("definition_hash", StringType(), False)])
    return spark.createDataFrame([(v.name, v.definition_hash) for v in variables], schema)


def _previous_hashes(existing: DataFrame | None, unit_type: str) -> dict[str, set[str]]:
    from pyspark.sql import functions as F

    if existing is None or not {"variable", "definition_hash", "unit_type"} <= set(
            existing.columns):
        return {}
    found: dict[str, set[str]] = {}
    rows = (existing.where(F.col("unit_type") == unit_type)
            .select("variable", "definition_hash").distinct().collect())
    for row in rows:
        found.setdefault(row["variable"], set()).add(row["definition_hash"])
    return found


# --------------------------------------------------------------------------------------------
# The job


def run_variables_job(
    spark: SparkSession,
    config: VariablesJobConfig,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Build the variables table from the code assignments; returns a summary.

    Summary: run_id, run_ts, table (path or catalog name), writer, table_version,
    rows_written, rows_replaced, stale_rows_removed, unit_type, assignments (table, Delta
    version, rows, linked rows, needs_review rows), evidence_rows and evidence_without_unit,
    per-variable {definition_hash, status (changed / unchanged / no previous rows), units_present,
    mentions, can_produce (when index_path is set)}, wall time per stage in seconds, and
    mlflow_run_id (the MLflow run that logged it, with ``mlflow.tracking_uri`` set; a failed
    night's run is marked failed).
    """
    from clinlinker_spark.config import to_dict
    from clinlinker_spark.tracking import log_link_summary, tracked_run

    run_id = run_id or uuid.uuid4().hex
    with tracked_run(config.mlflow, "variables", f"variables {run_id[:12]}",
                     {"clinlinker.run_id": run_id}) as tracked:
        tracked.log_params(to_dict(config))
        summary = _run_variables_job(spark, config, run_id)
        summary["mlflow_run_id"] = tracked.run_id
        log_link_summary(tracked, summary)
    return summary


def _run_variables_job(spark: SparkSession, config: VariablesJobConfig,
                       run_id: str) -> dict[str, Any]:
    """:func:`run_variables_job` without its MLflow run."""
    from clinlinker_spark.spark.session import Persisted
    from clinlinker_spark.spark.writer import readable_version

    run_ts = datetime.now(timezone.utc)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    unit_type = config.unit_type
    log.info("variables job %s: starting (unit %s)", run_id, unit_type)

    # 1. definitions (driver)
    t = time.perf_counter()
    variables = load_variables(config)
    can_produce = _producible(config, variables)
    timings["definitions"] = time.perf_counter() - t

    # 2. inputs (schemas checked before any Spark job)
    assignments = read_assignments(spark, config)
    documents = read_documents(spark, config)
    definitions = _definitions_df(spark, variables)

    persisted = Persisted()
    try:
        # 3. match + units
        t = time.perf_counter()
        counts = _assignment_counts(assignments)
        evidence, n_matched, n_evidence = _evidence(assignments, documents, config, variables,
                                                    persisted)
        timings["match"] = time.perf_counter() - t

        # 4. rows
        t = time.perf_counter()
        rows = persisted(_variable_rows(assignments, documents, definitions, evidence, config,
                                        run_id, run_ts))
        n_rows = rows.count()
        per_variable = _per_variable(evidence)
        timings["aggregate"] = time.perf_counter() - t

        # 5. write: replace the run's variables (this unit type) wholesale
        t = time.perf_counter()
        written, previous, stale = _write_variables(spark, rows, config, variables)
        timings["write"] = time.perf_counter() - t
    finally:
        persisted.release()

    report = _variable_report(variables, previous, per_variable, can_produce)
    timings["total"] = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "run_id": run_id,
        "run_ts": run_ts.isoformat(),
        "table": str(config.output.target),
        "writer": written.writer,
        "table_version": written.table_version,
        "rows_written": written.rows_written,
        "rows_replaced": written.rows_replaced,
        "stale_rows_removed": stale,
        "unit_type": unit_type,
        "emit_absent": config.output.emit_absent,
        "assignments": {"table": str(config.assignments.target),
                        "version": readable_version(spark, config.assignments.target),
                        **counts},
        "evidence_rows": n_evidence,
        "evidence_without_unit": n_matched - n_evidence,
        "rows": n_rows,
        "variables": report,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    log.info("variables job %s done: %d rows written (table version %s), %d stale rows "
             "removed, %d evidence rows, %.1f s", run_id, written.rows_written,
             written.table_version, stale, n_evidence, timings["total"])
    return summary


def _producible(config: VariablesJobConfig,
                variables: Sequence[ExpandedVariable]) -> dict[str, bool]:
    """{variable: whether the index holds any of its codes or prefixes} when
    ``index_path`` is set (a warning for each that cannot have evidence); else {}."""
    can_produce: dict[str, bool] = {}
    if config.index_path:
        for cov in validate_variables(config, variables):
            can_produce[cov.name] = cov.can_produce
            if not cov.can_produce:
                log.warning("variable %s: none of its codes or prefixes is in the index %s; "
                            "it cannot have evidence", cov.name, config.index_path)
    return can_produce


def _assignment_counts(assignments: DataFrame) -> dict[str, int]:
    """Rows, linked rows and needs_review rows of the code assignments (one Spark job)."""
    from pyspark.sql import functions as F

    counts = assignments.agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum(F.when(F.col("status") == STATUS_LINKED, 1).otherwise(0)).alias("linked"),
        F.sum(F.when(F.col("status") == STATUS_NEEDS_REVIEW, 1).otherwise(0))
        .alias(STATUS_NEEDS_REVIEW),
    ).collect()[0]
    return {"rows": int(counts["rows"]), "linked": int(counts["linked"] or 0),
            "needs_review": int(counts[STATUS_NEEDS_REVIEW] or 0)}


def _write_variables(spark: SparkSession, rows: DataFrame, config: VariablesJobConfig,
                     variables: Sequence[ExpandedVariable],
                     ) -> tuple[WriteResult, dict[str, set[str]], int]:
    """MERGE ``rows`` into the variables table, replacing this unit type's rows of these
    variables wholesale: (the write, the definition hashes the table held before, the stale
    rows removed)."""
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.writer import merge_into_delta, read_delta

    existing = read_delta(spark, config.output.target)
    previous = _previous_hashes(existing, config.unit_type)
    replace_keys = None
    stale = 0
    if existing is not None and {"unit_type", "variable", KEY_COLUMN} <= set(existing.columns):
        scope = existing.where((F.col("unit_type") == config.unit_type)
                               & F.col("variable").isin([v.name for v in variables]))
        replace_keys = scope.select(KEY_COLUMN)
        stale = replace_keys.join(rows.select(KEY_COLUMN), on=KEY_COLUMN,
                                  how="left_anti").count()
    written = merge_into_delta(spark, rows, config.output.target, key=KEY_COLUMN,
                               writer=config.output.writer, replace_keys_df=replace_keys)
    return written, previous, stale


def _variable_report(variables: Sequence[ExpandedVariable], previous: dict[str, set[str]],
                     per_variable: dict[str, tuple[int, int]],
                     can_produce: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """Per variable: definition_hash, status against the table's previous rows (changed /
    unchanged / no previous rows), units_present, mentions, and can_produce when known."""
    report: dict[str, dict[str, Any]] = {}
    for v in variables:
        before = previous.get(v.name)
        status = ("no previous rows" if not before else
                  "unchanged" if before == {v.definition_hash} else "changed")
        units, mentions = per_variable.get(v.name, (0, 0))
        entry: dict[str, Any] = {"definition_hash": v.definition_hash, "status": status,
                                 "units_present": units, "mentions": mentions}
        if v.name in can_produce:
            entry["can_produce"] = can_produce[v.name]
        report[v.name] = entry
    return report


def _evidence(assignments: DataFrame, documents: DataFrame | None,
              config: VariablesJobConfig, variables: Sequence[ExpandedVariable],
              persist: Callable[[DataFrame], DataFrame]) -> tuple[DataFrame, int, int]:
    """(the supporting mentions with their unit, matched mentions, those with a unit): a
    mention whose document has no unit is left out with a warning (counted, never silently
    dropped)."""
    from pyspark.sql import functions as F

    matched = persist(attach_units(matched_evidence(assignments, config, variables),
                                   documents, config))
    n_matched = matched.count()
    evidence = matched.where(F.col(_UNIT).isNotNull())
    n_evidence = evidence.count()
    if n_matched > n_evidence:
        log.warning("%d supporting mention(s) have no %s (doc_id not in the documents "
                    "table or a null id) and are left out", n_matched - n_evidence,
                    config.unit_type)
    return evidence, n_matched, n_evidence


def _variable_rows(assignments: DataFrame, documents: DataFrame | None,
                   definitions: DataFrame, evidence: DataFrame, config: VariablesJobConfig,
                   run_id: str, run_ts: datetime) -> DataFrame:
    """The table's rows: one per (unit, variable) with evidence, and with
    ``output.emit_absent`` one per other (unit seen, variable) with present false."""
    present = present_rows(evidence)
    rows = present
    if config.output.emit_absent:
        units = units_seen(assignments, documents, config)
        rows = present.unionByName(absent_rows(units, present, definitions))
    return finish_rows(rows, definitions, config.unit_type, run_id, run_ts)


def _per_variable(evidence: DataFrame) -> dict[str, tuple[int, int]]:
    """{variable: (units with evidence, supporting mentions)}."""
    from pyspark.sql import functions as F

    return {
        r[_VARIABLE]: (int(r["units"]), int(r["mentions"]))
        for r in evidence.groupBy(_VARIABLE).agg(
            F.countDistinct(_UNIT).alias("units"), F.count(F.lit(1)).alias("mentions")
        ).collect()
    }
