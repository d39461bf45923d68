"""``clinlinker build-index``: embed a terminology and write an immutable index directory."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from clinlinker_spark.config import (
    GOLD_FORMATS, TERMINOLOGY_FORMATS, TerminologyConfig, TerminologySourceConfig, load_config,
)
from clinlinker_spark.errors import ConfigError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build-index", help="embed a terminology and write a FAISS index artifact",
        description=__doc__ + " Sources come from --config (terminology.sources) and/or "
        "--source FORMAT=PATH flags; flags override the config's encoder and index settings.",
    )
    p.add_argument("--config", default=None, help="job config YAML (encoder, index, terminology)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. index.index_type=hnsw (repeatable)")
    p.add_argument("--source", action="append", default=[], metavar="FORMAT=PATH",
                   help=f"terminology source; FORMAT one of {', '.join(TERMINOLOGY_FORMATS + GOLD_FORMATS)}")
    p.add_argument("--labels", default="", help="gold sources: comma-separated labels to keep")
    p.add_argument("--split", default="all", choices=["all", "train", "test"],
                   help="gold sources: side of a document-level split to index")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=13)
    p.add_argument("--min-level", type=int, default=2, help="cie10 sources: minimum level")
    p.add_argument("--encoder", default="", help="bi-encoder directory (overrides encoder.path)")
    p.add_argument("--pooling", default="", choices=["", "cls", "mean"])
    p.add_argument("--max-length", type=int, default=0)
    p.add_argument("--out", default="", help="index directory (overrides index.path)")
    p.add_argument("--index-type", default="", choices=["", "flat", "ivf", "hnsw"])
    p.add_argument("--fp16", action="store_true", help="store vectors as fp16")
    p.add_argument("--sq8", action="store_true",
                   help="store vectors as 8-bit scalar-quantised codes")
    p.add_argument("--pq", action="store_true",
                   help="IVF only: scan 4-bit product-quantiser codes, re-score the best hits "
                        "with the exact vectors (index.pq, index.refine_factor)")
    p.add_argument("--recall-mentions", default="", metavar="PATH",
                   help="mention texts (column 'text' of a Parquet, CSV or TSV file): measure "
                        "the index's recall@k against exact search with them "
                        "(index.recall_mentions)")
    p.add_argument("--target-recall", type=float, default=0.0,
                   help="ivf / hnsw: the least nprobe / efSearch whose measured recall@k "
                        "reaches this (index.target_recall; needs --recall-mentions)")
    p.add_argument("--name", default="", help="terminology name recorded in the manifest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index")
    p.add_argument("--dry-run", action="store_true",
                   help="read the sources and check the encoder and the index path, print "
                   "what the build would do as JSON, and stop: nothing is embedded or written")
    p.set_defaults(func=run)


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.set)
    for flag, key in ((args.encoder, "encoder.path"), (args.pooling, "encoder.pooling"),
                      (args.max_length, "encoder.max_length"), (args.out, "index.path"),
                      (args.index_type, "index.index_type"), (args.name, "terminology.name"),
                      (args.recall_mentions, "index.recall_mentions"),
                      (args.target_recall, "index.target_recall")):
        if flag:
            sets.append(f"{key}={flag}")
    if args.fp16:
        sets.append("index.fp16=true")
    if args.sq8:
        sets.append("index.sq8=true")
    if args.pq:
        sets.append("index.pq=true")
    return sets


def run(args: argparse.Namespace) -> int:
    from clinlinker_spark.encoder import BiEncoder
    from clinlinker_spark.index import build_index
    from clinlinker_spark.terminology import load_terminology, terminology_stats
    from clinlinker_spark.tracking import resolve_model_paths

    config = load_config(args.config, _flag_overrides(args))
    sources = list(config.terminology.sources)
    labels = tuple(s.strip() for s in args.labels.split(",") if s.strip())
    for item in args.source:
        if "=" not in item:
            raise ConfigError(f"--source {item!r} must look like FORMAT=PATH")
        fmt, path = item.split("=", 1)
        sources.append(TerminologySourceConfig(
            path=path, format=fmt, min_level=args.min_level,
            labels=labels if fmt in GOLD_FORMATS else (),
            split=args.split if fmt in GOLD_FORMATS else "all",
            test_fraction=args.test_fraction, split_seed=args.split_seed,
        ))
    if not sources:
        raise ConfigError("no terminology sources: give --source FORMAT=PATH or a --config with "
                          "terminology.sources")
    terminology_config: TerminologyConfig = dataclasses.replace(
        config.terminology, sources=tuple(sources))
    terminology = load_terminology(terminology_config)
    log.info("terminology: %s", terminology_stats(terminology))
    if args.dry_run:
        print(json.dumps(plan_build(config, terminology, args.overwrite), indent=2))
        return 0
    config, registered = resolve_model_paths(config)
    encoder = BiEncoder.from_config(config.encoder)
    encoder.registered = registered.get("encoder")
    out = build_index(terminology, encoder, config.index, config.index.path,
                      name=terminology_config.name, version=terminology_config.version,
                      overwrite=args.overwrite, search_k=config.linking.search_k)
    print(out)
    return 0


def plan_build(config: Any, terminology: Any, overwrite: bool) -> dict[str, Any]:
    """What ``build-index`` would do with the ``terminology`` it read: the encoder (checked,
    not loaded) and the index directory (refused when it holds an index and ``overwrite`` is
    not given, as the build refuses it)."""
    from clinlinker_spark.index import check_index_dir
    from clinlinker_spark.modeling import check_model_dir

    check_model_dir(config.encoder.path)
    out = Path(config.index.path)
    exists = check_index_dir(out, overwrite)
    return {"job": "build-index", "encoder": config.encoder.path, "index": str(out),
            "action": "replace" if exists else "create", "index_type": config.index.index_type,
            "terms": int(len(terminology)), "codes": int(terminology["code"].nunique())}
