"""Synonym pairs and training data: cap per code, no self pairs, composite / NO_CODE out,
deterministic, and the document split's test side never used for training."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from clinlinker_spark.config import TerminologySourceConfig, load_config
from clinlinker_spark.corpora import split_by_document
from clinlinker_spark.errors import ConfigError
from clinlinker_spark.samples import sample_path
from clinlinker_spark.text import normalize_text
from clinlinker_spark.training.config import BiEncoderTrainConfig
from clinlinker_spark.training.pairs import (
    build_pairs,
    clean_mention_rows,
    load_training_data,
    pairs_sha256,
    strings_by_code,
)


def _mentions(rows: list[tuple[str, str, bool, bool]]) -> pd.DataFrame:
    return pd.DataFrame(
        [(f"d{i % 3}", t, c, comp, nc) for i, (t, c, comp, nc) in enumerate(rows)],
        columns=["doc_id", "text", "code", "is_composite", "is_no_code"],
    )


def _terms(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["code", "term"])


TERMS = _terms([
    ("E11.9", "Diabetes mellitus tipo 2 sin complicaciones"),
    ("I10", "Hipertensión esencial (primaria)"),
    ("N18.3", "Enfermedad renal crónica, estadio 3"),
    ("NO_CODE", "sin código"),
    ("A+B", "compuesto"),
])
MENTIONS = _mentions([
    ("diabetes tipo 2", "e11.9", False, False),
    ("DM2", "E11.9", False, False),
    ("dm2", "E119", False, False),  # same normalised text and code as the previous row
    ("  Diabetes   mellitus tipo 2 sin complicaciones ", "E11.9", False, False),  # = term
    ("HTA", "I10", False, False),
    ("hipertensión arterial", "i10", False, False),
    ("hipertensión y diabetes", "I10+E11.9", True, False),
    ("masa sin filiar", "NO_CODE", False, True),
    ("ERC estadio 3", "N18.3", False, False),
])


def test_pairs_are_distinct_strings_of_one_code_and_never_self_pairs() -> None:
    pairs = build_pairs(TERMS, MENTIONS, max_pairs_per_code=0)
    assert pairs, "expected pairs"
    for p in pairs:
        assert p.text_a != p.text_b
        assert p.text_a == normalize_text(p.text_a) and p.text_b == normalize_text(p.text_b)
    by_code: dict[str, set[frozenset[str]]] = {}
    for p in pairs:
        by_code.setdefault(p.code, set()).add(frozenset((p.text_a, p.text_b)))
    # e119: 'diabetes tipo 2', 'dm2', the description (the mention equal to it is one string)
    assert len(by_code["e119"]) == 3
    assert sum(1 for p in pairs if p.code == "e119") == 3  # no duplicate pair
    # i10: two mentions + description = 3 pairs; n183: one mention + description = 1 pair
    assert len(by_code["i10"]) == 3
    assert len(by_code["n183"]) == 1


def test_composite_and_no_code_are_excluded() -> None:
    pairs = build_pairs(TERMS, MENTIONS, max_pairs_per_code=0)
    codes = {p.code for p in pairs}
    texts = {t for p in pairs for t in (p.text_a, p.text_b)}
    assert "no_code" not in codes and "a+b" not in codes
    assert not any("+" in c for c in codes)
    assert "hipertensión y diabetes" not in texts
    assert "masa sin filiar" not in texts
    assert "sin código" not in texts and "compuesto" not in texts
    groups = strings_by_code(TERMS, MENTIONS)
    assert set(groups) == {"e119", "i10", "n183"}


def test_cap_per_code_limits_frequent_codes_and_is_deterministic() -> None:
    many = _mentions([(f"variante {i} de la diabetes", "E11.9", False, False)
                      for i in range(10)] + [("HTA", "I10", False, False)])
    uncapped = build_pairs(TERMS, many, max_pairs_per_code=0)
    n_e119 = sum(1 for p in uncapped if p.code == "e119")
    assert n_e119 == len(list(itertools.combinations(range(11), 2)))  # 10 mentions + term
    capped = build_pairs(TERMS, many, max_pairs_per_code=7, seed=3)
    assert sum(1 for p in capped if p.code == "e119") == 7
    assert sum(1 for p in capped if p.code == "i10") == 1  # under the cap: all pairs
    assert set(capped) <= set(uncapped)
    again = build_pairs(TERMS, many.sample(frac=1.0, random_state=5), max_pairs_per_code=7,
                        seed=3)
    assert pairs_sha256(again) == pairs_sha256(capped)  # row order does not matter
    other_seed = build_pairs(TERMS, many, max_pairs_per_code=7, seed=4)
    assert {p for p in other_seed if p.code == "e119"} != {p for p in capped
                                                           if p.code == "e119"}


def test_dictionary_only_pairs_can_be_dropped() -> None:
    terms = _terms([("C1", "término uno"), ("C1", "sinónimo uno"), ("C1", "otro sinónimo")])
    mentions = _mentions([("mención uno", "C1", False, False)])
    all_pairs = build_pairs(terms, mentions, max_pairs_per_code=0)
    assert len(all_pairs) == 6  # 4 strings
    no_dict = build_pairs(terms, mentions, max_pairs_per_code=0, include_dictionary_pairs=False)
    assert len(no_dict) == 3
    assert all("mención uno" in (p.text_a, p.text_b) for p in no_dict)


def test_clean_mention_rows_counts_distinct_text_code_groups() -> None:
    rows = clean_mention_rows(MENTIONS)
    dm2 = rows[(rows["term_norm"] == "dm2") & (rows["code_key"] == "e119")]
    assert int(dm2["count"].iloc[0]) == 2
    assert not (rows["code_key"].str.contains(r"\+")).any()
    assert "no_code" not in set(rows["code_key"])


def test_training_data_uses_only_the_train_side_of_a_document_split() -> None:
    path = sample_path("distemist_sample.tsv")
    src = TerminologySourceConfig(path=str(path), format="distemist", split="train",
                                  test_fraction=0.3, split_seed=13)
    data = load_training_data([src])
    from clinlinker_spark.corpora import read_gold

    _, test = split_by_document(read_gold(path, "distemist"), 0.3, 13)
    assert not set(data.mentions["doc_id"]) & set(test["doc_id"])
    assert len(data.mentions) > 0 and data.terms.empty
    assert list(data.source_hashes.values())[0]  # the source file is hashed


def test_config_refuses_training_on_the_test_side() -> None:
    with pytest.raises(ConfigError, match="split 'test'"):
        load_config(None, ["data.sources=[{path: x.tsv, format: distemist, split: test}]"],
                    cls=BiEncoderTrainConfig)


def test_config_rejects_unknown_keys_and_reads_exponents() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["optim.batchsize=8"], cls=BiEncoderTrainConfig)
    cfg = load_config(None, ["optim.learning_rate=2e-5"], cls=BiEncoderTrainConfig)
    assert cfg.optim.learning_rate == pytest.approx(2e-5)


def test_codiesp_sample_pairs_pair_mentions_with_cie10_descriptions() -> None:
    sources = [
        TerminologySourceConfig(path=str(sample_path("cie10_es.csv")), format="cie10"),
        TerminologySourceConfig(path=str(sample_path("codiesp_train_sample.tsv")),
                                format="codiesp", labels=("DIAGNOSTICO",)),
    ]
    data = load_training_data(sources)
    pairs = build_pairs(data.terms, data.mentions, max_pairs_per_code=50)
    descriptions = set(data.terms["term_norm"])
    assert pairs
    assert any(p.text_a in descriptions or p.text_b in descriptions for p in pairs)
    # CIE-10 has one description per code: no pair is description-description
    assert not any(p.text_a in descriptions and p.text_b in descriptions
                   and p.text_a not in set(clean_mention_rows(data.mentions)["term_norm"])
                   and p.text_b not in set(clean_mention_rows(data.mentions)["term_norm"])
                   for p in pairs)
