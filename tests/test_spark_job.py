"""The Spark batch job on local[2]: same answers as the core linker, exactly one row per
mention in a real Delta table, idempotent reruns, retried tasks, bad rows, early failures and
incremental runs. Tiny random-weight models (built in the tests) and real mentions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from clinlinker_spark.config import (
    IndexConfig, JobConfig, RankerConfig, SparkConfig, TableRef, TerminologyConfig,
    TerminologySourceConfig, load_config,
)
from clinlinker_spark.corpora import read_gold
from clinlinker_spark.encoder import BiEncoder
from clinlinker_spark.errors import (
    ArtifactError, ConfigError, EncoderMismatchError, InputDataError,
)
from clinlinker_spark.index import TerminologyIndex, build_index, read_manifest
from clinlinker_spark.linker import Linker
from clinlinker_spark.ranker import ranker_hash
from clinlinker_spark.samples import sample_path
from clinlinker_spark.text import normalize_code, normalize_text
from clinlinker_spark.terminology import load_terminology, terms_from_mentions
from clinlinker_spark.training.ranker import train_ranker

pytestmark = pytest.mark.spark

TEST_SPARK = SparkConfig(
    master="local[2,2]",  # 2 threads, 2 attempts per task (retries, for the failure test)
    app_name="clinlinker-tests",
    shuffle_partitions=2,
    arrow_batch_size=64,  # several Arrow batches per task
    driver_memory="2g",
)


@pytest.fixture(autouse=True)
def small_arrow_batches(spark):
    """Several Arrow batches per task (the job's UDFs must handle batch boundaries)."""
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    saved = spark.conf.get(key, None)
    spark.conf.set(key, str(TEST_SPARK.arrow_batch_size))
    yield
    if saved is None:
        spark.conf.unset(key)
    else:
        spark.conf.set(key, saved)


# --------------------------------------------------------------------------------------------
# Artifacts and data


# Spanish ICD-10 (level >= 2) + CodiEsp train sample mentions, as conf/local.yaml
SAMPLE_TERMINOLOGY = TerminologyConfig(sources=(
    TerminologySourceConfig(path=str(sample_path("cie10_es.csv")), format="cie10"),
    TerminologySourceConfig(path=str(sample_path("codiesp_train_sample.tsv")),
                            format="codiesp", labels=("DIAGNOSTICO", "PROCEDIMIENTO")),
))
# Both retrievers: the candidates are the union of the dense and the lexical ones. One text
# (one pair) per encoder (cross-encoder) batch: a vector's (a logit's) last bits move with
# what is encoded with it, and the union's order (linker.hybrid_candidates) and the ranker's
# rank features compare raw scores, so near-equal candidates (the tiny models give many texts
# one vector) could swap between the job's batches and the core linker's one call.
HYBRID = ("linking.retrievers=[dense, lexical]", "encoder.batch_size=1",
          "reranker.batch_size=1")
MENTION_COLUMNS = ["mention_id", "doc_id", "start", "end", "text", "label"]


@pytest.fixture(scope="module", autouse=True)
def spark_task_threads():
    """The core linker of these tests computes with the threads of one Spark task
    (spark.task.cpus is 1 here; clinlinker_spark.spark.udfs sets a task's torch and FAISS
    threads to it). torch splits its sums by thread count, so with another count the tiny
    models' vectors and logits differ in their last bits (up to 9e-8 and 4e-7 measured between
    1 and 2 threads), and a ranker trained on the tiny models' crowded scores may split between
    two such values: a mention's ranker score would move."""
    import faiss
    import torch

    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_before)
    faiss.omp_set_num_threads(faiss_before)


@pytest.fixture(scope="module")
def sample_terminology() -> pd.DataFrame:
    return load_terminology(SAMPLE_TERMINOLOGY)


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory, tiny_encoder_dir, sample_terminology) -> Path:
    encoder = BiEncoder(tiny_encoder_dir, device="cpu")
    return build_index(sample_terminology, encoder, IndexConfig(),
                       tmp_path_factory.mktemp("indexes") / "cie10-codiesp-sample",
                       name="sample")


@pytest.fixture(scope="module")
def dev_mentions() -> pd.DataFrame:
    """430 real CodiEsp-X dev mentions shipped with the package."""
    return read_gold(sample_path("codiesp_dev_sample.tsv"), "codiesp")


def job_config(tmp_path: Path, encoder: Path, index: Path, *overrides: str,
               reranker: Path | None = None) -> JobConfig:
    sets = [
        f"encoder.path={encoder}", "encoder.device=cpu", "encoder.batch_size=32",
        f"index.path={index}", "build_missing=false",
        f"reranker.path={reranker or ''}", "reranker.device=cpu", "reranker.top_n=10",
        "linking.search_k=50", "linking.top_k=10",
        f"input.path={sample_path('codiesp_dev_sample.tsv')}", "input.format=codiesp",
        "input.passthrough_columns=[spans, gold_code]",
        f"output.path={tmp_path / 'code_assignments'}", "output.incremental=false",
        *overrides,
    ]
    config = load_config(None, sets)
    return dataclasses.replace(config, spark=TEST_SPARK)


def with_ranker(config: JobConfig, ranker: Path) -> JobConfig:
    """``config`` with the ranker directory ``ranker`` (trained, or to train with
    build_missing: 2 folds, 20 trees) and the terminology the sample index was built from,
    whose CodiEsp mentions the ranker learns from."""
    return dataclasses.replace(config, terminology=SAMPLE_TERMINOLOGY, ranker=RankerConfig(
        path=str(ranker), folds=2, num_trees=20, min_data_in_leaf=5))


def trained_ranker(tmp_path_factory, encoder: Path, index: Path,
                   reranker: Path | None = None) -> Path:
    """A ranker trained with ``train_ranker`` for the hybrid retrievers (and ``reranker``)."""
    out = tmp_path_factory.mktemp("rankers") / "ranker"
    config = job_config(tmp_path_factory.mktemp("ranker-job"), encoder, index, *HYBRID,
                        reranker=reranker)
    train_ranker(with_ranker(config, out), out)
    return out


@pytest.fixture(scope="module")
def hybrid_ranker(tmp_path_factory, tiny_encoder_dir, sample_index) -> Path:
    return trained_ranker(tmp_path_factory, tiny_encoder_dir, sample_index)


@pytest.fixture(scope="module")
def reranked_ranker(tmp_path_factory, tiny_encoder_dir, tiny_cross_encoder_dir,
                    sample_index) -> Path:
    """A ranker that also reads the cross-encoder's scores."""
    return trained_ranker(tmp_path_factory, tiny_encoder_dir, sample_index,
                          tiny_cross_encoder_dir)


