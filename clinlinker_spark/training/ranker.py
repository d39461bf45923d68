"""Training the final ranker and its calibration, out of fold.

The ranker learns from the training mentions that the index holds as synonyms (the gold
sources of ``terminology``). Computed naively, a training mention's features would come from
an index that holds that very mention: its text would be an exact match of its own code with
its own count behind it, and exact match would look perfect. So the features are computed out
of fold (:func:`out_of_fold_examples`):

1. training mentions are grouped by document into ``ranker.folds`` folds (a seeded hash of
   the source and document id, :func:`fold_of_documents`);
2. for each fold, the index's rows are rebuilt from the dictionary sources and the training
   mentions of the *other* folds (``TerminologyIndex.with_terminology``: the same vectors and
   lexical model, other rows and counts), and the fold's mentions are linked against that
   view exactly as the job links (retrievers, exact-match prior, re-ranker), then featurised.

The model is then cross-fitted over the same folds: each fold is scored by a model trained on
the others; those out-of-fold scores fit the calibration (isotonic regression of "the top code
is right" on the top candidate's softmax share) and pick the review thresholds that reach the
target precisions. The model written is trained on every fold. The card's ``oof_ece`` is
cross-fitted too (each fold calibrated by the others, :func:`cross_fitted_confidence`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from clinlinker_spark.config import GOLD_FORMATS, JobConfig, RankerConfig, to_dict
from clinlinker_spark.corpora import clean_mask, read_gold, split_by_document
from clinlinker_spark.errors import ConfigError, InputDataError
from clinlinker_spark.evaluation import expected_calibration_error, threshold_for_precision
from clinlinker_spark.fsutil import publish_directory
from clinlinker_spark.ranker import (
    FEATURES,
    MODEL_FILE,
    RANKER_FILE,
    RANKER_FORMAT,
    RANKER_KIND,
    RERANK_FEATURES,
    Calibration,
    candidate_features,
    raw_confidence,
)
from clinlinker_spark.text import normalize_code, normalize_text

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Data


def fold_of_documents(keys: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """Fold (0..folds-1) of each document key: SHA-256 of ``"{seed}:{key}"`` modulo
    ``folds``. Depends only on the key and the seed."""
    return np.array([int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:12], 16) % folds
                     for k in keys], np.int64)


@dataclass
class TrainingMentions:
    """The index's training mentions (clean: one real code, non-empty text), their folds, and
    the dictionary frames the index was built from."""

    mentions: pd.DataFrame  # text_norm, code_key, doc_key, source, fold
    dictionary: list[pd.DataFrame]  # terminology frames of the dictionary sources
    gold_sources: list[str]  # the source names of the training mentions


def load_training_mentions(config: JobConfig) -> TrainingMentions:
    """Read ``config.terminology``'s sources: dictionary ones as terminology frames, gold ones
    as mentions (their labels and split side, as the index read them)."""
    from clinlinker_spark.terminology import _load_source

    settings = config.ranker
    dictionary: list[pd.DataFrame] = []
    frames: list[pd.DataFrame] = []
    names: list[str] = []
    for src in config.terminology.sources:
        if src.format not in GOLD_FORMATS:
            dictionary.append(_load_source(src))
            continue
        mentions = read_gold(src.path, src.format, text_dir=src.text_dir or None)
        if src.labels:
            mentions = mentions[mentions["label"].isin(src.labels)]
        if src.split != "all":
            train, test = split_by_document(mentions, src.test_fraction, src.split_seed)
            mentions = train if src.split == "train" else test
        name = src.name or Path(src.path).stem
        if "context" not in mentions:  # no text_dir: no context
            mentions = mentions.assign(context="", context_start=-1, context_end=-1)
        mentions = mentions[clean_mask(mentions)]
        text = mentions["text"].fillna("").astype(str)
        mentions = mentions[text.str.strip() != ""]
        frames.append(pd.DataFrame({
            "text": mentions["text"].astype(str).to_numpy(),
            "code": mentions["code"].astype(str).str.strip().to_numpy(),
            "text_norm": mentions["text"].astype(str).map(normalize_text).to_numpy(),
            "code_key": mentions["code"].astype(str).map(normalize_code).to_numpy(),
            "doc_key": (name + "/" + mentions["doc_id"].astype(str)).to_numpy(),
            "source": name,
            # the sentence around the mention (a context-aware re-ranker reads it)
            "context": mentions["context"].to_numpy(),
            "context_start": mentions["context_start"].to_numpy(),
            "context_end": mentions["context_end"].to_numpy(),
        }))
        names.append(name)
    if not frames:
        raise ConfigError("the ranker learns from the training mentions the index holds: "
                          "terminology.sources has no gold source (codiesp, distemist, "
                          "medprocner)")
    table = pd.concat(frames, ignore_index=True)
    table["fold"] = fold_of_documents(table["doc_key"].tolist(), settings.folds, settings.seed)
    log.info("ranker training mentions: %d from %d documents in %d folds", len(table),
             table["doc_key"].nunique(), settings.folds)
    return TrainingMentions(table, dictionary, names)


def fold_terminology(data: TrainingMentions, fold: int) -> pd.DataFrame:
    """The index's terminology without the training mentions of ``fold``."""
    from clinlinker_spark.terminology import build_terminology, terms_from_mentions

    kept = data.mentions[data.mentions["fold"] != fold]
    frames = list(data.dictionary)
    for name in data.gold_sources:
        part = kept[kept["source"] == name]
        if len(part):
            frames.append(terms_from_mentions(part.assign(
                is_composite=False, is_no_code=False), source=name))
    return build_terminology(frames)


