"""The fault suite: how the link job fails and what a failed night leaves behind.

Every case fails a night on purpose, checks the exit status and the one line the CLI prints,
that the table holds exactly what it held before (no row lost, none duplicated, no data file
that no version references, no staging folder), and that a rerun completes the night.
Run alone with ``pytest -m faults``. docs/operations.md lists the cases.
"""

# ruff: noqa: F811 - the job tests' fixtures are imported by name and taken as parameters
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from clinlinker_spark.errors import InputDataError, ModelLoadError
from clinlinker_spark.spark import udfs, writer
from clinlinker_spark.spark.schemas import CACHE_KEY_COLUMN, PREPARED_STRUCT

from test_spark_job import (  # noqa: F401 - fixtures used by name
    MENTION_COLUMNS,
    dev_mentions,
    job_config,
    read_table,
    run_job,
    sample_index,
    sample_terminology,
    table_version,
)

pytestmark = [pytest.mark.spark, pytest.mark.faults]

TESTS_DIR = Path(__file__).resolve().parent
NIGHT_ONE, NIGHT_TWO = 60, 120  # mentions of night 1; of night 2 (night 1's and 60 new)


# --------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def nights(tmp_path, dev_mentions) -> tuple[Path, Path, pd.DataFrame]:
    """Two nights as Parquet inputs: night 2 holds night 1's mentions and as many new."""
    mentions = dev_mentions[MENTION_COLUMNS].iloc[:NIGHT_TWO].reset_index(drop=True)
    one, two = tmp_path / "night1.parquet", tmp_path / "night2.parquet"
    mentions.iloc[:NIGHT_ONE].to_parquet(one, index=False)
    mentions.to_parquet(two, index=False)
    return one, two, mentions


def link_sets(encoder: Path, index: Path, source: Path, table: Path, *extra: str) -> list[str]:
    """``--set`` values of an incremental link job into ``table`` with the deltalake writer
    (the writer that stages files)."""
    return [
        f"encoder.path={encoder}", "encoder.device=cpu", "encoder.batch_size=32",
        f"index.path={index}", "build_missing=false", "linking.search_k=50",
        "linking.top_k=10", f"input.path={source}", "input.format=parquet",
        "input.passthrough_columns=[]", f"output.path={table}", "output.writer=deltalake",
        "output.incremental=true", "spark.shuffle_partitions=2", *extra,
    ]


def argv(sets: list[str]) -> list[str]:
    return ["link", "--show", "0", *[part for s in sets for part in ("--set", s)]]


def cli(monkeypatch, spark, sets: list[str]) -> int:
    """``clinlinker link`` in this process, on the tests' Spark session."""
    from clinlinker_spark.cli import main
    from clinlinker_spark.spark import session

    monkeypatch.setattr(session, "build_spark_session", lambda cfg, extra_conf=None: spark)
    return main(argv([*sets, "spark.master="]))  # no master: the CLI leaves the session up


def error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def referenced_files(table: Path) -> set[str]:
    """Every data file some version of the Delta table at ``table`` added."""
    names = set()
    for commit in (table / "_delta_log").glob("*.json"):
        for line in commit.read_text().splitlines():
            action = json.loads(line)
            if "add" in action:
                names.add(action["add"]["path"])
    return names


def assert_whole(table: Path, ids: list[str]) -> None:
    """The table holds each of ``ids`` once and nothing else; every data file on disk is one
    that a version of the table added; no staging folder is left."""
    rows = read_table(table)
    assert sorted(rows["mention_id"]) == sorted(ids)
    on_disk = {p.relative_to(table).as_posix() for p in table.rglob("*.parquet")
               if "_delta_log" not in p.parts}
    assert on_disk <= referenced_files(table), on_disk - referenced_files(table)
    staging = table / writer.STAGING_DIR
    assert not staging.exists() or not any(staging.iterdir())


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, before any work


