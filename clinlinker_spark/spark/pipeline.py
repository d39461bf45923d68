"""The Spark link job as stages: mentions (Parquet, Delta or gold TSVs) -> code assignments
(a Delta table).

:func:`run_link_job` is the whole job; the CLI, ``jobs/link_mentions.py`` and the notebooks
call it with a SparkSession they built. It reads as its data flow:

1. :func:`~clinlinker_spark.spark.mentions.read_mentions` and ``select_mentions``: the input
   and its columns (schema only: a missing column fails before anything is computed);
   :func:`~clinlinker_spark.spark.artifacts.resolve_artifacts`: the models and the index,
   checked on the driver before any Spark work, shipped to executors once.
2. :func:`prepare`: one row per mention_id (identify and validate), skip what the table holds
   already (``output.incremental``), surface forms (``spark.dedupe_surface_forms``) split by
   the form cache (``output.form_cache_path`` or ``output.form_cache_table``). One Spark
   action; its counts come from unions of ``tally`` rows.
3. :func:`link_forms`: the UDF stages over the forms left to compute: candidates, re-rank
   when a re-ranker is set, and the ranker's order, confidence and status.
   :func:`link_in_context` (with ``context.reranker`` and ``input.context_column``): the
   context stage links again the mentions whose form's link it gates, once per distinct
   (form, context); the form cache keeps the context-free results.
4. :func:`assemble_output`: every mention's row with its form's result (or its context
   stage result) and lineage.
5. :func:`write_assignments`: MERGE on mention_id into the output table (``output.path`` or
   ``output.table``)
   (:mod:`clinlinker_spark.spark.writer`).
6. ``form_cache.update_form_cache``: the forms computed tonight, after the table (a failure
   there costs the next run time, never rows).
7. :class:`LinkSummary`: the run's counts, versions and timings.

The row rules (duplicate and null ids, invalid text, what incremental runs skip) are in
:mod:`clinlinker_spark.spark.mentions`. :func:`link_mentions` is the linking alone as a
DataFrame transform, for a notebook that looks at the rows before anything is written.

Nothing but ids and counts is logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from clinlinker_spark.config import JobConfig, SparkConfig, to_dict
from clinlinker_spark.errors import ConfigError
from clinlinker_spark.linker import STATUS_INVALID, STATUSES
from clinlinker_spark.spark import schemas
from clinlinker_spark.spark.artifacts import (
    ResolvedArtifacts,
    check_context_input,
    index_recall,
    linker_spec,
    resolve_artifacts,
)
from clinlinker_spark.spark.form_cache import (
    cache_rows,
    linking_version,
    split_by_cache,
    update_form_cache,
)
from clinlinker_spark.spark.mentions import (
    check_mentions,
    collect_tallies,
    identify_mentions,
    input_errors,
    mark_linked,
    quoted_col,
    read_mentions,
    remaining_counts,
    select_mentions,
    table_keys,
    tally,
    usable_context,
    validate_mentions,
)
from clinlinker_spark.spark.schemas import (
    CONTEXT_COLUMNS,
    LINK_KEY_COLUMN,
    OUTCOME_COLUMNS,
    TEXT_NORM_COLUMN,
)

if TYPE_CHECKING:  # pragma: no cover
    from pyspark import Accumulator
    from pyspark.sql import Column, DataFrame, SparkSession

    from clinlinker_spark.spark.udfs import LinkerSpec

log = logging.getLogger(__name__)

# the error of a row to link without a result in assemble_output (a broken invariant)
NO_RESULT = "a mention to link has no result"

Persist = Callable[["DataFrame"], "DataFrame"]


# --------------------------------------------------------------------------------------------
# Task sizing (the knobs are spark.* config keys)


def _tasks(rows: int | None, per_task: int, most: int) -> int:
    """How many tasks share ``rows`` (an upper bound; None: unknown, ``most``) so that each
    has at least ``per_task`` of them: 1 to ``most``."""
    if rows is None:
        return most
    return max(1, min(most, -(-rows // per_task)))


def _one_wave_cap(rows: int | None, per_slot: int, partitions: int,
                  slots: int | None) -> int | None:
    """One task per slot (at most ``partitions``) when ``rows`` fit one wave of at most
    ``per_slot`` per slot (``slots``: tasks the cluster runs at once); None when they do not,
    or when either count is unknown."""
    if slots is None or rows is None or rows > slots * per_slot:
        return None
    return max(1, min(partitions, slots))


def form_tasks(forms: int | None, cfg: SparkConfig, slots: int | None) -> int:
    """Tasks for ``forms`` surface forms left to compute (None: unknown): at least
    ``spark.min_forms_per_task`` forms each, at most ``spark.shuffle_partitions``, one per
    slot while they fit one wave of ``spark.one_wave_forms_per_slot`` per slot.

    Spark sizes partitions by bytes; a form's cost is a model's work, so a night's few
    hundred forms would land in one task on one core, or in more tasks than slots, two
    waves each paying a Python hand-off."""
    cap = _one_wave_cap(forms, cfg.one_wave_forms_per_slot, cfg.shuffle_partitions, slots)
    return _tasks(forms, cfg.min_forms_per_task, cap or cfg.shuffle_partitions)


def prepare_tasks(rows: int | None, cfg: SparkConfig, slots: int | None) -> int:
    """Tasks of the Python normaliser for ``rows`` input rows: one per slot (at least
    ``spark.min_rows_per_prepare_task`` rows each) while they fit one wave of
    ``spark.rows_per_prepare_task`` per slot, else at least ``spark.rows_per_prepare_task``
    rows each, at most ``spark.shuffle_partitions``."""
    cap = _one_wave_cap(rows, cfg.rows_per_prepare_task, cfg.shuffle_partitions, slots)
    if cap is not None:
        return _tasks(rows, cfg.min_rows_per_prepare_task, cap)
    return _tasks(rows, cfg.rows_per_prepare_task, cfg.shuffle_partitions)


def _broadcastable(rows: int | None, cfg: SparkConfig) -> bool:
    """Whether ``rows`` (a count; None = unknown) is at most ``spark.broadcast_rows``."""
    return rows is not None and rows <= cfg.broadcast_rows


# --------------------------------------------------------------------------------------------
# Stage 2: prepare


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` hands the linking stages. ``validated``: one row per mention
    the run writes (``check_mentions`` columns; ``reason`` set for invalid rows); ``forms``:
    the (link_key, text_norm) rows the UDFs compute (the form cache's hits left out),
    partitioned for them; ``hits``: the cache's results (STAGE_SCHEMA) or None; ``counts``:
    mentions, in_table, skipped, invalid, unchanged_invalid, and with a form cache forms and
    cache_hits; ``table_at``/``cache_at``: the versions of the table and cache searched
    (None: not searched)."""

    validated: DataFrame
    forms: DataFrame
    hits: DataFrame | None
    counts: dict[str, int]
    table_at: int | None
    cache_at: int | None

    @property
    def to_link(self) -> int:
        """Mentions the run links (valid, not skipped)."""
        c = self.counts
        return c["mentions"] - c["skipped"] - c["unchanged_invalid"] - c["invalid"]

    @property
    def cache_misses(self) -> int:
        """Forms left to compute after the form cache (-1: no cache, unknown)."""
        if "forms" not in self.counts:
            return -1
        return self.counts["forms"] - self.counts.get("cache_hits", 0)

    @property
    def new_keys_at(self) -> int | None:
        """The table version at which none of the rows to write is in the table (the MERGE
        can append), or None: some input id that is written is in the table."""
        c = self.counts
        return self.table_at if c["in_table"] == c["skipped"] + c["unchanged_invalid"] else None


