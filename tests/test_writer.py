"""Tests of clinlinker_spark.spark.writer: idempotent MERGE into Delta, and reading it back.

The ``deltalake`` writer runs everywhere; the ``delta-spark`` test runs only where the
delta-spark jars are on the machine (see tests/spark_fixtures.py) and is skipped otherwise.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from clinlinker_spark.errors import ConfigError, InputDataError

pytest.importorskip("pyspark")
pytest.importorskip("deltalake")

from deltalake import DeltaTable  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402
from pyspark.sql.types import (  # noqa: E402
    ArrayType,
    DoubleType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from clinlinker_spark.spark import writer  # noqa: E402
from clinlinker_spark.spark.writer import (  # noqa: E402
    DuplicateKeyError,
    SchemaMismatchError,
    WriteResult,
    delta_spark_available,
    merge_into_delta,
    read_delta,
    read_delta_snapshot,
    table_exists,
    table_version,
)

pytestmark = pytest.mark.spark

CANDIDATE = StructType(
    [
        StructField("code", StringType(), True),
        StructField("term", StringType(), True),
        StructField("retrieval_score", DoubleType(), True),
        StructField("rerank_score", DoubleType(), True),
    ]
)
SCHEMA = StructType(
    [
        StructField("mention_id", StringType(), False),
        StructField("doc_id", StringType(), True),
        StructField("start", LongType(), True),
        StructField("code", StringType(), True),
        StructField("score", DoubleType(), True),
        StructField("candidates", ArrayType(CANDIDATE, containsNull=False), True),
        StructField("run_id", StringType(), True),
        StructField("run_ts", TimestampType(), True),
    ]
)
RUN_TS = {
    "r1": dt.datetime(2024, 3, 1, 12, 30, 45, 123456, tzinfo=dt.timezone.utc),
    "r2": dt.datetime(2024, 3, 2, 8, 0, 0, 1, tzinfo=dt.timezone.utc),
}


def rows_for(ids: list[int], run: str) -> list[tuple]:
    """Code-assignment rows for mentions ``m<i>``; values depend on the run."""
    rows = []
    for i in ids:
        candidates = [
            (f"C{i}-{run}", f"term {i} ñ", 0.9 - i / 100, None),
            (f"D{i}", None, 0.5, 0.25 if run == "r2" else None),
        ]
        rows.append(
            (f"m{i:03d}", f"doc{i % 3}", i * 10, f"C{i}-{run}", 1.0 / (i + 1), candidates, run,
             RUN_TS[run].replace(tzinfo=None))
        )
    return rows


def make_df(spark, ids: list[int], run: str, partitions: int = 2):
    return spark.createDataFrame(rows_for(ids, run), SCHEMA).repartition(partitions)


def by_key(df) -> dict[str, dict[str, Any]]:
    """Collected rows of a Spark DataFrame keyed by mention_id (fails on duplicate keys)."""
    rows = [r.asDict(recursive=True) for r in df.collect()]
    keyed = {r["mention_id"]: r for r in rows}
    assert len(keyed) == len(rows), "duplicate mention_id in the table"
    return keyed


def log_entries(table_path: Path, version: int) -> list[dict[str, Any]]:
    text = (table_path / "_delta_log" / f"{version:020d}.json").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def data_files_on_disk(table_path: Path) -> set[str]:
    return {p.name for p in table_path.glob("*.parquet")}


def snapshot_files(table_path: Path) -> set[str]:
    return {Path(u).name for u in DeltaTable(str(table_path)).file_uris()}


# --------------------------------------------------------------------------------------------
# deltalake writer (runs everywhere)


def test_create_merge_rerun_is_idempotent(spark, tmp_path):
    path = str(tmp_path / "assignments")
    assert not table_exists(path) and table_version(path) is None
    assert read_delta(spark, path) is None

    first = merge_into_delta(spark, make_df(spark, list(range(1, 7)), "r1", 3), path,
                             writer="deltalake")
    assert first == WriteResult("deltalake", 0, 6, 0)
    assert table_exists(path) and table_version(path) == 0

    update = make_df(spark, list(range(4, 9)), "r2")
    second = merge_into_delta(spark, update, path, writer="deltalake")
    assert second == WriteResult("deltalake", 1, 5, 3)
    table = by_key(read_delta(spark, path))
    assert sorted(table) == [f"m{i:03d}" for i in range(1, 9)]
    expected_r1 = by_key(make_df(spark, list(range(1, 4)), "r1"))
    expected_r2 = by_key(update)
    for mention_id, row in table.items():
        expected = expected_r1.get(mention_id) or expected_r2[mention_id]
        assert row == expected  # untouched keys unchanged, replaced keys carry df's values

    rerun = merge_into_delta(spark, update, path, writer="deltalake")
    assert rerun == WriteResult("deltalake", 2, 5, 5)
    assert by_key(read_delta(spark, path)) == table
    assert table_version(path) == 2
    history = DeltaTable(path).history()
    assert [h["version"] for h in history] == [2, 1, 0]
    assert history[0]["clinlinker.operation"] == "MERGE"
    assert history[-1]["clinlinker.operation"] == "CREATE"


def test_merge_counts_rows_by_a_column_in_the_key_check(spark, tmp_path):
    path = str(tmp_path / "t")
    df = make_df(spark, [1, 2, 3, 4, 5], "r1").withColumn(
        "status", F.when(F.col("start") > 20, "linked").otherwise("invalid_input"))
    created = merge_into_delta(spark, df, path, writer="deltalake", count_by="status",
                               max_rows=5)
    assert created.counts == {"linked": 3, "invalid_input": 2}
    merged = merge_into_delta(spark, df.where("start > 30"), path, writer="deltalake",
                              count_by="status")
    assert merged.counts == {"linked": 2} and merged.rows_replaced == 2
    assert merge_into_delta(spark, df, path, writer="deltalake").counts == {}
    with pytest.raises(SchemaMismatchError, match="no column 'nope'"):
        merge_into_delta(spark, df, path, writer="deltalake", count_by="nope")


def _jobs_of(spark, group: str, action) -> int:
    """How many Spark jobs ``action()`` runs."""
    sc = spark.sparkContext
    sc.setJobGroup(group, group)
    try:
        action()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    return len(sc.statusTracker().getJobIdsForGroup(group))


def _added_files(path: str, version: int) -> list[dict[str, Any]]:
    return [e["add"] for e in log_entries(Path(path), version) if "add" in e]


def test_an_empty_write_adds_no_data_file_and_one_version(spark, tmp_path):
    path = str(tmp_path / "empty")
    empty = merge_into_delta(spark, make_df(spark, [1], "r1").limit(0), path,
                             writer="deltalake", max_rows=0)
    assert empty == WriteResult("deltalake", 0, 0, 0)
    assert DeltaTable(path).file_uris() == []
    assert not (Path(path) / writer.STAGING_DIR).exists() or not any(
        (Path(path) / writer.STAGING_DIR).iterdir())


def test_a_row_bound_sizes_the_files_of_a_write(spark, tmp_path):
    # ceil(rows / rows_per_file) files, more (up to one per task slot) while each keeps a
    # tenth of rows_per_file
    assert writer._file_count(100_000, 2, 250_000) == 2
    assert writer._file_count(100_000, None, 250_000) == 1
    assert writer._file_count(20_000, 8, 250_000) == 1
    assert writer._file_count(1_000_000, 2, 250_000) == 4
    assert writer._file_count(1_000_000, 64, 250_000) == 40
    assert writer._file_count(0, 2, 250_000) == 1
    df = make_df(spark, list(range(1, 21)), "r1", 4)
    merge_into_delta(spark, df, str(tmp_path / "bound"), writer="deltalake", max_rows=20,
                     rows_per_file=8)
    merge_into_delta(spark, df, str(tmp_path / "free"), writer="deltalake")
    assert len(_added_files(str(tmp_path / "bound"), 0)) == 3  # ceil(20 / 8)
    assert len(_added_files(str(tmp_path / "free"), 0)) == 4  # one per partition
    slots = spark.sparkContext.defaultParallelism
    merge_into_delta(spark, df, str(tmp_path / "slots"), writer="deltalake", max_rows=20,
                     rows_per_file=40)  # one file by the bound, one per slot by the tenth
    assert len(_added_files(str(tmp_path / "slots"), 0)) == min(4, max(1, min(slots, 5)))


def test_merge_of_keys_known_new_skips_the_table_search_only_at_that_version(spark, tmp_path):
    path = str(tmp_path / "t")
    merge_into_delta(spark, make_df(spark, [1, 2, 3], "r1"), path, writer="deltalake")
    table, version = read_delta_snapshot(spark, path)
    assert version == 0
    assert table is not None and table.count() == 3
    assert read_delta_snapshot(spark, str(tmp_path / "none")) == (None, None)

    # keys 4-5 are new at version 0: the MERGE appends without searching the table (fewer
    # Spark jobs than the same MERGE into a copy of the table without the promise)
    plain = tmp_path / "plain"
    merge_into_delta(spark, make_df(spark, [1, 2, 3], "r1"), str(plain), writer="deltalake")
    with_search = _jobs_of(spark, "with", lambda: merge_into_delta(
        spark, make_df(spark, [4, 5], "r2"), str(plain), writer="deltalake"))
    known = {}
    without = _jobs_of(spark, "without", lambda: known.update(result=merge_into_delta(
        spark, make_df(spark, [4, 5], "r2"), path, writer="deltalake", new_keys_at=0)))
    assert without < with_search
    assert known["result"] == WriteResult("deltalake", 1, 2, 0)
    assert by_key(read_delta(spark, path)) == by_key(read_delta(spark, str(plain)))

    # a stale promise (the table moved on since version 0) is not trusted: key 5 is replaced,
    # never duplicated
    again = merge_into_delta(spark, make_df(spark, [5, 6], "r1"), path, writer="deltalake",
                             new_keys_at=0)
    assert again.rows_replaced == 1
    table = by_key(read_delta(spark, path))  # fails on a duplicated key
    assert sorted(table) == [f"m{i:03d}" for i in range(1, 7)]
    assert table["m005"]["run_id"] == "r1"


@pytest.mark.parametrize("broadcast_rows", [500_000, 0], ids=["broadcast", "shuffle"])
def test_merge_rewrites_only_files_holding_replaced_keys(spark, tmp_path, broadcast_rows):
    # both ways of matching the new keys against the table's files give the same commit
    path = tmp_path / "t"
    # One file per doc: keys 1,4,7 | 2,5,8 | 3,6,9 (doc = i % 3).
    groups = [[1, 4, 7], [2, 5, 8], [3, 6, 9]]
    parts = [spark.createDataFrame(rows_for(ids, "r1"), SCHEMA).coalesce(1) for ids in groups]
    base = parts[0].unionByName(parts[1]).unionByName(parts[2])
    merge_into_delta(spark, base, str(path), writer="deltalake")
    before = snapshot_files(path)
    assert len(before) == 3
    in_file = {
        Path(r["f"]).name: r["ids"]
        for r in read_delta(spark, str(path))
        .groupBy(F.col("_metadata.file_name").alias("f"))
        .agg(F.sort_array(F.collect_list("mention_id")).alias("ids")).collect()
    }
    target_file = next(name for name, ids in in_file.items() if "m001" in ids)

    result = merge_into_delta(spark, make_df(spark, [1, 10], "r2", 1), str(path),
                              writer="deltalake", broadcast_rows=broadcast_rows)
    assert result.rows_replaced == 1 and result.table_version == 1
    after = snapshot_files(path)
    assert before - after == {target_file}  # only the file holding m001 was replaced
    assert len(after - before) >= 1
    entries = log_entries(path, 1)
    removed = [e["remove"]["path"] for e in entries if "remove" in e]
    added = [e["add"] for e in entries if "add" in e]
    assert removed == [target_file]
    assert {a["path"] for a in added} == after - before
    for add in added:
        assert add["partitionValues"] == {} and add["dataChange"] is True and add["size"] > 0
        stats = json.loads(add["stats"])
        assert stats["numRecords"] > 0
        assert stats["nullCount"]["mention_id"] == 0
        assert stats["minValues"]["mention_id"] <= stats["maxValues"]["mention_id"]
    assert sum(json.loads(a["stats"])["numRecords"] for a in added) == 4  # m004, m007 + 2 new
    table = by_key(read_delta(spark, str(path)))
    assert len(table) == 10 and table["m001"]["run_id"] == "r2" and table["m004"]["run_id"] == "r1"


def test_table_reads_as_delta_with_deltalake_and_duckdb(spark, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    path = str(tmp_path / "t")
    merge_into_delta(spark, make_df(spark, [1, 2, 3, 4], "r1"), path, writer="deltalake")
    merge_into_delta(spark, make_df(spark, [3, 4, 5], "r2"), path, writer="deltalake")
    expected = by_key(read_delta(spark, path))

    arrow = DeltaTable(path).to_pyarrow_table()
    assert arrow.num_rows == 5
    from_deltalake = {r["mention_id"]: r for r in arrow.to_pylist()}
    assert set(from_deltalake) == set(expected)
    for mention_id, row in expected.items():
        got = from_deltalake[mention_id]
        assert got["candidates"] == row["candidates"]
        assert got["run_id"] == row["run_id"] and got["score"] == row["score"]
        assert got["run_ts"] == RUN_TS[row["run_id"]]

    # DuckDB: its `delta` extension cannot be downloaded offline, so autoinstall is off and
    # delta_scan is used only when the extension is already installed. Otherwise DuckDB reads
    # the Arrow snapshot deltalake produced, and the exact Parquet files of the snapshot.
    con = duckdb.connect(config={"autoinstall_known_extensions": False})
    try:
        con.execute("LOAD delta")
        query = f"SELECT mention_id, run_id FROM delta_scan('{path}') ORDER BY mention_id"
    except Exception:  # noqa: BLE001 - extension not installed on this machine
        con.register("snapshot", arrow)
        query = "SELECT mention_id, run_id FROM snapshot ORDER BY mention_id"
        files = DeltaTable(path).file_uris()
        n = con.execute("SELECT count(*) FROM read_parquet(?)", [files]).fetchone()[0]
        assert n == 5
    got = con.execute(query).fetchall()
    assert got == sorted((k, v["run_id"]) for k, v in expected.items())


def test_nested_timestamp_and_nullability_round_trip(spark, tmp_path):
    path = tmp_path / "t"
    df = make_df(spark, [1, 2, 3], "r1")
    merge_into_delta(spark, df, str(path), writer="deltalake")
    back = read_delta(spark, str(path))
    assert back.schema["candidates"].dataType.elementType == CANDIDATE
    assert by_key(back) == by_key(df)
    # Timestamps are written as microseconds, never INT96.
    for file_uri in DeltaTable(str(path)).file_uris():
        ts_type = pq.read_schema(file_uri).field("run_ts").type
        assert str(ts_type).startswith("timestamp[us")
    delta_fields = {f.name: f for f in DeltaTable(str(path)).schema().fields}
    assert all(f.nullable for f in delta_fields.values())


@pytest.mark.parametrize("bound", [{}, {"max_rows": 10}], ids=["unbounded", "bounded"])
def test_duplicate_or_null_keys_are_refused_and_leave_the_table_alone(spark, tmp_path, bound):
    path = tmp_path / "t"
    merge_into_delta(spark, make_df(spark, [1, 2], "r1"), str(path), writer="deltalake")
    files_before = data_files_on_disk(path)
    duplicated = make_df(spark, [3, 3, 4], "r2")
    with pytest.raises(DuplicateKeyError, match="one row per key"):
        merge_into_delta(spark, duplicated, str(path), writer="deltalake", **bound)
    assert issubclass(DuplicateKeyError, InputDataError)
    null_key_schema = StructType([StructField("mention_id", StringType(), True),
                                  *SCHEMA.fields[1:]])
    null_key = spark.createDataFrame([(None, *rows_for([5], "r2")[0][1:])], null_key_schema)
    with pytest.raises(DuplicateKeyError, match="null 'mention_id'"):
        merge_into_delta(spark, null_key, str(path), writer="deltalake", **bound)
    assert table_version(str(path)) == 0
    assert data_files_on_disk(path) == files_before
    assert not list((path / writer.STAGING_DIR).glob("*"))
    with pytest.raises(DuplicateKeyError):  # also when the table does not exist yet
        merge_into_delta(spark, duplicated, str(tmp_path / "new"), writer="deltalake", **bound)
    assert not table_exists(str(tmp_path / "new"))


def test_failure_between_parquet_write_and_commit_keeps_the_table(spark, tmp_path, monkeypatch):
    path = tmp_path / "t"
    merge_into_delta(spark, make_df(spark, [1, 2, 3], "r1"), str(path), writer="deltalake")
    before = by_key(read_delta(spark, str(path)))
    files_before = data_files_on_disk(path)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("simulated crash before the commit")

    monkeypatch.setattr(writer, "_commit", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        merge_into_delta(spark, make_df(spark, [2, 3, 4], "r2"), str(path), writer="deltalake")
    assert table_version(str(path)) == 0
    assert by_key(read_delta(spark, str(path))) == before
    assert data_files_on_disk(path) == files_before  # the moved files were deleted again

    # A process killed before it could clean up leaves its files behind: still invisible.
    monkeypatch.setattr(writer, "_delete_quietly", lambda *a, **k: None)
    monkeypatch.setattr(writer, "_cleanup_staging", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        merge_into_delta(spark, make_df(spark, [2, 3, 4], "r2"), str(path), writer="deltalake")
    assert data_files_on_disk(path) > files_before  # orphans are on disk ...
    assert table_version(str(path)) == 0
    assert by_key(read_delta(spark, str(path))) == before  # ... but not in the table
    assert DeltaTable(str(path)).to_pyarrow_table().num_rows == 3

    monkeypatch.undo()
    result = merge_into_delta(spark, make_df(spark, [2, 3, 4], "r2"), str(path),
                              writer="deltalake")
    assert result.table_version == 1 and result.rows_replaced == 2
    table = by_key(read_delta(spark, str(path)))
    assert sorted(table) == ["m001", "m002", "m003", "m004"]
    assert [table[k]["run_id"] for k in sorted(table)] == ["r1", "r2", "r2", "r2"]


def test_error_after_the_commit_landed_keeps_the_committed_files(spark, tmp_path,
                                                                  monkeypatch):
    path = tmp_path / "t"
    merge_into_delta(spark, make_df(spark, [1, 2], "r1"), str(path), writer="deltalake")
    real_commit = writer._commit

    def commit_then_fail(*args: Any, **kwargs: Any) -> None:
        real_commit(*args, **kwargs)
        raise RuntimeError("simulated failure in a post-commit hook")

    monkeypatch.setattr(writer, "_commit", commit_then_fail)
    with pytest.raises(RuntimeError, match="post-commit"):
        merge_into_delta(spark, make_df(spark, [2, 3], "r2"), str(path), writer="deltalake")
    assert table_version(str(path)) == 1
    assert snapshot_files(path) <= data_files_on_disk(path)  # nothing referenced was deleted
    table = by_key(read_delta(spark, str(path)))
    assert {k: v["run_id"] for k, v in table.items()} == {"m001": "r1", "m002": "r2",
                                                          "m003": "r2"}


def test_read_delta_ignores_files_outside_the_snapshot(spark, tmp_path):
    path = tmp_path / "t"
    merge_into_delta(spark, make_df(spark, [1, 2], "r1"), str(path), writer="deltalake")
    merge_into_delta(spark, make_df(spark, [2], "r2"), str(path), writer="deltalake")
    # A stray file with the table's layout (e.g. from a crashed writer) next to the table's.
    stray = DeltaTable(str(path)).to_pyarrow_table().slice(0, 1)
    pq.write_table(stray, path / "part-00000-orphan.snappy.parquet")
    df = read_delta(spark, str(path))
    assert sorted(by_key(df)) == ["m001", "m002"]
    # Files removed by the MERGE are still on disk too (until VACUUM) and not read either.
    assert len(data_files_on_disk(path)) > len(snapshot_files(path)) + 1


def test_new_nullable_column_evolves_the_schema_in_one_commit(spark, tmp_path):
    path = str(tmp_path / "t")
    merge_into_delta(spark, make_df(spark, [1, 2, 3], "r1"), path, writer="deltalake")
    wider = make_df(spark, [3, 4], "r2").withColumn("reason", F.lit("because"))
    result = merge_into_delta(spark, wider, path, writer="deltalake")
    assert result.table_version == 1 and result.rows_replaced == 1
    assert DeltaTable(path).schema().to_arrow().names[-1] == "reason"
    table = by_key(read_delta(spark, path))
    assert {k: v["reason"] for k, v in table.items()} == {
        "m001": None, "m002": None, "m003": "because", "m004": "because"
    }
    assert DeltaTable(path).history(1)[0]["clinlinker.full_rewrite"] is True
    arrow = DeltaTable(path).to_pyarrow_table()
    assert sorted(arrow.column("reason").to_pylist(), key=str) == [
        None, None, "because", "because"
    ]


WIDER_CANDIDATE = StructType(  # CANDIDATE with a field between its fields and one after
    [*CANDIDATE.fields[:2], StructField("lexical_score", DoubleType(), True),
     *CANDIDATE.fields[2:], StructField("ranker_score", DoubleType(), True)]
)


def wider_df(spark, ids: list[int], run: str):
    """make_df's rows with WIDER_CANDIDATE candidates (lexical_score = 0.1 * i, ranker 0.5)."""
    schema = StructType([StructField(f.name, ArrayType(WIDER_CANDIDATE, containsNull=False),
                                     True) if f.name == "candidates" else f
                         for f in SCHEMA.fields])
    rows = [(*r[:5], [(c[0], c[1], 0.1 * i, c[2], c[3], 0.5) for c in r[5]], *r[6:])
            for i, r in zip(ids, rows_for(ids, run))]
    return spark.createDataFrame(rows, schema)


