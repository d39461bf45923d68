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


def evaluate_candidates(
    gold: pd.DataFrame,
    candidates: Sequence[Sequence[Candidate]],
    index: TerminologyIndex,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict:
    """Accuracy@k per subset, plus the ceiling (gold code present in the index)."""
    if len(gold) != len(candidates):
        raise ValueError(f"{len(gold)} gold mentions but {len(candidates)} candidate lists")
    gold_keys = gold["code"].map(normalize_code).tolist()
    ranks = gold_ranks(gold_keys, candidates)
    masks = subset_masks(gold, index)
    index_codes = index.code_keys
    in_index = np.array([k in index_codes for k in gold_keys], dtype=bool)
    return {
        "subsets": {name: _accuracy(ranks[mask], ks) for name, mask in masks.items()},
        "ceiling": round(float(in_index.mean()), 4) if len(in_index) else 0.0,
        "ceiling_clean": round(float(in_index[masks["clean"]].mean()), 4)
        if masks["clean"].any() else 0.0,
    }


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
    return "\n".join(lines)


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)
