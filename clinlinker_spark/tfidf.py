"""Lexical baseline retriever: character 3-gram TF-IDF with cosine similarity.

The shared-task baselines and scispaCy's candidate generator use character n-gram TF-IDF. This
one searches the same distinct normalised texts as a dense index (``TerminologyIndex.texts``),
so its hits go through the same one-candidate-per-code logic and every evaluation can show the
baseline beside the model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from clinlinker_spark.index import Hits


class TfidfRetriever:
    """Character 3-grams inside word boundaries (``char_wb``), sublinear tf, L2-normalised."""

    def __init__(self, texts: Sequence[str], ngram: int = 3, chunk_size: int = 512):
        self.texts = list(texts)
        self.vectorizer = TfidfVectorizer(
            analyzer="char_wb", ngram_range=(ngram, ngram), sublinear_tf=True,
            lowercase=False, dtype=np.float32,
        )
        self.matrix = self.vectorizer.fit_transform(self.texts).T.tocsr()  # [features, texts]
        self.chunk_size = chunk_size

    def search(self, texts_norm: Sequence[str], k: int) -> Hits:
        """Top-``k`` index texts per query: scores float32 [n, k], positions int64 [n, k]."""
        k = min(k, len(self.texts))
        n = len(texts_norm)
        scores = np.full((n, k), -1.0, dtype=np.float32)
        positions = np.full((n, k), -1, dtype=np.int64)
        for start in range(0, n, self.chunk_size):
            queries = self.vectorizer.transform(texts_norm[start:start + self.chunk_size])
            sims = (queries @ self.matrix).toarray()  # [chunk, texts]
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            top_scores = np.take_along_axis(sims, top, axis=1)
            # order by score, ties by position, so results do not depend on partition order
            order = np.lexsort((top, -top_scores), axis=1)
            top = np.take_along_axis(top, order, axis=1)
            top_scores = np.take_along_axis(top_scores, order, axis=1)
            rows = slice(start, start + len(top))
            positions[rows] = np.where(top_scores > 0, top, -1)
            scores[rows] = top_scores
        return Hits(scores, positions)
