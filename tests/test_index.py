from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from clinlinker_spark.config import IndexConfig
from clinlinker_spark.errors import ArtifactError, EncoderMismatchError, InputDataError
from clinlinker_spark.index import (
    CODES_FILE, FAISS_BLAS_MIN_QUERIES, INDEX_FILE, MANIFEST_FILE, ROWS_FILE, TerminologyIndex,
    _content_hash, build_index, prepare_rows,
)
from clinlinker_spark.lexical import LEXICAL_JSON, LEXICAL_NPZ
from clinlinker_spark.text import normalize_text
from fake_encoder import FakeEncoder


def terminology() -> pd.DataFrame:
    rows = [
        ("E11", "Diabetes mellitus tipo 2", True, 0),
        ("E11", "diabetes tipo 2", False, 3),
        ("E10", "Diabetes mellitus tipo 1", True, 0),
        ("I50", "Insuficiencia cardiaca", True, 0),
        ("I50.9", "insuficiencia  cardíaca", False, 1),
        ("K35", "Apendicitis aguda", True, 0),
        # the same text under two codes: training mentions rank K37 above K35
        ("K35", "apendicitis", False, 1),
        ("K37", "Apendicitis", False, 5),
        ("J18", "Neumonía", True, 0),
    ]
    return pd.DataFrame(rows, columns=["code", "term", "is_main_term", "mention_count"])


def test_prepare_rows_groups_codes_by_distinct_text_in_prior_order():
    rows, texts = prepare_rows(terminology())
    assert texts == sorted(set(texts))
    assert len(texts) == 8  # "apendicitis" holds two codes
    apend = rows[rows["term_norm"] == "apendicitis"]
    assert apend["code"].tolist() == ["K37", "K35"]  # mention_count 5 before 1
    assert apend["position"].nunique() == 1
    assert rows.loc[rows["code"] == "I50.9", "code_key"].item() == "i509"
    # original text kept beside the normal form
    assert rows.loc[rows["code"] == "I50.9", "term"].item() == "insuficiencia  cardíaca"
    assert rows.loc[rows["code"] == "I50.9", "term_norm"].item() == "insuficiencia cardíaca"


def test_prepare_rows_rejects_missing_columns_and_codes():
    with pytest.raises(InputDataError, match="code"):
        prepare_rows(pd.DataFrame({"term": ["x"]}))
    bad = terminology()
    bad.loc[2, "code"] = None
    with pytest.raises(InputDataError, match="without code"):
        prepare_rows(bad)


def test_build_and_load_roundtrip(tmp_path):
    enc = FakeEncoder()
    out = build_index(terminology(), enc, IndexConfig(), tmp_path / "idx", name="toy", version="1")
    assert {p.name for p in out.iterdir()} == {MANIFEST_FILE, INDEX_FILE, ROWS_FILE,
                                                CODES_FILE, LEXICAL_JSON, LEXICAL_NPZ}
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 2
    assert manifest["encoder"]["model_hash"] == enc.model_hash
    assert manifest["terminology"] == {
        "name": "toy", "version": "1", "rows": 9, "codes": 7, "distinct_terms": 8,
        "training_mentions": 10, "sources": [], "leaf_codes": 7, "codes_with_parent": 0,
    }
    assert manifest["index"]["type"] == "flat" and manifest["index"]["ntotal"] == 8
    index = TerminologyIndex.load(out, expected_fingerprint=enc.fingerprint(), verify=True)
    vec = enc.encode(["neumonía"])
    hits = index.search(vec, 3)
    assert index.texts[hits.positions[0, 0]] == "neumonía"
    assert hits.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert index.position_of("apendicitis") >= 0 and index.position_of("nada") == -1


