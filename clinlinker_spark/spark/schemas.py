"""Schemas of the tables and UDF outputs the Spark job reads and writes, in one place.

Code-assignment table (one row per distinct input ``mention_id``)::

    mention_id       string     key of the MERGE; a null id becomes "null:<sha256>" (mentions.py)
    doc_id           string
    start, end       bigint     character offsets (first start / last end of a discontinuous span)
    text             string     the mention as given; ONLY when output.store_text is true
    text_sha256      string     SHA-256 (hex) of the mention as given; always present
    label            string
    <pass-through>   as input   input.passthrough_columns, in order, types unchanged
    status           string     linked | needs_review | no_candidate | invalid_input
                                needs_review: linked, with a confidence below
                                linking.review_below (the code and candidates are kept)
    reason           string     why a row is needs_review / no_candidate / invalid_input;
                                null when linked
    code, term       string     the best candidate (null unless linked or needs_review)
    score            double     its final score (the ranker's score with a ranker, else the
                                sigmoid of the re-rank logit when re-ranked, else retrieval)
    confidence       double     calibrated probability that ``code`` is right; null without
                                a ranker
    candidates       array<struct<code, term, retrieval_score, rerank_score, lexical_score,
                     ranker_score>>, best first (a score is null where its stage did not run)
    model_version, index_version, reranker_version, ranker_version
                     string     artifact hashes ("" = none)
    run_id           string
    run_ts           timestamp  UTC, one value per run

Text or hash: ``text_sha256`` is always written, so lineage and incremental runs (a mention
whose text changed is linked again) work the same whether or not text may be copied; the
``text`` column exists only when ``output.store_text`` is true (a column that is absent
cannot leak, and no reader mistakes a null text for an invalid row). Turning ``store_text``
off for an existing table that has ``text`` is refused by the writer (a table column would be
missing); write to a new table instead. Turning it on adds the column (older rows read null).

Tables written before a column existed (``confidence``, ``ranker_version``, a candidate's
``lexical_score`` / ``ranker_score``) take it on their next write: the writer adds columns and
struct fields (:mod:`clinlinker_spark.spark.writer`), older rows read them as null. Such rows
lack a version column, so an incremental run links them again.
"""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DataType,
    DoubleType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

STATUS_COLUMN = "status"
KEY_COLUMN = "mention_id"
TEXT_NORM_COLUMN = "text_norm"

# a candidate's fields in the table, in order (linker.Candidate without ``exact``)
CANDIDATE_FIELDS = ("code", "term", "retrieval_score", "rerank_score", "lexical_score",
                    "ranker_score")

CANDIDATE_STRUCT = StructType(
    [StructField("code", StringType(), True), StructField("term", StringType(), True)]
    + [StructField(name, DoubleType(), True) for name in CANDIDATE_FIELDS[2:]]
)
CANDIDATES_TYPE = ArrayType(CANDIDATE_STRUCT, containsNull=False)

# The same types in Arrow, for the mapInArrow UDFs.
ARROW_CANDIDATE_STRUCT = pa.struct(
    [pa.field("code", pa.string()), pa.field("term", pa.string())]
    + [pa.field(name, pa.float64()) for name in CANDIDATE_FIELDS[2:]]
)
ARROW_CANDIDATES_TYPE = pa.list_(pa.field("element", ARROW_CANDIDATE_STRUCT, nullable=False))

# Between the UDF stages a candidate also carries ``exact`` (its term equals the mention), which
# the re-ranker needs to keep exact matches first and the ranker reads as a feature, and
# ``dense_hits`` (how many of the mention's dense hits carry the code, a ranker feature); the
# table stores neither. Every field of linker.Candidate.
STAGE_CANDIDATE_STRUCT = StructType(
    list(CANDIDATE_STRUCT.fields) + [StructField("exact", BooleanType(), True),
                                     StructField("dense_hits", LongType(), True)]
)
STAGE_CANDIDATES_TYPE = ArrayType(STAGE_CANDIDATE_STRUCT, containsNull=False)
ARROW_STAGE_CANDIDATE_STRUCT = pa.struct(
    list(ARROW_CANDIDATE_STRUCT) + [pa.field("exact", pa.bool_()),
                                    pa.field("dense_hits", pa.int64())]
)
ARROW_STAGE_CANDIDATES_TYPE = pa.list_(
    pa.field("element", ARROW_STAGE_CANDIDATE_STRUCT, nullable=False)
)

# Input columns after the column mapping of config.input (canonical names and types).
MENTION_COLUMNS: tuple[tuple[str, DataType], ...] = (
    ("mention_id", StringType()),
    ("doc_id", StringType()),
    ("start", LongType()),
    ("end", LongType()),
    ("text", StringType()),
    ("label", StringType()),
)
REQUIRED_MENTION_COLUMNS = ("mention_id", "text")
# A mention's context (``input.context_column`` and its offsets), carried under these names
# from select_mentions to the context stage; never written to the table
CONTEXT_COLUMNS = ("_context", "_context_start", "_context_end")

