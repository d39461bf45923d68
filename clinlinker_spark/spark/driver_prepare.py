"""The link job's prepare stage for a small input, on the driver.

A nightly extract of a few thousand mentions costs Spark ~10 dependent stages to prepare
(:func:`~clinlinker_spark.spark.job.prepare_in_spark`: the input shuffled by mention_id, its ids
broadcast to the table scan and joined back, the normaliser's Python stage, the distinct forms
shuffled and broadcast to the form cache, the tallies), about 1.5 s of a 4 s night on a small
machine, whatever the input's size. Here the driver does the row-wise work in one process and
Spark runs only what needs the data it holds:

1. one Spark job collects the input as Arrow with the row-wise columns of
   :func:`~clinlinker_spark.spark.job.keyed_mentions` (synthetic ids, text hashes: Spark's own
   expressions, so both paths give the same ids);
2. :func:`identify_arrow` keeps one row per mention_id (the same rule and order as
   :func:`~clinlinker_spark.spark.job.identify_mentions`);
3. incremental runs: one Spark job scans the table for the input's ids
   (:func:`~clinlinker_spark.spark.job.match_table`, the input's keys broadcast);
4. :func:`~clinlinker_spark.spark.udfs.check_mentions_batch` (the normaliser's own rules) on every
   row not skipped;
5. with a form cache, one Spark job scans it for the distinct forms' keys (kept for the
   write: the hits' results are read from it once);
6. the rows to write and the forms to compute go back to Spark as DataFrames of local data;
   the rows to write are also kept as Arrow: when the results are few (de-duplicated forms),
   :func:`assemble_output_on_driver` joins them to the rows on the driver and the writer
   stages the output with pyarrow, instead of a Spark join and Parquet write (100k rows with
   25 candidates each: ~1.7 KB a row, held once, in the driver's Python).

The outcome is the Spark path's, row for row (the job's tests run both). Used when the input
has at most ``spark.driver_prepare_rows`` rows and only column types that go through Arrow and
back unchanged (:func:`~clinlinker_spark.spark.job.prepares_on_driver`). Nothing but counts is
logged.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clinlinker_spark.config import JobConfig
from clinlinker_spark.errors import ClinLinkerError
from clinlinker_spark.linker import STATUS_INVALID
from clinlinker_spark.spark import job as J
from clinlinker_spark.spark.schemas import (
    ARROW_STAGE_SCHEMA,
    CACHE_KEY_COLUMN,
    LINK_KEY_COLUMN,
    OUTCOME_COLUMNS,
    STAGE_SCHEMA,
    TEXT_NORM_COLUMN,
)

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

HELPER_COLUMNS = ("_rows", "_null_id")


def identify_arrow(rows: pa.Table) -> pa.Table:
    """:func:`~clinlinker_spark.spark.job.keyed_mentions` rows -> one row per mention_id (the
    first by ``job.FIRST_ROW_ORDER``, nulls first, as Spark orders them: strings by their
    UTF-8 bytes) with ``_rows``, the count of rows sharing the id."""
    n = rows.num_rows
    ordered = rows.take(_sort_indices(rows, ["mention_id", *J.FIRST_ROW_ORDER]))
    ids = ordered.column("mention_id").to_numpy(zero_copy_only=False)
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = ids[1:] != ids[:-1]
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, n))
    return ordered.take(pa.array(starts)).append_column("_rows", pa.array(counts, pa.int64()))


def _sort_indices(rows: pa.Table, columns: list[str]) -> pa.Array:
    """Row order by ``columns``, ascending, nulls first (pyarrow >= 25 takes the null
    placement per key and deprecates the global option; older versions know only that)."""
    try:
        return pc.sort_indices(rows, sort_keys=[(c, "ascending", "at_start") for c in columns])
    except (TypeError, ValueError):
        return pc.sort_indices(rows, sort_keys=[(c, "ascending") for c in columns],
                               null_placement="at_start")


def _frame(spark: SparkSession, table: pa.Table, schema: StructType) -> DataFrame:
    """``table`` as a Spark DataFrame of local data with ``schema`` (its fields, in order)."""
    return spark.createDataFrame(table.select(schema.fieldNames()), schema=schema)


def _fields(schema: StructType, names: list[str]) -> StructType:
    from pyspark.sql.types import StructType

    by_name = {f.name: f for f in schema.fields}
    return StructType([by_name[n] for n in names])


def prepare_on_driver(spark: SparkSession, selected: DataFrame, config: JobConfig,
                      versions: dict[str, str], cache_versions: dict[str, str],
                      input_rows: int | None, slots: int | None,
                      persist: Callable[[DataFrame], DataFrame]) -> J.Prepared:
    """The prepare stage of :func:`~clinlinker_spark.spark.job.run_link_job` for a small
    input (see the module docstring); same arguments and result as
    :func:`~clinlinker_spark.spark.job.prepare_in_spark`."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    from clinlinker_spark.spark.udfs import check_mentions_batch
    from clinlinker_spark.spark.writer import read_delta_snapshot

    keyed_rows = J.keyed_mentions(selected)
    # identify_mentions's schema: the keyed columns and the row count
    identified_schema = StructType([*keyed_rows.schema.fields,
                                    StructField("_rows", LongType(), False)])
    ident = identify_arrow(keyed_rows.toArrow())
    n = ident.num_rows
    ids = ident.column("mention_id").to_pylist()
    rows_per_id = ident.column("_rows").to_pylist()
    null_ids = ident.column("_null_id").to_pylist()

    # 3. the table's rows for these ids: which to skip, which were invalid for the same reason
    skip = [False] * n
    was_invalid: list[str | None] = [None] * n
    in_table = 0
    table_at: int | None = None
    if config.output.incremental:
        table, at = read_delta_snapshot(spark, config.output.path)
        keys = J.table_keys(table, versions)
        if keys is not None:
            table_at = at
            id_columns = ["mention_id", "text_sha256", *HELPER_COLUMNS]
            inputs = _frame(spark, ident, _fields(identified_schema, id_columns))
            matched = J.match_table(inputs, keys, input_rows).toArrow()
            marks = dict(zip(matched.column("mention_id").to_pylist(),
                             zip(matched.column("_skip").to_pylist(),
                                 matched.column("_was_invalid").to_pylist())))
            in_table = len(marks)
            for i, mention_id in enumerate(ids):
                mark = marks.get(mention_id)
                if mark is not None:
                    skip[i], was_invalid[i] = bool(mark[0]), mark[1]

    # 4. the normaliser on every row not skipped
    texts = ident.column("text").to_pylist()
    todo = [i for i in range(n) if not skip[i]]
    all_norms, all_reasons = check_mentions_batch(
        [texts[i] for i in todo], [rows_per_id[i] for i in todo], [null_ids[i] for i in todo],
        config.linking.max_text_length)
    keep: list[int] = []
    norms: list[str | None] = []
    reasons: list[str | None] = []
    for i, norm, reason in zip(todo, all_norms, all_reasons):
        if reason is not None and reason == was_invalid[i]:
            continue  # the table holds it as invalid for this reason: left alone
        keep.append(i)
        norms.append(norm)
        reasons.append(reason)
    unchanged = len(todo) - len(keep)
    counts = {"mentions": n, "in_table": in_table, "skipped": sum(skip),
              "invalid": sum(r is not None for r in reasons), "unchanged_invalid": unchanged}
    kept_columns = [c for c in identified_schema.fieldNames() if c not in HELPER_COLUMNS]
    validated_rows = (ident.take(pa.array(keep, pa.int64())).select(kept_columns)
                      .append_column("reason", pa.array(reasons, pa.string()))
                      .append_column(TEXT_NORM_COLUMN, pa.array(norms, pa.string())))
    validated_schema = StructType([*_fields(identified_schema, kept_columns).fields,
                                   StructField("reason", StringType()),
                                   StructField(TEXT_NORM_COLUMN, StringType())])
    validated = _frame(spark, validated_rows, validated_schema)

    # the surface forms (one per distinct text, or one per mention without de-duplication)
    linkable = [j for j, r in enumerate(reasons) if r is None]
    if config.spark.dedupe_surface_forms:
        form_texts = sorted({norms[j] for j in linkable})  # type: ignore[type-var]
        form_keys = form_texts
    else:
        form_texts = [norms[j] for j in linkable]
        form_keys = [ids[keep[j]] for j in linkable]

    # 5. the forms the form cache holds
    counts.update(forms=len(form_texts), cache_hits=0)
    hits: DataFrame | None = None
    cache_at: int | None = None
    cache_path = config.output.form_cache_path
    if cache_path:
        cache, at = read_delta_snapshot(spark, cache_path)
        cache = J.usable_cache(cache)
        if cache is not None:
            cache_at = at
            cache_keys = [J.cache_key_of(t, cache_versions) for t in form_texts]
            keyed = pa.table({CACHE_KEY_COLUMN: pa.array(cache_keys, pa.string()),
                              LINK_KEY_COLUMN: pa.array(form_keys, pa.string()),
                              TEXT_NORM_COLUMN: pa.array(form_texts, pa.string())})
            keyed_schema = StructType([StructField(CACHE_KEY_COLUMN, StringType()),
                                       *_fields(STAGE_SCHEMA, [LINK_KEY_COLUMN,
                                                               TEXT_NORM_COLUMN]).fields])
            found = persist(cache.join(F.broadcast(_frame(spark, keyed, keyed_schema)),
                                       CACHE_KEY_COLUMN, "inner"))
            held = set(found.select(CACHE_KEY_COLUMN).toArrow().column(0).to_pylist())
            hits = found.select(*STAGE_SCHEMA.fieldNames())
            counts["cache_hits"] = len(held)
            missing = [j for j, key in enumerate(cache_keys) if key not in held]
            form_keys = [form_keys[j] for j in missing]
            form_texts = [form_texts[j] for j in missing]
    forms_rows = pa.table({LINK_KEY_COLUMN: pa.array(form_keys, pa.string()),
                           TEXT_NORM_COLUMN: pa.array(form_texts, pa.string())})
    tasks = J._form_tasks(len(form_texts), config.spark.shuffle_partitions, slots)
    forms = _frame(spark, forms_rows,
                   _fields(STAGE_SCHEMA, [LINK_KEY_COLUMN, TEXT_NORM_COLUMN])).repartition(tasks)
    return J.Prepared(validated, forms, hits, counts, table_at, cache_at, True, validated_rows)


