"""Do cheap signals of a mention's surroundings decide the code that the span alone does not?

    .venv/bin/python benchmarks/context_signals.py --config conf/train_ranker.yaml \\
        --gold ../shared/data/codiesp/dev/devX.tsv \\
        --gold-text ../shared/data/codiesp/dev/text_files \\
        --train-gold ../shared/data/codiesp/train/trainX.tsv \\
        --train-text ../shared/data/codiesp/train/text_files --labels DIAGNOSTICO

Links the gold mentions with the config's linker (its ranker on, no context stage), then
re-orders each mention's first ``--top`` candidates by the ranker's score plus ``weight`` times
one signal, for each weight of ``--weights``:

- ``sentence_embedding``: the bi-encoder's embedding of the mention with ``--window`` words
  either side of it (from its sentence) searched in the index; a candidate's signal is the
  best score of a hit that carries its code (the lowest hit score when none does).
- ``sentence_words``: a naive-Bayes log-likelihood ratio of the sentence's words (the
  mention's own words left out) under the candidate's code against its category, from the
  training mentions' sentences (``--train-gold``, ``--train-text``); Dirichlet smoothing
  ``--alpha`` toward the category, the category's toward all codes.
- ``document``: 1 when the candidate is the first code of another mention (another text) of
  the same document.

Weight 0 is the linker as it is. The weights are scanned on the gold mentions themselves, so
the best row is an upper bound of what each signal can give there, not a tuned result.
Prints one JSON line per signal: per weight, acc@1 and the count of errors whose code shares
the gold code's category (``--category-chars``).

A last line (``"signal": "ambiguity"``) says how much the corpora can teach a model about
context at all: for the training and the gold mentions, the (normalised) texts whose code
varies inside one category, and the mentions that do not carry their text's most frequent
code there (what no reading of the span alone gets right); and for the linker's
same-category errors, how many are texts no training mention has, and how many pick a code
that training mentions of the same text carry. Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter, defaultdict
from typing import Callable, Sequence

_WORD = re.compile(r"[^\W\d_]{3,}")


def side_words(context: str, start: int, end: int, window: int = 0) -> list[str]:
    """Distinct lower-case words of ``context`` outside the mention at ``[start, end)``,
    the ``window`` nearest on each side (all of them for 0); [] when the offsets are unset."""
    if not isinstance(context, str) or start < 0 or end <= start:
        return []
    left = _WORD.findall(context[:start].lower())
    right = _WORD.findall(context[end:].lower())
    if window:
        left, right = left[-window:], right[:window]
    return sorted(set(left + right))


def window_text(text: str, context: str, start: int, end: int, window: int) -> str:
    """The mention with ``window`` whitespace-separated words of its context either side."""
    if not isinstance(context, str) or start < 0 or end <= start:
        return text
    left = context[:start].split()[-window:] if window else []
    right = context[end:].split()[:window] if window else []
    return " ".join([*left, context[start:end], *right])


class SentenceWords:
    """Naive-Bayes scores of side words per code, relative to the code's category."""

    def __init__(self, codes: Sequence[str], words: Sequence[list[str]], alpha: float,
                 category_chars: int) -> None:
        self.alpha, self.chars = alpha, category_chars
        self.by_code: dict[str, Counter] = defaultdict(Counter)
        self.by_category: dict[str, Counter] = defaultdict(Counter)
        self.all = Counter()
        for code, ws in zip(codes, words):
            self.by_code[code].update(ws)
            self.by_category[code[:category_chars]].update(ws)
            self.all.update(ws)
        self.code_total = {c: sum(n.values()) for c, n in self.by_code.items()}
        self.category_total = {c: sum(n.values()) for c, n in self.by_category.items()}
        self.total, self.vocabulary = sum(self.all.values()), len(self.all)

    def score(self, code: str, words: list[str]) -> float:
        category = code[:self.chars]
        a = self.alpha
        out = 0.0
        for w in words:
            p_all = (self.all[w] + 1) / (self.total + self.vocabulary)
            p_cat = ((self.by_category.get(category, Counter())[w] + a * p_all)
                     / (self.category_total.get(category, 0) + a))
            p_code = ((self.by_code.get(code, Counter())[w] + a * p_cat)
                      / (self.code_total.get(code, 0) + a))
            out += math.log(p_code / p_cat)
        return out


def ambiguity(texts: Sequence[str], codes: Sequence[str], chars: int) -> dict[str, int]:
    """Texts whose code varies inside one category (its first ``chars`` characters), their
    mentions, and the mentions that do not carry their text's most frequent code of that
    category."""
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for text, code in zip(texts, codes):
        counts[text, code[:chars]][code] += 1
    varying = [c for c in counts.values() if len(c) > 1]
    return {"mentions": len(texts), "texts": len({t for t, _ in counts}),
            "varying_texts": len(varying),
            "varying_mentions": sum(sum(c.values()) for c in varying),
            "minority_mentions": sum(sum(c.values()) - max(c.values()) for c in varying)}


