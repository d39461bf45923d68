"""Cross-encoder (re-ranker) training on hard negatives mined with the trained bi-encoder.

1. Training queries: the distinct (normalised text, code) of the clean training mentions of
   ``data.sources``.
2. Mining (:mod:`clinlinker_spark.training.negatives`): the bi-encoder embeds the queries and
   searches ``index`` (built with that bi-encoder); each query keeps up to ``negatives.top_n``
   codes other than its gold code above ``negatives.min_similarity``, and a positive term.
3. Training: a sequence-classification model with one output, initialised from the
   bi-encoder directory (``AutoModelForSequenceClassification(num_labels=1)``: the encoder
   weights are the bi-encoder's, the classification head is new). Each epoch, every query
   gets ``negatives.per_query`` negatives drawn from its first ``negatives.pool`` mined codes
   (seeded by run seed, epoch and query), and ``positive: sample`` draws its positive among
   the gold code's other terms. Pairs are (mention, term) text pairs as the linker scores
   them. Loss ``listwise``: softmax cross-entropy over the positive and its negatives;
   ``bce``: binary cross-entropy on every pair.

Output: a Hugging Face directory that :class:`~clinlinker_spark.reranker.CrossEncoderReranker`
loads, plus training_card.json (bi-encoder and index hashes, mining statistics, config,
per-step losses, versions, wall time, device). Checkpoints and resume as for the bi-encoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from clinlinker_spark.config import to_dict
from clinlinker_spark.context import MENTION_MARKERS, context_query, has_context
from clinlinker_spark.corpora import clean_mask, split_by_document
from clinlinker_spark.errors import ConfigError, ModelLoadError
from clinlinker_spark.modeling import (
    _no_progress_bars,
    check_model_dir,
    effective_max_length,
    model_hash,
)
from clinlinker_spark.text import normalize_code, normalize_text
from clinlinker_spark.training.biencoder import TrainResult, checkpoint_dir_of, run_fingerprint
from clinlinker_spark.training.common import (
    autocast_for,
    close_distributed,
    forward_in_chunks,
    make_optimisation,
    plan_schedule,
    prepare_model,
    publish_run,
    resume_run,
    run_metrics,
    seed_everything,
    start_run,
    train_loop,
    training_card,
)
from clinlinker_spark.training.config import CrossEncoderTrainConfig
from clinlinker_spark.training.losses import bce_loss, listwise_loss
from clinlinker_spark.training.negatives import MinedQuery, mine_hard_negatives, mining_stats, \
    same_category_first
from clinlinker_spark.training.pairs import clean_mention_rows, load_training_data

log = logging.getLogger(__name__)

CARD_KIND = "clinlinker-crossencoder-training"


def load_cross_encoder_init(path: str | Path) -> tuple[Any, Any]:
    """(tokenizer, model): a one-output sequence classifier from a local encoder directory.

    The encoder weights come from ``path`` (a bi-encoder saved as ``AutoModel``); the
    classification head is freshly initialised (seed torch before calling).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        with _no_progress_bars():
            model = AutoModelForSequenceClassification.from_pretrained(
                p, num_labels=1, local_files_only=True, use_safetensors=True)
    except Exception as exc:
        raise ModelLoadError(f"{p}: could not initialise a cross-encoder from it: {exc}") from exc
    if tokenizer.pad_token is None:
        raise ModelLoadError(f"{p}: the tokenizer has no padding token")
    return tokenizer, model


