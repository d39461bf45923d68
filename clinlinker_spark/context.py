"""A mention's context: the sentence of its document that holds it.

The span alone often cannot decide the specific code ('fumadora' is F17.210, F17.200 or
F17.290 depending on what the sentence says she smokes); the sentence around it can. This
module finds that sentence (:func:`sentence_spans`, :func:`mention_context`) and attaches it
to a mention table (:func:`attach_context`), with the mention's offsets inside it.

Sentence splitting for Spanish clinical text, rule based and deterministic:

- a line break always ends a sentence (case reports put headings, lists and lab values on
  lines of their own);
- ``.``, ``!`` and ``?`` end a sentence when whitespace follows and the next character can
  start one (an upper-case letter, a digit, an opening ``¿ ¡ ( "`` or a dash); ``;`` does
  not (lists of findings and lab values are joined by it, and their items are context for
  each other);
- ``.`` does not end a sentence after a known abbreviation (``Dr.``, ``aprox.``, ``izq.``,
  ``p.ej.``: :data:`ABBREVIATIONS`), nor inside a number (``1.5``: no whitespace follows),
  nor before a lower-case word (``p. ej. con``). After a unit (``8 h. Se ...``) or a single
  letter (``vitamina D. Se ...``) it does: anonymised case reports have no initials.

A mention whose spans cross a boundary gets the union of the sentences it touches. A sentence
longer than ``max_chars`` is cut to a window of that many characters centred on the mention,
at word boundaries (the fallback for text without punctuation).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from clinlinker_spark.errors import InputDataError

log = logging.getLogger(__name__)

#: columns :func:`attach_context` adds to a mention table
CONTEXT_COLUMNS = ("context", "context_start", "context_end")

# abbreviations a period does not end a sentence after (compared lower case, without the
# final period). Units ("mg", "h") and words such as
# "años" are left out: Spanish writes units without a period, so "cada 8 h. Se ..." ends a
# sentence.
ABBREVIATIONS = frozenset({
    "dr", "dra", "drs", "dras", "sr", "sra", "srta", "ud", "uds", "prof",
    "aprox", "approx", "ej", "p.ej", "pej", "vs", "cf", "fig", "figs", "tab", "pág", "pag",
    "núm", "nº", "n.º", "vol", "cap", "art", "a.c", "d.c", "i.v", "i.m", "v.o", "s.c",
    "dcha", "dcho", "izq", "izda", "izdo", "hosp", "serv", "dpto", "tto", "trat", "dx",
})

_CAN_START = re.compile(r"[A-ZÁÉÍÓÚÑÜ0-9¿¡(\"'«\-–—•]")
_TERMINATORS = ".!?"
_WORD_BEFORE = re.compile(r"([\wº.]+)$")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """The sentences of ``text`` as (start, end) offsets, in order; surrounding whitespace is
    left out and empty sentences dropped. Rules in the module docstring."""
    boundaries: list[int] = []  # end offsets (exclusive) of sentences
    n = len(text)
    i = 0
    while i < n:
        ch = text[i]
        if ch == "\n":
            boundaries.append(i)
        elif ch in _TERMINATORS:
            j = i + 1
            while j < n and text[j] in _TERMINATORS + "\"'»)":
                j += 1  # "...", "?!", a closing quote or bracket stays with the sentence
            if j < n and text[j].isspace():
                k = j
                while k < n and text[k].isspace() and text[k] != "\n":
                    k += 1
                at_end = k >= n or text[k] == "\n"
                if at_end or (_CAN_START.match(text[k]) and not _is_abbreviation(text, i)):
                    boundaries.append(j)
            elif j >= n:
                boundaries.append(j)
            i = j
            continue
        i += 1
    spans: list[tuple[int, int]] = []
    start = 0
    for end in [*boundaries, n]:
        s, e = start, end
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            spans.append((s, e))
        start = end
    return spans


def _is_abbreviation(text: str, period: int) -> bool:
    """Whether the ``.`` at ``period`` closes an abbreviation rather than a sentence."""
    if text[period] != ".":
        return False
    found = _WORD_BEFORE.search(text[max(0, period - 12):period])
    if not found:
        return False
    return found.group(1).strip(".").lower() in ABBREVIATIONS


def mention_context(text: str, start: int, end: int, max_chars: int = 400,
                    sentences: Sequence[tuple[int, int]] | None = None
                    ) -> tuple[str, int, int]:
    """(context, mention start, mention end) of the mention at ``[start, end)`` of ``text``:
    the sentence(s) that hold it, or a window of ``max_chars`` centred on it when they are
    longer; the offsets are the mention's inside the context. ``sentences``: the text's
    :func:`sentence_spans`, when already computed."""
    if not 0 <= start <= end <= len(text):
        raise InputDataError(f"mention offsets {start}-{end} lie outside a document of "
                             f"{len(text)} characters")
    spans = sentence_spans(text) if sentences is None else sentences
    touched = [(s, e) for s, e in spans if s < max(end, start + 1) and e > start]
    lo = min((s for s, _ in touched), default=start)
    hi = max((e for _, e in touched), default=end)
    lo, hi = min(lo, start), max(hi, end)
    if hi - lo > max_chars:
        room = max(0, max_chars - (end - start))
        lo = max(lo, start - room // 2)
        hi = min(hi, end + room - (start - lo))
        lo = max(lo, min(start, hi - max_chars))
        # cut at word boundaries, never into the mention
        while lo < start and lo > 0 and not text[lo - 1].isspace():
            lo += 1
        while hi > end and hi < len(text) and not text[hi].isspace():
            hi -= 1
    return text[lo:hi], start - lo, end - lo


def _document_file(folder: Path, doc_id: str) -> Path | None:
    """The text file of ``doc_id`` in ``folder``: ``{doc_id}.txt``, else with DisTEMIST's
    ``es-`` prefix added or removed (its annotation and text file names differ in that)."""
    for name in (doc_id, f"es-{doc_id}", doc_id[3:] if doc_id.startswith("es-") else ""):
        if name:
            p = folder / f"{name}.txt"
            if p.is_file():
                return p
    return None


def attach_context(mentions: pd.DataFrame, text_dir: str | Path,
                   max_chars: int = 400) -> pd.DataFrame:
    """A copy of a corpus mention table (:mod:`clinlinker_spark.corpora`: ``doc_id``,
    ``start``, ``end``) with :data:`CONTEXT_COLUMNS`: each mention's sentence from
    ``text_dir/{doc_id}.txt`` and its offsets inside it. Mentions whose document file is
    missing get an empty context and offsets -1 (linked without context); their count is
    logged. A mention whose offsets fall outside its document is an error."""
    folder = Path(text_dir)
    if not folder.is_dir():
        raise InputDataError(f"text folder not found: {folder}")
    contexts: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    cache: dict[str, tuple[str, list[tuple[int, int]]] | None] = {}
    missing_docs: set[str] = set()
    for doc_id, start, end in zip(mentions["doc_id"].astype(str), mentions["start"],
                                  mentions["end"]):
        if doc_id not in cache:
            path = _document_file(folder, doc_id)
            if path is None:
                cache[doc_id] = None
            else:
                body = path.read_text(encoding="utf-8")
                cache[doc_id] = (body, sentence_spans(body))
        found = cache[doc_id]
        if found is None:
            missing_docs.add(doc_id)
            contexts.append("")
            starts.append(-1)
            ends.append(-1)
            continue
        body, sentences = found
        context, s, e = mention_context(body, int(start), int(end), max_chars, sentences)
        contexts.append(context)
        starts.append(s)
        ends.append(e)
    if missing_docs:
        log.warning("%s: no text file for %d of %d documents; their mentions have no context",
                    folder, len(missing_docs), mentions["doc_id"].nunique())
    out = mentions.copy()
    out["context"] = contexts
    out["context_start"] = pd.Series(starts, index=out.index, dtype="int64")
    out["context_end"] = pd.Series(ends, index=out.index, dtype="int64")
    return out


#: what marks the mention inside its context in a context-aware model's input
MENTION_MARKERS = ("<<", ">>")


def marked_context(context: str, start: int, end: int,
                   markers: tuple[str, str] = MENTION_MARKERS) -> str:
    """``context`` with the mention at ``[start, end)`` between ``markers``
    (``"fumadora de << 20 cigarrillos >> al día"``)."""
    if not 0 <= start <= end <= len(context):
        raise InputDataError(f"mention offsets {start}-{end} lie outside a context of "
                             f"{len(context)} characters")
    left, right = markers
    return f"{context[:start]}{left} {context[start:end]} {right}{context[end:]}"


def context_query(text_norm: str, context: str | None, start: int, end: int,
                  max_chars: int) -> str:
    """What a context-aware model reads for one mention: its context cut to a window of at
    most ``max_chars`` around the mention, the mention marked (:func:`marked_context`), then
    normalised like every model input; ``text_norm`` itself when the context is missing or
    its offsets are not usable."""
    from clinlinker_spark.text import normalize_text

    if (not isinstance(context, str) or not context or start is None or end is None
            or not 0 <= int(start) < int(end) <= len(context)):
        return text_norm
    window, s, e = mention_context(context, int(start), int(end), max_chars,
                                   sentences=[(0, len(context))])
    return normalize_text(marked_context(window, s, e))


def has_context(contexts: pd.Series, starts: pd.Series, ends: pd.Series) -> pd.Series:
    """Boolean mask of the rows whose context is usable: a non-empty string and offsets
    inside it with ``start < end``."""
    text = contexts.fillna("").astype(str)
    s = pd.to_numeric(starts, errors="coerce")
    e = pd.to_numeric(ends, errors="coerce")
    return (text.str.len() > 0) & (s >= 0) & (s < e) & (e <= text.str.len())


__all__ = ["ABBREVIATIONS", "CONTEXT_COLUMNS", "MENTION_MARKERS", "attach_context",
           "context_query", "has_context", "marked_context", "mention_context",
           "sentence_spans"]
