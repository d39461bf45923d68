"""Can exact search at 1.5M terms cost less than brute force? Score spread, bounds, precision.

    .venv/bin/python benchmarks/bench_exact_bounds.py --config conf/bench.yaml \\
        --set faiss.real_index=artifacts/indexes/cie10-codiesp-sample [--n 1500000]

The target is FAISS search at most 10% of the bi-encoder's time, with exact search up to
about 1.5M terms. Brute force needs 2·n·d FLOPs a query, three times the bi-encoder's a
mention at 1.5M terms (see BENCHMARKS.md). An exact top-k does not have to score every term
in full precision, if a cheaper pass gives bounds that prove the rest cannot enter it. This
script measures how far that goes on the benchmark's 1.5M composed term vectors (the cache
that ``bench_faiss.py --embed-only`` fills) and ``faiss.queries`` real mention forms:

1. **Score spread**: the mean best, ``recall_k``-th and ``k``-th scores, and the scores of
   random terms (mean, standard deviation, 99th percentile). A bound that is looser than the
   gap between the ``k``-th score and the bulk of the terms prunes nothing.
2. **Projection bounds**: vectors rotated into an orthonormal basis whose first axis is the
   terms' mean direction and whose others are the principal axes of the rest. For a split
   after ``d'`` axes, q·x = q_a·x_a + q_b·x_b with |q_b·x_b| <= |q_b|·|x_b|, so
   q_a·x_a + |q_b|·|x_b| bounds the score from above. Reported per ``d'``: the share of the
   terms whose bound reaches the exact ``recall_k``-th and ``k``-th scores (the least any
   such search must score in full, however it is built), and a search built from FAISS
   alone: a flat index over the ``d'``+1 coordinates [x_a, |x_b|] returns the ``m`` terms of
   highest bound for the query [q_a, |q_b|]; their exact scores give the ``k``-th best; a
   query is proven exact when the ``m``-th bound is below it. Its seconds (first pass, then
   re-scoring) against brute force, and the share of queries proven.
3. **Lower precision**: the query x term score matrix alone (no top-k) in float32 and
   bfloat16 with torch, over a ``--gemm-terms`` prefix, scaled to ``n``.

Everything is timed on the same machine in one run, against the bi-encoder embedding the same
queries (the denominator of bench_faiss.py). Results: ``<work_dir>/faiss/exact-bounds.json``
and a summary on stdout. Memory: about 3x the vectors (2.3 GB at 1.5M x 384).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_faiss import composed_vectors, embed_queries, timed_search
from benchlib import cores_of_master, load_bench_config, machine_info, setup_logging, write_json

log = logging.getLogger("benchmarks.exact_bounds")


def rotation(vectors: np.ndarray, sample: int, seed: int) -> np.ndarray:
    """An orthonormal basis [dim, dim]: the mean direction, then the principal axes of the
    vectors' components orthogonal to it, by falling variance."""
    rng = np.random.default_rng(seed)
    rows = vectors[np.sort(rng.choice(len(vectors), min(sample, len(vectors)), replace=False))]
    mean = rows.mean(axis=0)
    axis = (mean / np.linalg.norm(mean)).astype(np.float64)
    rest = rows - np.outer(rows @ axis, axis)
    _, eigvecs = np.linalg.eigh(np.cov(rest.T))
    principal = eigvecs[:, ::-1][:, : vectors.shape[1] - 1]
    return np.concatenate([axis[:, None], principal], axis=1).astype(np.float32)


def score_spread(vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray,
                 recall_k: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(len(vectors), 20_000, replace=False)] @ queries[:256].T
    kth = exact[:256, -1]
    return {"best": float(exact[:, 0].mean()),
            f"top_{recall_k}": float(exact[:, recall_k - 1].mean()),
            f"top_{exact.shape[1]}": float(exact[:, -1].mean()),
            "random_mean": float(sample.mean()), "random_std": float(sample.std()),
            "random_p99": float(np.percentile(sample, 99)),
            "random_within_0.02_of_kth": float((sample >= kth[None, :] - 0.02).mean())}