def surface_forms(to_link: DataFrame, dedupe: bool, partitions: int | None) -> DataFrame:
    """The rows the UDFs see: (link_key, text_norm), one per distinct text when ``dedupe``.

    Either way they come in ``partitions`` partitions (None: as they come, for a caller that
    repartitions them later). After ``distinct()``, adaptive query execution would size
    partitions by bytes (1 MB at least), not by model work: the distinct forms of a small
    input land in one partition and the UDF runs as one task on one core.
    """
    from pyspark.sql import functions as F

    if dedupe:
        forms = (to_link.select(TEXT_NORM_COLUMN).distinct()
                 .withColumn(LINK_KEY_COLUMN, F.col(TEXT_NORM_COLUMN))
                 .select(LINK_KEY_COLUMN, TEXT_NORM_COLUMN))
    else:
        forms = to_link.select(F.col("mention_id").alias(LINK_KEY_COLUMN), TEXT_NORM_COLUMN)
    return forms if partitions is None else forms.repartition(partitions)


def skip_linked(spark: SparkSession, identified: DataFrame, config: JobConfig,
                versions: dict[str, str], input_rows: int) -> tuple[DataFrame, int | None]:
    """``identify_mentions`` rows marked ``_in_table``, ``_skip`` and ``_was_invalid``
    against the output table (``output.incremental``; ``mentions.mark_linked``), and the
    table version searched (None: not searched, every mark false)."""
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.writer import read_delta_snapshot

    if config.output.incremental:
        table, table_at = read_delta_snapshot(spark, config.output.target)
        keys = table_keys(table, versions)
        if keys is not None:
            broadcast = _broadcastable(input_rows, config.spark)
            return mark_linked(identified, keys, broadcast), table_at
    return (identified.withColumn("_in_table", F.lit(False))
            .withColumn("_skip", F.lit(False))
            .withColumn("_was_invalid", F.lit(None).cast("string"))), None


def validate_remaining(marked: DataFrame, config: JobConfig, input_rows: int,
                       slots: int | None, persist: Persist) -> tuple[DataFrame, list[DataFrame]]:
    """The rows :func:`skip_linked` lets through, validated and normalised
    (``mentions.check_mentions``), with their :func:`tally` rows: (validated, tallies).
    ``validated`` holds one row per mention the run writes: an invalid row the table holds
    with the same text, versions and reason is left alone (rewriting a table file for it
    would change nothing)."""
    from pyspark.sql import functions as F

    # only the rows that go on are kept (persisted), not every input row: the counts over
    # all of them follow from these rows and the input's row count (remaining_counts)
    remaining = (marked.filter(~F.col("_skip")).drop("_skip")
                 .withColumn("_merged", F.col("_rows") - 1))
    # a small night's few thousand rows cost one task's start, not one per shuffle partition
    remaining = remaining.coalesce(prepare_tasks(input_rows, config.spark, slots))
    checked = persist(
        check_mentions(remaining, config.linking.max_text_length)
        .withColumn("_unchanged", F.coalesce(F.col("reason") == F.col("_was_invalid"),
                                             F.lit(False)))
        .drop("_was_invalid"))
    validated = checked.filter(~F.col("_unchanged")).drop("_unchanged", "_in_table", "_merged")
    tallies = [tally(checked, sums={"_merged": F.col("_merged")},
                     _remaining=F.lit(True), _remaining_in_table=F.col("_in_table"),
                     invalid=F.col("reason").isNotNull() & ~F.col("_unchanged"),
                     unchanged_invalid=F.col("_unchanged"))]
    return validated, tallies


