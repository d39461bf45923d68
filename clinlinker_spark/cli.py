"""The one command-line entry point: ``clinlinker <command>`` or ``python -m clinlinker_spark``.

Each sub-command lives in ``clinlinker_spark/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``. Logging handlers
are configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys

from clinlinker_spark.errors import ClinLinkerError, root_cause

COMMAND_MODULES = (
    "base_encoder",
    "build_index",
    "link",
    "evaluate",
    "export_pyfunc",
    "train_biencoder",
    "train_crossencoder",
    "train_ranker",
    "variables",
)

log = logging.getLogger("clinlinker_spark")


def build_parser() -> argparse.ArgumentParser:
    # no abbreviated flags: a scheduled job's argv (a bundle task's parameters) must name
    # each flag in full, so that a typo fails instead of matching another flag
    parser = argparse.ArgumentParser(
        prog="clinlinker", allow_abbrev=False,
        description="Link Spanish clinical mentions to terminology codes (ClinLinker method).",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (mention text is only ever logged at DEBUG)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=functools.partial(argparse.ArgumentParser,
                                                               allow_abbrev=False))
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"clinlinker_spark.commands.{name}")
        module.register(sub)
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("py4j", "urllib3", "filelock", "transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except ClinLinkerError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line on the console, the trace at DEBUG
        log.debug("%s failed", args.command, exc_info=True)
        log.error("%s failed (%s): %s (the trace: --log-level DEBUG)", args.command,
                  type(exc).__name__, root_cause(exc))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
