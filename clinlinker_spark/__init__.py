"""ClinLinker-style clinical entity linking as a Spark batch job."""

import os as _os

__version__ = "0.1.0"

# No network at run time: MLflow (tracking, the registry, the pyfunc model) would otherwise
# send usage telemetry from outside CI. Set before any module of the package imports mlflow;
# a user who sets the variable keeps their own value.
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
