"""The learned final ranker and its calibrated confidence.

A mention's candidates (the union of the retrievers' codes, :mod:`clinlinker_spark.linker`)
are ordered by a small learned model over per-candidate features (:data:`FEATURES`), and the
top code gets a ``confidence``: the probability that it is the right code, calibrated on
out-of-fold predictions (:mod:`clinlinker_spark.training.ranker` trains both).

Features of a candidate (code c, its shown term t) for a mention m, from the candidate's
scores and from the index artifact (rows, codes and hierarchy):

- retrieval: the bi-encoder score of t, its rank among the mention's candidates and its gap to
  the best; the same for the lexical (TF-IDF) score; the cross-encoder logit, rank and gap
  (missing, NaN, where no re-ranker scored it); how many of the bi-encoder's hits
  (``linking.search_k`` texts) carry c, and c's share, and its category's share, of the hits
  that the mention's candidates carry (a code whose training mentions and synonyms crowd the
  neighbourhood is better supported than one near text);
- text: m equals t (exact), the word-token Jaccard of m and t, the length ratio, m's token
  count;
- training priors: how many training mentions carry (t, c) and c, c's share of the training
  mentions of m's exact text (``exact_share``) and of its parent's children
  (``sibling_share``), whether t is c's main term, how many terms c has;
- hierarchy: whether c is a leaf (assignable in ICD-10-CM), its depth, whether another
  candidate is an ancestor or a descendant of c;
- what c's description says (its main terms, Spanish or English): the body side it names
  (right, left, both, or an unspecified side), whether it is an unspecified, "other" or
  "with" / "without" variant, whether c has a description at all; and the side m names,
  with whether the two agree or conflict. ICD-10-CM spells laterality and these defaults in
  its leaves ('hemiparesia derecha' is G81.91, not G81.94), where the bi-encoder's scores of
  sibling leaves differ by little.

The artifact is a directory (no pickle): ``ranker.json`` (kind, model type, features, the
settings and artifacts it was trained with, calibration, thresholds, metrics, data hashes),
and the model: ``model.txt`` (LightGBM's own text format) or the coefficients inside
``ranker.json`` (logistic regression). Its ``model_hash`` is a SHA-256 of those files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import scipy.sparse as sp

from clinlinker_spark.errors import ArtifactError, ConfigError
from clinlinker_spark.index import TerminologyIndex

if TYPE_CHECKING:  # pragma: no cover
    from clinlinker_spark.candidates import Candidate
    from clinlinker_spark.linker import Linker

log = logging.getLogger(__name__)

RANKER_FILE = "ranker.json"
MODEL_FILE = "model.txt"
RANKER_KIND = "clinlinker-ranker"
RANKER_FORMAT = 1
MODEL_TYPES = ("lightgbm", "logistic")

FEATURES: tuple[str, ...] = (
    "dense", "dense_rank", "dense_gap",
    "dense_hits", "dense_hits_share", "category_hits_share",
    "lexical", "lexical_rank", "lexical_gap",
    "rerank", "rerank_rank", "rerank_gap",
    "exact", "token_jaccard", "length_ratio", "mention_tokens",
    "term_mentions", "code_mentions", "exact_share", "exact_text_mentions", "sibling_share",
    "is_main_term", "term_is_mention", "code_terms",
    "is_leaf", "depth", "has_ancestor", "has_descendant",
    "mention_side", "candidate_side", "side_agrees", "side_conflicts",
    "says_unspecified", "says_other", "says_without", "says_with", "has_description",
)
RERANK_FEATURES = ("rerank", "rerank_rank", "rerank_gap")
# longest parent chain followed for the ancestor / descendant features
MAX_DEPTH = 12

# Sides, as the side features code them
SIDE_NONE, SIDE_RIGHT, SIDE_LEFT, SIDE_BOTH, SIDE_UNSPECIFIED = 0, 1, 2, 3, 4
_RIGHT = re.compile(r"\b(derech[oa]s?|dcha|dcho|od|right)\b")
_LEFT = re.compile(r"\b(izquierd[oa]s?|izq|izda|izdo|oi|left)\b")
_BOTH = re.compile(r"\b(bilateral(es)?|ambos|ambas|both)\b")
_UNSPECIFIED_SIDE = re.compile(
    r"\bunspecified (side|eye|ear|foot|hand|leg|arm|lower limb|upper limb|limb|knee|hip|"
    r"shoulder|elbow|wrist|ankle|femur|tibia|fibula|humerus|radius|ulna|kidney|ureter|breast|"
    r"lung|ovary|fallopian tube|testis|eyelid|orbit|lacrimal)\b"
    r"|\blateralidad no especificada\b")
_SAYS = {
    "says_unspecified": re.compile(r"\b(unspecified|nos|not specified|no especificad[oa]s?)\b"),
    "says_other": re.compile(r"\b(other|otros|otras|otra|otro)\b"),
    "says_without": re.compile(r"\b(without|not intractable|not having achieved|sin)\b"),
    "says_with": re.compile(r"\b(with|con)\b"),
}


def side_of(text_norm: str) -> int:
    """The body side a normalised mention or description names: :data:`SIDE_RIGHT`,
    :data:`SIDE_LEFT`, :data:`SIDE_BOTH` (both named, or bilateral), :data:`SIDE_UNSPECIFIED`
    (an ICD-10-CM "unspecified side" leaf) or :data:`SIDE_NONE`."""
    if _UNSPECIFIED_SIDE.search(text_norm):
        return SIDE_UNSPECIFIED
    right, left = bool(_RIGHT.search(text_norm)), bool(_LEFT.search(text_norm))
    if _BOTH.search(text_norm) or (right and left):
        return SIDE_BOTH
    return SIDE_RIGHT if right else SIDE_LEFT if left else SIDE_NONE


# --------------------------------------------------------------------------------------------
# Features


class _IndexStats:
    """Per-index lookups the features need, computed once per index object: per-row arrays of
    every feature that depends only on the (term, code) row, integer ids of the codes and their
    parents (for the hierarchy features), each row's word tokens as a sparse 0/1 matrix (for
    the token Jaccard), and the row of each (code, term) and (position, code)."""

    def __init__(self, index: TerminologyIndex):
        rows = index.rows
        self.index = index
        counts = rows["mention_count"].to_numpy(np.int64)
        positions = rows["position"].to_numpy(np.int64)
        keys = rows["code_key"].astype(str).tolist()
        self.text_mentions = np.bincount(positions, weights=counts,
                                         minlength=len(index.texts)).astype(np.int64)
        self.row_mentions = counts
        codes = index.codes
        parent = dict(zip(codes["code_key"].astype(str), codes["parent_key"].astype(str)))
        code_mentions = dict(zip(codes["code_key"], codes["mention_count"].astype(int)))
        code_terms = dict(zip(codes["code_key"], codes["n_terms"].astype(int)))
        is_leaf = dict(zip(codes["code_key"], codes["is_leaf"].astype(bool)))
        depth = dict(zip(codes["code_key"], codes["depth"].astype(int)))
        family: dict[str, int] = {}
        for key, up in parent.items():
            if up:
                family[up] = family.get(up, 0) + code_mentions.get(key, 0)

        def sibling_share(key: str) -> float:
            total = family.get(parent.get(key, ""), 0)
            return code_mentions.get(key, 0) / total if total else 0.0

        # each code's description: its main terms (a code may have one per terminology)
        main = rows[rows["is_main_term"].to_numpy(bool)]
        described: dict[str, list[str]] = {}
        for key, term in zip(main["code_key"].astype(str), main["term_norm"].astype(str)):
            described.setdefault(key, []).append(term)
        descriptions = {k: " | ".join(v) for k, v in described.items()}
        code_text: dict[str, list[float]] = {}
        for key in set(keys):
            text = descriptions.get(key, "")
            code_text[key] = [float(side_of(text)) if text else math.nan,
                              *(float(bool(p.search(text))) for p in _SAYS.values()),
                              float(bool(text))]
        n = len(rows)
        term_norms = rows["term_norm"].astype(str).tolist()
        # the row-only features, in the order of ROW_FEATURES
        self.row_features = np.zeros((n, len(ROW_FEATURES)), np.float32)
        self.row_features[:, 0] = np.log1p(counts)
        self.row_features[:, 1] = np.log1p([code_mentions.get(k, 0) for k in keys])
        self.row_features[:, 2] = [sibling_share(k) for k in keys]
        self.row_features[:, 3] = rows["is_main_term"].to_numpy(bool)
        self.row_features[:, 4] = counts > 0
        self.row_features[:, 5] = np.log1p([code_terms.get(k, 0) for k in keys])
        self.row_features[:, 6] = [is_leaf.get(k, True) for k in keys]
        self.row_features[:, 7] = [depth.get(k, 1) for k in keys]
        if n:
            self.row_features[:, 8:] = np.asarray([code_text[k] for k in keys], np.float32)
        self.row_length = np.fromiter((len(t) for t in term_norms), np.float64, n)
        # codes as integer ids, each with its parent's id (-1: none)
        code_ids: dict[str, int] = {}
        for key in [*parent, *parent.values(), *keys]:
            if key and key not in code_ids:
                code_ids[key] = len(code_ids)
        self.n_codes = max(len(code_ids), 1)
        self.parent_id = np.full(len(code_ids) + 1, -1, np.int64)  # [-1] stays -1: no code
        for key, up in parent.items():
            if key and up:
                self.parent_id[code_ids[key]] = code_ids[up]
        self.row_code = np.fromiter((code_ids[k] for k in keys), np.int64, n)
        # each row's word tokens, as ids of a vocabulary of the index's term tokens
        self.vocabulary: dict[str, int] = {}
        token_ids = [[self.vocabulary.setdefault(t, len(self.vocabulary)) for t in _tokens(term)]
                     for term in term_norms]
        self.row_tokens = _binary_rows(token_ids, len(self.vocabulary))
        self.row_n_tokens = np.fromiter((len(t) for t in token_ids), np.float64, n)
        self.row_of_code_term = {(c, t): i for i, (c, t) in enumerate(
            zip(rows["code"].astype(str).tolist(), rows["term"].astype(str).tolist()))}
        # the row of each (text position, code), as sorted position * n_codes + code ids
        position_code = positions * self.n_codes + self.row_code
        self.position_code_order = np.argsort(position_code, kind="stable")
        self.position_code_sorted = position_code[self.position_code_order]

    def row_of_position_code(self, position: np.ndarray, code: np.ndarray) -> np.ndarray:
        """Row of each (text position, code id) pair, -1 where the index has none."""
        wanted = position * self.n_codes + code
        at = np.searchsorted(self.position_code_sorted, wanted)
        at = np.minimum(at, max(len(self.position_code_sorted) - 1, 0))
        if len(self.position_code_sorted) == 0:
            return np.full(len(wanted), -1, np.int64)
        found = (self.position_code_sorted[at] == wanted) & (position >= 0) & (code >= 0)
        return np.where(found, self.position_code_order[at], -1)

    def ancestor_ids(self, code: np.ndarray) -> np.ndarray:
        """Ancestor ids [len(code), MAX_DEPTH] of each code id, nearest first; -1 past the
        root (and for code -1)."""
        out = np.full((len(code), MAX_DEPTH), -1, np.int64)
        current = code
        for d in range(MAX_DEPTH):
            current = self.parent_id[current]  # parent_id[-1] is -1
            out[:, d] = current
            if not (current >= 0).any():
                break
        return out


def _binary_rows(token_ids: Sequence[Sequence[int]], n_tokens: int) -> sp.csr_matrix:
    """0/1 CSR matrix [len(token_ids), n_tokens] with row i set at token_ids[i]."""
    lengths = np.fromiter((len(t) for t in token_ids), np.int64, len(token_ids))
    indptr = np.r_[0, np.cumsum(lengths)]
    indices = np.fromiter((i for t in token_ids for i in t), np.int64, int(indptr[-1]))
    data = np.ones(len(indices), np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(len(token_ids), max(n_tokens, 1)))


# the features that depend only on the candidate's (term, code) row of the index
ROW_FEATURES = ("term_mentions", "code_mentions", "sibling_share", "is_main_term",
                "term_is_mention", "code_terms", "is_leaf", "depth", "candidate_side",
                "says_unspecified", "says_other", "says_without", "says_with",
                "has_description")


def index_stats(index: TerminologyIndex) -> _IndexStats:
    stats = getattr(index, "_ranker_stats", None)
    if stats is None or stats.index is not index:
        stats = _IndexStats(index)
        index._ranker_stats = stats  # type: ignore[attr-defined]
    return stats


def _group_rank(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """1-based rank of each value within its group, highest first (ties: first in order);
    NaN values rank after every number."""
    keyed = np.where(np.isnan(values), -np.inf, values)
    order = np.lexsort((np.arange(len(values)), -keyed, groups))
    ranks = np.empty(len(values), np.float32)
    starts = np.r_[0, np.flatnonzero(np.diff(groups[order])) + 1]
    within = np.arange(len(values)) - np.repeat(starts, np.diff(np.r_[starts, len(values)]))
    ranks[order] = within + 1
    return ranks


def _group_gap(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """The group's best value minus each value (NaN stays NaN)."""
    best = np.full(n_groups, -np.inf)
    np.fmax.at(best, groups, np.where(np.isnan(values), -np.inf, values))
    return (best[groups] - values).astype(np.float32)


