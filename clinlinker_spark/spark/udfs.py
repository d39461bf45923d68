"""UDF factories: thin Spark wrappers over :class:`clinlinker_spark.linker.Linker`.

Pattern (STYLE.md 4): a factory captures only plain values, a :class:`LinkerSpec` (the job
config as a dict, where each artifact is found, the artifact hashes); the function it returns
runs on executors in the ``mapInArrow`` iterator form and gets its :class:`Linker` from a
module-level, per-Python-worker cache keyed by (index content hash, model hash, re-ranker
hash, ranker hash, config, device). With ``spark.python.worker.reuse`` (Spark's default) a
worker loads the models and the FAISS index once and keeps them for every later task and
stage of the job.

Artifacts reach executors once: either through ``SparkContext.addFile`` (``spark.ship_artifacts``,
the default; :func:`ship_artifact` on the driver, ``SparkFiles.get`` on the worker) or from a
path every executor can read (shared storage; the FAISS file can be memory-mapped with
``spark.mmap_index``). Nothing large is ever captured in a closure.

Stages:

- :func:`make_prepare_udf`: per row, the normalised text or the reason it cannot be linked
  (:func:`check_mentions_batch`; no model needed).
- :func:`make_retrieve_fn`: the retrievers (``Linker.retrieve``: bi-encoder embedding + FAISS
  search, and the lexical search with ``linking.retrievers: [dense, lexical]``).
- :func:`make_rerank_fn`: cross-encoder re-ranking (``Linker.rerank``); not used without one.

The last stage that runs (retrieval without a re-ranker, else re-rank) finalises: the ranker
orders the candidates and gives each form its confidence (``Linker.rank``, which cuts the
lists to ``linking.top_k``; without a ranker it only cuts them), then ``Linker.outcome`` gives
the status (``needs_review`` below ``linking.review_below``), code, score and confidence. A
retrieval stage followed by re-ranking passes every candidate of the retrievers on, uncut, as
``Linker.link`` does.

Devices and threads: a task that was given a GPU (``TaskContext.resources()["gpu"]``) runs on
that GPU with the configured precision ("auto": bf16 or fp16); otherwise on CPU. torch and
FAISS use ``TaskContext.cpus()`` threads (``spark.task.cpus``).

Stage timings: given a :func:`stage_seconds_accumulator`, the linking stages add the worker
Linker's seconds per stage (``Linker.take_stage_seconds``: encode, search, lexical,
candidates, rerank, rank) to it after every batch, so the driver can split the UDF time;
these are task seconds summed over tasks, not wall time. The same accumulator sums the
Linker's counts of texts encoded and of index vectors reused (``Linker.take_counts``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tarfile
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pandas as pd
import pyarrow as pa
from pyspark.accumulators import AccumulatorParam

from clinlinker_spark.errors import ArtifactError
from clinlinker_spark.spark.schemas import (
    ARROW_STAGE_SCHEMA,
    LINK_KEY_COLUMN,
    OUTCOME_COLUMNS,
    PREPARED_STRUCT,
    TEXT_NORM_COLUMN,
)

if TYPE_CHECKING:  # pragma: no cover
    from pyspark import Accumulator, SparkContext, TaskContext
    from pyspark.sql import SparkSession

    from clinlinker_spark.linker import Candidate, Linker

log = logging.getLogger(__name__)

# The config sections the models a Linker holds are loaded from, and the section it applies
# to them: another ``linking`` (top_k, search_k, reuse_index_vectors, ...) builds a Linker
# around the encoder, index, re-ranker and ranker the worker holds instead of loading them
# again.
MODEL_CONFIG_SECTIONS = ("encoder", "index", "reranker", "ranker", "context")
LINKING_SECTION = "linking"

ArrowFn = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]


class StageSecondsParam(AccumulatorParam):
    """Accumulates ``{stage: seconds}`` dicts key by key."""

    def zero(self, value: dict[str, float]) -> dict[str, float]:
        return {}

    def addInPlace(self, total: dict[str, float], more: dict[str, float]) -> dict[str, float]:
        for stage, seconds in more.items():
            total[stage] = total.get(stage, 0.0) + float(seconds)
        return total


def stage_seconds_accumulator(spark: SparkSession) -> Accumulator | None:
    """An accumulator of the linking stages' seconds; None where there is no SparkContext."""
    try:
        sc = spark.sparkContext
    except Exception:  # noqa: BLE001 - Spark Connect has no SparkContext (nor accumulators)
        return None
    return sc.accumulator({}, StageSecondsParam())


