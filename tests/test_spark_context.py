"""The context stage in the Spark job: mentions with a context (``input.context_column``, or a
gold corpus with ``input.text_dir``) whose context-free link the stage gates are linked again
by the context-aware cross-encoder and its ranker, once per distinct (form, context), and the
rows equal the core Linker's. Tiny random models: these tests check the plumbing, not
accuracy."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from clinlinker_spark.config import JobConfig, TerminologyConfig
from clinlinker_spark.corpora import read_gold
from clinlinker_spark.errors import ArtifactError, ConfigError
from clinlinker_spark.linker import Linker, lineage_versions
from clinlinker_spark.ranker import ranker_hash
from clinlinker_spark.samples import sample_path
from clinlinker_spark.training.ranker import train_ranker
from test_context_stage import _documents
from test_spark_job import (  # noqa: F401 (module fixtures)
    HYBRID, SAMPLE_TERMINOLOGY, assert_matches_core, dev_mentions, hybrid_ranker, job_config,
    read_table, run_job, sample_index, sample_terminology, spark_task_threads, with_ranker,
)

pytestmark = pytest.mark.spark

CONTEXT = ("context", "context_start", "context_end")


@dataclasses.dataclass
class ContextModels:
    reranker: Path  # the context-aware cross-encoder
    ranker: Path  # the ranker trained on its scores
    dev_texts: Path  # a document per dev sample document


@pytest.fixture(scope="module")
def context_models(tmp_path_factory, tiny_encoder_dir, tiny_cross_encoder_dir,
                   sample_index) -> ContextModels:  # noqa: F811 (module fixtures)
    root = tmp_path_factory.mktemp("spark-context")
    train = read_gold(sample_path("codiesp_train_sample.tsv"), "codiesp")
    train_texts = _documents(train, root / "train_text")
    dev_texts = _documents(read_gold(sample_path("codiesp_dev_sample.tsv"), "codiesp"),
                           root / "dev_text")
    reranker = root / "ce-context"
    shutil.copytree(tiny_cross_encoder_dir, reranker)
    card = {"kind": "clinlinker-crossencoder-training",
            "context": {"chars": 80, "markers": ["<<", ">>"]}}
    (reranker / "training_card.json").write_text(json.dumps(card), encoding="utf-8")
    ranker = root / "ranker-context"
    config = with_ranker(job_config(root, tiny_encoder_dir, sample_index, *HYBRID,
                                    reranker=reranker), ranker)
    sources = tuple(dataclasses.replace(s, text_dir=str(train_texts))
                    if s.format == "codiesp" else s for s in SAMPLE_TERMINOLOGY.sources)
    train_ranker(dataclasses.replace(config, terminology=TerminologyConfig(sources=sources)),
                 ranker)
    return ContextModels(reranker, ranker, dev_texts)


def context_config(tmp_path: Path, encoder: Path, index: Path, base_ranker: Path,
                   models: ContextModels, *overrides: str) -> JobConfig:
    """The job with hybrid candidates, the ranker, and the context stage over the dev sample
    read with its documents (``input.text_dir``)."""
    return with_ranker(job_config(
        tmp_path, encoder, index, *HYBRID, "context.batch_size=1", "context.top_n=5",
        f"context.reranker={models.reranker}", f"context.ranker={models.ranker}",
        f"input.text_dir={models.dev_texts}", "input.context_column=context", *overrides),
        base_ranker)


def middle_confidence(config: JobConfig, mentions: pd.DataFrame) -> float:
    """A ``context.below`` that gates some of the mentions, not all: the middle one of their
    distinct context-free confidences."""
    plain = dataclasses.replace(config, context=dataclasses.replace(config.context,
                                                                    reranker="", ranker=""))
    values = sorted(set(Linker.from_config(plain).link(mentions)["confidence"].dropna()))
    assert len(values) > 2, "the ranker gives every mention the same confidence"
    return float(values[len(values) // 2])


def test_the_job_links_gated_mentions_in_context_as_the_core_linker_does(
    spark, tmp_path, tiny_encoder_dir, sample_index, hybrid_ranker, context_models,  # noqa: F811
):
    mentions = read_gold(sample_path("codiesp_dev_sample.tsv"), "codiesp",
                         text_dir=context_models.dev_texts)
    config = context_config(tmp_path, tiny_encoder_dir, sample_index, hybrid_ranker,
                            context_models, "context.same_category_chars=0")
    below = middle_confidence(config, mentions)
    config = dataclasses.replace(config, context=dataclasses.replace(config.context,
                                                                     below=below))
    summary = run_job(spark, config, run_id="context")
    table = read_table(config.output.path)
    assert len(table) == len(mentions) == table["mention_id"].nunique()

    core = Linker.from_config(config)
    expected = core.link(mentions, context_columns=CONTEXT)
    assert_matches_core(table, expected)
    counts = core.take_context_counts()
    # some mentions went through the stage, not all; the share is in the summary
    assert 0 < counts["context_stage"] < counts["with_context"] == len(mentions)
    stage = summary["context_stage"]
    assert stage["with_context"] == counts["with_context"]
    assert stage["mentions"] == counts["context_stage"]
    assert counts["context_lists"] <= stage["lists"] <= stage["mentions"]
    assert summary["timings_s"]["context"] > 0
    assert summary["udf_task_seconds"]["context"] > 0
    # the stage's rows carry the context cross-encoder's scores; the others come from the
    # span alone (the job's ranker reads no cross-encoder)
    rescored = table["candidates"].map(lambda c: any(x["rerank_score"] is not None
                                                     for x in c))
    assert int(rescored.sum()) == stage["mentions"]
    # the rows' ranker_version covers the context stage
    versions = lineage_versions(core.versions, core.context_version)
    assert summary["ranker_version"] == versions["ranker_version"] != ranker_hash(hybrid_ranker)
    assert set(table["ranker_version"]) == {versions["ranker_version"]}
    assert summary["context_version"] == core.context_version != ""


def test_context_that_cannot_be_read_takes_the_context_free_path_and_reruns_relink_once(
    spark, tmp_path, tiny_encoder_dir, sample_index, hybrid_ranker, context_models,  # noqa: F811
):
    from clinlinker_spark.spark.pipeline import link_mentions

    mentions = read_gold(sample_path("codiesp_dev_sample.tsv"), "codiesp",
                         text_dir=context_models.dev_texts).head(120)
    mentions = mentions.drop(columns=["code", "codes"], errors="ignore")
    # empty contexts, offsets outside the context, start after end, a null context
    mentions.loc[0::4, "context"] = ""
    mentions.loc[1::4, "context_end"] = mentions.loc[1::4, "context"].str.len() + 5
    mentions.loc[2::8, "context_start"] = mentions.loc[2::8, "context_end"]
    mentions["context"] = mentions["context"].astype(object)
    mentions.loc[6::8, "context"] = None
    frame = spark.createDataFrame(mentions[["mention_id", "doc_id", "start", "end", "text",
                                            "label", *CONTEXT]])
    config = context_config(tmp_path, tiny_encoder_dir, sample_index, hybrid_ranker,
                            context_models, "input.passthrough_columns=[]",
                            "output.incremental=true", "context.below=1.0")
    plain = dataclasses.replace(config, context=dataclasses.replace(config.context,
                                                                    reranker="", ranker=""))
    first = run_job(spark, plain, mentions=frame)
    assert first["context_stage"] == {"with_context": 0, "mentions": 0, "lists": 0}
    expected_plain = Linker.from_config(plain).link(mentions)
    assert_matches_core(read_table(config.output.path), expected_plain)

    # turning the stage on changes the rows' versions: every mention is linked again
    summary = run_job(spark, config, mentions=frame)
    assert summary["skipped_already_linked"] == 0
    assert summary["rows_replaced"] == len(mentions)
    core = Linker.from_config(config)
    expected = core.link(mentions, context_columns=CONTEXT)
    counts = core.take_context_counts()
    assert 0 < counts["with_context"] < len(mentions)  # the broken ones have none
    assert summary["context_stage"]["with_context"] == counts["with_context"]
    assert summary["context_stage"]["mentions"] == counts["context_stage"]
    assert_matches_core(read_table(config.output.path), expected)
    # a mention without a usable context kept its context-free link
    usable = pd.Series(core_usable(mentions), index=mentions.index)
    plain_by_id = expected_plain.set_index("mention_id")
    for mention_id in mentions.loc[~usable, "mention_id"]:
        row = expected.set_index("mention_id").loc[mention_id]
        assert row["code"] == plain_by_id.loc[mention_id, "code"]

    # the same night again: nothing to link, nothing through the stage
    again = run_job(spark, config, mentions=frame)
    assert again["skipped_already_linked"] == len(mentions)
    assert again["context_stage"]["mentions"] == 0 and again["rows_written"] == 0

    # the DataFrame transform gives the rows the job wrote
    rows = link_mentions(frame, config).toPandas()
    assert_matches_core(rows, expected)


def core_usable(mentions: pd.DataFrame) -> list[bool]:
    from clinlinker_spark.context import has_context

    return has_context(*(mentions[c] for c in CONTEXT)).tolist()


def test_the_context_stage_is_checked_before_any_work(
    spark, tmp_path, tiny_encoder_dir, tiny_cross_encoder_dir, sample_index, hybrid_ranker,  # noqa: F811
    context_models,
):
    config = context_config(tmp_path, tiny_encoder_dir, sample_index, hybrid_ranker,
                            context_models)
    no_column = dataclasses.replace(config, input=dataclasses.replace(config.input,
                                                                      context_column=""))
    with pytest.raises(ConfigError, match="input.context_column"):
        run_job(spark, no_column)
    span_only = dataclasses.replace(config, context=dataclasses.replace(
        config.context, reranker=str(tiny_cross_encoder_dir)))
    with pytest.raises(ConfigError, match="span alone"):
        run_job(spark, span_only)
    no_ranker = dataclasses.replace(config, context=dataclasses.replace(
        config.context, ranker=str(tmp_path / "nowhere")))
    with pytest.raises(ArtifactError, match="no context ranker"):
        run_job(spark, no_ranker)
    missing = dataclasses.replace(config, input=dataclasses.replace(
        config.input, context_column="sentence"))
    from clinlinker_spark.errors import InputDataError

    with pytest.raises(InputDataError, match="sentence"):
        run_job(spark, missing)
    with pytest.raises(ConfigError, match="text_dir"):
        dataclasses.replace(config.input, format="parquet")
    assert not (Path(config.output.path) / "_delta_log").exists()  # nothing written


def test_a_pyfunc_model_bundles_the_context_stage(
    tmp_path, tiny_encoder_dir, sample_index, hybrid_ranker, context_models,  # noqa: F811
):
    import mlflow.pyfunc
    import yaml

    from clinlinker_spark.cli import main
    from clinlinker_spark.config import to_dict

    config = context_config(tmp_path, tiny_encoder_dir, sample_index, hybrid_ranker,
                            context_models, "context.below=1.0")
    data = to_dict(config)
    data["input"]["context_column"] = ""  # a served model reads each request's columns
    data["mlflow"] = {"tracking_uri": ""}
    conf = tmp_path / "job.yaml"
    conf.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["export-pyfunc", "--config", str(conf), "--out",
                 str(tmp_path / "pyfunc")]) == 0
    model = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    mentions = read_gold(sample_path("codiesp_dev_sample.tsv"), "codiesp",
                         text_dir=context_models.dev_texts).head(40)
    mentions = mentions[["mention_id", "text", *CONTEXT]]
    core = Linker.from_config(config)
    want = core.link(mentions, context_columns=CONTEXT)
    assert core.take_context_counts()["context_stage"] > 0
    got = model.predict(mentions)
    pd.testing.assert_frame_equal(got.drop(columns=["candidates"]),
                                  want.drop(columns=["candidates"]))
    assert got["candidates"].tolist() == want["candidates"].tolist()
    # without the context columns: the context-free links
    plain = model.predict(mentions[["mention_id", "text"]])
    assert plain["candidates"].tolist() == core.link(mentions[["mention_id", "text"]])[
        "candidates"].tolist()
    assert plain["candidates"].tolist() != want["candidates"].tolist()
