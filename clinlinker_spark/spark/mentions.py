"""The link job's mention rules: read the input, map its columns, one row per mention_id,
skip what the output table already holds, validate and normalise the rest.

Row rules (every distinct mention_id gets exactly one output row):

- duplicate mention_id: all rows sharing an id become ONE row with status invalid_input and
  reason ``"duplicate mention_id (N rows)"``; the row kept for doc_id/span/text is the first
  by (doc_id, start, end, text), nulls first. Linking one of them would silently pick a winner.
- null or blank mention_id: the row cannot be a MERGE key, so it gets the synthetic id
  ``"null:" + sha256`` of its (doc_id, start, end, text) as JSON, status invalid_input and
  reason ``"null mention_id"``, or ``"empty mention_id"`` for an empty or whitespace-only one
  (identical such rows collapse into one, with ``(N rows)``).
  The id is deterministic, so a rerun replaces these rows instead of adding new ones.
- null, empty/whitespace-only or over-long text (``linking.max_text_length`` characters):
  status invalid_input with ``linker.invalid_reason``'s reason.
- incremental (``output.incremental``): a mention the table holds as final
  (``linker.FINAL_STATUSES``) with the same model, index, re-ranker and ranker versions and
  the same text is skipped (a table without the version columns holds none such); an invalid
  row the table holds with the same text, versions and reason is left alone too.

The counts of a run come from :func:`tally` rows, unioned into one Spark action
(:func:`collect_tallies`).
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from clinlinker_spark.config import GOLD_FORMATS, InputConfig
from clinlinker_spark.errors import ClinLinkerError, ConfigError, InputDataError, root_cause
from clinlinker_spark.linker import FINAL_STATUSES, STATUS_INVALID
from clinlinker_spark.spark import schemas
from clinlinker_spark.spark.schemas import CONTEXT_COLUMNS, TEXT_NORM_COLUMN

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)


GOLD_RENAMES = {"code": "gold_code", "codes": "gold_codes"}


def quoted_col(name: str, df: DataFrame | None = None) -> Column:
    """The column ``name`` taken literally (dots and backticks are part of it), of ``df``
    when given."""
    from pyspark.sql import functions as F

    quoted = "`" + name.replace("`", "``") + "`"
    return df[quoted] if df is not None else F.col(quoted)


def read_mentions(spark: SparkSession, cfg: InputConfig) -> DataFrame:
    """Read the input named by ``cfg`` (lazily for Parquet, Delta and catalog tables).

    Gold TSV formats (distemist | medprocner | codiesp; a file or a folder) are read by
    :func:`clinlinker_spark.corpora.read_gold` on the driver; their gold ``code``/``codes``
    columns are renamed ``gold_code``/``gold_codes`` so they can be passed through without
    clashing with the predicted code.
    """
    if cfg.table:
        if not spark.catalog.tableExists(cfg.table):
            raise InputDataError(f"input.table {cfg.table} does not exist in the session's "
                                 "catalog")
        return spark.read.table(cfg.table)
    if not cfg.path:
        raise ConfigError("no input: set input.path (a folder or file) or input.table "
                          "(catalog.schema.table) to the mentions to link")
    if cfg.format == "parquet":
        if not Path(cfg.path).exists() and "://" not in cfg.path:
            raise InputDataError(f"input not found: {cfg.path}")
        return spark.read.parquet(cfg.path)
    if cfg.format == "delta":
        from clinlinker_spark.spark.writer import read_delta

        df = read_delta(spark, cfg.path)
        if df is None:
            raise InputDataError(f"no Delta table at {cfg.path}")
        return df
    if cfg.format in GOLD_FORMATS:
        from clinlinker_spark.corpora import read_gold

        table = read_gold(cfg.path, cfg.format,
                          text_dir=cfg.text_dir or None).rename(columns=GOLD_RENAMES)
        log.info("read %d gold mentions (%s)", len(table), cfg.format)
        return spark.createDataFrame(table)
    raise ConfigError(f"input.format {cfg.format!r} is not supported")


# What Spark, delta-spark and delta-rs say when the input's files or log cannot be read
_UNREADABLE_MARKS = ("FAILED_READ_FILE", "CANNOT_READ_FILE_FOOTER", "is not a Parquet file",
                     "PATH_NOT_FOUND", "Permission denied", "AccessDenied",
                     "DELTA_", "_delta_log", "FileNotFoundException")
_FAILED_FILE = re.compile(r"Encountered error while reading file (\S+?)\.?(?:\s|$)")


def unreadable_reason(exc: BaseException) -> str | None:
    """One line saying which file could not be read and why, when ``exc`` (a Spark, Py4J or
    delta-rs error) is a failure to read input files or a Delta log; None for other errors.
    The line is :func:`~clinlinker_spark.errors.root_cause` (its message names the file, or
    the file is put in front), without the trace."""
    text = str(exc)
    from_deltalake = _is_deltalake_error(exc)
    if not from_deltalake and not any(mark in text for mark in _UNREADABLE_MARKS):
        return None
    reason = root_cause(exc)
    failed = _FAILED_FILE.search(text)
    if failed and failed.group(1) not in reason:
        reason = f"{failed.group(1)}: {reason}"
    return reason


def _is_deltalake_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a delta-rs error (deltalake 1.x defines its exceptions in a native
    module named ``_internal``; deltalake.exceptions re-exports them)."""
    from deltalake.exceptions import DeltaError

    return isinstance(exc, DeltaError) or type(exc).__module__.startswith("deltalake")