def test_a_text_column_of_another_type_is_refused_before_any_spark_job(
    spark, tmp_path, tiny_encoder_dir, sample_index,
):
    config = job_config(tmp_path, tiny_encoder_dir, sample_index,
                        "input.passthrough_columns=[]")
    numbers = spark.createDataFrame(
        [("a", "d1", 0, 1, 0, "X"), ("b", "d1", 2, 4, 21, "X")],
        "mention_id string, doc_id string, start long, end long, text long, label string")
    jobs_before = len(spark.sparkContext.statusTracker().getJobIdsForGroup())
    with pytest.raises(InputDataError, match=r"column 'text' \(input.text_column\) is bigint"):
        run_job(spark, config, mentions=numbers)
    assert len(spark.sparkContext.statusTracker().getJobIdsForGroup()) == jobs_before
    floats = numbers.withColumn("mention_id", numbers["start"].cast("double"))
    with pytest.raises(InputDataError, match=r"'mention_id' \(input.mention_id_column\) is "
                                             "double, not a string or an integer"):
        run_job(spark, config, mentions=floats.withColumn("text", floats["label"]))
    assert not Path(config.output.path).exists()
    # integer ids are ids: the run goes on
    ints = numbers.withColumn("mention_id", numbers["start"]).withColumn("text",
                                                                         numbers["label"])
    summary = run_job(spark, config, mentions=ints)
    assert sorted(read_table(config.output.path)["mention_id"]) == ["0", "2"]
    assert summary["rows_written"] == 2