def prepare(spark: SparkSession, selected: DataFrame, config: JobConfig,
            versions: dict[str, str], cache_versions: dict[str, str], input_rows: int,
            slots: int | None, persist: Persist) -> Prepared:
    """Identify and validate, skip what is linked already, split the forms by the form cache:
    one Spark action (two for an input over ``spark.broadcast_rows`` rows with a form cache,
    whose rows to link are counted before the cache is searched). ``input_rows``: the exact
    row count of ``selected`` (``mentions.remaining_counts``); ``persist`` keeps the frames
    the counts and the later stages share. A whole history whose rows are mostly linked
    already is shuffled and joined once, never cached."""
    from pyspark.sql import functions as F

    has_cache = config.output.form_cache is not None
    marked, table_at = skip_linked(spark, identify_mentions(selected), config, versions,
                                   input_rows)
    validated, tallies = validate_remaining(marked, config, input_rows, slots, persist)
    to_link = validated.filter(F.col("reason").isNull())
    # a large input's rows to link are counted first (a second action): most rows of a
    # whole history are skipped, and their few forms are then looked up in a scan of the
    # cache instead of a join that broadcasts or shuffles the whole cache, which grows
    # every night
    first: dict[str, int] = {}
    max_forms = input_rows
    if has_cache and not _broadcastable(input_rows, config.spark):
        first = collect_tallies(tallies)
        tallies = []
        max_forms = first["_remaining"] - first["invalid"] - first["unchanged_invalid"]
    forms, hits, cache_at = _split_forms(spark, to_link, config, cache_versions, max_forms,
                                         persist, tallies)
    counts = remaining_counts({**first, **collect_tallies(tallies)}, input_rows)
    if hits is not None:
        # the join's output is sized by bytes: spread the model work again
        n_misses = counts["forms"] - counts["cache_hits"]
        forms = forms.repartition(form_tasks(n_misses, config.spark, slots))
    return Prepared(validated, forms, hits, counts, table_at, cache_at)


def _split_forms(spark: SparkSession, to_link: DataFrame, config: JobConfig,
                 cache_versions: dict[str, str], max_forms: int, persist: Persist,
                 tallies: list[DataFrame]) -> tuple[DataFrame, DataFrame | None, int | None]:
    """(forms to compute, the cache's results or None, the cache version searched or None);
    appends the cache's tally to ``tallies``. Without a usable cache the forms come in
    ``spark.shuffle_partitions`` partitions; with one, the caller repartitions them once the
    misses are counted."""
    partitions = config.spark.shuffle_partitions
    cache_table = config.output.form_cache
    forms = surface_forms(to_link, config.spark.dedupe_surface_forms,
                          None if cache_table else partitions)
    if cache_table is None:
        return forms, None, None
    from clinlinker_spark.spark.writer import read_delta_snapshot

    cache, cache_at = read_delta_snapshot(spark, cache_table)
    hits, forms, cache_tally = split_by_cache(forms, cache, cache_versions, persist,
                                              _broadcastable(max_forms, config.spark))
    if cache_tally is None:  # not read: the forms were not checked against it
        return forms.repartition(partitions), None, None
    tallies.append(cache_tally)
    return forms, hits, cache_at


# --------------------------------------------------------------------------------------------
# Stage 3: link forms


@dataclass(frozen=True)
class Linked:
    """What :func:`compute_forms` gives: the results of every form to link (the cache's and
    the computed ones, STAGE_SCHEMA; None when none), the computed ones alone, and their
    count."""

    results: DataFrame | None
    computed: DataFrame | None
    n_computed: int


def retrieve_stage(forms: DataFrame, spec: LinkerSpec,
                   stage_seconds: Accumulator | None = None) -> DataFrame:
    """The first UDF stage over (link_key, text_norm) rows: candidates, and without a
    re-ranker the ranker's order, confidence and outcome. STAGE_SCHEMA rows, lazily."""
    from clinlinker_spark.spark.udfs import make_retrieve_fn

    return forms.mapInArrow(make_retrieve_fn(spec, stage_seconds), schemas.STAGE_SCHEMA)


def rerank_stage(results: DataFrame, spec: LinkerSpec,
                 stage_seconds: Accumulator | None = None) -> DataFrame:
    """The re-rank UDF stage over :func:`retrieve_stage` rows (``spec`` has a re-ranker):
    the same rows re-ranked, then ranked, the outcome filled; lazily."""
    from clinlinker_spark.spark.udfs import make_rerank_fn

    return results.mapInArrow(make_rerank_fn(spec, stage_seconds), schemas.STAGE_SCHEMA)