def _tokens(text: str) -> frozenset[str]:
    return frozenset(text.replace(",", " ").replace("(", " ").replace(")", " ").split())


def candidate_features(index: TerminologyIndex, texts_norm: Sequence[str],
                       candidates: Sequence[Sequence[Candidate]]) -> np.ndarray:
    """The :data:`FEATURES` of every candidate, float32 [total candidates, len(FEATURES)],
    mentions in order, each mention's candidates in order."""
    stats = index_stats(index)
    sizes = np.fromiter((len(c) for c in candidates), np.int64, len(candidates))
    n = int(sizes.sum())
    out = np.zeros((n, len(FEATURES)), np.float32)
    if n == 0:
        return out
    col = {name: j for j, name in enumerate(FEATURES)}
    n_groups = len(candidates)
    groups = np.repeat(np.arange(n_groups), sizes)
    flat = [c for cands in candidates for c in cands]
    row_of = stats.row_of_code_term
    rows = np.fromiter((row_of.get((c.code, c.term), -1) for c in flat), np.int64, n)
    known = rows >= 0
    code = np.where(known, stats.row_code[np.where(known, rows, 0)], -1)

    _add_text_features(out, col, stats, texts_norm, flat, groups, n_groups, rows)
    _add_exact_text_features(out, col, index, stats, texts_norm, groups, n_groups, code)
    _add_hierarchy_features(out, col, stats, groups, known, code)
    _add_row_and_side_features(out, col, stats, texts_norm, groups, rows)
    _add_score_features(out, col, flat, groups, n_groups)
    _add_support_features(out, col, stats, flat, groups, n_groups, code)
    return out