def bound_coordinates(x: np.ndarray, dims: int) -> np.ndarray:
    """[x_a, |x_b|] of rotated vectors split after ``dims`` axes: the inner product of a
    term's and a query's is the upper bound q_a·x_a + |q_b|·|x_b| of their score."""
    return np.ascontiguousarray(np.concatenate(
        [x[:, :dims], np.linalg.norm(x[:, dims:], axis=1)[:, None]], axis=1))


def bound_survivors(first: np.ndarray, q_first: np.ndarray, exact: np.ndarray,
                    recall_k: int, n_queries: int) -> dict[str, float]:
    """Shares of the terms whose upper bound (:func:`bound_coordinates` of terms and queries)
    reaches the exact recall_k-th and k-th scores."""
    at_recall, at_k = [], []
    for j in range(n_queries):
        bound = first @ q_first[j]
        at_recall.append(float((bound >= exact[j, recall_k - 1]).mean()))
        at_k.append(float((bound >= exact[j, -1]).mean()))
    return {"survive_recall_k": float(np.mean(at_recall)), "survive_k": float(np.mean(at_k))}


def same_top_k(vectors: np.ndarray, query: np.ndarray, ours: np.ndarray,
               brute: np.ndarray, tie: float = 1e-5) -> bool:
    """Whether two top-k sets agree, up to terms tied (within ``tie``) at the k-th score."""
    differ = np.setxor1d(ours, brute)
    if not len(differ):
        return True
    kth = float((vectors[ours] @ query).min())
    return bool(np.all(np.abs(vectors[differ] @ query - kth) <= tie))


def bounded_search(vectors: np.ndarray, queries: np.ndarray, first: np.ndarray,
                   q_first: np.ndarray, k: int, candidates: list[int],
                   exact_ids: np.ndarray, chunk: int = 32) -> list[dict[str, float]]:
    """The FAISS-only bounded exact search over ``first`` (:func:`bound_coordinates` of the
    terms) at each candidate count m: seconds, the share of queries proven exact, and how
    many of those found brute force's top k (the check)."""
    import faiss

    index = faiss.IndexFlatIP(first.shape[1])
    index.add(first)
    index.search(q_first[:16], k)  # warm-up
    out = []
    for m in candidates:
        t = time.perf_counter()
        bounds, ids = index.search(q_first, m)
        first_s = time.perf_counter() - t
        proven, found = [], []
        for s in range(0, len(queries), chunk):
            scores = np.einsum("qmd,qd->qm", vectors[ids[s:s + chunk]], queries[s:s + chunk])
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            kth = np.take_along_axis(scores, top, axis=1).min(axis=1)
            proven.append(bounds[s:s + chunk, -1] < kth - 1e-5)
            found.append(np.take_along_axis(ids[s:s + chunk], top, axis=1))
        seconds = time.perf_counter() - t
        is_proven = np.concatenate(proven)
        hits = np.concatenate(found)
        same = [same_top_k(vectors, queries[j], hits[j], exact_ids[j])
                for j in np.flatnonzero(is_proven)]
        out.append({"m": m, "first_s": round(first_s, 3),
                    "total_s": round(seconds, 3),
                    "proven": round(float(is_proven.mean()), 4),
                    "proven_equal_to_brute_force": f"{sum(same)} of {len(same)}"})
        log.info("d'=%d m=%d: %s", first.shape[1] - 1, m, out[-1])
    return out


