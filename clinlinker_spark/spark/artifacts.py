"""The link job's artifacts: found (or built) and checked on the driver, then shipped.

:func:`resolve_artifacts` fixes, before any Spark work, the encoder (the base encoder is built
when missing and ``build_missing``), the index (built from ``terminology`` when missing), the
index manifest checked against the encoder's fingerprint (EncoderMismatchError names both),
the re-ranker, the ranker (trained on the driver when ``ranker.path`` holds none and
``build_missing``, :func:`ensure_ranker`; checked against the encoder, re-ranker and
retrievers, :func:`check_ranker`), and the versions (hashes) written into every row.
:func:`linker_spec` turns them into the plain values the UDFs capture, shipping the
directories to executors once (``spark.ship_artifacts``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clinlinker_spark.config import EncoderConfig, JobConfig, to_dict
from clinlinker_spark.errors import ArtifactError, ConfigError, ModelLoadError
from clinlinker_spark.fsutil import needs_build

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

    from clinlinker_spark.spark.udfs import LinkerSpec

log = logging.getLogger(__name__)


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
    # the model registry's entries the models came from (models:/ URIs), by role: encoder,
    # reranker, ranker -> {"uri", "name", "version"}
    registered: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    # the context stage (``context``): its cross-encoder and ranker directories and
    # ``linker.context_version`` ("" = no context stage)
    context_reranker_path: str = ""
    context_ranker_path: str = ""
    context_version: str = ""

    @property
    def versions(self) -> dict[str, str]:
        """The versions of the context-free linking, as ``Linker.versions`` gives them
        ("" = none): the form cache's key."""
        return {"model_version": self.model_version, "index_version": self.index_version,
                "reranker_version": self.reranker_version,
                "ranker_version": self.ranker_version}

    @property
    def row_versions(self) -> dict[str, str]:
        """The versions written into every row and compared by incremental runs
        (``linker.lineage_versions``: with a context stage, ranker_version covers it)."""
        from clinlinker_spark.linker import lineage_versions

        return lineage_versions(self.versions, self.context_version)


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
    from clinlinker_spark.index import check_encoder, read_manifest
    from clinlinker_spark.modeling import check_model_dir, model_hash
    from clinlinker_spark.tracking import resolve_model_paths

    config, registered = resolve_model_paths(config)
    context = resolve_context(config)
    encoder_path = Path(config.encoder.path)
    if needs_build(encoder_path, "config.json", "encoder", ModelLoadError) and config.build_missing:
        from clinlinker_spark.base_encoder import ensure_base_encoder

        ensure_base_encoder(encoder_path)
    index_path, fingerprint = _index_and_fingerprint(config, registered.get("encoder"))
    manifest = read_manifest(index_path)
    check_encoder(manifest, fingerprint, index_path)
    reranker_path = reranker_version = ""
    if config.reranker.path:
        reranker_path = str(check_model_dir(config.reranker.path).resolve())
        reranker_version = model_hash(reranker_path)
    ranker_path = ranker_version = ""
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
        registered=registered,
        **context,
    )
    _log_artifacts(resolved)
    return resolved


def resolve_context(config: JobConfig) -> dict[str, str]:
    """The context stage's artifacts (ResolvedArtifacts' context fields; empty without
    ``context.reranker``), checked before any Spark work: the cross-encoder must read
    context (trained with ``context: true``) and the ranker must exist (it is never trained
    by the job). Whether a job's input has the context is :func:`check_context_input`."""
    if not config.context.reranker:
        return {}
    from clinlinker_spark.linker import context_version
    from clinlinker_spark.modeling import check_model_dir, model_hash
    from clinlinker_spark.reranker import training_card
    from clinlinker_spark.ranker import RANKER_FILE, ranker_hash

    reranker = check_model_dir(config.context.reranker).resolve()
    if not (training_card(reranker).get("context") or {}).get("chars"):
        raise ConfigError(f"context.reranker {reranker} reads the span alone: the context "
                          "stage needs a cross-encoder trained with context: true")
    ranker = Path(config.context.ranker)
    if not (ranker / RANKER_FILE).is_file():
        raise ArtifactError(f"no context ranker at {ranker} (no {RANKER_FILE}): train it with "
                            "clinlinker train-ranker, reranker.path set to the context "
                            "cross-encoder")
    return {"context_reranker_path": str(reranker),
            "context_ranker_path": str(ranker.resolve()),
            "context_version": context_version(model_hash(reranker), ranker_hash(ranker),
                                               config.context)}