def test_new_struct_fields_evolve_the_schema_and_read_null_in_older_rows(spark, tmp_path):
    path = str(tmp_path / "t")
    merge_into_delta(spark, make_df(spark, [1, 2, 3], "r1"), path, writer="deltalake")
    wider = wider_df(spark, [3, 4], "r2")
    result = merge_into_delta(spark, wider, path, writer="deltalake")
    assert result.table_version == 1 and result.rows_replaced == 1
    assert DeltaTable(path).history(1)[0]["clinlinker.full_rewrite"] is True
    # the table's fields keep their order, the new ones follow
    names = ["code", "term", "retrieval_score", "rerank_score", "lexical_score", "ranker_score"]
    element = read_delta(spark, path).schema["candidates"].dataType.elementType
    assert element.names == names
    for table in (by_key(read_delta(spark, path)),
                  {r["mention_id"]: r for r in DeltaTable(path).to_pyarrow_table().to_pylist()}):
        old, new = table["m001"]["candidates"][0], table["m004"]["candidates"][0]
        assert list(old) == list(new) == names
        assert (old["code"], old["lexical_score"], old["ranker_score"]) == ("C1-r1", None, None)
        assert (new["code"], new["lexical_score"], new["ranker_score"]) == ("C4-r2", 0.4, 0.5)
        assert new["retrieval_score"] == pytest.approx(0.86)
        assert table["m003"]["run_id"] == "r2" and len(table) == 4
    # the same fields in the DataFrame's other order are the table's type: no schema change,
    # only the files holding replaced keys are rewritten
    again = merge_into_delta(spark, wider_df(spark, [4, 5], "r2"), path, writer="deltalake")
    assert again.rows_replaced == 1
    assert DeltaTable(path).history(1)[0]["clinlinker.full_rewrite"] is False
    assert by_key(read_delta(spark, path))["m005"]["candidates"][1]["lexical_score"] == 0.5
    # a struct field whose type changes is still a conflict
    changed = wider_df(spark, [6], "r2").withColumn("candidates", F.transform(
        "candidates", lambda c: c.withField("rerank_score", c["rerank_score"].cast("string"))))
    with pytest.raises(SchemaMismatchError, match="'candidates' is array"):
        merge_into_delta(spark, changed, path, writer="deltalake")


