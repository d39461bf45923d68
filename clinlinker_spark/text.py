"""Text normalisation: the one function every component uses to compare and embed text."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Return the canonical form of a mention or term.

    Steps, in order: Unicode NFKC (compatibility forms and composed accents, so "Ａ" and "A",
    "é" written as e + combining accent and "é" are one), lower case (``str.lower``, Spanish
    has no special casing rules that need more), every run of whitespace (spaces, tabs, line
    breaks, no-break spaces) to one space, and leading/trailing whitespace removed. Accents and
    punctuation are kept: "úlcera" and "ulcera" stay different strings.

    The original text is always kept next to its normal form; this is for matching and
    embedding only.
    """
    if text is None:
        raise TypeError("normalize_text() needs a string, got None")
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def normalize_code(code: str) -> str:
    """Canonical form of a terminology code for comparison: stripped, lower case, no dots.

    ICD-10 codes are written ``E11.9`` in ICD-10-CM corpora and ``E119`` in the WHO list; both
    become ``e119``. SNOMED-CT ids are digits and pass through unchanged.
    """
    return str(code).strip().lower().replace(".", "")


def text_hash(text: str) -> str:
    """SHA-256 hex digest of a text (used where mention text must not be copied)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
