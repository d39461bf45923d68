"""One frozen, validated configuration tree loaded from YAML, with ``key=value`` overrides.

Every section is a frozen dataclass. Unknown keys are errors (a typo in a nightly job's config
must fail loudly, not be ignored), values are checked against the field's type, and overrides
given on the command line (``--set linking.top_k=50``) are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from clinlinker_spark.errors import ConfigError

POOLINGS = ("cls", "mean")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# how re-scored candidates are ordered (linker.order_candidates): by the cross-encoder alone,
# or by reciprocal-rank fusion of the bi-encoder's and the cross-encoder's orders
RERANK_FUSIONS = ("none", "rrf")
INDEX_TYPES = ("flat", "ivf", "hnsw")
SEARCH_DEVICES = ("auto", "cpu", "cuda")
TERMINOLOGY_FORMATS = ("gazetteer", "table", "cie10", "icd10cm")
GOLD_FORMATS = ("distemist", "medprocner", "codiesp")
INPUT_FORMATS = ("parquet", "delta") + GOLD_FORMATS
WRITERS = ("auto", "delta-spark", "deltalake")
# a catalog table name: schema.table or catalog.schema.table, each part a plain identifier or
# a backquoted one (`my-catalog`.clinical.mentions)
_IDENTIFIER = r"(?:`[^`]+`|[A-Za-z_][A-Za-z0-9_]*)"
TABLE_NAME = re.compile(rf"{_IDENTIFIER}(?:\.{_IDENTIFIER}){{1,2}}")


@dataclass(frozen=True)
class EncoderConfig:
    """How a bi-encoder turns text into vectors. Recorded in every index manifest."""

    path: str = "artifacts/models/multilingual-e5-small"
    pooling: str = "mean"  # cls | mean (attention-masked)
    max_length: int = 32  # tokens, including special tokens
    prefix: str = ""  # prepended to every text before tokenisation (e5: "query: ")
    normalize: bool = True  # L2-normalise embeddings (inner product = cosine)
    batch_size: int = 128
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16/fp16 on cuda, fp32 on cpu) | fp32 | fp16 | bf16
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        _check_choice("encoder.pooling", self.pooling, POOLINGS)
        _check_choice("encoder.device", self.device, DEVICES)
        _check_choice("encoder.precision", self.precision, PRECISIONS)
        _check_positive("encoder.max_length", self.max_length)
        _check_positive("encoder.batch_size", self.batch_size)
        if self.num_threads < 0:
            raise ConfigError("encoder.num_threads must be >= 0")


@dataclass(frozen=True)
class TerminologySourceConfig:
    """One file of terms (or of gold training mentions added as synonyms)."""

    # the file or folder; "" for icd10cm, which reads the PyPI package simple-icd-10-cm
    path: str = ""
    format: str = "table"  # gazetteer | table | cie10 | icd10cm | distemist | medprocner | codiesp
    name: str = ""  # source name stored per row; defaults to the file stem
    code_column: str = "code"  # table format only
    term_column: str = "term"  # table format only
    semantic_tag_column: str = ""  # table format only, optional
    main_term_column: str = ""  # table format only, optional
    parent_column: str = ""  # table format only, optional: each code's parent code (hierarchy)
    inclusion_terms: bool = True  # icd10cm only: its inclusion terms as synonyms
    min_level: int = 2  # cie10 only: keep rows of this level and deeper
    labels: tuple[str, ...] = ()  # gold formats only: keep mentions with these labels
    split: str = "all"  # gold formats only: all | train | test side of a document-level split
    test_fraction: float = 0.2  # gold formats only, with split
    split_seed: int = 13  # gold formats only, with split
    # gold formats only, optional: the corpus's folder of {doc_id}.txt documents; each mention
    # then carries the sentence that holds it (context-aware training reads it)
    text_dir: str = ""

    def __post_init__(self) -> None:
        _check_choice(
            "terminology source format", self.format, TERMINOLOGY_FORMATS + GOLD_FORMATS
        )
        if self.text_dir and self.format not in GOLD_FORMATS:
            raise ConfigError(f"terminology source {self.path}: text_dir is for gold formats "
                              f"({', '.join(GOLD_FORMATS)}), not {self.format}")
        _check_choice("terminology source split", self.split, ("all", "train", "test"))
        if not self.path and self.format != "icd10cm":
            raise ConfigError(f"terminology source of format {self.format}: path is required")


@dataclass(frozen=True)
class TerminologyConfig:
    name: str = "terminology"
    version: str = ""
    sources: tuple[TerminologySourceConfig, ...] = ()


@dataclass(frozen=True)
class IndexConfig:
    path: str = "artifacts/indexes/default"
    index_type: str = "flat"  # flat (exact inner product) | ivf | hnsw
    fp16: bool = False  # store vectors as fp16 (scalar quantiser); halves memory
    # store vectors as 8-bit codes (scalar quantiser, trained per dimension): a quarter of the
    # memory, about 2x faster IVF scans at 1.5M terms (BENCHMARKS.md), slightly lossy
    sq8: bool = False
    # IVF only: scan 4-bit product-quantiser codes (FAISS fast-scan, ``pq_m`` sub-quantisers
    # of dim / pq_m dimensions each; 0: dim / 2, i.e. dim / 4 bytes a vector), then re-score
    # the best ``refine_factor`` x k hits of each query with the exact vectors, kept beside
    # the codes. At the same nprobe the recall of IVF-Flat, at a fraction of its scan time
    # (BENCHMARKS.md), so more lists can be probed within the same budget
    pq: bool = False
    pq_m: int = 0
    refine_factor: int = 4
    ivf_nlist: int = 0  # 0: about 4 * sqrt(n)
    ivf_nprobe: int = 32
    hnsw_m: int = 32
    hnsw_ef_search: int = 256
    # recall@recall_k against exact search, measured when the index is built: the forms of
    # up to recall_queries distinct mention texts (column ``text`` of a Parquet, CSV or TSV
    # file; a sample of last night's input, say) searched with linking.search_k hits, as the
    # job searches. Recorded in the manifest (``recall``). With target_recall > 0 (ivf, hnsw)
    # the build takes the least nprobe (efSearch) on a doubling ladder that reaches it
    recall_mentions: str = ""
    recall_queries: int = 1000
    recall_k: int = 25
    target_recall: float = 0.0
    # where an exact (flat, fp32) index is searched: "auto" = on the bi-encoder's GPU when it
    # runs on one (torch matrix product + top-k, the same scores as FAISS), else FAISS on the
    # CPU; "cpu" = always FAISS; "cuda" = on the GPU or an error. Other index types always
    # search with FAISS on the CPU.
    search_device: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("index.index_type", self.index_type, INDEX_TYPES)
        _check_choice("index.search_device", self.search_device, SEARCH_DEVICES)
        if self.fp16 + self.sq8 + self.pq > 1:
            raise ConfigError("index.fp16, index.sq8 and index.pq are ways to store the "
                              "vectors: choose one")
        if self.pq and self.index_type != "ivf":
            raise ConfigError(f"index.pq needs index.index_type: ivf, not {self.index_type!r}")
        if self.pq_m < 0:
            raise ConfigError(f"index.pq_m must be 0 (dim / 2) or positive, got {self.pq_m}")
        _check_positive("index.refine_factor", self.refine_factor)
        _check_positive("index.recall_queries", self.recall_queries)
        _check_positive("index.recall_k", self.recall_k)
        if not 0.0 <= self.target_recall <= 1.0:
            raise ConfigError(f"index.target_recall must be in [0, 1]; got {self.target_recall}")
        if self.target_recall and self.index_type == "flat":
            raise ConfigError("index.target_recall tunes nprobe (ivf) or efSearch (hnsw); a "
                              "flat index has nothing to tune")
        if self.target_recall and not self.recall_mentions:
            raise ConfigError("index.target_recall needs index.recall_mentions: recall is "
                              "measured with real mention texts (term texts as queries find "
                              "their own neighbourhood and overstate it)")


@dataclass(frozen=True)
class RerankerConfig:
    path: str = ""  # empty: no re-ranking
    top_n: int = 25  # how many retrieved candidates are re-scored
    batch_size: int = 64
    max_length: int = 64
    device: str = "auto"
    precision: str = "auto"
    # order of the re-scored candidates: "none" = cross-encoder score alone; "rrf" =
    # reciprocal-rank fusion of the bi-encoder order and the cross-encoder order
    fusion: str = "rrf"
    rrf_k: int = 60

    def __post_init__(self) -> None:
        _check_positive("reranker.top_n", self.top_n)
        _check_choice("reranker.fusion", self.fusion, RERANK_FUSIONS)
        _check_positive("reranker.rrf_k", self.rrf_k)
        _check_positive("reranker.batch_size", self.batch_size)
        _check_choice("reranker.device", self.device, DEVICES)
        _check_choice("reranker.precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class RankerConfig:
    """The learned final ranker: where it is, and how ``clinlinker train-ranker`` (or a job
    with build_missing and no ranker at ``path`` yet) trains it (clinlinker_spark.training.
    ranker)."""

    path: str = ""  # a ranker directory; "": no ranker (retrieval order, no confidence)
    folds: int = 5  # training mentions grouped by document into this many folds
    seed: int = 13
    model: str = "lightgbm"  # lightgbm (lambdarank, text model) | logistic (JSON coefficients)
    num_trees: int = 150  # boosting rounds (300 at 0.05 ranked no better, at twice the cost)
    learning_rate: float = 0.1
    num_leaves: int = 15
    min_data_in_leaf: int = 50
    num_threads: int = 0  # lightgbm threads (0: its default; predicting, the encoder's first)
    # precisions whose review thresholds are picked on the out-of-fold predictions and
    # recorded in the ranker (thresholds; linking.review_below takes one of them)
    target_precisions: tuple[float, ...] = (0.9, 0.95, 0.98)

    def __post_init__(self) -> None:
        _check_choice("ranker.model", self.model, ("lightgbm", "logistic"))
        if self.folds < 2:
            raise ConfigError(f"ranker.folds must be >= 2; got {self.folds}")
        _check_positive("ranker.num_trees", self.num_trees)
        _check_positive("ranker.num_leaves", self.num_leaves)
        _check_positive("ranker.min_data_in_leaf", self.min_data_in_leaf)
        if self.learning_rate <= 0 or self.num_threads < 0:
            raise ConfigError("ranker.learning_rate must be > 0 and ranker.num_threads >= 0")
        if any(not 0.0 < p < 1.0 for p in self.target_precisions):
            raise ConfigError("ranker.target_precisions are precisions in (0, 1)")


@dataclass(frozen=True)
class ContextConfig:
    """The context stage: a context-aware cross-encoder (``train-crossencoder`` with
    ``context: true``) and the ranker trained on its scores (``train-ranker`` with
    ``reranker.path`` set to it) link again the mentions that have a context and whose
    context-free link is uncertain. The other mentions keep their context-free link."""

    reranker: str = ""  # the context-aware cross-encoder; "": no context stage
    ranker: str = ""  # the ranker trained with it; required with reranker
    top_n: int = 10  # candidates it re-scores (as the ranker was trained)
    # a mention goes through the stage when its context-free confidence is below this (1:
    # every mention with a context) ...
    below: float = 0.9
    # ... or when its first two codes share this many leading characters (the same ICD-10
    # category); 0: confidence alone decides
    same_category_chars: int = 3
    batch_size: int = 64
    max_length: int = 96  # tokens of a (context window, term) pair

    def __post_init__(self) -> None:
        if self.reranker and not self.ranker:
            raise ConfigError("context.reranker needs context.ranker: the ranker trained on "
                              "its scores (clinlinker train-ranker with reranker.path set to "
                              "it)")
        _check_positive("context.top_n", self.top_n)
        _check_positive("context.batch_size", self.batch_size)
        _check_positive("context.max_length", self.max_length)
        if not 0.0 <= self.below <= 1.0 or self.same_category_chars < 0:
            raise ConfigError("context.below must be in [0, 1] and "
                              "context.same_category_chars >= 0")


@dataclass(frozen=True)
class LinkingConfig:
    # where candidates come from: "dense" (bi-encoder + FAISS) and optionally "lexical" (the
    # index's character 3-gram TF-IDF over the same texts); hybrid lists are the union
    retrievers: tuple[str, ...] = ("dense",)
    search_k: int = 200  # raw nearest-neighbour hits searched per mention
    lexical_k: int = 0  # raw lexical hits searched per mention; 0: search_k
    top_k: int = 25  # distinct codes kept per mention (and taken from each retriever)
    # up to this many leaf codes below each candidate that has children in the index's
    # hierarchy join its list (an ICD-10-CM category -> its subcategories); 0: none
    expand_leaves: int = 0
    exact_match_prior: bool = True  # codes whose term equals the mention come first
    max_text_length: int = 256  # characters; longer mentions get status invalid_input
    # best score below this: status no_candidate (code null). The score is the ranker's
    # (unbounded) with a ranker, so the default sets no floor: a ranker's uncertain links
    # keep their code and go to review (review_below) instead
    min_score: float | None = None
    # a link whose calibrated confidence (needs a ranker) is below this gets status
    # needs_review: it keeps its code and candidates; 0 = every link is trusted
    review_below: float = 0.0
    # A mention whose normalised text is a term of the index takes the term's stored vector
    # instead of being encoded again, where that vector is what encoding gives (an index of
    # float32 vectors built in the encoder's precision: TerminologyIndex.holds_vectors_of).
    # False: every text is encoded (for benchmarks and comparisons).
    reuse_index_vectors: bool = True

    def __post_init__(self) -> None:
        _check_positive("linking.search_k", self.search_k)
        _check_positive("linking.top_k", self.top_k)
        _check_positive("linking.max_text_length", self.max_text_length)
        if self.top_k > self.search_k:
            raise ConfigError("linking.top_k must be <= linking.search_k")
        if self.expand_leaves < 0:
            raise ConfigError("linking.expand_leaves must be >= 0")
        if self.lexical_k < 0:
            raise ConfigError("linking.lexical_k must be >= 0 (0: linking.search_k)")
        if not 0.0 <= self.review_below <= 1.0:
            raise ConfigError(f"linking.review_below is a probability in [0, 1]; got "
                              f"{self.review_below}")
        retrievers = list(self.retrievers)
        if ("dense" not in retrievers or set(retrievers) - {"dense", "lexical"}
                or len(set(retrievers)) != len(retrievers)):
            raise ConfigError(f"linking.retrievers is [dense] or [dense, lexical]; got "
                              f"{retrievers}")


@dataclass(frozen=True)
class SparkConfig:
    master: str = "local[*]"
    app_name: str = "clinlinker"
    shuffle_partitions: int = 8
    arrow_batch_size: int = 2048
    driver_memory: str = "4g"
    task_cpus: int = 1
    local_ip: str = "127.0.0.1"  # SPARK_LOCAL_IP for local masters only
    conf: Mapping[str, str] = field(default_factory=dict)  # any extra spark.* settings
    # GPU resource scheduling (0 = CPU executors). executor_gpus sets
    # spark.executor.resource.gpu.amount, task_gpus spark.task.resource.gpu.amount (a fraction
    # lets several tasks share one GPU), gpu_discovery_script the executors' discovery script.
    executor_gpus: int = 0
    task_gpus: float = 0.0
    gpu_discovery_script: str = ""
    # Link each distinct normalised surface form once and join the result back to every
    # mention (False: every valid mention goes through the UDFs; for benchmarks).
    dedupe_surface_forms: bool = True
    # True: the index (and the encoder and re-ranker directories) reach executors once through
    # SparkContext.addFile. False: executors read index.path / encoder.path / reranker.path
    # directly (shared storage such as /dbfs or NFS; use it for multi-GB indexes).
    ship_artifacts: bool = True
    # Memory-map the FAISS file on executors (several Python workers share the OS page cache).
    mmap_index: bool = False
    # Sizing that Spark cannot derive from bytes: the work of a row is a model's, not its size.
    # Rows (mentions): an input of at most this many rows broadcasts its keys to the scans of
    # the output table and the form cache, and a write of at most this many rows broadcasts its
    # keys to the scan of the table files it replaces, instead of shuffling tables that grow
    # every night.
    broadcast_rows: int = 200_000
    # Surface forms: results of at most this many forms (about 2 KB each with 25 candidates)
    # are broadcast to the mentions that carry them instead of shuffling both sides.
    broadcast_result_forms: int = 50_000
    # Surface forms per model task: at least min_forms_per_task, and one task per slot while
    # the forms fit one wave of one_wave_forms_per_slot per slot (a night's few hundred forms
    # in more tasks than slots run in two waves, each paying a Python hand-off).
    min_forms_per_task: int = 64
    one_wave_forms_per_slot: int = 1024
    # Input rows per task of the Python normaliser: at least rows_per_prepare_task, or one task
    # per slot of at least min_rows_per_prepare_task while the input fits one such wave.
    rows_per_prepare_task: int = 50_000
    min_rows_per_prepare_task: int = 2_500
    # Linkers (loaded models) a Python worker keeps; the least recently used goes first.
    linkers_per_worker: int = 2

    def __post_init__(self) -> None:
        _check_positive("spark.shuffle_partitions", self.shuffle_partitions)
        for name in ("min_forms_per_task", "one_wave_forms_per_slot",
                     "rows_per_prepare_task", "min_rows_per_prepare_task",
                     "linkers_per_worker"):
            _check_positive(f"spark.{name}", getattr(self, name))
        for name in ("broadcast_rows", "broadcast_result_forms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"spark.{name} must be >= 0 (0: never broadcast)")
        _check_positive("spark.arrow_batch_size", self.arrow_batch_size)
        _check_positive("spark.task_cpus", self.task_cpus)
        if self.executor_gpus < 0 or self.task_gpus < 0:
            raise ConfigError("spark.executor_gpus and spark.task_gpus must be >= 0")
        if self.task_gpus > 0 and self.executor_gpus == 0:
            raise ConfigError("spark.task_gpus > 0 needs spark.executor_gpus > 0")


@dataclass(frozen=True)
class TableRef:
    """A Delta table named by its storage path or by its name in the Spark session's catalog
    (Unity Catalog on Databricks; locally the spark_catalog with a warehouse folder)."""

    path: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        if bool(self.path) == bool(self.name):
            raise ValueError("a TableRef has a path or a name, exactly one")

    @property
    def by_name(self) -> bool:
        return bool(self.name)

    def __str__(self) -> str:
        return self.name or self.path


def table_ref(path: str, table: str, path_key: str, table_key: str,
              required: bool = True) -> TableRef | None:
    """The table that a config's ``path_key`` / ``table_key`` pair names: exactly one of the
    two is set (``required``) or at most one (not ``required``: None when neither)."""
    if path and table:
        raise ConfigError(f"{path_key} ({path!r}) and {table_key} ({table!r}) are both set: "
                          f"a config names a path or a table, never both; keep {path_key} for "
                          f"a Delta table in a folder, {table_key} for a catalog table")
    if table:
        if not TABLE_NAME.fullmatch(table):
            raise ConfigError(f"{table_key} must be catalog.schema.table or schema.table; got "
                              f"{table!r}")
        return TableRef(name=table)
    if path:
        return TableRef(path=path)
    if required:
        raise ConfigError(f"set {path_key} (a folder) or {table_key} (catalog.schema.table): "
                          "neither is set")
    return None


@dataclass(frozen=True)
class InputConfig:
    path: str = ""
    table: str = ""  # a catalog table instead of path (any table format Spark reads)
    format: str = "parquet"  # parquet | delta | distemist | medprocner | codiesp (path only)
    mention_id_column: str = "mention_id"
    doc_id_column: str = "doc_id"
    start_column: str = "start"
    end_column: str = "end"
    text_column: str = "text"
    label_column: str = "label"
    passthrough_columns: tuple[str, ...] = ()
    # the column holding each mention's context (the sentence around it), read by the
    # context stage (``context``); "": every mention is linked from its text alone
    context_column: str = ""
    # the mention's character offsets inside its context, [start, end); a row whose context
    # is empty or whose offsets do not fit it is linked from its text alone
    context_start_column: str = "context_start"
    context_end_column: str = "context_end"
    # gold formats: the corpus's folder of {doc_id}.txt documents; each mention then gets its
    # sentence as context, in columns context, context_start and context_end
    text_dir: str = ""

    def __post_init__(self) -> None:
        _check_choice("input.format", self.format, INPUT_FORMATS)
        if self.text_dir and self.format not in GOLD_FORMATS:
            raise ConfigError("input.text_dir is read with a gold format "
                              f"({', '.join(GOLD_FORMATS)}); a table carries its context in "
                              "input.context_column")
        if self.context_column and not (self.context_start_column
                                        and self.context_end_column):
            raise ConfigError("input.context_column needs input.context_start_column and "
                              "input.context_end_column: the mention's offsets in it")
        table_ref(self.path, self.table, "input.path", "input.table", required=False)
        if self.table and self.format in GOLD_FORMATS:
            raise ConfigError(f"input.format {self.format} reads gold files from input.path; "
                              "input.table is read as a table (format parquet or delta)")

    @property
    def target(self) -> TableRef | None:
        """The input's path or catalog table; None when neither is set."""
        return table_ref(self.path, self.table, "input.path", "input.table", required=False)


