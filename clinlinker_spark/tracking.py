"""MLflow: tracked runs, registered models, and ``models:/`` URIs resolved to directories.

:func:`tracked_run` opens one MLflow run for a training, an evaluation, a link night or a
variables night when ``mlflow.tracking_uri`` is set, and a do-nothing stand-in when it is
empty, so callers log the same way either way. A run that raises is ended ``FAILED`` with
the error's class as a tag (never its message: Spark and pandas messages can quote data).
What callers log are ids, counts, timings, metrics, hashes and the config: never mention text.

:func:`resolve_model` turns ``models:/<name>/<version>``, ``models:/<name>/<alias>`` and
``models:/<name>@<alias>`` into a local directory (the registry's own files for a local store;
a download into ``mlflow.download_dir`` otherwise) and leaves a directory path as it is.

MLflow is imported only when tracking is on or a ``models:/`` URI is met: executors never
import it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from clinlinker_spark.errors import ArtifactError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from clinlinker_spark.config import MlflowConfig

log = logging.getLogger(__name__)

MODELS_SCHEME = "models:/"
MODEL_ARTIFACT_PATH = "model"
# MLflow's limits on one log_batch call
_BATCH_PARAMS = 100
_BATCH_METRICS = 1000
_PARAM_VALUE_CHARS = 6000
# metric and param keys: MLflow accepts letters, digits, _ - . / and spaces
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")

_ACTIVE: contextvars.ContextVar["TrackedRun | None"] = contextvars.ContextVar(
    "clinlinker_tracked_run", default=None)


def metric_key(name: str) -> str:
    """``name`` as an MLflow key: ``acc@1`` -> ``acc_at_1``; other characters MLflow refuses
    become ``_``."""
    return _KEY_CHARS.sub("_", name.replace("@", "_at_"))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": value}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def numeric_metrics(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers (not booleans) of a nested mapping, flattened to MLflow keys."""
    found: dict[str, float] = {}
    for key, value in flatten(data, prefix).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            found[metric_key(key)] = float(value)
    return found


class TrackedRun:
    """One MLflow run, logged through an ``MlflowClient`` bound to the config's store."""

    def __init__(self, client: Any, run_id: str, config: MlflowConfig) -> None:
        self.client = client
        self.run_id = run_id
        self.config = config
        #: per-step metric lines logged while the run was active (training's loss windows)
        self.steps_logged = 0

    @property
    def enabled(self) -> bool:
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        """``params`` flattened (``a.b.c``), values as text cut at MLflow's limit."""
        from mlflow.entities import Param

        items = [Param(metric_key(k), _param_text(v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), _BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH_PARAMS])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Numbers at ``step`` (keys made MLflow keys; non-finite values left out)."""
        self._log_points((k, v, int(step)) for k, v in metrics.items())

    def log_series(self, name: str, values: list[float], first_step: int = 1) -> None:
        """One metric's values at steps ``first_step``, ``first_step + 1``, ..."""
        self._log_points((name, v, first_step + i) for i, v in enumerate(values))

    def _log_points(self, points: Iterable[tuple[str, Any, int]]) -> None:
        """(name, value, step) points, in batches; None and non-finite values left out."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, step) for k, v, step in points
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(items), _BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i:i + _BATCH_METRICS])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, _param_text(v)) for k, v in tags.items() if v not in (None, "")]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """``data`` as a JSON artifact."""
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model_dir(self, directory: str | Path, tags: Mapping[str, Any],
                      name: str = "") -> dict[str, str] | None:
        """Log a model directory as the run's ``model`` artifact and, with
        ``mlflow.register``, register it as a new version of ``name`` (``mlflow.
        registered_model``, else the directory's name) with ``tags``. Returns the registered
        ``{"name", "version", "uri"}``, or None when not registered."""
        directory = Path(directory)
        self.client.log_artifacts(self.run_id, str(directory), MODEL_ARTIFACT_PATH)
        if not self.config.register:
            return None
        name = self.config.registered_model or name or directory.name
        try:  # the client registers in mlflow.registry_uri (client_of)
            self.client.get_registered_model(name)
        except Exception:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST
            self.client.create_registered_model(name)
        run = self.client.get_run(self.run_id)
        source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
        version = self.client.create_model_version(
            name, source, run_id=self.run_id,
            tags={k: _param_text(v) for k, v in tags.items() if v not in (None, "")})
        registered = {"name": name, "version": str(version.version),
                      "uri": f"{MODELS_SCHEME}{name}/{version.version}"}
        self.set_tags({"clinlinker.registered_model": registered["uri"]})
        log.info("registered %s in the MLflow registry", registered["uri"])
        return registered


class NoRun:
    """The stand-in for a run when tracking is off: every call does nothing."""

    enabled = False
    run_id = ""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_PARAM_VALUE_CHARS]


def _local_store_dir(tracking_uri: str) -> Path | None:
    """The folder of a ``sqlite:///`` store's database file; None for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):]).parent


def client_of(config: MlflowConfig) -> Any:
    """An ``MlflowClient`` on the config's tracking store (its folder made for a local SQLite
    store) and registry (``mlflow.registry_uri``, else the tracking store)."""
    try:
        from mlflow import MlflowClient
    except ImportError:  # pragma: no cover - mlflow is a dependency
        raise ConfigError("mlflow.tracking_uri is set but mlflow is not installed "
                          "(pip install mlflow), or set mlflow.tracking_uri to empty") from None
    store = _local_store_dir(config.tracking_uri)
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=config.tracking_uri,
                        registry_uri=config.registry_uri or config.tracking_uri)