def link_forms(forms: DataFrame, spec: LinkerSpec,
               stage_seconds: Accumulator | None = None) -> DataFrame:
    """Every UDF stage over (link_key, text_norm) rows, lazily: STAGE_SCHEMA rows with the
    outcome, one per form."""
    results = retrieve_stage(forms, spec, stage_seconds)
    return rerank_stage(results, spec, stage_seconds) if spec.has_reranker else results


def compute_forms(prep: Prepared, spec: LinkerSpec, stage_seconds: Accumulator | None,
                  clock: StageClock, persist: Persist) -> Linked:
    """The UDF stages over the forms the form cache does not hold, each persisted and
    counted under its own clock entry (embed_search, rerank), joined with the cache's
    hits."""
    if not prep.to_link:
        return Linked(None, None, 0)
    computed: DataFrame | None = None
    n_forms = 0
    if prep.cache_misses != 0:
        clock.start("embed_search")
        computed = persist(retrieve_stage(prep.forms, spec, stage_seconds))
        n_forms = computed.count()
        clock.stop()
        if spec.has_reranker and n_forms:
            clock.start("rerank")
            computed = persist(rerank_stage(computed, spec, stage_seconds))
            computed.count()
            clock.stop()
    if prep.hits is None:
        return Linked(computed, computed, n_forms)
    results = prep.hits if computed is None else prep.hits.unionByName(computed)
    return Linked(results, computed, n_forms)


# --------------------------------------------------------------------------------------------
# Stage 3b: the context stage (``context.reranker`` and ``input.context_column``)


def context_key() -> Column:
    """SHA-256 of a mention's form and context (text and offsets): the context stage links
    each distinct key once, as the context-free stages link each form once."""
    from pyspark.sql import functions as F

    parts = [F.col(TEXT_NORM_COLUMN), *[F.col(c).cast("string") for c in CONTEXT_COLUMNS]]
    return F.sha2(F.concat_ws("\u001f", *parts), 256)


def gate_context(validated: DataFrame, results: DataFrame, spec: LinkerSpec,
                 config: JobConfig) -> DataFrame:
    """The mentions to link whose context is usable (``mentions.usable_context``), one row
    each, with ``_gated``: their form's context-free link is one the context stage links
    again (``linker.needs_context``, decided once per form)."""
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.udfs import make_context_gate_udf

    gate = make_context_gate_udf(spec.config["context"])
    codes = [F.get(F.col("candidates"), i)["code"] for i in (0, 1)]
    gated = (results.select(F.col(LINK_KEY_COLUMN).alias("_gate_key"),
                            gate(*codes, F.col("confidence")).alias("_gate"))
             .filter(F.col("_gate")).drop("_gate"))
    key = TEXT_NORM_COLUMN if config.spark.dedupe_surface_forms else "mention_id"
    mentions = validated.filter(F.col("reason").isNull() & usable_context())
    marked = mentions.join(gated, mentions[key] == gated["_gate_key"], "left")
    return marked.select(TEXT_NORM_COLUMN, *CONTEXT_COLUMNS,
                         F.col("_gate_key").isNotNull().alias("_gated"))


def context_lists(marked: DataFrame, partitions: int | None) -> DataFrame:
    """The distinct (form, context) lists the context stage links, from :func:`gate_context`
    rows: (link_key = :func:`context_key`, text_norm, CONTEXT_COLUMNS), in ``partitions``
    partitions (None: as they come)."""
    from pyspark.sql import functions as F

    lists = (marked.filter(F.col("_gated"))
             .select(context_key().alias(LINK_KEY_COLUMN), TEXT_NORM_COLUMN, *CONTEXT_COLUMNS)
             .dropDuplicates([LINK_KEY_COLUMN]))
    return lists if partitions is None else lists.repartition(partitions)


def context_stage(lists: DataFrame, spec: LinkerSpec,
                  stage_seconds: Accumulator | None = None) -> DataFrame:
    """The context stage's UDF over :func:`context_lists` rows: STAGE_SCHEMA rows keyed by
    the (form, context) key, outcome filled; lazily."""
    from clinlinker_spark.spark.udfs import make_context_fn

    return lists.mapInArrow(make_context_fn(spec, stage_seconds), schemas.STAGE_SCHEMA)


@dataclass(frozen=True)
class InContext:
    """What :func:`link_in_context` gives: the context stage's results (STAGE_SCHEMA keyed by
    (form, context); None: no stage or nothing to link) and its counts: mentions to link
    with a usable context (``with_context``), those the stage linked again (``mentions``)
    and the distinct (form, context) lists it ranked (``lists``)."""

    results: DataFrame | None
    counts: dict[str, int]


