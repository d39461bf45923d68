"""Machinery shared by the bi-encoder and cross-encoder trainers.

- seeding, AdamW with a linear warm-up / linear decay schedule;
- length-sorted, chunked forward passes (little padding on short clinical mentions);
- checkpoints without pickle: model weights and optimizer state in safetensors (optimizer
  tensors flattened to ``"<param index>.<name>"``), scalars (param groups, scheduler, AMP
  scaler, trainer position) in JSON, the torch RNG states as uint8 tensors; resuming restores
  all of it, so the next step equals the step an uninterrupted run takes;
- the output directory: ``save_pretrained`` (safetensors) + tokenizer + ``training_card.json``,
  written beside the target and renamed into place;
- device description, library versions, torch.distributed set-up (torchrun / TorchDistributor).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import platform
import random
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clinlinker_spark.errors import ArtifactError, ConfigError
from clinlinker_spark.fsutil import publish_directory
from clinlinker_spark.modeling import (
    autocast_context,
    pad_batch,
    resolve_device,
    set_torch_threads,
)
from clinlinker_spark.tracking import log_step
from clinlinker_spark.training.config import OptimConfig, RunConfig

log = logging.getLogger(__name__)

CARD_NAME = "training_card.json"
CHECKPOINT_PREFIX = "step-"
_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "LayerNorm.bias")


# --------------------------------------------------------------------------------------------
# Seeds, optimizer, schedule


def seed_everything(seed: int) -> None:
    """Seed Python, numpy's global generator and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_optimizer(
    model: torch.nn.Module,
    learning_rate: float,
    weight_decay: float,
    head_learning_rate: float = 0.0,
    is_head: Callable[[str], bool] | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and LayerNorm weights.

    Parameters named so that ``is_head(name)`` is true (a freshly initialised head) train with
    ``head_learning_rate`` when it is > 0. Group order is fixed (decay, no decay, then the
    head's), so optimizer state saved in a checkpoint maps back onto the same parameters.
    """
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {
        (False, True): [], (False, False): [], (True, True): [], (True, False): []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = bool(head_learning_rate > 0 and is_head is not None and is_head(name))
        buckets[(head, not name.endswith(_NO_DECAY))].append(param)
    groups = []
    for (head, decay), params in buckets.items():
        if params:
            group: dict[str, Any] = {"params": params,
                                     "weight_decay": weight_decay if decay else 0.0}
            if head:
                group["lr"] = head_learning_rate
            groups.append(group)
    return torch.optim.AdamW(groups, lr=learning_rate)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                   warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    total = max(1, total_steps)
    warm = max(0, min(warmup_steps, total - 1))

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def freeze_parameters(model: torch.nn.Module, word_embeddings: bool, n_layers: int) -> None:
    """Stop training the word embeddings and/or the embeddings + first ``n_layers`` layers.

    Frozen bottom layers also save their backward pass (about a third of a step on CPU).
    Works for BERT-style models (``base_model.embeddings``, ``base_model.encoder.layer``).
    """
    if word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if n_layers <= 0:
        return
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    embeddings = getattr(base, "embeddings", None)
    if layers is None or embeddings is None:
        raise ConfigError(f"optim.freeze_layers: {type(model).__name__} has no "
                          "base_model.embeddings / base_model.encoder.layer")
    if n_layers >= len(layers):
        raise ConfigError(f"optim.freeze_layers={n_layers} would freeze all {len(layers)} "
                          "layers")
    embeddings.requires_grad_(False)
    for layer in layers[:n_layers]:
        layer.requires_grad_(False)


def schedule_length(micro_batches_per_epoch: int, accumulation: int, epochs: int,
                    max_steps: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) of a run."""
    per_epoch = micro_batches_per_epoch // accumulation
    if per_epoch <= 0:
        raise ConfigError(
            f"too little training data: {micro_batches_per_epoch} micro-batch(es) per epoch "
            f"for gradient_accumulation {accumulation}; lower optim.batch_size"
        )
    total = max_steps if max_steps > 0 else per_epoch * epochs
    return per_epoch, total


# --------------------------------------------------------------------------------------------
# Forward passes


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """CLS or attention-masked mean pooling of hidden states [b, t, d] -> [b, d] (fp32)."""
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def forward_in_chunks(
    run_chunk: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    features: dict[str, list[list[int]]],
    indices: list[int],
    chunk: int,
    pad_id: int,
    pad_type_id: int,
    device: torch.device,
) -> torch.Tensor:
    """Run ``run_chunk`` on length-sorted chunks of the tokenised rows ``indices``.

    ``run_chunk`` maps a padded batch (tensors [c, t] on ``device``) to one output row per
    text [c, ...]; the rows are returned in the order of ``indices`` ([len(indices), ...]),
    with the autograd graph kept (training). Sorting by length keeps padding small.
    """
    order = sorted(range(len(indices)), key=lambda i: -len(features["input_ids"][indices[i]]))
    outputs: list[torch.Tensor] = []
    for start in range(0, len(order), chunk):
        part = [indices[i] for i in order[start:start + chunk]]
        batch = {k: v.to(device) for k, v in pad_batch(features, part, pad_id,
                                                        pad_type_id).items()}
        outputs.append(run_chunk(batch))
    stacked = torch.cat(outputs, dim=0)
    inverse = torch.empty(len(order), dtype=torch.long, device=stacked.device)
    inverse[torch.as_tensor(order, device=stacked.device)] = torch.arange(
        len(order), device=stacked.device)
    return stacked[inverse]


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> Any:
    return autocast_context(device, dtype)


# --------------------------------------------------------------------------------------------
# Checkpoints (no pickle)


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor],
                                                                   dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = []
    for group in state["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()})
    return tensors, {"param_groups": groups, "state_scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta.get("state_scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for group in meta["param_groups"]:
        groups.append({k: (tuple(v) if isinstance(v, list) and k != "params" else v)
                       for k, v in group.items()})
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = st
    return out


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _json_write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n",
                    encoding="utf-8")


class CheckpointManager:
    """Checkpoints ``<directory>/step-0000042/`` of a run; keeps the newest ``keep``.

    Files: model.safetensors (the model's state, via ``safetensors.torch.save_model``),
    optimizer.safetensors + optimizer.json, scheduler.json, scaler.json (AMP), rng.safetensors
    and trainer_state.json (global step, epoch, position in the epoch, run fingerprint,
    metrics so far). A checkpoint is written under a temporary name and renamed when complete.
    """

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)

    def checkpoints(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir()
                 if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                 and (p / "trainer_state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, scaler: Any, state: dict[str, Any]) -> Path:
        from safetensors.torch import save_file, save_model

        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{CHECKPOINT_PREFIX}{step:07d}"
        tmp = self.directory / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_model(model, str(tmp / "model.safetensors"))
            tensors, meta = _optimizer_to_flat(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            _json_write(tmp / "optimizer.json", meta)
            _json_write(tmp / "scheduler.json", scheduler.state_dict())
            _json_write(tmp / "scaler.json", scaler.state_dict() if scaler is not None else {})
            save_file({k: v.contiguous() for k, v in _rng_tensors().items()},
                      str(tmp / "rng.safetensors"))
            _json_write(tmp / "trainer_state.json", {**state, "global_step": step})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint written: %s", final)
        return final

    def clear(self) -> None:
        """Remove this run's checkpoints (after its output is written), and the folder if
        nothing else is in it."""
        for ckpt in self.checkpoints():
            shutil.rmtree(ckpt, ignore_errors=True)
        if self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()

    @staticmethod
    def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, scaler: Any) -> dict[str, Any]:
        """Restore everything saved by :meth:`save`; returns the trainer state."""
        from safetensors.torch import load_file, load_model

        p = Path(path)
        if not (p / "trainer_state.json").is_file():
            raise ArtifactError(f"{p} is not a training checkpoint (no trainer_state.json)")
        load_model(model, str(p / "model.safetensors"), strict=True)
        meta = json.loads((p / "optimizer.json").read_text(encoding="utf-8"))
        tensors = load_file(str(p / "optimizer.safetensors"))
        optimizer.load_state_dict(_optimizer_from_flat(tensors, meta))
        scheduler.load_state_dict(json.loads((p / "scheduler.json").read_text("utf-8")))
        scaler_state = json.loads((p / "scaler.json").read_text("utf-8"))
        if scaler is not None and scaler_state:
            scaler.load_state_dict(scaler_state)
        _restore_rng(load_file(str(p / "rng.safetensors")))
        state = json.loads((p / "trainer_state.json").read_text("utf-8"))
        log.info("resumed from checkpoint %s (step %d)", p, state["global_step"])
        return state


def resolve_resume(resume: str, manager: CheckpointManager) -> Path | None:
    """The checkpoint to resume from: ``auto`` (newest, if any), ``never``, or a directory."""
    if resume == "never":
        return None
    if resume == "auto":
        return manager.latest()
    p = Path(resume)
    if not (p / "trainer_state.json").is_file():
        raise ConfigError(f"run.resume: {p} is not a checkpoint directory")
    return p


# --------------------------------------------------------------------------------------------
# Output directory and card


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ArtifactError(f"output directory {out} exists and is not empty (set "
                            "run.overwrite=true to replace it)")
    return out


def write_model_dir(model: Any, tokenizer: Any, out_dir: str | Path, card: dict[str, Any],
                    overwrite: bool) -> Path:
    """save_pretrained (safetensors) + tokenizer + training card, renamed into place."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        kwargs = {}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True
        model.save_pretrained(tmp, **kwargs)
        tokenizer.save_pretrained(tmp)
        if not any(f.suffix == ".safetensors" for f in tmp.iterdir()):
            raise ArtifactError("save_pretrained wrote no safetensors weights")
        from clinlinker_spark.modeling import model_hash

        card = {**card, "model_hash": model_hash(tmp)}
        _json_write(tmp / CARD_NAME, card)
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("model written to %s", out)
    return out


def library_versions() -> dict[str, str]:
    from clinlinker_spark.index import library_versions as index_versions

    out = dict(index_versions())
    for name in ("safetensors", "tokenizers", "pyspark"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            continue
    out["python"] = platform.python_version()
    return out


def device_info(device: torch.device, autocast_dtype: torch.dtype | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "autocast": str(autocast_dtype).replace("torch.", "") if autocast_dtype else "fp32",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# torch.distributed (torchrun / TorchDistributor)


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, created). Under torchrun (``WORLD_SIZE`` and ``MASTER_ADDR`` set)
    the default process group is initialised (``created`` True: the caller destroys it at the
    end); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    created = False
    if ("WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
            and torch.distributed.is_available() and not torch.distributed.is_initialized()):
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
        created = True
        log.info("torch.distributed initialised: rank %d of %d (%s)", rank, world, backend)
    return rank, world, created


def close_distributed(created: bool) -> None:
    """Destroy the default process group if :func:`init_distributed` created it."""
    if created and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def lr_of(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def finite(value: float) -> float:
    return float(value) if math.isfinite(value) else float("nan")


# --------------------------------------------------------------------------------------------
# Setting up a run, and its end, as both trainers do


def start_run(run: RunConfig) -> tuple[torch.device, torch.dtype | None, int, int, bool]:
    """Set torch's threads, pick the device and autocast dtype, join torch.distributed:
    (device, autocast dtype, rank, world size, process group created)."""
    set_torch_threads(run.num_threads)
    device, amp_dtype = resolve_device(run.device, run.precision)
    rank, world, created = init_distributed(device)
    return device, amp_dtype, rank, world, created


def prepare_model(model: torch.nn.Module, optim: OptimConfig, run: RunConfig,
                  output_dir: str | Path, rank: int, device: torch.device) -> None:
    """Freeze what ``optim`` says, check the output directory, put the model on ``device``
    in training mode."""
    freeze_parameters(model, optim.freeze_word_embeddings, optim.freeze_layers)
    if rank == 0:
        check_output_dir(output_dir, run.overwrite)  # fail before training, not after
    model.to(device)
    model.train()


def plan_schedule(optim: OptimConfig, n_examples: int, world: int) -> tuple[int, int, int, int]:
    """(micro-batches per epoch, optimizer steps per epoch, total steps, warm-up steps) of a
    run over ``n_examples`` on ``world`` ranks."""
    micro_per_epoch = n_examples // optim.batch_size
    steps_per_epoch, total_steps = schedule_length(
        micro_per_epoch // world, optim.gradient_accumulation, optim.epochs, optim.max_steps)
    warmup = int(round(optim.warmup_ratio * total_steps))
    return micro_per_epoch, steps_per_epoch, total_steps, warmup


def make_optimisation(
    model: torch.nn.Module,
    optim: OptimConfig,
    total_steps: int,
    warmup: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    world: int,
    head_learning_rate: float = 0.0,
    is_head: Callable[[str], bool] | None = None,
) -> tuple[torch.nn.Module, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR, Any]:
    """(the model to call in training: DistributedDataParallel when ``world`` > 1, the
    optimizer (:func:`make_optimizer`), its schedule, the AMP gradient scaler or None).

    Only fp16 on CUDA needs a gradient scaler; bf16 and fp32 do not.
    """
    train_model: torch.nn.Module = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)
    optimizer = make_optimizer(model, optim.learning_rate, optim.weight_decay,
                               head_learning_rate, is_head)
    scheduler = make_scheduler(optimizer, total_steps, warmup)
    scaler = (torch.amp.GradScaler("cuda") if device.type == "cuda"
              and amp_dtype == torch.float16 else None)
    return train_model, optimizer, scheduler, scaler


def resume_run(run: RunConfig, checkpoint_dir: Path, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
               fingerprint: str, mismatch_hint: str = "",
               ) -> tuple[CheckpointManager, Path | None, int, list[float]]:
    """(the run's checkpoint manager, checkpoint resumed from or None, global step, step
    losses so far), resuming as ``run.resume`` says.

    The checkpoint must carry ``fingerprint`` (the same run), else a ConfigError; its message
    says ``mismatch_hint`` after "belongs to another run".
    """
    manager = CheckpointManager(checkpoint_dir, run.keep_checkpoints)
    resumed_from = resolve_resume(run.resume, manager)
    if resumed_from is None:
        return manager, None, 0, []
    state = CheckpointManager.load(resumed_from, model, optimizer, scheduler, scaler)
    if state.get("fingerprint") != fingerprint:
        raise ConfigError(f"checkpoint {resumed_from} belongs to another run{mismatch_hint}; "
                          "set run.resume=never or another run.checkpoint_dir")
    return (manager, resumed_from, int(state["global_step"]),
            [float(x) for x in state.get("step_losses", [])])


def run_metrics(global_step: int, steps_per_epoch: int, examples_per_step: int,
                seen_key: str, step_losses: list[float], resumed_from_step: int | None,
                train_s: float) -> dict[str, Any]:
    """The card's metrics of a finished run: steps, examples seen (under ``seen_key``), first
    loss, mean loss of the last 10 % of the steps, every step's loss, resume point, seconds."""
    n_tail = max(1, len(step_losses) // 10)
    return {
        "steps": global_step, "steps_per_epoch": steps_per_epoch,
        "epochs": round(global_step / steps_per_epoch, 3),
        seen_key: global_step * examples_per_step,
        "first_loss": step_losses[0] if step_losses else None,
        "final_loss_mean_last_10pct": round(float(np.mean(step_losses[-n_tail:])), 6),
        "step_losses": step_losses,
        "resumed_from_step": resumed_from_step,
        "train_seconds_this_session": round(train_s, 1),
    }


def training_card(kind: str, inputs: dict[str, Any], config_dict: dict[str, Any],
                  fingerprint: str, metrics: dict[str, Any], device: torch.device,
                  amp_dtype: torch.dtype | None, world: int, started: float) -> dict[str, Any]:
    """A trainer's training card: its ``kind``, what it was trained from (``inputs``), config,
    run fingerprint, metrics, library versions, device and wall time since ``started``."""
    return {
        "kind": kind,
        "created_at": utc_now(),
        **inputs,
        "config": config_dict,
        "run_fingerprint": fingerprint,
        "metrics": metrics,
        "libraries": library_versions(),
        "device": {**device_info(device, amp_dtype), "world_size": world},
        "wall_time_s": round(time.perf_counter() - started, 1),
    }


def publish_run(rank: int, train_model: torch.nn.Module, tokenizer: Any, output_dir: str | Path,
                card: dict[str, Any], overwrite: bool,
                manager: CheckpointManager) -> Path | None:
    """Rank 0 writes the output directory (:func:`write_model_dir`) and removes the run's
    checkpoints; other ranks write nothing (None)."""
    if rank != 0:
        return None
    out = write_model_dir(unwrap(train_model), tokenizer, output_dir, card, overwrite)
    manager.clear()  # the run is complete: its checkpoints would only replay its tail
    return out


# --------------------------------------------------------------------------------------------
# The optimisation loop shared by both trainers


def train_loop(
    *,
    name: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    manager: CheckpointManager,
    checkpoint_state: dict[str, Any],
    optim: OptimConfig,
    run: RunConfig,
    n_examples: int,
    micro_per_epoch: int,
    steps_per_epoch: int,
    total_steps: int,
    rank: int,
    world: int,
    micro_loss: Callable[[int, np.ndarray], torch.Tensor],
    global_step: int,
    step_losses: list[float],
    stop_after_steps: int | None = None,
) -> tuple[int, float]:
    """Run optimizer steps from ``global_step`` to the end (or ``stop_after_steps``).

    Epoch e visits the ``n_examples`` in the order of a permutation drawn from
    ``(run.seed, e)``, cut into ``micro_per_epoch`` micro-batches of ``optim.batch_size`` (the
    rest is dropped); rank r of ``world`` takes micro-batches r, r + world, ...; an optimizer
    step takes ``optim.gradient_accumulation`` of them. ``micro_loss(epoch, rows)`` returns
    the loss of one micro-batch. Appends each step's loss to ``step_losses`` (in place),
    writes checkpoints every ``run.checkpoint_every`` steps (rank 0), logs loss and
    throughput every ``run.log_every``. Returns (global step reached, seconds spent).
    """
    micro_batch, accumulation = optim.batch_size, optim.gradient_accumulation
    started = window_started = time.perf_counter()
    start_step = global_step
    window: list[float] = []
    bar = _progress_bar(name, total_steps, global_step) if run.progress and rank == 0 else None
    stop_at = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    while global_step < stop_at:
        epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
        mine = _micro_batches_of_rank(run.seed, epoch, n_examples, micro_batch,
                                      micro_per_epoch, rank, world)
        for s in range(step_in_epoch, steps_per_epoch):
            step_loss = _optimizer_step(
                micro_loss, epoch, [mine[s * accumulation + a] for a in range(accumulation)],
                optimizer, scheduler, scaler, trainable, optim.max_grad_norm)
            global_step += 1
            step_losses.append(round(step_loss, 6))
            window.append(step_loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
            if global_step % run.log_every == 0 or global_step == stop_at:
                _log_window(name, optimizer, epoch, global_step, total_steps, stop_at, window,
                            window_started, started, start_step,
                            accumulation * micro_batch * world)
                window, window_started = [], time.perf_counter()
            if (run.checkpoint_every and global_step % run.checkpoint_every == 0
                    and global_step < total_steps and rank == 0):
                manager.save(global_step, model, optimizer, scheduler, scaler,
                             {**checkpoint_state, "epoch": epoch, "step_losses": step_losses})
            if global_step >= stop_at:
                break
    if bar is not None:
        bar.close()
    return global_step, time.perf_counter() - started


def _progress_bar(name: str, total_steps: int, global_step: int) -> Any:
    """A tqdm bar over the run's optimizer steps, starting at ``global_step`` (a resumed run)."""
    from tqdm.auto import tqdm

    return tqdm(total=total_steps, initial=global_step, desc=name, unit="step",
                mininterval=10.0, dynamic_ncols=True)


def _micro_batches_of_rank(seed: int, epoch: int, n_examples: int, micro_batch: int,
                           micro_per_epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's micro-batches of ``epoch``: a permutation drawn from ``(seed, epoch)``, so a
    run's position is fully described by its global step."""
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return [order[i * micro_batch:(i + 1) * micro_batch]
            for i in range(micro_per_epoch) if i % world == rank]


def _optimizer_step(
    micro_loss: Callable[[int, np.ndarray], torch.Tensor],
    epoch: int,
    micro_batches: list[np.ndarray],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    trainable: list[torch.nn.Parameter],
    max_grad_norm: float,
) -> float:
    """One optimizer step with gradients accumulated over ``micro_batches`` (AMP-scaled when
    ``scaler`` is set, clipped to ``max_grad_norm``); returns the step's mean loss."""
    accumulation = len(micro_batches)
    step_loss = 0.0
    for rows in micro_batches:
        loss = micro_loss(epoch, rows)
        scaled = loss / accumulation
        if scaler is not None:
            scaler.scale(scaled).backward()
        else:
            scaled.backward()
        step_loss += float(loss.detach()) / accumulation
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def _log_window(name: str, optimizer: torch.optim.Optimizer, epoch: int, global_step: int,
                total_steps: int, stop_at: int, window: list[float], window_started: float,
                started: float, start_step: int, examples_per_step: int) -> None:
    """Log the mean loss, learning rate and throughput of the steps since the last line
    (``window``), and the time left until ``stop_at`` at this session's pace so far."""
    elapsed = time.perf_counter() - window_started
    rate = len(window) * examples_per_step / max(elapsed, 1e-9)
    per_step = (time.perf_counter() - started) / max(global_step - start_step, 1)
    log.info("%s step %d/%d (epoch %d): loss %.4f, lr %.2e, %.1f examples/s, "
             "eta %.0f s", name, global_step, total_steps, epoch + 1,
             float(np.mean(window)), lr_of(optimizer), rate,
             per_step * (stop_at - global_step))
    log_step(global_step, {"loss": float(np.mean(window)), "learning_rate": lr_of(optimizer),
                           "examples_per_s": rate})