def review_threshold(linker: Linker, mentions: pd.DataFrame) -> float:
    """A ``linking.review_below`` that sends some of the links of ``mentions``, not all, to
    review: the middle one of their distinct confidences."""
    values = sorted(set(linker.link(mentions)["confidence"].dropna()))
    assert len(values) > 1, "the ranker gives every mention the same confidence"
    return float(values[len(values) // 2])


def with_review_below(config: JobConfig, threshold: float) -> JobConfig:
    return dataclasses.replace(config, linking=dataclasses.replace(config.linking,
                                                                   review_below=threshold))


def read_table(path: Path | str) -> pd.DataFrame:
    """The Delta table as pandas, read with delta-rs (independently of Spark)."""
    from deltalake import DeltaTable

    return DeltaTable(str(path)).to_pandas()


def data_files(path: Path | str) -> int:
    """How many data files the table's latest version has."""
    from deltalake import DeltaTable

    return len(DeltaTable(str(path)).file_uris())


def table_version(path: Path | str) -> int:
    from deltalake import DeltaTable

    return int(DeltaTable(str(path)).version())


def _same_optional(got, want, tolerance: float) -> bool:
    """Two optional scores agree: both missing (None or NaN), or within ``tolerance``."""
    missing_g = got is None or (isinstance(got, float) and math.isnan(got))
    missing_w = want is None or (isinstance(want, float) and math.isnan(want))
    if missing_g or missing_w:
        return missing_g and missing_w
    return abs(got - want) <= tolerance


def assert_matches_core(table: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Every mention's status, best code, score, confidence and top-k (codes in order, every
    score of each candidate) equal the core linker's."""
    got = table.set_index("mention_id")
    want = expected.set_index("mention_id")
    assert sorted(got.index) == sorted(want.index)
    mismatches = []
    for mention_id, row in want.iterrows():
        g = got.loc[mention_id]
        cands_g = list(g["candidates"])
        cands_w = list(row["candidates"])
        codes_g = [c["code"] for c in cands_g]
        codes_w = [c["code"] for c in cands_w]
        if (g["status"], g["code"], codes_g) != (row["status"], row["code"], codes_w):
            mismatches.append(mention_id)
            continue
        for cg, cw in zip(cands_g, cands_w):
            assert cg["term"] == cw["term"]
            assert cg["retrieval_score"] == pytest.approx(cw["retrieval_score"], abs=1e-5)
            assert _same_optional(cg["rerank_score"], cw["rerank_score"], 1e-4)
            assert _same_optional(cg["lexical_score"], cw["lexical_score"], 1e-5)
            assert _same_optional(cg["ranker_score"], cw["ranker_score"], 1e-5)
        assert _same_optional(g["score"], row["score"], 1e-5)
        assert _same_optional(g["confidence"], row["confidence"], 1e-6)
        assert g["reason"] == row["reason"]
    assert not mismatches, f"{len(mismatches)} mention(s) differ from the core linker, e.g. " \
        f"{mismatches[:5]}"


def run_job(spark, config: JobConfig, **kwargs) -> dict:
    """The job's summary as its JSON gives it."""
    from clinlinker_spark.spark.pipeline import LinkSummary, run_link_job

    summary = run_link_job(spark, config, **kwargs)
    assert isinstance(summary, LinkSummary)
    as_json = json.loads(summary.to_json())
    assert as_json == summary.to_dict()
    return as_json


# the prepare stage searches the table and the form cache with the input's keys broadcast (a
# small input: every test input here by default) or with one left join of the input with each
# (a large input)
PREPARE_PATHS = ["spark-broadcast", "spark-left-join"]


def use_spark(monkeypatch, **changes) -> None:
    """The configs :func:`job_config` builds get these ``spark`` settings."""
    monkeypatch.setattr(sys.modules[__name__], "TEST_SPARK",
                        dataclasses.replace(TEST_SPARK, **changes))


def use_prepare(monkeypatch, path: str) -> None:
    """The job takes the prepare ``path``: with ``spark.broadcast_rows`` 0 no key is
    broadcast (the table, the form cache and the MERGE's table files are joined)."""
    if path == "spark-left-join":
        use_spark(monkeypatch, broadcast_rows=0)


# --------------------------------------------------------------------------------------------
# (a) + (b): same top-k as the core linker, one row per mention


# the forms' results reach their mentions by a broadcast join (few forms) or a shuffle join
# both prepare paths
@pytest.mark.parametrize("with_reranker,result_join,prepare",
                         [(False, "broadcast", "spark-broadcast"),
                          (False, "shuffle", "spark-left-join"),
                          (True, "broadcast", "spark-broadcast")],
                         ids=["retrieval", "retrieval-shuffle-joins", "reranked"])
def test_job_matches_core_linker_on_package_samples(
    spark, tmp_path, tiny_encoder_dir, tiny_cross_encoder_dir, sample_index, dev_mentions,
    with_reranker, result_join, prepare, monkeypatch,
):
    if result_join == "shuffle":
        use_spark(monkeypatch, broadcast_result_forms=0)
    use_prepare(monkeypatch, prepare)
    reranker = tiny_cross_encoder_dir if with_reranker else None
    config = job_config(tmp_path, tiny_encoder_dir, sample_index, "output.writer=deltalake",
                        reranker=reranker)
    summary = run_job(spark, config, run_id="run-a")

    table = read_table(config.output.path)
    assert len(table) == len(dev_mentions) == table["mention_id"].nunique()
    assert summary["rows_written"] == len(dev_mentions)
    assert summary["mentions"] == len(dev_mentions)
    assert sum(summary["counts_by_status"].values()) == len(dev_mentions)
    assert summary["surface_forms"] < len(dev_mentions)  # de-duplicated
    assert ("rerank" in summary["timings_s"]) is with_reranker

    expected = Linker.from_config(config).link(dev_mentions)
    assert_matches_core(table, expected)
    # a form that is a term of the index (built in fp32, as the job encodes) took the term's
    # vector; the others were encoded
    index = TerminologyIndex.load(sample_index)
    forms = set(expected.loc[expected["status"] != "invalid_input", "text_norm"])
    reused = sum(index.position_of(f) >= 0 for f in forms)
    assert 0 < reused < len(forms) == summary["surface_forms"]
    assert summary["vectors"] == {"texts_encoded": len(forms) - reused,
                                  "vectors_reused": reused}
    # lineage and pass-through columns
    linker_versions = Linker.from_config(config).versions
    for name, value in linker_versions.items():
        assert set(table[name]) == {value}
    assert set(table["run_id"]) == {"run-a"}
    run_ts = pd.Timestamp(table["run_ts"].iloc[0])
    run_ts = run_ts.tz_localize("UTC") if run_ts.tzinfo is None else run_ts
    assert table["run_ts"].nunique() == 1
    assert abs(pd.Timestamp(summary["run_ts"]) - run_ts) < pd.Timedelta(seconds=1)
    by_id = dev_mentions.set_index("mention_id")
    row = table.iloc[0]
    assert row["gold_code"] == by_id.loc[row["mention_id"], "code"]
    assert row["text"] == by_id.loc[row["mention_id"], "text"]
    assert len(table.iloc[0]["candidates"]) == config.linking.top_k


@pytest.mark.parametrize("with_reranker", [False, True], ids=["ranker", "reranker-ranker"])
def test_hybrid_retrievers_and_a_ranker_give_the_core_linkers_rows(
    spark, tmp_path, tiny_encoder_dir, tiny_cross_encoder_dir, sample_index, dev_mentions,
    request, with_reranker,
):
    # with a re-ranker, the retrieval stage hands the re-rank stage every candidate of both
    # retrievers (up to 2 * top_k codes), and the ranker orders them and cuts them there
    ranker = request.getfixturevalue("reranked_ranker" if with_reranker else "hybrid_ranker")
    config = with_ranker(job_config(tmp_path, tiny_encoder_dir, sample_index, *HYBRID,
                                    reranker=tiny_cross_encoder_dir if with_reranker else None),
                         ranker)
    summary = run_job(spark, config, run_id="hybrid")
    table = read_table(config.output.path)
    assert len(table) == len(dev_mentions) == table["mention_id"].nunique()

    core = Linker.from_config(config)
    assert core.hybrid and core.ranker is not None
    expected = core.link(dev_mentions)
    assert_matches_core(table, expected)
    assert summary["ranker_version"] == ranker_hash(ranker) == core.versions["ranker_version"]
    assert set(table["ranker_version"]) == {summary["ranker_version"]}
    assert summary["counts_by_status"] == {
        s: int((table["status"] == s).sum()) for s in summary["counts_by_status"]}
    assert summary["udf_task_seconds"]["rank"] > 0 and summary["udf_task_seconds"]["lexical"] > 0
    # every candidate scored by both retrievers and the ranker, in the ranker's order, cut to
    # top_k; the confidence is a probability
    found = table[table["status"] != "invalid_input"]
    assert found["confidence"].between(0.0, 1.0).all()
    for cands, score in zip(found["candidates"], found["score"]):
        cands = list(cands)
        assert 0 < len(cands) <= config.linking.top_k
        assert all(c["lexical_score"] is not None for c in cands)
        ranked = [c["ranker_score"] for c in cands]
        assert ranked == sorted(ranked, reverse=True) and score == pytest.approx(ranked[0])
    reranked = [c["rerank_score"] for cs in found["candidates"] for c in cs]
    assert any(r is not None and not math.isnan(r) for r in reranked) is with_reranker
    # the retrieval order cut to top_k would not give these lists: the ranker saw the union
    dense_cut = Linker.from_config(dataclasses.replace(config, ranker=RankerConfig(),
                                                       reranker=dataclasses.replace(
                                                           config.reranker, path="")))
    unranked = dense_cut.link(dev_mentions).set_index("mention_id")["candidates"]
    assert any({c["code"] for c in cs} != {c["code"] for c in unranked[m]}
               for m, cs in zip(table["mention_id"], table["candidates"]) if len(cs))


def test_a_missing_ranker_is_trained_on_the_driver_with_build_missing(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions, reranked_ranker, caplog,
):
    import logging

    small = dev_mentions.iloc[:60]
    missing = tmp_path / "ranker"
    config = with_ranker(job_config(tmp_path, tiny_encoder_dir, sample_index, *HYBRID,
                                    "input.passthrough_columns=[]"), missing)
    mentions = spark.createDataFrame(small[MENTION_COLUMNS])
    # without build_missing a missing ranker, and a ranker the job cannot use (it reads the
    # cross-encoder's score; the job has no re-ranker), fail before any Spark job
    spark.sparkContext.setJobGroup("ranker-errors", "test")
    try:
        with pytest.raises(ArtifactError, match="no ranker at"):
            run_job(spark, config, mentions=mentions)
        with pytest.raises(ConfigError, match="cross-encoder"):
            run_job(spark, with_ranker(config, reranked_ranker), mentions=mentions)
    finally:
        spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)
    assert _jobs_in_group(spark, "ranker-errors") == []
    assert not Path(config.output.path).exists() and not missing.exists()

    with caplog.at_level(logging.INFO):
        summary = run_job(spark, dataclasses.replace(config, build_missing=True),
                          mentions=mentions)
    assert (missing / "ranker.json").is_file()
    assert summary["ranker_version"] == ranker_hash(missing)
    assert_matches_core(read_table(config.output.path), Linker.from_config(config).link(small))
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any(m.startswith("ranker trained: 2010 training mentions") for m in messages)
    # counts only: no mention text (of the input or of the training mentions) is logged
    training = read_gold(sample_path("codiesp_train_sample.tsv"), "codiesp")
    texts = {t for t in set(small["text"]) | set(training["text"]) if len(t) >= 10}
    assert not [m for m in messages if any(t in m for t in texts)]


@pytest.mark.realdata
def test_job_matches_core_linker_on_distemist(
    spark, tmp_path, shared_data, tiny_encoder_dir, tiny_cross_encoder_dir,
):
    folder = shared_data / "distemist" / "training" / "subtrack2_linking"
    index_mentions = read_gold(folder / "distemist_subtrack2_training2_linking.tsv", "distemist")
    encoder = BiEncoder(tiny_encoder_dir, device="cpu")
    index = build_index(terms_from_mentions(index_mentions), encoder, IndexConfig(),
                        tmp_path / "distemist-index")
    mentions = read_gold(folder / "distemist_subtrack2_training1_linking.tsv",
                         "distemist").head(300)
    parquet = tmp_path / "mentions.parquet"
    mentions.drop(columns=["codes"]).to_parquet(parquet, index=False)
    config = job_config(tmp_path, tiny_encoder_dir, index, f"input.path={parquet}",
                        "input.format=parquet", "input.passthrough_columns=[code]",
                        reranker=tiny_cross_encoder_dir)
    with pytest.raises(Exception, match="clash with output columns"):
        run_job(spark, config)  # "code" would collide with the predicted code
    config = dataclasses.replace(config, input=dataclasses.replace(
        config.input, passthrough_columns=("semantic_rel",)))
    run_job(spark, config)
    table = read_table(config.output.path)
    assert len(table) == len(mentions) == table["mention_id"].nunique()
    assert_matches_core(table, Linker.from_config(config).link(mentions))


def test_needs_review_rows_reach_the_table_and_variables_ignore_them_unless_asked(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions, hybrid_ranker,
):
    import yaml

    from clinlinker_spark.commands.link import (
        format_gold, format_rows, gold_agreement, preview_rows,
    )
    from clinlinker_spark.spark.variables_job import run_variables_job
    from clinlinker_spark.spark.writer import read_delta
    from clinlinker_spark.variables import (
        AssignmentsTableConfig, VariablesJobConfig, VariablesOutputConfig,
    )

    base = with_ranker(job_config(tmp_path, tiny_encoder_dir, sample_index, *HYBRID),
                       hybrid_ranker)
    core = Linker.from_config(base)
    threshold = review_threshold(core, dev_mentions)
    config = with_review_below(base, threshold)
    summary = run_job(spark, config, run_id="review")
    table = read_table(config.output.path)
    assert_matches_core(table, core.with_linking(config.linking).link(dev_mentions))
    review = table[table["status"] == "needs_review"]
    linked = table[table["status"] == "linked"]
    assert len(review) and len(linked)
    assert summary["counts_by_status"]["needs_review"] == len(review)
    # a needs_review row keeps its code, candidates and confidence
    assert (review["confidence"] < threshold).all() and (linked["confidence"] >= threshold).all()
    assert all(r["code"] == r["candidates"][0]["code"] and r["term"] == r["candidates"][0]["term"]
               for _, r in review.iterrows())
    assert review["reason"].str.contains("linking.review_below").all()

    # the variables job: the same codes, with and without needs_review rows
    codes = sorted(set(review["code"]))[:8]
    defs = tmp_path / "defs.yaml"
    defs.write_text(yaml.safe_dump({"variables": [
        {"name": "strict", "codes": codes},
        {"name": "lenient", "codes": codes, "include_needs_review": True}]}), encoding="utf-8")
    variables = VariablesJobConfig(
        assignments=AssignmentsTableConfig(path=config.output.path), definitions=(str(defs),),
        output=VariablesOutputConfig(path=str(tmp_path / "variables")))
    counted = run_variables_job(spark, variables)
    assert counted["assignments"]["needs_review"] == len(review)
    evidence = {name: set() for name in ("strict", "lenient")}
    for row in read_table(variables.output.path).itertuples():
        evidence[row.variable] |= {e["mention_id"] for e in row.evidence}
    keys = {normalize_code(c) for c in codes}
    with_code = table[table["code"].map(lambda c: c is not None and normalize_code(c) in keys)]
    assert evidence["strict"] == set(with_code.loc[with_code["status"] == "linked",
                                                   "mention_id"])
    assert evidence["lenient"] == set(with_code["mention_id"])
    assert evidence["lenient"] - evidence["strict"] == set(
        with_code.loc[with_code["status"] == "needs_review", "mention_id"]) != set()

    # clinlinker link's preview: linked and needs_review rows with their confidence and gold
    # code, then the run's accuracy@1 against the gold codes
    written = read_delta(spark, config.output.path)
    shown = preview_rows(written, "review", 1000)
    assert {r["status"] for r in shown} == {"linked", "needs_review"}
    assert len(shown) == len(review) + len(linked)
    assert all(r["confidence"] is not None and "gold_code" in r for r in shown)
    assert "(needs_review)" in format_rows(shown) and "; gold " in format_rows(shown)
    gold = gold_agreement(written, "review")
    has_gold = table[table["gold_code"].notna() & (table["gold_code"].str.strip() != "")]
    right = sum(c is not None and normalize_code(c) == normalize_code(g)
                for c, g in zip(has_gold["code"], has_gold["gold_code"]))
    assert gold == {"rows": len(has_gold), "correct": right,
                    "needs_review": int((has_gold["status"] == "needs_review").sum())}
    assert 0 < right < len(has_gold)
    assert f"accuracy@1 {right / len(has_gold):.3f}" in format_gold(gold)
    assert gold_agreement(written.drop("gold_code"), "review") is None
    assert gold_agreement(written, "another-run")["rows"] == 0


# --------------------------------------------------------------------------------------------
# (c) reruns, (d) a retried task


def test_rerun_replaces_rows_and_adds_one_version(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions,
):
    config = job_config(tmp_path, tiny_encoder_dir, sample_index)
    first = run_job(spark, config, run_id="first")
    before = read_table(config.output.path)
    version = table_version(config.output.path)
    second = run_job(spark, config, run_id="second")
    after = read_table(config.output.path)

    assert table_version(config.output.path) == version + 1
    assert (first["table_version"], second["table_version"]) == (version, version + 1)
    assert second["rows_replaced"] == len(dev_mentions)
    assert len(after) == after["mention_id"].nunique() == len(dev_mentions)
    assert set(after["run_id"]) == {"second"}
    columns = [c for c in before.columns if c not in ("run_id", "run_ts")]
    key = "mention_id"
    pd.testing.assert_frame_equal(
        before[columns].sort_values(key).reset_index(drop=True).astype(str),
        after[columns].sort_values(key).reset_index(drop=True).astype(str),
    )


def test_link_mentions_gives_the_rows_the_job_writes_and_writes_nothing(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions,
):
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.mentions import read_mentions
    from clinlinker_spark.spark.pipeline import link_mentions

    config = job_config(tmp_path, tiny_encoder_dir, sample_index)
    mentions = read_mentions(spark, config.input).persist()
    # a duplicated id and an empty text: the job's row rules hold in the transform too
    first = mentions.limit(1)
    empty = (first.withColumn("mention_id", F.concat(F.col("mention_id"), F.lit("-empty")))
             .withColumn("text", F.lit("")))
    extra = first.unionByName(empty)
    df = mentions.unionByName(extra).persist()  # the same rows at every read
    looked = link_mentions(df, config, run_id="look").toPandas()
    assert not Path(config.output.path).exists()  # nothing written
    run_job(spark, config, run_id="look", mentions=df)
    table = read_table(config.output.path)
    assert list(looked.columns) == list(table.columns)
    assert len(looked) == len(table) == len(dev_mentions) + 1
    columns = [c for c in table.columns if c != "run_ts"]
    pd.testing.assert_frame_equal(
        looked[columns].sort_values("mention_id").reset_index(drop=True).astype(str),
        table[columns].sort_values("mention_id").reset_index(drop=True).astype(str))
    by_status = looked["status"].value_counts()
    assert by_status["invalid_input"] == 2 and by_status.get("linked", 0) > 0
    df.unpersist()
    mentions.unpersist()


def fail_once_after_first_batch(monkeypatch, marker: Path) -> None:
    """The retrieval UDF of the jobs this test runs fails once: the first task attempt that
    creates ``marker`` raises after emitting its first batch, and Spark retries the task. The
    wrapper is a closure, so Spark ships it by value to the Python workers."""
    from clinlinker_spark.spark import udfs

    real = udfs.make_retrieve_fn
    path = str(marker)

    def failing_retrieve_fn(spec, stage_seconds=None):
        run = real(spec, stage_seconds)

        def run_once_failing(batches):
            import os

            for batch in run(batches):
                yield batch
                try:
                    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                raise RuntimeError("injected task failure after the first batch")

        return run_once_failing

    monkeypatch.setattr(udfs, "make_retrieve_fn", failing_retrieve_fn)


@pytest.mark.parametrize("writer", [
    "deltalake", pytest.param("delta-spark", marks=pytest.mark.delta_spark)])
def test_a_failed_task_is_retried_and_each_mention_written_once(
    request, spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions, monkeypatch,
    writer,
):
    # the one session fixture (conftest.py) retries tasks: a session that does not would
    # leave the retry untested, so it fails here instead of skipping
    assert re.fullmatch(r"local\[(\d+|\*),\s*([2-9]|\d\d+)\]", spark.sparkContext.master), \
        f"master {spark.sparkContext.master} does not retry failed tasks"
    if writer == "delta-spark":
        request.getfixturevalue("delta_spark")
    # without surface-form de-duplication (every mention goes through the UDF), so that this
    # run also checks that path against the core linker
    config = job_config(tmp_path, tiny_encoder_dir, sample_index, f"output.writer={writer}")
    config = dataclasses.replace(config, spark=dataclasses.replace(
        TEST_SPARK, dedupe_surface_forms=False))
    marker = tmp_path / "failed-once"
    fail_once_after_first_batch(monkeypatch, marker)
    summary = run_job(spark, config)
    assert marker.exists(), "the injected failure did not happen"
    table = read_table(config.output.path)
    assert len(table) == table["mention_id"].nunique() == len(dev_mentions)
    assert summary["rows_written"] == len(dev_mentions)
    assert summary["surface_forms"] == len(dev_mentions)  # no de-duplication
    assert_matches_core(table, Linker.from_config(config).link(dev_mentions))
    assert summary["writer"] == writer


# --------------------------------------------------------------------------------------------
# delta-spark (Databricks' and Spark clusters' writer) and catalog tables by name


def sorted_rows(table: pd.DataFrame, drop: tuple[str, ...] = ("run_ts",)) -> pd.DataFrame:
    columns = sorted(c for c in table.columns if c not in drop)
    return table[columns].sort_values("mention_id").reset_index(drop=True).astype(str)


def test_delta_spark_writes_the_rows_of_the_deltalake_writer_and_a_rerun_adds_a_version(
    delta_spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions,
):
    spark = delta_spark
    lake = job_config(tmp_path / "lake", tiny_encoder_dir, sample_index,
                      "output.writer=deltalake")
    dspark = job_config(tmp_path / "dspark", tiny_encoder_dir, sample_index,
                        "output.writer=delta-spark")
    assert run_job(spark, lake, run_id="same")["writer"] == "deltalake"
    first = run_job(spark, dspark, run_id="same")
    assert (first["writer"], first["table_version"]) == ("delta-spark", 0)
    assert (tmp_path / "dspark" / "code_assignments" / "_delta_log").is_dir()
    # delta-rs reads what delta-spark wrote: the same rows, column for column
    written = read_table(dspark.output.path)
    pd.testing.assert_frame_equal(sorted_rows(written), sorted_rows(read_table(lake.output.path)))
    assert len(written) == len(dev_mentions)

    again = run_job(spark, dspark, run_id="again")
    assert (again["table_version"], again["rows_replaced"]) == (1, len(dev_mentions))
    rerun = read_table(dspark.output.path)
    assert set(rerun["run_id"]) == {"again"}
    pd.testing.assert_frame_equal(sorted_rows(rerun, ("run_ts", "run_id")),
                                  sorted_rows(written, ("run_ts", "run_id")))


def write_catalog_table(spark, df: pd.DataFrame, name: str) -> None:
    spark.createDataFrame(df).write.format("delta").saveAsTable(name)


def test_delta_spark_catalog_tables_by_name_evolve_and_feed_the_form_cache(
    delta_spark, catalog_schema, tmp_path, tiny_encoder_dir, sample_index, dev_mentions,
):
    spark = delta_spark
    old, new = dev_mentions.iloc[:380], dev_mentions.iloc[380:]
    write_catalog_table(spark, old[MENTION_COLUMNS], f"{catalog_schema}.night_1")
    # the second night's mentions bring a column the table has not seen
    write_catalog_table(spark, new[MENTION_COLUMNS + ["code"]].rename(
        columns={"code": "gold_code"}), f"{catalog_schema}.night_2")
    output, cache = f"{catalog_schema}.code_assignments", f"{catalog_schema}.form_cache"

    def config(night: int, *sets: str) -> JobConfig:
        return job_config(tmp_path, tiny_encoder_dir, sample_index, "input.path=",
                          f"input.table={catalog_schema}.night_{night}", "input.format=delta",
                          "output.path=", f"output.table={output}",
                          f"output.form_cache_table={cache}", "output.incremental=true",
                          *sets)

    assert not spark.catalog.tableExists(output)
    first = run_job(spark, config(1, "input.passthrough_columns=[]"), run_id="night-1")
    assert first["table"] == output and first["writer"] == "delta-spark"
    assert first["form_cache"]["table"] == cache
    assert spark.catalog.tableExists(output) and spark.catalog.tableExists(cache)
    table = spark.read.table(output).toPandas()
    assert len(table) == len(old) and "gold_code" not in table.columns
    assert_matches_core(table, Linker.from_config(config(1)).link(old))

    second = run_job(spark, config(2, "input.passthrough_columns=[gold_code]"),
                     run_id="night-2")
    assert second["table_version"] == first["table_version"] + 1
    forms = lambda df: {normalize_text(t) for t in df["text"]}  # noqa: E731
    assert second["form_cache"]["hits"] == len(forms(new) & forms(old)) > 0, second
    assert second["form_cache"]["added"] == len(forms(new) - forms(old)), second["form_cache"]
    assert second["surface_forms"] == len(forms(new) - forms(old))
    table = spark.read.table(output).toPandas()
    assert len(table) == table["mention_id"].nunique() == len(dev_mentions)
    # the new pass-through column: filled for night 2, null for the rows of night 1
    by_run = table.groupby("run_id")["gold_code"].apply(lambda c: c.notna().all())
    assert by_run.to_dict() == {"night-1": False, "night-2": True}
    assert table.loc[table["run_id"] == "night-1", "gold_code"].isna().all()
    assert_matches_core(table[table["run_id"] == "night-2"],
                        Linker.from_config(config(2)).link(new))
    assert len(spark.read.table(cache).toPandas()) == len(forms(dev_mentions))

    # incremental: night 1 again links nothing and writes no version
    third = run_job(spark, config(1, "input.passthrough_columns=[]"), run_id="night-1b")
    assert third["skipped_already_linked"] == len(old) and third["rows_written"] == 0
    assert third["table_version"] == second["table_version"]


def test_catalog_tables_need_delta_spark_and_a_config_names_a_path_or_a_table(
    spark, tmp_path, tiny_encoder_dir, sample_index,
):
    with pytest.raises(ConfigError, match="never both"):
        job_config(tmp_path, tiny_encoder_dir, sample_index, "output.table=clin.assignments")
    with pytest.raises(ConfigError, match="writes folders, not catalog tables"):
        job_config(tmp_path, tiny_encoder_dir, sample_index, "output.path=",
                   "output.table=clin.assignments", "output.writer=deltalake")
    with pytest.raises(ConfigError, match="catalog.schema.table or schema.table"):
        job_config(tmp_path, tiny_encoder_dir, sample_index, "output.path=",
                   "output.table=assignments")
    with pytest.raises(ConfigError, match="set output.path .* or output.table .*neither"):
        run_job(spark, job_config(tmp_path, tiny_encoder_dir, sample_index, "output.path="))
    assert not list(tmp_path.iterdir())


def test_a_worker_keeps_its_models_when_only_the_linking_settings_change(
        spark, tmp_path, tiny_encoder_dir, sample_index):
    # a worker's Linker cache (udfs.get_linker, run here in the driver's process): another
    # linking section builds a Linker around the models the worker holds; another encoder
    # section loads them again
    import torch

    from clinlinker_spark.spark import udfs
    from clinlinker_spark.spark.artifacts import linker_spec, resolve_artifacts

    def spec_of(*overrides):
        config = job_config(tmp_path, tiny_encoder_dir, sample_index, *overrides)
        config = dataclasses.replace(config, spark=dataclasses.replace(
            config.spark, ship_artifacts=False))
        return linker_spec(spark, config, resolve_artifacts(config))

    threads = torch.get_num_threads()
    udfs.clear_cache()
    try:
        first = udfs.get_linker(spec_of())
        assert udfs.get_linker(spec_of()) is first
        second = udfs.get_linker(spec_of("linking.top_k=3", "linking.reuse_index_vectors=false"))
        assert second is not first
        assert second.encoder is first.encoder and second.index is first.index
        assert (second.linking.top_k, first.linking.top_k) == (3, 10)
        assert first.reuses_index_vectors and not second.reuses_index_vectors
        assert [len(c) for c in second.retrieve(["fiebre", "dolor abdominal"])] == [3, 3]
        third = udfs.get_linker(spec_of("encoder.batch_size=7"))
        assert third.encoder is not first.encoder and third.encoder.batch_size == 7
    finally:
        udfs.clear_cache()
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# (e) bad rows, (f) failures before any work


def bad_rows(spark):
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    schema = StructType([
        StructField("mention_id", StringType()), StructField("doc_id", StringType()),
        StructField("start", LongType()), StructField("end", LongType()),
        StructField("text", StringType()), StructField("label", StringType()),
    ])
    rows = [
        ("ok", "d1", 0, 8, "neumonía", "DIAGNOSTICO"),
        ("null-text", "d1", 10, 12, None, "DIAGNOSTICO"),
        ("empty", "d1", 12, 12, "", "DIAGNOSTICO"),
        ("blank", "d1", 13, 16, " \t\u00a0", "DIAGNOSTICO"),
        ("long", "d1", 20, 80, "dolor " * 10, "DIAGNOSTICO"),
        ("dup", "d2", 0, 6, "fiebre", "DIAGNOSTICO"),
        ("dup", "d2", 9, 12, "tos", "DIAGNOSTICO"),
        (None, "d3", 0, 7, "cefalea", "DIAGNOSTICO"),
        ("  ", "d3", 9, 12, "tos", "DIAGNOSTICO"),
        ("", "d4", 0, 6, "fiebre", "DIAGNOSTICO"),
    ]
    return spark.createDataFrame(rows, schema)


@pytest.mark.parametrize("prepare", PREPARE_PATHS[:1])
def test_bad_rows_reach_the_table_as_invalid_input(
    spark, tmp_path, tiny_encoder_dir, sample_index, monkeypatch, prepare,
):
    use_prepare(monkeypatch, prepare)
    config = job_config(tmp_path, tiny_encoder_dir, sample_index,
                        "linking.max_text_length=40", "input.passthrough_columns=[]",
                        "output.store_text=false")
    summary = run_job(spark, config, mentions=bad_rows(spark))
    table = read_table(config.output.path).set_index("mention_id")
    assert len(table) == 9 and table.index.is_unique
    # store_text false: no text column, its SHA-256 instead
    assert "text" not in table.columns
    assert table.loc["ok", "text_sha256"] == hashlib.sha256("neumonía".encode()).hexdigest()
    assert table.loc["null-text", "text_sha256"] is None
    reasons = table["reason"].to_dict()
    assert table.loc["ok", "status"] == "linked" and reasons["ok"] is None
    assert reasons["null-text"] == "null text"
    assert reasons["empty"] == reasons["blank"] == "empty text"
    assert reasons["long"] == "text longer than 40 characters"
    assert reasons["dup"] == "duplicate mention_id (2 rows)"
    # None, "  " and "": synthetic ids, each with its own reason
    null_ids = sorted((table.loc[i, "doc_id"], table.loc[i, "start"], reasons[i])
                      for i in table.index if i.startswith("null:"))
    assert null_ids == [("d3", 0, "null mention_id"), ("d3", 9, "empty mention_id"),
                        ("d4", 0, "empty mention_id")]
    invalid = table[table.index != "ok"]
    assert (invalid["status"] == "invalid_input").all()
    assert invalid["code"].isna().all() and invalid["candidates"].map(len).eq(0).all()
    assert table.loc["dup", "doc_id"] == "d2" and table.loc["dup", "start"] == 0
    assert summary["counts_by_status"] == {"linked": 1, "needs_review": 0, "no_candidate": 0,
                                           "invalid_input": 8}
    # a rerun gives the same ids (the synthetic ones included): no new rows
    run_job(spark, config, mentions=bad_rows(spark))
    again = read_table(config.output.path)
    assert sorted(again["mention_id"]) == sorted(table.index)


@pytest.mark.parametrize("prepare", PREPARE_PATHS[:1])
def test_an_input_without_rows_writes_nothing(
    spark, tmp_path, tiny_encoder_dir, sample_index, monkeypatch, prepare,
):
    use_prepare(monkeypatch, prepare)
    cache = tmp_path / "form_cache"
    config = job_config(tmp_path, tiny_encoder_dir, sample_index, "output.incremental=true",
                        "input.passthrough_columns=[]", f"output.form_cache_path={cache}")
    empty = bad_rows(spark).limit(0)
    summary = run_job(spark, config, mentions=empty)
    assert summary["mentions"] == summary["rows_written"] == summary["surface_forms"] == 0
    assert summary["table_version"] is None and not Path(config.output.path).exists()


def _jobs_in_group(spark, group: str) -> list[int]:
    return list(spark.sparkContext.statusTracker().getJobIdsForGroup(group))


def test_missing_column_fails_before_any_work(spark, tmp_path, tiny_encoder_dir, sample_index,
                                              dev_mentions):
    parquet = tmp_path / "mentions.parquet"
    dev_mentions.drop(columns=["codes", "text"]).to_parquet(parquet, index=False)
    # the encoder path does not exist: failing on it would mean the column check came later
    config = job_config(tmp_path, tmp_path / "no-such-encoder", sample_index,
                        f"input.path={parquet}", "input.format=parquet",
                        "input.passthrough_columns=[]")
    with pytest.raises(InputDataError) as err:
        run_job(spark, config)
    message = str(err.value)
    assert "'text'" in message and "input.text_column" in message and "mention_id" in message
    # no Spark job at all once the input's schema is known (reading a Parquet schema may run one)
    mentions = spark.read.parquet(str(parquet))
    spark.sparkContext.setJobGroup("missing-column", "test")
    try:
        with pytest.raises(InputDataError):
            run_job(spark, config, mentions=mentions)
    finally:
        spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)
    assert _jobs_in_group(spark, "missing-column") == []
    assert not Path(config.output.path).exists()


