"""The terminology index artifact: FAISS vectors + a rows table + manifest.json.

Layout of an index directory (immutable once written)::

    manifest.json   what it is, content hash, encoder fingerprint, FAISS settings, terminology
    index.faiss     FAISS native file, one vector per distinct normalised term (``term_norm``)
    rows.parquet    one row per (code, term): position (the vector id), code, code_key, term,
                    term_norm, is_main_term, semantic_tag, source, mention_count, parent_key
    codes.parquet   one row per code: code_key, code (its one spelling), parent_key, is_leaf
                    (no code of the index has it as parent), depth (1 for a code without a
                    parent), n_terms, mention_count (training mentions of all its terms)
    lexical.json    the lexical retriever (character 3-gram TF-IDF) over the same texts:
    lexical.npz     settings and vocabulary; idf and the term matrix (clinlinker_spark.lexical)

Vectors are per distinct normalised text, not per row: an index built from a code list plus
training mentions holds the same text under several codes, and embedding it once is cheaper
and makes a raw hit a distinct text. The rows of one position are stored in prior order
(``mention_count`` descending, main terms first, then code), which is the order codes sharing
that exact text are returned in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np
import pandas as pd

from clinlinker_spark import __version__
from clinlinker_spark.candidates import Hits
from clinlinker_spark.config import IndexConfig
from clinlinker_spark.errors import (
    ArtifactError,
    ConfigError,
    EncoderMismatchError,
    InputDataError,
)
from clinlinker_spark.fsutil import publish_directory
from clinlinker_spark.text import normalize_code, normalize_text

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
ROWS_FILE = "rows.parquet"
ARTIFACT_KIND = "clinlinker-terminology-index"
FORMAT_VERSION = 2
# format 1: no codes.parquet, no lexical model, no parent_key (read as a flat code list)
READABLE_FORMATS = (1, 2)
CODES_FILE = "codes.parquet"
NORMALISATION = "nfkc-lower-ws"

# exact (flat) search uses a matrix multiply from this many queries in one call. faiss-cpu
# 1.15's default (128,000) keeps every batch below 512 queries on its one-query-at-a-time
# kernel: a night's task of 70 forms against 15k terms took 65 ms instead of 8.5 ms (1 thread;
# benchmarks/bench_search_batch.py). One query alone is still faster without it.
FAISS_BLAS_MIN_QUERIES = 4
# a GPU search's score matrix per chunk of queries (1.5M terms: 178 queries a chunk)
SCORE_CHUNK_BYTES = 1 << 30
# Near-ties. Two hits whose float32 scores are closer than TIE_TOLERANCE are ordered by their
# inner product recomputed in float64, then by position (lowest first). The float32 scores of
# one (query, term) pair differ by a few ulps (~1e-7) between FAISS's one-query and
# matrix-multiply kernels, between block positions and between CPU and GPU, so without this
# the order of (near-)equal hits, and which of them make the top k, would depend on which
# other queries share the call: a mention's answer would change with the Spark batch it falls
# in. Equal vectors (texts that tokenise alike, e.g. differing only in accents for an
# accent-stripping tokenizer) give exactly equal float64 scores and are ordered by position.
# The tolerance is over twice the largest float32 error measured against float64 (6.3e-7,
# multilingual-e5-small, 384 dimensions, FAISS one-query and matrix-multiply kernels and torch).
TIE_TOLERANCE = 4e-6
# hits searched beyond k, so that a near-tie across the k-th hit is seen whole (searched
# again with more hits where it is not)
TIE_MARGIN = 8
# near-tie hits re-scored per step (float64 products of this many vectors: 12 MB at 384 dims
# on the CPU, 200 MB on a GPU, whose kernels want large steps)
EXACT_CHUNK = 4096
EXACT_CHUNK_TORCH = 65536

ROW_COLUMNS = [
    "position", "code", "code_key", "term", "term_norm", "is_main_term", "semantic_tag",
    "source", "mention_count", "parent_key",
]
CODE_COLUMNS = ["code_key", "code", "parent_key", "is_leaf", "depth", "n_terms",
                "mention_count"]


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact's content."""
    import pyarrow
    import torch
    import transformers

    return {
        "clinlinker_spark": __version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pyarrow.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_hash(directory: Path) -> str:
    """SHA-256 over the artifact's data files (the ones a format-1 index lacks are skipped)."""
    from clinlinker_spark.lexical import LEXICAL_JSON, LEXICAL_NPZ

    digest = hashlib.sha256()
    for name in (INDEX_FILE, ROWS_FILE, CODES_FILE, LEXICAL_JSON, LEXICAL_NPZ):
        if name not in (INDEX_FILE, ROWS_FILE) and not (directory / name).is_file():
            continue
        digest.update(name.encode())
        digest.update(file_sha256(directory / name).encode())
    return digest.hexdigest()


def prepare_rows(terminology: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Order terminology rows by distinct normalised text and prior.

    Returns the rows table (with ``position``) and the distinct texts, where ``texts[p]`` is
    the text of vector ``p``.
    """
    missing = [c for c in ("code", "term") if c not in terminology.columns]
    if missing:
        raise InputDataError(
            f"terminology is missing column(s) {missing}; it has {list(terminology.columns)}"
        )
    rows = terminology.copy()
    if rows.empty:
        raise InputDataError("terminology has no rows: nothing to index")
    bad = rows["code"].isna() | rows["term"].isna()
    if bad.any():
        raise InputDataError(f"terminology has {int(bad.sum())} row(s) without code or term")
    if "code_key" not in rows:
        rows["code_key"] = rows["code"].map(normalize_code)
    if "term_norm" not in rows:
        rows["term_norm"] = rows["term"].map(normalize_text)
    for column, default in (("is_main_term", False), ("semantic_tag", ""), ("source", ""),
                            ("mention_count", 0), ("parent_key", "")):
        if column not in rows:
            rows[column] = default
    rows = rows[rows["term_norm"] != ""]
    rows["mention_count"] = rows["mention_count"].fillna(0).astype("int64")
    rows["is_main_term"] = rows["is_main_term"].fillna(False).astype(bool)
    rows["semantic_tag"] = rows["semantic_tag"].fillna("").astype(str)
    rows["source"] = rows["source"].fillna("").astype(str)
    rows["parent_key"] = rows["parent_key"].fillna("").astype(str)
    rows = rows.drop_duplicates(["code_key", "term_norm"], keep="first")
    texts = sorted(rows["term_norm"].unique().tolist())
    position_of = {t: i for i, t in enumerate(texts)}
    rows["position"] = rows["term_norm"].map(position_of).astype("int64")
    rows = rows.sort_values(
        ["position", "mention_count", "is_main_term", "code_key"],
        ascending=[True, False, False, True], kind="mergesort",
    )
    return rows[ROW_COLUMNS].reset_index(drop=True), texts


def code_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per code of an index's rows (CODE_COLUMNS), sorted by code_key: its first
    spelling and parent, whether it is a leaf (no code of these rows has it as parent), its
    depth in the hierarchy these rows hold (1 without a known parent; a parent outside the
    rows ends the chain), its number of terms and its training mentions."""
    grouped = rows.groupby("code_key", sort=True)
    codes = pd.DataFrame({
        "code": grouped["code"].first(),
        "parent_key": grouped["parent_key"].agg(lambda v: next((x for x in v if x), "")),
        "n_terms": grouped.size().astype("int64"),
        "mention_count": grouped["mention_count"].sum().astype("int64"),
    }).reset_index()
    parents = set(codes["parent_key"]) - {""}
    codes["is_leaf"] = ~codes["code_key"].isin(parents)
    parent_of = dict(zip(codes["code_key"], codes["parent_key"]))
    depth: dict[str, int] = {}

    def depth_of(key: str, below: tuple[str, ...] = ()) -> int:
        if key not in depth:
            parent = parent_of.get(key, "")
            known = parent and parent in parent_of and parent not in below and parent != key
            depth[key] = depth_of(parent, below + (key,)) + 1 if known else 1
        return depth[key]

    codes["depth"] = [depth_of(k) for k in codes["code_key"]]
    return codes[CODE_COLUMNS]


def ivf_pq_factory(nlist: int, pq_m: int) -> str:
    """The FAISS factory string of ``index.pq``: IVF over ``nlist`` lists, 4-bit fast-scan
    codes of ``pq_m`` sub-quantisers, hits re-scored with a flat copy of the vectors."""
    return f"IVF{nlist},PQ{pq_m}x4fs,RFlat"


def _make_faiss_index(vectors: np.ndarray, config: IndexConfig) -> tuple[faiss.Index, dict]:
    n, dim = vectors.shape
    metric = faiss.METRIC_INNER_PRODUCT
    params: dict[str, Any] = {"type": config.index_type, "fp16": config.fp16,
                              "sq8": config.sq8, "pq": config.pq, "metric": "inner_product",
                              "dim": dim}
    sq = faiss.ScalarQuantizer
    qtype = sq.QT_fp16 if config.fp16 else sq.QT_8bit if config.sq8 else None
    if config.index_type == "flat":
        index = (faiss.IndexFlatIP(dim) if qtype is None
                 else faiss.IndexScalarQuantizer(dim, qtype, metric))
        index.train(vectors)
    elif config.index_type == "ivf":
        nlist = config.ivf_nlist or max(1, int(4 * math.sqrt(n)))
        nlist = min(nlist, n)
        if config.pq:
            pq_m = config.pq_m or dim // 2
            if dim % pq_m:
                raise ConfigError(f"index.pq_m ({pq_m}) must divide the dimension ({dim})")
            # the factory owns the quantiser and the refine copy (no Python-side lifetimes)
            index = faiss.index_factory(dim, ivf_pq_factory(nlist, pq_m), metric)
            params.update(pq_m=pq_m, refine_factor=config.refine_factor)
        else:
            quantizer = faiss.IndexFlatIP(dim)
            if qtype is not None:
                index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, qtype, metric)
            else:
                index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
        rng = np.random.default_rng(0)
        sample = vectors if n <= 256 * nlist else vectors[rng.choice(n, 256 * nlist, False)]
        index.train(sample)
        params.update(nlist=nlist, nprobe=min(config.ivf_nprobe, nlist))
        _apply_search_params(index, params)
    else:  # hnsw
        if qtype is not None:
            index = faiss.IndexHNSWSQ(dim, qtype, config.hnsw_m, metric)
            index.train(vectors)
        else:
            index = faiss.IndexHNSWFlat(dim, config.hnsw_m, metric)
        index.hnsw.efSearch = config.hnsw_ef_search
        params.update(hnsw_m=config.hnsw_m, ef_search=config.hnsw_ef_search)
    index.add(vectors)
    return index, params


def torch_top_k(base: Any, queries: np.ndarray, k: int,
                score_bytes: int = SCORE_CHUNK_BYTES) -> tuple[Any, Any]:
    """Exact inner-product top-``k`` of ``queries`` [n, dim] against ``base`` (a torch tensor
    [terms, dim], on a GPU in the linker): (scores float32 [n, k], positions int64 [n, k]) as
    tensors where ``base`` is, best first. Queries go in chunks whose score matrix stays
    under ``score_bytes``."""
    import torch

    n_terms = int(base.shape[0])
    chunk = max(1, min(len(queries), score_bytes // (4 * max(n_terms, 1))))
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(base.device)
    scores, positions = [], []
    with torch.inference_mode():
        for start in range(0, len(q), chunk):
            top = torch.topk(q[start:start + chunk] @ base.T, k, dim=1, sorted=True)
            scores.append(top.values)
            positions.append(top.indices)
        return torch.cat(scores), torch.cat(positions)


def torch_search(base: Any, queries: np.ndarray, k: int,
                 score_bytes: int = SCORE_CHUNK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """:func:`torch_top_k` as numpy arrays, as FAISS's flat index gives them."""
    scores, positions = torch_top_k(base, queries, k, score_bytes)
    return scores.cpu().numpy(), positions.cpu().numpy().astype(np.int64)


# A top-k search: (queries float32 [n, dim], k) -> (scores [n, k], positions [n, k]), torch
# tensors on one device, best first. An exact scorer: (queries, rows, positions) -> float64
# inner products of queries[rows[j]] and stored vector positions[j], on that device.
SearchFn = Callable[[np.ndarray, int], tuple[Any, Any]]
ExactFn = Callable[[np.ndarray, Any, Any], Any]


def search_in_order(vectors: np.ndarray, k: int, n_vectors: int, raw_search: SearchFn,
                    exact: ExactFn) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores float32 [n, k], positions int64 [n, k], numpy) of each query, in an
    order that does not depend on the other queries nor on the kernel or device that
    ``raw_search`` runs: hits closer than :data:`TIE_TOLERANCE` to a neighbour are ordered by
    ``exact`` score (float64), then position, and a near-tie across the k-th hit is searched
    until seen whole. The work runs with torch where the hits are (the GPU's for a search on
    the GPU)."""
    import torch

    k = min(k, n_vectors)
    if len(vectors) == 0 or k == 0:
        return np.zeros((len(vectors), k), np.float32), np.zeros((len(vectors), k), np.int64)
    queries = np.ascontiguousarray(vectors, dtype=np.float32)
    fetch = min(k + TIE_MARGIN, n_vectors)
    with torch.inference_mode():
        scores, positions = raw_search(queries, fetch)
        breaks = _tie_breaks(scores, positions)
        while fetch < n_vectors:
            # rows whose near-tie group at the k-th hit may go on past the hits searched
            open_rows = torch.nonzero(~breaks[:, k - 1:].any(dim=1))
            if open_rows.numel() == 0:
                break
            open_rows = open_rows.flatten()
            fetch = min(2 * fetch, n_vectors)
            more_scores, more_positions = raw_search(queries[open_rows.cpu().numpy()], fetch)
            scores = _widen(scores, fetch, float("-inf"))
            positions = _widen(positions, fetch, -1)
            scores[open_rows], positions[open_rows] = more_scores, more_positions
            breaks = _tie_breaks(scores, positions)
        scores, positions = _order_near_ties(queries, scores, positions, breaks, k, exact)
        return (scores[:, :k].cpu().numpy(),
                np.ascontiguousarray(positions[:, :k].cpu().numpy(), dtype=np.int64))


def _tie_breaks(scores: Any, positions: Any) -> Any:
    """[n, k - 1] booleans: whether hits j and j + 1 are not a near-tie (a gap of at least
    :data:`TIE_TOLERANCE`, or either is no hit)."""
    # in float32: the difference of two close float32 numbers is exact (Sterbenz), and
    # -inf - -inf (no more hits) is NaN, which is no near-tie
    gaps = scores[:, :-1] - scores[:, 1:]
    return ~(gaps < TIE_TOLERANCE) | (positions[:, :-1] < 0) | (positions[:, 1:] < 0)


def _widen(a: Any, width: int, fill: Any) -> Any:
    import torch

    out = torch.full((a.shape[0], width), fill, dtype=a.dtype, device=a.device)
    out[:, :a.shape[1]] = a
    return out


def _order_near_ties(queries: np.ndarray, scores: Any, positions: Any, breaks: Any, k: int,
                     exact: ExactFn) -> tuple[Any, Any]:
    """Re-order each near-tie group (between ``breaks``, :func:`_tie_breaks`) that reaches
    into the first ``k`` hits by exact score, then position; its members get their exact
    scores (as float32)."""
    import torch

    group = torch.zeros(scores.shape, dtype=torch.int64, device=scores.device)
    group[:, 1:] = torch.cumsum(breaks, dim=1)
    tied = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    tied[:, :-1] |= ~breaks
    tied[:, 1:] |= ~breaks
    tied &= group <= group[:, k - 1:k]
    rows, cols = torch.nonzero(tied, as_tuple=True)
    if rows.numel() == 0:
        return scores, positions
    # (rows, cols) run row by row, left to right, so each group's members are one run of
    # entries; sorting them by (group, -exact score, position) moves hits within groups
    found = positions[rows, cols]
    exact_found = exact(queries, rows, found)
    order = torch.arange(len(found), device=found.device)
    for key in (found, -exact_found, rows * scores.shape[1] + group[rows, cols]):
        order = order[torch.sort(key[order], stable=True).indices]  # least significant first
    scores, positions = scores.clone(), positions.clone()
    scores[rows, cols] = exact_found[order].to(scores.dtype)
    positions[rows, cols] = found[order]
    return scores, positions


def exact_scores(vectors_at: Callable[[Any], Any], queries: np.ndarray, rows: Any,
                 positions: Any) -> Any:
    """Inner products of ``queries[rows[j]]`` and stored vector ``positions[j]`` in float64,
    with torch where ``rows`` and ``positions`` (tensors) are; ``vectors_at`` gives the stored
    vectors of a tensor of positions, there. Each is an element-wise product, then one
    reduction per pair, so one pair of vectors gives one number whatever else is computed
    with it."""
    import torch

    chunk = EXACT_CHUNK if rows.device.type == "cpu" else EXACT_CHUNK_TORCH
    q64 = torch.from_numpy(queries).to(rows.device).to(torch.float64)
    parts = []
    for start in range(0, len(rows), chunk):
        product = vectors_at(positions[start:start + chunk]).to(torch.float64)
        product *= q64[rows[start:start + chunk]]
        parts.append(product.sum(dim=1))
    return torch.cat(parts)


def _apply_search_params(index: faiss.Index, params: dict) -> None:
    if params.get("type") == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
        if params.get("pq"):
            faiss.downcast_index(index).k_factor = float(params["refine_factor"])
    elif params.get("type") == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])


def read_mention_texts(path: str | Path, column: str = "text") -> list[str]:
    """The normalised, distinct, non-empty forms of the ``column`` of a Parquet, CSV or TSV
    file (by its suffix), in first-seen order."""
    p = Path(path)
    suffix = p.suffix.lower()
    if not (suffix in (".parquet", ".csv", ".tsv") or p.is_dir()):
        raise ConfigError(f"mention texts {p}: expected a .parquet, .csv or .tsv file")
    try:
        if suffix in (".csv", ".tsv"):
            frame = pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",", usecols=[column],
                                dtype=str, keep_default_na=False)
        else:  # a Parquet file or a folder of them
            frame = pd.read_parquet(p, columns=[column])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read column {column!r} of mention texts {p}: {exc}") from exc
    forms = (normalize_text(str(t)) for t in frame[column] if isinstance(t, str))
    return [f for f in dict.fromkeys(forms) if f]


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean share of each query's exact top-``k`` positions found in its approximate top-k."""
    found = sum(len(set(a[:k].tolist()) & set(e[:k].tolist())) for a, e in zip(approx, exact))
    return found / (k * len(exact))


# the search setting each approximate index type tunes (its key in the manifest's params)
_SEARCH_SETTING = {"ivf": "nprobe", "hnsw": "ef_search"}


def _ladder(params: dict, search_k: int) -> list[int]:
    """The values of the index type's search setting tried, cheapest first: nprobe doubling
    up to nlist (IVF), efSearch doubling from search_k up to 16 x search_k (HNSW; FAISS
    searches with at least k)."""
    if params["type"] == "ivf":
        nlist = int(params["nlist"])
        return [1 << i for i in range(nlist.bit_length()) if 1 << i < nlist] + [nlist]
    return [search_k << i for i in range(5)]


def measure_recall(index: faiss.Index, params: dict, vectors: np.ndarray,
                   queries: np.ndarray, search_k: int, recall_k: int,
                   target: float = 0.0) -> dict[str, Any]:
    """Recall@``recall_k`` of ``index`` (built over ``vectors``) against exact inner-product
    search over ``vectors``, for ``queries`` searched with ``search_k`` hits, as the linker
    searches. ``target`` > 0: the settings of :func:`_ladder` are tried cheapest first until
    one reaches it (the last one tried when none does), and ``params`` and the index are left
    at it; otherwise only the index's own setting is measured. Returns the manifest's
    ``recall`` block: each setting tried with its recall and search milliseconds per query."""
    k = min(search_k, len(vectors))
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    exact = flat.search(queries, k)[1]
    del flat
    name = _SEARCH_SETTING.get(params["type"], "")  # flat: nothing to set
    values = (_ladder(params, search_k) if target else [int(params[name])]) if name else [0]
    tried: list[dict[str, Any]] = []
    for value in values:
        if name:
            params[name] = value
            _apply_search_params(index, params)
        started = time.perf_counter()
        approx = index.search(queries, k)[1]
        ms = 1000 * (time.perf_counter() - started) / len(queries)
        tried.append({**({name: value} if name else {}),
                      "recall": round(recall_at(approx, exact, recall_k), 4),
                      "ms_per_query": round(ms, 4)})
        if target and tried[-1]["recall"] >= target:
            break
    block: dict[str, Any] = {"k": recall_k, "search_k": k, "queries": len(queries),
                             "recall": tried[-1]["recall"], "tried": tried}
    if target:
        block.update(target=target, met=tried[-1]["recall"] >= target, setting=name)
    return block


def check_index_dir(out: Path, overwrite: bool) -> bool:
    """Whether ``out`` holds an index already; ArtifactError when it does and ``overwrite`` is
    false (indexes are immutable)."""
    exists = out.exists() and any(out.iterdir())
    if exists and not overwrite:
        raise ArtifactError(f"index directory {out} already exists (indexes are immutable; "
                            "choose a new path or pass overwrite)")
    return exists


def build_index(
    terminology: pd.DataFrame,
    encoder: Any,
    config: IndexConfig,
    out_dir: str | Path,
    name: str = "terminology",
    version: str = "",
    overwrite: bool = False,
    search_k: int = 200,
) -> Path:
    """Embed a terminology with ``encoder`` (a BiEncoder) and write an index directory.

    The directory is written under a temporary name beside ``out_dir`` and renamed into place,
    so a crash never leaves a half-written index where a job would find it. An existing index
    is never modified; ``overwrite=True`` replaces it as a whole.

    With ``config.recall_mentions``, the index's recall@``config.recall_k`` against exact
    search is measured with those mention texts (``search_k`` hits a query, the job's
    linking.search_k) and written to the manifest; ``config.target_recall`` picks the least
    nprobe / efSearch that reaches it (:func:`measure_recall`).
    """
    out = Path(out_dir)
    check_index_dir(out, overwrite)
    rows, texts = prepare_rows(terminology)
    started = time.perf_counter()
    log.info("embedding %d distinct terms (%d rows, %d codes)", len(texts), len(rows),
             rows["code_key"].nunique())
    vectors = np.ascontiguousarray(encoder.encode(texts, show_progress=True), dtype=np.float32)
    embed_s = time.perf_counter() - started
    index, params = _make_faiss_index(vectors, config)
    params["ntotal"] = int(index.ntotal)
    recall = None
    if config.recall_mentions:
        recall = _measure_build_recall(index, params, vectors, encoder, config, search_k)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        codes, lexical_s = _write_index_files(tmp, index, rows, texts)
        manifest = {
            "kind": ARTIFACT_KIND,
            "format_version": FORMAT_VERSION,
            "content_hash": _content_hash(tmp),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "encoder": encoder.fingerprint(),
            # the model registry's entry of the encoder (models:/ URI, name, version)
            **({"encoder_registered": encoder.registered}
               if getattr(encoder, "registered", None) else {}),
            "normalisation": NORMALISATION,
            "index": params,
            "terminology": _terminology_summary(rows, codes, texts, name, version),
            "lexical": {"kind": "char_wb-tfidf", "ngram": 3,
                        "fit_seconds": round(lexical_s, 3)},
            # what the vectors were computed in: a job whose encoder computes in the same
            # precision takes an exact term's stored vector instead of encoding it again
            "build": {"embed_seconds": round(embed_s, 3), "precision": encoder.precision},
            **({"recall": recall} if recall is not None else {}),
            "libraries": library_versions(),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("index written to %s: %d vectors, dim %d, %s, embedding took %.1f s",
             out, index.ntotal, vectors.shape[1], params["type"], embed_s)
    return out


def _write_index_files(directory: Path, index: faiss.Index, rows: pd.DataFrame,
                       texts: list[str]) -> tuple[pd.DataFrame, float]:
    """Write the FAISS index, the rows, the code table and the lexical model of ``texts``
    into ``directory``; returns the code table and the lexical model's fit seconds."""
    faiss.write_index(index, str(directory / INDEX_FILE))
    rows.to_parquet(directory / ROWS_FILE, index=False)
    codes = code_table(rows)
    codes.to_parquet(directory / CODES_FILE, index=False)
    from clinlinker_spark.lexical import LexicalIndex

    lexical_started = time.perf_counter()
    LexicalIndex.fit(texts).save(directory)
    return codes, time.perf_counter() - lexical_started


def _terminology_summary(rows: pd.DataFrame, codes: pd.DataFrame, texts: list[str], name: str,
                         version: str) -> dict[str, Any]:
    """The manifest's ``terminology`` section: name, version and counts of what it holds."""
    sources = sorted({s for v in rows["source"] for s in str(v).split("|") if s})
    return {
        "name": name, "version": version, "rows": int(len(rows)),
        "codes": int(rows["code_key"].nunique()), "distinct_terms": len(texts),
        "training_mentions": int(rows["mention_count"].sum()), "sources": sources,
        "leaf_codes": int(codes["is_leaf"].sum()),
        "codes_with_parent": int((codes["parent_key"] != "").sum()),
    }


def _measure_build_recall(index: faiss.Index, params: dict, vectors: np.ndarray, encoder: Any,
                          config: IndexConfig, search_k: int) -> dict[str, Any]:
    """:func:`measure_recall` with a sample of ``config.recall_mentions``' forms, embedded by
    the index's encoder; logged with counts and numbers only."""
    if config.recall_k > search_k:
        raise ConfigError(f"index.recall_k ({config.recall_k}) must be <= linking.search_k "
                          f"({search_k})")
    forms = read_mention_texts(config.recall_mentions)
    if not forms:
        raise ConfigError(f"mention texts {config.recall_mentions}: no non-empty text")
    if len(forms) > config.recall_queries:
        rng = np.random.default_rng(0)
        picked = np.sort(rng.choice(len(forms), config.recall_queries, replace=False))
        forms = [forms[i] for i in picked]
    queries = np.ascontiguousarray(encoder.encode(forms), dtype=np.float32)
    started = time.perf_counter()
    block = measure_recall(index, params, vectors, queries, search_k, config.recall_k,
                           config.target_recall)
    block["source"] = Path(config.recall_mentions).name
    last = block["tried"][-1]
    log.info("index recall@%d against exact search, %d mention forms, %d hits each: %.4f%s "
             "(%.3f ms a query; %d setting(s) tried in %.1f s)", block["k"], block["queries"],
             block["search_k"], block["recall"],
             "".join(f", {k} {v}" for k, v in last.items() if k in _SEARCH_SETTING.values()),
             last["ms_per_query"], len(block["tried"]), time.perf_counter() - started)
    if config.target_recall and not block["met"]:
        log.warning("index recall target %.3f not reached: %.4f at the most costly setting "
                    "tried (%s)", config.target_recall, block["recall"], last)
    return block


def read_manifest(path: str | Path) -> dict:
    """Read and check an index directory's manifest.json."""
    p = Path(path)
    file = p / MANIFEST_FILE
    if not file.is_file():
        raise ArtifactError(f"{p} is not an index directory: no {MANIFEST_FILE}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{file} is not valid JSON: {exc}") from None
    if manifest.get("kind") != ARTIFACT_KIND:
        raise ArtifactError(f"{file} is not a {ARTIFACT_KIND} manifest")
    if manifest.get("format_version") not in READABLE_FORMATS:
        raise ArtifactError(f"{file}: unsupported format_version {manifest.get('format_version')}")
    return manifest


def check_encoder(manifest: dict, fingerprint: dict, index_path: str | Path = "") -> None:
    """Raise EncoderMismatchError when an index was built with another encoder."""
    from clinlinker_spark.encoder import fingerprint_mismatches

    problems = fingerprint_mismatches(manifest["encoder"], fingerprint)
    if problems:
        raise EncoderMismatchError(
            f"index {index_path} was built with another encoder than the one given "
            f"({manifest['encoder'].get('path')} vs {fingerprint.get('path')}): "
            + "; ".join(problems)
            + ". Rebuild the index with this encoder (clinlinker build-index) or use its encoder."
        )


@dataclass(frozen=True)
class CodeInfo:
    """One code of an index (a row of codes.parquet)."""

    code: str  # its one spelling
    parent_key: str  # "" without a known parent
    is_leaf: bool  # no code of the index has it as parent
    depth: int  # 1 without a parent in the index
    n_terms: int
    mention_count: int  # training mentions of all its terms


class TerminologyIndex:
    """A loaded index directory: FAISS index, rows, and lookups by position and exact text."""

    def __init__(self, path: Path, manifest: dict, index: faiss.Index, rows: pd.DataFrame,
                 codes: pd.DataFrame | None = None, lexical: Any = None,
                 texts: list[str] | None = None):
        self.path = path
        self.manifest = manifest
        self.faiss_index = index
        if "parent_key" not in rows:  # a format-1 index: a flat code list
            rows = rows.assign(parent_key="")
        self.rows = rows
        self.lexical = lexical  # a clinlinker_spark.lexical.LexicalIndex, or None
        positions = rows["position"].to_numpy()
        # the text of every vector position (a view, with_terminology, may leave positions
        # without rows: they keep their text and vector and give no candidate)
        self.texts: list[str] = (
            texts if texts is not None
            else rows.drop_duplicates("position")["term_norm"].tolist()
        )
        n = len(self.texts)
        # rows of position p are rows[starts[p]:starts[p + 1]] (rows are sorted by position)
        self._starts = np.searchsorted(positions, np.arange(n + 1), side="left")
        self._position_of_text = {t: i for i, t in enumerate(self.texts)}
        self._codes = rows["code"].astype(str).tolist()
        self._code_keys = rows["code_key"].astype(str).tolist()
        self._terms = rows["term"].astype(str).tolist()
        self._mention_counts = rows["mention_count"].to_numpy()
        # the same rows with each position's codes in code order instead of prior order: the
        # "no prior" ranking, where codes sharing a text are not told apart by training counts
        self._code_order = np.lexsort((rows["code_key"].to_numpy(), positions))
        # (code, code_key, term) per row, in both orders, sliced by position: building them
        # here once takes the per-hit tuple building out of linking's inner loop
        self._row_tuples = list(zip(self._codes, self._code_keys, self._terms))
        self._row_tuples_code_order: list[tuple[str, str, str]] | None = None  # on first use
        self._start_list: list[int] = self._starts.tolist()
        self._device_vectors: Any = None  # a torch tensor where search runs (place_on)
        self._flat_vectors: np.ndarray | None = None  # a flat index's storage (vectors_at)
        self.codes: pd.DataFrame = codes if codes is not None else code_table(rows)
        self._code_info: dict[str, CodeInfo] | None = None  # on first use (code_info)
        self._row_of: dict[tuple[int, str], int] | None = None  # on first use (row_of)
        self._leaves: dict[str, list[int]] | None = None  # on first use (leaf_rows_under)

    def with_terminology(self, terminology: pd.DataFrame) -> TerminologyIndex:
        """This index with other rows over the same vectors: ``terminology`` (a terminology
        table) mapped onto this index's positions by normalised text. Used to leave training
        mentions out (the ranker's out-of-fold features): every text of ``terminology`` must
        be a text of this index; positions it does not hold keep their vector but give no
        candidate. Vectors, FAISS index and lexical model are shared, not copied."""
        rows, _ = prepare_rows(terminology)
        positions = rows["term_norm"].map(self._position_of_text)
        if positions.isna().any():
            raise ArtifactError(f"{int(positions.isna().sum())} term(s) of the terminology are "
                                f"not texts of index {self.path}")
        rows["position"] = positions.astype("int64")
        rows = rows.sort_values(
            ["position", "mention_count", "is_main_term", "code_key"],
            ascending=[True, False, False, True], kind="mergesort").reset_index(drop=True)
        view = TerminologyIndex(self.path, self.manifest, self.faiss_index, rows[ROW_COLUMNS],
                                code_table(rows), self.lexical, self.texts)
        view._device_vectors = self._device_vectors
        return view

    def code_info(self, code_key: str) -> CodeInfo | None:
        """What the index knows of a code (:class:`CodeInfo`), or None for a code it lacks."""
        if self._code_info is None:
            c = self.codes
            self._code_info = {
                key: CodeInfo(code, parent, bool(leaf), int(depth), int(n_terms), int(count))
                for key, code, parent, leaf, depth, n_terms, count in zip(
                    c["code_key"], c["code"], c["parent_key"], c["is_leaf"], c["depth"],
                    c["n_terms"], c["mention_count"])
            }
        return self._code_info.get(code_key)

    def leaf_rows_under(self, code_key: str) -> list[int]:
        """The main-term rows of the leaf codes below ``code_key`` in the hierarchy (any
        depth), most training mentions first, then code order; [] for a leaf."""
        if self._leaves is None:
            is_main = self.rows["is_main_term"].tolist()
            main: dict[str, int] = {}
            for i, key in enumerate(self._code_keys):
                if key not in main or (is_main[i] and not is_main[main[key]]):
                    main[key] = i
            codes = self.codes
            parent_of = dict(zip(codes["code_key"], codes["parent_key"]))
            mentions = dict(zip(codes["code_key"], codes["mention_count"]))
            leaves: dict[str, list[str]] = {}
            for key, leaf in zip(codes["code_key"], codes["is_leaf"]):
                if not leaf:
                    continue
                seen: set[str] = set()
                parent = parent_of.get(key, "")
                while parent and parent not in seen:
                    seen.add(parent)
                    leaves.setdefault(parent, []).append(key)
                    parent = parent_of.get(parent, "")
            self._leaves = {
                parent: [main[k] for k in sorted(keys, key=lambda k: (-mentions[k], k))
                         if k in main]
                for parent, keys in leaves.items()
            }
        return self._leaves.get(code_key, [])

    def row_position(self, row: int) -> int:
        """Vector position of row ``row``."""
        return int(np.searchsorted(self._starts, row, side="right") - 1)

    def row_of(self, position: int, code_key: str) -> int:
        """Row number of (position, code_key), or -1."""
        if self._row_of is None:
            self._row_of = {(int(p), k): i for i, (p, k) in enumerate(
                zip(self.rows["position"].tolist(), self._code_keys))}
        return self._row_of.get((position, code_key), -1)

    @property
    def is_exact_flat(self) -> bool:
        """An exact fp32 index (IndexFlat), whose vectors can be searched anywhere alike."""
        return isinstance(faiss.downcast_index(self.faiss_index), faiss.IndexFlat)

    @property
    def search_device(self) -> str:
        """Where :meth:`search` runs: "faiss-cpu" or a torch device such as "cuda:0"."""
        return "faiss-cpu" if self._device_vectors is None else str(self._device_vectors.device)

    def place_on(self, device: Any) -> None:
        """Search from now on with torch on ``device`` (an exact flat index only): its vectors
        are copied there once (1.5M terms x 384 dims: 2.3 GB)."""
        import torch

        if not self.is_exact_flat:
            raise ArtifactError(
                f"index {self.path} is a {self.manifest['index'].get('type')} index"
                f"{' with compressed vectors' if self.manifest['index'].get('type') == 'flat' else ''}"
                ": only an exact flat (fp32) index can be searched on a GPU")
        vectors = self.faiss_index.reconstruct_n(0, self.faiss_index.ntotal)
        self._device_vectors = torch.from_numpy(vectors).to(device)
        log.info("index %s: %d vectors placed on %s for search", self.path.name, len(vectors),
                 self._device_vectors.device)

    @classmethod
    def load(
        cls,
        path: str | Path,
        expected_fingerprint: dict | None = None,
        mmap: bool = False,
        verify: bool = False,
    ) -> "TerminologyIndex":
        """Load an index directory.

        ``expected_fingerprint``: the fingerprint of the encoder that will embed queries; a
        mismatch raises EncoderMismatchError before anything large is read. ``mmap``: memory-map
        the FAISS file (multi-GB indexes shared by several workers). ``verify``: recompute the
        content hash.
        """
        p = Path(path)
        manifest = read_manifest(p)
        if expected_fingerprint is not None:
            check_encoder(manifest, expected_fingerprint, p)
        for name in (INDEX_FILE, ROWS_FILE):
            if not (p / name).is_file():
                raise ArtifactError(f"index directory {p} is incomplete: no {name}")
        if verify and _content_hash(p) != manifest["content_hash"]:
            raise ArtifactError(f"index directory {p} does not match its manifest's content hash")
        flags = faiss.IO_FLAG_MMAP if mmap else 0
        index = faiss.read_index(str(p / INDEX_FILE), flags)
        _apply_search_params(index, manifest["index"])
        rows = pd.read_parquet(p / ROWS_FILE)
        if index.ntotal != rows["position"].nunique():
            raise ArtifactError(f"index directory {p}: {index.ntotal} vectors but "
                                f"{rows['position'].nunique()} distinct terms in {ROWS_FILE}")
        codes = pd.read_parquet(p / CODES_FILE) if (p / CODES_FILE).is_file() else None
        lexical = None
        if "lexical" in manifest:
            from clinlinker_spark.lexical import LexicalIndex

            lexical = LexicalIndex.load(p)
        return cls(p, manifest, index, rows, codes, lexical)

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    @property
    def code_keys(self) -> set[str]:
        return set(self._code_keys)

    def __len__(self) -> int:
        return len(self.texts)

    def search(self, vectors: np.ndarray, k: int) -> Hits:
        """Top-``k`` distinct texts for each query vector [n, dim] (inner product), best first.

        A query's hits do not depend on the other queries of the call nor on where the search
        runs: near-ties are ordered by exact score, then position (:func:`search_in_order`).
        """
        return Hits(*search_in_order(vectors, k, len(self.texts), self._raw_search,
                                     self._exact_scores))

    def _raw_search(self, queries: np.ndarray, k: int) -> tuple[Any, Any]:
        import torch

        if self._device_vectors is not None:
            return torch_top_k(self._device_vectors, queries, k)
        # a process-wide FAISS setting: set here so that it holds in every worker
        if faiss.cvar.distance_compute_blas_threshold != FAISS_BLAS_MIN_QUERIES:
            faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_MIN_QUERIES
        scores, positions = self.faiss_index.search(queries, k)
        return torch.from_numpy(scores), torch.from_numpy(positions)

    def _exact_scores(self, queries: np.ndarray, rows: Any, positions: Any) -> Any:
        import torch

        base = self._device_vectors
        if base is not None:
            return exact_scores(lambda p: base[p], queries, rows, positions)
        return exact_scores(lambda p: torch.from_numpy(self.vectors_at(p.numpy())), queries,
                            rows, positions)

    def holds_vectors_of(self, precision: str) -> bool:
        """Whether a term's stored vector is the one an encoder with the index's contract
        (:func:`check_encoder`) computing in ``precision`` gives the term's text: the index
        keeps its vectors in float32 (not fp16 or 8-bit codes; ``index.pq`` keeps a float32
        copy beside its codes) and the manifest says they were computed in that precision.
        Indexes built before the precision was recorded say nothing: False."""
        params = self.manifest.get("index", {})
        built = self.manifest.get("build", {}).get("precision")
        return built == precision and not params.get("fp16") and not params.get("sq8")

    def vectors_at(self, positions: np.ndarray) -> np.ndarray:
        """The stored (decoded) vectors of ``positions``, float32 [len, dim]."""
        if self._flat_vectors is None:
            index = faiss.downcast_index(self.faiss_index)
            if isinstance(index, faiss.IndexRefine):  # the exact copy beside the codes
                index = faiss.downcast_index(index.refine_index)
            if isinstance(index, faiss.IndexFlat):
                # a view of the flat index's own storage (no copy; works memory-mapped)
                self._flat_vectors = faiss.rev_swig_ptr(
                    index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
        if self._flat_vectors is not None:
            return self._flat_vectors[positions]
        unique, inverse = np.unique(positions, return_inverse=True)
        try:
            found = self.faiss_index.reconstruct_batch(unique.astype(np.int64))
        except RuntimeError:  # an IVF index reconstructs through its direct map
            faiss.extract_index_ivf(self.faiss_index).make_direct_map()
            found = self.faiss_index.reconstruct_batch(unique.astype(np.int64))
        return found[inverse.reshape(-1)]

    def position_of(self, text_norm: str) -> int:
        """Vector position of an exact normalised text, or -1."""
        return self._position_of_text.get(text_norm, -1)

    def row_range(self, position: int) -> range:
        """Row numbers of a position's codes, in prior order (most training mentions first)."""
        return range(int(self._starts[position]), int(self._starts[position + 1]))

    def rows_in_code_order(self, position: int) -> np.ndarray:
        """Row numbers of a position's codes, in code order (no training-frequency prior)."""
        return self._code_order[int(self._starts[position]):int(self._starts[position + 1])]

    def code_rows(self, position: int, prior: bool = True) -> list[tuple[str, str, str]]:
        """(code, code_key, term) of a position's rows: in prior order (most training mentions
        first, :meth:`row_range`) or in code order (:meth:`rows_in_code_order`)."""
        rows = self._row_tuples
        if not prior:
            if self._row_tuples_code_order is None:
                self._row_tuples_code_order = [rows[r] for r in self._code_order.tolist()]
            rows = self._row_tuples_code_order
        return rows[self._start_list[position]:self._start_list[position + 1]]

    def row(self, i: int) -> tuple[str, str, str, int]:
        """(code, code_key, term, mention_count) of row ``i``."""
        return (self._codes[i], self._code_keys[i], self._terms[i],
                int(self._mention_counts[i]))


def ensure_index(config: Any, encoder: Any) -> Path:
    """Return ``config.index.path``, building it from ``config.terminology`` when missing.

    ``config`` is a JobConfig. Building only happens when ``config.build_missing`` is true and
    terminology sources are configured; otherwise a missing index is an error.
    """
    from clinlinker_spark.fsutil import needs_build

    path = Path(config.index.path)
    if not needs_build(path, MANIFEST_FILE, "index", ArtifactError):
        return path
    if not config.build_missing:
        raise ArtifactError(f"no index at {path} (set build_missing: true to build it)")
    if not config.terminology.sources:
        raise ArtifactError(f"no index at {path} and no terminology.sources to build one from")
    from clinlinker_spark.terminology import load_terminology

    log.info("index %s missing: building it from %d terminology source(s)",
             path, len(config.terminology.sources))
    terminology = load_terminology(config.terminology)
    return build_index(terminology, encoder, config.index, path,
                       name=config.terminology.name, version=config.terminology.version,
                       search_k=config.linking.search_k)
