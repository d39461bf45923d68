from __future__ import annotations

import pandas as pd
import pytest

from clinlinker_spark.config import IndexConfig
from clinlinker_spark.evaluation import evaluate_candidates, format_table, gold_ranks
from clinlinker_spark.index import TerminologyIndex, build_index
from clinlinker_spark.linker import Candidate
from fake_encoder import FakeEncoder
from test_index import terminology


def test_gold_ranks_compare_normalised_codes():
    cands = [[Candidate("E11", "x", 1.0), Candidate("I50.9", "y", 0.5)]] * 3
    assert gold_ranks(["i509", "e11", "k35"], cands).tolist() == [2, 1, 0]


def test_evaluate_candidates_subsets_and_ceiling(tmp_path):
    index = TerminologyIndex.load(build_index(terminology(), FakeEncoder(), IndexConfig(),
                                              tmp_path / "i"))
    gold = pd.DataFrame({
        "text": ["apendicitis", "neumonía grave", "dolor", "x", "diabetes tipo 2"],
        "code": ["K35", "J18", "R52", "A+B", "E11"],
        "is_composite": [False, False, False, True, False],
        "is_no_code": [False] * 5,
    })
    cands = [
        [Candidate("K37", "", 1), Candidate("K35", "", 1)],   # rank 2
        [Candidate("J18", "", 1)],                             # rank 1
        [Candidate("J18", "", 1)],                             # absent, code not in index
        [Candidate("A", "", 1)],                               # composite: never right
        [Candidate("E11", "", 1)],                             # rank 1
    ]
    report = evaluate_candidates(gold, cands, index, ks=(1, 2))
    s = report["subsets"]
    assert s["all"] == {"n": 5, "acc@1": 0.4, "acc@2": 0.6}
    assert s["clean"] == {"n": 4, "acc@1": 0.5, "acc@2": 0.75}
    assert s["unseen_mentions"]["n"] == 2  # "neumonía grave", "dolor"
    assert s["exact_match"] == {"n": 2, "acc@1": 0.5, "acc@2": 1.0}
    # codes carried by training mentions (mention_count > 0): E11, I50.9, K35, K37
    assert s["unseen_codes"]["n"] == 2  # J18 and R52
    assert report["ceiling"] == pytest.approx(3 / 5)
    text = format_table({"results": {"dense": report}})
    assert "unseen_codes" in text and "acc@2" in text


def test_evaluate_candidates_length_mismatch():
    with pytest.raises(ValueError):
        evaluate_candidates(pd.DataFrame({"text": ["a"], "code": ["b"]}), [], None)


# --------------------------------------------------------------------------------------------
# category accuracy, error kinds, confidence


def test_category_ranks_compare_the_first_characters_of_the_keys():
    from clinlinker_spark.evaluation import category_ranks

    cands = [[Candidate("C56.1", "", 1), Candidate("C56.9", "", 1)],
             [Candidate("J15", "", 1), Candidate("J18.0", "", 1)],
             [Candidate("K35", "", 1)]]
    gold = ["c569", "j189", "e11"]
    assert gold_ranks(gold, cands).tolist() == [2, 0, 0]
    assert category_ranks(gold, cands, 3).tolist() == [1, 2, 0]
    assert category_ranks(gold, cands, 4).tolist() == [2, 0, 0]


def test_error_kinds_count_ancestors_descendants_and_missing_gold_codes(tmp_path):
    from clinlinker_spark.evaluation import error_kinds
    from test_index import hierarchy_terminology

    index = TerminologyIndex.load(build_index(hierarchy_terminology(), FakeEncoder(),
                                              IndexConfig(), tmp_path / "i"))
    gold = ["c569", "c56", "c561", "x991", "j18", "c5691"]
    cands = [
        [Candidate("C56", "", 1)],     # the gold code's parent: hierarchy
        [Candidate("C56.91", "", 1)],  # a grandchild of the gold code: hierarchy
        [Candidate("C56.9", "", 1)],   # a sibling: same category only
        [Candidate("J18", "", 1)],     # the gold code is not in the index
        [Candidate("J18", "", 1)],     # right
        [],                            # nothing found
    ]
    assert error_kinds(gold, cands, index) == {
        "errors": 5, "hierarchy": 2, "same_category": 3, "gold_not_in_index": 1}
    gold_table = pd.DataFrame({"text": ["x"] * 6, "code": gold})
    report = evaluate_candidates(gold_table, cands, index, ks=(1,), category_chars=3)
    assert report["errors"]["hierarchy"] == 2
    assert report["category"] == {"chars": 3, "n": 6, "acc@1": round(4 / 6, 4)}
    text = format_table({"results": {"dense": report}})
    assert "ancestor or descendant of the gold code 2" in text and "first 3 characters" in text


