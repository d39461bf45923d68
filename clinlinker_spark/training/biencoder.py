"""SapBERT-style bi-encoder training: synonym pairs in, a Hugging Face encoder directory out.

One optimizer step takes ``optim.gradient_accumulation`` micro-batches of ``optim.batch_size``
pairs. A micro-batch's 2 x batch_size texts are embedded (pooling and max_length of the
``encoder`` section, L2-normalised) and scored with the multi-similarity loss and its miner
(labels = codes; pairs of one text are never mined) or with InfoNCE over the two sides. The
pair order of epoch e is a permutation drawn from ``(run.seed, e)``, so a run's position is
fully described by its global step: a resumed run replays exactly the batches, dropout masks
and learning rates of an uninterrupted one.

Written output (``output_dir``): config.json + model.safetensors + tokenizer files +
training_card.json (data hashes, pair counts, config, per-step losses, throughput, library
versions, wall time, device). Build an index with it using the card's pooling / max_length /
prefix (``clinlinker build-index --encoder DIR --pooling mean --max-length 32``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clinlinker_spark.config import to_dict
from clinlinker_spark.errors import ConfigError
from clinlinker_spark.modeling import effective_max_length, load_tokenizer_and_model, model_hash
from clinlinker_spark.training.common import (
    autocast_for,
    close_distributed,
    forward_in_chunks,
    make_optimisation,
    plan_schedule,
    pool_hidden,
    prepare_model,
    publish_run,
    resume_run,
    run_metrics,
    seed_everything,
    start_run,
    train_loop,
    training_card,
)
from clinlinker_spark.training.config import BiEncoderTrainConfig
from clinlinker_spark.training.losses import info_nce_loss, multi_similarity_loss
from clinlinker_spark.training.pairs import (
    Pair,
    build_pairs,
    load_training_data,
    pair_stats,
    pairs_sha256,
)

log = logging.getLogger(__name__)

CARD_KIND = "clinlinker-biencoder-training"


@dataclass
class TrainResult:
    """What a training run returns. ``output_dir`` is None when it stopped before the end
    (``stop_after_steps``); ``step_losses[i]`` is the loss of optimizer step i + 1."""

    output_dir: Path | None
    global_step: int
    total_steps: int
    step_losses: list[float] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)


def run_fingerprint(config_dict: dict[str, Any], data_sha256: str) -> str:
    """Hash of what determines a run's steps: the config without ``run`` (except its seed)
    and ``output_dir``, plus the training data. A checkpoint only resumes the same run."""
    relevant = {k: v for k, v in config_dict.items() if k not in ("run", "output_dir")}
    relevant["seed"] = config_dict.get("run", {}).get("seed")
    blob = json.dumps(relevant, sort_keys=True, ensure_ascii=False) + data_sha256
    return hashlib.sha256(blob.encode()).hexdigest()


def checkpoint_dir_of(output_dir: str, checkpoint_dir: str) -> Path:
    return Path(checkpoint_dir) if checkpoint_dir else Path(f"{output_dir}-checkpoints")


class _PairBatches:
    """Token ids of every distinct text and the pairs as integer arrays."""

    def __init__(self, pairs: list[Pair], tokenizer: Any, max_length: int, prefix: str):
        texts = sorted({t for p in pairs for t in (p.text_a, p.text_b)})
        self.text_id = {t: i for i, t in enumerate(texts)}
        codes = sorted({p.code for p in pairs})
        code_id = {c: i for i, c in enumerate(codes)}
        self.a = np.array([self.text_id[p.text_a] for p in pairs], dtype=np.int64)
        self.b = np.array([self.text_id[p.text_b] for p in pairs], dtype=np.int64)
        self.label = np.array([code_id[p.code] for p in pairs], dtype=np.int64)
        encoded = tokenizer([prefix + t for t in texts], truncation=True, max_length=max_length,
                            padding=False, return_attention_mask=True)
        self.features = {k: v for k, v in encoded.items()
                         if k in ("input_ids", "attention_mask", "token_type_ids")}
        lengths = [len(x) for x in self.features["input_ids"]]
        self.mean_tokens = float(np.mean(lengths)) if lengths else 0.0
        self.n_texts = len(texts)

    def __len__(self) -> int:
        return len(self.a)


def train_biencoder(
    config: BiEncoderTrainConfig,
    pairs: list[Pair] | None = None,
    data_hashes: dict[str, str] | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train a bi-encoder as ``config`` says; write ``config.output_dir`` at the end.

    ``pairs`` (tests, notebooks) replaces the pairs built from ``config.data``.
    ``stop_after_steps`` stops after that optimizer step without writing the output (the
    learning-rate schedule still spans the whole run): with ``run.checkpoint_every`` it
    simulates an interrupted run, which a later call resumes (``run.resume: auto``).
    """
    started = time.perf_counter()
    cfg = config
    device, amp_dtype, rank, world, created_group = _start_biencoder_run(cfg)
    pairs, data_hashes = _training_pairs(cfg, pairs, data_hashes)
    data_sha = pairs_sha256(pairs)
    config_dict = to_dict(cfg)
    fingerprint = run_fingerprint(config_dict, data_sha)

    tokenizer, model = load_tokenizer_and_model(cfg.base_model, "encoder")
    base_hash = model_hash(cfg.base_model)
    max_length = effective_max_length(tokenizer, model.config, cfg.encoder.max_length)
    prepare_model(model, cfg.optim, cfg.run, cfg.output_dir, rank, device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batches = _PairBatches(pairs, tokenizer, max_length, cfg.encoder.prefix)
    micro_per_epoch, steps_per_epoch, total_steps, warmup = _plan_biencoder_run(
        cfg, pairs, batches, n_trainable, world, device)

    train_model, optimizer, scheduler, scaler = make_optimisation(
        model, cfg.optim, total_steps, warmup, device, amp_dtype, world)
    manager, resumed_from, start_step, step_losses = resume_run(
        cfg.run, checkpoint_dir_of(cfg.output_dir, cfg.run.checkpoint_dir), model, optimizer,
        scheduler, scaler, fingerprint, " (different config or training data)")
    global_step, train_s = train_loop(
        name="bi-encoder", model=model, optimizer=optimizer, scheduler=scheduler,
        scaler=scaler, manager=manager, checkpoint_state={"fingerprint": fingerprint},
        optim=cfg.optim, run=cfg.run, n_examples=len(batches),
        micro_per_epoch=micro_per_epoch, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, rank=rank, world=world,
        micro_loss=_pair_loss(cfg, batches, tokenizer, train_model, device, amp_dtype),
        global_step=start_step, step_losses=step_losses, stop_after_steps=stop_after_steps,
    )
    if global_step < total_steps:
        log.info("stopped after step %d of %d (stop_after_steps); resume to finish",
                 global_step, total_steps)
        close_distributed(created_group)
        return TrainResult(None, global_step, total_steps, step_losses)

    trained_from = _trained_from(cfg, base_hash, max_length, data_hashes, pairs, data_sha,
                                 batches.mean_tokens)
    metrics = _biencoder_metrics(cfg, world, global_step, steps_per_epoch, step_losses,
                                 start_step, resumed_from is not None, train_s, n_trainable)
    card = training_card(CARD_KIND, trained_from, config_dict, fingerprint, metrics, device,
                         amp_dtype, world, started)
    out = publish_run(rank, train_model, tokenizer, cfg.output_dir, card, cfg.run.overwrite,
                      manager)
    if out is not None:
        card["model_hash"] = json.loads((out / "training_card.json").read_text())["model_hash"]
    close_distributed(created_group)
    log.info("bi-encoder training done: %d steps in %.0f s (wall %.0f s)", global_step,
             train_s, card["wall_time_s"])
    return TrainResult(out, global_step, total_steps, step_losses, card)


def _start_biencoder_run(
        cfg: BiEncoderTrainConfig) -> tuple[torch.device, torch.dtype | None, int, int, bool]:
    """:func:`start_run`, then one GPU per rank under torchrun (``LOCAL_RANK``), then seed."""
    device, amp_dtype, rank, world, created_group = start_run(cfg.run)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    seed_everything(cfg.run.seed)
    return device, amp_dtype, rank, world, created_group


def _training_pairs(cfg: BiEncoderTrainConfig, pairs: list[Pair] | None,
                    data_hashes: dict[str, str] | None,
                    ) -> tuple[list[Pair], dict[str, str] | None]:
    """The given ``pairs`` (and ``data_hashes``), or the synonym pairs built from ``cfg.data``
    and the hashes of its sources; a ConfigError when there is none."""
    if pairs is None:
        data = load_training_data(cfg.data.sources)
        pairs = build_pairs(data.terms, data.mentions, cfg.pairs.max_pairs_per_code,
                            cfg.pairs.seed, cfg.pairs.include_dictionary_pairs)
        data_hashes = data.source_hashes
    if not pairs:
        raise ConfigError("no synonym pairs: the training data has no code with two "
                          "different strings")
    return pairs, data_hashes


def _plan_biencoder_run(cfg: BiEncoderTrainConfig, pairs: list[Pair], batches: _PairBatches,
                        n_trainable: int, world: int,
                        device: torch.device) -> tuple[int, int, int, int]:
    """:func:`plan_schedule` of the pairs, logged with what the run trains on."""
    micro_per_epoch, steps_per_epoch, total_steps, warmup = plan_schedule(
        cfg.optim, len(batches), world)
    log.info("bi-encoder training: %s pairs, %d texts (%.1f tokens on average), %d trainable "
             "parameters; %d steps (%d per epoch) of %d x %d pairs, warm-up %d, device %s",
             pair_stats(pairs), batches.n_texts, batches.mean_tokens, n_trainable, total_steps,
             steps_per_epoch, cfg.optim.gradient_accumulation, cfg.optim.batch_size, warmup,
             device)
    return micro_per_epoch, steps_per_epoch, total_steps, warmup


def _pair_loss(cfg: BiEncoderTrainConfig, batches: _PairBatches, tokenizer: Any,
               train_model: torch.nn.Module, device: torch.device,
               amp_dtype: torch.dtype | None) -> Callable[[int, np.ndarray], torch.Tensor]:
    """``micro_loss(epoch, rows)`` for :func:`train_loop`: the loss of the pairs ``rows``,
    both sides embedded (L2-normalised) and scored with ``cfg.loss``."""
    pad_id = int(tokenizer.pad_token_id)
    pad_type = int(getattr(tokenizer, "pad_token_type_id", 0) or 0)
    pooling = cfg.encoder.pooling
    loss_cfg = cfg.loss

    def embed_chunk(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast_for(device, amp_dtype):
            hidden = train_model(**batch).last_hidden_state
        return F.normalize(pool_hidden(hidden, batch["attention_mask"], pooling), p=2.0, dim=1)

    def micro_loss(rows: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        slots = np.concatenate([batches.a[rows], batches.b[rows]])
        labels = torch.as_tensor(np.concatenate([batches.label[rows], batches.label[rows]]),
                                 device=device)
        emb = forward_in_chunks(embed_chunk, batches.features, slots.tolist(),
                                cfg.optim.encode_chunk, pad_id, pad_type, device)
        if loss_cfg.name == "infonce":
            n = len(rows)
            return info_nce_loss(emb[:n], emb[n:], labels[:n], loss_cfg.temperature)
        margin = loss_cfg.miner_margin if loss_cfg.miner == "triplet" else None
        return multi_similarity_loss(emb, labels, loss_cfg.alpha, loss_cfg.beta, loss_cfg.base,
                                     margin, torch.as_tensor(slots, device=device))

    def loop_loss(epoch: int, rows: np.ndarray) -> torch.Tensor:
        return micro_loss(rows)[0]

    return loop_loss


def _trained_from(cfg: BiEncoderTrainConfig, base_hash: str, max_length: int,
                  data_hashes: dict[str, str] | None, pairs: list[Pair], data_sha: str,
                  mean_tokens: float) -> dict[str, Any]:
    """The card's base model, encoder contract (what an index built with the model must use)
    and training data."""
    return {
        "base_model": {"path": str(cfg.base_model), "model_hash": base_hash},
        "encoder": {"pooling": cfg.encoder.pooling, "max_length": max_length,
                    "prefix": cfg.encoder.prefix, "normalize": True},
        "data": {"sources": data_hashes or {}, "pairs": pair_stats(pairs),
                 "pairs_sha256": data_sha, "mean_tokens": round(mean_tokens, 2)},
    }


def _biencoder_metrics(cfg: BiEncoderTrainConfig, world: int, global_step: int,
                       steps_per_epoch: int, step_losses: list[float], start_step: int,
                       resumed: bool, train_s: float, n_trainable: int) -> dict[str, Any]:
    """:func:`run_metrics` with the pairs seen, and this session's pairs per second (from
    ``start_step``, the step it resumed from when ``resumed``)."""
    pairs_per_step = cfg.optim.gradient_accumulation * cfg.optim.batch_size * world
    return {
        **run_metrics(global_step, steps_per_epoch, pairs_per_step, "pairs_seen", step_losses,
                      start_step if resumed else None, train_s),
        "pairs_per_second": round((global_step - start_step) * pairs_per_step
                                  / max(train_s, 1e-9), 2),
        "trainable_parameters": n_trainable,
    }


__all__ = ["CARD_KIND", "TrainResult", "checkpoint_dir_of", "run_fingerprint",
           "train_biencoder"]
