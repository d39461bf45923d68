"""Shared pieces of the benchmarks: config, corpus, machine facts, load, memory, FLOPs.

The benchmarks are scripts, not tests (nothing in CI times anything). They read one YAML file,
``conf/bench.yaml``, into :class:`BenchConfig` with the project's strict config loader
(unknown keys are errors) and ``--set key=value`` overrides.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from clinlinker_spark.config import load_config
from clinlinker_spark.text import normalize_text

log = logging.getLogger("benchmarks")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class CorpusSource:
    """One file of real mention texts to sample from."""

    path: str
    format: str = "tsv"  # tsv (tab-separated with a header) | codiesp | distemist | medprocner
    text_column: str = "text"  # tsv only
    label_column: str = "label"  # tsv only


@dataclass(frozen=True)
class CorpusConfig:
    mentions: int = 100_000
    # P(form of frequency rank r) ~ 1 / r**zipf_exponent; ranks follow the forms' real counts
    zipf_exponent: float = 1.0
    new_fraction: float = 0.05  # night 2 = night 1 + this fraction of new mentions
    mentions_per_doc: int = 40
    seed: int = 13
    sources: tuple[CorpusSource, ...] = ()


@dataclass(frozen=True)
class LinkBenchConfig:
    job_config: str = "conf/local.yaml"  # the job config every run starts from
    job_overrides: tuple[str, ...] = ()
    # core: plain linker, every mention, as many threads as Spark has cores; core_1thread:
    # the same with one thread; core_dedupe: Linker.link on all mentions (one call, global
    # de-duplication); spark / spark_dedupe: the job without / with surface-form
    # de-duplication; spark_reuse / spark_dedupe_encode_all: index term vectors reused
    # without de-duplication / forms de-duplicated with every form encoded; incremental:
    # night 2 after spark_dedupe; rerank: cross-encoder pairs/s
    runs: tuple[str, ...] = ("core", "core_1thread", "core_dedupe", "spark", "spark_dedupe",
                             "incremental", "rerank")
    core_batch_size: int = 1024  # mentions per Linker call in "core" (= Arrow batch size)
    # core and spark (no de-duplication) link the first plain_mentions mentions of night 1
    # (0: all): their cost per mention does not depend on N, and linking 100k mentions one
    # by one twice does not fit a bounded run on 2 shared cores
    plain_mentions: int = 0
    warmup_mentions: int = 2000  # a first Spark run that loads models in the workers
    # each night-2 run (incremental, nightly_new) this many times, from a fresh copy of night 1
    night_repeats: int = 3
    rerank_forms: int = 200  # forms whose top_n candidates the cross-encoder scores
    precision_forms: int = 2000  # forms the fp32 vs bf16 bi-encoder comparison embeds
    sample_interval_s: float = 0.25


@dataclass(frozen=True)
class MatmulConfig:
    size: int = 2048  # square sgemm n x n x n
    tokens: int = 2048  # BERT-shaped sgemm [tokens, hidden] x [hidden, intermediate]
    repeats: int = 5


@dataclass(frozen=True)
class FaissBenchConfig:
    sizes: tuple[int, ...] = (17_417, 100_000, 500_000, 1_500_000)
    queries: int = 1024  # mentions per batch (one Arrow batch)
    k: int = 200  # = linking.search_k
    recall_k: int = 25  # = linking.top_k
    dim: int = 384
    # real term vectors (recall on real data), and the bi-encoder that embeds queries and the
    # composed terms
    real_index: str = "artifacts/indexes/codiesp-diag-bi"
    large_data: str = "composed"  # composed (embedded composed term texts) | noise
    ann_sizes: tuple[int, ...] = (17_417, 500_000, 1_500_000)  # where IVF / HNSW are measured
    ivf_nlist: tuple[int, ...] = (0,)  # 0: the project's default, 4 * sqrt(n)
    ivf_nprobe: tuple[int, ...] = (8, 32, 128)
    # IVF-Flat, IVF with 8-bit codes (index.sq8), IVF with 4-bit fast-scan PQ codes whose
    # hits are re-scored with the exact vectors (index.pq)
    ivf_storage: tuple[str, ...] = ("flat", "sq8")
    pq_refine_factor: tuple[int, ...] = (4,)  # index.refine_factor values for "pq"
    ivf_train_per_list: int = 64  # k-means training sample = this * nlist (capped at n)
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: tuple[int, ...] = (64, 256)
    hnsw_max_size: int = 500_000  # HNSW is built only up to this size (build time)
    semi_synthetic_noise: float = 0.5  # large_data noise: norm of the noise added to a vector
    seed: int = 7


@dataclass(frozen=True)
class BenchConfig:
    work_dir: str = "artifacts/bench"
    threads: int = 0  # 0: the cores the Spark master gets (local[*] = every core)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    link: LinkBenchConfig = field(default_factory=LinkBenchConfig)
    matmul: MatmulConfig = field(default_factory=MatmulConfig)
    faiss: FaissBenchConfig = field(default_factory=FaissBenchConfig)


def load_bench_config(path: str | None, overrides: list[str]) -> BenchConfig:
    return load_config(path, overrides, cls=BenchConfig)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("py4j", "urllib3", "filelock", "transformers", "huggingface_hub",
                  "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cores_of_master(master: str) -> int:
    """Cores a local master uses: local[N] -> N, local / local[*] -> every available core."""
    available = len(os.sched_getaffinity(0))
    if master.startswith("local[") and master.endswith("]"):
        inner = master[len("local["):-1].split(",")[0]
        return available if inner == "*" else int(inner)
    if master == "local":
        return 1
    raise ValueError(f"the benchmark runs on a local master; got {master!r}")


# --------------------------------------------------------------------------------------------
# Corpus


def read_mention_pool(sources: Iterable[CorpusSource]) -> pd.DataFrame:
    """Real mention texts (columns text, label, source) from every configured file."""
    from clinlinker_spark.corpora import read_gold

    frames = []
    for src in sources:
        if src.format == "tsv":
            table = pd.read_csv(src.path, sep="\t", dtype=str, keep_default_na=False,
                                quoting=3)
            frame = pd.DataFrame({"text": table[src.text_column],
                                  "label": table.get(src.label_column, "")})
        else:
            table = read_gold(src.path, src.format)
            frame = table[["text", "label"]].copy()
        frame["source"] = Path(src.path).name
        frames.append(frame)
        log.info("mention pool: %d mentions from %s", len(frame), Path(src.path).name)
    pool = pd.concat(frames, ignore_index=True)
    pool = pool[pool["text"].astype(str).str.strip() != ""]
    return pool.reset_index(drop=True)


@dataclass
class Corpus:
    night1: pd.DataFrame  # mention_id, doc_id, start, end, text, label
    night2: pd.DataFrame  # night1 + new mentions (new ids)
    pool_mentions: int
    pool_forms: int

    def stats(self) -> dict[str, Any]:
        new = self.night2.iloc[len(self.night1):]
        norms1 = set(map(normalize_text, self.night1["text"].unique()))
        norms_new = set(map(normalize_text, new["text"].unique()))
        n = len(self.night1)
        return {
            "mentions": n,
            "pool_mentions": self.pool_mentions,
            "pool_distinct_texts": self.pool_forms,
            "distinct_texts": int(self.night1["text"].nunique()),
            "distinct_forms": len(norms1),  # normalised: what de-duplication links
            "unique_form_ratio": round(len(norms1) / n, 4),
            "new_mentions": len(new),
            "new_distinct_forms": len(norms_new),
            "new_forms_not_in_night1": len(norms_new - norms1),
        }


def make_corpus(cfg: CorpusConfig) -> Corpus:
    """N mentions drawn from real mention texts with a Zipf-like skew over surface forms.

    The distinct texts of the pool are ranked by how often they occur in the real data (ties
    in random order); rank r is drawn with probability proportional to 1 / r**s. Night 2 is
    night 1 plus ``new_fraction * N`` further draws under new mention ids.
    """
    pool = read_mention_pool(cfg.sources)
    rng = np.random.default_rng(cfg.seed)
    counts = pool.groupby("text", sort=False).size()
    counts = counts.sample(frac=1.0, random_state=cfg.seed).sort_values(
        ascending=False, kind="stable")
    forms = counts.index.to_numpy()
    label_of = pool.drop_duplicates("text").set_index("text")["label"]
    p = 1.0 / np.arange(1, len(forms) + 1, dtype=np.float64) ** cfg.zipf_exponent
    p /= p.sum()
    n_new = int(round(cfg.mentions * cfg.new_fraction))
    drawn = rng.choice(len(forms), size=cfg.mentions + n_new, p=p)
    texts = forms[drawn]
    n_total = len(texts)
    frame = pd.DataFrame({
        "mention_id": [f"m{i:08d}" for i in range(n_total)],
        "doc_id": [f"d{i // cfg.mentions_per_doc:07d}" for i in range(n_total)],
        "start": np.zeros(n_total, dtype="int64"),
        "end": np.array([len(t) for t in texts], dtype="int64"),
        "text": texts,
        "label": label_of.reindex(texts).fillna("").to_numpy(),
    })
    return Corpus(frame.iloc[:cfg.mentions].reset_index(drop=True), frame, len(pool),
                  len(forms))


# --------------------------------------------------------------------------------------------
# Machine and load


def machine_info() -> dict[str, Any]:
    import faiss
    import pyspark
    import torch

    cpu_model = ""
    flags: set[str] = set()
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name") and not cpu_model:
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    mem_total = 0
    with open("/proc/meminfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "cpu_model": cpu_model,
        "cores_available": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "simd": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                                 "fma", "avx512_vnni")),
        "memory_gib": round(mem_total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "pyspark": pyspark.__version__,
        "gpu": "none (this machine has no GPU; no GPU numbers are reported)",
    }


def load_snapshot(top: int = 5) -> dict[str, Any]:
    """Load average and the processes using the most CPU right now (ps), ours excluded."""
    import subprocess

    mine = {os.getpid(), *_descendants(os.getpid(), _proc_table())}
    out = subprocess.run(["ps", "-eo", "pid,pcpu,rss,args", "--sort=-pcpu"],
                         capture_output=True, text=True, check=False).stdout.splitlines()[1:]
    others = []
    for line in out:
        parts = line.split(None, 3)
        if len(parts) < 4 or int(parts[0]) in mine or parts[3].startswith("ps "):
            continue
        if float(parts[1]) < 5.0:
            break
        others.append({"pid": int(parts[0]), "pcpu": float(parts[1]),
                       "rss_mib": round(int(parts[2]) / 1024), "cmd": parts[3][:90]})
        if len(others) >= top:
            break
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "busy_others": others}


# --------------------------------------------------------------------------------------------
# Process sampling: RSS peaks and CPU use of this process, its JVM and the Python workers


@dataclass
class _Proc:
    pid: int
    ppid: int
    comm: str
    cpu_ticks: int
    rss_bytes: int


def _proc_table() -> dict[int, _Proc]:
    table: dict[int, _Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        close = stat.rfind(")")
        fields = stat[close + 2:].split()
        table[int(entry.name)] = _Proc(
            pid=int(entry.name), ppid=int(fields[1]), comm=stat[stat.find("(") + 1:close],
            cpu_ticks=int(fields[11]) + int(fields[12]), rss_bytes=int(fields[21]) * PAGE_BYTES,
        )
    return table


def _descendants(root: int, table: dict[int, _Proc]) -> set[int]:
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    out: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


def _system_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot."""
    with open("/proc/stat", encoding="utf-8") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def classify(table: dict[int, _Proc], me: int) -> dict[str, set[int]]:
    """Our processes by role: driver_python, driver_jvm, python_workers, child (other)."""
    mine = _descendants(me, table)
    jvms = {p for p in mine if table[p].comm == "java"}
    workers: set[int] = set()
    for jvm in jvms:
        workers |= _descendants(jvm, table)
    other = mine - jvms - workers
    return {"driver_python": {me}, "driver_jvm": jvms, "python_workers": workers,
            "child": other}


