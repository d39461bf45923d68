"""End-to-end through the command line: build-index then evaluate, on the shipped samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clinlinker_spark.cli import main
from clinlinker_spark.samples import sample_path
from tiny_models import make_tiny_encoder


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory, tiny_encoder_dir):
    out = tmp_path_factory.mktemp("cli") / "index"
    rc = main([
        "--log-level", "WARNING", "build-index", "--encoder", str(tiny_encoder_dir),
        "--out", str(out), "--name", "sample",
        "--source", f"codiesp={sample_path('codiesp_train_sample.tsv')}",
        "--labels", "DIAGNOSTICO",
    ])
    assert rc == 0
    return out


def test_build_index_then_evaluate_prints_table_and_json(sample_index, tiny_encoder_dir,
                                                           tmp_path, capsys):
    capsys.readouterr()
    json_out = tmp_path / "report.json"
    rc = main([
        "--log-level", "WARNING", "evaluate",
        "--gold", str(sample_path("codiesp_train_sample.tsv")), "--gold-format", "codiesp",
        "--labels", "DIAGNOSTICO", "--index", str(sample_index),
        "--encoder", str(tiny_encoder_dir), "--k", "1,5,25", "--json-out", str(json_out),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[tfidf+exact_prior]" in printed and "unseen_mentions" in printed
    report = json.loads(json_out.read_text())
    assert set(report["results"]) == {"dense", "dense+exact_prior", "tfidf", "tfidf+exact_prior"}
    for result in report["results"].values():
        # gold = the index's own training mentions: every gold text is in the index
        assert result["ceiling_clean"] == 1.0
        assert result["subsets"]["unseen_mentions"]["n"] == 0
    # with the prior, an indexed mention is found by exact text whatever the (random) model
    assert report["results"]["dense+exact_prior"]["subsets"]["clean"]["acc@25"] > 0.95
    assert report["results"]["tfidf+exact_prior"]["subsets"]["clean"]["acc@1"] > 0.8


def test_evaluate_with_reranker_reports_each_fusion(sample_index, tiny_encoder_dir,
                                                    tiny_cross_encoder_dir, tmp_path, caplog):
    json_out = tmp_path / "rerank.json"
    rc = main([
        "--log-level", "WARNING", "evaluate",
        "--gold", str(sample_path("codiesp_dev_sample.tsv")), "--gold-format", "codiesp",
        "--labels", "DIAGNOSTICO", "--index", str(sample_index),
        "--encoder", str(tiny_encoder_dir), "--reranker", str(tiny_cross_encoder_dir),
        "--rerank-top-n", "5", "--retriever", "dense", "--k", "1,5,10",
        "--json-out", str(json_out),
    ])
    assert rc == 0
    report = json.loads(json_out.read_text())
    rows = report["results"]
    assert {"dense+exact_prior+rerank", "dense+exact_prior+rerank_rrf"} <= set(rows)
    assert report["meta"]["rerank_top_n"] == 5 and report["meta"]["rrf_k"] == 60
    base = rows["dense+exact_prior"]["subsets"]["all"]
    for row in ("dense+exact_prior+rerank", "dense+exact_prior+rerank_rrf"):
        got = rows[row]["subsets"]["all"]
        # re-ordering inside the top 5 never changes which codes are in the top 5 or 10
        assert got["acc@5"] == base["acc@5"] and got["acc@10"] == base["acc@10"]
    rc = main(["evaluate", "--gold", str(sample_path("codiesp_dev_sample.tsv")),
               "--gold-format", "codiesp", "--index", str(sample_index),
               "--encoder", str(tiny_encoder_dir), "--fusion", "mean"])
    assert rc == 2 and "--fusion takes" in caplog.text


def test_evaluate_refuses_index_built_with_another_encoder(sample_index, tmp_path, caplog):
    other = make_tiny_encoder(tmp_path / "other", seed=7)
    rc = main(["evaluate", "--gold", str(sample_path("codiesp_dev_sample.tsv")),
               "--gold-format", "codiesp", "--index", str(sample_index),
               "--encoder", str(other), "--retriever", "dense"])
    assert rc == 2
    assert "EncoderMismatchError" in caplog.text and "model_hash" in caplog.text


def test_model_dir_that_is_not_a_model_is_a_clear_error(sample_index, tmp_path, caplog):
    rc = main(["evaluate", "--gold", str(sample_path("codiesp_dev_sample.tsv")),
               "--gold-format", "codiesp", "--index", str(sample_index),
               "--encoder", str(tmp_path), "--retriever", "dense"])
    assert rc == 2
    assert "ModelLoadError" in caplog.text and "config.json" in caplog.text


def test_python_dash_m_entry_point_lists_commands():
    out = subprocess.run([sys.executable, "-m", "clinlinker_spark", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for command in ("base-encoder", "build-index", "link", "evaluate"):
        assert command in out


def test_build_index_tunes_nprobe_with_mention_texts_and_logs_no_text(tiny_encoder_dir,
                                                                      tmp_path, caplog):
    import logging

    import pandas as pd

    dev = pd.read_csv(sample_path("codiesp_dev_sample.tsv"), sep="\t", header=None,
                      names=["doc", "label", "code", "text", "span"])
    mentions = tmp_path / "night.parquet"
    dev[["doc", "text"]].to_parquet(mentions)
    out = tmp_path / "ivf"
    with caplog.at_level(logging.INFO):
        rc = main([
            "build-index", "--encoder", str(tiny_encoder_dir), "--out", str(out),
            "--source", f"codiesp={sample_path('codiesp_train_sample.tsv')}",
            "--index-type", "ivf", "--recall-mentions", str(mentions),
            "--target-recall", "0.9", "--set", "linking.search_k=50",
        ])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    recall = manifest["recall"]
    assert recall["met"] and recall["recall"] >= 0.9 and recall["search_k"] == 50
    assert len(recall["tried"]) > 1 and recall["tried"][0]["recall"] < 0.9
    assert manifest["index"]["nprobe"] == recall["tried"][-1]["nprobe"]
    assert any("index recall@25" in r.getMessage() for r in caplog.records)
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    # the file paths the test chose are logged, and a short mention ('HV') can hide in a
    # checkout's folder name: they are taken out before the search, everything else stays
    samples = Path(sample_path("codiesp_train_sample.tsv")).parent
    for path in (tmp_path, tiny_encoder_dir, samples):
        logged = logged.replace(str(path), "")
    assert not [t for t in dev["text"] if t.lower() in logged.lower()]


@pytest.fixture(scope="module")
def sample_ranker(sample_index, tiny_encoder_dir, tmp_path_factory):
    """A ranker trained with `clinlinker train-ranker` for the sample index (2 folds)."""
    root = tmp_path_factory.mktemp("ranker")
    config = root / "train_ranker.yaml"
    config.write_text(f"""
