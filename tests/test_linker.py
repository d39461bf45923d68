from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from clinlinker_spark.config import IndexConfig, LinkingConfig
from clinlinker_spark.errors import EncoderMismatchError, InputDataError
from clinlinker_spark.index import TerminologyIndex, build_index
from clinlinker_spark.linker import (
    STATUS_INVALID, STATUS_LINKED, STATUS_NO_CANDIDATE, Candidate, Linker, invalid_reason,
    rerank_candidates,
)
from fake_encoder import FakeEncoder
from test_index import terminology


@pytest.fixture()
def toy_index(tmp_path):
    return TerminologyIndex.load(build_index(terminology(), FakeEncoder(), IndexConfig(),
                                             tmp_path / "idx"))


def test_retrieve_returns_one_candidate_per_code_with_its_best_synonym(toy_index):
    linker = Linker(FakeEncoder(), toy_index, LinkingConfig(search_k=8, top_k=7,
                                                             exact_match_prior=False))
    [cands] = linker.retrieve(["diabetes tipo 2"])
    codes = [c.code for c in cands]
    assert len(codes) == len(set(codes)) == 7  # all 7 codes, once each
    assert cands[0].code == "E11" and cands[0].term == "diabetes tipo 2"
    assert [c.retrieval_score for c in cands] == sorted(
        (c.retrieval_score for c in cands), reverse=True)
    # "I50" and "I50.9" are different codes; both are kept
    assert {"I50", "I50.9"} <= set(codes)


def test_exact_match_prior_orders_tied_codes_by_training_frequency(toy_index):
    expected = {True: ["K37", "K35"], False: ["K35", "K37"]}  # 5 training mentions vs 1
    for prior in (True, False):
        linker = Linker(FakeEncoder(), toy_index,
                        LinkingConfig(search_k=8, top_k=3, exact_match_prior=prior))
        [cands] = linker.retrieve(["apendicitis"])
        # without the prior, codes that share the text come in code order
        assert [c.code for c in cands[:2]] == expected[prior]
        assert cands[0].exact is prior
        assert cands[0].retrieval_score == cands[1].retrieval_score


def test_exact_match_prior_finds_codes_beyond_the_raw_hits(toy_index, monkeypatch):
    # An approximate index (or a too small search_k) may miss the exact text: the prior finds
    # it by lookup anyway, scored as the query's own similarity.
    real_search = toy_index.search
    exact = toy_index.position_of("apendicitis")

    def search_without_exact(vectors, k):
        hits = real_search(vectors, k)
        keep = hits.positions[0] != exact
        hits.positions = hits.positions[:, keep][:, : k - 1]
        hits.scores = hits.scores[:, keep][:, : k - 1]
        return hits

    monkeypatch.setattr(toy_index, "search", search_without_exact)
    linker = Linker(FakeEncoder(), toy_index, LinkingConfig(search_k=3, top_k=3))
    [cands] = linker.retrieve(["apendicitis"])
    assert [(c.code, c.exact) for c in cands[:2]] == [("K37", True), ("K35", True)]
    assert cands[0].retrieval_score == pytest.approx(1.0, abs=1e-5)
    assert cands[2].exact is False
    off = Linker(FakeEncoder(), toy_index, LinkingConfig(search_k=3, top_k=3,
                                                          exact_match_prior=False))
    [plain] = off.retrieve(["apendicitis"])
    assert "K37" not in [c.code for c in plain]


