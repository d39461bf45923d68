# Databricks notebook source
# MAGIC %md
# MAGIC # Evaluate the linker on gold mentions
# MAGIC accuracy@k (k = 1, 5, 25, 50, 100, 200) of the bi-encoder (with and without the
# MAGIC exact-match prior), the cross-encoder re-ranking and the TF-IDF baseline, on a gold corpus
# MAGIC (DisTEMIST, MedProcNER or CodiEsp-X TSVs). Same code as `clinlinker evaluate`; the
# MAGIC encoder, index and re-ranker come from the job config unless a widget names them.

# COMMAND ----------

# MAGIC %pip install /Volumes/clinical/linking/wheels/clinlinker_spark-0.1.0-py3-none-any.whl

# COMMAND ----------

# ruff: noqa: E402, F821 (a notebook: imports per cell; dbutils and display are Databricks globals)
dbutils.widgets.text(
    "config", "/Workspace/Repos/clinlinker-spark/conf/databricks.yaml", "Config YAML")
dbutils.widgets.text(
    "gold", "/Volumes/clinical/linking/gold/codiesp/devX.tsv", "Gold TSV file or folder")
dbutils.widgets.dropdown(
    "gold_format", "codiesp", ["distemist", "medprocner", "codiesp"], "Gold format")
dbutils.widgets.text("labels", "", "Labels to keep (comma separated)")
dbutils.widgets.text("index_path", "", "Index directory (default: index.path)")
dbutils.widgets.text("encoder_path", "", "Bi-encoder (default: encoder.path)")
dbutils.widgets.text("reranker_path", "", "Cross-encoder (default: reranker.path)")
dbutils.widgets.text("k", "1,5,25,50,100,200", "Cut-offs")
dbutils.widgets.text("json_out", "", "Also write the JSON report here")

# COMMAND ----------

from clinlinker_spark.cli import main, setup_logging
from clinlinker_spark.config import load_config
from clinlinker_spark.widgets import widget_overrides

setup_logging("INFO")
names = ("index_path", "encoder_path", "reranker_path")
config = load_config(dbutils.widgets.get("config"),
                     widget_overrides({n: dbutils.widgets.get(n) for n in names}))
argv = [
    "evaluate", "--gold", dbutils.widgets.get("gold"),
    "--gold-format", dbutils.widgets.get("gold_format"),
    "--index", config.index.path, "--encoder", config.encoder.path,
    "--k", dbutils.widgets.get("k"),
]
for flag, value in (("--labels", dbutils.widgets.get("labels")),
                    ("--reranker", config.reranker.path),
                    ("--json-out", dbutils.widgets.get("json_out"))):
    if value:
        argv += [flag, value]
exit_code = main(argv)
assert exit_code == 0, f"evaluate failed (exit code {exit_code}); see the log above"