def _experiment_id(client: Any, config: MlflowConfig) -> str:
    found = client.get_experiment_by_name(config.experiment)
    if found is not None:
        return str(found.experiment_id)
    location = config.artifact_location
    store = _local_store_dir(config.tracking_uri)
    if not location and store is not None:
        location = (store / "artifacts").resolve().as_uri()
    try:
        return str(client.create_experiment(config.experiment,
                                            artifact_location=location or None))
    except Exception:  # noqa: BLE001 - created meanwhile by another process
        found = client.get_experiment_by_name(config.experiment)
        if found is None:
            raise
        return str(found.experiment_id)


@contextlib.contextmanager
def tracked_run(config: MlflowConfig, kind: str, run_name: str = "",
                tags: Mapping[str, Any] | None = None) -> Iterator[TrackedRun | NoRun]:
    """One MLflow run of ``kind`` (train-biencoder, evaluate, link, variables, ...) in
    ``mlflow.experiment``; a :class:`NoRun` when ``mlflow.tracking_uri`` is empty, or, with a
    WARNING, when the store cannot be opened (a night is not stopped by its tracking).

    The run ends FINISHED, or FAILED with the tags ``clinlinker.error_class`` (the exception's
    class) and ``clinlinker.error_root_class`` (its root cause's) when the block raises; the
    exception goes on. While the block runs, :func:`active_run` returns it (training logs its
    per-step metrics there)."""
    if not config.enabled:
        yield NoRun()
        return
    created = None
    try:
        client = client_of(config)
        experiment_id = _experiment_id(client, config)
        created = client.create_run(experiment_id, run_name=run_name or kind,
                                    tags={"clinlinker.kind": kind,
                                          **{k: _param_text(v) for k, v in (tags or {}).items()
                                             if v not in (None, "")}})
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a store that cannot be reached stops no night
        log.warning("MLflow store %s cannot be used (%s): this %s run is not tracked",
                    _safe_uri(config.tracking_uri), type(exc).__name__, kind)
        log.debug("MLflow store error", exc_info=True)
    if created is None:
        yield NoRun()
        return
    run = TrackedRun(client, created.info.run_id, config)
    log.info("MLflow run %s (%s) in experiment %s at %s", run.run_id, kind,
             config.experiment, _safe_uri(config.tracking_uri))
    token = _ACTIVE.set(run)
    try:
        yield run
    except BaseException as exc:
        _end_failed(run, exc)
        raise
    else:
        client.set_terminated(run.run_id, "FINISHED")
    finally:
        _ACTIVE.reset(token)


