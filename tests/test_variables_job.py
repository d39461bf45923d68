"""The clinical-variables Spark job on local[2]: a hand-made code-assignment Delta table (written
with the project's writer, in the link job's schema) -> the variables Delta table. Evidence
columns, patient dates from a documents table, agreement with the core matcher, reruns that
replace rather than duplicate, changed definitions recomputed with stale rows removed."""

from __future__ import annotations

import dataclasses
from datetime import date, datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
import yaml

from clinlinker_spark.errors import InputDataError
from clinlinker_spark.variables import (
    AssignmentsTableConfig,
    DocumentsConfig,
    IsaConfig,
    VariableMatcher,
    VariablesJobConfig,
    VariablesOutputConfig,
    load_variables,
)

pytestmark = pytest.mark.spark

TS = datetime(2026, 1, 1, tzinfo=timezone.utc)

# (mention_id, doc_id, label, status, code, score, negated)
MENTIONS = [
    ("m01", "d1", "DIAGNOSTICO", "linked", "E11.9", 0.97, False),    # p1 dm2 (2024-01-10)
    ("m02", "d2", "DIAGNOSTICO", "linked", "e11.65", 0.91, False),   # p1 dm2 (2024-03-05)
    ("m03", "d2", "DIAGNOSTICO", "linked", "I10", 0.99, False),      # p1 hta
    ("m04", "d3", "DIAGNOSTICO", "linked", "I10", 0.85, False),      # p2 hta: score too low
    ("m05", "d3", "DIAGNOSTICO", "linked", "I50.9", 0.95, True),     # p2 hf: negated
    ("m06", "d3", "DIAGNOSTICO", "linked", "I50.1", 0.93, False),    # p2 hf
    ("m07", "d4", "PROCEDIMIENTO", "linked", "I10", 0.99, False),    # p3: wrong label
    ("m08", "d4", "DIAGNOSTICO", "no_candidate", None, None, None),  # p3: not linked
    ("m09", "d4", "DIAGNOSTICO", "linked", "44054006", 0.96, None),  # p3 snomed dm (is-a)
    ("m10", "d5", "DIAGNOSTICO", "linked", "I10", 0.98, False),      # d5: not in documents
    ("m11", "d6", "DIAGNOSTICO", "invalid_input", None, None, None),  # p4: nothing linked
    ("m12", "d1", "DIAGNOSTICO", "linked", "I11.0", 0.92, False),    # p1 hta + hf
    ("m13", "d6", "DIAGNOSTICO", "needs_review", "E11.9", 0.95, False),  # p4 dm2 if asked
]
DOCUMENTS = [  # doc_id, patient_id, note_date
    ("d1", "p1", "2024-01-10"), ("d2", "p1", "2024-03-05"), ("d3", "p2", "2023-12-31"),
    ("d4", "p3", "2024-02-29"), ("d6", "p4", "2024-05-01"),
]
DEFINITIONS = {"variables": [
    {"name": "type2_diabetes", "code_prefixes": ["E11"], "labels": ["DIAGNOSTICO"],
     "min_score": 0.9},
    {"name": "hypertension", "code_prefixes": ["I10", "I11", "I12", "I13", "I15"],
     "labels": ["DIAGNOSTICO"], "min_score": 0.9},
    {"name": "heart_failure", "code_prefixes": ["I50"], "codes": ["I11.0"],
     "labels": ["DIAGNOSTICO"], "min_score": 0.9},
    {"name": "diabetes_snomed", "descendants_of": ["73211009"]},
]}
ISA = "child\tparent\n44054006\t73211009\n46635009\t73211009\n"


def assignments_df(spark, mentions=MENTIONS):
    """Rows in the code-assignment table schema (spark/schemas.py) + a ``negated`` column."""
    from pyspark.sql.types import BooleanType, StructField

    from clinlinker_spark.spark.schemas import assignment_schema

    schema = assignment_schema(store_text=False,
                               passthrough=[StructField("negated", BooleanType(), True)])
    records = []
    for mention_id, doc_id, label, status, code, score, negated in mentions:
        records.append({
            "mention_id": mention_id, "doc_id": doc_id, "start": 0, "end": 5,
            "text_sha256": "0" * 64, "label": label, "negated": negated, "status": status,
            "reason": None if status == "linked" else "test", "code": code,
            "term": None, "score": score,
            "confidence": 0.3 if status == "needs_review" else 0.9 if code else None,
            "candidates": [], "model_version": "model-a", "index_version": "index-a",
            "reranker_version": "", "ranker_version": "ranker-a", "run_id": "link-run",
            "run_ts": TS,
        })
    return spark.createDataFrame([tuple(r[f] for f in schema.names) for r in records], schema)


