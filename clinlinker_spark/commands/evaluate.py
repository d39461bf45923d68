"""``clinlinker evaluate``: accuracy@k of a linker (and its lexical baseline) on gold mentions."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from clinlinker_spark.config import GOLD_FORMATS, RERANK_FUSIONS
from clinlinker_spark.errors import ConfigError
from clinlinker_spark.evaluation import DEFAULT_KS, dumps, evaluate_candidates, format_table
from clinlinker_spark.index import TerminologyIndex, read_manifest
from clinlinker_spark.linker import candidates_from_hits, order_candidates, score_candidates
from clinlinker_spark.text import normalize_text

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="accuracy@k on a gold corpus, with the TF-IDF baseline beside it",
        description=__doc__,
    )
    p.add_argument("--gold", required=True, help="gold TSV file or folder")
    p.add_argument("--gold-format", required=True, choices=GOLD_FORMATS)
    p.add_argument("--labels", default="", help="comma-separated mention labels to keep")
    p.add_argument("--gold-split", default="all", choices=["all", "train", "test"],
                   help="evaluate on one side of a document-level split of the gold corpus")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=13)
    p.add_argument("--index", required=True, help="index directory (clinlinker build-index)")
    p.add_argument("--encoder", default="", help="bi-encoder directory the index was built with")
    p.add_argument("--reranker", default="", help="cross-encoder directory (optional)")
    p.add_argument("--rerank-top-n", type=int, default=25)
    p.add_argument("--fusion", default=",".join(RERANK_FUSIONS),
                   help="comma-separated orders of the re-ranked candidates to report: none "
                        "(cross-encoder score alone, row +rerank) and/or rrf (reciprocal-rank "
                        "fusion with the retrieval order, row +rerank_rrf); scored once")
    p.add_argument("--rrf-k", type=int, default=60, help="the rrf fusion's rank constant")
    p.add_argument("--retriever", default="dense,tfidf",
                   help="comma-separated: dense, tfidf (default both)")
    p.add_argument("--k", default=",".join(map(str, DEFAULT_KS)), help="cut-offs, e.g. 1,5,25")
    p.add_argument("--search-k", type=int, default=200, help="raw hits searched per mention")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--json-out", default="", help="also write the JSON report to this file")
    p.set_defaults(func=run)


def load_gold(args: argparse.Namespace):
    from clinlinker_spark.corpora import read_gold, split_by_document

    gold = read_gold(args.gold, args.gold_format)
    if args.labels:
        gold = gold[gold["label"].isin([s.strip() for s in args.labels.split(",")])]
    if args.gold_split != "all":
        train, test = split_by_document(gold, args.test_fraction, args.split_seed)
        gold = train if args.gold_split == "train" else test
    return gold.reset_index(drop=True)


def run(args: argparse.Namespace) -> int:
    ks = sorted({int(k) for k in args.k.split(",") if k.strip()})
    retrievers = [r.strip() for r in args.retriever.split(",") if r.strip()]
    unknown = set(retrievers) - {"dense", "tfidf"}
    if unknown or not retrievers:
        raise ConfigError(f"--retriever takes dense and/or tfidf; got {args.retriever!r}")
    fusions = [f.strip() for f in args.fusion.split(",") if f.strip()]
    if set(fusions) - set(RERANK_FUSIONS) or not fusions:
        raise ConfigError(f"--fusion takes {', '.join(RERANK_FUSIONS)}; got {args.fusion!r}")
    if "dense" in retrievers and not args.encoder:
        raise ConfigError("--encoder is required for the dense retriever")
    gold = load_gold(args)
    manifest = read_manifest(args.index)
    top_k = max(ks)
    search_k = max(args.search_k, top_k)

    encoder = None
    expected = None
    if "dense" in retrievers or args.reranker:
        from clinlinker_spark.encoder import BiEncoder

        spec = manifest["encoder"]
        encoder = BiEncoder(
            args.encoder, pooling=spec["pooling"], max_length=spec["max_length"],
            prefix=spec.get("prefix", ""), normalize=spec["normalize"],
            batch_size=args.batch_size, device=args.device, num_threads=args.threads,
        )
        expected = encoder.fingerprint()
    index = TerminologyIndex.load(args.index, expected_fingerprint=expected)
    texts = gold["text"].fillna("").map(normalize_text).tolist()
    unique = list(dict.fromkeys(texts))
    row_of = {t: i for i, t in enumerate(unique)}
    gather = [row_of[t] for t in texts]
    log.info("evaluating %d gold mentions (%d distinct texts) against %d index texts",
             len(gold), len(unique), len(index))

    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for name in retrievers:
        started = time.perf_counter()
        if name == "dense":
            vectors = encoder.encode(unique, show_progress=True)
            hits = index.search(vectors, search_k)
            self_scores = np.einsum("ij,ij->i", vectors, vectors)
        else:
            from clinlinker_spark.tfidf import TfidfRetriever

            hits = TfidfRetriever(index.texts).search(unique, search_k)
            self_scores = np.ones(len(unique), np.float32)
        timings[name] = round(time.perf_counter() - started, 2)
        for prior in (False, True):
            cands = candidates_from_hits(index, unique, hits, top_k, prior, self_scores)
            variant = name + ("+exact_prior" if prior else "")
            results[variant] = evaluate_candidates(gold, [cands[g] for g in gather], index, ks)
            if name == "dense" and prior and args.reranker:
                from clinlinker_spark.reranker import CrossEncoderReranker

                reranker = CrossEncoderReranker(args.reranker, batch_size=args.batch_size,
                                                device=args.device, num_threads=args.threads)
                started = time.perf_counter()
                scored = score_candidates(unique, cands, reranker.score, args.rerank_top_n)
                timings["rerank"] = round(time.perf_counter() - started, 2)
                for fusion in fusions:
                    reranked = order_candidates(scored, args.rerank_top_n, True, fusion,
                                                args.rrf_k)
                    row = variant + ("+rerank" if fusion == "none" else f"+rerank_{fusion}")
                    results[row] = evaluate_candidates(
                        gold, [reranked[g] for g in gather], index, ks)

    report = {
        "meta": {
            "gold": str(args.gold), "gold_format": args.gold_format,
            "labels": args.labels or "all", "split": args.gold_split,
            "mentions": len(gold), "index": str(args.index),
            "index_terms": len(index), "index_codes": len(index.code_keys),
            "encoder": args.encoder or "-", "reranker": args.reranker or "-",
            "rerank_top_n": args.rerank_top_n if args.reranker else 0,
            "rrf_k": args.rrf_k if args.reranker and "rrf" in fusions else 0,
        },
        "timings_s": timings,
        "results": results,
    }
    print(format_table(report))
    print(dumps(report))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(dumps(report) + "\n", encoding="utf-8")
    return 0