def _end_failed(run: TrackedRun, exc: BaseException) -> None:
    """Mark ``run`` FAILED with the error's classes (never its message)."""
    from clinlinker_spark.errors import root_cause_class

    try:
        run.set_tags({"clinlinker.error_class": type(exc).__name__,
                      "clinlinker.error_root_class": root_cause_class(exc)})
        run.client.set_terminated(run.run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the job's own error is what must surface
        log.warning("could not mark MLflow run %s as failed", run.run_id, exc_info=True)


def _safe_uri(uri: str) -> str:
    """A tracking URI without user info (``https://user:token@host`` -> ``https://host``)."""
    return re.sub(r"//[^/@]*@", "//", uri)


def active_run() -> TrackedRun | None:
    """The run :func:`tracked_run` opened in this context, if any."""
    return _ACTIVE.get()


# --------------------------------------------------------------------------------------------
# models:/ URIs


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved to a directory: ``uri`` as configured; ``name`` and
    ``version`` of the registry entry ("" for a plain directory)."""

    path: str
    uri: str
    name: str = ""
    version: str = ""

    @property
    def registered(self) -> dict[str, str] | None:
        if not self.name:
            return None
        return {"uri": self.uri, "name": self.name, "version": self.version}


def is_model_uri(value: str) -> bool:
    return value.startswith(MODELS_SCHEME)


def parse_model_uri(uri: str) -> tuple[str, str, str]:
    """``models:/name/3`` -> (name, "3", ""); ``models:/name@champion`` and
    ``models:/name/champion`` -> (name, "", "champion")."""
    rest = uri[len(MODELS_SCHEME):].strip("/")
    if "@" in rest and "/" not in rest:
        name, alias = rest.split("@", 1)
        version = ""
    elif rest.count("/") == 1:
        name, ref = rest.split("/")
        version, alias = (ref, "") if ref.isdigit() else ("", ref)
    else:
        raise ConfigError(f"{uri!r} is not a model URI: models:/<name>/<version>, "
                          "models:/<name>/<alias> or models:/<name>@<alias>")
    if not name or not (version or alias):
        raise ConfigError(f"{uri!r} is not a model URI: models:/<name>/<version>, "
                          "models:/<name>/<alias> or models:/<name>@<alias>")
    return name, version, alias


def resolve_model(reference: str, config: MlflowConfig) -> ResolvedModel:
    """A directory, or a ``models:/`` URI resolved in the registry to a local directory.

    A local store's version is its own files (nothing is copied); a remote one is downloaded
    once into ``mlflow.download_dir/<name>/<version>`` (a folder that is complete is reused).
    An unknown name, version or alias is an ArtifactError naming the URI."""
    if not is_model_uri(reference):
        return ResolvedModel(path=reference, uri=reference)
    if not (config.registry_uri or config.tracking_uri):
        raise ConfigError(f"{reference} needs a model registry: set mlflow.tracking_uri "
                          "(or mlflow.registry_uri)")
    name, version, alias = parse_model_uri(reference)
    registry = client_of(config)
    try:
        found = (registry.get_model_version(name, version) if version
                 else registry.get_model_version_by_alias(name, alias))
        source = registry.get_model_version_download_uri(name, str(found.version))
    except Exception as exc:  # noqa: BLE001 - MlflowException: not found, no such alias
        raise ArtifactError(f"{reference}: no such registered model version in "
                            f"{_safe_uri(config.registry_uri or config.tracking_uri)} "
                            f"({type(exc).__name__})") from None
    version = str(found.version)
    local = _local_source(source)
    if local is None:
        local = _download(source, Path(config.download_dir) / name / version, config)
    log.info("%s resolved to version %s", reference, version)
    return ResolvedModel(path=str(local), uri=reference, name=name, version=version)


def _local_source(source: str) -> Path | None:
    """The directory of a version whose source is on this machine's file system."""
    if source.startswith("file://"):
        from urllib.parse import unquote, urlparse

        source = unquote(urlparse(source).path)
    elif "://" in source or source.startswith(("dbfs:", "runs:", "models:")):
        return None
    path = Path(source)
    return path if path.is_dir() else None


def _download(source: str, target: Path, config: MlflowConfig) -> Path:
    """Download a version's files into ``target`` once (a ``.complete`` marker says done)."""
    marker = target / ".complete"
    if marker.is_file():
        return target
    import mlflow.artifacts

    target.mkdir(parents=True, exist_ok=True)
    mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target),
                                        tracking_uri=config.tracking_uri)
    # download_artifacts writes <target>/<last part of the source>
    inner = target / source.rstrip("/").rsplit("/", 1)[-1]
    if inner.is_dir():
        for child in inner.iterdir():
            child.rename(target / child.name)
        inner.rmdir()
    marker.write_text(source, encoding="utf-8")
    return target


# --------------------------------------------------------------------------------------------
# Training runs

#: beside a trained model: the MLflow run that trained it and its registered version (not one
#: of the files a model's or ranker's hash covers)
RUN_FILE = "mlflow_run.json"
# a card's keys that are not what the model was trained from (logged otherwise, or not at all)
_CARD_NOT_INPUTS = frozenset({"kind", "created_at", "config", "metrics", "libraries", "device",
                              "wall_time_s", "run_fingerprint", "model_hash"})


def log_step(step: int, metrics: Mapping[str, float]) -> None:
    """Log a training step's metrics to the active run (none: nothing)."""
    run = active_run()
    if run is not None:
        run.log_metrics(metrics, step=step)
        run.steps_logged += 1