@pytest.fixture()
def setup(spark, tmp_path):
    """Assignments Delta table, documents Parquet, definitions, is-a table; the job config."""
    from clinlinker_spark.spark.writer import merge_into_delta

    assignments = str(tmp_path / "assignments")
    merge_into_delta(spark, assignments_df(spark), assignments, key="mention_id")
    documents = str(tmp_path / "documents")
    pd.DataFrame(DOCUMENTS, columns=["doc_id", "patient_id", "note_date"]).to_parquet(
        tmp_path / "documents.parquet")
    spark.read.parquet(str(tmp_path / "documents.parquet")).write.parquet(documents)
    defs = tmp_path / "defs.yaml"
    defs.write_text(yaml.safe_dump(DEFINITIONS), encoding="utf-8")
    (tmp_path / "isa.tsv").write_text(ISA, encoding="utf-8")
    config = VariablesJobConfig(
        assignments=AssignmentsTableConfig(path=assignments),
        documents=DocumentsConfig(path=documents, format="parquet", doc_id_column="doc_id",
                                  patient_id_column="patient_id", date_column="note_date"),
        definitions=(str(defs),),
        isa=IsaConfig(path=str(tmp_path / "isa.tsv")),
        output=VariablesOutputConfig(path=str(tmp_path / "variables")),
    )
    return config, defs


def table(spark, path) -> list[dict]:
    from clinlinker_spark.spark.writer import read_delta

    df = read_delta(spark, path)
    return sorted((r.asDict(recursive=True) for r in df.collect()),
                  key=lambda r: (r["unit_type"], r["unit_id"], r["variable"]))


def by_unit(rows) -> dict[tuple[str, str], dict]:
    return {(r["unit_id"], r["variable"]): r for r in rows}


def without_run(rows) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("run_id", "run_ts")} for r in rows]


def test_patient_rows_with_evidence_dates_and_lineage(spark, setup):
    from clinlinker_spark.spark.variables_job import (
        VARIABLE_COLUMNS,
        run_variables_job,
        variables_schema,
    )
    from clinlinker_spark.spark.writer import read_delta, table_version

    config, _ = setup
    summary = run_variables_job(spark, config, run_id="run-1")
    rows = table(spark, config.output.path)
    written = read_delta(spark, config.output.path)
    assert written.columns == list(VARIABLE_COLUMNS)
    assert [f.dataType.simpleString() for f in written.schema] == [
        f.dataType.simpleString() for f in variables_schema()]
    got = by_unit(rows)
    assert set(got) == {
        ("p1", "type2_diabetes"), ("p1", "hypertension"), ("p1", "heart_failure"),
        ("p2", "heart_failure"), ("p3", "diabetes_snomed"),
    }
    dm2 = got[("p1", "type2_diabetes")]
    assert dm2["present"] is True and dm2["unit_type"] == "patient"
    assert (dm2["first_seen"], dm2["last_seen"]) == (date(2024, 1, 10), date(2024, 3, 5))
    assert dm2["n_mentions"] == 2
    assert dm2["evidence"] == [
        {"mention_id": "m01", "doc_id": "d1", "code": "E11.9", "score": 0.97},
        {"mention_id": "m02", "doc_id": "d2", "code": "e11.65", "score": 0.91},
    ]
    assert (dm2["model_version"], dm2["index_version"], dm2["reranker_version"],
            dm2["ranker_version"]) == ("model-a", "index-a", "", "ranker-a")
    assert dm2["run_id"] == "run-1"
    hf2 = got[("p2", "heart_failure")]  # negated m05 left out
    assert [e["mention_id"] for e in hf2["evidence"]] == ["m06"]
    assert hf2["first_seen"] == hf2["last_seen"] == date(2023, 12, 31)
    # I11.0 counts for both hypertension (prefix I11) and heart failure (explicit code)
    assert [e["mention_id"] for e in got[("p1", "hypertension")]["evidence"]] == ["m03", "m12"]
    assert [e["mention_id"] for e in got[("p1", "heart_failure")]["evidence"]] == ["m12"]
    assert got[("p3", "diabetes_snomed")]["evidence"][0]["code"] == "44054006"
    # p2's I10 has score 0.85 < 0.9; p3's I10 is a procedure; d5 has no patient
    assert ("p2", "hypertension") not in got and ("p3", "hypertension") not in got

    hashes = {v.name: v.definition_hash for v in load_variables(config)}
    assert all(r["definition_hash"] == hashes[r["variable"]] for r in rows)
    assert len({r["variable_key"] for r in rows}) == len(rows)

    assert summary["rows_written"] == 5 and summary["table_version"] == 0
    assert table_version(config.output.path) == 0
    assert summary["evidence_without_unit"] == 1  # m10 (d5)
    assert summary["assignments"]["linked"] == 10
    assert summary["assignments"]["needs_review"] == 1  # m13: not evidence (no opt-in)
    assert summary["variables"]["hypertension"] == {
        "definition_hash": hashes["hypertension"], "status": "no previous rows",
        "units_present": 1, "mentions": 2}


