"""The values retrieval hands from stage to stage: raw search :class:`Hits` (FAISS or the
lexical retriever), a mention's scored :class:`Candidate` codes, and :func:`gc_paused` for the
loops that build millions of them. No model, index or Spark import: the index, the lexical
retriever, the linker and the ranker all build on it."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class Hits:
    """Raw search hits: ``scores`` float32 [n, k], ``positions`` int64 [n, k] (-1 = none)."""

    scores: np.ndarray
    positions: np.ndarray


@dataclass(slots=True)
class Candidate:
    """One candidate code of a mention. Treated as a value: stages build new ones rather than
    change them (not frozen, because a frozen dataclass costs 5x more to build and a night
    builds about a hundred per distinct form)."""

    code: str
    term: str
    retrieval_score: float  # bi-encoder score of ``term``
    rerank_score: float | None = None  # cross-encoder logit (first reranker.top_n only)
    exact: bool = False  # term equals the mention (normalised)
    lexical_score: float | None = None  # TF-IDF cosine of ``term`` (lexical retriever on)
    ranker_score: float | None = None  # the ranker's score (ranker on)
    dense_hits: int = 0  # how many of the mention's dense hits (search_k texts) carry the code


_GC_LOCK = threading.Lock()
_GC_PAUSES = 0  # pauses in force (gc_paused), across threads
_GC_WAS_ENABLED = True  # the collector's state when the first of them began


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building many small acyclic objects.

    Candidate lists are freed by reference counting; the collector's passes over the
    millions of objects a partition's linking holds cost more than building them. Pauses
    nest and may overlap across threads: the collector runs again when the last one ends,
    if it ran before the first.
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
