"""Contrastive losses of the bi-encoder (SapBERT recipe) and the cross-encoder losses.

Bi-encoder, on a batch of L2-normalised embeddings ``emb`` [n, d] with code labels [n]:

- :func:`multi_similarity_loss` (Wang et al., CVPR 2019), as SapBERT uses it: pytorch-metric-
  learning's ``MultiSimilarityLoss(alpha=1, beta=60, base=0.5)`` on the pairs that a
  ``TripletMarginMiner(margin=0.2, type_of_triplets="all")`` selects. Written here in plain
  torch (no extra dependency); :func:`triplet_margin_mine` is the miner.
- :func:`info_nce_loss`: InfoNCE with in-batch negatives over the two sides of the pairs
  (symmetric cross-entropy of ``a @ b.T / temperature``), same-code entries masked out.

Cross-encoder, on logits of (mention, term) pairs:

- :func:`bce_loss`: binary cross-entropy (positive = the gold code's term);
- :func:`listwise_loss`: softmax cross-entropy over one positive and its negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair_masks(labels: torch.Tensor, text_ids: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                               torch.Tensor]:
    """(positive, negative) boolean masks [n, n]; the diagonal and same-text pairs excluded."""
    n = labels.shape[0]
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    valid = ~torch.eye(n, dtype=torch.bool, device=labels.device)
    if text_ids is not None:
        valid &= text_ids.unsqueeze(0) != text_ids.unsqueeze(1)
    return same & valid, ~same & valid


def triplet_margin_mine(
    sim: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    text_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of all triplets (a, p, n) with ``sim[a, p] - sim[a, n] <= margin``.

    Same result as pytorch-metric-learning's TripletMarginMiner(type_of_triplets="all") with
    cosine similarity, turned into pairs: a positive pair (a, p) is kept when some negative of
    ``a`` is within the margin of it (``sim[a, p] <= max_n sim[a, n] + margin``), a negative
    pair (a, n) when some positive is (``sim[a, n] >= min_p sim[a, p] - margin``).

    ``sim``: [n, n] similarities (no gradient needed); ``labels``: [n] int codes;
    ``text_ids``: [n] optional ids, pairs of one text are never mined. Returns boolean masks
    (positive, negative) [n, n].
    """
    pos, neg = _pair_masks(labels, text_ids)
    sim = sim.detach().float()
    big = torch.finfo(sim.dtype).max
    hardest_neg = torch.where(neg, sim, torch.full_like(sim, -big)).amax(dim=1, keepdim=True)
    easiest_pos = torch.where(pos, sim, torch.full_like(sim, big)).amin(dim=1, keepdim=True)
    has_neg = neg.any(dim=1, keepdim=True)
    has_pos = pos.any(dim=1, keepdim=True)
    pos_mined = pos & has_neg & (sim <= hardest_neg + margin)
    neg_mined = neg & has_pos & (sim >= easiest_pos - margin)
    return pos_mined, neg_mined


def _log1p_sum_exp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_j exp(x[i, j]))`` over ``mask[i, j]``, stable: [n]."""
    x = x.masked_fill(~mask, float("-inf"))
    zeros = torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)
    return torch.logsumexp(torch.cat([zeros, x], dim=1), dim=1)


def multi_similarity_loss(
    emb: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 60.0,
    base: float = 0.5,
    miner_margin: float | None = 0.2,
    text_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Multi-similarity loss of L2-normalised embeddings ``emb`` [n, d] with ``labels`` [n].

    Per anchor i: ``1/alpha * log(1 + sum_P exp(-alpha (S_ip - base)))
    + 1/beta * log(1 + sum_N exp(beta (S_in - base)))`` over its mined positive pairs P and
    negative pairs N (all pairs when ``miner_margin`` is None); averaged over the n anchors,
    like pytorch-metric-learning's default mean reduction. Returns (loss, stats) where stats
    counts the mined pairs.
    """
    emb = emb.float()
    sim = emb @ emb.T  # [n, n]
    if miner_margin is None:
        pos, neg = _pair_masks(labels, text_ids)
    else:
        pos, neg = triplet_margin_mine(sim, labels, miner_margin, text_ids)
    pos_term = _log1p_sum_exp(-alpha * (sim - base), pos) / alpha
    neg_term = _log1p_sum_exp(beta * (sim - base), neg) / beta
    loss = (pos_term + neg_term).mean()
    stats = {"pos_pairs": float(pos.sum().item()), "neg_pairs": float(neg.sum().item())}
    return loss, stats


def info_nce_loss(
    emb_a: torch.Tensor,
    emb_b: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.05,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE over pairs (``emb_a[i]``, ``emb_b[i]``), both [b, d] L2-normalised.

    Row i's positive is column i; other columns are in-batch negatives, except those of the
    same code (``labels`` [b]), which are masked out (they are not negatives).
    """
    logits = (emb_a.float() @ emb_b.float().T) / temperature  # [b, b]
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    off_diag = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    logits = logits.masked_fill(same & off_diag, float("-inf"))
    target = torch.arange(len(labels), device=labels.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    return loss, {"in_batch_negatives": float((~same).sum().item())}


def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of pair logits [m] against 0/1 ``labels`` [m]."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def listwise_loss(group_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy with the positive in column 0.

    ``group_logits``: [b, 1 + k] (positive first, then negatives); ``valid``: [b, 1 + k]
    boolean, False for padding (groups with fewer than k negatives).
    """
    logits = group_logits.float().masked_fill(~valid, float("-inf"))
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


__all__ = [
    "bce_loss", "info_nce_loss", "listwise_loss", "multi_similarity_loss",
    "triplet_margin_mine",
]
