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
])
def test_invalid_configs_are_clear_errors(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


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