def link_in_context(prep: Prepared, linked: Linked, spec: LinkerSpec, config: JobConfig,
                    slots: int | None, stage_seconds: Accumulator | None, clock: StageClock,
                    persist: Persist) -> InContext:
    """The context stage of a run: gate, count, and link the gated (form, context) lists,
    persisted (two Spark actions, under the clock's ``context`` entry)."""
    from pyspark.sql import functions as F

    counts = {"with_context": 0, "mentions": 0, "lists": 0}
    if not spec.context_version or linked.results is None:
        return InContext(None, counts)
    clock.start("context")
    marked = persist(gate_context(prep.validated, linked.results, spec, config))
    row = marked.agg(F.count(F.lit(1)).alias("n"),
                     F.sum(F.col("_gated").cast("long")).alias("gated")).first()
    counts.update(with_context=int(row["n"]), mentions=int(row["gated"] or 0))
    results = None
    if counts["mentions"]:
        lists = context_lists(marked, form_tasks(counts["mentions"], config.spark, slots))
        results = persist(context_stage(lists, spec, stage_seconds))
        counts["lists"] = results.count()
    clock.stop()
    log.info("context stage: %d mentions with a context, %d linked again as %d (form, "
             "context) lists", counts["with_context"], counts["mentions"], counts["lists"])
    return InContext(results, counts)


# --------------------------------------------------------------------------------------------
# Stage 4: assemble


def table_candidates(column: str = "candidates") -> Column:
    """Stage candidates (with ``exact``) -> the table's candidate structs, best first."""
    from pyspark.sql import functions as F

    return F.transform(
        F.col(column),
        lambda c: F.struct(*[c[f].alias(f) for f in schemas.CANDIDATE_FIELDS]),
    ).cast(schemas.CANDIDATES_TYPE)


def assemble_output(
    validated: DataFrame,
    results: DataFrame | None,
    config: JobConfig,
    versions: dict[str, str],
    run_id: str,
    run_ts: datetime,
    broadcast_results: bool = False,
    context_results: DataFrame | None = None,
) -> DataFrame:
    """One output row per ``validated`` row, with lineage, in the code-assignment schema's
    order: invalid rows as invalid_input, the others with the result of their form (or
    mention, without ``spark.dedupe_surface_forms``) from ``results``, or where
    ``context_results`` (:func:`context_stage`) holds their (form, context) key, with that.
    ``broadcast_results``: the results (and the context results) are few enough to
    broadcast.

    One left join of every row with the results, not a union of the invalid and the linked
    rows: the writer coalesces its input into files by ranges of partitions, and a union puts
    the (few) invalid rows' partitions in one range and every linked row in the others. A row
    to link without a result (a broken invariant) fails the write instead of being dropped."""
    from pyspark.sql import functions as F

    passthrough = list(config.input.passthrough_columns)
    mention_cols = ["mention_id", "doc_id", "start", "end", "text", "text_sha256", "label",
                    *passthrough]
    mention = [quoted_col(c, validated) for c in mention_cols]
    if results is None:
        outcome = _unlinked_outcome(validated)
    else:
        key = TEXT_NORM_COLUMN if config.spark.dedupe_surface_forms else "mention_id"
        res = _joinable(results, "_r_", broadcast_results)
        # an invalid row's text_norm is null (no match); without de-duplication only the
        # rows to link have results
        validated = validated.join(res, validated[key] == res["_r_key"], "left")
        outcome = _linked_outcome(validated, res)
        if context_results is not None:
            validated, outcome = _in_context(validated, outcome, context_results,
                                             broadcast_results)
    out = validated.select(
        *mention, *outcome,
        *[F.lit(v).alias(k) for k, v in versions.items()],
        F.lit(run_id).alias("run_id"),
        F.lit(run_ts).cast("timestamp").alias("run_ts"),
    )
    names = schemas.assignment_columns(config.output.store_text, passthrough)
    return out.select(*[quoted_col(c) for c in names])


def _joinable(results: DataFrame, prefix: str, broadcast: bool) -> DataFrame:
    """STAGE_SCHEMA ``results`` as the right side of the output join: ``{prefix}key``, the
    outcome columns and the table's candidates, each under ``prefix``; broadcast when
    ``broadcast``."""
    from pyspark.sql import functions as F

    res = results.select(
        F.col(LINK_KEY_COLUMN).alias(f"{prefix}key"),
        *[F.col(c).alias(f"{prefix}{c}") for c in OUTCOME_COLUMNS],
        table_candidates().alias(f"{prefix}candidates"),
    )
    return F.broadcast(res) if broadcast else res


def _unlinked_outcome(validated: DataFrame) -> list[Column]:
    """The outcome columns when there are no results: invalid rows as invalid_input, a row
    to link fails the write (:data:`NO_RESULT`)."""
    from pyspark.sql import functions as F

    valid = validated["reason"].isNull()
    return [
        F.when(valid, F.raise_error(F.lit(NO_RESULT))).otherwise(F.lit(STATUS_INVALID))
        .alias("status"),
        validated["reason"],
        F.lit(None).cast("string").alias("code"),
        F.lit(None).cast("string").alias("term"),
        F.lit(None).cast("double").alias("score"),
        F.lit(None).cast("double").alias("confidence"),
        F.array().cast(schemas.CANDIDATES_TYPE).alias("candidates"),
    ]