def log_trained_model(run: TrackedRun | NoRun, out_dir: str | Path, card: Mapping[str, Any],
                      metrics: Mapping[str, Any], tags: Mapping[str, Any]) -> None:
    """After a training: the card's data hashes and counts (params ``trained_from.*``), its
    ``metrics`` (numbers), the per-step losses when no step was logged live (a distributed
    run's workers), the model directory as the ``model`` artifact and its registered version
    with ``tags`` (the model's and its encoder's fingerprints); then :data:`RUN_FILE` beside
    the model says which run and version it is."""
    if not run.enabled:
        return
    assert isinstance(run, TrackedRun)
    trained_from = {k: v for k, v in card.items() if k not in _CARD_NOT_INPUTS}
    if trained_from:
        run.log_params(flatten({"trained_from": trained_from}))
    run.log_metrics(numeric_metrics(metrics))
    losses = metrics.get("step_losses") or []
    if losses and not run.steps_logged:
        run.log_series("loss", losses)
    run.set_tags(tags)
    out = Path(out_dir)
    run_file = {"run_id": run.run_id, "experiment": run.config.experiment,
                "tracking_uri": _safe_uri(run.config.tracking_uri)}
    (out / RUN_FILE).write_text(json.dumps(run_file, indent=2) + "\n", encoding="utf-8")
    registered = run.log_model_dir(out, tags, name=out.name)
    if registered is not None:
        (out / RUN_FILE).write_text(json.dumps({**run_file, "registered": registered},
                                               indent=2) + "\n", encoding="utf-8")


def training_run_id(model_dir: str | Path) -> str:
    """The MLflow run that trained the model in ``model_dir`` (:data:`RUN_FILE`); ""."""
    found = Path(model_dir) / RUN_FILE
    if not found.is_file():
        return ""
    try:
        return str(json.loads(found.read_text(encoding="utf-8")).get("run_id", ""))
    except (OSError, ValueError):
        return ""


def resolve_model_paths(config: Any) -> tuple[Any, dict[str, dict[str, str]]]:
    """A JobConfig whose ``encoder.path``, ``reranker.path``, ``ranker.path`` and context
    models are directories (``models:/`` URIs resolved by :func:`resolve_model`), and the
    registry entries they came from (``{"encoder": {"uri", "name", "version"}, ...}``). A
    config without URIs comes back as it is."""
    import dataclasses

    registered: dict[str, dict[str, str]] = {}

    def local(role: str, reference: str) -> str:
        if not is_model_uri(reference):
            return reference
        found = resolve_model(reference, config.mlflow)
        registered[role] = found.registered or {}
        return found.path

    resolved = dataclasses.replace(
        config,
        encoder=dataclasses.replace(config.encoder, path=local("encoder", config.encoder.path)),
        reranker=dataclasses.replace(config.reranker,
                                     path=local("reranker", config.reranker.path)),
        ranker=dataclasses.replace(config.ranker, path=local("ranker", config.ranker.path)),
        context=dataclasses.replace(
            config.context, reranker=local("context_reranker", config.context.reranker),
            ranker=local("context_ranker", config.context.ranker)))
    return (resolved if registered else config), registered


# --------------------------------------------------------------------------------------------
# Nightly runs

#: a run summary's text fields that become tags (ids, paths, versions: no mention text)
_SUMMARY_TAGS = ("run_id", "table", "writer", "model_version", "index_version",
                 "reranker_version", "ranker_version", "context_version", "linking_version",
                 "unit_type")


def log_link_summary(run: TrackedRun | NoRun, summary: Mapping[str, Any]) -> None:
    """A job's summary (a link or variables night) on its run: every number as a metric
    (counts by status, rows written, forms computed and from the cache, seconds per stage,
    the table version), the ids and versions as tags, the registry entries the models came
    from, and the summary as ``summary.json``."""
    if not run.enabled:
        return
    try:
        run.log_metrics(numeric_metrics({k: v for k, v in summary.items()
                                         if k not in ("registered_models",)}))
        run.set_tags({f"clinlinker.{k}": summary[k] for k in _SUMMARY_TAGS
                      if isinstance(summary.get(k), (str, int)) and summary.get(k) != ""})
        for role, entry in (summary.get("registered_models") or {}).items():
            run.set_tags({f"clinlinker.registered.{role}": entry.get("uri", "")})
        run.log_dict(dict(summary), "summary.json")
    except Exception as exc:  # noqa: BLE001 - the table is written: the night succeeded
        log.warning("could not log the summary on MLflow run %s (%s)", run.run_id,
                    type(exc).__name__)
