"""Accuracy@k of ranked candidate codes against gold mentions (the ClinLinker protocol).

A mention counts as correct at k when its gold code (compared as ``normalize_code``: lower
case, no dots) is among the first k distinct candidate codes. Composite gold codes ("A+B") and
NO_CODE can never match a single code: they count as errors in the ``all`` subset and are
excluded from ``clean``. Subsets:

- ``all``: every gold mention;
- ``clean``: no composite code, no NO_CODE;
- ``unseen_mentions``: clean mentions whose normalised text is not a text in the index;
- ``unseen_codes``: clean mentions whose gold code no training mention in the index carries;
- ``exact_match``: clean mentions whose normalised text is a text in the index (the stage the
  exact-match prior decides).

``ceiling`` is the share of mentions whose gold code is in the index at all.

Also per report: ``category`` (accuracy@k where a code counts by its category: for ICD-10,
the first ``category_chars`` characters of its key; published CodiEsp linkers report both)
and ``errors`` (of the mentions whose first code is wrong: how many name an ancestor or a
descendant of the gold code in the index's hierarchy, how many have a gold code the index
does not hold). A linker with a calibrated confidence (a ranker) is also measured as a
classifier of its own links (:func:`confidence_report`): expected calibration error,
precision and coverage at thresholds, and the threshold that reaches a target precision.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pandas as pd

from clinlinker_spark.index import TerminologyIndex
from clinlinker_spark.linker import Candidate
from clinlinker_spark.text import normalize_code, normalize_text

DEFAULT_KS = (1, 5, 25, 50, 100, 200)


def gold_ranks(gold_keys: Sequence[str], candidates: Sequence[Sequence[Candidate]]) -> np.ndarray:
    """1-based rank of each gold code among its candidates; 0 where it is absent."""
    ranks = np.zeros(len(gold_keys), dtype=np.int64)
    for i, (gold, cands) in enumerate(zip(gold_keys, candidates)):
        for r, c in enumerate(cands, start=1):
            if normalize_code(c.code) == gold:
                ranks[i] = r
                break
    return ranks


def _accuracy(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float | int]:
    out: dict[str, float | int] = {"n": int(len(ranks))}
    for k in ks:
        out[f"acc@{k}"] = round(float(np.mean((ranks > 0) & (ranks <= k))), 4) if len(ranks) else 0.0
    return out


def subset_masks(gold: pd.DataFrame, index: TerminologyIndex) -> dict[str, np.ndarray]:
    """Boolean masks of the evaluation subsets over the gold mention table."""
    texts = gold["text"].fillna("").map(normalize_text)
    in_index_text = texts.map(lambda t: index.position_of(t) >= 0).to_numpy()
    composite = gold["is_composite"].to_numpy(bool) if "is_composite" in gold else np.zeros(len(gold), bool)
    no_code = gold["is_no_code"].to_numpy(bool) if "is_no_code" in gold else np.zeros(len(gold), bool)
    clean = ~composite & ~no_code
    trained = set(index.rows.loc[index.rows["mention_count"] > 0, "code_key"])
    gold_keys = gold["code"].map(normalize_code)
    return {
        "all": np.ones(len(gold), bool),
        "clean": clean,
        "unseen_mentions": clean & ~in_index_text,
        "unseen_codes": clean & ~gold_keys.isin(trained).to_numpy(),
        "exact_match": clean & in_index_text,
    }


def category_ranks(gold_keys: Sequence[str], candidates: Sequence[Sequence[Candidate]],
                   chars: int) -> np.ndarray:
    """1-based rank of the first candidate whose code's first ``chars`` characters (of its
    normalised key) are the gold code's; 0 where none is."""
    ranks = np.zeros(len(gold_keys), dtype=np.int64)
    for i, (gold, cands) in enumerate(zip(gold_keys, candidates)):
        want = gold[:chars]
        for r, c in enumerate(cands, start=1):
            if normalize_code(c.code)[:chars] == want:
                ranks[i] = r
                break
    return ranks


def _ancestors(parent_of: dict[str, str], key: str) -> set[str]:
    out: set[str] = set()
    parent = parent_of.get(key, "")
    while parent and parent not in out:
        out.add(parent)
        parent = parent_of.get(parent, "")
    return out


