"""Training on tiny models: losses, the loss going down, checkpoint + resume equal to an
uninterrupted run, hard negatives never holding the gold code, the cross-encoder directory
loading as a re-ranker, the CLI commands, and TorchDistributor (local mode, one process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import CORPUS

from clinlinker_spark.config import IndexConfig, load_config
from clinlinker_spark.encoder import BiEncoder
from clinlinker_spark.index import TerminologyIndex, build_index
from clinlinker_spark.reranker import CrossEncoderReranker
from clinlinker_spark.training.biencoder import train_biencoder
from clinlinker_spark.training.config import BiEncoderTrainConfig, CrossEncoderTrainConfig
from clinlinker_spark.training.crossencoder import train_crossencoder
from clinlinker_spark.training.losses import (
    info_nce_loss,
    listwise_loss,
    multi_similarity_loss,
    triplet_margin_mine,
)
from clinlinker_spark.training.negatives import mine_hard_negatives
from clinlinker_spark.training.pairs import Pair

# Each CORPUS concept with three surface forms -> three pairs per code.
FORMS = {f"c{i}": [t, f"{t} grave", f"{t} leve"] for i, t in enumerate(CORPUS)}
PAIRS = [Pair(a, b, code) for code, forms in FORMS.items()
         for a, b in ((forms[0], forms[1]), (forms[0], forms[2]), (forms[1], forms[2]))]


def _bi_config(tiny_encoder_dir: Path, out: Path, *sets: str) -> BiEncoderTrainConfig:
    base = [f"base_model={tiny_encoder_dir}", f"output_dir={out}", "run.progress=false",
            "run.num_threads=2", "run.resume=never", "optim.learning_rate=1e-3",
            "optim.warmup_ratio=0.0", "run.log_every=100"]
    return load_config(None, base + list(sets), cls=BiEncoderTrainConfig)


# --------------------------------------------------------------------------------------------
# Losses


def test_multi_similarity_loss_prefers_embeddings_that_group_codes() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    good = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]]), dim=1)
    bad = good[[0, 2, 1, 3]]
    loss_good, _ = multi_similarity_loss(good, labels, miner_margin=None)
    loss_bad, _ = multi_similarity_loss(bad, labels, miner_margin=None)
    assert loss_good < loss_bad
    emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=1).requires_grad_(True)
    loss, stats = multi_similarity_loss(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    loss.backward()
    assert torch.isfinite(loss) and emb.grad is not None
    assert stats["pos_pairs"] > 0


def test_triplet_miner_keeps_only_pairs_within_the_margin() -> None:
    sim = torch.tensor([[1.0, 0.9, 0.1, 0.85],
                        [0.9, 1.0, 0.2, 0.3],
                        [0.1, 0.2, 1.0, 0.4],
                        [0.85, 0.3, 0.4, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    pos, neg = triplet_margin_mine(sim, labels, margin=0.2)
    # anchor 0: positive 1 (0.9) is within 0.2 of negative 3 (0.85): both mined; negative 2
    # (0.1) is far below 0.9 - 0.2: not mined
    assert pos[0, 1] and neg[0, 3] and not neg[0, 2]
    assert not pos.diagonal().any() and not neg.diagonal().any()
    text_ids = torch.tensor([0, 0, 1, 2])  # rows 0 and 1 are one text: never a pair
    pos, _ = triplet_margin_mine(sim, labels, 0.2, text_ids)
    assert not pos[0, 1]


def test_info_nce_and_listwise_losses() -> None:
    a = torch.nn.functional.normalize(torch.eye(4)[:, :4], dim=1)
    loss_aligned, _ = info_nce_loss(a, a, torch.arange(4))
    loss_shuffled, _ = info_nce_loss(a, a[[1, 0, 3, 2]], torch.arange(4))
    assert loss_aligned < loss_shuffled
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, -100.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    assert listwise_loss(logits, valid) > listwise_loss(logits[:1], valid[:1])


# --------------------------------------------------------------------------------------------
# Bi-encoder training


def test_biencoder_loss_decreases_and_output_is_an_encoder(tiny_encoder_dir, tmp_path) -> None:
    # one micro-batch holds every pair, so each step sees the same examples
    cfg = _bi_config(tiny_encoder_dir, tmp_path / "bi", f"optim.batch_size={len(PAIRS)}",
                     "optim.max_steps=12", "loss.miner=none", "optim.learning_rate=3e-3")
    result = train_biencoder(cfg, pairs=PAIRS, data_hashes={"test": "0"})
    losses = result.step_losses
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])
    assert losses[5] < losses[0]
    out = result.output_dir
    assert out is not None and (out / "model.safetensors").is_file()
    card = json.loads((out / "training_card.json").read_text())
    for key in ("data", "config", "metrics", "libraries", "device", "wall_time_s",
                "model_hash", "base_model", "encoder"):
        assert key in card
    assert card["data"]["pairs"]["pairs"] == len(PAIRS)
    assert card["metrics"]["step_losses"] == losses
    enc = BiEncoder(out, pooling="mean", max_length=32)
    vecs = enc.encode(["fiebre y tos", "fiebre y tos grave", "cefalea"])
    assert vecs.shape == (3, 32)
    assert float(vecs[0] @ vecs[1]) > float(vecs[0] @ vecs[2])


def test_infonce_option_trains(tiny_encoder_dir, tmp_path) -> None:
    # one micro-batch holds every pair: the loss on the same examples must come down
    cfg = _bi_config(tiny_encoder_dir, tmp_path / "bi", f"optim.batch_size={len(PAIRS)}",
                     "optim.max_steps=12", "loss.name=infonce", "loss.miner=none",
                     "optim.learning_rate=3e-3")
    result = train_biencoder(cfg, pairs=PAIRS)
    losses = result.step_losses
    assert result.global_step == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


def test_checkpoint_resume_gives_the_same_next_steps(tiny_encoder_dir, tmp_path) -> None:
    sets = ["optim.batch_size=8", "optim.epochs=2", "optim.gradient_accumulation=2",
            "run.checkpoint_every=2", "optim.warmup_ratio=0.2"]
    # 66 pairs -> 8 micro-batches per epoch -> 4 steps per epoch -> 8 steps
    full = train_biencoder(_bi_config(tiny_encoder_dir, tmp_path / "full", *sets),
                           pairs=PAIRS)
    assert full.total_steps == 8
    interrupted_cfg = _bi_config(tiny_encoder_dir, tmp_path / "resumed", *sets)
    part = train_biencoder(interrupted_cfg, pairs=PAIRS, stop_after_steps=5)
    assert part.output_dir is None and part.global_step == 5
    ckpts = sorted(p.name for p in (tmp_path / "resumed-checkpoints").iterdir())
    assert ckpts == ["step-0000002", "step-0000004"]  # keep_checkpoints=2
    resumed_cfg = _bi_config(tiny_encoder_dir, tmp_path / "resumed", *sets, "run.resume=auto")
    resumed = train_biencoder(resumed_cfg, pairs=PAIRS)
    # resumed from step 4: steps 5..8 replay the uninterrupted run exactly
    assert resumed.global_step == 8
    assert resumed.step_losses == pytest.approx(full.step_losses, abs=1e-6)
    a = load_file(str(full.output_dir / "model.safetensors"))
    b = load_file(str(resumed.output_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    card = json.loads((resumed.output_dir / "training_card.json").read_text())
    assert card["metrics"]["resumed_from_step"] == 4
    assert not (tmp_path / "resumed-checkpoints").exists()  # cleared once the output exists


def test_existing_output_fails_before_training(tiny_encoder_dir, tmp_path) -> None:
    from clinlinker_spark.errors import ArtifactError

    (tmp_path / "bi").mkdir()
    (tmp_path / "bi" / "config.json").write_text("{}")
    cfg = _bi_config(tiny_encoder_dir, tmp_path / "bi", "optim.batch_size=8", "optim.max_steps=2")
    with pytest.raises(ArtifactError, match="overwrite"):
        train_biencoder(cfg, pairs=PAIRS)


def test_checkpoint_holds_no_pickle(tiny_encoder_dir, tmp_path) -> None:
    cfg = _bi_config(tiny_encoder_dir, tmp_path / "bi", "optim.batch_size=8",
                     "optim.max_steps=4", "run.checkpoint_every=2")
    train_biencoder(cfg, pairs=PAIRS, stop_after_steps=2)
    ckpt = tmp_path / "bi-checkpoints" / "step-0000002"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng.safetensors", "scaler.json", "scheduler.json", "trainer_state.json"]
    state = load_file(str(ckpt / "optimizer.safetensors"))
    assert any(k.endswith(".exp_avg") for k in state)


def test_resume_refuses_a_checkpoint_of_another_run(tiny_encoder_dir, tmp_path) -> None:
    from clinlinker_spark.errors import ConfigError

    sets = ["optim.batch_size=8", "optim.max_steps=4", "run.checkpoint_every=2"]
    train_biencoder(_bi_config(tiny_encoder_dir, tmp_path / "bi", *sets), pairs=PAIRS,
                    stop_after_steps=2)
    other = _bi_config(tiny_encoder_dir, tmp_path / "bi", *sets, "run.resume=auto",
                       "optim.learning_rate=5e-4")
    with pytest.raises(ConfigError, match="another run"):
        train_biencoder(other, pairs=PAIRS)


# --------------------------------------------------------------------------------------------
# Hard negatives and the cross-encoder


@pytest.fixture(scope="module")
def tiny_index(tiny_encoder_dir, tmp_path_factory) -> Path:
    rows = [(code, form) for code, forms in FORMS.items() for form in forms]
    rows += [("c0", "fiebre y tos grave"), ("c1", "fiebre y tos grave")]  # a shared text
    terms = pd.DataFrame(rows, columns=["code", "term"])
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(terms, BiEncoder(tiny_encoder_dir, max_length=32), IndexConfig(), out)
    return out


def test_hard_negatives_never_hold_the_gold_code(tiny_encoder_dir, tiny_index) -> None:
    encoder = BiEncoder(tiny_encoder_dir, max_length=32)
    index = TerminologyIndex.load(tiny_index, expected_fingerprint=encoder.fingerprint())
    queries = [f for forms in FORMS.values() for f in forms]
    golds = [code for code, forms in FORMS.items() for _ in forms]
    mined = mine_hard_negatives(encoder, index, queries, golds, top_n=10,
                                min_similarity=-1.0, search_k=1000)  # all texts
    assert len(mined) == len(queries)
    for m in mined:
        codes = [n.code for n in m.negatives]
        assert m.gold_code not in codes
        assert len(codes) == len(set(codes)) and len(codes) == 10
        assert m.query not in {n.term for n in m.negatives}  # own text left out
        assert [n.score for n in m.negatives] == sorted((n.score for n in m.negatives),
                                                        reverse=True)
        assert m.positive_term is not None and m.positive_term != m.query
        assert m.positives[0] == m.positive_term and m.query not in m.positives
        assert len(m.positives) >= 2  # the code's two other forms
    # the text shared by c0 and c1 is a positive for c0 and never a negative of c0
    for m in mined:
        if m.gold_code == "c0":
            assert "fiebre y tos grave" not in {n.term for n in m.negatives}
    floor = mine_hard_negatives(encoder, index, queries[:5], golds[:5], top_n=200,
                                min_similarity=0.5)
    assert all(n.score >= 0.5 for m in floor for n in m.negatives)


def test_crossencoder_trains_from_the_biencoder_and_loads_as_reranker(
        tiny_encoder_dir, tiny_index, tmp_path) -> None:
    cfg = load_config(None, [
        f"biencoder={tiny_encoder_dir}", f"index={tiny_index}", f"output_dir={tmp_path / 'ce'}",
        "optim.batch_size=6", "optim.epochs=2", "optim.learning_rate=5e-4", "positive=sample",
        "head_learning_rate=1e-3", "optim.freeze_layers=1",
        "negatives.min_similarity=-1.0", "negatives.per_query=3", "negatives.top_n=20",
        "run.progress=false", "run.resume=never", "data.sources=[{path: "
        f"{_tiny_gold(tmp_path)}, format: codiesp}}]",
    ], cls=CrossEncoderTrainConfig)
    result = train_crossencoder(cfg)
    assert result.output_dir is not None and result.global_step > 0
    card = json.loads((result.output_dir / "training_card.json").read_text())
    assert card["data"]["mining"]["queries"] > 0
    assert card["data"]["biencoder"]["model_hash"]
    reranker = CrossEncoderReranker(result.output_dir, max_length=32)
    scores = reranker.score(["fiebre y tos", "cefalea"], ["fiebre y tos leve", "cefalea grave"])
    assert scores.shape == (2,) and np.isfinite(scores).all()
    assert reranker.model.config.num_labels == 1


def _fixed_mined() -> list:
    """One query per CORPUS term ("<term> leve"), its term the positive, the next term the
    negative."""
    from clinlinker_spark.training.negatives import MinedNegative, MinedQuery

    return [MinedQuery(f"{t} leve", f"c{i}", t, 0.9,
                       (MinedNegative(f"c{(i + 1) % len(CORPUS)}",
                                      CORPUS[(i + 1) % len(CORPUS)], 0.5),))
            for i, t in enumerate(CORPUS)]


def test_same_category_first_puts_the_gold_codes_siblings_first_in_mined_order() -> None:
    from clinlinker_spark.training.negatives import MinedNegative, MinedQuery, \
        same_category_first

    negatives = tuple(MinedNegative(code, code, score) for code, score in (
        ("f1720", 0.9), ("z720", 0.85), ("f1710", 0.8), ("f1010", 0.7), ("f17200", 0.6)))
    mined = [MinedQuery("fumadora", "f17210", "tabaquismo", 0.9, negatives)]
    [reordered] = same_category_first(mined, 3)
    assert [n.code for n in reordered.negatives] == ["f1720", "f1710", "f17200", "z720",
                                                      "f1010"]
    # the query, its positive and the set of negatives are unchanged
    assert (reordered.query, reordered.positive_term) == ("fumadora", "tabaquismo")
    assert sorted(reordered.negatives, key=lambda n: -n.score) == list(negatives)
    # 4 characters: only the f172 subcategory's codes are siblings; 0 leaves the order
    [four] = same_category_first(mined, 4)
    assert [n.code for n in four.negatives] == ["f1720", "f17200", "z720", "f1710", "f1010"]
    assert same_category_first(mined, 0)[0].negatives == negatives


@pytest.mark.parametrize("loss", ["bce", "listwise"])
def test_crossencoder_learns_the_positive_with_either_loss(tiny_encoder_dir, tiny_index,
                                                          tmp_path, loss) -> None:
    mined = _fixed_mined()
    cfg = load_config(None, [
        f"biencoder={tiny_encoder_dir}", f"index={tiny_index}", f"output_dir={tmp_path / 'ce'}",
        f"optim.batch_size={len(mined)}", "optim.max_steps=80", f"loss={loss}",
        "optim.learning_rate=1e-2", "head_learning_rate=1e-2", "optim.warmup_ratio=0",
        # the thread count fixed: torch's own is whatever an earlier test left it at, and
        # the order of float sums it sets moves this high-learning-rate run
        "run.progress=false", "run.resume=never", "run.num_threads=2",
    ], cls=CrossEncoderTrainConfig)
    result = train_crossencoder(cfg, mined=mined)
    losses = result.step_losses
    # 80 steps: over seeds 0-2, 5 and 13 the loss ends at 0.005-0.60 of where it starts and
    # 86-100% of positives come first (in 18 runs); an untrained model stays near ln 2 and 50%
    assert result.global_step == 80 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    # the trained model ranks each query's positive over its negative
    reranker = CrossEncoderReranker(result.output_dir, max_length=32)
    queries = [m.query for m in mined]
    positive = reranker.score(queries, [m.positive_term for m in mined])
    negative = reranker.score(queries, [m.negatives[0].term for m in mined])
    assert (positive > negative).mean() >= 0.75


def _tiny_gold(tmp_path: Path) -> Path:
    """A CodiEsp-X style file (official layout) with the FORMS as DIAGNOSTICO mentions."""
    lines = []
    for d, (code, forms) in enumerate(FORMS.items()):
        for j, form in enumerate(forms):
            lines.append(f"doc{d % 4}\tDIAGNOSTICO\t{code}\t{form}\t{j * 50} {j * 50 + 10}")
    path = tmp_path / "gold.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Commands


def test_cli_trains_both_models_on_the_shipped_samples(tiny_encoder_dir, tmp_path) -> None:
    from clinlinker_spark.cli import main
    from clinlinker_spark.samples import sample_path

    cie10, train = sample_path("cie10_es.csv"), sample_path("codiesp_train_sample.tsv")
    conf = tmp_path / "bi.yaml"
    conf.write_text(
        f"base_model: {tiny_encoder_dir}\noutput_dir: {tmp_path / 'bi'}\n"
        "data:\n  sources:\n"
        f"    - {{path: {cie10}, format: cie10}}\n"
        f"    - {{path: {train}, format: codiesp, labels: [DIAGNOSTICO]}}\n"
        "optim: {batch_size: 16, max_steps: 2, learning_rate: 1e-4}\n"
        "run: {progress: false, resume: never}\n", encoding="utf-8")
    assert main(["train-biencoder", "--config", str(conf)]) == 0
    assert (tmp_path / "bi" / "training_card.json").is_file()
    assert main(["build-index", "--source", f"cie10={cie10}", "--source", f"codiesp={train}",
                 "--labels", "DIAGNOSTICO", "--encoder", str(tmp_path / "bi"),
                 "--out", str(tmp_path / "idx")]) == 0
    ce_conf = tmp_path / "ce.yaml"
    ce_conf.write_text(
        f"biencoder: {tmp_path / 'bi'}\nindex: {tmp_path / 'idx'}\n"
        f"output_dir: {tmp_path / 'ce'}\n"
        "data:\n  sources:\n"
        f"    - {{path: {train}, format: codiesp, labels: [DIAGNOSTICO]}}\n"
        "negatives: {top_n: 20, min_similarity: -1.0, per_query: 2}\n"
        "optim: {batch_size: 8, max_steps: 2}\nrun: {progress: false, resume: never}\n",
        encoding="utf-8")
    assert main(["train-crossencoder", "--config", str(ce_conf),
                 "--set", "max_length=48"]) == 0
    CrossEncoderReranker(tmp_path / "ce")


# --------------------------------------------------------------------------------------------
# TorchDistributor


@pytest.mark.spark
def test_torch_distributor_local_mode_one_process(spark, tiny_encoder_dir, tmp_path) -> None:
    from clinlinker_spark.samples import sample_path
    from clinlinker_spark.training.distributed import run_biencoder_distributed

    train = sample_path("codiesp_train_sample.tsv")
    cfg = _bi_config(tiny_encoder_dir, tmp_path / "bi", "optim.batch_size=16",
                     "optim.max_steps=2",
                     f"data.sources=[{{path: {train}, format: codiesp, labels: [DIAGNOSTICO]}}]")
    card = run_biencoder_distributed(spark, cfg, num_processes=1, local_mode=True,
                                     use_gpu=False)
    assert card["metrics"]["steps"] == 2
    assert card["device"]["world_size"] == 1
    BiEncoder(tmp_path / "bi", max_length=32)
