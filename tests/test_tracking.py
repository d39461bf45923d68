"""MLflow against a real local store (SQLite, a folder under tmp_path): tracked training with
a registered version, models:/ URIs resolved to the same files and hash, logged link and
variables nights (a failed one marked failed), evaluation runs, the linker as a pyfunc model
equal to the core Linker, and no mention text anywhere in the store but inside the models."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from test_spark_job import job_config, read_table, sample_index  # noqa: F401 - fixture
from test_spark_job import sample_terminology  # noqa: F401 - fixture
from test_spark_job import HYBRID, TEST_SPARK, with_ranker

from clinlinker_spark.cli import main
from clinlinker_spark.config import MlflowConfig, load_config
from clinlinker_spark.corpora import read_gold
from clinlinker_spark.errors import ArtifactError, InputDataError
from clinlinker_spark.index import read_manifest
from clinlinker_spark.linker import Linker
from clinlinker_spark.modeling import model_hash
from clinlinker_spark.samples import sample_path
from clinlinker_spark.tracking import (
    RUN_FILE,
    client_of,
    metric_key,
    parse_model_uri,
    resolve_model,
    tracked_run,
)

mlflow = pytest.importorskip("mlflow")


def store_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def runs_of(config: MlflowConfig, kind: str) -> list:
    client = client_of(config)
    experiment = client.get_experiment_by_name(config.experiment)
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`clinlinker.kind` = '{kind}'")


def _train_config(tmp_path: Path, tiny_encoder_dir: Path, uri: str) -> Path:
    conf = tmp_path / "bi.yaml"
    conf.write_text(
        f"base_model: {tiny_encoder_dir}\noutput_dir: {tmp_path / 'tiny-bi'}\n"
        "data:\n  sources:\n"
        f"    - {{path: {sample_path('cie10_es.csv')}, format: cie10}}\n"
        f"    - {{path: {sample_path('codiesp_train_sample.tsv')}, format: codiesp, "
        "labels: [DIAGNOSTICO]}\n"
        "optim: {batch_size: 16, max_steps: 3, learning_rate: 1e-4}\n"
        "run: {progress: false, resume: never, log_every: 1}\n"
        f"mlflow: {{tracking_uri: '{uri}', experiment: tests}}\n", encoding="utf-8")
    return conf


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_encoder_dir):
    """A bi-encoder trained for 3 steps with tracking on, then an index built from its
    models:/ URI: (store root, MlflowConfig, model directory, index directory)."""
    root = tmp_path_factory.mktemp("mlflow-store")
    tmp = tmp_path_factory.mktemp("tracked-training")
    config = MlflowConfig(tracking_uri=store_uri(root), experiment="tests")
    assert main(["train-biencoder", "--config",
                 str(_train_config(tmp, tiny_encoder_dir, config.tracking_uri))]) == 0
    index = tmp / "index"
    assert main(["build-index", "--source", f"cie10={sample_path('cie10_es.csv')}",
                 "--encoder", "models:/tiny-bi/1", "--out", str(index),
                 "--set", f"mlflow.tracking_uri={config.tracking_uri}"]) == 0
    return root, config, tmp / "tiny-bi", index


def test_a_training_run_logs_params_step_metrics_and_a_registered_version(trained) -> None:
    _, config, model_dir, _ = trained
    (run,) = runs_of(config, "train-biencoder")
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.max_steps"] == "3"
    assert run.data.params["loss.name"] == "multi_similarity"
    # the card's data hashes
    assert any(k.startswith("trained_from.") and len(v) == 64
               for k, v in run.data.params.items())
    history = client_of(config).get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert "examples_per_s" in run.data.metrics
    assert run.data.metrics["steps"] == 3
    versions = client_of(config).search_model_versions("name='tiny-bi'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].tags["clinlinker.model_hash"] == model_hash(model_dir)
    assert versions[0].tags["clinlinker.encoder.pooling"] == "mean"
    assert versions[0].run_id == run.info.run_id
    beside = json.loads((model_dir / RUN_FILE).read_text())
    assert beside["run_id"] == run.info.run_id
    assert beside["registered"]["uri"] == "models:/tiny-bi/1"


def test_a_models_uri_resolves_to_the_same_files_and_hash_as_the_directory(trained) -> None:
    _, config, model_dir, index = trained
    by_version = resolve_model("models:/tiny-bi/1", config)
    assert by_version.registered == {"uri": "models:/tiny-bi/1", "name": "tiny-bi",
                                     "version": "1"}
    assert Path(by_version.path) != model_dir
    assert model_hash(by_version.path) == model_hash(model_dir)
    assert (sorted(p.name for p in Path(by_version.path).iterdir())
            == sorted(p.name for p in model_dir.iterdir()))
    client_of(config).set_registered_model_alias("tiny-bi", "champion", "1")
    for alias_uri in ("models:/tiny-bi@champion", "models:/tiny-bi/champion"):
        found = resolve_model(alias_uri, config)
        assert found.path == by_version.path and found.version == "1"
    with pytest.raises(ArtifactError, match="models:/tiny-bi/7"):
        resolve_model("models:/tiny-bi/7", config)
    assert parse_model_uri("models:/a-b/12") == ("a-b", "12", "")
    # an index built from the URI records it, with the hash of the same files
    manifest = read_manifest(index)
    assert manifest["encoder_registered"]["uri"] == "models:/tiny-bi/1"
    assert manifest["encoder"]["model_hash"] == model_hash(model_dir)


def test_evaluate_logs_a_run_and_its_headline_on_the_training_run(trained, tmp_path) -> None:
    _, config, _, index = trained
    assert main(["evaluate", "--gold", str(sample_path("codiesp_dev_sample.tsv")),
                 "--gold-format", "codiesp", "--index", str(index),
                 "--encoder", "models:/tiny-bi/1", "--k", "1,5",
                 "--tracking-uri", config.tracking_uri, "--experiment", "tests"]) == 0
    (run,) = runs_of(config, "evaluate")
    assert run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["results.dense.subsets.all.acc_at_1"] <= 1.0
    assert run.data.tags["clinlinker.registered.encoder"] == "models:/tiny-bi/1"
    (training,) = runs_of(config, "train-biencoder")
    key = metric_key("evaluation.codiesp_dev_sample.dense+exact_prior.all.acc@1")
    assert key == "evaluation.codiesp_dev_sample.dense_exact_prior.all.acc_at_1"
    assert (training.data.metrics[key]
            == run.data.metrics["results.dense_exact_prior.subsets.all.acc_at_1"])


# --------------------------------------------------------------------------------------------
# Nights


def _tracked(config, root: Path):
    return dataclasses.replace(config, mlflow=MlflowConfig(tracking_uri=store_uri(root),
                                                           experiment="nights"))


@pytest.mark.spark
def test_a_link_night_logs_its_summary_and_a_failed_one_is_marked_failed(
        spark, tmp_path, trained, sample_index) -> None:  # noqa: F811
    from clinlinker_spark.spark.pipeline import run_link_job

    root = tmp_path / "store"
    # the encoder from the registry, the index built with its directory's twin
    config = _tracked(job_config(tmp_path, trained[2], trained[3], "output.writer=deltalake",
                                 "encoder.path=models:/tiny-bi/1"), root)
    config = dataclasses.replace(config, mlflow=dataclasses.replace(
        config.mlflow, registry_uri=trained[1].tracking_uri))
    from clinlinker_spark.spark.dry_run import plan_link_job

    plan = plan_link_job(spark, config)["artifacts"]
    assert plan["registered_models"]["encoder"]["uri"] == "models:/tiny-bi/1"
    assert plan["encoder"]["model_version"] == model_hash(trained[2])
    summary = run_link_job(spark, config, run_id="night-1")
    (run,) = runs_of(config.mlflow, "link")
    assert run.info.run_id == summary.mlflow_run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["clinlinker.run_id"] == "night-1"
    assert run.data.tags["clinlinker.model_version"] == model_hash(trained[2])
    assert run.data.tags["clinlinker.registered.encoder"] == "models:/tiny-bi/1"
    assert summary.registered_models["encoder"]["version"] == "1"
    metrics = run.data.metrics
    assert metrics["rows_written"] == summary.rows_written == len(read_table(
        config.output.path))
    for status, n in summary.counts_by_status.items():
        assert metrics[f"counts_by_status.{status}"] == n
    assert metrics["table_version"] == summary.table_version
    assert metrics["form_cache.hits"] == 0 and "timings_s.total" in metrics
    assert set(summary.timings_s) <= {k.split(".", 1)[1] for k in metrics
                                      if k.startswith("timings_s.")}
    # a night whose input cannot be read: its run is failed, with the error's class
    bad = tmp_path / "not-parquet"
    bad.mkdir()
    (bad / "part-0.parquet").write_text("not parquet", encoding="utf-8")
    failing = dataclasses.replace(config, input=dataclasses.replace(
        config.input, path=str(bad), format="parquet", passthrough_columns=()))
    with pytest.raises(InputDataError):
        run_link_job(spark, failing, run_id="night-2")
    failed = [r for r in runs_of(config.mlflow, "link") if r.info.status == "FAILED"]
    assert len(failed) == 1
    assert failed[0].data.tags["clinlinker.run_id"] == "night-2"
    assert failed[0].data.tags["clinlinker.error_class"] == "InputDataError"
    assert_no_mention_text(root, read_gold(sample_path("codiesp_dev_sample.tsv"), "codiesp"))


def test_a_failed_block_ends_its_run_failed_with_the_error_class_only(tmp_path) -> None:
    config = MlflowConfig(tracking_uri=store_uri(tmp_path), experiment="errors")
    with pytest.raises(ValueError):
        with tracked_run(config, "link") as run:
            raise ValueError("a message quoting data: dolor torácico")
    (found,) = runs_of(config, "link")
    assert found.info.run_id == run.run_id and found.info.status == "FAILED"
    assert found.data.tags["clinlinker.error_class"] == "ValueError"
    assert "torácico" not in json.dumps(found.data.tags)
    with tracked_run(MlflowConfig(tracking_uri=""), "link") as off:
        assert not off.enabled and off.run_id == ""
    # a store that cannot be opened: the block runs untracked
    with tracked_run(MlflowConfig(tracking_uri="sqlite:////proc/no-store/mlflow.db"),
                     "link") as unusable:
        assert not unusable.enabled


def assert_no_mention_text(root: Path, mentions: pd.DataFrame, skip: tuple[str, ...] = ()
                           ) -> None:
    """No mention text of ``mentions`` (those of 8+ characters, as Python stores them and
    as JSON escapes them) in the store's database or in any file of its artifacts but those
    under a registered model's ``model`` folder or a folder named in ``skip``."""
    texts = {t for t in mentions["text"].dropna() if len(t) >= 8}
    needles = {t.encode() for t in texts} | {json.dumps(t)[1:-1].encode() for t in texts}
    files = [root / "mlflow.db"] + [
        p for p in (root / "artifacts").rglob("*") if p.is_file()
        and "model" not in p.relative_to(root / "artifacts").parts[2:3]
        and not any(s in p.parts for s in skip)]
    assert files[0].is_file()
    with sqlite3.connect(root / "mlflow.db") as db:
        rows = [str(r) for table in ("params", "tags", "metrics", "latest_metrics",
                                     "experiment_tags", "model_version_tags")
                for r in db.execute(f"SELECT * FROM {table}")]  # noqa: S608
    dump = "\n".join(rows).encode()
    for f in files:
        data = f.read_bytes() + dump
        found = [n for n in needles if n in data]
        assert not found, f"mention text in {f}: {found[:1]}"