def test_expected_calibration_error():
    import numpy as np

    from clinlinker_spark.evaluation import expected_calibration_error

    # in each bin the share right is the bin's confidence: perfectly calibrated
    confidence = np.r_[np.full(10, 0.8), np.full(10, 0.3), np.full(4, 0.95)]
    right = np.r_[np.arange(10) < 8, np.arange(10) < 3, np.ones(4, bool)]
    assert expected_calibration_error(confidence, right) == pytest.approx(0.05 * 4 / 24)
    exact = np.r_[np.full(10, 0.8), np.full(10, 0.3), np.full(4, 1.0)]
    assert expected_calibration_error(exact, right) == pytest.approx(0.0, abs=1e-12)
    # overconfident: 0.95 sure, right half the time
    sure = np.full(100, 0.95)
    half = np.arange(100) % 2 == 0
    assert expected_calibration_error(sure, half) == pytest.approx(0.45)
    assert expected_calibration_error(np.zeros(0), np.zeros(0, bool)) == 0.0


def test_threshold_for_precision_on_a_hand_made_case():
    from clinlinker_spark.evaluation import precision_at, threshold_for_precision

    confidence = [0.9, 0.8, 0.8, 0.7, 0.6, 0.5]
    right = [True, True, False, True, False, False]
    # precision of the links at or above each threshold: 0.9 -> 1/1, 0.8 -> 2/3,
    # 0.7 -> 3/4, 0.6 -> 3/5, 0.5 -> 3/6
    assert threshold_for_precision(confidence, right, 0.75) == {
        "threshold": 0.7, "precision": 0.75, "coverage": round(4 / 6, 4)}
    assert threshold_for_precision(confidence, right, 0.6) == {
        "threshold": 0.6, "precision": 0.6, "coverage": round(5 / 6, 4)}
    # 0.8 is only reached by the first link; the two links at 0.8 cannot be split
    assert threshold_for_precision(confidence, right, 0.8)["threshold"] == 0.9
    assert threshold_for_precision([0.8, 0.8], [True, False], 0.9) is None
    assert threshold_for_precision([], [], 0.9) is None
    assert precision_at(confidence, right, 0.75) == {
        "threshold": 0.75, "precision": round(2 / 3, 4), "coverage": 0.5, "links": 3}
    assert precision_at(confidence, right, 0.95)["links"] == 0


def test_confidence_report_counts_mentions_without_confidence_as_wrong():
    from clinlinker_spark.evaluation import confidence_report

    report = confidence_report([0.9, None, 0.4, 0.95], [True, False, False, True],
                               target_precision=0.9, picked_threshold=0.5)
    assert report["mentions"] == 4 and report["accuracy"] == 0.5
    assert report["mean_confidence"] == pytest.approx((0.9 + 0.4 + 0.95) / 4, abs=1e-4)
    assert report["threshold_for_target"] == {"threshold": 0.9, "precision": 1.0,
                                              "coverage": 0.5}
    assert report["at_picked_threshold"]["precision"] == 1.0
    assert report["at_picked_threshold"]["coverage"] == 0.5
    assert [row["threshold"] for row in report["at_thresholds"]][:2] == [0.3, 0.5]


def test_plot_precision_coverage_writes_a_png(tmp_path):
    import numpy as np

    from clinlinker_spark.evaluation import plot_precision_coverage, precision_coverage_curve

    rng = np.random.default_rng(0)
    confidence = rng.uniform(size=200)
    right = rng.uniform(size=200) < confidence
    curve = precision_coverage_curve(confidence, right, points=21)
    assert len(curve) == 21 and curve[0]["coverage"] == 1.0
    path = tmp_path / "curve.png"
    plot_precision_coverage({"ranker": curve, "empty": []}, str(path), title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