@dataclass
class Examples:
    """Featurised candidate lists of the training mentions, one group per mention."""

    features: np.ndarray  # float32 [candidates, len(FEATURES)]
    labels: np.ndarray  # int [candidates]: 1 for the gold code
    group: np.ndarray  # int [candidates]: mention number
    fold: np.ndarray  # int [mentions]
    sizes: np.ndarray  # int [mentions]: candidates per mention
    gold_found: np.ndarray  # bool [mentions]

    @property
    def offsets(self) -> np.ndarray:
        return np.r_[0, np.cumsum(self.sizes)]


def out_of_fold_examples(linker: Any, data: TrainingMentions) -> Examples:
    """Link each fold's mentions against the index without that fold (module docstring) and
    featurise every candidate list. ``linker``: a core Linker (encoder, full index, re-ranker,
    linking settings; its ranker is not used)."""
    feature_blocks, label_blocks, folds, sizes, found = [], [], [], [], []
    mentions = data.mentions
    for fold in sorted(f for f in mentions["fold"].unique().tolist() if f >= 0):
        started = time.perf_counter()
        view = linker.index.with_terminology(fold_terminology(data, fold))
        fold_linker = linker.with_index(view)
        part = mentions[mentions["fold"] == fold]
        own = set(part["text_norm"]) & {t for t, n in zip(
            view.rows["term_norm"], view.rows["mention_count"]) if n > 0}
        log.debug("fold %d: %d texts also carried by other folds' mentions", fold, len(own))
        texts = list(dict.fromkeys(part["text_norm"]))
        retrieved = fold_linker.retrieve(texts)
        # one candidate list per distinct text, or per distinct (text, context query) for a
        # context-aware re-ranker
        queries = mention_queries(linker, part)
        keys = list(zip(part["text_norm"], queries))
        items = list(dict.fromkeys(keys))
        position = {t: i for i, t in enumerate(texts)}
        item_texts = [t for t, _ in items]
        candidates = fold_linker.rerank(item_texts, [retrieved[position[t]] for t in item_texts],
                                        queries=[q for _, q in items])
        features = candidate_features(view, item_texts, candidates)
        offsets = np.r_[0, np.cumsum([len(c) for c in candidates])]
        row_of = {key: i for i, key in enumerate(items)}
        keys_of = [[normalize_code(c.code) for c in cands] for cands in candidates]
        for key, gold in zip(keys, part["code_key"]):
            i = row_of[key]
            labels = np.array([k == gold for k in keys_of[i]], np.int8)
            feature_blocks.append(features[offsets[i]:offsets[i + 1]])
            label_blocks.append(labels)
            sizes.append(len(labels))
            found.append(bool(labels.any()))
            folds.append(fold)
        log.info("ranker fold %d: %d mentions, %d distinct texts (%d lists), %d candidates, "
                 "gold among them for %.3f (%.1f s)", fold, len(part), len(texts), len(items),
                 int(offsets[-1]),
                 float(np.mean(found[-len(part):])) if len(part) else 0.0,
                 time.perf_counter() - started)
    sizes_arr = np.asarray(sizes, np.int64)
    return Examples(
        features=np.concatenate(feature_blocks) if feature_blocks
        else np.zeros((0, len(FEATURES)), np.float32),
        labels=np.concatenate(label_blocks) if label_blocks else np.zeros(0, np.int8),
        group=np.repeat(np.arange(len(sizes_arr)), sizes_arr),
        fold=np.asarray(folds, np.int64), sizes=sizes_arr, gold_found=np.asarray(found, bool),
    )