def test_index_built_with_another_encoder_fails_before_any_work(
    spark, tmp_path, tiny_encoder_dir, sample_index,
):
    from tiny_models import make_tiny_encoder

    other = make_tiny_encoder(tmp_path / "other-encoder", seed=7)
    config = job_config(tmp_path, other, sample_index)
    spark.sparkContext.setJobGroup("encoder-mismatch", "test")
    try:
        with pytest.raises(EncoderMismatchError) as err:
            run_job(spark, config)
    finally:
        spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)
    message = str(err.value)
    assert str(sample_index) in message and "other-encoder" in message
    assert "model_hash" in message
    assert _jobs_in_group(spark, "encoder-mismatch") == []
    assert not Path(config.output.path).exists()


# --------------------------------------------------------------------------------------------
# (g) incremental runs


@pytest.mark.parametrize("prepare", PREPARE_PATHS)
def test_incremental_run_links_only_new_mentions_and_relinks_on_new_versions(
    spark, tmp_path, tiny_encoder_dir, sample_index, sample_terminology, dev_mentions,
    monkeypatch, prepare,
):
    use_prepare(monkeypatch, prepare)
    # the file counts below are the deltalake writer's copy-on-write (delta-spark's MERGE
    # lays out its files its own way)
    config = job_config(tmp_path, tiny_encoder_dir, sample_index, "output.incremental=true",
                        "input.passthrough_columns=[]", "output.writer=deltalake")
    columns = ["mention_id", "doc_id", "start", "end", "text", "label"]
    old, new = dev_mentions.iloc[:400][columns], dev_mentions.iloc[400:][columns]

    first = run_job(spark, config, run_id="night-1", mentions=spark.createDataFrame(old))
    assert first["to_link"] == len(old) and first["skipped_already_linked"] == 0
    assert data_files(config.output.path) == 1  # a small run writes one file, not one per task

    # night 2: 30 new mentions, and one old mention whose text changed
    changed = old.copy()
    changed.iloc[0, changed.columns.get_loc("text")] = "hepatitis c crónica"
    both = pd.concat([changed, new], ignore_index=True)
    second = run_job(spark, config, run_id="night-2", mentions=spark.createDataFrame(both))
    assert second["to_link"] == len(new) + 1
    assert second["skipped_already_linked"] == len(old) - 1
    assert second["surface_forms"] <= len(new) + 1
    assert second["rows_written"] == len(new) + 1
    # one file of new rows, plus night 1's file rewritten without the replaced row
    assert data_files(config.output.path) == 2
    table = read_table(config.output.path).set_index("mention_id")
    assert len(table) == len(dev_mentions) and table.index.is_unique
    runs = table["run_id"]
    assert (runs.loc[new["mention_id"]] == "night-2").all()
    assert runs.loc[old["mention_id"].iloc[0]] == "night-2"
    assert (runs.loc[old["mention_id"].iloc[1:]] == "night-1").all()
    assert_matches_core(table.reset_index(),
                        Linker.from_config(config).link(both))

    # night 3: nothing new -> nothing linked, no new table version
    version = table_version(config.output.path)
    third = run_job(spark, config, run_id="night-3", mentions=spark.createDataFrame(both))
    assert third["to_link"] == 0 and third["surface_forms"] == 0
    assert third["rows_written"] == 0 and table_version(config.output.path) == version

    # a new index version relinks everything; this one (IVF) had its recall measured at build,
    # which the run reports
    encoder = BiEncoder(tiny_encoder_dir, device="cpu")
    texts = tmp_path / "night-mentions.parquet"
    both[["mention_id", "text"]].to_parquet(texts)
    new_index = build_index(sample_terminology.iloc[:-50], encoder,
                            IndexConfig(index_type="ivf", recall_mentions=str(texts),
                                        target_recall=0.9), tmp_path / "index-v2", search_k=50)
    config2 = dataclasses.replace(config, index=dataclasses.replace(config.index,
                                                                    path=str(new_index)))
    fourth = run_job(spark, config2, run_id="night-4", mentions=spark.createDataFrame(both))
    assert fourth["to_link"] == len(both) and fourth["skipped_already_linked"] == 0
    table = read_table(config.output.path)
    assert len(table) == len(both) and set(table["run_id"]) == {"night-4"}
    assert set(table["index_version"]) == {fourth["index_version"]} != {first["index_version"]}
    measured = read_manifest(new_index)["recall"]
    assert first["index_recall"] is None and fourth["index_recall"] == {
        "k": 25, "recall": measured["recall"], "queries": measured["queries"]}
    assert measured["recall"] >= 0.9


