"""Frozen, strictly validated configurations of the two training commands.

Loaded like the job configuration: ``load_config(path, overrides, cls=BiEncoderTrainConfig)``
(unknown keys are errors, values are type-checked, ``--set optim.batch_size=64`` overrides).
Relative paths stay relative to the working directory (the project root).

``data.sources`` reuses the terminology source records of the job configuration: dictionary
formats (``cie10``, ``gazetteer``, ``table``) give terms, gold formats (``codiesp``,
``distemist``, ``medprocner``) give training mentions, filtered by ``labels`` and, for a
document-level split, by ``split: train`` (never train on the test side of a split).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clinlinker_spark.config import (
    DEVICES,
    GOLD_FORMATS,
    POOLINGS,
    PRECISIONS,
    MlflowConfig,
    TerminologySourceConfig,
    _check_choice,
    _check_positive,
)
from clinlinker_spark.errors import ConfigError

BIENCODER_LOSSES = ("multi_similarity", "infonce")
MINERS = ("triplet", "none")
CROSSENCODER_LOSSES = ("bce", "listwise")


@dataclass(frozen=True)
class TrainDataConfig:
    """Where terms and gold training mentions come from."""

    sources: tuple[TerminologySourceConfig, ...] = ()

    def __post_init__(self) -> None:
        for src in self.sources:
            if src.format in GOLD_FORMATS and src.split == "test":
                raise ConfigError(
                    f"data source {src.path}: split 'test' is the held-out side of the "
                    "document split; training data must use split 'train' or 'all'"
                )


@dataclass(frozen=True)
class PairsConfig:
    """Synonym pairs: distinct strings of one code (see training.pairs.build_pairs)."""

    max_pairs_per_code: int = 50  # cap so that frequent codes do not dominate; 0 = no cap
    include_dictionary_pairs: bool = True  # pairs of two dictionary terms of one code
    seed: int = 13

    def __post_init__(self) -> None:
        if self.max_pairs_per_code < 0:
            raise ConfigError("pairs.max_pairs_per_code must be >= 0")


@dataclass(frozen=True)
class EncoderContractConfig:
    """How the trained bi-encoder embeds text; recorded in the card, used by build-index."""

    pooling: str = "mean"  # cls | mean (attention-masked)
    max_length: int = 32
    prefix: str = ""

    def __post_init__(self) -> None:
        _check_choice("encoder.pooling", self.pooling, POOLINGS)
        _check_positive("encoder.max_length", self.max_length)


@dataclass(frozen=True)
class BiEncoderLossConfig:
    name: str = "multi_similarity"  # multi_similarity | infonce
    # multi-similarity loss (Wang et al. 2019) with SapBERT's settings
    alpha: float = 1.0
    beta: float = 60.0
    base: float = 0.5
    miner: str = "triplet"  # triplet (SapBERT's TripletMarginMiner, "all") | none
    miner_margin: float = 0.2
    # InfoNCE with in-batch negatives
    temperature: float = 0.05

    def __post_init__(self) -> None:
        _check_choice("loss.name", self.name, BIENCODER_LOSSES)
        _check_choice("loss.miner", self.miner, MINERS)
        if self.alpha <= 0 or self.beta <= 0 or self.temperature <= 0:
            raise ConfigError("loss.alpha, loss.beta and loss.temperature must be > 0")


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation: AdamW, linear warm-up then linear decay to zero."""

    batch_size: int = 64  # bi-encoder: pairs per micro-batch; cross-encoder: queries
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # share of the optimizer steps spent warming up
    epochs: int = 1
    max_steps: int = 0  # > 0: the run is this many optimizer steps (sets the schedule)
    max_grad_norm: float = 1.0  # 0 = no clipping
    freeze_word_embeddings: bool = False  # keep the (large) word-embedding matrix fixed
    freeze_layers: int = 0  # > 0: also freeze all embeddings and the first N transformer layers
    encode_chunk: int = 64  # texts per forward pass, length-sorted (less padding)

    def __post_init__(self) -> None:
        _check_positive("optim.batch_size", self.batch_size)
        _check_positive("optim.gradient_accumulation", self.gradient_accumulation)
        _check_positive("optim.epochs", self.epochs)
        _check_positive("optim.encode_chunk", self.encode_chunk)
        if self.learning_rate <= 0:
            raise ConfigError("optim.learning_rate must be > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("optim.warmup_ratio must be in [0, 1)")
        if (self.max_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0
                or self.freeze_layers < 0):
            raise ConfigError("optim.max_steps, max_grad_norm, weight_decay and freeze_layers "
                              "must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    """Devices, seeds, checkpoints, logging."""

    seed: int = 13
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto: bf16/fp16 autocast on cuda, fp32 on cpu
    num_threads: int = 0  # torch intra-op threads (0: torch's default)
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = none
    keep_checkpoints: int = 2  # newest checkpoints kept
    checkpoint_dir: str = ""  # "" -> "<output_dir>-checkpoints"
    resume: str = "auto"  # auto: newest checkpoint when there is one | never | a directory
    log_every: int = 10  # optimizer steps between loss/throughput log lines
    progress: bool = True  # tqdm progress bars on long loops
    overwrite: bool = False  # replace an existing output directory

    def __post_init__(self) -> None:
        _check_choice("run.device", self.device, DEVICES)
        _check_choice("run.precision", self.precision, PRECISIONS)
        _check_positive("run.log_every", self.log_every)
        _check_positive("run.keep_checkpoints", self.keep_checkpoints)
        if self.num_threads < 0 or self.checkpoint_every < 0:
            raise ConfigError("run.num_threads and run.checkpoint_every must be >= 0")
        if not self.resume:
            raise ConfigError("run.resume must be auto, never or a checkpoint directory")


@dataclass(frozen=True)
class BiEncoderTrainConfig:
    """``clinlinker train-biencoder``: SapBERT-style contrastive training of a bi-encoder."""

    base_model: str = "artifacts/models/multilingual-e5-small"
    output_dir: str = "artifacts/models/biencoder"
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    encoder: EncoderContractConfig = field(default_factory=EncoderContractConfig)
    loss: BiEncoderLossConfig = field(default_factory=BiEncoderLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass(frozen=True)
class NegativesConfig:
    """Hard-negative mining with the trained bi-encoder and its index."""

    top_n: int = 200  # codes kept per query (ClinLinker: top-200)
    min_similarity: float = 0.35  # similarity floor (ClinLinker: 0.35)
    search_k: int = 0  # raw hits searched per query; 0 -> 2 * top_n
    exclude_query_text: bool = True  # leave the query's own index text out (leave-one-out)
    pool: int = 32  # negatives are sampled from the first `pool` mined codes
    per_query: int = 7  # negatives per query in each epoch
    batch_size: int = 128  # queries embedded per batch while mining
    # > 0: the mined codes that share this many leading characters with the gold code (its
    # ICD-10 category for 3) come first, each group best first, so that the pool is mostly
    # the gold code's siblings; 0: best first alone
    same_category_first: int = 0

    def __post_init__(self) -> None:
        for name in ("top_n", "pool", "per_query", "batch_size"):
            _check_positive(f"negatives.{name}", getattr(self, name))
        if self.search_k < 0 or self.same_category_first < 0:
            raise ConfigError("negatives.search_k and negatives.same_category_first must be "
                              ">= 0")


@dataclass(frozen=True)
class CrossEncoderTrainConfig:
    """``clinlinker train-crossencoder``: a re-ranker trained on mined hard negatives."""

    biencoder: str = "artifacts/models/biencoder"  # trained bi-encoder (mining)
    init_from: str = ""  # "" -> initialise the cross-encoder from `biencoder`
    index: str = ""  # index built with `biencoder`; mined against
    output_dir: str = "artifacts/models/crossencoder"
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    loss: str = "listwise"  # bce | listwise (softmax over one positive and its negatives)
    max_length: int = 64  # tokens of a (mention, term) pair
    # learning rate of the new classification head (classifier + pooler); 0 = optim's. A fresh
    # head moves too little at an encoder's learning rate in a short CPU run.
    head_learning_rate: float = 0.0
    # the positive term of a query: "best" = the gold code's best-scoring other term (what the
    # linker shows); "sample" = one of the gold code's other terms, drawn each epoch (covers
    # dictionary descriptions, the only terms of codes without training mentions)
    positive: str = "best"
    # context-aware: each gold mention with a context (its source's text_dir) is one query,
    # the mention marked inside the window of its sentence of at most context_chars
    # characters; mentions without context are left out
    context: bool = False
    context_chars: int = 200
    # the share of the gold sources' documents it learns from (a document-level split with
    # run.seed); the rest are left to the ranker trained on its scores. 1: all of them
    document_share: float = 1.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(batch_size=8))
    run: RunConfig = field(default_factory=RunConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        _check_choice("loss", self.loss, CROSSENCODER_LOSSES)
        _check_choice("positive", self.positive, ("best", "sample"))
        _check_positive("max_length", self.max_length)
        if self.head_learning_rate < 0:
            raise ConfigError("head_learning_rate must be >= 0")
        _check_positive("context_chars", self.context_chars)
        if not 0.0 < self.document_share <= 1.0:
            raise ConfigError(f"document_share must be in (0, 1]; got {self.document_share}")
        if self.context and not any(s.text_dir for s in self.data.sources):
            raise ConfigError("context: true needs a gold source with text_dir (the corpus's "
                              "documents) in data.sources")
        if not self.index:
            raise ConfigError("index: the bi-encoder index to mine hard negatives from is "
                              "required (clinlinker build-index --encoder <biencoder>)")


__all__ = [
    "BIENCODER_LOSSES", "CROSSENCODER_LOSSES", "MINERS", "BiEncoderLossConfig",
    "BiEncoderTrainConfig", "CrossEncoderTrainConfig", "EncoderContractConfig",
    "NegativesConfig", "OptimConfig", "PairsConfig", "RunConfig", "TrainDataConfig",
]