class ProcessSampler:
    """Samples our processes every ``interval_s`` seconds during a phase.

    Reports per role (this Python process, its JVM, the pyspark Python workers -- descendants of
    the JVM --, other children such as a spawned core run): the peak of the summed RSS, the
    largest single RSS, how many processes there were at most, and CPU seconds used; plus the
    machine's busy cores and how much of that was other people's work.
    """

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._me = os.getpid()

    def __enter__(self) -> ProcessSampler:
        self._peak_sum: dict[str, int] = {}
        self._peak_one: dict[str, int] = {}
        self._count: dict[str, int] = {}
        self._first_cpu: dict[int, int] = {}
        self._last_cpu: dict[int, tuple[str, int]] = {}
        table = _proc_table()
        self._start_all = {pid: p.cpu_ticks for pid, p in table.items()}
        self._start_sys = _system_ticks()
        self._start_wall = time.perf_counter()
        self._start_snapshot = load_snapshot()
        self._sample(table)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample(_proc_table())

    def _sample(self, table: dict[int, _Proc]) -> None:
        roles = classify(table, self._me)
        with self._lock:
            for role, pids in roles.items():
                rss = [table[p].rss_bytes for p in pids if p in table]
                self._peak_sum[role] = max(self._peak_sum.get(role, 0), sum(rss))
                self._peak_one[role] = max(self._peak_one.get(role, 0), max(rss, default=0))
                self._count[role] = max(self._count.get(role, 0), len(rss))
                for p in pids:
                    if p in table:
                        self._first_cpu.setdefault(p, self._start_all.get(p, 0))
                        self._last_cpu[p] = (role, table[p].cpu_ticks)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        table = _proc_table()
        self._sample(table)
        wall = time.perf_counter() - self._start_wall
        busy0, total0 = self._start_sys
        busy1, total1 = _system_ticks()
        n_cpu = os.cpu_count() or 1
        busy_cores = (busy1 - busy0) / max(1, total1 - total0) * n_cpu
        ours: dict[str, float] = {}
        for pid, (role, ticks) in self._last_cpu.items():
            ours[role] = ours.get(role, 0.0) + (ticks - self._first_cpu[pid]) / CLOCK_TICKS
        ours_total = sum(ours.values())
        others = busy_cores - ours_total / max(wall, 1e-9)
        self.result = {
            "wall_s": round(wall, 3),
            "peak_rss_mib": {r: round(v / MIB) for r, v in self._peak_sum.items() if v},
            "largest_process_rss_mib": {r: round(v / MIB) for r, v in self._peak_one.items()
                                        if v},
            "max_processes": {r: v for r, v in self._count.items() if v},
            "cpu_s": {r: round(v, 1) for r, v in ours.items() if v},
            "machine_busy_cores": round(busy_cores, 2),
            "others_busy_cores": round(max(0.0, others), 2),
            "load_start": self._start_snapshot,
            "load_end": load_snapshot(),
        }


