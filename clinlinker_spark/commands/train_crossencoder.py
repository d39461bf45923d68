"""``clinlinker train-crossencoder``: a re-ranker trained on hard negatives that the trained
bi-encoder mines from its index."""

from __future__ import annotations

import argparse
import json
import logging

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
    from clinlinker_spark.config import load_config
    from clinlinker_spark.training.config import CrossEncoderTrainConfig
    from clinlinker_spark.training.crossencoder import train_crossencoder

    config = load_config(args.config, args.set, cls=CrossEncoderTrainConfig)
    result = train_crossencoder(config)
    card = result.card
    summary = {"output_dir": str(result.output_dir), "steps": result.global_step,
               "wall_time_s": card.get("wall_time_s"),
               "final_loss": card.get("metrics", {}).get("final_loss_mean_last_10pct"),
               "mining": card.get("data", {}).get("mining")}
    print(json.dumps(summary))
    return 0