@pytest.mark.parametrize("prepare", PREPARE_PATHS[:1])
def test_incremental_skip_never_hides_a_duplicated_id(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions, monkeypatch, prepare,
):
    use_prepare(monkeypatch, prepare)
    config = job_config(tmp_path, tiny_encoder_dir, sample_index, "output.incremental=true",
                        "input.passthrough_columns=[]")
    columns = ["mention_id", "doc_id", "start", "end", "text", "label"]
    night1 = dev_mentions.iloc[:20][columns]
    run_job(spark, config, run_id="night-1", mentions=spark.createDataFrame(night1))
    # night 2: the same 20 rows, plus a second row for the first id (same text, other span)
    twin = night1.iloc[:1].copy()
    twin["start"], twin["end"] = twin["start"] + 1000, twin["end"] + 1000
    night2 = pd.concat([night1, twin], ignore_index=True)
    second = run_job(spark, config, run_id="night-2", mentions=spark.createDataFrame(night2))
    assert second["skipped_already_linked"] == 19 and second["to_link"] == 0
    assert second["counts_by_status"]["invalid_input"] == 1
    table = read_table(config.output.path).set_index("mention_id")
    row = table.loc[night1["mention_id"].iloc[0]]
    assert row["status"] == "invalid_input" and row["reason"] == "duplicate mention_id (2 rows)"
    assert len(table) == 20 and (table.drop(index=row.name)["run_id"] == "night-1").all()