def test_schema_conflicts_are_clear_errors(spark, tmp_path):
    path = str(tmp_path / "t")
    merge_into_delta(spark, make_df(spark, [1, 2], "r1"), path, writer="deltalake")
    changed = make_df(spark, [3], "r2").withColumn("start", F.col("start").cast("string"))
    with pytest.raises(SchemaMismatchError, match="'start' is bigint in the table but string"):
        merge_into_delta(spark, changed, path, writer="deltalake")
    with pytest.raises(SchemaMismatchError, match="lacks table column"):
        merge_into_delta(spark, make_df(spark, [3], "r2").drop("doc_id"), path,
                         writer="deltalake")
    with pytest.raises(SchemaMismatchError, match="no key column"):
        merge_into_delta(spark, make_df(spark, [3], "r2"), path, key="id", writer="deltalake")
    with pytest.raises(ConfigError):
        merge_into_delta(spark, make_df(spark, [3], "r2"), path, writer="parquet")
    assert table_version(path) == 0


def test_without_remove_action_a_full_rewrite_is_one_correct_commit(spark, tmp_path,
                                                                   monkeypatch):
    path = tmp_path / "t"
    merge_into_delta(spark, make_df(spark, [1, 2, 3, 4], "r1", 2), str(path), writer="deltalake")
    before = snapshot_files(path)
    monkeypatch.setattr(writer, "_RemoveAction", None)  # as with deltalake < 1.6
    result = merge_into_delta(spark, make_df(spark, [4, 5], "r2"), str(path), writer="deltalake")
    assert result.table_version == 1 and result.rows_replaced == 1
    entries = log_entries(path, 1)
    added = {e["add"]["path"] for e in entries if "add" in e}
    removed = {e["remove"]["path"] for e in entries if "remove" in e}
    assert removed == before and not (added & removed)  # no path both added and removed
    table = by_key(read_delta(spark, str(path)))
    assert [table[k]["run_id"] for k in sorted(table)] == ["r1", "r1", "r1", "r2", "r2"]


