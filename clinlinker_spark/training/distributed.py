"""Bi-encoder training under pyspark's TorchDistributor (a Spark cluster's GPUs, or local).

``TorchDistributor(num_processes, local_mode, use_gpu).run(...)`` starts ``torchrun`` with
``num_processes`` workers: on the driver (``local_mode=True``) or in barrier-mode Spark tasks
(``local_mode=False``, one process per task, GPUs assigned by Spark). Each worker runs
:func:`~clinlinker_spark.training.biencoder.train_biencoder`, which sees torchrun's
``WORLD_SIZE`` / ``RANK``, joins the process group (gloo on CPU, nccl on GPU), wraps the model in
DistributedDataParallel when there is more than one worker, takes every ``world``-th
micro-batch, and writes checkpoints and the output directory from rank 0 only.

Nothing is pickled by this module: the distributor runs a small launcher file (written to a
temporary folder) with the path of the config as a JSON file, and the result is read back
from the output directory's training card. (TorchDistributor's *function* mode would
cloudpickle a function and its result; the file mode does not.)

The output and checkpoint directories must be on storage every worker's rank 0 can write and
the driver can read (local disk in local mode; DBFS / a shared volume on a cluster).

Tested on local mode with one process (tests/test_training.py); the same call with
``local_mode=False, use_gpu=True, num_processes=N`` runs on N GPU tasks of a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clinlinker_spark.config import load_config, to_dict
from clinlinker_spark.errors import ArtifactError
from clinlinker_spark.training.config import BiEncoderTrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

_LAUNCHER = (
    "from clinlinker_spark.training.distributed import worker_main\n"
    "raise SystemExit(worker_main())\n"
)


def run_biencoder_distributed(
    spark: SparkSession,
    config: BiEncoderTrainConfig,
    num_processes: int = 1,
    local_mode: bool = True,
    use_gpu: bool = False,
) -> dict[str, Any]:
    """Train ``config`` under TorchDistributor; returns the training card (a dict).

    ``spark`` is the active session the distributor runs on (passed in, never created here).
    Raises ArtifactError when the run ends without an output directory.
    """
    from pyspark.ml.torch.distributor import TorchDistributor

    del spark  # TorchDistributor uses the active session; taking it makes the dependency explicit
    work = Path(tempfile.mkdtemp(prefix="clinlinker-torchrun-"))
    config_path = work / "config.json"
    config_path.write_text(json.dumps(to_dict(config), ensure_ascii=False), encoding="utf-8")
    launcher = work / "train_biencoder_worker.py"
    launcher.write_text(_LAUNCHER, encoding="utf-8")
    log.info("TorchDistributor: %d process(es), local_mode=%s, use_gpu=%s", num_processes,
             local_mode, use_gpu)
    distributor = TorchDistributor(num_processes=num_processes, local_mode=local_mode,
                                   use_gpu=use_gpu)
    distributor.run(str(launcher), "--config", str(config_path))
    card_path = Path(config.output_dir) / "training_card.json"
    if not card_path.is_file():
        raise ArtifactError(f"distributed training ended without writing {card_path}")
    return json.loads(card_path.read_text(encoding="utf-8"))


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of one torchrun worker: ``--config CONFIG.json``."""
    import argparse

    from clinlinker_spark.training.biencoder import train_biencoder

    parser = argparse.ArgumentParser(prog="clinlinker-train-biencoder-worker")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = load_config(args.config, cls=BiEncoderTrainConfig)
    result = train_biencoder(config)
    log.info("worker rank %s finished at step %d", rank, result.global_step)
    return 0


__all__ = ["run_biencoder_distributed", "worker_main"]