def scan(gold_keys: list[str], lists: list[list[tuple[str, float]]],
         signal: Callable[[int, str], float], weights: Sequence[float], top: int,
         chars: int) -> list[dict]:
    """acc@1 and same-category errors of the lists re-ordered by score + weight x signal."""
    rows = []
    values = [[signal(i, code) for code, _ in cands[:top]] for i, cands in enumerate(lists)]
    for weight in weights:
        right = same_category = 0
        for key, cands, vals in zip(gold_keys, lists, values):
            if not cands:
                continue
            best = max(range(len(vals)), key=lambda j: cands[j][1] + weight * vals[j])
            code = cands[best][0]
            right += code == key
            same_category += code != key and code[:chars] == key[:chars]
        rows.append({"weight": weight, "acc@1": round(right / max(1, len(lists)), 4),
                     "same_category_errors": int(same_category)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a job config with a ranker")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gold", required=True)
    parser.add_argument("--gold-text", required=True, help="the gold corpus's text files")
    parser.add_argument("--gold-format", default="codiesp")
    parser.add_argument("--train-gold", required=True)
    parser.add_argument("--train-text", required=True)
    parser.add_argument("--labels", default="", help="comma-separated mention labels to keep")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=100.0)
    parser.add_argument("--category-chars", type=int, default=3)
    parser.add_argument("--weights", default="0,0.05,0.1,0.2,0.5,1,2,4,8")
    args = parser.parse_args(argv)

    from clinlinker_spark.commands.evaluate import read_gold_corpus
    from clinlinker_spark.config import load_config
    from clinlinker_spark.linker import Linker
    from clinlinker_spark.text import normalize_code, normalize_text

    def read(path: str, text_dir: str):
        """The mentions of ``path`` with their sentences, read as ``clinlinker evaluate``
        reads its gold corpus."""
        return read_gold_corpus(path, args.gold_format, text_dir, args.labels)

    config = load_config(args.config, args.set)
    linker = Linker.from_config(config)
    gold, train = read(args.gold, args.gold_text), read(args.train_gold, args.train_text)
    ranked, _ = linker.link_texts(gold["text"].fillna("").tolist())
    lists = [[(normalize_code(c.code), float(c.ranker_score or 0.0)) for c in cands[:args.top]]
             for cands in ranked]
    keys = gold["code"].map(normalize_code).tolist()
    weights = [float(w) for w in args.weights.split(",")]
    where = list(zip(gold["context"], gold["context_start"], gold["context_end"]))
    common = {"mentions": len(gold), "top": args.top, "config": args.config}

    windows = [normalize_text(window_text(t, *w, args.window)) for t, w in zip(gold["text"], where)]
    hits = linker.index.search(linker.encoder.encode(windows), config.linking.search_k)
    best: list[dict[str, float]] = []
    for scores, positions in zip(hits.scores, hits.positions):
        found: dict[str, float] = {}
        for s, p in zip(scores.tolist(), positions.tolist()):
            for _, key, _ in (linker.index.code_rows(p) if p >= 0 else ()):
                found.setdefault(key, s)
        best.append(found)
    floor = [min(f.values(), default=0.0) for f in best]
    print(json.dumps({"signal": "sentence_embedding", "window": args.window, **common,
                      "rows": scan(keys, lists, lambda i, c: best[i].get(c, floor[i]),
                                   weights, args.top, args.category_chars)}), flush=True)

    model = SentenceWords(
        train["code"].map(normalize_code).tolist(),
        [side_words(*w) for w in zip(train["context"], train["context_start"],
                                      train["context_end"])],
        args.alpha, args.category_chars)
    words = [side_words(*w) for w in where]
    print(json.dumps({"signal": "sentence_words", "alpha": args.alpha, **common,
                      "rows": scan(keys, lists, lambda i, c: model.score(c, words[i]),
                                   weights, args.top, args.category_chars)}), flush=True)

    texts = gold["text"].fillna("").map(normalize_text).tolist()
    firsts: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for doc, text, cands in zip(gold["doc_id"], texts, lists):
        if cands:
            firsts[doc][cands[0][0]].add(text)
    docs = gold["doc_id"].tolist()
    print(json.dumps({"signal": "document", **common, "rows": scan(
        keys, lists, lambda i, c: float(bool(firsts[docs[i]].get(c, set()) - {texts[i]})),
        weights, args.top, args.category_chars)}), flush=True)

    chars = args.category_chars
    train_texts = train["text"].fillna("").map(normalize_text).tolist()
    train_codes = train["code"].map(normalize_code).tolist()
    seen: dict[str, set[str]] = defaultdict(set)
    for text, code in zip(train_texts, train_codes):
        seen[text].add(code)
    errors = [(text, cands[0][0]) for text, key, cands in zip(texts, keys, lists)
              if cands and cands[0][0] != key and cands[0][0][:chars] == key[:chars]]
    print(json.dumps({"signal": "ambiguity", **common, "category_chars": chars,
                      "train": ambiguity(train_texts, train_codes, chars),
                      "gold": ambiguity(texts, keys, chars),
                      "same_category_errors": {
                          "errors": len(errors),
                          "text_unseen_in_training": sum(t not in seen for t, _ in errors),
                          "code_given_to_text_in_training": sum(c in seen.get(t, ())
                                                                for t, c in errors)}}),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