# --------------------------------------------------------------------------------------------
# Plain values captured by the UDFs


@dataclass(frozen=True)
class ArtifactRef:
    """Where a worker finds an artifact directory.

    ``spark_file``: the name it was shipped under with ``SparkContext.addFile`` (resolved with
    ``SparkFiles.get`` on the worker); otherwise ``path``, an absolute path every executor can
    read.
    """

    path: str
    spark_file: str = ""

    def local_path(self) -> str:
        if self.spark_file:
            from pyspark import SparkFiles

            return SparkFiles.get(self.spark_file)
        return self.path


@dataclass(frozen=True)
class LinkerSpec:
    """Everything a worker needs to build (or find in its cache) the job's Linker."""

    config: dict[str, Any]  # clinlinker_spark.config.to_dict(JobConfig)
    encoder: ArtifactRef
    index: ArtifactRef
    reranker: ArtifactRef | None
    ranker: ArtifactRef | None
    model_version: str
    index_version: str
    reranker_version: str
    ranker_version: str
    mmap_index: bool = False
    local_master: bool = True
    # the context stage's cross-encoder and ranker, and its version (None, "": no stage)
    context_reranker: ArtifactRef | None = None
    context_ranker: ArtifactRef | None = None
    context_version: str = ""

    @property
    def has_reranker(self) -> bool:
        return self.reranker is not None

    @property
    def versions(self) -> dict[str, str]:
        """The artifact hashes, as ``Linker.versions`` gives them."""
        return {"model_version": self.model_version, "index_version": self.index_version,
                "reranker_version": self.reranker_version,
                "ranker_version": self.ranker_version}

    def cache_key(self, device: str) -> tuple[tuple[str, ...], str]:
        """What makes two specs' Linkers the same: (what their loaded models are: artifact
        versions, the MODEL_CONFIG_SECTIONS, how the index is opened, the device; the
        LINKING_SECTION). Specs that differ only in the second share the models.

        Input, output and Spark settings change from run to run (another input path, another
        table) and must not make a worker load the models again.
        """
        models = {k: self.config.get(k) for k in MODEL_CONFIG_SECTIONS}
        return (
            (self.index_version, self.model_version, self.reranker_version,
             self.ranker_version, self.context_version,
             json.dumps(models, sort_keys=True, default=str),
             str(self.mmap_index), device),
            json.dumps(self.config.get(LINKING_SECTION), sort_keys=True, default=str),
        )


# --------------------------------------------------------------------------------------------
# Driver side: shipping artifact directories once

_SHIPPED: dict[tuple[str, str], tuple[str, str]] = {}  # (app id, name) -> (path, content hash)
_SHIP_LOCK = threading.Lock()