@pytest.mark.parametrize("prepare", PREPARE_PATHS)
def test_incremental_run_leaves_unchanged_invalid_rows_alone(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions, monkeypatch, prepare,
):
    # an input with invalid rows fed again (the whole history as input) writes nothing: no
    # table file is rewritten for rows whose outcome would be the same. Each way of looking
    # the input up in the table: with the input's keys broadcast (a night's extract) or in
    # one left join (a large input)
    use_prepare(monkeypatch, prepare)
    columns = ["mention_id", "doc_id", "start", "end", "text", "label"]
    night1 = dev_mentions.iloc[:20][columns].copy()
    limit = int(night1["text"].str.len().max()) + 5  # every real text fits
    config = job_config(tmp_path, tiny_encoder_dir, sample_index, "output.incremental=true",
                        "input.passthrough_columns=[]", f"linking.max_text_length={limit}")
    night1.iloc[1, night1.columns.get_loc("text")] = "   "  # empty text
    night1.iloc[2, night1.columns.get_loc("text")] = "x" * (limit + 20)  # too long
    twin = night1.iloc[3:4].copy()  # a duplicated id
    twin["start"] += 1000
    night1 = pd.concat([night1, twin], ignore_index=True)
    first = run_job(spark, config, run_id="night-1", mentions=spark.createDataFrame(night1))
    assert first["counts_by_status"]["invalid_input"] == 3
    version = table_version(config.output.path)

    again = run_job(spark, config, run_id="night-2", mentions=spark.createDataFrame(night1))
    assert again["skipped_already_linked"] == 17 and again["skipped_unchanged_invalid"] == 3
    assert again["rows_written"] == 0 and table_version(config.output.path) == version

    # the duplicate is gone and a longer text limit makes the long text valid: both relinked;
    # the empty text stays as it was
    longer = job_config(tmp_path, tiny_encoder_dir, sample_index, "output.incremental=true",
                        "input.passthrough_columns=[]", f"linking.max_text_length={limit + 40}")
    third = run_job(spark, longer, run_id="night-3",
                    mentions=spark.createDataFrame(night1.iloc[:-1]))
    assert third["skipped_unchanged_invalid"] == 1 and third["to_link"] == 2
    table = read_table(config.output.path).set_index("mention_id")
    assert len(table) == 20
    relinked = night1["mention_id"].iloc[[2, 3]]
    assert (table.loc[relinked, "run_id"] == "night-3").all()
    assert (table.loc[relinked, "status"] != "invalid_input").all()
    empty = table.loc[night1["mention_id"].iloc[1]]
    assert empty["run_id"] == "night-1" and empty["reason"] == "empty text"


def test_incremental_rerun_with_a_ranker_writes_no_duplicates_and_relinks_nothing(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions, hybrid_ranker,
):
    # needs_review is final too: a rerun leaves those rows alone like linked ones
    base = with_ranker(job_config(tmp_path, tiny_encoder_dir, sample_index, *HYBRID,
                                  "output.incremental=true", "input.passthrough_columns=[]"),
                       hybrid_ranker)
    core = Linker.from_config(base)
    config = with_review_below(base, review_threshold(core, dev_mentions))
    old, new = dev_mentions.iloc[:400][MENTION_COLUMNS], dev_mentions.iloc[400:][MENTION_COLUMNS]
    first = run_job(spark, config, run_id="night-1", mentions=spark.createDataFrame(old))
    assert first["counts_by_status"]["needs_review"] > 0
    both = pd.concat([old, new], ignore_index=True)
    second = run_job(spark, config, run_id="night-2", mentions=spark.createDataFrame(both))
    assert second["skipped_already_linked"] == len(old) and second["to_link"] == len(new)
    assert second["rows_written"] == len(new)
    table = read_table(config.output.path)
    assert len(table) == table["mention_id"].nunique() == len(both)
    assert (table.set_index("mention_id").loc[old["mention_id"], "run_id"] == "night-1").all()
    assert_matches_core(table, core.with_linking(config.linking).link(both))
    version = table_version(config.output.path)
    third = run_job(spark, config, run_id="night-3", mentions=spark.createDataFrame(both))
    assert third["to_link"] == third["surface_forms"] == third["rows_written"] == 0
    assert third["skipped_already_linked"] == len(both)
    assert table_version(config.output.path) == version


def as_written_before_the_ranker(spark, source: Path | str, target: Path, key: str,
                                 candidate_fields: tuple[str, ...]) -> None:
    """Copy a table (code assignments or form cache) in the schema it had before the ranker:
    no confidence or ranker_version, candidates with ``candidate_fields`` only."""
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.writer import merge_into_delta, read_delta

    old = read_delta(spark, str(source)).drop("confidence", "ranker_version").withColumn(
        "candidates", F.transform("candidates", lambda c: F.struct(
            *[c[f].alias(f) for f in candidate_fields])))
    merge_into_delta(spark, old, str(target), key=key)


def test_a_form_cache_written_before_a_candidate_field_existed_is_still_used(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions, hybrid_ranker,
):
    """A cache whose candidate structs lack a field the stages now carry (``dense_hits``)
    serves its forms: the field reads as null and the rows equal the core linker's."""
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.writer import merge_into_delta, read_delta

    small = dev_mentions.iloc[:60]
    mentions = spark.createDataFrame(small[MENTION_COLUMNS])
    first = with_ranker(job_config(tmp_path, tiny_encoder_dir, sample_index, *HYBRID,
                                   "input.passthrough_columns=[]",
                                   f"output.form_cache_path={tmp_path / 'cache'}"),
                        hybrid_ranker)
    n_forms = run_job(spark, first, run_id="first", mentions=mentions)["surface_forms"]
    older = tmp_path / "cache-older"
    fields = [f for f in read_delta(spark, str(tmp_path / "cache")).schema["candidates"]
              .dataType.elementType.names if f != "dense_hits"]
    merge_into_delta(spark, read_delta(spark, str(tmp_path / "cache")).withColumn(
        "candidates", F.transform("candidates", lambda c: F.struct(
            *[c[f].alias(f) for f in fields]))), str(older), key="cache_key")

    config = dataclasses.replace(first, output=dataclasses.replace(
        first.output, path=str(tmp_path / "table-2"), form_cache_path=str(older)))
    again = run_job(spark, config, run_id="again", mentions=mentions)
    assert again["surface_forms"] == 0 and again["form_cache"]["hits"] == n_forms > 0
    assert_matches_core(read_table(config.output.path), Linker.from_config(config).link(small))


def test_a_table_and_form_cache_written_before_the_ranker_columns_are_relinked(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions, hybrid_ranker,
):
    small = dev_mentions.iloc[:80]
    mentions = spark.createDataFrame(small[MENTION_COLUMNS])
    plain = job_config(tmp_path, tiny_encoder_dir, sample_index, "output.incremental=true",
                       "input.passthrough_columns=[]",
                       f"output.form_cache_path={tmp_path / 'cache-plain'}")
    run_job(spark, plain, run_id="before", mentions=mentions)
    old_table, old_cache = tmp_path / "old-table", tmp_path / "old-cache"
    as_written_before_the_ranker(spark, plain.output.path, old_table, "mention_id",
                                 ("code", "term", "retrieval_score", "rerank_score"))
    as_written_before_the_ranker(spark, plain.output.form_cache_path, old_cache, "cache_key",
                                 ("code", "term", "retrieval_score", "rerank_score", "exact"))
    assert "confidence" not in read_table(old_table).columns
    n_forms = len(read_table(old_cache))

    config = with_ranker(job_config(tmp_path, tiny_encoder_dir, sample_index, *HYBRID,
                                    "output.incremental=true", "input.passthrough_columns=[]",
                                    f"output.path={old_table}",
                                    f"output.form_cache_path={old_cache}"), hybrid_ranker)
    expected = Linker.from_config(config).link(small)
    # no old row has the run's versions (nor their columns): every mention is linked again,
    # and the old cache (no confidence column) is not read
    upgrade = run_job(spark, config, run_id="upgrade", mentions=mentions)
    assert upgrade["skipped_already_linked"] == 0 and upgrade["to_link"] == len(small)
    assert upgrade["form_cache"]["hits"] == 0
    assert upgrade["form_cache"]["added"] == upgrade["surface_forms"] == n_forms
    table = read_table(old_table)
    assert len(table) == table["mention_id"].nunique() == len(small)
    assert set(table["run_id"]) == {"upgrade"}
    assert_matches_core(table, expected)
    # the cache's candidates gained the ranker's fields after its own; old rows read them null
    cache = read_table(old_cache)
    assert len(cache) == 2 * n_forms
    fields = next(list(cs[0]) for cs in cache["candidates"] if len(cs))
    assert fields == ["code", "term", "retrieval_score", "rerank_score", "exact",
                      "lexical_score", "ranker_score", "dense_hits"]
    assert cache["ranker_version"].isna().sum() == n_forms

    # the next night skips every mention; without incremental, every form comes from the cache
    again = run_job(spark, config, run_id="again", mentions=mentions)
    assert again["skipped_already_linked"] == len(small) and again["rows_written"] == 0
    relink = dataclasses.replace(config, output=dataclasses.replace(config.output,
                                                                    incremental=False))
    cached = run_job(spark, relink, run_id="cached", mentions=mentions)
    assert cached["surface_forms"] == 0 and cached["form_cache"]["hits"] == n_forms
    assert_matches_core(read_table(old_table), expected)