def test_replace_keys_df_deletes_rows_without_a_replacement(spark, tmp_path):
    path = str(tmp_path / "t")
    merge_into_delta(spark, make_df(spark, [1, 2, 3, 4], "r1"), path, writer="deltalake")
    replace = spark.createDataFrame([("m002",), ("m003",), ("m999",)], ["mention_id"])
    result = merge_into_delta(spark, make_df(spark, [3, 5], "r2"), path, writer="deltalake",
                              replace_keys_df=replace)
    assert result == WriteResult("deltalake", 1, 2, 2)  # m002 deleted, m003 replaced
    table = by_key(read_delta(spark, path))
    assert {k: v["run_id"] for k, v in table.items()} == {
        "m001": "r1", "m003": "r2", "m004": "r1", "m005": "r2"
    }


def test_empty_dataframe_creates_an_empty_table(spark, tmp_path):
    path = str(tmp_path / "t")
    result = merge_into_delta(spark, spark.createDataFrame([], SCHEMA), path, writer="deltalake")
    assert result == WriteResult("deltalake", 0, 0, 0)
    df = read_delta(spark, path)
    assert df is not None and df.count() == 0 and df.columns == SCHEMA.names
    assert DeltaTable(path).to_pyarrow_table().num_rows == 0
    merge_into_delta(spark, make_df(spark, [1], "r1"), path, writer="deltalake")
    # An empty df still commits (the rerun contract: one version per write), changing nothing.
    again = merge_into_delta(spark, spark.createDataFrame([], SCHEMA), path, writer="deltalake")
    assert again == WriteResult("deltalake", 2, 0, 0)
    assert sorted(by_key(read_delta(spark, path))) == ["m001"]