def _linked_outcome(joined: DataFrame, res: DataFrame) -> list[Column]:
    """The outcome columns of mentions left-joined with their results (``_r_`` columns)."""
    from pyspark.sql import functions as F

    valid = joined["reason"].isNull()
    missing = valid & res["_r_key"].isNull()
    return [
        F.when(~valid, F.lit(STATUS_INVALID))
        .when(missing, F.raise_error(F.lit(NO_RESULT)))
        .otherwise(res["_r_status"]).alias("status"),
        F.when(valid, res["_r_reason"]).otherwise(joined["reason"]).alias("reason"),
        *[F.when(valid, res[f"_r_{c}"]).alias(c) for c in OUTCOME_COLUMNS[2:]],
        F.when(valid, res["_r_candidates"])
        .otherwise(F.array().cast(schemas.CANDIDATES_TYPE)).alias("candidates"),
    ]


def _in_context(joined: DataFrame, outcome: list[Column], context_results: DataFrame,
                broadcast: bool) -> tuple[DataFrame, list[Column]]:
    """``joined`` left-joined with the context stage's results on each mention's (form,
    context) key, and ``outcome`` taken from them where a mention has one."""
    from pyspark.sql import functions as F

    ctx = _joinable(context_results, "_c_", broadcast)
    key = F.when(F.col("reason").isNull() & usable_context(), context_key())
    joined = joined.withColumn("_mkey", key)
    joined = joined.join(ctx, joined["_mkey"] == ctx["_c_key"], "left")
    found = ctx["_c_key"].isNotNull()
    names = [*OUTCOME_COLUMNS, "candidates"]
    return joined, [F.when(found, ctx[f"_c_{name}"]).otherwise(column).alias(name)
                    for name, column in zip(names, outcome)]


# --------------------------------------------------------------------------------------------
# Stage 5: write


@dataclass(frozen=True)
class Written:
    """What :func:`write_assignments` committed: the writer, the table version (None: no
    table), rows written and replaced, and the written rows by status."""

    writer: str | None
    table_version: int | None
    rows_written: int
    rows_replaced: int
    counts_by_status: dict[str, int]


def write_assignments(spark: SparkSession, out: DataFrame, rows: int, config: JobConfig,
                      new_keys_at: int | None) -> Written:
    """MERGE ``out`` (at most ``rows`` rows) into the output table on mention_id; no commit
    when there is nothing to write (the table stays at its version)."""
    from clinlinker_spark.spark.writer import merge_into_delta, readable_version

    by_status = {s: 0 for s in STATUSES}
    if not rows:
        return Written(None, readable_version(spark, config.output.target), 0, 0, by_status)
    written = merge_into_delta(spark, out, config.output.target, key="mention_id",
                               writer=config.output.writer, count_by="status",
                               new_keys_at=new_keys_at, max_rows=rows,
                               rows_per_file=config.output.rows_per_file,
                               broadcast_rows=config.spark.broadcast_rows,
                               staging_max_age_hours=config.output.staging_max_age_hours,
                               commit_retries=config.output.commit_retries)
    by_status.update(written.counts)
    return Written(written.writer, written.table_version, written.rows_written,
                   written.rows_replaced, by_status)


# --------------------------------------------------------------------------------------------
# Summary


@dataclass(frozen=True)
class LinkSummary:
    """What a link run did: printable as JSON (:meth:`to_json`).

    ``skipped_unchanged_invalid``: invalid_input rows the table holds with the same text,
    versions and reason; ``surface_forms``: forms computed by the UDFs (form cache hits not
    counted); ``index_recall``: the index's recall@k against exact search, measured at
    build (None: not measured); ``timings_s``: wall seconds per stage (artifacts, prepare,
    embed_search, rerank, write, form_cache_write, total); ``udf_task_seconds``: seconds per
    linking stage inside the UDFs, summed over tasks (not wall time); ``vectors``: forms
    embedded by the bi-encoder and forms that took an index term's vector
    (``linking.reuse_index_vectors``), summed over task attempts, so a retried task counts
    twice (None: no accumulator, e.g. Spark Connect). ``ranker_version`` is the one the rows
    carry (with a context stage it covers the stage, ``linker.lineage_versions``)."""

    run_id: str
    run_ts: str
    table: str  # the output table's path or catalog name
    writer: str | None
    table_version: int | None
    rows_written: int
    rows_replaced: int
    mentions: int
    counts_by_status: dict[str, int]
    skipped_already_linked: int
    skipped_unchanged_invalid: int
    to_link: int
    surface_forms: int
    form_cache: dict[str, Any]
    dedupe_surface_forms: bool
    index_recall: dict[str, Any] | None
    model_version: str
    index_version: str
    reranker_version: str
    ranker_version: str
    linking_version: str
    timings_s: dict[str, float]
    udf_task_seconds: dict[str, float]
    vectors: dict[str, int] | None
    # the model registry's entries the models came from (models:/ URIs), by role
    registered_models: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    mlflow_run_id: str = ""  # the MLflow run that logged this summary ("": tracking off)
    context_version: str = ""  # linker.context_version ("": no context stage)
    # mentions to link with a usable context, those the context stage linked again, and the
    # distinct (form, context) lists it ranked
    context_stage: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"with_context": 0, "mentions": 0, "lists": 0})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        """The summary as JSON (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kwargs)


def _summary(run_id: str, run_ts: datetime, config: JobConfig, art: ResolvedArtifacts,
             cache_versions: dict[str, str], prep: Prepared, linked: Linked, written: Written,
             form_cache: dict[str, Any], timings: dict[str, float],
             stage_seconds: Accumulator | None, in_context: InContext) -> LinkSummary:
    """The run's :class:`LinkSummary`."""
    from clinlinker_spark.linker import VECTOR_COUNTS

    udf_totals = stage_seconds.value if stage_seconds is not None else {}
    return LinkSummary(
        run_id=run_id, run_ts=run_ts.isoformat(), table=str(config.output.target),
        writer=written.writer, table_version=written.table_version,
        rows_written=written.rows_written, rows_replaced=written.rows_replaced,
        mentions=prep.counts["mentions"], counts_by_status=written.counts_by_status,
        skipped_already_linked=prep.counts["skipped"],
        skipped_unchanged_invalid=prep.counts["unchanged_invalid"],
        to_link=prep.to_link, surface_forms=linked.n_computed, form_cache=form_cache,
        dedupe_surface_forms=config.spark.dedupe_surface_forms,
        index_recall=index_recall(art.index_manifest), **art.row_versions,
        linking_version=cache_versions["linking_version"],
        timings_s={k: round(v, 3) for k, v in timings.items()},
        udf_task_seconds={k: round(v, 3) for k, v in udf_totals.items()
                          if k not in VECTOR_COUNTS},
        vectors=({k: int(udf_totals.get(k, 0)) for k in VECTOR_COUNTS}
                 if stage_seconds is not None else None),
        registered_models=art.registered,
        context_version=art.context_version,
        context_stage=in_context.counts,
    )