def test_mark_linked_broadcast_and_shuffle_agree(spark):
    from clinlinker_spark.spark.mentions import mark_linked, match_table
    from clinlinker_spark.text import text_hash as h  # the input's hex digest

    def b(text):  # the table's digest, as table_keys gives it
        return bytes.fromhex(h(text))

    identified = spark.createDataFrame(
        [("a", h("1"), 1, None), ("b", h("2"), 1, None), ("c", h("3"), 2, None),
         ("d", h("4"), 1, None), ("e", h("6"), 1, None),
         ("null:x", h("5"), 1, "null mention_id")],
        "mention_id string, text_sha256 string, _rows long, _bad_id string")
    table = spark.createDataFrame(
        [("a", b("1"), True, None), ("b", b("other"), True, None), ("c", b("3"), True, None),
         ("e", b("6"), False, "empty text"), ("null:x", b("5"), False, "null mention_id"),
         ("z", b("9"), True, None)],
        "mention_id string, text_sha256 binary, _done boolean, _invalid_reason string")
    # a: skipped; b: text changed; c: duplicated id; d: new; e: invalid before (same text);
    # null id: never skipped, invalid before; z: not in the input
    for broadcast in (False, True):  # shuffle join / broadcast of the input's keys
        matched = match_table(identified, table, broadcast)
        assert {r["mention_id"]: (r["_skip"], r["_was_invalid"])
                for r in matched.collect()} == {
            "a": (True, None), "b": (False, None), "c": (False, None),
            "e": (False, "empty text"), "null:x": (False, "null mention_id")}
        marked = {r["mention_id"]: (r["_in_table"], r["_skip"], r["_rows"])
                  for r in mark_linked(identified, table, broadcast).collect()}
        assert marked == {"a": (True, True, 1), "b": (True, False, 1), "c": (True, False, 2),
                          "d": (False, False, 1), "e": (True, False, 1),
                          "null:x": (True, False, 1)}


def test_the_prepare_stage_keeps_every_rule_with_either_table_search(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions, monkeypatch,
):
    # every rule of the prepare stage on one input, against a table and a form cache: the
    # input's keys broadcast to the table scan or joined with it give the same rows
    # (pass-through columns of every kind included), forms, cache hits and counts
    import datetime as dt
    from decimal import Decimal

    from clinlinker_spark.spark.artifacts import resolve_artifacts
    from clinlinker_spark.spark.form_cache import linking_version
    from clinlinker_spark.spark.mentions import select_mentions
    from clinlinker_spark.spark.pipeline import prepare

    extra = ["note_date", "seen_at", "dose", "tags", "attrs", "origin"]
    schema = ("mention_id string, doc_id string, start long, end long, text string, "
              "label string, note_date date, seen_at timestamp, dose decimal(10,3), "
              "tags array<string>, attrs map<string,int>, origin struct<system:string,n:int>")
    cache = tmp_path / "form_cache"
    config = job_config(tmp_path, tiny_encoder_dir, sample_index, "output.incremental=true",
                        f"input.passthrough_columns=[{', '.join(extra)}]",
                        f"output.form_cache_path={cache}", "linking.max_text_length=60")

    def row(mention_id, doc_id, start, text, k=0):
        return (mention_id, doc_id, start, None if start is None else start + 5, text, "DX",
                dt.date(2026, 1, 1 + k % 28), dt.datetime(2026, 3, 1, 12, k % 60, 7, 250),
                Decimal(f"{k}.125"), [f"t{k}", None], {"k": k}, ("cie10", k))

    real = [row(r.mention_id, r.doc_id, int(r.start), r.text, k)
            for k, r in enumerate(dev_mentions.iloc[:60].itertuples())]
    tricky = [
        row("dup1", "z", 5, "fiebre", 1), row("dup1", None, 9, "tos", 2),
        row("dup1", "\u00e9", 1, "disnea", 3),  # the null doc_id comes first, then "z" < "é"
        row("dup2", "d", None, "tos", 4), row("dup2", "d", 3, "fiebre", 5),
        row("dup3", "d", 3, "b", 6), row("dup3", "d", 3, "a", 7),  # by text hash
        row(None, "d9", 0, "cefalea", 8), row(None, "d9", 0, "cefalea", 8),  # 2 rows
        row("  ", "d9", 4, "tos", 9), row("null-text", "d", 0, None, 10),
        row("empty", "d", 0, " \t", 11), row("long", "d", 0, "dolor " * 12, 12),
        row("u1", "d", 0, "\u00dalcera  G\u00c1STRICA", 13),
        row("u2", "d", 1, "\u00falcera g\u00e1strica", 14),  # u1's form
    ]
    night1 = real[:40] + tricky[10:13]
    run_job(spark, config, run_id="night-1", mentions=spark.createDataFrame(night1, schema))
    changed = list(real[0])
    changed[4] = "hepatitis c cr\u00f3nica"  # a linked id whose text changed
    night2 = spark.createDataFrame([tuple(changed), *real[1:], *tricky], schema)

    art = resolve_artifacts(config)
    cache_versions = {**art.versions, "linking_version": linking_version(config)}
    selected = select_mentions(night2, config.input)
    got = {}
    for name, broadcast_rows in (("broadcast", config.spark.broadcast_rows), ("join", 0)):
        sized = dataclasses.replace(config, spark=dataclasses.replace(
            config.spark, broadcast_rows=broadcast_rows))
        kept = []
        prep = prepare(spark, selected, sized, art.versions, cache_versions,
                       selected.count(), 2, lambda df: kept.append(df.persist()) or kept[-1])
        rows = sorted((r.asDict(recursive=True) for r in prep.validated.collect()),
                      key=lambda r: r["mention_id"])
        got[name] = {
            "counts": prep.counts, "rows": rows,
            "types": [f.dataType for f in prep.validated.schema.fields],
            "forms": sorted(tuple(r) for r in prep.forms.collect()),
            "hits": sorted(tuple(r) for r in prep.hits.collect()),
            "versions": (prep.table_at, prep.cache_at),
        }
        for df in kept:
            df.unpersist()
    broadcast, joined = got.pop("broadcast"), got.pop("join")
    for key in broadcast:
        assert broadcast[key] == joined[key], key
    counts = broadcast["counts"]
    assert counts["skipped"] == 39 and counts["unchanged_invalid"] == 3
    assert counts["invalid"] == 5 and 0 < counts["cache_hits"] < counts["forms"]
    by_id = {r["mention_id"]: r for r in broadcast["rows"]}
    assert by_id["dup1"]["doc_id"] is None and by_id["dup2"]["start"] is None
    assert by_id["dup1"]["reason"] == "duplicate mention_id (3 rows)"
    assert by_id["dup3"]["text"] == "a"  # doc_id and span tie: the first by text
    assert by_id["u1"]["text_norm"] == by_id["u2"]["text_norm"] == "\u00falcera g\u00e1strica"
    assert by_id["u1"]["seen_at"] == dt.datetime(2026, 3, 1, 12, 13, 7, 250)
    assert by_id["u1"]["dose"] == Decimal("13.125") and by_id["u1"]["attrs"] == {"k": 13}


def test_output_rows_come_from_one_join_and_a_row_without_result_fails(
    spark, tmp_path, tiny_encoder_dir, sample_index,
):
    from datetime import datetime, timezone

    from clinlinker_spark.spark import schemas
    from clinlinker_spark.spark.pipeline import assemble_output

    config = job_config(tmp_path, tiny_encoder_dir, sample_index, "input.passthrough_columns=[]")
    validated = spark.createDataFrame(
        [("a", "d", 0, 3, "Tos", "h1", "DX", None, "tos"),
         ("b", "d", 4, 7, "tos", "h2", "DX", None, "tos"),
         ("c", "d", 8, 9, "", "h3", "DX", "empty text", None)],
        "mention_id string, doc_id string, start long, end long, text string, "
        "text_sha256 string, label string, reason string, text_norm string")
    found = spark.createDataFrame(
        [("tos", "tos", "linked", None, "R05", "tos", 0.9, 0.8,
          [{"code": "R05", "term": "tos", "retrieval_score": 0.9, "rerank_score": None,
            "lexical_score": 1.0, "ranker_score": 0.9, "exact": True}])], schemas.STAGE_SCHEMA)
    versions = {"model_version": "m", "index_version": "i", "reranker_version": "",
                "ranker_version": "r"}
    now = datetime.now(timezone.utc)
    for broadcast in (True, False):
        out = assemble_output(validated, found, config, versions, "r", now,
                              broadcast_results=broadcast)
        rows = {r["mention_id"]: r for r in out.collect()}
        assert {k: (r["status"], r["code"], r["confidence"], len(r["candidates"]))
                for k, r in rows.items()} == {"a": ("linked", "R05", 0.8, 1),
                                              "b": ("linked", "R05", 0.8, 1),
                                              "c": ("invalid_input", None, None, 0)}
        assert rows["a"]["candidates"][0].asDict() == {
            "code": "R05", "term": "tos", "retrieval_score": 0.9, "rerank_score": None,
            "lexical_score": 1.0, "ranker_score": 0.9}  # without ``exact``
        assert rows["c"]["reason"] == "empty text" and rows["a"]["run_id"] == "r"
        assert rows["a"]["ranker_version"] == "r"
        assert out.columns == schemas.assignment_columns(True, [])
    # a row to link whose form has no result fails the write; it is not dropped
    other = found.filter("link_key = 'none'")
    with pytest.raises(Exception, match="has no result"):
        assemble_output(validated, other, config, versions, "r", now).collect()
    with pytest.raises(Exception, match="has no result"):
        assemble_output(validated, None, config, versions, "r", now).collect()


def test_broadcast_and_shuffled_results_give_the_same_output_rows(
    spark, tmp_path, tiny_encoder_dir, sample_index,
):
    from datetime import datetime, timezone

    from pyspark.sql import functions as F

    from clinlinker_spark.spark import schemas
    from clinlinker_spark.spark.pipeline import assemble_output

    validated = spark.createDataFrame(
        [("a", "d", 0, 3, "Tos", "h1", "DX", "w1", None, "tos"),
         ("b", "d", 4, 7, "tos", "h2", "DX", None, None, "tos"),
         ("c", "d", 8, 9, "", "h3", "DX", "w2", "empty text", None),
         ("e", None, None, None, "zzz", "h4", None, "w3", None, "zzz")],
        "mention_id string, doc_id string, start long, end long, text string, "
        "text_sha256 string, label string, ward string, reason string, text_norm string")
    candidate = {"code": "R05", "term": "tos", "retrieval_score": 0.9, "rerank_score": 0.7,
                 "lexical_score": 0.6, "ranker_score": 1.5, "exact": True}
    found = spark.createDataFrame(
        [("tos", "tos", "needs_review", "confidence below", "R05", "tos", 1.5, 0.4,
          [candidate, {**candidate, "code": "R06", "ranker_score": None}]),
         ("zzz", "zzz", "no_candidate", "no hit", None, None, None, None, [])],
        schemas.STAGE_SCHEMA)
    by_id = found.withColumn("link_key", F.when(F.col("link_key") == "tos", "a")
                             .otherwise("e")).unionByName(found.filter("link_key = 'tos'")
                                                          .withColumn("link_key", F.lit("b")))
    versions = {"model_version": "m", "index_version": "i", "reranker_version": "",
                "ranker_version": "r"}
    now = datetime(2026, 11, 27, 8, 30, 1, 123456, tzinfo=timezone.utc)
    for store_text, dedupe in ((True, True), (False, True), (True, False)):
        config = job_config(tmp_path, tiny_encoder_dir, sample_index,
                            "input.passthrough_columns=[ward]",
                            f"output.store_text={str(store_text).lower()}")
        config = dataclasses.replace(config, spark=dataclasses.replace(
            config.spark, dedupe_surface_forms=dedupe))
        results = found if dedupe else by_id
        want = assemble_output(validated, results, config, versions, "r",
                               now).toArrow().sort_by("mention_id")
        got = assemble_output(validated, results, config, versions, "r", now,
                              broadcast_results=True).toArrow().sort_by("mention_id")
        assert got.schema == want.schema and got.equals(want)
        assert got.column("status").to_pylist() == [
            "needs_review", "needs_review", "invalid_input", "no_candidate"]
        assert got.column("confidence").to_pylist() == [0.4, 0.4, None, None]
        assert [len(c) for c in got.column("candidates").to_pylist()] == [2, 2, 0, 0]
        assert got.column("candidates").to_pylist()[0][1] == {
            "code": "R06", "term": "tos", "retrieval_score": 0.9, "rerank_score": 0.7,
            "lexical_score": 0.6, "ranker_score": None}
    # every row invalid: no results at all
    invalid = validated.filter("reason is not null")
    got = assemble_output(invalid, None, config, versions, "r", now).toArrow()
    assert got.column("status").to_pylist() == ["invalid_input"]
    # a row to link whose form has no result fails, with the results broadcast too
    out = assemble_output(validated, found.filter("link_key = 'tos'"), config, versions, "r",
                          now, broadcast_results=True)
    with pytest.raises(Exception, match="has no result"):
        out.toArrow()