# --------------------------------------------------------------------------------------------
# delta-spark writer (only where its jars are on this machine)


def test_delta_spark_probe_does_not_crash(spark, tmp_path):
    available = delta_spark_available(spark)
    assert isinstance(available, bool)
    if not available:
        with pytest.raises(ConfigError, match="delta-spark"):
            merge_into_delta(spark, make_df(spark, [1], "r1"), str(tmp_path / "t"),
                             writer="delta-spark")
        # auto falls back to deltalake
        assert merge_into_delta(spark, make_df(spark, [1], "r1"), str(tmp_path / "t")).writer \
            == "deltalake"


class _ConfiguredForDelta:
    """A session stand-in whose conf claims the Delta extension (the JVM is the real one)."""

    class _Conf:
        def get(self, name: str, default: str | None = None) -> str | None:
            if name == "spark.sql.extensions":
                return "io.delta.sql.DeltaSparkSessionExtension"
            return default

    def __init__(self, spark) -> None:
        self.conf = self._Conf()
        self.sparkContext = spark.sparkContext


def test_delta_spark_probe_checks_the_jvm_class_not_only_the_conf(spark):
    if delta_spark_available(spark):
        pytest.skip("delta-spark is available here; this checks the no-jars answer")
    # Extension configured but jars absent (Spark only warns at startup): False, no crash.
    assert delta_spark_available(_ConfiguredForDelta(spark)) is False
    assert writer._probe_delta_source(spark) is False