def test_batched_exact_search_agrees_with_one_query_at_a_time(tmp_path, monkeypatch):
    import faiss

    # FAISS's default sends every batch under 128k queries through its per-query kernel;
    # the index switches batches of FAISS_BLAS_MIN_QUERIES and more to a matrix multiply
    monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 128_000)
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"code": [f"C{i}" for i in range(300)],
                       "term": [f"término {i} {rng.integers(10**6)}" for i in range(300)]})
    enc = FakeEncoder(dim=32)
    index = TerminologyIndex.load(build_index(df, enc, IndexConfig(), tmp_path / "idx"))
    queries = rng.standard_normal((40, 32)).astype(np.float32)
    batch = index.search(queries, 20)
    assert faiss.cvar.distance_compute_blas_threshold == FAISS_BLAS_MIN_QUERIES
    for i, query in enumerate(queries):
        single = index.search(query[None, :], 20)  # one query: the per-query kernel
        np.testing.assert_allclose(batch.scores[i], single.scores[0], rtol=1e-5, atol=1e-5)
        assert np.array_equal(batch.positions[i], single.positions[0])


class TwinEncoder(FakeEncoder):
    """Every "<name> variante <n>" gets the vector of "<name>": groups of equal vectors, as
    texts that a tokenizer cannot tell apart get from a real encoder."""

    def _vector(self, text: str) -> np.ndarray:
        return super()._vector(text.split(" variante ")[0])