def test_spark_evidence_equals_core_matcher(spark, setup):
    """Same (mention, variable) pairs as the core matcher on the same rows in pandas."""
    from clinlinker_spark.spark.variables_job import run_variables_job

    config, _ = setup
    run_variables_job(spark, dataclasses.replace(
        config, documents=DocumentsConfig()))  # unit document, no documents table
    spark_pairs = {(e["mention_id"], r["variable"]) for r in table(spark, config.output.path)
                   for e in r["evidence"]}
    frame = pd.DataFrame(MENTIONS, columns=["mention_id", "doc_id", "label", "status", "code",
                                            "score", "negated"])
    core = VariableMatcher(load_variables(config)).evidence(frame)
    assert spark_pairs == set(zip(core["mention_id"], core["variable"]))
    assert ("m10", "hypertension") in spark_pairs  # d5 counts when the unit is the document


def test_needs_review_rows_count_only_for_variables_that_include_them(spark, setup):
    from clinlinker_spark.spark.variables_job import run_variables_job

    config, defs = setup
    run_variables_job(spark, config, run_id="run-1")
    before = by_unit(table(spark, config.output.path))
    assert ("p4", "type2_diabetes") not in before  # m13 needs review: ignored by default
    opted = yaml.safe_load(yaml.safe_dump(DEFINITIONS))
    opted["variables"][0]["include_needs_review"] = True
    defs.write_text(yaml.safe_dump(opted), encoding="utf-8")
    summary = run_variables_job(spark, config, run_id="run-2")
    after = by_unit(table(spark, config.output.path))
    assert set(after) == set(before) | {("p4", "type2_diabetes")}
    assert after[("p4", "type2_diabetes")]["evidence"] == [
        {"mention_id": "m13", "doc_id": "d6", "code": "E11.9", "score": 0.95}]
    assert after[("p1", "type2_diabetes")]["evidence"] == before[
        ("p1", "type2_diabetes")]["evidence"]
    assert summary["variables"]["type2_diabetes"]["status"] == "changed"
    assert summary["variables"]["hypertension"]["status"] == "unchanged"
    # the Spark job and the core matcher agree on the same rows
    frame = pd.DataFrame(MENTIONS, columns=["mention_id", "doc_id", "label", "status", "code",
                                            "score", "negated"])
    core = VariableMatcher(load_variables(config)).evidence(frame)
    assert ("m13", "type2_diabetes") in set(zip(core["mention_id"], core["variable"]))


