"""``clinlinker train-biencoder``: SapBERT-style training of a bi-encoder (synonym pairs)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-biencoder", help="train a bi-encoder on terminology synonyms + gold mentions",
        description=__doc__,
    )
    p.add_argument("--config", required=True, help="training config YAML "
                   "(conf/train_biencoder.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. optim.batch_size=64 (repeatable)")
    p.add_argument("--distributed", action="store_true",
                   help="run under pyspark's TorchDistributor (local mode unless "
                   "--no-local-mode)")
    p.add_argument("--num-processes", type=int, default=1, help="TorchDistributor processes")
    p.add_argument("--no-local-mode", action="store_true",
                   help="TorchDistributor on Spark executors instead of the driver")
    p.add_argument("--use-gpu", action="store_true", help="TorchDistributor use_gpu=True")
    p.add_argument("--spark-master", default="local[2]",
                   help="master of the SparkSession built for --distributed (ignored when a "
                   "session already exists, e.g. under spark-submit)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the base model and read the training sources, print what the "
                   "training would do as JSON, and stop: nothing is trained or written")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clinlinker_spark.config import load_config, to_dict
    from clinlinker_spark.modeling import model_hash
    from clinlinker_spark.tracking import log_trained_model, tracked_run
    from clinlinker_spark.training.config import BiEncoderTrainConfig

    config = load_config(args.config, args.set, cls=BiEncoderTrainConfig)
    if args.dry_run:
        print(json.dumps(plan_training(config, args), indent=2))
        return 0
    with tracked_run(config.mlflow, "train-biencoder", Path(config.output_dir).name) as run:
        run.log_params(to_dict(config))
        out, steps, card = _train(config, args)
        log_trained_model(run, out, card, card.get("metrics", {}),
                          encoder_tags(card.get("model_hash") or model_hash(out), card))
    summary = {"output_dir": out, "steps": steps, "wall_time_s": card.get("wall_time_s"),
               "final_loss": card.get("metrics", {}).get("final_loss_mean_last_10pct"),
               "mlflow_run": run.run_id or None}
    print(json.dumps(summary))
    return 0


def _train(config: Any, args: argparse.Namespace) -> tuple[str, int, dict[str, Any]]:
    """Train (in this process, or under TorchDistributor): (output directory, steps, card)."""
    if args.distributed:
        from clinlinker_spark.config import SparkConfig
        from clinlinker_spark.spark.session import build_spark_session
        from clinlinker_spark.training.distributed import run_biencoder_distributed

        spark = build_spark_session(SparkConfig(master=args.spark_master,
                                                app_name="clinlinker-train-biencoder"))
        card = run_biencoder_distributed(spark, config, num_processes=args.num_processes,
                                         local_mode=not args.no_local_mode,
                                         use_gpu=args.use_gpu)
        out, steps = config.output_dir, card["metrics"]["steps"]
    else:
        from clinlinker_spark.training.biencoder import train_biencoder

        result = train_biencoder(config)
        out, steps, card = str(result.output_dir), result.global_step, result.card
    return out, steps, card


def encoder_tags(model_hash: str, card: dict[str, Any]) -> dict[str, Any]:
    """The registered version's tags: the model's hash and the encoder contract an index built
    with it records (pooling, max length, prefix)."""
    contract = card.get("config", {}).get("encoder", {})
    return {"clinlinker.model_kind": card.get("kind", ""), "clinlinker.model_hash": model_hash,
            **{f"clinlinker.encoder.{k}": v for k, v in contract.items()}}


def plan_training(config: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What ``train-biencoder`` would do: the base model (checked, not loaded), the training
    sources (read: terms and codes), the output directory and the processes."""
    from clinlinker_spark.config import TerminologyConfig
    from clinlinker_spark.errors import ConfigError
    from clinlinker_spark.modeling import check_model_dir
    from clinlinker_spark.terminology import load_terminology

    check_model_dir(config.base_model)
    if not config.data.sources:
        raise ConfigError("data.sources is empty: nothing to train on")
    terms = load_terminology(TerminologyConfig(sources=config.data.sources))
    return {"job": "train-biencoder", "base_model": config.base_model,
            "output_dir": config.output_dir, "sources": [s.path or s.format
                                                         for s in config.data.sources],
            "terms": int(len(terms)), "codes": int(terms["code"].nunique()),
            "epochs": config.optim.epochs, "batch_size": config.optim.batch_size,
            "distributed": bool(args.distributed),
            "processes": args.num_processes if args.distributed else 1,
            "use_gpu": bool(args.use_gpu)}