def _add_text_features(out: np.ndarray, col: dict[str, int], stats: _IndexStats,
                       texts_norm: Sequence[str], flat: Sequence[Candidate], groups: np.ndarray,
                       n_groups: int, rows: np.ndarray) -> None:
    """Text: exact match, token Jaccard, length ratio, mention tokens (``rows``: each
    candidate's index row, -1 where the index has none)."""
    n = len(flat)
    known = rows >= 0
    safe_rows = np.where(known, rows, 0)
    out[:, col["exact"]] = np.fromiter((c.exact for c in flat), np.float32, n)
    vocabulary = stats.vocabulary
    mention_tokens = [_tokens(t) for t in texts_norm]
    n_tokens = np.fromiter((len(t) for t in mention_tokens), np.float64, n_groups)
    query = _binary_rows([[vocabulary[t] for t in tokens if t in vocabulary]
                          for tokens in mention_tokens], stats.row_tokens.shape[1])
    shared = np.asarray(query[groups].multiply(stats.row_tokens[safe_rows]).sum(axis=1),
                        np.float64).reshape(-1)
    union = n_tokens[groups] + stats.row_n_tokens[safe_rows] - shared
    jaccard = np.divide(shared, union, out=np.zeros(n), where=union > 0)
    out[:, col["token_jaccard"]] = np.where(known, jaccard, 0.0)
    length = np.where(known, stats.row_length[safe_rows],
                      np.fromiter((len(c.term) for c in flat), np.float64, n))
    text_length = np.fromiter((len(t) + 1 for t in texts_norm), np.float64, n_groups)
    out[:, col["length_ratio"]] = np.log((length + 1) / text_length[groups])
    out[:, col["mention_tokens"]] = n_tokens[groups]


