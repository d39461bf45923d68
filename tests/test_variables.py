"""Clinical-variable definitions, is-a closure, matching and validation (core, no Spark)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from clinlinker_spark.cli import main
from clinlinker_spark.config import load_config
from clinlinker_spark.errors import ConfigError, InputDataError
from clinlinker_spark.index import ARTIFACT_KIND, FORMAT_VERSION, MANIFEST_FILE, ROWS_FILE
from clinlinker_spark.variables import (
    IsaCycleError,
    IsaGraph,
    VariableDefinition,
    VariableMatcher,
    VariablesJobConfig,
    coverage,
    expand_definition,
    expand_definitions,
    index_code_keys,
    load_definitions,
    load_variables,
    parse_definitions,
    read_isa_table,
)

REPO = Path(__file__).resolve().parent.parent

# A small is-a table (child, parent): diabetes under glucose disorder, two types below it,
# a complication below type 2, and an unrelated branch.
ISA_EDGES = [
    ("44054006", "73211009"),    # type 2 -> diabetes mellitus
    ("46635009", "73211009"),    # type 1 -> diabetes mellitus
    ("313436004", "44054006"),   # type 2 without complication -> type 2
    ("73211009", "126877002"),   # diabetes mellitus -> disorder of glucose metabolism
    ("38341003", "1201005"),     # hypertension -> unrelated parent
]


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def variable(**kwargs) -> VariableDefinition:
    kwargs.setdefault("name", "v")
    return VariableDefinition(**kwargs)


def rows(*records: dict) -> pd.DataFrame:
    defaults = {"status": "linked", "label": "DIAGNOSTICO", "score": 0.95}
    return pd.DataFrame([{**defaults, **r} for r in records])


def matched(variables, frame, **kwargs) -> list[tuple[int, str]]:
    pairs = VariableMatcher(variables).match(frame, **kwargs)
    return list(zip(pairs["row"].tolist(), pairs["variable"].tolist()))


# --------------------------------------------------------------------------------------------
# Definitions: strict keys, clear errors


def test_definition_file_with_list_and_single_mapping(tmp_path):
    write_yaml(tmp_path / "a.yaml", {"variables": [
        {"name": "hta", "code_prefixes": ["I10"], "labels": ["DIAGNOSTICO"], "min_score": 0.9},
        {"name": "dm2", "codes": ["E11.9", 44054006]},
    ]})
    write_yaml(tmp_path / "b.yaml", {"name": "hf", "description": "IC", "code_prefixes": ["I50"]})
    defs = load_definitions([str(tmp_path / "*.yaml")])
    assert [d.name for d in defs] == ["hta", "dm2", "hf"]
    assert defs[0] == VariableDefinition(name="hta", code_prefixes=("I10",),
                                         labels=("DIAGNOSTICO",), min_score=0.9)
    assert defs[1].codes == ("E11.9", "44054006")  # an integer SNOMED id becomes a string
    assert defs[1].include_negated is False and defs[1].include_uncertain is False
    assert defs[1].include_needs_review is False


@pytest.mark.parametrize("item, message", [
    ({"name": "x", "code_prefix": ["I10"]}, "variables[0].code_prefix"),  # typo'd key
    ({"code_prefixes": ["I10"]}, "needs a name"),
    ({"name": "x"}, "names no codes"),
    ({"name": "x", "codes": "E11"}, "codes must be a list"),
    ({"name": "x", "codes": ["E11"], "min_score": "high"}, "min_score must be a number"),
    ({"name": "x", "codes": ["E11"], "include_negated": "yes"}, "true or false"),
    ({"name": "x", "codes": ["E11"], "include_needs_review": "si"}, "true or false"),
    ({"name": "x", "codes": ["E11"], "include_review": True}, "variables[0].include_review"),
    ({"name": "bad name", "codes": ["E11"]}, "must match"),
    ({"name": "x", "codes": ["E11", " "]}, "empty entry"),
])
def test_definition_errors_name_the_file_and_key(tmp_path, item, message):
    path = write_yaml(tmp_path / "defs.yaml", {"variables": [item]})
    with pytest.raises(ConfigError) as err:
        load_definitions([str(path)])
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_definition_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown top-level key"):
        parse_definitions({"variables": [{"name": "x", "codes": ["A"]}], "isa": "x"}, "f.yaml")
    with pytest.raises(ConfigError, match="non-empty list"):
        parse_definitions({"variables": []}, "f.yaml")
    with pytest.raises(ConfigError, match="no variable definition file matches"):
        load_definitions([str(tmp_path / "none" / "*.yaml")])
    with pytest.raises(ConfigError, match="not found"):
        load_definitions([str(tmp_path / "missing.yaml")])
    write_yaml(tmp_path / "a.yaml", {"name": "same", "codes": ["A01"]})
    write_yaml(tmp_path / "b.yaml", {"name": "same", "codes": ["B01"]})
    with pytest.raises(ConfigError, match="defined twice.*a.yaml.*b.yaml"):
        load_definitions([str(tmp_path / "*.yaml")])


# --------------------------------------------------------------------------------------------
# Is-a closure


def test_descendants_transitive_with_and_without_self():
    graph = IsaGraph.from_edges(ISA_EDGES)
    assert graph.descendants(["73211009"]) == {"73211009", "44054006", "46635009", "313436004"}
    assert graph.descendants(["73211009"], include_self=False) == {
        "44054006", "46635009", "313436004"}
    assert graph.descendants(["44054006"]) == {"44054006", "313436004"}
    assert graph.descendants(["313436004"]) == {"313436004"}  # a leaf
    assert graph.descendants(["999"]) == {"999"}  # unknown concept: itself only
    # a root below another root stays even without include_self
    assert graph.descendants(["73211009", "44054006"], include_self=False) == {
        "44054006", "46635009", "313436004"}
    graph.check_acyclic()


def test_cycle_is_rejected_naming_its_concepts():
    graph = IsaGraph.from_edges(ISA_EDGES + [("126877002", "313436004")])  # closes a loop
    with pytest.raises(IsaCycleError) as err:
        graph.descendants(["73211009"])
    message = str(err.value)
    for concept in ("73211009", "44054006", "313436004", "126877002"):
        assert concept in message
    assert "46635009" not in message  # not on the cycle
    with pytest.raises(IsaCycleError):
        graph.check_acyclic()


def test_self_loop_and_unreachable_cycle():
    with pytest.raises(IsaCycleError, match="5 -> 5"):
        IsaGraph.from_edges([("5", "5")]).check_acyclic()
    graph = IsaGraph.from_edges(ISA_EDGES + [("1", "2"), ("2", "1")])
    # the closure of diabetes does not go near the cycle ...
    assert "44054006" in graph.descendants(["73211009"])
    # ... but the whole-graph check finds it
    with pytest.raises(IsaCycleError, match="1 -> 2 -> 1|2 -> 1 -> 2"):
        graph.check_acyclic()


@pytest.mark.parametrize("fmt", ["tsv", "csv", "parquet", "auto-tsv", "auto-parquet"])
def test_read_two_column_isa_tables(tmp_path, fmt):
    frame = pd.DataFrame(ISA_EDGES, columns=["hijo", "padre"])
    kind = fmt.replace("auto-", "")
    path = tmp_path / f"isa.{kind}"
    if kind == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="," if kind == "csv" else "\t", index=False)
    graph = read_isa_table(path, "auto" if fmt.startswith("auto") else kind,
                           child_column="hijo", parent_column="padre")
    assert graph.descendants(["73211009"]) == {"73211009", "44054006", "46635009", "313436004"}
    with pytest.raises(InputDataError, match="lacks column"):
        read_isa_table(path, "auto" if fmt.startswith("auto") else kind)


def test_read_rf2_keeps_active_is_a_rows(tmp_path):
    header = ["id", "effectiveTime", "active", "moduleId", "sourceId", "destinationId",
              "relationshipGroup", "typeId", "characteristicTypeId", "modifierId"]
    lines = [
        ["1", "20200131", "1", "m", "44054006", "73211009", "0", "116680003", "c", "x"],
        ["2", "20200131", "1", "m", "46635009", "73211009", "0", "116680003", "c", "x"],
        ["3", "20200131", "0", "m", "313436004", "44054006", "0", "116680003", "c", "x"],
        # an attribute relationship (finding site), not is-a
        ["4", "20200131", "1", "m", "44054006", "113331007", "0", "363698007", "c", "x"],
        # a full release: id 5 was active, then inactivated (the later row wins)
        ["5", "20190131", "1", "m", "11111", "73211009", "0", "116680003", "c", "x"],
        ["5", "20210131", "0", "m", "11111", "73211009", "0", "116680003", "c", "x"],
    ]
    path = tmp_path / "sct2_Relationship_Snapshot_INT.txt"
    path.write_text("\n".join("\t".join(r) for r in [header, *lines]) + "\n", encoding="utf-8")
    graph = read_isa_table(path)  # auto-detected as rf2
    assert graph.descendants(["73211009"]) == {"73211009", "44054006", "46635009"}
    assert "113331007" not in graph and "313436004" not in graph


def test_conf_snomed_example_expands_through_its_isa_table(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths are relative to the repository root
    config = load_config("conf/variables_snomed.yaml", cls=VariablesJobConfig)
    variables = {v.name: v for v in load_variables(config)}
    assert variables["diabetes_mellitus"].code_keys == {
        "73211009", "44054006", "46635009", "313436004"}
    assert variables["type2_diabetes_snomed"].code_keys == {"44054006", "313436004"}


# --------------------------------------------------------------------------------------------
# Expansion, prefixes, hashes


def test_descendants_of_needs_an_isa_table():
    with pytest.raises(ConfigError, match="is-a table"):
        expand_definition(variable(descendants_of=("73211009",)))


def test_prefix_and_code_rules_compare_normalised_codes():
    hta = expand_definition(variable(name="hta", code_prefixes=("I10", "i15")))
    hf = expand_definition(variable(name="hf", codes=("I11.0",), code_prefixes=("I50",)))
    frame = rows(
        {"code": "I10"}, {"code": "i10.9"}, {"code": "I15.0"}, {"code": "I1"},
        {"code": "I110"}, {"code": "i11.0"}, {"code": "I11.00"}, {"code": "I50.9"},
        {"code": None}, {"code": "I509 "},
    )
    assert matched([hta, hf], frame) == [
        (0, "hta"), (1, "hta"), (2, "hta"), (4, "hf"), (5, "hf"), (7, "hf"), (9, "hf"),
    ]


def test_one_code_can_count_for_several_variables():
    dm = expand_definition(variable(name="dm", code_prefixes=("E1",)))
    dm2 = expand_definition(variable(name="dm2", code_prefixes=("E11",)))
    assert matched([dm, dm2], rows({"code": "E11.9"}, {"code": "E10"})) == [
        (0, "dm"), (0, "dm2"), (1, "dm")]


def test_snomed_descendants_match():
    graph = IsaGraph.from_edges(ISA_EDGES)
    dm = expand_definition(variable(name="dm", descendants_of=("73211009",)), graph)
    frame = rows({"code": "313436004"}, {"code": "126877002"}, {"code": "46635009"},
                 {"code": "38341003"})
    assert matched([dm], frame) == [(0, "dm"), (2, "dm")]


def test_definition_hash_changes_with_what_decides_rows():
    base = dict(name="dm2", code_prefixes=("E11",), labels=("DIAGNOSTICO",), min_score=0.9)
    h = expand_definition(variable(**base)).definition_hash
    assert expand_definition(variable(**base)).definition_hash == h  # deterministic
    assert expand_definition(variable(**base, description="otra")).definition_hash == h
    # writing a code differently (case, dots) is the same definition
    same = {**base, "code_prefixes": ("e11",)}
    assert expand_definition(variable(**same)).definition_hash == h
    for change in ({"code_prefixes": ("E11", "E13")}, {"codes": ("E10",)},
                   {"labels": ()}, {"min_score": 0.8}, {"min_score": None},
                   {"include_negated": True}, {"include_uncertain": True},
                   {"include_needs_review": True}, {"name": "dm2b"}):
        assert expand_definition(variable(**{**base, **change})).definition_hash != h, change
    # a definition without include_needs_review keeps the hash it had before the key existed
    assert h == "c2620dd9bd23a9cbcdfa744e7be291eed108cdb338a1bf41b8cb6427d6308d6e"
    assert expand_definition(variable(**base, include_needs_review=False)).definition_hash == h
    # a new is-a release that adds a descendant changes the hash too
    roots = dict(name="dm", descendants_of=("73211009",))
    before = expand_definition(variable(**roots), IsaGraph.from_edges(ISA_EDGES))
    after = expand_definition(variable(**roots),
                              IsaGraph.from_edges(ISA_EDGES + [("11687002", "73211009")]))
    assert before.definition_hash != after.definition_hash


# --------------------------------------------------------------------------------------------
# Row filters


def test_score_threshold_is_inclusive_and_null_scores_fail():
    v = expand_definition(variable(code_prefixes=("I10",), min_score=0.9))
    frame = rows({"code": "I10", "score": 0.95}, {"code": "I10", "score": 0.9},
                 {"code": "I10", "score": 0.8999}, {"code": "I10", "score": None})
    assert matched([v], frame) == [(0, "v"), (1, "v")]
    no_threshold = expand_definition(variable(name="w", code_prefixes=("I10",)))
    assert [r for r, _ in matched([no_threshold], frame)] == [0, 1, 2, 3]


def test_label_filter():
    v = expand_definition(variable(code_prefixes=("0DT",), labels=("PROCEDIMIENTO",)))
    any_label = expand_definition(variable(name="w", code_prefixes=("0DT",)))
    frame = rows({"code": "0DTJ4ZZ", "label": "PROCEDIMIENTO"},
                 {"code": "0DTJ4ZZ", "label": "DIAGNOSTICO"},
                 {"code": "0DTJ4ZZ", "label": None})
    assert matched([v, any_label], frame) == [(0, "v"), (0, "w"), (1, "w"), (2, "w")]


def test_only_linked_rows_count():
    v = expand_definition(variable(code_prefixes=("I10",)))
    frame = rows({"code": "I10"}, {"code": "I10", "status": "no_candidate"},
                 {"code": "I10", "status": "invalid_input"})
    assert matched([v], frame) == [(0, "v")]


def test_needs_review_rows_count_only_for_variables_that_include_them():
    strict = expand_definition(variable(name="strict", code_prefixes=("I10",)))
    lenient = expand_definition(variable(name="lenient", code_prefixes=("I10",),
                                         include_needs_review=True))
    frame = rows({"code": "I10"}, {"code": "I10", "status": "needs_review"},
                 {"code": "I10", "status": "no_candidate"},
                 {"code": "I10", "status": "needs_review", "score": 0.5})
    assert matched([strict, lenient], frame) == [
        (0, "strict"), (0, "lenient"), (1, "lenient"), (3, "lenient")]
    assert matched([strict], frame) == [(0, "strict")]
    # the other filters still apply to needs_review rows
    picky = expand_definition(variable(name="picky", code_prefixes=("I10",), min_score=0.9,
                                       include_needs_review=True))
    assert matched([picky], frame) == [(0, "picky"), (1, "picky")]


def test_negation_and_uncertainty_filters_apply_when_columns_exist():
    strict = expand_definition(variable(name="strict", code_prefixes=("I50",)))
    lenient = expand_definition(variable(name="lenient", code_prefixes=("I50",),
                                         include_negated=True, include_uncertain=True))
    frame = rows(
        {"code": "I50", "negated": False, "uncertain": False},
        {"code": "I50", "negated": True, "uncertain": False},
        {"code": "I50", "negated": None, "uncertain": "true"},
        {"code": "I50", "negated": "0", "uncertain": None},
    )
    assert matched([strict, lenient], frame) == [
        (0, "strict"), (0, "lenient"), (1, "lenient"), (2, "lenient"), (3, "strict"),
        (3, "lenient"),
    ]
    # without the columns nothing is filtered
    plain = frame.drop(columns=["negated", "uncertain"])
    assert [r for r, v in matched([strict], plain)] == [0, 1, 2, 3]
    # other column names
    renamed = frame.rename(columns={"negated": "neg"})
    assert [r for r, v in matched([strict], renamed, negated_column="neg",
                                   uncertain_column=None)] == [0, 2, 3]


def test_evidence_returns_matched_rows_with_variable():
    v = expand_definition(variable(code_prefixes=("R50",)))
    frame = rows({"mention_id": "a", "code": "R50.9"}, {"mention_id": "b", "code": "R51"})
    out = VariableMatcher([v]).evidence(frame)
    assert out[["mention_id", "variable"]].values.tolist() == [["a", "v"]]


# --------------------------------------------------------------------------------------------
# Validation against an index


def fake_index(path: Path, codes: list[str]) -> Path:
    """The two files validation reads: manifest.json and rows.parquet (code_key)."""
    path.mkdir(parents=True)
    (path / MANIFEST_FILE).write_text(json.dumps(
        {"kind": ARTIFACT_KIND, "format_version": FORMAT_VERSION}), encoding="utf-8")
    pd.DataFrame({"code": codes, "code_key": [c.lower().replace(".", "") for c in codes]}
                 ).to_parquet(path / ROWS_FILE)
    return path


def test_coverage_counts():
    graph = IsaGraph.from_edges(ISA_EDGES)
    variables = expand_definitions([
        variable(name="hta", code_prefixes=("I10", "I15", "I16")),
        variable(name="hf", codes=("I11.0", "I13.0"), code_prefixes=("I50",)),
        variable(name="dm", descendants_of=("73211009",)),
        variable(name="ghost", codes=("Z99.99",), code_prefixes=("U07",)),
    ], graph)
    index = ["I10", "I15.0", "I15.9", "I11.0", "I50", "I50.9", "44054006", "73211009", "E11"]
    report = {r.name: r for r in coverage(variables, index)}
    hta = report["hta"]
    assert (hta.codes, hta.prefixes, hta.prefixes_in_index, hta.index_codes) == (0, 3, 2, 3)
    assert hta.missing_prefixes == ("i16",)
    hf = report["hf"]
    assert (hf.codes, hf.codes_in_index, hf.prefixes_in_index, hf.index_codes) == (2, 1, 1, 3)
    assert hf.missing_codes == ("i130",)
    dm = report["dm"]
    assert (dm.codes, dm.codes_in_index, dm.index_codes) == (4, 2, 2)
    assert report["ghost"].index_codes == 0 and not report["ghost"].can_produce
    assert all(report[n].can_produce for n in ("hta", "hf", "dm"))


def test_validate_command_exit_codes(tmp_path, capsys):
    index = fake_index(tmp_path / "index", ["I10", "I50.9", "E11.9"])
    assert index_code_keys(index) == {"i10", "i509", "e119"}
    defs = write_yaml(tmp_path / "defs.yaml", {"variables": [
        {"name": "hta", "code_prefixes": ["I10"]},
        {"name": "hf", "code_prefixes": ["I50"]},
    ]})
    config = write_yaml(tmp_path / "variables.yaml",
                        {"definitions": [str(defs)], "index_path": str(index)})
    assert main(["--log-level", "WARNING", "variables", "--config", str(config),
                 "--validate"]) == 0
    out = capsys.readouterr().out
    assert "hta" in out and "hf" in out and "CANNOT" not in out
    write_yaml(defs, {"variables": [{"name": "hta", "code_prefixes": ["I10"]},
                                    {"name": "ghost", "codes": ["U07.1"]}]})
    assert main(["--log-level", "WARNING", "variables", "--config", str(config),
                 "--validate"]) == 1
    assert "CANNOT PRODUCE" in capsys.readouterr().out
    # no index configured: a config error (exit 2), not a silent pass
    assert main(["--log-level", "ERROR", "variables", "--config", str(config),
                 "--set", "index_path=", "--validate"]) == 2


# --------------------------------------------------------------------------------------------
# Job configuration


def test_job_config_strict_and_units(tmp_path):
    config = load_config(REPO / "conf" / "variables.yaml", cls=VariablesJobConfig)
    assert config.unit_type == "document"
    assert config.spark.master == "local[2]"
    patient = load_config(REPO / "conf" / "variables.yaml",
                          ["documents.path=/x", "documents.patient_id_column=pid"],
                          cls=VariablesJobConfig)
    assert patient.unit_type == "patient"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["output.emit_absnt=true"], cls=VariablesJobConfig)
    with pytest.raises(ConfigError, match="patient_id_column"):
        load_config(None, ["unit=patient"], cls=VariablesJobConfig)
    with pytest.raises(ConfigError, match="isa.format"):
        load_config(None, ["isa.format=owl"], cls=VariablesJobConfig)


def test_repo_definitions_load_and_name_real_icd10_codes(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config("conf/variables.yaml", cls=VariablesJobConfig)
    variables = {v.name: v for v in load_variables(config)}
    assert {"hypertension", "type2_diabetes", "heart_failure", "chronic_kidney_disease"} <= set(
        variables)
    assert variables["type2_diabetes"].prefixes == ("e11",)
    # every definition matches at least one code of the shipped Spanish ICD-10 list
    from clinlinker_spark.samples import sample_path

    cie10 = pd.read_csv(sample_path("cie10_es.csv"), dtype=str, keep_default_na=False)
    report = coverage(list(variables.values()), cie10["code"])
    assert all(r.can_produce for r in report), [r.name for r in report if not r.can_produce]


def test_notebook_widgets_map_to_overrides():
    from clinlinker_spark.widgets import VARIABLES_WIDGETS, widget_overrides

    sets = widget_overrides({
        "assignments_path": "/v/assignments", "definitions": "conf/a/*.yaml, conf/b.yaml",
        "patient_id_column": "patient_id", "emit_absent": "true", "output_path": "",
        "output_table": "clinical.linking.variables",
        "overrides": "unit=patient; documents.path=/v/docs",
    }, VARIABLES_WIDGETS)
    config = load_config(None, sets, cls=VariablesJobConfig)
    assert config.assignments.path == "/v/assignments"
    assert config.definitions == ("conf/a/*.yaml", "conf/b.yaml")
    assert config.output.emit_absent is True
    assert config.output.path == ""  # emptied by the table widget
    assert str(config.output.target) == "clinical.linking.variables"
    assert config.unit_type == "patient" and config.documents.path == "/v/docs"