@pytest.mark.parametrize("writer", [
    "deltalake", pytest.param("delta-spark", marks=pytest.mark.delta_spark)])
def test_a_snapshot_reads_its_version_after_a_later_write(request, spark, tmp_path, writer):
    # the link job evaluates reads of its own output table again after its write
    if writer == "delta-spark":
        request.getfixturevalue("delta_spark")
    path = str(tmp_path / "t")
    merge_into_delta(spark, make_df(spark, [1, 2, 3], "r1"), path, writer=writer)
    table, version = read_delta_snapshot(spark, path)
    assert version == 0
    merge_into_delta(spark, make_df(spark, [3, 4], "r2"), path, writer=writer)
    assert {k: v["run_id"] for k, v in by_key(table).items()} == {
        "m001": "r1", "m002": "r1", "m003": "r1"}
    assert read_delta(spark, path).count() == 4


def test_merge_with_delta_spark(delta_spark, tmp_path):
    spark = delta_spark
    path = str(tmp_path / "t")
    first = merge_into_delta(spark, make_df(spark, [1, 2, 3], "r1"), path, writer="delta-spark")
    assert first == WriteResult("delta-spark", 0, 3, 0)
    update = make_df(spark, [3, 4], "r2")
    assert merge_into_delta(spark, update, path, writer="delta-spark") == WriteResult(
        "delta-spark", 1, 2, 1
    )
    assert merge_into_delta(spark, update, path, writer="delta-spark").table_version == 2
    table = by_key(read_delta(spark, path))
    assert {k: v["run_id"] for k, v in table.items()} == {
        "m001": "r1", "m002": "r1", "m003": "r2", "m004": "r2"
    }
    assert DeltaTable(path).to_pyarrow_table().num_rows == 4
    # The two writers share tables: deltalake merges into the delta-spark table and back.
    merge_into_delta(spark, make_df(spark, [1], "r2"), path, writer="deltalake")
    assert by_key(read_delta(spark, path))["m001"]["run_id"] == "r2"
    replace = spark.createDataFrame([("m002",)], ["mention_id"])
    wider = make_df(spark, [5], "r2").withColumn("reason", F.lit("x"))
    result = merge_into_delta(spark, wider, path, writer="delta-spark", replace_keys_df=replace)
    assert result.rows_replaced == 1
    assert sorted(by_key(read_delta(spark, path))) == ["m001", "m003", "m004", "m005"]
    with pytest.raises(DuplicateKeyError):
        merge_into_delta(spark, make_df(spark, [6, 6], "r2").withColumn("reason", F.lit("x")),
                         path, writer="delta-spark")


