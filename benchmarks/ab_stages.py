"""What a linking stage costs: the link job with it on against the same job with it off, A/B
in one Spark session on one machine.

    .venv/bin/python benchmarks/ab_stages.py --config conf/bench.yaml [--stage ranker]
        [--rounds 2] [--set k=v] [--job-set k=v]

Night 1 of the 100k benchmark corpus (``corpus`` of conf/bench.yaml, the corpus bench_link.py
links) goes through the shipped job settings (``link.job_config`` with ``--job-set``
overrides: de-duplicated surface forms, term vectors reused, a fresh table and form cache each
run). ``--stage`` picks the comparison:

- ``ranker``: ``off`` is ``linking.retrievers: [dense]`` without a ranker (so no confidence,
  no needs_review); ``on`` is the job config as it is (``[dense, lexical]`` and its ranker).
  The ranker must exist (``make run`` trains the default's).
- ``context``: ``off`` is the job config without ``context.reranker``; ``on`` is the job
  config with the context stage (``--job-set context.reranker=DIR --job-set
  context.ranker=DIR``). Every mention gets a context: a sentence made of it and its
  document's neighbouring mentions, so that nearly every (form, context) pair is distinct,
  as in clinical notes.

The runs alternate off, on, off, on, ... (``--rounds`` pairs) after one warm-up run of each
on 500 mentions, so that a drift in the machine's speed hits both arms alike; the result is
each arm's median mentions/s over every mention of night 1 and the ratio on / off, with the
job's own stage timings. Results: ``<work_dir>/ab_<stage>/results.json`` and a Markdown table
on stdout. No mention text is logged.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from bench_link import spark_job_config
from benchlib import ProcessSampler, load_bench_config, machine_info, make_corpus, \
    setup_logging, write_json

from clinlinker_spark.config import JobConfig, load_config, to_dict

log = logging.getLogger("benchmarks.ab_stages")


def arms(job: JobConfig, stage: str) -> dict[str, JobConfig]:
    """The two configurations compared for ``stage`` (module docstring)."""
    if stage == "context":
        if not job.context.reranker:
            raise SystemExit("--stage context needs --job-set context.reranker=DIR and "
                             "--job-set context.ranker=DIR")
        on = dataclasses.replace(job, input=dataclasses.replace(
            job.input, context_column="context", context_start_column="context_start",
            context_end_column="context_end"))
        off = dataclasses.replace(on, context=dataclasses.replace(job.context, reranker="",
                                                                  ranker=""))
        return {"off": off, "on": on}
    if "lexical" not in job.linking.retrievers or not job.ranker.path:
        raise SystemExit("the job config must have linking.retrievers [dense, lexical] and a "
                         "ranker.path for the 'on' arm")
    off = dataclasses.replace(
        job, linking=dataclasses.replace(job.linking, retrievers=("dense",),
                                         review_below=0.0),
        ranker=dataclasses.replace(job.ranker, path=""))
    return {"off": off, "on": job}


def with_contexts(mentions: pd.DataFrame, seed: int = 7) -> pd.DataFrame:
    """``mentions`` with a synthetic sentence per mention: the mention between its document's
    previous and next mentions and a number of days, and its offsets in it (columns
    context, context_start, context_end)."""
    rng = np.random.default_rng(seed)
    texts = mentions["text"].astype(str).tolist()
    docs = mentions["doc_id"].tolist()
    contexts, starts, ends = [], [], []
    for i, text in enumerate(texts):
        before = texts[i - 1] if i > 0 and docs[i - 1] == docs[i] else "ingreso"
        after = texts[i + 1] if i + 1 < len(texts) and docs[i + 1] == docs[i] else "control"
        head = f"Paciente con {before}; presenta "
        contexts.append(f"{head}{text} desde hace {int(rng.integers(1, 30))} días y {after}.")
        starts.append(len(head))
        ends.append(len(head) + len(text))
    return mentions.assign(context=contexts, context_start=starts, context_end=ends)


def run(config_path: str, overrides: list[str], job_overrides: list[str], stage: str,
        rounds: int) -> dict[str, Any]:
    from clinlinker_spark.spark.artifacts import resolve_artifacts
    from clinlinker_spark.spark.pipeline import run_link_job
    from clinlinker_spark.spark.session import build_spark_session

    cfg = load_bench_config(config_path, overrides)
    job = load_config(cfg.link.job_config, [*cfg.link.job_overrides, *job_overrides])
    configs = arms(job, stage)
    work = Path(cfg.work_dir) / f"ab_{stage}"
    work.mkdir(parents=True, exist_ok=True)
    for arm in configs.values():  # fails early on a missing artifact
        resolve_artifacts(dataclasses.replace(arm, build_missing=False))

    corpus = make_corpus(cfg.corpus)
    night = with_contexts(corpus.night1) if stage == "context" else corpus.night1
    night1, warmup = work / "night1.parquet", work / "warmup.parquet"
    night.to_parquet(night1, index=False)
    night.sample(n=min(500, len(night)), random_state=1).to_parquet(warmup, index=False)
    n_mentions = len(corpus.night1)
    stats = corpus.stats()
    del corpus

    spark = build_spark_session(job.spark)
    spark.sparkContext.setLogLevel("ERROR")
    results: dict[str, Any] = {"machine": machine_info(), "bench_config": to_dict(cfg),
                               "job_config": to_dict(job), "stage": stage, "corpus": stats,
                               "mentions": n_mentions, "runs": []}
    try:
        def link(arm: str, source: Path, tag: str) -> dict[str, Any]:
            table, cache = work / f"table-{tag}", work / f"cache-{tag}"
            shutil.rmtree(table, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
            config = spark_job_config(configs[arm], str(source), str(table), True, False,
                                      str(cache))
            with ProcessSampler(cfg.link.sample_interval_s) as sampler:
                t = time.perf_counter()
                summary = run_link_job(spark, config)
                wall = time.perf_counter() - t
            return {"arm": arm, "wall_s": round(wall, 3),
                    "mentions_per_s": round(n_mentions / wall, 1) if tag != "warmup" else None,
                    "timings_s": summary.timings_s,
                    "counts_by_status": summary.counts_by_status,
                    "context_stage": summary.context_stage,
                    "busy_cores_others": sampler.result.get("others_busy_cores")}

        for arm in configs:
            log.info("warm-up: %s", arm)
            link(arm, warmup, "warmup")
        for r in range(rounds):
            for arm in configs:
                log.info("round %d: %s", r + 1, arm)
                row = link(arm, night1, arm)
                log.info("round %d %s: %.1f s, %s", r + 1, arm, row["wall_s"],
                         row["timings_s"])
                results["runs"].append(row)
    finally:
        spark.stop()
    medians = {arm: statistics.median(x["mentions_per_s"] for x in results["runs"]
                                      if x["arm"] == arm) for arm in configs}
    results["median_mentions_per_s"] = medians
    results["ratio_on_off"] = round(medians["on"] / medians["off"], 3)
    write_json(work / "results.json", results)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [f"{results['stage']}: night 1 of {results['mentions']} mentions; runs "
             "alternate off/on", "",
             "| run | arm | wall s | mentions/s | stage seconds | statuses | context stage "
             "| others' busy cores |",
             "|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(results["runs"], 1):
        stages = ", ".join(f"{k} {v:.1f}" for k, v in row["timings_s"].items())
        lines.append(f"| {i} | {row['arm']} | {row['wall_s']:.1f} | {row['mentions_per_s']:.0f}"
                     f" | {stages} | {row['counts_by_status']} | {row['context_stage']} "
                     f"| {row['busy_cores_others']} |")
    med = results["median_mentions_per_s"]
    lines += ["", f"median mentions/s: off {med['off']:.0f}, on {med['on']:.0f}; "
              f"on / off = {results['ratio_on_off']:.3f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="conf/bench.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--job-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the job config (link.job_config)")
    parser.add_argument("--stage", choices=("ranker", "context"), default="ranker")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs (default 2)")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    print(markdown(run(args.config, args.set, args.job_set, args.stage, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
