"""Clinical variables from code assignments: definitions, is-a closure, matching, validation.

A clinical variable ("type 2 diabetes", "heart failure") is a set of terminology codes that
count as evidence for it. Definitions live in YAML (``conf/variables/*.yaml``)::

    variables:
      - name: type2_diabetes            # [A-Za-z0-9_.-]+, unique over all files
        description: Diabetes mellitus tipo 2
        codes: [E11.9]                  # explicit codes (compared with text.normalize_code)
        code_prefixes: [E11]            # ICD-10 style hierarchy: every code starting with E11
        descendants_of: [44054006]      # SNOMED-CT: these concepts and their is-a descendants
        include_self: true              # descendants_of includes the given concepts themselves
        labels: [DIAGNOSTICO]           # optional: only mentions with one of these labels
        min_score: 0.5                  # optional: only assignments with score >= min_score
        include_negated: false          # negated mentions count? (only where such a column exists)
        include_uncertain: false        # uncertain mentions count? (idem)
        include_needs_review: false     # links with status needs_review count too?

A file holds either a ``variables:`` list or a single definition mapping. Keys are strict
(a typo is an error naming the file and the key), and a variable needs at least one of
``codes``, ``code_prefixes`` or ``descendants_of``.

Only code assignments with status ``linked`` count. A link whose ranker confidence is below
the link job's ``linking.review_below`` has status ``needs_review`` (it keeps its code); it
counts only for variables that set ``include_needs_review: true``.

``descendants_of`` needs an is-a table (:func:`read_isa_table`): a SNOMED-CT RF2 relationship
snapshot (rows with ``typeId`` 116680003 |Is a| and ``active`` 1; ``sourceId`` is the child,
``destinationId`` the parent) or any two-column child/parent CSV, TSV or Parquet table. The
closure is computed by :meth:`IsaGraph.descendants`; a cycle is an :class:`IsaCycleError`
naming the concepts on it.

Each definition expands (:func:`expand_definitions`) to an :class:`ExpandedVariable`: a set of
code keys, prefix rules and the row filters, with a ``definition_hash`` over everything that
decides which rows count (the expanded code set included, so a new is-a release or an edited
code list changes the hash; the description does not). :class:`VariableMatcher` applies the
variables to a batch of code-assignment rows (pandas), the function the Spark job runs per
Arrow batch. :func:`coverage` says how many of a variable's codes an index's terminology holds.

This module is core: no pyspark import. Nothing here logs mention text.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from clinlinker_spark.config import (
    MlflowConfig, SparkConfig, TableRef, check_writer, from_dict, table_ref,
)
from clinlinker_spark.errors import ConfigError, InputDataError
from clinlinker_spark.linker import STATUS_LINKED, STATUS_NEEDS_REVIEW
from clinlinker_spark.text import normalize_code

log = logging.getLogger(__name__)

HASH_FORMAT = 1  # bump when the hashed payload changes shape
SNOMED_IS_A = "116680003"
# the statuses whose code can count for a variable (needs_review only where a variable opts in)
COUNTED_STATUSES = (STATUS_LINKED, STATUS_NEEDS_REVIEW)
ISA_FORMATS = ("auto", "rf2", "csv", "tsv", "parquet")
DOCUMENT_FORMATS = ("delta", "parquet", "csv", "tsv")
UNITS = ("auto", "patient", "document")
WRITERS = ("auto", "delta-spark", "deltalake")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE_STRINGS = frozenset({"true", "t", "1", "yes", "y"})


class IsaCycleError(InputDataError):
    """The is-a table has a cycle (a concept is its own ancestor)."""


# --------------------------------------------------------------------------------------------
# Definitions


@dataclass(frozen=True)
class VariableDefinition:
    """One clinical variable as written in YAML (see the module docstring)."""

    name: str
    description: str = ""
    codes: tuple[str, ...] = ()
    code_prefixes: tuple[str, ...] = ()
    descendants_of: tuple[str, ...] = ()
    include_self: bool = True
    labels: tuple[str, ...] = ()
    min_score: float | None = None
    include_negated: bool = False
    include_uncertain: bool = False
    include_needs_review: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name or ""):
            raise ConfigError(
                f"variable name {self.name!r} must match {_NAME.pattern} (letters, digits, "
                "_ . -)"
            )
        if not (self.codes or self.code_prefixes or self.descendants_of):
            raise ConfigError(
                f"variable {self.name!r} names no codes: give codes, code_prefixes or "
                "descendants_of"
            )
        for what, values in (("codes", self.codes), ("code_prefixes", self.code_prefixes),
                             ("descendants_of", self.descendants_of), ("labels", self.labels)):
            if any(not str(v).strip() for v in values):
                raise ConfigError(f"variable {self.name!r}: {what} has an empty entry")
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise ConfigError(f"variable {self.name!r}: min_score must be a finite number")


def parse_definitions(data: Any, source: str = "<definitions>") -> tuple[VariableDefinition, ...]:
    """Definitions from parsed YAML: ``{"variables": [...]}`` or one definition mapping."""
    if data is None:
        raise ConfigError(f"{source}: empty variable definition file")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: must hold a mapping (a 'variables' list or one variable)")
    if "variables" in data:
        extra = sorted(set(data) - {"variables"})
        if extra:
            raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(extra)}; a file "
                              "holds 'variables' (a list) or one variable's keys")
        items = data["variables"]
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{source}: 'variables' must be a non-empty list")
        where = [f"{source}: variables[{i}]." for i in range(len(items))]
    else:
        items, where = [data], [f"{source}: "]
    out = []
    for item, prefix in zip(items, where):
        if not isinstance(item, Mapping):
            raise ConfigError(f"{prefix.rstrip('. ')} must be a mapping")
        if not item.get("name"):
            raise ConfigError(f"{prefix.rstrip('. ')}: a variable needs a name")
        try:
            out.append(from_dict(VariableDefinition, item, where=prefix))
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith(source)
                              else f"{prefix.rstrip('. ')}: {message}") from None
    return tuple(out)


def definition_files(patterns: Sequence[str]) -> list[Path]:
    """The files named by ``patterns`` (paths or globs), sorted per pattern, de-duplicated."""
    files: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
            if not matched:
                raise ConfigError(f"no variable definition file matches {pattern!r}")
        else:
            if not Path(pattern).is_file():
                raise ConfigError(f"variable definition file not found: {pattern}")
            matched = [Path(pattern)]
        files += [p for p in matched if p not in files]
    if not files:
        raise ConfigError("no variable definition files given (definitions is empty)")
    return files


def load_definitions(patterns: Sequence[str]) -> tuple[VariableDefinition, ...]:
    """Read every definition file named by ``patterns``; names must be unique over all files."""
    seen: dict[str, Path] = {}
    out: list[VariableDefinition] = []
    for path in definition_files(patterns):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        for definition in parse_definitions(data, str(path)):
            if definition.name in seen:
                raise ConfigError(f"variable {definition.name!r} is defined twice: in "
                                  f"{seen[definition.name]} and {path}")
            seen[definition.name] = path
            out.append(definition)
    log.info("read %d variable definition(s) from %d file(s)", len(out), len(set(seen.values())))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Is-a graph


class IsaGraph:
    """Is-a relations as parent -> children lists, over normalised concept ids."""

    def __init__(self, children: Mapping[str, Sequence[str]]):
        self._children = {p: tuple(sorted(set(cs))) for p, cs in children.items()}
        nodes = set(self._children)
        for cs in self._children.values():
            nodes.update(cs)
        self._nodes = frozenset(nodes)

    @classmethod
    def from_edges(cls, edges: Iterable[tuple[str, str]]) -> "IsaGraph":
        """Build from (child, parent) pairs; ids are normalised with ``normalize_code``."""
        children: dict[str, set[str]] = {}
        for child, parent in edges:
            children.setdefault(normalize_code(parent), set()).add(normalize_code(child))
        return cls({p: sorted(cs) for p, cs in children.items()})

    def __contains__(self, concept: object) -> bool:
        return isinstance(concept, str) and normalize_code(concept) in self._nodes

    @property
    def n_concepts(self) -> int:
        return len(self._nodes)

    @property
    def n_edges(self) -> int:
        return sum(len(cs) for cs in self._children.values())

    def children(self, concept: str) -> tuple[str, ...]:
        return self._children.get(normalize_code(concept), ())

    def descendants(self, roots: Iterable[str], include_self: bool = True) -> frozenset[str]:
        """Every concept below ``roots`` (transitively), plus the roots when ``include_self``.

        Raises IsaCycleError when a cycle is reachable from a root. A root that is not in the
        graph has no descendants (it is still returned with ``include_self``).
        """
        keys = [normalize_code(r) for r in roots]
        below = self._walk(keys)
        if include_self:
            return frozenset(below | set(keys))
        # a root is excluded unless it is also below another root
        strict: set[str] = set()
        for key in set(keys):
            for child in self._children.get(key, ()):
                strict |= self._walk([child])
        return frozenset(strict)

    def check_acyclic(self) -> None:
        """Raise IsaCycleError when the graph has a cycle anywhere."""
        self._walk(sorted(self._nodes))

    def _walk(self, roots: Sequence[str]) -> set[str]:
        """Roots and everything below them; iterative depth-first search with cycle check."""
        state: dict[str, int] = {}  # 1: on the current path, 2: done
        reached: set[str] = set()
        for root in roots:
            if state.get(root) == 2:
                continue
            state[root] = 1
            reached.add(root)
            path = [root]
            stack: list[Iterator[str]] = [iter(self._children.get(root, ()))]
            while stack:
                child = next(stack[-1], None)
                if child is None:
                    stack.pop()
                    state[path.pop()] = 2
                    continue
                seen = state.get(child)
                if seen == 1:
                    cycle = path[path.index(child):] + [child]
                    shown = cycle if len(cycle) <= 21 else cycle[:10] + ["..."] + cycle[-10:]
                    raise IsaCycleError(
                        f"the is-a table has a cycle ({len(cycle) - 1} concept(s), parent -> "
                        f"child): {' -> '.join(shown)}; an is-a hierarchy must be acyclic"
                    )
                if seen is None:
                    state[child] = 1
                    reached.add(child)
                    path.append(child)
                    stack.append(iter(self._children.get(child, ())))
        return reached


def read_isa_table(
    path: str | Path,
    format: str = "auto",
    child_column: str = "child",
    parent_column: str = "parent",
) -> IsaGraph:
    """Read an is-a table into an :class:`IsaGraph`.

    ``format``: ``rf2`` (SNOMED-CT RF2 relationship file, tab-separated with its header: rows
    with typeId 116680003 and active 1 are kept, sourceId = child, destinationId = parent; a
    full release with several rows per relationship id keeps the latest effectiveTime),
    ``csv`` / ``tsv`` / ``parquet`` (columns ``child_column`` and ``parent_column``), or
    ``auto`` (parquet by extension, rf2 when the header has sourceId/destinationId/typeId,
    else csv for ``.csv`` and tsv otherwise).
    """
    if format not in ISA_FORMATS:
        raise ConfigError(f"isa.format must be one of {', '.join(ISA_FORMATS)}; got {format!r}")
    p = Path(path)
    if not p.is_file():
        raise InputDataError(f"is-a table not found: {p}")
    if format == "auto":
        format = _detect_isa_format(p)
    if format == "rf2":
        frame = _read_rf2(p)
        child_column, parent_column = "sourceId", "destinationId"
    else:
        frame = _read_two_columns(p, format, child_column, parent_column)
    child = frame[child_column].astype(str).str.strip()
    parent = frame[parent_column].astype(str).str.strip()
    ok = (child != "") & (parent != "")
    if not ok.all():
        log.warning("is-a table %s: %d row(s) with an empty id skipped", p, int((~ok).sum()))
    graph = IsaGraph.from_edges(zip(child[ok].tolist(), parent[ok].tolist()))
    log.info("is-a table %s (%s): %d relations over %d concepts", p, format, graph.n_edges,
             graph.n_concepts)
    return graph


def _detect_isa_format(p: Path) -> str:
    if p.suffix.lower() == ".parquet":
        return "parquet"
    with p.open(encoding="utf-8-sig") as fh:
        header = fh.readline()
    if {"sourceId", "destinationId", "typeId"} <= set(header.rstrip("\r\n").split("\t")):
        return "rf2"
    return "csv" if p.suffix.lower() == ".csv" else "tsv"


def _read_rf2(p: Path) -> pd.DataFrame:
    import csv

    try:
        frame = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False,
                            quoting=csv.QUOTE_NONE, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputDataError(f"{p}: not a readable RF2 relationship file ({exc})") from None
    needed = ["active", "typeId", "sourceId", "destinationId"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise InputDataError(f"{p}: RF2 relationship file lacks column(s) {missing}; "
                             f"its columns are {list(frame.columns)}")
    if {"id", "effectiveTime"} <= set(frame.columns) and frame["id"].duplicated().any():
        frame = frame.sort_values(["id", "effectiveTime"]).drop_duplicates("id", keep="last")
    kept = frame[(frame["typeId"].str.strip() == SNOMED_IS_A)
                 & (frame["active"].str.strip() == "1")]
    log.info("RF2 %s: %d of %d relationship rows are active is-a", p, len(kept), len(frame))
    return kept


def _read_two_columns(p: Path, format: str, child_column: str, parent_column: str
                      ) -> pd.DataFrame:
    try:
        if format == "parquet":
            frame = pd.read_parquet(p)
        else:
            frame = pd.read_csv(p, sep="," if format == "csv" else "\t", dtype=str,
                                keep_default_na=False, encoding="utf-8-sig", comment=None)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a data problem
        raise InputDataError(f"{p}: not a readable {format} is-a table ({exc})") from None
    missing = [c for c in (child_column, parent_column) if c not in frame.columns]
    if missing:
        raise InputDataError(
            f"is-a table {p} lacks column(s) {missing} (isa.child_column / isa.parent_column); "
            f"its columns are {list(frame.columns)}"
        )
    return frame[[child_column, parent_column]].fillna("")


# --------------------------------------------------------------------------------------------
# Expansion


@dataclass(frozen=True)
class ExpandedVariable:
    """A definition resolved to the rules rows are matched with (plain values only).

    ``code_keys``: normalised codes that count (explicit codes + is-a descendants);
    ``prefixes``: normalised prefixes (a code counts when its key starts with one);
    ``labels``: empty = any label; ``min_score``: None = any score;
    ``include_needs_review``: rows with status needs_review count too.
    """

    name: str
    code_keys: frozenset[str]
    prefixes: tuple[str, ...]
    labels: frozenset[str]
    min_score: float | None
    include_negated: bool
    include_uncertain: bool
    definition_hash: str
    description: str = ""
    roots_not_in_isa: tuple[str, ...] = ()
    include_needs_review: bool = False


def expand_definition(definition: VariableDefinition, isa: IsaGraph | None = None
                      ) -> ExpandedVariable:
    """Resolve one definition (is-a descendants included) and hash it."""
    keys = {normalize_code(c) for c in definition.codes}
    missing_roots: tuple[str, ...] = ()
    if definition.descendants_of:
        if isa is None:
            raise ConfigError(
                f"variable {definition.name!r} uses descendants_of but no is-a table is "
                "configured (set isa.path)"
            )
        roots = [normalize_code(r) for r in definition.descendants_of]
        missing_roots = tuple(sorted(r for r in set(roots) if r not in isa))
        if missing_roots:
            log.warning("variable %s: %d descendants_of concept(s) are not in the is-a table: %s",
                        definition.name, len(missing_roots), ", ".join(missing_roots))
        keys |= isa.descendants(roots, include_self=definition.include_self)
    prefixes = tuple(sorted({normalize_code(p) for p in definition.code_prefixes}))
    labels = frozenset(str(label) for label in definition.labels)
    payload = {
        "format": HASH_FORMAT,
        "name": definition.name,
        "code_keys": sorted(keys),
        "prefixes": list(prefixes),
        "labels": sorted(labels),
        "min_score": definition.min_score,
        "include_negated": definition.include_negated,
        "include_uncertain": definition.include_uncertain,
    }
    if definition.include_needs_review:  # absent when false: older definitions keep their hash
        payload["include_needs_review"] = True
    digest = hashlib.sha256(
        json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
    ).hexdigest()
    return ExpandedVariable(
        name=definition.name,
        code_keys=frozenset(keys),
        prefixes=prefixes,
        labels=labels,
        min_score=definition.min_score,
        include_negated=definition.include_negated,
        include_uncertain=definition.include_uncertain,
        definition_hash=digest,
        description=definition.description,
        roots_not_in_isa=missing_roots,
        include_needs_review=definition.include_needs_review,
    )


def expand_definitions(definitions: Sequence[VariableDefinition], isa: IsaGraph | None = None
                       ) -> tuple[ExpandedVariable, ...]:
    """:func:`expand_definition` for each definition, in order."""
    out = tuple(expand_definition(d, isa) for d in definitions)
    for v in out:
        log.info("variable %s: %d code(s), %d prefix(es), hash %s", v.name, len(v.code_keys),
                 len(v.prefixes), v.definition_hash[:12])
    return out


def needs_isa(definitions: Sequence[VariableDefinition]) -> bool:
    return any(d.descendants_of for d in definitions)


# --------------------------------------------------------------------------------------------
# Matching


class VariableMatcher:
    """Which rows of a code-assignment batch count for which variable.

    A row counts for variable v when: its ``status`` is ``linked``, or ``needs_review`` when v
    includes such rows (when the batch has a status column), its code's key is in
    ``v.code_keys`` or starts with one of ``v.prefixes``, its label is in ``v.labels`` (when
    v has labels), its score >= ``v.min_score`` (when set;
    a null score then fails), and, when the batch has the negation/uncertainty column, it is
    not flagged negated (uncertain) unless v includes negated (uncertain) mentions. A null
    flag counts as not negated (not uncertain).
    """

    def __init__(self, variables: Sequence[ExpandedVariable]):
        names = [v.name for v in variables]
        if len(set(names)) != len(names):
            raise ConfigError("variable names must be unique")
        self.variables = tuple(variables)
        self._exact: dict[str, list[int]] = {}
        self._prefix: dict[str, list[int]] = {}
        for i, v in enumerate(self.variables):
            for key in v.code_keys:
                self._exact.setdefault(key, []).append(i)
            for prefix in v.prefixes:
                self._prefix.setdefault(prefix, []).append(i)
        self._prefix_lengths = sorted({len(p) for p in self._prefix})
        self._min_scores = np.array(
            [-np.inf if v.min_score is None else v.min_score for v in self.variables], dtype=float
        )
        self._has_min = np.array([v.min_score is not None for v in self.variables], dtype=bool)
        self._takes_review = np.array([v.include_needs_review for v in self.variables],
                                      dtype=bool)
        self._cache: dict[str, tuple[int, ...]] = {}

    def variables_for_code(self, code: Any) -> tuple[int, ...]:
        """Indices (into ``variables``) of the variables whose codes include ``code``."""
        if code is None or (isinstance(code, float) and math.isnan(code)):
            return ()
        code = str(code)
        hit = self._cache.get(code)
        if hit is None:
            key = normalize_code(code)
            found = set(self._exact.get(key, ()))
            for n in self._prefix_lengths:
                if n > len(key):
                    break
                found.update(self._prefix.get(key[:n], ()))
            hit = tuple(sorted(found))
            if len(self._cache) < 100_000:
                self._cache[code] = hit
        return hit

    def match(
        self,
        frame: pd.DataFrame,
        code_column: str = "code",
        label_column: str = "label",
        score_column: str = "score",
        status_column: str = "status",
        negated_column: str | None = "negated",
        uncertain_column: str | None = "uncertain",
    ) -> pd.DataFrame:
        """(row, variable) pairs: ``row`` is the 0-based position in ``frame``.

        Columns that are absent from ``frame`` are not filtered on (label, status, negated,
        uncertain); ``code`` is required, and ``score`` when a variable sets min_score.
        Pairs are ordered by row, then by variable order.
        """
        if code_column not in frame.columns:
            raise InputDataError(f"code-assignment rows have no {code_column!r} column")
        n = len(frame)
        empty = pd.DataFrame({"row": pd.Series([], dtype="int64"),
                              "variable": pd.Series([], dtype=object)})
        if n == 0 or not self.variables:
            return empty
        codes = frame[code_column].tolist()
        review = np.zeros(n, dtype=bool)  # rows with status needs_review
        if status_column and status_column in frame.columns:
            statuses = frame[status_column].tolist()
            counted = (COUNTED_STATUSES if self._takes_review.any() else (STATUS_LINKED,))
            hits = [self.variables_for_code(c) if s in counted else ()
                    for c, s in zip(codes, statuses)]
            review = np.fromiter((s == STATUS_NEEDS_REVIEW for s in statuses), dtype=bool,
                                 count=n)
        else:
            hits = [self.variables_for_code(c) for c in codes]
        counts = np.fromiter((len(h) for h in hits), dtype=np.int64, count=n)
        if counts.sum() == 0:
            return empty
        rows = np.repeat(np.arange(n, dtype=np.int64), counts)
        vidx = np.fromiter((i for h in hits for i in h), dtype=np.int64, count=int(counts.sum()))
        keep = ~review[rows] | self._takes_review[vidx]

        if self._has_min[vidx].any():
            if score_column not in frame.columns:
                raise InputDataError(f"a variable sets min_score but the rows have no "
                                     f"{score_column!r} column")
            scores = pd.to_numeric(frame[score_column], errors="coerce").to_numpy(dtype=float)
            pair_scores = scores[rows]
            with np.errstate(invalid="ignore"):
                ok = pair_scores >= self._min_scores[vidx]
            keep &= ~self._has_min[vidx] | ok

        labelled = np.array([bool(v.labels) for v in self.variables], dtype=bool)
        if labelled[vidx].any():
            labels = (frame[label_column].tolist() if label_column in frame.columns
                      else [None] * n)
            for j in np.flatnonzero(labelled[vidx] & keep):
                if labels[rows[j]] not in self.variables[vidx[j]].labels:
                    keep[j] = False

        for column, attr in ((negated_column, "include_negated"),
                             (uncertain_column, "include_uncertain")):
            if not column or column not in frame.columns:
                continue
            flags = as_flags(frame[column])[rows]
            allowed = np.array([getattr(v, attr) for v in self.variables], dtype=bool)[vidx]
            keep &= allowed | ~flags

        names = np.array([v.name for v in self.variables], dtype=object)
        return pd.DataFrame({"row": rows[keep], "variable": names[vidx[keep]]})

    def evidence(self, frame: pd.DataFrame, **columns: Any) -> pd.DataFrame:
        """The matched rows of ``frame`` (index reset) with a ``variable`` column added."""
        pairs = self.match(frame, **columns)
        out = frame.iloc[pairs["row"].to_numpy()].reset_index(drop=True)
        out["variable"] = pairs["variable"].to_numpy()
        return out


def as_flags(values: pd.Series) -> np.ndarray:
    """Booleans of a negation/uncertainty column: True, 1, "true"/"yes"/"1" -> True; null,
    False, 0 and anything else -> False."""
    def flag(v: Any) -> bool:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, (int, np.integer, float)):
            return v != 0
        return str(v).strip().lower() in _TRUE_STRINGS

    return np.fromiter((flag(v) for v in values.tolist()), dtype=bool, count=len(values))


# --------------------------------------------------------------------------------------------
# Validation against an index's terminology


@dataclass(frozen=True)
class VariableCoverage:
    """How much of a variable an index's terminology can produce.

    ``codes``: explicit + descendant code keys; ``codes_in_index``: how many of them the
    index holds; ``prefixes`` / ``prefixes_in_index``: prefix rules, and how many match at
    least one index code; ``index_codes``: distinct index codes the variable accepts (0: the
    linker can never produce evidence for it); ``missing_codes``: a few codes not in the index.
    """

    name: str
    codes: int
    codes_in_index: int
    prefixes: int
    prefixes_in_index: int
    index_codes: int
    missing_codes: tuple[str, ...] = ()
    missing_prefixes: tuple[str, ...] = ()

    @property
    def can_produce(self) -> bool:
        return self.index_codes > 0


def coverage(variables: Sequence[ExpandedVariable], index_code_keys: Iterable[str],
             examples: int = 5) -> list[VariableCoverage]:
    """Per variable, how many of its codes and prefixes exist among ``index_code_keys``."""
    keys = sorted({normalize_code(k) for k in index_code_keys})
    key_set = set(keys)
    out = []
    for v in variables:
        in_index = v.code_keys & key_set
        accepted = set(in_index)
        matching_prefixes = 0
        missing_prefixes = []
        for prefix in v.prefixes:
            start = bisect_left(keys, prefix)
            end = start
            while end < len(keys) and keys[end].startswith(prefix):
                accepted.add(keys[end])
                end += 1
            if end > start:
                matching_prefixes += 1
            else:
                missing_prefixes.append(prefix)
        out.append(VariableCoverage(
            name=v.name,
            codes=len(v.code_keys),
            codes_in_index=len(in_index),
            prefixes=len(v.prefixes),
            prefixes_in_index=matching_prefixes,
            index_codes=len(accepted),
            missing_codes=tuple(sorted(v.code_keys - key_set)[:examples]),
            missing_prefixes=tuple(missing_prefixes[:examples]),
        ))
    return out


def index_code_keys(index_path: str | Path) -> set[str]:
    """The distinct ``code_key`` values of an index directory's rows.parquet."""
    from clinlinker_spark.index import ROWS_FILE, read_manifest

    p = Path(index_path)
    read_manifest(p)
    rows = p / ROWS_FILE
    if not rows.is_file():
        from clinlinker_spark.errors import ArtifactError

        raise ArtifactError(f"index directory {p} is incomplete: no {ROWS_FILE}")
    return set(pd.read_parquet(rows, columns=["code_key"])["code_key"].astype(str))


