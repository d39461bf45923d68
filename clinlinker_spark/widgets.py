"""Databricks notebook widgets -> ``--set`` style config overrides (the notebooks' only
mapping from widget values to config keys)."""

from __future__ import annotations

from collections.abc import Mapping

# widget name -> config key of the link, index and evaluation notebooks (conf/job.yaml keys)
LINK_WIDGETS = {
    "input_table": "input.table",
    "input_path": "input.path",
    "input_format": "input.format",
    "output_table": "output.table",
    "output_path": "output.path",
    "form_cache_table": "output.form_cache_table",
    "index_path": "index.path",
    "encoder_path": "encoder.path",
    "reranker_path": "reranker.path",
    "top_k": "linking.top_k",
    "incremental": "output.incremental",
    "store_text": "output.store_text",
}
# widget name -> config key of the variables notebook (conf/variables.yaml keys)
VARIABLES_WIDGETS = {
    "assignments_table": "assignments.table",
    "assignments_path": "assignments.path",
    "documents_path": "documents.path",
    "patient_id_column": "documents.patient_id_column",
    "date_column": "documents.date_column",
    "definitions": "definitions",
    "isa_path": "isa.path",
    "index_path": "index_path",
    "output_table": "output.table",
    "output_path": "output.path",
    "emit_absent": "output.emit_absent",
}
# widgets that take a comma-separated list (a YAML list in the override)
LIST_WIDGETS = frozenset({"definitions"})
# a config names a table by path or by catalog name, never both: a widget that sets one of a
# pair clears the other (which the config YAML may set)
_PAIRED = (("input.path", "input.table"), ("output.path", "output.table"),
           ("output.form_cache_path", "output.form_cache_table"),
           ("assignments.path", "assignments.table"))
OTHER_OF_PAIR = {**dict(_PAIRED), **{b: a for a, b in _PAIRED}}


def widget_overrides(values: Mapping[str, str],
                     widgets: Mapping[str, str] = LINK_WIDGETS) -> list[str]:
    """``--set`` style overrides from widget ``values``.

    Known widgets (``widgets``: name -> config key) map to one key each and are skipped when
    empty; a list widget (:data:`LIST_WIDGETS`) takes comma-separated items. The free-form
    ``overrides`` widget holds further ``key=value`` items separated by newlines or
    semicolons. Later items win, as on the command line. A widget that names a table by path
    or by name also empties the other key of the pair (:data:`OTHER_OF_PAIR`).
    """
    sets = []
    for name, key in widgets.items():
        value = str(values.get(name, "") or "").strip()
        if not value:
            continue
        if name in LIST_WIDGETS:
            items = [v.strip() for v in value.split(",") if v.strip()]
            value = "[" + ", ".join(f'"{v}"' for v in items) + "]"
        if key in OTHER_OF_PAIR:
            sets.append(f"{OTHER_OF_PAIR[key]}=")
        sets.append(f"{key}={value}")
    extra = str(values.get("overrides", "") or "")
    sets += [item.strip() for item in extra.replace(";", "\n").splitlines() if item.strip()]
    return sets
