"""The Spark batch job: mentions (Parquet, Delta or gold TSVs) -> code assignments (Delta).

:func:`run_link_job` is the whole job; the CLI, ``jobs/link_mentions.py`` and the notebooks
call it with a SparkSession they built. Steps, each a DataFrame -> DataFrame function:

1. :func:`read_mentions` + :func:`select_mentions`: read the input and map its columns to the
   canonical names (config.input). A missing column fails here, before anything is computed.
2. :func:`resolve_artifacts` (driver, no Spark): the encoder (the base encoder is built when
   missing and ``build_missing``), the index (built from ``terminology`` when missing), the
   index manifest checked against the encoder's fingerprint (EncoderMismatchError names
   both), the re-ranker, the ranker (trained on the driver when ``ranker.path`` holds none
   and ``build_missing``, :func:`ensure_ranker`; checked against the encoder, re-ranker and
   retrievers, :func:`check_ranker`), and the versions (hashes) written into every row.
3. :func:`identify_mentions`: one row per distinct mention_id (duplicate and null ids).
4. incremental (``output.incremental``, :func:`mark_linked`): drop mentions the table already
   holds as final (``linker.FINAL_STATUSES``: linked, needs_review, no_candidate) with the
   same model, index, re-ranker and ranker versions and the same text (a table written
   before a version column existed holds none such: its rows are linked again); then
   :func:`check_mentions` normalises the rest and gives invalid rows their reasons (an
   invalid row the table holds with the same text, versions and reason is left alone too).
5. de-duplicate surface forms (``spark.dedupe_surface_forms``); with a form cache
   (``output.form_cache_path``) take the forms already linked with the same versions and
   settings from it (:func:`split_by_cache`). Steps 3-5 are the stage ``prepare``: one Spark
   action, two for a large input with a form cache (:func:`prepare_in_spark`; the counts come
   from unions of :func:`tally` rows),
   or for an input of at most ``spark.driver_prepare_rows`` rows the same work on the driver
   (:mod:`clinlinker_spark.spark.driver_prepare`), Spark only scanning the table and the
   cache. Then retrieve candidates for the other forms
   (:func:`~clinlinker_spark.spark.udfs.make_retrieve_fn`), re-rank when a re-ranker is set;
   the last of these stages ranks them (the ranker's order and confidence) and gives the
   outcome (status ``needs_review`` below ``linking.review_below``).
6. join the results back to every mention, add lineage, MERGE into the Delta table on
   mention_id (:mod:`clinlinker_spark.spark.writer`); then MERGE the newly computed forms
   into the form cache.

Row rules (every distinct mention_id gets exactly one output row):

- duplicate mention_id: all rows sharing an id become ONE row with status invalid_input and
  reason ``"duplicate mention_id (N rows)"``; the row kept for doc_id/span/text is the first
  by (doc_id, start, end, text_sha256). Linking one of them would silently pick a winner.
- null or blank mention_id: the row cannot be a MERGE key, so it gets the synthetic id
  ``"null:" + sha256`` of its (doc_id, start, end, text) as JSON, status invalid_input and
  reason ``"null mention_id"`` (identical such rows collapse into one, with ``(N rows)``).
  The id is deterministic, so a rerun replaces these rows instead of adding new ones.
- null, empty/whitespace-only or over-long text (``linking.max_text_length`` characters):
  status invalid_input with ``linker.invalid_reason``'s reason.

Nothing but ids and counts is logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from clinlinker_spark.config import GOLD_FORMATS, EncoderConfig, InputConfig, JobConfig, to_dict
from clinlinker_spark.errors import ArtifactError, ConfigError, InputDataError
from clinlinker_spark.linker import FINAL_STATUSES, STATUS_INVALID, STATUSES
from clinlinker_spark.spark import schemas
from clinlinker_spark.spark.schemas import (
    CACHE_KEY_COLUMN,
    CACHE_OUTCOME_COLUMNS,
    LINK_KEY_COLUMN,
    OUTCOME_COLUMNS,
    TEXT_NORM_COLUMN,
    VERSION_COLUMNS,
)

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    from pyspark.sql import Column, DataFrame, SparkSession

    from clinlinker_spark.spark.udfs import LinkerSpec

log = logging.getLogger(__name__)

# the error of a row to link without a result in assemble_output (a broken invariant)
NO_RESULT = "a mention to link has no result"
# an input of at most this many mentions is broadcast when matched against the output table
BROADCAST_INPUT_ROWS = 200_000
# with de-duplication, the results of at most this many surface forms (~2 KB each with 25
# candidates) are broadcast to the mentions that carry them, instead of shuffling and sorting
# both sides of the join (100k mentions of 13k forms)
BROADCAST_RESULT_FORMS = 50_000
# forms left to compute after the form cache are split into tasks of at least this many
MIN_FORMS_PER_TASK = 64
# ... and when there are at most this many per task slot, into one task per slot (one wave)
ONE_WAVE_FORMS_PER_SLOT = 1024
# the Python normaliser gets tasks of at least this many input rows (each task costs a
# Python worker hand-off, ~0.1 s on a small machine, about what normalising 50k rows costs)
ROWS_PER_PREPARE_TASK = 50_000
# ... unless the rows fit one such task per slot: then one task per slot (one wave), of at
# least this many rows (10k rows in one task: 0.33 s; a slot idles meanwhile)
MIN_ROWS_PER_PREPARE_TASK = 2_500
GOLD_RENAMES = {"code": "gold_code", "codes": "gold_codes"}


# --------------------------------------------------------------------------------------------
# Input


def _quoted(name: str) -> str:
    """A column name as Spark parses it (dots and backticks taken literally)."""
    return "`" + name.replace("`", "``") + "`"


def _col(name: str) -> Column:
    from pyspark.sql import functions as F

    return F.col(_quoted(name))


def read_mentions(spark: SparkSession, cfg: InputConfig) -> DataFrame:
    """Read the input named by ``cfg`` (lazily for Parquet and Delta).

    Gold TSV formats (distemist | medprocner | codiesp; a file or a folder) are read by
    :func:`clinlinker_spark.corpora.read_gold` on the driver; their gold ``code``/``codes``
    columns are renamed ``gold_code``/``gold_codes`` so they can be passed through without
    clashing with the predicted code.
    """
    if not cfg.path:
        raise ConfigError("input.path is empty: set it to the mentions to link")
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

        table = read_gold(cfg.path, cfg.format).rename(columns=GOLD_RENAMES)
        log.info("read %d gold mentions (%s)", len(table), cfg.format)
        return spark.createDataFrame(table)
    raise ConfigError(f"input.format {cfg.format!r} is not supported")


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
    if missing:
        raise InputDataError(
            f"input {cfg.path} is missing required column(s) {', '.join(missing)}; "
            f"its columns are {present}"
        )
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
            columns.append(_col(src).try_cast(dtype).alias(name))
        else:
            columns.append(_col(src).cast(dtype).alias(name))
    columns += [_col(c).alias(c) for c in cfg.passthrough_columns]
    return df.select(*columns)


# --------------------------------------------------------------------------------------------
# Artifacts


@dataclass(frozen=True)
class ResolvedArtifacts:
    """Absolute artifact paths and their versions, fixed on the driver before Spark work."""

    encoder_path: str
    index_path: str
    reranker_path: str
    ranker_path: str
    model_version: str
    index_version: str
    reranker_version: str
    ranker_version: str
    index_manifest: dict[str, Any]

    @property
    def versions(self) -> dict[str, str]:
        """The lineage versions, as ``Linker.versions`` gives them ("" = none)."""
        return {"model_version": self.model_version, "index_version": self.index_version,
                "reranker_version": self.reranker_version,
                "ranker_version": self.ranker_version}


# Encoder fingerprints this driver process computed, by _encoder_key: a later job in the same
# process (a notebook, the benchmark, a driver that runs several jobs) does not load the model
# again just to fingerprint it. Executors still check the model hash they load.
_FINGERPRINTS: dict[str, dict[str, Any]] = {}
_FINGERPRINTS_LOCK = threading.Lock()


def _encoder_key(config: EncoderConfig) -> str | None:
    """The encoder config plus (name, size, mtime) of its directory's files; None if unreadable."""
    try:
        path = Path(config.path).resolve()
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                       for f in path.iterdir() if f.is_file())
    except OSError:
        return None
    return json.dumps([str(path), to_dict(config), files], sort_keys=True)


