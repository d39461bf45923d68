# Databricks notebook source
# MAGIC %md
# MAGIC # Build the terminology index
# MAGIC Embeds the terminology named in the job config (`terminology.sources`) with its bi-encoder
# MAGIC and writes an immutable index directory (FAISS + rows + manifest.json) to `index.path`.
# MAGIC Same code as `clinlinker build-index`. Run it on a GPU single-node cluster for large
# MAGIC terminologies; the index then serves every linking run that uses the same encoder.

# COMMAND ----------

# MAGIC %pip install /Volumes/clinical/linking/wheels/clinlinker_spark-0.1.0-py3-none-any.whl

# COMMAND ----------

# ruff: noqa: E402, F821 (a notebook: imports per cell; dbutils and display are Databricks globals)
dbutils.widgets.text(
    "config", "/Workspace/Repos/clinlinker-spark/conf/databricks.yaml", "Config YAML")
dbutils.widgets.text("index_path", "", "Index directory (index.path)")
dbutils.widgets.text("encoder_path", "", "Bi-encoder directory (encoder.path)")
dbutils.widgets.text("overrides", "", "More key=value overrides (; separated)")
dbutils.widgets.dropdown(
    "overwrite", "false", ["false", "true"], "Replace an existing index")

# COMMAND ----------

from clinlinker_spark.cli import main, setup_logging
from clinlinker_spark.widgets import widget_overrides

setup_logging("INFO")
values = {name: dbutils.widgets.get(name) for name in ("index_path", "encoder_path", "overrides")}
argv = ["build-index", "--config", dbutils.widgets.get("config")]
for item in widget_overrides(values):
    argv += ["--set", item]
if dbutils.widgets.get("overwrite") == "true":
    argv.append("--overwrite")
exit_code = main(argv)
assert exit_code == 0, f"build-index failed (exit code {exit_code}); see the log above"

# COMMAND ----------

import json

from clinlinker_spark.config import load_config
from clinlinker_spark.index import read_manifest

config = load_config(dbutils.widgets.get("config"), widget_overrides(values))
print(json.dumps(read_manifest(config.index.path), indent=2))
