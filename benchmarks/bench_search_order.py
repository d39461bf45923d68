"""What ordering near-ties costs: TerminologyIndex.search against FAISS alone, on real queries.

    .venv/bin/python benchmarks/bench_search_order.py [--config conf/local.yaml] \
        [--bench-config conf/bench.yaml] [--queries 3000]

``TerminologyIndex.search`` (``index.search_in_order``) searches ``search_k + 8`` hits, then
orders hits whose float32 scores are within ``index.TIE_TOLERANCE`` of a neighbour by float64
score and position, so that a query's hits do not depend on the other queries of its call.
Queries: real mention forms of the benchmark corpus sources (conf/bench.yaml), embedded with
the default encoder (conf/local.yaml, CPU); the default index. One FAISS thread (as in a
Spark task). Prints JSON: microseconds per query for the raw FAISS top-k and for the ordered
search, the encoder's microseconds per query for scale, how many hits and rows the ordering
touches, and the largest float32 score error against float64 of each kernel (FAISS's
one-query kernel, its matrix multiply, torch): the tolerance must exceed twice the largest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import load_bench_config, read_mention_pool  # noqa: E402
from clinlinker_spark.config import load_config  # noqa: E402
from clinlinker_spark.encoder import BiEncoder  # noqa: E402
from clinlinker_spark.index import (  # noqa: E402
    FAISS_BLAS_MIN_QUERIES, TIE_MARGIN, TIE_TOLERANCE, TerminologyIndex, _tie_breaks,
)
from clinlinker_spark.text import normalize_text  # noqa: E402


def best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="conf/local.yaml")
    parser.add_argument("--bench-config", default="conf/bench.yaml")
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    config = load_config(args.config, [])
    bench = load_bench_config(args.bench_config, [])
    pool = read_mention_pool(bench.corpus.sources)
    forms = list(dict.fromkeys(normalize_text(t) for t in pool["text"]))
    rng = np.random.default_rng(0)
    forms = [forms[i] for i in rng.permutation(len(forms))[:args.queries]]
    encoder = BiEncoder.from_config(config.encoder)
    index = TerminologyIndex.load(config.index.path)
    started = time.perf_counter()
    queries = encoder.encode(forms)
    encode_s = time.perf_counter() - started
    k = config.linking.search_k
    n = len(queries)

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_MIN_QUERIES
    raw_s = best_of(lambda: index.faiss_index.search(queries, k), args.reps)
    ordered_s = best_of(lambda: index.search(queries, k), args.reps)

    scores, positions = index.faiss_index.search(queries, k + TIE_MARGIN)
    breaks = _tie_breaks(torch.from_numpy(scores), torch.from_numpy(positions)).numpy()
    tied = np.zeros(scores.shape, bool)
    tied[:, :-1] |= ~breaks
    tied[:, 1:] |= ~breaks
    scores, positions = index.faiss_index.search(queries, k)
    ordered = index.search(queries, k)

    vectors = index.faiss_index.reconstruct_n(0, index.faiss_index.ntotal)
    exact = queries[:500].astype(np.float64) @ vectors.astype(np.float64).T
    one_query = max(
        float(np.abs(s[0] - exact[i, p[0]]).max())
        for i in range(0, 500, 5)
        for s, p in [index.faiss_index.search(queries[i:i + 1], k)])
    matmul = np.abs(scores[:500] - np.take_along_axis(exact, positions[:500], 1)).max()
    by_torch = np.abs((torch.from_numpy(queries[:500]) @ torch.from_numpy(vectors).T).numpy()
                      - exact).max()
    print(json.dumps({
        "index": str(config.index.path), "terms": len(index), "queries": n, "k": k,
        "tolerance": TIE_TOLERANCE, "margin": TIE_MARGIN,
        "us_per_query_faiss": round(raw_s / n * 1e6, 1),
        "us_per_query_in_order": round(ordered_s / n * 1e6, 1),
        "in_order_over_faiss": round(ordered_s / raw_s, 3),
        "us_per_query_encode": round(encode_s / n * 1e6, 1),
        "share_of_hits_in_near_ties": round(float(tied[:, :k].mean()), 4),
        "share_of_rows_searched_again": round(float((~breaks[:, k - 1:].any(1)).mean()), 4),
        "share_of_rows_in_another_order_than_faiss": round(
            float((ordered.positions != positions).any(1).mean()), 4),
        "max_float32_error": {"faiss_one_query": one_query, "faiss_matmul": float(matmul),
                              "torch": float(by_torch)},
    }, indent=1))


if __name__ == "__main__":
    main()