def _add_exact_text_features(out: np.ndarray, col: dict[str, int], index: TerminologyIndex,
                             stats: _IndexStats, texts_norm: Sequence[str], groups: np.ndarray,
                             n_groups: int, code: np.ndarray) -> None:
    """The training mentions of the mention's exact text: how many, and the share of them
    that carry the candidate's code (``code``: its code id, -1 where unknown)."""
    exact_position = np.fromiter((index.position_of(t) for t in texts_norm), np.int64,
                                 n_groups)
    exact_total = np.where(exact_position >= 0,
                           stats.text_mentions[np.maximum(exact_position, 0)], 0)
    exact_row = stats.row_of_position_code(exact_position[groups], code)
    total = exact_total[groups].astype(np.float64)
    share = np.divide(stats.row_mentions[np.maximum(exact_row, 0)], total,
                      out=np.zeros(len(code)), where=(exact_row >= 0) & (total > 0))
    out[:, col["exact_share"]] = share
    out[:, col["exact_text_mentions"]] = np.log1p(exact_total)[groups]


def _add_hierarchy_features(out: np.ndarray, col: dict[str, int], stats: _IndexStats,
                            groups: np.ndarray, known: np.ndarray, code: np.ndarray) -> None:
    """Hierarchy within the list: whether an ancestor, or a descendant, of the candidate's
    code is among the other candidates of its mention."""
    ancestors = stats.ancestor_ids(code)
    has_up = ancestors >= 0
    offset = groups[:, None] * stats.n_codes
    in_list = np.unique((groups * stats.n_codes + code)[known])
    out[:, col["has_ancestor"]] = (np.isin(offset + ancestors, in_list) & has_up).any(axis=1)
    above = np.unique((offset + ancestors)[has_up])
    out[:, col["has_descendant"]] = known & np.isin(groups * stats.n_codes + code, above)