# --------------------------------------------------------------------------------------------
# FLOPs


def bert_forward_flops(n_layers: int, hidden: int, intermediate: int,
                       lengths: Iterable[int]) -> float:
    """Multiply-add FLOPs (2 per MAC) of a BERT encoder forward over sequences of ``lengths``.

    Per sequence of s tokens and per layer: Q, K, V and output projections 4 * 2*s*h*h, the
    feed-forward block 2 * 2*s*h*i, attention scores Q.K^T 2*s*s*h and their product with V
    2*s*s*h: ``L * (8*s*h^2 + 4*s*h*i + 4*s^2*h)``. That is 2 x the non-embedding weight
    matrices per token plus 4*L*s*h per token for attention. Embedding look-ups, layer norms,
    softmax, GELU, biases and pooling are left out (well under 1% here), and so are padded
    positions: the count is the useful work, so achieved FLOP/s are a lower bound.
    """
    s = np.asarray(list(lengths), dtype=np.float64)
    h, i = float(hidden), float(intermediate)
    return float(n_layers * (8 * s * h * h + 4 * s * h * i + 4 * s * s * h).sum())


def matmul_gflops(threads: int, size: int, tokens: int, hidden: int, intermediate: int,
                  repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` torch fp32 matmul GFLOP/s with ``threads`` threads.

    ``square``: n x n times n x n (the sgemm peak on this machine); ``bert_ffn``: the
    bi-encoder's largest matmul shape, [tokens, hidden] x [hidden, intermediate].
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out: dict[str, float] = {}
        shapes = {"square": (size, size, size), "bert_ffn": (tokens, hidden, intermediate)}
        for name, (m, k, n) in shapes.items():
            a = torch.randn(m, k)
            b = torch.randn(k, n)
            torch.mm(a, b)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - t)
            out[name] = round(2.0 * m * k * n / best / 1e9, 1)
        return out
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------
# Results


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n",
                    encoding="utf-8")
    log.info("results written to %s", path)
