"""Do abbreviations that the corpora define decide links the span alone gets wrong?

    .venv/bin/python benchmarks/abbreviations.py --config conf/train_ranker.yaml \\
        --gold ../shared/data/codiesp/dev/devX.tsv --labels DIAGNOSTICO \\
        --text ../shared/data/codiesp/train/text_files \\
        --text ../shared/data/distemist/training/text_files \\
        --text ../shared/data/medprocner/train/txt \\
        --exclude-docs ../shared/data/codiesp/dev/text_files

Learns a dictionary of abbreviations from the documents of ``--text`` (every "long form
(SHORT)" where the letters of SHORT appear in order in the words before the bracket, the
first at the start of a word: Schwartz and Hearst's rule), leaving out the documents named
in ``--exclude-docs`` (a folder of ``<doc_id>.txt``, the gold corpus's documents) and the
gold mentions' own documents. A short form keeps its most frequent long form when it was
defined at least ``--min-count`` times. Each gold mention whose first candidate is not an
exact match and that holds a known short form (a whole word) is linked again with the long
form in its place; its new first code replaces the old one. Prints one JSON line: acc@1 of
the linker as it is and with the expansions, how many mentions were expanded, and how many
links each direction changed. No mention text is printed; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

_BRACKET = re.compile(r"\(([^()]{2,10})\)")
_CLAUSE_END = re.compile(r"[.;:\n(]\s")
_WORD = re.compile(r"\b\w+\b")


def _fold(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text.lower())
                   if unicodedata.category(c) != "Mn")


def is_short_form(text: str) -> bool:
    """An abbreviation candidate: one or two words, an upper-case letter, starts with a
    letter or digit, at least two letters."""
    return (len(text.split()) <= 2 and any(c.isupper() for c in text) and text[0].isalnum()
            and sum(c.isalpha() for c in text) >= 2)


def long_form(short: str, before: str) -> str | None:
    """The words before a bracketed ``short`` that spell it (its letters and digits in
    order, right to left, the first at the start of a word), or None."""
    words = before.split()
    window = " ".join(words[-min(len(short) + 5, 2 * len(short)):])
    s, w = _fold(short), _fold(window)
    si, wi = len(s) - 1, len(w) - 1
    while si >= 0:
        if not s[si].isalnum():
            si -= 1
            continue
        while wi >= 0 and (w[wi] != s[si] or (si == 0 and wi > 0 and w[wi - 1].isalnum())):
            wi -= 1
        if wi < 0:
            return None
        si, wi = si - 1, wi - 1
    found = window[w.rfind(" ", 0, wi + 1) + 1:].strip(" ,;:")
    return found if len(found) > len(short) else None


def definitions(text: str) -> Iterable[tuple[str, str]]:
    """(short form, long form) pairs a document defines."""
    for match in _BRACKET.finditer(text):
        short = match.group(1).strip()
        if not is_short_form(short):
            continue
        before = _CLAUSE_END.split(text[max(0, match.start() - 200):match.start()])[-1]
        found = long_form(short, before)
        if found:
            yield short, found.lower()


def learn(folders: Iterable[str], exclude: set[str], min_count: int) -> dict[str, str]:
    """Short form -> its most frequent long form in the documents of ``folders`` (less
    those named in ``exclude``), for the short forms defined ``min_count`` times or more."""
    seen: dict[str, Counter] = defaultdict(Counter)
    for folder in folders:
        for path in sorted(Path(folder).glob("*.txt")):
            if path.stem not in exclude:
                for short, found in definitions(path.read_text(encoding="utf-8",
                                                               errors="replace")):
                    seen[short][found] += 1
    best = {short: forms.most_common(1)[0] for short, forms in seen.items()}
    return {short: found for short, (found, n) in best.items() if n >= min_count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a job config with a ranker")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gold", required=True)
    parser.add_argument("--gold-format", default="codiesp")
    parser.add_argument("--gold-split", default="all", choices=("all", "train", "test"))
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--split-seed", type=int, default=13)
    parser.add_argument("--labels", default="", help="comma-separated mention labels to keep")
    parser.add_argument("--text", action="append", required=True,
                        help="a folder of documents to learn abbreviations from")
    parser.add_argument("--exclude-docs", default="",
                        help="a folder whose <doc_id>.txt documents are not learnt from")
    parser.add_argument("--min-count", type=int, default=2)
    args = parser.parse_args(argv)

    from clinlinker_spark.commands.evaluate import read_gold_corpus
    from clinlinker_spark.config import load_config
    from clinlinker_spark.linker import Linker
    from clinlinker_spark.text import normalize_code

    gold = read_gold_corpus(args.gold, args.gold_format, "", args.labels, args.gold_split,
                            args.test_fraction, args.split_seed)
    exclude = set(gold["doc_id"].astype(str))
    if args.exclude_docs:
        exclude |= {p.stem for p in Path(args.exclude_docs).glob("*.txt")}
    known = learn(args.text, exclude, args.min_count)
    linker = Linker.from_config(load_config(args.config, args.set))
    texts = gold["text"].fillna("").tolist()
    keys = gold["code"].map(normalize_code).tolist()
    ranked, _ = linker.link_texts(texts)
    firsts = [normalize_code(c[0].code) if c else "" for c in ranked]
    expanded = {i: _WORD.sub(lambda m: known.get(m.group(0), m.group(0)), t)
                for i, t in enumerate(texts) if not (ranked[i] and ranked[i][0].exact)}
    expanded = {i: t for i, t in expanded.items() if t != texts[i]}
    order = sorted(expanded)
    again, _ = linker.link_texts([expanded[i] for i in order])
    after = list(firsts)
    for i, cands in zip(order, again):
        after[i] = normalize_code(cands[0].code) if cands else ""
    right = sum(f == k for f, k in zip(firsts, keys))
    right_after = sum(f == k for f, k in zip(after, keys))
    print(json.dumps({
        "config": args.config, "gold": args.gold, "mentions": len(keys),
        "short_forms": len(known), "documents_left_out": len(exclude),
        "expanded": len(order), "acc@1": round(right / max(1, len(keys)), 4),
        "acc@1_expanded": round(right_after / max(1, len(keys)), 4),
        "wrong_to_right": sum(firsts[i] != keys[i] and after[i] == keys[i] for i in order),
        "right_to_wrong": sum(firsts[i] == keys[i] and after[i] != keys[i] for i in order),
    }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
