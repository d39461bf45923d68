"""Hard negatives for the cross-encoder, mined with a trained bi-encoder and its index.

For every training query (a normalised mention text and its gold code) the bi-encoder
retrieves ``search_k`` raw hits from the index; walking them best first, each code other than
the gold one is a negative, kept while its similarity is at least ``min_similarity`` and until
``top_n`` codes are found (ClinLinker: top-200 above 0.35). A code's term is its best-scoring
synonym, as the linker presents candidates. The gold code is never a negative.

With ``exclude_query_text`` (default) the query's own text is left out of the hits: the index
holds every training mention, so without it each query would find itself, and the mined lists
would not look like those of an unseen mention at linking time (leave-one-out). A text that
the gold code shares with other codes gives the positive and no negative (one text cannot be
both).

The positive of a query is the gold code's best-scoring term other than the query text (the
term the linker would show), else the code's first other term in the index (main terms
first); a query whose gold code has no other term in the index gets no positive
(``positive_term`` None). ``positives`` lists all of the gold code's other terms, for training
that samples a positive each epoch (dictionary descriptions as well as other mentions).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clinlinker_spark.errors import InputDataError
from clinlinker_spark.index import TerminologyIndex
from clinlinker_spark.text import normalize_code, normalize_text

log = logging.getLogger(__name__)

MAX_POSITIVES = 32


@dataclass(frozen=True)
class MinedNegative:
    code: str  # code_key
    term: str  # normalised term
    score: float  # bi-encoder similarity


@dataclass(frozen=True)
class MinedQuery:
    query: str  # normalised mention text
    gold_code: str  # code_key
    positive_term: str | None  # normalised; None: the gold code has no other term
    positive_score: float  # NaN when the positive was not among the hits
    negatives: tuple[MinedNegative, ...]  # best first; never the gold code
    # every normalised term of the gold code in the index except the query text (at most
    # MAX_POSITIVES): positive_term first, then main terms, then the others
    positives: tuple[str, ...] = ()


def _terms_by_code(index: TerminologyIndex) -> dict[str, list[int]]:
    """Row numbers of each code_key, main terms first (then row order)."""
    rows = index.rows
    order = np.lexsort((np.arange(len(rows)), ~rows["is_main_term"].to_numpy(bool)))
    out: dict[str, list[int]] = {}
    keys = rows["code_key"].astype(str).to_numpy()
    for r in order:
        out.setdefault(str(keys[r]), []).append(int(r))
    return out


def mine_hard_negatives(
    encoder: Any,
    index: TerminologyIndex,
    queries: Sequence[str],
    gold_codes: Sequence[str],
    top_n: int = 200,
    min_similarity: float = 0.35,
    search_k: int = 0,
    exclude_query_text: bool = True,
    batch_size: int = 2048,
) -> list[MinedQuery]:
    """Mine hard negatives for each (query, gold code); see the module docstring.

    ``encoder`` is the :class:`~clinlinker_spark.encoder.BiEncoder` the index was built with;
    ``queries`` are normalised here (idempotent); ``gold_codes`` are compared as code keys.
    ``search_k`` raw hits per query (0: ``2 * top_n``, at most the index size). Returns one
    :class:`MinedQuery` per input, in input order.
    """
    if len(queries) != len(gold_codes):
        raise InputDataError(f"{len(queries)} queries but {len(gold_codes)} gold codes")
    texts = [normalize_text(q) for q in queries]
    golds = [normalize_code(c) for c in gold_codes]
    k = min(search_k or 2 * top_n, len(index))
    by_code = _terms_by_code(index)
    out: list[MinedQuery] = []
    n_without_positive = 0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        hits = index.search(encoder.encode(chunk), k)
        for i, text in enumerate(chunk):
            gold = golds[start + i]
            own = index.position_of(text) if exclude_query_text else -1
            seen: set[str] = set()
            negatives: list[MinedNegative] = []
            positive: str | None = None
            positive_score = math.nan
            for score, position in zip(hits.scores[i], hits.positions[i], strict=True):
                if position < 0 or position == own:
                    continue
                below_floor = float(score) < min_similarity
                if below_floor and positive is not None:
                    break
                if len(negatives) >= top_n and positive is not None:
                    break
                rows = [index.row(int(r)) for r in index.rows_in_code_order(int(position))]
                if any(key == gold for _, key, _, _ in rows):
                    # a text the gold code shares with other codes: a positive, and never a
                    # negative (the same text cannot be both)
                    if positive is None:
                        positive, positive_score = normalize_text(rows[0][2]), float(score)
                    continue
                for _, key, term, _ in rows:
                    if key in seen:
                        continue
                    seen.add(key)
                    if not below_floor and len(negatives) < top_n:
                        negatives.append(MinedNegative(key, normalize_text(term), float(score)))
            others = [normalize_text(index.row(r)[2]) for r in by_code.get(gold, [])]
            others = list(dict.fromkeys(t for t in others if t != text))
            if positive is None and others:
                positive = others[0]
            if positive is None:
                n_without_positive += 1
            positives = tuple(dict.fromkeys([positive] + others))[:MAX_POSITIVES] \
                if positive is not None else ()
            out.append(MinedQuery(text, gold, positive, positive_score, tuple(negatives),
                                  positives))
    counts = [len(m.negatives) for m in out]
    log.info("mined hard negatives for %d queries: %.1f per query on average (min %d, max %d),"
             " %d queries without a positive term", len(out),
             float(np.mean(counts)) if counts else 0.0, min(counts, default=0),
             max(counts, default=0), n_without_positive)
    return out


def same_category_first(mined: Sequence[MinedQuery], chars: int) -> list[MinedQuery]:
    """Each query's negatives with the codes that share ``chars`` leading characters with its
    gold code first, each group in its mined order (best first); ``chars`` 0: unchanged."""
    if chars <= 0:
        return list(mined)
    out = []
    for m in mined:
        category = m.gold_code[:chars]
        siblings = [n for n in m.negatives if n.code[:chars] == category]
        others = [n for n in m.negatives if n.code[:chars] != category]
        out.append(dataclasses.replace(m, negatives=tuple(siblings + others)))
    return out


def mining_stats(mined: Sequence[MinedQuery]) -> dict[str, float]:
    """Counts of a mining result (JSON-serialisable; no text)."""
    counts = np.array([len(m.negatives) for m in mined]) if mined else np.zeros(0)
    with_pos = [m for m in mined if m.positive_term is not None]
    in_hits = [m for m in with_pos if not math.isnan(m.positive_score)]
    return {
        "queries": len(mined),
        "with_positive": len(with_pos),
        "positive_among_hits": len(in_hits),
        "negatives_mean": round(float(counts.mean()), 2) if len(counts) else 0.0,
        "negatives_min": int(counts.min()) if len(counts) else 0,
        "negatives_max": int(counts.max()) if len(counts) else 0,
        "queries_without_negatives": int((counts == 0).sum()) if len(counts) else 0,
    }


__all__ = ["MinedNegative", "MinedQuery", "mine_hard_negatives", "mining_stats",
           "same_category_first"]
