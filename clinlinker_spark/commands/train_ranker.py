"""``clinlinker train-ranker``: the learned final ranker and its calibrated confidence,
trained out of fold on the training mentions the index holds."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-ranker", help="train the final ranker and its confidence calibration",
        description=__doc__ + " The config is a job config (conf/train_ranker.yaml): its "
        "encoder, index, terminology (the sources the index was built from), reranker, "
        "linking and ranker sections; the ranker is written to ranker.path.",
    )
    p.add_argument("--config", required=True, help="job config YAML (conf/train_ranker.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. ranker.model=logistic (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ranker")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clinlinker_spark.config import load_config
    from clinlinker_spark.errors import ConfigError
    from clinlinker_spark.training.ranker import train_ranker_tracked

    config = load_config(args.config, args.set)
    if not config.ranker.path:
        raise ConfigError("ranker.path: where to write the ranker is required")
    spec, run_id = train_ranker_tracked(config, config.ranker.path, overwrite=args.overwrite)
    print(json.dumps({"ranker": config.ranker.path, "model_type": spec["model_type"],
                      "metrics": spec["metrics"], "thresholds": spec["thresholds"],
                      "wall_seconds": spec["wall_seconds"], "mlflow_run": run_id or None}))
    return 0
