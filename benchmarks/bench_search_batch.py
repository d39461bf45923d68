"""Exact search time per query batch size: FAISS's per-query kernel against its matrix multiply.

    .venv/bin/python benchmarks/bench_search_batch.py [--index artifacts/indexes/cie10-icd10cm-codiesp-train]

FAISS picks its kernel by the number of queries in one call
(``faiss.cvar.distance_compute_blas_threshold``: faiss-cpu 1.15 ships 128,000; the index sets
``index.FAISS_BLAS_MIN_QUERIES``). A night's UDF tasks search a few hundred forms or fewer
per call, so the kernel below the threshold decides their search time. Random unit queries,
one thread (as in a Spark task), k = 200 (the job's ``search_k``). Prints one line per batch
size: milliseconds per call and per query with each setting, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from clinlinker_spark.index import FAISS_BLAS_MIN_QUERIES, TerminologyIndex


def per_call_ms(index: TerminologyIndex, queries: np.ndarray, k: int, threshold: int,
                reps: int) -> float:
    # TerminologyIndex.search sets the project's threshold: time FAISS itself here
    faiss.cvar.distance_compute_blas_threshold = threshold
    index.faiss_index.search(queries, k)  # warm
    t = time.perf_counter()
    for _ in range(reps):
        index.faiss_index.search(queries, k)
    return (time.perf_counter() - t) / reps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", default="artifacts/indexes/cie10-icd10cm-codiesp-train")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    index = TerminologyIndex.load(args.index)
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((2048, index.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    shipped = faiss.cvar.distance_compute_blas_threshold
    print(f"index {args.index}: {index.faiss_index.ntotal} vectors, dim {index.dim}, "
          f"k {args.k}, 1 thread; FAISS default threshold {shipped}, "
          f"project {FAISS_BLAS_MIN_QUERIES}")
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048):
        q = np.ascontiguousarray(queries[:n])
        default = per_call_ms(index, q, args.k, shipped, args.reps)
        ours = per_call_ms(index, q, args.k, FAISS_BLAS_MIN_QUERIES, args.reps)
        print(json.dumps({"queries": n, "default_ms": round(default, 2),
                          "project_ms": round(ours, 2),
                          "default_ms_per_query": round(default / n, 3),
                          "project_ms_per_query": round(ours / n, 3),
                          "speedup": round(default / ours, 2)}))
    faiss.cvar.distance_compute_blas_threshold = shipped


if __name__ == "__main__":
    main()
