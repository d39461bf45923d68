"""``clinlinker evaluate``: accuracy@k of a linker (and its lexical baseline) on gold mentions,
and, with a ranker, how far its confidence can be trusted."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from clinlinker_spark.config import GOLD_FORMATS, RERANK_FUSIONS, LinkingConfig, from_dict
from clinlinker_spark.errors import ConfigError
from clinlinker_spark.evaluation import (
    DEFAULT_KS,
    confidence_report,
    dumps,
    evaluate_candidates,
    format_table,
    plot_precision_coverage,
    precision_coverage_curve,
)
from clinlinker_spark.index import TerminologyIndex, read_manifest
from clinlinker_spark.linker import (
    Linker,
    candidates_from_hits,
    hybrid_candidates,
    order_candidates,
    score_candidates,
)
from clinlinker_spark.text import normalize_code, normalize_text

RETRIEVER_VARIANTS = ("dense", "tfidf", "hybrid")

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
                   help="comma-separated: dense, tfidf (the index's lexical model alone), "
                        "hybrid (the union of both, linking.retrievers [dense, lexical]); "
                        "default dense,tfidf")
    p.add_argument("--ranker", default="",
                   help="ranker directory (clinlinker train-ranker): adds the row 'ranker' "
                        "(linked as a job with that ranker links: its retrievers and linking "
                        "settings, the --reranker when it uses the cross-encoder's score) "
                        "and the confidence report")
    p.add_argument("--gold-text", default="",
                   help="the corpus's folder of {doc_id}.txt documents: each mention gets its "
                        "sentence as context (needed by the context stage)")
    p.add_argument("--context-reranker", default="",
                   help="context-aware cross-encoder (train-crossencoder with context: true): "
                        "with --context-ranker, adds the row 'ranker+context', the mentions "
                        "linked as a job with that context stage links them")
    p.add_argument("--context-ranker", default="",
                   help="the ranker trained with the context-aware cross-encoder's score")
    p.add_argument("--context-top-n", type=int, default=10)
    p.add_argument("--context-below", type=float, default=0.9,
                   help="context.below: mentions whose confidence is below it go through the "
                        "context stage")
    p.add_argument("--context-category-chars", type=int, default=3,
                   help="context.same_category_chars: ... or whose first two codes share this "
                        "many leading characters (0: off)")
    p.add_argument("--target-precision", type=float, default=0.95,
                   help="the confidence report's target: the threshold that reaches it on "
                        "these mentions, and precision and coverage at the threshold the "
                        "ranker picked for it on its training folds")
    p.add_argument("--category-chars", type=int, default=0,
                   help="also report accuracy@k by category: codes compared on their first N "
                        "characters (3 for ICD-10's category; 0: off)")
    p.add_argument("--plot", default="", help="precision-coverage PNG (default: beside "
                   "--json-out, with a .png suffix, when a ranker is given)")
    p.add_argument("--k", default=",".join(map(str, DEFAULT_KS)), help="cut-offs, e.g. 1,5,25")
    p.add_argument("--search-k", type=int, default=200, help="raw hits searched per mention")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--json-out", default="", help="also write the JSON report to this file")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI the evaluation is logged to as a run (default: "
                   "$MLFLOW_TRACKING_URI, else sqlite:///artifacts/mlflow/mlflow.db; '': off); "
                   "also the registry that models:/ URIs of --encoder, --reranker, --ranker "
                   "and the context models resolve in")
    p.add_argument("--experiment", default="clinlinker", help="MLflow experiment")
    p.set_defaults(func=run)


def mlflow_config(args: argparse.Namespace):
    """The MlflowConfig of ``--tracking-uri`` and ``--experiment``."""
    import dataclasses

    from clinlinker_spark.config import MlflowConfig

    found = MlflowConfig(experiment=args.experiment)
    if args.tracking_uri is not None:
        found = dataclasses.replace(found, tracking_uri=args.tracking_uri)
    return found


def resolve_model_args(args: argparse.Namespace, mlflow) -> dict[str, dict[str, str]]:
    """Replace ``models:/`` URIs among the model arguments by their directories (in place);
    returns the registry entries by argument."""
    from clinlinker_spark.tracking import resolve_model

    registered = {}
    for name in ("encoder", "reranker", "ranker", "context_reranker", "context_ranker"):
        found = resolve_model(getattr(args, name), mlflow)
        if found.registered:
            registered[name] = found.registered
            setattr(args, name, found.path)
    return registered


def read_gold_corpus(path: str, gold_format: str, text_dir: str = "", labels: str = "",
                     split: str = "all", test_fraction: float = 0.2, split_seed: int = 13):
    """The gold mentions ``clinlinker evaluate`` scores: ``path`` read in ``gold_format``
    (with each mention's sentence when ``text_dir`` holds the documents), only the
    comma-separated ``labels`` when given, and one side of the document split (``split``
    ``train`` or ``test``) unless ``all``."""
    from clinlinker_spark.corpora import read_gold, split_by_document

    gold = read_gold(path, gold_format, text_dir=text_dir or None)
    if labels:
        gold = gold[gold["label"].isin([s.strip() for s in labels.split(",")])]
    if split != "all":
        train, test = split_by_document(gold, test_fraction, split_seed)
        gold = train if split == "train" else test
    return gold.reset_index(drop=True)


def load_gold(args: argparse.Namespace):
    """:func:`read_gold_corpus` of the command's arguments."""
    return read_gold_corpus(args.gold, args.gold_format, args.gold_text, args.labels,
                            args.gold_split, args.test_fraction, args.split_seed)


def run(args: argparse.Namespace) -> int:
    from clinlinker_spark.tracking import tracked_run

    mlflow = mlflow_config(args)
    registered = resolve_model_args(args, mlflow)
    with tracked_run(mlflow, "evaluate", f"evaluate {Path(str(args.gold)).name}") as tracked:
        tracked.log_params({k: v for k, v in vars(args).items() if k != "func"})
        report = evaluate(args)
        log_evaluation(tracked, args, report, registered)
    return 0


def log_evaluation(tracked, args: argparse.Namespace, report: dict,
                   registered: dict[str, dict[str, str]]) -> None:
    """The report on the evaluation's run (its numbers as metrics, the JSON and the plot as
    artifacts, the models' registry entries as tags), and its headline row (accuracy@k of
    the ranker, else of the bi-encoder with the exact-match prior; ECE) on the runs that
    trained the models evaluated (``tracking.RUN_FILE`` beside them), under
    ``evaluation.<gold name>.``."""
    from clinlinker_spark.tracking import TrackedRun, numeric_metrics, training_run_id

    if not tracked.enabled:
        return
    numbers = {k: v for k, v in report.items() if k not in ("confidence", "confidence_context")}
    for name in ("confidence", "confidence_context"):
        if name in report:
            numbers[name] = {k: v for k, v in report[name].items() if k != "curve"}
    tracked.log_metrics(numeric_metrics(numbers))
    tracked.set_tags({f"clinlinker.registered.{k}": v["uri"] for k, v in registered.items()})
    tracked.log_dict(report, "evaluation.json")
    plot = plot_path(args, "confidence" in report)
    if plot and Path(plot).is_file():
        tracked.log_file(plot)
    row = "ranker" if "ranker" in report["results"] else next(
        (r for r in ("dense+exact_prior", "dense", "tfidf+exact_prior")
         if r in report["results"]), None)
    if row is None:
        return
    headline = {"all": report["results"][row]["subsets"]["all"],
                "ece": report.get("confidence", {}).get("ece")}
    prefix = f"evaluation.{Path(str(args.gold)).stem}.{row}."
    metrics = numeric_metrics(headline, prefix)
    for model_dir in {args.encoder, args.reranker, args.ranker} - {""}:
        run_id = training_run_id(model_dir)
        if run_id:
            try:
                TrackedRun(tracked.client, run_id, tracked.config).log_metrics(metrics)
            except Exception:  # noqa: BLE001 - another store's run: this run has it anyway
                log.warning("could not log the evaluation on training run %s", run_id)


def evaluate(args: argparse.Namespace) -> dict:
    """The evaluation report of ``args`` (printed, and written where asked)."""
    ks, retrievers, fusions, needs_encoder = _parse_choices(args)
    gold = load_gold(args)
    manifest = read_manifest(args.index)
    top_k = max(ks)
    search_k = max(args.search_k, top_k)

    encoder = _load_encoder(args, manifest) if needs_encoder else None
    expected = encoder.fingerprint() if encoder is not None else None
    index = TerminologyIndex.load(args.index, expected_fingerprint=expected)
    texts = gold["text"].fillna("").map(normalize_text).tolist()
    unique = list(dict.fromkeys(texts))
    row_of = {t: i for i, t in enumerate(unique)}
    gather = [row_of[t] for t in texts]
    log.info("evaluating %d gold mentions (%d distinct texts) against %d index texts",
             len(gold), len(unique), len(index))

    def report_of(cands: list) -> dict:
        return evaluate_candidates(gold, [cands[g] for g in gather], index, ks,
                                   args.category_chars)

    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    retrieved = _retrieve(args, encoder, index, unique, retrievers, search_k, timings)
    for name in retrievers:
        for prior in (False, True):
            variant = name + ("+exact_prior" if prior else "")
            cands = _candidates_of(args, name, prior, index, unique, top_k, *retrieved)
            results[variant] = report_of(cands)
            if name == "dense" and prior and args.reranker:
                _rerank_rows(args, variant, unique, cands, fusions, results, timings, report_of)

    confidence = context_confidence = context_stage = None
    if args.ranker:
        confidence, linker = _evaluate_ranker(args, encoder, index, unique, gather, gold,
                                              results, timings, report_of)
        if args.context_ranker:
            context_confidence, context_stage = _evaluate_context(
                args, linker, index, gold, ks, results, timings)

    report = {
        "meta": _report_meta(args, gold, index, fusions, context_stage),
        "timings_s": timings,
        "results": results,
        **({"confidence": confidence} if confidence is not None else {}),
        **({"confidence_context": context_confidence}
           if context_confidence is not None else {}),
    }
    _print_report(report)
    _write_outputs(args, report, confidence, context_confidence)
    return report


def _parse_choices(args: argparse.Namespace) -> tuple[list[int], list[str], list[str], bool]:
    """(cut-offs, retrievers, fusions, whether the bi-encoder is needed) of the arguments;
    a ConfigError for unknown choices and for stages missing what they need."""
    ks = sorted({int(k) for k in args.k.split(",") if k.strip()})
    retrievers = [r.strip() for r in args.retriever.split(",") if r.strip()]
    unknown = set(retrievers) - set(RETRIEVER_VARIANTS)
    if unknown or not retrievers:
        raise ConfigError(f"--retriever takes {', '.join(RETRIEVER_VARIANTS)}; "
                          f"got {args.retriever!r}")
    fusions = [f.strip() for f in args.fusion.split(",") if f.strip()]
    if set(fusions) - set(RERANK_FUSIONS) or not fusions:
        raise ConfigError(f"--fusion takes {', '.join(RERANK_FUSIONS)}; got {args.fusion!r}")
    if (args.context_reranker or args.context_ranker) and not (
            args.context_reranker and args.context_ranker and args.ranker and args.gold_text):
        raise ConfigError("the context stage needs --context-reranker, --context-ranker, "
                          "--ranker (the context-free stage) and --gold-text")
    needs_encoder = bool({"dense", "hybrid"} & set(retrievers) or args.reranker or args.ranker)
    if needs_encoder and not args.encoder:
        raise ConfigError("--encoder is required for the dense and hybrid retrievers, the "
                          "re-ranker and the ranker")
    return ks, retrievers, fusions, needs_encoder


def _load_encoder(args: argparse.Namespace, manifest: dict):
    """The bi-encoder ``--encoder``, with the pooling, max length, prefix and normalisation
    the index was built with (its manifest)."""
    from clinlinker_spark.encoder import BiEncoder

    spec = manifest["encoder"]
    return BiEncoder(
        args.encoder, pooling=spec["pooling"], max_length=spec["max_length"],
        prefix=spec.get("prefix", ""), normalize=spec["normalize"],
        batch_size=args.batch_size, device=args.device, num_threads=args.threads,
    )


def _retrieve(args: argparse.Namespace, encoder, index, unique: list[str],
              retrievers: list[str], search_k: int, timings: dict[str, float]) -> tuple:
    """(query vectors, dense hits, lexical query vectors, lexical hits) of the distinct gold
    texts, each None where no retriever asked for it; their seconds go to ``timings``."""
    vectors = dense_hits = None
    if {"dense", "hybrid"} & set(retrievers):
        started = time.perf_counter()
        vectors = encoder.encode(unique, show_progress=True)
        dense_hits = index.search(vectors, search_k)
        timings["dense"] = round(time.perf_counter() - started, 2)
    lexical_queries = lexical_hits = None
    if {"tfidf", "hybrid"} & set(retrievers):
        from clinlinker_spark.lexical import LexicalIndex

        started = time.perf_counter()
        lexical = index.lexical or LexicalIndex.fit(index.texts)
        lexical_queries = lexical.transform(unique)
        lexical_hits = lexical.search(unique, search_k, lexical_queries)
        timings["tfidf"] = round(time.perf_counter() - started, 2)
    return vectors, dense_hits, lexical_queries, lexical_hits


def _candidates_of(args: argparse.Namespace, name: str, prior: bool, index, unique: list[str],
                   top_k: int, vectors, dense_hits, lexical_queries, lexical_hits) -> list:
    """The top-``top_k`` candidates of each distinct text from the retriever ``name``, with or
    without the exact-match prior."""
    if name == "dense":
        self_scores = np.einsum("ij,ij->i", vectors, vectors)
        return candidates_from_hits(index, unique, dense_hits, top_k, prior, self_scores)
    if name == "tfidf":
        return candidates_from_hits(index, unique, lexical_hits, top_k, prior,
                                    np.ones(len(unique), np.float32))
    if index.lexical is None:
        raise ConfigError(f"index {args.index} has no lexical model: rebuild it "
                          "for the hybrid retriever")
    self_scores = np.einsum("ij,ij->i", vectors, vectors)
    return [c[:top_k] for c in hybrid_candidates(
        index, unique, dense_hits, lexical_hits, vectors, lexical_queries, top_k,
        prior, self_scores)]


def _rerank_rows(args: argparse.Namespace, variant: str, unique: list[str], cands: list,
                 fusions: list[str], results: dict, timings: dict, report_of) -> None:
    """The rows ``variant+rerank`` / ``variant+rerank_<fusion>``: ``cands`` scored once by
    the cross-encoder ``--reranker``, then ordered by each fusion."""
    from clinlinker_spark.reranker import CrossEncoderReranker

    reranker = CrossEncoderReranker(args.reranker, batch_size=args.batch_size,
                                    device=args.device, num_threads=args.threads)
    started = time.perf_counter()
    scored = score_candidates(unique, cands, reranker.score, args.rerank_top_n)
    timings["rerank"] = round(time.perf_counter() - started, 2)
    for fusion in fusions:
        reranked = order_candidates(scored, args.rerank_top_n, True, fusion, args.rrf_k)
        row = variant + ("+rerank" if fusion == "none" else f"+rerank_{fusion}")
        results[row] = report_of(reranked)


def _report_meta(args: argparse.Namespace, gold, index, fusions: list[str],
                 context_stage: dict | None) -> dict:
    """The report's ``meta``: what was evaluated, against what, with which settings."""
    return {
        "gold": str(args.gold), "gold_format": args.gold_format,
        "labels": args.labels or "all", "split": args.gold_split,
        "mentions": len(gold), "index": str(args.index),
        "index_terms": len(index), "index_codes": len(index.code_keys),
        "encoder": args.encoder or "-", "reranker": args.reranker or "-",
        "ranker": args.ranker or "-",
        "rerank_top_n": args.rerank_top_n if args.reranker else 0,
        "rrf_k": args.rrf_k if args.reranker and "rrf" in fusions else 0,
        **({"context_stage": context_stage} if context_stage is not None else {}),
    }


def _print_report(report: dict) -> None:
    """Print the accuracy table, the confidence reports, and the JSON report without the
    confidence curves."""
    print(format_table(report))
    confidences = {name: report[name] for name in ("confidence", "confidence_context")
                   if name in report}
    for name, found in confidences.items():
        print(format_confidence(found, "ranker" if name == "confidence" else "ranker+context"))
    print(dumps({k: v for k, v in report.items() if k not in confidences}
                | {name: {k: v for k, v in found.items() if k != "curve"}
                   for name, found in confidences.items()}))


def plot_path(args: argparse.Namespace, with_confidence: bool) -> str:
    """Where the precision-coverage plot goes: ``--plot``, or beside ``--json-out`` with a
    .png suffix; "" without a confidence report (no ranker) or a place to write it."""
    if not with_confidence:
        return ""
    return args.plot or (str(Path(args.json_out).with_suffix(".png")) if args.json_out else "")


def _write_outputs(args: argparse.Namespace, report: dict, confidence: dict | None,
                   context_confidence: dict | None) -> None:
    """Write ``--json-out``, and the precision-coverage plot when a ranker was evaluated
    (``--plot``, or beside ``--json-out``)."""
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(dumps(report) + "\n", encoding="utf-8")
    plot = plot_path(args, confidence is not None)
    if plot:
        curves = {"ranker confidence": confidence["curve"]}
        if context_confidence is not None:
            curves["ranker+context confidence"] = context_confidence["curve"]
        plot_precision_coverage(curves, plot,
                                title=f"{Path(str(args.gold)).name}: precision against coverage")
        log.info("precision-coverage plot written to %s", plot)


def _evaluate_ranker(args: argparse.Namespace, encoder, index, unique, gather, gold,
                     results, timings, report_of) -> dict:
    """The 'ranker' row: the gold texts linked as the job links them with this ranker, and
    the confidence report of its first codes."""
    from clinlinker_spark.ranker import Ranker

    ranker = Ranker.load(args.ranker)
    trained = ranker.spec.get("trained_with", {})
    linking = from_dict(LinkingConfig, trained.get("linking") or {}, "linking.")
    reranker = None
    if ranker.uses_rerank:
        if not args.reranker:
            raise ConfigError(f"ranker {args.ranker} uses the cross-encoder's score: give "
                              "--reranker")
        from clinlinker_spark.config import RerankerConfig
        from clinlinker_spark.reranker import CrossEncoderReranker

        reranker = CrossEncoderReranker(args.reranker, batch_size=args.batch_size,
                                        device=args.device, num_threads=args.threads)
        reranker_config = RerankerConfig(path=args.reranker, top_n=args.rerank_top_n)
    else:
        reranker_config = None
    linker = Linker(encoder, index, linking, reranker, reranker_config, ranker)
    started = time.perf_counter()
    ranked, confidences = linker.rank(unique, linker.rerank(unique, linker.retrieve(unique)))
    timings["ranker"] = round(time.perf_counter() - started, 2)
    results["ranker"] = report_of(ranked)
    report = _confidence_of(args, ranker, gold, [ranked[g] for g in gather],
                            [confidences[g] for g in gather])
    return report, linker


def _confidence_of(args: argparse.Namespace, ranker, gold, ranked: list,
                   conf: list) -> dict:
    """The confidence report of per-mention ranked lists and confidences, with the threshold
    ``ranker`` picked on its training folds for ``--target-precision``."""
    gold_keys = gold["code"].map(normalize_code).tolist()
    right = [bool(cands) and normalize_code(cands[0].code) == key
             for cands, key in zip(ranked, gold_keys)]
    picked = (ranker.spec.get("thresholds") or {}).get(f"{args.target_precision:g}")
    report = confidence_report(conf, right, args.target_precision,
                               picked["threshold"] if picked else None)
    report["picked_on_training_folds"] = picked
    report["curve"] = precision_coverage_curve(
        np.array([0.0 if c is None else c for c in conf]), np.array(right))
    return report


def _evaluate_context(args: argparse.Namespace, linker: Linker, index, gold, ks,
                      results, timings) -> tuple[dict, dict]:
    """The 'ranker+context' row: the gold mentions linked by ``linker`` (the context-free
    stage of the 'ranker' row) with a context stage, as a job with ``context.*`` set links
    them; its confidence report, and what went through the stage."""
    from clinlinker_spark.config import ContextConfig, RerankerConfig
    from clinlinker_spark.linker import mention_contexts

    settings = ContextConfig(reranker=args.context_reranker, ranker=args.context_ranker,
                             top_n=args.context_top_n, below=args.context_below,
                             same_category_chars=args.context_category_chars,
                             batch_size=args.batch_size)
    stage = Linker.context_stage_of(linker.encoder, index, linker.linking, settings,
                                    RerankerConfig(device=args.device), args.threads)
    full = Linker(linker.encoder, index, linker.linking, linker.reranker,
                  linker.reranker_config, linker.ranker, stage, settings)
    contexts = mention_contexts(gold, "context", "context_start", "context_end")
    started = time.perf_counter()
    ranked, confidences = full.link_texts(gold["text"].fillna("").tolist(), contexts)
    timings["ranker+context"] = round(time.perf_counter() - started, 2)
    results["ranker+context"] = evaluate_candidates(gold, ranked, index, ks,
                                                    args.category_chars)
    counts = full.take_context_counts()
    seconds = full.take_stage_seconds()
    stage_report = {
        **counts,
        "share_sent": round(counts["context_stage"] / max(1, counts["mentions"]), 4),
        "seconds": round(seconds["context"], 2),
        "settings": {"top_n": settings.top_n, "below": settings.below,
                     "same_category_chars": settings.same_category_chars},
    }
    log.info("context stage: %d of %d mentions (%d with a context) linked again, %d distinct "
             "(form, context) lists, %.1f s", counts["context_stage"], counts["mentions"],
             counts["with_context"], counts["context_lists"], seconds["context"])
    # one review threshold for every link, as the job applies linking.review_below: the
    # context-free ranker's
    return _confidence_of(args, linker.ranker, gold, ranked, confidences), stage_report


def format_confidence(report: dict, name: str = "ranker") -> str:
    lines = ["", f"[{name} confidence]  mentions={report['mentions']} "
             f"accuracy@1={report['accuracy']:.3f} mean confidence="
             f"{report['mean_confidence']:.3f} ECE={report['ece']:.3f}",
             f"{'threshold':>10}{'precision':>11}{'coverage':>10}"]
    for row in report["at_thresholds"]:
        lines.append(f"{row['threshold']:>10.2f}{row['precision']:>11.3f}{row['coverage']:>10.3f}")
    target = report["target_precision"]
    found = report["threshold_for_target"]
    lines.append(f"precision {target:g} on these mentions: " + (
        f"threshold {found['threshold']:.3f}, coverage {found['coverage']:.3f}" if found
        else "not reached"))
    picked = report.get("at_picked_threshold")
    if picked is not None:
        lines.append(f"at the threshold picked on training folds ({picked['threshold']:.3f}):"
                     f" precision {picked['precision']:.3f}, coverage {picked['coverage']:.3f}")
    return "\n".join(lines)