@contextmanager
def input_errors(cfg: InputConfig, files_under: bool = False) -> Iterator[None]:
    """Turn a failure to read the input (not Parquet, truncated, an unreadable Delta log,
    permission denied) into an :class:`InputDataError` of one line naming the file and the
    reason; the full trace is logged at DEBUG only. ``files_under``: convert only failures
    that name a file under ``input.path`` (around stages that also read the output table)."""
    try:
        yield
    except ClinLinkerError:
        raise
    except Exception as exc:
        reason = unreadable_reason(exc)
        if reason is None or (files_under and not (cfg.path and _under(reason, cfg.path))):
            raise
        log.debug("input %s could not be read", cfg.target, exc_info=True)
        raise InputDataError(f"input {cfg.target} cannot be read: {reason}") from None


def _under(reason: str, path: str) -> bool:
    """Whether ``reason`` names a file under ``path`` (a local path or a URI)."""
    root = path.split("://", 1)[-1].rstrip("/")
    return any(root in word for word in reason.split())


def select_mentions(df: DataFrame, cfg: InputConfig, store_text: bool = True) -> DataFrame:
    """Map input columns to the canonical mention columns plus the pass-through columns.

    Raises InputDataError naming every missing column and listing the columns present, before
    any row is read. A canonical column mapped to ``""`` (allowed for doc_id, start, end,
    label) is filled with nulls.
    """
    from pyspark.sql import functions as F

    mapping = {
        "mention_id": cfg.mention_id_column,
        "doc_id": cfg.doc_id_column,
        "start": cfg.start_column,
        "end": cfg.end_column,
        "text": cfg.text_column,
        "label": cfg.label_column,
    }
    for name in schemas.REQUIRED_MENTION_COLUMNS:
        if not mapping[name]:
            raise ConfigError(f"input.{name}_column must name a column (it is required)")
    present = list(df.columns)
    missing = [f"{src!r} (input.{name}_column)" for name, src in mapping.items()
               if src and src not in present]
    missing += [f"{c!r} (input.passthrough_columns)" for c in cfg.passthrough_columns
                if c not in present]
    context = context_mapping(cfg)
    missing += [f"{src!r} (input.{name}_column)" for name, src in context.items()
                if src not in present]
    if missing:
        raise InputDataError(
            f"input {cfg.target} is missing required column(s) {', '.join(missing)}; "
            f"its columns are {present}"
        )
    _check_types(df, mapping, cfg.target)
    clashes = [c for c in cfg.passthrough_columns if c in schemas.RESERVED_COLUMNS]
    if clashes:
        raise ConfigError(f"input.passthrough_columns {clashes} clash with output columns; "
                          "rename them in the input first")
    if not store_text and cfg.text_column in cfg.passthrough_columns:
        raise ConfigError("output.store_text is false but the text column is a pass-through "
                          "column; remove it from input.passthrough_columns")
    columns = []
    for name, dtype in schemas.MENTION_COLUMNS:
        src = mapping[name]
        if not src:
            columns.append(F.lit(None).cast(dtype).alias(name))
        elif name in ("start", "end"):
            columns.append(quoted_col(src).try_cast(dtype).alias(name))
        else:
            columns.append(quoted_col(src).cast(dtype).alias(name))
    columns += [quoted_col(c).alias(c) for c in cfg.passthrough_columns]
    if context:
        columns += [quoted_col(context["context"]).cast("string").alias(CONTEXT_COLUMNS[0]),
                    *[quoted_col(context[name]).try_cast("long").alias(col)
                      for name, col in zip(("context_start", "context_end"),
                                           CONTEXT_COLUMNS[1:])]]
    return df.select(*columns)