def reference_top_k(index: TerminologyIndex, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute force: every stored vector scored in float64, best first, lowest position first
    among equal scores."""
    vectors = index.faiss_index.reconstruct_n(0, index.faiss_index.ntotal).astype(np.float64)
    scores = queries.astype(np.float64) @ vectors.T
    ids = np.broadcast_to(np.arange(len(vectors)), scores.shape)
    return np.lexsort((ids, -scores), axis=-1)[:, :k]


@pytest.mark.parametrize("where", ["faiss", "torch"])
def test_equal_and_near_equal_hits_do_not_depend_on_the_batch(tmp_path, where):
    """24 texts per vector (more than k plus the hits searched beyond it: searched again) and
    random near-ties: every query gets the brute-force answer, alone, in a batch and in a
    shuffled batch."""
    rng = np.random.default_rng(3)
    names = [f"grupo {i} {rng.integers(10**6)}" for i in range(50)]
    terms = [f"{name} variante {v}" for name in names[:30] for v in range(24)] + names[30:]
    df = pd.DataFrame({"code": [f"C{i}" for i in range(len(terms))], "term": terms})
    enc = TwinEncoder(dim=32)
    index = TerminologyIndex.load(build_index(df, enc, IndexConfig(), tmp_path / "idx"))
    if where == "torch":
        index.place_on("cpu")
    queries = np.concatenate([enc.encode(names[:40]),
                              rng.standard_normal((40, 32)).astype(np.float32)])
    k = 10
    want = reference_top_k(index, queries, k)
    batch = index.search(queries, k)
    assert np.array_equal(batch.positions, want)
    order = rng.permutation(len(queries))
    shuffled = index.search(queries[order], k)
    assert np.array_equal(shuffled.positions, want[order])
    np.testing.assert_allclose(shuffled.scores, batch.scores[order], rtol=0, atol=1e-6)
    for i in range(0, len(queries), 7):
        single = index.search(queries[i:i + 1], k)
        assert np.array_equal(single.positions[0], want[i])
        np.testing.assert_allclose(single.scores[0], batch.scores[i], rtol=0, atol=1e-6)
    # a group's query: its k lowest positions, all with one score
    first = batch.positions[0]
    assert [index.texts[p].split(" variante ")[0] for p in first] == \
        [normalize_text(names[0])] * k
    assert len(set(batch.scores[0].tolist())) == 1


def test_index_is_immutable_and_build_is_atomic(tmp_path):
    enc = FakeEncoder()
    out = build_index(terminology(), enc, IndexConfig(), tmp_path / "idx")
    before = (out / MANIFEST_FILE).read_text()
    with pytest.raises(ArtifactError, match="immutable"):
        build_index(terminology(), enc, IndexConfig(), out)
    assert (out / MANIFEST_FILE).read_text() == before

    class Exploding(FakeEncoder):
        def fingerprint(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_index(terminology(), Exploding(), IndexConfig(), tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no half-written directory


def test_load_refuses_other_encoder_and_broken_dirs(tmp_path):
    out = build_index(terminology(), FakeEncoder(), IndexConfig(), tmp_path / "idx")
    other = FakeEncoder(salt="other")
    with pytest.raises(EncoderMismatchError, match="model_hash"):
        TerminologyIndex.load(out, expected_fingerprint=other.fingerprint())
    with pytest.raises(ArtifactError, match="no manifest.json"):
        TerminologyIndex.load(tmp_path)
    (out / ROWS_FILE).unlink()
    with pytest.raises(ArtifactError, match="incomplete"):
        TerminologyIndex.load(out)


@pytest.mark.parametrize("index_type,storage", [
    ("flat", "fp16"), ("flat", "sq8"), ("ivf", ""), ("ivf", "fp16"), ("ivf", "sq8"),
    ("ivf", "pq"), ("hnsw", ""), ("hnsw", "fp16"), ("hnsw", "sq8")])
def test_approximate_indexes_agree_with_exact_search(tmp_path, index_type, storage):
    rng = np.random.default_rng(0)
    words = ["dolor", "fiebre", "tos", "cefalea", "anemia", "fractura", "hepatitis", "renal",
             "aguda", "crónica", "bilateral", "izquierda", "derecha", "pulmonar", "cardiaca"]
    terms = sorted({" ".join(rng.choice(words, size=rng.integers(1, 4))) for _ in range(600)})
    df = pd.DataFrame({"code": [f"C{i}" for i in range(len(terms))], "term": terms})
    enc = FakeEncoder(dim=48)
    exact = TerminologyIndex.load(build_index(df, enc, IndexConfig(), tmp_path / "exact"))
    approx = TerminologyIndex.load(build_index(
        df, enc, IndexConfig(index_type=index_type, fp16=storage == "fp16",
                             sq8=storage == "sq8", pq=storage == "pq", ivf_nprobe=64),
        tmp_path / f"{index_type}{storage}"))
    assert approx.manifest["index"]["sq8"] == (storage == "sq8")
    assert approx.manifest["index"]["pq"] == (storage == "pq")
    queries = enc.encode(terms[:100])
    k = 10
    a = exact.search(queries, k).positions
    b = approx.search(queries, k).positions
    recall = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)])
    assert recall >= 0.9, recall
    assert (b[:, 0] == np.arange(100)).mean() >= 0.95  # a term finds itself first
    # stored vectors (decoded; an IVF index through its direct map) order near-ties
    some = np.array([5, 0, 5, 17])
    np.testing.assert_allclose(approx.vectors_at(some), exact.vectors_at(some), atol=0.02)


def test_pq_index_rescores_its_hits_with_the_exact_vectors(tmp_path):
    import faiss

    from clinlinker_spark.errors import ConfigError

    rng = np.random.default_rng(3)
    terms = [f"termino {i} {w}" for i, w in enumerate(rng.choice(["a", "b", "c"], 800))]
    df = pd.DataFrame({"code": [f"C{i}" for i in range(len(terms))], "term": terms})
    enc = FakeEncoder(dim=32)
    exact = TerminologyIndex.load(build_index(df, enc, IndexConfig(), tmp_path / "exact"))
    config = IndexConfig(index_type="ivf", pq=True, pq_m=8, refine_factor=3, ivf_nprobe=7)
    pq = TerminologyIndex.load(build_index(df, enc, config, tmp_path / "pq"))
    params = pq.manifest["index"]
    assert (params["pq_m"], params["refine_factor"], params["nprobe"]) == (8, 3, 7)
    # the search settings come back from the manifest on load
    assert faiss.downcast_index(pq.faiss_index).k_factor == 3
    assert faiss.extract_index_ivf(pq.faiss_index).nprobe == 7
    # hits carry exact scores (4-bit codes alone are off by far more than 1e-5)
    queries = enc.encode(terms[:50])
    hits = pq.search(queries, 10)
    want = np.einsum("qd,qkd->qk", queries, exact.vectors_at(hits.positions))
    np.testing.assert_allclose(hits.scores, want, atol=1e-5)
    codes_only = faiss.extract_index_ivf(pq.faiss_index).search(queries, 10)[0]
    assert np.abs(codes_only - hits.scores).max() > 1e-3
    some = np.array([3, 0, 3, 640])
    np.testing.assert_array_equal(pq.vectors_at(some), exact.vectors_at(some))
    mapped = TerminologyIndex.load(tmp_path / "pq", mmap=True)  # as Spark executors load it
    np.testing.assert_array_equal(mapped.search(queries, 10).positions, hits.positions)
    for bad, match in ((dict(pq=True), "needs index.index_type: ivf"),
                       (dict(index_type="ivf", pq=True, sq8=True), "choose one"),
                       (dict(index_type="ivf", pq=True, refine_factor=0), "refine_factor")):
        with pytest.raises(ConfigError, match=match):
            IndexConfig(**bad)
    with pytest.raises(ConfigError, match="must divide"):
        build_index(df, enc, IndexConfig(index_type="ivf", pq=True, pq_m=5), tmp_path / "bad")


def test_build_measures_recall_against_exact_search_and_tunes_nprobe_to_a_target(tmp_path):
    import faiss

    from clinlinker_spark.errors import ConfigError

    rng = np.random.default_rng(11)
    words = ["dolor", "fiebre", "tos", "cefalea", "disnea", "edema", "lesion", "fractura"]
    terms = [f"{a} {b} {i}" for i, (a, b) in enumerate(rng.choice(words, (900, 2)))]
    df = pd.DataFrame({"code": [f"C{i}" for i in range(len(terms))], "term": terms})
    # mention-like queries: terms with a word changed, some repeated, empty and blank rows
    mentions = [f"{t.rsplit(' ', 1)[0]} {w}" for t, w in
                zip(terms[::3], rng.choice(words, len(terms[::3])))]
    texts = mentions + mentions[:20] + ["", "  "]
    path = tmp_path / "mentions.tsv"
    pd.DataFrame({"doc": "d", "text": texts}).to_csv(path, sep="\t", index=False)
    forms = list(dict.fromkeys(normalize_text(t) for t in mentions))
    enc = FakeEncoder(dim=32)
    config = IndexConfig(index_type="ivf", recall_mentions=str(path), recall_k=10,
                         target_recall=0.97)
    tuned = TerminologyIndex.load(build_index(df, enc, config, tmp_path / "tuned", search_k=40))
    block = tuned.manifest["recall"]
    nprobes = [t["nprobe"] for t in block["tried"]]
    nlist = tuned.manifest["index"]["nlist"]
    ladder = [1 << i for i in range(nlist.bit_length()) if 1 << i < nlist] + [nlist]
    assert nprobes == ladder[:len(nprobes)]
    assert block["met"] and block["recall"] >= 0.97 and block["queries"] == len(forms)
    # the least setting that reaches the target: every cheaper one fell short
    assert len(nprobes) > 1 and all(t["recall"] < 0.97 for t in block["tried"][:-1])
    assert tuned.manifest["index"]["nprobe"] == nprobes[-1]
    assert faiss.extract_index_ivf(tuned.faiss_index).nprobe == nprobes[-1]
    # the recorded recall is what the loaded index gives against exact search
    exact = TerminologyIndex.load(build_index(df, enc, IndexConfig(), tmp_path / "exact"))
    queries = enc.encode(forms)
    got = tuned.faiss_index.search(queries, 40)[1]
    want = exact.faiss_index.search(queries, 40)[1]
    found = np.mean([len(set(g[:10]) & set(w[:10])) / 10 for g, w in zip(got, want)])
    assert found == pytest.approx(block["recall"], abs=1e-4)
    # without a target only the configured setting is measured; nprobe is in the index file,
    # so an index tuned to another nprobe has another content hash (and form cache key)
    plain = TerminologyIndex.load(build_index(
        df, enc, IndexConfig(index_type="ivf", ivf_nprobe=1, recall_mentions=str(path),
                             recall_k=10, recall_queries=50), tmp_path / "plain", search_k=40))
    assert [t["nprobe"] for t in plain.manifest["recall"]["tried"]] == [1]
    assert plain.manifest["recall"]["queries"] == 50
    assert plain.manifest["recall"]["recall"] < 0.97 and "met" not in plain.manifest["recall"]
    assert plain.content_hash != tuned.content_hash
    hnsw = TerminologyIndex.load(build_index(
        df, enc, IndexConfig(index_type="hnsw", hnsw_m=4, recall_mentions=str(path),
                             recall_k=10, target_recall=0.99), tmp_path / "hnsw", search_k=12))
    ef = [t["ef_search"] for t in hnsw.manifest["recall"]["tried"]]
    assert ef == [12 << i for i in range(len(ef))]
    assert hnsw.manifest["index"]["ef_search"] == ef[-1] == hnsw.faiss_index.hnsw.efSearch
    assert hnsw.manifest["recall"]["met"] == (hnsw.manifest["recall"]["recall"] >= 0.99)
    for bad, match in ((dict(index_type="ivf", target_recall=0.9), "needs index.recall_mentions"),
                       (dict(target_recall=0.9, recall_mentions="m.tsv"), "nothing to tune"),
                       (dict(target_recall=1.5), r"\[0, 1\]")):
        with pytest.raises(ConfigError, match=match):
            IndexConfig(**bad)
    for cfg, match in ((dict(recall_k=50), "must be <= linking.search_k"),
                       (dict(recall_mentions=str(tmp_path / "m.json")), "expected a .parquet"),
                       (dict(recall_mentions=str(tmp_path / "none.tsv")), "cannot read")):
        cfg = {"index_type": "ivf", "recall_mentions": str(path), **cfg}
        with pytest.raises(ConfigError, match=match):
            build_index(df, enc, IndexConfig(**cfg), tmp_path / "bad", search_k=40)
    (tmp_path / "other.csv").write_text("id,mention\n1,dolor\n")
    with pytest.raises(ConfigError, match="column 'text'"):
        build_index(df, enc, IndexConfig(recall_mentions=str(tmp_path / "other.csv")),
                    tmp_path / "bad", search_k=40)


# --------------------------------------------------------------------------------------------
# search with torch (on the bi-encoder's GPU in the linker; on the CPU here)


def test_torch_search_gives_faiss_flat_results_in_any_chunking():
    import faiss
    import torch

    from clinlinker_spark.index import torch_search

    rng = np.random.default_rng(5)
    base = rng.standard_normal((700, 24)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = rng.standard_normal((53, 24)).astype(np.float32)
    flat = faiss.IndexFlatIP(24)
    flat.add(base)
    want_scores, want_positions = flat.search(queries, 30)
    tensor = torch.from_numpy(base)
    for score_bytes in (1 << 30, 4 * 700 * 7, 1):  # one chunk, chunks of 7, one query each
        scores, positions = torch_search(tensor, queries, 30, score_bytes=score_bytes)
        assert scores.dtype == np.float32 and positions.dtype == np.int64
        assert np.array_equal(positions, want_positions)
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)


def test_an_index_placed_on_a_torch_device_searches_like_faiss(tmp_path):
    from fake_encoder import FakeEncoder

    index = TerminologyIndex.load(build_index(terminology(), FakeEncoder(), IndexConfig(),
                                              tmp_path / "idx"))
    queries = FakeEncoder().encode(["apendicitis aguda", "diabetes", "insuficiencia"])
    want = index.search(queries, 5)
    assert index.search_device == "faiss-cpu" and index.is_exact_flat
    index.place_on("cpu")
    assert index.search_device == "cpu"
    got = index.search(queries, 5)
    assert np.array_equal(got.positions, want.positions)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
    empty = index.search(queries[:0], 5)
    assert empty.positions.shape == (0, 5)


def test_only_an_exact_flat_index_goes_to_a_gpu(tmp_path):
    from types import SimpleNamespace

    import torch
    from fake_encoder import FakeEncoder

    from clinlinker_spark.errors import ArtifactError, ConfigError
    from clinlinker_spark.linker import search_device

    flat = TerminologyIndex.load(build_index(terminology(), FakeEncoder(), IndexConfig(),
                                             tmp_path / "flat"))
    sq8 = TerminologyIndex.load(build_index(terminology(), FakeEncoder(),
                                            IndexConfig(sq8=True), tmp_path / "sq8"))
    hnsw = TerminologyIndex.load(build_index(terminology(), FakeEncoder(),
                                             IndexConfig(index_type="hnsw"), tmp_path / "hnsw"))
    gpu = SimpleNamespace(type="cuda")  # the encoder's device, as torch.device("cuda") reads
    assert search_device("auto", gpu, flat) is gpu
    assert search_device("auto", torch.device("cpu"), flat) is None
    assert search_device("auto", gpu, sq8) is None and search_device("auto", gpu, hnsw) is None
    assert search_device("cpu", gpu, flat) is None
    assert not sq8.is_exact_flat and not hnsw.is_exact_flat
    with pytest.raises(ArtifactError, match="compressed vectors"):
        sq8.place_on("cpu")
    with pytest.raises(ArtifactError, match="hnsw index"):
        hnsw.place_on("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            search_device("cuda", torch.device("cpu"), flat)
    with pytest.raises(Exception, match="search_device"):
        IndexConfig(search_device="gpu")


# --------------------------------------------------------------------------------------------
# codes.parquet, the lexical model, format-1 directories, views over other rows


def hierarchy_terminology() -> pd.DataFrame:
    """ICD-10-like codes with parents: C56 > C56.9 > C56.91 (a made-up extension), C56 >
    C56.1, and J18 without parent; C56.9 also carries two training mentions."""
    rows = [
        ("C56", "Tumor maligno de ovario", True, 0, ""),
        ("C56.1", "Tumor maligno de ovario derecho", True, 0, "c56"),
        ("C56.9", "Tumor maligno de ovario no especificado", True, 0, "c56"),
        ("C56.9", "cáncer de ovario", False, 2, "c56"),
        ("C56.91", "Tumor maligno de ovario, recidiva", True, 0, "c569"),
        ("J18", "Neumonía", True, 0, ""),
    ]
    return pd.DataFrame(rows, columns=["code", "term", "is_main_term", "mention_count",
                                       "parent_key"])


def test_codes_table_marks_parents_as_inner_codes_with_their_depth(tmp_path):
    out = build_index(hierarchy_terminology(), FakeEncoder(), IndexConfig(), tmp_path / "idx")
    codes = pd.read_parquet(out / CODES_FILE).set_index("code_key")
    assert list(codes.reset_index().columns) == ["code_key", "code", "parent_key", "is_leaf",
                                                 "depth", "n_terms", "mention_count"]
    assert codes["is_leaf"].to_dict() == {"c56": False, "c561": True, "c569": False,
                                          "c5691": True, "j18": True}
    assert codes["depth"].to_dict() == {"c56": 1, "c561": 2, "c569": 2, "c5691": 3, "j18": 1}
    assert codes.loc["c569", "n_terms"] == 2 and codes.loc["c569", "mention_count"] == 2
    assert codes.loc["c569", "code"] == "C56.9"
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["terminology"]["leaf_codes"] == 3
    assert manifest["terminology"]["codes_with_parent"] == 3
    index = TerminologyIndex.load(out)
    info = index.code_info("c569")
    assert (info.code, info.parent_key, info.is_leaf, info.depth) == ("C56.9", "c56", False, 2)
    assert index.code_info("c5691").is_leaf and index.code_info("x99") is None
    # row_of: the row of (position, code) in the rows table
    position = index.position_of("cáncer de ovario")
    row = index.row_of(position, "c569")
    assert index.row(row)[:3] == ("C56.9", "c569", "cáncer de ovario")
    assert index.row_of(position, "c56") == -1


def test_lexical_model_is_in_the_artifact_without_pickle_and_in_its_hash(tmp_path):
    from clinlinker_spark.lexical import LexicalIndex

    out = build_index(terminology(), FakeEncoder(), IndexConfig(), tmp_path / "idx")
    spec = json.loads((out / LEXICAL_JSON).read_text())
    assert spec["kind"] == "char_wb-tfidf" and spec["texts"] == 8
    with np.load(out / LEXICAL_NPZ, allow_pickle=False) as arrays:
        assert set(arrays.files) == {"idf", "data", "indices", "indptr", "shape"}
        assert arrays["shape"].tolist() == [8, len(spec["features"])]
    index = TerminologyIndex.load(out, verify=True)
    assert isinstance(index.lexical, LexicalIndex) and len(index.lexical) == len(index.texts)
    hits = index.lexical.search(["apendicitis agudo"], 1)
    assert index.texts[hits.positions[0, 0]] == "apendicitis aguda"
    # the content hash covers the lexical files: a changed matrix is a changed artifact
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert _content_hash(out) == manifest["content_hash"]
    with np.load(out / LEXICAL_NPZ, allow_pickle=False) as arrays:
        changed = {name: arrays[name] for name in arrays.files}
    changed["data"] = changed["data"] * np.float32(0.5)
    np.savez(out / LEXICAL_NPZ, **changed)
    assert _content_hash(out) != manifest["content_hash"]
    with pytest.raises(ArtifactError, match="content hash"):
        TerminologyIndex.load(out, verify=True)
    # and so do the vocabulary and the code table
    for name in (CODES_FILE, LEXICAL_JSON):
        before = _content_hash(out)
        (out / name).write_bytes((out / name).read_bytes() + b" ")
        assert _content_hash(out) != before, name


def as_format_1(out):
    """Rewrite an index directory as format 1 wrote it: no codes.parquet, no lexical model,
    no parent_key column; the manifest's hash over index.faiss and rows.parquet."""
    for name in (CODES_FILE, LEXICAL_JSON, LEXICAL_NPZ):
        (out / name).unlink()
    rows = pd.read_parquet(out / ROWS_FILE).drop(columns=["parent_key"])
    rows.to_parquet(out / ROWS_FILE, index=False)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["format_version"] = 1
    manifest.pop("lexical")
    for key in ("leaf_codes", "codes_with_parent"):
        manifest["terminology"].pop(key)
    manifest["content_hash"] = _content_hash(out)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


def test_a_format_1_index_still_loads_as_a_flat_code_list(tmp_path):
    enc = FakeEncoder()
    new = TerminologyIndex.load(build_index(terminology(), enc, IndexConfig(),
                                            tmp_path / "new"))
    out = as_format_1(build_index(terminology(), enc, IndexConfig(), tmp_path / "old"))
    assert {p.name for p in out.iterdir()} == {MANIFEST_FILE, INDEX_FILE, ROWS_FILE}
    old = TerminologyIndex.load(out, expected_fingerprint=enc.fingerprint(), verify=True)
    assert old.manifest["format_version"] == 1
    assert old.lexical is None
    assert (old.rows["parent_key"] == "").all()
    assert old.codes["is_leaf"].all() and (old.codes["depth"] == 1).all()
    assert old.codes["code_key"].tolist() == new.codes["code_key"].tolist()
    assert old.code_info("k37").mention_count == 5
    queries = enc.encode(["apendicitis aguda", "diabetes"])
    got, want = old.search(queries, 4), new.search(queries, 4)
    assert np.array_equal(got.positions, want.positions)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["format_version"] = 3
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format_version 3"):
        TerminologyIndex.load(out)


def test_with_terminology_shares_the_vectors_and_positions_without_rows_give_nothing(tmp_path):
    from clinlinker_spark.config import LinkingConfig
    from clinlinker_spark.linker import Linker

    enc = FakeEncoder()
    index = TerminologyIndex.load(build_index(terminology(), enc, IndexConfig(),
                                              tmp_path / "idx"))
    table = terminology()
    # neumonía (J18) left out; K37's five mentions of "Apendicitis" become one
    fewer = table[table["code"] != "J18"].copy()
    fewer.loc[fewer["code"] == "K37", "mention_count"] = 1
    view = index.with_terminology(fewer)
    assert view.faiss_index is index.faiss_index and view.lexical is index.lexical
    assert view.texts == index.texts and len(view) == len(index)
    np.testing.assert_array_equal(view.vectors_at(np.arange(len(view))),
                                  index.vectors_at(np.arange(len(index))))
    position = index.position_of("neumonía")
    assert view.position_of("neumonía") == position >= 0
    assert view.code_rows(position) == [] and len(view.row_range(position)) == 0
    assert "j18" not in view.code_keys and view.code_info("j18") is None
    assert view.code_info("k37").mention_count == 1
    # the same search, the rows of the view
    assert np.array_equal(view.search(enc.encode(["neumonía"]), 8).positions,
                          index.search(enc.encode(["neumonía"]), 8).positions)
    linking = LinkingConfig(search_k=8, top_k=7, retrievers=("dense", "lexical"))
    [full] = Linker(enc, index, linking).retrieve(["neumonía"])
    [cut] = Linker(enc, view, linking).retrieve(["neumonía"])
    assert full[0].code == "J18" and full[0].exact
    assert "J18" not in [c.code for c in cut] and not any(c.exact for c in cut)
    assert {c.code for c in cut} == {c.code for c in full} - {"J18"}
    # apendicitis: K35 (1 mention) and K37 (now 1) tie; code order decides
    [apend] = Linker(enc, view, linking).retrieve(["apendicitis"])
    assert [c.code for c in apend[:2]] == ["K35", "K37"]
    with pytest.raises(ArtifactError, match="not texts of index"):
        index.with_terminology(pd.DataFrame({"code": ["X1"], "term": ["texto nuevo"]}))


def test_no_range_code_reaches_an_index_of_a_cie10_list_with_blocks(tmp_path):
    from clinlinker_spark.config import LinkingConfig, TerminologyConfig, TerminologySourceConfig
    from clinlinker_spark.linker import Linker
    from clinlinker_spark.terminology import load_terminology

    cie = tmp_path / "cie10.csv"
    cie.write_text(
        "code,code_0,code_1,code_2,code_3,code_4,description,level,source\n"
        "C00-D49,,,,,,Tumores [neoplasias],0,icdcode.info\n"
        "C64-C68,C00-D49,,,,,Tumores malignos del tracto urinario,2,icdcode.info\n"
        "C64,C00-D49,C64-C68,,,,Tumor maligno del riñón,2,icdcode.info\n"
        "C649,C00-D49,C64-C68,C64,,,Tumor maligno del riñón no especificado,3,deis.cl\n"
        "C65,C00-D49,C64-C68,,,,Tumor maligno de la pelvis renal,2,icdcode.info\n"
        "C66-C66,C00-D49,C64-C68,,,,Tumor maligno del uréter (bloque),3,icdcode.info\n"
        "C66,C00-D49,C64-C68,C66-C66,,,Tumor maligno del uréter,3,icdcode.info\n",
        encoding="utf-8")
    config = TerminologyConfig(sources=(TerminologySourceConfig(path=str(cie), format="cie10"),))
    enc = FakeEncoder()
    index = TerminologyIndex.load(build_index(load_terminology(config), enc, IndexConfig(),
                                              tmp_path / "idx"))
    assert not index.rows["code"].str.contains("-").any()
    assert not index.codes["code_key"].str.contains("-").any()
    assert not index.codes["parent_key"].str.contains("-").any()
    assert sorted(index.codes["code"]) == ["C64", "C64.9", "C65", "C66"]
    assert dict(zip(index.codes["code"], index.codes["parent_key"])) == {
        "C64": "", "C64.9": "c64", "C65": "", "C66": ""}
    # the block's own description finds codes, never the block
    linker = Linker(enc, index, LinkingConfig(search_k=4, top_k=4,
                                              retrievers=("dense", "lexical")))
    for cands in linker.retrieve(["tumores malignos del tracto urinario",
                                  "tumor maligno del uréter (bloque)"]):
        assert cands and all("-" not in c.code for c in cands)
