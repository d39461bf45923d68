"""Throughput of the Spark link job against the plain core linker, in one run on one machine.

    .venv/bin/python benchmarks/bench_link.py --config conf/bench.yaml [--set key=value ...]

Steps (conf/bench.yaml, section ``link``, says which runs):

1. A corpus of ``corpus.mentions`` mentions sampled from real mention texts (../shared/data)
   with a Zipf-like skew over surface forms (night 1), and night 2 = night 1 plus
   ``corpus.new_fraction`` new mentions. Both are written as Parquet.
2. torch fp32 matmul GFLOP/s with 1 thread and with the benchmark's thread count.
3. ``core``: the plain linker in one Python process (a spawned child, so its memory is its
   own), torch and FAISS with the same number of threads as the Spark master has cores:
   every valid mention embedded and searched in batches of ``core_batch_size`` (the work
   the Spark job does without de-duplication); ``core_1thread``: the same with one thread
   (the per-core baseline). Both encode every mention, even one whose text is a term of the
   index (``linking.reuse_index_vectors`` off): "linking every mention separately".
   ``core_dedupe``: one ``Linker.link`` call
   over all mentions (each distinct normalised form linked once). ``core`` and ``spark``
   link the first ``link.plain_mentions`` mentions of night 1 (their cost per mention does
   not depend on N); the de-duplicating runs link all of night 1.
4. Spark on the job config's master (local[*]): a small warm-up run per prepare path (JVM
   start, models loaded in the Python workers, both paths' plans compiled), a plain scan of the input (the "read" time), then ``spark``
   (no de-duplication, every mention encoded), ``spark_reuse`` (no de-duplication, a mention
   whose text is an index term takes the term's vector), ``spark_dedupe`` (the shipped
   settings: night 1 into a fresh table, filling a fresh surface-form cache, term vectors
   reused), ``spark_dedupe_encode_all`` (the same with every distinct form encoded),
   ``incremental`` (night 2 = night 1 + the new mentions into that
   table: mentions already linked are skipped, forms in the cache are not computed) and
   ``nightly_new`` (only the new mentions as input, the way a nightly extract arrives; the
   cache warm). Each night-2 run is repeated ``link.night_repeats`` times from a fresh copy
   of night 1: the first repetition runs its code paths for the first time in the session,
   the way a nightly spark-submit starts; the median shows them warm.
5. ``rerank``: cross-encoder pairs/s on candidates of real forms, with a cross-encoder made
   from the base encoder plus an untrained one-logit head (the same compute as a trained
   one; no trained cross-encoder exists in this repository yet).

Each phase is sampled (benchlib.ProcessSampler): peak RSS of the driver's Python process,
its JVM and the pyspark Python workers, CPU seconds, and how busy the machine was with other
people's work; rates are given per wall second and per CPU-second of our own processes.
Results: ``<work_dir>/link/results.json`` and a Markdown summary on stdout (``--report`` prints
it again from a results.json). Mention text is never logged.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import multiprocessing
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchlib import (
    BenchConfig,
    ProcessSampler,
    bert_forward_flops,
    cores_of_master,
    load_bench_config,
    load_snapshot,
    machine_info,
    make_corpus,
    matmul_gflops,
    setup_logging,
    write_json,
)

from clinlinker_spark.config import JobConfig, load_config, to_dict

log = logging.getLogger("benchmarks.link")


# --------------------------------------------------------------------------------------------
# Runs in a spawned child process (the plain pipeline)


def _child(fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` in a fresh spawned process (its own memory, no Spark)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def _job_config(job: dict[str, Any], threads: int) -> JobConfig:
    from clinlinker_spark.config import from_dict

    config = from_dict(JobConfig, job)
    return dataclasses.replace(
        config, encoder=dataclasses.replace(config.encoder, num_threads=threads))


def _set_threads(threads: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def prepare_artifacts(job: dict[str, Any]) -> dict[str, Any]:
    """Build the base encoder / index when missing (as the job would); return their versions."""
    setup_logging("WARNING")
    from clinlinker_spark.spark.artifacts import resolve_artifacts

    art = resolve_artifacts(_job_config(job, 0))
    return {"encoder_path": art.encoder_path, "index_path": art.index_path, **art.versions,
            "index_terms": art.index_manifest["index"]["ntotal"]}


def core_run(job: dict[str, Any], corpus_path: str, out_path: str, mode: str,
             batch_size: int, threads: int) -> dict[str, Any]:
    """The plain core linker over one Parquet file of mentions; timings in seconds.

    ``mode`` "all": every valid mention is embedded and searched (Linker.retrieve and
    Linker.rank on batches of ``batch_size`` normalised texts, Linker.outcome per mention), as
    the Spark job does without surface-form de-duplication. "dedupe": one Linker.link call over every mention
    (each distinct normalised form embedded once). Results go to ``out_path`` (Parquet).
    """
    setup_logging("WARNING")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clinlinker_spark.linker import Linker, invalid_reason
    from clinlinker_spark.text import normalize_text

    config = _job_config(job, threads)
    _set_threads(threads)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    linker = Linker.from_config(config)
    _set_threads(threads)
    timings["load"] = time.perf_counter() - t_all

    t_run = time.perf_counter()
    cpu_run = time.process_time()
    t = t_run
    table = pq.read_table(corpus_path, columns=["mention_id", "text"])
    ids = table.column("mention_id").to_pylist()
    texts = table.column("text").to_pylist()
    timings["read"] = time.perf_counter() - t
    linker.take_stage_seconds()
    max_len = config.linking.max_text_length
    if mode == "all":
        t = time.perf_counter()
        reasons = [invalid_reason(x, max_len) for x in texts]
        norms = [normalize_text(x) if r is None else None for x, r in zip(texts, reasons)]
        valid = [i for i, r in enumerate(reasons) if r is None]
        timings["validate"] = time.perf_counter() - t
        t = time.perf_counter()
        status: list[Any] = [None] * len(ids)
        code: list[Any] = [None] * len(ids)
        score: list[Any] = [None] * len(ids)
        cands: list[Any] = [[] for _ in ids]
        for start in range(0, len(valid), batch_size):
            rows = valid[start:start + batch_size]
            batch = [norms[i] for i in rows]
            ranked, confidences = linker.rank(batch, linker.retrieve(batch))
            for i, candidates, confidence in zip(rows, ranked, confidences):
                status[i], _reason, code[i], _term, score[i], _conf = linker.outcome(
                    candidates, confidence)
                cands[i] = [dataclasses.asdict(c) for c in candidates]
        for i, r in enumerate(reasons):
            if r is not None:
                status[i] = "invalid_input"
        timings["link"] = time.perf_counter() - t
        embedded = [norms[i] for i in valid]
    else:
        import pandas as pd

        t = time.perf_counter()
        frame = pd.DataFrame({"mention_id": ids, "text": texts})
        linked = linker.link(frame)
        timings["link"] = time.perf_counter() - t  # validation + normalisation included
        status, code, score = (linked["status"].tolist(), linked["code"].tolist(),
                               linked["score"].tolist())
        cands = linked["candidates"].tolist()
        embedded = sorted({n for n in linked["text_norm"].tolist() if n is not None})
    t = time.perf_counter()
    out = pa.table({"mention_id": ids, "status": status, "code": code, "score": score,
                    "candidates": cands})
    pq.write_table(out, out_path)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_run
    cpu_s = time.process_time() - cpu_run
    stages = linker.take_stage_seconds()
    vectors = linker.take_counts()
    counts: dict[str, int] = {}
    for s in status:
        counts[str(s)] = counts.get(str(s), 0) + 1
    model_config = linker.encoder.model.config
    return {
        "mode": mode,
        "threads": threads,
        "mentions": len(ids),
        "forms": len(embedded),  # texts linked (distinct ones for mode "dedupe")
        # of those, encoded by the bi-encoder / given an index term's stored vector
        "texts_embedded": vectors["texts_encoded"],
        "vectors_reused": vectors["vectors_reused"],
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "cpu_s": round(cpu_s, 3),  # CPU seconds of the process from read to write (no load)
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "counts_by_status": counts,
        "model": {"layers": model_config.num_hidden_layers,
                  "hidden": model_config.hidden_size,
                  "intermediate": model_config.intermediate_size},
    }


def token_lengths(job: dict[str, Any], corpus_path: str) -> dict[str, Any]:
    """Tokens (prefix and special tokens included, truncated) of every distinct valid form
    (``lengths``), and the forms that are terms of the index whose stored vectors the linker
    takes instead of encoding them (``in_index``; empty where the index cannot give them)."""
    setup_logging("WARNING")
    import pyarrow.parquet as pq

    from clinlinker_spark.encoder import BiEncoder
    from clinlinker_spark.index import TerminologyIndex
    from clinlinker_spark.linker import invalid_reason
    from clinlinker_spark.text import normalize_text

    config = _job_config(job, 1)
    texts = pq.read_table(corpus_path, columns=["text"]).column("text").to_pylist()
    forms = sorted({normalize_text(t) for t in set(texts)
                    if invalid_reason(t, config.linking.max_text_length) is None})
    encoder = BiEncoder.from_config(config.encoder)
    ids = encoder.tokenize(forms)["input_ids"]
    index = TerminologyIndex.load(config.index.path)
    held = index.holds_vectors_of(encoder.precision)
    return {"lengths": {f: len(x) for f, x in zip(forms, ids)},
            "in_index": [f for f in forms if held and index.position_of(f) >= 0]}


def precision_run(job: dict[str, Any], corpus_path: str, n_forms: int,
                  threads: int) -> dict[str, Any]:
    """Bi-encoder mentions/s with fp32 and with bf16 autocast on ``n_forms`` distinct real
    forms (one warm-up pass each, then the best of two), and how often the linker's best code
    and top-5 codes agree between the two (same fp32 index)."""
    setup_logging("WARNING")
    import pyarrow.parquet as pq

    from clinlinker_spark.encoder import BiEncoder
    from clinlinker_spark.index import TerminologyIndex
    from clinlinker_spark.linker import Linker
    from clinlinker_spark.text import normalize_text

    config = _job_config(job, threads)
    _set_threads(threads)
    texts = pq.read_table(corpus_path, columns=["text"]).column("text").to_pylist()
    forms = list(dict.fromkeys(normalize_text(t) for t in texts if t and t.strip()))[:n_forms]
    index = TerminologyIndex.load(config.index.path)
    out: dict[str, Any] = {"threads": threads, "forms": len(forms)}
    ranked: dict[str, list[list[str]]] = {}
    for precision in ("fp32", "bf16"):
        enc_cfg = dataclasses.replace(config.encoder, precision=precision, device="cpu")
        encoder = BiEncoder.from_config(enc_cfg)
        _set_threads(threads)
        encoder.encode(forms[:256])
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            encoder.encode(forms)
            best = min(best, time.perf_counter() - t)
        linker = Linker(encoder, index, config.linking)
        ranked[precision] = [[c.code for c in cs[:5]] for cs in linker.retrieve(forms)]
        out[precision] = {"seconds": round(best, 3),
                          "mentions_per_s": round(len(forms) / best, 1)}
    pairs = list(zip(ranked["fp32"], ranked["bf16"]))
    out["speedup"] = round(out["fp32"]["seconds"] / out["bf16"]["seconds"], 2)
    out["same_top1"] = round(sum(a[:1] == b[:1] for a, b in pairs) / len(pairs), 4)
    out["same_top5_set"] = round(sum(set(a) == set(b) for a, b in pairs) / len(pairs), 4)
    return out


def rerank_run(job: dict[str, Any], corpus_path: str, model_dir: str, n_forms: int,
               threads: int) -> dict[str, Any]:
    """Cross-encoder pairs/s on the top_n candidates of ``n_forms`` frequent real forms."""
    setup_logging("WARNING")
    import pyarrow.parquet as pq

    from clinlinker_spark.linker import Linker
    from clinlinker_spark.reranker import CrossEncoderReranker
    from clinlinker_spark.text import normalize_text

    config = _job_config(job, threads)
    _set_threads(threads)
    if not Path(model_dir, "config.json").is_file():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        # a one-logit head on the base encoder: the compute of a ClinLinker cross-encoder
        # (initialised from the bi-encoder); the head's scores are meaningless
        model = AutoModelForSequenceClassification.from_pretrained(
            config.encoder.path, num_labels=1, local_files_only=True)
        model.save_pretrained(model_dir, safe_serialization=True)
        AutoTokenizer.from_pretrained(config.encoder.path, local_files_only=True
                                      ).save_pretrained(model_dir)
    linker = Linker.from_config(config)
    reranker = CrossEncoderReranker(model_dir, batch_size=config.reranker.batch_size,
                                    max_length=config.reranker.max_length, device="cpu",
                                    num_threads=threads)
    _set_threads(threads)
    texts = pq.read_table(corpus_path, columns=["text"]).column("text").to_pylist()
    forms = list(dict.fromkeys(normalize_text(t) for t in texts if t and t.strip()))[:n_forms]
    candidates = linker.retrieve(forms)
    top_n = config.reranker.top_n
    mentions = [f for f, cs in zip(forms, candidates) for _ in cs[:top_n]]
    terms = [normalize_text(c.term) for cs in candidates for c in cs[:top_n]]
    reranker.score(mentions[:64], terms[:64])  # warm-up
    t = time.perf_counter()
    reranker.score(mentions, terms)
    seconds = time.perf_counter() - t
    encoded = reranker.tokenizer(mentions, terms, truncation=True,
                                 max_length=reranker.max_length)["input_ids"]
    model_config = reranker.model.config
    flops = bert_forward_flops(model_config.num_hidden_layers, model_config.hidden_size,
                               model_config.intermediate_size, [len(x) for x in encoded])
    return {
        "threads": threads, "forms": len(forms), "pairs": len(mentions), "top_n": top_n,
        "batch_size": reranker.batch_size, "max_length": reranker.max_length,
        "seconds": round(seconds, 3), "pairs_per_s": round(len(mentions) / seconds, 1),
        "mean_pair_tokens": round(sum(map(len, encoded)) / len(encoded), 1),
        "gflops_per_s": round(flops / seconds / 1e9, 1),
    }


# --------------------------------------------------------------------------------------------
# The benchmark (driver process)


def spark_job_config(base: JobConfig, input_path: str, output_path: str, dedupe: bool,
                     incremental: bool, form_cache: str = "", reuse: bool = True) -> JobConfig:
    """``base`` with its input and output replaced; ``dedupe``: surface-form
    de-duplication; ``reuse``: linking.reuse_index_vectors."""
    return dataclasses.replace(
        base,
        linking=dataclasses.replace(base.linking, reuse_index_vectors=reuse),
        input=dataclasses.replace(base.input, path=input_path, format="parquet",
                                  passthrough_columns=()),
        output=dataclasses.replace(base.output, path=output_path, incremental=incremental,
                                   form_cache_path=form_cache),
        spark=dataclasses.replace(base.spark, dedupe_surface_forms=dedupe),
        build_missing=False,
    )


def warm_up(spark: Any, job: JobConfig, warmup: Path, tables: Path) -> dict[str, Any]:
    """The warm-up run (JVM start, models loaded in the Python workers) into a fresh table
    under ``tables``, so that no measured run is the first of its kind in the JVM (codegen,
    JIT). Returns its summary."""
    from clinlinker_spark.spark.pipeline import run_link_job

    table = tables / "table-warmup"
    shutil.rmtree(table, ignore_errors=True)
    return run_link_job(spark, spark_job_config(job, str(warmup), str(table), False,
                                                False)).to_dict()


def run(cfg: BenchConfig) -> dict[str, Any]:
    import pandas as pd

    job = load_config(cfg.link.job_config, list(cfg.link.job_overrides))
    threads = cfg.threads or cores_of_master(job.spark.master)
    job_dict = to_dict(job)
    work = Path(cfg.work_dir) / "link"
    work.mkdir(parents=True, exist_ok=True)
    runs = set(cfg.link.runs)
    results: dict[str, Any] = {"machine": machine_info(), "bench_config": to_dict(cfg),
                               "job_config": job_dict, "threads": threads,
                               "load_at_start": load_snapshot()}
    log.info("benchmark: %d threads / cores, master %s", threads, job.spark.master)

    results["artifacts"] = _child(prepare_artifacts, job_dict)

    t = time.perf_counter()
    corpus = make_corpus(cfg.corpus)
    night1, night2 = work / "night1.parquet", work / "night2.parquet"
    plain = work / "plain.parquet"
    corpus.night1.to_parquet(night1, index=False)
    corpus.night2.to_parquet(night2, index=False)
    new_only = work / "new.parquet"
    corpus.night2.iloc[len(corpus.night1):].to_parquet(new_only, index=False)
    corpus.night1.head(cfg.link.plain_mentions or len(corpus.night1)).to_parquet(plain,
                                                                                 index=False)
    warmup = work / "warmup.parquet"
    corpus.night1.sample(n=min(cfg.link.warmup_mentions, len(corpus.night1)),
                         random_state=1).to_parquet(warmup, index=False)
    results["corpus"] = corpus.stats()
    results["corpus"]["seconds"] = round(time.perf_counter() - t, 1)
    log.info("corpus: %s", results["corpus"])
    del corpus
    gc.collect()

    lengths = _child(token_lengths, job_dict, str(night2))
    results["matmul_gflops"] = {
        str(n): matmul_gflops(n, cfg.matmul.size, cfg.matmul.tokens, 384, 1536,
                              cfg.matmul.repeats)
        for n in sorted({1, threads})
    }
    log.info("matmul GFLOP/s: %s", results["matmul_gflops"])

    phases: dict[str, Any] = {}
    results["phases"] = phases
    # linking every mention separately: each one encoded, a term's text too
    encode_all = to_dict(dataclasses.replace(job, linking=dataclasses.replace(
        job.linking, reuse_index_vectors=False)))
    for mode, name, source, n_threads, config in (
            ("all", "core", plain, threads, encode_all),
            ("all", "core_1thread", plain, 1, encode_all),
            ("dedupe", "core_dedupe", night1, threads, job_dict)):
        if name not in runs:
            continue
        log.info("run %s", name)
        with ProcessSampler(cfg.link.sample_interval_s) as sampler:
            res = _child(core_run, config, str(source), str(work / f"{name}.parquet"), mode,
                         cfg.link.core_batch_size, n_threads)
        phases[name] = {**res, "resources": sampler.result}

    spark_runs = [r for r in SPARK_RUNS if r in runs]
    if spark_runs:
        _spark_phases(cfg, job, work, phases, spark_runs,
                      {"plain": plain, "night1": night1, "night2": night2, "new": new_only},
                      warmup)

    if "precision" in runs:
        log.info("run precision")
        with ProcessSampler(cfg.link.sample_interval_s) as sampler:
            res = _child(precision_run, job_dict, str(night1), cfg.link.precision_forms, 1)
        phases["precision"] = {**res, "resources": sampler.result}
        log.info("precision: %s", {k: v for k, v in res.items() if k != "resources"})

    if "rerank" in runs:
        log.info("run rerank")
        with ProcessSampler(cfg.link.sample_interval_s) as sampler:
            res = _child(rerank_run, job_dict, str(night1), str(work / "cross-encoder-from-base"),
                         cfg.link.rerank_forms, threads)
        phases["rerank"] = {**res, "resources": sampler.result}

    results["load_at_end"] = load_snapshot()
    results["derived"] = derive(results, lengths, threads, pd.read_parquet(plain)["text"],
                                pd.read_parquet(night1)["text"])
    return results


SPARK_RUNS = ("spark", "spark_reuse", "spark_dedupe", "spark_dedupe_encode_all", "incremental",
              "nightly_new")


def _spark_phases(cfg: BenchConfig, job: JobConfig, work: Path, phases: dict[str, Any],
                  spark_runs: list[str], inputs: dict[str, Path], warmup: Path) -> None:
    from clinlinker_spark.spark.pipeline import run_link_job
    from clinlinker_spark.spark.session import build_spark_session

    with ProcessSampler(cfg.link.sample_interval_s) as sampler:
        spark = build_spark_session(job.spark)
        spark.sparkContext.setLogLevel("ERROR")
        cores = spark.sparkContext.defaultParallelism
        summary = warm_up(spark, job, warmup, work)
    phases["spark_start_and_warmup"] = {"spark_cores": cores, "summary": summary,
                                        "resources": sampler.result}
    try:
        with ProcessSampler(cfg.link.sample_interval_s) as sampler:
            t = time.perf_counter()
            spark.read.parquet(str(inputs["night1"])).write.format("noop").mode(
                "overwrite").save()
            read_s = time.perf_counter() - t
        phases["spark_read"] = {"seconds": round(read_s, 3), "resources": sampler.result}
        # run: (input, table, dedupe, incremental, form cache, start, reuse term vectors):
        # start "fresh" = new table and cache; "night1" = a copy of the table and cache as
        # spark_dedupe left them (incremental and nightly_new each start from night 1,
        # whichever runs first)
        snapshot = work / "night1-snapshot"
        plan = {
            "spark": ("plain", "table-plain", False, False, "", "fresh", False),
            "spark_reuse": ("plain", "table-plain-reuse", False, False, "", "fresh", True),
            "spark_dedupe": ("night1", "table-dedupe", True, False, "form-cache", "fresh",
                             True),
            "spark_dedupe_encode_all": ("night1", "table-dedupe-encode-all", True, False,
                                        "form-cache-encode-all", "fresh", False),
            "incremental": ("night2", "table-incremental", True, True, "form-cache-incremental",
                            "night1", True),
            "nightly_new": ("new", "table-nightly-new", True, True, "form-cache-nightly-new",
                            "night1", True),
        }
        for name in spark_runs:
            source, table_name, dedupe, incremental, cache_name, start, reuse = plan[name]
            table = work / table_name
            form_cache = str(work / cache_name) if cache_name else ""
            if start == "night1" and not snapshot.exists():
                log.warning("run %s needs spark_dedupe's table; skipped", name)
                continue
            # a night-2 run is repeated from a fresh copy of night 1: the first repetition
            # is the first time this session runs its code paths (a nightly spark-submit
            # starts a new JVM every night), the later ones show them warm
            walls: list[float] = []
            for rep in range(cfg.link.night_repeats if start == "night1" else 1):
                shutil.rmtree(table, ignore_errors=True)
                if form_cache:
                    shutil.rmtree(form_cache, ignore_errors=True)
                if start == "night1":
                    shutil.copytree(snapshot / "table", table)
                    shutil.copytree(snapshot / "form-cache", form_cache)
                log.info("run %s (repetition %d)", name, rep + 1)
                config = spark_job_config(job, str(inputs[source]), str(table), dedupe,
                                          incremental, form_cache, reuse)
                with ProcessSampler(cfg.link.sample_interval_s) as sampler:
                    t = time.perf_counter()
                    summary = run_link_job(spark, config).to_dict()
                    wall = time.perf_counter() - t
                walls.append(round(wall, 3))
                log.info("run %s: %.1f s, %s", name, wall, summary["timings_s"])
                if rep == 0:
                    phases[name] = {"wall_s": round(wall, 3), "spark_cores": cores,
                                    "summary": summary, "resources": sampler.result}
            phases[name]["repeat_walls_s"] = walls
            phases[name]["repeat_timings_s"] = summary["timings_s"]  # the last repetition's
            if name == "spark_dedupe":
                shutil.rmtree(snapshot, ignore_errors=True)
                shutil.copytree(table, snapshot / "table")
                shutil.copytree(form_cache, snapshot / "form-cache")
    finally:
        spark.stop()


def _our_cpu_s(phase: dict[str, Any]) -> float:
    """CPU seconds a run used: the core child's from read to write (model load excluded, as
    the Spark runs are warm), or the Spark driver's Python, its JVM and the Python workers'."""
    if "summary" not in phase:
        return float(phase["cpu_s"])
    cpu = phase["resources"]["cpu_s"]
    return sum(cpu.get(r, 0.0) for r in ("driver_python", "driver_jvm", "python_workers"))


def derive(results: dict[str, Any], forms: dict[str, Any], threads: int,
           plain_texts: Any, night1_texts: Any) -> dict[str, Any]:
    """Mentions/s, ratios against the speed targets (BENCHMARKS.md), GFLOP/s.

    ``forms``: :func:`token_lengths` of night 2's forms. ``plain_texts``: the mentions the
    runs without de-duplication link (each one embedded, or given its index term's vector);
    ``night1_texts``: the mentions the de-duplicating runs link (each distinct form once).
    A run's encoder FLOPs count the texts it encoded: those ``in_index`` are left out of a
    run that reused term vectors.
    Besides wall-clock rates, every run gets mentions per CPU-second of our own processes:
    on a machine shared with other work the cores a run actually got vary, CPU seconds do not.
    """
    from clinlinker_spark.text import normalize_text

    phases = results["phases"]
    model = next((p["model"] for p in phases.values() if "model" in p),
                 {"layers": 12, "hidden": 384, "intermediate": 1536})
    lengths = forms["lengths"]
    in_index = set(forms["in_index"])
    plain_forms = [n for n in map(normalize_text, plain_texts) if n in lengths]
    distinct1 = [n for n in {normalize_text(t) for t in night1_texts} if n in lengths]

    def flops(texts: list[str], reused: bool) -> float:
        return bert_forward_flops(model["layers"], model["hidden"], model["intermediate"],
                                  [lengths[n] for n in texts if not (reused and n in in_index)])

    flops_all, flops_dedupe = flops(plain_forms, False), flops(distinct1, False)
    all_lengths = [lengths[n] for n in plain_forms]
    matmul = results["matmul_gflops"]
    out: dict[str, Any] = {
        "flops": {"all_mentions": flops_all, "distinct_forms": flops_dedupe,
                  "all_mentions_reusing_term_vectors": flops(plain_forms, True),
                  "distinct_forms_reusing_term_vectors": flops(distinct1, True),
                  "mean_tokens_per_mention": round(sum(all_lengths) / max(1, len(all_lengths)),
                                                   2)},
        "runs": {},
    }
    flops_of = {"core": flops_all, "core_1thread": flops_all, "spark": flops_all,
                "spark_dedupe_encode_all": flops_dedupe,
                "core_dedupe": out["flops"]["distinct_forms_reusing_term_vectors"],
                "spark_dedupe": out["flops"]["distinct_forms_reusing_term_vectors"],
                "spark_reuse": out["flops"]["all_mentions_reusing_term_vectors"]}

    for name in ("core", "core_1thread", "core_dedupe"):
        p = phases.get(name)
        if p is None:
            continue
        wall = p["timings_s"]["total"]
        cpu = _our_cpu_s(p)
        flops = flops_of[name]
        out["runs"][name] = {
            "mentions": p["mentions"], "texts_embedded": p["texts_embedded"],
            "vectors_reused": p["vectors_reused"],
            "wall_s": wall, "mentions_per_s": round(p["mentions"] / wall, 1),
            "cores": p["threads"], "cpu_s": round(cpu, 1),
            "mentions_per_cpu_s": round(p["mentions"] / cpu, 1),
            "encoder_gflops_per_s": round(flops / p["stage_seconds"]["encode"] / 1e9, 1),
            "encoder_gflops_per_cpu_s": round(flops / cpu / 1e9, 1),
            "matmul_gflops_per_s": matmul[str(p["threads"])],
        }
    for name in SPARK_RUNS:
        p = phases.get(name)
        if p is None:
            continue
        s = p["summary"]
        wall = p["wall_s"]
        cpu = _our_cpu_s(p)
        udf = s.get("udf_task_seconds", {})
        row: dict[str, Any] = {
            "mentions": s["mentions"], "to_link": s["to_link"],
            "texts_embedded": s["vectors"]["texts_encoded"],
            "vectors_reused": s["vectors"]["vectors_reused"],
            "form_cache_hits": s.get("form_cache", {}).get("hits", 0), "wall_s": wall,
            "mentions_per_s": round(s["mentions"] / wall, 1), "cores": p["spark_cores"],
            "cpu_s": round(cpu, 1), "mentions_per_cpu_s": round(s["mentions"] / cpu, 1),
        }
        flops = flops_of.get(name)
        if flops is not None and udf.get("encode"):
            workers_cpu = p["resources"]["cpu_s"].get("python_workers", 0.0)
            row["encoder_gflops_per_s_per_task"] = round(flops / udf["encode"] / 1e9, 1)
            row["encoder_gflops_per_s_aggregate"] = round(
                flops / s["timings_s"]["embed_search"] / 1e9, 1)
            row["encoder_gflops_per_worker_cpu_s"] = round(flops / workers_cpu / 1e9, 1)
            row["matmul_gflops_per_s_1_thread"] = matmul["1"]
        out["runs"][name] = row
    out["targets"] = targets(out["runs"], phases)
    return out


def targets(runs: dict[str, Any], phases: dict[str, Any]) -> dict[str, Any]:
    """The ratios that have speed targets (and the context needed to read them)."""
    out: dict[str, Any] = {}

    def per_core(name: str) -> float:
        return runs[name]["mentions_per_s"] / runs[name]["cores"]

    if "spark" in runs and "core" in runs:
        ratio = per_core("spark") / per_core("core")
        out["spark_vs_core_per_core"] = {"ratio": round(ratio, 3), "target": ">= 0.9",
                                         "met": ratio >= 0.9}
        ratio = runs["spark"]["mentions_per_cpu_s"] / runs["core"]["mentions_per_cpu_s"]
        out["spark_vs_core_per_cpu_second"] = {"ratio": round(ratio, 3), "target": ">= 0.9",
                                               "met": ratio >= 0.9}
        # what the ratio is made of: the per-mention work (Spark's UDF stage against the
        # plain linker's link step, same mentions and cores) and Spark's other stages, whose
        # cost hardly depends on the number of mentions (prepare, write)
        spark_s = phases["spark"]["summary"]["timings_s"]
        core_s = phases["core"]["timings_s"]
        out["spark_udf_stage_vs_core_link_step"] = {
            "ratio": round(core_s["link"] / spark_s["embed_search"], 3), "target": "(context)",
            "spark_other_stages_s": round(phases["spark"]["wall_s"] - spark_s["embed_search"], 2),
            "core_other_steps_s": round(core_s["total"] - core_s["link"], 2)}
    if "spark" in runs and "core_1thread" in runs:
        ratio = per_core("spark") / per_core("core_1thread")
        out["spark_vs_core_1thread_per_core"] = {"ratio": round(ratio, 3), "target": ">= 0.9",
                                                 "met": ratio >= 0.9}
        ratio = runs["spark"]["mentions_per_cpu_s"] / runs["core_1thread"]["mentions_per_cpu_s"]
        out["spark_vs_core_1thread_per_cpu_second"] = {"ratio": round(ratio, 3),
                                                       "target": ">= 0.9", "met": ratio >= 0.9}
    if "spark_dedupe" in runs and "core_dedupe" in runs:
        ratio = per_core("spark_dedupe") / per_core("core_dedupe")
        out["spark_dedupe_vs_core_dedupe_per_core"] = {"ratio": round(ratio, 3),
                                                       "target": "(context)"}
    if "spark_dedupe" in runs and "spark" in runs:
        ratio = runs["spark_dedupe"]["mentions_per_s"] / runs["spark"]["mentions_per_s"]
        out["dedupe_speedup"] = {"ratio": round(ratio, 2), "target": ">= 5", "met": ratio >= 5}
        # the run without de-duplication linked fewer mentions: scale only its UDF stage to
        # night 1's size and count every other stage as fixed (a lower bound on its time)
        plain = phases["spark"]
        scale = runs["spark_dedupe"]["mentions"] / runs["spark"]["mentions"]
        udf_s = plain["summary"]["timings_s"]["embed_search"]
        estimate = plain["wall_s"] - udf_s + udf_s * scale
        conservative = estimate / runs["spark_dedupe"]["wall_s"]
        out["dedupe_speedup_conservative"] = {
            "ratio": round(conservative, 2), "target": ">= 5", "met": conservative >= 5,
            "plain_wall_s_scaled_to_night1": round(estimate, 1)}
        ratio = runs["spark_dedupe"]["mentions_per_cpu_s"] / runs["spark"]["mentions_per_cpu_s"]
        out["dedupe_speedup_per_cpu_second"] = {"ratio": round(ratio, 2), "target": ">= 5",
                                                "met": ratio >= 5}
        # the same, with only the Python workers' CPU scaled to night 1 (JVM + driver fixed)
        cpu = plain["resources"]["cpu_s"]
        workers = cpu.get("python_workers", 0.0)
        cpu_estimate = runs["spark"]["cpu_s"] - workers + workers * scale
        ratio = cpu_estimate / runs["spark_dedupe"]["cpu_s"]
        out["dedupe_speedup_per_cpu_second_conservative"] = {
            "ratio": round(ratio, 2), "target": ">= 5", "met": ratio >= 5,
            "plain_cpu_s_scaled_to_night1": round(cpu_estimate, 1)}
    # context: what each kind of shared work gives on its own (mentions/s ratios): the
    # de-duplication of forms with every form encoded, term vectors reused without it, and
    # the shipped run against every mention linked with term vectors reused
    for key, faster, slower in (
            ("dedupe_forms_only_speedup", "spark_dedupe_encode_all", "spark"),
            ("term_vectors_speedup_every_mention", "spark_reuse", "spark"),
            ("term_vectors_speedup_dedupe", "spark_dedupe", "spark_dedupe_encode_all"),
            ("dedupe_speedup_vs_every_mention_reusing_term_vectors", "spark_dedupe",
             "spark_reuse")):
        if faster in runs and slower in runs:
            ratio = runs[faster]["mentions_per_s"] / runs[slower]["mentions_per_s"]
            out[key] = {"ratio": round(ratio, 2), "target": "(context)"}
    for name in ("incremental", "nightly_new"):
        if name not in runs or "spark_dedupe" not in runs:
            continue
        ratio = runs["spark_dedupe"]["wall_s"] / runs[name]["wall_s"]
        out[f"{name}_speedup"] = {"ratio": round(ratio, 2), "target": ">= 10",
                                  "met": ratio >= 10, "night": "first repetition"}
        walls = phases[name].get("repeat_walls_s", [])
        if len(walls) > 1:
            median = statistics.median(walls)
            ratio = runs["spark_dedupe"]["wall_s"] / median
            out[f"{name}_speedup_median"] = {
                "ratio": round(ratio, 2), "target": ">= 10", "met": ratio >= 10,
                "night": f"median of {len(walls)} repetitions", "walls_s": walls}
        ratio = runs["spark_dedupe"]["cpu_s"] / runs[name]["cpu_s"]
        out[f"{name}_speedup_per_cpu_second"] = {"ratio": round(ratio, 2), "target": ">= 10",
                                                 "met": ratio >= 10}
        if "dedupe_speedup_conservative" in out:
            estimate = out["dedupe_speedup_conservative"]["plain_wall_s_scaled_to_night1"]
            out[f"{name}_vs_full_run_without_dedupe"] = {
                "ratio": round(estimate / runs[name]["wall_s"], 2), "target": "(context)"}
    return out


# --------------------------------------------------------------------------------------------
# Report


def markdown(results: dict[str, Any]) -> str:
    d = results["derived"]
    phases = results["phases"]
    lines = ["| run | mentions | texts embedded | wall s | mentions/s | cores | CPU s | "
             "mentions/CPU-s | encoder GFLOP/s | encoder GFLOP/CPU-s | matmul GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in d["runs"].items():
        enc = r.get("encoder_gflops_per_s", "")
        enc_cpu = r.get("encoder_gflops_per_cpu_s", r.get("encoder_gflops_per_worker_cpu_s", ""))
        mm = r.get("matmul_gflops_per_s", "")
        if "encoder_gflops_per_s_per_task" in r:
            enc = (f"{r['encoder_gflops_per_s_per_task']}/task, "
                   f"{r['encoder_gflops_per_s_aggregate']} total")
            mm = f"{r['matmul_gflops_per_s_1_thread']} (1 thread)"
        embedded = f"{r['texts_embedded']} (+{r.get('vectors_reused', 0)} reused)"
        lines.append(f"| {name} | {r['mentions']} | {embedded} | {r['wall_s']:.1f} | "
                     f"{r['mentions_per_s']:.0f} | {r['cores']} | {r['cpu_s']} | "
                     f"{r['mentions_per_cpu_s']} | {enc} | {enc_cpu} | {mm} |")
    lines += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
    for name, t in d["targets"].items():
        lines.append(f"| {name} | {t['ratio']} | {t['target']} | {t.get('met', '')} |")
    lines += ["", "| phase | stages (s) | UDF task s | peak RSS MiB | CPU s | busy cores "
              "(others) |", "|---|---|---|---|---|---|"]
    for name, p in phases.items():
        stages = p.get("timings_s") or p.get("summary", {}).get("timings_s", {})
        udf = p.get("stage_seconds") or p.get("summary", {}).get("udf_task_seconds", {})
        res = p["resources"]
        lines.append(f"| {name} | {stages} | {udf} | {res['peak_rss_mib']} | {res['cpu_s']} | "
                     f"{res['machine_busy_cores']} ({res['others_busy_cores']}) |")
    if "precision" in phases:
        r = phases["precision"]
        lines += ["", f"bi-encoder on {r['forms']} forms, {r['threads']} thread: fp32 "
                  f"{r['fp32']['mentions_per_s']}/s, bf16 autocast {r['bf16']['mentions_per_s']}/s"
                  f" ({r['speedup']}x); same best code {r['same_top1']}, same top-5 codes "
                  f"{r['same_top5_set']}"]
    if "rerank" in phases:
        r = phases["rerank"]
        lines += ["", f"cross-encoder: {r['pairs']} pairs in {r['seconds']} s = "
                  f"{r['pairs_per_s']} pairs/s, {r['gflops_per_s']} GFLOP/s "
                  f"({r['threads']} threads, batch {r['batch_size']}, max_length "
                  f"{r['max_length']}, mean {r['mean_pair_tokens']} tokens per pair)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="conf/bench.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override, e.g. corpus.mentions=10000 (repeatable)")
    parser.add_argument("--out", default=None, help="results JSON (default: <work_dir>/link/"
                        "results.json)")
    parser.add_argument("--report", default=None, metavar="RESULTS_JSON",
                        help="only print the summary of a results.json (ratios recomputed)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.report:
        saved = json.loads(Path(args.report).read_text(encoding="utf-8"))
        saved["derived"]["targets"] = targets(saved["derived"]["runs"], saved["phases"])
        print(markdown(saved))
        return 0
    cfg = load_bench_config(args.config, args.set)
    started = time.perf_counter()
    results = run(cfg)
    results["bench_seconds"] = round(time.perf_counter() - started, 1)
    write_json(Path(args.out or Path(cfg.work_dir) / "link" / "results.json"), results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
