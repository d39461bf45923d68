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


TEXTS = ["insuficiencia cardiaca", "insuficiencia renal crónica", "fractura de fémur",
         "neumonía", "neumonía bilateral", "dolor abdominal agudo", "apendicitis aguda"]
QUERIES = ["insuficiencia cardíaca congestiva", "neumonia", "dolor agudo", "zzz",
           "fractura femur izquierdo"]


def test_save_and_load_give_the_same_hits_without_pickle(tmp_path):
    import json

    from clinlinker_spark.lexical import LEXICAL_JSON, LEXICAL_NPZ

    fitted = LexicalIndex.fit(TEXTS)
    fitted.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {LEXICAL_JSON, LEXICAL_NPZ}
    spec = json.loads((tmp_path / LEXICAL_JSON).read_text(encoding="utf-8"))
    assert spec["ngram"] == 3 and spec["texts"] == len(TEXTS)
    np.load(tmp_path / LEXICAL_NPZ, allow_pickle=False).close()
    loaded = LexicalIndex.load(tmp_path)
    want = fitted.search(QUERIES, 5)
    got = loaded.search(QUERIES, 5)
    assert (want.positions[:3, 0] >= 0).all()
    np.testing.assert_array_equal(got.positions, want.positions)
    np.testing.assert_array_equal(got.scores, want.scores)
    # the same query rows and the same term matrix
    assert abs(loaded.transform(QUERIES) - fitted.transform(QUERIES)).max() == 0
    assert abs(loaded.matrix - fitted.matrix).max() == 0


def test_a_directory_without_the_lexical_files_is_a_clear_error(tmp_path):
    import pytest

    from clinlinker_spark.errors import ArtifactError

    with pytest.raises(ArtifactError, match="no lexical model"):
        LexicalIndex.load(tmp_path)


def test_pair_scores_are_the_cosine_of_the_tfidf_rows():
    lexical = LexicalIndex.fit(TEXTS)
    queries = lexical.transform(QUERIES)
    rows = np.array([0, 0, 1, 1, 2, 3, 4, 4], np.int64)
    positions = np.array([0, 1, 3, 4, 5, 2, 2, 6], np.int64)
    got = lexical.pair_scores(queries, rows, positions)
    assert got.dtype == np.float32 and got.shape == (len(rows),)
    q = queries.toarray().astype(np.float64)
    t = lexical.matrix.toarray().astype(np.float64)
    want = [q[r] @ t[p] / (np.linalg.norm(q[r]) * np.linalg.norm(t[p]) or 1.0)
            for r, p in zip(rows, positions)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[2] > 0.5 and got[5] == 0.0  # neumonia ~ neumonía; zzz shares no n-gram
    # the score search gives a hit is its pair score
    hits = lexical.search(QUERIES, 3, queries)
    for i in range(len(QUERIES)):
        found = hits.positions[i] >= 0
        pair = lexical.pair_scores(queries, np.full(found.sum(), i), hits.positions[i][found])
        np.testing.assert_allclose(pair, hits.scores[i][found], rtol=1e-5, atol=1e-6)
    assert len(lexical.pair_scores(queries, np.zeros(0, np.int64), np.zeros(0, np.int64))) == 0
