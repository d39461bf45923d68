# Databricks notebook source
# MAGIC %md
# MAGIC # Build the clinical-variables table
# MAGIC Turns the code-assignment Delta table into one row per (patient or document, variable):
# MAGIC present, first/last date seen, number of supporting mentions, the evidence (mention ids,
# MAGIC codes, scores), the model/index versions and the run id. Variables are defined in YAML
# MAGIC (`conf/variables/*.yaml`: ICD-10 codes and prefixes, SNOMED-CT descendants through an
# MAGIC is-a table, labels, minimum score). Same code as `clinlinker variables` and
# MAGIC `spark-submit jobs/build_variables.py`; widgets only fill in config overrides. Reruns
# MAGIC replace the variables' rows (never duplicate them).

# COMMAND ----------

# MAGIC %pip install /Volumes/clinical/linking/wheels/clinlinker_spark-0.1.0-py3-none-any.whl

# COMMAND ----------

# ruff: noqa: E402, F821 (a notebook: imports per cell; dbutils and display are Databricks globals)
dbutils.widgets.text(
    "config", "/Workspace/Repos/clinlinker-spark/conf/variables.yaml", "Config YAML")
dbutils.widgets.text("assignments_table", "clinical.linking.code_assignments",
                     "Code-assignment table (catalog.schema.table)")
dbutils.widgets.text("documents_path", "", "Documents table: doc_id -> patient, date")
dbutils.widgets.text("patient_id_column", "", "Patient id column (empty: unit = document)")
dbutils.widgets.text("date_column", "", "Document date column")
dbutils.widgets.text("definitions", "", "Definition files/globs (comma separated)")
dbutils.widgets.text("isa_path", "", "Is-a table (SNOMED-CT RF2 relationships or child/parent)")
dbutils.widgets.text("index_path", "", "Index the assignments came from (validation)")
dbutils.widgets.text("output_table", "clinical.linking.clinical_variables",
                     "Variables table (catalog.schema.table)")
dbutils.widgets.dropdown("emit_absent", "false", ["false", "true"], "Rows for absent variables")
dbutils.widgets.text("overrides", "", "More key=value overrides (; separated)")
dbutils.widgets.text("run_id", "", "Run id (empty: random)")

# COMMAND ----------

import json

from clinlinker_spark.cli import setup_logging
from clinlinker_spark.config import load_config
from clinlinker_spark.spark.session import build_spark_session
from clinlinker_spark.spark.variables_job import run_variables_job
from clinlinker_spark.widgets import VARIABLES_WIDGETS, widget_overrides
from clinlinker_spark.variables import VariablesJobConfig, format_coverage, validate_variables

setup_logging("INFO")
names = [n for n in VARIABLES_WIDGETS if n not in ("assignments_path", "output_path")]
values = {name: dbutils.widgets.get(name) for name in [*names, "overrides"]}
# spark.master= keeps the cluster's session (conf/variables.yaml names local[2] for laptops)
overrides = ["spark.master=", *widget_overrides(values, VARIABLES_WIDGETS)]
config = load_config(dbutils.widgets.get("config"), overrides, cls=VariablesJobConfig)
if config.index_path:
    print(format_coverage(validate_variables(config)))

# COMMAND ----------

spark = build_spark_session(config.spark)  # the cluster's session, with the job's SQL settings
summary = run_variables_job(spark, config, run_id=dbutils.widgets.get("run_id") or None)
print(json.dumps(summary, indent=2))

# COMMAND ----------

from pyspark.sql import functions as F

from clinlinker_spark.spark.writer import read_delta

variables = read_delta(spark, config.output.target)
display(
    variables.where(F.col("present"))
    .groupBy("unit_type", "variable")
    .agg(F.countDistinct("unit_id").alias("units"), F.sum("n_mentions").alias("mentions"),
         F.min("first_seen").alias("first_seen"), F.max("last_seen").alias("last_seen"))
    .orderBy("unit_type", "variable")
)

# COMMAND ----------

display(
    variables.where(F.col("run_id") == summary["run_id"])
    .select("unit_type", "unit_id", "variable", "present", "first_seen", "last_seen",
            "n_mentions", "evidence", "definition_hash", "model_version", "index_version")
    .orderBy("variable", "unit_id")
    .limit(200)
)