def mine_for_config(cfg: CrossEncoderTrainConfig) -> tuple[list[MinedQuery], dict[str, Any]]:
    """Read the training mentions, load the bi-encoder and its index, mine hard negatives.

    Returns the mined queries and a JSON-serialisable description (hashes, stats, seconds).
    """
    from clinlinker_spark.encoder import BiEncoder
    from clinlinker_spark.index import TerminologyIndex, read_manifest

    started = time.perf_counter()
    data = load_training_data(cfg.data.sources)
    if cfg.document_share < 1.0 and not data.mentions.empty:
        kept, _ = split_by_document(data.mentions, 1.0 - cfg.document_share, cfg.run.seed)
        log.info("document_share %.2f: %d of %d gold mentions kept", cfg.document_share,
                 len(kept), len(data.mentions))
        data = dataclasses.replace(data, mentions=kept.reset_index(drop=True))
    rows = clean_mention_rows(data.mentions)
    if rows.empty:
        raise ConfigError("no clean training mentions in data.sources (the cross-encoder "
                          "trains on gold mentions)")
    manifest = read_manifest(cfg.index)
    spec = manifest["encoder"]
    neg = cfg.negatives
    encoder = BiEncoder(cfg.biencoder, pooling=spec["pooling"], max_length=spec["max_length"],
                        prefix=spec.get("prefix", ""), normalize=spec["normalize"],
                        batch_size=128, device=cfg.run.device,
                        num_threads=cfg.run.num_threads)
    index = TerminologyIndex.load(cfg.index, expected_fingerprint=encoder.fingerprint())
    mined = mine_hard_negatives(
        encoder, index, rows["term_norm"].tolist(), rows["code_key"].tolist(), neg.top_n,
        neg.min_similarity, neg.search_k, neg.exclude_query_text, neg.batch_size)
    mined = same_category_first(mined, neg.same_category_first)
    documents = _documents(data.mentions)
    if cfg.context:
        mined, documents = contextual_queries(data.mentions, mined, cfg.context_chars)
    info = {
        "sources": data.source_hashes,
        "biencoder": {"path": str(cfg.biencoder), "model_hash": encoder.model_hash},
        "index": {"path": str(cfg.index), "content_hash": index.content_hash,
                  "terms": len(index), "codes": len(index.code_keys)},
        "mining": {**mining_stats(mined), "seconds": round(time.perf_counter() - started, 1)},
        # the documents whose mentions it learnt from: a ranker that takes this model's score
        # as a feature does not learn from their mentions (training.ranker)
        "documents": documents,
    }
    del encoder, index
    return mined, info


def _documents(mentions: pd.DataFrame) -> list[str]:
    """``source/doc_id`` of the documents of the clean gold mentions, sorted."""
    if mentions.empty or "doc_id" not in mentions:
        return []
    clean = mentions[clean_mask(mentions)]
    return sorted(set(clean["source"].astype(str) + "/" + clean["doc_id"].astype(str)))


def contextual_queries(mentions: pd.DataFrame, mined: Sequence[MinedQuery],
                       context_chars: int) -> tuple[list[MinedQuery], list[str]]:
    """One query per clean gold mention that has a context: its mined query (negatives and
    positives of its (text, code)) with the query text replaced by the mention marked inside
    its context (:func:`clinlinker_spark.context.context_query`). Mentions without context
    are left out (the context-free stages link them). Returns the queries, in mention order,
    and the documents they come from."""
    by_key = {(m.query, m.gold_code): m for m in mined}
    if "context" not in mentions:
        raise ConfigError("context: true, but no training mention has a context (set "
                          "text_dir on the gold sources)")
    clean = mentions[clean_mask(mentions)]
    usable = clean[has_context(clean["context"], clean["context_start"],
                               clean["context_end"])]
    out: list[MinedQuery] = []
    documents: set[str] = set()
    for text, code, context, start, end, source, doc in zip(
            usable["text"].fillna("").astype(str), usable["code"].astype(str),
            usable["context"], usable["context_start"], usable["context_end"],
            usable["source"].astype(str), usable["doc_id"].astype(str)):
        found = by_key.get((normalize_text(text), normalize_code(code)))
        if found is None:
            continue
        query = context_query(found.query, context, start, end, context_chars)
        out.append(dataclasses.replace(found, query=query))
        documents.add(f"{source}/{doc}")
    log.info("context queries: %d of %d clean mentions (%d with a context) from %d documents",
             len(out), len(clean), len(usable), len(documents))
    if not out:
        raise ConfigError("context: true, but no clean training mention has a usable context")
    return out, sorted(documents)


def _sample_negatives(m: MinedQuery, pool: int, k: int, seed: int, epoch: int,
                      example: int) -> list[str]:
    candidates = m.negatives[:pool]
    if len(candidates) <= k:
        return [c.term for c in candidates]
    rng = np.random.default_rng([seed, epoch, example])
    picked = np.sort(rng.choice(len(candidates), size=k, replace=False))
    return [candidates[i].term for i in picked]


