"""The linker: mentions in, ranked codes out. The function every job (and every UDF) calls.

Stages, each usable on its own:

1. ``invalid_reason``: per-row validation (null, empty/whitespace, over-long text).
2. ``retrieve``: candidates from the retrievers of ``linking.retrievers``. ``dense``: bi-encoder
   embedding of the normalised text, FAISS search of ``search_k`` raw hits (distinct texts),
   then one candidate per code (the code's best-scoring synonym), up to ``top_k`` codes.
   ``lexical``: the index's character 3-gram TF-IDF (:mod:`clinlinker_spark.lexical`) over the
   same texts, ``lexical_k`` raw hits, up to ``top_k`` more codes. A candidate found by one
   retriever is scored by the other too, so every candidate has both scores. With the
   exact-match prior, codes whose normalised term equals the mention come first, ordered by how
   many training mentions carry them; the others follow in reciprocal-rank fusion of the two
   retrievers' orders (the dense order when it is the only retriever).
3. ``rerank``: the cross-encoder re-scores the first ``top_n`` candidates. Without a ranker it
   also re-orders them (exact matches stay first when the prior is on: a cross-encoder cannot
   tell identical texts apart any more than the bi-encoder can; candidates past ``top_n`` keep
   their order; ``reranker.fusion: rrf`` orders them by reciprocal-rank fusion of the retrieval
   and cross-encoder orders instead of the cross-encoder score alone).
4. ``rank``: with a ranker (``ranker.path``, :mod:`clinlinker_spark.ranker`), a learned model
   over per-candidate features orders the candidates and gives the top code a calibrated
   ``confidence``: the probability that it is right. A link whose confidence is below
   ``linking.review_below`` keeps its code and candidates and gets status ``needs_review``.
   Lists are cut to ``top_k`` codes here.

Scores: ``retrieval_score`` is the bi-encoder inner product (cosine when embeddings are
L2-normalised); ``lexical_score`` the TF-IDF cosine; ``rerank_score`` the cross-encoder
logit; ``ranker_score`` the ranker's. A mention's ``score`` is the best candidate's ranker
score when a ranker ran, else the sigmoid of its rerank logit when a re-ranker ran, else its
retrieval score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from clinlinker_spark.candidates import Candidate, Hits, gc_paused
from clinlinker_spark.config import (
    RERANK_FUSIONS,
    ContextConfig,
    JobConfig,
    LinkingConfig,
    RerankerConfig,
)
from clinlinker_spark.errors import ConfigError, InputDataError
from clinlinker_spark.index import TerminologyIndex, check_encoder
from clinlinker_spark.text import normalize_code, normalize_text

log = logging.getLogger(__name__)

STATUS_LINKED = "linked"
STATUS_NEEDS_REVIEW = "needs_review"
STATUS_NO_CANDIDATE = "no_candidate"
STATUS_INVALID = "invalid_input"
# every status a code-assignment row can have, and the final ones (an incremental run does not
# link such a row again with the same versions)
STATUSES = (STATUS_LINKED, STATUS_NEEDS_REVIEW, STATUS_NO_CANDIDATE, STATUS_INVALID)
FINAL_STATUSES = (STATUS_LINKED, STATUS_NEEDS_REVIEW, STATUS_NO_CANDIDATE)
RESULT_COLUMNS = ["mention_id", "text_norm", "status", "reason", "code", "term", "score",
                  "confidence", "candidates"]
RETRIEVERS = ("dense", "lexical")
# Wall seconds a Linker spends per stage (Linker.stage_seconds): bi-encoder embedding, FAISS
# search, lexical search, hits -> per-code candidates, cross-encoder re-ranking, the ranker.
STAGE_TIMERS = ("encode", "search", "lexical", "candidates", "rerank", "rank", "context")
# Mentions a Linker saw, those with a context, those its context stage linked again, and the
# distinct (form, context) lists that stage ranked (Linker.take_context_counts)
CONTEXT_COUNTS = ("mentions", "with_context", "context_stage", "context_lists")
# reciprocal-rank fusion constant of the two retrievers' orders (before any ranker)
RETRIEVER_RRF_K = 60
# Texts a Linker embedded with the bi-encoder, and texts that took an index term's stored
# vector instead (Linker.take_counts; LinkingConfig.reuse_index_vectors).
VECTOR_COUNTS = ("texts_encoded", "vectors_reused")
# Cross-encoder scores are compared at this many decimals: scores that equal at this precision
# are ties and keep the retrieval order. The same pair scored in batches of other shapes (one
# Spark partitioning or another) differs in the last float bits; without this, such near-ties
# would order differently from run to run.
RERANK_DECIMALS = 4


def invalid_reason(text: Any, max_text_length: int) -> str | None:
    """Why a mention text cannot be linked, or None when it can."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return "null text"
    if not isinstance(text, str):
        return f"text is not a string ({type(text).__name__})"
    if not text.strip():
        return "empty text"
    if len(text) > max_text_length:
        return f"text longer than {max_text_length} characters"
    return None