def format_coverage(report: Sequence[VariableCoverage]) -> str:
    """A plain-text table of :func:`coverage` (the ``--validate`` output)."""
    header = ("variable", "codes", "in index", "prefixes", "matching", "index codes", "status")
    lines = [[r.name, str(r.codes), str(r.codes_in_index), str(r.prefixes),
              str(r.prefixes_in_index), str(r.index_codes),
              "ok" if r.can_produce else "CANNOT PRODUCE ANY EVIDENCE"] for r in report]
    widths = [max(len(row[i]) for row in [list(header), *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths[:-1]))
    text = [fmt.format(*header[:-1]) + "  " + header[-1]]
    text += [fmt.format(*row[:-1]) + "  " + row[-1] for row in lines]
    notes = []
    for r in report:
        if r.missing_codes:
            notes.append(f"  {r.name}: codes not in the index (first {len(r.missing_codes)}): "
                         + ", ".join(r.missing_codes))
        if r.missing_prefixes:
            notes.append(f"  {r.name}: prefixes matching no index code: "
                         + ", ".join(r.missing_prefixes))
    if notes:
        text += ["", "notes:", *notes]
    return "\n".join(text)


# --------------------------------------------------------------------------------------------
# Job configuration (conf/variables.yaml)


@dataclass(frozen=True)
class AssignmentsTableConfig:
    """The code-assignment Delta table the variables are built from."""

    path: str = ""  # a folder, or:
    table: str = ""  # a catalog table (catalog.schema.table)
    # Optional boolean columns (e.g. pass-through columns of the link job's input); filtered
    # on only when the table has them.
    negated_column: str = "negated"
    uncertain_column: str = "uncertain"

    def __post_init__(self) -> None:
        table_ref(self.path, self.table, "assignments.path", "assignments.table", False)

    @property
    def target(self) -> TableRef:
        return table_ref(self.path, self.table, "assignments.path", "assignments.table")


@dataclass(frozen=True)
class DocumentsConfig:
    """Where a mention's patient and date come from (via its ``doc_id``).

    With ``path``: a documents table (one row per doc_id) read in ``format``. Without it,
    ``patient_id_column`` / ``date_column`` (when set) are columns of the assignments table
    itself. Empty ``patient_id_column``: the unit is the document; empty ``date_column``:
    first_seen/last_seen are null.
    """

    path: str = ""
    format: str = "delta"  # delta | parquet | csv | tsv (csv/tsv with a header line)
    doc_id_column: str = "doc_id"
    patient_id_column: str = ""
    date_column: str = ""

    def __post_init__(self) -> None:
        if self.format not in DOCUMENT_FORMATS:
            raise ConfigError(f"documents.format must be one of {', '.join(DOCUMENT_FORMATS)}; "
                              f"got {self.format!r}")
        if self.path and not self.doc_id_column:
            raise ConfigError("documents.doc_id_column must name a column when documents.path "
                              "is set")


@dataclass(frozen=True)
class IsaConfig:
    """The is-a table for ``descendants_of`` (see :func:`read_isa_table`)."""

    path: str = ""
    format: str = "auto"  # auto | rf2 | csv | tsv | parquet
    child_column: str = "child"
    parent_column: str = "parent"

    def __post_init__(self) -> None:
        if self.format not in ISA_FORMATS:
            raise ConfigError(f"isa.format must be one of {', '.join(ISA_FORMATS)}; "
                              f"got {self.format!r}")


@dataclass(frozen=True)
class VariablesOutputConfig:
    path: str = ""  # a folder, or:
    table: str = ""  # a catalog table (catalog.schema.table), written with delta-spark
    writer: str = "auto"  # auto | delta-spark | deltalake
    # False: rows only for units with evidence (present = true). True: also a present = false
    # row for every (unit, variable) without evidence, for every unit that has at least one
    # row (any status) in the code-assignment table.
    emit_absent: bool = False

    def __post_init__(self) -> None:
        if self.writer not in WRITERS:
            raise ConfigError(f"output.writer must be one of {', '.join(WRITERS)}; "
                              f"got {self.writer!r}")
        check_writer("output", self.writer,
                     table_ref(self.path, self.table, "output.path", "output.table", False))

    @property
    def target(self) -> TableRef:
        return table_ref(self.path, self.table, "output.path", "output.table")


def _default_spark() -> SparkConfig:
    return SparkConfig(master="local[2]", app_name="clinlinker-variables", driver_memory="2g",
                       shuffle_partitions=4)


@dataclass(frozen=True)
class VariablesJobConfig:
    """The variables job's whole configuration (conf/variables.yaml)."""

    spark: SparkConfig = field(default_factory=_default_spark)
    assignments: AssignmentsTableConfig = field(default_factory=AssignmentsTableConfig)
    documents: DocumentsConfig = field(default_factory=DocumentsConfig)
    definitions: tuple[str, ...] = ("conf/variables/*.yaml",)  # files or globs
    isa: IsaConfig = field(default_factory=IsaConfig)
    index_path: str = ""  # the index the assignments came from; for --validate and warnings
    unit: str = "auto"  # auto (patient when documents.patient_id_column is set) | patient |
    #                     document
    output: VariablesOutputConfig = field(default_factory=VariablesOutputConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ConfigError(f"unit must be one of {', '.join(UNITS)}; got {self.unit!r}")
        if self.unit == "patient" and not self.documents.patient_id_column:
            raise ConfigError("unit: patient needs documents.patient_id_column")
        if not self.definitions:
            raise ConfigError("definitions must name at least one file or glob")

    @property
    def unit_type(self) -> str:
        """``patient`` or ``document``."""
        if self.unit == "auto":
            return "patient" if self.documents.patient_id_column else "document"
        return self.unit


def load_variables(config: VariablesJobConfig) -> tuple[ExpandedVariable, ...]:
    """Read the definitions (and the is-a table when one is needed) and expand them."""
    definitions = load_definitions(config.definitions)
    isa = None
    if needs_isa(definitions):
        if not config.isa.path:
            users = [d.name for d in definitions if d.descendants_of]
            raise ConfigError(f"variable(s) {', '.join(users)} use descendants_of: set isa.path "
                              "to an is-a table (SNOMED-CT RF2 relationships or child/parent)")
        isa = read_isa_table(config.isa.path, config.isa.format, config.isa.child_column,
                             config.isa.parent_column)
    elif config.isa.path:
        log.info("isa.path is set but no variable uses descendants_of; not read")
    return expand_definitions(definitions, isa)


def validate_variables(config: VariablesJobConfig,
                       variables: Sequence[ExpandedVariable] | None = None
                       ) -> list[VariableCoverage]:
    """Coverage of each variable in the index at ``config.index_path``."""
    if not config.index_path:
        raise ConfigError("index_path is empty: set it to the index the code assignments come "
                          "from (the link job's index.path)")
    if variables is None:
        variables = load_variables(config)
    return coverage(variables, index_code_keys(config.index_path))


def to_plain(variable: ExpandedVariable) -> dict[str, Any]:
    """A JSON-serialisable dict of an expanded variable (for summaries)."""
    d = dataclasses.asdict(variable)
    d["code_keys"] = sorted(variable.code_keys)
    d["labels"] = sorted(variable.labels)
    d["prefixes"] = list(variable.prefixes)
    d["roots_not_in_isa"] = list(variable.roots_not_in_isa)
    return d