def mention_queries(linker: Any, mentions: pd.DataFrame) -> list[str]:
    """What the linker's re-ranker reads for each training mention: the mention marked in its
    context for a context-aware re-ranker (:meth:`CrossEncoderReranker.queries`), else the
    normalised text."""
    texts = mentions["text_norm"].tolist()
    reranker = linker.reranker
    if reranker is None or not reranker.context_chars:
        return texts
    from clinlinker_spark.linker import mention_contexts

    return reranker.queries(texts, mention_contexts(mentions, "context", "context_start",
                                                    "context_end"))


def unseen_by_reranker(linker: Any, data: TrainingMentions) -> TrainingMentions:
    """For a context-aware re-ranker: the ranker learns only from the mentions of the
    documents the re-ranker did not learn from (its card lists those it did), so that it
    learns how far to trust the scores given to mentions the re-ranker has not seen, as in
    the job. The others get fold -1: they stay in every fold's view of the index (as they are
    in the index) and give no example. Other re-rankers: ``data`` unchanged."""
    reranker = linker.reranker
    if reranker is None or not reranker.context_chars:
        return data
    table = data.mentions
    seen = table["doc_key"].isin(reranker.documents)
    if seen.all():
        raise ConfigError("every training mention comes from a document the context-aware "
                          "re-ranker learnt from: train it on one part of the documents "
                          "(split: train) and the ranker on the rest")
    with_context = (table["context"].astype(str) != "").sum()
    if with_context == 0:
        raise ConfigError("the re-ranker is context-aware, but no training mention has a "
                          "context: set text_dir on the gold sources of terminology.sources")
    log.info("context-aware re-ranker: %d of %d training mentions (%d documents) seen in its "
             "training give no example; %d of the rest have a context", int(seen.sum()),
             len(table), table.loc[seen, "doc_key"].nunique(),
             int((table.loc[~seen, "context"].astype(str) != "").sum()))
    return dataclasses.replace(data, mentions=table.assign(
        fold=np.where(seen.to_numpy(), -1, table["fold"].to_numpy())))


# --------------------------------------------------------------------------------------------
# Models


def feature_names(with_rerank: bool) -> tuple[str, ...]:
    return tuple(f for f in FEATURES if with_rerank or f not in RERANK_FEATURES)


def _columns(names: Sequence[str]) -> list[int]:
    return [FEATURES.index(n) for n in names]