def candidates_from_hits(
    index: TerminologyIndex,
    texts_norm: Sequence[str],
    hits: Hits,
    top_k: int,
    exact_match_prior: bool,
    self_scores: np.ndarray | None = None,
) -> list[list[Candidate]]:
    """Turn raw hits into up to ``top_k`` distinct codes per query.

    With ``exact_match_prior``, codes whose term equals the query come first, and codes that
    share one text are ordered by how many training mentions carry them; without it, codes
    that share a text come in code order (the embedding cannot tell them apart), so the
    prior's effect can be measured on its own. ``self_scores[i]`` is the score a term identical
    to query ``i`` gets (1.0 for normalised embeddings); it scores exact matches that are not
    among the raw hits.
    """
    code_rows = index.code_rows
    results: list[list[Candidate]] = []
    with gc_paused():
        for i, text in enumerate(texts_norm):
            seen: set[str] = set()
            out: list[Candidate] = []
            scores = hits.scores[i].tolist()
            positions = hits.positions[i].tolist()
            support = hit_support(index, positions)
            exact_position = index.position_of(text) if exact_match_prior else -1
            if exact_position >= 0:
                if exact_position in positions:
                    exact_score = scores[positions.index(exact_position)]
                else:
                    exact_score = float(self_scores[i]) if self_scores is not None else 1.0
                for code, key, term in code_rows(exact_position):
                    if key not in seen:
                        seen.add(key)
                        out.append(Candidate(code, term, exact_score, None, True, None, None,
                                             support.get(key, 0)))
            for score, position in zip(scores, positions):
                if len(out) >= top_k:
                    break
                if position < 0 or position == exact_position:
                    continue
                for code, key, term in code_rows(position, exact_match_prior):
                    if key not in seen:
                        seen.add(key)
                        out.append(Candidate(code, term, score, None, False, None, None,
                                             support[key]))
            results.append(out[:top_k])
    return results


def hit_support(index: TerminologyIndex, positions: list[int]) -> dict[str, int]:
    """code_key -> how many of one query's hits carry the code (position -1: no hit). A code
    that many near texts carry (the training mentions of one code, its synonyms) is better
    supported than one that a single near text carries. A count, not a score: it does not
    change with the last bits of the search's scores, which depend on the batch."""
    support: dict[str, int] = {}
    code_rows = index.code_rows
    for position in positions:
        if position >= 0:
            for _, key, _ in code_rows(position):
                support[key] = support.get(key, 0) + 1
    return support


def _codes_of_hits(index: TerminologyIndex, scores: list[float], positions: list[int],
                   seen: set[str], limit: int, prior: bool
                   ) -> list[tuple[str, str, str, float, int]]:
    """(code, code_key, term, score, position) of the first ``limit`` codes of one query's
    hits that are not in ``seen`` (each code once, at its best-scoring text); adds them to
    ``seen``."""
    out: list[tuple[str, str, str, float, int]] = []
    code_rows = index.code_rows
    for score, position in zip(scores, positions):
        if len(out) >= limit:
            break
        if position < 0:
            continue
        for code, key, term in code_rows(position, prior):
            if key not in seen:
                seen.add(key)
                out.append((code, key, term, score, position))
    return out


