from __future__ import annotations

import pytest

from clinlinker_spark.config import JobConfig, load_config, to_dict
from clinlinker_spark.errors import ConfigError
from clinlinker_spark.text import normalize_code, normalize_text


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_load_config_with_overrides(tmp_path):
    p = write(tmp_path, """
encoder: {path: /models/e5, pooling: cls}
linking: {top_k: 10}
terminology:
  name: icd
  sources:
    - {path: a.csv, format: cie10, min_level: 3}
    - {path: gold/, format: codiesp, labels: [DIAGNOSTICO]}
spark: {conf: {spark.executor.memory: 8g}}
""")
    cfg = load_config(p, ["linking.top_k=50", "encoder.prefix=query: ", "index.fp16=true"])
    assert isinstance(cfg, JobConfig)
    assert cfg.encoder.pooling == "cls" and cfg.encoder.prefix == "query: "
    assert cfg.linking.top_k == 50 and cfg.index.fp16 is True
    assert cfg.terminology.sources[1].labels == ("DIAGNOSTICO",)
    assert cfg.terminology.sources[0].min_level == 3
    assert cfg.spark.conf == {"spark.executor.memory": "8g"}
    assert to_dict(cfg)["terminology"]["sources"][0]["format"] == "cie10"
    with pytest.raises(Exception):
        cfg.linking.top_k = 3  # frozen


@pytest.mark.parametrize("text,match", [
    ("encoder: {poolin: cls}", r"unknown key\(s\) encoder.poolin"),
    ("encoder: {pooling: max}", "encoder.pooling must be one of"),
    ("linking: {top_k: many}", "linking.top_k must be an integer"),
    ("linking: {top_k: 300}", "top_k must be <= linking.search_k"),
    ("index: {fp16: 1}", "index.fp16 must be true or false"),
    ("index: {fp16: true, sq8: true}", "index.fp16, index.sq8 and index.pq .* choose one"),
    ("index: {pq: true}", "index.pq needs index.index_type: ivf"),
    ("terminology: {sources: [{format: cie10}]}", "path"),
    ("- a\n- b", "mapping at the top level"),
    ("linking: {retrievers: [lexical]}", r"linking.retrievers is \[dense\] or \[dense, lexical\]"),
    ("linking: {retrievers: [dense, bm25]}", "linking.retrievers is"),
    ("linking: {retrievers: [dense, dense]}", "linking.retrievers is"),
    ("linking: {review_below: 1.5}", "review_below is a probability"),
    ("linking: {lexical_k: -1}", "lexical_k must be >= 0"),
    ("ranker: {folds: 1}", "ranker.folds must be >= 2"),
    ("ranker: {model: xgboost}", "ranker.model must be one of"),
    ("ranker: {num_trees: 0}", "ranker.num_trees must be > 0"),
    ("ranker: {target_precisions: [0.9, 1.0]}", r"precisions in \(0, 1\)"),
    ("terminology: {sources: [{format: icd10}]}", "format must be one of"),
    ("terminology: {sources: [{format: table}]}", "path is required"),
    ("spark: {broadcast_rows: -1}", r"spark.broadcast_rows must be >= 0"),
    ("spark: {broadcast_result_forms: -5}", r"spark.broadcast_result_forms must be >= 0"),
    ("spark: {min_forms_per_task: 0}", r"spark.min_forms_per_task must be > 0"),
    ("spark: {rows_per_prepare_task: 0}", r"spark.rows_per_prepare_task must be > 0"),
    ("spark: {linkers_per_worker: 0}", r"spark.linkers_per_worker must be > 0"),
    ("output: {rows_per_file: 0}", r"output.rows_per_file must be > 0"),
])
def test_invalid_configs_are_clear_errors(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_ranker_hybrid_and_icd10cm_settings(tmp_path):
    p = write(tmp_path, """
terminology:
  sources:
    - {format: icd10cm, inclusion_terms: false}
    - {path: codes.csv, format: table, parent_column: parent}
linking: {retrievers: [dense, lexical], lexical_k: 50, review_below: 0.7}
ranker: {path: artifacts/ranker, folds: 3, model: logistic, target_precisions: [0.9]}
""")
    cfg = load_config(p, ["ranker.num_trees=40"])
    icd, table = cfg.terminology.sources
    assert (icd.format, icd.path, icd.inclusion_terms) == ("icd10cm", "", False)
    assert table.parent_column == "parent"
    assert cfg.linking.retrievers == ("dense", "lexical") and cfg.linking.lexical_k == 50
    assert cfg.linking.review_below == 0.7
    assert (cfg.ranker.folds, cfg.ranker.model, cfg.ranker.num_trees) == (3, "logistic", 40)
    assert cfg.ranker.target_precisions == (0.9,)
    default = load_config(None)
    assert default.linking.retrievers == ("dense",) and default.linking.review_below == 0.0
    assert default.ranker.path == ""


def test_bad_overrides_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["linking.top_k"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["linking.topk=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_normalize_text():
    assert normalize_text("  Insuficiencia\u00a0CARDÍACA\n\tcongestiva ") == (
        "insuficiencia cardíaca congestiva")
    decomposed = "cardi\u0301aca"  # i + combining acute accent
    assert normalize_text(decomposed) == normalize_text("cardíaca")
    assert normalize_text("ＤＭ２") == "dm2"  # full-width forms (NFKC)
    assert normalize_text("úlcera") != normalize_text("ulcera")  # accents are kept
    with pytest.raises(TypeError):
        normalize_text(None)


def test_normalize_code():
    assert normalize_code(" E11.9 ") == normalize_code("e119") == "e119"
    assert normalize_code("73211009") == "73211009"


def test_the_shipped_train_ranker_config_loads():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "conf" / "train_ranker.yaml")
    assert cfg.ranker.path and cfg.ranker.folds >= 2
    assert cfg.linking.retrievers == ("dense", "lexical")
    formats = [s.format for s in cfg.terminology.sources]
    assert "icd10cm" in formats and "codiesp" in formats
