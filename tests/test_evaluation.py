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