def error_kinds(gold_keys: Sequence[str], candidates: Sequence[Sequence[Candidate]],
                index: TerminologyIndex) -> dict[str, int]:
    """Of the mentions whose first code is wrong: ``hierarchy`` (the first code is an
    ancestor or a descendant of the gold code in the index's hierarchy), ``same_category``
    (the first three characters agree, ICD-10's category), ``gold_not_in_index``, and
    ``errors`` in all."""
    parent_of = dict(zip(index.codes["code_key"], index.codes["parent_key"]))
    index_codes = index.code_keys
    out = {"errors": 0, "hierarchy": 0, "same_category": 0, "gold_not_in_index": 0}
    for gold, cands in zip(gold_keys, candidates):
        top = normalize_code(cands[0].code) if cands else ""
        if top == gold:
            continue
        out["errors"] += 1
        if gold not in index_codes:
            out["gold_not_in_index"] += 1
        if top and (top in _ancestors(parent_of, gold) or gold in _ancestors(parent_of, top)):
            out["hierarchy"] += 1
        if top and top[:3] == gold[:3]:
            out["same_category"] += 1
    return out


def evaluate_candidates(
    gold: pd.DataFrame,
    candidates: Sequence[Sequence[Candidate]],
    index: TerminologyIndex,
    ks: Sequence[int] = DEFAULT_KS,
    category_chars: int = 0,
) -> dict:
    """Accuracy@k per subset, plus the ceiling (gold code present in the index), the error
    kinds and, with ``category_chars`` > 0, accuracy@k at the category level."""
    if len(gold) != len(candidates):
        raise ValueError(f"{len(gold)} gold mentions but {len(candidates)} candidate lists")
    gold_keys = gold["code"].map(normalize_code).tolist()
    ranks = gold_ranks(gold_keys, candidates)
    masks = subset_masks(gold, index)
    index_codes = index.code_keys
    in_index = np.array([k in index_codes for k in gold_keys], dtype=bool)
    report = {
        "subsets": {name: _accuracy(ranks[mask], ks) for name, mask in masks.items()},
        "ceiling": round(float(in_index.mean()), 4) if len(in_index) else 0.0,
        "ceiling_clean": round(float(in_index[masks["clean"]].mean()), 4)
        if masks["clean"].any() else 0.0,
        "errors": error_kinds(gold_keys, candidates, index),
    }
    if category_chars > 0:
        report["category"] = {"chars": category_chars, **_accuracy(
            category_ranks(gold_keys, candidates, category_chars), ks)}
    return report


# --------------------------------------------------------------------------------------------
# Confidence