def resolve_artifacts(config: JobConfig) -> ResolvedArtifacts:
    """Find (or build, with ``build_missing``) the encoder, index and ranker; check they match.

    The encoder is loaded on the driver (CPU unless configured otherwise) for its fingerprint,
    once per process and unchanged encoder directory; the index is not loaded, only its
    manifest is read. The ranker is trained when missing (:func:`ensure_ranker`) and checked
    against the encoder, re-ranker and retrievers (:func:`check_ranker`). Raises
    EncoderMismatchError when the index was built with another encoder, ConfigError for a
    ranker the job cannot use, ArtifactError/ModelLoadError when something is missing.
    """
    from clinlinker_spark.index import MANIFEST_FILE, check_encoder, ensure_index, read_manifest
    from clinlinker_spark.modeling import check_model_dir, model_hash

    if config.context.reranker:
        raise ConfigError("context.reranker is set, but the Spark job links from the mention "
                          "text alone: the context stage runs in the core Linker and in "
                          "clinlinker evaluate; leave context empty for the job")
    encoder_path = Path(config.encoder.path)
    if config.build_missing and not (encoder_path / "config.json").is_file():
        from clinlinker_spark.base_encoder import ensure_base_encoder

        ensure_base_encoder(encoder_path)
    key = _encoder_key(config.encoder)
    with _FINGERPRINTS_LOCK:
        fingerprint = _FINGERPRINTS.get(key) if key is not None else None
    if fingerprint is not None and (Path(config.index.path) / MANIFEST_FILE).is_file():
        index_path = Path(config.index.path)
    else:
        from clinlinker_spark.encoder import BiEncoder

        driver_device = "auto" if config.encoder.device == "cuda" else config.encoder.device
        encoder = BiEncoder.from_config(dataclasses.replace(config.encoder,
                                                            device=driver_device))
        index_path = ensure_index(config, encoder)
        fingerprint = encoder.fingerprint()
        del encoder
        if key is not None:
            with _FINGERPRINTS_LOCK:
                _FINGERPRINTS[key] = fingerprint
    manifest = read_manifest(index_path)
    check_encoder(manifest, fingerprint, index_path)
    reranker_path = ""
    reranker_version = ""
    if config.reranker.path:
        reranker_path = str(check_model_dir(config.reranker.path).resolve())
        reranker_version = model_hash(reranker_path)
    ranker_path = ""
    ranker_version = ""
    ranker_dir = ensure_ranker(config)
    if ranker_dir is not None:
        from clinlinker_spark.ranker import ranker_hash

        ranker_path = str(ranker_dir.resolve())
        ranker_version = ranker_hash(Path(ranker_path))
        check_ranker(ranker_path, config, str(fingerprint["model_hash"]),
                     str(manifest["content_hash"]))
    resolved = ResolvedArtifacts(
        encoder_path=str(encoder_path.resolve()),
        index_path=str(Path(index_path).resolve()),
        reranker_path=reranker_path,
        ranker_path=ranker_path,
        model_version=str(fingerprint["model_hash"]),
        index_version=str(manifest["content_hash"]),
        reranker_version=reranker_version,
        ranker_version=ranker_version,
        index_manifest=manifest,
    )
    # linking.reuse_index_vectors needs the precision the terms were embedded in: an index
    # built before it was recorded encodes every form (rebuild it to reuse term vectors)
    built_in = manifest.get("build", {}).get("precision") or "not recorded"
    log.info("artifacts: model %s, index %s (%s rows, %s, recall@k %s, vectors computed in "
             "%s), re-ranker %s, ranker %s", resolved.model_version[:12],
             resolved.index_version[:12], manifest.get("terminology", {}).get("rows", "?"),
             manifest.get("index", {}).get("type", "?"), index_recall(manifest) or "not measured",
             built_in, resolved.reranker_version[:12] or "none",
             resolved.ranker_version[:12] or "none")
    return resolved