def hybrid_candidates(
    index: TerminologyIndex,
    texts_norm: Sequence[str],
    dense: Hits,
    lexical: Hits,
    vectors: np.ndarray,
    lexical_queries: Any,
    top_k: int,
    exact_match_prior: bool,
    self_scores: np.ndarray | None = None,
) -> list[list[Candidate]]:
    """The union of the dense and lexical retrievers' candidates, each scored by both.

    Per query: exact-match codes first (with ``exact_match_prior``, as in
    :func:`candidates_from_hits`), then up to ``top_k`` codes from the dense hits and up to
    ``top_k`` codes from the lexical hits that the dense ones did not give. A dense-only
    candidate's ``lexical_score`` is the TF-IDF cosine of its term (``lexical_queries``: the
    queries' TF-IDF rows); a lexical-only candidate's ``retrieval_score`` is the inner product
    of ``vectors[i]`` and its term's stored vector. The non-exact candidates are ordered by
    reciprocal-rank fusion of their dense and lexical ranks (ties: dense score, then code).
    Lists hold up to ``2 * top_k`` codes plus the exact ones; the ranker (or the Linker without
    one) cuts them to ``top_k``.
    """
    lexical_index = index.lexical
    if lexical_index is None:
        raise ConfigError(f"linking.retrievers has lexical, but index {index.path} has no "
                          "lexical model: rebuild it with clinlinker build-index")
    per_query: list[list[tuple[str, str, str, float, int, str]]] = []
    supports: list[dict[str, int]] = []
    with gc_paused():
        for i, text in enumerate(texts_norm):
            dense_positions = dense.positions[i].tolist()
            supports.append(hit_support(index, dense_positions))
            seen: set[str] = set()
            found: list[tuple[str, str, str, float, int, str]] = []
            exact_position = index.position_of(text) if exact_match_prior else -1
            if exact_position >= 0:
                exact_score = (float(dense.scores[i][dense_positions.index(exact_position)])
                               if exact_position in dense_positions else
                               float(self_scores[i]) if self_scores is not None else 1.0)
                for code, key, term in index.code_rows(exact_position):
                    if key not in seen:
                        seen.add(key)
                        found.append((code, key, term, exact_score, exact_position, "exact"))
            for origin, hits in (("dense", dense), ("lexical", lexical)):
                for item in _codes_of_hits(index, hits.scores[i].tolist(),
                                           hits.positions[i].tolist(), seen, top_k,
                                           exact_match_prior):
                    found.append((*item, origin))
            per_query.append(found)
    # the other retriever's score of every candidate, in two vectorised passes
    rows = np.array([i for i, found in enumerate(per_query) for _ in found], np.int64)
    positions = np.array([f[4] for found in per_query for f in found], np.int64)
    origins = [f[5] for found in per_query for f in found]
    dense_scores = np.array([f[3] for found in per_query for f in found], np.float32)
    lexical_scores = lexical_index.pair_scores(lexical_queries, rows, positions)
    need_dense = np.array([o == "lexical" for o in origins], bool)
    if need_dense.any():
        sub_rows, sub_positions = rows[need_dense], positions[need_dense]
        stored = index.vectors_at(sub_positions)
        dense_scores[need_dense] = np.einsum("ij,ij->i", vectors[sub_rows], stored)
    results: list[list[Candidate]] = []
    at = 0
    with gc_paused():
        for found, support in zip(per_query, supports):
            n = len(found)
            d = dense_scores[at:at + n].tolist()
            lx = lexical_scores[at:at + n].tolist()
            at += n
            exact = [j for j in range(n) if found[j][5] == "exact"]
            exact_set = set(exact)
            order = exact + _fused_order(
                [j for j in range(n) if found[j][5] != "exact"], [f[1] for f in found], d, lx)
            results.append([Candidate(found[j][0], found[j][2], d[j], None, j in exact_set,
                                      lx[j], None, support.get(found[j][1], 0))
                            for j in order])
    return results


def _fused_order(others: list[int], keys: list[str], d: list[float],
                 lx: list[float]) -> list[int]:
    """``others`` (positions in one query's candidate list) ordered by reciprocal-rank fusion
    of their dense scores ``d`` and lexical scores ``lx``; ties: dense score, then code key."""
    dense_rank = {j: r for r, j in enumerate(
        sorted(others, key=lambda j: (-d[j], keys[j])), start=1)}
    lexical_rank = {j: r for r, j in enumerate(
        sorted(others, key=lambda j: (-lx[j], keys[j])), start=1)}
    return sorted(others, key=lambda j: (-(1.0 / (RETRIEVER_RRF_K + dense_rank[j])
                                           + 1.0 / (RETRIEVER_RRF_K + lexical_rank[j])),
                                         -d[j], keys[j]))


def expand_to_leaves(
    index: TerminologyIndex,
    candidates: list[list[Candidate]],
    leaves: int,
    vectors: np.ndarray,
    lexical_queries: Any = None,
) -> list[list[Candidate]]:
    """Append, after each list, up to ``leaves`` leaf codes below every candidate that has
    children in the index's hierarchy (an ICD-10 category whose assignable codes are its
    subcategories), most training mentions first, each with its main term and both scores
    (bi-encoder: query vector against the term's stored vector; lexical: TF-IDF cosine, when
    ``lexical_queries`` are given). A code already in the list is not added again."""
    if leaves <= 0:
        return candidates
    added: list[tuple[int, int, str, str]] = []  # (query, row, code, term)
    for i, cands in enumerate(candidates):
        seen = {normalize_code(c.code) for c in cands}
        for c in list(cands):
            for row in index.leaf_rows_under(normalize_code(c.code))[:leaves]:
                code, key, term, _ = index.row(row)
                if key not in seen:
                    seen.add(key)
                    added.append((i, row, code, term))
    if not added:
        return candidates
    rows = np.array([a[0] for a in added], np.int64)
    positions = np.array([index.row_position(a[1]) for a in added], np.int64)
    dense = np.einsum("ij,ij->i", vectors[rows], index.vectors_at(positions)).tolist()
    lexical = (index.lexical.pair_scores(lexical_queries, rows, positions).tolist()
               if lexical_queries is not None and index.lexical is not None
               else [None] * len(added))
    out = [list(c) for c in candidates]
    for (i, _, code, term), d, lx in zip(added, dense, lexical):
        out[i].append(Candidate(code, term, float(d), None, False,
                                None if lx is None else float(lx)))
    return out