def unreadable_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """Inputs that cannot be read: (path, input.format) by case."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import write_deltalake

    good = pa.table({"mention_id": ["a", "b"], "text": ["fiebre", "tos"]})
    renamed = folder / "csv"
    renamed.mkdir()
    (renamed / "part-0.parquet").write_text("mention_id,text\na,fiebre\n")
    truncated = folder / "truncated"
    truncated.mkdir()
    pq.write_table(good, truncated / "part-0.parquet")
    pq.write_table(good, truncated / "part-1.parquet")
    data = (truncated / "part-1.parquet").read_bytes()
    (truncated / "part-1.parquet").write_bytes(data[: len(data) // 2])
    delta = folder / "delta"
    write_deltalake(str(delta), good)
    log = sorted((delta / "_delta_log").glob("*.json"))[0]
    log.write_text("{not json")
    return {"not parquet": (renamed, "parquet"), "truncated": (truncated, "parquet"),
            "broken Delta log": (delta, "delta")}


@pytest.mark.parametrize("case", ["not parquet", "truncated", "broken Delta log"])
def test_unreadable_input_is_one_line_naming_the_file(
    spark, tmp_path, tiny_encoder_dir, sample_index, case,
):
    path, fmt = unreadable_inputs(tmp_path)[case]
    config = job_config(tmp_path, tiny_encoder_dir, sample_index, f"input.path={path}",
                        f"input.format={fmt}", "input.passthrough_columns=[]",
                        "input.doc_id_column=", "input.start_column=", "input.end_column=",
                        "input.label_column=")
    with pytest.raises(InputDataError) as raised:
        run_job(spark, config)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"input {path} cannot be read: ")
    if case != "broken Delta log":
        assert "is not a Parquet file" in message
        assert ("part-0.parquet" if case == "not parquet" else "part-1.parquet") in message
    else:
        assert "_delta_log" in message or "json" in message.lower()
    assert not Path(config.output.path).exists()


def test_a_broken_delta_log_read_by_delta_rs_is_an_input_error(tmp_path):
    # the path a session without delta-spark's jars takes: delta-rs opens the input table
    # (its exceptions live in a native module, not under ``deltalake``)
    from clinlinker_spark.config import InputConfig
    from clinlinker_spark.spark.mentions import input_errors

    path, _ = unreadable_inputs(tmp_path)["broken Delta log"]
    cfg = InputConfig(path=str(path), format="delta")
    with pytest.raises(InputDataError) as raised, input_errors(cfg):
        writer._open_table(writer._locate(str(path)))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"input {path} cannot be read: ")
    assert "json" in message.lower()


def test_the_cli_ends_an_unreadable_input_in_one_line_and_status_2(tmp_path):
    path, _ = unreadable_inputs(tmp_path)["not parquet"]
    done = subprocess.run(
        [sys.executable, "-m", "clinlinker_spark", "link", "--show", "0",
         "--set", f"input.path={path}", "--set", "input.format=parquet",
         "--set", f"output.path={tmp_path / 'out'}", "--set", "spark.master=local[1]"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "is not a Parquet file" in errors[0], done.stderr[-2000:]
    assert not [line for line in done.stderr.splitlines()
                if line.lstrip().startswith(("at org.", "at java.", "Caused by"))]


def test_an_empty_id_has_its_own_reason_and_a_folder_that_is_not_a_model_is_refused(
    tmp_path, tiny_encoder_dir, sample_index,
):
    from clinlinker_spark.spark.artifacts import resolve_artifacts
    from clinlinker_spark.spark.udfs import check_mentions_batch

    _, reasons = check_mentions_batch(["tos", "tos", "tos"], [1, 1, 1],
                                      [None, "null mention_id", "empty mention_id"], 100)
    assert reasons == [None, "null mention_id", "empty mention_id"]
    # build_missing builds only where nothing is: a folder a failed copy left empty is an error
    empty = tmp_path / "encoder"
    empty.mkdir()
    config = job_config(tmp_path, empty, sample_index, "build_missing=true")
    with pytest.raises(ModelLoadError, match=r"encoder path .* is a folder without config.json"):
        resolve_artifacts(config)
    assert list(empty.iterdir()) == []  # nothing was built into it
    index = tmp_path / "index"
    index.mkdir()
    (index / "vectors.faiss").write_text("")
    config = job_config(tmp_path, tiny_encoder_dir, index, "build_missing=true")
    with pytest.raises(Exception, match=r"index path .* is a folder without manifest.json"):
        resolve_artifacts(config)


# --------------------------------------------------------------------------------------------
# A failure at each stage of a night, then a rerun


def failing_prepare_udf(max_text_length: int) -> Any:
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(PREPARED_STRUCT)  # type: ignore[call-overload]
    def prepare(texts, rows, bad_ids):
        raise RuntimeError("injected failure in the prepare stage")

    return prepare


def failing_retrieve_fn(spec: Any, stage_seconds: Any = None) -> Any:
    def run(batches):
        for _ in batches:
            raise RuntimeError("injected failure in the linking UDF")
        yield from ()

    return run


def inject(monkeypatch, stage: str) -> None:
    """Make the next link job fail at ``stage``."""
    if stage == "prepare":
        monkeypatch.setattr(udfs, "make_prepare_udf", failing_prepare_udf)
    elif stage == "udf":
        monkeypatch.setattr(udfs, "make_retrieve_fn", failing_retrieve_fn)
    elif stage == "staging":
        real_stage = writer._stage

        def stage_then_fail(*args: Any, **kwargs: Any) -> list[str]:
            real_stage(*args, **kwargs)
            raise OSError("injected failure after the files were staged")

        monkeypatch.setattr(writer, "_stage", stage_then_fail)
    elif stage == "commit":
        def no_commit(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("injected failure before the commit")

        monkeypatch.setattr(writer, "_commit", no_commit)
    elif stage == "form cache":
        real_merge = writer.merge_into_delta

        def merge_but_not_the_cache(spark, df, table, key="mention_id", **kwargs):
            if key == CACHE_KEY_COLUMN:
                raise OSError("injected failure writing the form cache")
            return real_merge(spark, df, table, key, **kwargs)

        monkeypatch.setattr(writer, "merge_into_delta", merge_but_not_the_cache)


STAGES = {  # stage -> (exit status, what the one line says)
    "prepare": (1, "RuntimeError: injected failure in the prepare stage"),
    "udf": (1, "RuntimeError: injected failure in the linking UDF"),
    "staging": (1, "injected failure after the files were staged"),
    "commit": (1, "injected failure before the commit"),
    "form cache": (0, None),  # the table is committed; the cache is filled by a later night
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_night_failed_at_each_stage_loses_nothing_and_a_rerun_completes_it(
    spark, tmp_path, tiny_encoder_dir, sample_index, nights, monkeypatch, caplog, stage,
):
    one, two, mentions = nights
    table, cache = tmp_path / "table", tmp_path / "cache"
    sets = link_sets(tiny_encoder_dir, sample_index, one, table,
                     f"output.form_cache_path={cache}")
    assert cli(monkeypatch, spark, sets) == 0
    night_one = list(mentions["mention_id"].iloc[:NIGHT_ONE])
    version = table_version(table)

    night_two = link_sets(tiny_encoder_dir, sample_index, two, table,
                          f"output.form_cache_path={cache}")
    inject(monkeypatch, stage)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = cli(monkeypatch, spark, night_two)
    want_status, want_line = STAGES[stage]
    assert status == want_status
    errors = error_lines(caplog)
    if want_line is None:
        assert errors == []
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                  and "form cache" in r.getMessage()]
        assert len(warned) == 1 and "\n" not in warned[0]
        assert_whole(table, list(mentions["mention_id"]))
    else:
        assert len(errors) == 1 and "\n" not in errors[0] and want_line in errors[0], errors
        assert table_version(table) == version
        assert_whole(table, night_one)
    monkeypatch.undo()

    assert cli(monkeypatch, spark, night_two) == 0
    assert_whole(table, list(mentions["mention_id"]))
    cache_rows = read_table(cache)
    assert cache_rows[CACHE_KEY_COLUMN].is_unique


# --------------------------------------------------------------------------------------------
# Processes: killed while staging, two writers at once


def start_child(tmp_path: Path, sets: list[str], pause_at: str,
                go: Path | None = None) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / f"ready-{pause_at}"
    spec = {"argv": argv([*sets, "spark.master=local[1]", "spark.driver_memory=1g"]),
            "pause_at": pause_at, "ready": str(ready), "go": str(go) if go else ""}
    proc = subprocess.Popen([sys.executable, str(TESTS_DIR / "fault_child.py"),
                             json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the child did not reach {pause_at}: {proc.communicate()[0][-3000:]}")
        time.sleep(0.2)
    return proc, ready


def test_a_run_killed_while_staging_leaves_no_file_after_the_next_run(
    spark, tmp_path, tiny_encoder_dir, sample_index, nights, monkeypatch,
):
    one, two, mentions = nights
    table = tmp_path / "table"
    assert cli(monkeypatch, spark, link_sets(tiny_encoder_dir, sample_index, one, table)) == 0
    version = table_version(table)

    proc, _ = start_child(tmp_path, link_sets(tiny_encoder_dir, sample_index, two, table),
                          "staged")
    staging = table / writer.STAGING_DIR
    assert list(staging.rglob("*.parquet")), "the child staged no file"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its JVM
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list(staging.rglob("*.parquet"))  # a killed run cannot clean up ...
    assert table_version(table) == version  # ... and committed nothing
    assert sorted(read_table(table)["mention_id"]) == sorted(mentions["mention_id"][:NIGHT_ONE])

    assert cli(monkeypatch, spark, link_sets(tiny_encoder_dir, sample_index, two, table)) == 0
    assert_whole(table, list(mentions["mention_id"]))


@pytest.mark.parametrize("theirs", ["the same new mentions", "other new mentions"])
def test_two_writers_at_once_retry_or_end_in_one_line(
    spark, tmp_path, tiny_encoder_dir, sample_index, nights, monkeypatch, theirs,
):
    one, two, mentions = nights
    table = tmp_path / "table"
    assert cli(monkeypatch, spark, link_sets(tiny_encoder_dir, sample_index, one, table)) == 0
    new = mentions.iloc[NIGHT_ONE:]
    ours_path, theirs_path = tmp_path / "ours.parquet", tmp_path / "theirs.parquet"
    new.iloc[:30].to_parquet(ours_path, index=False)
    (new.iloc[:30] if theirs == "the same new mentions" else new.iloc[30:]).to_parquet(
        theirs_path, index=False)

    go = tmp_path / "go"
    proc, _ = start_child(tmp_path, link_sets(tiny_encoder_dir, sample_index, ours_path,
                                              table), "commit", go)
    # the other writer commits while the child waits before its commit
    assert cli(monkeypatch, spark, link_sets(tiny_encoder_dir, sample_index, theirs_path,
                                             table)) == 0
    go.write_text("go")
    output = proc.communicate(timeout=300)[0]
    errors = [line for line in output.splitlines() if " ERROR " in line]
    if theirs == "the same new mentions":
        assert proc.returncode == 2, output[-3000:]
        assert len(errors) == 1 and "ConcurrentWriteError" in errors[0], output[-3000:]
        assert "another write committed version" in errors[0]
        assert "a rerun is safe" in errors[0]
        assert_whole(table, list(mentions["mention_id"][:NIGHT_ONE + 30]))
    else:
        assert proc.returncode == 0 and errors == [], output[-3000:]
        assert_whole(table, list(mentions["mention_id"]))


# --------------------------------------------------------------------------------------------
# What a stale or wrong result would cost


def test_the_form_cache_serves_no_outcome_of_other_artifacts(
    spark, tmp_path, tiny_encoder_dir, tiny_cross_encoder_dir, sample_index, sample_terminology,
):
    from clinlinker_spark.config import IndexConfig
    from clinlinker_spark.encoder import BiEncoder
    from clinlinker_spark.index import build_index
    from clinlinker_spark.spark.form_cache import cache_key_of
    from clinlinker_spark.spark.schemas import VERSION_COLUMNS

    base = {c: f"v-{c}" for c in VERSION_COLUMNS}
    for column in ("model_version", "index_version", "reranker_version", "ranker_version",
                   "linking_version"):
        assert cache_key_of("fiebre", {**base, column: "other"}) != cache_key_of("fiebre", base)

    cache = tmp_path / "cache"

    def night(name: str, index: Path, reranker: Path | None = None) -> dict:
        config = job_config(tmp_path / name, tiny_encoder_dir, index,
                            f"output.form_cache_path={cache}", reranker=reranker)
        return run_job(spark, config)

    first = night("first", sample_index)
    forms = first["surface_forms"]
    assert forms > 0 and first["form_cache"]["hits"] == 0
    same = night("same", sample_index)  # a new table: every form comes from the cache
    assert (same["surface_forms"], same["form_cache"]["hits"]) == (0, forms)
    reranked = night("reranked", sample_index, tiny_cross_encoder_dir)
    assert (reranked["surface_forms"], reranked["form_cache"]["hits"]) == (forms, 0)
    other = build_index(sample_terminology.iloc[::2], BiEncoder(tiny_encoder_dir, device="cpu"),
                        IndexConfig(), tmp_path / "other-index", name="other")
    other_index = night("other-index", other)
    assert (other_index["surface_forms"], other_index["form_cache"]["hits"]) == (forms, 0)


def test_a_reranked_links_score_is_the_rerankers_and_min_score_applies_to_it(
    spark, tmp_path, tiny_encoder_dir, tiny_cross_encoder_dir, sample_index,
):
    import math

    config = job_config(tmp_path / "all", tiny_encoder_dir, sample_index,
                        reranker=tiny_cross_encoder_dir)
    run_job(spark, config)
    rows = read_table(config.output.path)
    linked = rows[rows["status"] == "linked"]
    assert len(linked) > 10
    best = linked["candidates"].map(lambda c: c[0])
    rerank = best.map(lambda c: 1.0 / (1.0 + math.exp(-c["rerank_score"])))
    assert (linked["score"] - rerank).abs().max() < 1e-5
    assert (linked["score"] - best.map(lambda c: c["retrieval_score"])).abs().max() > 1e-3

    # min_score between the links' scores: the ones under it become no_candidate
    threshold = float(linked["score"].median())
    config = job_config(tmp_path / "min", tiny_encoder_dir, sample_index,
                        f"linking.min_score={threshold}", reranker=tiny_cross_encoder_dir)
    run_job(spark, config)
    again = read_table(config.output.path).set_index("mention_id")
    below = linked.set_index("mention_id")["score"] < threshold
    assert 0 < below.sum() < len(below)
    statuses = again.loc[below.index, "status"]
    assert (statuses[below] == "no_candidate").all()
    assert (statuses[~below] == "linked").all()
    assert again.loc[below[below].index, "reason"].str.startswith(
        "best score below linking.min_score").all()
