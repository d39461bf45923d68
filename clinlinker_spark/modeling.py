"""Helpers shared by the bi-encoder, the cross-encoder and training: devices, loading, hashing.

Models are Hugging Face directories (config.json, safetensors weights, tokenizer files) loaded
from local paths only: ``local_files_only=True``, ``use_safetensors=True``, never
``trust_remote_code``. Pickle-only checkpoints (``pytorch_model.bin``) are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from clinlinker_spark.errors import ModelLoadError

log = logging.getLogger(__name__)

ModelKind = Literal["encoder", "sequence-classification"]

# Files that define a model's behaviour, hashed by model_hash().
HASHED_NAMES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
HASHED_SUFFIXES = (".safetensors",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_HASH_CACHE: dict[tuple[Any, ...], str] = {}
_HASH_LOCK = threading.Lock()


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(device: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """Pick the torch device and the autocast dtype (None: plain fp32).

    ``device``: "auto" (cuda when available, else cpu), "cpu" or "cuda".
    ``precision``: "auto" (bf16 on a GPU that supports it, else fp16; fp32 on cpu), "fp32",
    "fp16" or "bf16". On cpu, "bf16" autocasts matrix multiplies to bfloat16 (AMX / AVX-512
    BF16 CPUs run them several times faster; embeddings differ from fp32 in the third digit,
    so rankings can change where two candidates are that close); "fp16" on cpu gives fp32
    with a warning.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ModelLoadError(f"device must be auto, cpu or cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but torch sees no CUDA GPU")
    dev = torch.device(device)
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ModelLoadError(f"precision must be auto, fp32, fp16 or bf16; got {precision!r}")
    if precision == "fp32":
        return dev, None
    if dev.type != "cuda":
        if precision == "bf16":
            return dev, torch.bfloat16
        if precision == "fp16":
            log.warning("precision fp16 ignored on cpu (use bf16 there); using fp32")
        return dev, None
    if precision == "auto":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch.float16 if precision == "fp16" else torch.bfloat16