# --------------------------------------------------------------------------------------------
# The job


class StageClock:
    """Wall seconds per stage of a job (``seconds``), and the running stage as the Spark job
    description, so that the Spark UI names each job after its stage."""

    def __init__(self, spark: SparkSession, label: str) -> None:
        self.seconds: dict[str, float] = {}
        self._label = label
        self._name: str | None = None
        self._t = 0.0
        try:
            self._sc = spark.sparkContext
        except Exception:  # noqa: BLE001 - Spark Connect has no SparkContext: no descriptions
            self._sc = None

    def start(self, name: str) -> None:
        self.stop()
        self._name, self._t = name, time.perf_counter()
        if self._sc is not None:
            self._sc.setJobDescription(f"{self._label}: {name}")

    def stop(self) -> None:
        if self._name is None:
            return
        self.seconds[self._name] = time.perf_counter() - self._t
        self._name = None
        if self._sc is not None:
            self._sc.setJobDescription(None)


def run_link_job(
    spark: SparkSession,
    config: JobConfig,
    run_id: str | None = None,
    mentions: DataFrame | None = None,
) -> LinkSummary:
    """Link the configured input and MERGE the code assignments into the output table.

    ``mentions`` (optional) replaces reading ``config.input``: a DataFrame with the input's
    columns (the column mapping still applies). Returns the run's :class:`LinkSummary`.

    With ``mlflow.tracking_uri`` set, the night is one MLflow run: the config as params, the
    summary's counts and timings as metrics, the versions as tags (``tracking.
    log_link_summary``); a night that fails is marked failed with its error's class.
    """
    from clinlinker_spark.tracking import log_link_summary, tracked_run

    run_id = run_id or uuid.uuid4().hex
    with tracked_run(config.mlflow, "link", f"link {run_id[:12]}",
                     {"clinlinker.run_id": run_id}) as tracked:
        tracked.log_params(to_dict(config))
        summary = _run_link_job(spark, config, run_id, mentions)
        if tracked.enabled:
            summary = dataclasses.replace(summary, mlflow_run_id=tracked.run_id)
        log_link_summary(tracked, summary.to_dict())
    return summary