def context_mapping(cfg: InputConfig) -> dict[str, str]:
    """The input's context columns by role (context, context_start, context_end); empty
    without ``input.context_column``."""
    if not cfg.context_column:
        return {}
    return {"context": cfg.context_column, "context_start": cfg.context_start_column,
            "context_end": cfg.context_end_column}


def usable_context() -> Column:
    """Whether a :func:`select_mentions` row's context can be read: a non-empty string with
    the mention's offsets inside it, start before end (the rule of
    :func:`clinlinker_spark.context.has_context`, which the core Linker applies)."""
    from pyspark.sql import functions as F

    text, start, end = (F.col(c) for c in CONTEXT_COLUMNS)
    size = F.length(text)
    return F.coalesce(text.isNotNull() & (size > 0) & (start >= 0) & (start < end)
                      & (end <= size), F.lit(False))


def _check_types(df: DataFrame, mapping: dict[str, str], target: str) -> None:
    """Refuse a text column that is not a string and an id column that is neither a string
    nor an integer, before any row is read: cast to strings, numbers would be linked with
    confident scores ('21' -> 'Trisomía 21')."""
    from pyspark.sql.types import CharType, IntegralType, StringType, VarcharType

    allowed = {"text": ((StringType, CharType, VarcharType), "a string"),
               "mention_id": ((StringType, CharType, VarcharType, IntegralType),
                              "a string or an integer")}
    for name, (types, what) in allowed.items():
        field = df.schema[mapping[name]]
        if not isinstance(field.dataType, types):
            raise InputDataError(
                f"input {target}: column {field.name!r} (input.{name}_column) is "
                f"{field.dataType.simpleString()}, not {what}; point input.{name}_column at "
                "the right column or cast it in the input")


# of the input rows sharing a mention_id, the first by these columns (nulls first) is kept
FIRST_ROW_ORDER = ("doc_id", "start", "end", "text")


def keyed_mentions(mentions: DataFrame) -> DataFrame:
    """The row-wise part of :func:`identify_mentions` (no shuffle): ``_bad_id`` (the reason
    of a null or blank mention_id, else null) and the synthetic id of such an id."""
    from pyspark.sql import functions as F

    bad_id = (F.when(F.col("mention_id").isNull(), F.lit("null mention_id"))
              .when(F.trim(F.col("mention_id")) == "", F.lit("empty mention_id")))
    blank_id = bad_id.isNotNull()
    synthetic = F.concat(
        F.lit("null:"),
        F.sha2(F.to_json(F.struct("doc_id", "start", "end", "text")), 256),
    )
    return (
        mentions
        .withColumn("_bad_id", bad_id)
        .withColumn("mention_id", F.when(blank_id, synthetic).otherwise(F.col("mention_id")))
    )


