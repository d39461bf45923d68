"""Gold entity-linking corpora (DisTEMIST, MedProcNER, CodiEsp-X) read into one mention table.

Every reader returns a pandas DataFrame with the columns of :data:`MENTION_COLUMNS`, in order:

============  ========  ===================================================================
column        dtype     meaning
============  ========  ===================================================================
mention_id    str       unique in the table (see below)
doc_id        str       document id as written in the file (``filename`` / ``id`` column)
start         int64     smallest character offset of the mention's spans
end           int64     largest end offset of the mention's spans (exclusive)
spans         str       ``"s e"``, or ``"s1 e1;s2 e2"`` for a discontinuous mention, in the
                        order the file gives them (the text follows that order)
text          str       the mention text as annotated (CSV quoting undone, nothing else)
label         str       entity type (``ENFERMEDAD``, ``PROCEDIMIENTO``, ``DIAGNOSTICO``, ...)
code          str       the raw code field, stripped: ``"A+B"``, ``"NO_CODE"``, ``"n44.8"``
codes         list[str] ``code`` split on ``+`` without the no-code markers; empty for NO_CODE
semantic_rel  str       EXACT / NARROW / COMPOSITE / ...; ``""`` when the format has none
is_composite  bool      the code field holds more than one ``+``-separated part
is_no_code    bool      no real code (``NO_CODE``, DisTEMIST's ``NOMAP``, or an empty field)
============  ========  ===================================================================

Composite and NO_CODE mentions are kept and flagged, never dropped: evaluation protocols
differ on them, so the caller decides (:func:`clean_mask`). Rows with empty text are kept too
(a later validation step gives them a status); their count is logged at WARNING.

``mention_id`` is ``"{doc_id}:{mark}"`` for DisTEMIST (which numbers its mentions ``T1``,
``T2``, ...) and ``"{doc_id}:{start}-{end}:{label}"`` for the formats without a mark. When two
rows of a table get the same id (CodiEsp gives one span several codes in about 1% of its
rows), the second gets ``"#2"`` appended, the third ``"#3"``, in file order: deterministic and
unique.

Files are read as UTF-8 TSV with quote characters taken literally, then a field that is
wholly CSV-quoted (``"a ""b"" c"``, as MedProcNER writes three of its texts) is unquoted. This
is safer than a CSV parser for annotation files, where one stray opening quote would swallow
every following line into one field.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from clinlinker_spark.errors import InputDataError

logger = logging.getLogger(__name__)

MENTION_COLUMNS: list[str] = [
    "mention_id",
    "doc_id",
    "start",
    "end",
    "spans",
    "text",
    "label",
    "code",
    "codes",
    "semantic_rel",
    "is_composite",
    "is_no_code",
]

#: Code values that mean "annotated, but no code in the terminology" (compared upper case).
NO_CODE_MARKERS: frozenset[str] = frozenset({"NO_CODE", "NOMAP"})

GOLD_READER_FORMATS = ("distemist", "medprocner", "codiesp")

# A long numeric code a spreadsheet rewrote as "1.47202310001191E+016" (digits lost). The
# DisTEMIST *_crossmappings.tsv files hold 18 of them; they are not composite codes.
_SCIENTIFIC_RE = re.compile(r"^\d+(\.\d+)?[eE]\+\d+$")
_SPANS_RE = re.compile(r"^\s*\d+\s+\d+\s*(;\s*\d+\s+\d+\s*)*$")
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ ]{0,40}$")

# CodiEsp-X layouts. The official release has no header; the column names below are the ones
# its guidelines use. ``trainX_new.tsv`` (a later re-export) has a header and another order,
# with the code in a column called "label" and the entity type in "label_type".
_CODIESP_COLUMNS = ["filename", "label", "code", "text", "position"]
_CODIESP_HEADER_LAYOUTS: dict[frozenset[str], dict[str, str]] = {
    frozenset(_CODIESP_COLUMNS): {c: c for c in _CODIESP_COLUMNS},
    frozenset({"id", "label", "words", "label_type", "offset"}): {
        "id": "filename",
        "label": "code",
        "words": "text",
        "label_type": "label",
        "offset": "position",
    },
}


# --------------------------------------------------------------------------------------------
# Public readers


def read_distemist(path: str | Path) -> pd.DataFrame:
    """Read DisTEMIST linking gold (file or folder) into the mention table.

    Columns used: filename, mark, label, off0, off1, span, code, and semantic_rel when present.
    The ``*_crossmappings.tsv`` variant reads the same (its extra columns are ignored), but a
    folder skips it because it repeats the plain linking file row for row.
    """
    return _read_path(path, _read_distemist_file)


def read_medprocner(path: str | Path) -> pd.DataFrame:
    """Read MedProcNER subtask-2 (linking) gold (file or folder) into the mention table.

    Columns used: filename, label, start_span, end_span, text, code, and sem_rel when present;
    is_abbrev, is_composite and need_context are ignored (``is_composite`` is derived from the
    code field, which agrees with the file's column on the released training set).
    """
    return _read_path(path, _read_medprocner_file)


def read_codiesp(path: str | Path) -> pd.DataFrame:
    """Read CodiEsp-X gold (file or folder) into the mention table.

    Two layouts are recognised: the official one without a header (filename, label, code,
    text, position), and a headed one (id, label=code, words=text, label_type=label,
    offset=position, as in ``trainX_new.tsv``). A header with the official column names is
    read by name. Anything else is rejected with :class:`InputDataError`.
    """
    return _read_path(path, _read_codiesp_file)


_READERS: dict[str, Callable[[str | Path], pd.DataFrame]] = {
    "distemist": read_distemist,
    "medprocner": read_medprocner,
    "codiesp": read_codiesp,
}


def read_gold(path: str | Path, format: str,  # noqa: A002 (config name)
              text_dir: str | Path | None = None, context_chars: int = 400) -> pd.DataFrame:
    """Read a gold corpus by format name: ``distemist`` | ``medprocner`` | ``codiesp``.

    With ``text_dir`` (the corpus's folder of ``{doc_id}.txt`` documents), each mention also
    gets its context: the sentence that holds it and its offsets in that sentence
    (:func:`clinlinker_spark.context.attach_context`; ``context_chars`` caps its length).
    """
    try:
        reader = _READERS[format]
    except KeyError:
        raise InputDataError(
            f"unknown gold corpus format {format!r}; known: {', '.join(GOLD_READER_FORMATS)}"
        ) from None
    mentions = reader(path)
    if text_dir is None:
        return mentions
    from clinlinker_spark.context import attach_context

    return attach_context(mentions, text_dir, context_chars)


def clean_mask(mentions: pd.DataFrame) -> pd.Series:
    """Boolean Series, True for mentions with exactly one real code (not composite, not NO_CODE)."""
    _require(mentions, ["is_composite", "is_no_code"], "mention table")
    return ~mentions["is_composite"].astype(bool) & ~mentions["is_no_code"].astype(bool)


def split_by_document(
    mentions: pd.DataFrame, test_fraction: float = 0.2, seed: int = 13
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a mention table into (train, test) by whole documents, deterministically.

    Documents are ordered by SHA-256 of ``f"{seed}:{doc_id}"`` and the first
    ``round(n_docs * test_fraction)`` of them (at least one, at most ``n_docs - 1`` when there
    are two or more documents) go to the test side. The result depends only on the seed and the
    set of document ids, not on row order or platform (Python's ``hash`` is salted, so it is
    not used). Row order within each side is the input order; indexes are reset.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1; got {test_fraction}")
    _require(mentions, ["doc_id"], "mention table")
    docs = pd.unique(mentions["doc_id"].astype(str))
    ranked = sorted(
        docs, key=lambda d: (hashlib.sha256(f"{seed}:{d}".encode()).hexdigest(), d)
    )
    n_test = int(round(len(ranked) * test_fraction))
    if len(ranked) >= 2:
        n_test = min(max(n_test, 1), len(ranked) - 1)
    test_docs = set(ranked[:n_test])
    in_test = mentions["doc_id"].astype(str).isin(test_docs)
    train = mentions[~in_test].reset_index(drop=True)
    test = mentions[in_test].reset_index(drop=True)
    logger.info(
        "document split (seed %d): %d train docs / %d rows, %d test docs / %d rows",
        seed, len(ranked) - n_test, len(train), n_test, len(test),
    )
    return train, test


# --------------------------------------------------------------------------------------------
# Per-format file readers


def _read_distemist_file(path: Path) -> pd.DataFrame:
    raw = _read_tsv(path, header=True)
    _require(raw, ["filename", "mark", "label", "off0", "off1", "span", "code"], str(path))
    start = _parse_int(raw["off0"], "off0", path)
    end = _parse_int(raw["off1"], "off1", path)
    spans = [[(s, e)] for s, e in zip(start, end, strict=True)]
    doc_id = raw["filename"].str.strip()
    mark = raw["mark"].str.strip()
    ids = (doc_id + ":" + mark).tolist()
    n_dup = len(ids) - len(set(ids))
    if n_dup:
        logger.warning("%s: %d rows repeat a (filename, mark) pair; suffixed ids", path, n_dup)
    return _mention_frame(
        path,
        doc_id=doc_id,
        spans=spans,
        text=raw["span"],
        label=raw["label"],
        code=raw["code"],
        semantic_rel=raw["semantic_rel"] if "semantic_rel" in raw else None,
        base_ids=ids,
    )


def _read_medprocner_file(path: Path) -> pd.DataFrame:
    raw = _read_tsv(path, header=True)
    _require(
        raw, ["filename", "label", "start_span", "end_span", "text", "code"], str(path)
    )
    start = _parse_int(raw["start_span"], "start_span", path)
    end = _parse_int(raw["end_span"], "end_span", path)
    return _mention_frame(
        path,
        doc_id=raw["filename"].str.strip(),
        spans=[[(s, e)] for s, e in zip(start, end, strict=True)],
        text=raw["text"],
        label=raw["label"],
        code=raw["code"],
        semantic_rel=raw["sem_rel"] if "sem_rel" in raw else None,
    )


def _read_codiesp_file(path: Path) -> pd.DataFrame:
    first = _first_row(path)
    if first is None:
        raise InputDataError(f"{path}: empty CodiEsp-X file")
    names = [f.strip().lower() for f in first]
    if len(first) == len(_CODIESP_COLUMNS) and _SPANS_RE.match(first[-1]):
        raw = _read_tsv(path, header=False)
        if raw.shape[1] != len(_CODIESP_COLUMNS):
            raise InputDataError(
                f"{path}: CodiEsp-X rows must have {len(_CODIESP_COLUMNS)} tab-separated "
                f"fields ({', '.join(_CODIESP_COLUMNS)}); found {raw.shape[1]}"
            )
        raw.columns = _CODIESP_COLUMNS
    else:
        mapping = next(
            (m for cols, m in _CODIESP_HEADER_LAYOUTS.items() if cols <= set(names)), None
        )
        if mapping is None:
            shown = (
                f"header {names}"
                if all(_IDENTIFIER_RE.match(f.strip()) for f in first)
                else f"a first row of {len(first)} fields"
            )
            known = "; ".join(
                "(" + ", ".join(sorted(cols)) + ")" for cols in _CODIESP_HEADER_LAYOUTS
            )
            raise InputDataError(
                f"{path}: unrecognised CodiEsp-X layout: {shown} is neither a data row "
                f"(5 fields ending in a 'start end' position) nor a known header {known}"
            )
        raw = _read_tsv(path, header=True)
        raw.columns = [c.strip().lower() for c in raw.columns]
        raw = raw[list(mapping)].rename(columns=mapping)
        logger.info("%s: CodiEsp-X file with a header, columns %s", path, list(mapping))
    spans = _parse_spans(raw["position"], path)
    return _mention_frame(
        path,
        doc_id=raw["filename"].str.strip(),
        spans=spans,
        text=raw["text"],
        label=raw["label"],
        code=raw["code"],
        semantic_rel=None,
    )


# --------------------------------------------------------------------------------------------
# Shared helpers


def _read_path(path: str | Path, read_file: Callable[[Path], pd.DataFrame]) -> pd.DataFrame:
    """Read one file, or every ``*.tsv`` of a folder (sorted, no crossmappings), concatenated."""
    p = Path(path)
    if p.is_dir():
        files = sorted(
            f for f in p.glob("*.tsv") if f.is_file() and "crossmapping" not in f.name.lower()
        )
        if not files:
            raise InputDataError(f"{p}: folder holds no *.tsv gold file (crossmappings skipped)")
        frames = [read_file(f) for f in files]
        table = pd.concat(frames, ignore_index=True)
        table["mention_id"] = _unique_ids(table["mention_id"].tolist())
        logger.info("read %d gold files from %s: %d mentions", len(files), p, len(table))
    elif p.is_file():
        table = read_file(p)
    else:
        raise InputDataError(f"gold corpus path not found: {p}")
    return table[MENTION_COLUMNS]


def _read_tsv(path: Path, header: bool) -> pd.DataFrame:
    """All fields as str, quotes literal, missing trailing fields as ""."""
    try:
        df = pd.read_csv(
            path,
            sep="\t",
            header=0 if header else None,
            dtype=str,
            keep_default_na=False,
            quoting=csv.QUOTE_NONE,
            encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        raise InputDataError(f"{path}: empty file") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputDataError(f"{path}: not a readable UTF-8 TSV file ({exc})") from None
    if header:
        df.columns = [str(c).strip() for c in df.columns]
    return df.fillna("")


def _first_row(path: Path) -> list[str] | None:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        for line in fh:
            if line.strip():
                return line.rstrip("\r\n").split("\t")
    return None


def _require(df: pd.DataFrame, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputDataError(
            f"{where}: missing required column(s) {', '.join(missing)}; "
            f"it has columns {', '.join(map(str, df.columns))}"
        )


def _bad_rows_message(rows: list[int]) -> str:
    """'rows 3, 7, ... (n in all)' with 1-based data-row numbers (header not counted)."""
    shown = ", ".join(str(r + 1) for r in rows[:10])
    more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
    return f"data row(s) {shown}{more} (1-based, header not counted; {len(rows)} in all)"


def _parse_int(values: pd.Series, column: str, path: Path) -> list[int]:
    stripped = values.str.strip()
    ok = stripped.str.fullmatch(r"\d+")
    if not ok.all():
        bad = [i for i, good in enumerate(ok.tolist()) if not good]
        raise InputDataError(
            f"{path}: column {column} must hold non-negative integers; "
            f"bad {_bad_rows_message(bad)}"
        )
    return [int(v) for v in stripped]


def _parse_spans(values: pd.Series, path: Path) -> list[list[tuple[int, int]]]:
    """``"s e"`` / ``"s1 e1;s2 e2"`` -> list of (start, end) per row, file order kept."""
    out: list[list[tuple[int, int]]] = []
    bad: list[int] = []
    for i, value in enumerate(values.tolist()):
        if not _SPANS_RE.match(value):
            bad.append(i)
            out.append([])
            continue
        out.append([(int(a), int(b)) for a, b in (part.split() for part in value.split(";"))])
    if bad:
        raise InputDataError(
            f"{path}: position must look like 'start end' or 'start end;start end'; "
            f"bad {_bad_rows_message(bad)}"
        )
    return out


def _unquote(value: str) -> str:
    """Undo CSV quoting of a whole field; other values come back unchanged.

    ``"a ""b"" c"`` (outer quotes, inner quotes doubled) becomes ``a "b" c``.
    """
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        if '"' not in inner.replace('""', ""):
            return inner.replace('""', '"')
    return value


def _split_code(raw: str) -> tuple[list[str], bool, bool]:
    """(codes, is_composite, is_no_code) of a raw code field."""
    if _SCIENTIFIC_RE.match(raw):
        return [raw], False, False
    parts = [p.strip() for p in raw.split("+") if p.strip()]
    codes = [p for p in parts if p.upper() not in NO_CODE_MARKERS]
    return codes, len(parts) > 1, not codes


def _unique_ids(ids: list[str]) -> list[str]:
    """Keep the first of each id; later repeats get the smallest free ``#n`` (n >= 2)."""
    used = set(ids)
    seen: set[str] = set()
    out: list[str] = []
    for base in ids:
        if base not in seen:
            seen.add(base)
            out.append(base)
            continue
        n = 2
        while f"{base}#{n}" in used:
            n += 1
        new = f"{base}#{n}"
        used.add(new)
        out.append(new)
    return out


def _mention_frame(
    path: Path,
    *,
    doc_id: pd.Series,
    spans: list[list[tuple[int, int]]],
    text: pd.Series,
    label: pd.Series,
    code: pd.Series,
    semantic_rel: pd.Series | None,
    base_ids: list[str] | None = None,
) -> pd.DataFrame:
    """Assemble the mention table of one file (columns of MENTION_COLUMNS)."""
    for i, row_spans in enumerate(spans):
        if any(s > e for s, e in row_spans):
            raise InputDataError(f"{path}: a span ends before it starts at data row {i + 1}")
    starts = [min(s for s, _ in row) for row in spans]
    ends = [max(e for _, e in row) for row in spans]
    labels = label.str.strip().tolist()
    docs = doc_id.tolist()
    if base_ids is None:
        base_ids = [
            f"{d}:{s}-{e}:{lab}"
            for d, s, e, lab in zip(docs, starts, ends, labels, strict=True)
        ]
    ids = _unique_ids(base_ids)
    n_suffixed = sum(1 for a, b in zip(base_ids, ids, strict=True) if a != b)
    codes_raw = code.str.strip().tolist()
    parsed = [_split_code(c) for c in codes_raw]
    texts = [_unquote(t) for t in text.tolist()]
    df = pd.DataFrame(
        {
            "mention_id": ids,
            "doc_id": docs,
            "start": pd.Series(starts, dtype="int64"),
            "end": pd.Series(ends, dtype="int64"),
            "spans": [";".join(f"{s} {e}" for s, e in row) for row in spans],
            "text": texts,
            "label": labels,
            "code": codes_raw,
            "codes": [p[0] for p in parsed],
            "semantic_rel": (
                semantic_rel.str.strip().tolist() if semantic_rel is not None else [""] * len(docs)
            ),
            "is_composite": pd.Series([p[1] for p in parsed], dtype=bool),
            "is_no_code": pd.Series([p[2] for p in parsed], dtype=bool),
        },
        columns=MENTION_COLUMNS,
    )
    n_empty_text = sum(1 for t in texts if not t.strip())
    n_empty_code = sum(1 for c in codes_raw if not c)
    n_scientific = sum(1 for c in codes_raw if _SCIENTIFIC_RE.match(c))
    if n_scientific:
        logger.warning(
            "%s: %d code(s) in spreadsheet scientific notation (digits lost); kept as written, "
            "not treated as composite", path, n_scientific,
        )
    if n_empty_text:
        logger.warning("%s: %d mention(s) with empty text kept", path, n_empty_text)
    if n_empty_code:
        logger.warning(
            "%s: %d mention(s) with an empty code field (is_no_code)", path, n_empty_code
        )
    logger.info(
        "%s: %d mentions in %d documents (%d composite, %d no-code, %d discontinuous, "
        "%d ids suffixed)",
        path, len(df), df["doc_id"].nunique(), int(df["is_composite"].sum()),
        int(df["is_no_code"].sum()), sum(1 for row in spans if len(row) > 1), n_suffixed,
    )
    return df
