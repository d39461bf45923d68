"""The lexical retriever: character 3-gram TF-IDF over an index's texts, with cosine scores.

The shared-task baselines and scispaCy's candidate generator use character n-gram TF-IDF.
This one is fitted on the distinct normalised texts of a dense index (``TerminologyIndex.texts``,
one row per vector position), so its hits are positions of the same texts: they go through the
same one-candidate-per-code logic, and a candidate found by either retriever can be scored by
both (``Linker`` with ``linking.retrievers: [dense, lexical]``).

Analyzer: character 3-grams inside word boundaries (scikit-learn's ``char_wb``), sublinear tf,
smooth idf, rows L2-normalised. The fitted model is part of the index artifact, without
pickle: ``lexical.json`` (settings and the n-gram vocabulary in column order) and
``lexical.npz`` (idf and the CSR term matrix, read with ``allow_pickle=False``); both enter
the index's content hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

from clinlinker_spark.candidates import Hits
from clinlinker_spark.errors import ArtifactError

LEXICAL_JSON = "lexical.json"
LEXICAL_NPZ = "lexical.npz"
LEXICAL_KIND = "char_wb-tfidf"


def _vectorizer(ngram: int, vocabulary: dict[str, int] | None = None) -> TfidfVectorizer:
    return TfidfVectorizer(
        analyzer="char_wb", ngram_range=(ngram, ngram), sublinear_tf=True, lowercase=False,
        dtype=np.float32, vocabulary=vocabulary,
    )


class LexicalIndex:
    """A fitted character n-gram TF-IDF model and the matrix of the texts it was fitted on.

    ``matrix`` is CSR [texts, features] (rows L2-normalised); ``search`` returns :class:`Hits`
    whose positions are row numbers of ``texts``.
    """

    def __init__(self, vectorizer: TfidfVectorizer, matrix: sp.csr_matrix, ngram: int,
                 chunk_size: int = 256):
        self.vectorizer = vectorizer
        self.matrix = matrix.tocsr()
        self._by_feature = self.matrix.T.tocsr()  # [features, texts]: queries @ this
        self.ngram = ngram
        self.chunk_size = chunk_size

    @classmethod
    def fit(cls, texts: Sequence[str], ngram: int = 3, chunk_size: int = 256) -> LexicalIndex:
        vectorizer = _vectorizer(ngram)
        matrix = vectorizer.fit_transform(list(texts))
        return cls(vectorizer, matrix.astype(np.float32), ngram, chunk_size)

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        """TF-IDF rows [len(texts), features] of query texts (L2-normalised)."""
        return self.vectorizer.transform(list(texts)).tocsr()

    def search(self, texts_norm: Sequence[str], k: int,
               queries: sp.csr_matrix | None = None) -> Hits:
        """Top-``k`` texts per query by cosine: scores float32 [n, k] best first (ties by
        position), positions int64 [n, k]; -1 (score 0) where fewer than k texts share an
        n-gram with the query. ``queries``: their :meth:`transform`, when already computed."""
        n = len(texts_norm)
        k = max(0, min(k, len(self)))
        scores = np.zeros((n, k), dtype=np.float32)
        positions = np.full((n, k), -1, dtype=np.int64)
        if n == 0 or k == 0:
            return Hits(scores, positions)
        q_all = queries if queries is not None else self.transform(texts_norm)
        for start in range(0, n, self.chunk_size):
            sims = (q_all[start:start + self.chunk_size] @ self._by_feature).tocsr()
            for r in range(sims.shape[0]):
                lo, hi = sims.indptr[r], sims.indptr[r + 1]
                if hi == lo:
                    continue
                cols = sims.indices[lo:hi]
                vals = sims.data[lo:hi]
                if len(vals) > k:
                    top = np.argpartition(-vals, k - 1)[:k]
                    cols, vals = cols[top], vals[top]
                order = np.lexsort((cols, -vals))  # score, then position: order-independent
                m = len(order)
                scores[start + r, :m] = vals[order]
                positions[start + r, :m] = cols[order]
        return Hits(scores, positions)

    def pair_scores(self, queries: sp.csr_matrix, rows: np.ndarray,
                    positions: np.ndarray) -> np.ndarray:
        """Cosine of query ``rows[j]`` (a row of ``queries``) and text ``positions[j]``,
        float32 [len(rows)]."""
        if len(rows) == 0:
            return np.zeros(0, np.float32)
        products = queries[rows].multiply(self.matrix[positions])
        return np.asarray(products.sum(axis=1), dtype=np.float32).reshape(-1)

    # ---------------------------------------------------------------------------------------
    # Artifact files

    def save(self, directory: Path) -> None:
        """Write ``lexical.json`` and ``lexical.npz`` into ``directory``."""
        vocabulary = self.vectorizer.vocabulary_
        features = [""] * len(vocabulary)
        for gram, column in vocabulary.items():
            features[column] = gram
        (directory / LEXICAL_JSON).write_text(json.dumps(
            {"kind": LEXICAL_KIND, "ngram": self.ngram, "sublinear_tf": True,
             "texts": len(self), "features": features}, ensure_ascii=False), encoding="utf-8")
        m = self.matrix
        np.savez(directory / LEXICAL_NPZ, idf=self.vectorizer.idf_.astype(np.float64),
                 data=m.data.astype(np.float32), indices=m.indices.astype(np.int32),
                 indptr=m.indptr.astype(np.int64), shape=np.array(m.shape, np.int64))

    @classmethod
    def load(cls, directory: Path) -> LexicalIndex:
        spec_file, arrays_file = directory / LEXICAL_JSON, directory / LEXICAL_NPZ
        if not spec_file.is_file() or not arrays_file.is_file():
            raise ArtifactError(f"index {directory} has no lexical model ({LEXICAL_JSON}, "
                                f"{LEXICAL_NPZ}): rebuild it with clinlinker build-index")
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        if spec.get("kind") != LEXICAL_KIND:
            raise ArtifactError(f"{spec_file}: unknown lexical model kind {spec.get('kind')!r}")
        with np.load(arrays_file, allow_pickle=False) as arrays:
            idf = arrays["idf"]
            matrix = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]),
                                   shape=tuple(int(v) for v in arrays["shape"]))
        vectorizer = _vectorizer(int(spec["ngram"]),
                                 {g: i for i, g in enumerate(spec["features"])})
        vectorizer.idf_ = idf
        return cls(vectorizer, matrix, int(spec["ngram"]))
