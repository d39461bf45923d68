"""Dry runs: what a job would do, checked without linking or writing anything.

``clinlinker link --dry-run`` and ``clinlinker variables --dry-run`` call these. A plan checks,
in order, everything a run checks before its Spark work: the config (already validated when
it loaded), the input (it exists, its schema has the mapped columns), the artifacts (present,
or buildable with ``build_missing``; the index built with this encoder, the ranker usable with
it; no model is loaded, nothing is built or trained) and the output tables (their schemas take
the rows the run would write). Any problem raises the error the run would raise; a plan that
returns is a run that can start. The plan is a JSON-ready dict of what the run would read,
use and write.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clinlinker_spark.errors import ArtifactError, EncoderMismatchError, ModelLoadError
from clinlinker_spark.fsutil import needs_build

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession
    from pyspark.sql.types import StructType

    from clinlinker_spark.config import JobConfig, TableRef
    from clinlinker_spark.variables import VariablesJobConfig

log = logging.getLogger(__name__)


def plan_link_job(spark: SparkSession, config: JobConfig) -> dict[str, Any]:
    """The plan of ``run_link_job(spark, config)``; raises what the run would raise first."""
    from clinlinker_spark.spark.mentions import input_errors, read_mentions, select_mentions
    from clinlinker_spark.spark.schemas import assignment_schema

    output = config.output.target
    with input_errors(config.input):
        raw = read_mentions(spark, config.input)
        selected = select_mentions(raw, config.input, config.output.store_text)
    passthrough = [selected.schema[c] for c in config.input.passthrough_columns]
    artifacts = plan_artifacts(config)
    with input_errors(config.input):
        rows = selected.count()
    table = plan_table(spark, output, assignment_schema(config.output.store_text, passthrough),
                       "mention_id", config.output.writer)
    cache = config.output.form_cache
    plan = {
        "job": "link",
        "input": {"source": str(config.input.target), "format": "table" if config.input.table
                  else config.input.format, "columns": list(raw.columns),
                  "rows": rows},
        "artifacts": artifacts,
        "output": table,
        "form_cache": None if cache is None else plan_table(spark, cache, None, "cache_key",
                                                            config.output.writer),
        "incremental": config.output.incremental,
        "dedupe_surface_forms": config.spark.dedupe_surface_forms,
        "retrievers": list(config.linking.retrievers),
    }
    log.info("dry run of the link job: input %s (%d rows), output %s, nothing linked or "
             "written", plan["input"]["source"], plan["input"]["rows"], output)
    return plan


def plan_variables_job(spark: SparkSession, config: VariablesJobConfig) -> dict[str, Any]:
    """The plan of ``run_variables_job(spark, config)``: its definitions, the assignments
    table (present, with the columns it needs) and the variables table it would write."""
    from clinlinker_spark.spark.variables_job import (
        KEY_COLUMN, read_assignments, read_documents,
    )
    from clinlinker_spark.variables import load_variables

    output = config.output.target
    variables = load_variables(config)
    assignments = read_assignments(spark, config)
    documents = read_documents(spark, config)
    return {
        "job": "variables",
        "unit": config.unit_type,
        "variables": [v.name for v in variables],
        "assignments": {"table": str(config.assignments.target),
                        "columns": list(assignments.columns)},
        "documents": None if documents is None else config.documents.path,
        "output": plan_table(spark, output, None, KEY_COLUMN, config.output.writer),
    }


def plan_table(spark: SparkSession, table: TableRef, incoming: StructType | None, key: str,
               writer: str) -> dict[str, Any]:
    """What a write into ``table`` would do: create it, or MERGE into its current version
    (adding the columns ``incoming`` brings). Raises SchemaMismatchError when ``incoming``
    does not fit the table, and ConfigError when the session cannot write a catalog table."""
    from clinlinker_spark.spark.writer import read_delta_snapshot, schema_change, writer_for

    plan: dict[str, Any] = {"table": str(table), "by_name": table.by_name,
                            "writer": writer_for(spark, table, writer)}
    existing, version = read_delta_snapshot(spark, table)
    plan.update(exists=existing is not None, key=key)
    if existing is None:
        plan["action"] = "create"
        return plan
    plan["version"] = version
    plan["action"] = "merge"
    if incoming is not None:
        plan["columns_added_or_widened"] = schema_change(existing.schema, incoming, key)
    return plan


def plan_artifacts(config: JobConfig) -> dict[str, Any]:
    """The encoder, index, re-ranker and ranker the run would use, checked as the run checks
    them but without loading a model: the index's manifest records the encoder it was built
    with (model hash, pooling, length), compared with the encoder directory's files. A missing
    artifact is "would build" with ``build_missing``, else the run's ArtifactError. ``models:/``
    URIs are resolved in the registry (a remote version is downloaded, as the run would)."""
    from clinlinker_spark.index import MANIFEST_FILE, read_manifest
    from clinlinker_spark.modeling import check_model_dir, model_hash
    from clinlinker_spark.ranker import RANKER_FILE
    from clinlinker_spark.spark.artifacts import (
        check_context_input,
        check_ranker,
        resolve_context,
    )

    def missing(what: str, path: str) -> str:
        if not config.build_missing:
            raise ArtifactError(f"no {what} at {path} and build_missing is false")
        return "would build"

    from clinlinker_spark.tracking import resolve_model_paths

    plan: dict[str, Any] = {}
    config, registered = resolve_model_paths(config)  # models:/ URIs: the registry's files
    if registered:
        plan["registered_models"] = registered
    check_context_input(config)
    context = resolve_context(config)
    if context:
        plan["context"] = {"reranker": context["context_reranker_path"],
                           "ranker": context["context_ranker_path"],
                           "context_version": context["context_version"]}
    encoder_path, index_path = Path(config.encoder.path), Path(config.index.path)
    model_version = manifest = None
    if not needs_build(encoder_path, "config.json", "encoder", ModelLoadError):
        check_model_dir(encoder_path)
        model_version = model_hash(encoder_path)
        plan["encoder"] = {"path": str(encoder_path), "model_version": model_version}
    else:
        plan["encoder"] = {"path": str(encoder_path),
                           "action": missing("bi-encoder", str(encoder_path))}
    if not needs_build(index_path, MANIFEST_FILE, "index", ArtifactError):
        manifest = read_manifest(index_path)
        built_with = manifest["encoder"]
        ours = {"model_hash": model_version, "pooling": config.encoder.pooling,
                "max_length": config.encoder.max_length}
        differ = [k for k, v in ours.items()
                  if v is not None and k in built_with and built_with[k] != v]
        if differ:
            raise EncoderMismatchError(f"index {index_path} was built with another encoder "
                                       f"than {encoder_path} ({', '.join(differ)} differ): "
                                       "rebuild it (clinlinker build-index) or use its "
                                       "encoder")
        plan["index"] = {"path": str(index_path), "index_version": manifest["content_hash"],
                         "rows": manifest.get("terminology", {}).get("rows")}
    else:
        plan["index"] = {"path": str(index_path), "action": missing("index", str(index_path))}
    if config.reranker.path:
        check_model_dir(config.reranker.path)
        plan["reranker"] = {"path": config.reranker.path,
                            "reranker_version": model_hash(config.reranker.path)}
    if config.ranker.path:
        if not needs_build(Path(config.ranker.path), RANKER_FILE, "ranker", ModelLoadError):
            if model_version is not None and manifest is not None:
                check_ranker(config.ranker.path, config, model_version,
                             str(manifest["content_hash"]))
            plan["ranker"] = {"path": config.ranker.path}
        else:
            plan["ranker"] = {"path": config.ranker.path,
                              "action": missing("ranker", config.ranker.path).replace(
                                  "build", "train")}
    return plan