def ensure_ranker(config: JobConfig) -> Path | None:
    """``config.ranker.path`` (None when no ranker is configured), trained on the driver first
    when it holds no ranker and ``build_missing`` is true (as ``index.ensure_index`` builds a
    missing index): ``training.ranker.train_ranker`` with the job's encoder, index,
    terminology, re-ranker and linking settings. Without ``build_missing`` a missing ranker is
    an ArtifactError."""
    from clinlinker_spark.ranker import RANKER_FILE

    if not config.ranker.path:
        return None
    path = Path(config.ranker.path)
    if (path / RANKER_FILE).is_file():
        return path
    if not config.build_missing:
        raise ArtifactError(f"no ranker at {path} (no {RANKER_FILE}): set build_missing: true "
                            "to train it, or run clinlinker train-ranker")
    from clinlinker_spark.training.ranker import train_ranker

    started = time.perf_counter()
    log.info("ranker missing: training it on the driver (%d terminology source(s), %d folds)",
             len(config.terminology.sources), config.ranker.folds)
    # the driver's device, as for the encoder's fingerprint (a GPU may be the executors' only)
    driver_device = "auto" if config.encoder.device == "cuda" else config.encoder.device
    spec = train_ranker(dataclasses.replace(config, encoder=dataclasses.replace(
        config.encoder, device=driver_device)), path)
    metrics = spec["metrics"]
    log.info("ranker trained: %d training mentions, %d candidates, %.1f s",
             metrics["mentions"], metrics["candidates"], time.perf_counter() - started)
    return path


def check_ranker(path: str, config: JobConfig, model_version: str,
                 index_version: str) -> None:
    """Refuse, before any Spark work, a ranker the executors' Linker would refuse
    (``Ranker.check_compatible``: trained with another bi-encoder, with or without a
    re-ranker unlike the job, with other retrievers; it warns for another index). The check
    reads only these attributes of a Linker, so it gets them without loading any model."""
    from types import SimpleNamespace

    from clinlinker_spark.ranker import Ranker

    job = SimpleNamespace(encoder=SimpleNamespace(model_hash=model_version),
                          index=SimpleNamespace(content_hash=index_version),
                          reranker=config.reranker.path or None, linking=config.linking)
    Ranker.load(path).check_compatible(job)  # type: ignore[arg-type]