def test_link_statuses_and_batch_independence(toy_index):
    linker = Linker(FakeEncoder(), toy_index, LinkingConfig(search_k=8, top_k=5,
                                                             max_text_length=30))
    mentions = pd.DataFrame({
        "mention_id": ["m1", "m2", "m3", "m4", "m5", "m6"],
        "text": ["Neumonía", None, "   ", "x" * 31, "NEUMONÍA  ", "insuficiencia cardiaca"],
    })
    out = linker.link(mentions)
    assert out["mention_id"].tolist() == mentions["mention_id"].tolist()
    assert out["status"].tolist() == [STATUS_LINKED, STATUS_INVALID, STATUS_INVALID,
                                      STATUS_INVALID, STATUS_LINKED, STATUS_LINKED]
    assert out["reason"].tolist()[1:4] == ["null text", "empty text",
                                          "text longer than 30 characters"]
    assert out.loc[0, "code"] == "J18" and out.loc[0, "candidates"] == out.loc[4, "candidates"]
    # each mention's result does not depend on its batch
    # (the same candidates in the same order; a float32 score may move by a few ulps between
    # FAISS's one-query and matrix kernels, index.TIE_TOLERANCE)
    alone = linker.link(mentions.iloc[[5]])
    got, want = alone.loc[0, "candidates"], out.loc[5, "candidates"]
    assert [(c["code"], c["term"], c["exact"]) for c in got] == [
        (c["code"], c["term"], c["exact"]) for c in want]
    assert [c["retrieval_score"] for c in got] == pytest.approx(
        [c["retrieval_score"] for c in want], abs=1e-6)
    # Arrow input is accepted too
    import pyarrow as pa
    arrow = linker.link(pa.Table.from_pandas(mentions.iloc[[0]]))
    assert arrow.loc[0, "code"] == "J18"


def test_link_min_score_gives_no_candidate(toy_index):
    linker = Linker(FakeEncoder(), toy_index, LinkingConfig(search_k=8, top_k=3, min_score=0.99,
                                                             exact_match_prior=False))
    out = linker.link(pd.DataFrame({"mention_id": ["a", "b"],
                                    "text": ["neumonía", "qwerty zzz"]}))
    assert out["status"].tolist() == [STATUS_LINKED, STATUS_NO_CANDIDATE]
    assert "min_score" in out.loc[1, "reason"]


def test_default_has_no_score_floor_so_a_low_ranker_score_keeps_its_code(toy_index):
    # a ranker's score is unbounded (LightGBM lambdarank gives -3 as readily as 3): without a
    # configured min_score, the link keeps its code, and review_below decides its status
    low = [Candidate(code="J18", term="neumonía", retrieval_score=0.4, ranker_score=-7.5)]
    trusted = Linker(FakeEncoder(), toy_index, LinkingConfig(search_k=8, top_k=3))
    assert trusted.outcome(low, 0.2)[:3] == (STATUS_LINKED, None, "J18")
    review = Linker(FakeEncoder(), toy_index, LinkingConfig(search_k=8, top_k=3,
                                                            review_below=0.5))
    status, _, code, _, score, confidence = review.outcome(low, 0.2)
    assert (status, code, score, confidence) == ("needs_review", "J18", -7.5, 0.2)
    floored = Linker(FakeEncoder(), toy_index, LinkingConfig(search_k=8, top_k=3,
                                                             min_score=-1.0))
    assert floored.outcome(low, 0.2)[:3] == (STATUS_NO_CANDIDATE,
                                             "best score below linking.min_score=-1.0", None)


def test_link_missing_column_is_a_clear_error(toy_index):
    linker = Linker(FakeEncoder(), toy_index)
    with pytest.raises(InputDataError, match=r"missing column\(s\) \['text'\]"):
        linker.link(pd.DataFrame({"mention_id": ["a"], "mention": ["x"]}))


def test_linker_refuses_index_of_another_encoder(toy_index):
    with pytest.raises(EncoderMismatchError):
        Linker(FakeEncoder(salt="x"), toy_index)


def test_invalid_reason():
    assert invalid_reason("dolor", 10) is None
    assert invalid_reason(float("nan"), 10) == "null text"
    assert invalid_reason("\t\n", 10) == "empty text"
    assert invalid_reason(5, 10).startswith("text is not a string")


