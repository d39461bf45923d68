"""The one place a SparkSession is built from configuration.

Everything else takes the session as an argument. For local masters the environment a fresh
machine needs is filled in when unset: ``SPARK_LOCAL_IP`` (no reverse-DNS surprises on laptops
and CI runners) and ``PYSPARK_PYTHON`` / ``PYSPARK_DRIVER_PYTHON`` = this interpreter (so Python
workers import the same virtual environment as the driver). On a cluster those come from the
cluster (spark-submit ``--archives`` with a packed environment, a container image, Databricks).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Mapping

from clinlinker_spark.config import SparkConfig

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)


def task_slots(spark: SparkSession, task_cpus: int | None = None) -> int | None:
    """How many tasks ``spark`` runs at once: its default parallelism over ``spark.task.cpus``
    (``task_cpus`` when given); None where it cannot tell (Spark Connect)."""
    try:
        context = spark.sparkContext
        cpus = task_cpus if task_cpus is not None else int(
            context.getConf().get("spark.task.cpus", "1"))
        return max(1, int(context.defaultParallelism) // max(1, cpus))
    except Exception:  # noqa: BLE001 - Spark Connect has no SparkContext
        return None


def is_local_master(master: str) -> bool:
    """True for ``local``, ``local[N]``, ``local[N,F]``, ``local[*]`` and ``local-cluster[...]``."""
    return master == "local" or master.startswith("local[") or master.startswith("local-cluster")


def spark_conf_pairs(cfg: SparkConfig) -> dict[str, str]:
    """The ``spark.*`` settings derived from ``cfg`` (extra ``cfg.conf`` entries win)."""
    conf: dict[str, str] = {
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.arrow_batch_size),
        "spark.task.cpus": str(cfg.task_cpus),
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.session.timeZone": "UTC",
        "spark.driver.memory": cfg.driver_memory,
        # PySpark 4 otherwise records the Python call site of every DataFrame and Column call
        # in the JVM (a stack walk and three py4j round trips each; ~0.3 s of a nightly run's
        # plan building); errors still name the failing expression
        "spark.python.sql.dataFrameDebugging.enabled": "false",
        # adaptive execution may join on a hash table of each shuffled partition up to this
        # size instead of sorting both sides: an incremental night's input is sorted by id
        # already (its de-duplication window), the table it is matched with is not
        "spark.sql.adaptive.maxShuffledHashJoinLocalMapThreshold": "64MB",
        # one run of the job uses more generated classes than Spark's default cache of 100
        # holds: with that default a session that runs it again (a notebook, a service, the
        # benchmarks) compiles every class again each run, and the JIT starts over on each;
        # a static setting: it applies to a session this function starts
        "spark.sql.codegen.cache.maxEntries": "1000",
    }
    if cfg.executor_gpus > 0:
        conf["spark.executor.resource.gpu.amount"] = str(cfg.executor_gpus)
    if cfg.task_gpus > 0:
        conf["spark.task.resource.gpu.amount"] = _number(cfg.task_gpus)
    if cfg.gpu_discovery_script:
        conf["spark.executor.resource.gpu.discoveryScript"] = cfg.gpu_discovery_script
    conf.update({str(k): str(v) for k, v in cfg.conf.items()})
    return conf


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def prepare_local_environment(cfg: SparkConfig, environ: Mapping[str, str] | None = None) -> dict:
    """Environment variables to set before a local JVM starts (only those not already set)."""
    env = os.environ if environ is None else environ
    wanted = {
        "SPARK_LOCAL_IP": cfg.local_ip,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }
    return {k: v for k, v in wanted.items() if v and not env.get(k)}


def build_spark_session(
    cfg: SparkConfig, extra_conf: Mapping[str, str] | None = None
) -> SparkSession:
    """Build (or get) the SparkSession described by ``cfg``.

    ``extra_conf`` is applied last (tests use it to lower memory or disable the UI). Settings
    such as driver memory only take effect when this call starts the JVM; when a session
    already exists (a notebook, ``pyspark`` shell, Databricks) it is returned with the
    session-level SQL settings applied.
    """
    from pyspark.sql import SparkSession

    if is_local_master(cfg.master):
        for key, value in prepare_local_environment(cfg).items():
            os.environ[key] = value
            log.debug("set %s for a local Spark master", key)
    conf = spark_conf_pairs(cfg)
    conf.update({str(k): str(v) for k, v in (extra_conf or {}).items()})
    master = cfg.master
    submitted = _submitted_conf()
    if submitted:
        # Under spark-submit, what its command line (or spark-defaults.conf) set wins.
        kept = sorted(k for k in conf if k in submitted)
        conf = {k: v for k, v in conf.items() if k not in submitted}
        if "spark.master" in submitted:
            master = ""
        log.debug("spark-submit settings kept over the config: %s", kept)

    builder = SparkSession.builder.appName(cfg.app_name)
    if master:
        builder = builder.master(master)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    # getOrCreate() on an existing session ignores builder settings it cannot change; the
    # SQL ones can still be set at runtime.
    for key, value in conf.items():
        if key.startswith("spark.sql."):
            try:
                spark.conf.set(key, value)
            except Exception:  # noqa: BLE001 - static SQL conf on a running session
                log.debug("could not set %s on the running session", key)
    log.info(
        "Spark session ready: master=%s, version=%s, shuffle partitions=%s",
        spark.sparkContext.master, spark.version,
        spark.conf.get("spark.sql.shuffle.partitions"),
    )
    return spark


# Spark's loggers that print each failed task's whole Java trace (local masters run the
# executor in the driver's JVM, so a console run shows it)
TASK_FAILURE_LOGGERS = ("org.apache.spark.executor.Executor",
                        "org.apache.spark.scheduler.TaskSetManager")


def quiet_task_failures(spark: SparkSession) -> None:
    """Turn off the per-task failure traces of :data:`TASK_FAILURE_LOGGERS` in this driver:
    a failed run is reported once, by its own error (the CLI's one line; the trace at DEBUG).
    A failure to reach log4j (Spark Connect) leaves the logging as it is."""
    try:
        jvm = spark.sparkContext._jvm
        off = jvm.org.apache.logging.log4j.Level.OFF
        for name in TASK_FAILURE_LOGGERS:
            jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(name, off)
    except Exception:  # noqa: BLE001 - no JVM of ours to configure
        log.debug("Spark's task-failure logging left as it is")


def _submitted_conf() -> set[str]:
    """Keys spark-submit already set for this driver (empty when Python started the JVM).

    ``PYSPARK_GATEWAY_PORT`` is set when the driver runs under spark-submit (the JVM came
    first); only then is ``SparkConf()`` read before the session is built, because reading it
    otherwise would start the JVM without the driver settings of the config.
    """
    if not os.environ.get("PYSPARK_GATEWAY_PORT"):
        return set()
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # connects to spark-submit's JVM; starts nothing
    return {key for key, _ in SparkConf().getAll()}


class Persisted:
    """Persists the frames a job reads more than once (``MEMORY_AND_DISK``), as a callable
    ``persist(df) -> df``, and releases them all at the end of the job (:meth:`release`)."""

    def __init__(self) -> None:
        self._frames: list[DataFrame] = []

    def __call__(self, df: DataFrame) -> DataFrame:
        from pyspark import StorageLevel

        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        self._frames.append(df)
        return df

    def release(self) -> None:
        """Unpersist every frame persisted so far."""
        for df in self._frames:
            df.unpersist()
        self._frames.clear()
