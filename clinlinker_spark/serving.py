"""The linker as an MLflow pyfunc model (``clinlinker export-pyfunc``), for online look-ups.

:func:`save_pyfunc` writes an MLflow model directory that bundles the bi-encoder, the index,
the re-ranker and the ranker as the model's artifacts, the linking settings as
``linker_config.json``, and this module as the model's code (MLflow's models-from-code: the
model object is built by importing this file, never unpickled). Loaded with
``mlflow.pyfunc.load_model``, or served with ``mlflow models serve``, ``predict`` takes a
pandas DataFrame of mentions (``mention_id`` and ``text``) and returns what
``Linker.link`` returns for them: the same columns, one row per mention, invalid texts
with status ``invalid_input`` and a reason. A model exported with a context stage also
bundles its cross-encoder and ranker; mentions that come with ``context``,
``context_start`` and ``context_end`` columns then go through it as in the job.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIG_ARTIFACT = "linker_config"
CONFIG_FILE = "linker_config.json"
# the JobConfig sections a pyfunc model's Linker is built from
LINKER_SECTIONS = ("encoder", "index", "reranker", "ranker", "linking", "context")
# the sections whose path is a bundled artifact (the artifact's key is the section's name)
ARTIFACT_SECTIONS = ("encoder", "index", "reranker", "ranker")
# the context stage's bundled artifacts: artifact key -> key of the context section
CONTEXT_ARTIFACTS = {"context_reranker": "reranker", "context_ranker": "ranker"}
# the columns predict reads a mention's context from, when the input has them
CONTEXT_INPUT = ("context", "context_start", "context_end")


def linker_config(config: Any, paths: dict[str, str]) -> dict[str, Any]:
    """The linker sections of a JobConfig as a dict, with ``paths`` (section -> directory)
    as the sections' paths ("" where the config has no such model)."""
    from clinlinker_spark.config import to_dict

    sections = {name: to_dict(getattr(config, name)) for name in LINKER_SECTIONS}
    for section in ARTIFACT_SECTIONS:
        sections[section]["path"] = paths.get(section, "")
    for artifact, key in CONTEXT_ARTIFACTS.items():
        sections["context"][key] = paths.get(artifact, "")
    return sections


def load_linker(config_file: str | Path, artifacts: dict[str, str]) -> Any:
    """The Linker of a pyfunc model: ``linker_config.json`` with the artifacts' local paths."""
    from clinlinker_spark.config import JobConfig, from_dict
    from clinlinker_spark.linker import Linker

    sections = json.loads(Path(config_file).read_text(encoding="utf-8"))
    for section in ARTIFACT_SECTIONS:
        sections[section]["path"] = artifacts.get(section, "")
    for artifact, key in CONTEXT_ARTIFACTS.items():
        sections.setdefault("context", {})[key] = artifacts.get(artifact, "")
    sections["mlflow"] = {"tracking_uri": ""}  # nothing to resolve: the files are bundled
    return Linker.from_config(from_dict(JobConfig, sections))


def save_pyfunc(config: Any, out_dir: str | Path, artifacts: dict[str, str]) -> Path:
    """Write the pyfunc model of the linker ``config`` describes to ``out_dir``, bundling
    ``artifacts`` (encoder, index, and reranker / ranker where the config has them: key ->
    local directory). ``out_dir`` must not exist."""
    import tempfile

    import mlflow.pyfunc

    from clinlinker_spark import __version__

    out = Path(out_dir)
    if out.exists():
        from clinlinker_spark.errors import ConfigError

        raise ConfigError(f"{out} already exists: choose a new folder for the pyfunc model")
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / CONFIG_FILE
        config_file.write_text(json.dumps(linker_config(config, artifacts), indent=2) + "\n",
                               encoding="utf-8")
        mlflow.pyfunc.save_model(
            path=str(out), python_model=str(Path(__file__).resolve()),
            artifacts={CONFIG_ARTIFACT: str(config_file), **artifacts},
            # the serving environment installs the package (and, through it, torch,
            # transformers, faiss, lightgbm); inferring requirements would import the model
            pip_requirements=[f"clinlinker-spark=={__version__}",
                              f"mlflow=={mlflow.__version__}"],
        )
    log.info("pyfunc model written to %s (%s)", out, ", ".join(sorted(artifacts)))
    return out


def _define_model() -> None:
    """Define and set the pyfunc model: runs when MLflow loads this file as model code."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import set_model

    class LinkerModel(mlflow.pyfunc.PythonModel):
        """``predict``: ``Linker.link`` of a DataFrame of mentions (``mention_id``, ``text``;
        a DataFrame without ``mention_id`` gets its row positions), with the context columns
        (CONTEXT_INPUT) when the model has a context stage and the input has them."""

        def load_context(self, context: Any) -> None:
            self.linker = load_linker(context.artifacts[CONFIG_ARTIFACT], context.artifacts)

        def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
            frame = (model_input if isinstance(model_input, pd.DataFrame)
                     else pd.DataFrame(model_input))
            if "mention_id" not in frame.columns:
                frame = frame.assign(mention_id=[str(i) for i in range(len(frame))])
            with_context = (self.linker.context_stage is not None
                            and all(c in frame.columns for c in CONTEXT_INPUT))
            return self.linker.link(frame, context_columns=CONTEXT_INPUT if with_context
                                    else None)

    set_model(LinkerModel())


if __name__ != "clinlinker_spark.serving":  # loaded by MLflow as the model's code file
    _define_model()
