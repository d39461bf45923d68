"""A/B of a second-night run between two checkouts of the project, on one machine.

    .venv/bin/python benchmarks/ab_nightly.py --code /path/to/checkout \
        --work artifacts/bench1m/link [--input new] [--reps 5]

Runs from the repository root (models and conf/local.yaml are read from there) with the job
code of ``--code`` (driver side: job, writer; the Python workers import the installed
package, so compare checkouts whose UDF modules are the same). Needs a ``bench_link.py`` work
directory: ``night1-snapshot`` (table + form cache after night 1), ``warmup.parquet`` and
``<input>.parquet`` (``new``: only the new mentions; ``night2``: the whole history). Each
repetition starts from a fresh copy of the snapshot; the first ones warm the JVM. Prints one
JSON line: wall seconds per repetition and the last run's stage seconds. Run it alternately
for the two checkouts (A B A B) and compare the later repetitions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", required=True, help="checkout whose job code runs")
    parser.add_argument("--work", required=True, help="bench_link.py work directory (link/)")
    parser.add_argument("--input", default="new", help="new | night2")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--job-config", default="conf/local.yaml")
    args = parser.parse_args(argv)
    code = str(Path(args.code).resolve())
    sys.path[:0] = [code, code + "/benchmarks"]
    import clinlinker_spark
    from bench_link import spark_job_config
    from clinlinker_spark.config import load_config
    from clinlinker_spark.spark.job import run_link_job
    from clinlinker_spark.spark.session import build_spark_session

    if not clinlinker_spark.__file__.startswith(code):
        raise SystemExit(f"clinlinker_spark imported from {clinlinker_spark.__file__}, not {code}")
    work = Path(args.work)
    job = load_config(args.job_config, [])
    spark = build_spark_session(job.spark)
    spark.sparkContext.setLogLevel("ERROR")
    walls: list[float] = []
    summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="ab-nightly-") as tmp:
        scratch = Path(tmp)
        run_link_job(spark, spark_job_config(job, str(work / "warmup.parquet"),
                                             str(scratch / "warm"), False, False))
        for _ in range(args.reps):
            for name in ("table", "cache"):
                shutil.rmtree(scratch / name, ignore_errors=True)
            shutil.copytree(work / "night1-snapshot" / "table", scratch / "table")
            shutil.copytree(work / "night1-snapshot" / "form-cache", scratch / "cache")
            config = spark_job_config(job, str(work / f"{args.input}.parquet"),
                                      str(scratch / "table"), True, True, str(scratch / "cache"))
            t = time.perf_counter()
            summary = run_link_job(spark, config)
            walls.append(round(time.perf_counter() - t, 2))
    spark.stop()
    print(json.dumps({"code": code, "input": args.input, "walls_s": walls,
                      "last_timings_s": summary.get("timings_s"),
                      "rows_written": summary.get("rows_written")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