def test_rerun_replaces_rows_and_adds_one_version(spark, setup):
    from clinlinker_spark.spark.variables_job import run_variables_job
    from clinlinker_spark.spark.writer import table_version

    config, _ = setup
    run_variables_job(spark, config, run_id="run-1")
    first = table(spark, config.output.path)
    summary = run_variables_job(spark, config, run_id="run-2")
    second = table(spark, config.output.path)
    assert table_version(config.output.path) == 1
    assert without_run(second) == without_run(first)  # same rows, no duplicates
    assert {r["run_id"] for r in second} == {"run-2"}
    assert summary["rows_replaced"] == len(first) and summary["stale_rows_removed"] == 0
    assert {v["status"] for v in summary["variables"].values()} == {"unchanged"}


def test_changed_definition_is_recomputed_and_stale_rows_removed(spark, setup):
    from clinlinker_spark.spark.variables_job import run_variables_job

    config, defs = setup
    run_variables_job(spark, config, run_id="run-1")
    before = by_unit(table(spark, config.output.path))
    # heart failure now needs score >= 0.94: p1 (I11.0, 0.92) and p2 (I50.1, 0.93) drop out;
    # hypertension now also counts procedures: p3's I10 (0.99) qualifies
    changed = yaml.safe_load(yaml.safe_dump(DEFINITIONS))
    changed["variables"][2]["min_score"] = 0.94
    del changed["variables"][1]["labels"]
    defs.write_text(yaml.safe_dump(changed), encoding="utf-8")
    summary = run_variables_job(spark, config, run_id="run-2")
    after = by_unit(table(spark, config.output.path))
    assert set(after) == set(before) - {("p1", "heart_failure"), ("p2", "heart_failure")} | {
        ("p3", "hypertension")}
    assert summary["stale_rows_removed"] == 2
    status = {n: v["status"] for n, v in summary["variables"].items()}
    assert status == {"type2_diabetes": "unchanged", "hypertension": "changed",
                      "heart_failure": "changed", "diabetes_snomed": "unchanged"}
    assert after[("p1", "hypertension")]["definition_hash"] != before[
        ("p1", "hypertension")]["definition_hash"]
    assert after[("p1", "type2_diabetes")]["definition_hash"] == before[
        ("p1", "type2_diabetes")]["definition_hash"]

    # a variable left out of the definitions keeps its rows (only the run's variables are
    # replaced); the others are recomputed
    only_dm2 = {"variables": [changed["variables"][0]]}
    defs.write_text(yaml.safe_dump(only_dm2), encoding="utf-8")
    run_variables_job(spark, config, run_id="run-3")
    kept = by_unit(table(spark, config.output.path))
    assert set(kept) == set(after)
    assert kept[("p1", "type2_diabetes")]["run_id"] == "run-3"
    assert kept[("p1", "hypertension")]["run_id"] == "run-2"


def test_emit_absent_rows_for_every_unit_seen(spark, setup):
    from clinlinker_spark.spark.variables_job import run_variables_job

    config, _ = setup
    config = dataclasses.replace(config, output=dataclasses.replace(config.output,
                                                                    emit_absent=True))
    summary = run_variables_job(spark, config)
    rows = by_unit(table(spark, config.output.path))
    patients = {"p1", "p2", "p3", "p4"}  # p4 has only an invalid row; d5 has no patient
    variables = {v["name"] for v in DEFINITIONS["variables"]}
    assert set(rows) == {(p, v) for p in patients for v in variables}
    assert summary["rows_written"] == 16
    absent = rows[("p4", "hypertension")]
    assert absent["present"] is False and absent["n_mentions"] == 0
    assert absent["evidence"] == [] and absent["first_seen"] is None
    assert sum(r["present"] for r in rows.values()) == 5


def test_document_unit_with_dates_from_the_assignments_table(spark, tmp_path, setup):
    """No documents table: patient/date columns may come from the assignments table."""
    from pyspark.sql import functions as F

    from clinlinker_spark.spark.variables_job import run_variables_job
    from clinlinker_spark.spark.writer import merge_into_delta

    config, _ = setup
    path = str(tmp_path / "assignments_with_dates")
    df = assignments_df(spark).withColumn(
        "note_date", F.when(F.col("doc_id") == "d1", F.lit("2024-01-10"))
        .when(F.col("doc_id") == "d2", F.lit("not a date")))
    merge_into_delta(spark, df, path, key="mention_id")
    config = dataclasses.replace(
        config, assignments=AssignmentsTableConfig(path=path),
        documents=DocumentsConfig(date_column="note_date"))
    run_variables_job(spark, config)
    rows = by_unit(table(spark, config.output.path))
    assert rows[("d1", "type2_diabetes")]["first_seen"] == date(2024, 1, 10)
    assert rows[("d2", "type2_diabetes")]["first_seen"] is None  # unparseable -> null
    assert rows[("d1", "type2_diabetes")]["unit_type"] == "document"