def _add_support_features(out: np.ndarray, col: dict[str, int], stats: _IndexStats,
                          flat: Sequence[Candidate], groups: np.ndarray, n_groups: int,
                          code: np.ndarray) -> None:
    """The code's support among the bi-encoder's hits: how many carry it, its share of the
    hits that the mention's candidates carry, and the share of its category (its root in the
    hierarchy; itself without one)."""
    n = len(flat)
    hits = np.fromiter((c.dense_hits for c in flat), np.float64, n)
    totals = np.bincount(groups, weights=hits, minlength=n_groups)[groups]
    out[:, col["dense_hits"]] = hits
    out[:, col["dense_hits_share"]] = np.divide(hits, totals, out=np.zeros(n), where=totals > 0)
    ancestors = stats.ancestor_ids(code)
    depth = (ancestors >= 0).sum(axis=1)
    root = np.where(depth > 0, ancestors[np.arange(n), np.maximum(depth - 1, 0)], code)
    known = root >= 0
    family = np.where(known, groups * stats.n_codes + root, -1 - np.arange(n))
    _, inverse = np.unique(family, return_inverse=True)
    family_hits = np.bincount(inverse, weights=hits)[inverse]
    out[:, col["category_hits_share"]] = np.divide(family_hits, totals, out=np.zeros(n),
                                                   where=totals > 0)