def test_rerank_reorders_head_only_and_keeps_retrieval_scores():
    cands = [[Candidate("A", "a", 0.9), Candidate("B", "b", 0.8), Candidate("C", "c", 0.7)]]
    scores = {"a": 0.1, "b": 2.0, "c": 5.0}

    def scorer(mentions, terms):
        assert mentions == ["q", "q"]
        return np.array([scores[t] for t in terms], np.float32)

    [out] = rerank_candidates(["q"], cands, scorer, top_n=2, exact_first=False)
    assert [c.code for c in out] == ["B", "A", "C"]
    assert out[0].retrieval_score == 0.8 and out[0].rerank_score == 2.0
    assert out[2].rerank_score is None
    exact = [[Candidate("A", "a", 0.9, exact=True), Candidate("B", "b", 0.8)]]
    [kept] = rerank_candidates(["q"], exact, lambda m, t: np.array([scores[x] for x in t]),
                               top_n=2, exact_first=True)
    assert kept[0].code == "A"


def test_rrf_fusion_moves_a_candidate_only_as_far_as_both_orders_allow():
    # retrieval order A B C D; the cross-encoder puts D first and A last
    cands = [[Candidate(c, c.lower(), s) for c, s in zip("ABCD", (0.9, 0.8, 0.7, 0.6))]]
    ce = {"a": -3.0, "b": 1.0, "c": 0.0, "d": 4.0}

    def scorer(mentions, terms):
        return np.array([ce[t] for t in terms], np.float32)

    [alone] = rerank_candidates(["q"], cands, scorer, top_n=4, exact_first=False)
    assert [c.code for c in alone] == ["D", "B", "C", "A"]
    [fused] = rerank_candidates(["q"], cands, scorer, top_n=4, exact_first=False,
                                fusion="rrf", rrf_k=60)
    # fused ranks: A 1+4, B 2+2, C 3+3, D 4+1 -> B first (ranks balanced beat extremes)
    assert [c.code for c in fused] == ["B", "D", "A", "C"]
    assert {c.code: c.rerank_score for c in fused} == {"A": -3.0, "B": 1.0, "C": 0.0,
                                                        "D": 4.0}
    # exact matches stay first under fusion as well
    cands[0][3] = Candidate("D", "d", 0.6, exact=True)
    [kept] = rerank_candidates(["q"], cands, scorer, top_n=4, exact_first=True, fusion="rrf")
    assert kept[0].code == "D"
    with pytest.raises(ValueError, match="fusion"):
        rerank_candidates(["q"], cands, scorer, top_n=4, exact_first=False, fusion="mean")


def test_rerank_scores_equal_to_float_noise_keep_the_retrieval_order():
    cands = [[Candidate("A", "a", 0.9), Candidate("B", "b", 0.8)]]
    for noise in (1e-7, -1e-7):  # B scored a hair above or below A, as batch shapes do
        scores = {"a": 0.5, "b": 0.5 + noise}
        for fusion in ("none", "rrf"):
            [out] = rerank_candidates(
                ["q"], cands, lambda m, t: np.array([scores[x] for x in t]), top_n=2,
                exact_first=False, fusion=fusion)
            assert [c.code for c in out] == ["A", "B"]


def test_no_mention_text_in_logs_at_info(toy_index, caplog):
    import logging

    caplog.set_level(logging.INFO)
    texts = ["neumonía grave bilateral", "dolor torácico opresivo"]
    linker = Linker(FakeEncoder(), toy_index, LinkingConfig(search_k=8, top_k=3))
    out = linker.link(pd.DataFrame({"mention_id": ["a", "b"], "text": texts}))
    assert (out["status"] == STATUS_LINKED).all()
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    for text in texts:
        assert text not in logged and text.split()[0] not in logged


def test_stage_timers_accumulate_and_reset(toy_index):
    linker = Linker(FakeEncoder(), toy_index, LinkingConfig(search_k=8, top_k=3))
    linker.link(pd.DataFrame({"mention_id": ["a", "b"], "text": ["neumonía", "dolor"]}))
    taken = linker.take_stage_seconds()
    assert taken["encode"] > 0 and taken["search"] > 0 and taken["rerank"] == 0
    assert all(v == 0 for v in linker.take_stage_seconds().values())


