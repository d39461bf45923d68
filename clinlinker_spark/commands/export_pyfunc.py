"""``clinlinker export-pyfunc``: the job's linker as an MLflow pyfunc model, for online
look-ups through MLflow model serving (``mlflow models serve -m <folder>``)."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-pyfunc", help="write the linker (encoder, index, re-ranker, ranker) as an "
        "MLflow pyfunc model", description=__doc__ + " The models and the index are the "
        "job config's (directories or models:/ URIs; built or trained first where missing "
        "and build_missing); predict takes a DataFrame of mention_id and text and returns "
        "the core Linker's rows.",
    )
    p.add_argument("--config", default=None, help="job config YAML (conf/local.yaml, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. linking.review_below=0.7 (repeatable)")
    p.add_argument("--out", required=True, help="the pyfunc model's folder (must not exist)")
    p.add_argument("--register", default="", metavar="NAME",
                   help="also log the model to an MLflow run (mlflow.tracking_uri) and "
                   "register it under NAME")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from clinlinker_spark.config import load_config, to_dict
    from clinlinker_spark.errors import ConfigError
    from clinlinker_spark.serving import save_pyfunc
    from clinlinker_spark.spark.artifacts import resolve_artifacts
    from clinlinker_spark.tracking import log_trained_model, tracked_run

    config = load_config(args.config, args.set)
    art = resolve_artifacts(config)
    artifacts = {"encoder": art.encoder_path, "index": art.index_path,
                 **({"reranker": art.reranker_path} if art.reranker_path else {}),
                 **({"ranker": art.ranker_path} if art.ranker_path else {}),
                 **({"context_reranker": art.context_reranker_path,
                     "context_ranker": art.context_ranker_path} if art.context_version
                    else {})}
    out = save_pyfunc(config, args.out, artifacts)
    run_id = ""
    if args.register:
        mlflow = dataclasses.replace(config.mlflow, register=True,
                                     registered_model=args.register)
        if not mlflow.enabled:
            raise ConfigError("--register needs mlflow.tracking_uri")
        with tracked_run(mlflow, "export-pyfunc", args.register) as tracked:
            tracked.log_params(to_dict(config))
            log_trained_model(tracked, out, {}, {}, {"clinlinker.model_kind": "pyfunc-linker",
                                                    **{f"clinlinker.{k}": v
                                                       for k, v in art.versions.items()},
                                                    **({"clinlinker.context_version":
                                                        art.context_version}
                                                       if art.context_version else {})})
        run_id = tracked.run_id
    print(json.dumps({"pyfunc_model": str(out), **art.versions,
                      "context_version": art.context_version,
                      "registered_models": art.registered, "mlflow_run": run_id or None}))
    return 0