def test_merge_metrics_in_the_history_read_as_delta_sparks(delta_spark, tmp_path):
    """Both writers record a MERGE's rows inserted and updated under delta-spark's metric
    names; delta-rs records the operation itself as WRITE (it lets no writer name it)."""
    spark = delta_spark
    metrics = {}
    for name in ("deltalake", "delta-spark"):
        path = str(tmp_path / name)
        merge_into_delta(spark, make_df(spark, [1, 2, 3], "r1"), path, writer=name)
        merge_into_delta(spark, make_df(spark, [2, 3, 4, 5], "r2"), path, writer=name)
        last = DeltaTable(path).history(1)[0]
        metrics[name] = {k: int(last["operationMetrics"][k]) for k in (
            "numSourceRows", "numTargetRowsInserted", "numTargetRowsUpdated",
            "numTargetRowsDeleted")}
        assert last["operation"] == ("WRITE" if name == "deltalake" else "MERGE")
    assert metrics["deltalake"] == metrics["delta-spark"] == {
        "numSourceRows": 4, "numTargetRowsInserted": 2, "numTargetRowsUpdated": 2,
        "numTargetRowsDeleted": 0}
    lake = DeltaTable(str(tmp_path / "deltalake")).history(1)[0]
    assert lake["clinlinker.operation"] == "MERGE"
    assert "mention_id" in lake["operationParameters"]["predicate"]