def score_candidates(
    texts_norm: Sequence[str],
    candidates: list[list[Candidate]],
    score_pairs: Callable[[list[str], list[str]], np.ndarray],
    top_n: int,
) -> list[list[Candidate]]:
    """Set ``rerank_score`` on the first ``top_n`` candidates of each mention (order kept).

    All pairs of the batch are scored in one call (the scorer batches them).
    """
    mentions: list[str] = []
    terms: list[str] = []
    term_norms: dict[str, str] = {}  # the same terms come back for many mentions
    for text, cands in zip(texts_norm, candidates):
        for c in cands[:top_n]:
            mentions.append(text)
            norm = term_norms.get(c.term)
            if norm is None:
                norm = term_norms[c.term] = normalize_text(c.term)
            terms.append(norm)
    scores = (score_pairs(mentions, terms) if mentions else np.zeros(0, np.float32)).tolist()
    out: list[list[Candidate]] = []
    pos = 0
    with gc_paused():
        for cands in candidates:
            head = cands[:top_n]
            out.append([
                Candidate(c.code, c.term, c.retrieval_score, scores[pos + j], c.exact,
                          c.lexical_score, c.ranker_score, c.dense_hits)
                for j, c in enumerate(head)
            ] + list(cands[top_n:]))
            pos += len(head)
    return out


def order_candidates(
    candidates: list[list[Candidate]],
    top_n: int,
    exact_first: bool,
    fusion: str = "none",
    rrf_k: int = 60,
) -> list[list[Candidate]]:
    """Re-order the scored head (first ``top_n``) of each mention's retrieval-ordered list.

    ``fusion="none"``: by cross-encoder score alone. ``fusion="rrf"``: reciprocal-rank fusion
    of the retrieval order and the cross-encoder order, ``1/(rrf_k + r_retrieval) +
    1/(rrf_k + r_rerank)`` (ranks from 1; ties go to the cross-encoder), so a candidate moves
    only where the two rankers agree more than they disagree. Cross-encoder scores that are
    equal at RERANK_DECIMALS decimals are ties (retrieval order). With ``exact_first``, exact
    matches stay first either way. Candidates past ``top_n`` keep their order.
    """
    if fusion not in RERANK_FUSIONS:
        raise ValueError(f"fusion must be one of {RERANK_FUSIONS}; got {fusion!r}")
    out: list[list[Candidate]] = []
    for cands in candidates:
        head = list(cands[:top_n])
        by_score = sorted(range(len(head)),
                          key=lambda j: -round(head[j].rerank_score or 0.0, RERANK_DECIMALS))
        rerank_rank = {j: r for r, j in enumerate(by_score, start=1)}

        def key(j: int) -> tuple[bool, float, int]:
            first = not (exact_first and head[j].exact)
            if fusion == "rrf":
                fused = 1.0 / (rrf_k + j + 1) + 1.0 / (rrf_k + rerank_rank[j])
                return first, -fused, rerank_rank[j]
            return first, 0.0, rerank_rank[j]

        out.append([head[j] for j in sorted(range(len(head)), key=key)] + list(cands[top_n:]))
    return out


def rerank_candidates(
    texts_norm: Sequence[str],
    candidates: list[list[Candidate]],
    score_pairs: Callable[[list[str], list[str]], np.ndarray],
    top_n: int,
    exact_first: bool,
    fusion: str = "none",
    rrf_k: int = 60,
) -> list[list[Candidate]]:
    """Re-score the first ``top_n`` candidates of each mention with ``score_pairs`` and
    re-order them (:func:`order_candidates`)."""
    scored = score_candidates(texts_norm, candidates, score_pairs, top_n)
    with gc_paused():
        return order_candidates(scored, top_n, exact_first, fusion, rrf_k)


def mention_contexts(mentions: pd.DataFrame, context: str, start: str, end: str
                     ) -> list[tuple[str, int, int] | None]:
    """Each row's ``(context, start, end)``, or None where the context is empty or its offsets
    do not point inside it (:func:`clinlinker_spark.context.has_context`)."""
    from clinlinker_spark.context import has_context

    usable = has_context(mentions[context], mentions[start], mentions[end]).tolist()
    return [(c, int(s), int(e)) if ok else None for ok, c, s, e in zip(
        usable, mentions[context].tolist(), mentions[start].tolist(), mentions[end].tolist())]


def needs_context(codes: Sequence[str], confidence: float | None,
                  config: ContextConfig) -> bool:
    """Whether the context stage links a mention again, from the codes of its first
    candidates (at least the first two, best first) and its context-free confidence: the
    confidence is below ``context.below``, or the first two codes share
    ``context.same_category_chars`` leading characters (where the words around it decide
    between sibling codes). A mention without candidates never goes."""
    if not len(codes):
        return False
    if config.below >= 1.0 or (confidence is not None and confidence < config.below):
        return True  # below 1: every mention with a context
    chars = config.same_category_chars
    if chars and len(codes) > 1:
        return normalize_code(codes[0])[:chars] == normalize_code(codes[1])[:chars]
    return False