def index_recall(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The index's recall@k against exact search as measured when it was built
    (``index.recall_mentions``): k, recall, the queries; None when it was not measured."""
    block = manifest.get("recall")
    if not block:
        return None
    return {"k": block["k"], "recall": block["recall"], "queries": block["queries"]}


def linker_spec(spark: SparkSession, config: JobConfig, art: ResolvedArtifacts) -> LinkerSpec:
    """The plain values the UDFs capture; ships the artifacts when ``spark.ship_artifacts``."""
    from clinlinker_spark.spark.session import is_local_master
    from clinlinker_spark.spark.udfs import ArtifactRef, LinkerSpec, ship_artifact

    try:
        sc = spark.sparkContext
        master = sc.master
    except Exception:  # noqa: BLE001 - Spark Connect (Databricks shared clusters): no context
        sc, master = None, ""
    if config.spark.ship_artifacts and sc is None:
        raise ConfigError(
            "spark.ship_artifacts needs a classic Spark session (SparkContext.addFile); on "
            "Spark Connect put the artifacts on storage every executor reads (e.g. Unity "
            "Catalog volumes) and set spark.ship_artifacts: false"
        )

    def ref(path: str, version: str) -> ArtifactRef:
        if sc is not None and config.spark.ship_artifacts:
            return ArtifactRef(path=path, spark_file=ship_artifact(sc, path, version))
        return ArtifactRef(path=path)

    return LinkerSpec(
        config=to_dict(config),
        encoder=ref(art.encoder_path, art.model_version),
        index=ref(art.index_path, art.index_version),
        reranker=ref(art.reranker_path, art.reranker_version) if art.reranker_path else None,
        ranker=ref(art.ranker_path, art.ranker_version) if art.ranker_path else None,
        model_version=art.model_version,
        index_version=art.index_version,
        reranker_version=art.reranker_version,
        ranker_version=art.ranker_version,
        mmap_index=config.spark.mmap_index,
        local_master=is_local_master(master),
    )


# --------------------------------------------------------------------------------------------
# Transforms


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


def _form_tasks(forms: int | None, partitions: int, slots: int | None) -> int:
    """Tasks for ``forms`` surface forms left to compute (None: unknown): at least
    MIN_FORMS_PER_TASK forms each, at most ``partitions``, one per slot while they fit one
    wave of ONE_WAVE_FORMS_PER_SLOT per slot. A night's few hundred forms in more tasks than
    slots run in two waves, each task paying its Python hand-off: 275 forms on 2 slots,
    embed + search 1.8 s in 4 tasks, 1.35 s in 2."""
    cap = _one_wave_cap(forms, ONE_WAVE_FORMS_PER_SLOT, partitions, slots)
    return _tasks(forms, MIN_FORMS_PER_TASK, cap or partitions)


def _prepare_tasks(rows: int | None, partitions: int, slots: int | None) -> int:
    """Tasks of the Python normaliser for ``rows`` input rows: one per slot (at least
    MIN_ROWS_PER_PREPARE_TASK rows each) while they fit one wave of ROWS_PER_PREPARE_TASK per
    slot, else at least ROWS_PER_PREPARE_TASK rows each, at most ``partitions``."""
    cap = _one_wave_cap(rows, ROWS_PER_PREPARE_TASK, partitions, slots)
    if cap is not None:
        return _tasks(rows, MIN_ROWS_PER_PREPARE_TASK, cap)
    return _tasks(rows, ROWS_PER_PREPARE_TASK, partitions)


def _small_input(rows: int | None) -> bool:
    """Whether ``rows`` (a count; None = unknown) is small enough to broadcast."""
    return rows is not None and rows <= BROADCAST_INPUT_ROWS


# of the input rows sharing a mention_id, the first by these columns (nulls first) is kept
FIRST_ROW_ORDER = ("doc_id", "start", "end", "text_sha256")


def keyed_mentions(mentions: DataFrame) -> DataFrame:
    """The row-wise part of :func:`identify_mentions` (no shuffle): ``_null_id``, the
    synthetic id of a null or blank mention_id, and ``text_sha256``."""
    from pyspark.sql import functions as F

    blank_id = F.col("mention_id").isNull() | (F.trim(F.col("mention_id")) == "")
    synthetic = F.concat(
        F.lit("null:"),
        F.sha2(F.to_json(F.struct("doc_id", "start", "end", "text")), 256),
    )
    return (
        mentions
        .withColumn("_null_id", blank_id)
        .withColumn("mention_id", F.when(blank_id, synthetic).otherwise(F.col("mention_id")))
        .withColumn("text_sha256", F.sha2(F.col("text"), 256))
    )


def identify_mentions(mentions: DataFrame) -> DataFrame:
    """One row per distinct mention_id, with ``text_sha256`` and the helper columns ``_rows``
    (input rows sharing the id) and ``_null_id``; cheap (no Python), so that rows an
    incremental run skips never reach :func:`check_mentions`. See the module docstring for the
    duplicate and null-id rules."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    df = keyed_mentions(mentions)
    by_id = Window.partitionBy("mention_id")
    first = by_id.orderBy(*[F.col(c).asc_nulls_first() for c in FIRST_ROW_ORDER])
    return (
        df.withColumn("_rows", F.count(F.lit(1)).over(by_id))
        .withColumn("_rank", F.row_number().over(first))
        .filter(F.col("_rank") == 1)
        .drop("_rank")
    )


def check_mentions(identified: DataFrame, max_text_length: int) -> DataFrame:
    """:func:`identify_mentions` rows -> the same rows with ``text_norm`` and ``reason``
    (null for rows that can be linked; otherwise why not); ``text_norm`` is null for invalid
    rows. The helper columns are dropped."""
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.udfs import make_prepare_udf

    prepare = make_prepare_udf(max_text_length)
    df = identified.withColumn("_prep", prepare(F.col("text"), F.col("_rows"),
                                                F.col("_null_id")))
    return (
        df.withColumn("reason", F.col("_prep.reason"))
        .withColumn(TEXT_NORM_COLUMN, F.col(f"_prep.{TEXT_NORM_COLUMN}"))
        .drop("_prep", "_rows", "_null_id")
    )


def validate_mentions(mentions: DataFrame, max_text_length: int) -> DataFrame:
    """One row per distinct mention_id with ``text_sha256``, ``text_norm`` and ``reason``
    (:func:`identify_mentions` then :func:`check_mentions`)."""
    return check_mentions(identify_mentions(mentions), max_text_length)


def match_table(identified: DataFrame, keys: DataFrame,
                input_rows: int | None = None) -> DataFrame:
    """The table rows whose mention_id is in the input (:func:`identify_mentions` rows), as
    (mention_id, ``_skip``, ``_was_invalid``): ``_skip`` when the table holds the id as final
    with these versions and the same text, and the input has it on one row with a real id (a
    duplicated or null id must still reach the table as invalid_input); ``_was_invalid``: the
    reason the table gives for the same text as invalid_input with these versions (the job
    leaves the row alone when validation gives that reason again). ``keys``:
    :func:`table_keys`. The other matched ids are rows this run replaces.

    With ``input_rows`` (an upper bound of the rows of ``identified``, e.g. the input's row
    count) at most BROADCAST_INPUT_ROWS, the input's
    keys are broadcast to the table scan instead of shuffling the whole table (a nightly
    extract against a large table). The table holds each mention_id once, so each matched id
    comes once."""
    from pyspark.sql import functions as F

    inputs = identified.select("mention_id", F.col("text_sha256").alias("_in_sha"),
                               _single_id().alias("_single"))
    if _small_input(input_rows):
        inputs = F.broadcast(inputs)
    matched = keys.join(inputs, "mention_id", "inner")
    return matched.select("mention_id", *_marks(F.col("_single"), F.col("_in_sha"),
                                                F.col("text_sha256")))


def _single_id() -> Column:
    """An :func:`identify_mentions` row that came from one input row with a real id."""
    from pyspark.sql import functions as F

    return (F.col("_rows") == 1) & ~F.col("_null_id")


def _marks(single: Column, input_sha: Column, table_sha: Column) -> list[Column]:
    """``_skip`` and ``_was_invalid`` (see :func:`match_table`) of an input row joined with
    its :func:`table_keys` row."""
    from pyspark.sql import functions as F

    same_text = table_sha.eqNullSafe(input_sha)  # a null text has a null hash
    skip = F.col("_done") & single & same_text
    return [F.coalesce(skip, F.lit(False)).alias("_skip"),
            F.when(same_text, F.col("_invalid_reason")).alias("_was_invalid")]


def mark_linked(identified: DataFrame, keys: DataFrame,
                input_rows: int | None = None) -> DataFrame:
    """:func:`identify_mentions` rows with ``_in_table`` (the table holds the id) and ``_skip``
    (:func:`match_table`'s mark: the id is linked already; the run leaves it out), both never
    null, and :func:`match_table`'s ``_was_invalid``. ``input_rows``: an upper bound of the
    rows (None: unknown); small inputs are broadcast both ways (their keys to the table scan,
    the matched ids back), larger ones meet the table in one left join."""
    from pyspark.sql import functions as F

    if _small_input(input_rows):
        matched = match_table(identified, keys, input_rows).withColumn("_in_table", F.lit(True))
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


def table_keys(existing: DataFrame | None, versions: dict[str, str]) -> DataFrame | None:
    """(mention_id, text_sha256, ``_done``, ``_invalid_reason``) of every output table row;
    ``_done``: final with these versions; ``_invalid_reason``: the reason of an invalid_input
    row with these versions (else null). None without a table or when it lacks the
    columns."""
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
    return existing.select(
        "mention_id", "text_sha256", F.coalesce(done, F.lit(False)).alias("_done"),
        F.when((F.col("status") == STATUS_INVALID) & same_versions, reason)
        .alias("_invalid_reason"))


def surface_forms(to_link: DataFrame, dedupe: bool, partitions: int | None) -> DataFrame:
    """The rows the UDFs see: (link_key, text_norm), one per distinct text when ``dedupe``.

    Either way they come in ``partitions`` partitions (None: as they come, for a caller that
    repartitions them later). After ``distinct()``, adaptive query
    execution would size partitions by bytes (1 MB at least), not by model work: the distinct
    forms of a small input land in one partition and the UDF runs as one task on one core.
    """
    from pyspark.sql import functions as F

    if dedupe:
        forms = (to_link.select(TEXT_NORM_COLUMN).distinct()
                 .withColumn(LINK_KEY_COLUMN, F.col(TEXT_NORM_COLUMN))
                 .select(LINK_KEY_COLUMN, TEXT_NORM_COLUMN))
    else:
        forms = to_link.select(F.col("mention_id").alias(LINK_KEY_COLUMN), TEXT_NORM_COLUMN)
    return forms if partitions is None else forms.repartition(partitions)


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
    """The form cache's key and outcome columns; None without a cache, or when it lacks
    them (warning: a damaged cache costs time, never wrong rows)."""
    if cache is None:
        return None
    from pyspark.sql import functions as F

    needed = {CACHE_KEY_COLUMN, *CACHE_OUTCOME_COLUMNS}
    if not needed.issubset(cache.columns):
        log.warning("form cache lacks columns %s: not used in this run",
                    sorted(needed - set(cache.columns)))
        return None
    # the stage struct's fields by name: a cache whose struct gained fields keeps its older
    # fields first (the writer appends new ones)
    fields = schemas.STAGE_CANDIDATE_STRUCT.names
    candidates = F.transform(F.col("candidates"), lambda c: F.struct(
        *[c[f].alias(f) for f in fields])).cast(schemas.STAGE_CANDIDATES_TYPE)
    return cache.select(CACHE_KEY_COLUMN, *OUTCOME_COLUMNS, candidates.alias("candidates"))


def split_by_cache(forms: DataFrame, cache: DataFrame | None, versions: dict[str, str],
                   persist: Callable[[DataFrame], DataFrame] = lambda df: df,
                   max_forms: int | None = None,
                   ) -> tuple[DataFrame | None, DataFrame, DataFrame | None]:
    """(results of the forms the cache holds, in STAGE_SCHEMA; the forms it does not hold; a
    :func:`tally` of ``forms`` and ``cache_hits``), all lazy; (None, forms, None) without a
    usable cache.

    ``max_forms`` (an upper bound of the forms' count, e.g. the input's rows) at most
    BROADCAST_INPUT_ROWS: the forms are broadcast to a scan of the cache (inner join: the
    cache, which grows every night, is never shuffled nor broadcast), and the forms it lacks
    are the others. Otherwise one left join of the forms with the cache. Either way
    ``persist`` keeps the joined rows, so that the parts and the tally read them once.
    ``versions`` has VERSION_COLUMNS. A cache table without the expected columns is not used
    (warning), so a damaged cache costs time, never wrong rows.
    """
    from pyspark.sql import functions as F

    cache = usable_cache(cache)
    if cache is None:
        return None, forms, None
    keyed = forms.withColumn(CACHE_KEY_COLUMN, cache_key(versions))
    if _small_input(max_forms):
        keyed = persist(keyed)
        found = persist(cache.join(F.broadcast(keyed), CACHE_KEY_COLUMN, "inner"))
        missing = keyed.join(F.broadcast(found.select(CACHE_KEY_COLUMN)), CACHE_KEY_COLUMN,
                             "left_anti")
        counts = tally(keyed, forms=F.lit(True)).unionByName(
            tally(found, cache_hits=F.lit(True)))
        hits = found.select(*schemas.STAGE_SCHEMA.fieldNames())
        return hits, missing.select(LINK_KEY_COLUMN, TEXT_NORM_COLUMN), counts
    joined = persist(keyed.join(cache.withColumn("_hit", F.lit(True)), CACHE_KEY_COLUMN,
                                "left"))
    counts = tally(joined, forms=F.lit(True), cache_hits=F.col("_hit").isNotNull())
    hits = joined.filter(F.col("_hit")).select(*schemas.STAGE_SCHEMA.fieldNames())
    misses = joined.filter(F.col("_hit").isNull()).select(LINK_KEY_COLUMN, TEXT_NORM_COLUMN)
    return hits, misses, counts


@dataclass
class Prepared:
    """What the prepare stage hands the linking stages. ``validated``: one row per mention
    the run writes (:func:`check_mentions` columns; ``reason`` set for invalid rows);
    ``forms``: the (link_key, text_norm) rows the UDFs
    compute (the form cache's hits left out), partitioned for them; ``hits``: the cache's
    results (STAGE_SCHEMA) or None; ``counts``: mentions, in_table, skipped, invalid,
    unchanged_invalid, and with a form cache forms and cache_hits; ``table_at``/``cache_at``:
    the versions of the table and cache searched (None: not searched); ``on_driver``: which
    path prepared them; ``validated_rows``: the driver's path also gives ``validated``'s rows
    as Arrow (the Spark path: None)."""

    validated: DataFrame
    forms: DataFrame
    hits: DataFrame | None
    counts: dict[str, int]
    table_at: int | None
    cache_at: int | None
    on_driver: bool
    validated_rows: pa.Table | None = None


def prepares_on_driver(selected: DataFrame, input_rows: int | None, most_rows: int) -> bool:
    """Whether an input of ``input_rows`` rows (an upper bound) is prepared on the driver
    (:mod:`clinlinker_spark.spark.driver_prepare`): at most ``most_rows`` rows
    (``spark.driver_prepare_rows``), and only column types that go through Arrow and back
    unchanged."""
    from clinlinker_spark.spark.writer import plain_arrow_type

    if most_rows == 0 or input_rows is None or input_rows > most_rows:  # 0: never
        return False
    return plain_arrow_type(selected.schema)


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


def prepare_in_spark(spark: SparkSession, selected: DataFrame, config: JobConfig,
                     versions: dict[str, str], cache_versions: dict[str, str],
                     input_rows: int, slots: int | None,
                     persist: Callable[[DataFrame], DataFrame]) -> Prepared:
    """The prepare stage in one Spark action (two for an input over BROADCAST_INPUT_ROWS rows
    with a form cache, whose rows to link are counted before the cache is searched): the
    counts come from unions of :func:`tally` rows (``persist`` keeps the frames they and the
    later stages share).
    ``input_rows``: the exact row count of ``selected`` (:func:`remaining_counts`). Of the
    input's rows only those that go on after the skip are kept: a whole history whose rows
    are mostly linked already is shuffled and joined once, never cached."""
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.writer import read_delta_snapshot

    partitions = config.spark.shuffle_partitions
    cache_path = config.output.form_cache_path
    identified = identify_mentions(selected)
    marked = None
    table_at: int | None = None
    if config.output.incremental:
        table, table_at = read_delta_snapshot(spark, config.output.path)
        keys = table_keys(table, versions)
        if keys is not None:
            marked = mark_linked(identified, keys, input_rows)
    if marked is None:
        table_at = None  # the table was not searched
        marked = (identified.withColumn("_in_table", F.lit(False))
                  .withColumn("_skip", F.lit(False))
                  .withColumn("_was_invalid", F.lit(None).cast("string")))
    # only the rows that go on are kept (persisted below), not every input row: the counts
    # over all of them follow from these rows and the input's row count (remaining_counts)
    remaining = (marked.filter(~F.col("_skip")).drop("_skip")
                 .withColumn("_merged", F.col("_rows") - 1))
    # the Python normaliser in tasks of at least ROWS_PER_PREPARE_TASK rows: a small
    # night's few thousand rows cost one task's start, not one per shuffle partition
    remaining = remaining.coalesce(_prepare_tasks(input_rows, partitions, slots))
    # an invalid row the table holds with the same text, versions and reason is left
    # alone (rewriting a table file for it would change nothing)
    checked = persist(
        check_mentions(remaining, config.linking.max_text_length)
        .withColumn("_unchanged", F.coalesce(F.col("reason") == F.col("_was_invalid"),
                                             F.lit(False)))
        .drop("_was_invalid"))
    validated = checked.filter(~F.col("_unchanged")).drop("_unchanged", "_in_table", "_merged")
    to_link = validated.filter(F.col("reason").isNull())
    tallies = [tally(checked, sums={"_merged": F.col("_merged")},
                     _remaining=F.lit(True), _remaining_in_table=F.col("_in_table"),
                     invalid=F.col("reason").isNotNull() & ~F.col("_unchanged"),
                     unchanged_invalid=F.col("_unchanged"))]

    # a large input's rows to link are counted first (a second action): most rows of a
    # whole history are skipped, and their few forms are then looked up in a scan of the
    # cache (split_by_cache's small path) instead of a join that broadcasts or shuffles the
    # whole cache, which grows every night (1M-row history, 50k rows to link, a 20k-form
    # cache: the same prepare time either way, 4.2 s)
    first: dict[str, int] = {}
    max_forms = input_rows
    if cache_path and not _small_input(input_rows):
        first = collect_tallies(tallies)
        tallies = []
        max_forms = first["_remaining"] - first["invalid"] - first["unchanged_invalid"]
    # with a cache the forms left to compute are repartitioned after the split
    forms = surface_forms(to_link, config.spark.dedupe_surface_forms,
                          None if cache_path else partitions)
    hits: DataFrame | None = None
    cache_at: int | None = None
    if cache_path:
        cache, cache_at = read_delta_snapshot(spark, cache_path)
        hits, forms, cache_tally = split_by_cache(forms, cache, cache_versions, persist,
                                                  max_forms=max_forms)
        if cache_tally is None:
            cache_at = None  # not read: the forms were not checked against it
            forms = forms.repartition(partitions)
        else:
            tallies.append(cache_tally)
    counts = remaining_counts({**first, **collect_tallies(tallies)}, input_rows)
    if hits is not None:
        # the join's output is sized by bytes: spread the model work again, over tasks
        # of at least MIN_FORMS_PER_TASK forms (a small night's few hundred forms use
        # every core in one wave; a handful of forms, one task)
        n_misses = counts["forms"] - counts["cache_hits"]
        forms = forms.repartition(_form_tasks(n_misses, partitions, slots))
    return Prepared(validated, forms, hits, counts, table_at, cache_at, False)


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
    dedupe: bool,
    broadcast_results: bool = False,
) -> DataFrame:
    """One output row per ``validated`` row, with lineage, in the code-assignment schema's
    order: invalid rows as invalid_input, the others with the result of their form (or
    mention) from ``results``. ``broadcast_results``: the results are few enough to broadcast.

    One left join of every row with the results, not a union of the invalid and the linked
    rows: the writer coalesces its input into files by ranges of partitions, and a union puts
    the (few) invalid rows' partitions in one range and every linked row in the others. A row
    to link without a result (a broken invariant) fails the write instead of being dropped."""
    from pyspark.sql import functions as F

    passthrough = list(config.input.passthrough_columns)
    mention_cols = ["mention_id", "doc_id", "start", "end", "text", "text_sha256", "label",
                    *passthrough]
    outcome = list(OUTCOME_COLUMNS)
    valid = validated["reason"].isNull()
    mention = [validated[_quoted(c)] for c in mention_cols]
    no_result = F.raise_error(F.lit(NO_RESULT))
    if results is None:
        out = validated.select(
            *mention,
            F.when(valid, no_result).otherwise(F.lit(STATUS_INVALID)).alias("status"),
            validated["reason"],
            F.lit(None).cast("string").alias("code"),
            F.lit(None).cast("string").alias("term"),
            F.lit(None).cast("double").alias("score"),
            F.lit(None).cast("double").alias("confidence"),
            F.array().cast(schemas.CANDIDATES_TYPE).alias("candidates"),
        )
    else:
        key = TEXT_NORM_COLUMN if dedupe else "mention_id"
        res = results.select(
            F.col(LINK_KEY_COLUMN).alias("_key"),
            *[F.col(c).alias(f"_r_{c}") for c in outcome],
            table_candidates().alias("_r_candidates"),
        )
        if broadcast_results:
            res = F.broadcast(res)
        # an invalid row's text_norm is null (no match); without de-duplication only the
        # rows to link have results
        joined = validated.join(res, validated[key] == res["_key"], "left")
        missing = valid & res["_key"].isNull()
        out = joined.select(
            *mention,
            F.when(~valid, F.lit(STATUS_INVALID))
            .when(missing, no_result)
            .otherwise(res["_r_status"]).alias("status"),
            F.when(valid, res["_r_reason"]).otherwise(validated["reason"]).alias("reason"),
            *[F.when(valid, res[f"_r_{c}"]).alias(c) for c in outcome[2:]],
            F.when(valid, res["_r_candidates"])
            .otherwise(F.array().cast(schemas.CANDIDATES_TYPE)).alias("candidates"),
        )
    out = out.select(
        *out.columns,
        *[F.lit(v).alias(k) for k, v in versions.items()],
        F.lit(run_id).alias("run_id"),
        F.lit(run_ts).cast("timestamp").alias("run_ts"),
    )
    names = schemas.assignment_columns(config.output.store_text, passthrough)
    return out.select(*[_col(c) for c in names])


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
) -> dict[str, Any]:
    """Link the configured input and MERGE the code assignments into ``output.path``.

    ``mentions`` (optional) replaces reading ``config.input``: a DataFrame with the input's
    columns (the column mapping still applies). Returns a summary: run_id, table path,
    writer, table version, rows written/replaced, counts by status, how many mentions were
    skipped (incremental) and how many surface forms went through the UDFs, artifact versions,
    wall time per stage in seconds (``timings_s``: prepare, embed_search, rerank, write,
    form_cache_write, total) and the UDFs' seconds per linking stage (encode, search,
    candidates, rerank) summed over tasks (``udf_task_seconds``).

    The input is read twice: a row count first (from file footers for Parquet and Delta; a
    ``mentions`` DataFrame is evaluated for it), then the one pass of the prepare stage. Both
    must see the same rows: the Spark prepare derives the counts of mentions and skipped rows
    from the count (:func:`remaining_counts`), so pass a ``mentions`` DataFrame that gives the
    same rows each time it is evaluated (persist a sampled or otherwise nondeterministic one).
    """
    from pyspark import StorageLevel

    from clinlinker_spark.linker import VECTOR_COUNTS
    from clinlinker_spark.spark.session import task_slots
    from clinlinker_spark.spark.udfs import (
        make_rerank_fn,
        make_retrieve_fn,
        stage_seconds_accumulator,
    )
    from clinlinker_spark.spark.writer import merge_into_delta, writes_with_delta_spark

    run_id = run_id or uuid.uuid4().hex
    cache_path = config.output.form_cache_path
    if cache_path and not config.spark.dedupe_surface_forms:
        raise ConfigError("output.form_cache_path needs spark.dedupe_surface_forms: true (the "
                          "cache holds surface forms)")
    run_ts = datetime.now(timezone.utc)  # aware: Spark stores the instant, whatever the TZ
    clock = StageClock(spark, f"clinlinker link {run_id}")
    timings = clock.seconds
    t_start = time.perf_counter()
    log.info("link job %s: starting", run_id)

    # 1. input columns (schema only) -- fails before any work
    raw = mentions if mentions is not None else read_mentions(spark, config.input)
    selected = select_mentions(raw, config.input, config.output.store_text)
    # 2. artifacts (driver only) -- fails before any Spark job
    clock.start("artifacts")
    art = resolve_artifacts(config)
    spec = linker_spec(spark, config, art)
    clock.stop()

    cached: list[DataFrame] = []

    def persist(df: DataFrame) -> DataFrame:
        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        cached.append(df)
        return df

    try:
        # 3.-5. before any model work: one row per mention_id, one scan of the table for the
        # input's ids (which to skip, whether any other is in it), validation and
        # normalisation of the rest (the normaliser never sees mentions linked before), their
        # surface forms, and the split of those by the form cache
        clock.start("prepare")
        # an upper bound of every count below (identify only merges rows), to decide what is
        # small enough to broadcast or to prepare on the driver; Parquet answers it from its
        # file footers
        input_rows = selected.count()
        slots = task_slots(spark, config.spark.task_cpus)
        dedupe = config.spark.dedupe_surface_forms
        cache_versions = {**art.versions, "linking_version": linking_version(config)}
        if prepares_on_driver(selected, input_rows, config.spark.driver_prepare_rows):
            from clinlinker_spark.spark.driver_prepare import prepare_on_driver

            prepare = prepare_on_driver
        else:
            prepare = prepare_in_spark
        prep = prepare(spark, selected, config, art.versions, cache_versions, input_rows,
                       slots, persist)
        log.info("link job %s: input of at most %d rows prepared %s", run_id, input_rows,
                 "on the driver" if prep.on_driver else "by Spark")
        validated, forms, hits = prep.validated, prep.forms, prep.hits
        counts = prep.counts
        n_mentions, n_skipped = counts["mentions"], counts["skipped"]
        n_unchanged = counts["unchanged_invalid"]
        # no input id but those left alone is in the table: the MERGE can append
        new_keys_at = (prep.table_at if counts["in_table"] == n_skipped + n_unchanged
                       else None)
        n_invalid = counts["invalid"]
        n_to_link = n_mentions - n_skipped - n_unchanged - n_invalid
        n_cached = counts.get("cache_hits", 0)
        n_misses = counts["forms"] - n_cached if "forms" in counts else -1  # -1: unknown
        cache_at = prep.cache_at
        clock.stop()

        # 5. UDF stages over the surface forms the form cache does not hold
        results: DataFrame | None = None
        computed: DataFrame | None = None
        n_forms = 0
        stage_seconds = stage_seconds_accumulator(spark)
        if n_to_link:
            if n_misses != 0:
                clock.start("embed_search")
                computed = persist(forms.mapInArrow(make_retrieve_fn(spec, stage_seconds),
                                                    schemas.STAGE_SCHEMA))
                n_forms = computed.count()
                clock.stop()
                if spec.has_reranker and n_forms:
                    clock.start("rerank")
                    computed = persist(computed.mapInArrow(make_rerank_fn(spec, stage_seconds),
                                                           schemas.STAGE_SCHEMA))
                    computed.count()
                    clock.stop()
            if hits is None:
                results = computed
            else:
                results = hits if computed is None else hits.unionByName(computed)
        log.info("link job %s: %d mentions, %d invalid, %d skipped (already linked), %d "
                 "invalid as before, %d to link: %d surface forms from the form cache, %d "
                 "computed", run_id, n_mentions, n_invalid, n_skipped, n_unchanged, n_to_link,
                 n_cached, n_forms)

        # 6. join back + write
        clock.start("write")
        n_out = n_invalid + n_to_link
        # n_out bounds the rows: the writer sizes the files by it (one per ROWS_PER_FILE
        # rows) and collects a small night to the driver instead of a Spark write job
        few_results = n_cached + n_forms <= BROADCAST_RESULT_FORMS
        out = assemble_output(validated, results, config, art.versions, run_id, run_ts,
                              dedupe, dedupe and few_results)
        # prepared on the driver with few results (a de-duplicated run's forms): the driver
        # joins them to the rows it holds and the deltalake writer stages them with pyarrow
        arrow_rows = None
        if (n_out and prep.validated_rows is not None and few_results
                and not writes_with_delta_spark(spark, config.output.writer)):
            from clinlinker_spark.spark.driver_prepare import assemble_output_on_driver

            arrow_rows = assemble_output_on_driver(spark, out, prep.validated_rows, results,
                                                   art.versions, run_id, run_ts, dedupe)
        by_status = {s: 0 for s in STATUSES}
        if n_out:
            written = merge_into_delta(spark, out, config.output.path, key="mention_id",
                                       writer=config.output.writer, count_by="status",
                                       new_keys_at=new_keys_at, max_rows=n_out,
                                       arrow_rows=arrow_rows)
            by_status.update(written.counts)
            write_info = {"writer": written.writer, "table_version": written.table_version,
                          "rows_written": written.rows_written,
                          "rows_replaced": written.rows_replaced}
        else:  # nothing new: no commit, the table stays at its version
            write_info = {"writer": None, "table_version": _current_version(config.output.path),
                          "rows_written": 0, "rows_replaced": 0}
        clock.stop()

        # 7. the form cache learns the forms this run computed (after the table: a failure
        # here costs the next run time, never rows)
        cache_info: dict[str, Any] = {"path": cache_path or None, "hits": n_cached, "added": 0}
        if cache_path and computed is not None and n_forms:
            # the computed forms missed the cache as read at cache_at
            new_rows = cache_rows(computed, cache_versions, run_id, run_ts)
            clock.start("form_cache_write")
            cache_info.update(_update_form_cache(spark, new_rows, n_forms, config, cache_at,
                                                 run_id))
            clock.stop()
    finally:
        clock.stop()
        for df in cached:
            df.unpersist()
    timings["total"] = time.perf_counter() - t_start
    udf_totals = stage_seconds.value if stage_seconds is not None else {}
    summary: dict[str, Any] = {
        "run_id": run_id,
        "run_ts": run_ts.isoformat(),
        "table_path": config.output.path,
        **write_info,
        "mentions": n_mentions,
        "counts_by_status": by_status,
        "skipped_already_linked": n_skipped,
        # invalid_input rows the table holds with the same text, versions and reason
        "skipped_unchanged_invalid": n_unchanged,
        "to_link": n_to_link,
        "surface_forms": n_forms,  # computed by the UDFs (form cache hits not counted)
        "form_cache": cache_info,
        "dedupe_surface_forms": dedupe,
        "prepared_on": "driver" if prep.on_driver else "spark",
        # the index's recall@k against exact search, measured at build (None: not measured)
        "index_recall": index_recall(art.index_manifest),
        # where the output rows were joined with their results (assemble_output_on_driver)
        "output_assembled_on": "driver" if arrow_rows is not None else "spark",
        **art.versions,
        "linking_version": cache_versions["linking_version"],
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        # seconds per linking stage inside the UDFs, summed over tasks (not wall time)
        "udf_task_seconds": {k: round(v, 3) for k, v in udf_totals.items()
                             if k not in VECTOR_COUNTS},
        # forms embedded by the bi-encoder, and forms that took an index term's vector
        # (linking.reuse_index_vectors); summed over task attempts, so a retried task counts
        # twice (None: no accumulator, e.g. Spark Connect)
        "vectors": ({k: int(udf_totals.get(k, 0)) for k in VECTOR_COUNTS}
                    if stage_seconds is not None else None),
    }
    log.info("link job %s done: %s rows written (table version %s), status counts %s, "
             "%.1f s", run_id, write_info["rows_written"], write_info["table_version"],
             by_status, timings["total"])
    return summary