def identify_mentions(mentions: DataFrame) -> DataFrame:
    """One row per distinct mention_id, with ``text_sha256`` and the helper columns ``_rows``
    (input rows sharing the id) and ``_bad_id``; cheap (no Python), so that rows an
    incremental run skips never reach :func:`check_mentions`. See the module docstring for the
    duplicate and null-id rules."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    df = keyed_mentions(mentions)
    first = (Window.partitionBy("mention_id")
             .orderBy(*[F.col(c).asc_nulls_first() for c in FIRST_ROW_ORDER]))
    # both windows share one ordering, so the rows are sorted once (an unordered count
    # window would sort them by id first, then again for the first row); the frame of the
    # count is the whole id
    every_row = first.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    # the SHA-256 is taken after the shuffle of the window: its 64 characters a row would
    # otherwise make up most of the bytes a whole history shuffles
    return (
        df.withColumn("_rows", F.count(F.lit(1)).over(every_row))
        .withColumn("_rank", F.row_number().over(first))
        .filter(F.col("_rank") == 1)
        .drop("_rank")
        .withColumn("text_sha256", F.sha2(F.col("text"), 256))
    )


def check_mentions(identified: DataFrame, max_text_length: int) -> DataFrame:
    """:func:`identify_mentions` rows -> the same rows with ``text_norm`` and ``reason``
    (null for rows that can be linked; otherwise why not); ``text_norm`` is null for invalid
    rows. The helper columns are dropped."""
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.udfs import make_prepare_udf

    prepare = make_prepare_udf(max_text_length)
    df = identified.withColumn("_prep", prepare(F.col("text"), F.col("_rows"),
                                                F.col("_bad_id")))
    return (
        df.withColumn("reason", F.col("_prep.reason"))
        .withColumn(TEXT_NORM_COLUMN, F.col(f"_prep.{TEXT_NORM_COLUMN}"))
        .drop("_prep", "_rows", "_bad_id")
    )


def validate_mentions(mentions: DataFrame, max_text_length: int) -> DataFrame:
    """One row per distinct mention_id with ``text_sha256``, ``text_norm`` and ``reason``
    (:func:`identify_mentions` then :func:`check_mentions`)."""
    return check_mentions(identify_mentions(mentions), max_text_length)


def match_table(identified: DataFrame, keys: DataFrame, broadcast: bool = False) -> DataFrame:
    """The table rows whose mention_id is in the input (:func:`identify_mentions` rows), as
    (mention_id, ``_skip``, ``_was_invalid``): ``_skip`` when the table holds the id as final
    with these versions and the same text, and the input has it on one row with a real id (a
    duplicated or null id must still reach the table as invalid_input); ``_was_invalid``: the
    reason the table gives for the same text as invalid_input with these versions (the job
    leaves the row alone when validation gives that reason again). ``keys``:
    :func:`table_keys`. The other matched ids are rows this run replaces.

    ``broadcast`` (a small input, ``spark.broadcast_rows``): the input's keys are broadcast
    to the table scan instead of shuffling the whole table (a nightly extract against a
    large table). The table holds each mention_id once, so each matched id
    comes once."""
    from pyspark.sql import functions as F

    inputs = identified.select("mention_id", F.col("text_sha256").alias("_in_sha"),
                               _single_id().alias("_single"))
    if broadcast:
        inputs = F.broadcast(inputs)
    matched = keys.join(inputs, "mention_id", "inner")
    return matched.select("mention_id", *_marks(F.col("_single"), F.col("_in_sha"),
                                                F.col("text_sha256")))


def _single_id() -> Column:
    """An :func:`identify_mentions` row that came from one input row with a real id."""
    from pyspark.sql import functions as F

    return (F.col("_rows") == 1) & F.col("_bad_id").isNull()


def _marks(single: Column, input_sha: Column, table_sha: Column) -> list[Column]:
    """``_skip`` and ``_was_invalid`` (see :func:`match_table`) of an input row joined with
    its :func:`table_keys` row."""
    from pyspark.sql import functions as F

    # the table's digest comes as bytes (table_keys); a null text has a null hash
    same_text = table_sha.eqNullSafe(F.unhex(input_sha))
    skip = F.col("_done") & single & same_text
    return [F.coalesce(skip, F.lit(False)).alias("_skip"),
            F.when(same_text, F.col("_invalid_reason")).alias("_was_invalid")]


def mark_linked(identified: DataFrame, keys: DataFrame, broadcast: bool = False) -> DataFrame:
    """:func:`identify_mentions` rows with ``_in_table`` (the table holds the id) and ``_skip``
    (:func:`match_table`'s mark: the id is linked already; the run leaves it out), both never
    null, and :func:`match_table`'s ``_was_invalid``. ``broadcast``: a small input
    (``spark.broadcast_rows``), broadcast both ways (their keys to the table scan,
    the matched ids back), larger ones meet the table in one left join."""
    from pyspark.sql import functions as F

    if broadcast:
        matched = match_table(identified, keys, True).withColumn("_in_table", F.lit(True))
        return (identified.join(F.broadcast(matched), "mention_id", "left")
                .withColumn("_in_table", F.coalesce(F.col("_in_table"), F.lit(False)))
                .withColumn("_skip", F.coalesce(F.col("_skip"), F.lit(False))))
    # a large input: one left join. The rows are already partitioned by mention_id (the
    # window of identify_mentions), so only the table's keys are shuffled, and the input is
    # neither de-duplicated twice nor broadcast
    table = keys.select("mention_id", F.col("text_sha256").alias("_table_sha"), "_done",
                        "_invalid_reason", F.lit(True).alias("_in_table"))
    joined = identified.join(table, "mention_id", "left")
    return joined.select(
        *identified.columns,
        F.coalesce(F.col("_in_table"), F.lit(False)).alias("_in_table"),
        *_marks(_single_id(), F.col("text_sha256"), F.col("_table_sha")))


def table_keys(existing: DataFrame | None, versions: dict[str, str]) -> DataFrame | None:
    """(mention_id, text_sha256 as binary, ``_done``, ``_invalid_reason``) of every output
    table row; ``_done``: final with these versions; ``_invalid_reason``: the reason of an
    invalid_input row with these versions (else null). None without a table or when it lacks
    the columns."""
    from pyspark.sql import functions as F

    if existing is None:
        return None
    needed = {"mention_id", "text_sha256", "status", *versions}
    if not needed.issubset(existing.columns):
        log.warning("output table lacks columns %s: incremental skipping is off for this run",
                    sorted(needed - set(existing.columns)))
        return None
    same_versions = F.lit(True)
    for name, value in versions.items():
        same_versions = same_versions & (F.col(name) == F.lit(value))
    done = F.col("status").isin(*FINAL_STATUSES) & same_versions
    reason = F.col("reason") if "reason" in existing.columns else F.lit(None).cast("string")
    # the digest as its 32 bytes, not 64 hex characters: a whole history shuffles one per
    # table row to meet its input
    return existing.select(
        "mention_id", F.unhex("text_sha256").alias("text_sha256"),
        F.coalesce(done, F.lit(False)).alias("_done"),
        F.when((F.col("status") == STATUS_INVALID) & same_versions, reason)
        .alias("_invalid_reason"))


def tally(df: DataFrame, sums: dict[str, Column] | None = None,
          **conditions: Column) -> DataFrame:
    """(name, n) rows, one per condition: how many rows of ``df`` satisfy it, and one per
    ``sums`` entry: the sum of its (integer) column over ``df`` (0 for no rows). Long format,
    so that the tallies of several DataFrames union into one Spark action
    (:func:`collect_tallies`)."""
    from pyspark.sql import functions as F

    sums = sums or {}
    counts = df.agg(*[F.count(F.when(cond, 1)).alias(name) for name, cond in conditions.items()],
                    *[F.coalesce(F.sum(col), F.lit(0)).alias(name)
                      for name, col in sums.items()])
    pairs = [F.struct(F.lit(name).alias("name"), F.col(name).cast("long").alias("n"))
             for name in [*conditions, *sums]]
    return counts.select(F.explode(F.array(*pairs)).alias("t")).select("t.name", "t.n")


def collect_tallies(parts: list[DataFrame]) -> dict[str, int]:
    """Every :func:`tally` of ``parts`` in one Spark action, as {name: count} (no action and
    {} for no parts)."""
    if not parts:
        return {}
    union = parts[0]
    for part in parts[1:]:
        union = union.unionByName(part)
    return {str(r["name"]): int(r["n"]) for r in union.collect()}


def remaining_counts(counts: dict[str, int], input_rows: int | None) -> dict[str, int]:
    """``counts`` with mentions, in_table and skipped, from the tallies of the rows left after
    the skip (``_remaining``, ``_remaining_in_table``, and ``_merged``: the input rows their
    ids merged beyond one each) and ``input_rows``, the input's exact row count. Every input
    row is an id's row, and an id on several rows is never skipped (it is invalid), so
    mentions = input_rows - _merged, skipped = mentions - _remaining, and in_table = skipped
    + _remaining_in_table. The rows to link follow from the remaining rows alone, whatever
    the input count."""
    if input_rows is None:
        raise ValueError("the Spark prepare needs the input's row count")
    counts = dict(counts)
    left, left_in_table = counts.pop("_remaining"), counts.pop("_remaining_in_table")
    mentions = input_rows - counts.pop("_merged")
    skipped = mentions - left
    if skipped < 0:  # the input changed between its count and the prepare pass
        raise InputDataError(
            f"the input gave {input_rows} rows to its count and more to the prepare pass "
            f"({left} mentions to write or link): an input that changes between two reads (a "
            "table rewritten during the run, a DataFrame computed nondeterministically) "
            "cannot be linked; pass a stable one (e.g. persisted)")
    return {**counts, "mentions": mentions, "skipped": skipped,
            "in_table": skipped + left_in_table}

