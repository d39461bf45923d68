"""The cross-encoder re-ranker: one relevance logit per (mention, candidate term) pair.

A BERT-style sequence-classification model with one output (num_labels == 1), trained on
hard negatives mined with the bi-encoder. Pairs are scored in batches, like
sentence-transformers' ``CrossEncoder.predict``; the caller re-orders candidates by score.

A context-aware cross-encoder (``train-crossencoder`` with ``context: true``; its training
card says so) reads the mention marked inside a window of its sentence instead of the span
alone: :meth:`CrossEncoderReranker.queries` builds that first text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clinlinker_spark.config import RerankerConfig
from clinlinker_spark.errors import ModelLoadError
from clinlinker_spark.modeling import (
    LoadedModel,
    PendingRows,
    autocast_context,
    check_texts,
    length_batches,
    to_device,
    tokenize_ids,
)

log = logging.getLogger(__name__)


class CrossEncoderReranker(LoadedModel):
    """Scores (mention, term) pairs with a Hugging Face sequence-classification model.

    Each pair is encoded as a text pair (``[CLS] mention [SEP] term [SEP]`` or the model's
    equivalent), truncated to ``max_length`` tokens (longest side first). The ``model`` and
    ``tokenizer`` attributes are public for training code.
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int = 64,
        max_length: int = 64,
        device: str = "auto",
        precision: str = "auto",
        num_threads: int = 0,
    ) -> None:
        if max_length <= 0 or batch_size <= 0:
            raise ValueError("max_length and batch_size must be > 0")
        if not str(path):
            raise ModelLoadError("no cross-encoder path given (reranker.path is empty)")
        self.batch_size = int(batch_size)
        self._load(path, "sequence-classification", max_length, device, precision, num_threads)
        card = training_card(self.path)
        context = card.get("context") or {}
        #: characters of context around the mention this model reads; 0: the span alone
        self.context_chars = int(context.get("chars", 0))
        #: ``source/doc_id`` of the documents it was trained on (empty when not recorded)
        self.documents = frozenset(card.get("data", {}).get("documents", ()))
        log.info("cross-encoder loaded from %s: max_length %d, device %s, %s",
                 self.path, self.max_length, self._device,
                 f"context of {self.context_chars} characters" if self.context_chars
                 else "span only")

    @classmethod
    def from_config(cls, cfg: RerankerConfig, num_threads: int = 0) -> CrossEncoderReranker:
        """Build from the ``reranker`` section of the job configuration."""
        if not cfg.path:
            raise ModelLoadError("reranker.path is empty: re-ranking is switched off")
        return cls(
            cfg.path, batch_size=cfg.batch_size, max_length=cfg.max_length, device=cfg.device,
            precision=cfg.precision, num_threads=num_threads,
        )

    def fingerprint(self) -> dict[str, Any]:
        """What outputs scored by this re-ranker record about it (JSON-serialisable)."""
        return {
            "path": str(self.path),
            "model_hash": self.model_hash,
            "max_length": self.max_length,
            "model_type": str(getattr(self.model.config, "model_type", "")),
            "context_chars": self.context_chars,
        }

    def queries(self, texts_norm: Sequence[str], contexts: Sequence[Any] | None = None
                ) -> list[str]:
        """The first text of each mention's pairs: for a context-aware model the mention
        marked in its context window (:func:`clinlinker_spark.context.context_query`),
        ``contexts[i]`` being ``(context, start, end)`` or None; otherwise, or without a
        context, the normalised mention itself."""
        if not self.context_chars or contexts is None:
            return list(texts_norm)
        from clinlinker_spark.context import context_query

        if len(contexts) != len(texts_norm):
            raise ValueError(f"{len(texts_norm)} mentions but {len(contexts)} contexts")
        return [text if ctx is None else context_query(text, *ctx, self.context_chars)
                for text, ctx in zip(texts_norm, contexts)]

    def score(self, mentions: Sequence[str], terms: Sequence[str]) -> np.ndarray:
        """Logit of each pair (``mentions[i]``, ``terms[i]``): float32 [n]; higher = better.

        Empty input gives shape (0,). Pairs are sorted by token length for batching and the
        scores returned in input order; a pair's score does not depend on its batch.
        """
        check_texts(mentions, "mentions")
        check_texts(terms, "terms")
        if len(mentions) != len(terms):
            raise ValueError(
                f"mentions and terms must have the same length; got {len(mentions)} and "
                f"{len(terms)}"
            )
        n = len(mentions)
        out = np.empty(n, dtype=np.float32)
        if n == 0:
            return out
        ids = tokenize_ids(self.tokenizer, mentions, self.max_length, pairs=terms)
        pad_id = int(self.tokenizer.pad_token_id)
        pad_type = int(getattr(self.tokenizer, "pad_token_type_id", 0) or 0)
        pending = PendingRows(out)
        for idx in length_batches(ids.lengths.tolist(), self.batch_size):
            batch = to_device(ids.pad(idx, pad_id, pad_type), self._device)
            with torch.inference_mode(), autocast_context(self._device, self._autocast_dtype):
                logits = self.model(**batch).logits  # [b, 1]
            pending.add(idx, logits.float().reshape(-1))
        pending.collect()
        return out

    def __repr__(self) -> str:
        return (f"CrossEncoderReranker(path={str(self.path)!r}, max_length={self.max_length}, "
                f"device={self._device})")


def training_card(path: Path) -> dict[str, Any]:
    """The model directory's training card (``training_card.json``), or {} without one."""
    from clinlinker_spark.training.common import CARD_NAME

    card = path / CARD_NAME
    if not card.is_file():
        return {}
    try:
        return json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{card}: unreadable training card: {exc}") from exc