def _add_row_and_side_features(out: np.ndarray, col: dict[str, int], stats: _IndexStats,
                               texts_norm: Sequence[str], groups: np.ndarray,
                               rows: np.ndarray) -> None:
    """What the candidate's row says (:data:`ROW_FEATURES`; a candidate the index has no row
    for counts as a leaf at depth 1 of unknown side), and the sides of the mention and of
    the code: whether they agree or conflict."""
    known = rows >= 0
    row_values = np.zeros((len(rows), len(ROW_FEATURES)), np.float32)
    row_values[known] = stats.row_features[rows[known]]
    row_values[~known, ROW_FEATURES.index("is_leaf")] = 1.0
    row_values[~known, ROW_FEATURES.index("depth")] = 1.0
    row_values[~known, ROW_FEATURES.index("candidate_side")] = np.nan
    for j, name in enumerate(ROW_FEATURES):
        out[:, col[name]] = row_values[:, j]
    mention_side = np.asarray([side_of(t) for t in texts_norm], np.float32)[groups]
    candidate_side = out[:, col["candidate_side"]]
    named = (mention_side > SIDE_NONE) & (mention_side < SIDE_UNSPECIFIED)
    sided = (candidate_side > SIDE_NONE) & (candidate_side < SIDE_UNSPECIFIED)
    out[:, col["mention_side"]] = mention_side
    out[:, col["side_agrees"]] = named & (candidate_side == mention_side)
    out[:, col["side_conflicts"]] = named & sided & (candidate_side != mention_side)


def _add_score_features(out: np.ndarray, col: dict[str, int], flat: Sequence[Candidate],
                        groups: np.ndarray, n_groups: int) -> None:
    """Retrieval scores (bi-encoder, lexical, cross-encoder; NaN where missing), each with its
    rank among the mention's candidates and its gap to the best."""
    n = len(flat)
    nan = math.nan
    dense = np.fromiter((c.retrieval_score for c in flat), np.float64, n)
    lexical = np.fromiter((nan if c.lexical_score is None else c.lexical_score
                           for c in flat), np.float64, n)
    rerank = np.fromiter((nan if c.rerank_score is None else c.rerank_score
                          for c in flat), np.float64, n)
    for name, values in (("dense", dense), ("lexical", lexical), ("rerank", rerank)):
        out[:, col[name]] = values
        out[:, col[f"{name}_rank"]] = np.where(np.isnan(values), np.nan,
                                               _group_rank(values, groups))
        out[:, col[f"{name}_gap"]] = _group_gap(values, groups, n_groups)


# --------------------------------------------------------------------------------------------
# Calibration


@dataclass(frozen=True)
class Calibration:
    """Isotonic map from the top candidate's raw confidence (its softmax share of the ranker
    scores of its list) to the probability that it is right: piecewise linear through
    (``x``, ``y``), non-decreasing, clipped to [0, 1]."""

    x: tuple[float, ...]
    y: tuple[float, ...]

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        if not self.x:
            return np.clip(np.asarray(raw, np.float64), 0.0, 1.0)
        return np.clip(np.interp(np.asarray(raw, np.float64), self.x, self.y), 0.0, 1.0)

    @classmethod
    def fit(cls, raw: np.ndarray, correct: np.ndarray) -> Calibration:
        """Isotonic regression of ``correct`` (0/1) on ``raw``; its breakpoints."""
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(np.asarray(raw, np.float64), np.asarray(correct, np.float64))
        return cls(tuple(float(v) for v in iso.X_thresholds_),
                   tuple(float(v) for v in iso.y_thresholds_))