@dataclass(frozen=True)
class OutputConfig:
    path: str = ""  # a folder, or:
    table: str = ""  # a catalog table (catalog.schema.table), written with delta-spark
    writer: str = "auto"  # auto | delta-spark | deltalake
    store_text: bool = True  # False: store a SHA-256 of the text instead of the text
    incremental: bool = True  # skip mentions already linked with the same model + index
    # Delta table of linked surface forms (key: SHA-256 of the normalised text + artifact
    # versions + linking settings; no text stored). A form found there is not embedded again:
    # a nightly run only computes the forms it has never seen. "" = no cache. Needs
    # spark.dedupe_surface_forms.
    form_cache_path: str = ""
    form_cache_table: str = ""  # the form cache as a catalog table instead
    # rows per Parquet file a run adds to the table (and the form cache): a night of a few
    # thousand rows adds one file, a large run one file per this many rows, more while each
    # task slot gets at least a tenth of it
    rows_per_file: int = 250_000
    # hours after which a staging folder of the deltalake writer (<table>/_clinlinker_staging/)
    # is removed by the next write even when its process may be alive on another host (a
    # process that ended on the same host loses its folder at once)
    staging_max_age_hours: float = 24.0
    # times a write commits again when another write committed to the table first without
    # touching what it replaces (else the run ends with ConcurrentWriteError; a rerun is safe)
    commit_retries: int = 3

    def __post_init__(self) -> None:
        _check_choice("output.writer", self.writer, WRITERS)
        _check_positive("output.rows_per_file", self.rows_per_file)
        _check_positive("output.staging_max_age_hours", self.staging_max_age_hours)
        if self.commit_retries < 0:
            raise ConfigError(f"output.commit_retries must be >= 0; got {self.commit_retries}")
        check_writer("output", self.writer,
                     table_ref(self.path, self.table, "output.path", "output.table", False),
                     self.form_cache)

    @property
    def target(self) -> TableRef:
        """The code-assignment table (``output.path`` or ``output.table``)."""
        return table_ref(self.path, self.table, "output.path", "output.table")

    @property
    def form_cache(self) -> TableRef | None:
        """The form cache table, None when there is none."""
        return table_ref(self.form_cache_path, self.form_cache_table, "output.form_cache_path",
                         "output.form_cache_table", required=False)