def _run_link_job(
    spark: SparkSession,
    config: JobConfig,
    run_id: str,
    mentions: DataFrame | None = None,
) -> LinkSummary:
    """:func:`run_link_job` without its MLflow run.

    The input is read twice: a row count first (from file footers for Parquet and Delta; a
    ``mentions`` DataFrame is evaluated for it), then the one pass of :func:`prepare`. Both
    must see the same rows (``mentions.remaining_counts`` derives the counts of mentions and
    skipped rows from the count), so pass a ``mentions`` DataFrame that gives the same rows
    each time it is evaluated (persist a sampled or otherwise nondeterministic one).
    """
    from clinlinker_spark.spark.session import Persisted, task_slots
    from clinlinker_spark.spark.udfs import stage_seconds_accumulator

    config.output.target  # noqa: B018 - no output table: a ConfigError before any work
    check_context_input(config)
    if config.output.form_cache is not None and not config.spark.dedupe_surface_forms:
        raise ConfigError("a form cache (output.form_cache_path / form_cache_table) needs "
                          "spark.dedupe_surface_forms: true (the cache holds surface forms)")
    run_ts = datetime.now(timezone.utc)  # aware: Spark stores the instant, whatever the TZ
    clock = StageClock(spark, f"clinlinker link {run_id}")
    t_start = time.perf_counter()
    log.info("link job %s: starting", run_id)

    with input_errors(config.input):
        raw = mentions if mentions is not None else read_mentions(spark, config.input)
        selected = select_mentions(raw, config.input, config.output.store_text)
    clock.start("artifacts")
    art = resolve_artifacts(config)
    spec = linker_spec(spark, config, art)
    cache_versions = {**art.versions, "linking_version": linking_version(config)}
    clock.stop()

    persisted = Persisted()
    stage_seconds = stage_seconds_accumulator(spark)
    try:
        clock.start("prepare")
        # an upper bound of every count (identify only merges rows), to decide what is small
        # enough to broadcast; Parquet answers it from its file footers
        with input_errors(config.input):
            input_rows = selected.count()
        slots = task_slots(spark, config.spark.task_cpus)
        with input_errors(config.input, files_under=True):
            prep = prepare(spark, selected, config, art.row_versions, cache_versions,
                           input_rows, slots, persisted)
        clock.stop()
        linked = compute_forms(prep, spec, stage_seconds, clock, persisted)
        _log_counts(run_id, prep, linked)
        in_context = link_in_context(prep, linked, spec, config, slots, stage_seconds, clock,
                                     persisted)

        clock.start("write")
        few = prep.counts.get("cache_hits", 0) + linked.n_computed + in_context.counts["lists"]
        out = assemble_output(prep.validated, linked.results, config, art.row_versions,
                              run_id, run_ts, config.spark.dedupe_surface_forms
                              and few <= config.spark.broadcast_result_forms,
                              in_context.results)
        written = write_assignments(spark, out, prep.counts["invalid"] + prep.to_link, config,
                                    prep.new_keys_at)
        clock.stop()
        form_cache = learn_forms(spark, config, prep, linked, cache_versions, run_id, run_ts,
                                 clock)
    finally:
        clock.stop()
        persisted.release()
    clock.seconds["total"] = time.perf_counter() - t_start
    summary = _summary(run_id, run_ts, config, art, cache_versions, prep, linked, written,
                       form_cache, clock.seconds, stage_seconds, in_context)
    log.info("link job %s done: %s rows written (table version %s), status counts %s, "
             "%.1f s", run_id, summary.rows_written, summary.table_version,
             summary.counts_by_status, clock.seconds["total"])
    return summary


def learn_forms(spark: SparkSession, config: JobConfig, prep: Prepared, linked: Linked,
                cache_versions: dict[str, str], run_id: str, run_ts: datetime,
                clock: StageClock) -> dict[str, Any]:
    """Add the forms this run computed to the form cache (after the table is committed):
    the summary's ``form_cache`` entry (path, hits, added, or the error of a failed write)."""
    cache_table = config.output.form_cache
    form_cache: dict[str, Any] = {"table": str(cache_table) if cache_table else None,
                                  "hits": prep.counts.get("cache_hits", 0), "added": 0}
    if cache_table is not None and linked.computed is not None and linked.n_computed:
        clock.start("form_cache_write")
        # the computed forms missed the cache as read at prep.cache_at
        form_cache.update(update_form_cache(
            spark, cache_rows(linked.computed, cache_versions, run_id, run_ts),
            linked.n_computed, config, prep.cache_at, run_id))
        clock.stop()
    return form_cache


def _log_counts(run_id: str, prep: Prepared, linked: Linked) -> None:
    """One INFO line of the run's mention and form counts."""
    c = prep.counts
    log.info("link job %s: %d mentions, %d invalid, %d skipped (already linked), %d "
             "invalid as before, %d to link: %d surface forms from the form cache, %d "
             "computed", run_id, c["mentions"], c["invalid"], c["skipped"],
             c["unchanged_invalid"], prep.to_link, c.get("cache_hits", 0), linked.n_computed)


def link_mentions(mentions: DataFrame, config: JobConfig,
                  run_id: str | None = None) -> DataFrame:
    """The code assignments of ``mentions`` as a lazy DataFrame, nothing written: the rows
    :func:`run_link_job` would MERGE into the table (same schema, same row rules, same
    linking), for every mention of the input; the output table and the form cache are not
    read. ``mentions`` has the input's columns (``config.input``'s mapping applies).

    The artifacts are resolved and shipped on the call (the driver's only work); the models
    run when an action asks for rows, e.g. ``link_mentions(df, config).limit(20).show()`` in
    a notebook, or a write of the caller's own. With a context stage (``context.reranker``
    and ``input.context_column``) the forms' results are cached by the first action.
    """
    spark = mentions.sparkSession
    run_id = run_id or uuid.uuid4().hex
    check_context_input(config)
    art = resolve_artifacts(config)
    spec = linker_spec(spark, config, art)
    selected = select_mentions(mentions, config.input, config.output.store_text)
    validated = validate_mentions(selected, config.linking.max_text_length)
    forms = surface_forms(validated.filter(validated["reason"].isNull()),
                          config.spark.dedupe_surface_forms, config.spark.shuffle_partitions)
    results = link_forms(forms, spec)
    in_context = None
    if spec.context_version:
        # the forms' results feed the gate and the rows: cached on first use, not linked twice
        results = results.cache()
        lists = context_lists(gate_context(validated, results, spec, config),
                              config.spark.shuffle_partitions)
        in_context = context_stage(lists, spec)
    return assemble_output(validated, results, config, art.row_versions, run_id,
                           datetime.now(timezone.utc), context_results=in_context)