def test_tallies_of_several_frames_are_counted_together(spark):
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.mentions import collect_tallies, tally

    a = spark.createDataFrame([(1,), (2,), (3,), (None,)], "x long")
    b = spark.createDataFrame([("p",), ("q",)], "y string")
    counts = collect_tallies([
        tally(a, rows=F.lit(True), big=F.col("x") > 1, null_x=F.col("x").isNull()),
        tally(b, rows_b=F.lit(True), p=F.col("y") == "p"),
        tally(b.filter(F.lit(False)), none=F.lit(True)),  # an empty frame counts 0
        tally(a, sums={"sum_x": F.col("x")}),  # nulls add nothing
        tally(b.filter(F.lit(False)), sums={"sum_none": F.lit(5)}),  # no rows: 0, not null
    ])
    assert counts == {"rows": 4, "big": 2, "null_x": 1, "rows_b": 2, "p": 1, "none": 0,
                      "sum_x": 6, "sum_none": 0}


def test_counts_over_every_input_row_follow_from_the_rows_that_go_on():
    from clinlinker_spark.errors import InputDataError
    from clinlinker_spark.spark.mentions import remaining_counts

    # 10 input rows: ids a (3 rows), b, c, d, e, f, g, h; b-e are in the table, b-d skipped
    tallies = {"_remaining": 5, "_remaining_in_table": 1, "_merged": 2, "invalid": 1,
               "unchanged_invalid": 0, "forms": 3}
    assert remaining_counts(tallies, 10) == {
        "mentions": 8, "skipped": 3, "in_table": 4, "invalid": 1, "unchanged_invalid": 0,
        "forms": 3}
    with pytest.raises(InputDataError, match="changes between two reads"):  # fewer rows
        remaining_counts(tallies, 6)
    with pytest.raises(ValueError, match="row count"):
        remaining_counts(tallies, None)


def test_few_rows_run_in_one_wave_many_in_every_partition(spark):
    from clinlinker_spark.spark.pipeline import form_tasks, prepare_tasks
    from clinlinker_spark.spark.session import task_slots

    four, sixteen = SparkConfig(shuffle_partitions=4), SparkConfig(shuffle_partitions=16)
    # a night's few hundred forms: one task per slot, not two waves of smaller tasks
    assert form_tasks(275, four, slots=2) == 2
    assert form_tasks(275, sixteen, slots=8) == math.ceil(275 / sixteen.min_forms_per_task)
    assert form_tasks(10, four, slots=2) == 1
    assert form_tasks(0, four, slots=2) == 1
    # more than one wave's worth: every partition
    assert form_tasks(2 * four.one_wave_forms_per_slot + 1, four, slots=2) == 4
    assert form_tasks(275, four, slots=None) == 4  # slots unknown
    assert form_tasks(None, four, slots=2) == 4  # count unknown
    assert form_tasks(275, SparkConfig(shuffle_partitions=1), slots=2) == 1
    # the knobs are config keys: smaller tasks when the config asks for them
    assert form_tasks(275, dataclasses.replace(sixteen, min_forms_per_task=16), slots=8) == 8
    # the session's slots: its cores over spark.task.cpus (the session's, or the given)
    cores = spark.sparkContext.defaultParallelism
    assert task_slots(spark) == task_slots(spark, 1) == cores
    assert task_slots(spark, cores + 1) == 1
    # the normaliser: a small input in one task per slot (not one task while a slot idles),
    # a large one in tasks of spark.rows_per_prepare_task rows up to every partition
    assert prepare_tasks(5_000, four, slots=2) == 2
    assert prepare_tasks(1_000, four, slots=2) == 1
    assert prepare_tasks(100_000, four, slots=2) == 2
    assert prepare_tasks(1_000_000, four, slots=2) == 4
    assert prepare_tasks(5_000, four, slots=None) == 1  # slots unknown
    assert prepare_tasks(5_000, dataclasses.replace(four, rows_per_prepare_task=1_000),
                         slots=2) == 4


@pytest.mark.parametrize("prepare", PREPARE_PATHS)
def test_form_cache_links_only_forms_never_seen_and_gives_the_same_rows(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions, monkeypatch, prepare,
):
    # each way of splitting the forms by the cache: the forms' keys broadcast to a scan of
    # the cache, or a left join of the forms with the cache
    use_prepare(monkeypatch, prepare)
    cache = tmp_path / "form_cache"
    config = job_config(tmp_path, tiny_encoder_dir, sample_index,
                        "input.passthrough_columns=[]", f"output.form_cache_path={cache}")
    columns = ["mention_id", "doc_id", "start", "end", "text", "label"]
    old, new = dev_mentions.iloc[:380][columns], dev_mentions.iloc[380:][columns]
    norm = lambda df: {normalize_text(t) for t in df["text"]}  # noqa: E731
    unseen = norm(new) - norm(old)
    assert unseen and norm(new) & norm(old)  # the sample has both kinds

    first = run_job(spark, config, run_id="night-1", mentions=spark.createDataFrame(old))
    assert first["form_cache"]["hits"] == 0
    assert first["form_cache"]["added"] == first["surface_forms"] == len(norm(old))
    rows = read_table(cache)
    assert len(rows) == len(norm(old)) and rows["cache_key"].is_unique
    assert "text" not in rows.columns and "text_norm" not in rows.columns
    # only index terms (candidates) may equal a mention; no other column holds its text
    texts = set(old["text"]) | norm(old)
    assert not any(v in texts for col in rows.columns if col != "term"
                   and rows[col].dtype == object for v in rows[col] if isinstance(v, str))

    # night 2, not incremental: every mention is linked again, only unseen forms computed
    both = pd.concat([old, new], ignore_index=True)
    second = run_job(spark, config, run_id="night-2", mentions=spark.createDataFrame(both))
    assert second["surface_forms"] == len(unseen)
    assert second["form_cache"]["hits"] == len(norm(both)) - len(unseen)
    assert second["form_cache"]["added"] == len(unseen)
    table = read_table(config.output.path)
    assert len(table) == len(both) and set(table["run_id"]) == {"night-2"}
    assert_matches_core(table, Linker.from_config(config).link(both))
    assert len(read_table(cache)) == len(norm(both))

    # the same night again: every form from the cache, no UDF stage at all
    again = run_job(spark, config, run_id="night-2b", mentions=spark.createDataFrame(both))
    assert again["surface_forms"] == 0 and "embed_search" not in again["timings_s"]
    assert again["form_cache"]["hits"] == len(norm(both))
    assert_matches_core(read_table(config.output.path), Linker.from_config(config).link(both))

    # a linking setting that changes outcomes misses the cache
    config5 = job_config(tmp_path, tiny_encoder_dir, sample_index, "linking.top_k=5",
                         "input.passthrough_columns=[]", f"output.form_cache_path={cache}")
    third = run_job(spark, config5, run_id="night-3", mentions=spark.createDataFrame(new))
    assert third["form_cache"]["hits"] == 0 and third["surface_forms"] == len(norm(new))
    assert third["linking_version"] != second["linking_version"]
    assert_matches_core(read_table(config.output.path).query("run_id == 'night-3'"),
                        Linker.from_config(config5).link(new))


def test_form_cache_keys_on_the_ranker_version(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions, hybrid_ranker,
):
    import json

    # another ranker: the same model, its confidences calibrated to half
    other = tmp_path / "other-ranker"
    shutil.copytree(hybrid_ranker, other)
    spec = json.loads((other / "ranker.json").read_text(encoding="utf-8"))
    spec["calibration"]["y"] = [y / 2 for y in spec["calibration"]["y"]]
    (other / "ranker.json").write_text(json.dumps(spec), encoding="utf-8")
    assert ranker_hash(other) != ranker_hash(hybrid_ranker)

    cache = tmp_path / "form_cache"
    small = dev_mentions.iloc[:120]
    mentions = small[MENTION_COLUMNS]
    config_a = with_ranker(job_config(tmp_path, tiny_encoder_dir, sample_index, *HYBRID,
                                      "input.passthrough_columns=[]",
                                      f"output.form_cache_path={cache}"), hybrid_ranker)
    config_b = with_ranker(config_a, other)
    first = run_job(spark, config_a, run_id="a", mentions=spark.createDataFrame(mentions))
    forms = first["surface_forms"]
    assert forms > 0 and first["form_cache"]["added"] == forms
    confidence_a = read_table(config_a.output.path).set_index("mention_id")["confidence"]
    again = run_job(spark, config_a, run_id="a2", mentions=spark.createDataFrame(mentions))
    assert again["surface_forms"] == 0 and again["form_cache"]["hits"] == forms

    other_run = run_job(spark, config_b, run_id="b", mentions=spark.createDataFrame(mentions))
    assert other_run["form_cache"]["hits"] == 0 and other_run["surface_forms"] == forms
    assert other_run["ranker_version"] != first["ranker_version"]
    assert other_run["linking_version"] == first["linking_version"]
    table = read_table(config_b.output.path)
    assert_matches_core(table, Linker.from_config(config_b).link(small))
    confidence_b = table.set_index("mention_id")["confidence"]
    found = confidence_a.notna()
    assert found.any()
    assert (confidence_b[found] - confidence_a[found] / 2).abs().max() < 1e-9
    rows = read_table(cache)
    assert len(rows) == 2 * forms and rows["cache_key"].is_unique
    assert set(rows["ranker_version"]) == {first["ranker_version"], other_run["ranker_version"]}


def test_linking_version_covers_the_linking_settings_that_change_results():
    from clinlinker_spark.spark.form_cache import linking_version

    config = load_config(None, [])
    base = linking_version(config)
    for change in ({"retrievers": ("dense", "lexical")}, {"lexical_k": 30},
                   {"review_below": 0.5}, {"top_k": 5}, {"min_score": 0.2}):
        changed = dataclasses.replace(config.linking, **change)
        assert linking_version(dataclasses.replace(config, linking=changed)) != base, change
    # outcomes that do not depend on a setting: the reuse of index vectors, and a ranker's
    # training settings (its version, a hash of its files, keys the cache)
    same = dataclasses.replace(config.linking, reuse_index_vectors=False)
    assert linking_version(dataclasses.replace(config, linking=same)) == base
    assert linking_version(dataclasses.replace(config, ranker=RankerConfig(
        path="r", num_trees=5))) == base


