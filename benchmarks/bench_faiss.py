"""FAISS search time against bi-encoder time, up to terminology scale; IVF / HNSW recall@k.

    .venv/bin/python benchmarks/bench_faiss.py --config conf/bench.yaml [--set key=value ...]

One batch of ``faiss.queries`` real mention forms (the corpus sources of conf/bench.yaml) is
embedded with the bi-encoder of ``faiss.real_index`` (configured from that index's manifest),
and that time is the denominator: the target is FAISS search at most 10% of the
bi-encoder time for the same mentions.

Index vectors: at the real index's size, its own term vectors (read back from the flat index).
Larger indexes (``large_data``):

- ``composed`` (default): real embeddings of composed term texts. Terminologies at the
  1.5M scale (SNOMED CT's descriptions) are mostly compositions of simpler concepts ("X con Y",
  "X debido a Y", "X izquierdo", "X crónico"), so the texts are the real index's distinct terms
  alone, then its short terms (up to 6 words) with a qualifier, or joined to a second term by a connective, drawn with a fixed seed
  and de-duplicated, and embedded with the same bi-encoder (bf16 autocast, every core: 1.5M
  texts take about 45 minutes on 2 cores). The vectors are cached under
  ``<work_dir>/faiss/composed-<n>-<seed>-<model>.f32`` (raw float32, filled in chunks so an
  interrupted run resumes); every size is a prefix of the largest, so sizes are nested.
  ``--embed-only`` fills the cache and exits.
- ``noise``: a real term vector plus Gaussian noise of norm ``semi_synthetic_noise``,
  L2-normalised: cheap, but isotropic noise in 384 dimensions gives every cluster a high
  intrinsic dimension, which makes ANN recall look worse than on real embeddings.

Exact search time does not depend on the values; ANN recall does.

For every size: exact inner-product search (IndexFlatIP, what ``index_type: flat`` builds),
``k`` = linking.search_k hits per query. At ``ann_sizes``: IVF (nlist = 4*sqrt(n) unless
set, k-means on ``ivf_train_per_list * nlist`` vectors; vectors stored flat, as 8-bit codes
or as 4-bit fast-scan PQ codes re-scored with the exact vectors, ``ivf_storage``) at several
nprobe, and HNSW-Flat (M, efConstruction 40) at several efSearch up to ``hnsw_max_size``;
recall@``recall_k`` = share of the exact top-``recall_k`` positions found in the approximate
top-``recall_k``, build and search seconds (best of two). Results:
``<work_dir>/faiss/results.json`` and a Markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import (
    BenchConfig,
    ProcessSampler,
    cores_of_master,
    load_bench_config,
    load_snapshot,
    machine_info,
    read_mention_pool,
    setup_logging,
    write_json,
)

log = logging.getLogger("benchmarks.faiss")


def embed_queries(cfg: BenchConfig, threads: int) -> tuple[np.ndarray, float, list[float]]:
    """(query vectors [q, dim], best seconds to embed them, all timings); the index's encoder."""
    import torch

    from clinlinker_spark.encoder import BiEncoder
    from clinlinker_spark.index import read_manifest
    from clinlinker_spark.text import normalize_text

    manifest = read_manifest(cfg.faiss.real_index)
    enc = manifest["encoder"]
    encoder = BiEncoder(enc["path"], pooling=enc["pooling"], max_length=enc["max_length"],
                        prefix=enc["prefix"], normalize=enc["normalize"], num_threads=threads)
    torch.set_num_threads(threads)
    pool = read_mention_pool(cfg.corpus.sources)
    forms = list(dict.fromkeys(normalize_text(t) for t in pool["text"]))
    rng = np.random.default_rng(cfg.faiss.seed)
    chosen = [forms[i] for i in rng.choice(len(forms), size=cfg.faiss.queries, replace=False)]
    encoder.encode(chosen[:64])  # warm-up
    timings = []
    vectors = np.empty(0)
    for _ in range(2):
        t = time.perf_counter()
        vectors = encoder.encode(chosen)
        timings.append(time.perf_counter() - t)
    return vectors, min(timings), timings


