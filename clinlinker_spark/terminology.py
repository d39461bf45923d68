"""Terminology tables: codes with their terms (descriptions, synonyms, training mentions).

Every reader returns a pandas DataFrame with the columns of :data:`TERMINOLOGY_COLUMNS`:

============  =======  ====================================================================
column        dtype    meaning
============  =======  ====================================================================
code          str      the code as the source writes it (``"X399"``, ``"n44.8"``, SNOMED id)
code_key      str      ``normalize_code(code)``: what codes are compared and grouped by
term          str      the term as the source writes it
term_norm     str      ``normalize_text(term)``: what is embedded and matched
is_main_term  bool     the code's preferred term (gazetteer ``mainterm``), False for synonyms
semantic_tag  str      SNOMED semantic tag (``"disorder"``, ...) or ``""`` when unknown
source        str      source name; after :func:`build_terminology`, distinct names joined by
                       ``"|"`` when several sources give the same (code, term)
mention_count int64    how many gold training mentions carry this (term_norm, code_key);
                       0 for dictionary terms. The exact-match prior of the linker uses it.
parent_key    str      ``code_key`` of the code's parent in the source's hierarchy (ICD-10:
                       ``c56`` for ``C56.9``); ``""`` for a top-level code or a source
                       without a hierarchy
============  =======  ====================================================================

Codes as a coder writes them: after :func:`build_terminology` each ``code_key`` has one
spelling in ``code``, the first one a dictionary source gives (sources in order), else the
first training mention's. The ICD-10 readers (:func:`read_cie10`, :func:`read_icd10cm`) write
codes upper case with a dot after the three-character category (``C56.9``, ``S22.49XA``), the
spelling of ICD-10-CM and CIE-10-ES, whatever the file or a corpus wrote (``C569``,
``c56.9``). Chapters and blocks (``C00-D49``, ``C64-C68``) are never codes of a terminology:
they cannot be assigned, so the readers leave them out.

A reader's result keeps, as its index, the 0-based data row of the file each row came from
(header not counted), so :func:`build_terminology` can name bad rows by their place in the
file even after a reader filtered rows (``read_cie10``).

ClinLinker indexes the terminology plus the training mentions as synonyms: combine
:func:`read_cie10` / :func:`read_gazetteer` / :func:`read_table` with
:func:`terms_from_mentions` in :func:`build_terminology`, or list the sources in a
:class:`~clinlinker_spark.config.TerminologyConfig` and call :func:`load_terminology`.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from clinlinker_spark.config import TerminologyConfig, TerminologySourceConfig
from clinlinker_spark.corpora import (
    GOLD_READER_FORMATS, clean_mask, read_gold, split_by_document,
)
from clinlinker_spark.errors import InputDataError
from clinlinker_spark.text import normalize_code, normalize_text

logger = logging.getLogger(__name__)

TERMINOLOGY_COLUMNS: list[str] = [
    "code",
    "code_key",
    "term",
    "term_norm",
    "is_main_term",
    "semantic_tag",
    "source",
    "mention_count",
    "parent_key",
]

_TRUE = frozenset({"1", "true", "t", "yes", "y"})
_FALSE = frozenset({"0", "false", "f", "no", "n", ""})
_DELIMITED = {".csv": ",", ".tsv": "\t", ".txt": None}
_PARQUET = frozenset({".parquet", ".pq"})
ON_BAD_ROWS = ("error", "skip")


# --------------------------------------------------------------------------------------------
# Readers


def read_gazetteer(path: str | Path, source: str | None = None) -> pd.DataFrame:
    """Read a DisTEMIST / MedProcNER / SympTEMIST gazetteer TSV (SNOMED-CT terms).

    The file has a header; ``code`` and ``term`` are required, ``semantic_tag`` and
    ``mainterm`` (``1``/``0`` or ``True``/``False``, any case) are used when present and other
    columns (``language``) are ignored. Without a ``mainterm`` column the first term of each
    code is taken as its main term. ``source`` defaults to the file stem.
    """
    p = _existing(path)
    raw = _read_tsv_literal(p)
    _require(raw, ["code", "term"], p)
    if "mainterm" in raw.columns:
        is_main = _parse_bool(raw["mainterm"], "mainterm", p)
    else:
        is_main = None
    return _make_table(
        code=raw["code"],
        term=raw["term"].map(_unquote),
        is_main_term=is_main,
        semantic_tag=raw["semantic_tag"] if "semantic_tag" in raw.columns else None,
        source=source or p.stem,
        index=raw.index,
    )


def read_table(
    path: str | Path,
    code_column: str = "code",
    term_column: str = "term",
    semantic_tag_column: str = "",
    main_term_column: str = "",
    source: str | None = None,
    parent_column: str = "",
) -> pd.DataFrame:
    """Read any code/term table: ``.csv``, ``.tsv``, ``.txt`` (delimiter sniffed) or Parquet.

    Delimited files are read with standard CSV quoting, every column as text (so codes keep
    leading zeros). ``semantic_tag_column`` and ``main_term_column`` are optional (``""``:
    absent); without a main-term column the first term of each code is its main term.
    ``source`` defaults to the file stem. ``parent_column`` (optional) holds each code's
    parent code (a hierarchy such as the official CIE-10-ES tables give). A named column the
    file lacks raises :class:`InputDataError` naming the column, the file and the columns it
    has.
    """
    p = _existing(path)
    suffix = p.suffix.lower()
    if suffix in _PARQUET:
        try:
            raw = pd.read_parquet(p)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise InputDataError(f"{p}: not a readable Parquet file ({exc})") from None
        raw.columns = [str(c) for c in raw.columns]
    elif suffix in _DELIMITED:
        sep = _DELIMITED[suffix] or _sniff_delimiter(p)
        try:
            raw = pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        except pd.errors.EmptyDataError:
            raise InputDataError(f"{p}: empty file") from None
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise InputDataError(f"{p}: not a readable delimited UTF-8 file ({exc})") from None
        raw.columns = [str(c).strip() for c in raw.columns]
    else:
        raise InputDataError(
            f"{p}: unsupported terminology table extension {suffix or '(none)'}; "
            "use .csv, .tsv, .txt or .parquet"
        )
    named = [code_column, term_column] + [
        c for c in (semantic_tag_column, main_term_column, parent_column) if c
    ]
    _require(raw, named, p)
    return _make_table(
        code=_as_text(raw[code_column]),
        term=_as_text(raw[term_column]),
        is_main_term=(
            _parse_bool(_as_text(raw[main_term_column]), main_term_column, p)
            if main_term_column
            else None
        ),
        semantic_tag=_as_text(raw[semantic_tag_column]) if semantic_tag_column else None,
        source=source or p.stem,
        index=raw.index,
        parent=_as_text(raw[parent_column]) if parent_column else None,
    )


def read_cie10(path: str | Path, min_level: int = 2, source: str = "cie10") -> pd.DataFrame:
    """Read the Spanish ICD-10 list (``cie10_es.csv``: code, code_0..code_4, description,
    level, source) keeping rows with ``level >= min_level``.

    Chapters and blocks (``A00-B99``, ``C64-C68``: codes with a ``-``, at any level) are left
    out; level 2 and deeper are categories (``H90``) and subcategories (``G130``). Every kept
    row is a main term (its description). Codes are written as ICD-10 writes them
    (:func:`icd10_spelling`: ``G13.0``); ``parent_key`` is the nearest of code_0..code_4 that
    is a code, not a block.
    """
    p = _existing(path)
    try:
        raw = pd.read_csv(p, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise InputDataError(f"{p}: empty file") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputDataError(f"{p}: not a readable CSV file ({exc})") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    _require(raw, ["code", "description", "level"], p)
    level = pd.to_numeric(raw["level"].str.strip(), errors="coerce")
    if level.isna().any():
        bad = [i for i, v in enumerate(level.isna().tolist()) if v]
        raise InputDataError(f"{p}: column level must be an integer; bad {_rows_text(bad)}")
    is_range = raw["code"].str.contains("-", regex=False)
    kept = raw[(level >= min_level) & ~is_range]
    ancestors = [c for c in ("code_0", "code_1", "code_2", "code_3", "code_4") if c in raw]

    def parent_of(row: pd.Series) -> str:
        for column in reversed(ancestors):
            value = str(row[column]).strip()
            if value and "-" not in value:
                return value
        return ""

    parents = (kept.apply(parent_of, axis=1) if ancestors and len(kept)
               else pd.Series("", index=kept.index))
    logger.info("%s: %d of %d rows at level >= %d (%d chapters and blocks left out)", p,
                len(kept), len(raw), min_level, int((is_range & (level >= min_level)).sum()))
    return _make_table(
        code=kept["code"].map(icd10_spelling),
        term=kept["description"],
        is_main_term=pd.Series(True, index=kept.index),
        semantic_tag=None,
        source=source,
        index=kept.index,
        parent=parents,
    )


def read_icd10cm(source: str = "icd10cm", inclusion_terms: bool = True) -> pd.DataFrame:
    """Read ICD-10-CM (every category and subcategory, with its hierarchy) from the PyPI
    package ``simple-icd-10-cm`` (CMS's public-domain tabular list, English descriptions).

    One main-term row per code (its description) and, with ``inclusion_terms``, one synonym
    row per inclusion term of the code. Chapters and blocks are left out; ``parent_key`` is the
    parent category or subcategory (``""`` for a category, whose parent is a block). Codes are
    spelled as ICD-10-CM writes them (``C56.9``, ``S22.49XA``). Leaf codes are the assignable
    ones in ICD-10-CM; the index derives leaves from ``parent_key``.
    """
    try:
        import simple_icd_10_cm as cm
    except ImportError:  # pragma: no cover - a declared dependency
        raise InputDataError("terminology format icd10cm needs the package simple-icd-10-cm "
                             "(pip install simple-icd-10-cm)") from None
    codes: list[str] = []
    terms: list[str] = []
    main: list[bool] = []
    parents: list[str] = []
    seen: set[str] = set()
    for code in cm.get_all_codes(with_dots=True):
        # a block whose one category has its name (B10, C50, ...) is listed twice under
        # that name, and the package resolves the name to the category: the code is read
        # once, and a parent named as the code itself is that block (no parent)
        if code in seen or not cm.is_category_or_subcategory(code):
            continue
        seen.add(code)
        parent = cm.get_parent(code)
        parent = (parent if parent and parent != code and cm.is_category_or_subcategory(parent)
                  else "")
        names = [cm.get_description(code)]
        if inclusion_terms:
            names += [t for t in cm.get_inclusion_term(code) if t]
        for i, name in enumerate(names):
            codes.append(code)
            terms.append(name)
            main.append(i == 0)
            parents.append(parent)
    logger.info("ICD-10-CM (simple-icd-10-cm): %d codes, %d rows with inclusion terms",
                len(seen), len(codes))
    return _make_table(
        code=pd.Series(codes, dtype=object),
        term=pd.Series(terms, dtype=object),
        is_main_term=pd.Series(main, dtype=bool),
        semantic_tag=None,
        source=source,
        index=pd.RangeIndex(len(codes)),
        parent=pd.Series(parents, dtype=object),
    )


def icd10_spelling(code: str) -> str:
    """An ICD-10 code as ICD-10-CM and CIE-10-ES write it: upper case, a dot after the
    three-character category when there is more (``c569`` -> ``C56.9``, ``S2249XA`` ->
    ``S22.49XA``). Ranges and codes that do not start with a letter and two characters are
    returned stripped and upper case."""
    key = str(code).strip().upper().replace(".", "")
    if len(key) <= 3 or "-" in key or not key[0].isalpha():
        return key
    return f"{key[:3]}.{key[3:]}"


def terms_from_mentions(
    mentions: pd.DataFrame, source: str = "training_mentions"
) -> pd.DataFrame:
    """Gold training mentions as synonyms: one row per (term_norm, code_key).

    Input is the mention table of :mod:`clinlinker_spark.corpora`. Composite and NO_CODE
    mentions are left out (they name no single code), and so are mentions with empty text
    (count logged at WARNING). ``mention_count`` is the number of mentions of the group; the
    row keeps the first mention's original text and code; ``is_main_term`` is False. Rows come
    in order of first appearance.
    """
    missing = [c for c in ("text", "code", "is_composite", "is_no_code") if c not in mentions]
    if missing:
        raise InputDataError(
            f"mention table: missing required column(s) {', '.join(missing)}; "
            f"it has columns {', '.join(map(str, mentions.columns))}"
        )
    clean = mentions[clean_mask(mentions)]
    text = clean["text"].fillna("").astype(str)
    has_text = text.str.strip() != ""
    if not has_text.all():
        logger.warning("terms_from_mentions: %d mention(s) with empty text left out",
                       int((~has_text).sum()))
    clean = clean[has_text]
    frame = pd.DataFrame(
        {
            "code": clean["code"].astype(str).str.strip(),
            "term": clean["text"].astype(str),
        }
    )
    frame["code_key"] = frame["code"].map(normalize_code)
    frame["term_norm"] = frame["term"].map(normalize_text)
    grouped = frame.groupby(["term_norm", "code_key"], sort=False)
    first = grouped.first()
    counts = grouped.size()
    out = _make_table(
        code=first["code"].reset_index(drop=True),
        term=first["term"].reset_index(drop=True),
        is_main_term=pd.Series(False, index=range(len(first))),
        semantic_tag=None,
        source=source,
        index=pd.RangeIndex(len(first)),
        mention_count=pd.Series(counts.to_numpy(), dtype="int64"),
    )
    logger.info(
        "terms_from_mentions: %d of %d mentions usable -> %d (term, code) rows (source %s)",
        len(frame), len(mentions), len(out), source,
    )
    return out


# --------------------------------------------------------------------------------------------
# Building


def build_terminology(
    frames: Iterable[pd.DataFrame], on_bad_rows: str = "error"
) -> pd.DataFrame:
    """Concatenate terminology frames, validate them and merge duplicate (code, term) rows.

    Validation: a row whose code or term is null, empty or only whitespace is bad. With
    ``on_bad_rows="error"`` (default) any bad row raises :class:`InputDataError` naming each
    source, the first 10 row numbers (1-based data rows of the source file when the frame came
    from a reader, else positions in the frame) and the count; with ``"skip"`` they are dropped
    and the count is logged at WARNING.

    Merge: rows with the same ``(code_key, term_norm)`` become one; it keeps the first row's
    ``term`` and first non-empty ``semantic_tag`` and ``parent_key``, sums ``mention_count``,
    ORs ``is_main_term`` and joins the distinct source names with ``"|"`` in order of
    appearance. Each ``code_key`` then gets one spelling in ``code`` and one ``parent_key``
    for all its rows: the first a dictionary row gives (input rows with no training mentions,
    in source order, before duplicates are merged), else the first row's.
    Output order is the order of first appearance (stable); the index is a RangeIndex.
    ``code_key`` and ``term_norm`` are recomputed from ``code`` and ``term``; missing optional
    columns take their defaults (is_main_term False, semantic_tag "", source "", count 0).
    """
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(
            f"on_bad_rows must be one of {', '.join(ON_BAD_ROWS)}; got {on_bad_rows!r}"
        )
    checked: list[pd.DataFrame] = []
    bad_report: list[str] = []
    n_bad = 0
    for i, frame in enumerate(frames):
        table = _conform(frame, i)
        bad = (table["code"].str.strip() == "") | (table["term_norm"] == "")
        if bad.any():
            n_bad += int(bad.sum())
            bad_report.extend(_describe_bad_rows(table, bad, i))
            table = table[~bad]
        checked.append(table)
    if n_bad:
        if on_bad_rows == "error":
            raise InputDataError(
                f"{n_bad} terminology row(s) without a code or a term: {'; '.join(bad_report)}"
            )
        logger.warning("build_terminology: skipped %d row(s) without a code or a term", n_bad)
    if not checked:
        return _empty_table()
    df = pd.concat(checked, ignore_index=True)
    n_in = len(df)
    key = ["code_key", "term_norm"]
    out = df.drop_duplicates(key, keep="first").reset_index(drop=True)
    repeated = df.duplicated(key, keep=False)
    if repeated.any():
        groups = df[repeated].groupby(key, sort=False)
        merged = pd.DataFrame(
            {
                "mention_count": groups["mention_count"].sum(),
                "is_main_term": groups["is_main_term"].any(),
                "source": groups["source"].agg(_join_sources),
                "semantic_tag": groups["semantic_tag"].agg(_first_non_empty),
                "parent_key": groups["parent_key"].agg(_first_non_empty),
            }
        )
        at = pd.MultiIndex.from_frame(out[key])
        hit = at.isin(merged.index)
        rows = merged.reindex(at[hit])
        for column in ("mention_count", "is_main_term", "source", "semantic_tag",
                       "parent_key"):
            out.loc[hit, column] = rows[column].to_numpy()
    out = _one_spelling_per_code(out, df)
    out = out[TERMINOLOGY_COLUMNS].astype(
        {"is_main_term": bool, "mention_count": "int64"}
    )
    logger.info(
        "terminology: %d input rows, %d merged as duplicates, %d rows, %d codes",
        n_in, n_in - len(out), len(out), out["code_key"].nunique(),
    )
    return out


def load_terminology(config: TerminologyConfig, on_bad_rows: str = "error") -> pd.DataFrame:
    """Read every source of ``config`` by its format and :func:`build_terminology` them.

    Formats: ``gazetteer`` (:func:`read_gazetteer`), ``table`` (:func:`read_table` with the
    source's column names), ``cie10`` (:func:`read_cie10` with ``min_level``), ``icd10cm``
    (:func:`read_icd10cm` from its PyPI package; no path), and the gold
    formats ``distemist`` | ``medprocner`` | ``codiesp`` (read with
    :func:`~clinlinker_spark.corpora.read_gold`, kept to ``labels`` when given, then
    :func:`terms_from_mentions`). Each row's source is the source's ``name``, else the file
    stem (``cie10`` for the CIE-10 list).
    """
    if not config.sources:
        raise InputDataError(f"terminology {config.name!r} has no sources")
    frames = [_load_source(src) for src in config.sources]
    table = build_terminology(frames, on_bad_rows=on_bad_rows)
    logger.info(
        "terminology %r%s: %d rows from %d source(s)",
        config.name, f" {config.version}" if config.version else "", len(table), len(frames),
    )
    return table


def terminology_stats(df: pd.DataFrame) -> dict[str, Any]:
    """Counts of a terminology table (JSON-serialisable).

    Keys: ``rows``, ``distinct_codes`` (by code_key), ``distinct_terms`` (by term_norm),
    ``main_terms``, ``mention_rows`` (rows with mention_count > 0), ``mentions`` (sum of
    mention_count) and ``sources``: rows per source name (a merged row counts once for each
    of its ``|``-joined sources).
    """
    sources: dict[str, int] = {}
    for value in df["source"].astype(str):
        for name in value.split("|"):
            sources[name] = sources.get(name, 0) + 1
    return {
        "rows": int(len(df)),
        "distinct_codes": int(df["code_key"].nunique()),
        "distinct_terms": int(df["term_norm"].nunique()),
        "main_terms": int(df["is_main_term"].astype(bool).sum()),
        "mention_rows": int((df["mention_count"] > 0).sum()),
        "mentions": int(df["mention_count"].sum()),
        "sources": sources,
    }


# --------------------------------------------------------------------------------------------
# Helpers


def _load_source(src: TerminologySourceConfig) -> pd.DataFrame:
    name = src.name or None
    if src.format == "gazetteer":
        return read_gazetteer(src.path, source=name)
    if src.format == "table":
        return read_table(
            src.path,
            code_column=src.code_column,
            term_column=src.term_column,
            semantic_tag_column=src.semantic_tag_column,
            main_term_column=src.main_term_column,
            source=name,
            parent_column=src.parent_column,
        )
    if src.format == "cie10":
        return read_cie10(src.path, min_level=src.min_level, source=name or "cie10")
    if src.format == "icd10cm":
        return read_icd10cm(source=name or "icd10cm", inclusion_terms=src.inclusion_terms)
    if src.format in GOLD_READER_FORMATS:
        mentions = read_gold(src.path, src.format)
        if src.labels:
            kept = mentions["label"].isin(src.labels)
            if not kept.any():
                present = sorted(mentions["label"].unique())
                raise InputDataError(
                    f"{src.path}: no mention has label(s) {', '.join(src.labels)}; "
                    f"labels present: {', '.join(present)}"
                )
            mentions = mentions[kept]
        if src.split != "all":
            train, test = split_by_document(mentions, src.test_fraction, src.split_seed)
            mentions = train if src.split == "train" else test
        return terms_from_mentions(mentions, source=name or Path(src.path).stem)
    raise InputDataError(f"unknown terminology source format {src.format!r}")


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputDataError(f"terminology file not found: {p}")
    return p


def _read_tsv_literal(p: Path) -> pd.DataFrame:
    """TSV with a header, every field text, quote characters literal (see corpora)."""
    try:
        raw = pd.read_csv(
            p,
            sep="\t",
            dtype=str,
            keep_default_na=False,
            quoting=csv.QUOTE_NONE,
            encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        raise InputDataError(f"{p}: empty file") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputDataError(f"{p}: not a readable UTF-8 TSV file ({exc})") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    return raw.fillna("")


def _unquote(value: str) -> str:
    """Undo CSV quoting of a whole field (outer quotes, inner quotes doubled)."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        if '"' not in inner.replace('""', ""):
            return inner.replace('""', '"')
    return value


def _sniff_delimiter(p: Path) -> str:
    with open(p, encoding="utf-8-sig", newline="") as fh:
        head = fh.read(64 * 1024)
    try:
        return csv.Sniffer().sniff(head, delimiters="\t,;|").delimiter
    except csv.Error:
        raise InputDataError(
            f"{p}: cannot tell the delimiter of this .txt file (tried tab , ; |); "
            "rename it .csv or .tsv"
        ) from None


def _require(df: pd.DataFrame, columns: list[str], p: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputDataError(
            f"{p}: missing column(s) {', '.join(missing)}; "
            f"the file has columns {', '.join(map(str, df.columns))}"
        )


def _as_text(values: pd.Series) -> pd.Series:
    """Any column (Parquet ints, floats with nulls, strings) as str; null -> ""."""
    if pd.api.types.is_float_dtype(values):
        finite = values.dropna()
        if len(finite) and (finite == finite.round()).all():
            values = values.astype("Int64")
    return values.astype(object).where(values.notna(), "").map(str)


def _parse_bool(values: pd.Series, column: str, p: Path) -> pd.Series:
    lowered = values.astype(str).str.strip().str.lower()
    true = lowered.isin(_TRUE)
    ok = true | lowered.isin(_FALSE)
    if not ok.all():
        bad = [i for i, good in enumerate(ok.tolist()) if not good]
        raise InputDataError(
            f"{p}: column {column} must be 1/0 or true/false; bad {_rows_text(bad)}"
        )
    return true


def _rows_text(positions: list[int]) -> str:
    shown = ", ".join(str(r + 1) for r in positions[:10])
    more = ", ..." if len(positions) > 10 else ""
    return f"rows {shown}{more} ({len(positions)} in all, 1-based, header not counted)"


def _make_table(
    *,
    code: pd.Series,
    term: pd.Series,
    is_main_term: pd.Series | None,
    semantic_tag: pd.Series | None,
    source: str,
    index: pd.Index,
    mention_count: pd.Series | None = None,
    parent: pd.Series | None = None,
) -> pd.DataFrame:
    """Assemble a terminology table; code and term stay as written (null -> "")."""
    codes = [("" if v is None else str(v)) for v in code.tolist()]
    terms = [("" if v is None else str(v)) for v in term.tolist()]
    n = len(codes)
    code_keys = [normalize_code(c) for c in codes]
    if is_main_term is None:
        main = ~pd.Series(code_keys).duplicated(keep="first").to_numpy()
    else:
        main = is_main_term.astype(bool).to_numpy()
    df = pd.DataFrame(
        {
            "code": codes,
            "code_key": code_keys,
            "term": terms,
            "term_norm": [normalize_text(t) for t in terms],
            "is_main_term": main,
            "semantic_tag": (
                [str(v).strip() for v in semantic_tag.tolist()]
                if semantic_tag is not None
                else [""] * n
            ),
            "source": [source] * n,
            "mention_count": (
                mention_count.to_numpy(dtype="int64")
                if mention_count is not None
                else [0] * n
            ),
            "parent_key": (
                [normalize_code(v) if v else "" for v in parent.fillna("").tolist()]
                if parent is not None
                else [""] * n
            ),
        },
        columns=TERMINOLOGY_COLUMNS,
    )
    df.index = pd.Index(index) if len(index) == n else pd.RangeIndex(n)
    return df.astype({"is_main_term": bool, "mention_count": "int64"})


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "code": pd.Series(dtype=object),
            "code_key": pd.Series(dtype=object),
            "term": pd.Series(dtype=object),
            "term_norm": pd.Series(dtype=object),
            "is_main_term": pd.Series(dtype=bool),
            "semantic_tag": pd.Series(dtype=object),
            "source": pd.Series(dtype=object),
            "mention_count": pd.Series(dtype="int64"),
            "parent_key": pd.Series(dtype=object),
        }
    )


def _conform(frame: pd.DataFrame, position: int) -> pd.DataFrame:
    """A frame with every terminology column, keys recomputed; null code/term -> ""."""
    missing = [c for c in ("code", "term") if c not in frame.columns]
    if missing:
        raise InputDataError(
            f"terminology frame {position}: missing column(s) {', '.join(missing)}; "
            f"it has columns {', '.join(map(str, frame.columns))}"
        )
    n = len(frame)
    out = pd.DataFrame(index=frame.index)
    out["code"] = _as_text(frame["code"])
    out["term"] = _as_text(frame["term"])
    out["code_key"] = out["code"].map(normalize_code)
    out["term_norm"] = out["term"].map(normalize_text)
    out["is_main_term"] = (
        frame["is_main_term"].fillna(False).astype(bool) if "is_main_term" in frame else False
    )
    out["semantic_tag"] = (
        _as_text(frame["semantic_tag"]) if "semantic_tag" in frame else [""] * n
    )
    out["source"] = _as_text(frame["source"]) if "source" in frame else [""] * n
    out["mention_count"] = (
        pd.to_numeric(frame["mention_count"], errors="coerce").fillna(0).astype("int64")
        if "mention_count" in frame
        else 0
    )
    out["parent_key"] = (
        _as_text(frame["parent_key"]).map(lambda v: normalize_code(v) if v else "")
        if "parent_key" in frame else [""] * n
    )
    return out[TERMINOLOGY_COLUMNS]


def _describe_bad_rows(table: pd.DataFrame, bad: pd.Series, position: int) -> list[str]:
    """'source X: rows 3, 9 (n)' for each source of the bad rows of one frame."""
    if pd.api.types.is_integer_dtype(table.index):
        numbers = pd.Series(table.index.to_numpy() + 1, index=table.index)
        kind = "data row(s)"
    else:
        numbers = pd.Series(range(1, len(table) + 1), index=table.index)
        kind = "frame position(s)"
    parts = []
    bad_rows = table[bad]
    for name, rows in bad_rows.groupby("source", sort=False):
        nums = numbers.loc[rows.index].tolist()
        shown = ", ".join(str(v) for v in nums[:10]) + (", ..." if len(nums) > 10 else "")
        label = f"source {name!r}" if name else f"frame {position}"
        parts.append(f"{label}: {kind} {shown} ({len(nums)} row(s))")
    return parts


def _one_spelling_per_code(table: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Every row of a code_key of ``table`` gets the code's one spelling and parent (see
    :func:`build_terminology`), read from ``rows``, the input rows before duplicates were
    merged: dictionary rows (no training mentions) first, in order. Read after the merge, a
    dictionary row merged into an earlier mention row of the same text would carry the
    mention's spelling and count as a mention."""
    if table.empty:
        return table
    dictionary_first = rows.assign(_mentioned=rows["mention_count"] > 0).sort_values(
        "_mentioned", kind="mergesort")
    first = dictionary_first.groupby("code_key", sort=False)
    spelling = first["code"].first()
    parent = dictionary_first[dictionary_first["parent_key"] != ""].groupby(
        "code_key", sort=False)["parent_key"].first()
    out = table.copy()
    out["code"] = out["code_key"].map(spelling)
    out["parent_key"] = out["code_key"].map(parent).fillna("")
    return out


def _join_sources(values: pd.Series) -> str:
    names = dict.fromkeys(n for v in values for n in str(v).split("|") if n)
    return "|".join(names)


def _first_non_empty(values: pd.Series) -> str:
    for v in values:
        if v:
            return str(v)
    return ""
