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
from typing import Any


def _last_run(summary: Any) -> dict[str, Any]:
    """Stage seconds, UDF task seconds and rows written of a run's summary (a LinkSummary,
    or the dict a baseline checkout's job returns)."""
    if hasattr(summary, "to_dict"):
        summary = summary.to_dict()
    return {"last_timings_s": summary.get("timings_s"),
            "last_udf_task_s": summary.get("udf_task_seconds"),
            "rows_written": summary.get("rows_written")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", required=True, help="checkout whose job code runs")
    parser.add_argument("--work", required=True, help="bench_link.py work directory (link/)")
    parser.add_argument("--input", default="new",
                        help="new | night2 (night 2 from the night-1 snapshot) | night1 (the "
                             "de-duplicated full run into a fresh table and cache: run b') | "
                             "night1-cached (run b' into a fresh table, every form from "
                             "night 1's cache: its prepare and write without the models) | "
                             "plain (the first 10k mentions, no de-duplication: run b)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--job-config", default="conf/local.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the job config (repeatable)")
    parser.add_argument("--profile", action="store_true",
                        help="print the last repetition's Spark jobs (from the event log)")
    parser.add_argument("--event-log", default=None, metavar="DIR",
                        help="with --profile: keep the Spark event log in DIR")
    parser.add_argument("--cprofile", default=None, metavar="FILE",
                        help="profile the driver's Python in the last repetition (cProfile "
                             "stats to FILE; the 25 costliest calls by cumulative time printed)")
    args = parser.parse_args(argv)
    code = str(Path(args.code).resolve())
    sys.path[:0] = [code, code + "/benchmarks"]
    import clinlinker_spark
    from bench_link import spark_job_config, warm_up
    from clinlinker_spark.config import load_config
    try:
        from clinlinker_spark.spark.pipeline import run_link_job
    except ImportError:  # a checkout whose job module is spark/job.py (a baseline of an A/B)
        from clinlinker_spark.spark.job import run_link_job
    from clinlinker_spark.spark.session import build_spark_session

    if not clinlinker_spark.__file__.startswith(code):
        raise SystemExit(f"clinlinker_spark imported from {clinlinker_spark.__file__}, not {code}")
    work = Path(args.work)
    job = load_config(args.job_config, args.set)
    walls: list[float] = []
    summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="ab-nightly-") as tmp:
        scratch = Path(tmp)
        events = Path(args.event_log) if args.event_log else scratch / "events"
        events.mkdir(parents=True, exist_ok=True)
        extra = ({"spark.eventLog.enabled": "true", "spark.eventLog.dir": events.as_uri(),
                  "spark.eventLog.compress": "false"}
                 if args.profile else {})
        spark = build_spark_session(job.spark, extra)
        spark.sparkContext.setLogLevel("ERROR")
        warm_up(spark, job, work / "warmup.parquet", scratch)
        for _ in range(args.reps):
            for name in ("table", "cache"):
                shutil.rmtree(scratch / name, ignore_errors=True)
            night = args.input in ("new", "night2")
            if night:
                shutil.copytree(work / "night1-snapshot" / "table", scratch / "table")
            if night or args.input == "night1-cached":
                shutil.copytree(work / "night1-snapshot" / "form-cache", scratch / "cache")
            dedupe = args.input != "plain"
            source = "night1" if args.input == "night1-cached" else args.input
            config = spark_job_config(job, str(work / f"{source}.parquet"),
                                      str(scratch / "table"), dedupe, night,
                                      str(scratch / "cache") if dedupe else "")
            t = time.perf_counter()
            t_ms = time.time() * 1000
            if args.cprofile and len(walls) == args.reps - 1:
                import cProfile

                with cProfile.Profile() as prof:
                    summary = run_link_job(spark, config)
                prof.dump_stats(args.cprofile)
            else:
                summary = run_link_job(spark, config)
            walls.append(round(time.perf_counter() - t, 2))
        spark.stop()
        if args.profile:
            print_jobs(max(events.iterdir(), key=lambda f: f.stat().st_mtime), t_ms)
    if args.cprofile:
        import pstats

        pstats.Stats(args.cprofile).sort_stats("cumulative").print_stats(25)
    print(json.dumps({"code": code, "input": args.input, "walls_s": walls,
                      **_last_run(summary),
}))
    return 0


def print_jobs(event_log: Path, since_ms: float) -> None:
    """Each Spark job that started after ``since_ms``: start offset, wall, stages, tasks, the
    tasks' summed run time, and its description; then the driver time between jobs."""
    jobs: dict[int, dict] = {}
    stage_job: dict[int, int] = {}
    # Spark 4 writes a folder of rolled files (events_<n>_<app>) unless rolling is off
    files = sorted(event_log.glob("events_*"), key=lambda f: int(f.name.split("_")[1])) \
        if event_log.is_dir() else [event_log]
    for line in (ln for f in files for ln in f.read_text().splitlines()):
        ev = json.loads(line)
        kind = ev.get("Event")
        if kind == "SparkListenerJobStart" and ev["Submission Time"] >= since_ms:
            desc = (ev.get("Properties") or {}).get("spark.job.description") or ""
            jobs[ev["Job ID"]] = {"start": ev["Submission Time"], "desc": desc.split(": ")[-1],
                                  "stages": 0, "tasks": 0, "task_ms": 0}
            for sid in ev["Stage IDs"]:
                stage_job[sid] = ev["Job ID"]
        elif kind == "SparkListenerJobEnd" and ev["Job ID"] in jobs:
            jobs[ev["Job ID"]]["end"] = ev["Completion Time"]
        elif kind == "SparkListenerStageCompleted":
            info = ev["Stage Info"]
            job_id = stage_job.get(info["Stage ID"])
            if job_id in jobs and "Submission Time" in info:
                jobs[job_id]["stages"] += 1
                jobs[job_id]["tasks"] += info["Number of Tasks"]
        elif kind == "SparkListenerTaskEnd" and stage_job.get(ev["Stage ID"]) in jobs:
            jobs[stage_job[ev["Stage ID"]]]["task_ms"] += (ev["Task Info"]["Finish Time"]
                                                           - ev["Task Info"]["Launch Time"])
    busy = 0.0
    print(f"{'at s':>6} {'wall s':>7} {'stages':>6} {'tasks':>5} {'task s':>7}  stage")
    for job in sorted(jobs.values(), key=lambda j: j["start"]):
        wall = (job.get("end", job["start"]) - job["start"]) / 1000
        busy += wall
        print(f"{(job['start'] - since_ms) / 1000:6.2f} {wall:7.2f} {job['stages']:6d} "
              f"{job['tasks']:5d} {job['task_ms'] / 1000:7.2f}  {job['desc']}")
    print(f"{len(jobs)} Spark jobs, {busy:.2f} s inside them (overlaps counted twice)")


if __name__ == "__main__":
    sys.exit(main())