def test_a_failed_form_cache_write_costs_time_not_rows(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions, monkeypatch,
):
    # a failed cache write is reported, the table is complete,
    # and the next run computes the forms again and fills the cache
    import clinlinker_spark.spark.writer as writer_module

    cache = tmp_path / "form_cache"
    config = job_config(tmp_path, tiny_encoder_dir, sample_index,
                        "input.passthrough_columns=[]", f"output.form_cache_path={cache}")
    mentions = dev_mentions.iloc[:60][["mention_id", "doc_id", "start", "end", "text", "label"]]
    real_merge = writer_module.merge_into_delta

    def failing_for_the_cache(spark, df, path, *args, **kwargs):
        if str(path) == str(cache):
            raise OSError("disk full (test)")
        return real_merge(spark, df, path, *args, **kwargs)

    monkeypatch.setattr(writer_module, "merge_into_delta", failing_for_the_cache)
    first = run_job(spark, config, run_id="night-1", mentions=spark.createDataFrame(mentions))
    assert first["form_cache"]["error"] == "OSError" and first["form_cache"]["added"] == 0
    assert first["rows_written"] == len(mentions) == len(read_table(config.output.path))
    assert not (cache / "_delta_log").exists()

    monkeypatch.setattr(writer_module, "merge_into_delta", real_merge)
    second = run_job(spark, config, run_id="night-2", mentions=spark.createDataFrame(mentions))
    assert second["surface_forms"] == first["surface_forms"] > 0
    assert second["form_cache"]["added"] == second["surface_forms"]
    assert "error" not in second["form_cache"]
    assert len(read_table(config.output.path)) == len(mentions)


def test_form_cache_needs_surface_form_dedupe(spark, tmp_path, tiny_encoder_dir,
                                              sample_index):
    config = job_config(tmp_path, tiny_encoder_dir, sample_index,
                        f"output.form_cache_path={tmp_path / 'cache'}")
    config = dataclasses.replace(config, spark=dataclasses.replace(
        config.spark, dedupe_surface_forms=False))
    with pytest.raises(ConfigError, match="dedupe_surface_forms"):
        run_job(spark, config)


# --------------------------------------------------------------------------------------------
# Building blocks


def test_artifacts_are_shipped_once_under_distinct_names(spark, tmp_path):
    from pyspark import SparkFiles

    from clinlinker_spark.spark.udfs import ship_artifact

    a, b = tmp_path / "a" / "idx", tmp_path / "b" / "idx"
    for folder, content in ((a, "first"), (b, "second")):
        folder.mkdir(parents=True)
        (folder / "payload.txt").write_text(content)
    sc = spark.sparkContext
    name_a = ship_artifact(sc, a, "1" * 64)
    name_b = ship_artifact(sc, b, "2" * 64)  # same base name, other content
    assert name_a == "idx" and name_b == "idx-" + "2" * 12
    assert ship_artifact(sc, a, "1" * 64) == name_a  # no second addFile

    def read(_):
        return [(Path(SparkFiles.get(n)) / "payload.txt").read_text() for n in (name_a, name_b)]

    assert sc.parallelize([0], 1).map(read).collect() == [["first", "second"]]


def test_stage_batches_carry_every_candidate_field_both_ways():
    from clinlinker_spark.config import LinkingConfig
    from clinlinker_spark.linker import Candidate
    from clinlinker_spark.spark.schemas import OUTCOME_COLUMNS
    from clinlinker_spark.spark.udfs import _from_arrow, _to_batch

    ranked = [[Candidate("E11.9", "diabetes tipo 2", 0.91, rerank_score=2.5, exact=True,
                         lexical_score=0.8, ranker_score=1.25),
               Candidate("E10", "diabetes tipo 1", 0.77, lexical_score=0.4, ranker_score=-0.5)],
              [],
              [Candidate("J18", "neumonía", 0.5, rerank_score=None, exact=False)]]
    assert [f.name for f in dataclasses.fields(Candidate)] == sorted(
        _to_batch(["a"], ["a"], [[]]).schema.field("candidates").type.value_type.names,
        key=[f.name for f in dataclasses.fields(Candidate)].index)
    batch = _to_batch(["a", "b", "c"], ["x", "y", "z"], ranked)
    assert _from_arrow(batch.column("candidates")) == ranked
    assert all(batch.column(c).null_count == 3 for c in OUTCOME_COLUMNS)  # not final
    class Outcomes:  # what the stage that finalises asks of its Linker: outcome()
        linking = LinkingConfig(review_below=0.5)
        reranker = None
        score_of = Linker.score_of
        outcome = Linker.outcome

    final = _to_batch(["a", "b", "c"], ["x", "y", "z"], ranked, Outcomes(), [0.9, None, 0.2])
    assert final.to_pydict()["status"] == ["linked", "no_candidate", "needs_review"]
    assert final.to_pydict()["confidence"] == [0.9, None, 0.2]
    assert final.to_pydict()["score"] == [1.25, None, 0.5]  # the ranker's score, else retrieval
    assert final.to_pydict()["code"] == ["E11.9", None, "J18"]
    assert _from_arrow(final.column("candidates")) == ranked


def test_task_device_uses_the_gpu_a_task_holds():
    from clinlinker_spark.spark.udfs import task_device

    class Resource:
        def __init__(self, addresses):
            self.addresses = addresses

    class Context:
        def __init__(self, resources):
            self._resources = resources

        def resources(self):
            return self._resources

    assert task_device(Context({"gpu": Resource(["3"])}), "auto", False) == ("cuda", 3)
    assert task_device(Context({"gpu": Resource(["0"])}), "cpu", True) == ("cuda", 0)
    assert task_device(Context({}), "auto", False) == ("cpu", -1)  # not this task's GPU
    assert task_device(Context({}), "auto", True) == ("auto", -1)  # local: torch decides
    assert task_device(None, "cpu", True) == ("cpu", -1)


def test_session_settings_and_notebook_overrides():
    from clinlinker_spark.spark.session import (
        is_local_master, prepare_local_environment, spark_conf_pairs,
    )
    from clinlinker_spark.widgets import widget_overrides

    cfg = SparkConfig(master="yarn", shuffle_partitions=64, arrow_batch_size=500, task_cpus=4,
                      executor_gpus=1, task_gpus=0.5, gpu_discovery_script="/opt/gpus.sh",
                      conf={"spark.sql.shuffle.partitions": "128"})
    conf = spark_conf_pairs(cfg)
    assert conf["spark.sql.shuffle.partitions"] == "128"  # extra conf wins
    assert conf["spark.sql.execution.arrow.maxRecordsPerBatch"] == "500"
    assert conf["spark.task.cpus"] == "4"
    assert conf["spark.executor.resource.gpu.amount"] == "1"
    assert conf["spark.task.resource.gpu.amount"] == "0.5"
    assert conf["spark.executor.resource.gpu.discoveryScript"] == "/opt/gpus.sh"
    assert conf["spark.sql.session.timeZone"] == "UTC"
    assert conf["spark.sql.parquet.outputTimestampType"] == "TIMESTAMP_MICROS"
    assert conf["spark.python.sql.dataFrameDebugging.enabled"] == "false"
    assert conf["spark.sql.codegen.cache.maxEntries"] == "1000"
    assert spark_conf_pairs(SparkConfig(conf={"spark.python.sql.dataFrameDebugging.enabled":
                                              "true"}))[
        "spark.python.sql.dataFrameDebugging.enabled"] == "true"
    assert "spark.executor.resource.gpu.amount" not in spark_conf_pairs(SparkConfig())
    assert all(map(is_local_master, ["local", "local[2]", "local[*]", "local[2,3]",
                                     "local-cluster[2,1,1024]"]))
    assert not is_local_master("yarn") and not is_local_master("k8s://https://h:6443")
    env = prepare_local_environment(SparkConfig(), {"PYSPARK_PYTHON": "/opt/py"})
    assert "PYSPARK_PYTHON" not in env and env["SPARK_LOCAL_IP"] == "127.0.0.1"
    assert widget_overrides({"input_path": "/in", "top_k": "", "overrides":
                             "linking.top_k=5; output.incremental=false\nspark.task_cpus=2"}) == [
        "input.table=", "input.path=/in", "linking.top_k=5", "output.incremental=false",
        "spark.task_cpus=2"]
    # a table widget replaces the path the config YAML names
    config = load_config(str(Path(__file__).parent.parent / "conf" / "local.yaml"),
                         widget_overrides({"output_table": "clinical.linking.code_assignments",
                                           "output_path": ""}))
    assert config.output.target == TableRef(name="clinical.linking.code_assignments")


def test_build_spark_session_reuses_a_running_session(spark):
    from clinlinker_spark.spark.session import build_spark_session

    key = "spark.sql.shuffle.partitions"
    saved = spark.conf.get(key)
    try:
        again = build_spark_session(dataclasses.replace(TEST_SPARK, shuffle_partitions=3))
        assert again.sparkContext is spark.sparkContext
        assert again.conf.get(key) == "3"  # SQL settings reach a running session
        assert again.conf.get("spark.sql.session.timeZone") == "UTC"
    finally:
        spark.conf.set(key, saved)


def test_dry_run_plans_without_writing_and_refuses_rows_the_table_cannot_take(
    spark, tmp_path, tiny_encoder_dir, sample_index, dev_mentions,
):
    from clinlinker_spark.spark.dry_run import plan_link_job
    from clinlinker_spark.spark.writer import SchemaMismatchError

    mentions = tmp_path / "mentions.parquet"
    dev_mentions[MENTION_COLUMNS + ["code"]].rename(columns={"code": "gold_code"}).to_parquet(
        mentions)
    config = job_config(tmp_path, tiny_encoder_dir, sample_index, f"input.path={mentions}",
                        "input.format=parquet", "input.passthrough_columns=[gold_code]")
    plan = plan_link_job(spark, config)
    assert plan["input"]["rows"] == len(dev_mentions)
    assert plan["output"]["action"] == "create" and not Path(config.output.path).exists()
    assert plan["artifacts"]["index"]["path"] == str(sample_index)
    run_job(spark, config)
    assert plan_link_job(spark, config)["output"]["columns_added_or_widened"] == []

    # the same column as a number: the table's gold_code is a string
    numeric = tmp_path / "numeric.parquet"
    dev_mentions[MENTION_COLUMNS].assign(gold_code=range(len(dev_mentions))).to_parquet(numeric)
    with pytest.raises(SchemaMismatchError):
        plan_link_job(spark, dataclasses.replace(config, input=dataclasses.replace(
            config.input, path=str(numeric))))
    # a new pass-through column is planned as added
    extra = tmp_path / "extra.parquet"
    dev_mentions[MENTION_COLUMNS + ["code"]].rename(columns={"code": "gold_code"}).assign(
        ward="A").to_parquet(extra)
    wider = dataclasses.replace(config, input=dataclasses.replace(
        config.input, path=str(extra), passthrough_columns=("gold_code", "ward")))
    assert plan_link_job(spark, wider)["output"]["columns_added_or_widened"] == ["ward"]
    # no index and no build_missing: the run's own error
    missing = dataclasses.replace(config, index=dataclasses.replace(
        config.index, path=str(tmp_path / "no-index")))
    with pytest.raises(ArtifactError):
        plan_link_job(spark, missing)
