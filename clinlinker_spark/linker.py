"""The linker: mentions in, ranked codes out. The function every job (and every UDF) calls.

Stages, each usable on its own:

1. ``invalid_reason``: per-row validation (null, empty/whitespace, over-long text).
2. ``retrieve``: bi-encoder embedding of the normalised text, FAISS search of ``search_k`` raw
   hits (distinct texts), then one candidate per code (the code's best-scoring synonym), up to
   ``top_k`` codes. With the exact-match prior, codes whose normalised term equals the mention
   come first, ordered by how many training mentions carry them.
3. ``rerank``: the cross-encoder re-scores the first ``top_n`` candidates and re-orders them
   (exact matches stay first when the prior is on: a cross-encoder cannot tell identical texts
   apart any more than the bi-encoder can); candidates past ``top_n`` keep their order.
   ``reranker.fusion: rrf`` orders them by reciprocal-rank fusion of the retrieval and
   cross-encoder orders instead of the cross-encoder score alone.

Scores: ``retrieval_score`` is the bi-encoder inner product (cosine when embeddings are
L2-normalised); ``rerank_score`` is the cross-encoder logit. A mention's ``score`` is the
sigmoid of the best candidate's rerank logit when a re-ranker ran, else its retrieval score.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from clinlinker_spark.config import RERANK_FUSIONS, JobConfig, LinkingConfig, RerankerConfig
from clinlinker_spark.errors import ConfigError, InputDataError
from clinlinker_spark.index import Hits, TerminologyIndex, check_encoder
from clinlinker_spark.text import normalize_text

log = logging.getLogger(__name__)

STATUS_LINKED = "linked"
STATUS_NO_CANDIDATE = "no_candidate"
STATUS_INVALID = "invalid_input"
RESULT_COLUMNS = ["mention_id", "text_norm", "status", "reason", "code", "term", "score",
                  "candidates"]
# Wall seconds a Linker spends per stage (Linker.stage_seconds): bi-encoder embedding, FAISS
# search, hits -> per-code candidates, cross-encoder re-ranking.
STAGE_TIMERS = ("encode", "search", "candidates", "rerank")
# Texts a Linker embedded with the bi-encoder, and texts that took an index term's stored
# vector instead (Linker.take_counts; LinkingConfig.reuse_index_vectors).
VECTOR_COUNTS = ("texts_encoded", "vectors_reused")
# Cross-encoder scores are compared at this many decimals: scores that equal at this precision
# are ties and keep the retrieval order. The same pair scored in batches of other shapes (one
# Spark partitioning or another) differs in the last float bits; without this, such near-ties
# would order differently from run to run.
RERANK_DECIMALS = 4


@dataclass(frozen=True)
class Candidate:
    code: str
    term: str
    retrieval_score: float
    rerank_score: float | None = None
    exact: bool = False


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


_GC_LOCK = threading.Lock()
_GC_PAUSES = 0  # pauses in force (gc_paused), across threads
_GC_WAS_ENABLED = True  # the collector's state when the first of them began


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building many small acyclic objects.

    Candidate lists are freed by reference counting; the collector's passes over the
    millions of objects a partition's linking holds cost more than building them (on 13k
    forms: 171 -> 61 us per form for :func:`candidates_from_hits`). Pauses nest and may
    overlap across threads: the collector runs again when the last one ends, if it ran
    before the first.
    """
    global _GC_PAUSES, _GC_WAS_ENABLED
    with _GC_LOCK:
        if _GC_PAUSES == 0:
            _GC_WAS_ENABLED = gc.isenabled()
            gc.disable()
        _GC_PAUSES += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_PAUSES -= 1
            if _GC_PAUSES == 0 and _GC_WAS_ENABLED:
                gc.enable()


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
            exact_position = index.position_of(text) if exact_match_prior else -1
            if exact_position >= 0:
                if exact_position in positions:
                    exact_score = scores[positions.index(exact_position)]
                else:
                    exact_score = float(self_scores[i]) if self_scores is not None else 1.0
                for code, key, term in code_rows(exact_position):
                    if key not in seen:
                        seen.add(key)
                        out.append(Candidate(code, term, exact_score, None, True))
            for score, position in zip(scores, positions):
                if len(out) >= top_k:
                    break
                if position < 0 or position == exact_position:
                    continue
                for code, key, term in code_rows(position, exact_match_prior):
                    if key not in seen:
                        seen.add(key)
                        out.append(Candidate(code, term, score, None, False))
            results.append(out[:top_k])
    return results


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
                Candidate(c.code, c.term, c.retrieval_score, scores[pos + j], c.exact)
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
    """Links batches of mentions with one bi-encoder, one index and an optional re-ranker."""

    def __init__(
        self,
        encoder: Any,
        index: TerminologyIndex,
        linking: LinkingConfig | None = None,
        reranker: Any | None = None,
        reranker_config: RerankerConfig | None = None,
    ):
        check_encoder(index.manifest, encoder.fingerprint(), index.path)
        self.encoder = encoder
        self.index = index
        self.linking = linking or LinkingConfig()
        self.reranker = reranker
        self.reranker_config = reranker_config or RerankerConfig()
        self.stage_seconds: dict[str, float] = dict.fromkeys(STAGE_TIMERS, 0.0)
        self.counts: dict[str, int] = dict.fromkeys(VECTOR_COUNTS, 0)
        self.reuses_index_vectors = (self.linking.reuse_index_vectors
                                     and index.holds_vectors_of(encoder.precision))
        log.debug("index term vectors reused for exact texts: %s (setting %s, index built in "
                  "%s, encoder in %s)", self.reuses_index_vectors,
                  self.linking.reuse_index_vectors,
                  index.manifest.get("build", {}).get("precision"), encoder.precision)

    def with_linking(self, linking: LinkingConfig) -> Linker:
        """A Linker with ``linking`` around this one's encoder, index and re-ranker (nothing
        is loaded again; counters start at zero)."""
        return Linker(self.encoder, self.index, linking, self.reranker, self.reranker_config)

    def take_counts(self) -> dict[str, int]:
        """VECTOR_COUNTS since the last call, and reset them."""
        taken, self.counts = self.counts, dict.fromkeys(VECTOR_COUNTS, 0)
        return taken

    def take_stage_seconds(self) -> dict[str, float]:
        """Wall seconds per stage (STAGE_TIMERS) since the last call, and reset the counters."""
        taken, self.stage_seconds = self.stage_seconds, dict.fromkeys(STAGE_TIMERS, 0.0)
        return taken

    @classmethod
    def from_config(cls, config: JobConfig, index_path: str | None = None,
                    mmap: bool = False) -> "Linker":
        """Load encoder, index (``index_path`` overrides ``config.index.path``) and re-ranker."""
        from clinlinker_spark.encoder import BiEncoder

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
        return cls(encoder, index, config.linking, reranker, config.reranker)

    @property
    def versions(self) -> dict[str, str]:
        return {
            "model_version": self.encoder.model_hash,
            "index_version": self.index.content_hash,
            "reranker_version": self.reranker.model_hash if self.reranker is not None else "",
        }

    def retrieve(self, texts_norm: Sequence[str]) -> list[list[Candidate]]:
        """Bi-encoder + FAISS candidates (no re-ranking) for already normalised texts."""
        texts_norm = list(texts_norm)
        if not texts_norm:
            return []
        t0 = time.perf_counter()
        vectors = self.embed(texts_norm)
        t1 = time.perf_counter()
        hits = self.index.search(vectors, self.linking.search_k)
        t2 = time.perf_counter()
        self_scores = np.einsum("ij,ij->i", vectors, vectors)
        candidates = candidates_from_hits(self.index, texts_norm, hits, self.linking.top_k,
                                          self.linking.exact_match_prior, self_scores)
        seconds = self.stage_seconds
        seconds["encode"] += t1 - t0
        seconds["search"] += t2 - t1
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

    def rerank(self, texts_norm: Sequence[str],
               candidates: list[list[Candidate]]) -> list[list[Candidate]]:
        """Cross-encoder re-ranking; the identity when no re-ranker is configured."""
        if self.reranker is None:
            return candidates
        started = time.perf_counter()
        reranked = rerank_candidates(list(texts_norm), candidates, self.reranker.score,
                                     self.reranker_config.top_n, self.linking.exact_match_prior,
                                     self.reranker_config.fusion, self.reranker_config.rrf_k)
        self.stage_seconds["rerank"] += time.perf_counter() - started
        return reranked

    def link_texts(self, texts: Sequence[str]) -> list[list[Candidate]]:
        """Normalise, retrieve and re-rank; each distinct normal form is processed once."""
        norms = [normalize_text(t) for t in texts]
        unique = list(dict.fromkeys(norms))
        ranked = self.rerank(unique, self.retrieve(unique))
        by_text = dict(zip(unique, ranked))
        return [by_text[n] for n in norms]

    def score_of(self, candidates: list[Candidate]) -> float | None:
        if not candidates:
            return None
        best = candidates[0]
        if self.reranker is not None and best.rerank_score is not None:
            return _sigmoid(best.rerank_score)
        return best.retrieval_score

    def outcome(self, candidates: list[Candidate]
                ) -> tuple[str, str | None, str | None, str | None, float | None]:
        """(status, reason, code, term, score) of a valid mention's ranked candidates."""
        score = self.score_of(candidates)
        if not candidates or score is None or score < self.linking.min_score:
            why = "no candidate" if not candidates else (
                f"best score below linking.min_score={self.linking.min_score}")
            return STATUS_NO_CANDIDATE, why, None, None, score
        return STATUS_LINKED, None, candidates[0].code, candidates[0].term, score

    def link(self, mentions: pd.DataFrame | Any, text_column: str = "text",
             id_column: str = "mention_id") -> pd.DataFrame:
        """Link a batch (pandas DataFrame or Arrow table): one output row per input row.

        Output columns: RESULT_COLUMNS. ``candidates`` is a list of dicts (code, term,
        retrieval_score, rerank_score, exact). Invalid rows get status invalid_input and a
        reason; they are never dropped.
        """
        if not isinstance(mentions, pd.DataFrame):
            mentions = mentions.to_pandas()
        missing = [c for c in (id_column, text_column) if c not in mentions.columns]
        if missing:
            raise InputDataError(f"mentions are missing column(s) {missing}; "
                                 f"they have {list(mentions.columns)}")
        texts = mentions[text_column].tolist()
        reasons = [invalid_reason(t, self.linking.max_text_length) for t in texts]
        valid = [i for i, r in enumerate(reasons) if r is None]
        linked = self.link_texts([texts[i] for i in valid])
        cands_of = dict(zip(valid, linked))
        records = []
        for i, (mention_id, text) in enumerate(zip(mentions[id_column].tolist(), texts)):
            if reasons[i] is not None:
                records.append((mention_id, None, STATUS_INVALID, reasons[i], None, None,
                                None, []))
                continue
            cands = cands_of[i]
            status, reason, code, term, score = self.outcome(cands)
            records.append((mention_id, normalize_text(text), status, reason, code, term,
                            score, [asdict(c) for c in cands]))
        n_bad = len(texts) - len(valid)
        log.debug("linked a batch of %d mentions (%d invalid)", len(texts), n_bad)
        return pd.DataFrame.from_records(records, columns=RESULT_COLUMNS)