def gemm_seconds(vectors: np.ndarray, queries: np.ndarray, n: int,
                 threads: int) -> dict[str, float]:
    """Seconds for the score matrix of every query against n terms, per dtype (scaled from the
    prefix given)."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        q = torch.from_numpy(queries).to(dtype)
        x = torch.from_numpy(vectors).to(dtype)
        q @ x[:10_000].T  # warm-up
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            for s in range(0, len(x), 50_000):
                q @ x[s:s + 50_000].T
            best = min(best, time.perf_counter() - t)
        out[name] = best * n / len(x)
    return out


def run(cfg: Any, n: int, dims: list[int], candidates: list[int],
        gemm_terms: int) -> dict[str, Any]:
    import faiss

    from clinlinker_spark.config import load_config

    job = load_config(cfg.link.job_config, list(cfg.link.job_overrides))
    threads = cfg.threads or cores_of_master(job.spark.master)
    fc = cfg.faiss
    queries, encode_s, _ = embed_queries(cfg, threads)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    vectors = composed_vectors(cfg, n, threads)
    faiss.omp_set_num_threads(threads)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    exact_s, exact, exact_ids = timed_search(flat, queries, fc.k)
    del flat
    results: dict[str, Any] = {
        "machine": machine_info(), "threads": threads, "n": n, "queries": len(queries),
        "k": fc.k, "recall_k": fc.recall_k, "bi_encoder_s": round(encode_s, 3),
        "exact_s": round(exact_s, 3), "exact_ratio": round(exact_s / encode_s, 4),
        "spread": score_spread(vectors, queries, exact, fc.recall_k, fc.seed)}
    log.info("exact %.2f s against the bi-encoder's %.2f s; spread %s", exact_s, encode_s,
             results["spread"])
    basis = rotation(vectors, 200_000, fc.seed)
    rotated = vectors @ basis
    q_rot = queries @ basis
    energy = np.square(rotated[:, 1:]).sum(axis=0)
    results["bounds"] = []
    for d in dims:
        first, q_first = bound_coordinates(rotated, d), bound_coordinates(q_rot, d)
        row = {"dims": d, "rest_energy": round(float(energy[d - 1:].sum() / energy.sum()), 4),
               **bound_survivors(first, q_first, exact, fc.recall_k, 64)}
        row["search"] = bounded_search(vectors, queries, first, q_first, fc.k, candidates,
                                       exact_ids)
        del first
        results["bounds"].append(row)
        log.info("d'=%d: %s", d, {k: v for k, v in row.items() if k != "search"})
    del rotated
    gemm = gemm_seconds(vectors[:gemm_terms], queries, n, threads)
    results["gemm_s"] = {k: round(v, 3) for k, v in gemm.items()}
    results["gemm_ratio"] = {k: round(v / encode_s, 4) for k, v in gemm.items()}
    return results


def summary(r: dict[str, Any]) -> str:
    s = r["spread"]
    lines = [
        (f"{r['n']:,} terms, {r['queries']} queries, k = {r['k']}: "
         f"bi-encoder {r['bi_encoder_s']} s, "
         f"exact {r['exact_s']} s ({100 * r['exact_ratio']:.1f}%)"),
        "scores: " + ", ".join(f"{k} {v:.4f}" for k, v in s.items()),
        "",
        (f"| d' | energy beyond d' | terms reaching the {r['recall_k']}th / {r['k']}th score "
         "| m | first pass s | total s | / exact | queries proven | proven = brute force |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in r["bounds"]:
        for i, t in enumerate(b["search"]):
            head = (f"{b['dims']} | {100 * b['rest_energy']:.1f}% | "
                    f"{100 * b['survive_recall_k']:.2f}% / {100 * b['survive_k']:.2f}%"
                    if i == 0 else " | | ")
            lines.append(f"| {head} | {t['m']} | {t['first_s']} | {t['total_s']} | "
                         f"{100 * t['total_s'] / r['exact_s']:.0f}% | {100 * t['proven']:.1f}% | "
                         f"{t['proven_equal_to_brute_force']} |")
    lines.append("")
    lines.append("score matrix alone: " + ", ".join(
        f"{k} {v} s ({100 * r['gemm_ratio'][k]:.0f}% of the bi-encoder)"
        for k, v in r["gemm_s"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="conf/bench.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--n", type=int, default=1_500_000, help="terms (a prefix of the cache)")
    parser.add_argument("--dims", default="64,128,192,256", help="d' values, comma-separated")
    parser.add_argument("--candidates", default="1000,4000",
                        help="m values of the bounded search, comma-separated")
    parser.add_argument("--gemm-terms", type=int, default=300_000)
    parser.add_argument("--out", default=None)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    cfg = load_bench_config(args.config, args.set)
    results = run(cfg, args.n, [int(x) for x in args.dims.split(",")],
                  [int(x) for x in args.candidates.split(",")], args.gemm_terms)
    write_json(Path(args.out or Path(cfg.work_dir) / "faiss" / "exact-bounds.json"), results)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
