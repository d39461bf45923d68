"""Training data: terms and gold training mentions, and the synonym pairs built from them.

SapBERT trains on pairs of names of one concept. Here a code's names are its dictionary terms
(a CIE-10 description, gazetteer synonyms) and the distinct texts that annotators gave it in
training documents. CIE-10 has one description per code, so its pairs are mention-description
and mention-mention pairs of the same code.

Rules of :func:`build_pairs`:

- strings are compared normalised (:func:`~clinlinker_spark.text.normalize_text`); a pair is
  two *different* normalised strings of one code (never a string with itself);
- composite mentions ("A+B") and NO_CODE mentions name no single code and are left out, and
  so are dictionary rows whose code is a no-code marker or holds a ``+``;
- a code gives all its pairs up to ``max_pairs_per_code``; above it a seeded sample of that
  many (so frequent codes do not dominate);
- the result is deterministic: it depends on the data and the seed only, not on row order.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clinlinker_spark.config import GOLD_FORMATS, TerminologyConfig, TerminologySourceConfig
from clinlinker_spark.corpora import NO_CODE_MARKERS, clean_mask, read_gold, split_by_document
from clinlinker_spark.errors import InputDataError
from clinlinker_spark.text import normalize_code, normalize_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    """Two different normalised strings that name the same code."""

    text_a: str
    text_b: str
    code: str  # code_key (normalize_code)


@dataclass
class TrainingData:
    """``terms``: dictionary rows (code, code_key, term, term_norm, source);
    ``mentions``: gold training mentions (the corpora mention table plus ``source``)."""

    terms: pd.DataFrame
    mentions: pd.DataFrame
    source_hashes: dict[str, str]


def path_sha256(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder's files (relative names + bytes, sorted)."""
    p = Path(path)
    digest = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    if not files:
        raise InputDataError(f"training data path {p} does not exist or holds no file")
    for f in files:
        digest.update((f.name if f == p else str(f.relative_to(p))).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def load_training_data(sources: Sequence[TerminologySourceConfig]) -> TrainingData:
    """Read every source: dictionary formats into ``terms``, gold formats into ``mentions``.

    Gold sources keep their ``labels`` and the ``split`` side of the document-level split
    (``split_by_document(test_fraction, split_seed)``); a ``test`` side is refused by the
    config. Source files are hashed for the training card.
    """
    if not sources:
        raise InputDataError("no training data sources (data.sources is empty)")
    from clinlinker_spark.terminology import load_terminology

    hashes = {}
    for src in sources:
        hashes[f"{src.format}:{src.path}:{src.split}"] = path_sha256(src.path)
    dictionary = [s for s in sources if s.format not in GOLD_FORMATS]
    gold = [s for s in sources if s.format in GOLD_FORMATS]
    if dictionary:
        terms = load_terminology(TerminologyConfig(name="training", sources=tuple(dictionary)))
        terms = terms[terms["mention_count"] == 0][["code", "code_key", "term", "term_norm",
                                                     "source"]]
    else:
        terms = pd.DataFrame(columns=["code", "code_key", "term", "term_norm", "source"])
    frames = [_read_gold_source(s) for s in gold]
    mentions = (pd.concat(frames, ignore_index=True) if frames
                else pd.DataFrame(columns=["text", "code", "is_composite", "is_no_code",
                                           "source"]))
    log.info("training data: %d dictionary rows, %d gold mentions from %d source(s)",
             len(terms), len(mentions), len(sources))
    return TrainingData(terms.reset_index(drop=True), mentions, hashes)


def _read_gold_source(src: TerminologySourceConfig) -> pd.DataFrame:
    mentions = read_gold(src.path, src.format, text_dir=src.text_dir or None)
    if src.labels:
        mentions = mentions[mentions["label"].isin(src.labels)]
        if mentions.empty:
            raise InputDataError(f"{src.path}: no mention has label(s) {', '.join(src.labels)}")
    if src.split != "all":
        train, test = split_by_document(mentions, src.test_fraction, src.split_seed)
        mentions = train if src.split == "train" else test
    mentions = mentions.copy()
    mentions["source"] = src.name or Path(src.path).stem
    return mentions.reset_index(drop=True)


def clean_mention_rows(mentions: pd.DataFrame) -> pd.DataFrame:
    """Distinct (term_norm, code_key) of the clean mentions (one real code, non-empty text).

    Columns: term_norm, code_key, count (mentions of the group). Sorted, deterministic.
    """
    if mentions.empty:
        return pd.DataFrame({"term_norm": [], "code_key": [], "count": []})
    clean = mentions[clean_mask(mentions)]
    frame = pd.DataFrame({
        "term_norm": clean["text"].fillna("").astype(str).map(normalize_text),
        "code_key": clean["code"].astype(str).map(normalize_code),
    })
    frame = frame[(frame["term_norm"] != "") & (frame["code_key"] != "")]
    out = frame.groupby(["term_norm", "code_key"]).size().rename("count").reset_index()
    return out.sort_values(["code_key", "term_norm"], kind="mergesort").reset_index(drop=True)


def _usable_code(code_key: str) -> bool:
    return bool(code_key) and "+" not in code_key and code_key.upper() not in NO_CODE_MARKERS


def strings_by_code(
    terms: pd.DataFrame, mentions: pd.DataFrame, include_dictionary: bool = True
) -> dict[str, list[str]]:
    """Every code's distinct normalised strings (dictionary terms + clean mention texts),
    sorted; codes in sorted order. Composite / NO_CODE mentions and codes are left out."""
    groups: dict[str, set[str]] = {}
    if include_dictionary and not terms.empty:
        keys = terms["code_key"] if "code_key" in terms else terms["code"].map(normalize_code)
        norms = (terms["term_norm"] if "term_norm" in terms
                 else terms["term"].astype(str).map(normalize_text))
        for key, text in zip(keys.astype(str), norms.astype(str), strict=True):
            if _usable_code(key) and text:
                groups.setdefault(key, set()).add(text)
    rows = clean_mention_rows(mentions)
    for key, text in zip(rows["code_key"], rows["term_norm"], strict=True):
        if _usable_code(key):
            groups.setdefault(key, set()).add(text)
    return {key: sorted(groups[key]) for key in sorted(groups)}


def build_pairs(
    terms: pd.DataFrame,
    mentions: pd.DataFrame,
    max_pairs_per_code: int = 50,
    seed: int = 13,
    include_dictionary_pairs: bool = True,
) -> list[Pair]:
    """Synonym pairs of every code with at least two distinct strings (module rules above).

    ``terms``: dictionary rows with code (or code_key) and term (or term_norm); ``mentions``:
    the corpora mention table (text, code, is_composite, is_no_code). Dictionary terms always
    pair with mention texts; ``include_dictionary_pairs=False`` drops pairs of two dictionary
    terms. Returns pairs ordered by code, then by pair; the seed draws the sample of a code
    with more than ``max_pairs_per_code`` pairs (0 = no cap).
    """
    dictionary_only: set[tuple[str, str]] = set()
    if not include_dictionary_pairs and not terms.empty:
        mention_rows = clean_mention_rows(mentions)
        mentioned = set(zip(mention_rows["code_key"], mention_rows["term_norm"], strict=True))
        dict_groups = strings_by_code(terms, mentions.iloc[0:0], True)
        dictionary_only = {(k, t) for k, ts in dict_groups.items() for t in ts
                           if (k, t) not in mentioned}
    groups = strings_by_code(terms, mentions, True)
    rng = np.random.default_rng(seed)
    pairs: list[Pair] = []
    n_capped = 0
    for code, strings in groups.items():
        if len(strings) < 2:
            continue
        combos = [
            (a, b) for a, b in itertools.combinations(strings, 2)
            if not ((code, a) in dictionary_only and (code, b) in dictionary_only)
        ]
        if max_pairs_per_code and len(combos) > max_pairs_per_code:
            keep = np.sort(rng.choice(len(combos), size=max_pairs_per_code, replace=False))
            combos = [combos[i] for i in keep]
            n_capped += 1
        pairs.extend(Pair(a, b, code) for a, b in combos)
    log.info("synonym pairs: %d from %d codes with 2+ strings (%d codes capped at %d)",
             len(pairs), sum(1 for s in groups.values() if len(s) >= 2), n_capped,
             max_pairs_per_code)
    return pairs


def pairs_sha256(pairs: Iterable[Pair]) -> str:
    """SHA-256 of a pair list (order included): identifies the exact training input."""
    digest = hashlib.sha256()
    for p in pairs:
        digest.update(f"{p.code}\t{p.text_a}\t{p.text_b}\n".encode())
    return digest.hexdigest()


def pair_stats(pairs: Sequence[Pair]) -> dict[str, int]:
    """Counts of a pair list (for logs and cards; no text)."""
    codes = {p.code for p in pairs}
    texts = {t for p in pairs for t in (p.text_a, p.text_b)}
    return {"pairs": len(pairs), "codes": len(codes), "distinct_texts": len(texts)}


__all__ = [
    "Pair", "TrainingData", "build_pairs", "clean_mention_rows", "load_training_data",
    "pair_stats", "pairs_sha256", "path_sha256", "strings_by_code",
]