def check_writer(section: str, writer: str, *tables: TableRef | None) -> None:
    """Catalog tables are written through the session's catalog, which only delta-spark
    does: refuse ``writer: deltalake`` with one."""
    named = [str(t) for t in tables if t is not None and t.by_name]
    if named and writer == "deltalake":
        raise ConfigError(f"{section}.writer deltalake writes folders, not catalog tables "
                          f"({', '.join(named)}): use writer auto or delta-spark (a session "
                          "with Delta Lake), or name the tables by path")


DEFAULT_TRACKING_URI = "sqlite:///artifacts/mlflow/mlflow.db"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` where it is set (empty: tracking off), else ``databricks`` on
    a Databricks runtime, else a local SQLite store under ``artifacts/mlflow`` (relative to
    the working directory)."""
    import os

    if "MLFLOW_TRACKING_URI" in os.environ:
        return os.environ["MLFLOW_TRACKING_URI"]
    if os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        return "databricks"
    return DEFAULT_TRACKING_URI


@dataclass(frozen=True)
class MlflowConfig:
    """MLflow tracking and the model registry (``clinlinker_spark.tracking``).

    Training, evaluation, the link job and the variables job log one run each to
    ``tracking_uri``; training registers the model it wrote. Runs hold ids, counts, timings,
    metrics, versions and the config, never mention text."""

    # "": tracking off; "databricks" on Databricks; http(s)://... a tracking server
    tracking_uri: str = field(default_factory=default_tracking_uri)
    registry_uri: str = ""  # "": the tracking store's registry
    experiment: str = "clinlinker"
    # where a new experiment keeps its artifacts; "": <store folder>/artifacts for a local
    # SQLite store, the server's default otherwise
    artifact_location: str = ""
    register: bool = True  # training registers the model it wrote
    registered_model: str = ""  # the registered model's name; "": the output folder's name
    # where models:/ URIs of a remote registry are downloaded (one folder per name/version)
    download_dir: str = "artifacts/mlflow/models"

    @property
    def enabled(self) -> bool:
        return bool(self.tracking_uri.strip())


@dataclass(frozen=True)
class JobConfig:
    """The linking job's whole configuration (conf/local.yaml, conf/cluster.yaml, ...)."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    terminology: TerminologyConfig = field(default_factory=TerminologyConfig)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    linking: LinkingConfig = field(default_factory=LinkingConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    build_missing: bool = True  # build the base encoder / index when their directory is missing


# --------------------------------------------------------------------------------------------
# Loading


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0; got {value}")


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(where + k for k in unknown)}; "
            f"known: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(hints[name], value, where + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping")
        return from_dict(tp, value, where + ".")
    if origin is tuple:
        if isinstance(value, (str, Mapping)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads exponents without a dot ("2e-5") as text
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number; got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string; got {value!r}")
        return str(value)
    return value


def _parse_override_value(raw: str) -> Any:
    """A YAML scalar or flow collection; text like ``query: `` stays the literal string."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, dict) and not raw.strip().startswith("{"):
        return raw
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} has an empty key")
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {key} is not a section")
            node = child
        node[keys[-1]] = _parse_override_value(raw)
    return data


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    cls: type[T] = JobConfig,  # type: ignore[assignment]
) -> T:
    """Load a YAML config file (or defaults when ``path`` is None) plus overrides into ``cls``.

    Relative paths inside the config stay relative to the working directory, as a data
    engineer running ``spark-submit`` from the project root expects.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded or {}
    apply_overrides(data, overrides)
    return from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, JSON-serialisable dict of a config dataclass (for manifests and cards)."""
    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        return value

    return convert(config)
