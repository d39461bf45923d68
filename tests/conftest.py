from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
sys.path.insert(0, str(TESTS_DIR))
# MLflow tracking off unless a test sets mlflow.tracking_uri (config default:
# $MLFLOW_TRACKING_URI): no test run lands in a developer's store or in artifacts/mlflow
os.environ["MLFLOW_TRACKING_URI"] = ""

from tiny_models import make_tiny_cross_encoder, make_tiny_encoder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(tmp_path_factory) -> Path:
    return make_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-cross-encoder"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real corpora); tests that need it are skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (only developers and CI have it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def spark():
    """The Spark tier's one local session, shared by every Spark test module.

    local[2,2]: 2 threads and 2 attempts per task, so that the retried-task test can run (a
    plain local[N] master never retries a task). Delta Lake is configured when its jars are on
    the machine (tests/spark_fixtures.py).
    """
    from spark_fixtures import make_local_spark

    session = make_local_spark({"spark.master": "local[2,2]"})
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


# set (CI sets it) to fail, not skip, the delta-spark tests where the Delta jars are missing
REQUIRE_DELTA_SPARK_ENV = "CLINLINKER_REQUIRE_DELTA_SPARK"
# outcome of each delta-spark test (marker delta_spark, or the delta_spark fixture), by node id
_DELTA_SPARK_OUTCOMES: dict[str, str] = {}


def pytest_collection_modifyitems(items):
    for item in items:
        if "delta_spark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.delta_spark)
        if item.get_closest_marker("delta_spark"):
            _DELTA_SPARK_OUTCOMES[item.nodeid] = "not run"


def pytest_runtest_logreport(report):
    if report.nodeid not in _DELTA_SPARK_OUTCOMES:
        return
    if report.when == "call" or report.outcome != "passed":
        if _DELTA_SPARK_OUTCOMES[report.nodeid] in ("not run", "passed"):
            _DELTA_SPARK_OUTCOMES[report.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter):
    """The delta-spark tests by name and outcome (CI shows that they ran, not skipped)."""
    ran = {k: v for k, v in _DELTA_SPARK_OUTCOMES.items() if v != "not run"}
    if not ran:
        return
    terminalreporter.section(f"delta-spark tests: {len(ran)}")
    for nodeid, outcome in sorted(ran.items()):
        terminalreporter.write_line(f"{outcome.upper():8} {nodeid}")


@pytest.fixture()
def delta_spark(spark):
    """The Spark session, with Delta Lake (delta-spark jars and session extension). Without
    the jars the test is skipped, or fails where CLINLINKER_REQUIRE_DELTA_SPARK is set."""
    from clinlinker_spark.spark.writer import delta_spark_available

    if not delta_spark_available(spark):
        reason = ("delta-spark jars (io.delta:delta-spark_2.13) not on this machine: run "
                  "tests/fetch_delta_jars.py where Maven Central is reachable")
        if os.environ.get(REQUIRE_DELTA_SPARK_ENV):
            pytest.fail(f"{reason} ({REQUIRE_DELTA_SPARK_ENV} is set)")
        pytest.skip(reason)
    return spark


@pytest.fixture()
def catalog_schema(delta_spark):
    """A fresh schema of the session's catalog (spark_catalog, a temporary warehouse), for
    tables by name; dropped with its tables afterwards."""
    name = f"clinlinker_test_{uuid.uuid4().hex[:8]}"
    delta_spark.sql(f"CREATE SCHEMA {name}")
    yield name
    delta_spark.sql(f"DROP SCHEMA IF EXISTS {name} CASCADE")
