"""``clinlinker train-crossencoder``: a re-ranker trained on hard negatives that the trained
bi-encoder mines from its index."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-crossencoder", help="train a cross-encoder re-ranker on mined hard negatives",
        description=__doc__,
    )
    p.add_argument("--config", required=True, help="training config YAML "
                   "(conf/train_crossencoder.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. negatives.per_query=15 (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clinlinker_spark.config import load_config, to_dict
    from clinlinker_spark.modeling import model_hash
    from clinlinker_spark.tracking import log_trained_model, tracked_run
    from clinlinker_spark.training.config import CrossEncoderTrainConfig
    from clinlinker_spark.training.crossencoder import train_crossencoder

    config = load_config(args.config, args.set, cls=CrossEncoderTrainConfig)
    with tracked_run(config.mlflow, "train-crossencoder", Path(config.output_dir).name) as run:
        run.log_params(to_dict(config))
        result = train_crossencoder(config)
        card = result.card
        biencoder = card.get("data", {}).get("biencoder", {})
        log_trained_model(run, result.output_dir, card, card.get("metrics", {}), {
            "clinlinker.model_kind": card.get("kind", ""),
            "clinlinker.model_hash": model_hash(result.output_dir),
            "clinlinker.biencoder_model_hash": biencoder.get("model_hash", ""),
            "clinlinker.context": config.context})
    summary = {"output_dir": str(result.output_dir), "steps": result.global_step,
               "wall_time_s": card.get("wall_time_s"),
               "final_loss": card.get("metrics", {}).get("final_loss_mean_last_10pct"),
               "mining": card.get("data", {}).get("mining"), "mlflow_run": run.run_id or None}
    print(json.dumps(summary))
    return 0