def test_errors_before_any_work(spark, setup, tmp_path):
    from clinlinker_spark.spark.variables_job import run_variables_job

    config, _ = setup
    with pytest.raises(InputDataError, match="no code-assignment Delta table"):
        run_variables_job(spark, dataclasses.replace(
            config, assignments=AssignmentsTableConfig(path=str(tmp_path / "nothing"))))
    with pytest.raises(InputDataError, match="lacks column.*'pid'"):
        run_variables_job(spark, dataclasses.replace(config, documents=dataclasses.replace(
            config.documents, patient_id_column="pid")))
    dup = tmp_path / "dup_documents"
    spark.createDataFrame([("d1", "p1", "2024-01-01"), ("d1", "p9", "2024-01-02")],
                          "doc_id string, patient_id string, note_date string"
                          ).write.parquet(str(dup))
    with pytest.raises(InputDataError, match="doc_id must be unique.*d1"):
        run_variables_job(spark, dataclasses.replace(config, documents=dataclasses.replace(
            config.documents, path=str(dup))))
    assert not Path(config.output.path).exists()


def test_delta_spark_catalog_tables_give_the_deltalake_rows_and_a_rerun_one_version(
    delta_spark, catalog_schema, setup, tmp_path,
):
    from clinlinker_spark.config import TableRef
    from clinlinker_spark.spark.variables_job import run_variables_job
    from clinlinker_spark.spark.writer import read_delta

    spark = delta_spark
    config, _ = setup
    lake = dataclasses.replace(config, output=VariablesOutputConfig(
        path=str(tmp_path / "lake"), writer="deltalake"))
    assert run_variables_job(spark, lake, run_id="run-1")["writer"] == "deltalake"
    # the same assignments as a catalog table; the variables table by name, with delta-spark
    assignments, variables = f"{catalog_schema}.code_assignments", f"{catalog_schema}.variables"
    read_delta(spark, config.assignments.path).write.format("delta").saveAsTable(assignments)
    named = dataclasses.replace(
        config, assignments=AssignmentsTableConfig(table=assignments),
        output=VariablesOutputConfig(table=variables, writer="delta-spark"))
    first = run_variables_job(spark, named, run_id="run-1")
    assert (first["writer"], first["table"]) == ("delta-spark", variables)
    assert first["assignments"]["table"] == assignments
    assert first["assignments"]["version"] == 0
    rows = table(spark, TableRef(name=variables))
    assert rows and without_run(rows) == without_run(table(spark, lake.output.path))

    second = run_variables_job(spark, named, run_id="run-2")
    assert second["table_version"] == first["table_version"] + 1
    assert without_run(table(spark, TableRef(name=variables))) == without_run(rows)
    assert second["rows_replaced"] == len(rows)


def test_a_variables_night_is_one_mlflow_run_with_its_counts(spark, setup, tmp_path):
    from mlflow import MlflowClient

    from clinlinker_spark.config import MlflowConfig
    from clinlinker_spark.spark.variables_job import run_variables_job

    config, _ = setup
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    tracked = dataclasses.replace(config, mlflow=MlflowConfig(tracking_uri=uri,
                                                              experiment="variables"))
    summary = run_variables_job(spark, tracked, run_id="vars-1")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("variables")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["clinlinker.kind"] == "variables"
    assert run.data.tags["clinlinker.run_id"] == "vars-1"
    assert run.data.metrics["rows_written"] == summary["rows_written"] > 0
    assert run.data.metrics["assignments.linked"] == summary["assignments"]["linked"]
    assert run.data.params["unit"] == "auto"
    # tracking off: no run id
    assert run_variables_job(spark, config, run_id="vars-2")["mlflow_run_id"] == ""
