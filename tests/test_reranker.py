"""CrossEncoderReranker on a tiny random BertForSequenceClassification (num_labels=1)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import CORPUS

from clinlinker_spark.config import RerankerConfig
from clinlinker_spark.errors import ModelLoadError
from clinlinker_spark.modeling import model_hash
from clinlinker_spark.reranker import CrossEncoderReranker

MENTIONS = [
    "ic congestiva",
    "dolor abdominal agudo con náuseas y vómitos e insuficiencia renal crónica",
    "fiebre",
    "dm tipo 2",
    "tc",
    "fractura de fémur derecho tras caída",
    "cefalea",
    "neumonía",
]
TERMS = [
    "insuficiencia cardiaca congestiva",
    "dolor abdominal",
    "fiebre y tos",
    "diabetes mellitus tipo 2",
    "tomografía computarizada de tórax y abdomen con contraste intravenoso",
    "fractura de fémur",
    "cefalea",
    "neumonía bilateral",
]


@pytest.fixture(scope="module")
def reranker(tiny_cross_encoder_dir: Path) -> CrossEncoderReranker:
    return CrossEncoderReranker(tiny_cross_encoder_dir, device="cpu")


@pytest.fixture()
def three_label_dir(tiny_cross_encoder_dir: Path, tmp_path: Path) -> Path:
    """A sequence classifier with num_labels=3 (a classifier, not a cross-encoder)."""
    from transformers import AutoConfig, BertForSequenceClassification

    out = tmp_path / "three-labels"
    shutil.copytree(tiny_cross_encoder_dir, out)
    config = AutoConfig.from_pretrained(out, local_files_only=True, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    return out


def _manual_logit(r: CrossEncoderReranker, mention: str, term: str) -> float:
    enc = r.tokenizer(mention, term, truncation=True, max_length=r.max_length, return_tensors="pt")
    with torch.inference_mode():
        return float(r.model(**enc).logits[0, 0])


def test_scores_shape_dtype_and_values(reranker: CrossEncoderReranker) -> None:
    scores = reranker.score(MENTIONS, TERMS)
    assert scores.shape == (len(MENTIONS),) and scores.dtype == np.float32
    assert np.all(np.isfinite(scores))
    assert len(np.unique(scores)) == len(MENTIONS)  # not a constant
    expected = [_manual_logit(reranker, m, t) for m, t in zip(MENTIONS, TERMS)]
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_pairs_are_text_pairs(reranker: CrossEncoderReranker) -> None:
    """(mention, term) is one pair with two segments, not two texts or one concatenation."""
    enc = reranker.tokenizer(MENTIONS[0], TERMS[0])
    sep = reranker.tokenizer.sep_token_id
    assert enc["input_ids"].count(sep) == 2
    swapped = reranker.score([TERMS[0]], [MENTIONS[0]])[0]
    assert abs(swapped - reranker.score([MENTIONS[0]], [TERMS[0]])[0]) > 1e-7


def test_empty(reranker: CrossEncoderReranker) -> None:
    out = reranker.score([], [])
    assert out.shape == (0,) and out.dtype == np.float32


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 64])
def test_scores_do_not_depend_on_batch(tiny_cross_encoder_dir: Path, batch_size: int) -> None:
    r = CrossEncoderReranker(tiny_cross_encoder_dir, batch_size=batch_size, device="cpu")
    scores = r.score(MENTIONS, TERMS)
    single = np.array([r.score([m], [t])[0] for m, t in zip(MENTIONS, TERMS)])
    np.testing.assert_allclose(scores, single, atol=1e-5)


def test_order_is_restored(tiny_cross_encoder_dir: Path) -> None:
    r = CrossEncoderReranker(tiny_cross_encoder_dir, batch_size=3, device="cpu")
    mentions = MENTIONS + CORPUS[:6]
    terms = TERMS + CORPUS[6:12]
    scores = r.score(mentions, terms)
    perm = np.random.default_rng(3).permutation(len(mentions))
    permuted = r.score([mentions[i] for i in perm], [terms[i] for i in perm])
    np.testing.assert_allclose(permuted, scores[perm], atol=1e-6)


def test_one_mention_against_many_terms(reranker: CrossEncoderReranker) -> None:
    mention = "insuficiencia cardiaca"
    scores = reranker.score([mention] * len(CORPUS), CORPUS)
    for i in (0, 5, len(CORPUS) - 1):
        assert scores[i] == pytest.approx(_manual_logit(reranker, mention, CORPUS[i]), abs=1e-5)


def test_input_checks(reranker: CrossEncoderReranker) -> None:
    with pytest.raises(ValueError, match="same length"):
        reranker.score(MENTIONS, TERMS[:-1])
    with pytest.raises(TypeError):
        reranker.score("fiebre", "fiebre y tos")


def test_num_labels_other_than_one_refused(three_label_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="num_labels == 3"):
        CrossEncoderReranker(three_label_dir, device="cpu")


def test_plain_encoder_is_not_a_cross_encoder(tiny_encoder_dir: Path) -> None:
    # A BertModel config defaults to two labels: refused rather than given a random head.
    with pytest.raises(ModelLoadError, match="num_labels"):
        CrossEncoderReranker(tiny_encoder_dir, device="cpu")


def test_not_a_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        CrossEncoderReranker(tmp_path, device="cpu")


def test_from_config(tiny_cross_encoder_dir: Path) -> None:
    r = CrossEncoderReranker.from_config(
        RerankerConfig(path=str(tiny_cross_encoder_dir), batch_size=5, max_length=16,
                       device="cpu")
    )
    assert (r.batch_size, r.max_length, r.device) == (5, 16, torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="empty"):
        CrossEncoderReranker.from_config(RerankerConfig(path=""))


def test_max_length_truncates_pairs(tiny_cross_encoder_dir: Path) -> None:
    r = CrossEncoderReranker(tiny_cross_encoder_dir, max_length=8, device="cpu")
    enc = r.tokenizer(MENTIONS[1], TERMS[4], truncation=True, max_length=r.max_length)
    assert len(enc["input_ids"]) == 8
    assert np.isfinite(r.score([MENTIONS[1]], [TERMS[4]])).all()


def test_fingerprint_and_hash(
    reranker: CrossEncoderReranker, tiny_cross_encoder_dir: Path, tiny_encoder_dir: Path
) -> None:
    fp = reranker.fingerprint()
    assert fp["path"] == str(tiny_cross_encoder_dir)
    assert fp["model_hash"] == reranker.model_hash == model_hash(tiny_cross_encoder_dir)
    assert fp["model_hash"] != model_hash(tiny_encoder_dir)
    assert fp["max_length"] == 64 and fp["model_type"] == "bert"