def ship_artifact(sc: SparkContext, path: str | Path, content_hash: str) -> str:
    """Make directory ``path`` available on every executor; return its ``SparkFiles`` name.

    Under a local master the directory is added with ``sc.addFile(path, recursive=True)``
    under its base name; on a cluster (YARN, Kubernetes, standalone, ``local-cluster``) Spark
    refuses local directories there, so it is added as a tar with ``sc.addArchive``.
    Spark cannot replace a name once added, so when that name is already taken in this
    application by another directory or by other content (an index rebuilt in place), a
    snapshot named ``<name>-<hash12>`` (hard links, or a copy across file systems) is added
    instead. Adding the same directory with the same content again is a no-op.
    """
    p = Path(path).resolve()
    app = sc.applicationId
    with _SHIP_LOCK:
        name = p.name
        taken = _SHIPPED.get((app, name))
        if taken == (str(p), content_hash):
            return name
        if taken is not None:
            name = f"{p.name}-{content_hash[:12]}"
            taken = _SHIPPED.get((app, name))
            if taken is not None:
                return name  # that snapshot was shipped already (same name = same content)
            p = _snapshot(p, name)
        if _single_jvm_master(sc.master):
            sc.addFile(str(p), recursive=True)
        else:
            # Spark adds local directories only under a local master: elsewhere the directory
            # travels as an uncompressed tar that each executor unpacks once under ``name``.
            sc.addArchive(f"{_tar(p, name)}#{name}")
        _SHIPPED[(app, name)] = (str(Path(path).resolve()), content_hash)
        log.info("shipped artifact %s to executors as %s", Path(path).name, name)
        return name


def _single_jvm_master(master: str) -> bool:
    """True for ``local``, ``local[N]``, ``local[N,F]``: executors share the driver's files.

    Not for ``local-cluster[...]``, whose executors are separate JVMs like a real cluster's.
    """
    return master == "local" or master.startswith("local[")


def _tar(src: Path, name: str) -> Path:
    """An uncompressed tar of directory ``src`` (its files at the archive root)."""
    archive = Path(tempfile.mkdtemp(prefix="clinlinker-ship-")) / f"{name}.tar"
    with tarfile.open(archive, "w") as tar:
        for child in sorted(src.iterdir()):
            tar.add(child, arcname=child.name)
    return archive


def _snapshot(src: Path, name: str) -> Path:
    """A read-only snapshot of directory ``src`` named ``name`` in a temporary folder."""
    dest = Path(tempfile.mkdtemp(prefix="clinlinker-ship-")) / name
    for root, _dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            s, d = Path(root) / f, dest / rel / f
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)
    return dest


# --------------------------------------------------------------------------------------------
# Worker side: device, threads, the per-worker Linker cache

_LINKERS: OrderedDict[tuple[str, ...], Linker] = OrderedDict()
_LINKER_LOCK = threading.Lock()


def _task_context() -> TaskContext | None:
    from pyspark import TaskContext

    return TaskContext.get()


def task_device(ctx: TaskContext | None, configured: str, local_master: bool) -> tuple[str, int]:
    """(device, gpu index) for this task: ("cuda", i) when the task holds GPU ``i``.

    Without a GPU resource, "auto" means CPU on a cluster (a GPU the scheduler did not give
    this task belongs to another one) and torch's choice under a local master.
    """
    resources = ctx.resources() if ctx is not None else {}
    gpu = resources.get("gpu") if resources else None
    if gpu is not None and gpu.addresses:
        return "cuda", int(gpu.addresses[0])
    if configured == "auto" and not local_master:
        return "cpu", -1
    return configured, -1


def task_cpus(ctx: TaskContext | None) -> int:
    try:
        return max(1, int(ctx.cpus())) if ctx is not None else 1
    except Exception:  # noqa: BLE001 - older TaskContext without cpus()
        return 1


def _set_threads(n: int) -> None:
    import faiss
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def get_linker(spec: LinkerSpec) -> Linker:
    """The worker's Linker for ``spec`` (built on first use, then cached)."""
    ctx = _task_context()
    cpus = task_cpus(ctx)
    device, gpu = task_device(ctx, str(spec.config["encoder"]["device"]), spec.local_master)
    if gpu >= 0:
        import torch

        torch.cuda.set_device(gpu)
    _set_threads(cpus)
    key = spec.cache_key(f"{device}:{gpu}")
    with _LINKER_LOCK:
        linker = _LINKERS.get(key)
        if linker is not None:
            _LINKERS.move_to_end(key)
            return linker
        loaded = next((other for (models, _), other in reversed(_LINKERS.items())
                       if models == key[0]), None)
        if loaded is not None:  # the same models, other linking settings
            from clinlinker_spark.config import LinkingConfig, from_dict

            linker = loaded.with_linking(from_dict(LinkingConfig, spec.config[LINKING_SECTION],
                                                   LINKING_SECTION))
        else:
            linker = _build_linker(spec, device, cpus)
        _LINKERS[key] = linker
        while len(_LINKERS) > int(spec.config["spark"]["linkers_per_worker"]):
            _LINKERS.popitem(last=False)
    return linker