def assemble_output_on_driver(spark: SparkSession, out: DataFrame, validated: pa.Table,
                              results: DataFrame | None, versions: dict[str, str], run_id: str,
                              run_ts: datetime, dedupe: bool) -> pa.Table:
    """``out.toArrow()`` without Spark evaluating ``out``: ``out`` is
    :func:`~clinlinker_spark.spark.job.assemble_output` of ``validated`` (here its rows as
    Arrow, :attr:`~clinlinker_spark.spark.job.Prepared.validated_rows`) and ``results`` (a
    few rows, collected as Arrow), with the same ``versions``, ``run_id``, ``run_ts`` and
    ``dedupe``; the same rules, row for row, and the same Arrow schema. Raises
    :class:`~clinlinker_spark.errors.ClinLinkerError` for a row to link without a result (a
    broken invariant), where the Spark plan fails."""
    from pyspark.sql.pandas.types import to_arrow_schema

    large = spark.conf.get("spark.sql.execution.arrow.useLargeVarTypes", "false") == "true"
    schema = to_arrow_schema(out.schema, error_on_duplicated_field_names_in_struct=True,
                             prefers_large_types=large)
    found = (results.toArrow() if results is not None else ARROW_STAGE_SCHEMA.empty_table())
    n = validated.num_rows
    valid = pc.is_null(validated.column("reason"))
    key = validated.column(TEXT_NORM_COLUMN if dedupe else "mention_id")
    at = pc.index_in(key, value_set=found.column(LINK_KEY_COLUMN))
    if pc.any(pc.and_(valid, pc.is_null(at))).as_py():
        raise ClinLinkerError(f"{J.NO_RESULT}: a broken invariant of the link job")
    res = found.take(pc.if_else(valid, at, pa.scalar(None, at.type)))

    def when_valid(column: str, otherwise: Any) -> pa.ChunkedArray:
        values = res.column(column)
        if column == "candidates":  # the table's candidate struct: without ``exact``
            values = values.cast(schema.field("candidates").type)
        return pc.if_else(valid, values, otherwise)

    columns = {name: validated.column(name) for name in validated.column_names}
    columns["status"] = when_valid("status", pa.scalar(STATUS_INVALID))
    columns["reason"] = when_valid("reason", validated.column("reason"))
    for name in OUTCOME_COLUMNS[2:]:  # code, term, score, confidence
        columns[name] = when_valid(name, pa.scalar(None, res.schema.field(name).type))
    columns["candidates"] = when_valid(
        "candidates", pa.scalar([], schema.field("candidates").type))
    for name, value in {**versions, "run_id": run_id}.items():
        columns[name] = pa.array([value] * n, pa.string())
    columns["run_ts"] = pa.array([run_ts] * n, pa.timestamp("us", tz="UTC"))
    return pa.table([columns[f.name] for f in schema], names=schema.names).cast(schema)