def raw_confidence(scores: np.ndarray) -> float:
    """The top candidate's softmax share of a list's ranker scores (``scores`` best first)."""
    if len(scores) == 0:
        return 0.0
    shifted = np.exp(scores - scores.max())
    return float(shifted[0] / shifted.sum())


# --------------------------------------------------------------------------------------------
# The model


@dataclass
class Ranker:
    """A loaded ranker directory: scores candidates, orders them, calibrates the top one."""

    path: Path
    spec: dict[str, Any]
    model_hash: str
    booster: Any = None  # lightgbm.Booster (model type lightgbm)
    coefficients: np.ndarray | None = None  # logistic: [features], with the intercept below
    intercept: float = 0.0
    means: np.ndarray | None = None  # logistic: feature standardisation
    scales: np.ndarray | None = None
    calibration: Calibration = field(default_factory=lambda: Calibration((), ()))
    # LightGBM prediction threads; 0: its default (every core, which oversubscribes a Spark
    # executor running one task per core)
    num_threads: int = 0

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.spec["features"])

    @property
    def uses_rerank(self) -> bool:
        return bool(set(RERANK_FEATURES) & set(self.features))

    @classmethod
    def load(cls, path: str | Path, num_threads: int = 0) -> Ranker:
        """The ranker directory ``path``; ``num_threads``: LightGBM's prediction threads
        (0: its default)."""
        p = Path(path)
        spec_file = p / RANKER_FILE
        if not spec_file.is_file():
            raise ArtifactError(f"{p} is not a ranker directory: no {RANKER_FILE} "
                                "(clinlinker train-ranker writes one)")
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        if spec.get("kind") != RANKER_KIND or spec.get("format_version") != RANKER_FORMAT:
            raise ArtifactError(f"{spec_file}: not a {RANKER_KIND} of format {RANKER_FORMAT}")
        unknown = set(spec["features"]) - set(FEATURES)
        if unknown:
            raise ArtifactError(f"{spec_file}: features this version does not compute: "
                                f"{sorted(unknown)}")
        calibration = Calibration(tuple(spec["calibration"]["x"]),
                                  tuple(spec["calibration"]["y"]))
        ranker = cls(p, spec, ranker_hash(p), calibration=calibration,
                     num_threads=max(0, int(num_threads)))
        if spec["model_type"] == "lightgbm":
            import lightgbm

            model_file = p / MODEL_FILE
            if not model_file.is_file():
                raise ArtifactError(f"ranker {p}: no {MODEL_FILE}")
            ranker.booster = lightgbm.Booster(model_str=model_file.read_text(encoding="utf-8"))
        elif spec["model_type"] == "logistic":
            model = spec["logistic"]
            ranker.coefficients = np.asarray(model["coefficients"], np.float64)
            ranker.intercept = float(model["intercept"])
            ranker.means = np.asarray(model["means"], np.float64)
            ranker.scales = np.asarray(model["scales"], np.float64)
        else:
            raise ArtifactError(f"{spec_file}: unknown model_type {spec['model_type']!r}")
        return ranker

    def check_compatible(self, linker: Linker) -> None:
        """The ranker must see the features it was trained on: an error when it uses the
        cross-encoder's score and the linker has no re-ranker (or the reverse), or when the
        bi-encoder differs from the one it was trained with (its scores would mean something
        else)."""
        trained = self.spec.get("trained_with", {})
        encoder = trained.get("model_version", "")
        if encoder and encoder != linker.encoder.model_hash:
            raise ConfigError(
                f"ranker {self.path} was trained with bi-encoder {encoder[:12]}, the job's is "
                f"{linker.encoder.model_hash[:12]}: train a ranker for this encoder "
                "(clinlinker train-ranker)")
        if self.uses_rerank and linker.reranker is None:
            raise ConfigError(f"ranker {self.path} uses the cross-encoder's score: configure "
                              "reranker.path, or train a ranker without it")
        if not self.uses_rerank and linker.reranker is not None:
            raise ConfigError(f"ranker {self.path} was trained without a cross-encoder: "
                              "remove reranker.path or train a ranker with it")
        retrievers = trained.get("retrievers")
        if retrievers and sorted(retrievers) != sorted(linker.linking.retrievers):
            raise ConfigError(f"ranker {self.path} was trained with retrievers {retrievers}; "
                              f"the job has {list(linker.linking.retrievers)}")
        index = trained.get("index_version", "")
        if index and index != linker.index.content_hash:
            log.warning("ranker %s was trained against index %s, the job's is %s: its "
                        "confidence may be off until it is trained again", self.path.name,
                        index[:12], linker.index.content_hash[:12])

    def score_matrix(self, features: np.ndarray) -> np.ndarray:
        """Ranker scores [n] of feature rows [n, len(FEATURES)] (all features computed)."""
        if len(features) == 0:
            return np.zeros(0, np.float64)
        picked = features[:, [FEATURES.index(f) for f in self.features]]
        if self.booster is not None:
            threads = {"num_threads": self.num_threads} if self.num_threads else {}
            return np.asarray(self.booster.predict(picked, **threads), np.float64)
        assert self.coefficients is not None and self.means is not None
        x = np.nan_to_num(picked.astype(np.float64), nan=0.0)
        return ((x - self.means) / self.scales) @ self.coefficients + self.intercept

    def rank(self, index: TerminologyIndex, texts_norm: Sequence[str],
             candidates: Sequence[Sequence[Candidate]], keep: int | None = None
             ) -> tuple[list[list[Candidate]], list[float | None]]:
        """Each mention's candidates ordered by ranker score (ties: the incoming order), with
        ``ranker_score`` set, the first ``keep`` of them (all when None), and the calibrated
        confidence of the first (None when a mention has no candidate). The confidence is
        computed over the whole list, whatever ``keep``."""
        from clinlinker_spark.candidates import Candidate, gc_paused

        scores = self.score_matrix(candidate_features(index, texts_norm, candidates))
        sizes = np.fromiter((len(c) for c in candidates), np.int64, len(candidates))
        groups = np.repeat(np.arange(len(candidates)), sizes)
        # every list ordered at once: by mention, then score (best first), then incoming order
        order = np.lexsort((np.arange(len(scores)), -scores, groups))
        starts = np.r_[0, np.cumsum(sizes)[:-1]] if len(sizes) else np.zeros(0, np.int64)
        # the top candidate's softmax share of its list's scores (0 for an empty list)
        raws = np.zeros(len(candidates))
        filled = sizes > 0
        if filled.any():
            ordered_scores = scores[order]
            best = np.repeat(ordered_scores[starts[filled]], sizes[filled])
            raws[filled] = 1.0 / np.add.reduceat(np.exp(ordered_scores - best), starts[filled])
        flat = [c for cands in candidates for c in cands]
        values = scores.tolist()
        ordered = order.tolist()
        ranked: list[list[Candidate]] = []
        with gc_paused():
            for start, size in zip(starts.tolist(), sizes.tolist()):
                picked = ordered[start:start + (size if keep is None else min(size, keep))]
                ranked.append([Candidate(c.code, c.term, c.retrieval_score, c.rerank_score,
                                         c.exact, c.lexical_score, values[j], c.dense_hits)
                               for j in picked for c in (flat[j],)])
        calibrated = self.calibration(raws)
        confidences = [None if not size else float(p)
                       for size, p in zip(sizes.tolist(), calibrated)]
        return ranked, confidences


def ranker_hash(path: Path) -> str:
    """SHA-256 of a ranker directory's files (ranker.json, model.txt when present)."""
    digest = hashlib.sha256()
    for name in (RANKER_FILE, MODEL_FILE):
        f = path / name
        if f.is_file():
            digest.update(name.encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()


__all__ = [
    "Calibration", "FEATURES", "MODEL_TYPES", "RERANK_FEATURES", "Ranker",
    "candidate_features", "raw_confidence", "ranker_hash", "side_of",
]