def _build_linker(spec: LinkerSpec, device: str, cpus: int) -> Linker:
    from clinlinker_spark.config import JobConfig, from_dict
    from clinlinker_spark.linker import Linker

    config = from_dict(JobConfig, spec.config)
    index_path = spec.index.local_path()
    reranker_device = device if config.reranker.device == "auto" or device == "cuda" else (
        config.reranker.device)
    config = dataclasses.replace(
        config,
        encoder=dataclasses.replace(config.encoder, path=spec.encoder.local_path(),
                                    device=device, num_threads=cpus),
        index=dataclasses.replace(config.index, path=index_path),
        reranker=dataclasses.replace(
            config.reranker,
            path=spec.reranker.local_path() if spec.reranker is not None else "",
            device=reranker_device,
        ),
        ranker=dataclasses.replace(
            config.ranker, path=spec.ranker.local_path() if spec.ranker is not None else ""),
        context=dataclasses.replace(
            config.context,
            reranker=(spec.context_reranker.local_path()
                      if spec.context_reranker is not None else ""),
            ranker=spec.context_ranker.local_path() if spec.context_ranker is not None else ""),
    )
    linker = Linker.from_config(config, index_path, mmap=spec.mmap_index)
    expected = {**spec.versions, "context_version": spec.context_version}
    loaded = {**linker.versions, "context_version": linker.context_version}
    if loaded != expected:
        raise ArtifactError(
            "the artifacts an executor loaded differ from the driver's: "
            + ", ".join(f"{k} {loaded[k][:12]} != {v[:12]}"
                        for k, v in expected.items() if loaded[k] != v)
        )
    log.info("executor linker ready: model %s, index %s, ranker %s, device %s, %d threads",
             spec.model_version[:12], spec.index_version[:12],
             spec.ranker_version[:12] or "none", device, cpus)
    return linker


def clear_cache() -> None:
    """Drop this process's cached Linkers (tests, notebooks)."""
    with _LINKER_LOCK:
        _LINKERS.clear()


# --------------------------------------------------------------------------------------------
# Row checks


def check_mentions_batch(texts: list[Any], rows: list[int], bad_ids: list[str | None],
                         max_text_length: int) -> tuple[list[str | None], list[str | None]]:
    """(text_norm, reason) lists of :func:`~clinlinker_spark.spark.mentions.identify_mentions`
    rows: ``rows`` input rows shared each one's id, ``bad_ids``: why the id cannot be a key
    (``"null mention_id"``, ``"empty mention_id"``) or None. A null, blank or duplicated id is
    invalid whatever the text (that reason, or ``"duplicate mention_id (N rows)"``); otherwise
    ``linker.invalid_reason``. ``text_norm`` is ``normalize_text(text)`` for a row that can be
    linked, else None. The one statement of these rules, run by :func:`make_prepare_udf`."""
    from clinlinker_spark.linker import invalid_reason
    from clinlinker_spark.text import normalize_text

    norms: list[str | None] = []
    reasons: list[str | None] = []
    for text, n, bad_id in zip(texts, rows, bad_ids):
        note = f" ({n} rows)" if n > 1 else ""
        if bad_id:
            norm, reason = None, bad_id + note
        elif n > 1:
            norm, reason = None, "duplicate mention_id" + note
        else:
            reason = invalid_reason(text, max_text_length)
            norm = normalize_text(text) if reason is None else None
        norms.append(norm)
        reasons.append(reason)
    return norms, reasons


