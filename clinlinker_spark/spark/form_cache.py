"""The form cache: a Delta table of linked surface forms, so a night computes only the
forms it has never seen.

Its key (:func:`cache_key`) is the SHA-256 of the normalised text and every version: model,
index, re-ranker, ranker, and :func:`linking_version`, the hash of the settings that decide a
form's outcome. It holds no text. :func:`split_by_cache` splits a night's forms into the
cache's results and the forms to compute; :func:`update_form_cache` adds the computed ones
after the code assignments are committed (a failure there costs the next run time, never
rows).
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable

from clinlinker_spark.config import JobConfig, to_dict
from clinlinker_spark.spark import schemas
from clinlinker_spark.spark.mentions import tally
from clinlinker_spark.spark.schemas import (
    CACHE_KEY_COLUMN,
    CACHE_OUTCOME_COLUMNS,
    LINK_KEY_COLUMN,
    TEXT_NORM_COLUMN,
    VERSION_COLUMNS,
)

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)


def linking_version(config: JobConfig) -> str:
    """Hash of the settings besides the artifacts that decide a form's outcome, for the form
    cache: every ``linking`` key (retrievers, search_k, lexical_k, top_k, exact_match_prior,
    max_text_length, min_score, review_below) but reuse_index_vectors, the encoder's input
    contract and precision, the re-ranker's ordering. A ranker is covered by its version
    (ranker_version), not by its training settings."""
    enc, rr = config.encoder, config.reranker
    linking = to_dict(config.linking)
    # a reused term vector is what encoding the text gives (up to the last bits, as a text's
    # vector moves with the batch it is encoded in): outcomes do not depend on the setting
    linking.pop("reuse_index_vectors")
    payload = {
        "linking": linking,
        "encoder": [enc.pooling, enc.max_length, enc.prefix, enc.normalize, enc.precision],
        "reranker": [rr.top_n, rr.max_length, rr.fusion, rr.rrf_k, rr.precision]
        if rr.path else [],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cache_key(versions: dict[str, str]) -> Column:
    """SHA-256 of the normalised text and every version (the form cache's MERGE key)."""
    from pyspark.sql import functions as F

    parts = [F.col(TEXT_NORM_COLUMN)] + [F.lit(versions[c]) for c in VERSION_COLUMNS]
    return F.sha2(F.concat_ws("\u001f", *parts), 256)


def cache_key_of(text_norm: str, versions: dict[str, str]) -> str:
    """:func:`cache_key` of one normalised text, computed in Python."""
    parts = [text_norm, *[versions[c] for c in VERSION_COLUMNS]]
    return hashlib.sha256("\u001f".join(parts).encode("utf-8")).hexdigest()


def usable_cache(cache: DataFrame | None) -> DataFrame | None:
    """The form cache's key and outcome columns, as stored; None without a cache, or when it
    lacks them (warning: a damaged cache costs time, never wrong rows). :func:`stage_results`
    turns the rows a night takes from it into STAGE_SCHEMA."""
    if cache is None:
        return None
    needed = {CACHE_KEY_COLUMN, *CACHE_OUTCOME_COLUMNS}
    if not needed.issubset(cache.columns):
        log.warning("form cache lacks columns %s: not used in this run",
                    sorted(needed - set(cache.columns)))
        return None
    return cache.select(CACHE_KEY_COLUMN, *CACHE_OUTCOME_COLUMNS)


def stage_results(hits: DataFrame) -> DataFrame:
    """Cache rows joined with a night's forms -> STAGE_SCHEMA. The candidates' struct is
    rebuilt field by field, by name: a cache whose struct gained fields keeps its older
    fields first (the writer appends new ones), and a field the cache's struct lacks
    (written before the stage struct had it) reads as null. Applied after the join, so a
    night rebuilds the candidates of the forms it takes, not of the whole cache."""
    from pyspark.sql import functions as F

    have = set(hits.schema["candidates"].dataType.elementType.names)
    wanted = schemas.STAGE_CANDIDATE_STRUCT.fields
    candidates = F.transform(F.col("candidates"), lambda c: F.struct(
        *[(c[f.name] if f.name in have else F.lit(None).cast(f.dataType)).alias(f.name)
          for f in wanted])).cast(schemas.STAGE_CANDIDATES_TYPE)
    return hits.withColumn("candidates", candidates).select(
        *schemas.STAGE_SCHEMA.fieldNames())


def split_by_cache(forms: DataFrame, cache: DataFrame | None, versions: dict[str, str],
                   persist: Callable[[DataFrame], DataFrame] = lambda df: df,
                   broadcast: bool = False,
                   ) -> tuple[DataFrame | None, DataFrame, DataFrame | None]:
    """(results of the forms the cache holds, in STAGE_SCHEMA; the forms it does not hold; a
    :func:`tally` of ``forms`` and ``cache_hits``), all lazy; (None, forms, None) without a
    usable cache.

    ``broadcast`` (few forms, ``spark.broadcast_rows``): the forms are broadcast to a scan
    of the cache (inner join: the cache, which grows every night, is never shuffled nor
    broadcast), and the forms it lacks are the others. Otherwise one left join of the forms
    with the cache. Either way ``persist`` keeps the joined rows, so that the parts and the
    tally read them once.
    ``versions`` has VERSION_COLUMNS. A cache table without the expected columns is not used
    (warning), so a damaged cache costs time, never wrong rows.
    """
    from pyspark.sql import functions as F

    cache = usable_cache(cache)
    if cache is None:
        return None, forms, None
    keyed = forms.withColumn(CACHE_KEY_COLUMN, cache_key(versions))
    if broadcast:
        keyed = persist(keyed)
        found = persist(cache.join(F.broadcast(keyed), CACHE_KEY_COLUMN, "inner"))
        missing = keyed.join(F.broadcast(found.select(CACHE_KEY_COLUMN)), CACHE_KEY_COLUMN,
                             "left_anti")
        counts = tally(keyed, forms=F.lit(True)).unionByName(
            tally(found, cache_hits=F.lit(True)))
        return stage_results(found), missing.select(LINK_KEY_COLUMN, TEXT_NORM_COLUMN), counts
    joined = persist(keyed.join(cache.withColumn("_hit", F.lit(True)), CACHE_KEY_COLUMN,
                                "left"))
    counts = tally(joined, forms=F.lit(True), cache_hits=F.col("_hit").isNotNull())
    hits = stage_results(joined.filter(F.col("_hit")))
    misses = joined.filter(F.col("_hit").isNull()).select(LINK_KEY_COLUMN, TEXT_NORM_COLUMN)
    return hits, misses, counts


def cache_rows(results: DataFrame, versions: dict[str, str], run_id: str,
               run_ts: datetime) -> DataFrame:
    """The form cache's rows for newly linked forms: key, versions, outcome; no text."""
    from pyspark.sql import functions as F

    return results.select(
        cache_key(versions).alias(CACHE_KEY_COLUMN),
        *[F.lit(versions[c]).alias(c) for c in VERSION_COLUMNS],
        *CACHE_OUTCOME_COLUMNS,
        F.lit(run_id).alias("run_id"),
        F.lit(run_ts).cast("timestamp").alias("run_ts"),
    )


def update_form_cache(spark: SparkSession, rows: DataFrame, n_rows: int, config: JobConfig,
                       cache_at: int | None, run_id: str) -> dict[str, Any]:
    """Append ``rows`` (``n_rows`` forms missing from the cache as read at ``cache_at``) to the
    form cache: {"added": rows} or, when the write fails, {"error": the exception's type}.
    Never raises for a failed write: the code assignments are committed without it."""
    from clinlinker_spark.spark.writer import merge_into_delta

    try:
        added = merge_into_delta(spark, rows, config.output.form_cache,
                                 key=CACHE_KEY_COLUMN, writer=config.output.writer,
                                 new_keys_at=cache_at, max_rows=n_rows,
                                 rows_per_file=config.output.rows_per_file,
                                 broadcast_rows=config.spark.broadcast_rows,
                                 staging_max_age_hours=config.output.staging_max_age_hours,
                                 commit_retries=config.output.commit_retries)
        return {"added": added.rows_written}
    except Exception as exc:  # noqa: BLE001 - the assignments are already committed
        log.warning("link job %s: form cache %s not updated (%s: %s); the table is written, "
                    "the next run computes these forms again", run_id,
                    config.output.form_cache, type(exc).__name__, exc)
        return {"error": type(exc).__name__}