def check_context_input(config: JobConfig) -> None:
    """Refuse a link job with a context stage whose input names no context column: the
    stage would never run. (A served model reads each request's columns instead.)"""
    if config.context.reranker and not config.input.context_column:
        raise ConfigError("context.reranker is set but the input has no context: set "
                          "input.context_column (and its offset columns), or input.text_dir "
                          "with input.context_column: context for a gold corpus")


def _index_and_fingerprint(config: JobConfig, registered: dict[str, str] | None = None
                           ) -> tuple[Path, dict[str, Any]]:
    """The index directory (built when missing, ``index.ensure_index``; its manifest records
    the encoder's ``registered`` entry where it came from the model registry) and the
    encoder's fingerprint, from this process's memo when the encoder directory is unchanged
    and the index exists (no model load)."""
    from clinlinker_spark.index import MANIFEST_FILE, ensure_index

    key = _encoder_key(config.encoder)
    with _FINGERPRINTS_LOCK:
        fingerprint = _FINGERPRINTS.get(key) if key is not None else None
    if fingerprint is not None and (Path(config.index.path) / MANIFEST_FILE).is_file():
        return Path(config.index.path), fingerprint
    from clinlinker_spark.encoder import BiEncoder

    driver_device = "auto" if config.encoder.device == "cuda" else config.encoder.device
    encoder = BiEncoder.from_config(dataclasses.replace(config.encoder, device=driver_device))
    encoder.registered = registered
    index_path = Path(ensure_index(config, encoder))
    fingerprint = encoder.fingerprint()
    del encoder
    if key is not None:
        with _FINGERPRINTS_LOCK:
            _FINGERPRINTS[key] = fingerprint
    return index_path, fingerprint


def _log_artifacts(resolved: ResolvedArtifacts) -> None:
    """One INFO line: the versions, the index's size, type and measured recall."""
    manifest = resolved.index_manifest
    # linking.reuse_index_vectors needs the precision the terms were embedded in: an index
    # built before it was recorded encodes every form (rebuild it to reuse term vectors)
    built_in = manifest.get("build", {}).get("precision") or "not recorded"
    log.info("artifacts: model %s, index %s (%s rows, %s, recall@k %s, vectors computed in "
             "%s), re-ranker %s, ranker %s", resolved.model_version[:12],
             resolved.index_version[:12], manifest.get("terminology", {}).get("rows", "?"),
             manifest.get("index", {}).get("type", "?"), index_recall(manifest) or "not measured",
             built_in, resolved.reranker_version[:12] or "none",
             resolved.ranker_version[:12] or "none")


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
    if not needs_build(path, RANKER_FILE, "ranker", ModelLoadError):
        return path
    if not config.build_missing:
        raise ArtifactError(f"no ranker at {path} (no {RANKER_FILE}): set build_missing: true "
                            "to train it, or run clinlinker train-ranker")
    from clinlinker_spark.training.ranker import train_ranker_tracked

    started = time.perf_counter()
    log.info("ranker missing: training it on the driver (%d terminology source(s), %d folds)",
             len(config.terminology.sources), config.ranker.folds)
    # the driver's device, as for the encoder's fingerprint (a GPU may be the executors' only)
    driver_device = "auto" if config.encoder.device == "cuda" else config.encoder.device
    spec, _ = train_ranker_tracked(dataclasses.replace(config, encoder=dataclasses.replace(
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
        context_reranker=(ref(art.context_reranker_path, art.context_version)
                          if art.context_version else None),
        context_ranker=(ref(art.context_ranker_path, art.context_version)
                        if art.context_version else None),
        context_version=art.context_version,
    )