def _update_form_cache(spark: SparkSession, rows: DataFrame, n_rows: int, config: JobConfig,
                       cache_at: int | None, run_id: str) -> dict[str, Any]:
    """Append ``rows`` (``n_rows`` forms missing from the cache as read at ``cache_at``) to the
    form cache: {"added": rows} or, when the write fails, {"error": the exception's type}.
    Never raises for a failed write: the code assignments are committed without it."""
    from clinlinker_spark.spark.writer import merge_into_delta

    try:
        added = merge_into_delta(spark, rows, config.output.form_cache_path,
                                 key=CACHE_KEY_COLUMN, writer=config.output.writer,
                                 new_keys_at=cache_at, max_rows=n_rows)
        return {"added": added.rows_written}
    except Exception as exc:  # noqa: BLE001 - the assignments are already committed
        log.warning("link job %s: form cache %s not updated (%s: %s); the table is written, "
                    "the next run computes these forms again", run_id,
                    config.output.form_cache_path, type(exc).__name__, exc)
        return {"error": type(exc).__name__}


def _current_version(path: str) -> int | None:
    """The table's latest version (None when it does not exist or delta-rs cannot read it)."""
    from clinlinker_spark.spark.writer import table_version

    try:
        return table_version(path)
    except Exception:  # noqa: BLE001 - informational only (e.g. a path only Spark can read)
        return None


# --------------------------------------------------------------------------------------------
# Notebook widgets -> config overrides

WIDGET_KEYS = {
    "input_path": "input.path",
    "input_format": "input.format",
    "output_path": "output.path",
    "index_path": "index.path",
    "encoder_path": "encoder.path",
    "reranker_path": "reranker.path",
    "top_k": "linking.top_k",
    "incremental": "output.incremental",
    "store_text": "output.store_text",
}


def widget_overrides(values: dict[str, str]) -> list[str]:
    """``--set`` style overrides from notebook widget values (the notebooks' only mapping).

    Known widgets (:data:`WIDGET_KEYS`) map to one config key each and are skipped when empty;
    the free-form ``overrides`` widget holds further ``key=value`` items separated by newlines
    or semicolons. Later items win, as on the command line.
    """
    sets = [f"{key}={values[name]}" for name, key in WIDGET_KEYS.items()
            if str(values.get(name, "") or "").strip()]
    extra = str(values.get("overrides", "") or "")
    sets += [item.strip() for item in extra.replace(";", "\n").splitlines() if item.strip()]
    return sets