def _reference_candidates(index, texts, hits, top_k, prior, self_scores):
    """candidates_from_hits written plainly over the index's row accessors (the form it had
    before its rows were pre-sliced per position)."""
    rows_of = index.row_range if prior else index.rows_in_code_order
    results = []
    for i, text in enumerate(texts):
        hits_of = Counter(index.row(r)[1] for position in hits.positions[i] if position >= 0
                          for r in index.row_range(int(position)))  # each code's hits

        seen, out = set(), []
        exact_position = index.position_of(text) if prior else -1
        if exact_position >= 0:
            found = np.nonzero(hits.positions[i] == exact_position)[0]
            score = float(hits.scores[i, found[0]]) if len(found) else float(self_scores[i])
            for r in index.row_range(exact_position):
                code, key, term, _ = index.row(r)
                if key not in seen:
                    seen.add(key)
                    out.append(Candidate(code, term, score, None, True, None, None,
                                         hits_of[key]))
        for score, position in zip(hits.scores[i], hits.positions[i]):
            if len(out) >= top_k:
                break
            if position < 0 or position == exact_position:
                continue
            for r in rows_of(int(position)):
                code, key, term, _ = index.row(r)
                if key not in seen:
                    seen.add(key)
                    out.append(Candidate(code, term, float(score), None, False, None, None,
                                         hits_of[key]))
        results.append(out[:top_k])
    return results


