from __future__ import annotations

import numpy as np

from clinlinker_spark.lexical import LexicalIndex


def test_tfidf_ranks_lexically_closest_text_first():
    texts = ["insuficiencia cardiaca", "insuficiencia renal", "fractura de fémur", "neumonía"]
    r = LexicalIndex.fit(texts)
    hits = r.search(["insuficiencia cardíaca congestiva", "fractura femur", "neumonia"], 4)
    assert hits.scores.shape == (3, 4) and hits.positions.dtype == np.int64
    assert [texts[p] for p in hits.positions[:, 0]] == [
        "insuficiencia cardiaca", "fractura de fémur", "neumonía"]
    assert np.all(np.diff(hits.scores, axis=1) <= 1e-6)  # sorted by score
    same = r.search(["neumonía"], 1)
    assert same.scores[0, 0] > 0.999


def test_tfidf_marks_no_overlap_as_missing_and_is_chunk_independent():
    texts = ["abc", "xyz", "abd"]
    one = LexicalIndex.fit(texts, chunk_size=1).search(["abc", "qqq"], 3)
    many = LexicalIndex.fit(texts, chunk_size=100).search(["abc", "qqq"], 3)
    assert np.array_equal(one.positions, many.positions)
    assert (one.positions[1] == -1).all()