# What the UDF stages take and return per surface form (or per mention when de-duplication is
# off): ``link_key`` is the normalised text (or the mention_id). The outcome columns (status ...
# confidence) are filled by the last stage that runs (retrieval without a re-ranker, else
# re-rank), after the ranker; a stage before it passes every candidate of the retrievers on.
LINK_KEY_COLUMN = "link_key"
STAGE_SCHEMA = StructType(
    [
        StructField(LINK_KEY_COLUMN, StringType(), False),
        StructField(TEXT_NORM_COLUMN, StringType(), True),
        StructField("status", StringType(), True),
        StructField("reason", StringType(), True),
        StructField("code", StringType(), True),
        StructField("term", StringType(), True),
        StructField("score", DoubleType(), True),
        StructField("confidence", DoubleType(), True),
        StructField("candidates", STAGE_CANDIDATES_TYPE, True),
    ]
)
ARROW_STAGE_SCHEMA = pa.schema(
    [
        pa.field(LINK_KEY_COLUMN, pa.string(), nullable=False),
        pa.field(TEXT_NORM_COLUMN, pa.string()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("code", pa.string()),
        pa.field("term", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("confidence", pa.float64()),
        pa.field("candidates", ARROW_STAGE_CANDIDATES_TYPE),
    ]
)

# Per-row checks (the prepare UDF): normalised text, or the reason the row cannot be linked.
PREPARED_STRUCT = StructType(
    [
        StructField(TEXT_NORM_COLUMN, StringType(), True),
        StructField("reason", StringType(), True),
    ]
)

LINK_RESULT_COLUMNS: tuple[tuple[str, DataType], ...] = (
    ("status", StringType()),
    ("reason", StringType()),
    ("code", StringType()),
    ("term", StringType()),
    ("score", DoubleType()),
    ("confidence", DoubleType()),
    ("candidates", CANDIDATES_TYPE),
)
# a mention's outcome (linker.Linker.outcome), as the stages and the table carry it
OUTCOME_COLUMNS = ("status", "reason", "code", "term", "score", "confidence")
LINEAGE_COLUMNS: tuple[tuple[str, DataType], ...] = (
    ("model_version", StringType()),
    ("index_version", StringType()),
    ("reranker_version", StringType()),
    ("ranker_version", StringType()),
    ("run_id", StringType()),
    ("run_ts", TimestampType()),
)

RESERVED_COLUMNS = frozenset(
    [name for name, _ in MENTION_COLUMNS]
    + ["text_sha256", TEXT_NORM_COLUMN]
    + [name for name, _ in LINK_RESULT_COLUMNS]
    + [name for name, _ in LINEAGE_COLUMNS]
)


def assignment_columns(store_text: bool, passthrough: Sequence[str] = ()) -> list[str]:
    """Column names of the code-assignment table, in order."""
    names = ["mention_id", "doc_id", "start", "end"]
    if store_text:
        names.append("text")
    names += ["text_sha256", "label", *passthrough]
    names += [name for name, _ in LINK_RESULT_COLUMNS]
    names += [name for name, _ in LINEAGE_COLUMNS]
    return names


def assignment_schema(
    store_text: bool, passthrough: Sequence[StructField] = ()
) -> StructType:
    """The code-assignment table schema; ``passthrough`` are the input's own fields."""
    fields = [
        StructField("mention_id", StringType(), False),
        StructField("doc_id", StringType(), True),
        StructField("start", LongType(), True),
        StructField("end", LongType(), True),
    ]
    if store_text:
        fields.append(StructField("text", StringType(), True))
    fields += [
        StructField("text_sha256", StringType(), True),
        StructField("label", StringType(), True),
    ]
    fields += list(passthrough)
    fields += [StructField(name, dtype, True) for name, dtype in LINK_RESULT_COLUMNS]
    fields += [StructField(name, dtype, True) for name, dtype in LINEAGE_COLUMNS]
    return StructType(fields)


# Surface-form cache (output.form_cache_path), one row per (normalised text, versions,
# linking settings); it never holds the text itself:
#
#     cache_key        string   SHA-256 (hex) of text_norm + versions + linking_version (MERGE key)
#     model_version, index_version, reranker_version, ranker_version, linking_version   string
#     status, reason, code, term, score, confidence, candidates   the linker's outcome for the
#                      form (candidates with ``exact`` and ``dense_hits``, as between the
#                      UDF stages)
#     run_id, run_ts   the run that computed it
CACHE_KEY_COLUMN = "cache_key"
CACHE_OUTCOME_COLUMNS = (*OUTCOME_COLUMNS, "candidates")
VERSION_COLUMNS = ("model_version", "index_version", "reranker_version", "ranker_version",
                   "linking_version")

