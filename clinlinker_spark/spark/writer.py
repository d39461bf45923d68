"""The one module that writes tables: an idempotent MERGE into a Delta table, and its readers.

``merge_into_delta(spark, df, table, key)`` leaves the table holding exactly
(old rows whose key is not in ``df``) + (``df``'s rows), so a rerun with the same ``df`` leaves
the same rows and adds one Delta version. Two writers implement it:

``delta-spark``
    Where the session has Delta Lake (Databricks, clusters started with ``io.delta:delta-spark``
    and the ``DeltaSparkSessionExtension``): ``DeltaTable.forPath(...).merge(...)
    .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute()``, with
    ``withSchemaEvolution()`` when ``df`` adds columns or struct fields;
    ``df.write.format("delta")`` creates a missing table. With ``replace_keys_df`` the MERGE
    source carries a delete marker (``whenMatchedDelete`` / ``whenMatchedUpdate`` /
    ``whenNotMatchedInsert`` with explicit columns); new columns and struct fields are then
    added first by an empty ``mergeSchema`` append, one extra metadata-only version.
    ``rows_replaced`` comes from the commit's ``operationMetrics``. The only writer of
    catalog tables (``TableRef`` by name: ``DeltaTable.forName``, ``saveAsTable``): the
    session's catalog (Unity Catalog on Databricks) owns their storage.

``deltalake``
    Everywhere else (plain pip installs, CI). Spark writes the Parquet files, the driver commits
    them to ``_delta_log`` with the ``deltalake`` package (delta-rs) in one transaction, so the
    table is a real Delta table that delta-spark, delta-rs, DuckDB and Databricks read. MERGE is
    copy-on-write:

    1. Spark writes ``df`` once into a hidden staging folder of the table,
       ``<table>/_clinlinker_staging/<write id>/`` (``df`` is evaluated exactly once; the key
       check and everything after it read those Parquet files, not ``df``).
    2. The key check (one Spark aggregate over the staged files, :func:`_check_keys`, the
       same for both writers) refuses null or duplicate keys.
    3. Spark reads the current snapshot's files (listed by ``DeltaTable.get_add_actions`` /
       ``file_uris``, never a directory glob) with ``_metadata.file_path`` and finds the files
       that hold a key being replaced (key and file columns only, a semi-join).
    4. The surviving rows of those files are written to the staging folder; every staged file
       is then moved to ``<table>/part-NNNNN-<write id>.<ext>`` (unique per write).
    5. ONE commit: ``DeltaTable.create_write_transaction(adds + removes, mode="append")`` with
       ``AddAction`` (size, ``partition_values={}``, modification time, ``data_change=True``,
       stats: ``numRecords`` plus ``nullCount``/``minValues``/``maxValues`` of top-level
       integer, string and date columns, read from the Parquet footers) for the new files and
       ``deltalake.transaction.RemoveAction`` for the replaced ones. Files without a replaced
       key are neither read in full nor rewritten. A new table is created by
       ``create_table_with_add_actions`` (version 0).

    Two cases cannot use step 5 and rewrite every surviving row instead, committed as one
    ``create_write_transaction(adds, mode="overwrite")`` (delta-rs then writes the removes of
    every current file itself, also one commit):

    * ``df`` adds columns or struct fields: an ``append`` commit does not change the table
      schema in delta-rs (it keeps the old schema and readers would drop the new column);
      ``overwrite`` does. Every surviving row is written in the new schema (new fields null).
    * an older ``deltalake`` 1.x without ``deltalake.transaction.RemoveAction`` (1.6.6 has
      it): ``append`` cannot remove files there. The tempting shortcut, ``overwrite`` that
      re-adds the untouched files under their old paths, is NOT used: delta-rs (checked with
      1.6.6) then writes an ``add`` and a ``remove`` of the same path into one commit, which
      the Delta protocol leaves undefined (delta-spark keeps the last action of a version,
      here the remove, and would drop those rows).

    Crash safety: the log alone decides what the table holds. Files staged or moved by a write
    that fails before its commit are unreferenced; the staging folder is removed when the write
    ends and moved files are deleted unless the commit landed. A killed process leaves its
    staging folder (VACUUM skips ``_`` folders): the next write removes the folders whose
    owner process has ended on this host or that are older than ``staging_max_age_hours``
    (:func:`sweep_staging`); moved files it left are for ``VACUUM``. Nothing committed is
    touched before the commit, so the table reads as before. ``read_delta`` reads exactly the
    current snapshot's files.

    Concurrent writers: delta-rs is told not to retry a commit by itself (it would append on a
    newer version without knowing whether that version wrote this write's keys). On a
    conflict the commits in between are read; a write commits again only when they removed
    none of its rewritten files, wrote none of its keys and changed no schema
    (``commit_retries`` times at most), else :class:`ConcurrentWriteError`. The commit records
    delta-spark's MERGE metrics; delta-rs names the operation WRITE whatever the writer asks.

Both writers: ``df`` must hold one row per non-null key (checked, error otherwise); it must
have every column of an existing table (a missing column is an error, not silently null), may
add new columns and new fields to a column's structs, at any depth (stored nullable; the
table's fields keep their order, new ones follow; older rows read them as null), and may not
otherwise change a column's type. ``replace_keys_df``
(a DataFrame with the key column) names further keys whose old rows are deleted even when
``df`` has no row for them; the table then holds (old rows whose key is in neither) + ``df``.
The ``deltalake`` writer supports unpartitioned tables without deletion vectors or column
mapping (the tables this project writes) and needs the driver to reach the table's storage
through pyarrow / deltalake: plain paths are local paths, on clusters give URIs both Spark and
delta-rs understand (``s3://``, ``abfss://``, ``gs://``).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence
from urllib.parse import unquote, urlparse

from clinlinker_spark.config import TableRef
from clinlinker_spark.errors import ClinLinkerError, ConfigError, InputDataError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from deltalake import DeltaTable
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import DataType, StructType

log = logging.getLogger(__name__)

WRITER_DELTA_SPARK = "delta-spark"
WRITER_DELTALAKE = "deltalake"
_WRITER_CHOICES = ("auto", WRITER_DELTA_SPARK, WRITER_DELTALAKE)

STAGING_DIR = "_clinlinker_staging"
_DELETE_MARKER = "__clinlinker_delete__"
_FILE_COLUMN = "__clinlinker_file__"
_DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
_DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
# Session settings every Parquet write of this module runs under: microsecond timestamps (the
# Spark default, INT96, is deprecated and not what delta-rs expects) and standard 3-level lists.
_PARQUET_WRITE_CONF = {
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.parquet.writeLegacyFormat": "false",
}
# Reader features whose tables are read correctly by listing the snapshot's Parquet files.
_SUPPORTED_READER_FEATURES = {"timestampNtz", "v2Checkpoint", "vacuumProtocolCheck"}

try:  # newer deltalake (1.6.6 has it): removals can be committed together with adds
    from deltalake.transaction import RemoveAction as _RemoveAction
except ImportError:  # pragma: no cover - older deltalake
    _RemoveAction = None


class DeltaWriteError(ClinLinkerError):
    """A Delta table cannot be written or read as asked (schema, table layout, commit)."""


class SchemaMismatchError(DeltaWriteError):
    """The DataFrame's schema is not compatible with the existing table's schema."""


class ConcurrentWriteError(DeltaWriteError):
    """Another write committed to the table first, touching what this write replaces; this
    write committed nothing."""


class DuplicateKeyError(InputDataError):
    """The DataFrame to merge has null keys or more than one row for a key."""


@dataclass(frozen=True)
class WriteResult:
    """What one ``merge_into_delta`` call did.

    ``rows_replaced`` counts old rows taken out of the table: rows whose key was in ``df``
    (replaced by ``df``'s row) plus rows deleted through ``replace_keys_df``.
    """

    writer: str  # "delta-spark" | "deltalake"
    table_version: int
    rows_written: int
    rows_replaced: int
    # rows written per value of the ``count_by`` column (empty without it); not compared
    counts: dict[str, int] = field(default_factory=dict, compare=False)


# --------------------------------------------------------------------------------------------
# Public API


def delta_spark_available(spark: SparkSession) -> bool:
    """Whether ``spark`` can run Delta Lake itself (delta-spark jars + session extension).

    True when the ``delta`` Python package imports, the session is configured with the
    ``DeltaSparkSessionExtension`` or ``DeltaCatalog`` (or runs on Databricks, where Delta is
    built in), and the JVM can load ``io.delta.tables.DeltaTable``. On Spark Connect, where
    there is no JVM handle, a Delta data source lookup on a missing path stands in for the
    class check. Never raises.
    """
    try:
        import delta.tables  # noqa: F401
    except ImportError:
        return False
    try:
        extensions = spark.conf.get("spark.sql.extensions", "") or ""
        catalog = spark.conf.get("spark.sql.catalog.spark_catalog", "") or ""
    except Exception:  # noqa: BLE001 - a conf lookup must not fail the caller
        extensions, catalog = "", ""
    on_databricks = bool(os.environ.get("DATABRICKS_RUNTIME_VERSION"))
    if not on_databricks and _DELTA_EXTENSION not in extensions and _DELTA_CATALOG not in catalog:
        return False
    jvm = _classic_jvm(spark)
    if jvm is not None:
        try:
            from py4j.java_gateway import JavaClass

            # py4j answers a JavaPackage (not a JavaClass) for a class the JVM cannot load.
            return isinstance(jvm.io.delta.tables.DeltaTable, JavaClass)
        except Exception:  # noqa: BLE001
            return False
    return _probe_delta_source(spark)


def merge_into_delta(
    spark: SparkSession,
    df: DataFrame,
    table: str | TableRef,
    key: str = "mention_id",
    writer: str = "auto",
    replace_keys_df: DataFrame | None = None,
    count_by: str | None = None,
    new_keys_at: int | None = None,
    max_rows: int | None = None,
    rows_per_file: int = 250_000,
    broadcast_rows: int = 200_000,
    staging_max_age_hours: float = 24.0,
    commit_retries: int = 3,
) -> WriteResult:
    """MERGE ``df`` into the Delta ``table`` (a path, or a :class:`TableRef` by path or by
    catalog name) on ``key``; create the table if missing.

    After the call the table holds exactly (old rows whose key is neither in ``df`` nor in
    ``replace_keys_df``) + (``df``'s rows), in one new Delta version. ``writer`` is ``auto``
    (delta-spark when :func:`delta_spark_available`, else deltalake), ``delta-spark`` or
    ``deltalake``. Raises :class:`DuplicateKeyError` when ``df`` has null or repeated keys,
    :class:`SchemaMismatchError` when its schema conflicts with the table's.

    ``count_by``: a column of ``df`` whose values are counted (``WriteResult.counts``) in the
    same Spark job as the key check. ``new_keys_at``: the caller knows that none of ``df``'s
    keys is in the table at this version (the version :func:`read_delta_snapshot` gave); when
    the table is still at it, the deltalake writer appends without searching the table for
    rows to replace. On any other version, or with delta-spark, the MERGE searches as usual.

    ``max_rows``: an upper bound of ``df``'s rows that the caller knows (None: unknown). ``df``
    is then written in about ``max_rows / rows_per_file`` files (``output.rows_per_file``),
    more while every task slot gets a share (:func:`_file_count`): a night of a few thousand
    thousand rows adds one file to the table, not one per partition.

    ``staging_max_age_hours``: before it writes, the deltalake writer removes the staging
    folders that writes of ended processes on this host left, and any older than this.
    ``commit_retries``: how many times the deltalake writer commits again when another write
    committed first without touching what this one replaces (else :class:`ConcurrentWriteError`).
    """
    if writer not in _WRITER_CHOICES:
        raise ConfigError(f"writer must be one of {', '.join(_WRITER_CHOICES)}; got {writer!r}")
    if key not in df.columns:
        raise SchemaMismatchError(f"the DataFrame to merge has no key column {key!r}")
    if replace_keys_df is not None and key not in replace_keys_df.columns:
        raise SchemaMismatchError(f"replace_keys_df has no key column {key!r}")
    if count_by is not None and count_by not in df.columns:
        raise SchemaMismatchError(f"the DataFrame to merge has no column {count_by!r} to count")
    ref = as_table_ref(table)
    use_delta_spark = writer_for(spark, ref, writer) == WRITER_DELTA_SPARK
    started = time.monotonic()
    if max_rows is not None:
        from clinlinker_spark.spark.session import task_slots

        df = df.coalesce(_file_count(max_rows, task_slots(spark), rows_per_file))
    if use_delta_spark:
        result = _merge_delta_spark(spark, df, ref, key, replace_keys_df, count_by)
    else:
        result = _merge_deltalake(spark, df, ref.path, key, replace_keys_df, count_by, new_keys_at,
                                  broadcast_rows, staging_max_age_hours * 3600.0,
                                  commit_retries)
    log.info(
        "merged into Delta table %s with %s: version %d, %d rows written, %d old rows "
        "replaced, %.1fs",
        ref, result.writer, result.table_version, result.rows_written, result.rows_replaced,
        time.monotonic() - started,
    )
    return result


def writer_for(spark: SparkSession, table: str | TableRef, writer: str) -> str:
    """The writer :func:`merge_into_delta` uses for ``table`` in this session with ``writer``
    (``auto``, ``delta-spark`` or ``deltalake``); ConfigError where it cannot write: a
    catalog table or an explicit ``delta-spark`` in a session without Delta Lake."""
    ref = as_table_ref(table)
    use_delta_spark = writes_with_delta_spark(spark, writer)
    if ref.by_name and not use_delta_spark:
        raise ConfigError(
            f"{ref} is a catalog table: it is written with delta-spark, and this Spark session "
            f"{'cannot use Delta Lake' if writer != WRITER_DELTALAKE else 'asks for deltalake'}"
            ": start it with the io.delta:delta-spark jars and "
            f"spark.sql.extensions={_DELTA_EXTENSION} (Databricks has them), or name the "
            "table by path"
        )
    if writer == WRITER_DELTA_SPARK and not use_delta_spark:
        raise ConfigError(
            "writer 'delta-spark' asked for, but this Spark session cannot use Delta Lake: "
            "start it with the io.delta:delta-spark jars and "
            f"spark.sql.extensions={_DELTA_EXTENSION}, or use writer 'deltalake'/'auto'"
        )
    return WRITER_DELTA_SPARK if use_delta_spark else WRITER_DELTALAKE


def writes_with_delta_spark(spark: SparkSession, writer: str) -> bool:
    """Whether :func:`merge_into_delta` with ``writer`` uses delta-spark in this session."""
    return writer in ("auto", WRITER_DELTA_SPARK) and delta_spark_available(spark)


def as_table_ref(table: str | TableRef) -> TableRef:
    """``table`` as a :class:`TableRef` (a plain string is a path)."""
    return table if isinstance(table, TableRef) else TableRef(path=str(table))


def read_delta(spark: SparkSession, table: str | TableRef) -> DataFrame | None:
    """The current snapshot of the Delta ``table`` (a path or a :class:`TableRef`) as a
    DataFrame; None if there is no table. A catalog table is read by name.

    With delta-spark: ``spark.read.format("delta")``. Otherwise Spark reads exactly the Parquet
    files of the snapshot that deltalake lists (uncommitted or removed files in the folder are
    never read), with the table's schema (files written before a column was added read it as
    null).
    """
    return read_delta_snapshot(spark, table)[0]


def read_delta_snapshot(spark: SparkSession,
                        table: str | TableRef) -> tuple[DataFrame | None, int | None]:
    """:func:`read_delta` and the version it reads (None when there is no table).

    The DataFrame reads that version whenever Spark evaluates it, also after a later write to
    the table: a job that reads its own output table (the incremental skip, the form cache)
    and evaluates the read again after its write sees the rows it saw before. A catalog table
    in a session without delta-spark is read at its current state (version None)."""
    ref = as_table_ref(table)
    if delta_spark_available(spark):
        if not _delta_spark_exists(spark, ref):
            return None, None
        version = _delta_spark_version(spark, ref)
        if ref.by_name:  # the name is checked against config.TABLE_NAME
            return spark.sql(f"SELECT * FROM {ref.name} VERSION AS OF {version}"), version
        return (spark.read.format("delta").option("versionAsOf", version).load(ref.path),
                version)
    if ref.by_name:
        if not spark.catalog.tableExists(ref.name):
            return None, None
        return spark.read.table(ref.name), None
    loc = _locate(ref.path)
    table = _open_table(loc)
    if table is None:
        return None, None
    _check_readable(table, loc)
    schema = _spark_schema(table)
    files = [_spark_uri(uri) for uri in table.file_uris()]
    if not files:
        return spark.createDataFrame([], schema), table.version()
    return spark.read.schema(schema).parquet(*files), table.version()


def table_exists(path: str) -> bool:
    """Whether a Delta table (a readable ``_delta_log``) exists at ``path``."""
    from deltalake import DeltaTable

    return bool(DeltaTable.is_deltatable(_locate(path).uri))


def table_version(path: str) -> int | None:
    """The latest committed version of the Delta table at ``path``; None if there is none."""
    table = _open_table(_locate(path))
    return None if table is None else int(table.version())


def readable_version(spark: SparkSession, table: str | TableRef) -> int | None:
    """The latest version of ``table`` for a summary (a catalog table: from its history);
    None when there is no table or it cannot be read (e.g. a path only Spark can read)."""
    ref = as_table_ref(table)
    try:
        if not ref.by_name:
            return table_version(ref.path)
        if not spark.catalog.tableExists(ref.name):
            return None
        return _delta_spark_version(spark, ref)
    except Exception:  # noqa: BLE001 - informational only
        return None


def schema_change(table: StructType, incoming: StructType, key: str) -> list[str]:
    """The columns a MERGE of rows with schema ``incoming`` into a table with schema ``table``
    would add or widen; raises :class:`SchemaMismatchError` where the rows do not fit."""
    return list(_merged_schema(table, incoming, key)[1])


# --------------------------------------------------------------------------------------------
# Schemas


def _nullable(data_type: DataType) -> DataType:
    """``data_type`` with every field, element and value nullable and no field metadata."""
    from pyspark.sql.types import ArrayType, MapType, StructField, StructType

    if isinstance(data_type, StructType):
        return StructType(
            [StructField(f.name, _nullable(f.dataType), True) for f in data_type.fields]
        )
    if isinstance(data_type, ArrayType):
        return ArrayType(_nullable(data_type.elementType), True)
    if isinstance(data_type, MapType):
        return MapType(_nullable(data_type.keyType), _nullable(data_type.valueType), True)
    return data_type


def _merged_schema(
    table: StructType | None, incoming: StructType, key: str
) -> tuple[StructType, list[str]]:
    """The table schema after writing ``incoming``, and the names of the columns whose type
    it adds or widens (the write changes the table's schema when there are any).

    Columns are matched by exact name. A new column is appended, nullable. A column whose
    struct type (at any depth: a struct, an array's element, a map's value) gains fields is
    widened: the table's fields keep their order and the new ones follow, nullable (older
    rows read them as null; :func:`_widen` converts a column). Struct fields are matched by
    name: the same fields in another order are the table's type. A column whose type differs
    otherwise (nullability aside, a field that differs only in case, a struct field the
    DataFrame lacks), a column that differs only in case, or a table column missing from
    ``incoming`` is a :class:`SchemaMismatchError`.
    """
    from pyspark.sql.types import StructField, StructType

    lowered = [name.lower() for name in incoming.names]
    if len(set(lowered)) != len(lowered):
        raise SchemaMismatchError(
            "the DataFrame to merge has column names that differ only in case"
        )
    new_incoming = _nullable(incoming)
    assert isinstance(new_incoming, StructType)
    if table is None:
        return new_incoming, []
    if key not in table.names:
        raise SchemaMismatchError(f"the existing table has no key column {key!r}")
    by_lower = {f.name.lower(): f for f in table.fields}
    problems: list[str] = []
    added = []
    widened: dict[str, DataType] = {}
    for field in new_incoming.fields:
        existing = by_lower.get(field.name.lower())
        if existing is None:
            added.append(field)
        elif existing.name != field.name:
            problems.append(f"column {field.name!r} is {existing.name!r} in the table")
        elif _nullable(existing.dataType) != field.dataType:
            wider = _widened_type(_nullable(existing.dataType), field.dataType)
            if wider is None:
                problems.append(
                    f"column {field.name!r} is {existing.dataType.simpleString()} in the table "
                    f"but {field.dataType.simpleString()} in the DataFrame"
                )
            elif wider != _nullable(existing.dataType):  # not only its fields in another order
                widened[field.name] = wider
    missing = [name for name in table.names if name not in incoming.names]
    if missing:
        problems.append(
            "the DataFrame lacks table column(s) " + ", ".join(repr(m) for m in missing)
        )
    if problems:
        raise SchemaMismatchError(
            "cannot merge into the existing Delta table: " + "; ".join(problems)
            + " (type changes and dropped columns need a new table or an explicit migration)"
        )
    fields = [StructField(f.name, widened[f.name], True) if f.name in widened else f
              for f in table.fields]
    return StructType(fields + added), [*widened, *[f.name for f in added]]


def _widened_type(old: DataType, new: DataType) -> DataType | None:
    """``old`` with the struct fields ``new`` adds (both nullable, as :func:`_nullable` gives
    them), or None when ``new`` is not ``old`` plus fields."""
    from pyspark.sql.types import ArrayType, MapType, StructField, StructType

    if old == new:
        return old
    if isinstance(old, StructType) and isinstance(new, StructType):
        by_name = {f.name: f for f in new.fields}
        if {n.lower() for n in old.names} & {n.lower() for n in new.names
                                             if n not in old.names}:
            return None  # a field that differs only in case
        fields = []
        for f in old.fields:
            if f.name not in by_name:
                return None
            wider = _widened_type(f.dataType, by_name[f.name].dataType)
            if wider is None:
                return None
            fields.append(StructField(f.name, wider, True))
        return StructType(fields + [f for f in new.fields if f.name not in old.names])
    if isinstance(old, ArrayType) and isinstance(new, ArrayType):
        element = _widened_type(old.elementType, new.elementType)
        return None if element is None else ArrayType(element, True)
    if isinstance(old, MapType) and isinstance(new, MapType) and old.keyType == new.keyType:
        value = _widened_type(old.valueType, new.valueType)
        return None if value is None else MapType(old.keyType, value, True)
    return None


def _widen(column: Column, source: DataType, target: DataType) -> Column:
    """``column`` (of type ``source``) as ``target``, a type :func:`_widened_type` gave for
    it: struct fields taken by name, in ``target``'s order, the fields ``source`` lacks null."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, MapType, StructType

    if _nullable(source) == _nullable(target):
        return column
    if isinstance(source, StructType) and isinstance(target, StructType):
        have = {f.name: f.dataType for f in source.fields}
        fields = [
            (_widen(column[f.name], have[f.name], f.dataType) if f.name in have
             else F.lit(None).cast(f.dataType)).alias(f.name)
            for f in target.fields
        ]
        return F.when(column.isNull(), F.lit(None).cast(target)).otherwise(F.struct(*fields))
    if isinstance(source, ArrayType) and isinstance(target, ArrayType):
        return F.transform(column, lambda e: _widen(e, source.elementType, target.elementType))
    if isinstance(source, MapType) and isinstance(target, MapType):
        return F.transform_values(
            column, lambda _k, v: _widen(v, source.valueType, target.valueType))
    return column.cast(target)


def _conform(df: DataFrame, schema: StructType) -> DataFrame:
    """``df``'s columns in ``schema``'s order (every column of ``schema`` is in ``df``), each
    of a type :func:`_merged_schema` widened taken to ``schema``'s type (:func:`_widen`)."""
    from pyspark.sql import functions as F

    have = {f.name: f.dataType for f in df.schema.fields}
    return df.select(*[
        F.col(_quoted(f.name)) if _nullable(have[f.name]) == _nullable(f.dataType)
        else _widen(F.col(_quoted(f.name)), have[f.name], f.dataType).alias(f.name)
        for f in schema.fields
    ])


def _quoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _spark_schema(table: DeltaTable) -> StructType:
    """The Spark schema of a deltalake table (Delta's schema JSON is Spark's StructType JSON)."""
    from pyspark.sql.types import StructType

    return StructType.fromJson(json.loads(table.schema().to_json()))


def _delta_schema(schema: StructType) -> Any:
    """A ``deltalake.Schema`` from a Spark schema, without field metadata."""
    from deltalake import Schema

    return Schema.from_json(_nullable_metadata_free(schema).json())


def _nullable_metadata_free(schema: StructType) -> StructType:
    """``schema`` with field metadata dropped (nullability kept)."""
    from pyspark.sql.types import ArrayType, MapType, StructField, StructType

    def strip(data_type: DataType) -> DataType:
        if isinstance(data_type, StructType):
            return StructType(
                [StructField(f.name, strip(f.dataType), f.nullable) for f in data_type.fields]
            )
        if isinstance(data_type, ArrayType):
            return ArrayType(strip(data_type.elementType), data_type.containsNull)
        if isinstance(data_type, MapType):
            return MapType(
                strip(data_type.keyType), strip(data_type.valueType), data_type.valueContainsNull
            )
        return data_type

    result = strip(schema)
    assert isinstance(result, StructType)
    return result


# --------------------------------------------------------------------------------------------
# Key check


def _check_keys(df: DataFrame, key: str, count_by: str | None = None,
                ) -> tuple[int, dict[str, int]]:
    """Row count of ``df`` and its rows per value of ``count_by`` (empty without it); raises
    :class:`DuplicateKeyError` on null or repeated keys.

    One Spark job: a count per key, then totals over those counts (per ``count_by`` value).
    """
    from pyspark.sql import functions as F

    group = F.first(F.col(_quoted(count_by))) if count_by else F.lit(None).cast("string")
    per_key = df.groupBy(F.col(_quoted(key)).alias("k")).agg(
        F.count(F.lit(1)).alias("n"), group.alias("g"))
    groups = per_key.groupBy("g").agg(
        F.coalesce(F.sum("n"), F.lit(0)).alias("rows"),
        F.coalesce(F.sum(F.when(F.col("k").isNull(), F.col("n"))), F.lit(0)).alias("null_rows"),
        F.coalesce(
            F.sum(F.when(F.col("k").isNotNull() & (F.col("n") > 1), F.lit(1))), F.lit(0)
        ).alias("dup_keys"),
        F.coalesce(F.max(F.when(F.col("k").isNotNull(), F.col("n"))), F.lit(0)).alias("max_n"),
    ).collect()
    _raise_on_bad_keys(
        key,
        null_rows=sum(int(r["null_rows"]) for r in groups),
        dup_keys=sum(int(r["dup_keys"]) for r in groups),
        max_n=max((int(r["max_n"]) for r in groups), default=0),
    )
    counts = {str(r["g"]): int(r["rows"]) for r in groups} if count_by else {}
    return sum(int(r["rows"]) for r in groups), counts


def _raise_on_bad_keys(key: str, null_rows: int, dup_keys: int, max_n: int) -> None:
    if null_rows:
        raise DuplicateKeyError(
            f"{null_rows} row(s) of the DataFrame to merge have a null {key!r}; "
            "every row needs a key"
        )
    if dup_keys:
        raise DuplicateKeyError(
            f"the DataFrame to merge has {dup_keys} {key!r} value(s) on more than one "
            f"row (up to {max_n} rows for one key); MERGE needs one row per key, "
            "de-duplicate it first"
        )


def _file_count(rows: int, slots: int | None, rows_per_file: int) -> int:
    """Files for a write of ``rows`` rows on ``slots`` task slots (None: unknown): one per
    ``rows_per_file`` rows, and more, up to one per slot, while each keeps at least a tenth of
    ``rows_per_file`` (one file of 100k rows is written by one core while the others idle)."""
    files = -(-rows // rows_per_file)
    if slots is not None:
        files = max(files, min(slots, rows // max(1, rows_per_file // 10)))
    return max(1, files)


def _stage(spark: SparkSession, df: DataFrame, loc: _Location, folder: str,
           spark_folder: str) -> list[str]:
    """Spark writes ``df`` as Parquet into the staging ``folder`` (a path for ``loc.fs``;
    ``spark_folder``: the same for Spark); the files written."""
    with _parquet_write_conf(spark):
        df.write.mode("errorifexists").parquet(spark_folder)
    return _list_parquet(loc, folder)


# --------------------------------------------------------------------------------------------
# delta-spark writer


def _merge_delta_spark(
    spark: SparkSession,
    df: DataFrame,
    ref: TableRef,
    key: str,
    replace_keys_df: DataFrame | None,
    count_by: str | None = None,
) -> WriteResult:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    exists = _delta_spark_exists(spark, ref)
    table_schema = _delta_spark_open(spark, ref).toDF().schema if exists else None
    merged, changed = _merged_schema(table_schema, df.schema, key)
    source = df.select(*[F.col(_quoted(name)) for name in df.columns])
    # df is read by the key check and again by the MERGE: keep it rather than recompute it.
    source = source.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        rows, counts = _check_keys(source, key, count_by)
        with _parquet_write_conf(spark):
            if not exists:
                _save(_conform(source, merged).write.format("delta").mode("errorifexists"),
                      ref)
            else:
                _delta_spark_merge(spark, source, ref, key, merged, changed, replace_keys_df)
        last = (
            _delta_spark_open(spark, ref).history(1)
            .select("version", "operation", "operationMetrics").first()
        )
        assert last is not None
        replaced = 0
        if exists:
            # The commit's own metrics (execute() returns no metrics in every Delta release).
            metrics = last["operationMetrics"] or {}
            replaced = int(metrics.get("numTargetRowsUpdated") or 0) + int(
                metrics.get("numTargetRowsDeleted") or 0
            )
        return WriteResult(WRITER_DELTA_SPARK, int(last["version"]), rows, replaced, counts)
    finally:
        source.unpersist()


def _delta_spark_exists(spark: SparkSession, ref: TableRef) -> bool:
    """Whether ``ref`` is a Delta table (a catalog table of another format is an error)."""
    from delta.tables import DeltaTable as SparkDeltaTable

    if not ref.by_name:
        return bool(SparkDeltaTable.isDeltaTable(spark, ref.path))
    if not spark.catalog.tableExists(ref.name):
        return False
    try:
        SparkDeltaTable.forName(spark, ref.name)
    except Exception as exc:  # noqa: BLE001 - AnalysisException: not a Delta table
        raise DeltaWriteError(f"catalog table {ref.name} exists and is not a Delta table "
                              f"({type(exc).__name__})") from None
    return True


def _delta_spark_open(spark: SparkSession, ref: TableRef) -> Any:
    """delta-spark's ``DeltaTable`` for ``ref`` (by name or by path)."""
    from delta.tables import DeltaTable as SparkDeltaTable

    if ref.by_name:
        return SparkDeltaTable.forName(spark, ref.name)
    return SparkDeltaTable.forPath(spark, ref.path)


def _delta_spark_version(spark: SparkSession, ref: TableRef) -> int:
    """The latest committed version of the Delta table ``ref`` (from its history)."""
    return int(_delta_spark_open(spark, ref).history(1).select("version").first()[0])


def _save(writer: Any, ref: TableRef) -> None:
    """Run a ``DataFrameWriter`` into ``ref``: ``saveAsTable`` by name, ``save`` by path."""
    if ref.by_name:
        writer.saveAsTable(ref.name)
    else:
        writer.save(ref.path)


def _delta_spark_merge(
    spark: SparkSession,
    source: DataFrame,
    ref: TableRef,
    key: str,
    merged: StructType,
    changed: Sequence[str],
    replace_keys_df: DataFrame | None,
) -> None:
    """Run the MERGE into an existing table (one commit, plus one when columns are added or
    widened together with ``replace_keys_df``)."""
    from pyspark.sql import functions as F

    condition = f"t.{_quoted(key)} = s.{_quoted(key)}"
    if replace_keys_df is None:
        builder = (
            _delta_spark_open(spark, ref).alias("t")
            .merge(source.alias("s"), condition)
            .whenMatchedUpdateAll()
            .whenNotMatchedInsertAll()
        )
        if changed:
            builder = builder.withSchemaEvolution()
    else:
        if changed:
            # Add the new columns first (a metadata-only commit): the MERGE below assigns
            # columns explicitly, and explicit assignments do not evolve a schema everywhere.
            _save(spark.createDataFrame([], merged).write.format("delta").mode("append")
                  .option("mergeSchema", "true"), ref)
        key_type = source.schema[key].dataType
        extra_keys = (
            replace_keys_df.select(F.col(_quoted(key)).cast(key_type).alias(key))
            .where(F.col(_quoted(key)).isNotNull())
            .distinct()
            .join(source.select(key), on=key, how="left_anti")
        )
        marked = source.withColumn(_DELETE_MARKER, F.lit(False)).unionByName(
            extra_keys.withColumn(_DELETE_MARKER, F.lit(True)), allowMissingColumns=True
        )
        assignments = {_quoted(c): f"s.{_quoted(c)}" for c in source.columns}
        builder = (
            _delta_spark_open(spark, ref).alias("t")
            .merge(marked.alias("s"), condition)
            .whenMatchedDelete(condition=f"s.{_quoted(_DELETE_MARKER)}")
            .whenMatchedUpdate(set=assignments)
            .whenNotMatchedInsert(condition=f"NOT s.{_quoted(_DELETE_MARKER)}", values=assignments)
        )
    builder.execute()


# --------------------------------------------------------------------------------------------
# deltalake writer


@dataclass(frozen=True)
class _Location:
    """A table root as deltalake (``uri``), Spark (``spark_uri``) and pyarrow (``fs``) see it."""

    uri: str
    spark_uri: str
    fs: pafs.FileSystem
    fs_path: str

    def child(self, *parts: str) -> str:
        """A path under the root, for ``fs``."""
        return "/".join([self.fs_path.rstrip("/"), *parts])

    def spark_child(self, *parts: str) -> str:
        """A path under the root, for Spark."""
        return "/".join([self.spark_uri.rstrip("/"), *parts])


def _locate(path: str) -> _Location:
    """Resolve ``path``: plain paths and ``file:`` URIs are local, others go to pyarrow as is."""
    import pyarrow.fs as pafs

    parsed = urlparse(path)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # len 1: a Windows drive
        local = os.path.abspath(parsed.path if parsed.scheme == "file" else path)
        return _Location(local, "file://" + local, pafs.LocalFileSystem(), local)
    uri = path.rstrip("/")
    fs, fs_path = pafs.FileSystem.from_uri(uri)
    return _Location(uri, uri, fs, fs_path)


def _spark_uri(file_uri: str) -> str:
    """A data file URI from deltalake (local files come as plain absolute paths) for Spark."""
    return "file://" + file_uri if file_uri.startswith("/") else file_uri


def _open_table(loc: _Location) -> DeltaTable | None:
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(loc.uri):
        return None
    return DeltaTable(loc.uri)


def _check_readable(table: DeltaTable, loc: _Location) -> None:
    """Refuse table layouts that listing the snapshot's Parquet files would read wrongly."""
    protocol = table.protocol()
    unsupported = sorted(set(protocol.reader_features or ()) - _SUPPORTED_READER_FEATURES)
    mapping = (table.metadata().configuration or {}).get("delta.columnMapping.mode") or "none"
    problems = []
    if unsupported:
        problems.append("reader feature(s) " + ", ".join(unsupported))
    if mapping != "none":
        problems.append(f"column mapping mode {mapping!r}")
    if table.metadata().partition_columns:
        problems.append("partition columns")
    if problems:
        raise DeltaWriteError(
            f"the Delta table at {loc.uri} uses {'; '.join(problems)}, which the 'deltalake' "
            "writer/reader does not support; use a Spark session with delta-spark"
        )


class _FileIndex:
    """Maps any spelling of a data file's path (URI scheme, percent-encoding) to its action."""

    def __init__(self, relative_paths: Sequence[str]) -> None:
        self._by_relative = {unquote(p).lstrip("/"): p for p in relative_paths}

    def lookup(self, any_path: str) -> str:
        parts = unquote(any_path).split("/")
        for start in range(len(parts)):  # longest suffix first
            candidate = "/".join(parts[start:])
            if candidate in self._by_relative:
                return self._by_relative[candidate]
        raise DeltaWriteError(
            f"data file {any_path} is not in the table snapshot; is another process writing "
            "this table?"
        )


@contextmanager
def _parquet_write_conf(spark: SparkSession) -> Iterator[None]:
    """Run Parquet writes with :data:`_PARQUET_WRITE_CONF`, restoring the session after."""
    saved: dict[str, str | None] = {}
    for name, value in _PARQUET_WRITE_CONF.items():
        saved[name] = spark.conf.get(name, None)
        spark.conf.set(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                spark.conf.unset(name)
            else:
                spark.conf.set(name, value)


def _list_parquet(loc: _Location, folder: str) -> list[str]:
    """The Parquet files Spark wrote directly in ``folder`` (a path for ``loc.fs``)."""
    import pyarrow.fs as pafs

    infos = loc.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    names = [
        info.path for info in infos
        if info.type == pafs.FileType.File
        and info.base_name.endswith(".parquet")
        and not info.base_name.startswith(("_", "."))
    ]
    return sorted(names)


def _stats_json(metadata: pq.FileMetaData, schema: StructType) -> str:
    """Delta ``stats`` for one Parquet file from its footer.

    ``numRecords`` always; ``nullCount`` for top-level primitive columns and
    ``minValues``/``maxValues`` for top-level integer, string and date columns, each only when
    every row group carries that statistic. (Timestamps and floats are left out: their Parquet
    statistics do not map exactly onto what Delta readers assume.)
    """
    from pyspark.sql.types import (
        ArrayType,
        ByteType,
        DateType,
        IntegerType,
        LongType,
        MapType,
        ShortType,
        StringType,
        StructType,
    )

    stats: dict[str, Any] = {"numRecords": int(metadata.num_rows)}
    if metadata.num_row_groups == 0:
        return json.dumps(stats)
    top_level = {f.name: f.dataType for f in schema.fields}
    min_max_types = (ByteType, ShortType, IntegerType, LongType, StringType, DateType)
    null_counts: dict[str, int] = {}
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    for column in range(metadata.num_columns):
        name = metadata.schema.column(column).path
        data_type = top_level.get(name)
        if data_type is None or isinstance(data_type, (StructType, ArrayType, MapType)):
            continue
        chunks = [
            metadata.row_group(group).column(column).statistics
            for group in range(metadata.num_row_groups)
        ]
        if all(s is not None and s.has_null_count for s in chunks):
            null_counts[name] = int(sum(s.null_count for s in chunks))
        if isinstance(data_type, min_max_types) and all(
            s is not None and s.has_min_max for s in chunks
        ):
            low = min(s.min for s in chunks)
            high = max(s.max for s in chunks)
            if isinstance(low, bytes) or isinstance(high, bytes):
                continue  # not decodable as text: leave it out rather than guess
            mins[name] = low.isoformat() if isinstance(low, date) else low
            maxs[name] = high.isoformat() if isinstance(high, date) else high
    if null_counts:
        stats["nullCount"] = null_counts
    if mins:
        stats["minValues"] = mins
        stats["maxValues"] = maxs
    return json.dumps(stats)


def _publish(
    loc: _Location, staged: Sequence[str], write_id: str, schema: StructType, moved: list[str]
) -> list[Any]:
    """Move staged files into the table root under unique names; their ``AddAction``s.

    Files without rows are deleted instead. Every moved path is appended to ``moved`` as soon as
    it exists, so a failure later can delete them.
    """
    import pyarrow.parquet as pq
    from deltalake.transaction import AddAction

    actions = []
    for number, source in enumerate(staged):
        metadata = pq.read_metadata(source, filesystem=loc.fs)
        if metadata.num_rows == 0:
            loc.fs.delete_file(source)
            continue
        base = source.rsplit("/", 1)[-1]
        extension = base.split(".", 1)[1] if "." in base else "parquet"
        name = f"part-{number:05d}-{write_id}.{extension}"
        target = loc.child(name)
        loc.fs.move(source, target)
        moved.append(target)
        info = loc.fs.get_file_info(target)
        assert info.mtime is not None and info.size is not None
        actions.append(
            AddAction(
                path=name,
                size=int(info.size),
                partition_values={},
                modification_time=int(info.mtime.timestamp() * 1000),
                data_change=True,
                stats=_stats_json(metadata, schema),
            )
        )
    return actions


def _commit(
    loc: _Location,
    table: DeltaTable | None,
    schema: StructType,
    adds: Sequence[Any],
    removes: Sequence[Any],
    mode: str,
    custom_metadata: dict[str, Any],
) -> None:
    """The single commit of a write (tests replace this to simulate a crash before it)."""
    from deltalake.transaction import CommitProperties, create_table_with_add_actions

    # delta-rs would commit an append again on a newer version by itself, without knowing
    # whether the newer commits wrote this write's keys: _commit_merge_retrying decides
    properties = CommitProperties(custom_metadata=custom_metadata, max_commit_retries=0)
    if table is None:
        create_table_with_add_actions(
            loc.uri, _delta_schema(schema), list(adds), mode="error", commit_properties=properties
        )
        return
    table.create_write_transaction(
        list(adds) + list(removes), mode=mode, schema=_delta_schema(schema),
        commit_properties=properties,
    )


def _find_commit(loc: _Location, write_id: str) -> int | None:
    """The version whose commit carries ``write_id`` (recent history only); None if none."""
    table = _open_table(loc)
    if table is None:
        return None
    for entry in table.history(20):
        if entry.get("clinlinker.write_id") == write_id:
            return int(entry["version"])
    return None


def _committed_version(loc: _Location, write_id: str) -> int:
    """The version this write committed."""
    version = _find_commit(loc, write_id)
    if version is None:  # pragma: no cover - more than 20 commits since ours
        raise DeltaWriteError(f"commit of write {write_id} not found in {loc.uri}'s history")
    return version


def _commit_landed(loc: _Location, write_id: str) -> bool:
    """Whether this write's commit is in the log; True when that cannot be told."""
    try:
        return _find_commit(loc, write_id) is not None
    except Exception:  # noqa: BLE001 - keep the files: unreferenced files are harmless
        return True


def _delete_quietly(loc: _Location, paths: Sequence[str]) -> None:
    for file_path in paths:
        try:
            loc.fs.delete_file(file_path)
        except Exception:  # noqa: BLE001 - unreferenced files are invisible; VACUUM removes them
            log.warning("could not delete uncommitted file %s", file_path)


def _cleanup_staging(loc: _Location, staging: str) -> None:
    try:
        loc.fs.delete_dir(staging)
    except FileNotFoundError:
        pass
    except Exception:  # noqa: BLE001
        log.warning("could not delete staging folder %s", staging)


_OWNER_FILE = "_owner.json"


def _claim_staging(loc: _Location, staging: str) -> None:
    """Write the staging folder's owner (host, process id, start time), which tells a later
    run's :func:`sweep_staging` whether the write is still alive."""
    import socket

    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    loc.fs.create_dir(staging, recursive=True)
    with loc.fs.open_output_stream(f"{staging}/{_OWNER_FILE}") as out:
        out.write(json.dumps(owner).encode())


def _owner_gone(loc: _Location, folder: str, max_age_s: float) -> bool:
    """Whether the staging ``folder`` belongs to no live write: its process ended on this host,
    or it started more than ``max_age_s`` seconds ago (by its owner file, else its folder's
    modification time)."""
    import socket

    try:
        with loc.fs.open_input_stream(f"{folder}/{_OWNER_FILE}") as src:
            owner = json.loads(src.read())
        started = float(owner["started"])
        if owner.get("host") == socket.gethostname() and not _process_alive(int(owner["pid"])):
            return True
    except Exception:  # noqa: BLE001 - no or broken owner file: judged by age alone
        mtime = loc.fs.get_file_info(folder).mtime
        started = mtime.timestamp() if mtime is not None else time.time()
    return time.time() - started > max_age_s


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_staging(path: str, max_age_s: float) -> list[str]:
    """Remove the staging folders of the deltalake table at ``path`` that no live write owns
    (a run killed while staging leaves its folder; Delta's VACUUM skips folders whose name
    starts with ``_``); the folders removed."""
    import pyarrow.fs as pafs

    loc = _locate(path)
    root = loc.child(STAGING_DIR)
    try:
        entries = loc.fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except Exception:  # noqa: BLE001 - an unlistable root: nothing of ours to sweep
        return []
    removed = []
    for entry in entries:
        if entry.type == pafs.FileType.Directory and _owner_gone(loc, entry.path, max_age_s):
            _cleanup_staging(loc, entry.path)
            removed.append(entry.path)
    if removed:
        log.info("removed %d staging folder(s) that no live write owns under %s",
                 len(removed), root)
    return removed


def _merge_deltalake(
    spark: SparkSession,
    df: DataFrame,
    path: str,
    key: str,
    replace_keys_df: DataFrame | None,
    count_by: str | None,
    new_keys_at: int | None,
    broadcast_rows: int,
    staging_max_age_s: float,
    commit_retries: int,
) -> WriteResult:
    """The deltalake MERGE: Spark stages ``df``'s Parquet files (and the rewritten survivors
    of the table files that hold a replaced key) under the table's staging folder; the
    driver checks the keys, moves the files into the table and commits the log once. The
    staging folders of dead writes are swept first (:func:`sweep_staging`); this write's is
    removed when it ends, whatever the outcome."""
    sweep_staging(path, staging_max_age_s)
    loc = _locate(path)
    table = _open_table(loc)
    table_schema = None
    if table is not None:
        _check_readable(table, loc)
        table_schema = _spark_schema(table)
    merged, changed = _merged_schema(table_schema, df.schema, key)
    write_id = uuid.uuid4().hex
    staging = loc.child(STAGING_DIR, write_id)
    spark_staging = loc.spark_child(STAGING_DIR, write_id)
    moved: list[str] = []
    try:
        _claim_staging(loc, staging)
        staged_new = _stage(spark, _conform(df, merged), loc, staging + "/new",
                            spark_staging + "/new")
        written = _read_files(spark, loc, staged_new, merged)
        rows, counts = _check_keys(written, key, count_by)
        metadata: dict[str, Any] = {
            "clinlinker.writer": WRITER_DELTALAKE,
            "clinlinker.write_id": write_id,
            "clinlinker.key": key,
            "clinlinker.rows_written": rows,
        }
        if table is None:
            _create_deltalake(loc, _publish(loc, staged_new, write_id, merged, moved), merged,
                              metadata)
            return WriteResult(WRITER_DELTALAKE, _committed_version(loc, write_id), rows, 0,
                               counts)
        assert table_schema is not None
        keys = _keys_to_replace(written, merged, key, replace_keys_df, rows, broadcast_rows)
        known_new = (new_keys_at is not None and replace_keys_df is None
                     and table.version() == new_keys_at)
        actions = _add_actions(table)
        hits, uri_of = _files_with_keys(spark, table, table_schema, actions, keys, key,
                                        search=bool(actions) and not known_new)
        full_rewrite = bool(changed) or _RemoveAction is None
        rewrite = [a["path"] for a in actions] if full_rewrite else sorted(hits)
        staged_rewrite = _stage_survivors(spark, loc, [uri_of[p] for p in rewrite],
                                          table_schema, merged, keys, key,
                                          staging + "/rewrite", spark_staging + "/rewrite")
        adds = _publish(loc, staged_new + staged_rewrite, write_id, merged, moved)
        replaced = sum(hits.values())
        _commit_merge_retrying(spark, loc, table, merged, adds, rewrite, actions, full_rewrite, {
            **metadata, "clinlinker.rows_replaced": replaced,
            **_merge_metrics(key, rows, replaced, replace_keys_df is None, len(adds), rewrite),
        }, lambda: _keys_to_replace(_read_files(spark, loc, moved, merged), merged, key,
                                    replace_keys_df, rows, broadcast_rows), key, commit_retries)
        log.debug(
            "deltalake MERGE %s: %d files added, %d removed (full rewrite: %s, keys known new "
            "at version %s: %s)", loc.uri, len(adds), len(rewrite), full_rewrite, new_keys_at,
            known_new,
        )
        return WriteResult(WRITER_DELTALAKE, _committed_version(loc, write_id), rows, replaced,
                           counts)
    except BaseException:
        # Published files are deleted only when the log surely does not reference them (a
        # commit can land and still raise, e.g. in a post-commit hook).
        if moved and not _commit_landed(loc, write_id):
            _delete_quietly(loc, moved)
        raise
    finally:
        _cleanup_staging(loc, staging)


def _create_deltalake(loc: _Location, adds: list[Any], merged: StructType,
                      metadata: dict[str, Any]) -> None:
    """Commit version 0 of a new table from the published ``adds``; when another write
    created the table first, :class:`ConcurrentWriteError` (this write committed nothing)."""
    try:
        _commit(loc, None, merged, adds, [], "error",
                {**metadata, "clinlinker.operation": "CREATE"})
    except Exception as exc:
        if _open_table(loc) is None:
            raise
        raise ConcurrentWriteError(
            f"Delta table {loc.uri}: another write created the table first; this run "
            "committed nothing, and a rerun is safe") from exc


def _keys_to_replace(written: DataFrame, merged: StructType, key: str,
                     replace_keys_df: DataFrame | None, rows: int,
                     broadcast_rows: int) -> DataFrame:
    """The keys whose old rows the MERGE removes: the written rows' and ``replace_keys_df``'s
    (non-null, distinct), broadcast to the scans of the table files when the written rows
    alone are the keys and number at most ``broadcast_rows`` (``spark.broadcast_rows``: a
    nightly batch into a large table is not shuffled with it)."""
    from pyspark.sql import functions as F

    keys = written.select(key)
    if replace_keys_df is None:
        return F.broadcast(keys) if rows <= broadcast_rows else keys
    key_type = merged[key].dataType
    return keys.unionByName(
        replace_keys_df.select(F.col(_quoted(key)).cast(key_type).alias(key))
        .where(F.col(_quoted(key)).isNotNull())
    ).distinct()


def _files_with_keys(spark: SparkSession, table: DeltaTable, table_schema: StructType,
                     actions: list[dict[str, Any]], keys: DataFrame, key: str,
                     search: bool) -> tuple[dict[str, int], dict[str, str]]:
    """({table file: rows in it whose key is in ``keys``}, {table file: the URI Spark reads});
    no file is searched unless ``search`` (the keys are known to be new)."""
    from pyspark.sql import functions as F

    index = _FileIndex([a["path"] for a in actions])
    uri_of = {index.lookup(uri): _spark_uri(uri) for uri in table.file_uris()}
    hits: dict[str, int] = {}
    if not search:
        return hits, uri_of
    old = spark.read.schema(table_schema).parquet(*uri_of.values())
    located = old.select(F.col(_quoted(key)), F.col("_metadata.file_path").alias(_FILE_COLUMN))
    for row in (located.join(keys, on=key, how="left_semi")
                .groupBy(_FILE_COLUMN).count().collect()):
        relative = index.lookup(row[_FILE_COLUMN])
        hits[relative] = hits.get(relative, 0) + int(row["count"])
    return hits, uri_of


def _stage_survivors(spark: SparkSession, loc: _Location, uris: list[str],
                     table_schema: StructType, merged: StructType, keys: DataFrame, key: str,
                     staging: str, spark_staging: str) -> list[str]:
    """Stage the rows of the table files ``uris`` whose key is not in ``keys``, in the merged
    schema (widened types, new columns null); the staged files ([] for no files)."""
    from pyspark.sql import functions as F

    if not uris:
        return []
    survivors = spark.read.schema(table_schema).parquet(*uris).join(keys, on=key,
                                                                      how="left_anti")
    widened = survivors.select(*[
        _widen(F.col(_quoted(f.name)), table_schema[f.name].dataType,
               f.dataType).alias(f.name) if f.name in table_schema.names
        else F.lit(None).cast(f.dataType).alias(f.name)
        for f in merged.fields
    ])
    return _stage(spark, widened, loc, staging, spark_staging)


def _commit_merge(loc: _Location, table: DeltaTable, merged: StructType, adds: list[Any],
                  rewrite: list[str], actions: list[dict[str, Any]], full_rewrite: bool,
                  metadata: dict[str, Any]) -> None:
    """Commit a MERGE: ``adds`` added and the ``rewrite`` files removed, in one version (an
    overwrite when every file is rewritten)."""
    removes = []
    if full_rewrite:
        mode = "overwrite"  # delta-rs removes every current file in the same commit
    else:
        mode = "append"
        now = int(time.time() * 1000)
        size_of = {a["path"]: a["size_bytes"] for a in actions}
        removes = [
            _RemoveAction(path=p, data_change=True, deletion_timestamp=now,
                          size=int(size_of[p]), partition_values={})
            for p in rewrite
        ]
    _commit(loc, table, merged, adds, removes, mode, {
        **metadata,
        "clinlinker.operation": "MERGE",
        "clinlinker.files_added": len(adds),
        "clinlinker.files_removed": len(rewrite),
        "clinlinker.full_rewrite": full_rewrite,
    })


def _merge_metrics(key: str, rows: int, replaced: int, upsert: bool, files_added: int,
                   rewrite: list[str]) -> dict[str, Any]:
    """The commit's ``operationParameters`` and ``operationMetrics`` under the names
    delta-spark gives a MERGE (delta-rs records the operation itself as WRITE and lets no
    writer change that). An upsert updates the rows it replaces and inserts the rest; with
    ``replace_keys_df`` the replaced rows are deleted and every written row inserted."""
    updated = replaced if upsert else 0
    return {
        "operationParameters": {"predicate": f'["(target.{key} = source.{key})"]'},
        "operationMetrics": {k: str(v) for k, v in {
            "numSourceRows": rows,
            "numTargetRowsInserted": rows - updated,
            "numTargetRowsUpdated": updated,
            "numTargetRowsDeleted": replaced - updated,
            "numTargetFilesAdded": files_added,
            "numTargetFilesRemoved": len(rewrite),
        }.items()},
    }


def _commit_merge_retrying(spark: SparkSession, loc: _Location, table: DeltaTable,
                           merged: StructType, adds: list[Any], rewrite: list[str],
                           actions: list[dict[str, Any]], full_rewrite: bool,
                           metadata: dict[str, Any], keys: Callable[[], DataFrame], key: str,
                           retries: int) -> None:
    """:func:`_commit_merge`, committed again on the newer version (up to ``retries`` times)
    when another write committed first without touching this write's work: it removed none
    of the files this write rewrites, wrote no row with a key this write writes or replaces,
    and changed no schema. Otherwise :class:`ConcurrentWriteError`, in one line. ``keys``
    gives the keys this write writes or replaces, read from its published files (the staged
    ones are gone by then)."""
    from deltalake.exceptions import CommitFailedError

    for attempt in range(retries + 1):
        try:
            _commit_merge(loc, table, merged, adds, rewrite, actions, full_rewrite, metadata)
            return
        except CommitFailedError:
            latest = _open_table(loc)
            if latest is None or latest.version() == table.version():
                raise  # no newer commit: not a conflict
            # the commits up to table.version() were cleared by the attempt before
            why = ("this write rewrites every file" if full_rewrite else
                   _conflict(spark, loc, table.version(), latest.version(), rewrite, keys(),
                             key))
            if why or attempt == retries:
                raise ConcurrentWriteError(
                    f"Delta table {loc.uri}: another write committed version "
                    f"{latest.version()} first ({why or f'{retries} retries spent'}); this run "
                    "committed nothing, and a rerun is safe") from None
            log.info("Delta table %s: another write committed version %d first, touching "
                     "nothing of this write: committing again", loc.uri, latest.version())
            table = latest


def _read_files(spark: SparkSession, loc: _Location, paths: list[str],
                schema: StructType) -> DataFrame:
    """The Parquet files ``paths`` (under the table root, as ``loc.fs`` lists them)."""
    if not paths:
        return spark.createDataFrame([], schema)
    return spark.read.schema(schema).parquet(*[_spark_uri_for(loc, p) for p in paths])


def _conflict(spark: SparkSession, loc: _Location, read_version: int, latest: int,
              rewrite: list[str], keys: DataFrame, key: str) -> str | None:
    """Why the commits after ``read_version`` up to ``latest`` conflict with a write that
    rewrites the files ``rewrite`` and writes or replaces ``keys``; None when they do not."""
    rewritten = set(rewrite)
    added: list[str] = []
    for version in range(read_version + 1, latest + 1):
        with loc.fs.open_input_stream(loc.child("_delta_log", f"{version:020d}.json")) as src:
            lines = src.read().decode().splitlines()
        for action in (json.loads(line) for line in lines if line.strip()):
            if "metaData" in action:
                return f"version {version} changed the table's schema or settings"
            if "remove" in action and unquote(action["remove"]["path"]) in rewritten:
                return f"version {version} removed a file this write rewrites"
            if "add" in action:
                added.append(unquote(action["add"]["path"]))
    if added:
        from pyspark.sql import functions as F

        uris = [loc.spark_child(p) for p in added]
        theirs = spark.read.parquet(*uris).select(F.col(_quoted(key)))
        if theirs.join(keys, on=key, how="left_semi").limit(1).count():
            return "it wrote rows with keys this write writes"
    return None


def _spark_uri_for(loc: _Location, fs_path: str) -> str:
    """A file under the table root, listed by pyarrow, as the URI Spark reads."""
    root = loc.fs_path.rstrip("/")
    if not fs_path.startswith(root + "/"):
        raise DeltaWriteError(f"{fs_path} is not under the table root {loc.uri}")
    return loc.spark_uri.rstrip("/") + fs_path[len(root):]


def _add_actions(table: DeltaTable) -> list[dict[str, Any]]:
    """The snapshot's add actions as dicts (``path``, ``size_bytes``, ...)."""
    import pyarrow as pa

    return pa.table(table.get_add_actions(flatten=True)).select(
        ["path", "size_bytes"]
    ).to_pylist()


# --------------------------------------------------------------------------------------------
# Session probes


def _classic_jvm(spark: SparkSession) -> Any:
    """The py4j JVM view of a classic session; None on Spark Connect."""
    try:
        from pyspark.sql.utils import is_remote

        if is_remote():
            return None
    except ImportError:  # pragma: no cover
        pass
    try:
        return spark.sparkContext._jvm
    except Exception:  # noqa: BLE001 - Spark Connect has no SparkContext
        return None


def _probe_delta_source(spark: SparkSession) -> bool:
    """Whether the session resolves the ``delta`` data source (asks about a missing path)."""
    probe = f"/nonexistent-clinlinker-delta-probe-{uuid.uuid4().hex}"
    try:
        spark.read.format("delta").load(probe).schema  # noqa: B018 - forces analysis
    except Exception as exc:  # noqa: BLE001
        message = str(exc)
        return "DATA_SOURCE_NOT_FOUND" not in message and "Failed to find" not in message
    return True