def real_vectors(path: str) -> np.ndarray:
    import faiss

    index = faiss.read_index(str(Path(path) / "index.faiss"))
    return index.reconstruct_n(0, index.ntotal)


QUALIFIERS = (
    "agudo", "aguda", "crónico", "crónica", "izquierdo", "izquierda", "derecho", "derecha",
    "bilateral", "recidivante", "recurrente", "leve", "moderado", "moderada", "grave", "severo",
    "congénito", "congénita", "adquirido", "postoperatorio", "postoperatoria", "no especificado",
    "no especificada", "inicial", "subsecuente", "secuela", "en remisión", "en el embarazo",
    "del adulto", "infantil", "primario", "primaria", "secundario", "secundaria", "persistente",
    "intermitente", "episódico", "sintomático", "asintomático", "de origen desconocido",
    "con complicaciones", "sin complicaciones", "de larga evolución", "inducido por fármacos",
)
CONNECTIVES = ("con", "debido a", "secundario a", "asociado a", "sin", "tras", "en paciente con",
               "por", "y")


def composed_texts(bases: list[str], n: int, seed: int) -> list[str]:
    """``n`` distinct term texts: every base term first, then compositions (see module doc)."""
    rng = np.random.default_rng(seed)
    out = list(dict.fromkeys(bases))[:n]
    # compositions from short terms: a long description joined to another would be cut at the
    # encoder's max_length and embed as the first alone
    bases = [b for b in out if len(b.split()) <= 6]
    seen = set(out)
    while len(out) < n:
        m = 2 * (n - len(out)) + 1000
        kind = rng.random(m)
        a = rng.integers(0, len(bases), m)
        b = rng.integers(0, len(bases), m)
        q = rng.integers(0, len(QUALIFIERS), m)
        c = rng.integers(0, len(CONNECTIVES), m)
        for i in range(m):
            if kind[i] < 0.3:
                text = f"{bases[a[i]]} {QUALIFIERS[q[i]]}"
            elif kind[i] < 0.9:
                text = f"{bases[a[i]]} {CONNECTIVES[c[i]]} {bases[b[i]]}"
            else:
                text = f"{bases[a[i]]} {QUALIFIERS[q[i]]} {CONNECTIVES[c[i]]} {bases[b[i]]}"
            if text not in seen:
                seen.add(text)
                out.append(text)
                if len(out) == n:
                    break
    return out


def composed_vectors(cfg: BenchConfig, n: int, threads: int) -> np.ndarray:
    """The first ``n`` composed term vectors, embedding (and caching) the missing ones."""
    import pandas as pd
    import torch

    from clinlinker_spark.encoder import BiEncoder
    from clinlinker_spark.index import read_manifest

    fc = cfg.faiss
    total = max(fc.sizes)
    enc = read_manifest(fc.real_index)["encoder"]
    path = Path(cfg.work_dir) / "faiss" / (
        f"composed-{total}-{fc.seed}-{enc['model_hash'][:12]}.f32")
    progress = path.with_suffix(".done")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        np.memmap(path, dtype=np.float32, mode="w+", shape=(total, fc.dim)).flush()
    vectors = np.memmap(path, dtype=np.float32, mode="r+", shape=(total, fc.dim))
    done = int(progress.read_text()) if progress.exists() else 0
    if done < n:
        bases = pd.read_parquet(Path(fc.real_index) / "rows.parquet",
                                columns=["term_norm"])["term_norm"].unique().tolist()
        bases = sorted(bases)
        texts = composed_texts(bases, total, fc.seed)
        encoder = BiEncoder(enc["path"], pooling=enc["pooling"], max_length=enc["max_length"],
                            prefix=enc["prefix"], normalize=enc["normalize"],
                            precision="bf16", num_threads=threads, batch_size=256)
        torch.set_num_threads(threads)
        chunk = 20_000
        started = time.perf_counter()
        for start in range(done, n, chunk):
            stop = min(n, start + chunk)
            vectors[start:stop] = encoder.encode(texts[start:stop])
            vectors.flush()
            progress.write_text(str(stop))
            rate = (stop - done) / (time.perf_counter() - started)
            log.info("composed terms embedded: %d of %d (%.0f texts/s)", stop, n, rate)
    return np.array(vectors[:n])


