"""The learned final ranker: training out of fold, the artifact without pickle, calibration,
and the checks a linker makes before using a ranker.

The data: the shipped CodiEsp train sample (its DIAGNOSTICO mentions, 116 documents) as the
index's training mentions, beside the CIE-10 rows of the categories those mentions use; the
FakeEncoder embeds, so the whole set trains in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinlinker_spark.config import (
    IndexConfig, JobConfig, LinkingConfig, RankerConfig, TerminologyConfig,
    TerminologySourceConfig,
)
from clinlinker_spark.errors import ArtifactError, ConfigError
from clinlinker_spark.evaluation import (
    expected_calibration_error, precision_at, threshold_for_precision,
)
from clinlinker_spark.index import TerminologyIndex, build_index
from clinlinker_spark.linker import STATUS_LINKED, STATUS_NEEDS_REVIEW, Linker
from clinlinker_spark.ranker import (
    FEATURES, MODEL_FILE, RANKER_FILE, Calibration, Ranker, candidate_features, ranker_hash,
    raw_confidence,
)
from clinlinker_spark.samples import sample_path
from clinlinker_spark.terminology import load_terminology
from clinlinker_spark.training import ranker as training
from fake_encoder import FakeEncoder

LINKING = LinkingConfig(retrievers=("dense", "lexical"), search_k=20, top_k=10)
SETTINGS = RankerConfig(folds=2, num_trees=20, num_leaves=7, min_data_in_leaf=5,
                        num_threads=1)


@dataclasses.dataclass
class Setup:
    config: JobConfig
    index: TerminologyIndex
    linker: Linker
    encoder: FakeEncoder


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("ranker")
    gold = sample_path("codiesp_train_sample.tsv")
    codes = pd.read_csv(gold, sep="\t", header=None, dtype=str)
    categories = set(codes.loc[codes[1] == "DIAGNOSTICO", 2].str.lower()
                     .str.replace(".", "", regex=False).str[:3])
    cie = pd.read_csv(sample_path("cie10_es.csv"), dtype=str, keep_default_na=False)
    cie = cie[cie["code"].str.lower().str[:3].isin(categories)]
    cie.to_csv(root / "cie10_subset.csv", index=False)
    terminology = TerminologyConfig(name="sample", sources=(
        TerminologySourceConfig(path=str(root / "cie10_subset.csv"), format="cie10"),
        TerminologySourceConfig(path=str(gold), format="codiesp", name="codiesp_train",
                                labels=("DIAGNOSTICO",)),
    ))
    encoder = FakeEncoder()
    path = build_index(load_terminology(terminology), encoder, IndexConfig(), root / "index")
    config = JobConfig(index=IndexConfig(path=str(path)), terminology=terminology,
                       linking=LINKING, ranker=SETTINGS)
    index = TerminologyIndex.load(path)
    return Setup(config, index, Linker(encoder, index, LINKING), encoder)


@dataclasses.dataclass
class Trained:
    path: Path  # the ranker directory train_ranker wrote
    spec: dict
    model: dict  # the model train_ranker fitted last, the one it wrote, in memory
    examples: training.Examples  # the out-of-fold candidate lists it learned from


def _train(setup: Setup, out: Path, model: str) -> Trained:
    fitted: list[dict] = []
    examples: list[training.Examples] = []
    real_fit, real_examples = training.fit_model, training.out_of_fold_examples

    def fit_and_keep(*args, **kwargs):
        fitted.append(real_fit(*args, **kwargs))
        return fitted[-1]

    def examples_and_keep(*args, **kwargs):
        examples.append(real_examples(*args, **kwargs))
        return examples[-1]

    config = dataclasses.replace(setup.config, ranker=dataclasses.replace(SETTINGS, model=model))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "fit_model", fit_and_keep)
        patch.setattr(training, "out_of_fold_examples", examples_and_keep)
        spec = training.train_ranker(config, out, linker=setup.linker)
    assert len(fitted) == SETTINGS.folds + 1  # one per fold (cross-fitting), then all folds
    assert len(examples) == 1
    return Trained(out, spec, fitted[-1], examples[0])


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """``trained(model)``: a ranker of that model type trained on the setup (once)."""
    cache: dict[str, Trained] = {}

    def get(model: str) -> Trained:
        if model not in cache:
            cache[model] = _train(setup, tmp_path_factory.mktemp(model) / "ranker", model)
        return cache[model]

    return get


def load_without_pickle(path: Path, monkeypatch) -> Ranker:
    def refuse(*args, **kwargs):
        raise AssertionError("a ranker must load without pickle")

    with monkeypatch.context() as m:
        for name in ("load", "loads", "Unpickler"):
            m.setattr(pickle, name, refuse)
        return Ranker.load(path)


DEV_TEXTS = ["hematuria", "dolor abdominal", "insuficiencia renal aguda", "tumor vesical",
             "hipertensión arterial", "carcinoma urotelial de vejiga", "fiebre", "litiasis"]


@pytest.mark.parametrize("model", ["lightgbm", "logistic"])
def test_a_trained_ranker_saves_as_text_and_loads_to_the_same_scores(
        setup, trained, tmp_path, monkeypatch, model):
    out, spec, fitted = trained(model).path, trained(model).spec, trained(model).model
    files = {p.name for p in out.iterdir()}
    assert files == ({RANKER_FILE, MODEL_FILE} if model == "lightgbm" else {RANKER_FILE})
    written = json.loads((out / RANKER_FILE).read_text(encoding="utf-8"))
    assert written == spec and spec["model_type"] == model
    assert spec["trained_with"]["model_version"] == setup.encoder.model_hash
    assert spec["trained_with"]["index_version"] == setup.index.content_hash
    assert spec["trained_with"]["retrievers"] == ["dense", "lexical"]
    assert spec["training_data"]["folds"] == 2
    assert spec["metrics"]["mentions"] > 1000
    assert "rerank" not in spec["features"] and set(spec["features"]) <= set(FEATURES)
    if model == "lightgbm":
        assert (out / MODEL_FILE).read_text(encoding="utf-8").startswith("tree")
    ranker = load_without_pickle(out, monkeypatch)
    assert ranker.model_hash == ranker_hash(out) and len(ranker.model_hash) == 64
    # the loaded model scores candidates as the model in memory did
    candidates = setup.linker.retrieve(DEV_TEXTS)
    features = candidate_features(setup.index, DEV_TEXTS, candidates)
    names = tuple(spec["features"])
    want = training.predict(fitted, features, names)
    got = ranker.score_matrix(features)
    assert np.ptp(want) > 0  # the model tells candidates apart
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    ranked, confidences = ranker.rank(setup.index, DEV_TEXTS, candidates)
    at = 0
    for cands, mine in zip(candidates, ranked):
        s = want[at:at + len(cands)]
        at += len(cands)
        order = np.argsort(-s, kind="stable")
        assert [c.code for c in mine] == [cands[j].code for j in order]
        np.testing.assert_allclose([c.ranker_score for c in mine], s[order], rtol=1e-9,
                                   atol=1e-9)
    assert all(c is None or 0.0 <= c <= 1.0 for c in confidences)
    # the confidence is the calibrated softmax share of each whole list's best score, also when
    # only the first few are kept and beside a mention without candidates
    with_empty = [*candidates[:2], [], candidates[2]]
    kept, kept_confidences = ranker.rank(setup.index, [*DEV_TEXTS[:2], "x", DEV_TEXTS[2]],
                                         with_empty, keep=2)
    assert [len(k) for k in kept] == [min(len(c), 2) for c in with_empty]
    assert kept_confidences[2] is None and kept[2] == []
    for mine, full in zip([*kept[:2], kept[3]], ranked[:3]):
        assert mine == full[:2]
    at = 0
    for cands, confidence in zip(candidates[:3], confidences[:3]):
        s = np.sort(want[at:at + len(cands)])[::-1]
        at += len(cands)
        assert confidence == pytest.approx(float(ranker.calibration(
            np.asarray([raw_confidence(s)]))[0]))
    assert [kept_confidences[j] for j in (0, 1, 3)] == pytest.approx(confidences[:3])
    # a linker with the ranker: its order, a confidence, needs_review below review_below
    review = dataclasses.replace(LINKING, review_below=0.5)
    linked = Linker(setup.encoder, setup.index, review, ranker=ranker).link(
        pd.DataFrame({"mention_id": range(len(DEV_TEXTS)), "text": DEV_TEXTS}))
    for row, mine, confidence in zip(linked.itertuples(), ranked, confidences):
        assert row.code == mine[0].code and row.confidence == pytest.approx(confidence)
        assert row.status == (STATUS_NEEDS_REVIEW if confidence < 0.5 else STATUS_LINKED)
    # a changed model file is another ranker
    copy = shutil.copytree(out, tmp_path / "copy")
    assert ranker_hash(copy) == ranker.model_hash
    spec_file = copy / RANKER_FILE
    spec_file.write_text(spec_file.read_text(encoding="utf-8") + " ", encoding="utf-8")
    assert ranker_hash(copy) != ranker.model_hash


def test_a_ranker_directory_must_be_one(tmp_path):
    with pytest.raises(ArtifactError, match="no ranker.json"):
        Ranker.load(tmp_path)
    (tmp_path / RANKER_FILE).write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(ArtifactError, match="not a clinlinker-ranker"):
        Ranker.load(tmp_path)


def test_out_of_fold_views_never_see_their_own_folds_mentions(setup):
    data = training.load_training_mentions(setup.config)
    mentions = data.mentions
    assert sorted(mentions["fold"].unique()) == [0, 1]
    # a document's mentions are in one fold
    assert (mentions.groupby("doc_key")["fold"].nunique() == 1).all()
    dictionary = {(t, k) for frame in data.dictionary
                  for t, k in zip(frame["term_norm"], frame["code_key"])}
    full = set(zip(setup.index.rows["term_norm"], setup.index.rows["code_key"]))
    for fold in (0, 1):
        own = mentions[mentions["fold"] == fold]
        others = mentions[mentions["fold"] != fold]
        only_own = (set(zip(own["text_norm"], own["code_key"]))
                    - set(zip(others["text_norm"], others["code_key"])) - dictionary)
        assert len(only_own) > 100 and only_own <= full  # the full index holds them
        view = setup.index.with_terminology(training.fold_terminology(data, fold))
        pairs = list(zip(view.rows["term_norm"], view.rows["code_key"]))
        assert not only_own & set(pairs)
        # mention counts: exactly the other folds' mentions
        counts = dict(zip(pairs, view.rows["mention_count"].tolist()))
        expected = Counter(zip(others["text_norm"], others["code_key"]))
        assert {p: n for p, n in counts.items() if n} == dict(expected)
        assert set(counts) == dictionary | set(expected)
        # the code table's counts agree (the code_mentions feature reads them)
        by_code = Counter(others["code_key"].tolist())
        assert dict(zip(view.codes["code_key"], view.codes["mention_count"])) == {
            k: by_code.get(k, 0) for k in view.codes["code_key"]}
        # a text only this fold's mentions carry is no exact match in the view
        text_only_own = set(own["text_norm"]) - set(others["text_norm"]) - {
            t for t, _ in dictionary}
        assert text_only_own
        assert all(view.position_of(t) >= 0 and not view.code_rows(view.position_of(t))
                   for t in text_only_own)


def test_out_of_fold_examples_label_the_gold_code(setup, trained):
    data = training.load_training_mentions(setup.config)
    examples = trained("logistic").examples
    assert len(examples.sizes) == len(data.mentions)
    assert examples.features.shape == (int(examples.sizes.sum()), len(FEATURES))
    assert examples.labels.sum() == examples.gold_found.sum()  # one gold code per list
    # lists come fold by fold, each fold's mentions in order
    mentions = data.mentions
    ordered = pd.concat([mentions[mentions["fold"] == f] for f in (0, 1)])
    dictionary_texts = {t for frame in data.dictionary for t in frame["term_norm"]}
    texts_of_fold = {f: set(mentions.loc[mentions["fold"] == f, "text_norm"]) for f in (0, 1)}
    exact = examples.features[:, FEATURES.index("exact")]
    offsets = examples.offsets
    checked = 0
    for i, (text, fold) in enumerate(zip(ordered["text_norm"], ordered["fold"])):
        if text in dictionary_texts or text in texts_of_fold[1 - fold]:
            continue
        # a text only its own fold's mentions carry: a text of the full index, but out of
        # fold no code has it, so no candidate is an exact match
        assert setup.index.position_of(text) >= 0
        assert not exact[offsets[i]:offsets[i + 1]].any()
        checked += 1
    assert checked > 100


def test_calibration_is_monotone_and_its_threshold_holds_on_held_out_data():
    rng = np.random.default_rng(7)
    n = 12000
    p = rng.uniform(0.0, 1.0, n)  # the chance that the top code is right
    raw = p ** 3  # a score that orders like p but is no probability
    right = rng.uniform(0.0, 1.0, n) < p
    fit, held = slice(0, n // 2), slice(n // 2, n)
    calibration = Calibration.fit(raw[fit], right[fit])
    grid = np.linspace(-0.5, 1.5, 401)
    mapped = calibration(grid)
    assert np.all(np.diff(mapped) >= 0) and mapped.min() >= 0 and mapped.max() <= 1
    assert calibration(np.array([0.125]))[0] == pytest.approx(0.5, abs=0.08)  # p = 0.5
    confidence_fit = calibration(raw[fit])
    confidence_held = calibration(raw[held])
    assert expected_calibration_error(confidence_held, right[held]) < 0.04
    assert expected_calibration_error(raw[held], right[held]) > 0.15
    picked = threshold_for_precision(confidence_fit, right[fit], 0.9)
    assert picked is not None and picked["precision"] >= 0.9
    assert 0.1 < picked["coverage"] < 0.3  # precision 0.9 is reached from p = 0.8 on
    held_out = precision_at(confidence_held, right[held], picked["threshold"])
    assert held_out["precision"] >= 0.87
    assert held_out["coverage"] == pytest.approx(picked["coverage"], abs=0.05)


def test_the_cards_calibration_error_is_measured_on_folds_the_calibration_did_not_see():
    rng = np.random.default_rng(11)
    n = 4000
    p = rng.uniform(0.0, 1.0, n)
    raw = p ** 3
    right = rng.uniform(0.0, 1.0, n) < p
    folds = np.arange(n) % 5
    crossed = training.cross_fitted_confidence(raw, right, folds)
    in_sample = Calibration.fit(raw, right)(raw)
    # isotonic regression fits its own data bin by bin: an error near 0 that says nothing
    assert expected_calibration_error(in_sample, right) < 0.01
    crossed_error = expected_calibration_error(crossed, right)
    assert expected_calibration_error(in_sample, right) < crossed_error < 0.05
    # a fold's confidence does not move when its own answers change
    flipped = right.copy()
    flipped[folds == 2] = ~flipped[folds == 2]
    again = training.cross_fitted_confidence(raw, flipped, folds)
    assert np.array_equal(again[folds == 2], crossed[folds == 2])
    assert not np.array_equal(again[folds != 2], crossed[folds != 2])


def test_a_trained_rankers_calibration_is_monotone(trained):
    ranker = Ranker.load(trained("logistic").path)
    spec = ranker.spec
    calibration = ranker.calibration
    assert list(calibration.x) == spec["calibration"]["x"] and len(calibration.x) > 1
    values = calibration(np.linspace(0, 1, 201))
    assert np.all(np.diff(values) >= 0)
    thresholds = spec["thresholds"]
    assert set(thresholds) == {"0.9", "0.95", "0.98"}
    for target, found in thresholds.items():
        assert found is None or found["precision"] >= float(target)


def test_a_linker_refuses_a_ranker_it_cannot_feed(setup, trained, tmp_path):
    ranker = Ranker.load(trained("logistic").path)
    Linker(setup.encoder, setup.index, LINKING, ranker=ranker)  # the encoder it was trained with
    other = FakeEncoder(salt="other")
    small = pd.DataFrame({"code": ["R31", "R10"], "term": ["hematuria", "dolor abdominal"]})
    other_index = TerminologyIndex.load(build_index(small, other, IndexConfig(),
                                                    tmp_path / "other"))
    with pytest.raises(ConfigError, match="trained with bi-encoder"):
        Linker(other, other_index, LINKING, ranker=ranker)
    with pytest.raises(ConfigError, match="retrievers"):
        Linker(setup.encoder, setup.index, LinkingConfig(search_k=20, top_k=10), ranker=ranker)
    with pytest.raises(ConfigError, match="without a cross-encoder"):
        Linker(setup.encoder, setup.index, LINKING, reranker=object(), ranker=ranker)


def test_features_see_the_index_hierarchy_and_priors(setup):
    from clinlinker_spark.linker import Candidate

    index = setup.index
    # a category and one of its subcategories as candidates of one mention
    codes = index.codes.set_index("code_key")
    child = next(k for k, parent in codes["parent_key"].items() if parent)
    parent = codes.loc[child, "parent_key"]
    term_of = dict(zip(index.rows["code_key"], index.rows["term"]))
    cands = [[Candidate(codes.loc[parent, "code"], term_of[parent], 0.9, lexical_score=0.8),
              Candidate(codes.loc[child, "code"], term_of[child], 0.7, lexical_score=0.9)]]
    text = index.rows.loc[index.rows["code_key"] == child, "term_norm"].iloc[0]
    f = candidate_features(index, [text], cands)
    col = {name: j for j, name in enumerate(FEATURES)}
    assert f[:, col["has_descendant"]].tolist() == [1.0, 0.0]
    assert f[:, col["has_ancestor"]].tolist() == [0.0, 1.0]
    assert f[:, col["is_leaf"]][0] == 0.0
    assert f[1, col["depth"]] == f[0, col["depth"]] + 1
    assert f[:, col["dense_rank"]].tolist() == [1.0, 2.0]
    assert f[:, col["lexical_rank"]].tolist() == [2.0, 1.0]
    assert f[1, col["dense_gap"]] == pytest.approx(0.2)
    assert np.isnan(f[:, col["rerank"]]).all()  # no cross-encoder scored them


def test_hit_support_counts_the_dense_hits_of_each_code(setup):
    """A code carried by several of the mention's dense hits gets their count and its share of
    the list's hits; the Linker's candidates carry the count, in the dense and the hybrid
    paths alike."""
    from clinlinker_spark.candidates import Hits
    from clinlinker_spark.linker import candidates_from_hits, hybrid_candidates, hit_support

    index = setup.index
    rows = index.rows
    many = rows.groupby("code_key").size()
    code = many[many >= 3].index[0]  # a code with three or more texts
    other = many[many == 1].index[0]
    position = index.position_of
    three = [position(t) for t in rows.loc[rows["code_key"] == code, "term_norm"][:3]]
    one = position(rows.loc[rows["code_key"] == other, "term_norm"].iloc[0])
    positions = [three[0], one, three[1], three[2], -1]
    scores = [0.9, 0.8, 0.7, 0.6, 0.0]
    support = hit_support(index, positions)
    assert support[code] == 3
    assert support[other] == 1

    hits = Hits(np.array([scores], np.float32), np.array([positions], np.int64))
    dense = candidates_from_hits(index, ["x"], hits, 10, exact_match_prior=False)[0]
    vectors = setup.encoder.encode(["x"])
    lexical = Hits(np.full((1, 1), 0.1, np.float32), np.array([[one]], np.int64))
    hybrid = hybrid_candidates(index, ["x"], hits, lexical, vectors,
                               index.lexical.transform(["x"]), 10, False)[0]
    for cands in (dense, hybrid):
        by_code = {c.code.lower().replace(".", ""): c for c in cands}
        assert (by_code[code].dense_hits, by_code[other].dense_hits) == (3, 1)
        f = candidate_features(index, ["x"], [cands])
        col = {name: j for j, name in enumerate(FEATURES)}
        j = [c.code for c in cands].index(by_code[code].code)
        assert f[j, col["dense_hits"]] == 3
        assert f[j, col["dense_hits_share"]] == pytest.approx(3 / 4)


def test_category_hits_share_sums_the_hits_of_one_category(setup):
    from clinlinker_spark.linker import Candidate

    index = setup.index
    codes = index.codes.set_index("code_key")
    child = next(k for k, parent in codes["parent_key"].items() if parent)
    parent = codes.loc[child, "parent_key"]
    other = next(k for k in codes.index
                 if k[:3] != child[:3] and not codes.loc[k, "parent_key"])
    term_of = dict(zip(index.rows["code_key"], index.rows["term"]))
    cands = [[Candidate(codes.loc[k, "code"], term_of[k], 0.9, dense_hits=h)
              for k, h in ((parent, 2), (child, 3), (other, 1))]]
    f = candidate_features(index, ["x"], cands)
    col = {name: j for j, name in enumerate(FEATURES)}
    assert f[:, col["dense_hits_share"]].tolist() == pytest.approx([2 / 6, 3 / 6, 1 / 6])
    assert f[:, col["category_hits_share"]].tolist() == pytest.approx([5 / 6, 5 / 6, 1 / 6])


def test_side_and_description_features(tmp_path):
    """The side a mention names is compared with the side each candidate's description
    names; descriptions' unspecified / other / with / without variants are flagged."""
    from clinlinker_spark.linker import Candidate
    from clinlinker_spark.ranker import SIDE_BOTH, SIDE_LEFT, SIDE_RIGHT, SIDE_UNSPECIFIED, side_of
    from clinlinker_spark.terminology import build_terminology, read_table

    table = pd.DataFrame({
        "code": ["G81.9", "G81.91", "G81.92", "H02.409", "H02.40", "R11.10"],
        "term": ["Hemiplejía, no especificada",
                 "Hemiplegia, unspecified affecting right dominant side",
                 "Hemiplegia, unspecified affecting left dominant side",
                 "Unspecified ptosis of unspecified eyelid",
                 "Ptosis of eyelid", "Vomiting, unspecified"],
        "parent": ["", "G81.9", "G81.9", "H02.40", "", ""],
    })
    table.to_csv(tmp_path / "codes.csv", index=False)
    terms = build_terminology([read_table(tmp_path / "codes.csv", parent_column="parent")])
    path = build_index(terms, FakeEncoder(), IndexConfig(), tmp_path / "index")
    index = TerminologyIndex.load(path)
    term_of = dict(zip(index.rows["code"], index.rows["term"]))

    def features(text: str, codes: list[str]) -> dict[str, list[float]]:
        cands = [[Candidate(c, term_of[c], 0.5) for c in codes]]
        f = candidate_features(index, [text], cands)
        return {name: f[:, j].tolist() for j, name in enumerate(FEATURES)}

    f = features("hemiparesia derecha", ["G81.91", "G81.92", "G81.9", "R11.10"])
    assert f["mention_side"] == [SIDE_RIGHT] * 4
    assert f["candidate_side"] == [SIDE_RIGHT, SIDE_LEFT, 0.0, 0.0]
    assert f["side_agrees"] == [1.0, 0.0, 0.0, 0.0]
    assert f["side_conflicts"] == [0.0, 1.0, 0.0, 0.0]
    assert f["says_unspecified"] == [1.0, 1.0, 1.0, 1.0]  # "no especificada" too
    assert f["has_description"] == [1.0] * 4
    f = features("ptosis palpebral", ["H02.409", "H02.40"])
    assert f["candidate_side"] == [SIDE_UNSPECIFIED, 0.0]
    assert f["says_unspecified"] == [1.0, 0.0]
    assert f["side_conflicts"] == [0.0, 0.0] and f["mention_side"] == [0.0, 0.0]
    assert side_of("ptosis bilateral") == SIDE_BOTH
    assert side_of("ojo derecho e izquierdo") == SIDE_BOTH
    assert side_of("hemorragia prerretiniana od") == SIDE_RIGHT
    assert side_of("dolor abdominal") == 0
    assert side_of("fiebre sin foco") == 0
