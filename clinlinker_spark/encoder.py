"""The bi-encoder: texts in, one L2-normalised vector per text out.

Used to embed every terminology term once (index build) and every distinct mention (linking).
Its contract (model hash, pooling, max length, prefix, normalisation, dimension) is the
:meth:`BiEncoder.fingerprint` written into index manifests; an index is only used with an
encoder whose fingerprint matches (:func:`fingerprint_mismatches`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clinlinker_spark.config import POOLINGS, EncoderConfig
from clinlinker_spark.modeling import (
    LoadedModel,
    PendingRows,
    TokenIds,
    autocast_context,
    check_texts,
    length_batches,
    to_device,
    tokenize_ids,
)

log = logging.getLogger(__name__)

TEXT_NORMALISATION = "nfkc-lower-ws"  # clinlinker_spark.text.normalize_text
FINGERPRINT_KEYS = ("model_hash", "pooling", "max_length", "prefix", "normalize", "dim")


class BiEncoder(LoadedModel):
    """A Hugging Face encoder with CLS or attention-masked mean pooling.

    ``encode`` sorts texts by token length and batches them so that padding stays small
    (:func:`~clinlinker_spark.modeling.length_batches`), and returns
    the vectors in input order. Padding is on the right and pooling never sees padded
    positions, so a text's vector does not depend on the texts that share its batch.

    The ``model`` (a transformers ``PreTrainedModel`` in eval mode) and ``tokenizer``
    attributes are public so that training code can fine-tune them in place.
    """

    def __init__(
        self,
        path: str | Path,
        pooling: str = "mean",
        max_length: int = 32,
        prefix: str = "",
        normalize: bool = True,
        batch_size: int = 128,
        device: str = "auto",
        precision: str = "auto",
        num_threads: int = 0,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        if max_length <= 0 or batch_size <= 0:
            raise ValueError("max_length and batch_size must be > 0")
        self.pooling = pooling
        self.prefix = prefix
        self.normalize = bool(normalize)
        self.batch_size = int(batch_size)
        #: the model registry's entry this model was resolved from ({"uri", "name",
        #: "version"}), set by whoever resolved it; an index built with it records it
        self.registered: dict[str, str] | None = None
        self._load(path, "encoder", max_length, device, precision, num_threads)
        self._dim = int(self.model.config.hidden_size)
        log.info(
            "bi-encoder loaded from %s: dim %d, pooling %s, max_length %d, device %s",
            self.path, self._dim, pooling, self.max_length, self._device,
        )

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> BiEncoder:
        """Build from the ``encoder`` section of the job configuration."""
        return cls(
            cfg.path, pooling=cfg.pooling, max_length=cfg.max_length, prefix=cfg.prefix,
            normalize=cfg.normalize, batch_size=cfg.batch_size, device=cfg.device,
            precision=cfg.precision, num_threads=cfg.num_threads,
        )

    # ----------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Embedding dimension (the model's hidden size)."""
        return self._dim

    def fingerprint(self) -> dict[str, Any]:
        """What an index built with this encoder records about it (JSON-serialisable)."""
        return {
            "path": str(self.path),
            "model_hash": self.model_hash,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "prefix": self.prefix,
            "normalize": self.normalize,
            "dim": self.dim,
            "model_type": str(getattr(self.model.config, "model_type", "")),
            "normalisation": TEXT_NORMALISATION,
        }

    # ----------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> dict[str, list[list[int]]]:
        """Token ids of ``prefix + text`` for every text, truncated, unpadded (lists)."""
        ids = self.token_ids(texts)
        return {"input_ids": [ids.row(i) for i in range(len(ids))]}

    def token_ids(self, texts: Sequence[str]) -> TokenIds:
        """Token ids of ``prefix + text`` for every text, truncated, unpadded (flat)."""
        check_texts(texts, "texts")
        return tokenize_ids(self.tokenizer, [self.prefix + t for t in texts], self.max_length)

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """Embed ``texts`` (already normalised by the caller; ``prefix`` is prepended).

        Returns float32 [n, dim], C-contiguous, row i for ``texts[i]``; L2-normalised rows when
        ``normalize``. An empty input gives shape (0, dim).
        """
        n = len(texts)
        out = np.empty((n, self._dim), dtype=np.float32)
        if n == 0:
            return out
        ids = self.token_ids(texts)
        batches = length_batches(ids.lengths.tolist(), self.batch_size)
        n_batches = len(batches)
        report_every = max(1, n_batches // 10)
        pad_id = int(self.tokenizer.pad_token_id)
        pad_type = int(getattr(self.tokenizer, "pad_token_type_id", 0) or 0)
        done = 0
        pending = PendingRows(out)
        for b, idx in enumerate(batches):
            batch = ids.pad(idx, pad_id, pad_type)
            pending.add(idx, self._embed_batch(batch))
            done += len(idx)
            if show_progress and ((b + 1) % report_every == 0 or b + 1 == n_batches):
                log.info("encoded %d/%d texts (%d/%d batches)", done, n, b + 1, n_batches)
        pending.collect()
        return out

    def _embed_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled (and normalised) vectors of one padded batch: float32 [b, dim], on the
        model's device."""
        batch = to_device(batch, self._device)
        with torch.inference_mode(), autocast_context(self._device, self._autocast_dtype):
            hidden = self.model(**batch).last_hidden_state  # [b, t, dim]
        hidden = hidden.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, t, 1]
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        return pooled

    def __repr__(self) -> str:
        return (f"BiEncoder(path={str(self.path)!r}, pooling={self.pooling!r}, "
                f"max_length={self.max_length}, dim={self._dim}, device={self._device})")


def fingerprint_mismatches(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable differences between two encoder fingerprints (empty list: they match).

    Compared: model_hash, pooling, max_length, prefix, normalize, dim, and normalisation when
    both sides record it. The path is not compared: the same model may move.
    """
    keys = list(FINGERPRINT_KEYS)
    if "normalisation" in expected and "normalisation" in actual:
        keys.append("normalisation")
    problems = []
    for key in keys:
        if key not in expected or key not in actual:
            side = "expected" if key not in expected else "actual"
            problems.append(f"{key}: missing from the {side} fingerprint")
            continue
        want, got = expected[key], actual[key]
        if want != got:
            if key == "model_hash":
                want, got = str(want)[:16] + "…", str(got)[:16] + "…"
            problems.append(f"{key}: index has {want!r}, encoder has {got!r}")
    return problems


__all__ = ["TEXT_NORMALISATION", "BiEncoder", "fingerprint_mismatches"]