def fit_model(examples: Examples, mentions: np.ndarray, names: Sequence[str],
              settings: RankerConfig) -> dict[str, Any]:
    """Fit the ranker on the candidate lists of ``mentions`` (mention numbers); lists without
    the gold code teach nothing and are left out. Returns {"booster": ...} (lightgbm) or
    {"logistic": {...}}."""
    offsets = examples.offsets
    chosen = [m for m in mentions.tolist() if examples.gold_found[m] and examples.sizes[m] > 1]
    if not chosen:
        raise InputDataError("no training mention has its gold code among its candidates: "
                             "nothing to learn a ranking from")
    idx = np.concatenate([np.arange(offsets[m], offsets[m + 1]) for m in chosen])
    x = examples.features[idx][:, _columns(names)]
    y = examples.labels[idx]
    if settings.model == "lightgbm":
        import lightgbm

        dataset = lightgbm.Dataset(x, label=y, group=examples.sizes[chosen],
                                   feature_name=list(names), free_raw_data=True)
        params = {
            "objective": "lambdarank", "metric": "ndcg", "eval_at": [1],
            "learning_rate": settings.learning_rate, "num_leaves": settings.num_leaves,
            "min_data_in_leaf": settings.min_data_in_leaf, "feature_fraction": 0.9,
            "bagging_fraction": 0.9, "bagging_freq": 1, "lambda_l2": 1.0,
            "seed": settings.seed, "deterministic": True, "force_row_wise": True,
            "num_threads": settings.num_threads, "verbosity": -1,
        }
        booster = lightgbm.train(params, dataset, num_boost_round=settings.num_trees)
        return {"booster": booster}
    from sklearn.linear_model import LogisticRegression

    x = np.nan_to_num(x.astype(np.float64), nan=0.0)
    means = x.mean(axis=0)
    scales = x.std(axis=0)
    scales[scales == 0] = 1.0
    model = LogisticRegression(C=1.0, max_iter=2000)
    model.fit((x - means) / scales, y)
    return {"logistic": {"coefficients": model.coef_[0].tolist(),
                         "intercept": float(model.intercept_[0]),
                         "means": means.tolist(), "scales": scales.tolist()}}


def predict(model: dict[str, Any], features: np.ndarray, names: Sequence[str]) -> np.ndarray:
    x = features[:, _columns(names)]
    if "booster" in model:
        return np.asarray(model["booster"].predict(x), np.float64)
    m = model["logistic"]
    x = np.nan_to_num(x.astype(np.float64), nan=0.0)
    return ((x - np.asarray(m["means"])) / np.asarray(m["scales"])) @ np.asarray(
        m["coefficients"]) + m["intercept"]


def list_outcomes(examples: Examples, scores: np.ndarray, mentions: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw confidence, top is right, 1-based rank of the gold code or 0) of each mention
    when its list is ordered by ``scores`` (ties: the incoming order)."""
    offsets = examples.offsets
    raws, right, ranks = [], [], []
    for m in mentions.tolist():
        s = scores[offsets[m]:offsets[m + 1]]
        labels = examples.labels[offsets[m]:offsets[m + 1]]
        if len(s) == 0:
            raws.append(0.0)
            right.append(False)
            ranks.append(0)
            continue
        order = np.argsort(-s, kind="stable")
        raws.append(raw_confidence(s[order]))
        right.append(bool(labels[order[0]]))
        hit = np.flatnonzero(labels[order])
        ranks.append(int(hit[0]) + 1 if len(hit) else 0)
    return np.asarray(raws), np.asarray(right, bool), np.asarray(ranks, np.int64)


def cross_fitted_confidence(
    raws: np.ndarray, right: np.ndarray, folds: np.ndarray,
    fit: Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]] = Calibration.fit,
) -> np.ndarray:
    """Each fold's confidence from a calibration ``fit`` on the other folds' ``raws`` and
    ``right`` (isotonic, as a ranker ships, unless another map is given): an honest estimate
    of the calibration error, which the calibration fitted on every fold cannot give on its
    own data, where isotonic regression fits each bin exactly."""
    confidence = np.zeros(len(raws), np.float64)
    for fold in np.unique(folds).tolist():
        held = folds == fold
        confidence[held] = fit(raws[~held], right[~held])(raws[held])
    return confidence


def cross_fitted_scores(examples: Examples, names: Sequence[str],
                        settings: RankerConfig) -> np.ndarray:
    """Each fold's candidate scores from a model trained on the other folds."""
    scores = np.zeros(len(examples.features), np.float64)
    offsets = examples.offsets
    mention_ids = np.arange(len(examples.sizes))
    for fold in np.unique(examples.fold).tolist():
        held = mention_ids[examples.fold == fold]
        model = fit_model(examples, mention_ids[examples.fold != fold], names, settings)
        idx = np.concatenate([np.arange(offsets[m], offsets[m + 1]) for m in held]) \
            if len(held) else np.zeros(0, np.int64)
        if len(idx):
            scores[idx] = predict(model, examples.features[idx], names)
    return scores