def train_crossencoder(
    config: CrossEncoderTrainConfig,
    mined: Sequence[MinedQuery] | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Mine (unless ``mined`` is given), then train and write ``config.output_dir``.

    ``stop_after_steps`` stops early without output, as in
    :func:`~clinlinker_spark.training.biencoder.train_biencoder`.
    """
    started = time.perf_counter()
    cfg = config
    device, amp_dtype, rank, world, created_group = start_run(cfg.run)
    info: dict[str, Any] = {}
    if mined is None:
        mined, info = mine_for_config(cfg)
    examples = _training_examples(mined, cfg.loss)
    data_sha = _mined_sha256(examples)
    config_dict = to_dict(cfg)
    fingerprint = run_fingerprint(config_dict, data_sha)

    seed_everything(cfg.run.seed)
    init_path = cfg.init_from or cfg.biencoder
    tokenizer, model = load_cross_encoder_init(init_path)
    init_hash = model_hash(init_path)
    max_length = effective_max_length(tokenizer, model.config, cfg.max_length)
    prepare_model(model, cfg.optim, cfg.run, cfg.output_dir, rank, device)
    micro_per_epoch, steps_per_epoch, total_steps, warmup = _plan_crossencoder_run(
        cfg, len(examples), len(mined), world, device)

    train_model, optimizer, scheduler, scaler = make_optimisation(
        model, cfg.optim, total_steps, warmup, device, amp_dtype, world,
        cfg.head_learning_rate, _head_parameters(model))
    manager, resumed_from, start_step, step_losses = resume_run(
        cfg.run, checkpoint_dir_of(cfg.output_dir, cfg.run.checkpoint_dir), model, optimizer,
        scheduler, scaler, fingerprint)
    global_step, train_s = train_loop(
        name="cross-encoder", model=model, optimizer=optimizer, scheduler=scheduler,
        scaler=scaler, manager=manager, checkpoint_state={"fingerprint": fingerprint},
        optim=cfg.optim, run=cfg.run, n_examples=len(examples),
        micro_per_epoch=micro_per_epoch, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, rank=rank, world=world,
        micro_loss=_query_loss(cfg, examples, tokenizer, max_length, train_model, device,
                               amp_dtype),
        global_step=start_step, step_losses=step_losses, stop_after_steps=stop_after_steps,
    )
    if global_step < total_steps:
        log.info("stopped after step %d of %d (stop_after_steps); resume to finish",
                 global_step, total_steps)
        close_distributed(created_group)
        return TrainResult(None, global_step, total_steps, step_losses)

    trained_from = _trained_from(cfg, init_path, init_hash, max_length, info, len(examples),
                                 data_sha)
    metrics = run_metrics(global_step, steps_per_epoch,
                          cfg.optim.gradient_accumulation * cfg.optim.batch_size * world,
                          "queries_seen", step_losses,
                          start_step if resumed_from is not None else None, train_s)
    card = training_card(CARD_KIND, trained_from, config_dict, fingerprint, metrics, device,
                         amp_dtype, world, started)
    out = publish_run(rank, train_model, tokenizer, cfg.output_dir, card, cfg.run.overwrite,
                      manager)
    close_distributed(created_group)
    log.info("cross-encoder training done: %d steps in %.0f s (wall %.0f s)", global_step,
             train_s, card["wall_time_s"])
    return TrainResult(out, global_step, total_steps, step_losses, card)


def _plan_crossencoder_run(cfg: CrossEncoderTrainConfig, n_examples: int, n_mined: int,
                           world: int, device: torch.device) -> tuple[int, int, int, int]:
    """:func:`plan_schedule` of the training queries, logged with what the run trains on."""
    neg = cfg.negatives
    micro_per_epoch, steps_per_epoch, total_steps, warmup = plan_schedule(
        cfg.optim, n_examples, world)
    log.info("cross-encoder training: %d queries (of %d mined), %d negatives per query from "
             "the first %d, loss %s; %d steps (%d per epoch) of %d x %d queries, device %s",
             n_examples, n_mined, neg.per_query, neg.pool, cfg.loss, total_steps,
             steps_per_epoch, cfg.optim.gradient_accumulation, cfg.optim.batch_size, device)
    return micro_per_epoch, steps_per_epoch, total_steps, warmup


def _trained_from(cfg: CrossEncoderTrainConfig, init_path: str | Path, init_hash: str,
                  max_length: int, info: dict[str, Any], n_examples: int,
                  data_sha: str) -> dict[str, Any]:
    """The card's initial model, input contract (max length, context) and training data."""
    return {
        "init_model": {"path": str(init_path), "model_hash": init_hash},
        "max_length": max_length,
        # what the model reads as its first text: the mention marked in a window of its
        # context (CrossEncoderReranker.context), or null for the span alone
        "context": ({"chars": cfg.context_chars, "markers": list(MENTION_MARKERS)}
                    if cfg.context else None),
        "data": {**info, "training_queries": n_examples, "examples_sha256": data_sha},
    }


def _training_examples(mined: Sequence[MinedQuery], loss: str) -> list[MinedQuery]:
    """The mined queries that can teach: a positive term, and hard negatives unless the loss
    is ``bce`` (which learns from the positive pair alone too)."""
    examples = [m for m in mined if m.positive_term is not None
                and (m.negatives or loss == "bce")]
    if not examples:
        raise ConfigError("no training example: no query has both a positive term and hard "
                          "negatives (lower negatives.min_similarity?)")
    return examples


def _head_parameters(model: torch.nn.Module) -> Callable[[str], bool]:
    """Whether a parameter name belongs to the new classification head: outside the base
    model (the classifier) or its pooler, neither of which the bi-encoder trained."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."

    def is_head(name: str) -> bool:
        return not name.startswith(prefix) or ".pooler." in name

    return is_head


def _query_loss(cfg: CrossEncoderTrainConfig, examples: Sequence[MinedQuery], tokenizer: Any,
                max_length: int, train_model: torch.nn.Module, device: torch.device,
                amp_dtype: torch.dtype | None) -> Callable[[int, np.ndarray], torch.Tensor]:
    """``micro_loss(epoch, rows)`` for :func:`train_loop`: the queries ``rows`` paired with
    their positive and sampled negatives, scored by the model, with ``cfg.loss``."""
    pad_id = int(tokenizer.pad_token_id)
    pad_type = int(getattr(tokenizer, "pad_token_type_id", 0) or 0)

    def score_chunk(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast_for(device, amp_dtype):
            logits = train_model(**batch).logits  # [c, 1]
        return logits.float().reshape(-1)

    def micro_loss(epoch: int, rows: np.ndarray) -> torch.Tensor:
        mentions, terms, group_sizes = _text_pairs(examples, rows, cfg, epoch)
        encoded = tokenizer(mentions, terms, truncation=True, max_length=max_length,
                            padding=False, return_attention_mask=True)
        features = {k: v for k, v in encoded.items()
                    if k in ("input_ids", "attention_mask", "token_type_ids")}
        logits = forward_in_chunks(score_chunk, features, list(range(len(mentions))),
                                   cfg.optim.encode_chunk, pad_id, pad_type, device)
        if cfg.loss == "bce":
            labels = torch.cat([torch.tensor([1.0] + [0.0] * (g - 1)) for g in group_sizes])
            return bce_loss(logits, labels.to(device))
        return _listwise_of_groups(logits, group_sizes, device)

    return micro_loss


def _text_pairs(examples: Sequence[MinedQuery], rows: np.ndarray,
                cfg: CrossEncoderTrainConfig, epoch: int) -> tuple[list[str], list[str],
                                                                   list[int]]:
    """(mentions, terms, group sizes): each query of ``rows`` with its positive first, then
    its negatives of ``epoch``; both drawn from (run seed, epoch, query), so a resumed run
    sees the same pairs."""
    neg = cfg.negatives
    mentions: list[str] = []
    terms: list[str] = []
    group_sizes: list[int] = []
    for r in rows:
        m = examples[int(r)]
        negs = _sample_negatives(m, neg.pool, neg.per_query, cfg.run.seed, epoch, int(r))
        positive = m.positive_term or ""
        if cfg.positive == "sample" and len(m.positives) > 1:
            pick = np.random.default_rng([cfg.run.seed, epoch, int(r), 1])
            positive = m.positives[int(pick.integers(len(m.positives)))]
        mentions.extend([m.query] * (1 + len(negs)))
        terms.extend([positive] + negs)
        group_sizes.append(1 + len(negs))
    return mentions, terms, group_sizes


def _listwise_of_groups(logits: torch.Tensor, group_sizes: list[int],
                        device: torch.device) -> torch.Tensor:
    """Listwise loss of the flat ``logits``, cut into groups of ``group_sizes`` (positive
    first) and padded to the widest group with masked slots."""
    width = max(group_sizes)
    grouped = torch.zeros(len(group_sizes), width, device=device)
    valid = torch.zeros(len(group_sizes), width, dtype=torch.bool, device=device)
    pos = 0
    for g, size in enumerate(group_sizes):
        grouped[g, :size] = logits[pos:pos + size]
        valid[g, :size] = True
        pos += size
    return listwise_loss(grouped, valid)


def _mined_sha256(examples: Sequence[MinedQuery]) -> str:
    digest = hashlib.sha256()
    for m in examples:
        digest.update(f"{m.gold_code}\t{m.query}\t{m.positive_term}\t".encode())
        digest.update("|".join(m.positives).encode() + b"\t")
        digest.update("|".join(f"{n.code}:{n.term}" for n in m.negatives).encode() + b"\n")
    return digest.hexdigest()

__all__ = ["CARD_KIND", "load_cross_encoder_init", "mine_for_config", "train_crossencoder"]
