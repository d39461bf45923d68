# Databricks notebook source
# MAGIC %md
# MAGIC # Link mentions to codes
# MAGIC Runs the nightly linking job on this cluster's Spark session: mentions (Delta/Parquet)
# MAGIC -> bi-encoder + FAISS candidates -> cross-encoder re-ranking -> MERGE into the
# MAGIC code-assignment Delta table. Same code as `clinlinker link` and
# MAGIC `spark-submit jobs/link_mentions.py`; widgets only fill in config overrides.

# COMMAND ----------

# MAGIC %pip install /Volumes/clinical/linking/wheels/clinlinker_spark-0.1.0-py3-none-any.whl

# COMMAND ----------

# ruff: noqa: E402, F821 (a notebook: imports per cell; dbutils and display are Databricks globals)
dbutils.widgets.text(
    "config", "/Workspace/Repos/clinlinker-spark/conf/databricks.yaml", "Config YAML")
dbutils.widgets.text("input_table", "", "Mentions table (catalog.schema.table)")
dbutils.widgets.text("output_table", "", "Code-assignment table (catalog.schema.table)")
dbutils.widgets.text("index_path", "", "Index directory (index.path)")
dbutils.widgets.dropdown("incremental", "true", ["true", "false"], "Skip mentions already linked")
dbutils.widgets.text("overrides", "", "More key=value overrides (; separated)")
dbutils.widgets.text("run_id", "", "Run id (empty: random)")

# COMMAND ----------

from clinlinker_spark.cli import setup_logging
from clinlinker_spark.config import load_config
from clinlinker_spark.spark.pipeline import run_link_job
from clinlinker_spark.widgets import widget_overrides
from clinlinker_spark.spark.session import build_spark_session

setup_logging("INFO")
names = ("input_table", "output_table", "index_path", "incremental", "overrides")
config = load_config(dbutils.widgets.get("config"),
                     widget_overrides({n: dbutils.widgets.get(n) for n in names}))
spark = build_spark_session(config.spark)  # the cluster's session, with the job's SQL settings
summary = run_link_job(spark, config, run_id=dbutils.widgets.get("run_id") or None)
print(summary.to_json(indent=2))

# COMMAND ----------

from clinlinker_spark.spark.writer import read_delta

assignments = read_delta(spark, config.output.target)
display(assignments.groupBy("status", "run_id").count().orderBy("run_id", "status"))

# COMMAND ----------

display(
    assignments.filter(assignments.run_id == summary.run_id)
    .select("mention_id", "status", "reason", "code", "term", "score")
    .limit(50)
)