def context_version(reranker_hash: str, ranker_hash: str, config: ContextConfig) -> str:
    """SHA-256 of what decides the context stage's links: its cross-encoder's and ranker's
    hashes and the settings that gate and cut its candidate lists."""
    payload = [reranker_hash, ranker_hash, config.top_n, config.max_length, config.below,
               config.same_category_chars]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def lineage_versions(versions: dict[str, str], context: str) -> dict[str, str]:
    """The versions a linked row carries: ``versions`` (``Linker.versions``), whose
    ``ranker_version`` also covers the context stage when there is one (``context``: its
    :func:`context_version`; "": none), so that an incremental run links a mention again
    when the stage is turned on, off or changed."""
    if not context:
        return dict(versions)
    folded = f"{versions['ranker_version']}+context:{context}".encode()
    return {**versions, "ranker_version": hashlib.sha256(folded).hexdigest()}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def search_device(setting: str, encoder_device: Any, index: TerminologyIndex) -> Any:
    """The torch device to search ``index`` on, or None for FAISS on the CPU
    (``index.search_device``: auto, cpu or cuda)."""
    if setting == "cpu":
        return None
    on_gpu = getattr(encoder_device, "type", str(encoder_device)) == "cuda"
    if setting == "auto":
        return encoder_device if on_gpu and index.is_exact_flat else None
    if setting != "cuda":
        raise ConfigError(f"index.search_device must be auto, cpu or cuda; got {setting!r}")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("index.search_device is cuda but torch sees no CUDA GPU")
    return encoder_device if on_gpu else torch.device("cuda")