def inference_precision(device: torch.device, dtype: torch.dtype | None
                        ) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(dtype to cast the weights to, autocast dtype) for inference in ``dtype``.

    On a GPU the weights are cast once: autocast casts every weight matrix again in every
    forward pass (H100, e5-small, batches of 1024, the model alone: bi-encoder 94k -> 115k
    mentions/s, cross-encoder 94k -> 129k pairs/s; BENCHMARKS.md). On the CPU, bf16 stays
    autocast (layer norms and softmax in fp32). Training keeps fp32 weights and autocasts.
    """
    if device.type == "cuda" and dtype is not None:
        return dtype, None
    return None, dtype


class _Fp32Head(torch.nn.Module):
    """A classification head run in fp32 on the (bf16/fp16) features it is given."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head.float()

    def forward(self, features: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        dtype = next(self.head.parameters(), features).dtype  # fp32 unless cast since
        return self.head(features.to(dtype), *args, **kwargs)


def keep_head_fp32(model: Any) -> bool:
    """Run a sequence-classification model's head (``model.classifier``, as BERT, RoBERTa
    and XLM-R name it) in fp32 when the body's weights are bf16/fp16, so that its scores
    are not rounded to bf16's 8 bits of mantissa. On 5000 (mention, candidate) pairs of the
    trained CodiEsp cross-encoder, bf16 logits took about 1400 distinct values and tied the
    best candidate of 11 of 200 mentions. Returns False where the model has no such head."""
    head = getattr(model, "classifier", None)
    if isinstance(head, _Fp32Head):
        head.head.float()  # the whole model was cast again
    elif isinstance(head, torch.nn.Module):
        model.classifier = _Fp32Head(head)
    else:
        return False
    return True


def set_torch_threads(n: int) -> None:
    """Set torch's intra-op thread count; 0 leaves torch's default."""
    if n < 0:
        raise ValueError(f"number of threads must be >= 0; got {n}")
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def check_model_dir(path: str | Path) -> Path:
    """Check that ``path`` looks like a loadable Hugging Face model directory.

    Requires a directory with config.json, at least one ``*.safetensors`` weight file and a
    tokenizer (tokenizer.json or a vocabulary / SentencePiece file). Raises ModelLoadError
    saying what is missing; pickle-only weights are refused.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise ModelLoadError(f"{p} is not a Hugging Face model directory: it is a file")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p} is not a Hugging Face model directory: no config.json")
    names = [f.name for f in p.iterdir() if f.is_file()]
    if not any(n.endswith(".safetensors") for n in names):
        pickled = sorted(n for n in names if n.endswith(PICKLE_WEIGHT_SUFFIXES))
        if pickled:
            raise ModelLoadError(
                f"{p} has only pickle weights ({', '.join(pickled)}), which are never loaded "
                "(they can run code). Convert them to safetensors on a trusted machine, e.g. "
                "model.save_pretrained(dir, safe_serialization=True)"
            )
        raise ModelLoadError(f"{p} is not a Hugging Face model directory: no *.safetensors weights")
    if not any(n in names for n in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{p} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "next to the model with tokenizer.save_pretrained(dir)"
        )
    return p


def load_tokenizer_and_model(path: str | Path, kind: ModelKind = "encoder") -> tuple[Any, Any]:
    """Load (tokenizer, model) from a local Hugging Face directory, in eval mode on cpu.

    ``kind`` "encoder" loads ``AutoModel`` (hidden states); "sequence-classification" loads
    ``AutoModelForSequenceClassification`` and requires exactly one output (num_labels == 1).
    Every failure is a ModelLoadError naming ``path``.
    """
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if kind not in ("encoder", "sequence-classification"):
        raise ValueError(f"kind must be 'encoder' or 'sequence-classification'; got {kind!r}")
    p = check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{p}: config.json could not be read: {exc}") from exc
    if kind == "sequence-classification" and config.num_labels != 1:
        raise ModelLoadError(
            f"{p}: a cross-encoder needs one output (num_labels == 1); this model has "
            f"num_labels == {config.num_labels}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{p}: the tokenizer could not be loaded: {exc}") from exc
    if tokenizer.pad_token is None:
        raise ModelLoadError(f"{p}: the tokenizer has no padding token; batching needs one")
    auto = AutoModel if kind == "encoder" else AutoModelForSequenceClassification
    try:
        with _no_progress_bars():
            model = auto.from_pretrained(
                p, config=config, local_files_only=True, use_safetensors=True
            )
    except Exception as exc:
        raise ModelLoadError(f"{p}: the {kind} model could not be loaded: {exc}") from exc
    model.eval()
    log.debug("loaded %s model %s (%s)", kind, p, type(model).__name__)
    return tokenizer, model


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' progress bars while loading (executor logs stay readable)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _hashed_files(p: Path) -> list[Path]:
    return sorted(
        (
            f for f in p.iterdir()
            if f.is_file() and (f.name in HASHED_NAMES or f.name.endswith(HASHED_SUFFIXES))
        ),
        key=lambda f: f.name,
    )


def model_hash(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 (full hex) of a model directory's defining files, names included.

    Hashed, in sorted name order: config.json, every ``*.safetensors`` and the tokenizer
    files. Each file contributes its name, its size and its bytes (streamed in chunks). The
    result is cached in-process by (resolved path, names, sizes, mtimes), so asking again for
    an unchanged directory costs a ``stat`` per file.
    """
    p = Path(path).resolve()
    if not p.is_dir():
        raise ModelLoadError(f"model directory {p} does not exist")
    files = _hashed_files(p)
    if not files:
        raise ModelLoadError(f"{p} holds no model files to hash")
    stats = [(f.name, f.stat()) for f in files]
    key = (str(p),) + tuple((n, s.st_size, s.st_mtime_ns) for n, s in stats)
    with _HASH_LOCK:
        cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for f, (name, st) in zip(files, stats):
        digest.update(f"{name}\0{st.st_size}\0".encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk_size):
                digest.update(block)
    result = digest.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = result
    log.debug("model hash of %s: %s (%d files)", p, result[:16], len(files))
    return result


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` with ``dtype`` on GPU, and on cpu for bf16; a no-op context when
    None."""
    if dtype is None or (device.type != "cuda" and dtype != torch.bfloat16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def length_order(lengths: list[int]) -> list[int]:
    """Indices sorting ``lengths`` longest first (stable), to batch texts of similar length."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


# a batch closes before the next text would make its padded size exceed this multiple of
# its real tokens (once it holds MIN_LENGTH_BATCH texts): a few dozen texts of mixed lengths
# (a small night's new forms in one task) are no longer padded to the longest of them
MAX_PADDING = 1.2
MIN_LENGTH_BATCH = 8


def length_batches(lengths: list[int], batch_size: int, max_padding: float = MAX_PADDING,
                   min_batch: int = MIN_LENGTH_BATCH) -> list[list[int]]:
    """Batches of indices into ``lengths``, longest texts first (:func:`length_order`).

    A batch holds at most ``batch_size`` texts, and closes early when adding the next text
    would make (texts x longest length) exceed ``max_padding`` x (sum of lengths), once it
    holds ``min_batch`` texts. Every index comes exactly once.
    """
    order = length_order(lengths)
    batches: list[list[int]] = []
    start, n = 0, len(order)
    while start < n:
        width = lengths[order[start]]
        real, end = width, start + 1
        while end < n and end - start < batch_size:
            size = lengths[order[end]]
            if end - start >= min_batch and (end - start + 1) * width > max_padding * (
                    real + size):
                break
            real, end = real + size, end + 1
        batches.append(order[start:end])
        start = end
    return batches


def pad_batch(
    features: dict[str, list[list[int]]],
    indices: list[int],
    pad_token_id: int,
    pad_token_type_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Right-pad the tokenised rows ``indices`` of ``features`` into int64 tensors [b, t]
    (:meth:`TokenIds.pad`).

    ``features`` maps input names (input_ids, attention_mask, token_type_ids) to one list of
    ids per text, as a tokenizer returns them without padding (training tokenises with the
    transformers wrapper); the attention mask is made from the rows' lengths.
    """
    types = features.get("token_type_ids")
    rows = TokenIds([features["input_ids"][i] for i in indices],
                    None if types is None else [types[i] for i in indices])
    return rows.pad(range(len(indices)), pad_token_id, pad_token_type_id)


class TokenIds:
    """Token ids of many texts (or text pairs), unpadded, stored flat: text i's ids are
    ``ids[starts[i]:starts[i] + lengths[i]]`` (and its token type ids at the same places in
    ``type_ids`` where the model takes them).

    :meth:`pad` builds a right-padded batch of any rows with a few numpy operations; the
    per-row Python loop it replaces cost 19 us per text on this project's CPU benchmark
    machine, as much as a GPU's whole forward pass of the text.
    """

    def __init__(self, rows: Sequence[Sequence[int]],
                 type_rows: Sequence[Sequence[int]] | None = None) -> None:
        n = len(rows)
        self.lengths = np.fromiter(map(len, rows), dtype=np.int64, count=n)
        self.starts = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(self.lengths[:-1], out=self.starts[1:])
        total = int(self.lengths.sum())
        self.ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64,
                               count=total)
        self.type_ids = None if type_rows is None else np.fromiter(
            itertools.chain.from_iterable(type_rows), dtype=np.int64, count=total)

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> list[int]:
        """The ids of text ``i`` as a list."""
        start = int(self.starts[i])
        return self.ids[start:start + int(self.lengths[i])].tolist()

    def pad(self, indices: Sequence[int], pad_token_id: int,
            pad_token_type_id: int = 0) -> dict[str, torch.Tensor]:
        """Rows ``indices`` right-padded into int64 tensors [b, t]: input_ids,
        attention_mask, and token_type_ids where the model takes them.

        Padding is on the right, so that every text keeps positions 0..len-1 whatever its
        batch (with masked attention its hidden states do not depend on the other texts)."""
        idx = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[idx]
        width = int(lengths.max()) if len(idx) else 0
        mask = np.arange(width, dtype=np.int64)[None, :] < lengths[:, None]
        total = int(lengths.sum())
        # flat positions of the rows' ids, row after row (the order of mask's True cells)
        row_first = np.cumsum(lengths) - lengths
        source = (np.arange(total, dtype=np.int64) - np.repeat(row_first, lengths)
                  + np.repeat(self.starts[idx], lengths))
        batch = {"input_ids": self._filled(mask, self.ids, source, pad_token_id)}
        if self.type_ids is not None:
            batch["token_type_ids"] = self._filled(mask, self.type_ids, source,
                                                   pad_token_type_id)
        batch["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
        return batch

    @staticmethod
    def _filled(mask: np.ndarray, values: np.ndarray, source: np.ndarray,
                fill: int) -> torch.Tensor:
        out = np.full(mask.shape, fill, dtype=np.int64)
        out[mask] = values[source]
        return torch.from_numpy(out)


def tokenize_ids(tokenizer: Any, texts: Sequence[str], max_length: int,
                 pairs: Sequence[str] | None = None) -> TokenIds:
    """Token ids of ``texts`` (or of the pairs (texts[i], pairs[i])), truncated to
    ``max_length`` (pairs: longest first), special tokens added, unpadded.

    The same ids as ``tokenizer(texts, pairs, truncation=True, max_length=max_length)``. A
    fast tokenizer's Rust backend is called directly (``encode_batch_fast``: no character
    offsets), 2.5-3.5x faster than the transformers wrapper on this project's texts; a slow
    tokenizer goes through the wrapper.
    """
    with_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(
        tokenizer, "is_fast", False) else None
    if backend is None:
        encoded = tokenizer(list(texts), None if pairs is None else list(pairs),
                            truncation=True, max_length=max_length, padding=False,
                            return_token_type_ids=with_types)
        return TokenIds(encoded["input_ids"],
                        encoded["token_type_ids"] if with_types else None)
    inputs: list[Any] = list(texts) if pairs is None else list(zip(texts, pairs))
    with _BACKEND_LOCK:
        backend.enable_truncation(max_length, strategy="longest_first",
                                  direction=getattr(tokenizer, "truncation_side", "right"))
        backend.no_padding()
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        encodings = encode(inputs, add_special_tokens=True)
    return TokenIds([e.ids for e in encodings],
                    [e.type_ids for e in encodings] if with_types else None)


# one process-wide lock: truncation is state of the shared Rust tokenizer
_BACKEND_LOCK = threading.Lock()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A padded batch on ``device``. To a GPU the copy goes from pinned memory without
    waiting: the CPU pads the next batch while the GPU still runs the previous one (a copy
    from pageable memory waits for the GPU's queue to drain first)."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


class PendingRows:
    """Rows of ``out`` (a numpy array) computed batch by batch on a device, copied back once
    at the end (:meth:`collect`): on a GPU nothing waits for a batch to finish before the next
    one is queued. On the CPU each batch is written at once."""

    def __init__(self, out: np.ndarray) -> None:
        self.out = out
        self._indices: list[Sequence[int]] = []
        self._values: list[torch.Tensor] = []

    def add(self, indices: Sequence[int], values: torch.Tensor) -> None:
        if values.device.type == "cpu":
            self.out[np.asarray(indices, dtype=np.int64)] = values.numpy()
            return
        self._indices.append(indices)
        self._values.append(values)

    def collect(self) -> np.ndarray:
        if self._values:
            rows = np.concatenate([np.asarray(i, dtype=np.int64) for i in self._indices])
            self.out[rows] = torch.cat(self._values).cpu().numpy()
            self._indices, self._values = [], []
        return self.out


def effective_max_length(tokenizer: Any, config: Any, max_length: int) -> int:
    """``max_length`` capped by what the tokenizer and the position embeddings allow."""
    limits = [max_length]
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limits.append(tok_limit)
    pos_limit = getattr(config, "max_position_embeddings", None)
    if isinstance(pos_limit, int) and pos_limit > 0:
        # RoBERTa-family models start positions at pad_token_id + 1.
        offset = (config.pad_token_id or 0) + 1 if config.model_type in (
            "roberta", "xlm-roberta", "camembert"
        ) else 0
        limits.append(pos_limit - offset)
    capped = min(limits)
    if capped < max_length:
        log.warning("max_length %d capped to %d (tokenizer / position embeddings limit)",
                    max_length, capped)
    return capped


def check_texts(texts: Sequence[str], what: str) -> None:
    """Raise TypeError unless ``texts`` is a sequence of str (not one str). Names no text."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of strings, not a single string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, not str")


class LoadedModel:
    """A local Hugging Face model directory loaded for inference: the part BiEncoder and
    CrossEncoderReranker share (threads, device and autocast dtype, eval mode, effective
    max_length, a lazily computed model hash)."""

    def _load(self, path: str | Path, kind: ModelKind, max_length: int, device: str,
              precision: str, num_threads: int) -> None:
        set_torch_threads(num_threads)
        self.path = Path(path)
        self._device, self._autocast_dtype = resolve_device(device, precision)
        self.tokenizer, self.model = load_tokenizer_and_model(self.path, kind)
        weights_dtype, self._autocast_dtype = inference_precision(self._device,
                                                                  self._autocast_dtype)
        self._precision = PRECISION_NAMES[weights_dtype or self._autocast_dtype]
        # one copy to the device, already in the weights' dtype
        self.model.to(device=self._device, dtype=weights_dtype)
        if weights_dtype is not None and kind == "sequence-classification":
            keep_head_fp32(self.model)
        self.model.eval()
        self.max_length = effective_max_length(self.tokenizer, self.model.config, max_length)
        self._model_hash: str | None = None

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def precision(self) -> str:
        """What the model computes in: "fp32", "bf16" or "fp16" (weights cast or autocast)."""
        return self._precision

    @property
    def model_hash(self) -> str:
        """SHA-256 of the model directory's files (computed once, then cached)."""
        if self._model_hash is None:
            self._model_hash = model_hash(self.path)
        return self._model_hash