@pytest.mark.parametrize("prior", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_candidates_from_hits_equal_a_plain_reading_of_the_hits(toy_index, prior, seed):
    from clinlinker_spark.candidates import Hits
    from clinlinker_spark.linker import candidates_from_hits

    rng = np.random.default_rng(seed)
    n, k = 40, 6
    texts = [toy_index.texts[i] if i % 3 else f"texto {i}" for i in
             rng.integers(0, len(toy_index), n)]  # two of three are exact index texts
    positions = np.stack([rng.permutation(len(toy_index))[:k] for _ in range(n)])
    positions[::5, -2:] = -1  # an index that found fewer than k
    scores = -np.sort(-rng.random((n, k)).astype(np.float32), axis=1)
    self_scores = rng.random(n).astype(np.float32)
    hits = Hits(scores, positions)
    for top_k in (1, 3, 8):
        got = candidates_from_hits(toy_index, texts, hits, top_k, prior, self_scores)
        want = _reference_candidates(toy_index, texts, hits, top_k, prior, self_scores)
        assert got == want
    assert any(c.exact for cs in got for c in cs) is prior


def test_gc_paused_nests_across_threads_and_restores_the_collector():
    import gc
    import threading

    from clinlinker_spark.candidates import gc_paused

    assert gc.isenabled()
    inside = threading.Event()
    release = threading.Event()
    seen = []

    def other():
        with gc_paused():
            inside.set()
            release.wait(5)
            seen.append(gc.isenabled())

    t = threading.Thread(target=other)
    with gc_paused():
        t.start()
        inside.wait(5)
        with gc_paused():
            seen.append(gc.isenabled())
    seen.append(gc.isenabled())  # the other thread's pause still holds
    release.set()
    t.join(5)
    assert seen == [False, False, False]
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


class TextRecordingEncoder(FakeEncoder):
    """A FakeEncoder that records every text it is asked to encode."""

    def __init__(self, precision: str = "fp32"):
        super().__init__()
        self.precision = precision
        self.texts: list[str] = []

    def encode(self, texts, show_progress: bool = False):
        self.texts.extend(texts)
        return super().encode(texts, show_progress)


@pytest.mark.parametrize("settings,reused", [
    ({}, True), ({"index_type": "ivf", "ivf_nprobe": 8}, True), ({"index_type": "hnsw"}, True),
    ({"sq8": True}, False), ({"fp16": True}, False),
], ids=["flat", "ivf-flat", "hnsw-flat", "flat-sq8", "flat-fp16"])
def test_a_text_the_index_holds_takes_the_terms_stored_vector_instead_of_being_encoded(
        tmp_path, settings, reused):
    index = TerminologyIndex.load(build_index(terminology(), FakeEncoder(),
                                              IndexConfig(**settings), tmp_path / "idx"))
    assert index.manifest["build"]["precision"] == "fp32"
    texts = ["apendicitis", "neumonía bilateral", "diabetes tipo 2", "apendicitis"]
    encoder = TextRecordingEncoder()
    linker = Linker(encoder, index, LinkingConfig(search_k=8, top_k=5))
    got = linker.retrieve(texts)
    # only a text no term has is encoded where the index keeps float32 vectors; 8-bit and
    # fp16 codes are not what encoding gives, so there every text is encoded
    encoded = ["neumonía bilateral"] if reused else texts
    assert encoder.texts == encoded
    assert linker.take_counts() == {"texts_encoded": len(encoded),
                                    "vectors_reused": len(texts) - len(encoded)}
    assert linker.take_counts() == {"texts_encoded": 0, "vectors_reused": 0}
    # the same candidates, scores included, as encoding every text
    every = TextRecordingEncoder()
    plain = Linker(every, index, LinkingConfig(search_k=8, top_k=5, reuse_index_vectors=False))
    assert plain.retrieve(texts) == got
    assert every.texts == texts
    assert got[0][0].code == "K37"
    if reused:  # the term's own vector against itself (8-bit codes decode to another one)
        assert got[0][0].retrieval_score == pytest.approx(1.0, abs=1e-6)


def test_vectors_are_not_reused_from_an_index_built_in_another_precision_or_not_saying(tmp_path):
    import json

    built = build_index(terminology(), FakeEncoder(), IndexConfig(), tmp_path / "idx")
    index = TerminologyIndex.load(built)
    assert index.holds_vectors_of("fp32") and not index.holds_vectors_of("bf16")
    bf16 = TextRecordingEncoder(precision="bf16")
    linker = Linker(bf16, index, LinkingConfig(search_k=8, top_k=5))
    assert not linker.reuses_index_vectors
    linker.retrieve(["apendicitis"])
    assert bf16.texts == ["apendicitis"]
    # an index built before the build's precision was recorded
    manifest_path = built / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["build"]["precision"]
    manifest_path.write_text(json.dumps(manifest))
    old = TerminologyIndex.load(built)
    assert not old.holds_vectors_of("fp32")
    fp32 = TextRecordingEncoder()
    Linker(fp32, old, LinkingConfig(search_k=8, top_k=5)).retrieve(["apendicitis"])
    assert fp32.texts == ["apendicitis"]


# --------------------------------------------------------------------------------------------
# hybrid candidates (dense + lexical), confidence and needs_review


def _index_position(index, term):
    from clinlinker_spark.text import normalize_text

    return index.position_of(normalize_text(term))


@pytest.mark.parametrize("text", ["diabetes", "insuficiencia cardiaca aguda", "apendicitis 2",
                                  "neumonia aguda"])
def test_hybrid_candidates_are_the_union_of_both_retrievers_each_scored_by_both(toy_index,
                                                                              text):
    from clinlinker_spark.linker import candidates_from_hits, hybrid_candidates

    enc = FakeEncoder()
    top_k = 2
    vectors = enc.encode([text])
    dense = toy_index.search(vectors, 2)  # few dense hits: the lexical ones add codes
    lexical = toy_index.lexical.search([text], 8)
    queries = toy_index.lexical.transform([text])
    [got] = hybrid_candidates(toy_index, [text], dense, lexical, vectors, queries, top_k,
                              False)
    [from_dense] = candidates_from_hits(toy_index, [text], dense, top_k, False)
    [from_lexical] = candidates_from_hits(toy_index, [text], lexical, 100, False)
    dense_codes = [c.code for c in from_dense]
    lexical_only = [c.code for c in from_lexical if c.code not in dense_codes][:top_k]
    assert lexical_only, "the case must have codes only the lexical retriever finds"
    assert sorted(c.code for c in got) == sorted(dense_codes + lexical_only)
    assert len({c.code for c in got}) == len(got)
    for c in got:
        position = _index_position(toy_index, c.term)
        assert position >= 0 and c.lexical_score is not None
        # the dense score: the query vector against the term's stored vector, whichever
        # retriever found the code
        stored = toy_index.vectors_at(np.array([position]))[0]
        assert c.retrieval_score == pytest.approx(float(vectors[0] @ stored), abs=1e-5)
        cosine = toy_index.lexical.pair_scores(queries, np.array([0]), np.array([position]))
        assert c.lexical_score == pytest.approx(float(cosine[0]), abs=1e-6)
    # a lexical-only code's dense score is computed, not copied from its lexical score
    lex = [c for c in got if c.code in lexical_only]
    assert any(abs(c.retrieval_score - c.lexical_score) > 1e-3 for c in lex)


def test_a_hybrid_linker_puts_exact_matches_first_and_scores_them_by_both(toy_index):
    linker = Linker(FakeEncoder(), toy_index,
                    LinkingConfig(search_k=8, top_k=3, retrievers=("dense", "lexical")))
    [cands] = linker.retrieve(["apendicitis"])
    assert [(c.code, c.exact) for c in cands[:2]] == [("K37", True), ("K35", True)]
    assert cands[0].lexical_score == pytest.approx(1.0, abs=1e-5)
    assert cands[0].retrieval_score == pytest.approx(1.0, abs=1e-5)
    assert all(c.lexical_score is not None for c in cands)
    assert linker.take_stage_seconds()["lexical"] > 0


def test_a_dense_only_linker_gives_candidates_from_hits(toy_index):
    from clinlinker_spark.linker import candidates_from_hits

    enc = FakeEncoder()
    texts = ["diabetes", "apendicitis", "insuficiencia cardíaca", "dolor", "neumonía grave"]
    for prior in (True, False):
        linking = LinkingConfig(search_k=6, top_k=4, exact_match_prior=prior,
                                retrievers=("dense",))
        got = Linker(enc, toy_index, linking).retrieve(texts)
        vectors = enc.encode(texts)
        want = candidates_from_hits(toy_index, texts, toy_index.search(vectors, 6), 4, prior,
                                    np.einsum("ij,ij->i", vectors, vectors))
        assert got == want
        assert all(c.lexical_score is None and c.ranker_score is None
                   for cs in got for c in cs)


def test_the_linker_refuses_the_lexical_retriever_without_a_lexical_model(tmp_path):
    from clinlinker_spark.errors import ConfigError
    from clinlinker_spark.linker import hybrid_candidates
    from test_index import as_format_1

    old = TerminologyIndex.load(as_format_1(build_index(terminology(), FakeEncoder(),
                                                        IndexConfig(), tmp_path / "old")))
    assert old.lexical is None
    with pytest.raises(ConfigError, match="no\\s+lexical model"):
        Linker(FakeEncoder(), old, LinkingConfig(retrievers=("dense", "lexical")))
    Linker(FakeEncoder(), old, LinkingConfig(retrievers=("dense",)))  # dense alone is fine
    vectors = FakeEncoder().encode(["dolor"])
    hits = old.search(vectors, 3)
    with pytest.raises(ConfigError, match="no\\s+lexical model"):
        hybrid_candidates(old, ["dolor"], hits, hits, vectors, None, 3, True)
    with pytest.raises(Exception, match="retrievers"):
        LinkingConfig(retrievers=("lexical",))


class StubRanker:
    """A ranker that keeps the order and gives fixed confidences per text."""

    model_hash = "stub"
    uses_rerank = False

    def __init__(self, confidence):
        self.confidence = confidence

    def check_compatible(self, linker):
        pass

    def rank(self, index, texts_norm, candidates, keep=None):
        ranked = [[Candidate(c.code, c.term, c.retrieval_score, c.rerank_score, c.exact,
                             c.lexical_score, 2.0 - j) for j, c in enumerate(cs[:keep])]
                  for cs in candidates]
        return ranked, [self.confidence[t] if cs else None
                        for t, cs in zip(texts_norm, candidates)]


def test_outcome_below_review_below_needs_review_and_keeps_the_code(toy_index):
    from clinlinker_spark.linker import STATUS_NEEDS_REVIEW

    linker = Linker(FakeEncoder(), toy_index, LinkingConfig(search_k=8, top_k=3,
                                                             review_below=0.8))
    cands = [Candidate("J18", "Neumonía", 0.9), Candidate("K35", "apendicitis", 0.2)]
    status, reason, code, term, score, confidence = linker.outcome(cands, 0.5)
    assert (status, code, term, confidence) == (STATUS_NEEDS_REVIEW, "J18", "Neumonía", 0.5)
    assert "review_below=0.8" in reason and score == 0.9
    assert linker.outcome(cands, 0.8)[:3] == (STATUS_LINKED, None, "J18")  # not below
    assert linker.outcome(cands, None)[0] == STATUS_LINKED  # no ranker, no confidence
    assert linker.outcome([], 0.1)[0] == STATUS_NO_CANDIDATE
    # through link(), with a ranker's confidences
    ranker = StubRanker({"neumonía": 0.95, "apendicitis": 0.3})
    ranked = Linker(FakeEncoder(), toy_index,
                    LinkingConfig(search_k=8, top_k=3, review_below=0.8), ranker=ranker)
    out = ranked.link(pd.DataFrame({"mention_id": ["a", "b"],
                                    "text": ["Neumonía", "apendicitis"]}))
    assert out["status"].tolist() == [STATUS_LINKED, STATUS_NEEDS_REVIEW]
    assert out["code"].tolist() == ["J18", "K37"]
    assert out["confidence"].tolist() == [0.95, 0.3]
    assert out.loc[1, "score"] == 2.0  # the ranker's score of its first candidate
    assert out.loc[1, "candidates"][0]["ranker_score"] == 2.0
    assert ranked.versions["ranker_version"] == "stub"


def test_expand_to_leaves_adds_the_leaves_below_a_category_most_used_first(tmp_path):
    from clinlinker_spark.config import IndexConfig, LinkingConfig
    from clinlinker_spark.index import TerminologyIndex, build_index
    from clinlinker_spark.linker import Linker, expand_to_leaves

    terms = pd.DataFrame({
        "code": ["C56", "C56.1", "C56.9", "C56.9", "C50"],
        "term": ["tumor maligno del ovario", "malignant neoplasm of right ovary",
                 "malignant neoplasm of unspecified ovary", "carcinoma de ovario",
                 "tumor maligno de la mama"],
        "parent_key": ["", "c56", "c56", "c56", ""],
        "mention_count": [0, 0, 0, 3, 0],
        "is_main_term": [True, True, True, False, True],
    })
    encoder = FakeEncoder()
    index = TerminologyIndex.load(build_index(terms, encoder, IndexConfig(), tmp_path / "i"))
    # the leaves of C56, most training mentions first (C56.9 has 3), with their main terms
    rows = [index.row(r) for r in index.leaf_rows_under("c56")]
    assert [(code, term) for code, _, term, _ in rows] == [
        ("C56.9", "malignant neoplasm of unspecified ovary"),
        ("C56.1", "malignant neoplasm of right ovary")]
    assert index.leaf_rows_under("c569") == [] and index.leaf_rows_under("c50") == []

    plain = Linker(encoder, index, LinkingConfig(top_k=1, search_k=1, exact_match_prior=False))
    texts = ["tumor maligno del ovario"]
    [cands] = plain.retrieve(texts)
    assert [c.code for c in cands] == ["C56"]
    vectors = encoder.encode(texts)
    [expanded] = expand_to_leaves(index, [cands], 1, vectors)
    assert [c.code for c in expanded] == ["C56", "C56.9"]
    leaf = expanded[1]
    stored = index.vectors_at(np.array([index.position_of(leaf.term.lower())]))[0]
    assert leaf.retrieval_score == pytest.approx(float(vectors[0] @ stored), abs=1e-6)
    # two leaves per category; a leaf already in the list is not added again
    [both] = expand_to_leaves(index, [expanded], 2, vectors)
    assert [c.code for c in both] == ["C56", "C56.9", "C56.1"]
    linker = Linker(encoder, index, LinkingConfig(top_k=1, search_k=1, exact_match_prior=False,
                                                  expand_leaves=2))
    assert [c.code for c in linker.retrieve(texts)[0]] == ["C56", "C56.9", "C56.1"]