CONFIDENCE_THRESHOLDS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def expected_calibration_error(confidence: np.ndarray, right: np.ndarray,
                               bins: int = 10) -> float:
    """ECE: over equal-width confidence bins, the mean |accuracy - mean confidence| weighted
    by each bin's share of the mentions."""
    confidence = np.asarray(confidence, np.float64)
    right = np.asarray(right, bool)
    if len(confidence) == 0:
        return 0.0
    which = np.clip(np.digitize(confidence, np.linspace(0.0, 1.0, bins + 1)[1:-1],
                                right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(right[mask].mean() - confidence[mask].mean())
    return float(total)


def precision_at(confidence: np.ndarray, right: np.ndarray, threshold: float
                 ) -> dict[str, float]:
    """Precision and coverage of the links whose confidence is >= ``threshold``."""
    kept = np.asarray(confidence) >= threshold
    n = int(kept.sum())
    return {"threshold": float(threshold),
            "precision": round(float(np.asarray(right)[kept].mean()), 4) if n else 0.0,
            "coverage": round(float(kept.mean()), 4) if len(kept) else 0.0, "links": n}


def threshold_for_precision(confidence: np.ndarray, right: np.ndarray, target: float
                            ) -> dict[str, float] | None:
    """The lowest threshold whose links (confidence >= it) reach ``target`` precision, with
    that precision and coverage (the most coverage that reaches it); None when none does.
    Thresholds are the confidences themselves (a threshold between two equal confidences
    cannot split them)."""
    confidence = np.asarray(confidence, np.float64)
    order = np.argsort(-confidence, kind="stable")
    c = confidence[order]
    r = np.asarray(right, np.float64)[order]
    if len(c) == 0:
        return None
    precision = np.cumsum(r) / np.arange(1, len(r) + 1)
    last = np.r_[np.flatnonzero(np.diff(c) != 0), len(c) - 1]
    ok = last[precision[last] >= target]
    if len(ok) == 0:
        return None
    i = int(ok.max())
    return {"threshold": float(c[i]), "precision": round(float(precision[i]), 4),
            "coverage": round(float((i + 1) / len(c)), 4)}


def precision_coverage_curve(confidence: np.ndarray, right: np.ndarray, points: int = 101
                             ) -> list[dict[str, float]]:
    """Precision and coverage at ``points`` thresholds evenly spaced over [0, 1]."""
    return [precision_at(confidence, right, t) for t in np.linspace(0.0, 1.0, points)]


def confidence_report(confidence: Sequence[float | None], right: Sequence[bool],
                      target_precision: float = 0.95,
                      picked_threshold: float | None = None) -> dict:
    """How well a linker's confidence tells right links from wrong ones: ECE, precision and
    coverage at :data:`CONFIDENCE_THRESHOLDS`, the threshold that reaches
    ``target_precision`` on these mentions, and precision and coverage at
    ``picked_threshold`` (one chosen elsewhere, e.g. on training folds). A mention without a
    confidence (no candidate) counts as confidence 0 and wrong."""
    conf = np.array([0.0 if c is None else float(c) for c in confidence], np.float64)
    ok = np.asarray(right, bool)
    report = {
        "mentions": int(len(conf)),
        "accuracy": round(float(ok.mean()), 4) if len(ok) else 0.0,
        "mean_confidence": round(float(conf.mean()), 4) if len(conf) else 0.0,
        "ece": round(expected_calibration_error(conf, ok), 4),
        "at_thresholds": [precision_at(conf, ok, t) for t in CONFIDENCE_THRESHOLDS],
        "target_precision": target_precision,
        "threshold_for_target": threshold_for_precision(conf, ok, target_precision),
    }
    if picked_threshold is not None:
        report["at_picked_threshold"] = precision_at(conf, ok, picked_threshold)
    return report


def plot_precision_coverage(curves: dict[str, Sequence[dict[str, float]]], path: str,
                            title: str = "") -> None:
    """A PNG of precision against coverage, one line per named curve
    (:func:`precision_coverage_curve`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for name, curve in curves.items():
        points = [(p["coverage"], p["precision"]) for p in curve if p["links"] > 0]
        if points:
            ax.plot([c for c, _ in points], [p for _, p in points], label=name)
    ax.set_xlabel("coverage (share of mentions linked at or above the threshold)")
    ax.set_ylabel("precision of those links")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(report: dict) -> str:
    """A readable table of one report: one block per retriever/variant, one row per subset."""
    lines: list[str] = []
    meta = report.get("meta", {})
    if meta:
        lines.append(" ".join(f"{k}={v}" for k, v in meta.items()))
    for variant, result in report["results"].items():
        subsets = result["subsets"]
        ks = [key for key in next(iter(subsets.values())) if key.startswith("acc@")]
        lines.append("")
        lines.append(f"[{variant}]  ceiling={result['ceiling']:.3f} "
                     f"(clean {result['ceiling_clean']:.3f})")
        header = f"{'subset':<16}{'n':>7}" + "".join(f"{k:>9}" for k in ks)
        lines.append(header)
        lines.append("-" * len(header))
        for name, row in subsets.items():
            lines.append(f"{name:<16}{row['n']:>7}" + "".join(f"{row[k]:>9.3f}" for k in ks))
        category = result.get("category")
        if category:
            lines.append(f"{'category':<16}{category['n']:>7}"
                         + "".join(f"{category[k]:>9.3f}" for k in ks)
                         + f"   (first {category['chars']} characters)")
        errors = result.get("errors")
        if errors:
            lines.append(f"errors at @1: {errors['errors']} (ancestor or descendant of the gold "
                         f"code {errors['hierarchy']}, same category {errors['same_category']}, "
                         f"gold code not in the index {errors['gold_not_in_index']})")
    return "\n".join(lines)


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)