def semi_synthetic(base: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """``n`` unit vectors: a random real vector plus Gaussian noise of norm ~``noise`` each."""
    rng = np.random.default_rng(seed)
    dim = base.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    chunk = 100_000
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = base[rng.integers(0, len(base), size=m)]
        x = x + rng.standard_normal((m, dim), dtype=np.float32) * (noise / math.sqrt(dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:start + m] = x
    return out


def timed_search(index: Any, queries: np.ndarray, k: int,
                 repeats: int = 2) -> tuple[float, np.ndarray, np.ndarray]:
    """The best of ``repeats`` timed searches of every query (after a small warm-up), and the
    hits' scores and positions."""
    index.search(queries[:16], k)  # warm-up
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        scores, positions = index.search(queries, k)
        best = min(best, time.perf_counter() - t)
    return best, scores, positions


def run(cfg: BenchConfig) -> dict[str, Any]:
    import faiss

    from clinlinker_spark.config import load_config

    job = load_config(cfg.link.job_config, list(cfg.link.job_overrides))
    threads = cfg.threads or cores_of_master(job.spark.master)
    faiss.omp_set_num_threads(threads)
    fc = cfg.faiss
    results: dict[str, Any] = {"machine": machine_info(), "threads": threads,
                               "load_at_start": load_snapshot(), "sizes": []}
    with ProcessSampler() as sampler:
        queries, encode_s, encode_all = embed_queries(cfg, threads)
    results["bi_encoder"] = {"queries": len(queries), "seconds": round(encode_s, 3),
                             "all_seconds": [round(x, 3) for x in encode_all],
                             "mentions_per_s": round(len(queries) / encode_s, 1),
                             "resources": sampler.result}
    log.info("bi-encoder: %d mentions in %.2f s", len(queries), encode_s)
    base = real_vectors(fc.real_index)
    faiss.omp_set_num_threads(threads)
    for n in fc.sizes:
        with ProcessSampler() as sampler:
            row = measure_size(cfg, base, queries, n, encode_s, threads)
        row["resources"] = sampler.result
        results["sizes"].append(row)
        log.info("size %d: %s", n, {k: v for k, v in row.items() if k != "resources"})
        gc.collect()
    results["load_at_end"] = load_snapshot()
    return results


def measure_size(cfg: BenchConfig, base: np.ndarray, queries: np.ndarray, n: int,
                 encode_s: float, threads: int) -> dict[str, Any]:
    import faiss

    from clinlinker_spark.index import ivf_pq_factory, recall_at

    fc = cfg.faiss
    real = n == len(base)
    t = time.perf_counter()
    if real:
        vectors, data = base, "real term vectors"
    elif fc.large_data == "composed":
        vectors, data = composed_vectors(cfg, n, threads), "composed terms, embedded"
    else:
        vectors = semi_synthetic(base, n, fc.semi_synthetic_noise, fc.seed + n)
        data = "real + noise"
    make_s = time.perf_counter() - t
    row: dict[str, Any] = {"n": n, "data": data,
                           "make_s": round(make_s, 2), "variants": []}
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    search_s, _, exact = timed_search(flat, queries, fc.k)
    row["variants"].append({"index": "flat (exact)", "build_s": 0.0,
                            "search_s": round(search_s, 3),
                            "ratio_to_bi_encoder": round(search_s / encode_s, 4),
                            "recall": 1.0})
    del flat
    if n not in fc.ann_sizes:
        return row
    # IVF: vectors stored as they are (flat) or as 8-bit codes (sq8, index.sq8)
    for nlist_cfg, storage in ((c, s) for c in fc.ivf_nlist for s in fc.ivf_storage):
        nlist = min(n, nlist_cfg or max(1, int(4 * math.sqrt(n))))
        t = time.perf_counter()
        quantizer = faiss.IndexFlatIP(vectors.shape[1])
        if storage == "pq":  # what index.pq builds, with its default pq_m (dim / 2)
            ivf = faiss.index_factory(vectors.shape[1],
                                      ivf_pq_factory(nlist, vectors.shape[1] // 2),
                                      faiss.METRIC_INNER_PRODUCT)
        elif storage == "sq8":
            ivf = faiss.IndexIVFScalarQuantizer(quantizer, vectors.shape[1], nlist,
                                                faiss.ScalarQuantizer.QT_8bit,
                                                faiss.METRIC_INNER_PRODUCT)
        else:
            ivf = faiss.IndexIVFFlat(quantizer, vectors.shape[1], nlist,
                                     faiss.METRIC_INNER_PRODUCT)
        n_train = min(n, fc.ivf_train_per_list * nlist)
        rng = np.random.default_rng(fc.seed)
        sample = vectors if n_train == n else vectors[rng.choice(n, n_train, replace=False)]
        ivf.train(sample)
        ivf.add(vectors)
        build_s = time.perf_counter() - t
        lists = faiss.extract_index_ivf(ivf)
        for nprobe, refine in ((p, r) for p in fc.ivf_nprobe
                               for r in (fc.pq_refine_factor if storage == "pq" else (0,))):
            lists.nprobe = min(nprobe, nlist)
            label = f"ivf-{storage} nlist={nlist} nprobe={lists.nprobe}"
            if refine:
                faiss.downcast_index(ivf).k_factor = refine
                label += f" refine={refine}"
            s, _, approx = timed_search(ivf, queries, fc.k)
            row["variants"].append({
                "index": label, "build_s": round(build_s, 1),
                "train_vectors": n_train, "search_s": round(s, 3),
                "ratio_to_bi_encoder": round(s / encode_s, 4),
                "recall": round(recall_at(approx, exact, fc.recall_k), 4)})
        del ivf, quantizer
    # HNSW-Flat
    if n <= fc.hnsw_max_size:
        t = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(vectors.shape[1], fc.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = fc.hnsw_ef_construction
        hnsw.add(vectors)
        build_s = time.perf_counter() - t
        for ef in fc.hnsw_ef_search:
            hnsw.hnsw.efSearch = ef
            s, _, approx = timed_search(hnsw, queries, fc.k)
            row["variants"].append({
                "index": f"hnsw M={fc.hnsw_m} efSearch={ef}", "build_s": round(build_s, 1),
                "search_s": round(s, 3), "ratio_to_bi_encoder": round(s / encode_s, 4),
                "recall": round(recall_at(approx, exact, fc.recall_k), 4)})
        del hnsw
    return row


def markdown(results: dict[str, Any]) -> str:
    enc = results["bi_encoder"]
    lines = [f"bi-encoder: {enc['queries']} mentions in {enc['seconds']} s "
             f"({enc['mentions_per_s']} mentions/s, {results['threads']} threads)", "",
             "| terms | data | index | build s | search s (1024 q, k=200) | search / bi-encoder "
             "| recall@25 |", "|---|---|---|---|---|---|---|"]
    for row in results["sizes"]:
        for v in row["variants"]:
            lines.append(f"| {row['n']} | {row['data']} | {v['index']} | {v['build_s']} | "
                         f"{v['search_s']} | {v['ratio_to_bi_encoder']:.1%} | {v['recall']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="conf/bench.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--embed-only", action="store_true",
                        help="fill the cache of composed term vectors (large_data: composed), "
                             "then exit")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    cfg = load_bench_config(args.config, args.set)
    if args.embed_only:
        from clinlinker_spark.config import load_config

        job = load_config(cfg.link.job_config, list(cfg.link.job_overrides))
        composed_vectors(cfg, max(cfg.faiss.sizes),
                         cfg.threads or cores_of_master(job.spark.master))
        return 0
    started = time.perf_counter()
    results = run(cfg)
    results["bench_seconds"] = round(time.perf_counter() - started, 1)
    write_json(Path(args.out or Path(cfg.work_dir) / "faiss" / "results.json"), results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
