"""The context stage: a context-aware cross-encoder and the ranker trained on its scores link
again the mentions whose context-free link is uncertain (tiny random models: these tests check
the plumbing, not accuracy)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from clinlinker_spark.config import ContextConfig, RerankerConfig
from clinlinker_spark.corpora import read_codiesp
from clinlinker_spark.errors import ConfigError
from clinlinker_spark.linker import Linker
from clinlinker_spark.ranker import Ranker
from clinlinker_spark.reranker import CrossEncoderReranker
from clinlinker_spark.samples import sample_path
from clinlinker_spark.training import ranker as training
from test_ranker import LINKING, SETTINGS, setup  # noqa: F401 (the module's fixture)
from tiny_models import make_tiny_cross_encoder

CONTEXT_CHARS = 80


def _documents(gold: pd.DataFrame, folder: Path) -> Path:
    """A text file per document with each contiguous mention at its offsets and filler words
    between (the sample ships annotations, not documents)."""
    folder.mkdir(parents=True, exist_ok=True)
    for doc, rows in gold.groupby("doc_id"):
        size = int(rows["end"].max()) + 40
        chars = list(("palabra " * (size // 8 + 1))[:size])
        for start, end, text in zip(rows["start"], rows["end"], rows["text"]):
            if end - start == len(text):
                chars[start:end] = list(text)
        (folder / f"{doc}.txt").write_text("".join(chars), encoding="utf-8")
    return folder


@dataclasses.dataclass
class Stage:
    reranker: CrossEncoderReranker
    ranker_path: Path
    spec: dict
    texts: Path
    seen: set[str]


@pytest.fixture(scope="module")
def stage(setup, tmp_path_factory) -> Stage:  # noqa: F811 (the imported fixture)
    root = tmp_path_factory.mktemp("context")
    gold_path = sample_path("codiesp_train_sample.tsv")
    gold = read_codiesp(gold_path)
    texts = _documents(gold, root / "text_files")
    model = make_tiny_cross_encoder(root / "ce")
    docs = sorted(gold["doc_id"].unique())
    seen = {f"codiesp_train/{d}" for d in docs[: len(docs) // 2]}
    card = {"kind": "clinlinker-crossencoder-training",
            "context": {"chars": CONTEXT_CHARS, "markers": ["<<", ">>"]},
            "data": {"documents": sorted(seen)}}
    (model / "training_card.json").write_text(json.dumps(card), encoding="utf-8")
    reranker = CrossEncoderReranker(model, max_length=48)
    sources = tuple(dataclasses.replace(s, text_dir=str(texts)) if s.format == "codiesp" else s
                    for s in setup.config.terminology.sources)
    config = dataclasses.replace(
        setup.config, terminology=dataclasses.replace(setup.config.terminology,
                                                      sources=sources),
        reranker=RerankerConfig(path=str(model), top_n=5, max_length=48))
    linker = Linker(setup.encoder, setup.index, LINKING, reranker, config.reranker)
    out = root / "ranker"
    spec = training.train_ranker(config, out, linker=linker)
    return Stage(reranker, out, spec, texts, seen)


def test_the_context_ranker_learns_only_from_documents_the_cross_encoder_did_not_see(
        setup, stage):  # noqa: F811
    assert stage.reranker.context_chars == CONTEXT_CHARS
    assert stage.reranker.documents == frozenset(stage.seen)
    data = training.load_training_mentions(dataclasses.replace(
        setup.config, terminology=dataclasses.replace(setup.config.terminology, sources=tuple(
            dataclasses.replace(s, text_dir=str(stage.texts)) if s.format == "codiesp" else s
            for s in setup.config.terminology.sources))))
    linker = Linker(setup.encoder, setup.index, LINKING, stage.reranker,
                    RerankerConfig(top_n=5, max_length=48))
    kept = training.unseen_by_reranker(linker, data)
    seen = kept.mentions["doc_key"].isin(stage.seen)
    # the seen documents' mentions stay in every fold's view of the index (fold -1) and give
    # no example; the others keep their folds
    assert (kept.mentions.loc[seen, "fold"] == -1).all() and seen.any()
    assert (kept.mentions.loc[~seen, "fold"] == data.mentions.loc[~seen, "fold"]).all()
    view = training.fold_terminology(kept, 0)
    assert set(kept.mentions.loc[seen, "text_norm"]) <= set(view["term_norm"])
    assert stage.spec["metrics"]["mentions"] == int((~seen).sum()) > 0
    assert "rerank" in stage.spec["features"]
    # each training mention's query is its marked context, not its text
    unseen = kept.mentions[~seen].head(20)
    queries = training.mention_queries(linker, unseen)
    assert all("<<" in q and ">>" in q for q in queries)
    contiguous = unseen["context_end"] - unseen["context_start"]
    for query, text, width in zip(queries, unseen["text_norm"], contiguous):
        if width == len(text):  # a contiguous mention: its text is what is marked
            assert f"<< {text} >>" in query
    everything = copy.copy(stage.reranker)
    everything.documents = frozenset(data.mentions["doc_key"])
    with pytest.raises(ConfigError, match="every training mention"):
        training.unseen_by_reranker(
            Linker(setup.encoder, setup.index, LINKING, everything,
                   RerankerConfig(top_n=5, max_length=48)), data)


def _linker(setup, stage, **settings) -> Linker:  # noqa: F811
    ctx = ContextConfig(reranker=str(stage.reranker.path), ranker=str(stage.ranker_path),
                        top_n=5, max_length=48, **settings)
    base = Ranker.load(_base_ranker(setup))
    second = Linker(setup.encoder, setup.index, LINKING, stage.reranker,
                    RerankerConfig(path=ctx.reranker, top_n=5, max_length=48),
                    Ranker.load(stage.ranker_path))
    return Linker(setup.encoder, setup.index, LINKING, ranker=base, context_stage=second,
                  context_config=ctx)


_BASE: dict[str, Path] = {}


def _base_ranker(setup) -> Path:  # noqa: F811
    if "path" not in _BASE:
        import tempfile

        out = Path(tempfile.mkdtemp()) / "ranker"
        training.train_ranker(setup.config, out, linker=setup.linker)
        _BASE["path"] = out
    return _BASE["path"]


def _mentions(stage: Stage) -> pd.DataFrame:
    from clinlinker_spark.corpora import read_gold

    gold = read_gold(sample_path("codiesp_train_sample.tsv"), "codiesp",
                     text_dir=stage.texts)
    gold = gold[gold["label"] == "DIAGNOSTICO"].head(60).reset_index(drop=True)
    return gold


def test_mentions_without_context_take_the_context_free_path(setup, stage):  # noqa: F811
    mentions = _mentions(stage)
    plain = Linker(setup.encoder, setup.index, LINKING,
                   ranker=Ranker.load(_base_ranker(setup)))
    expected = plain.link(mentions)
    linker = _linker(setup, stage, below=1.0, same_category_chars=3)
    # no context columns: today's result, nothing sent to the stage
    assert linker.link(mentions).equals(expected)
    assert linker.take_context_counts()["context_stage"] == 0
    # contexts that are empty or whose offsets do not fit: the same
    broken = mentions.assign(context="", context_start=-1, context_end=-1)
    broken.loc[::2, "context"] = "corto"
    broken.loc[::2, "context_start"] = 2
    broken.loc[::2, "context_end"] = 40
    out = linker.link(broken, context_columns=("context", "context_start", "context_end"))
    assert out.equals(expected)
    counts = linker.take_context_counts()
    assert counts == {"mentions": len(mentions), "with_context": 0, "context_stage": 0,
                      "context_lists": 0}


def test_the_context_stage_links_again_only_the_mentions_it_gates(setup, stage):  # noqa: F811
    mentions = _mentions(stage)
    columns = ("context", "context_start", "context_end")
    plain = Linker(setup.encoder, setup.index, LINKING,
                   ranker=Ranker.load(_base_ranker(setup))).link(mentions)
    # nothing gated: today's result, every mention counted as having a context
    none = _linker(setup, stage, below=0.0, same_category_chars=0)
    assert none.link(mentions, context_columns=columns).equals(plain)
    assert none.take_context_counts() == {"mentions": len(mentions),
                                          "with_context": len(mentions), "context_stage": 0,
                                          "context_lists": 0}
    # every mention gated: each is ranked by the context ranker, its candidates re-scored
    every = _linker(setup, stage, below=1.0, same_category_chars=0)
    out = every.link(mentions, context_columns=columns)
    counts = every.take_context_counts()
    linked = out["candidates"].map(len) > 0
    assert counts["context_stage"] == int(linked.sum())
    assert 0 < counts["context_lists"] <= counts["context_stage"]
    assert all(c[0]["rerank_score"] is not None for c in out.loc[linked, "candidates"])
    assert all(c[0]["rerank_score"] is None for c in plain.loc[linked, "candidates"])
    # the same (form, context) twice is one list; the same form in another context is another
    twice = pd.concat([mentions.head(1), mentions.head(1)], ignore_index=True)
    twice["mention_id"] = ["a", "b"]
    every.link(twice, context_columns=columns)
    assert every.take_context_counts()["context_lists"] == 1
    ctx, start = twice.loc[1, "context"], int(twice.loc[1, "context_start"])
    twice.loc[1, "context"] = ctx[:start] + "grave " + ctx[start:]  # a word beside the mention
    twice.loc[1, "context_start"] += 6
    twice.loc[1, "context_end"] += 6
    every.link(twice, context_columns=columns)
    assert every.take_context_counts()["context_lists"] == 2
    # the category gate alone sends the mentions whose first two codes share a category
    by_category = _linker(setup, stage, below=0.0, same_category_chars=3)
    by_category.link(mentions, context_columns=columns)
    shared = sum(len(c) > 1 and c[0]["code"].replace(".", "").lower()[:3]
                 == c[1]["code"].replace(".", "").lower()[:3] for c in plain["candidates"])
    assert by_category.take_context_counts()["context_stage"] == shared


def test_a_context_stage_needs_a_context_aware_cross_encoder(setup, stage):  # noqa: F811
    base = Ranker.load(_base_ranker(setup))
    span_only = copy.copy(stage.reranker)
    span_only.context_chars = 0
    second = Linker(setup.encoder, setup.index, LINKING, span_only,
                    RerankerConfig(top_n=5, max_length=48), Ranker.load(stage.ranker_path))
    with pytest.raises(ConfigError, match="context-aware"):
        Linker(setup.encoder, setup.index, LINKING, ranker=base, context_stage=second)
    with pytest.raises(ConfigError, match="context.ranker"):
        ContextConfig(reranker="somewhere")


def test_context_training_queries_are_one_per_mention_with_a_context():
    from clinlinker_spark.training.crossencoder import contextual_queries
    from clinlinker_spark.training.negatives import MinedNegative, MinedQuery

    negative = MinedNegative(code="f17.200", term="dependencia de nicotina", score=0.8)
    mined = [MinedQuery("fumadora", "f17210", "tabaquismo de cigarrillos", 0.7, (negative,)),
             MinedQuery("hta", "i10", "hipertension", 0.9, (negative,))]
    mentions = pd.DataFrame({
        "text": ["fumadora", "Fumadora", "HTA", "HTA"],
        "code": ["F17.210", "f17.210", "I10", "I10"],
        "is_composite": False, "is_no_code": False, "source": "codiesp",
        "doc_id": ["d1", "d2", "d1", "d3"],
        "context": ["fumadora de 20 cigarrillos al día", "Fumadora de puros", "", "HTA"],
        "context_start": [0, 0, -1, 0], "context_end": [8, 8, -1, 3],
    })
    queries, documents = contextual_queries(mentions, mined, context_chars=200)
    assert [q.query for q in queries] == ["<< fumadora >> de 20 cigarrillos al día",
                                          "<< fumadora >> de puros", "<< hta >>"]
    # the mined negatives and positives of the (text, code) come along
    assert queries[0].negatives == (negative,) and queries[2].gold_code == "i10"
    assert documents == ["codiesp/d1", "codiesp/d2", "codiesp/d3"]
    with pytest.raises(ConfigError, match="text_dir"):
        contextual_queries(mentions.drop(columns=["context"]), mined, 200)


def test_context_training_config_is_checked():
    from clinlinker_spark.config import TerminologySourceConfig
    from clinlinker_spark.training.config import CrossEncoderTrainConfig, TrainDataConfig

    gold = TerminologySourceConfig(path="gold.tsv", format="codiesp")
    with pytest.raises(ConfigError, match="text_dir"):
        CrossEncoderTrainConfig(index="idx", context=True,
                                data=TrainDataConfig(sources=(gold,)))
    with_text = dataclasses.replace(gold, text_dir="docs")
    CrossEncoderTrainConfig(index="idx", context=True, document_share=0.5,
                            data=TrainDataConfig(sources=(with_text,)))
    with pytest.raises(ConfigError, match="document_share"):
        CrossEncoderTrainConfig(index="idx", document_share=0.0)
    with pytest.raises(ConfigError, match="gold formats"):
        TerminologySourceConfig(path="t.csv", format="table", text_dir="docs")