encoder: {{path: "{tiny_encoder_dir}", device: cpu, num_threads: 1}}
index: {{path: "{sample_index}"}}
terminology:
  name: sample
  sources:
    - {{path: "{sample_path('codiesp_train_sample.tsv')}", format: codiesp,
       labels: [DIAGNOSTICO]}}
linking: {{retrievers: [dense, lexical], search_k: 20, top_k: 10}}
ranker: {{path: "{root / 'ranker'}", folds: 2, num_trees: 10, min_data_in_leaf: 5,
         num_threads: 1}}
""", encoding="utf-8")
    rc = main(["--log-level", "WARNING", "train-ranker", "--config", str(config)])
    assert rc == 0
    return root / "ranker"


def test_train_ranker_then_evaluate_reports_the_ranker_and_its_confidence(
        sample_index, sample_ranker, tiny_encoder_dir, tmp_path, capsys):
    spec = json.loads((sample_ranker / "ranker.json").read_text())
    assert spec["model_type"] == "lightgbm" and (sample_ranker / "model.txt").is_file()
    assert spec["trained_with"]["retrievers"] == ["dense", "lexical"]
    capsys.readouterr()
    json_out = tmp_path / "eval" / "report.json"
    rc = main([
        "--log-level", "WARNING", "evaluate",
        "--gold", str(sample_path("codiesp_dev_sample.tsv")), "--gold-format", "codiesp",
        "--labels", "DIAGNOSTICO", "--index", str(sample_index),
        "--encoder", str(tiny_encoder_dir), "--retriever", "dense,tfidf,hybrid",
        "--ranker", str(sample_ranker), "--target-precision", "0.9",
        "--category-chars", "3", "--k", "1,5,10", "--json-out", str(json_out),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[ranker]" in printed and "[ranker confidence]" in printed
    report = json.loads(json_out.read_text())
    rows = report["results"]
    assert set(rows) == {f"{r}{p}" for r in ("dense", "tfidf", "hybrid")
                         for p in ("", "+exact_prior")} | {"ranker"}
    assert report["meta"]["ranker"] == str(sample_ranker)
    for name, result in rows.items():
        category, exact = result["category"], result["subsets"]["all"]
        assert category["chars"] == 3 and category["n"] == exact["n"] == 334
        # a code right is its category right too
        assert all(category[f"acc@{k}"] >= exact[f"acc@{k}"] for k in (1, 5, 10)), name
        assert set(result["errors"]) == {"errors", "hierarchy", "same_category",
                                         "gold_not_in_index"}
    confidence = report["confidence"]
    assert confidence["mentions"] == 334
    assert confidence["accuracy"] == rows["ranker"]["subsets"]["all"]["acc@1"]
    assert 0.0 <= confidence["ece"] <= 1.0 and confidence["target_precision"] == 0.9
    assert [row["threshold"] for row in confidence["at_thresholds"]][0] == 0.3
    assert "threshold_for_target" in confidence
    assert confidence["picked_on_training_folds"] == spec["thresholds"]["0.9"]
    assert len(confidence["curve"]) == 101
    png = json_out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