def make_prepare_udf(max_text_length: int) -> Any:
    """A pandas UDF: (text, rows sharing the id, null id) -> struct<text_norm, reason>, by
    :func:`check_mentions_batch`."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(PREPARED_STRUCT)  # type: ignore[call-overload]
    def prepare(texts: pd.Series, rows: pd.Series, bad_ids: pd.Series) -> pd.DataFrame:
        norms, reasons = check_mentions_batch(texts.tolist(), rows.tolist(),
                                              bad_ids.tolist(), max_text_length)
        return pd.DataFrame({TEXT_NORM_COLUMN: norms, "reason": reasons})

    return prepare


# --------------------------------------------------------------------------------------------
# Linking stages (mapInArrow)


def _to_batch(keys: list[str], texts: list[str], ranked: list[list[Candidate]],
              linker: Linker | None = None,
              confidences: list[float | None] | None = None) -> pa.RecordBatch:
    """STAGE_SCHEMA rows of (key, text, candidates). With ``linker`` (the stage that
    finalises) the outcome columns are ``linker.outcome`` of each list and its confidence
    (``confidences``: ``Linker.rank``'s); without it they are null."""
    n = len(keys)
    if linker is not None:
        confidences = confidences if confidences is not None else [None] * n
        outcomes = [linker.outcome(c, p) for c, p in zip(ranked, confidences)]
    else:
        outcomes = [(None,) * len(OUTCOME_COLUMNS)] * n
    columns = list(zip(*outcomes)) if n else [()] * len(OUTCOME_COLUMNS)
    # a dict literal per candidate: dataclasses.asdict (a deep copy) cost 0.1 s per 1,024
    # forms of 25 candidates, 5% of a task's encode time
    cands = [[{"code": c.code, "term": c.term, "retrieval_score": c.retrieval_score,
               "rerank_score": c.rerank_score, "lexical_score": c.lexical_score,
               "ranker_score": c.ranker_score, "exact": c.exact, "dense_hits": c.dense_hits}
              for c in cs] for cs in ranked]
    arrays = [
        pa.array(keys, pa.string()),
        pa.array(texts, pa.string()),
        *(pa.array(list(col), ARROW_STAGE_SCHEMA.field(name).type)
          for col, name in zip(columns, OUTCOME_COLUMNS)),
        pa.array(cands, ARROW_STAGE_SCHEMA.field("candidates").type),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=ARROW_STAGE_SCHEMA)


def _from_arrow(candidates: pa.Array) -> list[list[Candidate]]:
    """The Candidates of a STAGE_SCHEMA ``candidates`` column, every field by name."""
    from clinlinker_spark.linker import Candidate

    return [[Candidate(code=d["code"], term=d["term"], retrieval_score=d["retrieval_score"],
                       rerank_score=d["rerank_score"], exact=bool(d["exact"]),
                       lexical_score=d["lexical_score"], ranker_score=d["ranker_score"],
                       dense_hits=int(d["dense_hits"] or 0))
             for d in (cs or [])] for cs in candidates.to_pylist()]


def _stage_fn(spec: LinkerSpec, stage_seconds: Accumulator | None, what: str,
              step: Callable[[Linker, list[str], pa.RecordBatch], list[list[Candidate]]],
              finalize: bool) -> ArrowFn:
    """A mapInArrow function that runs ``step`` (one linker stage) on every batch of
    (link_key, text_norm[, candidates]) rows and emits STAGE_SCHEMA rows. With ``finalize``
    the step's candidates go through ``Linker.rank`` (the ranker's order and confidence, lists
    cut to top_k) and the outcome columns are filled; otherwise every candidate is passed on
    and the outcome columns stay null."""

    def run_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        linker: Linker | None = None
        n_rows = 0
        for batch in batches:
            if batch.num_rows == 0:
                continue
            if linker is None:
                linker = get_linker(spec)
            keys = batch.column(LINK_KEY_COLUMN).to_pylist()
            texts = batch.column(TEXT_NORM_COLUMN).to_pylist()
            candidates = step(linker, texts, batch)
            if finalize:
                ranked, confidences = linker.rank(texts, candidates)
                out = _to_batch(keys, texts, ranked, linker, confidences)
            else:
                out = _to_batch(keys, texts, candidates)
            if stage_seconds is not None:
                stage_seconds.add({**linker.take_stage_seconds(), **linker.take_counts()})
            yield out
            n_rows += len(keys)
        log.debug("%s task done: %d surface forms", what, n_rows)

    return run_partition


def make_retrieve_fn(spec: LinkerSpec, stage_seconds: Accumulator | None = None) -> ArrowFn:
    """mapInArrow function: (link_key, text_norm) -> STAGE_SCHEMA rows with candidates.

    Without a re-ranker this stage finalises (ranker, outcome columns: status, reason, code,
    term, score, confidence); with one it passes every candidate of the retrievers to
    :func:`make_rerank_fn`, the outcome columns null.
    """
    return _stage_fn(spec, stage_seconds, "retrieval",
                     lambda linker, texts, _batch: linker.retrieve(texts),
                     finalize=not spec.has_reranker)


def make_rerank_fn(spec: LinkerSpec, stage_seconds: Accumulator | None = None) -> ArrowFn:
    """mapInArrow function: STAGE_SCHEMA rows -> the same rows re-ranked, then ranked, outcome
    filled."""
    if not spec.has_reranker:
        raise ValueError("make_rerank_fn needs a spec with a re-ranker")
    return _stage_fn(spec, stage_seconds, "re-rank",
                     lambda linker, texts, batch: linker.rerank(
                         texts, _from_arrow(batch.column("candidates"))),
                     finalize=True)


# --------------------------------------------------------------------------------------------
# The context stage


def make_context_gate_udf(context: dict[str, Any]) -> Any:
    """A pandas UDF: (first code, second code, confidence) of a form's context-free link ->
    whether the context stage links its mentions again (``linker.needs_context`` with the
    ``context`` config section)."""
    from pyspark.sql.functions import pandas_udf
    from pyspark.sql.types import BooleanType

    from clinlinker_spark.config import ContextConfig, from_dict
    from clinlinker_spark.linker import needs_context

    config = from_dict(ContextConfig, context, "context")

    @pandas_udf(BooleanType())  # type: ignore[call-overload]
    def gate(first: pd.Series, second: pd.Series, confidence: pd.Series) -> pd.Series:
        out = []
        for a, b, p in zip(first.tolist(), second.tolist(), confidence.tolist()):
            codes = [c for c in (a, b) if isinstance(c, str)]
            p = None if p is None or pd.isna(p) else float(p)
            out.append(needs_context(codes, p, config) if isinstance(a, str) else False)
        return pd.Series(out, dtype=bool)

    return gate


def make_context_fn(spec: LinkerSpec, stage_seconds: Accumulator | None = None) -> ArrowFn:
    """mapInArrow function: (link_key, text_norm, context, context start, context end) rows
    (``schemas.CONTEXT_COLUMNS``; link_key: the (form, context) key) -> STAGE_SCHEMA rows of
    the context stage (``Linker.link_in_context``), outcome filled."""
    if not spec.context_version:
        raise ValueError("make_context_fn needs a spec with a context stage")
    import time

    from clinlinker_spark.spark.schemas import CONTEXT_COLUMNS

    def run_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        linker: Linker | None = None
        for batch in batches:
            if batch.num_rows == 0:
                continue
            if linker is None:
                linker = get_linker(spec)
            started = time.perf_counter()
            keys = batch.column(LINK_KEY_COLUMN).to_pylist()
            texts = batch.column(TEXT_NORM_COLUMN).to_pylist()
            contexts = list(zip(*(batch.column(c).to_pylist() for c in CONTEXT_COLUMNS)))
            queries = linker.context_stage.reranker.queries(texts, contexts)
            ranked, confidences = linker.link_in_context(texts, queries)
            out = _to_batch(keys, texts, ranked, linker, confidences)
            if stage_seconds is not None:
                linker.take_stage_seconds()  # the retrieval's seconds count as the stage's
                linker.take_counts()
                stage_seconds.add({"context": time.perf_counter() - started})
            yield out

    return run_partition