# --------------------------------------------------------------------------------------------
# The command


def train_ranker(config: JobConfig, out_dir: str | Path, linker: Any = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Train, calibrate and write a ranker for the job described by ``config`` (its encoder,
    index, terminology, re-ranker, linking and ranker sections). Returns the spec written."""
    from clinlinker_spark.linker import Linker

    started = time.perf_counter()
    settings = config.ranker
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"ranker directory {out} already exists (choose a new path or pass "
                          "--overwrite)")
    if linker is None:
        linker = Linker.from_config(dataclasses.replace(config, ranker=RankerConfig()))
    data = unseen_by_reranker(linker, load_training_mentions(config))
    examples = out_of_fold_examples(linker, data)
    with_rerank = linker.reranker is not None
    names = feature_names(with_rerank)
    all_mentions = np.arange(len(examples.sizes))
    oof_scores = cross_fitted_scores(examples, names, settings)
    raws, right, ranks = list_outcomes(examples, oof_scores, all_mentions)
    calibration = Calibration.fit(raws, right)
    confidence = calibration(raws)
    thresholds = {}
    for target in settings.target_precisions:
        found = threshold_for_precision(confidence, right, target)
        thresholds[f"{target:g}"] = found
    model = fit_model(examples, all_mentions, names, settings)
    metrics = _ranker_metrics(examples, raws, confidence, right, ranks)
    spec = {
        "kind": RANKER_KIND,
        "format_version": RANKER_FORMAT,
        "model_type": settings.model,
        "features": list(names),
        "calibration": {"method": "isotonic", "input": "softmax share of the top candidate",
                        "x": list(calibration.x), "y": list(calibration.y)},
        "thresholds": thresholds,
        "metrics": metrics,
        "trained_with": _trained_with(config, linker),
        "settings": to_dict(settings),
        "training_data": _training_data(data, settings),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if "logistic" in model:
        spec["logistic"] = model["logistic"]
    _write_ranker_dir(out, spec, model)
    log.info("ranker written to %s: %s", out, json.dumps(metrics))
    return spec


def train_ranker_tracked(config: JobConfig, out_dir: str | Path,
                         overwrite: bool = False) -> tuple[dict[str, Any], str]:
    """:func:`train_ranker` as one MLflow run (``config.mlflow``): the job config as params,
    the out-of-fold metrics and thresholds, the ranker directory registered with its hash and
    the versions it was trained with. Returns (the spec, the run id or "")."""
    from clinlinker_spark.ranker import ranker_hash
    from clinlinker_spark.tracking import log_trained_model, tracked_run

    with tracked_run(config.mlflow, "train-ranker", Path(out_dir).name) as run:
        run.log_params(to_dict(config))
        spec = train_ranker(config, out_dir, overwrite=overwrite)
        with_ = spec["trained_with"]
        metrics = {**spec["metrics"], "wall_seconds": spec["wall_seconds"],
                   **{f"threshold_for_precision_{k}": v
                      for k, v in spec["thresholds"].items() if v is not None}}
        log_trained_model(run, out_dir, {k: spec[k] for k in ("trained_with", "training_data")},
                          metrics, {
                              "clinlinker.model_kind": spec["kind"],
                              "clinlinker.model_hash": ranker_hash(Path(out_dir)),
                              "clinlinker.model_version": with_["model_version"],
                              "clinlinker.index_version": with_["index_version"],
                              "clinlinker.reranker_version": with_["reranker_version"]})
    return spec, run.run_id


def _ranker_metrics(examples: Examples, raws: np.ndarray, confidence: np.ndarray,
                    right: np.ndarray, ranks: np.ndarray) -> dict[str, Any]:
    """The spec's metrics: candidate lists, out-of-fold accuracy and calibration error, and
    the retrieval order's accuracy (before any ranker) on the same lists."""
    all_mentions = np.arange(len(examples.sizes))
    _, base_right, base_ranks = list_outcomes(
        examples, -np.concatenate([np.arange(s) for s in examples.sizes]).astype(np.float64)
        if len(examples.sizes) else np.zeros(0), all_mentions)
    return {
        "mentions": int(len(examples.sizes)),
        "candidates": int(len(examples.labels)),
        "gold_in_candidates": round(float(examples.gold_found.mean()), 4),
        "oof_acc@1": round(float(right.mean()), 4),
        "oof_acc@5": round(float(((ranks > 0) & (ranks <= 5)).mean()), 4),
        "retrieval_order_acc@1": round(float(base_right.mean()), 4),
        "retrieval_order_acc@5": round(float(((base_ranks > 0) & (base_ranks <= 5)).mean()), 4),
        # the calibration error of a calibration fitted without the fold it is measured on
        "oof_ece": round(expected_calibration_error(
            cross_fitted_confidence(raws, right, examples.fold), right), 4),
        "oof_ece_in_sample": round(expected_calibration_error(confidence, right), 4),
        "oof_ece_uncalibrated": round(expected_calibration_error(raws, right), 4),
    }


def _trained_with(config: JobConfig, linker: Any) -> dict[str, Any]:
    """The models, index, retrievers and linking settings the ranker's features were
    computed with (:meth:`Ranker.check_compatible` compares a job's with them)."""
    versions = linker.versions
    return {
        "model_version": versions["model_version"],
        "index_version": versions["index_version"],
        "reranker_version": versions["reranker_version"],
        "retrievers": list(config.linking.retrievers),
        "linking": to_dict(config.linking),
    }


def _training_data(data: TrainingMentions, settings: RankerConfig) -> dict[str, Any]:
    """The spec's training data: gold sources, a hash of the mentions, the number of folds."""
    return {
        "sources": data.gold_sources,
        "mentions_sha256": hashlib.sha256(
            "\n".join(f"{d}\t{t}\t{c}" for d, t, c in zip(
                data.mentions["doc_key"], data.mentions["text_norm"],
                data.mentions["code_key"])).encode()).hexdigest(),
        "folds": int(settings.folds),
    }


def _write_ranker_dir(out: Path, spec: dict[str, Any], model: dict[str, Any]) -> None:
    """Write the booster's ``model.txt`` (lightgbm) and ``ranker.json`` under a temporary name
    beside ``out``, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{int(time.time() * 1e6)}"
    tmp.mkdir()
    if "booster" in model:
        (tmp / MODEL_FILE).write_text(model["booster"].model_to_string(), encoding="utf-8")
    (tmp / RANKER_FILE).write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    publish_directory(tmp, out)


__all__ = [
    "Examples", "TrainingMentions", "cross_fitted_scores", "feature_names", "fit_model",
    "fold_of_documents", "fold_terminology", "list_outcomes", "load_training_mentions",
    "mention_queries", "out_of_fold_examples", "predict", "train_ranker",
    "train_ranker_tracked", "unseen_by_reranker",
]
