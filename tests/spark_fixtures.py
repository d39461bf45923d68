"""The local SparkSession the Spark test tier shares (one per test session).

``make_local_spark()`` builds a small ``local[2]`` session: 2 shuffle partitions, no UI, UTC,
microsecond Parquet timestamps, a 2g driver. Delta Lake's jars are added only when they are on
this machine, never downloaded: ``CLINLINKER_DELTA_SPARK_JARS`` may list jar files (comma or
``os.pathsep`` separated) or a folder of jars; otherwise an Ivy cache (``~/.ivy2.5.2`` for
Spark 4, ``~/.ivy2``) that already holds ``io.delta:delta-spark_2.13:4.0.0`` is used through
``spark.jars.packages`` with ``spark.jars.ivy`` pointing at it. Catalog tables
(``schema.table``) live in the spark_catalog with a temporary warehouse folder.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

DELTA_SPARK_PACKAGE = "io.delta:delta-spark_2.13:4.0.0"
DELTA_JARS_ENV = "CLINLINKER_DELTA_SPARK_JARS"
_DELTA_JAR_NAMES = ("delta-spark_2.13-4.0.0.jar", "io.delta_delta-spark_2.13-4.0.0.jar")


def delta_spark_conf() -> dict[str, str]:
    """Spark settings that add Delta Lake from jars already on this machine; {} if none."""
    jars_setting = os.environ.get(DELTA_JARS_ENV, "").strip()
    if jars_setting:
        jars: list[str] = []
        for item in jars_setting.replace(os.pathsep, ",").split(","):
            item = item.strip()
            if not item:
                continue
            path = Path(item).expanduser()
            if path.is_dir():
                jars.extend(str(p) for p in sorted(path.glob("*.jar")))
            elif path.is_file():
                jars.append(str(path))
        if jars:
            return {"spark.jars": ",".join(jars), **_delta_session_conf()}
    for ivy_home in (Path.home() / ".ivy2.5.2", Path.home() / ".ivy2"):
        cached = [ivy_home / "jars" / name for name in _DELTA_JAR_NAMES] + [
            ivy_home / "cache" / "io.delta" / "delta-spark_2.13" / "jars" / name
            for name in _DELTA_JAR_NAMES
        ]
        if any(p.is_file() for p in cached):
            return {
                "spark.jars.packages": DELTA_SPARK_PACKAGE,
                "spark.jars.ivy": str(ivy_home),
                **_delta_session_conf(),
            }
    return {}


def _delta_session_conf() -> dict[str, str]:
    return {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    }


def make_local_spark(extra_conf: dict[str, str] | None = None) -> SparkSession:
    """A ``local[2]`` SparkSession for tests (Delta Lake included when its jars are here)."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    conf = {
        "spark.sql.shuffle.partitions": "2",
        "spark.default.parallelism": "2",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.driver.memory": "2g",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.warehouse.dir": tempfile.mkdtemp(prefix="clinlinker-warehouse-"),
        **delta_spark_conf(),
        **(extra_conf or {}),
    }
    builder = SparkSession.builder.master("local[2]").appName("clinlinker-tests")
    for key, value in conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()