# --------------------------------------------------------------------------------------------
# The linker as a served model


@pytest.fixture(scope="module")
def pyfunc_model(tmp_path_factory, tiny_encoder_dir, sample_index):  # noqa: F811
    """The hybrid linker with a ranker (trained on first use) exported with export-pyfunc
    and registered: (config, model folder, store root)."""
    tmp = tmp_path_factory.mktemp("pyfunc")
    root = tmp / "store"
    config = with_ranker(job_config(tmp, tiny_encoder_dir, sample_index, *HYBRID,
                                    "build_missing=true"), tmp / "ranker")
    conf = tmp / "job.yaml"
    from clinlinker_spark.config import to_dict

    data = to_dict(dataclasses.replace(config, spark=TEST_SPARK))
    data["mlflow"] = {"tracking_uri": store_uri(root), "experiment": "serving"}
    import yaml

    conf.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["export-pyfunc", "--config", str(conf), "--out", str(tmp / "pyfunc"),
                 "--register", "clinlinker-linker"]) == 0
    return load_config(conf), tmp / "pyfunc", root


def test_the_pyfunc_models_predictions_equal_the_core_linker(pyfunc_model) -> None:
    import mlflow.pyfunc

    config, folder, root = pyfunc_model
    mentions = read_gold(sample_path("codiesp_dev_sample.tsv"), "codiesp").head(60)
    mentions = pd.concat([mentions[["mention_id", "text"]],
                          pd.DataFrame({"mention_id": ["blank"], "text": ["   "]})],
                         ignore_index=True)
    model = mlflow.pyfunc.load_model(str(folder))
    got = model.predict(mentions)
    want = Linker.from_config(config).link(mentions)
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got.drop(columns=["candidates"]),
                                  want.drop(columns=["candidates"]))
    assert got["candidates"].tolist() == want["candidates"].tolist()
    assert got.loc[got["mention_id"] == "blank", "status"].item() == "invalid_input"
    assert got["confidence"].notna().sum() > 0  # the ranker is bundled
    # registered: the same model from the registry
    from_registry = mlflow.pyfunc.load_model(
        str(resolve_model("models:/clinlinker-linker/1", config.mlflow).path))
    assert from_registry.predict(mentions.head(5))["code"].tolist() == want["code"].head(
        5).tolist()
    # no pickle in the model
    assert not [p for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle")]
    assert_no_mention_text(root, read_gold(sample_path("codiesp_dev_sample.tsv"), "codiesp"),
                           skip=("pyfunc",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_look_up_on_loopback(pyfunc_model) -> None:
    config, folder, _ = pyfunc_model
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder), "-h",
         "127.0.0.1", "-p", str(port), "--env-manager", "local"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        # the server runs the environment's uvicorn: its bin folder on the PATH
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    body = json.dumps({"dataframe_split": {"columns": ["mention_id", "text"],
                                           "data": [["m1", "dolor torácico"]]}}).encode()
    try:
        answer = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations", data=body,
                    headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                time.sleep(1)
        assert answer is not None, server.stderr.read().decode()[-2000:] if server.poll() \
            is not None else "no answer in 120 s"
    finally:
        server.terminate()
        server.wait(timeout=30)
    (row,) = answer["predictions"]
    want = Linker.from_config(config).link(pd.DataFrame({"mention_id": ["m1"],
                                                         "text": ["dolor torácico"]}))
    assert row["mention_id"] == "m1" and row["code"] == want["code"].item()
    assert row["status"] == want["status"].item()


def test_mlflow_sends_no_telemetry_when_the_package_is_imported_first() -> None:
    """Outside CI MLflow sends usage telemetry unless told not to: importing the package
    first turns it off (a clean environment: none of the CI variables MLflow looks at)."""
    code = ("import clinlinker_spark, mlflow\n"
            "from mlflow.telemetry.utils import is_telemetry_disabled\n"
            "print(is_telemetry_disabled())")
    ci_markers = {"PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI",
                  "JENKINS_URL", "TRAVIS", "TF_BUILD", "BITBUCKET_BUILD_NUMBER",
                  "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
                  "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME",
                  "RUNBOT_WORKER_ID", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}
    env = {k: v for k, v in os.environ.items() if k not in ci_markers}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[-1] == "True"
    # the check can fail: without the package, the same environment has telemetry on
    bare = subprocess.run([sys.executable, "-c", code.replace("clinlinker_spark, ", "")],
                          env=env, capture_output=True, text=True, check=True).stdout.split()
    assert bare[-1] == "False"