class Linker:
    """Links batches of mentions with one bi-encoder, one index, an optional re-ranker and an
    optional ranker."""

    def __init__(
        self,
        encoder: Any,
        index: TerminologyIndex,
        linking: LinkingConfig | None = None,
        reranker: Any | None = None,
        reranker_config: RerankerConfig | None = None,
        ranker: Any | None = None,
        context_stage: Linker | None = None,
        context_config: ContextConfig | None = None,
    ):
        check_encoder(index.manifest, encoder.fingerprint(), index.path)
        self.encoder = encoder
        self.index = index
        self.linking = linking or LinkingConfig()
        self.reranker = reranker
        self.reranker_config = reranker_config or RerankerConfig()
        self.ranker = ranker
        unknown = set(self.linking.retrievers) - set(RETRIEVERS)
        if unknown or "dense" not in self.linking.retrievers:
            raise ConfigError(f"linking.retrievers must hold dense, and lexical if wanted; got "
                              f"{list(self.linking.retrievers)}")
        self.hybrid = "lexical" in self.linking.retrievers
        if self.hybrid and index.lexical is None:
            raise ConfigError(f"linking.retrievers has lexical, but index {index.path} has no "
                              "lexical model: rebuild it with clinlinker build-index")
        if ranker is not None:
            ranker.check_compatible(self)
        #: the context stage (its own Linker: the same encoder and index, the context-aware
        #: cross-encoder and its ranker); None: every mention is linked from its text alone
        self.context_stage = context_stage
        self.context_config = context_config or ContextConfig()
        if context_stage is not None:
            if (context_stage.reranker is None or not context_stage.reranker.context_chars
                    or context_stage.ranker is None):
                raise ConfigError("the context stage needs a context-aware cross-encoder "
                                  "(trained with context: true) and a ranker")
            if context_stage.index is not index:
                raise ConfigError("the context stage must share the linker's index")
        self.context_counts: dict[str, int] = dict.fromkeys(CONTEXT_COUNTS, 0)
        self.stage_seconds: dict[str, float] = dict.fromkeys(STAGE_TIMERS, 0.0)
        self.counts: dict[str, int] = dict.fromkeys(VECTOR_COUNTS, 0)
        self.reuses_index_vectors = (self.linking.reuse_index_vectors
                                     and index.holds_vectors_of(encoder.precision))
        log.debug("index term vectors reused for exact texts: %s (setting %s, index built in "
                  "%s, encoder in %s)", self.reuses_index_vectors,
                  self.linking.reuse_index_vectors,
                  index.manifest.get("build", {}).get("precision"), encoder.precision)

    def with_linking(self, linking: LinkingConfig) -> Linker:
        """A Linker with ``linking`` around this one's encoder, index, re-ranker and ranker
        (nothing is loaded again; counters start at zero)."""
        return Linker(self.encoder, self.index, linking, self.reranker, self.reranker_config,
                      self.ranker,
                      None if self.context_stage is None
                      else self.context_stage.with_linking(linking), self.context_config)

    def with_index(self, index: TerminologyIndex) -> Linker:
        """A Linker over another index with the same vectors (``TerminologyIndex.
        with_terminology``), the same models and settings."""
        return Linker(self.encoder, index, self.linking, self.reranker, self.reranker_config,
                      self.ranker,
                      None if self.context_stage is None
                      else self.context_stage.with_index(index), self.context_config)

    def take_counts(self) -> dict[str, int]:
        """VECTOR_COUNTS since the last call, and reset them."""
        taken, self.counts = self.counts, dict.fromkeys(VECTOR_COUNTS, 0)
        return taken

    def take_context_counts(self) -> dict[str, int]:
        """CONTEXT_COUNTS since the last call, and reset them."""
        taken, self.context_counts = self.context_counts, dict.fromkeys(CONTEXT_COUNTS, 0)
        return taken

    def take_stage_seconds(self) -> dict[str, float]:
        """Wall seconds per stage (STAGE_TIMERS) since the last call, and reset the counters."""
        taken, self.stage_seconds = self.stage_seconds, dict.fromkeys(STAGE_TIMERS, 0.0)
        return taken

    @classmethod
    def from_config(cls, config: JobConfig, index_path: str | None = None,
                    mmap: bool = False) -> "Linker":
        """Load encoder, index (``index_path`` overrides ``config.index.path``), re-ranker and
        ranker; each model a directory or a ``models:/`` URI of ``config.mlflow``'s
        registry."""
        from clinlinker_spark.encoder import BiEncoder
        from clinlinker_spark.tracking import resolve_model_paths

        config, _ = resolve_model_paths(config)
        encoder = BiEncoder.from_config(config.encoder)
        index = TerminologyIndex.load(index_path or config.index.path,
                                      expected_fingerprint=encoder.fingerprint(), mmap=mmap)
        device = search_device(config.index.search_device, encoder.device, index)
        if device is not None:
            index.place_on(device)
        reranker = None
        if config.reranker.path:
            from clinlinker_spark.reranker import CrossEncoderReranker

            reranker = CrossEncoderReranker.from_config(config.reranker)
        ranker = None
        if config.ranker.path:
            from clinlinker_spark.ranker import Ranker

            # prediction threads: the ranker's own setting, else the encoder's (a Spark task's
            # cores), else LightGBM's default
            ranker = Ranker.load(config.ranker.path,
                                 config.ranker.num_threads or config.encoder.num_threads)
        context_stage = None
        if config.context.reranker:
            context_stage = cls.context_stage_of(
                encoder, index, config.linking, config.context, config.reranker,
                config.encoder.num_threads, config.ranker.num_threads)
        return cls(encoder, index, config.linking, reranker, config.reranker, ranker,
                   context_stage, config.context)

    @classmethod
    def context_stage_of(cls, encoder: Any, index: TerminologyIndex, linking: LinkingConfig,
                         context: ContextConfig, reranker: RerankerConfig,
                         num_threads: int = 0, ranker_threads: int = 0) -> "Linker":
        """Load the context stage that ``context`` describes: a Linker over the same encoder
        and index with the context-aware cross-encoder (``reranker``'s device and precision,
        ``context``'s path, top_n, batch size and max length) and the context ranker."""
        from clinlinker_spark.ranker import Ranker
        from clinlinker_spark.reranker import CrossEncoderReranker

        stage_config = dataclasses.replace(
            reranker, path=context.reranker, top_n=context.top_n,
            batch_size=context.batch_size, max_length=context.max_length)
        return cls(encoder, index, linking,
                   CrossEncoderReranker.from_config(stage_config, num_threads), stage_config,
                   Ranker.load(context.ranker, ranker_threads or num_threads))

    @property
    def versions(self) -> dict[str, str]:
        return {
            "model_version": self.encoder.model_hash,
            "index_version": self.index.content_hash,
            "reranker_version": self.reranker.model_hash if self.reranker is not None else "",
            "ranker_version": self.ranker.model_hash if self.ranker is not None else "",
        }

    @property
    def context_version(self) -> str:
        """:func:`context_version` of the context stage; "" without one."""
        stage = self.context_stage
        if stage is None:
            return ""
        return context_version(stage.reranker.model_hash, stage.ranker.model_hash,
                               self.context_config)

    def retrieve(self, texts_norm: Sequence[str]) -> list[list[Candidate]]:
        """Candidates of the configured retrievers (no re-ranking) for normalised texts."""
        texts_norm = list(texts_norm)
        if not texts_norm:
            return []
        t0 = time.perf_counter()
        vectors = self.embed(texts_norm)
        t1 = time.perf_counter()
        hits = self.index.search(vectors, self.linking.search_k)
        t2 = time.perf_counter()
        self_scores = np.einsum("ij,ij->i", vectors, vectors)
        seconds = self.stage_seconds
        seconds["encode"] += t1 - t0
        seconds["search"] += t2 - t1
        if self.hybrid:
            lexical = self.index.lexical
            queries = lexical.transform(texts_norm)
            lexical_hits = lexical.search(texts_norm, self.linking.lexical_k
                                          or self.linking.search_k, queries)
            t3 = time.perf_counter()
            seconds["lexical"] += t3 - t2
            t2 = t3
            candidates = hybrid_candidates(self.index, texts_norm, hits, lexical_hits, vectors,
                                           queries, self.linking.top_k,
                                           self.linking.exact_match_prior, self_scores)
        else:
            queries = None
            candidates = candidates_from_hits(self.index, texts_norm, hits, self.linking.top_k,
                                              self.linking.exact_match_prior, self_scores)
        candidates = expand_to_leaves(self.index, candidates, self.linking.expand_leaves,
                                      vectors, queries)
        seconds["candidates"] += time.perf_counter() - t2
        return candidates

    def embed(self, texts_norm: list[str]) -> np.ndarray:
        """The bi-encoder's vectors of ``texts_norm`` (float32 [n, dim]). With
        ``reuses_index_vectors``, a text that is a term of the index takes the term's stored
        vector, which is what encoding it gives; the others are encoded in one call."""
        positions = (np.fromiter((self.index.position_of(t) for t in texts_norm), np.int64,
                                 len(texts_norm))
                     if self.reuses_index_vectors else np.full(len(texts_norm), -1))
        known = positions >= 0
        n_known = int(known.sum())
        self.counts["vectors_reused"] += n_known
        self.counts["texts_encoded"] += len(texts_norm) - n_known
        if n_known == 0:
            return self.encoder.encode(texts_norm)
        vectors = np.empty((len(texts_norm), self.index.faiss_index.d), np.float32)
        vectors[known] = self.index.vectors_at(positions[known])
        todo = np.flatnonzero(~known)
        if len(todo):
            vectors[todo] = self.encoder.encode([texts_norm[i] for i in todo])
        return vectors

    def rerank(self, texts_norm: Sequence[str], candidates: list[list[Candidate]],
               queries: Sequence[str] | None = None) -> list[list[Candidate]]:
        """Cross-encoder scores of the first ``reranker.top_n`` candidates; without a ranker
        they also re-order them. The identity when no re-ranker is configured. ``queries``:
        what the cross-encoder reads for each mention instead of its text (a context-aware
        one: :meth:`CrossEncoderReranker.queries`)."""
        if self.reranker is None:
            return candidates
        started = time.perf_counter()
        firsts = list(texts_norm if queries is None else queries)
        if len(firsts) != len(candidates):
            raise ValueError(f"{len(firsts)} queries for {len(candidates)} candidate lists")
        if self.ranker is not None:  # the ranker decides the order, with this score a feature
            reranked = score_candidates(firsts, candidates, self.reranker.score,
                                        self.reranker_config.top_n)
        else:
            reranked = rerank_candidates(firsts, candidates, self.reranker.score,
                                         self.reranker_config.top_n,
                                         self.linking.exact_match_prior,
                                         self.reranker_config.fusion, self.reranker_config.rrf_k)
        self.stage_seconds["rerank"] += time.perf_counter() - started
        return reranked

    def rank(self, texts_norm: Sequence[str], candidates: list[list[Candidate]]
             ) -> tuple[list[list[Candidate]], list[float | None]]:
        """The last stage: the ranker's order and each mention's confidence (None without a
        ranker), lists cut to ``top_k``."""
        top_k = self.linking.top_k
        if self.ranker is None:
            return [c[:top_k] for c in candidates], [None] * len(candidates)
        started = time.perf_counter()
        ranked, confidences = self.ranker.rank(self.index, list(texts_norm), candidates,
                                               keep=top_k)
        self.stage_seconds["rank"] += time.perf_counter() - started
        return ranked, confidences

    def link_texts(self, texts: Sequence[str], contexts: Sequence[Any] | None = None
                   ) -> tuple[list[list[Candidate]], list[float | None]]:
        """Normalise, retrieve, re-rank and rank; each distinct normal form is processed once.
        With a context stage and ``contexts`` (per text ``(context, start, end)`` or None),
        the mentions that :meth:`needs_context` are linked again by it, once per distinct
        (form, context). Returns each text's candidates and confidence."""
        norms = [normalize_text(t) for t in texts]
        unique = list(dict.fromkeys(norms))
        retrieved = self.retrieve(unique)
        ranked, confidences = self.rank(unique, self.rerank(unique, retrieved))
        by_text = dict(zip(unique, zip(ranked, confidences)))
        out = [by_text[n][0] for n in norms]
        conf = [by_text[n][1] for n in norms]
        if self.context_stage is None or contexts is None:
            return out, conf
        if len(contexts) != len(norms):
            raise ValueError(f"{len(norms)} texts but {len(contexts)} contexts")
        gated = [i for i, ctx in enumerate(contexts)
                 if ctx is not None and self.needs_context(out[i], conf[i])]
        self.context_counts["mentions"] += len(norms)
        self.context_counts["with_context"] += sum(c is not None for c in contexts)
        self.context_counts["context_stage"] += len(gated)
        if not gated:
            return out, conf
        started = time.perf_counter()
        queries = self.context_stage.reranker.queries([norms[i] for i in gated],
                                                      [contexts[i] for i in gated])
        keys = [(norms[i], q) for i, q in zip(gated, queries)]
        items = list(dict.fromkeys(keys))
        position = {t: j for j, t in enumerate(unique)}
        item_texts = [t for t, _ in items]
        again, again_conf = self.link_in_context(
            item_texts, [q for _, q in items], [retrieved[position[t]] for t in item_texts])
        result = dict(zip(items, zip(again, again_conf)))
        for i, key in zip(gated, keys):
            out[i], conf[i] = result[key]
        self.context_counts["context_lists"] += len(items)
        self.stage_seconds["context"] += time.perf_counter() - started
        return out, conf

    def link_in_context(self, texts_norm: Sequence[str], queries: Sequence[str],
                        retrieved: list[list[Candidate]] | None = None
                        ) -> tuple[list[list[Candidate]], list[float | None]]:
        """The context stage's candidates and confidence for each (form, query): the
        context-aware cross-encoder scores the form's retrieved candidates (``retrieved``, or
        this Linker's retrievers when None) against ``queries`` (the mention marked in its
        context, ``CrossEncoderReranker.queries``), and the context ranker orders them."""
        stage = self.context_stage
        if stage is None:
            raise ConfigError("this Linker has no context stage (context.reranker)")
        if retrieved is None:
            retrieved = self.retrieve(list(texts_norm))
        return stage.rank(texts_norm, stage.rerank(texts_norm, retrieved, queries=queries))

    def needs_context(self, candidates: list[Candidate], confidence: float | None) -> bool:
        """Whether the context stage links a mention again (:func:`needs_context`)."""
        return needs_context([c.code for c in candidates[:2]], confidence,
                             self.context_config)

    def score_of(self, candidates: list[Candidate]) -> float | None:
        if not candidates:
            return None
        best = candidates[0]
        if best.ranker_score is not None:
            return best.ranker_score
        if self.reranker is not None and best.rerank_score is not None:
            return _sigmoid(best.rerank_score)
        return best.retrieval_score

    def outcome(self, candidates: list[Candidate], confidence: float | None = None
                ) -> tuple[str, str | None, str | None, str | None, float | None, float | None]:
        """(status, reason, code, term, score, confidence) of a valid mention's ranked
        candidates. A link whose confidence is below ``linking.review_below`` is
        ``needs_review``: it keeps its code."""
        score = self.score_of(candidates)
        floor = self.linking.min_score
        if not candidates or score is None or (floor is not None and score < floor):
            why = "no candidate" if not candidates else (
                f"best score below linking.min_score={floor}")
            return STATUS_NO_CANDIDATE, why, None, None, score, confidence
        best = candidates[0]
        if confidence is not None and confidence < self.linking.review_below:
            return (STATUS_NEEDS_REVIEW,
                    f"confidence below linking.review_below={self.linking.review_below}",
                    best.code, best.term, score, confidence)
        return STATUS_LINKED, None, best.code, best.term, score, confidence

    def link(self, mentions: pd.DataFrame | Any, text_column: str = "text",
             id_column: str = "mention_id",
             context_columns: tuple[str, str, str] | None = None) -> pd.DataFrame:
        """Link a batch (pandas DataFrame or Arrow table): one output row per input row.

        Output columns: RESULT_COLUMNS. ``candidates`` is a list of dicts (code, term,
        retrieval_score, rerank_score, exact, lexical_score, ranker_score). Invalid rows get
        status invalid_input and a reason; they are never dropped. ``context_columns``: the
        (context, start, end) columns the context stage reads (``corpora.read_gold`` with a
        ``text_dir`` writes ``context``, ``context_start``, ``context_end``); a row whose
        context is empty or whose offsets do not fit it is linked from its text alone.
        """
        if not isinstance(mentions, pd.DataFrame):
            mentions = mentions.to_pandas()
        wanted = [id_column, text_column, *(context_columns or ())]
        missing = [c for c in wanted if c not in mentions.columns]
        if missing:
            raise InputDataError(f"mentions are missing column(s) {missing}; "
                                 f"they have {list(mentions.columns)}")
        texts = mentions[text_column].tolist()
        reasons = [invalid_reason(t, self.linking.max_text_length) for t in texts]
        valid = [i for i, r in enumerate(reasons) if r is None]
        contexts = None
        if context_columns is not None:
            contexts = mention_contexts(mentions, *context_columns)
            contexts = [contexts[i] for i in valid]
        linked, confidences = self.link_texts([texts[i] for i in valid], contexts)
        result_of = dict(zip(valid, zip(linked, confidences)))
        records = []
        for i, (mention_id, text) in enumerate(zip(mentions[id_column].tolist(), texts)):
            if reasons[i] is not None:
                records.append((mention_id, None, STATUS_INVALID, reasons[i], None, None,
                                None, None, []))
                continue
            cands, confidence = result_of[i]
            status, reason, code, term, score, confidence = self.outcome(cands, confidence)
            records.append((mention_id, normalize_text(text), status, reason, code, term,
                            score, confidence, [asdict(c) for c in cands]))
        n_bad = len(texts) - len(valid)
        log.debug("linked a batch of %d mentions (%d invalid)", len(texts), n_bad)
        return pd.DataFrame.from_records(records, columns=RESULT_COLUMNS)
