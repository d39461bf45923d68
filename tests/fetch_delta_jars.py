"""Put delta-spark's jars in the Ivy cache that the Spark test tier reads (``make test`` runs
this before pytest). Resolving ``spark.jars.packages`` downloads them from Maven Central once;
later runs find them in ``~/.ivy2.5.2`` and download nothing. Without network access it
exits non-zero and the delta-spark tests are skipped with that reason: the product itself
never downloads anything.

    .venv/bin/python tests/fetch_delta_jars.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spark_fixtures import DELTA_SPARK_PACKAGE, delta_spark_conf  # noqa: E402


def main() -> int:
    if delta_spark_conf():
        print(f"{DELTA_SPARK_PACKAGE}: already on this machine")
        return 0
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[1]").appName("fetch-delta-jars")
             .config("spark.jars.packages", DELTA_SPARK_PACKAGE)
             .config("spark.jars.ivy", str(Path.home() / ".ivy2.5.2"))
             .config("spark.ui.enabled", "false").getOrCreate())
    spark.stop()
    found = bool(delta_spark_conf())
    print(f"{DELTA_SPARK_PACKAGE}: {'fetched' if found else 'not fetched'}")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
